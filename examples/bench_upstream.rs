//! A tiny, fast upstream for `benches/load/run.sh`: HTTP/1.1 keep-alive on one thread.
//!
//! `GET` (any path) answers a fixed JSON body of about 1 KiB; `POST` reads and discards the
//! request body, then answers a small JSON. Anything else gets `405`.
//!
//! ```text
//! cargo run --release --example bench_upstream -- 127.0.0.1:18080
//! ```

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// About 1 KiB of JSON, the size of a typical small API answer.
fn get_body() -> Bytes {
    let mut items = String::new();
    for i in 0..12 {
        if i > 0 {
            items.push(',');
        }
        items.push_str(&format!(
            r#"{{"id":{i},"sku":"SKU-{:06}","name":"item number {i}","price":{}.99}}"#,
            1000 + i,
            10 + i
        ));
    }
    let mut body = format!(r#"{{"status":"ok","count":12,"items":[{items}]"#);
    // Pad to exactly 1024 bytes so that every run moves the same amount.
    let pad = 1024usize.saturating_sub(body.len() + r#","pad":""}"#.len());
    body.push_str(&format!(r#","pad":"{}"}}"#, "x".repeat(pad)));
    Bytes::from(body)
}

const POST_BODY: &[u8] = br#"{"status":"accepted"}"#;
static JSON: HeaderValue = HeaderValue::from_static("application/json");

async fn handle(req: Request<Incoming>, get: Bytes) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, body) = match *req.method() {
        Method::GET | Method::HEAD => (StatusCode::OK, get),
        Method::POST | Method::PUT => {
            // Read and drop the body frame by frame; never keep it.
            let mut body = req.into_body();
            while let Some(frame) = body.frame().await {
                if frame.is_err() {
                    break;
                }
            }
            (StatusCode::OK, Bytes::from_static(POST_BODY))
        }
        _ => (StatusCode::METHOD_NOT_ALLOWED, Bytes::new()),
    };
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, JSON.clone());
    Ok(response)
}

fn main() -> std::io::Result<()> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:18080".to_string())
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = TcpListener::bind(addr).await?;
        eprintln!("bench_upstream listening on {}", listener.local_addr()?);
        let get = get_body();
        loop {
            let (tcp, _) = match listener.accept().await {
                Ok(conn) => conn,
                Err(e) => {
                    eprintln!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let get = get.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| handle(req, get.clone()));
                let _ = http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    })
}
