//! Keep-alive connections to one upstream, handed out one request at a time.
//!
//! Each connection is a hyper HTTP/1.1 client connection driven by its own task; the pool keeps
//! the idle ones' request handles (`SendRequest`) in a LIFO list under a lock that is never held
//! across an await. A connection goes back to the pool when the response body it carried has
//! ended (the [`Leased`] body returns it), not when the response head arrives: an HTTP/1.1
//! connection cannot carry a second request before the first one's body is through.
//!
//! Why not hyper-util's pooled client: per request it clones itself, hashes the pool key twice,
//! boxes its future and spawns a task that waits for the connection to become ready again. Here
//! a request costs a lock, a pop and a push; the wait for readiness happens only in the rare
//! case the connection is not ready when its response ends (the request body still streaming).
//!
//! A request that a pooled connection refuses unsent (the upstream closed it while it was
//! idle) is sent again on another connection, as hyper-util does: nothing of it reached the
//! upstream, so this never sends a request twice.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::time::Instant;
use tower::ServiceExt;

use super::body::BoxError;
use super::client::RequestBody;

/// Idle connections are closed after this long; shorter than the 120 s most servers and load
/// balancers use, so ficus closes first and rarely reuses a connection the upstream is closing.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// How often idle connections are checked for age when no request comes to do it.
const REAP_EVERY: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// No connection: TCP connect (or its timeout) or the TLS handshake failed.
    #[error("cannot connect")]
    Connect(#[source] BoxError),
    #[error("HTTP/1.1 handshake failed")]
    Handshake(#[source] hyper::Error),
    /// The exchange on an established connection failed.
    #[error(transparent)]
    Exchange(hyper::Error),
}

pub struct Pool {
    shared: Arc<Shared>,
}

struct Shared {
    connector: HttpsConnector<HttpConnector>,
    /// `scheme://authority/`, what the connector dials.
    target: Uri,
    /// Oldest at the front; requests take from the back, so a few connections stay warm and
    /// the rest age out.
    idle: Mutex<VecDeque<IdleConn>>,
    reaper: std::sync::Once,
}

struct IdleConn {
    sender: SendRequest<RequestBody>,
    since: Instant,
}

impl Pool {
    pub fn new(connector: HttpsConnector<HttpConnector>, target: Uri) -> Pool {
        Pool {
            shared: Arc::new(Shared {
                connector,
                target,
                idle: Mutex::new(VecDeque::new()),
                reaper: std::sync::Once::new(),
            }),
        }
    }

    /// Sends `request` (origin-form URI, `Host` set) on an idle connection or a new one.
    pub async fn request(
        &self,
        mut request: Request<RequestBody>,
    ) -> Result<Response<Leased>, PoolError> {
        loop {
            let (mut sender, reused) = match self.shared.checkout() {
                Some(sender) => (sender, true),
                None => (self.connect().await?, false),
            };
            match sender.try_send_request(request).await {
                Ok(response) => return Ok(self.lease(sender, response)),
                Err(mut error) => match error.take_message() {
                    // Unsent on a connection that went stale while pooled: another one.
                    Some(unsent) if reused => request = unsent,
                    _ => return Err(PoolError::Exchange(error.into_error())),
                },
            }
        }
    }

    fn lease(
        &self,
        sender: SendRequest<RequestBody>,
        response: Response<Incoming>,
    ) -> Response<Leased> {
        let (parts, body) = response.into_parts();
        let mut body = Leased {
            inner: body,
            lease: None,
        };
        // After a 101 the connection belongs to the upgraded protocol.
        if parts.status != http::StatusCode::SWITCHING_PROTOCOLS {
            let lease = Lease {
                shared: self.shared.clone(),
                sender,
            };
            if body.inner.is_end_stream() {
                lease.release();
            } else {
                body.lease = Some(lease);
            }
        }
        Response::from_parts(parts, body)
    }

    async fn connect(&self) -> Result<SendRequest<RequestBody>, PoolError> {
        let shared = &self.shared;
        shared
            .reaper
            .call_once(|| spawn_reaper(Arc::downgrade(shared)));
        let io = shared
            .connector
            .clone()
            .oneshot(shared.target.clone())
            .await
            .map_err(PoolError::Connect)?;
        let (sender, connection) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(PoolError::Handshake)?;
        tokio::spawn(async move {
            // Upgrades: a 101 hands the connection to the WebSocket (or other) splice.
            if let Err(error) = connection.with_upgrades().await {
                tracing::debug!(%error, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<IdleConn>> {
        // A panic while holding this lock leaves a list that is still valid.
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn checkout(&self) -> Option<SendRequest<RequestBody>> {
        let now = Instant::now();
        let mut idle = self.lock();
        while let Some(conn) = idle.pop_back() {
            if conn.sender.is_ready() && now.duration_since(conn.since) < IDLE_TIMEOUT {
                return Some(conn.sender);
            }
            // Closed by the upstream or too old: dropping the handle closes it.
        }
        None
    }

    fn put(&self, sender: SendRequest<RequestBody>) {
        let now = Instant::now();
        let mut idle = self.lock();
        while idle
            .front()
            .is_some_and(|c| now.duration_since(c.since) >= IDLE_TIMEOUT)
        {
            idle.pop_front();
        }
        idle.push_back(IdleConn { sender, since: now });
    }

    fn reap(&self) {
        let now = Instant::now();
        self.lock()
            .retain(|c| !c.sender.is_closed() && now.duration_since(c.since) < IDLE_TIMEOUT);
    }
}

fn spawn_reaper(shared: Weak<Shared>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(REAP_EVERY);
        tick.tick().await;
        loop {
            tick.tick().await;
            match shared.upgrade() {
                Some(shared) => shared.reap(),
                // The pool was dropped (its upstream left the config).
                None => return,
            }
        }
    });
}

/// A connection on loan to one exchange.
struct Lease {
    shared: Arc<Shared>,
    sender: SendRequest<RequestBody>,
}

impl Lease {
    fn release(self) {
        let Lease { shared, mut sender } = self;
        if sender.is_ready() {
            shared.put(sender);
        } else if !sender.is_closed() {
            // The request body is still going out (the upstream answered before reading it
            // all): the connection is reusable once that is done.
            tokio::spawn(async move {
                if sender.ready().await.is_ok() {
                    shared.put(sender);
                }
            });
        }
    }
}

pin_project_lite::pin_project! {
    /// An upstream response body that returns its connection to the pool when it ends.
    /// Dropped before its end, it drops the connection with it: hyper closes a connection
    /// whose response was not read through.
    pub struct Leased {
        #[pin]
        inner: Incoming,
        lease: Option<Lease>,
    }
}

impl Body for Leased {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let mut this = self.project();
        let frame = this.inner.as_mut().poll_frame(cx);
        let ended = match &frame {
            Poll::Ready(None) => true,
            // hyper's server stops polling once a body says it has ended.
            Poll::Ready(Some(Ok(_))) => this.inner.is_end_stream(),
            Poll::Ready(Some(Err(_))) => {
                *this.lease = None;
                false
            }
            Poll::Pending => false,
        };
        if ended {
            if let Some(lease) = this.lease.take() {
                lease.release();
            }
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
