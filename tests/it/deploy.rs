//! deploy/: the configs the Kubernetes manifests ship pass `ficus check` and emit the events
//! their samples promise, and the Grafana dashboard queries only metrics ficus exports, and
//! every one of them. deploy/check.sh validates the manifests themselves.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Output;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use serde_json::Value;

use crate::support::upstream::{full, record};
use crate::support::{binary, eventually, get, sample, send, Ficus, TestUpstream, WAIT};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A YAML file as JSON, read with ficus's own YAML reader (one document per file).
fn yaml_file(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).expect("read YAML file");
    ficus::Config::data_file(&text, &path.display().to_string())
        .unwrap_or_else(|e| panic!("{}: not YAML ficus can read: {e:?}", path.display()))
}

fn kustomizations(dir: &Path, found: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("read deploy dir")
        .map(|e| e.expect("dir entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            kustomizations(&path, found);
        } else if path.file_name().is_some_and(|n| n == "kustomization.yaml") {
            found.push(path);
        }
    }
}

/// Every file a kustomization turns into the `ficus.yaml` key of the ConfigMap `ficus-config`
/// (`configMapGenerator`, in the base and in overlays that replace it): what the pods mount.
fn deployed_configs() -> Vec<PathBuf> {
    let mut ks = Vec::new();
    kustomizations(&repo().join("deploy/kubernetes"), &mut ks);
    let mut configs = Vec::new();
    for k in &ks {
        let doc = yaml_file(k);
        let dir = k.parent().expect("kustomization dir");
        let generators = doc["configMapGenerator"].as_array().cloned();
        for g in generators.unwrap_or_default() {
            if g["name"] != "ficus-config" {
                continue;
            }
            let files = g["files"].as_array().cloned().unwrap_or_default();
            assert!(
                !files.is_empty(),
                "{}: ficus-config without files",
                k.display()
            );
            for f in files {
                let entry = f.as_str().expect("files entries are strings");
                let (key, path) = entry.split_once('=').unwrap_or_else(|| {
                    let name = Path::new(entry).file_name().and_then(|n| n.to_str());
                    (name.expect("file name"), entry)
                });
                assert_eq!(
                    key,
                    "ficus.yaml",
                    "{}: FICUS_CONFIG names /etc/ficus/ficus.yaml",
                    k.display()
                );
                configs.push(dir.join(path));
            }
        }
    }
    let base = repo().join("deploy/kubernetes/base/ficus.yaml");
    assert!(
        configs.contains(&base),
        "the base's ConfigMap comes from {}; found {configs:?}",
        base.display()
    );
    assert!(configs.len() >= 2, "base and example overlay: {configs:?}");
    configs
}

/// `ficus ARGS` with the environment the pods give it (deployment.yaml's env).
fn ficus_cli(args: &[&str]) -> Output {
    std::process::Command::new(binary())
        .args(args)
        .env_remove("FICUS_CONFIG")
        .env_remove("RUST_LOG")
        .env("NATS_URL", "nats://nats.nats.svc.cluster.local:4222")
        .output()
        .expect("run ficus")
}

#[test]
fn deployed_configs_pass_ficus_check_without_warnings() {
    for config in deployed_configs() {
        let path = config.to_str().expect("utf-8 path");
        let out = ficus_cli(&["check", "-c", path]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{path}:\n{stdout}{stderr}");
        assert!(stderr.is_empty(), "{path}: warnings:\n{stderr}");
        // The ports the manifests use (deploy/check.sh compares them with the pod).
        assert!(stdout.contains("listen: 0.0.0.0:8000\n"), "{stdout}");
        assert!(stdout.contains("admin: 0.0.0.0:9901\n"), "{stdout}");
        assert!(
            stdout.contains("monolith: http://127.0.0.1:8080 (default)"),
            "{stdout}"
        );
        assert!(
            stdout.contains("outbox: /var/lib/ficus/outbox "),
            "{stdout}"
        );
    }
}

#[test]
fn deployed_configs_emit_the_events_their_samples_promise() {
    let samples = repo().join("deploy/kubernetes/base/samples.yaml");
    for config in deployed_configs() {
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
            "{}: {stdout}{}",
            config.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        for want in [
            "rule order-created: emits shop.order.created to every sink",
            "\"id\": \"0b6f7c1e-1d2a-4f7e-9c1a-5d0e8f3b2a10\"",
            "rule order-updated: emits shop.order.updated",
            "\"sequence\": \"2\"",
            "rule order-cancelled: emits shop.order.cancelled",
            "rule payment-captured: emits shop.payment.captured",
            "rule payment-captured: no event: the `if` condition is false",
            "rule customer-registered: emits shop.customer.registered",
            "rule order-created: no event: the response status 422",
            "no events: no rule matches GET /orders/o-1001",
            "8 sample(s), 5 event(s)",
        ] {
            assert!(
                stdout.contains(want),
                "{}: missing `{want}` in:\n{stdout}",
                config.display()
            );
        }
        for secret in ["4111", "hunter2"] {
            assert!(!stdout.contains(secret), "{secret} leaked:\n{stdout}");
        }
    }
}

/// Every string a dashboard sends to Prometheus: panel targets' `expr`, variable queries.
fn queries(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "query" | "definition", Value::String(s)) => out.push(s.clone()),
                    _ => queries(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| queries(v, out)),
        _ => {}
    }
}

/// `ficus_*` identifiers in PromQL text.
fn metric_names(query: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes = query.as_bytes();
    let mut i = 0;
    while let Some(at) = query[i..].find("ficus_") {
        let start = i + at;
        let boundary =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        if boundary {
            names.push(query[start..end].to_string());
        }
        i = end;
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grafana_dashboard_queries_every_metric_ficus_exports_and_no_other() {
    let path = repo().join("deploy/grafana/ficus.json");
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read dashboard"))
            .expect("dashboard is JSON");
    let mut texts = Vec::new();
    queries(&dashboard, &mut texts);
    let queried: BTreeSet<String> = texts.iter().flat_map(|q| metric_names(q)).collect();
    assert!(queried.len() > 15, "dashboard queries: {queried:?}");

    // ficus with something for every family: a route with a fallback, a shadow with a
    // comparison, a rule, a file sink; then traffic through each.
    let shop = TestUpstream::with(|req, rec| async move {
        let seen = record(req, &rec).await;
        let status = if seen.method == "POST" { 201 } else { 200 };
        http::Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(full(r#"{"id":"o-1","total":3}"#))
            .expect("response")
    })
    .await;
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind")
        .local_addr()
        .expect("addr");
    let dir = tempfile::tempdir().expect("tempdir");
    let yaml = format!(
        r#"listen: {{ address: 127.0.0.1:0 }}
admin: {{ address: 127.0.0.1:0 }}
upstreams:
  monolith: {{ url: "http://{shop}" }}
  orders: {{ url: "http://{dead}" }}
default_upstream: monolith
routes:
  - name: order-read
    match: {{ method: GET, path: "/orders/{{id}}" }}
    upstream: orders
    fallback: monolith
  - name: search-shadow
    match: {{ method: GET, path: /search }}
    upstream: monolith
    shadow: {{ upstream: monolith, compare: {{ headers: [content-type] }} }}
events:
  rules:
    - name: order-created
      match: {{ method: POST, path: /orders, status: 201 }}
      type: shop.order.created
      subject: "{{response.body.id}}"
sinks:
  audit: {{ type: file, path: {events} }}
outbox:
  dir: {outbox}
"#,
        shop = shop.addr,
        events = dir.path().join("events.jsonl").display(),
        outbox = dir.path().join("outbox").display(),
    );
    let ficus = Ficus::start_yaml(&yaml).await;
    let post = Request::post("/orders")
        .header("host", "shop")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(br#"{"customer_id":"c-1"}"#)))
        .expect("request");
    assert_eq!(send(ficus.addr, post).await.status(), 201);
    assert_eq!(get(ficus.addr, "/orders/o-1").await.0, 200, "via fallback");
    assert_eq!(get(ficus.addr, "/search").await.0, 200);
    let metrics = eventually(WAIT, "event delivered and shadow compared", || async {
        let m = ficus.metrics().await;
        let delivered = sample(&m, "ficus_events_delivered_total", &[("sink", "audit")]);
        let compared = sample(
            &m,
            "ficus_shadow_comparisons_total",
            &[("route", "search-shadow")],
        );
        (delivered == Some(1.0) && compared == Some(1.0)).then_some(m)
    })
    .await;
    assert_eq!(
        sample(
            &metrics,
            "ficus_route_fallbacks_total",
            &[("route", "order-read")]
        ),
        Some(1.0)
    );

    // What the exposition has: sample names, and each family's type.
    let samples: BTreeSet<&str> = metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let families: BTreeMap<&str, &str> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .collect();

    // Every name the dashboard queries is a series ficus exports (a histogram as its
    // `_bucket`, `_sum` or `_count`: the bare family name has no samples).
    let missing: Vec<&String> = queried
        .iter()
        .filter(|n| !samples.contains(n.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} queries metrics ficus does not export: {missing:?}\nexported: {samples:?}",
        path.display()
    );

    // And every family ficus exports is on the dashboard.
    let unshown: Vec<&&str> = families
        .iter()
        .filter(|(family, kind)| {
            let suffixes: &[&str] = if **kind == "histogram" {
                &["_bucket", "_sum", "_count"]
            } else {
                &[""]
            };
            !suffixes
                .iter()
                .any(|s| queried.contains(&format!("{family}{s}")))
        })
        .map(|(family, _)| family)
        .collect();
    assert!(
        unshown.is_empty(),
        "metrics no panel of {} shows (add one): {unshown:?}",
        path.display()
    );
    assert!(
        families.contains_key("ficus_config_reloads_total"),
        "ficus_config_reloads_total (hot reload) is not exported yet"
    );
}
