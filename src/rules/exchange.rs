//! The finished HTTP exchange that rules are evaluated on, and its captured bodies.

use std::fmt;
use std::sync::OnceLock;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method};
use serde_json::Value;

/// One request and its response, as the proxy saw them: the head in full (minus the sensitive
/// headers no rule names, see [`super::Needs`]) and the first `limits.capture_body` bytes of
/// each body.
#[derive(Clone)]
pub struct Exchange {
    pub method: Method,
    /// The request path without its query string, as sent (not percent-decoded).
    pub path: String,
    /// The raw query string, without the `?`.
    pub query: Option<String>,
    pub request_headers: HeaderMap,
    pub request_body: Captured,
    pub status: u16,
    pub response_headers: HeaderMap,
    pub response_body: Captured,
}

impl Exchange {
    /// An exchange with empty heads and bodies: a starting point for tests and samples.
    pub fn new(method: Method, path_and_query: &str, status: u16) -> Exchange {
        let (path, query) = match path_and_query.split_once('?') {
            Some((p, q)) => (p.to_string(), Some(q.to_string())),
            None => (path_and_query.to_string(), None),
        };
        Exchange {
            method,
            path,
            query,
            request_headers: HeaderMap::new(),
            request_body: Captured::empty(),
            status,
            response_headers: HeaderMap::new(),
            response_body: Captured::empty(),
        }
    }

    /// The first value of query parameter `name`, decoded as a form would be (`+` is a space).
    /// A name given several times keeps its first value, as most web frameworks do.
    pub fn query_param(&self, name: &str) -> Option<String> {
        query_pairs(self.query.as_deref()?)
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }
}

/// The decoded `name=value` pairs of a query string, in order; `name` alone has an empty value.
pub(crate) fn query_pairs(query: &str) -> impl Iterator<Item = (String, String)> + '_ {
    query.split('&').filter(|p| !p.is_empty()).map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (form_decode(k), form_decode(v))
    })
}

fn form_decode(s: &str) -> String {
    let plus = s.replace('+', " ");
    percent_encoding::percent_decode_str(&plus)
        .decode_utf8_lossy()
        .into_owned()
}

/// All values of a header joined with `", "` (the list form RFC 9110 allows for repeated
/// fields), bytes that are not UTF-8 replaced; `None` when absent.
pub(crate) fn header_text(headers: &HeaderMap, name: &http::HeaderName) -> Option<String> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    let mut text = String::from_utf8_lossy(first.as_bytes()).into_owned();
    for v in values {
        text.push_str(", ");
        text.push_str(&String::from_utf8_lossy(v.as_bytes()));
    }
    Some(text)
}

// Header values stay out of Debug: an exchange in a log line must not leak a token that a rule
// named, nor a body field that redaction removed.
impl fmt::Debug for Exchange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Exchange")
            .field("method", &self.method)
            .field("path", &self.path)
            .field("query", &self.query.is_some())
            .field(
                "request_headers",
                &self.request_headers.keys().collect::<Vec<_>>(),
            )
            .field("request_body", &self.request_body)
            .field("status", &self.status)
            .field(
                "response_headers",
                &self.response_headers.keys().collect::<Vec<_>>(),
            )
            .field("response_body", &self.response_body)
            .finish()
    }
}

/// The captured prefix of a body, parsed on first use (most exchanges reach no rule that reads
/// their bodies, so the parse cost is paid only when one does, and only once for all rules).
#[derive(Clone)]
pub struct Captured {
    bytes: Bytes,
    json: bool,
    truncated: bool,
    parsed: OnceLock<Parsed>,
}

#[derive(Clone, Debug)]
struct Parsed {
    value: Value,
    /// The value is the body's text, not a JSON document (see [`Captured::is_text`]).
    text: bool,
}

impl Captured {
    /// `content_type` decides the parse: JSON for `application/json` and `application/*+json`,
    /// text otherwise. `truncated` says the body was longer than what was kept.
    pub fn new(bytes: Bytes, content_type: Option<&HeaderValue>, truncated: bool) -> Self {
        Captured {
            bytes,
            json: content_type.is_some_and(is_json),
            truncated,
            parsed: OnceLock::new(),
        }
    }

    pub fn empty() -> Self {
        Captured::new(Bytes::new(), None, false)
    }

    /// A body already parsed, e.g. from a recorded sample; `is_json` as the content type said.
    pub fn from_value(value: Value, is_json: bool, truncated: bool) -> Self {
        let text = !is_json && value.is_string();
        Captured {
            bytes: Bytes::new(),
            json: is_json,
            truncated,
            parsed: OnceLock::from(Parsed { value, text }),
        }
    }

    /// The body as rules see it: `null` when empty; the JSON value when the content type says
    /// JSON and it parses; `null` when it says JSON but was truncated and no longer parses;
    /// otherwise the text (invalid UTF-8 replaced), which is also what a complete but malformed
    /// JSON body gives, so that its bytes still reach the event.
    pub fn value(&self) -> &Value {
        &self.parsed().value
    }

    /// Whether [`value`](Self::value) is the body's text rather than a JSON document: the
    /// content type did not say JSON, or the body did not parse. An event whose data is this
    /// text is `text/plain`.
    pub fn is_text(&self) -> bool {
        self.parsed().text
    }

    fn parsed(&self) -> &Parsed {
        self.parsed
            .get_or_init(|| parse(&self.bytes, self.json, self.truncated))
    }

    /// Takes the parsed value out, for redaction to edit and [`Captured::set_value`] to put back.
    pub(crate) fn take_value(&mut self) -> Value {
        // Parse first, so that the text-or-JSON flag stays behind for `set_value`.
        self.parsed();
        match self.parsed.get_mut() {
            Some(p) => std::mem::take(&mut p.value),
            None => Value::Null,
        }
    }

    /// Replaces the parsed value. The raw bytes are dropped: from now on the (edited) value is
    /// the only copy, so nothing can reach a redacted field through the bytes.
    pub fn set_value(&mut self, value: Value) {
        let text = self.is_text() && value.is_string();
        self.bytes = Bytes::new();
        self.parsed = OnceLock::from(Parsed { value, text });
    }

    pub fn is_truncated(&self) -> bool {
        self.truncated
    }

    /// Whether the content type said JSON.
    pub fn is_json(&self) -> bool {
        self.json
    }
}

fn parse(bytes: &[u8], json: bool, truncated: bool) -> Parsed {
    let doc = |value| Parsed { value, text: false };
    if bytes.is_empty() {
        return doc(Value::Null);
    }
    if json {
        match serde_json::from_slice(bytes) {
            Ok(v) => return doc(v),
            // A cut JSON document is not the monolith's data: reading it as text would hand
            // rules and consumers half a document that looks like a string value.
            Err(_) if truncated => return doc(Value::Null),
            Err(_) => {}
        }
    }
    Parsed {
        value: Value::String(String::from_utf8_lossy(bytes).into_owned()),
        text: true,
    }
}

/// `application/json`, `application/problem+json` and the like, parameters ignored.
pub(crate) fn is_json(content_type: &HeaderValue) -> bool {
    let Ok(s) = content_type.to_str() else {
        return false;
    };
    let essence = s.split(';').next().unwrap_or("").trim();
    let Some((ty, subtype)) = essence.split_once('/') else {
        return false;
    };
    ty.eq_ignore_ascii_case("application")
        && (subtype.eq_ignore_ascii_case("json")
            || (subtype.len() > 5
                && subtype
                    .get(subtype.len() - 5..)
                    .is_some_and(|s| s.eq_ignore_ascii_case("+json"))))
}

impl fmt::Debug for Captured {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Captured")
            .field("bytes", &self.bytes.len())
            .field("json", &self.json)
            .field("truncated", &self.truncated)
            .field("parsed", &self.parsed.get().is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ct(s: &'static str) -> HeaderValue {
        HeaderValue::from_static(s)
    }

    #[test]
    fn json_content_types() {
        for s in [
            "application/json",
            "application/json; charset=utf-8",
            "Application/JSON",
            "application/problem+json",
            "application/vnd.shop.order+json;v=2",
        ] {
            assert!(is_json(&ct(s)), "{s}");
        }
        for s in [
            "text/plain",
            "text/json",
            "application/jsonx",
            "application/+json",
            "json",
        ] {
            assert!(!is_json(&ct(s)), "{s}");
        }
    }

    #[test]
    fn body_values() {
        let j = ct("application/json");
        assert_eq!(Captured::empty().value(), &Value::Null);
        assert_eq!(
            Captured::new(Bytes::from_static(b"{\"id\":7}"), Some(&j), false).value(),
            &json!({"id": 7})
        );
        // Not JSON by content type: the text, even if it looks like JSON.
        assert_eq!(
            Captured::new(
                Bytes::from_static(b"{\"id\":7}"),
                Some(&ct("text/plain")),
                false
            )
            .value(),
            &json!("{\"id\":7}")
        );
        assert_eq!(
            Captured::new(Bytes::from_static(b"id=7"), None, false).value(),
            &json!("id=7")
        );
        // Invalid UTF-8 is replaced, not an error.
        assert_eq!(
            Captured::new(Bytes::from_static(b"a\xffb"), None, false).value(),
            &json!("a\u{fffd}b")
        );
        // Complete but malformed JSON: the text.
        assert_eq!(
            Captured::new(Bytes::from_static(b"{oops"), Some(&j), false).value(),
            &json!("{oops")
        );
        // Truncated JSON that no longer parses: missing.
        let cut = Captured::new(Bytes::from_static(b"{\"id\":7,\"na"), Some(&j), true);
        assert_eq!(cut.value(), &Value::Null);
        assert!(cut.is_truncated());
        // Truncated text: the prefix.
        assert_eq!(
            Captured::new(Bytes::from_static(b"hello wo"), None, true).value(),
            &json!("hello wo")
        );
    }

    #[test]
    fn set_value_replaces_the_parse() {
        let j = ct("application/json");
        let mut c = Captured::new(Bytes::from_static(b"{\"a\":1}"), Some(&j), false);
        c.set_value(json!({"b": 2}));
        assert_eq!(c.value(), &json!({"b": 2}));
        assert!(c.is_json());
    }

    #[test]
    fn query_params_decode_and_first_wins() {
        let ex = Exchange::new(Method::GET, "/s?q=a+b%21&x&q=second&e%20n=1", 200);
        assert_eq!(ex.path, "/s");
        assert_eq!(ex.query_param("q").as_deref(), Some("a b!"));
        assert_eq!(ex.query_param("x").as_deref(), Some(""));
        assert_eq!(ex.query_param("e n").as_deref(), Some("1"));
        assert_eq!(ex.query_param("missing"), None);
        assert_eq!(Exchange::new(Method::GET, "/s", 200).query_param("q"), None);
    }

    #[test]
    fn repeated_headers_are_joined() {
        let mut h = HeaderMap::new();
        h.append("x-a", ct("1"));
        h.append("x-a", ct("2"));
        let name = http::HeaderName::from_static("x-a");
        assert_eq!(header_text(&h, &name).as_deref(), Some("1, 2"));
        assert_eq!(header_text(&h, &http::header::ACCEPT), None);
    }

    #[test]
    fn debug_shows_no_header_values() {
        let mut ex = Exchange::new(Method::POST, "/login", 200);
        ex.request_headers
            .insert(http::header::AUTHORIZATION, ct("Bearer secret-token"));
        let text = format!("{ex:?}");
        assert!(text.contains("authorization"), "{text}");
        assert!(!text.contains("secret-token"), "{text}");
    }
}
