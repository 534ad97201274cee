//! The admin listener: health, readiness, and metrics counted after known traffic.

use bytes::Bytes;
use http::Request;
use http_body_util::Full;

use crate::support::upstream::{full, record};
use crate::support::{get, sample, send, Ficus, TestUpstream};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_readiness() {
    let upstream = TestUpstream::echo().await;
    let ficus = Ficus::start(upstream.addr, "").await;
    assert_eq!(get(ficus.admin, "/healthz").await.0, 200);
    let (status, body) = get(ficus.admin, "/readyz").await;
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    assert_eq!(get(ficus.admin, "/nope").await.0, 404);
    // The admin port is not a proxy: nothing reached the upstream.
    assert!(upstream.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_with_a_reason_before_the_app_runs() {
    let config = ficus::Config::from_yaml(
        "listen: {address: 127.0.0.1:0}\nadmin: {address: 127.0.0.1:0}\nupstreams: {m: {url: \"http://127.0.0.1:9\"}}\n",
        "t.yaml",
    )
    .expect("config");
    let app = ficus::App::new(config, prometheus::Registry::new()).expect("app");
    assert_eq!(app.readiness().reason().as_deref(), Some("starting"));
}

/// SPEC section 5's table, with each family's type.
const SPEC_FAMILIES: [(&str, &str); 17] = [
    ("ficus_requests_total", "counter"),
    ("ficus_request_duration_seconds", "histogram"),
    ("ficus_upstream_request_duration_seconds", "histogram"),
    ("ficus_upstream_errors_total", "counter"),
    ("ficus_events_emitted_total", "counter"),
    ("ficus_events_delivered_total", "counter"),
    ("ficus_event_delivery_failures_total", "counter"),
    ("ficus_events_dead_lettered_total", "counter"),
    ("ficus_events_dropped_total", "counter"),
    ("ficus_outbox_pending_events", "gauge"),
    ("ficus_outbox_bytes", "gauge"),
    ("ficus_outbox_unflushed_events", "gauge"),
    ("ficus_route_fallbacks_total", "counter"),
    ("ficus_event_delivery_lag_seconds", "gauge"),
    ("ficus_shadow_comparisons_total", "counter"),
    ("ficus_config_reloads_total", "counter"),
    ("ficus_build_info", "gauge"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_spec_family_is_declared_before_its_first_series() {
    // No routes (so no fallback or shadow series), no rules, no request yet: the families
    // still say they exist, each once and with its type.
    let upstream = TestUpstream::echo().await;
    let ficus = Ficus::start(upstream.addr, "").await;
    let metrics = ficus.metrics().await;
    for (name, kind) in SPEC_FAMILIES {
        let declared = format!("# TYPE {name} {kind}\n");
        assert_eq!(metrics.matches(&declared).count(), 1, "{name}:\n{metrics}");
        assert_eq!(
            metrics.matches(&format!("# HELP {name} ")).count(),
            1,
            "{name}"
        );
    }
    // Once a series exists the family is printed by the encoder alone, not declared twice.
    assert_eq!(get(ficus.addr, "/x").await.0, 200);
    let metrics = ficus.metrics().await;
    assert_eq!(
        metrics
            .matches("# TYPE ficus_requests_total counter\n")
            .count(),
        1
    );
    assert!(sample(&metrics, "ficus_requests_total", &[("route", "default")]).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_known_traffic() {
    let upstream = TestUpstream::with(|req, rec| async move {
        let seen = record(req, &rec).await;
        let status = if seen.method == "POST" { 201 } else { 200 };
        http::Response::builder()
            .status(status)
            .body(full("{}"))
            .expect("response")
    })
    .await;
    let ficus = Ficus::start(upstream.addr, "").await;
    let metrics = ficus.metrics().await;
    assert_eq!(
        sample(
            &metrics,
            "ficus_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0)
    );
    for kind in ["connect", "timeout", "reset"] {
        assert_eq!(
            sample(
                &metrics,
                "ficus_upstream_errors_total",
                &[("upstream", "monolith"), ("kind", kind)]
            ),
            Some(0.0),
            "{kind} series exists at zero"
        );
    }

    for _ in 0..3 {
        assert_eq!(get(ficus.addr, "/orders/1").await.0, 200);
    }
    for _ in 0..2 {
        let req = Request::post("/orders")
            .header("host", "shop")
            .body(Full::new(Bytes::from_static(b"{}")))
            .expect("request");
        assert_eq!(send(ficus.addr, req).await.status(), 201);
    }
    let req = Request::builder()
        .method("BREW")
        .uri("/pot")
        .header("host", "shop")
        .body(Full::new(Bytes::new()))
        .expect("request");
    assert_eq!(send(ficus.addr, req).await.status(), 200);

    let m = ficus.metrics().await;
    let count = |labels: &[(&str, &str)]| sample(&m, "ficus_requests_total", labels);
    assert_eq!(
        count(&[("route", "default"), ("method", "GET"), ("code", "200")]),
        Some(3.0)
    );
    assert_eq!(
        count(&[("route", "default"), ("method", "POST"), ("code", "201")]),
        Some(2.0)
    );
    assert_eq!(
        count(&[("route", "default"), ("method", "other"), ("code", "200")]),
        Some(1.0),
        "unknown methods share one label value"
    );
    assert_eq!(
        sample(
            &m,
            "ficus_request_duration_seconds_count",
            &[("route", "default")]
        ),
        Some(6.0)
    );
    assert_eq!(
        sample(
            &m,
            "ficus_upstream_request_duration_seconds_count",
            &[("upstream", "monolith")]
        ),
        Some(6.0)
    );
    assert!(m.contains("# TYPE ficus_request_duration_seconds histogram"));
    assert!(m.contains("# TYPE ficus_requests_total counter"));
    assert!(!m.contains("/orders"), "no raw path in any label");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_once_the_outbox_directory_is_gone() {
    // An operator's `rm -rf`, or a volume that went away: appends may still land in the
    // open (unlinked) segment, so readiness must look at the directory itself.
    let upstream = crate::events::shop().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let outbox = dir.path().join("outbox");
    let events = dir.path().join("e.jsonl");
    let sinks = format!("  audit: {{ type: file, path: {} }}", events.display());
    let ficus = Ficus::start(
        upstream.addr,
        &crate::events::whole_body_rule(&sinks, &outbox, ""),
    )
    .await;
    assert_eq!(get(ficus.admin, "/readyz").await, (200, "ready\n".into()));
    std::fs::remove_dir_all(&outbox).expect("rm -rf the outbox");
    let (status, body) = get(ficus.admin, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.starts_with("not ready: outbox not writable: ") && body.contains("segments"),
        "{body}"
    );
}
