//! Node authentication of Kubernetes mode: the node proxy presents its projected
//! ServiceAccount token (audience `mesh-ca`), the CA asks the API server about it with a
//! `authentication.k8s.io/v1` TokenReview and trusts the node name the API server binds into
//! it (`authentication.kubernetes.io/node-name`, Kubernetes 1.30+). No secret per node exists
//! anywhere: kubelet mints, binds and rotates the tokens.
//!
//! Positive reviews are cached for a short, bounded time by token hash: every node renews one
//! certificate per identity at about the same moment (and all of them at start), which would
//! otherwise be one review each. Refusals are cached for a shorter time, so a bad token costs
//! one review per interval. Concurrent requests with the same token wait for one review.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use serde_json::Value;

use crate::discovery::{ApiError, ApiServer};

/// The request, as errors name it.
const REVIEW: &str = "POST /apis/authentication.k8s.io/v1/tokenreviews";
/// Where the API server puts the node a bound token's pod runs on.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
const SERVICE_ACCOUNT_PREFIX: &str = "system:serviceaccount:";

/// What the CA accepts in Kubernetes mode.
#[derive(Debug, Clone)]
pub struct ReviewOptions {
    /// The audience node tokens must be minted for (the DaemonSet's projected token).
    pub audience: String,
    /// ServiceAccounts of the node proxies, as `namespace/name`.
    pub node_service_accounts: Vec<String>,
    /// How long a positive review is reused; zero disables the cache.
    pub cache_ttl: Duration,
    /// How long a refusal (not an API server failure) is reused; zero disables it.
    pub negative_cache_ttl: Duration,
    /// Most tokens remembered at once, accepted and refused each (a few per node: the current
    /// one and a rotated one).
    pub cache_max: usize,
    /// Deadline of one review request.
    pub timeout: Duration,
}

impl Default for ReviewOptions {
    fn default() -> ReviewOptions {
        ReviewOptions {
            audience: "mesh-ca".into(),
            node_service_accounts: vec!["mesh-system/mesh-node".into()],
            cache_ttl: Duration::from_secs(60),
            negative_cache_ttl: Duration::from_secs(10),
            cache_max: 4096,
            // Under the node's 10 s request deadline, so it sees why rather than a timeout.
            timeout: Duration::from_secs(5),
        }
    }
}

/// Why a node token was refused; each maps to the gRPC status the node gets.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReviewError {
    #[error("token rejected by the Kubernetes API server: {0}")]
    NotAuthenticated(String),
    #[error("token is not valid for audience {expected:?} (the API server accepted it for {got:?})")]
    Audience { expected: String, got: Vec<String> },
    #[error("token belongs to {user:?}, not to a node proxy ServiceAccount ({expected})")]
    ServiceAccount { user: String, expected: String },
    #[error(
        "token of {user:?} carries no {NODE_NAME_EXTRA} (needs a pod-bound projected token and Kubernetes 1.30 or newer)"
    )]
    NoNodeName { user: String },
    #[error("token is bound to node {token_node:?} but the request names node {claimed:?}")]
    NodeMismatch { token_node: String, claimed: String },
    #[error("TokenReview failed: {0}")]
    Api(String),
}

impl ReviewError {
    pub fn grpc_code(&self) -> tonic::Code {
        match self {
            ReviewError::NotAuthenticated(_) | ReviewError::Audience { .. } => tonic::Code::Unauthenticated,
            ReviewError::ServiceAccount { .. } | ReviewError::NoNodeName { .. } | ReviewError::NodeMismatch { .. } => {
                tonic::Code::PermissionDenied
            }
            // The node retries with backoff; the API server is likely back by then.
            ReviewError::Api(_) => tonic::Code::Unavailable,
        }
    }
}

impl From<ApiError> for ReviewError {
    fn from(e: ApiError) -> ReviewError {
        ReviewError::Api(e.to_string())
    }
}

/// An authenticated node proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReviewedNode {
    pub node: String,
    /// `system:serviceaccount:<namespace>:<name>`.
    pub user: String,
}

type TokenHash = [u8; 32];

struct Cached {
    node: ReviewedNode,
    until: Instant,
}

struct Refused {
    error: ReviewError,
    until: Instant,
}

type Gates = std::sync::Mutex<HashMap<TokenHash, Arc<tokio::sync::Mutex<()>>>>;

/// A place in the queue of one token's review. Dropping it, on completion or cancellation,
/// removes the token's entry once nobody else holds or waits for it.
struct InFlight<'a> {
    gates: &'a Gates,
    hash: TokenHash,
    gate: Option<Arc<tokio::sync::Mutex<()>>>,
}

impl<'a> InFlight<'a> {
    fn join(gates: &'a Gates, hash: TokenHash) -> InFlight<'a> {
        let gate = gates.lock().unwrap_or_else(|e| e.into_inner()).entry(hash).or_default().clone();
        InFlight { gates, hash, gate: Some(gate) }
    }

    fn gate(&self) -> &tokio::sync::Mutex<()> {
        self.gate.as_ref().expect("present until dropped")
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut gates = self.gates.lock().unwrap_or_else(|e| e.into_inner());
        let gate = self.gate.take();
        // Only the map's entry and this one left (others join under the same lock).
        if gate.is_some_and(|g| Arc::strong_count(&g) <= 2) {
            gates.remove(&self.hash);
        }
    }
}

/// Inserts into a map bounded at `max` entries: expired ones go first, then the one expiring
/// soonest. `max` 0 keeps nothing.
fn bounded_insert<V>(
    map: &std::sync::Mutex<HashMap<TokenHash, V>>,
    hash: TokenHash,
    value: V,
    max: usize,
    now: Instant,
    until: impl Fn(&V) -> Instant,
) {
    if max == 0 {
        return;
    }
    let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
    if map.len() >= max && !map.contains_key(&hash) {
        map.retain(|_, v| until(v) > now);
    }
    if map.len() >= max
        && !map.contains_key(&hash)
        && let Some(soonest) = map.iter().min_by_key(|(_, v)| until(v)).map(|(k, _)| *k)
    {
        map.remove(&soonest);
    }
    map.insert(hash, value);
}

pub(crate) struct TokenReviewer {
    api: ApiServer,
    options: ReviewOptions,
    /// `system:serviceaccount:<ns>:<name>` of each accepted ServiceAccount.
    users: Vec<String>,
    cache: std::sync::Mutex<HashMap<TokenHash, Cached>>,
    refused: std::sync::Mutex<HashMap<TokenHash, Refused>>,
    /// One lock per token under review, so a burst with one token makes one review.
    in_flight: Gates,
}

impl TokenReviewer {
    /// Fails on a malformed `namespace/name`.
    pub(crate) fn new(api: ApiServer, options: ReviewOptions) -> Result<TokenReviewer, String> {
        let users = options
            .node_service_accounts
            .iter()
            .map(|sa| match sa.split_once('/') {
                Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                    Ok(format!("{SERVICE_ACCOUNT_PREFIX}{ns}:{name}"))
                }
                _ => Err(format!("node ServiceAccount {sa:?} is not namespace/name")),
            })
            .collect::<Result<Vec<_>, _>>()?;
        if users.is_empty() {
            return Err("at least one node ServiceAccount is needed".into());
        }
        if options.audience.is_empty() {
            return Err("the token audience is empty".into());
        }
        Ok(TokenReviewer {
            api,
            options,
            users,
            cache: Default::default(),
            refused: Default::default(),
            in_flight: Default::default(),
        })
    }

    /// The node `token` was issued to, from the cache or a review. A refusal is remembered
    /// briefly too (`negative_cache_ttl`), so a node retrying with a bad token, or anyone
    /// replaying one, costs the API server one review per interval. Cancelling this future
    /// (a request deadline, a client gone) leaves nothing behind.
    pub(crate) async fn review(&self, token: &str) -> Result<ReviewedNode, ReviewError> {
        let hash = hash(token);
        if let Some(hit) = self.cached(&hash) {
            return hit;
        }
        let gate = InFlight::join(&self.in_flight, hash);
        let _turn = gate.gate().lock().await;
        // Whoever held the gate before may have just reviewed this very token.
        if let Some(hit) = self.cached(&hash) {
            return hit;
        }
        let result = self.ask(token).await;
        match &result {
            Ok(node) => self.remember(hash, node.clone(), token),
            // The API server's own trouble says nothing about the token: asked again next time.
            Err(ReviewError::Api(_)) => {}
            Err(refusal) => self.remember_refusal(hash, refusal.clone()),
        }
        result
    }

    fn cached(&self, hash: &TokenHash) -> Option<Result<ReviewedNode, ReviewError>> {
        let now = Instant::now();
        if let Some(hit) = self.cache.lock().unwrap_or_else(|e| e.into_inner()).get(hash).filter(|c| c.until > now) {
            return Some(Ok(hit.node.clone()));
        }
        let refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        refused.get(hash).filter(|r| r.until > now).map(|r| Err(r.error.clone()))
    }

    fn remember(&self, hash: TokenHash, node: ReviewedNode, token: &str) {
        let mut ttl = self.options.cache_ttl;
        // Never past the token's own expiry: an expired token must be refused, cached or not
        // (one already past it is not cached at all).
        if let Some(exp) = jwt_expiry(token) {
            ttl = ttl.min(exp.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO));
        }
        // A token accepted now is no longer refused.
        self.refused.lock().unwrap_or_else(|e| e.into_inner()).remove(&hash);
        if ttl.is_zero() {
            return;
        }
        let now = Instant::now();
        bounded_insert(&self.cache, hash, Cached { node, until: now + ttl }, self.options.cache_max, now, |c| c.until);
    }

    /// Refusals live in their own map: a flood of junk tokens cannot evict the nodes' good ones.
    fn remember_refusal(&self, hash: TokenHash, error: ReviewError) {
        let ttl = self.options.negative_cache_ttl;
        if ttl.is_zero() {
            return;
        }
        let now = Instant::now();
        bounded_insert(&self.refused, hash, Refused { error, until: now + ttl }, self.options.cache_max, now, |r| r.until);
    }

    #[cfg(test)]
    pub(crate) fn in_flight_len(&self) -> usize {
        self.in_flight.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    async fn ask(&self, token: &str) -> Result<ReviewedNode, ReviewError> {
        let request = TokenReview {
            metadata: Default::default(),
            spec: TokenReviewSpec { audiences: Some(vec![self.options.audience.clone()]), token: Some(token.to_string()) },
            status: None,
        };
        // The client discovery's pod index uses too: the CA's own credentials, one connection pool.
        let reviews: kube::Api<TokenReview> = kube::Api::all(self.api.client()?);
        let timeout = self.options.timeout;
        let answer = tokio::time::timeout(timeout, reviews.create(&kube::api::PostParams::default(), &request))
            .await
            .map_err(|_| ReviewError::Api(format!("{REVIEW} on {:?}: no answer in {timeout:?}", self.api)))?
            .map_err(|e| self.api.error(REVIEW, &e))?;
        self.judge(answer.status.unwrap_or_default())
    }

    /// The checks, in the order a misconfiguration is most usefully named.
    fn judge(&self, status: TokenReviewStatus) -> Result<ReviewedNode, ReviewError> {
        if status.authenticated != Some(true) {
            let why = status.error.filter(|e| !e.is_empty()).unwrap_or_else(|| "not authenticated".into());
            return Err(ReviewError::NotAuthenticated(why));
        }
        // An empty list would mean the API server ignored the audience (the token is then one
        // for the API server itself): accept only an explicit match.
        let audiences = status.audiences.unwrap_or_default();
        if !audiences.contains(&self.options.audience) {
            return Err(ReviewError::Audience { expected: self.options.audience.clone(), got: audiences });
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        if !self.users.contains(&username) {
            return Err(ReviewError::ServiceAccount { user: username, expected: self.users.join(", ") });
        }
        let node = user
            .extra
            .and_then(|mut extra| extra.remove(NODE_NAME_EXTRA))
            .and_then(|names| names.into_iter().find(|n| !n.is_empty()));
        match node {
            Some(node) => Ok(ReviewedNode { node, user: username }),
            None => Err(ReviewError::NoNodeName { user: username }),
        }
    }
}

fn hash(token: &str) -> TokenHash {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// The `exp` claim of a JWT, read without verifying it (the API server verified the token;
/// this only bounds how long its answer is reused).
fn jwt_expiry(token: &str) -> Option<SystemTime> {
    let payload = token.split('.').nth(1)?;
    let claims: Value = serde_json::from_slice(&base64url_decode(payload)?).ok()?;
    let exp = claims.get("exp")?.as_u64()?;
    Some(UNIX_EPOCH + Duration::from_secs(exp))
}

/// Unpadded (or padded) base64url, as JWT segments are.
fn base64url_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text.trim_end_matches('=').bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_expiry_of_a_jwt() {
        // {"alg":"none"} . {"aud":["mesh-ca"],"exp":1900000000} . (no signature)
        let token = "eyJhbGciOiJub25lIn0.eyJhdWQiOlsibWVzaC1jYSJdLCJleHAiOjE5MDAwMDAwMDB9.";
        assert_eq!(jwt_expiry(token), Some(UNIX_EPOCH + Duration::from_secs(1_900_000_000)));
        assert_eq!(jwt_expiry("opaque-static-token"), None);
        assert_eq!(jwt_expiry("a.b!c.d"), None);
        assert_eq!(base64url_decode("aGk").as_deref(), Some(&b"hi"[..]));
        assert_eq!(base64url_decode("_-8").as_deref(), Some(&[0xff, 0xef][..]));
    }

    /// An API server that accepts connections and never answers: reviews hang until cancelled.
    #[tokio::test]
    async fn cancelled_reviews_leave_no_in_flight_entry() {
        let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let api = ApiServer::new(&format!("http://{}", silent.local_addr().expect("addr")), None, None).expect("api");
        let reviewer = Arc::new(TokenReviewer::new(api, ReviewOptions::default()).expect("reviewer"));
        // One token reviewed by two callers at once (the second waits on the first), and
        // another token: all cancelled by a deadline, as the CA's request deadline does.
        let mut calls = tokio::task::JoinSet::new();
        for token in ["tok-1", "tok-1", "tok-2"] {
            let reviewer = reviewer.clone();
            calls.spawn(async move { tokio::time::timeout(Duration::from_millis(300), reviewer.review(token)).await.is_err() });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(reviewer.in_flight_len(), 2, "two tokens under review");
        while let Some(timed_out) = calls.join_next().await {
            assert!(timed_out.expect("task"), "the silent API server never answers");
        }
        assert_eq!(reviewer.in_flight_len(), 0, "cancelled reviews removed their entries");
        // A task aborted mid-review (a client gone) cleans up too.
        let r = reviewer.clone();
        let task = tokio::spawn(async move { r.review("tok-3").await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(reviewer.in_flight_len(), 1);
        task.abort();
        let _ = task.await;
        assert_eq!(reviewer.in_flight_len(), 0);
    }

    #[test]
    fn node_service_accounts_must_be_namespace_slash_name() {
        let api = ApiServer::new("http://127.0.0.1:1", None, None).expect("api");
        let with = |sa: &str| ReviewOptions { node_service_accounts: vec![sa.into()], ..ReviewOptions::default() };
        for bad in ["mesh-node", "/mesh-node", "mesh-system/", "a/b/c"] {
            let err = TokenReviewer::new(api.clone(), with(bad)).err().expect("refused");
            assert!(err.contains(&format!("{bad:?} is not namespace/name")), "{err}");
        }
        let ok = TokenReviewer::new(api, with("kube-system/mesh")).expect("ok");
        assert_eq!(ok.users, ["system:serviceaccount:kube-system:mesh"]);
    }
}
