//! The pure scan of one segment's bytes: every frame's CRC checked, valid records handed to a
//! visitor in order, damage in the middle skipped (resynchronising on the next valid frame),
//! and the end of the valid data found. No I/O: `spool`'s recovery reads the bytes and acts on
//! what this finds (docs/spool-format.md, "Recovery").

use crate::codec::{FRAME_ALIGN, FRAME_HEADER_LEN, FramePos, FrameRead, Record, decode_frame};
use crate::error::DecodeError;
use crate::segment::SEGMENT_HEADER_LEN;

/// What one segment scan found (pure result of [`scan_segment`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SegmentScan {
    /// Valid records handed to the visitor.
    pub records: u64,
    /// Records of a kind this code does not know, marked ignorable, skipped.
    pub ignored: u64,
    /// Offset just past the last valid frame.
    pub end: u64,
    /// Bad stretches followed by valid frames (offset relative to the segment).
    pub damage: Vec<(u64, u64, DecodeError)>,
    /// From `end`: bytes that are not a valid frame and not zero, up to this offset, with the
    /// error found at `end` (none if `end` held a zero header and garbage lay further on).
    pub garbage_after_end: Option<(u64, Option<DecodeError>)>,
}

/// Scans the frames of segment `segment`'s bytes (header included) in order, calling `visit`
/// with each valid record's offset, frame length and decoded record.
///
/// Returns an error only for a record that is unreadable because it is from the future (an
/// unknown kind or kind version not marked ignorable): the caller must then refuse the spool.
pub fn scan_segment<'a>(
    bytes: &'a [u8],
    segment: u64,
    mut visit: impl FnMut(u64, u32, Record<'a>),
) -> Result<SegmentScan, (u64, DecodeError)> {
    let mut scan = SegmentScan::default();
    let mut pos = SEGMENT_HEADER_LEN.min(bytes.len());
    let mut error_at_end = None;
    loop {
        match decode_frame(
            &bytes[pos..],
            FramePos {
                segment,
                offset: pos as u64,
            },
        ) {
            // A zero header ends the data, unless valid frames follow a zeroed stretch (a block
            // lost mid-segment): those are replayed and the stretch is reported.
            Ok(FrameRead::End) => match last_nonzero(&bytes[pos..])
                .and_then(|_| resync(bytes, segment, pos + FRAME_ALIGN))
            {
                Some(next) => {
                    scan.damage
                        .push((pos as u64, (next - pos) as u64, DecodeError::Zeroed));
                    pos = next;
                }
                None => break,
            },
            Ok(FrameRead::Frame(f)) => {
                match f.record() {
                    Ok(rec) => {
                        visit(pos as u64, f.frame_len as u32, rec);
                        scan.records += 1;
                    }
                    Err(
                        DecodeError::UnknownKind { .. }
                        | DecodeError::UnsupportedKindVersion { .. },
                    ) if f.is_ignorable() => scan.ignored += 1,
                    Err(
                        e @ (DecodeError::UnknownKind { .. }
                        | DecodeError::UnsupportedKindVersion { .. }),
                    ) => {
                        return Err((pos as u64, e));
                    }
                    // The CRC matched but the payload does not decode: written so by a bug, or
                    // damaged before the CRC was computed. Skip exactly this frame.
                    Err(e) => scan.damage.push((pos as u64, f.frame_len as u64, e)),
                }
                pos = (pos + f.frame_len).min(bytes.len());
            }
            Err(e) => match resync(bytes, segment, pos + FRAME_ALIGN) {
                Some(next) => {
                    scan.damage.push((pos as u64, (next - pos) as u64, e));
                    pos = next;
                }
                None => {
                    error_at_end = Some(e);
                    break;
                }
            },
        }
    }
    scan.end = pos as u64;
    let last_nonzero = last_nonzero(&bytes[pos..]);
    if let Some(i) = last_nonzero {
        let garbage_end = (pos + i + FRAME_ALIGN) & !(FRAME_ALIGN - 1);
        scan.garbage_after_end = Some((garbage_end.min(bytes.len()) as u64, error_at_end));
    }
    Ok(scan)
}

/// Index of the last non-zero byte. Whole 4 KiB blocks are OR-folded (which vectorises), so
/// scanning the zeroed remainder of a 64 MiB segment costs milliseconds.
pub fn last_nonzero(bytes: &[u8]) -> Option<usize> {
    const BLOCK: usize = 4096;
    let mut end = bytes.len();
    while end > 0 {
        let start = end.saturating_sub(BLOCK);
        let block = &bytes[start..end];
        if block.iter().fold(0u8, |acc, &b| acc | b) != 0 {
            return block.iter().rposition(|&b| b != 0).map(|i| start + i);
        }
        end = start;
    }
    None
}

/// Finds the next aligned offset at or after `from` holding a frame with a valid CRC and a
/// plausible header. Cheap header checks come before the CRC, so random garbage costs little.
fn resync(bytes: &[u8], segment: u64, from: usize) -> Option<usize> {
    let mut q = (from + FRAME_ALIGN - 1) & !(FRAME_ALIGN - 1);
    while q + FRAME_HEADER_LEN <= bytes.len() {
        let h = &bytes[q..q + FRAME_HEADER_LEN];
        let plausible = h[4..8] != [0, 0, 0, 0] || h[8] != 0;
        let kind_ok = (1..=3).contains(&h[8]) && h[9] == 1 || h[10] & 1 == 1;
        if plausible && kind_ok && h[11] == 0 {
            if let Ok(FrameRead::Frame(_)) = decode_frame(
                &bytes[q..],
                FramePos {
                    segment,
                    offset: q as u64,
                },
            ) {
                return Some(q);
            }
        }
        q += FRAME_ALIGN;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{Outcomes, QueueId};

    fn segment_with(n: u128) -> (Vec<u8>, Vec<usize>) {
        let mut bytes = vec![0u8; SEGMENT_HEADER_LEN];
        let mut offsets = vec![];
        for i in 0..n {
            offsets.push(bytes.len());
            let rec = Record::Outcomes(Outcomes {
                queue_id: QueueId(i),
                at_micros: 5,
                entries: vec![],
            });
            let pos = FramePos {
                segment: 1,
                offset: bytes.len() as u64,
            };
            rec.encode_frame(pos, &mut bytes).unwrap();
        }
        bytes.resize(bytes.len() + 4096, 0);
        (bytes, offsets)
    }

    fn ids(bytes: &[u8]) -> (Vec<u128>, SegmentScan) {
        let mut seen = vec![];
        let scan = scan_segment(bytes, 1, |_, _, r| seen.push(r.queue_id().0)).unwrap();
        (seen, scan)
    }

    #[test]
    fn clean_segment_reads_every_record_and_stops_at_zeros() {
        let (bytes, offsets) = segment_with(5);
        let (seen, scan) = ids(&bytes);
        assert_eq!(seen, vec![0, 1, 2, 3, 4]);
        assert!(scan.damage.is_empty() && scan.garbage_after_end.is_none());
        assert_eq!(scan.end as usize, offsets[4] + (offsets[1] - offsets[0]));
    }

    #[test]
    fn torn_last_record_is_garbage_after_end() {
        let (mut bytes, offsets) = segment_with(5);
        bytes[offsets[4] + 13] ^= 0xff;
        let (seen, scan) = ids(&bytes);
        assert_eq!(seen, vec![0, 1, 2, 3]);
        assert_eq!(scan.end as usize, offsets[4]);
        assert!(matches!(
            scan.garbage_after_end,
            Some((_, Some(DecodeError::BadCrc { .. })))
        ));
    }

    #[test]
    fn damage_in_the_middle_is_skipped_and_reported() {
        let (mut bytes, offsets) = segment_with(5);
        bytes[offsets[2] + 5] ^= 0x01; // corrupt the length of record 2
        let (seen, scan) = ids(&bytes);
        assert_eq!(seen, vec![0, 1, 3, 4]);
        assert_eq!(scan.damage.len(), 1);
        assert_eq!(scan.damage[0].0 as usize, offsets[2]);
        assert_eq!(scan.damage[0].1 as usize, offsets[3] - offsets[2]);
    }

    #[test]
    fn data_after_a_zero_header_is_garbage_after_end() {
        let (mut bytes, offsets) = segment_with(3);
        let frame = offsets[1] - offsets[0];
        bytes.copy_within(offsets[2]..offsets[2] + frame, offsets[2] + 2 * frame);
        bytes[offsets[2]..offsets[2] + frame].fill(0);
        let (seen, scan) = ids(&bytes);
        assert_eq!(seen, vec![0, 1]);
        assert!(matches!(scan.garbage_after_end, Some((_, None))));
    }

    #[test]
    fn unknown_kind_is_refused_unless_ignorable() {
        let (mut bytes, offsets) = segment_with(2);
        let at = offsets[1];
        bytes[at + 8] = 77;
        let pos = FramePos {
            segment: 1,
            offset: at as u64,
        };
        let crc = crate::codec::frame_crc(pos, &bytes[at + 4..at + 12 + 28]);
        bytes[at..at + 4].copy_from_slice(&crc.to_le_bytes());
        let err = scan_segment(&bytes, 1, |_, _, _| {}).unwrap_err();
        assert_eq!(err, (at as u64, DecodeError::UnknownKind { kind: 77 }));
        bytes[at + 10] = 1; // FLAG_IGNORABLE
        let crc = crate::codec::frame_crc(pos, &bytes[at + 4..at + 12 + 28]);
        bytes[at..at + 4].copy_from_slice(&crc.to_le_bytes());
        let (seen, scan) = ids(&bytes);
        assert_eq!((seen, scan.ignored), (vec![0], 1));
    }

    #[test]
    fn random_garbage_never_panics() {
        let mut x = 0x1234_5678_9abc_def0u64;
        let mut bytes = vec![0u8; 256 << 10];
        for b in bytes.iter_mut().skip(SEGMENT_HEADER_LEN) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let (seen, scan) = ids(&bytes);
        assert!(seen.is_empty());
        assert!(scan.garbage_after_end.is_some());
    }
}
