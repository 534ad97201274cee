//! Strangler routing against real upstreams: takeover, header match, prefix and host rewrite,
//! weighted and sticky split, fallback, and shadow traffic with comparison.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;

use crate::support::upstream::{full, record};
use crate::support::{eventually, get, sample, send, Ficus, TestUpstream, WAIT};

/// An upstream that records and answers `{"served_by": NAME, "path": ...}` with `status`.
async fn named(name: &'static str, status: u16) -> TestUpstream {
    TestUpstream::with(move |req, rec| async move {
        let seen = record(req, &rec).await;
        let body = serde_json::json!({"served_by": name, "path": seen.uri, "generated_at": fastrand::u64(..)});
        http::Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(full(body.to_string()))
            .expect("response")
    })
    .await
}

fn two_upstreams(mono: &TestUpstream, func: &TestUpstream, routes: &str) -> String {
    format!(
        "listen: {{ address: 127.0.0.1:0 }}\nadmin: {{ address: 127.0.0.1:0 }}\nupstreams:\n  monolith: {{ url: \"http://{}\" }}\n  orders-fn: {{ url: \"http://{}\", rewrite_host: true }}\ndefault_upstream: monolith\nroutes:\n{routes}",
        mono.addr, func.addr
    )
}

fn req(method: &str, path: &str, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let mut b = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "shop.example");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(Bytes::new())).expect("request")
}

async fn served_by(addr: std::net::SocketAddr, r: Request<Full<Bytes>>) -> (u16, String) {
    let resp = send(addr, r).await;
    let v: serde_json::Value = serde_json::from_slice(resp.body()).unwrap_or_default();
    (
        resp.status().as_u16(),
        v["served_by"].as_str().unwrap_or("").to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_take_over_by_method_path_and_header() {
    let mono = named("monolith", 200).await;
    let func = named("orders-fn", 200).await;
    let yaml = two_upstreams(
        &mono,
        &func,
        "  - name: canary\n    match: { path: \"/orders/{*rest}\", headers: { x-canary: \"1\" } }\n    upstream: orders-fn\n  - name: new-orders-read\n    match: { method: GET, path: \"/orders/{id}\" }\n    upstream: orders-fn\n    strip_prefix: /orders\n    add_prefix: /v2/orders\n",
    );
    let ficus = Ficus::start_yaml(&yaml).await;
    assert_eq!(
        served_by(ficus.addr, req("GET", "/orders/7?x=1", &[])).await,
        (200, "orders-fn".into())
    );
    assert_eq!(
        served_by(ficus.addr, req("POST", "/orders/7", &[])).await,
        (200, "monolith".into())
    );
    assert_eq!(
        served_by(ficus.addr, req("POST", "/orders/7", &[("x-canary", "1")])).await,
        (200, "orders-fn".into())
    );
    assert_eq!(
        served_by(ficus.addr, req("GET", "/search", &[])).await,
        (200, "monolith".into())
    );

    let f = func.requests();
    assert_eq!(f[0].uri, "/v2/orders/7?x=1", "prefix rewritten, query kept");
    assert_eq!(
        f[0].header("host").as_deref(),
        Some(func.addr.to_string().as_str()),
        "Host rewritten"
    );
    assert_eq!(
        f[0].header("x-forwarded-host").as_deref(),
        Some("shop.example")
    );
    assert_eq!(
        mono.requests()[0].header("host").as_deref(),
        Some("shop.example"),
        "Host kept"
    );

    let m = ficus.metrics().await;
    let count = |route| sample(&m, "ficus_requests_total", &[("route", route)]);
    assert_eq!(count("new-orders-read"), Some(1.0));
    assert_eq!(count("canary"), Some(1.0));
    assert_eq!(count("default"), Some(2.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_split_keeps_its_proportions_and_sticky_users_stay_put() {
    let mono = named("monolith", 200).await;
    let func = named("orders-fn", 200).await;
    let yaml = two_upstreams(
        &mono,
        &func,
        "  - name: random\n    match: { path: /random }\n    split: [{ upstream: monolith, weight: 80 }, { upstream: orders-fn, weight: 20 }]\n  - name: sticky\n    match: { path: /sticky }\n    split: [{ upstream: monolith, weight: 50 }, { upstream: orders-fn, weight: 50 }]\n    sticky: { header: x-user-id }\n",
    );
    let ficus = Ficus::start_yaml(&yaml).await;
    const N: usize = 2000;
    let mut to_fn = 0;
    for _ in 0..N {
        if served_by(ficus.addr, req("GET", "/random", &[])).await.1 == "orders-fn" {
            to_fn += 1;
        }
    }
    // Binomial(2000, 0.2): sd = 17.9; 5 sd either side is a false alarm once in ~3.5 million runs.
    let expected = N as f64 * 0.2;
    assert!(
        (to_fn as f64 - expected).abs() < 5.0 * 17.9,
        "{to_fn} of {N} to orders-fn"
    );

    let mut users_on_fn = 0;
    for user in 0..100 {
        let id = format!("user-{user}");
        let first = served_by(ficus.addr, req("GET", "/sticky", &[("x-user-id", &id)]))
            .await
            .1;
        for _ in 0..4 {
            assert_eq!(
                served_by(ficus.addr, req("GET", "/sticky", &[("x-user-id", &id)]))
                    .await
                    .1,
                first,
                "{id} moved"
            );
        }
        if first == "orders-fn" {
            users_on_fn += 1;
        }
    }
    // Binomial(100, 0.5): sd = 5; 5 sd.
    assert!(
        (25..=75).contains(&users_on_fn),
        "{users_on_fn} of 100 users on orders-fn"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_requests_fall_back_once_and_writes_never_repeat() {
    let failing = named("orders-fn", 503).await;
    let mono = named("monolith", 200).await;
    // orders-fn answers 503; a refused port stands for a dead function.
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind")
        .local_addr()
        .expect("addr");
    let yaml = format!(
        "listen: {{ address: 127.0.0.1:0 }}\nadmin: {{ address: 127.0.0.1:0 }}\nupstreams:\n  monolith: {{ url: \"http://{}\" }}\n  orders-fn: {{ url: \"http://{}\" }}\n  dead-fn: {{ url: \"http://{dead}\" }}\ndefault_upstream: monolith\nroutes:\n  - name: flaky\n    match: {{ path: \"/orders/{{id}}\" }}\n    upstream: orders-fn\n    fallback: monolith\n  - name: gone\n    match: {{ path: /gone }}\n    upstream: dead-fn\n    fallback: {{ upstream: monolith, methods: [GET, POST] }}\n",
        mono.addr, failing.addr
    );
    let ficus = Ficus::start_yaml(&yaml).await;

    assert_eq!(
        served_by(ficus.addr, req("GET", "/orders/1", &[])).await,
        (200, "monolith".into())
    );
    assert_eq!(failing.requests().len(), 1, "the primary was tried once");
    let put = Request::put("/orders/1")
        .header("host", "shop")
        .body(Full::new(Bytes::from_static(b"{\"total\":3}")))
        .expect("request");
    let resp = send(ficus.addr, put).await;
    assert_eq!(resp.status(), 200);
    let fallback_put = mono
        .requests()
        .into_iter()
        .find(|s| s.method == "PUT")
        .expect("PUT at the fallback");
    assert_eq!(
        fallback_put.body, b"{\"total\":3}",
        "the body is sent again whole"
    );

    // POST is not idempotent: the 503 reaches the client, nothing is sent twice.
    let before = mono.requests().len();
    let (status, by) = served_by(ficus.addr, req("POST", "/orders/1", &[])).await;
    assert_eq!((status, by.as_str()), (503, "orders-fn"));
    assert_eq!(mono.requests().len(), before);

    // A refused connection, and a route that lists POST as safe to resend.
    assert_eq!(
        served_by(ficus.addr, req("POST", "/gone", &[])).await,
        (200, "monolith".into())
    );

    let m = ficus.metrics().await;
    assert_eq!(
        sample(&m, "ficus_route_fallbacks_total", &[("route", "flaky")]),
        Some(2.0)
    );
    assert_eq!(
        sample(&m, "ficus_route_fallbacks_total", &[("route", "gone")]),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &m,
            "ficus_upstream_errors_total",
            &[("upstream", "dead-fn"), ("kind", "connect")]
        ),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_shadow_changes_nothing_the_client_sees_and_is_capped() {
    let mono = named("monolith", 200).await;
    let hung = Arc::new(AtomicUsize::new(0));
    let h = hung.clone();
    let shadow = TestUpstream::with(move |_req, _rec| {
        let h = h.clone();
        async move {
            h.fetch_add(1, Ordering::SeqCst);
            std::future::pending::<()>().await;
            unreachable!()
        }
    })
    .await;
    let yaml = two_upstreams(
        &mono,
        &shadow,
        "  - name: search\n    match: { path: /search }\n    upstream: monolith\n    shadow: { upstream: orders-fn, sample: 1.0, max_in_flight: 2, timeout: 30s, compare: { headers: [content-type] } }\n",
    );
    let ficus = Ficus::start_yaml(&yaml).await;
    for _ in 0..6 {
        let started = tokio::time::Instant::now();
        assert_eq!(
            served_by(ficus.addr, req("GET", "/search", &[])).await,
            (200, "monolith".into())
        );
        // Generous for a loaded CI machine, far below the shadow's 30 s hang.
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "client waited on the shadow"
        );
    }
    eventually(WAIT, "two shadow copies in flight", || async {
        (hung.load(Ordering::SeqCst) == 2).then_some(())
    })
    .await;
    let m = ficus.metrics().await;
    assert_eq!(
        sample(&m, "ficus_shadow_dropped_total", &[("route", "search")]),
        Some(4.0),
        "beyond the cap: dropped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_comparisons_count_matches_and_mismatches() {
    let mono = named("monolith", 200).await;
    // The shadow agrees on /same (its generated_at differs, and is ignored), differs in body on
    // /other, in status on /broken; a refused POST is never shadowed by default.
    let shadow = TestUpstream::with(|req, rec| async move {
        let seen = record(req, &rec).await;
        let (status, who) = match seen.uri.as_str() {
            "/broken" => (500, "monolith"),
            "/other" => (200, "someone-else"),
            _ => (200, "monolith"),
        };
        let body = serde_json::json!({"served_by": who, "path": seen.uri, "generated_at": "later"});
        http::Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(full(body.to_string()))
            .expect("response")
    })
    .await;
    let yaml = two_upstreams(
        &mono,
        &shadow,
        "  - name: mirror\n    match: { path: \"/{*any}\" }\n    upstream: monolith\n    shadow:\n      upstream: orders-fn\n      compare: { headers: [content-type], ignore: [response.body.generated_at] }\n",
    );
    let ficus = Ficus::start_yaml(&yaml).await;
    for path in ["/same", "/same", "/other", "/broken"] {
        assert_eq!(
            get(ficus.addr, path).await.0,
            200,
            "the client always gets the primary"
        );
    }
    let post = Request::post("/same")
        .header("host", "shop")
        .body(Full::new(Bytes::new()))
        .expect("request");
    assert_eq!(send(ficus.addr, post).await.status(), 200);
    eventually(WAIT, "four comparisons", || async {
        let m = ficus.metrics().await;
        let c = |r| {
            sample(
                &m,
                "ficus_shadow_comparisons_total",
                &[("route", "mirror"), ("result", r)],
            )
            .unwrap_or(0.0)
        };
        (c("match") + c("body_mismatch") + c("status_mismatch") >= 4.0)
            .then(|| (c("match"), c("body_mismatch"), c("status_mismatch")))
    })
    .await
    .eq(&(2.0, 1.0, 1.0))
    .then_some(())
    .expect("2 match, 1 body_mismatch, 1 status_mismatch");
    assert!(
        shadow.requests().iter().all(|s| s.method == "GET"),
        "POST is not shadowed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_name_the_upstream_that_served_and_shadows_emit_none() {
    let mono = named("monolith", 200).await;
    let func = named("orders-fn", 200).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("e.jsonl");
    let yaml = format!(
        "{}events:\n  rules:\n    - name: read\n      match: {{ method: GET, path: \"/{{*any}}\" }}\n      type: shop.read\n      subject: \"{{response.body.path}}\"\nsinks:\n  audit: {{ type: file, path: {} }}\noutbox:\n  dir: {}\n",
        two_upstreams(
            &mono,
            &func,
            "  - name: new\n    match: { path: /new }\n    upstream: orders-fn\n  - name: mirrored\n    match: { path: /old }\n    upstream: monolith\n    shadow: { upstream: orders-fn }\n",
        ),
        file.display(),
        dir.path().join("outbox").display()
    );
    let ficus = Ficus::start_yaml(&yaml).await;
    assert_eq!(get(ficus.addr, "/new").await.0, 200);
    assert_eq!(get(ficus.addr, "/old").await.0, 200);
    eventually(WAIT, "the shadow copy arrived", || async {
        (func.requests().len() == 2).then_some(())
    })
    .await;
    let events = eventually(WAIT, "two events", || async {
        let e = crate::events::read_events(&file);
        (e.len() >= 2).then_some(e)
    })
    .await;
    use cloudevents::AttributesReader;
    let by: Vec<(String, String)> = events
        .iter()
        .map(|e| {
            (
                e.subject().unwrap_or("").to_string(),
                e.extension("ficusupstream")
                    .map(|v| v.to_string())
                    .unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        by,
        [
            ("/new".to_string(), "orders-fn".to_string()),
            ("/old".to_string(), "monolith".to_string())
        ]
    );
    let m = ficus.metrics().await;
    assert_eq!(
        sample(&m, "ficus_events_emitted_total", &[("rule", "read")]),
        Some(2.0),
        "the shadow emitted nothing"
    );
}

#[test]
fn check_prints_the_routing_table() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("r.yaml");
    std::fs::write(
        &path,
        "upstreams:\n  monolith: { url: \"http://127.0.0.1:1\" }\n  orders-fn: { url: \"http://127.0.0.1:2\" }\ndefault_upstream: monolith\nroutes:\n  - name: canary\n    match: { path: \"/checkout/{*rest}\" }\n    split: [{ upstream: monolith, weight: 90 }, { upstream: orders-fn, weight: 10 }]\n    sticky: { cookie: uid }\n    fallback: monolith\n",
    )
    .expect("write");
    let out = std::process::Command::new(crate::support::binary())
        .args(["check", "-c", path.to_str().expect("utf-8")])
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("  canary: * /checkout/{*rest} -> split [monolith 90, orders-fn 10], sticky by cookie uid, fallback monolith"),
        "{stdout}"
    );
    assert!(stdout.contains("  default: * -> monolith"), "{stdout}");
}

#[test]
fn shadowing_writes_is_allowed_with_a_located_warning() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("w.yaml");
    std::fs::write(
        &path,
        "upstreams:\n  monolith: { url: \"http://127.0.0.1:1\" }\n  orders-fn: { url: \"http://127.0.0.1:2\" }\ndefault_upstream: monolith\nroutes:\n  - name: w\n    match: { path: /orders }\n    upstream: monolith\n    shadow: { upstream: orders-fn, methods: [GET, POST] }\n",
    )
    .expect("write");
    let out = std::process::Command::new(crate::support::binary())
        .args(["check", "-c", path.to_str().expect("utf-8")])
        .output()
        .expect("run");
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(":9:45: routes[0].shadow.methods: shadowing methods other than GET and HEAD sends writes twice"),
        "{stderr}"
    );
}
