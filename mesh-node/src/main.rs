//! `mesh-node`: the node daemon (`run`) and config checker (`validate`).
use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use mesh_node::{config::Cluster, daemon};

#[derive(Parser)]
#[command(name = "mesh-node", version, about = "mesh node daemon: eBPF capture and node proxy")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Attach the capture to this node's pod cgroup and run the node proxy.
    Run(RunArgs),
    /// Check a config directory; prints every problem and exits non-zero if there are any.
    Validate {
        /// Directory of Kubernetes-style YAML (Namespaces, Nodes, Pods, Services, Istio policies).
        dir: PathBuf,
        /// Validate for nodes run with `--insecure-plaintext-tunnels` (no CA): policy that
        /// needs peer identities is then a problem.
        #[arg(long)]
        insecure_plaintext_tunnels: bool,
        /// Exit non-zero when the directory holds objects of kinds the mesh does not apply
        /// (ServiceEntry, Sidecar, Gateway, ...); they are always listed.
        #[arg(long)]
        strict: bool,
        /// Istio's root namespace (mesh-wide policies, fallback DestinationRules).
        #[arg(long, env = "MESH_ROOT_NAMESPACE", default_value = mesh_node::config::ROOT_NAMESPACE)]
        root_namespace: String,
    },
    /// Run the mesh CA: signs workload certificates for node proxies over gRPC (TLS).
    Ca(mesh_node::ca::CaArgs),
    /// Detach this node's capture and remove its bpffs pins (what a proxy stopping with no
    /// successor does; for uninstalling after a crash, or with the proxy still running).
    Uninstall {
        /// bpffs directory of the node's pinned capture (as given to `run`).
        #[arg(long, env = "MESH_BPF_PIN_DIR", default_value = daemon::DEFAULT_BPF_PIN_DIR)]
        bpf_pin_dir: PathBuf,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Istio's root namespace (mesh-wide policies, fallback DestinationRules).
    #[arg(long, env = "MESH_ROOT_NAMESPACE", default_value = mesh_node::config::ROOT_NAMESPACE)]
    root_namespace: String,
    /// Config directory, watched for changes.
    #[arg(long, env = "MESH_CONFIG_DIR", required_unless_present = "kubernetes", conflicts_with = "kubernetes")]
    config: Option<PathBuf>,
    /// Take the config from the Kubernetes API (list/watch) instead of a directory.
    /// In a pod, in-cluster (KUBERNETES_SERVICE_HOST/PORT and the ServiceAccount token and CA);
    /// elsewhere the kubeconfig (KUBECONFIG or ~/.kube/config); --api-server or --kubeconfig
    /// override.
    #[arg(long)]
    kubernetes: bool,
    #[command(flatten)]
    api: mesh_node::discovery::ApiArgs,
    /// This node's name (a v1 Node in the config).
    #[arg(long, env = "NODE_NAME")]
    node: String,
    /// Parent cgroup of this node's pods (absolute, or relative to the cgroup2 mount).
    #[arg(long, env = "MESH_CGROUP")]
    cgroup: PathBuf,
    /// The kubelet's cgroup (absolute, or relative to the cgroup2 mount): its connections, and
    /// only its, reach the probe ports a Pod spec declares on STRICT or policy-guarded pods.
    /// Default: the first of system.slice/{k3s,k3s-agent,kubelet}.service that exists; `none`
    /// to let no prober through.
    #[arg(long, env = "MESH_KUBELET_CGROUP")]
    kubelet_cgroup: Option<PathBuf>,
    /// Address pods are redirected to [default: the node's InternalIP].
    #[arg(long)]
    proxy_ip: Option<std::net::IpAddr>,
    #[arg(long, default_value_t = mesh_common::OUTBOUND_PORT)]
    outbound_port: u16,
    #[arg(long, default_value_t = mesh_common::INBOUND_PORT)]
    inbound_port: u16,
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15021")]
    readiness: SocketAddr,
    /// Upstream connect timeout, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    connect_timeout_ms: u64,
    /// Memory the node proxy may spend on connections, in MiB (the DaemonSet's limit is
    /// 256Mi): the connection caps of the outbound and inbound listeners derive from it.
    #[arg(long, default_value_t = 192, value_parser = clap::value_parser!(u64).range(16..))]
    memory_budget_mib: u64,
    /// Connections open at once per data listener [default: from --memory-budget-mib].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: Option<u32>,
    /// Of those, from one source address [default: a quarter of --max-connections].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    max_connections_per_source: Option<u32>,
    /// Log level of the eBPF programs: off, error, warn, info, debug, trace.
    #[arg(long, default_value = "warn", value_parser = parse_bpf_level)]
    bpf_log_level: u8,
    /// How often the config directory is checked for changes, in milliseconds.
    #[arg(long, default_value_t = 500)]
    config_poll_ms: u64,
    /// `host:port` of the mesh CA (`mesh-node ca`). Without it the daemon refuses to start,
    /// unless --insecure-plaintext-tunnels is given.
    #[arg(long, env = "MESH_CA_ADDRESS", requires_all = ["ca_root", "node_token_file"])]
    ca_address: Option<String>,
    /// Run without a CA: tunnels between nodes are plaintext, accepted only from other nodes'
    /// InternalIPs, and STRICT PeerAuthentication or principal/namespace rules are invalid
    /// config. For tests and benchmarks, never for a cluster with anything to protect.
    #[arg(long, conflicts_with = "ca_address")]
    insecure_plaintext_tunnels: bool,
    /// The mesh root certificate(s) (PEM), trust anchor for the CA and all peers. Re-read
    /// every --ca-root-poll-ms: a changed bundle applies without a restart (root rotation).
    #[arg(long, env = "MESH_CA_ROOT")]
    ca_root: Option<PathBuf>,
    /// How often the --ca-root file is checked for changes, in milliseconds (0: never).
    #[arg(long, default_value_t = 5000)]
    ca_root_poll_ms: u64,
    /// File holding this node's token for the CA.
    #[arg(long, env = "MESH_NODE_TOKEN_FILE")]
    node_token_file: Option<PathBuf>,
    /// Requested workload certificate lifetime, in seconds (the CA may cap it).
    #[arg(long, default_value_t = 24 * 3600)]
    cert_ttl_secs: u64,
    /// Proxy worker threads (1 keeps every hop of a request on one core, which suits small
    /// nodes; more spreads load over cores).
    #[arg(long, env = "MESH_WORKER_THREADS", default_value_t = 1)]
    worker_threads: usize,
    /// SPIFFE trust domain.
    #[arg(long, default_value = mesh_node::identity::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// Where Prometheus scrapes Istio's standard metrics (`/metrics`), or `off`.
    #[arg(long, env = "MESH_METRICS", default_value = "0.0.0.0:15020", value_parser = parse_metrics)]
    metrics: MetricsAddr,
    /// OTLP/gRPC collector for request spans (e.g. `http://127.0.0.1:4317`); tracing is off
    /// without one.
    #[arg(long, env = "MESH_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Share of new traces to sample, 0 to 1 (a caller's sampled flag is always respected).
    #[arg(long, env = "MESH_TRACE_SAMPLING", default_value_t = 0.01)]
    trace_sampling: f64,
    /// Access log on stdout, one line per request or connection: off, text or json.
    #[arg(long, env = "MESH_ACCESS_LOG", default_value = "off")]
    access_log: mesh_node::telemetry::AccessLogFormat,
    /// bpffs directory where the capture's links and shared maps are pinned: a new proxy
    /// started beside a running one takes them over, so restarts and upgrades lose nothing.
    /// One directory per node.
    #[arg(long, env = "MESH_BPF_PIN_DIR", default_value = daemon::DEFAULT_BPF_PIN_DIR)]
    bpf_pin_dir: PathBuf,
    /// Socket fast path: bytes between a pod and this node proxy move between the two sockets
    /// in the kernel (sockmap / sk_msg redirection) instead of through TCP/IP and the veth.
    /// Off by default and experimental: redirected writes have no backpressure, so only for
    /// trusted pods (see the README). Where the kernel refuses it, connections take the TCP
    /// path (reported on /bpf and in the metrics).
    #[arg(long, env = "MESH_SOCKMAP")]
    sockmap: bool,
    /// On SIGTERM, how long in-flight requests and connections get to finish, in
    /// milliseconds (keep it below the pod's terminationGracePeriodSeconds).
    #[arg(long, env = "MESH_DRAIN_TIMEOUT_MS", default_value_t = daemon::DEFAULT_DRAIN_TIMEOUT.as_millis() as u64)]
    drain_timeout_ms: u64,
    /// TEST ONLY, hidden from --help: stay listening but not ready for this many
    /// milliseconds after the start (e2e tests probe a successor's not-ready window).
    #[arg(long, hide = true, default_value_t = 0)]
    test_ready_delay_ms: u64,
}

/// `--metrics`: an address, or `off`.
#[derive(Clone, Copy, Debug)]
struct MetricsAddr(Option<SocketAddr>);

fn parse_metrics(s: &str) -> Result<MetricsAddr, String> {
    if s == "off" {
        return Ok(MetricsAddr(None));
    }
    s.parse().map(|a| MetricsAddr(Some(a))).map_err(|e| format!("{s:?} is not an address (host:port) or off: {e}"))
}

fn validate_mode(insecure_plaintext_tunnels: bool) -> mesh_node::config::TunnelMode {
    if insecure_plaintext_tunnels { mesh_node::config::TunnelMode::Plaintext } else { mesh_node::config::TunnelMode::MutualTls }
}

fn parse_bpf_level(s: &str) -> Result<u8, String> {
    Ok(match s {
        "off" => 0,
        "error" => 1,
        "warn" => 2,
        "info" => 3,
        "debug" => 4,
        "trace" => 5,
        _ => return Err(format!("{s:?} is not one of off, error, warn, info, debug, trace")),
    })
}

/// Threads for blocking work (see the runtime's construction).
const BLOCKING_THREADS: usize = 8;

fn main() -> ExitCode {
    // Before any thread starts; the node proxy and the CA are long-lived and load large configs.
    let allocator_tuned = mesh_node::memory::tune_allocator();
    let cli = Cli::parse();
    {
        use tracing_subscriber::{layer::SubscriberExt as _, util::SubscriberInitExt as _};
        // Reloadable so `meshctl log-level` can change it while the daemon runs.
        let directives = std::env::var("MESH_LOG").unwrap_or_else(|_| "info".into());
        tracing_subscriber::registry()
            .with(mesh_node::admin::log_level::layer(&directives))
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .with(mesh_node::telemetry::ConfigErrorCounter)
            .init();
    }
    if !allocator_tuned {
        tracing::warn!("the allocator refused its limits (arenas, mmap and trim thresholds): freed memory may stay resident");
    }
    match cli.command {
        Command::Ca(args) => mesh_node::ca::run_cli(args),
        Command::Uninstall { bpf_pin_dir } => match mesh_node::capture::uninstall(&bpf_pin_dir) {
            Ok((links, maps)) => {
                println!("{}: {links} links detached, {maps} maps unpinned", bpf_pin_dir.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("mesh-node uninstall: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Validate { dir, insecure_plaintext_tunnels, strict, root_namespace } => {
            mesh_node::config::set_root_namespace(&root_namespace);
            match Cluster::load_dir_in(&dir, validate_mode(insecure_plaintext_tunnels)) {
            Ok(cluster) => {
                // Valid and applied, but not as written: said, without failing the check.
                for w in cluster.warnings() {
                    eprintln!("warning: {w}");
                }
                // Kinds the mesh does not apply: listed, and an error with --strict.
                let label = if strict { "error" } else { "warning" };
                for u in cluster.unapplied() {
                    eprintln!("{label}: {u}");
                }
                if strict && !cluster.unapplied().is_empty() {
                    eprintln!(
                        "{}: {} object(s) of kinds not applied by mesh (--strict)",
                        dir.display(),
                        cluster.unapplied().len()
                    );
                    return ExitCode::FAILURE;
                }
                println!(
                    "{}: ok ({} nodes, {} pods, {} services{})",
                    dir.display(),
                    cluster.nodes().count(),
                    cluster.pods().count(),
                    cluster.services().count(),
                    match cluster.unapplied().len() {
                        0 => String::new(),
                        n => format!("; {n} object(s) not applied by mesh"),
                    }
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
            }
        }
        Command::Run(args) => {
            mesh_node::config::set_root_namespace(&args.root_namespace);
            let kubernetes = if !args.kubernetes {
                None
            } else {
                match args.api.api_server() {
                    Ok(api) => Some(api),
                    Err(e) => {
                        eprintln!("--kubernetes: {e:#}");
                        return ExitCode::FAILURE;
                    }
                }
            };
            let opts = daemon::Options {
                config_dir: args.config.unwrap_or_default(),
                kubernetes,
                node: args.node,
                cgroup: args.cgroup,
                kubelet_cgroup: args.kubelet_cgroup,
                proxy_ip: args.proxy_ip,
                outbound_port: args.outbound_port,
                inbound_port: args.inbound_port,
                admin: args.admin,
                readiness: args.readiness,
                connect_timeout: Duration::from_millis(args.connect_timeout_ms),
                memory_budget_mib: args.memory_budget_mib,
                max_connections: args.max_connections.map(|n| n as usize),
                max_connections_per_source: args.max_connections_per_source.map(|n| n as usize),
                bpf_log_level: args.bpf_log_level,
                config_poll: Duration::from_millis(args.config_poll_ms),
                ca: match (args.ca_address, args.ca_root, args.node_token_file) {
                    (Some(address), Some(root_cert), Some(token_file)) => {
                        Some(daemon::CaOptions {
                            address,
                            root_cert,
                            token_file,
                            cert_ttl: Duration::from_secs(args.cert_ttl_secs),
                            root_poll: Duration::from_millis(args.ca_root_poll_ms),
                        })
                    }
                    _ => None,
                },
                insecure_plaintext_tunnels: args.insecure_plaintext_tunnels,
                trust_domain: args.trust_domain,
                telemetry: mesh_node::telemetry::TelemetryOptions {
                    metrics: args.metrics.0,
                    otlp_endpoint: args.otlp_endpoint,
                    trace_sampling: args.trace_sampling,
                    access_log: args.access_log,
                },
                bpf_pin_dir: args.bpf_pin_dir,
                sockmap: args.sockmap,
                drain_timeout: Duration::from_millis(args.drain_timeout_ms),
                test_ready_delay: Duration::from_millis(args.test_ready_delay_ms),
            };
            // The blocking pool runs config loads, file reads and the token read of each certificate
            // request. Unbounded (tokio's default is 512), the 500 requests of a node's pods at
            // start-up spawned ~50 threads, and the config poll (200 ms in the simulated
            // clusters; each call wakes the next idle thread in turn) kept them all alive past
            // the 10 s keep-alive.
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(args.worker_threads.max(1))
                .max_blocking_threads(BLOCKING_THREADS)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("mesh-node: starting the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(daemon::run(opts)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("mesh-node: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
