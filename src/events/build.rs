//! From a rule's [`EventDraft`] to a CloudEvent: the attributes the rule does not set come
//! from the exchange (`time`, `traceparent`, `ficusupstream`) or from defaults (`id` a new
//! UUIDv7, `partitionkey` the subject, `source` the `events.source`).

use std::cell::Cell;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};

use crate::rules::{plain_len, special, Data, EventDraft};

use super::{CloudEvent, ENCODE_CAPACITY, SPEC_VERSION};

/// What the exchange contributes to every event it yields.
pub struct Context<'a> {
    pub default_source: &'a str,
    pub upstream: &'a str,
    pub seen_at: SystemTime,
    pub traceparent: Option<&'a str>,
}

/// Whether `value` is a `traceparent` that W3C Trace Context (level 1, section 3.2) lets a
/// receiver use: `version-traceid-parentid-flags` in lowercase hex, version not `ff`, ids not
/// all zeros, exactly 55 characters for version `00` and, for a later version, those 55
/// followed by nothing or by `-` and more. Anything else is ignored, as the spec tells a
/// receiver to: the event then has no `traceparent`, rather than one no tracer can read.
pub fn valid_traceparent(value: &str) -> bool {
    let b = value.as_bytes();
    let hex = |r: std::ops::Range<usize>| {
        b.get(r)
            .is_some_and(|s| s.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')))
    };
    let zeros = |r: std::ops::Range<usize>| b.get(r).is_some_and(|s| s.iter().all(|&c| c == b'0'));
    let length_ok = match b.get(..2) {
        Some(b"00") => b.len() == 55,
        Some(b"ff") => false,
        _ => b.len() == 55 || b.get(55) == Some(&b'-'),
    };
    length_ok
        && hex(0..2)
        && b.get(2) == Some(&b'-')
        && hex(3..35)
        && !zeros(3..35)
        && b.get(35) == Some(&b'-')
        && hex(36..52)
        && !zeros(36..52)
        && b.get(52) == Some(&b'-')
        && hex(53..55)
}

fn content_type(draft: &EventDraft) -> Option<&'static str> {
    draft.data.as_ref().map(|d| {
        if draft.data_text && d.is_string() {
            // SPEC section 4's value; the data is a JSON string, so Unicode whatever the body was.
            "text/plain"
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
        ty: draft.ty.to_string(),
        time: {
            let mut time = Vec::with_capacity(24);
            write_time(&mut time, ctx.seen_at);
            String::from_utf8_lossy(&time).into_owned()
        },
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
    envelope_after(&envelope_head(sinks, &draft.rule), draft, ctx)
}

/// The start of every envelope of rule `rule` for `sinks` (`{"sinks":[...],"rule":...`),
/// which the tap writes once per rule rather than once per event.
pub fn envelope_head(sinks: &[String], rule: &str) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(b"{\"sinks\":[");
    for (i, sink) in sinks.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(&mut out, sink);
    }
    out.extend_from_slice(b"],\"rule\":");
    write_str(&mut out, rule);
    out
}

/// [`envelope`] from its start, `head` ([`envelope_head`] of the draft's sinks and rule).
///
/// The bytes are a piece of a larger block that this thread's envelopes share (see
/// [`ARENA`]): one allocation for many events instead of one each, which cost more than
/// writing the envelope (the block is freed by the outbox writer's thread, so each event's
/// `malloc` missed the thread's cache).
pub fn envelope_after(head: &[u8], draft: &EventDraft, ctx: &Context<'_>) -> Bytes {
    ARENA.with(|arena| {
        let Ok(mut arena) = arena.try_borrow_mut() else {
            let mut out = Vec::new();
            write_envelope(&mut out, head, draft, ctx);
            return Bytes::from(out);
        };
        let Arena { scratch, block } = &mut *arena;
        scratch.clear();
        write_envelope(scratch, head, draft, ctx);
        if block.capacity() < scratch.len() {
            block.reserve(scratch.len().max(ARENA_BLOCK));
        }
        block.extend_from_slice(scratch);
        block.split().freeze()
    })
}

/// How much a thread's envelopes take at a time: about a hundred events.
const ARENA_BLOCK: usize = 64 << 10;

/// Where a thread writes its envelopes: `scratch`, kept from one event to the next, then
/// `block`, which hands out each envelope as a `Bytes` of it and is freed when the last of
/// them is (they are dropped in order once written to the log, so at most one block is
/// partly held).
struct Arena {
    scratch: Vec<u8>,
    block: BytesMut,
}

thread_local! {
    static ARENA: std::cell::RefCell<Arena> = std::cell::RefCell::new(Arena {
        scratch: Vec::new(),
        block: BytesMut::new(),
    });
}

// The attributes' keys, each with the comma before it.
const EVENT: &[u8] = b",\"event\":{\"specversion\":";
const ID: &[u8] = b",\"id\":";
const SOURCE: &[u8] = b",\"source\":";
const TYPE: &[u8] = b",\"type\":";
const TIME: &[u8] = b",\"time\":";
const SUBJECT: &[u8] = b",\"subject\":";
const CONTENT_TYPE: &[u8] = b",\"datacontenttype\":";
const PARTITION_KEY: &[u8] = b",\"partitionkey\":";
const UPSTREAM: &[u8] = b",\"ficusupstream\":";
const SEQUENCE: &[u8] = b",\"sequence\":";
const TRACEPARENT: &[u8] = b",\"traceparent\":";
const TRUNCATED: &[u8] = b",\"ficustruncated\":true";
const DATA: &[u8] = b",\"data\":";
const END: &[u8] = b"}}";
/// The length of a UUID and of a time as ficus writes them, quotes included.
const UUID_LEN: usize = 38;
const TIME_LEN: usize = 26;

/// Appends the envelope to `out`, reserving its length first: an empty `out` gets exactly
/// that when no string needs escaping and the data is JSON text (or none).
fn write_envelope(out: &mut Vec<u8>, head: &[u8], draft: &EventDraft, ctx: &Context<'_>) {
    let id = draft.id.as_deref().filter(|id| !id.is_empty());
    let source = draft
        .source
        .as_deref()
        .filter(|s| !s.is_empty())
        .unwrap_or(ctx.default_source);
    let content_type = content_type(draft);
    let partition_key = draft.partition_key.as_deref().or(draft.subject.as_deref());
    let quoted = |s: &str| s.len() + 2;
    let optional = |key: &[u8], value: Option<&str>| value.map_or(0, |v| key.len() + quoted(v));
    let len = head.len()
        + EVENT.len()
        + quoted(SPEC_VERSION)
        + ID.len()
        + id.map_or(UUID_LEN, quoted)
        + SOURCE.len()
        + quoted(source)
        + TYPE.len()
        + quoted(&draft.ty)
        + TIME.len()
        + TIME_LEN
        + optional(SUBJECT, draft.subject.as_deref())
        + optional(CONTENT_TYPE, content_type)
        + optional(PARTITION_KEY, partition_key)
        + UPSTREAM.len()
        + quoted(ctx.upstream)
        + optional(SEQUENCE, draft.sequence.as_deref())
        + optional(TRACEPARENT, ctx.traceparent)
        + if draft.data_truncated {
            TRUNCATED.len()
        } else {
            0
        }
        + draft.data.as_ref().map_or(0, |d| {
            // A value's length is known only once serde_json has written it.
            DATA.len() + d.json_len().unwrap_or(ENCODE_CAPACITY / 2)
        })
        + END.len();
    out.reserve(len);
    out.extend_from_slice(head);
    out.extend_from_slice(EVENT);
    write_plain(out, SPEC_VERSION.as_bytes());
    out.extend_from_slice(ID);
    match id {
        Some(id) => write_str(out, id),
        // `id` and `time`, when ficus makes them, are ASCII that needs no escaping: written
        // in place, without `fmt` or an intermediate string.
        None => write_plain(out, &uuid_v7_hyphenated(ctx.seen_at)),
    }
    out.extend_from_slice(SOURCE);
    write_str(out, source);
    out.extend_from_slice(TYPE);
    write_str(out, &draft.ty);
    out.extend_from_slice(TIME);
    out.push(b'"');
    write_time(out, ctx.seen_at);
    out.push(b'"');
    if let Some(subject) = &draft.subject {
        out.extend_from_slice(SUBJECT);
        write_str(out, subject);
    }
    if let Some(content_type) = content_type {
        out.extend_from_slice(CONTENT_TYPE);
        write_plain(out, content_type.as_bytes());
    }
    if let Some(key) = partition_key {
        out.extend_from_slice(PARTITION_KEY);
        write_str(out, key);
    }
    out.extend_from_slice(UPSTREAM);
    write_str(out, ctx.upstream);
    if let Some(sequence) = &draft.sequence {
        out.extend_from_slice(SEQUENCE);
        write_str(out, sequence);
    }
    if let Some(traceparent) = ctx.traceparent {
        out.extend_from_slice(TRACEPARENT);
        write_str(out, traceparent);
    }
    if draft.data_truncated {
        out.extend_from_slice(TRUNCATED);
    }
    if let Some(data) = &draft.data {
        out.extend_from_slice(DATA);
        data.write_json(out);
    }
    out.extend_from_slice(END);
}

/// `bytes`, known to need no escaping (ficus's own constants, ids and times), in quotes.
fn write_plain(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(b'"');
    out.extend_from_slice(bytes);
    out.push(b'"');
}

/// `s` as a JSON string, escaped byte for byte as serde_json escapes it: `"` and `\` with a
/// backslash; the control characters below `0x20` as `\b`, `\t`, `\n`, `\f`, `\r`, or else
/// `\u00xx` in lower-case hex; everything else (DEL, all of non-ASCII) as it is. Most
/// attributes need no escape at all: they are checked whole first, eight bytes at a time, and
/// copied in one piece.
#[inline]
fn write_str(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    if needs_escape(bytes) {
        write_escaped(out, bytes);
    } else {
        write_plain(out, bytes);
    }
}

/// [`write_str`] for a string with something to escape.
#[cold]
#[inline(never)]
fn write_escaped(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(b'"');
    let mut rest = bytes;
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
            _ => {
                let [high, low] = HEX_PAIRS[usize::from(c)];
                out.extend_from_slice(&[b'\\', b'u', b'0', b'0', high, low]);
            }
        }
        rest = tail;
    }
    out.push(b'"');
}

/// Whether any byte of `bytes` is `"`, `\` or a control character. Eight bytes at a time: a
/// string of eight or more ends with an overlapping last word, a shorter one is padded with
/// spaces, so that no byte is looked at alone.
fn needs_escape(bytes: &[u8]) -> bool {
    let word = |chunk: &[u8]| -> u64 {
        let mut w = [b' '; 8];
        w[..chunk.len()].copy_from_slice(chunk);
        u64::from_le_bytes(w)
    };
    // The scanner's word test: any flagged byte means one to escape (the lowest flagged is
    // sure to be one, and a borrow flags only above a real one).
    let flagged = |w: u64| special(w, false) != 0;
    if bytes.len() < 8 {
        return flagged(word(bytes));
    }
    let mut chunks = bytes.chunks_exact(8);
    let mut found = false;
    for chunk in chunks.by_ref() {
        found |= flagged(word(chunk));
    }
    if !chunks.remainder().is_empty() {
        found |= flagged(word(&bytes[bytes.len() - 8..]));
    }
    found
}

/// The first second of year 10000: RFC 3339 has four digits for the year.
const YEAR_10000: u64 = 253_402_300_800;

/// `at` as `humantime::format_rfc3339_millis` writes it (`2026-11-28T02:34:10.123Z`), appended
/// to `out` without going through `fmt`. Times before 1970 or past year 9999 go through
/// humantime (which refuses them as it always did).
fn write_time(out: &mut Vec<u8>, at: SystemTime) {
    let Some(d) = at
        .duration_since(UNIX_EPOCH)
        .ok()
        .filter(|d| d.as_secs() < YEAR_10000)
    else {
        out.extend_from_slice(humantime::format_rfc3339_millis(at).to_string().as_bytes());
        return;
    };
    let secs = d.as_secs();
    let millis = u64::from(d.subsec_millis());
    let pair = |n: u64| PAIRS[(n % 100) as usize];
    let [ms0, ms1] = pair(millis / 10);
    let ms2 = b'0' + (millis % 10) as u8;
    let mut time = [0; 24];
    time[..19].copy_from_slice(&to_the_second(secs));
    time[19..].copy_from_slice(&[b'.', ms0, ms1, ms2, b'Z']);
    out.extend_from_slice(&time);
}

thread_local! {
    /// The second the last event of this thread was seen in, and its `YYYY-MM-DDTHH:MM:SS`:
    /// events come many to a second.
    static LAST_SECOND: Cell<(u64, [u8; 19])> = const { Cell::new((u64::MAX, [0; 19])) };
}

/// `YYYY-MM-DDTHH:MM:SS` of `secs` since 1970 (before year 10000).
fn to_the_second(secs: u64) -> [u8; 19] {
    if let Ok((last, text)) = LAST_SECOND.try_with(Cell::get) {
        if last == secs {
            return text;
        }
    }
    let (year, month, day) = civil_from_days(secs / 86_400);
    let s = secs % 86_400;
    let pair = |n: u64| PAIRS[(n % 100) as usize];
    let [y0, y1] = pair(year / 100);
    let [y2, y3] = pair(year);
    let [mo0, mo1] = pair(month);
    let [d0, d1] = pair(day);
    let [h0, h1] = pair(s / 3600);
    let [mi0, mi1] = pair(s / 60 % 60);
    let [s0, s1] = pair(s % 60);
    let text = [
        y0, y1, y2, y3, b'-', mo0, mo1, b'-', d0, d1, b'T', h0, h1, b':', mi0, mi1, b':', s0, s1,
    ];
    let _ = LAST_SECOND.try_with(|last| last.set((secs, text)));
    text
}

/// `00` to `99`.
const PAIRS: [[u8; 2]; 100] = {
    let mut pairs = [[0; 2]; 100];
    let mut i = 0;
    while i < 100 {
        pairs[i] = [b'0' + (i / 10) as u8, b'0' + (i % 10) as u8];
        i += 1;
    }
    pairs
};

/// Each byte in lower-case hex.
const HEX_PAIRS: [[u8; 2]; 256] = {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut pairs = [[0; 2]; 256];
    let mut i = 0;
    while i < 256 {
        pairs[i] = [HEX[i >> 4], HEX[i & 0xf]];
        i += 1;
    }
    pairs
};

/// The proleptic Gregorian (year, month, day) of `days` since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, for days that are not negative).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// A UUIDv7 (RFC 9562) for an event seen at `at`: its millisecond timestamp, then 74 random
/// bits from `fastrand` (seeded per thread from the OS). `Uuid::now_v7` would read the clock
/// again and the OS's random source for each id (a `getrandom` syscall per event here); ids
/// only need to be unique, and 74 random bits within one millisecond are.
fn uuid_v7(at: SystemTime) -> String {
    String::from_utf8_lossy(&uuid_v7_hyphenated(at)).into_owned()
}

/// [`uuid_v7`] in its hyphenated lower-case form, as `Uuid::hyphenated` writes it.
fn uuid_v7_hyphenated(at: SystemTime) -> [u8; 36] {
    let millis = at
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let random = fastrand::u128(..).to_le_bytes();
    let mut ten = [0u8; 10];
    ten.copy_from_slice(&random[..10]);
    let uuid = uuid::Builder::from_unix_timestamp_millis(millis, &ten).into_uuid();
    // Where each byte's two digits go in `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
    const AT: [usize; 16] = [0, 2, 4, 6, 9, 11, 14, 16, 19, 21, 24, 26, 28, 30, 32, 34];
    let mut text = [b'-'; 36];
    for (byte, &at) in uuid.as_bytes().iter().zip(&AT) {
        let [high, low] = HEX_PAIRS[usize::from(*byte)];
        text[at] = high;
        text[at + 1] = low;
    }
    text
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
    fn traceparent_is_taken_only_as_trace_context_allows() {
        let good = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        assert!(valid_traceparent(good));
        // A later version may carry more after a dash.
        assert!(valid_traceparent(
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        ));
        assert!(valid_traceparent(
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-what-comes"
        ));
        for bad in [
            "",
            "garbage",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-more",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-0",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00_0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c_b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331_01",
            "00-0af7651916cd43dd8448eb211c80319g-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b716920333x-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-0z",
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01x",
            "0g-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ] {
            assert!(!valid_traceparent(bad), "{bad}");
        }
    }

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
                rule: draft.rule.to_string(),
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

    /// Without anything to escape and with JSON text as data, the envelope is allocated at
    /// its exact length (so `Bytes` takes it as it is), whichever attributes it has.
    #[test]
    fn envelope_is_allocated_at_its_length() {
        let head = envelope_head(&["audit".to_string()], "accepted");
        for mask in 0u32..256 {
            let with = |bit: u32| mask & (1 << bit) != 0;
            let mut d = draft();
            d.subject = with(0).then(|| "ord-1".to_string());
            d.source = with(1).then(|| "/shop".to_string());
            d.partition_key = with(2).then(|| "k".to_string());
            d.id = with(3).then(|| "given".to_string());
            d.sequence = with(4).then(|| "7".to_string());
            d.data = with(5).then(|| Data::Json(Bytes::from_static(b"{\"id\":\"ord-1\"}")));
            d.data_truncated = with(6);
            let ctx = Context {
                default_source: "/legacy/shop",
                upstream: "monolith",
                seen_at: UNIX_EPOCH + Duration::from_millis(1_790_000_000_123),
                traceparent: with(7)
                    .then_some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            };
            let mut out = Vec::new();
            write_envelope(&mut out, &head, &d, &ctx);
            assert_eq!(
                out.len(),
                out.capacity(),
                "mask {mask:#b}: {}",
                String::from_utf8_lossy(&out)
            );
        }
    }

    /// Envelopes cut from this thread's blocks stay what they were written as while more
    /// are written after them, across blocks, with some dropped early and some kept.
    #[test]
    fn envelopes_from_the_arena_keep_their_bytes() {
        let head = envelope_head(&["audit".to_string()], "accepted");
        let ctx = Context {
            default_source: "/legacy/shop",
            upstream: "monolith",
            seen_at: UNIX_EPOCH + Duration::from_millis(1_790_000_000_123),
            traceparent: None,
        };
        let mut kept = Vec::new();
        for i in 0..3000 {
            let mut d = draft();
            d.id = Some(format!("id-{i}"));
            d.subject = Some("x".repeat(i % 700));
            let bytes = envelope_after(&head, &d, &ctx);
            if i % 3 != 0 {
                kept.push((d, bytes));
            }
        }
        for (d, bytes) in kept {
            let mut expected = Vec::new();
            write_envelope(&mut expected, &head, &d, &ctx);
            assert_eq!(bytes, expected);
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
                rule: rule.into(),
                ty: ty.into(),
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
                rule: draft.rule.to_string(),
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

    proptest::proptest! {
        /// The time written by hand against humantime's `format_rfc3339_millis`, over all of
        /// years 1970 to 9999.
        #[test]
        fn time_is_humantimes_rfc3339_millis(secs in 0u64..YEAR_10000, nanos in 0u32..1_000_000_000) {
            let at = UNIX_EPOCH + Duration::new(secs, nanos);
            let mut out = Vec::new();
            write_time(&mut out, at);
            proptest::prop_assert_eq!(
                String::from_utf8_lossy(&out),
                humantime::format_rfc3339_millis(at).to_string()
            );
        }

        /// The escape check against a byte-at-a-time one, on any bytes.
        #[test]
        fn needs_escape_finds_every_byte_to_escape(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..40)) {
            let expected = bytes.iter().any(|&c| c == b'"' || c == b'\\' || c < 0x20);
            proptest::prop_assert_eq!(needs_escape(&bytes), expected);
        }
    }

    #[test]
    fn time_at_the_edges_is_humantimes() {
        let days = |y: u64| (y - 1970) * 365 * 86_400;
        let mut secs = vec![
            0,
            59,
            86_399,
            86_400,
            951_782_400,
            951_868_800,
            YEAR_10000 - 1,
        ];
        // Around the turn of every year, leap or not, and of the centuries.
        for year in [1971, 1972, 1999, 2000, 2001, 2024, 2100, 2400, 9999] {
            let approx = days(year);
            secs.extend(
                (0..800)
                    .map(|d| (approx + d * 86_400).saturating_sub(400 * 86_400))
                    .filter(|&s| s < YEAR_10000),
            );
        }
        for s in secs {
            for millis in [0, 1, 999] {
                let at = UNIX_EPOCH + Duration::from_millis(s * 1000 + millis);
                let mut out = Vec::new();
                write_time(&mut out, at);
                assert_eq!(
                    String::from_utf8_lossy(&out),
                    humantime::format_rfc3339_millis(at).to_string()
                );
            }
        }
    }

    #[test]
    fn ids_are_uuids_hyphenated_form() {
        let at = UNIX_EPOCH + Duration::from_millis(1_790_000_000_123);
        for _ in 0..1000 {
            let text = uuid_v7_hyphenated(at);
            let text = std::str::from_utf8(&text).expect("ascii");
            let uuid = uuid::Uuid::parse_str(text).expect("uuid");
            assert_eq!(uuid.hyphenated().to_string(), text);
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
