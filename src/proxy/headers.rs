//! Header rewriting between client and upstream, as RFC 9110 §7.6 and RFC 9112 ask of a proxy:
//! hop-by-hop fields (and those the `Connection` field names) stop here, `X-Forwarded-*` and
//! `Via` are added. Everything else passes byte for byte.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Fields that describe one connection, not the message (RFC 9110 §7.6.1), plus the legacy
/// `Proxy-Connection`. `Trailer` is end-to-end and stays.
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

pub static VIA: HeaderValue = HeaderValue::from_static("1.1 ficus");
static PROTO_HTTP: HeaderValue = HeaderValue::from_static("http");
static PROTO_HTTPS: HeaderValue = HeaderValue::from_static("https");
static TE_TRAILERS: HeaderValue = HeaderValue::from_static("trailers");
static CONNECTION_UPGRADE: HeaderValue = HeaderValue::from_static("upgrade");
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// What the client's headers ask for beyond the hop: kept across the removal.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HopInfo {
    /// `Connection: upgrade` with an `Upgrade` field: a WebSocket or similar handshake.
    pub upgrade: bool,
    /// `TE: trailers`: the client accepts trailer fields, so the upstream may send them.
    pub trailers: bool,
}

/// Removes hop-by-hop fields and those named in `Connection`; returns what they asked for.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) -> HopInfo {
    let mut info = HopInfo::default();
    // Most messages carry no hop-by-hop field at all (HTTP/1.1 keep-alive is the default;
    // HTTP/2 forbids them): one pass over the names, comparing without hashing, is cheaper
    // than looking each of them up, on the request and on the response.
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return info;
    }
    if headers.contains_key(header::CONNECTION) {
        let mut named: Vec<HeaderName> = Vec::new();
        for value in headers.get_all(header::CONNECTION) {
            for token in value.to_str().unwrap_or("").split(',') {
                let token = token.trim();
                if token.eq_ignore_ascii_case("upgrade") {
                    info.upgrade = true;
                } else if token.eq_ignore_ascii_case("close")
                    || token.eq_ignore_ascii_case("keep-alive")
                {
                    // Connection options, not field names.
                } else if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                    // `Host` is kept whatever `Connection` says (SPEC section 3): without it
                    // the upstream would see ficus's own idea of the host, or none.
                    if name != header::HOST {
                        named.push(name);
                    }
                }
            }
        }
        info.upgrade &= headers.contains_key(header::UPGRADE);
        for name in named {
            headers.remove(name);
        }
    }
    if let Some(te) = headers.get(header::TE) {
        info.trailers = te
            .to_str()
            .unwrap_or("")
            .split(',')
            .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
    }
    let upgrade = if info.upgrade {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    };
    for name in &HOP_BY_HOP {
        if headers.contains_key(name) {
            headers.remove(name);
        }
    }
    if let Some(upgrade) = upgrade {
        headers.insert(header::UPGRADE, upgrade);
        headers.insert(header::CONNECTION, CONNECTION_UPGRADE.clone());
    }
    if info.trailers {
        headers.insert(header::TE, TE_TRAILERS.clone());
    }
    info
}

/// Like [`strip_hop_by_hop`] for a response; a `101 Switching Protocols` keeps its
/// `Upgrade`/`Connection: upgrade`, which the client needs to finish the handshake.
pub fn strip_response_hop_by_hop(headers: &mut HeaderMap, switching: bool) {
    let info = strip_hop_by_hop(headers);
    if !switching && info.upgrade {
        headers.remove(header::UPGRADE);
        headers.remove(header::CONNECTION);
    }
    if info.trailers {
        headers.remove(header::TE);
    }
}

/// Sets the forwarding fields on a request going upstream.
///
/// `client_ip` is the peer's address, formatted once per connection. With `trust` the ingress's
/// `X-Forwarded-Proto`/`-Host` are kept and `X-Forwarded-For` is appended to; without, all
/// three describe only the hop into ficus.
pub fn add_forwarding(headers: &mut HeaderMap, client_ip: &HeaderValue, tls: bool, trust: bool) {
    append_list(headers, &X_FORWARDED_FOR, client_ip, trust);
    if !trust || !headers.contains_key(&X_FORWARDED_PROTO) {
        let proto = if tls { &PROTO_HTTPS } else { &PROTO_HTTP };
        headers.insert(X_FORWARDED_PROTO.clone(), proto.clone());
    }
    if !trust || !headers.contains_key(&X_FORWARDED_HOST) {
        match headers.get(header::HOST).cloned() {
            Some(host) => {
                headers.insert(X_FORWARDED_HOST.clone(), host);
            }
            None => {
                headers.remove(&X_FORWARDED_HOST);
            }
        }
    }
    append_list(headers, &header::VIA, &VIA, true);
}

/// Joins the `cookie` fields of an HTTP/2 request into one, with `"; "`, as it must be before
/// it goes out over HTTP/1.1 (RFC 9113 section 8.2.3): HTTP/2 clients send each cookie in a
/// field of its own, and many HTTP/1.1 servers read only the first `cookie` line.
pub fn join_cookies(headers: &mut HeaderMap) {
    let mut fields = headers.get_all(header::COOKIE).iter();
    if fields.next().is_none() || fields.next().is_none() {
        return;
    }
    let mut joined: Vec<u8> = Vec::with_capacity(128);
    for v in headers.get_all(header::COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(v.as_bytes());
    }
    // The parts were valid field values, and so is their join.
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, v);
    }
}

/// Appends `value` to a comma-separated list field, folding repeated fields into one so that
/// the order of hops is kept; without `keep`, replaces the field.
fn append_list(headers: &mut HeaderMap, name: &HeaderName, value: &HeaderValue, keep: bool) {
    if keep && headers.contains_key(name) {
        let mut joined: Vec<u8> = Vec::with_capacity(64);
        for v in headers.get_all(name) {
            if !joined.is_empty() {
                joined.extend_from_slice(b", ");
            }
            joined.extend_from_slice(v.as_bytes());
        }
        joined.extend_from_slice(b", ");
        joined.extend_from_slice(value.as_bytes());
        if let Ok(v) = HeaderValue::from_bytes(&joined) {
            headers.insert(name.clone(), v);
            return;
        }
    }
    headers.insert(name.clone(), value.clone());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    #[test]
    fn cookie_fields_are_joined_with_semicolons_and_a_single_one_is_left_alone() {
        let mut h = map(&[("cookie", "a=1"), ("x-other", "o"), ("cookie", "b=2; c=3")]);
        join_cookies(&mut h);
        let cookies: Vec<&[u8]> = h.get_all("cookie").iter().map(|v| v.as_bytes()).collect();
        assert_eq!(cookies, [b"a=1; b=2; c=3".as_slice()]);
        assert_eq!(h.get("x-other").expect("kept"), "o");
        let mut one = map(&[("cookie", "a=1, b")]);
        join_cookies(&mut one);
        assert_eq!(one.get_all("cookie").iter().count(), 1);
        assert_eq!(one.get("cookie").expect("kept"), "a=1, b");
    }

    #[test]
    fn removes_hop_by_hop_and_connection_named_fields() {
        let mut h = map(&[
            ("connection", "close, x-secret-hop"),
            ("x-secret-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("te", "gzip"),
            ("trailer", "x-checksum"),
            ("x-end-to-end", "kept"),
        ]);
        let info = strip_hop_by_hop(&mut h);
        assert_eq!(info, HopInfo::default());
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["trailer", "x-end-to-end"]);
    }

    /// Each hop-by-hop field alone among end-to-end ones, in any case: the pass that looks
    /// for one before any lookup must find it.
    #[test]
    fn removes_each_hop_by_hop_field_on_its_own() {
        for name in [
            "Connection",
            "keep-alive",
            "Proxy-Connection",
            "te",
            "Transfer-Encoding",
            "upgrade",
        ] {
            let mut h = map(&[("host", "a"), (name, "x"), ("x-proxy-connection", "kept")]);
            strip_hop_by_hop(&mut h);
            let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
            assert_eq!(names, ["host", "x-proxy-connection"], "{name}");
        }
    }

    /// SPEC section 3 keeps `Host`; a client naming it in `Connection` cannot take it away.
    #[test]
    fn a_host_named_in_connection_is_kept() {
        let mut h = map(&[
            ("host", "shop.example"),
            ("connection", "Host, x-hop"),
            ("x-hop", "1"),
        ]);
        strip_hop_by_hop(&mut h);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["host"]);
        assert_eq!(h["host"], "shop.example");
    }

    #[test]
    fn keeps_upgrade_handshake_and_trailers_acceptance() {
        let mut h = map(&[
            ("connection", "Upgrade, keep-alive"),
            ("upgrade", "websocket"),
            ("te", "trailers, deflate"),
        ]);
        let info = strip_hop_by_hop(&mut h);
        assert!(info.upgrade && info.trailers);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["te"], "trailers");
    }

    #[test]
    fn upgrade_without_connection_token_is_dropped() {
        let mut h = map(&[("upgrade", "websocket")]);
        assert!(!strip_hop_by_hop(&mut h).upgrade);
        assert!(h.is_empty());
    }

    #[test]
    fn forwarding_fields_trusted() {
        let ip = HeaderValue::from_static("10.1.1.1");
        let mut h = map(&[
            ("host", "shop.example"),
            ("x-forwarded-for", "203.0.113.9"),
            ("x-forwarded-for", "198.51.100.2"),
            ("x-forwarded-proto", "https"),
            ("via", "1.1 ingress"),
        ]);
        add_forwarding(&mut h, &ip, false, true);
        assert_eq!(h["x-forwarded-for"], "203.0.113.9, 198.51.100.2, 10.1.1.1");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "shop.example");
        assert_eq!(h["via"], "1.1 ingress, 1.1 ficus");
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
    }

    #[test]
    fn forwarding_fields_untrusted_are_replaced() {
        let ip = HeaderValue::from_static("::1");
        let mut h = map(&[
            ("host", "a:8080"),
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "evil"),
        ]);
        add_forwarding(&mut h, &ip, true, false);
        assert_eq!(h["x-forwarded-for"], "::1");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "a:8080");
        assert_eq!(h["via"], "1.1 ficus");
    }
}
