//! Headers saida adds to accepted messages: `Received:` (RFC 5321 §4.4, RFC 3848 protocol
//! names) and `Message-ID:` when the client sent none; and the fields it reads
//! ([`find_field`]) or takes out ([`take_field`]: a control header that must not reach a
//! recipient). Pure functions.

use std::net::IpAddr;

/// What the `Received:` header records about the session.
pub struct ReceivedInfo<'a> {
    pub helo: &'a str,
    pub client_ip: IpAddr,
    pub hostname: &'a str,
    pub esmtp: bool,
    pub tls: Option<(String, String)>,
    pub authenticated: bool,
    pub queue_id: &'a str,
    pub sender: &'a str,
    /// The recipient, when there is exactly one (naming several would disclose Bcc lists).
    pub single_rcpt: Option<&'a str>,
    pub unix_secs: u64,
}

/// The `Received:` header, folded, CRLF-terminated.
pub fn received(r: &ReceivedInfo<'_>) -> String {
    // RFC 3848: SMTP, ESMTP, ESMTPS (TLS), ESMTPA (auth), ESMTPSA (both).
    let proto = match (r.esmtp, r.tls.is_some(), r.authenticated) {
        (false, _, _) => "SMTP",
        (true, false, false) => "ESMTP",
        (true, true, false) => "ESMTPS",
        (true, false, true) => "ESMTPA",
        (true, true, true) => "ESMTPSA",
    };
    let ip = match r.client_ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("IPv6:{v6}"),
    };
    let mut h = format!(
        "Received: from {} ([{ip}])\r\n\tby {} (saida) with {proto}",
        r.helo, r.hostname
    );
    if let Some((version, cipher)) = &r.tls {
        h.push_str(&format!("\r\n\t(using {version} with cipher {cipher})"));
    }
    h.push_str(&format!("\r\n\tid {}", r.queue_id));
    h.push_str(&format!("\r\n\t(envelope-from <{}>)", r.sender));
    if let Some(rcpt) = r.single_rcpt {
        h.push_str(&format!("\r\n\tfor <{rcpt}>"));
    }
    h.push_str(&format!(";\r\n\t{}\r\n", rfc5322_date(r.unix_secs)));
    h
}

/// Number of `Received:` fields in the header section of `message` (each hop adds one; a
/// count past `[smtp] received_headers_max` means a mail loop).
pub fn received_count(message: &[u8]) -> usize {
    count_fields(message, "Received")
}

/// The `554 5.4.6` text for a message refused as looping.
pub fn loop_refusal(count: usize) -> String {
    format!("Too many Received headers ({count}): mail loop detected")
}

/// True when the header section of `message` has a `Message-ID:` field.
pub fn has_message_id(message: &[u8]) -> bool {
    find_message_id(message).is_some()
}

/// The value of the `Message-ID:` header (trimmed, unfolded lines only), if the header section
/// has one.
pub fn find_message_id(message: &[u8]) -> Option<&str> {
    find_field(message, "Message-ID")
}

/// How many `name:` fields the header section of `message` has.
pub fn count_fields(message: &[u8], name: &str) -> usize {
    let n = name.len();
    message
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .take_while(|l| !l.is_empty())
        .filter(|l| l.len() > n && l[n] == b':' && l[..n].eq_ignore_ascii_case(name.as_bytes()))
        .count()
}

/// The first line of the first `name:` field's value (trimmed), if the header section has one.
pub fn find_field<'a>(message: &'a [u8], name: &str) -> Option<&'a str> {
    let n = name.len();
    for line in message.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            return None; // end of the header section
        }
        if line.len() > n && line[n] == b':' && line[..n].eq_ignore_ascii_case(name.as_bytes()) {
            return std::str::from_utf8(&line[n + 1..]).ok().map(str::trim);
        }
    }
    None
}

/// `Message-ID: <queue-id@hostname>` with CRLF.
pub fn message_id(queue_id: &str, hostname: &str) -> String {
    format!("Message-ID: <{queue_id}@{hostname}>\r\n")
}

/// Removes every `name:` field (with its folded continuation lines) from the header section of
/// `message`; returns the first one's value (unfolded, trimmed) if there was one. The body and
/// other fields are left byte for byte.
pub fn take_field(message: &mut Vec<u8>, name: &str) -> Option<String> {
    let mut value: Option<String> = None;
    let mut out = Vec::with_capacity(message.len());
    let mut pos = 0;
    // Inside a field being removed; `first`: the one whose value is returned.
    let (mut removing, mut first) = (false, false);
    while pos < message.len() {
        let end = message[pos..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(message.len(), |i| pos + i + 1);
        let line = &message[pos..end];
        let bare = line.strip_suffix(b"\n").unwrap_or(line);
        let bare = bare.strip_suffix(b"\r").unwrap_or(bare);
        if bare.is_empty() {
            // The end of the header section: the rest is the body.
            out.extend_from_slice(&message[pos..]);
            break;
        }
        let continuation = matches!(line[0], b' ' | b'\t');
        let named = !continuation
            && bare.len() > name.len()
            && bare[name.len()] == b':'
            && bare[..name.len()].eq_ignore_ascii_case(name.as_bytes());
        if named {
            removing = true;
            first = value.is_none();
            if first {
                let v = String::from_utf8_lossy(&bare[name.len() + 1..]);
                value = Some(v.trim().to_string());
            }
        } else if continuation && removing {
            if let Some(v) = value.as_mut().filter(|_| first) {
                v.push(' ');
                v.push_str(String::from_utf8_lossy(bare).trim());
            }
        } else {
            removing = false;
            out.extend_from_slice(line);
        }
        pos = end;
    }
    if value.is_some() {
        *message = out;
    }
    value
}

/// A UTC calendar date and time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Civil {
    pub year: i64,
    /// 1 ..= 12
    pub month: u32,
    /// 1 ..= 31
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
    /// 0 = Thursday (1970-01-01), ... 6 = Wednesday.
    weekday_from_thursday: u32,
}

/// Calendar date of a Unix time (Howard Hinnant's days-to-civil algorithm).
pub fn civil(unix_secs: u64) -> Civil {
    let days = unix_secs / 86_400;
    let secs = unix_secs % 86_400;
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    Civil {
        year: yoe + era * 400 + i64::from(month <= 2),
        month,
        day,
        hour: (secs / 3600) as u32,
        minute: (secs % 3600 / 60) as u32,
        second: (secs % 60) as u32,
        weekday_from_thursday: (days % 7) as u32,
    }
}

/// `Sat, 28 Nov 2026 04:30:00 +0000` (RFC 5322 §3.3), in UTC.
pub fn rfc5322_date(unix_secs: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let c = civil(unix_secs);
    format!(
        "{}, {} {} {} {:02}:{:02}:{:02} +0000",
        DAYS[c.weekday_from_thursday as usize],
        c.day,
        MONTHS[(c.month - 1) as usize],
        c.year,
        c.hour,
        c.minute,
        c.second
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_field_is_taken_out_with_its_continuations_and_nothing_else_moves() {
        let mut m = b"From: a@b.test\r\nX-Saida-Pool: bulk\r\n  -eu\r\nSubject: x\r\n\
            x-saida-pool: other\r\n\r\nX-Saida-Pool: in the body\r\n"
            .to_vec();
        assert_eq!(
            take_field(&mut m, "X-Saida-Pool").as_deref(),
            Some("bulk -eu")
        );
        assert_eq!(
            m,
            b"From: a@b.test\r\nSubject: x\r\n\r\nX-Saida-Pool: in the body\r\n".to_vec()
        );
        let mut none = b"Subject: y\r\n\r\nbody\r\n".to_vec();
        assert_eq!(take_field(&mut none, "X-Saida-Pool"), None);
        assert_eq!(none, b"Subject: y\r\n\r\nbody\r\n".to_vec());
        let mut prefix = b"X-Saida-Pools: no\r\n\r\n".to_vec();
        assert_eq!(take_field(&mut prefix, "X-Saida-Pool"), None);
    }

    #[test]
    fn dates_are_rfc5322() {
        assert_eq!(rfc5322_date(0), "Thu, 1 Jan 1970 00:00:00 +0000");
        assert_eq!(
            rfc5322_date(1_795_840_200),
            "Sat, 28 Nov 2026 04:30:00 +0000"
        );
        assert_eq!(rfc5322_date(951_782_400), "Tue, 29 Feb 2000 00:00:00 +0000");
    }

    #[test]
    fn message_id_is_found_only_in_the_header_section() {
        assert!(has_message_id(
            b"Subject: x\r\nMessage-Id: <a@b>\r\n\r\nbody"
        ));
        assert!(!has_message_id(
            b"Subject: x\r\n\r\nMessage-ID: <in body>\r\n"
        ));
    }

    #[test]
    fn received_names_protocol_and_single_recipient() {
        let h = received(&ReceivedInfo {
            helo: "client.test",
            client_ip: "127.0.0.1".parse().unwrap(),
            hostname: "mx.test",
            esmtp: true,
            tls: Some(("TLSv1.3".into(), "TLS13_AES_256_GCM_SHA384".into())),
            authenticated: true,
            queue_id: "ABC",
            sender: "a@b.test",
            single_rcpt: Some("c@d.test"),
            unix_secs: 0,
        });
        assert!(h.starts_with(
            "Received: from client.test ([127.0.0.1])\r\n\tby mx.test (saida) with ESMTPSA"
        ));
        assert!(h.contains("for <c@d.test>;"));
        assert!(h.ends_with("+0000\r\n"));
        assert!(!h.contains("\n\n"));
    }
}
