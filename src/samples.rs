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
//! A JSON `body` gets `content-type: application/json` unless the sample sets one. `method`
//! defaults to GET, `status` to 200. Unknown keys are errors, and so is every other problem:
//! all are reported at once, each where it is, as `FILE:LINE:COLUMN: sample N: key.path:
//! message`, samples numbered from 1 as the report numbers them.

use std::fmt::Write as _;
use std::time::SystemTime;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use http::Method;
use serde_json::Value as Json;

use crate::config::decode::{join, Decoder};
use crate::config::yaml::{Node, Value};
use crate::config::{data_tree, to_json, Config, LoadError};
use crate::events::build::{cloud_event, Context};
use crate::rules::{Captured, Exchange, Outcome};

/// One recorded exchange to run the rules over.
#[derive(Debug)]
pub struct Sample {
    pub name: Option<String>,
    pub exchange: Exchange,
}

/// Reads a samples file (YAML or JSON; `$` is taken literally).
pub fn load(text: &str, file: &str) -> Result<Vec<Sample>, LoadError> {
    let root = data_tree(text, file)?;
    let no_env = |_: &str| None;
    let mut d = Decoder::new(file, &no_env);
    let Value::Seq(items) = &root.value else {
        d.error(
            root.mark,
            "",
            format!("expected a list of samples, found {}", root.kind()),
        );
        return Err(LoadError::Invalid(d.errors));
    };
    let mut samples = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let first = d.errors.len();
        let sample = decode_sample(&mut d, item);
        let title = format!(
            "sample {}{}",
            i + 1,
            item.scalar("name")
                .map(|n| format!(" ({n})"))
                .unwrap_or_default()
        );
        for e in d.errors.iter_mut().skip(first) {
            e.path = if e.path.is_empty() {
                title.clone()
            } else {
                format!("{title}: {}", e.path)
            };
        }
        samples.extend(sample);
    }
    if d.errors.is_empty() {
        Ok(samples)
    } else {
        let mut errors = d.errors;
        errors.sort_by_key(|e| (e.line, e.col));
        Err(LoadError::Invalid(errors))
    }
}

fn decode_sample(d: &mut Decoder<'_>, node: &Node) -> Option<Sample> {
    let f = d.map(node, "", &["name", "request", "response"])?;
    let name = f.get("name").and_then(|n| d.string(n, "name"));
    let request = match f.get("request") {
        Some(n) => d.map(n, "request", &["method", "path", "headers", "body"]),
        None => {
            d.error(f.mark, "request", "is required");
            None
        }
    };
    let response = match f.get("response") {
        Some(n) => d.map(n, "response", &["status", "headers", "body"]),
        None => {
            d.error(f.mark, "response", "is required");
            None
        }
    };
    let request = request?;
    let response = response?;
    let method = d.field(&request, "request", "method", Method::GET, |s| {
        Method::from_bytes(s.to_ascii_uppercase().as_bytes())
            .map_err(|_| format!("not an HTTP method: `{s}`"))
    });
    let path = match request.get("path") {
        Some(n) => d.parse(n, "request.path", |s| {
            if s.starts_with('/') {
                Ok(s.to_string())
            } else {
                Err(format!("must start with `/`, found `{s}`"))
            }
        }),
        None => {
            d.error(request.mark, "request.path", "is required");
            None
        }
    };
    let status = d.field(&response, "response", "status", 200, |s| {
        s.parse::<u16>()
            .ok()
            .filter(|s| (100..=599).contains(s))
            .ok_or_else(|| format!("expected a status code from 100 to 599, found `{s}`"))
    });
    let mut request_headers = headers(d, request.get("headers"), "request.headers");
    let mut response_headers = headers(d, response.get("headers"), "response.headers");
    let request_body = request
        .get("body")
        .and_then(|n| to_json(d, n, "request.body"));
    let response_body = response
        .get("body")
        .and_then(|n| to_json(d, n, "response.body"));
    let mut exchange = Exchange::new(method, &path?, status);
    exchange.request_body = body(request_body, &mut request_headers);
    exchange.response_body = body(response_body, &mut response_headers);
    exchange.request_headers = request_headers;
    exchange.response_headers = response_headers;
    Some(Sample { name, exchange })
}

fn headers(d: &mut Decoder<'_>, node: Option<&Node>, path: &str) -> HeaderMap {
    let mut map = HeaderMap::new();
    let Some(entries) = node.and_then(|n| d.named(n, path)) else {
        return map;
    };
    for (key, value) in entries {
        let vpath = join(path, &key.name);
        let Ok(name) = HeaderName::from_bytes(key.name.to_ascii_lowercase().as_bytes()) else {
            d.error(key.mark, &vpath, "not a valid header name");
            continue;
        };
        if let Some(v) = d.parse(value, &vpath, |s| {
            HeaderValue::from_str(s).map_err(|_| "not a valid header value".to_string())
        }) {
            map.append(name, v);
        }
    }
    map
}

/// The report for every sample, and how many events they would emit in all.
pub fn run(config: &Config, samples: Vec<Sample>) -> (String, usize) {
    let count = samples.len();
    let mut out = String::new();
    let mut emitted = 0;
    for (i, Sample { name, exchange }) in samples.into_iter().enumerate() {
        let index = i + 1;
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
    let _ = writeln!(out, "{count} sample(s), {emitted} event(s)");
    (out, emitted)
}

fn body(value: Option<Json>, headers: &mut HeaderMap) -> Captured {
    match value {
        None | Some(Json::Null) => Captured::empty(),
        Some(Json::String(text)) => {
            Captured::new(Bytes::from(text), headers.get(CONTENT_TYPE), false)
        }
        Some(json) => {
            if !headers.contains_key(CONTENT_TYPE) {
                headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            }
            let bytes = Bytes::from(serde_json::to_vec(&json).unwrap_or_default());
            Captured::new(bytes, headers.get(CONTENT_TYPE), false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> Vec<String> {
        match load(text, "s.yaml") {
            Ok(samples) => panic!("valid: {samples:?}"),
            Err(LoadError::Invalid(list)) => list.iter().map(ToString::to_string).collect(),
            Err(other) => vec![other.to_string()],
        }
    }

    #[test]
    fn samples_decode_with_defaults() {
        let samples = load(
            concat!(
                "- name: create\n",
                "  request: { method: post, path: \"/orders?x=${HOME}\", body: { a: 1 } }\n",
                "  response: { status: 201, headers: { x-id: 7 }, body: ok }\n",
                "- request: { path: /o }\n",
                "  response: {}\n",
            ),
            "s.yaml",
        )
        .expect("valid");
        assert_eq!(samples.len(), 2);
        let ex = &samples[0].exchange;
        assert_eq!(samples[0].name.as_deref(), Some("create"));
        assert_eq!(
            (&ex.method, ex.path.as_str(), ex.status),
            (&Method::POST, "/orders", 201)
        );
        assert_eq!(ex.query.as_deref(), Some("x=${HOME}"), "`$` is literal");
        assert_eq!(ex.request_body.value(), &serde_json::json!({"a": 1}));
        assert_eq!(
            ex.response_headers.get("x-id").map(|v| v.as_bytes()),
            Some(&b"7"[..])
        );
        assert_eq!(ex.response_body.value(), &Json::String("ok".into()));
        let ex = &samples[1].exchange;
        assert_eq!((&ex.method, ex.status), (&Method::GET, 200));
    }

    #[test]
    fn every_problem_is_located_and_unknown_keys_are_errors() {
        let errors = errors(concat!(
            "- name: create\n",
            "  request: { path: /orders, methd: POST }\n",
            "  response: { staus: 201 }\n",
            "- request: { path: orders, headers: { \"bad name\": x } }\n",
            "  response: { status: 99 }\n",
            "  extra: 1\n",
            "- 42\n",
        ));
        let expected = [
            "s.yaml:2:29: sample 1 (create): request.methd: unknown key (expected one of: method, path, headers, body)",
            "s.yaml:3:15: sample 1 (create): response.staus: unknown key (expected one of: status, headers, body)",
            "s.yaml:4:20: sample 2: request.path: must start with `/`, found `orders`",
            "s.yaml:4:39: sample 2: request.headers.bad name: not a valid header name",
            "s.yaml:5:23: sample 2: response.status: expected a status code from 100 to 599, found `99`",
            "s.yaml:6:3: sample 2: extra: unknown key",
            "s.yaml:7:3: sample 3: expected a mapping, found a scalar",
        ];
        crate::config::tests::assert_errors(&errors, &expected);
    }

    #[test]
    fn a_file_that_is_not_a_list_is_one_located_error() {
        assert_eq!(
            errors("request: { path: / }\n"),
            ["s.yaml:1:1: (top level): expected a list of samples, found a mapping"]
        );
        let syntax = errors("- request: [\n");
        assert!(
            syntax.len() == 1 && syntax[0].starts_with("s.yaml:"),
            "{syntax:?}"
        );
    }
}
