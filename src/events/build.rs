//! From a rule's [`EventDraft`] to a CloudEvent: the attributes the rule does not set come
//! from the exchange (`time`, `traceparent`, `ficusupstream`) or from defaults (`id` a new
//! UUIDv7, `partitionkey` the subject, `source` the `events.source`).

use std::fmt::Display;
use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::rules::{plain_len, Data, EventDraft};

use super::{CloudEvent, ENCODE_CAPACITY, SPEC_VERSION};

/// What the exchange contributes to every event it yields.
pub struct Context<'a> {
    pub default_source: &'a str,
    pub upstream: &'a str,
    pub seen_at: SystemTime,
    pub traceparent: Option<&'a str>,
}

fn content_type(draft: &EventDraft) -> Option<&'static str> {
    draft.data.as_ref().map(|d| {
        if draft.data_text && d.is_string() {
            "text/plain; charset=utf-8"
        } else {
            "application/json"
        }
    })
}

pub fn cloud_event(draft: EventDraft, ctx: &Context<'_>) -> CloudEvent {
    let datacontenttype = content_type(&draft).map(str::to_string);
    let partitionkey = draft.partition_key.or_else(|| draft.subject.clone());
    CloudEvent {
        specversion: SPEC_VERSION.to_string(),
        id: draft
            .id
            .filter(|id| !id.is_empty())
            .unwrap_or_else(|| uuid_v7(ctx.seen_at)),
        source: draft
            .source
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| ctx.default_source.to_string()),
        ty: draft.ty,
        time: humantime::format_rfc3339_millis(ctx.seen_at).to_string(),
        subject: draft.subject,
        datacontenttype,
        partitionkey,
        ficusupstream: Some(ctx.upstream.to_string()),
        sequence: draft.sequence,
        traceparent: ctx.traceparent.map(str::to_string),
        ficustruncated: draft.data_truncated.then_some(true),
        data: draft.data.map(Data::into_value),
    }
}

/// The stored envelope of the event `draft` makes, for `sinks`: the bytes of
/// `Envelope { sinks: Some(sinks), rule, event: cloud_event(draft, ctx) }.encode()`, written
/// from borrowed attributes. The tap does this for every event; building the owned event
/// first cost a dozen short-lived allocations (its strings, a copy of the sink list).
///
/// Written by hand, not through serde: the same keys in the same order, the same omissions,
/// and strings escaped as serde_json escapes them ([`write_str`]); `data` goes through
/// serde_json. serde's field-by-field machinery and serde_json's byte-at-a-time escaping were
/// most of the cost of an envelope. Tests compare the bytes with [`super::Envelope::encode`].
pub fn envelope(draft: &EventDraft, sinks: &[String], ctx: &Context<'_>) -> Bytes {
    let mut id_buf = uuid::Uuid::encode_buffer();
    let id = match draft.id.as_deref().filter(|id| !id.is_empty()) {
        Some(id) => id,
        None => uuid_v7_into(ctx.seen_at, &mut id_buf),
    };
    let mut time_buf = [0u8; 40];
    let formatted = humantime::format_rfc3339_millis(ctx.seen_at);
    let owned_time;
    let time = match format_into(&mut time_buf, &formatted) {
        Some(t) => t,
        None => {
            owned_time = formatted.to_string();
            &owned_time
        }
    };
    let source = draft
        .source
        .as_deref()
        .filter(|s| !s.is_empty())
        .unwrap_or(ctx.default_source);
    let mut out = Vec::with_capacity(ENCODE_CAPACITY);
    out.extend_from_slice(b"{\"sinks\":[");
    for (i, sink) in sinks.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(&mut out, sink);
    }
    out.extend_from_slice(b"],\"rule\":");
    write_str(&mut out, &draft.rule);
    out.extend_from_slice(b",\"event\":{\"specversion\":");
    write_str(&mut out, SPEC_VERSION);
    let attributes = [
        ("id", Some(id)),
        ("source", Some(source)),
        ("type", Some(draft.ty.as_str())),
        ("time", Some(time)),
        ("subject", draft.subject.as_deref()),
        ("datacontenttype", content_type(draft)),
        (
            "partitionkey",
            draft.partition_key.as_deref().or(draft.subject.as_deref()),
        ),
        ("ficusupstream", Some(ctx.upstream)),
        ("sequence", draft.sequence.as_deref()),
        ("traceparent", ctx.traceparent),
    ];
    for (name, value) in attributes {
        if let Some(value) = value {
            out.extend_from_slice(b",\"");
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b"\":");
            write_str(&mut out, value);
        }
    }
    if draft.data_truncated {
        out.extend_from_slice(b",\"ficustruncated\":true");
    }
    if let Some(data) = &draft.data {
        out.extend_from_slice(b",\"data\":");
        data.write_json(&mut out);
    }
    out.extend_from_slice(b"}}");
    Bytes::from(out)
}

/// `s` as a JSON string, escaped byte for byte as serde_json escapes it: `"` and `\` with a
/// backslash; the control characters below `0x20` as `\b`, `\t`, `\n`, `\f`, `\r`, or else
/// `\u00xx` in lower-case hex; everything else (DEL, all of non-ASCII) as it is.
fn write_str(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let mut rest = s.as_bytes();
    loop {
        let (plain, special) = rest.split_at(plain_len(rest).min(rest.len()));
        out.extend_from_slice(plain);
        let Some((&c, tail)) = special.split_first() else {
            break;
        };
        match c {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x09 => out.extend_from_slice(b"\\t"),
            0x0a => out.extend_from_slice(b"\\n"),
            0x0c => out.extend_from_slice(b"\\f"),
            0x0d => out.extend_from_slice(b"\\r"),
            _ => out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(c >> 4)],
                HEX[usize::from(c & 0xf)],
            ]),
        }
        rest = tail;
    }
    out.push(b'"');
}

/// `value` formatted into `buf`, when it fits.
fn format_into(buf: &mut [u8], value: impl Display) -> Option<&str> {
    let len = buf.len();
    let mut rest = &mut buf[..];
    write!(rest, "{value}").ok()?;
    let written = len - rest.len();
    std::str::from_utf8(&buf[..written]).ok()
}

/// A UUIDv7 (RFC 9562) for an event seen at `at`: its millisecond timestamp, then 74 random
/// bits from `fastrand` (seeded per thread from the OS). `Uuid::now_v7` would read the clock
/// again and the OS's random source for each id (a `getrandom` syscall per event here); ids
/// only need to be unique, and 74 random bits within one millisecond are.
fn uuid_v7(at: SystemTime) -> String {
    uuid_v7_into(at, &mut uuid::Uuid::encode_buffer()).to_string()
}

/// [`uuid_v7`] written into `buf`.
fn uuid_v7_into(at: SystemTime, buf: &mut [u8]) -> &str {
    let millis = at
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let mut random = [0u8; 10];
    fastrand::fill(&mut random);
    uuid::Builder::from_unix_timestamp_millis(millis, &random)
        .into_uuid()
        .hyphenated()
        .encode_lower(buf)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::time::Duration;

    use super::*;
    use crate::events::Envelope;

    fn draft() -> EventDraft {
        EventDraft {
            rule: "order-created".into(),
            ty: "shop.order.created".into(),
            source: None,
            subject: Some("caf\u{e9} \"42\"\n".into()),
            partition_key: None,
            id: None,
            sequence: None,
            data: Some(
                serde_json::json!({"id": 42, "b": [1.5, null, "x"], "a": {"z": true}}).into(),
            ),
            data_truncated: false,
            data_text: false,
            sinks: None,
        }
    }

    /// The borrowed encoder against the owned event's, over the attributes' variants.
    #[test]
    fn envelope_is_the_owned_events_encoding() {
        let ctx = Context {
            default_source: "/legacy/shop",
            upstream: "monolith",
            seen_at: UNIX_EPOCH + Duration::from_millis(1_790_000_000_123),
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        };
        let sinks = vec!["bus".to_string(), "audit".to_string()];
        let mut drafts = vec![draft()];
        let mut d = draft();
        (d.source, d.partition_key, d.sequence) =
            (Some("/x".into()), Some("k".into()), Some("7".into()));
        (d.data, d.data_text, d.data_truncated) =
            (Some(serde_json::Value::from("plain").into()), true, true);
        drafts.push(d);
        let mut d = draft();
        (d.source, d.subject, d.data, d.id) =
            (Some(String::new()), None, None, Some(String::new()));
        drafts.push(d);
        let mut d = draft();
        d.id = Some("given-id".into());
        drafts.push(d);
        // A response body in serde_json's own form, embedded as it is.
        let mut d = draft();
        d.data = Some(Data::Json(Bytes::from_static(
            b"{\"a\":[1,-2,\"x\\n\xc3\xa9\",true,{}],\"b\":null,\"id\":\"ord-1\"}",
        )));
        drafts.push(d);
        for (i, draft) in drafts.into_iter().enumerate() {
            let ctx = Context {
                traceparent: ctx.traceparent.filter(|_| i != 2),
                ..ctx
            };
            let new = envelope(&draft, &sinks, &ctx);
            let decoded = Envelope::decode(&new).expect("decodes");
            let given = draft.id.clone().filter(|id| !id.is_empty());
            let mut old = Envelope {
                sinks: Some(sinks.clone()),
                rule: draft.rule.clone(),
                event: cloud_event(draft, &ctx),
            };
            match given {
                Some(id) => assert_eq!(decoded.event.id, id),
                None => {
                    let uuid = uuid::Uuid::parse_str(&decoded.event.id).expect("uuid");
                    assert_eq!(uuid.get_version_num(), 7);
                    old.event.id = decoded.event.id.clone();
                }
            }
            assert_eq!(
                String::from_utf8_lossy(&new),
                String::from_utf8_lossy(&old.encode()),
                "draft {i}"
            );
        }
    }

    /// Strings that need every kind of escape, and none.
    fn text() -> impl proptest::strategy::Strategy<Value = String> {
        "[a-z\"\\\\/\\x00-\\x1f\u{7f}\u{e9}\u{2028}\u{1F600} ]{0,24}"
    }

    proptest::proptest! {
        /// The hand-written encoder against serde_json's, on attributes with any characters.
        #[test]
        fn envelope_escapes_as_serde_json_does(
            (rule, ty, subject, source, id) in (text(), text(), text(), text(), text()),
            (key, sequence, upstream, traceparent) in (text(), text(), text(), text()),
            sinks in proptest::collection::vec(text(), 0..3),
            (with, truncated, text_data) in (proptest::collection::vec(proptest::bool::ANY, 6), proptest::bool::ANY, proptest::bool::ANY),
            data in text(),
        ) {
            let draft = EventDraft {
                rule,
                ty,
                source: with[0].then_some(source),
                subject: with[1].then_some(subject),
                partition_key: with[2].then_some(key),
                id: with[3].then_some(id),
                sequence: with[4].then_some(sequence),
                data: with[5].then(|| serde_json::Value::Object([(data.clone(), serde_json::json!([data.clone(), 1.5, null]))].into_iter().collect()).into()).or(text_data.then(|| serde_json::Value::from(data).into())),
                data_truncated: truncated,
                data_text: text_data,
                sinks: None,
            };
            let ctx = Context {
                default_source: "/legacy/shop",
                upstream: &upstream,
                seen_at: UNIX_EPOCH + Duration::from_millis(1_790_000_000_123),
                traceparent: with[0].then_some(traceparent.as_str()),
            };
            let new = envelope(&draft, &sinks, &ctx);
            let decoded = Envelope::decode(&new).map_err(|e| proptest::test_runner::TestCaseError::fail(e.to_string()))?;
            let mut old = Envelope {
                sinks: Some(sinks.clone()),
                rule: draft.rule.clone(),
                event: cloud_event(draft, &ctx),
            };
            old.event.id = decoded.event.id.clone();
            let expected = old.encode();
            proptest::prop_assert_eq!(
                String::from_utf8_lossy(&new),
                String::from_utf8_lossy(&expected)
            );
        }
    }

    #[test]
    fn ids_are_version_7_carry_the_time_and_do_not_repeat() {
        let at = UNIX_EPOCH + Duration::from_millis(1_790_000_000_123);
        let ids: HashSet<String> = (0..10_000).map(|_| uuid_v7(at)).collect();
        assert_eq!(ids.len(), 10_000);
        for id in ids.iter().take(10) {
            let uuid = uuid::Uuid::parse_str(id).expect("uuid");
            assert_eq!(uuid.get_version_num(), 7);
            let (secs, nanos) = uuid.get_timestamp().expect("v7 timestamp").to_unix();
            assert_eq!((secs, nanos / 1_000_000), (1_790_000_000, 123));
        }
    }
}
