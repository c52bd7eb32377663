//! VirtualService `http` routes: which route a request takes, evaluated in order, first match
//! wins (Istio's semantics on Envoy).
use std::collections::BTreeMap;

use http::request::Parts;

use crate::config::{HttpMatch, HttpRoute, Pod, StringMatch, VirtualService, labels_match};

/// What the router needs to know about a request besides its headers.
pub struct RequestInfo<'a> {
    pub parts: &'a Parts,
    /// The Service port the client connected to.
    pub port: u16,
    /// The calling pod, when known.
    pub source: Option<&'a Pod>,
}

/// The route a request takes.
pub enum Selected<'a> {
    /// A VirtualService route matched.
    Route { vs: &'a VirtualService, route: &'a HttpRoute },
    /// No VirtualService applies to the Service: Istio's default route to the Service itself.
    Default,
    /// VirtualServices apply but none of their routes matched: Envoy answers 404 (NR).
    NoMatch,
}

pub fn select<'a>(virtual_services: &[&'a VirtualService], req: &RequestInfo<'_>) -> Selected<'a> {
    if virtual_services.iter().all(|vs| vs.http.is_empty()) {
        return Selected::Default;
    }
    for vs in virtual_services {
        for route in &vs.http {
            if route.matches.is_empty() || route.matches.iter().any(|m| matches(m, req)) {
                return Selected::Route { vs, route };
            }
        }
    }
    Selected::NoMatch
}

fn matches(m: &HttpMatch, req: &RequestInfo<'_>) -> bool {
    let parts = req.parts;
    if let Some(uri) = &m.uri
        && !uri.matches(parts.uri.path(), m.ignore_uri_case)
    {
        return false;
    }
    if let Some(method) = &m.method
        && !method.matches(parts.method.as_str(), false)
    {
        return false;
    }
    if let Some(scheme) = &m.scheme
        && !scheme.matches(parts.uri.scheme_str().unwrap_or("http"), false)
    {
        return false;
    }
    if let Some(authority) = &m.authority
        && !authority.matches(&authority_of(parts), false)
    {
        return false;
    }
    if m.port.is_some_and(|p| p != req.port) {
        return false;
    }
    if !m.headers.iter().all(|(name, want)| header_matches(parts, name, want)) {
        return false;
    }
    if m.without_headers.iter().any(|(name, want)| header_matches(parts, name, want)) {
        return false;
    }
    if !m.query_params.is_empty() {
        let query = query_params(parts.uri.query().unwrap_or(""));
        let ok = m.query_params.iter().all(|(name, want)| query.get(name.as_str()).is_some_and(|v| want.matches(v, false)));
        if !ok {
            return false;
        }
    }
    if !m.source_labels.is_empty() && !req.source.is_some_and(|p| labels_match(&m.source_labels, &p.labels)) {
        return false;
    }
    if let Some(ns) = &m.source_namespace
        && req.source.is_none_or(|p| &p.namespace != ns)
    {
        return false;
    }
    if !m.gateways.is_empty() && !m.gateways.iter().any(|g| g == "mesh") {
        return false;
    }
    true
}

fn authority_of(parts: &Parts) -> String {
    parts
        .uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| parts.headers.get(http::header::HOST).and_then(|h| h.to_str().ok()).map(str::to_owned))
        .unwrap_or_default()
}

fn header_matches(parts: &Parts, name: &str, want: &StringMatch) -> bool {
    // Pseudo-headers as Envoy exposes them to header matchers.
    let value = match name {
        ":authority" | "host" => Some(authority_of(parts)),
        ":method" => Some(parts.method.as_str().to_owned()),
        ":path" => Some(parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_owned()),
        _ => {
            let values: Vec<&str> = parts.headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).collect();
            (!values.is_empty()).then(|| values.join(","))
        }
    };
    value.is_some_and(|v| want.matches(&v, false))
}

fn query_params(query: &str) -> BTreeMap<&str, &str> {
    query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Cluster;

    fn cluster(vs: &str) -> Cluster {
        let base = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: demo\n---\napiVersion: v1\nkind: Service\nmetadata:\n  name: recall\n  namespace: demo\nspec:\n  clusterIP: 10.96.0.10\n  ports:\n  - name: http\n    port: 80\n";
        Cluster::from_yaml_files([("base.yaml", base), ("vs.yaml", vs)]).unwrap()
    }

    fn parts(method: &str, uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn route_name(c: &Cluster, p: &Parts) -> String {
        let svc = c.service("demo", "recall").unwrap();
        let vss = c.virtual_services_for(svc, None);
        match select(&vss, &RequestInfo { parts: p, port: 80, source: None }) {
            Selected::Route { route, .. } => route.name.clone().unwrap_or_default(),
            Selected::Default => "default".into(),
            Selected::NoMatch => "nomatch".into(),
        }
    }

    const VS: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: recall
  namespace: demo
spec:
  hosts: [recall]
  http:
  - name: canary
    match:
    - headers:
        x-canary:
          exact: "true"
    route:
    - destination: {host: recall}
  - name: regex
    match:
    - uri:
        regex: "/v[0-9]+/items"
      method:
        exact: POST
    route:
    - destination: {host: recall}
  - name: query
    match:
    - queryParams:
        debug:
          exact: "1"
    route:
    - destination: {host: recall}
  - name: prefix
    match:
    - uri:
        prefix: /api
    route:
    - destination: {host: recall}
"#;

    #[test]
    fn first_matching_route_wins() {
        let c = cluster(VS);
        assert_eq!(route_name(&c, &parts("GET", "/api/x", &[("x-canary", "true")])), "canary");
        assert_eq!(route_name(&c, &parts("GET", "/api/x", &[("x-canary", "false")])), "prefix");
        assert_eq!(route_name(&c, &parts("POST", "/v12/items", &[])), "regex");
        assert_eq!(route_name(&c, &parts("GET", "/v12/items", &[])), "nomatch");
        assert_eq!(route_name(&c, &parts("GET", "/v12/items/more", &[])), "nomatch");
        assert_eq!(route_name(&c, &parts("GET", "/x?a=2&debug=1", &[])), "query");
        assert_eq!(route_name(&c, &parts("GET", "/other", &[])), "nomatch");
    }

    #[test]
    fn a_service_without_virtual_service_takes_the_default_route() {
        let c = cluster("");
        assert_eq!(route_name(&c, &parts("GET", "/", &[])), "default");
    }

    #[test]
    fn a_virtual_service_may_name_the_vip() {
        let c = cluster(&VS.replace("hosts: [recall]", "hosts: [\"10.96.0.10\"]"));
        assert_eq!(route_name(&c, &parts("GET", "/api", &[])), "prefix");
    }
}
