//! Mailbox providers: groups of destinations that one operator runs (every domain whose MX
//! ends in `google.com` or `googlemail.com` is Google's), and the limits that operator applies
//! per sending address across all of its domains. A `[[provider]]` names MX host suffixes
//! and/or domains, and limits per (source, provider): connections open at once and messages
//! per second/minute/hour. They are shared by every domain of the provider and every shard
//! (atomics and one short lock per path), on top of each domain's own limits.
//!
//! Paths also carry adaptive backoff (`delivery::backoff`): a reply matching a backoff rule
//! suspends the path and/or cuts its connections and rate, which ramp back while replies are
//! clean; paths in backoff are listed and cancelled through the admin API and saved in
//! `<spool>/backoffs.json` (durably replaced at each change: synced, renamed, directory synced).
//! A destination of no provider has a path of
//! its own per source, so backoff applies to it alike.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::delivery::backoff::{Backoff, BackoffRule, Rules};
use crate::delivery::throttle::{RateLimit, Recent};

/// Most providers.
pub const PROVIDERS_MAX: usize = 1000;

/// `[[provider]]`
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    pub name: String,
    /// MX host name suffixes (`google.com` matches `aspmx.l.google.com`).
    #[serde(default)]
    pub mx_suffixes: Vec<String>,
    /// Domains that are the provider's whatever their MX (`gmail.com`).
    #[serde(default)]
    pub domains: Vec<String>,
    /// Connections open at once per source to all of the provider's domains; 0 = no limit.
    #[serde(default)]
    pub connections_max: usize,
    #[serde(default)]
    pub rate_per_second: Option<u32>,
    #[serde(default)]
    pub rate_per_minute: Option<u32>,
    #[serde(default)]
    pub rate_per_hour: Option<u32>,
    /// Messages per connection to the provider (lower than the domain's wins).
    #[serde(default)]
    pub msgs_per_connection_max: Option<u32>,
    /// Recipients per transaction to the provider (lower than the domain's wins).
    #[serde(default)]
    pub rcpts_per_transaction_max: Option<usize>,
}

/// The shared state of one (source, provider) path. A destination of no provider has a path
/// of its own per source (named by its domain), which carries no limits but its backoff.
#[derive(Debug)]
pub struct Path {
    /// The provider's name, or the destination domain of a path of no provider.
    pub provider: String,
    /// The source's name; empty for the kernel's address.
    pub source: String,
    /// Whether `provider` is a configured `[[provider]]` (else a domain).
    pub configured: bool,
    pub connections: AtomicUsize,
    connections_max: usize,
    /// Configured messages per minute (the tightest scale), 0 = none.
    configured_per_minute: u64,
    /// Connections allowed now: `connections_max`, or less in backoff (0 = no limit).
    cap: AtomicUsize,
    /// The path is in backoff: `connect` and `take` look at `state.backoff`.
    in_backoff: AtomicBool,
    state: Mutex<PathState>,
    /// When a connection was last refused for want of a slot (µs; 0 = never).
    wanted_micros: AtomicU64,
}

#[derive(Debug)]
struct PathState {
    rate: RateLimit,
    recent: Recent,
    /// The backoff in effect and the rate limit that enforces it.
    backoff: Option<(Backoff, RateLimit)>,
}

/// How long after a refused slot the path counts as contended (idle connections then close).
const CONTENDED_MICROS: u64 = 1_000_000;

/// Why a path gives no connection slot now.
#[derive(Debug, PartialEq, Eq)]
pub enum NoSlot {
    /// Its connections are all open: wait for one to end.
    Busy,
    /// In backoff, suspended until this time (µs).
    Suspended(u64),
}

/// A connection slot of a path, given back when dropped (or by [`Slot::shed`]).
#[derive(Debug)]
pub struct Slot {
    path: Arc<Path>,
    given_back: std::cell::Cell<bool>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if !self.given_back.get() {
            self.path.connections.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Slot {
    /// The path the slot is of.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Gives the slot back if the path has more connections open than backoff now allows:
    /// then this connection should close. One connection per excess slot closes.
    pub fn shed(&self) -> bool {
        if self.given_back.get() || !self.path.in_backoff.load(Ordering::Acquire) {
            return false;
        }
        let cap = self.path.cap.load(Ordering::Acquire);
        let shed = self
            .path
            .connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (cap > 0 && n > cap).then(|| n - 1)
            })
            .is_ok();
        self.given_back.set(shed);
        shed
    }
}

fn lock(m: &Mutex<PathState>) -> std::sync::MutexGuard<'_, PathState> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Path {
    /// A connection slot, or why there is none.
    pub fn connect(self: &Arc<Path>) -> Result<Slot, NoSlot> {
        if self.in_backoff.load(Ordering::Acquire) {
            let now = spool::now_micros();
            let mut st = lock(&self.state);
            self.refresh(&mut st, now);
            if let Some((b, _)) = &st.backoff {
                if b.suspended(now) {
                    return Err(NoSlot::Suspended(b.suspended_until_micros));
                }
            }
        }
        let max = self.cap.load(Ordering::Acquire);
        let taken = self
            .connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (max == 0 || n < max).then_some(n + 1)
            });
        if taken.is_err() {
            self.wanted_micros
                .store(spool::now_micros(), Ordering::Relaxed);
            return Err(NoSlot::Busy);
        }
        Ok(Slot {
            path: Arc::clone(self),
            given_back: std::cell::Cell::new(false),
        })
    }

    /// Whether the path is suspended by backoff now.
    pub fn suspended(&self, now: u64) -> bool {
        if !self.in_backoff.load(Ordering::Acquire) {
            return false;
        }
        let mut st = lock(&self.state);
        self.refresh(&mut st, now);
        st.backoff.as_ref().is_some_and(|(b, _)| b.suspended(now))
    }

    /// Whether a connection was refused a slot within the last second: an idle connection of
    /// the path should close and make room.
    pub fn contended(&self, now_micros: u64) -> bool {
        let w = self.wanted_micros.load(Ordering::Relaxed);
        w > 0 && now_micros.saturating_sub(w) < CONTENDED_MICROS
    }

    /// Takes a message from the path's rate (and its backoff's), or says how many microseconds
    /// to wait.
    pub fn take(&self, now_micros: u64) -> Result<(), u64> {
        let mut st = lock(&self.state);
        if self.in_backoff.load(Ordering::Acquire) {
            self.refresh(&mut st, now_micros);
        }
        let st = &mut *st;
        let mut wait = st.rate.wait(now_micros);
        if let Some((b, limit)) = &mut st.backoff {
            if b.suspended(now_micros) {
                return Err(b.suspended_until_micros - now_micros);
            }
            wait = wait.max(limit.wait(now_micros));
        }
        if wait > 0 {
            return Err(wait);
        }
        st.rate.take();
        if let Some((_, limit)) = &mut st.backoff {
            limit.take();
        }
        st.recent.add(now_micros);
        Ok(())
    }

    /// Moves the backoff to `now`: a new level gets its rate limit and connection cap; a
    /// backoff that is over is dropped.
    fn refresh(&self, st: &mut PathState, now: u64) {
        let Some((b, limit)) = &mut st.backoff else {
            return;
        };
        let level = b.level;
        if !b.refresh(now) {
            st.backoff = None;
            self.cap.store(self.connections_max, Ordering::Release);
            self.in_backoff.store(false, Ordering::Release);
            return;
        }
        if b.level != level {
            *limit = b.rate_limit(now);
        }
        self.set_cap(b);
    }

    fn set_cap(&self, b: &Backoff) {
        let cap = match self.connections_max {
            0 => b.connections_max(),
            max => b.connections_max().min(max),
        };
        self.cap.store(cap, Ordering::Release);
    }

    /// A reply matched `rule`: starts or deepens the path's backoff. Returns whether its state
    /// changed enough to be saved.
    fn backoff(&self, rule: &BackoffRule, reply: &str, now: u64) -> bool {
        let mut st = lock(&self.state);
        let changed = match &mut st.backoff {
            Some((b, limit)) => {
                let cut = b.matched(rule, reply, now);
                if cut {
                    *limit = b.rate_limit(now);
                    self.set_cap(b);
                }
                cut
            }
            None => {
                let conns = match self.connections_max {
                    0 => self.connections.load(Ordering::Acquire),
                    max => max,
                };
                let per_minute = match self.configured_per_minute {
                    0 => st.recent.per_minute(now),
                    m => m,
                };
                let b = Backoff::start(rule, reply, now, conns, per_minute);
                self.set_cap(&b);
                let limit = b.rate_limit(now);
                st.backoff = Some((b, limit));
                true
            }
        };
        self.in_backoff.store(true, Ordering::Release);
        changed
    }

    /// The backoff in effect, if any, moved to `now`.
    pub fn backoff_now(&self, now: u64) -> Option<Backoff> {
        if !self.in_backoff.load(Ordering::Acquire) {
            return None;
        }
        let mut st = lock(&self.state);
        self.refresh(&mut st, now);
        st.backoff.as_ref().map(|(b, _)| b.clone())
    }

    /// Ends the path's backoff; whether it had one.
    fn cancel_backoff(&self) -> bool {
        let mut st = lock(&self.state);
        let had = st.backoff.take().is_some();
        self.cap.store(self.connections_max, Ordering::Release);
        self.in_backoff.store(false, Ordering::Release);
        had
    }

    fn restore(&self, b: Backoff, now: u64) {
        let mut st = lock(&self.state);
        self.set_cap(&b);
        let limit = b.rate_limit(now);
        st.backoff = Some((b, limit));
        self.in_backoff.store(true, Ordering::Release);
        self.refresh(&mut st, now);
    }
}

/// A path in backoff, as listed by the admin API and saved in `<spool>/backoffs.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PathBackoff {
    /// The provider's name, or the destination domain when `domain` is true.
    pub provider: String,
    #[serde(default)]
    pub domain: bool,
    pub source: String,
    pub backoff: Backoff,
    /// Connections and messages per minute allowed now (filled in when listed).
    #[serde(default)]
    pub connections_max: usize,
    #[serde(default)]
    pub per_minute: u64,
}

/// Most paths of no provider kept while unused: beyond, unused ones without backoff go.
const IDLE_PATHS_MIN: usize = 4096;

/// Every provider, looked up by domain or MX host, with the state of every path and the
/// backoff rules; shared by every shard.
#[derive(Debug, Default)]
pub struct Providers {
    configs: Vec<ProviderConfig>,
    by_domain: HashMap<String, usize>,
    /// (lowercase suffix, provider), longest first.
    suffixes: Vec<(String, usize)>,
    paths: Mutex<PathMap>,
    rules: Rules,
    /// Where paths in backoff are saved (none: not saved).
    state_file: Option<std::path::PathBuf>,
    /// Saves taken (snapshot numbers) and the newest one written: writes run off the shard
    /// threads and may finish out of order; an older snapshot never replaces a newer one.
    saves: std::sync::atomic::AtomicU64,
    saving: Arc<Mutex<u64>>,
}

/// Paths by (provider, source); a destination of no provider is `(None, domain, source)`.
#[derive(Debug, Default)]
struct PathMap {
    paths: HashMap<(Option<usize>, String, String), Arc<Path>>,
    prune_at: usize,
}

/// Where paths in backoff are saved, under the spool directory.
pub const BACKOFF_FILE: &str = "backoffs.json";

impl Providers {
    /// Providers without backoff rules or saved state (tests, tools).
    pub fn new(configs: &[ProviderConfig]) -> Providers {
        let lower = |s: &String| s.trim_end_matches('.').to_ascii_lowercase();
        let mut by_domain = HashMap::new();
        let mut suffixes = Vec::new();
        for (i, c) in configs.iter().enumerate() {
            for d in &c.domains {
                by_domain.entry(lower(d)).or_insert(i);
            }
            suffixes.extend(c.mx_suffixes.iter().map(|s| (lower(s), i)));
        }
        suffixes.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        Providers {
            configs: configs.to_vec(),
            by_domain,
            suffixes,
            paths: Mutex::new(PathMap {
                paths: HashMap::new(),
                prune_at: IDLE_PATHS_MIN,
            }),
            ..Default::default()
        }
    }

    /// Providers with backoff `rules`, restoring the paths in backoff saved in `spool_dir`
    /// (entries that are over, or whose provider is no longer configured, are dropped).
    pub fn with_backoff(
        configs: &[ProviderConfig],
        rules: Rules,
        spool_dir: &std::path::Path,
    ) -> Providers {
        let mut p = Providers::new(configs);
        p.rules = rules;
        let file = spool_dir.join(BACKOFF_FILE);
        let saved: Vec<PathBackoff> = match std::fs::read(&file) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::error!(file = %file.display(), error = %e,
                    "saved backoffs unreadable; starting without them");
                Vec::new()
            }),
            Err(_) => Vec::new(),
        };
        let now = spool::now_micros();
        for e in saved {
            let provider = if e.domain {
                None
            } else {
                match p.configs.iter().position(|c| c.name == e.provider) {
                    Some(i) => Some(i),
                    None => continue,
                }
            };
            let domain = if e.domain { e.provider.as_str() } else { "" };
            let path = p.path_of(provider, domain, &e.source);
            let mut b = e.backoff;
            if b.refresh(now) {
                path.restore(b, now);
            }
        }
        p.state_file = Some(file);
        p
    }

    pub fn config(&self, provider: usize) -> Option<&ProviderConfig> {
        self.configs.get(provider)
    }

    pub fn name(&self, provider: usize) -> &str {
        self.configs.get(provider).map_or("", |c| c.name.as_str())
    }

    /// The provider of a destination: by its domain, else by the first MX host that matches
    /// a suffix (`mx_hosts` in preference order).
    pub fn of(&self, domain: &str, mx_hosts: &[&str]) -> Option<usize> {
        if self.configs.is_empty() {
            return None;
        }
        if let Some(&p) = self.by_domain.get(domain) {
            return Some(p);
        }
        mx_hosts.iter().find_map(|h| {
            let h = h.trim_end_matches('.').to_ascii_lowercase();
            self.suffixes.iter().find_map(|(s, p)| {
                let under = h == *s || h.strip_suffix(s.as_str()).is_some_and(|r| r.ends_with('.'));
                under.then_some(*p)
            })
        })
    }

    /// The path of a destination to `source`: its provider's, or (`provider` none) the
    /// domain's own.
    pub fn path_of(&self, provider: Option<usize>, domain: &str, source: &str) -> Arc<Path> {
        let mut map = self.paths.lock().unwrap_or_else(|p| p.into_inner());
        let key = (
            provider,
            if provider.is_some() {
                String::new()
            } else {
                domain.to_string()
            },
            source.to_string(),
        );
        if let Some(p) = map.paths.get(&key) {
            return Arc::clone(p);
        }
        if map.paths.len() >= map.prune_at {
            // Paths of no provider that nothing holds and that are not in backoff go.
            map.paths.retain(|(prov, _, _), p| {
                prov.is_some() || Arc::strong_count(p) > 1 || p.in_backoff.load(Ordering::Acquire)
            });
            map.prune_at = (map.paths.len() * 2).max(IDLE_PATHS_MIN);
        }
        let c = provider.and_then(|i| self.configs.get(i));
        let now = spool::now_micros();
        let connections_max = c.map_or(0, |c| c.connections_max);
        let configured_per_minute = c.map_or(0, |c| {
            [
                c.rate_per_second.map(|r| u64::from(r) * 60),
                c.rate_per_minute.map(u64::from),
                c.rate_per_hour.map(|r| (u64::from(r) / 60).max(1)),
            ]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(0)
        });
        let path = Arc::new(Path {
            provider: c.map_or_else(|| domain.to_string(), |c| c.name.clone()),
            source: source.to_string(),
            configured: c.is_some(),
            connections: AtomicUsize::new(0),
            connections_max,
            configured_per_minute,
            cap: AtomicUsize::new(connections_max),
            in_backoff: AtomicBool::new(false),
            state: Mutex::new(PathState {
                rate: c.map_or_else(RateLimit::default, |c| {
                    RateLimit::new(c.rate_per_second, c.rate_per_minute, c.rate_per_hour, now)
                }),
                recent: Recent::new(now),
                backoff: None,
            }),
            wanted_micros: AtomicU64::new(0),
        });
        map.paths.insert(key, Arc::clone(&path));
        path
    }

    /// A failure reply on `path`: the first backoff rule it matches starts or deepens the
    /// path's backoff (saved when that changed it). Returns the rule's name.
    pub fn observe(
        &self,
        path: &Path,
        code: u16,
        enhanced: Option<&str>,
        text: &str,
    ) -> Option<String> {
        if code < 400 || self.rules.len() == 0 {
            return None;
        }
        let rule = self.rules.matching(&path.provider, code, enhanced, text)?;
        let now = spool::now_micros();
        if path.backoff(rule, text, now) {
            if let Some(b) = path.backoff_now(now) {
                tracing::warn!(provider = %path.provider, source = %path.source,
                    rule = %rule.name, reply = %text, level = b.level,
                    suspended_secs = b.suspended_until_micros.saturating_sub(now) / 1_000_000,
                    "backoff");
            }
            self.save();
        }
        Some(rule.name.clone())
    }

    /// Every path in backoff now.
    pub fn backoffs(&self) -> Vec<PathBackoff> {
        let now = spool::now_micros();
        let paths: Vec<Arc<Path>> = {
            let map = self.paths.lock().unwrap_or_else(|p| p.into_inner());
            map.paths.values().cloned().collect()
        };
        let mut out: Vec<PathBackoff> = paths
            .iter()
            .filter_map(|p| {
                let b = p.backoff_now(now)?;
                Some(PathBackoff {
                    provider: p.provider.clone(),
                    domain: !p.configured,
                    source: p.source.clone(),
                    connections_max: p.cap.load(Ordering::Acquire),
                    per_minute: b.per_minute(),
                    backoff: b,
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.provider, &a.source).cmp(&(&b.provider, &b.source)));
        out
    }

    /// Ends the backoff of `provider`'s paths (one source, or all); how many ended.
    pub fn cancel(&self, provider: &str, source: Option<&str>) -> usize {
        let paths: Vec<Arc<Path>> = {
            let map = self.paths.lock().unwrap_or_else(|p| p.into_inner());
            map.paths.values().cloned().collect()
        };
        let n = paths
            .iter()
            .filter(|p| p.provider == provider && source.is_none_or(|s| s == p.source))
            .filter(|p| p.cancel_backoff())
            .count();
        if n > 0 {
            self.save();
        }
        n
    }

    /// Writes the paths in backoff to the state file (durably replaced: `state_file`), on the
    /// blocking pool when there is a runtime: the syncs must not stall a shard's event loop.
    fn save(&self) {
        let Some(file) = self.state_file.clone() else {
            return;
        };
        let snapshot = self
            .saves
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        let bytes = match serde_json::to_vec_pretty(&self.backoffs()) {
            Ok(b) => b,
            Err(e) => return tracing::error!(error = %e, "backoffs not saved"),
        };
        let saving = Arc::clone(&self.saving);
        let write = move || {
            let mut written = saving.lock().unwrap_or_else(|p| p.into_inner());
            if *written > snapshot {
                return;
            }
            match crate::state_file::replace(&file, &bytes) {
                Ok(()) => *written = snapshot,
                Err(e) => tracing::error!(file = %file.display(), error = %e, "backoffs not saved"),
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(write)),
            Err(_) => write(),
        }
    }
}

/// Checks `[[provider]]` entries; the error names the key.
pub fn validate(providers: &[ProviderConfig]) -> Result<(), (String, String)> {
    if providers.len() > PROVIDERS_MAX {
        return Err(("provider".into(), format!("at most {PROVIDERS_MAX}")));
    }
    let mut names = std::collections::HashSet::new();
    for p in providers {
        if !crate::names::is_name(&p.name) || !names.insert(p.name.as_str()) {
            let why = format!("`{}`: 1 to 64 of A-Za-z0-9-_., unique", p.name);
            return Err(("provider.name".into(), why));
        }
        if p.mx_suffixes.is_empty() && p.domains.is_empty() {
            let why = format!("provider `{}` names no mx_suffixes and no domains", p.name);
            return Err(("provider.mx_suffixes".into(), why));
        }
        for (key, v) in [
            ("rate_per_second", p.rate_per_second),
            ("rate_per_minute", p.rate_per_minute),
            ("rate_per_hour", p.rate_per_hour),
        ] {
            if v == Some(0) {
                return Err((format!("provider.{key}"), "must be at least 1".into()));
            }
        }
        if p.msgs_per_connection_max == Some(0) {
            return Err((
                "provider.msgs_per_connection_max".into(),
                "must be at least 1".into(),
            ));
        }
        if p.rcpts_per_transaction_max
            .is_some_and(|r| r == 0 || r > 1000)
        {
            return Err((
                "provider.rcpts_per_transaction_max".into(),
                "1 to 1000".into(),
            ));
        }
        if p.connections_max > 100_000 {
            return Err(("provider.connections_max".into(), "at most 100000".into()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn google() -> ProviderConfig {
        ProviderConfig {
            name: "google".into(),
            mx_suffixes: vec!["google.com".into(), "googlemail.com".into()],
            domains: vec!["gmail.com".into()],
            connections_max: 2,
            rate_per_second: Some(3),
            ..Default::default()
        }
    }

    #[test]
    fn destinations_are_grouped_by_domain_or_mx_suffix() {
        let p = Providers::new(&[google()]);
        assert_eq!(p.of("gmail.com", &[]), Some(0));
        assert_eq!(p.of("example.com", &["aspmx.l.GOOGLE.com."]), Some(0));
        assert_eq!(p.of("example.com", &["mx.notgoogle.com"]), None);
        assert_eq!(
            p.of("example.com", &["mx.example.com", "alt.googlemail.com"]),
            Some(0)
        );
        assert_eq!(p.name(0), "google");
    }

    #[test]
    fn a_path_shares_its_connections_and_rate_across_domains() {
        let p = Providers::new(&[google()]);
        let a = p.path_of(Some(0), "", "ip1");
        let b = p.path_of(Some(0), "", "ip1");
        let other = p.path_of(Some(0), "", "ip2");
        let s1 = a.connect().unwrap();
        let _s2 = b.connect().unwrap();
        assert_eq!(a.connect().err(), Some(NoSlot::Busy), "two per source");
        assert!(other.connect().is_ok(), "another source has its own");
        drop(s1);
        assert!(
            b.connect().is_ok(),
            "a slot comes back when its connection ends"
        );
        let now = 1_000_000;
        assert!(a.take(now).is_ok());
        assert!(
            b.take(now).is_err(),
            "3 per second for the path (at most one at once), whichever domain"
        );
    }

    fn rules() -> Rules {
        let slow = BackoffRule {
            name: "slow".into(),
            providers: vec![],
            code: "421".into(),
            enhanced: String::new(),
            text: "slow down".into(),
            suspend_secs: 0,
            factor: 0.5,
            floor: 0.25,
            ramp_secs: 600,
        };
        let stop = BackoffRule {
            name: "stop".into(),
            text: r"\[TSS04\]".into(),
            suspend_secs: 600,
            ..slow.clone()
        };
        Rules::new(&[slow, stop], false).unwrap()
    }

    #[test]
    fn a_matching_reply_cuts_the_path_and_open_connections_are_shed() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = google();
        config.connections_max = 4;
        let p = Providers::with_backoff(&[config], rules(), dir.path());
        let path = p.path_of(Some(0), "", "ip1");
        let slots: Vec<Slot> = (0..4).map(|_| path.connect().unwrap()).collect();
        assert_eq!(
            p.observe(&path, 250, None, "250 slow down"),
            None,
            "not a failure"
        );
        assert_eq!(
            p.observe(&path, 421, None, "421 4.7.0 nothing to see"),
            None
        );
        assert_eq!(
            p.observe(&path, 421, None, "421 4.7.0 Slow down please")
                .as_deref(),
            Some("slow")
        );
        // Half of 4: two connections close, the others stay; no new one opens.
        assert_eq!(slots.iter().filter(|s| s.shed()).count(), 2);
        assert_eq!(path.connect().err(), Some(NoSlot::Busy));
        let listed = p.backoffs();
        assert_eq!(listed.len(), 1);
        assert_eq!(
            (listed[0].provider.as_str(), listed[0].source.as_str()),
            ("google", "ip1")
        );
        assert_eq!(
            (listed[0].connections_max, listed[0].per_minute),
            (2, 90),
            "3/s × 0.5"
        );
        // Another source is untouched.
        assert!(
            p.path_of(Some(0), "", "ip2")
                .backoff_now(spool::now_micros())
                .is_none()
        );
        drop(slots);
        assert_eq!(p.cancel("google", Some("ip1")), 1);
        assert!(p.backoffs().is_empty());
        assert!(path.connect().is_ok(), "cancelled: full limits again");
    }

    #[test]
    fn a_suspension_survives_a_restart_and_a_destination_of_no_provider_has_its_own() {
        let dir = tempfile::tempdir().unwrap();
        {
            let p = Providers::with_backoff(&[google()], rules(), dir.path());
            let path = p.path_of(None, "corp.test", "");
            p.observe(&path, 421, Some("4.7.0"), "421 4.7.0 [TSS04] deferred");
            assert!(matches!(path.connect(), Err(NoSlot::Suspended(_))));
            assert!(
                path.take(spool::now_micros()).is_err(),
                "nothing sent while suspended"
            );
            assert!(p.path_of(None, "other.test", "").connect().is_ok());
        }
        let p = Providers::with_backoff(&[google()], rules(), dir.path());
        let listed = p.backoffs();
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert!(listed[0].domain && listed[0].provider == "corp.test");
        assert_eq!(listed[0].backoff.rule, "stop");
        let path = p.path_of(None, "corp.test", "");
        assert!(matches!(path.connect(), Err(NoSlot::Suspended(_))));
        assert_eq!(p.cancel("corp.test", None), 1);
        let p = Providers::with_backoff(&[google()], rules(), dir.path());
        assert!(p.backoffs().is_empty(), "the cancel was saved");
    }

    #[test]
    fn bad_providers_are_named() {
        let key = |p: ProviderConfig| validate(&[p]).map_err(|e| e.0);
        assert_eq!(key(google()), Ok(()));
        let none = ProviderConfig {
            mx_suffixes: vec![],
            domains: vec![],
            ..google()
        };
        assert_eq!(key(none), Err("provider.mx_suffixes".into()));
        let zero = ProviderConfig {
            rate_per_second: Some(0),
            ..google()
        };
        assert_eq!(key(zero), Err("provider.rate_per_second".into()));
    }
}
