//! Converts the k8s-openapi core kinds into the compact model, reporting
//! every missing or malformed field the mesh depends on.

use std::net::IpAddr;

use k8s_openapi::api::core::v1 as k8s;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::error::Reporter;
use super::field_path::FieldPath;
use super::model::{
    Conditions, EndpointSlice, Namespace, Node, Pod, Service, ServicePort, SliceEndpoint,
    SlicePort, TargetPort,
};

/// Name and namespace as already established by the loader.
pub(crate) struct Ident<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
}

pub(crate) fn namespace(ns: k8s::Namespace, id: &Ident<'_>) -> Namespace {
    Namespace {
        name: id.name.to_string(),
        labels: ns.metadata.labels.unwrap_or_default(),
    }
}

pub(crate) fn node(node: k8s::Node, id: &Ident<'_>, r: &mut Reporter<'_>) -> Option<Node> {
    let path = FieldPath::of(&["status", "addresses"]);
    let addresses = node.status.and_then(|s| s.addresses).unwrap_or_default();
    let Some((index, internal)) = addresses
        .iter()
        .enumerate()
        .find(|(_, a)| a.type_ == "InternalIP")
    else {
        r.at(&path, "no InternalIP address (required for every node)");
        return None;
    };
    let ip = parse_ip(&internal.address, &path.index(index).key("address"), r)?;
    Some(Node {
        name: id.name.to_string(),
        ip,
    })
}

/// What a Pod document is to the mesh.
pub(crate) enum PodState {
    /// A workload with an address: scheduled and running (or starting, or terminating).
    Running(Box<Pod>),
    /// Not scheduled or not started yet (no IP), or finished (`Succeeded`/`Failed`, whose IP
    /// may already belong to another pod): not a workload, and not a problem either.
    Absent,
}

pub(crate) fn pod(pod: k8s::Pod, id: &Ident<'_>, r: &mut Reporter<'_>) -> Option<PodState> {
    let spec = pod.spec.unwrap_or_default();
    let status = pod.status.unwrap_or_default();
    let has_ip = status.pod_ip.as_deref().is_some_and(|ip| !ip.is_empty());
    match status.phase.as_deref() {
        Some("Succeeded" | "Failed") => return Some(PodState::Absent),
        Some("Pending") if !has_ip => return Some(PodState::Absent),
        _ => {}
    }
    let mut ok = true;

    let node = match spec.node_name.filter(|n| !n.is_empty()) {
        Some(n) => n,
        None => {
            r.at(&FieldPath::of(&["spec", "nodeName"]), "is required");
            ok = false;
            String::new()
        }
    };

    let ip_path = FieldPath::of(&["status", "podIP"]);
    let ip = match status.pod_ip.as_deref().filter(|s| !s.is_empty()) {
        Some(text) => parse_ip(text, &ip_path, r),
        None => {
            r.at(&ip_path, "is required");
            None
        }
    };

    let mut ips = Vec::new();
    let ips_path = FieldPath::of(&["status", "podIPs"]);
    for (i, entry) in status.pod_ips.unwrap_or_default().iter().enumerate() {
        if let Some(parsed) = parse_ip(&entry.ip, &ips_path.index(i).key("ip"), r) {
            ips.push(parsed);
        } else {
            ok = false;
        }
    }
    // Kubernetes guarantees podIPs[0] == podIP; a manifest that breaks that is
    // hand-written and most likely wrong about one of them.
    if let (Some(ip), Some(first)) = (ip, ips.first())
        && *first != ip
    {
        r.at(
            &ips_path.index(0).key("ip"),
            format!("{first} must equal status.podIP ({ip})"),
        );
        ok = false;
    }
    if ips.is_empty()
        && let Some(ip) = ip
    {
        ips.push(ip);
    }

    let mut container_ports = Vec::new();
    for (c, container) in spec.containers.iter().enumerate() {
        for (p, port) in container.ports.iter().flatten().enumerate() {
            let path = FieldPath::of(&["spec", "containers"])
                .index(c)
                .key("ports")
                .index(p)
                .key("containerPort");
            match port_number(i64::from(port.container_port)) {
                Some(n) => container_ports.push((port.name.clone(), n)),
                None => {
                    r.at(
                        &path,
                        format!("{} is not a valid port (1-65535)", port.container_port),
                    );
                    ok = false;
                }
            }
        }
    }

    let probe_ports = probe_ports(&spec.containers);

    let namespace = id.namespace.to_string();
    let name = id.name.to_string();
    let uid = pod
        .metadata
        .uid
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| derived_uid(&namespace, &name));
    #[allow(deprecated)]
    let service_account = spec
        .service_account_name
        .or(spec.service_account)
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".to_string());
    // It becomes the pod's mesh identity (certificate SAN, SNI): Kubernetes' own rule, checked
    // here so a hand-written name fails at load time instead of at the first handshake.
    if let Err(why) = crate::identity::names::check_subdomain(&service_account) {
        r.at(&FieldPath::of(&["spec", "serviceAccountName"]), format!("{service_account:?} {why}"));
        ok = false;
    }

    // Kubernetes' rule: ready when the Ready condition is True. Objects written by hand
    // (file mode) often carry no status conditions at all: those count as ready.
    let ready = match &status.conditions {
        None => true,
        Some(conditions) => conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"),
    };
    let ip = ip?;
    ok.then(|| {
        PodState::Running(Box::new(Pod {
            namespace,
            name,
            uid,
            ip,
            ips,
            node,
            service_account,
            labels: pod.metadata.labels.unwrap_or_default(),
            container_ports,
            probe_ports,
            host_network: spec.host_network.unwrap_or(false),
            ready,
            terminating: pod.metadata.deletion_timestamp.is_some(),
        }))
    })
}

pub(crate) fn service(svc: k8s::Service, id: &Ident<'_>, r: &mut Reporter<'_>) -> Option<Service> {
    let Some(spec) = svc.spec else {
        r.at(&FieldPath::of(&["spec"]), "is required");
        return None;
    };
    let before = r.count();

    let external_name = if spec.type_.as_deref() == Some("ExternalName") {
        match spec.external_name.as_deref().map(str::trim) {
            Some(name) if !name.is_empty() => Some(name.to_ascii_lowercase()),
            _ => {
                r.at(
                    &FieldPath::of(&["spec", "externalName"]),
                    "is required for a Service of type ExternalName",
                );
                return None;
            }
        }
    } else {
        None
    };
    let cip_path = FieldPath::of(&["spec", "clusterIP"]);
    let mut cluster_ips = Vec::new();
    match spec.cluster_ip.as_deref() {
        // An ExternalName Service is a DNS alias: it gets no cluster IP.
        None | Some("") if external_name.is_some() => {}
        None | Some("") => r.at(
            &cip_path,
            "is required (an IP, or None for a headless Service)",
        ),
        Some("None") => {}
        Some(text) => {
            if let Some(ip) = parse_ip(text, &cip_path, r) {
                cluster_ips.push(ip);
            }
        }
    }
    let cips_path = FieldPath::of(&["spec", "clusterIPs"]);
    let listed: Vec<String> = spec.cluster_ips.unwrap_or_default();
    let headless = spec.cluster_ip.as_deref() == Some("None");
    for (i, text) in listed.iter().enumerate() {
        let path = cips_path.index(i);
        if headless {
            if text != "None" {
                r.at(
                    &path,
                    format!("{text:?} must be None for a headless Service"),
                );
            }
            continue;
        }
        let Some(ip) = parse_ip(text, &path, r) else {
            continue;
        };
        match (i, cluster_ips.first()) {
            (0, Some(first)) if *first != ip => {
                r.at(&path, format!("{ip} must equal spec.clusterIP ({first})"));
            }
            (0, _) => {}
            _ if cluster_ips.contains(&ip) => r.at(&path, format!("{ip} is listed twice")),
            _ => cluster_ips.push(ip),
        }
    }

    let ports_path = FieldPath::of(&["spec", "ports"]);
    let raw_ports = spec.ports.unwrap_or_default();
    let mut ports: Vec<ServicePort> = Vec::new();
    for (i, p) in raw_ports.iter().enumerate() {
        let path = ports_path.index(i);
        let Some(port) = port_number(i64::from(p.port)) else {
            r.at(
                &path.key("port"),
                format!("{} is not a valid port (1-65535)", p.port),
            );
            continue;
        };
        let target_port = match &p.target_port {
            None => TargetPort::Number(port),
            Some(IntOrString::Int(n)) => match port_number(i64::from(*n)) {
                Some(n) => TargetPort::Number(n),
                None => {
                    r.at(
                        &path.key("targetPort"),
                        format!("{n} is not a valid port (1-65535)"),
                    );
                    continue;
                }
            },
            Some(IntOrString::String(s)) if s.is_empty() => {
                r.at(
                    &path.key("targetPort"),
                    "must be a port number or a container port name",
                );
                continue;
            }
            // "8080" as a string is how some tools write numbers; Kubernetes
            // accepts it as a number too.
            Some(IntOrString::String(s)) => match s.parse::<i64>().ok().and_then(port_number) {
                Some(n) => TargetPort::Number(n),
                None => TargetPort::Name(s.clone()),
            },
        };
        let protocol = p.protocol.clone().unwrap_or_else(|| "TCP".to_string());
        if !matches!(protocol.as_str(), "TCP" | "UDP" | "SCTP") {
            r.at(
                &path.key("protocol"),
                format!("{protocol:?} is not one of TCP, UDP, SCTP"),
            );
        }
        let name = p.name.clone().filter(|n| !n.is_empty());
        if raw_ports.len() > 1 && name.is_none() {
            r.at(
                &path.key("name"),
                "is required when a Service has more than one port",
            );
        }
        if let Some(n) = &name
            && ports.iter().any(|q| q.name.as_ref() == Some(n))
        {
            r.at(&path.key("name"), format!("{n:?} is used by another port"));
        }
        if ports
            .iter()
            .any(|q| q.port == port && q.protocol == protocol)
        {
            r.at(
                &path.key("port"),
                format!("{port}/{protocol} is listed twice"),
            );
        }
        ports.push(ServicePort {
            name,
            port,
            target_port,
            protocol,
            app_protocol: p.app_protocol.clone(),
        });
    }

    // The API server drops the selector of an ExternalName Service's endpoints: it has none.
    let selector = spec.selector.filter(|s| !s.is_empty() && external_name.is_none());
    let export_to = service_export_to(svc.metadata.annotations.as_ref(), r);
    (r.count() == before).then(|| Service {
        namespace: id.namespace.to_string(),
        name: id.name.to_string(),
        cluster_ips,
        ports,
        selector,
        labels: svc.metadata.labels.unwrap_or_default(),
        publish_not_ready: spec.publish_not_ready_addresses.unwrap_or(false),
        external_name,
        export_to,
    })
}

/// Istio's Service annotation that limits which namespaces see the Service.
pub(crate) const SERVICE_EXPORT_TO_ANNOTATION: &str = "networking.istio.io/exportTo";

/// `networking.istio.io/exportTo: "., ns-a"`: entries as a DestinationRule's `exportTo`.
fn service_export_to(annotations: Option<&std::collections::BTreeMap<String, String>>, r: &mut Reporter<'_>) -> Vec<String> {
    let Some(value) = annotations.and_then(|a| a.get(SERVICE_EXPORT_TO_ANNOTATION)) else {
        return Vec::new();
    };
    let entries: Vec<String> = value.split(',').map(|e| e.trim().to_string()).filter(|e| !e.is_empty()).collect();
    let path = FieldPath::of(&["metadata", "annotations"]).key(SERVICE_EXPORT_TO_ANNOTATION);
    for entry in &entries {
        if !(matches!(entry.as_str(), "." | "*" | "~") || super::istio::is_dns_label(entry)) {
            r.at(&path, format!("{entry:?} is not ., *, ~ or a namespace name"));
        }
    }
    entries
}

/// The label naming the Service an EndpointSlice belongs to.
pub(crate) const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// `discovery.k8s.io/v1` EndpointSlice. `FQDN` slices (deprecated, never written by the
/// controller) carry no addresses the proxy can dial and are rejected as such.
pub(crate) fn endpoint_slice(
    slice: k8s_openapi::api::discovery::v1::EndpointSlice,
    id: &Ident<'_>,
    r: &mut Reporter<'_>,
) -> Option<EndpointSlice> {
    let before = r.count();
    let labels = slice.metadata.labels.unwrap_or_default();
    let service = match labels.get(SERVICE_NAME_LABEL).filter(|s| !s.is_empty()) {
        Some(s) => s.clone(),
        None => {
            r.at(
                &FieldPath::of(&["metadata", "labels"]).key(SERVICE_NAME_LABEL),
                "is required (the Service this slice belongs to)",
            );
            return None;
        }
    };
    let want_v6 = match slice.address_type.as_str() {
        "IPv4" => false,
        "IPv6" => true,
        other => {
            r.at(
                &FieldPath::of(&["addressType"]),
                format!("{other:?} is not one of IPv4, IPv6"),
            );
            return None;
        }
    };
    let ports_path = FieldPath::of(&["ports"]);
    let mut ports = Vec::new();
    for (i, p) in slice.ports.unwrap_or_default().iter().enumerate() {
        // A port without a number means "all ports" and is only valid for selector-less
        // Services the mesh cannot route by port anyway: skipped.
        let Some(number) = p.port else { continue };
        let Some(port) = port_number(i64::from(number)) else {
            r.at(
                &ports_path.index(i).key("port"),
                format!("{number} is not a valid port (1-65535)"),
            );
            continue;
        };
        ports.push(SlicePort {
            name: p.name.clone().filter(|n| !n.is_empty()),
            port,
            protocol: p.protocol.clone().unwrap_or_else(|| "TCP".to_string()),
        });
    }
    let eps_path = FieldPath::of(&["endpoints"]);
    let mut endpoints = Vec::new();
    for (i, ep) in slice.endpoints.into_iter().enumerate() {
        let path = eps_path.index(i);
        let Some(first) = ep.addresses.first() else {
            r.at(&path.key("addresses"), "must list at least one address");
            continue;
        };
        let Some(address) = parse_ip(first, &path.key("addresses").index(0), r) else {
            continue;
        };
        if address.is_ipv6() != want_v6 {
            r.at(
                &path.key("addresses").index(0),
                format!("{address} does not match addressType {}", slice.address_type),
            );
            continue;
        }
        // Kubernetes' reading of nil conditions: ready; serving as ready; not terminating.
        let c = ep.conditions.unwrap_or_default();
        let ready = c.ready.unwrap_or(true);
        let conditions = Conditions {
            ready,
            serving: c.serving.unwrap_or(ready),
            terminating: c.terminating.unwrap_or(false),
        };
        let pod = ep.target_ref.filter(|t| t.kind.as_deref() == Some("Pod")).and_then(|t| {
            let name = t.name.filter(|n| !n.is_empty())?;
            let namespace = t.namespace.filter(|n| !n.is_empty()).unwrap_or_else(|| id.namespace.to_string());
            Some((namespace, name))
        });
        endpoints.push(SliceEndpoint {
            address,
            conditions,
            node: ep.node_name.filter(|n| !n.is_empty()),
            hostname: ep.hostname.filter(|h| !h.is_empty()),
            pod,
        });
    }
    (r.count() == before).then(|| EndpointSlice {
        namespace: id.namespace.to_string(),
        name: id.name.to_string(),
        service,
        ports,
        endpoints,
    })
}

fn parse_ip(text: &str, path: &FieldPath, r: &mut Reporter<'_>) -> Option<IpAddr> {
    match text.trim().parse() {
        Ok(ip) => Some(ip),
        Err(_) => {
            r.at(path, format!("{text:?} is not an IP address"));
            None
        }
    }
}

pub(crate) fn port_number(n: i64) -> Option<u16> {
    u16::try_from(n).ok().filter(|p| *p != 0)
}

/// A UUID-shaped FNV-1a-128 hash of `namespace/name`: stable across runs,
/// builds and Rust versions, unlike `DefaultHasher`.
pub(crate) fn derived_uid(namespace: &str, name: &str) -> String {
    const OFFSET: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    const PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013b;
    let mut hash = OFFSET;
    for byte in namespace
        .bytes()
        .chain(std::iter::once(b'/'))
        .chain(name.bytes())
    {
        hash ^= u128::from(byte);
        hash = hash.wrapping_mul(PRIME);
    }
    let h = format!("{hash:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_uid_is_stable_and_distinct() {
        let a = derived_uid("lemo-dev", "recall-0");
        assert_eq!(a, derived_uid("lemo-dev", "recall-0"));
        assert_ne!(a, derived_uid("lemo-dev", "recall-1"));
        assert_eq!(a.len(), 36);
        assert_eq!(a.matches('-').count(), 4);
    }

    #[test]
    fn port_numbers() {
        assert_eq!(port_number(0), None);
        assert_eq!(port_number(65535), Some(65535));
        assert_eq!(port_number(65536), None);
        assert_eq!(port_number(-1), None);
    }
}

/// The ports the kubelet probes (readiness, liveness and startup; HTTP, TCP and gRPC probes), a
/// named port resolved among its container's ports. A name no port carries is left out: the
/// kubelet cannot probe it either.
fn probe_ports(containers: &[k8s_openapi::api::core::v1::Container]) -> Vec<u16> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let mut ports = Vec::new();
    for c in containers {
        let probes = [&c.readiness_probe, &c.liveness_probe, &c.startup_probe];
        for probe in probes.into_iter().flatten() {
            let named = |port: &IntOrString| match port {
                IntOrString::Int(n) => port_number(i64::from(*n)),
                IntOrString::String(name) => c
                    .ports
                    .iter()
                    .flatten()
                    .find(|p| p.name.as_deref() == Some(name.as_str()))
                    .and_then(|p| port_number(i64::from(p.container_port))),
            };
            let port = [
                probe.http_get.as_ref().and_then(|h| named(&h.port)),
                probe.tcp_socket.as_ref().and_then(|t| named(&t.port)),
                probe.grpc.as_ref().and_then(|g| port_number(i64::from(g.port))),
            ];
            ports.extend(port.into_iter().flatten());
        }
    }
    ports.sort_unstable();
    ports.dedup();
    ports
}
