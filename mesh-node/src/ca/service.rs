//! `istio.v1.auth.IstioCertificateService/CreateCertificate`: authenticates the calling node
//! (static token, or TokenReview of its projected ServiceAccount token), allows only
//! identities of pods scheduled on it, and signs.
//!
//! Written against tonic's server building blocks rather than generated code (no protoc here);
//! it is the same shape tonic-build would emit for one unary method.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::watch;
use tonic::body::Body;
use tonic::metadata::MetadataMap;
use tonic::server::{NamedService, UnaryService};
use tonic::{Request, Response, Status};

use super::proto::{CREATE_CERTIFICATE_PATH, IstioCertificateRequest, IstioCertificateResponse, NODE_HEADER, SERVICE_NAME};
use super::limits::{KeyedLimiter, RequestLimits};
use super::review::TokenReviewer;
use super::signer::CaSigner;
use super::tokens::NodeTokens;
use crate::config::Cluster;
use crate::discovery::PodIndex;
use crate::identity::Identity;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// How a node proves which node it is.
pub(crate) enum NodeAuth {
    /// A per-node secret from the tokens file; the node names itself in `x-mesh-node`.
    Tokens(NodeTokens),
    /// Its projected ServiceAccount token, reviewed by the API server, which names the node.
    Review(Arc<TokenReviewer>),
}

/// Where the CA learns which pods run on which node.
pub(crate) enum PodSource {
    /// The watched config directory of file mode.
    Config(watch::Receiver<Arc<Cluster>>),
    /// Pods listed and watched from the API server.
    Api(PodIndex),
}

#[derive(Clone)]
pub(crate) struct CertificateService {
    state: Arc<State>,
}

struct State {
    signer: Arc<CaSigner>,
    auth: NodeAuth,
    pods: PodSource,
    limits: RequestLimits,
    /// Keyed `ip:<peer>` before authentication and `node:<name>` after.
    limiter: KeyedLimiter,
}

impl CertificateService {
    pub(crate) fn new(signer: Arc<CaSigner>, auth: NodeAuth, pods: PodSource, limits: RequestLimits) -> Self {
        CertificateService {
            state: Arc::new(State { signer, auth, pods, limits, limiter: KeyedLimiter::new(limits) }),
        }
    }
}

impl State {
    /// One request, bounded by the deadline: running out of time drops the work in progress
    /// (a TokenReview in flight included, see `review`).
    async fn create_certificate(&self, request: Request<IstioCertificateRequest>) -> Result<IstioCertificateResponse, Status> {
        let peer = request.extensions().get::<SocketAddr>().copied();
        let deadline = self.limits.deadline;
        match tokio::time::timeout(deadline, self.create_certificate_now(peer, request)).await {
            Ok(result) => result,
            Err(_) => {
                let who = peer.map(|p| p.ip().to_string()).unwrap_or_else(|| "?".into());
                Err(refuse(
                    &who,
                    Status::deadline_exceeded(format!("the CA did not finish the request within {deadline:?}; retry")),
                ))
            }
        }
    }

    /// Takes a token of `key`'s bucket or says how long to wait.
    fn admit(&self, key: &str, who: &str) -> Result<(), Status> {
        self.limiter.acquire(key, std::time::Instant::now()).map_err(|wait| {
            let l = self.limits;
            refuse(
                who,
                Status::resource_exhausted(format!(
                    "rate limit: {key} made more than {} requests at once or {}/s sustained; retry in {} ms",
                    l.burst,
                    l.per_second,
                    wait.as_millis().max(1)
                )),
            )
        })
    }

    async fn create_certificate_now(
        &self,
        peer: Option<SocketAddr>,
        request: Request<IstioCertificateRequest>,
    ) -> Result<IstioCertificateResponse, Status> {
        // Before authentication, which may cost a TokenReview: per source address.
        if let Some(peer) = peer {
            self.admit(&format!("ip:{}", peer.ip()), &peer.ip().to_string())?;
        }
        let node = self.authenticate(request.metadata()).await?;
        self.admit(&format!("node:{node}"), &node)?;
        let request = request.into_inner();
        let ttl = u64::try_from(request.validity_duration)
            .map(Duration::from_secs)
            .map_err(|_| refuse(&node, Status::invalid_argument("validity_duration is negative")))?;
        let signed = match &self.pods {
            PodSource::Config(cluster) => {
                let cluster = cluster.borrow().clone();
                self.signer.sign_csr(
                    &request.csr,
                    |id: &Identity| {
                        cluster
                            .pods_on_node(&node)
                            .any(|pod| pod.namespace == id.namespace && pod.service_account == id.service_account)
                    },
                    ttl,
                )
            }
            PodSource::Api(index) => {
                // Refusing now would be a wrong answer (the pod may well exist); the node
                // retries with backoff.
                if !index.is_ready() {
                    return Err(refuse(&node, Status::unavailable("the CA has not listed the cluster's pods yet; retry")));
                }
                let accounts = index.current();
                self.signer.sign_csr(
                    &request.csr,
                    |id: &Identity| accounts.has(&node, &id.namespace, &id.service_account),
                    ttl,
                )
            }
        };
        let chain = signed.map_err(|e| {
            let code = e.grpc_code();
            let message = match e {
                super::CaError::NotAllowed(id) => {
                    format!("identity {id} is not allowed for node {node}: no pod with that service account is scheduled on it")
                }
                other => other.to_string(),
            };
            refuse(&node, Status::new(code, message))
        })?;
        tracing::info!(node = %node, ttl = ?ttl, "signed a workload certificate");
        Ok(IstioCertificateResponse { cert_chain: chain })
    }

    /// The node name, once its credential checks out.
    async fn authenticate(&self, metadata: &MetadataMap) -> Result<String, Status> {
        let claimed = metadata.get(NODE_HEADER).and_then(|v| v.to_str().ok()).filter(|v| !v.is_empty());
        let token = metadata.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        match &self.auth {
            NodeAuth::Tokens(tokens) => {
                let node = claimed
                    .ok_or_else(|| refuse("?", Status::unauthenticated(format!("missing {NODE_HEADER} metadata"))))?;
                let token = token.ok_or_else(|| {
                    refuse(node, Status::unauthenticated("missing authorization: Bearer <token> metadata"))
                })?;
                if !tokens.authenticate(node, token.trim()) {
                    return Err(refuse(node, Status::unauthenticated(format!("invalid token for node {node}"))));
                }
                Ok(node.to_string())
            }
            NodeAuth::Review(reviewer) => {
                let who = claimed.unwrap_or("?");
                let token = token.map(str::trim).filter(|t| !t.is_empty()).ok_or_else(|| {
                    refuse(who, Status::unauthenticated("missing authorization: Bearer <ServiceAccount token> metadata"))
                })?;
                let reviewed =
                    reviewer.review(token).await.map_err(|e| refuse(who, Status::new(e.grpc_code(), e.to_string())))?;
                // The node name is the token's; a different claim is a misconfigured (or lying)
                // node, worth a clear refusal rather than silently using either name.
                if let Some(claimed) = claimed
                    && claimed != reviewed.node
                {
                    let e = super::review::ReviewError::NodeMismatch {
                        token_node: reviewed.node.clone(),
                        claimed: claimed.to_string(),
                    };
                    return Err(refuse(who, Status::new(e.grpc_code(), e.to_string())));
                }
                Ok(reviewed.node)
            }
        }
    }
}

/// Every refusal is logged on the CA with the node and reason, then returned.
fn refuse(node: &str, status: Status) -> Status {
    tracing::warn!(node = %node, code = ?status.code(), "certificate request refused: {}", status.message());
    status
}

impl NamedService for CertificateService {
    const NAME: &'static str = SERVICE_NAME;
}

struct CreateCertificate(Arc<State>);

impl UnaryService<IstioCertificateRequest> for CreateCertificate {
    type Response = IstioCertificateResponse;
    type Future = BoxFuture<Result<Response<IstioCertificateResponse>, Status>>;

    fn call(&mut self, request: Request<IstioCertificateRequest>) -> Self::Future {
        let state = self.0.clone();
        // Signing is a few hundred microseconds of CPU: not worth a blocking-pool hop.
        Box::pin(async move { state.create_certificate(request).await.map(Response::new) })
    }
}

impl<B> tower::Service<http::Request<B>> for CertificateService
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != CREATE_CERTIFICATE_PATH {
            let status = Status::unimplemented(format!("no method {}", request.uri().path()));
            return Box::pin(async move { Ok(status.into_http()) });
        }
        let state = self.state.clone();
        Box::pin(async move {
            let codec = tonic_prost::ProstCodec::<IstioCertificateResponse, IstioCertificateRequest>::default();
            let mut grpc = tonic::server::Grpc::new(codec);
            Ok(grpc.unary(CreateCertificate(state), request).await)
        })
    }
}
