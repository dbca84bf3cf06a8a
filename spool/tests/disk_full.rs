//! Disk full on a real (tiny) filesystem: a tmpfs mounted by the test. Appends fail with
//! `SpoolError::Full` (`452 4.3.1`), nothing already written is damaged, a restart on the full
//! disk still opens the spool, and appends succeed again once space returns.
//!
//! Mounting needs root (CI and the development machines run as root). Without it the test fails
//! with that reason rather than passing silently.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{body, message, small_config};
use spool::{QueueId, Spool, SpoolError};

/// A mounted tmpfs; the `TempDir` is kept so the mount point outlives the mount.
struct Tmpfs(
    PathBuf,
    #[allow(dead_code, reason = "kept only to remove the mount point on drop")] tempfile::TempDir,
);

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mounting a tmpfs failed: this test needs root"
        );
        Tmpfs(dir.path().to_path_buf(), dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn append(spool: &mut Spool, seed: u64) -> Result<QueueId, SpoolError> {
    let qid = spool.next_queue_id(1);
    let b = body(seed, 50_000);
    spool.accept(&message(qid, &["r@x.test"], &b))?.wait()?;
    Ok(qid)
}

fn check_all(spool: &Spool, acked: &[(QueueId, u64)]) {
    for (qid, seed) in acked {
        assert_eq!(
            spool.message(*qid).unwrap().body,
            &body(*seed, 50_000)[..],
            "{qid} damaged"
        );
    }
}

#[test]
fn full_disk_gives_452_damages_nothing_and_recovers_when_space_returns() {
    let fs = Tmpfs::mount("6m");
    let spool_dir = fs.0.join("spool");
    let ballast = fs.0.join("ballast");
    std::fs::write(&ballast, vec![1u8; 2 << 20]).unwrap();
    let cfg = small_config(Path::new(&spool_dir));

    let (mut spool, _) = Spool::open(cfg.clone()).unwrap();
    let mut acked = vec![];
    let err = loop {
        let seed = acked.len() as u64;
        match append(&mut spool, seed) {
            Ok(qid) => acked.push((qid, seed)),
            Err(e) => break e,
        }
        assert!(acked.len() < 1000, "the disk never filled");
    };
    assert!(matches!(err, SpoolError::Full(_)), "{err}");
    assert_eq!(err.reply(), (452, "4.3.1", "Insufficient system storage"));
    assert!(err.is_transient());
    assert!(acked.len() >= 20, "only {} messages fit", acked.len());
    check_all(&spool, &acked);
    // Still full: the next append fails the same way, and nothing changed.
    assert!(matches!(append(&mut spool, 9999), Err(SpoolError::Full(_))));
    spool.close();

    // A restart on the full disk recovers everything and opens (queued mail must still be
    // deliverable to free space); appends keep failing with 452 until space returns.
    let (mut spool, report) = Spool::open(cfg.clone()).expect("open on a full disk");
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(spool.len(), acked.len());
    check_all(&spool, &acked);
    assert!(matches!(
        append(&mut spool, 10_000),
        Err(SpoolError::Full(_))
    ));

    // Space returns: appends succeed again within the standby retry interval.
    std::fs::remove_file(&ballast).unwrap();
    let start = Instant::now();
    let qid = loop {
        match append(&mut spool, 20_000) {
            Ok(qid) => break qid,
            Err(SpoolError::Full(_)) if start.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("append did not recover: {e}"),
        }
    };
    acked.push((qid, 20_000));
    check_all(&spool, &acked);
    spool.close();
    let (spool, report) = Spool::open(cfg).unwrap();
    assert!(report.is_clean());
    assert_eq!(spool.len(), acked.len());
    check_all(&spool, &acked);
}

/// The spool fills the disk with small messages; outcome records must still be admitted (the
/// reserve segment), so that delivered mail frees its segments and new mail is taken again,
/// without any space coming from outside.
#[test]
fn a_disk_filled_by_the_spool_admits_outcomes_and_recovers_by_reclamation() {
    let fs = Tmpfs::mount("5m");
    let spool_dir = fs.0.join("spool");
    let cfg = small_config(Path::new(&spool_dir));
    let (mut spool, _) = Spool::open(cfg.clone()).unwrap();
    let small = |spool: &mut Spool, seed: u64| -> Result<QueueId, SpoolError> {
        let qid = spool.next_queue_id(1);
        let b = body(seed, 1000);
        spool.accept(&message(qid, &["r@x.test"], &b))?.wait()?;
        Ok(qid)
    };
    let mut acked = vec![];
    let err = loop {
        match small(&mut spool, acked.len() as u64) {
            Ok(qid) => acked.push(qid),
            Err(e) => break e,
        }
        assert!(acked.len() < 100_000, "the disk never filled");
    };
    assert!(matches!(err, SpoolError::Full(_)), "{err}");
    assert!(acked.len() > 1000, "only {} messages fit", acked.len());
    let deliver = |spool: &mut Spool, qids: &[QueueId]| {
        for qid in qids {
            let e = spool::OutcomeEntry {
                rcpt_index: 0,
                state: spool::RcptState::Delivered,
                attempts: 1,
                next_attempt_micros: 0,
                reply: "250 2.0.0 ok",
            };
            spool
                .record_outcomes(*qid, 2, &[e])
                .unwrap_or_else(|e| panic!("outcome refused on a full disk: {e}"))
                .wait()
                .unwrap_or_else(|e| panic!("outcome not committed on a full disk: {e}"));
        }
    };
    // Half delivered now: far more outcome bytes than the active segment had left.
    let (first, second) = acked.split_at(acked.len() / 2);
    deliver(&mut spool, first);
    assert!(matches!(small(&mut spool, 1), Err(SpoolError::Full(_))));
    // Restart on the full disk: it opens, and outcomes still go in.
    spool.close();
    let (mut spool, report) = Spool::open(cfg.clone()).expect("open on a full disk");
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(spool.len(), second.len());
    assert!(matches!(small(&mut spool, 1), Err(SpoolError::Full(_))));
    deliver(&mut spool, second);
    // Reclamation frees the delivered segments; new mail is taken again (the sync thread
    // retries preallocation every 500 ms: wait for that state, bounded).
    spool.reclaim().unwrap();
    assert_eq!(spool.len(), 0);
    let start = Instant::now();
    loop {
        match small(&mut spool, 7) {
            Ok(_) => break,
            Err(SpoolError::Full(_)) if start.elapsed() < Duration::from_secs(10) => {
                spool.reclaim().unwrap();
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("the spool never took mail again: {e}"),
        }
    }
    spool.close();
}
