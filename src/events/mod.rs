//! The CloudEvents 1.0 model ficus emits, the envelope it is stored in in the outbox, and the
//! protocol-binding encodings sinks use (HTTP binary, structured and batch; JSON Lines).

pub mod build;

use std::borrow::Cow;
use std::ops::Range;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

pub const SPEC_VERSION: &str = "1.0";
pub const STRUCTURED: &str = "application/cloudevents+json";
pub const BATCH: &str = "application/cloudevents-batch+json";

/// One CloudEvent in the JSON event format: attributes at the top level, `data` as JSON
/// (for `application/json`) or a string (for `text/plain`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloudEvent {
    pub specversion: String,
    pub id: String,
    pub source: String,
    #[serde(rename = "type")]
    pub ty: String,
    pub time: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datacontenttype: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partitionkey: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ficusupstream: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// Set when `data` came from a body longer than `limits.capture_body`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ficustruncated: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
}

/// The first allocation for an encoded envelope: most events fit.
pub(crate) const ENCODE_CAPACITY: usize = 768;

/// What the outbox stores: the event and the sinks it is for (`None`: every sink).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sinks: Option<Vec<String>>,
    pub rule: String,
    pub event: CloudEvent,
}

impl Envelope {
    pub fn encode(&self) -> Bytes {
        // Sized for a typical event up front: growing from empty reallocates a handful of
        // times per event.
        let mut out = Vec::with_capacity(ENCODE_CAPACITY);
        // A struct of strings and JSON values always serialises; a Vec cannot fail to take it.
        let _ = serde_json::to_writer(&mut out, self);
        Bytes::from(out)
    }

    pub fn decode(bytes: &[u8]) -> Result<Envelope, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    pub fn is_for(&self, sink: &str) -> bool {
        self.sinks
            .as_ref()
            .is_none_or(|list| list.iter().any(|s| s == sink))
    }
}

/// An event as the outbox stores it: the envelope's bytes and where the event's JSON sits in
/// them. The event JSON is what the structured and batch encodings and JSON Lines carry, byte
/// for byte (the envelope was written by the same serialiser), so sinks that write it copy
/// [`json`](Self::json) instead of decoding the event into owned strings and a JSON tree and
/// encoding it again; the others [`decode`](Self::decode) it.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    payload: Bytes,
    event: Range<usize>,
}

/// The part of a stored envelope the dispatcher reads: whom it is for, and where the event is.
#[derive(Deserialize)]
struct StoredHead<'a> {
    #[serde(default, borrow)]
    sinks: Option<Vec<Cow<'a, str>>>,
    // Required as in `Envelope`, so that what one refuses the other refuses too.
    #[serde(borrow)]
    #[allow(dead_code)]
    rule: Cow<'a, str>,
    #[serde(borrow)]
    event: &'a RawValue,
}

/// A [`CloudEvent`] read in place: the same attributes with the same types (so it accepts
/// exactly what `CloudEvent` does, bar JSON nesting deeper than serde_json's limit inside
/// `data`), borrowed from the stored bytes, and `data` left unparsed.
#[derive(Debug, Deserialize)]
pub struct EventView<'a> {
    #[serde(borrow)]
    pub specversion: Cow<'a, str>,
    #[serde(borrow)]
    pub id: Cow<'a, str>,
    #[serde(borrow)]
    pub source: Cow<'a, str>,
    #[serde(rename = "type", borrow)]
    pub ty: Cow<'a, str>,
    #[serde(borrow)]
    pub time: Cow<'a, str>,
    #[serde(default, borrow)]
    pub subject: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub datacontenttype: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub partitionkey: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub ficusupstream: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub sequence: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub traceparent: Option<Cow<'a, str>>,
    #[serde(default)]
    pub ficustruncated: Option<bool>,
    #[serde(default, borrow)]
    pub data: Option<&'a RawValue>,
}

impl StoredEvent {
    /// Reads a stored envelope: `Ok(None)` when it is not for `sink` (`None`: for whoever asks,
    /// as replayed dead letters are), an error when it is not an envelope with a JSON object
    /// as its event. The event's attributes are not checked here: a second pass over the
    /// event cost as much as the rest of delivering it. Every envelope ficus writes holds a
    /// valid event (and records are CRC-checked); should one not decode, the sinks that decode
    /// refuse it for good ([`crate::sinks::send_decoded`]) and it goes to dead letters, while
    /// the sinks that copy the stored bytes write it as it is.
    pub fn parse(
        payload: &Bytes,
        sink: Option<&str>,
    ) -> Result<Option<StoredEvent>, serde_json::Error> {
        match Self::parse_written(payload, sink) {
            Some(stored) => Ok(stored),
            None => Self::parse_any(payload, sink),
        }
    }

    /// [`parse`](Self::parse) for an envelope in the layout ficus writes
    /// (`{"sinks":[...],"rule":"...","event":{...}}`, strings without escapes, nothing else),
    /// read in place: the sink names and the rule compared or passed over as they are, the
    /// event taken as everything from its `{` to the byte before the envelope's closing `}`.
    /// `None` when the envelope is in any other form, for [`parse_any`](Self::parse_any) to
    /// read. The serde pass it saves was most of the cost of delivering an event.
    ///
    /// The event's JSON is not checked here. Every envelope in this layout is one ficus wrote
    /// (`crate::events::build`, compared byte for byte with serde's output in its tests), and
    /// a record reaches a reader only whole and with its CRC-32 matching, so a check could only
    /// find a bug of ficus's own, at the price of a second pass over every event (about a third
    /// of delivering it to a file). Where the envelope around the event is well formed, what
    /// this accepts `parse_any` accepts too, with the same answer (a property test below),
    /// with one exception: an event nested so deep that the envelope around it passes
    /// serde_json's limit (`data` from a body of about 126 levels), which `parse_any` refuses
    /// and this does not.
    fn parse_written(payload: &Bytes, sink: Option<&str>) -> Option<Option<StoredEvent>> {
        let b = payload.as_ref();
        let mut i = b"{\"sinks\":[".len();
        if b.get(..i)? != b"{\"sinks\":[" {
            return None;
        }
        let mut wanted = sink.is_none();
        if b.get(i) == Some(&b']') {
            i += 1;
        } else {
            loop {
                let (name, end) = crate::rules::plain_string(b, i)?;
                wanted |= sink.is_some_and(|s| s.as_bytes() == name);
                i = end;
                match b.get(i)? {
                    b',' => i += 1,
                    b']' => {
                        i += 1;
                        break;
                    }
                    _ => return None,
                }
            }
        }
        if b.get(i..i + 8)? != b",\"rule\":" {
            return None;
        }
        let (_, end) = crate::rules::plain_string(b, i + 8)?;
        i = end;
        if b.get(i..i + 9)? != b",\"event\":" {
            return None;
        }
        let start = i + 9;
        if b.get(start) != Some(&b'{') {
            return None;
        }
        let end = b.len() - 1;
        // ficus writes the event's `}` right before the envelope's: anything between (such as
        // whitespace, which serde would drop from the event) is another form.
        if end <= start || b.get(end) != Some(&b'}') || b.get(end - 1) != Some(&b'}') {
            return None;
        }
        Some(wanted.then(|| StoredEvent {
            payload: payload.clone(),
            event: start..end,
        }))
    }

    /// [`parse`](Self::parse) for an envelope in any form serde reads.
    fn parse_any(
        payload: &Bytes,
        sink: Option<&str>,
    ) -> Result<Option<StoredEvent>, serde_json::Error> {
        let head: StoredHead<'_> = serde_json::from_slice(payload)?;
        if let (Some(sink), Some(list)) = (sink, &head.sinks) {
            if !list.iter().any(|s| s == sink) {
                return Ok(None);
            }
        }
        let json = head.event.get();
        if !json.starts_with('{') {
            return Err(<serde_json::Error as serde::de::Error>::custom(
                "the envelope's event is not a JSON object",
            ));
        }
        // The raw value borrows from `payload`, so its offset is in range.
        let start = (json.as_ptr() as usize)
            .checked_sub(payload.as_ptr() as usize)
            .filter(|start| start + json.len() <= payload.len())
            .ok_or_else(|| {
                <serde_json::Error as serde::de::Error>::custom("event outside its envelope")
            })?;
        Ok(Some(StoredEvent {
            payload: payload.clone(),
            event: start..start + json.len(),
        }))
    }

    /// The event in the JSON event format (`application/cloudevents+json`).
    pub fn json(&self) -> &[u8] {
        &self.payload[self.event.clone()]
    }

    /// [`json`](Self::json) without a copy: a view of the stored buffer.
    pub fn json_bytes(&self) -> Bytes {
        self.payload.slice(self.event.clone())
    }

    /// The attributes, borrowed.
    pub fn view(&self) -> Result<EventView<'_>, serde_json::Error> {
        serde_json::from_slice(self.json())
    }

    /// The event as an owned [`CloudEvent`], for sinks that map attributes to headers.
    pub fn decode(&self) -> Result<CloudEvent, serde_json::Error> {
        serde_json::from_slice(self.json())
    }
}

impl CloudEvent {
    /// The structured JSON form (`application/cloudevents+json`, and one JSON Lines line).
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// [`to_json`](Self::to_json) appended to `out`, for sinks that join many events.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        // Strings and JSON values always serialise; writing to a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, self);
    }

    /// The data as bytes for binary-mode bindings: JSON serialised, text as is.
    pub fn data_bytes(&self) -> Option<Bytes> {
        match &self.data {
            None => None,
            Some(serde_json::Value::String(s)) if self.is_text() => Some(Bytes::from(s.clone())),
            Some(v) => Some(Bytes::from(serde_json::to_vec(v).unwrap_or_default())),
        }
    }

    fn is_text(&self) -> bool {
        self.datacontenttype
            .as_deref()
            .is_some_and(|c| c.starts_with("text/"))
    }

    /// Every attribute except `data` and `datacontenttype`, as (name, value) for binary-mode
    /// headers (`ce-` for HTTP and NATS, `ce_` for Kafka, `cloudEvents_` for AMQP).
    pub fn attributes(&self) -> Vec<(&'static str, String)> {
        let mut out = vec![
            ("specversion", self.specversion.clone()),
            ("id", self.id.clone()),
            ("source", self.source.clone()),
            ("type", self.ty.clone()),
            ("time", self.time.clone()),
        ];
        let optional = [
            ("subject", &self.subject),
            ("partitionkey", &self.partitionkey),
            ("ficusupstream", &self.ficusupstream),
            ("sequence", &self.sequence),
            ("traceparent", &self.traceparent),
        ];
        for (name, value) in optional {
            if let Some(v) = value {
                out.push((name, v.clone()));
            }
        }
        if let Some(t) = self.ficustruncated {
            out.push(("ficustruncated", t.to_string()));
        }
        out
    }

    /// HTTP binary-mode headers: `ce-NAME` for each attribute, values percent-encoded where
    /// the HTTP binding asks (non-printable ASCII, `"`, `%`), and `content-type`.
    pub fn http_binary_headers(&self) -> Vec<(HeaderName, HeaderValue)> {
        let mut out = Vec::with_capacity(12);
        for (name, value) in self.attributes() {
            let Ok(name) = HeaderName::from_bytes(format!("ce-{name}").as_bytes()) else {
                continue;
            };
            if let Ok(value) = HeaderValue::from_str(&percent_encode_header(&value)) {
                out.push((name, value));
            }
        }
        if let Some(ct) = &self.datacontenttype {
            if let Ok(v) = HeaderValue::from_str(ct) {
                out.push((http::header::CONTENT_TYPE, v));
            }
        }
        out
    }
}

/// Percent-encodes what the CloudEvents HTTP binding says must be (§3.1.3.2): space, bytes
/// outside printable ASCII, `"` and `%`.
pub fn percent_encode_header(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if (0x21..=0x7e).contains(&b) && b != b'"' && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// An order-created event as the sinks' tests use it.
#[cfg(test)]
pub(crate) fn sample_event() -> CloudEvent {
    CloudEvent {
        specversion: SPEC_VERSION.into(),
        id: "0190-a".into(),
        source: "/legacy/shop".into(),
        ty: "shop.order.created".into(),
        time: "2026-11-27T14:00:00.123Z".into(),
        subject: Some("42".into()),
        datacontenttype: Some("application/json".into()),
        partitionkey: Some("42".into()),
        ficusupstream: Some("monolith".into()),
        sequence: None,
        traceparent: None,
        ficustruncated: None,
        data: Some(serde_json::json!({"id": 42})),
    }
}

/// A JSON array of structured events (`application/cloudevents-batch+json`).
pub fn batch_json(events: &[CloudEvent]) -> Vec<u8> {
    serde_json::to_vec(events).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> CloudEvent {
        sample_event()
    }

    #[test]
    fn structured_json_has_required_attributes_and_omits_absent_ones() {
        let v: serde_json::Value = serde_json::from_slice(&event().to_json()).expect("json");
        assert_eq!(v["specversion"], "1.0");
        assert_eq!(v["type"], "shop.order.created");
        assert_eq!(v["data"]["id"], 42);
        assert!(v.get("sequence").is_none());
        assert!(v.get("traceparent").is_none());
    }

    #[test]
    fn binary_headers_are_prefixed_and_encoded() {
        let mut e = event();
        e.subject = Some("café \"x\" 100%".into());
        let headers = e.http_binary_headers();
        let get = |n: &str| {
            headers
                .iter()
                .find(|(k, _)| k.as_str() == n)
                .map(|(_, v)| v.to_str().expect("ascii").to_string())
        };
        assert_eq!(get("ce-id").as_deref(), Some("0190-a"));
        assert_eq!(
            get("ce-subject").as_deref(),
            Some("caf%C3%A9%20%22x%22%20100%25")
        );
        assert_eq!(get("content-type").as_deref(), Some("application/json"));
        assert_eq!(get("ce-data"), None);
    }

    #[test]
    fn a_stored_event_is_the_structured_json_of_its_envelope() {
        let mut e = event();
        e.subject = Some("caf\u{e9} \"x\"\n\u{1}".into());
        e.data = Some(serde_json::json!({"z": [1, 2.5, null], "a": "\u{2028}"}));
        let env = Envelope {
            sinks: Some(vec!["audit".into(), "bus".into()]),
            rule: "order-created".into(),
            event: e.clone(),
        };
        let payload = env.encode();
        let stored = StoredEvent::parse(&payload, Some("bus"))
            .expect("parses")
            .expect("for bus");
        assert_eq!(stored.json(), e.to_json().as_slice());
        assert_eq!(stored.json_bytes(), stored.json());
        assert_eq!(stored.decode().expect("decodes"), e);
        let view = stored.view().expect("view");
        assert_eq!((&*view.id, &*view.time), (e.id.as_str(), e.time.as_str()));
        assert!(StoredEvent::parse(&payload, Some("other"))
            .expect("parses")
            .is_none());
        assert!(StoredEvent::parse(&payload, None)
            .expect("parses")
            .is_some());
        let everyone = Envelope { sinks: None, ..env }.encode();
        assert!(StoredEvent::parse(&everyone, Some("x"))
            .expect("parses")
            .is_some());
    }

    /// What `Envelope::decode` refuses, `StoredEvent::parse` refuses, or `decode` does (then a
    /// sink that decodes refuses it for good): either way it goes to dead letters.
    #[test]
    fn a_stored_event_that_is_no_cloudevent_is_refused() {
        let good = serde_json::to_value(Envelope {
            sinks: None,
            rule: "r".into(),
            event: event(),
        })
        .expect("value");
        let mut cases: Vec<Vec<u8>> = vec![b"not json".to_vec(), b"{}".to_vec(), b"".to_vec()];
        for (pointer, value) in [
            ("/event/id", serde_json::Value::Null),
            ("/event/time", serde_json::json!(5)),
            ("/event/subject", serde_json::json!(["x"])),
            ("/event/ficustruncated", serde_json::json!("yes")),
            ("/rule", serde_json::json!(1)),
            ("/event", serde_json::json!("x")),
            ("/event", serde_json::json!([1])),
        ] {
            let mut bad = good.clone();
            let mut at = &mut bad;
            for key in pointer.split('/').skip(1) {
                at = &mut at[key];
            }
            *at = value;
            cases.push(serde_json::to_vec(&bad).expect("json"));
        }
        let mut no_id = good.clone();
        no_id["event"].as_object_mut().expect("object").remove("id");
        cases.push(serde_json::to_vec(&no_id).expect("json"));
        for case in cases {
            let text = String::from_utf8_lossy(&case).into_owned();
            assert!(Envelope::decode(&case).is_err(), "{text}");
            match StoredEvent::parse(&Bytes::from(case), None) {
                Err(_) => {}
                Ok(stored) => {
                    let stored = stored.expect("for every sink");
                    assert!(stored.decode().is_err(), "{text}");
                    assert!(stored.view().is_err(), "{text}");
                }
            }
        }
    }

    /// What [`StoredEvent::parse`] answers, comparably: the event's place, `None` when not
    /// for the sink, or an error.
    fn answer(
        parsed: Result<Option<StoredEvent>, serde_json::Error>,
    ) -> Result<Option<Range<usize>>, ()> {
        parsed.map(|s| s.map(|s| s.event)).map_err(|_| ())
    }

    /// Bytes worth putting into an envelope to break it, or not.
    const NOISE: &[u8] = b"{}[]\":,\\u0123456789aeE.- \t\nrtnl\x00\x1f\xc3\xa9\xff";

    /// Mostly names as ficus writes them, sometimes with characters that need escapes.
    fn text() -> impl proptest::strategy::Strategy<Value = String> {
        proptest::prop_oneof![
            3 => "[a-z\u{e9}\u{1F600}. -]{0,8}",
            1 => "[a-z\"\\\\\\x00-\\x1f\u{e9}\u{1F600} ]{0,8}",
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(2000))]

        /// The in-place read of the layout ficus writes against serde's, on envelopes with
        /// any strings, then with bytes changed: the same answer, refusals included, but for
        /// one case: the in-place read does not check the event's JSON (see
        /// [`StoredEvent::parse_written`]), so where serde refuses and it does not, what it
        /// took for the event must be what broke the envelope. (Its other exception, nesting
        /// past serde_json's limit, is out of these shallow envelopes' reach.)
        #[test]
        fn written_layout_reads_as_serde_reads_it(
            sinks in proptest::option::weighted(0.9, proptest::collection::vec(
                proptest::prop_oneof![text(), proptest::strategy::Just("audit".to_string())], 0..3)),
            (rule, subject, data) in (text(), text(), text()),
            with_data in proptest::bool::ANY,
            edits in proptest::collection::vec(
                (0usize..3, proptest::num::usize::ANY, proptest::sample::select(NOISE.to_vec())), 0..3),
            ask in proptest::option::of(proptest::prop_oneof![text(), proptest::strategy::Just("audit".to_string())]),
        ) {
            let mut e = event();
            e.subject = Some(subject);
            e.data = with_data.then(|| serde_json::json!({"note": data, "n": [1, -2.5, null]}));
            let env = Envelope { sinks, rule, event: e };
            let mut bytes = env.encode().to_vec();
            for (kind, at, byte) in edits {
                let at = at % (bytes.len() + 1);
                match kind {
                    0 => bytes.insert(at, byte),
                    1 if at < bytes.len() => bytes[at] = byte,
                    _ if at < bytes.len() => { bytes.remove(at); }
                    _ => {}
                }
            }
            let payload = Bytes::from(bytes);
            let sink = ask.as_deref();
            let fast = answer(StoredEvent::parse(&payload, sink));
            let serde = answer(StoredEvent::parse_any(&payload, sink));
            if let (Ok(_), Err(())) = (&fast, &serde) {
                // Whether for this sink or not: the event it took is not JSON.
                let event = StoredEvent::parse_written(&payload, None).flatten().map(|e| e.event);
                proptest::prop_assert!(
                    event.is_some_and(|e| serde_json::from_slice::<&RawValue>(&payload[e]).is_err()),
                    "{}", String::from_utf8_lossy(&payload)
                );
            } else {
                proptest::prop_assert_eq!(fast, serde, "{}", String::from_utf8_lossy(&payload));
            }
        }
    }

    /// Found by the property test above (CI, 2026-11-28): a space between the event's `}`
    /// and the envelope's was taken into the event, where serde leaves it out.
    #[test]
    fn whitespace_after_the_event_is_not_taken_into_it() {
        let env = Envelope {
            sinks: Some(vec!["audit".into()]),
            rule: String::new(),
            event: event(),
        };
        let mut bytes = env.encode().to_vec();
        let last = bytes.len() - 1;
        bytes.insert(last, b' ');
        let payload = Bytes::from(bytes);
        assert_eq!(
            answer(StoredEvent::parse(&payload, None)),
            answer(StoredEvent::parse_any(&payload, None))
        );
        assert!(answer(StoredEvent::parse(&payload, None)).is_ok_and(|e| e.is_some()));
    }

    #[test]
    fn the_written_layout_is_read_in_place() {
        let env = Envelope {
            sinks: Some(vec!["audit".into(), "bus".into()]),
            rule: "order-created".into(),
            event: event(),
        };
        let payload = env.encode();
        assert!(StoredEvent::parse_written(&payload, Some("bus")).is_some());
        let stored = StoredEvent::parse(&payload, Some("bus"))
            .expect("parses")
            .expect("for bus");
        assert_eq!(stored.json(), event().to_json().as_slice());
        assert!(StoredEvent::parse(&payload, Some("other"))
            .expect("parses")
            .is_none());
        // Not the written layout: serde reads it.
        let spaced = Bytes::from(serde_json::to_vec_pretty(&env).expect("json"));
        assert!(StoredEvent::parse_written(&spaced, Some("bus")).is_none());
        assert!(StoredEvent::parse(&spaced, Some("bus"))
            .expect("parses")
            .is_some());
    }

    #[test]
    fn envelope_round_trips_and_routes() {
        let env = Envelope {
            sinks: Some(vec!["audit".into()]),
            rule: "order-created".into(),
            event: event(),
        };
        let back = Envelope::decode(&env.encode()).expect("decode");
        assert_eq!(back, env);
        assert!(back.is_for("audit"));
        assert!(!back.is_for("bus"));
    }
}
