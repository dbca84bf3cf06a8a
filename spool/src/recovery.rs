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

use crate::codec::Record;
use crate::disk::Disk;
use crate::error::{DecodeError, IoOp, SpoolError, io_err};
use crate::log::{Location, sync_dir};
use crate::mmap::SegmentMap;
use crate::scan::{SegmentScan, last_nonzero, scan_segment};
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
