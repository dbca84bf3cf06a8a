//! SMTP replies: a code, an enhanced status code (RFC 3463) and text, encoded as one or more
//! `code[-| ]enhanced text` lines (RFC 5321 §4.2). Sans-IO.

use std::borrow::Cow;

/// One reply. Multi-line replies (EHLO) carry their extra lines in `lines`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// Enhanced status code (`2.0.0`); empty where RFC 2034 says none is sent (greeting, EHLO).
    pub enhanced: &'static str,
    pub text: Cow<'static, str>,
    /// Further lines, sent before `text`'s line as `code-...`.
    pub lines: Vec<String>,
}

impl Reply {
    /// A reply with static text.
    pub const fn new(code: u16, enhanced: &'static str, text: &'static str) -> Reply {
        Reply {
            code,
            enhanced,
            text: Cow::Borrowed(text),
            lines: Vec::new(),
        }
    }

    /// A reply with computed text.
    pub fn owned(code: u16, enhanced: &'static str, text: String) -> Reply {
        Reply {
            code,
            enhanced,
            text: Cow::Owned(text),
            lines: Vec::new(),
        }
    }

    /// Appends the wire form to `out`. Text never contains CR or LF (they are replaced), so a
    /// reply cannot inject lines.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut line = |sep: char, text: &str, enhanced: bool| {
            out.extend_from_slice(self.code.to_string().as_bytes());
            out.push(sep as u8);
            if enhanced && !self.enhanced.is_empty() {
                out.extend_from_slice(self.enhanced.as_bytes());
                out.push(b' ');
            }
            out.extend(
                text.bytes()
                    .map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
            );
            out.extend_from_slice(b"\r\n");
        };
        // The first line of an EHLO reply is the greeting line; the rest are keywords.
        let mut all: Vec<&str> = Vec::with_capacity(self.lines.len() + 1);
        all.push(&self.text);
        all.extend(self.lines.iter().map(String::as_str));
        let last = all.len() - 1;
        for (i, text) in all.iter().enumerate() {
            line(
                if i == last { ' ' } else { '-' },
                text,
                self.lines.is_empty(),
            );
        }
    }

    /// The wire form as a string (for tests).
    #[cfg(test)]
    pub fn to_wire(&self) -> String {
        let mut v = Vec::new();
        self.encode(&mut v);
        String::from_utf8_lossy(&v).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_line_carries_the_enhanced_code() {
        assert_eq!(Reply::new(250, "2.1.0", "Ok").to_wire(), "250 2.1.0 Ok\r\n");
    }

    #[test]
    fn multi_line_uses_dashes_until_the_last_line() {
        let mut r = Reply::new(250, "", "mx.example");
        r.lines = vec!["PIPELINING".into(), "SIZE 100".into()];
        assert_eq!(
            r.to_wire(),
            "250-mx.example\r\n250-PIPELINING\r\n250 SIZE 100\r\n"
        );
    }

    #[test]
    fn text_cannot_inject_lines() {
        let r = Reply::owned(550, "5.1.1", "no\r\n250 ok".into());
        assert_eq!(r.to_wire(), "550 5.1.1 no  250 ok\r\n");
    }
}
