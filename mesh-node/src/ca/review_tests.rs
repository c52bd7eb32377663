//! Kubernetes mode of the CA against an in-process fake API server: TokenReview of the nodes'
//! projected tokens, pods from list + watch, caching of positive reviews, and the refusals a
//! node sees for each way its token can be wrong.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tokio::sync::oneshot;

use super::*;
use crate::discovery::ApiServer;
use crate::discovery::fake_api::Fake;
use crate::identity::{CaClient, CaClientConfig, Identity, IdentityError, new_csr};

const WAIT: Duration = Duration::from_secs(10);
/// The CA's own ServiceAccount token, which the fake API server requires.
const CA_CREDENTIAL: &str = "ca-credential";
const NODE_SA: &str = "system:serviceaccount:mesh-system:mesh-node";

/// What the fake API server knows of a token.
#[derive(Clone)]
struct Known {
    user: String,
    audiences: Vec<String>,
    node: Option<String>,
    /// An API server that ignores `spec.audiences` (answers without `status.audiences`).
    audience_unaware: bool,
}

impl Known {
    fn node_proxy(node: &str) -> Known {
        Known { user: NODE_SA.into(), audiences: vec!["mesh-ca".into()], node: Some(node.into()), audience_unaware: false }
    }
}

/// What the fake API server knows of tokens, and the reviews it was asked for.
#[derive(Default)]
struct TokenState {
    tokens: HashMap<String, Known>,
    /// Every TokenReview received: the token and the audiences asked for.
    reviews: Vec<(String, Vec<String>)>,
}

/// Discovery's fake API server (pods list/watch, every request recorded) with a TokenReview
/// endpoint answering as a real API server does.
#[derive(Clone)]
struct FakeApi {
    api: Fake,
    reviews: Arc<Mutex<TokenState>>,
}

const PODS: &str = "/api/v1/pods";

fn pod(name: &str, node: &str, account: &str) -> Value {
    json!({
        "metadata": {"namespace": "lemo-dev", "name": name, "uid": format!("uid-{name}")},
        "spec": {"nodeName": node, "serviceAccountName": account, "containers": [{"name": "app", "image": "app"}]},
        "status": {"phase": "Running", "podIP": "10.244.0.9"},
    })
}

impl FakeApi {
    fn new() -> FakeApi {
        let fake = FakeApi { api: Fake::serving(&[PODS]), reviews: Arc::default() };
        fake.api.state().accepted_tokens = Some(vec![CA_CREDENTIAL.into()]);
        fake.api.apply_at(PODS, "ADDED", pod("bff-0", "node-a", "bff"));
        fake.api.apply_at(PODS, "ADDED", pod("rank-0", "node-b", "rank"));
        fake.state().tokens.insert("tok-a".into(), Known::node_proxy("node-a"));
        let answer = fake.clone();
        fake.api.on_post(
            "/apis/authentication.k8s.io/v1/tokenreviews",
            Arc::new(move |request: &Value| (201, answer.review(request))),
        );
        fake
    }

    fn state(&self) -> std::sync::MutexGuard<'_, TokenState> {
        self.reviews.lock().unwrap()
    }

    fn reviews(&self) -> usize {
        self.state().reviews.len()
    }

    fn add_pod(&self, pod: Value) {
        self.api.apply_at(PODS, "ADDED", pod);
    }

    fn fail_pod_list(&self, fail: bool) {
        let mut st = self.api.state();
        st.fail_list.retain(|p| p != PODS);
        if fail {
            st.fail_list.push(PODS.into());
        }
    }

    fn review(&self, request: &Value) -> Value {
        let token = request.pointer("/spec/token").and_then(Value::as_str).unwrap_or("").to_string();
        let wanted: Vec<String> = request
            .pointer("/spec/audiences")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect())
            .unwrap_or_default();
        let mut st = self.state();
        st.reviews.push((token.clone(), wanted.clone()));
        // What a real API server answers in each case.
        let status = match st.tokens.get(&token) {
            None => json!({"user": {}, "error": "invalid bearer token"}),
            Some(k) => {
                let common: Vec<&String> = k.audiences.iter().filter(|a| wanted.contains(a)).collect();
                if !k.audience_unaware && common.is_empty() {
                    json!({"user": {}, "error": format!("token audiences {:?} is invalid for the target audiences {:?}", k.audiences, wanted)})
                } else {
                    let mut extra = json!({"authentication.kubernetes.io/pod-name": ["mesh-node-x"]});
                    if let Some(node) = &k.node {
                        extra["authentication.kubernetes.io/node-name"] = json!([node]);
                    }
                    let mut status = json!({
                        "authenticated": true,
                        "user": {"username": k.user, "uid": "u-1", "groups": ["system:serviceaccounts"], "extra": extra},
                    });
                    if !k.audience_unaware {
                        status["audiences"] = json!(common);
                    }
                    status
                }
            }
        };
        json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "metadata": {}, "spec": request["spec"], "status": status})
    }

    async fn serve(self) -> std::net::SocketAddr {
        self.api.serve(None).await
    }
}

/// The CA's files and the nodes' token files.
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        // As kubelet writes it: no line break.
        std::fs::write(dir.path().join("ca-credential"), CA_CREDENTIAL).expect("credential");
        Setup { dir }
    }

    fn path(&self, rel: &str) -> std::path::PathBuf {
        self.dir.path().join(rel)
    }

    /// Writes `token` as a node's projected token file and returns its name.
    fn token(&self, file: &str, token: &str) -> String {
        std::fs::write(self.path(file), token).expect("token");
        file.to_string()
    }

    fn options(&self, api: std::net::SocketAddr, review: ReviewOptions) -> CaOptions {
        let api = ApiServer::new(&format!("http://{api}"), Some(&self.path("ca-credential")), None).expect("api");
        let mut opts = CaOptions::kubernetes("127.0.0.1:0".parse().expect("addr"), self.path("state"), api.clone());
        opts.auth = NodeAuthOptions::TokenReview { api, review };
        opts.ttl = TtlPolicy { default: Duration::from_secs(3600), max: Duration::from_secs(3600) };
        opts.discovery = crate::discovery::Options {
            debounce: Duration::from_millis(10),
            backoff_initial: Duration::from_millis(10),
            backoff_max: Duration::from_millis(100),
            ..crate::discovery::Options::default()
        };
        opts
    }

    fn client(&self, ca: std::net::SocketAddr, node: &str, token_file: &str) -> CaClient {
        let roots = Arc::new(crate::identity::load_roots(&self.path("state/root-cert.pem")).expect("roots"));
        let config = CaClientConfig::new(ca.to_string(), node, self.path(token_file), self.path("state/root-cert.pem"), "cluster.local");
        CaClient::new(&config, roots).expect("client")
    }
}

struct Running {
    addr: std::net::SocketAddr,
    _stop: oneshot::Sender<()>,
}

async fn start(opts: CaOptions) -> Running {
    let server = CaServer::bind(opts).await.expect("CA bind");
    let addr = server.local_addr();
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(server.run(async {
        let _ = rx.await;
    }));
    Running { addr, _stop: tx }
}

fn id(sa: &str) -> Identity {
    Identity::in_default_domain("lemo-dev", sa)
}

async fn request(client: &CaClient, sa: &str) -> Result<Vec<String>, IdentityError> {
    let csr = new_csr(&id(sa)).expect("csr");
    client.create_certificate(&csr.csr_pem, Duration::from_secs(600)).await
}

/// The refusal's code and message.
fn refusal(result: Result<Vec<String>, IdentityError>) -> (tonic::Code, String) {
    match result {
        Err(IdentityError::Ca { code, message }) => (code, message),
        Err(other) => panic!("not a CA refusal: {other}"),
        Ok(_) => panic!("issued, expected a refusal"),
    }
}

/// Retries while the CA answers Unavailable (the node's rotation does the same).
async fn eventually(client: &CaClient, sa: &str) -> Result<Vec<String>, IdentityError> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match request(client, sa).await {
            Err(IdentityError::Ca { code: tonic::Code::Unavailable, .. } | IdentityError::Ca { code: tonic::Code::PermissionDenied, .. })
                if tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return other,
        }
    }
}

fn logs() {
    let _ = tracing_subscriber::fmt().with_test_writer().with_env_filter("mesh_node=info").try_init();
}

#[tokio::test]
async fn token_review_issues_for_the_token_nodes_pods_only() {
    logs();
    let fake = FakeApi::new();
    let api = fake.clone().serve().await;
    let setup = Setup::new();
    let ca = start(setup.options(api, ReviewOptions::default())).await;
    let node_a = setup.client(ca.addr, "node-a", &setup.token("node-a.token", "tok-a\n"));

    eventually(&node_a, "bff").await.expect("bff runs on node-a: issued");
    let csr = new_csr(&id("bff")).expect("csr");
    let chain = node_a.create_certificate(&csr.csr_pem, Duration::from_secs(600)).await.expect("issued");
    let cert = crate::identity::WorkloadCert::from_pem_chain(id("bff"), &chain, csr.key).expect("a bff certificate");
    assert!(cert.is_valid_at(SystemTime::now()));

    // rank runs on node-b only.
    let (code, message) = refusal(request(&node_a, "rank").await);
    assert_eq!(code, tonic::Code::PermissionDenied, "{message}");
    assert!(message.contains("spiffe://cluster.local/ns/lemo-dev/sa/rank is not allowed for node node-a"), "{message}");

    // What the API server saw: the node's token for the CA's audience, and the CA's own
    // credentials on every request.
    {
        let st = fake.state();
        assert!(st.reviews.iter().all(|(t, a)| t == "tok-a" && a == &["mesh-ca".to_string()]), "{:?}", st.reviews);
        let authorization = fake.api.authorizations();
        assert!(authorization.iter().all(|a| a.as_deref() == Some("Bearer ca-credential")), "{authorization:?}");
        // Pods and reviews went through one client: one token, one place it came from.
        assert!(authorization.len() > st.reviews.len(), "pod list and watch requests too");
    }

    // A pod scheduled later (watch event) is allowed once the CA sees it.
    let (code, _) = refusal(request(&node_a, "recall").await);
    assert_eq!(code, tonic::Code::PermissionDenied);
    fake.add_pod(pod("recall-0", "node-a", "recall"));
    eventually(&node_a, "recall").await.expect("recall issued after the watch event");
}

#[tokio::test]
async fn token_review_refusals_name_what_failed() {
    logs();
    let fake = FakeApi::new();
    {
        let mut st = fake.state();
        st.tokens.insert(
            "tok-wrong-aud".into(),
            Known { audiences: vec!["https://kubernetes.default.svc".into()], ..Known::node_proxy("node-a") },
        );
        st.tokens.insert("tok-unaware".into(), Known { audience_unaware: true, ..Known::node_proxy("node-a") });
        st.tokens.insert("tok-app".into(), Known { user: "system:serviceaccount:lemo-dev:bff".into(), ..Known::node_proxy("node-a") });
        st.tokens.insert("tok-no-node".into(), Known { node: None, ..Known::node_proxy("node-a") });
    }
    let api = fake.clone().serve().await;
    let setup = Setup::new();
    let ca = start(setup.options(api, ReviewOptions::default())).await;
    // The pod list first, so no refusal below is about readiness.
    let good = setup.client(ca.addr, "node-a", &setup.token("good.token", "tok-a"));
    eventually(&good, "bff").await.expect("a good token works");

    let cases: &[(&str, &str, tonic::Code, &str)] = &[
        ("garbage", "node-a", tonic::Code::Unauthenticated, "token rejected by the Kubernetes API server: invalid bearer token"),
        (
            "tok-wrong-aud",
            "node-a",
            tonic::Code::Unauthenticated,
            "token rejected by the Kubernetes API server: token audiences [\"https://kubernetes.default.svc\"] is invalid for the target audiences [\"mesh-ca\"]",
        ),
        (
            "tok-unaware",
            "node-a",
            tonic::Code::Unauthenticated,
            "token is not valid for audience \"mesh-ca\" (the API server accepted it for [])",
        ),
        (
            "tok-app",
            "node-a",
            tonic::Code::PermissionDenied,
            "token belongs to \"system:serviceaccount:lemo-dev:bff\", not to a node proxy ServiceAccount (system:serviceaccount:mesh-system:mesh-node)",
        ),
        (
            "tok-no-node",
            "node-a",
            tonic::Code::PermissionDenied,
            "token of \"system:serviceaccount:mesh-system:mesh-node\" carries no authentication.kubernetes.io/node-name",
        ),
        ("tok-a", "node-b", tonic::Code::PermissionDenied, "token is bound to node \"node-a\" but the request names node \"node-b\""),
        ("", "node-a", tonic::Code::Unauthenticated, "missing authorization: Bearer <ServiceAccount token> metadata"),
    ];
    for (i, (token, node, want_code, want)) in cases.iter().enumerate() {
        let client = setup.client(ca.addr, node, &setup.token(&format!("case-{i}.token"), token));
        let (code, message) = refusal(request(&client, "bff").await);
        assert_eq!(code, *want_code, "token {token:?}: {message}");
        assert!(message.starts_with(want), "token {token:?}: got {message:?}, want {want:?}");
    }
}

#[tokio::test]
async fn token_review_caches_positive_answers_only_and_briefly() {
    logs();
    let fake = FakeApi::new();
    for t in ["tok-a2", "tok-a3", "tok-short"] {
        fake.state().tokens.insert(t.into(), Known::node_proxy("node-a"));
    }
    let api = fake.clone().serve().await;
    let setup = Setup::new();
    let review = ReviewOptions { cache_ttl: Duration::from_secs(2), ..ReviewOptions::default() };
    let ca = start(setup.options(api, review)).await;
    let token_file = setup.token("node-a.token", "tok-a");
    let node_a = setup.client(ca.addr, "node-a", &token_file);
    eventually(&node_a, "bff").await.expect("issued");
    assert_eq!(fake.reviews(), 1);
    request(&node_a, "bff").await.expect("issued again");
    assert_eq!(fake.reviews(), 1, "the second request is answered from the cache");

    // kubelet rotates the token: the client re-reads the file, the CA reviews the new one.
    setup.token("node-a.token", "tok-a2");
    request(&node_a, "bff").await.expect("issued with the rotated token");
    assert_eq!(fake.reviews(), 2);
    assert_eq!(fake.state().reviews[1].0, "tok-a2");

    // A burst with a new token (a node starting: one request per identity) is one review.
    setup.token("node-a.token", "tok-a3");
    let mut burst = tokio::task::JoinSet::new();
    for _ in 0..6 {
        let client = node_a.clone();
        burst.spawn(async move { request(&client, "bff").await });
    }
    while let Some(result) = burst.join_next().await {
        result.expect("task").expect("issued");
    }
    assert_eq!(fake.reviews(), 3);

    // The cache entry expires.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    request(&node_a, "bff").await.expect("issued");
    assert_eq!(fake.reviews(), 4, "reviewed again after the cache TTL");

    // Refusals are cached too, briefly: a node retrying with a bad token costs one review.
    let liar = setup.client(ca.addr, "node-a", &setup.token("bad.token", "garbage"));
    for _ in 0..3 {
        let (code, message) = refusal(request(&liar, "bff").await);
        assert_eq!(code, tonic::Code::Unauthenticated);
        assert_eq!(message, "token rejected by the Kubernetes API server: invalid bearer token");
    }
    assert_eq!(fake.reviews(), 5, "one review for three tries with the same bad token");
}

#[tokio::test]
async fn token_review_refusals_expire_and_a_token_accepted_later_works() {
    logs();
    let fake = FakeApi::new();
    let api = fake.clone().serve().await;
    let setup = Setup::new();
    let review = ReviewOptions { negative_cache_ttl: Duration::from_millis(500), ..ReviewOptions::default() };
    let ca = start(setup.options(api, review)).await;
    let node_a = setup.client(ca.addr, "node-a", &setup.token("node-a.token", "tok-late"));
    // Wait for the pod list, then the token is unknown: refused, and the refusal reused.
    let first = eventually(&node_a, "bff").await;
    assert_eq!(refusal(first).0, tonic::Code::Unauthenticated);
    let before = fake.reviews();
    assert_eq!(refusal(request(&node_a, "bff").await).0, tonic::Code::Unauthenticated);
    assert_eq!(fake.reviews(), before, "answered from the negative cache");
    // The API server learns the token (a node proxy pod just created): after the short
    // negative TTL it is reviewed again and accepted.
    fake.state().tokens.insert("tok-late".into(), Known::node_proxy("node-a"));
    tokio::time::sleep(Duration::from_millis(600)).await;
    request(&node_a, "bff").await.expect("issued once the refusal expired");
    assert_eq!(fake.reviews(), before + 1);
}

#[tokio::test]
async fn token_review_cache_never_outlives_the_token() {
    logs();
    let fake = FakeApi::new();
    // A JWT-shaped token expiring in 1 to 2 s (whole seconds); the fake does not check expiry,
    // so only the CA's cache bound makes it ask again.
    let exp = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs() + 2;
    let payload = base64url(format!("{{\"aud\":[\"mesh-ca\"],\"exp\":{exp}}}").as_bytes());
    let token = format!("eyJhbGciOiJub25lIn0.{payload}.");
    fake.state().tokens.insert(token.clone(), Known::node_proxy("node-a"));
    let api = fake.clone().serve().await;
    let setup = Setup::new();
    let ca = start(setup.options(api, ReviewOptions::default())).await;
    let node_a = setup.client(ca.addr, "node-a", &setup.token("node-a.token", &token));
    eventually(&node_a, "bff").await.expect("issued");
    request(&node_a, "bff").await.expect("issued");
    assert_eq!(fake.reviews(), 1);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    request(&node_a, "bff").await.expect("issued");
    assert_eq!(fake.reviews(), 2, "the 60 s cache TTL is cut to the token's expiry");
    // Past its expiry the answer is not even cached.
    request(&node_a, "bff").await.expect("issued");
    assert_eq!(fake.reviews(), 3, "an expired token is reviewed every time");
}

#[tokio::test]
async fn unavailable_until_pods_are_listed_and_while_the_api_server_is_down() {
    logs();
    let fake = FakeApi::new();
    fake.fail_pod_list(true);
    let api = fake.clone().serve().await;
    let setup = Setup::new();
    let ca = start(setup.options(api, ReviewOptions::default())).await;
    let node_a = setup.client(ca.addr, "node-a", &setup.token("node-a.token", "tok-a"));
    let (code, message) = refusal(request(&node_a, "bff").await);
    assert_eq!(code, tonic::Code::Unavailable, "{message}");
    assert_eq!(message, "the CA has not listed the cluster's pods yet; retry");
    fake.fail_pod_list(false);
    eventually(&node_a, "bff").await.expect("issued once the pods are listed");

    // No API server at all: the review cannot be made, which the node retries.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead_addr = dead.local_addr().expect("addr");
    drop(dead);
    let setup = Setup::new();
    let ca = start(setup.options(dead_addr, ReviewOptions::default())).await;
    let node_a = setup.client(ca.addr, "node-a", &setup.token("node-a.token", "tok-a"));
    let (code, message) = refusal(request(&node_a, "bff").await);
    assert_eq!(code, tonic::Code::Unavailable, "{message}");
    let prefix = format!("TokenReview failed: POST /apis/authentication.k8s.io/v1/tokenreviews on http://{dead_addr}: ");
    assert!(message.starts_with(&prefix), "{message}");
    assert!(message.contains("Connection refused"), "{message}");
}

fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// The install (deploy/) and the CA's defaults agree: the DaemonSet's projected token has the
/// audience the CA expects, runs under the ServiceAccount the CA accepts, and hands the token
/// to the node proxy; the CA runs in Kubernetes mode with the RBAC that needs.
#[test]
fn install_manifests_match_the_ca_defaults() {
    fn docs(text: &str) -> Vec<Value> {
        serde_yaml::Deserializer::from_str(text).map(|d| <Value as serde::Deserialize>::deserialize(d).expect("yaml")).collect()
    }
    let ds = docs(include_str!("../../../deploy/daemonset.yaml")).remove(0);
    let defaults = ReviewOptions::default();
    let pod = &ds["spec"]["template"]["spec"];
    let sa = format!("{}/{}", ds["metadata"]["namespace"].as_str().expect("ns"), pod["serviceAccountName"].as_str().expect("sa"));
    assert_eq!(defaults.node_service_accounts, [sa]);
    let volume = pod["volumes"].as_array().expect("volumes").iter().find(|v| v["name"] == "mesh-token").expect("mesh-token volume");
    let source = &volume["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(source["audience"], json!(defaults.audience));
    let container = &pod["containers"][0];
    let mount = container["volumeMounts"].as_array().expect("mounts").iter().find(|m| m["name"] == "mesh-token").expect("mount");
    let token_path = format!("{}/{}", mount["mountPath"].as_str().expect("path"), source["path"].as_str().expect("path"));
    let args: Vec<&str> = container["args"].as_array().expect("args").iter().map(|a| a.as_str().expect("arg")).collect();
    let flag = |name: &str| args.iter().position(|a| *a == name).and_then(|i| args.get(i + 1)).copied();
    assert_eq!(flag("--node-token-file"), Some(token_path.as_str()));
    assert!(args.contains(&"--kubernetes"), "{args:?}");

    let ca = docs(include_str!("../../../deploy/ca.yaml"));
    let deployment = ca.iter().find(|d| d["kind"] == "Deployment").expect("CA Deployment");
    let ca_args = deployment["spec"]["template"]["spec"]["containers"][0]["args"].as_array().expect("args");
    assert!(ca_args.contains(&json!("--kubernetes")) && !ca_args.contains(&json!("--tokens")), "{ca_args:?}");

    let rbac = docs(include_str!("../../../deploy/rbac.yaml"));
    let role = rbac.iter().find(|d| d["kind"] == "ClusterRole" && d["metadata"]["name"] == "mesh-ca").expect("role");
    let rules: Vec<(String, String, Vec<String>)> = role["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .map(|r| {
            let s = |v: &Value| v.as_array().expect("list").iter().map(|x| x.as_str().expect("str").to_string()).collect::<Vec<_>>();
            (s(&r["apiGroups"]).join(","), s(&r["resources"]).join(","), s(&r["verbs"]))
        })
        .collect();
    assert_eq!(
        rules,
        [
            ("authentication.k8s.io".into(), "tokenreviews".into(), vec!["create".to_string()]),
            (String::new(), "pods".into(), vec!["list".to_string(), "watch".to_string()]),
        ]
    );
}
