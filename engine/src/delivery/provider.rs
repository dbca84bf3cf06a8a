//! Mailbox providers: groups of destinations that one operator runs (every domain whose MX
//! ends in `google.com` or `googlemail.com` is Google's), and the limits that operator applies
//! per sending address across all of its domains. A `[[provider]]` names MX host suffixes
//! and/or domains, and limits per (source, provider): connections open at once and messages
//! per second/minute/hour. They are shared by every domain of the provider and every shard
//! (atomics and one short lock per path), on top of each domain's own limits.
//!
//! Not here: adaptive backoff (cutting these limits when a provider says "slow down"), and
//! per-connection or per-transaction limits per provider (those stay the domain's).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde::Deserialize;

use crate::delivery::throttle::RateLimit;

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
}

/// The shared state of one (source, provider) path.
#[derive(Debug)]
pub struct Path {
    pub connections: AtomicUsize,
    connections_max: usize,
    rate: Mutex<RateLimit>,
    /// When a connection was last refused for want of a slot (µs; 0 = never).
    wanted_micros: AtomicU64,
}

/// How long after a refused slot the path counts as contended (idle connections then close).
const CONTENDED_MICROS: u64 = 1_000_000;

/// A connection slot of a path, given back when dropped.
#[derive(Debug)]
pub struct Slot(Arc<Path>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Path {
    /// A connection slot, or none when the path has `connections_max` open.
    pub fn connect(self: &Arc<Path>) -> Option<Slot> {
        let max = self.connections_max;
        let taken = self
            .connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (max == 0 || n < max).then_some(n + 1)
            });
        if taken.is_err() {
            self.wanted_micros
                .store(spool::now_micros(), Ordering::Relaxed);
        }
        taken.ok().map(|_| Slot(Arc::clone(self)))
    }

    /// Whether a connection was refused a slot within the last second: an idle connection of
    /// the path should close and make room.
    pub fn contended(&self, now_micros: u64) -> bool {
        let w = self.wanted_micros.load(Ordering::Relaxed);
        w > 0 && now_micros.saturating_sub(w) < CONTENDED_MICROS
    }

    /// Takes a message from the path's rate, or says how many microseconds to wait.
    pub fn take(&self, now_micros: u64) -> Result<(), u64> {
        match self.rate.lock() {
            Ok(mut r) => r.try_take(now_micros),
            Err(p) => p.into_inner().try_take(now_micros),
        }
    }
}

/// Every provider, looked up by domain or MX host; shared by every shard.
#[derive(Debug, Default)]
pub struct Providers {
    configs: Vec<ProviderConfig>,
    by_domain: HashMap<String, usize>,
    /// (lowercase suffix, provider), longest first.
    suffixes: Vec<(String, usize)>,
    paths: Mutex<HashMap<(usize, String), Arc<Path>>>,
}

impl Providers {
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
            paths: Mutex::default(),
        }
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

    /// The shared state of (provider, source); `source` is empty for the kernel's address.
    pub fn path(&self, provider: usize, source: &str) -> Arc<Path> {
        let mut paths = match self.paths.lock() {
            Ok(p) => p,
            Err(p) => p.into_inner(),
        };
        let c = &self.configs[provider.min(self.configs.len().saturating_sub(1))];
        let make = || {
            let now = spool::now_micros();
            Arc::new(Path {
                connections: AtomicUsize::new(0),
                connections_max: c.connections_max,
                rate: Mutex::new(RateLimit::new(
                    c.rate_per_second,
                    c.rate_per_minute,
                    c.rate_per_hour,
                    now,
                )),
                wanted_micros: AtomicU64::new(0),
            })
        };
        Arc::clone(
            paths
                .entry((provider, source.to_string()))
                .or_insert_with(make),
        )
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
        let a = p.path(0, "ip1");
        let b = p.path(0, "ip1");
        let other = p.path(0, "ip2");
        let s1 = a.connect().unwrap();
        let _s2 = b.connect().unwrap();
        assert!(a.connect().is_none(), "two per source");
        assert!(other.connect().is_some(), "another source has its own");
        drop(s1);
        assert!(
            b.connect().is_some(),
            "a slot comes back when its connection ends"
        );
        let now = 1_000_000;
        assert!(a.take(now).is_ok() && b.take(now).is_ok() && a.take(now).is_ok());
        assert!(
            b.take(now).is_err(),
            "3 per second for the path, whichever domain"
        );
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
