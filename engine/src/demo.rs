//! The spool demo behind `saida demo`: append, commit, `kill -9`, recover, check, repeat.
//!
//! The parent re-executes this binary as a writer (`saida demo --writer DIR`), which appends
//! messages with 64 appends in flight and prints `ACK <queue id> <crc32c>` once each commit
//! completed. The parent kills it with SIGKILL after a random delay, recovers the spool itself
//! and checks that every acknowledged message is there with the same body checksum.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use spool::{Message, QueueId, Recipient, Spool, SpoolConfig, now_micros};

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Spool directory (created if missing; emptied first unless --keep).
    #[arg(long, default_value = "var/demo-spool")]
    dir: PathBuf,
    /// How many times the writer is killed.
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// Longest time the writer runs before it is killed, in milliseconds.
    #[arg(long, default_value_t = 1500)]
    max_run_ms: u64,
    /// Message body size in bytes.
    #[arg(long, default_value_t = 2048)]
    size: usize,
    /// Keep what the directory already holds.
    #[arg(long)]
    keep: bool,
    /// Internal: run as the writer process on this directory.
    #[arg(long, hide = true)]
    writer: bool,
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    if args.writer {
        return writer(&args.dir, args.size);
    }
    if !args.keep && args.dir.exists() {
        std::fs::remove_dir_all(&args.dir)
            .with_context(|| format!("emptying {}", args.dir.display()))?;
    }
    println!(
        "saida spool demo: {} rounds of append -> commit -> kill -9 -> recover",
        args.rounds
    );
    println!("spool directory: {}", args.dir.display());
    let exe = std::env::current_exe().context("locating the saida binary")?;
    let mut acked: HashMap<QueueId, u32> = HashMap::new();
    let mut rng = now_micros() | 1;
    for round in 1..=args.rounds {
        let mut child = Command::new(&exe)
            .args([
                "demo",
                "--writer",
                "--size",
                &args.size.to_string(),
                "--dir",
            ])
            .arg(&args.dir)
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the writer")?;
        let stdout = child.stdout.take().context("writer stdout")?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line == "READY" {
                    let _ = ready_tx.send(());
                }
                lines.push(line);
            }
            lines
        });
        if ready_rx.recv_timeout(Duration::from_secs(60)).is_err() {
            let _ = child.kill();
            bail!("the writer did not start within 60 s");
        }
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let run_for = Duration::from_millis(100 + rng % args.max_run_ms.max(1));
        std::thread::sleep(run_for);
        child.kill().context("SIGKILL")?;
        child.wait()?;
        let mut this_round = 0;
        for line in reader
            .join()
            .map_err(|_| anyhow::anyhow!("reader thread panicked"))?
        {
            let mut parts = line.split_whitespace();
            if parts.next() == Some("ACK") {
                let qid = parts
                    .next()
                    .context("ACK line")?
                    .parse()
                    .context("queue id")?;
                let crc = parts.next().context("ACK line")?.parse().context("crc")?;
                acked.insert(qid, crc);
                this_round += 1;
            }
        }

        let started = Instant::now();
        let (spool, report) = Spool::open(SpoolConfig::new(&args.dir)).context("recovery")?;
        let recovery = started.elapsed();
        let mut lost = 0;
        for (qid, crc) in &acked {
            match spool.message(*qid) {
                Ok(m) if crc32c::crc32c(m.body) == *crc => {}
                _ => lost += 1,
            }
        }
        println!(
            "round {round}: writer killed after {:>4} ms with {this_round:>6} new acks; \
             recovered {:>7} records in {:>6.1} ms; torn tail: {}; acknowledged {:>7}, \
             present {:>7}, lost {lost}",
            run_for.as_millis(),
            report.records,
            recovery.as_secs_f64() * 1e3,
            if report.torn_tail.is_some() {
                "repaired"
            } else {
                "none"
            },
            acked.len(),
            spool.len(),
        );
        spool.close();
        if lost > 0 || !report.is_clean() {
            bail!("{lost} acknowledged messages lost; report: {report:?}");
        }
    }
    println!("every acknowledged message survived every kill");
    Ok(())
}

/// The writer process: appends until killed.
fn writer(dir: &Path, size: usize) -> anyhow::Result<()> {
    let (mut spool, _) = Spool::open(SpoolConfig::new(dir)).context("writer recovery")?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "READY")?;
    let mut inflight = VecDeque::new();
    let mut n: u64 = 0;
    loop {
        while inflight.len() < 64 {
            n += 1;
            let mut body = format!("Subject: demo {n}\r\n\r\n").into_bytes();
            body.resize(size.max(body.len()), b'x');
            let qid = spool.next_queue_id(now_micros());
            let message = Message {
                queue_id: qid,
                received_at_micros: now_micros(),
                flags: 0,
                dsn_ret: Default::default(),
                tenant: "",
                sender: "demo@saida.test",
                envid: "",
                recipients: vec![Recipient::new("sink@example.test")],
                body: &body,
            };
            let ticket = spool.accept(&message)?;
            inflight.push_back((ticket, qid, crc32c::crc32c(&body)));
        }
        let (ticket, qid, crc) = inflight.pop_front().context("in flight")?;
        ticket.wait()?;
        writeln!(out, "ACK {qid} {crc}")?;
    }
}
