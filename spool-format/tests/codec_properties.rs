//! Property tests of the codec: `decode(encode(x)) == x` for every record kind, and arbitrary
//! bytes either decode or give an error (never a panic), through the same oracle the fuzz target
//! uses.

use proptest::prelude::*;
use spool_format::codec::{FrameRead, decode_frame};
use spool_format::fuzzing::FUZZ_POS;
use spool_format::{
    DsnRet, Message, OutcomeEntry, Outcomes, QueueId, RcptState, Recipient, Record,
};

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9.@+-]{0,40}",
        any::<String>().prop_map(|s| s.chars().take(30).collect()),
    ]
}

fn state() -> impl Strategy<Value = RcptState> {
    prop_oneof![
        Just(RcptState::Pending),
        Just(RcptState::Delivered),
        Just(RcptState::Failed),
        Just(RcptState::Deferred),
        Just(RcptState::Cancelled),
    ]
}

fn dsn_ret() -> impl Strategy<Value = DsnRet> {
    prop_oneof![
        Just(DsnRet::Unspecified),
        Just(DsnRet::Full),
        Just(DsnRet::Headers)
    ]
}

#[derive(Debug, Clone)]
struct OwnedRcpt(String, u8, String, RcptState, u32, u64, String);

#[derive(Debug, Clone)]
struct OwnedMessage {
    id: u128,
    at: u64,
    flags: u32,
    ret: DsnRet,
    tenant: String,
    sender: String,
    envid: String,
    rcpts: Vec<OwnedRcpt>,
    body: Vec<u8>,
}

fn owned_message() -> impl Strategy<Value = OwnedMessage> {
    let rcpt = (
        text(),
        0u8..16,
        text(),
        state(),
        any::<u32>(),
        any::<u64>(),
        text(),
    )
        .prop_map(|(a, n, o, s, at, next, r)| OwnedRcpt(a, n, o, s, at, next, r));
    (
        any::<u128>(),
        any::<u64>(),
        0u32..8,
        dsn_ret(),
        (text(), text(), text()),
        prop::collection::vec(rcpt, 0..8),
        prop::collection::vec(any::<u8>(), 0..3000),
    )
        .prop_map(
            |(id, at, flags, ret, (tenant, sender, envid), rcpts, body)| OwnedMessage {
                id,
                at,
                flags,
                ret,
                tenant,
                sender,
                envid,
                rcpts,
                body,
            },
        )
}

impl OwnedMessage {
    fn borrow(&self, with_state: bool) -> Message<'_> {
        Message {
            queue_id: QueueId(self.id),
            received_at_micros: self.at,
            flags: self.flags,
            dsn_ret: self.ret,
            tenant: &self.tenant,
            sender: &self.sender,
            envid: &self.envid,
            recipients: self
                .rcpts
                .iter()
                .map(|r| {
                    let mut x = Recipient {
                        notify: r.1,
                        orcpt: &r.2,
                        ..Recipient::new(&r.0)
                    };
                    if with_state {
                        x.state = r.3;
                        x.attempts = r.4;
                        x.next_attempt_micros = r.5;
                        x.last_reply = &r.6;
                    }
                    x
                })
                .collect(),
            body: &self.body,
        }
    }
}

fn round_trip(rec: &Record<'_>) {
    let mut buf = vec![0xAA; 3]; // frames are appended after whatever the buffer holds
    let n = rec.encode_frame(FUZZ_POS, &mut buf).unwrap();
    assert_eq!(n, rec.frame_len());
    let Ok(FrameRead::Frame(f)) = decode_frame(&buf[3..], FUZZ_POS) else {
        panic!("no frame")
    };
    assert_eq!(&f.record().unwrap(), rec);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn message_round_trips(m in owned_message()) {
        round_trip(&Record::Message(m.borrow(false)));
    }

    #[test]
    fn rehomed_round_trips(m in owned_message()) {
        round_trip(&Record::Rehomed(m.borrow(true)));
    }

    #[test]
    fn outcomes_round_trip(
        id in any::<u128>(),
        at in any::<u64>(),
        entries in prop::collection::vec(
            (any::<u32>(), state().prop_filter("not pending", |s| *s != RcptState::Pending),
             any::<u32>(), any::<u64>(), text()),
            0..10),
    ) {
        let entries: Vec<OutcomeEntry<'_>> = entries
            .iter()
            .map(|(i, s, a, n, r)| OutcomeEntry {
                rcpt_index: *i, state: *s, attempts: *a, next_attempt_micros: *n, reply: r,
            })
            .collect();
        round_trip(&Record::Outcomes(Outcomes { queue_id: QueueId(id), at_micros: at, entries }));
    }

    #[test]
    fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..4096)) {
        spool_format::fuzzing::decode_round_trip(&data);
    }

    #[test]
    fn mutated_frames_never_panic(
        m in owned_message(),
        pos in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let mut buf = vec![];
        Record::Rehomed(m.borrow(true)).encode_frame(FUZZ_POS, &mut buf).unwrap();
        let i = pos.index(buf.len());
        buf[i] ^= 1 << bit;
        spool_format::fuzzing::decode_round_trip(&buf);
        // A single flipped bit is always caught by the CRC (or makes the frame unreadable).
        if let Ok(FrameRead::Frame(f)) = decode_frame(&buf, FUZZ_POS) {
            prop_assert!(i >= 12 + f.payload.len(), "flip at {} went unnoticed", i);
        }
    }
}

#[test]
fn committed_fuzz_seeds_decode_and_pass_the_oracle() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/decode");
    let mut seeds = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        spool_format::fuzzing::decode_round_trip(&data);
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if ["seed-message", "seed-rehomed", "seed-outcomes"].contains(&name.as_str()) {
            let Ok(FrameRead::Frame(f)) = decode_frame(&data, FUZZ_POS) else {
                panic!("{name} is not a frame")
            };
            f.record().unwrap();
        }
        seeds += 1;
    }
    assert!(seeds >= 5, "seed corpus missing from {}", dir.display());
}
