//! https upstreams: verified against a configured CA, with a client certificate for mTLS, and
//! refused (502 `connect`) when the upstream's certificate is not trusted or ficus presents
//! none where one is required.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;

use crate::support::upstream::{Recorder, TestUpstream, UpstreamBehaviour};
use crate::support::{get, sample, send, Ficus};

struct Pki {
    ca_pem: String,
    server_cert: String,
    server_key: String,
    client_cert: String,
    client_key: String,
    ca: rcgen::Certificate,
}

fn pki() -> Pki {
    let ca_key = rcgen::KeyPair::generate().expect("ca key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "ficus test CA");
    let ca = ca_params.self_signed(&ca_key).expect("ca");
    let leaf = |names: Vec<String>| {
        let key = rcgen::KeyPair::generate().expect("key");
        let params = rcgen::CertificateParams::new(names).expect("params");
        let cert = params.signed_by(&key, &ca, &ca_key).expect("sign");
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf(vec!["localhost".into()]);
    let (client_cert, client_key) = leaf(vec!["ficus-client".into()]);
    Pki {
        ca_pem: ca.pem(),
        server_cert,
        server_key,
        client_cert,
        client_key,
        ca,
    }
}

/// An echo upstream behind TLS; with `client_ca`, it requires a client certificate from it.
async fn tls_upstream(pki: &Pki, require_client_cert: bool) -> (SocketAddr, Arc<Recorder>) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(pki.server_cert.as_bytes())
            .collect::<Result<_, _>>()
            .expect("certs");
    let key = PrivateKeyDer::from_pem_slice(pki.server_key.as_bytes()).expect("key");
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("versions");
    let config = if require_client_cert {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(pki.ca.der().clone()).expect("root");
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .expect("verifier");
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    }
    .with_single_cert(certs, key)
    .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));

    // The recording echo upstream listens on loopback; a TLS front relays to it.
    let echo = TestUpstream::start(UpstreamBehaviour::Echo).await;
    let recorder = echo.recorder.clone();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let echo_addr = echo.addr;
    tokio::spawn(async move {
        let _keep = echo;
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut plain) = tokio::net::TcpStream::connect(echo_addr).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    (addr, recorder)
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write pem");
    path.display().to_string()
}

fn yaml(port: u16, tls: &str) -> String {
    format!(
        "listen:\n  address: 127.0.0.1:0\nadmin:\n  address: 127.0.0.1:0\nupstreams:\n  monolith:\n    url: https://localhost:{port}\n    tls: {{ {tls} }}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstream_verified_against_configured_ca() {
    let pki = pki();
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = write(dir.path(), "ca.pem", &pki.ca_pem);
    let (addr, recorder) = tls_upstream(&pki, false).await;
    let ficus = Ficus::start_yaml(&yaml(addr.port(), &format!("ca: {ca}"))).await;
    let (status, body) = get(ficus.addr, "/orders/1").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(recorder.requests()[0].uri, "/orders/1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstream_with_untrusted_certificate_is_502_connect() {
    let pki = pki();
    let other = self::pki();
    let dir = tempfile::tempdir().expect("tempdir");
    let wrong_ca = write(dir.path(), "ca.pem", &other.ca_pem);
    let (addr, recorder) = tls_upstream(&pki, false).await;
    let ficus = Ficus::start_yaml(&yaml(addr.port(), &format!("ca: {wrong_ca}"))).await;
    let (status, body) = get(ficus.addr, "/").await;
    assert_eq!(status, 502, "{body}");
    assert!(recorder.requests().is_empty());
    let m = ficus.metrics().await;
    assert_eq!(
        sample(
            &m,
            "ficus_upstream_errors_total",
            &[("upstream", "monolith"), ("kind", "connect")]
        ),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_upstream_gets_the_configured_client_certificate() {
    let pki = pki();
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = write(dir.path(), "ca.pem", &pki.ca_pem);
    let cert = write(dir.path(), "client.pem", &pki.client_cert);
    let key = write(dir.path(), "client.key", &pki.client_key);
    let (addr, recorder) = tls_upstream(&pki, true).await;

    let with_cert = Ficus::start_yaml(&yaml(
        addr.port(),
        &format!("ca: {ca}, cert: {cert}, key: {key}"),
    ))
    .await;
    assert_eq!(get(with_cert.addr, "/mtls").await.0, 200);
    assert_eq!(recorder.requests().len(), 1);

    let without = Ficus::start_yaml(&yaml(addr.port(), &format!("ca: {ca}"))).await;
    assert_eq!(get(without.addr, "/mtls").await.0, 502);
    assert_eq!(
        recorder.requests().len(),
        1,
        "no client certificate, no request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_tls_files_stop_start_up_with_a_clear_error() {
    let config = ficus::Config::from_yaml(&yaml(1, "ca: /nonexistent/ca.pem"), "t.yaml")
        .expect("valid syntax");
    let error = ficus::App::new(config, prometheus::Registry::new())
        .err()
        .expect("start-up fails");
    let text = error.to_string();
    assert!(
        text.contains("upstream `monolith`") && text.contains("/nonexistent/ca.pem"),
        "{text}"
    );
}

/// Point 1 of the routing issue end to end: a route hands its requests to a serverless-style
/// https endpoint over mutual TLS, with the function's own `Host` and its path prefix, while
/// everything else stays on the plain-http monolith.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_takes_over_to_an_mtls_function_with_its_host_and_prefix() {
    let pki = pki();
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = write(dir.path(), "ca.pem", &pki.ca_pem);
    let cert = write(dir.path(), "client.pem", &pki.client_cert);
    let key = write(dir.path(), "client.key", &pki.client_key);
    let (addr, function) = tls_upstream(&pki, true).await;
    let monolith = TestUpstream::echo().await;
    let config = format!(
        "listen:\n  address: 127.0.0.1:0\nadmin:\n  address: 127.0.0.1:0\nupstreams:\n  monolith: {{ url: \"http://{}\" }}\n  orders-fn:\n    url: https://localhost:{}\n    rewrite_host: true\n    tls: {{ ca: {ca}, cert: {cert}, key: {key} }}\ndefault_upstream: monolith\nroutes:\n  - name: orders\n    match: {{ method: GET, path: \"/api/orders/{{*rest}}\", headers: {{ x-canary: \"1\" }} }}\n    upstream: orders-fn\n    strip_prefix: /api\n    add_prefix: /fn\n",
        monolith.addr,
        addr.port()
    );
    let ficus = Ficus::start_yaml(&config).await;
    let request = |canary: bool| {
        let mut b = http::Request::get("/api/orders/7?full=1").header("host", "shop.example");
        if canary {
            b = b.header("x-canary", "1");
        }
        b.body(http_body_util::Full::new(bytes::Bytes::new()))
            .expect("request")
    };
    assert_eq!(send(ficus.addr, request(true)).await.status(), 200);
    assert_eq!(send(ficus.addr, request(false)).await.status(), 200);

    let at_function = function.requests();
    assert_eq!(
        at_function.len(),
        1,
        "only the canary request went to the function"
    );
    assert_eq!(at_function[0].uri, "/fn/orders/7?full=1");
    assert_eq!(
        at_function[0].header("host").as_deref(),
        Some(format!("localhost:{}", addr.port()).as_str()),
        "the function's own host"
    );
    assert_eq!(
        at_function[0].header("x-forwarded-host").as_deref(),
        Some("shop.example")
    );
    let at_monolith = monolith.requests();
    assert_eq!(at_monolith.len(), 1);
    assert_eq!(
        at_monolith[0].uri, "/api/orders/7?full=1",
        "unrouted: unchanged"
    );
    assert_eq!(
        at_monolith[0].header("host").as_deref(),
        Some("shop.example")
    );
    let m = ficus.metrics().await;
    assert_eq!(
        sample(&m, "ficus_requests_total", &[("route", "orders")]),
        Some(1.0)
    );
}
