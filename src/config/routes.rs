//! The `routes` section: strangler routing. Each route matches on method, path template and
//! optional exact header values, and names one upstream or a weighted `split`, with an
//! optional `fallback` and `shadow`. Upstream names are resolved to indexes here.

use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::Method;

use super::decode::{join, Decoder, Fields};
use super::yaml::{Node, Value};
use super::{valid_name, Upstream};
use crate::rules::PathTemplate;

#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub name: String,
    pub method: Option<Method>,
    pub path: PathTemplate,
    /// Exact values the request must carry, e.g. `x-canary: "1"`.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub backend: Backend,
    pub fallback: Option<Fallback>,
    pub shadow: Option<Shadow>,
    pub strip_prefix: Option<String>,
    pub add_prefix: Option<String>,
}

#[derive(Debug, Clone)]
pub enum Backend {
    Single(usize),
    Split {
        /// (upstream index, weight), weights > 0.
        choices: Vec<(usize, u32)>,
        sticky: Option<Sticky>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sticky {
    Header(HeaderName),
    Cookie(String),
}

#[derive(Debug, Clone)]
pub struct Fallback {
    pub upstream: usize,
    /// Methods that may be sent twice; the idempotent ones unless the route lists others.
    pub methods: Vec<Method>,
}

#[derive(Debug, Clone)]
pub struct Shadow {
    pub upstream: usize,
    /// Fraction of matching requests copied, 0.0 to 1.0.
    pub sample: f64,
    pub methods: Vec<Method>,
    pub compare: Option<Compare>,
    /// Shadow requests in flight at most; copies beyond it are dropped and counted.
    pub max_in_flight: usize,
    pub timeout: Duration,
}

#[derive(Debug, Clone, Default)]
pub struct Compare {
    pub headers: Vec<HeaderName>,
    /// `response.body.a.b` paths left out of the body comparison.
    pub ignore: Vec<Vec<String>>,
}

pub fn idempotent_methods() -> Vec<Method> {
    vec![
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::PUT,
        Method::DELETE,
    ]
}

const ROUTE_KEYS: &[&str] = &[
    "name",
    "match",
    "upstream",
    "split",
    "sticky",
    "fallback",
    "shadow",
    "strip_prefix",
    "add_prefix",
];

pub(super) fn decode_routes(
    d: &mut Decoder<'_>,
    node: Option<&Node>,
    upstreams: &[Upstream],
) -> Vec<RouteConfig> {
    let Some(node) = node else { return Vec::new() };
    let Value::Seq(items) = &node.value else {
        d.error(
            node.mark,
            "routes",
            format!("expected a list of routes, found {}", node.kind()),
        );
        return Vec::new();
    };
    let mut out: Vec<RouteConfig> = Vec::new();
    // Names as written, of valid and invalid routes alike.
    let mut names: Vec<&str> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let path = format!("routes[{i}]");
        if let Some(route) = decode_route(d, item, &path, upstreams) {
            out.push(route);
        }
        if let Some(name) = item.scalar("name") {
            if names.contains(&name) {
                d.error(
                    item.value_mark("name"),
                    &join(&path, "name"),
                    format!("duplicate route name `{name}`"),
                );
            }
            names.push(name);
        }
    }
    out
}

fn upstream_ref(
    d: &mut Decoder<'_>,
    node: &Node,
    path: &str,
    upstreams: &[Upstream],
) -> Option<usize> {
    let name = d.string(node, path)?;
    let found = upstreams.iter().position(|u| u.name == name);
    // An upstream declared with invalid settings was reported where it is declared.
    if found.is_none() && !d.declared_upstreams.contains(&name) {
        let known = d.declared_upstreams.join(", ");
        d.error(
            node.mark,
            path,
            format!("no upstream named `{name}` (known: {known})"),
        );
    }
    found
}

fn methods(d: &mut Decoder<'_>, node: &Node, path: &str) -> Option<Vec<Method>> {
    let Value::Seq(items) = &node.value else {
        d.error(
            node.mark,
            path,
            format!("expected a list of methods, found {}", node.kind()),
        );
        return None;
    };
    // Every item parsed, so that each bad one is reported.
    let parsed: Vec<Option<Method>> = items
        .iter()
        .enumerate()
        .map(|(i, n)| {
            d.parse(n, &format!("{path}[{i}]"), |s| {
                Method::from_bytes(s.to_ascii_uppercase().as_bytes())
                    .map_err(|_| format!("not an HTTP method: `{s}`"))
            })
        })
        .collect();
    parsed.into_iter().collect()
}

fn prefix(d: &mut Decoder<'_>, f: &Fields<'_>, path: &str, key: &str) -> Option<String> {
    let node = f.get(key)?;
    d.parse(node, &join(path, key), |s| {
        if s.starts_with('/') && !s.contains(['?', '#']) {
            Ok(s.trim_end_matches('/').to_string())
        } else {
            Err(format!(
                "expected a path prefix starting with `/`, found `{s}`"
            ))
        }
    })
}

fn decode_route(
    d: &mut Decoder<'_>,
    node: &Node,
    path: &str,
    upstreams: &[Upstream],
) -> Option<RouteConfig> {
    let f = d.map(node, path, ROUTE_KEYS)?;
    let name = match f.get("name") {
        Some(n) => d.parse(n, &join(path, "name"), |s| {
            if valid_name(s) && s != crate::routing::DEFAULT_ROUTE {
                Ok(s.to_string())
            } else {
                Err(
                    "names may use letters, digits, `-` and `_` only, and `default` is taken"
                        .into(),
                )
            }
        }),
        None => {
            d.error(f.mark, &join(path, "name"), "is required");
            None
        }
    };
    let mpath = join(path, "match");
    let (method, route_path, headers) = match f.get("match") {
        Some(m) => match d.map(m, &mpath, &["method", "path", "headers"]) {
            Some(mf) => {
                let method = mf.get("method").and_then(|n| {
                    d.parse(n, &join(&mpath, "method"), |s| {
                        Method::from_bytes(s.to_ascii_uppercase().as_bytes())
                            .map_err(|_| format!("not an HTTP method: `{s}`"))
                    })
                });
                let route_path = match mf.get("path") {
                    Some(n) => d.parse(n, &join(&mpath, "path"), PathTemplate::parse),
                    None => {
                        d.error(mf.mark, &join(&mpath, "path"), "is required");
                        None
                    }
                };
                let mut headers = Vec::new();
                if let Some(h) = mf.get("headers") {
                    let hpath = join(&mpath, "headers");
                    if let Some(entries) = d.named(h, &hpath) {
                        for (k, v) in entries {
                            let vpath = join(&hpath, &k.name);
                            let Ok(name) =
                                HeaderName::from_bytes(k.name.to_ascii_lowercase().as_bytes())
                            else {
                                d.error(k.mark, &vpath, "not a valid header name");
                                continue;
                            };
                            if let Some(value) = d.parse(v, &vpath, |s| {
                                HeaderValue::from_str(s)
                                    .map_err(|_| "not a valid header value".to_string())
                            }) {
                                headers.push((name, value));
                            }
                        }
                    }
                }
                (method, route_path, headers)
            }
            None => (None, None, Vec::new()),
        },
        None => {
            d.error(f.mark, &mpath, "is required (at least `path`)");
            (None, None, Vec::new())
        }
    };

    let backend = match (f.get("upstream"), f.get("split")) {
        (Some(u), None) => {
            upstream_ref(d, u, &join(path, "upstream"), upstreams).map(Backend::Single)
        }
        (None, Some(s)) => {
            decode_split(d, s, &join(path, "split"), upstreams, f.get("sticky"), path)
        }
        (Some(_), Some(s)) => {
            d.error(
                s.mark,
                &join(path, "split"),
                "a route has `upstream` or `split`, not both",
            );
            None
        }
        (None, None) => {
            d.error(f.mark, &join(path, "upstream"), "is required (or `split`)");
            None
        }
    };
    if f.get("sticky").is_some() && f.get("split").is_none() {
        if let Some(n) = f.get("sticky") {
            d.error(n.mark, &join(path, "sticky"), "only applies to a `split`");
        }
    }
    let fallback = f.get("fallback").and_then(|n| {
        let fpath = join(path, "fallback");
        match &n.value {
            Value::Map(_) => {
                let ff = d.map(n, &fpath, &["upstream", "methods"])?;
                // Each part decoded before any is given up on: an upstream whose own settings
                // are invalid still leaves `methods` checked.
                let upstream = match ff.get("upstream") {
                    Some(u) => upstream_ref(d, u, &join(&fpath, "upstream"), upstreams),
                    None => {
                        d.error(ff.mark, &join(&fpath, "upstream"), "is required");
                        None
                    }
                };
                let methods = match ff.get("methods") {
                    Some(m) => methods(d, m, &join(&fpath, "methods")),
                    None => Some(idempotent_methods()),
                };
                Some(Fallback {
                    upstream: upstream?,
                    methods: methods?,
                })
            }
            _ => upstream_ref(d, n, &fpath, upstreams).map(|upstream| Fallback {
                upstream,
                methods: idempotent_methods(),
            }),
        }
    });
    let shadow = f
        .get("shadow")
        .and_then(|n| decode_shadow(d, n, &join(path, "shadow"), upstreams));
    let strip_prefix = prefix(d, &f, path, "strip_prefix");
    let add_prefix = prefix(d, &f, path, "add_prefix");
    Some(RouteConfig {
        name: name?,
        method,
        path: route_path?,
        headers,
        backend: backend?,
        fallback,
        shadow,
        strip_prefix,
        add_prefix,
    })
}

fn decode_split(
    d: &mut Decoder<'_>,
    node: &Node,
    path: &str,
    upstreams: &[Upstream],
    sticky: Option<&Node>,
    route_path: &str,
) -> Option<Backend> {
    let Value::Seq(items) = &node.value else {
        d.error(
            node.mark,
            path,
            format!(
                "expected a list of {{ upstream, weight }}, found {}",
                node.kind()
            ),
        );
        return None;
    };
    if items.is_empty() {
        d.error(node.mark, path, "needs at least one upstream");
    }
    let mut choices = Vec::new();
    // Whether every weight was read: only then can "all zero" be said.
    let mut weights_read = true;
    let mut total = 0u64;
    for (i, item) in items.iter().enumerate() {
        let ipath = format!("{path}[{i}]");
        let Some(f) = d.map(item, &ipath, &["upstream", "weight"]) else {
            weights_read = false;
            continue;
        };
        let upstream = match f.get("upstream") {
            Some(u) => upstream_ref(d, u, &join(&ipath, "upstream"), upstreams),
            None => {
                d.error(f.mark, &join(&ipath, "upstream"), "is required");
                None
            }
        };
        let weight = match f.get("weight") {
            Some(w) => d.parse(w, &join(&ipath, "weight"), |s| {
                s.parse::<u32>()
                    .ok()
                    .filter(|w| *w <= 1_000_000)
                    .ok_or_else(|| {
                        format!("expected a whole number from 0 to 1000000, found `{s}`")
                    })
            }),
            None => {
                d.error(f.mark, &join(&ipath, "weight"), "is required");
                None
            }
        };
        match weight {
            Some(w) => total += u64::from(w),
            None => weights_read = false,
        }
        if let (Some(u), Some(w)) = (upstream, weight) {
            choices.push((u, w));
        }
    }
    if weights_read && total == 0 && !items.is_empty() {
        d.error(node.mark, path, "the weights must not all be zero");
    }
    let sticky = sticky.and_then(|n| {
        let spath = join(route_path, "sticky");
        let f = d.map(n, &spath, &["header", "cookie"])?;
        match (f.get("header"), f.get("cookie")) {
            (Some(h), None) => d
                .parse(h, &join(&spath, "header"), |s| {
                    HeaderName::from_bytes(s.to_ascii_lowercase().as_bytes())
                        .map_err(|_| format!("not a header name: `{s}`"))
                })
                .map(Sticky::Header),
            (None, Some(c)) => d.string(c, &join(&spath, "cookie")).map(Sticky::Cookie),
            _ => {
                d.error(
                    f.mark,
                    &spath,
                    "expected `{ header: NAME }` or `{ cookie: NAME }`",
                );
                None
            }
        }
    });
    // Every choice read and some weight above zero; anything less was reported above.
    (choices.len() == items.len() && total > 0).then_some(Backend::Split { choices, sticky })
}

fn decode_shadow(
    d: &mut Decoder<'_>,
    node: &Node,
    path: &str,
    upstreams: &[Upstream],
) -> Option<Shadow> {
    let f = d.map(
        node,
        path,
        &[
            "upstream",
            "sample",
            "methods",
            "compare",
            "max_in_flight",
            "timeout",
        ],
    )?;
    // Every part decoded before any is given up on, so that each error is reported.
    let upstream = match f.get("upstream") {
        Some(u) => upstream_ref(d, u, &join(path, "upstream"), upstreams),
        None => {
            d.error(f.mark, &join(path, "upstream"), "is required");
            None
        }
    };
    let sample = d.field(&f, path, "sample", 1.0, |s| {
        s.parse::<f64>()
            .ok()
            .filter(|v| (0.0..=1.0).contains(v))
            .ok_or_else(|| format!("expected a fraction from 0 to 1, found `{s}`"))
    });
    let methods = match f.get("methods") {
        Some(m) => methods(d, m, &join(path, "methods")).inspect(|list| {
            if list.iter().any(|m| *m != Method::GET && *m != Method::HEAD) {
                d.warn(
                    m.mark,
                    &join(path, "methods"),
                    "shadowing methods other than GET and HEAD sends writes twice: their side effects happen twice",
                );
            }
        }),
        None => Some(vec![Method::GET, Method::HEAD]),
    };
    let max_in_flight = d.field(&f, path, "max_in_flight", 64usize, |s| {
        s.parse::<usize>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("expected a positive whole number, found `{s}`"))
    });
    let timeout = d.timeout(&f, path, "timeout", Duration::from_secs(10));
    let compare = f.get("compare").and_then(|n| {
        let cpath = join(path, "compare");
        let cf = d.map(n, &cpath, &["headers", "ignore"])?;
        let mut compare = Compare::default();
        for key in ["headers", "ignore"] {
            if let Some(n) = cf.get(key).filter(|n| !matches!(n.value, Value::Seq(_))) {
                d.error(
                    n.mark,
                    &join(&cpath, key),
                    format!("expected a list, found {}", n.kind()),
                );
            }
        }
        if let Some(Value::Seq(items)) = cf.get("headers").map(|n| &n.value) {
            for (i, item) in items.iter().enumerate() {
                if let Some(h) = d.parse(item, &format!("{cpath}.headers[{i}]"), |s| {
                    HeaderName::from_bytes(s.to_ascii_lowercase().as_bytes())
                        .map_err(|_| format!("not a header name: `{s}`"))
                }) {
                    compare.headers.push(h);
                }
            }
        }
        if let Some(Value::Seq(items)) = cf.get("ignore").map(|n| &n.value) {
            for (i, item) in items.iter().enumerate() {
                if let Some(p) = d.parse(item, &format!("{cpath}.ignore[{i}]"), ignore_path) {
                    compare.ignore.push(p);
                }
            }
        }
        Some(compare)
    });
    Some(Shadow {
        upstream: upstream?,
        sample,
        methods: methods?,
        compare,
        max_in_flight,
        timeout,
    })
}

/// `response.body.a.b[2].c` into `["a", "b", "2", "c"]`: the rules' own path syntax, so that a
/// path copied from a rule means the same here.
fn ignore_path(s: &str) -> Result<Vec<String>, String> {
    let bad = || {
        format!("expected a path such as response.body.generated_at or response.body.items[0].ts, found `{s}`")
    };
    let mut rest = s.strip_prefix("response.body").ok_or_else(bad)?;
    let mut out = Vec::new();
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix('.') {
            let end = after.find(['.', '[']).unwrap_or(after.len());
            if end == 0 {
                return Err(bad());
            }
            out.push(after[..end].to_string());
            rest = &after[end..];
        } else if let Some(after) = rest.strip_prefix('[') {
            let (index, tail) = after.split_once(']').ok_or_else(bad)?;
            if index.is_empty() || !index.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            out.push(index.to_string());
            rest = tail;
        } else {
            return Err(bad());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::ignore_path;

    #[test]
    fn ignore_paths_read_like_rule_paths() {
        assert_eq!(
            ignore_path("response.body.items[0].ts").expect("valid"),
            ["items", "0", "ts"]
        );
        assert_eq!(
            ignore_path("response.body.meta.generated_at").expect("valid"),
            ["meta", "generated_at"]
        );
        assert!(ignore_path("response.body").expect("valid").is_empty());
        for bad in [
            "request.body.x",
            "response.bodyx",
            "response.body..x",
            "response.body[x]",
            "response.body[1",
        ] {
            assert!(ignore_path(bad).is_err(), "{bad}");
        }
    }
}
