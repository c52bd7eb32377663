//! The mesh trust bundle, reloadable: the roots every mesh handshake (and the CA connection) is
//! verified against. The node watches the root file (in Kubernetes the `mesh-ca-root`
//! ConfigMap, whose mounted file changes in place) and swaps the roots without a restart, which
//! makes a root rotation with overlap possible: publish old+new, switch the CA to the new
//! root, let the certificates renew, publish the new root alone (deploy/README.md, "Rotating
//! the root"). A file that cannot be read keeps the previous roots.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use super::error::IdentityError;

/// Roots plus a version that changes on every reload, so verifiers built from them can tell
/// when to rebuild.
#[derive(Debug)]
pub struct TrustBundle {
    state: RwLock<Roots>,
    version: AtomicU64,
}

#[derive(Debug, Clone)]
struct Roots {
    store: Arc<RootCertStore>,
    /// As read: to tell whether a certificate's root is still trusted, and the file's bytes
    /// to notice a change.
    certs: Vec<CertificateDer<'static>>,
    source: Vec<u8>,
}

impl TrustBundle {
    /// Roots that never change (tests, an in-process CA).
    pub fn fixed(store: RootCertStore) -> TrustBundle {
        TrustBundle::with(Roots { store: Arc::new(store), certs: Vec::new(), source: Vec::new() })
    }

    /// Reads the PEM roots of `path` (one certificate at least).
    pub fn load(path: &Path) -> Result<TrustBundle, IdentityError> {
        let pem = std::fs::read(path).map_err(|e| IdentityError::file(path, e))?;
        Ok(TrustBundle::with(parse(path, pem)?))
    }

    fn with(roots: Roots) -> TrustBundle {
        TrustBundle { state: RwLock::new(roots), version: AtomicU64::new(0) }
    }

    /// The roots in force.
    pub fn current(&self) -> Arc<RootCertStore> {
        self.state.read().unwrap_or_else(|e| e.into_inner()).store.clone()
    }

    /// Bumped on every change.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// How many roots are trusted.
    pub fn len(&self) -> usize {
        self.state.read().unwrap_or_else(|e| e.into_inner()).store.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `cert` is one of the roots as read from the file (false for a fixed bundle).
    pub fn contains(&self, cert: &CertificateDer<'_>) -> bool {
        self.state.read().unwrap_or_else(|e| e.into_inner()).certs.iter().any(|c| c.as_ref() == cert.as_ref())
    }

    /// Re-reads `path`: `Ok(true)` when the roots changed, `Ok(false)` when the file is the
    /// same; on an error the roots in force stay.
    pub fn reload(&self, path: &Path) -> Result<bool, IdentityError> {
        let pem = std::fs::read(path).map_err(|e| IdentityError::file(path, e))?;
        if self.state.read().unwrap_or_else(|e| e.into_inner()).source == pem {
            return Ok(false);
        }
        let roots = parse(path, pem)?;
        *self.state.write().unwrap_or_else(|e| e.into_inner()) = roots;
        self.version.fetch_add(1, Ordering::AcqRel);
        Ok(true)
    }
}

fn parse(path: &Path, pem: Vec<u8>) -> Result<Roots, IdentityError> {
    let mut store = RootCertStore::empty();
    let mut certs = Vec::new();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| IdentityError::file(path, e))?;
        store.add(cert.clone()).map_err(|e| IdentityError::file(path, e))?;
        certs.push(cert);
    }
    if store.is_empty() {
        return Err(IdentityError::file(path, "no certificate in the file"));
    }
    Ok(Roots { store: Arc::new(store), certs, source: pem })
}

/// Polls `path` every `interval` while `alive` says so; calls `changed` after each reload
/// that changed the roots. A broken file is reported once per distinct error.
pub(super) fn spawn_watch(
    bundle: Arc<TrustBundle>,
    path: PathBuf,
    interval: Duration,
    mut changed: impl FnMut() -> bool + Send + 'static,
) -> tokio::task::AbortHandle {
    tokio::spawn(async move {
        let mut last_error: Option<String> = None;
        let mut tick = tokio::time::interval(interval.max(Duration::from_millis(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            match bundle.reload(&path) {
                Ok(false) => last_error = None,
                Ok(true) => {
                    last_error = None;
                    tracing::info!(path = %path.display(), roots = bundle.len(), "trust bundle reloaded");
                    if !changed() {
                        return;
                    }
                }
                Err(e) => {
                    let e = e.to_string();
                    if last_error.as_ref() != Some(&e) {
                        tracing::warn!(roots = bundle.len(), "trust bundle not reloaded, keeping the previous roots: {e}");
                        last_error = Some(e);
                    }
                }
            }
        }
    })
    .abort_handle()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::CaSigner;

    #[test]
    fn reload_swaps_roots_only_on_a_change_and_keeps_them_on_a_broken_file() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("root-cert.pem");
        let (a, b) = (CaSigner::generate("cluster.local").expect("a"), CaSigner::generate("cluster.local").expect("b"));
        std::fs::write(&path, a.root_pem()).expect("write");
        let bundle = TrustBundle::load(&path).expect("load");
        assert_eq!((bundle.len(), bundle.version()), (1, 0));
        assert!(bundle.contains(&a.root_cert()) && !bundle.contains(&b.root_cert()));
        assert!(!bundle.reload(&path).expect("same"), "unchanged file");

        std::fs::write(&path, a.root_pem() + &b.root_pem()).expect("write");
        assert!(bundle.reload(&path).expect("changed"));
        assert_eq!((bundle.len(), bundle.version()), (2, 1));
        assert!(bundle.contains(&b.root_cert()));

        std::fs::write(&path, "not a certificate").expect("write");
        let err = bundle.reload(&path).expect_err("broken").to_string();
        assert!(err.contains("no certificate in the file"), "{err}");
        assert_eq!((bundle.len(), bundle.version()), (2, 1), "the previous roots stay");

        std::fs::write(&path, b.root_pem()).expect("write");
        assert!(bundle.reload(&path).expect("changed"));
        assert!(!bundle.contains(&a.root_cert()) && bundle.contains(&b.root_cert()));
    }
}
