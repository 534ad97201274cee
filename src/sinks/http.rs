//! `type: http`: the CloudEvents HTTP protocol binding. `binary` (default) sends one request
//! per event with `ce-*` headers and the data as the body; `structured` one request per event
//! with the whole event as `application/cloudevents+json`; `batch` one request per batch as
//! `application/cloudevents-batch+json`. 2xx is delivered; 408, 429, 5xx and network errors
//! are retried; any other status is permanent (dead letter).

use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::{send_decoded, BoxFuture, SendResult, Sink, SinkFailure};
use crate::config::UpstreamTls;
use crate::events::{batch_json, CloudEvent, StoredEvent, BATCH, STRUCTURED};
use crate::proxy::client::{tls_config, ClientError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpMode {
    Binary,
    Structured,
    Batch,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HttpSinkSettings {
    pub name: String,
    pub url: Uri,
    pub mode: HttpMode,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub timeout: Duration,
    pub tls: UpstreamTls,
}

pub struct HttpSink {
    settings: HttpSinkSettings,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl HttpSink {
    pub fn new(settings: HttpSinkSettings) -> Result<HttpSink, ClientError> {
        let https = settings.url.scheme_str() == Some("https");
        let tls = tls_config(&settings.name, https, &settings.tls)?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(settings.timeout));
        http.set_nodelay(true);
        let connector = HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        Ok(HttpSink { settings, client })
    }

    fn request(
        &self,
        content_type: Option<&str>,
        extra: Vec<(HeaderName, HeaderValue)>,
        body: Bytes,
    ) -> Request<Full<Bytes>> {
        let empty = body.is_empty();
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = self.settings.url.clone();
        let headers = request.headers_mut();
        if empty {
            // hyper sends no length for an empty body; RFC 9110 section 8.6 asks a POST for
            // one, and a front end that insists (`411`, a 4xx) would dead-letter every event
            // without data (a `204`'s).
            headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        }
        if let Some(ct) = content_type.and_then(|c| HeaderValue::from_str(c).ok()) {
            headers.insert(CONTENT_TYPE, ct);
        }
        for (name, value) in extra {
            headers.insert(name, value);
        }
        for (name, value) in &self.settings.headers {
            headers.insert(name.clone(), value.clone());
        }
        request
    }

    /// One POST; `Ok` on 2xx.
    async fn post(&self, request: Request<Full<Bytes>>) -> Result<(), SinkFailure> {
        let sent = tokio::time::timeout(self.settings.timeout, self.client.request(request)).await;
        let response = match sent {
            Err(_) => {
                return Err(SinkFailure::retryable(format!(
                    "no response within {:?}",
                    self.settings.timeout
                )))
            }
            Ok(Err(e)) => return Err(SinkFailure::retryable(format!("request failed: {e}"))),
            Ok(Ok(r)) => r,
        };
        let status = response.status();
        // Read at most a little of the body, for the log line: a sink's error page is no reason
        // to hold megabytes (a longer body also means the connection is not reused).
        let limited = http_body_util::Limited::new(response.into_body(), 4096);
        let body = tokio::time::timeout(self.settings.timeout, limited.collect())
            .await
            .ok()
            .and_then(Result::ok)
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        if status.is_success() {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
        let message = format!("HTTP {status}: {text}");
        if is_retryable(status) {
            Err(SinkFailure::retryable(message))
        } else {
            Err(SinkFailure::permanent(message))
        }
    }
}

fn is_retryable(status: StatusCode) -> bool {
    status.is_server_error()
        || status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || !status.is_client_error()
}

impl Sink for HttpSink {
    fn send<'a>(&'a self, events: &'a [CloudEvent]) -> BoxFuture<'a, SendResult> {
        Box::pin(async move {
            match self.settings.mode {
                HttpMode::Batch => {
                    let request =
                        self.request(Some(BATCH), Vec::new(), Bytes::from(batch_json(events)));
                    match self.post(request).await {
                        Ok(()) => SendResult::all(events.len()),
                        Err(f) => SendResult::failed(0, f),
                    }
                }
                mode => {
                    for (i, event) in events.iter().enumerate() {
                        let request = match mode {
                            HttpMode::Structured => self.request(
                                Some(STRUCTURED),
                                Vec::new(),
                                Bytes::from(event.to_json()),
                            ),
                            _ => self.request(
                                None,
                                event.http_binary_headers(),
                                event.data_bytes().unwrap_or_default(),
                            ),
                        };
                        if let Err(f) = self.post(request).await {
                            return SendResult::failed(i, f);
                        }
                    }
                    SendResult::all(events.len())
                }
            }
        })
    }

    fn send_stored<'a>(&'a self, events: &'a [StoredEvent]) -> BoxFuture<'a, SendResult> {
        match self.settings.mode {
            // Attributes become `ce-*` headers: that needs them decoded.
            HttpMode::Binary => send_decoded(self, events),
            HttpMode::Batch => Box::pin(async move {
                // `batch_json` of the decoded events, without decoding them.
                let size = events.iter().map(|e| e.json().len() + 1).sum::<usize>() + 1;
                let mut body = Vec::with_capacity(size);
                body.push(b'[');
                for (i, e) in events.iter().enumerate() {
                    if i > 0 {
                        body.push(b',');
                    }
                    body.extend_from_slice(e.json());
                }
                body.push(b']');
                let request = self.request(Some(BATCH), Vec::new(), Bytes::from(body));
                match self.post(request).await {
                    Ok(()) => SendResult::all(events.len()),
                    Err(f) => SendResult::failed(0, f),
                }
            }),
            HttpMode::Structured => Box::pin(async move {
                for (i, event) in events.iter().enumerate() {
                    let request = self.request(Some(STRUCTURED), Vec::new(), event.json_bytes());
                    if let Err(f) = self.post(request).await {
                        return SendResult::failed(i, f);
                    }
                }
                SendResult::all(events.len())
            }),
        }
    }
}
