//! `{...}` placeholders: the names they reach into an exchange, and the templates built of them.

use std::borrow::Cow;
use std::fmt;

use http::HeaderName;
use serde_json::Value;

use super::exchange::{header_text, Exchange};
use super::{KeyStep, Needs};

/// What a rule author may write inside `{...}`; shown when a name is not one of them.
pub(crate) const NAMES: &str = "request.method, request.path, request.query.NAME, \
request.headers.NAME, request.body[.field|[index]]..., path.NAME, response.status, \
response.headers.NAME, response.body[...]";

/// A name inside a placeholder, checked when the config loads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Expr {
    RequestMethod,
    RequestPath,
    RequestQuery(String),
    RequestHeader(HeaderName),
    RequestBody(Vec<Step>),
    Path(String),
    ResponseStatus,
    ResponseHeader(HeaderName),
    ResponseBody(Vec<Step>),
}

/// One step into a body: `.field`, `[index]`, or (in redaction paths only) `[*]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    Field(String),
    Index(usize),
    Every,
}

impl Expr {
    pub(crate) fn parse(s: &str) -> Result<Expr, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err(format!(
                "an empty placeholder names nothing; use one of: {NAMES}"
            ));
        }
        let (root, rest) = split_root(s);
        match root {
            "request" | "response" => {}
            "path" => {
                let name = named(
                    s,
                    rest,
                    "path",
                    "a parameter of the rule's path, e.g. path.id",
                )?;
                if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(format!("`{s}`: `{name}` is not a path parameter name"));
                }
                return Ok(Expr::Path(name.to_string()));
            }
            _ => return Err(format!("unknown name `{s}`; use one of: {NAMES}")),
        }
        let Some(after) = rest.strip_prefix('.') else {
            let fields = if root == "request" {
                "method, path, query, headers, body"
            } else {
                "status, headers, body"
            };
            return Err(format!(
                "`{s}`: name a part of the {root}: {root}.{{{fields}}}"
            ));
        };
        let (field, rest) = split_root(after);
        let request = root == "request";
        let leaf = |e: Expr| {
            if rest.is_empty() {
                Ok(e)
            } else {
                Err(format!("`{root}.{field}` has no fields, found `{s}`"))
            }
        };
        match (request, field) {
            (true, "method") => leaf(Expr::RequestMethod),
            (true, "path") => leaf(Expr::RequestPath),
            (false, "status") => leaf(Expr::ResponseStatus),
            (true, "query") => Ok(Expr::RequestQuery(
                named(
                    s,
                    rest,
                    "request.query",
                    "a query parameter, e.g. request.query.page",
                )?
                .to_string(),
            )),
            (_, "headers") => {
                let prefix = if request {
                    "request.headers"
                } else {
                    "response.headers"
                };
                let example = format!("a header, e.g. {prefix}.content-type");
                let name = named(s, rest, prefix, &example)?;
                let name = HeaderName::from_bytes(name.as_bytes())
                    .map_err(|_| format!("`{s}`: `{name}` is not a valid header name"))?;
                Ok(if request {
                    Expr::RequestHeader(name)
                } else {
                    Expr::ResponseHeader(name)
                })
            }
            (_, "body") => {
                let steps = parse_steps(s, rest, false)?;
                Ok(if request {
                    Expr::RequestBody(steps)
                } else {
                    Expr::ResponseBody(steps)
                })
            }
            _ => Err(format!("unknown name `{s}`; use one of: {NAMES}")),
        }
    }

    /// The value this name has in `ex`: borrowed from a parsed body, else built. A missing
    /// value is `null`.
    pub(crate) fn lookup<'a>(
        &self,
        ex: &'a Exchange,
        params: &[(String, String)],
    ) -> Cow<'a, Value> {
        let owned = |o: Option<String>| Cow::Owned(o.map_or(Value::Null, Value::String));
        match self {
            Expr::RequestMethod => owned(Some(ex.method.as_str().to_string())),
            Expr::RequestPath => owned(Some(ex.path.clone())),
            Expr::RequestQuery(name) => owned(ex.query_param(name)),
            Expr::RequestHeader(name) => owned(header_text(&ex.request_headers, name)),
            Expr::RequestBody(steps) => ex.request_body.lookup(steps),
            Expr::Path(name) => owned(
                params
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.clone()),
            ),
            Expr::ResponseStatus => Cow::Owned(Value::from(ex.status)),
            Expr::ResponseHeader(name) => owned(header_text(&ex.response_headers, name)),
            Expr::ResponseBody(steps) => ex.response_body.lookup(steps),
        }
    }

    fn add_needs(&self, needs: &mut Needs) {
        match self {
            Expr::RequestBody(_) => needs.request_body = true,
            Expr::ResponseBody(_) => needs.response_body = true,
            Expr::RequestHeader(h) => needs.add_request_header(h.clone()),
            Expr::ResponseHeader(h) => needs.add_response_header(h.clone()),
            _ => {}
        }
    }
}

/// `("request", ".body.id")` from `request.body.id`: the leading name and what follows it.
fn split_root(s: &str) -> (&str, &str) {
    let end = s.find(['.', '[']).unwrap_or(s.len());
    (&s[..end], &s[end..])
}

/// The `NAME` of `prefix.NAME`, which may itself hold dots and dashes (`x-request.id`).
fn named<'s>(s: &str, rest: &'s str, prefix: &str, what: &str) -> Result<&'s str, String> {
    match rest.strip_prefix('.') {
        Some(name) if !name.is_empty() => Ok(name),
        _ => Err(format!("`{s}`: `{prefix}` needs a name: {what}")),
    }
}

/// `.field`, `[0]` (and `[*]` when `every` is allowed) steps after `request.body`.
pub(crate) fn parse_steps(s: &str, mut rest: &str, every: bool) -> Result<Vec<Step>, String> {
    let mut steps = Vec::new();
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix('.') {
            let end = after.find(['.', '[']).unwrap_or(after.len());
            let field = &after[..end];
            if field.is_empty() {
                return Err(format!("`{s}`: empty field name"));
            }
            if field.contains(']') {
                return Err(format!("`{s}`: unmatched `]`"));
            }
            steps.push(Step::Field(field.to_string()));
            rest = &after[end..];
        } else if let Some(after) = rest.strip_prefix('[') {
            let Some(end) = after.find(']') else {
                return Err(format!("`{s}`: unclosed `[`"));
            };
            let index = after[..end].trim();
            if every && index == "*" {
                steps.push(Step::Every);
            } else {
                let n = index.parse::<usize>().map_err(|_| {
                    let allowed = if every { " or `*`" } else { "" };
                    format!("`{s}`: an index is a number from 0{allowed}, found `[{index}]`")
                })?;
                steps.push(Step::Index(n));
            }
            rest = &after[end + 1..];
        } else {
            return Err(format!("`{s}`: expected `.field` or `[index]` at `{rest}`"));
        }
    }
    Ok(steps)
}

pub(crate) fn descend<'a>(mut v: &'a Value, steps: &[Step]) -> Cow<'a, Value> {
    for step in steps {
        let next = match (step, v) {
            (Step::Field(f), Value::Object(map)) => map.get(f),
            (Step::Index(i), Value::Array(items)) => items.get(*i),
            _ => None,
        };
        match next {
            Some(n) => v = n,
            None => return Cow::Owned(Value::Null),
        }
    }
    Cow::Borrowed(v)
}

/// A string that may hold `{...}` placeholders: `shop.order.created`, `{response.body.id}`,
/// `order-{path.id}`. `{{` and `}}` are literal braces.
#[derive(Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Text(String),
    Expr(Expr),
}

impl Template {
    pub fn parse(s: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut i = 0;
        while i < s.len() {
            let rest = &s[i..];
            if rest.starts_with("{{") {
                text.push('{');
                i += 2;
            } else if rest.starts_with("}}") {
                text.push('}');
                i += 2;
            } else if rest.starts_with('}') {
                return Err(format!(
                    "unmatched `}}` at column {} of `{s}`; write `}}}}` for a literal brace",
                    column(s, i)
                ));
            } else if let Some(after) = rest.strip_prefix('{') {
                let Some(end) = after.find('}') else {
                    return Err(format!(
                        "unclosed `{{` at column {} of `{s}`; write `{{{{` for a literal brace",
                        column(s, i)
                    ));
                };
                let inner = &after[..end];
                if inner.contains('{') {
                    return Err(format!("`{{` inside a placeholder in `{s}`"));
                }
                if !text.is_empty() {
                    parts.push(Part::Text(std::mem::take(&mut text)));
                }
                parts.push(Part::Expr(Expr::parse(inner)?));
                i += 1 + end + 1;
            } else {
                let next = rest.find(['{', '}']).unwrap_or(rest.len());
                text.push_str(&rest[..next]);
                i += next;
            }
        }
        if !text.is_empty() || parts.is_empty() {
            parts.push(Part::Text(text));
        }
        Ok(Template {
            source: s.to_string(),
            parts,
        })
    }

    /// A template without placeholders: `text` as it is, braces included.
    pub fn constant(text: &str) -> Template {
        Template {
            source: text.replace('{', "{{").replace('}', "}}"),
            parts: vec![Part::Text(text.to_string())],
        }
    }

    /// [`eval_with`](Self::eval_with) without path parameters: every `path.NAME` is `null`.
    pub fn eval(&self, ex: &Exchange) -> Value {
        self.eval_with(ex, &[])
    }

    /// Exactly one placeholder gives its value with its JSON type; anything else gives a string
    /// where `null` renders empty and objects and arrays as compact JSON.
    pub fn eval_with(&self, ex: &Exchange, params: &[(String, String)]) -> Value {
        match self.parts.as_slice() {
            [Part::Expr(e)] => e.lookup(ex, params).into_owned(),
            [Part::Text(t)] => Value::String(t.clone()),
            parts => {
                let mut out = String::new();
                for part in parts {
                    match part {
                        Part::Text(t) => out.push_str(t),
                        Part::Expr(e) => render_into(&mut out, &e.lookup(ex, params)),
                    }
                }
                Value::String(out)
            }
        }
    }

    pub fn needs(&self) -> Needs {
        let mut needs = Needs::default();
        for part in &self.parts {
            if let Part::Expr(e) = part {
                e.add_needs(&mut needs);
            }
        }
        needs
    }

    /// The `path.NAME` parameters it uses, to check them against the rule's path template.
    pub fn path_params(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Expr(Expr::Path(name)) => Some(name.as_str()),
            _ => None,
        })
    }

    /// The text, when the template has no placeholder (such as most `type`s).
    pub fn as_constant(&self) -> Option<&str> {
        match self.parts.as_slice() {
            [Part::Text(t)] => Some(t),
            _ => None,
        }
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }
}

/// The 1-based column, in characters, of byte offset `i`.
fn column(s: &str, i: usize) -> usize {
    s.get(..i).map_or(i, |p| p.chars().count()) + 1
}

/// A value as text inside a string: `null` is empty, a string is itself, anything else its
/// compact JSON.
fn render_into(out: &mut String, v: &Value) {
    match v {
        Value::Null => {}
        Value::String(s) => out.push_str(s),
        other => out.push_str(&other.to_string()),
    }
}

/// A value as a CloudEvents attribute: `None` when null or empty (the attribute is left out),
/// else its text (`42`, `true`, compact JSON for objects).
pub(crate) fn attribute(v: Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(s) if s.is_empty() => None,
        Value::String(s) => Some(s),
        other => Some(other.to_string()),
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl fmt::Debug for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Template({:?})", self.source)
    }
}

/// The `data` of a rule: any tree whose string leaves are [`Template`]s; numbers, booleans and
/// nulls stay as written, and object keys are literal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataTemplate {
    Literal(Value),
    Template(Template),
    Array(Vec<DataTemplate>),
    Object(Vec<(String, DataTemplate)>),
}

impl DataTemplate {
    /// The whole tree at once; an error names where it is (`items[1].id: ...`). A config
    /// decoder that wants each error at its own line builds the tree itself from
    /// [`Template::parse`] and the variants instead.
    pub fn from_json(v: &Value) -> Result<DataTemplate, String> {
        Self::build(v, &mut String::new())
    }

    fn build(v: &Value, at: &mut String) -> Result<DataTemplate, String> {
        Ok(match v {
            Value::String(s) => DataTemplate::Template(Template::parse(s).map_err(|e| {
                if at.is_empty() {
                    e
                } else {
                    format!("{at}: {e}")
                }
            })?),
            Value::Array(items) => {
                let mut out = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    let len = at.len();
                    at.push_str(&format!("[{i}]"));
                    out.push(Self::build(item, at)?);
                    at.truncate(len);
                }
                DataTemplate::Array(out)
            }
            Value::Object(map) => {
                let mut out = Vec::with_capacity(map.len());
                for (k, item) in map {
                    let len = at.len();
                    if !at.is_empty() {
                        at.push('.');
                    }
                    at.push_str(k);
                    out.push((k.clone(), Self::build(item, at)?));
                    at.truncate(len);
                }
                DataTemplate::Object(out)
            }
            other => DataTemplate::Literal(other.clone()),
        })
    }

    pub fn eval(&self, ex: &Exchange) -> Value {
        self.eval_with(ex, &[])
    }

    pub fn eval_with(&self, ex: &Exchange, params: &[(String, String)]) -> Value {
        match self {
            DataTemplate::Literal(v) => v.clone(),
            DataTemplate::Template(t) => t.eval_with(ex, params),
            DataTemplate::Array(items) => {
                Value::Array(items.iter().map(|i| i.eval_with(ex, params)).collect())
            }
            DataTemplate::Object(entries) => Value::Object(
                entries
                    .iter()
                    .map(|(k, v)| (k.clone(), v.eval_with(ex, params)))
                    .collect(),
            ),
        }
    }

    pub fn needs(&self) -> Needs {
        let mut needs = Needs::default();
        self.visit(&mut |t| needs.merge(&t.needs()));
        needs
    }

    pub fn path_params(&self) -> Vec<&str> {
        let mut names = Vec::new();
        self.visit(&mut |t| names.extend(t.path_params()));
        names
    }

    /// [`path_params`](Self::path_params), each with the key path of the value it is in
    /// (`[Key("items"), Index(1)]`), so that an error about it can point at that value.
    pub fn path_params_at(&self) -> Vec<(Vec<KeyStep>, &str)> {
        let mut found = Vec::new();
        self.visit_at(&mut Vec::new(), &mut found);
        found
    }

    fn visit_at<'a>(&'a self, at: &mut Vec<KeyStep>, found: &mut Vec<(Vec<KeyStep>, &'a str)>) {
        match self {
            DataTemplate::Literal(_) => {}
            DataTemplate::Template(t) => found.extend(t.path_params().map(|p| (at.clone(), p))),
            DataTemplate::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    at.push(KeyStep::Index(i));
                    item.visit_at(at, found);
                    at.pop();
                }
            }
            DataTemplate::Object(entries) => {
                for (k, v) in entries {
                    at.push(KeyStep::Key(k.clone()));
                    v.visit_at(at, found);
                    at.pop();
                }
            }
        }
    }

    fn visit<'a>(&'a self, f: &mut impl FnMut(&'a Template)) {
        match self {
            DataTemplate::Literal(_) => {}
            DataTemplate::Template(t) => f(t),
            DataTemplate::Array(items) => items.iter().for_each(|i| i.visit(f)),
            DataTemplate::Object(entries) => entries.iter().for_each(|(_, v)| v.visit(f)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::{HeaderValue, Method};
    use serde_json::json;

    use crate::rules::Captured;

    fn t(s: &str) -> Template {
        Template::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn json_body(v: Value) -> Captured {
        Captured::new(
            Bytes::from(v.to_string()),
            Some(&HeaderValue::from_static("application/json")),
            false,
        )
    }

    fn exchange() -> Exchange {
        let mut ex = Exchange::new(Method::POST, "/orders/42?page=2&tag=a%20b&flag", 201);
        ex.request_headers
            .insert("idempotency-key", HeaderValue::from_static("k-1"));
        ex.request_headers
            .append("accept", HeaderValue::from_static("a/b"));
        ex.request_headers
            .append("accept", HeaderValue::from_static("c/d"));
        ex.request_body = json_body(json!({
            "customer_id": "c-9",
            "items": [{"sku": "A", "qty": 2}, {"sku": "B", "qty": 1}],
            "matrix": [[1, 2], [3, 4]],
            "gift": false,
        }));
        ex.response_headers
            .insert("location", HeaderValue::from_static("/orders/42"));
        ex.response_body = json_body(json!({
            "id": 42,
            "total": 12.5,
            "paid": true,
            "note": null,
            "customer": {"id": "c-9", "tier": "gold"},
            "tags": ["new", "web"],
            "name": "Ann",
        }));
        ex
    }

    fn params() -> Vec<(String, String)> {
        vec![("id".into(), "42".into())]
    }

    fn eval(s: &str) -> Value {
        t(s).eval_with(&exchange(), &params())
    }

    #[test]
    fn a_lone_placeholder_keeps_the_json_type() {
        assert_eq!(eval("{response.body.id}"), json!(42));
        assert_eq!(eval("{response.body.total}"), json!(12.5));
        assert_eq!(eval("{response.body.paid}"), json!(true));
        assert_eq!(eval("{response.body.note}"), Value::Null);
        assert_eq!(
            eval("{response.body.customer}"),
            json!({"id": "c-9", "tier": "gold"})
        );
        assert_eq!(eval("{response.body.tags}"), json!(["new", "web"]));
        assert_eq!(eval("{response.body.name}"), json!("Ann"));
        assert_eq!(eval("{response.status}"), json!(201));
        assert_eq!(eval("{ response.body.id }"), json!(42));
    }

    #[test]
    fn mixed_text_renders_a_string() {
        assert_eq!(eval("order-{response.body.id}"), json!("order-42"));
        assert_eq!(
            eval("{request.method} {request.path}"),
            json!("POST /orders/42")
        );
        assert_eq!(eval("n={response.body.note};"), json!("n=;"));
        assert_eq!(
            eval("c={response.body.customer}"),
            json!("c={\"id\":\"c-9\",\"tier\":\"gold\"}")
        );
        assert_eq!(eval("t={response.body.tags}"), json!("t=[\"new\",\"web\"]"));
        assert_eq!(
            eval("{response.body.paid}/{response.body.total}"),
            json!("true/12.5")
        );
        assert_eq!(eval("{{literal}} {path.id}"), json!("{literal} 42"));
        assert_eq!(eval("shop.order.created"), json!("shop.order.created"));
        assert_eq!(eval(""), json!(""));
    }

    #[test]
    fn missing_values_are_null() {
        for s in [
            "{response.body.nope}",
            "{response.body.customer.nope.deeper}",
            "{response.body.tags[5]}",
            "{response.body.id.x}",
            "{response.body.tags.x}",
            "{response.body[0]}",
            "{request.query.nope}",
            "{request.headers.x-nope}",
            "{response.headers.etag}",
            "{path.nope}",
        ] {
            assert_eq!(eval(s), Value::Null, "{s}");
        }
        // Without parameters, path names are missing too.
        assert_eq!(t("{path.id}").eval(&exchange()), Value::Null);
        // An empty body is null, and every field of it.
        let empty = Exchange::new(Method::GET, "/", 200);
        assert_eq!(t("{response.body}").eval(&empty), Value::Null);
        assert_eq!(t("{request.body.a}").eval(&empty), Value::Null);
    }

    #[test]
    fn query_header_body_and_index_access() {
        assert_eq!(eval("{request.query.page}"), json!("2"));
        assert_eq!(eval("{request.query.tag}"), json!("a b"));
        assert_eq!(eval("{request.query.flag}"), json!(""));
        assert_eq!(eval("{request.headers.idempotency-key}"), json!("k-1"));
        assert_eq!(eval("{request.headers.Idempotency-Key}"), json!("k-1"));
        assert_eq!(eval("{request.headers.accept}"), json!("a/b, c/d"));
        assert_eq!(eval("{response.headers.location}"), json!("/orders/42"));
        assert_eq!(eval("{request.body.customer_id}"), json!("c-9"));
        assert_eq!(eval("{request.body.items[1].sku}"), json!("B"));
        assert_eq!(
            eval("{request.body.items[0]}"),
            json!({"sku": "A", "qty": 2})
        );
        assert_eq!(eval("{request.body.matrix[1][0]}"), json!(3));
        assert_eq!(eval("{request.body.gift}"), json!(false));
        assert_eq!(eval("{path.id}"), json!("42"));
        assert_eq!(eval("{request.path}"), json!("/orders/42"));
        assert_eq!(eval("{request.method}"), json!("POST"));
    }

    #[test]
    fn a_text_body_is_a_string() {
        let mut ex = exchange();
        ex.response_body = Captured::new(Bytes::from_static(b"created 42"), None, false);
        assert_eq!(t("{response.body}").eval(&ex), json!("created 42"));
        assert_eq!(t("{response.body.id}").eval(&ex), Value::Null);
    }

    #[test]
    fn parse_errors() {
        let cases = [
            ("{response.body.id", "unclosed `{` at column 1 of `{response.body.id`"),
            ("a}b", "unmatched `}` at column 2 of `a}b`; write `}}` for a literal brace"),
            ("ü-{x", "unclosed `{` at column 3 of `ü-{x`"),
            ("{}", "an empty placeholder names nothing; use one of: request.method"),
            ("{ }", "an empty placeholder"),
            ("{a{b}}", "`{` inside a placeholder in `{a{b}}`"),
            ("{body.id}", "unknown name `body.id`; use one of: request.method, request.path"),
            ("{responses.body}", "unknown name `responses.body`"),
            ("{request.bodyx}", "unknown name `request.bodyx`"),
            ("{response.method}", "unknown name `response.method`"),
            ("{request.status}", "unknown name `request.status`"),
            ("{request}", "`request`: name a part of the request: request.{method, path, query, headers, body}"),
            ("{response[0]}", "`response[0]`: name a part of the response: response.{status, headers, body}"),
            ("{request.method.x}", "`request.method` has no fields, found `request.method.x`"),
            ("{response.status[0]}", "`response.status` has no fields"),
            ("{request.headers}", "`request.headers`: `request.headers` needs a name: a header"),
            (
                "{response.headers.}",
                "`response.headers.`: `response.headers` needs a name: a header, e.g. response.headers.content-type",
            ),
            ("{request.headers.bad header}", "`request.headers.bad header`: `bad header` is not a valid header name"),
            ("{request.query}", "`request.query`: `request.query` needs a name"),
            ("{path}", "`path`: `path` needs a name: a parameter of the rule's path"),
            ("{path.a-b}", "`path.a-b`: `a-b` is not a path parameter name"),
            ("{request.body.}", "`request.body.`: empty field name"),
            ("{request.body..a}", "`request.body..a`: empty field name"),
            ("{request.body.items[0}", "`request.body.items[0`: unclosed `[`"),
            ("{request.body.items[x]}", "`request.body.items[x]`: an index is a number from 0, found `[x]`"),
            ("{request.body.items[*]}", "`request.body.items[*]`: an index is a number from 0, found `[*]`"),
            ("{request.body.items[-1]}", "`request.body.items[-1]`: an index is a number from 0, found `[-1]`"),
            ("{request.body.a]}", "`request.body.a]`: unmatched `]`"),
            ("{request.body[0]x}", "`request.body[0]x`: expected `.field` or `[index]` at `x`"),
        ];
        for (input, want) in cases {
            let err = Template::parse(input).expect_err(input);
            assert!(err.starts_with(want), "{input}: got `{err}`, want `{want}`");
        }
    }

    #[test]
    fn needs_and_params() {
        let n =
            t("{request.body.a}-{response.headers.etag}-{request.headers.authorization}").needs();
        assert!(n.request_body);
        assert!(!n.response_body);
        assert_eq!(n.request_headers, [http::header::AUTHORIZATION]);
        assert_eq!(n.response_headers, [http::header::ETAG]);
        let n = t("{response.body}").needs();
        assert!(n.response_body && !n.request_body);
        assert!(!t("{request.query.x}{path.id}").needs().request_body);
        assert_eq!(
            t("{path.a}/{path.b}").path_params().collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(t("x.y").as_constant(), Some("x.y"));
        assert_eq!(t("a{{b}}").as_constant(), Some("a{b}"));
        assert_eq!(t("{path.a}").as_constant(), None);
        assert_eq!(t("a{{b}}").as_str(), "a{{b}}");
    }

    #[test]
    fn attributes_render_as_strings() {
        assert_eq!(attribute(json!(42)), Some("42".into()));
        assert_eq!(attribute(json!(1.5)), Some("1.5".into()));
        assert_eq!(attribute(json!(true)), Some("true".into()));
        assert_eq!(attribute(json!("x")), Some("x".into()));
        assert_eq!(attribute(json!({"a": 1})), Some("{\"a\":1}".into()));
        assert_eq!(attribute(json!("")), None);
        assert_eq!(attribute(Value::Null), None);
    }

    #[test]
    fn data_templates() {
        let d = DataTemplate::from_json(&json!({
            "order_id": "{response.body.id}",
            "customer": "{request.body.customer_id}",
            "label": "order {path.id}",
            "skus": ["{request.body.items[0].sku}", "{request.body.items[1].sku}"],
            "version": 2,
            "flag": true,
            "none": null,
            "missing": "{response.body.nope}",
        }))
        .expect("valid");
        assert_eq!(
            d.eval_with(&exchange(), &params()),
            json!({
                "order_id": 42,
                "customer": "c-9",
                "label": "order 42",
                "skus": ["A", "B"],
                "version": 2,
                "flag": true,
                "none": null,
                "missing": null,
            })
        );
        let n = d.needs();
        assert!(n.request_body && n.response_body);
        assert_eq!(d.path_params(), ["id"]);
        assert_eq!(
            DataTemplate::from_json(&json!("{response.body}"))
                .expect("valid")
                .eval(&exchange())["id"],
            json!(42)
        );
    }

    #[test]
    fn data_template_errors_name_their_place() {
        let err = DataTemplate::from_json(&json!({"a": {"b": ["ok", "{nope}"]}})).expect_err("bad");
        assert!(err.starts_with("a.b[1]: unknown name `nope`"), "{err}");
        let err = DataTemplate::from_json(&json!("{nope}")).expect_err("bad");
        assert!(err.starts_with("unknown name `nope`"), "{err}");
    }
}
