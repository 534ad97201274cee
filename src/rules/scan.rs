//! A checked JSON scanner: the value at a path of `.field`/`[index]` steps in a JSON document,
//! with the whole document checked as `serde_json::from_slice::<Value>` checks it, and nothing
//! built but the value found.
//!
//! The first placeholder into a body not parsed yet reads its value here (see
//! [`super::Captured::lookup`]). Its answer must be the full parse's: the same value, and a
//! refusal exactly where the full parse refuses. So it checks what serde_json 1 checks when it
//! builds a `Value` (no `arbitrary_precision`, no `float_roundtrip`, which ficus does not
//! enable):
//!
//! - the grammar of RFC 8259, strictly: no trailing commas, no leading zeros, no bare `.5` or
//!   `1.`, whitespace only ` `, `\t`, `\n`, `\r`, nothing but whitespace after the value;
//! - strings: UTF-8, no control characters below `0x20`, only the escapes JSON has, `\u`
//!   with four hex digits, surrogates paired (`\ud83d\ude00`), never alone;
//! - numbers: in the range of `f64` (`1e400` is refused, `1e-400` is `0`); a number with an
//!   exponent, or more than [`PLAIN_DIGITS`] integer digits, is checked by serde_json itself,
//!   on its own bytes;
//! - nesting: at most 127 arrays and objects inside one another (serde_json's limit of 128);
//! - an object's key given twice: the last one counts.
//!
//! The value found is handed to serde_json (its bytes only) to build, except a string without
//! escapes. The property tests below compare it with the full parse on random and mutated
//! documents, refusals included.

use std::ops::Range;

use serde_json::Value;

use super::template::Step;

/// The document is one the full parse refuses.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Refused;

/// serde_json's recursion budget: entering an array or object spends one, and reaching zero
/// is refused.
const DEPTH: u8 = 128;

/// A number without an exponent and with at most this many integer digits is below `1e300`,
/// so finite however serde_json rounds it; the others are checked by serde_json.
const PLAIN_DIGITS: usize = 300;

/// The value at `steps` in `json` (`null` when the document has none there), or [`Refused`]
/// when `serde_json::from_slice::<Value>(json)` fails.
pub(crate) fn find(json: &[u8], steps: &[Step]) -> Result<Value, Refused> {
    let mut s = Scanner {
        b: json,
        i: 0,
        found: None,
    };
    s.ws();
    s.value(Some(steps), DEPTH)?;
    s.ws();
    if s.i != json.len() {
        return Err(Refused);
    }
    match s.found {
        None => Ok(Value::Null),
        Some(range) => build(json.get(range).ok_or(Refused)?),
    }
}

/// Whether `json` is a document exactly as `serde_json::to_vec` writes the value that
/// `serde_json::from_slice::<Value>` reads from it, so that the bytes can stand for the value.
/// That is: no whitespace; object keys in strictly rising byte order (a `Value` map is sorted
/// and keeps one of each key); strings without escapes (serde_json writes their text back as
/// it is: what needs an escape cannot appear unescaped); integers of at most 18 digits (an
/// `i64` or `u64`, written back digit for digit), not `-0` (which reads as `-0.0`); no
/// fractions or exponents (their digits change); nesting within serde_json's limit. `false`
/// says nothing: many documents the full parse accepts are not in this form.
pub(crate) fn canonical(json: &[u8]) -> bool {
    let mut c = Canonical { b: json, i: 0 };
    c.value(DEPTH).is_some() && c.i == json.len()
}

struct Canonical<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Canonical<'a> {
    fn next(&mut self) -> Option<u8> {
        let c = *self.b.get(self.i)?;
        self.i += 1;
        Some(c)
    }

    fn value(&mut self, depth: u8) -> Option<()> {
        match *self.b.get(self.i)? {
            b'{' => self.object(depth),
            b'[' => self.array(depth),
            b'"' => self.string().map(|_| ()),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            b'-' | b'0'..=b'9' => self.integer(),
            _ => None,
        }
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        let end = self.i + word.len();
        (self.b.get(self.i..end)? == word).then(|| self.i = end)
    }

    fn object(&mut self, depth: u8) -> Option<()> {
        let depth = depth - 1;
        if depth == 0 {
            return None;
        }
        self.i += 1;
        if self.b.get(self.i) == Some(&b'}') {
            self.i += 1;
            return Some(());
        }
        let mut previous: Option<&[u8]> = None;
        loop {
            let key = self.string()?;
            if previous.is_some_and(|p| p >= key) {
                return None;
            }
            previous = Some(key);
            if self.next()? != b':' {
                return None;
            }
            self.value(depth)?;
            match self.next()? {
                b',' => {}
                b'}' => return Some(()),
                _ => return None,
            }
        }
    }

    fn array(&mut self, depth: u8) -> Option<()> {
        let depth = depth - 1;
        if depth == 0 {
            return None;
        }
        self.i += 1;
        if self.b.get(self.i) == Some(&b']') {
            self.i += 1;
            return Some(());
        }
        loop {
            self.value(depth)?;
            match self.next()? {
                b',' => {}
                b']' => return Some(()),
                _ => return None,
            }
        }
    }

    /// A string without escapes; its text.
    fn string(&mut self) -> Option<&'a [u8]> {
        let (text, end) = plain_string(self.b, self.i)?;
        self.i = end;
        Some(text)
    }

    fn integer(&mut self) -> Option<()> {
        let negative = self.b.get(self.i) == Some(&b'-');
        if negative {
            self.i += 1;
        }
        let start = self.i;
        while let Some(b'0'..=b'9') = self.b.get(self.i) {
            self.i += 1;
        }
        match self.b.get(start..self.i)? {
            [] => None,
            [b'0'] if negative => None,
            [b'0'] => Some(()),
            [b'0', ..] => None,
            digits if digits.len() > 18 => None,
            _ => Some(()),
        }
    }
}

/// The value of `bytes`, one JSON value already checked.
fn build(bytes: &[u8]) -> Result<Value, Refused> {
    if let [b'"', inner @ .., b'"'] = bytes {
        if !inner.contains(&b'\\') {
            return std::str::from_utf8(inner)
                .map(|s| Value::String(s.to_string()))
                .map_err(|_| Refused);
        }
    }
    serde_json::from_slice(bytes).map_err(|_| Refused)
}

/// The text of the JSON string whose opening quote is at `at` in `b`, and the index after its
/// closing quote, when it has no escapes (and is UTF-8, without control characters); `None`
/// otherwise.
pub(crate) fn plain_string(b: &[u8], at: usize) -> Option<(&[u8], usize)> {
    if b.get(at) != Some(&b'"') {
        return None;
    }
    let start = at + 1;
    let end = start + plain_len(b.get(start..)?);
    // Anything but the closing quote here is an escape, a control character or the end.
    if b.get(end) != Some(&b'"') {
        return None;
    }
    let text = b.get(start..end)?;
    if !text.is_ascii() {
        std::str::from_utf8(text).ok()?;
    }
    Some((text, end + 1))
}

/// How many bytes of `bytes` come before the first `"`, `\` or control character (below
/// `0x20`): the bytes a JSON string holds as they are. Eight at a time while it can, with the
/// test serde_json's own reader makes.
pub(crate) fn plain_len(bytes: &[u8]) -> usize {
    let mut i = 0;
    for chunk in bytes.chunks_exact(8) {
        let Ok(word) = <[u8; 8]>::try_from(chunk) else {
            break;
        };
        let flagged = special(u64::from_le_bytes(word), false);
        if flagged != 0 {
            return i + flagged.trailing_zeros() as usize / 8;
        }
        i += 8;
    }
    while let Some(&c) = bytes.get(i) {
        if c == b'"' || c == b'\\' || c < 0x20 {
            break;
        }
        i += 1;
    }
    i
}

struct Scanner<'a> {
    b: &'a [u8],
    i: usize,
    /// Where the wanted value is, once seen (the last one seen, for a key given twice).
    found: Option<Range<usize>>,
}

/// Eight bytes at once, for the string scan.
const ONES: u64 = u64::from_ne_bytes([1; 8]);
const HIGH: u64 = ONES << 7;

/// The high bit of each byte of `chars` (little-endian) that is `"`, `\` or a control
/// character, or (`ascii_too`) not ASCII. Only the lowest flagged byte is sure to be one (a
/// borrow can flag bytes above a real one), which is all that the callers use.
#[inline]
pub(crate) fn special(chars: u64, ascii_too: bool) -> u64 {
    let control = chars.wrapping_sub(ONES * 0x20) & !chars;
    let quote = chars ^ (ONES * u64::from(b'"'));
    let quote = quote.wrapping_sub(ONES) & !quote;
    let backslash = chars ^ (ONES * u64::from(b'\\'));
    let backslash = backslash.wrapping_sub(ONES) & !backslash;
    let high = if ascii_too { chars } else { 0 };
    (control | quote | backslash | high) & HIGH
}

impl Scanner<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.i += 1;
        Some(c)
    }

    fn ws(&mut self) {
        self.i = ws(self.b, self.i);
    }

    /// One value at `self.i`. `steps`: `None` when nothing in it is wanted, else the steps
    /// still to take from it (empty: this value is the one, and [`Scanner::found`] is set to it).
    fn value(&mut self, steps: Option<&[Step]>, depth: u8) -> Result<(), Refused> {
        let Some(steps) = steps else {
            self.i = skip(self.b, self.i, depth)?;
            return Ok(());
        };
        let start = self.i;
        let steps = Some(steps);
        match self.peek().ok_or(Refused)? {
            b'{' => self.object(steps, depth)?,
            b'[' => self.array(steps, depth)?,
            b'"' => {
                self.string()?;
            }
            b't' => self.i = literal(self.b, self.i, b"true")?,
            b'f' => self.i = literal(self.b, self.i, b"false")?,
            b'n' => self.i = literal(self.b, self.i, b"null")?,
            b'-' | b'0'..=b'9' => self.i = number(self.b, self.i)?,
            _ => return Err(Refused),
        }
        if let Some([]) = steps {
            self.found = Some(start..self.i);
        }
        Ok(())
    }
    /// Enters the object or array at `self.i` (its opening bracket), spending one of `depth`:
    /// the depth left inside, or `None` when it is empty (then passed over whole).
    fn open(&mut self, close: u8, depth: u8) -> Result<Option<u8>, Refused> {
        let depth = depth - 1;
        if depth == 0 {
            return Err(Refused);
        }
        self.i += 1;
        self.ws();
        if self.peek() == Some(close) {
            self.i += 1;
            return Ok(None);
        }
        Ok(Some(depth))
    }

    fn object(&mut self, steps: Option<&[Step]>, depth: u8) -> Result<(), Refused> {
        let Some(depth) = self.open(b'}', depth)? else {
            return Ok(());
        };
        let (field, rest) = match steps {
            Some([Step::Field(f), rest @ ..]) => (Some(f.as_bytes()), rest),
            _ => (None, &[][..]),
        };
        loop {
            if self.peek() != Some(b'"') {
                return Err(Refused);
            }
            let key = self.i;
            let escaped = self.string()?;
            let hit = match field {
                Some(f) => self.key_is(key + 1..self.i - 1, escaped, f)?,
                None => false,
            };
            self.ws();
            if self.next() != Some(b':') {
                return Err(Refused);
            }
            self.ws();
            if hit {
                // The last of a key given twice counts, whatever the earlier one held.
                self.found = None;
                self.value(Some(rest), depth)?;
            } else if self.peek() == Some(b'"') {
                // A string is passed over here rather than in a call to `skip`.
                self.string()?;
            } else {
                self.value(None, depth)?;
            }
            self.ws();
            match self.next() {
                Some(b',') => self.ws(),
                Some(b'}') => return Ok(()),
                _ => return Err(Refused),
            }
        }
    }

    /// Whether the key whose text (between the quotes) is at `raw` is `field`.
    fn key_is(&self, raw: Range<usize>, escaped: bool, field: &[u8]) -> Result<bool, Refused> {
        let Some(text) = self.b.get(raw.start..raw.end) else {
            return Err(Refused);
        };
        if !escaped {
            return Ok(text == field);
        }
        // Rare: decode the escapes as serde_json does (the string was checked already).
        let quoted = self.b.get(raw.start - 1..raw.end + 1).ok_or(Refused)?;
        let key: String = serde_json::from_slice(quoted).map_err(|_| Refused)?;
        Ok(key.as_bytes() == field)
    }

    fn array(&mut self, steps: Option<&[Step]>, depth: u8) -> Result<(), Refused> {
        let Some(depth) = self.open(b']', depth)? else {
            return Ok(());
        };
        let (index, rest) = match steps {
            Some([Step::Index(n), rest @ ..]) => (Some(*n), rest),
            _ => (None, &[][..]),
        };
        let mut i = 0;
        loop {
            if index == Some(i) {
                self.value(Some(rest), depth)?;
            } else {
                self.value(None, depth)?;
            }
            i += 1;
            self.ws();
            match self.next() {
                Some(b',') => self.ws(),
                Some(b']') => return Ok(()),
                _ => return Err(Refused),
            }
        }
    }

    /// A string at `self.i` (its opening quote); returns whether it has escapes.
    fn string(&mut self) -> Result<bool, Refused> {
        let (end, escaped) = string(self.b, self.i)?;
        self.i = end;
        Ok(escaped)
    }
}

/// The index of the first byte at or after `i` that is not whitespace.
#[inline(always)]
fn ws(b: &[u8], mut i: usize) -> usize {
    // Whitespace is at most ` `: one test passes over anything else.
    while let Some(&c) = b.get(i) {
        if c > b' ' || !matches!(c, b' ' | b'\n' | b'\t' | b'\r') {
            break;
        }
        i += 1;
    }
    i
}

/// The end of the value at `i` that nothing is wanted from, checked and passed over in one
/// loop rather than a call per value: most of a document is this. `depth`: the arrays and
/// objects that may still open inside one another, as in [`Scanner::value`]. Works on the
/// bytes and an index of its own (not the [`Scanner`]'s) so that both stay in registers.
fn skip(b: &[u8], mut i: usize, depth: u8) -> Result<usize, Refused> {
    // Whether each open container is an object, the outermost at 1; at most 127 are open
    // (serde_json's limit). In memory rather than bits in registers: it is read only when a
    // container ends, and the registers are wanted for the strings.
    let mut objects = [false; DEPTH as usize];
    let depth = usize::from(depth);
    let mut open = 0usize;
    let mut object = false;
    loop {
        // At a value.
        let c = *b.get(i).ok_or(Refused)?;
        if c == b'"' {
            i = string_end(b, i)?;
        } else if c.wrapping_sub(b'1') < 9 {
            // A number not starting with `0` or `-` (those are below): tested before the
            // containers, as documents hold more numbers than containers.
            i = number(b, i)?;
        } else if c == b'{' || c == b'[' {
            open += 1;
            if open >= depth {
                return Err(Refused);
            }
            object = c == b'{';
            *objects.get_mut(open).ok_or(Refused)? = object;
            i = ws(b, i + 1);
            // `}` and `]` are two after `{` and `[`.
            if b.get(i) != Some(&(c + 2)) {
                if object {
                    i = key(b, i)?;
                }
                continue;
            }
            i += 1;
            open -= 1;
            object = objects.get(open).copied().unwrap_or(false);
        } else {
            i = match c {
                b'-' | b'0'..=b'9' => number(b, i)?,
                b't' => literal(b, i, b"true")?,
                b'f' => literal(b, i, b"false")?,
                b'n' => literal(b, i, b"null")?,
                _ => return Err(Refused),
            };
        }
        // After a value: the next one in its container, or the container's end.
        loop {
            if open == 0 {
                return Ok(i);
            }
            i = ws(b, i);
            let c = *b.get(i).ok_or(Refused)?;
            i += 1;
            if c == b',' {
                // One space after the comma, as some writers put it, before the general case.
                if b.get(i) == Some(&b' ') {
                    i += 1;
                }
                i = ws(b, i);
                if object {
                    i = key(b, i)?;
                }
                break;
            }
            if c != if object { b'}' } else { b']' } {
                return Err(Refused);
            }
            open -= 1;
            object = objects.get(open).copied().unwrap_or(false);
        }
    }
}

/// An object key at `i` and its colon: where its value starts.
#[inline(always)]
fn key(b: &[u8], i: usize) -> Result<usize, Refused> {
    if b.get(i) != Some(&b'"') {
        return Err(Refused);
    }
    let mut i = string_end(b, i)?;
    // The colon right after the key, as most writers put it, before looking for whitespace.
    if b.get(i) != Some(&b':') {
        i = ws(b, i);
        if b.get(i) != Some(&b':') {
            return Err(Refused);
        }
    }
    Ok(ws(b, i + 1))
}

/// The end of the literal `word` at `i`.
#[inline(always)]
fn literal(b: &[u8], i: usize, word: &[u8]) -> Result<usize, Refused> {
    let end = i + word.len();
    if b.get(i..end) != Some(word) {
        return Err(Refused);
    }
    Ok(end)
}

/// The end (after the closing quote) of the string whose opening quote is at `at`, and
/// whether it has escapes. Inline, the usual case: eight bytes at a time up to the first
/// byte that needs a look, and when that is the closing quote (read from the word, not
/// loaded again), the string is plain ASCII and ends there. Anything else, or fewer than
/// eight bytes left, goes on in [`string_rest`].
#[inline(always)]
fn string(b: &[u8], at: usize) -> Result<(usize, bool), Refused> {
    let start = at + 1;
    let mut i = start;
    while let Some(chunk) = b.get(i..i + 8) {
        let Ok(word) = <[u8; 8]>::try_from(chunk) else {
            break;
        };
        let word = u64::from_le_bytes(word);
        let flagged = special(word, true);
        if flagged != 0 {
            let bit = flagged.trailing_zeros();
            i += bit as usize / 8;
            if (word >> (bit & !7)) as u8 == b'"' {
                return Ok((i + 1, false));
            }
            break;
        }
        i += 8;
    }
    string_rest(b, start, i)
}

/// [`string`] when it does not matter whether there are escapes: the end only. The same
/// loop rather than a call to [`string`] that drops the flag: carrying it through cost `skip`
/// about 15% more instructions (registers).
#[inline(always)]
fn string_end(b: &[u8], at: usize) -> Result<usize, Refused> {
    let start = at + 1;
    let mut i = start;
    while let Some(chunk) = b.get(i..i + 8) {
        let Ok(word) = <[u8; 8]>::try_from(chunk) else {
            break;
        };
        let word = u64::from_le_bytes(word);
        let flagged = special(word, true);
        if flagged != 0 {
            let bit = flagged.trailing_zeros();
            i += bit as usize / 8;
            if (word >> (bit & !7)) as u8 == b'"' {
                return Ok(i + 1);
            }
            break;
        }
        i += 8;
    }
    string_rest(b, start, i).map(|(end, _)| end)
}

/// For [`string_rest`]: when fewer than eight bytes are left from `i` (the last string of
/// a document), the end of the string if the first of them that needs a look is the closing
/// quote. They are read as one word, the last eight bytes of `b` shifted down so that the
/// byte at `i` comes first; the bytes shifted in are 0, which [`special`] flags as control
/// characters, so nothing past the end is taken for the string's.
fn tail_end(b: &[u8], i: usize) -> Option<usize> {
    let last = b.len().checked_sub(8)?;
    let shift = i.checked_sub(last).filter(|&n| n > 0 && n < 8)? * 8;
    let word = u64::from_le_bytes(<[u8; 8]>::try_from(b.get(last..)?).ok()?) >> shift;
    let bit = special(word, true).trailing_zeros();
    ((word >> (bit & !7)) as u8 == b'"').then(|| i + bit as usize / 8 + 1)
}

/// [`string`] from `i` on, where the text from `start` (after the opening quote) to `i` is
/// plain ASCII: escapes, control characters, UTF-8, the end of the document.
#[cold]
#[inline(never)]
fn string_rest(b: &[u8], start: usize, mut i: usize) -> Result<(usize, bool), Refused> {
    if let Some(end) = tail_end(b, i) {
        return Ok((end, false));
    }
    let mut escaped = false;
    let mut ascii = true;
    loop {
        // Eight bytes at a time to the next one that needs a look.
        while let Some(chunk) = b.get(i..i + 8) {
            let Ok(word) = <[u8; 8]>::try_from(chunk) else {
                break;
            };
            let flagged = special(u64::from_le_bytes(word), ascii);
            if flagged != 0 {
                i += flagged.trailing_zeros() as usize / 8;
                break;
            }
            i += 8;
        }
        let c = *b.get(i).ok_or(Refused)?;
        i += 1;
        match c {
            b'"' => break,
            b'\\' => {
                escaped = true;
                i = escape(b, i)?;
            }
            0..=0x1f => return Err(Refused),
            0x80.. => ascii = false,
            _ => {}
        }
    }
    if !ascii {
        // Escapes are ASCII, so the raw text is UTF-8 exactly when the parts between them
        // are, which is what serde_json checks.
        let raw = b.get(start..i - 1).ok_or(Refused)?;
        std::str::from_utf8(raw).map_err(|_| Refused)?;
    }
    Ok((i, escaped))
}

/// The end of the escape whose `\` is before `i`, as serde_json checks it for a string (not
/// bytes).
fn escape(b: &[u8], i: usize) -> Result<usize, Refused> {
    match *b.get(i).ok_or(Refused)? {
        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => Ok(i + 1),
        b'u' => {
            let n = hex4(b, i + 1)?;
            if (0xDC00..=0xDFFF).contains(&n) {
                return Err(Refused);
            }
            if !(0xD800..=0xDBFF).contains(&n) {
                return Ok(i + 5);
            }
            if b.get(i + 5..i + 7) != Some(&b"\\u"[..]) {
                return Err(Refused);
            }
            if !(0xDC00..=0xDFFF).contains(&hex4(b, i + 7)?) {
                return Err(Refused);
            }
            Ok(i + 11)
        }
        _ => Err(Refused),
    }
}

/// The four hex digits at `i`.
fn hex4(b: &[u8], i: usize) -> Result<u16, Refused> {
    let digits = b.get(i..i + 4).ok_or(Refused)?;
    let mut n = 0u16;
    for &c in digits {
        let digit = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            b'A'..=b'F' => c - b'A' + 10,
            _ => return Err(Refused),
        };
        n = n << 4 | u16::from(digit);
    }
    Ok(n)
}

/// The end of the number at `at`. Inline, the usual case: digits, not starting with `0`, no
/// fraction or exponent, at most [`PLAIN_DIGITS`] of them; the others in [`number_rest`].
#[inline(always)]
fn number(b: &[u8], at: usize) -> Result<usize, Refused> {
    if let Some(b'1'..=b'9') = b.get(at) {
        let mut i = at + 1;
        while let Some(b'0'..=b'9') = b.get(i) {
            i += 1;
        }
        if !matches!(b.get(i), Some(b'.' | b'e' | b'E')) && i - at <= PLAIN_DIGITS {
            return Ok(i);
        }
    }
    number_rest(b, at)
}

/// The index of the first byte at or after `i` that is not a digit.
fn digits(b: &[u8], mut i: usize) -> usize {
    while let Some(b'0'..=b'9') = b.get(i) {
        i += 1;
    }
    i
}

/// [`number`], any number.
#[cold]
#[inline(never)]
fn number_rest(b: &[u8], start: usize) -> Result<usize, Refused> {
    let mut i = start;
    if b.get(i) == Some(&b'-') {
        i += 1;
    }
    let integer = match b.get(i) {
        // One leading zero, and no digit after it (`01` is refused where it stands).
        Some(b'0') => 1,
        Some(b'1'..=b'9') => digits(b, i) - i,
        _ => return Err(Refused),
    };
    i += integer;
    if b.get(i) == Some(&b'.') {
        let end = digits(b, i + 1);
        if end == i + 1 {
            return Err(Refused);
        }
        i = end;
    }
    let mut plain = integer <= PLAIN_DIGITS;
    if let Some(b'e' | b'E') = b.get(i) {
        i += 1;
        if let Some(b'+' | b'-') = b.get(i) {
            i += 1;
        }
        let end = digits(b, i);
        if end == i {
            return Err(Refused);
        }
        i = end;
        plain = false;
    }
    if !plain {
        // Out of range or not is serde_json's call; the number alone parses as it does in
        // the document.
        let text = b.get(start..i).ok_or(Refused)?;
        serde_json::from_slice::<Value>(text).map_err(|_| Refused)?;
    }
    Ok(i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::template::descend;
    use proptest::prelude::*;

    /// What the full parse answers: the value at `steps`, or a refusal.
    fn full(json: &[u8], steps: &[Step]) -> Result<Value, Refused> {
        serde_json::from_slice::<Value>(json)
            .map(|v| descend(&v, steps).into_owned())
            .map_err(|_| Refused)
    }

    fn agree(json: &[u8], steps: &[Step]) {
        assert_eq!(
            find(json, steps),
            full(json, steps),
            "{:?} at {steps:?}",
            String::from_utf8_lossy(json)
        );
    }

    fn field(f: &str) -> Step {
        Step::Field(f.to_string())
    }

    fn paths() -> Vec<Vec<Step>> {
        vec![
            vec![field("id")],
            vec![field("a"), field("id")],
            vec![Step::Index(0)],
            vec![Step::Index(1), field("id")],
            vec![field("a"), Step::Index(0)],
            vec![field("id"), Step::Every],
        ]
    }

    /// When [`canonical`] says so, the bytes are what serde_json writes for their value.
    fn canonical_holds(json: &[u8]) {
        if canonical(json) {
            let value: Value = serde_json::from_slice(json).expect("canonical JSON parses");
            let written = serde_json::to_vec(&value).expect("serialises");
            assert_eq!(
                String::from_utf8_lossy(&written),
                String::from_utf8_lossy(json)
            );
        }
    }

    #[test]
    fn canonical_documents() {
        for doc in [
            "{}",
            "[]",
            "null",
            "0",
            "-7",
            "123456789012345678",
            "\"x\"",
            "{\"a\":1,\"b\":[true,false,null,\"\u{e9}\u{2028}\u{7f}\"],\"c\":{\"d\":{}}}",
            "{\"status\":\"accepted\"}",
            "{\"\":0,\"A\":1,\"a\":2,\"aa\":3,\"\u{e9}\":4}",
        ] {
            assert!(canonical(doc.as_bytes()), "{doc}");
            canonical_holds(doc.as_bytes());
        }
        let deep = format!("{}{}", "[".repeat(127), "]".repeat(127));
        assert!(canonical(deep.as_bytes()));
        canonical_holds(deep.as_bytes());
        for doc in [
            "",
            " {}",
            "{} ",
            "{\"a\": 1}",
            "[1, 2]",
            "{\"b\":1,\"a\":2}",
            "{\"a\":1,\"a\":2}",
            "\"a\\nb\"",
            "\"\\u0041\"",
            "{\"\\u0061\":1}",
            "-0",
            "01",
            "1.0",
            "1e2",
            "1234567890123456789",
            "[1,]",
            "nul",
            "{\"a\":1}x",
        ] {
            assert!(!canonical(doc.as_bytes()), "{doc:?}");
        }
        assert!(!canonical(b"\"\xff\""));
        let too_deep = format!("{}{}", "[".repeat(128), "]".repeat(128));
        assert!(!canonical(too_deep.as_bytes()));
    }

    #[test]
    fn plain_len_stops_at_the_first_byte_to_escape() {
        for len in 0..20 {
            for at in 0..=len {
                for special in [b'"', b'\\', 0x00, 0x1f] {
                    let mut bytes = vec![b'a'; len];
                    bytes.extend_from_slice("\u{e9}\u{7f}".as_bytes());
                    if at < len {
                        bytes[at] = special;
                        // Bytes after the first that would also stop it.
                        for later in bytes.iter_mut().skip(at + 1).step_by(3) {
                            *later = b'"';
                        }
                    }
                    let expected = if at < len { at } else { bytes.len() };
                    assert_eq!(plain_len(&bytes), expected, "{bytes:?}");
                }
            }
        }
    }

    #[test]
    fn nesting_limit_is_serde_jsons() {
        for n in 125..=130 {
            for (open, close) in [("[", "]"), ("{\"a\":", "}")] {
                let doc = format!("{}1{}", open.repeat(n), close.repeat(n));
                for steps in [vec![field("a")], vec![Step::Index(0)]] {
                    agree(doc.as_bytes(), &steps);
                }
            }
            let mixed = format!("{}{}", "[{\"a\":".repeat(n / 2), "}]".repeat(n / 2));
            agree(mixed.as_bytes(), &[field("a")]);
        }
    }

    #[test]
    fn numbers_as_serde_json_reads_them() {
        let long = "9".repeat(PLAIN_DIGITS);
        let longer = "9".repeat(PLAIN_DIGITS + 10);
        let past = format!("1{}", "0".repeat(308));
        let tiny = format!("0.{}1", "0".repeat(400));
        for n in [
            "0",
            "-0",
            "-0.0",
            "01",
            "-",
            "-a",
            "1.",
            ".5",
            "1.e3",
            "1e",
            "1e+",
            "1E-2",
            "+1",
            "1e308",
            "1e309",
            "1.7976931348623157e308",
            "1.7976931348623159e308",
            "-1e400",
            "1e-400",
            "0e99999999999",
            "1e99999999999",
            "18446744073709551615",
            "18446744073709551616",
            "-9223372036854775808",
            "-9223372036854775809",
            &long,
            &longer,
            &past,
            &tiny,
            "12.99",
            "1.5.3",
            "1 2",
        ] {
            for doc in [
                n.to_string(),
                format!("{{\"id\":{n}}}"),
                format!("{{\"x\":{n},\"id\":1}}"),
                format!("[{n}]"),
            ] {
                for steps in paths() {
                    agree(doc.as_bytes(), &steps);
                }
            }
        }
    }

    #[test]
    fn strings_as_serde_json_reads_them() {
        let bodies: Vec<Vec<u8>> = vec![
            br#"{"id":"a\"b\\c\/d\b\f\n\r\t"}"#.to_vec(),
            br#"{"id":"\u00e9\u20AC"}"#.to_vec(),
            br#"{"id":"\ud83d\ude00"}"#.to_vec(),
            br#"{"id":"\ud83d"}"#.to_vec(),
            br#"{"id":"\ud83dx"}"#.to_vec(),
            br#"{"id":"\ud83d\n"}"#.to_vec(),
            br#"{"id":"\ud83d\u0041"}"#.to_vec(),
            br#"{"id":"\ud83d\ud83d"}"#.to_vec(),
            br#"{"id":"\ude00"}"#.to_vec(),
            br#"{"id":"\u00"}"#.to_vec(),
            br#"{"id":"\u00g0"}"#.to_vec(),
            br#"{"id":"\x"}"#.to_vec(),
            br#"{"id":"\'"}"#.to_vec(),
            b"{\"id\":\"tab\there\"}".to_vec(),
            b"{\"id\":\"nul\x00\"}".to_vec(),
            b"{\"id\":\"del\x7f\"}".to_vec(),
            b"{\"id\":\"\xc3\xa9\"}".to_vec(),
            b"{\"id\":\"\xc3\"}".to_vec(),
            b"{\"id\":\"\xc3\\n\"}".to_vec(),
            b"{\"id\":\"\xed\xa0\x80\"}".to_vec(),
            b"{\"id\":\"\xc0\xaf\"}".to_vec(),
            b"{\"id\":\"\xf0\x9f\x98\x80 and a longer tail of text\"}".to_vec(),
            b"{\"x\":\"0123456789abcdef\xff0123456789\",\"id\":1}".to_vec(),
            br#"{"i\u0064":"escaped key","id":"plain"}"#.to_vec(),
            br#"{"id":"plain","i\u0064":"escaped key last"}"#.to_vec(),
            br#"{"i\u0064":1,"\ud800":2}"#.to_vec(),
            br#"{"id":"unterminated"#.to_vec(),
            br#"{"id":"long string that spans several eight-byte words \" with a quote"}"#.to_vec(),
        ];
        for body in &bodies {
            for steps in paths() {
                agree(body, &steps);
            }
        }
    }

    /// The string scan reads eight bytes at a time: each byte that needs a look (or a
    /// character it must check) at each offset of strings of up to 40 bytes, as a key and as
    /// a value, compact and spaced, and where the document ends within eight bytes.
    #[test]
    fn strings_across_word_boundaries() {
        let pieces: [&[u8]; 19] = [
            b"\"",
            b"\\\"",
            b"\\\\",
            b"\\n",
            b"\\u00e9",
            b"\\ud83d\\ude00",
            b"\\ud83d",
            b"\\x",
            b"\\",
            b"\x00",
            b"\x1f",
            b"\x7f",
            "\u{e9}".as_bytes(),
            "\u{20ac}".as_bytes(),
            "\u{1F600}".as_bytes(),
            b"\xc3",
            b"\xff",
            b"\xed\xa0\x80",
            b"\xe2\x82",
        ];
        for len in 0..40 {
            for at in 0..=len {
                for piece in pieces {
                    let mut text = vec![b'a'; len];
                    text.splice(at..at, piece.iter().copied());
                    let text = &text[..];
                    let docs: [&[&[u8]]; 6] = [
                        &[b"{\"id\":\"", text, b"\"}"],
                        &[b"{\"", text, b"\":1,\"id\":2}"],
                        &[b"[\"", text, b"\"]"],
                        &[b"\"", text, b"\""],
                        &[b"{\"x\": [\"", text, b"\", 1], \"id\": \"", text, b"\"}"],
                        &[b"{\"x\":{\"", text, b"\":[\"", text, b"\"]},\"id\":0}  "],
                    ];
                    for doc in docs {
                        let doc = doc.concat();
                        agree(&doc, &[field("id")]);
                        agree(&doc, &[Step::Index(0)]);
                    }
                }
            }
        }
    }

    #[test]
    fn grammar_as_serde_json_reads_it() {
        for doc in [
            "",
            " ",
            "{}",
            "[]",
            " { } ",
            "{,}",
            "[,]",
            "[1,]",
            "{\"id\":1,}",
            "{\"id\" 1}",
            "{\"id\":}",
            "{id:1}",
            "{1:1}",
            "[1 2]",
            "[1,,2]",
            "{\"id\":1}{}",
            "{\"id\":1} x",
            "{\"id\":1}\u{a0}",
            "\u{feff}{\"id\":1}",
            "{\"id\":tru}",
            "{\"id\":truex}",
            "{\"id\":nul}",
            "{\"id\":null}",
            "{\"id\":false}",
            "\t\r\n{\"id\"\t:\r\n[ 1 , 2 ]\n}\n",
            "{\"id\":{\"id\":[{\"id\":1}]}}",
            "{\"a\":{\"id\":1},\"a\":{}}",
            "{\"a\":{},\"a\":{\"id\":1}}",
            "[[1],[2,{\"id\":3}]]",
            "{\"id\":1",
            "[1",
            "[",
            "{",
            "\"",
        ] {
            for steps in paths() {
                agree(doc.as_bytes(), &steps);
            }
        }
    }

    /// JSON values with the strings and numbers where the scanner could go wrong.
    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            "[a-z\u{e9}\u{1F600}\"\\\\/\\x00-\\x1f\u{7f}\u{2028}]{0,12}".prop_map(Value::from),
            // Longer, with at most one character that needs a look, anywhere in it.
            "[a-z ]{0,30}[\u{e9}\u{1F600}\"\\\\\\x00-\\x1f]?[a-z]{0,10}".prop_map(Value::from),
        ];
        leaf.prop_recursive(5, 48, 5, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..5).prop_map(Value::from),
                proptest::collection::vec(
                    (
                        proptest::sample::select(vec!["a", "b", "id", "c", "\u{e9}"]),
                        inner
                    ),
                    0..5
                )
                .prop_map(|kv| Value::Object(
                    kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
                )),
            ]
        })
    }

    /// Values whose compact JSON is canonical: no floats, no strings that need escapes.
    fn plain_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            (-999_999_999_999_999_999i64..=999_999_999_999_999_999).prop_map(Value::from),
            "[a-z\u{e9}\u{1F600}/ ]{0,8}".prop_map(Value::from),
        ];
        leaf.prop_recursive(5, 48, 5, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..5).prop_map(Value::from),
                proptest::collection::vec(("[a-e\u{e9}]{0,3}", inner), 0..5)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    fn steps() -> impl Strategy<Value = Vec<Step>> {
        proptest::collection::vec(
            prop_oneof![
                proptest::sample::select(vec!["a", "b", "id", "\u{e9}"]).prop_map(field),
                (0usize..3).prop_map(Step::Index),
            ],
            1..4,
        )
    }

    /// Steps into `value` that mostly reach something: each selector picks a key or an index
    /// of what the steps reached so far; past a scalar, `extra` is appended (a miss).
    fn walk(value: &Value, selectors: &[usize], extra: &Step) -> Vec<Step> {
        let mut steps = Vec::new();
        let mut at = value;
        for &sel in selectors {
            match at {
                Value::Object(map) if !map.is_empty() => {
                    let Some((k, v)) = map.iter().nth(sel % map.len()) else {
                        break;
                    };
                    steps.push(field(k));
                    at = v;
                }
                Value::Array(items) if !items.is_empty() => {
                    steps.push(Step::Index(sel % items.len()));
                    at = &items[sel % items.len()];
                }
                _ => break,
            }
        }
        if steps.is_empty() || selectors.len() > 3 {
            steps.push(extra.clone());
        }
        steps
    }

    /// Bytes worth putting into a JSON document to break it, or not.
    const NOISE: &[u8] = b"{}[]\":,\\u0123456789abcdefABCDEF.-+eE \t\n\rtrnl\x00\x1f\x7f\xc3\xa9\xff\xed\xa0\xf0\x9f";

    #[derive(Clone, Debug)]
    enum Edit {
        Insert(usize, u8),
        Replace(usize, u8),
        Remove(usize),
        Truncate(usize),
        /// Copy a slice of the document elsewhere in it: repeated keys, stray values.
        Splice(usize, usize, usize),
        /// The character at a place written as `\u` escapes (a pair for one past U+FFFF).
        Escape(usize),
    }

    fn edit() -> impl Strategy<Value = Edit> {
        let byte = proptest::sample::select(NOISE.to_vec());
        prop_oneof![
            1 => (any::<usize>(), byte.clone()).prop_map(|(at, b)| Edit::Insert(at, b)),
            1 => (any::<usize>(), byte).prop_map(|(at, b)| Edit::Replace(at, b)),
            1 => any::<usize>().prop_map(Edit::Remove),
            1 => any::<usize>().prop_map(Edit::Truncate),
            1 => (any::<usize>(), 0usize..16, any::<usize>()).prop_map(|(f, n, t)| Edit::Splice(f, n, t)),
            3 => any::<usize>().prop_map(Edit::Escape),
        ]
    }

    fn apply(doc: &mut Vec<u8>, edit: &Edit) {
        let at = |i: usize, len: usize| if len == 0 { 0 } else { i % len };
        match *edit {
            Edit::Insert(i, b) => doc.insert(at(i, doc.len() + 1), b),
            Edit::Replace(i, b) => {
                if !doc.is_empty() {
                    let i = at(i, doc.len());
                    doc[i] = b;
                }
            }
            Edit::Remove(i) => {
                if !doc.is_empty() {
                    doc.remove(at(i, doc.len()));
                }
            }
            Edit::Truncate(i) => doc.truncate(at(i, doc.len() + 1)),
            Edit::Splice(from, n, to) => {
                let from = at(from, doc.len() + 1);
                let end = (from + n).min(doc.len());
                let piece = doc[from..end].to_vec();
                let to = at(to, doc.len() + 1);
                doc.splice(to..to, piece);
            }
            Edit::Escape(i) => {
                let Ok(text) = std::str::from_utf8(doc) else {
                    return;
                };
                // Characters inside strings, not part of an escape: escaping one keeps the
                // document valid (a broken one stays broken).
                let (mut inside, mut escape, mut hex) = (false, false, 0);
                let mut plain = Vec::new();
                for (at, c) in text.char_indices() {
                    if hex > 0 {
                        hex -= 1;
                    } else if escape {
                        escape = false;
                        hex = if c == 'u' { 4 } else { 0 };
                    } else if c == '\\' {
                        escape = inside;
                    } else if c == '"' {
                        inside = !inside;
                    } else if inside {
                        plain.push((at, c));
                    }
                }
                let Some(&(at, c)) = plain.get(at(i, plain.len())) else {
                    return;
                };
                let mut units = [0u16; 2];
                let escaped: String = c
                    .encode_utf16(&mut units)
                    .iter()
                    .map(|u| format!("\\u{u:04x}"))
                    .collect();
                doc.splice(at..at + c.len_utf8(), escaped.into_bytes());
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn valid_documents_agree(
            value in json_value(),
            selectors in proptest::collection::vec(any::<usize>(), 0..5),
            extra in steps(),
            pretty in any::<bool>(),
        ) {
            let steps = walk(&value, &selectors, &extra[0]);
            let text = if pretty {
                serde_json::to_vec_pretty(&value)
            } else {
                serde_json::to_vec(&value)
            };
            let text = text.map_err(|e| TestCaseError::fail(e.to_string()))?;
            agree(&text, &steps);
            canonical_holds(&text);
        }

        #[test]
        fn mutated_documents_agree(
            value in json_value(),
            selectors in proptest::collection::vec(any::<usize>(), 0..5),
            extra in steps(),
            edits in proptest::collection::vec(edit(), 1..4),
        ) {
            let steps = walk(&value, &selectors, &extra[0]);
            let mut doc = serde_json::to_vec(&value).map_err(|e| TestCaseError::fail(e.to_string()))?;
            for e in &edits {
                apply(&mut doc, e);
            }
            agree(&doc, &steps);
            canonical_holds(&doc);
        }

        #[test]
        fn escaped_documents_agree(
            value in json_value(),
            selectors in proptest::collection::vec(any::<usize>(), 0..5),
            extra in steps(),
            escapes in proptest::collection::vec(any::<usize>(), 1..8),
        ) {
            let steps = walk(&value, &selectors, &extra[0]);
            let mut doc = serde_json::to_vec(&value).map_err(|e| TestCaseError::fail(e.to_string()))?;
            for i in escapes {
                apply(&mut doc, &Edit::Escape(i));
            }
            agree(&doc, &steps);
            canonical_holds(&doc);
        }

        #[test]
        fn serde_jsons_own_output_is_canonical(value in plain_value()) {
            let text = serde_json::to_vec(&value).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(canonical(&text), "{}", String::from_utf8_lossy(&text));
            canonical_holds(&text);
        }

        #[test]
        fn random_bytes_agree(
            doc in proptest::collection::vec(proptest::sample::select(NOISE.to_vec()), 0..40),
            steps in steps(),
        ) {
            agree(&doc, &steps);
            canonical_holds(&doc);
        }
    }
}
