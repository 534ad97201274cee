//! `type: stdout`: one structured event per line on standard output (the demo's sink, and
//! handy with `kubectl logs`).

use tokio::io::AsyncWriteExt;

use super::{BoxFuture, SendResult, Sink, SinkFailure};
use crate::events::CloudEvent;

#[derive(Debug, Default)]
pub struct StdoutSink;

impl Sink for StdoutSink {
    fn send<'a>(&'a self, events: &'a [CloudEvent]) -> BoxFuture<'a, SendResult> {
        Box::pin(async move {
            let mut buf = Vec::with_capacity(events.len() * 512);
            for e in events {
                buf.extend_from_slice(&e.to_json());
                buf.push(b'\n');
            }
            let mut out = tokio::io::stdout();
            match out.write_all(&buf).await.and(out.flush().await) {
                Ok(()) => SendResult::all(events.len()),
                Err(e) => SendResult::failed(0, SinkFailure::retryable(format!("stdout: {e}"))),
            }
        })
    }
}
