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
use crate::events::{CloudEvent, StoredEvent};
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

    /// Sends events as the outbox stores them; what the dispatcher calls. Same contract as
    /// [`send`](Self::send). Sinks that write the structured JSON (JSON Lines, HTTP structured
    /// and batch) override it to copy [`StoredEvent::json`]: decoding each event into owned
    /// strings and a JSON tree only to serialise it back was most of the dispatcher's cost
    /// per event. The others get the events decoded.
    fn send_stored<'a>(&'a self, events: &'a [StoredEvent]) -> BoxFuture<'a, SendResult> {
        send_decoded(self, events)
    }
}

/// [`Sink::send_stored`] by way of [`Sink::send`]. An event that does not decode is refused
/// for good after the ones before it are sent: it goes to the dead letters, as an undecodable
/// envelope does. Of what ficus writes, only an event nested deeper than serde_json reads
/// (`data` from a body of about 126 levels) does not decode; the sinks that copy the stored
/// bytes (file, stdout, HTTP structured and batch) write that one as it is.
pub fn send_decoded<'a, S: Sink + ?Sized>(
    sink: &'a S,
    events: &'a [StoredEvent],
) -> BoxFuture<'a, SendResult> {
    Box::pin(async move {
        let mut decoded = Vec::with_capacity(events.len());
        let mut refused = None;
        for event in events {
            match event.decode() {
                Ok(e) => decoded.push(e),
                Err(error) => {
                    refused = Some(error);
                    break;
                }
            }
        }
        let result = if decoded.is_empty() {
            SendResult::all(0)
        } else {
            sink.send(&decoded).await
        };
        match refused {
            Some(error) if result.failure.is_none() && result.delivered >= decoded.len() => {
                SendResult::failed(
                    decoded.len(),
                    SinkFailure::permanent(format!("undecodable event: {error}")),
                )
            }
            _ => result,
        }
    })
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
    use std::sync::Mutex;

    use super::*;
    use crate::events::{sample_event, Envelope};

    /// Records what `send` was given.
    #[derive(Default)]
    struct Recording(Mutex<Vec<String>>);

    impl Sink for Recording {
        fn send<'a>(&'a self, events: &'a [CloudEvent]) -> BoxFuture<'a, SendResult> {
            Box::pin(async move {
                let mut seen = self.0.lock().expect("lock");
                seen.extend(events.iter().map(|e| e.id.clone()));
                SendResult::all(events.len())
            })
        }
    }

    fn stored(payload: Vec<u8>) -> StoredEvent {
        StoredEvent::parse(&payload.into(), None)
            .expect("an envelope")
            .expect("for every sink")
    }

    /// A sink that decodes gets the events before one that does not decode, which is then
    /// refused for good (a dead letter), as an undecodable envelope is.
    #[tokio::test]
    async fn an_event_that_does_not_decode_is_refused_for_good() {
        let good = Envelope {
            sinks: None,
            rule: "r".into(),
            event: sample_event(),
        }
        .encode()
        .to_vec();
        let bad = br#"{"rule":"r","event":{"id":1}}"#.to_vec();
        let sink = Recording::default();
        let events = [stored(good.clone()), stored(bad), stored(good)];
        let result = sink.send_stored(&events).await;
        assert_eq!(result.delivered, 1);
        assert!(result.failure.expect("refused").permanent);
        assert_eq!(*sink.0.lock().expect("lock"), ["0190-a"]);
        let result = sink.send_stored(&events[2..]).await;
        assert_eq!((result.delivered, result.failure.is_none()), (1, true));
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(super::redacted("redis://:pw@h:1/0"), "redis://***@h:1/0");
        assert_eq!(super::redacted("nats://u:p@h:4222"), "nats://***@h:4222");
        assert_eq!(super::redacted("redis://h:1"), "redis://h:1");
    }
}
