//! Egress sources and pools: which local address a delivery connection leaves from, and with
//! which EHLO name.
//!
//! A `[[source]]` names a local address to bind and the EHLO name to say from it; a `[[pool]]`
//! lists sources with weights. A tenant's pool, or else the destination's (`pool` in
//! `[delivery]` or a `[[route]]`), gives each message a source by smooth weighted round robin
//! (the sequence that spreads a pool's messages in proportion to the weights exactly, without
//! randomness). A source whose address cannot be bound is suspended alone for
//! [`SOURCE_SUSPEND`] and reported; the pool's other sources carry on. Without a pool,
//! connections leave from the kernel's choice of address with `[delivery] helo_name`.
//!
//! A tenant's pool replaces the destination's for the tenant's queues. Each message (each job)
//! is given its source when it is queued, so queues are per (source, destination)
//! (`delivery::engine`); a connection of a source whose address cannot be bound takes another
//! source of the pool, and later messages are not given the suspended one.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use serde::Deserialize;

/// How long a source whose address could not be bound is left out of its pools.
pub const SOURCE_SUSPEND: Duration = Duration::from_secs(60);
/// Sources tried for one connection when addresses cannot be bound.
pub const BIND_TRIES_MAX: usize = 8;
/// Most sources and pools.
pub const SOURCES_MAX: usize = 4096;
/// Largest weight of a source in a pool.
pub const WEIGHT_MAX: u32 = 1000;

/// `[[source]]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    pub name: String,
    /// Local address to bind before connecting.
    pub address: IpAddr,
    /// EHLO name from this source; empty = `[delivery] helo_name` (or `server.hostname`).
    #[serde(default)]
    pub ehlo: String,
}

/// One source of a pool.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolMember {
    pub source: String,
    #[serde(default = "PoolMember::default_weight")]
    pub weight: u32,
}

impl PoolMember {
    fn default_weight() -> u32 {
        1
    }
}

/// `[[pool]]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    pub name: String,
    pub sources: Vec<PoolMember>,
}

/// Checks sources and pools; the error names the key and what is wrong.
pub fn validate(sources: &[SourceConfig], pools: &[PoolConfig]) -> Result<(), (String, String)> {
    if sources.len() > SOURCES_MAX || pools.len() > SOURCES_MAX {
        return Err((
            "source".into(),
            format!("at most {SOURCES_MAX} sources and pools"),
        ));
    }
    let mut names = std::collections::HashSet::new();
    for s in sources {
        if !crate::names::is_name(&s.name) || !names.insert(s.name.as_str()) {
            return Err((
                "source.name".into(),
                format!("`{}`: 1 to 64 of A-Za-z0-9-_., unique", s.name),
            ));
        }
    }
    let mut pool_names = std::collections::HashSet::new();
    for p in pools {
        if !crate::names::is_name(&p.name) || !pool_names.insert(p.name.as_str()) {
            return Err((
                "pool.name".into(),
                format!("`{}`: 1 to 64 of A-Za-z0-9-_., unique", p.name),
            ));
        }
        if p.sources.is_empty() {
            return Err((
                "pool.sources".into(),
                format!("pool `{}` has no source", p.name),
            ));
        }
        for m in &p.sources {
            if !names.contains(m.source.as_str()) {
                return Err((
                    "pool.sources".into(),
                    format!("pool `{}` names unknown source `{}`", p.name, m.source),
                ));
            }
            if !(1..=WEIGHT_MAX).contains(&m.weight) {
                return Err((
                    "pool.sources.weight".into(),
                    format!("{} is outside 1..={WEIGHT_MAX}", m.weight),
                ));
            }
        }
    }
    Ok(())
}

/// The source a connection leaves from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    pub name: String,
    pub address: IpAddr,
    pub ehlo: String,
}

/// One pool at run time: its members and their round-robin state.
struct Pool {
    members: Vec<(usize, i64)>,
    current: Vec<i64>,
}

/// A shard's sources and pools, with which sources are suspended.
pub struct Egress {
    sources: Vec<Source>,
    suspended_until: RefCell<Vec<Option<Instant>>>,
    pools: HashMap<String, RefCell<Pool>>,
}

impl Egress {
    /// From validated configuration; `default_ehlo` for sources without their own.
    pub fn new(sources: &[SourceConfig], pools: &[PoolConfig], default_ehlo: &str) -> Egress {
        let index: HashMap<&str, usize> = sources
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.as_str(), i))
            .collect();
        let pools = pools
            .iter()
            .map(|p| {
                let members: Vec<(usize, i64)> = p
                    .sources
                    .iter()
                    .filter_map(|m| index.get(m.source.as_str()).map(|i| (*i, m.weight.into())))
                    .collect();
                let current = vec![0; members.len()];
                (p.name.clone(), RefCell::new(Pool { members, current }))
            })
            .collect();
        Egress {
            sources: sources
                .iter()
                .map(|s| Source {
                    name: s.name.clone(),
                    address: s.address,
                    ehlo: if s.ehlo.is_empty() {
                        default_ehlo.to_string()
                    } else {
                        s.ehlo.clone()
                    },
                })
                .collect(),
            suspended_until: RefCell::new(vec![None; sources.len()]),
            pools,
        }
    }

    /// The next source of `pool` (smooth weighted round robin over the sources not
    /// suspended); `None` when every source of the pool is suspended or the pool is unknown.
    pub fn pick(&self, pool: &str) -> Option<Source> {
        let mut p = self.pools.get(pool)?.borrow_mut();
        let now = Instant::now();
        let suspended = self.suspended_until.borrow();
        let usable = |i: usize| suspended[i].is_none_or(|t| t <= now);
        let mut total = 0;
        let mut best: Option<usize> = None;
        let Pool { members, current } = &mut *p;
        for (k, (src, weight)) in members.iter().enumerate() {
            if !usable(*src) {
                continue;
            }
            current[k] += weight;
            total += weight;
            if best.is_none_or(|b| current[k] > current[b]) {
                best = Some(k);
            }
        }
        let b = best?;
        current[b] -= total;
        Some(self.sources[members[b].0].clone())
    }

    /// The source `name` unless it is suspended.
    pub fn usable(&self, name: &str) -> Option<Source> {
        let i = self.sources.iter().position(|s| s.name == name)?;
        let free = self.suspended_until.borrow()[i].is_none_or(|t| t <= Instant::now());
        free.then(|| self.sources[i].clone())
    }

    /// Leaves `name` out of its pools for [`SOURCE_SUSPEND`] (its address could not be bound).
    pub fn suspend(&self, name: &str) {
        if let Some(i) = self.sources.iter().position(|s| s.name == name) {
            self.suspended_until.borrow_mut()[i] = Some(Instant::now() + SOURCE_SUSPEND);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> (Vec<SourceConfig>, Vec<PoolConfig>) {
        let src = |n: &str, a: &str| SourceConfig {
            name: n.into(),
            address: a.parse().unwrap(),
            ehlo: format!("{n}.example"),
        };
        let member = |s: &str, w: u32| PoolMember {
            source: s.into(),
            weight: w,
        };
        (
            vec![
                src("a", "192.0.2.1"),
                src("b", "192.0.2.2"),
                src("c", "192.0.2.3"),
            ],
            vec![PoolConfig {
                name: "p".into(),
                sources: vec![member("a", 5), member("b", 3), member("c", 2)],
            }],
        )
    }

    #[test]
    fn connections_follow_the_weights_exactly() {
        let (s, p) = config();
        assert!(validate(&s, &p).is_ok());
        let e = Egress::new(&s, &p, "default.example");
        let mut counts: HashMap<String, usize> = HashMap::new();
        for _ in 0..1000 {
            *counts.entry(e.pick("p").unwrap().name).or_default() += 1;
        }
        assert_eq!((counts["a"], counts["b"], counts["c"]), (500, 300, 200));
        assert_eq!(e.pick("nope"), None);
    }

    #[test]
    fn a_suspended_source_is_left_out_alone() {
        let (s, p) = config();
        let e = Egress::new(&s, &p, "default.example");
        e.suspend("a");
        let picks: Vec<String> = (0..50).map(|_| e.pick("p").unwrap().name).collect();
        assert!(picks.iter().all(|n| n != "a"));
        assert!(picks.iter().any(|n| n == "b") && picks.iter().any(|n| n == "c"));
        for n in ["a", "b", "c"] {
            e.suspend(n);
        }
        assert_eq!(e.pick("p"), None, "every source suspended");
    }

    #[test]
    fn bad_pools_are_named() {
        let (s, mut p) = config();
        p[0].sources[0].source = "ghost".into();
        assert_eq!(validate(&s, &p).unwrap_err().0, "pool.sources");
        let (s, mut p) = config();
        p[0].sources[0].weight = 0;
        assert_eq!(validate(&s, &p).unwrap_err().0, "pool.sources.weight");
        let (mut s, p) = config();
        s[1].name = "a".into();
        assert_eq!(validate(&s, &p).unwrap_err().0, "source.name");
    }
}
