//! `spool`: one shard's durable log. Every accepted message is stored here before the client
//! hears `250`, and every delivery outcome is journaled here before a recipient counts as done.
//!
//! The bytes are crate `spool-format`'s (re-exported here as [`codec`], [`segment`], [`scan`],
//! [`fuzzing`]); this crate does the I/O. Modules:
//! - [`mmap`]: read-only maps of segments (the one module allowed `unsafe`);
//! - [`disk`]: the I/O seam under the log and recovery, with a fault-injecting disk for tests;
//! - [`lock`]: the exclusive lock on a spool directory (one process per spool);
//! - [`log`]: the append-only writer with group commit on a sync thread;
//! - [`recovery`]: the scan that checks every CRC, repairs a torn tail and reports damage;
//! - [`spool`]: the per-shard spool (log + index + reclamation + compaction).
//!
//! Not here: SMTP, queues per destination, retry policy (the engine's); encryption at rest.

#![forbid(unsafe_op_in_unsafe_fn)]
#![deny(unsafe_code)]

pub mod disk;
pub mod error;
pub mod lock;
pub mod log;
pub mod mmap;
pub mod recovery;
pub mod spool;

pub use spool_format::{codec, fuzzing, scan, segment};

pub use codec::{
    DsnRet, Message, OutcomeEntry, Outcomes, QueueId, RcptState, Recipient, Record, message_flags,
    notify,
};
pub use error::{DecodeError, IoFailure, IoOp, SpoolError};
pub use log::{
    AppendMethod, CommitTicket, Location, LogConfig, LogStats, LogWatch, SegmentLog, SyncPolicy,
    now_micros,
};
pub use recovery::{Damage, RecoveryReport, TornTail};
pub use spool::{
    LiveMessage, MessageRef, RcptStatus, ReclaimReport, Spool, SpoolConfig, SpoolReader,
    SpoolUsage, SpoolWatch,
};
