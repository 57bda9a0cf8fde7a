//! `portier-bench all`: every timed scenario with its command-line defaults, one table
//! each, their JSON files in a directory.

use std::path::PathBuf;

use clap::Parser;

use crate::{compare, failure, noisy, reload, write_json, Cli, Command};

/// A scenario's command with its command-line defaults, so that `all` runs each
/// scenario as it runs alone and the defaults are written once (in the attributes).
pub fn defaults(scenario: &str) -> std::io::Result<Command> {
    Cli::try_parse_from(["portier-bench", scenario])
        .map(|c| c.command)
        .map_err(|e| std::io::Error::other(format!("defaults of {scenario}: {e}")))
}

fn unexpected(scenario: &str) -> std::io::Error {
    std::io::Error::other(format!("`{scenario}` parsed as another command"))
}

/// Every scenario with its defaults (and `seconds` for the timed ones), one table each,
/// their JSON files in `dir`.
pub async fn all(
    portier: PathBuf,
    cpus: Option<String>,
    peers: PathBuf,
    seconds: u64,
    dir: &std::path::Path,
) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let Command::Compare {
        targets,
        rounds,
        load_fraction,
        held,
        websockets,
        handshake_conns,
        ..
    } = defaults("compare")?
    else {
        return Err(unexpected("compare"));
    };
    let Command::NoisyNeighbour {
        b_rate,
        a_limit,
        a_concurrency,
        workers,
        capacity,
        ..
    } = defaults("noisy-neighbour")?
    else {
        return Err(unexpected("noisy-neighbour"));
    };
    let Command::Reload {
        tenants,
        reloads,
        rate: reload_rate,
    } = defaults("reload")?
    else {
        return Err(unexpected("reload"));
    };
    let Command::Failure { rate: failure_rate } = defaults("failure")? else {
        return Err(unexpected("failure"));
    };

    let copts = compare::Opts {
        portier: portier.clone(),
        peers_dir: peers,
        targets: targets.clone(),
        seconds,
        rounds,
        held,
        websockets,
        handshake_conns,
        load_fraction,
        out_dir: dir.to_path_buf(),
    };
    let compared = compare::run(&copts).await?;
    let nopts = noisy::Opts {
        portier: portier.clone(),
        seconds,
        b_rate,
        a_limit,
        a_concurrency,
        workers,
        capacity,
        proxy_cpus: cpus.clone(),
    };
    let noisy = noisy::run(&nopts).await?;
    let ropts = reload::Opts {
        portier: portier.clone(),
        tenants,
        reloads,
        rate: reload_rate,
        proxy_cpus: cpus.clone(),
    };
    let reloaded = reload::run(&ropts).await?;
    let fopts = failure::Opts {
        portier,
        rate: failure_rate,
        proxy_cpus: cpus,
    };
    let failed = failure::run(&fopts).await?;

    println!(
        "## portier versus the peers\n\n{}",
        compare::table(&compared, &targets)
    );
    println!("## noisy neighbour\n\n{}", noisy::table(&noisy));
    println!(
        "## reload under load ({tenants} tenants)\n\n{}",
        reload::table(&reloaded)
    );
    println!(
        "## backend failure under load\n\n{}",
        failure::table(&failed)
    );
    write_json(Some(dir.join("compare.json")), compare::json(&compared));
    write_json(
        Some(dir.join("noisy-neighbour.json")),
        noisy::json(&noisy, &nopts),
    );
    write_json(Some(dir.join("reload.json")), reload::json(&reloaded));
    write_json(Some(dir.join("failure.json")), failure::json(&failed));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_finds_every_scenario_and_its_defaults() {
        assert!(matches!(
            defaults("compare"),
            Ok(Command::Compare { held: 5000, .. })
        ));
        assert!(matches!(
            defaults("noisy-neighbour"),
            Ok(Command::NoisyNeighbour { a_limit: 20, .. })
        ));
        assert!(matches!(
            defaults("reload"),
            Ok(Command::Reload {
                tenants: 10_000,
                ..
            })
        ));
        assert!(matches!(defaults("failure"), Ok(Command::Failure { .. })));
        assert!(defaults("no-such-scenario").is_err());
    }
}
