//! A simulated cluster: nodes and pods are network namespaces, joined by veth pairs and bridges;
//! each pod's processes run in their own cgroup under their node's cgroup; each node runs a real
//! `mesh-node` with real eBPF attached to that node cgroup.
//!
//! Layout (`<id>` is unique per cluster):
//! - `<id>-net`: the "switch", a bridge joining the nodes' underlay interfaces (172.30.0.0/24).
//! - `<id>-n<i>`: node i, underlay 172.30.0.<i+1>, pod bridge 10.244.<i>.1/24, routes to the
//!   other nodes' pod subnets. No default route: nothing here can reach the outside world.
//! - `<id>-p<k>`: a pod, 10.244.<node>.<k+10>, default route via its node.
//!
//! Each node proxy pins its capture (bpf links and shared maps) in its own directory of a bpffs
//! the cluster mounts for itself (`<tmp>/mesh-e2e-<id>/bpffs/<node>`), so clusters never share
//! pins and a restarted proxy takes its predecessor's over.
//!
//! Everything is torn down on drop (also when a test panics): processes killed, pins removed and
//! the bpffs unmounted, namespaces deleted, cgroups removed.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{
    bins,
    container::{Container, ContainerSpec, Security},
    sys::{self, EnterExt as _},
};

#[derive(Clone, Debug)]
pub struct PodSpec {
    pub name: String,
    pub namespace: String,
    pub node: usize,
    pub labels: BTreeMap<String, String>,
    /// (port name, container port)
    pub ports: Vec<(String, u16)>,
    /// `serviceAccountName`; None: the `app` label (or "default").
    pub service_account: Option<String>,
    /// Ports the kubelet probes (a readiness, then liveness, then startup `tcpSocket` probe).
    pub probe_ports: Vec<u16>,
}

impl PodSpec {
    pub fn service_account_name(&self) -> &str {
        self.service_account.as_deref().or(self.labels.get("app").map(String::as_str)).unwrap_or("default")
    }
}

#[derive(Clone, Debug)]
pub struct ServiceSpec {
    pub name: String,
    pub namespace: String,
    pub vip: Ipv4Addr,
    /// (port name, service port, target port)
    pub ports: Vec<(String, u16, u16)>,
    pub selector: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default)]
pub struct ClusterSpec {
    pub nodes: usize,
    /// (namespace, enrolled in the mesh)
    pub namespaces: Vec<(String, bool)>,
    pub pods: Vec<PodSpec>,
    pub services: Vec<ServiceSpec>,
    /// Start a node proxy on every node (false for "without the mesh" baselines).
    pub start_proxies: bool,
    /// Run the mesh CA and give the node proxies workload certificates (mutual TLS between
    /// nodes). On by default; off gives plaintext tunnels (`--insecure-plaintext-tunnels`).
    pub mtls: bool,
    /// Requested workload certificate lifetime, in seconds (None: the daemon's default).
    pub cert_ttl_secs: Option<u64>,
    /// `--ca-root-poll-ms` of the proxies (how soon a changed trust bundle is reloaded).
    pub ca_root_poll_ms: Option<u64>,
}

impl ClusterSpec {
    pub fn new(nodes: usize) -> Self {
        Self { nodes, start_proxies: true, mtls: true, ..Default::default() }
    }

    pub fn namespace(mut self, name: &str, enrolled: bool) -> Self {
        self.namespaces.push((name.into(), enrolled));
        self
    }

    /// A pod labelled `app=<app>` listening on `port` (named "tcp").
    pub fn pod(mut self, name: &str, namespace: &str, node: usize, app: &str, port: u16) -> Self {
        self.pods.push(PodSpec {
            name: name.into(),
            namespace: namespace.into(),
            node,
            labels: [("app".to_string(), app.to_string())].into(),
            ports: vec![("tcp".into(), port)],
            service_account: None,
            probe_ports: Vec::new(),
        });
        self
    }

    /// Adds a container port to the pod `pod` (added before).
    pub fn extra_port(mut self, pod: &str, name: &str, port: u16) -> Self {
        self.pod_spec(pod).ports.push((name.into(), port));
        self
    }

    /// Declares a kubelet probe (`tcpSocket`) on `port` of the pod `pod` (added before).
    pub fn probe(mut self, pod: &str, port: u16) -> Self {
        let spec = self.pod_spec(pod);
        assert!(spec.probe_ports.len() < 3, "a container has three probes at most");
        spec.probe_ports.push(port);
        self
    }

    fn pod_spec(&mut self, pod: &str) -> &mut PodSpec {
        self.pods.iter_mut().find(|p| p.name == pod).unwrap_or_else(|| panic!("no pod {pod} in the spec"))
    }

    /// Gives the pod `pod` (added before) the ServiceAccount `name` instead of its `app` label.
    pub fn service_account(mut self, pod: &str, name: &str) -> Self {
        let spec = self.pods.iter_mut().find(|p| p.name == pod).unwrap_or_else(|| panic!("no pod {pod} in the spec"));
        spec.service_account = Some(name.into());
        self
    }

    /// A pod with extra labels (e.g. `version: v2`) besides `app=<app>`, one named port.
    pub fn pod_labelled(mut self, name: &str, namespace: &str, node: usize, app: &str, labels: &[(&str, &str)], port_name: &str, port: u16) -> Self {
        let mut all: BTreeMap<String, String> = [("app".to_string(), app.to_string())].into();
        all.extend(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        self.pods.push(PodSpec {
            name: name.into(),
            namespace: namespace.into(),
            node,
            labels: all,
            ports: vec![(port_name.into(), port)],
            service_account: None,
            probe_ports: Vec::new(),
        });
        self
    }

    /// A Service selecting `app=<app>` with one named port (`http`, `grpc`, `tcp`, ...).
    pub fn service_named(mut self, name: &str, namespace: &str, vip: [u8; 4], app: &str, port_name: &str, port: u16, target: u16) -> Self {
        self.services.push(ServiceSpec {
            name: name.into(),
            namespace: namespace.into(),
            vip: vip.into(),
            ports: vec![(port_name.into(), port, target)],
            selector: [("app".to_string(), app.to_string())].into(),
        });
        self
    }

    /// A Service selecting `app=<app>`, port `port` -> `target`.
    pub fn service(mut self, name: &str, namespace: &str, vip: [u8; 4], app: &str, port: u16, target: u16) -> Self {
        self.services.push(ServiceSpec {
            name: name.into(),
            namespace: namespace.into(),
            vip: vip.into(),
            ports: vec![("tcp".into(), port, target)],
            selector: [("app".to_string(), app.to_string())].into(),
        });
        self
    }
}

pub struct SimPod {
    pub spec: PodSpec,
    pub ip: Ipv4Addr,
    /// A second address on the pod's link (fd00:244:<node>::<k+10>), reachable from its node:
    /// the config names only the IPv4 one, as a single-stack cluster would, yet the pod answers
    /// IPv6 too, as a pod on a dual-stack node can.
    pub ip6: Ipv6Addr,
    pub netns: String,
    pub cgroup: PathBuf,
    pub uid: String,
    /// What kubelet last reported: the `Ready` condition (its readiness probe).
    pub ready: bool,
    /// Deleted by the API (`deletionTimestamp` set): shutting down within its grace period.
    pub terminating: bool,
    /// Gone from the API (its grace period is over); its namespace stays until teardown.
    pub deleted: bool,
}

pub struct SimNode {
    pub name: String,
    pub ip: Ipv4Addr,
    pub netns: String,
    pub cgroup: PathBuf,
    /// Where the node's kubelet runs (`<node>-kubelet` beside the node's pod cgroup, as k3s runs
    /// in system.slice/k3s.service beside kubepods): its probes come from here.
    pub kubelet_cgroup: PathBuf,
    proxy: Mutex<Option<Container>>,
    /// The extra `mesh-node run` arguments the proxy was started with (a restart reuses them).
    proxy_args: Mutex<Vec<String>>,
}

/// What [`SimCluster::restart_proxy`] saw.
#[derive(Debug)]
pub struct Restart {
    /// From starting the successor to its readiness.
    pub successor_ready: Duration,
    /// From SIGTERM to the old proxy's exit: its drain.
    pub old_drain: Duration,
    pub old_exit: std::process::ExitStatus,
}

/// The node proxies' drain timeout in the simulated cluster: short, so a test that stops a
/// proxy with connections left open does not wait long, but far above what a drain needs.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(8);

pub struct SimCluster {
    pub id: String,
    pub nodes: Vec<SimNode>,
    pub pods: Vec<SimPod>,
    pub config_dir: PathBuf,
    pub root_cgroup: PathBuf,
    spec: ClusterSpec,
    namespaces: Vec<String>,
    children: Mutex<Vec<Child>>,
    /// Old proxies a test stops itself (`start_successor`): killed with the cluster at the latest.
    retired: Mutex<Vec<Container>>,
    log_dir: PathBuf,
    ca: Mutex<Option<Container>>,
    /// What the manifests let the node proxy and the CA containers do (as far as this machine
    /// can grant it).
    proxy_security: Security,
    ca_security: Security,
    /// The CA's state (root key and certificate) and the node tokens.
    pub ca_dir: PathBuf,
    /// This cluster's own bpffs (mounted once the directory exists and is mounted).
    bpffs: PathBuf,
    bpffs_mounted: bool,
}

/// Where the mesh CA listens: an address on the switch bridge, reachable from every node.
pub const CA_ADDRESS: &str = "172.30.0.254:15012";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Whether the `mesh-node` under test knows `--kubelet-cgroup` (a baseline build a benchmark
/// compares against may predate it).
fn supports_kubelet_cgroup() -> bool {
    static KNOWN: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *KNOWN.get_or_init(|| {
        Command::new(bins::path("mesh-node"))
            .args(["run", "--help"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains("--kubelet-cgroup"))
            .unwrap_or(true)
    })
}

pub fn node_name(i: usize) -> String {
    format!("node-{}", (b'a' + i as u8) as char)
}

impl SimCluster {
    pub fn start(spec: ClusterSpec) -> anyhow::Result<Self> {
        preflight()?;
        let id = format!("me{}x{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let root_cgroup = sys::cgroup2_mount()?.join(format!("mesh-e2e-{id}"));
        let base = std::env::temp_dir().join(format!("mesh-e2e-{id}"));
        let config_dir = base.join("config");
        let log_dir = base.join("logs");
        let mut cluster = SimCluster {
            id: id.clone(),
            nodes: Vec::new(),
            pods: Vec::new(),
            config_dir: config_dir.clone(),
            root_cgroup: root_cgroup.clone(),
            spec: spec.clone(),
            namespaces: Vec::new(),
            children: Mutex::new(Vec::new()),
            retired: Mutex::new(Vec::new()),
            log_dir: log_dir.clone(),
            ca: Mutex::new(None),
            proxy_security: Security::node_proxy()?.grantable()?.0,
            ca_security: Security::ca()?.grantable()?.0,
            ca_dir: base.join("ca"),
            bpffs: base.join("bpffs"),
            bpffs_mounted: false,
        };
        // From here on, Drop cleans up whatever was built, also if building fails half way.
        fs::create_dir_all(&config_dir)?;
        fs::create_dir_all(&log_dir)?;
        fs::create_dir(&root_cgroup).with_context(|| format!("creating cgroup {}", root_cgroup.display()))?;
        fs::create_dir_all(&cluster.bpffs)?;
        sys::mount_bpffs(&cluster.bpffs)?;
        cluster.bpffs_mounted = true;
        cluster.build_network()?;
        cluster.write_config()?;
        if spec.mtls {
            cluster.start_ca()?;
        }
        if spec.start_proxies {
            for i in 0..cluster.nodes.len() {
                cluster.start_proxy(i)?;
            }
        }
        Ok(cluster)
    }

    fn add_netns(&mut self, name: &str) -> anyhow::Result<()> {
        sys::ip(&["netns", "add", name])?;
        self.namespaces.push(name.to_string());
        sys::ip_in(name, &["link", "set", "lo", "up"])
    }

    fn build_network(&mut self) -> anyhow::Result<()> {
        let net = format!("{}-net", self.id);
        self.add_netns(&net)?;
        sys::ip_in(&net, &["link", "add", "br0", "type", "bridge"])?;
        sys::ip_in(&net, &["addr", "add", "172.30.0.254/24", "dev", "br0"])?;
        sys::ip_in(&net, &["link", "set", "br0", "up"])?;
        for i in 0..self.spec.nodes {
            let ns = format!("{}-n{i}", self.id);
            self.add_netns(&ns)?;
            let ip = Ipv4Addr::new(172, 30, 0, i as u8 + 1);
            // veth between the switch and the node.
            sys::ip_in(&net, &["link", "add", &format!("n{i}"), "type", "veth", "peer", "name", "up0", "netns", &ns])?;
            sys::ip_in(&net, &["link", "set", &format!("n{i}"), "master", "br0", "up"])?;
            sys::ip_in(&ns, &["addr", "add", &format!("{ip}/24"), "dev", "up0"])?;
            sys::ip_in(&ns, &["link", "set", "up0", "up"])?;
            sys::ip_in(&ns, &["link", "add", "cbr0", "type", "bridge"])?;
            sys::ip_in(&ns, &["addr", "add", &format!("10.244.{i}.1/24"), "dev", "cbr0"])?;
            sys::ip_in(&ns, &["-6", "addr", "add", &format!("fd00:244:{i}::1/64"), "dev", "cbr0", "nodad"])?;
            sys::ip_in(&ns, &["link", "set", "cbr0", "up"])?;
            sys::sysctl_in(&ns, "net.ipv4.ip_forward", "1")?;
            let cgroup = self.root_cgroup.join(node_name(i));
            fs::create_dir(&cgroup)?;
            let kubelet_cgroup = self.root_cgroup.join(format!("{}-kubelet", node_name(i)));
            fs::create_dir(&kubelet_cgroup)?;
            self.nodes.push(SimNode { name: node_name(i), ip, netns: ns, cgroup, kubelet_cgroup, proxy: Mutex::new(None), proxy_args: Mutex::new(Vec::new()) });
        }
        for i in 0..self.spec.nodes {
            for j in (0..self.spec.nodes).filter(|j| *j != i) {
                let via = self.nodes[j].ip.to_string();
                sys::ip_in(&self.nodes[i].netns, &["route", "add", &format!("10.244.{j}.0/24"), "via", &via])?;
            }
        }
        // The switch routes each node's pod subnet to it, so pods reach addresses on the switch
        // (a selector-less Service's endpoint, like the API server) and get answers back.
        for (i, node) in self.nodes.iter().enumerate() {
            sys::ip_in(&net, &["route", "add", &format!("10.244.{i}.0/24"), "via", &node.ip.to_string()])?;
        }
        for spec in self.spec.pods.clone() {
            self.create_pod(spec)?;
        }
        Ok(())
    }

    /// Gives a pod its network namespace (10.244.<node>.<k+10>, behind its node's bridge) and
    /// its cgroup under its node's, as the CNI and kubelet would; it starts Ready.
    fn create_pod(&mut self, spec: PodSpec) -> anyhow::Result<()> {
        let k = self.pods.len();
        if k + 10 > 250 {
            bail!("the simulated cluster has room for 240 pods");
        }
        let node = &self.nodes[spec.node];
        let (node_ns, node_cgroup) = (node.netns.clone(), node.cgroup.clone());
        let ns = format!("{}-p{k}", self.id);
        self.add_netns(&ns)?;
        let ip = Ipv4Addr::new(10, 244, spec.node as u8, k as u8 + 10);
        let host_if = format!("vp{k}");
        sys::ip_in(&node_ns, &["link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
        sys::ip_in(&node_ns, &["link", "set", &host_if, "master", "cbr0", "up"])?;
        sys::ip_in(&ns, &["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        let ip6 = Ipv6Addr::new(0xfd00, 0x244, spec.node as u16, 0, 0, 0, 0, k as u16 + 10);
        sys::ip_in(&ns, &["-6", "addr", "add", &format!("{ip6}/64"), "dev", "eth0", "nodad"])?;
        sys::ip_in(&ns, &["link", "set", "eth0", "up"])?;
        sys::ip_in(&ns, &["route", "add", "default", "via", &format!("10.244.{}.1", spec.node)])?;
        let uid = format!("{:08x}-0000-4000-8000-{:012x}", std::process::id(), k);
        let cgroup = node_cgroup.join(format!("pod{uid}"));
        fs::create_dir(&cgroup)?;
        self.pods.push(SimPod { spec, ip, ip6, netns: ns, cgroup, uid, ready: true, terminating: false, deleted: false });
        Ok(())
    }

    /// The cluster as Kubernetes YAML: what the node daemons read.
    pub fn cluster_yaml(&self) -> String {
        let mut y = String::new();
        for (ns, enrolled) in &self.spec.namespaces {
            let labels = if *enrolled { "\n  labels:\n    istio.io/dataplane-mode: ambient" } else { "" };
            let _ = write!(y, "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}{labels}\n---\n");
        }
        for node in &self.nodes {
            let _ = write!(
                y,
                "apiVersion: v1\nkind: Node\nmetadata:\n  name: {}\nstatus:\n  addresses:\n  - type: InternalIP\n    address: {}\n---\n",
                node.name, node.ip
            );
        }
        for pod in self.pods.iter().filter(|p| !p.deleted) {
            let s = &pod.spec;
            let mut labels = String::new();
            for (k, v) in &s.labels {
                let _ = write!(labels, "\n    {k}: {v:?}");
            }
            let mut ports = String::new();
            for (name, port) in &s.ports {
                let _ = write!(ports, "\n    - name: {name}\n      containerPort: {port}");
            }
            for (kind, port) in ["readinessProbe", "livenessProbe", "startupProbe"].iter().zip(&s.probe_ports) {
                let _ = write!(ports, "\n    {kind}:\n      tcpSocket:\n        port: {port}\n      periodSeconds: 10");
            }
            // As the API server shows a running pod: phase, conditions, and deletionTimestamp
            // once it is being deleted.
            let deletion = if pod.terminating { "\n  deletionTimestamp: \"2026-01-01T00:00:00Z\"\n  deletionGracePeriodSeconds: 30" } else { "" };
            let ready = if pod.ready { "True" } else { "False" };
            let _ = write!(
                y,
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: {}\n  uid: {}{deletion}\n  labels:{labels}\nspec:\n  nodeName: {}\n  serviceAccountName: {}\n  containers:\n  - name: app\n    image: mesh-probe\n    ports:{ports}\nstatus:\n  phase: Running\n  podIP: {}\n  podIPs:\n  - ip: {}\n  conditions:\n  - type: PodScheduled\n    status: \"True\"\n  - type: ContainersReady\n    status: \"{ready}\"\n  - type: Ready\n    status: \"{ready}\"\n---\n",
                s.name, s.namespace, pod.uid, self.nodes[s.node].name, s.service_account_name(), pod.ip, pod.ip
            );
        }
        for svc in &self.spec.services {
            let mut sel = String::new();
            for (k, v) in &svc.selector {
                let _ = write!(sel, "\n    {k}: {v:?}");
            }
            let mut ports = String::new();
            for (name, port, target) in &svc.ports {
                let _ = write!(ports, "\n  - name: {name}\n    port: {port}\n    targetPort: {target}");
            }
            let _ = write!(
                y,
                "apiVersion: v1\nkind: Service\nmetadata:\n  name: {}\n  namespace: {}\nspec:\n  clusterIP: {}\n  selector:{sel}\n  ports:{ports}\n---\n",
                svc.name, svc.namespace, svc.vip
            );
            y.push_str(&self.endpoint_slice_yaml(svc));
        }
        y
    }

    /// The Service's EndpointSlice as the EndpointSlice controller writes it: every pod the
    /// selector matches that has not gone, `ready` only when the pod is Ready and not
    /// terminating, `serving` when Ready, `terminating` once deleted; node and pod named.
    fn endpoint_slice_yaml(&self, svc: &ServiceSpec) -> String {
        let mut y = format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {0}-sim\n  namespace: {1}\n  labels:\n    kubernetes.io/service-name: {0}\n    endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io\naddressType: IPv4\nports:",
            svc.name, svc.namespace
        );
        for (name, _, target) in &svc.ports {
            let _ = write!(y, "\n- name: {name}\n  port: {target}\n  protocol: TCP");
        }
        let members: Vec<&SimPod> = self
            .pods
            .iter()
            .filter(|p| !p.deleted && p.spec.namespace == svc.namespace && svc.selector.iter().all(|(k, v)| p.spec.labels.get(k) == Some(v)))
            .collect();
        if members.is_empty() {
            y.push_str("\nendpoints: []");
        } else {
            y.push_str("\nendpoints:");
        }
        for p in members {
            let _ = write!(
                y,
                "\n- addresses: [\"{}\"]\n  conditions:\n    ready: {}\n    serving: {}\n    terminating: {}\n  nodeName: {}\n  targetRef:\n    kind: Pod\n    namespace: {}\n    name: {}\n    uid: {}",
                p.ip,
                p.ready && !p.terminating,
                p.ready,
                p.terminating,
                self.nodes[p.spec.node].name,
                p.spec.namespace,
                p.spec.name,
                p.uid
            );
        }
        y.push_str("\n---\n");
        y
    }

    /// Kubelet reports a pod's readiness probe result (Ready <-> NotReady); the config the
    /// node proxies watch is rewritten and loaded by every running proxy before this returns.
    pub fn set_pod_ready(&mut self, pod: &str, ready: bool) -> anyhow::Result<()> {
        self.pod_mut(pod)?.ready = ready;
        self.apply_config("cluster.yaml", &self.cluster_yaml())
    }

    /// The API deletes a pod: `deletionTimestamp` set, its endpoint terminating (its processes
    /// keep running: they finish in-flight work during the grace period). Returns once every
    /// running proxy has loaded the change.
    pub fn terminate_pod(&mut self, pod: &str) -> anyhow::Result<()> {
        self.pod_mut(pod)?.terminating = true;
        self.apply_config("cluster.yaml", &self.cluster_yaml())
    }

    /// The grace period is over: the pod's processes are killed and the pod leaves the API.
    pub fn remove_pod(&mut self, pod: &str) -> anyhow::Result<()> {
        let p = self.pod_mut(pod)?;
        p.deleted = true;
        let cgroup = p.cgroup.clone();
        let _ = fs::write(cgroup.join("cgroup.kill"), "1");
        self.apply_config("cluster.yaml", &self.cluster_yaml())
    }

    /// Schedules a new pod (not Ready until [`Self::set_pod_ready`], as a pod whose readiness
    /// probe has not passed yet) and publishes it; the caller starts its server.
    pub fn add_pod(&mut self, spec: PodSpec) -> anyhow::Result<()> {
        if self.pods.iter().any(|p| p.spec.name == spec.name && p.spec.namespace == spec.namespace) {
            bail!("pod {}/{} exists already", spec.namespace, spec.name);
        }
        self.create_pod(spec)?;
        if let Some(p) = self.pods.last_mut() {
            p.ready = false;
        }
        self.apply_config("cluster.yaml", &self.cluster_yaml())
    }

    fn pod_mut(&mut self, name: &str) -> anyhow::Result<&mut SimPod> {
        self.pods.iter_mut().find(|p| p.spec.name == name).with_context(|| format!("no pod {name}"))
    }

    /// Replaces a pod's labels and rewrites the cluster file the daemons watch (e.g. to move a
    /// pod into a Service's selector, as a new pod would join).
    pub fn set_pod_labels(&mut self, pod: &str, labels: &[(&str, &str)]) -> anyhow::Result<()> {
        let p = self.pods.iter_mut().find(|p| p.spec.name == pod).with_context(|| format!("no pod {pod}"))?;
        p.spec.labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        self.write_config_file("cluster.yaml", &self.cluster_yaml())
    }

    /// Starts a process in a pod that serves on `port`, and waits until it accepts.
    pub fn serve_in_pod(&self, pod: &str, program: &Path, args: &[&str], port: u16) -> anyhow::Result<()> {
        self.serve_in_pod_pid(pod, program, args, port).map(|_| ())
    }

    /// Like [`Self::serve_in_pod`], returning the server's process id (e.g. to signal it).
    pub fn serve_in_pod_pid(&self, pod: &str, program: &Path, args: &[&str], port: u16) -> anyhow::Result<u32> {
        let pid = self.spawn_in_pod_pid(pod, program, args, None)?;
        let addr = format!("127.0.0.1:{port}");
        let out = self.run_in_pod(pod, &bins::path("mesh-probe"), &["wait", &addr, "--timeout-ms", "15000"], Duration::from_secs(20))?;
        if !out.status.success() {
            bail!("server in {pod} did not start listening on {port}");
        }
        Ok(pid)
    }

    fn write_config(&self) -> anyhow::Result<()> {
        fs::write(self.config_dir.join("cluster.yaml"), self.cluster_yaml())?;
        Ok(())
    }

    /// Writes (or replaces) one file of the config directory the node daemons watch.
    pub fn write_config_file(&self, name: &str, contents: &str) -> anyhow::Result<()> {
        // Write then rename, so a daemon never reads half a file.
        let tmp = self.config_dir.join(format!(".{name}.tmp"));
        fs::write(&tmp, contents)?;
        fs::rename(&tmp, self.config_dir.join(name))?;
        Ok(())
    }

    /// Writes a config file and waits until every running node proxy has loaded it.
    pub fn apply_config(&self, name: &str, contents: &str) -> anyhow::Result<()> {
        let running: Vec<usize> = (0..self.nodes.len()).filter(|i| self.nodes[*i].proxy.lock().unwrap().is_some()).collect();
        let before: Vec<u64> = running.iter().map(|i| self.counter(*i, "proxy", "config_reloads")).collect();
        self.write_config_file(name, contents)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        for (i, before) in running.iter().zip(before) {
            while self.counter(*i, "proxy", "config_reloads") <= before {
                if Instant::now() > deadline {
                    bail!("node {} did not load {name} within 10s:\n{}", self.nodes[*i].name, self.proxy_log(*i));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    pub fn node(&self, i: usize) -> &SimNode {
        &self.nodes[i]
    }

    pub fn pod(&self, name: &str) -> &SimPod {
        self.pods.iter().find(|p| p.spec.name == name).unwrap_or_else(|| panic!("no pod {name}"))
    }

    pub fn proxy_log(&self, node: usize) -> String {
        fs::read_to_string(self.log_dir.join(format!("{}.log", self.nodes[node].name))).unwrap_or_default()
    }

    /// The proxy log without terminal colours, so fields match as written (`pid=42`).
    pub fn proxy_log_plain(&self, node: usize) -> String {
        strip_ansi(&self.proxy_log(node))
    }

    fn net_netns(&self) -> String {
        format!("{}-net", self.id)
    }

    /// Starts `mesh-node ca` on the switch (like istiod on a control-plane node) with a token
    /// per node, and waits until it has written its root certificate and listens.
    pub fn start_ca(&self) -> anyhow::Result<()> {
        fs::create_dir_all(self.ca_dir.join("tokens"))?;
        let mut tokens = String::new();
        for node in &self.nodes {
            let token = format!("{:016x}{:016x}", rand_u64(), rand_u64());
            fs::write(self.ca_dir.join("tokens").join(&node.name), &token)?;
            tokens.push_str(&format!("{}: {token}\n", node.name));
        }
        fs::write(self.ca_dir.join("tokens.yaml"), tokens)?;
        self.restart_ca()
    }

    /// (Re)starts the CA process on the same state directory, in its container (deploy/ca.yaml:
    /// its own user, no capabilities) on the switch, in a cgroup of the cluster's.
    pub fn restart_ca(&self) -> anyhow::Result<()> {
        self.restart_ca_with(&[])
    }

    /// Like [`Self::restart_ca`], with extra `mesh-node ca` arguments (a provided root, extra
    /// roots of a rotation, budgets). Files they name must be readable by the CA's user.
    pub fn restart_ca_with(&self, extra_args: &[&str]) -> anyhow::Result<()> {
        // A CA still running is stopped first (SIGTERM), as a Deployment rollout does.
        if let Some(mut ca) = self.ca.lock().unwrap().take() {
            ca.signal(libc::SIGTERM)?;
            ca.wait_timeout(Duration::from_secs(10)).context("mesh-node ca did not exit after SIGTERM")?;
        }
        let state = self.ca_dir.join("state");
        let cgroup = self.root_cgroup.join("mesh-ca");
        for dir in [&state, &cgroup] {
            if !dir.exists() {
                fs::create_dir(dir).with_context(|| format!("creating {}", dir.display()))?;
            }
        }
        // The state volume belongs to the CA's user, as `fsGroup` makes a pod's volume its own.
        let s = &self.ca_security;
        std::os::unix::fs::chown(&state, Some(s.run_as_user), Some(s.run_as_group)).with_context(|| format!("chown {}", state.display()))?;
        let spec = ContainerSpec { security: s.clone(), cgroup, bpffs: None };
        let (state_dir, config, tokens) = (state.clone().into_os_string(), self.config_dir.clone().into_os_string(), self.ca_dir.join("tokens.yaml").into_os_string());
        let args: Vec<&std::ffi::OsStr> = ["ca", "--listen", CA_ADDRESS, "--config-poll-ms", "200", "--state-dir"]
            .into_iter()
            .map(std::ffi::OsStr::new)
            .chain([state_dir.as_os_str(), "--config".as_ref(), config.as_os_str(), "--tokens".as_ref(), tokens.as_os_str()])
            .chain(extra_args.iter().map(std::ffi::OsStr::new))
            .collect();
        let mut cmd = spec.command(&bins::path("mesh-node"), &args);
        cmd.env("MESH_LOG", std::env::var("MESH_LOG").unwrap_or_else(|_| "info".into())).enter(Some(&self.net_netns()), None)?;
        let mut ca = Container::spawn(cmd, &self.log_dir.join("ca.log"), "mesh CA listening").context("starting mesh-node ca")?;
        let deadline = Instant::now() + Duration::from_secs(20);
        let root = state.join("root-cert.pem");
        // This very process's "listening" line (the log is appended across restarts).
        while !(root.exists() && ca.marked_line().is_some()) {
            if let Some(status) = ca.try_wait()? {
                bail!("mesh-node ca exited with {status}:\n{}", self.ca_log());
            }
            if Instant::now() > deadline {
                bail!("mesh-node ca not ready after 20s:\n{}", self.ca_log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        *self.ca.lock().unwrap() = Some(ca);
        self.publish_ca_root(&root)
    }

    /// Copies the CA's root certificate where the node proxies read it (deploy/README.md,
    /// "Install": published as the mesh-ca-root ConfigMap, readable by all).
    fn publish_ca_root(&self, root: &Path) -> anyhow::Result<()> {
        let published = self.ca_root_cert();
        fs::create_dir_all(published.parent().context("root certificate path")?)?;
        // Swapped in whole, as kubelet updates a mounted ConfigMap: proxies watching the file
        // never read half of it.
        let tmp = published.with_extension("tmp");
        fs::copy(root, &tmp).with_context(|| format!("publishing {} as {}", root.display(), published.display()))?;
        fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
        fs::rename(&tmp, &published)?;
        Ok(())
    }

    /// Makes `path` the CA user's (its files: a provided root and key, extra roots), as a
    /// mounted Secret is readable by the pod's `fsGroup`.
    pub fn give_to_ca(&self, path: &Path) -> anyhow::Result<()> {
        let s = &self.ca_security;
        std::os::unix::fs::chown(path, Some(s.run_as_user), Some(s.run_as_group)).with_context(|| format!("chown {}", path.display()))
    }

    /// The CA's process (host pid; 1 in its container), if it runs.
    pub fn ca_pid(&self) -> Option<u32> {
        self.ca.lock().unwrap().as_ref().map(Container::pid)
    }

    /// Stops the CA (SIGTERM) so tests can check that traffic survives without it.
    pub fn stop_ca(&self) -> anyhow::Result<()> {
        let Some(mut ca) = self.ca.lock().unwrap().take() else { bail!("the CA is not running") };
        ca.signal(libc::SIGTERM)?;
        ca.wait_timeout(Duration::from_secs(10)).context("mesh-node ca did not exit after SIGTERM")?;
        Ok(())
    }

    pub fn ca_log(&self) -> String {
        fs::read_to_string(self.log_dir.join("ca.log")).unwrap_or_default()
    }

    /// Starts node i's proxy, in the node's network namespace and in a cgroup under the node's
    /// pod cgroup (as a DaemonSet pod would be), then waits for it to be ready.
    pub fn start_proxy(&self, i: usize) -> anyhow::Result<()> {
        self.start_proxy_with(i, &[])
    }

    /// Like [`Self::start_proxy`], with extra `mesh-node run` arguments (telemetry flags...).
    pub fn start_proxy_with(&self, i: usize, extra_args: &[&str]) -> anyhow::Result<()> {
        *self.nodes[i].proxy_args.lock().unwrap() = extra_args.iter().map(|a| a.to_string()).collect();
        let mut proxy = self.spawn_proxy(i, &[])?;
        self.wait_ready(i, &mut proxy)?;
        *self.nodes[i].proxy.lock().unwrap() = Some(proxy);
        Ok(())
    }

    /// The extra `mesh-node run` arguments node i's next proxies start with (restarts and
    /// successors), replacing those given to [`Self::start_proxy_with`].
    pub fn set_proxy_args(&self, i: usize, args: &[&str]) {
        *self.nodes[i].proxy_args.lock().unwrap() = args.iter().map(|a| a.to_string()).collect();
    }

    /// node i's bpffs, as the host sees it: what its proxies' containers have at /sys/fs/bpf.
    pub fn node_bpffs(&self, i: usize) -> PathBuf {
        self.bpffs.join(&self.nodes[i].name)
    }

    /// node i's pin directory as the host sees it: the proxies' default `--bpf-pin-dir`
    /// (/sys/fs/bpf/mesh) in their containers.
    pub fn pin_dir(&self, i: usize) -> PathBuf {
        self.node_bpffs(i).join("mesh")
    }

    /// A path of the host's cgroup2 tree as a container sees it (the tree at /sys/fs/cgroup).
    fn cgroup_in_container(host: &Path) -> anyhow::Result<PathBuf> {
        let mount = sys::cgroup2_mount()?;
        let rel = host.strip_prefix(&mount).with_context(|| format!("{} is not under the cgroup2 mount {}", host.display(), mount.display()))?;
        Ok(Path::new("/sys/fs/cgroup").join(rel))
    }

    /// Starts a proxy for node i in a container as deploy/daemonset.yaml describes it (see
    /// `container`), in the node's network namespace (hostNetwork).
    fn spawn_proxy(&self, i: usize, extra_args: &[&str]) -> anyhow::Result<Container> {
        let node = &self.nodes[i];
        let cgroup = node.cgroup.join("mesh-node");
        for dir in [&cgroup, &self.node_bpffs(i)] {
            if !dir.exists() {
                fs::create_dir(dir).with_context(|| format!("creating {}", dir.display()))?;
            }
        }
        // Paths as the container sees them. --bpf-pin-dir is left at its default, as in the
        // DaemonSet; the attach cgroup is the node's (the DaemonSet's whole /sys/fs/cgroup would
        // be the host's root cgroup here).
        let mut args: Vec<String> = vec!["run".into(), "--node".into(), node.name.clone(), "--config-poll-ms".into(), "200".into()];
        let path = |p: &Path| p.to_string_lossy().into_owned();
        args.extend(["--config".into(), path(&self.config_dir)]);
        args.extend(["--cgroup".into(), path(&Self::cgroup_in_container(&node.cgroup)?)]);
        if supports_kubelet_cgroup() {
            args.extend(["--kubelet-cgroup".into(), path(&Self::cgroup_in_container(&node.kubelet_cgroup)?)]);
        }
        args.extend(["--drain-timeout-ms".into(), DRAIN_TIMEOUT.as_millis().to_string()]);
        if self.spec.mtls {
            args.extend(["--ca-address".into(), CA_ADDRESS.into()]);
            args.extend(["--ca-root".into(), path(&self.ca_root_cert())]);
            args.extend(["--node-token-file".into(), path(&self.ca_dir.join("tokens").join(&node.name))]);
            if let Some(ttl) = self.spec.cert_ttl_secs {
                args.extend(["--cert-ttl-secs".into(), ttl.to_string()]);
            }
            if let Some(ms) = self.spec.ca_root_poll_ms {
                args.extend(["--ca-root-poll-ms".into(), ms.to_string()]);
            }
        } else {
            // Without a CA the daemon refuses to start unless told plaintext is meant.
            args.push("--insecure-plaintext-tunnels".into());
        }
        args.extend(node.proxy_args.lock().unwrap().iter().cloned());
        args.extend(extra_args.iter().map(|a| a.to_string()));
        let spec = ContainerSpec { security: self.proxy_security.clone(), cgroup, bpffs: Some(self.node_bpffs(i)) };
        let args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
        let mut cmd = spec.command(&bins::path("mesh-node"), &args);
        cmd.env("MESH_LOG", std::env::var("MESH_LOG").unwrap_or_else(|_| "info".into())).enter(Some(&node.netns), None)?;
        Container::spawn(cmd, &self.log_dir.join(format!("{}.log", node.name)), "node proxy ready").context("starting mesh-node")
    }

    /// Waits for this very process's "node proxy ready" line: while a predecessor still runs,
    /// the admin and readiness ports (shared through SO_REUSEPORT) may answer for either, and
    /// the pid in the line is 1 for every proxy. Kills the proxy if it does not get ready.
    fn wait_ready(&self, i: usize, proxy: &mut Container) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = proxy.try_wait()? {
                bail!("mesh-node on {} exited with {status}:\n{}", self.nodes[i].name, self.proxy_log(i));
            }
            if proxy.marked_line().is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        proxy.kill();
        bail!("mesh-node on {} not ready after 20s:\n{}", self.nodes[i].name, self.proxy_log(i))
    }

    /// Restarts node i's proxy as a rolling update would: starts the successor beside the
    /// running one (same ports, same pinned capture), waits until it is ready, then stops the
    /// old one with SIGTERM and waits for it to drain and exit.
    pub fn restart_proxy(&self, i: usize) -> anyhow::Result<Restart> {
        let started = Instant::now();
        let mut successor = self.spawn_proxy(i, &[])?;
        self.wait_ready(i, &mut successor).with_context(|| format!("successor proxy on {}", self.nodes[i].name))?;
        let successor_ready = started.elapsed();
        let old = self.nodes[i].proxy.lock().unwrap().replace(successor);
        let Some(mut old) = old else { bail!("no proxy was running on node {i}") };
        let stopping = Instant::now();
        old.signal(libc::SIGTERM)?;
        let old_exit = match old.wait_timeout(DRAIN_TIMEOUT + Duration::from_secs(5)) {
            Ok(status) => status,
            Err(e) => {
                old.kill();
                return Err(e.context(format!("old proxy on {} did not exit after SIGTERM:\n{}", self.nodes[i].name, self.proxy_log(i))));
            }
        };
        Ok(Restart { successor_ready, old_drain: stopping.elapsed(), old_exit })
    }

    /// Starts a successor beside node i's running proxy and waits until it is ready, without
    /// stopping the old one: returns the old proxy's pid for the caller to signal (the process
    /// is killed with the cluster at the latest).
    pub fn start_successor(&self, i: usize) -> anyhow::Result<u32> {
        self.start_successor_with(i, &[])
    }

    /// Like [`Self::start_successor`], with extra `mesh-node run` arguments for the successor.
    pub fn start_successor_with(&self, i: usize, extra_args: &[&str]) -> anyhow::Result<u32> {
        let mut successor = self.spawn_proxy(i, extra_args)?;
        self.wait_ready(i, &mut successor)?;
        let Some(old) = self.nodes[i].proxy.lock().unwrap().replace(successor) else { bail!("no proxy was running on node {i}") };
        let pid = old.pid();
        self.retired.lock().unwrap().push(old);
        Ok(pid)
    }

    /// Starts a successor beside node i's running proxy and returns it at once, not ready:
    /// the caller waits for it or stops it (it is killed when dropped). Node i's proxy stays
    /// the one the cluster knows.
    pub fn spawn_successor(&self, i: usize, extra_args: &[&str]) -> anyhow::Result<Container> {
        self.spawn_proxy(i, extra_args)
    }

    /// The pid (as the host sees it; 1 in its container) of node i's current proxy (the
    /// successor, after a restart), if one runs.
    pub fn proxy_pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].proxy.lock().unwrap().as_ref().map(Container::pid)
    }

    /// The instance id of node i's current proxy (from its "node proxy ready" line): what tells
    /// proxies apart in readiness answers (`x-mesh-instance`) and `/status`, where all are pid 1.
    pub fn proxy_instance(&self, i: usize) -> Option<String> {
        let proxy = self.nodes[i].proxy.lock().unwrap();
        let line = proxy.as_ref()?.marked_line()?;
        let value = line.split_once("instance=")?.1;
        Some(value.split(|c: char| c.is_whitespace()).next()?.trim_matches('"').to_string())
    }

    /// Runs `mesh-node uninstall` for node i's pin directory; fails unless it succeeds.
    pub fn uninstall(&self, i: usize) -> anyhow::Result<String> {
        let mut cmd = Command::new(bins::path("mesh-node"));
        cmd.arg("uninstall").arg("--bpf-pin-dir").arg(self.pin_dir(i)).stdin(Stdio::null());
        let out = run_with_timeout(cmd, Duration::from_secs(10))?;
        if !out.status.success() {
            bail!("mesh-node uninstall: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The processes of the running node proxies, node by node: each `mesh-node` and anything
    /// else in its containers' cgroup (not the `unshare` outside, which stands for the
    /// runtime's shim). What a benchmark samples CPU time and RSS from.
    pub fn proxy_pids(&self) -> Vec<u32> {
        let mut pids = Vec::new();
        for node in &self.nodes {
            if let Some(proxy) = node.proxy.lock().unwrap().as_ref() {
                pids.push(proxy.pid());
            }
            let procs = fs::read_to_string(node.cgroup.join("mesh-node").join("cgroup.procs")).unwrap_or_default();
            for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
                if !pids.contains(&pid) {
                    pids.push(pid);
                }
            }
        }
        pids
    }

    /// Stops node i's proxy with SIGTERM and returns its exit status.
    pub fn stop_proxy(&self, i: usize) -> anyhow::Result<std::process::ExitStatus> {
        let Some(mut proxy) = self.nodes[i].proxy.lock().unwrap().take() else { bail!("no proxy running on node {i}") };
        proxy.signal(libc::SIGTERM)?;
        proxy.wait_timeout(DRAIN_TIMEOUT + Duration::from_secs(5)).context("mesh-node did not exit after SIGTERM")
    }

    /// Runs `meshctl` in node i's network namespace (the admin port is node-local loopback).
    pub fn meshctl(&self, i: usize, args: &[&str]) -> anyhow::Result<Output> {
        let mut cmd = Command::new(bins::path("meshctl"));
        cmd.args(args).enter(Some(&self.nodes[i].netns), None)?;
        run_with_timeout(cmd, Duration::from_secs(5))
    }

    /// Capture and proxy counters of node i.
    pub fn stats(&self, i: usize) -> anyhow::Result<serde_json::Value> {
        let out = self.meshctl(i, &["-o", "json", "stats"])?;
        if !out.status.success() {
            bail!("meshctl stats: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Node i's Prometheus text (`/metrics` on 15020), read from inside the node.
    pub fn metrics(&self, i: usize) -> anyhow::Result<String> {
        let out = self.run_in_netns(&self.nodes[i].netns, Path::new("curl"), &["-s", "-m", "5", "http://127.0.0.1:15020/metrics"], Duration::from_secs(10))?;
        if !out.status.success() {
            bail!("curl /metrics on {}: {}", self.nodes[i].name, String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn counter(&self, node: usize, group: &str, name: &str) -> u64 {
        self.stats(node).ok().and_then(|s| s[group][name].as_u64()).unwrap_or(0)
    }

    fn pod_command(&self, pod: &str, program: &Path, args: &[&str]) -> anyhow::Result<Command> {
        let pod = self.pod(pod);
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::null()).enter(Some(&pod.netns), Some(&pod.cgroup))?;
        Ok(cmd)
    }

    /// Starts a long-running process in a pod (killed when the cluster is dropped).
    pub fn spawn_in_pod(&self, pod: &str, program: &Path, args: &[&str]) -> anyhow::Result<()> {
        let child = self.pod_command(pod, program, args)?.stdout(Stdio::null()).stderr(Stdio::inherit()).spawn()?;
        self.children.lock().unwrap().push(child);
        Ok(())
    }

    /// Like `spawn_in_pod`, returning the process id (e.g. to sample its CPU time); stdout and
    /// stderr go to `log` when given, else stdout is discarded and stderr inherited.
    pub fn spawn_in_pod_pid(&self, pod: &str, program: &Path, args: &[&str], log: Option<&Path>) -> anyhow::Result<u32> {
        let mut cmd = self.pod_command(pod, program, args)?;
        match log {
            Some(path) => {
                let f = fs::OpenOptions::new().create(true).append(true).open(path)?;
                cmd.stdout(f.try_clone()?).stderr(f);
            }
            None => {
                cmd.stdout(Stdio::null()).stderr(Stdio::inherit());
            }
        }
        let child = cmd.spawn().with_context(|| format!("starting {} in {pod}", program.display()))?;
        let pid = child.id();
        self.children.lock().unwrap().push(child);
        Ok(pid)
    }

    /// Starts a process in a pod whose stdout the caller reads (killed when the cluster is dropped
    /// if the caller has not waited for it).
    pub fn spawn_piped(&self, pod: &str, program: &Path, args: &[&str]) -> anyhow::Result<Child> {
        Ok(self.pod_command(pod, program, args)?.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn()?)
    }

    /// Runs a process in a pod to completion (killed after `timeout`).
    pub fn run_in_pod(&self, pod: &str, program: &Path, args: &[&str], timeout: Duration) -> anyhow::Result<Output> {
        run_with_timeout(self.pod_command(pod, program, args)?, timeout)
    }

    /// Starts `mesh-probe serve` in every pod, named after the pod, on each of its ports.
    pub fn start_servers(&self) -> anyhow::Result<()> {
        let probe = bins::path("mesh-probe");
        for pod in &self.pods {
            for (_, port) in &pod.spec.ports {
                let port = port.to_string();
                self.spawn_in_pod(&pod.spec.name, &probe, &["serve", "--name", &pod.spec.name, "--port", &port])?;
            }
        }
        // Wait until each server accepts (connecting from inside its own pod: not captured,
        // the pod's own address is not a remote destination... and loopback is not in the mesh).
        for pod in &self.pods {
            for (_, port) in &pod.spec.ports {
                let addr = format!("127.0.0.1:{port}");
                let out = self.run_in_pod(&pod.spec.name, &probe, &["wait", &addr, "--timeout-ms", "5000"], Duration::from_secs(10))?;
                if !out.status.success() {
                    bail!("server in {} did not start: {}", pod.spec.name, String::from_utf8_lossy(&out.stderr));
                }
            }
        }
        Ok(())
    }

    /// Runs `mesh-probe` with `args` in a pod and returns its stdout; fails on a non-zero exit.
    pub fn probe(&self, pod: &str, args: &[&str], timeout: Duration) -> anyhow::Result<String> {
        let out = self.run_in_pod(pod, &bins::path("mesh-probe"), args, timeout)?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!("mesh-probe {} in {pod}: {}\n{}{}", args.join(" "), out.status, stdout, String::from_utf8_lossy(&out.stderr));
        }
        Ok(stdout)
    }
}

/// Running things outside the pods: on the switch (where the CA runs and a sniffer sees every
/// frame between nodes) or in a node's namespace (as the node proxy would).
impl SimCluster {
    /// The switch namespace (`<id>-net`): the bridge joining the nodes, whose ports towards the
    /// nodes are the veths `n0`, `n1`, ...
    pub fn switch_netns(&self) -> String {
        self.net_netns()
    }

    fn netns_command(netns: &str, program: &Path, args: &[&str]) -> anyhow::Result<Command> {
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::null()).enter(Some(netns), None)?;
        Ok(cmd)
    }

    /// Runs a process in a network namespace of this cluster (a node's, or the switch's) to
    /// completion (killed after `timeout`).
    pub fn run_in_netns(&self, netns: &str, program: &Path, args: &[&str], timeout: Duration) -> anyhow::Result<Output> {
        if !self.namespaces.iter().any(|n| n == netns) {
            bail!("{netns} is not a namespace of this cluster");
        }
        run_with_timeout(Self::netns_command(netns, program, args)?, timeout)
    }

    /// Runs a process as node i's kubelet would probe a pod: in the node's network namespace and
    /// in the kubelet's cgroup (killed after `timeout`).
    pub fn run_as_kubelet(&self, i: usize, program: &Path, args: &[&str], timeout: Duration) -> anyhow::Result<Output> {
        let node = &self.nodes[i];
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::null()).enter(Some(&node.netns), Some(&node.kubelet_cgroup))?;
        run_with_timeout(cmd, timeout)
    }

    /// Starts a process in a network namespace of this cluster with its stdin and stdout piped
    /// to the caller (who must wait for it; it should bound its own run time).
    pub fn spawn_in_netns_piped(&self, netns: &str, program: &Path, args: &[&str]) -> anyhow::Result<Child> {
        if !self.namespaces.iter().any(|n| n == netns) {
            bail!("{netns} is not a namespace of this cluster");
        }
        Ok(Self::netns_command(netns, program, args)?.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn()?)
    }

    /// Starts a long-running process in a network namespace of this cluster (a node's, where
    /// node-level tools such as Prometheus run), output to `log`; killed when the cluster is
    /// dropped. Returns its process id.
    pub fn spawn_in_netns(&self, netns: &str, program: &Path, args: &[&str], log: &Path) -> anyhow::Result<u32> {
        if !self.namespaces.iter().any(|n| n == netns) {
            bail!("{netns} is not a namespace of this cluster");
        }
        let f = fs::OpenOptions::new().create(true).append(true).open(log)?;
        let child = Self::netns_command(netns, program, args)?
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .with_context(|| format!("starting {} in {netns}", program.display()))?;
        let pid = child.id();
        self.children.lock().unwrap().push(child);
        Ok(pid)
    }

    /// The directory the cluster's logs go to (removed with the cluster unless
    /// `MESH_E2E_KEEP_LOGS` is set): where a test puts the logs of tools it starts.
    pub fn log_dir(&self) -> &Path {
        &self.log_dir
    }

    /// The mesh root certificate (trust anchor of every node), as published for the node
    /// proxies: a copy of the one in the CA's state, as the mesh-ca-root ConfigMap is (the
    /// state belongs to the CA's user, and the proxies have no CAP_DAC_OVERRIDE).
    pub fn ca_root_cert(&self) -> PathBuf {
        self.ca_dir.join("ca-root/root-cert.pem")
    }

    /// Node i's token for the CA.
    pub fn node_token_file(&self, i: usize) -> PathBuf {
        self.ca_dir.join("tokens").join(&self.nodes[i].name)
    }
}

impl Drop for SimCluster {
    fn drop(&mut self) {
        for node in &self.nodes {
            if let Some(mut proxy) = node.proxy.lock().unwrap_or_else(|e| e.into_inner()).take() {
                proxy.terminate(Duration::from_secs(5));
            }
        }
        // Dropping a container kills what still runs in it.
        drop(self.ca.lock().unwrap_or_else(|e| e.into_inner()).take());
        self.retired.lock().unwrap_or_else(|e| e.into_inner()).clear();
        for mut child in self.children.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Pins of proxies killed above (or that crashed): unpinning detaches their links.
        if self.bpffs_mounted {
            sys::unmount_bpffs(&self.bpffs);
        }
        sys::remove_cgroup_tree(&self.root_cgroup);
        for ns in self.namespaces.iter().rev() {
            let _ = sys::ip(&["netns", "del", ns]);
        }
        if std::env::var_os("MESH_E2E_KEEP_LOGS").is_none() {
            let _ = fs::remove_dir_all(self.config_dir.parent().unwrap_or(&self.config_dir));
        }
    }
}

/// Removes ANSI escape sequences (`ESC [ ... letter`).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn rand_u64() -> u64 {
    let mut buf = [0u8; 8];
    if let Ok(mut f) = fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut buf);
    }
    u64::from_ne_bytes(buf)
}

pub fn wait_timeout(child: &mut Child, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            bail!("process {} still running after {timeout:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> anyhow::Result<Output> {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    // Drain pipes on threads so a chatty child cannot block on a full pipe.
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let out_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stdout, &mut b);
        b
    });
    let err_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stderr, &mut b);
        b
    });
    let status = match wait_timeout(&mut child, timeout) {
        Ok(s) => s,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e.context(format!("{cmd:?} timed out")));
        }
    };
    Ok(Output { status, stdout: out_t.join().unwrap_or_default(), stderr: err_t.join().unwrap_or_default() })
}

/// What the simulated cluster needs from the machine; fails with what is missing.
pub fn preflight() -> anyhow::Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        bail!("the simulated cluster needs root (network namespaces, cgroups, eBPF)");
    }
    if Command::new("ip").arg("-V").output().is_err() {
        bail!("`ip` (iproute2) is not installed: run `cargo xtask setup`");
    }
    // The proxies' and the CA's containers (`container`).
    for tool in ["unshare", "setpriv", "mount"] {
        if Command::new(tool).arg("--version").output().is_err() {
            bail!("`{tool}` (util-linux) is not installed: the node proxies run in containers made with it");
        }
    }
    sys::cgroup2_mount()?;
    Ok(())
}
