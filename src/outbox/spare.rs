//! Spare segments: files whose blocks are already written, that become the next segment.
//! Either a zero-filled file made off the writer thread, or a segment every cursor has passed,
//! kept instead of deleted (recycled, as PostgreSQL recycles its WAL segments).
//!
//! Why: `fdatasync` after an append that grows a file must also commit the new size and the
//! new blocks, which on ext4 (and XFS) is a journal commit: on this project's test machine
//! that doubles the cost of every group commit (0.22 ms and about 110 µs of CPU, against
//! 0.11 ms and 50 µs when the same write lands on blocks that already exist, measured with
//! `write` + `fdatasync` of 12 KB). So the writer writes into a file whose blocks were
//! written beforehand, and its `fdatasync`s flush data only. `fallocate` is not enough: it
//! leaves unwritten extents, and converting one on first write is a metadata change again.
//!
//! ## Recycled segments
//!
//! When a commit lets a segment go, [`recycle`] renames it to `segments/recycled` (replacing
//! a smaller one) rather than deleting it, while the disk has room. At its next roll the
//! writer renames `recycled` to `segments/recycling`, a name only it uses (so a commit that
//! recycles another segment meanwhile cannot swap the file under it), writes the new header
//! at offset 0, fsyncs, renames it to the segment's name and fsyncs the directory, as for a
//! new segment. Records then overwrite the old ones. This costs nothing to make, so both
//! durabilities use it; writing zeros (below) costs about 20 ms of CPU per 64 MiB, which only
//! `sync`'s unpaced fsyncs repay.
//!
//! ## Zero-filled spares
//!
//! Once the active segment holds a little data (so that the many small outboxes of tests and
//! quiet sidecars never pay for 64 MiB of zeros), and no recycled segment is waiting, a thread
//! writes `segments/spare` full of zeros, `segment_bytes` long, and fsyncs it. At the next
//! roll the writer takes it as it takes a recycled one. A writer whose active segment grows
//! as it is written (a new outbox's first segment, one recovered after a restart, one cut back
//! after a failed write) rolls over to a spare or a recycled segment as soon as one is ready
//! rather than when it is full. In a segment that was itself a spare, the zeros are started
//! only at half of it, when the segment before has usually been recycled.
//!
//! ## What it changes on disk
//!
//! The active segment can be longer than its records, with zeros or a recycled segment's old
//! records after them. A zero record header never passes the crc check, and an old record has
//! a seq below the segment's first, so recovery reads either as the end of the log and cuts
//! it like a torn tail (and reports it only when it is neither). Every other segment is cut to
//! its records' length when it is rolled over, so readers and the format of complete segments
//! are unchanged. At open a leftover `spare` is deleted, and a leftover `recycled` or
//! `recycling` is kept as `recycled`, so that a restart does not start over with segments
//! that grow as written.
//! `max_bytes` counts neither (it bounds the events kept), but no spare is made, and no
//! segment kept for recycling, while the records plus two segments (the spare and the active
//! segment's unused tail) would pass it, nor when the disk has less than twice the file's size
//! free: a disk sized for `max_bytes` is not filled with them.
//!
//! When a zero-filled spare cannot be made (a full disk, above all), the writer logs it and
//! goes on with a segment that grows as it is written, as before; it tries again at the next
//! segment. A recycled segment that cannot be renamed is deleted, as before recycling.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// The spare's file name in `segments/`: not a segment name, so listing ignores it.
pub const SPARE_FILE: &str = "spare";

/// A segment every cursor passed, kept for the writer to overwrite.
pub const RECYCLED_FILE: &str = "recycled";

/// The recycled segment once the writer took it, until it has its new header and name.
pub const TAKEN_FILE: &str = "recycling";

/// Zeros written per call while filling the spare.
const FILL_CHUNK: usize = 1 << 20;

/// Active-segment bytes after which a spare is made: a sidecar that writes less than this
/// between restarts never pays for one.
pub const START_AFTER: u64 = 1 << 20;

/// A spare segment being made, or made.
pub struct Spare {
    state: State,
    /// Set when the writer goes away: a fill in progress stops and deletes its file.
    cancel: Arc<AtomicBool>,
}

enum State {
    None,
    Filling(JoinHandle<io::Result<File>>),
    Ready(File),
    /// The last attempt failed; no new one before the next roll.
    Failed,
}

impl Spare {
    pub fn new() -> Spare {
        Spare {
            state: State::None,
            cancel: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Starts filling a spare of `size` bytes in `dir`, unless one exists, is on its way, or
    /// the last attempt failed during this segment.
    pub fn start(&mut self, dir: &Path, size: u64) {
        if !matches!(self.state, State::None) {
            return;
        }
        let path = dir.join(SPARE_FILE);
        let cancel = self.cancel.clone();
        let spawned = std::thread::Builder::new()
            .name("ficus-outbox-spare".into())
            .spawn(move || fill(&path, size, &cancel));
        self.state = match spawned {
            Ok(handle) => State::Filling(handle),
            Err(e) => {
                tracing::warn!(error = %e, "outbox: cannot start a thread to preallocate the next segment; segments grow as written");
                State::Failed
            }
        };
    }

    /// Whether a spare is ready to be taken (never waits for a fill in progress).
    pub fn ready(&mut self) -> bool {
        self.state = match std::mem::replace(&mut self.state, State::None) {
            State::Filling(handle) if handle.is_finished() => match handle.join() {
                Ok(Ok(file)) => State::Ready(file),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "outbox: cannot preallocate the next segment; it grows as written (fsyncs then cost a journal commit each)");
                    State::Failed
                }
                Err(_) => {
                    tracing::error!("outbox: the thread preallocating the next segment panicked");
                    State::Failed
                }
            },
            other => other,
        };
        matches!(self.state, State::Ready(_))
    }

    /// Takes the ready spare, if there is one, and allows the next fill. Called at a roll.
    pub fn take(&mut self) -> Option<File> {
        self.ready();
        match std::mem::replace(&mut self.state, State::None) {
            State::Ready(file) => Some(file),
            filling @ State::Filling(_) => {
                self.state = filling;
                None
            }
            State::None | State::Failed => None,
        }
    }
}

impl Drop for Spare {
    /// Stops a fill in progress and waits for it (one chunk at most, or its final fsync), so
    /// that it cannot delete or truncate the spare of an outbox opened on the same directory
    /// right after this one closed.
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
        if let State::Filling(handle) = std::mem::replace(&mut self.state, State::None) {
            let _ = handle.join();
        }
    }
}

/// Writes `size` zero bytes to a new `path` and fsyncs it (size and blocks included). On
/// failure or cancellation the file is deleted.
fn fill(path: &Path, size: u64, cancel: &AtomicBool) -> io::Result<File> {
    let result = (|| {
        // The spare must not take the room the writer's records need: a disk smaller than
        // `max_bytes` would otherwise fail appends while it is being filled.
        room_for(path.parent().unwrap_or(Path::new(".")), size)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        let zeros = vec![0u8; FILL_CHUNK];
        let mut at = 0u64;
        while at < size {
            if cancel.load(Ordering::Relaxed) {
                return Err(io::Error::other("cancelled: the outbox was closed"));
            }
            let n = usize::try_from(size - at).map_or(FILL_CHUNK, |left| left.min(FILL_CHUNK));
            file.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        file.sync_all()?;
        Ok(file)
    })();
    if result.is_err() {
        let _ = fs::remove_file(path);
    }
    result.map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

/// Whether the file system holding `dir` has at least twice `size` bytes free: a spare must
/// not take, or a recycled segment keep, the room the writer's records need.
fn room_for(dir: &Path, size: u64) -> io::Result<()> {
    let stat = rustix::fs::statvfs(dir).map_err(io::Error::from)?;
    let free = stat.f_bavail.saturating_mul(stat.f_frsize);
    if free < size.saturating_mul(2) {
        return Err(io::Error::new(
            io::ErrorKind::StorageFull,
            format!("{free} bytes free: a spare of {size} needs twice that, to leave as much for the events"),
        ));
    }
    Ok(())
}

/// Moves `segment` (every cursor passed it, `size` bytes) to `dir/recycled` for the writer
/// to overwrite, replacing a smaller recycled segment. Returns false when the caller should
/// delete it instead: a recycled segment at least as large is waiting, the disk is short of
/// room, or the rename failed.
pub fn recycle(segment: &Path, dir: &Path, size: u64) -> bool {
    let target = dir.join(RECYCLED_FILE);
    if fs::metadata(&target).is_ok_and(|m| m.len() >= size) || room_for(dir, size).is_err() {
        return false;
    }
    match fs::rename(segment, &target) {
        Ok(()) => {
            tracing::debug!(file = %segment.display(), "kept a segment every cursor has passed for the writer to overwrite");
            true
        }
        Err(e) => {
            tracing::debug!(file = %segment.display(), error = %e, "cannot keep a passed segment for recycling; deleting it");
            false
        }
    }
}

/// Takes the recycled segment in `dir`, if there is one: renames it to `recycling` (so that a
/// commit recycling another segment cannot replace it under the writer) and opens it. Returns
/// the file, its path and its size.
pub fn take_recycled(dir: &Path) -> Option<(File, PathBuf, u64)> {
    let taken = dir.join(TAKEN_FILE);
    match fs::rename(dir.join(RECYCLED_FILE), &taken) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "outbox: cannot take the recycled segment; the next segment grows as written");
            return None;
        }
    }
    let opened = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&taken)
        .and_then(|f| f.metadata().map(|m| (f, m.len())));
    match opened {
        Ok((file, size)) => Some((file, taken, size)),
        Err(e) => {
            tracing::warn!(file = %taken.display(), error = %e, "outbox: cannot open the recycled segment; the next segment grows as written");
            let _ = fs::remove_file(&taken);
            None
        }
    }
}

/// Tidies what an earlier run left in `dir`: a zero-filled spare is deleted (its fill may
/// not have finished, and its size is that run's `segment_bytes`); a recycled segment, or
/// one the writer was installing (`recycling`), is kept as `recycled`, so that a restarted
/// outbox writes into written blocks from its first roll. Either holds only old records
/// (and perhaps a header the install had written), which a new header makes harmless.
/// Returns whether a recycled segment is there.
pub fn adopt_leftovers(dir: &Path) -> bool {
    let remove = |path: &Path| match fs::remove_file(path) {
        Ok(()) => {
            tracing::debug!(file = %path.display(), "removed a spare segment of an earlier run")
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "cannot remove a spare segment of an earlier run")
        }
    };
    remove(&dir.join(SPARE_FILE));
    let recycled = dir.join(RECYCLED_FILE);
    let taken = dir.join(TAKEN_FILE);
    if taken.exists() {
        if recycled.exists() {
            remove(&taken);
        } else if let Err(e) = fs::rename(&taken, &recycled) {
            tracing::warn!(file = %taken.display(), error = %e, "cannot keep the segment an earlier run was recycling");
            remove(&taken);
        }
    }
    recycled.is_file()
}
