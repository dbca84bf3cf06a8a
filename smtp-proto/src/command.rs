//! SMTP command grammar (RFC 5321 §4.1, with the ESMTP parameters saida supports): one command
//! line in, a [`Command`] or a [`SyntaxError`] out.
//!
//! Sans-IO: this module parses a byte slice that holds exactly one line (without its line end)
//! and never touches a socket. It borrows from its input. Every error names the grammar that was
//! expected, and maps to a reply code with an enhanced status code ([`SyntaxError::reply`]).
//!
//! Not here: line splitting and length limits (the session's line reader), session state (which
//! commands are allowed when), policy (who may relay).

use crate::reply::Reply;

/// `BODY=` parameter of MAIL (RFC 6152, RFC 3030).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Body {
    SevenBit,
    EightBitMime,
    BinaryMime,
}

/// DSN `RET=` parameter of MAIL (RFC 3461 §4.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ret {
    Full,
    Hdrs,
}

/// ESMTP parameters of MAIL FROM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MailParams<'a> {
    /// `SIZE=` (RFC 1870).
    pub size: Option<u64>,
    pub body: Option<Body>,
    /// `SMTPUTF8` (RFC 6531).
    pub smtputf8: bool,
    pub ret: Option<Ret>,
    /// `ENVID=` as sent (xtext-encoded).
    pub envid: Option<&'a str>,
    /// `AUTH=` (RFC 4954 §5), accepted and ignored.
    pub auth: Option<&'a str>,
}

/// ESMTP parameters of RCPT TO.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RcptParams<'a> {
    /// `NOTIFY=` as bits: 1 NEVER, 2 SUCCESS, 4 FAILURE, 8 DELAY (the spool's encoding).
    pub notify: Option<u8>,
    /// `ORCPT=` as sent (`rfc822;` + xtext).
    pub orcpt: Option<&'a str>,
}

/// One parsed command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command<'a> {
    Ehlo(&'a str),
    Helo(&'a str),
    /// Reverse-path without brackets; empty for the null sender `<>`.
    Mail {
        from: &'a str,
        params: MailParams<'a>,
    },
    /// Forward-path without brackets (`postmaster` alone is allowed).
    Rcpt {
        to: &'a str,
        params: RcptParams<'a>,
    },
    Data,
    /// `BDAT <size> [LAST]` (RFC 3030).
    Bdat {
        size: u64,
        last: bool,
    },
    Rset,
    Noop,
    Quit,
    Vrfy,
    Expn,
    Help,
    StartTls,
    /// `AUTH <mechanism> [initial-response]` (RFC 4954).
    Auth {
        mechanism: &'a str,
        initial: Option<&'a str>,
    },
}

/// Why a command line is not acceptable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SyntaxError {
    /// Not a command saida knows.
    UnknownCommand,
    /// A known command with malformed arguments; names the expected grammar.
    Syntax { expected: &'static str },
    /// A malformed reverse-path.
    BadSender,
    /// A malformed forward-path.
    BadRecipient,
    /// An ESMTP parameter saida does not implement (RFC 5321 §4.1.1.11: 555).
    UnknownParameter,
    /// The line holds a NUL byte or is not UTF-8 where UTF-8 is required.
    BadBytes,
}

impl SyntaxError {
    /// The reply for this error.
    pub fn reply(&self) -> Reply {
        match self {
            SyntaxError::UnknownCommand => Reply::new(500, "5.5.1", "Command unrecognized"),
            SyntaxError::Syntax { expected } => {
                Reply::owned(501, "5.5.4", format!("Syntax: {expected}"))
            }
            SyntaxError::BadSender => Reply::new(501, "5.1.7", "Bad sender address syntax"),
            SyntaxError::BadRecipient => Reply::new(501, "5.1.3", "Bad recipient address syntax"),
            SyntaxError::UnknownParameter => {
                Reply::new(555, "5.5.4", "Parameter not recognized or not implemented")
            }
            SyntaxError::BadBytes => Reply::new(500, "5.5.2", "Invalid characters in command"),
        }
    }
}

/// Longest local part (RFC 5321 §4.5.3.1.1).
const LOCAL_PART_MAX: usize = 64;
/// Longest path including brackets (RFC 5321 §4.5.3.1.3).
const PATH_MAX: usize = 256;

/// Parses one command line (without CRLF).
pub fn parse_command(line: &[u8]) -> Result<Command<'_>, SyntaxError> {
    // NUL, CR, LF and every other control byte (TAB aside) are refused anywhere in a command:
    // nothing from a command line may carry a line break into headers or the next hop.
    if line.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err(SyntaxError::BadBytes);
    }
    let line = std::str::from_utf8(line).map_err(|_| SyntaxError::BadBytes)?;
    let (verb, rest) = match line.find(' ') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, ""),
    };
    let verb_is = |v: &str| verb.eq_ignore_ascii_case(v);
    let no_args = |c: Command<'static>, expected| {
        if rest.trim().is_empty() {
            Ok(c)
        } else {
            Err(SyntaxError::Syntax { expected })
        }
    };
    if verb_is("EHLO") || verb_is("HELO") {
        let domain = rest.trim();
        let expected = if verb_is("EHLO") {
            "EHLO domain"
        } else {
            "HELO domain"
        };
        if domain.is_empty() || domain.contains(' ') || !is_domain_or_literal(domain) {
            return Err(SyntaxError::Syntax { expected });
        }
        return Ok(if verb_is("EHLO") {
            Command::Ehlo(domain)
        } else {
            Command::Helo(domain)
        });
    }
    if verb_is("MAIL") {
        return parse_mail(rest);
    }
    if verb_is("RCPT") {
        return parse_rcpt(rest);
    }
    if verb_is("DATA") {
        return no_args(Command::Data, "DATA");
    }
    if verb_is("BDAT") {
        return parse_bdat(rest);
    }
    if verb_is("RSET") {
        return no_args(Command::Rset, "RSET");
    }
    if verb_is("NOOP") {
        return Ok(Command::Noop); // NOOP may carry a string (RFC 5321 §4.1.1.9)
    }
    if verb_is("QUIT") {
        return no_args(Command::Quit, "QUIT");
    }
    if verb_is("VRFY") {
        return if rest.trim().is_empty() {
            Err(SyntaxError::Syntax {
                expected: "VRFY string",
            })
        } else {
            Ok(Command::Vrfy)
        };
    }
    if verb_is("EXPN") {
        return Ok(Command::Expn);
    }
    if verb_is("HELP") {
        return Ok(Command::Help);
    }
    if verb_is("STARTTLS") {
        return no_args(Command::StartTls, "STARTTLS");
    }
    if verb_is("AUTH") {
        let mut parts = rest.split(' ').filter(|p| !p.is_empty());
        let expected = "AUTH mechanism [initial-response]";
        let mechanism = parts.next().ok_or(SyntaxError::Syntax { expected })?;
        let initial = parts.next();
        if parts.next().is_some()
            || !mechanism
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(SyntaxError::Syntax { expected });
        }
        return Ok(Command::Auth { mechanism, initial });
    }
    Err(SyntaxError::UnknownCommand)
}

fn parse_mail(rest: &str) -> Result<Command<'_>, SyntaxError> {
    let expected = "MAIL FROM:<address> [parameters]";
    let arg = strip_prefix_ci(rest, "FROM:").ok_or(SyntaxError::Syntax { expected })?;
    let (path, params) = split_path(arg.trim_start()).ok_or(SyntaxError::BadSender)?;
    let from = if path.is_empty() {
        ""
    } else {
        check_mailbox(path).ok_or(SyntaxError::BadSender)?
    };
    let mut p = MailParams::default();
    for (key, value) in esmtp_params(params)? {
        match (key.to_ascii_uppercase().as_str(), value) {
            ("SIZE", Some(v)) => {
                p.size = Some(v.parse().map_err(|_| SyntaxError::Syntax {
                    expected: "SIZE=<digits>",
                })?)
            }
            ("BODY", Some(v)) => {
                p.body = Some(match v.to_ascii_uppercase().as_str() {
                    "7BIT" => Body::SevenBit,
                    "8BITMIME" => Body::EightBitMime,
                    "BINARYMIME" => Body::BinaryMime,
                    _ => {
                        return Err(SyntaxError::Syntax {
                            expected: "BODY=7BIT|8BITMIME|BINARYMIME",
                        });
                    }
                })
            }
            ("SMTPUTF8", None) => p.smtputf8 = true,
            ("RET", Some(v)) => {
                p.ret = Some(match v.to_ascii_uppercase().as_str() {
                    "FULL" => Ret::Full,
                    "HDRS" => Ret::Hdrs,
                    _ => {
                        return Err(SyntaxError::Syntax {
                            expected: "RET=FULL|HDRS",
                        });
                    }
                })
            }
            ("ENVID", Some(v)) if is_xtext(v) && v.len() <= 100 => p.envid = Some(v),
            ("ENVID", _) => {
                return Err(SyntaxError::Syntax {
                    expected: "ENVID=<xtext, at most 100>",
                });
            }
            ("AUTH", Some(v)) => p.auth = Some(v),
            _ => return Err(SyntaxError::UnknownParameter),
        }
    }
    if !p.smtputf8 && !from.is_ascii() {
        return Err(SyntaxError::BadSender);
    }
    Ok(Command::Mail { from, params: p })
}

fn parse_rcpt(rest: &str) -> Result<Command<'_>, SyntaxError> {
    let expected = "RCPT TO:<address> [parameters]";
    let arg = strip_prefix_ci(rest, "TO:").ok_or(SyntaxError::Syntax { expected })?;
    let (path, params) = split_path(arg.trim_start()).ok_or(SyntaxError::BadRecipient)?;
    let to = if path.eq_ignore_ascii_case("postmaster") {
        path
    } else {
        check_mailbox(path).ok_or(SyntaxError::BadRecipient)?
    };
    let mut p = RcptParams::default();
    for (key, value) in esmtp_params(params)? {
        match (key.to_ascii_uppercase().as_str(), value) {
            ("NOTIFY", Some(v)) => p.notify = Some(parse_notify(v)?),
            ("ORCPT", Some(v)) => {
                let ok = v.len() <= 500
                    && v.split_once(';')
                        .is_some_and(|(t, a)| !t.is_empty() && is_xtext(a));
                if !ok {
                    return Err(SyntaxError::Syntax {
                        expected: "ORCPT=addr-type;xtext",
                    });
                }
                p.orcpt = Some(v);
            }
            _ => return Err(SyntaxError::UnknownParameter),
        }
    }
    Ok(Command::Rcpt { to, params: p })
}

fn parse_notify(v: &str) -> Result<u8, SyntaxError> {
    let expected = "NOTIFY=NEVER|SUCCESS,FAILURE,DELAY";
    let mut bits = 0u8;
    for word in v.split(',') {
        bits |= match word.to_ascii_uppercase().as_str() {
            "NEVER" => 1,
            "SUCCESS" => 2,
            "FAILURE" => 4,
            "DELAY" => 8,
            _ => return Err(SyntaxError::Syntax { expected }),
        };
    }
    if bits & 1 != 0 && bits != 1 {
        return Err(SyntaxError::Syntax { expected }); // NEVER excludes the others
    }
    Ok(bits)
}

fn parse_bdat(rest: &str) -> Result<Command<'_>, SyntaxError> {
    let expected = "BDAT size [LAST]";
    let mut parts = rest.split(' ').filter(|p| !p.is_empty());
    let size = parts
        .next()
        .filter(|s| !s.is_empty() && s.len() <= 19 && s.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|s| s.parse().ok())
        .ok_or(SyntaxError::Syntax { expected })?;
    let last = match parts.next() {
        None => false,
        Some(w) if w.eq_ignore_ascii_case("LAST") => true,
        Some(_) => return Err(SyntaxError::Syntax { expected }),
    };
    if parts.next().is_some() {
        return Err(SyntaxError::Syntax { expected });
    }
    Ok(Command::Bdat { size, last })
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// Splits `<path> params` into the path without brackets and the parameter text.
fn split_path(arg: &str) -> Option<(&str, &str)> {
    let arg = arg.strip_prefix('<')?;
    let end = arg.find('>')?;
    if end + 2 > PATH_MAX {
        return None;
    }
    let path = &arg[..end];
    // A source route (`@a,@b:user@host`) is accepted and ignored (RFC 5321 §4.1.2, C.).
    let path = match path.strip_prefix('@') {
        Some(route) => route.split_once(':')?.1,
        None => path,
    };
    Some((path, &arg[end + 1..]))
}

fn esmtp_params(text: &str) -> Result<Vec<(&str, Option<&str>)>, SyntaxError> {
    let mut out = Vec::new();
    if !text.is_empty() && !text.starts_with(' ') {
        return Err(SyntaxError::Syntax {
            expected: "a space between the path and parameters",
        });
    }
    for word in text.split(' ').filter(|w| !w.is_empty()) {
        let (key, value) = match word.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (word, None),
        };
        let key_ok = !key.is_empty() && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        let value_bad =
            value.is_some_and(|v| v.is_empty() || v.bytes().any(|b| b <= b' ' || b == 0x7f));
        if !key_ok || value_bad {
            return Err(SyntaxError::Syntax {
                expected: "keyword[=value] parameters",
            });
        }
        out.push((key, value));
        if out.len() > 16 {
            return Err(SyntaxError::Syntax {
                expected: "at most 16 parameters",
            });
        }
    }
    Ok(out)
}

/// Checks `local@domain` (dot-string or quoted-string local part; domain or address literal).
/// Returns the mailbox unchanged when valid.
fn check_mailbox(path: &str) -> Option<&str> {
    let at = path.rfind('@')?;
    let (local, domain) = (&path[..at], &path[at + 1..]);
    if local.is_empty() || local.len() > LOCAL_PART_MAX || !is_domain_or_literal(domain) {
        return None;
    }
    let local_ok = if let Some(q) = local.strip_prefix('"') {
        let inner = q.strip_suffix('"')?;
        // qtextSMTP, or quoted-pairSMTP: a backslash and one printable ASCII character.
        let mut escaped = false;
        let ok = inner.chars().all(|c| {
            if escaped {
                escaped = false;
                return (' '..='~').contains(&c);
            }
            if c == '\\' {
                escaped = true;
                return true;
            }
            c != '"' && !c.is_control()
        });
        ok && !escaped
    } else {
        !local.starts_with('.')
            && !local.ends_with('.')
            && !local.contains("..")
            && local.chars().all(|c| {
                !c.is_ascii() || c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~.".contains(c)
            })
    };
    local_ok.then_some(path)
}

/// A domain name (letters, digits, hyphens, dots; UTF-8 labels allowed for SMTPUTF8) or an
/// address literal `[1.2.3.4]` / `[IPv6:...]`.
pub fn is_domain_or_literal(d: &str) -> bool {
    if let Some(lit) = d.strip_prefix('[').and_then(|x| x.strip_suffix(']')) {
        return match lit
            .strip_prefix("IPv6:")
            .or_else(|| lit.strip_prefix("ipv6:"))
        {
            Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
            None => lit.parse::<std::net::Ipv4Addr>().is_ok(),
        };
    }
    !d.is_empty()
        && d.len() <= 255
        && d.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .chars()
                    .all(|c| !c.is_ascii() || c.is_ascii_alphanumeric() || c == '-')
        })
}

/// RFC 3461 xtext: printable ASCII except `+` and `=`, or `+XX` hex escapes.
fn is_xtext(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => {
                let hex = |x: &u8| x.is_ascii_digit() || (b'A'..=b'F').contains(x);
                if !(b.get(i + 1).is_some_and(hex) && b.get(i + 2).is_some_and(hex)) {
                    return false;
                }
                i += 3;
            }
            b'!'..=b'~' if b[i] != b'=' => i += 1,
            _ => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(line: &str) -> Command<'_> {
        parse_command(line.as_bytes()).unwrap_or_else(|e| panic!("{line:?}: {e:?}"))
    }

    fn err(line: &str) -> SyntaxError {
        parse_command(line.as_bytes()).expect_err(line)
    }

    #[test]
    fn parses_the_rfc_5321_commands() {
        let table: &[(&str, Command<'_>)] = &[
            (
                "EHLO client.example.com",
                Command::Ehlo("client.example.com"),
            ),
            ("ehlo [192.0.2.1]", Command::Ehlo("[192.0.2.1]")),
            (
                "HELO [IPv6:2001:db8::1]",
                Command::Helo("[IPv6:2001:db8::1]"),
            ),
            ("DATA", Command::Data),
            ("RSET", Command::Rset),
            ("NOOP anything", Command::Noop),
            ("QUIT", Command::Quit),
            ("VRFY postmaster", Command::Vrfy),
            ("EXPN list", Command::Expn),
            ("HELP", Command::Help),
            ("STARTTLS", Command::StartTls),
            (
                "BDAT 1000",
                Command::Bdat {
                    size: 1000,
                    last: false,
                },
            ),
            (
                "BDAT 0 LAST",
                Command::Bdat {
                    size: 0,
                    last: true,
                },
            ),
            (
                "AUTH PLAIN AGFAYg==",
                Command::Auth {
                    mechanism: "PLAIN",
                    initial: Some("AGFAYg=="),
                },
            ),
            (
                "AUTH LOGIN",
                Command::Auth {
                    mechanism: "LOGIN",
                    initial: None,
                },
            ),
        ];
        for (line, expected) in table {
            assert_eq!(&ok(line), expected, "{line}");
        }
    }

    #[test]
    fn parses_mail_with_every_parameter() {
        let Command::Mail { from, params } =
            ok("MAIL FROM:<a@b.example> SIZE=1000 BODY=8BITMIME RET=HDRS ENVID=QQ+2B1 AUTH=<>")
        else {
            panic!()
        };
        assert_eq!(from, "a@b.example");
        assert_eq!(params.size, Some(1000));
        assert_eq!(params.body, Some(Body::EightBitMime));
        assert_eq!(params.ret, Some(Ret::Hdrs));
        assert_eq!(params.envid, Some("QQ+2B1"));
    }

    #[test]
    fn null_sender_and_postmaster_are_valid() {
        assert!(matches!(ok("MAIL FROM:<>"), Command::Mail { from: "", .. }));
        assert!(matches!(
            ok("RCPT TO:<Postmaster>"),
            Command::Rcpt {
                to: "Postmaster",
                ..
            }
        ));
    }

    #[test]
    fn parses_rcpt_dsn_parameters() {
        let Command::Rcpt { to, params } =
            ok("RCPT TO:<u@x.example> NOTIFY=FAILURE,DELAY ORCPT=rfc822;u@x.example")
        else {
            panic!()
        };
        assert_eq!(to, "u@x.example");
        assert_eq!(params.notify, Some(4 | 8));
        assert_eq!(params.orcpt, Some("rfc822;u@x.example"));
    }

    #[test]
    fn utf8_sender_needs_smtputf8() {
        assert_eq!(err("MAIL FROM:<jöran@b.example>"), SyntaxError::BadSender);
        assert!(matches!(
            ok("MAIL FROM:<jöran@b.example> SMTPUTF8"),
            Command::Mail { .. }
        ));
    }

    #[test]
    fn source_routes_are_ignored() {
        assert!(matches!(
            ok("RCPT TO:<@relay.example:u@x.example>"),
            Command::Rcpt {
                to: "u@x.example",
                ..
            }
        ));
    }

    #[test]
    fn rejects_malformed_commands_with_the_right_error() {
        let table: &[(&str, SyntaxError)] = &[
            ("FOO", SyntaxError::UnknownCommand),
            (
                "EHLO",
                SyntaxError::Syntax {
                    expected: "EHLO domain",
                },
            ),
            (
                "EHLO bad..domain",
                SyntaxError::Syntax {
                    expected: "EHLO domain",
                },
            ),
            (
                "MAIL TO:<a@b.example>",
                SyntaxError::Syntax {
                    expected: "MAIL FROM:<address> [parameters]",
                },
            ),
            ("MAIL FROM:a@b.example", SyntaxError::BadSender),
            ("MAIL FROM:<a@>", SyntaxError::BadSender),
            ("MAIL FROM:<a..b@c.example>", SyntaxError::BadSender),
            (
                "MAIL FROM:<a@b.example> FOO=1",
                SyntaxError::UnknownParameter,
            ),
            (
                "MAIL FROM:<a@b.example> SIZE=abc",
                SyntaxError::Syntax {
                    expected: "SIZE=<digits>",
                },
            ),
            ("RCPT TO:<>", SyntaxError::BadRecipient),
            (
                "RCPT TO:<u@x.example> NOTIFY=NEVER,SUCCESS",
                SyntaxError::Syntax {
                    expected: "NOTIFY=NEVER|SUCCESS,FAILURE,DELAY",
                },
            ),
            ("DATA now", SyntaxError::Syntax { expected: "DATA" }),
            (
                "BDAT x",
                SyntaxError::Syntax {
                    expected: "BDAT size [LAST]",
                },
            ),
            (
                "BDAT 10 FIRST",
                SyntaxError::Syntax {
                    expected: "BDAT size [LAST]",
                },
            ),
            ("QUIT now", SyntaxError::Syntax { expected: "QUIT" }),
            ("NOOP\0", SyntaxError::BadBytes),
        ];
        for (line, expected) in table {
            assert_eq!(&err(line), expected, "{line}");
        }
    }

    #[test]
    fn overlong_local_part_is_refused() {
        let line = format!("RCPT TO:<{}@x.example>", "a".repeat(65));
        assert_eq!(err(&line), SyntaxError::BadRecipient);
    }

    #[test]
    fn every_error_has_an_enhanced_code() {
        for e in [
            SyntaxError::UnknownCommand,
            SyntaxError::BadSender,
            SyntaxError::UnknownParameter,
        ] {
            let r = e.reply();
            assert!(r.code >= 500 && r.enhanced.starts_with("5."), "{r:?}");
        }
    }
}
