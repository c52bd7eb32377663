//! Mutual TLS for the tunnels between node proxies (Istio's HBONE: HTTP/2 CONNECT over TLS 1.3,
//! ALPN h2). The source proxy presents the source workload's certificate and checks that the
//! far proxy presents the destination pod's identity; the destination proxy accepts any mesh
//! identity (policy decides afterwards) and picks its certificate from the SNI, which names the
//! destination identity.
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
    identity::{self, CertManager, Identity, IdentityError, MeshClientVerifier},
};

#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("certificate for {identity}: {source}")]
    Certificate { identity: Identity, source: IdentityError },
    #[error("TLS with {peer}: {source}")]
    Handshake { peer: SocketAddr, source: std::io::Error },
    #[error("TLS setup: {0}")]
    Config(IdentityError),
}

/// Workload identities and TLS settings of this node.
pub struct MeshTls {
    certs: CertManager,
    acceptor: TlsAcceptor,
}

/// SNI carries the destination identity: SPIFFE IDs are not DNS names, and ServiceAccount and
/// namespace names are DNS labels.
const SNI_SUFFIX: &str = "identity.mesh";

pub fn sni_for(id: &Identity) -> String {
    format!("{}.{}.{SNI_SUFFIX}", id.service_account, id.namespace)
}

fn identity_from_sni(sni: &str, trust_domain: &str) -> Option<Identity> {
    let rest = sni.strip_suffix(SNI_SUFFIX)?.strip_suffix('.')?;
    let (sa, ns) = rest.split_once('.')?;
    (!ns.contains('.')).then(|| Identity::new(trust_domain, ns, sa))
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
        let id = identity_from_sni(hello.server_name()?, self.certs.trust_domain())?;
        let cert = self.certs.cached(&id)?;
        Some(cert.certified_key())
    }
}

impl MeshTls {
    pub fn new(certs: CertManager) -> Result<Self, HboneError> {
        let verifier = MeshClientVerifier::new(certs.roots(), certs.trust_domain().to_owned()).map_err(HboneError::Config)?;
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
        let name = ServerName::try_from(sni_for(destination)).map_err(|e| HboneError::Config(IdentityError::Tls(e.to_string())))?;
        TlsConnector::from(Arc::new(config)).connect(name, tcp).await.map_err(|source| HboneError::Handshake { peer, source })
    }

    /// Server side: the verified peer identity and the identity it asked for.
    pub async fn accept(&self, tcp: TcpStream, peer: SocketAddr) -> Result<(server::TlsStream<TcpStream>, Identity, Identity), HboneError> {
        let tls = self.acceptor.accept(tcp).await.map_err(|source| HboneError::Handshake { peer, source })?;
        let (_, conn) = tls.get_ref();
        let client = identity::tls::peer_identity(conn).map_err(HboneError::Config)?;
        let requested = conn
            .server_name()
            .and_then(|sni| identity_from_sni(sni, self.certs.trust_domain()))
            .ok_or_else(|| HboneError::Config(IdentityError::Tls("client sent no destination identity (SNI)".into())))?;
        Ok((tls, client, requested))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sni_round_trips_identities() {
        let id = Identity::new("cluster.local", "lemo-dev", "recall");
        assert_eq!(sni_for(&id), "recall.lemo-dev.identity.mesh");
        assert_eq!(identity_from_sni(&sni_for(&id), "cluster.local"), Some(id));
        assert_eq!(identity_from_sni("example.com", "cluster.local"), None);
        assert_eq!(identity_from_sni("a.b.c.identity.mesh", "cluster.local"), None);
    }
}
