//! `portier check`: validate a configuration file and what it names.

use std::path::Path;
use std::process::ExitCode;

use portier_config::load_file;

pub fn run(path: &Path) -> ExitCode {
    let (config, mut diags) = match load_file(path) {
        Ok((c, warnings)) => (Some(c), warnings),
        Err(diags) => (None, diags),
    };
    let mut certificates = 0;
    if let Some(c) = &config {
        let (cert_diags, n) = crate::ops::tls::check_certs(c);
        diags.extend(cert_diags);
        certificates = n;
    }
    let errors = diags.iter().filter(|d| d.is_error()).count();
    diags.sort_by_key(|d| (d.pos.line, d.pos.col));
    for d in &diags {
        eprintln!("{d}");
    }
    match config {
        Some(c) if errors == 0 => {
            println!(
                "ok: {} pools, {} tenants, {} certificates",
                c.pools.len(),
                c.tenants.len(),
                certificates
            );
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("{errors} error(s) in {}", path.display());
            ExitCode::from(1)
        }
    }
}
