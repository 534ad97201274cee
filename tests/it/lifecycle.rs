//! SIGTERM: `/readyz` turns 503, new connections are refused, the request in flight finishes,
//! every accepted event is made durable and given `delivery_timeout` to go out, what is left
//! stays on disk for the next start, and the process exits 0.

use std::sync::Arc;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use tokio::sync::Notify;

use crate::support::upstream::{full, record};
use crate::support::{config_yaml, eventually, get, send, FicusProcess, TestUpstream, WAIT};

/// Sends `text` on `ws` and waits for it to come back.
async fn echo<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>, text: &'static str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    ws.send(Message::text(text)).await.expect("send");
    let reply = tokio::time::timeout(WAIT, ws.next())
        .await
        .expect("echo in time")
        .expect("open")
        .expect("message");
    assert_eq!(reply, Message::text(text));
}

/// An upgraded connection is in flight too: a WebSocket open at SIGTERM keeps working while
/// ficus drains, and ficus exits once it closes, well before `drain_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_open_websocket_go_on_until_it_closes() {
    let upstream = crate::protocols::websocket_echo().await;
    let mut proc = FicusProcess::start(&config_yaml(
        upstream.addr,
        "shutdown:\n  drain_timeout: 20s\n",
    ))
    .await;
    let tcp = tokio::net::TcpStream::connect(proc.addr)
        .await
        .expect("connect");
    let (mut ws, _) = tokio::time::timeout(
        WAIT,
        tokio_tungstenite::client_async(format!("ws://{}/ws", proc.addr), tcp),
    )
    .await
    .expect("handshake in time")
    .expect("WebSocket handshake through ficus");
    echo(&mut ws, "before").await;

    proc.signal("TERM");
    eventually(WAIT, "new connections refused", || async {
        tokio::net::TcpStream::connect(proc.addr)
            .await
            .is_err()
            .then_some(())
    })
    .await;
    echo(&mut ws, "while draining").await;
    assert!(
        proc.child.try_wait().expect("wait").is_none(),
        "still draining while the WebSocket is open"
    );

    // The close handshake, then the client's end of the connection, as a browser does.
    ws.close(None).await.expect("close");
    while let Ok(Some(Ok(_))) =
        tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut ws)).await
    {}
    drop(ws);
    let status = tokio::time::timeout(WAIT, proc.child.wait())
        .await
        .expect("exits once the WebSocket closed")
        .expect("status");
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_request_in_flight_then_exits_0() {
    let release = Arc::new(Notify::new());
    let gate = release.clone();
    let upstream = TestUpstream::with(move |req, rec| {
        let gate = gate.clone();
        async move {
            record(req, &rec).await;
            gate.notified().await;
            http::Response::new(full("finished"))
        }
    })
    .await;
    let mut proc = FicusProcess::start(&config_yaml(
        upstream.addr,
        "shutdown:\n  drain_timeout: 20s\n",
    ))
    .await;
    let addr = proc.addr;
    let admin = proc.admin;

    let in_flight = tokio::spawn(async move {
        let req = Request::get("/slow")
            .header("host", "shop")
            .body(Full::new(Bytes::new()))
            .expect("request");
        send(addr, req).await
    });
    eventually(WAIT, "the slow request reached the upstream", || async {
        (!upstream.requests().is_empty()).then_some(())
    })
    .await;

    proc.signal("TERM");
    eventually(WAIT, "/readyz says shutting down", || async {
        let (status, body) = get(admin, "/readyz").await;
        (status == 503 && body.contains("shutting down")).then_some(())
    })
    .await;
    eventually(WAIT, "new connections refused", || async {
        tokio::net::TcpStream::connect(addr)
            .await
            .is_err()
            .then_some(())
    })
    .await;
    assert!(
        proc.child.try_wait().expect("wait").is_none(),
        "still draining"
    );

    release.notify_one();
    let resp = tokio::time::timeout(WAIT, in_flight)
        .await
        .expect("in-flight request completes")
        .expect("join");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.body(), "finished");
    let status = tokio::time::timeout(WAIT, proc.child.wait())
        .await
        .expect("exits after draining")
        .expect("status");
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_timeout_bounds_the_wait() {
    let upstream = TestUpstream::with(|req, rec| async move {
        record(req, &rec).await;
        std::future::pending::<()>().await;
        unreachable!()
    })
    .await;
    let mut proc = FicusProcess::start(&config_yaml(
        upstream.addr,
        "shutdown:\n  drain_timeout: 500ms\n",
    ))
    .await;
    let addr = proc.addr;
    let _in_flight = tokio::spawn(async move {
        let req = Request::get("/forever")
            .header("host", "shop")
            .body(Full::new(Bytes::new()))
            .expect("request");
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .expect("handshake");
        tokio::spawn(conn);
        let _ = sender.send_request(req).await;
    });
    eventually(WAIT, "request in flight", || async {
        (!upstream.requests().is_empty()).then_some(())
    })
    .await;
    let started = tokio::time::Instant::now();
    proc.signal("INT");
    let status = tokio::time::timeout(WAIT, proc.child.wait())
        .await
        .expect("exits after the drain timeout")
        .expect("status");
    assert_eq!(status.code(), Some(0));
    assert!(started.elapsed() >= std::time::Duration::from_millis(450));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_keeps_undelivered_events_on_disk_for_the_next_start() {
    let upstream = crate::events::shop().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let outbox = dir.path().join("outbox");
    // A sink that is down: nothing can be delivered before shutdown.
    let port = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind")
        .local_addr()
        .expect("addr");
    let yaml = config_yaml(
        upstream.addr,
        &format!(
            "events:\n  rules:\n    - name: created\n      match: {{ method: POST, path: /orders }}\n      type: shop.order.created\n      subject: \"{{response.body.id}}\"\nsinks:\n  broker: {{ type: http, url: \"http://{port}/\" }}\noutbox:\n  dir: {}\nshutdown:\n  delivery_timeout: 300ms\n",
            outbox.display()
        ),
    );
    let mut proc = FicusProcess::start(&yaml).await;
    for id in ["x", "y"] {
        let req = Request::post("/orders")
            .header("host", "shop")
            .header("x-order-id", id)
            .body(Full::new(Bytes::from_static(b"{}")))
            .expect("request");
        assert_eq!(send(proc.addr, req).await.status(), 201);
    }
    proc.signal("TERM");
    let status = tokio::time::timeout(WAIT, proc.child.wait())
        .await
        .expect("exits once delivery_timeout passed")
        .expect("status");
    assert_eq!(status.code(), Some(0));
    let status = ficus::outbox::status(&outbox, &[]).expect("status");
    let broker = status.sinks.iter().find(|s| s.sink == "broker");
    let pending = broker.map_or(status.end_seq - status.first_seq, |b| b.pending);
    assert_eq!(pending, 2, "both events wait on disk: {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_gives_a_slow_sink_delivery_timeout_to_take_the_last_events() {
    let upstream = crate::events::shop().await;
    // A sink that is up but slow: 150 ms per event.
    let sink = TestUpstream::with(|req, rec| async move {
        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
        record(req, &rec).await;
        http::Response::new(full("ok"))
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let yaml = config_yaml(
        upstream.addr,
        &format!(
            "events:\n  rules:\n    - name: created\n      match: {{ method: POST, path: /orders }}\n      type: shop.order.created\n      subject: \"{{response.body.id}}\"\nsinks:\n  broker: {{ type: http, url: \"http://{}/\" }}\noutbox:\n  dir: {}\nshutdown:\n  delivery_timeout: 10s\n",
            sink.addr,
            dir.path().join("outbox").display()
        ),
    );
    let mut proc = FicusProcess::start(&yaml).await;
    for id in ["a", "b", "c", "d"] {
        let req = Request::post("/orders")
            .header("host", "shop")
            .header("x-order-id", id)
            .body(Full::new(Bytes::from_static(b"{}")))
            .expect("request");
        assert_eq!(send(proc.addr, req).await.status(), 201);
    }
    proc.signal("TERM");
    let status = tokio::time::timeout(WAIT, proc.child.wait())
        .await
        .expect("exits")
        .expect("status");
    assert_eq!(status.code(), Some(0));
    assert_eq!(
        sink.requests().len(),
        4,
        "every event delivered before exit"
    );
}

/// The rollout case: SIGTERM while clients are sending and the sink is down. Every request
/// answered 201 before the listener closed has its event on disk at exit, and the next
/// process on the same outbox (the same volume) delivers all of them once the sink is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_with_a_dead_sink_loses_no_accepted_event() {
    let upstream = crate::events::shop().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let outbox = dir.path().join("outbox");
    let sink_port = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind")
        .local_addr()
        .expect("addr");
    let yaml = |sink: std::net::SocketAddr| {
        config_yaml(
            upstream.addr,
            &format!(
                "events:\n  rules:\n    - name: created\n      match: {{ method: POST, path: /orders }}\n      type: shop.order.created\n      subject: \"{{response.body.id}}\"\nsinks:\n  broker: {{ type: http, url: \"http://{sink}/\" }}\noutbox:\n  dir: {}\n  durability: sync\n  retry: {{ initial: 20ms, max: 200ms }}\nshutdown:\n  drain_timeout: 5s\n  delivery_timeout: 200ms\n",
                outbox.display()
            ),
        )
    };
    let mut first = FicusProcess::start(&yaml(sink_port)).await;
    let accepted = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let addr = first.addr;
    // Four clients, each sending until ficus stops answering (bounded: 2000 requests each).
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let accepted = accepted.clone();
            tokio::spawn(async move {
                for n in 0..2000 {
                    let id = format!("c{c}-{n}");
                    let Ok(tcp) = tokio::net::TcpStream::connect(addr).await else {
                        return;
                    };
                    let Ok((mut sender, conn)) =
                        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                            .await
                    else {
                        return;
                    };
                    tokio::spawn(conn);
                    let req = Request::post("/orders")
                        .header("host", "shop")
                        .header("x-order-id", &id)
                        .body(Full::new(Bytes::from_static(b"{}")))
                        .expect("request");
                    match sender.send_request(req).await {
                        Ok(resp) if resp.status() == 201 => {
                            accepted.lock().expect("lock").push(id);
                        }
                        // Refused or cut by the shutdown: not accepted, so not promised.
                        _ => return,
                    }
                }
            })
        })
        .collect();
    eventually(WAIT, "load under way", || async {
        (accepted.lock().expect("lock").len() >= 100).then_some(())
    })
    .await;
    first.signal("TERM");
    let status = tokio::time::timeout(WAIT, first.child.wait())
        .await
        .expect("exits after drain and delivery_timeout")
        .expect("status");
    assert_eq!(status.code(), Some(0));
    for c in clients {
        c.await.expect("client");
    }
    let accepted: Vec<String> = accepted.lock().expect("lock").clone();
    let on_disk = ficus::outbox::status(&outbox, &[]).expect("outbox status");
    assert!(
        on_disk.end_seq - on_disk.first_seq >= accepted.len() as u64,
        "every accepted event on disk at exit: {on_disk:?} for {} accepted",
        accepted.len()
    );

    // The next pod start, the sink back.
    let sink = TestUpstream::with(|req, rec| async move {
        record(req, &rec).await;
        http::Response::new(full("ok"))
    })
    .await;
    let _second = FicusProcess::start(&yaml(sink.addr)).await;
    let delivered: std::collections::HashSet<String> =
        eventually(WAIT, "every accepted event delivered", || async {
            let subjects: std::collections::HashSet<String> = sink
                .requests()
                .iter()
                .filter_map(|r| r.header("ce-subject"))
                .collect();
            accepted
                .iter()
                .all(|id| subjects.contains(id))
                .then_some(subjects)
        })
        .await;
    eprintln!(
        "SIGTERM under load: {} accepted before the listener closed, {} delivered after the restart",
        accepted.len(),
        delivered.len()
    );
}
