//! Hot reload (SPEC §2): the config file replaced the way the kubelet replaces a ConfigMap
//! (a new timestamped directory, `..data` re-pointed by rename), edited in place, and SIGHUP;
//! new requests — also on connections opened before — see the new config, requests in flight
//! finish, a broken file is refused while the old config serves, sinks keep their connections
//! and cursors, and a removed sink's backlog waits on disk for its return.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::support::upstream::full;
use crate::support::{eventually, sample, send, Ficus, FicusProcess, TestUpstream, WAIT};

/// A directory laid out as the kubelet mounts a ConfigMap: `ficus.yaml` → `..data/ficus.yaml`,
/// `..data` → `..<timestamp>/`. Updates are the kubelet's atomic swap.
struct ConfigMapDir {
    dir: tempfile::TempDir,
    version: AtomicUsize,
}

impl ConfigMapDir {
    fn new(text: &str) -> ConfigMapDir {
        let dir = tempfile::tempdir().expect("tempdir");
        let map = ConfigMapDir {
            dir,
            version: AtomicUsize::new(0),
        };
        let first = map.write_version(text);
        std::os::unix::fs::symlink(&first, map.dir.path().join("..data")).expect("..data");
        std::os::unix::fs::symlink("..data/ficus.yaml", map.path()).expect("ficus.yaml link");
        map
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("ficus.yaml")
    }

    /// A new `..2026_11_27_17_00_00.N` directory holding the file; returns its name.
    fn write_version(&self, text: &str) -> String {
        let n = self.version.fetch_add(1, Ordering::SeqCst);
        let name = format!("..2026_11_27_17_00_00.{n:09}");
        let version = self.dir.path().join(&name);
        std::fs::create_dir(&version).expect("version dir");
        std::fs::write(version.join("ficus.yaml"), text).expect("write version");
        name
    }

    /// The kubelet's update: write the new version, point `..data_tmp` at it, rename it over
    /// `..data` (the one atomic step), then delete the old version.
    fn update(&self, text: &str) {
        let old = std::fs::read_link(self.dir.path().join("..data")).expect("read ..data");
        let new = self.write_version(text);
        let tmp = self.dir.path().join("..data_tmp");
        std::os::unix::fs::symlink(&new, &tmp).expect("..data_tmp");
        std::fs::rename(&tmp, self.dir.path().join("..data")).expect("swap ..data");
        std::fs::remove_dir_all(self.dir.path().join(old)).expect("remove old version");
    }
}

/// An upstream answering every request with its own name; `/slow` waits for `release`.
async fn named(name: &'static str, release: Arc<tokio::sync::Notify>) -> TestUpstream {
    TestUpstream::with(move |req, rec| {
        let release = release.clone();
        async move {
            let seen = crate::support::upstream::record(req, &rec).await;
            if seen.uri == "/slow" {
                release.notified().await;
            }
            Response::new(full(name))
        }
    })
    .await
}

fn two_upstreams(mono: &TestUpstream, func: &TestUpstream, routes: &str) -> String {
    format!(
        "listen: {{ address: 127.0.0.1:0 }}\nadmin: {{ address: 127.0.0.1:0 }}\nupstreams:\n  monolith: {{ url: \"http://{}\" }}\n  orders-fn: {{ url: \"http://{}\" }}\ndefault_upstream: monolith\n{routes}",
        mono.addr, func.addr
    )
}

const ORDERS_TO_FUNCTION: &str =
    "routes:\n  - name: orders\n    match: { path: \"/orders/{id}\" }\n    upstream: orders-fn\n";

fn get(path: &str) -> Request<Full<Bytes>> {
    Request::get(path)
        .header("host", "shop")
        .body(Full::new(Bytes::new()))
        .expect("request")
}

async fn reloads(admin: std::net::SocketAddr, result: &str) -> f64 {
    let (status, body) = crate::support::get(admin, "/metrics").await;
    assert_eq!(status, 200);
    sample(&body, "ficus_config_reloads_total", &[("result", result)]).unwrap_or(-1.0)
}

/// One client connection kept alive across the reload: every request goes on it, and an
/// error (the connection dropped) fails the test.
struct KeptAlive {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl KeptAlive {
    async fn open(addr: std::net::SocketAddr) -> KeptAlive {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        KeptAlive { sender }
    }

    async fn body(&mut self, path: &str) -> String {
        self.sender
            .ready()
            .await
            .expect("the kept-alive connection is still open");
        let response = self
            .sender
            .send_request(get(path))
            .await
            .expect("a response on the kept-alive connection");
        assert_eq!(response.status(), 200);
        let body = response.into_body().collect().await.expect("body");
        String::from_utf8_lossy(&body.to_bytes()).into_owned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_swap_reroutes_new_requests_on_a_kept_alive_connection_and_in_flight_ones_finish(
) {
    let release = Arc::new(tokio::sync::Notify::new());
    let mono = named("monolith", release.clone()).await;
    let func = named("function", release.clone()).await;
    let map = ConfigMapDir::new(&two_upstreams(&mono, &func, ""));
    let ficus = Ficus::start_file(&map.path()).await;
    let mut client = KeptAlive::open(ficus.addr).await;
    assert_eq!(client.body("/orders/1").await, "monolith");
    // A request in flight at the reload, on a connection of its own.
    let addr = ficus.addr;
    let slow = tokio::spawn(async move { send(addr, get("/slow")).await });
    eventually(WAIT, "the slow request at the monolith", || async {
        mono.requests()
            .iter()
            .any(|r| r.uri == "/slow")
            .then_some(())
    })
    .await;

    map.update(&two_upstreams(&mono, &func, ORDERS_TO_FUNCTION));
    // Polled by hand: every poll is a request on the kept-alive connection.
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut before = 0;
    while client.body("/orders/1").await == "monolith" {
        before += 1;
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new route not seen within {WAIT:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(
        client.body("/catalog").await,
        "monolith",
        "unrouted paths stay"
    );
    release.notify_one();
    let slow = slow.await.expect("slow request task");
    assert_eq!(slow.status(), 200, "the request in flight finished");
    assert_eq!(slow.body().as_ref(), b"monolith");
    assert_eq!(reloads(ficus.admin, "ok").await, 1.0);
    assert_eq!(reloads(ficus.admin, "error").await, 0.0);
    let metrics = ficus.metrics().await;
    assert!(
        sample(&metrics, "ficus_requests_total", &[("route", "orders")]).unwrap_or(0.0) >= 1.0,
        "requests counted under the new route:\n{metrics}"
    );
    eprintln!("{before} requests on the kept-alive connection saw the old config after the swap");
}

/// Replaces `path`'s content atomically (write aside, rename over), as editors and config
/// management tools do.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("yaml.tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

/// The first stderr line of `process` that contains every needle; fails after `WAIT`.
async fn log_line(process: &mut FicusProcess, needles: &[&str]) -> String {
    let mut seen = Vec::new();
    let scan = async {
        while let Some(line) = process.stderr_lines.recv().await {
            if needles.iter().all(|n| line.contains(n)) {
                return Some(line);
            }
            seen.push(line);
        }
        None
    };
    match tokio::time::timeout(WAIT, scan).await {
        Ok(Some(line)) => line,
        Ok(None) => panic!(
            "ficus exited before logging {needles:?}; it logged:\n{}",
            seen.join("\n")
        ),
        Err(_) => panic!(
            "no log line with {needles:?} within {WAIT:?}; ficus logged:\n{}",
            seen.join("\n")
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_config_is_refused_with_located_errors_while_the_old_one_serves() {
    let release = Arc::new(tokio::sync::Notify::new());
    let mono = named("monolith", release.clone()).await;
    let func = named("function", release).await;
    let good = two_upstreams(&mono, &func, "log: { format: json }\n");
    let mut ficus = FicusProcess::start(&good).await;
    let path = ficus.dir.path().join("ficus.yaml");

    // Two mistakes: both reported, with file, line and column.
    let broken = good.replace(
        "default_upstream: monolith\n",
        "default_upstream: monolith\nroutes:\n  - name: orders\n    match: { path: \"/orders/{id}\" }\n    upstream: nowhere\n    retries: 3\n",
    );
    replace(&path, &broken);
    let unknown_upstream = log_line(
        &mut ficus,
        &[
            "config reload refused",
            "ficus.yaml:10:15: routes[0].upstream",
        ],
    )
    .await;
    let unknown_key = log_line(
        &mut ficus,
        &[
            "config reload refused",
            "ficus.yaml:11:5: routes[0].retries",
        ],
    )
    .await;
    eprintln!("{unknown_upstream}\n{unknown_key}");
    eventually(WAIT, "the refusal counted", || async {
        (reloads(ficus.admin, "error").await == 1.0).then_some(())
    })
    .await;
    assert_eq!(reloads(ficus.admin, "ok").await, 0.0);
    assert_eq!(
        crate::support::get(ficus.addr, "/orders/1").await,
        (200, "monolith".into()),
        "the old config still serves"
    );

    // A valid file that also moves the listener: the route applies, the listener stays and
    // the log says a restart is needed.
    let fixed = two_upstreams(
        &mono,
        &func,
        &format!("log: {{ format: json }}\n{ORDERS_TO_FUNCTION}"),
    )
    .replace(
        "listen: { address: 127.0.0.1:0 }",
        "listen: { address: 127.0.0.1:1 }",
    );
    replace(&path, &fixed);
    let restart = log_line(&mut ficus, &["only apply at a restart", "listen"]).await;
    assert!(!restart.contains("admin"), "{restart}");
    log_line(&mut ficus, &["config reloaded"]).await;
    assert_eq!(reloads(ficus.admin, "ok").await, 1.0);
    assert_eq!(
        crate::support::get(ficus.addr, "/orders/1").await,
        (200, "function".into()),
        "the new route applies; the old listener still serves"
    );

    // SIGHUP reloads even an unchanged file.
    ficus.signal("HUP");
    log_line(&mut ficus, &["config reloaded", "Signal"]).await;
    assert_eq!(reloads(ficus.admin, "ok").await, 2.0);
    assert_eq!(reloads(ficus.admin, "error").await, 1.0);

    // The file goes away: one refusal, however many other files of its directory change
    // meanwhile (a log or a sink's file there would otherwise feed a refusal per write).
    std::fs::remove_file(&path).expect("remove the config");
    log_line(&mut ficus, &["cannot read the file"]).await;
    for i in 0..5 {
        std::fs::write(ficus.dir.path().join(format!("other-{i}")), "x").expect("write");
    }
    // A SIGHUP is refused and counted again (someone asked); its refusal is logged after the
    // other files' change was looked at, or the change is looked at after it: either way
    // that change alone counts nothing.
    ficus.signal("HUP");
    log_line(&mut ficus, &["cannot read the file"]).await;
    // Back, changed: once this reload shows, every earlier event was taken.
    replace(
        &path,
        &fixed.replace(
            "log: { format: json }",
            "log: { format: json, level: info }",
        ),
    );
    log_line(&mut ficus, &["config reloaded"]).await;
    assert_eq!(reloads(ficus.admin, "ok").await, 3.0);
    assert_eq!(
        reloads(ficus.admin, "error").await,
        3.0,
        "one refusal for the missing file, one for the SIGHUP"
    );
}

fn shop_with_sinks(shop: &TestUpstream, outbox: &Path, ty: &str, sinks: &str) -> String {
    format!(
        r#"listen: {{ address: 127.0.0.1:0 }}
admin: {{ address: 127.0.0.1:0 }}
upstreams:
  monolith: {{ url: "http://{}" }}
events:
  source: /legacy/shop
  rules:
    - name: order-created
      match: {{ method: POST, path: /orders, status: 201 }}
      type: {ty}
      subject: "{{request.headers.x-order-id}}"
sinks:
{sinks}
outbox:
  dir: {}
  durability: sync
  retry: {{ initial: 20ms, max: 200ms }}
"#,
        shop.addr,
        outbox.display()
    )
}

async fn order(addr: std::net::SocketAddr, id: &str) {
    let request = Request::post("/orders")
        .header("host", "shop")
        .header("content-type", "application/json")
        .header("x-order-id", id)
        .body(Full::new(Bytes::from_static(b"{}")))
        .expect("request");
    assert_eq!(send(addr, request).await.status(), 201);
}

/// `(type, subject)` of each event an HTTP sink received (binary mode: `ce-` headers).
fn received(sink: &TestUpstream) -> Vec<(String, String)> {
    sink.requests()
        .iter()
        .map(|r| {
            (
                r.header("ce-type").unwrap_or_default(),
                r.header("ce-subject").unwrap_or_default(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sinks_keep_connections_and_cursors_and_a_removed_sink_keeps_its_backlog() {
    let shop = TestUpstream::with(|req, rec| async move {
        crate::support::upstream::record(req, &rec).await;
        let mut response = Response::new(full("{}"));
        *response.status_mut() = http::StatusCode::CREATED;
        response
    })
    .await;
    let hook = TestUpstream::echo().await;
    // `late` starts unreachable: its events wait in the outbox.
    let late_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let late_addr = late_listener.local_addr().expect("addr");
    drop(late_listener);
    let dir = tempfile::tempdir().expect("tempdir");
    let outbox = dir.path().join("outbox");
    let hook_sink = format!("  hook: {{ type: http, url: \"http://{}/\" }}\n", hook.addr);
    let late_sink = format!("  late: {{ type: http, url: \"http://{late_addr}/\" }}\n");
    let map = ConfigMapDir::new(&shop_with_sinks(
        &shop,
        &outbox,
        "shop.order.created",
        &format!("{hook_sink}{late_sink}"),
    ));
    let ficus = Ficus::start_file(&map.path()).await;
    for id in ["1", "2", "3"] {
        order(ficus.addr, id).await;
    }
    eventually(WAIT, "three events at hook", || async {
        (received(&hook).len() == 3).then_some(())
    })
    .await;
    // `late` is failing: its gauges say so before it is removed.
    eventually(WAIT, "late's gauges show its backlog", || async {
        let m = ficus.metrics().await;
        let pending = sample(&m, "ficus_outbox_pending_events", &[("sink", "late")]);
        let lag = sample(&m, "ficus_event_delivery_lag_seconds", &[("sink", "late")]);
        (pending == Some(3.0) && lag.is_some_and(|l| l > 0.0)).then_some(())
    })
    .await;

    // New rules, `late` removed, `hook` unchanged.
    map.update(&shop_with_sinks(
        &shop,
        &outbox,
        "shop.order.placed",
        &hook_sink,
    ));
    eventually(WAIT, "the first reload", || async {
        (reloads(ficus.admin, "ok").await == 1.0).then_some(())
    })
    .await;
    for id in ["4", "5"] {
        order(ficus.addr, id).await;
    }
    let events = eventually(WAIT, "five events at hook", || async {
        let events = received(&hook);
        (events.len() == 5).then_some(events)
    })
    .await;
    let types: Vec<&str> = events.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        types,
        [
            "shop.order.created",
            "shop.order.created",
            "shop.order.created",
            "shop.order.placed",
            "shop.order.placed"
        ]
    );
    assert_eq!(
        hook.recorder.accepted(),
        1,
        "the unchanged sink kept its one connection"
    );
    let status = ficus::outbox::status(&outbox, &[]).expect("outbox status");
    let late = status
        .sinks
        .iter()
        .find(|s| s.sink == "late")
        .expect("the removed sink is still in the outbox status");
    assert_eq!(late.cursor, status.first_seq, "nothing delivered to it");
    assert_eq!(late.pending, 5, "its backlog is kept");
    // Nothing updates a removed sink's gauges any more, so their last values would be a lie:
    // the series are gone. Its counters stay, as Prometheus counters do.
    let m = ficus.metrics().await;
    for gauge in [
        "ficus_outbox_pending_events",
        "ficus_event_delivery_lag_seconds",
    ] {
        assert_eq!(
            sample(&m, gauge, &[("sink", "late")]),
            None,
            "{gauge} of the removed sink"
        );
        assert!(
            sample(&m, gauge, &[("sink", "hook")]).is_some(),
            "{gauge} of the kept sink"
        );
    }
    assert!(
        sample(
            &m,
            "ficus_event_delivery_failures_total",
            &[("sink", "late")]
        )
        .is_some_and(|n| n > 0.0),
        "the removed sink's failures still counted"
    );

    // `late` returns, reachable now: it gets exactly the three events that were for it.
    let late_sink = tokio::net::TcpListener::bind(late_addr)
        .await
        .expect("rebind the late sink's port");
    let late_upstream =
        TestUpstream::serve(late_sink, crate::support::upstream::UpstreamBehaviour::Echo);
    map.update(&shop_with_sinks(
        &shop,
        &outbox,
        "shop.order.placed",
        &format!("{hook_sink}  late: {{ type: http, url: \"http://{late_addr}/\" }}\n"),
    ));
    let late_events = eventually(
        WAIT,
        "the backlog delivered to the returning sink",
        || async {
            let events = received(&late_upstream);
            (events.len() >= 3).then_some(events)
        },
    )
    .await;
    assert_eq!(
        late_events,
        [
            ("shop.order.created".to_string(), "1".to_string()),
            ("shop.order.created".to_string(), "2".to_string()),
            ("shop.order.created".to_string(), "3".to_string()),
        ]
    );
    assert_eq!(reloads(ficus.admin, "ok").await, 2.0);
    assert_eq!(hook.recorder.accepted(), 1, "still one connection");
    eventually(WAIT, "nothing pending for late", || async {
        let m = ficus.metrics().await;
        (sample(&m, "ficus_outbox_pending_events", &[("sink", "late")]) == Some(0.0)).then_some(())
    })
    .await;
}

/// A Kubernetes TLS Secret as the kubelet mounts it: `tls.crt` and `tls.key` → `..data/…`,
/// updated by the same atomic `..data` swap as a ConfigMap (cert-manager renews this way).
fn write_secret_version(dir: &Path, n: usize, cert: &str, key: &str) -> String {
    let name = format!("..2026_11_27_18_00_00.{n:09}");
    std::fs::create_dir(dir.join(&name)).expect("secret version");
    std::fs::write(dir.join(&name).join("tls.crt"), cert).expect("tls.crt");
    std::fs::write(dir.join(&name).join("tls.key"), key).expect("tls.key");
    name
}

fn swap_secret(dir: &Path, version: &str) {
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(version, &tmp).expect("..data_tmp");
    std::fs::rename(&tmp, dir.join("..data")).expect("swap ..data");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_swap_serves_the_new_certificate_and_a_broken_pair_keeps_the_current_one() {
    use crate::protocols::{make_cert, presented_cert, tls_connect, tls_connector, tls_yaml};
    let upstream = TestUpstream::echo().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = dir.path();
    let first = make_cert("ficus-first", 1);
    let second = make_cert("ficus-second", 2);
    let third = make_cert("ficus-third", 3);
    let v1 = write_secret_version(secret, 1, &first.cert_pem, &first.key_pem);
    std::os::unix::fs::symlink(&v1, secret.join("..data")).expect("..data");
    for file in ["tls.crt", "tls.key"] {
        std::os::unix::fs::symlink(format!("..data/{file}"), secret.join(file)).expect("link");
    }
    let ficus = Ficus::start_yaml(&tls_yaml(
        upstream.addr,
        &secret.join("tls.crt"),
        &secret.join("tls.key"),
    ))
    .await;
    let connector = tls_connector(&[&first.der, &second.der, &third.der], &[b"http/1.1"]);
    let served = || async {
        let stream = tls_connect(&connector, ficus.addr)
            .await
            .expect("TLS handshake");
        presented_cert(&stream)
    };
    assert_eq!(served().await, first.der);

    // A broken renewal: the new certificate with another key. Refused; the current pair
    // keeps serving.
    let broken = write_secret_version(secret, 2, &second.cert_pem, &third.key_pem);
    swap_secret(secret, &broken);
    // A negative check needs a window: more than two polls of the files (2 s each), during
    // which every handshake gets the first certificate.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::time::Instant::now() < deadline {
        assert_eq!(served().await, first.der, "a broken pair is never served");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The fixed renewal is served to new connections without a restart.
    let fixed = write_secret_version(secret, 3, &second.cert_pem, &second.key_pem);
    swap_secret(secret, &fixed);
    eventually(WAIT, "the renewed certificate", || async {
        (served().await == second.der).then_some(())
    })
    .await;
}
