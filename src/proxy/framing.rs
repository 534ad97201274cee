//! Refuses requests whose body length is ambiguous (RFC 9112 §6.3): both `Content-Length` and
//! `Transfer-Encoding`, or several `Content-Length`s that differ. Two parsers on the path (ficus
//! and the monolith) reading such a request differently is how request smuggling works, so it
//! is answered `400` here and never forwarded; the connection is closed since where the next
//! request starts is unknown. hyper already refuses differing lengths and drops the length
//! when both are present, so the second case is seen through [`super::smuggling`], which
//! watches the raw bytes.
//!
//! Also refused with `400` (`x-ficus-error: host`), the connection kept: a `Host` that is
//! missing from an HTTP/1.1 request, repeated or invalid (RFC 9112 §3.2 says MUST).
//!
//! And `CONNECT` with `405` (`x-ficus-error: method`), the connection closed: it asks for a
//! tunnel to a host of the client's choosing, which a proxy in front of one application does
//! not open (nginx refuses it too); forwarded, its authority-form target would be lost and
//! the client would get no answer it could use.

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

/// Why a request's `Host` is refused (RFC 9112 §3.2: a server MUST answer `400` to an
/// HTTP/1.1 request without one, and to any request with several or an invalid one), or
/// `None`. An HTTP/2 request carries `:authority` instead and may have no `Host`. Two parsers
/// on the path picking different hosts is the same kind of trouble as two lengths.
pub fn bad_host(headers: &HeaderMap, version: http::Version) -> Option<&'static str> {
    let mut hosts = headers.get_all(header::HOST).iter();
    let Some(host) = hosts.next() else {
        return (version == http::Version::HTTP_11)
            .then_some("ficus: an HTTP/1.1 request needs a Host header\n");
    };
    if hosts.next().is_some() {
        return Some("ficus: request has more than one Host header\n");
    }
    // uri-host [ ":" port ]: a reg-name, an IPv4 address or an IP literal in brackets; no
    // userinfo, path or spaces. Empty is allowed (a target without an authority).
    let valid = host.as_bytes().iter().all(|&b| {
        b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'%'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
                    | b':'
                    | b'['
                    | b']'
            )
    });
    (!valid).then_some("ficus: request has an invalid Host header\n")
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
        if routed.request.method() == http::Method::CONNECT {
            tracing::debug!("refused a CONNECT request");
            let mut response = proxy_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method",
                "ficus: CONNECT is not proxied\n".into(),
            );
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return Either::Left(std::future::ready(Ok(response)));
        }
        let reason = if self.conn.ambiguous.is_set() {
            Some(BOTH)
        } else {
            ambiguous_framing(routed.request.headers())
        };
        if reason.is_none() {
            if let Some(reason) = bad_host(routed.request.headers(), routed.request.version()) {
                tracing::debug!(
                    reason = reason.trim_end(),
                    "refused request with a bad Host"
                );
                let response = proxy_error(StatusCode::BAD_REQUEST, "host", reason.into());
                return Either::Left(std::future::ready(Ok(response)));
            }
        }
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
    fn host_must_be_one_valid_field_and_is_needed_in_http_1_1() {
        use http::Version;
        let ok = |pairs: &[(&'static str, &'static str)], v| bad_host(&headers(pairs), v);
        for host in ["shop", "shop.example:8080", "10.0.0.1:80", "[::1]:8080", ""] {
            assert_eq!(ok(&[("host", host)], Version::HTTP_11), None, "{host:?}");
        }
        for host in ["a b", "user@shop", "shop/x", "shop?x"] {
            assert!(
                ok(&[("host", host)], Version::HTTP_11).is_some(),
                "{host:?}"
            );
        }
        assert!(ok(&[("host", "a"), ("host", "b")], Version::HTTP_11).is_some());
        assert!(ok(&[("host", "a"), ("host", "a")], Version::HTTP_2).is_some());
        assert!(ok(&[], Version::HTTP_11).is_some());
        assert_eq!(ok(&[], Version::HTTP_10), None);
        assert_eq!(ok(&[], Version::HTTP_2), None);
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
