//! `type: file`: JSON Lines of structured events, appended and fsynced once per batch, so a
//! delivered event is on disk.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{BoxFuture, SendResult, Sink, SinkFailure};
use crate::events::CloudEvent;

#[derive(Debug)]
pub struct FileSink {
    path: Arc<Path>,
}

impl FileSink {
    pub fn new(path: PathBuf) -> FileSink {
        FileSink { path: path.into() }
    }
}

/// Appends `buf` and fsyncs it. Opened per batch: a file moved away by log rotation is
/// recreated (its directory too). One blocking call for the whole batch: open, write and
/// fsync each through `tokio::fs` would cost a thread hand-off apiece.
fn append(path: &Path, buf: &[u8]) -> io::Result<()> {
    let open = || OpenOptions::new().create(true).append(true).open(path);
    let mut file = match open() {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                fs::create_dir_all(dir)?;
            }
            open()?
        }
        other => other?,
    };
    file.write_all(buf)?;
    file.sync_data()
}

impl Sink for FileSink {
    fn send<'a>(&'a self, events: &'a [CloudEvent]) -> BoxFuture<'a, SendResult> {
        Box::pin(async move {
            let mut buf = Vec::with_capacity(events.len() * 512);
            for e in events {
                e.write_json(&mut buf);
                buf.push(b'\n');
            }
            let path = self.path.clone();
            let result = match tokio::task::spawn_blocking(move || append(&path, &buf)).await {
                Ok(result) => result,
                // Only when the runtime shuts down: not written, so not delivered.
                Err(e) => Err(io::Error::other(e)),
            };
            match result {
                Ok(()) => SendResult::all(events.len()),
                Err(e) => SendResult::failed(
                    0,
                    SinkFailure::retryable(format!("{}: {e}", self.path.display())),
                ),
            }
        })
    }
}
