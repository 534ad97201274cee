//! `type: file`: JSON Lines of structured events, appended and fsynced once per batch, so a
//! delivered event is on disk.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{BoxFuture, SendResult, Sink, SinkFailure};
use crate::events::{CloudEvent, StoredEvent};

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

impl FileSink {
    /// Appends the lines in `buf` (`n` events) and fsyncs them.
    async fn write(&self, buf: Vec<u8>, n: usize) -> SendResult {
        let path = self.path.clone();
        let result = match tokio::task::spawn_blocking(move || append(&path, &buf)).await {
            Ok(result) => result,
            // Only when the runtime shuts down: not written, so not delivered.
            Err(e) => Err(io::Error::other(e)),
        };
        match result {
            Ok(()) => SendResult::all(n),
            Err(e) => SendResult::failed(
                0,
                SinkFailure::retryable(format!("{}: {e}", self.path.display())),
            ),
        }
    }
}

impl Sink for FileSink {
    fn send<'a>(&'a self, events: &'a [CloudEvent]) -> BoxFuture<'a, SendResult> {
        Box::pin(async move {
            let mut buf = Vec::with_capacity(events.len() * 512);
            for e in events {
                e.write_json(&mut buf);
                buf.push(b'\n');
            }
            self.write(buf, events.len()).await
        })
    }

    fn send_stored<'a>(&'a self, events: &'a [StoredEvent]) -> BoxFuture<'a, SendResult> {
        Box::pin(async move {
            let size = events.iter().map(|e| e.json().len() + 1).sum();
            let mut buf = Vec::with_capacity(size);
            for e in events {
                buf.extend_from_slice(e.json());
                buf.push(b'\n');
            }
            self.write(buf, events.len()).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{sample_event, Envelope};

    /// The stored bytes written as they are make the same file as the events serialised.
    #[tokio::test]
    async fn stored_events_are_written_as_the_decoded_ones_would_be() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut events = vec![sample_event(), sample_event()];
        events[1].id = "0190-b".into();
        events[1].data = Some(serde_json::json!({"b": [1, 2.5], "a": "caf\u{e9}\n"}));
        let stored: Vec<StoredEvent> = events
            .iter()
            .map(|e| {
                let payload = Envelope {
                    sinks: None,
                    rule: "r".into(),
                    event: e.clone(),
                }
                .encode();
                StoredEvent::parse(&payload, Some("audit"))
                    .expect("parses")
                    .expect("for every sink")
            })
            .collect();
        let decoded = FileSink::new(dir.path().join("a/decoded.jsonl"));
        let raw = FileSink::new(dir.path().join("b/stored.jsonl"));
        assert_eq!(decoded.send(&events).await.delivered, 2);
        assert_eq!(raw.send_stored(&stored).await.delivered, 2);
        let a = fs::read(dir.path().join("a/decoded.jsonl")).expect("read");
        let b = fs::read(dir.path().join("b/stored.jsonl")).expect("read");
        assert_eq!(String::from_utf8_lossy(&a), String::from_utf8_lossy(&b));
        assert_eq!(a.iter().filter(|&&c| c == b'\n').count(), 2);
    }
}
