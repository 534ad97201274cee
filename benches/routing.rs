//! The routing decision with a realistic table: 50 routes (templates with parameters and
//! catch-alls, a few header matches), for a request that matches the last route, one that
//! matches none (the default), and a sticky weighted split.
//!
//! ```text
//! cargo bench --bench routing
//! ```

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use ficus::config::routes::{Backend, RouteConfig, Sticky};
use ficus::routing::Router;
use ficus::rules::PathTemplate;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Uri};

fn route(i: usize, path: &str, backend: Backend) -> RouteConfig {
    RouteConfig {
        name: format!("r{i}"),
        method: i.is_multiple_of(3).then_some(Method::GET),
        path: PathTemplate::parse(path).expect("template"),
        headers: if i % 10 == 7 {
            vec![(
                HeaderName::from_static("x-canary"),
                HeaderValue::from_static("1"),
            )]
        } else {
            Vec::new()
        },
        backend,
        fallback: None,
        shadow: None,
        strip_prefix: None,
        add_prefix: None,
    }
}

fn table() -> Vec<RouteConfig> {
    let mut routes: Vec<RouteConfig> = (0..49)
        .map(|i| {
            let path = match i % 4 {
                0 => format!("/api/v1/resource{i}"),
                1 => format!("/api/v1/resource{i}/{{id}}"),
                2 => format!("/api/v1/resource{i}/{{id}}/items/{{item}}"),
                _ => format!("/static{i}/{{*rest}}"),
            };
            route(i, &path, Backend::Single(1))
        })
        .collect();
    routes.push(route(
        49,
        "/checkout/{*rest}",
        Backend::Split {
            choices: vec![(0, 90), (1, 10)],
            sticky: Some(Sticky::Header(HeaderName::from_static("x-user-id"))),
        },
    ));
    routes
}

fn bench(c: &mut Criterion) {
    let router = Router::new(table(), 0);
    let mut headers = HeaderMap::new();
    headers.insert("x-user-id", HeaderValue::from_static("user-12345"));
    headers.insert("host", HeaderValue::from_static("shop.example.com"));
    let mut g = c.benchmark_group("routing_50_routes");
    let last = Uri::from_static("/checkout/cart/confirm?step=2");
    g.bench_function("split_sticky_last_route", |b| {
        b.iter(|| {
            router.route(
                black_box(&Method::POST),
                black_box(&last),
                black_box(&headers),
            )
        })
    });
    let none = Uri::from_static("/orders/12345?expand=items");
    g.bench_function("no_route_default", |b| {
        b.iter(|| {
            router.route(
                black_box(&Method::GET),
                black_box(&none),
                black_box(&headers),
            )
        })
    });
    let first = Uri::from_static("/api/v1/resource0");
    g.bench_function("first_route", |b| {
        b.iter(|| {
            router.route(
                black_box(&Method::GET),
                black_box(&first),
                black_box(&headers),
            )
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
