//! The harness: real upstream servers on ephemeral ports, ficus in-process or as the built
//! binary, and clients that send exactly the bytes a test asks for. Nothing here sleeps to
//! synchronise; waits poll a condition with a deadline.

#![allow(dead_code)]

pub mod mid_stream;
pub mod upstream;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use ficus::{App, Config, Listeners};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

pub use upstream::TestUpstream;

/// A deadline for waits that should take milliseconds; generous for a loaded CI machine.
pub const WAIT: Duration = Duration::from_secs(10);

/// Polls `check` until it returns `Some`, failing the test after `within`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// ficus's own log lines (info and up) in the test's captured output, which nextest shows
/// only for a failing test: what ficus saw is part of every failure report.
fn log_to_test_output() {
    let filter =
        tracing_subscriber::filter::Targets::new().with_target("ficus", tracing::Level::INFO);
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let _ = tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_test_writer())
        .with(filter)
        .try_init();
}

/// ficus running in this process on ephemeral ports; stopped when dropped.
pub struct Ficus {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub stop: CancellationToken,
    pub task: Option<tokio::task::JoinHandle<Result<(), ficus::AppError>>>,
}

/// A config for tests: ephemeral loopback ports, one upstream `monolith` at `upstream`, and
/// `extra` YAML appended (it may add keys to `upstreams.monolith` by starting with four spaces).
pub fn config_yaml(upstream: SocketAddr, extra: &str) -> String {
    format!(
        "listen:\n  address: 127.0.0.1:0\nadmin:\n  address: 127.0.0.1:0\nupstreams:\n  monolith:\n    url: http://{upstream}\n{extra}"
    )
}

impl Ficus {
    pub async fn start(upstream: SocketAddr, extra: &str) -> Ficus {
        Ficus::start_yaml(&config_yaml(upstream, extra)).await
    }

    pub async fn start_yaml(yaml: &str) -> Ficus {
        let config = Config::from_yaml(yaml, "test.yaml").expect("test config is valid");
        Ficus::start_config(config).await
    }

    pub async fn start_config(config: Config) -> Ficus {
        Ficus::start_app(config, None).await
    }

    /// Runs the config in `path` and reloads it when the file changes (as `ficus run -c`).
    pub async fn start_file(path: &std::path::Path) -> Ficus {
        let config = match Config::load(path) {
            Ok(c) => c,
            Err(e) => panic!("test config is valid: {e}"),
        };
        Ficus::start_app(config, Some(path.to_path_buf())).await
    }

    async fn start_app(config: Config, source: Option<PathBuf>) -> Ficus {
        log_to_test_output();
        let listeners = Listeners::bind(&config).await.expect("bind");
        let addr = listeners.proxy_addr();
        let admin = listeners.admin_addr();
        let mut app = App::new(config, prometheus::Registry::new()).expect("app");
        if let Some(path) = source {
            app = app.reload_from(path);
        }
        let stop = CancellationToken::new();
        let readiness = app.readiness();
        let task = tokio::spawn(app.run(listeners, stop.clone().cancelled_owned()));
        // Started means serving: the app says ready once its dispatchers run and its listener
        // accepts (a loaded machine can take a while to get there).
        eventually(WAIT, "ficus ready", || async {
            readiness.reason().is_none().then_some(())
        })
        .await;
        Ficus {
            addr,
            admin,
            stop,
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        let (status, body) = get(self.admin, "/metrics").await;
        assert_eq!(status, 200);
        body
    }

    pub async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            task.await.expect("join").expect("app result");
        }
    }
}

impl Drop for Ficus {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// One HTTP/1.1 request on a fresh connection with a hyper client: exactly the headers given
/// (no `Host` is added unless the request has one).
pub async fn send(addr: SocketAddr, req: Request<Full<Bytes>>) -> Response<Bytes> {
    let (parts, body) = send_streaming(addr, req).await.into_parts();
    let body = body.collect().await.expect("response body").to_bytes();
    Response::from_parts(parts, body)
}

pub async fn send_streaming<B>(addr: SocketAddr, req: Request<B>) -> Response<Incoming>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("handshake");
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    sender.send_request(req).await.expect("response")
}

/// `GET path` with `Host` set; status and body as text.
pub async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let req = Request::get(path)
        .header("host", addr.to_string())
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = send(addr, req).await;
    (
        resp.status().as_u16(),
        String::from_utf8_lossy(resp.body()).into_owned(),
    )
}

/// Writes `raw` bytes and reads until the server closes the connection (or `WAIT` passes).
pub async fn raw_exchange(addr: SocketAddr, raw: &[u8]) -> String {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(raw).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, tcp.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// The value of one sample in Prometheus text, e.g.
/// `sample(&text, "ficus_requests_total", &[("code", "200")])`; sums matching series.
pub fn sample(metrics: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in metrics.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (metric, label_text) = match series.split_once('{') {
            Some((m, rest)) => (m, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if metric != name {
            continue;
        }
        let all = labels.iter().all(|(k, v)| {
            label_text
                .split(',')
                .any(|pair| pair == format!("{k}=\"{v}\""))
        });
        if all {
            let v: f64 = value.parse().expect("sample value");
            found = Some(found.unwrap_or(0.0) + v);
        }
    }
    found
}

/// The built `ficus` binary, started on a config file; stopped (SIGKILL) when dropped.
pub struct FicusProcess {
    pub child: tokio::process::Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
    pub stderr_lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    /// The last lines ficus wrote, printed if the test fails while it runs.
    transcript: std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<String>>>,
}

/// Lines of a ficus process's log kept for a failure report.
const TRANSCRIPT_LINES: usize = 60;

impl Drop for FicusProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Ok(lines) = self.transcript.lock() {
                let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
                eprintln!(
                    "--- ficus process log (last {} lines) ---\n{}",
                    lines.len(),
                    lines.join("\n")
                );
            }
        }
    }
}

pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ficus"))
}

impl FicusProcess {
    /// Starts `ficus run` and waits for its `listening` log line to learn the ports.
    pub async fn start(yaml: &str) -> FicusProcess {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ficus.yaml");
        std::fs::write(&path, yaml).expect("write config");
        let mut child = tokio::process::Command::new(binary())
            .arg("run")
            .arg("-c")
            .arg(&path)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn ficus");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let transcript = std::sync::Arc::new(std::sync::Mutex::new(
            std::collections::VecDeque::with_capacity(TRANSCRIPT_LINES),
        ));
        let kept = transcript.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(mut kept) = kept.lock() {
                    if kept.len() == TRANSCRIPT_LINES {
                        kept.pop_front();
                    }
                    kept.push_back(line.clone());
                }
                // The test may have stopped reading; the transcript still keeps the lines.
                let _ = tx.send(line);
            }
        });
        let (addr, admin) = tokio::time::timeout(WAIT, async {
            while let Some(line) = rx.recv().await {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if v["message"] == "listening" {
                    let parse = |k: &str| {
                        v[k].as_str()
                            .and_then(|s| s.parse::<SocketAddr>().ok())
                            .expect("address in log line")
                    };
                    return (parse("listen"), parse("admin"));
                }
            }
            panic!("ficus exited before listening");
        })
        .await
        .expect("ficus did not start in time");
        FicusProcess {
            child,
            addr,
            admin,
            dir,
            stderr_lines: rx,
            transcript,
        }
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id().expect("running")).expect("pid")
    }

    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Resident set size in KiB, from /proc.
    pub fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }
}
