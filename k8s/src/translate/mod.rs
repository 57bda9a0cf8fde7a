//! Objects in, the configuration model out: each accepted HTTPRoute or Ingress is a
//! tenant, each Service port it names a pool, each referenced `kubernetes.io/tls`
//! Secret a certificate; with the status every object should have. Pure: the same
//! objects give the same result, with or without an API server (`check --objects`).

mod backend;
mod gateway;
mod ingress;
mod rules;
pub mod status;

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use portier_config::{Config, HostPattern, Kubernetes, Pool, Route, Settings, Tenant};

pub use backend::{endpoints, Endpoints, PortRef};
use backend::{BackendError, Backends};
pub use status::{Cond, ParentStatus, Status};

use crate::objects::{Kind, ObjRef, Objects};

/// The prefix of portier's annotations.
pub const ANNOTATION_PREFIX: &str = "portier.dev/";

/// A problem with one object: it is not served (or not all of it), and says why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub object: ObjRef,
    /// Where in the object, as a JSON pointer (`/spec/rules/0/matches/0/headers`);
    /// empty: the object itself.
    pub field: String,
    pub message: String,
}

/// Certificate and key of a `kubernetes.io/tls` Secret, as PEM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretPair {
    /// `NAMESPACE/NAME`.
    pub name: String,
    pub crt: Vec<u8>,
    pub key: Vec<u8>,
}

/// What the objects describe.
#[derive(Clone, Debug, Default)]
pub struct Translation {
    pub pools: Vec<Pool>,
    pub tenants: Vec<Tenant>,
    /// The object each tenant comes from (parallel to `tenants`).
    pub sources: Vec<ObjRef>,
    /// The members of each pool, by pool name.
    pub endpoints: BTreeMap<String, Endpoints>,
    /// The Service and port each pool comes from (to follow endpoints alone).
    pub services: BTreeMap<String, (String, String, i32)>,
    pub certs: Vec<SecretPair>,
    pub problems: Vec<Problem>,
    /// What does not keep anything from being served yet (a certificate Secret that
    /// cert-manager has not written): `check --objects` prints them and still passes.
    pub warnings: Vec<Problem>,
    pub status: Status,
    /// Objects read (those in the watched namespaces).
    pub objects: usize,
    /// A digest of the objects' versions.
    pub version: String,
}

/// A tenant being built from a route: hosts, the pool of `/`, the other paths.
pub(crate) struct Draft {
    pub source: ObjRef,
    /// The object's `portier.dev/` annotations.
    pub values: Vec<(String, String)>,
    pub hosts: Vec<String>,
    pub pool: Option<usize>,
    pub routes: Vec<(String, bool, usize)>,
}

impl Draft {
    /// A path of a rule sent to `pool`: `/` as a prefix is the tenant's pool, any other
    /// a route (a trailing `/` ignored); the first rule naming a path keeps it.
    pub fn add_path(&mut self, path: String, exact: bool, pool: usize) {
        let path = if path.len() > 1 {
            path.trim_end_matches('/').to_string()
        } else {
            path
        };
        if path == "/" && !exact {
            self.pool.get_or_insert(pool);
        } else if !self
            .routes
            .iter()
            .any(|(p, e, _)| *p == path && *e == exact)
        {
            self.routes.push((path, exact, pool));
        }
    }
}

/// The `portier.dev/KEY` annotations of an object, as (KEY, VALUE), sorted.
pub fn annotations(meta: &ObjectMeta) -> Vec<(String, String)> {
    meta.annotations
        .iter()
        .flatten()
        .filter_map(|(k, v)| {
            k.strip_prefix(ANNOTATION_PREFIX)
                .map(|key| (key.to_string(), v.clone()))
        })
        .collect()
}

/// Translates `objects` under `[kubernetes]` `k`, with the file's `defaults` and
/// whether the file redirects HTTP to HTTPS.
pub fn translate(
    objects: &Objects,
    k: &Kubernetes,
    defaults: &Arc<Settings>,
    redirect_http: bool,
) -> Translation {
    let watched = |ns: &str| k.namespaces.is_empty() || k.namespaces.iter().any(|n| n == ns);
    let mut t = Translation {
        objects: objects.len(),
        version: objects_version(objects),
        ..Default::default()
    };
    let mut backends = Backends::new(objects);
    let mut drafts = Vec::new();
    gateway::translate(
        objects,
        k,
        &watched,
        redirect_http,
        &mut backends,
        &mut drafts,
        &mut t,
    );
    ingress::translate(objects, k, &watched, &mut backends, &mut drafts, &mut t);
    for d in drafts {
        if let Some(tenant) = tenant_of(&d, defaults, &mut t) {
            t.tenants.push(tenant);
            t.sources.push(d.source);
        }
    }
    t.pools = backends.pools;
    t.endpoints = backends.endpoints;
    t.services = backends.services;
    t
}

/// The tenant of a draft, or the problems that keep it from being one.
fn tenant_of(d: &Draft, defaults: &Arc<Settings>, t: &mut Translation) -> Option<Tenant> {
    let problem = |field: &str, message: String| Problem {
        object: d.source.clone(),
        field: field.to_string(),
        message,
    };
    let mut values = d.values.clone();
    let take = |values: &mut Vec<(String, String)>, key: &str| {
        values
            .iter()
            .position(|(k, _)| k == key)
            .map(|i| values.remove(i).1)
    };
    let name = take(&mut values, "tenant")
        .unwrap_or_else(|| format!("{}/{}", d.source.namespace, d.source.name));
    let database = take(&mut values, "database");
    let pairs: Vec<(&str, &str)> = values
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let mut bad = Vec::new();
    if let Some(db) = &database {
        let ok = !db.is_empty()
            && db
                .replace("{tenant}", "x")
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !ok {
            bad.push(problem(
                "/metadata/annotations/portier.dev~1database",
                format!("annotation portier.dev/database: \"{db}\" may only use letters, digits, '-', '_', '.' and {{tenant}}"),
            ));
        }
    }
    let values = match portier_config::tenant_from_values(defaults, &pairs) {
        Ok(v) => Some(v),
        Err(errors) => {
            for e in errors {
                bad.push(problem(
                    &format!("/metadata/annotations/portier.dev~1{}", e.key),
                    format!("annotation portier.dev/{}: {}", e.key, e.message),
                ));
            }
            None
        }
    };
    let hosts = host_patterns(&d.hosts, |h, e| {
        bad.push(problem("/spec", format!("hostname \"{h}\": {e}")))
    });
    let Some(pool) = d.pool else {
        bad.push(problem(
            "/spec",
            "no rule matches `/`: a route needs one (its tenant's pool); give a rule without path matches or with PathPrefix `/`".into(),
        ));
        return reject(t, &d.source, bad);
    };
    if !bad.is_empty() || hosts.is_empty() {
        return reject(t, &d.source, bad);
    }
    let values = values?;
    let mut routes: Vec<Route> = d
        .routes
        .iter()
        .map(|(path, exact, pool)| Route {
            path: path.clone(),
            exact: *exact,
            pool: *pool,
        })
        .collect();
    routes.sort_by(Route::precedence);
    Some(Tenant {
        name,
        hosts,
        pool,
        database,
        settings: values.settings,
        maintenance: values.maintenance,
        routes,
    })
}

/// Hostnames as host patterns (`*.example.com` is the template `{tenant}.example.com`),
/// each once; `bad` gets each one that is not a host name.
fn host_patterns(hosts: &[String], mut bad: impl FnMut(&str, String)) -> Vec<HostPattern> {
    let mut out = Vec::new();
    for h in hosts {
        let pattern = match h.strip_prefix("*.") {
            Some(rest) => format!("{{tenant}}.{rest}"),
            None => h.clone(),
        };
        match HostPattern::parse(&pattern) {
            Ok(p) if !out.contains(&p) => out.push(p),
            Ok(_) => {}
            Err(e) => bad(h, e.to_string()),
        }
    }
    out
}

/// Records the problems of a rejected tenant and marks its route not accepted.
fn reject(t: &mut Translation, source: &ObjRef, bad: Vec<Problem>) -> Option<Tenant> {
    if source.kind == Kind::HttpRoute {
        let message = bad
            .iter()
            .map(|p| p.message.as_str())
            .collect::<Vec<_>>()
            .join("; ");
        let key = (source.namespace.clone(), source.name.clone());
        for p in t.status.routes.get_mut(&key).into_iter().flatten() {
            p.conditions.retain(|c| c.kind != "Accepted");
            p.conditions.insert(
                0,
                Cond::new("Accepted", false, "UnsupportedValue", message.clone()),
            );
        }
    }
    t.problems.extend(bad);
    None
}

/// A backend error as a problem and a `ResolvedRefs` / `Accepted` condition.
pub(crate) fn backend_problem(e: &BackendError) -> (&'static str, &'static str, String) {
    match e {
        BackendError::NotFound(m) => ("ResolvedRefs", "BackendNotFound", m.clone()),
        BackendError::Invalid(m) => ("Accepted", "UnsupportedValue", m.clone()),
    }
}

/// The objects that lost hosts to the file (or an earlier object), with those hosts.
pub type Conflicts = Vec<(ObjRef, Vec<String>)>;

/// The file's configuration with the translation's pools and tenants added; a host
/// the file (or an earlier object) already claims stays the file's, and the object
/// gets a `Conflicted` condition and a problem.
pub fn merge(file: Config, mut t: Translation) -> (Config, Translation, Conflicts) {
    let tenants = std::mem::take(&mut t.tenants);
    let pools = t.pools.clone();
    let (config, conflicts) = file.merged(pools, tenants, &t.version);
    let conflicts: Conflicts = conflicts
        .into_iter()
        .filter_map(|(i, hosts)| t.sources.get(i).map(|s| (s.clone(), hosts)))
        .collect();
    mark_conflicts(&mut t, &conflicts);
    (config, t, conflicts)
}

/// Records `conflicts` in the translation: a `Conflicted` condition and a problem each.
pub fn mark_conflicts(t: &mut Translation, conflicts: &Conflicts) {
    for (source, hosts) in conflicts {
        let message = format!(
            "host(s) {} already claimed by the configuration file or another object; served as that one says",
            hosts.join(", ")
        );
        let key = (source.namespace.clone(), source.name.clone());
        for p in t.status.routes.get_mut(&key).into_iter().flatten() {
            p.conditions.push(Cond::new(
                "Conflicted",
                true,
                "HostnameConflict",
                message.clone(),
            ));
        }
        t.problems.push(Problem {
            object: source.clone(),
            field: "/spec".into(),
            message,
        });
    }
}

impl Translation {
    /// Whether it serves exactly what `pools`, `tenants` and `certs` did (then only
    /// endpoints, if anything, changed).
    pub fn serves_as(&self, pools: &[Pool], tenants: &[Tenant], certs: &[SecretPair]) -> bool {
        self.pools == pools && self.tenants == tenants && self.certs == certs
    }
}

/// A digest of the objects' versions (EndpointSlices aside: their changes are not
/// configuration): the second half of the running configuration's version.
fn objects_version(objects: &Objects) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    fn each<K: kube::Resource>(h: &mut impl Hasher, m: &BTreeMap<crate::objects::Key, Arc<K>>) {
        for (k, o) in m {
            k.hash(h);
            o.meta().resource_version.hash(h);
        }
    }
    each(&mut h, &objects.gateway_classes);
    each(&mut h, &objects.gateways);
    each(&mut h, &objects.http_routes);
    each(&mut h, &objects.reference_grants);
    each(&mut h, &objects.ingresses);
    each(&mut h, &objects.ingress_classes);
    each(&mut h, &objects.services);
    each(&mut h, &objects.secrets);
    each(&mut h, &objects.namespaces);
    format!("{:016x}", h.finish())
}

#[cfg(test)]
mod tests;
