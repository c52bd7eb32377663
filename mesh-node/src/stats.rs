//! Counters of the proxy itself (the Istio-named metrics arrive with the metrics module).
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
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
    outbound_accepted,
    outbound_no_orig_dst,
    outbound_no_route,
    outbound_direct,
    outbound_tunneled,
    outbound_connect_errors,
    inbound_requests,
    inbound_refused,
    inbound_connect_errors,
);
