//! Path templates: `/orders`, `/orders/{id}`, `/checkout/{*rest}`.

use std::fmt;

use percent_encoding::percent_decode_str;

/// A parsed path template. Literal segments match exactly (also when the request spells them
/// percent-encoded), `{name}` matches one non-empty segment, and a last `{*name}` matches the
/// rest of the path, zero or more segments (so `/{*all}` matches `/` too).
///
/// One trailing slash on the request is tolerated: `/orders/` matches `/orders`. Most web
/// frameworks a monolith is built on (Rails, Express, Laravel, Spring before 6) serve both
/// spellings with the same handler, and a state change that slips past its rule because of a
/// slash is an event lost. A template written with a trailing slash means the same.
#[derive(Clone, PartialEq, Eq)]
pub struct PathTemplate {
    source: String,
    segments: Vec<Segment>,
    catch_all: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Param(String),
}

impl PathTemplate {
    pub fn parse(s: &str) -> Result<PathTemplate, String> {
        if !s.starts_with('/') {
            return Err(format!("a path template starts with `/`, found `{s}`"));
        }
        if s.contains('?') || s.contains('#') {
            return Err(format!(
                "a path template has no query string or fragment, found `{s}`"
            ));
        }
        let body = &s[1..];
        let body = body.strip_suffix('/').unwrap_or(body);
        let mut segments = Vec::new();
        let mut catch_all = None;
        let mut names: Vec<&str> = Vec::new();
        if !body.is_empty() {
            for seg in body.split('/') {
                if catch_all.is_some() {
                    return Err(format!(
                        "a catch-all `{{*name}}` must be the last segment of `{s}`"
                    ));
                }
                if seg.is_empty() {
                    return Err(format!("empty segment (`//`) in `{s}`"));
                }
                match parse_param(seg)? {
                    None => segments.push(Segment::Literal(seg.to_string())),
                    Some((name, rest)) => {
                        if names.contains(&name) {
                            return Err(format!("parameter `{name}` appears twice in `{s}`"));
                        }
                        names.push(name);
                        if rest {
                            catch_all = Some(name.to_string());
                        } else {
                            segments.push(Segment::Param(name.to_string()));
                        }
                    }
                }
            }
        }
        Ok(PathTemplate {
            source: s.to_string(),
            segments,
            catch_all,
        })
    }

    /// Whether `path` (no query string) matches. Allocates nothing: it runs for every rule on
    /// every proxied request.
    pub fn matches(&self, path: &str) -> bool {
        self.walk(path, |_, _| {})
    }

    /// The parameters of a matching `path`, percent-decoded (invalid UTF-8 replaced), in
    /// template order; `None` when it does not match.
    pub fn captures(&self, path: &str) -> Option<Vec<(String, String)>> {
        let mut params = Vec::new();
        let matched = self.walk(path, |name, raw| {
            params.push((
                name.to_string(),
                percent_decode_str(raw).decode_utf8_lossy().into_owned(),
            ));
        });
        matched.then_some(params)
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The parameter names, in template order, the catch-all last.
    pub fn params(&self) -> impl Iterator<Item = &str> {
        self.segments
            .iter()
            .filter_map(|s| match s {
                Segment::Param(n) => Some(n.as_str()),
                Segment::Literal(_) => None,
            })
            .chain(self.catch_all.as_deref())
    }

    pub fn has_param(&self, name: &str) -> bool {
        self.params().any(|p| p == name)
    }

    /// The one matcher behind both [`matches`](Self::matches) and
    /// [`captures`](Self::captures), so that the two cannot disagree; `found` gets each
    /// parameter's raw (still encoded) text.
    fn walk<'p>(&self, path: &'p str, mut found: impl FnMut(&str, &'p str)) -> bool {
        let Some(mut body) = path.strip_prefix('/') else {
            return false;
        };
        // A catch-all keeps the trailing slash as part of its value.
        if self.catch_all.is_none() && body.len() > 1 {
            body = body.strip_suffix('/').unwrap_or(body);
        }
        // `None` once every segment of the request is used up.
        let mut rest = (!body.is_empty()).then_some(body);
        for seg in &self.segments {
            let Some(r) = rest else { return false };
            let (head, tail) = match r.split_once('/') {
                Some((h, t)) => (h, Some(t)),
                None => (r, None),
            };
            rest = tail;
            match seg {
                Segment::Literal(lit) => {
                    if !literal_eq(head, lit) {
                        return false;
                    }
                }
                Segment::Param(name) => {
                    if head.is_empty() {
                        return false;
                    }
                    found(name, head);
                }
            }
        }
        match &self.catch_all {
            Some(name) => {
                found(name, rest.unwrap_or(""));
                true
            }
            None => rest.is_none(),
        }
    }
}

/// A request segment equals a template literal as sent or once percent-decoded, compared byte
/// by byte without building the decoded string.
fn literal_eq(segment: &str, literal: &str) -> bool {
    segment == literal || (segment.contains('%') && percent_decode_str(segment).eq(literal.bytes()))
}

/// `Some((name, is_catch_all))` for a `{...}` segment, `None` for a literal.
fn parse_param(seg: &str) -> Result<Option<(&str, bool)>, String> {
    let open = seg.find('{');
    let close = seg.find('}');
    match (open, close) {
        (None, None) => Ok(None),
        (Some(0), Some(_)) if seg.ends_with('}') => {
            let inner = &seg[1..seg.len() - 1];
            if inner.contains(['{', '}']) {
                return Err(format!(
                    "nested braces in `{seg}`; a parameter is a whole segment, such as `/{{id}}`"
                ));
            }
            let (name, rest) = match inner.strip_prefix('*') {
                Some(n) => (n, true),
                None => (inner, false),
            };
            if name.is_empty() {
                return Err(format!("empty parameter name in `{seg}`"));
            }
            if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!(
                    "parameter names use letters, digits and `_`, found `{name}`"
                ));
            }
            Ok(Some((name, rest)))
        }
        (Some(_), None) => Err(format!("unclosed `{{` in `{seg}`")),
        (None, Some(_)) => Err(format!("unmatched `}}` in `{seg}`")),
        (Some(_), Some(_)) => Err(format!(
            "a parameter is a whole segment, such as `/{{id}}`, found `{seg}`"
        )),
    }
}

impl fmt::Display for PathTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl fmt::Debug for PathTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PathTemplate({:?})", self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t(s: &str) -> PathTemplate {
        PathTemplate::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn caps(template: &str, path: &str) -> Option<Vec<(String, String)>> {
        t(template).captures(path)
    }

    fn pairs(list: &[(&str, &str)]) -> Option<Vec<(String, String)>> {
        Some(
            list.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn literals() {
        let p = t("/orders");
        assert!(p.matches("/orders"));
        assert!(!p.matches("/order"));
        assert!(!p.matches("/orders/1"));
        assert!(!p.matches("/Orders"));
        assert!(!p.matches("/"));
        assert!(!p.matches("orders"));
        assert!(!p.matches(""));
        assert!(t("/").matches("/"));
        assert!(!t("/").matches("/x"));
        assert!(!t("/").matches("//"));
        assert!(t("/api/v1/orders").matches("/api/v1/orders"));
        assert!(!t("/api/v1/orders").matches("/api/v1"));
        assert_eq!(caps("/orders", "/orders"), pairs(&[]));
    }

    #[test]
    fn params_take_one_non_empty_segment() {
        assert_eq!(caps("/orders/{id}", "/orders/42"), pairs(&[("id", "42")]));
        assert_eq!(caps("/orders/{id}", "/orders"), None);
        assert_eq!(caps("/orders/{id}", "/orders/"), None);
        assert_eq!(caps("/orders/{id}", "/orders//"), None);
        assert_eq!(caps("/orders/{id}", "/orders/42/items"), None);
        assert_eq!(
            caps("/users/{user}/orders/{order}", "/users/ann/orders/7"),
            pairs(&[("user", "ann"), ("order", "7")])
        );
        assert_eq!(
            caps("/users/{user}/orders/{order}", "/users/ann/carts/7"),
            None
        );
    }

    #[test]
    fn catch_all_takes_the_rest() {
        let p = "/checkout/{*rest}";
        assert_eq!(caps(p, "/checkout/a/b/c"), pairs(&[("rest", "a/b/c")]));
        assert_eq!(caps(p, "/checkout/a"), pairs(&[("rest", "a")]));
        assert_eq!(caps(p, "/checkout/"), pairs(&[("rest", "")]));
        assert_eq!(caps(p, "/checkout"), pairs(&[("rest", "")]));
        assert_eq!(caps(p, "/checkout/a/"), pairs(&[("rest", "a/")]));
        assert_eq!(caps(p, "/checkoutx"), None);
        assert_eq!(caps(p, "/cart/a"), None);
        assert_eq!(caps("/{*all}", "/"), pairs(&[("all", "")]));
        assert_eq!(caps("/{*all}", "/x/y"), pairs(&[("all", "x/y")]));
        assert_eq!(
            caps("/t/{tenant}/{*rest}", "/t/acme/a/b"),
            pairs(&[("tenant", "acme"), ("rest", "a/b")])
        );
        assert_eq!(caps("/t/{tenant}/{*rest}", "/t"), None);
    }

    #[test]
    fn one_trailing_slash_is_tolerated() {
        assert!(t("/orders").matches("/orders/"));
        assert!(!t("/orders").matches("/orders//"));
        assert_eq!(caps("/orders/{id}", "/orders/42/"), pairs(&[("id", "42")]));
        // A template written with the slash means the same.
        assert!(t("/orders/").matches("/orders"));
        assert!(t("/orders/").matches("/orders/"));
        assert_eq!(t("/orders/").as_str(), "/orders/");
    }

    #[test]
    fn params_are_percent_decoded() {
        assert_eq!(
            caps("/users/{name}", "/users/J%C3%BCrgen%20M"),
            pairs(&[("name", "Jürgen M")])
        );
        // An encoded slash stays inside its segment.
        assert_eq!(
            caps("/files/{name}", "/files/a%2Fb"),
            pairs(&[("name", "a/b")])
        );
        // Invalid UTF-8 is replaced, not refused.
        assert_eq!(caps("/x/{v}", "/x/%FF"), pairs(&[("v", "\u{fffd}")]));
        assert_eq!(
            caps("/r/{*rest}", "/r/a%20b/c"),
            pairs(&[("rest", "a b/c")])
        );
        // Literals match their encoded spelling too.
        assert!(t("/café").matches("/caf%C3%A9"));
        assert!(t("/a b").matches("/a%20b"));
        assert!(!t("/ab").matches("/a%20b"));
    }

    #[test]
    fn parse_errors() {
        let cases = [
            ("orders", "a path template starts with `/`, found `orders`"),
            ("", "a path template starts with `/`"),
            ("/orders?x=1", "a path template has no query string"),
            ("/orders/{id", "unclosed `{` in `{id`"),
            ("/orders/id}", "unmatched `}` in `id}`"),
            ("/orders/{}", "empty parameter name in `{}`"),
            ("/orders/{*}", "empty parameter name in `{*}`"),
            (
                "/orders/{a-b}",
                "parameter names use letters, digits and `_`, found `a-b`",
            ),
            (
                "/orders/{id}.json",
                "a parameter is a whole segment, such as `/{id}`, found `{id}.json`",
            ),
            ("/orders/x{id}", "a parameter is a whole segment"),
            ("/orders/{{id}}", "nested braces in `{{id}}`"),
            ("/orders/{a}{b}", "nested braces in `{a}{b}`"),
            (
                "/a/{*rest}/b",
                "a catch-all `{*name}` must be the last segment of `/a/{*rest}/b`",
            ),
            (
                "/a/{id}/{id}",
                "parameter `id` appears twice in `/a/{id}/{id}`",
            ),
            ("/a/{id}/{*id}", "parameter `id` appears twice"),
            ("/a//b", "empty segment (`//`) in `/a//b`"),
        ];
        for (input, want) in cases {
            let err = PathTemplate::parse(input).expect_err(input);
            assert!(err.starts_with(want), "{input}: got `{err}`, want `{want}`");
        }
    }

    #[test]
    fn params_are_listed() {
        let p = t("/t/{tenant}/x/{*rest}");
        assert_eq!(p.params().collect::<Vec<_>>(), ["tenant", "rest"]);
        assert!(p.has_param("rest"));
        assert!(!p.has_param("x"));
    }

    fn template() -> impl Strategy<Value = PathTemplate> {
        prop::sample::select(vec![
            "/",
            "/a",
            "/a/b",
            "/a/{x}",
            "/{x}/b",
            "/{x}/{y}",
            "/a/{*rest}",
            "/{*all}",
            "/a/{x}/{*rest}",
            "/%41",
        ])
        .prop_map(|s| PathTemplate::parse(s).unwrap_or_else(|e| panic!("{e}")))
    }

    proptest! {
        #[test]
        fn matches_agrees_with_captures(
            p in template(),
            path in "/?[abA/%4142]{0,12}",
        ) {
            prop_assert_eq!(p.matches(&path), p.captures(&path).is_some());
        }
    }
}
