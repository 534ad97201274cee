//! `ficus rules test`: runs the configured rules over recorded request/response samples,
//! offline, and says for each sample which events it would emit, or why none.
//!
//! A samples file (YAML or JSON) is a list of:
//!
//! ```yaml
//! - name: create an order                # optional
//!   request:
//!     method: POST
//!     path: /orders?source=web
//!     headers: { content-type: application/json }
//!     body: { customer_id: c-42 }        # JSON value, or a string for a text body
//!   response:
//!     status: 201
//!     headers: { content-type: application/json }
//!     body: { id: 42, total: 99.5 }
//! ```
//!
//! A JSON `body` gets `content-type: application/json` unless the sample sets one.

use std::fmt::Write as _;
use std::time::SystemTime;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use http::Method;
use serde_json::Value;

use crate::config::Config;
use crate::events::build::{cloud_event, Context};
use crate::rules::{Captured, Exchange, Outcome};

#[derive(Debug, thiserror::Error)]
#[error("sample {index}{}: {message}", name.as_deref().map(|n| format!(" ({n})")).unwrap_or_default())]
pub struct SampleError {
    pub index: usize,
    pub name: Option<String>,
    pub message: String,
}

/// The report for every sample, and how many events they would emit in all.
pub fn run(config: &Config, samples: &Value) -> Result<(String, usize), SampleError> {
    let list = match samples {
        Value::Array(items) => items.as_slice(),
        _ => {
            return Err(SampleError {
                index: 0,
                name: None,
                message: "the samples file must be a list of samples".into(),
            })
        }
    };
    let mut out = String::new();
    let mut emitted = 0;
    for (i, sample) in list.iter().enumerate() {
        let index = i + 1;
        let name = sample
            .get("name")
            .and_then(Value::as_str)
            .map(str::to_string);
        let error = |message: String| SampleError {
            index,
            name: name.clone(),
            message,
        };
        let exchange = exchange(sample).map_err(error)?;
        let title = name
            .as_deref()
            .map(|n| format!(" ({n})"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "sample {index}{title}: {} {}{} -> {}",
            exchange.method,
            exchange.path,
            exchange
                .query
                .as_deref()
                .map(|q| format!("?{q}"))
                .unwrap_or_default(),
            exchange.status
        );
        let Some(events) = &config.events else {
            let _ = writeln!(out, "  no events: the config has no `events` section");
            continue;
        };
        let candidates = events.rules.candidates(&exchange.method, &exchange.path);
        if candidates.is_empty() {
            let _ = writeln!(
                out,
                "  no events: no rule matches {} {}",
                exchange.method, exchange.path
            );
            continue;
        }
        let traceparent = Some(exchange.request_headers.get_all("traceparent"))
            .filter(|all| all.iter().count() == 1)
            .and_then(|all| all.iter().next())
            .and_then(|v| v.to_str().ok())
            .filter(|t| crate::events::build::valid_traceparent(t))
            .map(str::to_string);
        let upstream = config
            .upstreams
            .get(config.default_upstream)
            .map_or("", |u| u.name.as_str());
        let ctx = Context {
            default_source: &events.source,
            upstream,
            seen_at: SystemTime::now(),
            traceparent: traceparent.as_deref(),
        };
        for outcome in events.rules.evaluate(&candidates, exchange) {
            match outcome {
                Outcome::Emit(draft) => {
                    emitted += 1;
                    let rule = draft.rule.clone();
                    let sinks = draft
                        .sinks
                        .clone()
                        .map_or_else(|| "every sink".to_string(), |s| s.join(", "));
                    let event = cloud_event(draft, &ctx);
                    let pretty = serde_json::to_string_pretty(&event).unwrap_or_default();
                    let _ = writeln!(out, "  rule {rule}: emits {} to {sinks}", event.ty);
                    for line in pretty.lines() {
                        let _ = writeln!(out, "    {line}");
                    }
                }
                Outcome::Skipped { rule, reason } => {
                    let _ = writeln!(out, "  rule {rule}: no event: {reason}");
                }
            }
        }
    }
    let _ = writeln!(out, "{} sample(s), {emitted} event(s)", list.len());
    Ok((out, emitted))
}

fn exchange(sample: &Value) -> Result<Exchange, String> {
    let request = sample.get("request").ok_or("missing `request`")?;
    let response = sample.get("response").ok_or("missing `response`")?;
    let method = request
        .get("method")
        .and_then(Value::as_str)
        .unwrap_or("GET");
    let method = Method::from_bytes(method.to_ascii_uppercase().as_bytes())
        .map_err(|_| format!("request.method: not an HTTP method: `{method}`"))?;
    let path = request
        .get("path")
        .and_then(Value::as_str)
        .ok_or("request.path is required")?;
    if !path.starts_with('/') {
        return Err(format!("request.path must start with `/`, found `{path}`"));
    }
    let status = match response.get("status") {
        Some(Value::Number(n)) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
        Some(Value::String(s)) => s.parse().ok(),
        None => Some(200),
        _ => None,
    }
    .filter(|s| (100..=599).contains(s))
    .ok_or("response.status must be a code from 100 to 599")?;
    let mut ex = Exchange::new(method, path, status);
    ex.request_headers = headers(request.get("headers"), "request.headers")?;
    ex.response_headers = headers(response.get("headers"), "response.headers")?;
    ex.request_body = body(request.get("body"), &mut ex.request_headers);
    ex.response_body = body(response.get("body"), &mut ex.response_headers);
    Ok(ex)
}

fn headers(value: Option<&Value>, what: &str) -> Result<HeaderMap, String> {
    let mut map = HeaderMap::new();
    let Some(value) = value else { return Ok(map) };
    let Value::Object(entries) = value else {
        return Err(format!("{what} must be a mapping of names to values"));
    };
    for (name, v) in entries {
        let text = match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let name = HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
            .map_err(|_| format!("{what}: invalid header name `{name}`"))?;
        let v = HeaderValue::from_str(&text)
            .map_err(|_| format!("{what}.{name}: invalid header value"))?;
        map.append(name, v);
    }
    Ok(map)
}

fn body(value: Option<&Value>, headers: &mut HeaderMap) -> Captured {
    match value {
        None | Some(Value::Null) => Captured::empty(),
        Some(Value::String(text)) => {
            Captured::new(Bytes::from(text.clone()), headers.get(CONTENT_TYPE), false)
        }
        Some(json) => {
            if !headers.contains_key(CONTENT_TYPE) {
                headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            }
            let bytes = Bytes::from(serde_json::to_vec(json).unwrap_or_default());
            Captured::new(bytes, headers.get(CONTENT_TYPE), false)
        }
    }
}
