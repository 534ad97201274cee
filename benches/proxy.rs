//! Micro benchmarks of the per-request work that is ficus's own, as opposed to hyper's:
//! header rewriting, the framing check, routing and the request metrics.
//!
//! ```text
//! cargo bench --bench proxy                 # full run
//! cargo bench --bench proxy -- --quick      # a few seconds
//! ```
//!
//! The header benchmarks mutate their input, so each iteration works on a fresh clone of the
//! request's map; `headers/clone_drop/*` measures that clone (and drop) alone so that it can be
//! subtracted.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use ficus::config::routes::{Backend, RouteConfig, Sticky};
use ficus::proxy::framing::ambiguous_framing;
use ficus::proxy::headers::{add_forwarding, strip_hop_by_hop};
use ficus::routing::Router;
use ficus::rules::PathTemplate;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Uri};

/// A request head as a desktop browser sends it to a shop, as hyper hands it over: 12 fields.
fn browser_headers() -> HeaderMap {
    map(&[
        ("host", "shop.example.com"),
        (
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
        ),
        (
            "accept",
            "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8",
        ),
        ("accept-language", "en-GB,en;q=0.7,de;q=0.3"),
        ("accept-encoding", "gzip, deflate, br, zstd"),
        ("referer", "https://shop.example.com/catalog/shoes?page=2"),
        (
            "cookie",
            "session=8f2c1e0a9b7d4c3e2f1a0b9c8d7e6f5a; cart=3; consent=analytics%3D0%2Cads%3D0; \
             _ga=GA1.1.123456789.1700000000",
        ),
        ("upgrade-insecure-requests", "1"),
        ("sec-fetch-dest", "document"),
        ("sec-fetch-mode", "navigate"),
        ("sec-fetch-site", "same-origin"),
        ("priority", "u=0, i"),
    ])
}

/// The same request behind an ingress, sent with HTTP/1.0-style `Connection` options that
/// name other fields: forwarding fields to keep and append to, and fields to remove.
fn ingress_headers() -> HeaderMap {
    let mut h = browser_headers();
    for (k, v) in [
        ("x-forwarded-for", "203.0.113.9"),
        ("x-forwarded-for", "198.51.100.2"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "shop.example.com"),
        ("via", "1.1 ingress"),
        ("connection", "keep-alive, x-hop-secret, x-debug-hop"),
        ("keep-alive", "timeout=5"),
        ("x-hop-secret", "s3cr3t"),
        ("x-debug-hop", "1"),
        ("te", "trailers"),
    ] {
        h.append(k, HeaderValue::from_static(v));
    }
    h
}

fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
    }
    h
}

fn headers(c: &mut Criterion) {
    let client_ip = HeaderValue::from_static("10.1.2.3");
    let browser = browser_headers();
    let ingress = ingress_headers();
    let mut g = c.benchmark_group("headers");

    // Each iteration clones the request's map (as hyper hands over a fresh one per request),
    // rewrites it and drops it. `clone_drop` is that clone and drop alone: subtract it.
    // (`iter_batched` with many maps prepared ahead measures cache misses on cold maps
    // rather than the rewrite, and varies from run to run by a factor of two.)
    for (name, map) in [("browser", &browser), ("ingress", &ingress)] {
        g.bench_function(format!("clone_drop/{name}"), |b| {
            b.iter(|| black_box(black_box(map).clone()))
        });
    }
    g.bench_function("strip_and_forward/browser", |b| {
        b.iter(|| {
            let mut h = black_box(&browser).clone();
            let hop = strip_hop_by_hop(&mut h);
            add_forwarding(&mut h, black_box(&client_ip), false, true);
            black_box((hop, h))
        })
    });
    g.bench_function("strip_and_forward/ingress_connection_named", |b| {
        b.iter(|| {
            let mut h = black_box(&ingress).clone();
            let hop = strip_hop_by_hop(&mut h);
            add_forwarding(&mut h, black_box(&client_ip), false, true);
            black_box((hop, h))
        })
    });
    g.bench_function("strip_and_forward/ingress_untrusted", |b| {
        b.iter(|| {
            let mut h = black_box(&ingress).clone();
            let hop = strip_hop_by_hop(&mut h);
            add_forwarding(&mut h, black_box(&client_ip), false, false);
            black_box((hop, h))
        })
    });
    g.bench_function("strip_only/browser", |b| {
        b.iter(|| {
            let mut h = black_box(&browser).clone();
            black_box((strip_hop_by_hop(&mut h), h))
        })
    });
    g.bench_function("add_forwarding_only/browser", |b| {
        b.iter(|| {
            let mut h = black_box(&browser).clone();
            add_forwarding(&mut h, black_box(&client_ip), false, true);
            black_box(h)
        })
    });
    g.finish();
}

fn framing(c: &mut Criterion) {
    let get = browser_headers();
    let mut post = browser_headers();
    post.insert("content-length", HeaderValue::from_static("300"));
    post.insert("content-type", HeaderValue::from_static("application/json"));
    let mut smuggle = post.clone();
    smuggle.insert("transfer-encoding", HeaderValue::from_static("chunked"));

    let mut g = c.benchmark_group("framing");
    g.bench_function("ambiguous_framing/get_no_length", |b| {
        b.iter(|| ambiguous_framing(black_box(&get)))
    });
    g.bench_function("ambiguous_framing/post_content_length", |b| {
        b.iter(|| ambiguous_framing(black_box(&post)))
    });
    g.bench_function("ambiguous_framing/refused_cl_and_te", |b| {
        b.iter(|| ambiguous_framing(black_box(&smuggle)))
    });
    g.finish();
}

/// A strangler's route table: a few endpoints taken over by new services, a canary by header,
/// a sticky split, then everything else to the monolith.
fn route_table() -> Vec<RouteConfig> {
    let route = |name: &str, method: Option<Method>, path: &str, backend| RouteConfig {
        name: name.into(),
        method,
        path: PathTemplate::parse(path).expect("path"),
        headers: Vec::new(),
        backend,
        fallback: None,
        shadow: None,
        strip_prefix: None,
        add_prefix: None,
    };
    let mut canary = route(
        "orders-canary",
        None,
        "/api/orders/{id}",
        Backend::Single(2),
    );
    canary.headers.push((
        HeaderName::from_static("x-canary"),
        HeaderValue::from_static("1"),
    ));
    vec![
        route("health", Some(Method::GET), "/healthz", Backend::Single(1)),
        route(
            "login",
            Some(Method::POST),
            "/api/login",
            Backend::Single(1),
        ),
        route(
            "search",
            Some(Method::GET),
            "/api/search",
            Backend::Single(1),
        ),
        route(
            "catalog",
            Some(Method::GET),
            "/api/catalog/{*rest}",
            Backend::Single(1),
        ),
        canary,
        route(
            "orders-read",
            Some(Method::GET),
            "/api/orders/{id}",
            Backend::Split {
                choices: vec![(0, 90), (2, 10)],
                sticky: Some(Sticky::Cookie("session".into())),
            },
        ),
        route(
            "orders-write",
            Some(Method::POST),
            "/api/orders",
            Backend::Single(2),
        ),
        route("cart", None, "/api/cart/{*rest}", Backend::Single(3)),
    ]
}

fn routing(c: &mut Criterion) {
    let uri = Uri::from_static("/api/orders/12345?expand=items&currency=EUR");
    let browser = browser_headers();
    let mut g = c.benchmark_group("routing");

    let empty = Router::new(Vec::new(), 0);
    let no_headers = HeaderMap::new();
    g.bench_function("route/no_routes", |b| {
        b.iter(|| {
            empty.route(
                black_box(&Method::GET),
                black_box(&uri),
                black_box(&no_headers),
            )
        })
    });
    let table = Router::new(route_table(), 0);
    // Sixth of eight routes: a sticky split on the session cookie.
    g.bench_function("route/8_routes_sticky_split_hit", |b| {
        b.iter(|| {
            table.route(
                black_box(&Method::GET),
                black_box(&uri),
                black_box(&browser),
            )
        })
    });
    // No route matches: every template is tried, then the default.
    let miss = Uri::from_static("/account/settings/notifications");
    g.bench_function("route/8_routes_miss", |b| {
        b.iter(|| {
            table.route(
                black_box(&Method::GET),
                black_box(&miss),
                black_box(&browser),
            )
        })
    });
    g.bench_function("route_name", |b| {
        let target = table.route(&Method::GET, &uri, &browser);
        b.iter(|| table.route_name(black_box(target)).len())
    });
    g.finish();
}

/// What `Telemetry` records for every request when its response body ends: two labelled
/// series looked up by label values, then updated.
fn telemetry(c: &mut Criterion) {
    let registry = prometheus::Registry::new();
    let metrics = ficus::metrics::Metrics::new(&registry).expect("metrics");
    let mut g = c.benchmark_group("telemetry");
    g.bench_function("record_request/label_lookup", |b| {
        b.iter(|| {
            let route = black_box("default");
            metrics
                .requests_total
                .with_label_values(&[route, black_box("GET"), black_box("200")])
                .inc();
            metrics
                .request_duration
                .with_label_values(&[route])
                .observe(black_box(0.000_42));
        })
    });
    let requests = metrics
        .requests_total
        .with_label_values(&["default", "GET", "200"]);
    let duration = metrics.request_duration.with_label_values(&["default"]);
    g.bench_function("record_request/resolved_series", |b| {
        b.iter(|| {
            requests.inc();
            duration.observe(black_box(0.000_42));
        })
    });
    g.finish();
}

criterion_group!(benches, headers, framing, routing, telemetry);
criterion_main!(benches);
