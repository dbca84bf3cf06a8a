//! The client side of the SMTP grammar, sans-IO: reply parsing, EHLO capabilities, the
//! pipelined transaction (MAIL, every RCPT, DATA or BDAT in one write) with its replies matched
//! to each recipient, and dot-stuffing for DATA.
//!
//! Nothing here touches a socket; the delivery session wraps it in I/O. Every parser is bounded
//! (line length, lines per reply) and returns an error instead of panicking on any input.

use crate::command::is_domain_or_literal;

/// Longest reply line accepted from a server (RFC 5321 §4.5.3.1.5 says 512; servers exceed it).
pub const REPLY_LINE_BYTES_MAX: usize = 4096;
/// Most lines in one multi-line reply (EHLO replies have a dozen).
pub const REPLY_LINES_MAX: usize = 128;

/// A reply from the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerReply {
    pub code: u16,
    /// The enhanced status code when the server sent one (`5.1.1`).
    pub enhanced: Option<String>,
    /// Text of each line, without code, separator or enhanced code.
    pub lines: Vec<String>,
}

impl ServerReply {
    /// 2xx.
    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }

    /// 4xx: try again later.
    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    /// 5xx: do not try again.
    pub fn is_permanent(&self) -> bool {
        self.code >= 500
    }

    /// One-line form for logs and journaled outcomes: `550 5.1.1 no such user`.
    pub fn summary(&self) -> String {
        let text = self.lines.join(" / ");
        match &self.enhanced {
            Some(e) => format!("{} {e} {text}", self.code),
            None => format!("{} {text}", self.code),
        }
    }
}

/// Why bytes from a server are not a reply.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("reply line longer than {REPLY_LINE_BYTES_MAX} bytes")]
    LineTooLong,
    #[error("reply with more than {REPLY_LINES_MAX} lines")]
    TooManyLines,
    #[error("malformed reply line: {0:?}")]
    Malformed(String),
}

/// Parses one complete reply from the start of `buf`. `Ok(None)`: more bytes are needed.
/// `Ok(Some((reply, consumed)))` otherwise.
pub fn parse_reply(buf: &[u8]) -> Result<Option<(ServerReply, usize)>, ReplyError> {
    let mut pos = 0;
    let mut code = None;
    let mut lines = Vec::new();
    let mut enhanced = None;
    loop {
        let Some(nl) = buf[pos..].iter().position(|&b| b == b'\n') else {
            return if buf.len() - pos > REPLY_LINE_BYTES_MAX {
                Err(ReplyError::LineTooLong)
            } else {
                Ok(None)
            };
        };
        if nl > REPLY_LINE_BYTES_MAX {
            return Err(ReplyError::LineTooLong);
        }
        let raw = &buf[pos..pos + nl];
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        pos += nl + 1;
        let line = String::from_utf8_lossy(raw);
        let bytes = line.as_bytes();
        let digits_ok = bytes.len() >= 3 && bytes[..3].iter().all(u8::is_ascii_digit);
        let sep = bytes.get(3).copied();
        if !digits_ok || !matches!(sep, None | Some(b' ') | Some(b'-')) {
            return Err(ReplyError::Malformed(line.into_owned()));
        }
        let this: u16 = line[..3]
            .parse()
            .map_err(|_| ReplyError::Malformed(line.to_string()))?;
        if !(200..600).contains(&this) || code.is_some_and(|c| c != this) {
            return Err(ReplyError::Malformed(line.into_owned()));
        }
        code = Some(this);
        let mut text = line.get(4..).unwrap_or("").to_string();
        if let Some((first, rest)) = text.split_once(' ') {
            if is_enhanced_code(first, this) {
                enhanced.get_or_insert_with(|| first.to_string());
                text = rest.to_string();
            }
        } else if is_enhanced_code(&text, this) {
            enhanced.get_or_insert_with(|| text.clone());
            text.clear();
        }
        lines.push(text);
        if lines.len() > REPLY_LINES_MAX {
            return Err(ReplyError::TooManyLines);
        }
        if sep != Some(b'-') {
            let reply = ServerReply {
                code: this,
                enhanced,
                lines,
            };
            return Ok(Some((reply, pos)));
        }
    }
}

/// `class.subject.detail` whose class matches the reply code's first digit (RFC 3463).
fn is_enhanced_code(s: &str, code: u16) -> bool {
    let mut parts = s.split('.');
    let (Some(class), Some(subject), Some(detail), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let num = |p: &str, max: usize| {
        !p.is_empty() && p.len() <= max && p.bytes().all(|b| b.is_ascii_digit())
    };
    num(class, 1)
        && num(subject, 3)
        && num(detail, 3)
        && class.parse::<u16>().ok() == Some(code / 100)
}

/// What the server announced in its EHLO reply.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub pipelining: bool,
    /// `SIZE n`; `Some(0)` means "no fixed limit".
    pub size: Option<u64>,
    pub eight_bit_mime: bool,
    pub smtputf8: bool,
    pub chunking: bool,
    pub starttls: bool,
    pub dsn: bool,
    pub enhanced_status_codes: bool,
}

impl Capabilities {
    /// Reads the keywords of an EHLO reply (the first line is the greeting).
    pub fn from_ehlo(reply: &ServerReply) -> Capabilities {
        let mut c = Capabilities::default();
        for line in reply.lines.iter().skip(1) {
            let mut words = line.split_whitespace();
            let Some(keyword) = words.next() else {
                continue;
            };
            match keyword.to_ascii_uppercase().as_str() {
                "PIPELINING" => c.pipelining = true,
                "SIZE" => c.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0)),
                "8BITMIME" => c.eight_bit_mime = true,
                "SMTPUTF8" => c.smtputf8 = true,
                "CHUNKING" => c.chunking = true,
                "STARTTLS" => c.starttls = true,
                "DSN" => c.dsn = true,
                "ENHANCEDSTATUSCODES" => c.enhanced_status_codes = true,
                _ => {}
            }
        }
        c
    }
}

/// One envelope to send.
#[derive(Clone, Debug)]
pub struct Envelope<'a> {
    /// Reverse-path without brackets; empty for `<>`.
    pub sender: &'a str,
    /// (address, NOTIFY bits, ORCPT) per recipient.
    pub recipients: Vec<(&'a str, u8, &'a str)>,
    pub size: usize,
    pub eight_bit: bool,
    pub smtputf8: bool,
    /// `RET=` when DSN is used: `Some("HDRS")` or `Some("FULL")`.
    pub ret: Option<&'a str>,
    pub envid: &'a str,
}

/// Why an envelope cannot go to this server as it is.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// The message is larger than the server's announced SIZE.
    #[error("message of {size} bytes exceeds the server's limit of {limit}")]
    TooBig { size: usize, limit: u64 },
    /// UTF-8 addresses need SMTPUTF8, which the server does not offer.
    #[error("the server does not support SMTPUTF8, which this message needs")]
    NeedsSmtputf8,
    /// An address that cannot be written into a command line safely.
    #[error("address {0:?} cannot be sent")]
    BadAddress(String),
}

/// Builds the pipelined commands for one transaction: MAIL, every RCPT and, unless `chunking`,
/// DATA. Parameters the server did not announce are left out (DSN) or make the envelope fail
/// (SIZE exceeded, SMTPUTF8 needed); 8BITMIME content to a 7-bit-only server is sent as is,
/// as RFC 6152 §3 allows for lack of a better option, and noted by the caller.
pub fn transaction_commands(
    env: &Envelope<'_>,
    caps: &Capabilities,
    chunking: bool,
) -> Result<Vec<u8>, EnvelopeError> {
    if let Some(limit) = caps.size.filter(|&l| l > 0) {
        if env.size as u64 > limit {
            return Err(EnvelopeError::TooBig {
                size: env.size,
                limit,
            });
        }
    }
    let needs_utf8 = env.smtputf8
        || !env.sender.is_ascii()
        || env.recipients.iter().any(|(a, _, _)| !a.is_ascii());
    if needs_utf8 && !caps.smtputf8 {
        return Err(EnvelopeError::NeedsSmtputf8);
    }
    let safe = |a: &str| {
        !a.bytes()
            .any(|b| b < 0x20 || b == 0x7f || b == b'<' || b == b'>')
    };
    if !safe(env.sender) {
        return Err(EnvelopeError::BadAddress(env.sender.into()));
    }
    let mut out = format!("MAIL FROM:<{}>", env.sender);
    if caps.size.is_some() {
        out.push_str(&format!(" SIZE={}", env.size));
    }
    if env.eight_bit && caps.eight_bit_mime {
        out.push_str(" BODY=8BITMIME");
    }
    if needs_utf8 {
        out.push_str(" SMTPUTF8");
    }
    if caps.dsn {
        if let Some(ret) = env.ret {
            out.push_str(&format!(" RET={ret}"));
        }
        if !env.envid.is_empty() {
            out.push_str(&format!(" ENVID={}", env.envid));
        }
    }
    out.push_str("\r\n");
    for (addr, notify, orcpt) in &env.recipients {
        if !safe(addr) {
            return Err(EnvelopeError::BadAddress((*addr).into()));
        }
        out.push_str(&format!("RCPT TO:<{addr}>"));
        if caps.dsn {
            if *notify != 0 {
                out.push_str(&format!(" NOTIFY={}", notify_words(*notify)));
            }
            if !orcpt.is_empty() && safe(orcpt) && !orcpt.contains(' ') {
                out.push_str(&format!(" ORCPT={orcpt}"));
            }
        }
        out.push_str("\r\n");
    }
    if !chunking {
        out.push_str("DATA\r\n");
    }
    Ok(out.into_bytes())
}

fn notify_words(bits: u8) -> String {
    if bits & 1 != 0 {
        return "NEVER".into();
    }
    let words: Vec<&str> = [(2, "SUCCESS"), (4, "FAILURE"), (8, "DELAY")]
        .iter()
        .filter(|(b, _)| bits & b != 0)
        .map(|(_, w)| *w)
        .collect();
    words.join(",")
}

/// The outcome of a transaction's envelope replies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EnvelopeOutcome {
    /// MAIL was refused: every recipient gets this reply.
    MailRefused(ServerReply),
    /// Per-recipient RCPT replies; `proceed` is true when at least one was accepted and the
    /// DATA (or BDAT) step should go on.
    Recipients {
        replies: Vec<ServerReply>,
        proceed: bool,
    },
}

/// Matches the replies to MAIL and each RCPT (in order, as PIPELINING guarantees).
pub fn match_envelope_replies(mail: ServerReply, rcpts: Vec<ServerReply>) -> EnvelopeOutcome {
    if !mail.is_positive() {
        return EnvelopeOutcome::MailRefused(mail);
    }
    let proceed = rcpts.iter().any(ServerReply::is_positive);
    EnvelopeOutcome::Recipients {
        replies: rcpts,
        proceed,
    }
}

/// Writes `message` (CRLF line ends, not stuffed) for DATA: a `.` at the start of a line is
/// doubled, and the content is ended with `CRLF . CRLF` (adding the last CRLF if missing).
/// A bare LF and a bare CR are each sent as CRLF (and a dot after them is doubled), so
/// content can never form an end of data, nor `\r.\r\n` tricks, at the next hop.
pub fn dot_stuff(message: &[u8], out: &mut Vec<u8>) {
    out.reserve(message.len() + message.len() / 64 + 5);
    // Runs between line ends are copied whole; only line ends (found by memchr) and a dot
    // right after one are looked at.
    if message.first() == Some(&b'.') {
        out.push(b'.');
    }
    let mut start = 0; // message[..start] is written
    for i in memchr::memchr2_iter(b'\r', b'\n', message) {
        if i < start {
            continue; // the LF of a CRLF already written
        }
        if message[i] == b'\r' && message.get(i + 1) == Some(&b'\n') {
            out.extend_from_slice(&message[start..i + 2]);
            start = i + 2;
        } else {
            // A bare CR or LF: a line end, written as CRLF.
            out.extend_from_slice(&message[start..i]);
            out.extend_from_slice(b"\r\n");
            start = i + 1;
        }
        if message.get(start) == Some(&b'.') {
            out.push(b'.');
        }
    }
    let tail = &message[start..];
    out.extend_from_slice(tail);
    if !tail.is_empty() {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
}

/// True when `host` may be used in an EHLO command.
pub fn valid_ehlo_name(host: &str) -> bool {
    is_domain_or_literal(host)
}

/// Dot-stuffs `message` as the client sends it and reads it back with the server-side content
/// reader; returns the content as the next hop stores it, or the rule it broke. For tests of
/// what reaches a peer (panics if the stuffed form does not end where it should).
pub fn stuff_and_read_back(message: &[u8]) -> Result<Vec<u8>, crate::content::ContentError> {
    use crate::content::{BareLineEnd, ContentReader, Progress};
    let mut wire = Vec::new();
    dot_stuff(message, &mut wire);
    let mut r = ContentReader::new(true, BareLineEnd::Reject, 1000, 1 << 20);
    let mut back = Vec::new();
    assert_eq!(
        r.feed(&wire, &mut back),
        Progress::Done {
            consumed: wire.len()
        }
    );
    r.error().map_or(Ok(back), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(s: &str) -> ServerReply {
        parse_reply(s.as_bytes()).unwrap().unwrap().0
    }

    #[test]
    fn parses_single_and_multi_line_replies_with_enhanced_codes() {
        let r = reply("550 5.1.1 No such user here\r\n");
        assert_eq!((r.code, r.enhanced.as_deref()), (550, Some("5.1.1")));
        assert_eq!(r.lines, ["No such user here"]);
        let (r, used) =
            parse_reply(b"250-mx.test hello\r\n250-PIPELINING\r\n250 SIZE 1000\r\nNEXT")
                .unwrap()
                .unwrap();
        assert_eq!(used, 50);
        assert_eq!(r.lines, ["mx.test hello", "PIPELINING", "SIZE 1000"]);
        assert_eq!(r.enhanced, None);
        assert_eq!(reply("354 End data with <CR><LF>.<CR><LF>\r\n").code, 354);
        assert_eq!(reply("250 2.0.0\r\n").enhanced.as_deref(), Some("2.0.0"));
    }

    #[test]
    fn incomplete_replies_need_more() {
        assert_eq!(parse_reply(b"250-first\r\n250 sec").unwrap(), None);
        assert_eq!(parse_reply(b"").unwrap(), None);
    }

    #[test]
    fn malformed_and_oversized_replies_are_errors() {
        assert!(matches!(
            parse_reply(b"hello\r\n"),
            Err(ReplyError::Malformed(_))
        ));
        assert!(matches!(
            parse_reply(b"250-a\r\n251 b\r\n"),
            Err(ReplyError::Malformed(_))
        ));
        assert!(matches!(
            parse_reply(b"099 x\r\n"),
            Err(ReplyError::Malformed(_))
        ));
        let long = vec![b'2'; REPLY_LINE_BYTES_MAX + 10];
        assert_eq!(parse_reply(&long), Err(ReplyError::LineTooLong));
        let many = "250-x\r\n".repeat(REPLY_LINES_MAX + 1);
        assert_eq!(parse_reply(many.as_bytes()), Err(ReplyError::TooManyLines));
    }

    #[test]
    fn enhanced_code_must_match_the_reply_class() {
        assert_eq!(reply("250 5.0.0 odd\r\n").enhanced, None);
        assert_eq!(
            reply("451 4.7.1 later\r\n").enhanced.as_deref(),
            Some("4.7.1")
        );
    }

    #[test]
    fn ehlo_capabilities() {
        let r = reply(
            "250-mx greets\r\n250-PIPELINING\r\n250-SIZE 52428800\r\n250-8BITMIME\r\n\
             250-STARTTLS\r\n250-CHUNKING\r\n250 DSN\r\n",
        );
        let c = Capabilities::from_ehlo(&r);
        assert!(c.pipelining && c.eight_bit_mime && c.starttls && c.chunking && c.dsn);
        assert_eq!(c.size, Some(52_428_800));
        assert!(!c.smtputf8);
    }

    #[test]
    fn pipelined_commands_carry_only_announced_parameters() {
        let env = Envelope {
            sender: "a@src.test",
            recipients: vec![
                ("b@dst.test", 4 | 8, "rfc822;b@dst.test"),
                ("c@dst.test", 0, ""),
            ],
            size: 1234,
            eight_bit: true,
            smtputf8: false,
            ret: Some("HDRS"),
            envid: "QQ1",
        };
        let full = Capabilities {
            size: Some(0),
            eight_bit_mime: true,
            dsn: true,
            ..Default::default()
        };
        let cmds = String::from_utf8(transaction_commands(&env, &full, false).unwrap()).unwrap();
        assert_eq!(
            cmds,
            "MAIL FROM:<a@src.test> SIZE=1234 BODY=8BITMIME RET=HDRS ENVID=QQ1\r\n\
             RCPT TO:<b@dst.test> NOTIFY=FAILURE,DELAY ORCPT=rfc822;b@dst.test\r\n\
             RCPT TO:<c@dst.test>\r\nDATA\r\n"
        );
        let bare =
            String::from_utf8(transaction_commands(&env, &Capabilities::default(), true).unwrap())
                .unwrap();
        assert_eq!(
            bare,
            "MAIL FROM:<a@src.test>\r\nRCPT TO:<b@dst.test>\r\nRCPT TO:<c@dst.test>\r\n"
        );
    }

    #[test]
    fn envelopes_the_server_cannot_take_fail_clearly() {
        let mut env = Envelope {
            sender: "",
            recipients: vec![("jörg@dst.test", 0, "")],
            size: 10,
            eight_bit: false,
            smtputf8: false,
            ret: None,
            envid: "",
        };
        assert_eq!(
            transaction_commands(&env, &Capabilities::default(), false),
            Err(EnvelopeError::NeedsSmtputf8)
        );
        env.recipients = vec![("b@dst.test", 0, "")];
        let small = Capabilities {
            size: Some(5),
            ..Default::default()
        };
        assert_eq!(
            transaction_commands(&env, &small, false),
            Err(EnvelopeError::TooBig { size: 10, limit: 5 })
        );
        env.recipients = vec![("b@dst.test>\r\nRCPT TO:<x@y", 0, "")];
        assert!(matches!(
            transaction_commands(&env, &Capabilities::default(), false),
            Err(EnvelopeError::BadAddress(_))
        ));
    }

    #[test]
    fn replies_are_matched_to_recipients() {
        let ok = reply("250 2.1.5 ok\r\n");
        let no = reply("550 5.1.1 no\r\n");
        match match_envelope_replies(reply("250 2.1.0 ok\r\n"), vec![no.clone(), ok.clone()]) {
            EnvelopeOutcome::Recipients { replies, proceed } => {
                assert!(proceed);
                assert_eq!(replies, vec![no.clone(), ok]);
            }
            other => panic!("{other:?}"),
        }
        let refused = match_envelope_replies(reply("451 4.3.0 busy\r\n"), vec![no]);
        assert!(matches!(refused, EnvelopeOutcome::MailRefused(r) if r.code == 451));
    }

    #[test]
    fn dot_stuffing_matches_the_byte_by_byte_definition() {
        // The definition, one byte at a time: a dot at a line start is doubled, bare CR and
        // LF become CRLF, the content ends with a line end and `.`.
        fn reference(message: &[u8]) -> Vec<u8> {
            let mut out = Vec::new();
            let (mut line_start, mut prev) = (true, 0u8);
            for (i, &b) in message.iter().enumerate() {
                if line_start && b == b'.' {
                    out.push(b'.');
                }
                match b {
                    b'\n' if prev != b'\r' => out.extend_from_slice(b"\r\n"),
                    b'\r' if message.get(i + 1) != Some(&b'\n') => out.extend_from_slice(b"\r\n"),
                    _ => out.push(b),
                }
                line_start = b == b'\n' || (b == b'\r' && message.get(i + 1) != Some(&b'\n'));
                prev = b;
            }
            if !line_start {
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b".\r\n");
            out
        }
        let alphabet = b"ab.\r\n";
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for len in 0..2000 {
            let message: Vec<u8> = (0..len % 40)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    alphabet[(x % alphabet.len() as u64) as usize]
                })
                .collect();
            let mut out = Vec::new();
            dot_stuff(&message, &mut out);
            assert_eq!(
                out,
                reference(&message),
                "{:?}",
                String::from_utf8_lossy(&message)
            );
        }
    }

    #[test]
    fn dot_stuffing_doubles_leading_dots_and_terminates() {
        let mut out = Vec::new();
        dot_stuff(b"a\r\n.b\r\n.\r\nc", &mut out);
        assert_eq!(out, b"a\r\n..b\r\n..\r\nc\r\n.\r\n");
        out.clear();
        dot_stuff(b".x\nbare\n", &mut out);
        assert_eq!(out, b"..x\r\nbare\r\n.\r\n");
        out.clear();
        dot_stuff(b"", &mut out);
        assert_eq!(out, b".\r\n");
        // A bare CR is a line end too: `\r.\r\n` cannot end the message at the next hop.
        out.clear();
        dot_stuff(b"a\r.\r\nb\r", &mut out);
        assert_eq!(out, b"a\r\n..\r\nb\r\n.\r\n");
    }

    #[test]
    fn stuffed_content_round_trips_through_the_server_reader() {
        let original: &[u8] = b"Subject: t\r\n\r\n.\r\n..\r\n.x\r\nend\r\n";
        assert_eq!(stuff_and_read_back(original), Ok(original.to_vec()));
    }
}
