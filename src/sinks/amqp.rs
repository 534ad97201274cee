//! `type: amqp`: RabbitMQ over AMQP 0-9-1. Each event is one message published to `exchange`
//! with the routing key rendered from the `routing_key` template, in the CloudEvents AMQP
//! binding's binary mode: every attribute is an application property (a header)
//! `cloudEvents_NAME` with the value as a string, `content-type` carries `datacontenttype`,
//! the body is the data bytes, `message_id` is the event id and the delivery mode is 2
//! (persistent), so a durable queue keeps the message through a broker restart.
//!
//! An event is delivered when the broker confirmed it (publisher confirms: the channel is in
//! confirm mode, and a persistent message routed to a durable queue is confirmed once the
//! queue has it on disk). Messages are published with `mandatory`: one that no queue takes is
//! returned by the broker, and that is a permanent failure (dead letter) naming the exchange
//! and routing key. A batch is published in order on one channel without waiting for each
//! confirm, but never two events with the same partition key at once (as the NATS sink): when
//! the broker refuses one (`nack`: a queue at its `x-max-length` with `reject-publish`), no
//! later event of its key can get into a queue ahead of its retry. Events of other keys that
//! the broker confirmed after it are remembered and not published a second time by the retry.
//!
//! The connection is made lazily: at start-up in the background, else by the next delivery
//! attempt, so ficus starts while the broker is down. A lost connection (broker restart,
//! `rabbitmqctl close_connection`, network) fails the attempt under way, if any; the next one
//! connects again. A channel the broker closed (a missing exchange) is replaced on the same
//! connection. Such a close fails every unconfirmed event of the wave: the first one is
//! reported, and the dispatcher then narrows a permanent failure down by sending the events
//! one at a time, so only the event the broker refuses is dead-lettered.
//!
//! Failures: no connection, a lost connection, a `nack`, no confirm within `timeout`, a
//! connection blocked by a memory or disk alarm → retried. A message no queue takes (returned,
//! 312 NO_ROUTE), a missing exchange (the broker closes the channel with 404 NOT_FOUND),
//! publishing refused to this user (403 ACCESS_REFUSED), a message over the broker's
//! `max_message_size` (406 PRECONDITION_FAILED) and a routing key over 255 bytes → dead letter.
//!
//! Except in the first [`RECOVERING`] of a connection: a broker restarted after a crash takes
//! connections before it has its durable exchanges, queues and bindings back, and meanwhile
//! returns messages as unroutable or closes the channel as if the exchange did not exist. Seen
//! in the kill -9 test: 196 of 200 events dead-lettered in the seconds after the restart. So
//! in that window these two are retried, and a misconfigured exchange or binding costs that
//! long before its events go to the dead letters. The window was 10 s until a CI run of the
//! same test, on a loaded 2-core machine, timed out with every retry unroutable: RabbitMQ
//! 3.10 had come back with the queue and its messages but without its binding, which stays
//! missing until a client binds the queue again (rabbitmq-server#1878, #1884), as consuming
//! applications do when they reconnect, every 5 s by default in the Java client's topology
//! recovery. 30 s leaves them a few attempts.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use lapin::message::BasicReturnMessage;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ErrorKind};
use tokio::time::Instant;

use super::template::AttributeTemplate;
use super::{redacted, BoxFuture, SendResult, Sink, SinkFailure};
use crate::config::UpstreamTls;
use crate::events::CloudEvent;
use crate::proxy::client::{tls_config, ClientError};

/// Most events published before their confirms are awaited.
const MAX_IN_FLIGHT: usize = 256;

/// AMQP short strings (exchange, routing key, message id, content type) have at most 255 bytes.
pub const MAX_SHORT_STRING: usize = 255;

/// The prefix of the CloudEvents AMQP binding's application properties.
pub const HEADER_PREFIX: &str = "cloudEvents_";

/// A bound on the ids remembered as confirmed past a failure (normally at most one batch).
const MAX_REMEMBERED: usize = 10_000;

#[derive(Clone, PartialEq)]
pub struct AmqpSinkSettings {
    pub name: String,
    /// `amqp://user:password@host:port/vhost` (`%2f` is the vhost `/`) or `amqps://` for TLS.
    pub uri: AMQPUri,
    /// May be empty: the default exchange, which routes to the queue named by the routing key.
    pub exchange: String,
    pub routing_key: AttributeTemplate,
    /// With `amqps://`: a CA added to the system roots, and a client certificate and key.
    pub tls: Option<UpstreamTls>,
    pub timeout: Duration,
}

impl fmt::Debug for AmqpSinkSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpSinkSettings")
            .field("name", &self.name)
            .field("broker", &broker(&self.uri))
            .field("user", &self.uri.authority.userinfo.username)
            .field("exchange", &self.exchange)
            .field("routing_key", &self.routing_key.to_string())
            .field("tls", &self.tls)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// `amqp://host:port/vhost`, without credentials, for messages and logs.
fn broker(uri: &AMQPUri) -> String {
    let host = if uri.authority.host.contains(':') {
        format!("[{}]", uri.authority.host)
    } else {
        uri.authority.host.clone()
    };
    let vhost =
        percent_encoding::utf8_percent_encode(&uri.vhost, percent_encoding::NON_ALPHANUMERIC);
    format!("{}://{host}:{}/{vhost}", uri.scheme, uri.authority.port)
}

/// The check of the URL at config load, and its parsed form. `password` replaces the one in
/// the URL.
pub fn parse_url(url: &str, password: Option<&str>) -> Result<AMQPUri, String> {
    let shown = redacted(url);
    let invalid = |detail: String| {
        // The parser may quote the URL: never its credentials.
        let detail = detail.replace(url, &shown);
        format!("invalid AMQP URL `{shown}`: {detail}")
    };
    if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
        return Err(format!(
            "expected an amqp:// or amqps:// URL, found `{shown}`"
        ));
    }
    let mut uri: AMQPUri = url.parse().map_err(invalid)?;
    // The parser keeps only DNS names and takes an IP address for `localhost`: read the host
    // again ([::1] without its brackets).
    let authority: http::Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| invalid(e.to_string()))?;
    let host = authority
        .host()
        .map(|h| h.trim_start_matches('[').trim_end_matches(']'))
        .filter(|h| !h.is_empty())
        .ok_or_else(|| invalid("no host".into()))?;
    uri.authority.host = percent_encoding::percent_decode_str(host)
        .decode_utf8()
        .map_err(|e| invalid(e.to_string()))?
        .into_owned();
    if uri.vhost.is_empty() {
        return Err(format!(
            "`{shown}` names the empty vhost: write `/%2f` for the default vhost `/`, or leave the path out"
        ));
    }
    if let Some(password) = password {
        uri.authority.userinfo.password = password.to_string();
    }
    Ok(uri)
}

/// An exchange name RabbitMQ takes: at most 255 bytes, no control characters; `""` is the
/// default exchange.
pub fn valid_exchange(name: &str) -> Result<(), String> {
    if name.len() > MAX_SHORT_STRING {
        return Err(format!(
            "exchange names have at most {MAX_SHORT_STRING} bytes, found {}",
            name.len()
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(format!("`{name}` has control characters"));
    }
    Ok(())
}

/// The check of a `routing_key` template at config load: its fixed text fits in a short string.
pub fn check_routing_key(template: &AttributeTemplate) -> Result<(), String> {
    let fixed: usize = template.literals().map(str::len).sum();
    if fixed > MAX_SHORT_STRING {
        return Err(format!(
            "routing keys have at most {MAX_SHORT_STRING} bytes; the fixed text alone has {fixed}"
        ));
    }
    Ok(())
}

/// How long after connecting a message returned as unroutable, or a missing exchange, is taken
/// for a broker still recovering its topology after a restart (retried), not for a
/// configuration that will never route it (dead letter).
pub const RECOVERING: Duration = Duration::from_secs(30);

/// The connection and the confirm-mode channel events are published on.
struct Publisher {
    connection: Connection,
    channel: Channel,
    connected_at: Instant,
}

impl Publisher {
    /// A failure that means "never" once the broker had time to recover its topology, and
    /// "not yet" before.
    fn topology_failure(&self, message: String) -> SinkFailure {
        let age = self.connected_at.elapsed();
        if age < RECOVERING {
            SinkFailure::retryable(format!(
                "{message}; retried while the connection is younger than {RECOVERING:?} (now {:.1}s): a restarted broker may not have its exchanges and bindings back yet",
                age.as_secs_f64()
            ))
        } else {
            SinkFailure::permanent(message)
        }
    }
}

struct Inner {
    settings: AmqpSinkSettings,
    publisher: tokio::sync::Mutex<Option<Publisher>>,
    /// Ids of events the broker confirmed after an earlier event of the same wave failed. The
    /// dispatcher sends them again (it resends from the failed one); each is skipped, as
    /// delivered, once.
    confirmed_past_failure: std::sync::Mutex<HashSet<String>>,
}

pub struct AmqpSink {
    inner: Arc<Inner>,
}

impl AmqpSink {
    /// Checks the TLS files now (a bad file fails start-up, as for upstreams); connects later.
    pub fn new(settings: AmqpSinkSettings) -> Result<AmqpSink, ClientError> {
        if let Some(files) = &settings.tls {
            tls_config(&settings.name, true, files)?;
        }
        let inner = Arc::new(Inner {
            settings,
            publisher: tokio::sync::Mutex::new(None),
            confirmed_past_failure: std::sync::Mutex::new(HashSet::new()),
        });
        // Connect at start-up when running on a runtime; if the broker is down, the first
        // delivery attempt tries again.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let warm = inner.clone();
            runtime.spawn(async move {
                let mut slot = warm.publisher.lock().await;
                if let Err(failure) = warm.ready(&mut slot).await {
                    tracing::warn!(sink = %warm.settings.name, reason = %failure.message, "RabbitMQ not reachable at start-up; events wait in the outbox and delivery retries");
                }
            });
        }
        Ok(AmqpSink { inner })
    }
}

/// How one published event of a wave ended.
enum Outcome {
    /// Not published (the wave stopped before it).
    NotSent,
    Confirmed,
    Failed(SinkFailure),
}

impl Inner {
    fn broker(&self) -> String {
        broker(&self.settings.uri)
    }

    /// The TLS files, read at each connection (a renewed client certificate is picked up by
    /// the next one). The system roots are always trusted; `ca` is added to them.
    async fn tls_files(&self) -> Result<OwnedTLSConfig, SinkFailure> {
        let Some(files) = &self.settings.tls else {
            return Ok(OwnedTLSConfig::default());
        };
        let read = |path: std::path::PathBuf| async move {
            tokio::fs::read(&path).await.map_err(|e| {
                SinkFailure::retryable(format!("cannot read `{}`: {e}", path.display()))
            })
        };
        let cert_chain = match &files.ca {
            Some(ca) => Some(String::from_utf8_lossy(&read(ca.clone()).await?).into_owned()),
            None => None,
        };
        let identity = match (&files.cert, &files.key) {
            (Some(cert), Some(key)) => Some(OwnedIdentity::PKCS8 {
                pem: read(cert.clone()).await?,
                key: read(key.clone()).await?,
            }),
            _ => None,
        };
        Ok(OwnedTLSConfig {
            identity,
            cert_chain,
        })
    }

    async fn connect(&self) -> Result<Publisher, SinkFailure> {
        let timeout = self.settings.timeout;
        let tls = self.tls_files().await?;
        let runtime = lapin::runtime::default_runtime()
            .map_err(|e| SinkFailure::retryable(format!("no runtime for the AMQP client: {e}")))?;
        let properties = ConnectionProperties::default()
            .with_connection_name(format!("ficus/{}", self.settings.name).into());
        let connect = Connection::connect_uri_with_config(
            self.settings.uri.clone(),
            properties,
            tls,
            runtime,
        );
        let connection = match tokio::time::timeout(timeout, connect).await {
            Err(_) => {
                return Err(SinkFailure::retryable(format!(
                    "no connection to RabbitMQ at {} within {timeout:?}",
                    self.broker()
                )))
            }
            Ok(Err(e)) => {
                return Err(SinkFailure::retryable(format!(
                    "cannot connect to RabbitMQ at {} as `{}`: {e}",
                    self.broker(),
                    self.settings.uri.authority.userinfo.username
                )))
            }
            Ok(Ok(connection)) => connection,
        };
        let channel = self.open_channel(&connection).await?;
        tracing::info!(sink = %self.settings.name, broker = %self.broker(), "connected to RabbitMQ");
        Ok(Publisher {
            connection,
            channel,
            connected_at: Instant::now(),
        })
    }

    /// A new channel in confirm mode.
    async fn open_channel(&self, connection: &Connection) -> Result<Channel, SinkFailure> {
        let timeout = self.settings.timeout;
        let open = async {
            let channel = connection.create_channel().await?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            Ok::<_, lapin::Error>(channel)
        };
        match tokio::time::timeout(timeout, open).await {
            Ok(Ok(channel)) => Ok(channel),
            Ok(Err(e)) => Err(SinkFailure::retryable(format!(
                "cannot open a channel in confirm mode on {}: {e}",
                self.broker()
            ))),
            Err(_) => Err(SinkFailure::retryable(format!(
                "no channel from {} within {timeout:?}",
                self.broker()
            ))),
        }
    }

    /// A connected publisher: the one in `slot`, its channel replaced if the broker closed
    /// it, or a new connection.
    async fn ready<'s>(
        &self,
        slot: &'s mut Option<Publisher>,
    ) -> Result<&'s Publisher, SinkFailure> {
        if slot
            .as_ref()
            .is_some_and(|p| !p.connection.status().connected())
        {
            tracing::warn!(sink = %self.settings.name, broker = %self.broker(), "RabbitMQ connection lost; reconnecting");
            *slot = None;
        }
        match slot {
            Some(publisher) if !publisher.channel.status().connected() => {
                match self.open_channel(&publisher.connection).await {
                    Ok(channel) => publisher.channel = channel,
                    Err(failure) => {
                        *slot = None;
                        return Err(failure);
                    }
                }
            }
            Some(_) => {}
            None => *slot = Some(self.connect().await?),
        }
        let publisher = slot
            .as_ref()
            .ok_or_else(|| SinkFailure::retryable("no RabbitMQ connection"))?;
        if publisher.connection.status().blocked() {
            return Err(SinkFailure::retryable(format!(
                "RabbitMQ at {} blocks publishing (a memory or disk alarm)",
                self.broker()
            )));
        }
        Ok(publisher)
    }

    /// Either the rendered routing key or a permanent failure saying why not.
    fn routing_key(&self, event: &CloudEvent) -> Result<ShortString, SinkFailure> {
        let key = self.settings.routing_key.render(event);
        let len = key.len();
        ShortString::try_new(key).map_err(|_| {
            SinkFailure::permanent(format!(
                "the routing key from `{}` has {len} bytes; AMQP allows {MAX_SHORT_STRING}",
                self.settings.routing_key
            ))
        })
    }

    /// What a failed publish or confirm means. The broker closes the channel (a soft error) for
    /// what concerns this message; a lost or closed connection is always retried (a 403 there
    /// is a refused login, not a refused message).
    fn classify(
        &self,
        publisher: &Publisher,
        routing_key: &str,
        error: &lapin::Error,
    ) -> SinkFailure {
        let exchange = &self.settings.exchange;
        let vhost = &self.settings.uri.vhost;
        let channel_level = publisher.connection.status().connected();
        if let (true, ErrorKind::ProtocolError(amqp)) = (channel_level, error.kind()) {
            let text = amqp.get_message();
            match amqp.kind() {
                AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) => {
                    return publisher.topology_failure(format!(
                        "exchange `{exchange}` does not exist in vhost `{vhost}` (routing key `{routing_key}`; the broker closed the channel: {text})"
                    ))
                }
                AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => {
                    return SinkFailure::permanent(format!(
                        "user `{}` may not publish to exchange `{exchange}` in vhost `{vhost}` (routing key `{routing_key}`; {text})",
                        self.settings.uri.authority.userinfo.username
                    ))
                }
                AMQPErrorKind::Soft(
                    AMQPSoftError::PRECONDITIONFAILED | AMQPSoftError::CONTENTTOOLARGE,
                ) => {
                    return SinkFailure::permanent(format!(
                        "the broker refused the message to exchange `{exchange}` with routing key `{routing_key}`: {text}"
                    ))
                }
                _ => {}
            }
        }
        SinkFailure::retryable(format!(
            "publish to exchange `{exchange}` at {} failed: {error}",
            self.broker()
        ))
    }

    fn unroutable(&self, publisher: &Publisher, returned: &BasicReturnMessage) -> SinkFailure {
        publisher.topology_failure(format!(
            "unroutable: no queue is bound to exchange `{}` for routing key `{}` ({} {}; the broker returned the message)",
            self.settings.exchange,
            returned.delivery.routing_key,
            returned.reply_code,
            returned.reply_text
        ))
    }

    async fn send_batch(&self, events: &[CloudEvent]) -> SendResult {
        let mut slot = self.publisher.lock().await;
        let mut done = 0;
        while done < events.len() {
            let publisher = match self.ready(&mut slot).await {
                Ok(p) => p,
                Err(f) => return SendResult::failed(done, f),
            };
            // A wave: the longest run of events with distinct partition keys.
            let mut keys = HashSet::new();
            let end = events[done..]
                .iter()
                .take(MAX_IN_FLIGHT)
                .take_while(|e| keys.insert(e.partitionkey.as_deref()))
                .count()
                + done;
            let wave = &events[done..end];
            let (outcomes, broken) = self.publish_wave(publisher, wave).await;
            let failed = outcomes
                .iter()
                .position(|o| !matches!(o, Outcome::Confirmed));
            if broken {
                // A channel the broker closed is replaced on the same connection by the next
                // attempt; anything else (a lost connection, confirms still outstanding after
                // `timeout`) starts afresh with a new connection.
                let channel_closed = slot.as_ref().is_some_and(|p| {
                    p.connection.status().connected() && !p.channel.status().connected()
                });
                if !channel_closed {
                    *slot = None;
                }
            }
            let Some(first) = failed else {
                done = end;
                continue;
            };
            // Later events of the wave (other partition keys) the broker confirmed: not sent
            // again by the retry.
            let confirmed: Vec<String> = wave
                .iter()
                .zip(&outcomes)
                .skip(first + 1)
                .filter(|(_, o)| matches!(o, Outcome::Confirmed))
                .map(|(e, _)| e.id.clone())
                .collect();
            if !confirmed.is_empty() {
                let mut remembered = self
                    .confirmed_past_failure
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                if remembered.len() > MAX_REMEMBERED {
                    remembered.clear();
                }
                remembered.extend(confirmed);
            }
            let failure = match outcomes.into_iter().nth(first) {
                Some(Outcome::Failed(f)) => f,
                _ => SinkFailure::retryable("not published: an earlier event of the batch failed"),
            };
            return SendResult::failed(done + first, failure);
        }
        SendResult::all(events.len())
    }

    /// Publishes `wave` (distinct partition keys) and waits for every confirm, all within
    /// `timeout`. Also says whether the channel must not be used again (it failed or has
    /// confirms still outstanding).
    async fn publish_wave(
        &self,
        publisher: &Publisher,
        wave: &[CloudEvent],
    ) -> (Vec<Outcome>, bool) {
        let mut outcomes: Vec<Outcome> = wave.iter().map(|_| Outcome::NotSent).collect();
        {
            let mut remembered = self
                .confirmed_past_failure
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if !remembered.is_empty() {
                for (event, outcome) in wave.iter().zip(outcomes.iter_mut()) {
                    if remembered.remove(&event.id) {
                        *outcome = Outcome::Confirmed;
                    }
                }
            }
        }
        let deadline = Instant::now() + self.settings.timeout;
        let no_confirm = || {
            SinkFailure::retryable(format!(
                "no confirm from RabbitMQ at {} within {:?}",
                self.broker(),
                self.settings.timeout
            ))
        };
        let exchange = match ShortString::try_new(self.settings.exchange.as_str()) {
            Ok(e) => e,
            Err(e) => {
                // Checked at config load.
                outcomes[0] = Outcome::Failed(SinkFailure::retryable(format!("exchange: {e}")));
                return (outcomes, false);
            }
        };
        let mandatory = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let mut broken = false;
        let mut confirms = Vec::with_capacity(wave.len());
        for (i, event) in wave.iter().enumerate() {
            if matches!(outcomes[i], Outcome::Confirmed) {
                continue;
            }
            let routing_key = match self.routing_key(event) {
                Ok(k) => k,
                Err(f) => {
                    outcomes[i] = Outcome::Failed(f);
                    break;
                }
            };
            let payload = event.data_bytes().unwrap_or_default();
            let publish = publisher.channel.basic_publish(
                exchange.clone(),
                routing_key.clone(),
                mandatory,
                &payload,
                properties(event),
            );
            match tokio::time::timeout_at(deadline, publish).await {
                Ok(Ok(confirm)) => confirms.push((i, routing_key, confirm)),
                Ok(Err(e)) => {
                    outcomes[i] =
                        Outcome::Failed(self.classify(publisher, routing_key.as_str(), &e));
                    broken = true;
                    break;
                }
                Err(_) => {
                    outcomes[i] = Outcome::Failed(no_confirm());
                    broken = true;
                    break;
                }
            }
        }
        // Returned messages come with a confirm, not necessarily their own (a multiple ack
        // covers several): they are matched to events by message id.
        let mut returned: Vec<(usize, BasicReturnMessage)> = Vec::new();
        for (i, routing_key, confirm) in confirms {
            outcomes[i] = match tokio::time::timeout_at(deadline, confirm).await {
                Ok(Ok(Confirmation::Ack(message))) => {
                    returned.extend(message.map(|m| (i, m)));
                    Outcome::Confirmed
                }
                Ok(Ok(Confirmation::Nack(message))) => {
                    returned.extend(message.map(|m| (i, m)));
                    Outcome::Failed(SinkFailure::retryable(format!(
                        "RabbitMQ refused (nack) the message to exchange `{}` with routing key `{routing_key}`: a queue is full (x-overflow: reject-publish) or unavailable",
                        self.settings.exchange
                    )))
                }
                Ok(Ok(Confirmation::NotRequested)) => {
                    broken = true;
                    Outcome::Failed(SinkFailure::retryable("the channel is not in confirm mode"))
                }
                Ok(Err(e)) => {
                    broken = true;
                    Outcome::Failed(self.classify(publisher, routing_key.as_str(), &e))
                }
                Err(_) => {
                    broken = true;
                    Outcome::Failed(no_confirm())
                }
            };
        }
        if !returned.is_empty() {
            let by_id: HashMap<&str, usize> = wave
                .iter()
                .enumerate()
                .map(|(i, e)| (e.id.as_str(), i))
                .collect();
            for (paired, message) in returned {
                let i = message
                    .delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .and_then(|id| by_id.get(id.as_str()).copied())
                    .unwrap_or(paired);
                outcomes[i] = Outcome::Failed(self.unroutable(publisher, &message));
            }
        }
        (outcomes, broken)
    }
}

/// The message properties of the CloudEvents AMQP binding: a `cloudEvents_NAME` header per
/// attribute, `content-type`, `message_id` = the event id, persistent delivery.
fn properties(event: &CloudEvent) -> BasicProperties {
    let mut headers = FieldTable::default();
    for (name, value) in event.attributes() {
        headers.insert(
            ShortString::from(format!("{HEADER_PREFIX}{name}")),
            AMQPValue::LongString(LongString::from(value)),
        );
    }
    let mut properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(headers);
    // Short strings: an id or content type over 255 bytes stays in the headers only.
    if let Ok(id) = ShortString::try_new(event.id.as_str()) {
        properties = properties.with_message_id(id);
    }
    if let Some(ct) = event
        .datacontenttype
        .as_deref()
        .and_then(|ct| ShortString::try_new(ct).ok())
    {
        properties = properties.with_content_type(ct);
    }
    properties
}

impl Sink for AmqpSink {
    fn send<'a>(&'a self, events: &'a [CloudEvent]) -> BoxFuture<'a, SendResult> {
        Box::pin(self.inner.send_batch(events))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::uri::AMQPScheme;

    #[test]
    fn urls_are_checked_and_redacted() {
        let uri = parse_url("amqp://ficus:s3cret@127.0.0.1:5672/%2f", None).expect("valid");
        assert_eq!(uri.authority.host, "127.0.0.1", "an IP address stays one");
        assert_eq!(uri.authority.port, 5672);
        assert_eq!(uri.vhost, "/");
        assert_eq!(uri.authority.userinfo.username, "ficus");
        assert_eq!(uri.authority.userinfo.password, "s3cret");
        assert_eq!(broker(&uri), "amqp://127.0.0.1:5672/%2F");

        let uri = parse_url("amqps://u:p@[::1]/shop", Some("other")).expect("valid");
        assert_eq!(uri.scheme, AMQPScheme::AMQPS);
        assert_eq!(uri.authority.host, "::1");
        assert_eq!(uri.authority.port, 5671);
        assert_eq!(uri.vhost, "shop");
        assert_eq!(
            uri.authority.userinfo.password, "other",
            "password overrides"
        );
        assert_eq!(broker(&uri), "amqps://[::1]:5671/shop");

        let uri = parse_url("amqp://rabbit.internal", None).expect("valid");
        assert_eq!(uri.authority.host, "rabbit.internal");
        assert_eq!(uri.vhost, "/", "no path: the default vhost");

        let err = parse_url("http://u:secret@127.0.0.1", None).expect_err("scheme");
        assert!(!err.contains("secret"), "{err}");
        let err = parse_url("amqp://u:secret@127.0.0.1:5672/", None).expect_err("empty vhost");
        assert!(err.contains("/%2f") && !err.contains("secret"), "{err}");
        let err = parse_url("amqp://u:secret@127.0.0.1:99999/%2f", None).expect_err("port");
        assert!(!err.contains("secret"), "{err}");
        assert!(!format!(
            "{:?}",
            AmqpSinkSettings {
                name: "s".into(),
                uri: parse_url("amqp://u:secret@h/%2f", None).expect("valid"),
                exchange: "shop".into(),
                routing_key: AttributeTemplate::parse("{type}").expect("template"),
                tls: None,
                timeout: Duration::from_secs(1),
            }
        )
        .contains("secret"));
    }

    #[test]
    fn exchanges_and_routing_keys_fit_short_strings() {
        assert!(valid_exchange("shop").is_ok());
        assert!(valid_exchange("").is_ok(), "the default exchange");
        assert!(valid_exchange(&"x".repeat(256)).is_err());
        assert!(valid_exchange("a\nb").is_err());
        let t = |s: &str| AttributeTemplate::parse(s).expect("template");
        assert!(check_routing_key(&t("shop.{type}")).is_ok());
        assert!(check_routing_key(&t(&format!("{}{{type}}", "x".repeat(256)))).is_err());
    }

    #[test]
    fn properties_carry_every_attribute_the_id_and_persistence() {
        let event = CloudEvent {
            subject: Some("café".into()),
            ficusupstream: None,
            data: None,
            ..crate::events::sample_event()
        };
        let p = properties(&event);
        assert_eq!(p.delivery_mode(), &Some(2));
        assert_eq!(p.message_id().as_ref().map(|s| s.as_str()), Some("0190-a"));
        assert_eq!(
            p.content_type().as_ref().map(|s| s.as_str()),
            Some("application/json")
        );
        let headers = p.headers().as_ref().expect("headers");
        let get = |n: &str| match headers.inner().get(n) {
            Some(AMQPValue::LongString(s)) => Some(s.to_string()),
            _ => None,
        };
        assert_eq!(get("cloudEvents_id").as_deref(), Some("0190-a"));
        assert_eq!(get("cloudEvents_specversion").as_deref(), Some("1.0"));
        assert_eq!(
            get("cloudEvents_type").as_deref(),
            Some("shop.order.created")
        );
        assert_eq!(
            get("cloudEvents_subject").as_deref(),
            Some("café"),
            "not encoded"
        );
        assert_eq!(get("cloudEvents_partitionkey").as_deref(), Some("42"));
        assert_eq!(get("cloudEvents_sequence"), None);
        assert_eq!(
            get("cloudEvents_datacontenttype"),
            None,
            "content-type instead"
        );

        let long = CloudEvent {
            id: "i".repeat(300),
            ..event
        };
        let p = properties(&long);
        assert_eq!(p.message_id(), &None, "too long for message_id");
        assert!(p
            .headers()
            .as_ref()
            .is_some_and(|h| h.inner().contains_key("cloudEvents_id")));
    }
}
