//! `portier-bench`: portier's bench harness. See benches/README.md.

mod all;
mod chaos;
mod cli;
mod cluster;
mod compare;
mod downloads;
mod exhaustion;
mod failure;
mod kubernetes;
mod load;
mod noisy;
mod pace;
mod peers;
mod proc;
mod reload;
mod report;
mod saturation;
mod scale;
mod slow;
mod storm;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use cli::{Cli, Command};
use report::{fail, report, runtime, write_json};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let portier = cli.portier.unwrap_or_else(proc::default_portier);
    let needs_portier = !matches!(cli.command, Command::Load { .. });
    if needs_portier && !portier.exists() {
        eprintln!(
            "portier-bench: {} not found (cargo build --release -p portier)",
            portier.display()
        );
        return ExitCode::from(1);
    }
    let cpus = Some(cli.proxy_cpus.clone());
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => return fail(e),
    };
    let out = cli.out;
    match cli.command {
        Command::Load {
            addr,
            host,
            path,
            mode,
            conns,
            rate,
            seconds,
            h2,
            streams,
            pid,
        } => {
            let req = std::sync::Arc::new(load::Req::get(&host, &path));
            let duration = std::time::Duration::from_secs(seconds);
            let cpu0 = pid.map(proc::cpu_seconds);
            let label = match (h2, mode.as_str()) {
                (true, _) => format!("h2+tls closed c={conns} m={streams}"),
                (false, "open") => format!("h1 open {rate}/s"),
                _ => format!("h1 closed c={conns}"),
            };
            let stats = rt.block_on(async {
                let progress = load::Progress::start(label.clone());
                match (h2, mode.as_str()) {
                    (true, _) => {
                        load::closed_h2(addr, &host, req, conns, streams, duration, Some(&progress))
                            .await
                    }
                    (false, "open") => load::open(addr, req, rate, conns, duration).await,
                    _ => load::closed(addr, req, conns, duration, Some(&progress)).await,
                }
            });
            println!("{}", load::table(&label, &stats));
            let mut doc = stats.json();
            if let (Some(pid), Some(c0)) = (pid, cpu0) {
                let cpu = proc::cpu_seconds(pid) - c0;
                let hwm = proc::status_kib(pid, "VmHWM");
                println!(
                    "process {pid}: {cpu:.2} CPU s ({:.0} %), peak RSS {:.1} MiB",
                    cpu / seconds as f64 * 100.0,
                    hwm as f64 / 1024.0
                );
                doc["process"] =
                    serde_json::json!({"pid": pid, "cpu_seconds": cpu, "peak_rss_kib": hwm});
            }
            write_json(out, doc);
            ExitCode::SUCCESS
        }
        Command::Compare {
            peers,
            targets,
            seconds,
            rounds,
            load_fraction,
            held,
            websockets,
            handshake_conns,
        } => {
            let out_dir = out
                .as_ref()
                .and_then(|p| p.parent().map(|d| d.to_path_buf()))
                .unwrap_or_else(|| PathBuf::from("benches/results"));
            let opts = compare::Opts {
                portier,
                peers_dir: peers,
                targets: targets.clone(),
                seconds,
                rounds,
                held,
                websockets,
                handshake_conns,
                load_fraction,
                out_dir,
            };
            report(
                rt.block_on(compare::run(&opts)),
                |r| compare::table(r, &targets),
                compare::json,
                out,
            )
        }
        Command::NoisyNeighbour {
            seconds,
            b_rate,
            a_limit,
            a_concurrency,
            workers,
            capacity,
        } => {
            let opts = noisy::Opts {
                portier,
                seconds,
                b_rate,
                a_limit,
                a_concurrency,
                workers,
                capacity,
                proxy_cpus: cpus,
            };
            report(
                rt.block_on(noisy::run(&opts)),
                |p| noisy::table(p),
                |p| noisy::json(p, &opts),
                out,
            )
        }
        Command::Saturation {
            seconds,
            b_rate,
            a_parallel,
            a_call_ms,
            a_jitter_ms,
            pods,
            workers_per_pod,
        } => {
            let opts = saturation::Opts {
                portier,
                seconds,
                b_rate,
                a_parallel,
                a_call_ms,
                a_jitter_ms,
                pods,
                workers_per_pod,
                proxy_cpus: cpus,
            };
            report(
                rt.block_on(saturation::run(&opts)),
                |p| saturation::table(p, &opts),
                |p| saturation::json(p, &opts),
                out,
            )
        }
        Command::SlowClients {
            clients,
            size,
            rate,
            seconds,
            b_rate,
            peers,
        } => {
            let opts = slow::Opts {
                portier,
                clients,
                size,
                rate,
                seconds,
                b_rate,
                proxy_cpus: cpus,
                peers: Some(peers),
            };
            report(
                rt.block_on(slow::run(&opts)),
                |p| slow::table(p),
                |p| slow::json(p, &opts),
                out,
            )
        }
        Command::Downloads {
            clients,
            min_size,
            max_size,
            files,
            rate,
            seconds,
            b_rate,
            no_nginx,
        } => {
            let opts = downloads::Opts {
                portier,
                clients,
                min_size,
                max_size,
                files,
                rate,
                seconds,
                b_rate,
                proxy_cpus: cpus,
                nginx: !no_nginx,
            };
            report(
                rt.block_on(downloads::run(&opts)),
                |p| downloads::table(p),
                |p| downloads::json(p, &opts),
                out,
            )
        }
        Command::Chaos { rate, phase } => {
            let opts = chaos::Opts {
                portier,
                rate,
                phase,
                proxy_cpus: cpus,
            };
            report(
                rt.block_on(chaos::run(&opts)),
                chaos::table,
                chaos::json,
                out,
            )
        }
        Command::Exhaustion { tricklers, churn } => {
            let opts = exhaustion::Opts {
                portier,
                tricklers,
                churn,
                proxy_cpus: cpus,
            };
            report(
                rt.block_on(exhaustion::run(&opts)),
                exhaustion::table,
                exhaustion::json,
                out,
            )
        }
        Command::Cluster { seconds, limit } => {
            let opts = cluster::Opts {
                portier,
                seconds,
                limit,
                proxy_cpus: cpus,
            };
            report(
                rt.block_on(cluster::run(&opts)),
                cluster::table,
                |r| cluster::json(r, &opts),
                out,
            )
        }
        Command::LoginStorm {
            browsers,
            spread,
            asset_ms,
        } => {
            let opts = storm::Opts {
                portier,
                browsers,
                spread,
                asset_ms,
                proxy_cpus: cpus,
            };
            report(
                rt.block_on(storm::run(&opts)),
                |p| storm::table(p),
                |p| storm::json(p, &opts),
                out,
            )
        }
        Command::Reload {
            tenants,
            reloads,
            rate,
        } => {
            let opts = reload::Opts {
                portier,
                tenants,
                reloads,
                rate,
                proxy_cpus: cpus,
            };
            report(
                rt.block_on(reload::run(&opts)),
                reload::table,
                reload::json,
                out,
            )
        }
        Command::Kubernetes { routes, changes } => {
            let opts = kubernetes::Opts {
                portier,
                routes,
                changes,
                proxy_cpus: cpus,
            };
            report(
                rt.block_on(kubernetes::run(&opts)),
                kubernetes::table,
                kubernetes::json,
                out,
            )
        }
        Command::Scale(args) => {
            let opts = scale::Opts {
                portier,
                proxy_cpus: cpus,
                args,
            };
            report(
                rt.block_on(scale::run(&opts)),
                scale::table,
                scale::json,
                out,
            )
        }
        Command::Failure { rate } => {
            let opts = failure::Opts {
                portier,
                rate,
                proxy_cpus: cpus,
            };
            report(
                rt.block_on(failure::run(&opts)),
                failure::table,
                failure::json,
                out,
            )
        }
        Command::All { peers, seconds } => {
            let dir = out.unwrap_or_else(|| PathBuf::from("benches/results"));
            match rt.block_on(all::all(portier, cpus, peers, seconds, &dir)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
    }
}
