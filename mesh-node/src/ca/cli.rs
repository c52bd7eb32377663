//! `mesh-node ca`: flags, runtime and shutdown on SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use super::server::CaOptions;
use super::signer::TtlPolicy;
use crate::config::parse_duration;

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
    #[arg(long, env = "MESH_CONFIG_DIR")]
    pub config: PathBuf,
    /// YAML map of node name to token.
    #[arg(long)]
    pub tokens: PathBuf,
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
        if self.default_ttl > self.max_ttl {
            return Err(format!("--default-ttl {:?} is longer than --max-ttl {:?}", self.default_ttl, self.max_ttl));
        }
        let mut opts = CaOptions::new(self.listen, self.state_dir, self.config, self.tokens);
        opts.trust_domain = self.trust_domain;
        opts.ttl = TtlPolicy { default: self.default_ttl, max: self.max_ttl };
        opts.root_cert = self.root_cert;
        opts.root_key = self.root_key;
        opts.extra_sans = self.sans;
        opts.config_poll = Duration::from_millis(self.config_poll_ms);
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
        let server = super::CaServer::bind(opts).await?;
        // Printed on stdout as well as logged so scripts can wait for it.
        println!("mesh CA listening on {}", server.local_addr());
        server.run(shutdown_signal()).await
    }) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-node ca: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            // Without a SIGTERM handler, Ctrl-C still works.
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
    tracing::info!("mesh CA shutting down");
}
