//! The node's certificate cache: one certificate per workload identity, issued on first use,
//! renewed in the background, shared by every connection of that identity.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::task::AbortHandle;

use super::ca_client::{CaClient, CaClientConfig};
use super::cert::WorkloadCert;
use super::csr::new_csr;
use super::error::IdentityError;
use super::rotation::{RotationConfig, spawn_rotation};
use super::spiffe::Identity;
use super::trust::{TrustBundle, spawn_watch};
use crate::ca::CaSigner;

/// How the node gets its certificates.
#[derive(Debug, Clone)]
pub struct CertManagerConfig {
    pub ca: CaClientConfig,
    pub trust_domain: String,
    /// Requested lifetime; the CA may cap it.
    pub ttl: Duration,
    pub rotation: RotationConfig,
}

/// Cheap to clone; all clones share one cache. Background renewals stop when the last clone is
/// dropped.
#[derive(Clone)]
pub struct CertManager {
    inner: Arc<Inner>,
}

pub(super) struct Inner {
    issuer: Issuer,
    roots: Arc<TrustBundle>,
    /// The root file's watch, when there is a file.
    watch: Mutex<Option<AbortHandle>>,
    trust_domain: String,
    ttl: Duration,
    pub(super) rotation: RotationConfig,
    slots: Mutex<HashMap<Identity, Arc<Slot>>>,
}

enum Issuer {
    Remote(CaClient),
    /// In-process CA, for tests and single-binary setups.
    Local(Arc<CaSigner>),
}

/// One identity's state. `current` is read on every fetch without waiting on an issuance in
/// flight; `issuing` serializes CA requests so concurrent callers share one.
pub(super) struct Slot {
    current: RwLock<Option<Arc<WorkloadCert>>>,
    issuing: tokio::sync::Mutex<Option<Failure>>,
    rotation: Mutex<Option<AbortHandle>>,
}

/// The last failed issuance, handed to callers that were already waiting for it.
struct Failure {
    at: Instant,
    error: IdentityError,
}

impl CertManager {
    /// A manager that requests certificates from a remote CA. Reads the root file now.
    /// Inside a Tokio runtime it also watches the root file (`ca.root_poll`): a changed trust
    /// bundle applies to the next handshake, and a certificate whose root left the bundle is
    /// renewed at once.
    pub fn new(config: CertManagerConfig) -> Result<CertManager, IdentityError> {
        let roots = Arc::new(TrustBundle::load(&config.ca.root_cert)?);
        let client = CaClient::reloading(&config.ca, roots.clone())?;
        let manager =
            CertManager::with_issuer(Issuer::Remote(client), roots.clone(), config.trust_domain, config.ttl, config.rotation);
        if tokio::runtime::Handle::try_current().is_ok() && !config.ca.root_poll.is_zero() {
            let weak = Arc::downgrade(&manager.inner);
            let task = spawn_watch(roots, config.ca.root_cert.clone(), config.ca.root_poll, move || {
                match weak.upgrade() {
                    Some(inner) => {
                        CertManager { inner }.renew_untrusted();
                        true
                    }
                    None => false,
                }
            });
            *manager.inner.watch.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
        }
        Ok(manager)
    }

    /// A manager whose certificates come from an in-process [`CaSigner`] (no network, every
    /// identity of the signer's trust domain allowed): for tests of TLS without a running CA.
    pub fn in_memory(ca: Arc<CaSigner>, ttl: Duration) -> CertManager {
        let roots = Arc::new(TrustBundle::fixed(ca.roots()));
        let trust_domain = ca.trust_domain().to_string();
        CertManager::with_issuer(Issuer::Local(ca), roots, trust_domain, ttl, RotationConfig::default())
    }

    fn with_issuer(
        issuer: Issuer,
        roots: Arc<TrustBundle>,
        trust_domain: String,
        ttl: Duration,
        rotation: RotationConfig,
    ) -> CertManager {
        CertManager {
            inner: Arc::new(Inner {
                issuer,
                roots,
                watch: Mutex::new(None),
                trust_domain,
                ttl,
                rotation,
                slots: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// A valid certificate for `id`: the cached one, or a new one from the CA. Concurrent
    /// callers for one identity share a single CA request. Never returns an expired
    /// certificate. Must be called inside a Tokio runtime (it starts the renewal task).
    pub async fn fetch(&self, id: &Identity) -> Result<Arc<WorkloadCert>, IdentityError> {
        if id.trust_domain != self.inner.trust_domain {
            return Err(IdentityError::ForeignTrustDomain {
                identity: Box::new(id.clone()),
                expected: self.inner.trust_domain.clone(),
            });
        }
        let slot = self.inner.slot(id);
        if let Some(cert) = slot.valid() {
            return Ok(cert);
        }
        let cert = self.inner.issue_into(id, &slot, Instant::now()).await?;
        self.ensure_rotation(id, &slot);
        Ok(cert)
    }

    /// The cached certificate of `id` if it is still valid; never contacts the CA.
    pub fn cached(&self, id: &Identity) -> Option<Arc<WorkloadCert>> {
        let slots = self.inner.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.get(id).and_then(|slot| slot.valid())
    }

    /// The identities this manager holds (or is getting) certificates for: the node's
    /// workloads. A hashed SNI is resolved against them.
    pub fn identities(&self) -> Vec<Identity> {
        self.inner.slots.lock().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect()
    }

    /// Stops renewing `id` and drops its certificate (the pod left the node).
    pub fn forget(&self, id: &Identity) {
        let removed = self.inner.slots.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
        if let Some(slot) = removed {
            slot.stop_rotation();
        }
    }

    /// Keeps certificates (and their renewal) only for `wanted`, the identities of the pods
    /// now on this node; returns those dropped. Renewing for a pod that left would only ask
    /// the CA for what it must refuse, forever.
    pub fn retain(&self, wanted: &std::collections::BTreeSet<Identity>) -> Vec<Identity> {
        let removed: Vec<(Identity, Arc<Slot>)> = {
            let mut slots = self.inner.slots.lock().unwrap_or_else(|p| p.into_inner());
            let gone: Vec<Identity> = slots.keys().filter(|id| !wanted.contains(*id)).cloned().collect();
            gone.into_iter().filter_map(|id| slots.remove(&id).map(|slot| (id, slot))).collect()
        };
        for (id, slot) in &removed {
            slot.stop_rotation();
            tracing::info!(identity = %id, "no pod of this identity on the node any more: certificate dropped, renewal stopped");
        }
        removed.into_iter().map(|(id, _)| id).collect()
    }

    /// Mesh trust anchors of the moment: verify peers against these.
    pub fn roots(&self) -> Arc<RootCertStore> {
        self.inner.roots.current()
    }

    /// The reloadable trust bundle (for verifiers that outlive one handshake).
    pub fn trust_bundle(&self) -> Arc<TrustBundle> {
        self.inner.roots.clone()
    }

    /// After a bundle change: renews now every certificate whose root is no longer trusted
    /// (peers would refuse it), in the background.
    fn renew_untrusted(&self) {
        let slots: Vec<(Identity, Arc<Slot>)> =
            self.inner.slots.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        for (id, slot) in slots {
            let Some(cert) = slot.current() else { continue };
            if cert.chain.last().is_some_and(|root| self.inner.roots.contains(root)) {
                continue;
            }
            tracing::info!(identity = %id, serial = %cert.serial, "certificate's root is no longer in the trust bundle: renewing now");
            let inner = self.inner.clone();
            tokio::spawn(async move {
                if let Err(e) = inner.renew(&id, &slot).await {
                    tracing::warn!(identity = %id, "renewal after a trust bundle change failed (the rotation task retries): {e}");
                }
            });
        }
    }

    pub fn trust_domain(&self) -> &str {
        &self.inner.trust_domain
    }

    fn ensure_rotation(&self, id: &Identity, slot: &Arc<Slot>) {
        let mut rotation = slot.rotation.lock().unwrap_or_else(|p| p.into_inner());
        if rotation.as_ref().is_none_or(|task| task.is_finished()) {
            *rotation = Some(spawn_rotation(Arc::downgrade(&self.inner), id.clone(), slot.clone()));
        }
    }
}

impl Inner {
    fn slot(&self, id: &Identity) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.entry(id.clone()).or_insert_with(|| Arc::new(Slot::new())).clone()
    }

    /// Issues a certificate into `slot` unless one that is valid appeared, or an issuance that
    /// ended after `since` failed, while this caller waited its turn.
    pub(super) async fn issue_into(
        &self,
        id: &Identity,
        slot: &Slot,
        since: Instant,
    ) -> Result<Arc<WorkloadCert>, IdentityError> {
        let mut last_failure = slot.issuing.lock().await;
        if let Some(cert) = slot.valid() {
            return Ok(cert);
        }
        if let Some(failure) = last_failure.as_ref().filter(|f| f.at >= since) {
            return Err(failure.error.clone());
        }
        self.renew_locked(id, slot, &mut last_failure).await
    }

    /// Issues a new certificate even if the current one is valid (rotation).
    pub(super) async fn renew(&self, id: &Identity, slot: &Slot) -> Result<Arc<WorkloadCert>, IdentityError> {
        let mut last_failure = slot.issuing.lock().await;
        self.renew_locked(id, slot, &mut last_failure).await
    }

    async fn renew_locked(
        &self,
        id: &Identity,
        slot: &Slot,
        last_failure: &mut Option<Failure>,
    ) -> Result<Arc<WorkloadCert>, IdentityError> {
        match self.issue(id).await {
            Ok(cert) => {
                *last_failure = None;
                let cert = Arc::new(cert);
                *slot.current.write().unwrap_or_else(|p| p.into_inner()) = Some(cert.clone());
                let valid_for = cert.not_after.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO);
                tracing::info!(identity = %id, serial = %cert.serial, ?valid_for, "workload certificate issued");
                Ok(cert)
            }
            Err(error) => {
                *last_failure = Some(Failure { at: Instant::now(), error: error.clone() });
                Err(error)
            }
        }
    }

    async fn issue(&self, id: &Identity) -> Result<WorkloadCert, IdentityError> {
        let request = new_csr(id)?;
        let chain = match &self.issuer {
            Issuer::Remote(client) => client.create_certificate(&request.csr_pem, self.ttl).await?,
            Issuer::Local(signer) => signer
                .sign_csr(&request.csr_pem, |_| true, self.ttl)
                .map_err(|e| IdentityError::Ca { code: e.grpc_code(), message: e.to_string() })?,
        };
        WorkloadCert::from_pem_chain(id.clone(), &chain, request.key)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(task) = self.watch.get_mut().unwrap_or_else(|p| p.into_inner()).take() {
            task.abort();
        }
        let slots = self.slots.get_mut().unwrap_or_else(|p| p.into_inner());
        for slot in slots.values() {
            slot.stop_rotation();
        }
    }
}

impl Slot {
    fn new() -> Slot {
        Slot { current: RwLock::new(None), issuing: tokio::sync::Mutex::new(None), rotation: Mutex::new(None) }
    }

    pub(super) fn current(&self) -> Option<Arc<WorkloadCert>> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn valid(&self) -> Option<Arc<WorkloadCert>> {
        self.current().filter(|cert| cert.is_valid_at(SystemTime::now()))
    }

    fn stop_rotation(&self) {
        if let Some(task) = self.rotation.lock().unwrap_or_else(|p| p.into_inner()).take() {
            task.abort();
        }
    }
}

/// Reads every certificate of a PEM file into a root store.
pub fn load_roots(path: &Path) -> Result<RootCertStore, IdentityError> {
    let pem = std::fs::read(path).map_err(|e| IdentityError::file(path, e))?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| IdentityError::file(path, e))?;
        roots.add(cert).map_err(|e| IdentityError::file(path, e))?;
    }
    if roots.is_empty() {
        return Err(IdentityError::file(path, "no certificate in the file"));
    }
    Ok(roots)
}
