//! Request heads that are too large or too slow, and bodies whose length is ambiguous, are
//! refused at ficus and never reach the upstream.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{eventually, raw_exchange, sample, Ficus, TestUpstream, WAIT};

fn head_with(header_bytes: usize) -> Vec<u8> {
    format!(
        "GET /big HTTP/1.1\r\nhost: a\r\nx-big: {}\r\nconnection: close\r\n\r\n",
        "v".repeat(header_bytes)
    )
    .into_bytes()
}

/// `ficus_requests_total` for the answers hyper gives before the stack sees a request: counted
/// on the `default` route with method `other`.
async fn answered_by_hyper(ficus: &Ficus, code: &str) -> Option<f64> {
    let text = ficus.metrics().await;
    let labels = [("route", "default"), ("method", "other"), ("code", code)];
    sample(&text, "ficus_requests_total", &labels)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_head_is_431() {
    let upstream = TestUpstream::echo().await;
    let ficus = Ficus::start(upstream.addr, "limits:\n  max_header_bytes: 16KiB\n").await;
    let ok = raw_exchange(ficus.addr, &head_with(12 * 1024)).await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    let refused = raw_exchange(ficus.addr, &head_with(20 * 1024)).await;
    assert!(refused.starts_with("HTTP/1.1 431"), "{refused}");
    // A head hyper cannot parse is answered 400 by hyper, also before the stack.
    let garbled = raw_exchange(ficus.addr, b"GET /x HTTP/1.1\r\nho st: a\r\n\r\n").await;
    assert!(garbled.starts_with("HTTP/1.1 400"), "{garbled}");
    assert_eq!(
        upstream.requests().len(),
        1,
        "only the small head was forwarded"
    );
    // Those answers are requests like any other in the metrics (the connection's task counts
    // them when it ends, which may be just after the client saw the close).
    eventually(WAIT, "the 431 and the 400 counted", || async {
        (answered_by_hyper(&ficus, "431").await == Some(1.0)
            && answered_by_hyper(&ficus, "400").await == Some(1.0))
        .then_some(())
    })
    .await;
    let text = ficus.metrics().await;
    assert_eq!(
        sample(&text, "ficus_requests_total", &[("code", "200")]),
        Some(1.0),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_that_never_finishes_is_closed_after_header_read_timeout() {
    let upstream = TestUpstream::echo().await;
    let ficus = Ficus::start(upstream.addr, "limits:\n  header_read_timeout: 300ms\n").await;

    let mut tcp = TcpStream::connect(ficus.addr).await.expect("connect");
    tcp.write_all(b"GET / HTTP/1.1\r\nhost: a\r\nx-slow: ")
        .await
        .expect("write");
    let started = tokio::time::Instant::now();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut out))
        .await
        .expect("closed by ficus, not by the test deadline")
        .ok();
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert!(!String::from_utf8_lossy(&out).contains("200 OK"));

    // A client that connects and sends nothing at all is closed the same way.
    let mut silent = TcpStream::connect(ficus.addr).await.expect("connect");
    let n = tokio::time::timeout(WAIT, silent.read(&mut [0u8; 64]))
        .await
        .expect("closed by ficus")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(upstream.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_with_transfer_encoding_is_400_and_not_forwarded() {
    let upstream = TestUpstream::echo().await;
    let ficus = Ficus::start(upstream.addr, "").await;
    let smuggle = b"POST /orders HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nhost: a\r\n\r\n";
    let response = raw_exchange(ficus.addr, smuggle).await;
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    assert_eq!(
        response.matches("HTTP/1.1").count(),
        1,
        "one answer, then closed: {response}"
    );
    assert_eq!(
        upstream.recorder.accepted(),
        0,
        "nothing reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_content_lengths_are_400_and_not_forwarded() {
    let upstream = TestUpstream::echo().await;
    let ficus = Ficus::start(upstream.addr, "").await;
    for raw in [
        &b"POST /orders HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!"[..],
        &b"POST /orders HTTP/1.1\r\nhost: a\r\ncontent-length: 5, 6\r\n\r\nhello!"[..],
    ] {
        let response = raw_exchange(ficus.addr, raw).await;
        assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    }
    assert_eq!(
        upstream.recorder.accepted(),
        0,
        "nothing reached the upstream"
    );
    // hyper refuses these while parsing the head; both answers are still counted.
    eventually(WAIT, "both 400s counted", || async {
        (answered_by_hyper(&ficus, "400").await == Some(2.0)).then_some(())
    })
    .await;
    // Equal repeated lengths are one length, and fine.
    let ok = raw_exchange(
        ficus.addr,
        b"POST /orders HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello",
    )
    .await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_repeated_or_invalid_host_is_400_and_not_forwarded() {
    let upstream = TestUpstream::echo().await;
    let ficus = Ficus::start(upstream.addr, "").await;
    for raw in [
        &b"GET /orders HTTP/1.1\r\nconnection: close\r\n\r\n"[..],
        &b"GET /orders HTTP/1.1\r\nhost: a\r\nhost: b\r\nconnection: close\r\n\r\n"[..],
        &b"GET /orders HTTP/1.1\r\nhost: a b\r\nconnection: close\r\n\r\n"[..],
        &b"GET /orders HTTP/1.1\r\nhost: user@a\r\nconnection: close\r\n\r\n"[..],
    ] {
        let response = raw_exchange(ficus.addr, raw).await;
        assert!(response.starts_with("HTTP/1.1 400"), "{response}");
        assert!(response.contains("x-ficus-error: host"), "{response}");
    }
    assert_eq!(
        upstream.recorder.accepted(),
        0,
        "nothing reached the upstream"
    );
    // HTTP/1.0 may leave Host out.
    let old = raw_exchange(ficus.addr, b"GET /orders HTTP/1.0\r\n\r\n").await;
    assert!(
        old.starts_with("HTTP/1.0 200") || old.starts_with("HTTP/1.1 200"),
        "{old}"
    );
}

/// A tunnel to a host of the client's choosing is not what a sidecar in front of one
/// application opens: `405`, connection closed, nothing forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_is_405_and_not_forwarded() {
    let upstream = TestUpstream::echo().await;
    let ficus = Ficus::start(upstream.addr, "").await;
    let response = raw_exchange(
        ficus.addr,
        b"CONNECT example.com:443 HTTP/1.1\r\nhost: example.com:443\r\n\r\n",
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 405"), "{response}");
    assert!(response.contains("x-ficus-error: method"), "{response}");
    assert!(response.contains("connection: close"), "{response}");
    assert_eq!(
        upstream.recorder.accepted(),
        0,
        "nothing reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absolute_form_target_sets_the_host_the_upstream_sees() {
    let upstream = TestUpstream::echo().await;
    let ficus = Ficus::start(upstream.addr, "").await;
    let response = raw_exchange(
        ficus.addr,
        b"GET http://shop.example:8080/orders?x=1 HTTP/1.1\r\nhost: elsewhere\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let seen = upstream.recorder.requests();
    let seen = seen.last().expect("forwarded");
    assert_eq!(seen.uri, "/orders?x=1", "origin-form upstream");
    // RFC 9112 section 3.2.2: the target's host wins over the received Host.
    assert_eq!(seen.header("host").as_deref(), Some("shop.example:8080"));
    assert_eq!(
        seen.header("x-forwarded-host").as_deref(),
        Some("shop.example:8080")
    );
}
