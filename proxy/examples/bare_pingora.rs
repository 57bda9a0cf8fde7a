//! The floor: a pingora proxy that only picks an upstream (no routing, headers,
//! limits or logs), to measure how much of portier's per-request cost is pingora's.
//! `cargo run --release -p portier --example bare_pingora -- 127.0.0.1:18080 127.0.0.1:18069 127.0.0.1:18070`
//! (current-thread runtime, no L4 read buffer: like portier's default build; the system
//! allocator, where portier's default is mimalloc since 5cfa767, so that this floor's
//! figures stay comparable with the earlier ones)

use async_trait::async_trait;
use pingora::prelude::*;
use std::sync::atomic::{AtomicUsize, Ordering};

struct Bare {
    upstreams: Vec<String>,
    rr: AtomicUsize,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();
    fn new_ctx(&self) {}
    async fn upstream_peer(&self, _s: &mut Session, _c: &mut ()) -> Result<Box<HttpPeer>> {
        let i = self.rr.fetch_add(1, Ordering::Relaxed) % self.upstreams.len();
        Ok(Box::new(HttpPeer::new(
            self.upstreams[i].as_str(),
            false,
            String::new(),
        )))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let conf = pingora::server::configuration::ServerConf {
        threads: 1,
        // The same runtime, pool and listener settings as portier, so the difference
        // is portier's own work.
        work_stealing: false,
        upstream_keepalive_pool_size: 1024,
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut svc = http_proxy_service(
        &server.configuration,
        Bare {
            upstreams: args[1..].to_vec(),
            rr: AtomicUsize::new(0),
        },
    );
    svc.add_listener(
        pingora::listeners::ListenerConfig::tcp(args[0].clone()).l4_buffer(
            pingora::protocols::l4::stream::L4BufferSettings::new(0, 1460),
        ),
    );
    server.add_service(svc);
    server.run_forever();
}
