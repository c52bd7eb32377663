//! Turns one YAML document into one typed object of the model, or into
//! problems that name the file, the object and the field.

use std::fmt;

use k8s_openapi::api::core::v1 as k8s;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;
use serde_yaml::Value;

use super::de::{DeError, from_value};
use super::error::{Problem, Reporter};
use super::field_path::FieldPath;
use super::istio::{
    self, AuthorizationPolicy, DestinationRule, PeerAuthentication, VirtualService, raw,
};
use super::kube::{self, Ident};
use super::model::{EndpointSlice, Namespace, Node, Pod, Service};

/// The kinds the mesh reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Kind {
    Namespace,
    Node,
    Pod,
    Service,
    EndpointSlice,
    DestinationRule,
    VirtualService,
    PeerAuthentication,
    AuthorizationPolicy,
}

impl Kind {
    fn classify(api_version: &str, kind: &str) -> Option<Kind> {
        match (api_version, kind) {
            ("v1", "Namespace") => Some(Kind::Namespace),
            ("v1", "Node") => Some(Kind::Node),
            ("v1", "Pod") => Some(Kind::Pod),
            ("v1", "Service") => Some(Kind::Service),
            ("discovery.k8s.io/v1", "EndpointSlice") => Some(Kind::EndpointSlice),
            (
                "networking.istio.io/v1"
                | "networking.istio.io/v1beta1"
                | "networking.istio.io/v1alpha3",
                "DestinationRule",
            ) => Some(Kind::DestinationRule),
            (
                "networking.istio.io/v1"
                | "networking.istio.io/v1beta1"
                | "networking.istio.io/v1alpha3",
                "VirtualService",
            ) => Some(Kind::VirtualService),
            ("security.istio.io/v1" | "security.istio.io/v1beta1", "PeerAuthentication") => {
                Some(Kind::PeerAuthentication)
            }
            ("security.istio.io/v1" | "security.istio.io/v1beta1", "AuthorizationPolicy") => {
                Some(Kind::AuthorizationPolicy)
            }
            _ => None,
        }
    }

    fn cluster_scoped(self) -> bool {
        matches!(self, Kind::Namespace | Kind::Node)
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Node => "Node",
            Kind::Pod => "Pod",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::DestinationRule => "DestinationRule",
            Kind::VirtualService => "VirtualService",
            Kind::PeerAuthentication => "PeerAuthentication",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
        }
    }
}

/// Kinds the mesh knows and does not apply (Istio and Gateway API kinds): each object is
/// reported as "not applied by mesh (kind X)", never silently skipped. `(API group, kind,
/// changes mesh routing in Istio)`.
pub(crate) const UNAPPLIED_KINDS: &[(&str, &str, bool)] = &[
    ("networking.istio.io", "ServiceEntry", true),
    ("networking.istio.io", "Sidecar", true),
    ("networking.istio.io", "Gateway", false),
    ("networking.istio.io", "WorkloadEntry", false),
    ("networking.istio.io", "WorkloadGroup", false),
    ("networking.istio.io", "EnvoyFilter", false),
    ("networking.istio.io", "ProxyConfig", false),
    ("telemetry.istio.io", "Telemetry", false),
    ("security.istio.io", "RequestAuthentication", false),
    ("extensions.istio.io", "WasmPlugin", false),
    ("gateway.networking.k8s.io", "Gateway", false),
    ("gateway.networking.k8s.io", "HTTPRoute", false),
    ("gateway.networking.k8s.io", "GRPCRoute", false),
    ("gateway.networking.k8s.io", "TCPRoute", false),
    ("gateway.networking.k8s.io", "TLSRoute", false),
];

/// An object of a kind the mesh does not apply (see [`UNAPPLIED_KINDS`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unapplied {
    pub file: String,
    pub api_version: String,
    pub kind: String,
    /// Empty when the document names none (`default` is not assumed for unknown kinds).
    pub namespace: String,
    pub name: String,
    /// In Istio this kind changes how mesh traffic is routed (ServiceEntry, Sidecar), so
    /// traffic here goes differently than under Istio.
    pub changes_routing: bool,
}

impl Unapplied {
    /// `Kind namespace/name`.
    pub fn object(&self) -> String {
        if self.namespace.is_empty() {
            format!("{} {}", self.kind, self.name)
        } else {
            format!("{} {}/{}", self.kind, self.namespace, self.name)
        }
    }

    pub fn message(&self) -> String {
        let mut m = format!("not applied by mesh (kind {})", self.kind);
        if self.changes_routing {
            m.push_str(": in Istio it changes how mesh traffic is routed, so traffic here is routed as if it did not exist");
        }
        m
    }
}

impl fmt::Display for Unapplied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} ({}): {}", self.file, self.object(), self.api_version, self.message())
    }
}

/// The document as an object of a kind the mesh does not apply, if it is one.
pub(crate) fn unapplied(file: &str, value: &Value) -> Option<Unapplied> {
    let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_string);
    let api_version = text(value.get("apiVersion"))?;
    let kind = text(value.get("kind"))?;
    let group = api_version.split_once('/').map_or("", |(g, _)| g);
    let &(_, _, changes_routing) = UNAPPLIED_KINDS.iter().find(|(g, k, _)| *g == group && *k == kind)?;
    let metadata = value.get("metadata");
    Some(Unapplied {
        file: file.to_string(),
        api_version,
        kind,
        namespace: text(metadata.and_then(|m| m.get("namespace"))).unwrap_or_default(),
        name: text(metadata.and_then(|m| m.get("name"))).unwrap_or_default(),
        changes_routing,
    })
}

/// Where an object came from, for messages about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Origin {
    pub file: String,
    pub kind: Kind,
    /// Empty for cluster-scoped kinds.
    pub namespace: String,
    pub name: String,
}

impl Origin {
    /// `Kind namespace/name`, or `Kind name` for cluster-scoped kinds.
    pub(crate) fn display(&self) -> String {
        if self.kind.cluster_scoped() {
            format!("{} {}", self.kind.name(), self.name)
        } else {
            format!("{} {}/{}", self.kind.name(), self.namespace, self.name)
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) enum Object {
    Namespace(Namespace),
    Node(Node),
    Pod(Pod),
    Service(Service),
    EndpointSlice(EndpointSlice),
    // Boxed: the Istio models are several times larger than the core kinds.
    DestinationRule(Box<DestinationRule>),
    VirtualService(Box<VirtualService>),
    PeerAuthentication(Box<PeerAuthentication>),
    AuthorizationPolicy(Box<AuthorizationPolicy>),
}

/// The Istio envelope: metadata is checked like Kubernetes' and the spec is
/// decoded on its own so its field paths start at the spec (as Istio's do).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(dead_code)] // apiVersion/kind/status are only accepted, not used
struct Envelope {
    api_version: String,
    kind: String,
    #[serde(default)]
    metadata: ObjectMeta,
    spec: Value,
    status: Option<Value>,
}

/// Decodes one document. Returns `None` for skipped kinds and for documents
/// that cannot be named (no apiVersion, kind or name), and the origin without
/// an object for objects too broken to build; everything wrong is added to
/// `problems`. Objects with field problems are still returned when they can
/// be built, so cross-object checks do not pile follow-up errors on top.
/// Warnings (the object is applied, differently from how it reads) go to `warnings`.
pub(crate) fn decode(
    file: &str,
    index: usize,
    value: &Value,
    problems: &mut Vec<Problem>,
    warnings: &mut Vec<Problem>,
) -> Option<(Origin, Option<Object>)> {
    let doc = format!("document {index}");
    let top = |problems: &mut Vec<Problem>, field: &str, message: &str| {
        problems.push(Problem {
            file: file.to_string(),
            location: None,
            object: Some(doc.clone()),
            field: (!field.is_empty()).then(|| field.to_string()),
            message: message.to_string(),
        });
    };
    if !value.is_mapping() {
        top(problems, "", "expected a Kubernetes object (a mapping)");
        return None;
    }
    let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_string);
    let (Some(api_version), Some(kind_name)) =
        (text(value.get("apiVersion")), text(value.get("kind")))
    else {
        for field in ["apiVersion", "kind"] {
            if text(value.get(field)).is_none() {
                top(problems, field, "is required");
            }
        }
        return None;
    };
    let Some(kind) = Kind::classify(&api_version, &kind_name) else {
        tracing::warn!(
            file,
            document = index,
            api_version,
            kind = kind_name,
            "skipping unsupported kind"
        );
        return None;
    };
    let metadata = value.get("metadata");
    let Some(name) = text(metadata.and_then(|m| m.get("name"))).filter(|n| !n.is_empty()) else {
        let object = format!("{kind_name} ({doc})");
        Reporter::new(file, &object, problems)
            .at(&FieldPath::of(&["metadata", "name"]), "is required");
        return None;
    };
    let namespace = if kind.cluster_scoped() {
        String::new()
    } else {
        text(metadata.and_then(|m| m.get("namespace")))
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "default".to_string())
    };
    let origin = Origin {
        file: file.to_string(),
        kind,
        namespace,
        name,
    };
    let object_name = origin.display();
    let mut r = Reporter::with_warnings(file, &object_name, problems, warnings);
    let id = Ident {
        namespace: &origin.namespace,
        name: &origin.name,
    };
    let object = match kind {
        Kind::Namespace => typed::<k8s::Namespace>(value, &mut r)
            .map(|ns| Object::Namespace(kube::namespace(ns, &id))),
        Kind::Node => typed::<k8s::Node>(value, &mut r)
            .and_then(|n| kube::node(n, &id, &mut r))
            .map(Object::Node),
        Kind::Pod => match typed::<k8s::Pod>(value, &mut r).and_then(|p| kube::pod(p, &id, &mut r)) {
            Some(kube::PodState::Running(pod)) => Some(Object::Pod(*pod)),
            // Pending without an address, or finished: nothing to route to, nothing wrong.
            Some(kube::PodState::Absent) => return None,
            None => None,
        },
        Kind::Service => typed::<k8s::Service>(value, &mut r)
            .and_then(|s| kube::service(s, &id, &mut r))
            .map(Object::Service),
        Kind::EndpointSlice => typed::<k8s_openapi::api::discovery::v1::EndpointSlice>(value, &mut r)
            .and_then(|s| kube::endpoint_slice(s, &id, &mut r))
            .map(Object::EndpointSlice),
        Kind::DestinationRule => {
            envelope_and_spec::<raw::DestinationRuleSpec>(value, &mut r).map(|(envelope, s)| {
                let created = created(&envelope.metadata);
                let annotations = envelope.metadata.annotations.unwrap_or_default();
                let mut dr = istio::convert::destination_rule(
                    &s,
                    &origin.namespace,
                    &origin.name,
                    &annotations,
                    &mut r,
                );
                dr.created = created;
                Object::DestinationRule(Box::new(dr))
            })
        }
        Kind::VirtualService => envelope_and_spec::<raw::VirtualServiceSpec>(value, &mut r).map(|(envelope, s)| {
            let mut vs = istio::convert::virtual_service(&s, &origin.namespace, &origin.name, &mut r);
            vs.created = created(&envelope.metadata);
            Object::VirtualService(Box::new(vs))
        }),
        Kind::PeerAuthentication => spec::<raw::PeerAuthenticationSpec>(value, &mut r).map(|s| {
            Object::PeerAuthentication(Box::new(istio::convert::peer_authentication(
                &s,
                &origin.namespace,
                &origin.name,
                &mut r,
            )))
        }),
        Kind::AuthorizationPolicy => spec::<raw::AuthorizationPolicySpec>(value, &mut r).map(|s| {
            Object::AuthorizationPolicy(Box::new(istio::convert::authorization_policy(
                &s,
                &origin.namespace,
                &origin.name,
                &mut r,
            )))
        }),
    };
    Some((origin, object))
}

/// `metadata.creationTimestamp` in seconds since the epoch (what Istio orders conflicting
/// rules by); `None` when absent (files written by hand), which orders first.
fn created(metadata: &ObjectMeta) -> Option<i64> {
    metadata.creation_timestamp.as_ref().map(|t| t.0.timestamp())
}

fn report(r: &mut Reporter<'_>, e: DeError) {
    r.at(&e.path, e.message);
}

fn typed<'de, T: Deserialize<'de>>(value: &'de Value, r: &mut Reporter<'_>) -> Option<T> {
    from_value(value).map_err(|e| report(r, e)).ok()
}

fn spec<T: for<'de> Deserialize<'de>>(value: &Value, r: &mut Reporter<'_>) -> Option<T> {
    envelope_and_spec(value, r).map(|(_, spec)| spec)
}

/// The spec and the envelope, for kinds that read their metadata (annotations).
fn envelope_and_spec<T: for<'de> Deserialize<'de>>(
    value: &Value,
    r: &mut Reporter<'_>,
) -> Option<(Envelope, T)> {
    let envelope: Envelope = typed(value, r)?;
    let spec = typed(&envelope.spec, r)?;
    Some((envelope, spec))
}
