//! Refuses requests whose body length is ambiguous (RFC 9112 §6.3): both `Content-Length` and
//! `Transfer-Encoding`, or several `Content-Length`s that differ. Two parsers on the path (ficus
//! and the monolith) reading such a request differently is how request smuggling works, so it
//! is answered `400` here and never forwarded; the connection is closed since where the next
//! request starts is unknown. hyper already refuses differing lengths and drops the length
//! when both are present, so the second case is seen through [`super::smuggling`], which
//! watches the raw bytes.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::Either;
use http::header::{self, HeaderValue};
use http::{HeaderMap, Response, StatusCode};

use super::body::ProxyBody;
use super::forward::proxy_error;
use super::{ConnInfo, Routed};

#[derive(Clone)]
pub struct Framing<S> {
    inner: S,
    conn: Arc<ConnInfo>,
}

impl<S> Framing<S> {
    pub fn new(inner: S, conn: Arc<ConnInfo>) -> Self {
        Framing { inner, conn }
    }
}

const BOTH: &str = "ficus: request has both Content-Length and Transfer-Encoding\n";

/// Why a request's framing is refused, or `None` when it is unambiguous.
pub fn ambiguous_framing(headers: &HeaderMap) -> Option<&'static str> {
    let mut lengths = headers.get_all(header::CONTENT_LENGTH).iter();
    let first = lengths.next()?;
    if headers.contains_key(header::TRANSFER_ENCODING) {
        return Some(BOTH);
    }
    let first = first.as_bytes();
    let conflicting = lengths.any(|v| v.as_bytes() != first) || !all_same(first);
    conflicting.then_some("ficus: request has conflicting Content-Length values\n")
}

/// `Content-Length: 5, 5` is one length; `5, 6` is not.
fn all_same(list: &[u8]) -> bool {
    let mut parts = list.split(|b| *b == b',').map(|p| p.trim_ascii());
    let Some(first) = parts.next() else {
        return true;
    };
    parts.all(|p| p == first)
}

impl<S> tower::Service<Routed> for Framing<S>
where
    S: tower::Service<Routed, Response = Response<ProxyBody>, Error = Infallible>,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Either<std::future::Ready<Result<Response<ProxyBody>, Infallible>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, routed: Routed) -> Self::Future {
        let reason = if self.conn.ambiguous.is_set() {
            Some(BOTH)
        } else {
            ambiguous_framing(routed.request.headers())
        };
        match reason {
            None => Either::Right(self.inner.call(routed)),
            Some(reason) => {
                tracing::debug!(
                    reason = reason.trim_end(),
                    "refused request with ambiguous framing"
                );
                let mut response = proxy_error(StatusCode::BAD_REQUEST, "framing", reason.into());
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                Either::Left(std::future::ready(Ok(response)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn detects_ambiguous_lengths() {
        assert!(ambiguous_framing(&headers(&[])).is_none());
        assert!(ambiguous_framing(&headers(&[("content-length", "5")])).is_none());
        assert!(ambiguous_framing(&headers(&[
            ("content-length", "5"),
            ("content-length", "5")
        ]))
        .is_none());
        assert!(ambiguous_framing(&headers(&[("content-length", "5, 5")])).is_none());
        assert!(ambiguous_framing(&headers(&[("transfer-encoding", "chunked")])).is_none());
        assert!(ambiguous_framing(&headers(&[
            ("content-length", "5"),
            ("content-length", "6")
        ]))
        .is_some());
        assert!(ambiguous_framing(&headers(&[("content-length", "5, 6")])).is_some());
        assert!(ambiguous_framing(&headers(&[
            ("content-length", "5"),
            ("transfer-encoding", "chunked")
        ]))
        .is_some());
    }
}
