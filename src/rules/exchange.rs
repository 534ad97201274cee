//! The finished HTTP exchange that rules are evaluated on, and its captured bodies.

use std::borrow::Cow;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method};
use serde_json::Value;

use super::template::{descend, Step};

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
/// The first placeholder into a JSON body not parsed yet reads just its value (see
/// [`Captured::lookup`]); a second one parses the whole body, once, for all that follow.
pub struct Captured {
    bytes: Bytes,
    json: bool,
    truncated: bool,
    parsed: OnceLock<Parsed>,
    /// A lookup read its value without parsing the whole body.
    looked_up: AtomicBool,
}

impl Clone for Captured {
    fn clone(&self) -> Self {
        Captured {
            bytes: self.bytes.clone(),
            json: self.json,
            truncated: self.truncated,
            parsed: self.parsed.clone(),
            looked_up: AtomicBool::new(self.looked_up.load(Ordering::Relaxed)),
        }
    }
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
            looked_up: AtomicBool::new(false),
        }
    }

    pub fn empty() -> Self {
        Captured::new(Bytes::new(), None, false)
    }

    /// [`new`](Self::new) for a body sent with a `Content-Encoding`: rules read what the
    /// application wrote, not its compressed bytes (a monolith answers gzip to every client
    /// that accepts it). The forwarded bytes are never touched; only this copy is decoded, to
    /// at most `limit` bytes (`limits.capture_body`, so a small body that inflates a
    /// thousandfold cannot take the memory), and a captured prefix of a longer body decodes
    /// to a prefix, marked truncated like any other. An encoding ficus cannot decode (`br`,
    /// `zstd`, several at once) or a corrupt body reads as an empty, truncated body: its
    /// events say their data is missing rather than carry binary noise.
    pub fn decoding(
        bytes: Bytes,
        content_type: Option<&HeaderValue>,
        content_encoding: Option<&HeaderValue>,
        truncated: bool,
        limit: usize,
    ) -> Self {
        // An empty body (a `204` sent with its encoding's header) has nothing to decode.
        let Some(encoding) = content_encoding
            .filter(|e| !bytes.is_empty() && !e.as_bytes().eq_ignore_ascii_case(b"identity"))
        else {
            return Captured::new(bytes, content_type, truncated);
        };
        match decode(&bytes, encoding, limit) {
            Some((decoded, cut)) => Captured::new(decoded, content_type, truncated || cut),
            None => Captured::new(Bytes::new(), content_type, true),
        }
    }

    /// A body already parsed, e.g. from a recorded sample; `is_json` as the content type said.
    pub fn from_value(value: Value, is_json: bool, truncated: bool) -> Self {
        let text = !is_json && value.is_string();
        Captured {
            bytes: Bytes::new(),
            json: is_json,
            truncated,
            parsed: OnceLock::from(Parsed { value, text }),
            looked_up: AtomicBool::new(false),
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

    /// The value at `steps` (`.field`, `[index]`) in [`value`](Self::value), `null` when
    /// absent. When the body is JSON and not parsed yet, the first lookup reads only that
    /// value: the rest of the document is checked as [`value`](Self::value) would parse it
    /// (syntax, string encoding, number range, nesting, trailing bytes), so the answer is the
    /// same, but none of it is built (see [`super::scan`]). A 300-byte body of a dozen small
    /// objects costs a few dozen allocations to build, which was most of a rule's evaluation.
    /// A body the quick read refuses is one the full parse refuses too: it is settled as text
    /// (or `null` when truncated) without parsing it again.
    pub(crate) fn lookup(&self, steps: &[Step]) -> Cow<'_, Value> {
        if self.parsed.get().is_none()
            && self.json
            && !steps.is_empty()
            && !self.bytes.is_empty()
            && !self.looked_up.swap(true, Ordering::Relaxed)
        {
            match super::scan::find(&self.bytes, steps) {
                Ok(v) => return Cow::Owned(v),
                Err(super::scan::Refused) => {
                    let _ = self.parsed.set(not_json(&self.bytes, self.truncated));
                }
            }
        }
        descend(self.value(), steps)
    }

    /// The body's bytes when they are a JSON document exactly as serde_json writes the value
    /// they parse to (compact, keys in order, integers only; see [`super::scan::canonical`]),
    /// so that an event can carry them as its data without building the value. `None` for
    /// anything else, and once the value was replaced ([`Captured::set_value`], redaction).
    pub(crate) fn canonical_json(&self) -> Option<Bytes> {
        (self.json && !self.bytes.is_empty() && super::scan::canonical(&self.bytes))
            .then(|| self.bytes.clone())
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
        if let Ok(v) = serde_json::from_slice(bytes) {
            return doc(v);
        }
    }
    not_json(bytes, truncated && json)
}

/// What a body that is not a JSON document reads as: its text; but a JSON body that does not
/// parse because it was cut (`truncated`) is `null`, since reading it as text would hand rules
/// and consumers half a document that looks like a string value.
fn not_json(bytes: &[u8], truncated: bool) -> Parsed {
    if truncated {
        return Parsed {
            value: Value::Null,
            text: false,
        };
    }
    Parsed {
        value: Value::String(String::from_utf8_lossy(bytes).into_owned()),
        text: true,
    }
}

/// `application/json`, `application/problem+json` and the like, parameters ignored.
pub(crate) fn is_json(content_type: &HeaderValue) -> bool {
    // On the bytes, for two reasons: each exchange asks twice, and `str`'s pattern searches
    // and Unicode trimming cost several hundred instructions a time. The same answers as the
    // `str` version in the tests.
    let b = content_type.as_bytes();
    // `application/json` alone, in any case, as one 16-byte word: the usual answer in a few
    // instructions. Setting bit 5 of a letter lower-cases it, and only a letter's upper case
    // has the same lower case; the `/` is compared as it is.
    const LOWER: u128 =
        u128::from_le_bytes(*b"\x20\x20\x20\x20\x20\x20\x20\x20\x20\x20\x20\x00\x20\x20\x20\x20");
    if let Ok(word) = <[u8; 16]>::try_from(b) {
        if u128::from_le_bytes(word) | LOWER == u128::from_le_bytes(*b"application/json") {
            return true;
        }
    }
    // What `HeaderValue::to_str` accepts: visible ASCII, spaces and tabs (so that trimming
    // ASCII whitespace is all the trimming there is).
    if !b.iter().all(|&c| c == b'\t' || (0x20..0x7f).contains(&c)) {
        return false;
    }
    let end = b.iter().position(|&c| c == b';').unwrap_or(b.len());
    let Some(essence) = b.get(..end).map(<[u8]>::trim_ascii) else {
        return false;
    };
    let Some(slash) = essence.iter().position(|&c| c == b'/') else {
        return false;
    };
    let (ty, subtype) = (&essence[..slash], &essence[slash + 1..]);
    ty.eq_ignore_ascii_case(b"application")
        && (subtype.eq_ignore_ascii_case(b"json")
            || (subtype.len() > 5
                && subtype
                    .get(subtype.len() - 5..)
                    .is_some_and(|s| s.eq_ignore_ascii_case(b"+json"))))
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

/// `bytes` decoded by `encoding`, at most `limit` bytes of it; `true` when that cut it (or it
/// ended early: a captured prefix). `None` when the encoding is not one ficus decodes, or the
/// bytes do not decode at all.
fn decode(bytes: &[u8], encoding: &HeaderValue, limit: usize) -> Option<(Bytes, bool)> {
    use std::io::Read;
    let encoding = encoding.to_str().ok()?.trim();
    let read = |reader: &mut dyn Read| -> Option<(Bytes, bool)> {
        let mut out = Vec::new();
        let mut limited = reader.take(limit as u64 + 1);
        // Bytes read before an error are kept: a captured prefix ends in an early EOF.
        let complete = limited.read_to_end(&mut out).is_ok();
        if !complete && out.is_empty() {
            return None;
        }
        let cut = out.len() > limit;
        out.truncate(limit);
        Some((Bytes::from(out), cut || !complete))
    };
    if encoding.eq_ignore_ascii_case("gzip") || encoding.eq_ignore_ascii_case("x-gzip") {
        return read(&mut flate2::read::MultiGzDecoder::new(bytes));
    }
    if encoding.eq_ignore_ascii_case("deflate") {
        // RFC 9110 section 8.4.1.2 says zlib; some servers send raw deflate, which a zlib
        // header check refuses at once.
        return read(&mut flate2::read::ZlibDecoder::new(bytes))
            .or_else(|| read(&mut flate2::read::DeflateDecoder::new(bytes)));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn gzip(data: &[u8]) -> Bytes {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).expect("gzip");
        Bytes::from(e.finish().expect("gzip"))
    }

    fn decoded(bytes: Bytes, encoding: &'static str, limit: usize) -> Captured {
        let j = HeaderValue::from_static("application/json");
        Captured::decoding(
            bytes,
            Some(&j),
            Some(&HeaderValue::from_static(encoding)),
            false,
            limit,
        )
    }

    #[test]
    fn an_encoded_body_is_read_as_the_application_wrote_it() {
        let body = br#"{"id":"gz-1","total":5}"#;
        for encoding in ["gzip", "x-gzip", "GZIP"] {
            let c = decoded(gzip(body), encoding, 1024);
            assert_eq!(c.value(), &json!({"id": "gz-1", "total": 5}), "{encoding}");
            assert!(!c.truncated);
        }
        let zlib = {
            use std::io::Write;
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(body).expect("zlib");
            Bytes::from(e.finish().expect("zlib"))
        };
        let raw = {
            use std::io::Write;
            let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(body).expect("deflate");
            Bytes::from(e.finish().expect("deflate"))
        };
        for (name, bytes) in [("zlib", zlib), ("raw deflate", raw)] {
            let c = decoded(bytes, "deflate", 1024);
            assert_eq!(c.value()["id"], "gz-1", "{name}");
        }
        let plain = decoded(Bytes::from_static(body), "identity", 1024);
        assert_eq!(plain.value()["total"], 5);
        let empty = decoded(Bytes::new(), "gzip", 1024);
        assert_eq!(empty.value(), &Value::Null);
        assert!(!empty.truncated, "an empty body is whole");
    }

    /// A captured prefix decodes to a prefix; a body that inflates past the limit is cut at
    /// it; both are marked truncated.
    #[test]
    fn a_decoded_body_is_cut_at_the_capture_limit_and_marked_truncated() {
        let text = "word ".repeat(10_000);
        let whole = gzip(text.as_bytes());
        let prefix = decoded(whole.slice(..whole.len() / 2), "gzip", 1 << 20);
        assert!(prefix.truncated);
        assert!(!prefix.bytes.is_empty() && text.as_bytes().starts_with(&prefix.bytes));
        let bomb = decoded(gzip(&vec![b'0'; 1 << 20]), "gzip", 4096);
        assert!(bomb.truncated);
        assert_eq!(bomb.bytes.len(), 4096, "no more than the limit is inflated");
    }

    /// An encoding ficus does not decode, or bytes that are not what it says, read as a
    /// missing body rather than as binary noise.
    #[test]
    fn an_undecodable_body_reads_as_empty_and_truncated() {
        for (bytes, encoding) in [
            (gzip(b"{}"), "br"),
            (gzip(b"{}"), "gzip, br"),
            (Bytes::from_static(b"{\"id\":1}"), "gzip"),
        ] {
            let c = decoded(bytes, encoding, 1024);
            assert_eq!(c.value(), &Value::Null, "{encoding}");
            assert!(c.truncated, "{encoding}");
        }
    }

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

    /// [`is_json`] as it was written on `str`: the reference for the byte version.
    fn is_json_str(content_type: &HeaderValue) -> bool {
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

    proptest::proptest! {
        #[test]
        fn json_content_types_as_the_str_version_reads_them(
            parts in proptest::collection::vec(proptest::sample::select(vec![
                &b"application"[..], b"APPLICATION", b"json", b"JSON", b"+json", b"/", b";",
                b" ", b"\t", b"\x0b", b"\x0c", b"\n", b"x", b"vnd.a", b"charset=utf-8",
                b"\xc3\xa9", b"\x7f", b"text",
            ]), 0..7),
        ) {
            let bytes = parts.concat();
            if let Ok(value) = HeaderValue::from_bytes(&bytes) {
                proptest::prop_assert_eq!(is_json(&value), is_json_str(&value), "{:?}", value);
            }
        }
    }

    proptest::proptest! {
        /// The 16-byte shortcut: `application/json` in any case, and with any one byte
        /// changed, read as the `str` version reads them.
        #[test]
        fn application_json_in_any_case_as_the_str_version_reads_it(
            upper in proptest::collection::vec(proptest::bool::ANY, 16),
            change in proptest::option::of((0usize..16, proptest::num::u8::ANY)),
        ) {
            let mut bytes: Vec<u8> = b"application/json"
                .iter()
                .zip(&upper)
                .map(|(&c, &up)| if up { c.to_ascii_uppercase() } else { c })
                .collect();
            if let Some((at, byte)) = change {
                bytes[at] = byte;
            }
            if let Ok(value) = HeaderValue::from_bytes(&bytes) {
                proptest::prop_assert_eq!(is_json(&value), is_json_str(&value), "{:?}", value);
            }
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

    /// The quick lookup against the full parse, on bodies built to hit the cases where they
    /// could differ: keys given twice, values the parse refuses (out-of-range numbers, bad
    /// UTF-8, lone surrogates), nesting past the limit, trailing bytes, cut documents.
    fn both_ways(body: &[u8], steps: &[Step]) {
        let json = ct("application/json");
        for truncated in [false, true] {
            let quick = Captured::new(Bytes::copy_from_slice(body), Some(&json), truncated);
            let full = Captured::new(Bytes::copy_from_slice(body), Some(&json), truncated);
            let expected = descend(full.value(), steps).into_owned();
            assert_eq!(
                quick.lookup(steps).into_owned(),
                expected,
                "{:?} at {steps:?}",
                String::from_utf8_lossy(body)
            );
            // The second lookup parses the whole body (or knows it does not parse); same
            // answer, and the same value for whatever reads the whole body next.
            assert_eq!(quick.lookup(steps).into_owned(), expected);
            assert_eq!(quick.value(), full.value());
            assert_eq!(quick.is_text(), full.is_text());
        }
    }

    fn field(f: &str) -> Step {
        Step::Field(f.to_string())
    }

    #[test]
    fn quick_lookups_read_what_the_full_parse_reads() {
        let id = [field("id")];
        let nested = [field("items"), Step::Index(1), field("sku")];
        let first_id = [Step::Index(0), field("id")];
        let deep = format!(r#"{{"id":"x","n":{}{}}}"#, "[".repeat(200), "]".repeat(200));
        let bodies: Vec<Vec<u8>> = vec![
            br#"{"id":"ord-1","items":[{"sku":"a"},{"sku":"b"}]}"#.to_vec(),
            br#"{"id":1,"id":2}"#.to_vec(),
            br#"{"items":[{"sku":"a"},{"sku":"b"}],"items":[{"sku":"c"}]}"#.to_vec(),
            br#"{"id":"x","big":1e400}"#.to_vec(),
            br#"{"id":"x","s":"\ud800"}"#.to_vec(),
            b"{\"id\":\"x\",\"s\":\"\xff\"}".to_vec(),
            br#"{"id":"x"} trailing"#.to_vec(),
            br#"{"id":"x","items":[{"sku":"a"},{"sku""#.to_vec(),
            br#"[{"id":1}]"#.to_vec(),
            br#""just a string""#.to_vec(),
            br#"{"id":{"deep":[1,2,{"x":null}]},"items":[]}"#.to_vec(),
            br#"{"i\u0064":"escaped key"}"#.to_vec(),
            br#"{"id":-0.0,"items":[1,2.5e3,-7,18446744073709551615]}"#.to_vec(),
            Vec::new(),
            deep.into_bytes(),
            br#"{"id":"x","n":[[[[1]]]]}"#.to_vec(),
        ];
        for body in &bodies {
            for steps in [&id[..], &nested[..], &first_id[..]] {
                both_ways(body, steps);
            }
        }
    }

    use proptest::strategy::Strategy;

    proptest::proptest! {
        #[test]
        fn quick_lookups_agree_with_the_full_parse(
            value in json_value(),
            path in proptest::collection::vec(proptest::prop_oneof![
                proptest::sample::select(vec!["a", "b", "id"]).prop_map(field),
                (0usize..3).prop_map(Step::Index),
            ], 1..4),
            cut in proptest::option::of(0usize..200),
            dup in proptest::bool::ANY,
        ) {
            let mut text = value.to_string();
            if dup && text.starts_with('{') && text.len() > 2 {
                // The same key again, last: the full parse keeps this one.
                text.insert_str(text.len() - 1, r#","a":{"id":"dup"}"#);
            }
            let mut bytes = text.into_bytes();
            if let Some(cut) = cut {
                bytes.truncate(cut);
            }
            both_ways(&bytes, &path);
        }
    }

    fn json_value() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            (-1e6f64..1e6).prop_map(Value::from),
            "[a-z\u{e9}\"]{0,6}".prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 32, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                proptest::collection::vec(
                    (proptest::sample::select(vec!["a", "b", "id", "c"]), inner),
                    0..4
                )
                .prop_map(|kv| Value::Object(
                    kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
                )),
            ]
        })
    }
}
