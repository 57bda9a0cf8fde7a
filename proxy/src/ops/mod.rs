//! Running the process around the request path: start-up, listeners, drain and exit
//! (`server`, `conns`), the control plane (`control`: admin API, signals, file
//! watching through `watch`, reloads through `reload`), background tasks that follow
//! reloads (`discover`, `supervise`), certificates (`tls`), `check`, the demo and the
//! allocator (`memory`). These see the whole process state.

pub mod check;
pub mod conns;
pub mod control;
pub mod dashboard;
pub mod demo;
pub mod discover;
pub mod kubernetes;
pub mod memory;
pub mod reload;
pub mod server;
pub mod supervise;
pub mod tenants;
pub mod tls;
pub mod watch;
