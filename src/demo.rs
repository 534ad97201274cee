//! `ficus demo`: a small "legacy shop" monolith on loopback with ficus in front of it, so that
//! a newcomer sees the proxy work with one command.
//!
//! The shop keeps orders in memory and speaks JSON: create (`POST /orders`, 201), list and read
//! (`GET`), update (`PUT`/`PATCH /orders/{id}`), cancel (`DELETE /orders/{id}` or
//! `POST /orders/{id}/cancel`).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// `println!` through [`crate::print_out`]: a closed stdout ends the output quietly.
macro_rules! outln {
    ($($arg:tt)*) => { crate::print_out(format_args!("{}\n", format_args!($($arg)*))) };
}

/// The demo's config, embedded so that `ficus demo` works from any directory.
pub const DEMO_CONFIG: &str = include_str!("../config/demo.yaml");

#[derive(Default)]
struct Shop {
    next_id: u64,
    orders: BTreeMap<u64, Value>,
}

/// Runs the shop on `listener` until `stop` is cancelled.
pub async fn serve_shop(listener: TcpListener, stop: CancellationToken) {
    let shop = Arc::new(Mutex::new(Shop::default()));
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
    loop {
        let (tcp, _) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(_) => continue,
            },
        };
        let shop = shop.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let shop = shop.clone();
                async move { Ok::<_, Infallible>(handle(&shop, req).await) }
            });
            let _ = builder.serve_connection(TokioIo::new(tcp), service).await;
        });
    }
}

async fn handle(shop: &Mutex<Shop>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let body = match Limited::new(req.into_body(), 1 << 20).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return reply(
                StatusCode::PAYLOAD_TOO_LARGE,
                json!({"error": "body too large"}),
            )
        }
    };
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    // `None` for a body that is not a JSON object.
    let input = || -> Option<Map<String, Value>> {
        if body.is_empty() {
            return Some(Map::new());
        }
        match serde_json::from_slice::<Value>(&body) {
            Ok(Value::Object(m)) => Some(m),
            _ => None,
        }
    };
    let not_an_object = || {
        reply(
            StatusCode::BAD_REQUEST,
            json!({"error": "expected a JSON object"}),
        )
    };
    let Ok(mut shop) = shop.lock() else {
        return reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"error": "shop state poisoned"}),
        );
    };
    match (&method, segments.as_slice()) {
        (&Method::GET, ["orders"]) => {
            let list: Vec<&Value> = shop.orders.values().collect();
            reply(StatusCode::OK, json!(list))
        }
        (&Method::POST, ["orders"]) => {
            let Some(mut order) = input() else {
                return not_an_object();
            };
            shop.next_id += 1;
            let id = shop.next_id;
            order.insert("id".into(), json!(id));
            order.insert("status".into(), json!("created"));
            order.insert("version".into(), json!(1));
            let order = Value::Object(order);
            shop.orders.insert(id, order.clone());
            let mut r = reply(StatusCode::CREATED, order);
            if let Ok(v) = header::HeaderValue::from_str(&format!("/orders/{id}")) {
                r.headers_mut().insert(header::LOCATION, v);
            }
            r
        }
        (m, ["orders", id, rest @ ..]) => {
            let Some(order) = id
                .parse::<u64>()
                .ok()
                .and_then(|id| shop.orders.get_mut(&id))
            else {
                return reply(StatusCode::NOT_FOUND, json!({"error": "no such order"}));
            };
            match (m, rest) {
                (&Method::GET, []) => reply(StatusCode::OK, order.clone()),
                (&Method::PUT | &Method::PATCH, []) => {
                    let Some(changes) = input() else {
                        return not_an_object();
                    };
                    if let Value::Object(o) = order {
                        for (k, v) in changes {
                            if k != "id" && k != "version" {
                                o.insert(k, v);
                            }
                        }
                        bump(o, None);
                    }
                    reply(StatusCode::OK, order.clone())
                }
                (&Method::DELETE, []) | (&Method::POST, ["cancel"]) => {
                    if let Value::Object(o) = order {
                        bump(o, Some("cancelled"));
                    }
                    reply(StatusCode::OK, order.clone())
                }
                _ => reply(
                    StatusCode::METHOD_NOT_ALLOWED,
                    json!({"error": "method not allowed"}),
                ),
            }
        }
        _ => reply(StatusCode::NOT_FOUND, json!({"error": "not found"})),
    }
}

fn bump(order: &mut Map<String, Value>, status: Option<&str>) {
    let version = order.get("version").and_then(Value::as_u64).unwrap_or(0) + 1;
    order.insert("version".into(), json!(version));
    if let Some(s) = status {
        order.insert("status".into(), json!(s));
    }
}

fn reply(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

/// Prints each event the rules derive, as it is emitted.
pub async fn print_events(
    mut tail: tokio::sync::broadcast::Receiver<Arc<crate::events::CloudEvent>>,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        match tail.recv().await {
            Ok(event) => {
                let json = serde_json::to_string_pretty(&*event).unwrap_or_default();
                outln!(
                    "event {} (subject {}):\n{json}",
                    event.ty,
                    event.subject.as_deref().unwrap_or("-")
                );
            }
            Err(RecvError::Lagged(n)) => outln!("({n} events not shown)"),
            Err(RecvError::Closed) => return,
        }
    }
}

/// What `ficus demo` prints once everything listens.
pub fn banner(
    proxy: SocketAddr,
    admin: SocketAddr,
    shop: SocketAddr,
    dir: &std::path::Path,
) -> String {
    let p = format!("http://{proxy}");
    let events_file = dir.join("events.jsonl");
    format!(
        "ficus demo: a sample legacy shop is running at http://{shop}, ficus in front of it at {p}\n\
         \n\
         Try:\n  \
           curl -i -X POST {p}/orders -H 'content-type: application/json' -d '{{\"customer_id\": \"c-42\", \"total\": 99.5}}'\n  \
           curl -i {p}/orders/1\n  \
           curl -i -X PATCH {p}/orders/1 -H 'content-type: application/json' -d '{{\"total\": 120}}'\n  \
           curl -i -X DELETE {p}/orders/1\n  \
           curl -s http://{admin}/metrics | grep -E 'ficus_(requests|events)_'\n  \
           curl -N http://{admin}/events/tail\n\
         \n\
         Each event is printed here as it is emitted, and delivered to {}.\n\
         Ctrl-C stops it.\n",
        events_file.display()
    )
}
