//! Recovery: scans every segment of a spool directory, checks every frame's CRC, repairs a torn
//! tail and reports damage, handing each valid record to a visitor in write order.
//!
//! The cases and what happens in each are the table "Recovery" in docs/spool-format.md; each
//! row has a test (here for the pure scan, in `tests/recovery_cases.rs` for files).
//!
//! [`scan_segment`] is pure (bytes in, findings out). [`recover_dir`] does the I/O: lists the
//! directory, removes `.seg.tmp` leftovers, reads each segment with `pread` (through the
//! [`Disk`] seam; never through a map, where a media error would raise `SIGBUS` and crash-loop
//! the daemon), quarantines a segment that cannot be read (renamed `*.damaged`, reported, the
//! rest of the spool serves), maps each kept segment read-only for serving, and zeroes the torn
//! tail of the newest segment with `pwrite` + `fdatasync` (never by truncating, so maps stay
//! valid). It refuses to touch anything when a segment comes from a newer format version.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use crate::codec::{FRAME_ALIGN, FRAME_HEADER_LEN, FramePos, FrameRead, Record, decode_frame};
use crate::disk::Disk;
use crate::error::{DecodeError, IoOp, SpoolError, io_err};
use crate::log::{Location, sync_dir};
use crate::mmap::SegmentMap;
use crate::segment::{SEGMENT_HEADER_LEN, SegmentHeader, TEMP_SUFFIX, parse_segment_file_name};

/// Damage entries kept in a report; more are counted, not listed.
pub const DAMAGE_LIST_MAX: usize = 1000;

/// A stretch of a segment that could not be read. Its records, if any, are lost.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    pub segment: u64,
    pub offset: u64,
    pub len: u64,
    pub error: DecodeError,
}

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
fn last_nonzero(bytes: &[u8]) -> Option<usize> {
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

/// A segment that recovery found and kept, with its read-only map.
pub struct RecoveredSegment {
    pub id: u64,
    pub path: PathBuf,
    pub map: SegmentMap,
    /// Decoded header (`None` when the header was damaged and the id came from the file name).
    pub header: Option<SegmentHeader>,
    pub records: u64,
    /// Offset past the last valid frame.
    pub end: u64,
}

/// The torn tail recovery repaired.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TornTail {
    pub segment: u64,
    pub offset: u64,
    /// Bytes overwritten with zeros.
    pub bytes_zeroed: u64,
    /// What was wrong at `offset` (none when a zero header was followed by unsynced data).
    pub error: Option<DecodeError>,
}

/// Everything recovery saw and did, for logs and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    pub segments: u64,
    pub records: u64,
    pub ignored_records: u64,
    pub bytes_scanned: u64,
    pub torn_tail: Option<TornTail>,
    /// Damage found (at most [`DAMAGE_LIST_MAX`] entries; `damage_count` counts all).
    pub damage: Vec<Damage>,
    pub damage_count: u64,
    /// `.seg.tmp` files of interrupted segment creations, deleted.
    pub temp_files_removed: u64,
    /// Segment files too short to hold a header, renamed to `*.damaged`.
    pub quarantined: Vec<PathBuf>,
}

impl RecoveryReport {
    fn damage(&mut self, d: Damage) {
        self.damage_count += 1;
        if self.damage.len() < DAMAGE_LIST_MAX {
            self.damage.push(d);
        }
    }

    /// True when recovery found nothing but the expected (a torn tail is expected after a crash).
    pub fn is_clean(&self) -> bool {
        self.damage_count == 0 && self.quarantined.is_empty()
    }
}

/// Recovers the spool directory `dir` (created if missing), calling `visit` for every valid
/// record in write order (segment id, then offset). Returns the kept segments and the report.
///
/// `untrusted` lists segments whose bytes from an offset on are not to be believed (written
/// after an I/O error, never acknowledged; see [`crate::log`]): they are not scanned there.
pub fn recover_dir(
    dir: &Path,
    disk: &dyn Disk,
    untrusted: &[(u64, u64)],
    mut visit: impl FnMut(Location, &Record<'_>),
) -> Result<(Vec<RecoveredSegment>, RecoveryReport), SpoolError> {
    std::fs::create_dir_all(dir).map_err(io_err(IoOp::CreateDir, dir))?;
    let mut report = RecoveryReport::default();
    let mut ids = BTreeMap::new();
    let mut temps = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(io_err(IoOp::ReadDir, dir))?;
    for entry in entries {
        let entry = entry.map_err(io_err(IoOp::ReadDir, dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.ends_with(TEMP_SUFFIX) {
            temps.push(entry.path());
        } else if let Some(id) = parse_segment_file_name(name) {
            ids.insert(id, entry.path());
        }
    }

    // Pass 1: open, map and check headers, modifying nothing, so that a spool from a newer
    // format is refused untouched.
    let mut opened = Vec::new();
    for (id, path) in ids {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err(IoOp::Open, &path))?;
        let len = file
            .metadata()
            .map_err(io_err(IoOp::Metadata, &path))?
            .len();
        if len < SEGMENT_HEADER_LEN as u64 {
            let e = DecodeError::Short {
                needed: SEGMENT_HEADER_LEN,
                available: len as usize,
            };
            opened.push((id, path, file, len, Err(e)));
            continue;
        }
        let mut head = [0u8; SEGMENT_HEADER_LEN];
        if let Err(e) = disk.read_at(&file, &path, &mut head, 0) {
            opened.push((
                id,
                path,
                file,
                len,
                Err(DecodeError::ReadFailed(e.to_string())),
            ));
            continue;
        }
        let header = match SegmentHeader::decode(&head) {
            Ok(h) if h.segment_id == id => Ok(h),
            Ok(h) => Err(DecodeError::InvalidValue {
                field: "segment_id",
                value: h.segment_id,
            }),
            Err(DecodeError::FutureFormat { version, supported }) => {
                return Err(SpoolError::FutureFormat {
                    path,
                    version,
                    supported,
                });
            }
            Err(e) => Err(e),
        };
        opened.push((id, path, file, len, Ok(header)));
    }

    // Pass 2: scan. Records are visited as found; torn-tail decisions need the whole picture.
    let mut scanned: Vec<(RecoveredSegment, File, SegmentScan)> = Vec::new();
    // One buffer, reused for every segment (a segment is at most 1 GiB, 64 MiB by default).
    let mut bytes = Vec::new();
    for (id, path, file, len, header) in opened {
        // Unreadable (too short, or a media error): quarantined, reported; the rest serves.
        let read = match header {
            Err(e) => Err(e),
            Ok(h) => {
                bytes.resize(len as usize, 0);
                match disk.read_at(&file, &path, &mut bytes, 0) {
                    Ok(n) => {
                        bytes.truncate(n);
                        Ok(h)
                    }
                    Err(e) => Err(DecodeError::ReadFailed(e.to_string())),
                }
            }
        };
        let header = match read {
            Ok(h) => h,
            Err(e) => {
                report.quarantined.push(quarantine(&path)?);
                report.damage(Damage {
                    segment: id,
                    offset: 0,
                    len,
                    error: e,
                });
                continue;
            }
        };
        let header = match header {
            Ok(h) => Some(h),
            Err(e) => {
                // The frames check themselves: a damaged header costs the header, not the data.
                let len = SEGMENT_HEADER_LEN as u64;
                report.damage(Damage {
                    segment: id,
                    offset: 0,
                    len,
                    error: e,
                });
                None
            }
        };
        let limit = untrusted
            .iter()
            .find(|(s, _)| *s == id)
            .map_or(bytes.len(), |(_, from)| (*from as usize).min(bytes.len()));
        if let Some(i) = last_nonzero(&bytes[limit..]) {
            report.damage(Damage {
                segment: id,
                offset: limit as u64,
                len: (i + 1) as u64,
                error: DecodeError::Unsynced,
            });
        }
        let scan = scan_segment(&bytes[..limit], id, |offset, len, rec| {
            visit(
                Location {
                    segment: id,
                    offset: offset as u32,
                    len,
                },
                &rec,
            )
        })
        .map_err(|(offset, error)| SpoolError::Unreadable {
            path: path.clone(),
            offset,
            error,
        })?;
        report.segments += 1;
        report.records += scan.records;
        report.ignored_records += scan.ignored;
        report.bytes_scanned += scan.end;
        for (offset, len, error) in &scan.damage {
            report.damage(Damage {
                segment: id,
                offset: *offset,
                len: *len,
                error: error.clone(),
            });
        }
        // Mapped for serving bodies; mapping reads nothing.
        let map = SegmentMap::open(&file, &path)?;
        let seg = RecoveredSegment {
            id,
            path,
            map,
            header,
            records: scan.records,
            end: scan.end,
        };
        scanned.push((seg, file, scan));
    }

    // The tail segment is the newest one holding anything; segments after it are empty
    // preallocated standbys. Only the tail may carry a torn write (see `log`): elsewhere,
    // unreadable bytes at the end are damage.
    let tail = scanned
        .iter()
        .rposition(|(s, _, scan)| s.records > 0 || scan.garbage_after_end.is_some());
    for (i, (seg, file, scan)) in scanned.iter().enumerate() {
        let Some((garbage_end, error)) = &scan.garbage_after_end else {
            continue;
        };
        if Some(i) == tail {
            zero_range(disk, file, &seg.path, scan.end, *garbage_end)?;
            report.torn_tail = Some(TornTail {
                segment: seg.id,
                offset: scan.end,
                bytes_zeroed: garbage_end - scan.end,
                error: error.clone(),
            });
        } else {
            let error = error.clone().unwrap_or(DecodeError::InvalidValue {
                field: "data after end",
                value: 0,
            });
            report.damage(Damage {
                segment: seg.id,
                offset: scan.end,
                len: garbage_end - scan.end,
                error,
            });
        }
    }

    for tmp in temps {
        std::fs::remove_file(&tmp).map_err(io_err(IoOp::Remove, &tmp))?;
        report.temp_files_removed += 1;
    }
    if report.temp_files_removed > 0 || !report.quarantined.is_empty() {
        sync_dir(dir)?;
    }
    Ok((scanned.into_iter().map(|(s, _, _)| s).collect(), report))
}

/// Renames a segment to `*.damaged`, out of the spool's way (kept for the operator).
fn quarantine(path: &Path) -> Result<PathBuf, SpoolError> {
    let damaged = path.with_extension("damaged");
    std::fs::rename(path, &damaged).map_err(io_err(IoOp::Rename, path))?;
    Ok(damaged)
}

/// Overwrites `[from, to)` with zeros and syncs, so that unacknowledged bytes of a torn write can
/// never be read as records later.
fn zero_range(
    disk: &dyn Disk,
    file: &File,
    path: &Path,
    from: u64,
    to: u64,
) -> Result<(), SpoolError> {
    const CHUNK: usize = 1 << 20;
    let zeros = vec![0u8; CHUNK];
    let mut pos = from;
    while pos < to {
        let n = ((to - pos) as usize).min(CHUNK);
        disk.write_at(file, path, &zeros[..n], pos)
            .map_err(io_err(IoOp::Write, path))?;
        pos += n as u64;
    }
    disk.sync_data(file, path).map_err(io_err(IoOp::Sync, path))
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
