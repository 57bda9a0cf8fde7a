//! `portier-bench`: portier's bench harness. See benches/README.md.

mod load;
mod noisy;
mod proc;
mod reload;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "portier-bench",
    about = "Odoo-shaped load scenarios for portier and its peers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// 20 reloads of a 10 000-tenant config under load: reload time, latency, errors.
    Reload {
        #[arg(long)]
        portier: Option<PathBuf>,
        #[arg(long, default_value_t = 10_000)]
        tenants: usize,
        #[arg(long, default_value_t = 20)]
        reloads: usize,
        /// Requests per second during the run.
        #[arg(long, default_value_t = 2000.0)]
        rate: f64,
        #[arg(long, default_value = "1")]
        proxy_cpus: String,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Tenant A floods /jsonrpc at 10x its limit while tenant B browses.
    NoisyNeighbour {
        /// The portier binary [default: $PORTIER_BIN, then target/release/portier]
        #[arg(long)]
        portier: Option<PathBuf>,
        /// Seconds per phase.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// B's interactive requests per second.
        #[arg(long, default_value_t = 100.0)]
        b_rate: f64,
        /// A's integration limit, requests per second (A sends 10x this).
        #[arg(long, default_value_t = 20)]
        a_limit: u32,
        /// A's integration concurrency limit.
        #[arg(long, default_value_t = 2)]
        a_concurrency: u32,
        /// Simulated Odoo workers.
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// Requests each worker works on at once.
        #[arg(long, default_value_t = 3)]
        capacity: usize,
        /// CPUs for the proxy (taskset list); the bench itself runs where it is started.
        #[arg(long, default_value = "1")]
        proxy_cpus: String,
        /// Write the results as JSON here.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("portier-bench: {e}");
            return ExitCode::from(1);
        }
    };
    match cli.command {
        Command::Reload {
            portier,
            tenants,
            reloads,
            rate,
            proxy_cpus,
            out,
        } => {
            let opts = reload::Opts {
                portier: portier.unwrap_or_else(proc::default_portier),
                tenants,
                reloads,
                rate,
                proxy_cpus: Some(proxy_cpus),
            };
            match rt.block_on(reload::run(&opts)) {
                Ok(r) => {
                    println!("{}", reload::table(&r));
                    write_json(out, reload::json(&r));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("portier-bench: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::NoisyNeighbour {
            portier,
            seconds,
            b_rate,
            a_limit,
            a_concurrency,
            workers,
            capacity,
            proxy_cpus,
            out,
        } => {
            let opts = noisy::Opts {
                portier: portier.unwrap_or_else(proc::default_portier),
                seconds,
                b_rate,
                a_limit,
                a_concurrency,
                workers,
                capacity,
                proxy_cpus: Some(proxy_cpus),
            };
            if !noisy::exists(&opts.portier) {
                eprintln!(
                    "portier-bench: {} not found (cargo build --release -p portier)",
                    opts.portier.display()
                );
                return ExitCode::from(1);
            }
            match rt.block_on(noisy::run(&opts)) {
                Ok(phases) => {
                    println!("{}", noisy::table(&phases));
                    write_json(out, noisy::json(&phases, &opts));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("portier-bench: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

fn write_json(out: Option<PathBuf>, doc: serde_json::Value) {
    if let Some(path) = out {
        if let Err(e) = std::fs::write(&path, format!("{doc:#}\n")) {
            eprintln!("portier-bench: cannot write {}: {e}", path.display());
        }
    }
}
