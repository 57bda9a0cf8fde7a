//! portier's Kubernetes front end: Gateway API and Ingress objects in, the same
//! configuration model the TOML file produces out (`portier_config::Config`).
//!
//! - [`objects`]: the objects seen, by kind and key ([`gateway`]: the Gateway API
//!   types portier reads).
//! - [`translate`]: objects -> pools, tenants, certificates, endpoints, and the status
//!   each object should have. Pure: `check --objects` runs it on files.
//! - [`yaml`]: YAML files with the line and column of every node, for `check --objects`.

pub mod gateway;
pub mod objects;
pub mod provider;
pub mod translate;
pub mod writer;
pub mod yaml;

pub use objects::{Kind, ObjRef, Objects};
pub use translate::{mark_conflicts, merge, translate, Conflicts, Problem, Translation};
