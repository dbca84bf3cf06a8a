//! Delivery configuration: the `[delivery]` defaults, the `[[route]]` entries that override them
//! (and MX) for matching recipient domains, and `[dns]`. [`DeliveryPolicies::for_domain`] turns
//! them into the [`DomainPolicy`] one destination runs with.
//!
//! A route's `domain` is an exact domain (`example.com`), a wildcard for its subdomains
//! (`*.example.com`, which does not match `example.com` itself) or `*` (every domain). The most
//! specific match wins: exact, then the longest wildcard, then `*`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::delivery::schedule::RetrySchedule;
use crate::dns::DnsSettings;
use smtp_client::{Timeouts, TlsPolicy};

/// `tls = ...` in `[delivery]` and `[[route]]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TlsMode {
    Opportunistic,
    Required,
    Verified,
}

impl From<TlsMode> for TlsPolicy {
    fn from(m: TlsMode) -> TlsPolicy {
        match m {
            TlsMode::Opportunistic => TlsPolicy::Opportunistic,
            TlsMode::Required => TlsPolicy::Required,
            TlsMode::Verified => TlsPolicy::Verified,
        }
    }
}

/// Declares a TOML table struct holding its own fields plus every [`Limits`] key inline (serde's
/// `flatten` cannot be combined with `deny_unknown_fields`, and unknown keys must be errors).
macro_rules! with_limits {
    ($(#[$m:meta])* pub struct $name:ident { $($(#[$fm:meta])* pub $f:ident: $t:ty,)* }) => {
        $(#[$m])*
        pub struct $name {
            $($(#[$fm])* pub $f: $t,)*
            pub connections_max: Option<usize>,
            pub msgs_per_connection_max: Option<u32>,
            pub rcpts_per_transaction_max: Option<usize>,
            pub idle_secs: Option<u64>,
            pub rate_per_second: Option<u32>,
            pub rate_per_minute: Option<u32>,
            pub rate_per_hour: Option<u32>,
            pub connect_timeout_secs: Option<u64>,
            pub command_timeout_secs: Option<u64>,
            pub data_timeout_secs: Option<u64>,
            pub retry_delays_secs: Option<Vec<u64>>,
            pub max_age_secs: Option<u64>,
            pub tls: Option<TlsMode>,
            /// The `[[pool]]` connections leave from; none = the kernel's address.
            pub pool: Option<String>,
            /// Deliver from the shard that accepted each message instead of the domain's one
            /// owner shard (a hot destination on every core; its limits then apply per shard).
            pub spread_over_shards: Option<bool>,
        }

        impl $name {
            /// The per-destination keys of this table.
            #[allow(dead_code, reason = "not called on `Limits` itself")]
            pub fn limits(&self) -> Limits {
                Limits {
                    connections_max: self.connections_max,
                    msgs_per_connection_max: self.msgs_per_connection_max,
                    rcpts_per_transaction_max: self.rcpts_per_transaction_max,
                    idle_secs: self.idle_secs,
                    rate_per_second: self.rate_per_second,
                    rate_per_minute: self.rate_per_minute,
                    rate_per_hour: self.rate_per_hour,
                    connect_timeout_secs: self.connect_timeout_secs,
                    command_timeout_secs: self.command_timeout_secs,
                    data_timeout_secs: self.data_timeout_secs,
                    retry_delays_secs: self.retry_delays_secs.clone(),
                    max_age_secs: self.max_age_secs,
                    tls: self.tls,
                    pool: self.pool.clone(),
                    spread_over_shards: self.spread_over_shards,
                }
            }
        }
    };
}

with_limits! {
/// Per-destination settings. In `[delivery]` every key has a default; in a `[[route]]` every key
/// is optional and falls back to `[delivery]`.
#[derive(Clone, Debug, Default)]
pub struct Limits {}
}

with_limits! {
/// `[delivery]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// Deliver at all. Off: messages are only queued (a pure submission or sink test).
    pub enabled: bool,
    /// Name said in EHLO; empty = `server.hostname`.
    pub helo_name: String,
    /// TCP port of MX hosts (25; a test bed may move it).
    pub mx_port: u16,
    /// PEM bundle of trusted roots for `tls = "verified"`.
    pub tls_ca_file: std::path::PathBuf,
    /// Recipients one shard keeps queued in memory; beyond it new mail gets `452 4.3.1`.
    pub queued_rcpts_max: usize,
    /// Outbound connections (workers) one shard runs at once, all destinations together.
    pub workers_per_shard_max: usize,
    /// MX lookups one shard runs at once (cache misses).
    pub dns_lookups_per_shard_max: usize,
    /// Directory of the delivery logs (`delivery-<shard>.log`); empty = no log.
    pub log_dir: String,
    pub log_bytes_max: u64,
    pub log_age_secs: u64,
    pub log_files_max: usize,
    /// Send bounces (DSNs) for failed recipients.
    pub bounces: bool,
    /// Sender domains that never get bounces (bulk senders reading the delivery log instead).
    pub bounce_exempt_sender_domains: Vec<String>,
    /// A recipient that asked for delay reports (`NOTIFY=DELAY`) and is still deferred at
    /// this age gets one DELAY DSN; 0 = never.
    pub delay_dsn_after_secs: u64,
    /// Apply the shipped backoff rules (`delivery::backoff::BUILTIN_RULES`) after the
    /// `[[backoff_rule]]` entries.
    pub backoff_builtin_rules: bool,
}
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            enabled: true,
            helo_name: String::new(),
            mx_port: 25,
            tls_ca_file: "/etc/ssl/certs/ca-certificates.crt".into(),
            queued_rcpts_max: 4_000_000,
            workers_per_shard_max: 2000,
            dns_lookups_per_shard_max: 100,
            log_dir: "var/log".into(),
            log_bytes_max: 256 << 20,
            log_age_secs: 86_400,
            log_files_max: 14,
            bounces: true,
            bounce_exempt_sender_domains: Vec::new(),
            delay_dsn_after_secs: 4 * 3600,
            backoff_builtin_rules: true,
            connections_max: None,
            msgs_per_connection_max: None,
            rcpts_per_transaction_max: None,
            idle_secs: None,
            rate_per_second: None,
            rate_per_minute: None,
            rate_per_hour: None,
            connect_timeout_secs: None,
            command_timeout_secs: None,
            data_timeout_secs: None,
            retry_delays_secs: None,
            max_age_secs: None,
            tls: None,
            pool: None,
            spread_over_shards: None,
        }
    }
}

with_limits! {
/// `[[route]]`: settings and optionally fixed hosts for matching recipient domains.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Route {
    pub domain: String,
    /// `host:port` or `ip:port` to use instead of MX, tried in order (a smarthost or a sink).
    pub hosts: Vec<String>,
}
}

/// `[dns]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// `ip:port` name servers; empty = /etc/resolv.conf.
    pub nameservers: Vec<SocketAddr>,
    pub timeout_secs: u64,
    pub attempts: usize,
    pub cache_entries_max: usize,
    /// Loopback, link-local or unspecified networks an MX answer may point to (a test bed on
    /// 127.0.0.0/8); empty = none: such addresses from DNS are refused (a mail loop).
    pub local_networks_allowed: Vec<crate::cidr::Cidr>,
}

impl Default for DnsConfig {
    fn default() -> Self {
        let d = DnsSettings::default();
        DnsConfig {
            nameservers: d.nameservers,
            timeout_secs: d.timeout.as_secs(),
            attempts: d.attempts,
            cache_entries_max: d.cache_entries_max,
            local_networks_allowed: Vec::new(),
        }
    }
}

impl DnsConfig {
    pub fn settings(&self) -> DnsSettings {
        DnsSettings {
            nameservers: self.nameservers.clone(),
            timeout: Duration::from_secs(self.timeout_secs),
            attempts: self.attempts,
            cache_entries_max: self.cache_entries_max,
        }
    }
}

/// Where a destination's mail goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// Look up MX records.
    Mx,
    /// Fixed `host:port` list from a route.
    Hosts(Vec<(String, u16)>),
}

/// The effective settings of one destination domain.
#[derive(Clone, Debug)]
pub struct DomainPolicy {
    pub target: Target,
    pub connections_max: usize,
    pub msgs_per_connection_max: u32,
    pub rcpts_per_transaction_max: usize,
    pub idle: Duration,
    pub rate: (Option<u32>, Option<u32>, Option<u32>),
    pub connect_timeout: Duration,
    pub timeouts: Timeouts,
    pub schedule: RetrySchedule,
    pub tls: TlsPolicy,
    /// The egress pool new connections pick their source from.
    pub pool: Option<String>,
    /// Delivered by the accepting shard, not by the domain's owner shard.
    pub spread_over_shards: bool,
}

/// Defaults of `[delivery]` keys, safe for large providers: few connections per destination,
/// connections reused, RFC 5321 timeouts.
pub const CONNECTIONS_MAX_DEFAULT: usize = 10;
pub const MSGS_PER_CONNECTION_MAX_DEFAULT: u32 = 100;
pub const RCPTS_PER_TRANSACTION_MAX_DEFAULT: usize = 100;
pub const IDLE_SECS_DEFAULT: u64 = 5;
pub const CONNECT_TIMEOUT_SECS_DEFAULT: u64 = 30;

/// Every route compiled, looked up per domain.
pub struct DeliveryPolicies {
    defaults: Arc<DomainPolicy>,
    exact: std::collections::HashMap<String, Arc<DomainPolicy>>,
    /// (suffix with its leading dot, policy), longest first.
    wildcards: Vec<(String, Arc<DomainPolicy>)>,
    any: Option<Arc<DomainPolicy>>,
}

fn apply(base: &DomainPolicy, l: &Limits) -> Result<DomainPolicy, (String, String)> {
    let mut p = base.clone();
    if let Some(v) = l.connections_max {
        check("connections_max", v as u64, 1, 1000)?;
        p.connections_max = v;
    }
    if let Some(v) = l.msgs_per_connection_max {
        check("msgs_per_connection_max", v.into(), 1, 1_000_000)?;
        p.msgs_per_connection_max = v;
    }
    if let Some(v) = l.rcpts_per_transaction_max {
        check("rcpts_per_transaction_max", v as u64, 1, 1000)?;
        p.rcpts_per_transaction_max = v;
    }
    if let Some(v) = l.idle_secs {
        check("idle_secs", v, 0, 3600)?;
        p.idle = Duration::from_secs(v);
    }
    for (key, v, slot) in [
        ("rate_per_second", l.rate_per_second, &mut p.rate.0),
        ("rate_per_minute", l.rate_per_minute, &mut p.rate.1),
        ("rate_per_hour", l.rate_per_hour, &mut p.rate.2),
    ] {
        if let Some(v) = v {
            check(key, v.into(), 1, 10_000_000)?;
            *slot = Some(v);
        }
    }
    if let Some(v) = l.spread_over_shards {
        p.spread_over_shards = v;
    }
    if let Some(v) = l.connect_timeout_secs {
        check("connect_timeout_secs", v, 1, 600)?;
        p.connect_timeout = Duration::from_secs(v);
    }
    if let Some(v) = l.command_timeout_secs {
        check("command_timeout_secs", v, 1, 3600)?;
        p.timeouts.command = Duration::from_secs(v);
        p.timeouts.data_start = Duration::from_secs(v.min(120));
    }
    if let Some(v) = l.data_timeout_secs {
        check("data_timeout_secs", v, 1, 3600)?;
        p.timeouts.data_block = Duration::from_secs(v.min(180));
        p.timeouts.data_end = Duration::from_secs(v);
    }
    if let Some(v) = &l.retry_delays_secs {
        if v.is_empty() || v.len() > 100 || v.iter().any(|d| !(1..=7 * 86_400).contains(d)) {
            return Err((
                "retry_delays_secs".into(),
                "must list 1..=100 delays, each 1 ..= 604800 seconds".into(),
            ));
        }
        p.schedule.delays = v.iter().map(|s| Duration::from_secs(*s)).collect();
    }
    if let Some(v) = l.max_age_secs {
        check("max_age_secs", v, 1, 30 * 86_400)?;
        p.schedule.max_age = Duration::from_secs(v);
    }
    if let Some(t) = l.tls {
        p.tls = t.into();
    }
    if let Some(pool) = &l.pool {
        p.pool = Some(pool.clone());
    }
    p.schedule
        .validate()
        .map_err(|m| ("retry_delays_secs".to_string(), m))?;
    Ok(p)
}

fn check(key: &str, v: u64, lo: u64, hi: u64) -> Result<(), (String, String)> {
    if v < lo || v > hi {
        return Err((key.into(), format!("{v} is outside {lo}..={hi}")));
    }
    Ok(())
}

/// Parses `host:port` (a name or an IPv4 address, or `[v6]:port`).
fn parse_host_port(s: &str) -> Result<(String, u16), String> {
    let bad = || format!("`{s}` is not host:port");
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().ok().filter(|p| *p > 0).ok_or_else(bad)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad());
    }
    Ok((host.to_string(), port))
}

impl DeliveryPolicies {
    /// Compiles `[delivery]` and the routes; errors name the key (`delivery.idle_secs`,
    /// `route.hosts`).
    pub fn new(delivery: &DeliveryConfig, routes: &[Route]) -> Result<Self, (String, String)> {
        let builtin = DomainPolicy {
            target: Target::Mx,
            connections_max: CONNECTIONS_MAX_DEFAULT,
            msgs_per_connection_max: MSGS_PER_CONNECTION_MAX_DEFAULT,
            rcpts_per_transaction_max: RCPTS_PER_TRANSACTION_MAX_DEFAULT,
            idle: Duration::from_secs(IDLE_SECS_DEFAULT),
            rate: (None, None, None),
            connect_timeout: Duration::from_secs(CONNECT_TIMEOUT_SECS_DEFAULT),
            timeouts: Timeouts::default(),
            schedule: RetrySchedule::default(),
            tls: TlsPolicy::Opportunistic,
            pool: None,
            spread_over_shards: false,
        };
        let defaults =
            apply(&builtin, &delivery.limits()).map_err(|(k, m)| (format!("delivery.{k}"), m))?;
        let mut policies = DeliveryPolicies {
            defaults: Arc::new(defaults),
            exact: Default::default(),
            wildcards: Vec::new(),
            any: None,
        };
        for r in routes {
            let mut p = apply(&policies.defaults, &r.limits())
                .map_err(|(k, m)| (format!("route.{k}"), m))?;
            if !r.hosts.is_empty() {
                let hosts = r
                    .hosts
                    .iter()
                    .map(|h| parse_host_port(h))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|m| ("route.hosts".to_string(), m))?;
                p.target = Target::Hosts(hosts);
            }
            let p = Arc::new(p);
            let d = r.domain.trim().trim_end_matches('.').to_ascii_lowercase();
            let dup = || ("route.domain".to_string(), format!("`{d}` is routed twice"));
            if d == "*" {
                if policies.any.replace(p).is_some() {
                    return Err(dup());
                }
            } else if let Some(suffix) = d.strip_prefix("*.") {
                if suffix.is_empty() || suffix.contains('*') {
                    return Err(("route.domain".into(), format!("bad wildcard `{d}`")));
                }
                let key = format!(".{suffix}");
                if policies.wildcards.iter().any(|(k, _)| *k == key) {
                    return Err(dup());
                }
                policies.wildcards.push((key, p));
            } else {
                if d.is_empty() || d.contains('*') {
                    return Err(("route.domain".into(), format!("bad domain `{d}`")));
                }
                if policies.exact.insert(d.clone(), p).is_some() {
                    return Err(dup());
                }
            }
        }
        policies
            .wildcards
            .sort_by_key(|(k, _)| std::cmp::Reverse(k.len()));
        Ok(policies)
    }

    /// The policy for a (lower-case) recipient domain.
    pub fn for_domain(&self, domain: &str) -> Arc<DomainPolicy> {
        if let Some(p) = self.exact.get(domain) {
            return Arc::clone(p);
        }
        if let Some((_, p)) = self
            .wildcards
            .iter()
            .find(|(k, _)| domain.ends_with(k.as_str()))
        {
            return Arc::clone(p);
        }
        Arc::clone(self.any.as_ref().unwrap_or(&self.defaults))
    }
}

/// Validates the delivery-related sections (called from `Config::validate`).
pub fn validate(
    delivery: &DeliveryConfig,
    routes: &[Route],
    dns: &DnsConfig,
) -> Result<(), (String, String)> {
    DeliveryPolicies::new(delivery, routes)?;
    check(
        "delivery.queued_rcpts_max",
        delivery.queued_rcpts_max as u64,
        1000,
        100_000_000,
    )?;
    check(
        "delivery.log_bytes_max",
        delivery.log_bytes_max,
        1 << 20,
        1 << 40,
    )?;
    check(
        "delivery.log_age_secs",
        delivery.log_age_secs,
        60,
        365 * 86_400,
    )?;
    check(
        "delivery.delay_dsn_after_secs",
        delivery.delay_dsn_after_secs,
        0,
        30 * 86_400,
    )?;
    check(
        "delivery.log_files_max",
        delivery.log_files_max as u64,
        1,
        10_000,
    )?;
    check("delivery.mx_port", delivery.mx_port.into(), 1, 65_535)?;
    check(
        "delivery.workers_per_shard_max",
        delivery.workers_per_shard_max as u64,
        1,
        100_000,
    )?;
    check(
        "delivery.dns_lookups_per_shard_max",
        delivery.dns_lookups_per_shard_max as u64,
        1,
        10_000,
    )?;
    check("dns.timeout_secs", dns.timeout_secs, 1, 60)?;
    check("dns.attempts", dns.attempts as u64, 1, 10)?;
    check(
        "dns.cache_entries_max",
        dns.cache_entries_max as u64,
        1,
        10_000_000,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(domain: &str, hosts: &[&str], conns: Option<usize>) -> Route {
        Route {
            domain: domain.into(),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            connections_max: conns,
            ..Route::default()
        }
    }

    #[test]
    fn most_specific_route_wins() {
        let routes = [
            route("*", &["127.0.0.1:25"], None),
            route("*.example.com", &[], Some(3)),
            route("*.eu.example.com", &[], Some(4)),
            route("example.com", &["[::1]:2525"], Some(5)),
        ];
        let p = DeliveryPolicies::new(&DeliveryConfig::default(), &routes).unwrap();
        assert_eq!(p.for_domain("example.com").connections_max, 5);
        assert_eq!(
            p.for_domain("example.com").target,
            Target::Hosts(vec![("::1".into(), 2525)])
        );
        assert_eq!(p.for_domain("a.example.com").connections_max, 3);
        assert_eq!(p.for_domain("a.example.com").target, Target::Mx);
        assert_eq!(p.for_domain("x.eu.example.com").connections_max, 4);
        let other = p.for_domain("other.org");
        assert_eq!(other.connections_max, CONNECTIONS_MAX_DEFAULT);
        assert_eq!(other.target, Target::Hosts(vec![("127.0.0.1".into(), 25)]));
    }

    #[test]
    fn without_routes_defaults_apply_and_mx_is_used() {
        let p = DeliveryPolicies::new(&DeliveryConfig::default(), &[]).unwrap();
        let d = p.for_domain("gmail.com");
        assert_eq!(d.target, Target::Mx);
        assert_eq!(d.tls, TlsPolicy::Opportunistic);
        assert_eq!(d.schedule, RetrySchedule::default());
    }

    #[test]
    fn bad_values_name_their_key() {
        let bad = |r: Route| DeliveryPolicies::new(&DeliveryConfig::default(), &[r]).err();
        assert_eq!(
            bad(route("x.test", &[], Some(0))).unwrap().0,
            "route.connections_max"
        );
        assert_eq!(
            bad(route("x.test", &["nohost"], None)).unwrap().0,
            "route.hosts"
        );
        assert_eq!(bad(route("a*b", &[], None)).unwrap().0, "route.domain");
        let d = DeliveryConfig {
            retry_delays_secs: Some(vec![]),
            ..Default::default()
        };
        assert_eq!(
            DeliveryPolicies::new(&d, &[]).err().unwrap().0,
            "delivery.retry_delays_secs"
        );
        let twice = [route("a.test", &[], None), route("A.test.", &[], None)];
        assert!(DeliveryPolicies::new(&DeliveryConfig::default(), &twice).is_err());
    }
}
