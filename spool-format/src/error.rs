//! Why bytes are not a valid record, frame or segment header.

/// Why a byte string is not a valid record, frame or segment header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The input ends before the structure does (a torn write, or a cut buffer).
    #[error("short input: {needed} bytes needed, {available} available")]
    Short { needed: usize, available: usize },
    /// The stored CRC32C does not match the bytes (torn write, bit rot).
    #[error("bad CRC32C: stored {stored:#010x}, computed {computed:#010x}")]
    BadCrc { stored: u32, computed: u32 },
    /// The frame declares a length that cannot be a record.
    #[error("frame length {len} exceeds the maximum {max}")]
    TooLong { len: u64, max: u64 },
    /// A record kind this version of saida does not know and that is not marked ignorable.
    #[error("unknown record kind {kind}")]
    UnknownKind { kind: u8 },
    /// A known kind in a layout version this version of saida cannot read.
    #[error("record kind {kind} has layout version {version}, newest known is {known}")]
    UnsupportedKindVersion { kind: u8, version: u8, known: u8 },
    /// Bytes left over after the last field of the payload.
    #[error("{count} trailing bytes after the record payload")]
    TrailingBytes { count: usize },
    /// A text field that is not UTF-8.
    #[error("field `{field}` is not valid UTF-8")]
    InvalidUtf8 { field: &'static str },
    /// A field with a value outside its domain (an unknown enum tag, a reserved bit set).
    #[error("field `{field}` has invalid value {value}")]
    InvalidValue { field: &'static str, value: u64 },
    /// The segment header does not start with the spool magic.
    #[error("not a saida segment (bad magic)")]
    BadMagic,
    /// A stretch of zeros where a frame should be, with valid frames after it (a block lost or
    /// zeroed in the middle of a segment).
    #[error("zeroed bytes where a frame should be")]
    Zeroed,
    /// Bytes written after a failed write or `fdatasync` of their segment: never acknowledged,
    /// and possibly not on the device; recovery ignores them.
    #[error("written after an I/O error of this segment; ignored")]
    Unsynced,
    /// The bytes could not be read from the device (`EIO` and the like).
    #[error("cannot be read: {0}")]
    ReadFailed(String),
    /// The segment was written by a newer format version than this code reads.
    #[error("segment format version {version} is newer than supported {supported}")]
    FutureFormat { version: u16, supported: u16 },
}
