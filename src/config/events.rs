//! The event path's sections: `events` (rules), `sinks` and `outbox`. Rules are compiled here
//! (path templates, expressions, CEL), so a bad expression is reported at its place in the
//! file like any other config error.

use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::Method;

use super::decode::{join, parse_bool, parse_duration, parse_size, Decoder};
use super::yaml::{Node, Value};
use super::{valid_name, UpstreamTls};
use crate::dispatch::Retry;
use crate::outbox::{Durability, WhenFull};
use crate::rules::{
    Condition, DataTemplate, PathTemplate, Redactor, Rule, RuleSet, StatusMatch, Template,
};
use crate::sinks::http::{HttpMode, HttpSinkSettings};

/// The compiled rules and the default `source`.
#[derive(Clone)]
pub struct Events {
    pub source: String,
    pub rules: Arc<RuleSet>,
}

impl fmt::Debug for Events {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Events")
            .field("source", &self.source)
            .field("rules", &self.rules.rules().len())
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct SinkConfig {
    pub name: String,
    pub kind: SinkKind,
}

#[derive(Debug, Clone)]
pub enum SinkKind {
    File { path: PathBuf },
    Stdout,
    Http(Box<HttpSinkSettings>),
}

impl SinkKind {
    pub fn type_name(&self) -> &'static str {
        match self {
            SinkKind::File { .. } => "file",
            SinkKind::Stdout => "stdout",
            SinkKind::Http(_) => "http",
        }
    }
}

#[derive(Debug, Clone)]
pub struct OutboxConfig {
    pub dir: PathBuf,
    pub durability: Durability,
    pub max_bytes: u64,
    pub when_full: WhenFull,
    pub retry: Retry,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig {
            dir: PathBuf::from("/var/lib/ficus/outbox"),
            durability: Durability::Sync,
            max_bytes: 1 << 30,
            when_full: WhenFull::Reject,
            retry: Retry {
                initial: Duration::from_millis(100),
                max: Duration::from_secs(30),
            },
        }
    }
}

/// The default CloudEvents `source` when `events.source` is left out.
pub const DEFAULT_SOURCE: &str = "/ficus";

/// Sink types of the SPEC that this build does not have yet.
const SINK_TYPES_NOT_YET: &[&str] = &["nats", "redis", "kafka", "amqp"];

pub(super) fn decode_sinks(d: &mut Decoder<'_>, node: Option<&Node>) -> Vec<SinkConfig> {
    let Some(node) = node else {
        return Vec::new();
    };
    let Some(entries) = d.named(node, "sinks") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (key, node) in entries {
        let path = join("sinks", &key.name);
        if !valid_name(&key.name) {
            d.error(
                key.mark,
                &path,
                "names may use letters, digits, `-` and `_` only",
            );
        }
        let Value::Map(fields) = &node.value else {
            d.error(
                node.mark,
                &path,
                format!("expected a mapping with a `type`, found {}", node.kind()),
            );
            continue;
        };
        let ty = fields
            .iter()
            .find(|(k, _)| k.name == "type")
            .map(|(_, n)| n);
        let Some(ty_node) = ty else {
            d.error(
                node.mark,
                &join(&path, "type"),
                "is required (file, stdout or http)",
            );
            continue;
        };
        let Some(ty) = d.string(ty_node, &join(&path, "type")) else {
            continue;
        };
        let kind = match ty.as_str() {
            "file" => {
                let Some(f) = d.map(node, &path, &["type", "path"]) else {
                    continue;
                };
                match f.get("path") {
                    Some(n) => d.string(n, &join(&path, "path")).map(|p| SinkKind::File {
                        path: PathBuf::from(p),
                    }),
                    None => {
                        d.error(f.mark, &join(&path, "path"), "is required");
                        None
                    }
                }
            }
            "stdout" => d.map(node, &path, &["type"]).map(|_| SinkKind::Stdout),
            "http" => {
                decode_http_sink(d, node, &path, &key.name).map(|s| SinkKind::Http(Box::new(s)))
            }
            other if SINK_TYPES_NOT_YET.contains(&other) => {
                d.error(
                    ty_node.mark,
                    &join(&path, "type"),
                    format!("sink type `{other}` is not supported by ficus {} yet (file, stdout, http are)", env!("CARGO_PKG_VERSION")),
                );
                None
            }
            other => {
                d.error(
                    ty_node.mark,
                    &join(&path, "type"),
                    format!("unknown sink type `{other}` (expected file, stdout or http)"),
                );
                None
            }
        };
        if let Some(kind) = kind {
            out.push(SinkConfig {
                name: key.name.clone(),
                kind,
            });
        }
    }
    out
}

fn decode_http_sink(
    d: &mut Decoder<'_>,
    node: &Node,
    path: &str,
    name: &str,
) -> Option<HttpSinkSettings> {
    let f = d.map(
        node,
        path,
        &["type", "url", "mode", "headers", "timeout", "tls"],
    )?;
    let url = match f.get("url") {
        Some(n) => d.parse(n, &join(path, "url"), |s| {
            let uri: http::Uri = s.parse().map_err(|e| format!("invalid URL `{s}`: {e}"))?;
            match (uri.scheme_str(), uri.authority()) {
                (Some("http" | "https"), Some(_)) => Ok(uri),
                _ => Err(format!("expected an http:// or https:// URL, found `{s}`")),
            }
        }),
        None => {
            d.error(f.mark, &join(path, "url"), "is required");
            None
        }
    };
    let mode = d.field(&f, path, "mode", HttpMode::Binary, |s| match s {
        "binary" => Ok(HttpMode::Binary),
        "structured" => Ok(HttpMode::Structured),
        "batch" => Ok(HttpMode::Batch),
        _ => Err(format!("expected binary, structured or batch, found `{s}`")),
    });
    let timeout = d.field(&f, path, "timeout", Duration::from_secs(10), parse_duration);
    let mut headers = Vec::new();
    if let Some(h) = f.get("headers") {
        let hpath = join(path, "headers");
        if let Some(entries) = d.named(h, &hpath) {
            for (key, value) in entries {
                let vpath = join(&hpath, &key.name);
                let Ok(name) = HeaderName::from_bytes(key.name.as_bytes()) else {
                    d.error(key.mark, &vpath, "not a valid header name");
                    continue;
                };
                if let Some(v) = d.parse(value, &vpath, |s| {
                    HeaderValue::from_str(s).map_err(|_| "not a valid header value".to_string())
                }) {
                    headers.push((name, v));
                }
            }
        }
    }
    let tls = f
        .get("tls")
        .and_then(|n| {
            let tpath = join(path, "tls");
            let t = d.map(n, &tpath, &["ca", "cert", "key"])?;
            let get = |d: &mut Decoder<'_>, k: &str| {
                t.get(k)
                    .and_then(|n| d.string(n, &join(&tpath, k)))
                    .map(PathBuf::from)
            };
            Some(UpstreamTls {
                ca: get(d, "ca"),
                cert: get(d, "cert"),
                key: get(d, "key"),
            })
        })
        .unwrap_or_default();
    Some(HttpSinkSettings {
        name: name.to_string(),
        url: url?,
        mode,
        headers,
        timeout,
        tls,
    })
}

pub(super) fn decode_outbox(d: &mut Decoder<'_>, node: Option<&Node>) -> OutboxConfig {
    let mut o = OutboxConfig::default();
    let Some(node) = node else { return o };
    let Some(f) = d.map(
        node,
        "outbox",
        &["dir", "durability", "max_bytes", "when_full", "retry"],
    ) else {
        return o;
    };
    if let Some(n) = f.get("dir") {
        if let Some(dir) = d.string(n, "outbox.dir") {
            o.dir = PathBuf::from(dir);
        }
    }
    o.durability = d.field(&f, "outbox", "durability", Durability::Sync, |s| match s {
        "sync" => Ok(Durability::Sync),
        "async" => Ok(Durability::Async),
        _ => Err(format!("expected sync or async, found `{s}`")),
    });
    o.max_bytes = d.field(&f, "outbox", "max_bytes", o.max_bytes, |s| {
        let n = parse_size(s)?;
        if n < 1 << 20 {
            return Err(format!("must be at least 1MiB, found `{s}`"));
        }
        Ok(n)
    });
    o.when_full = d.field(&f, "outbox", "when_full", WhenFull::Reject, |s| match s {
        "reject" => Ok(WhenFull::Reject),
        "drop" => Ok(WhenFull::Drop),
        _ => Err(format!("expected reject or drop, found `{s}`")),
    });
    if let Some(n) = f.get("retry") {
        if let Some(r) = d.map(n, "outbox.retry", &["initial", "max"]) {
            o.retry.initial = d.field(
                &r,
                "outbox.retry",
                "initial",
                o.retry.initial,
                parse_duration,
            );
            o.retry.max = d.field(&r, "outbox.retry", "max", o.retry.max, parse_duration);
            if o.retry.initial > o.retry.max || o.retry.initial.is_zero() {
                d.error(r.mark, "outbox.retry", "needs 0 < initial <= max");
            }
        }
    }
    o
}

const RULE_KEYS: &[&str] = &[
    "name",
    "match",
    "if",
    "type",
    "source",
    "subject",
    "partition_key",
    "id",
    "sequence",
    "data",
    "sinks",
];

pub(super) fn decode_events(
    d: &mut Decoder<'_>,
    node: Option<&Node>,
    sinks: &[SinkConfig],
) -> Option<Events> {
    let node = node?;
    let f = d.map(node, "events", &["source", "rules", "redact"])?;
    let source = f
        .get("source")
        .and_then(|n| d.string(n, "events.source"))
        .unwrap_or_else(|| DEFAULT_SOURCE.to_string());
    let redact = match f.get("redact") {
        Some(n) => {
            let items = strings(d, n, "events.redact");
            let texts: Vec<String> = items.iter().map(|(s, _)| s.clone()).collect();
            match Redactor::parse(&texts) {
                Ok(r) => r,
                Err((i, msg)) => {
                    let mark = items.get(i).map_or(n.mark, |(_, m)| *m);
                    d.error(mark, &format!("events.redact[{i}]"), msg);
                    Redactor::default()
                }
            }
        }
        None => Redactor::default(),
    };
    let mut rules = Vec::new();
    let mut names = HashSet::new();
    if let Some(list) = f.get("rules") {
        match &list.value {
            Value::Seq(items) => {
                for (i, item) in items.iter().enumerate() {
                    let path = format!("events.rules[{i}]");
                    if let Some(rule) = decode_rule(d, item, &path, sinks) {
                        if !names.insert(rule.name.clone()) {
                            d.error(
                                item.mark,
                                &join(&path, "name"),
                                format!("duplicate rule name `{}`", rule.name),
                            );
                        }
                        rules.push(rule);
                    }
                }
            }
            _ => d.error(
                list.mark,
                "events.rules",
                format!("expected a list of rules, found {}", list.kind()),
            ),
        }
    }
    if !rules.is_empty() && sinks.is_empty() {
        d.error(
            node.mark,
            "sinks",
            "rules need at least one sink to deliver their events to",
        );
    }
    let rules = match RuleSet::new(rules, redact) {
        Ok(r) => r,
        Err(error) => {
            d.error(node.mark, "events.rules", error.to_string());
            return None;
        }
    };
    Some(Events {
        source,
        rules: Arc::new(rules),
    })
}

fn strings(d: &mut Decoder<'_>, node: &Node, path: &str) -> Vec<(String, super::yaml::Mark)> {
    match &node.value {
        Value::Seq(items) => items
            .iter()
            .enumerate()
            .filter_map(|(i, n)| d.string(n, &format!("{path}[{i}]")).map(|s| (s, n.mark)))
            .collect(),
        _ => {
            d.error(
                node.mark,
                path,
                format!("expected a list, found {}", node.kind()),
            );
            Vec::new()
        }
    }
}

fn template(d: &mut Decoder<'_>, node: Option<&Node>, path: &str) -> Option<Template> {
    node.and_then(|n| d.parse(n, path, Template::parse))
}

fn decode_rule(d: &mut Decoder<'_>, node: &Node, path: &str, sinks: &[SinkConfig]) -> Option<Rule> {
    let f = d.map(node, path, RULE_KEYS)?;
    let name = match f.get("name") {
        Some(n) => d.parse(n, &join(path, "name"), |s| {
            if valid_name(s) {
                Ok(s.to_string())
            } else {
                Err("names may use letters, digits, `-` and `_` only".into())
            }
        }),
        None => {
            d.error(f.mark, &join(path, "name"), "is required");
            None
        }
    };
    let mpath = join(path, "match");
    let (method, route, status) = match f.get("match") {
        Some(m) => match d.map(m, &mpath, &["method", "path", "status"]) {
            Some(mf) => {
                let method = mf.get("method").and_then(|n| {
                    d.parse(n, &join(&mpath, "method"), |s| {
                        Method::from_bytes(s.to_ascii_uppercase().as_bytes())
                            .map_err(|_| format!("not an HTTP method: `{s}`"))
                    })
                });
                let route = match mf.get("path") {
                    Some(n) => d.parse(n, &join(&mpath, "path"), PathTemplate::parse),
                    None => {
                        d.error(mf.mark, &join(&mpath, "path"), "is required");
                        None
                    }
                };
                let status = match mf.get("status") {
                    Some(n) => decode_status(d, n, &join(&mpath, "status")),
                    None => Some(StatusMatch::default_2xx()),
                };
                (method, route, status)
            }
            None => (None, None, None),
        },
        None => {
            d.error(f.mark, &mpath, "is required (at least `path`)");
            (None, None, None)
        }
    };
    let condition = f
        .get("if")
        .and_then(|n| d.parse(n, &join(path, "if"), Condition::compile));
    let ty = match f.get("type") {
        Some(n) => template(d, Some(n), &join(path, "type")),
        None => {
            d.error(f.mark, &join(path, "type"), "is required");
            None
        }
    };
    let source = template(d, f.get("source"), &join(path, "source"));
    let subject = template(d, f.get("subject"), &join(path, "subject"));
    let partition_key = template(d, f.get("partition_key"), &join(path, "partition_key"));
    let id = template(d, f.get("id"), &join(path, "id"));
    let sequence = template(d, f.get("sequence"), &join(path, "sequence"));
    let data = f.get("data").and_then(|n| {
        let dpath = join(path, "data");
        let json = to_json(d, n, &dpath)?;
        match DataTemplate::from_json(&json) {
            Ok(t) => Some(t),
            Err(msg) => {
                d.error(n.mark, &dpath, msg);
                None
            }
        }
    });
    let rule_sinks = f.get("sinks").map(|n| {
        let spath = join(path, "sinks");
        let list = strings(d, n, &spath);
        for (i, (s, mark)) in list.iter().enumerate() {
            if !sinks.iter().any(|k| &k.name == s) {
                let known: Vec<&str> = sinks.iter().map(|k| k.name.as_str()).collect();
                d.error(
                    *mark,
                    &format!("{spath}[{i}]"),
                    format!("no sink named `{s}` (known: {})", known.join(", ")),
                );
            }
        }
        list.into_iter().map(|(s, _)| s).collect::<Vec<_>>()
    });
    let rule = Rule {
        name: name?,
        method,
        path: route?,
        status: status?,
        condition,
        ty: ty?,
        source,
        subject,
        partition_key,
        id,
        sequence,
        data,
        sinks: rule_sinks,
    };
    for (key, message) in rule.check() {
        let mark = f.get(key).map_or(f.mark, |n| n.mark);
        d.error(mark, &join(path, key), message);
    }
    Some(rule)
}

fn decode_status(d: &mut Decoder<'_>, node: &Node, path: &str) -> Option<StatusMatch> {
    match &node.value {
        Value::Seq(_) => {
            let items: Vec<StatusMatch> = strings(d, node, path)
                .into_iter()
                .enumerate()
                .filter_map(|(i, (s, mark))| match StatusMatch::parse_one(&s) {
                    Ok(m) => Some(m),
                    Err(msg) => {
                        d.error(mark, &format!("{path}[{i}]"), msg);
                        None
                    }
                })
                .collect();
            match StatusMatch::list(items) {
                Ok(m) => Some(m),
                Err(msg) => {
                    d.error(node.mark, path, msg);
                    None
                }
            }
        }
        _ => d.parse(node, path, StatusMatch::parse_one),
    }
}

/// A YAML subtree as JSON: plain scalars that read as numbers, booleans or null keep that
/// type; quoted scalars stay strings.
pub(super) fn to_json(d: &mut Decoder<'_>, node: &Node, path: &str) -> Option<serde_json::Value> {
    use serde_json::Value as J;
    Some(match &node.value {
        Value::Null => J::Null,
        Value::Scalar(text) if node.plain => {
            if let Ok(b) = parse_bool(text) {
                J::Bool(b)
            } else if let Ok(i) = text.parse::<i64>() {
                J::from(i)
            } else if let Some(f) = text
                .parse::<f64>()
                .ok()
                .and_then(serde_json::Number::from_f64)
            {
                J::Number(f)
            } else {
                J::String(d.string(node, path)?)
            }
        }
        Value::Scalar(_) => J::String(d.string(node, path)?),
        Value::Seq(items) => J::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, n)| to_json(d, n, &format!("{path}[{i}]")))
                .collect::<Option<Vec<_>>>()?,
        ),
        Value::Map(entries) => {
            let mut map = serde_json::Map::new();
            for (k, n) in entries {
                map.insert(k.name.clone(), to_json(d, n, &join(path, &k.name))?);
            }
            J::Object(map)
        }
    })
}
