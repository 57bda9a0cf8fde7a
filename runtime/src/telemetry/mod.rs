//! Prometheus metrics (the contract's names); the JSON access log is `access_log.rs`.
//!
//! The hot path touches only pre-resolved handles: a tenant's per-class histogram and
//! per-status counters are looked up once (first request of that tenant) and then
//! updated with atomic operations.

use std::sync::{Arc, OnceLock};

use dashmap::DashMap;
use portier_config::Class;
use prometheus::{
    GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

/// Tenants beyond this many distinct names are reported as `_other`.
pub const TENANT_LABEL_LIMIT: usize = 1000;

/// Status codes with a pre-resolved counter per tenant and class.
mod labels;

pub use labels::{Direction, Refusal, Retry};

const COMMON_CODES: [u16; 28] = [
    101, 200, 201, 204, 206, 301, 302, 303, 304, 307, 308, 400, 401, 403, 404, 405, 408, 409, 413,
    414, 429, 431, 499, 500, 501, 502, 503, 504,
];

fn code_index(code: u16) -> Option<usize> {
    COMMON_CODES.iter().position(|&c| c == code)
}

pub struct Metrics {
    pub registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    rate_limited: IntCounterVec,
    pub backend_up: IntGaugeVec,
    pub breaker_open: IntGaugeVec,
    pub upstream_inflight: IntGaugeVec,
    pub connections_open: IntGaugeVec,
    pub config_reloads: IntCounterVec,
    pub cert_expiry: GaugeVec,
    upstream_retries: IntCounterVec,
    queue_depth: IntGaugeVec,
    queue_wait: HistogramVec,
    queue_refused: IntCounterVec,
    backend_busy: IntGaugeVec,
    spooled: IntCounterVec,
    login_limited: IntCounterVec,
    /// `portier_connections_refused_total{reason}`: max_connections, per_ip, header_timeout.
    pub refused_max_connections: IntCounter,
    pub refused_per_ip: IntCounter,
    pub refused_header_timeout: IntCounter,
    pub cache_hits: IntCounter,
    pub cache_misses: IntCounter,
    pub access_log_dropped: IntCounter,
    /// `portier_acme_orders_total{result}`: ok, error.
    pub acme_orders: IntCounterVec,
    /// `portier_cluster_redis_up`: registered when a `[cluster]` is first configured.
    pub cluster_up: IntGauge,
    /// `portier_kubernetes_connected` (r3): registered when `[kubernetes]` is configured.
    pub kubernetes_connected: IntGauge,
    /// `portier_filestore_requests_total{result}`, `portier_filestore_bytes_total`.
    pub filestore: FilestoreMetrics,
    tenants: DashMap<String, Arc<TenantStats>>,
    other: OnceLock<Arc<TenantStats>>,
}

/// Metric handles of one tenant label.
pub struct TenantStats {
    pub label: String,
    classes: [OnceLock<ClassStats>; 4],
    requests: IntCounterVec,
    duration: HistogramVec,
    rate_limited: IntCounterVec,
}

struct ClassStats {
    duration: Histogram,
    rate_limited: IntCounter,
    codes: [OnceLock<IntCounter>; COMMON_CODES.len()],
}

impl TenantStats {
    fn class(&self, class: Class) -> &ClassStats {
        self.classes[class.index()].get_or_init(|| {
            let labels = [self.label.as_str(), class.as_str()];
            ClassStats {
                duration: self.duration.with_label_values(&labels),
                rate_limited: self.rate_limited.with_label_values(&labels),
                codes: Default::default(),
            }
        })
    }

    /// Records one finished request.
    pub fn observe(&self, class: Class, code: u16, seconds: f64) {
        let cs = self.class(class);
        cs.duration.observe(seconds);
        match code_index(code) {
            Some(i) => cs.codes[i]
                .get_or_init(|| {
                    self.requests.with_label_values(&[
                        self.label.as_str(),
                        class.as_str(),
                        &code.to_string(),
                    ])
                })
                .inc(),
            None => self
                .requests
                .with_label_values(&[self.label.as_str(), class.as_str(), &code.to_string()])
                .inc(),
        }
    }

    pub fn rate_limited(&self, class: Class) {
        self.class(class).rate_limited.inc();
    }
}

/// Metric handles of one backend.
pub struct BackendStats {
    pub up: IntGauge,
    pub breaker_open: IntGauge,
    pub inflight: IntGauge,
    /// Worker slots taken (pools with `workers`).
    pub busy: IntGauge,
}

/// Metric handles of one pool's worker queue, per class: interactive, static, integration.
/// The queue metric families (shared handles).
#[derive(Clone)]
pub struct QueueFamilies {
    depth: IntGaugeVec,
    wait: HistogramVec,
    refused: IntCounterVec,
}

impl QueueFamilies {
    /// One pool's queue series (created at 0 on the first call).
    pub fn handles(&self, pool: &str) -> QueueHandles {
        let names = ["interactive", "static", "integration"];
        QueueHandles {
            depth: names.map(|c| self.depth.with_label_values(&[pool, c])),
            wait: names.map(|c| self.wait.with_label_values(&[pool, c])),
            full: self.refused.with_label_values(&[pool, "queue_full"]),
            timeout: self.refused.with_label_values(&[pool, "queue_timeout"]),
        }
    }
}

pub struct QueueHandles {
    pub depth: [IntGauge; 3],
    pub wait: [Histogram; 3],
    pub full: IntCounter,
    pub timeout: IntCounter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        // Metric construction only fails on invalid names/labels, which are constants here.
        macro_rules! reg {
            ($m:expr) => {{
                let m = $m.expect("valid metric definition");
                registry
                    .register(Box::new(m.clone()))
                    .expect("metric registered once");
                m
            }};
        }
        let buckets = vec![
            0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
        ];
        let requests = reg!(IntCounterVec::new(
            Opts::new(
                "portier_requests_total",
                "Requests answered, by tenant, class and status code"
            ),
            &["tenant", "class", "code"]
        ));
        let duration = reg!(HistogramVec::new(
            HistogramOpts::new(
                "portier_request_duration_seconds",
                "Time from request start to the end of the response"
            )
            .buckets(buckets),
            &["tenant", "class"]
        ));
        let rate_limited = reg!(IntCounterVec::new(
            Opts::new(
                "portier_rate_limited_total",
                "Requests refused by a tenant limit (429)"
            ),
            &["tenant", "class"]
        ));
        let backend_up = reg!(IntGaugeVec::new(
            Opts::new(
                "portier_backend_up",
                "1 if the backend is up (health checks), else 0"
            ),
            &["pool", "backend"]
        ));
        let breaker_open = reg!(IntGaugeVec::new(
            Opts::new(
                "portier_breaker_open",
                "1 if the backend's circuit breaker is open or half-open"
            ),
            &["pool", "backend"]
        ));
        let upstream_inflight = reg!(IntGaugeVec::new(
            Opts::new(
                "portier_upstream_inflight",
                "Requests in flight at the backend"
            ),
            &["pool", "backend"]
        ));
        let connections_open = reg!(IntGaugeVec::new(
            Opts::new(
                "portier_connections_open",
                "Client connections open, by listener"
            ),
            &["listener"]
        ));
        let config_reloads = reg!(IntCounterVec::new(
            Opts::new(
                "portier_config_reloads_total",
                "Configuration reloads, by result"
            ),
            &["result"]
        ));
        let cert_expiry = reg!(GaugeVec::new(
            Opts::new(
                "portier_cert_expiry_seconds",
                "Seconds until the certificate expires"
            ),
            &["name"]
        ));
        let upstream_retries = reg!(IntCounterVec::new(
            Opts::new(
                "portier_upstream_retries_total",
                "Requests sent again to another backend, by pool and reason (connect, closed, status, timeout)"
            ),
            &["pool", "reason"]
        ));
        let queue_depth = reg!(IntGaugeVec::new(
            Opts::new(
                "portier_queue_depth",
                "Requests waiting for a worker slot, by pool and class"
            ),
            &["pool", "class"]
        ));
        let queue_wait = reg!(HistogramVec::new(
            HistogramOpts::new(
                "portier_queue_wait_seconds",
                "Time requests waited for a worker slot, by pool and class"
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0
            ]),
            &["pool", "class"]
        ));
        let queue_refused = reg!(IntCounterVec::new(
            Opts::new(
                "portier_queue_refused_total",
                "Requests refused for want of a worker slot, by pool and reason (queue_full, queue_timeout)"
            ),
            &["pool", "reason"]
        ));
        let backend_busy = reg!(IntGaugeVec::new(
            Opts::new(
                "portier_backend_busy",
                "Worker slots taken on the backend (pools with workers)"
            ),
            &["pool", "backend"]
        ));
        let spooled = reg!(IntCounterVec::new(
            Opts::new(
                "portier_spooled_bytes_total",
                "Bytes buffered in files under spool_dir, by direction (request, response)"
            ),
            &["direction"]
        ));
        for d in ["request", "response"] {
            spooled.with_label_values(&[d]);
        }
        let login_limited = reg!(IntCounterVec::new(
            Opts::new(
                "portier_login_limited_total",
                "Login attempts refused by the per-address login limit (429)"
            ),
            &["tenant"]
        ));
        let connections_refused = reg!(IntCounterVec::new(
            Opts::new(
                "portier_connections_refused_total",
                "Client connections closed by portier: over max_connections, over max_connections_per_ip, or a request header not complete within header_timeout"
            ),
            &["reason"]
        ));
        let refused_max_connections = connections_refused.with_label_values(&["max_connections"]);
        let refused_per_ip = connections_refused.with_label_values(&["per_ip"]);
        let refused_header_timeout = connections_refused.with_label_values(&["header_timeout"]);
        let filestore = FilestoreMetrics::new(&registry);
        let cache_requests = reg!(IntCounterVec::new(
            Opts::new(
                "portier_cache_requests_total",
                "Cacheable asset requests, answered from the cache (hit) or a worker (miss)"
            ),
            &["result"]
        ));
        let cache_hits = cache_requests.with_label_values(&["hit"]);
        let cache_misses = cache_requests.with_label_values(&["miss"]);
        let access_log_dropped = reg!(IntCounter::new(
            "portier_access_log_dropped_total",
            "Access-log lines dropped because stderr could not keep up"
        ));
        let acme_orders = reg!(IntCounterVec::new(
            Opts::new(
                "portier_acme_orders_total",
                "ACME certificate orders (new and renewals), by result: ok or error"
            ),
            &["result"]
        ));
        for r in ["ok", "error"] {
            acme_orders.with_label_values(&[r]);
        }
        let cluster_up = IntGauge::new(
            "portier_cluster_redis_up",
            "1 while the [cluster] Redis answers within its timeout (rate limits shared), 0 while replicas fall back to local limits",
        )
        .expect("valid metric definition");
        let kubernetes_connected = IntGauge::new(
            "portier_kubernetes_connected",
            "1 while every watch of the Kubernetes API server is up, 0 while portier serves the last objects it saw",
        )
        .expect("valid metric definition");
        for r in ["ok", "error"] {
            config_reloads.with_label_values(&[r]);
        }
        for l in ["http", "https"] {
            connections_open.with_label_values(&[l]);
        }
        Metrics {
            registry,
            requests,
            duration,
            rate_limited,
            backend_up,
            breaker_open,
            upstream_inflight,
            connections_open,
            config_reloads,
            cert_expiry,
            upstream_retries,
            queue_depth,
            queue_wait,
            queue_refused,
            backend_busy,
            spooled,
            login_limited,
            refused_max_connections,
            refused_per_ip,
            refused_header_timeout,
            cache_hits,
            cache_misses,
            access_log_dropped,
            acme_orders,
            cluster_up,
            kubernetes_connected,
            filestore,
            tenants: DashMap::new(),
            other: OnceLock::new(),
        }
    }

    /// Exposes `portier_cluster_redis_up` (from the first `[cluster]` on; once).
    pub fn register_cluster_up(&self) {
        let _ = self.registry.register(Box::new(self.cluster_up.clone()));
    }

    /// Exposes `portier_kubernetes_connected` (with `[kubernetes]`; once).
    pub fn register_kubernetes(&self) {
        let _ = self
            .registry
            .register(Box::new(self.kubernetes_connected.clone()));
    }

    /// Counts one login attempt refused for a tenant (its bounded label).
    pub fn login_limited(&self, stats: &TenantStats) {
        self.login_limited.with_label_values(&[&stats.label]).inc();
    }

    /// Counts one retry of a request of `pool`.
    pub fn retried(&self, pool: &str, reason: Retry) {
        self.upstream_retries
            .with_label_values(&[pool, reason.as_str()])
            .inc();
    }

    /// Counts bytes written to spool files.
    pub fn spooled(&self, direction: Direction, bytes: u64) {
        if bytes > 0 {
            let d = match direction {
                Direction::Request => "request",
                Direction::Response => "response",
            };
            self.spooled.with_label_values(&[d]).inc_by(bytes);
        }
    }

    /// The queue metrics of a pool (series created at 0).
    /// The queue metric families, from which a pool's series are made when needed.
    pub fn queue_families(&self) -> QueueFamilies {
        QueueFamilies {
            depth: self.queue_depth.clone(),
            wait: self.queue_wait.clone(),
            refused: self.queue_refused.clone(),
        }
    }

    /// Makes the retry series of a pool visible (at 0) before its first retry.
    pub fn declare_pool(&self, pool: &str) {
        for r in Retry::ALL {
            self.upstream_retries.with_label_values(&[pool, r.as_str()]);
        }
    }

    fn new_tenant_stats(&self, label: &str) -> Arc<TenantStats> {
        Arc::new(TenantStats {
            label: label.to_string(),
            classes: Default::default(),
            requests: self.requests.clone(),
            duration: self.duration.clone(),
            rate_limited: self.rate_limited.clone(),
        })
    }

    /// The handles for a tenant name; the first 1000 names get their own label.
    pub fn tenant_stats(&self, name: &str) -> Arc<TenantStats> {
        if let Some(s) = self.tenants.get(name) {
            return s.clone();
        }
        if self.tenants.len() >= TENANT_LABEL_LIMIT {
            return self
                .other
                .get_or_init(|| self.new_tenant_stats("_other"))
                .clone();
        }
        self.tenants
            .entry(name.to_string())
            .or_insert_with(|| self.new_tenant_stats(name))
            .clone()
    }

    pub fn backend_stats(&self, pool: &str, backend: &str) -> BackendStats {
        let labels = [pool, backend];
        let up = self.backend_up.with_label_values(&labels);
        up.set(1);
        let breaker_open = self.breaker_open.with_label_values(&labels);
        breaker_open.set(0);
        BackendStats {
            up,
            breaker_open,
            inflight: self.upstream_inflight.with_label_values(&labels),
            busy: self.backend_busy.with_label_values(&labels),
        }
    }

    pub fn remove_backend(&self, pool: &str, backend: &str) {
        let labels = [pool, backend];
        let _ = self.backend_up.remove_label_values(&labels);
        let _ = self.breaker_open.remove_label_values(&labels);
        let _ = self.upstream_inflight.remove_label_values(&labels);
        let _ = self.backend_busy.remove_label_values(&labels);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let families = self.registry.gather();
        let mut out = String::new();
        if let Err(e) = prometheus::TextEncoder::new().encode_utf8(&families, &mut out) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }
}

/// The filestore offload's counters: answers by result, and the file bytes sent.
pub struct FilestoreMetrics {
    pub sent: IntCounter,
    pub missing: IntCounter,
    pub denied: IntCounter,
    pub unset: IntCounter,
    pub bytes: IntCounter,
}

impl FilestoreMetrics {
    fn new(registry: &Registry) -> FilestoreMetrics {
        // Constant, valid names and labels: construction cannot fail.
        let requests = IntCounterVec::new(
            Opts::new(
                "portier_filestore_requests_total",
                "Worker answers handing a file over (X-Accel-Redirect), by result: sent, missing, denied, unset",
            ),
            &["result"],
        )
        .expect("valid metric definition");
        let bytes = IntCounter::new(
            "portier_filestore_bytes_total",
            "File bytes sent from the filestore",
        )
        .expect("valid metric definition");
        for m in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(bytes.clone()),
        ] {
            registry.register(m).expect("metric registered once");
        }
        FilestoreMetrics {
            sent: requests.with_label_values(&["sent"]),
            missing: requests.with_label_values(&["missing"]),
            denied: requests.with_label_values(&["denied"]),
            unset: requests.with_label_values(&["unset"]),
            bytes,
        }
    }
}

/// Client connections established to each listener port, counted from the kernel's
/// socket tables at scrape time (no per-connection work on the data plane; correct
/// for HTTP/2 too). Linux only; elsewhere 0.
pub fn established_on(ports: &[u16]) -> Vec<u64> {
    let mut counts = vec![0u64; ports.len()];
    for table in ["/proc/self/net/tcp", "/proc/self/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let mut cols = line.split_whitespace();
            let (Some(_), Some(local), Some(_), Some(state)) =
                (cols.next(), cols.next(), cols.next(), cols.next())
            else {
                continue;
            };
            // 01 = ESTABLISHED; the local address is HEXIP:HEXPORT.
            if state != "01" {
                continue;
            }
            let Some(port) = local
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
            else {
                continue;
            };
            for (i, p) in ports.iter().enumerate() {
                if *p == port {
                    counts[i] += 1;
                }
            }
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_labels_are_bounded() {
        let m = Metrics::new();
        for i in 0..TENANT_LABEL_LIMIT + 5 {
            m.tenant_stats(&format!("t{i}"))
                .observe(Class::Interactive, 200, 0.01);
        }
        let text = m.render();
        assert!(text.contains("tenant=\"t0\""));
        assert!(text.contains("tenant=\"_other\""));
        assert!(!text.contains(&format!("tenant=\"t{}\"", TENANT_LABEL_LIMIT + 1)));
    }
}
