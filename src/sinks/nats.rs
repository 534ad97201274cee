//! `type: nats`: the CloudEvents NATS binding in binary mode. Each event is one message on the
//! subject rendered from the `subject` template; every attribute is a `ce-NAME` header (values
//! percent-encoded as in the HTTP binding), `content-type` carries `datacontenttype` and the
//! body is the data bytes. `Nats-Msg-Id` is the event id, so a JetStream stream drops a resend
//! whose first ack was lost (within the stream's duplicate window, 2 minutes by default).
//!
//! With `jetstream: true` (the default) an event is delivered when the stream acknowledged it.
//! Events of one batch are published without waiting for each ack, but never two events with
//! the same partition key at once: a connection lost mid-batch can then reorder events of
//! different keys only, and the resend of the unacknowledged rest is deduplicated by the
//! stream. With `jetstream: false` (core NATS) a batch is published and flushed: the server
//! received it, which says nothing about subscribers.
//!
//! The connection is made lazily: at start-up in the background (and, with `create_stream`,
//! the stream is created if missing), else by the first delivery attempt, so ficus starts
//! while the server is down. Once connected, the client reconnects by itself; while it is
//! disconnected nothing is queued, every attempt fails fast and is retried by the dispatcher.
//!
//! Failures: no connection, timeouts, a stream that is not answering → retried. A message
//! larger than the server's `max_payload` (or the stream's maximum message size), a subject
//! that renders invalid, and a subject no stream takes (confirmed with the JetStream API;
//! with `create_stream` a missing stream is created again first) → dead letter.

use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::context::{
    GetStreamByNameErrorKind, GetStreamErrorKind, PublishAckFuture, PublishError, PublishErrorKind,
};
use async_nats::jetstream::{self, stream, ErrorCode};
use async_nats::{ConnectOptions, HeaderMap, ServerAddr};

use super::template::AttributeTemplate;
use super::{redacted, BoxFuture, SendResult, Sink, SinkFailure};
use crate::config::UpstreamTls;
use crate::events::{percent_encode_header, CloudEvent};
use crate::proxy::client::{tls_config, ClientError};

/// JetStream's "message size exceeds maximum allowed" (a stream's `max_msg_size`).
const JS_MESSAGE_TOO_LARGE: ErrorCode = ErrorCode(10054);

/// Most events published before their acks are awaited.
const MAX_IN_FLIGHT: usize = 256;

#[derive(Debug, Clone, PartialEq)]
pub struct NatsSinkSettings {
    pub name: String,
    /// One or more server URLs (`nats://`, `tls://`), tried in turn.
    pub servers: Vec<String>,
    pub subject: AttributeTemplate,
    pub jetstream: bool,
    /// Create this stream (subjects derived from `subject`) when it is missing.
    pub create_stream: Option<String>,
    pub auth: NatsAuth,
    /// `None`: TLS only when a URL says `tls://` or the server requires it, system roots.
    pub tls: Option<UpstreamTls>,
    pub timeout: Duration,
}

#[derive(Clone, Default, PartialEq)]
pub enum NatsAuth {
    #[default]
    None,
    Token(String),
    UserPassword {
        user: String,
        password: String,
    },
    /// A `.creds` file (user JWT and NKey seed), read at each connection.
    Creds(PathBuf),
}

impl fmt::Debug for NatsAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NatsAuth::None => f.write_str("None"),
            NatsAuth::Token(_) => f.write_str("Token(<redacted>)"),
            NatsAuth::UserPassword { user, .. } => write!(f, "UserPassword({user}, <redacted>)"),
            NatsAuth::Creds(path) => write!(f, "Creds({})", path.display()),
        }
    }
}

/// The check of a server URL at config load.
pub fn parse_server(url: &str) -> Result<ServerAddr, String> {
    url.parse::<ServerAddr>().map_err(|e| {
        format!(
            "`{}`: {e} (expected nats://HOST:PORT or tls://HOST:PORT)",
            redacted(url)
        )
    })
}

/// A NATS subject one may publish to: dot-separated non-empty tokens, no whitespace, no
/// wildcard token.
pub fn valid_subject(subject: &str) -> bool {
    !subject.is_empty()
        && subject.split('.').all(|token| {
            !token.is_empty()
                && token != "*"
                && token != ">"
                && !token.chars().any(|c| c.is_whitespace() || c.is_control())
        })
}

/// The stream subjects that cover every subject `template` can render: the template itself
/// when it is fixed, else its leading fixed tokens followed by `>` (`shop.{type}` → `shop.>`).
pub fn stream_subjects(template: &AttributeTemplate) -> Result<Vec<String>, String> {
    if let Some(fixed) = template.as_literal() {
        return Ok(vec![fixed.to_string()]);
    }
    let prefix = template.literal_prefix();
    match prefix.rfind('.') {
        Some(dot) if dot > 0 => Ok(vec![format!("{}>", &prefix[..=dot])]),
        _ => Err(format!(
            "`create_stream` needs a subject that starts with a fixed token, such as `shop.{{type}}` (found `{template}`)"
        )),
    }
}

/// Stream names: letters, digits, `-` and `_` (JetStream forbids `.`, `*`, `>` and path
/// separators; ficus is stricter).
pub fn valid_stream_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

#[derive(Clone)]
struct Connection {
    client: async_nats::Client,
    js: jetstream::Context,
}

struct Inner {
    settings: NatsSinkSettings,
    tls: Option<async_nats::rustls::ClientConfig>,
    connection: tokio::sync::Mutex<Option<Connection>>,
    stream_ready: AtomicBool,
    stream_lock: tokio::sync::Mutex<()>,
}

pub struct NatsSink {
    inner: Arc<Inner>,
}

impl NatsSink {
    /// Reads the TLS files now (a bad file fails start-up, as for upstreams); connects later.
    pub fn new(settings: NatsSinkSettings) -> Result<NatsSink, ClientError> {
        let tls = match &settings.tls {
            Some(files) => Some(tls_config(&settings.name, true, files)?),
            None => None,
        };
        let inner = Arc::new(Inner {
            settings,
            tls,
            connection: tokio::sync::Mutex::new(None),
            stream_ready: AtomicBool::new(false),
            stream_lock: tokio::sync::Mutex::new(()),
        });
        // Connect (and create the stream) at start-up when running on a runtime; if the
        // server is down, the first delivery attempt tries again.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let warm = inner.clone();
            runtime.spawn(async move {
                let ready = match warm.connection().await {
                    Ok(conn) => warm.ensure_stream(&conn).await.map(|_| ()),
                    Err(failure) => Err(failure),
                };
                if let Err(failure) = ready {
                    tracing::warn!(sink = %warm.settings.name, reason = %failure.message, "NATS not ready at start-up; events wait in the outbox and delivery retries");
                }
            });
        }
        Ok(NatsSink { inner })
    }
}

impl Inner {
    fn servers(&self) -> String {
        // Without credentials: `host:port` of each server.
        self.settings
            .servers
            .iter()
            .filter_map(|s| s.parse::<ServerAddr>().ok())
            .map(|a| format!("{}:{}", a.host(), a.port()))
            .collect::<Vec<_>>()
            .join(",")
    }

    async fn options(&self) -> Result<ConnectOptions, SinkFailure> {
        let name = self.settings.name.clone();
        let mut options = match &self.settings.auth {
            NatsAuth::None => ConnectOptions::new(),
            NatsAuth::Token(token) => ConnectOptions::with_token(token.clone()),
            NatsAuth::UserPassword { user, password } => {
                ConnectOptions::with_user_and_password(user.clone(), password.clone())
            }
            NatsAuth::Creds(path) => ConnectOptions::with_credentials_file(path.clone())
                .await
                .map_err(|e| {
                    SinkFailure::retryable(format!(
                        "cannot read NATS creds file `{}`: {e}",
                        path.display()
                    ))
                })?,
        };
        if let Some(tls) = &self.tls {
            options = options.tls_client_config(tls.clone()).require_tls(true);
        }
        Ok(options
            .name(format!("ficus/{name}"))
            .connection_timeout(self.settings.timeout)
            .request_timeout(Some(self.settings.timeout))
            .event_callback(move |event| {
                let name = name.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            tracing::info!(sink = %name, "NATS connection (re)established")
                        }
                        async_nats::Event::Disconnected => {
                            tracing::warn!(sink = %name, "NATS connection lost; reconnecting")
                        }
                        other => tracing::warn!(sink = %name, event = %other, "NATS client event"),
                    }
                }
            }))
    }

    /// The client, connecting first if there is none yet. After one success the client
    /// reconnects by itself.
    async fn connection(&self) -> Result<Connection, SinkFailure> {
        let mut slot = self.connection.lock().await;
        if let Some(conn) = slot.as_ref() {
            return Ok(conn.clone());
        }
        let options = self.options().await?;
        let servers = self.servers();
        let connect = options.connect(self.settings.servers.as_slice());
        let client = match tokio::time::timeout(self.settings.timeout, connect).await {
            Err(_) => {
                return Err(SinkFailure::retryable(format!(
                    "no connection to NATS at {servers} within {:?}",
                    self.settings.timeout
                )))
            }
            Ok(Err(e)) => {
                return Err(SinkFailure::retryable(format!(
                    "cannot connect to NATS at {servers}: {e}"
                )))
            }
            Ok(Ok(client)) => client,
        };
        let js = jetstream::ContextBuilder::new()
            .timeout(self.settings.timeout)
            .build(client.clone());
        tracing::info!(sink = %self.settings.name, servers = %servers, "connected to NATS");
        let conn = Connection { client, js };
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// With `create_stream`: makes sure the stream exists. `Ok(true)` when it was created now.
    async fn ensure_stream(&self, conn: &Connection) -> Result<bool, SinkFailure> {
        let Some(name) = &self.settings.create_stream else {
            return Ok(false);
        };
        if self.stream_ready.load(Ordering::Acquire) {
            return Ok(false);
        }
        let _one_at_a_time = self.stream_lock.lock().await;
        if self.stream_ready.load(Ordering::Acquire) {
            return Ok(false);
        }
        let created = match conn.js.get_stream(name).await {
            Ok(_) => false,
            Err(e) => match e.kind() {
                GetStreamErrorKind::JetStream(j)
                    if j.error_code() == ErrorCode::STREAM_NOT_FOUND =>
                {
                    // Checked at config load: a template with a fixed first token.
                    let subjects =
                        stream_subjects(&self.settings.subject).map_err(SinkFailure::permanent)?;
                    let config = stream::Config {
                        name: name.clone(),
                        subjects: subjects.clone(),
                        storage: stream::StorageType::File,
                        ..Default::default()
                    };
                    conn.js.create_stream(config).await.map_err(|e| {
                        SinkFailure::retryable(format!("cannot create stream `{name}`: {e}"))
                    })?;
                    tracing::info!(sink = %self.settings.name, stream = %name, subjects = ?subjects, "created JetStream stream");
                    true
                }
                _ => {
                    return Err(SinkFailure::retryable(format!(
                        "cannot look up stream `{name}`: {e}"
                    )))
                }
            },
        };
        self.stream_ready.store(true, Ordering::Release);
        Ok(created)
    }

    /// Either the rendered, valid subject or a permanent failure saying why not.
    fn subject(&self, event: &CloudEvent) -> Result<String, SinkFailure> {
        let subject = self.settings.subject.render(event);
        if valid_subject(&subject) {
            Ok(subject)
        } else {
            Err(SinkFailure::permanent(format!(
                "subject `{subject}` (from `{}`) is not a valid NATS subject: an attribute is empty or has a space or wildcard",
                self.settings.subject
            )))
        }
    }

    fn connected(&self, conn: &Connection) -> Result<(), SinkFailure> {
        match conn.client.connection_state() {
            State::Connected => Ok(()),
            state => Err(SinkFailure::retryable(format!(
                "not connected to NATS at {} ({state:?})",
                self.servers()
            ))),
        }
    }

    async fn send_jetstream(&self, conn: &Connection, events: &[CloudEvent]) -> SendResult {
        if let Err(f) = self.ensure_stream(conn).await {
            return SendResult::failed(0, f);
        }
        let mut done = 0;
        while done < events.len() {
            // A wave: the longest run of events with distinct partition keys.
            let mut keys = HashSet::new();
            let end = events[done..]
                .iter()
                .take(MAX_IN_FLIGHT)
                .take_while(|e| keys.insert(e.partitionkey.as_deref()))
                .count()
                + done;
            let mut acks: Vec<(String, PublishAckFuture)> = Vec::with_capacity(end - done);
            let mut refused = None;
            for (i, event) in events.iter().enumerate().take(end).skip(done) {
                let published = match self.subject(event) {
                    Ok(subject) => conn
                        .js
                        .publish_with_headers(
                            subject.clone(),
                            headers(event),
                            event.data_bytes().unwrap_or_default(),
                        )
                        .await
                        .map(|ack| (subject.clone(), ack))
                        .map_err(|e| (subject, e)),
                    Err(f) => {
                        refused = Some((i, f));
                        break;
                    }
                };
                match published {
                    Ok(ack) => acks.push(ack),
                    Err((subject, e)) => {
                        refused = Some((i, self.classify(conn, &subject, event, e).await));
                        break;
                    }
                }
            }
            // Acks in order: the delivered prefix ends at the first one missing.
            for (k, (subject, ack)) in acks.into_iter().enumerate() {
                if let Err(e) = ack.await {
                    let event = &events[done + k];
                    return SendResult::failed(
                        done + k,
                        self.classify(conn, &subject, event, e).await,
                    );
                }
            }
            if let Some((i, failure)) = refused {
                return SendResult::failed(i, failure);
            }
            done = end;
        }
        SendResult::all(events.len())
    }

    async fn classify(
        &self,
        conn: &Connection,
        subject: &str,
        event: &CloudEvent,
        error: PublishError,
    ) -> SinkFailure {
        match error.kind() {
            PublishErrorKind::MaxPayloadExceeded => SinkFailure::permanent(format!(
                "event {} is larger than the NATS server accepts (max_payload): {error}",
                event.id
            )),
            PublishErrorKind::StreamNotFound => self.no_stream(conn, subject).await,
            PublishErrorKind::Other if too_large_for_stream(&error) => {
                SinkFailure::permanent(format!(
                    "event {} is larger than the stream accepts: {error}",
                    event.id
                ))
            }
            _ => {
                SinkFailure::retryable(format!("JetStream publish to `{subject}` failed: {error}"))
            }
        }
    }

    /// Nobody answered a publish: confirm with the JetStream API that no stream takes the
    /// subject (JetStream itself may be starting up) and, with `create_stream`, create it.
    async fn no_stream(&self, conn: &Connection, subject: &str) -> SinkFailure {
        match conn.js.stream_by_subject(subject).await {
            Ok(stream) => SinkFailure::retryable(format!(
                "stream `{stream}` takes `{subject}` but did not answer; retrying"
            )),
            Err(e) if e.kind() == GetStreamByNameErrorKind::NotFound => {
                if self.settings.create_stream.is_some() {
                    self.stream_ready.store(false, Ordering::Release);
                    match self.ensure_stream(conn).await {
                        Ok(true) => {
                            return SinkFailure::retryable(
                                "the stream was missing and has been created again",
                            )
                        }
                        Ok(false) => {}
                        Err(f) => return f,
                    }
                }
                SinkFailure::permanent(format!("no JetStream stream takes subject `{subject}`"))
            }
            Err(e) => SinkFailure::retryable(format!("no JetStream answer for `{subject}`: {e}")),
        }
    }

    async fn send_core(&self, conn: &Connection, events: &[CloudEvent]) -> SendResult {
        let mut refused = None;
        for (i, event) in events.iter().enumerate() {
            let published = match self.subject(event) {
                Ok(subject) => {
                    conn.client
                        .publish_with_headers(
                            subject,
                            headers(event),
                            event.data_bytes().unwrap_or_default(),
                        )
                        .await
                }
                Err(f) => {
                    refused = Some((i, f));
                    break;
                }
            };
            if let Err(e) = published {
                let failure = match e.kind() {
                    async_nats::client::PublishErrorKind::MaxPayloadExceeded => {
                        SinkFailure::permanent(format!(
                            "event {} is larger than the NATS server accepts (max_payload): {e}",
                            event.id
                        ))
                    }
                    async_nats::client::PublishErrorKind::InvalidSubject => {
                        SinkFailure::permanent(format!("invalid subject: {e}"))
                    }
                    _ => SinkFailure::retryable(format!("NATS publish failed: {e}")),
                };
                refused = Some((i, failure));
                break;
            }
        }
        // The server has what was published once a flush (PING/PONG) comes back.
        let flushed = tokio::time::timeout(self.settings.timeout, conn.client.flush()).await;
        match flushed {
            Ok(Ok(())) => match refused {
                Some((i, failure)) => SendResult::failed(i, failure),
                None => SendResult::all(events.len()),
            },
            Ok(Err(e)) => {
                SendResult::failed(0, SinkFailure::retryable(format!("NATS flush failed: {e}")))
            }
            Err(_) => SendResult::failed(
                0,
                SinkFailure::retryable(format!(
                    "NATS flush not answered within {:?}",
                    self.settings.timeout
                )),
            ),
        }
    }
}

fn too_large_for_stream(error: &PublishError) -> bool {
    std::error::Error::source(error)
        .and_then(|s| s.downcast_ref::<jetstream::Error>())
        .is_some_and(|j| j.error_code() == JS_MESSAGE_TOO_LARGE)
}

/// Binary-mode headers: `ce-NAME` per attribute, `content-type`, and `Nats-Msg-Id`.
fn headers(event: &CloudEvent) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in event.attributes() {
        headers.insert(format!("ce-{name}"), percent_encode_header(&value));
    }
    if let Some(ct) = event
        .datacontenttype
        .as_deref()
        .filter(|ct| !ct.chars().any(char::is_control))
    {
        headers.insert("content-type", ct);
    }
    headers.insert(async_nats::header::NATS_MESSAGE_ID, event.id.as_str());
    headers
}

impl Sink for NatsSink {
    fn send<'a>(&'a self, events: &'a [CloudEvent]) -> BoxFuture<'a, SendResult> {
        Box::pin(async move {
            let inner = &self.inner;
            let conn = match inner.connection().await {
                Ok(conn) => conn,
                Err(f) => return SendResult::failed(0, f),
            };
            // While disconnected the client would queue publishes for later: fail fast
            // instead, and let the dispatcher's backoff pace the retries.
            if let Err(f) = inner.connected(&conn) {
                return SendResult::failed(0, f);
            }
            if inner.settings.jetstream {
                inner.send_jetstream(&conn, events).await
            } else {
                inner.send_core(&conn, events).await
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_subjects_cover_the_template() {
        let t = |s: &str| AttributeTemplate::parse(s).expect("template");
        assert_eq!(
            stream_subjects(&t("shop.{type}")),
            Ok(vec!["shop.>".to_string()])
        );
        assert_eq!(
            stream_subjects(&t("shop.orders.v{type}.x")),
            Ok(vec!["shop.orders.>".to_string()])
        );
        assert_eq!(
            stream_subjects(&t("shop.events")),
            Ok(vec!["shop.events".to_string()])
        );
        assert!(stream_subjects(&t("{type}")).is_err());
        assert!(stream_subjects(&t("shop{type}")).is_err());
    }

    #[test]
    fn subjects_and_stream_names() {
        assert!(valid_subject("shop.shop.order.created"));
        assert!(!valid_subject("shop."));
        assert!(!valid_subject("shop..x"));
        assert!(!valid_subject("shop.order 42"));
        assert!(!valid_subject("shop.>"));
        assert!(!valid_subject(""));
        assert!(valid_stream_name("SHOP_events-1"));
        assert!(!valid_stream_name("shop.events"));
        assert!(!valid_stream_name(""));
    }

    #[test]
    fn headers_carry_every_attribute_and_the_message_id() {
        let event = CloudEvent {
            subject: Some("café".into()),
            ficusupstream: None,
            data: None,
            ..crate::events::sample_event()
        };
        let h = headers(&event);
        let get = |n: &str| h.get(n).map(|v| v.as_str().to_string());
        assert_eq!(get("ce-id").as_deref(), Some("0190-a"));
        assert_eq!(get("ce-type").as_deref(), Some("shop.order.created"));
        assert_eq!(get("ce-subject").as_deref(), Some("caf%C3%A9"));
        assert_eq!(get("ce-partitionkey").as_deref(), Some("42"));
        assert_eq!(get("content-type").as_deref(), Some("application/json"));
        assert_eq!(get("Nats-Msg-Id").as_deref(), Some("0190-a"));
        assert_eq!(get("ce-sequence"), None);
    }
}
