//! The kinds the mesh reads from the API server and the API versions each is served at.
//! Built-in kinds take their group, version and plural from their k8s-openapi type; Istio's
//! are listed by hand, newest version first (older clusters serve only older ones).

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::discovery::ApiResource;

/// A kind the mesh reads and the API versions it is served at, preferred first.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Kind {
    pub kind: &'static str,
    pub plural: &'static str,
    /// `v1` for the core group, `group/version` otherwise.
    pub versions: &'static [&'static str],
}

/// Kinds the mesh does not apply but reports ("not applied by mesh (kind X)" in
/// `/config_errors`, a metric, `meshctl check`). Watched like the others, except that they never
/// hold readiness back: a CRD that is not installed (404) or a list the ServiceAccount may not
/// make (403) is simply nothing to report.
pub(crate) const REPORTED: &[Kind] = &[
    Kind { kind: "ServiceEntry", plural: "serviceentries", versions: &["networking.istio.io/v1", "networking.istio.io/v1beta1", "networking.istio.io/v1alpha3"] },
    Kind { kind: "Sidecar", plural: "sidecars", versions: &["networking.istio.io/v1", "networking.istio.io/v1beta1", "networking.istio.io/v1alpha3"] },
    Kind { kind: "Gateway", plural: "gateways", versions: &["networking.istio.io/v1", "networking.istio.io/v1beta1", "networking.istio.io/v1alpha3"] },
    Kind { kind: "WorkloadEntry", plural: "workloadentries", versions: &["networking.istio.io/v1", "networking.istio.io/v1beta1", "networking.istio.io/v1alpha3"] },
    Kind { kind: "WorkloadGroup", plural: "workloadgroups", versions: &["networking.istio.io/v1", "networking.istio.io/v1beta1", "networking.istio.io/v1alpha3"] },
    Kind { kind: "EnvoyFilter", plural: "envoyfilters", versions: &["networking.istio.io/v1alpha3"] },
    Kind { kind: "ProxyConfig", plural: "proxyconfigs", versions: &["networking.istio.io/v1beta1"] },
    Kind { kind: "Telemetry", plural: "telemetries", versions: &["telemetry.istio.io/v1", "telemetry.istio.io/v1alpha1"] },
    Kind { kind: "RequestAuthentication", plural: "requestauthentications", versions: &["security.istio.io/v1", "security.istio.io/v1beta1"] },
    Kind { kind: "WasmPlugin", plural: "wasmplugins", versions: &["extensions.istio.io/v1alpha1"] },
    // Gateway API routes. (Its Gateway would share the store key `gateways` with Istio's: not
    // watched; file mode reports it.)
    Kind { kind: "HTTPRoute", plural: "httproutes", versions: &["gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1beta1"] },
    Kind { kind: "GRPCRoute", plural: "grpcroutes", versions: &["gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1alpha2"] },
    Kind { kind: "TCPRoute", plural: "tcproutes", versions: &["gateway.networking.k8s.io/v1alpha2"] },
    Kind { kind: "TLSRoute", plural: "tlsroutes", versions: &["gateway.networking.k8s.io/v1alpha3", "gateway.networking.k8s.io/v1alpha2"] },
];

/// A built-in kind as its k8s-openapi type names it.
macro_rules! builtin {
    ($t:ty) => {
        Kind {
            kind: <$t as k8s_openapi::Resource>::KIND,
            plural: <$t as k8s_openapi::Resource>::URL_PATH_SEGMENT,
            versions: &[<$t as k8s_openapi::Resource>::API_VERSION],
        }
    };
}

pub(crate) const KINDS: &[Kind] = &[
    builtin!(Namespace),
    builtin!(Node),
    builtin!(Pod),
    builtin!(Service),
    // Endpoints as Kubernetes' own consumers (kube-proxy, Envoy, ztunnel) read them, with
    // readiness and termination; Services without a selector have only these.
    builtin!(EndpointSlice),
    Kind {
        kind: "DestinationRule",
        plural: "destinationrules",
        versions: &["networking.istio.io/v1", "networking.istio.io/v1beta1", "networking.istio.io/v1alpha3"],
    },
    Kind {
        kind: "VirtualService",
        plural: "virtualservices",
        versions: &["networking.istio.io/v1", "networking.istio.io/v1beta1", "networking.istio.io/v1alpha3"],
    },
    Kind {
        kind: "PeerAuthentication",
        plural: "peerauthentications",
        versions: &["security.istio.io/v1", "security.istio.io/v1beta1"],
    },
    Kind {
        kind: "AuthorizationPolicy",
        plural: "authorizationpolicies",
        versions: &["security.istio.io/v1", "security.istio.io/v1beta1"],
    },
];

impl Kind {
    /// The kind at `api_version` (one of `versions`), for a dynamic kube-rs `Api`.
    pub(crate) fn api_resource(&self, api_version: &str) -> ApiResource {
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        ApiResource {
            group: group.to_string(),
            version: version.to_string(),
            api_version: api_version.to_string(),
            kind: self.kind.to_string(),
            plural: self.plural.to_string(),
        }
    }

    /// The collection's URL path at `api_version` (logs, the fake API server of the tests).
    pub(crate) fn path(&self, api_version: &str) -> String {
        if api_version.contains('/') {
            format!("/apis/{api_version}/{}", self.plural)
        } else {
            format!("/api/{api_version}/{}", self.plural)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_kinds_are_named_as_the_api_server_serves_them() {
        let slices = KINDS.iter().find(|k| k.kind == "EndpointSlice").expect("EndpointSlice");
        assert_eq!((slices.plural, slices.versions), ("endpointslices", &["discovery.k8s.io/v1"][..]));
        assert_eq!(slices.path(slices.versions[0]), "/apis/discovery.k8s.io/v1/endpointslices");
        let pods = KINDS.iter().find(|k| k.kind == "Pod").expect("Pod");
        assert_eq!(pods.path(pods.versions[0]), "/api/v1/pods");
        let ar = slices.api_resource("discovery.k8s.io/v1");
        assert_eq!((ar.group.as_str(), ar.version.as_str()), ("discovery.k8s.io", "v1"));
        assert_eq!(pods.api_resource("v1").group, "");
    }
}
