//! One pooled HTTP/1.1 client per upstream: keep-alive connections are reused across
//! requests, `connect_timeout` bounds the TCP connect, and https upstreams get rustls with the
//! system roots (or the configured CA) and an optional client certificate.

use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, HeaderValue, Uri};
use hyper_rustls::HttpsConnectorBuilder;
use hyper_util::client::legacy::connect::HttpConnector;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::body::Idle;
use super::pool::Pool;
use crate::config::{Upstream, UpstreamTls};
use crate::metrics::{Metrics, UpstreamMetrics};

pub type RequestBody = Idle<super::events::Tee<super::body::UpstreamBody>>;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("`{upstream}`: cannot read {what} `{path}`: {source}")]
    Pem {
        upstream: String,
        what: &'static str,
        path: String,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("`{upstream}`: invalid TLS settings: {source}")]
    Tls {
        upstream: String,
        #[source]
        source: rustls::Error,
    },
    #[error("`{upstream}`: no system root certificates could be loaded: {detail}")]
    Roots { upstream: String, detail: String },
    #[error("`{upstream}`: cannot address it: {detail}")]
    Target { upstream: String, detail: String },
}

/// Everything the request path needs to forward to one upstream.
pub struct UpstreamClient {
    /// The settings it was built from: a reload keeps the client (and its pooled
    /// connections) of an upstream whose settings did not change.
    pub config: Upstream,
    pub name: Arc<str>,
    pub scheme: Scheme,
    pub authority: Authority,
    pub timeout: Duration,
    pub idle_timeout: Duration,
    pub rewrite_host: bool,
    pub client: Pool,
    pub metrics: UpstreamMetrics,
}

impl UpstreamClient {
    pub fn new(upstream: &Upstream, metrics: &Metrics) -> Result<UpstreamClient, ClientError> {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(upstream.connect_timeout));
        http.set_nodelay(true);
        http.enforce_http(false);
        let tls = tls_config(
            &upstream.name,
            upstream.scheme == Scheme::HTTPS,
            &upstream.tls.clone().unwrap_or_default(),
        )?;
        let connector = HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let target = Uri::builder()
            .scheme(upstream.scheme.clone())
            .authority(upstream.authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|error| ClientError::Target {
                upstream: upstream.name.clone(),
                detail: error.to_string(),
            })?;
        let client = Pool::new(connector, target);
        Ok(UpstreamClient {
            config: upstream.clone(),
            name: Arc::from(upstream.name.as_str()),
            scheme: upstream.scheme.clone(),
            authority: upstream.authority.clone(),
            timeout: upstream.timeout,
            idle_timeout: upstream.idle_timeout,
            rewrite_host: upstream.rewrite_host,
            client,
            metrics: metrics.for_upstream(&upstream.name),
        })
    }
}

impl UpstreamClient {
    /// The origin-form target of a request to this upstream (an HTTP/1.1 client connection
    /// writes the URI as given), with `Host` rewritten when configured and supplied when the
    /// client sent none (HTTP/1.0).
    pub fn target(&self, path_and_query: Option<PathAndQuery>, headers: &mut HeaderMap) -> Uri {
        if self.rewrite_host || !headers.contains_key(http::header::HOST) {
            if let Ok(host) = HeaderValue::from_str(self.authority.as_str()) {
                headers.insert(http::header::HOST, host);
            }
        }
        Uri::from(path_and_query.unwrap_or_else(|| PathAndQuery::from_static("/")))
    }
}

/// rustls settings for a client of `name` (an upstream or an HTTP sink): the configured CA or
/// the system roots, and a client certificate when one is configured.
pub fn tls_config(
    name: &str,
    https: bool,
    settings: &UpstreamTls,
) -> Result<rustls::ClientConfig, ClientError> {
    let tls_error = |source| ClientError::Tls {
        upstream: name.to_string(),
        source,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(tls_error)?;
    let mut roots = rustls::RootCertStore::empty();
    // http:// peers never use the roots; loading the system store for them would only cost
    // start-up time and fail on minimal images.
    if https {
        match &settings.ca {
            Some(ca) => {
                for cert in read_certs(name, ca, "CA")? {
                    roots.add(cert).map_err(tls_error)?;
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                for cert in found.certs {
                    // A broken system certificate is skipped, as browsers do.
                    let _ = roots.add(cert);
                }
                if roots.is_empty() {
                    return Err(ClientError::Roots {
                        upstream: name.to_string(),
                        detail: format!("{:?}", found.errors),
                    });
                }
            }
        }
    }
    let builder = builder.with_root_certificates(roots);
    let config = match client_identity(name, settings)? {
        Some((certs, key)) => builder
            .with_client_auth_cert(certs, key)
            .map_err(tls_error)?,
        None => builder.with_no_client_auth(),
    };
    Ok(config)
}

type Identity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

fn client_identity(name: &str, tls: &UpstreamTls) -> Result<Option<Identity>, ClientError> {
    let (Some(cert), Some(key)) = (&tls.cert, &tls.key) else {
        return Ok(None);
    };
    let certs = read_certs(name, cert, "certificate")?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|source| ClientError::Pem {
        upstream: name.to_string(),
        what: "private key",
        path: key.display().to_string(),
        source,
    })?;
    Ok(Some((certs, key)))
}

fn read_certs(
    name: &str,
    path: &std::path::Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, ClientError> {
    let pem_error = |source| ClientError::Pem {
        upstream: name.to_string(),
        what,
        path: path.display().to_string(),
        source,
    };
    CertificateDer::pem_file_iter(path)
        .map_err(pem_error)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_error)
}
