//! Fuzzing oracles for the parsers, shared by the fuzz target (`fuzz/`, cargo-fuzz) and the
//! property test below, so CI checks the same properties on stable Rust.
//!
//! Each oracle takes arbitrary bytes, never panics on its own, and asserts what must hold for
//! any input: the command parser answers every error with a 5xx reply and an enhanced code;
//! the line receiver finds the same lines however the input is split, each within its bound;
//! the content reader reaches the same end and content however the input is split, never
//! keeps more than its bound, and never ends a message at anything but `CRLF . CRLF`; the reply
//! parser never consumes past its input and only returns codes 200..=599.
//!
//! [`smtp_alphabet`] folds random bytes into SMTP tokens, so the fuzzer reaches deep states
//! (parameters, dot lines, bare line ends) that raw bytes rarely form.

use crate::client::parse_reply;
use crate::command::parse_command;
use crate::content::{BareLineEnd, ContentReader, Progress};
use crate::line::{LineReceiver, Scan};

/// Tokens random bytes are folded into.
const TOKENS: &[&[u8]] = &[
    b"MAIL FROM:<",
    b"RCPT TO:<",
    b"EHLO ",
    b"DATA",
    b"BDAT ",
    b" LAST",
    b"AUTH PLAIN ",
    b"STARTTLS",
    b"a@b.test",
    b"postmaster",
    b">",
    b"<>",
    b" SIZE=",
    b" BODY=8BITMIME",
    b" SMTPUTF8",
    b" NOTIFY=SUCCESS,DELAY",
    b" ORCPT=rfc822;x@y",
    b"=",
    b"\r\n",
    b"\n",
    b"\r",
    b".",
    b"\r\n.\r\n",
    b"..",
    b"\0",
    b" ",
    b"250",
    b"-",
    b"5.1.1",
    b"12345",
    b"\xc3\xa9",
    b"x",
];

/// `data` with each byte replaced by an SMTP token.
pub fn smtp_alphabet(data: &[u8]) -> Vec<u8> {
    data.iter()
        .flat_map(|b| TOKENS[*b as usize % TOKENS.len()].iter().copied())
        .collect()
}

/// Runs the oracle the first byte selects on the rest: 0-3 raw bytes, 4-7 the SMTP alphabet.
pub fn all(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let folded;
    let input = if which & 4 == 0 {
        rest
    } else {
        folded = smtp_alphabet(rest);
        &folded
    };
    match which & 3 {
        0 => command(input),
        1 => lines(input),
        2 => content(input),
        _ => reply(input),
    }
}

/// The command parser: every error is a 5xx with an enhanced code.
pub fn command(data: &[u8]) {
    if let Err(e) = parse_command(data) {
        let r = e.reply();
        assert!((500..600).contains(&r.code), "{r:?}");
        assert!(!r.enhanced.is_empty(), "{r:?}");
    }
}

fn scan_all(data: &[u8], cut: usize, max: usize) -> Vec<Result<Vec<u8>, ()>> {
    let mut receiver = LineReceiver::new(max);
    let mut out = Vec::new();
    let mut buf = Vec::new();
    for piece in [&data[..cut], &data[cut..]] {
        buf.extend_from_slice(piece);
        loop {
            match receiver.scan(&buf) {
                Scan::Line { line, consumed } => {
                    assert!(line.len() + 2 <= max && consumed <= buf.len());
                    assert!(!buf[line.clone()].contains(&b'\n'));
                    out.push(Ok(buf[line].to_vec()));
                    buf.drain(..consumed);
                }
                Scan::TooLong { consumed } => {
                    out.push(Err(()));
                    buf.drain(..consumed);
                }
                Scan::Discard { consumed } => {
                    buf.drain(..consumed);
                }
                Scan::NeedMore => {
                    assert!(buf.len() <= max, "the receiver kept more than its bound");
                    break;
                }
            }
        }
    }
    out
}

/// The line receiver: the same lines however the input is split, each within the bound.
pub fn lines(data: &[u8]) {
    let max = 16 + data.first().map_or(0, |b| *b as usize % 64);
    let whole = scan_all(data, 0, max);
    let cut = data.len() / 2;
    assert_eq!(whole, scan_all(data, cut, max), "split at {cut}");
}

fn read_content(data: &[u8], cut: usize, dot_stuffed: bool) -> (Option<usize>, Vec<u8>, bool) {
    let mut r = ContentReader::new(dot_stuffed, BareLineEnd::Reject, 80, 4096);
    let mut out = Vec::new();
    let mut offset = 0;
    for piece in [&data[..cut], &data[cut..]] {
        if let Progress::Done { consumed } = r.feed(piece, &mut out) {
            assert!(consumed <= piece.len());
            return (Some(offset + consumed), out, r.error().is_some());
        }
        offset += piece.len();
        assert!(out.len() <= 4096, "the reader kept more than its bound");
    }
    (None, out, r.error().is_some())
}

/// The content reader: the same end and content however the input is split; an end of data
/// is always right after `CRLF . CRLF` (or `. CRLF` at the very start).
pub fn content(data: &[u8]) {
    for dot_stuffed in [true, false] {
        let whole = read_content(data, 0, dot_stuffed);
        let cut = data.len() / 2;
        assert_eq!(
            whole,
            read_content(data, cut, dot_stuffed),
            "split at {cut}"
        );
        if let (Some(end), _, _) = whole {
            assert!(dot_stuffed, "BDAT content has no end marker");
            let before = &data[..end];
            assert!(
                before == b".\r\n" || before.ends_with(b"\r\n.\r\n"),
                "ended at {end} after {:?}",
                &before[before.len().saturating_sub(8)..]
            );
        }
    }
}

/// The reply parser: never consumes past its input; codes are 200..=599.
pub fn reply(data: &[u8]) {
    if let Ok(Some((r, consumed))) = parse_reply(data) {
        assert!(consumed <= data.len());
        assert!((200..600).contains(&r.code), "{r:?}");
    }
}

#[cfg(test)]
mod tests {
    /// The oracles over a fixed stream of pseudo-random inputs (the fuzz target explores
    /// further; this keeps the properties checked in every test run).
    #[test]
    fn oracles_hold_on_pseudo_random_inputs() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            let len = (next() % 96) as usize;
            let data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            super::all(&data);
        }
    }
}
