//! TLS termination on the listener: rustls with ALPN `h2` and `http/1.1`, and a certificate
//! resolver that re-reads the certificate and key when their files change (cert-manager and
//! Kubernetes Secrets rotate them in place), keeping the old pair when the new one is invalid.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;

use crate::config::ServerTls;
use crate::reload::{stamp, Stamp};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} `{path}`: {source}")]
    Pem {
        what: &'static str,
        path: String,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("`{path}` holds no certificate")]
    NoCertificate { path: String },
    #[error("invalid certificate or key: {0}")]
    Rustls(#[from] rustls::Error),
}

/// How often the certificate files are checked for a change (a `stat` of each).
const RELOAD_POLL: Duration = Duration::from_secs(2);

/// The identity of both files: either changing (rewritten, renamed over, or swapped by the
/// kubelet's `..data` symlink as for a cert-manager Secret) means a new pair to load.
type PairStamp = (Option<Stamp>, Option<Stamp>);

#[derive(Debug)]
struct Loaded {
    key: Arc<CertifiedKey>,
    stamp: PairStamp,
    /// The last pair refused, so that a broken pair is reported once, not at every poll.
    refused: Option<PairStamp>,
}

#[derive(Debug)]
pub struct ReloadingCert {
    files: ServerTls,
    current: RwLock<Loaded>,
}

fn pair_stamp(files: &ServerTls) -> PairStamp {
    (stamp(&files.cert), stamp(&files.key))
}

impl ReloadingCert {
    pub fn load(files: &ServerTls) -> Result<Arc<ReloadingCert>, TlsError> {
        let key = load_pair(&files.cert, &files.key)?;
        Ok(Arc::new(ReloadingCert {
            files: files.clone(),
            current: RwLock::new(Loaded {
                key,
                stamp: pair_stamp(files),
                refused: None,
            }),
        }))
    }

    /// Re-reads the files if they changed since the last load; returns whether it swapped.
    pub fn reload_if_changed(&self) -> bool {
        let now = pair_stamp(&self.files);
        let seen = self
            .current
            .read()
            .map(|c| c.stamp == now || c.refused.as_ref() == Some(&now))
            .unwrap_or(true);
        if seen {
            return false;
        }
        match load_pair(&self.files.cert, &self.files.key) {
            Ok(key) => {
                if let Ok(mut current) = self.current.write() {
                    *current = Loaded {
                        key,
                        stamp: now,
                        refused: None,
                    };
                }
                tracing::info!(cert = %self.files.cert.display(), "reloaded TLS certificate");
                true
            }
            Err(error) => {
                // Remembered as refused: retried as soon as either file changes again, so a
                // pair caught half-written (certificate replaced, key not yet) is picked up
                // once it is whole.
                if let Ok(mut current) = self.current.write() {
                    current.refused = Some(now);
                }
                tracing::error!(cert = %self.files.cert.display(), key = %self.files.key.display(), %error, "new TLS certificate refused; keeping the old one");
                false
            }
        }
    }

    pub fn watch(self: Arc<Self>, stop: CancellationToken) {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RELOAD_POLL);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => { self.reload_if_changed(); }
                }
            }
        });
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|c| c.key.clone())
    }
}

fn load_pair(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let pem = |what, path: &PathBuf| {
        let path = path.display().to_string();
        move |source| TlsError::Pem { what, path, source }
    };
    let certs = CertificateDer::pem_file_iter(cert)
        .map_err(pem("certificate", &cert.to_path_buf()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem("certificate", &cert.to_path_buf()))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert.display().to_string(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(pem("private key", &key.to_path_buf()))?;
    let provider = rustls::crypto::ring::default_provider();
    let certified = CertifiedKey::from_der(certs, key, &provider)?;
    Ok(Arc::new(certified))
}

/// The server config for the listener: ALPN h2 first, then HTTP/1.1.
pub fn server_config(cert: Arc<ReloadingCert>) -> Result<rustls::ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec![name.to_string()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        (cert.pem(), key.serialize_pem())
    }

    fn served(cert: &ReloadingCert) -> Vec<u8> {
        let current = cert.current.read().expect("lock");
        current.key.cert[0].as_ref().to_vec()
    }

    #[test]
    fn a_half_written_pair_is_retried_until_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = ServerTls {
            cert: dir.path().join("tls.crt"),
            key: dir.path().join("tls.key"),
        };
        let (cert1, key1) = pair("one.example");
        std::fs::write(&files.cert, &cert1).expect("write");
        std::fs::write(&files.key, &key1).expect("write");
        let reloading = ReloadingCert::load(&files).expect("load");
        let first = served(&reloading);
        assert!(
            !reloading.reload_if_changed(),
            "unchanged files are not re-read"
        );

        let (cert2, key2) = pair("two.example");
        std::fs::write(&files.cert, &cert2).expect("write");
        assert!(!reloading.reload_if_changed(), "mismatched pair refused");
        assert_eq!(served(&reloading), first, "old pair still served");
        std::fs::write(&files.key, &key2).expect("write");
        assert!(
            reloading.reload_if_changed(),
            "the completed pair is picked up"
        );
        assert_ne!(served(&reloading), first);
    }
}
