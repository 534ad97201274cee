//! Unit tests of recovery, cursors, deletion and write failures. The model-based property
//! test, corruption sweep and group-commit tests are in `tests/it/outbox.rs`.

use std::fs::{self, OpenOptions};
use std::io::Write;

use super::format::{FILE_HEADER_LEN, RECORD_HEADER_LEN};
use super::*;

fn payload(i: u64, len: usize) -> Bytes {
    let mut v = Vec::with_capacity(len);
    let mut x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.push(x as u8);
    }
    Bytes::from(v)
}

fn payloads(range: std::ops::Range<u64>, len: usize) -> Vec<Bytes> {
    range.map(|i| payload(i, len)).collect()
}

fn read_all(store: &log::Store, from: u64) -> Vec<Record> {
    let mut r = store.reader(from);
    let mut out = Vec::new();
    loop {
        let got = r.read(1000, 1 << 20).expect("read");
        if got.is_empty() {
            return out;
        }
        out.extend(got);
    }
}

fn seqs(records: &[Record]) -> Vec<u64> {
    records.iter().map(|r| r.seq).collect()
}

fn segment_files(dir: &Path) -> Vec<u64> {
    let mut v: Vec<u64> = fs::read_dir(dir.join("segments"))
        .expect("list segments")
        .filter_map(|e| format::parse_segment_file_name(e.ok()?.file_name().to_str()?))
        .collect();
    v.sort();
    v
}

/// Opens the core, appends `n` records of `len` bytes, syncs; returns the last segment's path.
fn fill(dir: &Path, segment_bytes: u64, n: u64, len: usize) -> PathBuf {
    let (mut w, store, _) = log::open(dir, segment_bytes).expect("open");
    w.write_batch(&payloads(0..n, len)).expect("write");
    store.segments().last().expect("a segment").1.clone()
}

#[test]
fn records_survive_reopen_with_their_seqs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut w, store, _) = log::open(dir.path(), 4096).expect("open");
    assert_eq!(w.write_batch(&payloads(0..3, 10)).expect("write"), 0..3);
    assert_eq!(
        w.write_batch(&payloads(3..200, 100)).expect("write"),
        3..200
    );
    assert!(store.segments().len() > 3, "small segments roll over");
    drop((w, store));
    let (w, store, recovery) = log::open(dir.path(), 4096).expect("reopen");
    assert_eq!(recovery, log::Recovery::default());
    assert_eq!(w.next_seq(), 200);
    let all = read_all(&store, 0);
    assert_eq!(seqs(&all), (0..200).collect::<Vec<_>>());
    for r in &all {
        let len = if r.seq < 3 { 10 } else { 100 };
        assert_eq!(r.payload, payload(r.seq, len), "seq {}", r.seq);
    }
}

#[test]
fn a_torn_tail_is_cut_at_the_last_whole_record() {
    for cut in [1u64, 5, RECORD_HEADER_LEN, RECORD_HEADER_LEN + 7] {
        let dir = tempfile::tempdir().expect("tempdir");
        let last = fill(dir.path(), 1 << 20, 10, 20);
        let whole = fs::metadata(&last).expect("stat").len();
        // Half of an 11th record, as a crash in the middle of a write leaves it.
        let mut extra = Vec::new();
        format::encode_record(&mut extra, 10, &payload(10, 20));
        let keep = usize::try_from(cut).expect("small");
        OpenOptions::new()
            .append(true)
            .open(&last)
            .and_then(|mut f| f.write_all(&extra[..keep]))
            .expect("tear");
        let (mut w, store, recovery) = log::open(dir.path(), 1 << 20).expect("reopen");
        assert_eq!(recovery.truncated_bytes, cut);
        assert_eq!(fs::metadata(&last).expect("stat").len(), whole);
        assert_eq!(w.next_seq(), 10);
        assert_eq!(
            w.write_batch(&[payload(99, 3)]).expect("append after"),
            10..11
        );
        assert_eq!(read_all(&store, 0).len(), 11);
    }
}

#[test]
fn a_bad_crc_a_bad_length_and_a_seq_gap_each_end_the_log() {
    let frame = format::frame_len(20);
    // (byte offset in the 4th record, xor): crc field, length field, seq field, payload.
    for (at, flip) in [
        (4u64, 0x01u8),
        (0, 0x40),
        (8, 0x02),
        (RECORD_HEADER_LEN + 3, 0x80),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let last = fill(dir.path(), 1 << 20, 10, 20);
        let offset = FILE_HEADER_LEN + 3 * frame + at;
        let mut bytes = fs::read(&last).expect("read");
        bytes[usize::try_from(offset).expect("small")] ^= flip;
        fs::write(&last, &bytes).expect("damage");
        let (w, store, recovery) = log::open(dir.path(), 1 << 20).expect("reopen");
        assert_eq!(w.next_seq(), 3, "damage at +{at}");
        assert_eq!(recovery.truncated_bytes, 7 * frame);
        assert_eq!(seqs(&read_all(&store, 0)), vec![0, 1, 2]);
    }
    // A record that is valid in itself but has the wrong seq (e.g. from an old file).
    let dir = tempfile::tempdir().expect("tempdir");
    let last = fill(dir.path(), 1 << 20, 3, 20);
    let mut rogue = Vec::new();
    format::encode_record(&mut rogue, 7, b"out of order");
    OpenOptions::new()
        .append(true)
        .open(&last)
        .and_then(|mut f| f.write_all(&rogue))
        .expect("append rogue record");
    let (w, _, recovery) = log::open(dir.path(), 1 << 20).expect("reopen");
    assert_eq!(w.next_seq(), 3);
    assert_eq!(recovery.truncated_bytes, rogue.len() as u64);
}

#[test]
fn a_segment_torn_while_being_created_is_rewritten_but_a_damaged_header_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    fill(dir.path(), 1 << 20, 5, 8);
    // The next segment, created just before a crash: half its header made it.
    let next = dir
        .path()
        .join("segments")
        .join(format::segment_file_name(5));
    fs::write(&next, &format::encode_header(format::SEGMENT_MAGIC, 5)[..9]).expect("tear");
    let (mut w, store, _) = log::open(dir.path(), 1 << 20).expect("reopen");
    assert_eq!(fs::metadata(&next).expect("stat").len(), FILE_HEADER_LEN);
    assert_eq!(w.write_batch(&payloads(5..7, 8)).expect("write"), 5..7);
    assert_eq!(seqs(&read_all(&store, 0)), (0..7).collect::<Vec<_>>());
    drop((w, store));

    // Damage the header of a segment that holds records: not a crash, so no guessing.
    let mut bytes = fs::read(&next).expect("read");
    bytes[2] ^= 0xff;
    fs::write(&next, &bytes).expect("damage");
    let err = log::open(dir.path(), 1 << 20).err().expect("refused");
    assert!(matches!(err, OutboxError::Corrupt { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&format::segment_file_name(5)),
        "{err}"
    );
}

#[test]
fn a_damaged_earlier_segment_is_an_error_for_its_reader_never_garbage() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut w, store, _) = log::open(dir.path(), 2048).expect("open");
    w.write_batch(&payloads(0..40, 100)).expect("write");
    let (first_seq, first_path) = store.segments()[0].clone();
    assert_eq!(first_seq, 0);
    let mut bytes = fs::read(&first_path).expect("read");
    let at = usize::try_from(FILE_HEADER_LEN + 2 * format::frame_len(100) + 20).expect("small");
    bytes[at] ^= 0x01;
    fs::write(&first_path, &bytes).expect("damage");
    let mut r = store.reader(0);
    let got = r.read(10, 1 << 20).expect("the first two records are fine");
    assert_eq!(seqs(&got), vec![0, 1], "returned before the damaged one");
    let err = r.read(10, 1 << 20).expect_err("record 2 is damaged");
    match &err {
        OutboxError::Corrupt { path, offset, .. } => {
            assert_eq!(path, &first_path);
            assert_eq!(*offset, FILE_HEADER_LEN + 2 * format::frame_len(100));
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    // Later segments are still readable.
    let second = store.segments()[1].0;
    assert_eq!(
        store.reader(second).read(1, 1 << 20).expect("read")[0].seq,
        second
    );
}

#[test]
fn readers_seek_back_and_cross_segments_and_read_records_larger_than_a_chunk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut w, store, _) = log::open(dir.path(), 8 << 20).expect("open");
    let big = payload(1, 3 << 20);
    w.write_batch(&[payload(0, 5), big.clone(), payload(2, 5)])
        .expect("write");
    w.write_batch(&payloads(3..50, 200_000)).expect("write");
    assert!(store.segments().len() > 1);
    let mut r = store.reader(0);
    let got = r.read(10, 1).expect("read");
    assert_eq!(
        seqs(&got),
        vec![0],
        "max_bytes bounds a batch, at least one record"
    );
    let got = r.read(10, 1).expect("read");
    assert_eq!(got[0].payload, big);
    r.seek(1);
    assert_eq!(r.read(1, 1).expect("read again")[0].payload, big);
    let rest = r.read(usize::MAX, usize::MAX).expect("read the rest");
    assert_eq!(rest.first().map(|r| r.seq), Some(2));
    let mut all = rest;
    loop {
        let more = r.read(usize::MAX, usize::MAX).expect("read");
        if more.is_empty() {
            break;
        }
        all.extend(more);
    }
    assert_eq!(seqs(&all), (2..50).collect::<Vec<_>>());
    r.seek(30);
    assert_eq!(r.read(1, 1).expect("read")[0].payload, payload(30, 200_000));
    r.seek(10);
    assert_eq!(r.read(1, 1).expect("read")[0].payload, payload(10, 200_000));
}

#[test]
fn segments_are_deleted_only_when_every_cursor_passed_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut w, store, _) = log::open(dir.path(), 2048).expect("open");
    assert_eq!(store.register("bus").expect("register"), 0);
    assert_eq!(store.register("audit").expect("register"), 0);
    w.write_batch(&payloads(0..60, 100)).expect("write");
    let before = segment_files(dir.path());
    assert!(before.len() >= 4, "{before:?}");
    let bytes_before = store.bytes();

    store.commit("bus", 60).expect("commit");
    assert_eq!(
        segment_files(dir.path()),
        before,
        "audit has not passed any"
    );
    store.commit("audit", before[2]).expect("commit");
    assert_eq!(segment_files(dir.path()), before[2..].to_vec());
    assert!(store.bytes() < bytes_before);
    // (The zero-filled spare segment, made once the active one is half full, and the
    // passed segment kept for recycling hold no record and are not counted.)
    let on_disk: u64 = fs::read_dir(dir.path().join("segments"))
        .expect("list")
        .map(|e| e.expect("entry"))
        .filter(|e| e.file_name() != spare::SPARE_FILE && e.file_name() != spare::RECYCLED_FILE)
        .map(|e| e.metadata().expect("stat").len())
        .sum();
    assert_eq!(store.bytes(), on_disk);

    // A cursor one short of the next segment keeps the segment.
    store.commit("audit", before[3] - 1).expect("commit");
    assert_eq!(segment_files(dir.path()), before[2..].to_vec());
    // The active segment is never deleted, even with every cursor at the end.
    store.commit("audit", 60).expect("commit");
    assert_eq!(
        segment_files(dir.path()),
        vec![*before.last().expect("one")]
    );
    drop((w, store));

    // A sink missing from the config keeps its cursor file and so its backlog.
    let (mut w, store, _) = log::open(dir.path(), 2048).expect("reopen");
    w.write_batch(&payloads(60..120, 100)).expect("write");
    store.commit("bus", 120).expect("commit bus");
    // (The restart rolled into the segment kept for recycling at once, so the one that
    // ended at 60 went: audit had passed it too.)
    assert_eq!(store.first_seq(), 60);
    assert_eq!(
        read_all(&store, 0).len(),
        60,
        "audit's backlog is all there"
    );
    assert_eq!(store.cursor("audit"), Some(60));
}

#[test]
fn a_new_sink_is_placed_at_the_oldest_record_and_protects_it_from_then_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut w, store, _) = log::open(dir.path(), 2048).expect("open");
    store.register("bus").expect("register");
    w.write_batch(&payloads(0..60, 100)).expect("write");
    store.commit("bus", 30).expect("commit");
    let first = store.first_seq();
    assert!(first > 0 && first <= 30);
    assert_eq!(store.register("late").expect("register"), first);
    store.commit("bus", 60).expect("commit");
    assert_eq!(store.first_seq(), first, "late's cursor holds the segments");
    assert_eq!(read_all(&store, first).len() as u64, 60 - first);
}

#[test]
fn cursors_are_clamped_to_what_the_log_holds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut w, store, _) = log::open(dir.path(), 1 << 20).expect("open");
    w.write_batch(&payloads(0..10, 10)).expect("write");
    store.commit("bus", 10).expect("commit");
    assert!(matches!(
        store.commit("bus", 11),
        Err(OutboxError::CursorBeyondEnd {
            next: 11,
            end: 10,
            ..
        })
    ));
    drop((w, store));
    // The records behind the cursor are lost (their tail was damaged and cut).
    let last = dir
        .path()
        .join("segments")
        .join(format::segment_file_name(0));
    let len = fs::metadata(&last).expect("stat").len();
    OpenOptions::new()
        .write(true)
        .open(&last)
        .and_then(|f| f.set_len(len - 5))
        .expect("cut");
    let (mut w, store, _) = log::open(dir.path(), 1 << 20).expect("reopen");
    assert_eq!(w.next_seq(), 9);
    assert_eq!(store.cursor("bus"), Some(9), "moved back to the end");
    assert_eq!(
        cursor::read(&cursor::path(&dir.path().join("cursors"), "bus")).expect("read"),
        9,
        "and persisted"
    );
    w.write_batch(&[payload(9, 1)]).expect("write");
    assert_eq!(
        seqs(&read_all(&store, store.cursor("bus").expect("cursor"))),
        vec![9]
    );
}

#[test]
fn with_no_segments_seqs_start_at_the_highest_cursor() {
    let dir = tempfile::tempdir().expect("tempdir");
    fs::create_dir_all(dir.path().join("cursors")).expect("mkdir");
    cursor::write(&dir.path().join("cursors"), "bus", 500).expect("cursor");
    cursor::write(&dir.path().join("cursors"), "audit", 300).expect("cursor");
    let (mut w, store, _) = log::open(dir.path(), 4096).expect("open");
    assert_eq!(w.next_seq(), 500);
    assert_eq!(
        store.cursor("audit"),
        Some(500),
        "clamped to the oldest record"
    );
    assert_eq!(w.write_batch(&[payload(0, 1)]).expect("write"), 500..501);
}

#[test]
fn a_damaged_cursor_file_stops_open_with_its_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    fill(dir.path(), 4096, 3, 3);
    fs::write(dir.path().join("cursors").join("bus.cursor"), b"garbage").expect("write");
    let err = log::open(dir.path(), 4096).err().expect("refused");
    assert!(err.to_string().contains("bus.cursor"), "{err}");
}

#[test]
fn a_failed_write_or_fsync_is_undone_and_the_same_seqs_are_written_again() {
    // The batch rolls over twice. Fault points: write, then per roll the old segment's
    // fsync and the new one's header write, header fsync and directory fsync, twice; then
    // write, fsync (batch): 12 in all. Fail each in turn, once or several times in a row. A
    // new segment whose making failed must not be left behind, or the retry finds its name
    // taken.
    let each_once = (0..12).map(|skip| (skip, 1));
    for (skip, fail) in each_once.chain([(0, 3), (1, 4), (3, 3), (8, 4)]) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut w, store, _) = log::open(dir.path(), 2048).expect("open");
        w.write_batch(&payloads(0..5, 100)).expect("write");
        let segments_before = store.segments();
        let bytes_before = store.bytes();
        store.inject_faults_after(skip, fail);
        let batch = payloads(5..40, 100);
        let mut failures = 0;
        let range = loop {
            match w.write_batch(&batch) {
                Ok(range) => break range,
                Err(e) => {
                    failures += 1;
                    assert!(e.to_string().contains("injected"), "{e}");
                    assert_eq!(
                        store.durable_end(),
                        5,
                        "nothing of a failed batch is durable"
                    );
                    assert_eq!(store.segments(), segments_before, "rolled back");
                    assert_eq!(store.bytes(), bytes_before);
                    let on_disk = fs::metadata(&segments_before[0].1).expect("stat").len();
                    assert_eq!(on_disk, bytes_before, "the failed bytes were cut off");
                    assert!(failures <= fail);
                }
            }
        };
        assert_eq!(failures, fail, "skip {skip}: every injected fault hit");
        assert_eq!(range, 5..40);
        assert!(store.segments().len() >= 3, "the retry rolled over too");
        drop((w, store));
        let (_, store, recovery) = log::open(dir.path(), 2048).expect("reopen");
        assert_eq!(
            recovery.truncated_bytes, 0,
            "no torn bytes were left behind"
        );
        let all = read_all(&store, 0);
        assert_eq!(seqs(&all), (0..40).collect::<Vec<_>>());
        assert!(all.iter().all(|r| r.payload == payload(r.seq, 100)));
    }
}

#[test]
fn a_record_with_a_valid_checksum_but_the_wrong_seq_is_corrupt_for_its_reader() {
    // Earlier segments are not scanned at open; the reader's seq check is what catches a
    // record that is well-formed but misplaced (say, a block from another file).
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut w, store, _) = log::open(dir.path(), 2048).expect("open");
    w.write_batch(&payloads(0..40, 100)).expect("write");
    let (_, first_path) = store.segments()[0].clone();
    let mut bytes = fs::read(&first_path).expect("read");
    let mut rogue = Vec::new();
    format::encode_record(&mut rogue, 1234, &payload(3, 100));
    let at = usize::try_from(FILE_HEADER_LEN + 3 * format::frame_len(100)).expect("small");
    bytes[at..at + rogue.len()].copy_from_slice(&rogue);
    fs::write(&first_path, &bytes).expect("plant");
    let mut r = store.reader(0);
    // The good records come first, then the error, and the reader stays at it.
    assert_eq!(
        seqs(&r.read(10, 1 << 20).expect("records 0..3")),
        vec![0, 1, 2]
    );
    let err = r.read(10, 1 << 20).expect_err("seq 1234 where 3 belongs");
    assert!(err_mentions(&err, "seq 1234"), "{err}");
    assert_eq!(r.position(), 3);
    assert!(r.read(10, 1 << 20).is_err(), "still there");
    // Seeking past it works through the header-only scan, which checks seqs as well.
    let mut r = store.reader(5);
    let err = r
        .read(1, 1 << 20)
        .expect_err("the scan to seq 5 passes the rogue record");
    assert!(err_mentions(&err, "seq 1234"), "{err}");
}

fn err_mentions(e: &OutboxError, what: &str) -> bool {
    matches!(e, OutboxError::Corrupt { .. }) && e.to_string().contains(what)
}

#[test]
fn a_reader_never_sees_records_that_are_not_durable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut w, store, _) = log::open(dir.path(), 1 << 20).expect("open");
    w.write_batch(&payloads(0..3, 10)).expect("write");
    w.append(&payloads(3..6, 10)).expect("append without sync");
    let mut r = store.reader(0);
    assert_eq!(seqs(&r.read(100, 1 << 20).expect("read")), vec![0, 1, 2]);
    assert!(r.read(100, 1 << 20).expect("read").is_empty());
    w.sync().expect("sync");
    assert_eq!(seqs(&r.read(100, 1 << 20).expect("read")), vec![3, 4, 5]);
}

fn settings(dir: &Path) -> OutboxSettings {
    let mut s = OutboxSettings::new(dir);
    s.segment_bytes = 4096;
    s.max_bytes = 1 << 20;
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_failure_fails_the_tickets_reports_unhealthy_and_is_retried() {
    let dir = tempfile::tempdir().expect("tempdir");
    let outbox = Outbox::open(settings(dir.path()), OutboxMetrics::unregistered()).expect("open");
    outbox
        .append(payloads(0..2, 10))
        .expect("append")
        .durable()
        .await
        .expect("durable");
    assert_eq!(outbox.health(), Ok(()));
    let mut reader = outbox.reader("bus").expect("reader");
    assert_eq!(
        seqs(&reader.next(10, 1 << 20).await.expect("next")),
        vec![0, 1]
    );

    outbox.inject_faults(1);
    let ticket = outbox.append(payloads(2..4, 10)).expect("append");
    let err = ticket.durable().await.expect_err("the write failed");
    assert!(err.to_string().contains("injected"), "{err}");
    // The health error may already be cleared by the retry; flush sees it through.
    outbox.flush().await.expect("the retry makes them durable");
    assert_eq!(outbox.health(), Ok(()));
    let ticket = outbox.append(payloads(4..5, 10)).expect("append");
    assert_eq!(ticket.first_seq(), 4, "seqs stay consecutive");
    ticket.durable().await.expect("durable");
    let got = reader.next(10, 1 << 20).await.expect("next");
    assert_eq!(seqs(&got), vec![2, 3, 4]);
    assert!(got.iter().all(|r| r.payload == payload(r.seq, 10)));
    outbox.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_a_failing_disk_until_a_write_succeeds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let outbox = Outbox::open(settings(dir.path()), OutboxMetrics::unregistered()).expect("open");
    // Every try fails for a while: the health error is visible, flush fails fast.
    outbox.inject_faults(u32::MAX);
    let ticket = outbox.append(payloads(0..1, 10)).expect("append");
    assert!(ticket.durable().await.is_err());
    let reason = outbox.health().expect_err("unhealthy");
    assert!(reason.contains("injected"), "{reason}");
    assert!(outbox.flush().await.is_err());
    assert_eq!(outbox.durable_end(), 0);
    outbox.inject_faults(0);
    outbox.flush().await.expect("the disk is back");
    assert_eq!(outbox.health(), Ok(()));
    assert_eq!(outbox.durable_end(), 1);
    outbox.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untracked_appends_take_their_seqs_between_tracked_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let outbox = Outbox::open(settings(dir.path()), OutboxMetrics::unregistered()).expect("open");
    assert_eq!(
        outbox.append_untracked(payloads(0..2, 10)).expect("append"),
        0
    );
    let ticket = outbox.append(payloads(2..3, 10)).expect("append");
    assert_eq!(ticket.first_seq(), 2);
    assert_eq!(
        outbox.append_untracked(payloads(3..5, 10)).expect("append"),
        3
    );
    ticket.durable().await.expect("durable");
    outbox.flush().await.expect("flush");
    assert_eq!(outbox.durable_end(), 5);
    let mut reader = outbox.reader("bus").expect("reader");
    let got = reader.next(10, 1 << 20).await.expect("next");
    assert_eq!(seqs(&got), vec![0, 1, 2, 3, 4]);
    assert!(got.iter().all(|r| r.payload == payload(r.seq, 10)));
    outbox.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_are_checked_before_anything_is_queued() {
    let dir = tempfile::tempdir().expect("tempdir");
    let outbox = Outbox::open(settings(dir.path()), OutboxMetrics::unregistered()).expect("open");
    let max = usize::try_from(outbox.max_payload()).expect("fits");
    assert_eq!(max as u64, 4096 - FILE_HEADER_LEN - RECORD_HEADER_LEN);
    let err = outbox
        .append(vec![payload(0, 1), payload(1, max + 1)])
        .expect_err("too large");
    assert!(matches!(err, OutboxError::TooLarge { .. }), "{err:?}");
    let t = outbox
        .append(vec![payload(0, max)])
        .expect("the largest fits");
    assert_eq!(t.first_seq(), 0, "the refused append took no seq");
    t.durable().await.expect("durable");
    assert!(outbox.append(Vec::new()).expect("empty").is_empty());
    assert!(matches!(
        outbox.reader("a/b"),
        Err(OutboxError::InvalidSink(_))
    ));
    assert!(matches!(
        outbox.commit("bus", 2),
        Err(OutboxError::CursorBeyondEnd { .. })
    ));
    outbox.close().await.expect("close");
    assert!(matches!(
        outbox.append(vec![payload(0, 1)]),
        Err(OutboxError::Closed)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_next_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let outbox = Outbox::open(settings(dir.path()), OutboxMetrics::unregistered()).expect("open");
    let mut reader = outbox.reader("bus").expect("reader");
    // Nothing durable yet: the wait is cancelled, as the dispatcher's select! does.
    tokio::select! {
        biased;
        _ = reader.next(10, 1 << 20) => panic!("nothing to read yet"),
        _ = std::future::ready(()) => {}
    }
    for i in 0..20 {
        outbox.append(vec![payload(i, 100)]).expect("append");
    }
    outbox.flush().await.expect("flush");
    let mut got = Vec::new();
    while got.len() < 20 {
        // Start a read and drop it after its first poll (mid-read, on the blocking pool),
        // then read for real.
        {
            let fut = reader.next(3, 1 << 20);
            tokio::pin!(fut);
            if let Some(r) = poll_once(fut.as_mut()).await {
                got.extend(r.expect("next"));
                continue;
            }
        }
        got.extend(reader.next(3, 1 << 20).await.expect("next"));
    }
    assert_eq!(seqs(&got), (0..20).collect::<Vec<_>>());
    outbox.close().await.expect("close");
}

/// Polls a future once: its output if it was ready.
async fn poll_once<F: std::future::Future + Unpin>(f: F) -> Option<F::Output> {
    let mut f = f;
    std::future::poll_fn(move |cx| {
        std::task::Poll::Ready(match std::pin::Pin::new(&mut f).poll(cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        })
    })
    .await
}

#[test]
fn settings_are_checked_and_segments_fit_max_bytes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let _guard = rt.enter();
    let mut s = OutboxSettings::new(dir.path());
    s.max_bytes = 100;
    assert!(matches!(
        Outbox::open(s.clone(), OutboxMetrics::unregistered()),
        Err(OutboxError::Settings(_))
    ));
    s.max_bytes = 1 << 20;
    let outbox = Outbox::open(s, OutboxMetrics::unregistered()).expect("open");
    assert_eq!(outbox.settings().segment_bytes, 256 << 10);
}

#[test]
fn status_reads_a_directory_without_changing_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut w, store, _) = log::open(dir.path(), 2048).expect("open");
    store.register("bus").expect("register");
    w.write_batch(&payloads(0..30, 100)).expect("write");
    store.commit("bus", 12).expect("commit");
    // An append in progress: a torn record at the end is not counted, and not cut.
    let last = store.segments().last().expect("segment").1.clone();
    let mut f = OpenOptions::new().append(true).open(&last).expect("open");
    f.write_all(&[50, 0, 0, 0, 1]).expect("tear");
    let len = fs::metadata(&last).expect("stat").len();
    let s = status(dir.path(), &["bus"]).expect("status");
    assert_eq!(fs::metadata(&last).expect("stat").len(), len);
    assert_eq!(s.end_seq, 30);
    assert_eq!(s.first_seq, store.first_seq());
    assert_eq!(s.segments, store.segments().len());
    assert_eq!(s.bytes, store.bytes());
    assert_eq!(
        s.sinks,
        vec![SinkStatus {
            sink: "bus".into(),
            cursor: 12,
            pending: 18,
            dead_letters: 0,
            replaying: 0
        }]
    );
    // A sink named in the config with no cursor yet starts at the oldest record kept.
    let s = status(dir.path(), &["bus", "audit"]).expect("status");
    assert_eq!(
        s.sinks
            .iter()
            .map(|s| (s.sink.as_str(), s.cursor, s.pending))
            .collect::<Vec<_>>(),
        vec![
            ("audit", store.first_seq(), 30 - store.first_seq()),
            ("bus", 12, 18)
        ]
    );
    assert!(s.created);
    // Not made yet: nothing in it, every configured sink listed, and nothing created.
    let missing = dir.path().join("missing");
    let s = status(&missing, &["audit"]).expect("status of an outbox not made yet");
    assert!(!s.created);
    assert_eq!((s.bytes, s.segments, s.end_seq), (0, 0, 0));
    assert_eq!(s.sinks.len(), 1);
    assert_eq!((s.sinks[0].sink.as_str(), s.sinks[0].pending), ("audit", 0));
    assert!(!missing.exists());
    // A file where the directory should be is an error.
    assert!(status(&last, &[]).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_outbox_on_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = Outbox::open(settings(dir.path()), OutboxMetrics::unregistered()).expect("open");
    let second = Outbox::open(settings(dir.path()), OutboxMetrics::unregistered());
    match second {
        Err(OutboxError::InUse(path)) => assert_eq!(path, dir.path()),
        Err(other) => panic!("expected InUse, got {other}"),
        Ok(_) => panic!("two writers on one directory"),
    }
    first.close().await.expect("close");
    drop(first);
    let again = Outbox::open(settings(dir.path()), OutboxMetrics::unregistered())
        .expect("reopen after release");
    again.close().await.expect("close");
}

/// Tickets are resolved by a task on the runtime that opened the outbox, and sleeping writers
/// are woken from tasks: an outbox that outlives that runtime (or is used from another, or
/// from no runtime) must still resolve every ticket and wake its writer.
#[test]
fn tickets_resolve_after_the_opening_runtime_is_gone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let (outbox, ticket) = first.block_on(async {
        let outbox =
            Outbox::open(settings(dir.path()), OutboxMetrics::unregistered()).expect("open");
        let ticket = outbox.append(payloads(0..3, 64)).expect("append");
        (outbox, ticket)
    });
    drop(first);
    let second = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    second.block_on(async {
        ticket.durable().await.expect("the first runtime's ticket");
        for i in 0..20u64 {
            let t = outbox.append(payloads(3 + i..4 + i, 64)).expect("append");
            tokio::time::timeout(std::time::Duration::from_secs(10), t.durable())
                .await
                .expect("resolved without the first runtime")
                .expect("durable");
        }
    });
    // And from a plain thread, with no runtime at all.
    let ticket = outbox.append(payloads(23..24, 64)).expect("append");
    second
        .block_on(ticket.durable())
        .expect("durable without a runtime at append");
    assert_eq!(outbox.durable_end(), 24);
}

/// Waits, with a deadline, for the writer's spare segment (made by a thread) to be ready.
fn wait_for_spare(w: &mut log::SegmentWriter) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !w.spare_ready() {
        assert!(
            std::time::Instant::now() < deadline,
            "no spare segment after 20 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

fn file_len(path: &Path) -> u64 {
    fs::metadata(path).expect("stat").len()
}

#[test]
fn records_go_into_a_preallocated_segment_in_place_and_its_zeros_are_no_loss() {
    const SEGMENT: u64 = 64 << 10;
    let frame = format::frame_len(1000);
    let dir = tempfile::tempdir().expect("tempdir");
    let spare = dir.path().join("segments").join("spare");
    let (mut w, store, _) = log::open(dir.path(), SEGMENT).expect("open");
    // A new outbox's first segment grows as it is written; once it holds half a segment, a
    // zero-filled spare is made beside it.
    w.write_batch(&payloads(0..40, 1000)).expect("write");
    wait_for_spare(&mut w);
    assert_eq!(file_len(&spare), SEGMENT);
    // The next write moves to the spare at once, rather than when the first segment is full.
    w.write_batch(&payloads(40..41, 1000)).expect("write");
    let segments = store.segments();
    assert_eq!(
        segments.iter().map(|s| s.0).collect::<Vec<_>>(),
        vec![0, 40]
    );
    assert!(!spare.exists(), "the spare became segment 40");
    assert_eq!(file_len(&segments[0].1), FILE_HEADER_LEN + 40 * frame);
    // Writing there changes no file size (so fdatasync has no metadata to commit).
    assert_eq!(file_len(&segments[1].1), SEGMENT);
    w.write_batch(&payloads(41..60, 1000)).expect("write");
    assert_eq!(file_len(&segments[1].1), SEGMENT);
    assert_eq!(store.bytes(), FILE_HEADER_LEN * 2 + 60 * frame);
    // `ficus outbox status` counts records, not zeros.
    assert_eq!(
        status(dir.path(), &[]).expect("status").bytes,
        store.bytes()
    );
    // Once full, it is rolled over and cut to its records, like every complete segment.
    w.write_batch(&payloads(60..110, 1000)).expect("write");
    let segments = store.segments();
    assert_eq!(segments.len(), 3);
    let third = segments[2].0;
    assert_eq!(
        file_len(&segments[1].1),
        FILE_HEADER_LEN + (third - 40) * frame
    );
    // The third grows as written (no spare was started before it); it too moves to a spare
    // once one is ready, and a reader follows into the preallocated segment.
    w.write_batch(&payloads(110..150, 1000)).expect("write");
    wait_for_spare(&mut w);
    w.write_batch(&payloads(150..155, 1000)).expect("write");
    let segments = store.segments();
    assert_eq!(segments.len(), 4);
    let last = segments[3].1.clone();
    assert_eq!(file_len(&last), SEGMENT);
    assert_eq!(seqs(&read_all(&store, 0)), (0..155).collect::<Vec<_>>());
    // A crash: the zeros after the last record end the log like a torn tail, are cut, and
    // are not reported as lost.
    drop((w, store));
    let (mut w, store, recovery) = log::open(dir.path(), SEGMENT).expect("reopen");
    assert_eq!(recovery, log::Recovery::default());
    assert_eq!(w.next_seq(), 155);
    assert_eq!(file_len(&last), FILE_HEADER_LEN + 5 * frame);
    let all = read_all(&store, 0);
    assert_eq!(seqs(&all), (0..155).collect::<Vec<_>>());
    assert!(all.iter().all(|r| r.payload == payload(r.seq, 1000)));
    assert_eq!(
        w.write_batch(&payloads(155..156, 1000)).expect("write"),
        155..156
    );
}

/// Segments of this size in [`writing_into_a_spare`].
const SPARE_SEGMENT: u64 = 64 << 10;

/// An outbox in `dir` with records 0..`end` of 1000 bytes: 0..40 in a first segment that grew
/// as written, 40..`end` in the preallocated spare it rolled into. Returns the writer, the
/// store and the active (preallocated) segment's path.
fn writing_into_a_spare(dir: &Path, end: u64) -> (log::SegmentWriter, log::Store, PathBuf) {
    let (mut w, store, _) = log::open(dir, SPARE_SEGMENT).expect("open");
    w.write_batch(&payloads(0..40, 1000)).expect("write");
    wait_for_spare(&mut w);
    w.write_batch(&payloads(40..end, 1000)).expect("write");
    let active = store.segments().last().expect("segment").1.clone();
    assert_eq!(file_len(&active), SPARE_SEGMENT, "writing into the spare");
    (w, store, active)
}

#[test]
fn a_torn_record_before_the_zeros_of_a_preallocated_segment_is_cut_and_counted() {
    let frame = format::frame_len(1000);
    let dir = tempfile::tempdir().expect("tempdir");
    let (w, store, active) = writing_into_a_spare(dir.path(), 45);
    drop((w, store));
    // Half of the 46th record, where the zeros began; and a spare a crash left half made.
    let mut extra = Vec::new();
    format::encode_record(&mut extra, 45, &payload(45, 1000));
    let end = FILE_HEADER_LEN + 5 * frame;
    OpenOptions::new()
        .write(true)
        .open(&active)
        .and_then(|f| std::os::unix::fs::FileExt::write_all_at(&f, &extra[..600], end))
        .expect("tear");
    let spare = dir.path().join("segments").join("spare");
    fs::write(&spare, [0u8; 100]).expect("leftover spare");
    let (w, store, recovery) = log::open(dir.path(), SPARE_SEGMENT).expect("reopen");
    assert_eq!(recovery.truncated_bytes, SPARE_SEGMENT - end);
    assert_eq!(file_len(&active), end);
    assert!(!spare.exists(), "a leftover spare is removed at open");
    assert_eq!(w.next_seq(), 45);
    assert_eq!(seqs(&read_all(&store, 0)), (0..45).collect::<Vec<_>>());
}

#[test]
fn when_no_spare_can_be_made_segments_grow_as_written_and_nothing_fails() {
    const SEGMENT: u64 = 8 << 10;
    let dir = tempfile::tempdir().expect("tempdir");
    // A directory where the spare would go: neither removable as a leftover nor writable,
    // as a full disk would refuse it.
    let blocked = dir.path().join("segments").join("spare");
    fs::create_dir_all(blocked.join("x")).expect("block the spare");
    let (mut w, store, _) = log::open(dir.path(), SEGMENT).expect("open");
    for i in 0..50 {
        w.write_batch(&payloads(i * 10..i * 10 + 10, 200))
            .expect("write");
    }
    assert!(store.segments().len() > 5, "segments rolled over");
    // Every segment, the active one too, holds records only: nothing was preallocated.
    let on_disk: u64 = store.segments().iter().map(|s| file_len(&s.1)).sum();
    assert_eq!(on_disk, store.bytes());
    assert!(blocked.is_dir());
    drop((w, store));
    let (w, store, recovery) = log::open(dir.path(), SEGMENT).expect("reopen");
    assert_eq!(recovery, log::Recovery::default());
    assert_eq!(w.next_seq(), 500);
    assert_eq!(seqs(&read_all(&store, 0)), (0..500).collect::<Vec<_>>());
}

#[test]
fn no_spare_is_made_when_the_records_and_two_segments_would_pass_max_bytes() {
    const SEGMENT: u64 = 8 << 10;
    for (limit, spare_expected) in [(64u64 << 10, false), (u64::MAX, true)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut w, store, _) = log::open(dir.path(), SEGMENT).expect("open");
        w.limit_preallocation(limit);
        // 50 KiB of records: with a 64 KiB limit, two 8 KiB segments more would pass it.
        w.write_batch(&payloads(0..250, 200)).expect("write");
        assert!(store.bytes() > (64 << 10) - 2 * SEGMENT);
        if spare_expected {
            wait_for_spare(&mut w);
            continue;
        }
        for i in 0..10 {
            w.write_batch(&payloads(250 + i * 5..255 + i * 5, 200))
                .expect("write");
        }
        assert!(!w.spare_ready());
        assert!(!dir.path().join("segments").join("spare").exists());
        let on_disk: u64 = store.segments().iter().map(|s| file_len(&s.1)).sum();
        assert_eq!(on_disk, store.bytes());
    }
}

/// Whether a spare segment exists, or a segment is still preallocated (its length is a whole
/// `segment_bytes`, which 112-byte records after a 24-byte header never fill exactly).
fn preallocation_seen(dir: &Path, segment_bytes: u64) -> bool {
    fs::read_dir(dir.join("segments"))
        .expect("list")
        .filter_map(Result::ok)
        .any(|e| e.file_name() == "spare" || e.metadata().is_ok_and(|m| m.len() == segment_bytes))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_sync_outboxes_preallocate_segments() {
    for durability in [Durability::Sync, Durability::Async] {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = settings(dir.path());
        s.durability = durability;
        let outbox = Outbox::open(s, OutboxMetrics::unregistered()).expect("open");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let mut seen = false;
        let mut i = 0;
        // Sync: write until a spare shows up (it is made by a thread). Async: 40 writes of
        // ten segments in all, none of which may bring one.
        while !seen && std::time::Instant::now() < deadline {
            if durability == Durability::Async && i == 40 {
                break;
            }
            outbox
                .append(payloads(i * 10..i * 10 + 10, 100))
                .expect("append")
                .durable()
                .await
                .expect("durable");
            seen = preallocation_seen(dir.path(), 4096);
            i += 1;
        }
        outbox.close().await.expect("close");
        assert_eq!(seen, durability == Durability::Sync, "{durability:?}");
    }
}

#[test]
fn a_failed_write_into_a_preallocated_segment_is_undone_and_written_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut w, store, _) = writing_into_a_spare(dir.path(), 41);
    for what in ["write", "fsync"] {
        store.inject_faults(1);
        let err = w
            .write_batch(&payloads(41..45, 1000))
            .expect_err("injected failure");
        assert!(err.to_string().contains("injected"), "{what}: {err}");
    }
    assert_eq!(
        w.write_batch(&payloads(41..45, 1000))
            .expect("written again"),
        41..45
    );
    drop((w, store));
    let (w, store, recovery) = log::open(dir.path(), SPARE_SEGMENT).expect("reopen");
    assert_eq!(recovery, log::Recovery::default());
    assert_eq!(w.next_seq(), 45);
    let all = read_all(&store, 0);
    assert_eq!(seqs(&all), (0..45).collect::<Vec<_>>());
    assert!(all.iter().all(|r| r.payload == payload(r.seq, 1000)));
}

#[test]
fn a_failed_roll_into_the_spare_leaves_no_segment_behind_and_writing_goes_on() {
    // Fault points of the batch that rolls into the ready spare: the old segment's fsync,
    // then the spare's header write, header fsync and (after the rename) the directory
    // fsync. Each of the last three fails once; the spare is lost, not the records, and no
    // file is left under the next segment's name to collide with a later roll or read as a
    // segment at the next start.
    for skip in 1..4 {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut w, store, _) = log::open(dir.path(), SPARE_SEGMENT).expect("open");
        w.write_batch(&payloads(0..40, 1000)).expect("write");
        wait_for_spare(&mut w);
        fail_the_roll_then_write_on(dir.path(), SPARE_SEGMENT, w, store, skip);
    }
}

/// Fails the next batch, which rolls into a prepared next segment (a spare or a recycled
/// one), at fault point `skip`, once. Then checks that the segments are as before, with only
/// the active one on disk; that the batch is written again and more after it, through more
/// rolls; and that a reopen reads every record back, byte-exact.
fn fail_the_roll_then_write_on(
    dir: &Path,
    segment_bytes: u64,
    mut w: log::SegmentWriter,
    store: log::Store,
    skip: u32,
) {
    let next = w.next_seq();
    let segments_before = store.segments();
    store.inject_faults_after(skip, 1);
    let err = w
        .write_batch(&payloads(next..next + 5, 1000))
        .expect_err("injected failure");
    assert!(err.to_string().contains("injected"), "skip {skip}: {err}");
    assert_eq!(store.segments(), segments_before, "skip {skip}");
    let on_disk: Vec<_> = fs::read_dir(dir.join("segments"))
        .expect("list")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(on_disk.len(), 1, "skip {skip}: {on_disk:?}");
    assert_eq!(
        w.write_batch(&payloads(next..next + 5, 1000))
            .expect("again"),
        next..next + 5
    );
    assert_eq!(
        w.write_batch(&payloads(next + 5..200, 1000)).expect("on"),
        next + 5..200
    );
    let first = segments_before[0].0;
    drop((w, store));
    let (w, store, _) = log::open(dir, segment_bytes).expect("reopen");
    assert_eq!(w.next_seq(), 200, "skip {skip}");
    let all = read_all(&store, first);
    assert_eq!(seqs(&all), (first..200).collect::<Vec<_>>(), "skip {skip}");
    assert!(all.iter().all(|r| r.payload == payload(r.seq, 1000)));
}

fn inode(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).expect("stat").ino()
}

/// An outbox in `dir` with no zero-filled spares (as with `async`), so that every
/// preallocated segment is a recycled one, and one sink, `bus`, registered at 0.
fn recycling_outbox(dir: &Path, segment_bytes: u64) -> (log::SegmentWriter, log::Store) {
    let (mut w, store, _) = log::open(dir, segment_bytes).expect("open");
    w.limit_preallocation(0);
    assert_eq!(store.register("bus").expect("register"), 0);
    (w, store)
}

#[test]
fn a_passed_segment_is_recycled_and_its_old_records_are_no_loss() {
    const SEGMENT: u64 = 64 << 10;
    let frame = format::frame_len(1000);
    let dir = tempfile::tempdir().expect("tempdir");
    let recycled = dir.path().join("segments").join(spare::RECYCLED_FILE);
    let (mut w, store) = recycling_outbox(dir.path(), SEGMENT);
    w.write_batch(&payloads(0..150, 1000)).expect("write");
    let before = store.segments();
    assert_eq!(before.len(), 3, "{before:?}");
    let oldest = inode(&before[0].1);

    // Both full segments are passed: the first is kept (the second is no larger, so it is
    // deleted), and neither counts as outbox bytes any more.
    store.commit("bus", before[2].0).expect("commit");
    assert_eq!(segment_files(dir.path()), vec![before[2].0]);
    assert_eq!(inode(&recycled), oldest);
    let old_len = file_len(&recycled);
    assert_eq!(store.bytes(), file_len(&before[2].1));

    // The active segment grows as it is written, so the next write rolls into the recycled
    // one at once: same blocks, new name and header, old records past the new ones.
    w.write_batch(&payloads(150..160, 1000)).expect("write");
    let segments = store.segments();
    assert_eq!(
        segments.iter().map(|s| s.0).collect::<Vec<_>>(),
        vec![before[2].0, 150]
    );
    let active = segments[1].1.clone();
    assert_eq!(inode(&active), oldest);
    assert!(!recycled.exists());
    assert!(!dir.path().join("segments").join(spare::TAKEN_FILE).exists());
    assert_eq!(file_len(&active), old_len, "written in place");
    assert!(old_len > FILE_HEADER_LEN + 10 * frame);
    let all = read_all(&store, before[2].0);
    assert_eq!(seqs(&all), (before[2].0..160).collect::<Vec<_>>());
    assert!(all.iter().all(|r| r.payload == payload(r.seq, 1000)));
    // `ficus outbox status` counts the new records, not the old ones after them.
    assert_eq!(
        status(dir.path(), &[]).expect("status").bytes,
        store.bytes()
    );

    // A crash: the old records (seqs below the segment's first) end the log, are cut, and
    // are not reported as lost.
    drop((w, store));
    let (mut w, store, recovery) = log::open(dir.path(), SEGMENT).expect("reopen");
    assert_eq!(recovery, log::Recovery::default());
    assert_eq!(w.next_seq(), 160);
    assert_eq!(file_len(&active), FILE_HEADER_LEN + 10 * frame);
    let all = read_all(&store, before[2].0);
    assert_eq!(seqs(&all), (before[2].0..160).collect::<Vec<_>>());
    assert!(all.iter().all(|r| r.payload == payload(r.seq, 1000)));
    assert_eq!(
        w.write_batch(&payloads(160..161, 1000)).expect("write"),
        160..161
    );
}

#[test]
fn a_torn_record_over_a_recycled_segments_old_records_is_cut_and_counted() {
    const SEGMENT: u64 = 64 << 10;
    let frame = format::frame_len(1000);
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut w, store) = recycling_outbox(dir.path(), SEGMENT);
    w.write_batch(&payloads(0..70, 1000)).expect("write");
    let second = store.segments()[1].0;
    store.commit("bus", second).expect("commit");
    w.write_batch(&payloads(70..75, 1000)).expect("write");
    let active = store.segments().last().expect("segment").1.clone();
    assert_eq!(store.segments().last().expect("segment").0, 70);
    let len = file_len(&active);
    assert!(
        len > FILE_HEADER_LEN + 6 * frame,
        "writing into the recycled segment"
    );
    drop((w, store));
    // Half of the 76th record over the old records: a write torn by the crash.
    let mut record = Vec::new();
    format::encode_record(&mut record, 75, &payload(75, 1000));
    let at = FILE_HEADER_LEN + 5 * frame;
    let file = OpenOptions::new().write(true).open(&active).expect("open");
    std::os::unix::fs::FileExt::write_all_at(&file, &record[..record.len() / 2], at).expect("tear");
    drop(file);
    let (w, store, recovery) = log::open(dir.path(), SEGMENT).expect("reopen");
    assert_eq!(
        recovery.truncated_bytes,
        len - at,
        "a torn record is reported"
    );
    assert_eq!(w.next_seq(), 75);
    assert_eq!(seqs(&read_all(&store, 70)), (70..75).collect::<Vec<_>>());
}

#[test]
fn no_segment_is_kept_for_recycling_when_the_records_and_two_segments_would_pass_max_bytes() {
    for (limit, kept) in [(40u64 << 10, false), (u64::MAX, true)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut w, store) = recycling_outbox(dir.path(), 16 << 10);
        w.limit_recycling(limit);
        w.write_batch(&payloads(0..60, 1000)).expect("write");
        let segments = store.segments();
        store
            .commit("bus", segments.last().expect("segment").0)
            .expect("commit");
        assert_eq!(segment_files(dir.path()).len(), 1);
        let recycled = dir.path().join("segments").join(spare::RECYCLED_FILE);
        assert_eq!(recycled.exists(), kept, "limit {limit}");
    }
}

#[test]
fn a_restart_keeps_the_recycled_segment_and_writes_into_it() {
    const SEGMENT: u64 = 16 << 10;
    let dir = tempfile::tempdir().expect("tempdir");
    let segments = dir.path().join("segments");
    let (mut w, store) = recycling_outbox(dir.path(), SEGMENT);
    w.write_batch(&payloads(0..40, 1000)).expect("write");
    store.commit("bus", store.segments()[1].0).expect("commit");
    let recycled = inode(&segments.join(spare::RECYCLED_FILE));
    // A crash while the writer was installing it leaves it as `recycling`.
    fs::rename(
        segments.join(spare::RECYCLED_FILE),
        segments.join(spare::TAKEN_FILE),
    )
    .expect("rename");
    drop((w, store));

    let (mut w, store, recovery) = log::open(dir.path(), SEGMENT).expect("reopen");
    assert_eq!(recovery, log::Recovery::default());
    assert!(!segments.join(spare::TAKEN_FILE).exists());
    assert_eq!(inode(&segments.join(spare::RECYCLED_FILE)), recycled);
    // The recovered last segment grows as written, so the first write after the restart
    // moves into the recycled one.
    w.write_batch(&payloads(40..42, 1000)).expect("write");
    let active = store.segments().last().expect("segment").clone();
    assert_eq!(active.0, 40);
    assert_eq!(inode(&active.1), recycled);
    let first = store.first_seq();
    let all = read_all(&store, first);
    assert_eq!(seqs(&all), (first..42).collect::<Vec<_>>());
    assert!(all.iter().all(|r| r.payload == payload(r.seq, 1000)));
    // A spare being filled when the earlier run stopped is deleted rather than trusted.
    drop((w, store));
    fs::write(segments.join(spare::SPARE_FILE), [0u8; 100]).expect("leftover spare");
    drop(log::open(dir.path(), SEGMENT).expect("reopen"));
    assert!(!segments.join(spare::SPARE_FILE).exists());
}

#[test]
fn a_failed_roll_into_a_recycled_segment_leaves_no_file_behind_and_writing_goes_on() {
    // The fault points of the roll, as for a zero-filled spare: the old segment's fsync, then
    // the recycled segment's header write, header fsync and directory fsync. When one of the
    // last three fails, the recycled segment is deleted (it may hold the new header, under
    // either name), not the records.
    const SEGMENT: u64 = 64 << 10;
    for skip in 1..4 {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut w, store) = recycling_outbox(dir.path(), SEGMENT);
        w.write_batch(&payloads(0..70, 1000)).expect("write");
        store.commit("bus", store.segments()[1].0).expect("commit");
        fail_the_roll_then_write_on(dir.path(), SEGMENT, w, store, skip);
    }
}
