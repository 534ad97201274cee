//! SPEC §3, protocols: HTTP/2 clients (h2c prior knowledge, h2 by ALPN over TLS) reaching an
//! HTTP/1.1 upstream, TLS certificate reload, WebSocket upgrades, `Expect: 100-continue`,
//! chunked bodies with trailers, and large bodies over HTTP/2. Every upstream is a real server
//! on an ephemeral port; ficus runs in-process.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, Stream, StreamExt};
use http::header::HeaderValue;
use http::{HeaderMap, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;

use crate::support::upstream::{full, record, Body, Recorder};
use crate::support::{eventually, Ficus, TestUpstream, WAIT};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type FrameResult = Result<Frame<Bytes>, BoxError>;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// An HTTP/2 connection with prior knowledge (h2c) over any byte stream.
async fn h2_handshake<T, B>(io: T) -> hyper::client::conn::http2::SendRequest<B>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    B: hyper::body::Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .expect("HTTP/2 handshake with ficus");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender
}

async fn h2c_client<B>(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<B>
where
    B: hyper::body::Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let tcp = TcpStream::connect(addr).await.expect("connect to ficus");
    h2_handshake(tcp).await
}

/// A body fed by the test frame by frame, so a test decides when each chunk exists.
fn channel_body(
    capacity: usize,
) -> (
    mpsc::Sender<FrameResult>,
    StreamBody<impl Stream<Item = FrameResult> + Send + Unpin + 'static>,
) {
    let (tx, rx) = mpsc::channel::<FrameResult>(capacity);
    let stream = Box::pin(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }));
    (tx, StreamBody::new(stream))
}

/// Deterministic, non-periodic bytes (xorshift), so a reordered or duplicated chunk changes
/// the checksum.
fn pattern(len: usize, seed: u64) -> Bytes {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    Bytes::from(out)
}

/// FNV-1a, 64 bit: enough to tell two bodies apart in an assertion message.
fn checksum(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Reads the next body frame, failing the test if none arrives within [`WAIT`].
async fn next_frame(body: &mut Incoming, what: &str) -> Option<Frame<Bytes>> {
    tokio::time::timeout(WAIT, body.frame())
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .map(|f| f.expect("body frame"))
}

/// Reads data frames until exactly `len` bytes arrived.
async fn read_data(body: &mut Incoming, len: usize, what: &str) -> Bytes {
    let mut got = BytesMut::new();
    while got.len() < len {
        let frame = next_frame(body, what)
            .await
            .unwrap_or_else(|| panic!("body ended before {what}"));
        let data = frame
            .into_data()
            .unwrap_or_else(|_| panic!("a non-data frame before {what}"));
        got.extend_from_slice(&data);
    }
    assert_eq!(got.len(), len, "{what}: more bytes than sent");
    got.freeze()
}

/// An upstream that records each request (and its HTTP version) and answers 200 with the
/// request body, `x-upstream: echo` and two `Set-Cookie` fields.
async fn versioned_echo() -> (TestUpstream, Arc<Mutex<Vec<Version>>>) {
    let versions = Arc::new(Mutex::new(Vec::new()));
    let seen_versions = versions.clone();
    let upstream = TestUpstream::with(move |req: Request<Incoming>, rec: Arc<Recorder>| {
        let versions = seen_versions.clone();
        async move {
            versions.lock().expect("lock").push(req.version());
            let seen = record(req, &rec).await;
            Response::builder()
                .header("content-type", "application/octet-stream")
                .header("x-upstream", "echo")
                .header("set-cookie", "a=1")
                .header("set-cookie", "b=2")
                .body(full(seen.body))
                .expect("response")
        }
    })
    .await;
    (upstream, versions)
}

// ---- TLS helpers ----------------------------------------------------------------------------

pub(crate) struct TestCert {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: CertificateDer<'static>,
}

/// A self-signed certificate for `localhost` and 127.0.0.1 with its own key, common name and
/// serial number.
pub(crate) fn make_cert(common_name: &str, serial: u64) -> TestCert {
    let key = rcgen::KeyPair::generate().expect("generate key pair");
    let mut params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("certificate params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, common_name);
    params.serial_number = Some(rcgen::SerialNumber::from(serial));
    let cert = params.self_signed(&key).expect("self-sign certificate");
    TestCert {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        der: cert.der().clone(),
    }
}

pub(crate) fn tls_yaml(upstream: SocketAddr, cert: &Path, key: &Path) -> String {
    format!(
        "listen:\n  address: 127.0.0.1:0\n  tls:\n    cert: \"{}\"\n    key: \"{}\"\nadmin:\n  address: 127.0.0.1:0\nupstreams:\n  monolith:\n    url: http://{upstream}\n",
        cert.display(),
        key.display()
    )
}

pub(crate) fn write_pair(dir: &Path, cert: &TestCert) -> (PathBuf, PathBuf) {
    let cert_path = dir.join("tls.crt");
    let key_path = dir.join("tls.key");
    std::fs::write(&cert_path, &cert.cert_pem).expect("write certificate");
    std::fs::write(&key_path, &cert.key_pem).expect("write key");
    (cert_path, key_path)
}

pub(crate) fn tls_connector(
    trusted: &[&CertificateDer<'static>],
    alpn: &[&[u8]],
) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in trusted {
        roots.add((*cert).clone()).expect("trust test certificate");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // Every connection is a full handshake: a resumed session would report the certificate
    // of the session it resumes, not the one ficus serves now.
    config.resumption = rustls::client::Resumption::disabled();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

pub(crate) async fn tls_connect(
    connector: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    connector
        .connect(ServerName::try_from("localhost").expect("server name"), tcp)
        .await
}

pub(crate) fn presented_cert(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .expect("server presented a certificate")
        .clone()
}

// ---------------------------------------------------------------------------------------------
// 1. h2c prior knowledge to an HTTP/1.1 upstream
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge_reaches_http1_upstream_unchanged() {
    let (upstream, versions) = versioned_echo().await;
    let ficus = Ficus::start(upstream.addr, "").await;
    let mut client = h2c_client::<Full<Bytes>>(ficus.addr).await;

    let authority = format!("shop.example:{}", ficus.addr.port());
    let req = Request::post(format!("http://{authority}/orders/42?expand=items&x=%20y"))
        .header("x-custom", "kept")
        .header("content-type", "application/json")
        // HTTP/2 sends each cookie in a field of its own (RFC 9113 section 8.2.3).
        .header("cookie", "session=s1")
        .header("cookie", "theme=dark")
        .body(Full::new(Bytes::from_static(b"{\"total\":12}")))
        .expect("request");
    let resp = client.send_request(req).await.expect("response over h2c");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.version(),
        Version::HTTP_2,
        "client spoke HTTP/2 to ficus"
    );
    assert_eq!(resp.headers()["x-upstream"], "echo");
    let cookies: Vec<&HeaderValue> = resp.headers().get_all("set-cookie").iter().collect();
    assert_eq!(cookies, ["a=1", "b=2"], "both Set-Cookie fields arrive");
    let body = resp
        .into_body()
        .collect()
        .await
        .expect("response body")
        .to_bytes();
    assert_eq!(&body[..], b"{\"total\":12}");

    let versions = versions.lock().expect("lock").clone();
    assert_eq!(versions, [Version::HTTP_11], "the upstream saw HTTP/1.1");
    let seen = upstream.requests();
    assert_eq!(seen.len(), 1);
    let seen = &seen[0];
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.uri, "/orders/42?expand=items&x=%20y");
    assert_eq!(seen.body, b"{\"total\":12}");
    assert_eq!(seen.header("host").as_deref(), Some(authority.as_str()));
    assert_eq!(seen.header("x-custom").as_deref(), Some("kept"));
    assert_eq!(
        seen.header("content-type").as_deref(),
        Some("application/json")
    );
    let cookies: Vec<&[u8]> = seen
        .headers
        .iter()
        .filter(|(n, _)| n == "cookie")
        .map(|(_, v)| v.as_slice())
        .collect();
    assert_eq!(
        cookies,
        [b"session=s1; theme=dark".as_slice()],
        "HTTP/1.1 gets one cookie field"
    );
    assert_eq!(seen.header("via").as_deref(), Some("1.1 ficus"));
    assert_eq!(seen.header("x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(
        seen.header("x-forwarded-host").as_deref(),
        Some(authority.as_str())
    );
    assert_eq!(seen.header("x-forwarded-for").as_deref(), Some("127.0.0.1"));
    assert_eq!(
        seen.headers.iter().filter(|(n, _)| n == "host").count(),
        1,
        "exactly one Host"
    );
}

/// RFC 9113 section 8.3.1: an intermediary forwarding to HTTP/1.1 uses `:authority` as `Host`,
/// replacing a `host` field the client also sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_authority_replaces_a_host_field_the_client_also_sent() {
    let (upstream, _) = versioned_echo().await;
    let ficus = Ficus::start(upstream.addr, "").await;
    let mut client = h2c_client::<Full<Bytes>>(ficus.addr).await;
    let req = Request::get("http://auth.example/orders")
        .header("host", "other.example")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = client.send_request(req).await.expect("response over h2c");
    assert_eq!(resp.status(), StatusCode::OK);
    let seen = upstream.requests();
    let seen = seen.last().expect("forwarded");
    let hosts: Vec<&[u8]> = seen
        .headers
        .iter()
        .filter(|(n, _)| n == "host")
        .map(|(_, v)| v.as_slice())
        .collect();
    assert_eq!(hosts, [b"auth.example".as_slice()]);
    assert_eq!(
        seen.header("x-forwarded-host").as_deref(),
        Some("auth.example")
    );
}

// ---------------------------------------------------------------------------------------------
// 2. h2 over TLS by ALPN, and HTTP/1.1 over TLS
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_alpn_negotiates_h2_and_http1() {
    let (upstream, versions) = versioned_echo().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = make_cert("ficus-test", 1);
    let (cert_path, key_path) = write_pair(dir.path(), &cert);
    let ficus = Ficus::start_yaml(&tls_yaml(upstream.addr, &cert_path, &key_path)).await;

    // A client offering both protocols gets h2.
    let both = tls_connector(&[&cert.der], &[b"h2", b"http/1.1"]);
    let stream = tls_connect(&both, ficus.addr).await.expect("TLS handshake");
    assert_eq!(
        stream.get_ref().1.alpn_protocol(),
        Some(&b"h2"[..]),
        "ficus prefers h2 by ALPN"
    );
    assert_eq!(presented_cert(&stream), cert.der);
    let mut h2 = h2_handshake::<_, Full<Bytes>>(stream).await;
    let req = Request::post(format!(
        "https://localhost:{}/secure/h2?q=1",
        ficus.addr.port()
    ))
    .body(Full::new(Bytes::from_static(b"over h2")))
    .expect("request");
    let resp = h2.send_request(req).await.expect("h2 response");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.version(), Version::HTTP_2);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(&body[..], b"over h2");

    // A client offering only HTTP/1.1 gets HTTP/1.1.
    let h1_only = tls_connector(&[&cert.der], &[b"http/1.1"]);
    let stream = tls_connect(&h1_only, ficus.addr)
        .await
        .expect("TLS handshake");
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut h1, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("HTTP/1.1 handshake over TLS");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = Request::post("/secure/h1")
        .header("host", format!("localhost:{}", ficus.addr.port()))
        .body(Full::new(Bytes::from_static(b"over http/1.1")))
        .expect("request");
    let resp = h1.send_request(req).await.expect("HTTP/1.1 response");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.version(), Version::HTTP_11);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(&body[..], b"over http/1.1");

    let seen = upstream.requests();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].method, "POST");
    assert_eq!(seen[0].uri, "/secure/h2?q=1");
    assert_eq!(seen[0].body, b"over h2");
    assert_eq!(
        seen[0].header("host"),
        Some(format!("localhost:{}", ficus.addr.port()))
    );
    assert_eq!(seen[1].uri, "/secure/h1");
    assert_eq!(seen[1].body, b"over http/1.1");
    for s in &seen {
        assert_eq!(s.header("x-forwarded-proto").as_deref(), Some("https"));
        assert_eq!(s.header("via").as_deref(), Some("1.1 ficus"));
    }
    assert_eq!(
        versions.lock().expect("lock").clone(),
        [Version::HTTP_11, Version::HTTP_11],
        "the upstream saw HTTP/1.1 both times"
    );
}

// ---------------------------------------------------------------------------------------------
// 3. TLS certificate reload
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_certificate_files_are_reloaded_when_replaced() {
    let upstream = TestUpstream::echo().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let first = make_cert("ficus-first", 1);
    let second = make_cert("ficus-second", 2);
    assert_ne!(first.der, second.der);
    let (cert_path, key_path) = write_pair(dir.path(), &first);
    let ficus = Ficus::start_yaml(&tls_yaml(upstream.addr, &cert_path, &key_path)).await;

    // The client trusts both, so only the presented certificate tells them apart.
    let connector = tls_connector(&[&first.der, &second.der], &[b"h2"]);
    let stream = tls_connect(&connector, ficus.addr)
        .await
        .expect("TLS handshake");
    assert_eq!(
        presented_cert(&stream),
        first.der,
        "first certificate served"
    );
    drop(stream);

    let stamp = |p: &Path| {
        std::fs::metadata(p)
            .and_then(|m| m.modified())
            .expect("mtime")
    };
    let before = stamp(&cert_path).max(stamp(&key_path));
    // Replace the pair the way a rotation does: new files renamed over the old ones.
    let staged_key = dir.path().join("tls.key.new");
    let staged_cert = dir.path().join("tls.crt.new");
    std::fs::write(&staged_key, &second.key_pem).expect("stage key");
    std::fs::write(&staged_cert, &second.cert_pem).expect("stage certificate");
    std::fs::rename(&staged_key, &key_path).expect("swap key");
    std::fs::rename(&staged_cert, &cert_path).expect("swap certificate");
    if stamp(&cert_path) <= before {
        // A filesystem with a coarse clock: make the change visible to an mtime check.
        std::fs::File::options()
            .write(true)
            .open(&cert_path)
            .and_then(|f| f.set_modified(before + Duration::from_secs(1)))
            .expect("bump mtime");
    }

    let stream = eventually(Duration::from_secs(20), "the new certificate", || {
        let connector = connector.clone();
        let second = second.der.clone();
        async move {
            let stream = tls_connect(&connector, ficus.addr).await.ok()?;
            (presented_cert(&stream) == second).then_some(stream)
        }
    })
    .await;

    // The reloaded certificate serves requests.
    let mut h2 = h2_handshake::<_, Empty<Bytes>>(stream).await;
    let req = Request::get(format!(
        "https://localhost:{}/after-reload",
        ficus.addr.port()
    ))
    .body(Empty::new())
    .expect("request");
    let resp = h2.send_request(req).await.expect("response after reload");
    assert_eq!(resp.status(), StatusCode::OK);
    let seen = upstream.requests();
    assert_eq!(seen.last().map(|s| s.uri.as_str()), Some("/after-reload"));
}

// ---------------------------------------------------------------------------------------------
// 4. WebSocket upgrade passthrough
// ---------------------------------------------------------------------------------------------

/// An upstream that completes a WebSocket handshake and echoes every data message.
pub(crate) async fn websocket_echo() -> TestUpstream {
    TestUpstream::with(
        |mut req: Request<Incoming>, rec: Arc<Recorder>| async move {
            let key = req.headers().get("sec-websocket-key").cloned();
            let upgrade = req
                .headers()
                .get("upgrade")
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
            let on_upgrade = hyper::upgrade::on(&mut req);
            record(req, &rec).await;
            let (Some(key), true) = (key, upgrade) else {
                return Response::builder()
                    .status(StatusCode::BAD_REQUEST)
                    .body(full("not a websocket handshake"))
                    .expect("response");
            };
            tokio::spawn(async move {
                let Ok(upgraded) = on_upgrade.await else {
                    return;
                };
                let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    None,
                )
                .await;
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        return;
                    }
                }
            });
            Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header("upgrade", "websocket")
                .header("connection", "Upgrade")
                .header("sec-websocket-accept", derive_accept_key(key.as_bytes()))
                .body(full(Bytes::new()))
                .expect("response")
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_passes_through_and_echoes() {
    let upstream = websocket_echo().await;
    let ficus = Ficus::start(upstream.addr, "").await;

    let tcp = TcpStream::connect(ficus.addr).await.expect("connect");
    let (mut ws, handshake) = tokio::time::timeout(
        WAIT,
        tokio_tungstenite::client_async(format!("ws://{}/ws?room=1", ficus.addr), tcp),
    )
    .await
    .expect("handshake in time")
    .expect("WebSocket handshake through ficus");
    assert_eq!(handshake.status(), StatusCode::SWITCHING_PROTOCOLS);

    let big: Vec<u8> = pattern(200 * 1024, 7).to_vec();
    let messages = vec![
        Message::text("hello"),
        Message::binary(vec![0u8, 1, 2, 255, 254]),
        Message::text("ünïcödé ✓"),
        Message::binary(big),
        Message::text(""),
        Message::text("last"),
    ];
    for msg in &messages {
        ws.send(msg.clone()).await.expect("send message");
        let echoed = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("echo in time")
            .expect("connection open")
            .expect("echoed message");
        assert_eq!(&echoed, msg, "message echoed exactly");
    }

    ws.close(None).await.expect("send close");
    let reply = tokio::time::timeout(WAIT, ws.next())
        .await
        .expect("close reply in time");
    assert!(
        matches!(reply, Some(Ok(Message::Close(_)))),
        "server answered the close: {reply:?}"
    );
    let end = tokio::time::timeout(WAIT, ws.next())
        .await
        .expect("stream end in time");
    assert!(
        end.is_none(),
        "clean end after the close handshake: {end:?}"
    );

    let seen = upstream.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].method, "GET");
    assert_eq!(seen[0].uri, "/ws?room=1");
    assert_eq!(seen[0].header("upgrade").as_deref(), Some("websocket"));
    assert!(seen[0]
        .header("connection")
        .is_some_and(|c| c.to_ascii_lowercase().contains("upgrade")));
    assert!(seen[0].header("sec-websocket-key").is_some());
    assert_eq!(
        seen[0].header("sec-websocket-version").as_deref(),
        Some("13")
    );
}

// ---------------------------------------------------------------------------------------------
// 5. Expect: 100-continue
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_passes_through() {
    let upstream = TestUpstream::echo().await;
    let ficus = Ficus::start(upstream.addr, "").await;

    let mut tcp = TcpStream::connect(ficus.addr).await.expect("connect");
    tcp.write_all(
        b"POST /upload HTTP/1.1\r\nHost: shop.example\r\nExpect: 100-continue\r\n\
          Content-Type: text/plain\r\nContent-Length: 11\r\nConnection: close\r\n\r\n",
    )
    .await
    .expect("write head");

    // Nothing of the body is sent until the interim response arrives.
    let mut buf = Vec::new();
    let interim_end = tokio::time::timeout(WAIT, async {
        let mut chunk = [0u8; 1024];
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                return end + 4;
            }
            let n = tcp.read(&mut chunk).await.expect("read");
            assert!(n > 0, "connection closed before 100 Continue");
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .expect("100 Continue before the body is sent");
    let interim = String::from_utf8_lossy(&buf[..interim_end]).into_owned();
    assert!(
        interim.starts_with("HTTP/1.1 100 Continue\r\n"),
        "interim response: {interim:?}"
    );
    assert!(
        upstream.requests().is_empty(),
        "no body yet, nothing complete upstream"
    );

    tcp.write_all(b"hello world").await.expect("write body");
    let mut rest = buf[interim_end..].to_vec();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut rest))
        .await
        .expect("final response in time")
        .expect("read final response");

    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut parsed = httparse::Response::new(&mut headers);
    let head_len = match parsed.parse(&rest).expect("parse final response") {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => panic!("incomplete final response"),
    };
    assert_eq!(parsed.code, Some(200), "{}", String::from_utf8_lossy(&rest));
    let body: serde_json::Value =
        serde_json::from_slice(&rest[head_len..]).expect("echo JSON body");
    assert_eq!(body["body_len"], 11);

    let seen = upstream.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].method, "POST");
    assert_eq!(seen[0].uri, "/upload");
    assert_eq!(seen[0].body, b"hello world");
    assert_eq!(seen[0].header("content-length").as_deref(), Some("11"));
    assert_eq!(
        seen[0].header("expect").as_deref(),
        Some("100-continue"),
        "the expectation is forwarded, not swallowed"
    );
}

// ---------------------------------------------------------------------------------------------
// 6. Chunked responses with trailers; chunked requests
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_response_streams_chunks_in_order_with_trailers() {
    // The upstream's response body is fed by the test, one chunk at a time.
    let (chunks, body) = channel_body(1);
    let body = Arc::new(Mutex::new(Some(body)));
    let upstream = TestUpstream::with(move |req: Request<Incoming>, rec: Arc<Recorder>| {
        let body = body.lock().expect("lock").take();
        async move {
            record(req, &rec).await;
            let body: Body = match body {
                Some(b) => BodyExt::boxed(b),
                None => full("second request"),
            };
            Response::builder()
                .header("content-type", "text/plain")
                .header("trailer", "x-checksum")
                .body(body)
                .expect("response")
        }
    })
    .await;
    let ficus = Ficus::start(upstream.addr, "").await;

    let parts: [&[u8]; 4] = [b"alpha-", b"bravo-", b"charlie-", b"delta"];
    // The first chunk is ready before the request, so the head arrives either way.
    chunks
        .send(Ok(Frame::data(Bytes::from_static(parts[0]))))
        .await
        .expect("queue first chunk");

    let req = Request::get("/stream")
        .header("host", "shop.example")
        .header("te", "trailers")
        .body(Empty::<Bytes>::new())
        .expect("request");
    let resp = tokio::time::timeout(WAIT, crate::support::send_streaming(ficus.addr, req))
        .await
        .expect("response head in time");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.version(), Version::HTTP_11);
    assert_eq!(resp.headers()["transfer-encoding"], "chunked");
    assert!(resp.headers().get("content-length").is_none());
    assert_eq!(resp.headers()["trailer"], "x-checksum");
    let mut body = resp.into_body();

    // Each chunk reaches the client before the next one exists upstream: streamed, in order.
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            chunks
                .send(Ok(Frame::data(Bytes::from_static(part))))
                .await
                .expect("queue chunk");
        }
        let got = read_data(&mut body, part.len(), &format!("chunk {i}")).await;
        assert_eq!(&got[..], *part, "chunk {i}");
    }
    let mut trailers = HeaderMap::new();
    trailers.insert("x-checksum", HeaderValue::from_static("abc"));
    chunks
        .send(Ok(Frame::trailers(trailers)))
        .await
        .expect("queue trailers");
    drop(chunks);

    let frame = next_frame(&mut body, "the trailers")
        .await
        .expect("a trailers frame before the end");
    let trailers = frame
        .into_trailers()
        .unwrap_or_else(|f| panic!("expected trailers, got {f:?}"));
    assert_eq!(trailers["x-checksum"], "abc");
    assert!(next_frame(&mut body, "the end of the body").await.is_none());

    let seen = upstream.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].header("te").as_deref(),
        Some("trailers"),
        "the client's acceptance of trailers is forwarded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_request_body_streams_whole_to_upstream() {
    // The upstream reports every body chunk as it arrives, and answers after the end.
    let (arrived_tx, mut arrived) = mpsc::unbounded_channel::<Bytes>();
    let upstream = TestUpstream::with(move |req: Request<Incoming>, rec: Arc<Recorder>| {
        let arrived_tx = arrived_tx.clone();
        async move {
            let (parts, mut body) = req.into_parts();
            let mut whole = Vec::new();
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else {
                    return Response::builder()
                        .status(StatusCode::BAD_REQUEST)
                        .body(full("body error"))
                        .expect("response");
                };
                if let Ok(data) = frame.into_data() {
                    whole.extend_from_slice(&data);
                    let _ = arrived_tx.send(data);
                }
            }
            let seen = crate::support::upstream::Seen {
                method: parts.method.to_string(),
                uri: parts.uri.to_string(),
                headers: parts
                    .headers
                    .iter()
                    .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
                    .collect(),
                body: whole.clone(),
            };
            rec.seen.lock().expect("lock").push(seen);
            Response::builder().body(full(whole)).expect("response")
        }
    })
    .await;
    let ficus = Ficus::start(upstream.addr, "").await;

    let (chunks, body) = channel_body(1);
    let req = Request::post("/upload")
        .header("host", "shop.example")
        .body(body)
        .expect("request");
    let addr = ficus.addr;
    let response = tokio::spawn(async move {
        let resp = crate::support::send_streaming(addr, req).await;
        let status = resp.status();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        (status, body)
    });

    let parts: Vec<Bytes> = (0..5)
        .map(|i| pattern(1000 + i * 3000, i as u64 + 1))
        .collect();
    let mut expected = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        chunks
            .send(Ok(Frame::data(part.clone())))
            .await
            .expect("send chunk");
        expected.extend_from_slice(part);
        // The chunk reaches the upstream before the client produces the next one.
        let mut got = Vec::new();
        while got.len() < part.len() {
            let data = tokio::time::timeout(WAIT, arrived.recv())
                .await
                .unwrap_or_else(|_| panic!("chunk {i} did not reach the upstream"))
                .expect("upstream alive");
            got.extend_from_slice(&data);
        }
        assert_eq!(&got[..], &part[..], "chunk {i} arrived intact");
    }
    drop(chunks);

    let (status, echoed) = tokio::time::timeout(WAIT, response)
        .await
        .expect("response in time")
        .expect("client task");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(checksum(&echoed), checksum(&expected));
    let seen = upstream.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body.len(), expected.len());
    assert_eq!(checksum(&seen[0].body), checksum(&expected));
    assert_eq!(
        seen[0].header("transfer-encoding").as_deref(),
        Some("chunked")
    );
    assert!(seen[0].header("content-length").is_none());
}

// ---------------------------------------------------------------------------------------------
// 7. HTTP/2 client, 5 MiB both ways
// ---------------------------------------------------------------------------------------------

const FIVE_MIB: usize = 5 * 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_large_request_body_arrives_identical() {
    let upstream = TestUpstream::echo().await;
    let ficus = Ficus::start(upstream.addr, "").await;
    let mut client = h2c_client::<Full<Bytes>>(ficus.addr).await;

    let payload = pattern(FIVE_MIB, 0x5eed);
    let req = Request::post(format!("http://{}/big-upload", ficus.addr))
        .body(Full::new(payload.clone()))
        .expect("request");
    let resp = tokio::time::timeout(Duration::from_secs(30), client.send_request(req))
        .await
        .expect("response in time")
        .expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    let description: serde_json::Value = serde_json::from_slice(&body).expect("echo JSON");
    assert_eq!(description["body_len"], FIVE_MIB);

    let seen = upstream.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body.len(), FIVE_MIB);
    assert_eq!(checksum(&seen[0].body), checksum(&payload));
    assert!(seen[0].body == payload, "upstream body is byte-identical");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_large_response_body_arrives_identical() {
    let payload = pattern(FIVE_MIB, 0xfeed);
    let served = payload.clone();
    let upstream = TestUpstream::with(move |req: Request<Incoming>, rec: Arc<Recorder>| {
        let served = served.clone();
        async move {
            record(req, &rec).await;
            // Streamed in 64 KiB chunks with no Content-Length.
            let chunks: Vec<FrameResult> = (0..served.len())
                .step_by(64 * 1024)
                .map(|at| {
                    let end = (at + 64 * 1024).min(served.len());
                    Ok(Frame::data(served.slice(at..end)))
                })
                .collect();
            Response::builder()
                .header("content-type", "application/octet-stream")
                .body(BodyExt::boxed(StreamBody::new(futures_util::stream::iter(
                    chunks,
                ))))
                .expect("response")
        }
    })
    .await;
    let ficus = Ficus::start(upstream.addr, "").await;
    let mut client = h2c_client::<Empty<Bytes>>(ficus.addr).await;

    let req = Request::get(format!("http://{}/big-download", ficus.addr))
        .body(Empty::new())
        .expect("request");
    let resp = tokio::time::timeout(Duration::from_secs(30), client.send_request(req))
        .await
        .expect("response in time")
        .expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.version(), Version::HTTP_2);
    let body = tokio::time::timeout(Duration::from_secs(30), resp.into_body().collect())
        .await
        .expect("body in time")
        .expect("body")
        .to_bytes();
    assert_eq!(body.len(), FIVE_MIB);
    assert_eq!(checksum(&body), checksum(&payload));
    assert!(body == payload, "client body is byte-identical");
    assert_eq!(upstream.requests().len(), 1);
}
