//! TLS for the tests: a test CA, clients, and requests over TLS.

use super::*;

/// A test certificate authority and the pairs it issues (rcgen, ECDSA P-256).
pub struct TestPki {
    ca_params: rcgen::CertificateParams,
    ca_key: rcgen::KeyPair,
    pub ca_pem: String,
    pub ca_der: rustls::pki_types::CertificateDer<'static>,
}

impl TestPki {
    pub fn new() -> TestPki {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "portier test CA");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("ca");
        TestPki {
            ca_pem: cert.pem(),
            ca_der: cert.der().clone(),
            ca_params: params,
            ca_key: key,
        }
    }

    /// Issues a leaf for `sans`, valid for `days` from now; returns (chain PEM, key PEM).
    pub fn issue(&self, sans: &[&str], days: i64) -> (String, String) {
        let mut params =
            rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .expect("params");
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(days);
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            sans.first().copied().unwrap_or("leaf"),
        );
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let key = rcgen::KeyPair::generate().expect("key");
        let issuer = rcgen::Issuer::from_params(&self.ca_params, &self.ca_key);
        let cert = params.signed_by(&key, &issuer).expect("leaf");
        (cert.pem(), key.serialize_pem())
    }

    /// Writes `dir/NAME.crt` (leaf + CA) and `dir/NAME.key`.
    pub fn write_pair(&self, dir: &Path, name: &str, sans: &[&str], days: i64) {
        let (crt, key) = self.issue(sans, days);
        std::fs::write(
            dir.join(format!("{name}.crt")),
            format!("{crt}{}", self.ca_pem),
        )
        .expect("write crt");
        std::fs::write(dir.join(format!("{name}.key")), key).expect("write key");
    }

    /// A client configuration trusting this CA, offering `alpn`.
    pub fn client(
        &self,
        alpn: &[&[u8]],
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone()).expect("ca");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        Arc::new(cfg)
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

pub type TlsStream = tokio_rustls::client::TlsStream<TcpStream>;

/// Connects with TLS to `addr`, sending `sni`.
pub async fn tls_connect(
    addr: SocketAddr,
    sni: &str,
    cfg: Arc<rustls::ClientConfig>,
) -> Result<TlsStream, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name =
        rustls::pki_types::ServerName::try_from(sni.to_string()).map_err(|e| e.to_string())?;
    tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())
}

/// The DNS names of the certificate the server presented.
pub fn presented_names(s: &TlsStream) -> Vec<String> {
    let (_, conn) = s.get_ref();
    let Some(leaf) = conn.peer_certificates().and_then(|c| c.first()) else {
        return Vec::new();
    };
    leaf_names(leaf.as_ref())
}

/// The leaf certificate's DER (to tell two issues of the same name apart).
pub fn presented_der(s: &TlsStream) -> Vec<u8> {
    let (_, conn) = s.get_ref();
    conn.peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.as_ref().to_vec())
        .unwrap_or_default()
}

fn leaf_names(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|g| match g {
            x509_parser::extensions::GeneralName::DNSName(n) => Some(n.to_string()),
            _ => None,
        })
        .collect()
}

/// One HTTP/1.1 request over an established TLS stream.
pub async fn h1_over(stream: TlsStream, host: &str, path: &str) -> Result<Resp, String> {
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    send(&mut sender, "GET", host, path, &[], Bytes::new()).await
}

/// One HTTP/2 request over an established TLS stream (ALPN must have chosen h2).
pub async fn h2_over(stream: TlsStream, authority: &str, path: &str) -> Result<Resp, String> {
    h2_over_with(stream, authority, path, &[]).await
}

/// [`h2_over`] with request headers.
pub async fn h2_over_with(
    stream: TlsStream,
    authority: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Resp, String> {
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut req = http::Request::get(format!("https://{authority}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok(Resp {
        status,
        headers,
        body,
    })
}
