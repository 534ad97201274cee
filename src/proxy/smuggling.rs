//! Watches the bytes of an HTTP/1.1 connection for request heads with ambiguous framing.
//!
//! hyper resolves a request with both `Content-Length` and `Transfer-Encoding` the way RFC 9112
//! §6.1 allows (drops the length, closes the connection after answering), so by the time the
//! request reaches the stack the evidence is gone. The SPEC wants such requests refused with
//! `400` and never forwarded, so this reader follows the connection's framing (heads, then
//! `Content-Length` or chunked bodies) and flags the connection when a head carries both. A
//! flagged request is the last hyper serves on its connection, so the flag needs no request
//! identity: the [`super::framing`] layer refuses whatever it sees once the flag is up (with
//! pipelining, that can include requests sent just before the ambiguous one).
//!
//! Bodies are skipped by their framing, so body bytes that look like headers are never read as
//! a head. After an upgrade request, an HTTP/2 preface or anything unparsable the watcher
//! stops: what follows is not HTTP/1.1 heads, or hyper refuses it on its own.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Shared between the connection's reader and its stack.
#[derive(Debug, Default)]
pub struct AmbiguousFlag(AtomicBool);

impl AmbiguousFlag {
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    fn set(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Head,
    Body(u64),
    ChunkSize { size: u64, digits: bool, ext: bool },
    ChunkData(u64),
    ChunkEnd,
    Trailers { line: usize },
    Done,
}

/// Most header fields in one head; more and hyper refuses the request itself.
const MAX_HEADERS: usize = 128;

#[derive(Debug)]
pub struct Tracker {
    state: State,
    head: Vec<u8>,
    limit: usize,
}

impl Tracker {
    pub fn new(max_head_bytes: usize) -> Tracker {
        Tracker {
            state: State::Head,
            head: Vec::new(),
            limit: max_head_bytes,
        }
    }

    /// Follows `data`; returns true when a head with ambiguous framing was seen.
    pub fn feed(&mut self, mut data: &[u8]) -> bool {
        while !data.is_empty() {
            match self.state {
                State::Done => return false,
                State::Head if self.head.is_empty() => {
                    // The usual case: the whole head arrived in one read; judged in place.
                    let Some(end) = find_head_end(data, 0) else {
                        if data.len() > self.limit {
                            self.state = State::Done;
                            return false;
                        }
                        self.head.extend_from_slice(data);
                        return false;
                    };
                    let (ambiguous, next) = judge(&data[..end]);
                    self.state = next;
                    if ambiguous {
                        return true;
                    }
                    data = &data[end..];
                }
                State::Head => {
                    let start = self.head.len().saturating_sub(3);
                    self.head.extend_from_slice(data);
                    let Some(end) = find_head_end(&self.head, start) else {
                        if self.head.len() > self.limit {
                            self.state = State::Done;
                        }
                        return false;
                    };
                    let consumed_from_data = end - (self.head.len() - data.len());
                    let (ambiguous, next) = judge(&self.head[..end]);
                    self.head.clear();
                    self.state = next;
                    if ambiguous {
                        return true;
                    }
                    data = &data[consumed_from_data..];
                }
                State::Body(left) => {
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(data.len());
                    data = &data[n..];
                    let left = left - n as u64;
                    self.state = if left == 0 {
                        State::Head
                    } else {
                        State::Body(left)
                    };
                }
                State::ChunkData(left) => {
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(data.len());
                    data = &data[n..];
                    let left = left - n as u64;
                    self.state = if left == 0 {
                        State::ChunkEnd
                    } else {
                        State::ChunkData(left)
                    };
                }
                State::ChunkEnd => {
                    // The CRLF after chunk data; a bare LF is tolerated as hyper does.
                    match data[0] {
                        b'\r' => {}
                        b'\n' => {
                            self.state = State::ChunkSize {
                                size: 0,
                                digits: false,
                                ext: false,
                            }
                        }
                        _ => self.state = State::Done,
                    }
                    data = &data[1..];
                }
                State::ChunkSize { size, digits, ext } => {
                    let b = data[0];
                    data = &data[1..];
                    self.state = match (b, ext) {
                        (b'\n', _) if !digits => State::Done,
                        (b'\n', _) if size == 0 => State::Trailers { line: 0 },
                        (b'\n', _) => State::ChunkData(size),
                        (_, true) | (b'\r', _) => State::ChunkSize { size, digits, ext },
                        (b';' | b' ' | b'\t', false) => State::ChunkSize {
                            size,
                            digits,
                            ext: true,
                        },
                        (_, false) => match (b as char).to_digit(16) {
                            Some(d) => match size
                                .checked_mul(16)
                                .and_then(|s| s.checked_add(u64::from(d)))
                            {
                                Some(size) => State::ChunkSize {
                                    size,
                                    digits: true,
                                    ext: false,
                                },
                                None => State::Done,
                            },
                            None => State::Done,
                        },
                    };
                }
                State::Trailers { line } => {
                    let b = data[0];
                    data = &data[1..];
                    self.state = match b {
                        b'\n' if line == 0 => State::Head,
                        b'\n' => State::Trailers { line: 0 },
                        b'\r' => State::Trailers { line },
                        _ => State::Trailers { line: line + 1 },
                    };
                }
            }
        }
        false
    }
}

/// Judges one request head: whether its framing is ambiguous, and how its body is framed
/// (the state to follow it with).
fn judge(bytes: &[u8]) -> (bool, State) {
    match plain_framing(bytes) {
        Some(next) => (false, next),
        None => judge_parsed(bytes),
    }
}

/// The framing of the usual head, read line by line without parsing it: no
/// `Transfer-Encoding`, no `Upgrade`, at most one `Content-Length` (with a plain decimal
/// value), not `PRI` or `CONNECT`. Such a head cannot be ambiguous, and its body is what its
/// length says. `None` for any other head, including any line this reading is not sure of
/// (a name starting with `t` or `u`, a folded line, a stray `\r`): those go to
/// [`judge_parsed`], which parses the head as hyper does. A head hyper refuses closes the
/// connection, so what this says about a malformed head does not matter.
///
/// This is the per-request cost of the watcher, and a full parse of the head (which hyper
/// does again anyway) was most of it.
fn plain_framing(bytes: &[u8]) -> Option<State> {
    let mut request_line = true;
    let mut length = None;
    let mut start = 0;
    for end in memchr::memchr_iter(b'\n', bytes) {
        let line = &bytes[start..end];
        start = end + 1;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if request_line {
            // Empty lines before a request line are allowed (RFC 9112 §2.2).
            if line.is_empty() {
                continue;
            }
            if line.starts_with(b"PRI ") || line.starts_with(b"CONNECT ") {
                return None;
            }
            request_line = false;
            continue;
        }
        match line.first() {
            // The empty line that ends the head.
            None => break,
            Some(b'c' | b'C') => {
                let Some((name, value)) = line.split_at_checked(b"content-length".len()) else {
                    continue;
                };
                let Some(value) = value.strip_prefix(b":") else {
                    continue;
                };
                if !name.eq_ignore_ascii_case(b"content-length") {
                    continue;
                }
                let value = value.trim_ascii();
                if length.is_some()
                    || value.is_empty()
                    || value.len() > 19
                    || !value.iter().all(u8::is_ascii_digit)
                {
                    return None;
                }
                length = Some(value.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')));
            }
            Some(b't' | b'T' | b'u' | b'U' | b' ' | b'\t' | b'\r') => return None,
            Some(_) => {}
        }
    }
    Some(match length {
        None | Some(0) => State::Head,
        Some(n) => State::Body(n),
    })
}

/// [`judge`] by a full parse of the head.
fn judge_parsed(bytes: &[u8]) -> (bool, State) {
    // Empty lines before a request line are allowed (RFC 9112 §2.2).
    let trimmed = bytes
        .iter()
        .position(|b| *b != b'\r' && *b != b'\n')
        .unwrap_or(bytes.len());
    if trimmed == bytes.len() {
        return (false, State::Head);
    }
    // Uninitialised slots: zeroing 128 of them would cost more than parsing a small head.
    let mut headers =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut []);
    match request.parse_with_uninit_headers(&bytes[trimmed..], &mut headers) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return (false, State::Done),
    }
    if request.method == Some("PRI") || request.method == Some("CONNECT") {
        return (false, State::Done);
    }
    let mut length: Option<&[u8]> = None;
    let mut lengths_differ = false;
    let mut chunked = None;
    let mut upgrade = false;
    for h in request.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            match length {
                Some(prev) if prev != h.value => lengths_differ = true,
                _ => length = Some(h.value),
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            let last = h.value.rsplit(|b| *b == b',').next().unwrap_or(&[]);
            chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if h.name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        }
    }
    if length.is_some() && chunked.is_some() {
        return (true, State::Done);
    }
    let next = match (chunked, length) {
        _ if upgrade || lengths_differ => State::Done,
        (Some(true), _) => State::ChunkSize {
            size: 0,
            digits: false,
            ext: false,
        },
        (Some(false), _) => State::Done,
        (None, Some(len)) => match std::str::from_utf8(len)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
        {
            Some(0) => State::Head,
            Some(n) => State::Body(n),
            None => State::Done,
        },
        (None, None) => State::Head,
    };
    (false, next)
}

/// The index just past the first `\r\n\r\n` (or `\n\n`) at or after `from`.
fn find_head_end(buf: &[u8], from: usize) -> Option<usize> {
    memchr::memchr_iter(b'\n', buf.get(from..)?).find_map(|i| {
        let i = from + i;
        match (buf.get(i + 1), buf.get(i + 2)) {
            (Some(b'\n'), _) => Some(i + 2),
            (Some(b'\r'), Some(b'\n')) => Some(i + 3),
            _ => None,
        }
    })
}

pin_project! {
    /// A connection whose incoming bytes pass through a [`Tracker`].
    pub struct Watched<IO> {
        #[pin]
        io: IO,
        tracker: Tracker,
        flag: Arc<AmbiguousFlag>,
    }
}

impl<IO> Watched<IO> {
    pub fn new(io: IO, flag: Arc<AmbiguousFlag>, max_head_bytes: usize) -> Self {
        Watched {
            io,
            tracker: Tracker::new(max_head_bytes),
            flag,
        }
    }
}

impl<IO: AsyncRead> AsyncRead for Watched<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        ready!(this.io.poll_read(cx, buf))?;
        if this.tracker.state != State::Done && this.tracker.feed(&buf.filled()[before..]) {
            this.flag.set();
        }
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncWrite> AsyncWrite for Watched<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `wire` in pieces of every size from 1 to 7 bytes and whole; all must agree.
    fn verdict(wire: &[u8]) -> bool {
        let whole = Tracker::new(64 * 1024).feed(wire);
        for step in 1..8 {
            let mut t = Tracker::new(64 * 1024);
            let mut seen = false;
            for piece in wire.chunks(step) {
                seen |= t.feed(piece);
            }
            assert_eq!(seen, whole, "step {step}");
        }
        whole
    }

    #[test]
    fn flags_length_and_chunked_together() {
        assert!(verdict(b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"));
        assert!(verdict(
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"
        ));
    }

    #[test]
    fn flags_an_ambiguous_head_after_normal_requests() {
        let mut wire = Vec::new();
        wire.extend_from_slice(b"GET /a HTTP/1.1\r\nhost: a\r\n\r\n");
        wire.extend_from_slice(b"POST /b HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\n\r\nabc");
        wire.extend_from_slice(b"POST /c HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n0\r\nx-trailer: 1\r\n\r\n");
        assert!(!verdict(&wire));
        wire.extend_from_slice(
            b"POST /d HTTP/1.1\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n",
        );
        assert!(verdict(&wire));
    }

    #[test]
    fn bodies_that_look_like_heads_are_not_heads() {
        let body =
            b"\r\n\r\nPOST / HTTP/1.1\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n";
        let mut wire = format!(
            "POST /upload HTTP/1.1\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        wire.extend_from_slice(body);
        wire.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        assert!(!verdict(&wire));

        let mut chunked = b"POST /upload HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
        chunked.extend_from_slice(format!("{:x}\r\n", body.len()).as_bytes());
        chunked.extend_from_slice(body);
        chunked.extend_from_slice(b"\r\n0\r\n\r\nGET / HTTP/1.1\r\n\r\n");
        assert!(!verdict(&chunked));
    }

    #[test]
    fn stops_following_after_an_upgrade_or_http2() {
        let mut wire =
            b"GET /ws HTTP/1.1\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n".to_vec();
        wire.extend_from_slice(b"\x81\x05content-length: 1\r\ntransfer-encoding: chunked\r\n\r\n");
        assert!(!verdict(&wire));
        assert!(!verdict(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12content-length: 1\r\ntransfer-encoding: chunked\r\n\r\n"));
    }
    /// The line reading of the usual head says what the full parse says, for every head
    /// httparse (hyper's parser) accepts; heads it refuses are closed by hyper whatever the
    /// watcher thinks.
    #[test]
    fn the_line_reading_agrees_with_the_full_parse() {
        use proptest::prelude::*;
        const REQUEST_LINES: &[&str] = &[
            "GET / HTTP/1.1",
            "POST /orders?x=1 HTTP/1.1",
            "PRI * HTTP/2.0",
            "CONNECT a:443 HTTP/1.1",
            "PRIX / HTTP/1.1",
        ];
        const FIELDS: &[&str] = &[
            "host: a",
            "Content-Length: 5",
            "content-length:7",
            "CONTENT-LENGTH:  12 ",
            "Content-Length: 0",
            "Content-Length: 05",
            "Content-Length: +5",
            "Content-Length: 5, 5",
            "Content-Length: 99999999999999999999",
            "Content-Length: 18446744073709551615",
            "Content-Length : 5",
            "content-lengthx: 3",
            "content-len: 3",
            "Transfer-Encoding: chunked",
            "transfer-encoding: gzip, chunked",
            "transfer-encoding: chunked, gzip",
            "TE: trailers",
            "Upgrade: websocket",
            "upgrade-insecure-requests: 1",
            "connection: keep-alive",
            "cookie: a=b; content-length: 9",
            "x-a: transfer-encoding: chunked",
            " folded: line",
            "\tfolded",
            "c",
            "C:",
        ];
        let head = (
            0..REQUEST_LINES.len(),
            proptest::collection::vec((0..FIELDS.len(), any::<bool>()), 0..6),
            any::<bool>(),
        );
        proptest!(ProptestConfig::with_cases(4000), |((line, fields, lf_only) in head)| {
            let eol = if lf_only { "\n" } else { "\r\n" };
            let mut text = format!("{}{eol}", REQUEST_LINES[line]);
            for (field, bare_lf) in fields {
                text.push_str(FIELDS[field]);
                text.push_str(if bare_lf { "\n" } else { eol });
            }
            text.push_str(eol);
            let bytes = text.as_bytes();
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let parsed = httparse::Request::new(&mut headers).parse(bytes);
            if matches!(parsed, Ok(httparse::Status::Complete(_))) {
                prop_assert_eq!(judge(bytes), judge_parsed(bytes), "{:?}", text);
            }
            prop_assert_eq!(find_head_end(bytes, 0), Some(bytes.len()), "{:?}", text);
        });
    }
}
