//! Connections to this node's mesh pods that no proxy carries: plaintext callers from outside
//! the mesh, judged in the kernel at the pod (`capture::inbound`). The kernel counts attempts
//! per pod; each config rescan turns the new counts into series: the allowed ones (and the
//! kubelet's probes) as `istio_tcp_connections_opened_total` reported by the destination, from
//! an unknown source, `connection_security_policy="none"`, as Istio reports a plaintext
//! connection; the refused ones as `mesh_inbound_plaintext_denied_total` by reason. Bytes are
//! not counted: no proxy sees them.
use std::{collections::BTreeMap, net::Ipv4Addr, sync::Mutex};

use mesh_common::PlaintextStats;
use prometheus::{IntCounterVec, Opts, Registry};

use super::{
    TelemetryError,
    metrics::{IstioMetrics, Peering, Reporter, Security},
    workload::Peers,
};

pub struct PlaintextMetrics {
    denied: IntCounterVec,
    /// The kernel's counts at the last read.
    seen: Mutex<BTreeMap<Ipv4Addr, PlaintextStats>>,
}

impl PlaintextMetrics {
    pub fn register(registry: &Registry) -> Result<Self, TelemetryError> {
        let denied = IntCounterVec::new(
            Opts::new("mesh_inbound_plaintext_denied_total", "Plaintext connection attempts to a mesh pod refused in the kernel (reason: strict, authz)"),
            &["destination_workload", "destination_workload_namespace", "reason"],
        )?;
        registry.register(Box::new(denied.clone()))?;
        Ok(Self { denied, seen: Mutex::default() })
    }

    pub fn record(&self, istio: &IstioMetrics, peers: &Peers, counts: &BTreeMap<Ipv4Addr, PlaintextStats>) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        for (ip, now) in counts {
            let before = seen.get(ip).copied().unwrap_or_default();
            // A count below the last one started over (an evicted entry, new maps).
            let delta = |now: u64, before: u64| if now >= before { now - before } else { now };
            let destination = peers.workload((*ip).into());
            let opened = delta(now.allowed, before.allowed) + delta(now.probes, before.probes);
            if opened > 0 {
                let peering = Peering { reporter: Reporter::Destination, source: peers.unknown(), destination, service: peers.unknown_service(), security: Security::None };
                istio.count_tcp_opened(&peering, "-", opened);
            }
            for (reason, n) in [("strict", delta(now.strict_denied, before.strict_denied)), ("authz", delta(now.authz_denied, before.authz_denied))] {
                if n > 0 {
                    self.denied.with_label_values(&[&destination.name, &destination.namespace, reason]).inc_by(n);
                }
            }
        }
        *seen = counts.clone();
    }
}
