//! Request metrics and the access log, recorded when the response body ends (or is dropped,
//! when the client goes away), so that durations include the whole download.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::{Method, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::Instant;

use super::body::BoxError;
use super::{ProxyState, Routed};
use crate::routing::Target;

#[derive(Clone)]
pub struct Telemetry<S> {
    inner: S,
    state: Arc<ProxyState>,
}

impl<S> Telemetry<S> {
    pub fn new(inner: S, state: Arc<ProxyState>) -> Self {
        Telemetry { inner, state }
    }
}

/// `method` label values: the standard methods, everything else as `other`, so that a client
/// cannot create series at will.
pub fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

/// What the access log line needs, kept only when the access log is on.
struct AccessInfo {
    method: Method,
    uri: Uri,
}

impl<S, B> tower::Service<Routed> for Telemetry<S>
where
    S: tower::Service<Routed, Response = Response<B>>,
    B: Body<Data = Bytes>,
{
    type Response = Response<Observed<B>>;
    type Error = S::Error;
    type Future = TelemetryFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, routed: Routed) -> Self::Future {
        let record = Record {
            state: self.state.clone(),
            target: routed.target,
            method: method_label(routed.request.method()),
            started: Instant::now(),
            access: self.state.access_log.then(|| AccessInfo {
                method: routed.request.method().clone(),
                uri: routed.request.uri().clone(),
            }),
        };
        TelemetryFuture {
            inner: self.inner.call(routed),
            record: Some(record),
        }
    }
}

pin_project! {
    pub struct TelemetryFuture<F> {
        #[pin]
        inner: F,
        record: Option<Record>,
    }
}

impl<F, B, E> Future for TelemetryFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body,
{
    type Output = Result<Response<Observed<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.inner.poll(cx))?;
        let record = this.record.take();
        let status = response.status();
        let empty = response.body().is_end_stream();
        Poll::Ready(Ok(response.map(|inner| Observed {
            inner,
            done: record.map(|r| Done {
                record: r,
                status,
                bytes: 0,
                empty,
            }),
        })))
    }
}

struct Record {
    state: Arc<ProxyState>,
    target: Target,
    method: &'static str,
    started: Instant,
    access: Option<AccessInfo>,
}

struct Done {
    record: Record,
    status: StatusCode,
    bytes: u64,
    /// The body was known to be empty, so it may never be polled.
    empty: bool,
}

impl Done {
    fn finish(self, complete: bool) {
        let r = &self.record;
        let state = &r.state;
        let route = state.router.route_name(r.target);
        let elapsed = r.started.elapsed();
        state
            .metrics
            .requests_total
            .with_label_values(&[route, r.method, self.status.as_str()])
            .inc();
        if let Some(histogram) = state.request_durations.get(r.target.route) {
            histogram.observe(elapsed.as_secs_f64());
        }
        if let Some(access) = &r.access {
            let upstream = state
                .upstreams
                .get(r.target.upstream)
                .map_or("", |u| &*u.name);
            // The path without its query: query strings carry tokens often enough that they
            // are not logged. Headers are never logged, so `Authorization` and cookies stay out.
            tracing::info!(
                target: "ficus::access",
                method = %access.method,
                path = access.uri.path(),
                route,
                status = self.status.as_u16(),
                upstream,
                duration_ms = elapsed.as_secs_f64() * 1000.0,
                bytes = self.bytes,
                complete,
                "request"
            );
        }
    }
}

pin_project! {
    /// A response body that records the request when it ends or is dropped.
    pub struct Observed<B> {
        #[pin]
        inner: B,
        done: Option<Done>,
    }

    impl<B> PinnedDrop for Observed<B> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(done) = this.project().done.take() {
                // Bodies known to be empty are never polled; that is still a complete answer.
                let complete = done.empty;
                done.finish(complete);
            }
        }
    }
}

impl<B> Body for Observed<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let (Some(done), Some(data)) = (this.done.as_mut(), f.data_ref()) {
                    done.bytes += data.len() as u64;
                }
                // hyper stops polling a body that says it ended with this frame (its
                // `Content-Length` reached): it is complete now, not at the drop.
                if this.inner.is_end_stream() {
                    if let Some(done) = this.done.take() {
                        done.finish(true);
                    }
                }
            }
            None => {
                if let Some(done) = this.done.take() {
                    done.finish(true);
                }
            }
            Some(Err(_)) => {}
        }
        Poll::Ready(frame.map(|f| f.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
