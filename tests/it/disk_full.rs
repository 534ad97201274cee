//! A real full disk under the outbox: a small tmpfs mounted by the test (root only). Writes
//! fail with ENOSPC; `/readyz` says so; a sync response whose event cannot be stored is not
//! released as a success; once space returns, ficus recovers by itself.

use std::path::Path;
use std::process::Command;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;

use crate::events::{shop, whole_body_rule};
use crate::support::{eventually, get, send, Ficus, WAIT};

struct Tmpfs<'a>(&'a Path);

impl<'a> Tmpfs<'a> {
    /// Mounts a tmpfs of `size` at `dir`; `None` (after saying why, loudly) where mounting is
    /// not allowed. Under CI the test must run, so it fails instead.
    fn mount(dir: &'a Path, size: &str) -> Option<Tmpfs<'a>> {
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs(dir)),
            other => {
                let why = format!("cannot mount a tmpfs (needs root): {other:?}");
                if std::env::var_os("CI").is_some() {
                    panic!("{why}");
                }
                eprintln!("\n!!! SKIPPED disk-full test: {why}\n");
                None
            }
        }
    }

    fn resize(&self, size: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(self.0)
            .status()
            .expect("mount");
        assert!(status.success(), "remount");
    }
}

impl Drop for Tmpfs<'_> {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0).status();
    }
}

fn padded_order(i: usize) -> Request<Full<Bytes>> {
    Request::post("/orders")
        .header("host", "shop")
        .header("content-type", "application/json")
        .header("x-order-id", i.to_string())
        .header("x-pad", "60000")
        .body(Full::new(Bytes::from_static(b"{}")))
        .expect("request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_makes_ficus_unready_and_withholds_unstored_events() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(tmpfs) = Tmpfs::mount(dir.path(), "512k") else {
        return;
    };
    let upstream = shop().await;
    let events_file = tempfile::tempdir().expect("tempdir");
    let sinks = format!(
        "  audit: {{ type: file, path: {} }}",
        events_file.path().join("e.jsonl").display()
    );
    // The sink is real but the outbox disk is tiny: it fills long before max_bytes.
    let ficus = Ficus::start(
        upstream.addr,
        &whole_body_rule(
            &sinks,
            &dir.path().join("outbox"),
            "  max_bytes: 1GiB\n  durability: sync\n",
        ),
    )
    .await;
    assert_eq!(get(ficus.admin, "/readyz").await.0, 200);

    let mut refused = None;
    for i in 0..40 {
        let resp = send(ficus.addr, padded_order(i)).await;
        if resp.status() == 500 {
            assert_eq!(
                resp.headers()["x-ficus-error"],
                "outbox",
                "ficus's own answer"
            );
            refused = Some(i);
            break;
        }
        assert_eq!(resp.status(), 201);
    }
    assert!(
        refused.is_some(),
        "the disk filled up and a response was withheld"
    );
    let (status, body) = get(ficus.admin, "/readyz").await;
    assert_eq!(status, 503);
    assert!(body.contains("outbox not writable"), "{body}");

    // Space comes back: the outbox retries and ficus is ready again by itself.
    tmpfs.resize("64m");
    eventually(WAIT, "ready again", || async {
        (get(ficus.admin, "/readyz").await.0 == 200).then_some(())
    })
    .await;
    assert_eq!(send(ficus.addr, padded_order(100)).await.status(), 201);
    drop(ficus);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_turns_with_the_free_space_before_any_write_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(_tmpfs) = Tmpfs::mount(dir.path(), "2m") else {
        return;
    };
    let upstream = shop().await;
    let events_file = tempfile::tempdir().expect("tempdir");
    let sinks = format!(
        "  audit: {{ type: file, path: {} }}",
        events_file.path().join("e.jsonl").display()
    );
    let ficus = Ficus::start(
        upstream.addr,
        &whole_body_rule(&sinks, &dir.path().join("outbox"), ""),
    )
    .await;
    assert_eq!(get(ficus.admin, "/readyz").await.0, 200);
    // Something else on the volume takes the space; ficus has written nothing since.
    let filler = dir.path().join("filler");
    let mut file = std::fs::File::create(&filler).expect("filler");
    let chunk = vec![1u8; 16 << 10];
    while std::io::Write::write_all(&mut file, &chunk).is_ok() {}
    drop(file);
    let (status, body) = get(ficus.admin, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("disk full"), "{body}");
    std::fs::remove_file(&filler).expect("free the space");
    assert_eq!(get(ficus.admin, "/readyz").await.0, 200);
}
