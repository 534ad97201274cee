//! The innermost service: sends a routed request to its upstream and turns every way that can
//! fail into a short plain-text `502`/`504` that says it came from ficus, not the monolith.

use std::convert::Infallible;
use std::error::Error as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

use super::body::{Activity, Idle, IdleTimeout, ProxyBody, UpstreamBody};
use super::client::UpstreamClient;
use super::events::Tee;
use super::headers;
use super::pool::{Leased, PoolError};
use super::{ConnInfo, ProxyState, Routed};
use crate::metrics::UpstreamErrorKind;

/// Marks a response ficus made itself, so that a client or a test can tell a proxy `502` from
/// the monolith's own `502`. The value is the error kind.
pub static FICUS_ERROR: header::HeaderName = header::HeaderName::from_static("x-ficus-error");

#[derive(Clone)]
pub struct Forward {
    state: Arc<ProxyState>,
    conn: Arc<ConnInfo>,
}

impl Forward {
    pub fn new(state: Arc<ProxyState>, conn: Arc<ConnInfo>) -> Self {
        Forward { state, conn }
    }
}

impl tower::Service<Routed> for Forward {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, routed: Routed) -> Self::Future {
        let state = self.state.clone();
        let conn = self.conn.clone();
        Box::pin(async move { Ok(forward(&state, &conn, routed).await) })
    }
}

/// Request bodies up to this size are kept so that a fallback or shadow can send them again;
/// larger ones stream once and get neither.
const REPLAY_LIMIT: u64 = 64 * 1024;

/// Which upstream actually served a response, when a fallback changed it (so that events name
/// the upstream that answered).
#[derive(Debug, Clone, Copy)]
pub struct ServedBy(pub usize);

/// How one attempt at an upstream ended, before ficus turns failures into its own answers.
enum Attempt {
    Answered(Response<Leased>),
    Failed(UpstreamErrorKind, String),
    /// The client's request body went quiet for `idle_timeout` before its end: no upstream's
    /// failure, and nothing to fall back on (a body that can be sent twice was read whole).
    ClientIdle(std::time::Duration),
    /// The client's request body broke off before its end (the client went away, or sent
    /// less than its `Content-Length`): no upstream's failure either.
    ClientBroke,
}

async fn forward(state: &Arc<ProxyState>, conn: &ConnInfo, routed: Routed) -> Response<ProxyBody> {
    let target = routed.target;
    let route = state.router.config(target);
    let mut req = routed.request;
    let client_upgrade = req
        .headers()
        .contains_key(header::UPGRADE)
        .then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();

    let hop = headers::strip_hop_by_hop(&mut parts.headers);
    if parts.version == Version::HTTP_2 {
        // HTTP/2 carries the host in `:authority`; an HTTP/1.1 upstream needs `Host`, and
        // RFC 9113 section 8.3.1 has it replace a `host` field the client also sent.
        if let Some(host) = parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            parts.headers.insert(header::HOST, host);
        }
        headers::join_cookies(&mut parts.headers);
    } else if parts.version != Version::HTTP_2 && parts.uri.scheme().is_some() {
        // An absolute-form target (`GET http://shop.example/x HTTP/1.1`): RFC 9112 section
        // 3.2.2 has a proxy take the host from the target and ignore the received `Host`.
        if let Some(host) = parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            parts.headers.insert(header::HOST, host);
        }
    }
    headers::add_forwarding(
        &mut parts.headers,
        &conn.client_ip,
        conn.tls,
        state.trust_forwarded_headers,
    );
    let path_and_query = match route.and_then(|r| rewrite_path(r, parts.uri.path_and_query())) {
        Some(rewritten) => Some(rewritten),
        None => parts.uri.path_and_query().cloned(),
    };
    parts.version = Version::HTTP_11;

    // A request may go out again (fallback) or as a copy (shadow) only if its body can be
    // sent twice: none, or small enough to keep.
    let fallback = state
        .router
        .fallback(target)
        .filter(|f| f.methods.contains(&parts.method) && f.upstream != target.upstream);
    let shadow = state.router.shadow(target).filter(|s| {
        s.methods.contains(&parts.method) && (s.sample >= 1.0 || fastrand::f64() < s.sample)
    });
    // A sampled shadow copy that an early answer below leaves unsent is counted as such.
    let unsent = |response| {
        if shadow.is_some() {
            super::shadow::not_sent(state, target);
        }
        response
    };
    let (first_body, replay) = if fallback.is_some() || shadow.is_some() {
        match keep(body, state.upstreams[target.upstream].idle_timeout).await {
            Ok(kept) => kept,
            Err(response) => return unsent(response),
        }
    } else {
        (UpstreamBody::Stream(body), None)
    };
    let first_body = match routed.capture {
        Some(capture) => Tee::capturing(first_body, capture),
        None => Tee::plain(first_body),
    };

    let upstream = &state.upstreams[target.upstream];
    // Copies of the head only where a second sending may happen.
    let spare = (replay.is_some() && fallback.is_some()).then(|| parts.clone());
    let shadow_parts = (replay.is_some() && shadow.is_some()).then(|| parts.clone());
    let (attempt, activity) = send(upstream, parts, path_and_query.clone(), first_body).await;
    let needs_fallback = match &attempt {
        Attempt::Answered(r) => r.status().is_server_error(),
        Attempt::Failed(..) => true,
        Attempt::ClientIdle(_) | Attempt::ClientBroke => false,
    };
    let mut served = target.upstream;
    let (mut response, activity) = match (needs_fallback, fallback, spare, replay.as_ref()) {
        (true, Some(fallback), Some(spare), Some(bytes)) => {
            let why = match &attempt {
                Attempt::Answered(r) => format!("answered {}", r.status()),
                Attempt::Failed(kind, _) => kind.as_str().to_string(),
                Attempt::ClientIdle(_) | Attempt::ClientBroke => "client".to_string(),
            };
            drop(attempt);
            let alternate = &state.upstreams[fallback.upstream];
            tracing::warn!(
                route = state.router.route_name(target),
                from = %upstream.name,
                to = %alternate.name,
                reason = %why,
                "falling back"
            );
            if let Some(counter) = state.fallbacks.get(target.route) {
                counter.inc();
            }
            served = fallback.upstream;
            let body = Tee::plain(UpstreamBody::buffered(bytes.clone()));
            match send(alternate, spare, path_and_query.clone(), body).await {
                (Attempt::Answered(r), activity) => (r, activity),
                (Attempt::Failed(kind, message), _) => return unsent(failure(kind, message)),
                (Attempt::ClientIdle(idle), _) => return unsent(client_idle(idle)),
                (Attempt::ClientBroke, _) => return unsent(client_broke()),
            }
        }
        _ => match attempt {
            Attempt::Answered(r) => (r, activity),
            Attempt::Failed(kind, message) => return unsent(failure(kind, message)),
            Attempt::ClientIdle(idle) => return unsent(client_idle(idle)),
            Attempt::ClientBroke => return unsent(client_broke()),
        },
    };

    let tap = match (shadow, shadow_parts, replay) {
        (Some(shadow), Some(shadow_parts), Some(bytes)) => super::shadow::start(
            state,
            target,
            shadow,
            shadow_parts,
            path_and_query,
            bytes,
            &response,
        ),
        (Some(_), _, None) => {
            super::shadow::not_sent(state, target);
            None
        }
        _ => None,
    };

    let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
    if switching {
        match client_upgrade {
            Some(client) if hop.upgrade => {
                let upstream_upgrade = hyper::upgrade::on(&mut response);
                conn.tunnels.spawn(splice(client, upstream_upgrade));
            }
            _ => {
                let upstream = &state.upstreams[served];
                upstream.metrics.error(UpstreamErrorKind::Protocol);
                return proxy_error(
                    StatusCode::BAD_GATEWAY,
                    UpstreamErrorKind::Protocol.as_str(),
                    format!(
                        "ficus: upstream `{}` switched protocols unasked\n",
                        upstream.name
                    ),
                );
            }
        }
    }
    let (mut parts, body) = response.into_parts();
    headers::strip_response_hop_by_hop(&mut parts.headers, switching);
    if served != target.upstream {
        parts.extensions.insert(ServedBy(served));
    }
    let reset = state.upstreams[served]
        .metrics
        .counter(UpstreamErrorKind::Reset);
    let body = Idle::new(body, activity).counting_failures(reset.clone());
    let body = match tap {
        Some(tap) => ProxyBody::Shadowed {
            body: Box::new(tap.wrap(body)),
        },
        None => ProxyBody::Upstream { body },
    };
    Response::from_parts(parts, body)
}

fn failure(kind: UpstreamErrorKind, message: String) -> Response<ProxyBody> {
    let status = match kind {
        UpstreamErrorKind::Timeout | UpstreamErrorKind::Idle => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::BAD_GATEWAY,
    };
    proxy_error(status, kind.as_str(), message)
}

/// The answer to a client whose request body went quiet for `idle`, as nginx's
/// `client_body_timeout` answers.
fn client_idle(idle: std::time::Duration) -> Response<ProxyBody> {
    proxy_error(
        StatusCode::REQUEST_TIMEOUT,
        "client",
        format!("ficus: no request body bytes for {idle:?}\n"),
    )
}

/// The answer (if the client is still there to read it) to a request whose body broke off:
/// the same as when a body kept for a fallback does.
fn client_broke() -> Response<ProxyBody> {
    proxy_error(
        StatusCode::BAD_REQUEST,
        "client",
        "ficus: the request body ended before it was complete\n".to_string(),
    )
}

/// Reads a request body so that it can be sent twice: kept whole when it ends within
/// [`REPLAY_LIMIT`], whatever its framing (a chunked or HTTP/2 body announces no length), else
/// what was read goes out followed by the rest, streamed once and never sent again. A client
/// that goes quiet for the upstream's `idle_timeout` meanwhile gets `408`.
async fn keep(
    body: hyper::body::Incoming,
    idle: std::time::Duration,
) -> Result<(UpstreamBody, Option<bytes::Bytes>), Response<ProxyBody>> {
    use http_body::Body as _;
    use http_body_util::BodyExt as _;
    // Most retried requests (GET, HEAD, DELETE) have no body: no timer, no buffer.
    if body.is_end_stream() {
        return Ok((
            UpstreamBody::buffered(bytes::Bytes::new()),
            Some(bytes::Bytes::new()),
        ));
    }
    if body.size_hint().lower() > REPLAY_LIMIT {
        return Ok((UpstreamBody::Stream(body), None));
    }
    let mut body = Idle::new(body, Activity::new(idle, None)).request_side();
    let mut read = bytes::BytesMut::new();
    loop {
        let frame = match body.frame().await {
            None => {
                let bytes = read.freeze();
                return Ok((UpstreamBody::buffered(bytes.clone()), Some(bytes)));
            }
            Some(Ok(frame)) => frame,
            Some(Err(error)) if error.is::<IdleTimeout>() => return Err(client_idle(idle)),
            Some(Err(error)) => {
                return Err(proxy_error(
                    StatusCode::BAD_REQUEST,
                    "client",
                    format!("ficus: the request body could not be read: {error}\n"),
                ))
            }
        };
        match frame.into_data() {
            Ok(data) => {
                read.extend_from_slice(&data);
                if read.len() as u64 > REPLAY_LIMIT {
                    return Ok((
                        UpstreamBody::resumed(read.freeze(), None, body.into_inner()),
                        None,
                    ));
                }
            }
            // Trailers end the body; kept bodies carry none, so this one goes out once.
            Err(trailers) => {
                return Ok((
                    UpstreamBody::resumed(read.freeze(), Some(trailers), body.into_inner()),
                    None,
                ))
            }
        }
    }
}

/// `strip_prefix` / `add_prefix`; `None` when the route rewrites nothing (or the path does not
/// carry the prefix).
fn rewrite_path(
    route: &crate::config::routes::RouteConfig,
    pq: Option<&http::uri::PathAndQuery>,
) -> Option<http::uri::PathAndQuery> {
    if route.strip_prefix.is_none() && route.add_prefix.is_none() {
        return None;
    }
    let pq = pq?;
    let mut path = pq.path();
    if let Some(prefix) = &route.strip_prefix {
        if let Some(rest) = path.strip_prefix(prefix.as_str()) {
            if rest.is_empty() || rest.starts_with('/') {
                path = rest;
            }
        }
    }
    let mut out = String::with_capacity(pq.as_str().len() + 16);
    match &route.add_prefix {
        // `/orders` with `strip_prefix: /orders, add_prefix: /v2/orders` is `/v2/orders`, not
        // `/v2/orders/`: a trailing slash is a different resource to many servers.
        Some(prefix) => {
            out.push_str(prefix);
            if !path.is_empty() || prefix.is_empty() {
                out.push_str(if path.is_empty() { "/" } else { path });
            }
        }
        None => out.push_str(if path.is_empty() { "/" } else { path }),
    }
    if let Some(q) = pq.query() {
        out.push('?');
        out.push_str(q);
    }
    out.parse().ok()
}

/// One attempt at `upstream`: builds the request for it, waits for the response head up to
/// `timeout` after the request body has ended, and classifies failures (counted per
/// upstream).
///
/// The `timeout` clock starts at the body's end, as Envoy's route timeout does, because
/// until then the upstream is waiting for the client: a long upload is not a slow upstream
/// (its stalls are `idle_timeout`'s). A request without a body ends at once, so for most
/// requests the clock starts when they are sent.
async fn send(
    upstream: &UpstreamClient,
    parts: http::request::Parts,
    path_and_query: Option<http::uri::PathAndQuery>,
    body: Tee<UpstreamBody>,
) -> (Attempt, Arc<Activity>) {
    let activity = Activity::new(
        upstream.idle_timeout,
        Some(upstream.metrics.counter(UpstreamErrorKind::Idle).clone()),
    );
    let mut request = Request::from_parts(parts, Idle::new(body, activity.clone()).request_side());
    *request.uri_mut() = upstream.target(path_and_query, request.headers_mut());
    let started = Instant::now();
    let response = upstream.client.request(request);
    let result = until_timeout_after_request(response, &activity, upstream.timeout).await;
    let attempt = match result {
        Ok(Ok(response)) if framing_conflict(response.headers()) => {
            // RFC 9112 section 6.3: a response with both is a sign of response splitting, to
            // be handled as an error; hyper read it as chunked, but the `Content-Length` a
            // client would see could cut it short. The connection goes with its unread body
            // (one without a body, to HEAD or a 204/304, framed nothing wrong).
            upstream.metrics.error(UpstreamErrorKind::Protocol);
            tracing::warn!(upstream = %upstream.name, "upstream response has both Content-Length and Transfer-Encoding");
            Attempt::Failed(
                UpstreamErrorKind::Protocol,
                describe(UpstreamErrorKind::Protocol, &upstream.name),
            )
        }
        Ok(Ok(response)) => {
            upstream
                .metrics
                .duration
                .observe(started.elapsed().as_secs_f64());
            Attempt::Answered(response)
        }
        Ok(Err(_)) if activity.request_failed() => {
            tracing::debug!(upstream = %upstream.name, "the client's request body broke off");
            return (Attempt::ClientBroke, activity);
        }
        Ok(Err(error)) => {
            let kind = classify(&error);
            // The cut was logged, and not counted, by the body that noticed it.
            if kind == UpstreamErrorKind::Idle && !activity.request_ended() {
                return (Attempt::ClientIdle(upstream.idle_timeout), activity);
            }
            // An idle cut was counted by the body that noticed it.
            if kind != UpstreamErrorKind::Idle {
                upstream.metrics.error(kind);
            }
            tracing::warn!(upstream = %upstream.name, kind = kind.as_str(), error = %error_chain(&error), "upstream request failed");
            Attempt::Failed(kind, describe(kind, &upstream.name))
        }
        Err(()) => {
            upstream.metrics.error(UpstreamErrorKind::Timeout);
            tracing::warn!(upstream = %upstream.name, timeout = ?upstream.timeout, "upstream timed out before response headers");
            Attempt::Failed(
                UpstreamErrorKind::Timeout,
                format!(
                    "ficus: upstream `{}` sent no response within {:?}\n",
                    upstream.name, upstream.timeout
                ),
            )
        }
    };
    (attempt, activity)
}

/// Waits for `response` until `timeout` has passed since the request body ended (see
/// [`send`]), or since it last moved while hyper was not waiting on the client for it;
/// `Err` when it has.
async fn until_timeout_after_request<F: Future>(
    response: F,
    activity: &Activity,
    timeout: std::time::Duration,
) -> Result<F::Output, ()> {
    let deadline = |now: Instant| match activity.request_end() {
        Some(end) => end + timeout,
        // The client is the slow side (a long upload); its stalls are `idle_timeout`'s.
        None if activity.request_waiting() => now + timeout,
        // hyper is not asking for the body: still connecting (a TLS handshake that never
        // ends), or the upstream stopped reading it. Either is the upstream's slowness.
        None => activity.last_progress() + timeout,
    };
    let sleep = tokio::time::sleep_until(deadline(Instant::now()));
    tokio::pin!(response, sleep);
    loop {
        tokio::select! {
            biased;
            output = &mut response => return Ok(output),
            () = &mut sleep => {
                let now = Instant::now();
                let due = deadline(now);
                if due <= now {
                    return Err(());
                }
                sleep.as_mut().reset(due);
            }
        }
    }
}

fn framing_conflict(headers: &http::HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING) && headers.contains_key(header::CONTENT_LENGTH)
}

/// After a `101`, the two connections are joined byte for byte until either side closes.
async fn splice(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    let (client, upstream) = match tokio::join!(client, upstream) {
        (Ok(c), Ok(u)) => (c, u),
        (c, u) => {
            tracing::debug!(
                client = c.is_ok(),
                upstream = u.is_ok(),
                "upgrade did not complete"
            );
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let mut upstream = TokioIo::new(upstream);
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(error = %e, "upgraded connection ended with an error");
    }
}

fn classify(error: &PoolError) -> UpstreamErrorKind {
    let error = match error {
        PoolError::Connect(_) | PoolError::Handshake(_) => return UpstreamErrorKind::Connect,
        PoolError::Exchange(error) => error,
    };
    if error.is_parse() || error.is_parse_status() || error.is_parse_too_large() {
        return UpstreamErrorKind::Protocol;
    }
    if error.is_timeout() {
        return UpstreamErrorKind::Timeout;
    }
    let mut source = error.source();
    while let Some(e) = source {
        if e.is::<IdleTimeout>() {
            return UpstreamErrorKind::Idle;
        }
        source = e.source();
    }
    UpstreamErrorKind::Reset
}

fn describe(kind: UpstreamErrorKind, upstream: &str) -> String {
    match kind {
        UpstreamErrorKind::Connect => format!("ficus: cannot connect to upstream `{upstream}`\n"),
        UpstreamErrorKind::Reset => {
            format!(
                "ficus: upstream `{upstream}` closed the connection before a complete response\n"
            )
        }
        UpstreamErrorKind::Protocol => {
            format!("ficus: upstream `{upstream}` sent an invalid HTTP response\n")
        }
        UpstreamErrorKind::Timeout | UpstreamErrorKind::Idle => {
            format!("ficus: upstream `{upstream}` timed out\n")
        }
    }
}

pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        out.push_str(": ");
        out.push_str(&e.to_string());
        source = e.source();
    }
    out
}

/// A response made by ficus: short plain text, marked with [`FICUS_ERROR`].
pub fn proxy_error(status: StatusCode, kind: &'static str, text: String) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::full(text));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(FICUS_ERROR.clone(), HeaderValue::from_static(kind));
    response
}
