//! Let's Encrypt's test ACME server, `pebble` (Debian's package, installed by
//! `scripts/setup.sh`), on loopback ports, with `pebble-challtestsrv` as its DNS
//! server resolving every name to 127.0.0.1. Debian's package ships no certificate for
//! pebble's own HTTPS: the test CA issues one (its root is passed to portier as `ca`).
//! Validation goes to portier's `http` (HTTP-01) and `https` (TLS-ALPN-01) ports.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use portier_tests::*;
use rustls::pki_types::pem::PemObject;

pub struct Pebble {
    pub dir: tempfile::TempDir,
    pub port: u16,
    mgmt: u16,
    dns: u16,
    http_port: u16,
    tls_port: u16,
    validity_secs: Option<u64>,
    pebble: Option<Child>,
    dns_server: Option<Child>,
    pub pki: TestPki,
}

impl Pebble {
    /// Starts pebble validating against `http_port` and `tls_port`, issuing
    /// certificates valid `validity_secs` (pebble's default: 5 years).
    pub async fn start(http_port: u16, tls_port: u16, validity_secs: Option<u64>) -> Pebble {
        let pki = TestPki::new();
        let dir = tempfile::tempdir().expect("temp dir");
        pki.write_pair(dir.path(), "pebble", &["127.0.0.1", "localhost"], 30);
        std::fs::write(dir.path().join("test-ca.pem"), &pki.ca_pem).expect("write ca");
        let mut p = Pebble {
            dir,
            port: free_port(),
            mgmt: free_port(),
            dns: free_port(),
            http_port,
            tls_port,
            validity_secs,
            pebble: None,
            dns_server: None,
            pki,
        };
        let dns_port = p.dns;
        let challtestsrv = |doh: bool| {
            let mut cmd = Command::new("pebble-challtestsrv");
            cmd.args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
                .args(["-dns01", &format!("127.0.0.1:{dns_port}")])
                .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
                .args(["-management", &format!("127.0.0.1:{}", free_port())]);
            if doh {
                cmd.args(["-doh", ""]);
            }
            cmd.stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!("pebble-challtestsrv: {e} (scripts/setup.sh installs pebble)")
                })
        };
        // Newer builds serve DNS-over-HTTPS on :8443 unless told not to; older ones
        // (Debian's) have no -doh flag and exit at once: then without it.
        let mut dns = challtestsrv(true);
        std::thread::sleep(Duration::from_millis(200));
        if matches!(dns.try_wait(), Ok(Some(_))) {
            dns = challtestsrv(false);
        }
        p.dns_server = Some(dns);
        p.restart().await;
        p
    }

    /// The directory URL.
    pub fn directory(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.port)
    }

    /// The CA file portier must trust for pebble's own HTTPS (`ca`).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("test-ca.pem")
    }

    /// Starts pebble (again); waits until it listens.
    pub async fn restart(&mut self) {
        assert!(self.pebble.is_none(), "pebble is already running");
        let mut cfg = serde_json::json!({"pebble": {
            "listenAddress": format!("127.0.0.1:{}", self.port),
            "managementListenAddress": format!("127.0.0.1:{}", self.mgmt),
            "certificate": self.dir.path().join("pebble.crt"),
            "privateKey": self.dir.path().join("pebble.key"),
            "httpPort": self.http_port,
            "tlsPort": self.tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        }});
        if let Some(v) = self.validity_secs {
            cfg["pebble"]["certificateValidityPeriod"] = v.into();
        }
        let path = self.dir.path().join("pebble.json");
        std::fs::write(&path, cfg.to_string()).expect("write pebble config");
        let child = Command::new("pebble")
            .arg("-config")
            .arg(&path)
            .args(["-dnsserver", &format!("127.0.0.1:{}", self.dns)])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("pebble runs (scripts/setup.sh installs it)");
        self.pebble = Some(child);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let up = eventually(Duration::from_secs(10), || {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok()
        })
        .await;
        assert!(up, "pebble did not listen on {addr}");
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.pebble.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The root pebble issues from (a fresh one per run), from its management API.
    pub async fn root_pem(&self) -> String {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.mgmt));
        let cfg = self.pki.client(
            &[b"http/1.1"],
            &[&rustls::version::TLS13, &rustls::version::TLS12],
        );
        let stream = tls_connect(addr, "127.0.0.1", cfg)
            .await
            .expect("pebble management");
        let r = h1_over(stream, "127.0.0.1", "/roots/0")
            .await
            .expect("pebble root");
        assert_eq!(r.status, 200, "{}", r.text());
        r.text()
    }

    /// A TLS client trusting only pebble's root.
    pub async fn client(&self) -> Arc<rustls::ClientConfig> {
        let pem = self.root_pem().await;
        let mut roots = rustls::RootCertStore::empty();
        for der in rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()) {
            roots.add(der.expect("root pem")).expect("root");
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(cfg)
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        self.stop();
        if let Some(mut c) = self.dns_server.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
