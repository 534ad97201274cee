//! SPEC §3 transparency: each case is sent directly to a real upstream and through ficus, and
//! what the upstream saw and what the client got are compared. The only differences allowed
//! are the ones a proxy must make.

use bytes::Bytes;
use http::header::HeaderValue;
use http::{Method, Request};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;

use crate::support::upstream::{full, Seen};
use crate::support::{self, send, Ficus, TestUpstream};

/// Fields ficus adds on the way to the upstream.
const ADDED: [&str; 4] = [
    "via",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
];

struct Case {
    name: &'static str,
    method: &'static str,
    path: &'static str,
    headers: Vec<(&'static str, HeaderValue)>,
    body: Vec<u8>,
    /// Sent as a stream of unknown length (chunked on the wire).
    chunked: bool,
}

fn case(name: &'static str, method: &'static str, path: &'static str) -> Case {
    Case {
        name,
        method,
        path,
        headers: vec![("host", HeaderValue::from_static("shop.example"))],
        body: Vec::new(),
        chunked: false,
    }
}

impl Case {
    fn header(mut self, name: &'static str, value: &'static [u8]) -> Self {
        self.headers
            .push((name, HeaderValue::from_bytes(value).expect("header value")));
        self
    }

    fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    fn chunked(mut self) -> Self {
        self.chunked = true;
        self
    }
}

fn cases() -> Vec<Case> {
    let all_bytes: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    vec![
        case(
            "get with query",
            "GET",
            "/orders?id=1&name=a%20b&empty=&flag",
        ),
        case("path not normalised", "GET", "/a%2Fb/../c/./d//e?x=%2F"),
        case("post json", "POST", "/orders")
            .header("content-type", b"application/json")
            .body(r#"{"customer_id":"c-1","total":12.5}"#),
        case("put binary body", "PUT", "/blobs/1")
            .header("content-type", b"application/octet-stream")
            .body(all_bytes.clone()),
        case("chunked request body", "POST", "/upload")
            .body(all_bytes)
            .chunked(),
        case("delete", "DELETE", "/orders/7"),
        case("patch", "PATCH", "/orders/7")
            .header("content-type", b"application/merge-patch+json")
            .body(r#"{"total":1}"#),
        case("head", "HEAD", "/orders"),
        case("options", "OPTIONS", "/orders"),
        case("extension method", "PURGE", "/cache/x"),
        case("empty post", "POST", "/ping").header("content-length", b"0"),
        case("repeated and odd headers", "GET", "/h")
            .header("x-multi", b"one")
            .header("x-multi", b"two")
            .header("x-latin1", b"caf\xe9")
            .header("x-spaces", b"a  b\tc")
            .header("accept", b"*/*"),
        case("credentials pass untouched", "GET", "/me")
            .header("authorization", b"Bearer secret-token")
            .header("cookie", b"session=abc; theme=dark"),
        case("big header", "GET", "/big").header(
            "x-big",
            Box::leak("v".repeat(16 * 1024).into_boxed_str()).as_bytes(),
        ),
    ]
}

fn request(
    c: &Case,
) -> Request<http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>> {
    let mut builder = Request::builder()
        .method(Method::from_bytes(c.method.as_bytes()).expect("method"))
        .uri(c.path);
    for (name, value) in &c.headers {
        builder = builder.header(*name, value.clone());
    }
    let body = if c.chunked {
        let chunks: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = c
            .body
            .chunks(10_000)
            .map(|ch| Ok(Frame::data(Bytes::copy_from_slice(ch))))
            .collect();
        StreamBody::new(futures_util::stream::iter(chunks)).boxed()
    } else {
        Full::new(Bytes::from(c.body.clone())).boxed()
    };
    builder.body(body).expect("request")
}

struct Outcome {
    seen: Seen,
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: Bytes,
}

async fn run(addr: std::net::SocketAddr, upstream: &TestUpstream, c: &Case) -> Outcome {
    let before = upstream.requests().len();
    let response = support::send_streaming(addr, request(c)).await;
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    let seen = upstream.requests();
    assert_eq!(
        seen.len(),
        before + 1,
        "{}: upstream saw one request",
        c.name
    );
    Outcome {
        seen: seen[before].clone(),
        status: parts.status.as_u16(),
        headers: parts
            .headers
            .iter()
            .filter(|(n, _)| n.as_str() != "date")
            .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
            .collect(),
        body,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transparency_table_direct_versus_through_ficus() {
    let upstream = TestUpstream::echo().await;
    let ficus = Ficus::start(upstream.addr, "").await;
    for c in cases() {
        let direct = run(upstream.addr, &upstream, &c).await;
        let proxied = run(ficus.addr, &upstream, &c).await;
        let name = c.name;

        assert_eq!(proxied.seen.method, direct.seen.method, "{name}: method");
        assert_eq!(proxied.seen.uri, direct.seen.uri, "{name}: path and query");
        assert_eq!(proxied.seen.body, direct.seen.body, "{name}: body bytes");
        let without_added: Vec<_> = proxied
            .seen
            .headers
            .iter()
            .filter(|(n, _)| !ADDED.contains(&n.as_str()))
            .cloned()
            .collect();
        assert_eq!(
            without_added, direct.seen.headers,
            "{name}: request headers"
        );
        assert_eq!(
            proxied.seen.header("via").as_deref(),
            Some("1.1 ficus"),
            "{name}"
        );
        assert_eq!(
            proxied.seen.header("x-forwarded-for").as_deref(),
            Some("127.0.0.1"),
            "{name}"
        );
        assert_eq!(
            proxied.seen.header("x-forwarded-proto").as_deref(),
            Some("http"),
            "{name}"
        );
        assert_eq!(
            proxied.seen.header("x-forwarded-host").as_deref(),
            Some("shop.example"),
            "{name}"
        );
        assert_eq!(
            proxied.seen.header("host").as_deref(),
            Some("shop.example"),
            "{name}: Host kept"
        );

        assert_eq!(proxied.status, direct.status, "{name}: status");
        assert_eq!(proxied.headers, direct.headers, "{name}: response headers");
        assert_eq!(proxied.body, direct.body, "{name}: response body");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_fields_stop_at_ficus_both_ways() {
    let upstream = TestUpstream::with(|req, rec| async move {
        crate::support::upstream::record(req, &rec).await;
        http::Response::builder()
            .header("connection", "x-resp-hop")
            .header("x-resp-hop", "secret")
            .header("keep-alive", "timeout=5")
            .header("proxy-connection", "keep-alive")
            .header("x-end-to-end", "kept")
            .body(full("ok"))
            .expect("response")
    })
    .await;
    let ficus = Ficus::start(upstream.addr, "").await;
    let req = Request::get("/hop")
        .header("host", "a")
        .header("connection", "x-req-hop, keep-alive")
        .header("x-req-hop", "1")
        .header("keep-alive", "timeout=5")
        .header("proxy-connection", "keep-alive")
        .header("te", "gzip")
        .header("upgrade", "h2c-but-not-named-in-connection")
        .header("x-end-to-end", "kept")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = send(ficus.addr, req).await;
    assert_eq!(resp.status(), 200);
    let seen = &upstream.requests()[0];
    for gone in [
        "x-req-hop",
        "keep-alive",
        "proxy-connection",
        "te",
        "upgrade",
    ] {
        assert_eq!(
            seen.header(gone),
            None,
            "{gone} must not reach the upstream"
        );
    }
    assert_eq!(seen.header("x-end-to-end").as_deref(), Some("kept"));
    for gone in ["x-resp-hop", "keep-alive", "proxy-connection"] {
        assert!(
            resp.headers().get(gone).is_none(),
            "{gone} must not reach the client"
        );
    }
    assert_eq!(resp.headers()["x-end-to-end"], "kept");
    assert_eq!(resp.body(), "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_fields_kept_from_a_trusted_ingress() {
    let upstream = TestUpstream::echo().await;
    let ficus = Ficus::start(upstream.addr, "").await;
    let req = Request::get("/x")
        .header("host", "internal:8080")
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-forwarded-for", "10.0.0.2")
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-host", "shop.example.com")
        .header("via", "1.1 ingress")
        .body(Full::new(Bytes::new()))
        .expect("request");
    assert_eq!(send(ficus.addr, req).await.status(), 200);
    let seen = &upstream.requests()[0];
    assert_eq!(
        seen.header("x-forwarded-for").as_deref(),
        Some("203.0.113.7, 10.0.0.2, 127.0.0.1")
    );
    assert_eq!(seen.header("x-forwarded-proto").as_deref(), Some("https"));
    assert_eq!(
        seen.header("x-forwarded-host").as_deref(),
        Some("shop.example.com")
    );
    assert_eq!(
        seen.header("via").as_deref(),
        Some("1.1 ingress, 1.1 ficus")
    );
    assert_eq!(seen.header("host").as_deref(), Some("internal:8080"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_fields_replaced_when_not_trusted() {
    let upstream = TestUpstream::echo().await;
    let yaml = format!(
        "listen:\n  address: 127.0.0.1:0\n  trust_forwarded_headers: false\nadmin:\n  address: 127.0.0.1:0\nupstreams:\n  monolith:\n    url: http://{}\n",
        upstream.addr
    );
    let ficus = Ficus::start_yaml(&yaml).await;
    let req = Request::get("/x")
        .header("host", "internal:8080")
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-host", "spoofed.example")
        .body(Full::new(Bytes::new()))
        .expect("request");
    assert_eq!(send(ficus.addr, req).await.status(), 200);
    let seen = &upstream.requests()[0];
    assert_eq!(seen.header("x-forwarded-for").as_deref(), Some("127.0.0.1"));
    assert_eq!(seen.header("x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(
        seen.header("x-forwarded-host").as_deref(),
        Some("internal:8080")
    );
}
