//! Entry points of the fuzz targets (`fuzz/`, `cargo xtask fuzz`): each takes arbitrary bytes
//! and drives one parser the network or a config file can reach, through the same code the
//! daemon runs. They must never panic; a finding becomes a regression test where the parser
//! lives. Not an API.

use std::sync::LazyLock;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::AsyncWriteExt as _;

use crate::config::{Cluster, TunnelMode};

/// Config decoding: the input as one YAML file of any kinds, through the public loader, in both
/// tunnel modes (plaintext tunnels make identity-based policy a validation error).
pub fn config_yaml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    for mode in [TunnelMode::MutualTls, TunnelMode::Plaintext] {
        if let Ok(cluster) = Cluster::from_yaml_files_in([("fuzz.yaml", text)], mode) {
            // What the daemon reads right after a load.
            let _ = cluster.warnings().len();
            for svc in cluster.services() {
                let _ = cluster.virtual_services_for(svc, None);
                let _ = cluster.destination_rule_for(svc, None);
                for port in &svc.ports {
                    let _ = cluster.endpoints(svc, port.port);
                    let _ = crate::protocol::for_port(port);
                }
            }
        }
    }
}

/// Protocol sniffing: every prefix of the input, as the listener sees it arrive, plus the input
/// as a port name and an `appProtocol`.
pub fn sniff(data: &[u8]) {
    use crate::protocol::{Protocol, classify};
    let seen = &data[..data.len().min(16)];
    // Empty means the connection closed (TCP); otherwise, once decided, more bytes never
    // change the answer.
    assert_eq!(classify(b""), Some(Protocol::Tcp));
    for end in 1..=seen.len() {
        if let Some(decided) = classify(&seen[..end]) {
            for longer in end..=seen.len() {
                assert_eq!(classify(&seen[..longer]), Some(decided), "{:?} then {:?}", &seen[..end], &seen[..longer]);
            }
            break;
        }
    }
    if let Ok(name) = std::str::from_utf8(data) {
        let mut port = crate::config::ServicePort {
            name: Some(name.to_owned()),
            port: 80,
            target_port: crate::config::TargetPort::Number(80),
            protocol: "TCP".into(),
            app_protocol: None,
        };
        let _ = crate::protocol::for_port(&port);
        port.app_protocol = Some(name.to_owned());
        let _ = crate::protocol::for_port(&port);
    }
}

/// Routes on `bff` with every kind of match, a redirect, rewrites and header rules, so the
/// HTTP/1 target reaches all of the router.
const FUZZ_ROUTES: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  namespace: lemo-dev
  name: bff
spec:
  hosts: [bff]
  http:
    - name: old
      match:
        - uri: {prefix: /old/}
          method: {exact: GET}
      redirect: {uri: /new/, authority: bff.lemo-dev, redirectCode: 301}
    - name: api
      match:
        - uri: {regex: "/api/v[0-9]+/.*"}
          headers:
            x-user: {prefix: "a"}
          queryParams:
            debug: {exact: "1"}
          ignoreUriCase: true
        - authority: {exact: bff.lemo-dev}
          withoutHeaders:
            x-skip: {exact: "yes"}
      rewrite: {uri: /v2/, authority: bff-v2}
      headers:
        request:
          set: {x-route: api}
          add: {x-seen: "1"}
          remove: [x-remove]
      route:
        - destination: {host: bff}
    - name: rest
      match:
        - uri: {exact: /}
        - uri: {prefix: /static}
          port: 80
      route:
        - destination: {host: bff}
"#;

/// The cluster of deploy/examples/lemo-dev, whose VirtualServices and DestinationRules the
/// HTTP/1 target routes through.
static LEMO_DEV: LazyLock<Cluster> = LazyLock::new(|| {
    Cluster::from_yaml_files([
        ("cluster.yaml", include_str!("../../deploy/examples/lemo-dev/cluster.yaml")),
        ("destination-rules.yaml", include_str!("../../deploy/examples/lemo-dev/destination-rules.yaml")),
        ("virtual-services.yaml", include_str!("../../deploy/examples/lemo-dev/virtual-services.yaml")),
        ("authorization-policy.yaml", include_str!("../../deploy/examples/lemo-dev/authorization-policy.yaml")),
        ("peer-authentication.yaml", include_str!("../../deploy/examples/lemo-dev/peer-authentication.yaml")),
        ("fuzz-routes.yaml", FUZZ_ROUTES),
    ])
    .expect("the lemo-dev example loads")
});

static RUNTIME: LazyLock<tokio::runtime::Runtime> =
    LazyLock::new(|| tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime"));

/// Serves `data` as the bytes of one downstream connection to `service` with the server the
/// handler runs under, and returns when the connection ends (or after a short bound).
fn serve_bytes<F, Fut>(data: &[u8], handler: F)
where
    F: Fn(hyper::Request<hyper::body::Incoming>) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = hyper::Response<Full<Bytes>>> + Send + 'static,
{
    let data = data.to_vec();
    RUNTIME.block_on(async move {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let service = service_fn(move |req| {
            let handler = handler.clone();
            async move { Ok::<_, std::convert::Infallible>(handler(req).await) }
        });
        let conn = async move {
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let _ = builder.serve_connection_with_upgrades(TokioIo::new(server), service).await;
        };
        let feed = async move {
            let _ = client.write_all(&data).await;
            let _ = client.shutdown().await;
            // Drain the answers so the server never blocks on a full pipe.
            let mut sink = tokio::io::sink();
            let _ = tokio::io::copy(&mut client, &mut sink).await;
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), async { tokio::join!(conn, feed) }).await;
    });
}

/// HTTP/1 request parsing on the proxy path: the bytes of a downstream connection to
/// `recall.lemo-dev:8081` (and as if to `bff.lemo-dev:80`), parsed by hyper as the outbound listener configures it, each request
/// head then routed as the proxy does (VirtualService match, redirect, rewrite, header rules).
pub fn http1_request(data: &[u8]) {
    serve_bytes(data, |req: hyper::Request<hyper::body::Incoming>| async move {
        let (mut parts, body) = req.into_parts();
        let mut for_bff = http::request::Parts::clone(&parts);
        let _ = crate::http::fuzz_hooks::request_head(&LEMO_DEV, "lemo-dev", "bff", 80, &mut for_bff);
        let status = crate::http::fuzz_hooks::request_head(&LEMO_DEV, "lemo-dev", "recall", 8081, &mut parts);
        // Bounded, as the replay buffer is.
        let _ = http_body_util::Limited::new(body, 64 * 1024).collect().await;
        let mut res = hyper::Response::new(Full::new(Bytes::new()));
        *res.status_mut() = hyper::StatusCode::from_u16(status.unwrap_or(200)).unwrap_or(hyper::StatusCode::OK);
        res
    });
}

/// The HBONE CONNECT request of a tunnel: the input is `authority \n forwarded \n sni`; the
/// authority is read as the inbound listener reads `:authority`, the `Forwarded` header and
/// the TLS server name (the identity asked for) as they are.
pub fn hbone_connect(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(3, '\n');
    let (authority, forwarded, sni) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if let Ok(authority) = authority.parse::<http::uri::Authority>() {
        let target = crate::tunnel::connect_target(Some(&authority));
        if let Some(target) = target {
            // Formatting it back gives a CONNECT the client side would send.
            let again: http::uri::Authority = target.to_string().parse().expect("a socket address is an authority");
            assert_eq!(crate::tunnel::connect_target(Some(&again)), Some(target));
        }
    }
    if let Ok(uri) = format!("http://{authority}/").parse::<http::Uri>() {
        let _ = crate::tunnel::connect_target(uri.authority());
    }
    let _ = crate::tunnel::forwarded_source(forwarded);
    let held = [crate::identity::Identity::in_default_domain("lemo-dev", "recall")];
    if let Ok(id) = crate::identity::identity_from_sni(Some(sni), "cluster.local", || held.to_vec()) {
        // An identity read from a name maps back to a name that reads as it.
        let name = crate::identity::sni_for(&id).expect("a parsed identity has a name");
        let back = crate::identity::identity_from_sni(Some(&name), "cluster.local", || vec![id.clone()]).expect("round trip");
        assert_eq!(back, id);
    }
}

static SIGNER: LazyLock<crate::ca::CaSigner> =
    LazyLock::new(|| crate::ca::CaSigner::generate("cluster.local").expect("throwaway CA"));

/// The CA's CSR path: the first byte picks PEM text as given, or the rest as DER wrapped in
/// PEM (to reach the ASN.1 and the key policy directly); signed for any identity the node
/// would be allowed.
pub fn csr(data: &[u8]) {
    let Some((mode, rest)) = data.split_first() else { return };
    let pem = if mode % 2 == 0 {
        String::from_utf8_lossy(rest).into_owned()
    } else {
        pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", rest.to_vec()))
    };
    if let Ok(chain) = SIGNER.sign_csr(&pem, |id| id.namespace != "forbidden", Duration::from_secs(60)) {
        assert_eq!(chain.len(), 2, "leaf and root");
    }
}

/// The admin API's request parsing: the bytes of one connection to the admin port, parsed by
/// hyper's HTTP/1 server as the admin listener runs it, each request read into an
/// [`crate::admin::AdminRequest`] (log levels checked as `POST /log_level` would).
pub fn admin_request(data: &[u8]) {
    serve_bytes(data, |req: hyper::Request<hyper::body::Incoming>| async move {
        let (parts, body) = req.into_parts();
        let body = http_body_util::Limited::new(body, 64 * 1024).collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let parsed = crate::admin::AdminRequest::parse(&parts.method, parts.uri.path(), parts.uri.query().unwrap_or(""), &body);
        if let crate::admin::AdminRequest::SetLogLevel(level) = &parsed {
            let _ = crate::admin::check_log_level(level);
        }
        hyper::Response::new(Full::new(Bytes::from(format!("{parsed:?}"))))
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every target on the committed corpus' kind of input, so a broken entry point shows up
    /// in `cargo test` rather than only under the fuzzer.
    #[test]
    fn fuzz_entry_points_run_on_sample_inputs() {
        config_yaml(include_bytes!("../../deploy/examples/lemo-dev/virtual-services.yaml"));
        config_yaml(b"kind: [");
        sniff(b"GET / HTTP/1.1\r\n");
        sniff(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        sniff(b"\x16\x03\x01");
        http1_request(b"GET /api/v1/recall HTTP/1.1\r\nHost: recall\r\nx-canary: true\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc");
        hbone_connect(b"10.244.1.5:8080\nfor=\"[fd00::1]:4000\"\nrecall.lemo-dev.identity.mesh");
        csr(&[0]);
        csr(format!("\0{}", crate::identity::new_csr(&crate::identity::Identity::in_default_domain("demo", "a")).expect("csr").csr_pem).as_bytes());
        admin_request(b"POST /log_level?level=mesh_node%3Ddebug HTTP/1.1\r\nContent-Length: 0\r\n\r\nGET /endpoints?service=lemo-dev/recall HTTP/1.1\r\n\r\n");
    }
}
