//! The status writer: only the replica holding the Lease writes, only what changed.
//! The Lease (`coordination.k8s.io/v1`, 15 s, renewed every 5 s) is taken with the
//! API server's optimistic concurrency: a write with a stale `resourceVersion` fails,
//! so two replicas never both believe they hold it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use portier_config::Kubernetes;
use serde_json::{json, Value};

use crate::gateway::{Gateway, GatewayClass, HttpRoute};
use crate::objects::{Key, Kind};
use crate::provider::State;
use crate::translate::Status;
use k8s_openapi::api::networking::v1::Ingress;

pub const LEASE_SECONDS: i32 = 15;
const RENEW: Duration = Duration::from_secs(5);
/// How often a replica that does not hold the lease looks at it: a dead holder's lease
/// expires at most 15 s after its death, and is taken at most 2 s later.
const FOLLOW: Duration = Duration::from_secs(2);

/// This replica's identity: `$POD_NAME`, else the host name.
pub fn identity() -> String {
    std::env::var("POD_NAME")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "portier".into())
}

/// Holds (or waits for) the Lease and writes status while holding it: when the
/// status to write or the objects change, when the lease is taken, and again a second
/// after a write failed. Nothing at rest but the lease renewals.
pub async fn run(client: Client, k: Kubernetes, state: Arc<State>) {
    if !k.status {
        return;
    }
    let me = identity();
    let leases: Api<Lease> = Api::namespaced(client.clone(), &k.lease.0);
    let mut written: Written = HashMap::new();
    let mut held_until: Option<tokio::time::Instant> = None;
    let mut next_renew = tokio::time::Instant::now();
    let mut due = false;
    loop {
        let now = tokio::time::Instant::now();
        if now >= next_renew {
            next_renew = now + RENEW;
            match take_lease(&leases, &k.lease.1, &me).await {
                Ok(true) => {
                    if held_until.is_none() {
                        tracing::info!(lease = %format!("{}/{}", k.lease.0, k.lease.1), identity = %me, "holding the status lease: this replica writes status");
                        due = true;
                    }
                    held_until = Some(now + Duration::from_secs(LEASE_SECONDS as u64));
                }
                Ok(false) => {
                    next_renew = now + FOLLOW;
                    if held_until.take().is_some() {
                        tracing::info!("another replica holds the status lease");
                    }
                    written.clear();
                }
                Err(e) => tracing::warn!(error = %e, "cannot renew the status lease"),
            }
        }
        let holding = held_until.is_some_and(|t| t > now);
        if holding && due {
            due = !write_all(&client, &state, &mut written).await;
        }
        let wake = if due {
            now + Duration::from_secs(1)
        } else {
            next_renew
        };
        tokio::select! {
            _ = state.status_changed.notified() => due = true,
            _ = tokio::time::sleep_until(wake.min(next_renew)) => {}
        }
    }
}

/// What this replica wrote, by object: a digest of the status and the object's
/// resource version when it was written.
type Written = HashMap<(Kind, Key), (u64, String)>;

/// Takes or renews the Lease; false when another replica holds it.
async fn take_lease(leases: &Api<Lease>, name: &str, me: &str) -> Result<bool, kube::Error> {
    let now = Timestamp::now();
    let spec = |acquire: Option<MicroTime>, transitions: i32| LeaseSpec {
        holder_identity: Some(me.to_string()),
        lease_duration_seconds: Some(LEASE_SECONDS),
        acquire_time: acquire.or(Some(MicroTime(now))),
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(transitions),
        ..Default::default()
    };
    let Some(mut lease) = leases.get_opt(name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                ..Default::default()
            },
            spec: Some(spec(None, 0)),
        };
        return match leases.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    let cur = lease.spec.clone().unwrap_or_default();
    let holder = cur.holder_identity.clone().unwrap_or_default();
    let expired = cur.renew_time.as_ref().is_none_or(|t| {
        let secs = i64::from(cur.lease_duration_seconds.unwrap_or(LEASE_SECONDS));
        t.0.as_second() + secs < now.as_second()
    });
    if holder != me && !holder.is_empty() && !expired {
        return Ok(false);
    }
    let transitions = cur.lease_transitions.unwrap_or(0) + i32::from(holder != me);
    let acquire = if holder == me { cur.acquire_time } else { None };
    lease.spec = Some(spec(acquire, transitions));
    // `replace` sends the resourceVersion read: a concurrent taker gets 409.
    match leases.replace(name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// A status without transition times (what is compared).
fn bare(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| k.as_str() != "lastTransitionTime")
                .map(|(k, v)| (k.clone(), bare(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(bare).collect()),
        other => other.clone(),
    }
}

/// `desired` with each condition's `lastTransitionTime`: the current one's while its
/// status is the same, else now.
fn with_times(desired: &Value, current: Option<&Value>, now: &str) -> Value {
    match desired {
        Value::Object(m) => {
            let mut out = serde_json::Map::new();
            for (k, v) in m {
                out.insert(
                    k.clone(),
                    with_times(v, current.and_then(|c| c.get(k)), now),
                );
            }
            Value::Object(out)
        }
        Value::Array(a) => Value::Array(
            a.iter()
                .enumerate()
                .map(|(i, v)| {
                    if v.get("type").is_some() && v.get("status").is_some() {
                        let cur = current
                            .and_then(|c| c.as_array())
                            .and_then(|cs| cs.iter().find(|c| c.get("type") == v.get("type")));
                        let mut c = v.clone();
                        let time = cur
                            .filter(|c| c.get("status") == v.get("status"))
                            .and_then(|c| c.get("lastTransitionTime").cloned())
                            .unwrap_or_else(|| json!(now));
                        c["lastTransitionTime"] = time;
                        c
                    } else {
                        with_times(v, current.and_then(|c| c.get(i)), now)
                    }
                })
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Writes every status that differs from the object's; false when a write failed.
async fn write_all(client: &Client, state: &State, written: &mut Written) -> bool {
    let status: Arc<Status> = state
        .status
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let objects = state.objects();
    let now = Timestamp::now().to_string();
    let mut todo: Vec<(Kind, Key, Value, Option<Value>, String)> = Vec::new();
    let mut consider =
        |kind: Kind, key: &Key, want: Value, cur: Option<Value>, meta: &ObjectMeta| {
            if cur.as_ref().is_some_and(|c| same(c, &want)) {
                return;
            }
            // Written already and the object not changed since: the watch has not caught up.
            if written
                .get(&(kind, key.clone()))
                .is_some_and(|(d, v)| *d == digest(&want) && *v == rv(meta))
            {
                return;
            }
            todo.push((kind, key.clone(), want, cur, rv(meta)));
        };
    for (name, want) in &status.gateway_classes {
        let key = (String::new(), name.clone());
        if let Some(o) = objects.gateway_classes.get(&key) {
            consider(
                Kind::GatewayClass,
                &key,
                want.clone(),
                parsed(o.status.as_deref()),
                &o.metadata,
            );
        }
    }
    for (key, want) in &status.gateways {
        if let Some(o) = objects.gateways.get(key) {
            consider(
                Kind::Gateway,
                key,
                want.clone(),
                parsed(o.status.as_deref()),
                &o.metadata,
            );
        }
    }
    for (key, parents) in &status.routes {
        if let Some(o) = objects.http_routes.get(key) {
            consider(
                Kind::HttpRoute,
                key,
                Status::route_status(parents),
                parsed(o.status.as_deref()),
                &o.metadata,
            );
        }
    }
    for (key, want) in &status.ingresses {
        if let Some(o) = objects.ingresses.get(key) {
            let cur = o.status.as_ref().and_then(|s| serde_json::to_value(s).ok());
            consider(Kind::Ingress, key, want.clone(), cur, &o.metadata);
        }
    }
    let mut ok = true;
    for (kind, key, want, cur, version) in todo {
        let body = json!({ "status": with_times(&want, cur.as_ref(), &now) });
        match patch(client, kind, &key, body).await {
            Ok(()) => {
                written.insert((kind, key), (digest(&want), version));
            }
            Err(e) => {
                ok = false;
                tracing::warn!(object = %format!("{} {}/{}", kind.name(), key.0, key.1), error = %e, "cannot write status")
            }
        }
    }
    ok
}

/// A status kept as JSON text, parsed.
fn parsed(text: Option<&str>) -> Option<Value> {
    text.and_then(|t| serde_json::from_str(t).ok())
}

/// Two statuses are the same but for their conditions' transition times.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys = |m: &serde_json::Map<String, Value>| {
                m.iter()
                    .filter(|(k, _)| k.as_str() != "lastTransitionTime")
                    .count()
            };
            keys(x) == keys(y)
                && x.iter()
                    .filter(|(k, _)| k.as_str() != "lastTransitionTime")
                    .all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(v, w)| same(v, w))
        }
        _ => a == b,
    }
}

fn digest(v: &Value) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bare(v).to_string().hash(&mut h);
    h.finish()
}

fn rv(m: &ObjectMeta) -> String {
    m.resource_version.clone().unwrap_or_default()
}

async fn patch(client: &Client, kind: Kind, key: &Key, body: Value) -> Result<(), kube::Error> {
    let pp = PatchParams::default();
    let p = Patch::Merge(&body);
    match kind {
        Kind::GatewayClass => Api::<GatewayClass>::all(client.clone())
            .patch_status(&key.1, &pp, &p)
            .await
            .map(drop),
        Kind::Gateway => Api::<Gateway>::namespaced(client.clone(), &key.0)
            .patch_status(&key.1, &pp, &p)
            .await
            .map(drop),
        Kind::HttpRoute => Api::<HttpRoute>::namespaced(client.clone(), &key.0)
            .patch_status(&key.1, &pp, &p)
            .await
            .map(drop),
        Kind::Ingress => Api::<Ingress>::namespaced(client.clone(), &key.0)
            .patch_status(&key.1, &pp, &p)
            .await
            .map(drop),
        _ => Ok(()),
    }
}
