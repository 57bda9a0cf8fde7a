//! The status portier wants each object to have, as the Gateway API spells it. The
//! writer adds `lastTransitionTime` (kept from the object while a condition's status
//! does not change) and writes only what differs.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{json, Value};

use crate::gateway::ObjectRef;
use crate::objects::Key;

pub const GATEWAY_CONTROLLER: &str = "portier.dev/gateway-controller";
pub const INGRESS_CONTROLLER: &str = "portier.dev/ingress-controller";

/// One condition, without its transition time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Cond {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub status: &'static str,
    pub reason: String,
    pub message: String,
    #[serde(rename = "observedGeneration", skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

impl Cond {
    pub fn new(kind: &'static str, ok: bool, reason: &str, message: impl Into<String>) -> Cond {
        Cond {
            kind,
            status: if ok { "True" } else { "False" },
            reason: reason.to_string(),
            message: message.into(),
            observed_generation: None,
        }
    }

    pub fn at(mut self, generation: Option<i64>) -> Cond {
        self.observed_generation = generation;
        self
    }
}

/// A route's status towards one of portier's Gateways.
#[derive(Clone, Debug, PartialEq)]
pub struct ParentStatus {
    pub parent: ObjectRef,
    pub conditions: Vec<Cond>,
}

/// What portier wants written, by object.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Status {
    pub gateway_classes: BTreeMap<String, Value>,
    pub gateways: BTreeMap<Key, Value>,
    /// HTTPRoute: its parents' statuses.
    pub routes: BTreeMap<Key, Vec<ParentStatus>>,
    pub ingresses: BTreeMap<Key, Value>,
}

impl Status {
    /// An HTTPRoute's `status` object.
    pub fn route_status(parents: &[ParentStatus]) -> Value {
        json!({
            "parents": parents.iter().map(|p| json!({
                "parentRef": p.parent,
                "controllerName": GATEWAY_CONTROLLER,
                "conditions": p.conditions,
            })).collect::<Vec<_>>()
        })
    }

    /// A route's conditions of one type, across its parents (tests, `/status`).
    pub fn route_condition(&self, key: &Key, kind: &str) -> Vec<&Cond> {
        self.routes
            .get(key)
            .into_iter()
            .flatten()
            .flat_map(|p| p.conditions.iter().filter(|c| c.kind == kind))
            .collect()
    }
}

/// `addresses` of a Gateway / `loadBalancer.ingress` of an Ingress: an IP or a name.
pub fn address(status_address: &str) -> Option<(bool, &str)> {
    if status_address.is_empty() {
        return None;
    }
    Some((
        status_address.parse::<std::net::IpAddr>().is_ok(),
        status_address,
    ))
}
