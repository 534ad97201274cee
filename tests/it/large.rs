//! 100 MiB bodies stream through ficus in both directions: the bytes arrive intact, the
//! first bytes arrive before the last are sent, and ficus's memory stays flat.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;

use crate::support::upstream::{full, Body};
use crate::support::{config_yaml, send_streaming, FicusProcess, TestUpstream};

const TOTAL: u64 = 100 * 1024 * 1024;
const CHUNK: usize = 64 * 1024;
/// Far below the body size: a proxy that buffered either body would pass it.
const RSS_LIMIT_KIB: u64 = 48 * 1024;

/// 100 MiB generated chunk by chunk, with a simple running checksum of what was produced;
/// `sent` counts bytes handed out.
fn generated(sent: Arc<AtomicU64>) -> Body {
    let stream = futures_util::stream::unfold(0u64, move |offset| {
        let sent = sent.clone();
        async move {
            if offset >= TOTAL {
                return None;
            }
            let chunk: Vec<u8> = (0..CHUNK as u64)
                .map(|i| ((offset + i) % 251) as u8)
                .collect();
            sent.fetch_add(CHUNK as u64, Ordering::SeqCst);
            let frame: Result<Frame<Bytes>, Box<dyn std::error::Error + Send + Sync>> =
                Ok(Frame::data(Bytes::from(chunk)));
            Some((frame, offset + CHUNK as u64))
        }
    });
    BodyExt::boxed(StreamBody::new(stream))
}

/// Checks each byte against the generator's pattern; returns the number of bytes.
async fn verify(
    mut body: impl hyper::body::Body<Data = Bytes, Error = impl std::fmt::Debug> + Unpin,
) -> u64 {
    let mut offset = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("body frame");
        if let Some(data) = frame.data_ref() {
            for (i, b) in data.iter().enumerate() {
                assert_eq!(
                    *b,
                    ((offset + i as u64) % 251) as u8,
                    "byte {}",
                    offset + i as u64
                );
            }
            offset += data.len() as u64;
        }
    }
    offset
}

fn watch_rss(proc: &FicusProcess, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    let pid = proc.pid();
    tokio::spawn(async move {
        let mut max = 0;
        while !stop.load(Ordering::SeqCst) {
            if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
                if let Some(kib) = status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                {
                    max = max.max(kib);
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        max
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_of_100_mib_streams_with_flat_memory() {
    let upstream = TestUpstream::with(|req, _rec| async move {
        let n = verify(req.into_body()).await;
        http::Response::new(full(n.to_string()))
    })
    .await;
    let proc = FicusProcess::start(&config_yaml(upstream.addr, "")).await;
    let stop = Arc::new(AtomicBool::new(false));
    let rss = watch_rss(&proc, stop.clone());
    let req = Request::post("/upload")
        .header("host", "shop")
        .header("content-length", TOTAL.to_string())
        .body(generated(Arc::new(AtomicU64::new(0))))
        .expect("request");
    let resp = send_streaming(proc.addr, req).await;
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(
        body,
        TOTAL.to_string(),
        "the upstream received every byte, in order"
    );
    stop.store(true, Ordering::SeqCst);
    let max = rss.await.expect("rss");
    assert!(
        max > 0 && max < RSS_LIMIT_KIB,
        "ficus RSS peaked at {max} KiB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_of_100_mib_streams_first_byte_before_last() {
    let sent = Arc::new(AtomicU64::new(0));
    let counter = sent.clone();
    let upstream = TestUpstream::with(move |_req, _rec| {
        let counter = counter.clone();
        async move { http::Response::new(generated(counter)) }
    })
    .await;
    let proc = FicusProcess::start(&config_yaml(upstream.addr, "")).await;
    let stop = Arc::new(AtomicBool::new(false));
    let rss = watch_rss(&proc, stop.clone());
    let req = Request::get("/download")
        .header("host", "shop")
        .body(http_body_util::Empty::<Bytes>::new())
        .expect("request");
    let resp = send_streaming(proc.addr, req).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = body.frame().await.expect("a frame").expect("ok");
    let sent_at_first_byte = sent.load(Ordering::SeqCst);
    assert!(
        sent_at_first_byte < TOTAL / 2,
        "first byte arrived after the upstream had sent {sent_at_first_byte} bytes"
    );
    let first_len = first.data_ref().map_or(0, |d| d.len() as u64);
    let rest = {
        // Continue checking the pattern from where the first frame ended.
        let mut offset = first_len;
        while let Some(frame) = body.frame().await {
            let frame = frame.expect("frame");
            if let Some(data) = frame.data_ref() {
                for (i, b) in data.iter().enumerate() {
                    assert_eq!(*b, ((offset + i as u64) % 251) as u8);
                }
                offset += data.len() as u64;
            }
        }
        offset
    };
    assert_eq!(rest, TOTAL);
    stop.store(true, Ordering::SeqCst);
    let max = rss.await.expect("rss");
    assert!(
        max > 0 && max < RSS_LIMIT_KIB,
        "ficus RSS peaked at {max} KiB"
    );
}
