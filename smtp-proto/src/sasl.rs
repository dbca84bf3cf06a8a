//! SASL for SMTP AUTH (RFC 4954): the PLAIN response (RFC 4616) both ways, and the base64
//! lines of the LOGIN exchange (draft-murchison-sasl-login).

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;

/// Decodes a SASL PLAIN response (`authzid NUL authcid NUL passwd`, base64). The authorization
/// identity must be empty or equal to the user.
pub fn decode_plain(b64: &str) -> Option<(String, String)> {
    let raw = B64.decode(b64.trim()).ok()?;
    let mut parts = raw.split(|&b| b == 0);
    let (authz, user, pass) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || user.is_empty() || (!authz.is_empty() && authz != user) {
        return None;
    }
    Some((
        String::from_utf8(user.to_vec()).ok()?,
        String::from_utf8(pass.to_vec()).ok()?,
    ))
}

/// Decodes one base64 line of a SASL LOGIN exchange.
pub fn decode_b64_text(b64: &str) -> Option<String> {
    String::from_utf8(B64.decode(b64.trim()).ok()?).ok()
}

/// Base64 of `text`, for `334` challenges.
pub fn b64(text: &str) -> String {
    B64.encode(text)
}

/// The PLAIN initial response a client sends for `user` and `password` (empty authzid).
pub fn plain_response(user: &str, password: &str) -> String {
    B64.encode(format!("\0{user}\0{password}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sasl_plain_decoding() {
        assert_eq!(
            decode_plain(&plain_response("alice", "pw")),
            Some(("alice".into(), "pw".into()))
        );
        assert_eq!(
            decode_plain(&B64.encode("\0alice\0pw")),
            Some(("alice".into(), "pw".into()))
        );
        assert_eq!(
            decode_plain(&B64.encode("alice\0alice\0pw")),
            Some(("alice".into(), "pw".into()))
        );
        assert_eq!(decode_plain(&B64.encode("bob\0alice\0pw")), None);
        assert_eq!(decode_plain("not base64!"), None);
    }
}
