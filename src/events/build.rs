//! From a rule's [`EventDraft`] to a CloudEvent: the attributes the rule does not set come
//! from the exchange (`time`, `traceparent`, `ficusupstream`) or from defaults (`id` a new
//! UUIDv7, `partitionkey` the subject, `source` the `events.source`).

use std::time::{SystemTime, UNIX_EPOCH};

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
            .unwrap_or_else(|| uuid_v7(ctx.seen_at)),
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

/// A UUIDv7 (RFC 9562) for an event seen at `at`: its millisecond timestamp, then 74 random
/// bits from `fastrand` (seeded per thread from the OS). `Uuid::now_v7` would read the clock
/// again and the OS's random source for each id (a `getrandom` syscall per event here); ids
/// only need to be unique, and 74 random bits within one millisecond are.
fn uuid_v7(at: SystemTime) -> String {
    let millis = at
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let mut random = [0u8; 10];
    fastrand::fill(&mut random);
    uuid::Builder::from_unix_timestamp_millis(millis, &random)
        .into_uuid()
        .to_string()
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::time::Duration;

    use super::*;

    #[test]
    fn ids_are_version_7_carry_the_time_and_do_not_repeat() {
        let at = UNIX_EPOCH + Duration::from_millis(1_790_000_000_123);
        let ids: HashSet<String> = (0..10_000).map(|_| uuid_v7(at)).collect();
        assert_eq!(ids.len(), 10_000);
        for id in ids.iter().take(10) {
            let uuid = uuid::Uuid::parse_str(id).expect("uuid");
            assert_eq!(uuid.get_version_num(), 7);
            let (secs, nanos) = uuid.get_timestamp().expect("v7 timestamp").to_unix();
            assert_eq!((secs, nanos / 1_000_000), (1_790_000_000, 123));
        }
    }
}
