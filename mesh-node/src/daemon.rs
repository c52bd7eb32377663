//! Wires the node daemon together: config, capture, proxy listeners, admin.
use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use anyhow::{Context as _, bail};
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::{
    admin::{self, AdminState},
    capture::{Capture, CaptureOptions, Release},
    config::{self, Cluster},
    destination::Destinations,
    http::pool::Pool,
    hbone::MeshTls,
    identity::{CaClientConfig, CertManager, CertManagerConfig, RotationConfig},
    tunnel::TunnelPool,
    upstream::Connector,
    listener::{
        self, ProxyContext,
        drain::{Drain, Phase},
    },
    stats::ProxyStats,
    telemetry::{self, MeshSources, Telemetry, TelemetryOptions},
};

/// Everything `mesh-node run` is told.
#[derive(Clone, Debug)]
pub struct Options {
    /// Config directory (file mode); empty when `kubernetes` is set.
    pub config_dir: PathBuf,
    /// Take the config from this API server (list/watch) instead of `config_dir`.
    pub kubernetes: Option<crate::discovery::ApiServer>,
    pub node: String,
    pub cgroup: PathBuf,
    /// The kubelet's cgroup (see `mesh-node run --kubelet-cgroup`); `None`: found by name.
    pub kubelet_cgroup: Option<PathBuf>,
    /// Address pods are redirected to; defaults to the node's InternalIP from the config.
    pub proxy_ip: Option<IpAddr>,
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub admin: SocketAddr,
    pub readiness: SocketAddr,
    pub connect_timeout: Duration,
    /// Memory the node proxy may spend on connections and their buffers, in MiB; the data
    /// listeners' connection caps derive from it unless given.
    pub memory_budget_mib: u64,
    /// Connections open at once per data listener (outbound, inbound); `None`: from the budget.
    pub max_connections: Option<usize>,
    /// Of those, per source address; `None`: a quarter of `max_connections`.
    pub max_connections_per_source: Option<usize>,
    pub bpf_log_level: u8,
    pub config_poll: Duration,
    /// Workload certificates from this CA; without one, tunnels are plaintext, which needs
    /// `insecure_plaintext_tunnels`.
    pub ca: Option<CaOptions>,
    /// `--insecure-plaintext-tunnels`: run without a CA, knowingly. Tunnels are then accepted
    /// only from other nodes' addresses, and policy needing peer identities is invalid.
    pub insecure_plaintext_tunnels: bool,
    pub trust_domain: String,
    pub telemetry: TelemetryOptions,
    /// bpffs directory of this node's pinned capture (links and shared maps), which a new
    /// proxy takes over from the running one.
    pub bpf_pin_dir: PathBuf,
    /// `--sockmap`: move bytes between pods' sockets and the node proxy's in the kernel
    /// (sockmap redirection) instead of through TCP/IP; falls back to TCP where the kernel
    /// refuses it.
    pub sockmap: bool,
    /// On SIGTERM, how long in-flight requests and connections get to finish.
    pub drain_timeout: Duration,
    /// TEST ONLY (hidden `--test-ready-delay-ms`): wait this long, listening but not ready,
    /// before becoming ready, so tests can probe a successor's not-ready window. Zero in
    /// production.
    pub test_ready_delay: Duration,
}

/// `--bpf-pin-dir` default: where Cilium and bpftool users expect pins.
pub const DEFAULT_BPF_PIN_DIR: &str = "/sys/fs/bpf/mesh";
/// `--drain-timeout` default: Kubernetes' default terminationGracePeriodSeconds (30 s) minus a
/// margin for the final close and exit.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(25);
/// After the drain timeout, how long closing connections get before the process exits.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Why `mesh-node run` refuses to start before doing anything.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(
        "no CA configured (--ca-address): tunnels between nodes would be plaintext and every \
         STRICT or identity-based policy unenforceable; refusing to start. Configure the mesh CA \
         (--ca-address, --ca-root, --node-token-file), or pass --insecure-plaintext-tunnels to \
         run without mutual TLS knowingly (tunnels then accepted only from other nodes' \
         addresses; STRICT and principal/namespace rules rejected as invalid config)"
    )]
    NoCa,
}

/// How the tunnels are secured, from the options: a CA gives mutual TLS; no CA is refused
/// unless the operator asked for plaintext by name (a forgotten flag must not silently turn
/// the mesh into a plaintext relay).
pub fn tunnel_mode(opts: &Options) -> Result<config::TunnelMode, StartError> {
    match (&opts.ca, opts.insecure_plaintext_tunnels) {
        (Some(_), _) => Ok(config::TunnelMode::MutualTls),
        (None, true) => Ok(config::TunnelMode::Plaintext),
        (None, false) => Err(StartError::NoCa),
    }
}

/// Where the node gets workload certificates.
#[derive(Clone, Debug)]
pub struct CaOptions {
    /// `host:port` of `mesh-node ca`.
    pub address: String,
    /// The mesh root certificate (PEM).
    pub root_cert: PathBuf,
    /// This node's token for the CA.
    pub token_file: PathBuf,
    pub cert_ttl: Duration,
    /// How often `root_cert` is re-read (trust bundle reload, root rotation).
    pub root_poll: Duration,
}

/// Binds with SO_REUSEPORT: a new proxy binds the same ports while this one still serves,
/// the kernel spreads new connections over both, and when this one closes its listeners the
/// successor has them all (and, see [`migrate_on_close`], those still in our accept queues).
/// Bound early, so a proxy that cannot have its ports fails before it takes the capture over;
/// [`listen`] later, once it can serve (only then does it get connections).
fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<tokio::net::TcpSocket> {
    let sock = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    sock.set_reuseaddr(true)?;
    sock.set_reuseport(true)?;
    sock.bind(addr).with_context(|| format!("binding the {what} listener to {addr}"))?;
    Ok(sock)
}

fn listen(sock: tokio::net::TcpSocket, what: &str) -> anyhow::Result<TcpListener> {
    sock.listen(1024).with_context(|| format!("listening on the {what} port"))
}

/// The capture between attach and readiness: if the start fails in between, the links go back
/// to the proxy we were taking over from (or are detached if we created them).
struct Starting(Option<Capture>);

impl Starting {
    fn get(&mut self) -> &mut Capture {
        self.0.as_mut().expect("the capture is only taken once started")
    }

    fn started(mut self) -> Capture {
        self.0.take().expect("the capture is only taken once started")
    }
}

impl Drop for Starting {
    fn drop(&mut self) {
        if let Some(capture) = self.0.take() {
            capture.abandon();
        }
    }
}

/// When a proxy closes a listener, the connections in its accept queue (handshake done or in
/// progress, not yet accepted) must move to the successor's listener of the same SO_REUSEPORT
/// group instead of being reset. The capture's sk_reuseport program asks the kernel to do so;
/// if it cannot be attached, `net.ipv4.tcp_migrate_req` does the same for the whole network
/// namespace.
fn migrate_on_close(capture: &mut Capture, listeners: &[(&str, &TcpListener)]) {
    let mut attached = true;
    for (what, listener) in listeners {
        if let Err(e) = capture.migrate_on_close(*listener) {
            warn!("{what} listener: attaching the migration program: {e}");
            attached = false;
        }
    }
    if attached {
        debug!("listener migration program attached");
    } else {
        enable_migrate_req_sysctl();
    }
}

const MIGRATE_REQ: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

/// Turns on `net.ipv4.tcp_migrate_req` in our network namespace (the node's); it affects only
/// SO_REUSEPORT groups.
fn enable_migrate_req_sysctl() {
    match std::fs::read_to_string(MIGRATE_REQ) {
        Ok(v) if v.trim() == "1" => debug!("tcp_migrate_req already on"),
        Ok(_) => match std::fs::write(MIGRATE_REQ, "1") {
            Ok(()) => info!("net.ipv4.tcp_migrate_req=1: connections queued on a stopping proxy's listeners move to its successor"),
            Err(e) => warn!("cannot set net.ipv4.tcp_migrate_req=1 ({e}): connections queued on this proxy's listeners when it stops will be reset; set it on the node"),
        },
        Err(e) => warn!("cannot read {MIGRATE_REQ} ({e}; kernel older than 5.14?): connections queued on this proxy's listeners when it stops will be reset"),
    }
}

/// Requests certificates for this node's mesh workloads ahead of time (the inbound side must
/// present them during the TLS handshake, which cannot wait for the CA), and drops (stops
/// renewing) those of pods that left.
fn prefetch_certificates(tls: &Arc<MeshTls>, cluster: &Cluster, node: &str) -> Vec<tokio::task::JoinHandle<()>> {
    let ids: std::collections::BTreeSet<_> = cluster.pods().filter(|p| p.node == node && cluster.is_enrolled(p)).map(|p| tls.identity_of(p)).collect();
    tls.certs().retain(&ids);
    let mut tasks = Vec::new();
    for id in ids {
        if tls.certs().cached(&id).is_some() {
            continue;
        }
        let tls = tls.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = tls.certs().fetch(&id).await {
                warn!(identity = %id, "workload certificate: {e}");
            }
        }));
    }
    tasks
}

/// A started proxy: ready, serving, and what it needs to run and shut down.
struct Running {
    capture: Capture,
    config_rx: tokio::sync::watch::Receiver<Arc<Cluster>>,
    tls: Option<Arc<MeshTls>>,
    telemetry: Arc<Telemetry>,
    stats: Arc<ProxyStats>,
    /// Listener tasks (aborting one closes its listener) and the allocator trimmer.
    tasks: Vec<tokio::task::JoinHandle<()>>,
    drain: Arc<Drain>,
    admin_state: Arc<AdminState>,
    /// Connections admitted to this node's pods, re-judged on each config change.
    admitted: crate::l4::admitted::Admitted,
}

pub async fn run(opts: Options) -> anyhow::Result<()> {
    // Before anything that can take time: as PID 1 of a pod, a signal without a handler is
    // discarded (see `signals`).
    let mut signals = crate::signals::Shutdown::install()?;
    let running = tokio::select! {
        running = start(&opts) => running?,
        signal = signals.recv() => {
            // Dropping the start hands a capture taken over back to the proxy it came from
            // (`Starting`), or detaches one we attached, and withdraws our announcement.
            info!("{signal} while starting: giving up the start");
            return Ok(());
        }
    };
    serve(&opts, running, signals).await
}

/// Everything up to readiness: config, capture, certificates, listeners.
async fn start(opts: &Options) -> anyhow::Result<Running> {
    // Before anything else: a node without a CA and without the flag must not serve at all.
    let tunnels = tunnel_mode(opts)?;
    // First thing: from now until we are ready, the proxy we may be replacing answers "not
    // ready" to probes (which may be meant for us: the ports are shared). Dropped on any
    // early return, i.e. when the process exits.
    let announcement = match crate::capture::announce::Announcement::new(&opts.bpf_pin_dir) {
        Ok(a) => Some(a),
        Err(e) => {
            warn!("{e}; during this start the running proxy may answer readiness probes meant for this one");
            None
        }
    };
    let discovery = match &opts.kubernetes {
        Some(api) => {
            info!(api_server = ?api, "taking the config from the Kubernetes API");
            let discovery_opts = crate::discovery::Options { tunnels, ..Default::default() };
            let mut discovery = crate::discovery::spawn(api.clone(), discovery_opts);
            // Not ready (no listeners, no capture) before the first full sync of every kind.
            if !discovery.wait_ready().await {
                bail!("Kubernetes discovery stopped before the first sync");
            }
            Some(discovery)
        }
        None => None,
    };
    let cluster = match &discovery {
        Some(d) => Cluster::clone(&d.config.borrow()),
        None => Cluster::load_dir_in(&opts.config_dir, tunnels)
            .map_err(|e| anyhow::anyhow!("config {}:\n{e}", opts.config_dir.display()))?,
    };
    for w in cluster.warnings() {
        warn!("applied more restrictively than written: {w}");
    }
    let Some(node) = cluster.node(&opts.node) else {
        bail!("node {:?} is not defined in the config (add a v1 Node with an InternalIP)", opts.node);
    };
    let proxy_ip = opts.proxy_ip.unwrap_or(node.ip);
    let cluster = Arc::new(cluster);

    crate::capture::require_root()?;
    let unspecified: IpAddr = if proxy_ip.is_ipv4() { [0, 0, 0, 0].into() } else { std::net::Ipv6Addr::UNSPECIFIED.into() };
    let outbound_addr = SocketAddr::new(unspecified, opts.outbound_port);
    let inbound_addr = SocketAddr::new(unspecified, opts.inbound_port);
    let outbound = bind(outbound_addr, "outbound")?;
    let inbound = bind(inbound_addr, "inbound")?;
    // The admin API can change the daemon (log level) and shows every workload: loopback only.
    if !opts.admin.ip().is_loopback() {
        anyhow::bail!("--admin {}: the admin API listens on loopback only (127.0.0.1 or ::1); reach it from elsewhere through `kubectl port-forward`", opts.admin);
    }
    let admin_listener = bind(opts.admin, "admin")?;
    let readiness = bind(opts.readiness, "readiness")?;
    let metrics = opts.telemetry.metrics.map(|addr| bind(addr, "metrics").map(|s| (addr, s))).transpose()?;

    let mut starting = Starting(Some(Capture::attach(&CaptureOptions {
        cgroup: opts.cgroup.clone(),
        kubelet_cgroup: opts.kubelet_cgroup.clone(),
        proxy_ip,
        proxy_port: opts.outbound_port,
        bpf_log_level: opts.bpf_log_level,
        pin_dir: opts.bpf_pin_dir.clone(),
        sockmap: opts.sockmap,
    })?));
    let capture = starting.get();
    let _ = capture.sync(&cluster, &opts.node);

    let (config_rx, held_back) = match discovery {
        Some(d) => {
            let held_back = d.held_back_view();
            (d.config, Some(held_back))
        }
        None => (config::spawn_watcher_in(opts.config_dir.clone(), cluster, opts.config_poll, tunnels).context("starting the config watcher thread")?, None),
    };
    let stats = Arc::new(ProxyStats::default());
    let drain = Arc::new(Drain::default());
    let tls = match &opts.ca {
        Some(ca) => {
            let certs = CertManager::new(CertManagerConfig {
                ca: CaClientConfig { root_poll: ca.root_poll, ..CaClientConfig::new(&ca.address, &opts.node, &ca.token_file, &ca.root_cert, &opts.trust_domain) },
                trust_domain: opts.trust_domain.clone(),
                ttl: ca.cert_ttl,
                rotation: RotationConfig::default(),
            })
            .map_err(|e| anyhow::anyhow!("workload certificates from CA {}: {e}", ca.address))?;
            info!(ca = %ca.address, "tunnels use mutual TLS with workload certificates");
            Some(Arc::new(MeshTls::new(certs)?))
        }
        None => {
            warn!(
                "--insecure-plaintext-tunnels: no CA, tunnels between nodes are PLAINTEXT; the tunnel port serves only other nodes' InternalIPs, and STRICT or principal/namespace policy is rejected as invalid config"
            );
            None
        }
    };
    let connector = Connector {
        node: opts.node.clone(),
        inbound_port: opts.inbound_port,
        config: config_rx.clone(),
        tunnels: Arc::new(TunnelPool::new(tls.clone())),
        trust_domain: opts.trust_domain.clone(),
        admitted: Default::default(),
    };
    let admitted = connector.admitted.clone();
    // Ready only once this node's workloads have certificates (bounded: a CA outage must not
    // keep plaintext-free traffic of other workloads from starting).
    if let Some(tls) = &tls {
        let tasks = prefetch_certificates(tls, &config_rx.borrow().clone(), &opts.node);
        let all = async {
            for t in tasks {
                let _ = t.await;
            }
        };
        if tokio::time::timeout(Duration::from_secs(15), all).await.is_err() {
            warn!("some workload certificates are still missing; starting anyway");
        }
    }
    let telemetry = Arc::new(Telemetry::new(&opts.telemetry, &opts.node, config_rx.clone(), &opts.trust_domain, tls.is_some())?);
    telemetry.register_mesh(MeshSources {
        node: opts.node.clone(),
        stats: stats.clone(),
        capture: Some(capture.counters()),
        fast_path: Some(capture.fast_path()),
        tls: tls.clone(),
        config: config_rx.clone(),
    })?;
    let ctx = Arc::new(ProxyContext {
        node: opts.node.clone(),
        config: config_rx.clone(),
        orig_dst: capture.orig_dst(),
        stats: stats.clone(),
        connect_timeout: opts.connect_timeout,
        inbound_port: opts.inbound_port,
        destinations: Destinations::default(),
        pool: Pool::new(connector.clone()),
        connector,
        telemetry: telemetry.clone(),
        drain: drain.clone(),
        fast_path: capture.fast_backpressure(),
    });
    if let Some(bp) = capture.fast_backpressure() {
        bp.spawn();
    }
    let outbound = listen(outbound, "outbound")?;
    let inbound = listen(inbound, "inbound")?;
    let admin_listener = listen(admin_listener, "admin")?;
    let readiness = listen(readiness, "readiness")?;
    let capture = starting.get();
    migrate_on_close(capture, &[("outbound", &outbound), ("inbound", &inbound), ("admin", &admin_listener), ("readiness", &readiness)]);
    let admin_state = Arc::new(AdminState {
        node: opts.node.clone(),
        ready: AtomicBool::new(false),
        config: config_rx.clone(),
        config_dir: opts.config_dir.clone(),
        capture_counters: capture.counters(),
        fast_path: capture.fast_path(),
        capture_state: capture.state(),
        bpf: capture.view(),
        proxy_stats: stats.clone(),
        proxy: ctx.clone(),
        ca_address: opts.ca.as_ref().map(|ca| ca.address.clone()),
        listeners: [("outbound", outbound_addr), ("inbound", inbound_addr), ("admin", opts.admin), ("readiness", opts.readiness)]
            .into_iter()
            .chain(opts.telemetry.metrics.map(|m| ("metrics", m)))
            .collect(),
        started: std::time::SystemTime::now(),
        successors: crate::capture::announce::Successors::new(&opts.bpf_pin_dir),
        held_back,
    });
    // Each task owns its listener: aborting it closes the listener.
    let caps = data_caps(opts);
    // A quarter of the budget for request bodies kept for retries, node-wide.
    crate::http::replay::set_budget(opts.memory_budget_mib * 1024 * 1024 / 4);
    crate::l4::tunnel::set_windows_from_budget(opts.memory_budget_mib * 1024 * 1024);
    crate::l4::pipe::set_large_allowance_from_budget(opts.memory_budget_mib * 1024 * 1024);
    crate::l4::tunnel::set_max_streams(caps.per_source);
    info!(total = caps.total, per_source = caps.per_source, budget_mib = opts.memory_budget_mib, "connection caps per data listener");
    let accept = |name, l, caps, refused: fn(&crate::stats::ProxyStats) -> &crate::stats::Counter| listener::accept::Acceptor::new(name, l, caps, stats.clone(), refused);
    let small = listener::accept::Caps::SMALL;
    let mut tasks = vec![
        tokio::spawn(listener::outbound::serve(accept("outbound", outbound, caps, |s| &s.outbound_over_cap), ctx.clone())),
        tokio::spawn(listener::inbound::serve(accept("inbound", inbound, caps, |s| &s.inbound_over_cap), ctx.clone())),
        tokio::spawn(admin::serve_admin(accept("admin", admin_listener, small, |s| &s.endpoints_over_cap), admin_state.clone())),
        tokio::spawn(admin::serve_readiness(accept("readiness", readiness, small, |s| &s.endpoints_over_cap), admin_state.clone())),
    ];
    // What a burst freed goes back to the node instead of staying at the peak.
    tasks.push(crate::memory::spawn_trimmer());
    if let Some((addr, metrics)) = metrics {
        let metrics = accept("metrics", listen(metrics, "metrics")?, small, |s| &s.endpoints_over_cap);
        tasks.push(tokio::spawn(telemetry::server::serve(metrics, telemetry.clone())));
        info!(%addr, "metrics on /metrics");
    }
    if !opts.test_ready_delay.is_zero() {
        warn!(delay = ?opts.test_ready_delay, "test-only readiness delay (--test-ready-delay-ms)");
        tokio::time::sleep(opts.test_ready_delay).await;
    }
    let capture = starting.started();
    admin_state.set_ready();
    // Ready: the proxy we replace may say "ready" again (it is stopped next).
    drop(announcement);
    info!(
        node = %opts.node,
        outbound = opts.outbound_port,
        inbound = opts.inbound_port,
        pid = std::process::id(),
        instance = crate::capture::announce::instance_id(),
        start = ?capture.start(),
        "node proxy ready"
    );
    Ok(Running { capture, config_rx, tls, telemetry, stats, tasks, drain, admin_state, admitted })
}

/// Serves until SIGTERM or SIGINT, then hands over (or uninstalls) and drains.
async fn serve(opts: &Options, running: Running, mut signals: crate::signals::Shutdown) -> anyhow::Result<()> {
    let Running { mut capture, mut config_rx, tls, telemetry, stats, tasks, drain, admin_state, admitted } = running;
    // Pods appear in cgroupfs after the config names them, so rescan on a timer as well.
    let mut rescan = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            changed = config_rx.changed() => {
                if changed.is_err() {
                    warn!("config watcher stopped");
                    break;
                }
                let cluster = config_rx.borrow_and_update().clone();
                // Before the reload is counted, so whoever waits for it sees its effect.
                stats.policy_closed_connections.add(admitted.revoke_denied(&cluster) as u64);
                stats.policy_closed_connections.add(capture.sync(&cluster, &opts.node) as u64);
                if let Some(tls) = &tls {
                    prefetch_certificates(tls, &cluster, &opts.node);
                }
                telemetry.on_config(&cluster);
                stats.config_reloads.inc();
            }
            _ = rescan.tick() => {
                let cluster = config_rx.borrow().clone();
                stats.policy_closed_connections.add(capture.sync(&cluster, &opts.node) as u64);
                telemetry.plaintext_inbound(&capture.plaintext_counts());
            }
            signal = signals.recv() => { info!("{signal}: shutting down"); break; }
        }
    }
    // A second SIGTERM or SIGINT during the drain cuts it short.
    let again = async move {
        signals.recv().await;
    };
    shutdown(capture, tasks, &drain, &admin_state, opts.drain_timeout, again).await;
    telemetry.flush();
    Ok(())
}

/// Hands over to a successor, or uninstalls when there is none, then drains.
async fn shutdown(capture: Capture, tasks: Vec<tokio::task::JoinHandle<()>>, drain: &Drain, admin_state: &AdminState, drain_timeout: Duration, again: impl Future<Output = ()>) {
    let started = std::time::Instant::now();
    // Without a successor, detach first: pods' new connections then go where they were going
    // (as without the mesh) instead of to the listeners we are about to close.
    let capture = match capture.superseded() {
        Ok(true) => {
            info!("a new proxy has taken the capture over; leaving it attached");
            Some(capture)
        }
        Ok(false) => {
            release(capture);
            None
        }
        Err(e) => {
            warn!("checking for a successor: {e}; leaving the capture attached");
            Some(capture)
        }
    };
    admin_state.ready.store(false, std::sync::atomic::Ordering::Release);
    // Closing the listeners: new connections go to the successor (same ports, SO_REUSEPORT),
    // and the kernel migrates those still queued here (tcp_migrate_req).
    for task in &tasks {
        task.abort();
    }
    for task in tasks {
        let _ = task.await;
    }
    let open = drain.open_connections();
    info!(open_connections = open, timeout = ?drain_timeout, "listeners closed; draining");
    drain.set(Phase::Draining);
    let left = tokio::select! {
        left = drain.wait_idle(drain_timeout) => left,
        _ = again => {
            info!("second signal: ending the drain now");
            drain.open_connections()
        }
    };
    if left > 0 {
        info!(open_connections = left, "drain timeout: closing the connections still open");
        drain.set(Phase::Closing);
        let cut = drain.wait_idle(CLOSE_GRACE).await;
        if cut > 0 {
            warn!(connections = cut, "connections cut at exit");
        }
    }
    info!(drain_ms = started.elapsed().as_millis() as u64, "drained");
    if let Some(capture) = capture {
        // Checks once more: leaves the capture to the successor, or detaches it if the links
        // run our programs after all.
        release(capture);
    }
    info!("bye");
}

fn release(capture: Capture) {
    match capture.release() {
        Ok(Release::HandedOver) => info!("capture left attached for the new proxy"),
        Ok(Release::Detached { links, maps }) => info!(links, maps, "no successor: capture detached and unpinned"),
        Err(e) => warn!("detaching the capture: {e} (run `mesh-node uninstall`)"),
    }
}

/// The data listeners' connection caps: as given, or from the memory budget.
fn data_caps(opts: &Options) -> listener::accept::Caps {
    let budget = listener::accept::Caps::from_budget(opts.memory_budget_mib);
    let total = opts.max_connections.unwrap_or(budget.total);
    listener::accept::Caps { total, per_source: opts.max_connections_per_source.unwrap_or((total / 4).max(1)) }
}
