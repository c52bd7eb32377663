//! Cluster configuration: a typed model of the Kubernetes and Istio objects
//! the mesh acts on, loaded from a directory of YAML files and validated as a
//! whole (or object by object for the Kubernetes API), plus a watcher that
//! keeps the last good snapshot live.
//!
//! Problems are reported one per line as
//! `<file>: <Kind> <namespace>/<name>: <field.path>: <message>`; Istio field
//! paths are relative to `spec`, as in Istio's own messages.
//!
//! Files: `load` (files and documents), `de` (path-tracking serde),
//! `decode` (document → object), `kube` (core kinds), `istio/` (CRDs),
//! `assemble` (cross-object checks, indexes), `cluster` (lookups),
//! `per_object` (Kubernetes mode: an invalid object is held back, the rest
//! applied; `fail_closed`: what stands in for a new policy that cannot be read), `tunnels`
//! (what is invalid without a CA), `host`, `duration`, `watch`, `error`.

mod assemble;
mod cluster;
mod de;
mod decode;
mod duration;
mod error;
mod fail_closed;
mod field_path;
mod host;
mod istio;
mod kube;
mod load;
mod lookup;
mod model;
mod per_object;
mod tunnels;
mod watch;

#[cfg(test)]
mod tests;

pub use cluster::Cluster;
pub use lookup::{ROOT_NAMESPACE, root_namespace, set_root_namespace};
pub use decode::Unapplied;
pub use duration::parse_duration;
pub use error::{ConfigError, Problem};
pub use field_path::FieldPath;
pub use host::{CLUSTER_DOMAIN, canonical_host, fqdn, host_matches};
pub use istio::*;
pub use model::{
    Conditions, DATAPLANE_MODE_LABEL, Endpoint, EndpointSlice, Namespace, Node, Pod, Service,
    ServicePort, SliceEndpoint, SlicePort, TargetPort, labels_match, usable,
};
pub use per_object::{PerObjectBuild, PerObjectBuilder, RejectedObject};
pub use tunnels::TunnelMode;
pub use watch::{spawn_watcher, spawn_watcher_in};
