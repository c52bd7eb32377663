//! Upstream clusters: a Service port, optionally narrowed to a DestinationRule subset, with its
//! endpoints, merged traffic policy, balancer and circuit breakers.
//!
//! Resolution is cached per config snapshot; balancers and limits live across snapshots, so
//! outlier ejections and in-flight counts survive a config reload.
use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, Mutex},
    time::Duration,
};

use crate::{
    balance::{Balancers, ClusterBalancer},
    concurrency::GradientLimiter,
    config::{Cluster, Endpoint, HashKey, LbPolicy, Service, TrafficPolicy, labels_match},
    http::pool::PoolSettings,
    limits::Limits,
    rate_limit::TokenBucket,
};

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DestinationKey {
    pub namespace: String,
    pub service: String,
    pub port: u16,
    pub subset: Option<String>,
}

impl DestinationKey {
    pub fn new(svc: &Service, port: u16, subset: Option<&str>) -> Self {
        Self { namespace: svc.namespace.clone(), service: svc.name.clone(), port, subset: subset.map(str::to_owned) }
    }
}

impl fmt::Display for DestinationKey {
    /// Envoy's cluster name, which Istio dashboards and tools show.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "outbound|{}|{}|{}",
            self.port,
            self.subset.as_deref().unwrap_or(""),
            crate::config::fqdn(&self.service, &self.namespace)
        )
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DestinationError {
    #[error("no Service {0}")]
    NoService(String),
    #[error("no subset {subset:?} for {service} in any DestinationRule")]
    NoSubset { service: String, subset: String },
}

/// Everything the data path needs to send to one upstream cluster.
pub struct Destination {
    pub key: DestinationKey,
    pub name: String,
    /// The namespace of the clients this was resolved for (`None`: callers that are not pods).
    pub client_namespace: Option<String>,
    /// The DestinationRule applied (`namespace/name`), if any.
    pub rule: Option<String>,
    pub endpoints: Vec<Endpoint>,
    pub policy: TrafficPolicy,
    pub balancer: Arc<ClusterBalancer>,
    pub limits: Arc<Limits>,
    /// `mesh.io/rate-limit`: the Service's bucket, shared by all its ports and subsets.
    pub rate_limit: Option<Arc<TokenBucket>>,
    /// `mesh.io/adaptive-concurrency`: the Service's limiter, shared by all its ports and subsets.
    pub concurrency: Option<Arc<GradientLimiter>>,
    pub hash_key: Option<HashKey>,
    pub pool: PoolSettings,
}

/// Istio's HTTP idle timeout default (connectionPool.http.idleTimeout): 1 hour.
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

#[derive(Default)]
pub struct Destinations {
    /// By a hash of (key, http2), so a request looks its cluster up from borrowed names,
    /// without building (allocating) a [`DestinationKey`]; entries: (http2, generation, cluster).
    cache: Mutex<HashMap<u64, Vec<(bool, u64, Arc<Destination>)>>>,
    balancers: Balancers,
    /// By (key, DestinationRule from the client's own namespace, http2).
    limits: Mutex<HashMap<(DestinationKey, Option<String>, bool), Arc<Limits>>>,
    /// By Service (namespace, name): one bucket per Service on the node.
    rate_limits: Mutex<HashMap<(String, String), Arc<TokenBucket>>>,
    /// By Service (namespace, name): one adaptive concurrency limiter per Service on the node.
    concurrency: Mutex<HashMap<(String, String), Arc<GradientLimiter>>>,
}

impl Destinations {
    /// `http2`: whether requests to this cluster go over HTTP/2 (the limits differ).
    /// `client_ns`: the calling pod's namespace (`None` when the caller is not a known pod),
    /// which decides the DestinationRule (Istio's lookup starts in the client's namespace).
    pub fn resolve(&self, cluster: &Cluster, key: &DestinationKey, client_ns: Option<&str>, http2: bool) -> Result<Arc<Destination>, DestinationError> {
        self.resolve_parts(cluster, &key.namespace, &key.service, key.port, key.subset.as_deref(), client_ns, http2)
    }

    /// [`Self::resolve`] from the key's parts; the key is only built when the cluster is not
    /// cached yet (once per config snapshot and client namespace), not per request.
    #[allow(clippy::too_many_arguments)]
    pub fn resolve_parts(
        &self,
        cluster: &Cluster,
        namespace: &str,
        service: &str,
        port: u16,
        subset: Option<&str>,
        client_ns: Option<&str>,
        http2: bool,
    ) -> Result<Arc<Destination>, DestinationError> {
        let generation = cluster.fingerprint();
        let hash = key_hash(namespace, service, port, subset, client_ns, http2);
        let is = |d: &Destination| {
            d.key.port == port
                && d.key.namespace == namespace
                && d.key.service == service
                && d.key.subset.as_deref() == subset
                && d.client_namespace.as_deref() == client_ns
        };
        if let Some(bucket) = self.cache.lock().unwrap_or_else(|e| e.into_inner()).get(&hash)
            && let Some((_, _, dest)) = bucket.iter().find(|(h2, g, d)| *h2 == http2 && *g == generation && is(d))
        {
            return Ok(dest.clone());
        }
        let key = DestinationKey { namespace: namespace.to_owned(), service: service.to_owned(), port, subset: subset.map(str::to_owned) };
        let dest = Arc::new(self.build(cluster, &key, client_ns, http2)?);
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let bucket = cache.entry(hash).or_default();
        // Replaces the entry of an older snapshot, as the keyed map used to.
        bucket.retain(|(h2, _, d)| !(*h2 == http2 && is(d)));
        bucket.push((http2, generation, dest.clone()));
        Ok(dest)
    }

    fn build(&self, cluster: &Cluster, key: &DestinationKey, client_ns: Option<&str>, http2: bool) -> Result<Destination, DestinationError> {
        let svc = cluster
            .service(&key.namespace, &key.service)
            .ok_or_else(|| DestinationError::NoService(format!("{}/{}", key.namespace, key.service)))?;
        let rule = cluster.destination_rule_for(svc, client_ns);
        let mut endpoints = cluster.endpoints(svc, key.port);
        let mut policy = rule.and_then(|r| r.traffic_policy.as_ref()).map(|p| p.for_port(key.port)).unwrap_or_default();
        if let Some(subset_name) = &key.subset {
            let subset = rule.and_then(|r| r.subset(subset_name)).ok_or_else(|| DestinationError::NoSubset {
                service: format!("{}/{}", key.namespace, key.service),
                subset: subset_name.clone(),
            })?;
            let labels: HashMap<(&str, &str), &std::collections::BTreeMap<String, String>> =
                cluster.pods().map(|p| ((p.namespace.as_str(), p.name.as_str()), &p.labels)).collect();
            endpoints.retain(|e| {
                labels.get(&(e.pod_namespace.as_str(), e.pod_name.as_str())).is_some_and(|l| labels_match(&subset.labels, l))
            });
            if let Some(sub) = &subset.traffic_policy {
                policy = merge(sub.for_port(key.port), policy);
            }
        }
        // Per cluster, as in Envoy: a subset whose pods are all terminating falls back to them
        // even while other subsets have ready pods.
        let endpoints = crate::config::usable(endpoints);
        let name = key.to_string();
        // A rule from the client's own namespace (Istio: it wins for that client) gets its own
        // balancer and limits: its policy differs from what other clients of the Service use.
        let own_rule = rule
            .filter(|r| r.namespace != svc.namespace && r.namespace != crate::config::root_namespace())
            .map(|r| format!("{}/{}", r.namespace, r.name));
        let balancer = match &own_rule {
            Some(r) => self.balancers.get(&format!("{name};dr={r}")),
            None => self.balancers.get(&name),
        };
        let lb: Option<LbPolicy> = policy.load_balancer.as_ref().map(|l| l.policy.clone());
        let hash_key = match &lb {
            Some(LbPolicy::ConsistentHash(ch)) => Some(ch.key.clone()),
            _ => None,
        };
        let mesh = rule.map(|r| r.mesh.clone()).unwrap_or_default();
        balancer.update_with(endpoints.clone(), lb, mesh.peak_ewma, policy.outlier_detection.clone());
        let rate_limit = {
            let mut all = self.rate_limits.lock().unwrap_or_else(|e| e.into_inner());
            let service = (key.namespace.clone(), key.service.clone());
            match mesh.rate_limit {
                Some(limit) => {
                    let now = std::time::Instant::now();
                    let bucket = all.entry(service).or_insert_with(|| Arc::new(TokenBucket::new(limit, now)));
                    bucket.set_limit(limit, now);
                    Some(bucket.clone())
                }
                None => {
                    all.remove(&service);
                    None
                }
            }
        };
        let concurrency = {
            let mut all = self.concurrency.lock().unwrap_or_else(|e| e.into_inner());
            let service = (key.namespace.clone(), key.service.clone());
            match mesh.adaptive_concurrency {
                Some(max) => {
                    let limiter =
                        all.entry(service).or_insert_with(|| Arc::new(GradientLimiter::new(max, std::time::Instant::now())));
                    limiter.set_max(max);
                    Some(limiter.clone())
                }
                None => {
                    all.remove(&service);
                    None
                }
            }
        };
        let limits = {
            let mut all = self.limits.lock().unwrap_or_else(|e| e.into_inner());
            let limits =
                all.entry((key.clone(), own_rule.clone(), http2)).or_insert_with(|| Arc::new(Limits::new(policy.connection_pool.as_ref(), http2)));
            limits.update(policy.connection_pool.as_ref(), http2);
            limits.clone()
        };
        let pool = PoolSettings {
            connect_timeout: limits.connect_timeout(),
            max_requests_per_connection: limits.max_requests_per_connection(),
            idle_timeout: limits.idle_timeout().unwrap_or(DEFAULT_IDLE_TIMEOUT),
        };
        let rule_name = rule.map(|r| format!("{}/{}", r.namespace, r.name));
        Ok(Destination {
            key: key.clone(),
            name,
            client_namespace: client_ns.map(str::to_owned),
            rule: rule_name,
            endpoints,
            policy,
            balancer,
            limits,
            rate_limit,
            concurrency,
            hash_key,
            pool,
        })
    }

    /// Balancer state of every cluster, for the admin endpoint.
    pub fn snapshot(&self) -> serde_json::Value {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = serde_json::Map::new();
        for (_, _, dest) in cache.values().flatten() {
            let mut value = serde_json::to_value(dest.balancer.snapshot()).unwrap_or_default();
            if let (Some(bucket), Some(obj)) = (&dest.rate_limit, value.as_object_mut()) {
                obj.insert("rate_limit".into(), serde_json::to_value(bucket.snapshot()).unwrap_or_default());
            }
            if let (Some(limiter), Some(obj)) = (&dest.concurrency, value.as_object_mut()) {
                obj.insert("adaptive_concurrency".into(), serde_json::to_value(limiter.snapshot()).unwrap_or_default());
            }
            out.insert(dest.name.clone(), value);
        }
        serde_json::Value::Object(out)
    }
}

fn key_hash(namespace: &str, service: &str, port: u16, subset: Option<&str>, client_ns: Option<&str>, http2: bool) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::hash::DefaultHasher::new();
    (namespace, service, port, subset, client_ns, http2).hash(&mut h);
    h.finish()
}

/// A subset's policy overrides the rule's, field by field (Istio's merge).
fn merge(subset: TrafficPolicy, base: TrafficPolicy) -> TrafficPolicy {
    TrafficPolicy {
        load_balancer: subset.load_balancer.or(base.load_balancer),
        connection_pool: subset.connection_pool.or(base.connection_pool),
        outlier_detection: subset.outlier_detection.or(base.outlier_detection),
        tls: subset.tls.or(base.tls),
        port_level_settings: Vec::new(),
    }
}
