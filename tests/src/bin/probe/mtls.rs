//! mTLS probes: `mkcert` makes the certificates a test presents (another CA, an expired one, a
//! foreign trust domain), `tls-connect` dials a node proxy's inbound port the way a peer proxy
//! would (TLS 1.3, ALPN h2, a client certificate, SNI naming the destination identity).
use std::{fs, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
    string::Ia5String,
};
use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject as _},
};
use time::OffsetDateTime;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};
use tokio_rustls::TlsConnector;

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

// ---------- mkcert ----------

#[derive(clap::Args)]
pub struct MkcertArgs {
    /// The SPIFFE ID in the certificate's URI SAN.
    #[arg(long)]
    pub spiffe: String,
    #[arg(long)]
    pub cert_out: PathBuf,
    #[arg(long)]
    pub key_out: PathBuf,
    /// Sign with this CA certificate (PEM; the first certificate of the file) ...
    #[arg(long, requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    /// ... and its key (PEM). Without them a new self-signed root signs the certificate.
    #[arg(long, requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// Where to write the new root (when no --ca-cert is given).
    #[arg(long)]
    pub new_ca_out: Option<PathBuf>,
    /// Valid from 2 h ago to 1 h ago.
    #[arg(long)]
    pub expired: bool,
    /// Lifetime from now, in seconds (ignored with --expired).
    #[arg(long, default_value_t = 3600)]
    pub valid_secs: i64,
}

pub fn mkcert(args: MkcertArgs) -> anyhow::Result<bool> {
    let issuer = match (&args.ca_cert, &args.ca_key) {
        (Some(cert), Some(key)) => {
            let key = KeyPair::from_pem(&fs::read_to_string(key).with_context(|| format!("reading {}", key.display()))?)?;
            let pem = fs::read_to_string(cert).with_context(|| format!("reading {}", cert.display()))?;
            Issuer::from_ca_cert_pem(&pem, key)?
        }
        _ => {
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            let mut params = CertificateParams::default();
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, "not the mesh root");
            params.distinguished_name = dn;
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
            let now = OffsetDateTime::now_utc();
            params.not_before = now - time::Duration::hours(1);
            params.not_after = now + time::Duration::days(1);
            let root = params.self_signed(&key)?;
            if let Some(out) = &args.new_ca_out {
                fs::write(out, root.pem())?;
            }
            Issuer::new(params, key)
        }
    };
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(Ia5String::try_from(args.spiffe.as_str())?)];
    let now = OffsetDateTime::now_utc();
    if args.expired {
        params.not_before = now - time::Duration::hours(2);
        params.not_after = now - time::Duration::hours(1);
    } else {
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + time::Duration::seconds(args.valid_secs);
    }
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, &issuer)?;
    fs::write(&args.cert_out, cert.pem())?;
    fs::write(&args.key_out, key.serialize_pem())?;
    println!("{}", serde_json::json!({"spiffe": args.spiffe, "expired": args.expired, "cert": args.cert_out, "key": args.key_out}));
    Ok(true)
}

// ---------- tls-connect ----------

#[derive(clap::Args)]
pub struct TlsConnectArgs {
    /// host:port of a node proxy's inbound port (15008).
    #[arg(long)]
    pub addr: String,
    /// Server name to send: `<sa>.<ns>.identity.mesh` asks for that destination identity.
    #[arg(long)]
    pub sni: String,
    /// Client certificate chain (PEM); without it no client certificate is sent.
    #[arg(long, requires = "key_pem")]
    pub cert_pem: Option<PathBuf>,
    #[arg(long, requires = "cert_pem")]
    pub key_pem: Option<PathBuf>,
    /// Verify the server's chain against these roots (host names play no part); without it any
    /// server certificate is accepted.
    #[arg(long)]
    pub ca_pem: Option<PathBuf>,
    /// After the handshake, send an HTTP/2 CONNECT for this authority (pod IP:port) and report the status.
    #[arg(long)]
    pub connect: Option<String>,
    /// With --connect and a 200: send this line and report what the pod answers (e.g. `WHO`).
    #[arg(long)]
    pub send: Option<String>,
    /// With --connect: the `Forwarded` header value to send (e.g. `for=10.244.1.10`), the
    /// source pod a node proxy claims to speak for.
    #[arg(long)]
    pub forwarded: Option<String>,
    #[arg(long, default_value_t = 5000)]
    pub timeout_ms: u64,
}

/// Accepts any server certificate, or verifies its chain (not its name) against `roots`.
#[derive(Debug)]
struct Verifier {
    roots: Option<Arc<RootCertStore>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_cert_signed_by_trust_anchor(&parsed, roots, intermediates, now, self.provider.signature_verification_algorithms.all)?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

fn client_config(args: &TlsConnectArgs) -> anyhow::Result<ClientConfig> {
    let roots = match &args.ca_pem {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(path).with_context(|| format!("reading {}", path.display()))? {
                roots.add(cert?)?;
            }
            Some(Arc::new(roots))
        }
        None => None,
    };
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Verifier { roots, provider: provider() }));
    let mut config = match (&args.cert_pem, &args.key_pem) {
        (Some(cert), Some(key)) => {
            let chain: Vec<CertificateDer<'static>> =
                CertificateDer::pem_file_iter(cert).with_context(|| format!("reading {}", cert.display()))?.collect::<Result<_, _>>()?;
            let key = PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading {}", key.display()))?;
            builder.with_client_auth_cert(chain, key)?
        }
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// The SPIFFE ID (URI SAN) and serial of a certificate.
pub fn describe(cert: &[u8]) -> (Option<String>, Option<String>) {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert) else { return (None, None) };
    let uri = parsed.subject_alternative_name().ok().flatten().and_then(|san| {
        san.value.general_names.iter().find_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
    });
    (uri, Some(parsed.raw_serial_as_string()))
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = s.source();
    }
    parts.join(": ")
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

async fn dial(args: &TlsConnectArgs, config: Arc<ClientConfig>) -> anyhow::Result<Tls> {
    let tcp = TcpStream::connect(&args.addr).await.with_context(|| format!("connecting to {}", args.addr))?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from(args.sni.clone())?;
    Ok(TlsConnector::from(config).connect(name, tcp).await?)
}

/// TLS 1.3 finishes the client's side of the handshake before the server has judged the client
/// certificate: the verdict is the server's first application data (its h2 SETTINGS) or an alert.
async fn server_accepts(tls: &mut Tls) -> Result<(), String> {
    // The h2 client preface and an empty SETTINGS frame.
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]);
    tls.write_all(&hello).await.map_err(|e| error_chain(&e))?;
    tls.flush().await.map_err(|e| error_chain(&e))?;
    let mut buf = [0u8; 64];
    match tls.read(&mut buf).await {
        Ok(0) => Err("the server closed the connection without a word".into()),
        Ok(_) => Ok(()),
        Err(e) => Err(error_chain(&e)),
    }
}

async fn tls_connect_async(args: TlsConnectArgs) -> anyhow::Result<serde_json::Value> {
    let config = Arc::new(client_config(&args)?);
    let timeout = Duration::from_millis(args.timeout_ms);
    let mut report = serde_json::json!({"addr": args.addr, "sni": args.sni});
    let mut tls = match tokio::time::timeout(timeout, dial(&args, config.clone())).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            report["tls"] = "error".into();
            report["handshake"] = "error".into();
            report["error"] = error_chain(e.as_ref()).into();
            return Ok(report);
        }
        Err(_) => {
            report["tls"] = "timeout".into();
            report["handshake"] = "error".into();
            report["error"] = "TLS handshake timed out".into();
            return Ok(report);
        }
    };
    report["tls"] = "ok".into();
    {
        let (_, conn) = tls.get_ref();
        report["alpn"] = conn.alpn_protocol().map(|p| String::from_utf8_lossy(p).into_owned()).into();
        report["version"] = conn.protocol_version().map(|v| format!("{v:?}")).into();
        if let Some(leaf) = conn.peer_certificates().and_then(|c| c.first()) {
            let (spiffe, serial) = describe(leaf.as_ref());
            report["server_spiffe"] = spiffe.into();
            report["server_serial"] = serial.into();
        }
    }
    let verdict = match tokio::time::timeout(timeout, server_accepts(&mut tls)).await {
        Ok(v) => v,
        Err(_) => Err("no answer from the server after the handshake".into()),
    };
    drop(tls);
    match verdict {
        Ok(()) => report["handshake"] = "ok".into(),
        Err(e) => {
            report["handshake"] = "error".into();
            report["error"] = e.into();
            return Ok(report);
        }
    }
    if let Some(authority) = &args.connect {
        super::h2c::record(&mut report, tokio::time::timeout(timeout, tunnel(&args, config, authority)).await);
    }
    Ok(report)
}

/// One HBONE stream: HTTP/2 CONNECT to `authority` over a fresh mTLS connection.
async fn tunnel(args: &TlsConnectArgs, config: Arc<ClientConfig>, authority: &str) -> anyhow::Result<(u16, Option<String>)> {
    let tls = dial(args, config).await?;
    super::h2c::connect_over(tls, authority, args.forwarded.as_deref(), args.send.as_deref()).await
}

pub fn tls_connect(args: TlsConnectArgs) -> anyhow::Result<bool> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let report = rt.block_on(tls_connect_async(args))?;
    println!("{report}");
    Ok(true)
}
