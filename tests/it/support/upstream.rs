//! A real HTTP/1.1 upstream on an ephemeral port, built from a handler closure. It records
//! every request it receives and counts its TCP connections, so tests can compare what the
//! upstream saw directly and through ficus.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub type Body = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;
pub type Handler = Arc<
    dyn Fn(Request<Incoming>, Arc<Recorder>) -> Pin<Box<dyn Future<Output = Response<Body>> + Send>>
        + Send
        + Sync,
>;

/// What the upstream received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub method: String,
    pub uri: String,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }
}

#[derive(Default)]
pub struct Recorder {
    pub seen: Mutex<Vec<Seen>>,
    pub accepted: AtomicUsize,
    pub closed: AtomicUsize,
}

impl Recorder {
    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    pub fn closed(&self) -> usize {
        self.closed.load(Ordering::SeqCst)
    }
}

pub enum UpstreamBehaviour {
    /// Records the request (whole body) and answers 200 with a JSON description of it.
    Echo,
    Handler(Handler),
}

pub struct TestUpstream {
    pub addr: SocketAddr,
    pub recorder: Arc<Recorder>,
    stop: CancellationToken,
}

impl Drop for TestUpstream {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

pub fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into()).map_err(|e| match e {}).boxed()
}

/// Reads the request whole and records it.
pub async fn record(req: Request<Incoming>, recorder: &Recorder) -> Seen {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let seen = Seen {
        method: parts.method.to_string(),
        uri: parts.uri.to_string(),
        headers: parts
            .headers
            .iter()
            .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
            .collect(),
        body: body.to_vec(),
    };
    recorder.seen.lock().expect("lock").push(seen.clone());
    seen
}

impl TestUpstream {
    pub async fn echo() -> TestUpstream {
        TestUpstream::start(UpstreamBehaviour::Echo).await
    }

    pub async fn with<F, Fut>(f: F) -> TestUpstream
    where
        F: Fn(Request<Incoming>, Arc<Recorder>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |req, rec| Box::pin(f(req, rec)));
        TestUpstream::start(UpstreamBehaviour::Handler(handler)).await
    }

    pub async fn start(behaviour: UpstreamBehaviour) -> TestUpstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        TestUpstream::serve(listener, behaviour)
    }

    pub fn serve(listener: TcpListener, behaviour: UpstreamBehaviour) -> TestUpstream {
        let addr = listener.local_addr().expect("addr");
        let recorder = Arc::new(Recorder::default());
        let stop = CancellationToken::new();
        let handler: Handler = match behaviour {
            UpstreamBehaviour::Echo => Arc::new(|req, rec| Box::pin(echo(req, rec))),
            UpstreamBehaviour::Handler(h) => h,
        };
        let rec = recorder.clone();
        let token = stop.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = tokio::select! {
                    _ = token.cancelled() => return,
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                };
                rec.accepted.fetch_add(1, Ordering::SeqCst);
                let rec = rec.clone();
                let handler = handler.clone();
                let token = token.clone();
                tokio::spawn(async move {
                    let svc_rec = rec.clone();
                    let service = service_fn(move |req| {
                        let handler = handler.clone();
                        let rec = svc_rec.clone();
                        async move { Ok::<_, Infallible>(handler(req, rec).await) }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .with_upgrades();
                    tokio::select! {
                        _ = conn => {}
                        _ = token.cancelled() => {}
                    }
                    rec.closed.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        TestUpstream {
            addr,
            recorder,
            stop,
        }
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.recorder.requests()
    }
}

async fn echo(req: Request<Incoming>, rec: Arc<Recorder>) -> Response<Body> {
    let seen = record(req, &rec).await;
    let description = serde_json::json!({
        "method": seen.method,
        "uri": seen.uri,
        "body_len": seen.body.len(),
    });
    Response::builder()
        .header("content-type", "application/json")
        .header("x-upstream", "echo")
        .header("set-cookie", "a=1")
        .header("set-cookie", "b=2")
        .body(full(description.to_string()))
        .expect("response")
}
