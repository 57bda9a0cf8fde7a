//! What the harness does with a scenario's result: its table on stdout, its JSON in a
//! file, or its error; and the runtime scenarios run on.

use std::path::PathBuf;
use std::process::ExitCode;

pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
}

pub fn write_json(out: Option<PathBuf>, doc: serde_json::Value) {
    if let Some(path) = out {
        if let Err(e) = std::fs::write(&path, format!("{doc:#}\n")) {
            eprintln!("portier-bench: cannot write {}: {e}", path.display());
        }
    }
}

/// Prints a scenario's table and writes its JSON, or reports its error.
pub fn report<R>(
    result: std::io::Result<R>,
    table: impl Fn(&R) -> String,
    json: impl Fn(&R) -> serde_json::Value,
    out: Option<PathBuf>,
) -> ExitCode {
    match result {
        Ok(r) => {
            println!("{}", table(&r));
            write_json(out, json(&r));
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

pub fn fail(e: std::io::Error) -> ExitCode {
    eprintln!("portier-bench: {e}");
    ExitCode::from(1)
}
