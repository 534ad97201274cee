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
    Condition, DataTemplate, KeyStep, PathTemplate, Redactor, Rule, RuleSet, StatusMatch, Template,
};
use crate::sinks::amqp::{self, AmqpSinkSettings};
use crate::sinks::http::{HttpMode, HttpSinkSettings};
use crate::sinks::kafka::{self, KafkaSasl, KafkaSinkSettings, SaslMechanism};
use crate::sinks::nats::{self, NatsAuth, NatsSinkSettings};
use crate::sinks::redis::{self, RedisSinkSettings};
use crate::sinks::template::AttributeTemplate;

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

#[derive(Debug, Clone, PartialEq)]
pub struct SinkConfig {
    pub name: String,
    pub kind: SinkKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum SinkKind {
    File { path: PathBuf },
    Stdout,
    Http(Box<HttpSinkSettings>),
    Nats(Box<NatsSinkSettings>),
    Redis(Box<RedisSinkSettings>),
    Amqp(Box<AmqpSinkSettings>),
    Kafka(Box<KafkaSinkSettings>),
}

impl SinkKind {
    pub fn type_name(&self) -> &'static str {
        match self {
            SinkKind::File { .. } => "file",
            SinkKind::Stdout => "stdout",
            SinkKind::Http(_) => "http",
            SinkKind::Nats(_) => "nats",
            SinkKind::Redis(_) => "redis",
            SinkKind::Amqp(_) => "amqp",
            SinkKind::Kafka(_) => "kafka",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
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

/// The sink types this build has, for messages.
const SINK_TYPES: &str = "file, stdout, http, nats, redis, amqp or kafka";

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
                format!("is required ({SINK_TYPES})"),
            );
            continue;
        };
        let Some(ty) = d.string(ty_node, &join(&path, "type")) else {
            continue;
        };
        let kind =
            match ty.as_str() {
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
                "nats" => {
                    decode_nats_sink(d, node, &path, &key.name).map(|s| SinkKind::Nats(Box::new(s)))
                }
                "redis" => decode_redis_sink(d, node, &path, &key.name)
                    .map(|s| SinkKind::Redis(Box::new(s))),
                "amqp" => {
                    decode_amqp_sink(d, node, &path, &key.name).map(|s| SinkKind::Amqp(Box::new(s)))
                }
                "kafka" => decode_kafka_sink(d, node, &path, &key.name)
                    .map(|s| SinkKind::Kafka(Box::new(s))),
                other => {
                    d.error(
                        ty_node.mark,
                        &join(&path, "type"),
                        format!("unknown sink type `{other}` (expected {SINK_TYPES})"),
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
        Some(n) => d.parse(n, &join(path, "url"), super::parse_http_url),
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
    let timeout = d.timeout(&f, path, "timeout", Duration::from_secs(10));
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

/// `tls: { ca, cert, key }` as for upstreams; `cert` and `key` go together.
fn decode_tls_files(d: &mut Decoder<'_>, node: &Node, tpath: &str) -> Option<UpstreamTls> {
    let t = d.map(node, tpath, &["ca", "cert", "key"])?;
    let get = |d: &mut Decoder<'_>, k: &str| {
        t.get(k)
            .and_then(|n| d.string(n, &join(tpath, k)))
            .map(PathBuf::from)
    };
    let tls = UpstreamTls {
        ca: get(d, "ca"),
        cert: get(d, "cert"),
        key: get(d, "key"),
    };
    if tls.cert.is_some() != tls.key.is_some() {
        d.error(t.mark, tpath, "`cert` and `key` go together");
    }
    Some(tls)
}

fn required<'n>(
    d: &mut Decoder<'_>,
    f: &super::decode::Fields<'n>,
    path: &str,
    key: &str,
) -> Option<&'n Node> {
    let node = f.get(key);
    if node.is_none() {
        d.error(f.mark, &join(path, key), "is required");
    }
    node
}

/// A sink-setting template over the event's attributes (`{type}`, `{subject}`, `{source}`,
/// `{partitionkey}`).
fn attribute_template(d: &mut Decoder<'_>, node: &Node, path: &str) -> Option<AttributeTemplate> {
    d.parse(node, path, AttributeTemplate::parse)
}

fn decode_nats_sink(
    d: &mut Decoder<'_>,
    node: &Node,
    path: &str,
    name: &str,
) -> Option<NatsSinkSettings> {
    let f = d.map(
        node,
        path,
        &[
            "type",
            "url",
            "subject",
            "jetstream",
            "create_stream",
            "token",
            "user",
            "password",
            "creds",
            "tls",
            "timeout",
        ],
    )?;
    let servers = required(d, &f, path, "url").and_then(|n| {
        d.parse(n, &join(path, "url"), |s| {
            let servers: Vec<String> = s.split(',').map(|u| u.trim().to_string()).collect();
            for server in &servers {
                nats::parse_server(server)?;
            }
            Ok(servers)
        })
    });
    let subject_node = required(d, &f, path, "subject");
    let subject = subject_node.and_then(|n| {
        d.parse(n, &join(path, "subject"), |s| {
            let t = AttributeTemplate::parse(s)?;
            let fixed_ok = t.literals().all(|l| {
                !l.chars()
                    .any(|c| c.is_whitespace() || c.is_control() || c == '*' || c == '>')
            });
            if !fixed_ok || t.as_literal().is_some_and(|l| !nats::valid_subject(l)) {
                return Err(format!(
                    "`{s}` cannot make a valid NATS subject (no spaces, wildcards or empty tokens)"
                ));
            }
            Ok(t)
        })
    });
    let jetstream = d.field(&f, path, "jetstream", true, super::decode::parse_bool);
    let create_stream = f.get("create_stream").and_then(|n| {
        let cpath = join(path, "create_stream");
        let stream = d.parse(n, &cpath, |s| {
            if nats::valid_stream_name(s) {
                Ok(s.to_string())
            } else {
                Err(format!(
                    "`{s}` is not a stream name (letters, digits, `-` and `_`)"
                ))
            }
        })?;
        if !jetstream {
            d.error(n.mark, &cpath, "needs `jetstream: true`");
        }
        if let Some(t) = &subject {
            if let Err(msg) = nats::stream_subjects(t) {
                d.error(
                    subject_node.map_or(n.mark, |s| s.mark),
                    &join(path, "subject"),
                    msg,
                );
            }
        }
        Some(stream)
    });
    let secret =
        |d: &mut Decoder<'_>, key: &str| f.get(key).and_then(|n| d.string(n, &join(path, key)));
    let token = secret(d, "token");
    let user = secret(d, "user");
    let password = secret(d, "password");
    let creds = secret(d, "creds").map(PathBuf::from);
    let auth = match (token, user, password, creds) {
        (None, None, None, None) => NatsAuth::None,
        (Some(token), None, None, None) => NatsAuth::Token(token),
        (None, Some(user), Some(password), None) => NatsAuth::UserPassword { user, password },
        (None, None, None, Some(creds)) => NatsAuth::Creds(creds),
        (None, Some(_), None, None) | (None, None, Some(_), None) => {
            d.error(f.mark, path, "`user` and `password` go together");
            NatsAuth::None
        }
        _ => {
            d.error(
                f.mark,
                path,
                "set one way to authenticate: `token`, `user` and `password`, or `creds`",
            );
            NatsAuth::None
        }
    };
    let tls = f.get("tls").and_then(|n| {
        let tpath = join(path, "tls");
        match &n.value {
            Value::Map(_) => decode_tls_files(d, n, &tpath),
            _ => d
                .parse(n, &tpath, super::decode::parse_bool)
                .and_then(|on| on.then(UpstreamTls::default)),
        }
    });
    let timeout = d.timeout(&f, path, "timeout", Duration::from_secs(5));
    Some(NatsSinkSettings {
        name: name.to_string(),
        servers: servers?,
        subject: subject?,
        jetstream,
        create_stream,
        auth,
        tls,
        timeout,
    })
}

fn decode_redis_sink(
    d: &mut Decoder<'_>,
    node: &Node,
    path: &str,
    name: &str,
) -> Option<RedisSinkSettings> {
    let f = d.map(
        node,
        path,
        &["type", "url", "stream", "maxlen", "password", "timeout"],
    )?;
    let url = required(d, &f, path, "url").and_then(|n| {
        d.parse(n, &join(path, "url"), |s| {
            redis::parse_url(s).map(|()| s.to_string())
        })
    });
    let stream = required(d, &f, path, "stream")
        .and_then(|n| attribute_template(d, n, &join(path, "stream")));
    let maxlen = f.get("maxlen").and_then(|n| {
        d.parse(n, &join(path, "maxlen"), |s| match s.parse::<u64>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!(
                "expected a positive number of entries, found `{s}`"
            )),
        })
    });
    let password = f
        .get("password")
        .and_then(|n| d.string(n, &join(path, "password")));
    let timeout = d.timeout(&f, path, "timeout", Duration::from_secs(5));
    Some(RedisSinkSettings {
        name: name.to_string(),
        url: url?,
        stream: stream?,
        maxlen,
        password,
        timeout,
    })
}

fn decode_amqp_sink(
    d: &mut Decoder<'_>,
    node: &Node,
    path: &str,
    name: &str,
) -> Option<AmqpSinkSettings> {
    let f = d.map(
        node,
        path,
        &[
            "type",
            "url",
            "exchange",
            "routing_key",
            "password",
            "tls",
            "timeout",
        ],
    )?;
    let password = f
        .get("password")
        .and_then(|n| d.string(n, &join(path, "password")));
    let url_node = required(d, &f, path, "url");
    let uri = url_node.and_then(|n| {
        d.parse(n, &join(path, "url"), |s| {
            amqp::parse_url(s, password.as_deref())
        })
    });
    let exchange = required(d, &f, path, "exchange").and_then(|n| {
        let epath = join(path, "exchange");
        let name = d.string(n, &epath)?;
        match amqp::valid_exchange(&name) {
            Ok(()) => Some(name),
            Err(msg) => {
                d.error(n.mark, &epath, msg);
                None
            }
        }
    });
    let routing_key = required(d, &f, path, "routing_key").and_then(|n| {
        d.parse(n, &join(path, "routing_key"), |s| {
            let t = AttributeTemplate::parse(s)?;
            amqp::check_routing_key(&t)?;
            Ok(t)
        })
    });
    let tls = f.get("tls").and_then(|n| {
        let tpath = join(path, "tls");
        let tls = decode_tls_files(d, n, &tpath)?;
        if uri
            .as_ref()
            .is_some_and(|u| u.scheme != lapin::uri::AMQPScheme::AMQPS)
        {
            d.error(n.mark, &tpath, "needs an amqps:// URL");
        }
        Some(tls)
    });
    let timeout = d.timeout(&f, path, "timeout", Duration::from_secs(5));
    Some(AmqpSinkSettings {
        name: name.to_string(),
        uri: uri?,
        exchange: exchange?,
        routing_key: routing_key?,
        tls,
        timeout,
    })
}

fn decode_kafka_sink(
    d: &mut Decoder<'_>,
    node: &Node,
    path: &str,
    name: &str,
) -> Option<KafkaSinkSettings> {
    let f = d.map(
        node,
        path,
        &["type", "brokers", "topic", "tls", "sasl", "timeout"],
    )?;
    // A list, or one string of comma-separated addresses (what `${KAFKA_BROKERS}` gives).
    let brokers = required(d, &f, path, "brokers").and_then(|n| {
        let bpath = join(path, "brokers");
        let items: Vec<(String, String, super::yaml::Mark)> = match &n.value {
            Value::Seq(_) => strings(d, n, &bpath)
                .into_iter()
                .enumerate()
                .map(|(i, (s, mark))| (s, format!("{bpath}[{i}]"), mark))
                .collect(),
            _ => d
                .string(n, &bpath)?
                .split(',')
                .map(|s| (s.to_string(), bpath.clone(), n.mark))
                .collect(),
        };
        if items.is_empty() {
            d.error(n.mark, &bpath, "needs at least one HOST:PORT");
            return None;
        }
        let count = items.len();
        let mut out = Vec::with_capacity(count);
        for (s, ipath, mark) in items {
            match kafka::parse_broker(&s) {
                Ok(b) => out.push(b),
                Err(msg) => d.error(mark, &ipath, msg),
            }
        }
        (out.len() == count).then_some(out)
    });
    let topic = required(d, &f, path, "topic").and_then(|n| {
        d.parse(n, &join(path, "topic"), |s| {
            let t = AttributeTemplate::parse(s)?;
            kafka::check_topic(&t)?;
            Ok(t)
        })
    });
    let tls = f.get("tls").and_then(|n| {
        let tpath = join(path, "tls");
        match &n.value {
            Value::Map(_) => decode_tls_files(d, n, &tpath),
            _ => d
                .parse(n, &tpath, super::decode::parse_bool)
                .and_then(|on| on.then(UpstreamTls::default)),
        }
    });
    let sasl = f.get("sasl").and_then(|n| {
        let spath = join(path, "sasl");
        let s = d.map(n, &spath, &["mechanism", "user", "password"])?;
        let mechanism = required(d, &s, &spath, "mechanism")
            .and_then(|n| d.parse(n, &join(&spath, "mechanism"), SaslMechanism::parse));
        let user = required(d, &s, &spath, "user").and_then(|n| d.string(n, &join(&spath, "user")));
        let password = required(d, &s, &spath, "password")
            .and_then(|n| d.string(n, &join(&spath, "password")));
        if mechanism == Some(SaslMechanism::Plain) && tls.is_none() {
            d.warn(
                n.mark,
                &spath,
                "PLAIN without `tls` sends the password in clear text",
            );
        }
        Some(KafkaSasl {
            mechanism: mechanism?,
            user: user?,
            password: password?,
        })
    });
    let timeout = d.timeout(&f, path, "timeout", Duration::from_secs(5));
    Some(KafkaSinkSettings {
        name: name.to_string(),
        brokers: brokers?,
        topic: topic?,
        tls,
        sasl,
        timeout,
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
        .and_then(|n| {
            let s = d.string(n, "events.source")?;
            match uri_reference(&s) {
                Ok(()) => Some(s),
                Err(msg) => {
                    d.error(n.mark, "events.source", msg);
                    None
                }
            }
        })
        .unwrap_or_else(|| DEFAULT_SOURCE.to_string());
    let redact = match f.get("redact") {
        Some(n) => {
            let items = strings(d, n, "events.redact");
            // Each path alone first, so that every bad one is reported.
            let mut valid = true;
            for (i, (text, mark)) in items.iter().enumerate() {
                if let Err((_, msg)) = Redactor::parse(std::slice::from_ref(text)) {
                    d.error(*mark, &format!("events.redact[{i}]"), msg);
                    valid = false;
                }
            }
            let texts: Vec<String> = items.iter().map(|(s, _)| s.clone()).collect();
            match Redactor::parse(&texts) {
                Ok(r) if valid => r,
                _ => Redactor::default(),
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
                        rules.push(rule);
                    }
                    // Names as written, of valid and invalid rules alike.
                    if let Some(name) = item.scalar("name") {
                        if !names.insert(name) {
                            d.error(
                                item.value_mark("name"),
                                &join(&path, "name"),
                                format!("duplicate rule name `{name}`"),
                            );
                        }
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
    if !rules.is_empty() && sinks.is_empty() && d.declared_sinks.is_empty() {
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

/// Whether `s` can be a CloudEvents `source`, which must be a non-empty URI-reference (RFC 3986
/// section 4.1). The check is on characters only: those RFC 3986 allows (letters, digits,
/// `-._~`, the delimiters `:/?#[]@!$&'()*+,;=`, and `%` starting two hex digits), which rules
/// out spaces, control characters and unencoded non-ASCII text. The finer grammar (one `#`,
/// brackets only around an IP literal) is not checked.
fn uri_reference(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err(
            "must not be empty: a CloudEvents `source` is a URI-reference such as /legacy/shop"
                .into(),
        );
    }
    let bytes = s.as_bytes();
    for (i, c) in s.char_indices() {
        let allowed = c.is_ascii_alphanumeric() || "-._~:/?#[]@!$&'()*+,;=".contains(c);
        if c == '%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit));
            if !hex {
                return Err(format!(
                    "`{s}` is not a URI-reference: `%` must start a percent-encoding such as %20"
                ));
            }
        } else if !allowed {
            return Err(format!(
                "`{s}` is not a URI-reference: {c:?} is not allowed (percent-encode it, e.g. %20 for a space)"
            ));
        }
    }
    Ok(())
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
        // An empty constant would skip the rule on every exchange: an event needs a type.
        Some(n) => template(d, Some(n), &join(path, "type")).filter(|t| {
            let empty = t.as_constant() == Some("");
            if empty {
                d.error(n.mark, &join(path, "type"), "must not be empty");
            }
            !empty
        }),
        None => {
            d.error(f.mark, &join(path, "type"), "is required");
            None
        }
    };
    // A constant `source` is checked now; a templated one is only known per exchange.
    let source = template(d, f.get("source"), &join(path, "source")).filter(|t| {
        let Some(constant) = t.as_constant() else {
            return true;
        };
        match uri_reference(constant) {
            Ok(()) => true,
            Err(msg) => {
                d.error(
                    f.get("source").map_or(f.mark, |n| n.mark),
                    &join(path, "source"),
                    msg,
                );
                false
            }
        }
    });
    let subject = template(d, f.get("subject"), &join(path, "subject"));
    let partition_key = template(d, f.get("partition_key"), &join(path, "partition_key"));
    let id = template(d, f.get("id"), &join(path, "id"));
    let sequence = template(d, f.get("sequence"), &join(path, "sequence"));
    let mut data_ok = true;
    let data = f
        .get("data")
        .map(|n| decode_data(d, n, &join(path, "data"), &mut data_ok));
    let rule_sinks = f.get("sinks").map(|n| {
        let spath = join(path, "sinks");
        let list = strings(d, n, &spath);
        // Warnings, not errors: both load and work as written (an empty list is a dry run
        // whose events only `/events/tail` shows), and configs that loaded before still do.
        if matches!(&n.value, Value::Seq(items) if items.is_empty()) {
            d.warn(
                n.mark,
                &spath,
                "an empty list sends the events to no sink (only /events/tail shows them); leave `sinks` out for every sink",
            );
        }
        for (i, (s, mark)) in list.iter().enumerate() {
            if list[..i].iter().any(|(earlier, _)| earlier == s) {
                d.warn(
                    *mark,
                    &format!("{spath}[{i}]"),
                    format!("`{s}` is listed twice; its events go to it once"),
                );
                continue;
            }
            // A sink declared with invalid settings was reported where it is declared.
            if !sinks.iter().any(|k| &k.name == s) && !d.declared_sinks.contains(s) {
                let known = d.declared_sinks.join(", ");
                d.error(
                    *mark,
                    &format!("{spath}[{i}]"),
                    format!("no sink named `{s}` (known: {known})"),
                );
            }
        }
        list.into_iter().map(|(s, _)| s).collect::<Vec<_>>()
    });
    let complete = name.is_some() && status.is_some() && ty.is_some() && data_ok;
    // The rule's own checks run whenever its path is known, even when another part is
    // invalid (and reported already): each error is reported on the first run.
    let rule = Rule {
        name: name.unwrap_or_default(),
        method,
        path: route?,
        status: status.unwrap_or_else(StatusMatch::default_2xx),
        condition,
        ty: ty.unwrap_or_else(|| Template::constant("")),
        source,
        subject,
        partition_key,
        id,
        sequence,
        data,
        sinks: rule_sinks,
    };
    for problem in rule.check() {
        let (mark, at) = locate(node, &problem.at);
        d.error(mark, &format!("{path}{at}"), problem.message);
    }
    complete.then_some(rule)
}

/// The value at key path `at` inside a rule's `node`, and the path as text (`.data.items[1]`):
/// the mark of the deepest value found, so that an error is at the value it is about.
fn locate(node: &Node, at: &[KeyStep]) -> (super::yaml::Mark, String) {
    let mut text = String::new();
    let mut cur = node;
    let mut found = true;
    for step in at {
        let next = match (step, &cur.value) {
            (KeyStep::Key(k), Value::Map(entries)) => {
                text.push('.');
                text.push_str(k);
                entries
                    .iter()
                    .find(|(key, _)| &key.name == k)
                    .map(|(_, n)| n)
            }
            (KeyStep::Index(i), Value::Seq(items)) => {
                text.push_str(&format!("[{i}]"));
                items.get(*i)
            }
            (KeyStep::Key(k), _) => {
                text.push('.');
                text.push_str(k);
                None
            }
            (KeyStep::Index(i), _) => {
                text.push_str(&format!("[{i}]"));
                None
            }
        };
        match next {
            Some(n) if found => cur = n,
            _ => found = false,
        }
    }
    (cur.mark, text)
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

/// A rule's `data`, built value by value from the file: every string is a template, reported
/// at its own place and key path when it does not parse; numbers, booleans and nulls stay as
/// written. A value that fails is left `null` and clears `ok`, and the rest is still built, so
/// that the rule's own checks see every other value.
fn decode_data(d: &mut Decoder<'_>, node: &Node, path: &str, ok: &mut bool) -> DataTemplate {
    match &node.value {
        Value::Seq(items) => DataTemplate::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, n)| decode_data(d, n, &format!("{path}[{i}]"), ok))
                .collect(),
        ),
        Value::Map(entries) => DataTemplate::Object(
            entries
                .iter()
                .map(|(k, n)| (k.name.clone(), decode_data(d, n, &join(path, &k.name), ok)))
                .collect(),
        ),
        Value::Null | Value::Scalar(_) => match to_json(d, node, path) {
            Some(serde_json::Value::String(text)) => match Template::parse(&text) {
                Ok(t) => DataTemplate::Template(t),
                Err(e) => {
                    d.error(node.mark, path, e);
                    *ok = false;
                    DataTemplate::Literal(serde_json::Value::Null)
                }
            },
            Some(v) => DataTemplate::Literal(v),
            None => {
                *ok = false;
                DataTemplate::Literal(serde_json::Value::Null)
            }
        },
    }
}

/// A YAML subtree as JSON: plain scalars that read as numbers, booleans or null keep that
/// type; quoted scalars stay strings.
pub(crate) fn to_json(d: &mut Decoder<'_>, node: &Node, path: &str) -> Option<serde_json::Value> {
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

#[cfg(test)]
mod tests {
    use super::super::tests::assert_errors;
    use super::super::{Config, LoadError};
    use super::*;

    fn load(sinks: &str) -> Result<Config, Vec<String>> {
        let text = format!("upstreams:\n  m: {{ url: \"http://127.0.0.1:1\" }}\nsinks:\n{sinks}");
        let env = |name: &str| (name == "NATS_TOKEN").then(|| "t0k".to_string());
        Config::from_str_with_env(&text, "f.yaml", &env).map_err(|e| match e {
            LoadError::Invalid(list) => list.iter().map(|e| e.to_string()).collect(),
            other => vec![other.to_string()],
        })
    }

    /// The rules' part of a config, after one upstream and one sink.
    fn load_rules(events: &str) -> Result<Config, Vec<String>> {
        super::super::tests::load(&format!(
            "upstreams: {{ m: {{ url: \"http://a:1\" }} }}\nsinks: {{ out: {{ type: stdout }} }}\n{events}"
        ))
    }

    #[test]
    fn a_source_must_be_a_uri_reference_and_a_type_not_empty() {
        let errors = load_rules(concat!(
            "events:\n",
            "  source: \"\"\n",
            "  rules:\n",
            "    - name: a\n",
            "      match: { path: /a }\n",
            "      type: \"\"\n",
            "      source: \"/has space\"\n",
            "    - name: b\n",
            "      match: { path: /b }\n",
            "      type: \"{response.body.kind}\"\n",
            "      source: \"{request.headers.x-source}\"\n",
            "    - name: c\n",
            "      match: { path: /c }\n",
            "      type: t\n",
            "      source: \"/bad%zz\"\n",
            "    - name: d\n",
            "      match: { path: /d }\n",
            "      type: t\n",
            "      source: \"\"\n",
        ))
        .expect_err("invalid");
        assert_errors(
            &errors,
            &[
                "f.yaml:4:11: events.source: must not be empty: a CloudEvents `source` is a URI-reference",
                "f.yaml:8:13: events.rules[0].type: must not be empty",
                "f.yaml:9:15: events.rules[0].source: `/has space` is not a URI-reference: ' ' is not allowed",
                "f.yaml:17:15: events.rules[2].source: `/bad%zz` is not a URI-reference: `%` must start a percent-encoding",
                "f.yaml:21:15: events.rules[3].source: must not be empty",
            ],
        );
        let errors = load_rules("events: { source: \"legacy shop\" }\n").expect_err("invalid");
        assert_errors(
            &errors,
            &["f.yaml:3:19: events.source: `legacy shop` is not a URI-reference"],
        );
        for fine in [
            "/legacy/shop",
            "urn:shop:orders",
            "https://shop.example.com/orders?x=1#y",
            "//host/p%20q",
            "/~a-b_c.d!$&'()*+,;=:@[]",
        ] {
            let config = load_rules(&format!("events: {{ source: \"{fine}\" }}\n"))
                .unwrap_or_else(|e| panic!("{fine}: {e:?}"));
            assert_eq!(config.events.map(|e| e.source).as_deref(), Some(fine));
        }
    }

    #[test]
    fn sink_timeouts_are_not_zero() {
        let errors = super::super::tests::load(concat!(
            "upstreams: { m: { url: \"http://a:1\" } }\n",
            "sinks:\n",
            "  o: { type: http, url: \"http://s:1\", timeout: 0s }\n",
            "  n: { type: nats, url: \"nats://x\", subject: s, timeout: 0ms }\n",
        ))
        .expect_err("invalid");
        assert_errors(
            &errors,
            &[
                "f.yaml:3:48: sinks.o.timeout: must be greater than zero",
                "f.yaml:4:58: sinks.n.timeout: must be greater than zero",
            ],
        );
    }

    /// An empty `sinks` (a dry run: `/events/tail` only) and a sink listed twice load and work
    /// as written, as they did before they were checked: each gets a located warning.
    #[test]
    fn an_empty_or_repeated_rule_sink_list_is_a_warning() {
        let config = super::super::tests::load(concat!(
            "upstreams: { m: { url: \"http://a:1\" } }\n",
            "sinks:\n",
            "  o: { type: stdout }\n",
            "  n: { type: stdout }\n",
            "events:\n",
            "  rules:\n",
            "    - { name: e, match: { path: /e }, type: t, sinks: [] }\n",
            "    - { name: f, match: { path: /f }, type: t, sinks: [o, n, o] }\n",
        ))
        .expect("loads");
        assert_eq!(
            config.warnings,
            [
                "f.yaml:7:55: events.rules[0].sinks: an empty list sends the events to no sink (only /events/tail shows them); leave `sinks` out for every sink",
                "f.yaml:8:62: events.rules[1].sinks[2]: `o` is listed twice; its events go to it once",
            ]
        );
    }

    #[test]
    fn a_condition_calling_an_unknown_function_or_never_bool_is_refused_at_its_value() {
        let errors = load_rules(concat!(
            "events:\n",
            "  rules:\n",
            "    - { name: a, match: { path: /a }, type: t, if: 'nosuchfunc(1)' }\n",
            "    - { name: b, match: { path: /b }, type: t, if: 'response.body.id.nosuchmethod()' }\n",
            "    - { name: c, match: { path: /c }, type: t, if: 42 }\n",
            "    - { name: d, match: { path: /d }, type: t, if: 'response.body.id.startsWith(\"x\")' }\n",
        ))
        .expect_err("invalid");
        assert_errors(
            &errors,
            &[
                "f.yaml:5:52: events.rules[0].if: unknown function `nosuchfunc`",
                "f.yaml:6:52: events.rules[1].if: unknown method `nosuchmethod`",
                "f.yaml:7:52: events.rules[2].if: the condition must give true or false, it is always the int 42",
            ],
        );
    }

    #[test]
    fn each_unknown_path_parameter_is_reported_at_its_value_beside_other_errors() {
        let errors = load_rules(concat!(
            "events:\n",
            "  rules:\n",
            "    - name: e\n",
            "      match: { path: \"/p/{id}\" }\n",
            "      type: t\n",
            "      subject: \"{path.s}\"\n",
            "      if: \"path.c == '1'\"\n",
            "      data:\n",
            "        nested:\n",
            "          a: \"{path.x}\"\n",
            "          b: \"{path.z}\"\n",
            "        list: [1, \"{path.l}\"]\n",
            "        bad: \"{request.bdy}\"\n",
            "        ok: \"{path.id}\"\n",
            "    - match: { path: /q }\n",
            "      type: t\n",
            "      subject: \"{path.q}\"\n",
        ))
        .expect_err("invalid");
        assert_errors(
            &errors,
            &[
                "f.yaml:8:16: events.rules[0].subject: `path.s` is not a parameter of the rule's path `/p/{id}` (it has: id)",
                "f.yaml:9:11: events.rules[0].if: `path.c` is not a parameter of the rule's path",
                "f.yaml:12:14: events.rules[0].data.nested.a: `path.x` is not a parameter of the rule's path",
                "f.yaml:13:14: events.rules[0].data.nested.b: `path.z` is not a parameter of the rule's path",
                "f.yaml:14:19: events.rules[0].data.list[1]: `path.l` is not a parameter of the rule's path",
                "f.yaml:15:14: events.rules[0].data.bad: unknown name `request.bdy`",
                "f.yaml:17:7: events.rules[1].name: is required",
                "f.yaml:19:16: events.rules[1].subject: `path.q` is not a parameter of the rule's path `/q` (it has none)",
            ],
        );
    }

    #[test]
    fn nats_and_redis_sinks_decode() {
        let config = load(concat!(
            "  bus: { type: nats, url: \"nats://127.0.0.1:4222, nats://127.0.0.1:4223\", subject: \"shop.{type}\", create_stream: SHOP, token: \"${NATS_TOKEN}\", tls: true, timeout: 2s }\n",
            "  core: { type: nats, url: \"tls://nats.internal:4222\", subject: \"shop.events\", jetstream: false, user: u, password: p, tls: { ca: /etc/ca.pem } }\n",
            "  stream: { type: redis, url: \"redis://127.0.0.1:6379/2\", stream: \"events:{type}\", maxlen: 100000, password: s3cret }\n",
        ))
        .expect("valid");
        let SinkKind::Nats(bus) = &config.sinks[0].kind else {
            panic!("nats: {:?}", config.sinks[0]);
        };
        assert_eq!(
            bus.servers,
            ["nats://127.0.0.1:4222", "nats://127.0.0.1:4223"]
        );
        assert_eq!(bus.subject.to_string(), "shop.{type}");
        assert!(bus.jetstream, "JetStream by default");
        assert_eq!(bus.create_stream.as_deref(), Some("SHOP"));
        assert!(matches!(&bus.auth, NatsAuth::Token(t) if t == "t0k"));
        assert!(bus.tls.as_ref().is_some_and(|t| t.ca.is_none()));
        assert_eq!(bus.timeout, Duration::from_secs(2));
        assert!(
            !format!("{:?}", bus.auth).contains("t0k"),
            "secrets stay out of Debug"
        );
        let SinkKind::Nats(core) = &config.sinks[1].kind else {
            panic!("nats");
        };
        assert!(!core.jetstream);
        assert!(matches!(&core.auth, NatsAuth::UserPassword { user, .. } if user == "u"));
        assert_eq!(
            core.tls.as_ref().and_then(|t| t.ca.clone()),
            Some(PathBuf::from("/etc/ca.pem"))
        );
        let SinkKind::Redis(stream) = &config.sinks[2].kind else {
            panic!("redis");
        };
        assert_eq!(stream.maxlen, Some(100_000));
        assert_eq!(stream.password.as_deref(), Some("s3cret"));
        assert_eq!(stream.timeout, Duration::from_secs(5));
        assert!(!format!("{stream:?}").contains("s3cret"));
        assert_eq!(config.sinks[2].kind.type_name(), "redis");
    }

    #[test]
    fn amqp_sinks_decode() {
        let config = load(concat!(
            "  rabbit: { type: amqp, url: \"amqp://ficus:pw@127.0.0.1:5672/%2f\", exchange: shop, routing_key: \"{type}\" }\n",
            "  secure: { type: amqp, url: \"amqps://ficus@rabbit.internal/shop\", password: s3cret, exchange: \"\", routing_key: \"events.{partitionkey}\", tls: { ca: /etc/ca.pem, cert: /etc/c.pem, key: /etc/k.pem }, timeout: 2s }\n",
        ))
        .expect("valid");
        let SinkKind::Amqp(rabbit) = &config.sinks[0].kind else {
            panic!("amqp: {:?}", config.sinks[0]);
        };
        assert_eq!(config.sinks[0].kind.type_name(), "amqp");
        assert_eq!(rabbit.uri.authority.host, "127.0.0.1");
        assert_eq!(rabbit.uri.authority.port, 5672);
        assert_eq!(rabbit.uri.vhost, "/");
        assert_eq!(rabbit.uri.authority.userinfo.username, "ficus");
        assert_eq!(rabbit.uri.authority.userinfo.password, "pw");
        assert_eq!(rabbit.exchange, "shop");
        assert_eq!(rabbit.routing_key.to_string(), "{type}");
        assert!(rabbit.tls.is_none());
        assert_eq!(rabbit.timeout, Duration::from_secs(5));
        assert!(
            !format!("{rabbit:?}").contains("pw"),
            "secrets stay out of Debug"
        );
        let SinkKind::Amqp(secure) = &config.sinks[1].kind else {
            panic!("amqp");
        };
        assert_eq!(secure.uri.authority.port, 5671, "the amqps port");
        assert_eq!(secure.uri.vhost, "shop");
        assert_eq!(secure.uri.authority.userinfo.password, "s3cret");
        assert_eq!(secure.exchange, "", "the default exchange");
        assert_eq!(
            secure.tls.as_ref().and_then(|t| t.key.clone()),
            Some(PathBuf::from("/etc/k.pem"))
        );
        assert_eq!(secure.timeout, Duration::from_secs(2));
        assert!(!format!("{secure:?}").contains("s3cret"));
    }

    #[test]
    fn amqp_errors_are_located() {
        let errors = load(concat!(
            "  a: { type: amqp, url: \"http://u:secret@x\", exchange: shop, routing_key: \"{response.body.id}\" }\n",
            "  b: { type: amqp, url: \"amqp://u:secret@x:5672/\", exchange: \"a\\nb\", routing_key: k }\n",
            "  c: { type: amqp, url: \"amqp://x\", routing_key: \"{type}\", queue: q }\n",
            "  d: { type: amqp, url: \"amqp://x\", exchange: shop, routing_key: k, tls: { ca: /ca.pem, cert: /c.pem } }\n",
        ))
        .expect_err("invalid");
        let expected = [
            "f.yaml:4:25: sinks.a.url: expected an amqp:// or amqps:// URL",
            "f.yaml:4:75: sinks.a.routing_key: unknown placeholder `{response.body.id}`",
            "f.yaml:5:25: sinks.b.url: `amqp://***@x:5672/` names the empty vhost",
            "f.yaml:5:62: sinks.b.exchange: `a\nb` has control characters",
            "f.yaml:6:60: sinks.c.queue: unknown key",
            "f.yaml:6:6: sinks.c.exchange: is required",
            "f.yaml:7:74: sinks.d.tls: `cert` and `key` go together",
            "f.yaml:7:74: sinks.d.tls: needs an amqps:// URL",
        ];
        for want in expected {
            assert!(
                errors.iter().any(|e| e.starts_with(want)),
                "missing `{want}` in {errors:#?}"
            );
        }
        assert_eq!(errors.len(), expected.len(), "{errors:#?}");
        assert!(errors.iter().all(|e| !e.contains("secret")), "{errors:#?}");
    }

    #[test]
    fn kafka_sinks_decode() {
        let config = load(concat!(
            "  kafka: { type: kafka, brokers: [\"kafka-0:9092\", \"[::1]:9093\"], topic: \"shop.{type}\" }\n",
            "  secure: { type: kafka, brokers: \"k1:9093, k2:9093\", topic: shop-events, tls: { ca: /etc/ca.pem }, sasl: { mechanism: SCRAM-SHA-512, user: ficus, password: \"${NATS_TOKEN}\" }, timeout: 2s }\n",
            "  plain: { type: kafka, brokers: [\"k:9092\"], topic: t, tls: true, sasl: { mechanism: plain, user: u, password: p } }\n",
        ))
        .expect("valid");
        let SinkKind::Kafka(kafka) = &config.sinks[0].kind else {
            panic!("kafka: {:?}", config.sinks[0]);
        };
        assert_eq!(config.sinks[0].kind.type_name(), "kafka");
        assert_eq!(kafka.brokers, ["kafka-0:9092", "[::1]:9093"]);
        assert_eq!(kafka.topic.to_string(), "shop.{type}");
        assert!(kafka.tls.is_none() && kafka.sasl.is_none());
        assert_eq!(kafka.timeout, Duration::from_secs(5));
        let SinkKind::Kafka(secure) = &config.sinks[1].kind else {
            panic!("kafka");
        };
        assert_eq!(
            secure.brokers,
            ["k1:9093", "k2:9093"],
            "a comma-separated string"
        );
        assert_eq!(
            secure.tls.as_ref().and_then(|t| t.ca.clone()),
            Some(PathBuf::from("/etc/ca.pem"))
        );
        let sasl = secure.sasl.as_ref().expect("sasl");
        assert_eq!(sasl.mechanism, SaslMechanism::ScramSha512);
        assert_eq!(
            (sasl.user.as_str(), sasl.password.as_str()),
            ("ficus", "t0k")
        );
        assert_eq!(secure.timeout, Duration::from_secs(2));
        assert!(
            !format!("{secure:?}").contains("t0k"),
            "secrets stay out of Debug"
        );
        let SinkKind::Kafka(plain) = &config.sinks[2].kind else {
            panic!("kafka");
        };
        assert!(
            plain.tls.as_ref().is_some_and(|t| t.ca.is_none()),
            "system roots"
        );
        assert!(config.warnings.is_empty(), "{:?}", config.warnings);
    }

    #[test]
    fn kafka_errors_are_located() {
        let errors = load(concat!(
            "  a: { type: kafka, brokers: [\"kafka://k:9092\", \"k:x\"], topic: \"shop/{type}\" }\n",
            "  b: { type: kafka, brokers: [], topic: \"{nope}\", partitions: 3 }\n",
            "  c: { type: kafka, topic: t, sasl: { mechanism: gssapi, user: u } }\n",
            "  d: { type: kafka, brokers: \"k:9092,\", topic: \"..\", tls: { cert: /c.pem } }\n",
        ))
        .expect_err("invalid");
        let expected = [
            "f.yaml:4:31: sinks.a.brokers[0]: expected HOST:PORT without a scheme",
            "f.yaml:4:49: sinks.a.brokers[1]: `x` is not a port",
            "f.yaml:4:64: sinks.a.topic: `shop/{type}` cannot make a Kafka topic name",
            "f.yaml:5:30: sinks.b.brokers: needs at least one HOST:PORT",
            "f.yaml:5:41: sinks.b.topic: unknown placeholder `{nope}`",
            "f.yaml:5:51: sinks.b.partitions: unknown key",
            "f.yaml:6:6: sinks.c.brokers: is required",
            "f.yaml:6:50: sinks.c.sasl.mechanism: expected plain, scram-sha-256 or scram-sha-512, found `gssapi`",
            "f.yaml:6:37: sinks.c.sasl.password: is required",
            "f.yaml:7:30: sinks.d.brokers: expected HOST:PORT, found ``",
            "f.yaml:7:48: sinks.d.topic: `..` is not a Kafka topic name",
            "f.yaml:7:59: sinks.d.tls: `cert` and `key` go together",
        ];
        for want in expected {
            assert!(
                errors.iter().any(|e| e.starts_with(want)),
                "missing `{want}` in {errors:#?}"
            );
        }
        assert_eq!(errors.len(), expected.len(), "{errors:#?}");
    }

    #[test]
    fn kafka_plain_without_tls_is_warned_about() {
        let config = load(
            "  k: { type: kafka, brokers: [\"k:9092\"], topic: t, sasl: { mechanism: plain, user: u, password: p } }\n",
        )
        .expect("valid");
        assert!(
            config
                .warnings
                .iter()
                .any(|w| w.contains("sinks.k.sasl: PLAIN without `tls`")),
            "{:?}",
            config.warnings
        );
    }

    #[test]
    fn nats_and_redis_errors_are_located() {
        let errors = load(concat!(
            "  a: { type: nats, url: \"http://x\", subject: \"shop.{response.body.id}\" }\n",
            "  b: { type: nats, url: \"nats://x\", subject: \"{type}\", create_stream: SHOP }\n",
            "  c: { type: nats, url: \"nats://x\", subject: \"shop events\", jetstream: false, create_stream: \"S.1\" }\n",
            "  d: { type: nats, url: \"nats://x\", subject: s, token: t, user: u }\n",
            "  e: { type: redis, url: \"http://x\", stream: \"events:{nope}\", maxlen: 0 }\n",
            "  f: { type: redis, stream: s, db: 3 }\n",
        ))
        .expect_err("invalid");
        let expected = [
            "f.yaml:4:25: sinks.a.url: `http://x`",
            "f.yaml:4:46: sinks.a.subject: unknown placeholder `{response.body.id}`",
            "f.yaml:5:46: sinks.b.subject: `create_stream` needs a subject that starts with a fixed token",
            "f.yaml:6:46: sinks.c.subject: `shop events` cannot make a valid NATS subject",
            "f.yaml:6:94: sinks.c.create_stream: `S.1` is not a stream name",
            "f.yaml:7:6: sinks.d: set one way to authenticate",
            "f.yaml:8:26: sinks.e.url: expected a redis:// or rediss:// URL",
            "f.yaml:8:46: sinks.e.stream: unknown placeholder `{nope}`",
            "f.yaml:8:71: sinks.e.maxlen: expected a positive number",
            "f.yaml:9:32: sinks.f.db: unknown key",
            "f.yaml:9:6: sinks.f.url: is required",
        ];
        for want in expected {
            assert!(
                errors.iter().any(|e| e.starts_with(want)),
                "missing `{want}` in {errors:#?}"
            );
        }
        assert_eq!(errors.len(), expected.len(), "{errors:#?}");
    }
}
