//! Istio CRDs the mesh honours: DestinationRule, VirtualService,
//! PeerAuthentication and AuthorizationPolicy (L4 part). `raw` mirrors
//! Istio's YAML; the other files hold the validated model and the checks that
//! build it; `unsupported` rejects the fields Istio defines but the proxy does
//! not apply.

mod authorization_policy;
mod authz_values;
mod common;
mod destination_rule;
mod peer_authentication;
pub(crate) mod raw;
mod unsupported;
mod virtual_service;

pub use authorization_policy::{
    AuthorizationPolicy, AuthzAction, AuthzOperation, AuthzRule, AuthzSource,
};
pub use authz_values::{IpBlock, Wildcard};
pub(crate) use common::{exported_to, is_dns_label};
pub use common::{Destination, Pattern, StringMatch};
pub use destination_rule::{
    ClientTls, ConnectionPool, ConsistentHash, DestinationRule, H2UpgradePolicy, HashAlgorithm,
    HashKey, HttpSettings, LbPolicy, LoadBalancer, MeshPolicy, OutlierDetection, PortTrafficPolicy,
    RateLimit, SimpleLb, Subset, TcpSettings, TlsMode, TrafficPolicy,
};
pub use peer_authentication::{MtlsMode, PeerAuthentication};
pub use virtual_service::{
    AbortStatus, FaultAbort, FaultDelay, HeaderOperations, Headers, HttpFault, HttpMatch,
    HttpRedirect, HttpRetry, HttpRewrite, HttpRoute, HttpRouteDestination, L4Match, RetryOn,
    RouteDestination, TcpRoute, VirtualService, effective_weights,
};

pub(crate) mod convert {
    pub(crate) use super::authorization_policy::convert as authorization_policy;
    pub(crate) use super::destination_rule::convert as destination_rule;
    pub(crate) use super::peer_authentication::convert as peer_authentication;
    pub(crate) use super::virtual_service::convert as virtual_service;
}
