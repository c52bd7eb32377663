//! One upstream cluster's balancer: endpoints, policy, consistent-hash table, active-request
//! counts and outlier state, kept across config reloads for endpoints that stay.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use serde::Serialize;

use super::{
    Outcome, Pick, PickError,
    algorithms::{self, HashTable, Policy},
    clock::{Clock, SystemClock},
    least_request::{self, ActiveRequest},
    outlier::{HostOutlier, OutlierConfig},
    peak_ewma::{self, Estimate},
};
use crate::config::{Endpoint, LbPolicy, OutlierDetection};

/// Send + Sync; share it as `Arc`. Every operation takes one short per-cluster lock.
pub struct ClusterBalancer {
    name: String,
    clock: Arc<dyn Clock>,
    /// The policy is PEAK_EWMA: latency reports are recorded (otherwise they skip the lock).
    latency_aware: AtomicBool,
    state: Mutex<State>,
}

struct State {
    hosts: Vec<Host>,
    index: HashMap<SocketAddr, usize>,
    policy: Policy,
    outlier: Option<OutlierConfig>,
    /// Hosts with an ejection not yet found expired; lets picks skip the clock when 0.
    ejected: usize,
    cursor: usize,
    table: Option<HashTable>,
}

struct Host {
    endpoint: Arc<Endpoint>,
    active: Arc<AtomicU32>,
    outlier: HostOutlier,
    /// PEAK_EWMA's latency estimate; `None` until the first response under that policy.
    latency: Option<Estimate>,
}

impl ClusterBalancer {
    pub fn new(name: String) -> Self {
        Self::with_clock(name, Arc::new(SystemClock))
    }

    pub fn with_clock(name: String, clock: Arc<dyn Clock>) -> Self {
        ClusterBalancer {
            name,
            clock,
            latency_aware: AtomicBool::new(false),
            state: Mutex::new(State {
                hosts: Vec::new(),
                index: HashMap::new(),
                policy: Policy::new(None),
                outlier: None,
                ejected: 0,
                cursor: 0,
                table: None,
            }),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Replaces endpoints and policy. Endpoints whose address stays keep their active-request
    /// count and outlier state; duplicate addresses are dropped. Removing `outlier` forgets all
    /// ejections, as Envoy does when the detector goes away. The consistent-hash table is
    /// rebuilt (under the lock: reloads are rare) only when the address list or policy changes.
    pub fn update(
        &self,
        endpoints: Vec<Endpoint>,
        lb: Option<LbPolicy>,
        outlier: Option<OutlierDetection>,
    ) {
        self.update_with(endpoints, lb, false, outlier);
    }

    /// [`update`](Self::update), with `peak_ewma` (the `mesh.io/load-balancer` annotation)
    /// taking the place of `lb`. Latency estimates are forgotten when the policy stops
    /// being PEAK_EWMA.
    pub fn update_with(
        &self,
        endpoints: Vec<Endpoint>,
        lb: Option<LbPolicy>,
        peak_ewma: bool,
        outlier: Option<OutlierDetection>,
    ) {
        let policy = if peak_ewma { Policy::PeakEwma } else { Policy::new(lb.as_ref()) };
        self.latency_aware.store(peak_ewma, Ordering::Relaxed);
        let outlier = outlier.as_ref().map(OutlierConfig::new);
        let mut st = self.lock();
        let mut old: HashMap<SocketAddr, Host> =
            st.hosts.drain(..).map(|h| (h.endpoint.addr, h)).collect();
        let old_addrs: Vec<SocketAddr> = {
            let mut pairs: Vec<(usize, SocketAddr)> =
                st.index.iter().map(|(addr, &i)| (i, *addr)).collect();
            pairs.sort_unstable();
            pairs.into_iter().map(|(_, addr)| addr).collect()
        };
        let mut hosts = Vec::with_capacity(endpoints.len());
        let mut index = HashMap::with_capacity(endpoints.len());
        for endpoint in endpoints {
            if index.contains_key(&endpoint.addr) {
                continue;
            }
            index.insert(endpoint.addr, hosts.len());
            let host = match old.remove(&endpoint.addr) {
                Some(mut kept) => {
                    kept.endpoint = Arc::new(endpoint);
                    kept
                }
                None => Host {
                    endpoint: Arc::new(endpoint),
                    active: Arc::new(AtomicU32::new(0)),
                    outlier: HostOutlier::default(),
                    latency: None,
                },
            };
            hosts.push(host);
        }
        if outlier.is_none() {
            for h in &mut hosts {
                h.outlier = HostOutlier::default();
            }
        }
        if !peak_ewma {
            for h in &mut hosts {
                h.latency = None;
            }
        }
        let addrs: Vec<SocketAddr> = hosts.iter().map(|h| h.endpoint.addr).collect();
        if addrs != old_addrs || policy != st.policy || st.table.is_none() {
            st.table = HashTable::build(policy, &addrs);
        }
        st.ejected = hosts.iter().filter(|h| h.outlier.is_ejected()).count();
        st.hosts = hosts;
        st.index = index;
        st.policy = policy;
        st.outlier = outlier;
    }

    /// Picks an endpoint, skipping `exclude` (hosts already tried by retries) when another
    /// choice exists. `hash` is the request's consistent-hash key hash; without one a
    /// consistent-hash cluster picks a random point.
    pub fn pick(&self, hash: Option<u64>, exclude: &[SocketAddr]) -> Result<Pick, PickError> {
        let mut st = self.lock();
        if st.hosts.is_empty() {
            return Err(PickError::NoEndpoints);
        }
        if st.ejected > 0 {
            st.return_expired(self.clock.now());
        }
        let ignore_ejection = st.panicking();
        let now = if st.policy == Policy::PeakEwma { Some(self.clock.now()) } else { None };
        let chosen = st
            .choose(hash, ignore_ejection, exclude, now)
            .or_else(|| {
                if exclude.is_empty() {
                    None
                } else {
                    st.choose(hash, ignore_ejection, &[], now)
                }
            })
            .ok_or(PickError::NoHealthyUpstream)?;
        let host = &st.hosts[chosen];
        Ok(Pick {
            endpoint: host.endpoint.clone(),
            guard: ActiveRequest::start(&host.active),
        })
    }

    /// Time from sending a request to `addr` to its response headers, for PEAK_EWMA. Costs
    /// nothing under the other policies.
    pub fn report_latency(&self, addr: SocketAddr, rtt: Duration) {
        if !self.latency_aware.load(Ordering::Relaxed) {
            return;
        }
        let now = self.clock.now();
        let mut st = self.lock();
        let Some(&i) = st.index.get(&addr) else { return };
        match &mut st.hosts[i].latency {
            Some(e) => e.observe(rtt, now),
            slot @ None => *slot = Some(Estimate::new(rtt, now)),
        }
    }

    /// Outcome of one request or connection attempt to `addr`; may eject it on the spot.
    pub fn report(&self, addr: SocketAddr, outcome: Outcome) {
        let mut guard = self.lock();
        let st = &mut *guard;
        let (Some(cfg), Some(&i)) = (st.outlier, st.index.get(&addr)) else {
            return;
        };
        let now = self.clock.now();
        if st.ejected > 0 {
            // Hosts due back must not count against maxEjectionPercent.
            st.return_expired(now);
        }
        let may_eject = cfg.may_eject(st.ejected, st.hosts.len());
        let host = &mut st.hosts[i];
        host.outlier.settle(now, &cfg);
        // Late answers from requests sent before the ejection say nothing new.
        if host.outlier.is_ejected() {
            return;
        }
        let Some(detector) = host.outlier.record(outcome, &cfg) else {
            return;
        };
        if !may_eject {
            host.outlier.reset_detector(detector);
            tracing::debug!(cluster = %self.name, %addr, ?detector, "outlier not ejected: max ejection percent reached");
            return;
        }
        let duration = host.outlier.eject(now, &cfg);
        tracing::info!(
            cluster = %self.name,
            %addr,
            ?detector,
            times_ejected = host.outlier.times_ejected,
            ejection_secs = duration.as_secs_f64(),
            "outlier ejected"
        );
        crate::telemetry::outlier_ejected(&self.name);
        st.ejected += 1;
    }

    /// Per-endpoint state for the admin endpoint.
    pub fn snapshot(&self) -> ClusterSnapshot {
        let now = self.clock.now();
        let mut st = self.lock();
        if let Some(cfg) = st.outlier {
            for h in &mut st.hosts {
                h.outlier.settle(now, &cfg);
            }
        }
        st.ejected = st.hosts.iter().filter(|h| h.outlier.is_ejected()).count();
        let peak_ewma = st.policy == Policy::PeakEwma;
        let default_ns = st.default_latency_ns(now);
        ClusterSnapshot {
            name: self.name.clone(),
            policy: st.policy.name(),
            outlier_detection: st.outlier.is_some(),
            panic: st.panicking(),
            endpoints: st
                .hosts
                .iter()
                .map(|h| EndpointSnapshot {
                    addr: h.endpoint.addr,
                    pod: format!("{}/{}", h.endpoint.pod_namespace, h.endpoint.pod_name),
                    node: h.endpoint.node.clone(),
                    active: h.active.load(Ordering::Relaxed),
                    ejected: h.outlier.is_ejected(),
                    ejection_remaining_ms: h
                        .outlier
                        .ejected_until
                        .map(|until| until.saturating_duration_since(now).as_millis() as u64),
                    times_ejected: h.outlier.times_ejected,
                    consecutive_5xx: h.outlier.consecutive_5xx,
                    consecutive_gateway_errors: h.outlier.consecutive_gateway,
                    consecutive_local_origin_failures: h.outlier.consecutive_local_origin,
                    latency_estimate_ms: peak_ewma
                        .then(|| h.latency.map_or(default_ns, |e| e.current_ns(now)) / 1e6),
                })
                .collect(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent between statements, so a panic elsewhere leaves it usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl State {
    fn return_expired(&mut self, now: Instant) {
        let Some(cfg) = self.outlier else { return };
        for h in &mut self.hosts {
            if h.outlier.is_ejected() && h.outlier.settle(now, &cfg) {
                self.ejected -= 1;
            }
        }
    }

    fn panicking(&self) -> bool {
        self.outlier
            .as_ref()
            .is_some_and(|cfg| cfg.panicking(self.ejected, self.hosts.len()))
    }

    /// What an endpoint without a measurement counts as under PEAK_EWMA.
    fn default_latency_ns(&self, now: Instant) -> f64 {
        peak_ewma::default_estimate_ns(self.hosts.iter().filter_map(|h| h.latency.map(|e| e.current_ns(now))))
    }

    /// `now` is only read by PEAK_EWMA.
    fn choose(
        &mut self,
        hash: Option<u64>,
        ignore_ejection: bool,
        exclude: &[SocketAddr],
        now: Option<Instant>,
    ) -> Option<usize> {
        let hosts = &self.hosts;
        let eligible = |i: usize| {
            let h = &hosts[i];
            (ignore_ejection || !h.outlier.is_ejected()) && !exclude.contains(&h.endpoint.addr)
        };
        let n = hosts.len();
        let count = if !ignore_ejection && self.ejected == 0 && exclude.is_empty() {
            n
        } else {
            (0..n).filter(|&i| eligible(i)).count()
        };
        if count == 0 {
            return None;
        }
        match self.policy {
            Policy::RoundRobin => algorithms::round_robin(n, &mut self.cursor, eligible),
            Policy::Random => algorithms::random(n, count, eligible),
            Policy::LeastRequest => least_request::pick(n, count, eligible, |i| {
                hosts[i].active.load(Ordering::Relaxed)
            }),
            Policy::PeakEwma => {
                let now = now?;
                let unmeasured = hosts.iter().any(|h| h.latency.is_none());
                let default_ns = if unmeasured { self.default_latency_ns(now) } else { 0.0 };
                peak_ewma::pick(n, count, eligible, |i| {
                    let h = &hosts[i];
                    let estimate = h.latency.map_or(default_ns, |e| e.current_ns(now));
                    peak_ewma::cost(estimate, h.active.load(Ordering::Relaxed))
                })
            }
            Policy::RingHash { .. } | Policy::Maglev { .. } => {
                self.table.as_ref()?.pick(hash, eligible)
            }
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ClusterSnapshot {
    pub name: String,
    pub policy: &'static str,
    pub outlier_detection: bool,
    /// Below `minHealthPercent`: balancing across all hosts, ejected or not.
    pub panic: bool,
    pub endpoints: Vec<EndpointSnapshot>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EndpointSnapshot {
    pub addr: SocketAddr,
    /// `namespace/name`.
    pub pod: String,
    pub node: String,
    pub active: u32,
    pub ejected: bool,
    /// Time left in the current ejection (`Instant`s have no wall-clock meaning to print).
    pub ejection_remaining_ms: Option<u64>,
    pub times_ejected: u32,
    pub consecutive_5xx: u32,
    pub consecutive_gateway_errors: u32,
    pub consecutive_local_origin_failures: u32,
    /// PEAK_EWMA's current latency estimate (absent under other policies).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_estimate_ms: Option<f64>,
}
