//! The unit tests of the task pipe that vendor patch 21 adds to pingora-proxy (a vendored
//! crate is not a workspace member, so `cargo test` would not run its tests): the module
//! is compiled here as it is, with its own `#[cfg(test)]` tests.

#[allow(dead_code)]
#[path = "../../vendor/pingora-proxy/src/pipe.rs"]
mod pipe;
