//! `events.redact`: body fields and headers that never leave the proxy.

use http::HeaderName;
use serde_json::Value;

use super::exchange::{Captured, Exchange};
use super::template::{parse_steps, Step};

/// Removes the listed fields from an exchange before any rule reads it, so that no expression,
/// condition or default `data` can put them in an event.
#[derive(Clone, Debug, Default)]
pub struct Redactor {
    paths: Vec<Target>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Target {
    RequestBody(Vec<Step>),
    ResponseBody(Vec<Step>),
    RequestHeader(HeaderName),
    ResponseHeader(HeaderName),
}

const REDACTABLE: &str = "request.body[.field|[index]|[*]]..., response.body[...], \
request.headers.NAME or response.headers.NAME";

impl Redactor {
    /// Each entry is `request.body.password`, `response.body.card.number`,
    /// `request.body.items[0].secret`, `request.body.items[*].secret` (every element) or a
    /// header such as `request.headers.x-api-key`. The error carries the index of the bad entry.
    pub fn parse(paths: &[String]) -> Result<Redactor, (usize, String)> {
        let mut out = Vec::with_capacity(paths.len());
        for (i, p) in paths.iter().enumerate() {
            out.push(parse_target(p.trim()).map_err(|e| (i, e))?);
        }
        Ok(Redactor { paths: out })
    }

    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    /// Removes the fields: an object member is removed, an array element (`[0]`, `[*]`) becomes
    /// `null` so that the indexes of the others stay what the monolith sent, and a whole body
    /// becomes `null`. Fields that are absent, and bodies that are text, are left as they are.
    pub fn apply(&self, ex: &mut Exchange) {
        let mut request = Edit::default();
        let mut response = Edit::default();
        for target in &self.paths {
            match target {
                Target::RequestBody(steps) => request.remove(&mut ex.request_body, steps),
                Target::ResponseBody(steps) => response.remove(&mut ex.response_body, steps),
                Target::RequestHeader(h) => {
                    ex.request_headers.remove(h);
                }
                Target::ResponseHeader(h) => {
                    ex.response_headers.remove(h);
                }
            }
        }
        request.finish(&mut ex.request_body);
        response.finish(&mut ex.response_body);
    }
}

/// A body taken out of its [`Captured`] once, edited by every path, and put back once.
#[derive(Default)]
struct Edit {
    value: Option<Value>,
}

impl Edit {
    fn remove(&mut self, body: &mut Captured, steps: &[Step]) {
        let value = self.value.get_or_insert_with(|| body.take_value());
        remove(value, steps);
    }

    fn finish(self, body: &mut Captured) {
        if let Some(v) = self.value {
            body.set_value(v);
        }
    }
}

fn remove(v: &mut Value, steps: &[Step]) {
    let Some((step, rest)) = steps.split_first() else {
        *v = Value::Null;
        return;
    };
    match (step, v) {
        (Step::Field(f), Value::Object(map)) => {
            if rest.is_empty() {
                map.remove(f);
            } else if let Some(child) = map.get_mut(f) {
                remove(child, rest);
            }
        }
        (Step::Index(i), Value::Array(items)) => {
            if let Some(child) = items.get_mut(*i) {
                remove(child, rest);
            }
        }
        (Step::Every, Value::Array(items)) => {
            for child in items {
                remove(child, rest);
            }
        }
        _ => {}
    }
}

fn parse_target(p: &str) -> Result<Target, String> {
    let header = |prefix: &str| {
        p.strip_prefix(prefix).map(|name| {
            HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("`{p}`: `{name}` is not a valid header name"))
        })
    };
    if let Some(h) = header("request.headers.") {
        return h.map(Target::RequestHeader);
    }
    if let Some(h) = header("response.headers.") {
        return h.map(Target::ResponseHeader);
    }
    for (prefix, request) in [("request.body", true), ("response.body", false)] {
        if let Some(rest) = p.strip_prefix(prefix) {
            if rest.is_empty() || rest.starts_with(['.', '[']) {
                let steps = parse_steps(p, rest, true)?;
                return Ok(if request {
                    Target::RequestBody(steps)
                } else {
                    Target::ResponseBody(steps)
                });
            }
        }
    }
    Err(format!("cannot redact `{p}`: name {REDACTABLE}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::{HeaderValue, Method};
    use serde_json::json;

    use crate::rules::Template;

    fn redactor(paths: &[&str]) -> Redactor {
        let paths: Vec<String> = paths.iter().map(|s| s.to_string()).collect();
        Redactor::parse(&paths).unwrap_or_else(|(i, e)| panic!("{i}: {e}"))
    }

    fn json_body(v: Value) -> Captured {
        Captured::new(
            Bytes::from(v.to_string()),
            Some(&HeaderValue::from_static("application/json")),
            false,
        )
    }

    fn exchange() -> Exchange {
        let mut ex = Exchange::new(Method::POST, "/signup", 201);
        ex.request_body = json_body(json!({
            "user": "ann",
            "password": "hunter2",
            "card": {"number": "4111", "cvc": "123", "brand": "visa"},
            "items": [{"sku": "A", "secret": "s0"}, {"sku": "B", "secret": "s1"}],
        }));
        ex.request_headers
            .insert("x-api-key", HeaderValue::from_static("k"));
        ex.response_body = json_body(json!({"id": 1, "token": "t"}));
        ex
    }

    #[test]
    fn removes_nested_fields_and_array_elements() {
        let mut ex = exchange();
        redactor(&[
            "request.body.password",
            "request.body.card.number",
            "request.body.card.cvc",
            "request.body.items[0].secret",
            "response.body.token",
        ])
        .apply(&mut ex);
        assert_eq!(
            ex.request_body.value(),
            &json!({
                "user": "ann",
                "card": {"brand": "visa"},
                "items": [{"sku": "A"}, {"sku": "B", "secret": "s1"}],
            })
        );
        assert_eq!(ex.response_body.value(), &json!({"id": 1}));
        // Expressions see the redacted body.
        let t = Template::parse("{request.body.password}").expect("valid");
        assert_eq!(t.eval(&ex), Value::Null);
    }

    #[test]
    fn every_element_and_whole_values() {
        let mut ex = exchange();
        redactor(&[
            "request.body.items[*].secret",
            "request.body.card",
            "response.body",
        ])
        .apply(&mut ex);
        assert_eq!(
            ex.request_body.value(),
            &json!({"user": "ann", "password": "hunter2", "items": [{"sku": "A"}, {"sku": "B"}]})
        );
        assert_eq!(ex.response_body.value(), &Value::Null);

        let mut ex = exchange();
        redactor(&["request.body.items[1]", "request.body.items[*].sku"]).apply(&mut ex);
        assert_eq!(
            ex.request_body.value()["items"],
            json!([{"secret": "s0"}, null])
        );
    }

    #[test]
    fn absent_fields_and_text_bodies_are_left_alone() {
        let mut ex = exchange();
        let before = ex.request_body.value().clone();
        redactor(&[
            "request.body.nope",
            "request.body.card.number.deeper",
            "request.body.items[9].secret",
            "request.body.user[0]",
            "request.body.password.x",
        ])
        .apply(&mut ex);
        assert_eq!(ex.request_body.value(), &before);

        let mut ex = Exchange::new(Method::POST, "/", 200);
        ex.request_body = Captured::new(Bytes::from_static(b"password=x"), None, false);
        redactor(&["request.body.password"]).apply(&mut ex);
        assert_eq!(ex.request_body.value(), &json!("password=x"));
    }

    #[test]
    fn headers() {
        let mut ex = exchange();
        redactor(&["request.headers.X-Api-Key"]).apply(&mut ex);
        assert!(ex.request_headers.get("x-api-key").is_none());
    }

    #[test]
    fn an_empty_list_changes_nothing() {
        let mut ex = exchange();
        let r = redactor(&[]);
        assert!(r.is_empty());
        r.apply(&mut ex);
        assert_eq!(ex.request_body.value()["password"], json!("hunter2"));
    }

    #[test]
    fn errors_carry_the_index() {
        let paths: Vec<String> = ["request.body.ok", "request.method", "x"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let (i, e) = Redactor::parse(&paths).expect_err("invalid");
        assert_eq!(i, 1);
        assert!(
            e.starts_with("cannot redact `request.method`: name request.body"),
            "{e}"
        );
        for (p, want) in [
            ("request.bodyx", "cannot redact `request.bodyx`"),
            (
                "request.body.items[x]",
                "an index is a number from 0 or `*`, found `[x]`",
            ),
            ("request.body.", "`request.body.`: empty field name"),
            (
                "request.headers.bad name",
                "`bad name` is not a valid header name",
            ),
            ("response.query.x", "cannot redact"),
        ] {
            let (_, e) = Redactor::parse(&[p.to_string()]).expect_err(p);
            assert!(e.contains(want), "{p}: {e}");
        }
    }
}
