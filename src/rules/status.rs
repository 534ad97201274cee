//! Which response statuses a rule applies to: `2xx` (the default), a class, a code, or a list.

use std::fmt;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StatusMatch {
    /// `201`: exactly this code.
    Code(u16),
    /// `2xx`: every code of the class, stored as its first digit.
    Class(u8),
    /// `[200, 204, 3xx]`: any of these codes or classes (never a nested list).
    Any(Vec<StatusMatch>),
}

impl StatusMatch {
    /// The SPEC's default: a failed request changed no state, so only `2xx` emits.
    pub fn default_2xx() -> Self {
        StatusMatch::Class(2)
    }

    /// One code (`201`) or class (`4xx`, any case).
    pub fn parse_one(s: &str) -> Result<StatusMatch, String> {
        let t = s.trim();
        if let Some(digit) = t
            .strip_suffix("xx")
            .or_else(|| t.strip_suffix("XX"))
            .filter(|d| d.len() == 1)
        {
            return match digit.as_bytes()[0] {
                d @ b'1'..=b'5' => Ok(StatusMatch::Class(d - b'0')),
                _ => Err(format!(
                    "expected a status class from 1xx to 5xx, found `{s}`"
                )),
            };
        }
        match t.parse::<u16>() {
            Ok(code) if (100..=599).contains(&code) => Ok(StatusMatch::Code(code)),
            _ => Err(format!(
                "expected a status code (100 to 599) or class (such as 2xx), found `{s}`"
            )),
        }
    }

    /// A list of codes and classes, as written in `status: [200, 204]`.
    pub fn list(items: Vec<StatusMatch>) -> Result<StatusMatch, String> {
        if items.is_empty() {
            return Err("an empty status list matches nothing; leave `status` out for 2xx".into());
        }
        if items.iter().any(|i| matches!(i, StatusMatch::Any(_))) {
            return Err("a status list holds codes and classes, not lists".into());
        }
        Ok(StatusMatch::Any(items))
    }

    pub fn matches(&self, status: u16) -> bool {
        match self {
            StatusMatch::Code(c) => *c == status,
            StatusMatch::Class(d) => status / 100 == u16::from(*d),
            StatusMatch::Any(items) => items.iter().any(|i| i.matches(status)),
        }
    }
}

impl Default for StatusMatch {
    fn default() -> Self {
        StatusMatch::default_2xx()
    }
}

impl fmt::Display for StatusMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StatusMatch::Code(c) => write!(f, "{c}"),
            StatusMatch::Class(d) => write!(f, "{d}xx"),
            StatusMatch::Any(items) => {
                f.write_str("[")?;
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{item}")?;
                }
                f.write_str("]")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(s: &str) -> StatusMatch {
        StatusMatch::parse_one(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn default_is_2xx() {
        let m = StatusMatch::default();
        assert!(m.matches(200) && m.matches(201) && m.matches(299));
        assert!(!m.matches(199) && !m.matches(300) && !m.matches(404) && !m.matches(500));
        assert_eq!(m.to_string(), "2xx");
    }

    #[test]
    fn codes_and_classes() {
        assert!(one("201").matches(201));
        assert!(!one("201").matches(200));
        assert!(one("4xx").matches(404));
        assert!(one("4XX").matches(499));
        assert!(!one("4xx").matches(500));
        assert!(one(" 204 ").matches(204));
    }

    #[test]
    fn lists_mix_codes_and_classes() {
        let m = StatusMatch::list(vec![one("200"), one("204"), one("3xx")]).expect("list");
        assert!(m.matches(200) && m.matches(204) && m.matches(302));
        assert!(!m.matches(201) && !m.matches(404));
        assert_eq!(m.to_string(), "[200, 204, 3xx]");
    }

    #[test]
    fn parse_errors() {
        for (input, want) in [
            (
                "6xx",
                "expected a status class from 1xx to 5xx, found `6xx`",
            ),
            ("0xx", "expected a status class from 1xx to 5xx"),
            (
                "99",
                "expected a status code (100 to 599) or class (such as 2xx), found `99`",
            ),
            ("600", "expected a status code (100 to 599)"),
            ("ok", "expected a status code"),
            ("2x", "expected a status code"),
            ("", "expected a status code"),
        ] {
            let err = StatusMatch::parse_one(input).expect_err(input);
            assert!(err.starts_with(want), "{input}: {err}");
        }
        assert!(StatusMatch::list(vec![])
            .expect_err("empty")
            .starts_with("an empty status list"));
        let nested = StatusMatch::list(vec![one("200")]).expect("list");
        assert!(StatusMatch::list(vec![nested]).is_err());
    }
}
