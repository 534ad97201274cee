//! Accepting client connections: plain TCP or TLS, then hyper-util's auto builder (HTTP/1.1,
//! HTTP/2 with prior knowledge, h2 by ALPN) over the [`super::stack`], with graceful drain.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::smuggling::Watched;
use super::stack::ConnectionService;
use super::{ConnInfo, Live};
use crate::config::Limits;

/// How client connections are served under `limits`; part of the [`super::ProxyState`], so a
/// reload's limits apply to the connections accepted after it.
pub fn http_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // A request head that does not fit this buffer is answered 431 by hyper.
        .max_buf_size(limits.max_header_bytes);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    builder
}

pub struct Server {
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    live: Arc<Live>,
}

impl Server {
    pub fn new(listener: TcpListener, tls: Option<TlsAcceptor>, live: Arc<Live>) -> Server {
        Server {
            listener,
            tls,
            live,
        }
    }

    /// Accepts until `stop` is cancelled, then lets open connections finish their in-flight
    /// requests, and upgraded ones (WebSocket) go on, for up to `drain_timeout`, as nginx and
    /// Envoy drain them. Returns how many connections were still open.
    pub async fn serve(
        self,
        stop: CancellationToken,
        drain_timeout: tokio::sync::watch::Receiver<Duration>,
    ) -> usize {
        let graceful = GracefulShutdown::new();
        let tunnels = tokio_util::task::TaskTracker::new();
        loop {
            let accepted = tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                accepted = self.listener.accept() => accepted,
            };
            let (tcp, remote) = match accepted {
                Ok(conn) => conn,
                Err(error) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let conn = Arc::new(ConnInfo::new(remote, self.tls.is_some(), tunnels.clone()));
            let flag = conn.ambiguous.clone();
            // The connection is served with the limits in force when it was accepted; each
            // of its requests with the config in force when the request arrives.
            let (builder, head_timeout, head_limit) = {
                let state = self.live.load();
                (
                    state.http.clone(),
                    state.header_read_timeout,
                    state.max_header_bytes,
                )
            };
            let live = self.live.clone();
            let service = ConnectionService::new(live.clone(), conn);
            let watcher = graceful.watcher();
            let tls = self.tls.clone();
            tokio::spawn(async move {
                match tls {
                    None => {
                        if !first_byte(&tcp, head_timeout).await {
                            return;
                        }
                        let io = Watched::new(tcp, flag, head_limit);
                        let conn =
                            builder.serve_connection_with_upgrades(TokioIo::new(io), service);
                        if let Err(error) = watcher.watch(conn.into_owned()).await {
                            ended_with(&*error, remote, &live);
                        }
                    }
                    Some(acceptor) => {
                        let stream =
                            match tokio::time::timeout(head_timeout, acceptor.accept(tcp)).await {
                                Ok(Ok(stream)) => stream,
                                Ok(Err(error)) => {
                                    tracing::debug!(%remote, %error, "TLS handshake failed");
                                    return;
                                }
                                Err(_) => {
                                    tracing::debug!(%remote, "TLS handshake timed out");
                                    return;
                                }
                            };
                        let io = Watched::new(stream, flag, head_limit);
                        let conn =
                            builder.serve_connection_with_upgrades(TokioIo::new(io), service);
                        if let Err(error) = watcher.watch(conn.into_owned()).await {
                            ended_with(&*error, remote, &live);
                        }
                    }
                }
            });
        }
        drop(self.listener);
        let drain_timeout = *drain_timeout.borrow();
        let open = graceful.count();
        tunnels.close();
        tracing::info!(connections = open, upgraded = tunnels.len(), timeout = ?drain_timeout, "draining connections");
        let drained = async {
            graceful.shutdown().await;
            tunnels.wait().await;
        };
        match tokio::time::timeout(drain_timeout, drained).await {
            Ok(()) => 0,
            Err(_) => {
                let open = open + tunnels.len();
                tracing::warn!(timeout = ?drain_timeout, "drain timeout: closing connections with requests in flight or upgraded");
                open
            }
        }
    }
}

/// Logs how a connection ended with an error. A request head hyper could not parse was
/// answered by hyper itself (400, 414 or 431: see `on_error` in hyper's `proto/h1/role.rs`)
/// before the stack saw it; it is counted in `ficus_requests_total` like any other answer, on
/// the `default` route with method `other` (no method was parsed that could be trusted).
fn ended_with(error: &(dyn std::error::Error + 'static), remote: SocketAddr, live: &Live) {
    tracing::debug!(%remote, %error, "connection ended with an error");
    let Some(error) = error.downcast_ref::<hyper::Error>() else {
        return;
    };
    let code = if error.is_parse_too_large() {
        // hyper has one predicate for both; only its message tells them apart.
        if error.to_string().starts_with("URI too long") {
            "414"
        } else {
            "431"
        }
    } else if error.is_parse()
        && !error.is_parse_version_h2()
        && !error.is_parse_status()
        && !error.to_string().starts_with("internal error")
    {
        "400"
    } else {
        return;
    };
    live.load()
        .metrics
        .requests_total
        .with_label_values(&["default", "other", code])
        .inc();
}

/// hyper's `header_read_timeout` starts once a request begins; a client that connects and
/// sends nothing at all is closed here after the same time instead of holding a task forever.
async fn first_byte(tcp: &TcpStream, timeout: Duration) -> bool {
    let mut buf = [0u8; 1];
    matches!(
        tokio::time::timeout(timeout, tcp.peek(&mut buf)).await,
        Ok(Ok(n)) if n > 0
    )
}
