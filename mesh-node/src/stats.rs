//! Counters of the proxy itself (the Istio-named metrics arrive with the metrics module).
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

macro_rules! proxy_stats {
    ($($name:ident),* $(,)?) => {
        #[derive(Default)]
        pub struct ProxyStats { $(pub $name: Counter,)* }
        impl ProxyStats {
            pub fn snapshot(&self) -> std::collections::BTreeMap<&'static str, u64> {
                [$((stringify!($name), self.$name.get()),)*].into_iter().collect()
            }
        }
    };
}

proxy_stats!(
    config_reloads,
    outbound_accepted,
    outbound_http,
    outbound_no_orig_dst,
    outbound_no_route,
    outbound_direct,
    outbound_tunneled,
    outbound_connect_errors,
    inbound_requests,
    inbound_refused,
    inbound_connect_errors,
    inbound_tls_refused,
    inbound_denied,
    // Tunnel streams whose `Forwarded` source did not check out (judged fail-closed).
    inbound_forwarded_unverified,
    // Open connections closed because a new policy denies them.
    policy_closed_connections,
    inbound_not_a_node,
    // Connections turned away because a listener was at its cap (in all or for their source).
    outbound_over_cap,
    inbound_over_cap,
    endpoints_over_cap,
    // TLS handshakes on the tunnel port refused because too many were in progress.
    inbound_handshakes_over_cap,
    // Connections to the tunnel port refused at once: their source kept failing handshakes.
    inbound_handshake_penalty,
    http_requests,
    http_retries,
    flag_uh,
    flag_uf,
    flag_uo,
    flag_urx,
    flag_ut,
    flag_nr,
    flag_di,
    flag_fi,
    flag_ur,
    flag_dc,
    flag_rl,
    flag_cl,
);

impl ProxyStats {
    /// Counts each response flag of a finished request.
    pub fn record_flags(&self, flags: crate::flags::ResponseFlags) {
        for code in flags.codes() {
            let counter = match code {
                "UH" => &self.flag_uh,
                "UF" => &self.flag_uf,
                "UO" => &self.flag_uo,
                "URX" => &self.flag_urx,
                "UT" => &self.flag_ut,
                "NR" => &self.flag_nr,
                "DI" => &self.flag_di,
                "FI" => &self.flag_fi,
                "UR" => &self.flag_ur,
                "DC" => &self.flag_dc,
                "RL" => &self.flag_rl,
                "CL" => &self.flag_cl,
                _ => continue,
            };
            counter.inc();
        }
    }
}
