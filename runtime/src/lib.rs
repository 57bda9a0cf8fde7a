//! portier's runtime state: long-lived, keyed by stable identity, surviving reloads,
//! and free of pingora types (the proxy crate wires it to pingora). Each module owns
//! its state and its rules:
//!
//! - [`backend`]: backends by identity (`pool`, `role`, address), their in-flight
//!   counts, health and breaker; [`breaker`]: the circuit breaker and health state
//!   machines; [`health`]: the active checks; [`hash`]: the rendezvous hashes;
//!   [`balance`]: picking a backend (spread, affinity, least in flight).
//! - [`admission`]: worker slots and the fair priority queue of each pool.
//! - [`limits`]: tenant rate and concurrency limits, login limits; [`cluster`]: the
//!   same rates shared across replicas through Redis.
//! - [`telemetry`]: the Prometheus metrics; [`access_log`]: the JSON access log;
//!   [`live`]: each tenant's figures over the last minute (`/status/tenants`).
//!
//! The layers above (docs/architecture.md): the configuration model below this crate,
//! the proxy's request phases and operations above it. Nothing here may depend on them.

pub mod access_log;
pub mod admission;
pub mod backend;
pub mod balance;
pub mod breaker;
pub mod cluster;
pub mod hash;
pub mod health;
pub mod limits;
pub mod live;
pub mod telemetry;
