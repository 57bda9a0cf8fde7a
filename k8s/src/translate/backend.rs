//! Backends: a Service and port become a pool named `NAMESPACE/SERVICE:PORT`, its
//! members the ready endpoints of the Service's EndpointSlices, its pool keys the
//! Service's `portier.dev/KEY` annotations. ReferenceGrants decide what another
//! namespace may be referred to.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::{Service, ServicePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use portier_config::Pool;

use super::annotations;
use crate::objects::Objects;

/// The members of a provided pool.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Endpoints {
    pub http: Vec<SocketAddr>,
    pub longpolling: Vec<SocketAddr>,
}

/// A Service's port as a reference names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortRef {
    Number(i32),
    Name(String),
}

/// Why a backend could not be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendError {
    /// The Service or its port does not exist (`BackendNotFound`).
    NotFound(String),
    /// A Service annotation is invalid (`UnsupportedValue`).
    Invalid(String),
}

/// The pools built so far and the index of EndpointSlices by Service.
pub struct Backends<'a> {
    objects: &'a Objects,
    slices: HashMap<(&'a str, &'a str), Vec<&'a EndpointSlice>>,
    pub pools: Vec<Pool>,
    by_name: HashMap<String, usize>,
    pub endpoints: BTreeMap<String, Endpoints>,
    /// The Service and port of each pool built from one.
    pub services: BTreeMap<String, (String, String, i32)>,
}

impl<'a> Backends<'a> {
    pub fn new(objects: &'a Objects) -> Backends<'a> {
        Backends {
            objects,
            slices: slices_by_service(objects),
            pools: Vec::new(),
            by_name: HashMap::new(),
            endpoints: BTreeMap::new(),
            services: BTreeMap::new(),
        }
    }

    /// A pool without members (a backend that does not resolve: its requests fail).
    pub fn empty(&mut self, name: &str) -> usize {
        if let Some(&i) = self.by_name.get(name) {
            return i;
        }
        let mut pool = Pool::empty(name);
        pool.provided = true;
        self.endpoints
            .insert(name.to_string(), Endpoints::default());
        self.pools.push(pool);
        self.by_name.insert(name.to_string(), self.pools.len() - 1);
        self.pools.len() - 1
    }

    /// The pool of Service `ns/name` at `port` (built once, then shared).
    pub fn pool(&mut self, ns: &str, name: &str, port: &PortRef) -> Result<usize, BackendError> {
        let key = (ns.to_string(), name.to_string());
        let Some(svc) = self.objects.services.get(&key) else {
            return Err(BackendError::NotFound(format!(
                "Service {ns}/{name} does not exist"
            )));
        };
        let ports = svc
            .spec
            .as_ref()
            .and_then(|s| s.ports.as_ref())
            .cloned()
            .unwrap_or_default();
        let Some(sp) = ports.iter().find(|p| match port {
            PortRef::Number(n) => p.port == *n,
            PortRef::Name(s) => p.name.as_deref() == Some(s.as_str()),
        }) else {
            let which = match port {
                PortRef::Number(n) => n.to_string(),
                PortRef::Name(s) => format!("\"{s}\""),
            };
            return Err(BackendError::NotFound(format!(
                "Service {ns}/{name} has no port {which}"
            )));
        };
        let pool_name = format!("{ns}/{name}:{}", sp.port);
        if let Some(&i) = self.by_name.get(&pool_name) {
            return Ok(i);
        }
        let pool = service_pool(&pool_name, svc)?;
        let slices = self
            .slices
            .get(&(ns, name))
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        self.endpoints
            .insert(pool_name.clone(), endpoints_at(slices, &ports, sp));
        self.services.insert(
            pool_name.clone(),
            (ns.to_string(), name.to_string(), sp.port),
        );
        self.pools.push(pool);
        self.by_name.insert(pool_name, self.pools.len() - 1);
        Ok(self.pools.len() - 1)
    }
}

fn service_pool(pool_name: &str, svc: &Service) -> Result<Pool, BackendError> {
    let values = annotations(&svc.metadata);
    let pairs: Vec<(&str, &str)> = values
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    portier_config::pool_from_values(pool_name, &pairs).map_err(|errors| {
        BackendError::Invalid(
            errors
                .iter()
                .map(|e| {
                    format!(
                        "annotation portier.dev/{} of Service {}: {}",
                        e.key,
                        svc_name(svc),
                        e.message
                    )
                })
                .collect::<Vec<_>>()
                .join("; "),
        )
    })
}

fn svc_name(svc: &Service) -> String {
    format!(
        "{}/{}",
        svc.metadata.namespace.as_deref().unwrap_or(""),
        svc.metadata.name.as_deref().unwrap_or("")
    )
}

/// A pool's members: the ready endpoints at the Service port `sp`, and at its port
/// named `longpolling` or `websocket`.
fn endpoints_at(slices: &[&EndpointSlice], ports: &[ServicePort], sp: &ServicePort) -> Endpoints {
    let lp = ports
        .iter()
        .find(|p| matches!(p.name.as_deref(), Some("longpolling") | Some("websocket")));
    Endpoints {
        http: ready_addresses(slices, sp),
        longpolling: lp.map(|p| ready_addresses(slices, p)).unwrap_or_default(),
    }
}

/// The members of each pool of `services` (pool -> Service and port) from the objects
/// as they are now: what an EndpointSlice change needs, without translating again.
pub fn endpoints(
    objects: &Objects,
    services: &BTreeMap<String, (String, String, i32)>,
) -> BTreeMap<String, Endpoints> {
    let slices = slices_by_service(objects);
    services
        .iter()
        .map(|(pool, (ns, name, port))| {
            let svc = objects.services.get(&(ns.clone(), name.clone()));
            let ports = svc
                .and_then(|s| s.spec.as_ref())
                .and_then(|s| s.ports.clone())
                .unwrap_or_default();
            let eps = match ports.iter().find(|p| p.port == *port) {
                Some(sp) => {
                    let these = slices.get(&(ns.as_str(), name.as_str()));
                    endpoints_at(these.map(Vec::as_slice).unwrap_or(&[]), &ports, sp)
                }
                None => Endpoints::default(),
            };
            (pool.clone(), eps)
        })
        .collect()
}

/// EndpointSlices by the Service they belong to (label `kubernetes.io/service-name`).
fn slices_by_service(objects: &Objects) -> HashMap<(&str, &str), Vec<&EndpointSlice>> {
    let mut map: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
    for ((ns, _), s) in objects.endpoint_slices.iter() {
        if let Some(svc) = s
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("kubernetes.io/service-name"))
        {
            map.entry((ns.as_str(), svc.as_str())).or_default().push(s);
        }
    }
    map
}

/// The addresses of the ready endpoints, at the slice port that serves `sp` (the same
/// name; the only port of an unnamed Service port). Ready: `conditions.ready` true or
/// unset; a terminating endpoint is not ready and gets no new request.
pub fn ready_addresses(slices: &[&EndpointSlice], sp: &ServicePort) -> Vec<SocketAddr> {
    let mut out = BTreeSet::new();
    for s in slices {
        let Some(port) = s
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref().unwrap_or("") == sp.name.as_deref().unwrap_or(""))
        else {
            continue;
        };
        let Some(number) = port.port.and_then(|p| u16::try_from(p).ok()) else {
            continue;
        };
        for e in s.endpoints.iter().flatten() {
            let c = e.conditions.as_ref();
            let ready = c.and_then(|c| c.ready).unwrap_or(true);
            let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
            if !ready || terminating {
                continue;
            }
            for a in &e.addresses {
                if let Ok(ip) = a.parse::<IpAddr>() {
                    out.insert(SocketAddr::new(ip, number));
                }
            }
        }
    }
    out.into_iter().collect()
}

/// Whether a ReferenceGrant in `to_ns` lets a `from_kind` (of `from_group`) in
/// `from_ns` refer to the `to_kind` object `to_name` there.
pub fn granted(
    objects: &Objects,
    from_group: &str,
    from_kind: &str,
    from_ns: &str,
    to_kind: &str,
    to_ns: &str,
    to_name: &str,
) -> bool {
    if from_ns == to_ns {
        return true;
    }
    objects
        .reference_grants
        .range((to_ns.to_string(), String::new())..)
        .take_while(|((ns, _), _)| ns == to_ns)
        .any(|(_, g)| {
            g.spec
                .from
                .iter()
                .any(|f| f.group == from_group && f.kind == from_kind && f.namespace == from_ns)
                && g.spec.to.iter().any(|t| {
                    t.group.is_empty()
                        && t.kind == to_kind
                        && t.name.as_deref().is_none_or(|n| n == to_name)
                })
        })
}
