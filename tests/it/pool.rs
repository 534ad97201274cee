//! Upstream connections are pooled: sequential requests reuse one keep-alive connection.

use bytes::Bytes;
use http::Request;
use http_body_util::Full;

use crate::support::{send, Ficus, TestUpstream};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_requests_reuse_one_upstream_connection() {
    let upstream = TestUpstream::echo().await;
    let ficus = Ficus::start(upstream.addr, "").await;
    for i in 0..25 {
        // A new client connection each time: reuse is ficus's doing, not the client's.
        let req = Request::post(format!("/orders/{i}"))
            .header("host", "shop")
            .body(Full::new(Bytes::from_static(b"{\"n\":1}")))
            .expect("request");
        assert_eq!(send(ficus.addr, req).await.status(), 200);
    }
    assert_eq!(upstream.requests().len(), 25);
    assert_eq!(
        upstream.recorder.accepted(),
        1,
        "one upstream TCP connection for 25 requests"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_upstream_closed_is_not_reused() {
    // The upstream answers with `connection: close`: each request needs a new connection,
    // and none fails for having picked a dead one from the pool.
    let upstream = TestUpstream::with(|req, rec| async move {
        crate::support::upstream::record(req, &rec).await;
        http::Response::builder()
            .header("connection", "close")
            .body(crate::support::upstream::full("bye"))
            .expect("response")
    })
    .await;
    let ficus = Ficus::start(upstream.addr, "").await;
    for _ in 0..5 {
        let req = Request::get("/")
            .header("host", "shop")
            .body(Full::new(Bytes::new()))
            .expect("request");
        assert_eq!(send(ficus.addr, req).await.status(), 200);
    }
    assert_eq!(upstream.recorder.accepted(), 5);
}

/// An upstream that keeps each connection alive after answering, then closes it while ficus
/// holds it idle in its pool (what a server's idle timeout does): the next request must not
/// fail for it, whether ficus noticed the close before picking the connection or only when
/// the request could not be sent on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_the_upstream_closed_while_idle_is_not_used() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let closed = Arc::new(AtomicUsize::new(0));
    // The upstream closes its i-th connection once this reaches i.
    let (close_tx, close_rx) = tokio::sync::watch::channel(0usize);
    {
        let (accepted, closed) = (accepted.clone(), closed.clone());
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let n = accepted.fetch_add(1, Ordering::SeqCst) + 1;
                let closed = closed.clone();
                let mut close_rx = close_rx.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tcp.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = tcp
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await;
                    let _ = close_rx.wait_for(|v| *v >= n).await;
                    drop(tcp);
                    closed.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
    }
    let ficus = Ficus::start(addr, "").await;
    for i in 1..=5 {
        let req = Request::get("/")
            .header("host", "shop")
            .body(Full::new(Bytes::new()))
            .expect("request");
        let response = send(ficus.addr, req).await;
        assert_eq!(response.status(), 200, "request {i}: {:?}", response.body());
        assert_eq!(response.body(), "ok");
        // The answered connection is in ficus's pool now; the upstream closes it.
        close_tx.send_replace(i);
        crate::support::eventually(crate::support::WAIT, "the upstream's close", || {
            let closed = closed.clone();
            async move { (closed.load(Ordering::SeqCst) == i).then_some(()) }
        })
        .await;
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        5,
        "a new connection per request"
    );
    let metrics = ficus.metrics().await;
    let errors: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("ficus_upstream_errors_total{") && !l.ends_with(" 0"))
        .collect();
    assert!(errors.is_empty(), "no upstream error: {errors:?}");
}
