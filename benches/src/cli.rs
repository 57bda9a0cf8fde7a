//! The harness's command line: its global options and one subcommand per scenario.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::scale;

#[derive(Parser)]
#[command(
    name = "portier-bench",
    about = "Odoo-shaped load scenarios for portier and its peers"
)]
pub struct Cli {
    /// The portier binary [default: $PORTIER_BIN, then target/release/portier]
    #[arg(long, global = true)]
    pub portier: Option<PathBuf>,
    /// CPUs for portier (taskset list); the bench itself runs where it is started.
    #[arg(long, global = true, default_value = "1")]
    pub proxy_cpus: String,
    /// Write the results as JSON here (for `all`: a directory).
    #[arg(long, global = true)]
    pub out: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// portier side by side with nginx, HAProxy, Traefik, Caddy and the direct ceiling:
    /// HTTP/1.1, HTTP/2+TLS, new TLS handshakes, memory per held longpoll and WebSocket.
    Compare {
        /// The shared peers harness.
        #[arg(long, default_value = "../shared/peers")]
        peers: PathBuf,
        /// Targets besides `direct` (portier is compared with each).
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "nginx,haproxy,traefik,caddy,portier"
        )]
        targets: Vec<String>,
        /// Seconds per throughput phase.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Rounds: every target once per round, in an order rotating between rounds.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// The latency phase's offered load, as a fraction of nginx's capacity this round.
        #[arg(long, default_value_t = 0.5)]
        load_fraction: f64,
        /// Held longpolling requests (conns.sh; at most 9000 here).
        #[arg(long, default_value_t = 5000)]
        held: usize,
        /// Open WebSockets.
        #[arg(long, default_value_t = 1000)]
        websockets: usize,
        /// Concurrent new-handshake clients.
        #[arg(long, default_value_t = 32)]
        handshake_conns: usize,
    },
    /// Tenant A floods /jsonrpc at 10x its limit while tenant B browses.
    NoisyNeighbour {
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// B's interactive requests per second.
        #[arg(long, default_value_t = 100.0)]
        b_rate: f64,
        /// A's integration limit, requests per second (A sends 10x this).
        #[arg(long, default_value_t = 20)]
        a_limit: u32,
        #[arg(long, default_value_t = 2)]
        a_concurrency: u32,
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// Requests each simulated worker works on at once.
        #[arg(long, default_value_t = 3)]
        capacity: usize,
    },
    /// Worker protection: tenant A's import would take every Odoo worker while tenant
    /// B browses; B's latency and A's throughput without and with worker slots.
    Saturation {
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// B's interactive requests per second.
        #[arg(long, default_value_t = 20.0)]
        b_rate: f64,
        /// A's import: calls in flight at once.
        #[arg(long, default_value_t = 16)]
        a_parallel: usize,
        /// Time each of A's calls takes at the worker, ms.
        #[arg(long, default_value_t = 200)]
        a_call_ms: u64,
        /// How much each of A's calls varies around a_call_ms (uniformly, ±), ms.
        #[arg(long, default_value_t = 0)]
        a_jitter_ms: u64,
        #[arg(long, default_value_t = 2)]
        pods: usize,
        /// Odoo workers per pod (the pool's `workers` in the last phase).
        #[arg(long, default_value_t = 4)]
        workers_per_pod: usize,
    },
    /// Slow clients download large reports while clicks go on: worker-seconds per
    /// download and interactive latency with response buffering on and off.
    SlowClients {
        #[arg(long, default_value_t = 200)]
        clients: usize,
        /// Bytes per download.
        #[arg(long, default_value_t = 5 << 20)]
        size: usize,
        /// Each client's reading speed, bytes per second.
        #[arg(long, default_value_t = 256 << 10)]
        rate: usize,
        /// The longest a phase may last, seconds.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Interactive requests per second meanwhile.
        #[arg(long, default_value_t = 20.0)]
        b_rate: f64,
        /// The shared peers harness (nginx runs beside portier when installed).
        #[arg(long, default_value = "../shared/peers")]
        peers: PathBuf,
    },
    /// Attachments downloaded slowly while clicks go on, through 4 Odoo workers: the
    /// worker streams, response buffering, the filestore offload, and nginx's internal
    /// location: worker-seconds per download, click latency, proxy CPU and memory.
    Downloads {
        #[arg(long, default_value_t = 200)]
        clients: usize,
        #[arg(long, default_value_t = 5 << 20)]
        min_size: usize,
        #[arg(long, default_value_t = 20 << 20)]
        max_size: usize,
        /// Distinct attachments in the filestore.
        #[arg(long, default_value_t = 16)]
        files: usize,
        /// Each client's reading speed, bytes per second.
        #[arg(long, default_value_t = 1 << 20)]
        rate: usize,
        /// The longest a phase may last, seconds.
        #[arg(long, default_value_t = 40)]
        seconds: u64,
        /// Clicks per second meanwhile.
        #[arg(long, default_value_t = 20.0)]
        b_rate: f64,
        /// Leave nginx out even when it is installed.
        #[arg(long)]
        no_nginx: bool,
    },
    /// Faults injected one after another under load (worker killed, hung, resetting,
    /// dying after the request, dying mid-response): every request accounted for.
    Chaos {
        /// Requests per second (a fifth of them POSTs).
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        /// Seconds per fault.
        #[arg(long, default_value_t = 5)]
        phase: u64,
    },
    /// Slowloris and connection churn: a normal client's latency alone and beside 2 000
    /// trickling connections; RSS while 20 000 connections are opened and dropped.
    Exhaustion {
        #[arg(long, default_value_t = 2000)]
        tricklers: usize,
        #[arg(long, default_value_t = 20_000)]
        churn: usize,
    },
    /// Cluster mode: the cost of [cluster] on interactive requests, and a tenant
    /// flooding two replicas held to its rate with Redis up and after it stops.
    Cluster {
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// The flooding tenant's integration limit, requests per second.
        #[arg(long, default_value_t = 200)]
        limit: u32,
    },
    /// A login storm: browsers open an Odoo page and its four asset bundles; asset
    /// cache on/off and compression off: worker requests, page latency, bytes.
    LoginStorm {
        #[arg(long, default_value_t = 500)]
        browsers: usize,
        /// Seconds over which the browsers arrive.
        #[arg(long, default_value_t = 10.0)]
        spread: f64,
        /// Worker milliseconds per bundle.
        #[arg(long, default_value_t = 50)]
        asset_ms: u64,
    },
    /// 20 reloads of a 10 000-tenant config under load: reload time, latency, errors.
    Reload {
        #[arg(long, default_value_t = 10_000)]
        tenants: usize,
        #[arg(long, default_value_t = 20)]
        reloads: usize,
        #[arg(long, default_value_t = 2000.0)]
        rate: f64,
    },
    /// Kubernetes objects as configuration (against the API server stand-in): start to
    /// serving N routes, memory against TOML, endpoint change to traffic, requests at rest.
    Kubernetes {
        #[arg(long, default_value_t = 10_000)]
        routes: usize,
        #[arg(long, default_value_t = 200)]
        changes: usize,
    },
    /// How cost grows: memory and reload time with N tenants, memory per WebSocket
    /// with N open, requests/s with few and many tenants active.
    Scale(scale::Args),
    /// A worker dies and comes back under load: errors and latency.
    Failure {
        #[arg(long, default_value_t = 2000.0)]
        rate: f64,
    },
    /// Load against a running server: closed or open loop, HTTP/1.1 or HTTP/2 over
    /// TLS, with a progress line, a table and (with --out) JSON at the end.
    Load {
        /// HOST:PORT to connect to.
        #[arg(long)]
        addr: std::net::SocketAddr,
        /// Host header (and TLS server name).
        #[arg(long, default_value = "a.test")]
        host: String,
        #[arg(long, default_value = "/")]
        path: String,
        /// `closed` (fixed connections, back to back) or `open` (fixed arrival rate).
        #[arg(long, default_value = "closed")]
        mode: String,
        #[arg(long, default_value_t = 64)]
        conns: usize,
        /// Requests per second (open loop).
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// HTTP/2 over TLS (ALPN h2; closed loop) instead of HTTP/1.1.
        #[arg(long)]
        h2: bool,
        /// Streams per HTTP/2 connection.
        #[arg(long, default_value_t = 10)]
        streams: usize,
        /// Report this process's CPU seconds and peak RSS (e.g. the proxy's PID).
        #[arg(long)]
        pid: Option<u32>,
    },
    /// Every scenario, one after the other; JSON files go to --out (a directory).
    All {
        #[arg(long, default_value = "../shared/peers")]
        peers: PathBuf,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
}
