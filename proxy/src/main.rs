//! `portier`: an edge proxy and load balancer for multi-tenant Odoo hosting.

// The layers, bottom up (docs/architecture.md): the runtime crate (portier-runtime) and
// the configuration model (portier-config) below everything here; `io` and `acme`
// (building blocks); `snapshot` (the configuration as a request sees it); `phase` (the
// request path's steps and per-request data); `state` (the process state); `service`
// (pingora's phases -> ours) and `ops` (the process, admin API, reloads, background
// tasks) on top.
mod acme;
mod io;
mod ops;
mod phase;
mod service;
mod snapshot;
mod state;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: ops::memory::Mimalloc = ops::memory::Mimalloc;

#[derive(Parser)]
#[command(
    name = "portier",
    version,
    about = "Edge proxy and load balancer for multi-tenant Odoo hosting"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run in the foreground (logs on stderr).
    Run {
        /// Configuration file [default: $PORTIER_CONFIG, then /etc/portier/portier.toml]
        #[arg(short = 'c', long = "config")]
        config: Option<PathBuf>,
    },
    /// Validate the configuration and everything it names; print a summary.
    Check {
        /// Configuration file [default: $PORTIER_CONFIG, then /etc/portier/portier.toml]
        #[arg(short = 'c', long = "config")]
        config: Option<PathBuf>,
        /// Also translate Kubernetes objects (YAML files, or directories of them) as the
        /// `[kubernetes]` provider would, without an API server.
        #[arg(long = "objects", num_args = 1..)]
        objects: Vec<PathBuf>,
    },
    /// Run on 127.0.0.1 with an embedded config and two simulated Odoo workers.
    Demo {
        /// Port of the demo's HTTP listener.
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Port of the demo's admin listener.
        #[arg(long, default_value_t = 9900)]
        admin_port: u16,
    },
}

fn config_path(arg: Option<PathBuf>) -> PathBuf {
    arg.or_else(|| std::env::var_os("PORTIER_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/etc/portier/portier.toml"))
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PORTIER_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,pingora_core=warn,pingora_proxy=warn,pingora=warn")
    });
    let _ = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_target(true)
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config, objects } => ops::check::run(&config_path(config), &objects),
        Command::Run { config } => {
            init_logging();
            let path = config_path(config);
            let (config, warnings) = match portier_config::load_file(&path) {
                Ok(c) => c,
                Err(diags) => {
                    for d in &diags {
                        eprintln!("{d}");
                    }
                    eprintln!(
                        "portier: {} error(s) in {}; not starting",
                        diags.iter().filter(|d| d.is_error()).count(),
                        path.display()
                    );
                    return ExitCode::from(1);
                }
            };
            for w in &warnings {
                tracing::warn!("{w}");
            }
            let path = std::fs::canonicalize(&path).unwrap_or(path);
            ExitCode::from(ops::server::serve(config, Some(path), None) as u8)
        }
        Command::Demo { port, admin_port } => {
            init_logging();
            ExitCode::from(ops::demo::run(port, admin_port) as u8)
        }
    }
}
