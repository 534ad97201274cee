//! Micro benchmarks of the rules engine on the request path.
//!
//! ```text
//! cargo bench --bench rules                 # full run
//! cargo bench --bench rules -- --quick      # a few seconds
//! ```
//!
//! - `candidates/no_rule`: what every request that no rule cares about pays (a health check
//!   against a typical set of 20 rules); `candidates/one_rule` the same for an order creation.
//! - `evaluate/order_created`: a whole evaluation of a typical rule, from a fresh exchange (so
//!   the lazy JSON parse of both bodies is counted): redaction, condition, templates, data.

use std::hint::black_box;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use ficus::rules::{
    Captured, Condition, DataTemplate, Exchange, PathTemplate, Redactor, Rule, RuleSet,
    StatusMatch, Template,
};
use http::{HeaderValue, Method};
use serde_json::json;

fn rule(name: &str, method: Option<Method>, path: &str, ty: &str) -> Rule {
    let mut r = Rule::new(
        name,
        PathTemplate::parse(path).expect("path"),
        Template::parse(ty).expect("type"),
    );
    r.method = method;
    r
}

fn order_created() -> Rule {
    let mut r = rule(
        "order-created",
        Some(Method::POST),
        "/orders",
        "shop.order.created",
    );
    r.status = StatusMatch::parse_one("201").expect("status");
    r.condition = Some(Condition::compile("response.body.total > 0").expect("cel"));
    r.subject = Some(Template::parse("{response.body.id}").expect("subject"));
    r.id = Some(Template::parse("{request.headers.idempotency-key}").expect("id"));
    r.sequence = Some(Template::parse("{response.body.version}").expect("sequence"));
    r.data = Some(
        DataTemplate::from_json(&json!({
            "order_id": "{response.body.id}",
            "customer": "{request.body.customer_id}",
            "total": "{response.body.total}",
            "items": "{request.body.items}",
        }))
        .expect("data"),
    );
    r
}

/// 20 rules as a shop might have them: REST resources, most with a method and parameters.
fn rule_set() -> RuleSet {
    let mut rules = vec![order_created()];
    let resources = [
        "orders",
        "carts",
        "customers",
        "payments",
        "shipments",
        "returns",
        "invoices",
    ];
    for res in resources {
        for (method, path) in [
            (Method::PUT, format!("/{res}/{{id}}")),
            (Method::DELETE, format!("/{res}/{{id}}")),
        ] {
            rules.push(rule(
                &format!("{res}-{}", method.as_str().to_lowercase()),
                Some(method),
                &path,
                "shop.changed",
            ));
        }
    }
    rules.push(rule(
        "checkout",
        Some(Method::POST),
        "/checkout/{*rest}",
        "shop.checkout",
    ));
    rules.push(rule(
        "cart-items",
        None,
        "/carts/{id}/items/{item}",
        "shop.cart.item",
    ));
    rules.push(rule("login", Some(Method::POST), "/session", "shop.login"));
    rules.push(rule(
        "payment-refund",
        Some(Method::POST),
        "/payments/{id}/refund",
        "shop.refund",
    ));
    rules.push(rule(
        "newsletter",
        Some(Method::POST),
        "/newsletter",
        "shop.newsletter",
    ));
    assert_eq!(rules.len(), 20);
    let redact = Redactor::parse(&["request.body.card".to_string()]).expect("redact");
    RuleSet::new(rules, redact).expect("rules")
}

fn order_exchange() -> Exchange {
    let json_ct = HeaderValue::from_static("application/json");
    let mut ex = Exchange::new(Method::POST, "/orders", 201);
    ex.request_headers.insert("content-type", json_ct.clone());
    ex.request_headers
        .insert("idempotency-key", HeaderValue::from_static("7b1e6f9c"));
    ex.request_headers
        .insert("user-agent", HeaderValue::from_static("shop-web/1.0"));
    ex.request_body = Captured::new(
        Bytes::from(
            json!({
                "customer_id": "c-1042",
                "items": [
                    {"sku": "SHOE-42", "qty": 1, "price": 89.9},
                    {"sku": "SOCK-3", "qty": 3, "price": 4.5},
                ],
                "card": {"number": "4111111111111111", "cvc": "123"},
                "shipping": {"name": "Ann", "street": "Main St 1", "city": "Springfield"},
            })
            .to_string(),
        ),
        Some(&json_ct),
        false,
    );
    ex.response_headers.insert("content-type", json_ct.clone());
    ex.response_headers
        .insert("location", HeaderValue::from_static("/orders/981"));
    ex.response_body = Captured::new(
        Bytes::from(
            json!({
                "id": 981,
                "version": 1,
                "state": "created",
                "total": 103.4,
                "currency": "EUR",
                "created_at": "2025-01-01T12:00:00Z",
            })
            .to_string(),
        ),
        Some(&json_ct),
        false,
    );
    ex
}

fn bench(c: &mut Criterion) {
    let rules = rule_set();
    assert!(rules.candidates(&Method::GET, "/healthz").is_empty());
    assert_eq!(rules.candidates(&Method::POST, "/orders").len(), 1);

    let mut g = c.benchmark_group("candidates");
    g.bench_function("no_rule", |b| {
        b.iter(|| rules.candidates(black_box(&Method::GET), black_box("/healthz")))
    });
    g.bench_function("no_rule_deep_path", |b| {
        b.iter(|| {
            rules.candidates(
                black_box(&Method::GET),
                black_box("/catalog/shoes/running/42"),
            )
        })
    });
    g.bench_function("one_rule", |b| {
        b.iter(|| rules.candidates(black_box(&Method::POST), black_box("/orders")))
    });
    g.finish();

    let candidates = rules.candidates(&Method::POST, "/orders");
    let mut g = c.benchmark_group("evaluate");
    g.bench_function("order_created", |b| {
        b.iter_batched(
            order_exchange,
            |ex| rules.evaluate(&candidates, ex),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
