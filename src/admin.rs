//! The admin listener: `/healthz`, `/readyz`, `/metrics`, `/events/tail` (Server-Sent Events
//! of derived events) and `/asyncapi`. Read-only, on its own port so that probes and scrapes
//! never queue behind proxied traffic.

use std::convert::Infallible;
use std::sync::{Arc, OnceLock, RwLock};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::events::CloudEvent;
use crate::outbox::Outbox;
use crate::proxy::Live;

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
    /// Every family ficus exports, declared even before its first series.
    pub families: Arc<[crate::metrics::Family]>,
    pub readiness: Arc<Readiness>,
    /// Set once the outbox is open (at start, or by the first reload that needs one).
    pub outbox: Arc<OnceLock<Outbox>>,
    /// The config in force: whether rules exist.
    pub live: Arc<Live>,
    /// Every derived event, across reloads.
    pub tail: broadcast::Sender<Arc<CloudEvent>>,
    /// The AsyncAPI document of the rules in force, as served at `/asyncapi`.
    pub asyncapi: Arc<arc_swap::ArcSwap<String>>,
}

type AdminBody = BoxBody<Bytes, Infallible>;

impl Admin {
    fn respond(&self, req: &Request<Incoming>) -> Response<AdminBody> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                "admin endpoints are read-only\n",
            );
        }
        match req.uri().path() {
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/readyz" => self.readyz(),
            "/metrics" => {
                let mut response =
                    Response::new(full(crate::metrics::render(&self.registry, &self.families)));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                response
            }
            "/asyncapi" => {
                let document = String::clone(&self.asyncapi.load());
                let mut response = Response::new(full(document));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("application/json"),
                );
                response
            }
            "/events/tail" => self.tail(),
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: try /healthz, /readyz, /metrics, /events/tail or /asyncapi\n",
            ),
        }
    }

    fn readyz(&self) -> Response<AdminBody> {
        if let Some(reason) = self.readiness.reason() {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {reason}\n"),
            );
        }
        if let Some(reason) = self.outbox.get().and_then(|o| o.health().err()) {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: outbox not writable: {reason}\n"),
            );
        }
        text(StatusCode::OK, "ready\n")
    }

    /// Server-Sent Events of every event the rules derive from now on.
    fn tail(&self) -> Response<AdminBody> {
        if self.live.load().events.is_none() {
            return text(StatusCode::NOT_FOUND, "no event rules are configured\n");
        }
        let receiver = self.tail.subscribe();
        let stream = futures_util::stream::unfold(receiver, |mut rx| async move {
            let chunk = match rx.recv().await {
                Ok(event) => {
                    // Unnamed SSE events, so a browser's `EventSource.onmessage` sees them;
                    // the type is in the data. JSON has no raw newline, so one `data:` line.
                    let json = String::from_utf8_lossy(&event.to_json()).into_owned();
                    format!("id: {}\ndata: {json}\n\n", event.id)
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    format!(": {n} events skipped (slow reader)\n\n")
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            };
            Some((Ok::<_, Infallible>(Frame::data(Bytes::from(chunk))), rx))
        });
        // A comment line first, so that a client sees the stream open at once.
        let hello = futures_util::stream::once(async {
            Ok::<_, Infallible>(Frame::data(Bytes::from_static(b": ficus event tail\n\n")))
        });
        let body = StreamBody::new(futures_util::StreamExt::chain(hello, stream));
        let mut response = Response::new(BodyExt::boxed(body));
        let h = response.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/event-stream"),
        );
        h.insert(
            header::CACHE_CONTROL,
            header::HeaderValue::from_static("no-cache"),
        );
        response
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

fn full(body: impl Into<Bytes>) -> AdminBody {
    BodyExt::boxed(Full::new(body.into()))
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<AdminBody> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
