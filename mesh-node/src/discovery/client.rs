//! A minimal Kubernetes API client: GET over HTTP/1.1 (TLS for in-cluster),
//! bearer token re-read per request (projected tokens rotate).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the API server is and how to authenticate to it.
#[derive(Clone)]
pub struct ApiServer {
    scheme_https: bool,
    host: String,
    port: u16,
    token_file: Option<PathBuf>,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.scheme_https { "https" } else { "http" };
        write!(f, "{scheme}://{}:{}", self.host, self.port)
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

impl ApiServer {
    /// From the in-cluster environment: `KUBERNETES_SERVICE_HOST`/`_PORT`
    /// and the mounted ServiceAccount token and CA.
    pub fn in_cluster() -> anyhow::Result<ApiServer> {
        let host = std::env::var("KUBERNETES_SERVICE_HOST")
            .context("KUBERNETES_SERVICE_HOST is not set (not running in a pod?)")?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
        let host = if host.contains(':') { format!("[{host}]") } else { host };
        let dir = Path::new(SERVICE_ACCOUNT_DIR);
        ApiServer::new(
            &format!("https://{host}:{port}"),
            Some(&dir.join("token")),
            Some(&dir.join("ca.crt")),
        )
    }

    /// `url` is `http://host:port` or `https://host:port`; for https the CA
    /// file is required (the API server's certificate is cluster-issued).
    pub fn new(url: &str, token_file: Option<&Path>, ca_file: Option<&Path>) -> anyhow::Result<ApiServer> {
        let uri: http::Uri = url.parse().with_context(|| format!("API server URL {url:?}"))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => bail!("API server URL {url:?} must start with http:// or https://"),
        };
        let host = uri.host().context("API server URL has no host")?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tls = if https {
            let ca = ca_file.context("an https API server needs a CA file")?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca)
                .with_context(|| format!("reading {}", ca.display()))?
            {
                roots
                    .add(cert.with_context(|| format!("parsing {}", ca.display()))?)
                    .context("adding the API server CA")?;
            }
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots)
                .with_no_client_auth();
            Some(Arc::new(config))
        } else {
            None
        };
        if let Some(f) = token_file {
            std::fs::metadata(f).with_context(|| format!("token file {}", f.display()))?;
        }
        Ok(ApiServer {
            scheme_https: https,
            host,
            port,
            token_file: token_file.map(Path::to_path_buf),
            tls,
        })
    }

    async fn connect(&self) -> anyhow::Result<Box<dyn Io>> {
        let addr = (self.host.as_str(), self.port);
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .context("connecting to the API server timed out")?
            .with_context(|| format!("connecting to the API server {self:?}"))?;
        let _ = tcp.set_nodelay(true);
        let Some(tls) = &self.tls else {
            return Ok(Box::new(tcp));
        };
        let name = ServerName::try_from(self.host.clone()).context("API server name")?;
        let stream = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio_rustls::TlsConnector::from(tls.clone()).connect(name, tcp),
        )
        .await
        .context("TLS handshake with the API server timed out")?
        .context("TLS handshake with the API server")?;
        Ok(Box::new(stream))
    }

    /// One GET on a fresh connection; the connection lives as long as the body.
    pub(crate) async fn get(&self, path_and_query: &str) -> anyhow::Result<http::Response<Incoming>> {
        let io = self.connect().await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .context("HTTP handshake with the API server")?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let host = if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        };
        let mut req = http::Request::get(path_and_query)
            .header(http::header::HOST, host)
            .header(http::header::ACCEPT, "application/json")
            .header(http::header::USER_AGENT, "mesh-node");
        if let Some(file) = &self.token_file {
            let token = tokio::fs::read_to_string(file)
                .await
                .with_context(|| format!("reading token {}", file.display()))?;
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {}", token.trim()));
        }
        let req = req.body(Empty::<Bytes>::new())?;
        sender.send_request(req).await.context("API request")
    }
}

/// Reads a whole (non-streaming) body, bounded in size and time.
pub(crate) async fn read_body(body: Incoming, timeout: Duration) -> anyhow::Result<Bytes> {
    let collected = tokio::time::timeout(timeout, body.collect())
        .await
        .context("reading the API response timed out")?
        .context("reading the API response")?;
    Ok(collected.to_bytes())
}
