//! `portier check`: validate a configuration file and what it names; with
//! `--objects`, also translate Kubernetes objects from YAML files exactly as the
//! `[kubernetes]` provider would, each problem at `FILE:LINE:COL` in the YAML.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use portier_config::{load_file, Config, Diagnostic};
use portier_k8s::objects::{Key, Kind};
use portier_k8s::yaml::{self, Document};
use portier_k8s::Objects;

pub fn run(path: &Path, objects: &[PathBuf]) -> ExitCode {
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
    let Some(config) = config.filter(|_| errors == 0) else {
        eprintln!("{errors} error(s) in {}", path.display());
        return ExitCode::from(1);
    };
    if objects.is_empty() {
        println!(
            "ok: {} pools, {} tenants, {} certificates",
            config.pools.len(),
            config.tenants.len(),
            certificates
        );
        return ExitCode::SUCCESS;
    }
    check_objects(config, certificates, objects)
}

/// The objects read from the YAML files, where each came from, and the problems.
struct Read {
    store: Objects,
    origin: HashMap<(Kind, Key), Document>,
    /// Objects of kinds portier reads.
    read: usize,
    diags: Vec<Diagnostic>,
}

fn read(paths: &[PathBuf]) -> Read {
    let mut r = Read {
        store: Objects::default(),
        origin: HashMap::new(),
        read: 0,
        diags: Vec::new(),
    };
    let files = match yaml::files(paths) {
        Ok(files) => files,
        Err(d) => {
            r.diags.push(d);
            return r;
        }
    };
    for f in files {
        let docs = match yaml::read_file(&f) {
            Ok(docs) => docs,
            Err(d) => {
                r.diags.push(d);
                continue;
            }
        };
        for doc in docs.into_iter().filter(|d| !d.value.is_null()) {
            match r.store.put_json(doc.value.clone()) {
                Ok(Some(id)) => {
                    r.read += 1;
                    r.origin.insert(id, doc);
                }
                Ok(None) => {} // not a kind portier reads
                Err(m) => r.diags.push(Diagnostic::error(&doc.file, doc.pos(""), m)),
            }
        }
    }
    r
}

/// The objects of `paths` translated over `config`; prints the summary or every problem.
fn check_objects(config: Config, file_certs: usize, paths: &[PathBuf]) -> ExitCode {
    let (file_pools, file_tenants) = (config.pools.len(), config.tenants.len());
    let Read {
        store,
        origin,
        read,
        mut diags,
    } = read(paths);
    let k = config.kubernetes.clone().unwrap_or_default();
    let redirect = config.tls.as_ref().is_some_and(|t| t.redirect_http);
    let t = portier_k8s::translate(&store, &k, &config.defaults, redirect);
    let certs = t.certs.clone();
    let (merged, t, _) = portier_k8s::merge(config, t);
    let place = |p: &portier_k8s::Problem| {
        let key = (p.object.namespace.clone(), p.object.name.clone());
        match origin.get(&(p.object.kind, key)) {
            Some(doc) => (doc.file.clone(), doc.pos(&p.field)),
            None => (String::from("-"), Default::default()),
        }
    };
    for p in &t.problems {
        let (file, pos) = place(p);
        diags.push(Diagnostic::error(
            &file,
            pos,
            format!("{}: {}", p.object, p.message),
        ));
    }
    for p in &t.warnings {
        let (file, pos) = place(p);
        diags.push(Diagnostic::warning(
            &file,
            pos,
            format!("{}: {}", p.object, p.message),
        ));
    }
    let mut valid_certs = 0;
    for c in &certs {
        let label = PathBuf::from(format!("Secret {}", c.name));
        match portier_certs::pair_from_pem(&c.name, &c.crt, &label, &c.key, &label) {
            Ok(_) => valid_certs += 1,
            Err(e) => {
                let (ns, name) = c.name.split_once('/').unwrap_or(("", &c.name));
                let doc = origin.get(&(Kind::Secret, (ns.to_string(), name.to_string())));
                let (file, pos) = doc.map_or((String::from("-"), Default::default()), |d| {
                    (d.file.clone(), d.pos("/data"))
                });
                diags.push(Diagnostic::error(
                    &file,
                    pos,
                    format!("Secret {}: {e}", c.name),
                ));
            }
        }
    }
    diags.sort_by(|a, b| (&a.file, a.pos.line, a.pos.col).cmp(&(&b.file, b.pos.line, b.pos.col)));
    for d in &diags {
        eprintln!("{d}");
    }
    let errors = diags.iter().filter(|d| d.is_error()).count();
    if errors > 0 {
        eprintln!("{errors} error(s) in the objects");
        return ExitCode::from(1);
    }
    println!(
        "ok: {} pools, {} tenants, {} certificates; objects: {read} read, {} routes, {} services",
        merged.pools.len(),
        merged.tenants.len(),
        file_certs + valid_certs,
        merged.tenants.len() - file_tenants,
        merged.pools.len() - file_pools,
    );
    ExitCode::SUCCESS
}
