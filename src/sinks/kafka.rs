//! `type: kafka`: Apache Kafka (and Kafka-protocol brokers) over `rskafka`, a pure-Rust client.
//! Each event is one record in the CloudEvents Kafka binding's binary mode: a `ce_NAME` header
//! per attribute (the value as UTF-8 text), `content-type` from `datacontenttype`, the data
//! bytes as the value (empty, never null, when the event has no data: a null value is a
//! tombstone to a compacted topic), and the partition key as the record key. The record
//! timestamp is the event's `time`.
//!
//! Partitioning is Kafka's default partitioner for keyed records: murmur2 of the key, made
//! positive, modulo the topic's partition count (read from metadata, cached for 5 minutes and
//! read again after a partition or leader error), so consumers see the partition a Java
//! producer would have chosen, and one key always lands in one partition. Events without a
//! partition key go to partition 0 without a key, so that they too keep their order.
//!
//! An event is delivered when the partition leader acknowledged its produce request with
//! `acks=all` (every in-sync replica has it). A batch is grouped by (topic, partition); each
//! group is sent as one record batch per produce request (split when it is large), the groups
//! in parallel, the requests of one group one after the other. A record batch is appended
//! whole or not at all, so order per key holds through failures: after a failure the
//! dispatcher resends from the first event not acknowledged, and events of other partitions
//! that were acknowledged after it are remembered and not produced a second time. Kafka does
//! not deduplicate (rskafka has no idempotent producer): a produce whose acknowledgement was
//! lost is sent again, so consumers deduplicate by `ce_id`.
//!
//! The client connects lazily: at start-up in the background, else by the next delivery
//! attempt, so ficus starts while the cluster is down. A failure that may be the connection's
//! (broker unreachable or restarted, a timeout, an unreadable answer) drops the client; the
//! next attempt bootstraps again from `brokers`.
//!
//! Failures: no connection, timeouts, leader changes, not enough replicas, throttling → retried.
//! A topic that does not exist (ficus creates none; the cluster's metadata is asked again
//! before deciding), a rendered topic that is not a valid name, a record over the topic's
//! `max.message.bytes`, a record the broker finds invalid and a topic this user may not write
//! → dead letter, with the topic in the reason.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures_util::future::join_all;
use rskafka::chrono::{DateTime, TimeZone, Utc};
use rskafka::client::error::{Error as KafkaError, ProtocolError};
use rskafka::client::partition::{Compression, PartitionClient, UnknownTopicHandling};
use rskafka::client::{Client, ClientBuilder, Credentials, SaslConfig};
use rskafka::record::Record;
use rskafka::BackoffConfig;

use super::template::AttributeTemplate;
use super::{BoxFuture, SendResult, Sink, SinkFailure};
use crate::config::UpstreamTls;
use crate::events::CloudEvent;
use crate::proxy::client::{tls_config, ClientError};

/// The prefix of the CloudEvents Kafka binding's headers.
pub const HEADER_PREFIX: &str = "ce_";

/// Kafka's limit on topic names.
pub const MAX_TOPIC_LEN: usize = 249;

/// How long a topic's partition count is trusted (Kafka producers' `metadata.max.age.ms`).
const METADATA_MAX_AGE: Duration = Duration::from_secs(300);

/// Most record bytes in one produce request. Kafka's default `max.message.bytes` (a whole
/// record batch) is about 1 MiB; a larger group is split. A single record over it goes alone.
const MAX_REQUEST_BYTES: usize = 900 * 1024;

/// What a record costs in a batch beyond its key, value and headers (lengths, deltas).
const RECORD_OVERHEAD: usize = 32;

/// A bound on the ids remembered as delivered past a failure (normally at most one batch).
const MAX_REMEMBERED: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaslMechanism {
    Plain,
    ScramSha256,
    ScramSha512,
}

impl SaslMechanism {
    pub fn parse(s: &str) -> Result<SaslMechanism, String> {
        match s.to_ascii_lowercase().as_str() {
            "plain" => Ok(SaslMechanism::Plain),
            "scram-sha-256" => Ok(SaslMechanism::ScramSha256),
            "scram-sha-512" => Ok(SaslMechanism::ScramSha512),
            _ => Err(format!(
                "expected plain, scram-sha-256 or scram-sha-512, found `{s}`"
            )),
        }
    }
}

/// SASL authentication (over TLS unless the network is trusted: PLAIN sends the password).
#[derive(Clone, PartialEq, Eq)]
pub struct KafkaSasl {
    pub mechanism: SaslMechanism,
    pub user: String,
    pub password: String,
}

impl fmt::Debug for KafkaSasl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaSasl")
            .field("mechanism", &self.mechanism)
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct KafkaSinkSettings {
    pub name: String,
    /// Bootstrap brokers, `host:port` each; the cluster's metadata names the others.
    pub brokers: Vec<String>,
    pub topic: AttributeTemplate,
    /// `None`: plaintext. `Some`: TLS with the system roots, or `ca` instead, and a client
    /// certificate when `cert` and `key` are set.
    pub tls: Option<UpstreamTls>,
    pub sasl: Option<KafkaSasl>,
    /// Connecting, reading metadata, and each produce request.
    pub timeout: Duration,
}

/// The check of a bootstrap broker address at config load: `host:port`, no scheme.
pub fn parse_broker(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s.contains("://") {
        return Err(format!(
            "expected HOST:PORT without a scheme, found `{s}` (TLS is `tls:`, not a URL scheme)"
        ));
    }
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(format!("expected HOST:PORT, found `{s}`"));
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if bare.is_empty() || bare.chars().any(|c| c.is_whitespace() || c == '/') {
        return Err(format!("expected HOST:PORT, found `{s}`"));
    }
    if bare.contains(':') && !host.starts_with('[') {
        return Err(format!(
            "an IPv6 address goes in brackets, as in `[::1]:9092`, found `{s}`"
        ));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(s.to_string()),
        _ => Err(format!("`{port}` is not a port, in `{s}`")),
    }
}

fn topic_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-'
}

/// A topic name Kafka accepts: 1 to 249 of `[a-zA-Z0-9._-]`, not `.` or `..`.
pub fn valid_topic(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_TOPIC_LEN
        && name != "."
        && name != ".."
        && name.chars().all(topic_char)
}

/// The check of a `topic` template at config load: its fixed text can be part of a topic name.
pub fn check_topic(template: &AttributeTemplate) -> Result<(), String> {
    if let Some(fixed) = template.as_literal() {
        return if valid_topic(fixed) {
            Ok(())
        } else {
            Err(format!(
                "`{fixed}` is not a Kafka topic name (1 to {MAX_TOPIC_LEN} of letters, digits, `.`, `_` and `-`)"
            ))
        };
    }
    if template.literals().all(|l| l.chars().all(topic_char)) {
        Ok(())
    } else {
        Err(format!(
            "`{template}` cannot make a Kafka topic name (letters, digits, `.`, `_` and `-` only)"
        ))
    }
}

/// Kafka's murmur2 (`org.apache.kafka.common.utils.Utils.murmur2`), as its default
/// partitioner hashes record keys.
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    // Java's `int` arithmetic: wrapping, and the length as a 32-bit int.
    let mut h = SEED ^ (data.len() as u32);
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        if rest.len() == 3 {
            h ^= u32::from(rest[2]) << 16;
        }
        if rest.len() >= 2 {
            h ^= u32::from(rest[1]) << 8;
        }
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition Kafka's default partitioner picks for `key` among `partitions` (> 0);
/// partition 0 for events without a key.
pub fn partition_for(key: Option<&str>, partitions: i32) -> i32 {
    match key {
        Some(key) if partitions > 0 => {
            let positive = murmur2(key.as_bytes()) & 0x7fff_ffff;
            positive % partitions
        }
        _ => 0,
    }
}

/// The record of the CloudEvents Kafka binding (binary mode) for `event`.
pub fn record(event: &CloudEvent) -> Record {
    let mut headers = BTreeMap::new();
    for (name, value) in event.attributes() {
        headers.insert(format!("{HEADER_PREFIX}{name}"), value.into_bytes());
    }
    if let Some(ct) = &event.datacontenttype {
        headers.insert("content-type".to_string(), ct.as_bytes().to_vec());
    }
    Record {
        key: event.partitionkey.as_ref().map(|k| k.as_bytes().to_vec()),
        value: Some(event.data_bytes().map(|b| b.to_vec()).unwrap_or_default()),
        headers,
        timestamp: timestamp(&event.time),
    }
}

/// The event's `time` as a record timestamp (milliseconds), or now if it does not parse.
fn timestamp(time: &str) -> DateTime<Utc> {
    let at = humantime::parse_rfc3339_weak(time).unwrap_or_else(|_| SystemTime::now());
    let millis = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    Utc.timestamp_millis_opt(millis)
        .single()
        .unwrap_or(DateTime::<Utc>::UNIX_EPOCH)
}

/// What a failure says about the client's cached state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recovery {
    /// Nothing to forget (the broker refused, for a reason of its own).
    Keep,
    /// Partitions or leaders of the topic may have changed: read its metadata again.
    ForgetTopic,
    /// The connection may be broken: bootstrap a new client.
    Reconnect,
}

struct TopicInfo {
    partitions: i32,
    read_at: Instant,
}

#[derive(Default)]
struct State {
    client: Option<Arc<Client>>,
    topics: HashMap<String, TopicInfo>,
    leaders: HashMap<(String, i32), Arc<PartitionClient>>,
}

impl State {
    fn forget_topic(&mut self, topic: &str) {
        self.topics.remove(topic);
        self.leaders.retain(|(t, _), _| t != topic);
    }

    fn reset(&mut self) {
        *self = State::default();
    }
}

struct Inner {
    settings: KafkaSinkSettings,
    state: tokio::sync::Mutex<State>,
    /// Ids of events acknowledged after an earlier event of the same send failed. The
    /// dispatcher sends them again (it resends from the failed one); each is skipped, as
    /// delivered, once.
    delivered_past_failure: std::sync::Mutex<HashSet<String>>,
}

pub struct KafkaSink {
    inner: Arc<Inner>,
}

impl KafkaSink {
    /// Checks the TLS files now (a bad file fails start-up, as for upstreams); connects later.
    pub fn new(settings: KafkaSinkSettings) -> Result<KafkaSink, ClientError> {
        if let Some(files) = &settings.tls {
            tls_config(&settings.name, true, files)?;
        }
        let inner = Arc::new(Inner {
            settings,
            state: tokio::sync::Mutex::new(State::default()),
            delivered_past_failure: std::sync::Mutex::new(HashSet::new()),
        });
        // Connect at start-up when running on a runtime; if the cluster is down, the first
        // delivery attempt tries again.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let warm = inner.clone();
            runtime.spawn(async move {
                let mut state = warm.state.lock().await;
                if let Err(failure) = warm.client(&mut state).await {
                    tracing::warn!(sink = %warm.settings.name, reason = %failure.message, "Kafka not reachable at start-up; events wait in the outbox and delivery retries");
                }
            });
        }
        Ok(KafkaSink { inner })
    }
}

/// How one (topic, partition) group of a send ended: `Err` carries the index (in the batch) of
/// the first event not acknowledged.
type GroupResult = Result<(), (usize, SinkFailure, Recovery)>;

impl Inner {
    fn brokers(&self) -> String {
        self.settings.brokers.join(",")
    }

    /// How the client logs in, for messages: a refused SASL login may look like no answer.
    fn login(&self) -> String {
        match &self.settings.sasl {
            Some(sasl) => format!(" (SASL {:?} as `{}`)", sasl.mechanism, sasl.user),
            None => String::new(),
        }
    }

    /// rskafka retries inside a call (reconnecting, waiting for a leader). It gives up a
    /// little before `timeout`, so that its last error (a refused login, say) is what the log
    /// says rather than a bare timeout; the dispatcher's own backoff takes over from there.
    fn backoff(&self) -> BackoffConfig {
        BackoffConfig {
            init_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(500),
            base: 2.0,
            deadline: Some(self.settings.timeout.mul_f32(0.75)),
        }
    }

    /// The client, bootstrapping one first if there is none.
    async fn client(&self, state: &mut State) -> Result<Arc<Client>, SinkFailure> {
        if let Some(client) = &state.client {
            return Ok(client.clone());
        }
        let mut builder = ClientBuilder::new(self.settings.brokers.clone())
            .client_id(format!("ficus-{}", self.settings.name))
            .backoff_config(self.backoff());
        if let Some(files) = &self.settings.tls {
            // Read again at each connection: a renewed client certificate is picked up.
            let tls = tls_config(&self.settings.name, true, files)
                .map_err(|e| SinkFailure::retryable(format!("TLS settings: {e}")))?;
            builder = builder.tls_config(Arc::new(tls));
        }
        if let Some(sasl) = &self.settings.sasl {
            let credentials = Credentials::new(sasl.user.clone(), sasl.password.clone());
            builder = builder.sasl_config(match sasl.mechanism {
                SaslMechanism::Plain => SaslConfig::Plain(credentials),
                SaslMechanism::ScramSha256 => SaslConfig::ScramSha256(credentials),
                SaslMechanism::ScramSha512 => SaslConfig::ScramSha512(credentials),
            });
        }
        let timeout = self.settings.timeout;
        let client = match tokio::time::timeout(timeout, builder.build()).await {
            Err(_) => {
                return Err(SinkFailure::retryable(format!(
                    "no connection to Kafka at {}{} within {timeout:?}",
                    self.brokers(),
                    self.login()
                )))
            }
            Ok(Err(e)) => {
                return Err(SinkFailure::retryable(format!(
                    "cannot connect to Kafka at {}{}: {e}",
                    self.brokers(),
                    self.login()
                )))
            }
            Ok(Ok(client)) => Arc::new(client),
        };
        tracing::info!(sink = %self.settings.name, brokers = %self.brokers(), "connected to Kafka");
        state.client = Some(client.clone());
        Ok(client)
    }

    /// Either the rendered, valid topic or a permanent failure saying why not.
    fn topic(&self, event: &CloudEvent) -> Result<String, SinkFailure> {
        let topic = self.settings.topic.render(event);
        if valid_topic(&topic) {
            Ok(topic)
        } else {
            Err(SinkFailure::permanent(format!(
                "topic `{topic}` (from `{}`) is not a valid Kafka topic name: an attribute is empty or has characters other than letters, digits, `.`, `_` and `-`",
                self.settings.topic
            )))
        }
    }

    /// The partition count of `topic`, from the cache or the cluster's metadata. A topic the
    /// cluster does not list is a permanent failure: ficus creates no topics.
    async fn partitions(
        &self,
        client: &Client,
        state: &mut State,
        topic: &str,
    ) -> Result<i32, (SinkFailure, Recovery)> {
        if let Some(info) = state.topics.get(topic) {
            if info.read_at.elapsed() < METADATA_MAX_AGE {
                return Ok(info.partitions);
            }
        }
        let timeout = self.settings.timeout;
        // An unfiltered metadata request: unlike one naming the topic, it never makes a broker
        // with `auto.create.topics.enable` create it behind the operator's back.
        let listed = match tokio::time::timeout(timeout, client.list_topics()).await {
            Err(_) => {
                return Err((
                    SinkFailure::retryable(format!(
                        "no metadata from Kafka at {} within {timeout:?}",
                        self.brokers()
                    )),
                    Recovery::Reconnect,
                ))
            }
            Ok(Err(e)) => {
                return Err((
                    SinkFailure::retryable(format!(
                        "cannot read metadata from Kafka at {}: {e}",
                        self.brokers()
                    )),
                    Recovery::Reconnect,
                ))
            }
            Ok(Ok(listed)) => listed,
        };
        let now = Instant::now();
        for t in &listed {
            let Ok(partitions) = i32::try_from(t.partitions.len()) else {
                continue;
            };
            state.topics.insert(
                t.name.clone(),
                TopicInfo {
                    partitions,
                    read_at: now,
                },
            );
        }
        match state.topics.get(topic) {
            Some(info) if info.partitions > 0 => Ok(info.partitions),
            Some(_) => Err((
                SinkFailure::retryable(format!("topic `{topic}` has no partitions yet")),
                Recovery::ForgetTopic,
            )),
            None => Err((
                SinkFailure::permanent(format!(
                    "topic `{topic}` does not exist on the Kafka cluster at {} (ficus creates no topics: create it, then `ficus outbox replay`)",
                    self.brokers()
                )),
                Recovery::Keep,
            )),
        }
    }

    /// What an rskafka error means for the event and for the cached state.
    fn classify(&self, topic: &str, partition: i32, error: &KafkaError) -> (SinkFailure, Recovery) {
        let at = format!("topic `{topic}` partition {partition}");
        match error {
            KafkaError::ServerError {
                protocol_error,
                error_message,
                ..
            } => {
                let said = error_message
                    .as_deref()
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default();
                let permanent = |why: &str| {
                    (
                        SinkFailure::permanent(format!(
                            "Kafka refused the record for {at}: {why} ({protocol_error}{said})"
                        )),
                        Recovery::Keep,
                    )
                };
                match protocol_error {
                    ProtocolError::MessageTooLarge | ProtocolError::RecordListTooLarge => {
                        permanent("too large for the topic's max.message.bytes")
                    }
                    ProtocolError::InvalidRecord => {
                        permanent("the broker finds the record invalid")
                    }
                    ProtocolError::InvalidTopicException => permanent("not a valid topic"),
                    ProtocolError::TopicAuthorizationFailed => {
                        permanent("this client may not write to the topic")
                    }
                    ProtocolError::UnknownTopicOrPartition
                    | ProtocolError::NotLeaderOrFollower
                    | ProtocolError::LeaderNotAvailable => (
                        SinkFailure::retryable(format!(
                            "{at}: {protocol_error}{said}; its metadata is read again"
                        )),
                        Recovery::ForgetTopic,
                    ),
                    _ => (
                        SinkFailure::retryable(format!("{at}: {protocol_error}{said}")),
                        Recovery::Keep,
                    ),
                }
            }
            // Connection, I/O, retries given up, an answer that does not parse: start afresh.
            other => (
                SinkFailure::retryable(format!(
                    "produce to {at} at {} failed: {other}",
                    self.brokers()
                )),
                Recovery::Reconnect,
            ),
        }
    }

    /// The leader's client for each (topic, partition) in `wanted`, from the cache or looked
    /// up (in parallel). A lookup that fails gives the group its failure.
    async fn leaders(
        &self,
        client: &Client,
        state: &mut State,
        wanted: impl Iterator<Item = &(String, i32)>,
    ) -> HashMap<(String, i32), Result<Arc<PartitionClient>, (SinkFailure, Recovery)>> {
        let mut out = HashMap::new();
        let mut missing = Vec::new();
        for key in wanted {
            match state.leaders.get(key) {
                Some(pc) => {
                    out.insert(key.clone(), Ok(pc.clone()));
                }
                None => missing.push(key.clone()),
            }
        }
        let timeout = self.settings.timeout;
        let found = join_all(missing.into_iter().map(|(topic, partition)| async move {
            let lookup = client.partition_client(topic.clone(), partition, UnknownTopicHandling::Error);
            let result = match tokio::time::timeout(timeout, lookup).await {
                Ok(Ok(pc)) => Ok(Arc::new(pc)),
                Ok(Err(e)) => Err(self.classify(&topic, partition, &e)),
                Err(_) => Err((
                    SinkFailure::retryable(format!(
                        "no leader for topic `{topic}` partition {partition} at {} within {timeout:?}",
                        self.brokers()
                    )),
                    Recovery::Reconnect,
                )),
            };
            ((topic, partition), result)
        }))
        .await;
        for (key, result) in found {
            if let Ok(pc) = &result {
                state.leaders.insert(key.clone(), pc.clone());
            }
            out.insert(key, result);
        }
        out
    }

    /// Produces the events at `indices` (one partition's, in order) in record batches of at
    /// most `MAX_REQUEST_BYTES`, one request after the other.
    async fn produce_group(
        &self,
        leader: &PartitionClient,
        events: &[CloudEvent],
        indices: &[usize],
    ) -> GroupResult {
        let timeout = self.settings.timeout;
        let mut start = 0;
        while start < indices.len() {
            let mut records = Vec::new();
            let mut bytes = 0;
            let mut end = start;
            while end < indices.len() {
                let r = record(&events[indices[end]]);
                let size = r.approximate_size() + RECORD_OVERHEAD;
                if !records.is_empty() && bytes + size > MAX_REQUEST_BYTES {
                    break;
                }
                bytes += size;
                records.push(r);
                end += 1;
            }
            let produce = leader.produce(records, Compression::NoCompression);
            match tokio::time::timeout(timeout, produce).await {
                Ok(Ok(_offsets)) => {}
                Ok(Err(e)) => {
                    let (failure, recovery) =
                        self.classify(leader.topic(), leader.partition(), &e);
                    return Err((indices[start], failure, recovery));
                }
                Err(_) => {
                    return Err((
                        indices[start],
                        SinkFailure::retryable(format!(
                            "no acknowledgement from the leader of topic `{}` partition {} within {timeout:?}",
                            leader.topic(),
                            leader.partition()
                        )),
                        Recovery::Reconnect,
                    ))
                }
            }
            start = end;
        }
        Ok(())
    }

    async fn send_batch(&self, events: &[CloudEvent]) -> SendResult {
        let mut state = self.state.lock().await;
        let skip: Vec<bool> = {
            let remembered = self
                .delivered_past_failure
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            events.iter().map(|e| remembered.contains(&e.id)).collect()
        };
        let (delivered, failure, acknowledged) = self.attempt(&mut state, events, &skip).await;
        let mut remembered = self
            .delivered_past_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // Skipped events the dispatcher now counts delivered are forgotten; those past the
        // failure stay remembered for the resend.
        for (event, _) in events
            .iter()
            .zip(&skip)
            .take(delivered)
            .filter(|(_, s)| **s)
        {
            remembered.remove(&event.id);
        }
        if remembered.len() > MAX_REMEMBERED {
            remembered.clear();
        }
        remembered.extend(
            acknowledged
                .into_iter()
                .filter(|&i| i > delivered)
                .map(|i| events[i].id.clone()),
        );
        match failure {
            None => SendResult::all(events.len()),
            Some(failure) => SendResult::failed(delivered, failure),
        }
    }

    /// One attempt: the delivered prefix, the failure that ends it (if any), and the indices
    /// of the events acknowledged (their group succeeded), past the failure included.
    async fn attempt(
        &self,
        state: &mut State,
        events: &[CloudEvent],
        skip: &[bool],
    ) -> (usize, Option<SinkFailure>, Vec<usize>) {
        if skip.iter().all(|s| *s) {
            return (events.len(), None, Vec::new());
        }
        let client = match self.client(state).await {
            Ok(c) => c,
            Err(f) => {
                let first = skip.iter().position(|s| !s).unwrap_or(0);
                return (first, Some(f), Vec::new());
            }
        };
        // Where each event goes, up to the first one that cannot be placed.
        let mut groups: BTreeMap<(String, i32), Vec<usize>> = BTreeMap::new();
        let mut stop: Option<(usize, SinkFailure)> = None;
        for (i, event) in events.iter().enumerate() {
            if skip[i] {
                continue;
            }
            let placed = match self.topic(event) {
                Ok(topic) => match self.partitions(&client, state, &topic).await {
                    Ok(count) => Ok((topic, partition_for(event.partitionkey.as_deref(), count))),
                    Err((failure, Recovery::Reconnect)) => {
                        // The cluster is not answering: nothing of this batch is sent now.
                        self.recover(state, &topic, Recovery::Reconnect);
                        let first = skip.iter().position(|s| !s).unwrap_or(i);
                        return (first, Some(failure), Vec::new());
                    }
                    Err((failure, recovery)) => {
                        self.recover(state, &topic, recovery);
                        Err(failure)
                    }
                },
                Err(failure) => Err(failure),
            };
            match placed {
                Ok(key) => groups.entry(key).or_default().push(i),
                Err(failure) => {
                    stop = Some((i, failure));
                    break;
                }
            }
        }
        let mut leaders = self.leaders(&client, state, groups.keys()).await;
        let results: Vec<(&(String, i32), &Vec<usize>, GroupResult)> =
            join_all(groups.iter().map(|(key, indices)| {
                let leader = leaders.remove(key);
                async move {
                    let result = match leader {
                        Some(Ok(leader)) => self.produce_group(&leader, events, indices).await,
                        Some(Err((failure, recovery))) => Err((indices[0], failure, recovery)),
                        None => Err((
                            indices[0],
                            SinkFailure::retryable("no leader looked up"),
                            Recovery::Keep,
                        )),
                    };
                    (key, indices, result)
                }
            }))
            .await;
        let mut first_failure = stop;
        let mut acknowledged = Vec::new();
        for (key, indices, result) in results {
            match result {
                Ok(()) => acknowledged.extend_from_slice(indices),
                Err((at, failure, recovery)) => {
                    acknowledged.extend(indices.iter().take_while(|&&i| i < at));
                    self.recover(state, &key.0, recovery);
                    if first_failure.as_ref().is_none_or(|(i, _)| at < *i) {
                        first_failure = Some((at, failure));
                    }
                }
            }
        }
        match first_failure {
            None => (events.len(), None, acknowledged),
            Some((at, failure)) => (at, Some(failure), acknowledged),
        }
    }

    fn recover(&self, state: &mut State, topic: &str, recovery: Recovery) {
        match recovery {
            Recovery::Keep => {}
            Recovery::ForgetTopic => state.forget_topic(topic),
            Recovery::Reconnect => {
                if state.client.is_some() {
                    tracing::warn!(sink = %self.settings.name, brokers = %self.brokers(), "Kafka connection dropped; the next attempt connects again");
                }
                state.reset();
            }
        }
    }
}

impl Sink for KafkaSink {
    fn send<'a>(&'a self, events: &'a [CloudEvent]) -> BoxFuture<'a, SendResult> {
        Box::pin(self.inner.send_batch(events))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_kafka() {
        // Kafka's own test vectors (clients' UtilsTest.testMurmur2).
        let cases: [(&str, i32); 6] = [
            ("21", -973_932_308),
            ("foobar", -790_332_482),
            ("a-little-bit-long-string", -985_981_536),
            ("a-little-bit-longer-string", -1_486_304_829),
            (
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            ("abc", 479_470_107),
        ];
        for (key, want) in cases {
            assert_eq!(murmur2(key.as_bytes()), want, "{key}");
        }
    }

    #[test]
    fn keys_pick_stable_partitions() {
        // toPositive(murmur2("abc")) % 10
        assert_eq!(partition_for(Some("abc"), 10), 479_470_107 % 10);
        assert_eq!(
            partition_for(Some("21"), 7),
            (-973_932_308_i32 & 0x7fff_ffff) % 7
        );
        assert_eq!(partition_for(None, 12), 0);
        assert_eq!(partition_for(Some("abc"), 0), 0);
        for key in ["a", "order-42", "café"] {
            let p = partition_for(Some(key), 6);
            assert!((0..6).contains(&p));
            assert_eq!(p, partition_for(Some(key), 6));
        }
    }

    #[test]
    fn topics_and_brokers_are_checked() {
        assert!(valid_topic("shop.order-created_v1"));
        assert!(!valid_topic(""));
        assert!(!valid_topic(".."));
        assert!(!valid_topic("shop/orders"));
        assert!(!valid_topic(&"t".repeat(250)));
        let t = |s: &str| AttributeTemplate::parse(s).expect("template");
        assert!(check_topic(&t("shop.{type}")).is_ok());
        assert!(check_topic(&t("shop-events")).is_ok());
        assert!(check_topic(&t("shop events")).is_err());
        assert!(check_topic(&t("shop/{type}")).is_err());

        assert_eq!(parse_broker("kafka:9092").as_deref(), Ok("kafka:9092"));
        assert!(parse_broker("[::1]:9092").is_ok());
        assert!(parse_broker("10.0.0.1:9093").is_ok());
        assert!(parse_broker("kafka").is_err());
        assert!(parse_broker("kafka:0").is_err());
        assert!(parse_broker("kafka://kafka:9092").is_err());
        assert!(parse_broker("::1:9092").is_err());
    }

    #[test]
    fn records_follow_the_kafka_binding() {
        let event = CloudEvent {
            subject: Some("café".into()),
            ..crate::events::sample_event()
        };
        let r = record(&event);
        assert_eq!(r.key.as_deref(), Some(&b"42"[..]), "the partition key");
        let h = |n: &str| {
            r.headers
                .get(n)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        };
        assert_eq!(h("ce_specversion").as_deref(), Some("1.0"));
        assert_eq!(h("ce_id").as_deref(), Some("0190-a"));
        assert_eq!(h("ce_type").as_deref(), Some("shop.order.created"));
        assert_eq!(
            h("ce_subject").as_deref(),
            Some("café"),
            "UTF-8, not encoded"
        );
        assert_eq!(h("ce_partitionkey").as_deref(), Some("42"));
        assert_eq!(h("content-type").as_deref(), Some("application/json"));
        assert_eq!(h("ce_datacontenttype"), None, "content-type carries it");
        assert_eq!(
            r.value,
            event.data_bytes().map(|b| b.to_vec()),
            "the data bytes"
        );
        assert_eq!(
            r.timestamp.timestamp_millis(),
            1_795_788_000_123,
            "the event's time"
        );

        let bare = CloudEvent {
            partitionkey: None,
            datacontenttype: None,
            data: None,
            ..event
        };
        let r = record(&bare);
        assert_eq!(r.key, None);
        assert_eq!(r.value, Some(Vec::new()), "empty, not a tombstone");
        assert!(!r.headers.contains_key("content-type"));
    }

    fn settings() -> KafkaSinkSettings {
        KafkaSinkSettings {
            name: "k".into(),
            brokers: vec!["kafka:9092".into()],
            topic: AttributeTemplate::parse("shop").expect("template"),
            tls: None,
            sasl: None,
            timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn refusals_are_permanent_and_the_rest_retried() {
        let inner = Inner {
            settings: settings(),
            state: tokio::sync::Mutex::new(State::default()),
            delivered_past_failure: std::sync::Mutex::new(HashSet::new()),
        };
        let server = |protocol_error| KafkaError::ServerError {
            protocol_error,
            error_message: None,
            request: rskafka::client::error::RequestContext::Partition("shop".into(), 2),
            response: None,
            is_virtual: false,
        };
        let cases = [
            (ProtocolError::MessageTooLarge, true, Recovery::Keep),
            (ProtocolError::RecordListTooLarge, true, Recovery::Keep),
            (ProtocolError::InvalidRecord, true, Recovery::Keep),
            (
                ProtocolError::TopicAuthorizationFailed,
                true,
                Recovery::Keep,
            ),
            (
                ProtocolError::UnknownTopicOrPartition,
                false,
                Recovery::ForgetTopic,
            ),
            (
                ProtocolError::NotLeaderOrFollower,
                false,
                Recovery::ForgetTopic,
            ),
            (ProtocolError::NotEnoughReplicas, false, Recovery::Keep),
            (ProtocolError::RequestTimedOut, false, Recovery::Keep),
            (ProtocolError::CorruptMessage, false, Recovery::Keep),
        ];
        for (error, permanent, recovery) in cases {
            let (failure, got) = inner.classify("shop", 2, &server(error));
            assert_eq!(
                failure.permanent, permanent,
                "{error:?}: {}",
                failure.message
            );
            assert_eq!(got, recovery, "{error:?}");
            assert!(
                failure.message.contains("topic `shop` partition 2"),
                "{}",
                failure.message
            );
        }
        let (failure, recovery) = inner.classify("shop", 0, &KafkaError::Timeout);
        assert!(!failure.permanent);
        assert_eq!(recovery, Recovery::Reconnect);
    }

    #[test]
    fn secrets_stay_out_of_debug() {
        let settings = KafkaSinkSettings {
            sasl: Some(KafkaSasl {
                mechanism: SaslMechanism::ScramSha512,
                user: "ficus".into(),
                password: "s3cret".into(),
            }),
            ..settings()
        };
        let shown = format!("{settings:?}");
        assert!(
            shown.contains("ficus") && !shown.contains("s3cret"),
            "{shown}"
        );
        assert_eq!(settings.clone(), settings);
    }
}
