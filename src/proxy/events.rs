//! The event tap on the request path. A request that no rule can match by method and path
//! passes through untouched: no capture, no allocation. For the others:
//!
//! - with `when_full: reject` and a full outbox, the request is answered `503` before the
//!   monolith sees it (no state change without its event);
//! - the request body is teed into a capture buffer (at most `limits.capture_body`) while it
//!   streams to the upstream, if a candidate rule reads it;
//! - when the response status matches a candidate, the response body is captured the same way,
//!   the rules are evaluated when it ends, and the events are appended to the outbox. With
//!   `durability: sync` the response is held until its events are durable: a small body
//!   (known length within `capture_body`) is read whole before the response is released; a
//!   larger or unknown-length body streams, but its last frame is held back until the events
//!   are on disk, so no client has a complete response whose event could still be lost.
//! - a client that goes away mid-response does not lose the event: the rest of the upstream
//!   body is read in the background and the events emitted.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use futures_util::future::Either;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use pin_project_lite::pin_project;
use tokio::sync::broadcast;

use super::body::{BoxError, ProxyBody};
use super::forward::proxy_error;
use super::{ProxyState, Routed};
use crate::events::build::{
    cloud_event, envelope, envelope_after, envelope_head, Context as BuildContext,
};
use crate::events::{CloudEvent, Envelope};
use crate::metrics::{DropReason, Metrics};
use crate::outbox::{Durability, Outbox, OutboxError, Ticket, WhenFull};
use crate::rules::{Candidates, Captured, Exchange, Needs, Outcome, RuleSet, SkipReason};

/// Everything the event tap needs, shared by all connections.
pub struct EventPath {
    pub rules: Arc<RuleSet>,
    pub outbox: Outbox,
    pub durability: Durability,
    pub when_full: WhenFull,
    pub capture_limit: usize,
    pub default_source: String,
    /// Every configured sink's name: where the events of rules without `sinks` go.
    pub sinks: Vec<String>,
    /// Derived events for `/events/tail` (and the demo's printout); lagging readers lose
    /// the oldest, never block the request path.
    pub tail: broadcast::Sender<Arc<CloudEvent>>,
    pub metrics: Metrics,
    /// `ficus_events_emitted_total` per rule, in rule order.
    pub emitted: Vec<prometheus::IntCounter>,
    /// The start of each rule's envelopes, in rule order: its sinks and name, escaped once
    /// (see [`envelope_head`]).
    pub heads: Vec<Vec<u8>>,
    /// The largest batch of events one exchange produced so far, in bytes: with
    /// `when_full: reject`, a request is refused unless this much room is left.
    pub largest: std::sync::atomic::AtomicU64,
}

impl EventPath {
    /// The tap for `events` (the rules of `config`), writing to `outbox`; derived events are
    /// also sent to `tail`.
    pub fn new(
        events: &crate::config::Events,
        config: &crate::config::Config,
        outbox: Outbox,
        metrics: Metrics,
        tail: broadcast::Sender<Arc<CloudEvent>>,
    ) -> EventPath {
        let rules = events.rules.clone();
        let emitted = rules
            .rules()
            .iter()
            .map(|r| metrics.events_emitted_total.with_label_values(&[&r.name]))
            .collect();
        let sinks: Vec<String> = config.sinks.iter().map(|s| s.name.clone()).collect();
        // A rule's drafts carry its name and its `sinks` (all sinks when it has none).
        let heads = rules
            .rules()
            .iter()
            .map(|r| envelope_head(r.sinks.as_deref().unwrap_or(&sinks), &r.name))
            .collect();
        EventPath {
            rules,
            outbox,
            durability: config.outbox.durability,
            when_full: config.outbox.when_full,
            capture_limit: usize::try_from(config.limits.capture_body).unwrap_or(usize::MAX),
            default_source: events.source.clone(),
            sinks,
            tail,
            metrics,
            emitted,
            heads,
            largest: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

/// The part of a request the rules may read, kept until the response ends.
struct RequestParts {
    candidates: Candidates,
    method: Method,
    path: String,
    query: Option<String>,
    /// The headers the candidates may read (see [`kept_headers`]).
    headers: HeaderMap,
    /// How the captured request body is decoded and parsed.
    body_format: BodyFormat,
    /// Copied into the events.
    traceparent: Option<HeaderValue>,
    needs: Needs,
    body: Option<Arc<CaptureSlot>>,
    upstream: Arc<str>,
}

/// The fields of a head that say how to read its body: decoded by `Content-Encoding` (see
/// [`Captured::decoding`]), parsed by `Content-Type`.
struct BodyFormat {
    content_type: Option<HeaderValue>,
    content_encoding: Option<HeaderValue>,
}

impl BodyFormat {
    fn of(headers: &HeaderMap) -> BodyFormat {
        BodyFormat {
            content_type: headers.get(http::header::CONTENT_TYPE).cloned(),
            content_encoding: headers.get(http::header::CONTENT_ENCODING).cloned(),
        }
    }

    fn captured(&self, bytes: Bytes, truncated: bool, limit: usize) -> Captured {
        Captured::decoding(
            bytes,
            self.content_type.as_ref(),
            self.content_encoding.as_ref(),
            truncated,
            limit,
        )
    }
}

/// The value of a field sent exactly once: W3C Trace Context has a receiver ignore a
/// `traceparent` that came twice, as it cannot tell which one is the caller's.
fn only_one(headers: &http::HeaderMap, name: &str) -> Option<HeaderValue> {
    let mut all = headers.get_all(name).iter();
    match (all.next(), all.next()) {
        (Some(v), None) => Some(v.clone()),
        _ => None,
    }
}

/// The headers of `all` that rules may read: every one when a condition may read the map
/// whole, otherwise only those a rule names (usually none, and then nothing is copied).
/// Cloning the whole head of every exchange was a good part of the tap's cost.
fn kept_headers(all: &HeaderMap, needs: &Needs, named: &[HeaderName]) -> HeaderMap {
    if needs.header_maps {
        return all.clone();
    }
    let mut kept = HeaderMap::new();
    for name in named {
        for value in all.get_all(name) {
            kept.append(name.clone(), value.clone());
        }
    }
    kept
}

/// A capture buffer filled by a body while it streams.
#[derive(Debug, Default)]
pub struct CaptureSlot {
    inner: Mutex<CaptureBuf>,
}

#[derive(Debug, Default)]
struct CaptureBuf {
    bytes: Gathered,
    truncated: bool,
    complete: bool,
}

/// A body's bytes gathered from its chunks: the first kept as it came, not copied (most
/// bodies arrive in one), all copied together once a second one comes.
#[derive(Debug, Default)]
struct Gathered {
    first: Bytes,
    more: BytesMut,
}

impl Gathered {
    fn len(&self) -> usize {
        self.first.len() + self.more.len()
    }

    fn push(&mut self, data: Bytes) {
        if data.is_empty() {
            return;
        }
        if self.first.is_empty() && self.more.is_empty() {
            self.first = data;
            return;
        }
        if !self.first.is_empty() {
            let first = std::mem::take(&mut self.first);
            self.more.reserve(first.len() + data.len());
            self.more.extend_from_slice(&first);
        }
        self.more.extend_from_slice(&data);
    }

    /// Everything gathered, leaving it empty.
    fn take(&mut self) -> Bytes {
        if self.more.is_empty() {
            std::mem::take(&mut self.first)
        } else {
            std::mem::take(&mut self.more).freeze()
        }
    }
}

impl CaptureSlot {
    fn push(&self, data: &Bytes, limit: usize) {
        if let Ok(mut buf) = self.inner.lock() {
            let room = limit.saturating_sub(buf.bytes.len());
            if data.len() > room {
                buf.truncated = true;
            }
            let take = data.len().min(room);
            if take > 0 {
                buf.bytes.push(data.slice(..take));
            }
        }
    }

    fn finish(&self) {
        if let Ok(mut buf) = self.inner.lock() {
            buf.complete = true;
        }
    }

    /// What was captured; a body that did not end (the upstream answered before reading it
    /// all) counts as truncated.
    fn take(&self, format: &BodyFormat, limit: usize) -> Captured {
        // Decoding (up to `limit` bytes of inflation) happens after the lock is released.
        let (bytes, truncated) = match self.inner.lock() {
            Ok(mut buf) => (buf.bytes.take(), buf.truncated || !buf.complete),
            Err(_) => return Captured::empty(),
        };
        format.captured(bytes, truncated, limit)
    }
}

pin_project! {
    /// A request body that copies its first bytes into a [`CaptureSlot`] while streaming.
    pub struct Tee<B> {
        #[pin]
        inner: B,
        slot: Option<(Arc<CaptureSlot>, usize)>,
    }
}

impl<B> Tee<B> {
    pub fn plain(inner: B) -> Self {
        Tee { inner, slot: None }
    }

    pub fn capturing(inner: B, slot: (Arc<CaptureSlot>, usize)) -> Self {
        Tee {
            inner,
            slot: Some(slot),
        }
    }
}

impl<B> Body for Tee<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if let Some((slot, limit)) = this.slot.as_ref() {
            match &frame {
                Some(Ok(f)) => {
                    if let Some(data) = f.data_ref() {
                        slot.push(data, *limit);
                    }
                }
                None => slot.finish(),
                Some(Err(_)) => {}
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        let end = self.inner.is_end_stream();
        if end {
            if let Some((slot, _)) = &self.slot {
                slot.finish();
            }
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[derive(Clone)]
pub struct Events<S> {
    inner: S,
    state: Arc<ProxyState>,
}

impl<S> Events<S> {
    pub fn new(inner: S, state: Arc<ProxyState>) -> Self {
        Events { inner, state }
    }
}

type BoxResponseFuture =
    Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

impl<S> tower::Service<Routed> for Events<S>
where
    S: tower::Service<Routed, Response = Response<ProxyBody>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Either<S::Future, BoxResponseFuture>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut routed: Routed) -> Self::Future {
        let Some(events) = self.state.events.as_ref() else {
            return Either::Left(self.inner.call(routed));
        };
        let candidates = events
            .rules
            .candidates(routed.request.method(), routed.request.uri().path());
        if candidates.is_empty() {
            return Either::Left(self.inner.call(routed));
        }
        let events = events.clone();
        let needed = events.largest.load(std::sync::atomic::Ordering::Relaxed);
        if events.when_full == WhenFull::Reject && !events.outbox.has_room(needed) {
            tracing::warn!(
                path = routed.request.uri().path(),
                "outbox full: request refused before the upstream"
            );
            return Either::Right(Box::pin(async {
                Ok(proxy_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "outbox_full",
                    "ficus: the event outbox is full; try again later\n".into(),
                ))
            }));
        }
        let needs = events.rules.needs(&candidates);
        let request = &routed.request;
        let slot = needs.request_body.then(|| Arc::new(CaptureSlot::default()));
        routed.capture = slot.clone().map(|s| (s, events.capture_limit));
        let upstream = self
            .state
            .upstreams
            .get(routed.target.upstream)
            .map_or_else(|| Arc::from(""), |u| u.name.clone());
        let parts = RequestParts {
            candidates,
            method: request.method().clone(),
            path: request.uri().path().to_string(),
            query: request.uri().query().map(str::to_string),
            headers: kept_headers(request.headers(), &needs, &needs.request_headers),
            body_format: BodyFormat::of(request.headers()),
            traceparent: only_one(request.headers(), "traceparent"),
            needs,
            body: slot,
            upstream,
        };
        let response = self.inner.call(routed);
        Either::Right(Box::pin(respond(
            response,
            self.state.clone(),
            events,
            parts,
        )))
    }
}

/// Awaits the upstream's response for a request some rule may match and decides what to do
/// with it. One future from the request to the events: an `async` block around a call to
/// another `async fn` moved the request's parts and the response into a second future, a
/// few hundred bytes copied each time.
async fn respond<F>(
    response: F,
    state: Arc<ProxyState>,
    events: Arc<EventPath>,
    mut parts: RequestParts,
) -> Result<Response<ProxyBody>, Infallible>
where
    F: Future<Output = Result<Response<ProxyBody>, Infallible>>,
{
    let response = response.await?;
    // A fallback answered instead of the routed upstream: events name who served.
    if let Some(served) = response.extensions().get::<super::forward::ServedBy>() {
        if let Some(u) = state.upstreams.get(served.0) {
            parts.upstream = u.name.clone();
        }
    }
    drop(state);
    let status = response.status().as_u16();
    // ficus's own errors (502/504) are not the monolith's answer: no rule sees them.
    if response
        .headers()
        .contains_key(&super::forward::FICUS_ERROR)
        || !events.rules.any_status(&parts.candidates, status)
    {
        return Ok(response);
    }
    let seen_at = SystemTime::now();
    let (head, body) = response.into_parts();
    let small = body
        .size_hint()
        .exact()
        .is_some_and(|n| n <= events.capture_limit as u64);
    if small {
        // Read whole (it is small), emit, and in sync mode release only once durable.
        let bytes = match read_whole(body).await {
            Ok(bytes) => bytes,
            Err(error) => {
                tracing::warn!(%error, "upstream response body failed; no event emitted");
                return Ok(proxy_error(
                    StatusCode::BAD_GATEWAY,
                    "reset",
                    "ficus: upstream response body was cut short\n".into(),
                ));
            }
        };
        let captured =
            BodyFormat::of(&head.headers).captured(bytes.clone(), false, events.capture_limit);
        let kept = kept_headers(&head.headers, &parts.needs, &parts.needs.response_headers);
        let sync = events.durability == Durability::Sync;
        let ticket = emit(&events, parts, status, kept, captured, seen_at, sync);
        if sync {
            if let Err(response) = wait_durable(ticket).await {
                return Ok(response);
            }
        }
        return Ok(Response::from_parts(head, ProxyBody::full(bytes)));
    }
    let finish = Finish {
        events: events.clone(),
        status,
        headers: kept_headers(&head.headers, &parts.needs, &parts.needs.response_headers),
        body_format: BodyFormat::of(&head.headers),
        parts,
        seen_at,
    };
    let body = EventBody {
        inner: Some(body),
        captured: BytesMut::new(),
        truncated: false,
        limit: events.capture_limit,
        sync: events.durability == Durability::Sync,
        held: None,
        waiting: None,
        finish: Some(finish),
        done: false,
    };
    Ok(Response::from_parts(
        head,
        ProxyBody::Events {
            body: Box::new(body),
        },
    ))
}

/// A body's data, whole (its trailers dropped): the one chunk it came in as it is, more
/// copied together. What `collect().to_bytes()` gives, without its list of chunks.
async fn read_whole(mut body: ProxyBody) -> Result<Bytes, BoxError> {
    let mut bytes = Gathered::default();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            bytes.push(data);
        }
    }
    Ok(bytes.take())
}

/// What became of an exchange's events.
enum Emitted {
    /// No rule produced an event (or `when_full: drop` dropped them, counted).
    Nothing,
    /// The ticket, when the append was tracked.
    Stored(Option<Ticket>),
    /// The outbox refused them: with `durability: sync` the response must not be released.
    Lost,
}

/// Awaits a sync ticket. A response whose events could not be stored is withheld: the client
/// gets ficus's `500` instead (the monolith did answer, so this is no `503` to retry blindly).
async fn wait_durable(emitted: Emitted) -> Result<(), Response<ProxyBody>> {
    let failed = |why: &str| {
        tracing::error!(reason = why, "event not stored; the response is withheld");
        proxy_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "outbox",
            "ficus: the event for this response could not be stored\n".into(),
        )
    };
    match emitted {
        Emitted::Nothing => Ok(()),
        Emitted::Lost => Err(failed("outbox refused the events")),
        Emitted::Stored(None) => Ok(()),
        Emitted::Stored(Some(ticket)) => match ticket.durable().await {
            Ok(()) => Ok(()),
            Err(error) => Err(failed(&error.to_string())),
        },
    }
}

struct Finish {
    events: Arc<EventPath>,
    parts: RequestParts,
    status: u16,
    /// The response headers the candidates may read (see [`kept_headers`]).
    headers: HeaderMap,
    body_format: BodyFormat,
    seen_at: SystemTime,
}

impl Finish {
    fn emit(self, body: Bytes, truncated: bool, tracked: bool) -> Emitted {
        let captured = self
            .body_format
            .captured(body, truncated, self.events.capture_limit);
        emit(
            &self.events,
            self.parts,
            self.status,
            self.headers,
            captured,
            self.seen_at,
            tracked,
        )
    }
}

/// Evaluates the rules on a finished exchange and appends the events; returns the ticket to
/// await for durability when `tracked` (with `durability: async` nobody waits for it).
fn emit(
    events: &EventPath,
    parts: RequestParts,
    status: u16,
    response_headers: HeaderMap,
    response_body: Captured,
    seen_at: SystemTime,
    tracked: bool,
) -> Emitted {
    let request_body = match &parts.body {
        Some(slot) => slot.take(&parts.body_format, events.capture_limit),
        None => Captured::empty(),
    };
    let traceparent = parts
        .traceparent
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .filter(|t| crate::events::build::valid_traceparent(t));
    let exchange = Exchange {
        method: parts.method,
        path: parts.path,
        query: parts.query,
        request_headers: parts.headers,
        request_body,
        status,
        response_headers,
        response_body,
    };
    let ctx = BuildContext {
        default_source: &events.default_source,
        upstream: &parts.upstream,
        seen_at,
        traceparent,
    };
    let outcomes = events.rules.evaluate_indexed(&parts.candidates, exchange);
    let mut payloads = Vec::with_capacity(outcomes.len());
    // The rules that emitted, by index, for their counters: a bit set, not a list of names.
    let mut emitted = Candidates::default();
    // Only kept when someone watches `/events/tail`.
    let watching = events.tail.receiver_count() > 0;
    let mut tail = Vec::new();
    for (i, outcome) in outcomes {
        match outcome {
            Outcome::Emit(draft) => {
                // A rule without `sinks` means the sinks configured now, written down by
                // name: a sink added (or back) after a reload gets only what was meant for it.
                let sinks = draft.sinks.as_deref().unwrap_or(&events.sinks);
                emitted.insert(i);
                if watching {
                    let envelope = Envelope {
                        sinks: Some(sinks.to_vec()),
                        rule: draft.rule.to_string(),
                        event: cloud_event(draft, &ctx),
                    };
                    payloads.push(envelope.encode());
                    tail.push(Arc::new(envelope.event));
                } else {
                    // The rule's sinks and name, escaped when the tap was built.
                    payloads.push(match events.heads.get(i) {
                        Some(head) => envelope_after(head, &draft, &ctx),
                        None => envelope(&draft, sinks, &ctx),
                    });
                }
            }
            Outcome::Skipped { rule, reason } => match reason {
                SkipReason::ConditionError(ref e) => {
                    tracing::warn!(rule = %rule, error = %e, "rule condition failed to evaluate; no event");
                    events.metrics.dropped(DropReason::ConditionError, 1);
                }
                SkipReason::MissingType => {
                    tracing::warn!(rule = %rule, "rule type evaluated to nothing; no event");
                    events.metrics.dropped(DropReason::MissingType, 1);
                }
                _ => tracing::debug!(rule = %rule, reason = %reason, "rule did not apply"),
            },
        }
    }
    if payloads.is_empty() {
        return Emitted::Nothing;
    }
    let n = payloads.len() as u64;
    let size: u64 = payloads.iter().map(|p| p.len() as u64).sum();
    events
        .largest
        .fetch_max(size, std::sync::atomic::Ordering::Relaxed);
    let appended = match (events.when_full, tracked) {
        // The request was admitted with room to spare before the upstream saw it; its events
        // are kept even if they pass `max_bytes` (larger than any before, or requests
        // admitted together), since the upstream has acted on it.
        (WhenFull::Reject, tracked) => events
            .outbox
            .append_admitted(payloads, tracked)
            .map(|ticket| tracked.then_some(ticket)),
        (WhenFull::Drop, true) => events.outbox.append(payloads).map(Some),
        (WhenFull::Drop, false) => events.outbox.append_untracked(payloads).map(|_| None),
    };
    match appended {
        Ok(ticket) => {
            for i in emitted.iter() {
                if let Some(c) = events.emitted.get(i) {
                    c.inc();
                }
            }
            for event in tail {
                let _ = events.tail.send(event);
            }
            Emitted::Stored(ticket)
        }
        Err(OutboxError::Full { .. }) => {
            tracing::error!(events = n, "outbox full: events dropped");
            events.metrics.dropped(DropReason::OutboxFull, n);
            if events.when_full == WhenFull::Drop {
                Emitted::Nothing
            } else {
                Emitted::Lost
            }
        }
        Err(error) => {
            tracing::error!(events = n, %error, "outbox write failed: events dropped");
            events.metrics.dropped(DropReason::OutboxError, n);
            Emitted::Lost
        }
    }
}

/// The wait for a sync ticket; `Err` carries the response to give instead.
type DurableWait = Pin<Box<dyn Future<Output = Result<(), Response<ProxyBody>>> + Send>>;

/// A streamed response body that captures, emits at its end, and (sync) holds its last frame
/// until the events are durable.
pub struct EventBody {
    inner: Option<ProxyBody>,
    captured: BytesMut,
    truncated: bool,
    limit: usize,
    sync: bool,
    held: Option<Frame<Bytes>>,
    waiting: Option<DurableWait>,
    finish: Option<Finish>,
    done: bool,
}

impl EventBody {
    fn capture(&mut self, frame: &Frame<Bytes>) {
        if let Some(data) = frame.data_ref() {
            let room = self.limit.saturating_sub(self.captured.len());
            if data.len() > room {
                self.truncated = true;
            }
            self.captured
                .extend_from_slice(&data[..data.len().min(room)]);
        }
    }
}

impl Body for EventBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(this.held.take().map(Ok));
            }
            if let Some(waiting) = this.waiting.as_mut() {
                let result = ready!(waiting.as_mut().poll(cx));
                this.waiting = None;
                this.done = true;
                if result.is_err() {
                    // Not durable: the client must not see a complete response.
                    this.held = None;
                    return Poll::Ready(Some(Err(
                        "ficus: the event for this response could not be stored".into(),
                    )));
                }
                continue;
            }
            let Some(inner) = this.inner.as_mut() else {
                return Poll::Ready(None);
            };
            match ready!(Pin::new(inner).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    this.capture(&frame);
                    if !this.sync {
                        return Poll::Ready(Some(Ok(frame)));
                    }
                    if let Some(previous) = this.held.replace(frame) {
                        return Poll::Ready(Some(Ok(previous)));
                    }
                }
                Some(Err(e)) => {
                    // The upstream cut the body: the exchange is incomplete, no event.
                    this.finish = None;
                    this.inner = None;
                    return Poll::Ready(Some(Err(e)));
                }
                None => {
                    this.inner = None;
                    let emitted = match this.finish.take() {
                        Some(f) => f.emit(
                            std::mem::take(&mut this.captured).freeze(),
                            this.truncated,
                            this.sync,
                        ),
                        None => Emitted::Nothing,
                    };
                    if this.sync {
                        this.waiting = Some(Box::pin(wait_durable(emitted)));
                    } else {
                        this.done = true;
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.held.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        // Frames are only delayed, never added or removed: the upstream's length holds.
        match &self.inner {
            Some(inner) => {
                let mut hint = inner.size_hint();
                let held = self
                    .held
                    .as_ref()
                    .and_then(|f| f.data_ref())
                    .map_or(0, |d| d.len() as u64);
                hint.set_lower(hint.lower().saturating_add(held));
                if let Some(upper) = hint.upper() {
                    hint.set_upper(upper.saturating_add(held));
                }
                hint
            }
            None => SizeHint::default(),
        }
    }
}

impl Drop for EventBody {
    fn drop(&mut self) {
        // The client left before the end: read the rest of the upstream's answer in the
        // background and emit its events anyway. The monolith changed state either way.
        let (Some(finish), Some(mut inner)) = (self.finish.take(), self.inner.take()) else {
            return;
        };
        let mut captured = std::mem::take(&mut self.captured);
        let mut truncated = self.truncated;
        let limit = self.limit;
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                while let Some(frame) = inner.frame().await {
                    match frame {
                        Ok(frame) => {
                            if let Some(data) = frame.data_ref() {
                                let room = limit.saturating_sub(captured.len());
                                truncated |= data.len() > room;
                                captured.extend_from_slice(&data[..data.len().min(room)]);
                            }
                        }
                        Err(_) => return,
                    }
                }
                // Tracked whatever the durability: a failure is logged.
                match finish.emit(captured.freeze(), truncated, true) {
                    Emitted::Stored(None) => {}
                    Emitted::Stored(Some(ticket)) => {
                        if let Err(error) = ticket.durable().await {
                            tracing::error!(%error, "event of an abandoned response not stored");
                        }
                    }
                    Emitted::Lost => tracing::error!("event of an abandoned response not stored"),
                    Emitted::Nothing => {}
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn captured(chunks: &[&'static [u8]], limit: usize, finish: bool) -> Captured {
        let slot = CaptureSlot::default();
        for chunk in chunks {
            slot.push(&Bytes::from_static(chunk), limit);
        }
        if finish {
            slot.finish();
        }
        let format = BodyFormat {
            content_type: None,
            content_encoding: None,
        };
        slot.take(&format, limit)
    }

    /// One chunk, several, empty ones, and the limit falling in the first chunk or a later
    /// one: the bytes kept are the body's first `limit`, truncated when there was more.
    #[test]
    fn the_capture_keeps_the_first_bytes_of_the_body() {
        let cases: &[(&[&[u8]], usize, &str, bool)] = &[
            (&[b"hello"], 10, "hello", false),
            (&[b"hello"], 5, "hello", false),
            (&[b"hello"], 3, "hel", true),
            (&[b"he", b"", b"llo", b" world"], 100, "hello world", false),
            (&[b"he", b"llo", b" world"], 4, "hell", true),
            (&[b"hello", b" world"], 5, "hello", true),
            (&[b"", b"hello"], 100, "hello", false),
            (&[], 100, "", false),
        ];
        for &(chunks, limit, expected, truncated) in cases {
            let c = captured(chunks, limit, true);
            // An empty body reads as `null`.
            let value = if expected.is_empty() {
                serde_json::Value::Null
            } else {
                serde_json::json!(expected)
            };
            assert_eq!(c.value(), &value, "{chunks:?} {limit}");
            assert_eq!(c.is_truncated(), truncated, "{chunks:?} {limit}");
        }
        // A body that did not end is truncated.
        assert!(captured(&[b"hello"], 100, false).is_truncated());
    }
}
