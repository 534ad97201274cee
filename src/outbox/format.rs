//! Byte layouts of the outbox files, and the pure functions that encode and check them. No IO
//! here except [`scan`], which reads a file front to back; see the module docs of
//! [`crate::outbox`] for what the layouts mean and why.

use std::io::{self, Read};

/// First bytes of a segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"FICUSSEG";
/// First bytes of a dead-letter or replay file.
pub const DEAD_MAGIC: [u8; 8] = *b"FICUSDLQ";
/// First bytes of a cursor file.
pub const CURSOR_MAGIC: [u8; 8] = *b"FICUSCUR";
/// Version of all three layouts. A file of another version is refused, never guessed at.
pub const VERSION: u32 = 1;

/// `magic [8] | version u32 LE | first_seq u64 LE | crc32 u32 LE` (crc over the first 20 bytes).
pub const FILE_HEADER_LEN: u64 = 24;
/// `len u32 LE | crc32 u32 LE | seq u64 LE`, then `len` payload bytes. The crc covers `len`,
/// `seq` and the payload, so a damaged length is caught like damaged data.
pub const RECORD_HEADER_LEN: u64 = 16;
/// A cursor file is exactly this long: `magic [8] | version u32 | next u64 | crc32 u32`.
pub const CURSOR_LEN: usize = 24;

/// Bytes a payload of `payload_len` bytes takes in a segment.
pub fn frame_len(payload_len: usize) -> u64 {
    RECORD_HEADER_LEN + payload_len as u64
}

fn crc_of(parts: &[&[u8]]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for p in parts {
        h.update(p);
    }
    h.finalize()
}

/// The header every segment and dead-letter file starts with.
pub fn encode_header(magic: [u8; 8], first_seq: u64) -> [u8; FILE_HEADER_LEN as usize] {
    let mut out = [0u8; FILE_HEADER_LEN as usize];
    out[..8].copy_from_slice(&magic);
    out[8..12].copy_from_slice(&VERSION.to_le_bytes());
    out[12..20].copy_from_slice(&first_seq.to_le_bytes());
    let crc = crc_of(&[&out[..20]]);
    out[20..24].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Why a file header was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderProblem {
    /// Fewer bytes than a header: the file was being created when the process stopped.
    Short(usize),
    /// A whole header that is not ours, of another version, or damaged.
    Invalid(String),
}

impl std::fmt::Display for HeaderProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeaderProblem::Short(n) => {
                write!(f, "header cut short ({n} of {FILE_HEADER_LEN} bytes)")
            }
            HeaderProblem::Invalid(why) => f.write_str(why),
        }
    }
}

/// Checks a file header; returns its `first_seq`.
pub fn decode_header(buf: &[u8], magic: [u8; 8]) -> Result<u64, HeaderProblem> {
    if buf.len() < FILE_HEADER_LEN as usize {
        return Err(HeaderProblem::Short(buf.len()));
    }
    if buf[..8] != magic {
        return Err(HeaderProblem::Invalid(format!(
            "bad magic {:?} (expected {:?})",
            String::from_utf8_lossy(&buf[..8]),
            String::from_utf8_lossy(&magic)
        )));
    }
    let crc = u32_at(buf, 20);
    if crc != crc_of(&[&buf[..20]]) {
        return Err(HeaderProblem::Invalid("header checksum mismatch".into()));
    }
    let version = u32_at(buf, 8);
    if version != VERSION {
        return Err(HeaderProblem::Invalid(format!(
            "format version {version}, this ficus reads version {VERSION}"
        )));
    }
    Ok(u64_at(buf, 12))
}

/// The 12 bytes a record's crc covers before its payload, in one piece: one short update
/// of the checksum rather than two.
fn len_and_seq(len: [u8; 4], seq: [u8; 8]) -> [u8; 12] {
    let mut out = [0; 12];
    out[..4].copy_from_slice(&len);
    out[4..].copy_from_slice(&seq);
    out
}

/// Appends one framed record to `out`.
pub fn encode_record(out: &mut Vec<u8>, seq: u64, payload: &[u8]) {
    // The caller refuses payloads over u32::MAX before they get here (OutboxError::TooLarge).
    let len = u32::try_from(payload.len())
        .unwrap_or(u32::MAX)
        .to_le_bytes();
    let seq_bytes = seq.to_le_bytes();
    let crc = crc_of(&[&len_and_seq(len, seq_bytes), payload]);
    out.extend_from_slice(&len);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&seq_bytes);
    out.extend_from_slice(payload);
}

/// The outcome of decoding one record at the start of a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// A whole record whose checksum matches. `payload` is a range of the buffer.
    Record {
        seq: u64,
        payload: std::ops::Range<usize>,
        frame: usize,
    },
    /// The buffer holds only the first part of a record; `need` is the whole frame's length.
    Incomplete { need: u64 },
    /// The bytes are not a record.
    Corrupt(String),
}

/// Decodes the record at the start of `buf`.
pub fn decode_record(buf: &[u8]) -> Decoded {
    let header = RECORD_HEADER_LEN as usize;
    if buf.len() < header {
        return Decoded::Incomplete {
            need: RECORD_HEADER_LEN,
        };
    }
    let len = u32_at(buf, 0);
    let frame = RECORD_HEADER_LEN + u64::from(len);
    // On 64-bit targets every u32 length fits a usize; on others a huge one cannot be ours.
    let Ok(frame_usize) = usize::try_from(frame) else {
        return Decoded::Corrupt(format!("record length {len} does not fit in memory"));
    };
    if buf.len() < frame_usize {
        return Decoded::Incomplete { need: frame };
    }
    let stored = u32_at(buf, 4);
    let payload = header..frame_usize;
    let actual = crc_of(&[
        &len_and_seq(len.to_le_bytes(), u64_at(buf, 8).to_le_bytes()),
        &buf[payload.clone()],
    ]);
    if stored != actual {
        return Decoded::Corrupt(format!(
            "record checksum mismatch (stored {stored:#010x}, computed {actual:#010x})"
        ));
    }
    Decoded::Record {
        seq: u64_at(buf, 8),
        payload,
        frame: frame_usize,
    }
}

/// A cursor file's whole content.
pub fn encode_cursor(next: u64) -> [u8; CURSOR_LEN] {
    let mut out = [0u8; CURSOR_LEN];
    out[..8].copy_from_slice(&CURSOR_MAGIC);
    out[8..12].copy_from_slice(&VERSION.to_le_bytes());
    out[12..20].copy_from_slice(&next.to_le_bytes());
    let crc = crc_of(&[&out[..20]]);
    out[20..24].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Checks a cursor file's content; returns the cursor.
pub fn decode_cursor(buf: &[u8]) -> Result<u64, String> {
    if buf.len() != CURSOR_LEN {
        return Err(format!(
            "{} bytes, a cursor file has {CURSOR_LEN}",
            buf.len()
        ));
    }
    // Same layout as a file header, with its own magic.
    decode_header(buf, CURSOR_MAGIC).map_err(|p| p.to_string())
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[at..at + 4]);
    u32::from_le_bytes(b)
}

fn u64_at(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_le_bytes(b)
}

/// How a front-to-back [`scan`] of the records after a header ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanEnd {
    /// Whole, valid records seen.
    pub records: u64,
    /// Offset just past the last valid record: where a torn tail is cut.
    pub good_len: u64,
    /// The seq after the last valid record (only meaningful with an expected first seq).
    pub next_seq: u64,
    /// Why the scan stopped before the end of the file, if it did.
    pub stopped: Option<String>,
    /// Whether it stopped at a whole, valid record with an earlier seq than expected: in the
    /// last segment, the old records of a recycled segment that new ones have not yet
    /// overwritten (see the `spare` module), not damage.
    pub behind: bool,
}

/// Chunk size of scans: large enough that a segment of small records is a few reads.
const SCAN_CHUNK: usize = 1 << 20;

/// Reads records from `r` (positioned just after the header, at byte `start`) to the end,
/// calling `visit` for each valid one. Stops at the first record that is incomplete, fails its
/// checksum, or (with `expect_seq`) breaks the run of consecutive seqs. IO errors are returned;
/// bad bytes are not errors but a stop, which the caller judges (a torn tail, or corruption).
pub fn scan(
    r: &mut impl Read,
    start: u64,
    expect_seq: Option<u64>,
    mut visit: impl FnMut(u64, &[u8]),
) -> io::Result<ScanEnd> {
    let mut buf: Vec<u8> = Vec::with_capacity(SCAN_CHUNK);
    let mut pos = 0usize;
    let mut end = ScanEnd {
        records: 0,
        good_len: start,
        next_seq: expect_seq.unwrap_or(0),
        stopped: None,
        behind: false,
    };
    let mut eof = false;
    loop {
        match decode_record(&buf[pos..]) {
            Decoded::Record {
                seq,
                payload,
                frame,
            } => {
                if expect_seq.is_some() && seq != end.next_seq {
                    end.behind = seq < end.next_seq;
                    end.stopped = Some(format!(
                        "record has seq {seq} where seq {} was expected",
                        end.next_seq
                    ));
                    return Ok(end);
                }
                visit(seq, &buf[pos + payload.start..pos + payload.end]);
                pos += frame;
                end.records += 1;
                end.good_len += frame as u64;
                end.next_seq = seq.wrapping_add(1);
            }
            Decoded::Corrupt(why) => {
                end.stopped = Some(why);
                return Ok(end);
            }
            Decoded::Incomplete { need } => {
                let have = (buf.len() - pos) as u64;
                if eof {
                    if have > 0 {
                        end.stopped = Some(format!(
                            "torn record: {have} bytes at the end, the record needs {need}"
                        ));
                    }
                    return Ok(end);
                }
                buf.drain(..pos);
                pos = 0;
                // Read at most a chunk at a time: a damaged length must not allocate gigabytes.
                let want = usize::try_from(need - have)
                    .unwrap_or(usize::MAX)
                    .clamp(1, SCAN_CHUNK)
                    .max(SCAN_CHUNK / 2);
                let old = buf.len();
                buf.resize(old + want, 0);
                let n = read_full(r, &mut buf[old..])?;
                buf.truncate(old + n);
                eof = n < want;
            }
        }
    }
}

/// Reads until `buf` is full or the reader ends; returns the bytes read.
pub fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Sink names become file names: letters, digits, `-` and `_` (the config's own rule), so a
/// name can neither escape the directory nor be mistaken for a replay file's suffix.
pub fn valid_sink(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
}

/// Segment files are named by their first seq, zero-padded so they sort by name.
pub fn segment_file_name(first_seq: u64) -> String {
    format!("{first_seq:020}.seg")
}

pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".seg")?;
    if digits.len() != 20 || !digits.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: u64, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        encode_record(&mut v, seq, payload);
        v
    }

    #[test]
    fn a_record_round_trips_and_its_frame_is_header_plus_payload() {
        for payload in [&b""[..], b"x", &[7u8; 5000][..]] {
            let buf = record(42, payload);
            assert_eq!(buf.len() as u64, frame_len(payload.len()));
            match decode_record(&buf) {
                Decoded::Record {
                    seq,
                    payload: range,
                    frame,
                } => {
                    assert_eq!(seq, 42);
                    assert_eq!(&buf[range], payload);
                    assert_eq!(frame, buf.len());
                }
                other => panic!("expected a record, got {other:?}"),
            }
        }
    }

    #[test]
    fn every_single_byte_change_of_a_record_is_detected() {
        let buf = record(7, b"hello, outbox");
        for i in 0..buf.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut bad = buf.clone();
                bad[i] ^= flip;
                match decode_record(&bad) {
                    Decoded::Record { .. } => panic!("byte {i} ^ {flip:#x} went unnoticed"),
                    Decoded::Incomplete { .. } | Decoded::Corrupt(_) => {}
                }
            }
        }
    }

    #[test]
    fn a_cut_record_is_incomplete_not_corrupt() {
        let buf = record(1, &[1u8; 100]);
        for cut in 0..buf.len() {
            assert!(
                matches!(decode_record(&buf[..cut]), Decoded::Incomplete { .. }),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn headers_are_checked_for_magic_version_and_checksum() {
        let h = encode_header(SEGMENT_MAGIC, 99);
        assert_eq!(decode_header(&h, SEGMENT_MAGIC), Ok(99));
        assert!(matches!(
            decode_header(&h, DEAD_MAGIC),
            Err(HeaderProblem::Invalid(_))
        ));
        assert_eq!(
            decode_header(&h[..10], SEGMENT_MAGIC),
            Err(HeaderProblem::Short(10))
        );
        for i in 0..h.len() {
            let mut bad = h;
            bad[i] ^= 0x10;
            assert!(decode_header(&bad, SEGMENT_MAGIC).is_err(), "byte {i}");
        }
        let mut v2 = h;
        v2[8..12].copy_from_slice(&2u32.to_le_bytes());
        let crc = crc_of(&[&v2[..20]]);
        v2[20..24].copy_from_slice(&crc.to_le_bytes());
        let err = decode_header(&v2, SEGMENT_MAGIC).expect_err("version 2 is refused");
        assert!(err.to_string().contains("version 2"), "{err}");
    }

    #[test]
    fn cursor_files_round_trip_and_damage_is_reported() {
        let c = encode_cursor(123_456);
        assert_eq!(decode_cursor(&c), Ok(123_456));
        assert!(decode_cursor(&c[..23]).is_err());
        let mut bad = c;
        bad[14] ^= 1;
        assert!(decode_cursor(&bad).is_err());
    }

    #[test]
    fn scan_stops_at_a_torn_tail_and_at_a_seq_gap() {
        let mut file = Vec::new();
        for seq in 10..20 {
            encode_record(&mut file, seq, &vec![seq as u8; seq as usize * 3]);
        }
        let whole = file.len() as u64;
        let end = scan(&mut &file[..], 0, Some(10), |_, _| {}).expect("in-memory read");
        assert_eq!((end.records, end.good_len, end.next_seq), (10, whole, 20));
        assert_eq!(end.stopped, None);

        let torn = &file[..file.len() - 3];
        let end = scan(&mut &torn[..], 0, Some(10), |_, _| {}).expect("in-memory read");
        assert_eq!(end.records, 9);
        assert!(end.stopped.as_deref().unwrap_or("").contains("torn"));

        let end = scan(&mut &file[..], 0, Some(11), |_, _| {}).expect("in-memory read");
        assert_eq!(end.records, 0);
        assert!(end.stopped.as_deref().unwrap_or("").contains("seq 10"));
    }

    #[test]
    fn scan_does_not_allocate_for_a_huge_damaged_length() {
        let mut file = Vec::new();
        encode_record(&mut file, 0, b"ok");
        // A header claiming a 4 GiB payload, followed by nothing.
        file.extend_from_slice(&u32::MAX.to_le_bytes());
        file.extend_from_slice(&[0u8; 12]);
        let end = scan(&mut &file[..], 0, Some(0), |_, _| {}).expect("in-memory read");
        assert_eq!(end.records, 1);
        assert!(end.stopped.is_some());
    }

    #[test]
    fn names() {
        assert_eq!(segment_file_name(5), "00000000000000000005.seg");
        assert_eq!(
            parse_segment_file_name(&segment_file_name(u64::MAX)),
            Some(u64::MAX)
        );
        assert_eq!(parse_segment_file_name("5.seg"), None);
        assert_eq!(parse_segment_file_name("0000000000000000000x.seg"), None);
        assert!(valid_sink("bus-1_a"));
        for bad in ["", "a.b", "../x", "a/b", "a b"] {
            assert!(!valid_sink(bad), "{bad:?}");
        }
    }
}
