//! `mesh-probe ca-request`: asks the mesh CA to sign a CSR, as a node proxy does (gRPC
//! `istio.v1.auth.IstioCertificateService/CreateCertificate` over TLS, node name and bearer
//! token in the metadata), for whatever identity the test names. Prints the gRPC outcome.
use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use http::uri::PathAndQuery;
use hyper_util::rt::TokioIo;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType, string::Ia5String};
use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, ServerName, pem::PemObject as _},
};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::{metadata::MetadataValue, transport::Endpoint};

use super::mtls::{describe, provider};

/// The CA's messages, as mesh-node/src/ca/proto.rs defines them (the fields of Istio's API that
/// the mesh uses).
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateRequest {
    #[prost(string, tag = "1")]
    pub csr: String,
    #[prost(int64, tag = "3")]
    pub validity_duration: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateResponse {
    #[prost(string, repeated, tag = "1")]
    pub cert_chain: Vec<String>,
}

const CREATE_CERTIFICATE_PATH: &str = "/istio.v1.auth.IstioCertificateService/CreateCertificate";

#[derive(clap::Args)]
pub struct CaRequestArgs {
    /// host:port of the CA.
    #[arg(long)]
    pub ca: String,
    /// The mesh root (PEM): the CA's serving certificate must chain to it.
    #[arg(long)]
    pub root: PathBuf,
    /// The calling node's token.
    #[arg(long)]
    pub token_file: PathBuf,
    /// The calling node's name (`x-mesh-node`).
    #[arg(long)]
    pub node: String,
    /// The SPIFFE ID to ask for.
    #[arg(long)]
    pub identity: String,
    /// Send this CSR (PEM) as it is instead of one made for --identity (keys rcgen cannot
    /// make: RSA, other curves, mismatched signatures).
    #[arg(long)]
    pub csr: Option<PathBuf>,
    #[arg(long, default_value_t = 3600)]
    pub ttl_secs: i64,
    #[arg(long, default_value_t = 10000)]
    pub timeout_ms: u64,
}

pub fn run(args: CaRequestArgs) -> anyhow::Result<bool> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let report = rt.block_on(request(args))?;
    println!("{report}");
    Ok(true)
}

async fn request(args: CaRequestArgs) -> anyhow::Result<serde_json::Value> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&args.root).with_context(|| format!("reading {}", args.root.display()))? {
        roots.add(cert?)?;
    }
    // The CA's serving certificate names its listen address as an IP SAN: ordinary server
    // verification (chain to the mesh root, IP matches) is enough.
    let host: std::net::SocketAddr = args.ca.parse().with_context(|| format!("--ca {:?} is not IP:port", args.ca))?;
    let mut tls = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let connector = TlsConnector::from(Arc::new(tls));
    let connect = tower::service_fn(move |_: http::Uri| {
        let connector = connector.clone();
        async move {
            let tcp = TcpStream::connect(host).await?;
            tcp.set_nodelay(true)?;
            let tls = connector.connect(ServerName::IpAddress(host.ip().into()), tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    let timeout = Duration::from_millis(args.timeout_ms);
    let channel = Endpoint::from_shared(format!("http://{}", args.ca))?.connect_timeout(timeout).timeout(timeout).connect_with_connector_lazy(connect);

    // The key stays here; only the CSR goes to the CA.
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(Ia5String::try_from(args.identity.as_str())?)];
    let csr = match &args.csr {
        Some(file) => std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?,
        None => params.serialize_request(&key)?.pem()?,
    };

    let token = std::fs::read_to_string(&args.token_file).with_context(|| format!("reading {}", args.token_file.display()))?;
    let mut request = tonic::Request::new(IstioCertificateRequest { csr, validity_duration: args.ttl_secs });
    request.metadata_mut().insert("authorization", MetadataValue::try_from(format!("Bearer {}", token.trim()))?);
    request.metadata_mut().insert("x-mesh-node", MetadataValue::try_from(args.node.as_str())?);

    let mut grpc = tonic::client::Grpc::new(channel);
    let mut report = serde_json::json!({"node": args.node, "identity": args.identity});
    if let Err(e) = grpc.ready().await {
        report["code"] = "Unavailable".into();
        report["message"] = format!("CA not ready: {e}").into();
        return Ok(report);
    }
    let codec = tonic_prost::ProstCodec::<IstioCertificateRequest, IstioCertificateResponse>::default();
    match grpc.unary(request, PathAndQuery::from_static(CREATE_CERTIFICATE_PATH), codec).await {
        Ok(response) => {
            let chain = response.into_inner().cert_chain;
            report["code"] = "Ok".into();
            report["chain_len"] = chain.len().into();
            if let Some(leaf) = chain.first().and_then(|pem| CertificateDer::from_pem_slice(pem.as_bytes()).ok()) {
                let (spiffe, serial) = describe(leaf.as_ref());
                report["leaf_spiffe"] = spiffe.into();
                report["leaf_serial"] = serial.into();
            }
        }
        Err(status) => {
            report["code"] = format!("{:?}", status.code()).into();
            report["message"] = status.message().into();
        }
    }
    Ok(report)
}
