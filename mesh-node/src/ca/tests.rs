//! CA tests: the signer's checks, the state directory, and the gRPC server in-process on
//! loopback with node clients (token, node-scoped identities, rotation across a CA outage).

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::oneshot;

use super::*;
use crate::identity::{
    CaClient, CaClientConfig, CertManager, CertManagerConfig, Identity, RotationConfig, WorkloadCert, new_csr,
};

const CLUSTER_YAML: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: lemo-dev
  labels:
    istio.io/dataplane-mode: ambient
---
apiVersion: v1
kind: Node
metadata:
  name: node-a
status:
  addresses:
    - type: InternalIP
      address: 172.18.0.2
---
apiVersion: v1
kind: Node
metadata:
  name: node-b
status:
  addresses:
    - type: InternalIP
      address: 172.18.0.3
---
apiVersion: v1
kind: Pod
metadata:
  namespace: lemo-dev
  name: bff-0
  labels:
    app: bff
spec:
  nodeName: node-a
  serviceAccountName: bff
  containers:
    - name: bff
      image: lemo/bff:dev
status:
  podIP: 10.244.0.10
---
apiVersion: v1
kind: Pod
metadata:
  namespace: lemo-dev
  name: rank-0
  labels:
    app: rank
spec:
  nodeName: node-b
  serviceAccountName: rank
  containers:
    - name: rank
      image: lemo/rank:dev
status:
  podIP: 10.244.1.10
"#;

fn id(sa: &str) -> Identity {
    Identity::in_default_domain("lemo-dev", sa)
}

/// A CA's files and a node's token file in one temp dir.
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("config")).expect("config dir");
        std::fs::write(dir.path().join("config/cluster.yaml"), CLUSTER_YAML).expect("cluster");
        std::fs::write(dir.path().join("tokens.yaml"), "node-a: token-a\nnode-b: token-b\n").expect("tokens");
        std::fs::write(dir.path().join("node-a.token"), "token-a\n").expect("token");
        std::fs::write(dir.path().join("bad.token"), "token-b\n").expect("token");
        Setup { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn options(&self, listen: std::net::SocketAddr) -> CaOptions {
        let mut opts = CaOptions::new(listen, self.path("state"), self.path("config"), self.path("tokens.yaml"));
        opts.ttl = TtlPolicy { default: Duration::from_secs(3600), max: Duration::from_secs(3600) };
        opts
    }

    fn client_config(&self, addr: std::net::SocketAddr, node: &str, token_file: &str) -> CaClientConfig {
        CaClientConfig::new(addr.to_string(), node, self.path(token_file), self.path("state/root-cert.pem"), "cluster.local")
    }
}

/// A CA serving in the background until the returned sender fires or is dropped.
struct Running {
    addr: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), CaError>>,
}

impl Running {
    async fn start(opts: CaOptions) -> Running {
        // Rebinding the port of a CA just stopped can race the old listener's close.
        let mut tries = 0;
        let server = loop {
            match CaServer::bind(opts.clone()).await {
                Ok(server) => break server,
                Err(e) if tries < 50 => {
                    tries += 1;
                    tracing::debug!("bind retry: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("CA bind: {e}"),
            }
        };
        let addr = server.local_addr();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(server.run(async {
            let _ = rx.await;
        }));
        Running { addr, stop: Some(tx), task }
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match tokio::time::timeout(Duration::from_secs(10), &mut self.task).await {
            Ok(joined) => joined.expect("CA task").expect("CA run"),
            Err(_) => panic!("CA did not stop"),
        }
    }
}

/// Shows the CA's and the manager's logs with `--nocapture` (refusals, renewal retries).
fn logs() {
    let _ = tracing_subscriber::fmt().with_test_writer().with_env_filter("mesh_node=info").try_init();
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).expect("metadata").permissions().mode() & 0o777
}

#[test]
fn ca_signer_refuses_foreign_trust_domain_bad_csr_and_caps_ttl() {
    let signer = CaSigner::generate("cluster.local")
        .expect("ca")
        .with_ttl_policy(TtlPolicy { default: Duration::from_secs(600), max: Duration::from_secs(1200) });
    let foreign = new_csr(&Identity::new("evil.org", "lemo-dev", "bff")).expect("csr");
    let err = signer.sign_csr(&foreign.csr_pem, |_| true, Duration::ZERO).expect_err("foreign domain");
    assert!(matches!(err, CaError::ForeignTrustDomain { .. }), "{err}");
    assert_eq!(err.grpc_code(), tonic::Code::PermissionDenied);

    let err = signer.sign_csr("not a csr", |_| true, Duration::ZERO).expect_err("garbage");
    assert_eq!(err.grpc_code(), tonic::Code::InvalidArgument, "{err}");

    let request = new_csr(&id("bff")).expect("csr");
    let err = signer.sign_csr(&request.csr_pem, |_| false, Duration::ZERO).expect_err("not allowed");
    assert!(err.to_string().contains("spiffe://cluster.local/ns/lemo-dev/sa/bff is not allowed"), "{err}");

    for (requested, granted) in [(Duration::ZERO, 600), (Duration::from_secs(100_000), 1200), (Duration::from_secs(30), 30)] {
        let chain = signer.sign_csr(&request.csr_pem, |_| true, requested).expect("sign");
        assert_eq!(chain.len(), 2);
        let cert = WorkloadCert::from_pem_chain(id("bff"), &chain, request.key.clone_key()).expect("cert");
        let lifetime = cert.not_after.duration_since(SystemTime::now()).expect("future").as_secs();
        assert!(lifetime <= granted && lifetime + 5 >= granted, "requested {requested:?}: {lifetime}s");
        // Backdated for clock skew.
        assert!(cert.not_before < SystemTime::now() - Duration::from_secs(30));
    }
}

#[test]
fn ca_signer_accepts_dotted_and_longest_service_accounts_and_refuses_invalid_names() {
    let signer = CaSigner::generate("cluster.local").expect("ca");
    let long = Identity::in_default_domain(format!("n{}", "s".repeat(62)), format!("{}.{}", "a".repeat(126), "b".repeat(126)));
    assert_eq!((long.namespace.len(), long.service_account.len()), (63, 253));
    for identity in [id("recall.reader"), Identity::in_default_domain("lemo-dev", "a".repeat(253)), long] {
        let request = new_csr(&identity).expect("csr");
        let chain = signer.sign_csr(&request.csr_pem, |asked| *asked == identity, Duration::ZERO).unwrap_or_else(|e| panic!("{identity}: {e}"));
        let cert = WorkloadCert::from_pem_chain(identity.clone(), &chain, request.key).expect("cert");
        assert_eq!(crate::identity::identity_from_cert(cert.leaf()).expect("SAN"), identity);
    }
    for (identity, why) in [
        (id("Recall.reader"), "service account \"Recall.reader\""),
        (id("recall_reader"), "the character '_'"),
        (id("recall..reader"), "empty part between dots"),
        (id(&"a".repeat(254)), "254 characters long, the limit is 253"),
        (Identity::in_default_domain("lemo.dev", "bff"), "namespace \"lemo.dev\""),
    ] {
        let request = new_csr(&identity).expect("csr");
        let err = signer.sign_csr(&request.csr_pem, |_| true, Duration::ZERO).expect_err(&identity.to_string());
        assert_eq!(err.grpc_code(), tonic::Code::InvalidArgument, "{err}");
        let err = err.to_string();
        assert!(err.contains("not a valid Kubernetes name") && err.contains(why), "{identity}: {err}");
    }
}

#[test]
fn ca_state_dir_is_private_and_the_root_survives_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let first = CaSigner::load_or_create(&state, "cluster.local").expect("create");
    assert_eq!(mode(&state), 0o700);
    assert_eq!(mode(&state.join("root-key.pem")), 0o600);
    let again = CaSigner::load_or_create(&state, "cluster.local").expect("load");
    assert_eq!(first.root_pem(), again.root_pem());
    assert_eq!(std::fs::read_to_string(state.join("root-cert.pem")).expect("root"), first.root_pem());

    // A provided intermediate: leaves chain to the root through it.
    let root = CaSigner::generate("cluster.local").expect("root");
    let err = CaSigner::from_pem(&root.root_pem(), "garbage", "cluster.local").expect_err("bad key");
    assert!(err.to_string().contains("key PEM"), "{err}");
    let other_key = rcgen::KeyPair::generate().expect("key").serialize_pem();
    let err = CaSigner::from_pem(&root.root_pem(), &other_key, "cluster.local").expect_err("wrong key");
    assert!(err.to_string().contains("does not belong"), "{err}");
}

#[test]
fn ca_provided_intermediate_signs_leaves_that_chain_to_the_root() {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    use rustls::server::danger::ClientCertVerifier as _;
    let ca_params = |cn: &str| {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params
    };
    let root_key = KeyPair::generate().expect("key");
    let root_params = ca_params("test root");
    let root_cert = root_params.self_signed(&root_key).expect("root");
    let root = Issuer::new(root_params, root_key);
    let inter_key = KeyPair::generate().expect("key");
    let inter_cert = ca_params("test intermediate").signed_by(&inter_key, &root).expect("intermediate");

    let chain_pem = format!("{}{}", inter_cert.pem(), root_cert.pem());
    let signer = CaSigner::from_pem(&chain_pem, &inter_key.serialize_pem(), "cluster.local").expect("signer");
    assert_eq!(signer.root_cert().as_ref(), root_cert.der().as_ref(), "the trust anchor is the last certificate");
    let request = new_csr(&id("bff")).expect("csr");
    let chain = signer.sign_csr(&request.csr_pem, |_| true, Duration::from_secs(60)).expect("sign");
    assert_eq!(chain.len(), 3, "leaf, intermediate, root");
    let cert = WorkloadCert::from_pem_chain(id("bff"), &chain, request.key).expect("cert");
    assert_eq!(cert.certified_key().cert.len(), 2, "the handshake carries leaf and intermediate");

    let verifier = crate::identity::MeshClientVerifier::new(Arc::new(signer.roots()), "cluster.local").expect("verifier");
    verifier
        .verify_client_cert(cert.leaf(), &cert.chain[1..2], rustls_pki_types::UnixTime::now())
        .expect("chains through the intermediate");
    let err = verifier
        .verify_client_cert(cert.leaf(), &[], rustls_pki_types::UnixTime::now())
        .expect_err("no path without the intermediate");
    assert!(err.to_string().contains("not issued by a CA this mesh trusts"), "{err}");

    // A leaf key is not a CA key.
    let leaf_key = KeyPair::generate().expect("key");
    let mut leaf_params = CertificateParams::default();
    leaf_params.is_ca = IsCa::ExplicitNoCa;
    let leaf = leaf_params.signed_by(&leaf_key, &root).expect("leaf");
    let err = CaSigner::from_pem(&leaf.pem(), &leaf_key.serialize_pem(), "cluster.local").expect_err("not a CA");
    assert!(err.to_string().contains("not a CA"), "{err}");
}

#[tokio::test]
async fn ca_grpc_issues_to_authenticated_nodes_for_their_pods_only() {
    logs();
    let setup = Setup::new();
    let ca = Running::start(setup.options("127.0.0.1:0".parse().expect("addr"))).await;
    let roots = Arc::new(crate::identity::load_roots(&setup.path("state/root-cert.pem")).expect("roots"));

    // node-a, its own pod's identity.
    let client = CaClient::new(&setup.client_config(ca.addr, "node-a", "node-a.token"), roots.clone()).expect("client");
    let request = new_csr(&id("bff")).expect("csr");
    let chain = client.create_certificate(&request.csr_pem, Duration::from_secs(60)).await.expect("issued");
    let cert = WorkloadCert::from_pem_chain(id("bff"), &chain, request.key).expect("cert");
    let lifetime = cert.not_after.duration_since(SystemTime::now()).expect("future");
    assert!(lifetime <= Duration::from_secs(60) && lifetime > Duration::from_secs(50), "{lifetime:?}");

    // node-a asking for the identity of a pod on node-b.
    let request = new_csr(&id("rank")).expect("csr");
    let err = client.create_certificate(&request.csr_pem, Duration::ZERO).await.expect_err("other node's pod");
    match &err {
        crate::identity::IdentityError::Ca { code, message } => {
            assert_eq!(*code, tonic::Code::PermissionDenied, "{message}");
            assert!(message.contains("not allowed for node node-a"), "{message}");
        }
        other => panic!("unexpected {other}"),
    }

    // A foreign trust domain.
    let request = new_csr(&Identity::new("evil.org", "lemo-dev", "bff")).expect("csr");
    let err = client.create_certificate(&request.csr_pem, Duration::ZERO).await.expect_err("foreign domain");
    assert!(matches!(err, crate::identity::IdentityError::Ca { code: tonic::Code::PermissionDenied, .. }), "{err}");

    // node-a presenting node-b's token.
    let liar = CaClient::new(&setup.client_config(ca.addr, "node-a", "bad.token"), roots.clone()).expect("client");
    let request = new_csr(&id("bff")).expect("csr");
    let err = liar.create_certificate(&request.csr_pem, Duration::ZERO).await.expect_err("wrong token");
    match &err {
        crate::identity::IdentityError::Ca { code, message } => {
            assert_eq!(*code, tonic::Code::Unauthenticated, "{message}");
            assert!(message.contains("invalid token for node node-a"), "{message}");
        }
        other => panic!("unexpected {other}"),
    }

    // A client that trusts another root refuses the CA itself.
    let stranger_roots = Arc::new(CaSigner::generate("cluster.local").expect("ca").roots());
    let wary = CaClient::new(&setup.client_config(ca.addr, "node-a", "node-a.token"), stranger_roots).expect("client");
    let err = wary.create_certificate(&request.csr_pem, Duration::ZERO).await.expect_err("untrusted CA");
    assert!(err.to_string().contains("not issued by a CA this mesh trusts"), "{err}");

    ca.stop().await;
}

/// Pods with a dotted service account on node-a and a 253-character one (63-character
/// namespace) on each node.
fn long_names_yaml(ns: &str, long_a: &str, long_b: &str) -> String {
    let pod = |name: &str, namespace: &str, node: &str, sa: &str, ip: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{namespace: {namespace}, name: {name}}}\n\
             spec: {{nodeName: {node}, serviceAccountName: {sa}, containers: [{{name: app, image: app}}]}}\n\
             status: {{podIP: {ip}}}\n---\n"
        )
    };
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n---\n{}{}{}",
        pod("reader-0", "lemo-dev", "node-a", "recall.reader", "10.244.0.20"),
        pod("long-a", ns, "node-a", long_a, "10.244.0.21"),
        pod("long-b", ns, "node-b", long_b, "10.244.1.21"),
    )
}

#[tokio::test]
async fn ca_grpc_issues_dotted_and_longest_identities_to_their_node_only() {
    logs();
    let setup = Setup::new();
    let ns = format!("n{}", "s".repeat(62));
    // Same 200-character start: only the full name tells them apart.
    let (long_a, long_b) = (format!("{}.{}", "p".repeat(200), "a".repeat(52)), format!("{}.{}", "p".repeat(200), "b".repeat(52)));
    std::fs::write(setup.path("config/long.yaml"), long_names_yaml(&ns, &long_a, &long_b)).expect("config");
    let ca = Running::start(setup.options("127.0.0.1:0".parse().expect("addr"))).await;
    let roots = Arc::new(crate::identity::load_roots(&setup.path("state/root-cert.pem")).expect("roots"));
    let client = CaClient::new(&setup.client_config(ca.addr, "node-a", "node-a.token"), roots).expect("client");

    for identity in [id("recall.reader"), Identity::in_default_domain(ns.as_str(), long_a.as_str())] {
        let request = new_csr(&identity).expect("csr");
        let chain = client.create_certificate(&request.csr_pem, Duration::ZERO).await.unwrap_or_else(|e| panic!("{identity}: {e}"));
        WorkloadCert::from_pem_chain(identity.clone(), &chain, request.key).expect("the certificate names the identity");
    }
    // node-b's pod, and names close to node-a's that no pod has.
    for identity in [
        Identity::in_default_domain(ns.as_str(), long_b.as_str()),
        id("recall"),
        id("recall.reader.v2"),
        Identity::in_default_domain(ns.as_str(), &long_a[..252]),
    ] {
        let request = new_csr(&identity).expect("csr");
        let err = client.create_certificate(&request.csr_pem, Duration::ZERO).await.expect_err(&identity.to_string());
        match &err {
            crate::identity::IdentityError::Ca { code, message } => {
                assert_eq!(*code, tonic::Code::PermissionDenied, "{message}");
                assert!(message.contains(&format!("identity {identity} is not allowed for node node-a")), "{message}");
            }
            other => panic!("unexpected {other}"),
        }
    }
    // An invalid name is refused as such, before any pod lookup.
    let request = new_csr(&id("Recall.Reader")).expect("csr");
    let err = client.create_certificate(&request.csr_pem, Duration::ZERO).await.expect_err("invalid");
    assert!(matches!(&err, crate::identity::IdentityError::Ca { code: tonic::Code::InvalidArgument, message } if message.contains("not a valid Kubernetes name")), "{err}");
    ca.stop().await;
}

#[tokio::test]
async fn ca_outage_keeps_serving_and_renewal_resumes() {
    logs();
    let setup = Setup::new();
    let opts = setup.options("127.0.0.1:0".parse().expect("addr"));
    let ca = Running::start(opts.clone()).await;
    let addr = ca.addr;
    let manager = CertManager::new(CertManagerConfig {
        ca: setup.client_config(addr, "node-a", "node-a.token"),
        trust_domain: "cluster.local".into(),
        // X.509 times are whole seconds, so a 4 s certificate lives 3 to 4 s.
        ttl: Duration::from_secs(4),
        rotation: RotationConfig { initial_backoff: Duration::from_millis(100), max_backoff: Duration::from_millis(300) },
    })
    .expect("manager");
    let me = id("bff");
    let first = manager.fetch(&me).await.expect("first certificate");
    ca.stop().await;

    // CA down until a little past the renewal point (half-life, <= 2 s): renewals fail and
    // the old certificate is still served.
    let past_refresh = first.refresh_at().duration_since(SystemTime::now()).unwrap_or_default();
    let down_until = tokio::time::Instant::now() + past_refresh + Duration::from_millis(400);
    assert!(first.not_after > SystemTime::now() + past_refresh + Duration::from_millis(800), "test timing");
    while tokio::time::Instant::now() < down_until {
        let cert = manager.fetch(&me).await.expect("served from cache while the CA is down");
        assert_eq!(cert.serial, first.serial);
        assert!(cert.is_valid_at(SystemTime::now()));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut back = opts;
    back.listen = addr;
    let ca = Running::start(back).await;
    let renewed_by = tokio::time::Instant::now() + Duration::from_secs(5);
    let renewed = loop {
        let cert = manager.fetch(&me).await.expect("fetch");
        assert!(cert.is_valid_at(SystemTime::now()), "never an expired certificate");
        if cert.serial != first.serial {
            break cert;
        }
        assert!(tokio::time::Instant::now() < renewed_by, "no renewal after the CA came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(renewed.not_after > first.not_after);
    ca.stop().await;
}

#[test]
fn ca_tokens_file_parses_and_authenticates() {
    let tokens = NodeTokens::parse("node-a: abc\nnode-b: 'def'\n").expect("tokens");
    assert_eq!(tokens.len(), 2);
    assert!(tokens.authenticate("node-a", "abc"));
    assert!(!tokens.authenticate("node-a", "def"));
    assert!(!tokens.authenticate("node-a", "ab"));
    assert!(!tokens.authenticate("node-c", "abc"));
    assert!(NodeTokens::parse("node-a: ''\n").expect_err("empty").contains("empty token"));
    assert!(NodeTokens::parse("- a\n- b\n").is_err());
}

// ---------- hardening: key policy, the reserved identity, budgets, the trust bundle ----------

/// CSRs made with openssl for `spiffe://cluster.local/ns/demo/sa/client` (rcgen with ring can
/// make neither RSA keys nor mismatched signatures).
fn fixture(name: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/ca/testdata").join(name)).expect(name)
}

#[test]
fn ca_signer_accepts_p256_p384_and_rsa2048_and_refuses_weak_or_mismatched_keys() {
    let signer = CaSigner::generate("cluster.local").expect("ca");
    let client = Identity::in_default_domain("demo", "client");
    // Accepted: P-256 (the node's own CSRs), P-384, RSA 2048, each with its signature.
    signer.sign_csr(&new_csr(&client).expect("csr").csr_pem, |_| true, Duration::ZERO).expect("P-256");
    for ok in ["p384.csr", "rsa2048.csr"] {
        let chain = signer.sign_csr(&fixture(ok), |_| true, Duration::ZERO).unwrap_or_else(|e| panic!("{ok}: {e}"));
        let leaf = rustls_pki_types::CertificateDer::from(pem::parse(&chain[0]).expect("pem").into_contents());
        assert_eq!(crate::identity::identity_from_cert(&leaf).expect("SAN"), client, "{ok}");
    }
    for (csr, message) in [
        ("rsa1024.csr", "CSR RSA key of 1024 bits is too weak; the CA accepts ECDSA P-256, ECDSA P-384 or RSA of 2048 to 8192 bits"),
        ("secp256k1.csr", "CSR ECDSA key on curve secp256k1 is not accepted; the CA accepts ECDSA P-256, ECDSA P-384 or RSA of 2048 to 8192 bits"),
        ("ed25519.csr", "CSR Ed25519 key is not accepted; the CA accepts ECDSA P-256, ECDSA P-384 or RSA of 2048 to 8192 bits"),
        ("p256-sha384.csr", "CSR signature algorithm ecdsa-with-SHA384 does not match its ECDSA P-256 key (expected ecdsa-with-SHA256)"),
        (
            "rsa2048-sha1.csr",
            "CSR signature algorithm sha1WithRSAEncryption does not match its RSA 2048-bit key (expected sha256WithRSAEncryption, sha384WithRSAEncryption or sha512WithRSAEncryption)",
        ),
    ] {
        let err = signer.sign_csr(&fixture(csr), |_| true, Duration::ZERO).expect_err(csr);
        assert_eq!(err.grpc_code(), tonic::Code::InvalidArgument, "{csr}: {err}");
        assert_eq!(err.to_string(), message, "{csr}");
    }
    // Not a CSR at all, or another PEM block.
    let err = signer.sign_csr(&signer.root_pem(), |_| true, Duration::ZERO).expect_err("a certificate");
    assert_eq!(err.to_string(), "invalid CSR: PEM block is \"CERTIFICATE\", expected \"CERTIFICATE REQUEST\"");
}

#[test]
fn ca_signer_never_issues_its_own_identity() {
    let signer = CaSigner::generate("cluster.local").expect("ca");
    let own = ca_identity("cluster.local");
    let expected = "identity spiffe://cluster.local/ns/istio-system/sa/mesh-ca is the CA's own (ServiceAccount istio-system/mesh-ca) and is never issued to workloads";
    for csr in [new_csr(&own).expect("csr").csr_pem, fixture("p256-ca-identity.csr")] {
        // Even when a pod with that ServiceAccount runs on the node (`|_| true`).
        let err = signer.sign_csr(&csr, |_| true, Duration::ZERO).expect_err("reserved");
        assert_eq!(err.grpc_code(), tonic::Code::PermissionDenied);
        assert_eq!(err.to_string(), expected);
    }
    // Another account of the CA's namespace is a workload like any other.
    let other = Identity::in_default_domain(CA_NAMESPACE, "istiod");
    signer.sign_csr(&new_csr(&other).expect("csr").csr_pem, |_| true, Duration::ZERO).expect("other account");
}

const CA_POD_YAML: &str = r#"
---
apiVersion: v1
kind: Pod
metadata:
  namespace: istio-system
  name: mesh-ca-0
spec:
  nodeName: node-a
  serviceAccountName: mesh-ca
  containers:
    - name: ca
      image: mesh
status:
  podIP: 10.244.0.11
"#;

#[tokio::test]
async fn ca_grpc_refuses_its_own_identity_and_rate_limits_each_node() {
    logs();
    let setup = Setup::new();
    // The CA's own pod runs on node-a: its identity is still refused to node-a.
    std::fs::write(setup.path("config/ca-pod.yaml"), CA_POD_YAML).expect("pod");
    let mut opts = setup.options("127.0.0.1:0".parse().expect("addr"));
    opts.limits = RequestLimits { per_second: 1.0, burst: 3, deadline: Duration::from_secs(5) };
    let ca = Running::start(opts).await;
    let roots = Arc::new(crate::identity::load_roots(&setup.path("state/root-cert.pem")).expect("roots"));
    let client = CaClient::new(&setup.client_config(ca.addr, "node-a", "node-a.token"), roots).expect("client");
    let own = new_csr(&ca_identity("cluster.local")).expect("csr");
    match client.create_certificate(&own.csr_pem, Duration::ZERO).await.expect_err("reserved") {
        crate::identity::IdentityError::Ca { code, message } => {
            assert_eq!(code, tonic::Code::PermissionDenied, "{message}");
            assert!(message.contains("is the CA's own (ServiceAccount istio-system/mesh-ca)"), "{message}");
        }
        other => panic!("unexpected {other}"),
    }
    // A weak key over gRPC: InvalidArgument naming it.
    let err = client.create_certificate(&fixture("rsa1024.csr"), Duration::ZERO).await.expect_err("weak");
    assert!(err.to_string().contains("RSA key of 1024 bits is too weak"), "{err}");
    // The burst of 3 is spent (two refusals count too); the next is refused until refilled.
    let request = new_csr(&id("bff")).expect("csr");
    client.create_certificate(&request.csr_pem, Duration::ZERO).await.expect("third within the burst");
    match client.create_certificate(&request.csr_pem, Duration::ZERO).await.expect_err("over the limit") {
        crate::identity::IdentityError::Ca { code, message } => {
            assert_eq!(code, tonic::Code::ResourceExhausted, "{message}");
            assert!(message.starts_with("rate limit: ip:127.0.0.1 made more than 3 requests at once or 1/s sustained; retry in "), "{message}");
        }
        other => panic!("unexpected {other}"),
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    client.create_certificate(&request.csr_pem, Duration::ZERO).await.expect("refilled");
    ca.stop().await;
}

#[tokio::test]
async fn ca_extra_roots_are_published_and_a_node_reloads_its_trust_bundle() {
    logs();
    let setup = Setup::new();
    // Root A signs; root B is published next to it (the first step of a rotation).
    let b = setup.path("b");
    std::fs::create_dir(&b).expect("dir");
    let (b_cert, b_key) = super::signer::new_root("cluster.local").expect("root b");
    std::fs::write(b.join("root-cert.pem"), &b_cert).expect("write");
    std::fs::write(b.join("root-key.pem"), &b_key).expect("write");
    let mut opts = setup.options("127.0.0.1:0".parse().expect("addr"));
    opts.extra_roots = Some(b.join("root-cert.pem"));
    let ca = Running::start(opts.clone()).await;
    let published = setup.path("state/root-cert.pem");
    let bundle = std::fs::read_to_string(&published).expect("bundle");
    assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 2, "{bundle}");
    assert!(bundle.ends_with(&b_cert), "the signing root first, then the extra one");
    // Restarting keeps root A as the signing root (the first of the file).
    ca.stop().await;
    let a = CaSigner::load_or_create(&setup.path("state"), "cluster.local").expect("load");
    assert!(bundle.starts_with(&a.root_pem()));

    // A node trusting only B... reloads A+B and then gets certificates from the CA signed by A.
    let node_roots = setup.path("node-root.pem");
    std::fs::write(&node_roots, &b_cert).expect("write");
    let ca = Running::start(opts.clone()).await;
    let manager = CertManager::new(CertManagerConfig {
        ca: CaClientConfig { root_poll: Duration::from_millis(50), ..setup.client_config(ca.addr, "node-a", "node-a.token") }
            .with_root(&node_roots),
        trust_domain: "cluster.local".into(),
        ttl: Duration::from_secs(600),
        rotation: RotationConfig { initial_backoff: Duration::from_millis(50), max_backoff: Duration::from_millis(200) },
    })
    .expect("manager");
    let err = manager.fetch(&id("bff")).await.expect_err("the CA's root A is not trusted yet");
    assert!(err.to_string().contains("not issued by a CA this mesh trusts"), "{err}");
    std::fs::write(&node_roots, &bundle).expect("write");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while manager.trust_bundle().len() != 2 {
        assert!(std::time::Instant::now() < deadline, "bundle reloaded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cert = manager.fetch(&id("bff")).await.expect("issued once A is trusted");
    assert!(manager.trust_bundle().contains(cert.chain.last().expect("root")));

    // The pod left: its identity is dropped and no longer renewed.
    let wanted = std::collections::BTreeSet::from([id("other")]);
    assert_eq!(manager.retain(&wanted), vec![id("bff")]);
    assert!(manager.cached(&id("bff")).is_none() && manager.identities().is_empty());

    // The bundle drops root A (B only): a certificate of A would be refused by peers, so the
    // manager renews at once — and the CA (still on A) is now untrusted, which it says.
    manager.fetch(&id("bff")).await.expect("issued again");
    std::fs::write(&node_roots, &b_cert).expect("write");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while manager.trust_bundle().len() != 1 {
        assert!(std::time::Instant::now() < deadline, "bundle reloaded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let broken = setup.path("node-root.pem");
    std::fs::write(&broken, "garbage").expect("write");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(manager.trust_bundle().len(), 1, "a broken file keeps the previous roots");
    ca.stop().await;
}
