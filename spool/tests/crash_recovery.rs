//! Crash test with real processes: a child process appends and commits under load (64 appends in
//! flight, outcomes journaled, reclamation running) and is killed with SIGKILL at random moments,
//! 25 times. After each kill, recovery must succeed, every message whose commit the child
//! acknowledged must be present with its body intact, and every acknowledged final outcome must
//! have taken the message out of the queue.
//!
//! The child is this test binary re-executed with `SAIDA_CRASH_CHILD_DIR` set, running
//! `crash_child_entry`.

mod common;

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Rng, body, message, small_config};
use spool::{OutcomeEntry, QueueId, RcptState, Spool};

const KILLS: usize = 25;
const CHILD_ENV: &str = "SAIDA_CRASH_CHILD_DIR";

fn body_len(seed: u64) -> usize {
    // Mostly small, sometimes large enough to cross 1 MiB segment boundaries often.
    match seed % 10 {
        0 => 150_000,
        1..=3 => 20_000,
        _ => 1_000 + (seed % 3000) as usize,
    }
}

/// The child: appends forever, printing `ACK <qid> <crc32c of body>` once a message's commit
/// completed, `DELIVERING <qid>` before journaling its delivered outcome, and `DONE <qid>` once
/// that commit completed.
#[test]
fn crash_child_entry() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (mut spool, _) = Spool::open(small_config(Path::new(&dir))).expect("child recovery");
    let mut rng = Rng(spool::now_micros() | 1);
    let mut seed = rng.next() >> 16;
    let mut inflight = VecDeque::new();
    let mut acked: Vec<QueueId> = Vec::new();
    let mut out = std::io::stdout().lock();
    writeln!(out, "READY").unwrap();
    loop {
        while inflight.len() < 64 {
            seed += 1;
            let qid = spool.next_queue_id(spool::now_micros());
            let b = body(seed, body_len(seed));
            let ticket = spool
                .accept(&message(qid, &["r@x.test", "s@y.test"], &b))
                .expect("append");
            inflight.push_back((ticket, qid, seed, false));
        }
        if !acked.is_empty() && rng.next() % 3 == 0 {
            let qid = acked.swap_remove((rng.next() % acked.len() as u64) as usize);
            let done = [0, 1].map(|i| OutcomeEntry {
                rcpt_index: i,
                state: RcptState::Delivered,
                attempts: 1,
                next_attempt_micros: 0,
                reply: "250 ok",
            });
            // Announced first: if the kill comes before DONE, either state is correct.
            writeln!(out, "DELIVERING {qid}").unwrap();
            let ticket = spool.record_outcomes(qid, 1, &done).expect("outcome");
            inflight.push_back((ticket, qid, 0, true));
        }
        let (ticket, qid, seed, is_outcome) = inflight.pop_front().unwrap();
        ticket.wait().expect("commit");
        if is_outcome {
            writeln!(out, "DONE {qid}").unwrap();
        } else {
            let crc = crc32c::crc32c(&body(seed, body_len(seed)));
            writeln!(out, "ACK {qid} {crc}").unwrap();
            acked.push(qid);
        }
        if seed % 97 == 0 {
            spool.reclaim().expect("reclaim");
        }
    }
}

#[test]
fn acknowledged_records_survive_sigkill() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut rng = Rng(0x5EED_0FC0_FFEE | spool::now_micros());
    let mut acked: HashMap<QueueId, u32> = HashMap::new();
    let mut done: HashSet<QueueId> = HashSet::new();
    let mut delivering: HashSet<QueueId> = HashSet::new();
    let mut torn_tails = 0;
    for round in 0..KILLS {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "crash_child_entry",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut lines = vec![];
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.ends_with("READY") {
                    let _ = ready_tx.send(());
                }
                lines.push(line);
            }
            lines
        });
        // Recovery time is not what is under test: start the clock once the child is appending.
        if ready_rx.recv_timeout(Duration::from_secs(60)).is_err() {
            let _ = child.kill();
            panic!("round {round}: child not ready within 60 s");
        }
        let wait = Duration::from_millis(20 + rng.next() % 300);
        let start = Instant::now();
        while start.elapsed() < wait {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("child exited early in round {round}: {status}");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let lines = reader.join().unwrap();
        for line in lines {
            let mut parts = line.split_whitespace();
            match parts.next() {
                Some("ACK") => {
                    let qid: QueueId = parts.next().unwrap().parse().unwrap();
                    let crc: u32 = parts.next().unwrap().parse().unwrap();
                    acked.insert(qid, crc);
                }
                Some("DELIVERING") => {
                    delivering.insert(parts.next().unwrap().parse().unwrap());
                }
                Some("DONE") => {
                    done.insert(parts.next().unwrap().parse().unwrap());
                }
                _ => {}
            }
        }

        let (spool, report) = Spool::open(small_config(dir.path()))
            .unwrap_or_else(|e| panic!("round {round}: recovery failed: {e}"));
        assert!(
            report.is_clean(),
            "round {round}: damage after a plain crash: {report:?}"
        );
        torn_tails += usize::from(report.torn_tail.is_some());
        for (qid, crc) in &acked {
            if done.contains(qid) {
                assert!(
                    spool.get(*qid).is_none(),
                    "round {round}: delivered {qid} came back"
                );
            } else if delivering.contains(qid) && spool.get(*qid).is_none() {
                // The outcome was committed but the kill came before DONE was printed.
                done.insert(*qid);
            } else {
                let m = spool
                    .message(*qid)
                    .unwrap_or_else(|e| panic!("round {round}: lost {qid}: {e}"));
                assert_eq!(crc32c::crc32c(m.body), *crc, "round {round}: {qid} damaged");
            }
        }
        spool.close();
    }
    eprintln!(
        "{KILLS} kills: {} acknowledged messages, {} acknowledged outcomes, \
         {torn_tails} torn tails repaired",
        acked.len(),
        done.len()
    );
    assert!(
        acked.len() > KILLS * 20,
        "too little load to mean anything: {}",
        acked.len()
    );
}
