//! Whole-module tests on real YAML: the lemo-dev sample, lookups, and bad
//! inputs with the exact problem lines they must produce.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::*;

mod authorization;
mod conformance;
mod endpoints;
mod lookup;

const AUTHORIZATION_POLICY: &str =
    include_str!("../../../deploy/examples/lemo-dev/authorization-policy.yaml");
const CLUSTER: &str = include_str!("../../../deploy/examples/lemo-dev/cluster.yaml");
const DESTINATION_RULES: &str =
    include_str!("../../../deploy/examples/lemo-dev/destination-rules.yaml");
const VIRTUAL_SERVICES: &str =
    include_str!("../../../deploy/examples/lemo-dev/virtual-services.yaml");
const PEER_AUTHENTICATION: &str =
    include_str!("../../../deploy/examples/lemo-dev/peer-authentication.yaml");

fn sample_files() -> Vec<(&'static str, &'static str)> {
    // In directory order, so the fingerprint matches `load_dir`'s.
    vec![
        ("authorization-policy.yaml", AUTHORIZATION_POLICY),
        ("cluster.yaml", CLUSTER),
        ("destination-rules.yaml", DESTINATION_RULES),
        ("peer-authentication.yaml", PEER_AUTHENTICATION),
        ("virtual-services.yaml", VIRTUAL_SERVICES),
    ]
}

fn sample() -> Cluster {
    Cluster::from_yaml_files(sample_files()).unwrap_or_else(|e| panic!("sample must load:\n{e}"))
}

/// The sample plus `extra` files; returns the problem lines.
fn problems_with(extra: &[(&str, &str)]) -> Vec<String> {
    let mut files = sample_files();
    files.extend_from_slice(extra);
    match Cluster::from_yaml_files(files) {
        Ok(_) => panic!("expected problems for {extra:?}"),
        Err(e) => e.problems().to_vec(),
    }
}

fn assert_problems(extra: &[(&str, &str)], want: &[&str]) {
    assert_eq!(problems_with(extra), want, "for {extra:?}");
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test IP")
}

/// `deploy/examples/lemo-dev` in the workspace, found from this file's path
/// so it works from mesh-node and from a scratch crate that mounts the module.
fn example_dir() -> PathBuf {
    let here = Path::new(file!());
    let source = if here.is_absolute() {
        here.to_path_buf()
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .ancestors()
            .map(|a| a.join(here))
            .find(|p| p.exists())
            .expect("config/tests.rs is under an ancestor of the manifest dir")
    };
    // tests.rs -> config -> src -> mesh-node -> workspace root
    source
        .ancestors()
        .nth(4)
        .expect("workspace root")
        .join("deploy/examples/lemo-dev")
}

// ------------------------------------------------------------ the sample

#[test]
fn example_directory_loads() {
    let cluster = Cluster::load_dir(&example_dir()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cluster.nodes().count(), 2);
    assert_eq!(cluster.pods().count(), 6);
    assert_eq!(cluster.services().count(), 4);
    assert_eq!(cluster.destination_rules().count(), 1);
    assert_eq!(cluster.virtual_services().count(), 1);
    assert_eq!(cluster.peer_authentications().count(), 1);
    assert_eq!(cluster.authorization_policies().count(), 1);
    // The directory and the in-memory copy are the same input.
    assert_eq!(cluster.fingerprint(), sample().fingerprint());
}

#[test]
fn nodes_pods_and_services_are_modelled() {
    let c = sample();
    assert_eq!(c.node("node-a").map(|n| n.ip), Some(ip("172.18.0.2")));
    assert_eq!(
        c.nodes().map(|n| n.name.as_str()).collect::<Vec<_>>(),
        ["node-a", "node-b"]
    );

    let bff = c.pod_by_ip(ip("10.244.0.10")).expect("bff pod");
    assert_eq!(bff.name, "bff-0");
    assert_eq!(bff.uid, "7f1c2a4e-0000-4000-8000-000000000001");
    assert_eq!(bff.service_account, "bff");
    assert_eq!(bff.ips, [ip("10.244.0.10")]);
    assert_eq!(bff.container_ports, [(Some("http".to_string()), 8080)]);

    let recall0 = c.pod_by_ip(ip("10.244.0.11")).expect("recall-0");
    assert_eq!(recall0.uid, kube::derived_uid("lemo-dev", "recall-0"));
    assert_eq!(recall0.node, "node-a");
    assert!(c.pod_by_ip(ip("10.244.9.9")).is_none());

    let recall = c.service_by_vip(ip("10.96.0.20")).expect("recall service");
    assert_eq!(recall.fqdn(), "recall.lemo-dev.svc.cluster.local");
    let grpc = recall.port(50051).expect("grpc port");
    assert_eq!(grpc.target_port, TargetPort::Name("grpc".into()));
    assert_eq!(grpc.protocol, "TCP");
    assert_eq!(grpc.app_protocol.as_deref(), Some("grpc"));
    // targetPort defaults to port.
    assert_eq!(
        recall.port(8081).map(|p| &p.target_port),
        Some(&TargetPort::Number(8081))
    );
    assert!(recall.port(1).is_none());
}

#[test]
fn endpoints_follow_selector_and_named_target_ports() {
    let c = sample();
    let recall = c.service("lemo-dev", "recall").expect("recall");
    let eps = c.endpoints(recall, 50051);
    let got: Vec<(&str, &str, SocketAddr)> = eps
        .iter()
        .map(|e| (e.pod_name.as_str(), e.node.as_str(), e.addr))
        .collect();
    assert_eq!(
        got,
        [
            ("recall-0", "node-a", "10.244.0.11:50051".parse().unwrap()),
            ("recall-1", "node-b", "10.244.1.11:50051".parse().unwrap()),
            // v2 names a different container port "grpc".
            ("recall-2", "node-b", "10.244.1.12:50052".parse().unwrap()),
        ]
    );
    assert!(eps.iter().all(|e| e.pod_namespace == "lemo-dev"));
    assert_eq!(c.endpoints(recall, 8081).len(), 3);
    assert!(c.endpoints(recall, 9999).is_empty());

    let rerank = c.service("lemo-dev", "rerank").expect("rerank");
    assert_eq!(
        c.endpoints(rerank, 80)[0].addr,
        "10.244.1.30:8090".parse::<SocketAddr>().unwrap()
    );
}

#[test]
fn pods_without_the_named_port_and_other_namespaces_are_not_endpoints() {
    let extra = r#"
apiVersion: v1
kind: Pod
metadata: {namespace: lemo-dev, name: recall-9, labels: {app: recall}}
spec: {nodeName: node-a, containers: [{name: c, ports: [{name: metrics, containerPort: 9090}]}]}
status: {podIP: 10.244.0.99}
---
apiVersion: v1
kind: Pod
metadata: {namespace: other, name: recall-0, labels: {app: recall}}
spec: {nodeName: node-a, containers: [{name: c, ports: [{name: grpc, containerPort: 50051}]}]}
status: {podIP: 10.244.0.98}
---
apiVersion: v1
kind: Service
metadata: {namespace: lemo-dev, name: manual}
spec: {clusterIP: 10.96.0.99, ports: [{port: 80}]}
"#;
    let mut files = sample_files();
    files.push(("extra.yaml", extra));
    let c = Cluster::from_yaml_files(files).unwrap_or_else(|e| panic!("{e}"));
    let recall = c.service("lemo-dev", "recall").expect("recall");
    let names: Vec<String> = c
        .endpoints(recall, 50051)
        .into_iter()
        .map(|e| e.pod_name)
        .collect();
    assert_eq!(names, ["recall-0", "recall-1", "recall-2"]);
    // recall-9 has no "grpc" port but the numeric-default port still applies.
    assert_eq!(c.endpoints(recall, 8081).len(), 4);
    let manual = c.service("lemo-dev", "manual").expect("manual");
    assert!(manual.selector.is_none());
    assert!(c.endpoints(manual, 80).is_empty());
    let other = c.pod_by_ip(ip("10.244.0.98")).expect("pod in other ns");
    assert_eq!(other.service_account, "default");
    assert!(
        !c.is_enrolled(other),
        "namespace without a Namespace object is not enrolled"
    );
}

#[test]
fn enrollment_needs_ambient_namespace_and_no_opt_out() {
    let extra = r#"
apiVersion: v1
kind: Pod
metadata:
  namespace: lemo-dev
  name: debug
  labels: {istio.io/dataplane-mode: none}
spec: {nodeName: node-a}
status: {podIP: 10.244.0.50}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: v1
kind: Pod
metadata: {namespace: plain, name: p}
spec: {nodeName: node-b}
status: {podIP: 10.244.1.50}
"#;
    let mut files = sample_files();
    files.push(("extra.yaml", extra));
    let c = Cluster::from_yaml_files(files).unwrap_or_else(|e| panic!("{e}"));
    let pod = |addr: &str| c.pod_by_ip(ip(addr)).expect("pod");
    assert!(c.is_enrolled(pod("10.244.0.11")));
    assert!(!c.is_enrolled(pod("10.244.0.50")));
    assert!(!c.is_enrolled(pod("10.244.1.50")));
    assert_eq!(c.namespace("plain").map(|n| n.labels.len()), Some(0));
}

#[test]
fn hosts_resolve_to_services() {
    let c = sample();
    for host in [
        "recall",
        "recall.lemo-dev",
        "recall.lemo-dev.svc",
        "recall.lemo-dev.svc.cluster.local",
        "recall.lemo-dev.svc.cluster.local.",
    ] {
        assert_eq!(
            c.service_by_host(host, "lemo-dev").map(|s| s.name.as_str()),
            Some("recall"),
            "{host}"
        );
    }
    assert_eq!(
        c.service_by_host("recall.lemo-dev", "other")
            .map(|s| s.name.as_str()),
        Some("recall")
    );
    assert!(c.service_by_host("recall", "other").is_none());
    assert!(c.service_by_host("recall.nowhere", "lemo-dev").is_none());
    assert!(c.service_by_host("example.com", "lemo-dev").is_none());
    assert!(
        c.service_by_host("*.lemo-dev.svc.cluster.local", "lemo-dev")
            .is_none()
    );
    assert_eq!(
        c.canonical_host("rank", "lemo-dev"),
        "rank.lemo-dev.svc.cluster.local"
    );
}

#[test]
fn destination_rule_is_typed() {
    let c = sample();
    let recall = c.service("lemo-dev", "recall").expect("recall");
    let dr = c.destination_rule_for(recall, None).expect("recall rule");
    assert_eq!(
        (dr.namespace.as_str(), dr.name.as_str(), dr.host.as_str()),
        ("lemo-dev", "recall", "recall")
    );
    let tp = dr.traffic_policy.as_ref().expect("policy");
    assert_eq!(
        tp.load_balancer,
        Some(LoadBalancer {
            policy: LbPolicy::Simple(SimpleLb::LeastRequest),
        })
    );
    let od = tp.outlier_detection.as_ref().expect("outlier detection");
    assert_eq!(od.consecutive_5xx_errors, Some(5));
    assert_eq!(od.interval, Some(Duration::from_secs(10)));
    assert_eq!(od.base_ejection_time, Some(Duration::from_secs(30)));
    assert_eq!(od.max_ejection_percent, Some(50));
    let pool = tp.connection_pool.as_ref().expect("pool");
    let tcp = pool.tcp.as_ref().expect("tcp");
    assert_eq!(tcp.max_connections, Some(100));
    assert_eq!(tcp.connect_timeout, Some(Duration::from_millis(500)));
    assert_eq!(
        pool.http.as_ref().and_then(|h| h.http2_max_requests),
        Some(1000)
    );
    let names: Vec<&str> = dr.subsets.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["v1", "v2"]);
    assert_eq!(
        dr.subset("v2")
            .and_then(|s| s.labels.get("version"))
            .map(String::as_str),
        Some("v2")
    );
    assert!(
        c.destination_rule_for(c.service("lemo-dev", "rank").expect("rank"), None)
            .is_none()
    );
}

#[test]
fn destination_rule_lookup_prefers_namespace_then_root() {
    let extra = r#"
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {namespace: istio-system, name: mesh-rank}
spec:
  host: rank.lemo-dev.svc.cluster.local
  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {namespace: istio-system, name: mesh-recall}
spec:
  host: recall.lemo-dev.svc.cluster.local
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {namespace: lemo-dev, name: all}
spec:
  host: "*.lemo-dev.svc.cluster.local"
  trafficPolicy:
    loadBalancer: {simple: LEAST_CONN}
    portLevelSettings:
      - port: {number: 80}
        loadBalancer: {simple: RANDOM}
"#;
    let mut files = sample_files();
    files.push(("extra.yaml", extra));
    let c = Cluster::from_yaml_files(files).unwrap_or_else(|e| panic!("{e}"));
    let rule = |svc: &str| {
        c.destination_rule_for(c.service("lemo-dev", svc).expect("svc"), None)
            .map(|d| d.name.as_str())
    };
    // Exact host beats the namespace wildcard; the namespace beats the root.
    assert_eq!(rule("recall"), Some("recall"));
    assert_eq!(rule("rank"), Some("all"));
    let all = c
        .destination_rules()
        .find(|d| d.name == "all")
        .expect("all");
    let tp = all.traffic_policy.as_ref().expect("policy");
    let lb = |p: &TrafficPolicy| p.load_balancer.as_ref().map(|l| l.policy.clone());
    assert_eq!(lb(tp), Some(LbPolicy::Simple(SimpleLb::LeastRequest)));
    assert_eq!(
        lb(&tp.for_port(80)),
        Some(LbPolicy::Simple(SimpleLb::Random))
    );
    assert_eq!(
        lb(&tp.for_port(81)),
        Some(LbPolicy::Simple(SimpleLb::LeastRequest))
    );
}

#[test]
fn root_namespace_rule_applies_when_the_namespace_has_none() {
    let extra = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {namespace: istio-system, name: mesh-rank}
spec:
  host: rank.lemo-dev.svc.cluster.local
  trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}
"#;
    let mut files = sample_files();
    files.push(("extra.yaml", extra));
    let c = Cluster::from_yaml_files(files).unwrap_or_else(|e| panic!("{e}"));
    let dr = c
        .destination_rule_for(c.service("lemo-dev", "rank").expect("rank"), None)
        .expect("root rule");
    assert_eq!(dr.name, "mesh-rank");
    let tls = dr
        .traffic_policy
        .as_ref()
        .and_then(|t| t.tls.as_ref())
        .expect("tls");
    assert_eq!(tls.mode, TlsMode::IstioMutual);
}

#[test]
fn virtual_service_is_typed() {
    let c = sample();
    let recall = c.service("lemo-dev", "recall").expect("recall");
    let vss = c.virtual_services_for(recall, None);
    assert_eq!(vss.len(), 1);
    let vs = vss[0];
    assert!(vs.applies_to_mesh());
    assert_eq!(vs.http.len(), 2);

    let canary = &vs.http[0];
    assert_eq!(canary.name.as_deref(), Some("canary"));
    assert_eq!(
        canary.matches[0].headers.get("x-canary"),
        Some(&StringMatch::Exact("true".into()))
    );
    assert_eq!(canary.route[0].destination.subset.as_deref(), Some("v2"));
    assert_eq!(canary.effective_weights(), [100]);
    assert_eq!(canary.timeout, Some(Duration::from_secs(2)));
    assert!(canary.retries.is_none());

    let default = &vs.http[1];
    assert!(default.matches.is_empty());
    assert_eq!(
        default.route.iter().map(|r| r.weight).collect::<Vec<_>>(),
        [Some(90), Some(10)]
    );
    assert_eq!(default.route[0].destination.port, Some(50051));
    let target = c.service_by_host(&default.route[0].destination.host, &vs.namespace);
    assert_eq!(target.map(|s| s.name.as_str()), Some("recall"));
    let retries = default.retries.as_ref().expect("retries");
    assert_eq!(retries.attempts, 3);
    assert_eq!(retries.per_try_timeout, Some(Duration::from_millis(500)));
    assert_eq!(
        retries.retry_on,
        [
            RetryOn::FiveXx,
            RetryOn::ConnectFailure,
            RetryOn::Unavailable
        ]
    );
    assert!(
        c.virtual_services_for(c.service("lemo-dev", "rank").expect("rank"), None)
            .is_empty()
    );
}

#[test]
fn peer_authentication_sets_mtls() {
    let c = sample();
    let pa = c.peer_authentications().next().expect("pa");
    assert_eq!(
        (pa.namespace.as_str(), pa.mtls),
        ("lemo-dev", Some(MtlsMode::Strict))
    );
    let pod = c.pod_by_ip(ip("10.244.0.11")).expect("recall-0");
    assert_eq!(c.mtls_mode_for(pod, 50051), MtlsMode::Strict);

    let extra = r#"
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {namespace: lemo-dev, name: recall-metrics}
spec:
  selector: {matchLabels: {app: recall}}
  mtls: {mode: UNSET}
  portLevelMtls:
    8081: {mode: PERMISSIVE}
    "9090": {mode: DISABLE}
"#;
    let mut files = sample_files();
    files.push(("extra.yaml", extra));
    let c = Cluster::from_yaml_files(files).unwrap_or_else(|e| panic!("{e}"));
    let pod = c.pod_by_ip(ip("10.244.0.11")).expect("recall-0");
    assert_eq!(c.mtls_mode_for(pod, 8081), MtlsMode::Permissive);
    assert_eq!(c.mtls_mode_for(pod, 9090), MtlsMode::Disable);
    // UNSET at workload level falls through to the namespace's STRICT.
    assert_eq!(c.mtls_mode_for(pod, 50051), MtlsMode::Strict);
}

#[test]
fn unknown_kinds_are_skipped() {
    let extra = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec: {}\n---\n# only a comment\n";
    let mut files = sample_files();
    files.push(("extra.yaml", extra));
    let c = Cluster::from_yaml_files(files).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.pods().count(), 6);
}

// ------------------------------------------------------------ bad inputs

#[test]
fn bad_duration_names_file_object_and_field() {
    let dr = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: recall}
spec:
  host: recall
  trafficPolicy:
    outlierDetection:
      interval: ten
"#;
    assert_problems(
        &[("recall.yaml", dr)],
        &[
            r#"recall.yaml: DestinationRule default/recall: trafficPolicy.outlierDetection.interval: "ten" is not a duration"#,
        ],
    );
}

#[test]
fn destination_rule_field_checks_are_all_reported() {
    let dr = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {namespace: lemo-dev, name: rank}
spec:
  host: rank
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: -1, connectTimeout: 0s}
      http: {idleTimeout: 500us}
    outlierDetection:
      consecutiveErrors: 3
      consecutive5xxErrors: 3
      maxEjectionPercent: 150
      minHealthPercent: -5
      baseEjectionTime: 30
    loadBalancer:
      consistentHash: {httpHeaderName: x-user, useSourceIp: true}
    tls: {}
    portLevelSettings:
      - port: {number: 70000}
  subsets:
    - {name: v1, labels: {version: v1}}
    - {name: v1, labels: {version: v2}}
    - {name: V3}
  exportTo: ["lemo dev"]
"#;
    let f = "rank.yaml: DestinationRule lemo-dev/rank";
    let want = [
        format!(
            "{f}: trafficPolicy.loadBalancer.consistentHash: only one of httpHeaderName, httpCookie, useSourceIp or httpQueryParameterName may be set"
        ),
        format!(
            "{f}: trafficPolicy.connectionPool.tcp.maxConnections: -1 is out of range (0-2147483647)"
        ),
        format!(
            "{f}: trafficPolicy.connectionPool.tcp.connectTimeout: \"0s\" must be at least 1ms"
        ),
        format!(
            "{f}: trafficPolicy.connectionPool.http.idleTimeout: \"500us\" must be at least 1ms"
        ),
        format!(
            "{f}: trafficPolicy.outlierDetection.consecutiveErrors: is a deprecated alias of consecutive5xxErrors; set only one"
        ),
        format!("{f}: trafficPolicy.outlierDetection.baseEjectionTime: \"30\" is not a duration"),
        format!(
            "{f}: trafficPolicy.outlierDetection.maxEjectionPercent: 150 is out of range (0-100)"
        ),
        format!("{f}: trafficPolicy.outlierDetection.minHealthPercent: -5 is out of range (0-100)"),
        format!("{f}: trafficPolicy.tls.mode: is required"),
        format!("{f}: subsets[1].name: duplicate subset name \"v1\""),
        format!("{f}: subsets[2].name: \"V3\" is not a valid subset name (DNS-1123 label)"),
        format!("{f}: exportTo[0]: \"lemo dev\" is not ., *, ~ or a namespace name"),
    ];
    let mut got = problems_with(&[("rank.yaml", dr)]);
    // portLevelSettings is checked first (the policy's parts are built after it).
    assert_eq!(
        got.remove(0),
        format!(
            "{f}: trafficPolicy.portLevelSettings[0].port.number: 70000 is not a valid port (1-65535)"
        )
    );
    assert_eq!(got, want);
}

#[test]
fn structural_errors_name_the_field_path() {
    let cases: &[(&str, &str)] = &[
        (
            "spec:\n  host: recall\n  trafficPolicy:\n    loadBalancer:\n      simpel: RANDOM\n",
            "trafficPolicy.loadBalancer.simpel: unknown field (expected one of: simple, consistentHash, warmupDurationSecs, warmup, localityLbSetting, zoneAwareLbSetting)",
        ),
        (
            "spec:\n  host: recall\n  trafficPolicy:\n    loadBalancer:\n      simple: FASTEST\n",
            "trafficPolicy.loadBalancer.simple: \"FASTEST\" is not one of UNSPECIFIED, ROUND_ROBIN, LEAST_CONN, LEAST_REQUEST, RANDOM, PASSTHROUGH",
        ),
        ("spec:\n  trafficPolicy: {}\n", "host: is required"),
        (
            "spec:\n  host: recall\n  subsets:\n    - labels: {version: v1}\n",
            "subsets[0].name: is required",
        ),
        (
            "spec:\n  host: recall\n  trafficPolicy:\n    tls: {mode: PLAINTEXT}\n",
            "trafficPolicy.tls.mode: \"PLAINTEXT\" is not one of DISABLE, SIMPLE, MUTUAL, ISTIO_MUTUAL",
        ),
        (
            "spec:\n  host: recall\n  trafficPolicy:\n    connectionPool: {http: {maxRetries: lots}}\n",
            "trafficPolicy.connectionPool.http.maxRetries: invalid type: string \"lots\", expected i64",
        ),
        (
            "specs: {}\n",
            "specs: unknown field (expected one of: apiVersion, kind, metadata, spec, status)",
        ),
        (
            "metadata: {labels: {a: [1]}}\nspec: {host: x}\n",
            "metadata.labels.a: invalid type: sequence, expected a string",
        ),
    ];
    for (body, want) in cases {
        let doc = format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{namespace: lemo-dev, name: bad}}\n{body}"
        );
        // The test's metadata line is replaced when the case supplies its own.
        let doc = if body.starts_with("metadata") {
            doc.replacen("metadata: {namespace: lemo-dev, name: bad}\n", "", 1)
                .replace(
                    "metadata: {labels",
                    "metadata: {namespace: lemo-dev, name: bad, labels",
                )
        } else {
            doc
        };
        assert_problems(
            &[("bad.yaml", &doc)],
            &[&format!("bad.yaml: DestinationRule lemo-dev/bad: {want}")],
        );
    }
}

#[test]
fn virtual_service_checks() {
    let vs = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {namespace: lemo-dev, name: rank}
spec:
  hosts: [rank]
  http:
    - route:
        - destination: {host: rank}
          weight: 60
        - destination: {host: rank}
          weight: 35
    - route:
        - destination: {host: rank}
          weight: 120
      retries: {attempts: -1, perTryTimeout: fast, retryOn: "5xx,bogus,503"}
      fault:
        delay: {percentage: {value: 150}, fixedDelay: 1s}
        abort: {httpStatus: 700}
    - route:
        - destination: {host: recall, subset: v3}
      redirect: {uri: /x}
  tcp:
    - match: [{port: 0}]
      route: []
"#;
    let f = "vs.yaml: VirtualService lemo-dev/rank";
    assert_problems(
        &[("vs.yaml", vs)],
        &[
            &format!("{f}: http[0].route: weights add up to 95, not 100"),
            &format!("{f}: http[1].route[0].weight: 120 is out of range (0-100)"),
            &format!(
                "{f}: http[1].retries.retryOn: \"bogus\" is not a retry condition (an Envoy/gRPC retry policy or an HTTP status)"
            ),
            &format!("{f}: http[1].retries.attempts: -1 is out of range (0-2147483647)"),
            &format!("{f}: http[1].retries.perTryTimeout: \"fast\" is not a duration"),
            &format!("{f}: http[1].fault.delay.percentage.value: 150 is out of range (0-100)"),
            &format!("{f}: http[1].fault.abort.httpStatus: 700 is out of range (200-599)"),
            &format!("{f}: http[2].redirect: may not be combined with route"),
            &format!("{f}: tcp[0].match[0].port: 0 is not a valid port (1-65535)"),
            &format!("{f}: tcp[0].route: at least one route is required"),
            &format!(
                "{f}: http[2].route[0].destination.subset: subset \"v3\" is not defined by any DestinationRule for host recall.lemo-dev.svc.cluster.local"
            ),
        ],
    );
}

#[test]
fn virtual_service_fields_the_proxy_does_not_apply_are_rejected() {
    let vs = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {namespace: lemo-dev, name: rank}
spec:
  hosts: [rank]
  http:
    - match: [{uri: {prefix: /a}, statPrefix: a}]
      route: [{destination: {host: rank}}]
      mirror: {host: recall}
      mirrorPercentage: {value: 50}
      corsPolicy: {allowOrigins: [{exact: "https://x"}]}
      retries:
        attempts: 2
        retryOn: 5xx,retriable-headers,envoy-ratelimited
        retryRemoteLocalities: true
    - route: [{destination: {host: rank}}]
      mirrors: [{destination: {host: recall}}]
      mirrorPercent: 10
    - delegate: {name: rank-routes}
    - directResponse: {status: 503}
  tcp:
    - match: [{port: 80, destinationSubnets: [10.0.0.0/8], gateways: [ingress]}]
      route: [{destination: {host: rank}}]
  tls:
    - match: [{sniHosts: [rank]}]
      route: [{destination: {host: rank}}]
"#;
    let f = "vs.yaml: VirtualService lemo-dev/rank";
    assert_problems(
        &[("vs.yaml", vs)],
        &[
            &format!("{f}: tls: not supported by mesh"),
            &format!("{f}: http[0].match[0].statPrefix: not supported by mesh"),
            &format!("{f}: http[0].mirror: not supported by mesh"),
            &format!("{f}: http[0].mirrorPercentage: not supported by mesh"),
            &format!("{f}: http[0].corsPolicy: not supported by mesh"),
            &format!("{f}: http[0].retries.retryRemoteLocalities: not supported by mesh"),
            &format!("{f}: http[1].mirrors: not supported by mesh"),
            &format!("{f}: http[1].mirrorPercent: not supported by mesh"),
            &format!("{f}: http[2].delegate: not supported by mesh"),
            &format!("{f}: http[3].directResponse: not supported by mesh"),
            &format!("{f}: tcp[0].match[0].destinationSubnets: not supported by mesh"),
            &format!(
                "{f}: tcp[0].match[0].gateways: gateways other than \"mesh\" are not supported by mesh in tcp matches"
            ),
            &format!(
                "{f}: http[0].retries.retryOn: \"retriable-headers\" is not supported by mesh"
            ),
            &format!(
                "{f}: http[0].retries.retryOn: \"envoy-ratelimited\" is not supported by mesh"
            ),
        ],
    );
}

#[test]
fn destination_rule_fields_the_proxy_does_not_apply_are_rejected() {
    let dr = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {namespace: lemo-dev, name: rank}
spec:
  host: rank
  workloadSelector: {matchLabels: {app: bff}}
  trafficPolicy:
    loadBalancer:
      simple: PASSTHROUGH
      warmupDurationSecs: 30s
      localityLbSetting: {enabled: true}
    connectionPool:
      tcp: {maxConnections: 10, tcpKeepalive: {time: 60s}, maxConnectionDuration: 1h, idleTimeout: 5m}
      http: {h2UpgradePolicy: UPGRADE, maxConcurrentStreams: 100}
    tls: {mode: SIMPLE, sni: rank.example.com}
    proxyProtocol: {version: V1}
    tunnel: {protocol: CONNECT, targetHost: rank.example.com, targetPort: 443}
  subsets:
    - name: v1
      labels: {version: v1}
      trafficPolicy:
        portLevelSettings:
          - port: {number: 80}
            tls: {mode: MUTUAL, clientCertificate: /c.pem, privateKey: /k.pem}
"#;
    let f = "dr.yaml: DestinationRule lemo-dev/rank";
    let tp = "trafficPolicy";
    let port = "subsets[0].trafficPolicy.portLevelSettings[0]";
    let want: Vec<String> = [
        "workloadSelector: not supported by mesh".to_string(),
        format!("{tp}.loadBalancer.simple: PASSTHROUGH is not supported by mesh"),
        format!("{tp}.loadBalancer.warmupDurationSecs: not supported by mesh"),
        format!("{tp}.loadBalancer.localityLbSetting: not supported by mesh"),
        format!("{tp}.connectionPool.tcp.tcpKeepalive: not supported by mesh"),
        format!("{tp}.connectionPool.tcp.maxConnectionDuration: not supported by mesh"),
        format!("{tp}.connectionPool.tcp.idleTimeout: not supported by mesh"),
        format!("{tp}.connectionPool.http.h2UpgradePolicy: UPGRADE is not supported by mesh"),
        format!("{tp}.connectionPool.http.maxConcurrentStreams: not supported by mesh"),
        format!("{tp}.tls.mode: SIMPLE is not supported (TLS origination to a server of its own is not implemented; between mesh pods the proxy always uses mutual TLS (ISTIO_MUTUAL))"),
        format!("{tp}.tls.sni: not supported by mesh"),
        format!("{tp}.proxyProtocol: not supported by mesh"),
        format!("{tp}.tunnel: not supported by mesh"),
        format!("{port}.tls.mode: MUTUAL is not supported (TLS origination to a server of its own is not implemented; between mesh pods the proxy always uses mutual TLS (ISTIO_MUTUAL))"),
        format!("{port}.tls.clientCertificate: not supported by mesh"),
        format!("{port}.tls.privateKey: not supported by mesh"),
    ]
    .iter()
    .map(|p| format!("{f}: {p}"))
    .collect();
    assert_eq!(problems_with(&[("dr.yaml", dr)]), want);
}

#[test]
fn supported_settings_next_to_rejected_ones_still_load() {
    // Values the proxy applies (or that match what it always does) are accepted.
    let extra = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {namespace: lemo-dev, name: rank}
spec:
  host: rank
  trafficPolicy:
    connectionPool:
      http: {h2UpgradePolicy: DO_NOT_UPGRADE, useClientProtocol: true, idleTimeout: 30s}
    portLevelSettings:
      - port: {number: 80}
        connectionPool: {http: {useClientProtocol: true}}
        tls: {mode: ISTIO_MUTUAL}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {namespace: lemo-dev, name: rank}
spec:
  hosts: [rank]
  http:
    - match: [{uri: {prefix: /a}, gateways: [mesh]}]
      route: [{destination: {host: rank}}]
      retries: {attempts: 1, retryOn: "gateway-error,503", retryRemoteLocalities: false}
  tcp:
    - match: [{port: 80, gateways: [mesh, ingress]}]
      route: [{destination: {host: rank}}]
"#;
    let mut files = sample_files();
    files.push(("extra.yaml", extra));
    let c = Cluster::from_yaml_files(files).unwrap_or_else(|e| panic!("{e}"));
    let dr = c
        .destination_rule_for(c.service("lemo-dev", "rank").expect("rank"), None)
        .expect("rank rule");
    let tp = dr.traffic_policy.as_ref().expect("policy");
    assert_eq!(tp.tls, None);
    assert_eq!(
        tp.for_port(80).tls,
        Some(ClientTls {
            mode: TlsMode::IstioMutual
        })
    );
    let http = tp
        .connection_pool
        .as_ref()
        .and_then(|p| p.http.as_ref())
        .expect("http settings");
    assert_eq!(http.h2_upgrade_policy, H2UpgradePolicy::DoNotUpgrade);
    assert!(http.use_client_protocol);
}

#[test]
fn subsets_must_exist_for_the_routed_host() {
    // v2 exists for recall, but rank has no DestinationRule at all.
    let vs = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {namespace: lemo-dev, name: rank}
spec:
  hosts: [rank.lemo-dev.svc.cluster.local]
  http:
    - route:
        - destination: {host: recall.lemo-dev, subset: v2}
          weight: 50
        - destination: {host: rank, subset: v2}
          weight: 50
"#;
    assert_problems(
        &[("vs.yaml", vs)],
        &[
            r#"vs.yaml: VirtualService lemo-dev/rank: http[0].route[1].destination.subset: subset "v2" is not defined by any DestinationRule for host rank.lemo-dev.svc.cluster.local"#,
        ],
    );
}

#[test]
fn peer_authentication_checks() {
    let pa = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {namespace: lemo-dev, name: ports}
spec:
  portLevelMtls:
    8080: {mode: DISABLE}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {namespace: lemo-dev, name: loose}
spec:
  mtls: {mode: LOOSE}
"#;
    assert_problems(
        &[("pa.yaml", pa)],
        &[
            "pa.yaml: PeerAuthentication lemo-dev/ports: portLevelMtls: requires a workload selector (selector.matchLabels)",
            "pa.yaml: PeerAuthentication lemo-dev/loose: mtls.mode: \"LOOSE\" is not one of UNSET, DISABLE, PERMISSIVE, STRICT",
        ],
    );
}

#[test]
fn core_kind_checks() {
    let bad = r#"
apiVersion: v1
kind: Pod
metadata: {namespace: lemo-dev, name: lost}
spec: {nodeName: node-z}
status: {podIP: 10.244.0.300}
---
apiVersion: v1
kind: Pod
metadata: {namespace: lemo-dev, name: bare}
spec: {containers: [{name: c, ports: [{containerPort: 70000}]}]}
---
apiVersion: v1
kind: Pod
metadata: {namespace: lemo-dev, name: orphan}
spec: {nodeName: node-z}
status: {podIP: 10.244.0.77}
---
apiVersion: v1
kind: Node
metadata: {name: node-c}
status: {addresses: [{type: Hostname, address: node-c}]}
---
apiVersion: v1
kind: Service
metadata: {namespace: lemo-dev, name: broken}
spec:
  clusterIP: 10.96.0.x
  ports:
    - {port: 80, targetPort: 0}
    - {name: b, port: 81, protocol: HTTP}
---
apiVersion: v1
kind: Service
metadata: {namespace: lemo-dev, name: novip}
spec: {ports: [{port: 80}]}
"#;
    assert_problems(
        &[("bad.yaml", bad)],
        &[
            "bad.yaml: Pod lemo-dev/lost: status.podIP: \"10.244.0.300\" is not an IP address",
            "bad.yaml: Pod lemo-dev/bare: spec.nodeName: is required",
            "bad.yaml: Pod lemo-dev/bare: status.podIP: is required",
            "bad.yaml: Pod lemo-dev/bare: spec.containers[0].ports[0].containerPort: 70000 is not a valid port (1-65535)",
            "bad.yaml: Node node-c: status.addresses: no InternalIP address (required for every node)",
            "bad.yaml: Service lemo-dev/broken: spec.clusterIP: \"10.96.0.x\" is not an IP address",
            "bad.yaml: Service lemo-dev/broken: spec.ports[0].targetPort: 0 is not a valid port (1-65535)",
            "bad.yaml: Service lemo-dev/broken: spec.ports[1].protocol: \"HTTP\" is not one of TCP, UDP, SCTP",
            "bad.yaml: Service lemo-dev/novip: spec.clusterIP: is required (an IP, or None for a headless Service)",
            "bad.yaml: Pod lemo-dev/orphan: spec.nodeName: node \"node-z\" is not defined",
        ],
    );
}

#[test]
fn duplicate_objects_and_addresses() {
    let dup = r#"
apiVersion: v1
kind: Pod
metadata: {namespace: lemo-dev, name: recall-0}
spec: {nodeName: node-a}
status: {podIP: 10.244.0.200}
---
apiVersion: v1
kind: Pod
metadata: {namespace: lemo-dev, name: thief}
spec: {nodeName: node-a}
status: {podIP: 10.244.0.11}
---
apiVersion: v1
kind: Service
metadata: {namespace: lemo-dev, name: copycat}
spec: {clusterIP: 10.96.0.20, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {namespace: lemo-dev, name: headless}
spec: {clusterIP: None, selector: {app: recall}, ports: [{port: 80}]}
---
apiVersion: v1
kind: Pod
metadata: {namespace: lemo-dev, name: host-net}
spec: {nodeName: node-a, hostNetwork: true}
status: {podIP: 172.18.0.2}
---
apiVersion: v1
kind: Pod
metadata: {namespace: lemo-dev, name: host-net-2}
spec: {nodeName: node-a, hostNetwork: true}
status: {podIP: 172.18.0.2}
"#;
    assert_problems(
        &[("dup.yaml", dup)],
        &[
            "dup.yaml: Pod lemo-dev/recall-0: duplicate object (first defined in cluster.yaml)",
            "dup.yaml: Pod lemo-dev/thief: status.podIP: 10.244.0.11 is already used by Pod lemo-dev/recall-0",
            "dup.yaml: Service lemo-dev/copycat: spec.clusterIP: 10.96.0.20 is already used by Service lemo-dev/recall",
        ],
    );
}

#[test]
fn yaml_and_document_errors() {
    let problems = problems_with(&[
        (
            "broken.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: x\n   bad: indent\n",
        ),
        (
            "nokind.yaml",
            "apiVersion: v1\nmetadata: {name: x}\n---\n- a list\n---\napiVersion: v1\nkind: Pod\nmetadata: {namespace: lemo-dev}\n",
        ),
    ]);
    assert_eq!(problems.len(), 4, "{problems:#?}");
    assert!(problems[0].starts_with("broken.yaml:5:"), "{}", problems[0]);
    assert!(problems[0].contains("invalid YAML: "), "{}", problems[0]);
    assert_eq!(problems[1], "nokind.yaml: document 1: kind: is required");
    assert_eq!(
        problems[2],
        "nokind.yaml: document 2: expected a Kubernetes object (a mapping)"
    );
    assert_eq!(
        problems[3],
        "nokind.yaml: Pod (document 3): metadata.name: is required"
    );
}

#[test]
fn config_error_display_joins_lines() {
    let err = Cluster::from_yaml_files([(
        "a.yaml",
        "apiVersion: v1\nkind: Node\nmetadata: {name: n}\n",
    )])
    .expect_err("node without address");
    assert_eq!(
        err.problems(),
        ["a.yaml: Node n: status.addresses: no InternalIP address (required for every node)"]
    );
    assert_eq!(err.to_string(), err.problems().join("\n"));
    assert_eq!(err.details()[0].field.as_deref(), Some("status.addresses"));
}

// ------------------------------------------------------------ watcher

async fn wait_for_change(rx: &mut tokio::sync::watch::Receiver<Arc<Cluster>>) -> bool {
    tokio::time::timeout(Duration::from_secs(10), rx.changed())
        .await
        .is_ok_and(|r| r.is_ok())
}

#[tokio::test]
async fn watcher_keeps_last_good_config_and_picks_up_fixes() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, text) in sample_files() {
        std::fs::write(dir.path().join(name), text).expect("write sample");
    }
    let initial = Arc::new(Cluster::load_dir(dir.path()).unwrap_or_else(|e| panic!("{e}")));
    let initial_fp = initial.fingerprint();
    let mut rx = spawn_watcher(dir.path().to_path_buf(), initial, Duration::from_millis(20)).expect("watcher thread");

    // A broken file: nothing is published.
    let extra = dir.path().join("zz-extra.yaml");
    std::fs::write(&extra, "apiVersion: v1\nkind: Service\nmetadata: {namespace: lemo-dev, name: new}\nspec: {clusterIP: nope}\n")
        .expect("write bad");
    let published = tokio::time::timeout(Duration::from_millis(400), rx.changed()).await;
    assert!(published.is_err(), "a bad config must not be published");
    assert_eq!(rx.borrow().fingerprint(), initial_fp);
    assert!(rx.borrow().service("lemo-dev", "new").is_none());

    // The fix arrives.
    std::fs::write(&extra, "apiVersion: v1\nkind: Service\nmetadata: {namespace: lemo-dev, name: new}\nspec: {clusterIP: 10.96.1.1, ports: [{port: 80}]}\n")
        .expect("write fix");
    assert!(
        wait_for_change(&mut rx).await,
        "fixed config was not published"
    );
    let current = rx.borrow_and_update().clone();
    assert_ne!(current.fingerprint(), initial_fp);
    assert!(current.service_by_vip(ip("10.96.1.1")).is_some());

    // Removing the file is a change too.
    std::fs::remove_file(&extra).expect("remove");
    assert!(wait_for_change(&mut rx).await, "removal was not published");
    assert_eq!(rx.borrow().fingerprint(), initial_fp);
}

#[test]
fn mesh_annotations_on_destination_rules() {
    let dr = |annotations: &str, body: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  namespace: lemo-dev\n  name: smart\n  annotations:\n{annotations}spec:\n  host: recall\n{body}"
        )
    };
    let ok = dr(
        "    mesh.io/load-balancer: peak-ewma\n    mesh.io/rate-limit: 50/s\n    mesh.io/rate-limit-burst: \"10\"\n    other.example/free: anything\n",
        "",
    );
    let mut files = sample_files();
    files.push(("smart.yaml", &ok));
    let cluster = Cluster::from_yaml_files(files).unwrap_or_else(|e| panic!("{e}"));
    let rule = cluster.destination_rules().find(|r| r.name == "smart").expect("rule");
    assert_eq!(rule.mesh, MeshPolicy { peak_ewma: true, rate_limit: Some(RateLimit { per_second: 50.0, burst: 10 }), adaptive_concurrency: None });

    // Burst defaults to one second of rate, at least 1; `/m` is per minute.
    for (rate, want) in [("100/s", RateLimit { per_second: 100.0, burst: 100 }), ("30/m", RateLimit { per_second: 0.5, burst: 1 })] {
        let doc = dr(&format!("    mesh.io/rate-limit: {rate}\n"), "");
        let mut files = sample_files();
        files.push(("smart.yaml", &doc));
        let cluster = Cluster::from_yaml_files(files).unwrap_or_else(|e| panic!("{e}"));
        let rule = cluster.destination_rules().find(|r| r.name == "smart").expect("rule");
        assert_eq!(rule.mesh.rate_limit, Some(want));
        assert!(!rule.mesh.peak_ewma);
    }

    // Adaptive concurrency: on with the default or a given upper bound; off is no limiter.
    for (annotations, want) in [
        ("    mesh.io/adaptive-concurrency: \"on\"\n", Some(1000)),
        ("    mesh.io/adaptive-concurrency: \"on\"\n    mesh.io/adaptive-concurrency-max: \"64\"\n", Some(64)),
        ("    mesh.io/adaptive-concurrency: \"off\"\n", None),
    ] {
        let doc = dr(annotations, "");
        let mut files = sample_files();
        files.push(("smart.yaml", &doc));
        let cluster = Cluster::from_yaml_files(files).unwrap_or_else(|e| panic!("{e}"));
        let rule = cluster.destination_rules().find(|r| r.name == "smart").expect("rule");
        assert_eq!(rule.mesh.adaptive_concurrency, want, "{annotations}");
    }

    let at = |key: &str, msg: &str| format!("smart.yaml: DestinationRule lemo-dev/smart: metadata.annotations[\"{key}\"]: {msg}");
    let cases: Vec<(String, Vec<String>)> = vec![
        (
            dr("    mesh.io/rate-limit: fast\n", ""),
            vec![at("mesh.io/rate-limit", "\"fast\" is not a rate like \"100/s\" or \"600/m\"")],
        ),
        (
            dr("    mesh.io/rate-limit: 0/s\n    mesh.io/rate-limit-burst: \"-3\"\n", ""),
            vec![
                at("mesh.io/rate-limit", "\"0/s\" is not a rate like \"100/s\" or \"600/m\""),
                at("mesh.io/rate-limit-burst", "\"-3\" is not a positive whole number of requests"),
            ],
        ),
        (dr("    mesh.io/rate-limit-burst: \"5\"\n", ""), vec![at("mesh.io/rate-limit-burst", "needs mesh.io/rate-limit")]),
        (dr("    mesh.io/load-balancer: fastest\n", ""), vec![at("mesh.io/load-balancer", "\"fastest\" is not one of peak-ewma")]),
        (dr("    mesh.io/adaptive-concurrency: \"yes\"\n", ""), vec![at("mesh.io/adaptive-concurrency", "\"yes\" is not one of on, off")]),
        (
            dr("    mesh.io/adaptive-concurrency: \"off\"\n    mesh.io/adaptive-concurrency-max: \"10\"\n", ""),
            vec![at("mesh.io/adaptive-concurrency-max", "needs mesh.io/adaptive-concurrency: \"on\"")],
        ),
        (
            dr("    mesh.io/adaptive-concurrency: \"on\"\n    mesh.io/adaptive-concurrency-max: \"0\"\n", ""),
            vec![at("mesh.io/adaptive-concurrency-max", "\"0\" is not a positive whole number of requests")],
        ),
        (
            dr("    mesh.io/ratelimit: 5/s\n", ""),
            vec![at(
                "mesh.io/ratelimit",
                "unknown mesh annotation (expected one of: mesh.io/load-balancer, mesh.io/rate-limit, mesh.io/rate-limit-burst, mesh.io/adaptive-concurrency, mesh.io/adaptive-concurrency-max)",
            )],
        ),
        (
            dr("    mesh.io/load-balancer: peak-ewma\n", "  subsets:\n  - name: v1\n    labels: {version: v1}\n    trafficPolicy:\n      loadBalancer: {simple: ROUND_ROBIN}\n"),
            vec![at("mesh.io/load-balancer", "peak-ewma cannot be combined with a loadBalancer in the trafficPolicy")],
        ),
    ];
    for (doc, want) in &cases {
        let want: Vec<&str> = want.iter().map(String::as_str).collect();
        assert_problems(&[("smart.yaml", doc)], &want);
    }
}

#[test]
fn hash_tables_above_the_cap_are_refused_by_field() {
    let dr = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {namespace: lemo-dev, name: rank}
spec:
  host: rank
  trafficPolicy:
    loadBalancer:
      consistentHash:
        httpHeaderName: x-user
        ringHash: {minimumRingSize: 8388608}
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy:
      loadBalancer:
        consistentHash:
          httpHeaderName: x-user
          maglev: {tableSize: 1048573}
"#;
    let problems = problems_with(&[("dr.yaml", dr)]);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].ends_with("trafficPolicy.loadBalancer.consistentHash.ringHash.minimumRingSize: 8388608 is over the node proxy's cap of 1048576 entries per upstream cluster (memory is shared by every workload of the node)"),
        "{problems:?}"
    );
}
