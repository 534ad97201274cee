//! When the upstream fails, ficus answers for it: `502` for refused or reset connections,
//! `504` for timeouts, each short, plain text, marked as ficus's own and counted by kind.
//! A client that leaves cancels the upstream request.

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::support::upstream::Body;
use crate::support::{eventually, get, sample, send, send_streaming, Ficus, TestUpstream, WAIT};

fn assert_ficus_error(resp: &http::Response<Bytes>, status: u16, kind: &str) {
    assert_eq!(resp.status(), status);
    assert_eq!(resp.headers()["x-ficus-error"], kind);
    assert!(resp.headers()["content-type"]
        .to_str()
        .expect("ascii")
        .starts_with("text/plain"));
    let text = std::str::from_utf8(resp.body()).expect("utf-8");
    assert!(
        text.starts_with("ficus: ") && text.len() < 200,
        "short reason: {text:?}"
    );
}

async fn upstream_errors(ficus: &Ficus, kind: &str) -> f64 {
    sample(
        &ficus.metrics().await,
        "ficus_upstream_errors_total",
        &[("upstream", "monolith"), ("kind", kind)],
    )
    .expect("series exists")
}

/// An upstream that answers every request with `answer`, byte for byte.
async fn raw_upstream(answer: &'static [u8]) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let mut buf = [0u8; 4096];
            let _ = tcp.read(&mut buf).await;
            let _ = tcp.write_all(answer).await;
        }
    });
    addr
}

/// [`send`] for a streaming request body.
async fn send_collected(addr: std::net::SocketAddr, req: Request<Body>) -> http::Response<Bytes> {
    let (parts, body) = send_streaming(addr, req).await.into_parts();
    let body = body.collect().await.expect("response body").to_bytes();
    http::Response::from_parts(parts, body)
}

fn get_req(path: &str) -> Request<Full<Bytes>> {
    Request::get(path)
        .header("host", "shop")
        .body(Full::new(Bytes::new()))
        .expect("request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connection_is_502_connect() {
    // A port that was just free: nothing listens there.
    let port = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind")
        .local_addr()
        .expect("addr");
    let ficus = Ficus::start(port, "").await;
    assert_eq!(upstream_errors(&ficus, "connect").await, 0.0);
    let resp = send(ficus.addr, get_req("/orders")).await;
    assert_ficus_error(&resp, 502, "connect");
    assert_eq!(upstream_errors(&ficus, "connect").await, 1.0);
    let metrics = ficus.metrics().await;
    assert_eq!(
        sample(
            &metrics,
            "ficus_requests_total",
            &[("route", "default"), ("code", "502")]
        ),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_before_response_is_502_reset() {
    // An upstream that reads the request head and closes without answering.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let mut buf = [0u8; 4096];
            let _ = tcp.read(&mut buf).await;
            let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
            drop(tcp);
        }
    });
    let ficus = Ficus::start(addr, "").await;
    let resp = send(ficus.addr, get_req("/orders")).await;
    assert_ficus_error(&resp, 502, "reset");
    assert_eq!(upstream_errors(&ficus, "reset").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_after_the_response_head_cuts_the_client_body_and_counts_reset() {
    // The head and part of a 1000-byte body, then a reset: too late for a 502, but the
    // client's body must fail (not look complete) and the reset must be counted.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let mut buf = [0u8; 4096];
            let _ = tcp.read(&mut buf).await;
            let _ = tcp
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\npartial")
                .await;
            let _ = tcp.flush().await;
            let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
            drop(tcp);
        }
    });
    let ficus = Ficus::start(addr, "").await;
    let resp = send_streaming(ficus.addr, get_req("/orders")).await;
    assert_eq!(resp.status(), 200);
    let body = tokio::time::timeout(WAIT, resp.into_body().collect())
        .await
        .expect("cut well before the test deadline");
    assert!(body.is_err(), "a cut body must not look complete");
    eventually(WAIT, "reset counted", || async {
        (upstream_errors(&ficus, "reset").await == 1.0).then_some(())
    })
    .await;
}

/// RFC 9112 section 6.3: both framings on one response is a sign of response splitting. hyper
/// reads it as chunked; forwarding its `Content-Length` would cut the body short in the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_with_both_content_length_and_transfer_encoding_is_502_protocol() {
    let addr = raw_upstream(
        b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    let ficus = Ficus::start(addr, "").await;
    let resp = send(ficus.addr, get_req("/")).await;
    assert_ficus_error(&resp, 502, "protocol");
    assert_eq!(upstream_errors(&ficus, "protocol").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_response_is_502_protocol() {
    let addr = raw_upstream(b"SSH-2.0-OpenSSH_9.6\r\n\r\n").await;
    let ficus = Ficus::start(addr, "").await;
    let resp = send(ficus.addr, get_req("/")).await;
    assert_ficus_error(&resp, 502, "protocol");
    assert_eq!(upstream_errors(&ficus, "protocol").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_response_headers_within_timeout_is_504() {
    let upstream = TestUpstream::with(|_req, _rec| async move {
        std::future::pending::<()>().await;
        unreachable!()
    })
    .await;
    let ficus = Ficus::start(upstream.addr, "    timeout: 300ms\n").await;
    let started = tokio::time::Instant::now();
    let resp = send(ficus.addr, get_req("/slow")).await;
    assert_ficus_error(&resp, 504, "timeout");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(upstream_errors(&ficus, "timeout").await, 1.0);
    // The timed-out request's upstream connection is closed, not left running.
    eventually(WAIT, "upstream connection closed", || async {
        (upstream.recorder.closed() == 1).then_some(())
    })
    .await;
}

fn slow_stream(chunks: usize, gap: Duration, then_stall: bool) -> Body {
    let stream = futures_util::stream::unfold(0usize, move |i| async move {
        if i == chunks {
            if then_stall {
                std::future::pending::<()>().await;
            }
            return None;
        }
        if i > 0 {
            tokio::time::sleep(gap).await;
        }
        let frame: Result<Frame<Bytes>, Box<dyn std::error::Error + Send + Sync>> =
            Ok(Frame::data(Bytes::from(vec![b'x'; 1000])));
        Some((frame, i + 1))
    });
    BodyExt::boxed(StreamBody::new(stream))
}

/// `timeout` runs from the request body's end: an upload that takes longer than it, while the
/// upstream reads it, is not the upstream's slowness.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_upload_is_not_cut_by_the_header_timeout() {
    let upstream = TestUpstream::echo().await;
    let ficus = Ficus::start(upstream.addr, "    timeout: 300ms\n    idle_timeout: 2s\n").await;
    // 6 chunks 150 ms apart: 750 ms of upload, the upstream answering only after its end.
    let req = Request::post("/upload")
        .header("host", "a")
        .body(slow_stream(6, Duration::from_millis(150), false))
        .expect("request");
    let started = tokio::time::Instant::now();
    let resp = send_collected(ficus.addr, req).await;
    assert_eq!(resp.status(), 200, "{:?}", resp.body());
    let seen: serde_json::Value = serde_json::from_slice(resp.body()).expect("echo's JSON");
    assert_eq!(
        seen["body_len"], 6000,
        "the whole upload reached the upstream"
    );
    assert!(
        started.elapsed() > Duration::from_millis(300),
        "the upload outlived the timeout"
    );
    assert_eq!(upstream_errors(&ficus, "timeout").await, 0.0);
}

/// After the upload, the clock runs: an upstream that then says nothing is `504` after
/// `timeout`, however long the upload took.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_header_timeout_starts_when_the_upload_ends() {
    let upstream = TestUpstream::with(
        |req: http::Request<hyper::body::Incoming>, _rec| async move {
            let _ = req.into_body().collect().await;
            std::future::pending::<()>().await;
            unreachable!()
        },
    )
    .await;
    let ficus = Ficus::start(upstream.addr, "    timeout: 300ms\n    idle_timeout: 2s\n").await;
    let req = Request::post("/upload")
        .header("host", "a")
        .body(slow_stream(4, Duration::from_millis(150), false))
        .expect("request");
    let started = tokio::time::Instant::now();
    let resp = send_collected(ficus.addr, req).await;
    assert_ficus_error(&resp, 504, "timeout");
    // 450 ms of upload, then 300 ms of silence.
    assert!(
        started.elapsed() >= Duration::from_millis(750),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(upstream_errors(&ficus, "timeout").await, 1.0);
}

/// An upstream that stops reading the upload (TCP backpressure: hyper no longer asks for the
/// body, so the client is not the slow side) and says nothing is `504` after `timeout`, not
/// a wait without end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_stops_reading_the_upload_is_504_after_timeout() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = held.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let mut buf = [0u8; 1024];
            let _ = tcp.read(&mut buf).await;
            // Never read again, never answer; keep the socket open.
            keep.lock().expect("lock").push(tcp);
        }
    });
    let ficus = Ficus::start(addr, "    timeout: 300ms\n    idle_timeout: 30s\n").await;
    let chunks = futures_util::stream::iter((0..64).map(|_| {
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Frame::data(Bytes::from(vec![
            b'x';
            1 << 20
        ])))
    }));
    let req = Request::post("/upload")
        .header("host", "a")
        .body(BodyExt::boxed(StreamBody::new(chunks)))
        .expect("request");
    let resp = tokio::time::timeout(WAIT, send_streaming(ficus.addr, req))
        .await
        .expect("ficus answers well before the test deadline");
    assert_eq!(resp.status(), 504);
    assert_eq!(resp.headers()["x-ficus-error"], "timeout");
    assert_eq!(upstream_errors(&ficus, "timeout").await, 1.0);
}

/// A chunked upload with trailers: hyper drops the body after its trailers without asking for
/// its end, so the trailers are its end, and the clock runs from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_that_ends_with_trailers_starts_the_header_timeout() {
    let upstream = TestUpstream::with(
        |req: http::Request<hyper::body::Incoming>, _rec| async move {
            let _ = req.into_body().collect().await;
            std::future::pending::<()>().await;
            unreachable!()
        },
    )
    .await;
    let ficus = Ficus::start(upstream.addr, "    timeout: 300ms\n    idle_timeout: 30s\n").await;
    let mut tcp = tokio::net::TcpStream::connect(ficus.addr)
        .await
        .expect("connect");
    tcp.write_all(b"POST /up HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\ntrailer: x-sum\r\n\r\n5\r\nhello\r\n0\r\nx-sum: 1\r\n\r\n")
        .await
        .expect("write");
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(WAIT, tcp.read(&mut buf))
        .await
        .expect("ficus answers well before the test deadline")
        .expect("read");
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 504"), "{text}");
    assert!(text.contains("x-ficus-error: timeout"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_download_is_not_cut_by_the_header_timeout() {
    // Headers at once, then 6 chunks 150 ms apart: 750 ms in all, with timeout 300ms.
    let upstream = TestUpstream::with(|_req, _rec| async move {
        http::Response::new(slow_stream(6, Duration::from_millis(150), false))
    })
    .await;
    let ficus = Ficus::start(upstream.addr, "    timeout: 300ms\n    idle_timeout: 2s\n").await;
    let started = tokio::time::Instant::now();
    let resp = send(ficus.addr, get_req("/download")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.body().len(), 6000);
    assert!(
        started.elapsed() > Duration::from_millis(300),
        "the download outlived the timeout"
    );
    assert_eq!(upstream_errors(&ficus, "timeout").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_download_is_cut_after_idle_timeout() {
    let upstream = TestUpstream::with(|_req, _rec| async move {
        http::Response::new(slow_stream(2, Duration::from_millis(10), true))
    })
    .await;
    let ficus = Ficus::start(upstream.addr, "    idle_timeout: 400ms\n").await;
    let started = tokio::time::Instant::now();
    let resp = send_streaming(ficus.addr, get_req("/stall")).await;
    assert_eq!(resp.status(), 200);
    let result = tokio::time::timeout(WAIT, resp.into_body().collect()).await;
    let err = result.expect("cut well before the test deadline");
    assert!(
        err.is_err(),
        "the body must end in an error, not look complete"
    );
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert_eq!(upstream_errors(&ficus, "idle_timeout").await, 1.0);
    assert_eq!(
        upstream_errors(&ficus, "reset").await,
        0.0,
        "one cut, one kind"
    );
}

/// A client that stops sending its body is the client's stall, not the upstream's: `408`, as
/// when the body is kept for a fallback, and no upstream error counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upload_is_cut_after_idle_timeout_with_408_and_no_upstream_error() {
    let upstream = TestUpstream::echo().await;
    let ficus = Ficus::start(upstream.addr, "    idle_timeout: 400ms\n").await;
    let mut tcp = tokio::net::TcpStream::connect(ficus.addr)
        .await
        .expect("connect");
    tcp.write_all(b"POST /up HTTP/1.1\r\nhost: a\r\ncontent-length: 100\r\n\r\n0123456789")
        .await
        .expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut out))
        .await
        .expect("ficus answers and closes")
        .expect("read");
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("x-ficus-error: client"), "{text}");
    assert_eq!(upstream_errors(&ficus, "idle_timeout").await, 0.0);
    assert_eq!(upstream_errors(&ficus, "reset").await, 0.0);
    let labels = [("route", "default"), ("method", "POST"), ("code", "408")];
    eventually(WAIT, "the 408 counted", || async {
        (sample(&ficus.metrics().await, "ficus_requests_total", &labels) == Some(1.0)).then_some(())
    })
    .await;
}

/// A client that goes away in the middle of its upload broke the exchange, not the upstream:
/// no `reset` counted against it, and the request counted as the client's `400`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_mid_upload_is_not_an_upstream_reset() {
    let upstream = TestUpstream::echo().await;
    let ficus = Ficus::start(upstream.addr, "").await;
    let mut tcp = tokio::net::TcpStream::connect(ficus.addr)
        .await
        .expect("connect");
    tcp.write_all(b"POST /up HTTP/1.1\r\nhost: a\r\ncontent-length: 100\r\n\r\n0123456789")
        .await
        .expect("write");
    eventually(WAIT, "upstream got the request", || async {
        (upstream.recorder.accepted() == 1).then_some(())
    })
    .await;
    drop(tcp);
    let labels = [("route", "default"), ("method", "POST"), ("code", "400")];
    eventually(WAIT, "the client's 400 counted", || async {
        (sample(&ficus.metrics().await, "ficus_requests_total", &labels) == Some(1.0)).then_some(())
    })
    .await;
    assert_eq!(upstream_errors(&ficus, "reset").await, 0.0);
    let codes = [("route", "default"), ("method", "POST"), ("code", "502")];
    assert_eq!(
        sample(&ficus.metrics().await, "ficus_requests_total", &codes),
        None
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_cancels_the_upstream_request() {
    let upstream = TestUpstream::with(|_req, _rec| async move {
        std::future::pending::<()>().await;
        unreachable!()
    })
    .await;
    let ficus = Ficus::start(upstream.addr, "").await;
    let mut tcp = tokio::net::TcpStream::connect(ficus.addr)
        .await
        .expect("connect");
    tcp.write_all(b"GET /forever HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .expect("write");
    eventually(WAIT, "upstream got the request", || async {
        (upstream.recorder.accepted() == 1).then_some(())
    })
    .await;
    assert_eq!(upstream.recorder.closed(), 0);
    drop(tcp);
    eventually(WAIT, "upstream saw its connection go away", || async {
        (upstream.recorder.closed() == 1).then_some(())
    })
    .await;
    let (status, _) = get(ficus.admin, "/healthz").await;
    assert_eq!(status, 200, "ficus keeps running");
}
