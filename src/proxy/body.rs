//! Bodies on the request path: streamed frame by frame, never collected.
//!
//! [`Idle`] cuts an exchange in which no body bytes moved in either direction for
//! `idle_timeout`. Both bodies of one exchange share an [`Activity`], so a long upload with a
//! silent response (or the reverse) is not cut while the other side is moving. A cut while the
//! client's request body has not ended is the client's stall, not the upstream's: the
//! upstream is most likely waiting for those bytes, so it is not counted against it (the
//! forwarding answers `408`, as for a stall while a body is kept for a fallback).
//!
//! The [`Activity`] also records when the request body ended, from which the upstream's
//! `timeout` for its response head runs (a long upload is not the upstream's slowness), and
//! whether the client's body broke off (a client that went away mid-upload is not the
//! upstream's `reset`).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The error an [`Idle`] body yields when its exchange went quiet.
#[derive(Debug, thiserror::Error)]
#[error("no body bytes in either direction for {0:?}")]
pub struct IdleTimeout(pub Duration);

/// Last time a body of one exchange moved, as microseconds since `origin`.
#[derive(Debug)]
pub struct Activity {
    origin: Instant,
    last_us: AtomicU64,
    idle: Duration,
    /// Counted when this exchange is cut, whichever body notices first.
    cut: Option<prometheus::IntCounter>,
    cut_once: AtomicBool,
    /// When the request body ended, as microseconds since `origin`; [`NOT_ENDED`] until it
    /// has (set by the request's [`Idle::request_side`] body).
    request_end_us: AtomicU64,
    /// The client's request body failed (it went away, or broke its framing) before its end.
    request_failed: AtomicBool,
    /// hyper asked for the next request body frame and the client has not sent it yet: while
    /// this holds, the client is the slow side of the exchange.
    request_waiting: AtomicBool,
}

const NOT_ENDED: u64 = u64::MAX;

impl Activity {
    pub fn new(idle: Duration, cut: Option<prometheus::IntCounter>) -> Arc<Activity> {
        Arc::new(Activity {
            origin: Instant::now(),
            last_us: AtomicU64::new(0),
            idle,
            cut,
            cut_once: AtomicBool::new(false),
            request_end_us: AtomicU64::new(NOT_ENDED),
            request_failed: AtomicBool::new(false),
            request_waiting: AtomicBool::new(false),
        })
    }

    /// Whether the client's request body had ended: when it had not at a cut, the stall was
    /// the client's.
    pub fn request_ended(&self) -> bool {
        self.request_end_us.load(Ordering::Relaxed) != NOT_ENDED
    }

    /// When the client's request body ended, if it has.
    pub fn request_end(&self) -> Option<Instant> {
        match self.request_end_us.load(Ordering::Relaxed) {
            NOT_ENDED => None,
            us => Some(self.origin + Duration::from_micros(us)),
        }
    }

    /// Whether the client's request body failed before its end: the client's doing.
    pub fn request_failed(&self) -> bool {
        self.request_failed.load(Ordering::Relaxed)
    }

    /// Whether the request body is waiting for the client's next bytes right now.
    pub fn request_waiting(&self) -> bool {
        self.request_waiting.load(Ordering::Relaxed)
    }

    /// When a body of the exchange last moved (its start, before any did).
    pub fn last_progress(&self) -> Instant {
        self.origin + Duration::from_micros(self.last_us.load(Ordering::Relaxed))
    }

    fn end_request(&self) {
        // The first end counts; `NOT_ENDED - 1` keeps an (absurd) 584 000-year-old exchange
        // from reading as not ended.
        let us = u64::try_from(self.origin.elapsed().as_micros())
            .unwrap_or(NOT_ENDED)
            .min(NOT_ENDED - 1);
        let _ = self.request_end_us.compare_exchange(
            NOT_ENDED,
            us,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    fn record_cut(&self) {
        if !self.cut_once.swap(true, Ordering::Relaxed) {
            if !self.request_ended() {
                tracing::warn!(idle_timeout = ?self.idle, "exchange cut: the client's request body stalled");
                return;
            }
            if let Some(counter) = &self.cut {
                counter.inc();
            }
            tracing::warn!(idle_timeout = ?self.idle, "exchange cut: no body bytes in either direction");
        }
    }

    fn touch(&self) {
        let us = u64::try_from(self.origin.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.last_us.store(us, Ordering::Relaxed);
    }

    fn deadline(&self) -> Instant {
        self.last_progress() + self.idle
    }
}

pin_project! {
    /// A body that fails with [`IdleTimeout`] when its exchange went quiet.
    ///
    /// The timer is only created the first time the inner body is not ready: a small body that
    /// arrives with its head never allocates one.
    pub struct Idle<B> {
        #[pin]
        inner: B,
        sleep: Option<Pin<Box<Sleep>>>,
        activity: Arc<Activity>,
        // Counted when the inner body fails: on a response, the upstream's `reset` errors
        // after its head (a request's inner body failing is the client's doing).
        broken: Option<prometheus::IntCounter>,
        // This is the client's request body: its end is recorded in the activity.
        request: bool,
    }
}

impl<B> Idle<B> {
    pub fn new(inner: B, activity: Arc<Activity>) -> Self {
        Idle {
            inner,
            sleep: None,
            activity,
            broken: None,
            request: false,
        }
    }

    /// Marks this as the client's request body, whose end [`Activity::request_ended`] reports.
    pub fn request_side(mut self) -> Self
    where
        B: Body,
    {
        self.request = true;
        if self.inner.is_end_stream() {
            self.activity.end_request();
        }
        self
    }

    /// Counts on `broken` (once) when the inner body fails.
    pub fn counting_failures(mut self, broken: prometheus::IntCounter) -> Self {
        self.broken = Some(broken);
        self
    }

    pub fn into_inner(self) -> B {
        self.inner
    }
}

impl<B> Body for Idle<B>
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
        let polled = this.inner.as_mut().poll_frame(cx);
        if *this.request {
            this.activity
                .request_waiting
                .store(polled.is_pending(), Ordering::Relaxed);
        }
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                this.activity.touch();
                // hyper stops polling a body that says it ended with its last frame, and
                // drops one after its trailers.
                if *this.request && (this.inner.is_end_stream() || frame.is_trailers()) {
                    this.activity.end_request();
                }
                return Poll::Ready(Some(Ok(frame)));
            }
            Poll::Ready(Some(Err(e))) => {
                let e = e.into();
                if *this.request {
                    this.activity.request_failed.store(true, Ordering::Relaxed);
                }
                if let Some(broken) = this.broken.take() {
                    broken.inc();
                    tracing::warn!(error = %super::forward::error_chain(&*e), "upstream response cut short after its head");
                }
                return Poll::Ready(Some(Err(e)));
            }
            Poll::Ready(None) => {
                if *this.request {
                    this.activity.end_request();
                }
                return Poll::Ready(None);
            }
            Poll::Pending => {}
        }
        // The timer is re-armed lazily: frames only store a timestamp, and the sleep moves to
        // the latest deadline when it fires early.
        let activity = this.activity;
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(activity.deadline())));
        loop {
            ready!(sleep.as_mut().poll(cx));
            let deadline = activity.deadline();
            if deadline <= Instant::now() {
                activity.record_cut();
                return Poll::Ready(Some(Err(Box::new(IdleTimeout(activity.idle)))));
            }
            sleep.as_mut().reset(deadline);
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What goes to an upstream: the client's body streamed once, or a kept copy that can be
/// sent again (fallback, shadow).
pub enum UpstreamBody {
    Stream(hyper::body::Incoming),
    Buffered(Option<Bytes>),
    /// A body too large to keep: the bytes read while trying, then the rest of the stream.
    Resumed {
        read: Option<Bytes>,
        trailers: Option<Frame<Bytes>>,
        rest: hyper::body::Incoming,
    },
}

impl UpstreamBody {
    pub fn buffered(bytes: Bytes) -> Self {
        UpstreamBody::Buffered((!bytes.is_empty()).then_some(bytes))
    }

    pub fn resumed(
        read: Bytes,
        trailers: Option<Frame<Bytes>>,
        rest: hyper::body::Incoming,
    ) -> Self {
        UpstreamBody::Resumed {
            read: (!read.is_empty()).then_some(read),
            trailers,
            rest,
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            UpstreamBody::Stream(b) => Pin::new(b).poll_frame(cx),
            UpstreamBody::Buffered(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            UpstreamBody::Resumed {
                read,
                trailers,
                rest,
            } => {
                if let Some(d) = read.take() {
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                if let Some(t) = trailers.take() {
                    return Poll::Ready(Some(Ok(t)));
                }
                Pin::new(rest).poll_frame(cx)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Stream(b) => b.is_end_stream(),
            UpstreamBody::Buffered(data) => data.is_none(),
            UpstreamBody::Resumed {
                read,
                trailers,
                rest,
            } => read.is_none() && trailers.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Stream(b) => b.size_hint(),
            UpstreamBody::Buffered(data) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            UpstreamBody::Resumed { read, rest, .. } => {
                let n = read.as_ref().map_or(0, |d| d.len() as u64);
                let inner = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower().saturating_add(n));
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper.saturating_add(n));
                }
                hint
            }
        }
    }
}

pin_project! {
    /// What ficus answers with: the upstream's body, or a short body ficus made itself.
    #[project = ProxyBodyProj]
    pub enum ProxyBody {
        Upstream { #[pin] body: Idle<super::pool::Leased> },
        Full { data: Option<Bytes> },
        // Boxed: only responses some rule matches take this path.
        Events { body: Box<super::events::EventBody> },
        // Boxed: only shadowed requests with a comparison take this path.
        Shadowed { body: Box<super::shadow::Tapped> },
    }
}

impl ProxyBody {
    pub fn full(data: impl Into<Bytes>) -> Self {
        ProxyBody::Full {
            data: Some(data.into()),
        }
    }

    pub fn empty() -> Self {
        ProxyBody::Full { data: None }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project() {
            ProxyBodyProj::Upstream { body } => body.poll_frame(cx),
            ProxyBodyProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            ProxyBodyProj::Events { body } => Pin::new(body.as_mut()).poll_frame(cx),
            ProxyBodyProj::Shadowed { body } => Pin::new(body.as_mut()).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Upstream { body } => body.is_end_stream(),
            ProxyBody::Full { data } => data.is_none(),
            ProxyBody::Events { body } => body.is_end_stream(),
            ProxyBody::Shadowed { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Upstream { body } => body.size_hint(),
            ProxyBody::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            ProxyBody::Events { body } => body.size_hint(),
            ProxyBody::Shadowed { body } => body.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    type Item = Result<Frame<Bytes>, BoxError>;

    /// A body whose frames the test sends, and which ends when the sender is dropped.
    fn channel_body() -> (
        tokio::sync::mpsc::Sender<Item>,
        StreamBody<impl futures_util::Stream<Item = Item>>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::channel::<Item>(1);
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        (tx, StreamBody::new(stream))
    }

    #[tokio::test(start_paused = true)]
    async fn idle_body_fails_after_quiet_period_and_not_before() {
        let (tx, stream) = channel_body();
        let counter = prometheus::IntCounter::new("t", "t").expect("counter");
        let activity = Activity::new(Duration::from_secs(10), Some(counter.clone()));
        // The request had no body: a quiet response is the upstream's.
        let request =
            Idle::new(http_body_util::Empty::<Bytes>::new(), activity.clone()).request_side();
        assert!(activity.request_ended());
        drop(request);
        let mut body = std::pin::pin!(Idle::new(stream, activity));
        // Frames every 6 s keep it alive past the 10 s idle limit.
        for _ in 0..3 {
            tokio::time::advance(Duration::from_secs(6)).await;
            tx.send(Ok(Frame::data(Bytes::from_static(b"x"))))
                .await
                .expect("send");
            let frame = body.frame().await.expect("frame").expect("ok");
            assert_eq!(frame.into_data().expect("data"), "x");
        }
        let started = Instant::now();
        let err = body.frame().await.expect("some").expect_err("idle");
        assert!(err.is::<IdleTimeout>());
        assert_eq!(counter.get(), 1, "the cut is counted once");
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        drop(tx);
    }

    /// A request body that goes quiet before its end: the exchange is cut, but the stall is
    /// the client's and is not counted against the upstream. Its last frame ends it: from
    /// then on a quiet exchange is the upstream's again.
    #[tokio::test(start_paused = true)]
    async fn a_stall_before_the_request_body_ends_is_not_counted_against_the_upstream() {
        let counter = prometheus::IntCounter::new("t", "t").expect("counter");
        let (tx, stream) = channel_body();
        let activity = Activity::new(Duration::from_secs(10), Some(counter.clone()));
        let request = Idle::new(stream, activity.clone()).request_side();
        let mut request = std::pin::pin!(request);
        tx.send(Ok(Frame::data(Bytes::from_static(b"x"))))
            .await
            .expect("send");
        request.frame().await.expect("frame").expect("ok");
        assert!(!activity.request_ended(), "the body has not ended yet");
        let err = request.frame().await.expect("some").expect_err("idle");
        assert!(err.is::<IdleTimeout>());
        assert_eq!(counter.get(), 0, "a client's stall is not the upstream's");
        assert!(!activity.request_ended());

        // The same, but the request body ends: the quiet response after it is counted.
        let (tx, stream) = channel_body();
        let activity = Activity::new(Duration::from_secs(10), Some(counter.clone()));
        let mut request = std::pin::pin!(Idle::new(stream, activity.clone()).request_side());
        tx.send(Ok(Frame::data(Bytes::from_static(b"x"))))
            .await
            .expect("send");
        drop(tx);
        request.frame().await.expect("frame").expect("ok");
        assert!(request.frame().await.is_none(), "the body ended");
        assert!(activity.request_ended());
        let quiet = futures_util::stream::pending::<Result<Frame<Bytes>, BoxError>>();
        let mut response = std::pin::pin!(Idle::new(StreamBody::new(quiet), activity));
        let err = response.frame().await.expect("some").expect_err("idle");
        assert!(err.is::<IdleTimeout>());
        assert_eq!(counter.get(), 1, "a quiet upstream is counted");
    }
}
