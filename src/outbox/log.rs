//! The synchronous core of the outbox: plain `std::fs` IO, no threads, no async.
//!
//! [`open`] recovers a directory and returns its two halves:
//!
//! - [`SegmentWriter`], the only thing that writes segments: [`SegmentWriter::append`] writes
//!   records (no fsync), [`SegmentWriter::sync`] makes them durable, and
//!   [`SegmentWriter::write_batch`] does both and undoes a failed batch on disk.
//! - [`Store`], shared and cheap to clone: the segment list, the durable end, the cursors,
//!   commits and segment deletion, and [`LogReader`]s.
//!
//! The async [`crate::outbox::Outbox`] moves the writer into its writer thread and keeps the
//! store; tests drive both halves directly, so that a crash is simply dropping them.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Seek, SeekFrom};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;

use super::format::{self, Decoded, FILE_HEADER_LEN, RECORD_HEADER_LEN, SEGMENT_MAGIC};
use super::spare::{self, Spare};
use super::{cursor, io_err, OutboxError, Record};

/// Smallest accepted `segment_bytes`: a header and a few records.
pub const MIN_SEGMENT_BYTES: u64 = 1024;

/// The directories of an outbox.
#[derive(Debug, Clone)]
pub struct Layout {
    pub dir: PathBuf,
    pub segments: PathBuf,
    pub cursors: PathBuf,
    pub dead: PathBuf,
}

impl Layout {
    pub fn new(dir: &Path) -> Layout {
        Layout {
            dir: dir.to_path_buf(),
            segments: dir.join("segments"),
            cursors: dir.join("cursors"),
            dead: dir.join("dead"),
        }
    }

    /// Creates the directories that are missing, durably (each new entry's parent is fsynced).
    fn create(&self) -> Result<(), OutboxError> {
        if !self.dir.is_dir() {
            fs::create_dir_all(&self.dir).map_err(io_err(&self.dir, "create outbox directory"))?;
            if let Some(parent) = self.dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                cursor::sync_dir(parent)?;
            }
        }
        let mut created = false;
        for sub in [&self.segments, &self.cursors, &self.dead] {
            if !sub.is_dir() {
                fs::create_dir(sub).map_err(io_err(sub, "create outbox directory"))?;
                created = true;
            }
        }
        if created {
            cursor::sync_dir(&self.dir)?;
        }
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere while holding the lock leaves data that is still consistent here:
    // every critical section either completes its update or returns before making it.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One segment file. `bytes` is exact for every segment but the active one, whose size the
/// writer tracks itself (the store's byte total includes it).
#[derive(Debug, Clone)]
struct Segment {
    first_seq: u64,
    path: PathBuf,
    bytes: u64,
}

struct StoreInner {
    layout: Layout,
    max_payload: u64,
    /// Sorted by `first_seq`; never empty after open; the last one is the writer's.
    segments: Mutex<Vec<Segment>>,
    /// The persisted cursors, by sink (a mirror of `cursors/`: only this process writes it).
    /// Held across a commit's file write and the segment deletion it allows, so that a sink
    /// registering meanwhile cannot be placed on a segment that is being deleted.
    cursors: Mutex<BTreeMap<String, u64>>,
    /// Bytes of all segment files.
    bytes: AtomicU64,
    /// One past the last record known to be on disk (fsynced).
    durable_end: AtomicU64,
    /// fdatasync calls on segment files, for tests and benches.
    syncs: AtomicU64,
    /// A segment every cursor passed is kept for recycling only while the records and two
    /// segments stay below this (`max_bytes`; see the `spare` module).
    recycle_limit: AtomicU64,
    /// Set when a segment was moved to `segments/recycled`; the writer clears it when it
    /// takes one, so that it looks at the disk only when there is something to take.
    recycled: AtomicBool,
    /// Injected write/fsync failures (tests of the error paths): fault points to let pass,
    /// then how many to fail.
    #[cfg(test)]
    faults: Mutex<(u32, u32)>,
}

/// The shared half of an open outbox. See the module docs.
#[derive(Clone)]
pub struct Store {
    inner: Arc<StoreInner>,
}

/// The state of the last successful sync: what a failed write is rolled back to.
#[derive(Debug, Clone, Copy)]
struct Checkpoint {
    /// The segment that was active then, and its length.
    first_seq: u64,
    len: u64,
    /// `durable_end` then.
    end: u64,
}

/// The writing half of an open outbox. See the module docs.
pub struct SegmentWriter {
    store: Store,
    segment_bytes: u64,
    /// The active segment. Records are written at `len` with positioned writes.
    file: File,
    first_seq: u64,
    len: u64,
    /// The active segment's size on disk: past `len` it holds zeros (a spare segment, see
    /// the `spare` module). A write below it changes no metadata, so its fdatasync flushes
    /// data only; a write past it grows the file.
    allocated: u64,
    spare: Spare,
    /// No spare is made while the records and two segments would pass this (`max_bytes`).
    preallocation_limit: u64,
    next_seq: u64,
    checkpoint: Checkpoint,
    /// Set when a write or fsync failed: the tail of the active segment is unknown until
    /// [`SegmentWriter::rollback`] cuts it back to the checkpoint.
    poisoned: bool,
    buf: Vec<u8>,
}

/// What recovery found, for logs and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Bytes cut off the end of the last segment (a torn or damaged tail).
    pub truncated_bytes: u64,
    /// Segments deleted at open because every cursor had passed them.
    pub deleted_segments: usize,
}

/// Opens (creating if needed) and recovers the outbox in `dir`. See the parent module docs,
/// "Recovery".
pub fn open(
    dir: &Path,
    segment_bytes: u64,
) -> Result<(SegmentWriter, Store, Recovery), OutboxError> {
    if segment_bytes < MIN_SEGMENT_BYTES {
        return Err(OutboxError::Settings(format!(
            "segment_bytes is {segment_bytes}, at least {MIN_SEGMENT_BYTES} is needed"
        )));
    }
    let layout = Layout::new(dir);
    layout.create()?;
    let recycled = spare::adopt_leftovers(&layout.segments);
    let mut recovery = Recovery::default();
    let mut cursors = cursor::load_all(&layout.cursors, true)?;
    let mut segments = list_segments(&layout.segments)?;

    // Earlier segments were fsynced before the next one was created: their headers are
    // checked here, their records by every reader.
    let last = segments.pop();
    for seg in &mut segments {
        let first = read_segment_header(&seg.path)?;
        if first != seg.first_seq {
            return Err(OutboxError::Corrupt {
                path: seg.path.clone(),
                offset: 0,
                reason: format!(
                    "header says first seq {first}, the file name {}",
                    seg.first_seq
                ),
            });
        }
        seg.bytes = fs::metadata(&seg.path)
            .map_err(io_err(&seg.path, "stat segment"))?
            .len();
    }
    let syncs = AtomicU64::new(0);
    let (file, active, next_seq) = match last {
        Some(seg) => {
            let (file, len, next_seq, cut) = recover_last(&seg, &syncs)?;
            recovery.truncated_bytes = cut;
            (file, Segment { bytes: len, ..seg }, next_seq)
        }
        None => {
            // A new outbox, or one whose segments were all removed by hand. Seqs then start
            // at the highest cursor, so that no sink takes new records for done ones.
            let start = cursors.values().copied().max().unwrap_or(0);
            if start > 0 {
                tracing::warn!(dir = %layout.segments.display(), start, "no segment files but cursors exist: starting at the highest cursor");
            }
            let (file, path) = create_segment(&layout.segments, start, &syncs, &|_| Ok(()))?;
            let seg = Segment {
                first_seq: start,
                path,
                bytes: FILE_HEADER_LEN,
            };
            (file, seg, start)
        }
    };

    // A cursor past the end: the records it had passed were lost (a damaged tail was cut).
    // Left there, the sink would skip the new records that reuse those seqs.
    for (sink, next) in cursors.iter_mut() {
        if *next > next_seq {
            tracing::warn!(sink = %sink, cursor = *next, end = next_seq, "cursor past the end of the outbox: moved back to the end");
            cursor::write(&layout.cursors, sink, next_seq)?;
            *next = next_seq;
        }
    }

    let max_payload =
        (segment_bytes - FILE_HEADER_LEN - RECORD_HEADER_LEN).min(u64::from(u32::MAX));
    let first_seq = active.first_seq;
    let len = active.bytes;
    segments.push(active);
    let total: u64 = segments.iter().map(|s| s.bytes).sum();
    let store = Store {
        inner: Arc::new(StoreInner {
            layout,
            max_payload,
            segments: Mutex::new(segments),
            cursors: Mutex::new(cursors),
            bytes: AtomicU64::new(total),
            durable_end: AtomicU64::new(next_seq),
            syncs,
            recycle_limit: AtomicU64::new(u64::MAX),
            recycled: AtomicBool::new(recycled),
            #[cfg(test)]
            faults: Mutex::new((0, 0)),
        }),
    };
    // A crash between a cursor commit and its deletions leaves segments that are done.
    {
        let cursors = lock(&store.inner.cursors);
        if let Some(min) = cursors.values().copied().min() {
            recovery.deleted_segments = store.delete_below(min)?;
        }
    }
    let writer = SegmentWriter {
        store: store.clone(),
        segment_bytes,
        file,
        first_seq,
        len,
        allocated: len,
        spare: Spare::new(),
        preallocation_limit: u64::MAX,
        next_seq,
        checkpoint: Checkpoint {
            first_seq,
            len,
            end: next_seq,
        },
        poisoned: false,
        buf: Vec::new(),
    };
    Ok((writer, store, recovery))
}

/// The segment files in `dir`, sorted, with unknown files ignored.
fn list_segments(dir: &Path) -> Result<Vec<Segment>, OutboxError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir, "list segment directory"))? {
        let entry = entry.map_err(io_err(dir, "list segment directory"))?;
        let name = entry.file_name();
        match name.to_str().and_then(format::parse_segment_file_name) {
            Some(first_seq) => out.push(Segment {
                first_seq,
                path: entry.path(),
                bytes: 0,
            }),
            None => {
                tracing::debug!(file = %entry.path().display(), "ignoring a file that is not a segment")
            }
        }
    }
    out.sort_by_key(|s| s.first_seq);
    Ok(out)
}

/// Reads and checks a segment header; returns its first seq.
fn read_segment_header(path: &Path) -> Result<u64, OutboxError> {
    let mut buf = [0u8; FILE_HEADER_LEN as usize];
    let n = File::open(path)
        .and_then(|mut f| format::read_full(&mut f, &mut buf))
        .map_err(io_err(path, "read segment header"))?;
    format::decode_header(&buf[..n], SEGMENT_MAGIC).map_err(|p| OutboxError::Corrupt {
        path: path.to_path_buf(),
        offset: 0,
        reason: p.to_string(),
    })
}

/// Recovers the last segment: checks every record, cuts a torn or damaged tail, fsyncs what
/// is left (so that everything a reader is given after a restart is on disk). Returns the
/// file opened for writing, its length, the next seq and the bytes cut (the zeros or old
/// records a spare segment had past the last record are cut too, but not counted: nothing
/// was lost there).
fn recover_last(seg: &Segment, syncs: &AtomicU64) -> Result<(File, u64, u64, u64), OutboxError> {
    let path = &seg.path;
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_err(path, "open last segment"))?;
    let file_len = file
        .metadata()
        .map_err(io_err(path, "stat last segment"))?
        .len();
    let mut header = [0u8; FILE_HEADER_LEN as usize];
    let n =
        format::read_full(&mut file, &mut header).map_err(io_err(path, "read segment header"))?;
    match format::decode_header(&header[..n], SEGMENT_MAGIC) {
        Ok(first) if first == seg.first_seq => {}
        Ok(first) => {
            return Err(OutboxError::Corrupt {
                path: path.clone(),
                offset: 0,
                reason: format!(
                    "header says first seq {first}, the file name {}",
                    seg.first_seq
                ),
            })
        }
        Err(problem) if file_len <= FILE_HEADER_LEN => {
            // The header is fsynced before any record is written to the file: a bad header
            // with nothing after it is a crash while the segment was being created.
            tracing::warn!(file = %path.display(), %problem, "rewriting the header of a segment created just before a crash");
            file.set_len(0)
                .map_err(io_err(path, "truncate torn segment"))?;
            file.write_all_at(&format::encode_header(SEGMENT_MAGIC, seg.first_seq), 0)
                .map_err(io_err(path, "write segment header"))?;
            file.sync_data().map_err(io_err(path, "fsync segment"))?;
            syncs.fetch_add(1, Ordering::Relaxed);
            return Ok((file, FILE_HEADER_LEN, seg.first_seq, file_len));
        }
        Err(problem) => {
            // Records follow, so this header was once good: damage, not a crash. Refuse
            // rather than guess which records are ours.
            return Err(OutboxError::Corrupt {
                path: path.clone(),
                offset: 0,
                reason: problem.to_string(),
            });
        }
    }
    let end = format::scan(
        &mut BufReader::new(&mut file),
        FILE_HEADER_LEN,
        Some(seg.first_seq),
        |_, _| {},
    )
    .map_err(io_err(path, "read last segment"))?;
    let mut cut = 0;
    if end.good_len < file_len
        && (end.behind
            || zeros_from(&mut file, end.good_len).map_err(io_err(path, "read last segment"))?)
    {
        tracing::debug!(file = %path.display(), bytes = file_len - end.good_len, "cutting the unused tail (zeros, or a recycled segment's old records) of a preallocated last segment");
        file.set_len(end.good_len)
            .map_err(io_err(path, "truncate preallocated tail"))?;
    } else if end.good_len < file_len {
        cut = file_len - end.good_len;
        tracing::warn!(
            file = %path.display(),
            bytes_cut = cut,
            kept_records = end.records,
            next_seq = end.next_seq,
            reason = end.stopped.as_deref().unwrap_or("trailing bytes"),
            "truncating the torn or damaged tail of the last segment"
        );
        file.set_len(end.good_len)
            .map_err(io_err(path, "truncate torn tail"))?;
    }
    file.sync_data().map_err(io_err(path, "fsync segment"))?;
    syncs.fetch_add(1, Ordering::Relaxed);
    Ok((file, end.good_len, end.next_seq, cut))
}

/// Whether every byte of `file` from `offset` to its end is zero: the unused part of a
/// preallocated segment rather than a torn or damaged record.
fn zeros_from(file: &mut File, offset: u64) -> io::Result<bool> {
    file.seek(SeekFrom::Start(offset))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = format::read_full(file, &mut buf)?;
        if buf[..n].iter().any(|&b| b != 0) {
            return Ok(false);
        }
        if n < buf.len() {
            return Ok(true);
        }
    }
}

/// Creates a segment file holding only its header, durably: the header is fsynced, then the
/// directory, before any record goes into it.
fn create_segment(
    dir: &Path,
    first_seq: u64,
    syncs: &AtomicU64,
    fault: &dyn Fn(&str) -> io::Result<()>,
) -> Result<(File, PathBuf), OutboxError> {
    let path = dir.join(format::segment_file_name(first_seq));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(io_err(&path, "create segment"))?;
    let made =
        write_header(&file, &path, first_seq, syncs, fault).and_then(|()| sync_dir(dir, fault));
    match made {
        Ok(()) => Ok((file, path)),
        Err(e) => Err(unmake(&path, e)),
    }
}

/// Writes a new segment's header at offset 0 of `file` (at `path`) and fsyncs it.
fn write_header(
    file: &File,
    path: &Path,
    first_seq: u64,
    syncs: &AtomicU64,
    fault: &dyn Fn(&str) -> io::Result<()>,
) -> Result<(), OutboxError> {
    fault("write")
        .and_then(|()| file.write_all_at(&format::encode_header(SEGMENT_MAGIC, first_seq), 0))
        .map_err(io_err(path, "write segment header"))?;
    fault("fsync")
        .and_then(|()| file.sync_data())
        .map_err(io_err(path, "fsync segment"))?;
    syncs.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// [`cursor::sync_dir`], with the tests' fault point in front.
fn sync_dir(dir: &Path, fault: &dyn Fn(&str) -> io::Result<()>) -> Result<(), OutboxError> {
    fault("fsync").map_err(io_err(dir, "fsync directory"))?;
    cursor::sync_dir(dir)
}

/// Deletes the next segment whose making failed, so that the retry can make it again (it
/// would find the name taken) and the directory holds only segments the writer knows.
/// Should the delete fail too, recovery at the next start reads the file as a segment made
/// just before a crash.
fn unmake(path: &Path, e: OutboxError) -> OutboxError {
    if let Err(again) = fs::remove_file(path) {
        if again.kind() != io::ErrorKind::NotFound {
            tracing::error!(file = %path.display(), error = %again, "outbox: cannot delete a segment whose making failed; writes fail until ficus restarts");
        }
    }
    e
}

/// Makes a spare (zero-filled, or a recycled segment) at `spare` the segment starting at
/// `first_seq`, durably, as [`create_segment`] makes a new one: header written and fsynced,
/// then the rename and the directory fsynced, before any record goes into it. On failure the
/// spare is gone (deleted, under either name): the retry makes a segment that grows as it is
/// written.
fn install_spare(
    dir: &Path,
    file: File,
    spare: &Path,
    first_seq: u64,
    syncs: &AtomicU64,
    fault: &dyn Fn(&str) -> io::Result<()>,
) -> Result<(File, PathBuf), OutboxError> {
    let path = dir.join(format::segment_file_name(first_seq));
    if path.exists() {
        return Err(unmake(
            spare,
            OutboxError::Corrupt {
                path,
                offset: 0,
                reason: "a segment with this first seq exists already".into(),
            },
        ));
    }
    let header = write_header(&file, spare, first_seq, syncs, fault)
        .and_then(|()| fs::rename(spare, &path).map_err(io_err(spare, "rename the spare segment")));
    if let Err(e) = header {
        return Err(unmake(spare, e));
    }
    match sync_dir(dir, fault) {
        Ok(()) => Ok((file, path)),
        Err(e) => Err(unmake(&path, e)),
    }
}

impl SegmentWriter {
    /// Writes `payloads` as consecutive records (one write per segment touched), rolling over
    /// to a new segment when the active one would pass `segment_bytes`. Not durable until
    /// [`SegmentWriter::sync`]. On error nothing after the last sync is kept.
    pub fn append(&mut self, payloads: &[Bytes]) -> Result<Range<u64>, OutboxError> {
        let max = self.store.inner.max_payload;
        if let Some(p) = payloads.iter().find(|p| p.len() as u64 > max) {
            return Err(OutboxError::TooLarge { size: p.len(), max });
        }
        if self.poisoned {
            self.rollback()?;
        }
        let start = self.next_seq;
        match self.append_inner(payloads) {
            Ok(()) => Ok(start..self.next_seq),
            Err(e) => Err(self.fail(e)),
        }
    }

    /// fdatasyncs the active segment; everything appended is then durable. Returns the new
    /// durable end.
    pub fn sync(&mut self) -> Result<u64, OutboxError> {
        if self.poisoned {
            self.rollback()?;
        }
        if self.next_seq == self.checkpoint.end && self.len == self.checkpoint.len {
            return Ok(self.next_seq);
        }
        if let Err(e) = self.fault("fsync").and_then(|()| self.file.sync_data()) {
            let path = self.active_path();
            return Err(self.fail(io_err(&path, "fsync segment")(e)));
        }
        self.store.inner.syncs.fetch_add(1, Ordering::Relaxed);
        self.checkpoint = Checkpoint {
            first_seq: self.first_seq,
            len: self.len,
            end: self.next_seq,
        };
        self.store
            .inner
            .durable_end
            .store(self.next_seq, Ordering::Release);
        Ok(self.next_seq)
    }

    /// [`SegmentWriter::append`] and [`SegmentWriter::sync`]: the group commit of one batch.
    /// On error the batch is not on disk (it was cut off again, or will be before the next
    /// write) and the same payloads may be written again with the same seqs.
    pub fn write_batch(&mut self, payloads: &[Bytes]) -> Result<Range<u64>, OutboxError> {
        let range = self.append(payloads)?;
        self.sync()?;
        Ok(range)
    }

    /// Cuts the active segment's unused preallocated zeros (at a clean close). A failure
    /// only leaves them for recovery to cut, so it is logged, not returned.
    pub fn release_preallocation(&mut self) {
        if self.poisoned || self.allocated <= self.len {
            return;
        }
        let path = self.active_path();
        match self
            .file
            .set_len(self.len)
            .and_then(|()| self.file.sync_data())
        {
            Ok(()) => self.allocated = self.len,
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot cut the unused zeros of the last segment; the next start will")
            }
        }
    }

    /// Makes no zero-filled spare segment while the records and two segments would pass
    /// `limit` bytes, so that preallocation does not take the last of a disk sized for
    /// `max_bytes`.
    pub fn limit_preallocation(&mut self, limit: u64) {
        self.preallocation_limit = limit;
    }

    /// Keeps no passed segment for recycling while the records and two segments would pass
    /// `limit` bytes (as [`SegmentWriter::limit_preallocation`]).
    pub fn limit_recycling(&self, limit: u64) {
        self.store
            .inner
            .recycle_limit
            .store(limit, Ordering::Relaxed);
    }

    /// The seq the next appended record gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The active segment and its durable length (what a crash cannot take away).
    pub fn durable_position(&self) -> (PathBuf, u64) {
        (
            self.store
                .inner
                .layout
                .segments
                .join(format::segment_file_name(self.checkpoint.first_seq)),
            self.checkpoint.len,
        )
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    fn active_path(&self) -> PathBuf {
        self.store
            .inner
            .layout
            .segments
            .join(format::segment_file_name(self.first_seq))
    }

    fn append_inner(&mut self, payloads: &[Bytes]) -> Result<(), OutboxError> {
        // A segment that grows as it is written leaves as soon as a preallocated one is
        // ready (see the `spare` module); an empty one stays, as its successor would have
        // the same name.
        if self.len >= self.allocated
            && self.next_seq > self.first_seq
            && (self.spare.ready() || self.store.inner.recycled.load(Ordering::Acquire))
        {
            self.roll()?;
        }
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        let mut result = Ok(());
        for p in payloads {
            let frame = format::frame_len(p.len());
            let used = self.len + buf.len() as u64;
            if used + frame > self.segment_bytes && used > FILE_HEADER_LEN {
                result = self.write_out(&buf).and_then(|()| self.roll());
                buf.clear();
                if result.is_err() {
                    break;
                }
            }
            format::encode_record(&mut buf, self.next_seq, p);
            self.next_seq += 1;
        }
        if result.is_ok() {
            result = self.write_out(&buf);
        }
        // In a segment that was itself a spare, the zeros wait until half of it is used: by
        // then the segment before was usually passed and recycled, which costs nothing.
        let start_at = if self.allocated > self.len {
            self.segment_bytes / 2
        } else {
            spare::START_AFTER.min(self.segment_bytes / 2)
        };
        if self.len - FILE_HEADER_LEN >= start_at
            && !self.store.inner.recycled.load(Ordering::Acquire)
            && self.store.bytes().saturating_add(2 * self.segment_bytes) <= self.preallocation_limit
        {
            self.spare
                .start(&self.store.inner.layout.segments, self.segment_bytes);
        }
        // Keep the allocation for the next batch, but not a huge one.
        if buf.capacity() <= 8 << 20 {
            self.buf = buf;
        }
        result
    }

    fn write_out(&mut self, buf: &[u8]) -> Result<(), OutboxError> {
        if buf.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.fault("write") {
            // Only in tests: a write cut short by the failure.
            let _ = self.file.write_all_at(&buf[..buf.len() / 2], self.len);
            self.allocated = self.allocated.max(self.len + (buf.len() / 2) as u64);
            return Err(io_err(&self.active_path(), "write segment")(e));
        }
        let written = self.file.write_all_at(buf, self.len);
        // Even a failed write may have grown the file; the rollback cuts it back.
        self.allocated = self.allocated.max(self.len + buf.len() as u64);
        if let Err(e) = written {
            return Err(io_err(&self.active_path(), "write segment")(e));
        }
        self.len += buf.len() as u64;
        self.store
            .inner
            .bytes
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Closes the full active segment (fsynced: everything in a non-last segment is on disk)
    /// and starts the next one at `next_seq`.
    fn roll(&mut self) -> Result<(), OutboxError> {
        let old = self.active_path();
        // A complete segment ends with its last record: readers and recovery of earlier
        // segments know nothing of preallocated zeros.
        if self.allocated > self.len {
            self.file
                .set_len(self.len)
                .map_err(io_err(&old, "cut the unused zeros of a segment"))?;
            self.allocated = self.len;
        }
        self.fault("fsync")
            .and_then(|()| self.file.sync_data())
            .map_err(io_err(&old, "fsync segment"))?;
        self.store.inner.syncs.fetch_add(1, Ordering::Relaxed);
        let dir = &self.store.inner.layout.segments;
        let syncs = &self.store.inner.syncs;
        let prepared = match self.spare.take() {
            Some(file) => Some((file, dir.join(spare::SPARE_FILE), self.segment_bytes)),
            None if self.store.inner.recycled.swap(false, Ordering::AcqRel) => {
                spare::take_recycled(dir)
            }
            None => None,
        };
        let fault = |w: &str| self.fault(w);
        let (file, path, allocated) = match prepared {
            Some((spare, from, size)) => {
                let (file, path) = install_spare(dir, spare, &from, self.next_seq, syncs, &fault)?;
                (file, path, size.max(FILE_HEADER_LEN))
            }
            None => {
                let (file, path) = create_segment(dir, self.next_seq, syncs, &fault)?;
                (file, path, FILE_HEADER_LEN)
            }
        };
        {
            let mut segs = lock(&self.store.inner.segments);
            if let Some(last) = segs.last_mut() {
                last.bytes = self.len;
            }
            segs.push(Segment {
                first_seq: self.next_seq,
                path,
                bytes: FILE_HEADER_LEN,
            });
        }
        self.store
            .inner
            .bytes
            .fetch_add(FILE_HEADER_LEN, Ordering::Relaxed);
        self.file = file;
        self.first_seq = self.next_seq;
        self.len = FILE_HEADER_LEN;
        self.allocated = allocated;
        Ok(())
    }

    /// Records a failure: the writer is poisoned until the disk is back at the checkpoint.
    /// The rollback is tried at once; if it fails it is tried again before the next write.
    fn fail(&mut self, e: OutboxError) -> OutboxError {
        self.poisoned = true;
        if let Err(again) = self.rollback() {
            tracing::error!(error = %again, "outbox: cannot undo a failed write yet; will retry before the next write");
        }
        e
    }

    /// Puts the disk back at the last checkpoint: segments created since are deleted and the
    /// checkpoint's segment is cut to its durable length. Nothing after the checkpoint was
    /// reported durable or shown to a reader, so nothing anyone saw is lost.
    fn rollback(&mut self) -> Result<(), OutboxError> {
        let cp = self.checkpoint;
        let inner = &self.store.inner;
        let mut segs = lock(&inner.segments);
        // The active segment's entry does not track its size (the writer does); every other
        // entry's size was fixed when it was rolled over.
        let size = |seg: &Segment, first_seq: u64, len: u64| {
            if seg.first_seq == first_seq {
                len
            } else {
                seg.bytes
            }
        };
        while let Some(last) = segs.last() {
            if last.first_seq <= cp.first_seq {
                break;
            }
            match fs::remove_file(&last.path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&last.path, "delete segment of a failed write")(e)),
            }
            inner
                .bytes
                .fetch_sub(size(last, self.first_seq, self.len), Ordering::Relaxed);
            segs.pop();
        }
        match segs.last_mut() {
            Some(seg) if seg.first_seq == cp.first_seq => {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&seg.path)
                    .map_err(io_err(&seg.path, "reopen segment"))?;
                file.set_len(cp.len)
                    .map_err(io_err(&seg.path, "truncate failed write"))?;
                file.sync_data()
                    .map_err(io_err(&seg.path, "fsync segment"))?;
                inner.syncs.fetch_add(1, Ordering::Relaxed);
                inner
                    .bytes
                    .fetch_sub(size(seg, self.first_seq, self.len), Ordering::Relaxed);
                inner.bytes.fetch_add(cp.len, Ordering::Relaxed);
                seg.bytes = cp.len;
                self.file = file;
                self.first_seq = cp.first_seq;
                self.len = cp.len;
                self.allocated = cp.len;
            }
            _ => {
                // The checkpoint's segment was complete and every cursor had passed it, so a
                // commit deleted it: start a fresh segment where it ended.
                let (file, path) =
                    create_segment(&inner.layout.segments, cp.end, &inner.syncs, &|w| {
                        self.fault(w)
                    })?;
                segs.push(Segment {
                    first_seq: cp.end,
                    path,
                    bytes: FILE_HEADER_LEN,
                });
                inner.bytes.fetch_add(FILE_HEADER_LEN, Ordering::Relaxed);
                self.file = file;
                self.first_seq = cp.end;
                self.len = FILE_HEADER_LEN;
                self.allocated = FILE_HEADER_LEN;
                self.checkpoint = Checkpoint {
                    first_seq: cp.end,
                    len: FILE_HEADER_LEN,
                    end: cp.end,
                };
            }
        }
        drop(segs);
        cursor::sync_dir(&inner.layout.segments)?;
        self.next_seq = cp.end;
        self.poisoned = false;
        Ok(())
    }

    /// Whether a spare segment is ready to be rolled into (tests wait for its thread).
    #[cfg(test)]
    pub(crate) fn spare_ready(&mut self) -> bool {
        self.spare.ready()
    }

    #[cfg(test)]
    fn fault(&self, what: &str) -> io::Result<()> {
        let mut plan = lock(&self.store.inner.faults);
        match *plan {
            (0, 0) => Ok(()),
            (0, ref mut fail) => {
                *fail -= 1;
                Err(io::Error::other(format!("injected {what} failure")))
            }
            (ref mut skip, _) => {
                *skip -= 1;
                Ok(())
            }
        }
    }

    #[cfg(not(test))]
    fn fault(&self, _what: &str) -> io::Result<()> {
        Ok(())
    }
}

impl Store {
    pub fn layout(&self) -> &Layout {
        &self.inner.layout
    }

    /// The largest payload a record can hold.
    pub fn max_payload(&self) -> u64 {
        self.inner.max_payload
    }

    /// The oldest retained seq.
    pub fn first_seq(&self) -> u64 {
        lock(&self.inner.segments)
            .first()
            .map_or(0, |s| s.first_seq)
    }

    /// One past the last durable record.
    pub fn durable_end(&self) -> u64 {
        self.inner.durable_end.load(Ordering::Acquire)
    }

    /// Bytes of all segment files.
    pub fn bytes(&self) -> u64 {
        self.inner.bytes.load(Ordering::Relaxed)
    }

    /// fdatasync calls on segment files since open.
    pub fn sync_count(&self) -> u64 {
        self.inner.syncs.load(Ordering::Relaxed)
    }

    /// The segments, oldest first: first seq and path.
    pub fn segments(&self) -> Vec<(u64, PathBuf)> {
        lock(&self.inner.segments)
            .iter()
            .map(|s| (s.first_seq, s.path.clone()))
            .collect()
    }

    /// `sink`'s persisted cursor, clamped to the oldest retained record.
    pub fn cursor(&self, sink: &str) -> Option<u64> {
        let first = self.first_seq();
        lock(&self.inner.cursors).get(sink).map(|c| (*c).max(first))
    }

    /// Every persisted cursor, by sink (as stored, not clamped).
    pub fn cursors(&self) -> BTreeMap<String, u64> {
        lock(&self.inner.cursors).clone()
    }

    /// Returns `sink`'s cursor, first persisting one at the oldest retained record for a sink
    /// that has none: from then on its backlog is kept for it.
    pub fn register(&self, sink: &str) -> Result<u64, OutboxError> {
        check_sink(sink)?;
        let mut cursors = lock(&self.inner.cursors);
        let first = self.first_seq();
        if let Some(c) = cursors.get(sink) {
            return Ok((*c).max(first));
        }
        cursor::write(&self.inner.layout.cursors, sink, first)?;
        cursors.insert(sink.to_string(), first);
        Ok(first)
    }

    /// Persists `sink`'s cursor (every record below `next` is done), then deletes the
    /// segments every cursor has passed.
    pub fn commit(&self, sink: &str, next: u64) -> Result<(), OutboxError> {
        check_sink(sink)?;
        let end = self.durable_end();
        if next > end {
            return Err(OutboxError::CursorBeyondEnd {
                sink: sink.to_string(),
                next,
                end,
            });
        }
        let mut cursors = lock(&self.inner.cursors);
        cursor::write(&self.inner.layout.cursors, sink, next)?;
        cursors.insert(sink.to_string(), next);
        if let Some(min) = cursors.values().copied().min() {
            self.delete_below(min)?;
        }
        Ok(())
    }

    /// Deletes, oldest first, every segment but the active one whose records are all below
    /// `min`, keeping one (the largest) for recycling when there is room (see the `spare`
    /// module). Called with the cursors lock held. Returns how many went.
    fn delete_below(&self, min: u64) -> Result<usize, OutboxError> {
        let mut deleted = 0;
        {
            let mut segs = lock(&self.inner.segments);
            while segs.len() > 1 && segs[1].first_seq <= min {
                let seg = &segs[0];
                let rest = self.bytes().saturating_sub(seg.bytes);
                let keep = rest.saturating_add(seg.bytes.saturating_mul(2))
                    <= self.inner.recycle_limit.load(Ordering::Relaxed)
                    && spare::recycle(&seg.path, &self.inner.layout.segments, seg.bytes);
                if keep {
                    self.inner.recycled.store(true, Ordering::Release);
                } else {
                    match fs::remove_file(&seg.path) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => return Err(io_err(&seg.path, "delete segment")(e)),
                    }
                    tracing::debug!(file = %seg.path.display(), "deleted a segment every cursor has passed");
                }
                self.inner.bytes.fetch_sub(seg.bytes, Ordering::Relaxed);
                segs.remove(0);
                deleted += 1;
            }
        }
        if deleted > 0 {
            // Not needed for safety (a deleted segment that comes back after a crash is below
            // every cursor and is deleted again at open), but it keeps disk usage honest.
            cursor::sync_dir(&self.inner.layout.segments)?;
        }
        Ok(deleted)
    }

    /// A reader at `position` (clamped to the oldest retained record when it reads).
    pub fn reader(&self, position: u64) -> LogReader {
        LogReader {
            store: self.clone(),
            position,
            open: None,
            mark: None,
            scratch: Vec::new(),
            avg_frame: 1024,
        }
    }

    /// The segment holding `seq`: its first seq, path, and the next segment's first seq.
    fn locate(&self, seq: u64) -> Option<(u64, PathBuf, Option<u64>)> {
        let segs = lock(&self.inner.segments);
        let i = segs.partition_point(|s| s.first_seq <= seq);
        if i == 0 {
            return None;
        }
        let seg = &segs[i - 1];
        Some((
            seg.first_seq,
            seg.path.clone(),
            segs.get(i).map(|s| s.first_seq),
        ))
    }

    /// Makes the next `n` write/fsync calls of the writer fail.
    #[cfg(test)]
    pub(crate) fn inject_faults(&self, n: u32) {
        self.inject_faults_after(0, n);
    }

    /// Lets `skip` write/fsync calls pass, then makes `n` fail. A failing write writes half
    /// of its bytes first, as a full disk may.
    #[cfg(test)]
    pub(crate) fn inject_faults_after(&self, skip: u32, n: u32) {
        *lock(&self.inner.faults) = (skip, n);
    }
}

pub(crate) fn check_sink(sink: &str) -> Result<(), OutboxError> {
    if format::valid_sink(sink) {
        Ok(())
    } else {
        Err(OutboxError::InvalidSink(sink.to_string()))
    }
}

/// A segment a reader has open, positioned at the record `next` at byte `offset`.
struct OpenSegment {
    first_seq: u64,
    path: PathBuf,
    file: File,
    /// The next segment's first seq, once there is one.
    end: Option<u64>,
    next: u64,
    offset: u64,
}

/// Where a read started: a seek back to it (to retry a batch) needs no scan.
#[derive(Debug, Clone, Copy)]
struct Mark {
    first_seq: u64,
    seq: u64,
    offset: u64,
}

/// Reads durable records in seq order from a position. Every record's checksum and seq are
/// checked; a bad one is [`OutboxError::Corrupt`], never returned.
pub struct LogReader {
    store: Store,
    position: u64,
    open: Option<OpenSegment>,
    mark: Option<Mark>,
    scratch: Vec<u8>,
    /// Average frame size of the records read lately: sizes the next read, so that a batch of
    /// small records does not read (and throw away) a whole chunk.
    avg_frame: usize,
}

/// Most bytes read from a segment in one go.
const READ_CHUNK: usize = 1 << 20;

impl LogReader {
    pub fn position(&self) -> u64 {
        self.position
    }

    pub fn seek(&mut self, seq: u64) {
        self.position = seq;
    }

    /// Up to `max_records` durable records from the position (about `max_bytes` of payload,
    /// at least one record when there is one), advancing past them. Empty when nothing
    /// durable is there yet. A position below the oldest retained record moves up to it.
    pub fn read(
        &mut self,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<Record>, OutboxError> {
        let max_records = max_records.max(1);
        let end = self.store.durable_end();
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let mut idle_rounds = 0;
        while out.len() < max_records && (out.is_empty() || bytes < max_bytes) {
            let first = self.store.first_seq();
            if self.position < first {
                tracing::debug!(
                    from = self.position,
                    to = first,
                    "reader moved up to the oldest retained record"
                );
                self.position = first;
            }
            if self.position >= end {
                break;
            }
            let before = out.len();
            if let Err(e) = self.step(end, max_records, max_bytes, &mut out, &mut bytes) {
                // The good records before a bad one are returned first; the position stays
                // at the bad one, so the next read reports it.
                if out.is_empty() {
                    return Err(e);
                }
                break;
            }
            if out.len() == before {
                // Moving to the next segment, or a segment deleted under us: a few rounds at
                // most. More means the segment list and the files disagree.
                idle_rounds += 1;
                if idle_rounds > 8 {
                    return Err(OutboxError::Corrupt {
                        path: self.store.inner.layout.segments.clone(),
                        offset: 0,
                        reason: format!("no segment holds durable record {}", self.position),
                    });
                }
            } else {
                idle_rounds = 0;
            }
        }
        Ok(out)
    }

    fn step(
        &mut self,
        end: u64,
        max_records: usize,
        max_bytes: usize,
        out: &mut Vec<Record>,
        bytes: &mut usize,
    ) -> Result<(), OutboxError> {
        if !self.ensure_segment()? {
            return Ok(());
        }
        if out.is_empty() {
            if let Some(seg) = &self.open {
                self.mark = Some(Mark {
                    first_seq: seg.first_seq,
                    seq: seg.next,
                    offset: seg.offset,
                });
            }
        }
        self.read_segment(end, max_records, max_bytes, out, bytes)
    }

    /// Makes `open` the segment holding `position`, positioned at it. Returns false when the
    /// caller should look again (the segment was finished or deleted).
    fn ensure_segment(&mut self) -> Result<bool, OutboxError> {
        let position = self.position;
        if let Some(seg) = &mut self.open {
            let inside = seg.first_seq <= position && seg.end.is_none_or(|e| position < e);
            if inside {
                if seg.next == position {
                    return Ok(true);
                }
                match self.mark {
                    Some(m) if m.first_seq == seg.first_seq && m.seq == position => {
                        seg.next = m.seq;
                        seg.offset = m.offset;
                        return Ok(true);
                    }
                    _ => {}
                }
                if position < seg.next {
                    seg.next = seg.first_seq;
                    seg.offset = FILE_HEADER_LEN;
                }
                skip_to(seg, position)?;
                return Ok(true);
            }
            self.open = None;
        }
        let Some((first_seq, path, end)) = self.store.locate(position) else {
            return Ok(false);
        };
        let mut file = match File::open(&path) {
            Ok(f) => f,
            // Deleted since the lookup: every cursor passed it; the caller moves up.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io_err(&path, "open segment")(e)),
        };
        let mut header = [0u8; FILE_HEADER_LEN as usize];
        let n = format::read_full(&mut file, &mut header)
            .map_err(io_err(&path, "read segment header"))?;
        match format::decode_header(&header[..n], SEGMENT_MAGIC) {
            Ok(f) if f == first_seq => {}
            Ok(f) => {
                return Err(OutboxError::Corrupt {
                    path,
                    offset: 0,
                    reason: format!("header says first seq {f}, the file name {first_seq}"),
                })
            }
            Err(p) => {
                return Err(OutboxError::Corrupt {
                    path,
                    offset: 0,
                    reason: p.to_string(),
                })
            }
        }
        let mut seg = OpenSegment {
            first_seq,
            path,
            file,
            end,
            next: first_seq,
            offset: FILE_HEADER_LEN,
        };
        match self.mark {
            Some(m) if m.first_seq == first_seq && m.seq == position => {
                seg.next = m.seq;
                seg.offset = m.offset;
            }
            _ => skip_to(&mut seg, position)?,
        }
        self.open = Some(seg);
        Ok(true)
    }

    /// Reads records from the open segment into `out`, below `end` and within the limits.
    fn read_segment(
        &mut self,
        end: u64,
        max_records: usize,
        max_bytes: usize,
        out: &mut Vec<Record>,
        bytes: &mut usize,
    ) -> Result<(), OutboxError> {
        let Some(seg) = self.open.as_mut() else {
            return Ok(());
        };
        let stop = seg.end.map_or(end, |e| e.min(end));
        if seg.next >= stop {
            if seg.end.is_some() {
                self.open = None;
            }
            return Ok(());
        }
        // Only bytes of records below `end` are used: those were written before `end` was
        // published. Whatever else a read returns is dropped with the chunk.
        // Enough for the records wanted at the recent average size, with some slack; a
        // short read just means another round in `read`.
        let want = (max_records - out.len())
            .saturating_mul(self.avg_frame + self.avg_frame / 4)
            .min(
                max_bytes
                    .saturating_sub(*bytes)
                    .saturating_add(self.avg_frame * 2),
            )
            .clamp(16 << 10, READ_CHUNK);
        // The scratch buffer keeps its length between reads, so it is zeroed only when it
        // grows: zeroing `want` bytes (up to 1 MiB) for every read, of which a dispatcher that
        // keeps up uses a few KiB, was a tenth of the event path's instructions. Only the
        // first `len` bytes are this read's.
        let buf = &mut self.scratch;
        if buf.len() < want {
            buf.resize(want, 0);
        }
        (&seg.file)
            .seek(SeekFrom::Start(seg.offset))
            .map_err(io_err(&seg.path, "seek segment"))?;
        let n = format::read_full(&mut &seg.file, &mut buf[..want])
            .map_err(io_err(&seg.path, "read segment"))?;
        let mut len = n;
        let mut eof = n < want;
        let mut pos = 0usize;
        let mut found: Vec<(u64, Range<usize>)> = Vec::new();
        let mut bad: Option<OutboxError> = None;
        while seg.next < stop
            && out.len() + found.len() < max_records
            && (out.len() + found.len() == 0 || *bytes < max_bytes)
        {
            match format::decode_record(&buf[pos..len]) {
                Decoded::Record {
                    seq,
                    payload,
                    frame,
                } => {
                    if seq != seg.next {
                        bad = Some(OutboxError::Corrupt {
                            path: seg.path.clone(),
                            offset: seg.offset,
                            reason: format!(
                                "record has seq {seq} where seq {} was expected",
                                seg.next
                            ),
                        });
                        break;
                    }
                    found.push((seq, pos + payload.start..pos + payload.end));
                    *bytes += payload.len();
                    pos += frame;
                    seg.offset += frame as u64;
                    seg.next += 1;
                }
                Decoded::Corrupt(reason) => {
                    bad = Some(OutboxError::Corrupt {
                        path: seg.path.clone(),
                        offset: seg.offset,
                        reason,
                    });
                    break;
                }
                Decoded::Incomplete { need } => {
                    if !found.is_empty() {
                        break;
                    }
                    // Nothing found yet, so the record starts at the chunk's start.
                    let have = len as u64;
                    if !eof {
                        let file_len = seg
                            .file
                            .metadata()
                            .map_err(io_err(&seg.path, "stat segment"))?
                            .len();
                        // Read the rest of a record larger than the chunk, unless its length
                        // runs past the end of the file (then it is damaged: no allocation).
                        if seg.offset + need <= file_len {
                            let more = usize::try_from(need - have).unwrap_or(usize::MAX);
                            let end = len.saturating_add(more);
                            if buf.len() < end {
                                buf.resize(end, 0);
                            }
                            let k = format::read_full(&mut &seg.file, &mut buf[len..end])
                                .map_err(io_err(&seg.path, "read segment"))?;
                            len += k;
                            eof = k < more;
                            continue;
                        }
                    }
                    if have == 0 && seg.end.is_none() {
                        // The file ends here: fine if the segment was finished since we looked.
                        if let Some((_, _, Some(next_first))) = self.store.locate(seg.first_seq) {
                            seg.end = Some(next_first);
                            if next_first == seg.next {
                                self.open = None;
                                return Ok(());
                            }
                        }
                    }
                    return Err(OutboxError::Corrupt {
                        path: seg.path.clone(),
                        offset: seg.offset,
                        reason: format!(
                            "record {} is durable but the file ends {have} bytes into it",
                            seg.next
                        ),
                    });
                }
            }
        }
        if let Some(e) = bad {
            if found.is_empty() {
                return Err(e);
            }
        }
        if !found.is_empty() {
            self.avg_frame = (self.avg_frame * 3 + pos / found.len()) / 4;
        }
        let chunk = Bytes::copy_from_slice(&buf[..pos]);
        for (seq, range) in found {
            out.push(Record {
                seq,
                payload: chunk.slice(range),
            });
        }
        self.position = seg.next;
        Ok(())
    }
}

/// Moves `seg` forward to the record `target`, reading only record headers.
fn skip_to(seg: &mut OpenSegment, target: u64) -> Result<(), OutboxError> {
    if seg.next == target {
        return Ok(());
    }
    (&seg.file)
        .seek(SeekFrom::Start(seg.offset))
        .map_err(io_err(&seg.path, "seek segment"))?;
    let mut r = BufReader::with_capacity(64 << 10, &seg.file);
    let mut header = [0u8; RECORD_HEADER_LEN as usize];
    while seg.next < target {
        let n =
            format::read_full(&mut r, &mut header).map_err(io_err(&seg.path, "read segment"))?;
        if n < header.len() {
            return Err(OutboxError::Corrupt {
                path: seg.path.clone(),
                offset: seg.offset,
                reason: format!("record {} is missing: the file ends first", seg.next),
            });
        }
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let seq = u64::from_le_bytes([
            header[8], header[9], header[10], header[11], header[12], header[13], header[14],
            header[15],
        ]);
        if seq != seg.next {
            return Err(OutboxError::Corrupt {
                path: seg.path.clone(),
                offset: seg.offset,
                reason: format!("record has seq {seq} where seq {} was expected", seg.next),
            });
        }
        r.seek_relative(i64::from(len))
            .map_err(io_err(&seg.path, "seek segment"))?;
        seg.offset += RECORD_HEADER_LEN + u64::from(len);
        seg.next += 1;
    }
    Ok(())
}

/// A read-only summary of a segment directory, safe while a writer appends to it.
pub(crate) struct SegmentSummary {
    pub bytes: u64,
    pub segments: usize,
    pub first_seq: Option<u64>,
    pub end_seq: Option<u64>,
}

/// Sizes the segments and counts the valid records of the last one. Files that vanish while
/// this runs (deleted by the running process) are skipped; the last one is retried.
pub(crate) fn summarize(dir: &Path) -> Result<SegmentSummary, OutboxError> {
    for _attempt in 0..5 {
        let segs = list_segments(dir)?;
        let mut bytes = 0;
        let mut last_listed = 0;
        let mut present = Vec::new();
        for seg in segs {
            match fs::metadata(&seg.path) {
                Ok(m) => {
                    bytes += m.len();
                    last_listed = m.len();
                    present.push(seg);
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&seg.path, "stat segment")(e)),
            }
        }
        let Some(last) = present.last() else {
            return Ok(SegmentSummary {
                bytes,
                segments: 0,
                first_seq: None,
                end_seq: None,
            });
        };
        let mut file = match File::open(&last.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(&last.path, "open segment")(e)),
        };
        let mut header = [0u8; FILE_HEADER_LEN as usize];
        let n = format::read_full(&mut file, &mut header)
            .map_err(io_err(&last.path, "read segment header"))?;
        let end = match format::decode_header(&header[..n], SEGMENT_MAGIC) {
            Ok(_) => {
                let scan = format::scan(
                    &mut BufReader::new(&mut file),
                    FILE_HEADER_LEN,
                    Some(last.first_seq),
                    |_, _| {},
                )
                .map_err(io_err(&last.path, "read segment"))?;
                // The last segment counts up to its last whole record: what follows is a
                // record being written, a torn one, or preallocated zeros, none of them an
                // event yet.
                bytes = bytes
                    .saturating_sub(last_listed)
                    .saturating_add(scan.good_len);
                scan.next_seq
            }
            // Being created right now, or torn: it holds no record yet.
            Err(format::HeaderProblem::Short(_)) => last.first_seq,
            Err(p) => {
                return Err(OutboxError::Corrupt {
                    path: last.path.clone(),
                    offset: 0,
                    reason: p.to_string(),
                })
            }
        };
        return Ok(SegmentSummary {
            bytes,
            segments: present.len(),
            first_seq: present.first().map(|s| s.first_seq),
            end_seq: Some(end),
        });
    }
    Err(OutboxError::Io {
        path: dir.to_path_buf(),
        action: "read a stable segment list",
        source: io::Error::other("segments kept disappearing while being read"),
    })
}
