//! The suppression list: addresses and domains that must never be mailed, for everyone
//! (global) or for one tenant. Fed by hard bounces (a permanent `bad_mailbox` or `bad_domain`
//! failure) and by the admin API; checked at RCPT, at HTTP injection and again before each
//! delivery attempt.
//!
//! In memory the list is a set of 64-bit keyed hashes of (scope, entry), so a lookup is one
//! SipHash of the address and one probe (no allocation), and 10 million entries take about
//! 150 MiB; the entries themselves live only in the journal, `<spool.dir>/suppressions.jsonl`,
//! one JSON line per change (`{"op":"add","scope":"acme","entry":"a@b.test",...}`), appended and
//! synced by a writer thread in batches before an API call answers (auto-feed from bounces does
//! not wait). At start the journal is replayed and, when it holds removed or repeated entries,
//! rewritten with the live ones. Two different entries share a hash with a probability of about
//! n / 2^64 per lookup (5 x 10^-13 at 10 million entries).
//!
//! Not here: the replies (`550 5.1.1` at RCPT is the session's), classifying bounces.

use std::collections::HashSet;
use std::hash::{BuildHasher, Hasher};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};

use serde::{Deserialize, Serialize};

/// Most entries (global and every tenant's together).
pub const ENTRIES_MAX: usize = 50_000_000;
/// Longest entry (an address is at most 254 octets; RFC 5321 §4.5.3.1.3).
pub const ENTRY_BYTES_MAX: usize = 320;
/// Entries listed in one answer at most.
pub const LIST_MAX: usize = 10_000;

/// One change in the journal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// `add` or `remove`.
    pub op: String,
    /// A tenant's name, or empty for everyone.
    pub scope: String,
    /// `user@domain`, or `@domain` for a whole domain (lowercase).
    pub entry: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(default)]
    pub at: u64,
}

/// Why an entry was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    #[error("`{0}` is not an address or @domain")]
    Malformed(String),
    #[error("the suppression list holds {ENTRIES_MAX} entries already")]
    Full,
}

/// Identity hashing: the set's keys are already SipHash values.
#[derive(Clone, Copy, Default)]
struct PreHashed;

impl BuildHasher for PreHashed {
    type Hasher = PreHashedHasher;
    fn build_hasher(&self) -> PreHashedHasher {
        PreHashedHasher(0)
    }
}

#[derive(Default)]
struct PreHashedHasher(u64);

impl Hasher for PreHashedHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// The list, shared by every shard and the admin endpoint.
pub struct Suppressions {
    keys: std::hash::RandomState,
    set: RwLock<HashSet<u64, PreHashed>>,
    /// `@domain` entries ever added: while none, lookups probe for the address only.
    domains: std::sync::atomic::AtomicUsize,
    journal: Option<Journal>,
}

/// The journal's writer: lines go to a thread that appends and syncs them in batches.
struct Journal {
    path: PathBuf,
    tx: Mutex<std::sync::mpsc::Sender<(String, Option<std::sync::mpsc::SyncSender<bool>>)>>,
}

/// Lowercases an entry and checks its form: `local@domain` or `@domain`.
pub fn normalize(entry: &str) -> Result<String, EntryError> {
    let e = entry.trim().trim_end_matches('.').to_ascii_lowercase();
    let valid = e.len() <= ENTRY_BYTES_MAX
        && e.rsplit_once('@')
            .is_some_and(|(_, d)| !d.is_empty() && !d.contains('@'))
        && !e.bytes().any(|b| b.is_ascii_control() || b == b' ');
    if valid {
        Ok(e)
    } else {
        Err(EntryError::Malformed(entry.to_string()))
    }
}

impl Suppressions {
    /// An empty list kept in memory only (tests).
    #[cfg(test)]
    pub fn in_memory() -> Suppressions {
        Suppressions {
            keys: Default::default(),
            set: RwLock::new(HashSet::with_hasher(PreHashed)),
            domains: Default::default(),
            journal: None,
        }
    }

    /// Replays `<dir>/suppressions.jsonl` (compacting it when it holds dead lines) and starts
    /// its writer thread.
    pub fn open(dir: &Path) -> std::io::Result<Suppressions> {
        let path = dir.join("suppressions.jsonl");
        let keys = std::hash::RandomState::new();
        let mut set = HashSet::with_hasher(PreHashed);
        let mut lines = 0usize;
        let mut domains = 0usize;
        match std::fs::File::open(&path) {
            Ok(f) => {
                for line in std::io::BufReader::new(f).lines() {
                    let line = line?;
                    lines += 1;
                    let Ok(c) = serde_json::from_str::<Change>(&line) else {
                        // A torn last line after a crash: ignored (its change was never
                        // acknowledged).
                        continue;
                    };
                    let k = key(&keys, &c.scope, &c.entry);
                    domains += usize::from(c.entry.starts_with('@'));
                    if c.op == "remove" {
                        set.remove(&k);
                    } else {
                        set.insert(k);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        if lines > set.len() {
            compact(&path, &keys, &set)?;
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        std::thread::Builder::new()
            .name("suppressions".into())
            .spawn(move || write_loop(file, rx))?;
        Ok(Suppressions {
            keys,
            set: RwLock::new(set),
            domains: domains.into(),
            journal: Some(Journal {
                path,
                tx: Mutex::new(tx),
            }),
        })
    }

    pub fn len(&self) -> usize {
        self.set.read().map_or(0, |s| s.len())
    }

    /// Whether `address` (or its domain) is suppressed for everyone or for `tenant`.
    pub fn suppressed(&self, tenant: &str, address: &str) -> bool {
        let set = match self.set.read() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        if set.is_empty() {
            return false;
        }
        let address = address.trim_end_matches('.');
        let domain = address.rsplit_once('@').map_or("", |(_, d)| d);
        let with_domains = self.domains.load(std::sync::atomic::Ordering::Relaxed) > 0;
        let mut found = false;
        for scope in ["", tenant] {
            found |= set.contains(&key_ci(&self.keys, scope, address))
                || (with_domains && set.contains(&key_domain(&self.keys, scope, domain)));
            if tenant.is_empty() || found {
                break;
            }
        }
        found
    }

    /// Adds entries (normalized); returns how many were new. With `wait`, returns once they
    /// are synced to the journal.
    pub fn add(
        &self,
        scope: &str,
        entries: &[String],
        reason: &str,
        wait: bool,
    ) -> Result<usize, EntryError> {
        self.change("add", scope, entries, reason, wait)
    }

    /// Removes entries; returns how many were there.
    pub fn remove(&self, scope: &str, entries: &[String], wait: bool) -> Result<usize, EntryError> {
        self.change("remove", scope, entries, "", wait)
    }

    fn change(
        &self,
        op: &str,
        scope: &str,
        entries: &[String],
        reason: &str,
        wait: bool,
    ) -> Result<usize, EntryError> {
        let normalized = entries
            .iter()
            .map(|e| normalize(e))
            .collect::<Result<Vec<_>, _>>()?;
        let at = spool::now_micros() / 1_000_000;
        let mut lines = String::new();
        let mut changed = 0;
        {
            let mut set = match self.set.write() {
                Ok(s) => s,
                Err(p) => p.into_inner(),
            };
            if op == "add" && set.len() + normalized.len() > ENTRIES_MAX {
                return Err(EntryError::Full);
            }
            for entry in normalized {
                let k = key(&self.keys, scope, &entry);
                if op == "add" && entry.starts_with('@') {
                    self.domains
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                let did = if op == "add" {
                    set.insert(k)
                } else {
                    set.remove(&k)
                };
                if did {
                    changed += 1;
                    let c = Change {
                        op: op.into(),
                        scope: scope.into(),
                        entry,
                        reason: reason.into(),
                        at,
                    };
                    lines.push_str(&serde_json::to_string(&c).unwrap_or_default());
                    lines.push('\n');
                }
            }
        }
        if let (Some(j), false) = (&self.journal, lines.is_empty()) {
            let (done_tx, done_rx) = std::sync::mpsc::sync_channel(1);
            let sent =
                j.tx.lock()
                    .map(|tx| tx.send((lines, wait.then_some(done_tx))).is_ok())
                    .unwrap_or(false);
            if wait && (!sent || !done_rx.recv().unwrap_or(false)) {
                let path = j.path.display().to_string();
                tracing::error!(%path, "suppression list change not synced");
            }
        }
        Ok(changed)
    }

    /// Live entries of `scope` (all scopes when `None`) from the journal, skipping `offset`,
    /// at most `limit` (≤ [`LIST_MAX`]).
    pub fn list(&self, scope: Option<&str>, offset: usize, limit: usize) -> Vec<Change> {
        let Some(j) = &self.journal else {
            return Vec::new();
        };
        let Ok(f) = std::fs::File::open(&j.path) else {
            return Vec::new();
        };
        let set = match self.set.read() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        let mut skipped = 0;
        for line in std::io::BufReader::new(f).lines().map_while(Result::ok) {
            let Ok(c) = serde_json::from_str::<Change>(&line) else {
                continue;
            };
            if c.op != "add" || scope.is_some_and(|s| s != c.scope) {
                continue;
            }
            let k = key(&self.keys, &c.scope, &c.entry);
            if !set.contains(&k) || !seen.insert(k) {
                continue;
            }
            if skipped < offset {
                skipped += 1;
                continue;
            }
            out.push(c);
            if out.len() >= limit.min(LIST_MAX) {
                break;
            }
        }
        out
    }
}

/// `saida deliverability-bench`: fills an in-memory list with `entries` addresses (half global,
/// half of one tenant) and one `@domain`, then times lookups (for the tenant: up to four
/// probes) of present and absent addresses one by one; returns the build time, resident
/// memory added and the lookup latency percentiles as JSON.
pub fn bench(entries: usize, lookups: usize) -> serde_json::Value {
    let rss = || {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                let line = s.lines().find(|l| l.starts_with("VmRSS:"))?.to_string();
                line.split_whitespace().nth(1)?.parse::<f64>().ok()
            })
            .unwrap_or(0.0)
            / 1024.0
    };
    let before = rss();
    let list = Suppressions {
        keys: Default::default(),
        set: RwLock::new(HashSet::with_hasher(PreHashed)),
        domains: Default::default(),
        journal: None,
    };
    let started = std::time::Instant::now();
    let chunk = 100_000;
    for base in (0..entries).step_by(chunk) {
        let batch: Vec<String> = (base..(base + chunk).min(entries))
            .map(|i| format!("user{i}@d{}.example", i % 10_000))
            .collect();
        let scope = if base % (2 * chunk) == 0 { "" } else { "acme" };
        let _ = list.add(scope, &batch, "", false);
    }
    // One domain entry, so that every lookup also probes for the domain (the worst case).
    let _ = list.add("", &["@blocked.example".to_string()], "", false);
    let build_secs = started.elapsed().as_secs_f64();
    let memory_mb = rss() - before;
    let mut hist = match hdrhistogram::Histogram::<u64>::new_with_bounds(1, 10_000_000, 3) {
        Ok(h) => h,
        Err(_) => return serde_json::json!({ "error": "histogram" }),
    };
    let mut found = 0usize;
    for i in 0..lookups {
        // Every other lookup is of an address that is not on the list.
        let n = (i * 7919) % entries.max(1);
        let address = if i % 2 == 0 {
            format!("user{n}@d{}.example", n % 10_000)
        } else {
            format!("absent{n}@d{}.example", n % 10_000)
        };
        let t = std::time::Instant::now();
        found += usize::from(list.suppressed("acme", &address));
        let _ = hist.record(t.elapsed().as_nanos().max(1) as u64);
    }
    serde_json::json!({
        "bench": "suppression", "entries": list.len(), "lookups": lookups, "found": found,
        "build_secs": (build_secs * 100.0).round() / 100.0,
        "memory_mb": memory_mb.round(),
        "lookup_ns": {"p50": hist.value_at_quantile(0.5), "p99": hist.value_at_quantile(0.99),
            "p999": hist.value_at_quantile(0.999), "max": hist.max()},
    })
}

fn key(keys: &std::hash::RandomState, scope: &str, entry: &str) -> u64 {
    let mut h = keys.build_hasher();
    h.write(scope.as_bytes());
    h.write_u8(0);
    h.write(entry.as_bytes());
    h.finish()
}

/// [`key`] of an address given in any case (lowercased on the way, without allocating).
fn key_ci(keys: &std::hash::RandomState, scope: &str, address: &str) -> u64 {
    let mut h = keys.build_hasher();
    h.write(scope.as_bytes());
    h.write_u8(0);
    for b in address.bytes() {
        h.write_u8(b.to_ascii_lowercase());
    }
    h.finish()
}

/// [`key`] of `@domain`.
fn key_domain(keys: &std::hash::RandomState, scope: &str, domain: &str) -> u64 {
    let mut h = keys.build_hasher();
    h.write(scope.as_bytes());
    h.write_u8(0);
    h.write_u8(b'@');
    for b in domain.bytes() {
        h.write_u8(b.to_ascii_lowercase());
    }
    h.finish()
}

/// Rewrites the journal with its live entries (each once), atomically.
fn compact(
    path: &Path,
    keys: &std::hash::RandomState,
    live: &HashSet<u64, PreHashed>,
) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
    let mut written = HashSet::with_hasher(PreHashed);
    for line in std::io::BufReader::new(std::fs::File::open(path)?).lines() {
        let line = line?;
        let Ok(c) = serde_json::from_str::<Change>(&line) else {
            continue;
        };
        let k = key(keys, &c.scope, &c.entry);
        if c.op == "add" && live.contains(&k) && written.insert(k) {
            out.write_all(line.as_bytes())?;
            out.write_all(b"\n")?;
        }
    }
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Appends what arrives, then syncs once for everything that arrived meanwhile, then answers
/// those that wait.
type Batch = (String, Option<std::sync::mpsc::SyncSender<bool>>);

fn write_loop(mut file: std::fs::File, rx: std::sync::mpsc::Receiver<Batch>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        batch.extend(rx.try_iter());
        let mut ok = true;
        for (lines, _) in &batch {
            ok &= file.write_all(lines.as_bytes()).is_ok();
        }
        ok &= file.sync_data().is_ok();
        if !ok {
            tracing::error!("suppression journal write failed");
        }
        for (_, done) in batch {
            if let Some(d) = done {
                let _ = d.send(ok);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_domains_are_suppressed_per_scope_in_any_case() {
        let s = Suppressions::in_memory();
        let add = |scope: &str, e: &str| s.add(scope, &[e.to_string()], "test", false).unwrap();
        assert_eq!(add("", "Gone@Example.test"), 1);
        assert_eq!(add("", "gone@example.test"), 0, "already there");
        assert_eq!(add("acme", "@blocked.test"), 1);
        assert!(s.suppressed("", "GONE@example.TEST"));
        assert!(
            s.suppressed("globex", "gone@example.test"),
            "global applies to everyone"
        );
        assert!(s.suppressed("acme", "anyone@Blocked.test"));
        assert!(
            !s.suppressed("globex", "anyone@blocked.test"),
            "acme's entry is acme's"
        );
        assert!(!s.suppressed("", "other@example.test"));
        assert_eq!(s.remove("", &["gone@example.test".into()], false), Ok(1));
        assert!(!s.suppressed("", "gone@example.test"));
        assert!(s.add("", &["not an address".into()], "", false).is_err());
    }

    #[test]
    fn the_journal_survives_a_restart_and_is_compacted() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Suppressions::open(dir.path()).unwrap();
            let e: Vec<String> = (0..100).map(|i| format!("u{i}@x.test")).collect();
            assert_eq!(s.add("acme", &e, "bulk", true), Ok(100));
            assert_eq!(s.remove("acme", &e[..50], true), Ok(50));
            assert_eq!(s.add("", &["@y.test".into()], "", true), Ok(1));
        }
        let journal = dir.path().join("suppressions.jsonl");
        assert_eq!(
            std::fs::read_to_string(&journal).unwrap().lines().count(),
            151
        );
        let s = Suppressions::open(dir.path()).unwrap();
        assert_eq!(s.len(), 51);
        assert!(s.suppressed("acme", "u99@x.test") && !s.suppressed("acme", "u0@x.test"));
        assert!(s.suppressed("acme", "z@y.test"));
        assert_eq!(
            std::fs::read_to_string(&journal).unwrap().lines().count(),
            51,
            "compacted"
        );
        let page = s.list(Some("acme"), 10, 5);
        let got: Vec<&str> = page.iter().map(|c| c.entry.as_str()).collect();
        assert_eq!(
            got,
            [
                "u60@x.test",
                "u61@x.test",
                "u62@x.test",
                "u63@x.test",
                "u64@x.test"
            ]
        );
        assert_eq!(s.list(None, 0, 100).len(), 51);
    }
}
