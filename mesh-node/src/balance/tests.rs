//! ClusterBalancer behaviour end to end: policies, retries' exclusions, reloads, outlier
//! ejection with a stepped clock, panic mode.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use super::{clock::manual::ManualClock, *};
use crate::config::{ConsistentHash, HashAlgorithm, HashKey, LbPolicy, OutlierDetection, SimpleLb};

fn ep(i: u8) -> Endpoint {
    Endpoint {
        pod_namespace: "ns".into(),
        pod_name: format!("pod-{i}"),
        node: "node-a".into(),
        addr: SocketAddr::from(([10, 0, 0, i], 8080)),
        conditions: Default::default(),
        hostname: None,
    }
}

fn eps(n: u8) -> Vec<Endpoint> {
    (1..=n).map(ep).collect()
}

fn addr(i: u8) -> SocketAddr {
    ep(i).addr
}

const RR: Option<LbPolicy> = Some(LbPolicy::Simple(SimpleLb::RoundRobin));

fn balancer(
    n: u8,
    lb: Option<LbPolicy>,
    od: Option<OutlierDetection>,
) -> (ClusterBalancer, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new());
    let b = ClusterBalancer::with_clock("svc.ns:8080".into(), clock.clone());
    b.update(eps(n), lb, od);
    (b, clock)
}

fn pick_addr(b: &ClusterBalancer) -> SocketAddr {
    match b.pick(None, &[]) {
        Ok(p) => p.endpoint.addr,
        Err(e) => panic!("pick failed: {e}"),
    }
}

fn fail(b: &ClusterBalancer, a: SocketAddr, times: usize) {
    for _ in 0..times {
        b.report(a, Outcome::HttpStatus(500));
    }
}

#[test]
fn no_endpoints() {
    let b = ClusterBalancer::new("empty".into());
    assert_eq!(b.pick(None, &[]).err(), Some(PickError::NoEndpoints));
}

#[test]
fn round_robin_cycles_and_skips_tried_hosts() {
    let (b, _) = balancer(3, RR, None);
    let picks: Vec<_> = (0..6).map(|_| pick_addr(&b)).collect();
    assert_eq!(
        picks,
        [addr(1), addr(2), addr(3), addr(1), addr(2), addr(3)]
    );
    for _ in 0..6 {
        let p = b.pick(None, &[addr(1), addr(2)]).map(|p| p.endpoint.addr);
        assert_eq!(p, Ok(addr(3)));
    }
    // Excluding everything leaves a choice after all: retries may reuse a host.
    assert!(b.pick(None, &[addr(1), addr(2), addr(3)]).is_ok());
}

#[test]
fn least_request_is_the_default_and_avoids_busy_hosts() {
    let (b, _) = balancer(2, None, None);
    let held = b.pick(None, &[]);
    let Ok(held) = held else { panic!("no pick") };
    // Both hosts are always compared with two hosts, so the idle one wins every time.
    for _ in 0..20 {
        assert_ne!(pick_addr(&b), held.endpoint.addr);
    }
    let snap = b.snapshot();
    assert_eq!(snap.policy, "LEAST_REQUEST");
    let active: u32 = snap.endpoints.iter().map(|e| e.active).sum();
    assert_eq!(active, 1);
    drop(held);
    assert!(b.snapshot().endpoints.iter().all(|e| e.active == 0));
}

#[test]
fn random_spreads_over_hosts() {
    let (b, _) = balancer(4, Some(LbPolicy::Simple(SimpleLb::Random)), None);
    let mut counts = std::collections::HashMap::new();
    for _ in 0..4_000 {
        *counts.entry(pick_addr(&b)).or_insert(0u32) += 1;
    }
    assert_eq!(counts.len(), 4);
    assert!(counts.values().all(|&c| c > 800), "{counts:?}");
}

fn consistent(algorithm: Option<HashAlgorithm>) -> Option<LbPolicy> {
    Some(LbPolicy::ConsistentHash(ConsistentHash {
        key: HashKey::HttpHeaderName("x-user".into()),
        algorithm,
    }))
}

#[test]
fn consistent_hash_is_sticky_across_reloads_and_falls_over_when_excluded() {
    for algorithm in [None, Some(HashAlgorithm::Maglev { table_size: None })] {
        let (b, _) = balancer(4, consistent(algorithm), None);
        for user in 0..200u32 {
            let h = hash_key(format!("user-{user}").as_bytes());
            let first = b.pick(Some(h), &[]).map(|p| p.endpoint.addr);
            assert_eq!(first, b.pick(Some(h), &[]).map(|p| p.endpoint.addr));
            // A reload with the same endpoints keeps the mapping.
            b.update(eps(4), consistent(algorithm), None);
            assert_eq!(first, b.pick(Some(h), &[]).map(|p| p.endpoint.addr));
            let Ok(first) = first else { panic!("no pick") };
            let retry = b.pick(Some(h), &[first]).map(|p| p.endpoint.addr);
            assert!(retry.is_ok_and(|a| a != first));
        }
    }
}

#[test]
fn consecutive_5xx_ejects_inline_and_the_host_returns() {
    let (b, clock) = balancer(3, RR, Some(OutlierDetection::default()));
    fail(&b, addr(2), 4);
    b.report(addr(2), Outcome::Success);
    fail(&b, addr(2), 4);
    assert!((0..6).any(|_| pick_addr(&b) == addr(2)));
    fail(&b, addr(2), 1);
    for _ in 0..30 {
        assert_ne!(pick_addr(&b), addr(2));
    }
    let snap = b.snapshot();
    let host = &snap.endpoints[1];
    assert!(host.ejected);
    assert_eq!(host.times_ejected, 1);
    assert_eq!(host.ejection_remaining_ms, Some(30_000));
    assert_eq!(host.consecutive_5xx, 0);

    clock.advance(Duration::from_secs(29));
    assert!((0..6).all(|_| pick_addr(&b) != addr(2)));
    clock.advance(Duration::from_secs(1));
    assert!((0..3).any(|_| pick_addr(&b) == addr(2)));

    // Straight back into trouble: the second ejection lasts twice as long.
    fail(&b, addr(2), 5);
    assert_eq!(
        b.snapshot().endpoints[1].ejection_remaining_ms,
        Some(60_000)
    );
    clock.advance(Duration::from_secs(60));
    assert!((0..3).any(|_| pick_addr(&b) == addr(2)));
    // Two healthy intervals later the multiplier is back to 0: next ejection is 30s again.
    clock.advance(Duration::from_secs(20));
    assert_eq!(b.snapshot().endpoints[1].times_ejected, 0);
    fail(&b, addr(2), 5);
    assert_eq!(
        b.snapshot().endpoints[1].ejection_remaining_ms,
        Some(30_000)
    );
}

#[test]
fn local_origin_failures_count_as_5xx_unless_split() {
    let (b, _) = balancer(3, RR, Some(OutlierDetection::default()));
    for _ in 0..5 {
        b.report(addr(1), Outcome::LocalOriginFailure);
    }
    assert!(b.snapshot().endpoints[0].ejected);

    let split = OutlierDetection {
        split_external_local_origin_errors: true,
        consecutive_local_origin_failures: Some(2),
        ..Default::default()
    };
    let (b, _) = balancer(3, RR, Some(split));
    b.report(addr(1), Outcome::LocalOriginFailure);
    assert_eq!(b.snapshot().endpoints[0].consecutive_5xx, 0);
    b.report(addr(1), Outcome::LocalOriginFailure);
    assert!(b.snapshot().endpoints[0].ejected);
}

#[test]
fn max_ejection_percent_limits_ejections_but_one_is_always_allowed() {
    let (b, _) = balancer(3, RR, Some(OutlierDetection::default()));
    fail(&b, addr(1), 5);
    fail(&b, addr(2), 5);
    let snap = b.snapshot();
    assert!(snap.endpoints[0].ejected);
    assert!(!snap.endpoints[1].ejected);
    // The refused detector starts counting afresh.
    assert_eq!(snap.endpoints[1].consecutive_5xx, 0);

    let half = OutlierDetection {
        max_ejection_percent: Some(50),
        ..Default::default()
    };
    let (b, _) = balancer(4, RR, Some(half));
    for i in 1..=4 {
        fail(&b, addr(i), 5);
    }
    let ejected = b.snapshot().endpoints.iter().filter(|e| e.ejected).count();
    assert_eq!(ejected, 2);
}

#[test]
fn all_ejected_is_no_healthy_upstream_unless_panicking() {
    let (b, clock) = balancer(1, RR, Some(OutlierDetection::default()));
    fail(&b, addr(1), 5);
    assert_eq!(b.pick(None, &[]).err(), Some(PickError::NoHealthyUpstream));
    clock.advance(Duration::from_secs(30));
    assert_eq!(pick_addr(&b), addr(1));

    let panic = OutlierDetection {
        max_ejection_percent: Some(100),
        min_health_percent: Some(50),
        ..Default::default()
    };
    let (b, _) = balancer(2, RR, Some(panic));
    fail(&b, addr(1), 5);
    // 1 of 2 healthy = 50%: not below the threshold, ejection is honoured.
    assert!((0..4).all(|_| pick_addr(&b) == addr(2)));
    fail(&b, addr(2), 5);
    assert!(b.snapshot().panic);
    let picks: Vec<_> = (0..4).map(|_| pick_addr(&b)).collect();
    assert!(picks.contains(&addr(1)) && picks.contains(&addr(2)));
}

#[test]
fn reload_keeps_state_of_staying_endpoints() {
    let (b, _) = balancer(3, RR, Some(OutlierDetection::default()));
    fail(&b, addr(3), 5);
    fail(&b, addr(2), 3);
    // addr 3 is ejected and addr 1 excluded: the pick is addr 2.
    let held = b.pick(None, &[addr(1)]);
    let Ok(held) = held else { panic!("no pick") };
    assert_eq!(held.endpoint.addr, addr(2));
    let mut next = eps(3);
    next.remove(0);
    next.push(ep(4));
    next.push(ep(4));
    b.update(next, RR, Some(OutlierDetection::default()));
    let snap = b.snapshot();
    let addrs: Vec<_> = snap.endpoints.iter().map(|e| e.addr).collect();
    assert_eq!(addrs, [addr(2), addr(3), addr(4)]);
    assert_eq!(snap.endpoints[0].consecutive_5xx, 3);
    assert!(snap.endpoints[1].ejected);
    assert_eq!(snap.endpoints[0].active, 1);
    drop(held);
    assert_eq!(b.snapshot().endpoints[0].active, 0);

    // Dropping outlierDetection forgets ejections.
    b.update(eps(3), RR, None);
    assert!(
        b.snapshot()
            .endpoints
            .iter()
            .all(|e| !e.ejected && e.times_ejected == 0)
    );
    assert!((0..3).any(|_| pick_addr(&b) == addr(3)));
}

#[test]
fn snapshot_serializes_for_the_admin_endpoint() {
    let (b, _) = balancer(2, RR, Some(OutlierDetection::default()));
    fail(&b, addr(1), 5);
    let json = serde_json::to_value(b.snapshot()).unwrap_or_default();
    assert_eq!(json["name"], "svc.ns:8080");
    assert_eq!(json["policy"], "ROUND_ROBIN");
    assert_eq!(json["endpoints"][0]["addr"], "10.0.0.1:8080");
    assert_eq!(json["endpoints"][0]["pod"], "ns/pod-1");
    assert_eq!(json["endpoints"][0]["ejected"], true);
    assert_eq!(
        json["endpoints"][1]["ejection_remaining_ms"],
        serde_json::Value::Null
    );
}

#[test]
fn shared_types_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<ClusterBalancer>();
    send_sync::<Balancers>();
    send_sync::<Pick>();
    send_sync::<crate::limits::Limits>();
    send_sync::<crate::limits::RequestPermit>();
}

/// Sequential requests, one per simulated millisecond, each answered in `rtt(pod)`; returns how
/// many went to each of the pods 1..=n.
fn run_latency(b: &ClusterBalancer, clock: &ManualClock, requests: usize, rtt: impl Fn(SocketAddr) -> Duration) -> Vec<usize> {
    let mut counts = vec![0; 8];
    for _ in 0..requests {
        let pick = b.pick(None, &[]).expect("pick");
        let a = pick.endpoint.addr;
        counts[usize::from(a.ip().to_string().rsplit('.').next().unwrap().parse::<u8>().unwrap())] += 1;
        b.report_latency(a, rtt(a));
        drop(pick);
        clock.advance(Duration::from_millis(1));
    }
    counts
}

#[test]
fn peak_ewma_avoids_a_slow_endpoint_and_recovers_when_it_is_fast_again() {
    let clock = Arc::new(ManualClock::new());
    let b = ClusterBalancer::with_clock("svc.ns:8080".into(), clock.clone());
    let slow = |a: SocketAddr| if a == addr(3) { Duration::from_millis(30) } else { Duration::from_millis(1) };
    let fast = |_: SocketAddr| Duration::from_millis(1);
    // LEAST_REQUEST cannot tell: sequential requests tie and spread evenly.
    b.update(eps(3), None, None);
    let lr = run_latency(&b, &clock, 3000, slow);
    assert!(lr[3] > 800, "{lr:?}");
    b.update_with(eps(3), None, true, None);
    assert_eq!(b.snapshot().policy, "PEAK_EWMA");
    let ewma = run_latency(&b, &clock, 3000, slow);
    assert!(ewma[3] < 30, "the slow endpoint is tried, then avoided: {ewma:?}");
    let est = b.snapshot().endpoints[2].latency_estimate_ms.unwrap();
    assert!(est > 20.0, "{est}");
    // Fast again: its idle estimate decays (tau 10 s) until it is tried and measured fast.
    run_latency(&b, &clock, 40_000, fast);
    let recovered = run_latency(&b, &clock, 3000, fast);
    assert!(recovered[3] > 700, "back to about a third: {recovered:?}");
}

#[test]
fn peak_ewma_prefers_fewer_requests_in_flight_at_equal_latency() {
    let clock = Arc::new(ManualClock::new());
    let b = ClusterBalancer::with_clock("svc.ns:8080".into(), clock.clone());
    b.update_with(eps(2), None, true, None);
    for i in 1..=2 {
        b.report_latency(addr(i), Duration::from_millis(5));
    }
    let held = b.pick(None, &[]).unwrap();
    let busy = held.endpoint.addr;
    for _ in 0..50 {
        assert_ne!(pick_addr(&b), busy);
    }
}

#[test]
fn peak_ewma_new_endpoints_start_at_the_median_and_other_policies_forget_estimates() {
    let clock = Arc::new(ManualClock::new());
    let b = ClusterBalancer::with_clock("svc.ns:8080".into(), clock.clone());
    b.update_with(eps(3), None, true, None);
    // Nothing measured: 1 ms for everyone.
    assert!(b.snapshot().endpoints.iter().all(|e| e.latency_estimate_ms == Some(1.0)));
    for (i, ms) in [(1, 2), (2, 4), (3, 8)] {
        b.report_latency(addr(i), Duration::from_millis(ms));
    }
    b.update_with(eps(4), None, true, None);
    assert_eq!(b.snapshot().endpoints[3].latency_estimate_ms, Some(4.0));
    // LEAST_REQUEST neither records nor shows estimates.
    b.update(eps(4), None, None);
    b.report_latency(addr(1), Duration::from_millis(2));
    assert!(b.snapshot().endpoints.iter().all(|e| e.latency_estimate_ms.is_none()));
}
