//! One test per row of the recovery table in docs/spool-format.md, on real segment files.

mod common;

use std::path::{Path, PathBuf};

use common::{body, message, small_config};
use spool::{DecodeError, QueueId, Spool, SpoolError};

/// Segment files of `dir`, oldest first.
fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    v.sort();
    v
}

/// Writes `n` messages of `len` bytes and closes the spool; returns their ids in order.
fn fill(dir: &Path, n: u64, len: usize) -> Vec<QueueId> {
    let (mut spool, _) = Spool::open(small_config(dir)).unwrap();
    let ids = (0..n)
        .map(|i| {
            let qid = spool.next_queue_id(1);
            spool
                .accept(&message(qid, &["r@x.test"], &body(i, len)))
                .unwrap()
                .wait()
                .unwrap();
            qid
        })
        .collect();
    spool.close();
    ids
}

fn segment_id(seg: &Path) -> u64 {
    let name = seg.file_name().unwrap().to_str().unwrap();
    spool::segment::parse_segment_file_name(name).unwrap()
}

/// Offset of the last record's frame in `seg` (found by scanning, as recovery does).
fn frame_offsets(seg: &Path) -> Vec<u64> {
    let bytes = std::fs::read(seg).unwrap();
    let mut offs = vec![];
    spool::scan::scan_segment(&bytes, segment_id(seg), |o, _, _| offs.push(o)).unwrap();
    offs
}

fn patch(path: &Path, offset: u64, f: impl FnOnce(&mut [u8])) {
    let mut bytes = std::fs::read(path).unwrap();
    f(&mut bytes[offset as usize..]);
    std::fs::write(path, bytes).unwrap();
}

/// The newest segment holding records.
fn data_tail(dir: &Path) -> PathBuf {
    segments(dir)
        .into_iter()
        .rev()
        .find(|p| !frame_offsets(p).is_empty())
        .unwrap()
}

#[test]
fn clean_shutdown_recovers_everything_and_reports_nothing() {
    let dir = tempfile::tempdir().unwrap();
    fill(dir.path(), 20, 3000);
    let (spool, report) = Spool::open(small_config(dir.path())).unwrap();
    assert!(
        report.is_clean() && report.torn_tail.is_none(),
        "{report:?}"
    );
    assert_eq!((report.records, spool.len()), (20, 20));
}

#[test]
fn torn_tail_is_zeroed_and_the_records_before_it_kept() {
    let dir = tempfile::tempdir().unwrap();
    let ids = fill(dir.path(), 20, 3000);
    let tail = data_tail(dir.path());
    let last = *frame_offsets(&tail).last().unwrap();
    patch(&tail, last + 100, |b| b[..50].fill(0xEE)); // a write that only half landed
    let (spool, report) = Spool::open(small_config(dir.path())).unwrap();
    let torn = report.torn_tail.clone().expect("torn tail reported");
    assert_eq!(torn.offset, last);
    assert!(matches!(torn.error, Some(DecodeError::BadCrc { .. })));
    assert!(report.is_clean(), "a torn tail is not damage: {report:?}");
    assert_eq!(spool.len(), 19);
    assert!(spool.get(ids[19]).is_none());
    spool.close();
    // The tail was zeroed on disk: the next recovery finds nothing to repair.
    let (spool, report) = Spool::open(small_config(dir.path())).unwrap();
    assert!(report.torn_tail.is_none(), "{report:?}");
    assert_eq!(spool.len(), 19);
}

#[test]
fn zero_filled_tail_is_a_normal_end() {
    let dir = tempfile::tempdir().unwrap();
    fill(dir.path(), 10, 3000);
    let tail = data_tail(dir.path());
    let last = *frame_offsets(&tail).last().unwrap();
    patch(&tail, last, |b| b[..4096].fill(0));
    let (spool, report) = Spool::open(small_config(dir.path())).unwrap();
    assert!(
        report.is_clean() && report.torn_tail.is_none(),
        "{report:?}"
    );
    assert_eq!(spool.len(), 9);
}

#[test]
fn zeroed_block_mid_segment_is_reported_and_the_frames_after_it_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let ids = fill(dir.path(), 20, 3000);
    let seg = &segments(dir.path())[0];
    let offs = frame_offsets(seg);
    // Frames 5 and 6 (and the start of 7) become zeros, as a lost block would leave them.
    patch(seg, offs[5], |b| {
        b[..(offs[7] - offs[5]) as usize + 100].fill(0)
    });
    let (spool, report) = Spool::open(small_config(dir.path())).unwrap();
    // One stretch, from the zeros to the next valid frame (the cut frame 7 included).
    assert_eq!(report.damage_count, 1, "{report:?}");
    assert_eq!(report.damage[0].offset, offs[5]);
    assert_eq!(report.damage[0].len, offs[8] - offs[5]);
    assert_eq!(report.damage[0].error, DecodeError::Zeroed);
    assert!(report.torn_tail.is_none(), "nothing zeroed: {report:?}");
    assert_eq!(spool.len(), 17);
    for (i, qid) in ids.iter().enumerate() {
        if (5..=7).contains(&i) {
            assert!(spool.get(*qid).is_none());
        } else {
            assert_eq!(spool.message(*qid).unwrap().body, &body(i as u64, 3000)[..]);
        }
    }
    drop(spool);
    // Still there at the next start: recovery never zeroed the frames after the hole.
    let (spool, _) = Spool::open(small_config(dir.path())).unwrap();
    assert_eq!(spool.len(), 17);
}

#[test]
fn segment_that_cannot_be_read_is_quarantined_and_the_rest_serves() {
    let dir = tempfile::tempdir().unwrap();
    // Enough for two segments of 1 MiB.
    let ids = fill(dir.path(), 400, 3000);
    let segs = segments(dir.path());
    assert!(segs.len() >= 3, "{segs:?}");
    let bad = segs[0].clone();
    let disk = spool::disk::FaultyDisk::new();
    disk.make_unreadable(&bad);
    let mut config = small_config(dir.path());
    config.log.disk = disk.clone();
    let (spool, report) = Spool::open(config).unwrap();
    assert_eq!(report.quarantined, vec![bad.with_extension("damaged")]);
    assert!(
        matches!(report.damage[0].error, DecodeError::ReadFailed(_)),
        "{report:?}"
    );
    assert!(!bad.exists() && bad.with_extension("damaged").exists());
    // The messages of the other segments serve, bodies intact.
    let kept: Vec<_> = ids
        .iter()
        .enumerate()
        .filter(|(_, q)| spool.get(**q).is_some())
        .collect();
    assert!(!kept.is_empty() && kept.len() < ids.len());
    for (i, qid) in kept {
        assert_eq!(spool.message(*qid).unwrap().body, &body(i as u64, 3000)[..]);
    }
}

#[test]
fn flipped_bit_mid_segment_is_reported_and_the_rest_kept() {
    let dir = tempfile::tempdir().unwrap();
    let ids = fill(dir.path(), 20, 3000);
    let seg = &segments(dir.path())[0];
    let offs = frame_offsets(seg);
    patch(seg, offs[5] + 40, |b| b[0] ^= 0x04);
    let (spool, report) = Spool::open(small_config(dir.path())).unwrap();
    assert_eq!(report.damage_count, 1, "{report:?}");
    assert_eq!(report.damage[0].offset, offs[5]);
    assert!(matches!(report.damage[0].error, DecodeError::BadCrc { .. }));
    assert_eq!(spool.len(), 19);
    assert!(spool.get(ids[5]).is_none());
    for (i, qid) in ids.iter().enumerate().filter(|(i, _)| *i != 5) {
        assert_eq!(spool.message(*qid).unwrap().body, &body(i as u64, 3000)[..]);
    }
}

#[test]
fn truncated_older_segment_keeps_what_precedes_the_cut_and_reports_damage() {
    let dir = tempfile::tempdir().unwrap();
    fill(dir.path(), 200, 20_000); // several 1 MiB segments
    let segs = segments(dir.path());
    assert!(segs.len() >= 3);
    let first = &segs[0];
    let offs = frame_offsets(first);
    let cut = offs[10] + 777;
    std::fs::OpenOptions::new()
        .write(true)
        .open(first)
        .unwrap()
        .set_len(cut)
        .unwrap();
    let (spool, report) = Spool::open(small_config(dir.path())).unwrap();
    assert_eq!(report.damage_count, 1, "{report:?}");
    assert_eq!(report.damage[0].offset, offs[10]);
    assert!(report.torn_tail.is_none());
    assert_eq!(spool.len(), 200 - (offs.len() - 10));
}

#[test]
fn segment_shorter_than_its_header_is_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    fill(dir.path(), 5, 1000);
    std::fs::write(dir.path().join("00000000000000f0.seg"), b"SAIDA").unwrap();
    let (spool, report) = Spool::open(small_config(dir.path())).unwrap();
    assert_eq!(report.quarantined.len(), 1);
    assert!(report.quarantined[0].exists());
    assert_eq!(spool.len(), 5);
}

#[test]
fn damaged_header_costs_the_header_not_the_records() {
    let dir = tempfile::tempdir().unwrap();
    fill(dir.path(), 5, 1000);
    let seg = &segments(dir.path())[0];
    patch(seg, 20, |b| b[0] ^= 0xFF);
    let (spool, report) = Spool::open(small_config(dir.path())).unwrap();
    assert_eq!(report.damage_count, 1);
    assert_eq!(report.damage[0].offset, 0);
    assert_eq!(spool.len(), 5);
}

#[test]
fn segment_from_a_future_format_is_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    fill(dir.path(), 5, 1000);
    let seg = &segments(dir.path())[0];
    patch(seg, 8, |b| b[..2].copy_from_slice(&2u16.to_le_bytes()));
    std::fs::write(dir.path().join("0000000000000099.seg.tmp"), b"partial").unwrap();
    let before: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let seg_bytes = std::fs::read(seg).unwrap();
    match Spool::open(small_config(dir.path())) {
        Err(SpoolError::FutureFormat {
            version: 2,
            supported: 1,
            ..
        }) => {}
        Err(e) => panic!("wrong error {e}"),
        Ok(_) => panic!("a future segment was opened"),
    }
    let after: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(
        before.len(),
        after.len(),
        "no file may be created or removed"
    );
    assert_eq!(std::fs::read(seg).unwrap(), seg_bytes);
}

#[test]
fn unknown_record_kind_not_marked_ignorable_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    fill(dir.path(), 3, 1000);
    let seg = &segments(dir.path())[0];
    let at = frame_offsets(seg)[1];
    let mut bytes = std::fs::read(seg).unwrap();
    let s = at as usize;
    let len = u32::from_le_bytes(bytes[s + 4..s + 8].try_into().unwrap()) as usize;
    bytes[s + 8] = 200;
    let mut covered = segment_id(seg).to_le_bytes().to_vec();
    covered.extend_from_slice(&at.to_le_bytes());
    covered.extend_from_slice(&bytes[s + 4..s + 12 + len]);
    let crc = crc32c_of(&covered);
    bytes[s..s + 4].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(seg, bytes).unwrap();
    match Spool::open(small_config(dir.path())) {
        Err(SpoolError::Unreadable {
            offset,
            error: DecodeError::UnknownKind { kind: 200 },
            ..
        }) => {
            assert_eq!(offset, at)
        }
        Err(e) => panic!("wrong error {e}"),
        Ok(_) => panic!("opened a spool with an unreadable record"),
    }
}

#[test]
fn interrupted_segment_creation_leaves_a_temp_file_that_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    fill(dir.path(), 3, 1000);
    let tmp = dir.path().join("00000000000000aa.seg.tmp");
    std::fs::write(&tmp, vec![0u8; 10]).unwrap();
    let (spool, report) = Spool::open(small_config(dir.path())).unwrap();
    assert_eq!(report.temp_files_removed, 1);
    assert!(!tmp.exists());
    assert_eq!(spool.len(), 3);
}

/// CRC32C, bit by bit (independent of the crate under test).
fn crc32c_of(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}
