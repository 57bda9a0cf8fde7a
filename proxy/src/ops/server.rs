//! Process wiring: the pingora server with the proxy service on the data plane, and a
//! separate control-plane thread (admin API, reload, readiness, background tasks).
//! Signals: SIGHUP reloads; SIGTERM, SIGINT and SIGQUIT drain (readyz 503, stop
//! accepting, let in-flight requests finish within `drain`, exit 0).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::listeners::tls::TlsSettings;
use pingora::listeners::ListenerConfig;
use pingora::protocols::l4::stream::L4BufferSettings;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};
use portier_config::Config;
use tokio::signal::unix::{signal, SignalKind};

use crate::ops::control::{self, ControlMsg, ReadyHook};
use crate::service::Proxy;
use crate::state::Shared;

/// L4 read buffer of a TLS connection: one maximal TLS record plus its header.
const TLS_READ_BUFFER: usize = 16 * 1024 + 512;

/// Runs portier until it is told to stop. Returns the process exit code.
pub fn serve(config: Config, config_path: Option<PathBuf>, on_ready: Option<ReadyHook>) -> i32 {
    portier_certs::install_crypto_provider();
    // Seeded here, before any listener, not by the first client's handshake.
    if config.listen.https.is_some() && !portier_certs::seed_random() {
        tracing::warn!("the TLS random generator could not be seeded at start-up");
    }
    let inherited = inherited_listeners(&config.listen);
    // Listen addresses that cannot be bound are reported before anything starts
    // (those whose socket was handed over are listening already).
    for (what, addr) in [("http", config.listen.http), ("https", config.listen.https)] {
        if let Some(addr) = addr {
            if inherited.iter().any(|(bind, _)| *bind == addr.to_string()) {
                continue;
            }
            if let Err(e) = std::net::TcpListener::bind(addr) {
                eprintln!("portier: cannot listen on {what} address {addr}: {e}");
                return 1;
            }
        }
    }
    // Spool files of portier processes that are gone (a crash, a kill) go now.
    let stale = crate::io::spool::clean_dir(&config.listen.spool_dir);
    if stale > 0 {
        tracing::info!(files = stale, dir = %config.listen.spool_dir.display(), "removed stale spool files");
    }
    let admin_listener = match config.listen.admin {
        Some(addr) => match std::net::TcpListener::bind(addr) {
            Ok(l) => Some(l),
            Err(e) => {
                eprintln!("portier: cannot listen on admin address {addr}: {e}");
                return 1;
            }
        },
        None => None,
    };

    let listen = config.listen.clone();
    let shared = Shared::new(config, config_path);
    crate::ops::tls::reload_certs(&shared);
    shared
        .certs
        .set_on_miss(crate::acme::on_demand_hook(&shared));
    // With `[tls.acme]` the https listener may start without a certificate: ACME's
    // arrive in the directory, and until then handshakes fail as without one; likewise
    // with `[kubernetes]`, whose Secrets arrive once the objects are listed.
    let snap = shared.snapshot.load();
    let later = snap.config.acme().is_some() || snap.config.kubernetes.is_some();
    drop(snap);
    if listen.https.is_some() && shared.certs.is_empty() && !later {
        eprintln!("portier: the https listener has no certificate to serve (see the errors above)");
        return 1;
    }

    let (ctl_tx, ctl_rx) = tokio::sync::mpsc::unbounded_channel::<ControlMsg>();
    let ctl_shared = shared.clone();
    let probe: Vec<SocketAddr> = [listen.http, listen.https].into_iter().flatten().collect();
    let control_thread = std::thread::Builder::new()
        .name("portier-control".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the control-plane runtime");
                    std::process::exit(1);
                }
            };
            rt.block_on(control::run(
                ctl_shared,
                ctl_rx,
                admin_listener,
                probe,
                on_ready,
            ));
        });
    if let Err(e) = control_thread {
        eprintln!("portier: cannot start the control thread: {e}");
        return 1;
    }

    let threads = if listen.threads == 0 {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    } else {
        listen.threads
    };
    let conf = ServerConf {
        threads,
        grace_period_seconds: Some(listen.drain.as_secs().max(1)),
        graceful_shutdown_timeout_seconds: Some(1),
        upstream_keepalive_pool_size: 1024,
        // Idle worker connections are checked by one task each second (closed by the
        // worker, or idle past their time: dropped) and again when one is taken, instead
        // of by a task each: a task, a timer, a lock and a channel less per request
        // (vendor patch 33).
        upstream_keepalive_sweep_seconds: Some(1),
        max_retries: 16,
        // One current-thread runtime per thread (connections spread at random), not
        // one work-stealing runtime: on one core with 640 busy connections the
        // work-stealing scheduler served some of them ~100 ms late (HTTP/1.1 p99 117 ms
        // at p50 13 ms; HTTP/2+TLS max 191 ms) where this gives p99 34 ms at p50 26 ms,
        // and 20 % more HTTP/2 requests per second (benches/README.md).
        work_stealing: false,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(Some(Opt::default()), conf);
    server.bootstrap();
    for (bind, fd) in &inherited {
        tracing::info!(listener = %bind, fd, "listening on an inherited socket (socket activation)");
        server.add_listen_fd(bind, *fd);
    }
    let mut proxy = pingora::proxy::http_proxy_service_with_name(
        &server.configuration,
        Proxy {
            shared: shared.clone(),
        },
        "portier",
    );
    if let Some(addr) = listen.http {
        // Plain HTTP: pingora's HTTP/1 parser reads into buffers of its own, so an L4
        // read buffer (64 KiB per connection by default) would only cost memory for
        // every idle or held connection and a copy per read.
        proxy.add_listener(
            ListenerConfig::tcp(addr.to_string()).l4_buffer(L4BufferSettings::new(0, 1460)),
        );
    }
    if let Some(addr) = listen.https {
        // TLS 1.2 and 1.3 with rustls' default (AEAD-only) suites; certificates come
        // from the store through SNI, so a reload swaps them without a restart.
        let mut settings = match TlsSettings::intermediate("", "") {
            Ok(s) => s,
            Err(e) => {
                eprintln!("portier: cannot set up TLS: {e}");
                return 1;
            }
        };
        settings.set_cert_resolver(Arc::new(portier_certs::Resolver(shared.certs.clone())));
        // h2, http/1.1, and acme-tls/1 for TLS-ALPN-01 validations (vendor patch 12:
        // rustls refuses a handshake whose offered protocols it does not list; clients
        // never offer it, and the resolver answers it only with a challenge certificate).
        settings.set_alpn_protocols(vec![
            b"h2".to_vec(),
            b"http/1.1".to_vec(),
            portier_certs::ACME_TLS_ALPN.to_vec(),
        ]);
        // TLS reads whole records (up to 16 KiB): one record's worth of L4 read buffer
        // saves syscalls without the 64 KiB default per connection.
        proxy.add_listener(
            ListenerConfig::tcp(addr.to_string())
                .tls(settings)
                .l4_buffer(L4BufferSettings::new(TLS_READ_BUFFER, 1460)),
        );
    }
    // Connection caps at accept, and the request-header and idle timeouts.
    let limits = crate::ops::conns::ConnLimits::new(
        listen.max_connections,
        listen.max_connections_per_ip,
        shared.metrics.refused_max_connections.clone(),
        shared.metrics.refused_per_ip.clone(),
    );
    proxy.set_connection_filter(Arc::new(crate::ops::conns::Filter(limits)));
    if let Some(app) = proxy.app_logic_mut() {
        let mut options = pingora::apps::HttpServerOptions::default();
        options.h1_header_timeout = Some(listen.header_timeout);
        options.h1_first_request_timeout = Some(listen.idle_timeout.as_secs().max(1));
        // Header names' case is not kept (vendor patch 31): the headers portier forwards
        // are rebuilt without it anyway (`upstream::request_headers`, `response_headers`:
        // standard names go out in their usual capitals, others lowercase), and the
        // case map doubled the cost of parsing, copying and keeping them.
        options.h1_ignore_header_case = true;
        app.server_options = Some(options);
    }
    server.add_service(proxy);

    let watch = SignalWatch {
        shared: shared.clone(),
        control: ctl_tx,
        drain: listen.drain,
    };
    server.run(RunArgs {
        shutdown_signal: Box::new(watch),
    });
    shared.access_log.flush(Duration::from_secs(2));
    0
}

struct SignalWatch {
    shared: Arc<Shared>,
    control: tokio::sync::mpsc::UnboundedSender<ControlMsg>,
    drain: Duration,
}

#[async_trait]
impl ShutdownSignalWatch for SignalWatch {
    async fn recv(&self) -> ShutdownSignal {
        let (mut term, mut int, mut quit) = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::quit()),
        ) {
            (Ok(t), Ok(i), Ok(q)) => (t, i, q),
            _ => {
                tracing::error!("cannot install signal handlers; stopping");
                return ShutdownSignal::FastShutdown;
            }
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: draining"),
            _ = int.recv() => tracing::info!("SIGINT: draining"),
            // pingora's SIGQUIT hands the listening sockets to a new process started
            // in upgrade mode, which portier does not expose: drain instead.
            _ = quit.recv() => tracing::info!("SIGQUIT: draining"),
        }
        let _ = self.control.send(ControlMsg::Draining);
        begin_drain(&self.shared, self.drain);
        ShutdownSignal::GracefulTerminate
    }
}

/// Marks the process as draining and exits as soon as no request is in flight (or
/// when `drain` has passed). pingora meanwhile stops accepting and closes idle
/// keep-alive connections.
pub fn begin_drain(shared: &Arc<Shared>, drain: Duration) {
    shared.draining.store(true, Ordering::SeqCst);
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    let shared = shared.clone();
    let spawned = std::thread::Builder::new()
        .name("portier-drain".into())
        .spawn(move || {
            let start = Instant::now();
            crate::ops::supervise::leave_cluster(&shared);
            let mut idle_polls = 0;
            loop {
                std::thread::sleep(Duration::from_millis(50));
                let inflight = shared.inflight.load(Ordering::SeqCst);
                idle_polls = if inflight == 0 { idle_polls + 1 } else { 0 };
                // Two idle polls in a row: nothing is in flight and nothing was between
                // pingora's accept and our first hook.
                if idle_polls >= 2 {
                    tracing::info!("drained; exiting");
                    break;
                }
                if start.elapsed() >= drain {
                    tracing::warn!(inflight, "drain time over; exiting with requests in flight");
                    break;
                }
            }
            shared.access_log.flush(Duration::from_secs(2));
            std::process::exit(0);
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the drain watcher");
    }
}

/// Listening sockets passed by a service manager (systemd socket activation:
/// `LISTEN_PID`, `LISTEN_FDS`, the sockets from fd 3 on), matched to the `http` and
/// `https` listeners by their local address: `(the listener's bind string, fd)`. Such a
/// socket outlives each portier process, so a restart refuses no connection: they wait
/// in its backlog until the new process accepts them. A socket that matches no listener
/// is left alone (logged); without the variables (or for another PID) there are none.
fn inherited_listeners(listen: &portier_config::Listen) -> Vec<(String, std::os::unix::io::RawFd)> {
    use std::os::unix::io::FromRawFd;
    const SD_LISTEN_FDS_START: i32 = 3;
    let for_us = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|p| p == std::process::id());
    let count = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse::<i32>().ok())
        .unwrap_or(0);
    // As sd_listen_fds(unset_environment = 1): children do not see them.
    std::env::remove_var("LISTEN_PID");
    std::env::remove_var("LISTEN_FDS");
    std::env::remove_var("LISTEN_FDNAMES");
    if !for_us || count <= 0 {
        return Vec::new();
    }
    let wanted: Vec<std::net::SocketAddr> =
        [listen.http, listen.https].into_iter().flatten().collect();
    let mut out = Vec::new();
    for fd in SD_LISTEN_FDS_START..SD_LISTEN_FDS_START + count {
        // SAFETY: the service manager passed these descriptors to this process; the
        // listener is not dropped (ManuallyDrop), so the descriptor stays open for pingora.
        let socket = std::mem::ManuallyDrop::new(unsafe { std::net::TcpListener::from_raw_fd(fd) });
        let local = match socket.local_addr() {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(fd, error = %e, "inherited descriptor is not a TCP socket: ignored");
                continue;
            }
        };
        let Some(bind) = wanted.iter().find(|w| **w == local) else {
            tracing::warn!(fd, address = %local, "inherited socket matches no listener: ignored");
            continue;
        };
        if let Err(e) = socket.set_nonblocking(true) {
            tracing::warn!(fd, error = %e, "cannot make the inherited socket non-blocking: ignored");
            continue;
        }
        // SAFETY: fcntl on a descriptor this process owns.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 {
                libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
            }
        }
        out.push((bind.to_string(), fd));
    }
    out
}
