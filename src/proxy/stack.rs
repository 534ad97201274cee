//! The tower stack every proxied request goes through, built in one place so that the order
//! of the layers, and why, can be read top to bottom.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::Request;
use hyper::body::Incoming;
use tower::util::Oneshot;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

use super::events::Events;
use super::forward::Forward;
use super::framing::Framing;
use super::telemetry::Telemetry;
use super::{ConnInfo, Live, ProxyState, Routed};

/// The whole request path as one type, so that hyper can see it is `Send`.
pub type ProxyStack = Route<Telemetry<Framing<Events<Forward>>>>;

/// Builds the stack for one client connection.
pub fn stack(state: Arc<ProxyState>, conn: Arc<ConnInfo>) -> ProxyStack {
    ServiceBuilder::new()
        // Routing first: every layer below labels its work with the route and upstream, and
        // the route is decided from the request head alone, before any body byte is read.
        .layer(RouteLayer {
            state: state.clone(),
        })
        // Telemetry above everything that can answer: requests that ficus refuses or fails
        // are counted and logged like those the upstream answers.
        .layer(TelemetryLayer {
            state: state.clone(),
        })
        // Framing checks sit right above forwarding: an ambiguous request must never reach
        // the upstream, and nothing below them may have read its body.
        .layer(FramingLayer { conn: conn.clone() })
        // The event tap right above forwarding: it sees exactly what the upstream sees and
        // answers, after framing checks refused what must not be forwarded at all.
        .layer(EventsLayer {
            state: state.clone(),
        })
        .service(Forward::new(state, conn))
}

/// The hyper service of one client connection. Each request gets the stack of the config in
/// force when it arrives, so that after a reload a keep-alive connection's next request sees
/// the new routes and rules while the requests already in flight finish under the old ones.
/// Building the stack is a handful of reference-count increments, the same work as cloning a
/// per-connection stack for each request.
#[derive(Clone)]
pub struct ConnectionService {
    live: Arc<Live>,
    conn: Arc<ConnInfo>,
}

impl ConnectionService {
    pub fn new(live: Arc<Live>, conn: Arc<ConnInfo>) -> ConnectionService {
        ConnectionService { live, conn }
    }
}

impl hyper::service::Service<Request<Incoming>> for ConnectionService {
    type Response = <ProxyStack as Service<Request<Incoming>>>::Response;
    type Error = <ProxyStack as Service<Request<Incoming>>>::Error;
    type Future = Oneshot<ProxyStack, Request<Incoming>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        stack(self.live.load_full(), self.conn.clone()).oneshot(request)
    }
}

#[derive(Clone)]
struct RouteLayer {
    state: Arc<ProxyState>,
}

impl<S> Layer<S> for RouteLayer {
    type Service = Route<S>;
    fn layer(&self, inner: S) -> Route<S> {
        Route {
            inner,
            state: self.state.clone(),
        }
    }
}

/// Gives each request its [`crate::routing::Target`].
#[derive(Clone)]
pub struct Route<S> {
    inner: S,
    state: Arc<ProxyState>,
}

impl<S> Service<Request<Incoming>> for Route<S>
where
    S: Service<Routed>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Incoming>) -> S::Future {
        let target = self
            .state
            .router
            .route(request.method(), request.uri(), request.headers());
        self.inner.call(Routed {
            target,
            request,
            capture: None,
        })
    }
}

#[derive(Clone)]
struct TelemetryLayer {
    state: Arc<ProxyState>,
}

impl<S> Layer<S> for TelemetryLayer {
    type Service = Telemetry<S>;
    fn layer(&self, inner: S) -> Telemetry<S> {
        Telemetry::new(inner, self.state.clone())
    }
}

#[derive(Clone)]
struct FramingLayer {
    conn: Arc<ConnInfo>,
}

impl<S> Layer<S> for FramingLayer {
    type Service = Framing<S>;
    fn layer(&self, inner: S) -> Framing<S> {
        Framing::new(inner, self.conn.clone())
    }
}

#[derive(Clone)]
struct EventsLayer {
    state: Arc<ProxyState>,
}

impl<S> Layer<S> for EventsLayer {
    type Service = Events<S>;
    fn layer(&self, inner: S) -> Events<S> {
        Events::new(inner, self.state.clone())
    }
}
