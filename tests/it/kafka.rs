//! The Kafka sink against a real Kafka-protocol broker: `tansu` (an Apache Kafka compatible
//! broker in Rust, `cargo install tansu --locked --features libsql`), started by each test from
//! its binary on an ephemeral port with its SQLite storage in a temporary directory, so that it
//! can be killed (`kill -9` by PID) and started again on the same data. tansu creates no topics
//! by itself: the tests create theirs with rskafka's controller client, and read records back
//! with rskafka's partition client.
//!
//! Cases: records in the CloudEvents Kafka binding (key, `ce_` headers, content type, value,
//! partition by murmur2, checked with the CloudEvents SDK); `kill -9` of the broker under load;
//! a broker that is down when ficus starts; a topic that does not exist (dead letters); SASL
//! SCRAM-SHA-512 against a broker that requires it, and a refused login (retried); mutual TLS
//! through a TLS front that tansu advertises as itself (tansu 0.6 takes `--cert`/`--key` but
//! serves no TLS with them), and a broker certificate the sink does not trust (retried).
//! A missing `tansu` skips the test with a loud message, and fails it when `CI` is set.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cloudevents::AttributesReader;
use rskafka::client::partition::{OffsetAt, UnknownTopicHandling};
use rskafka::client::{Client, ClientBuilder, Credentials, SaslConfig};
use rskafka::record::Record;

use crate::brokers::{
    assert_in_order_per_key, data_json, ficus_yaml, find_binary, free_port, log_lines, metric,
    order, pki, process_metric, text, BROKER_START, DELIVERY,
};
use crate::events::shop;
use crate::support::mid_stream::{kill_broker_mid_stream, Arrival, KilledBroker};
use crate::support::{eventually, get, send, Ficus, FicusProcess, WAIT};

/// One `tansu broker` on a fixed port with its SQLite database in `dir`, so that it can be
/// killed and started again with the same topics and records. Killed (SIGKILL) when dropped.
struct Tansu {
    binary: PathBuf,
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// `--authentication`: clients must authenticate with SASL SCRAM.
    authentication: bool,
    /// SCRAM credentials of the test's own client, once authentication is on.
    sasl: Option<SaslConfig>,
    /// The port advertised in metadata, when clients reach tansu through a front (TLS).
    advertised: Option<u16>,
    /// TLS for the test's own client, through that front.
    client_tls: Option<Arc<rustls::ClientConfig>>,
}

/// `tansu`, on the PATH or where `cargo install` puts it.
fn tansu_binary() -> Option<PathBuf> {
    find_binary("tansu").or_else(|| {
        let cargo_home = std::env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
        let path = cargo_home.join("bin").join("tansu");
        path.is_file().then_some(path)
    })
}

impl Tansu {
    /// A broker that is not started yet, or `None` (after a loud message) when `tansu` is
    /// missing outside CI.
    fn new(test: &str) -> Option<Tansu> {
        const INSTALL: &str = "cargo install tansu --locked --features libsql";
        let binary = match tansu_binary() {
            Some(b) => b,
            None if std::env::var_os("CI").is_some() => {
                panic!("`tansu` is not installed but CI is set: install it ({INSTALL})")
            }
            None => {
                eprintln!(
                    "\n################################################################\n\
                     SKIPPED {test}: `tansu` is not installed ({INSTALL}).\n\
                     With CI set this is a failure.\n\
                     ################################################################\n"
                );
                return None;
            }
        };
        Some(Tansu {
            binary,
            port: free_port(),
            dir: tempfile::tempdir().expect("broker tempdir"),
            child: None,
            authentication: false,
            sasl: None,
            advertised: None,
            client_tls: None,
        })
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Where clients connect: tansu itself, or the front it advertises.
    fn client_addr(&self) -> String {
        format!("127.0.0.1:{}", self.advertised.unwrap_or(self.port))
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("broker.log")
    }

    /// Starts the process and waits until it answers a metadata request.
    async fn start(&mut self) {
        assert!(self.child.is_none(), "broker already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("broker log");
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let advertised = format!("tcp://{}", self.client_addr());
        let mut cmd = Command::new(&self.binary);
        // The SQLite file is named relative to the working directory: the test's directory
        // (which also has no `.env` for tansu to pick up).
        cmd.current_dir(self.dir.path())
            .args(["broker", "--listener-url", &url])
            .args(["--advertised-listener-url", &advertised])
            .args(["--storage-engine", "sqlite://tansu.db"])
            .arg("--silent")
            .args(self.authentication.then_some("--authentication"))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log);
        let started = Instant::now();
        self.child = Some(cmd.spawn().expect("spawn tansu"));
        let deadline = started + BROKER_START;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("tansu exited at start ({status}):\n{}", self.log_tail());
                }
            }
            if let Some(client) = self.try_client().await {
                if tokio::time::timeout(Duration::from_secs(2), client.list_topics())
                    .await
                    .is_ok_and(|r| r.is_ok())
                {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "tansu not ready within {BROKER_START:?}:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!(
            "tansu ready on port {} in {:?}",
            self.port,
            started.elapsed()
        );
    }

    /// `kill -9` by PID, and wait for the process to be gone.
    fn kill_9(&mut self) {
        let mut child = self.child.take().expect("broker running");
        let status = Command::new("kill")
            .args(["-9", &child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -9 failed");
        let _ = child.wait();
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    async fn create_topic(&self, name: &str, partitions: i32) {
        let client = self.client().await;
        client
            .controller_client()
            .expect("controller client")
            .create_topic(name, partitions, 1, 5_000)
            .await
            .unwrap_or_else(|e| panic!("create topic {name}: {e}"));
    }
}

impl Tansu {
    async fn try_client(&self) -> Option<Client> {
        try_client(
            &self.client_addr(),
            self.sasl.clone(),
            self.client_tls.clone(),
        )
        .await
    }

    /// A connected test client; attempts repeat (each bounded by 1 s), since a SCRAM login
    /// to a broker on a loaded machine can take longer than one attempt's deadline.
    async fn client(&self) -> Client {
        let what = format!(
            "the test client connected to tansu at {}",
            self.client_addr()
        );
        crate::support::eventually(crate::support::WAIT, &what, || self.try_client()).await
    }

    /// A SCRAM-SHA-512 user, with `tansu user create` against the running broker (which then
    /// must not require authentication yet: the user is stored in its database).
    fn create_user(&self, user: &str, password: &str) {
        let out = Command::new(&self.binary)
            .current_dir(self.dir.path())
            .args(["user", "create", "--broker"])
            .arg(format!("tcp://{}", self.addr()))
            .args([user, password, "--mechanism", "scram512"])
            .output()
            .expect("run tansu user create");
        assert!(
            out.status.success(),
            "tansu user create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- tansu log (last lines) ---\n{}", self.log_tail());
        }
    }
}

async fn try_client(
    addr: &str,
    sasl: Option<SaslConfig>,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Option<Client> {
    let mut builder =
        ClientBuilder::new(vec![addr.to_string()]).backoff_config(rskafka::BackoffConfig {
            deadline: Some(Duration::from_secs(1)),
            ..Default::default()
        });
    if let Some(sasl) = sasl {
        builder = builder.sasl_config(sasl);
    }
    if let Some(tls) = tls {
        builder = builder.tls_config(tls);
    }
    let build = builder.build();
    tokio::time::timeout(Duration::from_secs(2), build)
        .await
        .ok()?
        .ok()
}

/// Records in `topic` (0 while it cannot be read).
async fn topic_len(tansu: &Tansu, topic: &str, partitions: i32) -> usize {
    let Some(client) = tansu.try_client().await else {
        return 0;
    };
    let mut total = 0;
    for p in 0..partitions {
        let Ok(pc) = client
            .partition_client(topic, p, UnknownTopicHandling::Error)
            .await
        else {
            return 0;
        };
        match pc.get_offset(OffsetAt::Latest).await {
            Ok(n) => total += usize::try_from(n).unwrap_or(0),
            Err(_) => return 0,
        }
    }
    total
}

/// Every record of `topic`, partition by partition, each in offset order.
async fn read_topic(tansu: &Tansu, topic: &str, partitions: i32) -> Vec<(i32, Record)> {
    let client = tansu.client().await;
    let mut out = Vec::new();
    for p in 0..partitions {
        let pc = client
            .partition_client(topic, p, UnknownTopicHandling::Retry)
            .await
            .expect("partition client");
        let end = pc
            .get_offset(OffsetAt::Latest)
            .await
            .expect("high watermark");
        let mut offset = pc
            .get_offset(OffsetAt::Earliest)
            .await
            .expect("low watermark");
        let deadline = Instant::now() + WAIT;
        while offset < end {
            assert!(Instant::now() < deadline, "read {topic}/{p} in time");
            let (records, _high) = pc
                .fetch_records(offset, 1..10_000_000, 200)
                .await
                .expect("fetch");
            for r in records {
                offset = offset.max(r.offset + 1);
                out.push((p, r.record));
            }
        }
    }
    out
}

fn header(record: &Record, name: &str) -> Option<String> {
    record
        .headers
        .get(name)
        .map(|v| String::from_utf8(v.clone()).expect("UTF-8 header value"))
}

/// The record decoded by the CloudEvents SDK: its `ce_NAME` headers become the HTTP binding's
/// `ce-NAME` headers (percent-encoded as that binding wants), `content-type` stays.
fn kafka_sdk_event(record: &Record) -> cloudevents::Event {
    let mut headers = http::HeaderMap::new();
    for (name, value) in &record.headers {
        let value = String::from_utf8(value.clone()).expect("UTF-8 header value");
        let name = match name.strip_prefix("ce_") {
            Some(attribute) => format!("ce-{attribute}"),
            None if name == "content-type" => name.clone(),
            None => panic!("unexpected header {name}"),
        };
        headers.insert(
            http::HeaderName::from_bytes(name.as_bytes()).expect("name"),
            http::HeaderValue::from_str(&ficus::events::percent_encode_header(&value))
                .expect("value"),
        );
    }
    cloudevents::binding::http::to_event(&headers, record.value.clone().unwrap_or_default())
        .expect("a valid CloudEvent in binary mode")
}

/// (id, partition key, customer) of each record, in the order given; also checks that the
/// key is the partition key.
fn kafka_arrivals(records: &[(i32, Record)]) -> Vec<(String, String, String)> {
    records
        .iter()
        .map(|(_, r)| {
            let key = header(r, "ce_partitionkey").expect("ce_partitionkey");
            assert_eq!(r.key.as_deref(), Some(key.as_bytes()), "key = partitionkey");
            let data: serde_json::Value =
                serde_json::from_slice(r.value.as_deref().unwrap_or_default()).expect("json");
            (
                header(r, "ce_id").expect("ce_id"),
                key,
                data["customer"].as_str().expect("customer").to_string(),
            )
        })
        .collect()
}

/// Each key's records are all in the partition Kafka's default partitioner picks for it.
fn assert_partitioned_by_key(records: &[(i32, Record)], partitions: i32) {
    for (p, r) in records {
        let key = r
            .key
            .as_deref()
            .map(|k| std::str::from_utf8(k).expect("key"));
        assert_eq!(
            *p,
            ficus::sinks::kafka::partition_for(key, partitions),
            "key {key:?} in its murmur2 partition"
        );
    }
}

fn sinks(addr: &str, topic: &str) -> String {
    format!("  kafka: {{ type: kafka, brokers: [\"{addr}\"], topic: \"{topic}\", timeout: 2s }}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_records_follow_the_cloudevents_binding() {
    let Some(mut tansu) = Tansu::new("kafka_records_follow_the_cloudevents_binding") else {
        return;
    };
    tansu.start().await;
    tansu.create_topic("events.shop.order.created", 3).await;
    tansu.create_topic("events.shop.text", 1).await;
    let upstream = shop().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let ficus = Ficus::start_yaml(&ficus_yaml(
        upstream.addr,
        &sinks(&tansu.addr(), "events.{type}"),
        &dir.path().join("outbox"),
    ))
    .await;
    let keys = ["42", "7", "order-1001", "x"];
    for n in 0..3 {
        for key in keys {
            let resp = send(ficus.addr, order(key, &format!("{key}-{n}"), 0)).await;
            assert_eq!(resp.status(), 201);
        }
    }
    assert_eq!(send(ficus.addr, text()).await.status(), 200);
    eventually(WAIT, "12 orders and 1 text record", || async {
        let orders = topic_len(&tansu, "events.shop.order.created", 3).await;
        let texts = topic_len(&tansu, "events.shop.text", 1).await;
        (orders == 12 && texts == 1).then_some(())
    })
    .await;
    let records = read_topic(&tansu, "events.shop.order.created", 3).await;
    assert_eq!(records.len(), 12);
    assert_partitioned_by_key(&records, 3);
    let used: HashSet<i32> = records.iter().map(|(p, _)| *p).collect();
    assert!(used.len() > 1, "keys spread over partitions: {used:?}");
    let arrivals = kafka_arrivals(&records);
    let keys: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
    assert_in_order_per_key(&arrivals, &keys, 3);

    let (_, created) = records
        .iter()
        .find(|(_, r)| header(r, "ce_partitionkey").as_deref() == Some("42"))
        .expect("a record of key 42");
    assert_eq!(
        created.key.as_deref(),
        Some(&b"42"[..]),
        "key = partitionkey"
    );
    let id = header(created, "ce_id").expect("ce_id");
    assert_eq!(
        uuid::Uuid::parse_str(&id).expect("uuid").get_version_num(),
        7
    );
    let h = |name: &str| header(created, name);
    assert_eq!(h("ce_specversion").as_deref(), Some("1.0"));
    assert_eq!(h("ce_type").as_deref(), Some("shop.order.created"));
    assert_eq!(h("ce_source").as_deref(), Some("/legacy/shop"));
    assert_eq!(h("ce_subject").as_deref(), Some("42"));
    assert_eq!(h("ce_partitionkey").as_deref(), Some("42"));
    assert_eq!(h("ce_sequence").as_deref(), Some("1"));
    assert_eq!(h("ce_ficusupstream").as_deref(), Some("monolith"));
    assert_eq!(
        h("ce_traceparent").as_deref(),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );
    assert_eq!(h("content-type").as_deref(), Some("application/json"));
    assert_eq!(h("ce_datacontenttype"), None, "content-type carries it");
    let time = h("ce_time").expect("ce_time");
    let at = humantime::parse_rfc3339(&time).expect("RFC 3339 time");
    let millis = at
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis();
    assert_eq!(
        i128::from(created.timestamp.timestamp_millis()),
        i128::try_from(millis).expect("millis"),
        "the record timestamp is the event's time"
    );
    // The CloudEvents SDK reads the same event.
    let e = kafka_sdk_event(created);
    assert_eq!(e.id(), id);
    assert_eq!(e.ty(), "shop.order.created");
    assert_eq!(e.source().to_string(), "/legacy/shop");
    assert_eq!(e.subject(), Some("42"));
    assert_eq!(e.datacontenttype(), Some("application/json"));
    assert!(e.time().is_some());
    assert_eq!(
        e.extension("partitionkey")
            .map(|v| v.to_string())
            .as_deref(),
        Some("42")
    );
    let data = data_json(&e);
    assert_eq!(data["order_id"], "42");
    assert_eq!(data["customer"], "42-0");

    let texts = read_topic(&tansu, "events.shop.text", 1).await;
    let (_, text_record) = &texts[0];
    assert_eq!(text_record.key, None, "no partition key, no key");
    assert!(header(text_record, "content-type").is_some_and(|c| c.starts_with("text/plain")));
    assert_eq!(
        text_record.value.as_deref(),
        Some(&b"plain words"[..]),
        "text data as is"
    );
    assert_eq!(
        header(text_record, "ce_subject"),
        None,
        "absent attributes, no header"
    );
    assert_eq!(kafka_sdk_event(text_record).ty(), "shop.text");

    eventually(WAIT, "13 counted delivered", || async {
        (metric(&ficus, "ficus_events_delivered_total", "kafka").await == 13.0).then_some(())
    })
    .await;
}

/// The `shop-events` topic (three partitions), for the kill-mid-stream run.
struct ShopEvents<'a> {
    tansu: &'a mut Tansu,
}

impl ShopEvents<'_> {
    const TOPIC: &'static str = "shop-events";
    const PARTITIONS: i32 = 3;
}

impl KilledBroker for ShopEvents<'_> {
    const NAME: &'static str = "kafka";
    const DURABLE_BY: &'static str = "records acknowledged by acks=all";
    const DEDUPLICATES: bool = false;

    fn kill_9(&mut self) {
        self.tansu.kill_9();
    }

    async fn start(&mut self) {
        self.tansu.start().await;
    }

    async fn held(&mut self) -> usize {
        topic_len(self.tansu, Self::TOPIC, Self::PARTITIONS).await
    }

    async fn arrivals(&mut self) -> Vec<Arrival> {
        let records = read_topic(self.tansu, Self::TOPIC, Self::PARTITIONS).await;
        assert_partitioned_by_key(&records, Self::PARTITIONS);
        kafka_arrivals(&records)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_broker_killed_mid_stream_loses_nothing_and_keeps_order() {
    let Some(mut tansu) = Tansu::new("kafka_broker_killed_mid_stream") else {
        return;
    };
    tansu.start().await;
    tansu
        .create_topic(ShopEvents::TOPIC, ShopEvents::PARTITIONS)
        .await;
    let sinks = sinks(&tansu.addr(), ShopEvents::TOPIC);
    let mut topic = ShopEvents { tansu: &mut tansu };
    kill_broker_mid_stream(&mut topic, "kafka", &sinks).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_unreachable_at_start_events_wait_then_flow() {
    let Some(mut tansu) = Tansu::new("kafka_unreachable_at_start") else {
        return;
    };
    // The topic exists on the broker's disk; the broker is down when ficus starts.
    tansu.start().await;
    tansu.create_topic("shop-events", 2).await;
    tansu.kill_9();
    let upstream = shop().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let ficus = Ficus::start_yaml(&ficus_yaml(
        upstream.addr,
        &sinks(&tansu.addr(), "shop-events"),
        &dir.path().join("outbox"),
    ))
    .await;
    let (status, _) = eventually(WAIT, "/readyz answers", || async {
        Some(get(ficus.admin, "/readyz").await)
    })
    .await;
    assert_eq!(status, 200, "ready without the broker");
    for n in 0..10 {
        assert_eq!(
            send(ficus.addr, order("k", &format!("k-{n}"), 0))
                .await
                .status(),
            201
        );
    }
    eventually(WAIT, "10 pending with a lag", || async {
        let pending = metric(&ficus, "ficus_outbox_pending_events", "kafka").await;
        let lag = metric(&ficus, "ficus_event_delivery_lag_seconds", "kafka").await;
        let failed = metric(&ficus, "ficus_event_delivery_failures_total", "kafka").await;
        (pending == 10.0 && lag > 0.0 && failed >= 1.0).then_some(())
    })
    .await;

    let up = Instant::now();
    tansu.start().await;
    eventually(DELIVERY, "10 records once the broker is up", || async {
        let pending = metric(&ficus, "ficus_outbox_pending_events", "kafka").await;
        (pending == 0.0 && topic_len(&tansu, "shop-events", 2).await == 10).then_some(())
    })
    .await;
    let records = read_topic(&tansu, "shop-events", 2).await;
    assert_partitioned_by_key(&records, 2);
    assert_in_order_per_key(&kafka_arrivals(&records), &["k".to_string()], 10);
    assert_eq!(
        metric(&ficus, "ficus_events_dead_lettered_total", "kafka").await,
        0.0
    );
    eprintln!(
        "kafka down at start: 10 events delivered {:?} after the broker started",
        up.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_missing_topic_and_invalid_topic_are_dead_lettered() {
    let Some(mut tansu) = Tansu::new("kafka_missing_topic_dead_lettered") else {
        return;
    };
    tansu.start().await;
    // Orders have a topic; text events (`events.shop.text`) have none.
    tansu.create_topic("events.shop.order.created", 2).await;
    let upstream = shop().await;
    let addr = tansu.addr();
    let sinks = format!(
        "{}\n  odd: {{ type: kafka, brokers: [\"{addr}\"], topic: \"x{{source}}\", timeout: 2s }}",
        sinks(&addr, "events.{type}")
    );
    let outbox = tempfile::tempdir().expect("tempdir");
    let mut ficus = FicusProcess::start(&ficus_yaml(upstream.addr, &sinks, outbox.path())).await;
    assert_eq!(send(ficus.addr, order("a", "a-0", 0)).await.status(), 201);
    assert_eq!(send(ficus.addr, text()).await.status(), 200);
    assert_eq!(send(ficus.addr, order("a", "a-1", 0)).await.status(), 201);
    let lines = log_lines(
        &mut ficus,
        &[
            &[
                "moved to dead letters",
                "\"sink\":\"kafka\"",
                "topic `events.shop.text` does not exist",
                "ficus creates no topics",
            ],
            &[
                "moved to dead letters",
                "\"sink\":\"odd\"",
                "topic `x/legacy/shop` (from `x{source}`) is not a valid Kafka topic name",
            ],
        ],
    )
    .await;
    eprintln!("dead-letter log lines:\n{}", lines.join("\n"));
    eventually(
        WAIT,
        "dead letters counted and the rest delivered",
        || async {
            let dead =
                process_metric(ficus.admin, "ficus_events_dead_lettered_total", "kafka").await;
            let ok = process_metric(ficus.admin, "ficus_events_delivered_total", "kafka").await;
            let odd = process_metric(ficus.admin, "ficus_events_dead_lettered_total", "odd").await;
            (dead == 1.0 && ok == 2.0 && odd == 3.0).then_some(())
        },
    )
    .await;
    let records = read_topic(&tansu, "events.shop.order.created", 2).await;
    let customers: Vec<String> = kafka_arrivals(&records)
        .into_iter()
        .map(|(_, _, c)| c)
        .collect();
    assert_eq!(
        customers,
        ["a-0", "a-1"],
        "the text event went to dead letters"
    );
    // Unused partitions of the 2 stay empty: both events share key `a`.
    let per_partition: BTreeMap<i32, usize> =
        records.iter().fold(BTreeMap::new(), |mut m, (p, _)| {
            *m.entry(*p).or_default() += 1;
            m
        });
    assert_eq!(per_partition.len(), 1, "{per_partition:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_sasl_scram_authenticates_and_a_refused_login_is_retried() {
    let Some(mut tansu) = Tansu::new("kafka_sasl_scram") else {
        return;
    };
    // Users and topics are made while the broker still lets anyone in, then it restarts on
    // the same database requiring SCRAM.
    tansu.start().await;
    tansu.create_topic("shop-events", 1).await;
    tansu.create_user("ficus", "s3cret");
    tansu.kill_9();
    tansu.authentication = true;
    tansu.sasl = Some(SaslConfig::ScramSha512(Credentials::new(
        "ficus".into(),
        "s3cret".into(),
    )));
    tansu.start().await;
    assert!(
        try_client(&tansu.addr(), None, None).await.is_none(),
        "the broker refuses clients that do not authenticate"
    );
    let upstream = shop().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let addr = tansu.addr();
    let sinks = format!(
        "  good: {{ type: kafka, brokers: [\"{addr}\"], topic: shop-events, sasl: {{ mechanism: scram-sha-512, user: ficus, password: s3cret }}, timeout: 2s }}\n  wrong: {{ type: kafka, brokers: [\"{addr}\"], topic: shop-events, sasl: {{ mechanism: scram-sha-512, user: ficus, password: nope }}, timeout: 1s }}"
    );
    let ficus = Ficus::start_yaml(&ficus_yaml(
        upstream.addr,
        &sinks,
        &dir.path().join("outbox"),
    ))
    .await;
    for n in 0..3 {
        let resp = send(ficus.addr, order("k", &format!("k-{n}"), 0)).await;
        assert_eq!(resp.status(), 201);
    }
    eventually(
        WAIT,
        "3 delivered with the right password, 3 waiting with the wrong one",
        || async {
            let good = metric(&ficus, "ficus_events_delivered_total", "good").await;
            let waiting = metric(&ficus, "ficus_outbox_pending_events", "wrong").await;
            let failed = metric(&ficus, "ficus_event_delivery_failures_total", "wrong").await;
            (good == 3.0 && waiting == 3.0 && failed >= 2.0).then_some(())
        },
    )
    .await;
    assert_eq!(
        metric(&ficus, "ficus_events_dead_lettered_total", "wrong").await,
        0.0,
        "a refused login is the operator's to fix: retried, never dead-lettered"
    );
    let records = read_topic(&tansu, "shop-events", 1).await;
    assert_in_order_per_key(&kafka_arrivals(&records), &["k".to_string()], 3);
}

/// A TLS front for tansu (which serves no TLS itself): accepts TLS on `listener` with the
/// server certificate, requires a client certificate signed by `ca`, and pipes each connection
/// to tansu in plaintext.
fn tls_front(
    listener: tokio::net::TcpListener,
    ca: &Path,
    cert: &Path,
    key: &Path,
    backend: String,
) -> tokio::task::JoinHandle<()> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).expect("ca") {
        roots.add(c.expect("ca cert")).expect("root");
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .expect("verifier");
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .expect("cert")
        .collect::<Result<_, _>>()
        .expect("certs");
    let key = PrivateKeyDer::from_pem_file(key).expect("key");
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let backend = backend.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut plain) = tokio::net::TcpStream::connect(&backend).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_over_mutual_tls_and_an_untrusted_broker_is_retried() {
    let Some(mut tansu) = Tansu::new("kafka_over_mutual_tls") else {
        return;
    };
    let certs = tempfile::tempdir().expect("tempdir");
    let (ca, server_cert, server_key, client_cert, client_key) = pki(certs.path());
    let other = tempfile::tempdir().expect("tempdir");
    let (other_ca, ..) = pki(other.path());
    // Clients reach tansu only through the TLS front, which tansu advertises as itself.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the TLS front");
    tansu.advertised = Some(listener.local_addr().expect("addr").port());
    let _front = tls_front(listener, &ca, &server_cert, &server_key, tansu.addr());
    let files = |ca: &Path| ficus::config::UpstreamTls {
        ca: Some(ca.to_path_buf()),
        cert: Some(client_cert.clone()),
        key: Some(client_key.clone()),
    };
    let client_tls = ficus::proxy::client::tls_config("test", true, &files(&ca)).expect("tls");
    tansu.client_tls = Some(Arc::new(client_tls));
    tansu.start().await;
    tansu.create_topic("shop-events", 2).await;

    let upstream = shop().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let front = tansu.client_addr();
    let tls = |ca: &Path| {
        format!(
            "{{ ca: \"{}\", cert: \"{}\", key: \"{}\" }}",
            ca.display(),
            client_cert.display(),
            client_key.display()
        )
    };
    let sinks = format!(
        "  secure: {{ type: kafka, brokers: [\"{front}\"], topic: shop-events, tls: {}, timeout: 2s }}\n  untrusted: {{ type: kafka, brokers: [\"{front}\"], topic: shop-events, tls: {}, timeout: 1s }}",
        tls(&ca),
        tls(&other_ca)
    );
    let ficus = Ficus::start_yaml(&ficus_yaml(
        upstream.addr,
        &sinks,
        &dir.path().join("outbox"),
    ))
    .await;
    for n in 0..3 {
        let resp = send(ficus.addr, order("k", &format!("k-{n}"), 0)).await;
        assert_eq!(resp.status(), 201);
    }
    eventually(
        WAIT,
        "3 delivered over TLS, 3 waiting for a broker the sink does not trust",
        || async {
            let secure = metric(&ficus, "ficus_events_delivered_total", "secure").await;
            let waiting = metric(&ficus, "ficus_outbox_pending_events", "untrusted").await;
            let failed = metric(&ficus, "ficus_event_delivery_failures_total", "untrusted").await;
            (secure == 3.0 && waiting == 3.0 && failed >= 2.0).then_some(())
        },
    )
    .await;
    assert_eq!(
        metric(&ficus, "ficus_events_dead_lettered_total", "untrusted").await,
        0.0,
        "an untrusted certificate is the operator's to fix: retried, never dead-lettered"
    );
    let records = read_topic(&tansu, "shop-events", 2).await;
    assert_partitioned_by_key(&records, 2);
    assert_in_order_per_key(&kafka_arrivals(&records), &["k".to_string()], 3);
}
