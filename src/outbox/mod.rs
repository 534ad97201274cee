//! # The outbox: a crash-safe, segmented, append-only log of events
//!
//! Every event goes here before any sink sees it (SPEC §4). The outbox must never lose an
//! event it said was durable, must never hand a sink an event that is not durable, and must
//! keep each event until every sink that may want it is done with it.
//!
//! ## Files
//!
//! ```text
//! <dir>/ficus.lock                      held (flock) by the ficus that has the outbox open
//! <dir>/segments/<first_seq:020>.seg    the log, split in segments named by their first seq
//! <dir>/segments/spare                  a zero-filled next segment being made (`spare` module)
//! <dir>/segments/recycled               a passed segment kept to be the next one (`spare`)
//! <dir>/segments/recycling              the recycled segment while the writer installs it
//! <dir>/cursors/<sink>.cursor           per sink: every record below this seq is done
//! <dir>/dead/<sink>.log                 per sink: records the sink refused for good
//! <dir>/dead/<sink>.replay-<unix_nanos> dead letters an operator sent back for delivery
//! ```
//!
//! Sink names are restricted to letters, digits, `-` and `_` (as in the config), so a name
//! is always a safe file name.
//!
//! ## On-disk format (all integers little-endian; see [`format`](mod@format))
//!
//! A segment (and a dead-letter file, with magic `FICUSDLQ`) starts with a 24-byte header:
//! `magic "FICUSSEG" | version u32 = 1 | first_seq u64 | crc32 u32` (crc over the 20 bytes
//! before it). Then records, back to back, each
//!
//! ```text
//! len u32 | crc32 u32 | seq u64 | payload [len]      crc32 over len, seq and payload
//! ```
//!
//! A record never spans two segments. Seqs are consecutive across the whole log: a segment's
//! records are `first_seq, first_seq + 1, ...` and end where the next segment begins. A
//! cursor file is 24 bytes: `magic "FICUSCUR" | version u32 | next u64 | crc32 u32`.
//!
//! ## Writing: one writer, group commit
//!
//! [`Outbox::append`] gives the payloads consecutive seqs under a short lock and queues them;
//! it never blocks on IO. A single writer thread (`ficus-outbox`) takes everything queued (up
//! to 4 MiB), writes it with one `write` per segment touched, calls `fdatasync` once, then
//! resolves the batch's [`Ticket`]s and publishes the new durable end on a watch channel. So
//! many concurrent requests share one fsync. The writer is a dedicated OS thread rather than
//! a tokio task because it spends its life in blocking `write`/`fdatasync` calls, which would
//! otherwise stall a runtime worker; nothing holds a lock across an `.await`.
//!
//! Two things keep the writer from trading the proxy's CPU for small groups when both share a
//! core. An append that finds the writer asleep wakes it from a task that first yields, so the
//! tasks ready at that moment append too before the writer runs (and, preempting the worker,
//! takes the queue). And the tickets of a batch are resolved by one task on the runtime that
//! opened the outbox, woken once per batch, rather than by the writer waking each waiting
//! request's task from its own thread. Neither changes what is durable when: a ticket still
//! resolves only after its batch's fsync returned.
//!
//! With `durability: sync` the proxy awaits the ticket before releasing the response; with
//! `async` it does not, and `ficus_outbox_unflushed_events` counts the records appended but
//! not yet fsynced. The writer does the same in both modes, except that with `async` it starts
//! a group commit at most every 5 ms (`ASYNC_COMMIT_INTERVAL`): nobody waits for those fsyncs,
//! and under load they would otherwise run back to back, each for a handful of events. So an
//! async event is durable within about 5 ms plus one fsync; a close does not wait.
//!
//! When the active segment would pass `segment_bytes`, it is fsynced, the next segment is
//! created (header written and fsynced, then the directory fsynced) and writing goes on there.
//! Under load the next segment is, where it can be, a file whose blocks are already written,
//! which records then overwrite: an fdatasync that need not commit a new file size costs half
//! as much. That file is a segment every sink had passed, kept for it rather than deleted
//! (recycled), or, with `sync`, a spare full of zeros made beforehand by another thread
//! (`async`, whose fsyncs are paced, does not pay for zeros). The `spare` module says why and
//! how. So the active segment may be longer than its records; a rolled-over segment is cut to
//! its records first.
//!
//! ## Invariants
//!
//! 1. A record is durable (its ticket resolves `Ok`, it counts in [`Outbox::durable_end`])
//!    only after an `fdatasync` that covered it returned success.
//! 2. Readers see only records below the durable end, so a sink never delivers an event a
//!    crash could take back.
//! 3. Every segment but the last is complete, fsynced, and ends with its last record; only
//!    the last can have a torn tail, or zeros or a recycled segment's old records after its
//!    records. Old records have seqs below the segment's first, so invariant 4 stops every
//!    scan at them.
//! 4. Seqs are consecutive; recovery, readers and the writer all check it.
//! 5. A segment is deleted only when every cursor file in `cursors/` is at or past the next
//!    segment's first seq. A sink removed from the config keeps its cursor file, so its
//!    backlog stays until it returns (or an operator deletes the cursor file).
//! 6. A sink gets a cursor file the first time it opens a reader ([`Outbox::reader`]), at the
//!    oldest retained record, so its backlog is kept from then on even before it commits.
//!
//! ## Recovery (at [`Outbox::open`])
//!
//! - The headers of all segments are checked (magic, version, crc, first seq = file name).
//!   A bad header on any but the last segment is [`OutboxError::Corrupt`]: refuse to start.
//! - The last segment is scanned record by record. At the first short record, bad crc, or
//!   seq out of order, the file is truncated to the last good record, logged with
//!   `tracing::warn!` (bytes cut), unless all it cuts is zeros or starts with a whole record
//!   of an earlier seq (the unused part of a preallocated or recycled segment: nothing was
//!   lost there, so nothing is reported). Everything before it is fsynced again: what a
//!   reader is handed after a restart is on disk. A last segment whose header is torn and
//!   that holds nothing else (a crash while it was created) gets its header rewritten; a bad
//!   header with records after it is damage, not a crash, and is refused. A leftover
//!   `segments/spare` is deleted; a leftover `recycled` or `recycling` is kept as `recycled`.
//! - Cursor files are read; a damaged one is an error naming it (never "start from 0"). A
//!   cursor below the oldest segment is treated as the oldest record; one past the end (its
//!   records were cut as damaged) is moved back to the end, so the sink takes the new records
//!   that will reuse those seqs. Leftover `*.cursor.tmp` files are removed.
//! - With no segments at all, seqs start at the highest cursor (0 for a new outbox).
//! - Segments every cursor has passed are deleted (a crash between a commit and its deletes).
//!
//! Earlier segments are trusted at open; readers still check every record's crc and seq and
//! return [`OutboxError::Corrupt`] rather than garbage.
//!
//! ## Write failures
//!
//! When a write or fsync fails, the batch's tickets fail with the error, [`Outbox::health`]
//! reports it (so `/readyz` turns 503), and the disk is put back to the last successful sync
//! (segments created since are deleted, the active one is truncated, and a next segment or
//! spare whose making failed midway is deleted too, so the retry finds its name free): after an
//! fsync error the kernel may have dropped the dirty pages, so nothing after that point is
//! trusted. The batch stays in memory and the writer retries it, with backoff, before anything
//! newer, so seqs stay consecutive and nothing is silently lost; a failed ticket therefore
//! means "not known durable", and the event may still be delivered later (at least once). The
//! queue stays bounded by `max_bytes`, plus the events of admitted requests in flight
//! ([`Outbox::append_admitted`]). The first successful write clears the health error.
//!
//! ## Reading, cursors, deletion
//!
//! A [`Reader`] starts at its sink's cursor, returns batches of durable records, and can
//! [`Reader::seek`] back to retry a batch. [`Outbox::commit`] persists a sink's cursor
//! atomically (write a temporary file, fsync, rename, fsync the directory) and then deletes
//! the segments every cursor has passed (keeping one as `segments/recycled`, see above); only
//! whole segments are deleted, never the active one. `max_bytes` counts segment bytes on disk
//! plus bytes queued: an append that would pass it fails with [`OutboxError::Full`] and
//! queues nothing, except [`Outbox::append_admitted`]: the events of a request the proxy let
//! through because there was room (`when_full: reject`) are kept even when they pass it,
//! since the monolith has acted on that request by then. So that commits can always free
//! space, segments are at most a quarter of `max_bytes`. Preallocated zeros and recycled
//! segments are not counted; a spare is made, or a passed segment kept, only while the
//! records leave room for it and the active segment's unused tail (two segments) below
//! `max_bytes`, so disk use passes `max_bytes` only while an outbox that had that room
//! fills up, by at most two segments (and, as above, the events of admitted requests).
//!
//! ## Dead letters and replay
//!
//! [`Outbox::dead_letter`] appends records, with their seqs and payloads, to
//! `dead/<sink>.log` (one write, one fsync). [`replay`] (the `ficus outbox replay` command)
//! renames that file to `dead/<sink>.replay-<unix_nanos>`; the running dispatcher picks it up
//! with [`Outbox::pending_replay`], delivers it, and deletes it with
//! [`Outbox::finish_replay`]. A stopped ficus picks it up at its next start. The `.log` is
//! opened by name for every append and never kept open, so a rename by the CLI cannot send
//! later dead letters into a file that was already replayed; see the `dead` module.
//!
//! ## Offline tools
//!
//! [`status`] and [`replay`] work on the directory of a running ficus: `status` only reads
//! (it ignores a torn tail rather than cutting it), `replay` only renames dead-letter files.
//! Neither takes `ficus.lock`; a second ficus opening the same directory does, and is refused
//! with [`OutboxError::InUse`] (two writers would interleave seqs).

mod cursor;
mod dead;
pub mod format;
pub mod log;
mod spare;

use std::collections::{BTreeSet, VecDeque};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use prometheus::IntGauge;
use tokio::sync::{mpsc, oneshot, watch};

pub use log::MIN_SEGMENT_BYTES;

/// When the proxy releases a response whose event is in the outbox (SPEC §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// After the event is fsynced.
    Sync,
    /// At once; the event is fsynced within milliseconds.
    Async,
}

/// What the proxy does with a request that may emit an event while the outbox is full.
/// The outbox itself answers [`OutboxError::Full`] either way; the proxy decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    Reject,
    Drop,
}

#[derive(Debug, Clone)]
pub struct OutboxSettings {
    pub dir: PathBuf,
    pub durability: Durability,
    /// Segment bytes on disk plus bytes queued, at most.
    pub max_bytes: u64,
    pub when_full: WhenFull,
    /// Size a segment grows to before the next one starts (at most `max_bytes / 4`).
    pub segment_bytes: u64,
}

impl OutboxSettings {
    /// Defaults: `Sync`, 1 GiB, `Reject`, 64 MiB segments.
    pub fn new(dir: impl Into<PathBuf>) -> OutboxSettings {
        OutboxSettings {
            dir: dir.into(),
            durability: Durability::Sync,
            max_bytes: 1 << 30,
            when_full: WhenFull::Reject,
            segment_bytes: 64 << 20,
        }
    }
}

/// The outbox's gauges, owned by the crate's `Metrics` (`ficus_outbox_bytes`,
/// `ficus_outbox_unflushed_events`).
#[derive(Clone)]
pub struct OutboxMetrics {
    pub bytes: IntGauge,
    pub unflushed: IntGauge,
}

impl OutboxMetrics {
    /// Plain gauges registered nowhere, for tests and tools.
    pub fn unregistered() -> OutboxMetrics {
        OutboxMetrics {
            bytes: IntGauge::new(
                "ficus_outbox_bytes",
                "Bytes of outbox segment files on disk.",
            )
            .expect("a constant, valid metric name"),
            unflushed: IntGauge::new(
                "ficus_outbox_unflushed_events",
                "Events appended to the outbox but not yet fsynced.",
            )
            .expect("a constant, valid metric name"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox: cannot {action} {}: {source}", path.display())]
    Io {
        path: PathBuf,
        /// What was being done, e.g. "fsync segment".
        action: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("outbox full: max_bytes ({max_bytes} bytes) reached")]
    Full { max_bytes: u64 },
    #[error("outbox closed")]
    Closed,
    #[error("outbox: {} is damaged at byte {offset}: {reason}", path.display())]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("outbox: a payload of {size} bytes is larger than a record can be ({max} bytes)")]
    TooLarge { size: usize, max: u64 },
    #[error("outbox: `{0}` is not a valid sink name (letters, digits, `-` and `_`)")]
    InvalidSink(String),
    #[error("outbox: cursor {next} for sink `{sink}` is past the durable end {end}")]
    CursorBeyondEnd { sink: String, next: u64, end: u64 },
    #[error("outbox: {} is not a replay file of this outbox", .0.display())]
    NotReplayFile(PathBuf),
    #[error("outbox settings: {0}")]
    Settings(String),
    /// Another process holds the directory's lock: two writers would corrupt the log.
    #[error("outbox: {} is in use by another ficus process", .0.display())]
    InUse(PathBuf),
}

impl OutboxError {
    /// A copy for each waiter of a failed batch (`io::Error` is not `Clone`; its kind and
    /// message are kept).
    fn duplicate(&self) -> OutboxError {
        match self {
            OutboxError::Io {
                path,
                action,
                source,
            } => OutboxError::Io {
                path: path.clone(),
                action,
                source: io::Error::new(source.kind(), source.to_string()),
            },
            OutboxError::Full { max_bytes } => OutboxError::Full {
                max_bytes: *max_bytes,
            },
            OutboxError::Closed => OutboxError::Closed,
            OutboxError::Corrupt {
                path,
                offset,
                reason,
            } => OutboxError::Corrupt {
                path: path.clone(),
                offset: *offset,
                reason: reason.clone(),
            },
            OutboxError::TooLarge { size, max } => OutboxError::TooLarge {
                size: *size,
                max: *max,
            },
            OutboxError::InvalidSink(s) => OutboxError::InvalidSink(s.clone()),
            OutboxError::CursorBeyondEnd { sink, next, end } => OutboxError::CursorBeyondEnd {
                sink: sink.clone(),
                next: *next,
                end: *end,
            },
            OutboxError::NotReplayFile(p) => OutboxError::NotReplayFile(p.clone()),
            OutboxError::Settings(s) => OutboxError::Settings(s.clone()),
            OutboxError::InUse(p) => OutboxError::InUse(p.clone()),
        }
    }
}

/// Takes the directory's exclusive lock (`flock` on `ficus.lock`), released when the process
/// exits however it exits. `status` and `replay` do not take it: they only read, or rename
/// atomically, and work beside a running ficus.
fn lock_dir(dir: &Path) -> Result<std::fs::File, OutboxError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir, "create directory"))?;
    let path = dir.join("ficus.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err(&path, "open lock file"))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(OutboxError::InUse(dir.to_path_buf())),
        Err(std::fs::TryLockError::Error(e)) => Err(io_err(&path, "lock")(e)),
    }
}

/// Maps an `io::Error` to [`OutboxError::Io`] naming the file and the action.
pub(crate) fn io_err(path: &Path, action: &'static str) -> impl FnOnce(io::Error) -> OutboxError {
    let path = path.to_path_buf();
    move |source| OutboxError::Io {
        path,
        action,
        source,
    }
}

/// One event in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub payload: Bytes,
}

/// Most bytes the writer takes into one batch (one write, one fsync).
const MAX_BATCH_BYTES: u64 = 4 << 20;
/// With `durability: async`, the least time from the start of one group commit to the start
/// of the next: nobody waits for the fsync, so the events of these milliseconds share one.
/// An fsync costs far more CPU than a write (about 0.15 ms on a virtual disk), and without
/// this pause the writer would fsync continuously under load, once per handful of events.
const ASYNC_COMMIT_INTERVAL: Duration = Duration::from_millis(5);
/// [`Outbox::is_full`] is true when not even a record of this size fits.
pub const SMALL_RECORD_BYTES: usize = 1024;

/// Queued payloads of one `append` call and the ticket to resolve.
struct Entry {
    first_seq: u64,
    payloads: Vec<Bytes>,
    bytes: u64,
    ticket: Option<oneshot::Sender<Result<(), OutboxError>>>,
}

struct Queue {
    /// The seq the next appended record gets.
    next_seq: u64,
    entries: VecDeque<Entry>,
    /// Framed bytes appended but not yet written (including a failed batch being retried).
    bytes: u64,
    closed: bool,
    /// The writer sleeps on the condvar: only then does an append pay for a wake-up.
    writer_waiting: bool,
    /// A wake-up of the sleeping writer is on its way (see [`Outbox::wake_writer`]).
    wake_scheduled: bool,
}

/// The last write failure, until a write succeeds again.
struct Failure {
    first_seq: u64,
    error: OutboxError,
}

struct Shared {
    /// Held until `close` or the last handle goes: one writer per directory, across
    /// processes.
    dir_lock: Mutex<Option<std::fs::File>>,
    settings: OutboxSettings,
    metrics: OutboxMetrics,
    store: log::Store,
    dead: dead::DeadLetters,
    queue: Mutex<Queue>,
    wake: Condvar,
    /// `queue.bytes`, readable without the lock (for `is_full`).
    queued_bytes: AtomicU64,
    durable: watch::Receiver<u64>,
    failure: Mutex<Option<Failure>>,
    /// The last cursor commit's error, while commits fail (for `health`).
    commit_failure: Mutex<Option<String>>,
    /// Failed write attempts since open: `flush` fails on one that happens while it waits.
    failed_attempts: AtomicU64,
}

/// Free disk space below which the outbox reports itself not writable: room for a few
/// batches of records, and for the cursor and segment files that deliveries make.
pub const MIN_FREE_BYTES: u64 = 64 << 10;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Critical sections here never leave data half-updated, so a poisoned lock is usable.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn close_queue(&self) {
        lock(&self.queue).closed = true;
        self.wake.notify_all();
    }
}

/// Stops the writer when the last [`Outbox`] handle goes (after it wrote what was queued).
struct Handle {
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.close_queue();
    }
}

/// The outbox of a running ficus: cheap to clone, shared by the proxy and the dispatchers.
#[derive(Clone)]
pub struct Outbox {
    handle: Arc<Handle>,
}

/// Resolves when an appended batch is durable (or its write failed).
#[derive(Debug)]
pub struct Ticket {
    first_seq: u64,
    len: usize,
    rx: Option<oneshot::Receiver<Result<(), OutboxError>>>,
}

impl Ticket {
    /// The seq of the first appended payload; the others follow.
    pub fn first_seq(&self) -> u64 {
        self.first_seq
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Waits until every payload of the append is on disk.
    pub async fn durable(self) -> Result<(), OutboxError> {
        match self.rx {
            None => Ok(()),
            Some(rx) => rx.await.unwrap_or(Err(OutboxError::Closed)),
        }
    }
}

impl Outbox {
    /// Creates the directory (and its subdirectories) if needed, recovers it, and starts the
    /// writer thread. Called on a runtime, it also starts there the task that resolves
    /// [`Ticket`]s (see "Writing"): that runtime must keep running while the outbox is used.
    pub fn open(settings: OutboxSettings, metrics: OutboxMetrics) -> Result<Outbox, OutboxError> {
        if settings.max_bytes < 4 * MIN_SEGMENT_BYTES {
            return Err(OutboxError::Settings(format!(
                "max_bytes is {}, at least {} is needed",
                settings.max_bytes,
                4 * MIN_SEGMENT_BYTES
            )));
        }
        let mut settings = settings;
        // Only whole, finished segments are deleted: with segments larger than a quarter of
        // max_bytes, a full outbox could have nothing to delete even with every sink done.
        settings.segment_bytes = settings
            .segment_bytes
            .clamp(MIN_SEGMENT_BYTES, settings.max_bytes / 4);
        let dir_lock = lock_dir(&settings.dir)?;
        let (mut writer, store, recovery) = log::open(&settings.dir, settings.segment_bytes)?;
        // With `async`, group commits are paced to at most one per 5 ms: the journal commits
        // that a zero-filled spare saves (about 40 µs of CPU each here) are worth less than
        // writing the zeros (about 20 ms of CPU per 64 MiB spare, one per ~100k events).
        // Recycled segments cost nothing to make, so both durabilities use them.
        writer.limit_preallocation(match settings.durability {
            Durability::Sync => settings.max_bytes,
            Durability::Async => 0,
        });
        writer.limit_recycling(settings.max_bytes);
        tracing::info!(
            dir = %settings.dir.display(),
            first_seq = store.first_seq(),
            end_seq = store.durable_end(),
            bytes = store.bytes(),
            truncated_bytes = recovery.truncated_bytes,
            deleted_segments = recovery.deleted_segments,
            "outbox opened"
        );
        let (tx, rx) = watch::channel(store.durable_end());
        metrics.bytes.set(gauge(store.bytes()));
        metrics.unflushed.set(0);
        let dead = dead::DeadLetters::new(store.layout().dead.clone());
        let shared = Arc::new(Shared {
            dir_lock: Mutex::new(Some(dir_lock)),
            queue: Mutex::new(Queue {
                next_seq: writer.next_seq(),
                entries: VecDeque::new(),
                bytes: 0,
                closed: false,
                writer_waiting: false,
                wake_scheduled: false,
            }),
            settings,
            metrics,
            store,
            dead,
            wake: Condvar::new(),
            queued_bytes: AtomicU64::new(0),
            durable: rx,
            failure: Mutex::new(None),
            commit_failure: Mutex::new(None),
            failed_attempts: AtomicU64::new(0),
        });
        let for_writer = shared.clone();
        let resolver = Resolver::start();
        std::thread::Builder::new()
            .name("ficus-outbox".into())
            .spawn(move || write_loop(&for_writer, writer, tx, resolver))
            .map_err(io_err(
                &shared.settings.dir,
                "start the outbox writer thread",
            ))?;
        Ok(Outbox {
            handle: Arc::new(Handle { shared }),
        })
    }

    fn shared(&self) -> &Shared {
        &self.handle.shared
    }

    /// Queues payloads, in order, with consecutive seqs, for the writer. Fails with
    /// [`OutboxError::Full`], queueing nothing, when segment bytes on disk plus bytes queued
    /// plus these would pass `max_bytes`. Never blocks on IO.
    pub fn append(&self, payloads: Vec<Bytes>) -> Result<Ticket, OutboxError> {
        self.queue(payloads, true, true)
    }

    /// [`append`](Self::append) for a caller that will not wait until the payloads are
    /// durable (`durability: async`): there is no ticket, so no channel for the writer to
    /// answer on (allocated, answered and freed for each append, it cost more than the
    /// append). Returns the first payload's seq.
    pub fn append_untracked(&self, payloads: Vec<Bytes>) -> Result<u64, OutboxError> {
        self.queue(payloads, false, true)
            .map(|ticket| ticket.first_seq)
    }

    /// [`append`](Self::append) (`tracked`, else without a channel, as
    /// [`append_untracked`](Self::append_untracked)) for the events of a request that
    /// [`has_room`](Self::has_room) admitted before it reached the upstream (`when_full:
    /// reject`): queued even when they pass `max_bytes`. The upstream has changed its state
    /// by now, and the SPEC allows no state change without its event; an event larger than
    /// the room the admission saw, or requests admitted together, pass `max_bytes` by at most
    /// the events of the requests in flight.
    pub fn append_admitted(
        &self,
        payloads: Vec<Bytes>,
        tracked: bool,
    ) -> Result<Ticket, OutboxError> {
        self.queue(payloads, tracked, false)
    }

    fn queue(
        &self,
        payloads: Vec<Bytes>,
        tracked: bool,
        limited: bool,
    ) -> Result<Ticket, OutboxError> {
        let shared = self.shared();
        let max = shared.store.max_payload();
        let mut bytes = 0u64;
        for p in &payloads {
            if p.len() as u64 > max {
                return Err(OutboxError::TooLarge { size: p.len(), max });
            }
            bytes += format::frame_len(p.len());
        }
        let n = payloads.len();
        let (tx, rx) = if n == 0 || !tracked {
            (None, None)
        } else {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        };
        let mut q = lock(&shared.queue);
        if q.closed {
            return Err(OutboxError::Closed);
        }
        let first_seq = q.next_seq;
        if n == 0 {
            return Ok(Ticket {
                first_seq,
                len: 0,
                rx: None,
            });
        }
        let max_bytes = shared.settings.max_bytes;
        if limited
            && shared
                .store
                .bytes()
                .saturating_add(q.bytes)
                .saturating_add(bytes)
                > max_bytes
        {
            return Err(OutboxError::Full { max_bytes });
        }
        q.next_seq += n as u64;
        q.bytes += bytes;
        shared.queued_bytes.store(q.bytes, Ordering::Relaxed);
        q.entries.push_back(Entry {
            first_seq,
            payloads,
            bytes,
            ticket: tx,
        });
        // Under the lock, so that the writer's decrement can never come first.
        shared.metrics.unflushed.add(gauge(n as u64));
        let wake = q.writer_waiting && !q.wake_scheduled;
        q.wake_scheduled |= wake;
        drop(q);
        if wake {
            self.wake_writer();
        }
        Ok(Ticket {
            first_seq,
            len: n,
            rx,
        })
    }

    /// Wakes the sleeping writer for the first append since it went to sleep. On a runtime,
    /// the wake-up waits until the runtime has run the tasks that are ready now: the appends
    /// they make join the same group commit, where waking at once would let the writer (on a
    /// shared core) preempt the runtime's thread and fsync for one event. Outside a runtime it
    /// wakes at once; a task the runtime drops unrun (shutting down) wakes it as it goes.
    fn wake_writer(&self) {
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let wake = WakeWriter(self.handle.shared.clone());
                // `yield_now` puts the task behind everything ready and the next I/O poll.
                runtime.spawn(async move {
                    tokio::task::yield_now().await;
                    drop(wake);
                });
            }
            Err(_) => self.shared().wake.notify_one(),
        }
    }

    /// True when not even a [`SMALL_RECORD_BYTES`] record fits (two atomic loads).
    pub fn is_full(&self) -> bool {
        let shared = self.shared();
        shared
            .store
            .bytes()
            .saturating_add(shared.queued_bytes.load(Ordering::Relaxed))
            .saturating_add(format::frame_len(SMALL_RECORD_BYTES))
            > shared.settings.max_bytes
    }

    /// Whether a payload of `bytes` would fit now (on disk plus queued). The proxy asks this
    /// before forwarding with `when_full: reject`, with the largest event seen so far.
    pub fn has_room(&self, bytes: u64) -> bool {
        let shared = self.shared();
        let payload = usize::try_from(bytes)
            .unwrap_or(usize::MAX)
            .max(SMALL_RECORD_BYTES);
        shared
            .store
            .bytes()
            .saturating_add(shared.queued_bytes.load(Ordering::Relaxed))
            .saturating_add(format::frame_len(payload))
            <= shared.settings.max_bytes
    }

    /// `Err(reason)` while the outbox cannot be written (for `/readyz`): the last write or
    /// fsync failed (until a write succeeds), the last cursor commit failed (until one
    /// succeeds), a directory of the outbox is gone or not writable, or its disk has less
    /// than [`MIN_FREE_BYTES`] free. The last two are looked at on each call, so that
    /// readiness turns before a request's event fails on them: an append into the open
    /// segment may still succeed for a while after the directory went or the disk filled.
    pub fn health(&self) -> Result<(), String> {
        let shared = self.shared();
        if let Some(f) = &*lock(&shared.failure) {
            return Err(format!("outbox write failing: {}", f.error));
        }
        if let Some(error) = &*lock(&shared.commit_failure) {
            return Err(format!("outbox cursor commit failing: {error}"));
        }
        let layout = shared.store.layout();
        for dir in [&layout.segments, &layout.cursors] {
            let access = rustix::fs::Access::WRITE_OK | rustix::fs::Access::EXEC_OK;
            if let Err(e) = rustix::fs::access(dir, access) {
                return Err(format!(
                    "{} is not writable: {}",
                    dir.display(),
                    io::Error::from(e)
                ));
            }
        }
        match rustix::fs::statvfs(&layout.segments) {
            Ok(stat) => {
                let free = stat.f_bavail.saturating_mul(stat.f_frsize);
                if free < MIN_FREE_BYTES {
                    return Err(format!(
                        "disk full: {free} bytes free for {}",
                        layout.dir.display()
                    ));
                }
            }
            Err(e) => return Err(format!("{}: {}", layout.dir.display(), io::Error::from(e))),
        }
        Ok(())
    }

    /// Waits until everything appended so far is durable (used at shutdown). Fails when a
    /// write attempt of those records fails while it waits: while the disk fails, a flush
    /// returns within one retry interval (at most 5 s) instead of hanging.
    pub async fn flush(&self) -> Result<(), OutboxError> {
        let shared = self.shared();
        let target = lock(&shared.queue).next_seq;
        let failed_before = shared.failed_attempts.load(Ordering::Acquire);
        let mut rx = shared.durable.clone();
        loop {
            if *rx.borrow_and_update() >= target {
                return Ok(());
            }
            if shared.failed_attempts.load(Ordering::Acquire) > failed_before {
                if let Some(f) = &*lock(&shared.failure) {
                    if f.first_seq < target {
                        return Err(f.error.duplicate());
                    }
                }
            }
            if rx.changed().await.is_err() {
                // The writer stopped; it published its last durable end before that.
                return if *rx.borrow() >= target {
                    Ok(())
                } else {
                    Err(OutboxError::Closed)
                };
            }
        }
    }

    /// Flushes, then stops the writer and waits for it to finish (appends fail with
    /// [`OutboxError::Closed`] from then on, on every clone). Readers can still read what is
    /// durable. Dropping the last handle also stops the writer, without waiting.
    pub async fn close(&self) -> Result<(), OutboxError> {
        let flushed = self.flush().await;
        self.shared().close_queue();
        let mut rx = self.shared().durable.clone();
        while rx.changed().await.is_ok() {}
        // The writer is gone: another process (or a reopen) may take the directory.
        lock(&self.shared().dir_lock).take();
        flushed
    }

    /// The seq one past the last durable record.
    pub fn durable_end(&self) -> u64 {
        self.shared().store.durable_end()
    }

    /// The oldest retained seq.
    pub fn first_seq(&self) -> u64 {
        self.shared().store.first_seq()
    }

    /// Updates of [`Outbox::durable_end`].
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared().durable.clone()
    }

    /// A reader at `sink`'s persisted cursor. A sink without one gets one at the oldest
    /// retained record, persisted now, so that its backlog is kept from here on.
    pub fn reader(&self, sink: &str) -> Result<Reader, OutboxError> {
        let shared = self.handle.shared.clone();
        let position = shared.store.register(sink)?;
        let durable = shared.durable.clone();
        Ok(Reader {
            store: shared.store.clone(),
            durable,
            position,
            inner: None,
        })
    }

    /// Persists `sink`'s cursor atomically (every record below `next` is done), then deletes
    /// every segment whose records are all below every cursor file in the directory. Blocks
    /// on an fsync or two; call it from a task that may block briefly.
    pub fn commit(&self, sink: &str, next: u64) -> Result<(), OutboxError> {
        let shared = self.shared();
        let result = shared.store.commit(sink, next);
        shared.metrics.bytes.set(gauge(shared.store.bytes()));
        *lock(&shared.commit_failure) = result.as_ref().err().map(ToString::to_string);
        result
    }

    /// Appends records (same framing, seqs and payloads kept) to `dead/<sink>.log`, fsynced.
    pub fn dead_letter(&self, sink: &str, records: &[Record]) -> Result<(), OutboxError> {
        self.shared().dead.append(sink, records)
    }

    /// The oldest replay file waiting for `sink`, and its records in order.
    pub fn pending_replay(
        &self,
        sink: &str,
    ) -> Result<Option<(PathBuf, Vec<Record>)>, OutboxError> {
        self.shared().dead.pending_replay(sink)
    }

    /// Deletes a replay file once its records were delivered (or dead-lettered again).
    pub fn finish_replay(&self, path: &Path) -> Result<(), OutboxError> {
        self.shared().dead.finish_replay(path)
    }

    /// Bytes of segment files on disk.
    pub fn bytes(&self) -> u64 {
        self.shared().store.bytes()
    }

    /// fdatasync calls on segment files since open (group commit makes this far fewer than
    /// appends).
    pub fn sync_count(&self) -> u64 {
        self.shared().store.sync_count()
    }

    /// The largest payload an append accepts.
    pub fn max_payload(&self) -> u64 {
        self.shared().store.max_payload()
    }

    /// The settings in force (`segment_bytes` as clamped).
    pub fn settings(&self) -> &OutboxSettings {
        &self.shared().settings
    }

    #[cfg(test)]
    fn inject_faults(&self, n: u32) {
        self.shared().store.inject_faults(n);
    }
}

fn gauge(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A ticket's sender and what it is told.
type Completion = (
    oneshot::Sender<Result<(), OutboxError>>,
    Result<(), OutboxError>,
);

/// Resolves the tickets of a batch from a task on the runtime that opened the outbox, so that
/// the writer thread wakes that one task per batch rather than each waiting request: every
/// wake of a runtime from another thread may cost a syscall and, on a shared core, a context
/// switch to the worker and back, for each ticket. Without a runtime (or once it is gone) the
/// writer resolves them itself.
struct Resolver {
    tx: Option<mpsc::UnboundedSender<Vec<Completion>>>,
}

/// The resolver task's queue. Dropped with the task (its runtime shutting down), it resolves
/// what is still queued, so that no written batch's tickets read as failed.
struct Completions(mpsc::UnboundedReceiver<Vec<Completion>>);

impl Drop for Completions {
    fn drop(&mut self) {
        self.0.close();
        while let Ok(completions) = self.0.try_recv() {
            for (ticket, result) in completions {
                let _ = ticket.send(result);
            }
        }
    }
}

impl Resolver {
    /// On the current runtime, if any. The runtime must go on running while the outbox is
    /// used (ficus opens it on the runtime that serves; a current-thread runtime left idle
    /// would leave tickets waiting). One that shuts down hands the resolving back to the
    /// writer.
    fn start() -> Resolver {
        let tx = tokio::runtime::Handle::try_current().ok().map(|runtime| {
            let (tx, rx) = mpsc::unbounded_channel::<Vec<Completion>>();
            let mut rx = Completions(rx);
            runtime.spawn(async move {
                while let Some(completions) = rx.0.recv().await {
                    for (ticket, result) in completions {
                        let _ = ticket.send(result);
                    }
                }
            });
            tx
        });
        Resolver { tx }
    }

    /// Tells each entry's ticket (when someone still holds it) its result.
    fn resolve<'a>(&self, entries: impl Iterator<Item = (&'a mut Entry, Result<(), OutboxError>)>) {
        let completions: Vec<Completion> = entries
            .filter_map(|(e, result)| e.ticket.take().map(|t| (t, result)))
            .filter(|(t, _)| !t.is_closed())
            .collect();
        if completions.is_empty() {
            return;
        }
        let completions = match &self.tx {
            Some(tx) => match tx.send(completions) {
                Ok(()) => return,
                Err(mpsc::error::SendError(back)) => back,
            },
            None => completions,
        };
        for (ticket, result) in completions {
            let _ = ticket.send(result);
        }
    }
}

/// Wakes the writer when dropped, whether its task ran or was dropped unrun.
struct WakeWriter(Arc<Shared>);

impl Drop for WakeWriter {
    fn drop(&mut self) {
        self.0.wake.notify_one();
    }
}

/// The writer thread: batches, writes, fsyncs, resolves. See "Writing" and "Write failures"
/// in the module docs.
fn write_loop(
    shared: &Shared,
    mut writer: log::SegmentWriter,
    durable: watch::Sender<u64>,
    resolver: Resolver,
) {
    let mut retry: Vec<Entry> = Vec::new();
    let mut backoff = Duration::from_millis(10);
    let mut attempts_after_close = 0;
    let mut payloads: Vec<Bytes> = Vec::new();
    let pace = shared.settings.durability == Durability::Async;
    loop {
        let started = Instant::now();
        let mut batch = std::mem::take(&mut retry);
        let closed = {
            let mut q = lock(&shared.queue);
            while batch.is_empty() && q.entries.is_empty() && !q.closed {
                q.writer_waiting = true;
                q = shared.wake.wait(q).unwrap_or_else(PoisonError::into_inner);
                q.writer_waiting = false;
                q.wake_scheduled = false;
            }
            let mut bytes: u64 = batch.iter().map(|e| e.bytes).sum();
            while let Some(e) = q.entries.front() {
                if !batch.is_empty() && bytes + e.bytes > MAX_BATCH_BYTES {
                    break;
                }
                bytes += e.bytes;
                if let Some(e) = q.entries.pop_front() {
                    batch.push(e);
                }
            }
            q.closed
        };
        if batch.is_empty() {
            break;
        }
        payloads.clear();
        payloads.extend(batch.iter().flat_map(|e| e.payloads.iter().cloned()));
        let records = payloads.len() as u64;
        let bytes: u64 = batch.iter().map(|e| e.bytes).sum();
        let first = batch.first().map_or(0, |e| e.first_seq);
        let result = writer.write_batch(&payloads).and_then(|range| {
            // The queue numbered these records; the log must agree, or seqs would lie.
            if range.start == first {
                Ok(range)
            } else {
                Err(OutboxError::Corrupt {
                    path: shared.settings.dir.clone(),
                    offset: 0,
                    reason: format!(
                        "writer at seq {} but the batch starts at seq {first}",
                        range.start
                    ),
                })
            }
        });
        match result {
            Ok(range) => {
                {
                    let mut q = lock(&shared.queue);
                    q.bytes -= bytes;
                    shared.queued_bytes.store(q.bytes, Ordering::Relaxed);
                }
                shared.metrics.unflushed.sub(gauge(records));
                shared.metrics.bytes.set(gauge(shared.store.bytes()));
                if lock(&shared.failure).take().is_some() {
                    tracing::info!("outbox writes succeed again");
                }
                backoff = Duration::from_millis(10);
                durable.send_replace(range.end);
                resolver.resolve(batch.iter_mut().map(|e| (e, Ok(()))));
                if pace && !closed {
                    // Appends meanwhile do not wake the writer (`writer_waiting` is false);
                    // a close cuts the pause short, so shutdown flushes at once.
                    let rest = ASYNC_COMMIT_INTERVAL.saturating_sub(started.elapsed());
                    let q = lock(&shared.queue);
                    drop(shared.wake.wait_timeout_while(q, rest, |q| !q.closed));
                }
            }
            Err(error) => {
                tracing::error!(%error, records, first_seq = first, "outbox write failed; the batch is kept in memory and retried");
                // Health first: whoever sees a failed ticket also sees an unhealthy outbox.
                let copies: Vec<OutboxError> = batch.iter().map(|_| error.duplicate()).collect();
                *lock(&shared.failure) = Some(Failure {
                    first_seq: first,
                    error,
                });
                shared.failed_attempts.fetch_add(1, Ordering::Release);
                resolver.resolve(batch.iter_mut().zip(copies.into_iter().map(Err)));
                // Wakes `flush` callers so they see the failure.
                durable.send_modify(|_| {});
                retry = batch;
                if closed {
                    // Shutting down: a few quick tries, then give up loudly.
                    attempts_after_close += 1;
                    if attempts_after_close > 3 {
                        let lost: usize = retry.iter().map(|e| e.payloads.len()).sum();
                        tracing::error!(
                            events = lost,
                            "outbox closed while writes fail: these events are lost"
                        );
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
                // Back off before retrying; a close cuts the wait short.
                let q = lock(&shared.queue);
                drop(shared.wake.wait_timeout_while(q, backoff, |q| !q.closed));
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    // A closed outbox leaves no preallocated zeros behind: the next start need not read them,
    // and `ficus outbox status` sees the directory as it is.
    writer.release_preallocation();
    tracing::debug!("outbox writer stopped");
}

/// Reads one sink's records in order, from its cursor. See [`Outbox::reader`].
pub struct Reader {
    store: log::Store,
    durable: watch::Receiver<u64>,
    position: u64,
    /// Taken while a read runs on the blocking pool; rebuilt at `position` if that read was
    /// cancelled.
    inner: Option<log::LogReader>,
}

impl Reader {
    /// The seq of the next record [`Reader::next`] returns.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Waits until a durable record at or after the position exists, then returns up to
    /// `max_records` consecutive records (about `max_bytes` of payload, at least one) and
    /// moves past them. Never returns a record that is not durable. Cancel-safe: if the
    /// future is dropped, the position is unchanged.
    pub async fn next(
        &mut self,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<Record>, OutboxError> {
        loop {
            self.ready().await?;
            let mut inner = match self.inner.take() {
                Some(r) => r,
                None => self.store.reader(self.position),
            };
            inner.seek(self.position);
            let (inner, result) = tokio::task::spawn_blocking(move || {
                let result = inner.read(max_records, max_bytes);
                (inner, result)
            })
            .await
            .map_err(|_| OutboxError::Closed)?;
            let records = result?;
            self.position = inner.position();
            self.inner = Some(inner);
            if !records.is_empty() {
                return Ok(records);
            }
            // The position was below the oldest retained record and moved up: wait again.
        }
    }

    /// Waits until a durable record at or after the position exists; [`Reader::next`] then
    /// returns without waiting. Cheap to cancel, where cancelling `next` during its read
    /// drops the open segment and the next read finds its place again by scanning the segment
    /// from its start: a caller that races the wait against timers races this instead.
    pub async fn ready(&mut self) -> Result<(), OutboxError> {
        loop {
            if self.position < *self.durable.borrow_and_update() {
                return Ok(());
            }
            if self.durable.changed().await.is_err() {
                if self.position < *self.durable.borrow() {
                    return Ok(());
                }
                return Err(OutboxError::Closed);
            }
        }
    }

    /// Moves the position, e.g. back to the committed cursor to retry a batch.
    pub fn seek(&mut self, seq: u64) {
        self.position = seq;
    }
}

/// One sink in [`Status`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkStatus {
    pub sink: String,
    /// Its persisted cursor (the oldest retained record when it has none).
    pub cursor: u64,
    /// Records at or after the cursor.
    pub pending: u64,
    /// Records in `dead/<sink>.log`.
    pub dead_letters: u64,
    /// Records in its replay files, waiting for delivery.
    pub replaying: u64,
}

/// What `ficus outbox status` shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub dir: PathBuf,
    /// Whether the directory exists: ficus makes it when it first starts with this config, so
    /// before that there is nothing pending (and every count is 0).
    pub created: bool,
    /// Bytes of segment files.
    pub bytes: u64,
    pub segments: usize,
    pub first_seq: u64,
    pub end_seq: u64,
    pub sinks: Vec<SinkStatus>,
}

/// Reads the state of an outbox directory without changing anything; safe while ficus runs
/// on it (a record being written is not counted yet). Every sink in `configured` is listed,
/// with those only the directory knows (removed from the config, their backlog kept); a sink
/// without a cursor yet starts at the oldest record kept, as its dispatcher will. A directory
/// that does not exist yet is an outbox with nothing in it (`created: false`), not an error:
/// ficus has not run with this config.
pub fn status(dir: &Path, configured: &[&str]) -> Result<Status, OutboxError> {
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            return Err(io_err(dir, "open outbox directory")(io::Error::new(
                io::ErrorKind::NotADirectory,
                "not a directory",
            )))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let sinks = configured
                .iter()
                .map(|name| SinkStatus {
                    sink: (*name).to_string(),
                    cursor: 0,
                    pending: 0,
                    dead_letters: 0,
                    replaying: 0,
                })
                .collect();
            return Ok(Status {
                dir: dir.to_path_buf(),
                created: false,
                bytes: 0,
                segments: 0,
                first_seq: 0,
                end_seq: 0,
                sinks,
            });
        }
        Err(e) => return Err(io_err(dir, "open outbox directory")(e)),
    }
    let layout = log::Layout::new(dir);
    let cursors = cursor::load_all(&layout.cursors, false)?;
    let summary = if layout.segments.is_dir() {
        log::summarize(&layout.segments)?
    } else {
        log::SegmentSummary {
            bytes: 0,
            segments: 0,
            first_seq: None,
            end_seq: None,
        }
    };
    let first_seq = summary
        .first_seq
        .unwrap_or_else(|| cursors.values().copied().max().unwrap_or(0));
    let end_seq = summary.end_seq.unwrap_or(first_seq).max(first_seq);
    let listing = dead::list(&layout.dead)?;
    let mut names: BTreeSet<String> = cursors.keys().cloned().collect();
    names.extend(configured.iter().map(|s| (*s).to_string()));
    names.extend(listing.logs.iter().cloned());
    names.extend(listing.replays.iter().map(|(s, _, _)| s.clone()));
    let mut sinks = Vec::new();
    for sink in names {
        let cursor = cursors
            .get(&sink)
            .map_or(first_seq, |c| (*c).clamp(first_seq, end_seq));
        let dead_letters = count_if_present(&dead::log_path(&layout.dead, &sink))?;
        let mut replaying = 0;
        for (_, _, path) in listing.replays.iter().filter(|(s, _, _)| *s == sink) {
            replaying += count_if_present(path)?;
        }
        sinks.push(SinkStatus {
            pending: end_seq - cursor,
            sink,
            cursor,
            dead_letters,
            replaying,
        });
    }
    Ok(Status {
        dir: dir.to_path_buf(),
        created: true,
        bytes: summary.bytes,
        segments: summary.segments,
        first_seq,
        end_seq,
        sinks,
    })
}

/// Records in a dead-letter or replay file; 0 when it is gone (replayed or finished just now).
fn count_if_present(path: &Path) -> Result<u64, OutboxError> {
    match dead::read_file(path, false) {
        Ok((_, n)) => Ok(n),
        Err(OutboxError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

/// Moves `dead/<sink>.log` (every sink's when `None`) to `dead/<sink>.replay-<unix_nanos>`
/// with an atomic rename; returns the records moved (0 when the outbox was not made yet). A
/// running ficus's dispatcher picks the files up through [`Outbox::pending_replay`], a
/// stopped one at its next start.
pub fn replay(dir: &Path, sink: Option<&str>) -> Result<u64, OutboxError> {
    dead::replay(&log::Layout::new(dir).dead, sink)
}

#[cfg(test)]
mod tests;
