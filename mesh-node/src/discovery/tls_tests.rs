//! The in-cluster and kubeconfig paths: HTTPS to the API server verified with the cluster CA,
//! the ServiceAccount token (or the kubeconfig's credentials) as bearer, a rotated token file
//! picked up. Against the fake API server (`fake_api`), over TLS with rcgen-made certificates.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::json;

use super::fake_api::Fake;
use super::tests::{WAIT, fast, file_mode, loaded_fake, summary, until};
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

/// A ServiceAccount directory as kubelet mounts it (kubelet writes the token without a
/// line break).
fn sa_dir(token: &str, ca_pem: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("token"), token).expect("token");
    std::fs::write(dir.path().join("ca.crt"), ca_pem).expect("ca.crt");
    dir
}

fn in_cluster(addr: std::net::SocketAddr, dir: &Path) -> ApiServer {
    ApiServer::in_cluster_from(Some("127.0.0.1"), Some(&addr.port().to_string()), dir).expect("in-cluster API server")
}

/// One list of Namespaces through `api`'s client, as discovery's watchers make them.
async fn list_namespaces(api: &ApiServer) -> Result<(), ApiError> {
    let namespaces: kube::Api<Namespace> = kube::Api::all(api.client()?);
    namespaces.list(&Default::default()).await.map(drop).map_err(|e| api.error("list namespaces", &e))
}

fn bearer(token: &str) -> Option<String> {
    Some(format!("Bearer {token}"))
}

/// kubelet rotates the projected token; kube-rs reads the token file again after
/// [`TOKEN_FILE_RELOAD`] (about a minute, as client-go), so requests carry the new token from
/// then on. The old token stays valid meanwhile (bound tokens are valid until they expire),
/// which the fake models by accepting both until the new one has been seen.
#[tokio::test]
async fn in_cluster_discovery_over_tls_picks_up_a_rotated_token() {
    let pki = Pki::new(&["127.0.0.1", "kubernetes.default.svc"]);
    let dir = sa_dir("token-1", &pki.ca_pem);
    let fake = loaded_fake(&[]);
    fake.state().accepted_tokens = Some(vec!["token-1".into()]);
    let addr = fake.clone().serve(Some(pki.server.clone())).await;

    // Watches of 1 s: the watchers keep making requests, as real ones do every few minutes.
    let client_made = Instant::now();
    let mut d = spawn(in_cluster(addr, dir.path()), Options { watch_timeout: Duration::from_secs(1), ..fast() });
    tokio::time::timeout(WAIT, d.wait_ready()).await.expect("ready over TLS in time");
    assert_eq!(summary(&d.config.borrow()), summary(&file_mode()));
    let seen = fake.authorizations();
    assert!(!seen.is_empty());
    assert!(seen.iter().all(|a| *a == bearer("token-1")), "{seen:?}");

    std::fs::write(dir.path().join("token"), "token-2").expect("rotate");
    fake.state().accepted_tokens = Some(vec!["token-1".into(), "token-2".into()]);
    let deadline = TOKEN_FILE_RELOAD + Duration::from_secs(20);
    let picked_up = tokio::time::timeout(deadline, async {
        while !fake.authorizations().contains(&bearer("token-2")) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(picked_up.is_ok(), "the rotated token was not sent within {deadline:?}");
    let after = client_made.elapsed();
    assert!(after >= TOKEN_FILE_RELOAD, "re-read after {after:?}: earlier than kube-rs documents");
    // From the first request with the new token on, only the new token.
    let seen = fake.authorizations();
    let first_new = seen.iter().position(|a| *a == bearer("token-2")).expect("seen");
    assert!(seen[first_new..].iter().all(|a| *a == bearer("token-2")), "{:?}", &seen[first_new..]);

    // The old token expires: discovery goes on with the new one.
    fake.state().accepted_tokens = Some(vec!["token-2".into()]);
    let mut ns = fake.state().objects["/api/v1/namespaces"].values().next().cloned().expect("a namespace");
    ns["metadata"]["labels"]["rotated"] = json!("yes");
    let name = ns["metadata"]["name"].as_str().expect("name").to_string();
    fake.apply("MODIFIED", ns);
    until(&mut d, "change seen through a watch made with the new token", move |c| {
        c.namespace(&name).is_some_and(|n| n.labels.contains_key("rotated"))
    })
    .await;
}

#[tokio::test]
async fn in_cluster_refuses_a_server_the_cluster_ca_did_not_sign_or_name() {
    let pki = Pki::new(&["127.0.0.1"]);
    let fake = Fake::new(&[]);
    let addr = fake.clone().serve(Some(pki.server.clone())).await;

    // ca.crt of another cluster.
    let stranger = Pki::new(&["127.0.0.1"]);
    let dir = sa_dir("token", &stranger.ca_pem);
    let api = in_cluster(addr, dir.path());
    let msg = list_namespaces(&api).await.expect_err("untrusted server").to_string();
    assert!(msg.starts_with(&format!("list namespaces on https://127.0.0.1:{}: ", addr.port())), "{msg}");
    // rustls names the cause: BadSignature here (the stranger CA has the same subject, as every
    // cluster's "kubernetes" CA does), UnknownIssuer for a CA of another name.
    assert!(msg.contains("invalid peer certificate: BadSignature"), "{msg}");
    let mut d = spawn(api, fast());
    assert!(tokio::time::timeout(Duration::from_millis(300), d.wait_ready()).await.is_err());

    // The right CA, but a name the certificate does not carry.
    let dir = sa_dir("token", &pki.ca_pem);
    let by_name = ApiServer::new(
        &format!("https://localhost:{}", addr.port()),
        Some(&dir.path().join("token")),
        Some(&dir.path().join("ca.crt")),
    )
    .expect("api");
    let msg = list_namespaces(&by_name).await.expect_err("wrong name").to_string();
    assert!(msg.contains("certificate not valid for name \"localhost\""), "{msg}");
    // Nothing reached the server's HTTP layer.
    assert!(fake.state().seen.is_empty());
}

#[tokio::test]
async fn a_refused_token_is_reported_with_the_status() {
    let pki = Pki::new(&["127.0.0.1"]);
    let fake = Fake::new(&[]);
    fake.state().accepted_tokens = Some(vec!["good".into()]);
    let addr = fake.clone().serve(Some(pki.server.clone())).await;
    let dir = sa_dir("stale", &pki.ca_pem);
    let api = in_cluster(addr, dir.path());
    let err = list_namespaces(&api).await.expect_err("401");
    assert_eq!(err.status(), Some(401), "{err:?}");
    assert_eq!(err.to_string(), format!("list namespaces on https://127.0.0.1:{}: 401 Unauthorized: Unauthorized", addr.port()));
    assert_eq!(fake.authorizations(), [bearer("stale")]);
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

    // kube-rs would send the line break as part of the token: refused up front, by name.
    std::fs::write(&token, "t\n").expect("token");
    let err = ApiServer::in_cluster_from(Some("10.43.0.1"), Some("443"), empty.path()).expect_err("line break");
    assert!(err.to_string().starts_with(&format!("API token file {}: has leading or trailing whitespace", token.display())), "{err}");

    std::fs::write(&token, "t").expect("token");
    std::fs::write(empty.path().join("ca.crt"), "not a certificate\n").expect("ca");
    let err = ApiServer::in_cluster_from(Some("10.43.0.1"), None, empty.path()).expect_err("bad ca");
    assert!(err.to_string().ends_with("ca.crt: no PEM certificate in it"), "{err}");

    // An IPv6 service host is bracketed into the URL.
    let api = ApiServer::in_cluster_from(Some("fd00::1"), Some("6443"), dir.path()).expect("v6");
    assert_eq!(format!("{api:?}"), "https://[fd00::1]:6443");
}

/// A kubeconfig with two contexts: `good` (the right CA, a token file) and `stranger`
/// (current-context: another cluster's CA).
fn kubeconfig(dir: &Path, addr: std::net::SocketAddr, pki: &Pki, stranger: &Pki) -> std::path::PathBuf {
    std::fs::write(dir.join("ca.crt"), &pki.ca_pem).expect("ca");
    std::fs::write(dir.join("stranger.crt"), &stranger.ca_pem).expect("ca");
    std::fs::write(dir.join("token"), "kubeconfig-token").expect("token");
    let config = format!(
        "apiVersion: v1
kind: Config
current-context: stranger
clusters:
- name: good
  cluster: {{server: 'https://127.0.0.1:{port}', certificate-authority: '{dir}/ca.crt'}}
- name: stranger
  cluster: {{server: 'https://127.0.0.1:{port}', certificate-authority: '{dir}/stranger.crt'}}
users:
- name: dev
  user: {{tokenFile: '{dir}/token'}}
contexts:
- name: good
  context: {{cluster: good, user: dev}}
- name: stranger
  context: {{cluster: stranger, user: dev}}
",
        port = addr.port(),
        dir = dir.display()
    );
    let path = dir.join("config");
    std::fs::write(&path, config).expect("kubeconfig");
    path
}

/// Out of the cluster, `--kubeconfig FILE --kube-context NAME` (or the file's current-context).
#[tokio::test]
async fn discovery_from_a_kubeconfig_context() {
    let (pki, stranger) = (Pki::new(&["127.0.0.1"]), Pki::new(&["127.0.0.1"]));
    let fake = loaded_fake(&[]);
    fake.state().accepted_tokens = Some(vec!["kubeconfig-token".into()]);
    let addr = fake.clone().serve(Some(pki.server.clone())).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = kubeconfig(dir.path(), addr, &pki, &stranger);

    // The flags as `mesh-node run` and `mesh-node ca` parse them.
    #[derive(clap::Parser)]
    struct Cli {
        #[arg(long)]
        kubernetes: bool,
        #[command(flatten)]
        api: ApiArgs,
    }
    let path_arg = path.display().to_string();
    let cli = <Cli as clap::Parser>::try_parse_from(["x", "--kubernetes", "--kubeconfig", &path_arg, "--kube-context", "good"])
        .expect("flags");
    let api = cli.api.api_server().expect("kubeconfig");
    assert_eq!(format!("{api:?}"), format!("https://127.0.0.1:{}", addr.port()));
    let mut d = spawn(api, fast());
    tokio::time::timeout(WAIT, d.wait_ready()).await.expect("ready from the kubeconfig");
    assert_eq!(summary(&d.config.borrow()), summary(&file_mode()));
    assert!(fake.authorizations().iter().all(|a| *a == bearer("kubeconfig-token")));

    // The current-context names a cluster whose CA did not sign the server.
    let current = ApiServer::from_kubeconfig(Some(&path), None).expect("current context");
    let msg = list_namespaces(&current).await.expect_err("other cluster's CA").to_string();
    assert!(msg.contains("invalid peer certificate"), "{msg}");

    let err = ApiServer::from_kubeconfig(Some(&path), Some("nope")).expect_err("no such context");
    assert_eq!(err.to_string(), format!("kubeconfig {}: no context named \"nope\"", path.display()));
    let missing = dir.path().join("missing");
    let err = ApiServer::from_kubeconfig(Some(&missing), None).expect_err("no file");
    assert!(err.to_string().starts_with(&format!("kubeconfig {}: ", missing.display())), "{err}");
    // Flags that contradict each other.
    let err = <Cli as clap::Parser>::try_parse_from(["x", "--kubernetes", "--kubeconfig", "k", "--api-server", "http://h:1"])
        .err()
        .expect("conflict");
    assert!(err.to_string().contains("--kubeconfig"), "{err}");
    let err = <Cli as clap::Parser>::try_parse_from(["x", "--kubeconfig", "k"]).err().expect("needs --kubernetes");
    assert!(err.to_string().contains("--kubernetes"), "{err}");
}

/// `--kubernetes` alone: in a pod (KUBERNETES_SERVICE_HOST set) the in-cluster config, even
/// with a KUBECONFIG around; elsewhere KUBECONFIG's files merged as kubectl merges them (the
/// first to set the current-context wins), else ~/.kube/config; with none, an error saying
/// where it looked.
#[tokio::test]
async fn the_default_is_in_cluster_in_a_pod_and_the_kubeconfig_elsewhere() {
    use super::api::Environment;
    let (pki, stranger) = (Pki::new(&["127.0.0.1"]), Pki::new(&["127.0.0.1"]));
    let fake = Fake::new(&[]);
    let addr = fake.clone().serve(Some(pki.server.clone())).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let full = kubeconfig(dir.path(), addr, &pki, &stranger);
    let sa = sa_dir("in-cluster-token", &pki.ca_pem);
    let pod = Environment {
        service_host: Some("127.0.0.1".into()),
        service_port: Some(addr.port().to_string()),
        service_account_dir: sa.path().to_path_buf(),
        kubeconfig: Some(full.display().to_string()),
        home: Some(dir.path().to_path_buf()),
    };
    list_namespaces(&ApiServer::infer_from(&pod).expect("in-cluster")).await.expect("listed");
    assert_eq!(fake.authorizations().last().cloned().flatten(), bearer("in-cluster-token"));

    // Outside a pod: KUBECONFIG=first:full, first only picks the context.
    let first = dir.path().join("first");
    std::fs::write(&first, "apiVersion: v1\nkind: Config\ncurrent-context: good\n").expect("first");
    let workstation = Environment {
        service_host: None,
        kubeconfig: Some(format!("{}:{}", first.display(), full.display())),
        ..pod.clone()
    };
    list_namespaces(&ApiServer::infer_from(&workstation).expect("kubeconfig")).await.expect("listed with the good context");
    assert_eq!(fake.authorizations().last().cloned().flatten(), bearer("kubeconfig-token"));

    // No KUBECONFIG: ~/.kube/config, when there is one.
    let home = tempfile::tempdir().expect("home");
    let no_env = Environment { kubeconfig: None, home: Some(home.path().to_path_buf()), ..workstation.clone() };
    let err = ApiServer::infer_from(&no_env).expect_err("nothing to go by");
    let want = format!(
        "not in a pod (KUBERNETES_SERVICE_HOST is not set) and no kubeconfig (KUBECONFIG is not set, {}/.kube/config does not exist); \
         pass --api-server URL or --kubeconfig FILE",
        home.path().display()
    );
    assert_eq!(err.to_string(), want);
    std::fs::create_dir(home.path().join(".kube")).expect("mkdir");
    std::fs::copy(&full, home.path().join(".kube/config")).expect("copy");
    let api = ApiServer::infer_from(&no_env).expect("~/.kube/config");
    // Its current-context is the stranger cluster's: the CA check proves which file was read.
    assert!(list_namespaces(&api).await.expect_err("stranger CA").to_string().contains("invalid peer certificate"));
}
