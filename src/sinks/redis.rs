//! `type: redis`: Redis Streams. Each event is one `XADD` (with `MAXLEN ~ n` when `maxlen` is
//! set) to the stream key rendered from the `stream` template, with one field per attribute
//! (`specversion`, `id`, `source`, `type`, `time`, `subject`, `partitionkey`, ...), then
//! `datacontenttype` and `data` (the data bytes) when the event has them. A batch is one
//! pipeline, one round trip, in order.
//!
//! An entry is delivered once Redis answered its `XADD`. Redis does not deduplicate: a batch
//! whose answers were lost with the connection is sent again whole, so consumers may see an
//! entry twice (same `id` field). When one command of a pipeline fails but later ones
//! succeed, the later ones are remembered and not added a second time by the next attempt.
//!
//! The connection manager connects on first use and reconnects by itself; ficus starts while
//! Redis is down. Failures: connection, timeouts, `LOADING` and other server errors → retried;
//! `WRONGTYPE` (the key holds something other than a stream) → dead letter.

use std::collections::HashSet;
use std::fmt;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{IntoConnectionInfo, RedisError, RedisResult, Value};

use super::template::AttributeTemplate;
use super::{redacted, BoxFuture, SendResult, Sink, SinkFailure};
use crate::events::CloudEvent;

#[derive(Clone, PartialEq)]
pub struct RedisSinkSettings {
    pub name: String,
    /// `redis://[user:password@]host:port[/db]` or `rediss://` for TLS.
    pub url: String,
    pub stream: AttributeTemplate,
    /// `MAXLEN ~ n` on every `XADD`: Redis trims the stream to about `n` entries.
    pub maxlen: Option<u64>,
    /// Overrides a password in the URL.
    pub password: Option<String>,
    pub timeout: Duration,
}

impl fmt::Debug for RedisSinkSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSinkSettings")
            .field("name", &self.name)
            .field("url", &redacted(&self.url))
            .field("stream", &self.stream.to_string())
            .field("maxlen", &self.maxlen)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// The check of the URL at config load.
pub fn parse_url(url: &str) -> Result<(), String> {
    if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
        return Err(format!(
            "expected a redis:// or rediss:// URL, found `{}`",
            redacted(url)
        ));
    }
    url.into_connection_info()
        .map(|_| ())
        .map_err(|e| format!("invalid Redis URL `{}`: {e}", redacted(url)))
}

pub struct RedisSink {
    settings: RedisSinkSettings,
    manager: tokio::sync::OnceCell<ConnectionManager>,
    /// Ids of events Redis added after an earlier command of the same pipeline failed. The
    /// dispatcher sends them again (it resends from the failed one); each is skipped, as
    /// delivered, once.
    added_past_failure: std::sync::Mutex<HashSet<String>>,
}

/// A bound on `added_past_failure` (normally at most one batch), should ids never return.
const MAX_REMEMBERED: usize = 10_000;

impl RedisSink {
    pub fn new(settings: RedisSinkSettings) -> RedisSink {
        RedisSink {
            settings,
            manager: tokio::sync::OnceCell::new(),
            added_past_failure: std::sync::Mutex::new(HashSet::new()),
        }
    }

    /// The connection manager, created on first use; it connects lazily and reconnects.
    async fn manager(&self) -> Result<ConnectionManager, SinkFailure> {
        let manager = self
            .manager
            .get_or_try_init(|| async {
                let mut info = self
                    .settings
                    .url
                    .as_str()
                    .into_connection_info()
                    .map_err(|e| SinkFailure::permanent(format!("invalid Redis URL: {e}")))?;
                if let Some(password) = &self.settings.password {
                    let redis = info.redis_settings().clone().set_password(password);
                    info = info.set_redis_settings(redis);
                }
                let client = redis::Client::open(info).map_err(|e| {
                    SinkFailure::retryable(format!("cannot set up the Redis client: {e}"))
                })?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.settings.timeout))
                    .set_response_timeout(Some(self.settings.timeout))
                    .set_number_of_retries(2)
                    .set_max_delay(Duration::from_secs(1));
                ConnectionManager::new_lazy_with_config(client, config).map_err(|e| {
                    SinkFailure::retryable(format!("cannot set up the Redis connection: {e}"))
                })
            })
            .await?;
        Ok(manager.clone())
    }

    fn xadd(&self, event: &CloudEvent) -> redis::Cmd {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(self.settings.stream.render(event));
        if let Some(n) = self.settings.maxlen {
            cmd.arg("MAXLEN").arg("~").arg(n);
        }
        cmd.arg("*");
        for (name, value) in event.attributes() {
            cmd.arg(name).arg(value);
        }
        if let Some(ct) = &event.datacontenttype {
            cmd.arg("datacontenttype").arg(ct.as_str());
        }
        if let Some(data) = event.data_bytes() {
            cmd.arg("data").arg(data.as_ref());
        }
        cmd
    }

    async fn send_batch(&self, events: &[CloudEvent]) -> SendResult {
        let mut manager = match self.manager().await {
            Ok(m) => m,
            Err(f) => return SendResult::failed(0, f),
        };
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        // The event index of each command.
        let mut sent = Vec::with_capacity(events.len());
        {
            let mut added = self
                .added_past_failure
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            for (i, event) in events.iter().enumerate() {
                if !added.remove(&event.id) {
                    pipe.add_command(self.xadd(event));
                    sent.push(i);
                }
            }
        }
        if sent.is_empty() {
            return SendResult::all(events.len());
        }
        let answer = tokio::time::timeout(
            self.settings.timeout,
            pipe.query_async::<Vec<RedisResult<Value>>>(&mut manager),
        )
        .await;
        let results = match answer {
            Err(_) => {
                return SendResult::failed(
                    0,
                    SinkFailure::retryable(format!(
                        "no answer from Redis within {:?}",
                        self.settings.timeout
                    )),
                )
            }
            Ok(Err(e)) => return SendResult::failed(0, classify(&e)),
            Ok(Ok(results)) => results,
        };
        if results.len() != sent.len() {
            return SendResult::failed(
                0,
                SinkFailure::retryable(format!(
                    "Redis answered {} of {} commands",
                    results.len(),
                    sent.len()
                )),
            );
        }
        let Some(first) = results.iter().position(Result::is_err) else {
            return SendResult::all(events.len());
        };
        let failure = match &results[first] {
            Err(e) => classify(e),
            Ok(_) => SinkFailure::retryable("Redis refused the command"),
        };
        let mut added = self
            .added_past_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if added.len() > MAX_REMEMBERED {
            added.clear();
        }
        added.extend(
            sent.iter()
                .zip(&results)
                .skip(first + 1)
                .filter(|(_, r)| r.is_ok())
                .map(|(&i, _)| events[i].id.clone()),
        );
        drop(added);
        let index = sent[first];
        SendResult::failed(
            index,
            SinkFailure {
                message: format!(
                    "XADD to `{}` failed: {}",
                    self.settings.stream.render(&events[index]),
                    failure.message
                ),
                ..failure
            },
        )
    }
}

/// `WRONGTYPE` never heals by itself; everything else (connection, `LOADING`, `OOM`, ...)
/// may.
fn classify(error: &RedisError) -> SinkFailure {
    if error.code() == Some("WRONGTYPE") {
        SinkFailure::permanent(format!("the key is not a stream: {error}"))
    } else {
        SinkFailure::retryable(format!("Redis: {error}"))
    }
}

impl Sink for RedisSink {
    fn send<'a>(&'a self, events: &'a [CloudEvent]) -> BoxFuture<'a, SendResult> {
        Box::pin(self.send_batch(events))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_and_redacted() {
        assert!(parse_url("redis://127.0.0.1:6379").is_ok());
        assert!(parse_url("redis://:secret@127.0.0.1:6379/2").is_ok());
        assert!(parse_url("rediss://cache.example:6380").is_ok());
        let err = parse_url("http://u:secret@127.0.0.1").expect_err("scheme");
        assert!(!err.contains("secret"), "{err}");
    }

    #[test]
    fn xadd_has_a_field_per_attribute_then_data() {
        let sink = RedisSink::new(RedisSinkSettings {
            name: "s".into(),
            url: "redis://127.0.0.1".into(),
            stream: AttributeTemplate::parse("events:{type}").expect("template"),
            maxlen: Some(1000),
            password: None,
            timeout: Duration::from_secs(1),
        });
        let event = CloudEvent {
            subject: Some("42".into()),
            ficusupstream: None,
            data: Some(serde_json::json!({"id": 42})),
            ..crate::events::sample_event()
        };
        let args: Vec<String> = sink
            .xadd(&event)
            .args_iter()
            .map(|a| match a {
                redis::Arg::Simple(b) => String::from_utf8_lossy(b).into_owned(),
                _ => "<other>".into(),
            })
            .collect();
        assert_eq!(
            args,
            [
                "XADD",
                "events:shop.order.created",
                "MAXLEN",
                "~",
                "1000",
                "*",
                "specversion",
                "1.0",
                "id",
                "0190-a",
                "source",
                "/legacy/shop",
                "type",
                "shop.order.created",
                "time",
                "2026-11-27T14:00:00.123Z",
                "subject",
                "42",
                "partitionkey",
                "42",
                "datacontenttype",
                "application/json",
                "data",
                "{\"id\":42}",
            ]
        );
    }
}
