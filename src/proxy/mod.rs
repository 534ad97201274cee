//! The request path: accept ([`server`]), the tower stack ([`stack`]), and forwarding to the
//! upstream ([`forward`], [`client`]), with the bodies ([`body`]) and header rules
//! ([`headers`]) they share.

pub mod body;
pub mod client;
pub mod events;
pub mod forward;
pub mod framing;
pub mod headers;
pub mod pool;
pub mod server;
pub mod shadow;
pub mod smuggling;
pub mod stack;
pub mod telemetry;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderValue;
use http::Request;
use hyper::body::Incoming;
use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::routing::{Router, Target};
use client::{ClientError, UpstreamClient};

/// The request path's state for one config: what every request's stack reads. A reload builds
/// a new one and swaps it in ([`Live`]); each request takes the one current at its arrival.
pub struct ProxyState {
    pub upstreams: Vec<Arc<UpstreamClient>>,
    pub router: Router,
    pub metrics: Metrics,
    pub trust_forwarded_headers: bool,
    pub access_log: bool,
    /// The event tap; `None` without rules.
    pub events: Option<Arc<events::EventPath>>,
    /// `ficus_request_duration_seconds` per route, in route order, the default route last:
    /// resolved once so that recording a request does no label lookup.
    pub request_durations: Vec<prometheus::Histogram>,
    /// `ficus_route_fallbacks_total` per route, in route order.
    pub fallbacks: Vec<prometheus::IntCounter>,
    /// Shadow bookkeeping per route (`None` for routes without a shadow).
    pub shadows: Vec<Option<shadow::ShadowState>>,
    /// How new client connections are served (`limits`): HTTP/1 and HTTP/2 settings.
    pub http: Arc<auto::Builder<TokioExecutor>>,
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
}

/// The state in force, swapped whole by a reload.
pub type Live = arc_swap::ArcSwap<ProxyState>;

impl ProxyState {
    /// `previous`: the state being replaced, whose upstream clients are kept where the
    /// upstream's settings did not change.
    pub fn new(
        config: &Config,
        metrics: Metrics,
        events: Option<Arc<events::EventPath>>,
        previous: Option<&ProxyState>,
    ) -> Result<ProxyState, ClientError> {
        let kept = |u: &crate::config::Upstream| {
            previous.and_then(|p| p.upstreams.iter().find(|c| c.config == *u).cloned())
        };
        let upstreams = config
            .upstreams
            .iter()
            .map(|u| match kept(u) {
                Some(client) => Ok(client),
                None => UpstreamClient::new(u, &metrics).map(Arc::new),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ProxyState {
            upstreams,
            request_durations: config
                .routes
                .iter()
                .map(|r| r.name.as_str())
                .chain(std::iter::once(crate::routing::DEFAULT_ROUTE))
                .map(|name| metrics.request_duration.with_label_values(&[name]))
                .collect(),
            fallbacks: config
                .routes
                .iter()
                .map(|r| metrics.route_fallbacks_total.with_label_values(&[&r.name]))
                .collect(),
            shadows: config
                .routes
                .iter()
                .map(|r| {
                    r.shadow
                        .as_ref()
                        .map(|s| shadow::ShadowState::new(&r.name, s, &metrics))
                })
                .collect(),
            router: Router::new(config.routes.clone(), config.default_upstream),
            metrics,
            trust_forwarded_headers: config.listen.trust_forwarded_headers,
            access_log: config.log.access,
            events,
            http: Arc::new(server::http_builder(&config.limits)),
            header_read_timeout: config.limits.header_read_timeout,
            max_header_bytes: config.limits.max_header_bytes,
        })
    }
}

/// Facts about one client connection, computed once per connection rather than per request.
#[derive(Debug)]
pub struct ConnInfo {
    pub remote: SocketAddr,
    /// The client's IP as an `X-Forwarded-For` element.
    pub client_ip: HeaderValue,
    pub tls: bool,
    /// Raised by the connection's reader when a request head has ambiguous framing.
    pub ambiguous: Arc<smuggling::AmbiguousFlag>,
    /// The listener's upgraded connections (WebSocket), which hyper's graceful drain no
    /// longer sees once they are handed over: the drain waits for them too.
    pub tunnels: tokio_util::task::TaskTracker,
}

impl ConnInfo {
    pub fn new(remote: SocketAddr, tls: bool, tunnels: tokio_util::task::TaskTracker) -> ConnInfo {
        let ip = remote.ip().to_canonical();
        let client_ip = HeaderValue::from_str(&ip.to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        ConnInfo {
            remote,
            client_ip,
            tls,
            ambiguous: Arc::default(),
            tunnels,
        }
    }
}

/// A request with the route it was given; what the layers below routing see.
pub struct Routed {
    pub target: Target,
    pub request: Request<Incoming>,
    /// Where the request body is teed for the rules, and how many bytes at most.
    pub capture: Option<(Arc<events::CaptureSlot>, usize)>,
}
