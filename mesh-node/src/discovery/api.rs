//! Where the API server is and how to authenticate to it (a kube-rs [`kube::Config`]), and the
//! one [`kube::Client`] a process makes of it: discovery's watchers, the CA's pod index and its
//! TokenReviews share it (one connection pool, one cached token).
//!
//! Token files (the in-cluster ServiceAccount token, `--api-token-file`, a kubeconfig's
//! `tokenFile`) are read by kube-rs, which reuses what it read for [`TOKEN_FILE_RELOAD`] and
//! then reads the file again: a rotated token is sent from then on. kubelet rotates projected
//! tokens at 80% of their lifetime (ten minutes at least, an hour by default), and the old
//! token stays valid until it expires, so that delay costs nothing; client-go re-reads once a
//! minute too.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use kube::config::{Kubeconfig, KubeconfigError};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// Where kubelet mounts a pod's ServiceAccount token and the cluster CA.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// How long kube-rs (kube-client 2.0's `TokenFile`) keeps sending a token file's content
/// before reading the file again: it caches for 60 s and reloads in the last 10 s.
pub const TOKEN_FILE_RELOAD: Duration = Duration::from_secs(50);

/// What went wrong setting up to talk to the API server, or talking to it.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(
        "not in a pod (KUBERNETES_SERVICE_HOST is not set) and no kubeconfig ({kubeconfig}); \
         pass --api-server URL or --kubeconfig FILE"
    )]
    NoCluster { kubeconfig: String },
    #[error("KUBERNETES_SERVICE_HOST is not set (not running in a pod?); pass --api-server URL or --kubeconfig FILE")]
    NotInCluster,
    #[error("API server URL {url:?}: {message}")]
    Url { url: String, message: String },
    #[error("{what} {path}: {message}")]
    File { what: &'static str, path: String, message: String },
    #[error("kubeconfig {source_name}: {message}")]
    Kubeconfig { source_name: String, message: String },
    #[error("setting up the client for the API server {server}: {message}")]
    Client { server: String, message: String },
    /// The API server answered with an error status.
    #[error("{what} on {server}: {code} {reason}: {message}")]
    Status { what: String, server: String, code: u16, reason: String, message: String },
    /// No answer: connecting, TLS, the connection, a timeout, an undecodable answer.
    #[error("{what} on {server}: {message}")]
    Request { what: String, server: String, message: String },
}

impl ApiError {
    fn file(what: &'static str, path: &Path, e: impl std::fmt::Display) -> ApiError {
        ApiError::File { what, path: path.display().to_string(), message: e.to_string() }
    }

    /// The HTTP status the API server answered with, if it answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            ApiError::Status { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// A kube-rs error with its whole chain of causes: kube's own message for a transport error
/// is only "ServiceError: client error (Connect)", the cause (refused, which certificate
/// problem) is further down.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        // hyper and kube repeat their source's text in their own.
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// Where the API server is and how to authenticate to it; clones share one client.
#[derive(Clone)]
pub struct ApiServer {
    config: Arc<kube::Config>,
    client: Arc<OnceLock<kube::Client>>,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.url().as_str())
    }
}

impl ApiServer {
    fn with(config: kube::Config) -> ApiServer {
        ApiServer { config: Arc::new(config), client: Arc::default() }
    }

    /// The server's URL, as logs and errors name it.
    pub fn url(&self) -> String {
        self.config.cluster_url.to_string().trim_end_matches('/').to_string()
    }

    /// What `--kubernetes` uses without `--api-server` or `--kubeconfig`: in a pod
    /// (`KUBERNETES_SERVICE_HOST` set) the in-cluster config, else the kubeconfig of
    /// `KUBECONFIG` or `~/.kube/config` at its current context.
    pub fn infer() -> Result<ApiServer, ApiError> {
        ApiServer::infer_from(&Environment::current())
    }

    /// [`ApiServer::infer`] in the given environment.
    pub(crate) fn infer_from(env: &Environment) -> Result<ApiServer, ApiError> {
        if env.service_host.is_some() {
            return ApiServer::in_cluster_from(env.service_host.as_deref(), env.service_port.as_deref(), &env.service_account_dir);
        }
        ApiServer::from_kubeconfig_files(&env.kubeconfig_files()?, None)
    }

    /// From the in-cluster environment: `KUBERNETES_SERVICE_HOST`/`_PORT` and the mounted
    /// ServiceAccount token and CA.
    pub fn in_cluster() -> Result<ApiServer, ApiError> {
        ApiServer::in_cluster_from(
            std::env::var("KUBERNETES_SERVICE_HOST").ok().as_deref(),
            std::env::var("KUBERNETES_SERVICE_PORT").ok().as_deref(),
            Path::new(SERVICE_ACCOUNT_DIR),
        )
    }

    /// [`ApiServer::in_cluster`] with the environment and the ServiceAccount directory given:
    /// `token` and `ca.crt` are read from `sa_dir`. kube-rs's own `Config::incluster` reads
    /// fixed paths, which tests cannot provide.
    pub fn in_cluster_from(host: Option<&str>, port: Option<&str>, sa_dir: &Path) -> Result<ApiServer, ApiError> {
        let host = host.filter(|h| !h.is_empty()).ok_or(ApiError::NotInCluster)?;
        let port = port.filter(|p| !p.is_empty()).unwrap_or("443");
        let host = if host.contains(':') { format!("[{host}]") } else { host.to_string() };
        ApiServer::new(&format!("https://{host}:{port}"), Some(&sa_dir.join("token")), Some(&sa_dir.join("ca.crt")))
    }

    /// `url` is `http://host:port` or `https://host:port`; for https the CA file is required
    /// (the API server's certificate is cluster-issued).
    pub fn new(url: &str, token_file: Option<&Path>, ca_file: Option<&Path>) -> Result<ApiServer, ApiError> {
        let bad_url = |message: &str| ApiError::Url { url: url.to_string(), message: message.to_string() };
        let uri: http::Uri = url.parse().map_err(|e: http::uri::InvalidUri| bad_url(&e.to_string()))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(bad_url("must start with http:// or https://")),
        };
        if uri.host().is_none() {
            return Err(bad_url("has no host"));
        }
        let mut config = kube::Config::new(uri);
        if https {
            let ca = ca_file.ok_or_else(|| bad_url("an https API server needs a CA file"))?;
            config.root_cert = Some(read_ca(ca)?);
        }
        if let Some(file) = token_file {
            check_token_file(file)?;
            config.auth_info.token_file = Some(file.display().to_string());
        }
        Ok(ApiServer::with(config))
    }

    /// From a kubeconfig (out-of-cluster runs): `path`, or `KUBECONFIG` (a `:`-separated list,
    /// merged) or `~/.kube/config` when `None`; `context`, or the file's current-context.
    pub fn from_kubeconfig(path: Option<&Path>, context: Option<&str>) -> Result<ApiServer, ApiError> {
        let files = match path {
            Some(p) => vec![p.to_path_buf()],
            None => Environment::current().kubeconfig_files()?,
        };
        ApiServer::from_kubeconfig_files(&files, context)
    }

    /// The kubeconfig merged from `files` (the first file to set a value wins, as kubectl
    /// merges `KUBECONFIG`).
    fn from_kubeconfig_files(files: &[PathBuf], context: Option<&str>) -> Result<ApiServer, ApiError> {
        let source_name = files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(":");
        let err = |message: String| ApiError::Kubeconfig { source_name: source_name.clone(), message };
        let mut merged: Option<Kubeconfig> = None;
        for file in files {
            let next = Kubeconfig::read_from(file).map_err(|e| err(chain(&e)))?;
            merged = Some(match merged {
                None => next,
                Some(m) => m.merge(next).map_err(|e| err(chain(&e)))?,
            });
        }
        let mut kubeconfig = merged.ok_or_else(|| err("no file".into()))?;
        if let Some(context) = context {
            if !kubeconfig.contexts.iter().any(|c| c.name == context) {
                return Err(err(format!("no context named {context:?}")));
            }
            kubeconfig.current_context = Some(context.to_string());
        }
        let config = kube::Config::try_from(kubeconfig).map_err(|e: KubeconfigError| err(chain(&e)))?;
        if let Some(file) = &config.auth_info.token_file {
            check_token_file(Path::new(file))?;
        }
        Ok(ApiServer::with(config))
    }

    /// The shared client, made on first use. Must be called inside a Tokio runtime (kube-rs
    /// spawns the client's request queue onto it).
    pub fn client(&self) -> Result<kube::Client, ApiError> {
        if let Some(client) = self.client.get() {
            return Ok(client.clone());
        }
        let client = kube::Client::try_from(kube::Config::clone(&self.config))
            .map_err(|e| ApiError::Client { server: self.url(), message: chain(&e) })?;
        // Two first uses at once: both build, one is kept.
        Ok(self.client.get_or_init(|| client).clone())
    }

    /// `e`, of the request described by `what`, as an [`ApiError`] naming this server.
    pub(crate) fn error(&self, what: impl Into<String>, e: &kube::Error) -> ApiError {
        let (what, server) = (what.into(), self.url());
        match e {
            kube::Error::Api(status) => ApiError::Status {
                what,
                server,
                code: status.code,
                reason: status.reason.clone(),
                message: status.message.clone(),
            },
            other => ApiError::Request { what, server, message: chain(other) },
        }
    }
}

/// What [`ApiServer::infer`] reads of the process's environment.
#[derive(Debug, Clone, Default)]
pub(crate) struct Environment {
    /// `KUBERNETES_SERVICE_HOST`/`_PORT` (set by kubelet in every pod).
    pub service_host: Option<String>,
    pub service_port: Option<String>,
    pub service_account_dir: PathBuf,
    /// `KUBECONFIG`: files separated by `:`.
    pub kubeconfig: Option<String>,
    pub home: Option<PathBuf>,
}

impl Environment {
    fn current() -> Environment {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        Environment {
            service_host: var("KUBERNETES_SERVICE_HOST"),
            service_port: var("KUBERNETES_SERVICE_PORT"),
            service_account_dir: PathBuf::from(SERVICE_ACCOUNT_DIR),
            kubeconfig: var("KUBECONFIG"),
            home: std::env::var_os("HOME").filter(|h| !h.is_empty()).map(PathBuf::from),
        }
    }

    /// `KUBECONFIG`'s files, else `~/.kube/config` if it exists.
    fn kubeconfig_files(&self) -> Result<Vec<PathBuf>, ApiError> {
        if let Some(list) = &self.kubeconfig {
            return Ok(list.split(':').filter(|p| !p.is_empty()).map(PathBuf::from).collect());
        }
        let Some(home) = &self.home else {
            return Err(ApiError::NoCluster { kubeconfig: "KUBECONFIG and HOME are not set".into() });
        };
        let file = home.join(".kube/config");
        if !file.exists() {
            let kubeconfig = format!("KUBECONFIG is not set, {} does not exist", file.display());
            return Err(ApiError::NoCluster { kubeconfig });
        }
        Ok(vec![file])
    }
}

/// The CA bundle as DER certificates; at least one.
fn read_ca(path: &Path) -> Result<Vec<Vec<u8>>, ApiError> {
    let mut out = Vec::new();
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| ApiError::file("API server CA", path, e))? {
        let cert = cert.map_err(|e| ApiError::file("API server CA", path, e))?;
        out.push(cert.to_vec());
    }
    if out.is_empty() {
        return Err(ApiError::file("API server CA", path, "no PEM certificate in it"));
    }
    Ok(out)
}

/// kube-rs sends a token file's content as it is: a trailing line break would make every
/// request fail with an invalid Authorization header, so it is refused here, by name.
fn check_token_file(path: &Path) -> Result<(), ApiError> {
    let token = std::fs::read_to_string(path).map_err(|e| ApiError::file("API token file", path, e))?;
    if token.is_empty() {
        return Err(ApiError::file("API token file", path, "is empty"));
    }
    if token.trim() != token {
        return Err(ApiError::file(
            "API token file",
            path,
            "has leading or trailing whitespace (a line break?); kube-rs would send it as part of the token \
             (write it with printf '%s', as kubelet does)",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Discovery's watchers, the CA's pod index and its TokenReviews are handed clones of one
    /// `ApiServer`: they must end up on one client (one pool, one cached token).
    #[tokio::test]
    async fn clones_share_one_client() {
        let api = ApiServer::new("http://127.0.0.1:1", None, None).expect("api");
        let clone = api.clone();
        assert!(clone.client.get().is_none(), "made on first use");
        api.client().expect("client");
        assert!(clone.client.get().is_some(), "the clone sees the client made through the original");
        assert!(Arc::ptr_eq(&api.client, &clone.client));
    }
}
