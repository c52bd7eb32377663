//! The in-cluster path: HTTPS to the API server verified with the cluster CA
//! (`ca.crt`), and the ServiceAccount token as bearer, re-read per request.
//! Against the fake API server of `tests`, over TLS with rcgen-made certificates.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::json;

use super::tests::{Fake, WAIT, file_mode, loaded_fake, summary, until, until_true};
use super::*;

/// A cluster CA and an API server certificate it issued for `sans`.
struct Pki {
    ca_pem: String,
    server: Arc<rustls::ServerConfig>,
}

impl Pki {
    fn new(sans: &[&str]) -> Pki {
        let ca_key = KeyPair::generate().expect("key");
        let mut ca_params = CertificateParams::default();
        ca_params.distinguished_name.push(DnType::CommonName, "kubernetes");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA");
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().expect("key");
        let params = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).expect("params");
        let cert = params.signed_by(&key, &issuer).expect("server certificate");
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(cert.der().to_vec())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .expect("server config");
        Pki { ca_pem: ca_cert.pem(), server: Arc::new(server) }
    }
}

/// A ServiceAccount directory as kubelet mounts it.
fn sa_dir(token: &str, ca_pem: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("token"), token).expect("token");
    std::fs::write(dir.path().join("ca.crt"), ca_pem).expect("ca.crt");
    dir
}

fn fast() -> Options {
    Options {
        debounce: Duration::from_millis(20),
        backoff_initial: Duration::from_millis(10),
        backoff_max: Duration::from_millis(100),
        watch_timeout: Duration::from_secs(60),
    }
}

fn in_cluster(addr: std::net::SocketAddr, dir: &Path) -> ApiServer {
    ApiServer::in_cluster_from(Some("127.0.0.1"), Some(&addr.port().to_string()), dir).expect("in-cluster API server")
}

#[tokio::test]
async fn in_cluster_discovery_over_tls_sends_the_current_token() {
    let pki = Pki::new(&["127.0.0.1", "kubernetes.default.svc"]);
    let dir = sa_dir("token-1\n", &pki.ca_pem);
    let fake = loaded_fake(&[]);
    fake.state().required_token = Some("token-1".into());
    let addr = fake.clone().serve_tls(pki.server.clone()).await;

    let mut d = spawn(in_cluster(addr, dir.path()), fast());
    tokio::time::timeout(WAIT, d.wait_ready()).await.expect("ready over TLS in time");
    assert_eq!(summary(&d.config.borrow()), summary(&file_mode()));
    let seen = fake.state().authorization.clone();
    assert!(!seen.is_empty());
    assert!(seen.iter().all(|a| a.as_deref() == Some("Bearer token-1")), "{seen:?}");

    // kubelet rotates the projected token; from now on the server accepts only the new one.
    until_true("namespace watch", || fake.watcher_count("/api/v1/namespaces") > 0).await;
    std::fs::write(dir.path().join("token"), "token-2\n").expect("rotate");
    fake.state().required_token = Some("token-2".into());
    fake.close_watches("/api/v1/namespaces");
    // The fake does not replay missed events: change the object once the new watch is open.
    until_true("namespace re-watch", || fake.watcher_count("/api/v1/namespaces") > 0).await;
    let mut ns = fake.state().objects["/api/v1/namespaces"].values().next().cloned().expect("a namespace");
    ns["metadata"]["labels"]["rotated"] = json!("yes");
    let name = ns["metadata"]["name"].as_str().expect("name").to_string();
    fake.apply("MODIFIED", ns);
    until(&mut d, "change seen through a watch made with the new token", move |c| {
        c.namespace(&name).is_some_and(|n| n.labels.contains_key("rotated"))
    })
    .await;
    assert!(fake.state().authorization.iter().any(|a| a.as_deref() == Some("Bearer token-2")));
}

#[tokio::test]
async fn in_cluster_refuses_a_server_the_cluster_ca_did_not_sign_or_name() {
    let pki = Pki::new(&["127.0.0.1"]);
    let fake = Fake::new(&[]);
    let addr = fake.clone().serve_tls(pki.server.clone()).await;

    // ca.crt of another cluster.
    let stranger = Pki::new(&["127.0.0.1"]);
    let dir = sa_dir("token", &stranger.ca_pem);
    let err = in_cluster(addr, dir.path()).get("/api/v1/namespaces").await.expect_err("untrusted server");
    let msg = err.to_string();
    assert!(msg.starts_with(&format!("TLS handshake with the API server https://127.0.0.1:{}", addr.port())), "{msg}");
    // rustls names the cause: BadSignature here (the stranger CA has the same subject, as every
    // cluster's "kubernetes" CA does), UnknownIssuer for a CA of another name.
    assert!(msg.contains("invalid peer certificate: BadSignature"), "{msg}");
    let mut d = spawn(in_cluster(addr, dir.path()), fast());
    assert!(tokio::time::timeout(Duration::from_millis(300), d.wait_ready()).await.is_err());

    // The right CA, but a name the certificate does not carry.
    let dir = sa_dir("token", &pki.ca_pem);
    let by_name = ApiServer::new(
        &format!("https://localhost:{}", addr.port()),
        Some(&dir.path().join("token")),
        Some(&dir.path().join("ca.crt")),
    )
    .expect("api");
    let msg = by_name.get("/api/v1/namespaces").await.expect_err("wrong name").to_string();
    assert!(msg.contains("certificate not valid for name \"localhost\""), "{msg}");
    // Nothing reached the server's HTTP layer.
    assert!(fake.state().requests.is_empty());
}

#[tokio::test]
async fn a_refused_token_is_reported_with_the_status() {
    let pki = Pki::new(&["127.0.0.1"]);
    let fake = Fake::new(&[]);
    fake.state().required_token = Some("good".into());
    let addr = fake.clone().serve_tls(pki.server.clone()).await;
    let dir = sa_dir("stale", &pki.ca_pem);
    let api = in_cluster(addr, dir.path());
    let err = api
        .post_json::<_, serde_json::Value>("/apis/authentication.k8s.io/v1/tokenreviews", &json!({}), WAIT)
        .await
        .expect_err("401");
    assert!(matches!(err, ApiError::Status { status: http::StatusCode::UNAUTHORIZED, .. }), "{err:?}");
    assert!(
        err.to_string().starts_with("POST /apis/authentication.k8s.io/v1/tokenreviews: 401 Unauthorized: {"),
        "{err}"
    );
    assert_eq!(fake.state().authorization, [Some("Bearer stale".to_string())]);
}

#[test]
fn in_cluster_settings_are_checked_with_clear_errors() {
    let pki = Pki::new(&["127.0.0.1"]);
    let dir = sa_dir("token", &pki.ca_pem);
    let err = ApiServer::in_cluster_from(None, None, dir.path()).expect_err("no env");
    assert!(err.to_string().starts_with("KUBERNETES_SERVICE_HOST is not set"), "{err}");

    let empty = tempfile::tempdir().expect("tempdir");
    std::fs::write(empty.path().join("ca.crt"), &pki.ca_pem).expect("ca");
    let err = ApiServer::in_cluster_from(Some("10.43.0.1"), Some("443"), empty.path()).expect_err("no token");
    let token = empty.path().join("token");
    assert!(err.to_string().starts_with(&format!("API token file {}: ", token.display())), "{err}");

    std::fs::write(empty.path().join("token"), "t").expect("token");
    std::fs::write(empty.path().join("ca.crt"), "not a certificate\n").expect("ca");
    let err = ApiServer::in_cluster_from(Some("10.43.0.1"), None, empty.path()).expect_err("bad ca");
    assert!(err.to_string().ends_with("ca.crt: no PEM certificate in it"), "{err}");

    // An IPv6 service host is bracketed into the URL.
    let api = ApiServer::in_cluster_from(Some("fd00::1"), Some("6443"), dir.path()).expect("v6");
    assert_eq!(format!("{api:?}"), "https://fd00::1:6443");
}
