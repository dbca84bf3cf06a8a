//! The record codec: every byte of a spool record is encoded and decoded here, and only here.
//!
//! A record travels in a *frame* (`docs/spool-format.md`, "Record framing"):
//!
//! | offset | size | field        |
//! |-------:|-----:|--------------|
//! | 0      | 4    | crc32c       |
//! | 4      | 4    | payload_len  |
//! | 8      | 1    | kind         |
//! | 9      | 1    | kind_version |
//! | 10     | 2    | flags        |
//! | 12     | n    | payload      |
//!
//! then zero padding to the next multiple of 8. The CRC32C covers the frame's position (segment
//! id and offset, 16 bytes) and then bytes 4 .. 12 + n: a frame checks out only where it was
//! written, so bytes that look like a frame inside a message body can never be taken for one.
//!
//! Decoding borrows from its input ([`Record<'a>`]), so a record read from a memory-mapped
//! segment costs no copy: a delivery reads the body straight from the page cache.
//!
//! This module does **no I/O** and never panics on any input (a property test and a fuzz target
//! hold it to that). It does not know about files, segments or commit; see `log` and `recovery`.

use crate::error::DecodeError;

/// Size of the frame header that precedes every payload.
pub const FRAME_HEADER_LEN: usize = 12;
/// Frames start at multiples of this, so recovery can resynchronise after damage by probing
/// aligned offsets only.
pub const FRAME_ALIGN: usize = 8;
/// Largest payload a decoder accepts. The writer's own bound (segment size) is lower; this one
/// keeps a corrupt length from making a reader walk gigabytes.
pub const PAYLOAD_LEN_MAX: usize = 1 << 30;
/// Frame flag: a reader that does not know this kind may skip the record. Kinds added within a
/// format version must set it; see "Versioning" in docs/spool-format.md.
pub const FLAG_IGNORABLE: u16 = 1;
/// Flags this version understands; any other bit set is an error.
const FLAGS_KNOWN: u16 = FLAG_IGNORABLE;

const _: () = assert!(FRAME_HEADER_LEN == 4 + 4 + 1 + 1 + 2);
const _: () = assert!(FRAME_ALIGN.is_power_of_two());
const _: () = assert!(PAYLOAD_LEN_MAX < u32::MAX as usize);

/// Record kind tags. A tag is never reused for another meaning.
pub mod kind {
    /// An accepted message: envelope, DSN parameters and body.
    pub const MESSAGE: u8 = 1;
    /// Outcomes of delivery attempts for some recipients of one message.
    pub const OUTCOMES: u8 = 2;
    /// A message re-appended by compaction with the state of every recipient; supersedes every
    /// earlier record of the same queue id.
    pub const REHOMED: u8 = 3;
}

/// Newest layout version of each kind this code reads and writes.
const KIND_VERSION: u8 = 1;

/// Where a frame sits: its segment and byte offset. Part of the frame's CRC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FramePos {
    pub segment: u64,
    pub offset: u64,
}

/// The CRC32C of a frame at `pos` whose bytes 4.. are `covered` (see the module docs).
pub fn frame_crc(pos: FramePos, covered: &[u8]) -> u32 {
    let mut seed = [0u8; 16];
    seed[..8].copy_from_slice(&pos.segment.to_le_bytes());
    seed[8..].copy_from_slice(&pos.offset.to_le_bytes());
    crc32c::crc32c_append(crc32c::crc32c(&seed), covered)
}

/// Size of a frame holding a payload of `payload_len` bytes, padding included.
pub const fn frame_len(payload_len: usize) -> usize {
    (FRAME_HEADER_LEN + payload_len + FRAME_ALIGN - 1) & !(FRAME_ALIGN - 1)
}

/// A message's queue id: unique per spool, stable across compaction.
///
/// Layout: high 64 bits = receive time in microseconds since the Unix epoch; low 64 bits = the
/// shard number (16 bits) and a per-process counter (48 bits). Printed as 32 hex digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueId(pub u128);

impl std::fmt::Display for QueueId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032X}", self.0)
    }
}

impl std::str::FromStr for QueueId {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        u128::from_str_radix(s, 16).map(QueueId)
    }
}

/// Where a recipient stands. Stored as one byte; the numbers are part of the format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RcptState {
    /// Not yet attempted (only in `Message` and `Rehomed` records).
    Pending = 0,
    /// The destination answered 2xx. Terminal.
    Delivered = 1,
    /// Permanent failure: a 5xx reply, or expiry after the maximum queue age. Terminal.
    Failed = 2,
    /// Temporary failure; retried at `next_attempt_micros`.
    Deferred = 3,
    /// Removed by an operator, without a bounce. Terminal.
    Cancelled = 4,
}

impl RcptState {
    /// True when nothing more will be attempted for the recipient.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RcptState::Delivered | RcptState::Failed | RcptState::Cancelled
        )
    }

    fn from_u8(v: u8) -> Result<Self, DecodeError> {
        Ok(match v {
            0 => RcptState::Pending,
            1 => RcptState::Delivered,
            2 => RcptState::Failed,
            3 => RcptState::Deferred,
            4 => RcptState::Cancelled,
            _ => {
                return Err(DecodeError::InvalidValue {
                    field: "state",
                    value: v.into(),
                });
            }
        })
    }
}

/// DSN `RET` parameter (RFC 3461 §4.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[repr(u8)]
pub enum DsnRet {
    #[default]
    Unspecified = 0,
    Full = 1,
    Headers = 2,
}

impl DsnRet {
    fn from_u8(v: u8) -> Result<Self, DecodeError> {
        Ok(match v {
            0 => DsnRet::Unspecified,
            1 => DsnRet::Full,
            2 => DsnRet::Headers,
            _ => {
                return Err(DecodeError::InvalidValue {
                    field: "dsn_ret",
                    value: v.into(),
                });
            }
        })
    }
}

/// Message flags (a `u32` bit set).
pub mod message_flags {
    /// The client used `SMTPUTF8` (RFC 6531): addresses or headers may be UTF-8.
    pub const SMTPUTF8: u32 = 1;
    /// `BODY=8BITMIME` (RFC 6152).
    pub const BODY_8BITMIME: u32 = 1 << 1;
    /// `BODY=BINARYMIME` (RFC 3030).
    pub const BODY_BINARYMIME: u32 = 1 << 2;
    /// Every bit defined so far; others must be zero.
    pub const KNOWN: u32 = SMTPUTF8 | BODY_8BITMIME | BODY_BINARYMIME;
}

/// DSN `NOTIFY` bits (RFC 3461 §4.1). Zero means the client did not say.
pub mod notify {
    pub const NEVER: u8 = 1;
    pub const SUCCESS: u8 = 1 << 1;
    pub const FAILURE: u8 = 1 << 2;
    pub const DELAY: u8 = 1 << 3;
    pub const KNOWN: u8 = NEVER | SUCCESS | FAILURE | DELAY;
}

/// One envelope recipient, with its delivery state in `Rehomed` records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recipient<'a> {
    /// The forward-path without angle brackets.
    pub address: &'a str,
    /// DSN `NOTIFY` bits ([`notify`]).
    pub notify: u8,
    /// DSN `ORCPT` as given (`rfc822;user@example.com`); empty when absent.
    pub orcpt: &'a str,
    /// State; always `Pending` in a `Message` record (not stored there).
    pub state: RcptState,
    /// Attempts made so far; 0 in a `Message` record.
    pub attempts: u32,
    /// Next attempt time (µs since the epoch) when deferred; 0 otherwise.
    pub next_attempt_micros: u64,
    /// Last reply from the destination (`"451 4.7.1 try later"`); empty when none.
    pub last_reply: &'a str,
}

impl<'a> Recipient<'a> {
    /// A fresh recipient, not yet attempted.
    pub fn new(address: &'a str) -> Self {
        Recipient {
            address,
            notify: 0,
            orcpt: "",
            state: RcptState::Pending,
            attempts: 0,
            next_attempt_micros: 0,
            last_reply: "",
        }
    }
}

/// An accepted message (`kind::MESSAGE`) or its compacted copy (`kind::REHOMED`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message<'a> {
    pub queue_id: QueueId,
    /// Time the message was accepted (µs since the epoch); drives expiry.
    pub received_at_micros: u64,
    /// [`message_flags`] bits.
    pub flags: u32,
    pub dsn_ret: DsnRet,
    /// Tenant (submitting account or organisation); empty in a dedicated setup.
    pub tenant: &'a str,
    /// The reverse-path without angle brackets; empty for the null sender `<>`.
    pub sender: &'a str,
    /// DSN `ENVID`; empty when absent.
    pub envid: &'a str,
    pub recipients: Vec<Recipient<'a>>,
    /// The message as it will be sent (headers and body, CRLF line ends, not dot-stuffed).
    pub body: &'a [u8],
}

/// The outcome of one attempt for one recipient.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutcomeEntry<'a> {
    /// Index into the message's recipient list.
    pub rcpt_index: u32,
    /// New state; never `Pending`.
    pub state: RcptState,
    /// Attempts made, this one included.
    pub attempts: u32,
    /// When deferred: the time of the next attempt (µs since the epoch); otherwise 0.
    pub next_attempt_micros: u64,
    /// The reply that decided the outcome, or a local reason (`"connect: refused"`).
    pub reply: &'a str,
}

/// Outcomes for recipients of one message (`kind::OUTCOMES`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcomes<'a> {
    pub queue_id: QueueId,
    /// Time of the attempt (µs since the epoch).
    pub at_micros: u64,
    pub entries: Vec<OutcomeEntry<'a>>,
}

/// Any record the spool holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record<'a> {
    Message(Message<'a>),
    Outcomes(Outcomes<'a>),
    Rehomed(Message<'a>),
}

impl Record<'_> {
    /// The kind tag of this record.
    pub fn kind(&self) -> u8 {
        match self {
            Record::Message(_) => kind::MESSAGE,
            Record::Outcomes(_) => kind::OUTCOMES,
            Record::Rehomed(_) => kind::REHOMED,
        }
    }

    /// The queue id the record is about.
    pub fn queue_id(&self) -> QueueId {
        match self {
            Record::Message(m) | Record::Rehomed(m) => m.queue_id,
            Record::Outcomes(o) => o.queue_id,
        }
    }

    /// Exact payload size in bytes (without frame header and padding).
    pub fn payload_len(&self) -> usize {
        fn s(x: &str) -> usize {
            2 + x.len()
        }
        match self {
            Record::Message(m) | Record::Rehomed(m) => {
                let with_state = matches!(self, Record::Rehomed(_));
                let rcpts: usize = m
                    .recipients
                    .iter()
                    .map(|r| {
                        s(r.address)
                            + 1
                            + s(r.orcpt)
                            + if with_state {
                                1 + 4 + 8 + s(r.last_reply)
                            } else {
                                0
                            }
                    })
                    .sum();
                16 + 8
                    + 4
                    + 1
                    + s(m.tenant)
                    + s(m.sender)
                    + s(m.envid)
                    + 4
                    + rcpts
                    + 4
                    + m.body.len()
            }
            Record::Outcomes(o) => {
                let entries: usize = o.entries.iter().map(|e| 4 + 1 + 4 + 8 + s(e.reply)).sum();
                16 + 8 + 4 + entries
            }
        }
    }

    /// Size of the whole frame this record occupies on disk.
    pub fn frame_len(&self) -> usize {
        frame_len(self.payload_len())
    }

    /// Checks the limits that encoding relies on (string lengths fit in `u16`, counts in `u32`,
    /// payload within [`PAYLOAD_LEN_MAX`]) so that [`Record::encode_frame`] cannot fail.
    pub fn validate(&self) -> Result<(), EncodeError> {
        fn s(field: &'static str, x: &str) -> Result<(), EncodeError> {
            if x.len() > u16::MAX as usize {
                return Err(EncodeError::FieldTooLong {
                    field,
                    len: x.len(),
                });
            }
            Ok(())
        }
        match self {
            Record::Message(m) | Record::Rehomed(m) => {
                s("tenant", m.tenant)?;
                s("sender", m.sender)?;
                s("envid", m.envid)?;
                if m.flags & !message_flags::KNOWN != 0 {
                    return Err(EncodeError::InvalidValue { field: "flags" });
                }
                if m.recipients.len() > u32::MAX as usize {
                    return Err(EncodeError::FieldTooLong {
                        field: "recipients",
                        len: usize::MAX,
                    });
                }
                for r in &m.recipients {
                    s("address", r.address)?;
                    s("orcpt", r.orcpt)?;
                    s("last_reply", r.last_reply)?;
                    if r.notify & !notify::KNOWN != 0 {
                        return Err(EncodeError::InvalidValue { field: "notify" });
                    }
                    if matches!(self, Record::Message(_))
                        && (r.state != RcptState::Pending
                            || r.attempts != 0
                            || r.next_attempt_micros != 0
                            || !r.last_reply.is_empty())
                    {
                        // A Message record has no place for state: it would be lost silently.
                        return Err(EncodeError::InvalidValue { field: "state" });
                    }
                }
            }
            Record::Outcomes(o) => {
                for e in &o.entries {
                    s("reply", e.reply)?;
                    if e.state == RcptState::Pending {
                        return Err(EncodeError::InvalidValue { field: "state" });
                    }
                }
            }
        }
        let len = self.payload_len();
        if len > PAYLOAD_LEN_MAX {
            return Err(EncodeError::FieldTooLong {
                field: "payload",
                len,
            });
        }
        Ok(())
    }

    /// Appends the record's complete frame (header, payload, padding) to `out`.
    ///
    /// Validates first; on error `out` is unchanged. The CRC is computed over the bytes just
    /// written, and the frame is decoded back in debug builds (a pair assertion at the durability
    /// boundary).
    pub fn encode_frame(&self, pos: FramePos, out: &mut Vec<u8>) -> Result<usize, EncodeError> {
        self.validate()?;
        let payload_len = self.payload_len();
        let total = frame_len(payload_len);
        let start = out.len();
        out.reserve(total);
        out.extend_from_slice(&[0u8; 4]); // CRC, filled below
        out.extend_from_slice(&(payload_len as u32).to_le_bytes());
        out.push(self.kind());
        out.push(KIND_VERSION);
        out.extend_from_slice(&0u16.to_le_bytes());
        self.encode_payload(out);
        debug_assert_eq!(out.len() - start, FRAME_HEADER_LEN + payload_len);
        let crc = frame_crc(pos, &out[start + 4..]);
        out[start..start + 4].copy_from_slice(&crc.to_le_bytes());
        out.resize(start + total, 0);
        debug_assert!(matches!(
            decode_frame(&out[start..], pos),
            Ok(FrameRead::Frame(f)) if f.frame_len == total && f.record().as_ref() == Ok(self)
        ));
        Ok(total)
    }

    fn encode_payload(&self, out: &mut Vec<u8>) {
        fn s(out: &mut Vec<u8>, x: &str) {
            out.extend_from_slice(&(x.len() as u16).to_le_bytes());
            out.extend_from_slice(x.as_bytes());
        }
        match self {
            Record::Message(m) | Record::Rehomed(m) => {
                let with_state = matches!(self, Record::Rehomed(_));
                out.extend_from_slice(&m.queue_id.0.to_le_bytes());
                out.extend_from_slice(&m.received_at_micros.to_le_bytes());
                out.extend_from_slice(&m.flags.to_le_bytes());
                out.push(m.dsn_ret as u8);
                s(out, m.tenant);
                s(out, m.sender);
                s(out, m.envid);
                out.extend_from_slice(&(m.recipients.len() as u32).to_le_bytes());
                for r in &m.recipients {
                    s(out, r.address);
                    out.push(r.notify);
                    s(out, r.orcpt);
                    if with_state {
                        out.push(r.state as u8);
                        out.extend_from_slice(&r.attempts.to_le_bytes());
                        out.extend_from_slice(&r.next_attempt_micros.to_le_bytes());
                        s(out, r.last_reply);
                    }
                }
                out.extend_from_slice(&(m.body.len() as u32).to_le_bytes());
                out.extend_from_slice(m.body);
            }
            Record::Outcomes(o) => {
                out.extend_from_slice(&o.queue_id.0.to_le_bytes());
                out.extend_from_slice(&o.at_micros.to_le_bytes());
                out.extend_from_slice(&(o.entries.len() as u32).to_le_bytes());
                for e in &o.entries {
                    out.extend_from_slice(&e.rcpt_index.to_le_bytes());
                    out.push(e.state as u8);
                    out.extend_from_slice(&e.attempts.to_le_bytes());
                    out.extend_from_slice(&e.next_attempt_micros.to_le_bytes());
                    s(out, e.reply);
                }
            }
        }
    }

    /// Decodes a payload of the given kind and layout version.
    pub fn decode(kind: u8, version: u8, payload: &[u8]) -> Result<Record<'_>, DecodeError> {
        if !matches!(kind, kind::MESSAGE | kind::OUTCOMES | kind::REHOMED) {
            return Err(DecodeError::UnknownKind { kind });
        }
        if version != KIND_VERSION {
            return Err(DecodeError::UnsupportedKindVersion {
                kind,
                version,
                known: KIND_VERSION,
            });
        }
        let mut r = Reader {
            buf: payload,
            pos: 0,
        };
        let rec = match kind {
            kind::OUTCOMES => {
                let queue_id = QueueId(r.u128()?);
                let at_micros = r.u64()?;
                let count = r.count(4 + 1 + 4 + 8 + 2)?;
                let mut entries = Vec::with_capacity(count);
                for _ in 0..count {
                    let rcpt_index = r.u32()?;
                    let state = RcptState::from_u8(r.u8()?)?;
                    if state == RcptState::Pending {
                        return Err(DecodeError::InvalidValue {
                            field: "state",
                            value: 0,
                        });
                    }
                    entries.push(OutcomeEntry {
                        rcpt_index,
                        state,
                        attempts: r.u32()?,
                        next_attempt_micros: r.u64()?,
                        reply: r.str("reply")?,
                    });
                }
                Record::Outcomes(Outcomes {
                    queue_id,
                    at_micros,
                    entries,
                })
            }
            _ => {
                let with_state = kind == kind::REHOMED;
                let queue_id = QueueId(r.u128()?);
                let received_at_micros = r.u64()?;
                let flags = r.u32()?;
                if flags & !message_flags::KNOWN != 0 {
                    return Err(DecodeError::InvalidValue {
                        field: "flags",
                        value: flags.into(),
                    });
                }
                let dsn_ret = DsnRet::from_u8(r.u8()?)?;
                let tenant = r.str("tenant")?;
                let sender = r.str("sender")?;
                let envid = r.str("envid")?;
                let min_rcpt = 2 + 1 + 2 + if with_state { 1 + 4 + 8 + 2 } else { 0 };
                let count = r.count(min_rcpt)?;
                let mut recipients = Vec::with_capacity(count);
                for _ in 0..count {
                    let mut rcpt = Recipient::new(r.str("address")?);
                    rcpt.notify = r.u8()?;
                    if rcpt.notify & !notify::KNOWN != 0 {
                        let value = rcpt.notify.into();
                        return Err(DecodeError::InvalidValue {
                            field: "notify",
                            value,
                        });
                    }
                    rcpt.orcpt = r.str("orcpt")?;
                    if with_state {
                        rcpt.state = RcptState::from_u8(r.u8()?)?;
                        rcpt.attempts = r.u32()?;
                        rcpt.next_attempt_micros = r.u64()?;
                        rcpt.last_reply = r.str("last_reply")?;
                    }
                    recipients.push(rcpt);
                }
                let body_len = r.u32()? as usize;
                let body = r.bytes(body_len)?;
                let m = Message {
                    queue_id,
                    received_at_micros,
                    flags,
                    dsn_ret,
                    tenant,
                    sender,
                    envid,
                    recipients,
                    body,
                };
                if with_state {
                    Record::Rehomed(m)
                } else {
                    Record::Message(m)
                }
            }
        };
        if r.pos != payload.len() {
            return Err(DecodeError::TrailingBytes {
                count: payload.len() - r.pos,
            });
        }
        Ok(rec)
    }
}

/// Why a record cannot be encoded (a caller bug or an input beyond the format's limits).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("field `{field}` is too long ({len} bytes)")]
    FieldTooLong { field: &'static str, len: usize },
    #[error("field `{field}` holds a value the format does not allow here")]
    InvalidValue { field: &'static str },
}

/// A frame found in a byte buffer: its header fields and its (unchecked-kind) payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    pub kind: u8,
    pub kind_version: u8,
    pub flags: u16,
    pub payload: &'a [u8],
    /// Bytes the frame occupies, padding included: the next frame starts this far on.
    pub frame_len: usize,
}

impl<'a> Frame<'a> {
    /// Decodes the payload. A kind this code does not know is `UnknownKind` even when the frame
    /// is ignorable; callers check [`Frame::is_ignorable`] first.
    pub fn record(&self) -> Result<Record<'a>, DecodeError> {
        Record::decode(self.kind, self.kind_version, self.payload)
    }

    /// True when a reader that does not know the kind may skip the record.
    pub fn is_ignorable(&self) -> bool {
        self.flags & FLAG_IGNORABLE != 0
    }
}

/// What is at a frame position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameRead<'a> {
    /// A frame whose CRC checks.
    Frame(Frame<'a>),
    /// The end of written data: fewer than a header's worth of bytes, or a header of zeros
    /// (segments are preallocated with zeros).
    End,
}

/// Reads the frame at the start of `buf`, which sits at `pos`. Checks length bounds and CRC;
/// does not decode the payload. Never panics.
pub fn decode_frame(buf: &[u8], pos: FramePos) -> Result<FrameRead<'_>, DecodeError> {
    let Some(header) = buf.get(..FRAME_HEADER_LEN) else {
        return Ok(FrameRead::End);
    };
    if header.iter().all(|&b| b == 0) {
        return Ok(FrameRead::End);
    }
    let stored = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let len = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
    if len > PAYLOAD_LEN_MAX {
        return Err(DecodeError::TooLong {
            len: len as u64,
            max: PAYLOAD_LEN_MAX as u64,
        });
    }
    let end = FRAME_HEADER_LEN + len;
    let Some(covered) = buf.get(4..end) else {
        return Err(DecodeError::Short {
            needed: end,
            available: buf.len(),
        });
    };
    let computed = frame_crc(pos, covered);
    if computed != stored {
        return Err(DecodeError::BadCrc { stored, computed });
    }
    let flags = u16::from_le_bytes([header[10], header[11]]);
    if flags & !FLAGS_KNOWN != 0 {
        return Err(DecodeError::InvalidValue {
            field: "frame flags",
            value: flags.into(),
        });
    }
    Ok(FrameRead::Frame(Frame {
        kind: header[8],
        kind_version: header[9],
        flags,
        payload: &buf[FRAME_HEADER_LEN..end],
        frame_len: frame_len(len),
    }))
}

/// A bounds-checked little-endian cursor. Every read returns `Short` instead of panicking.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or(DecodeError::Short {
                needed: self.pos.saturating_add(n),
                available: self.buf.len(),
            })?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn u128(&mut self) -> Result<u128, DecodeError> {
        Ok(u128::from_le_bytes(self.array()?))
    }

    fn str(&mut self, field: &'static str) -> Result<&'a str, DecodeError> {
        let len = self.u16()? as usize;
        std::str::from_utf8(self.bytes(len)?).map_err(|_| DecodeError::InvalidUtf8 { field })
    }

    /// Reads an element count and checks that the remaining bytes can hold that many elements of
    /// at least `min_each` bytes, so a corrupt count cannot make us allocate gigabytes.
    fn count(&mut self, min_each: usize) -> Result<usize, DecodeError> {
        let n = self.u32()? as usize;
        let remaining = self.buf.len() - self.pos;
        if n.saturating_mul(min_each) > remaining {
            return Err(DecodeError::Short {
                needed: n.saturating_mul(min_each),
                available: remaining,
            });
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POS: FramePos = FramePos {
        segment: 3,
        offset: 64,
    };

    fn sample() -> Message<'static> {
        Message {
            queue_id: QueueId(0x0123_4567_89ab_cdef_0011_2233_4455_6677),
            received_at_micros: 1_700_000_000_000_000,
            flags: message_flags::SMTPUTF8,
            dsn_ret: DsnRet::Headers,
            tenant: "acme",
            sender: "bounce@acme.test",
            envid: "env-1",
            recipients: vec![
                Recipient::new("a@x.test"),
                Recipient {
                    notify: notify::FAILURE | notify::DELAY,
                    orcpt: "rfc822;b@y.test",
                    ..Recipient::new("b@y.test")
                },
            ],
            body: b"Subject: hi\r\n\r\nhello\r\n",
        }
    }

    #[test]
    fn message_frame_round_trips_and_is_aligned() {
        let rec = Record::Message(sample());
        let mut buf = vec![];
        let n = rec.encode_frame(POS, &mut buf).unwrap();
        assert_eq!(n, buf.len());
        assert_eq!(n % FRAME_ALIGN, 0);
        let FrameRead::Frame(f) = decode_frame(&buf, POS).unwrap() else {
            panic!("no frame")
        };
        assert_eq!(f.frame_len, n);
        assert_eq!(f.record().unwrap(), rec);
    }

    #[test]
    fn flipped_bit_is_a_crc_error() {
        let mut buf = vec![];
        Record::Message(sample())
            .encode_frame(POS, &mut buf)
            .unwrap();
        buf[40] ^= 0x10;
        assert!(matches!(
            decode_frame(&buf, POS),
            Err(DecodeError::BadCrc { .. })
        ));
    }

    #[test]
    fn a_frame_checks_out_only_at_its_own_position() {
        let mut buf = vec![];
        Record::Message(sample())
            .encode_frame(POS, &mut buf)
            .unwrap();
        let elsewhere = FramePos {
            segment: 3,
            offset: 72,
        };
        assert!(matches!(
            decode_frame(&buf, elsewhere),
            Err(DecodeError::BadCrc { .. })
        ));
        let other_segment = FramePos {
            segment: 4,
            offset: 64,
        };
        assert!(matches!(
            decode_frame(&buf, other_segment),
            Err(DecodeError::BadCrc { .. })
        ));
    }

    #[test]
    fn zero_header_is_end_of_data() {
        assert_eq!(decode_frame(&[0u8; 64], POS).unwrap(), FrameRead::End);
        assert_eq!(decode_frame(&[1u8; 5], POS).unwrap(), FrameRead::End);
    }

    #[test]
    fn cut_frame_is_short() {
        let mut buf = vec![];
        Record::Message(sample())
            .encode_frame(POS, &mut buf)
            .unwrap();
        let cut = &buf[..buf.len() - 16];
        assert!(matches!(
            decode_frame(cut, POS),
            Err(DecodeError::Short { .. })
        ));
    }

    #[test]
    fn message_record_refuses_recipient_state() {
        let mut m = sample();
        m.recipients[0].state = RcptState::Deferred;
        let err = Record::Message(m)
            .encode_frame(POS, &mut vec![])
            .unwrap_err();
        assert_eq!(err, EncodeError::InvalidValue { field: "state" });
    }

    #[test]
    fn unknown_kind_and_future_kind_version_are_typed_errors() {
        assert_eq!(
            Record::decode(9, 1, &[]),
            Err(DecodeError::UnknownKind { kind: 9 })
        );
        assert_eq!(
            Record::decode(kind::MESSAGE, 2, &[]),
            Err(DecodeError::UnsupportedKindVersion {
                kind: 1,
                version: 2,
                known: 1
            })
        );
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let rec = Record::Outcomes(Outcomes {
            queue_id: QueueId(7),
            at_micros: 1,
            entries: vec![],
        });
        let mut payload = vec![];
        rec.encode_payload(&mut payload);
        payload.push(0);
        assert_eq!(
            Record::decode(kind::OUTCOMES, 1, &payload),
            Err(DecodeError::TrailingBytes { count: 1 })
        );
    }

    #[test]
    fn huge_count_does_not_allocate() {
        let mut payload = vec![0u8; 16 + 8];
        payload.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Record::decode(kind::OUTCOMES, 1, &payload),
            Err(DecodeError::Short { .. })
        ));
    }

    #[test]
    fn queue_id_prints_and_parses() {
        let id = QueueId(0xABCDEF);
        assert_eq!(id.to_string().parse::<QueueId>().unwrap(), id);
        assert_eq!(id.to_string().len(), 32);
    }
}
