//! `meshctl`: the node-level debug CLI. Talks to the node daemon's admin API (loopback on the
//! node by default) and, for `top`, its metrics port. Installed as `kubectl-mesh` it works as
//! a kubectl plugin (`kubectl mesh ...`).
//!
//! Files: `client` (HTTP, unreachable hints), `views` (tables), `table`, `check`, `top`,
//! `prom` (Prometheus text), `local` (commands that need no daemon).
mod check;
mod client;
mod local;
mod prom;
mod table;
mod top;
mod views;

use std::{process::ExitCode, time::Duration};

use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand, ValueEnum};
use serde_json::Value;

use client::Admin;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
    Yaml,
}

#[derive(Parser)]
#[command(version, about = "Debug the mesh on one node: what the eBPF capture holds, how the node proxy routes and balances, and whether the node is healthy")]
struct Cli {
    /// The node proxy's admin API, HOST:PORT (or HOST for port 15000).
    #[arg(long, visible_alias = "admin", global = true, env = "MESH_ADMIN", default_value = "127.0.0.1:15000")]
    node: String,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The node at a glance: readiness, config generation, counters, certificates, listeners.
    Status,
    /// Pods of the cluster: IP, node, identity, enrolled in the mesh, app and version.
    Workloads {
        /// Only pods on this node.
        #[arg(long)]
        local: bool,
    },
    /// Services: VIPs, ports with the protocol the proxy treats them as, endpoint counts.
    Services,
    /// Endpoints of a Service with their health as the balancer sees it: ejected or healthy,
    /// ejection time left, active requests, consecutive errors.
    Endpoints {
        /// NAMESPACE/NAME, the FQDN, or a NAME only one namespace has.
        service: String,
    },
    /// VirtualService routes in the order they are tried, and the DestinationRule policy.
    Routes {
        /// Only this Service (NAMESPACE/NAME); all Services without it.
        service: Option<String>,
    },
    /// Why a request from a pod to a host goes where it goes: the VirtualService route and
    /// DestinationRule that apply (and from which namespace), subsets and endpoints with their
    /// state, retries/timeout/outlier settings with their origin (rule or Istio default), the
    /// PeerAuthentication mode and the AuthorizationPolicies consulted.
    Describe {
        /// The calling pod: NAMESPACE/POD or its IP.
        from: String,
        /// The destination as the pod names it: a Service name (short names from the pod's
        /// namespace), FQDN or VIP, with :PORT when the Service has several ports.
        host: String,
    },
    /// Workload certificates held on this node (identity, serial, expiry) and the CA's state.
    Certs,
    /// Connections the proxy carries right now.
    Connections,
    /// eBPF state: programs and their cgroup attachment, enrolled pods and cgroup ids, the mesh
    /// destination map, capture counters.
    Bpf,
    /// Live requests/s, success rate and p99 latency per service, from the node's metrics.
    Top {
        /// Print one sample and exit (same as --iterations 1).
        #[arg(long)]
        once: bool,
        /// Seconds between samples.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
        /// Stop after this many samples.
        #[arg(long)]
        iterations: Option<u64>,
        /// The node's Prometheus endpoint [default: the admin host, port 15020].
        #[arg(long)]
        metrics: Option<String>,
        /// Count requests as reported by their `source` or `destination` side [default:
        /// source when present].
        #[arg(long)]
        reporter: Option<String>,
    },
    /// Show the daemon's log level, or change it at runtime (error, warn, info, debug, trace,
    /// or EnvFilter directives such as mesh_node=debug,info).
    LogLevel { level: Option<String> },
    /// The config the daemon runs with, or validate a config directory locally.
    Config {
        #[command(subcommand)]
        command: Option<ConfigCommand>,
    },
    /// Verify the node: daemon, kernel and BPF, cgroup v2, enrolled pods, listeners, CA,
    /// certificates, config. Exits non-zero when a check fails.
    Check,
    /// Print a shell completion script.
    Completion { shell: clap_complete::Shell },
    /// Raw capture and proxy counters.
    Stats,
    /// Upstream clusters and their balancer state.
    Clusters,
    /// Whether the daemon is ready (exit status 0 when it is).
    Ready,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Services, endpoints and enrolled pods as the daemon has them (YAML unless -o json).
    Dump,
    /// Check a config directory without a daemon; prints every problem, exits 1 if any.
    Validate { dir: std::path::PathBuf },
}

/// `kubectl-mesh` is run by kubectl as `kubectl mesh`: usage lines should say so.
fn invoked_as() -> String {
    let argv0 = std::env::args_os().next().map(std::path::PathBuf::from);
    let name = argv0.as_ref().and_then(|p| p.file_name()).and_then(|n| n.to_str()).unwrap_or("meshctl").to_owned();
    match name.strip_prefix("kubectl-") {
        Some(plugin) => format!("kubectl {}", plugin.replace('-', " ")),
        None => name,
    }
}

fn examples(bin: &str) -> String {
    format!(
        "Examples:
  {bin} status                          # the node at a glance
  {bin} check                           # verify the node; non-zero exit on failure
  {bin} endpoints demo/web              # which endpoints are ejected, and for how long
  {bin} routes demo/web                 # VirtualService routes in order, DestinationRule policy
  {bin} describe lemo-dev/bff-0 lemo-service-recall:8081   # why bff's requests to recall go where they go
  {bin} bpf                             # programs attached, enrolled pods, VIP map
  {bin} top --interval 2                # requests/s, success rate, p99 per service
  {bin} log-level debug                 # change the daemon's log level now
  {bin} config validate ./config        # check YAML before applying it (no daemon needed)
  {bin} -o json workloads | jq .        # every command prints JSON or YAML with -o
  {bin} --node 10.0.0.5:15000 status    # another node's admin API (e.g. after port-forward)
  source <({bin} completion bash)       # shell completions (bash, zsh, fish)

The admin API listens on 127.0.0.1:15000 on each node. From a workstation:
  kubectl -n mesh-system port-forward pod/mesh-node-xxxxx 15000:15000 15020:15020
As a kubectl plugin: install this binary as `kubectl-mesh` on PATH, then run `kubectl mesh status`."
    )
}

fn print(format: Format, value: &Value, table: impl FnOnce(&Value) -> String) -> anyhow::Result<()> {
    match format {
        Format::Table => print!("{}", table(value)),
        Format::Json => println!("{}", serde_json::to_string_pretty(value)?),
        Format::Yaml => print!("{}", serde_yaml::to_string(value)?),
    }
    Ok(())
}

/// Splits `host:port`, defaulting the port to the admin API's.
fn admin_addr(node: &str) -> String {
    if node.parse::<std::net::SocketAddr>().is_ok() || node.rsplit_once(':').is_some_and(|(h, p)| !h.contains(':') && p.parse::<u16>().is_ok()) {
        node.to_owned()
    } else if node.contains(':') && !node.starts_with('[') {
        format!("[{node}]:15000")
    } else {
        format!("{node}:15000")
    }
}

fn metrics_addr(admin: &str) -> String {
    match admin.rsplit_once(':') {
        Some((host, _)) => format!("{host}:15020"),
        None => format!("{admin}:15020"),
    }
}

async fn run(cli: Cli, bin: &str) -> anyhow::Result<ExitCode> {
    let admin = Admin { addr: admin_addr(&cli.node) };
    let out = cli.output;
    match cli.command {
        Command::Status => print(out, &admin.get("/status").await?, views::status)?,
        Command::Workloads { local } => print(out, &admin.get("/workloads").await?, |v| views::workloads(v, local))?,
        Command::Services => print(out, &admin.get("/services").await?, views::services)?,
        Command::Endpoints { service } => print(out, &admin.get(&format!("/endpoints?service={}", encode(&service))).await?, views::endpoints)?,
        Command::Routes { service } => {
            let path = service.map(|s| format!("/routes?service={}", encode(&s))).unwrap_or_else(|| "/routes".into());
            print(out, &admin.get(&path).await?, views::routes)?
        }
        Command::Describe { from, host } => {
            let path = format!("/describe?from={}&host={}", encode(&from), encode(&host));
            print(out, &admin.get(&path).await?, views::describe)?
        }
        Command::Certs => print(out, &admin.get("/certs").await?, views::certs)?,
        Command::Connections => print(out, &admin.get("/connections").await?, views::connections)?,
        Command::Bpf => print(out, &admin.get("/bpf").await?, views::bpf)?,
        Command::Top { once, interval, iterations, metrics, reporter } => {
            if !(interval > 0.0 && interval.is_finite()) {
                anyhow::bail!("--interval must be a positive number of seconds, got {interval}");
            }
            let opts = top::Options {
                metrics: metrics.unwrap_or_else(|| metrics_addr(&admin.addr)),
                interval: Duration::from_secs_f64(interval),
                iterations: if once { Some(1) } else { iterations },
                reporter,
            };
            top::run(&admin, &opts, out).await?
        }
        Command::LogLevel { level } => {
            let v = match level {
                Some(level) => admin.post(&format!("/log_level?level={}", encode(&level)), "").await?,
                None => admin.get("/log_level").await?,
            };
            print(out, &v, |v| format!("{}\n", v["level"].as_str().unwrap_or("?")))?
        }
        Command::Config { command: None | Some(ConfigCommand::Dump) } => {
            // A dump is a document, not rows: YAML is its table form.
            let fmt = if out == Format::Table { Format::Yaml } else { out };
            print(fmt, &admin.get("/config_dump").await?, |_| String::new())?
        }
        Command::Config { command: Some(ConfigCommand::Validate { dir }) } => return local::validate(&dir, out),
        Command::Check => {
            let checks = check::run(&admin).await;
            print(out, &serde_json::to_value(&checks)?, |_| check::render(&checks))?;
            if checks.iter().any(|c| c.outcome == check::Outcome::Fail) {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Completion { shell } => {
            let mut cmd = Cli::command();
            clap_complete::generate(shell, &mut cmd, bin.replace(' ', "-"), &mut std::io::stdout());
        }
        Command::Stats => print(out, &admin.get("/stats").await?, views::stats)?,
        Command::Clusters => print(out, &admin.get("/clusters").await?, views::clusters)?,
        Command::Ready => {
            let (status, body) = admin.get_text("/ready").await?;
            let ready = status == 200;
            print(out, &serde_json::json!({"ready": ready}), |_| body.clone())?;
            if !ready {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Percent-encodes a query value (Service names have `/`, log directives `=` and `,`).
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn main() -> ExitCode {
    let bin = invoked_as();
    // clap wants a 'static name without its `string` feature; one small leak per process.
    let name: &'static str = Box::leak(bin.clone().into_boxed_str());
    let cmd = Cli::command().name(name).bin_name(name).after_help(examples(&bin));
    let cli = match Cli::from_arg_matches(&cmd.get_matches()) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{bin}: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli, &bin)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{bin}: {e:#}");
            ExitCode::FAILURE
        }
    }
}
