//! A minimal Kubernetes API client: GET (list/watch) and POST (reviews) over
//! HTTP/1.1, TLS with the cluster CA in-cluster, bearer token re-read per
//! request (projected tokens rotate).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// Where kubelet mounts a pod's ServiceAccount token and the cluster CA.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What went wrong talking to the API server, or setting up to.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("KUBERNETES_SERVICE_HOST is not set (not running in a pod?); pass --api-server URL")]
    NotInCluster,
    #[error("API server URL {url:?}: {message}")]
    Url { url: String, message: String },
    #[error("{what} {path}: {message}")]
    File { what: &'static str, path: String, message: String },
    #[error("connecting to the API server {server}: {message}")]
    Connect { server: String, message: String },
    #[error("TLS handshake with the API server {server}: {message}")]
    Tls { server: String, message: String },
    #[error("{method} {path}: {message}")]
    Http { method: &'static str, path: String, message: String },
    #[error("{method} {path}: {status}: {body}")]
    Status { method: &'static str, path: String, status: http::StatusCode, body: String },
    #[error("{method} {path}: invalid JSON: {message}")]
    Json { method: &'static str, path: String, message: String },
    #[error("watch {path}: {message}")]
    Watch { path: String, message: String },
}

impl ApiError {
    fn file(what: &'static str, path: &Path, e: impl std::fmt::Display) -> ApiError {
        ApiError::File { what, path: path.display().to_string(), message: e.to_string() }
    }
}

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
    pub fn in_cluster() -> Result<ApiServer, ApiError> {
        ApiServer::in_cluster_from(
            std::env::var("KUBERNETES_SERVICE_HOST").ok().as_deref(),
            std::env::var("KUBERNETES_SERVICE_PORT").ok().as_deref(),
            Path::new(SERVICE_ACCOUNT_DIR),
        )
    }

    /// [`ApiServer::in_cluster`] with the environment and the ServiceAccount
    /// directory given: `token` and `ca.crt` are read from `sa_dir`.
    pub fn in_cluster_from(host: Option<&str>, port: Option<&str>, sa_dir: &Path) -> Result<ApiServer, ApiError> {
        let host = host.filter(|h| !h.is_empty()).ok_or(ApiError::NotInCluster)?;
        let port = port.filter(|p| !p.is_empty()).unwrap_or("443");
        let host = if host.contains(':') { format!("[{host}]") } else { host.to_string() };
        ApiServer::new(&format!("https://{host}:{port}"), Some(&sa_dir.join("token")), Some(&sa_dir.join("ca.crt")))
    }

    /// `url` is `http://host:port` or `https://host:port`; for https the CA
    /// file is required (the API server's certificate is cluster-issued).
    pub fn new(url: &str, token_file: Option<&Path>, ca_file: Option<&Path>) -> Result<ApiServer, ApiError> {
        let bad_url = |message: &str| ApiError::Url { url: url.to_string(), message: message.to_string() };
        let uri: http::Uri = url.parse().map_err(|e: http::uri::InvalidUri| bad_url(&e.to_string()))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(bad_url("must start with http:// or https://")),
        };
        let host = uri.host().ok_or_else(|| bad_url("has no host"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tls = if https {
            let ca = ca_file.ok_or_else(|| bad_url("an https API server needs a CA file"))?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca).map_err(|e| ApiError::file("API server CA", ca, e))? {
                let cert = cert.map_err(|e| ApiError::file("API server CA", ca, e))?;
                roots.add(cert).map_err(|e| ApiError::file("API server CA", ca, e))?;
            }
            if roots.is_empty() {
                return Err(ApiError::file("API server CA", ca, "no PEM certificate in it"));
            }
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| ApiError::file("API server CA", ca, e))?
                .with_root_certificates(roots)
                .with_no_client_auth();
            Some(Arc::new(config))
        } else {
            None
        };
        if let Some(f) = token_file {
            std::fs::metadata(f).map_err(|e| ApiError::file("API token file", f, e))?;
        }
        Ok(ApiServer { scheme_https: https, host, port, token_file: token_file.map(Path::to_path_buf), tls })
    }

    async fn connect(&self) -> Result<Box<dyn Io>, ApiError> {
        let addr = (self.host.as_str(), self.port);
        let connect_err = |message: String| ApiError::Connect { server: format!("{self:?}"), message };
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| connect_err(format!("timed out after {CONNECT_TIMEOUT:?}")))?
            .map_err(|e| connect_err(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let Some(tls) = &self.tls else {
            return Ok(Box::new(tcp));
        };
        let tls_err = |message: String| ApiError::Tls { server: format!("{self:?}"), message };
        // An IP host (KUBERNETES_SERVICE_HOST is one) is checked against the certificate's IP
        // SANs, a name against its DNS SANs.
        let name = ServerName::try_from(self.host.clone()).map_err(|e| tls_err(e.to_string()))?;
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, tokio_rustls::TlsConnector::from(tls.clone()).connect(name, tcp))
            .await
            .map_err(|_| tls_err(format!("timed out after {CONNECT_TIMEOUT:?}")))?
            .map_err(|e| tls_err(e.to_string()))?;
        Ok(Box::new(stream))
    }

    /// One request on a fresh connection; the connection lives as long as the body.
    async fn request(
        &self,
        method: &'static str,
        path_and_query: &str,
        body: Option<Bytes>,
    ) -> Result<http::Response<Incoming>, ApiError> {
        let http_err = |message: String| ApiError::Http { method, path: path_and_query.to_string(), message };
        let io = self.connect().await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(io)).await.map_err(|e| http_err(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let host =
            if self.host.contains(':') { format!("[{}]:{}", self.host, self.port) } else { format!("{}:{}", self.host, self.port) };
        let mut req = http::Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(http::header::HOST, host)
            .header(http::header::ACCEPT, "application/json")
            .header(http::header::USER_AGENT, "mesh-node");
        if let Some(file) = &self.token_file {
            let token = tokio::fs::read_to_string(file).await.map_err(|e| ApiError::file("API token file", file, e))?;
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {}", token.trim()));
        }
        if body.is_some() {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
        }
        let req = req.body(Full::new(body.unwrap_or_default())).map_err(|e| http_err(e.to_string()))?;
        sender.send_request(req).await.map_err(|e| http_err(e.to_string()))
    }

    /// One GET; the response body streams (watches).
    pub(crate) async fn get(&self, path_and_query: &str) -> Result<http::Response<Incoming>, ApiError> {
        self.request("GET", path_and_query, None).await
    }

    /// POSTs `body` as JSON and returns the decoded answer; a non-2xx status is an error
    /// carrying the start of the server's message.
    pub(crate) async fn post_json<T: serde::Serialize, R: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &T,
        timeout: Duration,
    ) -> Result<R, ApiError> {
        let json_err = |message: String| ApiError::Json { method: "POST", path: path.to_string(), message };
        let body = serde_json::to_vec(body).map_err(|e| json_err(e.to_string()))?;
        let resp = tokio::time::timeout(timeout, self.request("POST", path, Some(Bytes::from(body))))
            .await
            .map_err(|_| ApiError::Http { method: "POST", path: path.to_string(), message: format!("no answer in {timeout:?}") })??;
        let status = resp.status();
        let bytes = read_body(resp.into_body(), timeout)
            .await
            .map_err(|message| ApiError::Http { method: "POST", path: path.to_string(), message })?;
        if !status.is_success() {
            return Err(ApiError::Status { method: "POST", path: path.to_string(), status, body: snippet(&bytes) });
        }
        serde_json::from_slice(&bytes).map_err(|e| json_err(e.to_string()))
    }
}

/// The start of a response body, for error messages.
pub(crate) fn snippet(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(512)]).trim().to_string()
}

/// Reads a whole (non-streaming) body, bounded in time.
pub(crate) async fn read_body(body: Incoming, timeout: Duration) -> Result<Bytes, String> {
    let collected = tokio::time::timeout(timeout, body.collect())
        .await
        .map_err(|_| format!("reading the response timed out after {timeout:?}"))?
        .map_err(|e| format!("reading the response: {e}"))?;
    Ok(collected.to_bytes())
}
