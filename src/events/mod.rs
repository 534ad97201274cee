//! The CloudEvents 1.0 model ficus emits, the envelope it is stored in in the outbox, and the
//! protocol-binding encodings sinks use (HTTP binary, structured and batch; JSON Lines).

pub mod build;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};

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
const ENCODE_CAPACITY: usize = 768;

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
