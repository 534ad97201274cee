//! Shadow traffic: a sampled copy of a request goes to the route's shadow upstream in a task
//! of its own, after the primary answered. Nothing the client sees depends on it: the copy is
//! sent from a spawned task with its own timeout, its response is read and dropped there, and
//! at most `max_in_flight` copies per route exist at once (beyond that they are dropped and
//! counted), so a slow or dead shadow can never pile up.
//!
//! Every sampled copy that gives no comparison — it failed, timed out or was not sent — counts
//! as `ficus_shadow_comparisons_total{result="error"}`, with or without `compare`: SPEC's
//! shadow metric is the one a dashboard watches, so a dead shadow must show there.
//!
//! With `compare`, the primary's body is teed (at most [`COMPARE_LIMIT`] bytes) while it streams
//! to the client, and the two answers are compared: status, the listed headers, and bodies —
//! structurally when both are JSON, minus the `ignore` paths; byte for byte otherwise.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use prometheus::IntCounter;
use tokio::sync::{oneshot, Semaphore};

use super::body::{Activity, BoxError, Idle, UpstreamBody};
use super::events::Tee;
use super::ProxyState;
use crate::config::routes::{Compare, Shadow};
use crate::metrics::Metrics;
use crate::routing::Target;

/// Bytes of each body kept for comparison; bodies beyond it are compared on status and headers.
pub const COMPARE_LIMIT: usize = 1 << 20;

/// The `result` label of `ficus_shadow_comparisons_total`: exactly the values SPEC section 5
/// names, so dashboards and alerts written against the SPEC see every comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comparison {
    Match,
    StatusMismatch,
    /// The content differs: the body, or one of the compared headers (which describe it).
    BodyMismatch,
    /// No comparison possible: the shadow copy was not sent, failed or timed out, or the
    /// primary's body broke off.
    Error,
}

impl Comparison {
    const ALL: [Comparison; 4] = [
        Comparison::Match,
        Comparison::StatusMismatch,
        Comparison::BodyMismatch,
        Comparison::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Comparison::Match => "match",
            Comparison::StatusMismatch => "status_mismatch",
            Comparison::BodyMismatch => "body_mismatch",
            Comparison::Error => "error",
        }
    }
}

/// What differed between the two answers; the log line says which, the metric only the kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Difference {
    Status,
    Header(http::HeaderName),
    Body,
}

impl Difference {
    pub fn result(&self) -> Comparison {
        match self {
            Difference::Status => Comparison::StatusMismatch,
            Difference::Header(_) | Difference::Body => Comparison::BodyMismatch,
        }
    }
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Difference::Status => f.write_str("status"),
            Difference::Header(name) => write!(f, "header {name}"),
            Difference::Body => f.write_str("body"),
        }
    }
}

/// A route's shadow bookkeeping: the concurrency cap and its series.
pub struct ShadowState {
    route: String,
    permits: Arc<Semaphore>,
    results: Vec<IntCounter>,
    dropped: IntCounter,
    mismatches: AtomicU64,
}

impl ShadowState {
    pub fn new(route: &str, shadow: &Shadow, metrics: &Metrics) -> ShadowState {
        ShadowState {
            route: route.to_string(),
            permits: Arc::new(Semaphore::new(shadow.max_in_flight)),
            results: Comparison::ALL
                .iter()
                .map(|c| {
                    metrics
                        .shadow_comparisons_total
                        .with_label_values(&[route, c.as_str()])
                })
                .collect(),
            dropped: metrics.shadow_dropped_total.with_label_values(&[route]),
            mismatches: AtomicU64::new(0),
        }
    }

    /// Whether this mismatch or failure is logged: the first ten, then one in a hundred, so
    /// that a shadow that differs on every request cannot flood the log.
    fn sampled(&self) -> bool {
        let n = self.mismatches.fetch_add(1, Ordering::Relaxed);
        n < 10 || n.is_multiple_of(100)
    }

    fn count(&self, c: Comparison) {
        if let Some(i) = Comparison::ALL.iter().position(|x| *x == c) {
            self.results[i].inc();
        }
    }

    /// A sampled copy that was never sent: dropped, and no comparison either.
    fn not_sent(&self) {
        self.dropped.inc();
        self.count(Comparison::Error);
    }
}

/// Returned by [`start`] when the primary body must be teed for the comparison.
pub struct ShadowTap {
    tx: oneshot::Sender<Captured>,
}

struct Captured {
    bytes: Bytes,
    truncated: bool,
}

impl ShadowTap {
    pub fn wrap(self, inner: Idle<super::pool::Leased>) -> Tapped {
        let mut tapped = Tapped {
            inner,
            buf: BytesMut::new(),
            truncated: false,
            tx: Some(self.tx),
        };
        // A body known empty (HEAD, 204, 304) may never be polled: hyper drops it unread, which
        // would otherwise count as a broken-off primary, an `error`.
        if tapped.inner.is_end_stream() {
            tapped.finish();
        }
        tapped
    }
}

/// The primary's response body, teed for the comparison.
pub struct Tapped {
    inner: Idle<super::pool::Leased>,
    buf: BytesMut,
    truncated: bool,
    tx: Option<oneshot::Sender<Captured>>,
}

impl Tapped {
    fn finish(&mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Captured {
                bytes: self.buf.split().freeze(),
                truncated: self.truncated,
            });
        }
    }
}

impl Body for Tapped {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let Some(data) = f.data_ref() {
                    let room = COMPARE_LIMIT.saturating_sub(this.buf.len());
                    this.truncated |= data.len() > room;
                    this.buf.extend_from_slice(&data[..data.len().min(room)]);
                }
                // hyper stops polling once the body says it ended; that is the end too.
                if this.inner.is_end_stream() {
                    this.finish();
                }
            }
            None => this.finish(),
            // An incomplete primary body: the sender is dropped and the comparison is an error.
            Some(Err(_)) => this.tx = None,
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A sampled copy that is never sent: its request body was too long to keep (it streamed to
/// the primary once, so the same bytes cannot go out again), could not be read, or the
/// primary gave no response to compare it with.
pub fn not_sent(state: &ProxyState, target: Target) {
    if let Some(Some(bookkeeping)) = state.shadows.get(target.route) {
        bookkeeping.not_sent();
    }
}

/// Sends the shadow copy if the route's cap allows, and arranges the comparison; the returned
/// tap must wrap the primary's body.
pub fn start(
    state: &Arc<ProxyState>,
    target: Target,
    shadow: &Shadow,
    parts: http::request::Parts,
    path_and_query: Option<http::uri::PathAndQuery>,
    body: Bytes,
    primary: &Response<super::pool::Leased>,
) -> Option<ShadowTap> {
    let Some(Some(bookkeeping)) = state.shadows.get(target.route) else {
        return None;
    };
    let Ok(permit) = bookkeeping.permits.clone().try_acquire_owned() else {
        bookkeeping.not_sent();
        return None;
    };
    let compare = shadow.compare.clone();
    let primary_head = compare
        .as_ref()
        .map(|c| (primary.status(), pick_headers(primary.headers(), c)));
    let (tap, primary_body) = if compare.is_some() {
        let (tx, rx) = oneshot::channel();
        (Some(ShadowTap { tx }), Some(rx))
    } else {
        (None, None)
    };
    let state = state.clone();
    let upstream_index = shadow.upstream;
    let timeout = shadow.timeout;
    let route = target.route;
    tokio::spawn(async move {
        let _permit = permit;
        let Some(Some(bookkeeping)) = state.shadows.get(route) else {
            return;
        };
        let outcome = send_copy(&state, upstream_index, parts, path_and_query, body, timeout).await;
        let (s_status, s_headers, s_body, s_trunc) = match outcome {
            Ok(answer) => answer,
            Err(error) => {
                if bookkeeping.sampled() {
                    tracing::info!(route = %bookkeeping.route, %error, "shadow request failed");
                }
                bookkeeping.count(Comparison::Error);
                return;
            }
        };
        let (Some(compare), Some((status, headers)), Some(rx)) =
            (compare, primary_head, primary_body)
        else {
            // Without `compare` an answered copy has nothing to be compared with.
            return;
        };
        let result = match rx.await {
            Ok(p) => {
                let difference = compare_responses(
                    &compare,
                    (status, &headers, &p.bytes, p.truncated),
                    (
                        s_status,
                        &pick_headers(&s_headers, &compare),
                        &s_body,
                        s_trunc,
                    ),
                );
                match difference {
                    None => Comparison::Match,
                    Some(difference) => {
                        if bookkeeping.sampled() {
                            tracing::info!(
                                route = %bookkeeping.route,
                                result = difference.result().as_str(),
                                differs = %difference,
                                primary_status = status.as_u16(),
                                shadow_status = s_status.as_u16(),
                                primary_body = %truncate(&p.bytes),
                                shadow_body = %truncate(&s_body),
                                "shadow response differs"
                            );
                        }
                        difference.result()
                    }
                }
            }
            Err(_) => Comparison::Error,
        };
        bookkeeping.count(result);
    });
    tap
}

type ShadowAnswer = (StatusCode, HeaderMap, Bytes, bool);

async fn send_copy(
    state: &ProxyState,
    upstream_index: usize,
    parts: http::request::Parts,
    path_and_query: Option<http::uri::PathAndQuery>,
    body: Bytes,
    timeout: std::time::Duration,
) -> Result<ShadowAnswer, String> {
    let upstream = state
        .upstreams
        .get(upstream_index)
        .ok_or("no such upstream")?;
    let activity = Activity::new(upstream.idle_timeout, None);
    let mut request = http::Request::from_parts(
        parts,
        Idle::new(Tee::plain(UpstreamBody::buffered(body)), activity).request_side(),
    );
    *request.uri_mut() = upstream.target(path_and_query, request.headers_mut());
    let exchange = async {
        let response = upstream
            .client
            .request(request)
            .await
            .map_err(|e| super::forward::error_chain(&e))?;
        let (head, body) = response.into_parts();
        let mut buf = BytesMut::new();
        let mut truncated = false;
        let mut body = body;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| e.to_string())?;
            if let Some(data) = frame.data_ref() {
                let room = COMPARE_LIMIT.saturating_sub(buf.len());
                truncated |= data.len() > room;
                buf.extend_from_slice(&data[..data.len().min(room)]);
            }
        }
        Ok::<_, String>((head.status, head.headers, buf.freeze(), truncated))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("no complete answer within {timeout:?}"))?
}

fn pick_headers(headers: &HeaderMap, compare: &Compare) -> HeaderMap {
    let mut out = HeaderMap::new();
    for name in &compare.headers {
        for v in headers.get_all(name) {
            out.append(name.clone(), v.clone());
        }
    }
    out
}

fn truncate(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(512)]).into_owned();
    if bytes.len() > 512 {
        format!("{text}…")
    } else {
        text
    }
}

/// Compares two answers: (status, the compared headers, body prefix, body truncated); `None`
/// when they agree.
pub fn compare_responses(
    compare: &Compare,
    primary: (StatusCode, &HeaderMap, &[u8], bool),
    shadow: (StatusCode, &HeaderMap, &[u8], bool),
) -> Option<Difference> {
    if primary.0 != shadow.0 {
        return Some(Difference::Status);
    }
    for name in &compare.headers {
        if !primary
            .1
            .get_all(name)
            .iter()
            .eq(shadow.1.get_all(name).iter())
        {
            return Some(Difference::Header(name.clone()));
        }
    }
    // A body cut at the limit cannot be compared fairly; status and headers decided.
    if primary.3 || shadow.3 {
        return None;
    }
    let same = match (
        serde_json::from_slice::<serde_json::Value>(primary.2),
        serde_json::from_slice::<serde_json::Value>(shadow.2),
    ) {
        (Ok(mut a), Ok(mut b)) => {
            for path in &compare.ignore {
                remove(&mut a, path);
                remove(&mut b, path);
            }
            a == b
        }
        _ => primary.2 == shadow.2,
    };
    (!same).then_some(Difference::Body)
}

fn remove(value: &mut serde_json::Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        *value = serde_json::Value::Null;
        return;
    };
    let mut v = value;
    for key in parents {
        v = match v {
            serde_json::Value::Object(m) => match m.get_mut(key) {
                Some(next) => next,
                None => return,
            },
            serde_json::Value::Array(items) => {
                match key.parse::<usize>().ok().and_then(|i| items.get_mut(i)) {
                    Some(next) => next,
                    None => return,
                }
            }
            _ => return,
        };
    }
    if let serde_json::Value::Object(m) = v {
        m.remove(last);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(headers: &[&'static str], ignore: &[&str]) -> Compare {
        Compare {
            headers: headers
                .iter()
                .map(|h| http::HeaderName::from_static(h))
                .collect(),
            ignore: ignore
                .iter()
                .map(|p| p.split('.').map(str::to_string).collect())
                .collect(),
        }
    }

    fn hm(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, http::HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn json_bodies_compare_structurally_minus_ignored_paths() {
        let c = cfg(&["content-type"], &["generated_at", "meta.trace"]);
        let h = hm(&[("content-type", "application/json")]);
        let a = br#"{"id":1,"items":[1,2],"generated_at":"x","meta":{"trace":"a","v":1}}"#;
        let b =
            br#"{ "meta": {"v": 1, "trace": "b"}, "items": [1, 2], "id": 1, "generated_at": "y" }"#;
        assert_eq!(
            compare_responses(
                &c,
                (StatusCode::OK, &h, a, false),
                (StatusCode::OK, &h, b, false)
            ),
            None
        );
        let d = br#"{"id":2,"items":[1,2]}"#;
        assert_eq!(
            compare_responses(
                &c,
                (StatusCode::OK, &h, a, false),
                (StatusCode::OK, &h, d, false)
            ),
            Some(Difference::Body)
        );
        assert_eq!(
            compare_responses(
                &c,
                (StatusCode::OK, &h, a, false),
                (StatusCode::CREATED, &h, a, false)
            ),
            Some(Difference::Status)
        );
        let other = hm(&[("content-type", "text/html")]);
        assert_eq!(
            compare_responses(
                &c,
                (StatusCode::OK, &h, a, false),
                (StatusCode::OK, &other, a, false)
            ),
            Some(Difference::Header(http::HeaderName::from_static(
                "content-type"
            )))
        );
        assert_eq!(
            compare_responses(
                &c,
                (StatusCode::OK, &h, b"abc", false),
                (StatusCode::OK, &h, b"abd", false)
            ),
            Some(Difference::Body)
        );
    }

    #[test]
    fn a_header_difference_is_counted_as_different_content() {
        let c = cfg(&["content-type"], &[]);
        let json = hm(&[("content-type", "application/json")]);
        let html = hm(&[("content-type", "text/html")]);
        let d = compare_responses(
            &c,
            (StatusCode::OK, &json, b"{}", false),
            (StatusCode::OK, &html, b"{}", false),
        )
        .expect("differs");
        assert_eq!(d.result(), Comparison::BodyMismatch);
        assert_eq!(d.to_string(), "header content-type");
        // A header the comparison does not list is not looked at.
        let other = cfg(&["etag"], &[]);
        assert_eq!(
            compare_responses(
                &other,
                (StatusCode::OK, &json, b"{}", false),
                (StatusCode::OK, &html, b"{}", false)
            ),
            None
        );
    }
}
