//! Identity layer tests that need no CA server: IDs, issuance through an in-process signer,
//! the verifiers, TLS handshakes over an in-memory pipe, and the manager's cache and renewal.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::client::danger::ServerCertVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::{ServerName, UnixTime};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::*;
use crate::ca::CaSigner;

fn id(ns: &str, sa: &str) -> Identity {
    Identity::in_default_domain(ns, sa)
}

fn issue(signer: &CaSigner, identity: &Identity, ttl: Duration) -> WorkloadCert {
    let request = new_csr(identity).expect("csr");
    let chain = signer.sign_csr(&request.csr_pem, |_| true, ttl).expect("sign");
    WorkloadCert::from_pem_chain(identity.clone(), &chain, request.key).expect("cert")
}

fn unix(t: SystemTime) -> UnixTime {
    UnixTime::since_unix_epoch(t.duration_since(SystemTime::UNIX_EPOCH).expect("after epoch"))
}

#[test]
fn identity_spiffe_id_parses_and_prints() {
    let parsed: Identity = "spiffe://cluster.local/ns/lemo-dev/sa/bff".parse().expect("valid");
    assert_eq!(parsed, id("lemo-dev", "bff"));
    assert_eq!(parsed.to_string(), "spiffe://cluster.local/ns/lemo-dev/sa/bff");
    for (bad, why) in [
        ("http://cluster.local/ns/a/sa/b", "spiffe://"),
        ("spiffe://cluster.local", "no path"),
        ("spiffe:///ns/a/sa/b", "trust domain is empty"),
        ("spiffe://Cluster.local/ns/a/sa/b", "'C'"),
        ("spiffe://cluster.local/ns/a/sa/b/c", "/ns/<namespace>/sa/<service-account>"),
        ("spiffe://cluster.local/namespace/a/sa/b", "/ns/<namespace>/sa/<service-account>"),
        ("spiffe://cluster.local/ns//sa/b", "namespace: is empty"),
        ("spiffe://cluster.local/ns/a/sa/b?x=1", "query"),
    ] {
        let err = bad.parse::<Identity>().expect_err(bad).to_string();
        assert!(err.contains(why), "{bad}: {err}");
    }
}

/// A 63-character namespace and a 253-character service account with dots.
fn longest() -> Identity {
    id(&format!("n{}", "s".repeat(62)), &format!("{}.{}.{}", "a".repeat(100), "b".repeat(100), "c".repeat(51)))
}

#[test]
fn identity_service_accounts_with_dots_and_the_longest_names_round_trip_as_spiffe_ids() {
    let long = longest();
    assert_eq!((long.namespace.len(), long.service_account.len()), (63, 253));
    for identity in [id("lemo-dev", "recall.reader"), id("lemo-dev", "a.b.c"), long] {
        let uri = identity.to_string();
        assert_eq!(uri, format!("spiffe://cluster.local/ns/{}/sa/{}", identity.namespace, identity.service_account));
        assert_eq!(uri.parse::<Identity>().expect("parses"), identity);
        identity.check_kubernetes_names().expect("valid Kubernetes names");
    }
    // Dots never split a path segment: only '/' does.
    let err = "spiffe://cluster.local/ns/a/sa/b.c/d".parse::<Identity>().expect_err("extra segment").to_string();
    assert!(err.contains("/ns/<namespace>/sa/<service-account>"), "{err}");
}

#[test]
fn identity_kubernetes_name_check_names_the_bad_part() {
    for (identity, why) in [
        (id("lemo-dev", "Recall"), "service account \"Recall\" of spiffe://cluster.local/ns/lemo-dev/sa/Recall is not a valid Kubernetes name: it has the character 'R'"),
        (id("lemo-dev", "a..b"), "empty part between dots"),
        (id("lemo-dev", &"a".repeat(254)), "254 characters long, the limit is 253"),
        (id("lemo_dev", "bff"), "namespace \"lemo_dev\""),
        (id(&"n".repeat(64), "bff"), "64 characters long, the limit is 63"),
    ] {
        let err = identity.check_kubernetes_names().expect_err(&identity.to_string()).to_string();
        assert!(err.contains(why), "{identity}: {err}");
    }
}

#[test]
fn identity_certificates_of_dotted_and_longest_names_verify_both_ways() {
    let signer = CaSigner::generate("cluster.local").expect("ca");
    let roots = Arc::new(signer.roots());
    let name = ServerName::try_from("ignored").expect("name");
    for me in [id("lemo-dev", "recall.reader"), longest()] {
        let cert = issue(&signer, &me, Duration::from_secs(600));
        assert_eq!(identity_from_cert(cert.leaf()).expect("SAN read back"), me);
        MeshClientVerifier::new(roots.clone(), "cluster.local")
            .expect("verifier")
            .verify_client_cert(cert.leaf(), &[], UnixTime::now())
            .unwrap_or_else(|e| panic!("{me}: {e}"));
        MeshServerVerifier::new(roots.clone(), me.clone())
            .verify_server_cert(cert.leaf(), &[], &name, &[], UnixTime::now())
            .unwrap_or_else(|e| panic!("{me}: {e}"));
        // One character less is someone else.
        let mut shorter = me.clone();
        shorter.service_account.pop();
        let err = MeshServerVerifier::new(roots.clone(), shorter)
            .verify_server_cert(cert.leaf(), &[], &name, &[], UnixTime::now())
            .expect_err("another identity")
            .to_string();
        assert!(err.contains(&format!("peer identity is {me}")), "{err}");
    }
}

#[test]
fn identity_sign_and_verify_round_trip() {
    let signer = CaSigner::generate("cluster.local").expect("ca");
    let me = id("lemo-dev", "bff");
    let cert = issue(&signer, &me, Duration::from_secs(3600));
    assert_eq!(identity_from_cert(cert.leaf()).expect("id"), me);
    assert_eq!(cert.chain.len(), 2, "leaf and root");
    assert!(cert.is_valid_at(SystemTime::now()));
    let lifetime = cert.not_after.duration_since(SystemTime::now()).expect("future");
    assert!(lifetime <= Duration::from_secs(3600) && lifetime > Duration::from_secs(3590), "{lifetime:?}");

    let (_, leaf) = x509_parser::parse_x509_certificate(cert.leaf().as_ref()).expect("x509");
    assert!(!leaf.is_ca());
    let bc = leaf.basic_constraints().expect("bc").expect("basicConstraints present");
    assert!(!bc.value.ca);
    let ku = leaf.key_usage().expect("ku").expect("keyUsage present").value;
    assert!(ku.digital_signature() && ku.key_encipherment() && !ku.key_cert_sign());
    let eku = leaf.extended_key_usage().expect("eku").expect("extendedKeyUsage present").value;
    assert!(eku.server_auth && eku.client_auth);

    let roots = Arc::new(signer.roots());
    let now = UnixTime::now();
    MeshClientVerifier::new(roots.clone(), "cluster.local")
        .expect("verifier")
        .verify_client_cert(cert.leaf(), &[], now)
        .expect("client cert accepted");
    let name = ServerName::try_from("ignored").expect("name");
    MeshServerVerifier::new(roots, me)
        .verify_server_cert(cert.leaf(), &[], &name, &[], now)
        .expect("server cert accepted");
}

#[test]
fn identity_verifiers_reject_expired_foreign_and_wrong_identity() {
    let signer = CaSigner::generate("cluster.local").expect("ca");
    let other_ca = CaSigner::generate("cluster.local").expect("other ca");
    let me = id("lemo-dev", "bff");
    let cert = issue(&signer, &me, Duration::from_secs(60));
    let foreign = issue(&other_ca, &me, Duration::from_secs(60));
    let roots = Arc::new(signer.roots());
    let client_verifier = MeshClientVerifier::new(roots.clone(), "cluster.local").expect("verifier");
    let server_verifier = MeshServerVerifier::new(roots.clone(), me.clone());
    let name = ServerName::try_from("ignored").expect("name");
    let later = unix(cert.not_after + Duration::from_secs(3600));
    let now = UnixTime::now();

    let expired_c = client_verifier.verify_client_cert(cert.leaf(), &[], later).expect_err("expired").to_string();
    let expired_s = server_verifier.verify_server_cert(cert.leaf(), &[], &name, &[], later).expect_err("expired");
    let foreign_c = client_verifier.verify_client_cert(foreign.leaf(), &[], now).expect_err("foreign").to_string();
    let foreign_s = server_verifier.verify_server_cert(foreign.leaf(), &[], &name, &[], now).expect_err("foreign");
    assert!(expired_c.contains("expired"), "{expired_c}");
    assert!(expired_s.to_string().contains("expired"), "{expired_s}");
    assert!(foreign_c.contains("not issued by a CA this mesh trusts"), "{foreign_c}");
    assert!(foreign_s.to_string().contains("not issued by a CA this mesh trusts"), "{foreign_s}");
    assert!(!foreign_c.contains("expired") && !expired_c.contains("trusts"), "distinguishable reasons");

    let wrong = MeshServerVerifier::new(roots, id("lemo-dev", "recall"))
        .verify_server_cert(cert.leaf(), &[], &name, &[], now)
        .expect_err("wrong identity")
        .to_string();
    assert!(
        wrong.contains("peer identity is spiffe://cluster.local/ns/lemo-dev/sa/bff, expected spiffe://cluster.local/ns/lemo-dev/sa/recall"),
        "{wrong}"
    );
}

/// Runs a handshake over an in-memory pipe; returns what each side saw.
async fn handshake(
    server: rustls::ServerConfig,
    client: rustls::ClientConfig,
) -> (Result<Identity, String>, Result<Identity, String>) {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let acceptor = TlsAcceptor::from(Arc::new(server));
    let connector = TlsConnector::from(Arc::new(client));
    let name = ServerName::try_from("10.244.0.10").expect("name");
    // Each side keeps its stream until both are done: the server writes session tickets after
    // the client considers the handshake complete.
    let ((server_side, _s), (client_side, _c)) = tokio::join!(
        async {
            match acceptor.accept(a).await {
                Ok(tls) => (tls::peer_identity(tls.get_ref().1).map_err(|e| e.to_string()), Some(tls)),
                Err(e) => (Err(e.to_string()), None),
            }
        },
        async {
            match connector.connect(name, b).await {
                Ok(tls) => (tls::peer_identity(tls.get_ref().1).map_err(|e| e.to_string()), Some(tls)),
                Err(e) => (Err(e.to_string()), None),
            }
        }
    );
    (server_side, client_side)
}

#[tokio::test]
async fn identity_tls_handshake_checks_both_sides() {
    let signer = CaSigner::generate("cluster.local").expect("ca");
    let other_ca = CaSigner::generate("cluster.local").expect("other ca");
    let roots = Arc::new(signer.roots());
    let (bff, recall) = (id("lemo-dev", "bff"), id("lemo-dev", "recall"));
    let client_cert = issue(&signer, &bff, Duration::from_secs(600));
    let server_cert = issue(&signer, &recall, Duration::from_secs(600));

    let server = tls::server_config(&server_cert, roots.clone()).expect("server config");
    let client = tls::client_config(&client_cert, roots.clone(), recall.clone()).expect("client config");
    let (server_saw, client_saw) = handshake(server, client).await;
    assert_eq!(server_saw.expect("server side"), bff);
    assert_eq!(client_saw.expect("client side"), recall);

    // The client expected someone else.
    let server = tls::server_config(&server_cert, roots.clone()).expect("server config");
    let client = tls::client_config(&client_cert, roots.clone(), id("lemo-dev", "rank")).expect("client config");
    let (_, client_saw) = handshake(server, client).await;
    let err = client_saw.expect_err("wrong identity refused");
    assert!(err.contains("expected spiffe://cluster.local/ns/lemo-dev/sa/rank"), "{err}");

    // A client with a certificate of another CA.
    let intruder = issue(&other_ca, &bff, Duration::from_secs(600));
    let server = tls::server_config(&server_cert, roots.clone()).expect("server config");
    let client = tls::client_config(&intruder, roots.clone(), recall.clone()).expect("client config");
    let (server_saw, _) = handshake(server, client).await;
    let err = server_saw.expect_err("foreign CA refused");
    assert!(err.contains("not issued by a CA this mesh trusts"), "{err}");
}

#[tokio::test]
async fn identity_tls_handshake_refuses_expired_certificate() {
    let signer = CaSigner::generate("cluster.local").expect("ca");
    let roots = Arc::new(signer.roots());
    let (bff, recall) = (id("lemo-dev", "bff"), id("lemo-dev", "recall"));
    let client_cert = issue(&signer, &bff, Duration::from_secs(600));
    let short = issue(&signer, &recall, Duration::from_secs(1));
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let server = tls::server_config(&short, roots.clone()).expect("server config");
    let client = tls::client_config(&client_cert, roots, recall).expect("client config");
    let (_, client_saw) = handshake(server, client).await;
    let err = client_saw.expect_err("expired refused");
    assert!(err.contains("expired"), "{err}");
}

#[tokio::test]
async fn identity_manager_shares_one_issuance_between_concurrent_callers() {
    let signer = Arc::new(CaSigner::generate("cluster.local").expect("ca"));
    let manager = CertManager::in_memory(signer, Duration::from_secs(600));
    let me = id("lemo-dev", "bff");
    let fetches: Vec<_> = (0..16)
        .map(|_| {
            let (manager, me) = (manager.clone(), me.clone());
            tokio::spawn(async move { manager.fetch(&me).await })
        })
        .collect();
    let mut serials = std::collections::BTreeSet::new();
    for fetch in fetches {
        serials.insert(fetch.await.expect("task").expect("fetch").serial.clone());
    }
    assert_eq!(serials.len(), 1, "one certificate for all callers: {serials:?}");
    assert!(manager.cached(&me).is_some());

    let foreign = Identity::new("other.domain", "lemo-dev", "bff");
    let err = manager.fetch(&foreign).await.expect_err("foreign trust domain").to_string();
    assert!(err.contains("not in trust domain"), "{err}");
}

#[tokio::test]
async fn identity_manager_renews_at_half_life_and_never_serves_expired() {
    let signer = Arc::new(CaSigner::generate("cluster.local").expect("ca"));
    let manager = CertManager::in_memory(signer, Duration::from_secs(3));
    let me = id("lemo-dev", "bff");
    let first = manager.fetch(&me).await.expect("fetch");
    let mut seen = vec![first.serial.clone()];
    let deadline = tokio::time::Instant::now() + Duration::from_millis(4500);
    while tokio::time::Instant::now() < deadline {
        let cert = manager.fetch(&me).await.expect("fetch");
        assert!(cert.is_valid_at(SystemTime::now()), "fetch returned an expired certificate");
        if seen.last() != Some(&cert.serial) {
            // Renewed while the previous one was still valid: at about half of 3 s.
            assert!(first.is_valid_at(SystemTime::now()) || seen.len() > 1, "renewed only after expiry");
            seen.push(cert.serial.clone());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(seen.len() >= 3, "expected renewals at ~1.5 s and ~3 s, saw {seen:?}");
    let latest = manager.fetch(&me).await.expect("fetch");
    assert!(latest.not_after > first.not_after);
}

#[test]
fn identity_types_are_shareable_across_tasks() {
    fn shareable<T: Send + Sync + 'static>() {}
    shareable::<CertManager>();
    shareable::<WorkloadCert>();
    shareable::<CaSigner>();
    shareable::<CaClient>();
    shareable::<IdentityError>();
}
