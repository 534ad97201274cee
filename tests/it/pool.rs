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
