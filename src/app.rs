//! Wiring and lifecycle: bind the listeners, serve, reload the config while serving, and shut
//! down in the SPEC's order — `/readyz` to 503, stop accepting, drain in-flight requests,
//! flush the outbox, give sinks a bounded time to deliver, exit.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;

use prometheus::Registry;
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::admin::{Admin, Readiness};
use crate::config::Config;
use crate::dispatch::fleet::{Changes, Fleet, Prepared};
use crate::events::CloudEvent;
use crate::metrics::Metrics;
use crate::outbox::{Outbox, OutboxError, OutboxMetrics, OutboxSettings};
use crate::proxy::client::ClientError;
use crate::proxy::events::EventPath;
use crate::proxy::server::Server;
use crate::proxy::tls::{self, ReloadingCert, TlsError};
use crate::proxy::{Live, ProxyState};
use crate::reload::{Trigger, Watch};

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
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    /// The client error names the sink already.
    #[error("sink {1}")]
    Sink(String, ClientError),
}

impl AppError {
    /// A file the config names (a certificate, a key, a CA) that cannot be read or used: the
    /// config is what is wrong, as for `ficus check`'s errors (exit 2), though `check` cannot
    /// know it (the files are often only mounted where ficus runs).
    pub fn is_config_material(&self) -> bool {
        matches!(
            self,
            AppError::Tls(_) | AppError::Upstream(_) | AppError::Sink(..)
        )
    }
}

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
    /// The file the config came from, watched for changes; `None` (the demo, most tests): no
    /// reloads.
    source: Option<PathBuf>,
    registry: Registry,
    metrics: Metrics,
    live: Arc<Live>,
    readiness: Arc<Readiness>,
    tls: Option<Arc<ReloadingCert>>,
    outbox: Arc<OnceLock<Outbox>>,
    /// The dispatchers, with the sinks of the config built and ready to start.
    delivery: Option<(Fleet, Prepared)>,
    tail: broadcast::Sender<Arc<CloudEvent>>,
}

/// The outbox whenever the config has sinks or rules: with no rules left, a backlog on disk
/// still has to be delivered.
fn open_outbox(config: &Config, metrics: &Metrics) -> Result<Option<Outbox>, OutboxError> {
    if config.sinks.is_empty() && config.events.is_none() {
        return Ok(None);
    }
    let mut settings = OutboxSettings::new(config.outbox.dir.clone());
    settings.durability = config.outbox.durability;
    settings.max_bytes = config.outbox.max_bytes;
    settings.when_full = config.outbox.when_full;
    let outbox_metrics = OutboxMetrics {
        bytes: metrics.outbox_bytes.clone(),
        unflushed: metrics.outbox_unflushed_events.clone(),
    };
    Outbox::open(settings, outbox_metrics).map(Some)
}

/// The event tap of `config`'s rules, writing to `outbox`.
fn event_path(
    config: &Config,
    outbox: Option<&Outbox>,
    metrics: &Metrics,
    tail: &broadcast::Sender<Arc<CloudEvent>>,
) -> Option<Arc<EventPath>> {
    match (&config.events, outbox) {
        (Some(events), Some(outbox)) if !events.rules.is_empty() => Some(Arc::new(EventPath::new(
            events,
            config,
            outbox.clone(),
            metrics.clone(),
            tail.clone(),
        ))),
        _ => None,
    }
}

fn prepare(fleet: &Fleet, config: &Config) -> Result<Prepared, AppError> {
    fleet
        .prepare(&config.sinks)
        .map_err(|(name, error)| AppError::Sink(name, error))
}

impl App {
    /// Builds everything that can fail before a socket is bound: upstream clients, sinks, TLS
    /// material, the outbox, metrics.
    pub fn new(config: Config, registry: Registry) -> Result<App, AppError> {
        let metrics = Metrics::new(&registry)?;
        let outbox = open_outbox(&config, &metrics)?;
        let delivery = match &outbox {
            Some(outbox) => {
                let fleet = Fleet::new(outbox.clone(), metrics.clone(), config.outbox.retry);
                let prepared = prepare(&fleet, &config)?;
                Some((fleet, prepared))
            }
            None => None,
        };
        let tail = broadcast::channel(1024).0;
        let events = event_path(&config, outbox.as_ref(), &metrics, &tail);
        let state = ProxyState::new(&config, metrics.clone(), events, None)?;
        let tls = match &config.listen.tls {
            Some(files) => Some(ReloadingCert::load(files)?),
            None => None,
        };
        let cell = Arc::new(OnceLock::new());
        if let Some(outbox) = outbox {
            let _ = cell.set(outbox);
        }
        Ok(App {
            config,
            source: None,
            registry,
            metrics,
            live: Arc::new(ArcSwap::from_pointee(state)),
            readiness: Readiness::new("starting"),
            tls,
            outbox: cell,
            delivery,
            tail,
        })
    }

    /// Reload the config from `path` when it changes and on SIGHUP.
    pub fn reload_from(mut self, path: impl Into<PathBuf>) -> App {
        self.source = Some(path.into());
        self
    }

    /// Every event the rules derive, as they are derived (for the demo's printout).
    pub fn tail(&self) -> broadcast::Receiver<Arc<CloudEvent>> {
        self.tail.subscribe()
    }

    pub fn readiness(&self) -> Arc<Readiness> {
        self.readiness.clone()
    }

    /// Serves until `shutdown` resolves, then drains, flushes the outbox and gives the sinks
    /// `shutdown.delivery_timeout` to deliver. Returns when all that is done.
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
        let asyncapi = Arc::new(ArcSwap::from_pointee(crate::asyncapi::document(
            &self.config,
        )));
        let admin = Arc::new(Admin {
            registry: self.registry.clone(),
            families: self.metrics.families.clone(),
            readiness: self.readiness.clone(),
            outbox: self.outbox.clone(),
            live: self.live.clone(),
            tail: self.tail.clone(),
            asyncapi: asyncapi.clone(),
        });
        let fleet = match self.delivery {
            Some((mut fleet, prepared)) => {
                fleet.apply(prepared).await;
                Some(fleet)
            }
            None => None,
        };
        let (drain_timeout, drain) =
            tokio::sync::watch::channel(self.config.shutdown.drain_timeout);
        let mut core = Core {
            drain_timeout,
            config: self.config,
            metrics: self.metrics,
            live: self.live.clone(),
            outbox: self.outbox.clone(),
            fleet,
            tail: self.tail,
            asyncapi,
        };
        let admin_task = tokio::spawn(admin.serve(listeners.admin, stop_admin.clone()));
        let server = Server::new(listeners.proxy, tls, self.live.clone());

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
            listen = %core.config.listen.address,
            admin = %core.config.admin.address,
            "ficus is ready"
        );
        // The reloader owns the running state while serving and hands it back to shut down.
        let stop_reload = CancellationToken::new();
        let source = self.source;
        let stop = stop_reload.clone();
        let reloader = tokio::spawn(async move {
            if let Some(path) = source {
                core.watch(path, stop).await;
            }
            core
        });
        let left = server.serve(stop_proxy, drain).await;
        if left == 0 {
            tracing::info!("drained; stopping");
        }
        stop_reload.cancel();
        match reloader.await {
            Ok(core) => core.shut_down().await,
            // Only a panic ends the reloader early; what is on disk stays for the next start.
            Err(error) => {
                tracing::error!(%error, "config reloader failed; stopping without waiting for delivery")
            }
        }
        stop_admin.cancel();
        let _ = admin_task.await;
        Ok(())
    }
}

/// The running state a reload replaces piece by piece.
struct Core {
    /// `shutdown.drain_timeout` in force, read by the server when the drain starts.
    drain_timeout: tokio::sync::watch::Sender<std::time::Duration>,
    /// The config in force (with the sections that need a restart as they started).
    config: Config,
    metrics: Metrics,
    live: Arc<Live>,
    outbox: Arc<OnceLock<Outbox>>,
    fleet: Option<Fleet>,
    tail: broadcast::Sender<Arc<CloudEvent>>,
    asyncapi: Arc<ArcSwap<String>>,
}

/// What a reload did, for its log line.
struct Applied {
    restart_needed: Vec<&'static str>,
    sinks: Changes,
}

impl Core {
    /// Reloads on every trigger until `stop`.
    async fn watch(&mut self, path: PathBuf, stop: CancellationToken) {
        let mut watch = Watch::new(&path);
        // What was last loaded (or refused): a file event that leaves the text as it was
        // (a touch, a second event of one swap) reloads nothing.
        let mut loaded = self.config.fingerprint;
        // The last read error: while the file stays unreadable the same way, the other files
        // changing in its directory (a sink's file, a log) refuse nothing again.
        let mut unreadable: Option<String> = None;
        loop {
            let trigger = tokio::select! {
                _ = stop.cancelled() => return,
                trigger = watch.next() => trigger,
            };
            let file = path.display().to_string();
            let text = match tokio::fs::read_to_string(&path).await {
                Ok(text) => {
                    unreadable = None;
                    text
                }
                Err(error) => {
                    // Mid-swap, or deleted: the running config stays; the next change or
                    // SIGHUP tries again.
                    let said = error.to_string();
                    if trigger == Trigger::Changed && unreadable.as_ref() == Some(&said) {
                        continue;
                    }
                    unreadable = Some(said);
                    tracing::error!(file = %file, %error, "config reload refused: cannot read the file; the running config stays");
                    self.metrics
                        .config_reloads_total
                        .with_label_values(&["error"])
                        .inc();
                    continue;
                }
            };
            let fingerprint = crate::config::fingerprint(&text);
            if trigger == Trigger::Changed && fingerprint == loaded {
                continue;
            }
            loaded = fingerprint;
            let new = match Config::from_yaml(&text, &file) {
                Ok(new) => new,
                Err(error) => {
                    self.refused(&file, &error.to_string());
                    continue;
                }
            };
            let warnings = new.warnings.clone();
            match self.apply(new).await {
                Ok(applied) => {
                    for warning in &warnings {
                        tracing::warn!(warning = %warning, "config");
                    }
                    if !applied.restart_needed.is_empty() {
                        tracing::warn!(
                            sections = %applied.restart_needed.join(", "),
                            "config reload: these sections changed but only apply at a restart; they keep their running values"
                        );
                    }
                    self.metrics
                        .config_reloads_total
                        .with_label_values(&["ok"])
                        .inc();
                    tracing::info!(
                        file = %file,
                        trigger = ?trigger,
                        routes = self.config.routes.len(),
                        rules = self.config.events.as_ref().map_or(0, |e| e.rules.rules().len()),
                        sinks_started = ?applied.sinks.started,
                        sinks_restarted = ?applied.sinks.restarted,
                        sinks_stopped = ?applied.sinks.stopped,
                        "config reloaded"
                    );
                }
                Err(error) => self.refused(&file, &error.to_string()),
            }
        }
    }

    fn refused(&self, file: &str, errors: &str) {
        for line in errors.lines() {
            tracing::error!(file = %file, error = %line, "config reload refused; the running config stays");
        }
        self.metrics
            .config_reloads_total
            .with_label_values(&["error"])
            .inc();
    }

    /// Applies `new`: everything is built first, and only when all of it could be is the
    /// running state replaced — a reload applies whole or not at all.
    async fn apply(&mut self, new: Config) -> Result<Applied, AppError> {
        let outbox_open = self.outbox.get().is_some();
        let restart_needed = crate::reload::needs_restart(&self.config, &new, outbox_open);
        let new = crate::reload::effective(&self.config, new, outbox_open);
        let opened = match self.outbox.get() {
            Some(_) => None,
            None => open_outbox(&new, &self.metrics)?,
        };
        let outbox = self.outbox.get().or(opened.as_ref()).cloned();
        let fleet = match (&self.fleet, &outbox) {
            (Some(_), _) | (None, None) => None,
            (None, Some(outbox)) => Some(Fleet::new(
                outbox.clone(),
                self.metrics.clone(),
                new.outbox.retry,
            )),
        };
        let prepared = match fleet.as_ref().or(self.fleet.as_ref()) {
            Some(fleet) => Some(prepare(fleet, &new)?),
            None => None,
        };
        let events = event_path(&new, outbox.as_ref(), &self.metrics, &self.tail);
        let state = ProxyState::new(&new, self.metrics.clone(), events, Some(&self.live.load()))?;
        // Nothing failed: from here on the new config is in force.
        if let Some(opened) = opened {
            let _ = self.outbox.set(opened);
        }
        if fleet.is_some() {
            self.fleet = fleet;
        }
        self.live.store(Arc::new(state));
        let sinks = match (&mut self.fleet, prepared) {
            (Some(fleet), Some(prepared)) => fleet.apply(prepared).await,
            _ => Changes::default(),
        };
        // The removed sinks' dispatchers have ended, so nothing sets their gauges again.
        for sink in &sinks.stopped {
            self.metrics.forget_sink(sink);
        }
        self.asyncapi
            .store(Arc::new(crate::asyncapi::document(&new)));
        self.drain_timeout.send_replace(new.shutdown.drain_timeout);
        self.config = new;
        Ok(Applied {
            restart_needed,
            sinks,
        })
    }

    /// After the drain: every accepted event on disk, the sinks given `delivery_timeout` to
    /// deliver it, then the outbox closed (what is left stays for the next start).
    async fn shut_down(self) {
        let Some(outbox) = self.outbox.get() else {
            return;
        };
        if let Err(error) = outbox.flush().await {
            tracing::error!(%error, "outbox flush at shutdown failed");
        }
        let timeout = self.config.shutdown.delivery_timeout;
        if let Some(mut fleet) = self.fleet {
            if !fleet.delivered(outbox.durable_end(), timeout).await {
                tracing::info!(
                    ?timeout,
                    "undelivered events stay on disk for the next start"
                );
            }
            fleet.stop().await;
        }
        // Stops the writer and releases the directory lock for the next process.
        if let Err(error) = outbox.close().await {
            tracing::error!(%error, "outbox close failed");
        }
    }
}
