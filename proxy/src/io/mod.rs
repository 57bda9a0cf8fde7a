//! Building blocks of the request path that work on the bytes and know nothing of a
//! request's phases: the headers portier forwards and owns (`forward`), bodies and
//! responses buffered in memory or spool files (`spool`), response compression
//! (`compress`), the per-tenant cache of asset answers (`assets`) and the files a worker
//! hands over to be sent from its filestore (`filestore`).

pub mod assets;
pub mod compress;
pub mod filestore;
pub mod forward;
pub mod spool;
