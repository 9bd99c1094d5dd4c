//! A strict, conservative JSON object scanner that reads only the fields a pipeline needs.
//!
//! Contract: `scan` returns `Some(())` only for a value that `orjson.loads` decodes into a
//! dict, and then every wanted top-level field it fills holds exactly what orjson would give
//! (`Val::Missing` when absent). It returns `None` for everything else *and* for anything it
//! does not handle itself (escapes in strings, integers beyond 64 bits in a wanted field,
//! a wanted field named twice, deep nesting): the caller then runs that record through the
//! Python path, which decides. So the scanner may refuse what orjson accepts, never accept
//! what orjson refuses.

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Val<'a> {
    Missing,
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(&'a str),
    /// An array or an object.
    Other,
}

const MAX_DEPTH: usize = 100;

struct Scanner<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Scanner<'a> {
    #[inline]
    fn ws(&mut self) {
        while let Some(&c) = self.b.get(self.i) {
            if c == b' ' || c == b'\n' || c == b'\r' || c == b'\t' {
                self.i += 1;
            } else {
                break;
            }
        }
    }

    #[inline]
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    /// At an opening quote: the string's bytes (already known to be UTF-8). None on an escape
    /// or a control character (orjson refuses the latter; the former is left to Python).
    #[inline]
    fn string(&mut self) -> Option<&'a str> {
        let start = self.i + 1;
        let mut j = start;
        let b = self.b;
        while j < b.len() {
            let c = b[j];
            if c == b'"' {
                self.i = j + 1;
                // SAFETY: the whole value was checked to be UTF-8 and a quote is never inside
                // a multi-byte sequence, so this slice starts and ends on character boundaries.
                return Some(unsafe { std::str::from_utf8_unchecked(&b[start..j]) });
            }
            if c == b'\\' || c < 0x20 {
                return None;
            }
            j += 1;
        }
        None
    }

    #[inline]
    fn digits(&mut self) -> usize {
        let st = self.i;
        while let Some(c) = self.peek() {
            if c.is_ascii_digit() {
                self.i += 1;
            } else {
                break;
            }
        }
        self.i - st
    }

    /// A number, by JSON's grammar: an int that fits 64 bits, else a float. None when the
    /// grammar is broken or the float is infinite (orjson refuses both), and for an integer
    /// beyond 64 bits when `exact` (orjson gives an int or a float there: Python decides).
    fn number(&mut self, exact: bool) -> Option<Val<'a>> {
        let st = self.i;
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.peek() {
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return None,
        }
        let mut float = false;
        if self.peek() == Some(b'.') {
            self.i += 1;
            if self.digits() == 0 {
                return None;
            }
            float = true;
        }
        if matches!(self.peek(), Some(b'e') | Some(b'E')) {
            self.i += 1;
            if matches!(self.peek(), Some(b'+') | Some(b'-')) {
                self.i += 1;
            }
            if self.digits() == 0 {
                return None;
            }
            float = true;
        }
        // SAFETY: ASCII only.
        let text = unsafe { std::str::from_utf8_unchecked(&self.b[st..self.i]) };
        if !float {
            if let Ok(v) = text.parse::<i64>() {
                return Some(Val::Int(v));
            }
            if exact {
                return None;
            }
        }
        let v: f64 = text.parse().ok()?;
        if v.is_finite() {
            Some(Val::Float(v))
        } else {
            None
        }
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        if self.b[self.i..].starts_with(word) {
            self.i += word.len();
            Some(())
        } else {
            None
        }
    }

    /// Any value; scalars are returned, arrays and objects validated and returned as Other.
    fn value(&mut self, depth: usize, exact: bool) -> Option<Val<'a>> {
        match self.peek()? {
            b'"' => self.string().map(Val::Str),
            b'{' => {
                self.skip_object(depth + 1)?;
                Some(Val::Other)
            }
            b'[' => {
                self.skip_array(depth + 1)?;
                Some(Val::Other)
            }
            b't' => self.literal(b"true").map(|_| Val::Bool(true)),
            b'f' => self.literal(b"false").map(|_| Val::Bool(false)),
            b'n' => self.literal(b"null").map(|_| Val::Null),
            _ => self.number(exact),
        }
    }

    fn skip_array(&mut self, depth: usize) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.i += 1;
        self.ws();
        if self.peek()? == b']' {
            self.i += 1;
            return Some(());
        }
        loop {
            self.ws();
            self.value(depth, false)?;
            self.ws();
            match self.peek()? {
                b',' => self.i += 1,
                b']' => {
                    self.i += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    fn skip_object(&mut self, depth: usize) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.i += 1;
        self.ws();
        if self.peek()? == b'}' {
            self.i += 1;
            return Some(());
        }
        loop {
            self.ws();
            if self.peek()? != b'"' {
                return None;
            }
            self.string()?;
            self.ws();
            if self.peek()? != b':' {
                return None;
            }
            self.i += 1;
            self.ws();
            self.value(depth, false)?;
            self.ws();
            match self.peek()? {
                b',' => self.i += 1,
                b'}' => {
                    self.i += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }
}

/// Scan one JSON value that must be an object; fill `out[j]` with the value of top-level
/// field `names[j]` (see the module docstring for when this gives up).
pub fn scan<'a>(b: &'a [u8], names: &[Box<str>], out: &mut [Val<'a>]) -> Option<()> {
    for v in out.iter_mut() {
        *v = Val::Missing;
    }
    std::str::from_utf8(b).ok()?;
    let mut s = Scanner { b, i: 0 };
    s.ws();
    if s.peek()? != b'{' {
        return None;
    }
    s.i += 1;
    s.ws();
    if s.peek()? == b'}' {
        s.i += 1;
    } else {
        loop {
            s.ws();
            if s.peek()? != b'"' {
                return None;
            }
            let name = s.string()?;
            s.ws();
            if s.peek()? != b':' {
                return None;
            }
            s.i += 1;
            s.ws();
            match names.iter().position(|n| **n == *name) {
                Some(j) => {
                    if out[j] != Val::Missing {
                        return None; // named twice: orjson keeps the last, Python decides
                    }
                    out[j] = s.value(1, true)?;
                }
                None => {
                    s.value(1, false)?;
                }
            }
            s.ws();
            match s.peek()? {
                b',' => s.i += 1,
                b'}' => {
                    s.i += 1;
                    break;
                }
                _ => return None,
            }
        }
    }
    s.ws();
    if s.i == b.len() {
        Some(())
    } else {
        None
    }
}

/// Scan a record as stage 1 forwards it to the repartition topic (`weir.repartition.
/// encode_forward`: `[event time, record]`, written by orjson without whitespace): the event
/// time, with `out` filled as `scan` fills it from the record. None for anything else, and for
/// an event time that is not an int within 64 bits (Python decides).
pub fn scan_forwarded<'a>(b: &'a [u8], names: &[Box<str>], out: &mut [Val<'a>]) -> Option<i64> {
    let rest = b.strip_prefix(b"[")?;
    let comma = rest.iter().position(|&c| c == b',')?;
    let mut s = Scanner { b: &rest[..comma], i: 0 };
    let Val::Int(t) = s.number(true)? else { return None };
    if s.i != comma {
        return None;
    }
    scan(rest[comma + 1..].strip_suffix(b"]")?, names, out)?;
    Some(t)
}
