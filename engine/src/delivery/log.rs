//! The delivery log: one JSON object per line for every delivery attempt of every recipient,
//! per shard, with rotation by size and age and a bound on kept files. The schema is in
//! docs/delivery-log.md; [`AttemptRecord`] is its single definition.
//!
//! The log is for operators and analytics, not for correctness (the spool's outcome records
//! are): lines are buffered and flushed after each batch, never fsynced, and a full disk makes
//! logging fail without stopping delivery (the error is returned; the caller counts it).

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

/// What happened to one recipient in one attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptOutcome {
    Delivered,
    Deferred,
    Failed,
    Expired,
}

/// One line of the delivery log.
#[derive(Clone, Debug, Serialize)]
pub struct AttemptRecord<'a> {
    /// RFC 3339 UTC time of the outcome.
    pub time: String,
    pub queue_id: &'a str,
    /// The message's Message-ID header, if it has one.
    pub message_id: Option<&'a str>,
    pub sender: &'a str,
    /// The message's tenant (`[[tenant]]` name; an AUTH user's name when the user is no
    /// tenant's; `api` for HTTP injection with the admin token; empty for none).
    pub tenant: &'a str,
    pub recipient: &'a str,
    pub domain: &'a str,
    pub mx_host: Option<&'a str>,
    pub mx_ip: Option<String>,
    /// The egress source the connection left from (`[[source]]`), if a pool chose one.
    pub source: Option<&'a str>,
    pub tls_version: Option<&'a str>,
    pub tls_cipher: Option<&'a str>,
    pub outcome: AttemptOutcome,
    /// The SMTP reply (`550 5.1.1 no such user`) or local reason (`connect: refused`).
    pub reply: &'a str,
    pub enhanced_code: Option<&'a str>,
    /// What a failure or deferral means (`delivery::bounce_class`); none for a delivery.
    pub bounce_class: Option<&'a str>,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// From the start of the attempt (connection included) to its outcome.
    pub latency_ms: f64,
}

/// Rotation settings.
#[derive(Clone, Debug)]
pub struct LogRotation {
    pub bytes_max: u64,
    pub age_max: Duration,
    /// Rotated files kept (the oldest are deleted).
    pub files_max: usize,
}

impl Default for LogRotation {
    fn default() -> Self {
        LogRotation {
            bytes_max: 256 << 20,
            age_max: Duration::from_secs(86_400),
            files_max: 14,
        }
    }
}

/// A shard's delivery log file.
pub struct DeliveryLog {
    dir: PathBuf,
    name: String,
    out: BufWriter<File>,
    bytes: u64,
    opened: Instant,
    rotation: LogRotation,
    line: Vec<u8>,
}

impl DeliveryLog {
    /// Opens (appends to) `<dir>/<name>.jsonl`.
    pub fn open(dir: &Path, name: &str, rotation: LogRotation) -> io::Result<DeliveryLog> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("{name}.jsonl"));
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let meta = file.metadata()?;
        // The file's age counts from its creation, not from this process's start, so frequent
        // restarts do not postpone age-based rotation forever.
        let age = meta
            .created()
            .or_else(|_| meta.modified())
            .ok()
            .and_then(|t| t.elapsed().ok());
        let opened = age
            .and_then(|a| Instant::now().checked_sub(a))
            .unwrap_or_else(Instant::now);
        Ok(DeliveryLog {
            dir: dir.to_path_buf(),
            name: name.to_string(),
            out: BufWriter::with_capacity(64 << 10, file),
            bytes: meta.len(),
            opened,
            rotation,
            line: Vec::with_capacity(512),
        })
    }

    /// Appends one record (buffered; see [`DeliveryLog::flush`]).
    pub fn write(&mut self, record: &AttemptRecord<'_>) -> io::Result<()> {
        if self.bytes >= self.rotation.bytes_max || self.opened.elapsed() >= self.rotation.age_max {
            self.rotate()?;
        }
        self.line.clear();
        serde_json::to_writer(&mut self.line, record).map_err(io::Error::other)?;
        self.line.push(b'\n');
        self.out.write_all(&self.line)?;
        self.bytes += self.line.len() as u64;
        Ok(())
    }

    /// Hands buffered lines to the kernel.
    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    /// Renames the current file to `<name>-<unix seconds>-<n>.jsonl`, starts a new one, and
    /// deletes rotated files beyond `files_max`.
    pub fn rotate(&mut self) -> io::Result<()> {
        self.out.flush()?;
        let secs = spool::now_micros() / 1_000_000;
        let current = self.dir.join(format!("{}.jsonl", self.name));
        let mut n = 0;
        let rotated = loop {
            let p = self.dir.join(format!("{}-{secs}-{n}.jsonl", self.name));
            if !p.exists() {
                break p;
            }
            n += 1;
        };
        match std::fs::rename(&current, &rotated) {
            Ok(()) => {}
            // Deleted by an operator: just start a new file.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&current)?;
        self.out = BufWriter::with_capacity(64 << 10, file);
        self.bytes = 0;
        self.opened = Instant::now();
        let prefix = format!("{}-", self.name);
        // Only this log's rotated files: `<name>-<digits>-<digits>.jsonl`, never a sibling log
        // whose name merely starts the same way.
        let digits = |p: Option<&str>| {
            p.is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        };
        let ours = |n: &str| {
            n.strip_prefix(&prefix)
                .and_then(|r| r.strip_suffix(".jsonl"))
                .is_some_and(|r| {
                    let mut parts = r.split('-');
                    digits(parts.next()) && digits(parts.next()) && parts.next().is_none()
                })
        };
        let mut old: Vec<PathBuf> = std::fs::read_dir(&self.dir)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(ours))
            .collect();
        // Names sort by time (fixed-width seconds for the next ~250 years), then by counter.
        old.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
        while old.len() > self.rotation.files_max {
            std::fs::remove_file(old.remove(0))?;
        }
        Ok(())
    }
}

/// RFC 3339 UTC with microseconds, for the `time` field.
pub fn rfc3339(micros: u64) -> String {
    let c = smtp_proto::headers::civil(micros / 1_000_000);
    format!(
        "{}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        c.year,
        c.month,
        c.day,
        c.hour,
        c.minute,
        c.second,
        micros % 1_000_000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(reply: &str) -> AttemptRecord<'_> {
        AttemptRecord {
            time: rfc3339(1_795_840_200_123_456),
            queue_id: "Q1",
            message_id: Some("<m1@origin.test>"),
            sender: "s@origin.test",
            recipient: "u@dest.test",
            domain: "dest.test",
            tenant: "acme",
            mx_host: Some("mx.dest.test"),
            mx_ip: Some("127.0.0.2".into()),
            source: None,
            tls_version: Some("TLSv1_3"),
            tls_cipher: Some("TLS13_AES_128_GCM_SHA256"),
            outcome: AttemptOutcome::Deferred,
            reply,
            enhanced_code: Some("4.7.1"),
            bounce_class: Some("rate_limited"),
            attempt: 2,
            latency_ms: 12.5,
        }
    }

    #[test]
    fn each_attempt_is_one_json_line() {
        let dir = tempfile::tempdir().unwrap();
        let mut log =
            DeliveryLog::open(dir.path(), "delivery-shard0", LogRotation::default()).unwrap();
        log.write(&record("451 4.7.1 greylisted\r\ntry \"later\""))
            .unwrap();
        log.write(&record("250 ok")).unwrap();
        log.flush().unwrap();
        let text = std::fs::read_to_string(dir.path().join("delivery-shard0.jsonl")).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(v["time"], "2026-11-28T04:30:00.123456Z");
        assert_eq!(v["outcome"], "deferred");
        assert_eq!(v["reply"], "451 4.7.1 greylisted\r\ntry \"later\"");
        assert_eq!(v["attempt"], 2);
    }

    #[test]
    fn rotation_by_size_keeps_a_bounded_number_of_files() {
        let dir = tempfile::tempdir().unwrap();
        let rotation = LogRotation {
            bytes_max: 1000,
            age_max: Duration::from_secs(3600),
            files_max: 3,
        };
        let mut log = DeliveryLog::open(dir.path(), "d", rotation).unwrap();
        for _ in 0..200 {
            log.write(&record("250 ok")).unwrap();
        }
        log.flush().unwrap();
        let files = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(files, 4, "the current file and 3 rotated ones");
        let current = std::fs::metadata(dir.path().join("d.jsonl")).unwrap().len();
        assert!(current <= 1000 + 600, "{current}");
    }

    #[test]
    fn rotation_never_deletes_a_sibling_log() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("d-shard1.jsonl"), "keep me\n").unwrap();
        let rotation = LogRotation {
            bytes_max: 300,
            age_max: Duration::from_secs(3600),
            files_max: 1,
        };
        let mut log = DeliveryLog::open(dir.path(), "d", rotation).unwrap();
        for _ in 0..20 {
            log.write(&record("250 ok")).unwrap();
        }
        assert!(dir.path().join("d-shard1.jsonl").exists());
    }
}
