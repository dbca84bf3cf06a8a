//! Error types of the spool, each variant documented with its consequence.
//!
//! Two families:
//! - [`DecodeError`]: bytes that are not a valid record or header. Pure, cheap to clone, produced
//!   by the codec (which does no I/O) and by recovery.
//! - [`SpoolError`]: what an append, a commit or an open can fail with. Each variant knows the
//!   SMTP reply it becomes ([`SpoolError::reply`]) and whether retrying later can help
//!   ([`SpoolError::is_transient`]).

use std::fmt;
use std::io;
use std::path::PathBuf;

pub use spool_format::error::DecodeError;

/// The operation an I/O error happened in, so that logs say what failed, not only how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOp {
    CreateDir,
    ReadDir,
    Create,
    Open,
    Preallocate,
    Write,
    Sync,
    SyncDir,
    Map,
    Rename,
    Remove,
    Metadata,
    Lock,
    Read,
}

impl fmt::Display for IoOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            IoOp::CreateDir => "create directory",
            IoOp::ReadDir => "read directory",
            IoOp::Create => "create",
            IoOp::Open => "open",
            IoOp::Preallocate => "preallocate",
            IoOp::Write => "write",
            IoOp::Sync => "fdatasync",
            IoOp::SyncDir => "fsync directory",
            IoOp::Map => "mmap",
            IoOp::Rename => "rename",
            IoOp::Remove => "remove",
            IoOp::Metadata => "stat",
            IoOp::Lock => "lock",
            IoOp::Read => "read",
        };
        f.write_str(s)
    }
}

/// An I/O failure with the operation and the path it concerned.
///
/// Cloneable (the source is kept as kind + message) because one failed group commit fails every
/// ticket of its batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{op} {}: {message}", path.display())]
pub struct IoFailure {
    pub op: IoOp,
    pub path: PathBuf,
    pub kind: io::ErrorKind,
    pub message: String,
}

impl IoFailure {
    pub fn new(op: IoOp, path: impl Into<PathBuf>, err: &io::Error) -> Self {
        IoFailure {
            op,
            path: path.into(),
            kind: err.kind(),
            message: err.to_string(),
        }
    }

    /// True when the failure means "no space left" (ENOSPC or EDQUOT).
    pub fn is_no_space(&self) -> bool {
        matches!(
            self.kind,
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
        )
    }
}

/// What appending, committing, reading or opening the spool can fail with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpoolError {
    /// No segment could be preallocated: the disk (or quota) is full. Nothing already written is
    /// affected; appends succeed again once space returns. Becomes `452 4.3.1`.
    #[error("spool full: {0}")]
    Full(IoFailure),
    /// The bytes waiting for the next group commit exceed `pending_bytes_max`: the disk is slower
    /// than the arrival rate. Becomes `451 4.3.0`; the client retries later.
    #[error("spool backpressure: {pending} bytes wait for commit (max {max})")]
    Backpressure { pending: usize, max: usize },
    /// One record is larger than a segment can hold. Becomes `552 5.3.4`; retrying cannot help.
    #[error("record of {len} bytes exceeds the maximum {max}")]
    RecordTooLarge { len: usize, max: usize },
    /// A write, sync or file operation failed. The records of the failed batch are not
    /// acknowledged; the writer moves to a fresh segment. Becomes `451 4.3.0`.
    #[error("spool I/O error: {0}")]
    Io(IoFailure),
    /// The writer has shut down. Becomes `421 4.3.2`.
    #[error("spool is shut down")]
    Closed,
    /// A segment was written by a newer, incompatible format version. The spool refuses to open
    /// and modifies nothing, so that the newer saida can still read it.
    #[error("{}: segment format version {version} is newer than supported {supported}",
        path.display())]
    FutureFormat {
        path: PathBuf,
        version: u16,
        supported: u16,
    },
    /// A record kind written by a newer saida that cannot be skipped. Like
    /// [`SpoolError::FutureFormat`], the spool refuses to open and modifies nothing.
    #[error("{}: offset {offset}: {error}", path.display())]
    Unreadable {
        path: PathBuf,
        offset: u64,
        error: DecodeError,
    },
    /// A queue id or location that the spool does not hold (stale reference).
    #[error("no such record: {0}")]
    NotFound(String),
    /// Another process holds the spool directory's lock (a second saida on the same spool).
    /// The spool is not opened and nothing in it is touched.
    #[error("spool directory {} is in use by another process{}", dir.display(),
        holder.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    Locked { dir: PathBuf, holder: Option<u32> },
    /// The configuration is outside its documented bounds.
    #[error("invalid spool configuration: {0}")]
    Config(String),
}

impl SpoolError {
    /// The SMTP reply (code, enhanced status code, text) that an SMTP server gives for this error
    /// at end-of-data.
    pub fn reply(&self) -> (u16, &'static str, &'static str) {
        match self {
            SpoolError::Full(_) => (452, "4.3.1", "Insufficient system storage"),
            SpoolError::Backpressure { .. } => (451, "4.3.0", "Spool busy, try again later"),
            SpoolError::RecordTooLarge { .. } => (552, "5.3.4", "Message too big for system"),
            SpoolError::Closed => (421, "4.3.2", "Service shutting down"),
            SpoolError::Io(_)
            | SpoolError::FutureFormat { .. }
            | SpoolError::Unreadable { .. }
            | SpoolError::NotFound(_)
            | SpoolError::Locked { .. }
            | SpoolError::Config(_) => (451, "4.3.0", "Local error in processing"),
        }
    }

    /// True when the same request may succeed later (every error but an oversized record).
    pub fn is_transient(&self) -> bool {
        !matches!(self, SpoolError::RecordTooLarge { .. })
    }
}

pub(crate) fn io_err(op: IoOp, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> SpoolError {
    let path = path.into();
    move |e| SpoolError::Io(IoFailure::new(op, path, &e))
}
