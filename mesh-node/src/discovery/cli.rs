//! The flags that say where the API server is, shared by `mesh-node run` and `mesh-node ca`
//! (each defines its own `--kubernetes`, which these require).

use std::path::PathBuf;

use super::{ApiError, ApiServer};

#[derive(clap::Args, Debug, Clone, Default)]
pub struct ApiArgs {
    /// API server URL (http:// or https://) for --kubernetes, instead of the in-cluster one
    /// or the kubeconfig's.
    #[arg(long, requires = "kubernetes", conflicts_with = "kubeconfig")]
    pub api_server: Option<String>,
    /// Bearer token file for --api-server (re-read about once a minute: rotated tokens are
    /// picked up).
    #[arg(long, requires = "api_server")]
    pub api_token_file: Option<PathBuf>,
    /// CA bundle for an https --api-server.
    #[arg(long, requires = "api_server")]
    pub api_ca_file: Option<PathBuf>,
    /// kubeconfig for --kubernetes outside the cluster [default: in a pod the in-cluster
    /// config, elsewhere KUBECONFIG or ~/.kube/config].
    #[arg(long, requires = "kubernetes")]
    pub kubeconfig: Option<PathBuf>,
    /// Context of the kubeconfig to use [default: its current-context].
    #[arg(long, requires = "kubernetes", conflicts_with = "api_server")]
    pub kube_context: Option<String>,
}

impl ApiArgs {
    /// The API server these flags name; see [`ApiServer::infer`] for the default.
    pub fn api_server(&self) -> Result<ApiServer, ApiError> {
        match (&self.api_server, &self.kubeconfig, &self.kube_context) {
            (Some(url), _, _) => ApiServer::new(url, self.api_token_file.as_deref(), self.api_ca_file.as_deref()),
            (None, None, None) => ApiServer::infer(),
            (None, path, context) => ApiServer::from_kubeconfig(path.as_deref(), context.as_deref()),
        }
    }
}
