//! The innermost service: sends a routed request to its upstream and turns every way that can
//! fail into a short plain-text `502`/`504` that says it came from ficus, not the monolith.

use std::convert::Infallible;
use std::error::Error as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

use super::body::{Activity, Idle, IdleTimeout, ProxyBody};
use super::events::Tee;
use super::headers;
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

async fn forward(state: &ProxyState, conn: &ConnInfo, routed: Routed) -> Response<ProxyBody> {
    let upstream = &state.upstreams[routed.target.upstream];
    let mut req = routed.request;
    let client_upgrade = req
        .headers()
        .contains_key(header::UPGRADE)
        .then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();

    let hop = headers::strip_hop_by_hop(&mut parts.headers);
    if parts.version == Version::HTTP_2 && !parts.headers.contains_key(header::HOST) {
        // HTTP/2 carries the host in `:authority`; an HTTP/1.1 upstream needs `Host`.
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
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(upstream.scheme.clone());
    uri.authority = Some(upstream.authority.clone());
    uri.path_and_query = parts.uri.path_and_query().cloned();
    parts.uri = match Uri::from_parts(uri) {
        Ok(uri) => uri,
        Err(_) => {
            return proxy_error(
                StatusCode::BAD_REQUEST,
                "bad-request",
                "ficus: request target cannot be forwarded\n".into(),
            )
        }
    };
    parts.version = Version::HTTP_11;

    let activity = Activity::new(
        upstream.idle_timeout,
        Some(upstream.metrics.counter(UpstreamErrorKind::Idle).clone()),
    );
    let body = match routed.capture {
        Some(capture) => Tee::capturing(body, capture),
        None => Tee::plain(body),
    };
    let request = Request::from_parts(parts, Idle::new(body, activity.clone()));
    let started = Instant::now();
    let result = tokio::time::timeout(upstream.timeout, upstream.client.request(request)).await;
    let mut response = match result {
        Ok(Ok(response)) => response,
        Ok(Err(error)) => {
            let kind = classify(&error);
            // An idle cut was counted by the body that noticed it.
            if kind != UpstreamErrorKind::Idle {
                upstream.metrics.error(kind);
            }
            tracing::warn!(upstream = %upstream.name, kind = kind.as_str(), error = %error_chain(&error), "upstream request failed");
            let status = if kind == UpstreamErrorKind::Idle {
                StatusCode::GATEWAY_TIMEOUT
            } else {
                StatusCode::BAD_GATEWAY
            };
            return proxy_error(status, kind.as_str(), describe(kind, &upstream.name));
        }
        Err(_elapsed) => {
            upstream.metrics.error(UpstreamErrorKind::Timeout);
            tracing::warn!(upstream = %upstream.name, timeout = ?upstream.timeout, "upstream timed out before response headers");
            return proxy_error(
                StatusCode::GATEWAY_TIMEOUT,
                UpstreamErrorKind::Timeout.as_str(),
                format!(
                    "ficus: upstream `{}` sent no response within {:?}\n",
                    upstream.name, upstream.timeout
                ),
            );
        }
    };
    upstream
        .metrics
        .duration
        .observe(started.elapsed().as_secs_f64());

    let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
    if switching {
        match client_upgrade {
            Some(client) if hop.upgrade => {
                let upstream_upgrade = hyper::upgrade::on(&mut response);
                tokio::spawn(splice(client, upstream_upgrade));
            }
            _ => {
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
    Response::from_parts(
        parts,
        ProxyBody::Upstream {
            body: Idle::new(body, activity),
        },
    )
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

fn classify(error: &hyper_util::client::legacy::Error) -> UpstreamErrorKind {
    if error.is_connect() {
        return UpstreamErrorKind::Connect;
    }
    let mut source = error.source();
    while let Some(e) = source {
        if e.is::<IdleTimeout>() {
            return UpstreamErrorKind::Idle;
        }
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            if h.is_parse() || h.is_parse_status() || h.is_parse_too_large() {
                return UpstreamErrorKind::Protocol;
            }
            if h.is_timeout() {
                return UpstreamErrorKind::Timeout;
            }
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

fn error_chain(error: &dyn std::error::Error) -> String {
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
