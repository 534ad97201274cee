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
use crate::metrics::Metrics;
use crate::proxy::client::ClientError;
use crate::proxy::server::Server;
use crate::proxy::tls::{self, ReloadingCert, TlsError};
use crate::proxy::ProxyState;

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
    #[error(transparent)]
    Upstream(#[from] ClientError),
    #[error("metrics registration failed: {0}")]
    Metrics(#[from] prometheus::Error),
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
    registry: Registry,
    state: Arc<ProxyState>,
    readiness: Arc<Readiness>,
    tls: Option<Arc<ReloadingCert>>,
}

impl App {
    /// Builds everything that can fail before a socket is bound: upstream clients, TLS
    /// material, metrics.
    pub fn new(config: Config, registry: Registry) -> Result<App, AppError> {
        let metrics = Metrics::new(&registry)?;
        let state = Arc::new(ProxyState::new(&config, metrics)?);
        let tls = match &config.listen.tls {
            Some(files) => Some(ReloadingCert::load(files)?),
            None => None,
        };
        Ok(App {
            config,
            registry,
            state,
            readiness: Readiness::new("starting"),
            tls,
        })
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
        });
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
        stop_admin.cancel();
        let _ = admin_task.await;
        Ok(())
    }
}
