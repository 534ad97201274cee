//! The spare segment: a zero-filled file, made off the writer thread, that becomes the next
//! segment.
//!
//! Why: `fdatasync` after an append that grows a file must also commit the new size and the
//! new blocks, which on ext4 (and XFS) is a journal commit: on this project's test machine
//! that doubles the cost of every group commit (0.22 ms and about 110 µs of CPU, against
//! 0.11 ms and 50 µs when the same write lands on blocks that already exist, measured with
//! `write` + `fdatasync` of 12 KB). So the writer writes into a file whose blocks were
//! written (with zeros) and fsynced beforehand, and its `fdatasync`s flush data only.
//! `fallocate` is not enough: it leaves unwritten extents, and converting one on first
//! write is a metadata change again.
//!
//! How: once the active segment holds a little data (so that the many small outboxes of
//! tests and quiet sidecars never pay for 64 MiB of zeros), a thread writes
//! `segments/spare` full of zeros, `segment_bytes` long, and fsyncs it. At the next roll the
//! writer takes it: writes the header at offset 0, fsyncs, renames it to the segment's name
//! and fsyncs the directory. A writer whose active segment grows as it is written (a new
//! outbox's first segment, one recovered after a restart, one cut back after a failed
//! write) rolls over to the spare as soon as it is ready rather than when it is full.
//!
//! What it changes on disk: the active segment can be longer than its records, with zeros
//! after them. A zero record header never passes the crc check, so recovery reads the
//! zeros as the end of the log and cuts them like a torn tail (and says so only when they
//! are not all zeros). Every other segment is cut to its records' length when it is rolled
//! over, so readers and the format of complete segments are unchanged. A leftover spare
//! is deleted at open. `max_bytes` does not count the zeros (it bounds the events kept), but
//! no spare is made while the records plus two segments (the spare and the active segment's
//! zeros) would pass it: a disk sized for `max_bytes` is not filled with zeros.
//!
//! When it cannot be made (a full disk, above all), the writer logs it and goes on with a
//! segment that grows as it is written, as before; it tries again at the next segment.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// The spare's file name in `segments/`: not a segment name, so listing ignores it.
pub const SPARE_FILE: &str = "spare";

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
        let dir = path.parent().unwrap_or(Path::new("."));
        let stat = rustix::fs::statvfs(dir).map_err(io::Error::from)?;
        let free = stat.f_bavail.saturating_mul(stat.f_frsize);
        if free < size.saturating_mul(2) {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                format!("{free} bytes free: a spare of {size} needs twice that, to leave as much for the events"),
            ));
        }
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

/// Deletes a spare left by an earlier run: its fill may not have finished, and its size is
/// that run's `segment_bytes`.
pub fn remove_leftover(dir: &Path) {
    let path = dir.join(SPARE_FILE);
    match fs::remove_file(&path) {
        Ok(()) => {
            tracing::debug!(file = %path.display(), "removed the spare segment of an earlier run")
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "cannot remove the spare segment of an earlier run")
        }
    }
}
