//! `if`: a CEL condition over `request`, `response` and `path`.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use cel::common::ast::{operators, EntryExpr, Expr, IdedExpr, LiteralValue};
use cel::common::types::{
    CelBool, CelDouble, CelInt, CelList, CelMap, CelMapKey, CelNull, CelString, CelUInt,
};
use cel::common::value::{CowVal, Val};
use cel::context::VariableResolver;
use cel::{Context, Env, ExecutionError, Program};
use http::header::{AUTHORIZATION, COOKIE, SET_COOKIE};
use http::{HeaderMap, HeaderName};
use serde_json::Value;

use super::exchange::{header_text, query_pairs, Exchange};
use super::{is_sensitive, Needs};

/// The standard library plus the string extension (`lowerAscii`, `split`, ...): what a rule
/// author who knows CEL from Kubernetes or Envoy expects. Built once; programs are compiled
/// against it and contexts share it.
static ENV: LazyLock<Arc<Env>> = LazyLock::new(|| {
    let mut env = Env::stdlib();
    // Registering a bundled extension on a fresh environment cannot conflict; if a future cel
    // release made it so, conditions would still work without the extension's functions.
    let _ = env.add_extension(cel::extensions::strings);
    Arc::new(env)
});

const REQUEST_FIELDS: &[&str] = &["method", "path", "query", "headers", "body"];
const RESPONSE_FIELDS: &[&str] = &["status", "headers", "body"];
/// Identifiers CEL itself defines, usable as values (`type(x) == int`).
const TYPE_NAMES: &[&str] = &[
    "int",
    "uint",
    "double",
    "bool",
    "string",
    "bytes",
    "list",
    "map",
    "null_type",
    "type",
    "dyn",
];

/// A compiled CEL condition. Variables:
///
/// - `request`: `{method, path, query, headers, body}`; `query` maps each name to its first
///   value, `headers` maps lower-case names to their values joined with `", "`;
/// - `response`: `{status (int), headers, body}`;
/// - `path`: the rule's path parameters.
///
/// Bodies are what [`super::Captured::value`] gives: JSON values, text, or `null`. A field
/// that is absent is an error in CEL (use `has(response.body.total)`), which skips the rule with
/// [`super::SkipReason::ConditionError`].
pub struct Condition {
    source: String,
    program: Program,
    needs: Needs,
    path_params: Vec<String>,
}

impl Condition {
    /// Compiles `s`, and checks the names it uses: an unknown variable (`reqest`), a field the
    /// exchange never has (`request.status`) or a function or method the environment lacks
    /// (`nosuchfunc(1)`) is an error now rather than on every request; so is a constant that
    /// is not a bool (`42`). Every such problem is in the one message.
    pub fn compile(s: &str) -> Result<Condition, String> {
        let program = ENV.compile(s).map_err(|e| {
            e.errors
                .iter()
                .map(|e| {
                    // cel reports 1-based positions.
                    let (line, col) = e.pos;
                    if s.contains('\n') {
                        format!("invalid CEL at line {line}, column {col}: {}", e.msg)
                    } else {
                        format!("invalid CEL at column {col}: {}", e.msg)
                    }
                })
                .collect::<Vec<_>>()
                .join("; ")
        })?;
        let mut walk = Walk::default();
        walk.visit(program.expression());
        let Walk {
            mut needs,
            path_params,
            mut errors,
            ..
        } = walk;
        if let Some(never) = never_bool(program.expression()) {
            errors.push(format!(
                "the condition must give true or false, it is always {never}"
            ));
        }
        if !errors.is_empty() {
            return Err(errors.join("; "));
        }
        // What a CEL expression reads cannot always be known from its text (map iteration,
        // computed keys), so a condition is taken to read every header.
        needs.header_maps = true;
        // Beyond what the walk finds (`request.headers.authorization`), a condition names a
        // sensitive header when its text mentions it at all, e.g. `'authorization' in
        // request.headers` or a key built at run time: only then does it see the header.
        let lower = s.to_ascii_lowercase();
        if lower.contains("authorization") {
            needs.add_request_header(AUTHORIZATION);
        }
        if lower.contains("set-cookie") {
            needs.add_response_header(SET_COOKIE);
        }
        if lower
            .match_indices("cookie")
            .any(|(i, _)| !lower[..i].ends_with("set-"))
        {
            needs.add_request_header(COOKIE);
        }
        Ok(Condition {
            source: s.to_string(),
            program,
            needs,
            path_params,
        })
    }

    /// [`eval_with`](Self::eval_with) without path parameters (`path` is an empty map).
    pub fn eval(&self, ex: &Exchange) -> Result<bool, String> {
        self.eval_with(ex, &[])
    }

    /// `Ok(true)` or `Ok(false)`; an error when evaluation fails or gives something else than a
    /// bool.
    pub fn eval_with(&self, ex: &Exchange, params: &[(String, String)]) -> Result<bool, String> {
        self.eval_in(&CelExchange::new(ex, &self.needs), params)
    }

    /// Evaluates against an exchange already converted for CEL, shared by the rules of one
    /// exchange. `vars` must have been built with headers this condition may see.
    pub(crate) fn eval_in(
        &self,
        vars: &CelExchange<'_>,
        params: &[(String, String)],
    ) -> Result<bool, String> {
        let path: HashMap<CelMapKey<'_>, Box<dyn Val + '_>> = params
            .iter()
            .map(|(k, v)| (CelMapKey::from(k.as_str()), str_val(v)))
            .collect();
        let path = CelMap::from(path);
        let scope = Scope {
            request: vars.request.as_ref(),
            response: vars.response.as_ref(),
            path: &path,
        };
        let mut ctx = Context::with_env(Arc::clone(&ENV));
        ctx.set_variable_resolver(&scope);
        match self.program.execute(&ctx) {
            Ok(cel::Value::Bool(b)) => Ok(b),
            Ok(other) => Err(format!(
                "the condition must give true or false, it gave {}",
                describe(&other)
            )),
            Err(ExecutionError::NoSuchKey(key)) => Err(format!(
                "no such key: {key} (test an optional key with has(...) or 'key' in map)"
            )),
            Err(e) => Err(e.to_string()),
        }
    }

    pub fn needs(&self) -> Needs {
        self.needs.clone()
    }

    /// Whether it names Authorization, Cookie or Set-Cookie, and so must see them.
    pub(crate) fn names_sensitive(&self) -> bool {
        self.needs
            .request_headers
            .iter()
            .chain(&self.needs.response_headers)
            .any(is_sensitive)
    }

    /// The `path.NAME` parameters it uses by a fixed name, to check against the path template.
    pub fn path_params(&self) -> impl Iterator<Item = &str> {
        self.path_params.iter().map(String::as_str)
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }
}

impl std::fmt::Debug for Condition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Condition({:?})", self.source)
    }
}

/// What a condition whose whole expression is a literal other than a bool (`42`, `'yes'`,
/// `[true]`) always gives, in the words of [`describe`]: it could never be true or false.
/// Anything else may give a bool.
fn never_bool(e: &IdedExpr) -> Option<String> {
    Some(match &e.expr {
        Expr::Literal(lit) => match lit {
            LiteralValue::Boolean(_) => return None,
            LiteralValue::Int(i) => format!("the int {}", i.inner()),
            LiteralValue::UInt(u) => format!("the uint {}", u.inner()),
            LiteralValue::Double(f) => format!("the double {}", f.inner()),
            LiteralValue::String(s) => format!("the string {:?}", s.inner()),
            LiteralValue::Bytes(_) => "a bytes".to_string(),
            LiteralValue::Null => "null".to_string(),
        },
        Expr::List(_) => "a list".to_string(),
        Expr::Map(_) => "a map".to_string(),
        _ => return None,
    })
}

/// A result in words: scalars with their value, containers by kind only (a body can be large).
fn describe(v: &cel::Value) -> String {
    match v {
        cel::Value::Int(i) => format!("the int {i}"),
        cel::Value::UInt(u) => format!("the uint {u}"),
        cel::Value::Float(f) => format!("the double {f}"),
        cel::Value::String(s) => format!("the string {:?}", s.as_str()),
        cel::Value::Null => "null".to_string(),
        other => format!("a {}", other.type_of()),
    }
}

struct Scope<'s> {
    request: &'s (dyn Val + 's),
    response: &'s (dyn Val + 's),
    path: &'s (dyn Val + 's),
}

impl VariableResolver for Scope<'_> {
    fn resolve<'b>(&'b self, variable: &str) -> Option<CowVal<'b, 'b>> {
        match variable {
            "request" => Some(CowVal::Borrowed(self.request)),
            "response" => Some(CowVal::Borrowed(self.response)),
            "path" => Some(CowVal::Borrowed(self.path)),
            _ => None,
        }
    }
}

/// `request` and `response` as CEL values, borrowing the exchange's strings and parsed bodies.
pub(crate) struct CelExchange<'a> {
    request: Box<dyn Val + 'a>,
    response: Box<dyn Val + 'a>,
}

impl<'a> CelExchange<'a> {
    /// The headers map leaves out Authorization, Cookie and Set-Cookie unless `named` lists
    /// them: a condition iterating `request.headers` must not see a token it never asked for.
    pub(crate) fn new(ex: &'a Exchange, named: &Needs) -> CelExchange<'a> {
        let mut query: HashMap<CelMapKey<'a>, Box<dyn Val + 'a>> = HashMap::new();
        for (k, v) in ex.query.as_deref().into_iter().flat_map(query_pairs) {
            query
                .entry(CelMapKey::from(k))
                .or_insert_with(|| Box::new(CelString::from(v)));
        }
        let request = map([
            ("method", str_val(ex.method.as_str())),
            ("path", str_val(&ex.path)),
            ("query", Box::new(CelMap::from(query))),
            (
                "headers",
                headers(&ex.request_headers, &named.request_headers),
            ),
            ("body", json_val(ex.request_body.value())),
        ]);
        let response = map([
            ("status", Box::new(CelInt::from(i64::from(ex.status)))),
            (
                "headers",
                headers(&ex.response_headers, &named.response_headers),
            ),
            ("body", json_val(ex.response_body.value())),
        ]);
        CelExchange { request, response }
    }
}

fn map<'a, const N: usize>(entries: [(&'a str, Box<dyn Val + 'a>); N]) -> Box<dyn Val + 'a> {
    let map: HashMap<CelMapKey<'a>, Box<dyn Val + 'a>> = entries
        .into_iter()
        .map(|(k, v)| (CelMapKey::from(k), v))
        .collect();
    Box::new(CelMap::from(map))
}

fn headers<'a>(h: &'a HeaderMap, named: &[HeaderName]) -> Box<dyn Val + 'a> {
    let map: HashMap<CelMapKey<'a>, Box<dyn Val + 'a>> = h
        .keys()
        .filter(|k| !is_sensitive(k) || named.contains(k))
        .filter_map(|k| {
            let text = header_text(h, k)?;
            Some((CelMapKey::from(k.as_str()), str_owned(text)))
        })
        .collect();
    Box::new(CelMap::from(map))
}

fn str_val(s: &str) -> Box<dyn Val + '_> {
    Box::new(CelString::from(s))
}

fn str_owned<'a>(s: String) -> Box<dyn Val + 'a> {
    Box::new(CelString::from(s))
}

/// JSON as CEL: integers that fit are `int` (else `uint`), other numbers `double`.
fn json_val(v: &Value) -> Box<dyn Val + '_> {
    match v {
        Value::Null => Box::new(CelNull),
        Value::Bool(b) => Box::new(CelBool::from(*b)),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Box::new(CelInt::from(i))
            } else if let Some(u) = n.as_u64() {
                Box::new(CelUInt::from(u))
            } else {
                Box::new(CelDouble::from(n.as_f64().unwrap_or(f64::NAN)))
            }
        }
        Value::String(s) => str_val(s),
        Value::Array(items) => Box::new(CelList::from(
            items.iter().map(json_val).collect::<Vec<_>>(),
        )),
        Value::Object(m) => {
            let map: HashMap<CelMapKey<'_>, Box<dyn Val + '_>> = m
                .iter()
                .map(|(k, v)| (CelMapKey::from(k.as_str()), json_val(v)))
                .collect();
            Box::new(CelMap::from(map))
        }
    }
}

/// What a condition reads, found from its syntax tree.
///
/// Bodies: a condition needs `request.body` when it selects `request.body` (or
/// `request['body']`), and also when it uses `request` as a whole (`size(request)`,
/// `request[k]` with a key computed at run time), since that may reach the body; the same for
/// `response`. Selecting any other field (`request.headers`, `response.status`) needs no body.
#[derive(Default)]
struct Walk<'e> {
    needs: Needs,
    path_params: Vec<String>,
    errors: Vec<String>,
    /// Variables bound by comprehensions (`items.all(i, ...)`) in scope.
    bound: Vec<&'e str>,
}

/// One step of a statically known access path: `.field` or `[literal]`.
enum Seg<'e> {
    Name(&'e str),
    Other,
}

impl<'e> Walk<'e> {
    fn visit(&mut self, e: &'e IdedExpr) {
        if let Some((root, segs)) = access_path(e) {
            self.access(root, &segs);
            return;
        }
        match &e.expr {
            Expr::Select(s) => self.visit(&s.operand),
            Expr::Call(c) => {
                let namespace = c.target.as_deref().and_then(|t| self.namespace(t));
                // Operators (`_+_`, `@in`) are no names a rule author wrote.
                if is_identifier(&c.func_name) {
                    match (&c.target, namespace) {
                        (None, _) => self.function(&c.func_name),
                        // `optional.of(x)`, `strings.quote(s)`: a function of that qualified
                        // name, not a method of a variable.
                        (Some(_), Some(ns)) if declared(&format!("{ns}.{}()", c.func_name)) => {
                            for a in &c.args {
                                self.visit(a);
                            }
                            return;
                        }
                        (Some(_), _) => self.method(&c.func_name),
                    }
                }
                if let Some(t) = &c.target {
                    self.visit(t);
                }
                for a in &c.args {
                    self.visit(a);
                }
            }
            Expr::Comprehension(c) => {
                self.visit(&c.iter_range);
                self.visit(&c.accu_init);
                let depth = self.bound.len();
                self.bound.push(&c.iter_var);
                if let Some(v) = &c.iter_var2 {
                    self.bound.push(v);
                }
                self.bound.push(&c.accu_var);
                self.visit(&c.loop_cond);
                self.visit(&c.loop_step);
                self.visit(&c.result);
                self.bound.truncate(depth);
            }
            Expr::List(l) => l.elements.iter().for_each(|x| self.visit(x)),
            Expr::Map(m) => {
                for entry in &m.entries {
                    if let EntryExpr::MapEntry(me) = &entry.expr {
                        self.visit(&me.key);
                        self.visit(&me.value);
                    }
                }
            }
            Expr::Struct(s) => {
                for entry in &s.entries {
                    match &entry.expr {
                        EntryExpr::StructField(f) => self.visit(&f.value),
                        EntryExpr::MapEntry(me) => {
                            self.visit(&me.key);
                            self.visit(&me.value);
                        }
                    }
                }
            }
            Expr::Ident(_) | Expr::Literal(_) | Expr::Unspecified => {}
        }
    }

    /// A call `name(...)` of a function [`ENV`] does not declare fails on every request
    /// ("Undeclared reference"): an error now.
    fn function(&mut self, name: &str) {
        if declared(&format!("{name}()")) {
            return;
        }
        let hint = if declared(&format!("null.{name}()")) {
            format!(": `{name}` is a method, written x.{name}(...)")
        } else {
            String::new()
        };
        self.errors.push(format!("unknown function `{name}`{hint}"));
    }

    /// The same for a method call `x.name(...)`.
    fn method(&mut self, name: &str) {
        if declared(&format!("null.{name}()")) {
            return;
        }
        let hint = if declared(&format!("{name}()")) {
            format!(": `{name}` is a function, written {name}(x, ...)")
        } else {
            String::new()
        };
        self.errors.push(format!("unknown method `{name}`{hint}"));
    }

    /// `a.b` when `e` spells a qualified name that is not a variable (`optional`, `strings`):
    /// then `a.b.f()` may name a function.
    fn namespace(&self, e: &'e IdedExpr) -> Option<String> {
        let (root, segs) = access_path(e)?;
        if matches!(root, "request" | "response" | "path") || self.bound.contains(&root) {
            return None;
        }
        let mut name = root.to_string();
        for seg in segs {
            match seg {
                Seg::Name(n) => {
                    name.push('.');
                    name.push_str(n);
                }
                Seg::Other => return None,
            }
        }
        Some(name)
    }

    fn access(&mut self, root: &'e str, segs: &[Seg<'e>]) {
        if self.bound.contains(&root) {
            return;
        }
        let first = segs.first();
        match root {
            "request" | "response" => {
                let request = root == "request";
                let fields = if request {
                    REQUEST_FIELDS
                } else {
                    RESPONSE_FIELDS
                };
                let body = |needs: &mut Needs| {
                    if request {
                        needs.request_body = true;
                    } else {
                        needs.response_body = true;
                    }
                };
                match first {
                    // The whole map, or a key computed at run time: may reach the body.
                    None | Some(Seg::Other) => body(&mut self.needs),
                    Some(Seg::Name("body")) => body(&mut self.needs),
                    Some(Seg::Name("headers")) => {
                        if let Some(Seg::Name(h)) = segs.get(1) {
                            if let Ok(name) = HeaderName::from_bytes(h.as_bytes()) {
                                if request {
                                    self.needs.add_request_header(name);
                                } else {
                                    self.needs.add_response_header(name);
                                }
                            }
                        }
                    }
                    Some(Seg::Name(f)) if fields.contains(f) => {}
                    Some(Seg::Name(f)) => self.errors.push(format!(
                        "`{root}` has no field `{f}` (fields: {})",
                        fields.join(", ")
                    )),
                }
            }
            "path" => {
                if let Some(Seg::Name(p)) = first {
                    if !self.path_params.iter().any(|x| x == p) {
                        self.path_params.push(p.to_string());
                    }
                }
            }
            _ if TYPE_NAMES.contains(&root) => {}
            _ => self.errors.push(format!(
                "unknown name `{root}`: conditions use request, response and path"
            )),
        }
    }
}

/// Whether `call`, a call with no arguments such as `size()` or `null.lowerAscii()`, names a
/// function or method of [`ENV`]. cel has no public lookup by name, so the runtime is asked
/// itself: a declared function finds no overload for no arguments and says so, an undeclared
/// one is an undeclared reference, which is what a condition calling it gives on every
/// request. The names come from cel, so they cannot drift from what it runs. No overload runs
/// on no arguments but a function that takes none, and those (none in the standard library or
/// the string extension) are pure. A probe that does not compile counts as declared: no
/// condition is refused on a guess.
fn declared(call: &str) -> bool {
    let Ok(program) = ENV.compile(call) else {
        return true;
    };
    !matches!(
        program.execute(&Context::with_env(Arc::clone(&ENV))),
        Err(ExecutionError::UndeclaredReference(_))
    )
}

/// A name as a rule author writes one: operators are spelled otherwise (`_+_`, `@in`).
fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// `request.body.items`, `has(request.body.x)`, `request["headers"]["x-id"]`: the root variable
/// and the steps after it, when the whole expression is such a chain. Indexes by a computed key
/// end the chain (the part before it is visited on its own).
fn access_path(e: &IdedExpr) -> Option<(&str, Vec<Seg<'_>>)> {
    let mut segs = Vec::new();
    let mut cur = e;
    loop {
        match &cur.expr {
            Expr::Ident(name) => {
                segs.reverse();
                return Some((name, segs));
            }
            Expr::Select(s) => {
                segs.push(Seg::Name(&s.field));
                cur = &s.operand;
            }
            Expr::Call(c) if c.func_name == operators::INDEX && c.target.is_none() => {
                let [operand, key] = c.args.as_slice() else {
                    return None;
                };
                match &key.expr {
                    Expr::Literal(LiteralValue::String(s)) => segs.push(Seg::Name(s.inner())),
                    Expr::Literal(_) => segs.push(Seg::Other),
                    _ => return None,
                }
                cur = operand;
            }
            _ => return None,
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

    fn c(s: &str) -> Condition {
        Condition::compile(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn json_body(v: Value) -> Captured {
        Captured::new(
            Bytes::from(v.to_string()),
            Some(&HeaderValue::from_static("application/json")),
            false,
        )
    }

    fn exchange() -> Exchange {
        let mut ex = Exchange::new(Method::POST, "/orders/7?src=web&src=app", 201);
        ex.request_headers
            .insert("x-tenant", HeaderValue::from_static("acme"));
        ex.request_headers
            .insert("authorization", HeaderValue::from_static("Bearer t"));
        ex.request_body = json_body(json!({"customer": "c-1", "items": [{"qty": 2}, {"qty": 3}]}));
        ex.response_headers
            .insert("set-cookie", HeaderValue::from_static("s=1"));
        ex.response_body = json_body(json!({"id": 7, "total": 12.5, "state": "new", "big": 10}));
        ex
    }

    fn eval(s: &str) -> Result<bool, String> {
        c(s).eval_with(&exchange(), &[("id".into(), "7".into())])
    }

    #[test]
    fn true_and_false() {
        for s in [
            "response.body.total > 0",
            "response.body.total > 12",
            "response.body.big == 10",
            "response.body.big == 10.0",
            "response.status == 201",
            "response.status >= 200 && response.status < 300",
            "request.method == 'POST'",
            "request.path.startsWith('/orders/')",
            "request.query.src == 'web'",
            "request.headers['x-tenant'] == 'acme'",
            "request.body.items.all(i, i.qty > 0)",
            "request.body.items.exists(i, i.qty == 3)",
            "size(request.body.items) == 2",
            "path.id == '7'",
            "has(response.body.id) && !has(response.body.nope)",
            "response.body.state in ['new', 'paid']",
            "request.headers['x-tenant'].upperAscii() == 'ACME'",
            "type(response.body.id) == int",
        ] {
            assert_eq!(eval(s), Ok(true), "{s}");
        }
        for s in [
            "response.body.total > 100",
            "response.status == 200",
            "request.method == 'GET'",
            "path.id == '8'",
            "'authorization' in request.headers && false",
        ] {
            assert_eq!(eval(s), Ok(false), "{s}");
        }
    }

    #[test]
    fn errors_and_non_bool_results() {
        let e = eval("response.body.nope > 0").expect_err("missing key");
        assert!(
            e.starts_with("no such key: nope (test an optional key with has(...) or 'key' in map)"),
            "{e}"
        );
        let e = eval("response.body.state > 1").expect_err("bad types");
        assert!(e.contains("no matching overload"), "{e}");
        let e = eval("response.body.total").expect_err("not a bool");
        assert_eq!(
            e,
            "the condition must give true or false, it gave the double 12.5"
        );
        let e = eval("response.body.state").expect_err("not a bool");
        assert_eq!(
            e,
            "the condition must give true or false, it gave the string \"new\""
        );
        let e = eval("response.body").expect_err("not a bool");
        assert_eq!(e, "the condition must give true or false, it gave a map");
        let e = eval("1 / 0 == 1").expect_err("division");
        assert!(e.to_lowercase().contains("division by zero"), "{e}");
    }

    #[test]
    fn compile_errors() {
        for (s, want) in [
            (
                "response.status ==",
                "invalid CEL at column 19: Syntax error: mismatched input '<EOF>'",
            ),
            (
                "a b",
                "invalid CEL at column 3: Syntax error: extraneous input 'b'",
            ),
            (
                "true &&\n  (",
                "invalid CEL at line 2, column 4: Syntax error",
            ),
            (
                "reponse.status == 201",
                "unknown name `reponse`: conditions use request, response and path",
            ),
            (
                "request.status == 201",
                "`request` has no field `status` (fields: method, path, query, headers, body)",
            ),
            (
                "response['method'] == 'GET'",
                "`response` has no field `method`",
            ),
            ("x.all(i, i > 0)", "unknown name `x`"),
            ("nosuchfunc(1)", "unknown function `nosuchfunc`"),
            (
                "response.body.id.nosuchmethod()",
                "unknown method `nosuchmethod`",
            ),
            (
                "request.path.size() > 1 && nope(request.method) && x.y.nope2()",
                "unknown function `nope`; unknown method `nope2`; unknown name `x`",
            ),
            (
                "request.path.int() == 1",
                "unknown method `int`: `int` is a function, written int(x, ...)",
            ),
            (
                "lowerAscii(request.path) == 'x'",
                "unknown function `lowerAscii`: `lowerAscii` is a method, written x.lowerAscii(...)",
            ),
            ("optional.nope(1).hasValue()", "unknown method `nope`"),
            (
                "42",
                "the condition must give true or false, it is always the int 42",
            ),
            (
                "'yes'",
                "the condition must give true or false, it is always the string \"yes\"",
            ),
            (
                "null",
                "the condition must give true or false, it is always null",
            ),
            (
                "[true]",
                "the condition must give true or false, it is always a list",
            ),
        ] {
            let e = Condition::compile(s).expect_err(s);
            assert!(e.starts_with(want), "{s}: {e}");
        }
        // Comprehension variables are not unknown names.
        c("request.body.items.map(item, item.qty).exists(q, q > 2)");
    }

    /// The functions and macros a rule author expects, from the standard library, the string
    /// extension and the optional library, pass the load-time check and run.
    #[test]
    fn known_functions_methods_and_macros_compile_and_run() {
        for s in [
            "size(request.body.items) == 2 && request.body.items.size() == 2",
            "size('abc') == 3",
            "request.path.contains('orders')",
            "request.path.startsWith('/orders') && request.path.endsWith('7')",
            "request.path.matches('^/orders/[0-9]+$')",
            "matches(request.path, '[0-9]')",
            "request.method.lowerAscii() == 'post'",
            "'a,b'.split(',') == ['a', 'b']",
            "int('7') == 7 && string(7) == '7' && double(1) == 1.0 && uint(1) == 1u",
            "path.id.trim() == '7'",
            "'%s-%d'.format(['a', 1]) == 'a-1'",
            "strings.quote('a') == '\"a\"'",
            "optional.of(1).hasValue() && !optional.none().hasValue()",
            "has(response.body.id) && !has(response.body.nope)",
            "request.body.items.all(i, i.qty > 0)",
            "request.body.items.exists(i, i.qty == 3)",
            "request.body.items.exists_one(i, i.qty == 3)",
            "request.body.items.map(i, i.qty).filter(q, q > 2) == [3]",
            "type(response.body.id) == int && dyn(1) == 1",
            "response.body.id in [7, 8]",
        ] {
            assert_eq!(eval(s), Ok(true), "{s}");
        }
    }

    #[test]
    fn needs_bodies_only_when_read() {
        let n = c("response.status == 201 && request.headers['x-a'] == 'b'").needs();
        assert!(!n.request_body && !n.response_body);
        assert_eq!(n.request_headers, [HeaderName::from_static("x-a")]);
        let n = c("response.body.total > 0").needs();
        assert!(n.response_body && !n.request_body);
        let n = c("has(request.body.x)").needs();
        assert!(n.request_body && !n.response_body);
        let n = c("request['body'].x == 1").needs();
        assert!(n.request_body);
        let n = c("request.body.items.exists(i, i.qty > response.body.total)").needs();
        assert!(n.request_body && n.response_body);
        // The whole map may reach the body.
        assert!(c("size(request) > 0").needs().request_body);
        assert!(c("request[request.method] == 1").needs().request_body);
        assert!(
            !c("request.headers[request.method] == 'x'")
                .needs()
                .request_body
        );
        assert!(c("response.headers.etag == 'x'").needs().response_headers == [http::header::ETAG]);
    }

    #[test]
    fn sensitive_headers_are_seen_only_when_named() {
        // Not named: the headers map does not have them.
        assert_eq!(eval("size(request.headers) == 1"), Ok(true));
        assert_eq!(eval("'set-cookie' in response.headers"), Ok(true));
        let c1 = c("request.headers.exists(k, k == 'x-tenant')");
        assert!(!c1.names_sensitive());
        // Named, as a key or merely in the text: present.
        assert_eq!(eval("'authorization' in request.headers"), Ok(true));
        assert_eq!(
            eval("request.headers.authorization == 'Bearer t'"),
            Ok(true)
        );
        let named = c("request.headers['Authorization'.lowerAscii()] != ''");
        assert!(named.names_sensitive());
        assert_eq!(named.eval(&exchange()), Ok(true));
        let n = c("'cookie' in request.headers").needs();
        assert_eq!(n.request_headers, [COOKIE]);
        assert!(n.response_headers.is_empty());
        let n = c("'set-cookie' in response.headers").needs();
        assert_eq!(n.response_headers, [SET_COOKIE]);
        assert!(n.request_headers.is_empty(), "{:?}", n.request_headers);
    }

    #[test]
    fn bodies_as_text_and_null() {
        let mut ex = exchange();
        ex.response_body = Captured::new(Bytes::from_static(b"ok"), None, false);
        ex.request_body = Captured::empty();
        assert_eq!(c("response.body == 'ok'").eval(&ex), Ok(true));
        assert_eq!(c("request.body == null").eval(&ex), Ok(true));
        assert_eq!(c("path == {}").eval(&ex), Ok(true));
    }

    #[test]
    fn path_params_are_listed() {
        let cond = c("path.id == '1' || path['other'] == '2'");
        assert_eq!(cond.path_params().collect::<Vec<_>>(), ["id", "other"]);
        assert_eq!(cond.as_str(), "path.id == '1' || path['other'] == '2'");
    }
}
