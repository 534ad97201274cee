//! One delivery loop per sink: read a batch at the sink's cursor, send it, and commit the
//! cursor past what was delivered (or dead-lettered). While the sink fails, the same events
//! are retried with exponential backoff and full jitter, for as long as it takes: the outbox
//! holds them. Delivery is in outbox order, so order per partition key is kept.
//!
//! The two fixed costs of a batch are kept off the per-event path: the cursor commit (a file
//! write and two fsyncs) happens at most every [`COMMIT_INTERVAL`], not per batch, and under a
//! steady flow sends are spaced by [`LINGER`] so that each carries many events. The cursor on
//! disk may therefore lag what was delivered; after a crash that lag is delivered again, which
//! at-least-once allows (consumers deduplicate by `id`).

pub mod fleet;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus::{IntCounter, IntGauge};
use tokio_util::sync::CancellationToken;

use crate::events::StoredEvent;
use crate::outbox::{Outbox, OutboxError, Record};
use crate::sinks::Sink;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Retry {
    pub initial: Duration,
    pub max: Duration,
}

impl Retry {
    /// Full jitter: uniformly random in [0, min(max, initial * 2^attempt)], at least 1 ms so a
    /// dead sink is not hammered.
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self
            .initial
            .saturating_mul(2u32.saturating_pow(attempt.min(30)))
            .min(self.max);
        let ms = u64::try_from(ceiling.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        Duration::from_millis(fastrand::u64(1..=ms))
    }
}

/// The per-sink series, resolved once.
#[derive(Clone)]
pub struct SinkMetrics {
    pub delivered: IntCounter,
    pub failures: IntCounter,
    pub dead_lettered: IntCounter,
    pub pending: IntGauge,
    /// Age in seconds of the oldest event not yet delivered (0 when caught up).
    pub lag_seconds: prometheus::Gauge,
}

pub struct Dispatcher {
    pub name: String,
    pub sink: Arc<dyn Sink>,
    pub outbox: Outbox,
    pub retry: Retry,
    pub metrics: SinkMetrics,
    pub batch_size: usize,
    /// The committed cursor, published for shutdown: every event before it is delivered (or
    /// dead-lettered) and the sink's cursor file says so. It lags deliveries by at most
    /// [`COMMIT_INTERVAL`].
    pub progress: tokio::sync::watch::Sender<u64>,
}

const MAX_BATCH_BYTES: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error("sink `{sink}`: {source}")]
    Outbox {
        sink: String,
        #[source]
        source: OutboxError,
    },
}

/// How often a dispatcher looks for replay files that `ficus outbox replay` made.
const REPLAY_CHECK: Duration = Duration::from_secs(1);

/// How long a delivered event may wait for its cursor commit. A commit writes a file and
/// fsyncs it and its directory (about 0.5 ms of CPU on a virtual disk), so it is done at most
/// this often while events flow, not once per batch; and this long after the last delivery
/// when they stop, and at once when the dispatcher stops. A crash loses at most this much of
/// the cursor's progress: those events are delivered again (at least once), never lost.
const COMMIT_INTERVAL: Duration = Duration::from_millis(100);

/// The least time from the start of a send that did not fill its batch to the start of the
/// next: under a steady trickle, events gather into fewer, larger sends (each costs the sink
/// an fsync or a round trip) instead of one send per event. A full batch goes at once, and so
/// does the first event after a quiet spell, so this delays events only while they flow.
///
/// 25 ms rather than 10: at 37k events/s into a file sink, 40 sends a second instead of 100
/// saved 0.7 µs of CPU per event (of the 3.8 µs an `async` event cost; `events_cpu.sh`, eight
/// alternated rounds, benches/README.md), as each send's fsync costs a few hundred µs on a
/// virtual disk; 50 ms saved no more. Outbox-based CDC tools deliver in hundreds of ms
/// (Debezium polls every 500 ms), Kafka producers linger 5 ms.
const LINGER: Duration = Duration::from_millis(25);

/// A dispatcher's place in the outbox: below `delivered` everything is delivered (or
/// dead-lettered); below `committed`, also persisted in the sink's cursor file.
struct Cursor {
    committed: u64,
    delivered: u64,
    /// When `delivered` must be committed by; `None` while it equals `committed`.
    due: Option<tokio::time::Instant>,
}

/// Resolves at `due`, never when there is none.
async fn sleep_until_due(due: Option<tokio::time::Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}

impl Dispatcher {
    /// Delivers until `stop` is cancelled. An outbox error (a failing disk) does not end the
    /// loop: it is logged, counted as a delivery failure, and retried with backoff, so a sink
    /// never stops for good while ficus runs.
    pub async fn run(self, stop: CancellationToken) -> Result<(), DispatchError> {
        let mut attempt = 0u32;
        loop {
            match self.run_once(&stop).await {
                Ok(()) => return Ok(()),
                Err(source) => {
                    self.metrics.failures.inc();
                    let delay = self.retry.delay(attempt);
                    attempt = attempt.saturating_add(1);
                    tracing::error!(sink = %self.name, error = %source, retry_in = ?delay, "delivery interrupted by an outbox error; retrying");
                    tokio::select! {
                        _ = stop.cancelled() => return Err(DispatchError::Outbox { sink: self.name.clone(), source }),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    async fn run_once(&self, stop: &CancellationToken) -> Result<(), OutboxError> {
        let mut reader = self.outbox.reader(&self.name)?;
        let mut cursor = Cursor {
            committed: reader.position(),
            delivered: reader.position(),
            due: None,
        };
        self.progress.send_replace(cursor.committed);
        let mut replay_checked = tokio::time::Instant::now() - REPLAY_CHECK;
        // When the last send did not fill its batch: the earliest start of the next one.
        let mut linger_until: Option<tokio::time::Instant> = None;
        loop {
            if stop.is_cancelled() {
                return self.stop(&mut cursor).await;
            }
            // Replayed dead letters first: an operator asked for them. Looked for at most once
            // a second, on the blocking pool (it reads a directory).
            if replay_checked.elapsed() >= REPLAY_CHECK {
                replay_checked = tokio::time::Instant::now();
                if let Some((path, records)) = self.blocking(|o, n| o.pending_replay(n)).await? {
                    if !self.deliver(&records, cursor.delivered, stop, true).await? {
                        return self.stop(&mut cursor).await;
                    }
                    let finished = path.clone();
                    self.blocking(move |o, _| o.finish_replay(&finished))
                        .await?;
                    tracing::info!(sink = %self.name, events = records.len(), "replayed dead letters");
                    replay_checked -= REPLAY_CHECK;
                    continue;
                }
            }
            if cursor
                .due
                .is_some_and(|due| tokio::time::Instant::now() >= due)
            {
                self.commit(&mut cursor).await?;
            }
            if let Some(until) = linger_until.take() {
                // Events that arrive meanwhile go in the next send, which costs the sink one
                // round trip or one fsync whatever its size.
                tokio::select! {
                    _ = stop.cancelled() => return self.stop(&mut cursor).await,
                    _ = tokio::time::sleep_until(until) => {}
                }
            }
            self.update_pending(cursor.delivered);
            tokio::select! {
                _ = stop.cancelled() => return self.stop(&mut cursor).await,
                ready = reader.ready() => ready?,
                // A replay file may appear while no new event does.
                _ = tokio::time::sleep(REPLAY_CHECK) => continue,
                // Nothing new: the cursor of what was delivered is committed now.
                _ = sleep_until_due(cursor.due) => continue,
            }
            // Not raced against the timers: a read cancelled midway loses its place in the
            // segment (see `Reader::ready`). It returns at once: records are there.
            let records = tokio::select! {
                _ = stop.cancelled() => return self.stop(&mut cursor).await,
                next = reader.next(self.batch_size, MAX_BATCH_BYTES) => next?,
            };
            let Some(last) = records.last().map(|r| r.seq) else {
                continue;
            };
            let started = tokio::time::Instant::now();
            if !self
                .deliver(&records, cursor.delivered, stop, false)
                .await?
            {
                return self.stop(&mut cursor).await;
            }
            cursor.delivered = last + 1;
            cursor.due.get_or_insert(started + COMMIT_INTERVAL);
            let bytes: usize = records.iter().map(|r| r.payload.len()).sum();
            if records.len() < self.batch_size && bytes < MAX_BATCH_BYTES {
                linger_until = Some(started + LINGER);
            }
            self.update_pending(cursor.delivered);
            if cursor.delivered >= self.outbox.durable_end() {
                self.metrics.lag_seconds.set(0.0);
            }
        }
    }

    /// Persists the cursor past everything delivered so far and publishes it.
    async fn commit(&self, cursor: &mut Cursor) -> Result<(), OutboxError> {
        let next = cursor.delivered;
        if next > cursor.committed {
            self.blocking(move |o, n| o.commit(n, next)).await?;
            cursor.committed = next;
            self.progress.send_replace(next);
        }
        cursor.due = None;
        Ok(())
    }

    /// Stopping: what was delivered is committed, so that a restarted or reconfigured sink
    /// does not send it again. A failure here only means duplicates later.
    async fn stop(&self, cursor: &mut Cursor) -> Result<(), OutboxError> {
        if let Err(error) = self.commit(cursor).await {
            tracing::warn!(sink = %self.name, %error, "cursor not committed at stop; its events will be delivered again");
        }
        Ok(())
    }

    /// Runs an outbox call that does file IO (fsync, directory reads) on the blocking pool.
    async fn blocking<T, F>(&self, f: F) -> Result<T, OutboxError>
    where
        F: FnOnce(&Outbox, &str) -> Result<T, OutboxError> + Send + 'static,
        T: Send + 'static,
    {
        let outbox = self.outbox.clone();
        let name = self.name.clone();
        match tokio::task::spawn_blocking(move || f(&outbox, &name)).await {
            Ok(result) => result,
            // The blocking pool only fails a task when the runtime shuts down; whatever was
            // not committed is delivered again at the next start.
            Err(_) => Err(OutboxError::Closed),
        }
    }

    fn update_pending(&self, position: u64) {
        let end = self.outbox.durable_end();
        self.metrics
            .pending
            .set(i64::try_from(end.saturating_sub(position)).unwrap_or(i64::MAX));
    }

    async fn dead_letter(&self, record: &Record) -> Result<(), OutboxError> {
        let record = record.clone();
        self.blocking(move |o, n| o.dead_letter(n, std::slice::from_ref(&record)))
            .await?;
        self.metrics.dead_lettered.inc();
        Ok(())
    }

    /// Delivers `records` in order (those for this sink; replays are for it by definition),
    /// retrying failures and dead-lettering permanent ones. A permanent failure of a send of
    /// several events (a batch refused whole) is narrowed down by sending them one at a time,
    /// so only the event the sink refuses is dead-lettered. Returns false when stopped.
    async fn deliver(
        &self,
        records: &[Record],
        position: u64,
        stop: &CancellationToken,
        replay: bool,
    ) -> Result<bool, OutboxError> {
        // Each envelope is checked and located, not decoded: sinks that write the event's
        // JSON take it from the stored bytes (see `Sink::send_stored`).
        let mut events: Vec<StoredEvent> = Vec::with_capacity(records.len());
        let mut sources: Vec<&Record> = Vec::with_capacity(records.len());
        let sink = (!replay).then_some(self.name.as_str());
        for record in records {
            match StoredEvent::parse(&record.payload, sink) {
                Ok(Some(event)) => {
                    events.push(event);
                    sources.push(record);
                }
                Ok(None) => {}
                Err(error) => {
                    // Unreadable payloads cannot be sent; they are kept as dead letters.
                    tracing::error!(sink = %self.name, seq = record.seq, %error, "undecodable event moved to dead letters");
                    self.dead_letter(record).await?;
                }
            }
        }
        let mut next = 0;
        let mut attempt = 0u32;
        let mut one_by_one = false;
        while next < events.len() {
            self.metrics.lag_seconds.set(age_seconds(&events[next]));
            let end = if one_by_one { next + 1 } else { events.len() };
            let sent = &events[next..end];
            let result = self.sink.send_stored(sent).await;
            let delivered = result.delivered.min(sent.len());
            self.metrics.delivered.inc_by(delivered as u64);
            next += delivered;
            let Some(failure) = result.failure else {
                attempt = 0;
                one_by_one = false;
                continue;
            };
            self.metrics.failures.inc();
            if failure.permanent {
                if sent.len() - delivered > 1 {
                    // Refused as a whole: find out which event the sink will not take.
                    one_by_one = true;
                    continue;
                }
                if let Some(record) = sources.get(next) {
                    let id = events[next]
                        .view()
                        .map(|e| e.id.into_owned())
                        .unwrap_or_default();
                    tracing::warn!(sink = %self.name, %id, reason = %failure.message, "sink refused event; moved to dead letters");
                    self.dead_letter(record).await?;
                }
                next += 1;
                attempt = 0;
                continue;
            }
            // While stuck here, new events keep arriving behind this batch.
            self.update_pending(position);
            let delay = self.retry.delay(attempt);
            attempt = attempt.saturating_add(1);
            tracing::warn!(sink = %self.name, attempt, retry_in = ?delay, reason = %failure.message, "delivery failed; will retry");
            // The gauges go on moving while the sink is down (a backoff lasts up to
            // `retry.max`): the oldest event ages, and new ones arrive behind it.
            let retry_at = tokio::time::Instant::now() + delay;
            loop {
                let tick = retry_at.min(tokio::time::Instant::now() + GAUGE_REFRESH);
                tokio::select! {
                    _ = stop.cancelled() => return Ok(false),
                    _ = tokio::time::sleep_until(tick) => {}
                }
                if tick >= retry_at {
                    break;
                }
                self.metrics.lag_seconds.set(age_seconds(&events[next]));
                self.update_pending(position);
            }
        }
        Ok(true)
    }
}

/// How often a dispatcher waiting to retry refreshes its sink's lag and pending gauges.
const GAUGE_REFRESH: Duration = Duration::from_secs(1);

fn age_seconds(event: &StoredEvent) -> f64 {
    event
        .view()
        .ok()
        .and_then(|e| humantime::parse_rfc3339(&e.time).ok())
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::events::{sample_event, CloudEvent, Envelope};
    use crate::outbox::{OutboxMetrics, OutboxSettings};
    use crate::sinks::{BoxFuture, SendResult};

    /// Records when each send started and the ids it carried.
    #[derive(Default)]
    struct Timed(Mutex<Vec<(tokio::time::Instant, Vec<String>)>>);

    impl Sink for Timed {
        fn send<'a>(&'a self, events: &'a [CloudEvent]) -> BoxFuture<'a, SendResult> {
            let ids = events.iter().map(|e| e.id.clone()).collect();
            self.0
                .lock()
                .expect("lock")
                .push((tokio::time::Instant::now(), ids));
            Box::pin(async move { SendResult::all(events.len()) })
        }
    }

    /// Events made durable one at a time, every 2 ms (a group commit each, so the dispatcher
    /// could send each on its own): they are all delivered, in order, in sends that start
    /// about `LINGER` apart or more after a send that did not fill its batch.
    #[tokio::test]
    async fn a_steady_trickle_is_gathered_into_sends_linger_apart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outbox = Outbox::open(
            OutboxSettings::new(dir.path()),
            OutboxMetrics::unregistered(),
        )
        .expect("open");
        let sink = Arc::new(Timed::default());
        let batch_size = 1000;
        let dispatcher = Dispatcher {
            name: "timed".into(),
            sink: sink.clone(),
            outbox: outbox.clone(),
            retry: Retry {
                initial: Duration::from_millis(10),
                max: Duration::from_millis(100),
            },
            metrics: crate::metrics::Metrics::new(&prometheus::Registry::new())
                .expect("metrics")
                .for_sink("timed"),
            batch_size,
            progress: tokio::sync::watch::Sender::new(0),
        };
        let stop = CancellationToken::new();
        let task = tokio::spawn(dispatcher.run(stop.clone()));
        let n = 150;
        for i in 0..n {
            let mut event = sample_event();
            event.id = format!("e-{i:03}");
            let envelope = Envelope {
                sinks: None,
                rule: "r".into(),
                event,
            };
            let ticket = outbox.append(vec![envelope.encode()]).expect("append");
            ticket.durable().await.expect("durable");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while sink
            .0
            .lock()
            .expect("lock")
            .iter()
            .map(|s| s.1.len())
            .sum::<usize>()
            < n
        {
            assert!(tokio::time::Instant::now() < deadline, "not all delivered");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        stop.cancel();
        task.await.expect("dispatcher task").expect("dispatcher");
        let sends = sink.0.lock().expect("lock");
        let ids: Vec<&String> = sends.iter().flat_map(|s| &s.1).collect();
        let expected: Vec<String> = (0..n).map(|i| format!("e-{i:03}")).collect();
        assert_eq!(
            ids,
            expected.iter().collect::<Vec<_>>(),
            "in order, once each"
        );
        // The linger counts from just before a send's events are checked, and the sink sees
        // them a little later, later still when the thread is preempted there (a busy CI
        // machine): so the median gap is checked, with 1 ms of slack. Without the linger,
        // sends come a group commit apart, about 2 ms.
        let mut gaps: Vec<Duration> = sends
            .windows(2)
            .filter(|pair| pair[0].1.len() < batch_size)
            .map(|pair| pair[1].0 - pair[0].0)
            .collect();
        gaps.sort();
        assert!(
            !gaps.is_empty(),
            "300 ms of events in {} send(s)",
            sends.len()
        );
        let median = gaps[gaps.len() / 2];
        assert!(
            median >= LINGER - Duration::from_millis(1),
            "sends a median {median:?} apart, less than {LINGER:?}: {gaps:?}"
        );
        // Each event came in its own group commit, 2 ms or more after the one before.
        assert!(sends.len() < n / 2, "{} sends for {n} events", sends.len());
    }

    #[test]
    fn backoff_grows_to_its_ceiling_with_jitter() {
        let retry = Retry {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
        };
        for attempt in 0..40 {
            let ceiling =
                Duration::from_millis(100 * 2u64.pow(attempt.min(20))).min(Duration::from_secs(2));
            for _ in 0..50 {
                let d = retry.delay(attempt);
                assert!(
                    d <= ceiling && d >= Duration::from_millis(1),
                    "{attempt}: {d:?}"
                );
            }
        }
        let spread: std::collections::HashSet<_> = (0..50).map(|_| retry.delay(5)).collect();
        assert!(spread.len() > 10, "jittered");
    }
}
