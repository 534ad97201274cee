//! Delivery throughput of each sink, from a full outbox to a broker on this machine, at two
//! batch sizes, beside the broker's own throughput where a tool for it is installed
//! (issue 4, point 7). `benches/README.md` has a run's figures and how to read them.
//!
//! ```text
//! cargo run --release --example sink_bench                     # every sink, batches 10 and 1000
//! cargo run --release --example sink_bench -- --sinks redis,kafka --batches 1,1000 --events 20000
//! bash benches/load/sinks.sh                                   # waits for a quiet machine first
//! ```
//!
//! One outbox (in a temporary directory) is filled once with `--events` CloudEvents through
//! the library's API (`Outbox::append` + `flush`): a ~300-byte JSON order as data, partition
//! keys `ord-00000`.. cycling over `--keys`. Each (sink, batch size) pair gets its own cursor
//! (a cursor that never moves keeps every segment, so each new one starts at the first event)
//! and its own destination (file, stream, queue, topic). Per pair:
//!
//! 1. the sink is built from a YAML config as `ficus run` builds it, and one warm-up event is
//!    sent through `Sink::send` directly (the connection and, for NATS, the stream are made);
//! 2. a `Dispatcher` with that batch size runs until its `progress` watch (the committed
//!    cursor) reaches the end of the outbox; the time from its start to there gives events/s;
//! 3. the destination is checked to hold `--events` + 1 messages (XLEN, stream info, queue
//!    length, topic offsets and tansu's stored rows, lines, events counted by the receiver),
//!    so a figure cannot lie.
//!
//! Each broker is started here from its binary on an ephemeral port with its data in a
//! temporary directory, in its own process group (killed at the end); a missing binary skips
//! that sink with a loud message. CPU is read from `/proc` (utime + stime, 10 ms ticks): this
//! process (the dispatcher, the sink's client, the outbox reader; nothing else runs in it while
//! a pair is measured), the broker's process group, and the whole machine, whose remainder is
//! shown as `other` (work of other processes during the run). Before each measurement the
//! machine is waited on until other processes use under `--max-other` percent of a core
//! (`--wait-idle` seconds at most); a measurement during which they used more is disturbed and
//! made again (`--retries`, to fresh destinations and a fresh cursor), the least disturbed kept.
//!
//! Native figures, same broker, same batch size: `redis-benchmark -c 1 -P B` with the very
//! XADD the sink sends; `tansu perf ... produce --batch-size B` (rate read from the rows tansu
//! stored while it runs, with `sqlite3`: its records do not show in ListOffsets); for `file`,
//! the same JSON Lines written and `fdatasync`ed per batch by a plain loop. No NATS
//! (`nats bench`) or RabbitMQ (PerfTest) tool is installed here.

use std::convert::Infallible;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use clap::Parser;
use ficus::config::Config;
use ficus::dispatch::{Dispatcher, Retry};
use ficus::events::{CloudEvent, Envelope};
use ficus::metrics::Metrics;
use ficus::outbox::{Durability, Outbox, OutboxMetrics, OutboxSettings};
use ficus::sinks::Sink;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tokio_util::sync::CancellationToken;

const ALL_SINKS: &str = "file,http,http-batch,nats,redis,amqp,kafka";
/// How long a broker may take to accept clients (a RabbitMQ node takes about 5 s).
const BROKER_START: Duration = Duration::from_secs(60);

#[derive(Parser, Debug)]
#[command(about = "Events/s each sink delivers from a full outbox to a local broker")]
struct Args {
    /// Events in the outbox, delivered by every (sink, batch size) pair.
    #[arg(long, default_value_t = 50_000)]
    events: u64,
    /// Batch sizes (the dispatcher's `batch_size`), comma-separated. 1000 is what ficus runs
    /// (`dispatch/fleet.rs`); 10 makes each send's fixed cost (a round trip, an fsync, a
    /// confirm) show, as when events trickle in and batches stay small.
    #[arg(long, default_value = "10,1000", value_delimiter = ',')]
    batches: Vec<usize>,
    /// Distinct partition keys, cycled in order (so a batch of up to this many has distinct keys).
    #[arg(long, default_value_t = 1000)]
    keys: u64,
    /// Sinks to measure, comma-separated: file, http, http-batch, nats, redis, amqp, kafka.
    #[arg(long, default_value = ALL_SINKS, value_delimiter = ',')]
    sinks: Vec<String>,
    /// Partitions of each Kafka topic (the keys spread over them by the sink's murmur2).
    #[arg(long, default_value_t = 3)]
    kafka_partitions: i32,
    /// A measurement during which other processes used more than this much CPU (percent of
    /// one core, over the run) is disturbed: it is made again, up to `--retries` times, and
    /// the least disturbed one is kept.
    #[arg(long, default_value_t = 20.0)]
    max_other: f64,
    /// How many times a disturbed measurement is made again, at most.
    #[arg(long, default_value_t = 2)]
    retries: u32,
    /// Before each measurement, wait up to this many seconds for other processes to use less
    /// than `--max-other` (measured over 1 s).
    #[arg(long, default_value_t = 120)]
    wait_idle: u64,
    /// Skip the brokers' native benchmarks.
    #[arg(long)]
    no_native: bool,
    /// Internal: run the HTTP receiver (a child process of the benchmark).
    #[arg(long, hide = true)]
    serve_http: bool,
}

// ---------------------------------------------------------------------------------------------
// Events

/// A ~300-byte JSON order, as a rule would put in `data`.
fn order_data(i: u64, key: &str) -> serde_json::Value {
    let items: Vec<serde_json::Value> = (0..3)
        .map(|n| serde_json::json!({"sku": format!("SKU-{:06}", (i * 7 + n) % 1_000_000), "qty": 1 + n, "price": 19.99}))
        .collect();
    let mut data = serde_json::json!({
        "id": key,
        "customer_id": format!("c-{:06}", i % 100_000),
        "items": items,
        "total": 119.94,
        "currency": "EUR",
        "note": "",
    });
    let len = serde_json::to_vec(&data).map_or(0, |v| v.len());
    data["note"] = serde_json::Value::String("x".repeat(300usize.saturating_sub(len)));
    data
}

/// Built through serde, so that an attribute added to `CloudEvent` later needs no change here.
fn event(i: u64, keys: u64) -> CloudEvent {
    let key = format!("ord-{:05}", i % keys.max(1));
    let time = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
    serde_json::from_value(serde_json::json!({
        "specversion": "1.0",
        "id": uuid::Uuid::now_v7().to_string(),
        "source": "/bench/shop",
        "type": "shop.order.created",
        "time": time,
        "subject": key,
        "datacontenttype": "application/json",
        "partitionkey": key,
        "ficusupstream": "monolith",
        "data": order_data(i, &key),
    }))
    .expect("a valid CloudEvent")
}

async fn fill(outbox: &Outbox, n: u64, keys: u64) -> (Duration, u64) {
    let started = Instant::now();
    let mut bytes = 0u64;
    let mut i = 0;
    while i < n {
        let chunk: Vec<Bytes> = (i..n.min(i + 1000))
            .map(|i| {
                let payload = Envelope {
                    sinks: None,
                    rule: "bench".into(),
                    event: event(i, keys),
                }
                .encode();
                bytes += payload.len() as u64;
                payload
            })
            .collect();
        i += chunk.len() as u64;
        outbox.append(chunk).expect("append to the outbox");
    }
    outbox.flush().await.expect("flush the outbox");
    (started.elapsed(), bytes / n.max(1))
}

// ---------------------------------------------------------------------------------------------
// CPU accounting from /proc (utime + stime, in USER_HZ ticks of 10 ms)

const TICK: f64 = 0.01;

/// (pgrp, utime + stime in ticks) of one process.
fn proc_stat(pid: &str) -> Option<(u32, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = text.get(text.rfind(')')? + 2..)?.split(' ').collect();
    let pgrp = fields.get(2)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((pgrp, utime + stime))
}

fn self_cpu() -> f64 {
    proc_stat("self").map_or(0.0, |(_, t)| t as f64 * TICK)
}

/// CPU seconds of every live process in process group `pgid`.
fn group_cpu(pgid: u32) -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| name.bytes().all(|b| b.is_ascii_digit()))
        .filter_map(|pid| proc_stat(&pid))
        .filter(|(pgrp, _)| *pgrp == pgid)
        .map(|(_, t)| t as f64 * TICK)
        .sum()
}

/// Busy CPU seconds of the whole machine (all cores), from the `cpu` line of /proc/stat.
fn machine_busy() -> f64 {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().next() else {
        return 0.0;
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: busy = all but idle and iowait.
    let busy: u64 = v
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, x)| x)
        .sum();
    busy as f64 * TICK
}

#[derive(Clone, Copy)]
struct Cpu {
    own: f64,
    broker: f64,
    machine: f64,
}

impl Cpu {
    fn now(pgid: Option<u32>) -> Cpu {
        Cpu {
            own: self_cpu(),
            broker: pgid.map_or(0.0, group_cpu),
            machine: machine_busy(),
        }
    }

    fn since(self, start: Cpu) -> Cpu {
        Cpu {
            own: self.own - start.own,
            broker: self.broker - start.broker,
            machine: self.machine - start.machine,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Brokers

fn find_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    dirs.extend(["/usr/sbin", "/usr/local/sbin", "/usr/local/bin", "/usr/bin"].map(PathBuf::from));
    if let Some(home) = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
    {
        dirs.push(home.join("bin"));
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("an ephemeral port")
        .port()
}

fn skip_loudly(sink: &str, why: &str) {
    eprintln!(
        "\n################################################################\n\
         SKIPPED sink `{sink}`: {why}\n\
         ################################################################\n"
    );
}

/// A broker process (or the HTTP receiver) in its own process group, killed (SIGKILL to the
/// group) when dropped; its data directory goes with it.
struct Broker {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Broker {
    fn spawn(mut cmd: Command, port: u16, dir: tempfile::TempDir) -> Broker {
        let log = std::fs::File::create(dir.path().join("broker.log")).expect("broker log");
        cmd.process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        Broker { child, port, dir }
    }

    fn pgid(&self) -> u32 {
        self.child.id()
    }

    fn log_tail(&self) -> String {
        let mut text = String::new();
        for entry in walk(self.dir.path()) {
            if entry.extension().is_some_and(|e| e == "log") {
                text.push_str(&std::fs::read_to_string(&entry).unwrap_or_default());
            }
        }
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Polls `ready` until it answers true, for at most [`BROKER_START`].
    async fn wait<F, Fut>(&mut self, what: &str, mut ready: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{what} exited at start ({status}):\n{}", self.log_tail());
            }
            if ready().await {
                eprintln!(
                    "{what} ready on port {} in {:.1?}",
                    self.port,
                    started.elapsed()
                );
                return;
            }
            assert!(
                started.elapsed() < BROKER_START,
                "{what} not ready within {BROKER_START:?}:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-9", "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.wait();
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

async fn tcp_ok(port: u16) -> bool {
    tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_ok()
}

async fn start_nats() -> Result<Broker, String> {
    let bin = find_binary("nats-server").ok_or("`nats-server` is not installed")?;
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let mut cmd = Command::new(bin);
    cmd.args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(dir.path().join("jetstream"))
        .arg("-l")
        .arg(dir.path().join("nats.log"));
    let mut b = Broker::spawn(cmd, port, dir);
    let url = format!("nats://127.0.0.1:{port}");
    b.wait("nats-server", || async {
        async_nats::connect(url.as_str()).await.is_ok()
    })
    .await;
    Ok(b)
}

async fn start_redis() -> Result<Broker, String> {
    let bin = find_binary("redis-server").ok_or("`redis-server` is not installed")?;
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let mut cmd = Command::new(bin);
    // appendonly with the default `appendfsync everysec`, as the integration tests run it.
    cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--dir"])
        .arg(dir.path())
        .args(["--appendonly", "yes", "--save", ""]);
    let mut b = Broker::spawn(cmd, port, dir);
    b.wait("redis-server", || async {
        redis_conn(port).await.is_some()
    })
    .await;
    Ok(b)
}

async fn start_rabbit() -> Result<Broker, String> {
    // Debian's /usr/sbin/rabbitmq-server switches to the rabbitmq user: use the script it wraps.
    let bin = [PathBuf::from("/usr/lib/rabbitmq/bin/rabbitmq-server")]
        .into_iter()
        .find(|p| p.is_file())
        .or_else(|| find_binary("rabbitmq-server"))
        .ok_or("`rabbitmq-server` is not installed")?;
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let dist_port = free_port();
    let d = dir.path();
    let conf = d.join("rabbitmq.conf");
    std::fs::write(
        &conf,
        format!("listeners.tcp.local = 127.0.0.1:{port}\nloopback_users = none\n"),
    )
    .expect("write rabbitmq.conf");
    std::fs::write(d.join("env.conf"), "").expect("write env.conf");
    std::fs::write(d.join("enabled_plugins"), "[].\n").expect("write enabled_plugins");
    let node = format!("ficus-bench-{}@localhost", uuid::Uuid::now_v7().simple());
    let mut cmd = Command::new(bin);
    cmd.env("HOME", d)
        .env("RABBITMQ_CONF_ENV_FILE", d.join("env.conf"))
        .env("RABBITMQ_NODENAME", &node)
        .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
        .env("RABBITMQ_NODE_PORT", port.to_string())
        .env("RABBITMQ_DIST_PORT", dist_port.to_string())
        .env("RABBITMQ_CONFIG_FILE", &conf)
        .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
        .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
        .env("RABBITMQ_LOG_BASE", d.join("log"))
        .env("RABBITMQ_PID_FILE", d.join("node.pid"))
        .env("ERL_EPMD_ADDRESS", "127.0.0.1")
        .env(
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
            "-kernel inet_dist_use_interface {127,0,0,1}",
        );
    let mut b = Broker::spawn(cmd, port, dir);
    let url = amqp_url(port);
    b.wait("rabbitmq-server", || async {
        lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
            .await
            .is_ok()
    })
    .await;
    Ok(b)
}

async fn start_tansu() -> Result<Broker, String> {
    let bin = find_binary("tansu")
        .ok_or("`tansu` is not installed (cargo install tansu --locked --features libsql)")?;
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let url = format!("tcp://127.0.0.1:{port}");
    let mut cmd = Command::new(bin);
    cmd.current_dir(dir.path())
        .args(["broker", "--listener-url", &url])
        .args(["--advertised-listener-url", &url])
        .args(["--storage-engine", "sqlite://tansu.db", "--silent"])
        .env("RUST_LOG", "warn");
    let mut b = Broker::spawn(cmd, port, dir);
    b.wait("tansu", || async { kafka_client(port).await.is_some() })
        .await;
    Ok(b)
}

/// The receiver of the `http` sink, in a child process (its CPU is not the sink's): answers
/// `POST` with 200 after reading the body, counts the events (one per request, or the
/// elements of a batch), and answers `GET /count` with the count.
async fn start_http_receiver() -> Result<Broker, String> {
    let exe = std::env::current_exe().map_err(|e| format!("own executable: {e}"))?;
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let mut cmd = Command::new(exe);
    cmd.arg("--serve-http")
        .env("SINK_BENCH_PORT", port.to_string());
    let mut b = Broker::spawn(cmd, port, dir);
    b.wait("HTTP receiver", || tcp_ok(port)).await;
    Ok(b)
}

fn serve_http() {
    let port: u16 = std::env::var("SINK_BENCH_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .expect("SINK_BENCH_PORT");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let count = Arc::new(AtomicU64::new(0));
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind the receiver's port");
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let count = count.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                    let count = count.clone();
                    async move {
                        let batch =
                            req.headers()
                                .get(http::header::CONTENT_TYPE)
                                .is_some_and(|v| {
                                    v.as_bytes().starts_with(b"application/cloudevents-batch")
                                });
                        let get = req.method() == http::Method::GET;
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        if get {
                            let n = count.load(Ordering::Relaxed).to_string();
                            return Ok::<_, Infallible>(hyper::Response::new(Full::new(
                                Bytes::from(n),
                            )));
                        }
                        let n = if batch {
                            serde_json::from_slice::<Vec<serde_json::Value>>(&body)
                                .map_or(0, |v| v.len() as u64)
                        } else {
                            1
                        };
                        count.fetch_add(n, Ordering::Relaxed);
                        Ok(hyper::Response::new(Full::new(Bytes::new())))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Clients that count what a broker holds

async fn redis_conn(port: u16) -> Option<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/0")).ok()?;
    let mut conn = client.get_multiplexed_async_connection().await.ok()?;
    let pong: String = redis::cmd("PING").query_async(&mut conn).await.ok()?;
    (pong == "PONG").then_some(conn)
}

async fn kafka_client(port: u16) -> Option<rskafka::client::Client> {
    let build = rskafka::client::ClientBuilder::new(vec![format!("127.0.0.1:{port}")])
        .backoff_config(rskafka::BackoffConfig {
            deadline: Some(Duration::from_secs(1)),
            ..Default::default()
        })
        .build();
    tokio::time::timeout(Duration::from_secs(2), build)
        .await
        .ok()?
        .ok()
}

async fn kafka_count(port: u16, topic: &str, partitions: i32) -> u64 {
    let client = kafka_client(port).await.expect("Kafka client");
    let mut total = 0;
    for p in 0..partitions {
        let pc = client
            .partition_client(
                topic,
                p,
                rskafka::client::partition::UnknownTopicHandling::Retry,
            )
            .await
            .expect("partition client");
        let end = pc
            .get_offset(rskafka::client::partition::OffsetAt::Latest)
            .await
            .expect("high watermark");
        total += u64::try_from(end).unwrap_or(0);
    }
    total
}

/// Records of `topic` stored in tansu's SQLite database (through the `sqlite3` tool, when
/// installed): what `tansu perf` produced is not seen by a ListOffsets request.
fn tansu_rows(broker: &Broker, topic: &str) -> Option<u64> {
    let sqlite = find_binary("sqlite3")?;
    let out = Command::new(sqlite)
        .arg(broker.dir.path().join("tansu.db"))
        .arg(format!(
            "select count(*) from record r join topition p on r.topition = p.id \
             join topic t on p.topic = t.id where t.name = '{topic}'"
        ))
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

fn amqp_url(port: u16) -> String {
    format!("amqp://guest:guest@127.0.0.1:{port}/%2f")
}

async fn amqp_channel(port: u16) -> (lapin::Connection, lapin::Channel) {
    let conn = lapin::Connection::connect(&amqp_url(port), lapin::ConnectionProperties::default())
        .await
        .expect("AMQP client connects");
    let channel = conn.create_channel().await.expect("AMQP channel");
    (conn, channel)
}

/// Declares the durable queue (or, `passive`, only looks it up); its message count.
async fn amqp_queue(port: u16, queue: &str, passive: bool) -> u64 {
    let (conn, channel) = amqp_channel(port).await;
    let q = channel
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                passive,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("queue.declare");
    let _ = conn.close(200, "bye".into()).await;
    u64::from(q.message_count())
}

async fn http_count(port: u16) -> u64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the receiver");
    tcp.write_all(b"GET /count HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n")
        .await
        .expect("ask the count");
    let mut text = String::new();
    tcp.read_to_string(&mut text).await.expect("read the count");
    text.rsplit("\r\n\r\n")
        .next()
        .and_then(|b| b.trim().parse().ok())
        .expect("a count")
}

// ---------------------------------------------------------------------------------------------
// One (sink, batch size) pair

/// Where a pair's events go, and how to count them there.
enum Target<'a> {
    File(PathBuf),
    Http(&'a Broker),
    Nats(&'a Broker, String),
    Redis(&'a Broker, String),
    Amqp(&'a Broker, String),
    Kafka(&'a Broker, String, i32),
}

impl Target<'_> {
    fn broker(&self) -> Option<&Broker> {
        match self {
            Target::File(_) => None,
            Target::Http(b)
            | Target::Nats(b, _)
            | Target::Redis(b, _)
            | Target::Amqp(b, _)
            | Target::Kafka(b, _, _) => Some(b),
        }
    }

    async fn count(&self) -> u64 {
        match self {
            Target::File(path) => std::fs::read(path)
                .map(|b| b.iter().filter(|&&c| c == b'\n').count() as u64)
                .unwrap_or(0),
            Target::Http(b) => http_count(b.port).await,
            Target::Nats(b, stream) => {
                let client = async_nats::connect(format!("nats://127.0.0.1:{}", b.port))
                    .await
                    .expect("NATS client");
                let js = async_nats::jetstream::new(client);
                let mut s = js.get_stream(stream).await.expect("stream exists");
                s.info().await.expect("stream info").state.messages
            }
            Target::Redis(b, key) => {
                let mut conn = redis_conn(b.port).await.expect("Redis client");
                redis::cmd("XLEN")
                    .arg(key)
                    .query_async(&mut conn)
                    .await
                    .expect("XLEN")
            }
            Target::Amqp(b, queue) => amqp_queue(b.port, queue, true).await,
            Target::Kafka(b, topic, partitions) => {
                let offsets = kafka_count(b.port, topic, *partitions).await;
                // The records themselves, where they can be counted, must agree.
                match tansu_rows(b, topic) {
                    Some(rows) if rows != offsets => {
                        eprintln!("!!! {topic}: offsets say {offsets} records, tansu's database holds {rows}");
                        rows.min(offsets)
                    }
                    _ => offsets,
                }
            }
        }
    }
}

struct Row {
    sink: String,
    batch: usize,
    /// Seconds to the committed cursor reaching the end, and to the last delivery.
    committed: f64,
    delivered: f64,
    cpu: Cpu,
    failures: u64,
    verified: Result<u64, String>,
    native: Option<Native>,
    /// Measurements made (more than one when the machine was busy).
    tries: u32,
}

impl Row {
    /// CPU other processes used during the run, in percent of one core.
    fn other_percent(&self) -> f64 {
        (self.cpu.machine - self.cpu.own - self.cpu.broker).max(0.0) / self.committed * 100.0
    }
}

#[derive(Clone)]
struct Native {
    events_per_s: f64,
    broker_us: Option<f64>,
    tool: String,
}

/// The sink's config entry, parsed as `ficus run` parses it.
fn build_sink(name: &str, entry: &str) -> Arc<dyn Sink> {
    let yaml = format!(
        "listen: {{ address: \"127.0.0.1:0\" }}\nupstreams:\n  monolith: {{ url: \"http://127.0.0.1:9\" }}\nsinks:\n  {name}: {entry}\n"
    );
    let config = Config::from_yaml(&yaml, "sink_bench.yaml")
        .unwrap_or_else(|e| panic!("sink config for {name}: {e}\n{yaml}"));
    let sink = config
        .sinks
        .iter()
        .find(|s| s.name == name)
        .expect("the sink is in the config");
    ficus::sinks::build(&sink.kind).unwrap_or_else(|e| panic!("build sink {name}: {e}"))
}

#[allow(clippy::too_many_arguments)]
async fn run_pair(
    outbox: &Outbox,
    metrics: &Metrics,
    (kind, batch, name): (&str, usize, &str),
    entry: &str,
    target: &Target<'_>,
    expected: u64,
) -> Row {
    let name = name.to_string();
    let sink = build_sink(&name, entry);
    // The HTTP receiver serves both batch sizes: what it counted before is not this pair's.
    let before = match target {
        Target::Http(_) => target.count().await,
        _ => 0,
    };
    // Warm-up: connect (and create a NATS stream) before the clock starts.
    let warm = [event(0, 1)];
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = sink.send(&warm).await;
        match r.failure {
            None => break,
            Some(f) if Instant::now() > deadline => panic!("{name}: warm-up failed: {}", f.message),
            Some(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let sink_metrics = metrics.for_sink(&name);
    let delivered = sink_metrics.delivered.clone();
    let failures = sink_metrics.failures.clone();
    let (progress, mut watch) = tokio::sync::watch::channel(0u64);
    let dispatcher = Dispatcher {
        name: name.clone(),
        sink,
        outbox: outbox.clone(),
        retry: Retry {
            initial: Duration::from_millis(50),
            max: Duration::from_secs(1),
        },
        metrics: sink_metrics,
        batch_size: batch,
        progress,
    };
    let end = outbox.durable_end();
    let pgid = target.broker().map(Broker::pgid);
    let stop = CancellationToken::new();
    let cpu0 = Cpu::now(pgid);
    let started = Instant::now();
    let task = tokio::spawn(dispatcher.run(stop.clone()));
    let mut delivered_at = None;
    loop {
        if delivered_at.is_none() && delivered.get() >= expected {
            delivered_at = Some(started.elapsed());
        }
        if *watch.borrow_and_update() >= end {
            break;
        }
        tokio::select! {
            changed = watch.changed() => changed.expect("dispatcher running"),
            _ = tokio::time::sleep(Duration::from_millis(2)) => {}
        }
    }
    let committed = started.elapsed();
    let cpu = Cpu::now(pgid).since(cpu0);
    stop.cancel();
    let _ = task.await;
    let count = target.count().await - before;
    let verified = if count == expected + 1 {
        Ok(count)
    } else {
        Err(format!(
            "{name}: the destination holds {count} messages, expected {} ({expected} + 1 warm-up)",
            expected + 1
        ))
    };
    Row {
        sink: kind.to_string(),
        batch,
        committed: committed.as_secs_f64(),
        delivered: delivered_at.unwrap_or(committed).as_secs_f64(),
        cpu,
        failures: failures.get(),
        verified,
        native: None,
        tries: 1,
    }
}

/// Waits until processes other than this one and `pgid` use less than `max_other` percent of
/// one core (over 1 s), for at most `wait`. False when the machine stayed busy.
async fn wait_quiet(pgid: Option<u32>, max_other: f64, wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    let mut said = false;
    loop {
        let start = Cpu::now(pgid);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let used = Cpu::now(pgid).since(start);
        let other = (used.machine - used.own - used.broker).max(0.0) * 100.0;
        if other < max_other {
            return true;
        }
        if Instant::now() >= deadline {
            eprintln!("machine still busy ({other:.0}% of a core used by other processes): measuring anyway");
            return false;
        }
        if !said {
            eprintln!("other processes use {other:.0}% of a core; waiting up to {wait:?} for < {max_other}%");
            said = true;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Native baselines

/// `redis-benchmark` with one connection and `batch` commands pipelined per round trip (as the
/// sink's pipelined batch), sending the XADD the sink sends for a sample event.
fn redis_native(broker: &Broker, n: u64, batch: usize, sample: &CloudEvent) -> Option<Native> {
    let bin = find_binary("redis-benchmark")?;
    let key = format!("native:b{batch}");
    let mut args = vec!["XADD".to_string(), key, "*".to_string()];
    for (name, value) in sample.attributes() {
        args.push(name.to_string());
        args.push(value);
    }
    args.push("datacontenttype".into());
    args.push("application/json".into());
    args.push("data".into());
    args.push(String::from_utf8(sample.data_bytes()?.to_vec()).ok()?);
    let cpu0 = group_cpu(broker.pgid());
    let out = Command::new(bin)
        .args(["-p", &broker.port.to_string(), "-c", "1"])
        .args(["-n", &n.to_string(), "-P", &batch.to_string(), "--csv"])
        .args(&args)
        .output()
        .ok()?;
    let cpu = group_cpu(broker.pgid()) - cpu0;
    let text = String::from_utf8_lossy(&out.stdout);
    let rps: f64 = text
        .lines()
        .nth(1)?
        .rsplit("\",\"")
        .nth(6)?
        .trim_matches('"')
        .parse()
        .ok()?;
    Some(Native {
        events_per_s: rps,
        broker_us: Some(cpu / n as f64 * 1e6),
        tool: format!("redis-benchmark -c 1 -P {batch}"),
    })
}

/// `tansu perf TOPIC produce` into a fresh one-partition topic for 6 s, one producer, records
/// of the size the sink sends; the rate is read from the topic's offsets between 2 s and 5 s.
async fn kafka_native(broker: &Broker, batch: usize, record: usize) -> Result<Native, String> {
    let bin = find_binary("tansu").ok_or("no `tansu`")?;
    let topic = format!("native-b{batch}");
    let url = format!("tcp://127.0.0.1:{}", broker.port);
    let created = Command::new(&bin)
        .args([
            "topic",
            "create",
            "--broker",
            &url,
            "--partitions",
            "1",
            &topic,
        ])
        .output()
        .map_err(|e| format!("tansu topic create: {e}"))?;
    if !created.status.success() {
        return Err(format!(
            "tansu topic create {topic}: {}",
            String::from_utf8_lossy(&created.stderr)
        ));
    }
    let mut child = Command::new(bin)
        .args([
            "perf",
            &topic,
            "--broker",
            &format!("tcp://127.0.0.1:{}", broker.port),
        ])
        .args([
            "produce",
            "--partition",
            "0",
            "--producers",
            "1",
            "--duration",
            "6s",
        ])
        .args(["--batch-size", &batch.to_string()])
        .args(["--record-size", &record.to_string()])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(
            std::fs::File::create(broker.dir.path().join(format!("perf-b{batch}.log")))
                .map_err(|e| e.to_string())?,
        )
        .spawn()
        .map_err(|e| format!("tansu perf: {e}"))?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rows = || tansu_rows(broker, &topic).ok_or("counting tansu's records needs `sqlite3`");
    let (n0, t0, c0) = (rows()?, Instant::now(), group_cpu(broker.pgid()));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (n1, t1, c1) = (rows()?, Instant::now(), group_cpu(broker.pgid()));
    let _ = child.wait();
    let n = n1.saturating_sub(n0);
    if n == 0 {
        return Err(format!(
            "tansu perf produced nothing into {topic} ({n0} then {n1})"
        ));
    }
    Ok(Native {
        events_per_s: n as f64 / (t1 - t0).as_secs_f64(),
        broker_us: Some((c1 - c0) / n as f64 * 1e6),
        tool: format!("tansu perf --batch-size {batch} --record-size {record}"),
    })
}

/// The file sink's work without ficus: the same JSON Lines, written and fdatasynced per batch.
fn file_native(dir: &Path, n: u64, batch: usize, keys: u64) -> Native {
    let path = dir.join(format!("native-b{batch}.jsonl"));
    let lines: Vec<Vec<u8>> = (0..batch as u64)
        .map(|i| {
            let mut l = event(i, keys).to_json();
            l.push(b'\n');
            l
        })
        .collect();
    let buf: Vec<u8> = lines.concat();
    let started = Instant::now();
    let mut done = 0;
    while done < n {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .expect("open");
        f.write_all(&buf).expect("write");
        f.sync_data().expect("fdatasync");
        done += batch as u64;
    }
    let _ = std::fs::remove_file(&path);
    Native {
        events_per_s: done as f64 / started.elapsed().as_secs_f64(),
        broker_us: None,
        tool: format!("write + fdatasync per {batch} lines"),
    }
}

// ---------------------------------------------------------------------------------------------

fn loadavg() -> String {
    let mut s = String::new();
    let _ = std::fs::File::open("/proc/loadavg").and_then(|mut f| f.read_to_string(&mut s));
    s.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

fn main() {
    let args = Args::parse();
    if args.serve_http {
        serve_http();
        return;
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,lapin=off".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(bench(args));
}

async fn bench(mut args: Args) {
    let known: Vec<&str> = ALL_SINKS.split(',').collect();
    for s in &args.sinks {
        assert!(
            known.contains(&s.as_str()),
            "unknown sink `{s}` (known: {ALL_SINKS})"
        );
    }
    let mut seen = std::collections::HashSet::new();
    args.batches.retain(|b| seen.insert(*b));
    let tmp = tempfile::tempdir().expect("tempdir");
    let n = args.events;
    eprintln!(
        "sink_bench: {n} events, batches {:?}, {} partition keys, sinks {:?}; {} CPUs, load average {}",
        args.batches,
        args.keys,
        args.sinks,
        std::thread::available_parallelism().map_or(0, |c| c.get()),
        loadavg()
    );

    let mut settings = OutboxSettings::new(tmp.path().join("outbox"));
    settings.durability = Durability::Async;
    settings.max_bytes = 8 << 30;
    let outbox = Outbox::open(settings, OutboxMetrics::unregistered()).expect("open the outbox");
    // A cursor that never moves: no segment is ever deleted, so every measurement's new
    // cursor starts at the first event.
    outbox.reader("keeper").expect("register a cursor");
    let (took, avg) = fill(&outbox, n, args.keys).await;
    eprintln!(
        "outbox filled: {n} events of {avg} bytes (envelope) in {:.2} s ({:.0} events/s)",
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64()
    );
    let sample = event(0, args.keys);
    let data_len = sample.data_bytes().map_or(0, |d| d.len());
    let record_len = data_len
        + sample
            .attributes()
            .iter()
            .map(|(k, v)| 3 + k.len() + v.len())
            .sum::<usize>()
        + "content-type".len()
        + "application/json".len();
    eprintln!("event data: {data_len} bytes; a Kafka record ~{record_len} bytes with its headers");

    let registry = prometheus::Registry::new();
    let metrics = Metrics::new(&registry).expect("metrics");
    let mut rows: Vec<Row> = Vec::new();
    let mut skipped: Vec<(String, String)> = Vec::new();

    for kind in args.sinks.clone() {
        let broker = match kind.as_str() {
            "file" => None,
            "http" | "http-batch" => Some(start_http_receiver().await),
            "nats" => Some(start_nats().await),
            "redis" => Some(start_redis().await),
            "amqp" => Some(start_rabbit().await),
            "kafka" => Some(start_tansu().await),
            _ => unreachable!("checked above"),
        };
        let broker = match broker.transpose() {
            Ok(b) => b,
            Err(why) => {
                skip_loudly(&kind, &why);
                skipped.push((kind.clone(), why));
                continue;
            }
        };
        for &batch in &args.batches {
            let b = broker.as_ref();
            let mut kept: Option<Row> = None;
            for attempt in 0..=args.retries {
                // A retry goes to fresh destinations (and a fresh cursor): counts stay exact.
                let tag = match attempt {
                    0 => format!("b{batch}"),
                    n => format!("b{batch}r{n}"),
                };
                let name = format!("{}_{tag}", kind.replace('-', "_"));
                let (entry, target) = destination(&kind, &tag, &name, b, tmp.path(), &args).await;
                // What the previous measurement left (fsyncs, broker housekeeping) settles, and
                // other work on the machine is waited out.
                tokio::time::sleep(Duration::from_millis(300)).await;
                let wait = Duration::from_secs(args.wait_idle);
                wait_quiet(b.map(Broker::pgid), args.max_other, wait).await;
                let row =
                    run_pair(&outbox, &metrics, (&kind, batch, &name), &entry, &target, n).await;
                eprintln!(
                    "{name}: {:.0} events/s ({:.2} s to committed, {:.2} s to delivered), ficus {:.1} µs/event, broker {:.1} µs/event, other processes {:.0}% of a core{}",
                    n as f64 / row.committed,
                    row.committed,
                    row.delivered,
                    row.cpu.own / n as f64 * 1e6,
                    row.cpu.broker / n as f64 * 1e6,
                    row.other_percent(),
                    match &row.verified {
                        Ok(c) => format!(", verified: {c} messages"),
                        Err(e) => format!("\n!!! NOT VERIFIED: {e}"),
                    }
                );
                let quiet = row.other_percent() <= args.max_other;
                let tries = attempt + 1;
                kept = Some(match kept {
                    Some(k) if k.other_percent() <= row.other_percent() => Row { tries, ..k },
                    _ => Row { tries, ..row },
                });
                if quiet {
                    break;
                }
                if attempt < args.retries {
                    eprintln!("{name}: disturbed (> {}% of a core used by other processes); measuring again", args.max_other);
                }
            }
            let mut row = kept.expect("at least one measurement");
            if !args.no_native {
                wait_quiet(
                    b.map(Broker::pgid),
                    args.max_other,
                    Duration::from_secs(args.wait_idle),
                )
                .await;
                row.native = match kind.as_str() {
                    "file" => Some(file_native(tmp.path(), n, batch, args.keys)),
                    "redis" => b.and_then(|b| redis_native(b, n, batch, &sample)),
                    "kafka" => match b {
                        Some(b) => kafka_native(b, batch, record_len)
                            .await
                            .map_err(|e| eprintln!("kafka native: {e}"))
                            .ok(),
                        None => None,
                    },
                    _ => None,
                };
            }
            rows.push(row);
        }
    }
    outbox.close().await.expect("close the outbox");
    print_table(&rows, n, &skipped);
}

/// A measurement's sink config entry and destination; `tag` names the destination (stream,
/// queue, topic), `name` the sink (its cursor).
async fn destination<'a>(
    kind: &str,
    tag: &str,
    name: &str,
    b: Option<&'a Broker>,
    tmp: &Path,
    args: &Args,
) -> (String, Target<'a>) {
    match kind {
        "file" => {
            let path = tmp.join(format!("{name}.jsonl"));
            (
                format!("{{ type: file, path: \"{}\" }}", path.display()),
                Target::File(path),
            )
        }
        "http" | "http-batch" => {
            let b = b.expect("receiver");
            let mode = if kind == "http" { "binary" } else { "batch" };
            (
                format!(
                    "{{ type: http, url: \"http://127.0.0.1:{}/events\", mode: {mode} }}",
                    b.port
                ),
                Target::Http(b),
            )
        }
        "nats" => {
            let b = b.expect("broker");
            let stream = format!("BENCH_{}", tag.to_uppercase());
            (
                format!("{{ type: nats, url: \"nats://127.0.0.1:{}\", subject: \"{tag}.{{type}}\", create_stream: {stream} }}", b.port),
                Target::Nats(b, stream),
            )
        }
        "redis" => {
            let b = b.expect("broker");
            let key = format!("bench:{tag}");
            (
                format!(
                    "{{ type: redis, url: \"redis://127.0.0.1:{}/0\", stream: \"{key}\" }}",
                    b.port
                ),
                Target::Redis(b, key),
            )
        }
        "amqp" => {
            let b = b.expect("broker");
            let queue = format!("bench_{tag}");
            amqp_queue(b.port, &queue, false).await;
            (
                format!(
                    "{{ type: amqp, url: \"{}\", exchange: \"\", routing_key: \"{queue}\" }}",
                    amqp_url(b.port)
                ),
                Target::Amqp(b, queue),
            )
        }
        "kafka" => {
            let b = b.expect("broker");
            let topic = format!("bench-{tag}");
            kafka_client(b.port)
                .await
                .expect("Kafka client")
                .controller_client()
                .expect("controller client")
                .create_topic(&topic, args.kafka_partitions, 1, 5_000)
                .await
                .expect("create topic");
            (
                format!(
                    "{{ type: kafka, brokers: [\"127.0.0.1:{}\"], topic: \"{topic}\" }}",
                    b.port
                ),
                Target::Kafka(b, topic, args.kafka_partitions),
            )
        }
        _ => unreachable!("checked above"),
    }
}

fn print_table(rows: &[Row], n: u64, skipped: &[(String, String)]) {
    println!();
    println!(
        "{:<11} {:>5} {:>9} {:>7} {:>8} {:>9} {:>10} {:>9} {:>5} {:>8} {:>9}  native",
        "sink",
        "batch",
        "events/s",
        "wall s",
        "ms/batch",
        "ficus CPU",
        "broker CPU",
        "other CPU",
        "tries",
        "verified",
        "delivered"
    );
    println!(
        "{:<11} {:>5} {:>9} {:>7} {:>8} {:>9} {:>10} {:>9} {:>5} {:>8} {:>9}",
        "", "", "", "", "", "µs/event", "µs/event", "% of core", "", "", "events/s"
    );
    for r in rows {
        let secs = r.committed;
        let batches = n.div_ceil(r.batch as u64) as f64;
        let native = match &r.native {
            Some(nat) => format!(
                "{:.0} events/s{} ({})",
                nat.events_per_s,
                nat.broker_us
                    .map(|us| format!(", broker {us:.1} µs/event"))
                    .unwrap_or_default(),
                nat.tool
            ),
            None => "-".into(),
        };
        println!(
            "{:<11} {:>5} {:>9.0} {:>7.2} {:>8.2} {:>9.1} {:>10} {:>9.0} {:>5} {:>8} {:>9.0}  {}",
            r.sink,
            r.batch,
            n as f64 / secs,
            secs,
            secs / batches * 1e3,
            r.cpu.own / n as f64 * 1e6,
            if r.sink == "file" {
                "-".to_string()
            } else {
                format!("{:.1}", r.cpu.broker / n as f64 * 1e6)
            },
            r.other_percent(),
            r.tries,
            match &r.verified {
                Ok(_) if r.failures == 0 => "yes".to_string(),
                Ok(_) => format!("yes, {} retries", r.failures),
                Err(_) => "NO".to_string(),
            },
            n as f64 / r.delivered,
            native
        );
    }
    for (sink, why) in skipped {
        println!("SKIPPED {sink}: {why}");
    }
    if rows.iter().any(|r| r.verified.is_err()) {
        for r in rows {
            if let Err(e) = &r.verified {
                println!("NOT VERIFIED: {e}");
            }
        }
        std::process::exit(1);
    }
}
