//! Mutual TLS for the tunnels between node proxies (Istio's HBONE: HTTP/2 CONNECT over TLS 1.3,
//! ALPN h2). The source proxy presents the source workload's certificate and checks that the
//! far proxy presents the destination pod's identity; the destination proxy accepts any mesh
//! identity (policy decides afterwards) and picks its certificate from the SNI, which names the
//! destination identity ([`identity::sni`]: every valid ServiceAccount name has one).
use std::{net::SocketAddr, sync::Arc};

use rustls::{
    ServerConfig,
    pki_types::ServerName,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

use crate::{
    config::Pod,
    identity::{self, CertManager, Identity, IdentityError, MeshClientVerifier, SniError, sni_for},
};

#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("certificate for {identity}: {source}")]
    Certificate { identity: Identity, source: IdentityError },
    #[error("TLS with {peer}: {source}")]
    Handshake { peer: SocketAddr, source: std::io::Error },
    #[error("TLS setup: {0}")]
    Config(IdentityError),
    #[error("TLS server name: {0}")]
    Sni(#[from] SniError),
}

/// Workload identities and TLS settings of this node.
pub struct MeshTls {
    certs: CertManager,
    acceptor: TlsAcceptor,
}

/// The identity a client asked for in its SNI, among this node's (see [`identity::sni`]).
fn requested_identity(certs: &CertManager, sni: Option<&str>) -> Result<Identity, SniError> {
    identity::identity_from_sni(sni, certs.trust_domain(), || certs.identities())
}

/// Picks the certificate of the identity the client asked for, among this node's workloads.
struct SniResolver {
    certs: CertManager,
}

impl std::fmt::Debug for SniResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SniResolver")
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // rustls only says "no server certificate chain resolved": the reason is logged here.
        let id = requested_identity(&self.certs, hello.server_name())
            .inspect_err(|e| tracing::warn!("inbound TLS: {e}"))
            .ok()?;
        let cert = self.certs.cached(&id);
        if cert.is_none() {
            tracing::warn!(identity = %id, "inbound TLS: the SNI asks for an identity this node has no certificate for");
        }
        Some(cert?.certified_key())
    }
}

impl MeshTls {
    pub fn new(certs: CertManager) -> Result<Self, HboneError> {
        let verifier = MeshClientVerifier::reloading(certs.trust_bundle(), certs.trust_domain().to_owned()).map_err(HboneError::Config)?;
        let mut server = ServerConfig::builder_with_provider(identity::tls::crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| HboneError::Config(IdentityError::Tls(e.to_string())))?
            .with_client_cert_verifier(Arc::new(verifier))
            .with_cert_resolver(Arc::new(SniResolver { certs: certs.clone() }));
        server.alpn_protocols = vec![identity::tls::ALPN_H2.to_vec()];
        Ok(Self { certs, acceptor: TlsAcceptor::from(Arc::new(server)) })
    }

    pub fn certs(&self) -> &CertManager {
        &self.certs
    }

    pub fn identity_of(&self, pod: &Pod) -> Identity {
        Identity::new(self.certs.trust_domain(), &pod.namespace, &pod.service_account)
    }

    /// Client side of a tunnel connection: presents `source`, requires `destination`.
    pub async fn connect(&self, tcp: TcpStream, peer: SocketAddr, source: &Identity, destination: &Identity) -> Result<client::TlsStream<TcpStream>, HboneError> {
        let cert = self.certs.fetch(source).await.map_err(|e| HboneError::Certificate { identity: source.clone(), source: e })?;
        let config = identity::tls::client_config(&cert, self.certs.roots(), destination.clone()).map_err(HboneError::Config)?;
        let sni = sni_for(destination)?;
        let name = ServerName::try_from(sni).map_err(|e| HboneError::Config(IdentityError::Tls(e.to_string())))?;
        TlsConnector::from(Arc::new(config)).connect(name, tcp).await.map_err(|source| HboneError::Handshake { peer, source })
    }

    /// Server side: the verified peer identity and the identity it asked for.
    pub async fn accept(&self, tcp: TcpStream, peer: SocketAddr) -> Result<(server::TlsStream<TcpStream>, Identity, Identity), HboneError> {
        let tls = self.acceptor.accept(tcp).await.map_err(|source| HboneError::Handshake { peer, source })?;
        let (_, conn) = tls.get_ref();
        let client = identity::tls::peer_identity(conn).map_err(HboneError::Config)?;
        let requested = requested_identity(&self.certs, conn.server_name())?;
        Ok((tls, client, requested))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::net::TcpListener;

    use super::*;
    use crate::ca::CaSigner;

    fn id(ns: &str, sa: &str) -> Identity {
        Identity::in_default_domain(ns, sa)
    }

    /// One tunnel handshake over loopback: what the server side saw (client identity, requested
    /// identity) or its error, and the client's result.
    async fn handshake(server: &MeshTls, client: &MeshTls, source: &Identity, destination: &Identity) -> (Result<(Identity, Identity), String>, Result<(), String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accept = async {
            let (tcp, peer) = listener.accept().await.expect("accept");
            match server.accept(tcp, peer).await {
                Ok((tls, client, requested)) => (Ok((client, requested)), Some(tls)),
                Err(e) => (Err(e.to_string()), None),
            }
        };
        let connect = async {
            let tcp = TcpStream::connect(addr).await.expect("connect");
            match client.connect(tcp, addr, source, destination).await {
                Ok(tls) => (Ok(()), Some(tls)),
                Err(e) => (Err(e.to_string()), None),
            }
        };
        // Both streams live until both sides are done (session tickets follow the handshake).
        let ((server_saw, _s), (client_saw, _c)) = tokio::join!(accept, connect);
        (server_saw, client_saw)
    }

    #[tokio::test]
    async fn tunnels_reach_identities_with_dots_and_the_longest_names() {
        let signer = Arc::new(CaSigner::generate("cluster.local").expect("ca"));
        let (server_certs, client_certs) = (CertManager::in_memory(signer.clone(), Duration::from_secs(600)), CertManager::in_memory(signer, Duration::from_secs(600)));
        let ns63 = format!("n{}", "s".repeat(62));
        let shared = "p".repeat(200);
        let destinations = [
            id("lemo-dev", "recall"),
            id("lemo-dev", "recall.reader"),
            id(&ns63, &"a".repeat(253)),
            // Two 253-character names that share 200 characters, on one node.
            id(&ns63, &format!("{shared}.{}", "a".repeat(52))),
            id(&ns63, &format!("{shared}.{}", "b".repeat(52))),
        ];
        // The destination node holds certificates for its workloads, as the daemon does.
        for d in &destinations {
            server_certs.fetch(d).await.unwrap_or_else(|e| panic!("{d}: {e}"));
        }
        let server = MeshTls::new(server_certs).expect("server");
        let client = MeshTls::new(client_certs).expect("client");
        let source = id(&ns63, &format!("{}.{}", "c".repeat(126), "d".repeat(126)));
        for destination in &destinations {
            let (server_saw, client_saw) = handshake(&server, &client, &source, destination).await;
            client_saw.unwrap_or_else(|e| panic!("{destination}: {e}"));
            assert_eq!(server_saw.expect("accepted"), (source.clone(), destination.clone()));
        }

        // A hashed name the destination holds no certificate for: refused, saying so.
        let stranger = id(&ns63, &format!("{shared}.{}", "z".repeat(52)));
        let (server_saw, client_saw) = handshake(&server, &client, &source, &stranger).await;
        assert!(client_saw.is_err(), "no certificate to present");
        let err = server_saw.expect_err("refused");
        assert!(err.contains("TLS with 127.0.0.1"), "{err}");
    }

    #[tokio::test]
    async fn a_client_cannot_ask_for_an_identity_kubernetes_would_refuse() {
        let signer = Arc::new(CaSigner::generate("cluster.local").expect("ca"));
        let client = MeshTls::new(CertManager::in_memory(signer, Duration::from_secs(600))).expect("client");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let peer = listener.local_addr().expect("addr");
        let tcp = TcpStream::connect(peer).await.expect("connect");
        let err = client.connect(tcp, peer, &id("demo", "client"), &id("demo", "Bad_Name")).await.expect_err("invalid").to_string();
        assert!(err.contains("TLS server name") && err.contains("service account \"Bad_Name\""), "{err}");
    }
}
