//! `spool-format`: the bytes of saida's spool, as specified in `docs/spool-format.md`; the only
//! encoder and decoder of them. Pure: no file, no map, no clock; never panics on input.
//! - [`codec`]: record frames and payloads;
//! - [`segment`]: the segment header and file names;
//! - [`scan`]: one segment's frames checked and visited in order, damage and the end found;
//! - [`error`]: why bytes are not a valid record, frame or header;
//! - [`fuzzing`]: the property the fuzz target (`fuzz/`) and the property tests share.
//!
//! Not here: writing, syncing, recovering files, the index of live messages (crate `spool`).

#![forbid(unsafe_code)]

pub mod codec;
pub mod error;
pub mod fuzzing;
pub mod scan;
pub mod segment;

pub use codec::{
    DsnRet, Message, OutcomeEntry, Outcomes, QueueId, RcptState, Recipient, Record, message_flags,
    notify,
};
pub use error::DecodeError;
