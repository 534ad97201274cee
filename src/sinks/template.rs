//! Templates in sink settings (`subject`, `stream`, later `topic` and `routing_key`): fixed
//! text with placeholders naming the event's own attributes, `{type}`, `{subject}`, `{source}`
//! and `{partitionkey}`. Parsed once at config load; rendering is a concatenation. An absent
//! attribute renders empty.

use std::fmt;

use crate::events::CloudEvent;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attribute {
    Type,
    Subject,
    Source,
    PartitionKey,
}

impl Attribute {
    fn parse(name: &str) -> Option<Attribute> {
        Some(match name {
            "type" => Attribute::Type,
            "subject" => Attribute::Subject,
            "source" => Attribute::Source,
            "partitionkey" => Attribute::PartitionKey,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Attribute::Type => "type",
            Attribute::Subject => "subject",
            Attribute::Source => "source",
            Attribute::PartitionKey => "partitionkey",
        }
    }

    fn value(self, event: &CloudEvent) -> &str {
        match self {
            Attribute::Type => &event.ty,
            Attribute::Subject => event.subject.as_deref().unwrap_or(""),
            Attribute::Source => &event.source,
            Attribute::PartitionKey => event.partitionkey.as_deref().unwrap_or(""),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Attribute(Attribute),
}

/// A parsed sink-setting template such as `shop.{type}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttributeTemplate {
    parts: Vec<Part>,
}

impl AttributeTemplate {
    pub fn parse(text: &str) -> Result<AttributeTemplate, String> {
        if text.is_empty() {
            return Err("must not be empty".into());
        }
        let mut parts = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            match rest.find(['{', '}']) {
                None => {
                    parts.push(Part::Text(rest.to_string()));
                    break;
                }
                Some(pos) if rest.as_bytes()[pos] == b'}' => {
                    return Err(format!("unmatched `}}` in `{text}`"));
                }
                Some(pos) => {
                    if pos > 0 {
                        parts.push(Part::Text(rest[..pos].to_string()));
                    }
                    let after = &rest[pos + 1..];
                    let end = after
                        .find('}')
                        .ok_or_else(|| format!("unterminated `{{` in `{text}`"))?;
                    let name = &after[..end];
                    let attribute = Attribute::parse(name).ok_or_else(|| {
                        format!(
                            "unknown placeholder `{{{name}}}` (sink settings name the event's attributes: {{type}}, {{subject}}, {{source}}, {{partitionkey}})"
                        )
                    })?;
                    parts.push(Part::Attribute(attribute));
                    rest = &after[end + 1..];
                }
            }
        }
        Ok(AttributeTemplate { parts })
    }

    pub fn render(&self, event: &CloudEvent) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Attribute(a) => out.push_str(a.value(event)),
            }
        }
        out
    }

    /// The whole text when there is no placeholder.
    pub fn as_literal(&self) -> Option<&str> {
        match self.parts.as_slice() {
            [Part::Text(t)] => Some(t),
            _ => None,
        }
    }

    /// The fixed text before the first placeholder.
    pub fn literal_prefix(&self) -> &str {
        match self.parts.first() {
            Some(Part::Text(t)) => t,
            _ => "",
        }
    }

    /// The fixed parts of the template, for checks such as "no spaces in a NATS subject".
    pub fn literals(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Text(t) => Some(t.as_str()),
            Part::Attribute(_) => None,
        })
    }
}

impl fmt::Display for AttributeTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for part in &self.parts {
            match part {
                Part::Text(t) => f.write_str(t)?,
                Part::Attribute(a) => write!(f, "{{{}}}", a.name())?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::SPEC_VERSION;

    fn event() -> CloudEvent {
        CloudEvent {
            specversion: SPEC_VERSION.into(),
            id: "0190-a".into(),
            source: "/legacy/shop".into(),
            ty: "shop.order.created".into(),
            time: "2026-11-27T14:00:00.123Z".into(),
            subject: Some("42".into()),
            datacontenttype: None,
            partitionkey: None,
            ficusupstream: None,
            sequence: None,
            traceparent: None,
            ficustruncated: None,
            data: None,
        }
    }

    #[test]
    fn renders_attributes_and_absent_ones_empty() {
        let t = AttributeTemplate::parse("shop.{type}.{subject}:{partitionkey}|{source}")
            .expect("valid");
        assert_eq!(
            t.render(&event()),
            "shop.shop.order.created.42:|/legacy/shop"
        );
        assert_eq!(t.literal_prefix(), "shop.");
        assert_eq!(t.as_literal(), None);
        assert_eq!(
            t.to_string(),
            "shop.{type}.{subject}:{partitionkey}|{source}"
        );
        let fixed = AttributeTemplate::parse("events").expect("valid");
        assert_eq!(fixed.as_literal(), Some("events"));
        assert_eq!(fixed.render(&event()), "events");
    }

    #[test]
    fn refuses_unknown_and_unbalanced_placeholders() {
        let unknown = AttributeTemplate::parse("shop.{response.body.id}").expect_err("unknown");
        assert!(
            unknown.contains("unknown placeholder `{response.body.id}`"),
            "{unknown}"
        );
        assert!(AttributeTemplate::parse("shop.{type").is_err());
        assert!(AttributeTemplate::parse("shop.type}").is_err());
        assert!(AttributeTemplate::parse("").is_err());
    }
}
