//! Wiring and lifecycle: bind the listeners, serve, and shut down in the SPEC's order —
//! `/readyz` to 503, stop accepting, drain in-flight requests, exit.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use prometheus::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::admin::{Admin, Readiness};
use crate::config::Config;
use crate::dispatch::Dispatcher;
use crate::metrics::Metrics;
use crate::outbox::{Outbox, OutboxError, OutboxMetrics, OutboxSettings};
use crate::proxy::client::ClientError;
use crate::proxy::events::EventPath;
use crate::proxy::server::Server;
use crate::proxy::tls::{self, ReloadingCert, TlsError};
use crate::proxy::ProxyState;
use crate::sinks::Sink;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot listen on {address} ({what}): {source}")]
    Bind {
        what: &'static str,
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("listen.tls: {0}")]
    Tls(#[from] TlsError),
    #[error("upstream {0}")]
    Upstream(#[from] ClientError),
    #[error("metrics registration failed: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("outbox: {0}")]
    Outbox(#[from] OutboxError),
    #[error("sink {0}")]
    Sink(ClientError),
}

/// Events one delivery attempt sends at most.
const DISPATCH_BATCH: usize = 100;

/// The bound sockets, so that a caller (a test) can bind port 0 and learn the ports before
/// the app runs.
pub struct Listeners {
    pub proxy: TcpListener,
    pub admin: TcpListener,
}

impl Listeners {
    pub async fn bind(config: &Config) -> Result<Listeners, AppError> {
        let bind = |what, address| async move {
            TcpListener::bind(address)
                .await
                .map_err(|source| AppError::Bind {
                    what,
                    address,
                    source,
                })
        };
        Ok(Listeners {
            proxy: bind("listen", config.listen.address).await?,
            admin: bind("admin", config.admin.address).await?,
        })
    }

    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }
}

pub struct App {
    config: Config,
    registry: Registry,
    metrics: Metrics,
    state: Arc<ProxyState>,
    readiness: Arc<Readiness>,
    tls: Option<Arc<ReloadingCert>>,
    outbox: Option<Outbox>,
    sinks: Vec<(String, Arc<dyn Sink>)>,
}

impl App {
    /// Builds everything that can fail before a socket is bound: upstream clients, TLS
    /// material, metrics.
    pub fn new(config: Config, registry: Registry) -> Result<App, AppError> {
        let metrics = Metrics::new(&registry)?;
        let sinks = config
            .sinks
            .iter()
            .map(|s| {
                Ok((
                    s.name.clone(),
                    crate::sinks::build(&s.kind).map_err(AppError::Sink)?,
                ))
            })
            .collect::<Result<Vec<_>, AppError>>()?;
        // The outbox is opened whenever sinks exist: with no rules left, a backlog on disk
        // still has to be delivered.
        let outbox = if sinks.is_empty() && config.events.is_none() {
            None
        } else {
            let mut settings = OutboxSettings::new(config.outbox.dir.clone());
            settings.durability = config.outbox.durability;
            settings.max_bytes = config.outbox.max_bytes;
            settings.when_full = config.outbox.when_full;
            let outbox_metrics = OutboxMetrics {
                bytes: metrics.outbox_bytes.clone(),
                unflushed: metrics.outbox_unflushed_events.clone(),
            };
            Some(Outbox::open(settings, outbox_metrics)?)
        };
        let events = match (&config.events, &outbox) {
            (Some(events), Some(outbox)) if !events.rules.is_empty() => {
                Some(Arc::new(EventPath::new(
                    events.rules.clone(),
                    outbox.clone(),
                    &config.outbox,
                    config.limits.capture_body,
                    events.source.clone(),
                    metrics.clone(),
                )))
            }
            _ => None,
        };
        let state = Arc::new(ProxyState::new(&config, metrics.clone(), events)?);
        let tls = match &config.listen.tls {
            Some(files) => Some(ReloadingCert::load(files)?),
            None => None,
        };
        Ok(App {
            config,
            registry,
            metrics,
            state,
            readiness: Readiness::new("starting"),
            tls,
            outbox,
            sinks,
        })
    }

    /// The event tap, for subscribers such as the demo's printout.
    pub fn events(&self) -> Option<Arc<EventPath>> {
        self.state.events.clone()
    }

    pub fn readiness(&self) -> Arc<Readiness> {
        self.readiness.clone()
    }

    /// Serves until `shutdown` resolves, then drains. Returns when every connection finished
    /// or `shutdown.drain_timeout` passed.
    pub async fn run(
        self,
        listeners: Listeners,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), AppError> {
        let stop_proxy = CancellationToken::new();
        let stop_admin = CancellationToken::new();
        let tls = match &self.tls {
            Some(cert) => {
                cert.clone().watch(stop_admin.clone());
                Some(tokio_rustls::TlsAcceptor::from(Arc::new(
                    tls::server_config(cert.clone())?,
                )))
            }
            None => None,
        };
        let admin = Arc::new(Admin {
            registry: self.registry.clone(),
            readiness: self.readiness.clone(),
            outbox: self.outbox.clone(),
            events: self.state.events.clone(),
            asyncapi: crate::asyncapi::document(&self.config),
        });
        let stop_delivery = CancellationToken::new();
        let mut dispatchers = Vec::new();
        let mut progress = Vec::new();
        if let Some(outbox) = &self.outbox {
            for (name, sink) in &self.sinks {
                let dispatcher = Dispatcher {
                    name: name.clone(),
                    sink: sink.clone(),
                    outbox: outbox.clone(),
                    retry: self.config.outbox.retry,
                    metrics: self.metrics.for_sink(name),
                    batch_size: DISPATCH_BATCH,
                    progress: tokio::sync::watch::Sender::new(0),
                };
                progress.push(dispatcher.progress.subscribe());
                let stop = stop_delivery.clone();
                let name = name.clone();
                dispatchers.push(tokio::spawn(async move {
                    if let Err(error) = dispatcher.run(stop).await {
                        tracing::error!(sink = %name, %error, "delivery stopped; events stay on disk");
                    }
                }));
            }
        }
        let admin_task = tokio::spawn(admin.serve(listeners.admin, stop_admin.clone()));
        let server = Server::new(
            listeners.proxy,
            tls,
            self.state.clone(),
            &self.config.limits,
        );

        let readiness = self.readiness.clone();
        let stop = stop_proxy.clone();
        tokio::spawn(async move {
            shutdown.await;
            // Not ready first, so that the endpoints controller takes the pod out of rotation
            // while in-flight requests finish.
            readiness.set_not_ready("shutting down");
            stop.cancel();
        });
        self.readiness.set_ready();
        tracing::info!(
            listen = %self.config.listen.address,
            admin = %self.config.admin.address,
            "ficus is ready"
        );
        let left = server
            .serve(stop_proxy, self.config.shutdown.drain_timeout)
            .await;
        if left == 0 {
            tracing::info!("drained; stopping");
        }
        if let Some(outbox) = &self.outbox {
            // Every accepted event on disk before anything else stops.
            if let Err(error) = outbox.flush().await {
                tracing::error!(%error, "outbox flush at shutdown failed");
            }
            // Every sink's committed cursor past the last durable event, or the timeout.
            let end = outbox.durable_end();
            let delivered = tokio::time::timeout(self.config.shutdown.delivery_timeout, async {
                for rx in &mut progress {
                    let _ = rx.wait_for(|committed| *committed >= end).await;
                }
            })
            .await;
            if delivered.is_err() {
                tracing::info!(timeout = ?self.config.shutdown.delivery_timeout, "undelivered events stay on disk for the next start");
            }
        }
        stop_delivery.cancel();
        for task in dispatchers {
            let _ = task.await;
        }
        if let Some(outbox) = &self.outbox {
            // Stops the writer and releases the directory lock for the next process.
            if let Err(error) = outbox.close().await {
                tracing::error!(%error, "outbox close failed");
            }
        }
        stop_admin.cancel();
        let _ = admin_task.await;
        Ok(())
    }
}
