//! The message-content state machine: removes dot-stuffing, finds the one true end of data
//! (`CRLF . CRLF`), and enforces the content rules that stop SMTP smuggling.
//!
//! Sans-IO: [`ContentReader::feed`] takes whatever bytes arrived and says how many it consumed
//! and whether the message ended; the caller keeps the rest (pipelined commands after the end).
//!
//! Rules (RFC 5321 §4.1.1.4, §4.5.2, §4.5.3.1.6):
//! - only `<CR><LF>.<CR><LF>` ends a DATA message; `<LF>.<LF>`, `<LF>.<CR><LF>`,
//!   `<CR>.<CR><LF>` and every other variant never do;
//! - a bare CR or bare LF is rejected ([`BareLineEnd::Reject`], the default) or turned into CRLF
//!   ([`BareLineEnd::Normalize`]); normalising never creates an end of data, and a line holding
//!   only `.` is stored as content (delivery dot-stuffs it again);
//! - NUL bytes are refused; lines longer than `line_bytes_max` (CRLF included) are refused;
//! - the stored content is bounded by `message_bytes_max`.
//!
//! After an error the reader keeps consuming until the real end of data, so the session can
//! answer once, in sync with the client, and nothing of the message is stored.
//!
//! The same reader checks BDAT chunks (`dot_stuffed = false`): no end marker, no unstuffing, the
//! same line rules, because a message stored with bare line ends could be smuggled at the next
//! hop.

use crate::reply::Reply;

/// What to do with a bare CR or LF in message content.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BareLineEnd {
    Reject,
    Normalize,
}

/// Why message content was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContentError {
    BareLineEnd,
    Nul,
    LineTooLong,
    TooBig,
    /// The sessions together hold `inflight_message_bytes_max` of content already.
    NoMemory,
}

impl ContentError {
    /// The reply to the end of data.
    pub fn reply(self) -> Reply {
        match self {
            ContentError::BareLineEnd => Reply::new(
                550,
                "5.6.0",
                "Message contains a bare CR or LF; use CRLF line ends",
            ),
            ContentError::Nul => Reply::new(550, "5.6.0", "Message contains a NUL byte"),
            ContentError::LineTooLong => Reply::new(550, "5.6.0", "Message has a line too long"),
            ContentError::TooBig => Reply::new(552, "5.3.4", "Message size exceeds fixed limit"),
            ContentError::NoMemory => no_memory_reply(),
        }
    }
}

/// The reply when the memory budget for message content is spent.
pub fn no_memory_reply() -> Reply {
    Reply::new(
        452,
        "4.3.1",
        "Insufficient system storage: too much mail in transit, try again later",
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// At the start of a line.
    LineStart,
    /// Inside a line.
    Mid,
    /// Saw CR inside (or at the start of) a line.
    Cr,
    /// Saw `.` at the start of a line (DATA only).
    Dot,
    /// Saw `.` CR at the start of a line (DATA only).
    DotCr,
}

/// The result of feeding bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// Everything was consumed; more bytes are needed.
    NeedMore,
    /// The end of data was found after `consumed` bytes of this input.
    Done { consumed: usize },
}

/// Streams message content into `out`, checking it.
pub struct ContentReader {
    state: State,
    dot_stuffed: bool,
    bare: BareLineEnd,
    line_bytes_max: usize,
    message_bytes_max: usize,
    line_len: usize,
    /// The current line began after a normalised bare line end: a dot there is content, never
    /// the start of an end-of-data marker.
    after_bare: bool,
    error: Option<ContentError>,
    /// Content bytes seen (stored or not), for size accounting.
    seen: usize,
}

impl ContentReader {
    /// A reader for DATA (`dot_stuffed`) or BDAT content.
    pub fn new(
        dot_stuffed: bool,
        bare: BareLineEnd,
        line_bytes_max: usize,
        message_bytes_max: usize,
    ) -> Self {
        ContentReader {
            state: State::LineStart,
            dot_stuffed,
            bare,
            line_bytes_max,
            message_bytes_max,
            line_len: 0,
            after_bare: false,
            error: None,
            seen: 0,
        }
    }

    /// The first rule the content broke, if any.
    pub fn error(&self) -> Option<ContentError> {
        self.error
    }

    /// Refuses the content for a reason found outside the reader (the memory budget): the rest
    /// is read and dropped, and the end of data is answered with `e`.
    pub fn refuse(&mut self, e: ContentError, out: &mut Vec<u8>) {
        self.fail(e, out);
        *out = Vec::new();
    }

    fn fail(&mut self, e: ContentError, out: &mut Vec<u8>) {
        if self.error.is_none() {
            self.error = Some(e);
            // Nothing of a refused message is kept, not even its buffer's memory.
            *out = Vec::new();
        }
    }

    fn push(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        self.seen += bytes.len();
        self.line_len += bytes.len();
        if self.line_len > self.line_bytes_max {
            self.fail(ContentError::LineTooLong, out);
        }
        if self.seen > self.message_bytes_max {
            self.fail(ContentError::TooBig, out);
        }
        if self.error.is_none() {
            out.extend_from_slice(bytes);
        }
    }

    fn end_line(&mut self, out: &mut Vec<u8>) {
        // The CRLF counts towards the line's length (RFC 5321 §4.5.3.1.6).
        self.push(b"\r\n", out);
        self.line_len = 0;
        self.state = State::LineStart;
        self.after_bare = false;
    }

    fn bare(&mut self, out: &mut Vec<u8>) {
        match self.bare {
            BareLineEnd::Reject => {
                self.fail(ContentError::BareLineEnd, out);
                self.state = State::Mid;
            }
            BareLineEnd::Normalize => {
                self.end_line(out);
                self.after_bare = true;
            }
        }
    }

    /// Consumes `input`, appending content to `out`. For DATA, stops right after the end of
    /// data; for BDAT, consumes everything (the caller bounds the chunk).
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Progress {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                State::Mid | State::LineStart
                    if !matches!(b, b'\r' | b'\n' | 0 | b'.')
                        || self.state == State::Mid && b == b'.' =>
                {
                    // Copy the run up to the next byte that needs a decision.
                    let run_end = input[i..]
                        .iter()
                        .position(|&c| matches!(c, b'\r' | b'\n' | 0))
                        .map_or(input.len(), |p| i + p);
                    self.push(&input[i..run_end], out);
                    self.state = State::Mid;
                    i = run_end;
                    continue;
                }
                State::LineStart | State::Mid => match b {
                    // LineStart only (see the guard above).
                    b'.' if self.dot_stuffed && !self.after_bare => self.state = State::Dot,
                    b'.' => {
                        self.push(b".", out);
                        self.state = State::Mid;
                    }
                    b'\r' => self.state = State::Cr,
                    b'\n' => self.bare(out),
                    _ => {
                        // NUL
                        self.seen += 1;
                        self.fail(ContentError::Nul, out);
                        self.state = State::Mid;
                    }
                },
                State::Cr => match b {
                    b'\n' => self.end_line(out),
                    _ => {
                        self.bare(out);
                        // Re-examine this byte in the new state.
                        continue;
                    }
                },
                State::Dot => match b {
                    b'\r' => self.state = State::DotCr,
                    b'\n' => {
                        // `.` LF: never an end of data.
                        self.push(b".", out);
                        self.bare(out);
                    }
                    _ => {
                        // Dot-stuffing: the leading dot is removed; the byte is content.
                        self.state = State::Mid;
                        continue;
                    }
                },
                State::DotCr => match b {
                    b'\n' => {
                        self.state = State::LineStart;
                        return Progress::Done { consumed: i + 1 };
                    }
                    _ => {
                        // `.` CR not followed by LF: a bare CR after a dot.
                        self.push(b".", out);
                        self.bare(out);
                        continue;
                    }
                },
            }
            i += 1;
        }
        Progress::NeedMore
    }

    /// For BDAT: checks the state at the end of the last chunk (a trailing bare CR is an error).
    pub fn finish_chunks(&mut self, out: &mut Vec<u8>) {
        if self.state == State::Cr {
            self.bare(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(input: &[u8], bare: BareLineEnd) -> (Progress, Vec<u8>, Option<ContentError>) {
        let mut r = ContentReader::new(true, bare, 1000, 1 << 20);
        let mut out = Vec::new();
        let p = r.feed(input, &mut out);
        (p, out, r.error())
    }

    #[test]
    fn a_refused_message_frees_its_buffer() {
        let mut r = ContentReader::new(true, BareLineEnd::Reject, 1000, 1 << 20);
        let mut out = Vec::with_capacity(64 << 10);
        out.extend_from_slice(&[b'x'; 1000]);
        r.feed(b"a\0b\r\n", &mut out);
        assert_eq!(r.error(), Some(ContentError::Nul));
        assert_eq!(
            out.capacity(),
            0,
            "the refused content's memory is given back"
        );
    }

    #[test]
    fn ends_only_at_crlf_dot_crlf_and_unstuffs() {
        let input = b"Subject: x\r\n\r\n..leading dot\r\n.\r\nQUIT\r\n";
        let (p, out, e) = read(input, BareLineEnd::Reject);
        assert_eq!(
            p,
            Progress::Done {
                consumed: input.len() - 6
            }
        );
        assert_eq!(out, b"Subject: x\r\n\r\n.leading dot\r\n");
        assert_eq!(e, None);
    }

    #[test]
    fn smuggling_sequences_never_end_the_message() {
        for seq in [
            &b"a\n.\nb"[..],
            b"a\n.\r\nb",
            b"a\r.\r\nb",
            b"a\r\n.\nb",
            b"a\r\n.\rb",
        ] {
            let (p, _, e) = read(seq, BareLineEnd::Reject);
            assert_eq!(p, Progress::NeedMore, "{seq:?}");
            assert_eq!(e, Some(ContentError::BareLineEnd), "{seq:?}");
            let (p, out, e) = read(seq, BareLineEnd::Normalize);
            assert_eq!(p, Progress::NeedMore, "{seq:?} normalized");
            assert_eq!(e, None);
            assert!(
                !out.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r'),
                "{out:?}"
            );
        }
    }

    #[test]
    fn after_an_error_the_reader_still_finds_the_real_end() {
        let input = b"bad\nline\r\n.\r\nMAIL";
        let (p, out, e) = read(input, BareLineEnd::Reject);
        assert_eq!(
            p,
            Progress::Done {
                consumed: input.len() - 4
            }
        );
        assert!(out.is_empty());
        assert_eq!(e, Some(ContentError::BareLineEnd));
    }

    #[test]
    fn terminator_split_across_feeds_is_found() {
        let mut r = ContentReader::new(true, BareLineEnd::Reject, 1000, 1 << 20);
        let mut out = Vec::new();
        assert_eq!(r.feed(b"x\r", &mut out), Progress::NeedMore);
        assert_eq!(r.feed(b"\n.", &mut out), Progress::NeedMore);
        assert_eq!(r.feed(b"\r", &mut out), Progress::NeedMore);
        assert_eq!(r.feed(b"\nrest", &mut out), Progress::Done { consumed: 1 });
        assert_eq!(out, b"x\r\n");
    }

    #[test]
    fn nul_and_long_lines_and_size_are_refused() {
        assert_eq!(
            read(b"a\0b\r\n.\r\n", BareLineEnd::Reject).2,
            Some(ContentError::Nul)
        );
        let long = [vec![b'x'; 999], b"\r\n.\r\n".to_vec()].concat();
        assert_eq!(
            read(&long, BareLineEnd::Reject).2,
            Some(ContentError::LineTooLong)
        );
        let ok = [vec![b'x'; 998], b"\r\n.\r\n".to_vec()].concat();
        assert_eq!(read(&ok, BareLineEnd::Reject).2, None);
        let mut r = ContentReader::new(true, BareLineEnd::Reject, 1000, 10);
        let mut out = Vec::new();
        r.feed(b"0123456789\r\n.\r\n", &mut out);
        assert_eq!(r.error(), Some(ContentError::TooBig));
    }

    #[test]
    fn bdat_content_has_no_terminator_but_the_same_line_rules() {
        let mut r = ContentReader::new(false, BareLineEnd::Reject, 1000, 1 << 20);
        let mut out = Vec::new();
        assert_eq!(r.feed(b".\r\n.\r\nmore\r\n", &mut out), Progress::NeedMore);
        assert_eq!(out, b".\r\n.\r\nmore\r\n");
        r.feed(b"bare\n", &mut out);
        assert_eq!(r.error(), Some(ContentError::BareLineEnd));
    }
}
