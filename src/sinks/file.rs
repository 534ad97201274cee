//! `type: file`: JSON Lines of structured events, appended and fsynced once per batch, so a
//! delivered event is on disk.

use std::path::PathBuf;

use tokio::io::AsyncWriteExt;

use super::{BoxFuture, SendResult, Sink, SinkFailure};
use crate::events::CloudEvent;

#[derive(Debug)]
pub struct FileSink {
    path: PathBuf,
}

impl FileSink {
    pub fn new(path: PathBuf) -> FileSink {
        FileSink { path }
    }

    async fn append(&self, buf: &[u8]) -> std::io::Result<()> {
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(dir).await?;
        }
        // Opened per batch: a file moved away by log rotation is recreated.
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .await?;
        file.write_all(buf).await?;
        file.sync_data().await
    }
}

impl Sink for FileSink {
    fn send<'a>(&'a self, events: &'a [CloudEvent]) -> BoxFuture<'a, SendResult> {
        Box::pin(async move {
            let mut buf = Vec::with_capacity(events.len() * 512);
            for e in events {
                buf.extend_from_slice(&e.to_json());
                buf.push(b'\n');
            }
            match self.append(&buf).await {
                Ok(()) => SendResult::all(events.len()),
                Err(e) => SendResult::failed(
                    0,
                    SinkFailure::retryable(format!("{}: {e}", self.path.display())),
                ),
            }
        })
    }
}
