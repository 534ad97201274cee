//! Cursor files: `cursors/<sink>.cursor`, one per sink, replaced atomically.
//!
//! A cursor is written to `<sink>.cursor.tmp`, fsynced, renamed over `<sink>.cursor`, and the
//! directory is fsynced: after a crash the file holds the old or the new cursor, never a mix.
//! A leftover `.tmp` is a commit that did not happen; the running process removes it at open.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use super::format;
use super::{io_err, OutboxError};

const SUFFIX: &str = ".cursor";
const TMP_SUFFIX: &str = ".cursor.tmp";

pub(crate) fn path(dir: &Path, sink: &str) -> PathBuf {
    dir.join(format!("{sink}{SUFFIX}"))
}

/// Reads one cursor file. A file that is not a valid cursor is an error naming it: starting
/// that sink over from 0, or from the end, would silently redeliver or lose its backlog.
pub(crate) fn read(path: &Path) -> Result<u64, OutboxError> {
    let mut buf = Vec::with_capacity(format::CURSOR_LEN);
    File::open(path)
        .and_then(|f| f.take(format::CURSOR_LEN as u64 + 1).read_to_end(&mut buf))
        .map_err(io_err(path, "read cursor file"))?;
    format::decode_cursor(&buf).map_err(|reason| OutboxError::Corrupt {
        path: path.to_path_buf(),
        offset: 0,
        reason: format!("not a valid cursor file: {reason}"),
    })
}

/// Persists `sink`'s cursor atomically (see the module docs).
pub(crate) fn write(dir: &Path, sink: &str, next: u64) -> Result<(), OutboxError> {
    let tmp = dir.join(format!("{sink}{TMP_SUFFIX}"));
    let dest = path(dir, sink);
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io_err(&tmp, "create cursor file"))?;
        f.write_all(&format::encode_cursor(next))
            .map_err(io_err(&tmp, "write cursor file"))?;
        f.sync_data().map_err(io_err(&tmp, "fsync cursor file"))?;
    }
    fs::rename(&tmp, &dest).map_err(io_err(&dest, "rename cursor file into place"))?;
    sync_dir(dir)
}

/// Every cursor in `dir`, by sink. With `cleanup`, leftover temporary files of interrupted
/// commits are removed (only the process that owns the outbox may do that).
pub(crate) fn load_all(dir: &Path, cleanup: bool) -> Result<BTreeMap<String, u64>, OutboxError> {
    let mut out = BTreeMap::new();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound && !cleanup => return Ok(out),
        Err(e) => return Err(io_err(dir, "list cursor directory")(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_err(dir, "list cursor directory"))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.ends_with(TMP_SUFFIX) {
            if cleanup {
                tracing::info!(file = %entry.path().display(), "removing the temporary file of an interrupted cursor commit");
                fs::remove_file(entry.path())
                    .map_err(io_err(&entry.path(), "remove stale cursor file"))?;
            }
            continue;
        }
        let Some(sink) = name.strip_suffix(SUFFIX) else {
            continue;
        };
        if !format::valid_sink(sink) {
            tracing::warn!(file = %entry.path().display(), "ignoring a cursor file whose name is not a sink name");
            continue;
        }
        out.insert(sink.to_string(), read(&entry.path())?);
    }
    Ok(out)
}

/// fsyncs a directory, so that a rename, create or unlink in it survives power loss.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), OutboxError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir, "fsync directory"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commit_replaces_the_cursor_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "bus", 5).expect("first commit");
        write(dir.path(), "bus", 9).expect("second commit");
        assert_eq!(read(&path(dir.path(), "bus")).expect("read back"), 9);
        let names: Vec<_> = fs::read_dir(dir.path())
            .expect("list")
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        assert_eq!(names, vec!["bus.cursor".to_string()]);
    }

    #[test]
    fn an_interrupted_commit_keeps_the_old_cursor_and_its_tmp_is_removed_at_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "bus", 5).expect("commit");
        // A crash after writing the temporary file, before the rename: half a cursor in it.
        fs::write(
            dir.path().join("bus.cursor.tmp"),
            &format::encode_cursor(9)[..7],
        )
        .expect("write tmp");
        // Read-only loaders (status) leave it alone.
        let seen = load_all(dir.path(), false).expect("load read-only");
        assert_eq!(seen.get("bus"), Some(&5));
        assert!(dir.path().join("bus.cursor.tmp").exists());
        let seen = load_all(dir.path(), true).expect("load");
        assert_eq!(seen.get("bus"), Some(&5));
        assert!(!dir.path().join("bus.cursor.tmp").exists());
    }

    #[test]
    fn a_damaged_cursor_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "audit", 77).expect("commit");
        let p = path(dir.path(), "audit");
        let mut bytes = fs::read(&p).expect("read");
        bytes[13] ^= 0x40;
        fs::write(&p, &bytes).expect("damage");
        let err = load_all(dir.path(), true).expect_err("damage must not be ignored");
        assert!(matches!(err, OutboxError::Corrupt { .. }), "{err:?}");
        assert!(err.to_string().contains("audit.cursor"), "{err}");

        fs::write(&p, b"").expect("empty it");
        let err = read(&p).expect_err("an empty cursor file is not cursor 0");
        assert!(err.to_string().contains("audit.cursor"), "{err}");
    }
}
