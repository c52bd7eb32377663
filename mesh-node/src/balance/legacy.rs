//! Round robin over a [`Route`]'s endpoints, keyed by route name: the L4 path's balancer until
//! it moves to [`super::ClusterBalancer`].
use std::{
    collections::HashMap,
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use crate::{config::Endpoint, route::Route};

#[derive(Default)]
pub struct Balancer {
    cursors: Mutex<HashMap<String, std::sync::Arc<AtomicUsize>>>,
}

impl Balancer {
    pub fn pick<'a>(&self, route: &'a Route) -> Option<&'a Endpoint> {
        if route.endpoints.is_empty() {
            return None;
        }
        let cursor = {
            let mut cursors = self.cursors.lock().unwrap_or_else(|e| e.into_inner());
            cursors.entry(route.name.clone()).or_default().clone()
        };
        let n = cursor.fetch_add(1, Ordering::Relaxed);
        route.endpoints.get(n % route.endpoints.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(name: &str, port: u16) -> Endpoint {
        Endpoint {
            pod_namespace: "ns".into(),
            pod_name: name.into(),
            node: "n".into(),
            addr: ([10, 0, 0, 1], port).into(),
        }
    }

    #[test]
    fn round_robin_cycles_through_endpoints_per_route() {
        let b = Balancer::default();
        let a = Route {
            name: "a".into(),
            endpoints: vec![ep("a1", 1), ep("a2", 2), ep("a3", 3)],
        };
        let other = Route {
            name: "b".into(),
            endpoints: vec![ep("b1", 1), ep("b2", 2)],
        };
        let picks: Vec<_> = (0..6)
            .map(|_| b.pick(&a).unwrap().pod_name.clone())
            .collect();
        assert_eq!(picks, ["a1", "a2", "a3", "a1", "a2", "a3"]);
        assert_eq!(b.pick(&other).unwrap().pod_name, "b1");
        assert!(
            b.pick(&Route {
                name: "c".into(),
                endpoints: vec![]
            })
            .is_none()
        );
    }
}
