//! The binary: `check` and `run` on good and bad configs, `FICUS_CONFIG`, the example configs,
//! the access log, and the demo.

use std::process::Stdio;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::support::{binary, config_yaml, send, FicusProcess, TestUpstream, WAIT};

const BAD: &str =
    "listen:\n  address: nowhere\nupstreams:\n  monolith:\n    url: ftp://x\n    retries: 3\n";

fn ficus(args: &[&str]) -> std::process::Command {
    let mut cmd = std::process::Command::new(binary());
    cmd.args(args).env_remove("FICUS_CONFIG");
    cmd
}

#[test]
fn check_reports_every_error_located_and_exits_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, BAD).expect("write");
    let out = ficus(&["check", "-c", path.to_str().expect("utf-8")])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let file = path.display();
    for want in [
        format!("{file}:2:12: listen.address: expected an address"),
        format!("{file}:5:10: upstreams.monolith.url: expected an http:// or https:// URL"),
        format!("{file}:6:5: upstreams.monolith.retries: unknown key"),
    ] {
        assert!(stderr.contains(&want), "missing `{want}` in:\n{stderr}");
    }
    // `check` applies nothing: it only reports.
    assert!(
        stderr.ends_with(&format!("\n3 error(s) in {file}\n")),
        "{stderr}"
    );
}

#[test]
fn rules_test_blames_the_samples_file_for_its_errors_and_each_command_says_what_it_did_not_do() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("ficus.yaml");
    std::fs::write(
        &config,
        "upstreams: { m: { url: \"http://127.0.0.1:1\" } }\nsinks: { o: { type: stdout } }\nevents:\n  rules:\n    - { name: r, match: { path: /o }, type: t }\n",
    )
    .expect("write");
    let samples = dir.path().join("samples.yaml");
    let config_arg = config.to_str().expect("utf-8");
    let samples_arg = samples.to_str().expect("utf-8");
    for (text, want) in [
        ("- request: [\n", "1 error(s) in the samples file"),
        (
            "- request: { path: /o }\n  response: { staus: 201 }\n",
            ":2:15: sample 1: response.staus: unknown key",
        ),
    ] {
        std::fs::write(&samples, text).expect("write");
        let out = ficus(&["rules", "test", "-c", config_arg, samples_arg])
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(want), "missing `{want}` in:\n{stderr}");
        assert!(
            stderr.ends_with(&format!(
                "1 error(s) in the samples file {samples_arg}; no sample was run\n"
            )),
            "{stderr}"
        );
        assert!(!stderr.contains("config"), "{stderr}");
    }
    std::fs::write(&config, BAD).expect("write");
    for (args, consequence) in [
        (&["asyncapi"][..], "; no document was printed"),
        (&["rules", "test"][..], "; no sample was run"),
        (&["outbox", "status"][..], "; the outbox was not opened"),
    ] {
        let mut args = args.to_vec();
        args.extend(["-c", config_arg]);
        if args[0] == "rules" {
            args.push(samples_arg);
        }
        let out = ficus(&args).output().expect("run");
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.ends_with(&format!("\n3 error(s) in {config_arg}{consequence}\n")),
            "{args:?}: {stderr}"
        );
    }
}

/// Escape codes are for a terminal; redirected to a file or a pipe, text logs are plain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_logs_have_no_colour_codes_when_not_at_a_terminal() {
    let upstream = TestUpstream::echo().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ficus.yaml");
    std::fs::write(&path, config_yaml(upstream.addr, "log: { format: text }\n")).expect("write");
    let mut child = tokio::process::Command::new(binary())
        .args(["run", "-c", path.to_str().expect("utf-8")])
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn ficus");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let line = tokio::time::timeout(WAIT, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("listening") {
                return line;
            }
        }
        panic!("ficus exited before listening");
    })
    .await
    .expect("listening in time");
    assert!(!line.contains('\x1b'), "{line:?}");
    assert!(line.contains(" INFO "), "{line:?}");
}

#[test]
fn an_empty_ficus_config_falls_back_to_the_default_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("config")).expect("mkdir");
    std::fs::write(
        dir.path().join("config/ficus.yaml"),
        "upstreams: { monolith: { url: \"http://127.0.0.1:3000\" } }\n",
    )
    .expect("write");
    let out = ficus(&["check"])
        .env("FICUS_CONFIG", "")
        .current_dir(dir.path())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("config/ficus.yaml: ok"));
}

#[test]
fn check_prints_a_summary_for_a_valid_file_given_by_ficus_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ok.yaml");
    std::fs::write(
        &path,
        "upstreams:\n  monolith: { url: \"http://127.0.0.1:3000\" }\n  orders-fn: { url: \"http://127.0.0.1:3001\" }\ndefault_upstream: monolith\n",
    )
    .expect("write");
    let out = ficus(&["check"])
        .env("FICUS_CONFIG", &path)
        .output()
        .expect("run");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("upstreams: 2"), "{stdout}");
    assert!(
        stdout.contains("monolith: http://127.0.0.1:3000 (default)"),
        "{stdout}"
    );
}

#[test]
fn run_refuses_a_bad_config_with_exit_2_and_binds_nothing() {
    // The config names a port this test holds: if ficus tried to bind before validating, it
    // would fail with a bind error instead of the config errors.
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = held.local_addr().expect("addr");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        format!("listen:\n  address: {addr}\nupstreams:\n  monolith:\n    url: http://127.0.0.1:1\n    timeout: soon\n"),
    )
    .expect("write");
    let out = ficus(&["run", "-c", path.to_str().expect("utf-8")])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(":6:14: upstreams.monolith.timeout: expected a duration"),
        "{stderr}"
    );
    assert!(
        stderr.ends_with(&format!(
            "1 error(s) in {}; ficus did not start\n",
            path.display()
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("cannot listen"), "{stderr}");
}

#[test]
fn run_on_unreadable_tls_files_exits_2_naming_them() {
    // `check` passes (the files are often only mounted where ficus runs); `run` finds them
    // missing before binding, and that is a config error too.
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("no-such-ca.pem");
    for (what, yaml) in [
        (
            "sink",
            format!("upstreams: {{ m: {{ url: \"http://127.0.0.1:1\" }} }}\nsinks:\n  h: {{ type: http, url: \"https://127.0.0.1:1/\", tls: {{ ca: {} }} }}\n", ca.display()),
        ),
        (
            "upstream",
            format!("upstreams: {{ m: {{ url: \"https://127.0.0.1:1\", tls: {{ ca: {} }} }} }}\n", ca.display()),
        ),
    ] {
        let path = dir.path().join(format!("{what}.yaml"));
        std::fs::write(&path, yaml).expect("write");
        let path = path.to_str().expect("utf-8");
        let checked = ficus(&["check", "-c", path]).output().expect("check");
        assert_eq!(checked.status.code(), Some(0), "{what}: {checked:?}");
        let out = ficus(&["run", "-c", path]).output().expect("run");
        assert_eq!(out.status.code(), Some(2), "{what}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("no-such-ca.pem"), "{what}: {stderr}");
        assert!(stderr.contains(&format!("{what} `")), "{what}: {stderr}");
    }
}

#[test]
fn missing_config_file_is_a_clear_error() {
    let out = ficus(&["check", "-c", "/nonexistent/ficus.yaml"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("/nonexistent/ficus.yaml: cannot read"),
        "{stderr}"
    );
}

/// Runs `ficus outbox ARGS -c config`: exit code, stdout, stderr.
fn outbox_cli(config: &std::path::Path, args: &[&str]) -> (Option<i32>, String, String) {
    let mut all = vec!["outbox"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["-c", config.to_str().expect("utf-8")]);
    let out = ficus(&all).output().expect("run");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The row of `sink` in `ficus outbox status`: cursor, pending, dead letters, replaying.
fn status_row(stdout: &str, sink: &str) -> Vec<u64> {
    let line = stdout
        .lines()
        .find(|l| l.split_whitespace().next() == Some(sink))
        .unwrap_or_else(|| panic!("no row for {sink} in:\n{stdout}"));
    line.split_whitespace()
        .skip(1)
        .take(4)
        .map(|n| n.parse().expect("a count"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_status_and_replay_from_the_command_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let outbox = dir.path().join("outbox");
    let config = dir.path().join("ficus.yaml");
    std::fs::write(
        &config,
        format!(
            "upstreams: {{ monolith: {{ url: \"http://127.0.0.1:3000\" }} }}\n\
             sinks:\n  audit: {{ type: file, path: {events} }}\n  bus: {{ type: stdout }}\n\
             outbox: {{ dir: {outbox} }}\n",
            events = dir.path().join("events.jsonl").display(),
            outbox = outbox.display()
        ),
    )
    .expect("write");

    // Before ficus ever ran: nothing pending, every sink listed, and nothing made on disk.
    let (code, stdout, stderr) = outbox_cli(&config, &["status"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("not created yet"), "{stdout}");
    assert_eq!(status_row(&stdout, "audit"), [0, 0, 0, 0]);
    assert_eq!(status_row(&stdout, "bus"), [0, 0, 0, 0]);
    let (code, stdout, stderr) = outbox_cli(&config, &["replay"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("not created yet"), "{stdout}");
    assert!(!outbox.exists());

    // Three events, one of them dead-lettered for `audit`, which delivered the first.
    let handle = ficus::outbox::Outbox::open(
        ficus::outbox::OutboxSettings::new(&outbox),
        ficus::outbox::OutboxMetrics::unregistered(),
    )
    .expect("open");
    let payloads: Vec<Bytes> = (0..3).map(|i| Bytes::from(format!("e{i}"))).collect();
    handle
        .append(payloads.clone())
        .expect("append")
        .durable()
        .await
        .expect("durable");
    handle.reader("audit").expect("register audit");
    handle.commit("audit", 2).expect("commit");
    let dead = ficus::outbox::Record {
        seq: 1,
        payload: payloads[1].clone(),
    };
    handle.dead_letter("audit", &[dead]).expect("dead letter");
    drop(handle);

    let (code, stdout, stderr) = outbox_cli(&config, &["status"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("events 0..3"), "{stdout}");
    assert_eq!(status_row(&stdout, "audit"), [2, 1, 1, 0]);
    // No cursor yet: `bus` starts at the oldest event kept, as its dispatcher will.
    assert_eq!(status_row(&stdout, "bus"), [0, 3, 0, 0]);

    // A sink neither configured nor in the outbox is a mistake, said as one.
    let (code, _, stderr) = outbox_cli(&config, &["replay", "--sink", "nope"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("no sink named `nope`"), "{stderr}");
    assert!(stderr.contains("known: audit, bus"), "{stderr}");

    // `audit` leaves the config; its dead letters stay in the outbox, and replay still finds them.
    let without_audit = dir.path().join("without-audit.yaml");
    std::fs::write(
        &without_audit,
        format!(
            "upstreams: {{ monolith: {{ url: \"http://127.0.0.1:3000\" }} }}\n\
             sinks:\n  bus: {{ type: stdout }}\n\
             outbox: {{ dir: {outbox} }}\n",
            outbox = outbox.display()
        ),
    )
    .expect("write");
    let (_, stdout, _) = outbox_cli(&without_audit, &["status"]);
    assert!(stdout.contains("(not in config)"), "{stdout}");
    let (code, stdout, stderr) = outbox_cli(&without_audit, &["replay", "--sink", "audit"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.starts_with("1 dead letter(s)"), "{stdout}");
    let (_, stdout, _) = outbox_cli(&config, &["status"]);
    assert_eq!(status_row(&stdout, "audit"), [2, 1, 0, 1]);
}

#[test]
fn example_configs_load_and_validate() {
    let root = env!("CARGO_MANIFEST_DIR");
    for file in ["config/ficus.yaml", "config/demo.yaml"] {
        let path = std::path::Path::new(root).join(file);
        let config = ficus::Config::load(&path).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(!config.upstreams.is_empty(), "{file}");
        let out = ficus(&["check", "-c", path.to_str().expect("utf-8")])
            .output()
            .expect("run");
        assert_eq!(
            out.status.code(),
            Some(0),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_has_one_line_per_request_without_credentials() {
    let upstream = TestUpstream::echo().await;
    let yaml = config_yaml(upstream.addr, "log:\n  format: json\n  access: true\n");
    let mut proc = FicusProcess::start(&yaml).await;
    let req = Request::post("/orders?token=query-secret")
        .header("host", "shop")
        .header("authorization", "Bearer auth-secret")
        .header("cookie", "session=cookie-secret")
        .body(Full::new(Bytes::from_static(b"{\"a\":1}")))
        .expect("request");
    let resp = send(proc.addr, req).await;
    assert_eq!(resp.status(), 200);
    let body_len = resp.body().len() as u64;
    let line = tokio::time::timeout(WAIT, async {
        while let Some(line) = proc.stderr_lines.recv().await {
            for secret in ["auth-secret", "cookie-secret", "query-secret"] {
                assert!(!line.contains(secret), "{secret} logged: {line}");
            }
            let v: serde_json::Value = serde_json::from_str(&line).expect("json log line");
            if v["target"] == "ficus::access" {
                return v;
            }
        }
        panic!("no access log line")
    })
    .await
    .expect("access line in time");
    assert_eq!(line["method"], "POST");
    assert_eq!(line["path"], "/orders");
    assert_eq!(line["route"], "default");
    assert_eq!(line["status"], 200);
    assert_eq!(line["upstream"], "monolith");
    assert_eq!(line["bytes"], body_len);
    // A body with a `Content-Length` is complete when its last byte went out, though hyper
    // never polls it to its end.
    assert_eq!(line["complete"], true, "{line}");
    assert!(line["duration_ms"].as_f64().expect("duration") > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_is_off_by_default() {
    let upstream = TestUpstream::echo().await;
    let mut proc = FicusProcess::start(&config_yaml(upstream.addr, "")).await;
    assert_eq!(crate::support::get(proc.addr, "/x").await.0, 200);
    proc.signal("TERM");
    let status = tokio::time::timeout(WAIT, proc.child.wait())
        .await
        .expect("exits")
        .expect("status");
    assert!(status.success());
    while let Ok(line) = proc.stderr_lines.try_recv() {
        assert!(!line.contains("ficus::access"), "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_runs_a_shop_behind_ficus() {
    let mut child = tokio::process::Command::new(binary())
        .arg("demo")
        .env("FICUS_DEMO_LISTEN", "127.0.0.1:0")
        .env("FICUS_DEMO_ADMIN", "127.0.0.1:0")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn demo");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let addr: std::net::SocketAddr = tokio::time::timeout(WAIT, async {
        while let Some(line) = lines.next_line().await.expect("read") {
            if let Some(rest) = line.split("ficus in front of it at http://").nth(1) {
                return rest.trim().parse().expect("address");
            }
        }
        panic!("demo printed no address")
    })
    .await
    .expect("demo banner in time");

    let json = |method: &str, path: &str, body: &'static str| {
        Request::builder()
            .method(method)
            .uri(path)
            .header("host", "demo")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .expect("request")
    };
    let created = send(
        addr,
        json("POST", "/orders", r#"{"customer_id":"c-42","total":99.5}"#),
    )
    .await;
    assert_eq!(created.status(), 201);
    let order: serde_json::Value = serde_json::from_slice(created.body()).expect("json");
    let id = order["id"].as_u64().expect("id");
    // The demo prints each event as it is emitted.
    let printed = tokio::time::timeout(WAIT, async {
        while let Some(line) = lines.next_line().await.expect("read") {
            if line.starts_with("event shop.order.created") {
                return line;
            }
        }
        panic!("demo printed no event")
    })
    .await
    .expect("event printed in time");
    assert_eq!(printed, format!("event shop.order.created (subject {id}):"));
    let path = format!("/orders/{id}");
    let read = send(addr, json("GET", &path, "")).await;
    assert_eq!(read.status(), 200);
    let updated = send(addr, json("PATCH", &path, r#"{"total":120}"#)).await;
    let updated: serde_json::Value = serde_json::from_slice(updated.body()).expect("json");
    assert_eq!(updated["total"], 120);
    assert_eq!(updated["version"], 2);
    let cancelled = send(addr, json("DELETE", &path, "")).await;
    let cancelled: serde_json::Value = serde_json::from_slice(cancelled.body()).expect("json");
    assert_eq!(cancelled["status"], "cancelled");
    assert_eq!(
        send(addr, json("GET", "/orders/999", "")).await.status(),
        404
    );
    let _ = child.kill().await;
}
