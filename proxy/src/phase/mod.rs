//! The request path, one module per phase (docs/architecture.md, "The request path"):
//! `request` (set-up, framing, redirect, tenant, class, limits), `edge` (maintenance,
//! login limits, secure cookies, WebSockets entering maintenance), `body` (the body
//! received whole), `attempt` (the backend of each attempt, retries), `upstream` (the
//! request as the worker gets it), `response` (cache, compression, read-ahead,
//! logging), `filestore` (files a worker hands over, sent by portier), `answer` (every
//! response portier writes itself). Per-request data is in
//! `ctx`. A step takes the narrow handles it needs, never the process state.

pub mod answer;
pub mod attempt;
pub mod body;
pub mod ctx;
pub mod edge;
pub mod filestore;
pub mod request;
pub mod response;
pub mod upstream;
