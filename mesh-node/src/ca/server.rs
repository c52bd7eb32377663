//! The CA's gRPC endpoint over TLS 1.3. The serving certificate is issued from the CA's own
//! root for the CA's SPIFFE ID, so nodes trust it with nothing but the root file.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::ServerConfig;
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use super::error::CaError;
use super::limits::RequestLimits;
use super::review::{ReviewOptions, TokenReviewer};
use super::service::{CertificateService, NodeAuth, PodSource};
use super::signer::{CaSigner, TtlPolicy};
use super::store::{self, ROOT_CERT_FILE};
use super::tokens::NodeTokens;
use crate::config::{Cluster, spawn_watcher};
use crate::discovery::ApiServer;
use crate::identity::tls::{ALPN_H2, crypto_provider};

/// The serving certificate is not rotated while the CA runs; a year outlives any sane run and
/// a restart issues a new one.
const SERVING_CERT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the CA learns which pods run on which node.
#[derive(Debug, Clone)]
pub enum PodsFrom {
    /// A watched directory of Kubernetes-style YAML (file mode).
    ConfigDir(PathBuf),
    /// List and watch Pods on this API server.
    Kubernetes(ApiServer),
}

/// How node proxies authenticate.
#[derive(Debug, Clone)]
pub enum NodeAuthOptions {
    /// A YAML map of node name to token.
    TokensFile(PathBuf),
    /// Projected ServiceAccount tokens checked with TokenReview on this API server.
    TokenReview { api: ApiServer, review: ReviewOptions },
}

#[derive(Debug, Clone)]
pub struct CaOptions {
    pub listen: SocketAddr,
    /// Holds the generated root key, and `root-cert.pem` for nodes in every case.
    pub state_dir: PathBuf,
    /// Pods say which node runs which service account.
    pub pods: PodsFrom,
    pub auth: NodeAuthOptions,
    pub trust_domain: String,
    pub ttl: TtlPolicy,
    /// A provided CA instead of a generated root: certificate chain (signing cert first, root
    /// last) and the signing key. Both or neither.
    pub root_cert: Option<PathBuf>,
    pub root_key: Option<PathBuf>,
    /// Extra DNS names or IPs for the serving certificate (how nodes reach the CA). The listen
    /// IP, loopback and `localhost` are always included.
    pub extra_sans: Vec<String>,
    /// How often the config directory is checked (file mode).
    pub config_poll: Duration,
    /// List/watch tunables (Kubernetes mode).
    pub discovery: crate::discovery::Options,
    /// Per-node request budgets and the request deadline.
    pub limits: RequestLimits,
    /// Roots published next to the signing root in `root-cert.pem` (PEM file): the other
    /// root of a rotation, trusted by nodes while both are in use.
    pub extra_roots: Option<PathBuf>,
}

impl CaOptions {
    /// File mode with the defaults of the CLI for everything but the paths.
    pub fn new(listen: SocketAddr, state_dir: PathBuf, config_dir: PathBuf, tokens_file: PathBuf) -> CaOptions {
        CaOptions::with(listen, state_dir, PodsFrom::ConfigDir(config_dir), NodeAuthOptions::TokensFile(tokens_file))
    }

    /// Kubernetes mode: pods from `api`, node tokens reviewed by it, CLI defaults otherwise.
    pub fn kubernetes(listen: SocketAddr, state_dir: PathBuf, api: ApiServer) -> CaOptions {
        let auth = NodeAuthOptions::TokenReview { api: api.clone(), review: ReviewOptions::default() };
        CaOptions::with(listen, state_dir, PodsFrom::Kubernetes(api), auth)
    }

    pub fn with(listen: SocketAddr, state_dir: PathBuf, pods: PodsFrom, auth: NodeAuthOptions) -> CaOptions {
        CaOptions {
            listen,
            state_dir,
            pods,
            auth,
            trust_domain: crate::identity::DEFAULT_TRUST_DOMAIN.to_string(),
            ttl: TtlPolicy::default(),
            root_cert: None,
            root_key: None,
            extra_sans: Vec::new(),
            config_poll: Duration::from_millis(500),
            discovery: crate::discovery::Options::default(),
            limits: RequestLimits::default(),
            extra_roots: None,
        }
    }
}

/// A bound, not yet serving CA. Bind first to learn the address (port 0), then [`CaServer::run`].
pub struct CaServer {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    service: CertificateService,
    local_addr: SocketAddr,
    root_cert_path: PathBuf,
}

impl CaServer {
    /// Loads or creates the root, the node credentials and the pod source, and binds the
    /// listener. Must be called inside a Tokio runtime (the config watcher or the pod
    /// list/watch starts here).
    pub async fn bind(opts: CaOptions) -> Result<CaServer, CaError> {
        let signer = Arc::new(load_signer(&opts)?.with_ttl_policy(opts.ttl));
        let auth = match &opts.auth {
            NodeAuthOptions::TokensFile(path) => {
                let tokens = NodeTokens::load(path)?;
                if tokens.is_empty() {
                    tracing::warn!(path = %path.display(), "no node tokens: every request will be refused");
                }
                tracing::info!(path = %path.display(), nodes = tokens.len(), "nodes authenticate with static tokens");
                NodeAuth::Tokens(tokens)
            }
            NodeAuthOptions::TokenReview { api, review } => {
                let reviewer = Arc::new(TokenReviewer::new(api.clone(), review.clone()).map_err(CaError::Review)?);
                tracing::info!(
                    api_server = ?api,
                    audience = %review.audience,
                    service_accounts = ?review.node_service_accounts,
                    "nodes authenticate with ServiceAccount tokens (TokenReview)"
                );
                NodeAuth::Review(reviewer)
            }
        };
        let pods = match &opts.pods {
            PodsFrom::ConfigDir(dir) => {
                let cluster = Cluster::load_dir(dir).map_err(|e| CaError::Config(e.to_string()))?;
                let watcher = spawn_watcher(dir.clone(), Arc::new(cluster), opts.config_poll);
                PodSource::Config(watcher.map_err(|e| CaError::Config(format!("starting the config watcher thread: {e}")))?)
            }
            PodsFrom::Kubernetes(api) => {
                tracing::info!(api_server = ?api, "pods from the Kubernetes API");
                PodSource::Api(crate::discovery::spawn_pod_index(api.clone(), opts.discovery.clone()))
            }
        };

        let listener = TcpListener::bind(opts.listen)
            .await
            .map_err(|e| CaError::Listen { addr: opts.listen.to_string(), message: e.to_string() })?;
        let local_addr = listener
            .local_addr()
            .map_err(|e| CaError::Listen { addr: opts.listen.to_string(), message: e.to_string() })?;
        let acceptor = TlsAcceptor::from(Arc::new(serving_config(&signer, local_addr.ip(), &opts.extra_sans)?));
        Ok(CaServer {
            listener,
            acceptor,
            service: CertificateService::new(signer, auth, pods, opts.limits),
            local_addr,
            root_cert_path: opts.state_dir.join(ROOT_CERT_FILE),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The trust anchor nodes should be given.
    pub fn root_cert_path(&self) -> &Path {
        &self.root_cert_path
    }

    /// Serves until `shutdown` completes, then stops accepting, tells connected nodes to go
    /// away (HTTP/2 GOAWAY) and returns once their requests are done.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), CaError> {
        tracing::info!(addr = %self.local_addr, root = %self.root_cert_path.display(), "mesh CA listening");
        let (tx, rx) = mpsc::channel(16);
        let accept = tokio::spawn(accept_loop(self.listener, self.acceptor, tx));
        // One service, so no router: the service answers UNIMPLEMENTED for other paths.
        let result = tonic::transport::Server::builder()
            .serve_with_incoming_shutdown(self.service, ReceiverStream::new(rx), shutdown)
            .await;
        accept.abort();
        result.map_err(|e| CaError::Serve(e.to_string()))
    }
}

/// Binds and serves until `shutdown`: `mesh-node ca` in-process.
pub async fn serve(opts: CaOptions, shutdown: impl Future<Output = ()>) -> Result<(), CaError> {
    CaServer::bind(opts).await?.run(shutdown).await
}

/// Loads the signer and publishes the trust bundle (its root, then `--extra-roots`).
fn load_signer(opts: &CaOptions) -> Result<CaSigner, CaError> {
    let signer = match (&opts.root_cert, &opts.root_key) {
        (None, None) => CaSigner::load_or_create(&opts.state_dir, &opts.trust_domain)?,
        (Some(cert), Some(key)) => {
            let cert_pem = std::fs::read_to_string(cert).map_err(|e| CaError::file(cert, e))?;
            let key_pem = std::fs::read_to_string(key).map_err(|e| CaError::file(key, e))?;
            let signer = CaSigner::from_pem(&cert_pem, &key_pem, &opts.trust_domain)?;
            tracing::info!(cert = %cert.display(), "using the provided CA certificate");
            signer
        }
        _ => return Err(CaError::Key("--root-cert and --root-key go together".into())),
    };
    let extra = match &opts.extra_roots {
        Some(path) => extra_roots(path, &signer.root_cert())?,
        None => Vec::new(),
    };
    let mut bundle = signer.root_pem();
    for root in &extra {
        bundle.push_str(&super::signer::to_pem(root));
    }
    store::write_root_cert(&opts.state_dir, &bundle)?;
    if !extra.is_empty() {
        tracing::info!(roots = 1 + extra.len(), "publishing a trust bundle with extra roots (root rotation)");
    }
    Ok(signer)
}

/// The roots of an `--extra-roots` file: CA certificates, the signing root itself left out.
fn extra_roots(path: &Path, own: &CertificateDer<'_>) -> Result<Vec<CertificateDer<'static>>, CaError> {
    use rustls_pki_types::pem::PemObject as _;
    let pem = std::fs::read(path).map_err(|e| CaError::file(path, e))?;
    let mut roots = Vec::new();
    for (i, cert) in CertificateDer::pem_slice_iter(&pem).enumerate() {
        let cert = cert.map_err(|e| CaError::file(path, format!("certificate {}: {e}", i + 1)))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
            .map_err(|e| CaError::file(path, format!("certificate {}: {e}", i + 1)))?;
        if !parsed.is_ca() {
            return Err(CaError::file(path, format!("certificate {} ({}) is not a CA", i + 1, parsed.subject())));
        }
        if cert.as_ref() != own.as_ref() && !roots.contains(&cert) {
            roots.push(cert);
        }
    }
    if roots.is_empty() && CertificateDer::pem_slice_iter(&pem).next().is_none() {
        return Err(CaError::file(path, "no certificate in the file"));
    }
    Ok(roots)
}

fn serving_config(signer: &CaSigner, listen_ip: IpAddr, extra: &[String]) -> Result<ServerConfig, CaError> {
    let mut sans = vec!["localhost".to_string()];
    let ips: Vec<IpAddr> = if listen_ip.is_unspecified() {
        vec![IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST)]
    } else {
        vec![listen_ip]
    };
    sans.extend(ips.iter().map(IpAddr::to_string));
    sans.extend(extra.iter().cloned());
    let identity = super::ca_identity(signer.trust_domain());
    let (chain, key) = signer.issue_with_key(&identity, &sans, SERVING_CERT_VALIDITY)?;
    let mut config = ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .and_then(|b| b.with_no_client_auth().with_single_cert(chain, key))
        .map_err(|e| CaError::Key(format!("serving certificate: {e}")))?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// Accepts and handshakes off the server's path, so one slow client cannot stall the others.
/// Ends when the server drops its end of `tx`.
async fn accept_loop(listener: TcpListener, acceptor: TlsAcceptor, tx: mpsc::Sender<Result<TlsConn, std::io::Error>>) {
    loop {
        let (tcp, peer) = tokio::select! {
            () = tx.closed() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!("CA accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    let _ = tx.send(Ok(TlsConn { inner: tls, peer })).await;
                }
                Ok(Err(e)) => tracing::warn!(peer = %peer, "CA TLS handshake failed: {e}"),
                Err(_) => tracing::warn!(peer = %peer, "CA TLS handshake timed out"),
            }
        });
    }
}

/// A TLS connection tonic can serve (it wants [`Connected`], which tokio-rustls streams only
/// get with tonic's own TLS features).
struct TlsConn {
    inner: TlsStream<TcpStream>,
    peer: SocketAddr,
}

impl Connected for TlsConn {
    type ConnectInfo = SocketAddr;

    fn connect_info(&self) -> SocketAddr {
        self.peer
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
