//! The spool end to end on real files: accept, journal outcomes, recover, read bodies zero-copy,
//! reclaim, compact, and stay within the stated bound on dead records.

mod common;

use common::{body, message, small_config};
use spool::{OutcomeEntry, QueueId, RcptState, Spool};

fn delivered(i: u32) -> OutcomeEntry<'static> {
    OutcomeEntry {
        rcpt_index: i,
        state: RcptState::Delivered,
        attempts: 1,
        next_attempt_micros: 0,
        reply: "250 2.0.0 ok",
    }
}

/// Accepts a one-recipient message and waits for its commit.
fn accept(spool: &mut Spool, rcpt: &str, body: &[u8]) -> QueueId {
    let qid = spool.next_queue_id(1);
    spool
        .accept(&message(qid, &[rcpt], body))
        .unwrap()
        .wait()
        .unwrap();
    qid
}

/// Journals recipient 0 of `qid` as delivered and waits for the commit.
fn deliver(spool: &mut Spool, qid: QueueId) {
    let done = [delivered(0)];
    spool
        .record_outcomes(qid, 2, &done)
        .unwrap()
        .wait()
        .unwrap();
}

#[test]
fn accepted_messages_survive_reopen_with_their_bodies() {
    let dir = tempfile::tempdir().unwrap();
    let mut ids = vec![];
    {
        let (mut spool, report) = Spool::open(small_config(dir.path())).unwrap();
        assert!(report.is_clean() && report.records == 0);
        for i in 0..50u64 {
            let qid = spool.next_queue_id(1);
            let b = body(i, 2000 + i as usize);
            spool
                .accept(&message(qid, &["a@x.test", "b@y.test"], &b))
                .unwrap()
                .wait()
                .unwrap();
            ids.push((qid, i));
        }
        spool.close();
    }
    let (spool, report) = Spool::open(small_config(dir.path())).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.records, 50);
    assert_eq!(spool.len(), 50);
    for (qid, i) in ids {
        let m = spool.message(qid).unwrap();
        assert_eq!(m.body, &body(i, 2000 + i as usize)[..]);
        assert_eq!(m.recipients[1].address, "b@y.test");
    }
}

#[test]
fn outcomes_are_replayed_and_terminal_messages_leave_the_index() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b);
    {
        let (mut spool, _) = Spool::open(small_config(dir.path())).unwrap();
        a = spool.next_queue_id(1);
        b = spool.next_queue_id(1);
        spool
            .accept(&message(a, &["1@x.test", "2@x.test"], b"x"))
            .unwrap()
            .wait()
            .unwrap();
        spool
            .accept(&message(b, &["3@x.test"], b"y"))
            .unwrap()
            .wait()
            .unwrap();
        let deferred = OutcomeEntry {
            rcpt_index: 1,
            state: RcptState::Deferred,
            attempts: 1,
            next_attempt_micros: 99,
            reply: "451 4.7.1 later",
        };
        spool
            .record_outcomes(a, 5, &[delivered(0), deferred])
            .unwrap()
            .wait()
            .unwrap();
        spool
            .record_outcomes(b, 5, &[delivered(0)])
            .unwrap()
            .wait()
            .unwrap();
        // A terminal message leaves the index once its final outcome is durable.
        spool.settle();
        assert!(spool.get(b).is_none());
        spool.close();
    }
    let (spool, _) = Spool::open(small_config(dir.path())).unwrap();
    assert_eq!(spool.len(), 1);
    let live = spool.get(a).unwrap();
    assert_eq!(live.rcpts[0].state, RcptState::Delivered);
    assert_eq!(live.rcpts[1].state, RcptState::Deferred);
    assert_eq!(live.rcpts[1].next_attempt_micros, 99);
    assert!(spool.get(b).is_none());
}

#[test]
fn outcome_for_unknown_recipient_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (mut spool, _) = Spool::open(small_config(dir.path())).unwrap();
    let a = spool.next_queue_id(1);
    spool
        .accept(&message(a, &["1@x.test"], b"x"))
        .unwrap()
        .wait()
        .unwrap();
    assert!(spool.record_outcomes(a, 1, &[delivered(3)]).is_err());
    assert!(
        spool
            .record_outcomes(QueueId(5), 1, &[delivered(0)])
            .is_err()
    );
}

#[test]
fn delivered_segments_are_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let (mut spool, _) = Spool::open(small_config(dir.path())).unwrap();
    let b = body(1, 20_000);
    let mut ids = vec![];
    for _ in 0..300 {
        let qid = accept(&mut spool, "a@x.test", &b);
        ids.push(qid);
    }
    assert!(spool.usage().segments >= 5, "{:?}", spool.usage());
    for qid in ids {
        deliver(&mut spool, qid);
    }
    spool.reclaim().unwrap();
    let usage = spool.usage();
    assert!(usage.segments <= 1, "{usage:?}");
    let files = common::segment_files(dir.path());
    assert!(
        files <= 4,
        "active + standby + reserve (+ one just sealed) expected, found {files}"
    );
}

#[test]
fn compaction_keeps_dead_space_within_the_bound_and_keeps_live_mail() {
    let dir = tempfile::tempdir().unwrap();
    let (mut spool, _) = Spool::open(small_config(dir.path())).unwrap();
    let b = body(2, 10_000);
    let mut keep = vec![];
    // Every 50th message stays deferred forever; the rest are delivered. Without compaction the
    // deferred ones would pin every segment.
    for i in 0..2000 {
        let qid = accept(&mut spool, "a@x.test", &b);
        if i % 50 == 0 {
            keep.push(qid);
        } else {
            deliver(&mut spool, qid);
        }
        if i % 100 == 0 {
            spool.reclaim().unwrap();
        }
    }
    for _ in 0..200 {
        let r = spool.reclaim().unwrap();
        if r.rehomes_pending == 0 && r.segments_deleted == 0 && r.messages_rehomed == 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let usage = spool.usage();
    assert!(
        usage.segments <= spool.segments_bound(),
        "{usage:?} bound {}",
        spool.segments_bound()
    );
    // The documented bound: segments <= 2 * ceil(live / segment) + 2, i.e. at most
    // 2 * live + 4 segments of bytes, plus the preallocated standby and reserve files.
    assert!(
        usage.bytes_on_disk <= 2 * usage.live_bytes + 4 * (1 << 20),
        "{usage:?}"
    );
    let files = common::segment_files(dir.path()) as u64;
    assert!(files <= spool.segments_bound() + 2, "{files} files on disk");
    spool.close();
    // Every kept message is still there, body intact, after a restart.
    let (spool, report) = Spool::open(small_config(dir.path())).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(spool.len(), keep.len());
    for qid in keep {
        assert_eq!(spool.message(qid).unwrap().body, &b[..]);
    }
}

#[test]
fn rehomed_messages_keep_their_recipient_state_across_restart() {
    let dir = tempfile::tempdir().unwrap();
    let b = body(3, 100_000);
    let qid;
    {
        let (mut spool, _) = Spool::open(small_config(dir.path())).unwrap();
        qid = spool.next_queue_id(1);
        spool
            .accept(&message(qid, &["1@x.test", "2@x.test"], &b))
            .unwrap()
            .wait()
            .unwrap();
        let later = OutcomeEntry {
            rcpt_index: 1,
            state: RcptState::Deferred,
            attempts: 1,
            next_attempt_micros: 7,
            reply: "451 4.7.1 try later",
        };
        let outcomes = [delivered(0), later];
        spool
            .record_outcomes(qid, 2, &outcomes)
            .unwrap()
            .wait()
            .unwrap();
        // Fill segments with delivered mail until compaction must move `qid`.
        for _ in 0..40 {
            let other = accept(&mut spool, "z@x.test", &b);
            deliver(&mut spool, other);
        }
        let first_base = spool.get(qid).unwrap().base;
        let mut moved = false;
        for _ in 0..100 {
            spool.reclaim().unwrap();
            if spool.get(qid).unwrap().base.segment != first_base.segment {
                moved = true;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(moved, "compaction did not move the message");
        spool.close();
    }
    let (spool, _) = Spool::open(small_config(dir.path())).unwrap();
    let live = spool.get(qid).unwrap();
    assert_eq!(live.rcpts[0].state, RcptState::Delivered);
    assert_eq!(live.rcpts[1].state, RcptState::Deferred);
    assert_eq!(live.rcpts[1].next_attempt_micros, 7);
    assert_eq!(
        live.rcpts[1].last_reply.as_deref(),
        Some("451 4.7.1 try later")
    );
    assert_eq!(spool.message(qid).unwrap().body, &b[..]);
}

#[test]
fn segments_holding_only_outcomes_are_reclaimed_too() {
    let dir = tempfile::tempdir().unwrap();
    let (mut spool, _) = Spool::open(small_config(dir.path())).unwrap();
    let qid = accept(&mut spool, "a@x.test", b"hello");
    // Each deferral carries a 60 KB reply, so 60 of them fill several 1 MiB segments that hold
    // nothing but outcome records.
    let reply = "4".repeat(60_000);
    for attempt in 1..=60 {
        let e = OutcomeEntry {
            rcpt_index: 0,
            state: RcptState::Deferred,
            attempts: attempt,
            next_attempt_micros: 1,
            reply: &reply,
        };
        spool.record_outcomes(qid, 2, &[e]).unwrap().wait().unwrap();
    }
    deliver(&mut spool, qid);
    spool.reclaim().unwrap();
    let segs = common::segment_files(dir.path());
    assert!(
        segs <= 3,
        "{segs} segment files left (active, standby and reserve expected)"
    );
    assert_eq!(spool.usage().segments, 1, "{:?}", spool.usage());
}

#[test]
fn another_thread_reads_bodies_zero_copy_and_a_held_message_outlives_its_segment() {
    let dir = tempfile::tempdir().unwrap();
    let (mut spool, _) = Spool::open(small_config(dir.path())).unwrap();
    let b = body(9, 300_000);
    let qids: Vec<QueueId> = (0..6)
        .map(|_| accept(&mut spool, "r@dest.test", &b))
        .collect();
    let locs: Vec<_> = qids.iter().map(|q| spool.get(*q).unwrap().base).collect();
    let reader = spool.reader();
    // Another thread (another shard) reads every message through the shared maps.
    let held = std::thread::spawn({
        let (reader, locs, b) = (reader.clone(), locs.clone(), b.clone());
        move || {
            let refs: Vec<_> = locs.iter().map(|l| reader.read(*l).unwrap()).collect();
            for r in &refs {
                assert_eq!(r.message().unwrap().body, &b[..]);
            }
            refs
        }
    })
    .join()
    .unwrap();
    // Deliver everything; the old segments are reclaimed.
    for q in &qids {
        deliver(&mut spool, *q);
    }
    spool.reclaim().unwrap();
    let first = locs[0];
    assert!(
        !dir.path()
            .join(spool::segment::segment_file_name(first.segment))
            .exists()
    );
    // A message held before the deletion is still readable; a new read of it is not.
    assert_eq!(held[0].message().unwrap().body, &b[..]);
    assert!(reader.read(first).is_err());
}

#[test]
fn an_abandoned_message_stays_undelivered_after_a_restart_even_if_it_reached_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let qid;
    {
        let (mut spool, _) = Spool::open(small_config(dir.path())).unwrap();
        // The commit "failed" as far as the client knows, but the record is on disk.
        qid = accept(&mut spool, "r@dest.test", b"Subject: x\r\n\r\nhi\r\n");
        spool.abandon(qid);
        assert!(spool.get(qid).is_none());
        spool.close();
    }
    let (spool, _) = Spool::open(small_config(dir.path())).unwrap();
    assert!(
        spool.get(qid).is_none(),
        "the stored copy would be delivered next to the retry"
    );
}
