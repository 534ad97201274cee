//! Decoding helpers over the located YAML tree: every problem is recorded with its place and
//! decoding goes on, so that one run of `ficus check` lists every error in the file.

use std::fmt;
use std::time::Duration;

use super::yaml::{Key, Mark, Node, Value};

/// One located problem in a config file, printed as `FILE:LINE:COLUMN: key.path: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub col: usize,
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = if self.path.is_empty() {
            "(top level)"
        } else {
            &self.path
        };
        write!(
            f,
            "{}:{}:{}: {}: {}",
            self.file, self.line, self.col, path, self.message
        )
    }
}

pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

pub struct Decoder<'a> {
    file: &'a str,
    env: Env<'a>,
    pub errors: Vec<ConfigError>,
    /// Valid but risky settings, located like errors; printed by `check`, logged by `run`.
    pub warnings: Vec<ConfigError>,
    /// The upstream and sink names the file declares, valid or not: a reference to one whose
    /// own settings are invalid (and reported there) is no second error.
    pub declared_upstreams: Vec<String>,
    pub declared_sinks: Vec<String>,
}

/// The entries of a mapping whose keys were already checked against the known ones.
pub struct Fields<'n> {
    entries: &'n [(Key, Node)],
    pub mark: Mark,
}

impl<'n> Fields<'n> {
    pub fn get(&self, name: &str) -> Option<&'n Node> {
        self.entries
            .iter()
            .find(|(k, _)| k.name == name)
            .map(|(_, n)| n)
            .filter(|n| !matches!(n.value, Value::Null))
    }
}

pub fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

impl<'a> Decoder<'a> {
    pub fn new(file: &'a str, env: Env<'a>) -> Self {
        Decoder {
            file,
            env,
            errors: Vec::new(),
            warnings: Vec::new(),
            declared_upstreams: Vec::new(),
            declared_sinks: Vec::new(),
        }
    }

    pub fn warn(&mut self, mark: Mark, path: &str, message: impl Into<String>) {
        self.warnings.push(ConfigError {
            file: self.file.to_string(),
            line: mark.line,
            col: mark.col,
            path: path.to_string(),
            message: message.into(),
        });
    }

    pub fn error(&mut self, mark: Mark, path: &str, message: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.to_string(),
            line: mark.line,
            col: mark.col,
            path: path.to_string(),
            message: message.into(),
        });
    }

    /// A mapping with only `known` keys; an unknown key is reported at the key itself.
    pub fn map<'n>(&mut self, node: &'n Node, path: &str, known: &[&str]) -> Option<Fields<'n>> {
        let Value::Map(entries) = &node.value else {
            self.error(
                node.mark,
                path,
                format!("expected a mapping, found {}", node.kind()),
            );
            return None;
        };
        for (key, _) in entries {
            if !known.contains(&key.name.as_str()) {
                self.error(
                    key.mark,
                    &join(path, &key.name),
                    format!("unknown key (expected one of: {})", known.join(", ")),
                );
            }
        }
        Some(Fields {
            entries,
            mark: node.mark,
        })
    }

    /// A mapping with free-form keys (names chosen by the user, such as upstream names).
    pub fn named<'n>(&mut self, node: &'n Node, path: &str) -> Option<&'n [(Key, Node)]> {
        match &node.value {
            Value::Map(entries) => Some(entries),
            _ => {
                self.error(
                    node.mark,
                    path,
                    format!("expected a mapping of names, found {}", node.kind()),
                );
                None
            }
        }
    }

    /// A scalar as text, with `${NAME}` / `${NAME:-default}` replaced from the environment.
    pub fn string(&mut self, node: &Node, path: &str) -> Option<String> {
        let Value::Scalar(text) = &node.value else {
            self.error(
                node.mark,
                path,
                format!("expected a string, found {}", node.kind()),
            );
            return None;
        };
        match interpolate(text, self.env) {
            Ok(s) => Some(s),
            Err(msg) => {
                self.error(node.mark, path, msg);
                None
            }
        }
    }

    /// A scalar parsed by `parse`; `expected` describes the accepted form in the error.
    pub fn parse<T>(
        &mut self,
        node: &Node,
        path: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        let text = self.string(node, path)?;
        match parse(text.trim()) {
            Ok(v) => Some(v),
            Err(msg) => {
                self.error(node.mark, path, msg);
                None
            }
        }
    }

    /// A timeout at `key` under `fields`, `default` when absent: a duration above zero, as
    /// [`parse_positive_duration`] reads it.
    pub fn timeout(
        &mut self,
        fields: &Fields<'_>,
        path: &str,
        key: &str,
        default: Duration,
    ) -> Duration {
        self.field(fields, path, key, default, parse_positive_duration)
    }

    pub fn field<T>(
        &mut self,
        fields: &Fields<'_>,
        path: &str,
        key: &str,
        default: T,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> T {
        match fields.get(key) {
            Some(node) => self.parse(node, &join(path, key), parse).unwrap_or(default),
            None => default,
        }
    }
}

/// Replaces `${NAME}` and `${NAME:-default}`; `$${` is a literal `${`. Every problem in the
/// text is reported in the one message (two unset variables are both named), so that a fix
/// for the first does not reveal the second on the next run.
pub fn interpolate(text: &str, env: Env<'_>) -> Result<String, String> {
    if !text.contains('$') {
        return Ok(text.to_string());
    }
    let mut out = String::with_capacity(text.len());
    let mut unset: Vec<&str> = Vec::new();
    let mut invalid: Vec<(&str, &str)> = Vec::new();
    let mut unterminated = false;
    let mut rest = text;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos..];
        if let Some(tail) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = tail;
        } else if let Some(tail) = after.strip_prefix("${") {
            // Everything after an unclosed `${` would be its name: nothing more to read.
            let Some(end) = tail.find('}') else {
                unterminated = true;
                rest = "";
                break;
            };
            let inner = &tail[..end];
            let (name, default) = match inner.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (inner, None),
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                invalid.push((name, inner));
            } else {
                match (env(name), default) {
                    // As in the shell and Compose, `:-` also stands in for a variable set empty
                    // (a Secret key left blank); `${NAME}` keeps the empty value.
                    (Some(v), Some(d)) if v.is_empty() => out.push_str(d),
                    (Some(v), _) => out.push_str(&v),
                    (None, Some(d)) => out.push_str(d),
                    (None, None) => {
                        if !unset.contains(&name) {
                            unset.push(name);
                        }
                    }
                }
            }
            rest = &tail[end + 1..];
        } else {
            out.push('$');
            rest = &after[1..];
        }
    }
    out.push_str(rest);
    let mut problems = Vec::new();
    match unset.as_slice() {
        [] => {}
        [name] => problems.push(format!(
            "environment variable `{name}` is not set (use `${{{name}:-default}}` for a default)"
        )),
        names => problems.push(format!(
            "environment variables {} are not set (use `${{NAME:-default}}` for a default)",
            quoted(names)
        )),
    }
    if !invalid.is_empty() {
        let each: Vec<String> = invalid
            .iter()
            .map(|(name, inner)| format!("`{name}` in `${{{inner}}}`"))
            .collect();
        let s = if invalid.len() == 1 { "" } else { "s" };
        problems.push(format!(
            "invalid variable name{s} {} (letters, digits and `_` only)",
            each.join(", ")
        ));
    }
    if unterminated {
        problems.push("unterminated `${` (write `$${` for a literal `${`)".to_string());
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems.join("; "))
    }
}

/// `` `A`, `B` `` for a message.
fn quoted(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let expected = || format!("expected a duration such as 30s, 100ms, 5m or 1h, found `{s}`");
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(expected)?;
    let (num, unit) = s.split_at(split);
    let value: f64 = num.parse().map_err(|_| expected())?;
    let secs = match unit.trim() {
        "us" | "µs" => value / 1_000_000.0,
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(expected()),
    };
    if !secs.is_finite() || secs > 1e9 {
        return Err(expected());
    }
    Ok(Duration::from_secs_f64(secs))
}

/// A timeout, which must not be zero: 0s would fail every attempt at once.
fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    let t = parse_duration(s)?;
    if t.is_zero() {
        return Err("must be greater than zero".into());
    }
    Ok(t)
}

pub fn parse_size(s: &str) -> Result<u64, String> {
    let expected = || format!("expected a size such as 64KiB, 1MiB, 1GiB or 4096, found `{s}`");
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: u64 = num.parse().map_err(|_| expected())?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        "KB" | "kB" => 1000,
        "MB" => 1000 * 1000,
        "GB" => 1000 * 1000 * 1000,
        _ => return Err(expected()),
    };
    value.checked_mul(mult).ok_or_else(expected)
}

pub fn parse_bool(s: &str) -> Result<bool, String> {
    match s {
        "true" | "True" | "TRUE" => Ok(true),
        "false" | "False" | "FALSE" => Ok(false),
        _ => Err(format!("expected true or false, found `{s}`")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "HOST" => Some("10.0.0.1".to_string()),
            "BLANK" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn interpolation_forms() {
        assert_eq!(
            interpolate("http://${HOST}:80", &env).as_deref(),
            Ok("http://10.0.0.1:80")
        );
        assert_eq!(interpolate("${NOPE:-x}", &env).as_deref(), Ok("x"));
        assert_eq!(interpolate("${NOPE:-}", &env).as_deref(), Ok(""));
        assert_eq!(interpolate("${BLANK:-x}", &env).as_deref(), Ok("x"));
        assert_eq!(interpolate("[${BLANK}]", &env).as_deref(), Ok("[]"));
        assert_eq!(interpolate("${HOST:-x}", &env).as_deref(), Ok("10.0.0.1"));
        assert_eq!(interpolate("$${HOST}", &env).as_deref(), Ok("${HOST}"));
        assert_eq!(interpolate("cost $5", &env).as_deref(), Ok("cost $5"));
        assert!(interpolate("${NOPE}", &env)
            .expect_err("unset")
            .contains("`NOPE` is not set"));
        assert!(interpolate("${HOST", &env).is_err());
        assert!(interpolate("${A B}", &env).is_err());
    }

    #[test]
    fn every_problem_in_a_scalar_is_reported_in_one_message() {
        assert_eq!(
            interpolate("${MISSING1}-${MISSING2}-${MISSING1}", &env),
            Err("environment variables `MISSING1`, `MISSING2` are not set \
                 (use `${NAME:-default}` for a default)"
                .to_string())
        );
        assert_eq!(
            interpolate("${A B}/${C-D:-x}", &env),
            Err(
                "invalid variable names `A B` in `${A B}`, `C-D` in `${C-D:-x}` \
                 (letters, digits and `_` only)"
                    .to_string()
            )
        );
        assert_eq!(
            interpolate("${NOPE}${A B}${HOST", &env),
            Err(
                "environment variable `NOPE` is not set (use `${NOPE:-default}` for a default); \
                 invalid variable name `A B` in `${A B}` (letters, digits and `_` only); \
                 unterminated `${` (write `$${` for a literal `${`)"
                    .to_string()
            )
        );
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("100ms"), Ok(Duration::from_millis(100)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("30").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("3 weeks").is_err());
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("10MB"), Ok(10_000_000));
        assert!(parse_size("1XB").is_err());
        assert!(parse_size("99999999999999999999GiB").is_err());
    }
}
