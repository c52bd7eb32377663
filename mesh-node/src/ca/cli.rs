//! `mesh-node ca`: flags, runtime and shutdown on SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use super::limits::RequestLimits;
use super::review::ReviewOptions;
use super::server::{CaOptions, NodeAuthOptions, PodsFrom};
use super::signer::TtlPolicy;
use crate::config::parse_duration;
use crate::discovery::ApiArgs;

#[derive(clap::Args, Debug)]
pub struct CaArgs {
    /// Address of the gRPC (TLS) endpoint.
    #[arg(long, default_value = "0.0.0.0:15012")]
    pub listen: SocketAddr,
    /// Root key and certificate live here (created on first start); nodes get
    /// `<state-dir>/root-cert.pem`.
    #[arg(long)]
    pub state_dir: PathBuf,
    /// Cluster config directory (watched): a node may only get identities of its pods.
    #[arg(long, env = "MESH_CONFIG_DIR", required_unless_present = "kubernetes", conflicts_with = "kubernetes")]
    pub config: Option<PathBuf>,
    /// YAML map of node name to token (static node credentials). Without it, --kubernetes
    /// checks the nodes' projected ServiceAccount tokens with TokenReview.
    #[arg(long, required_unless_present = "kubernetes")]
    pub tokens: Option<PathBuf>,
    /// Learn pods from the Kubernetes API (list/watch) instead of a config directory, and
    /// authenticate nodes with TokenReview unless --tokens is given. In a pod, in-cluster
    /// (KUBERNETES_SERVICE_HOST/PORT and the ServiceAccount token and CA); elsewhere the
    /// kubeconfig (KUBECONFIG or ~/.kube/config); --api-server or --kubeconfig override.
    /// Pods and TokenReviews go through one client with the CA's own credentials.
    #[arg(long)]
    pub kubernetes: bool,
    #[command(flatten)]
    pub api: ApiArgs,
    /// Audience the node proxies' projected tokens must be minted for.
    #[arg(long, default_value = "mesh-ca", requires = "kubernetes", conflicts_with = "tokens")]
    pub token_audience: String,
    /// ServiceAccount of the node proxies, `namespace/name` (repeatable).
    #[arg(long = "node-service-account", default_value = "mesh-system/mesh-node", requires = "kubernetes", conflicts_with = "tokens")]
    pub node_service_accounts: Vec<String>,
    /// How long a positive TokenReview is reused (0s: never). Bounds how long a deleted
    /// node proxy pod's token keeps working.
    #[arg(long, default_value = "60s", value_parser = parse_duration, requires = "kubernetes", conflicts_with = "tokens")]
    pub review_cache_ttl: Duration,
    /// How long a refused TokenReview is reused (0s: never): a node retrying with a bad token
    /// costs the API server one review per interval.
    #[arg(long, default_value = "10s", value_parser = parse_duration, requires = "kubernetes", conflicts_with = "tokens")]
    pub review_negative_cache_ttl: Duration,
    /// Sustained certificate requests per second allowed per node (and per source address);
    /// 0 disables the limit. Over it, requests are refused with RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = RequestLimits::default().per_second)]
    pub node_rate_limit: f64,
    /// Requests a node may make at once above its rate (a node starting asks once per identity).
    #[arg(long, default_value_t = RequestLimits::default().burst)]
    pub node_burst: u32,
    /// Longest time the CA spends on one request, TokenReview included (DEADLINE_EXCEEDED after).
    #[arg(long, default_value = "8s", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// PEM file of roots published in `root-cert.pem` next to the signing root, for a root
    /// rotation: first the new root here while signing with the old, then the old root here
    /// while signing with the new (see deploy/README.md, "Rotating the root").
    #[arg(long)]
    pub extra_roots: Option<PathBuf>,
    #[arg(long, default_value = crate::identity::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Lifetime of a certificate when the request names none.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    pub default_ttl: Duration,
    /// Longest lifetime granted.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    pub max_ttl: Duration,
    /// Use this CA certificate (chain: signing cert first, root last) instead of a generated root.
    #[arg(long, requires = "root_key")]
    pub root_cert: Option<PathBuf>,
    /// Key of --root-cert.
    #[arg(long, requires = "root_cert")]
    pub root_key: Option<PathBuf>,
    /// Extra DNS name or IP for the serving certificate (repeatable).
    #[arg(long = "san")]
    pub sans: Vec<String>,
    /// How often the config directory is checked for changes, in milliseconds.
    #[arg(long, default_value_t = 500)]
    pub config_poll_ms: u64,
}

impl CaArgs {
    pub fn into_options(self) -> Result<CaOptions, String> {
        if self.default_ttl.is_zero() || self.max_ttl.is_zero() {
            return Err("--default-ttl and --max-ttl must be positive".into());
        }
        if !self.node_rate_limit.is_finite() || self.node_rate_limit < 0.0 {
            return Err(format!("--node-rate-limit {}: must be a number of requests per second, 0 or more", self.node_rate_limit));
        }
        if self.request_timeout.is_zero() {
            return Err("--request-timeout must be positive".into());
        }
        if self.default_ttl > self.max_ttl {
            return Err(format!("--default-ttl {:?} is longer than --max-ttl {:?}", self.default_ttl, self.max_ttl));
        }
        let api = if self.kubernetes {
            Some(self.api.api_server().map_err(|e| format!("--kubernetes: {e}"))?)
        } else {
            None
        };
        let pods = match (&api, self.config) {
            (Some(api), _) => PodsFrom::Kubernetes(api.clone()),
            (None, Some(dir)) => PodsFrom::ConfigDir(dir),
            (None, None) => return Err("--config DIR or --kubernetes is required".into()),
        };
        let auth = match (self.tokens, api) {
            (Some(file), _) => NodeAuthOptions::TokensFile(file),
            (None, Some(api)) => NodeAuthOptions::TokenReview {
                api,
                review: ReviewOptions {
                    audience: self.token_audience,
                    node_service_accounts: self.node_service_accounts,
                    cache_ttl: self.review_cache_ttl,
                    negative_cache_ttl: self.review_negative_cache_ttl,
                    ..ReviewOptions::default()
                },
            },
            (None, None) => return Err("--tokens FILE is required without --kubernetes".into()),
        };
        let mut opts = CaOptions::with(self.listen, self.state_dir, pods, auth);
        opts.trust_domain = self.trust_domain;
        opts.ttl = TtlPolicy { default: self.default_ttl, max: self.max_ttl };
        opts.root_cert = self.root_cert;
        opts.root_key = self.root_key;
        opts.extra_sans = self.sans;
        opts.config_poll = Duration::from_millis(self.config_poll_ms);
        opts.limits = RequestLimits { per_second: self.node_rate_limit, burst: self.node_burst, deadline: self.request_timeout };
        opts.extra_roots = self.extra_roots;
        Ok(opts)
    }
}

/// Runs the CA until SIGINT or SIGTERM. Logging must already be set up.
pub fn run_cli(args: CaArgs) -> ExitCode {
    let opts = match args.into_options() {
        Ok(opts) => opts,
        Err(e) => {
            eprintln!("mesh-node ca: {e}");
            return ExitCode::FAILURE;
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mesh-node ca: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(async {
        // Before the bind (which may wait for the API server): as PID 1 of a pod, a signal
        // without a handler is discarded (see `signals`).
        let mut shutdown = crate::signals::Shutdown::install().map_err(|e| super::CaError::Serve(e.to_string()))?;
        let server = tokio::select! {
            server = super::CaServer::bind(opts) => server?,
            signal = shutdown.recv() => {
                tracing::info!("{signal} while starting: mesh CA not started");
                return Ok(());
            }
        };
        // Printed on stdout as well as logged so scripts can wait for it.
        println!("mesh CA listening on {}", server.local_addr());
        // Same image as the node proxy, same reasons: return freed memory and start-up code.
        let _trimmer = crate::memory::spawn_trimmer();
        server
            .run(async move {
                let signal = shutdown.recv().await;
                tracing::info!("{signal}: mesh CA shutting down");
            })
            .await
    }) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-node ca: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        ca: CaArgs,
    }

    fn parse(args: &[&str]) -> Result<CaOptions, String> {
        let cli = Cli::try_parse_from(["ca", "--state-dir", "/tmp/s"].iter().chain(args)).map_err(|e| e.to_string())?;
        cli.ca.into_options()
    }

    #[test]
    fn file_mode_kubernetes_mode_and_their_mixes() {
        let opts = parse(&["--config", "/c", "--tokens", "/t.yaml"]).expect("file mode");
        assert!(matches!(&opts.pods, PodsFrom::ConfigDir(d) if d.as_os_str() == "/c"));
        assert!(matches!(&opts.auth, NodeAuthOptions::TokensFile(f) if f.as_os_str() == "/t.yaml"));

        let opts = parse(&[
            "--kubernetes",
            "--api-server",
            "http://127.0.0.1:8080",
            "--token-audience",
            "mesh",
            "--node-service-account",
            "kube-system/mesh-node",
            "--node-service-account",
            "mesh-system/mesh-node-canary",
            "--review-cache-ttl",
            "5s",
        ])
        .expect("Kubernetes mode");
        assert!(matches!(&opts.pods, PodsFrom::Kubernetes(api) if format!("{api:?}") == "http://127.0.0.1:8080"));
        let NodeAuthOptions::TokenReview { review, .. } = &opts.auth else { panic!("TokenReview expected") };
        assert_eq!(review.audience, "mesh");
        assert_eq!(review.node_service_accounts, ["kube-system/mesh-node", "mesh-system/mesh-node-canary"]);
        assert_eq!(review.cache_ttl, Duration::from_secs(5));

        // Defaults: audience mesh-ca, the DaemonSet's ServiceAccount.
        let opts = parse(&["--kubernetes", "--api-server", "http://127.0.0.1:8080"]).expect("defaults");
        let NodeAuthOptions::TokenReview { review, .. } = &opts.auth else { panic!("TokenReview expected") };
        assert_eq!(review.audience, "mesh-ca");
        assert_eq!(review.node_service_accounts, ["mesh-system/mesh-node"]);

        // Budgets, the deadline and a rotation's extra roots.
        let opts = parse(&[
            "--config", "/c", "--tokens", "/t.yaml", "--node-rate-limit", "2.5", "--node-burst", "7", "--request-timeout", "3s",
            "--extra-roots", "/old-root.pem",
        ])
        .expect("limits");
        assert_eq!(opts.limits, RequestLimits { per_second: 2.5, burst: 7, deadline: Duration::from_secs(3) });
        assert_eq!(opts.extra_roots.as_deref(), Some(std::path::Path::new("/old-root.pem")));
        let opts = parse(&["--config", "/c", "--tokens", "/t.yaml"]).expect("defaults");
        assert_eq!(opts.limits, RequestLimits::default());

        // Pods from the API, static tokens (the static-node-tokens install component).
        let opts = parse(&["--kubernetes", "--api-server", "http://127.0.0.1:8080", "--tokens", "/t.yaml"]).expect("mix");
        assert!(matches!(&opts.pods, PodsFrom::Kubernetes(_)));
        assert!(matches!(&opts.auth, NodeAuthOptions::TokensFile(_)));
    }

    #[test]
    fn contradictory_or_missing_flags_are_named() {
        let err = parse(&["--tokens", "/t.yaml"]).expect_err("no pod source");
        assert!(err.contains("--config"), "{err}");
        let err = parse(&["--config", "/c"]).expect_err("no node credentials");
        assert!(err.contains("--tokens"), "{err}");
        let err = parse(&["--config", "/c", "--kubernetes"]).expect_err("two pod sources");
        assert!(err.contains("--config") && err.contains("--kubernetes"), "{err}");
        let err = parse(&["--config", "/c", "--tokens", "/t", "--token-audience", "x"]).expect_err("review flag in file mode");
        assert!(err.contains("--token-audience"), "{err}");
        let err = parse(&["--kubernetes", "--api-server", "http://h:1", "--tokens", "/t", "--node-service-account", "a/b"])
            .expect_err("review flag with static tokens");
        assert!(err.contains("--node-service-account"), "{err}");
        let err = parse(&["--config", "/c", "--tokens", "/t", "--node-rate-limit=-1"]).expect_err("negative rate");
        assert!(err.contains("--node-rate-limit"), "{err}");
        let err = parse(&["--config", "/c", "--tokens", "/t", "--request-timeout", "0s"]).expect_err("no time");
        assert!(err.contains("--request-timeout"), "{err}");
        let err = parse(&["--config", "/c", "--tokens", "/t", "--review-negative-cache-ttl", "5s"]).expect_err("review flag in file mode");
        assert!(err.contains("--review-negative-cache-ttl"), "{err}");
        let err = parse(&["--kubernetes", "--api-server", "ftp://h"]).expect_err("bad URL");
        assert_eq!(err, "--kubernetes: API server URL \"ftp://h\": must start with http:// or https://");
    }
}
