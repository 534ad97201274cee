//! `type: stdout`: one structured event per line on standard output (the demo's sink, and
//! handy with `kubectl logs`).

use tokio::io::AsyncWriteExt;

use super::{BoxFuture, SendResult, Sink, SinkFailure};
use crate::events::{CloudEvent, StoredEvent};

#[derive(Debug, Default)]
pub struct StdoutSink;

/// Writes the lines in `buf` (`n` events).
async fn write(buf: &[u8], n: usize) -> SendResult {
    let mut out = tokio::io::stdout();
    match out.write_all(buf).await.and(out.flush().await) {
        Ok(()) => SendResult::all(n),
        Err(e) => SendResult::failed(0, SinkFailure::retryable(format!("stdout: {e}"))),
    }
}

impl Sink for StdoutSink {
    fn send<'a>(&'a self, events: &'a [CloudEvent]) -> BoxFuture<'a, SendResult> {
        Box::pin(async move {
            let mut buf = Vec::with_capacity(events.len() * 512);
            for e in events {
                e.write_json(&mut buf);
                buf.push(b'\n');
            }
            write(&buf, events.len()).await
        })
    }

    fn send_stored<'a>(&'a self, events: &'a [StoredEvent]) -> BoxFuture<'a, SendResult> {
        Box::pin(async move {
            let mut buf = Vec::with_capacity(events.iter().map(|e| e.json().len() + 1).sum());
            for e in events {
                buf.extend_from_slice(e.json());
                buf.push(b'\n');
            }
            write(&buf, events.len()).await
        })
    }
}
