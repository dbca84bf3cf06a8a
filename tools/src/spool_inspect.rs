//! `saida-spool`: inspect a spool directory without changing it.
//!
//! `saida-spool inspect DIR` scans every segment read-only (the same scan recovery uses, but
//! nothing is repaired or deleted) and prints one line per segment: records by kind, bytes used,
//! damage, and an unreadable tail if any. `--records` lists every record. Exits 1 when damage is
//! found, 2 on an error, so scripts can check a spool before starting saida on it.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use spool::Record;
use spool::scan::scan_segment;
use spool::segment::{SegmentHeader, parse_segment_file_name};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "saida-spool",
    version,
    about = "Inspect a saida spool directory (read-only)"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Scan every segment and summarise it; exit 1 if damage is found.
    Inspect {
        /// The shard's spool directory.
        dir: PathBuf,
        /// Print every record, not only per-segment totals.
        #[arg(long)]
        records: bool,
    },
}

fn main() -> ExitCode {
    let Cmd::Inspect { dir, records } = Cli::parse().command;
    match inspect(&dir, records) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("saida-spool: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Returns whether the spool is free of damage.
fn inspect(dir: &Path, list_records: bool) -> anyhow::Result<bool> {
    let mut segments: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name();
            parse_segment_file_name(name.to_str()?).map(|id| (id, e.path()))
        })
        .collect();
    segments.sort();
    let mut clean = true;
    let mut totals = [0u64; 4];
    println!(
        "{:>16}  {:>8} {:>8} {:>8} {:>12}  notes",
        "segment", "messages", "outcomes", "rehomed", "bytes used"
    );
    for (id, path) in segments {
        // A plain read, not a map: this tool must be safe to run beside a live saida.
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let mut notes = Vec::new();
        match SegmentHeader::decode(&bytes) {
            Ok(h) if h.segment_id == id => {}
            Ok(h) => notes.push(format!("header names segment {}", h.segment_id)),
            Err(e) => {
                notes.push(format!("header: {e}"));
                clean = false;
            }
        }
        let mut kinds = [0u64; 3];
        let scan = scan_segment(&bytes, id, |offset, len, rec| {
            let i = match &rec {
                Record::Message(_) => 0,
                Record::Outcomes(_) => 1,
                Record::Rehomed(_) => 2,
            };
            kinds[i] += 1;
            if list_records {
                describe(id, offset, len, &rec);
            }
        });
        let scan = match scan {
            Ok(s) => s,
            Err((offset, e)) => {
                println!("{id:016x}  unreadable record at {offset}: {e}");
                clean = false;
                continue;
            }
        };
        for (offset, len, e) in &scan.damage {
            notes.push(format!("damage at {offset} ({len} bytes): {e}"));
            clean = false;
        }
        if let Some((end, e)) = &scan.garbage_after_end {
            let why = e
                .as_ref()
                .map_or("unsynced data after end".to_string(), |e| e.to_string());
            notes.push(format!("unreadable tail {}..{end}: {why}", scan.end));
        }
        println!(
            "{id:016x}  {:>8} {:>8} {:>8} {:>12}  {}",
            kinds[0],
            kinds[1],
            kinds[2],
            scan.end,
            notes.join("; ")
        );
        for (t, k) in totals.iter_mut().zip(kinds) {
            *t += k;
        }
        totals[3] += scan.end;
    }
    println!(
        "{:>16}  {:>8} {:>8} {:>8} {:>12}",
        "total", totals[0], totals[1], totals[2], totals[3]
    );
    Ok(clean)
}

fn describe(segment: u64, offset: u64, len: u32, rec: &Record<'_>) {
    match rec {
        Record::Message(m) | Record::Rehomed(m) => println!(
            "  {segment:016x}+{offset} {len}B {} {} from=<{}> rcpts={} body={}B",
            if matches!(rec, Record::Message(_)) {
                "message"
            } else {
                "rehomed"
            },
            m.queue_id,
            m.sender,
            m.recipients.len(),
            m.body.len()
        ),
        Record::Outcomes(o) => {
            let states: Vec<String> = o
                .entries
                .iter()
                .map(|e| format!("#{}={:?}", e.rcpt_index, e.state))
                .collect();
            println!(
                "  {segment:016x}+{offset} {len}B outcomes {} {}",
                o.queue_id,
                states.join(",")
            )
        }
    }
}
