//! Where events go. A [`Sink`] sends a batch in order and says how far it got; the dispatcher
//! (not the sink) owns retries, backoff, cursors and dead letters, so a new sink type (Kafka...)
//! implements `send` and nothing else. Settings that name a destination per event (`subject`,
//! `stream`, `routing_key`, `topic`) are [`template::AttributeTemplate`]s over the event's attributes.

pub mod amqp;
pub mod file;
pub mod http;
pub mod kafka;
pub mod nats;
pub mod redis;
pub mod stdout;
pub mod template;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::config::SinkKind;
use crate::events::CloudEvent;
use crate::proxy::client::ClientError;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// How one `send` went: the first `delivered` events were accepted; if `failure` is set, the
/// event right after them was not.
#[derive(Debug)]
pub struct SendResult {
    pub delivered: usize,
    pub failure: Option<SinkFailure>,
}

impl SendResult {
    pub fn all(n: usize) -> SendResult {
        SendResult {
            delivered: n,
            failure: None,
        }
    }

    pub fn failed(delivered: usize, failure: SinkFailure) -> SendResult {
        SendResult {
            delivered,
            failure: Some(failure),
        }
    }
}

#[derive(Debug, Clone)]
pub struct SinkFailure {
    /// The sink will never take this event (an HTTP 4xx other than 408/429, a message too
    /// large): it goes to the sink's dead letters. Otherwise it is retried with backoff.
    pub permanent: bool,
    pub message: String,
}

impl SinkFailure {
    pub fn retryable(message: impl Into<String>) -> SinkFailure {
        SinkFailure {
            permanent: false,
            message: message.into(),
        }
    }

    pub fn permanent(message: impl Into<String>) -> SinkFailure {
        SinkFailure {
            permanent: true,
            message: message.into(),
        }
    }
}

pub trait Sink: Send + Sync {
    /// Sends `events` in order. Must not return before the events it reports delivered are
    /// accepted by the other side (acknowledged, fsynced...): at-least-once rests on it.
    fn send<'a>(&'a self, events: &'a [CloudEvent]) -> BoxFuture<'a, SendResult>;
}

/// The sink a config entry describes. Only local checks happen here (TLS files, URLs): a
/// broker is connected to later, so ficus starts while it is down.
pub fn build(kind: &SinkKind) -> Result<Arc<dyn Sink>, ClientError> {
    Ok(match kind {
        SinkKind::File { path } => Arc::new(file::FileSink::new(path.clone())),
        SinkKind::Stdout => Arc::new(stdout::StdoutSink),
        SinkKind::Http(settings) => Arc::new(http::HttpSink::new((**settings).clone())?),
        SinkKind::Nats(settings) => Arc::new(nats::NatsSink::new((**settings).clone())?),
        SinkKind::Redis(settings) => Arc::new(redis::RedisSink::new((**settings).clone())),
        SinkKind::Amqp(settings) => Arc::new(amqp::AmqpSink::new((**settings).clone())?),
        SinkKind::Kafka(settings) => Arc::new(kafka::KafkaSink::new((**settings).clone())?),
    })
}

/// A URL without its credentials (`scheme://***@host...`), for messages and logs.
pub(crate) fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn urls_are_redacted() {
        assert_eq!(super::redacted("redis://:pw@h:1/0"), "redis://***@h:1/0");
        assert_eq!(super::redacted("nats://u:p@h:4222"), "nats://***@h:4222");
        assert_eq!(super::redacted("redis://h:1"), "redis://h:1");
    }
}
