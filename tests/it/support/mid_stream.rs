//! `kill -9` of a broker in the middle of a load, the same run for every broker sink (NATS,
//! Redis, RabbitMQ, Kafka): ficus in front of the test shop with the broker as its only sink,
//! four clients sending fifty orders each in sequence (one partition key per client); once
//! delivery is under way the broker is killed, requests go on being answered and deliveries
//! fail while it is down, then it starts again on the same data. Every event must then be at
//! the broker, nothing pending in the outbox, in the clients' order per key; a duplicate (a
//! resend after a lost acknowledgement) may only be the same event again, and a broker that
//! deduplicates holds none.
//!
//! Each broker says, through [`KilledBroker`], how it is killed and started and how its
//! messages are counted and read back; checks only its binding makes (RabbitMQ's persistent
//! delivery mode, Kafka's partition per key) are made where it reads them.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::brokers::{assert_in_order_per_key, ficus_yaml, load, metric, DELIVERY};
use crate::events::shop;
use crate::support::{eventually, Ficus, WAIT};

/// (event id, partition key, customer) of one message, as the broker keeps it.
pub type Arrival = (String, String, String);

/// A broker process of the test's own, killed and started again on the same data.
pub trait KilledBroker {
    /// How the run names it in messages.
    const NAME: &'static str;
    /// What keeps a message it took through `kill -9`, for the failure message.
    const DURABLE_BY: &'static str;
    /// It drops a resent event itself (NATS JetStream by `Nats-Msg-Id`): it must hold each
    /// event exactly once.
    const DEDUPLICATES: bool;

    /// `kill -9`, returning once the process is gone.
    fn kill_9(&mut self);

    /// Starts it again on the same data, returning once it answers.
    fn start(&mut self) -> impl Future<Output = ()>;

    /// Messages of the load it holds now (0 while it cannot be read).
    fn held(&mut self) -> impl Future<Output = usize>;

    /// Every message of the load in the broker's order (per key, the order it keeps), after
    /// checking what its binding promises of each.
    fn arrivals(&mut self) -> impl Future<Output = Vec<Arrival>>;
}

/// The run: `sinks` is the config's `sinks:` section, whose sink `sink` delivers to `broker`.
pub async fn kill_broker_mid_stream<B: KilledBroker>(broker: &mut B, sink: &str, sinks: &str) {
    let name = B::NAME;
    let upstream = shop().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let ficus = Ficus::start_yaml(&ficus_yaml(
        upstream.addr,
        sinks,
        &dir.path().join("outbox"),
    ))
    .await;
    let keys: Vec<String> = (0..4).map(|k| format!("k{k}")).collect();
    const PER_KEY: usize = 50;
    let total = keys.len() * PER_KEY;
    let started = Instant::now();
    let done = Arc::new(AtomicUsize::new(0));
    let clients = load(ficus.addr, &keys, PER_KEY, done.clone());

    eventually(WAIT, "delivery under way", || async {
        (done.load(Ordering::SeqCst) >= 60
            && metric(&ficus, "ficus_events_delivered_total", sink).await >= 1.0)
            .then_some(())
    })
    .await;
    broker.kill_9();
    let at_kill = done.load(Ordering::SeqCst);
    let delivered_at_kill = metric(&ficus, "ficus_events_delivered_total", sink).await;
    eventually(
        WAIT,
        "more requests and failed deliveries while the broker is down",
        || async {
            let more = done.load(Ordering::SeqCst) >= (at_kill + 60).min(total);
            let failed = metric(&ficus, "ficus_event_delivery_failures_total", sink).await >= 1.0;
            (more && failed).then_some(())
        },
    )
    .await;
    let down_for = started.elapsed();
    broker.start().await;
    for c in clients {
        c.await.expect("client task");
    }
    // Polled by hand, so that a timeout says which side fell short.
    let deadline = Instant::now() + DELIVERY;
    loop {
        let pending = metric(&ficus, "ficus_outbox_pending_events", sink).await;
        let held = broker.held().await;
        if pending == 0.0 && held >= total {
            break;
        }
        if Instant::now() > deadline {
            let dead = metric(&ficus, "ficus_events_dead_lettered_total", sink).await;
            let metrics = ficus.metrics().await;
            let label = format!("sink=\"{sink}\"");
            let series: Vec<&str> = metrics.lines().filter(|l| l.contains(&label)).collect();
            panic!(
                "{name}: not every event delivered {DELIVERY:?} after the restart: {held} of {total} at the broker, {pending} pending, {dead} dead-lettered; sink metrics:\n{}",
                series.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let arrivals = broker.arrivals().await;
    let distinct: HashSet<&str> = arrivals.iter().map(|(id, _, _)| id.as_str()).collect();
    assert_eq!(
        distinct.len(),
        total,
        "{name}: every event arrived ({} survived kill -9)",
        B::DURABLE_BY
    );
    if B::DEDUPLICATES {
        assert_eq!(arrivals.len(), total, "{name}: no duplicate at the broker");
    }
    assert_in_order_per_key(&arrivals, &keys, PER_KEY);
    // A duplicate is a resend of the same event: same id, same content.
    let mut by_id: HashMap<&str, &Arrival> = HashMap::new();
    for a in &arrivals {
        assert_eq!(
            *by_id.entry(a.0.as_str()).or_insert(a),
            a,
            "{name}: same id, same event"
        );
    }
    let failures = metric(&ficus, "ficus_event_delivery_failures_total", sink).await;
    eprintln!(
        "{name} kill -9: killed after {at_kill} responses and {delivered_at_kill} deliveries, restarted after {down_for:?}; {} messages, {} distinct ({} duplicates{}), {failures} failed attempts, all delivered after {:?}",
        arrivals.len(),
        distinct.len(),
        arrivals.len() - distinct.len(),
        if B::DEDUPLICATES { "" } else { ", allowed: the broker does not deduplicate" },
        started.elapsed()
    );
}
