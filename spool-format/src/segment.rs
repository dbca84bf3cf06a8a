//! Segment files: the header at the start of each one, and how segment files are named.
//!
//! A segment is a preallocated file of `segment_bytes` holding a 64-byte header and then frames
//! (see `codec`) back to back until the first all-zero frame header. This module encodes and
//! decodes the header and names files; it does no I/O.

use crate::error::DecodeError;

/// First bytes of every segment file.
pub const MAGIC: [u8; 8] = *b"SAIDASPL";
/// Format version this code writes. Readers refuse segments with a larger version.
pub const FORMAT_VERSION: u16 = 1;
/// Bytes reserved for the header; the first frame starts here.
pub const SEGMENT_HEADER_LEN: usize = 64;
/// Suffix of segment file names.
pub const SEGMENT_SUFFIX: &str = ".seg";
/// Suffix of a segment being created; such files are deleted by recovery.
pub const TEMP_SUFFIX: &str = ".seg.tmp";

const CRC_OFFSET: usize = 60;
const _: () = assert!(SEGMENT_HEADER_LEN % crate::codec::FRAME_ALIGN == 0);
const _: () = assert!(CRC_OFFSET + 4 == SEGMENT_HEADER_LEN);

/// The decoded segment header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    pub format_version: u16,
    pub segment_id: u64,
    /// Creation time, µs since the epoch (for operators and for age-based compaction).
    pub created_micros: u64,
    /// Shard that owns the segment.
    pub shard: u16,
}

impl SegmentHeader {
    /// The 64 header bytes.
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_LEN] {
        let mut b = [0u8; SEGMENT_HEADER_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..10].copy_from_slice(&self.format_version.to_le_bytes());
        b[10..12].copy_from_slice(&(SEGMENT_HEADER_LEN as u16).to_le_bytes());
        // 12..16 flags: zero in version 1.
        b[16..24].copy_from_slice(&self.segment_id.to_le_bytes());
        b[24..32].copy_from_slice(&self.created_micros.to_le_bytes());
        b[32..34].copy_from_slice(&self.shard.to_le_bytes());
        let crc = crc32c::crc32c(&b[..CRC_OFFSET]);
        b[CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes a header. Magic and version are checked before the CRC: they sit at fixed offsets
    /// in every version, so a newer segment is recognised as newer, not as damaged.
    pub fn decode(buf: &[u8]) -> Result<SegmentHeader, DecodeError> {
        let b = buf.get(..SEGMENT_HEADER_LEN).ok_or(DecodeError::Short {
            needed: SEGMENT_HEADER_LEN,
            available: buf.len(),
        })?;
        if b[0..8] != MAGIC {
            return Err(DecodeError::BadMagic);
        }
        let format_version = u16::from_le_bytes([b[8], b[9]]);
        if format_version > FORMAT_VERSION {
            return Err(DecodeError::FutureFormat {
                version: format_version,
                supported: FORMAT_VERSION,
            });
        }
        let stored = u32::from_le_bytes([b[60], b[61], b[62], b[63]]);
        let computed = crc32c::crc32c(&b[..CRC_OFFSET]);
        if stored != computed {
            return Err(DecodeError::BadCrc { stored, computed });
        }
        let header_len = u16::from_le_bytes([b[10], b[11]]);
        if header_len as usize != SEGMENT_HEADER_LEN || format_version == 0 {
            return Err(DecodeError::InvalidValue {
                field: "header_len",
                value: header_len.into(),
            });
        }
        let flags = u32::from_le_bytes([b[12], b[13], b[14], b[15]]);
        if flags != 0 || b[34..CRC_OFFSET].iter().any(|&x| x != 0) {
            return Err(DecodeError::InvalidValue {
                field: "header flags",
                value: flags.into(),
            });
        }
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        Ok(SegmentHeader {
            format_version,
            segment_id: u64_at(16),
            created_micros: u64_at(24),
            shard: u16::from_le_bytes([b[32], b[33]]),
        })
    }
}

/// File name of segment `id`: 16 lowercase hex digits, so names sort in id order.
pub fn segment_file_name(id: u64) -> String {
    format!("{id:016x}{SEGMENT_SUFFIX}")
}

/// The segment id a file name stands for, if it is a segment name.
pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(SEGMENT_SUFFIX)?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> SegmentHeader {
        SegmentHeader {
            format_version: 1,
            segment_id: 42,
            created_micros: 7,
            shard: 3,
        }
    }

    #[test]
    fn header_round_trips() {
        assert_eq!(SegmentHeader::decode(&header().encode()).unwrap(), header());
    }

    #[test]
    fn future_version_is_recognised_before_crc() {
        let mut b = header().encode();
        b[8..10].copy_from_slice(&2u16.to_le_bytes());
        assert_eq!(
            SegmentHeader::decode(&b),
            Err(DecodeError::FutureFormat {
                version: 2,
                supported: 1
            })
        );
    }

    #[test]
    fn damaged_header_is_refused() {
        let mut b = header().encode();
        b[20] ^= 1;
        assert!(matches!(
            SegmentHeader::decode(&b),
            Err(DecodeError::BadCrc { .. })
        ));
        assert_eq!(
            SegmentHeader::decode(&[0u8; 64]),
            Err(DecodeError::BadMagic)
        );
        assert!(matches!(
            SegmentHeader::decode(&b[..10]),
            Err(DecodeError::Short { .. })
        ));
    }

    #[test]
    fn names_sort_by_id_and_parse_back() {
        assert_eq!(segment_file_name(255), "00000000000000ff.seg");
        assert_eq!(parse_segment_file_name("00000000000000ff.seg"), Some(255));
        assert_eq!(parse_segment_file_name("ff.seg"), None);
        assert_eq!(parse_segment_file_name("00000000000000ff.seg.tmp"), None);
        assert!(segment_file_name(9) < segment_file_name(10));
    }
}
