//! An AsyncAPI 3.0 document of every event the rules can emit: one channel, operation and
//! message per rule, the message payload a CloudEvent in structured JSON whose `data` schema
//! comes from the rule's `data` (object keys and constant values are known; a placeholder's
//! type is not, so its schema says where the value comes from).

use serde_json::{json, Map, Value};

use crate::config::Config;
use crate::rules::{DataTemplate, Rule, Template};

/// The document as pretty JSON (JSON is valid YAML, and what `/asyncapi` serves).
pub fn document(config: &Config) -> String {
    serde_json::to_string_pretty(&build(config)).unwrap_or_default()
}

pub fn build(config: &Config) -> Value {
    let mut channels = Map::new();
    let mut operations = Map::new();
    let mut messages = Map::new();
    let (source, rules): (&str, &[Rule]) = match &config.events {
        Some(e) => (&e.source, e.rules.rules()),
        None => (crate::config::DEFAULT_SOURCE, &[]),
    };
    for rule in rules {
        let name = &rule.name;
        let address = rule.ty.as_str().to_string();
        channels.insert(
            name.clone(),
            json!({
                "address": address,
                "description": format!("Events of rule `{name}`: {} {} answered {}", rule.method.as_ref().map_or("any method", |m| m.as_str()), rule.path.as_str(), status_text(rule)),
                "messages": { name.clone(): { "$ref": format!("#/components/messages/{name}") } }
            }),
        );
        operations.insert(
            name.clone(),
            json!({
                "action": "send",
                "channel": { "$ref": format!("#/channels/{name}") },
                "messages": [ { "$ref": format!("#/channels/{name}/messages/{name}") } ]
            }),
        );
        messages.insert(name.clone(), message(rule, source));
    }
    json!({
        "asyncapi": "3.0.0",
        "info": {
            "title": "ficus events",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "CloudEvents 1.0 that ficus derives from the monolith's responses by route-to-event rules."
        },
        "defaultContentType": "application/cloudevents+json",
        "channels": channels,
        "operations": operations,
        "components": { "messages": messages }
    })
}

fn status_text(rule: &Rule) -> String {
    rule.status.to_string()
}

fn attribute(template: Option<&Template>, fallback: Value) -> Value {
    match template {
        Some(t) => match t.as_constant() {
            Some(c) => json!({ "type": "string", "const": c }),
            None => json!({ "type": "string", "description": format!("from `{}`", t.as_str()) }),
        },
        None => fallback,
    }
}

fn message(rule: &Rule, default_source: &str) -> Value {
    let string = json!({ "type": "string" });
    let mut properties = Map::new();
    properties.insert(
        "specversion".into(),
        json!({ "type": "string", "const": "1.0" }),
    );
    properties.insert(
        "id".into(),
        attribute(
            rule.id.as_ref(),
            json!({ "type": "string", "description": "UUIDv7" }),
        ),
    );
    properties.insert(
        "source".into(),
        attribute(
            rule.source.as_ref(),
            json!({ "type": "string", "const": default_source }),
        ),
    );
    properties.insert("type".into(), attribute(Some(&rule.ty), string.clone()));
    properties.insert(
        "time".into(),
        json!({ "type": "string", "format": "date-time" }),
    );
    properties.insert(
        "subject".into(),
        attribute(rule.subject.as_ref(), string.clone()),
    );
    properties.insert(
        "partitionkey".into(),
        attribute(
            rule.partition_key.as_ref(),
            json!({ "type": "string", "description": "the subject" }),
        ),
    );
    properties.insert(
        "sequence".into(),
        attribute(rule.sequence.as_ref(), string.clone()),
    );
    properties.insert("ficusupstream".into(), string.clone());
    properties.insert("traceparent".into(), string.clone());
    properties.insert("datacontenttype".into(), string);
    properties.insert(
        "data".into(),
        match &rule.data {
            Some(d) => data_schema(d),
            None => json!({ "description": "the response body" }),
        },
    );
    json!({
        "name": rule.name,
        "title": rule.ty.as_str(),
        "contentType": "application/cloudevents+json",
        "payload": {
            "type": "object",
            "required": ["specversion", "id", "source", "type", "time"],
            "properties": properties
        }
    })
}

fn data_schema(data: &DataTemplate) -> Value {
    match data {
        DataTemplate::Literal(v) => json!({ "const": v }),
        DataTemplate::Template(t) => match t.as_constant() {
            Some(c) => json!({ "type": "string", "const": c }),
            None => json!({ "description": format!("from `{}`", t.as_str()) }),
        },
        DataTemplate::Array(items) => json!({
            "type": "array",
            "prefixItems": items.iter().map(data_schema).collect::<Vec<_>>()
        }),
        DataTemplate::Object(fields) => {
            let props: Map<String, Value> = fields
                .iter()
                .map(|(k, v)| (k.clone(), data_schema(v)))
                .collect();
            json!({ "type": "object", "properties": props })
        }
    }
}
