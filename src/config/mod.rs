//! The configuration file: YAML read into a located tree ([`yaml`]), decoded and validated into
//! [`Config`] ([`decode`] and this module), with every problem reported at once as
//! `FILE:LINE:COLUMN: key.path: message`.
//!
//! Sections that later versions fill (`routes`, `events`, `sinks`, `outbox`) are known keys that
//! this build refuses with a clear message, so that a config written for a newer ficus fails
//! loudly instead of being half-applied.

pub(crate) mod decode;
mod events;
pub mod routes;
pub(crate) mod yaml;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::uri::{Authority, Scheme};

pub use decode::{interpolate, parse_duration, parse_size, ConfigError};
use decode::{join, Decoder, Env, Fields};
pub(crate) use events::to_json;
pub use events::{Events, OutboxConfig, SinkConfig, SinkKind, DEFAULT_SOURCE};
use yaml::{Node, Value};

/// A validated configuration: every value present, checked and typed.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: Listen,
    pub admin: Admin,
    /// In file order; routes refer to them by index.
    pub upstreams: Vec<Upstream>,
    /// Index into `upstreams` of the upstream that serves unrouted traffic.
    pub default_upstream: usize,
    pub limits: Limits,
    pub shutdown: Shutdown,
    pub log: Log,
    /// Strangler routes, first match wins.
    pub routes: Vec<routes::RouteConfig>,
    /// Rules; `None` when the file has no `events` section.
    pub events: Option<Events>,
    pub sinks: Vec<SinkConfig>,
    pub outbox: OutboxConfig,
    /// Valid but risky settings, as `FILE:LINE:COLUMN: key.path: message`.
    pub warnings: Vec<String>,
    /// A hash of the text this config was read from: a reload skips a file whose text is the
    /// one running.
    pub fingerprint: u64,
}

/// The [`Config::fingerprint`] of a config file's text.
pub fn fingerprint(text: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut hasher);
    hasher.finish()
}

#[derive(Debug, Clone, PartialEq)]
pub struct Listen {
    pub address: SocketAddr,
    pub tls: Option<ServerTls>,
    /// Keep `X-Forwarded-Proto`/`-Host` set by an ingress in front, and append to
    /// `X-Forwarded-For`; when false, all three are replaced.
    pub trust_forwarded_headers: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Admin {
    pub address: SocketAddr,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Upstream {
    pub name: String,
    pub scheme: Scheme,
    pub authority: Authority,
    pub connect_timeout: Duration,
    /// Until the response headers arrive.
    pub timeout: Duration,
    /// No body bytes in either direction for this long cuts the exchange.
    pub idle_timeout: Duration,
    pub tls: Option<UpstreamTls>,
    /// Send `Host: <this upstream's authority>` instead of the client's (functions behind a
    /// gateway route by host).
    pub rewrite_host: bool,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct UpstreamTls {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub capture_body: u64,
    pub max_header_bytes: usize,
    pub header_read_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Shutdown {
    pub drain_timeout: Duration,
    pub delivery_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Log {
    pub format: LogFormat,
    pub level: String,
    pub access: bool,
}

/// Every problem found in one config file.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", ErrorList(.0))]
    Invalid(Vec<ConfigError>),
}

struct ErrorList<'a>(&'a [ConfigError]);

impl fmt::Display for ErrorList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// The smallest `max_header_bytes` hyper's HTTP/1 reader accepts.
pub const MIN_HEADER_BYTES: u64 = 8 * 1024;

const TOP_LEVEL: &[&str] = &[
    "listen",
    "admin",
    "upstreams",
    "default_upstream",
    "routes",
    "events",
    "sinks",
    "outbox",
    "limits",
    "shutdown",
    "log",
];

impl Config {
    /// Reads and validates `path`, with `${VAR}` taken from the process environment.
    pub fn load(path: &Path) -> Result<Config, LoadError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
            file: file.clone(),
            source,
        })?;
        Config::from_str_with_env(&text, &file, &|name| std::env::var(name).ok())
    }

    /// Validates YAML text; `file` is only used in error messages.
    pub fn from_yaml(text: &str, file: &str) -> Result<Config, LoadError> {
        Config::from_str_with_env(text, file, &|name| std::env::var(name).ok())
    }

    pub fn from_str_with_env(text: &str, file: &str, env: Env<'_>) -> Result<Config, LoadError> {
        let (root, duplicates) = yaml::parse_collecting(text).map_err(|e| syntax_error(file, e))?;
        let mut d = Decoder::new(file, env);
        for dup in duplicates {
            d.error(
                dup.mark,
                &dup.path,
                format!("duplicate key `{}` (the first is read)", dup.name),
            );
        }
        let config = decode_config(&mut d, &root);
        match config {
            Some(mut c) if d.errors.is_empty() => {
                c.warnings = d.warnings.iter().map(ToString::to_string).collect();
                c.fingerprint = fingerprint(text);
                Ok(c)
            }
            _ => {
                if d.errors.is_empty() {
                    d.error(root.mark, "", "invalid configuration");
                }
                let mut errors = d.errors;
                errors.sort_by_key(|e| (e.line, e.col));
                Err(LoadError::Invalid(errors))
            }
        }
    }

    /// Reads a YAML (or JSON, which is YAML) data file as JSON; `${VAR}` is not interpolated.
    pub fn data_file(text: &str, file: &str) -> Result<serde_json::Value, LoadError> {
        let root = data_tree(text, file)?;
        let no_env = |_: &str| None;
        let mut d = Decoder::new(file, &no_env);
        let value = events::to_json(&mut d, &root, "");
        match value {
            Some(v) if d.errors.is_empty() => Ok(v),
            _ => Err(LoadError::Invalid(d.errors)),
        }
    }

    pub fn upstream(&self, name: &str) -> Option<&Upstream> {
        self.upstreams.iter().find(|u| u.name == name)
    }

    /// What `ficus check` prints for a valid file.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let tls = if self.listen.tls.is_some() {
            " (TLS)"
        } else {
            ""
        };
        s.push_str(&format!("listen: {}{tls}\n", self.listen.address));
        s.push_str(&format!("admin: {}\n", self.admin.address));
        s.push_str(&format!("upstreams: {}\n", self.upstreams.len()));
        for (i, u) in self.upstreams.iter().enumerate() {
            let mut notes = Vec::new();
            if i == self.default_upstream {
                notes.push("default");
            }
            match &u.tls {
                Some(t) if t.cert.is_some() => notes.push("mTLS"),
                Some(t) if t.ca.is_some() => notes.push("own CA"),
                _ => {}
            }
            if u.rewrite_host {
                notes.push("Host rewritten");
            }
            let notes = if notes.is_empty() {
                String::new()
            } else {
                format!(" ({})", notes.join(", "))
            };
            s.push_str(&format!(
                "  {}: {}://{}{notes}\n",
                u.name, u.scheme, u.authority
            ));
        }
        s.push_str(&format!("routes: {}\n", self.routes.len()));
        let name = |i: usize| self.upstreams.get(i).map_or("?", |u| u.name.as_str());
        for r in &self.routes {
            let method = r.method.as_ref().map_or("*", |m| m.as_str());
            let to = match &r.backend {
                routes::Backend::Single(u) => name(*u).to_string(),
                routes::Backend::Split { choices, sticky } => {
                    let parts: Vec<String> = choices
                        .iter()
                        .map(|(u, w)| format!("{} {w}", name(*u)))
                        .collect();
                    let sticky = match sticky {
                        Some(routes::Sticky::Header(h)) => format!(", sticky by header {h}"),
                        Some(routes::Sticky::Cookie(c)) => format!(", sticky by cookie {c}"),
                        None => String::new(),
                    };
                    format!("split [{}]{sticky}", parts.join(", "))
                }
            };
            let mut when = String::new();
            for (h, v) in &r.headers {
                when.push_str(&format!(
                    " [{h}: {}]",
                    String::from_utf8_lossy(v.as_bytes())
                ));
            }
            let mut extra = String::new();
            if r.strip_prefix.is_some() || r.add_prefix.is_some() {
                extra.push_str(&format!(
                    ", path {}/... -> {}/...",
                    r.strip_prefix.as_deref().unwrap_or(""),
                    r.add_prefix.as_deref().unwrap_or("")
                ));
            }
            if let Some(f) = &r.fallback {
                extra.push_str(&format!(", fallback {}", name(f.upstream)));
                if f.methods != routes::idempotent_methods() {
                    let m: Vec<&str> = f.methods.iter().map(|m| m.as_str()).collect();
                    extra.push_str(&format!(" for {}", m.join("/")));
                }
            }
            if let Some(sh) = &r.shadow {
                let m: Vec<&str> = sh.methods.iter().map(|m| m.as_str()).collect();
                extra.push_str(&format!(
                    ", shadow {} ({}% of {}{})",
                    name(sh.upstream),
                    sh.sample * 100.0,
                    m.join("/"),
                    if sh.compare.is_some() {
                        ", compared"
                    } else {
                        ""
                    }
                ));
            }
            s.push_str(&format!(
                "  {}: {method} {}{when} -> {to}{extra}\n",
                r.name,
                r.path.as_str()
            ));
        }
        s.push_str(&format!(
            "  default: * -> {}\n",
            name(self.default_upstream)
        ));
        let rules = self.events.as_ref().map_or(0, |e| e.rules.rules().len());
        s.push_str(&format!("rules: {rules}\n"));
        if let Some(events) = &self.events {
            for rule in events.rules.rules() {
                let method = rule.method.as_ref().map_or("*", |m| m.as_str());
                s.push_str(&format!(
                    "  {}: {method} {}\n",
                    rule.name,
                    rule.path.as_str()
                ));
            }
        }
        s.push_str(&format!("sinks: {}\n", self.sinks.len()));
        for sink in &self.sinks {
            s.push_str(&format!("  {}: {}\n", sink.name, sink.kind.type_name()));
        }
        // The settings as the config spells them (`sync`, `reject`).
        let durability = format!("{:?}", self.outbox.durability).to_lowercase();
        let when_full = format!("{:?}", self.outbox.when_full).to_lowercase();
        s.push_str(&format!(
            "outbox: {} (durability: {durability}, max_bytes: {}, when_full: {when_full})\n",
            self.outbox.dir.display(),
            self.outbox.max_bytes,
        ));
        s
    }
}

/// A file that is not YAML at all: one error, where the parser stopped.
fn syntax_error(file: &str, e: yaml::SyntaxError) -> LoadError {
    LoadError::Invalid(vec![ConfigError {
        file: file.to_string(),
        line: e.mark.line,
        col: e.mark.col,
        path: String::new(),
        message: e.message,
    }])
}

/// A YAML (or JSON) data file that is not a config, such as `ficus rules test` samples, as a
/// located tree to decode with a [`Decoder`]. Data files take `$` literally: interpolation is
/// for configs, so every `${` is escaped for the decoder to give back as written.
pub(crate) fn data_tree(text: &str, file: &str) -> Result<Node, LoadError> {
    let root = yaml::parse(text).map_err(|e| syntax_error(file, e))?;
    Ok(escape_dollars(root))
}

/// Rewrites `${` as `$${` in every scalar so that interpolation leaves the text as it was.
fn escape_dollars(mut node: Node) -> Node {
    node.value = match node.value {
        Value::Scalar(s) => Value::Scalar(s.replace("${", "$${")),
        Value::Seq(items) => Value::Seq(items.into_iter().map(escape_dollars).collect()),
        Value::Map(entries) => Value::Map(
            entries
                .into_iter()
                .map(|(k, v)| (k, escape_dollars(v)))
                .collect(),
        ),
        other => other,
    };
    node
}

fn decode_config(d: &mut Decoder<'_>, root: &Node) -> Option<Config> {
    if matches!(root.value, Value::Null) {
        d.error(
            root.mark,
            "",
            "empty config: at least `upstreams` is required",
        );
        return None;
    }
    let top = d.map(root, "", TOP_LEVEL)?;
    let declared = |key| match top.get(key).map(|n| &n.value) {
        Some(Value::Map(entries)) => entries.iter().map(|(k, _)| k.name.clone()).collect(),
        _ => Vec::new(),
    };
    d.declared_upstreams = declared("upstreams");
    d.declared_sinks = declared("sinks");

    let listen = decode_listen(d, top.get("listen"));
    let admin_addr = top
        .get("admin")
        .and_then(|n| d.map(n, "admin", &["address"]))
        .map(|f| d.field(&f, "admin", "address", default_addr(9090), parse_addr))
        .unwrap_or_else(|| default_addr(9090));
    let upstreams = decode_upstreams(d, &top);
    let default_upstream = decode_default_upstream(d, &top, &upstreams);
    let limits = decode_limits(d, top.get("limits"));
    let shutdown = decode_shutdown(d, top.get("shutdown"));
    let log = decode_log(d, top.get("log"));
    let routes = routes::decode_routes(d, top.get("routes"), &upstreams);
    let sinks = events::decode_sinks(d, top.get("sinks"));
    let outbox = events::decode_outbox(d, top.get("outbox"));
    let events = events::decode_events(d, top.get("events"), &sinks);

    if listen.address == admin_addr && listen.address.port() != 0 {
        if let Some(n) = top.get("admin") {
            d.error(
                n.value_mark("address"),
                "admin.address",
                "must differ from listen.address",
            );
        }
    }

    Some(Config {
        listen,
        admin: Admin {
            address: admin_addr,
        },
        upstreams,
        default_upstream: default_upstream?,
        limits,
        shutdown,
        log,
        routes,
        events,
        sinks,
        outbox,
        warnings: Vec::new(),
        fingerprint: 0,
    })
}

fn default_addr(port: u16) -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], port))
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|_| format!("expected an address such as 0.0.0.0:8080 or [::1]:8080, found `{s}`"))
}

fn decode_listen(d: &mut Decoder<'_>, node: Option<&Node>) -> Listen {
    let mut listen = Listen {
        address: default_addr(8080),
        tls: None,
        trust_forwarded_headers: true,
    };
    let Some(node) = node else { return listen };
    let Some(f) = d.map(
        node,
        "listen",
        &["address", "tls", "trust_forwarded_headers"],
    ) else {
        return listen;
    };
    listen.address = d.field(&f, "listen", "address", listen.address, parse_addr);
    listen.trust_forwarded_headers = d.field(
        &f,
        "listen",
        "trust_forwarded_headers",
        true,
        decode::parse_bool,
    );
    if let Some(tls) = f.get("tls") {
        if let Some(t) = d.map(tls, "listen.tls", &["cert", "key"]) {
            let cert = required_path(d, &t, "listen.tls", "cert");
            let key = required_path(d, &t, "listen.tls", "key");
            if let (Some(cert), Some(key)) = (cert, key) {
                listen.tls = Some(ServerTls { cert, key });
            }
        }
    }
    listen
}

fn required_path(d: &mut Decoder<'_>, f: &Fields<'_>, path: &str, key: &str) -> Option<PathBuf> {
    match f.get(key) {
        Some(n) => d.string(n, &join(path, key)).map(PathBuf::from),
        None => {
            d.error(f.mark, &join(path, key), "is required");
            None
        }
    }
}

fn optional_path(d: &mut Decoder<'_>, f: &Fields<'_>, path: &str, key: &str) -> Option<PathBuf> {
    f.get(key)
        .and_then(|n| d.string(n, &join(path, key)))
        .map(PathBuf::from)
}

fn decode_upstreams(d: &mut Decoder<'_>, top: &Fields<'_>) -> Vec<Upstream> {
    let Some(node) = top.get("upstreams") else {
        d.error(
            top.mark,
            "upstreams",
            "is required: name at least one upstream (the monolith)",
        );
        return Vec::new();
    };
    let Some(entries) = d.named(node, "upstreams") else {
        return Vec::new();
    };
    if entries.is_empty() {
        d.error(node.mark, "upstreams", "name at least one upstream");
    }
    let mut out = Vec::new();
    for (key, node) in entries {
        let path = join("upstreams", &key.name);
        if !valid_name(&key.name) {
            d.error(
                key.mark,
                &path,
                "names may use letters, digits, `-` and `_` only",
            );
        }
        if matches!(node.value, Value::Null) {
            d.error(node.mark, &join(&path, "url"), "is required");
            continue;
        }
        let Some(f) = d.map(
            node,
            &path,
            &[
                "url",
                "connect_timeout",
                "timeout",
                "idle_timeout",
                "tls",
                "rewrite_host",
            ],
        ) else {
            continue;
        };
        let url = match f.get("url") {
            Some(n) => d.parse(n, &join(&path, "url"), parse_upstream_url),
            None => {
                d.error(f.mark, &join(&path, "url"), "is required");
                None
            }
        };
        let connect_timeout = d.timeout(&f, &path, "connect_timeout", Duration::from_secs(1));
        let timeout = d.timeout(&f, &path, "timeout", Duration::from_secs(30));
        let idle_timeout = d.timeout(&f, &path, "idle_timeout", Duration::from_secs(60));
        let rewrite_host = d.field(&f, &path, "rewrite_host", false, decode::parse_bool);
        let tls = f.get("tls").and_then(|n| {
            let tpath = join(&path, "tls");
            let t = d.map(n, &tpath, &["ca", "cert", "key"])?;
            let tls = UpstreamTls {
                ca: optional_path(d, &t, &tpath, "ca"),
                cert: optional_path(d, &t, &tpath, "cert"),
                key: optional_path(d, &t, &tpath, "key"),
            };
            if tls.cert.is_some() != tls.key.is_some() {
                d.error(
                    t.mark,
                    &tpath,
                    "`cert` and `key` go together (client certificate for mTLS)",
                );
            }
            Some(tls)
        });
        if let Some((scheme, authority)) = url {
            if tls.is_some() && scheme != Scheme::HTTPS {
                if let Some(n) = f.get("tls") {
                    d.error(n.mark, &join(&path, "tls"), "needs an https:// url");
                }
            }
            out.push(Upstream {
                name: key.name.clone(),
                scheme,
                authority,
                connect_timeout,
                timeout,
                idle_timeout,
                tls,
                rewrite_host,
            });
        }
    }
    out
}

pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// An `http://` or `https://` URL with a host, and a port a connection can use when it names
/// one: `http::Uri` takes `host:65536` and then reports no port at all, which a connector
/// would read as the scheme's default, so a typo would send traffic to port 80.
pub(crate) fn parse_http_url(s: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = s.parse().map_err(|e| format!("invalid URL `{s}`: {e}"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(format!("expected an http:// or https:// URL, found `{s}`"));
    }
    let Some(authority) = uri.authority() else {
        return Err(format!("URL `{s}` has no host"));
    };
    if authority.host().is_empty() {
        return Err(format!("URL `{s}` has no host"));
    }
    // Credentials come before the last `@`; an IPv6 host's colons are inside its brackets, so
    // only a colon after them starts a port; an empty port is the scheme's (RFC 3986 3.2.3).
    let host_port = authority.as_str().rsplit('@').next().unwrap_or_default();
    if let Some(port) = host_port
        .rsplit_once(':')
        .and_then(|(_, p)| (!p.contains(']') && !p.is_empty()).then_some(p))
    {
        if !matches!(port.parse::<u16>(), Ok(1..)) {
            return Err(format!(
                "invalid port `{port}` in `{s}`: expected a number from 1 to 65535"
            ));
        }
    }
    Ok(uri)
}

fn parse_upstream_url(s: &str) -> Result<(Scheme, Authority), String> {
    let uri = parse_http_url(s)?;
    let scheme = match uri.scheme_str() {
        Some("https") => Scheme::HTTPS,
        _ => Scheme::HTTP,
    };
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| format!("URL `{s}` has no host"))?;
    if authority.as_str().contains('@') {
        return Err("credentials in an upstream URL are not supported".into());
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(format!(
            "an upstream URL is scheme://host:port only; requests keep their own path (found `{s}`)"
        ));
    }
    Ok((scheme, authority))
}

fn decode_default_upstream(
    d: &mut Decoder<'_>,
    top: &Fields<'_>,
    upstreams: &[Upstream],
) -> Option<usize> {
    match top.get("default_upstream") {
        Some(n) => {
            let name = d.string(n, "default_upstream")?;
            let found = upstreams.iter().position(|u| u.name == name);
            // Named in the file counts as known even when its own settings are invalid (and
            // already reported): the reference itself is fine.
            if found.is_none() && !d.declared_upstreams.contains(&name) {
                let known = d.declared_upstreams.join(", ");
                d.error(
                    n.mark,
                    "default_upstream",
                    format!("no upstream named `{name}` (known: {known})"),
                );
            }
            found
        }
        None if upstreams.len() == 1 => Some(0),
        None if upstreams.is_empty() => None,
        None => {
            d.error(
                top.mark,
                "default_upstream",
                "is required when there is more than one upstream",
            );
            None
        }
    }
}

fn decode_limits(d: &mut Decoder<'_>, node: Option<&Node>) -> Limits {
    let mut limits = Limits {
        capture_body: 1 << 20,
        max_header_bytes: 64 << 10,
        header_read_timeout: Duration::from_secs(10),
    };
    let Some(node) = node else { return limits };
    let Some(f) = d.map(
        node,
        "limits",
        &["capture_body", "max_header_bytes", "header_read_timeout"],
    ) else {
        return limits;
    };
    limits.capture_body = d.field(
        &f,
        "limits",
        "capture_body",
        limits.capture_body,
        parse_size,
    );
    let header_bytes = d.field(&f, "limits", "max_header_bytes", 64 << 10, |s| {
        let n = parse_size(s)?;
        if !(MIN_HEADER_BYTES..=(16 << 20)).contains(&n) {
            return Err(format!("must be between 8KiB and 16MiB, found `{s}`"));
        }
        Ok(n)
    });
    limits.max_header_bytes = usize::try_from(header_bytes).unwrap_or(64 << 10);
    limits.header_read_timeout = d.timeout(
        &f,
        "limits",
        "header_read_timeout",
        limits.header_read_timeout,
    );
    limits
}

fn decode_shutdown(d: &mut Decoder<'_>, node: Option<&Node>) -> Shutdown {
    let mut s = Shutdown {
        drain_timeout: Duration::from_secs(30),
        delivery_timeout: Duration::from_secs(5),
    };
    let Some(node) = node else { return s };
    let Some(f) = d.map(node, "shutdown", &["drain_timeout", "delivery_timeout"]) else {
        return s;
    };
    s.drain_timeout = d.field(
        &f,
        "shutdown",
        "drain_timeout",
        s.drain_timeout,
        parse_duration,
    );
    s.delivery_timeout = d.field(
        &f,
        "shutdown",
        "delivery_timeout",
        s.delivery_timeout,
        parse_duration,
    );
    s
}

fn decode_log(d: &mut Decoder<'_>, node: Option<&Node>) -> Log {
    let mut log = Log {
        format: LogFormat::Json,
        level: "info".into(),
        access: false,
    };
    let Some(node) = node else { return log };
    let Some(f) = d.map(node, "log", &["format", "level", "access"]) else {
        return log;
    };
    log.format = d.field(&f, "log", "format", LogFormat::Json, |s| match s {
        "json" => Ok(LogFormat::Json),
        "text" => Ok(LogFormat::Text),
        _ => Err(format!("expected `json` or `text`, found `{s}`")),
    });
    log.level = d.field(&f, "log", "level", log.level.clone(), |s| {
        match s {
            "trace" | "debug" | "info" | "warn" | "error" => Ok(s.to_string()),
            // A full tracing filter, e.g. `info,ficus::proxy=debug`.
            _ if s.contains('=') || s.contains(',') => Ok(s.to_string()),
            _ => Err(format!(
                "expected trace, debug, info, warn, error or a filter such as `info,ficus=debug`, found `{s}`"
            )),
        }
    });
    log.access = d.field(&f, "log", "access", false, decode::parse_bool);
    log
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(super) fn load(text: &str) -> Result<Config, Vec<String>> {
        let env = |name: &str| match name {
            "MONOLITH" => Some("http://127.0.0.1:3000".to_string()),
            _ => None,
        };
        Config::from_str_with_env(text, "f.yaml", &env).map_err(|e| match e {
            LoadError::Invalid(list) => list.iter().map(|e| e.to_string()).collect(),
            other => vec![other.to_string()],
        })
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = load("upstreams:\n  monolith:\n    url: ${MONOLITH}\n").expect("valid");
        assert_eq!(c.listen.address, "0.0.0.0:8080".parse().expect("addr"));
        assert_eq!(c.admin.address, "0.0.0.0:9090".parse().expect("addr"));
        assert_eq!(c.default_upstream, 0);
        assert_eq!(c.upstreams[0].authority.as_str(), "127.0.0.1:3000");
        assert_eq!(c.upstreams[0].timeout, Duration::from_secs(30));
        assert_eq!(c.limits.max_header_bytes, 65536);
        assert_eq!(c.log.format, LogFormat::Json);
        assert!(!c.log.access);
        assert!(c.listen.trust_forwarded_headers);
    }

    /// Exactly the `expected` errors (each given by how it starts), in any order.
    pub(crate) fn assert_errors(errors: &[String], expected: &[&str]) {
        for want in expected {
            assert!(
                errors.iter().any(|e| e.starts_with(want)),
                "missing `{want}` in {errors:#?}"
            );
        }
        assert_eq!(errors.len(), expected.len(), "{errors:#?}");
    }

    #[test]
    fn every_error_is_reported_with_its_place() {
        let errors = load(concat!(
            "listen:\n",
            "  address: nowhere\n",
            "  colour: blue\n",
            "upstreams:\n",
            "  monolith:\n",
            "    url: ftp://x\n",
            "    timeout: 30\n",
            "  other:\n",
            "    url: ${UNSET_VAR}\n",
            "default_upstream: missing\n",
            "limits: { max_header_bytes: 1KiB }\n",
            "log: { format: xml }\n",
        ))
        .expect_err("invalid");
        let expected = [
            "f.yaml:2:12: listen.address: expected an address",
            "f.yaml:3:3: listen.colour: unknown key",
            "f.yaml:6:10: upstreams.monolith.url: expected an http:// or https:// URL",
            "f.yaml:7:14: upstreams.monolith.timeout: expected a duration",
            "f.yaml:9:10: upstreams.other.url: environment variable `UNSET_VAR` is not set",
            "f.yaml:10:19: default_upstream: no upstream named `missing` (known: monolith, other)",
            "f.yaml:11:29: limits.max_header_bytes: must be between 8KiB and 16MiB",
            "f.yaml:12:16: log.format: expected `json` or `text`",
        ];
        assert_errors(&errors, &expected);
    }

    #[test]
    fn every_unset_variable_of_a_value_is_reported() {
        let errors = load(concat!(
            "upstreams:\n",
            "  m: { url: \"http://${MISSING1}:${MISSING2}\" }\n",
        ))
        .expect_err("invalid");
        assert_errors(
            &errors,
            &["f.yaml:2:13: upstreams.m.url: environment variables `MISSING1`, `MISSING2` are not set"],
        );
    }

    #[test]
    fn a_url_port_that_no_connection_can_use_is_an_error_not_port_80() {
        let errors = load(concat!(
            "upstreams:\n",
            "  a: { url: \"http://127.0.0.1:65536\" }\n",
            "  b: { url: \"http://127.0.0.1:0\" }\n",
            "  c: { url: \"https://[::1]:99999\" }\n",
            "  d: { url: \"http://u:p@h:70000\" }\n",
            "  e: { url: \"http://[::1]\" }\n",
            "  g: { url: \"http://h:\" }\n",
            "  f: { url: \"http://h:65535\" }\n",
            "default_upstream: e\n",
            "sinks:\n",
            "  s: { type: http, url: \"http://127.0.0.1:99999/ingest\" }\n",
        ))
        .expect_err("invalid");
        let expected = [
            "f.yaml:2:13: upstreams.a.url: invalid port `65536`",
            "f.yaml:3:13: upstreams.b.url: invalid port `0`",
            "f.yaml:4:13: upstreams.c.url: invalid port `99999`",
            "f.yaml:5:13: upstreams.d.url: invalid port `70000`",
            "f.yaml:11:25: sinks.s.url: invalid port `99999`",
        ];
        assert_errors(&errors, &expected);
    }

    #[test]
    fn clashes_are_located_at_the_value_and_invalid_declarations_cause_no_second_error() {
        let errors = load(concat!(
            "listen: { address: \"127.0.0.1:8080\" }\n",
            "admin:\n",
            "  address: \"127.0.0.1:8080\"\n",
            "upstreams:\n",
            "  m: { url: \"http://a:1\" }\n",
            "  broken: { url: \"ftp://x\" }\n",
            "routes:\n",
            "  - name: r\n",
            "    match: { path: /a }\n",
            "    upstream: m\n",
            "  - name: r\n",
            "    match: { path: /b }\n",
            "    upstream: broken\n",
            "events:\n",
            "  rules:\n",
            "    - name: e\n",
            "      match: { path: /a }\n",
            "      type: t\n",
            "      sinks: [bad, gone]\n",
            "    - name: e\n",
            "      match: { path: /b }\n",
            "      type: t\n",
            "sinks:\n",
            "  bad: { type: http, url: \"nope\" }\n",
            "default_upstream: m\n",
        ))
        .expect_err("invalid");
        let expected = [
            "f.yaml:3:12: admin.address: must differ from listen.address",
            "f.yaml:6:18: upstreams.broken.url: expected an http:// or https:// URL",
            "f.yaml:11:11: routes[1].name: duplicate route name `r`",
            "f.yaml:19:20: events.rules[0].sinks[1]: no sink named `gone` (known: bad)",
            "f.yaml:20:13: events.rules[1].name: duplicate rule name `e`",
            "f.yaml:24:27: sinks.bad.url:",
        ];
        // Not `routes[0].upstream: no upstream named broken`, nor `sinks[0]: no sink named bad`.
        assert_errors(&errors, &expected);
    }

    #[test]
    fn each_bad_data_template_and_redact_path_is_reported_at_its_value() {
        let errors = load(concat!(
            "upstreams: { m: { url: \"http://a:1\" } }\n",
            "sinks: { out: { type: stdout } }\n",
            "events:\n",
            "  rules:\n",
            "    - name: e\n",
            "      type: t\n",
            "      match: { path: /a }\n",
            "      data:\n",
            "        a: \"{response.body.id}\"\n",
            "        b: \"{resp.x}\"\n",
            "        c: { d: \"{zzz}\", e: [1, \"x {nope.y}\"] }\n",
            "  redact: [request.body.password, bogus.x, request.body.card, also.bad]\n",
        ))
        .expect_err("invalid");
        let expected = [
            "f.yaml:10:12: events.rules[0].data.b: ",
            "f.yaml:11:17: events.rules[0].data.c.d: ",
            "f.yaml:11:33: events.rules[0].data.c.e[1]: ",
            "f.yaml:12:35: events.redact[1]: ",
            "f.yaml:12:63: events.redact[3]: ",
        ];
        assert_errors(&errors, &expected);
    }

    #[test]
    fn a_duplicate_key_is_one_error_among_the_others_with_its_path() {
        let errors = load(concat!(
            "upstreams:\n",
            "  m: { url: \"http://127.0.0.1:1\" }\n",
            "  m: { url: \"http://127.0.0.1:2\" }\n",
            "listen: { address: nope }\n",
            "log: { format: xml }\n",
            "log: { level: info }\n",
            "routes:\n",
            "  - name: r\n",
            "    match: { path: /a, path: /b }\n",
            "    upstream: m\n",
        ))
        .expect_err("invalid");
        let expected = [
            "f.yaml:3:3: upstreams.m: duplicate key `m`",
            "f.yaml:4:20: listen.address: expected an address",
            "f.yaml:5:16: log.format: expected `json` or `text`",
            "f.yaml:6:1: log: duplicate key `log`",
            "f.yaml:9:24: routes[0].match.path: duplicate key `path`",
        ];
        assert_errors(&errors, &expected);
    }

    #[test]
    fn every_error_of_a_route_is_reported_whatever_else_is_wrong() {
        let errors = load(concat!(
            "upstreams:\n",
            "  a: { url: \"http://a:1\" }\n",
            "  b: { url: \"ftp://b\" }\n",
            "default_upstream: a\n",
            "routes:\n",
            "  - name: r1\n",
            "    match: { path: /x }\n",
            "    upstream: a\n",
            "    shadow: { upstream: b, sample: 2, methods: [\"X Y\", \"A B\"], timeout: 0s, compare: { headers: [\"bad header\"], ignore: [foo.bar] } }\n",
            "    fallback: { upstream: b, methods: [\"X Y\"] }\n",
            "  - name: r2\n",
            "    match: { path: /y }\n",
            "    split: []\n",
            "    sticky: { header: \"bad header\" }\n",
            "  - name: r3\n",
            "    match: { path: /z }\n",
            "    split: [{ upstream: a, weight: 1.5 }, { upstream: a }]\n",
            "  - name: r4\n",
            "    match: { path: /w }\n",
            "    split: [{ upstream: a, weight: 0 }, { upstream: a, weight: 0 }]\n",
        ))
        .expect_err("invalid");
        let expected = [
            "f.yaml:3:13: upstreams.b.url: expected an http:// or https:// URL",
            "f.yaml:9:36: routes[0].shadow.sample: expected a fraction from 0 to 1",
            "f.yaml:9:49: routes[0].shadow.methods[0]: not an HTTP method: `X Y`",
            "f.yaml:9:56: routes[0].shadow.methods[1]: not an HTTP method: `A B`",
            "f.yaml:9:73: routes[0].shadow.timeout: must be greater than zero",
            "f.yaml:9:98: routes[0].shadow.compare.headers[0]: not a header name",
            "f.yaml:9:122: routes[0].shadow.compare.ignore[0]: expected a path such as",
            "f.yaml:10:40: routes[0].fallback.methods[0]: not an HTTP method: `X Y`",
            "f.yaml:13:12: routes[1].split: needs at least one upstream",
            "f.yaml:14:23: routes[1].sticky.header: not a header name: `bad header`",
            "f.yaml:17:36: routes[2].split[0].weight: expected a whole number",
            "f.yaml:17:43: routes[2].split[1].weight: is required",
            "f.yaml:20:12: routes[3].split: the weights must not all be zero",
        ];
        assert_errors(&errors, &expected);
    }

    #[test]
    fn routes_name_known_upstreams() {
        let errors = load(concat!(
            "upstreams: { m: { url: \"http://a:1\" }, f: { url: \"http://b:1\" } }\n",
            "default_upstream: m\n",
            "routes:\n",
            "  - name: r\n",
            "    match: { path: /x }\n",
            "    split: [{ upstream: m, weight: 90 }, { upstream: nope, weight: 10 }]\n",
            "    fallback: gone\n",
        ))
        .expect_err("unknown upstreams");
        assert!(
            errors
                .iter()
                .any(|e| e.contains("routes[0].split[1].upstream: no upstream named `nope`")),
            "{errors:?}"
        );
        assert!(
            errors
                .iter()
                .any(|e| e.contains("routes[0].fallback: no upstream named `gone`")),
            "{errors:?}"
        );
    }

    #[test]
    fn default_upstream_needed_with_several() {
        let errors =
            load("upstreams:\n  a: { url: \"http://a:1\" }\n  b: { url: \"http://b:1\" }\n")
                .expect_err("ambiguous");
        assert!(
            errors[0].contains("default_upstream: is required"),
            "{errors:?}"
        );
    }

    #[test]
    fn upstream_url_must_not_carry_a_path() {
        let errors = load("upstreams: { m: { url: \"http://a:1/api\" } }\n").expect_err("path");
        assert!(errors[0].contains("scheme://host:port only"), "{errors:?}");
    }

    #[test]
    fn syntax_errors_are_located() {
        let errors = load("upstreams:\n  m: [unclosed\n").expect_err("syntax");
        assert_eq!(errors.len(), 1);
        assert!(errors[0].starts_with("f.yaml:"), "{errors:?}");
    }

    #[test]
    fn empty_file_is_an_error() {
        let errors = load("").expect_err("empty");
        assert!(errors[0].contains("empty config"), "{errors:?}");
    }
}
