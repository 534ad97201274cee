//! The admin listener: `/healthz`, `/readyz`, `/metrics`. Read-only, on its own port so that
//! probes and scrapes never queue behind proxied traffic.

use std::convert::Infallible;
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Why ficus is not ready, or ready. Read by `/readyz`, written at start and shutdown.
#[derive(Debug)]
pub struct Readiness {
    reason: RwLock<Option<String>>,
}

impl Readiness {
    pub fn new(reason: &str) -> Arc<Readiness> {
        Arc::new(Readiness {
            reason: RwLock::new(Some(reason.to_string())),
        })
    }

    pub fn set_ready(&self) {
        if let Ok(mut r) = self.reason.write() {
            *r = None;
        }
    }

    pub fn set_not_ready(&self, reason: &str) {
        if let Ok(mut r) = self.reason.write() {
            *r = Some(reason.to_string());
        }
    }

    /// `None` when ready.
    pub fn reason(&self) -> Option<String> {
        match self.reason.read() {
            Ok(r) => r.clone(),
            Err(_) => Some("readiness state poisoned".into()),
        }
    }
}

pub struct Admin {
    pub registry: Registry,
    pub readiness: Arc<Readiness>,
}

impl Admin {
    fn respond(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                "admin endpoints are read-only\n",
            );
        }
        match req.uri().path() {
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/readyz" => match self.readiness.reason() {
                None => text(StatusCode::OK, "ready\n"),
                Some(reason) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {reason}\n"),
                ),
            },
            "/metrics" => {
                let mut response = Response::new(Full::new(Bytes::from(crate::metrics::render(
                    &self.registry,
                ))));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                response
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: try /healthz, /readyz or /metrics\n",
            ),
        }
    }

    /// Serves until `stop` is cancelled.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, stop: CancellationToken) {
        let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
        loop {
            let (tcp, _) = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(c) => c,
                    Err(error) => {
                        tracing::warn!(%error, "admin accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let admin = self.clone();
            let builder = builder.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let response = admin.respond(&req);
                    async move { Ok::<_, Infallible>(response) }
                });
                let conn = builder.serve_connection(TokioIo::new(tcp), service);
                tokio::pin!(conn);
                tokio::select! {
                    _ = conn.as_mut() => {}
                    _ = stop.cancelled() => {}
                }
            });
        }
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
