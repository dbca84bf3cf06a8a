//! Delivery status notifications (RFC 3464 `multipart/report`, RFC 3461 DSN parameters): the
//! bounce saida sends to a message's envelope sender when recipients fail permanently or expire,
//! and the delay report for recipients that asked for one (`NOTIFY=DELAY`) and are still
//! being retried.
//!
//! Pure: builds the bounce's bytes from the original message and the failed recipients; the
//! caller queues it like any message, with the null reverse-path `<>` so that a bounce can never
//! cause another bounce. Returns nothing when no bounce is due: the sender is `<>`, or every
//! failed recipient asked for none (`NOTIFY=NEVER`, or a NOTIFY list without FAILURE).

use spool::{DsnRet, Message, notify};

use smtp_proto::headers::rfc5322_date;

/// The most of the original message a bounce carries; beyond it only the headers are returned.
pub const RETURNED_MESSAGE_BYTES_MAX: usize = 256 << 10;
/// Longest diagnostic quoted in a bounce line (lines must stay under 998 octets).
const DIAGNOSTIC_CHARS_MAX: usize = 900;

/// A recipient that failed.
#[derive(Clone, Debug)]
pub struct FailedRecipient<'a> {
    pub address: &'a str,
    /// DSN `ORCPT` as stored (`rfc822;user@host`), or empty.
    pub orcpt: &'a str,
    /// NOTIFY bits the client asked for (0 = not given: failures are reported).
    pub notify: u8,
    /// Enhanced status code (`5.1.1`; `4.4.7` for an expired message).
    pub status: &'a str,
    /// The remote reply or local reason, for `Diagnostic-Code`.
    pub diagnostic: &'a str,
    /// The MX host that gave the reply, if one did.
    pub remote_mta: Option<&'a str>,
    /// What the failure means (`bad_mailbox`...; `delivery::bounce_class`), as an extension
    /// field `X-Saida-Bounce-Class`.
    pub class: Option<&'a str>,
}

/// Which report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Report {
    /// The recipients failed (`Action: failed`).
    Failure,
    /// The recipients are still being retried, until then (`Action: delayed`).
    Delay { retry_until_secs: u64 },
}

/// A bounce ready to queue: envelope sender `<>`, one recipient.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bounce {
    pub recipient: String,
    pub body: Vec<u8>,
    /// The returned content has 8-bit bytes: send with `BODY=8BITMIME`.
    pub eight_bit: bool,
    /// The recipient address is UTF-8: send with `SMTPUTF8`. (RFC 6533's `message/global`
    /// types are not used yet; the report parts stay `message/delivery-status`.)
    pub smtputf8: bool,
}

/// Builds the bounce for `failed` recipients of `original`, or `None` when none is due.
/// `id` makes the Message-ID unique (the caller passes the new queue id); `random` makes the
/// MIME boundary unguessable, so content of the returned message cannot end a MIME part.
pub fn build_bounce(
    original: &Message<'_>,
    failed: &[FailedRecipient<'_>],
    reporting_mta: &str,
    id: &str,
    random: u64,
    now_secs: u64,
    kind: Report,
) -> Option<Bounce> {
    if original.sender.is_empty() {
        return None; // never a bounce to the null sender
    }
    let asked = |r: &&FailedRecipient<'_>| match kind {
        Report::Failure => {
            r.notify == 0 || (r.notify & notify::FAILURE != 0 && r.notify & notify::NEVER == 0)
        }
        // Delay reports only for those who asked (RFC 3461 §4.1 leaves the default to us).
        Report::Delay { .. } => r.notify & notify::DELAY != 0 && r.notify & notify::NEVER == 0,
    };
    let wanted: Vec<&FailedRecipient<'_>> = failed.iter().filter(asked).collect();
    if wanted.is_empty() {
        return None;
    }
    // At most 70 characters (RFC 2046 §5.1.1): 32 + 1 + 16.
    let boundary = format!("{}={random:016x}", &id[..id.len().min(32)]);
    let date = rfc5322_date(now_secs);
    let mut b = String::new();
    let line = |b: &mut String, s: &str| {
        b.push_str(s);
        b.push_str("\r\n");
    };
    line(
        &mut b,
        &format!("From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>"),
    );
    line(&mut b, &format!("To: <{}>", original.sender));
    line(
        &mut b,
        match kind {
            Report::Failure => "Subject: Undelivered Mail Returned to Sender",
            Report::Delay { .. } => "Subject: Delayed Mail (still being retried)",
        },
    );
    line(&mut b, &format!("Date: {date}"));
    line(&mut b, &format!("Message-ID: <{id}@{reporting_mta}>"));
    line(&mut b, "Auto-Submitted: auto-replied");
    line(&mut b, "MIME-Version: 1.0");
    line(
        &mut b,
        &format!(
            "Content-Type: multipart/report; report-type=delivery-status;\r\n\
             \tboundary=\"{boundary}\""
        ),
    );
    line(&mut b, "");
    line(&mut b, "This is a MIME-encapsulated message.");
    line(&mut b, "");
    // Part 1: for people.
    line(&mut b, &format!("--{boundary}"));
    line(&mut b, "Content-Type: text/plain; charset=utf-8");
    line(&mut b, "");
    line(
        &mut b,
        &format!("This is the mail system at host {reporting_mta}."),
    );
    line(&mut b, "");
    match kind {
        Report::Failure => line(
            &mut b,
            "Your message could not be delivered to the following recipients:",
        ),
        Report::Delay { retry_until_secs } => line(
            &mut b,
            &format!(
                "Your message has not been delivered yet to the following recipients. It is \
                 still queued and will be retried until {}; you do not need to send it again.",
                rfc5322_date(retry_until_secs)
            ),
        ),
    }
    line(&mut b, "");
    for r in &wanted {
        line(
            &mut b,
            &format!("<{}>: {}", r.address, one_line(r.diagnostic)),
        );
    }
    line(&mut b, "");
    // Part 2: for programs (RFC 3464 §2).
    line(&mut b, &format!("--{boundary}"));
    line(&mut b, "Content-Type: message/delivery-status");
    line(&mut b, "");
    line(&mut b, &format!("Reporting-MTA: dns; {reporting_mta}"));
    if !original.envid.is_empty() {
        line(&mut b, &format!("Original-Envelope-Id: {}", original.envid));
    }
    line(
        &mut b,
        &format!(
            "Arrival-Date: {}",
            rfc5322_date(original.received_at_micros / 1_000_000)
        ),
    );
    for r in &wanted {
        line(&mut b, "");
        line(&mut b, &format!("Final-Recipient: rfc822; {}", r.address));
        if let Some((kind, addr)) = r.orcpt.split_once(';') {
            line(&mut b, &format!("Original-Recipient: {kind}; {addr}"));
        }
        match kind {
            Report::Failure => line(&mut b, "Action: failed"),
            Report::Delay { retry_until_secs } => {
                line(&mut b, "Action: delayed");
                let until = rfc5322_date(retry_until_secs);
                line(&mut b, &format!("Will-Retry-Until: {until}"));
            }
        }
        line(&mut b, &format!("Status: {}", r.status));
        if let Some(mta) = r.remote_mta {
            line(&mut b, &format!("Remote-MTA: dns; {mta}"));
        }
        line(
            &mut b,
            &format!("Diagnostic-Code: smtp; {}", one_line(r.diagnostic)),
        );
        if let Some(class) = r.class {
            line(&mut b, &format!("X-Saida-Bounce-Class: {class}"));
        }
    }
    line(&mut b, "");
    // Part 3: the original, whole (RET=FULL, if not too large) or its headers.
    line(&mut b, &format!("--{boundary}"));
    let headers_end = original
        .body
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(original.body.len(), |i| i + 2);
    // A delay report carries the headers only: the message is still on its way.
    let full = kind == Report::Failure
        && original.dsn_ret == DsnRet::Full
        && original.body.len() <= RETURNED_MESSAGE_BYTES_MAX;
    let mut body = b.into_bytes();
    if full {
        body.extend_from_slice(b"Content-Type: message/rfc822\r\n\r\n");
        body.extend_from_slice(original.body);
        if !original.body.ends_with(b"\r\n") {
            body.extend_from_slice(b"\r\n");
        }
    } else {
        body.extend_from_slice(b"Content-Type: text/rfc822-headers\r\n\r\n");
        body.extend_from_slice(&original.body[..headers_end]);
    }
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let eight_bit = body.iter().any(|&b| b >= 0x80);
    let smtputf8 = !original.sender.is_ascii();
    Some(Bounce {
        recipient: original.sender.to_string(),
        body,
        eight_bit,
        smtputf8,
    })
}

/// Replies can be multi-line; a DSN field is one line.
fn one_line(s: &str) -> String {
    let joined = s
        .split(['\r', '\n'])
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    match joined.char_indices().nth(DIAGNOSTIC_CHARS_MAX) {
        Some((cut, _)) => format!("{}...", &joined[..cut]),
        None => joined,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spool::{QueueId, Recipient};

    fn original(sender: &str, ret: DsnRet) -> Message<'_> {
        Message {
            queue_id: QueueId(1),
            received_at_micros: 1_795_840_200_000_000,
            flags: 0,
            dsn_ret: ret,
            tenant: "",
            sender,
            envid: "ENV1",
            recipients: vec![Recipient::new("u@dest.test")],
            body: b"Subject: hello\r\nFrom: s@origin.test\r\n\r\nsecret body\r\n",
        }
    }

    fn failed(notify: u8) -> FailedRecipient<'static> {
        FailedRecipient {
            address: "u@dest.test",
            orcpt: "rfc822;U@dest.test",
            notify,
            status: "5.1.1",
            diagnostic: "550 5.1.1 no such user\r\n",
            remote_mta: Some("mx.dest.test"),
            class: None,
        }
    }

    #[test]
    fn bounce_is_a_multipart_report_with_the_status_of_each_recipient() {
        let o = original("s@origin.test", DsnRet::Unspecified);
        let b = build_bounce(
            &o,
            &[failed(0)],
            "mta.saida.test",
            "Q1",
            7,
            1_795_840_300,
            Report::Failure,
        )
        .unwrap();
        assert_eq!(b.recipient, "s@origin.test");
        let text = String::from_utf8(b.body).unwrap();
        assert!(text.contains("Content-Type: multipart/report; report-type=delivery-status;"));
        assert!(
            text.contains("Reporting-MTA: dns; mta.saida.test\r\nOriginal-Envelope-Id: ENV1\r\n")
        );
        assert!(text.contains(
            "Final-Recipient: rfc822; u@dest.test\r\nOriginal-Recipient: rfc822; U@dest.test\r\n\
             Action: failed\r\nStatus: 5.1.1\r\nRemote-MTA: dns; mx.dest.test\r\n\
             Diagnostic-Code: smtp; 550 5.1.1 no such user\r\n"
        ));
        // Without RET=FULL only the headers come back.
        assert!(text.contains("Content-Type: text/rfc822-headers\r\n\r\nSubject: hello\r\n"));
        assert!(!text.contains("secret body"));
        assert!(text.ends_with("\r\n--Q1=0000000000000007--\r\n"));
        assert!(
            !text.replace("\r\n", "").contains('\n'),
            "only CRLF line ends"
        );
    }

    #[test]
    fn long_diagnostics_are_cut_to_one_short_line() {
        let o = original("s@origin.test", DsnRet::Unspecified);
        let long = "x".repeat(5000);
        let mut f = failed(0);
        f.diagnostic = &long;
        let b = build_bounce(&o, &[f], "m.test", "Q", 7, 0, Report::Failure).unwrap();
        let text = String::from_utf8(b.body).unwrap();
        assert!(
            text.split("\r\n").all(|l| l.len() < 998),
            "a line is too long"
        );
    }

    #[test]
    fn ret_full_returns_the_whole_message() {
        let o = original("s@origin.test", DsnRet::Full);
        let text = String::from_utf8(
            build_bounce(&o, &[failed(0)], "m.test", "Q", 7, 0, Report::Failure)
                .unwrap()
                .body,
        )
        .unwrap();
        assert!(text.contains("Content-Type: message/rfc822\r\n\r\nSubject: hello"));
        assert!(text.contains("secret body"));
    }

    #[test]
    fn a_delay_report_goes_to_those_who_asked_and_says_until_when() {
        let o = original("s@origin.test", DsnRet::Full);
        let until = 1_795_840_300 + 5 * 86_400;
        let kind = Report::Delay {
            retry_until_secs: until,
        };
        let asked = FailedRecipient {
            status: "4.7.1",
            ..failed(notify::DELAY | notify::FAILURE)
        };
        assert!(build_bounce(&o, &[failed(0)], "m.test", "Q", 7, 0, kind).is_none());
        assert!(build_bounce(&o, &[failed(notify::FAILURE)], "m.test", "Q", 7, 0, kind).is_none());
        let b = build_bounce(&o, &[asked], "m.test", "Q", 7, 0, kind).unwrap();
        let text = String::from_utf8(b.body).unwrap();
        assert!(
            text.contains("Subject: Delayed Mail (still being retried)"),
            "{text}"
        );
        assert!(
            text.contains("Action: delayed\r\nWill-Retry-Until: "),
            "{text}"
        );
        assert!(text.contains("Status: 4.7.1"), "{text}");
        assert!(text.contains(&rfc5322_date(until)));
        assert!(text.contains("text/rfc822-headers"), "headers only: {text}");
        assert!(!text.contains("secret body"));
    }

    #[test]
    fn no_bounce_to_the_null_sender_or_against_notify() {
        assert!(
            build_bounce(
                &original("", DsnRet::Full),
                &[failed(0)],
                "m.test",
                "Q",
                7,
                0,
                Report::Failure
            )
            .is_none()
        );
        let o = original("s@origin.test", DsnRet::Full);
        assert!(
            build_bounce(
                &o,
                &[failed(notify::NEVER)],
                "m.test",
                "Q",
                7,
                0,
                Report::Failure
            )
            .is_none()
        );
        assert!(
            build_bounce(
                &o,
                &[failed(notify::DELAY | notify::SUCCESS)],
                "m.test",
                "Q",
                7,
                0,
                Report::Failure
            )
            .is_none()
        );
        assert!(
            build_bounce(
                &o,
                &[failed(notify::FAILURE)],
                "m.test",
                "Q",
                7,
                0,
                Report::Failure
            )
            .is_some()
        );
    }

    #[test]
    fn the_bounce_passes_saidas_own_content_rules() {
        let o = original("s@origin.test", DsnRet::Full);
        let b = build_bounce(&o, &[failed(0)], "m.test", "Q", 7, 0, Report::Failure).unwrap();
        let back = smtp_proto::client::stuff_and_read_back(&b.body);
        assert_eq!(back, Ok(b.body));
    }
}
