//! Background renewal of one identity's certificate: at half its lifetime, retried with
//! exponential backoff and jitter while the CA fails. The current certificate keeps serving
//! until it expires, so a CA outage shorter than half a lifetime is invisible to traffic.

use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use tokio::task::AbortHandle;

use super::manager::{Inner, Slot};
use super::spiffe::Identity;

#[derive(Debug, Clone, Copy)]
pub struct RotationConfig {
    /// First retry delay after a failed renewal; doubles per failure.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RotationConfig {
    fn default() -> RotationConfig {
        RotationConfig { initial_backoff: Duration::from_millis(500), max_backoff: Duration::from_secs(30) }
    }
}

/// The task holds the manager weakly so that dropping the last `CertManager` ends it.
pub(super) fn spawn_rotation(inner: Weak<Inner>, id: Identity, slot: Arc<Slot>) -> AbortHandle {
    tokio::spawn(async move {
        loop {
            let Some(cert) = slot.current() else { return };
            let wait = cert.refresh_at().duration_since(SystemTime::now()).unwrap_or(Duration::ZERO);
            tokio::time::sleep(wait).await;
            if !renew_until_done(&inner, &id, &slot).await {
                return;
            }
        }
    })
    .abort_handle()
}

/// Returns false when the manager is gone.
async fn renew_until_done(inner: &Weak<Inner>, id: &Identity, slot: &Slot) -> bool {
    let mut attempt: u32 = 0;
    loop {
        let Some(manager) = inner.upgrade() else { return false };
        let config = manager.rotation;
        let result = manager.renew(id, slot).await;
        drop(manager);
        let error = match result {
            Ok(_) => return true,
            Err(error) => error,
        };
        attempt = attempt.saturating_add(1);
        let delay = backoff(config, attempt);
        let current = slot.current();
        let remaining = current
            .as_ref()
            .and_then(|cert| cert.not_after.duration_since(SystemTime::now()).ok());
        match remaining {
            Some(remaining) => tracing::warn!(
                identity = %id,
                attempt,
                retry_in = ?delay,
                current_valid_for = ?remaining,
                "certificate renewal failed, still serving the current certificate: {error}"
            ),
            None => tracing::warn!(
                identity = %id,
                attempt,
                retry_in = ?delay,
                "certificate renewal failed and the current certificate has expired: {error}"
            ),
        }
        tokio::time::sleep(delay).await;
    }
}

/// `initial * 2^(attempt-1)`, capped, then jittered into [d/2, d] so that nodes which lost
/// the CA together do not come back in lockstep.
fn backoff(config: RotationConfig, attempt: u32) -> Duration {
    let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(20));
    let full = config.initial_backoff.saturating_mul(factor).min(config.max_backoff);
    let half = full / 2;
    half + half.mul_f64(fastrand::f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_backoff_grows_caps_and_jitters() {
        let config = RotationConfig { initial_backoff: Duration::from_millis(100), max_backoff: Duration::from_secs(1) };
        for _ in 0..50 {
            let first = backoff(config, 1);
            assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100), "{first:?}");
            let third = backoff(config, 3);
            assert!(third >= Duration::from_millis(200) && third <= Duration::from_millis(400), "{third:?}");
            let late = backoff(config, 40);
            assert!(late >= Duration::from_millis(500) && late <= Duration::from_secs(1), "{late:?}");
        }
    }
}
