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
            .header("x-served-by", name)
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
    let latency = |upstream| {
        sample(
            &m,
            "ficus_upstream_request_duration_seconds_count",
            &[("upstream", upstream)],
        )
    };
    assert_eq!(latency("orders-fn"), Some(2.0), "per-upstream latency");
    assert_eq!(latency("monolith"), Some(2.0));
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
    const N: usize = 3000;
    let mut to_fn = 0;
    for _ in 0..N {
        if served_by(ficus.addr, req("GET", "/random", &[])).await.1 == "orders-fn" {
            to_fn += 1;
        }
    }
    // Binomial(3000, 0.2): sd = 21.9; 5 sd either side is a false alarm once in ~3.5 million runs.
    let expected = N as f64 * 0.2;
    assert!(
        (to_fn as f64 - expected).abs() < 5.0 * 21.9,
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
        // Same JSON, announced as text: a compared header differs.
        let content_type = match seen.uri.as_str() {
            "/typed" => "text/plain",
            _ => "application/json",
        };
        let body = serde_json::json!({"served_by": who, "path": seen.uri, "generated_at": "later"});
        http::Response::builder()
            .status(status)
            .header("content-type", content_type)
            // Not a compared header: its difference is not looked at.
            .header("x-served-by", "shadow")
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
    for path in ["/same", "/same", "/other", "/broken", "/typed"] {
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
    // HEAD is shadowed too; its empty bodies agree.
    assert_eq!(
        send(ficus.addr, req("HEAD", "/same", &[])).await.status(),
        200
    );
    let counted = eventually(WAIT, "six comparisons", || async {
        let m = ficus.metrics().await;
        let c = |r| {
            sample(
                &m,
                "ficus_shadow_comparisons_total",
                &[("route", "mirror"), ("result", r)],
            )
            .unwrap_or(0.0)
        };
        (c("match") + c("body_mismatch") + c("status_mismatch") + c("error") >= 6.0).then(|| {
            (
                c("match"),
                c("body_mismatch"),
                c("status_mismatch"),
                c("error"),
            )
        })
    })
    .await;
    assert_eq!(
        counted,
        (3.0, 2.0, 1.0, 0.0),
        "match: 2 GET and 1 HEAD; body_mismatch: /other's body, /typed's content-type; status_mismatch: /broken"
    );
    let m = ficus.metrics().await;
    let mut results: Vec<&str> = m
        .lines()
        .filter(|l| l.starts_with("ficus_shadow_comparisons_total{"))
        .filter_map(|l| l.split("result=\"").nth(1)?.split('"').next())
        .collect();
    results.sort_unstable();
    assert_eq!(
        results,
        ["body_mismatch", "error", "match", "status_mismatch"],
        "exactly SPEC section 5's result values"
    );
    assert!(
        shadow.requests().iter().all(|s| s.method != "POST"),
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
        "upstreams:\n  monolith: { url: \"http://127.0.0.1:1\" }\n  orders-fn: { url: \"http://127.0.0.1:2\", rewrite_host: true }\ndefault_upstream: monolith\nroutes:\n  - name: canary\n    match: { path: \"/checkout/{*rest}\" }\n    split: [{ upstream: monolith, weight: 90 }, { upstream: orders-fn, weight: 10 }]\n    sticky: { cookie: uid }\n    fallback: monolith\n  - name: beta\n    match: { method: GET, path: \"/orders/{id}\", headers: { x-canary: \"1\" } }\n    upstream: orders-fn\n    strip_prefix: /orders\n    add_prefix: /v2/orders\n    fallback: { upstream: monolith, methods: [GET, POST] }\n  - name: search\n    match: { path: /search }\n    upstream: monolith\n    shadow: { upstream: orders-fn, sample: 0.1, compare: { headers: [content-type] } }\n",
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
    for line in [
        "  monolith: http://127.0.0.1:1 (default)",
        "  orders-fn: http://127.0.0.1:2 (Host rewritten)",
        "  beta: GET /orders/{id} [x-canary: 1] -> orders-fn, path /orders/... -> /v2/orders/..., fallback monolith for GET/POST",
        "  search: * /search -> monolith, shadow orders-fn (10% of GET/HEAD, compared)",
        "  default: * -> monolith",
    ] {
        assert!(stdout.lines().any(|l| l == line), "{line}\n{stdout}");
    }
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

/// A port nothing listens on: connecting is refused.
async fn refused_addr() -> std::net::SocketAddr {
    tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind")
        .local_addr()
        .expect("addr")
}

/// An upstream that takes every request and never answers; counts the arrivals.
async fn hanging() -> (TestUpstream, Arc<AtomicUsize>) {
    let arrived = Arc::new(AtomicUsize::new(0));
    let a = arrived.clone();
    let upstream = TestUpstream::with(move |_req, _rec| {
        let a = a.clone();
        async move {
            a.fetch_add(1, Ordering::SeqCst);
            std::future::pending::<()>().await;
            unreachable!()
        }
    })
    .await;
    (upstream, arrived)
}

/// Three routes whose upstream fails in each way SPEC §2 names (`/5xx` answers 503, `/timeout`
/// never answers within the 300 ms `timeout`, `/refused` refuses the connection), each with
/// `fallback: monolith`.
async fn failing_routes() -> (Ficus, [TestUpstream; 3], Arc<AtomicUsize>) {
    let mono = named("monolith", 200).await;
    let failing = named("failing-fn", 503).await;
    let (slow, arrived) = hanging().await;
    let dead = refused_addr().await;
    let yaml = format!(
        "listen: {{ address: 127.0.0.1:0 }}\nadmin: {{ address: 127.0.0.1:0 }}\nupstreams:\n  monolith: {{ url: \"http://{}\" }}\n  failing-fn: {{ url: \"http://{}\" }}\n  slow-fn: {{ url: \"http://{}\", timeout: 300ms }}\n  dead-fn: {{ url: \"http://{dead}\" }}\ndefault_upstream: monolith\nroutes:\n  - name: on-5xx\n    match: {{ path: /5xx }}\n    upstream: failing-fn\n    fallback: monolith\n  - name: on-timeout\n    match: {{ path: /timeout }}\n    upstream: slow-fn\n    fallback: monolith\n  - name: on-refused\n    match: {{ path: /refused }}\n    upstream: dead-fn\n    fallback: monolith\n",
        mono.addr, failing.addr, slow.addr
    );
    let ficus = Ficus::start_yaml(&yaml).await;
    (ficus, [mono, failing, slow], arrived)
}

const TRIGGERS: [(&str, &str); 3] = [
    ("/5xx", "on-5xx"),
    ("/timeout", "on-timeout"),
    ("/refused", "on-refused"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_fallback_trigger_retries_each_idempotent_method_once() {
    let (ficus, [mono, failing, _slow], slow_arrivals) = failing_routes().await;
    const METHODS: [&str; 5] = ["GET", "HEAD", "OPTIONS", "PUT", "DELETE"];
    for (path, _) in TRIGGERS {
        for method in METHODS {
            let resp = send(ficus.addr, req(method, path, &[])).await;
            assert_eq!(resp.status(), 200, "{method} {path}");
            assert_eq!(
                resp.headers()
                    .get("x-served-by")
                    .and_then(|v| v.to_str().ok()),
                Some("monolith"),
                "{method} {path}: the client sees the fallback's one response"
            );
            assert!(resp.headers().get("x-ficus-error").is_none());
        }
    }
    let fell_back: Vec<(String, String)> = mono
        .requests()
        .into_iter()
        .map(|s| (s.method, s.uri))
        .collect();
    let expected: Vec<(String, String)> = TRIGGERS
        .iter()
        .flat_map(|(path, _)| METHODS.iter().map(|m| (m.to_string(), path.to_string())))
        .collect();
    assert_eq!(
        fell_back, expected,
        "each request reached the fallback once"
    );
    assert_eq!(
        failing.requests().len(),
        5,
        "the 5xx primary was tried once each"
    );
    assert_eq!(
        slow_arrivals.load(Ordering::SeqCst),
        5,
        "the slow primary too"
    );

    let m = ficus.metrics().await;
    for (_, route) in TRIGGERS {
        assert_eq!(
            sample(&m, "ficus_route_fallbacks_total", &[("route", route)]),
            Some(5.0),
            "{route}"
        );
        assert_eq!(
            sample(
                &m,
                "ficus_requests_total",
                &[("route", route), ("code", "200")]
            ),
            Some(5.0),
            "{route}"
        );
    }
    let errors = |upstream, kind| {
        sample(
            &m,
            "ficus_upstream_errors_total",
            &[("upstream", upstream), ("kind", kind)],
        )
    };
    assert_eq!(errors("dead-fn", "connect"), Some(5.0));
    assert_eq!(errors("slow-fn", "timeout"), Some(5.0));
    assert_eq!(
        sample(
            &m,
            "ficus_upstream_errors_total",
            &[("upstream", "failing-fn")]
        ),
        Some(0.0),
        "a 503 is an answer, not an upstream error"
    );
    let latency = |upstream| {
        sample(
            &m,
            "ficus_upstream_request_duration_seconds_count",
            &[("upstream", upstream)],
        )
    };
    assert_eq!(latency("monolith"), Some(15.0));
    assert_eq!(latency("failing-fn"), Some(5.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_idempotent_requests_are_never_sent_twice_whatever_the_failure() {
    let (ficus, [mono, failing, _slow], slow_arrivals) = failing_routes().await;
    for method in ["POST", "PATCH"] {
        for (path, expected_status, ficus_error) in [
            ("/5xx", 503, None),
            ("/timeout", 504, Some("timeout")),
            ("/refused", 502, Some("connect")),
        ] {
            let resp = send(ficus.addr, req(method, path, &[])).await;
            assert_eq!(resp.status(), expected_status, "{method} {path}");
            assert_eq!(
                resp.headers()
                    .get("x-ficus-error")
                    .and_then(|v| v.to_str().ok()),
                ficus_error,
                "{method} {path}"
            );
        }
    }
    assert!(mono.requests().is_empty(), "nothing reached the fallback");
    assert_eq!(failing.requests().len(), 2);
    assert_eq!(slow_arrivals.load(Ordering::SeqCst), 2);
    let m = ficus.metrics().await;
    for (_, route) in TRIGGERS {
        assert_eq!(
            sample(&m, "ficus_route_fallbacks_total", &[("route", route)]),
            Some(0.0),
            "{route}"
        );
    }
}

/// A body of unknown length (chunked on the wire): `chunks` frames of `size` bytes, numbered so
/// that reordering or loss shows.
fn chunked(
    chunks: usize,
    size: usize,
) -> (
    http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>,
    Vec<u8>,
) {
    let data: Vec<u8> = (0..chunks * size).map(|i| (i % 251) as u8).collect();
    let frames: Vec<Result<http_body::Frame<Bytes>, std::convert::Infallible>> = data
        .chunks(size)
        .map(|c| Ok(http_body::Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
    (http_body_util::BodyExt::boxed(body), data)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_bodies_up_to_64_kib_are_sent_again_and_larger_ones_stream_once() {
    let mono = named("monolith", 200).await;
    let failing = named("failing-fn", 503).await;
    let yaml = format!(
        "listen: {{ address: 127.0.0.1:0 }}\nadmin: {{ address: 127.0.0.1:0 }}\nupstreams:\n  monolith: {{ url: \"http://{}\" }}\n  failing-fn: {{ url: \"http://{}\" }}\ndefault_upstream: monolith\nroutes:\n  - name: flaky\n    match: {{ path: \"/orders/{{id}}\" }}\n    upstream: failing-fn\n    fallback: monolith\n",
        mono.addr, failing.addr
    );
    let ficus = Ficus::start_yaml(&yaml).await;
    let put = |path: &str| Request::put(path).header("host", "shop");

    // With a Content-Length, at the limit.
    let small: Vec<u8> = (0..64 * 1024).map(|i| (i % 253) as u8).collect();
    let resp = send(
        ficus.addr,
        put("/orders/1")
            .body(Full::new(Bytes::from(small.clone())))
            .expect("request"),
    )
    .await;
    assert_eq!(resp.status(), 200);
    // Chunked: no length announced, but it ends within the limit.
    let (body, chunked_small) = chunked(10, 1000);
    let resp =
        crate::support::send_streaming(ficus.addr, put("/orders/2").body(body).expect("request"))
            .await;
    assert_eq!(resp.status(), 200);
    let at_fallback: Vec<(String, Vec<u8>)> = mono
        .requests()
        .into_iter()
        .map(|s| (s.uri, s.body))
        .collect();
    assert_eq!(
        at_fallback,
        [
            ("/orders/1".to_string(), small.clone()),
            ("/orders/2".to_string(), chunked_small.clone())
        ],
        "the fallback got each body whole"
    );

    // One byte over the limit, either way: sent once, and the primary's 503 is the answer.
    let large: Vec<u8> = (0..64 * 1024 + 1).map(|i| (i % 253) as u8).collect();
    let resp = send(
        ficus.addr,
        put("/orders/3")
            .body(Full::new(Bytes::from(large.clone())))
            .expect("request"),
    )
    .await;
    assert_eq!(resp.status(), 503);
    let (body, chunked_large) = chunked(100, 1000);
    let resp =
        crate::support::send_streaming(ficus.addr, put("/orders/4").body(body).expect("request"))
            .await;
    assert_eq!(resp.status(), 503);
    assert_eq!(
        mono.requests().len(),
        2,
        "large bodies never reached the fallback"
    );

    let at_primary: Vec<(String, Vec<u8>)> = failing
        .requests()
        .into_iter()
        .map(|s| (s.uri, s.body))
        .collect();
    assert_eq!(
        at_primary,
        [
            ("/orders/1".to_string(), small),
            ("/orders/2".to_string(), chunked_small),
            ("/orders/3".to_string(), large),
            ("/orders/4".to_string(), chunked_large)
        ],
        "the primary got every body whole, the read part of the large chunked one included"
    );
    let m = ficus.metrics().await;
    assert_eq!(
        sample(&m, "ficus_route_fallbacks_total", &[("route", "flaky")]),
        Some(2.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_after_a_fallback_name_the_fallback_upstream() {
    let mono = named("monolith", 200).await;
    let failing = named("orders-fn", 503).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("e.jsonl");
    let yaml = format!(
        "{}  - name: flaky\n    match: {{ path: \"/orders/{{id}}\" }}\n    upstream: orders-fn\n    fallback: monolith\nevents:\n  rules:\n    - name: read\n      match: {{ method: GET, path: \"/orders/{{id}}\" }}\n      type: shop.read\n      subject: \"{{path.id}}\"\nsinks:\n  audit: {{ type: file, path: {} }}\noutbox:\n  dir: {}\n",
        two_upstreams(&mono, &failing, ""),
        file.display(),
        dir.path().join("outbox").display()
    );
    let ficus = Ficus::start_yaml(&yaml).await;
    assert_eq!(
        served_by(ficus.addr, req("GET", "/orders/7", &[])).await,
        (200, "monolith".into())
    );
    let events = eventually(WAIT, "the event", || async {
        let e = crate::events::read_events(&file);
        (!e.is_empty()).then_some(e)
    })
    .await;
    use cloudevents::AttributesReader;
    assert_eq!(events.len(), 1, "one response, one event");
    assert_eq!(events[0].subject(), Some("7"));
    assert_eq!(
        events[0]
            .extension("ficusupstream")
            .map(|v| v.to_string())
            .as_deref(),
        Some("monolith"),
        "the upstream that served, not the route's"
    );
}

/// An upstream whose answer never depends on the request: what the client must see whatever
/// happens to the shadow.
async fn steady() -> TestUpstream {
    TestUpstream::with(|req, rec| async move {
        record(req, &rec).await;
        http::Response::builder()
            .header("content-type", "application/json")
            .header("x-served-by", "monolith")
            .body(full(r#"{"served_by":"monolith"}"#))
            .expect("response")
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_or_hanging_shadow_changes_nothing_the_client_sees() {
    let mono = steady().await;
    // Answers 500, but only once the test lets it: the client's responses come first.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let g = gate.clone();
    let erroring = TestUpstream::with(move |req, rec| {
        let g = g.clone();
        async move {
            record(req, &rec).await;
            let _ = g.acquire().await.map(|p| p.forget());
            http::Response::builder()
                .status(500)
                .header("content-type", "application/json")
                .body(full("{}"))
                .expect("response")
        }
    })
    .await;
    let (hang, hung) = hanging().await;
    let dead = refused_addr().await;
    let shadowed = |name: &str, path: &str, upstream: &str, extra: &str| {
        format!("  - name: {name}\n    match: {{ path: {path} }}\n    upstream: monolith\n    shadow: {{ upstream: {upstream}, compare: {{ headers: [content-type] }}{extra} }}\n")
    };
    let yaml = format!(
        "listen: {{ address: 127.0.0.1:0 }}\nadmin: {{ address: 127.0.0.1:0 }}\nupstreams:\n  monolith: {{ url: \"http://{}\" }}\n  erroring: {{ url: \"http://{}\" }}\n  hanging: {{ url: \"http://{}\" }}\n  dead: {{ url: \"http://{dead}\" }}\ndefault_upstream: monolith\nroutes:\n{}{}{}",
        mono.addr,
        erroring.addr,
        hang.addr,
        shadowed("s5xx", "/s5xx", "erroring", ""),
        shadowed("srefused", "/srefused", "dead", ""),
        shadowed("shang", "/shang", "hanging", ", timeout: 1s, max_in_flight: 1"),
    );
    let ficus = Ficus::start_yaml(&yaml).await;

    let seen = |r: &http::Response<Bytes>| {
        let h = |n| r.headers().get(n).map(|v| v.as_bytes().to_vec());
        (
            r.status(),
            h("content-type"),
            h("content-length"),
            h("x-served-by"),
            h("x-ficus-error"),
            r.body().clone(),
        )
    };
    // The unshadowed baseline: the default route, same upstream, same answer.
    let mut baseline = None;
    let mut slowest = Duration::ZERO;
    for _ in 0..10 {
        let started = tokio::time::Instant::now();
        let r = send(ficus.addr, req("GET", "/plain", &[])).await;
        slowest = slowest.max(started.elapsed());
        baseline = Some(seen(&r));
    }
    let baseline = baseline.expect("baseline");
    // The stated margin: every shadowed response within 250 ms of the slowest unshadowed one,
    // far below the 1 s a client that waited on the hanging shadow's timeout would see.
    let margin = slowest + Duration::from_millis(250);
    for path in ["/s5xx", "/srefused", "/shang"] {
        for _ in 0..5 {
            let started = tokio::time::Instant::now();
            let r = send(ficus.addr, req("GET", path, &[])).await;
            let took = started.elapsed();
            assert_eq!(seen(&r), baseline, "{path}: the client saw the shadow");
            assert!(took <= margin, "{path}: {took:?}, margin {margin:?}");
        }
    }
    assert_eq!(
        erroring.requests().len(),
        5,
        "all five 500s still held back"
    );
    gate.add_permits(5);

    let count = |m: &str, route: &str, result: &str| {
        sample(
            m,
            "ficus_shadow_comparisons_total",
            &[("route", route), ("result", result)],
        )
        .unwrap_or(0.0)
    };
    let m = eventually(WAIT, "every comparison counted", || async {
        let m = ficus.metrics().await;
        (count(&m, "s5xx", "status_mismatch") == 5.0
            && count(&m, "srefused", "error") == 5.0
            // The copy that timed out, and the four never sent past `max_in_flight: 1`.
            && count(&m, "shang", "error") == 5.0)
            .then_some(m)
    })
    .await;
    assert_eq!(
        hung.load(Ordering::SeqCst),
        1,
        "one copy at a time to the hanging shadow"
    );
    assert_eq!(
        sample(&m, "ficus_shadow_dropped_total", &[("route", "shang")]),
        Some(4.0)
    );
    // The timed-out copy gave its place back: the next one is sent.
    assert_eq!(get(ficus.addr, "/shang").await.0, 200);
    eventually(WAIT, "a second copy to the hanging shadow", || async {
        (hung.load(Ordering::SeqCst) == 2).then_some(())
    })
    .await;
    assert_eq!(
        mono.requests().len(),
        26,
        "the primary served every request once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_sample_copies_the_stated_fraction() {
    let mono = steady().await;
    let shadow = steady().await;
    let yaml = two_upstreams(
        &mono,
        &shadow,
        "  - name: quarter\n    match: { path: /quarter }\n    upstream: monolith\n    shadow: { upstream: orders-fn, sample: 0.25, max_in_flight: 10000, compare: {} }\n  - name: never\n    match: { path: /never }\n    upstream: monolith\n    shadow: { upstream: orders-fn, sample: 0, compare: {} }\n",
    );
    let ficus = Ficus::start_yaml(&yaml).await;
    const N: usize = 2000;
    for _ in 0..N {
        assert_eq!(get(ficus.addr, "/quarter").await.0, 200);
    }
    for _ in 0..200 {
        assert_eq!(get(ficus.addr, "/never").await.0, 200);
    }
    // Every sampled copy was spawned before its client got the response; it is done when the
    // shadow saw it and ficus counted its comparison. The two agreeing over three polls 10 ms
    // apart means no copy is still on its way (each takes a millisecond or two).
    let last = std::cell::Cell::new((usize::MAX, -1.0));
    let agreeing = std::cell::Cell::new(0);
    let copies = eventually(WAIT, "the shadow copies settle", || async {
        let m = ficus.metrics().await;
        let counted = sample(
            &m,
            "ficus_shadow_comparisons_total",
            &[("route", "quarter")],
        )
        .unwrap_or(0.0);
        let now = (shadow.requests().len(), counted);
        let settled = now.0 as f64 == now.1 && now == last.get();
        agreeing.set(if settled { agreeing.get() + 1 } else { 0 });
        last.set(now);
        (agreeing.get() >= 3).then_some(now.0)
    })
    .await;
    // Binomial(2000, 0.25): sd = 19.4; 5 sd either side.
    let expected = N as f64 * 0.25;
    assert!(
        (copies as f64 - expected).abs() < 5.0 * 19.4,
        "{copies} of {N} copied at sample 0.25"
    );
    assert!(
        shadow.requests().iter().all(|s| s.uri == "/quarter"),
        "sample 0 copies nothing"
    );
    let m = ficus.metrics().await;
    assert_eq!(
        sample(&m, "ficus_shadow_dropped_total", &[("route", "quarter")]),
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sample_of_mismatches_is_logged_with_both_bodies_truncated() {
    let body = |fill: char| format!(r#"{{"pad":"{}"}}"#, fill.to_string().repeat(2000));
    let primary = TestUpstream::with(move |req, rec| async move {
        record(req, &rec).await;
        http::Response::new(full(body('a')))
    })
    .await;
    let shadow = TestUpstream::with(move |req, rec| async move {
        record(req, &rec).await;
        http::Response::new(full(body('b')))
    })
    .await;
    let dead = refused_addr().await;
    let yaml = format!(
        "listen: {{ address: 127.0.0.1:0 }}\nadmin: {{ address: 127.0.0.1:0 }}\nupstreams:\n  monolith: {{ url: \"http://{}\" }}\n  orders-fn: {{ url: \"http://{}\" }}\n  marker: {{ url: \"http://{dead}\" }}\ndefault_upstream: monolith\nroutes:\n  - name: mirror\n    match: {{ path: /mirror }}\n    upstream: monolith\n    shadow: {{ upstream: orders-fn, compare: {{}} }}\n  - name: marker\n    match: {{ path: /marker }}\n    upstream: marker\n",
        primary.addr, shadow.addr
    );
    let mut ficus = crate::support::FicusProcess::start(&yaml).await;
    for _ in 0..12 {
        assert_eq!(get(ficus.addr, "/mirror").await.0, 200);
    }
    eventually(WAIT, "twelve mismatches counted", || async {
        let (_, m) = get(ficus.admin, "/metrics").await;
        (sample(
            &m,
            "ficus_shadow_comparisons_total",
            &[("route", "mirror"), ("result", "body_mismatch")],
        ) == Some(12.0))
        .then_some(())
    })
    .await;
    // Each mismatch is logged (or not) before it is counted; a failure logged after the count
    // marks the end of everything the twelve could have written.
    assert_eq!(get(ficus.addr, "/marker").await.0, 502);
    let mut logged = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let line = tokio::time::timeout_at(deadline, ficus.stderr_lines.recv())
            .await
            .expect("the marker line in time")
            .expect("ficus still running");
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if v["message"] == "upstream request failed" && v["upstream"] == "marker" {
            break;
        }
        if v["message"] == "shadow response differs" {
            logged.push(v);
        }
    }
    assert_eq!(
        logged.len(),
        10,
        "the first ten of twelve: a sample, not every one"
    );
    for v in &logged {
        assert_eq!(v["route"], "mirror");
        assert_eq!(v["result"], "body_mismatch");
        assert_eq!(v["differs"], "body");
        for (field, fill) in [("primary_body", "a"), ("shadow_body", "b")] {
            let text = v[field].as_str().expect("body field");
            let expected = format!(r#"{{"pad":"{}…"#, fill.repeat(512 - 8));
            assert_eq!(
                text, expected,
                "{field}: the first 512 bytes, marked as cut"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_by_cookie_keeps_each_user_on_one_side_and_no_cookie_is_random() {
    let mono = named("monolith", 200).await;
    let func = named("orders-fn", 200).await;
    let yaml = two_upstreams(
        &mono,
        &func,
        "  - name: checkout\n    match: { path: \"/checkout/{*rest}\" }\n    split: [{ upstream: monolith, weight: 50 }, { upstream: orders-fn, weight: 50 }]\n    sticky: { cookie: session }\n",
    );
    let ficus = Ficus::start_yaml(&yaml).await;
    let mut on_fn = 0;
    for user in 0..200 {
        let cookie = format!("theme=dark; session=s{user}; lang=en");
        let mut sides = std::collections::HashSet::new();
        for step in ["/checkout/cart", "/checkout/pay", "/checkout/done"] {
            sides.insert(
                served_by(ficus.addr, req("GET", step, &[("cookie", &cookie)]))
                    .await
                    .1,
            );
        }
        assert_eq!(sides.len(), 1, "s{user} moved: {sides:?}");
        on_fn += usize::from(sides.contains("orders-fn"));
    }
    // Binomial(200, 0.5): sd = 7.1; 5 sd.
    assert!(
        (65..=135).contains(&on_fn),
        "{on_fn} of 200 users on orders-fn"
    );
    let mut anonymous_on_fn = 0;
    for _ in 0..200 {
        let cookie = "theme=dark; lang=en";
        if served_by(
            ficus.addr,
            req("GET", "/checkout/cart", &[("cookie", cookie)]),
        )
        .await
        .1 == "orders-fn"
        {
            anonymous_on_fn += 1;
        }
    }
    assert!(
        (65..=135).contains(&anonymous_on_fn),
        "without the cookie the pick is random: {anonymous_on_fn} of 200"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_rewrites_end_to_end() {
    let mono = named("monolith", 200).await;
    let func = named("orders-fn", 200).await;
    let yaml = two_upstreams(
        &mono,
        &func,
        "  - name: moved\n    match: { path: \"/legacy/{*rest}\" }\n    upstream: orders-fn\n    strip_prefix: /legacy\n    add_prefix: /api/\n  - name: exact\n    match: { path: /exact }\n    upstream: orders-fn\n    strip_prefix: /exact\n    add_prefix: /v2/exact\n  - name: strip\n    match: { path: \"/old/{*rest}\" }\n    upstream: orders-fn\n    strip_prefix: /old\n  - name: add\n    match: { path: \"/n/{*rest}\" }\n    upstream: orders-fn\n    add_prefix: /fn\n",
    );
    let ficus = Ficus::start_yaml(&yaml).await;
    let cases = [
        ("/legacy/a/b?x=1&y=%20", "/api/a/b?x=1&y=%20"),
        ("/legacy/a%2Fb", "/api/a%2Fb"),
        ("/exact?q=1", "/v2/exact?q=1"),
        ("/old/x", "/x"),
        ("/n/1", "/fn/n/1"),
    ];
    for (path, _) in cases {
        assert_eq!(
            served_by(ficus.addr, req("GET", path, &[])).await,
            (200, "orders-fn".into()),
            "{path}"
        );
    }
    let got: Vec<String> = func.requests().into_iter().map(|s| s.uri).collect();
    let want: Vec<String> = cases.iter().map(|(_, w)| w.to_string()).collect();
    assert_eq!(got, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stalls_mid_body_on_a_fallback_route_gets_408() {
    let mono = named("monolith", 200).await;
    let func = named("orders-fn", 200).await;
    let yaml = format!(
        "listen: {{ address: 127.0.0.1:0 }}\nadmin: {{ address: 127.0.0.1:0 }}\nupstreams:\n  monolith: {{ url: \"http://{}\" }}\n  orders-fn: {{ url: \"http://{}\", idle_timeout: 300ms }}\ndefault_upstream: monolith\nroutes:\n  - name: flaky\n    match: {{ path: /orders }}\n    upstream: orders-fn\n    fallback: monolith\n",
        mono.addr, func.addr
    );
    let ficus = Ficus::start_yaml(&yaml).await;
    // Ten bytes announced, four sent, then silence with the connection open.
    let answer = crate::support::raw_exchange(
        ficus.addr,
        b"PUT /orders HTTP/1.1\r\nhost: shop\r\ncontent-length: 10\r\n\r\nabcd",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(func.requests().is_empty() && mono.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_shadow_copy_that_fails_or_is_not_sent_counts_as_an_error_with_or_without_compare() {
    let mono = steady().await;
    let answering = steady().await;
    let (hang, hung) = hanging().await;
    let dead = refused_addr().await;
    // No `compare` on any route: a failure must show all the same.
    let shadowed = |name: &str, upstream: &str, extra: &str| {
        format!("  - name: {name}\n    match: {{ path: /{name} }}\n    upstream: monolith\n    shadow: {{ upstream: {upstream}{extra} }}\n")
    };
    let yaml = format!(
        "listen: {{ address: 127.0.0.1:0 }}\nadmin: {{ address: 127.0.0.1:0 }}\nupstreams:\n  monolith: {{ url: \"http://{}\" }}\n  answering: {{ url: \"http://{}\" }}\n  hanging: {{ url: \"http://{}\" }}\n  dead: {{ url: \"http://{dead}\" }}\ndefault_upstream: monolith\nroutes:\n{}{}{}",
        mono.addr,
        answering.addr,
        hang.addr,
        shadowed("refused", "dead", ""),
        shadowed("answered", "answering", ""),
        shadowed("capped", "hanging", ", max_in_flight: 1, timeout: 30s"),
    );
    let ficus = Ficus::start_yaml(&yaml).await;
    for path in ["/refused", "/answered", "/capped"] {
        for _ in 0..3 {
            assert_eq!(get(ficus.addr, path).await.0, 200, "{path}");
        }
    }
    let count = |m: &str, route: &str, result: &str| {
        sample(
            m,
            "ficus_shadow_comparisons_total",
            &[("route", route), ("result", result)],
        )
        .unwrap_or(0.0)
    };
    let m = eventually(WAIT, "the failed and dropped copies counted", || async {
        let m = ficus.metrics().await;
        (count(&m, "refused", "error") == 3.0
            && answering.requests().len() == 3
            && hung.load(Ordering::SeqCst) == 1)
            .then_some(m)
    })
    .await;
    // One copy hangs in flight and holds the only place: the other two were never sent.
    assert_eq!(count(&m, "capped", "error"), 2.0, "not sent: no comparison");
    assert_eq!(
        sample(&m, "ficus_shadow_dropped_total", &[("route", "capped")]),
        Some(2.0)
    );
    // Answered copies without `compare` have nothing to be compared with: nothing counted.
    assert_eq!(
        sample(
            &m,
            "ficus_shadow_comparisons_total",
            &[("route", "answered")]
        ),
        Some(0.0)
    );
    for route in ["refused", "capped"] {
        for result in ["match", "status_mismatch", "body_mismatch"] {
            assert_eq!(count(&m, route, result), 0.0, "{route} {result}");
        }
    }
    assert_eq!(
        sample(&m, "ficus_shadow_dropped_total", &[("route", "refused")]),
        Some(0.0),
        "a copy that was sent and failed is not a dropped one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_copy_skipped_for_a_body_over_64_kib_is_counted_as_dropped() {
    let mono = steady().await;
    let shadow = steady().await;
    let yaml = two_upstreams(
        &mono,
        &shadow,
        "  - name: uploads\n    match: { path: /uploads }\n    upstream: monolith\n    shadow: { upstream: orders-fn, methods: [POST] }\n",
    );
    let ficus = Ficus::start_yaml(&yaml).await;
    let post = |len: usize| {
        Request::post("/uploads")
            .header("host", "shop.example")
            .body(Full::new(Bytes::from(vec![b'x'; len])))
            .expect("request")
    };
    // Kept (64 KiB at most): copied. Longer: streamed once, so no copy can be sent.
    assert_eq!(send(ficus.addr, post(1024)).await.status(), 200);
    assert_eq!(send(ficus.addr, post(100 * 1024)).await.status(), 200);
    eventually(WAIT, "the small body's copy", || async {
        (shadow.requests().len() == 1).then_some(())
    })
    .await;
    let m = ficus.metrics().await;
    assert_eq!(
        sample(&m, "ficus_shadow_dropped_total", &[("route", "uploads")]),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &m,
            "ficus_shadow_comparisons_total",
            &[("route", "uploads"), ("result", "error")]
        ),
        Some(1.0),
        "not sent: no comparison"
    );
    assert_eq!(mono.requests().len(), 2, "the primary served both");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_copy_left_unsent_by_a_failed_primary_is_counted() {
    // The primary refuses connections: the client gets 502 and there is no response to
    // compare a copy with, so none is sent, and that is counted.
    let refused = refused_addr().await;
    let shadow = steady().await;
    let yaml = format!(
        "listen: {{ address: 127.0.0.1:0 }}\nadmin: {{ address: 127.0.0.1:0 }}\nupstreams:\n  monolith: {{ url: \"http://{refused}\" }}\n  orders-fn: {{ url: \"http://{}\" }}\ndefault_upstream: monolith\nroutes:\n  - name: orders\n    match: {{ path: /orders }}\n    upstream: monolith\n    shadow: {{ upstream: orders-fn }}\n",
        shadow.addr
    );
    let ficus = Ficus::start_yaml(&yaml).await;
    assert_eq!(
        send(ficus.addr, req("GET", "/orders", &[])).await.status(),
        502
    );
    let m = ficus.metrics().await;
    assert_eq!(
        sample(&m, "ficus_shadow_dropped_total", &[("route", "orders")]),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &m,
            "ficus_shadow_comparisons_total",
            &[("route", "orders"), ("result", "error")]
        ),
        Some(1.0),
        "not sent: no comparison"
    );
    assert!(shadow.requests().is_empty(), "no copy went out");
}
