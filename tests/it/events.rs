//! The event path end to end: rules on real traffic, CloudEvents checked with the official
//! SDK, the outbox, and delivery to file and HTTP sinks that fail, refuse and come back.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cloudevents::AttributesReader;
use http::Request;
use http_body_util::{BodyExt, Full};

use crate::support::upstream::{full, record, Seen};
use crate::support::{eventually, get, sample, send, send_streaming, Ficus, TestUpstream, WAIT};

/// The shop the rules watch: `POST /orders` answers 201 with an id taken from the request's
/// `x-order-id` (so tests know it), `DELETE /orders/{id}` 204, `GET /missing` 404.
pub async fn shop() -> TestUpstream {
    TestUpstream::with(|req, rec| async move {
        let order = req
            .headers()
            .get("x-order-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("1")
            .to_string();
        let size: usize = req
            .headers()
            .get("x-pad")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let gzipped = req
            .headers()
            .get("accept-encoding")
            .is_some_and(|v| v.as_bytes().starts_with(b"gzip"));
        let seen = record(req, &rec).await;
        let (status, body) = match (seen.method.as_str(), seen.uri.as_str()) {
            ("POST", "/orders") => (
                201,
                serde_json::json!({"id": order, "total": 12.5, "version": 1, "pad": "x".repeat(size)}).to_string(),
            ),
            ("DELETE", "/orders/none") => (404, r#"{"error":"no such order"}"#.to_string()),
            ("DELETE", _) => (204, String::new()),
            ("POST", "/text") => (200, "plain words".to_string()),
            _ => (404, r#"{"error":"not found"}"#.to_string()),
        };
        let ct = if seen.uri == "/text" { "text/plain" } else { "application/json" };
        let mut response = http::Response::builder()
            .status(status)
            .header("content-type", ct);
        let body = if gzipped {
            response = response.header("content-encoding", "gzip");
            gzip(body.as_bytes())
        } else {
            Bytes::from(body)
        };
        response.body(full(body)).expect("response")
    })
    .await
}

fn gzip(data: &[u8]) -> Bytes {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).expect("gzip");
    Bytes::from(e.finish().expect("gzip"))
}

fn rules(sinks: &str, outbox: &Path, extra_outbox: &str) -> String {
    format!(
        r#"events:
  source: /legacy/shop
  rules:
    - name: order-created
      match: {{ method: POST, path: /orders, status: 201 }}
      type: shop.order.created
      subject: "{{response.body.id}}"
      sequence: "{{response.body.version}}"
      data:
        order_id: "{{response.body.id}}"
        customer: "{{request.body.customer_id}}"
        total: "{{response.body.total}}"
        label: "order {{response.body.id}} for {{request.body.customer_id}}"
    - name: order-cancelled
      match: {{ method: DELETE, path: "/orders/{{id}}" }}
      type: shop.order.cancelled
      subject: "{{path.id}}"
    - name: text-seen
      match: {{ method: POST, path: /text }}
      type: shop.text
  redact: [request.body.password]
sinks:
{sinks}
outbox:
  dir: {}
{extra_outbox}"#,
        outbox.display()
    )
}

/// One rule whose data is the whole (padded) response body: big events fill the outbox fast.
pub fn whole_body_rule(sinks: &str, outbox: &Path, extra_outbox: &str) -> String {
    format!(
        "events:\n  rules:\n    - name: order-created\n      match: {{ method: POST, path: /orders }}\n      type: shop.order.created\nsinks:\n{sinks}\noutbox:\n  dir: {}\n{extra_outbox}",
        outbox.display()
    )
}

fn post_order(id: &str, body: &'static str) -> Request<Full<Bytes>> {
    Request::post("/orders")
        .header("host", "shop")
        .header("content-type", "application/json")
        .header("x-order-id", id)
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("request")
}

/// Every line of a JSON Lines file, decoded with the CloudEvents SDK (which refuses events
/// that violate the spec).
pub fn read_events(path: &Path) -> Vec<cloudevents::Event> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| {
            serde_json::from_str::<cloudevents::Event>(l)
                .unwrap_or_else(|e| panic!("invalid CloudEvent {l}: {e}"))
        })
        .collect()
}

async fn wait_for_events(path: &Path, n: usize) -> Vec<cloudevents::Event> {
    eventually(
        WAIT,
        &format!("{n} events in {}", path.display()),
        || async {
            let events = read_events(path);
            (events.len() >= n).then_some(events)
        },
    )
    .await
}

fn data_json(event: &cloudevents::Event) -> serde_json::Value {
    match event.data() {
        Some(cloudevents::Data::Json(v)) => v.clone(),
        Some(cloudevents::Data::String(s)) => serde_json::Value::String(s.clone()),
        Some(cloudevents::Data::Binary(b)) => serde_json::from_slice(b).expect("json data"),
        None => serde_json::Value::Null,
    }
}

/// The shop behind ficus with the standard rules and one file sink, `audit`: the upstream, the
/// directory (kept alive), the sink's file and ficus.
async fn shop_with_file_sink() -> (TestUpstream, tempfile::TempDir, std::path::PathBuf, Ficus) {
    let upstream = shop().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("events.jsonl");
    let sinks = format!("  audit: {{ type: file, path: {} }}", file.display());
    let ficus = Ficus::start(
        upstream.addr,
        &rules(&sinks, &dir.path().join("outbox"), ""),
    )
    .await;
    (upstream, dir, file, ficus)
}

fn ext(event: &cloudevents::Event, name: &str) -> Option<String> {
    event.extension(name).map(|v| v.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_matching_response_becomes_a_valid_cloudevent_in_the_file_sink() {
    let (_upstream, _dir, file, ficus) = shop_with_file_sink().await;

    let resp = send(
        ficus.addr,
        post_order("42", r#"{"customer_id":"c-7","password":"hunter2"}"#),
    )
    .await;
    assert_eq!(resp.status(), 201);
    let body: serde_json::Value = serde_json::from_slice(resp.body()).expect("json");
    assert_eq!(
        body["id"], "42",
        "the client gets the monolith's body unchanged"
    );

    let events = wait_for_events(&file, 1).await;
    let e = &events[0];
    assert_eq!(e.specversion().to_string(), "1.0");
    assert_eq!(e.ty(), "shop.order.created");
    assert_eq!(e.source().to_string(), "/legacy/shop");
    assert_eq!(e.subject(), Some("42"));
    assert!(e.time().is_some());
    let id = uuid::Uuid::parse_str(e.id()).expect("uuid id");
    assert_eq!(id.get_version_num(), 7, "UUIDv7 by default");
    assert_eq!(e.datacontenttype(), Some("application/json"));
    assert_eq!(
        ext(e, "partitionkey").as_deref(),
        Some("42"),
        "defaults to the subject"
    );
    assert_eq!(ext(e, "sequence").as_deref(), Some("1"));
    assert_eq!(ext(e, "ficusupstream").as_deref(), Some("monolith"));
    assert_eq!(
        ext(e, "traceparent").as_deref(),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );
    let data = data_json(e);
    assert_eq!(data["order_id"], "42");
    assert_eq!(data["customer"], "c-7");
    assert_eq!(
        data["total"], 12.5,
        "a lone placeholder keeps its JSON type"
    );
    assert_eq!(data["label"], "order 42 for c-7");
    let raw = std::fs::read_to_string(&file).expect("file");
    assert!(
        !raw.contains("hunter2"),
        "redacted fields never leave the process"
    );

    let m = ficus.metrics().await;
    assert_eq!(
        sample(
            &m,
            "ficus_events_emitted_total",
            &[("rule", "order-created")]
        ),
        Some(1.0)
    );
    eventually(WAIT, "delivered counted", || async {
        let m = ficus.metrics().await;
        (sample(&m, "ficus_events_delivered_total", &[("sink", "audit")]) == Some(1.0))
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traceparent_that_trace_context_refuses_is_left_out_of_the_event() {
    let (upstream, _dir, file, ficus) = shop_with_file_sink().await;
    let valid = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let cases: [&[&str]; 3] = [
        &["not-a-trace"],
        &["00-00000000000000000000000000000000-00f067aa0ba902b7-01"],
        // Sent twice, even valid: which one is the caller's cannot be told.
        &[
            valid,
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ],
    ];
    for values in cases {
        let mut request = post_order("43", r#"{"customer_id":"c-7"}"#);
        request.headers_mut().remove("traceparent");
        for v in values {
            request
                .headers_mut()
                .append("traceparent", http::HeaderValue::from_static(v));
        }
        let resp = send(ficus.addr, request).await;
        assert_eq!(resp.status(), 201);
        assert_eq!(
            upstream
                .requests()
                .last()
                .and_then(|r| r.header("traceparent"))
                .as_deref(),
            Some(values[0]),
            "the header itself still reaches the monolith"
        );
    }
    for e in wait_for_events(&file, cases.len()).await {
        assert_eq!(ext(&e, "traceparent"), None, "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statuses_outside_the_rule_and_unmatched_routes_emit_nothing() {
    let (_upstream, _dir, file, ficus) = shop_with_file_sink().await;

    // 404 for a DELETE: outside the default 2xx.
    let del = Request::delete("/orders/none")
        .header("host", "shop")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let _ = send(ficus.addr, del).await;
    // No rule for GET /orders/1 at all.
    assert_eq!(get(ficus.addr, "/orders/1").await.0, 404);
    // A matching one, to know when the sink has caught up.
    let del = Request::delete("/orders/9")
        .header("host", "shop")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let _ = send(ficus.addr, del).await;
    let events = wait_for_events(&file, 1).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].ty(), "shop.order.cancelled");
    assert_eq!(events[0].subject(), Some("9"));
    assert!(events[0].data().is_none(), "an empty body leaves data out");
    let m = ficus.metrics().await;
    assert_eq!(
        sample(
            &m,
            "ficus_events_emitted_total",
            &[("rule", "order-created")]
        ),
        Some(0.0)
    );
}

/// A monolith gzips its answers to clients that accept it, and clients may gzip their
/// uploads: rules read the bodies as the application wrote them, while the client gets the
/// compressed bytes unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_bodies_are_read_decoded_and_forwarded_unchanged() {
    let (upstream, _dir, file, ficus) = shop_with_file_sink().await;
    let upload = gzip(br#"{"customer_id":"c-9"}"#);
    let req = Request::post("/orders")
        .header("host", "shop")
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .header("accept-encoding", "gzip")
        .header("x-order-id", "77")
        .body(Full::new(upload.clone()))
        .expect("request");
    let resp = send(ficus.addr, req).await;
    assert_eq!(resp.status(), 201);
    assert_eq!(resp.headers()["content-encoding"], "gzip");
    let mut plain = String::new();
    std::io::Read::read_to_string(
        &mut flate2::read::GzDecoder::new(&resp.body()[..]),
        &mut plain,
    )
    .expect("the client gets the monolith's gzip");
    assert!(plain.contains(r#""id":"77""#), "{plain}");
    assert_eq!(
        upstream.requests()[0].body,
        upload,
        "the upload forwarded as sent"
    );
    let events = wait_for_events(&file, 1).await;
    assert_eq!(events[0].subject(), Some("77"));
    let data = data_json(&events[0]);
    assert_eq!(data["order_id"], "77");
    assert_eq!(data["customer"], "c-9");
    assert_eq!(data["total"], 12.5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_bodies_become_text_data() {
    let (_upstream, _dir, file, ficus) = shop_with_file_sink().await;
    let req = Request::post("/text")
        .header("host", "shop")
        .body(Full::new(Bytes::from_static(b"hi")))
        .expect("request");
    assert_eq!(send(ficus.addr, req).await.status(), 200);
    let events = wait_for_events(&file, 1).await;
    // Exactly SPEC section 4's value.
    assert_eq!(events[0].datacontenttype(), Some("text/plain"));
    assert_eq!(data_json(&events[0]), "plain words");
}

/// An HTTP sink whose status the test can change, recording what it accepted.
struct HttpSinkServer {
    upstream: TestUpstream,
    status: Arc<AtomicU16>,
}

async fn http_sink(listener: Option<tokio::net::TcpListener>) -> HttpSinkServer {
    let status = Arc::new(AtomicU16::new(200));
    let s = status.clone();
    let behaviour =
        crate::support::upstream::UpstreamBehaviour::Handler(Arc::new(move |req, rec| {
            let s = s.clone();
            Box::pin(async move {
                let code = s.load(Ordering::SeqCst);
                if code == 200 {
                    record(req, &rec).await;
                } else {
                    let _ = req.into_body().collect().await;
                }
                http::Response::builder()
                    .status(code)
                    .body(full("sink says so"))
                    .expect("response")
            })
        }));
    let upstream = match listener {
        Some(l) => TestUpstream::serve(l, behaviour),
        None => TestUpstream::start(behaviour).await,
    };
    HttpSinkServer { upstream, status }
}

fn to_sdk_event(seen: &Seen) -> cloudevents::Event {
    let mut headers = http::HeaderMap::new();
    for (name, value) in &seen.headers {
        headers.append(
            http::HeaderName::from_bytes(name.as_bytes()).expect("name"),
            http::HeaderValue::from_bytes(value).expect("value"),
        );
    }
    cloudevents::binding::http::to_event(&headers, seen.body.clone())
        .expect("valid CloudEvent over HTTP")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_sink_binary_structured_and_batch_modes() {
    let upstream = shop().await;
    for mode in ["binary", "structured", "batch"] {
        let sink = http_sink(None).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let sinks = format!(
            "  broker: {{ type: http, url: \"http://{}/events\", mode: {mode}, headers: {{ authorization: \"Bearer ${{FICUS_TEST_TOKEN:-t0ken}}\" }} }}",
            sink.upstream.addr
        );
        let ficus = Ficus::start(
            upstream.addr,
            &rules(&sinks, &dir.path().join("outbox"), ""),
        )
        .await;
        for id in ["1", "2", "3"] {
            assert_eq!(
                send(ficus.addr, post_order(id, r#"{"customer_id":"c"}"#))
                    .await
                    .status(),
                201
            );
        }
        let events: Vec<cloudevents::Event> =
            eventually(WAIT, "three events at the HTTP sink", || async {
                let seen = sink.upstream.requests();
                let events: Vec<cloudevents::Event> = if mode == "batch" {
                    seen.iter()
                        .flat_map(|s| {
                            assert_eq!(
                                s.header("content-type").as_deref(),
                                Some("application/cloudevents-batch+json")
                            );
                            serde_json::from_slice::<Vec<cloudevents::Event>>(&s.body)
                                .expect("batch of CloudEvents")
                        })
                        .collect()
                } else {
                    seen.iter().map(to_sdk_event).collect()
                };
                (events.len() >= 3).then_some(events)
            })
            .await;
        let subjects: Vec<_> = events
            .iter()
            .map(|e| e.subject().unwrap_or("").to_string())
            .collect();
        assert_eq!(subjects, ["1", "2", "3"], "{mode}: in order");
        let first = &sink.upstream.requests()[0];
        assert_eq!(
            first.header("authorization").as_deref(),
            Some("Bearer t0ken"),
            "{mode}"
        );
        match mode {
            "binary" => {
                assert_eq!(
                    first.header("ce-type").as_deref(),
                    Some("shop.order.created")
                );
                assert_eq!(
                    first.header("content-type").as_deref(),
                    Some("application/json")
                );
                let data: serde_json::Value =
                    serde_json::from_slice(&first.body).expect("data as body");
                assert_eq!(data["order_id"], "1");
            }
            "structured" => {
                assert_eq!(
                    first.header("content-type").as_deref(),
                    Some("application/cloudevents+json")
                );
                assert!(first.header("ce-type").is_none());
            }
            _ => {}
        }
        drop(ficus);
    }
}

/// An event without data (a `204`'s) goes in binary mode as a POST with an empty body, which
/// still says its length: a front end that insists on one (`411`) would dead-letter it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_sink_binary_mode_posts_an_event_without_data_with_content_length_0() {
    let upstream = shop().await;
    let sink = http_sink(None).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let sinks = format!(
        "  broker: {{ type: http, url: \"http://{}/events\" }}",
        sink.upstream.addr
    );
    let ficus = Ficus::start(
        upstream.addr,
        &rules(&sinks, &dir.path().join("outbox"), ""),
    )
    .await;
    let req = Request::delete("/orders/7")
        .header("host", "shop")
        .body(Full::new(Bytes::new()))
        .expect("request");
    assert_eq!(send(ficus.addr, req).await.status(), 204);
    let seen = eventually(WAIT, "the event at the HTTP sink", || async {
        sink.upstream.requests().into_iter().next()
    })
    .await;
    assert_eq!(
        seen.header("ce-type").as_deref(),
        Some("shop.order.cancelled")
    );
    assert!(seen.body.is_empty());
    assert_eq!(seen.header("content-length").as_deref(), Some("0"));
    assert!(seen.header("transfer-encoding").is_none());
}

/// A loopback address nothing listens on (bound, then freed): a sink that is down until the
/// test listens there.
async fn free_port() -> std::net::SocketAddr {
    tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind")
        .local_addr()
        .expect("addr")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_and_pending_move_while_the_dispatcher_waits_to_retry() {
    let upstream = shop().await;
    let port = free_port().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let sinks = format!("  broker: {{ type: http, url: \"http://{port}/\" }}");
    // Long backoffs (random up to 20 s): the gauges must not wait for the next attempt.
    let extra = "  retry: { initial: 20s, max: 20s }\n";
    let ficus = Ficus::start(
        upstream.addr,
        &rules(&sinks, &dir.path().join("outbox"), extra),
    )
    .await;
    assert_eq!(send(ficus.addr, post_order("0", "{}")).await.status(), 201);
    let gauges = || async {
        let m = ficus.metrics().await;
        let get = |name| sample(&m, name, &[("sink", "broker")]).unwrap_or(-1.0);
        (
            get("ficus_event_delivery_failures_total"),
            get("ficus_event_delivery_lag_seconds"),
            get("ficus_outbox_pending_events"),
        )
    };
    eventually(WAIT, "a first failed attempt", || async {
        (gauges().await.0 >= 1.0).then_some(())
    })
    .await;
    // Look for a stretch of 1.5 s with no attempt in it (each attempt counts a failure): the
    // lag grew by the time that passed and the new events count as pending all the same.
    let mut seen = Vec::new();
    for round in 0..8 {
        let (failures, lag, pending) = gauges().await;
        for i in 0..2 {
            let id = (10 * round + i + 1).to_string();
            assert_eq!(send(ficus.addr, post_order(&id, "{}")).await.status(), 201);
        }
        // The time that passes is what is measured here, not a stand-in for an event.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let after = gauges().await;
        if after.0 == failures {
            assert!(after.1 >= lag + 1.0, "lag moved on: {lag} -> {}", after.1);
            assert_eq!(after.2, pending + 2.0, "pending counts the new events");
            return;
        }
        seen.push((failures, after));
    }
    panic!("no 1.5 s without a retry in 8 tries (random backoffs up to 20 s): {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_that_is_down_gets_everything_in_order_when_it_returns() {
    let upstream = shop().await;
    // Reserve a port, then free it: the sink is down until the test listens there again.
    let port = free_port().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let sinks = format!("  broker: {{ type: http, url: \"http://{port}/\", mode: binary }}");
    let extra = "  retry: { initial: 20ms, max: 200ms }\n";
    let ficus = Ficus::start(
        upstream.addr,
        &rules(&sinks, &dir.path().join("outbox"), extra),
    )
    .await;

    let mut sent = Vec::new();
    for i in 0..30 {
        let id = format!("{}", i % 3); // three partition keys, interleaved
        let req = Request::post("/orders")
            .header("host", "shop")
            .header("content-type", "application/json")
            .header("x-order-id", id.clone())
            .body(Full::new(Bytes::from(format!(
                r#"{{"customer_id":"c{i}"}}"#
            ))))
            .expect("request");
        assert_eq!(
            send(ficus.addr, req).await.status(),
            201,
            "the monolith's answer does not wait for the sink"
        );
        sent.push((id, format!("c{i}")));
    }
    eventually(WAIT, "failures counted while the sink is down", || async {
        let m = ficus.metrics().await;
        (sample(
            &m,
            "ficus_event_delivery_failures_total",
            &[("sink", "broker")],
        )
        .unwrap_or(0.0)
            >= 2.0)
            .then_some(())
    })
    .await;
    eventually(
        WAIT,
        "30 pending and a lag while the sink is down",
        || async {
            let m = ficus.metrics().await;
            let pending = sample(&m, "ficus_outbox_pending_events", &[("sink", "broker")]);
            let lag = sample(
                &m,
                "ficus_event_delivery_lag_seconds",
                &[("sink", "broker")],
            )
            .unwrap_or(0.0);
            (pending == Some(30.0) && lag > 0.0).then_some(())
        },
    )
    .await;

    let listener = tokio::net::TcpListener::bind(port)
        .await
        .expect("rebind the sink's port");
    let sink = http_sink(Some(listener)).await;
    let received: Vec<cloudevents::Event> =
        eventually(Duration::from_secs(20), "all 30 delivered", || async {
            let events: Vec<_> = sink.upstream.requests().iter().map(to_sdk_event).collect();
            (events.len() >= 30).then_some(events)
        })
        .await;
    // Order per partition key (here, globally) is kept.
    let mut per_key: HashMap<String, Vec<String>> = HashMap::new();
    for e in &received {
        let key = ext(e, "partitionkey").expect("partitionkey");
        per_key.entry(key).or_default().push(
            data_json(e)["customer"]
                .as_str()
                .expect("customer")
                .to_string(),
        );
    }
    for (key, customers) in per_key {
        let expected: Vec<String> = sent
            .iter()
            .filter(|(k, _)| *k == key)
            .map(|(_, c)| c.clone())
            .collect();
        assert_eq!(customers, expected, "order for key {key}");
    }
    eventually(WAIT, "pending back to zero", || async {
        let m = ficus.metrics().await;
        (sample(&m, "ficus_outbox_pending_events", &[("sink", "broker")]) == Some(0.0))
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_events_are_dead_lettered_then_replayed_once_the_sink_is_fixed() {
    let upstream = shop().await;
    let sink = http_sink(None).await;
    sink.status.store(400, Ordering::SeqCst);
    let dir = tempfile::tempdir().expect("tempdir");
    let outbox = dir.path().join("outbox");
    let sinks = format!(
        "  broker: {{ type: http, url: \"http://{}/\" }}",
        sink.upstream.addr
    );
    let ficus = Ficus::start(
        upstream.addr,
        &rules(&sinks, &outbox, "  retry: { initial: 20ms, max: 100ms }\n"),
    )
    .await;
    for id in ["a", "b"] {
        assert_eq!(
            send(ficus.addr, post_order(id, r#"{"customer_id":"c"}"#))
                .await
                .status(),
            201
        );
    }
    eventually(WAIT, "two dead letters", || async {
        let m = ficus.metrics().await;
        (sample(
            &m,
            "ficus_events_dead_lettered_total",
            &[("sink", "broker")],
        ) == Some(2.0))
        .then_some(())
    })
    .await;
    assert!(sink.upstream.requests().is_empty());
    let status = ficus::outbox::status(&outbox, &[]).expect("status");
    let broker = status
        .sinks
        .iter()
        .find(|s| s.sink == "broker")
        .expect("broker");
    assert_eq!(broker.dead_letters, 2);

    // The sink is fixed; an operator replays (while ficus runs).
    sink.status.store(200, Ordering::SeqCst);
    assert_eq!(
        ficus::outbox::replay(&outbox, Some("broker")).expect("replay"),
        2
    );
    let events: Vec<_> = eventually(WAIT, "replayed events delivered", || async {
        let events: Vec<_> = sink.upstream.requests().iter().map(to_sdk_event).collect();
        (events.len() >= 2).then_some(events)
    })
    .await;
    let subjects: Vec<_> = events
        .iter()
        .map(|e| e.subject().unwrap_or("").to_string())
        .collect();
    assert_eq!(subjects, ["a", "b"]);
    eventually(WAIT, "no dead letters left", || async {
        let status = ficus::outbox::status(&outbox, &[]).expect("status");
        status
            .sinks
            .iter()
            .all(|s| s.dead_letters == 0 && s.replaying == 0)
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_outbox_rejects_matching_requests_before_the_monolith() {
    let upstream = shop().await;
    let dir = tempfile::tempdir().expect("tempdir");
    // A sink that never answers keeps every event in the outbox.
    let port = free_port().await;
    let sinks = format!("  broker: {{ type: http, url: \"http://{port}/\" }}");
    let extra = "  max_bytes: 1MiB\n  when_full: reject\n";
    let ficus = Ficus::start(
        upstream.addr,
        &whole_body_rule(&sinks, &dir.path().join("outbox"), extra),
    )
    .await;
    let mut accepted = 0;
    let mut refused = None;
    for i in 0..40 {
        let req = Request::post("/orders")
            .header("host", "shop")
            .header("content-type", "application/json")
            .header("x-order-id", i.to_string())
            .header("x-pad", "100000")
            .body(Full::new(Bytes::from_static(b"{}")))
            .expect("request");
        let resp = send(ficus.addr, req).await;
        if resp.status() == 503 {
            assert_eq!(resp.headers()["x-ficus-error"], "outbox_full");
            refused = Some(i);
            break;
        }
        assert_eq!(resp.status(), 201);
        accepted += 1;
    }
    assert!(refused.is_some(), "the outbox filled up");
    let seen_before = upstream.requests().len();
    assert_eq!(
        seen_before, accepted,
        "the refused request never reached the monolith"
    );
    // Requests no rule matches still pass.
    assert_eq!(get(ficus.addr, "/orders/1").await.0, 404);
}

/// `reject` admits a request while there is room for the largest event seen so far; one whose
/// event turns out larger than the room left has still changed the monolith's state, so its
/// event is kept past `max_bytes`, never dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admitted_request_keeps_its_event_even_past_max_bytes() {
    let upstream = shop().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port().await;
    let sinks = format!("  broker: {{ type: http, url: \"http://{port}/\" }}");
    let extra = "  max_bytes: 1MiB\n  when_full: reject\n";
    let ficus = Ficus::start(
        upstream.addr,
        &whole_body_rule(&sinks, &dir.path().join("outbox"), extra),
    )
    .await;
    let order = |i: usize, pad: &str| {
        Request::post("/orders")
            .header("host", "shop")
            .header("content-type", "application/json")
            .header("x-order-id", i.to_string())
            .header("x-pad", pad)
            .body(Full::new(Bytes::from_static(b"{}")))
            .expect("request")
    };
    // 10 KB events until less than 150 KB is left: room for the largest seen, not for 200 KB.
    let mut i = 0;
    loop {
        assert!(i < 200, "the outbox never filled");
        assert_eq!(send(ficus.addr, order(i, "10000")).await.status(), 201);
        i += 1;
        let bytes = sample(&ficus.metrics().await, "ficus_outbox_bytes", &[]).expect("gauge");
        if bytes > f64::from(1 << 20) - 150_000.0 {
            break;
        }
    }
    let resp = send(ficus.addr, order(i, "200000")).await;
    assert_eq!(resp.status(), 201, "admitted, and its event kept: {resp:?}");
    i += 1;
    let m = ficus.metrics().await;
    let emitted = sample(
        &m,
        "ficus_events_emitted_total",
        &[("rule", "order-created")],
    );
    assert_eq!(
        emitted,
        Some(i as f64),
        "every admitted request has its event"
    );
    let dropped = sample(
        &m,
        "ficus_events_dropped_total",
        &[("reason", "outbox_full")],
    );
    assert!(matches!(dropped, None | Some(0.0)), "dropped {dropped:?}");
    let bytes = sample(&m, "ficus_outbox_bytes", &[]).expect("gauge");
    assert!(bytes > f64::from(1 << 20), "past max_bytes: {bytes}");
    // From now on, requests are refused before the monolith.
    let resp = send(ficus.addr, order(i, "10")).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(upstream.requests().len(), i);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_outbox_with_drop_forwards_and_counts() {
    let upstream = shop().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port().await;
    let sinks = format!("  broker: {{ type: http, url: \"http://{port}/\" }}");
    let extra = "  max_bytes: 1MiB\n  when_full: drop\n";
    let ficus = Ficus::start(
        upstream.addr,
        &whole_body_rule(&sinks, &dir.path().join("outbox"), extra),
    )
    .await;
    for i in 0..20 {
        let req = Request::post("/orders")
            .header("host", "shop")
            .header("content-type", "application/json")
            .header("x-order-id", i.to_string())
            .header("x-pad", "100000")
            .body(Full::new(Bytes::from_static(b"{}")))
            .expect("request");
        assert_eq!(
            send(ficus.addr, req).await.status(),
            201,
            "drop never refuses"
        );
    }
    assert_eq!(upstream.requests().len(), 20);
    let m = ficus.metrics().await;
    let dropped = sample(
        &m,
        "ficus_events_dropped_total",
        &[("reason", "outbox_full")],
    )
    .expect("series");
    let emitted = sample(
        &m,
        "ficus_events_emitted_total",
        &[("rule", "order-created")],
    )
    .expect("series");
    assert!(dropped >= 1.0, "dropped {dropped}");
    assert_eq!(
        dropped + emitted,
        20.0,
        "every event either stored or counted as dropped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_tail_streams_derived_events() {
    let upstream = shop().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let sinks = format!(
        "  audit: {{ type: file, path: {} }}",
        dir.path().join("e.jsonl").display()
    );
    let ficus = Ficus::start(
        upstream.addr,
        &rules(&sinks, &dir.path().join("outbox"), ""),
    )
    .await;
    let req = Request::get("/events/tail")
        .header("host", "admin")
        .body(http_body_util::Empty::<Bytes>::new())
        .expect("request");
    let resp = send_streaming(ficus.admin, req).await;
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    let hello = body.frame().await.expect("frame").expect("ok");
    assert!(String::from_utf8_lossy(hello.data_ref().expect("data")).starts_with(':'));
    assert_eq!(
        send(ficus.addr, post_order("77", r#"{"customer_id":"c"}"#))
            .await
            .status(),
        201
    );
    let chunk = tokio::time::timeout(WAIT, body.frame())
        .await
        .expect("event in time")
        .expect("frame")
        .expect("ok");
    let text = String::from_utf8_lossy(chunk.data_ref().expect("data")).into_owned();
    // Unnamed events (no `event:` line): a browser's `EventSource.onmessage` fires for them.
    assert!(text.starts_with("id: "), "{text}");
    assert!(!text.lines().any(|l| l.starts_with("event:")), "{text}");
    assert!(text.ends_with("\n\n"), "{text}");
    let data = text
        .lines()
        .find_map(|l| l.strip_prefix("data: "))
        .expect("data line");
    let event: cloudevents::Event = serde_json::from_str(data).expect("CloudEvent");
    assert_eq!(event.subject(), Some("77"));
    assert_eq!(event.ty(), "shop.order.created");
    assert_eq!(
        text.lines().next(),
        Some(format!("id: {}", event.id()).as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncapi_is_served_and_names_every_rule() {
    let upstream = shop().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let sinks = format!(
        "  audit: {{ type: file, path: {} }}",
        dir.path().join("e.jsonl").display()
    );
    let ficus = Ficus::start(
        upstream.addr,
        &rules(&sinks, &dir.path().join("outbox"), ""),
    )
    .await;
    let (status, body) = get(ficus.admin, "/asyncapi").await;
    assert_eq!(status, 200);
    let doc: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(doc["asyncapi"], "3.0.0");
    for rule in ["order-created", "order-cancelled", "text-seen"] {
        assert!(doc["channels"][rule]["address"].is_string(), "{rule}");
        assert_eq!(doc["operations"][rule]["action"], "send");
        assert!(doc["components"]["messages"][rule]["payload"]["properties"]["data"].is_object());
    }
    let data = &doc["components"]["messages"]["order-created"]["payload"]["properties"]["data"];
    assert_eq!(data["type"], "object");
    assert!(data["properties"]["order_id"].is_object());
    assert_eq!(
        doc["channels"]["order-created"]["address"], "shop.order.created",
        "channel address is the event type"
    );
}

fn ficus_cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(crate::support::binary())
        .args(args)
        .env_remove("FICUS_CONFIG")
        .output()
        .expect("run ficus")
}

#[test]
fn rules_test_prints_events_or_why_none() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sinks = format!(
        "  audit: {{ type: file, path: {} }}",
        dir.path().join("e.jsonl").display()
    );
    let config = dir.path().join("ficus.yaml");
    std::fs::write(
        &config,
        format!(
            "upstreams:\n  monolith: {{ url: \"http://127.0.0.1:1\" }}\n{}",
            rules(&sinks, &dir.path().join("outbox"), "")
        ),
    )
    .expect("write config");
    let samples = dir.path().join("samples.yaml");
    std::fs::write(
        &samples,
        r#"- name: created
  request:
    method: POST
    path: /orders
    headers: { traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01" }
    body: { customer_id: c-1, password: "p" }
  response: { status: 201, body: { id: "o-9", total: 3, version: 1 } }
- name: junk-trace
  request: { method: POST, path: /orders, headers: { traceparent: junk-trace-value } }
  response: { status: 201, body: { id: "o-10", total: 3, version: 1 } }
- name: failed
  request: { method: POST, path: /orders }
  response: { status: 500, body: { error: boom } }
- name: unrouted
  request: { method: GET, path: /health }
  response: { status: 200 }
"#,
    )
    .expect("write samples");
    let out = ficus_cli(&[
        "rules",
        "test",
        "-c",
        config.to_str().expect("utf-8"),
        samples.to_str().expect("utf-8"),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("sample 1 (created): POST /orders -> 201"),
        "{stdout}"
    );
    assert!(
        stdout.contains("rule order-created: emits shop.order.created to every sink"),
        "{stdout}"
    );
    assert!(stdout.contains("\"order_id\": \"o-9\""), "{stdout}");
    assert!(!stdout.contains("\"p\""), "redacted: {stdout}");
    assert!(
        stdout.contains(
            "\"traceparent\": \"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\""
        ),
        "{stdout}"
    );
    assert!(stdout.contains("\"subject\": \"o-10\""), "{stdout}");
    assert!(!stdout.contains("junk-trace-value"), "{stdout}");
    assert!(stdout.contains("sample 3 (failed)"), "{stdout}");
    assert!(
        stdout.contains("rule order-created: no event: "),
        "{stdout}"
    );
    assert!(
        stdout.contains("no events: no rule matches GET /health"),
        "{stdout}"
    );
    assert!(stdout.contains("4 sample(s), 2 event(s)"), "{stdout}");
}

#[test]
fn asyncapi_command_prints_the_document() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sinks = format!(
        "  audit: {{ type: file, path: {} }}",
        dir.path().join("e.jsonl").display()
    );
    let config = dir.path().join("ficus.yaml");
    std::fs::write(
        &config,
        format!(
            "upstreams:\n  monolith: {{ url: \"http://127.0.0.1:1\" }}\n{}",
            rules(&sinks, &dir.path().join("outbox"), "")
        ),
    )
    .expect("write config");
    let out = ficus_cli(&["asyncapi", "-c", config.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(0));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json document");
    assert_eq!(doc["asyncapi"], "3.0.0");
    assert_eq!(doc["channels"].as_object().map(|c| c.len()), Some(3));
}

#[test]
fn invalid_rules_are_located_config_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("bad.yaml");
    std::fs::write(
        &config,
        "upstreams:\n  monolith: { url: \"http://127.0.0.1:1\" }\nevents:\n  rules:\n    - name: r\n      match: { path: \"/orders/{id\" }\n      type: \"{response.bogus}\"\n      if: \"response.status ==\"\n      sinks: [nope]\nsinks:\n  audit: { type: kafka }\n",
    )
    .expect("write");
    let out = ficus_cli(&["check", "-c", config.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for want in [
        ":6:22: events.rules[0].match.path:",
        ":7:13: events.rules[0].type:",
        ":8:11: events.rules[0].if:",
        ":9:15: events.rules[0].sinks[0]: no sink named `nope`",
        ":11:10: sinks.audit.brokers: is required",
        ":11:10: sinks.audit.topic: is required",
    ] {
        assert!(stderr.contains(want), "missing `{want}` in:\n{stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdout_sink_prints_one_structured_event_per_line() {
    let upstream = shop().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let yaml = crate::support::config_yaml(
        upstream.addr,
        &rules("  out: { type: stdout }", &dir.path().join("outbox"), ""),
    );
    let path = dir.path().join("ficus.yaml");
    std::fs::write(&path, yaml).expect("write");
    let mut child = tokio::process::Command::new(crate::support::binary())
        .args(["run", "-c", path.to_str().expect("utf-8")])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn");
    let stderr = child.stderr.take().expect("stderr");
    let mut err_lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stderr));
    let addr: std::net::SocketAddr = tokio::time::timeout(WAIT, async {
        while let Some(line) = err_lines.next_line().await.expect("read") {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if v["message"] == "listening" {
                return v["listen"].as_str().expect("listen").parse().expect("addr");
            }
        }
        panic!("no listening line")
    })
    .await
    .expect("started");
    assert_eq!(
        send(addr, post_order("5", r#"{"customer_id":"c"}"#))
            .await
            .status(),
        201
    );
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let line = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("a line in time")
        .expect("read")
        .expect("a line");
    let event: cloudevents::Event = serde_json::from_str(&line).expect("structured CloudEvent");
    assert_eq!(event.subject(), Some("5"));
    let _ = child.kill().await;
}
