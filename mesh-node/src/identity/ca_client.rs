//! gRPC client of the mesh CA, over TLS. The CA's serving certificate is verified like any
//! mesh peer: chained to the mesh root and carrying the CA's SPIFFE ID, so the CA address can
//! be an IP, a host name or a tunnel without certificate name games.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::uri::PathAndQuery;
use hyper_util::rt::TokioIo;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};

use super::error::IdentityError;
use super::spiffe::Identity;
use super::tls::{ALPN_H2, crypto_provider};
use super::trust::TrustBundle;
use super::verify::MeshServerVerifier;
use crate::ca::proto::{CREATE_CERTIFICATE_PATH, IstioCertificateRequest, IstioCertificateResponse, NODE_HEADER};

/// Where the CA is and how this node proves who it is.
#[derive(Debug, Clone)]
pub struct CaClientConfig {
    /// `host:port` of the CA.
    pub address: String,
    pub node_name: String,
    /// File holding this node's token; read per request so it can be replaced in place.
    pub token_file: PathBuf,
    /// Mesh root certificate(s), PEM: trust anchor for the CA and for all mesh peers.
    pub root_cert: PathBuf,
    /// The SPIFFE ID the CA serves with.
    pub ca_identity: Identity,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    /// How often `root_cert` is re-read; a change swaps the trust bundle without a restart.
    pub root_poll: Duration,
}

impl CaClientConfig {
    /// A config with the CA identity of `trust_domain` and usual timeouts.
    pub fn new(
        address: impl Into<String>,
        node_name: impl Into<String>,
        token_file: impl Into<PathBuf>,
        root_cert: impl Into<PathBuf>,
        trust_domain: &str,
    ) -> CaClientConfig {
        CaClientConfig {
            address: address.into(),
            node_name: node_name.into(),
            token_file: token_file.into(),
            root_cert: root_cert.into(),
            ca_identity: crate::ca::ca_identity(trust_domain),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            root_poll: Duration::from_secs(5),
        }
    }
}

impl CaClientConfig {
    /// The same config with another root file.
    pub fn with_root(mut self, root_cert: impl Into<PathBuf>) -> CaClientConfig {
        self.root_cert = root_cert.into();
        self
    }
}

/// A lazily connecting client; it reconnects by itself after the CA restarts.
#[derive(Debug, Clone)]
pub struct CaClient {
    channel: Channel,
    node_name: String,
    token_file: PathBuf,
}

impl CaClient {
    /// Does no I/O except what `roots` took to load; the first request connects.
    pub fn new(config: &CaClientConfig, roots: Arc<RootCertStore>) -> Result<CaClient, IdentityError> {
        CaClient::with_verifier(config, MeshServerVerifier::new(roots, config.ca_identity.clone()))
    }

    /// Like [`CaClient::new`], verifying the CA against the trust bundle of the moment (the
    /// CA's serving certificate moves to the new root during a rotation).
    pub fn reloading(config: &CaClientConfig, bundle: Arc<TrustBundle>) -> Result<CaClient, IdentityError> {
        CaClient::with_verifier(config, MeshServerVerifier::reloading(bundle, config.ca_identity.clone()))
    }

    fn with_verifier(config: &CaClientConfig, verifier: MeshServerVerifier) -> Result<CaClient, IdentityError> {
        let mut tls = ClientConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| IdentityError::Tls(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        tls.alpn_protocols = vec![ALPN_H2.to_vec()];
        let connector = TlsConnector::from(Arc::new(tls));
        let address = config.address.clone();
        let connect = tower::service_fn(move |_: http::Uri| {
            let connector = connector.clone();
            let address = address.clone();
            async move {
                let tcp = TcpStream::connect(&address).await?;
                tcp.set_nodelay(true)?;
                // The name is not checked (the verifier checks the SPIFFE ID instead).
                let name = ServerName::try_from("mesh-ca").map_err(std::io::Error::other)?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        });
        let endpoint = Endpoint::from_shared(format!("http://{}", config.address))
            .map_err(|e| IdentityError::Tls(format!("CA address {:?}: {e}", config.address)))?
            .connect_timeout(config.connect_timeout)
            .timeout(config.request_timeout);
        Ok(CaClient {
            channel: endpoint.connect_with_connector_lazy(connect),
            node_name: config.node_name.clone(),
            token_file: config.token_file.clone(),
        })
    }

    /// Sends a CSR; returns the PEM chain, leaf first.
    pub async fn create_certificate(&self, csr_pem: &str, ttl: Duration) -> Result<Vec<String>, IdentityError> {
        let token = tokio::fs::read_to_string(&self.token_file)
            .await
            .map_err(|e| IdentityError::file(&self.token_file, e))?;
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr: csr_pem.to_string(),
            validity_duration: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
        });
        let metadata = request.metadata_mut();
        let bearer = MetadataValue::try_from(format!("Bearer {}", token.trim()))
            .map_err(|e| IdentityError::file(&self.token_file, format!("token is not a valid header value: {e}")))?;
        metadata.insert("authorization", bearer);
        let node = MetadataValue::try_from(self.node_name.as_str())
            .map_err(|e| IdentityError::Tls(format!("node name {:?}: {e}", self.node_name)))?;
        metadata.insert(NODE_HEADER, node);

        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        grpc.ready()
            .await
            .map_err(|e| IdentityError::Ca { code: tonic::Code::Unavailable, message: format!("CA not ready: {e}") })?;
        let codec = tonic_prost::ProstCodec::<IstioCertificateRequest, IstioCertificateResponse>::default();
        let response = grpc
            .unary(request, PathAndQuery::from_static(CREATE_CERTIFICATE_PATH), codec)
            .await
            .map_err(|status| IdentityError::Ca { code: status.code(), message: status_message(&status) })?;
        let chain = response.into_inner().cert_chain;
        if chain.is_empty() {
            return Err(IdentityError::Ca { code: tonic::Code::Internal, message: "CA returned an empty chain".into() });
        }
        Ok(chain)
    }
}

/// Transport failures come back as a status whose message is empty or repeats its sources;
/// join the distinct parts so the log line says why once.
fn status_message(status: &tonic::Status) -> String {
    use std::error::Error as _;
    let mut message = status.message().to_string();
    let mut source = status.source();
    while let Some(e) = source {
        let part = e.to_string();
        if !message.contains(&part) {
            message = if message.is_empty() { part } else { format!("{message}: {part}") };
        }
        source = e.source();
    }
    message
}
