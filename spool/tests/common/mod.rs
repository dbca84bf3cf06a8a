//! Helpers shared by the spool's integration tests.
#![allow(
    dead_code,
    reason = "each test binary uses a different part of the helpers"
)]

use std::path::Path;

use spool::{LogConfig, Message, QueueId, Recipient, SpoolConfig};

/// A spool config with 1 MiB segments, so tests roll segments quickly.
pub fn small_config(dir: &Path) -> SpoolConfig {
    SpoolConfig {
        log: LogConfig {
            segment_bytes: 1 << 20,
            ..LogConfig::new(dir)
        },
        ..SpoolConfig::new(dir)
    }
}

/// A message with the given recipients and body.
pub fn message<'a>(queue_id: QueueId, rcpts: &[&'a str], body: &'a [u8]) -> Message<'a> {
    Message {
        queue_id,
        received_at_micros: 1_700_000_000_000_000,
        flags: 0,
        dsn_ret: Default::default(),
        tenant: "t1",
        sender: "sender@origin.test",
        envid: "",
        recipients: rcpts.iter().map(|a| Recipient::new(a)).collect(),
        body,
    }
}

/// A deterministic body of `len` bytes that encodes `seed`, to check integrity after recovery.
/// Cheap even in debug builds: a 64-byte pattern derived from the seed, repeated.
pub fn body(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let pattern: Vec<u8> = (0..64)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b'a' + (x % 26) as u8
        })
        .collect();
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let n = (len - out.len()).min(pattern.len());
        out.extend_from_slice(&pattern[..n]);
    }
    out
}

/// Segment files in a spool directory (the lock file and quarantined files not counted).
pub fn segment_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().ends_with(".seg"))
                .count()
        })
        .unwrap_or(0)
}

/// A small xorshift generator: seeded test runs that replay exactly.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number in `0..n` (`0` when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}
