//! Dead letters and their replay: `dead/<sink>.log` and `dead/<sink>.replay-<unix_nanos>`.
//!
//! Both have the segment framing after a header with their own magic; records keep the seq
//! they had in the log. Only the running ficus appends to a `.log`, and it opens the file by
//! name for every append, never keeping it open: `ficus outbox replay` (another process) may
//! rename it at any moment, and a kept descriptor would keep writing into the renamed file
//! after the dispatcher had read it. An in-process lock is held across each append and each
//! read of a replay file, so a read never misses an append that raced with a rename.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use super::format::{self, DEAD_MAGIC, FILE_HEADER_LEN};
use super::log::check_sink;
use super::{cursor, io_err, OutboxError, Record};

const LOG_SUFFIX: &str = ".log";
const REPLAY_INFIX: &str = ".replay-";

pub(crate) fn log_path(dead: &Path, sink: &str) -> PathBuf {
    dead.join(format!("{sink}{LOG_SUFFIX}"))
}

/// A dead-letter directory's files, by kind.
#[derive(Debug, Default)]
pub(crate) struct Listing {
    /// Sinks with a `.log`.
    pub logs: Vec<String>,
    /// `(sink, unix_nanos, path)`, oldest first.
    pub replays: Vec<(String, u128, PathBuf)>,
}

pub(crate) fn list(dead: &Path) -> Result<Listing, OutboxError> {
    let mut out = Listing::default();
    let entries = match fs::read_dir(dead) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io_err(dead, "list dead-letter directory")(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_err(dead, "list dead-letter directory"))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(sink) = name.strip_suffix(LOG_SUFFIX) {
            if format::valid_sink(sink) {
                out.logs.push(sink.to_string());
            }
        } else if let Some((sink, nanos)) = parse_replay_name(name) {
            out.replays.push((sink.to_string(), nanos, entry.path()));
        }
    }
    out.logs.sort();
    out.replays.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
    Ok(out)
}

fn parse_replay_name(name: &str) -> Option<(&str, u128)> {
    let (sink, nanos) = name.rsplit_once(REPLAY_INFIX)?;
    if !format::valid_sink(sink) || nanos.is_empty() || !nanos.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    Some((sink, nanos.parse().ok()?))
}

/// What a read-only pass over a dead-letter file found.
pub(crate) struct DeadFile {
    pub records: Vec<Record>,
    /// Bytes after the header that are not whole records (a torn append).
    pub torn_bytes: u64,
    pub good_len: u64,
}

/// Reads a dead-letter or replay file without changing it. `keep` false counts only.
pub(crate) fn read_file(path: &Path, keep: bool) -> Result<(DeadFile, u64), OutboxError> {
    let mut file = File::open(path).map_err(io_err(path, "open dead-letter file"))?;
    let file_len = file
        .metadata()
        .map_err(io_err(path, "stat dead-letter file"))?
        .len();
    let mut header = [0u8; FILE_HEADER_LEN as usize];
    let n =
        format::read_full(&mut file, &mut header).map_err(io_err(path, "read dead-letter file"))?;
    match format::decode_header(&header[..n], DEAD_MAGIC) {
        Ok(_) => {}
        // Created just now or torn at creation: no records.
        Err(format::HeaderProblem::Short(_)) => {
            return Ok((
                DeadFile {
                    records: Vec::new(),
                    torn_bytes: 0,
                    good_len: 0,
                },
                0,
            ))
        }
        Err(p) => {
            return Err(OutboxError::Corrupt {
                path: path.to_path_buf(),
                offset: 0,
                reason: p.to_string(),
            })
        }
    }
    let mut records = Vec::new();
    let end = format::scan(
        &mut BufReader::new(&mut file),
        FILE_HEADER_LEN,
        None,
        |seq, p| {
            if keep {
                records.push(Record {
                    seq,
                    payload: Bytes::copy_from_slice(p),
                });
            }
        },
    )
    .map_err(io_err(path, "read dead-letter file"))?;
    Ok((
        DeadFile {
            records,
            torn_bytes: file_len.saturating_sub(end.good_len),
            good_len: end.good_len,
        },
        end.records,
    ))
}

/// The running process's side: appends, and replay files taken back for delivery.
pub(crate) struct DeadLetters {
    dir: PathBuf,
    /// Per sink, the length of its `.log` as last checked or written. A different length
    /// means the file is not the one we know (renamed away by a replay, or torn by a crash)
    /// and is checked again before anything is appended to it.
    known: Mutex<HashMap<String, u64>>,
}

impl DeadLetters {
    pub(crate) fn new(dir: PathBuf) -> DeadLetters {
        DeadLetters {
            dir,
            known: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Appends `records` to `dead/<sink>.log` with one write and one fsync.
    pub(crate) fn append(&self, sink: &str, records: &[Record]) -> Result<(), OutboxError> {
        check_sink(sink)?;
        if records.is_empty() {
            return Ok(());
        }
        let mut frames = Vec::new();
        for r in records {
            if r.payload.len() as u64 > u64::from(u32::MAX) {
                return Err(OutboxError::TooLarge {
                    size: r.payload.len(),
                    max: u64::from(u32::MAX),
                });
            }
            format::encode_record(&mut frames, r.seq, &r.payload);
        }
        let mut known = self.lock();
        let path = log_path(&self.dir, sink);
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(io_err(&path, "open dead-letter file"))?;
        let len = file
            .metadata()
            .map_err(io_err(&path, "stat dead-letter file"))?
            .len();
        let mut new_file = false;
        if known.get(sink) != Some(&len) {
            let good = self.check_tail(&path, &mut file, len)?;
            new_file = good == 0;
        }
        if new_file {
            frames.splice(0..0, format::encode_header(DEAD_MAGIC, 0));
        }
        file.write_all(&frames)
            .map_err(io_err(&path, "write dead-letter file"))?;
        file.sync_data()
            .map_err(io_err(&path, "fsync dead-letter file"))?;
        let after = file
            .metadata()
            .map_err(io_err(&path, "stat dead-letter file"))?
            .len();
        if new_file {
            cursor::sync_dir(&self.dir)?;
        }
        known.insert(sink.to_string(), after);
        Ok(())
    }

    /// Makes an unknown `.log` safe to append to: a torn tail (an append cut by a crash) is
    /// cut off; a header that is not ours moves the file aside. Returns the good length
    /// (0: write a header first).
    fn check_tail(&self, path: &Path, file: &mut File, len: u64) -> Result<u64, OutboxError> {
        if len == 0 {
            return Ok(0);
        }
        match read_file(path, false) {
            Ok((scan, _)) if scan.good_len == 0 => {
                file.set_len(0)
                    .map_err(io_err(path, "truncate dead-letter file"))?;
                Ok(0)
            }
            Ok((scan, _)) => {
                if scan.torn_bytes > 0 {
                    tracing::warn!(file = %path.display(), bytes_cut = scan.torn_bytes, "cutting the torn tail of a dead-letter file");
                    file.set_len(scan.good_len)
                        .map_err(io_err(path, "truncate dead-letter file"))?;
                }
                Ok(scan.good_len)
            }
            Err(OutboxError::Corrupt { reason, .. }) => {
                let aside = aside_path(path);
                tracing::error!(file = %path.display(), moved_to = %aside.display(), %reason, "dead-letter file is damaged; moved aside, a new one is started");
                fs::rename(path, &aside)
                    .map_err(io_err(path, "move damaged dead-letter file aside"))?;
                *file = OpenOptions::new()
                    .read(true)
                    .append(true)
                    .create(true)
                    .open(path)
                    .map_err(io_err(path, "open dead-letter file"))?;
                Ok(0)
            }
            Err(e) => Err(e),
        }
    }

    /// The oldest replay file for `sink` and its records. A damaged one is moved aside (and
    /// logged) so that delivery goes on with the next.
    pub(crate) fn pending_replay(
        &self,
        sink: &str,
    ) -> Result<Option<(PathBuf, Vec<Record>)>, OutboxError> {
        check_sink(sink)?;
        let _known = self.lock();
        for (s, _, path) in list(&self.dir)?.replays {
            if s != sink {
                continue;
            }
            match read_file(&path, true) {
                Ok((file, _)) => {
                    if file.torn_bytes > 0 {
                        tracing::warn!(file = %path.display(), bytes = file.torn_bytes, "replay file ends in a torn record; it is ignored");
                    }
                    return Ok(Some((path, file.records)));
                }
                Err(OutboxError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                }
                Err(OutboxError::Corrupt { reason, .. }) => {
                    let aside = aside_path(&path);
                    tracing::error!(file = %path.display(), moved_to = %aside.display(), %reason, "replay file is damaged; moved aside");
                    fs::rename(&path, &aside)
                        .map_err(io_err(&path, "move damaged replay file aside"))?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    /// Deletes a replay file returned by [`DeadLetters::pending_replay`].
    pub(crate) fn finish_replay(&self, path: &Path) -> Result<(), OutboxError> {
        let ours = path.parent() == Some(self.dir.as_path())
            && path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(parse_replay_name)
                .is_some();
        if !ours {
            return Err(OutboxError::NotReplayFile(path.to_path_buf()));
        }
        let _known = self.lock();
        match fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(path, "delete replay file")(e)),
        }
    }
}

/// Where a damaged file is kept for inspection: a name neither a log nor a replay file.
fn aside_path(path: &Path) -> PathBuf {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("dead");
    path.with_file_name(format!("{name}.corrupt-{}", unix_nanos()))
}

fn unix_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// Renames `dead/<sink>.log` (every sink's when `None`) to a new replay file. Returns the
/// records moved. Safe while ficus runs: a rename is atomic, and ficus opens the `.log` by
/// name for each append (see the module docs).
pub(crate) fn replay(dead: &Path, sink: Option<&str>) -> Result<u64, OutboxError> {
    if let Some(s) = sink {
        check_sink(s)?;
    }
    // No dead-letter directory (or no outbox yet): no dead letters. Anything else that keeps
    // it from being read is said.
    match fs::metadata(dead) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            return Err(io_err(dead, "open the dead-letter directory")(
                io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io_err(dead, "open the dead-letter directory")(e)),
    }
    let sinks = match sink {
        Some(s) => vec![s.to_string()],
        None => list(dead)?.logs,
    };
    let mut moved = 0;
    let mut renamed = false;
    for s in sinks {
        let from = log_path(dead, &s);
        // Counted before: an empty log is not worth a replay file.
        match read_file(&from, false) {
            Ok((_, 0)) => continue,
            Ok(_) => {}
            Err(OutboxError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                continue
            }
            Err(e) => return Err(e),
        }
        let mut nanos = unix_nanos();
        let mut to = dead.join(format!("{s}{REPLAY_INFIX}{nanos}"));
        // Never replace an existing replay file (two replays in the same nanosecond).
        while to.exists() {
            nanos += 1;
            to = dead.join(format!("{s}{REPLAY_INFIX}{nanos}"));
        }
        fs::rename(&from, &to).map_err(io_err(&from, "move dead letters to a replay file"))?;
        renamed = true;
        // Counted after as well: appends that raced with the rename are in it too.
        let (_, n) = read_file(&to, false)?;
        moved += n;
        tracing::info!(sink = %s, events = n, file = %to.display(), "dead letters queued for replay");
    }
    if renamed {
        cursor::sync_dir(dead)?;
    }
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(seq: u64, body: &str) -> Record {
        Record {
            seq,
            payload: Bytes::from(body.to_string()),
        }
    }

    #[test]
    fn dead_letters_are_appended_replayed_in_order_and_finished() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dead = DeadLetters::new(dir.path().to_path_buf());
        dead.append("bus", &[rec(3, "a"), rec(4, "b")])
            .expect("append");
        dead.append("bus", &[rec(9, "c")]).expect("append again");
        dead.append("audit", &[rec(1, "x")])
            .expect("append other sink");
        assert!(dead.pending_replay("bus").expect("pending").is_none());

        assert_eq!(replay(dir.path(), Some("bus")).expect("replay"), 3);
        assert!(!log_path(dir.path(), "bus").exists());
        // More dead letters after the replay go to a new log, and a second replay file.
        dead.append("bus", &[rec(10, "d")])
            .expect("append after replay");
        assert_eq!(replay(dir.path(), None).expect("replay all"), 2);

        let (first, records) = dead
            .pending_replay("bus")
            .expect("pending")
            .expect("a replay file");
        assert_eq!(records, vec![rec(3, "a"), rec(4, "b"), rec(9, "c")]);
        dead.finish_replay(&first).expect("finish");
        let (second, records) = dead
            .pending_replay("bus")
            .expect("pending")
            .expect("the second replay file");
        assert_ne!(first, second);
        assert_eq!(records, vec![rec(10, "d")]);
        dead.finish_replay(&second).expect("finish");
        assert!(dead.pending_replay("bus").expect("pending").is_none());
        let (_, audit) = dead
            .pending_replay("audit")
            .expect("pending")
            .expect("audit's replay");
        assert_eq!(audit, vec![rec(1, "x")]);
        assert_eq!(replay(dir.path(), None).expect("nothing left"), 0);
    }

    #[test]
    fn finish_replay_refuses_other_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dead = DeadLetters::new(dir.path().to_path_buf());
        dead.append("bus", &[rec(1, "a")]).expect("append");
        let err = dead
            .finish_replay(&log_path(dir.path(), "bus"))
            .expect_err("a .log is not a replay file");
        assert!(matches!(err, OutboxError::NotReplayFile(_)));
        assert!(log_path(dir.path(), "bus").exists());
        let elsewhere = tempfile::tempdir().expect("tempdir");
        let err = dead
            .finish_replay(&elsewhere.path().join("bus.replay-1"))
            .expect_err("outside the dead-letter directory");
        assert!(matches!(err, OutboxError::NotReplayFile(_)));
    }

    #[test]
    fn a_torn_append_is_cut_before_the_next_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dead = DeadLetters::new(dir.path().to_path_buf());
        dead.append("bus", &[rec(1, "one"), rec(2, "two")])
            .expect("append");
        let path = log_path(dir.path(), "bus");
        let len = fs::metadata(&path).expect("stat").len();
        // A crash in the middle of the next append: half a record on disk, and a new process.
        OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(&[9, 0, 0, 0, 1, 2]))
            .expect("tear");
        let dead = DeadLetters::new(dir.path().to_path_buf());
        dead.append("bus", &[rec(3, "three")])
            .expect("append after the tear");
        let (file, n) = read_file(&path, true).expect("read");
        assert_eq!(n, 3);
        assert_eq!(file.torn_bytes, 0);
        assert_eq!(
            file.records.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(
            fs::metadata(&path).expect("stat").len(),
            len + format::frame_len(5)
        );
    }

    #[test]
    fn replay_names_parse_only_our_own() {
        assert_eq!(parse_replay_name("bus.replay-12"), Some(("bus", 12)));
        assert_eq!(parse_replay_name("bus.replay-"), None);
        assert_eq!(parse_replay_name("bus.replay-1x"), None);
        assert_eq!(parse_replay_name("b.us.replay-1"), None);
        assert_eq!(parse_replay_name("bus.log"), None);
    }
}
