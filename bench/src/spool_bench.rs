//! `spool-bench`: durable appends per second through saida's spool, beside the raw ceiling.
//!
//! For each record size and number of concurrent appenders, the spool run appends messages
//! through `Spool::accept` (index included) with `every-commit` durability, keeping that many
//! appends in flight on one thread, as an engine shard does with that many SMTP sessions. The
//! ceiling run then writes the same bytes, in the batch size the spool's group commit actually
//! formed, with plain `pwrite` + `fdatasync` into the same kind of preallocated segment files.
//! Each cell alternates spool and ceiling runs (`--rounds`, default 3) and reports medians and
//! the ratio of medians. Both append methods (`pwrite`, `mmap-msync`) are measured so the
//! default is chosen by numbers.
//!
//! Usage: `cargo run --release -p saida-bench --bin spool-bench -- [--seconds 3] [--json]`.
//! Results and the machine they were measured on are recorded in docs/benchmarks.md.

#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use hdrhistogram::Histogram;
use spool::{
    AppendMethod, LogConfig, Message, Recipient, Spool, SpoolConfig, SyncPolicy, now_micros,
};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(about = "Durable spool appends per second, beside raw pwrite + fdatasync")]
struct Args {
    /// Directory for the benchmark's files (emptied before and after each run).
    #[arg(long, default_value = "var/bench-spool")]
    dir: PathBuf,
    /// Record sizes in bytes (whole frames on disk).
    #[arg(long, value_delimiter = ',', default_values_t = [2048usize, 102400])]
    sizes: Vec<usize>,
    /// Concurrent appenders (appends in flight).
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 16, 256])]
    appenders: Vec<usize>,
    /// Append methods to measure: pwrite, mmap.
    #[arg(long, value_delimiter = ',', default_values = ["pwrite", "mmap"])]
    methods: Vec<String>,
    /// Seconds per run.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Alternating spool/ceiling run pairs per cell; medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Print one JSON object per line instead of the table.
    #[arg(long)]
    json: bool,
}

struct SpoolRun {
    appends: u64,
    bytes: u64,
    elapsed: Duration,
    commits: u64,
    latency: Histogram<u64>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let run_for = Duration::from_secs_f64(args.seconds);
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    if !args.json {
        println!("{}", machine_description(&args.dir));
        println!(
            "{:>7} {:>5} {:>6} | {:>10} {:>8} {:>7} {:>8} {:>8} | {:>10} {:>8} | {:>5}",
            "size",
            "appnd",
            "method",
            "appends/s",
            "MB/s",
            "batch",
            "p50 µs",
            "p99 µs",
            "raw app/s",
            "raw MB/s",
            "ratio"
        );
    }
    for &size in &args.sizes {
        for &appenders in &args.appenders {
            for method in &args.methods {
                let append_method = match method.as_str() {
                    "pwrite" => AppendMethod::Pwrite,
                    "mmap" => AppendMethod::MmapMsync,
                    other => anyhow::bail!("unknown method {other:?} (pwrite, mmap)"),
                };
                // The VM is noisy (±30 % run to run): alternate spool and ceiling runs and
                // compare medians, so that both see the same background.
                let mut rates = Vec::new();
                let mut raw_rates = Vec::new();
                let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
                let (mut frame, mut batch) = (0, 1);
                for _ in 0..args.rounds {
                    let spool = run_spool(&args.dir, size, appenders, append_method, run_for)?;
                    frame = (spool.bytes / spool.appends.max(1)) as usize;
                    batch = (spool.appends as f64 / spool.commits.max(1) as f64)
                        .round()
                        .max(1.0) as usize;
                    rates.push(spool.appends as f64 / spool.elapsed.as_secs_f64());
                    latency.add(&spool.latency)?;
                    let (raw_appends, raw_elapsed) = run_raw(&args.dir, frame, batch, run_for)?;
                    raw_rates.push(raw_appends as f64 / raw_elapsed.as_secs_f64());
                }
                let rate = median(&mut rates);
                let raw_rate = median(&mut raw_rates);
                let mbps = rate * frame as f64 / 1e6;
                let raw_mbps = raw_rate * frame as f64 / 1e6;
                let p50 = latency.value_at_quantile(0.50);
                let p99 = latency.value_at_quantile(0.99);
                if args.json {
                    let ratio = rate / raw_rate;
                    println!(
                        "{{\"bench\":\"spool\",\"size\":{size},\"frame\":{frame},\
                         \"appenders\":{appenders},\"method\":\"{method}\",\
                         \"appends_per_s\":{rate:.0},\"mb_per_s\":{mbps:.1},\"batch\":{batch},\
                         \"p50_us\":{p50},\"p99_us\":{p99},\"raw_appends_per_s\":{raw_rate:.0},\
                         \"raw_mb_per_s\":{raw_mbps:.1},\"ratio\":{ratio:.3}}}"
                    );
                } else {
                    println!(
                        "{size:>7} {appenders:>5} {method:>6} | {rate:>10.0} {mbps:>8.1} \
                         {batch:>7} {p50:>8} {p99:>8} | {raw_rate:>10.0} {raw_mbps:>8.1} | {:>5.2}",
                        rate / raw_rate
                    );
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&args.dir);
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Appends through the spool with `appenders` appends in flight for `run_for`.
fn run_spool(
    dir: &Path,
    size: usize,
    appenders: usize,
    method: AppendMethod,
    run_for: Duration,
) -> anyhow::Result<SpoolRun> {
    let dir = dir.join("spool");
    let _ = std::fs::remove_dir_all(&dir);
    let config = SpoolConfig {
        log: LogConfig {
            sync: SyncPolicy::EveryCommit,
            append_method: method,
            ..LogConfig::new(&dir)
        },
        ..SpoolConfig::new(&dir)
    };
    let (mut spool, _) = Spool::open(config)?;
    // The body is sized so that the whole frame is `size` bytes.
    let mut body = vec![b'x'; size];
    let probe = message(&mut spool, &body);
    let overhead = spool::Record::Message(probe).frame_len() - size;
    body.truncate(size.saturating_sub(overhead));
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut inflight = VecDeque::with_capacity(appenders);
    let (mut appends, mut bytes) = (0u64, 0u64);
    let before = spool.log_stats();
    let start = Instant::now();
    while start.elapsed() < run_for {
        while inflight.len() < appenders {
            let m = message(&mut spool, &body);
            let ticket = spool.accept(&m)?;
            bytes += u64::from(ticket.location().len);
            inflight.push_back((ticket, Instant::now()));
        }
        let (ticket, t0) = inflight.pop_front().context("in flight")?;
        ticket.wait()?;
        latency.saturating_record(t0.elapsed().as_micros() as u64);
        appends += 1;
    }
    for (ticket, t0) in inflight.drain(..) {
        ticket.wait()?;
        latency.saturating_record(t0.elapsed().as_micros() as u64);
        appends += 1;
    }
    let elapsed = start.elapsed();
    let commits = spool.log_stats().commits - before.commits;
    spool.close();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(SpoolRun {
        appends,
        bytes,
        elapsed,
        commits,
        latency,
    })
}

fn message<'a>(spool: &mut Spool, body: &'a [u8]) -> Message<'a> {
    let now = now_micros();
    Message {
        queue_id: spool.next_queue_id(now),
        received_at_micros: now,
        flags: 0,
        dsn_ret: Default::default(),
        tenant: "bench",
        sender: "bench@saida.test",
        envid: "",
        recipients: vec![Recipient::new("rcpt@example.test")],
        body,
    }
}

/// The ceiling: `batch` frames of `frame` bytes per `pwrite`, one `fdatasync` each, into 64 MiB
/// preallocated segment files created as the spool creates them. Returns (records, elapsed).
fn run_raw(
    dir: &Path,
    frame: usize,
    batch: usize,
    run_for: Duration,
) -> anyhow::Result<(u64, Duration)> {
    const SEGMENT: u64 = 64 << 20;
    let dir = dir.join("raw");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let buf = vec![b'r'; frame * batch];
    let mut records = 0u64;
    let mut seg_no = 0u64;
    let mut file = None;
    let mut offset = SEGMENT;
    let start = Instant::now();
    while start.elapsed() < run_for {
        if offset + buf.len() as u64 > SEGMENT {
            seg_no += 1;
            let path = dir.join(format!("{seg_no}.raw"));
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)?;
            rustix::fs::fallocate(
                &f,
                rustix::fs::FallocateFlags::empty(),
                0,
                SEGMENT.max(buf.len() as u64 + 64),
            )?;
            f.write_all_at(&[1u8; 64], 0)?;
            f.sync_all()?;
            std::fs::File::open(&dir)?.sync_all()?;
            file = Some(f);
            offset = 64;
        }
        let f = file.as_ref().context("segment")?;
        f.write_all_at(&buf, offset)?;
        f.sync_data()?;
        offset += buf.len() as u64;
        records += batch as u64;
    }
    let elapsed = start.elapsed();
    let _ = std::fs::remove_dir_all(&dir);
    Ok((records, elapsed))
}

/// CPU model, core count, kernel and filesystem of `dir`, for the record.
fn machine_description(dir: &Path) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let abs = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let fs = std::fs::read_to_string("/proc/mounts")
        .ok()
        .and_then(|m| {
            m.lines()
                .filter_map(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    (f.len() > 3 && abs.starts_with(f[1]))
                        .then(|| (f[1].len(), format!("{} on {} ({})", f[2], f[1], f[0])))
                })
                .max()
                .map(|(_, s)| s)
        })
        .unwrap_or_else(|| "unknown filesystem".into());
    format!(
        "machine: {cpu}, {cores} cores, kernel {}, {fs}",
        kernel.trim()
    )
}
