//! Writes the committed seed corpus of the `decode` fuzz target:
//! `cargo run -p spool --example fuzz_seeds -- spool-format/fuzz/corpus/decode`.
//! One seed per record kind, a segment header followed by frames, and a torn frame.

use spool_format::codec::FramePos;
use spool_format::fuzzing::FUZZ_POS;
use spool_format::segment::SegmentHeader;
use spool_format::{
    DsnRet, Message, OutcomeEntry, Outcomes, QueueId, RcptState, Recipient, Record, notify,
};

fn main() -> std::io::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "spool-format/fuzz/corpus/decode".into());
    std::fs::create_dir_all(&dir)?;
    let message = Message {
        queue_id: QueueId(0x0006_0000_0000_0001_0000_0000_0000_0042),
        received_at_micros: 1_764_300_000_000_000,
        flags: spool_format::message_flags::BODY_8BITMIME,
        dsn_ret: DsnRet::Headers,
        tenant: "acme",
        sender: "bounces@acme.test",
        envid: "QQ314159",
        recipients: vec![
            Recipient::new("alice@example.test"),
            Recipient {
                notify: notify::FAILURE | notify::DELAY,
                orcpt: "rfc822;bob@example.test",
                ..Recipient::new("bob@example.test")
            },
        ],
        body: b"From: a@acme.test\r\nSubject: seed\r\n\r\nhello\r\n",
    };
    let mut rehomed = message.clone();
    rehomed.recipients[0].state = RcptState::Deferred;
    rehomed.recipients[0].attempts = 3;
    rehomed.recipients[0].next_attempt_micros = 1_764_300_900_000_000;
    rehomed.recipients[0].last_reply = "451 4.7.1 greylisted";
    let outcomes = Outcomes {
        queue_id: message.queue_id,
        at_micros: 1_764_300_060_000_000,
        entries: vec![OutcomeEntry {
            rcpt_index: 1,
            state: RcptState::Delivered,
            attempts: 1,
            next_attempt_micros: 0,
            reply: "250 2.0.0 ok",
        }],
    };
    let records = [
        Record::Message(message),
        Record::Rehomed(rehomed),
        Record::Outcomes(outcomes),
    ];
    let mut segment = SegmentHeader {
        format_version: 1,
        segment_id: 7,
        created_micros: 1,
        shard: 0,
    }
    .encode()
    .to_vec();
    for (name, rec) in ["message", "rehomed", "outcomes"].iter().zip(&records) {
        let mut frame = Vec::new();
        rec.encode_frame(FUZZ_POS, &mut frame)
            .expect("seed encodes");
        std::fs::write(format!("{dir}/seed-{name}"), &frame)?;
        let at = FramePos {
            segment: 0,
            offset: segment.len() as u64,
        };
        rec.encode_frame(at, &mut segment).expect("seed encodes");
    }
    std::fs::write(format!("{dir}/seed-torn"), &segment[..segment.len() - 20])?;
    segment.resize(segment.len() + 256, 0);
    std::fs::write(format!("{dir}/seed-segment"), &segment)?;
    Ok(())
}
