//! From a rule's [`EventDraft`] to a CloudEvent: the attributes the rule does not set come
//! from the exchange (`time`, `traceparent`, `ficusupstream`) or from defaults (`id` a new
//! UUIDv7, `partitionkey` the subject, `source` the `events.source`).

use std::time::SystemTime;

use crate::rules::EventDraft;

use super::{CloudEvent, SPEC_VERSION};

/// What the exchange contributes to every event it yields.
pub struct Context<'a> {
    pub default_source: &'a str,
    pub upstream: &'a str,
    pub seen_at: SystemTime,
    pub traceparent: Option<&'a str>,
}

pub fn cloud_event(draft: EventDraft, ctx: &Context<'_>) -> CloudEvent {
    let datacontenttype = draft.data.as_ref().map(|d| {
        if draft.data_text && d.is_string() {
            "text/plain; charset=utf-8".to_string()
        } else {
            "application/json".to_string()
        }
    });
    let partitionkey = draft.partition_key.or_else(|| draft.subject.clone());
    CloudEvent {
        specversion: SPEC_VERSION.to_string(),
        id: draft
            .id
            .filter(|id| !id.is_empty())
            .unwrap_or_else(|| uuid::Uuid::now_v7().to_string()),
        source: draft
            .source
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| ctx.default_source.to_string()),
        ty: draft.ty,
        time: humantime::format_rfc3339_millis(ctx.seen_at).to_string(),
        subject: draft.subject,
        datacontenttype,
        partitionkey,
        ficusupstream: Some(ctx.upstream.to_string()),
        sequence: draft.sequence,
        traceparent: ctx.traceparent.map(str::to_string),
        ficustruncated: draft.data_truncated.then_some(true),
        data: draft.data,
    }
}
