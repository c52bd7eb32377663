//! Every upstream cluster's balancer by name, so state survives config reloads.
use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use super::{
    ClusterBalancer,
    clock::{Clock, SystemClock},
    cluster::ClusterSnapshot,
};

pub struct Balancers {
    clock: Arc<dyn Clock>,
    clusters: RwLock<HashMap<String, Arc<ClusterBalancer>>>,
}

impl Default for Balancers {
    fn default() -> Self {
        Self::with_clock(Arc::new(SystemClock))
    }
}

impl Balancers {
    pub fn with_clock(clock: Arc<dyn Clock>) -> Self {
        Balancers {
            clock,
            clusters: RwLock::new(HashMap::new()),
        }
    }

    /// The cluster's balancer, created empty on first use. Requests only take the read lock
    /// once the cluster exists.
    pub fn get(&self, name: &str) -> Arc<ClusterBalancer> {
        if let Some(b) = self.read().get(name) {
            return Arc::clone(b);
        }
        let mut clusters = self.clusters.write().unwrap_or_else(|e| e.into_inner());
        Arc::clone(clusters.entry(name.to_string()).or_insert_with(|| {
            Arc::new(ClusterBalancer::with_clock(
                name.to_string(),
                Arc::clone(&self.clock),
            ))
        }))
    }

    /// Drops clusters gone from config. Requests still holding one finish with it.
    pub fn retain(&self, live: impl Fn(&str) -> bool) {
        let mut clusters = self.clusters.write().unwrap_or_else(|e| e.into_inner());
        clusters.retain(|name, _| live(name));
    }

    /// Every cluster's state, sorted by name, for the admin endpoint.
    pub fn snapshot(&self) -> Vec<ClusterSnapshot> {
        let clusters: Vec<Arc<ClusterBalancer>> = self.read().values().cloned().collect();
        let mut out: Vec<ClusterSnapshot> = clusters.iter().map(|c| c.snapshot()).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<ClusterBalancer>>> {
        self.clusters.read().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn get_creates_once_and_retain_drops() {
        let b = Balancers::default();
        let first = b.get("reviews.default:9080");
        assert!(Arc::ptr_eq(&first, &b.get("reviews.default:9080")));
        b.get("ratings.default:9080");
        assert_eq!(b.snapshot().len(), 2);
        b.retain(|name| name.starts_with("ratings"));
        let names: Vec<String> = b.snapshot().into_iter().map(|s| s.name).collect();
        assert_eq!(names, ["ratings.default:9080"]);
        assert!(!Arc::ptr_eq(&first, &b.get("reviews.default:9080")));
    }
}
