//! The running dispatchers, one per configured sink, kept in line with the config as it
//! reloads. A sink is known by its name: its cursor is on disk under that name, so a sink
//! whose settings did not change keeps running untouched (its connection, its place in the
//! outbox), a changed one is stopped and started again with the new settings from the same
//! cursor, and a removed one is stopped while its cursor stays on disk — its backlog is kept
//! until a sink of that name returns.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{Dispatcher, Retry};
use crate::config::SinkConfig;
use crate::metrics::Metrics;
use crate::outbox::Outbox;
use crate::proxy::client::ClientError;
use crate::sinks::{self, Sink};

/// Events one delivery attempt sends at most (and about 1 MiB of them). Large, so that a
/// backlog goes out in few sends: each costs the sink a round trip or an fsync.
const BATCH: usize = 1000;

struct Running {
    config: SinkConfig,
    stop: CancellationToken,
    task: JoinHandle<()>,
    /// The dispatcher's committed cursor.
    progress: watch::Receiver<u64>,
}

/// The sinks of a config, built (which checks their local settings: TLS files) but not
/// started. A sink whose settings equal the running one's is not built again.
pub struct Prepared {
    sinks: Vec<(SinkConfig, Option<Arc<dyn Sink>>)>,
}

/// What [`Fleet::apply`] changed, by sink name.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub started: Vec<String>,
    pub restarted: Vec<String>,
    pub stopped: Vec<String>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.started.is_empty() && self.restarted.is_empty() && self.stopped.is_empty()
    }
}

pub struct Fleet {
    outbox: Outbox,
    metrics: Metrics,
    retry: Retry,
    running: Vec<Running>,
}

impl Fleet {
    pub fn new(outbox: Outbox, metrics: Metrics, retry: Retry) -> Fleet {
        Fleet {
            outbox,
            metrics,
            retry,
            running: Vec::new(),
        }
    }

    /// Builds the sinks of `sinks` that are new or changed. Fails, changing nothing, when one
    /// cannot be built.
    pub fn prepare(&self, sinks: &[SinkConfig]) -> Result<Prepared, (String, ClientError)> {
        let sinks = sinks
            .iter()
            .map(|config| {
                let unchanged = self.running.iter().any(|r| r.config == *config);
                let sink = if unchanged {
                    None
                } else {
                    Some(sinks::build(&config.kind).map_err(|e| (config.name.clone(), e))?)
                };
                Ok((config.clone(), sink))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Prepared { sinks })
    }

    /// Stops the dispatchers of removed and changed sinks (waiting for each to end, so that
    /// two never deliver from one cursor), then starts the new and changed ones.
    pub async fn apply(&mut self, prepared: Prepared) -> Changes {
        let mut changes = Changes::default();
        let mut kept = Vec::new();
        for running in std::mem::take(&mut self.running) {
            let still = prepared
                .sinks
                .iter()
                .find(|(c, _)| c.name == running.config.name);
            match still {
                Some((_, None)) => kept.push(running),
                Some((_, Some(_))) => {
                    changes.restarted.push(running.config.name.clone());
                    stop(running).await;
                }
                None => {
                    changes.stopped.push(running.config.name.clone());
                    tracing::info!(sink = %running.config.name, "sink removed from the config: delivery stopped, its backlog stays on disk until it returns");
                    stop(running).await;
                }
            }
        }
        for (config, sink) in prepared.sinks {
            let running = match sink {
                None => match kept.iter().position(|r| r.config.name == config.name) {
                    Some(i) => kept.swap_remove(i),
                    None => continue,
                },
                Some(sink) => {
                    if !changes.restarted.contains(&config.name) {
                        changes.started.push(config.name.clone());
                    }
                    self.start(config, sink)
                }
            };
            self.running.push(running);
        }
        changes
    }

    fn start(&self, config: SinkConfig, sink: Arc<dyn Sink>) -> Running {
        let progress = watch::Sender::new(0);
        let receiver = progress.subscribe();
        let dispatcher = Dispatcher {
            name: config.name.clone(),
            sink,
            outbox: self.outbox.clone(),
            retry: self.retry,
            metrics: self.metrics.for_sink(&config.name),
            batch_size: BATCH,
            progress,
        };
        let stop = CancellationToken::new();
        let name = config.name.clone();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            if let Err(error) = dispatcher.run(token).await {
                tracing::error!(sink = %name, %error, "delivery stopped; events stay on disk");
            }
        });
        Running {
            config,
            stop,
            task,
            progress: receiver,
        }
    }

    /// Waits until every running sink's committed cursor has reached `end`, for at most
    /// `timeout`. True when all did.
    pub async fn delivered(&mut self, end: u64, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, async {
            for running in &mut self.running {
                // A dispatcher that ended (its task is gone) has no more progress to make.
                let _ = running
                    .progress
                    .wait_for(|committed| *committed >= end)
                    .await;
            }
        })
        .await
        .is_ok()
    }

    /// Stops every dispatcher and waits for them to end.
    pub async fn stop(mut self) {
        for running in self.running.drain(..) {
            stop(running).await;
        }
    }
}

async fn stop(running: Running) {
    running.stop.cancel();
    let _ = running.task.await;
}
