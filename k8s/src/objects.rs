//! The objects portier has seen, by kind and key: what the watchers keep up to date
//! and what `check --objects` reads from files. Translation reads only this.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::de::DeserializeOwned;

use crate::gateway::{Gateway, GatewayClass, HttpRoute, ReferenceGrant};

/// NAMESPACE (empty for cluster-scoped objects) and NAME.
pub type Key = (String, String);

/// The kinds portier reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    GatewayClass,
    Gateway,
    HttpRoute,
    ReferenceGrant,
    Ingress,
    IngressClass,
    Service,
    EndpointSlice,
    Secret,
    Namespace,
}

impl Kind {
    /// The kind as objects spell it.
    pub fn name(self) -> &'static str {
        match self {
            Kind::GatewayClass => "GatewayClass",
            Kind::Gateway => "Gateway",
            Kind::HttpRoute => "HTTPRoute",
            Kind::ReferenceGrant => "ReferenceGrant",
            Kind::Ingress => "Ingress",
            Kind::IngressClass => "IngressClass",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Secret => "Secret",
            Kind::Namespace => "Namespace",
        }
    }

    /// The kind of an object with this `apiVersion` and `kind`, if portier reads it.
    pub fn of(api_version: &str, kind: &str) -> Option<Kind> {
        let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
        Some(match (group, kind) {
            ("gateway.networking.k8s.io", "GatewayClass") => Kind::GatewayClass,
            ("gateway.networking.k8s.io", "Gateway") => Kind::Gateway,
            ("gateway.networking.k8s.io", "HTTPRoute") => Kind::HttpRoute,
            ("gateway.networking.k8s.io", "ReferenceGrant") => Kind::ReferenceGrant,
            ("networking.k8s.io", "Ingress") => Kind::Ingress,
            ("networking.k8s.io", "IngressClass") => Kind::IngressClass,
            ("", "Service") => Kind::Service,
            ("discovery.k8s.io", "EndpointSlice") => Kind::EndpointSlice,
            ("", "Secret") => Kind::Secret,
            ("", "Namespace") => Kind::Namespace,
            _ => return None,
        })
    }
}

/// One object named in a problem or a status: its kind, namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjRef {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for ObjRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind.name(), self.name)
        } else {
            write!(f, "{} {}/{}", self.kind.name(), self.namespace, self.name)
        }
    }
}

/// Every object portier reads, by kind, then by key. Maps and objects are shared
/// (`Arc`): a snapshot of the store costs nothing, and a change copies the map of its
/// kind only (copy on write), never the objects.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    pub gateway_classes: Arc<BTreeMap<Key, Arc<GatewayClass>>>,
    pub gateways: Arc<BTreeMap<Key, Arc<Gateway>>>,
    pub http_routes: Arc<BTreeMap<Key, Arc<HttpRoute>>>,
    pub reference_grants: Arc<BTreeMap<Key, Arc<ReferenceGrant>>>,
    pub ingresses: Arc<BTreeMap<Key, Arc<Ingress>>>,
    pub ingress_classes: Arc<BTreeMap<Key, Arc<IngressClass>>>,
    pub services: Arc<BTreeMap<Key, Arc<Service>>>,
    pub endpoint_slices: Arc<BTreeMap<Key, Arc<EndpointSlice>>>,
    /// `kubernetes.io/tls` Secrets only: the others are never kept.
    pub secrets: Arc<BTreeMap<Key, Arc<Secret>>>,
    pub namespaces: Arc<BTreeMap<Key, Arc<Namespace>>>,
}

/// A kind the store keeps: where its objects live in [`Objects`].
pub trait Stored:
    kube::Resource + DeserializeOwned + Clone + std::fmt::Debug + Send + Sync + 'static
{
    const KIND: Kind;
    fn map(objects: &mut Objects) -> &mut BTreeMap<Key, Arc<Self>>;
    /// Whether the store keeps this object (Secrets: only `kubernetes.io/tls`).
    fn keep(&self) -> bool {
        true
    }

    /// Whether `new` differs from `old` in its status only (a status write coming
    /// back): nothing to translate again. Only kinds with a `metadata.generation`
    /// that counts spec changes can tell.
    fn same_but_status(_old: &Self, _new: &Self) -> bool {
        false
    }

    /// Gives back the spare capacity of its lists (a list read from JSON grows by
    /// doubling; most hold one element): the store keeps thousands of them.
    fn compact(&mut self) {}
}

/// The same generation, labels and annotations: only the status can differ.
fn same_but_status(old: &ObjectMeta, new: &ObjectMeta) -> bool {
    old.generation.is_some()
        && old.generation == new.generation
        && old.labels == new.labels
        && old.annotations == new.annotations
        && old.deletion_timestamp == new.deletion_timestamp
}

macro_rules! stored {
    ($ty:ty, $kind:ident, $field:ident) => {
        impl Stored for $ty {
            const KIND: Kind = Kind::$kind;
            fn map(objects: &mut Objects) -> &mut BTreeMap<Key, Arc<Self>> {
                Arc::make_mut(&mut objects.$field)
            }
        }
    };
}
macro_rules! stored_with_status {
    ($ty:ty, $kind:ident, $field:ident) => {
        impl Stored for $ty {
            const KIND: Kind = Kind::$kind;
            fn map(objects: &mut Objects) -> &mut BTreeMap<Key, Arc<Self>> {
                Arc::make_mut(&mut objects.$field)
            }
            fn same_but_status(old: &Self, new: &Self) -> bool {
                same_but_status(&old.metadata, &new.metadata)
            }
        }
    };
}
stored_with_status!(GatewayClass, GatewayClass, gateway_classes);
stored_with_status!(Gateway, Gateway, gateways);
impl Stored for HttpRoute {
    const KIND: Kind = Kind::HttpRoute;
    fn map(objects: &mut Objects) -> &mut BTreeMap<Key, Arc<Self>> {
        Arc::make_mut(&mut objects.http_routes)
    }
    fn same_but_status(old: &Self, new: &Self) -> bool {
        same_but_status(&old.metadata, &new.metadata)
    }
    fn compact(&mut self) {
        let s = &mut self.spec;
        s.parent_refs.shrink_to_fit();
        s.hostnames.shrink_to_fit();
        s.rules.shrink_to_fit();
        for r in &mut s.rules {
            r.matches.shrink_to_fit();
            r.filters.shrink_to_fit();
            r.backend_refs.shrink_to_fit();
        }
    }
}
stored!(ReferenceGrant, ReferenceGrant, reference_grants);
stored_with_status!(Ingress, Ingress, ingresses);
stored!(IngressClass, IngressClass, ingress_classes);
impl Stored for Service {
    const KIND: Kind = Kind::Service;
    fn map(objects: &mut Objects) -> &mut BTreeMap<Key, Arc<Self>> {
        Arc::make_mut(&mut objects.services)
    }
    fn compact(&mut self) {
        if let Some(p) = self.spec.as_mut().and_then(|s| s.ports.as_mut()) {
            p.shrink_to_fit();
        }
    }
}

impl Stored for EndpointSlice {
    const KIND: Kind = Kind::EndpointSlice;
    fn map(objects: &mut Objects) -> &mut BTreeMap<Key, Arc<Self>> {
        Arc::make_mut(&mut objects.endpoint_slices)
    }
    fn compact(&mut self) {
        for e in self.endpoints.iter_mut() {
            e.shrink_to_fit();
            for x in e.iter_mut() {
                x.addresses.shrink_to_fit();
            }
        }
        if let Some(p) = self.ports.as_mut() {
            p.shrink_to_fit();
        }
    }
}
stored!(Namespace, Namespace, namespaces);

impl Stored for Secret {
    const KIND: Kind = Kind::Secret;
    fn map(objects: &mut Objects) -> &mut BTreeMap<Key, Arc<Self>> {
        Arc::make_mut(&mut objects.secrets)
    }
    fn keep(&self) -> bool {
        self.type_.as_deref() == Some("kubernetes.io/tls")
    }
}

/// Drops what portier never reads and a real API server sends with every object:
/// `managedFields` and kubectl's `last-applied-configuration` (a copy of the whole
/// object), often most of an object's size.
pub(crate) fn slim<K: kube::Resource>(o: &mut K) {
    let m = o.meta_mut();
    m.managed_fields = None;
    if let Some(a) = m.annotations.as_mut() {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

/// The key of an object.
pub fn key_of<K: kube::Resource>(o: &K) -> Key {
    let m = o.meta();
    (
        m.namespace.clone().unwrap_or_default(),
        m.name.clone().unwrap_or_default(),
    )
}

impl Objects {
    /// Puts `o` in (or, when the store does not keep it, takes any older version out).
    pub fn put<K: Stored>(&mut self, mut o: K) {
        slim(&mut o);
        o.compact();
        let key = key_of(&o);
        if o.keep() {
            K::map(self).insert(key, Arc::new(o));
        } else {
            K::map(self).remove(&key);
        }
    }

    pub fn remove<K: Stored>(&mut self, key: &Key) {
        K::map(self).remove(key);
    }

    /// Replaces every object of one kind (a watcher's fresh list), in namespace `ns`
    /// only when given.
    pub fn replace_all<K: Stored>(&mut self, ns: Option<&str>, all: impl IntoIterator<Item = K>) {
        let map = K::map(self);
        match ns {
            Some(ns) => map.retain(|k, _| k.0 != ns),
            None => map.clear(),
        }
        for mut o in all {
            slim(&mut o);
            o.compact();
            if o.keep() {
                map.insert(key_of(&o), Arc::new(o));
            }
        }
    }

    /// Reads one object given as JSON (a YAML document): its kind and key; `None` for
    /// an object of a kind portier does not read (a Deployment beside the routes).
    pub fn put_json(&mut self, v: serde_json::Value) -> Result<Option<(Kind, Key)>, String> {
        let api_version = v.get("apiVersion").and_then(|a| a.as_str()).unwrap_or("");
        let kind = v.get("kind").and_then(|k| k.as_str()).unwrap_or("");
        if api_version.is_empty() || kind.is_empty() {
            return Err("not a Kubernetes object: `apiVersion` and `kind` are needed".into());
        }
        let Some(k) = Kind::of(api_version, kind) else {
            return Ok(None);
        };
        fn put<K: Stored>(o: &mut Objects, v: serde_json::Value) -> Result<Key, String> {
            let mut obj: K = serde_json::from_value(v).map_err(|e| e.to_string())?;
            // Namespaced and without a namespace: `default`, where kubectl puts it.
            let namespaced = std::any::TypeId::of::<K::Scope>()
                == std::any::TypeId::of::<k8s_openapi::NamespaceResourceScope>();
            if namespaced && obj.meta().namespace.is_none() {
                obj.meta_mut().namespace = Some("default".into());
            }
            // Cluster-scoped: a namespace (kustomize adds one) means nothing.
            if !namespaced {
                obj.meta_mut().namespace = None;
            }
            let key = key_of(&obj);
            if key.1.is_empty() {
                return Err("metadata.name is missing".into());
            }
            o.put(obj);
            Ok(key)
        }
        let key = match k {
            Kind::GatewayClass => put::<GatewayClass>(self, v),
            Kind::Gateway => put::<Gateway>(self, v),
            Kind::HttpRoute => put::<HttpRoute>(self, v),
            Kind::ReferenceGrant => put::<ReferenceGrant>(self, v),
            Kind::Ingress => put::<Ingress>(self, v),
            Kind::IngressClass => put::<IngressClass>(self, v),
            Kind::Service => put::<Service>(self, v),
            Kind::EndpointSlice => put::<EndpointSlice>(self, v),
            Kind::Secret => put::<Secret>(self, v),
            Kind::Namespace => put::<Namespace>(self, v),
        }?;
        Ok(Some((k, key)))
    }

    /// How many objects are kept.
    pub fn len(&self) -> usize {
        self.gateway_classes.len()
            + self.gateways.len()
            + self.http_routes.len()
            + self.reference_grants.len()
            + self.ingresses.len()
            + self.ingress_classes.len()
            + self.services.len()
            + self.endpoint_slices.len()
            + self.secrets.len()
            + self.namespaces.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_keeps_tls_secrets_only_and_drops_managed_fields() {
        let mut o = Objects::default();
        let secret = |name: &str, kind: &str| {
            serde_json::json!({"apiVersion": "v1", "kind": "Secret", "type": kind,
                "metadata": {"name": name, "namespace": "a",
                    "managedFields": [{"manager": "kubectl", "operation": "Apply"}],
                    "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{...}", "x": "y"}}})
        };
        o.put_json(secret("tls", "kubernetes.io/tls")).unwrap();
        o.put_json(secret("opaque", "Opaque")).unwrap();
        assert_eq!(o.len(), 1);
        let s = &o.secrets[&("a".to_string(), "tls".to_string())];
        assert!(s.metadata.managed_fields.is_none());
        let a = s.metadata.annotations.as_ref().unwrap();
        assert_eq!(a.len(), 1, "{a:?}");
        // A Secret that stops being a TLS one goes.
        o.put_json(secret("tls", "Opaque")).unwrap();
        assert!(o.is_empty());
    }
}
