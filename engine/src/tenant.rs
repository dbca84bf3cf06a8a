//! Tenants: the organisations one saida serves. A `[[tenant]]` names the AUTH users and API
//! tokens that submit for it, the sender domains it may use, the egress pool its mail leaves
//! from, and its intake quotas (messages per minute, recipients queued). [`Tenants`] is the
//! shared, run-time side: who is which tenant, the quotas' counters (shared by every shard,
//! atomics and one short lock per tenant), and whether the tenant's delivery is suspended.
//!
//! A message's tenant is stored in its spool record (the `tenant` field) by name; delivery looks
//! it up again here, so the record never holds an index that a configuration change could shift.
//!
//! Not here: the checks' replies (the SMTP session and the HTTP API say `553 5.7.1` and
//! `452 4.7.1`), the queues per tenant (`delivery::engine`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use serde::Deserialize;

/// Most tenants.
pub const TENANTS_MAX: usize = 10_000;
/// Shortest API token.
pub const API_TOKEN_CHARS_MIN: usize = 16;
/// Names that mean something else in the tenant field and the metrics.
const RESERVED_NAMES: &[&str] = &["api", "none", "unlisted", "other"];

/// `[[tenant]]`
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    pub name: String,
    /// AUTH user names (from the credentials file) that submit for this tenant.
    #[serde(default)]
    pub users: Vec<String>,
    /// Bearer tokens that may `POST /messages` for this tenant (and nothing else).
    #[serde(default)]
    pub api_tokens: Vec<String>,
    /// Domains (and their subdomains) allowed in MAIL FROM and `From:`; empty = any.
    #[serde(default)]
    pub sender_domains: Vec<String>,
    /// Egress pool of the tenant's mail; empty = the destination's (`[delivery]`/`[[route]]`).
    #[serde(default)]
    pub pool: String,
    /// Messages accepted per minute (all shards, SMTP and HTTP); 0 = no limit.
    #[serde(default)]
    pub messages_per_minute_max: u64,
    /// Recipients queued and not yet finished; 0 = no limit.
    #[serde(default)]
    pub queued_rcpts_max: u64,
    /// Domains whose DKIM keys sign this tenant's mail besides its `From:` domain's.
    #[serde(default)]
    pub dkim_also: Vec<String>,
    /// Pools a message may choose with the [`POOL_HEADER`] header (taken out at intake).
    #[serde(default)]
    pub pools_allowed: Vec<String>,
}

/// The header through which a tenant's message chooses one of its `pools_allowed`.
pub const POOL_HEADER: &str = "X-Saida-Pool";

/// The spool record's `tenant` field: the tenant's name, then `/pool` when the message chose a
/// pool with [`POOL_HEADER`] (tenant names never hold a `/`).
pub fn record_field(name: &str, pool: Option<&str>) -> String {
    match pool {
        Some(p) => format!("{name}/{p}"),
        None => name.to_string(),
    }
}

/// The tenant name and the chosen pool of a record's `tenant` field.
pub fn split_record_field(field: &str) -> (&str, Option<&str>) {
    match field.split_once('/') {
        Some((name, pool)) => (name, Some(pool)),
        None => (field, None),
    }
}

/// Why a tenant may not submit now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QuotaExceeded {
    #[error("sending rate of the account exceeded; slow down")]
    Rate,
    #[error("too much mail queued for the account; try again later")]
    Queue,
}

/// One tenant's configuration and counters.
#[derive(Debug)]
pub struct Tenant {
    pub config: TenantConfig,
    /// Recipients queued (handed to delivery, not yet terminal).
    queued: AtomicU64,
    /// Token bucket for `messages_per_minute_max`: (tokens, last refill).
    bucket: Mutex<(f64, Instant)>,
    suspended: AtomicBool,
    counting: bool,
}

impl Tenant {
    fn new(config: TenantConfig) -> Tenant {
        let full = config.messages_per_minute_max as f64;
        Tenant {
            config,
            queued: AtomicU64::new(0),
            bucket: Mutex::new((full, Instant::now())),
            suspended: AtomicBool::new(false),
            counting: true,
        }
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Whether a message of this tenant may choose `pool` with [`POOL_HEADER`].
    pub fn pool_allowed(&self, pool: &str) -> bool {
        self.config.pools_allowed.iter().any(|p| p == pool)
    }

    /// Whether `from` (an address; empty = null sender) is within the sender domains.
    pub fn sender_allowed(&self, from: &str) -> bool {
        domain_allowed(&self.config.sender_domains, from)
    }

    /// Whether every `From:` mailbox of `message` is within the sender domains (a message
    /// without one, or with more than one `From:` field, is not, when the tenant has sender
    /// domains).
    pub fn header_from_allowed(&self, message: &[u8]) -> bool {
        let domains = &self.config.sender_domains;
        if domains.is_empty() {
            return true;
        }
        if smtp_proto::headers::count_fields(message, "From") != 1 {
            return false;
        }
        let from = from_domains(message);
        !from.is_empty() && from.iter().all(|d| domain_in(domains, d))
    }

    /// Takes one message from the rate quota, or says which quota is spent. The queue quota is
    /// checked, not taken: recipients count once they are queued.
    pub fn admit(&self) -> Result<(), QuotaExceeded> {
        self.admit_n(1)
    }

    /// [`Tenant::admit`] for `n` messages at once: all are admitted or none.
    pub fn admit_n(&self, n: u64) -> Result<(), QuotaExceeded> {
        let max = self.config.queued_rcpts_max;
        if self.counting && max > 0 && self.queued.load(Ordering::Relaxed) >= max {
            return Err(QuotaExceeded::Queue);
        }
        let per_minute = self.config.messages_per_minute_max;
        if per_minute == 0 {
            return Ok(());
        }
        let mut bucket = match self.bucket.lock() {
            Ok(b) => b,
            Err(poisoned) => poisoned.into_inner(),
        };
        let now = Instant::now();
        let rate = per_minute as f64 / 60.0;
        let refill = now.duration_since(bucket.1).as_secs_f64() * rate;
        bucket.0 = (bucket.0 + refill).min(per_minute as f64);
        bucket.1 = now;
        if bucket.0 < n as f64 {
            return Err(QuotaExceeded::Rate);
        }
        bucket.0 -= n as f64;
        Ok(())
    }

    pub fn queued(&self, n: usize) {
        if self.counting {
            self.queued.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    pub fn finished(&self, n: usize) {
        let n = n as u64;
        let _ = self
            .queued
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |q| {
                Some(q.saturating_sub(n))
            });
    }

    pub fn queued_rcpts(&self) -> u64 {
        self.queued.load(Ordering::Relaxed)
    }

    pub fn suspended(&self) -> bool {
        self.suspended.load(Ordering::Relaxed)
    }

    pub fn set_suspended(&self, on: bool) {
        self.suspended.store(on, Ordering::Relaxed);
    }
}

/// Every configured tenant, looked up by name, AUTH user, API token or sender domain.
#[derive(Debug)]
pub struct Tenants {
    all: Vec<Tenant>,
    by_name: HashMap<String, usize>,
    by_user: HashMap<String, usize>,
    /// Each sender domain, lowercase, and the tenant it belongs to (the first that lists it).
    by_domain: HashMap<String, usize>,
    /// Whether queued recipients are counted (not when this daemon does not deliver: they
    /// would never be finished).
    counting: bool,
}

impl Default for Tenants {
    fn default() -> Self {
        Tenants {
            all: Vec::new(),
            by_name: HashMap::new(),
            by_user: HashMap::new(),
            by_domain: HashMap::new(),
            counting: true,
        }
    }
}

impl Tenants {
    /// Builds the registry from checked configuration ([`validate`] first).
    pub fn new(configs: &[TenantConfig]) -> Tenants {
        let mut t = Tenants::default();
        for (i, c) in configs.iter().enumerate() {
            t.by_name.insert(c.name.clone(), i);
            for u in &c.users {
                t.by_user.insert(u.clone(), i);
            }
            for d in &c.sender_domains {
                let d = d.trim_end_matches('.').to_ascii_lowercase();
                t.by_domain.entry(d).or_insert(i);
            }
            t.all.push(Tenant::new(c.clone()));
        }
        t
    }

    /// Without counting queued recipients (and so without the queue quota): for a daemon
    /// that does not deliver.
    pub fn without_queue_counting(mut self) -> Tenants {
        self.counting = false;
        for t in &mut self.all {
            t.counting = false;
        }
        self
    }

    /// The tenant whose sender domains hold `domain` (or a domain above it).
    pub fn owner_of(&self, domain: &str) -> Option<&Tenant> {
        if self.by_domain.is_empty() {
            return None;
        }
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        let mut d = domain.as_str();
        loop {
            if let Some(&i) = self.by_domain.get(d) {
                return Some(&self.all[i]);
            }
            d = d.split_once('.')?.1;
        }
    }

    pub fn all(&self) -> &[Tenant] {
        &self.all
    }

    pub fn named(&self, name: &str) -> Option<&Tenant> {
        self.by_name.get(name).map(|&i| &self.all[i])
    }

    pub fn of_user(&self, user: &str) -> Option<&Tenant> {
        self.by_user.get(user).map(|&i| &self.all[i])
    }

    /// The tenant whose API token `given` is, compared in constant time against every token.
    pub fn of_token(&self, given: &str) -> Option<&Tenant> {
        use subtle::ConstantTimeEq;
        let mut found = None;
        for t in &self.all {
            for token in &t.config.api_tokens {
                if bool::from(given.as_bytes().ct_eq(token.as_bytes())) {
                    found = Some(t);
                }
            }
        }
        found
    }
}

/// Tenants an operator suspended, one name per line, beside the spool.
const SUSPENDED_FILE: &str = "suspended-tenants";

/// Suspends again the tenants that were suspended when the daemon stopped.
pub fn restore_suspended(tenants: &Tenants, spool_dir: &std::path::Path) {
    let text = std::fs::read_to_string(spool_dir.join(SUSPENDED_FILE)).unwrap_or_default();
    for name in text.lines().map(str::trim) {
        match tenants.named(name) {
            Some(t) => t.set_suspended(true),
            None if name.is_empty() => {}
            None => tracing::warn!(tenant = name, "a suspended tenant is no longer configured"),
        }
    }
}

/// Writes the suspended tenants (durably replaced: `state_file`).
pub fn save_suspended(tenants: &Tenants, spool_dir: &std::path::Path) -> std::io::Result<()> {
    let text: String = tenants
        .all()
        .iter()
        .filter(|t| t.suspended())
        .map(|t| format!("{}\n", t.name()))
        .collect();
    crate::state_file::replace(&spool_dir.join(SUSPENDED_FILE), text.as_bytes())
}

/// Whether the domain of `address` is one of `domains` or below one; an empty list allows all.
/// The null sender (empty) is never a tenant's.
pub fn domain_allowed(domains: &[String], address: &str) -> bool {
    if domains.is_empty() {
        return true;
    }
    match address.rsplit_once('@') {
        Some((_, domain)) => domain_in(domains, domain),
        None => false,
    }
}

/// Whether `domain` is one of `domains` or below one (case and a final dot ignored).
fn domain_in(domains: &[String], domain: &str) -> bool {
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    domains.iter().any(|d| {
        let d = d.trim_end_matches('.').to_ascii_lowercase();
        domain == d
            || domain
                .strip_suffix(&d)
                .is_some_and(|rest| rest.ends_with('.'))
    })
}

/// The domains of the `From:` mailboxes of `message` (lowercase, no trailing dot), parsed with
/// mail-parser; empty when there is no `From:` or it holds no address.
pub fn from_domains(message: &[u8]) -> Vec<String> {
    let Some(parsed) = mail_parser::MessageParser::new().parse_headers(message) else {
        return Vec::new();
    };
    let Some(from) = parsed.from() else {
        return Vec::new();
    };
    from.iter()
        .filter_map(|m| m.address()?.rsplit_once('@').map(|(_, d)| d.to_string()))
        .map(|d| d.trim_end_matches('.').to_ascii_lowercase())
        .collect()
}

/// Checks `[[tenant]]` entries against each other and the pools; the error names the key.
pub fn validate(tenants: &[TenantConfig], pools: &[&str]) -> Result<(), (String, String)> {
    let err = |k: &str, m: String| Err((format!("tenant.{k}"), m));
    if tenants.len() > TENANTS_MAX {
        return err("name", format!("at most {TENANTS_MAX} tenants"));
    }
    let mut names = std::collections::HashSet::new();
    let mut users = std::collections::HashSet::new();
    let mut tokens = std::collections::HashSet::new();
    for t in tenants {
        if !crate::names::is_name(&t.name) || RESERVED_NAMES.contains(&t.name.as_str()) {
            return err(
                "name",
                format!(
                    "`{}`: 1 to {} of a-z, 0-9, `-_.`, and not one of {:?}",
                    t.name,
                    crate::names::NAME_CHARS_MAX,
                    RESERVED_NAMES
                ),
            );
        }
        if !names.insert(t.name.as_str()) {
            return err("name", format!("`{}` is used twice", t.name));
        }
        for u in &t.users {
            if !users.insert(u.as_str()) {
                return err("users", format!("user `{u}` belongs to two tenants"));
            }
        }
        for k in &t.api_tokens {
            if k.len() < API_TOKEN_CHARS_MIN || !k.bytes().all(|b| b.is_ascii_graphic()) {
                return err(
                    "api_tokens",
                    format!(
                        "tenant `{}`: tokens need {API_TOKEN_CHARS_MIN} or more printable \
                         characters",
                        t.name
                    ),
                );
            }
            if !tokens.insert(k.as_str()) {
                return err(
                    "api_tokens",
                    format!("tenant `{}`: a token is used twice", t.name),
                );
            }
        }
        if !t.pool.is_empty() && !pools.contains(&t.pool.as_str()) {
            return err(
                "pool",
                format!("tenant `{}`: no [[pool]] named `{}`", t.name, t.pool),
            );
        }
        if let Some(p) = t
            .pools_allowed
            .iter()
            .find(|p| !pools.contains(&p.as_str()))
        {
            return err(
                "pools_allowed",
                format!("tenant `{}`: no [[pool]] named `{p}`", t.name),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(name: &str) -> TenantConfig {
        TenantConfig {
            name: name.into(),
            ..TenantConfig::default()
        }
    }

    #[test]
    fn the_record_field_carries_a_chosen_pool() {
        assert_eq!(
            split_record_field(&record_field("acme", None)),
            ("acme", None)
        );
        let f = record_field("acme", Some("bulk"));
        assert_eq!(split_record_field(&f), ("acme", Some("bulk")));
        assert_eq!(split_record_field(""), ("", None));
    }

    #[test]
    fn sender_domains_allow_subdomains_only_below_a_dot() {
        let d = vec!["origin.test".to_string()];
        assert!(domain_allowed(&d, "a@origin.test"));
        assert!(domain_allowed(&d, "a@Mail.Origin.Test."));
        assert!(!domain_allowed(&d, "a@evilorigin.test"));
        assert!(!domain_allowed(&d, ""));
        assert!(domain_allowed(&[], "anyone@anywhere.test"));
    }

    #[test]
    fn from_domains_come_from_every_mailbox_of_the_from_field() {
        let m = concat!(
            "Subject: x\r\nFrom: \"A, B\" <a@One.test>, c@two.test.\r\n (x)\r\n",
            "\r\nFrom: z@body.test\r\n"
        )
        .as_bytes();
        assert_eq!(from_domains(m), vec!["one.test", "two.test"]);
        assert!(from_domains(b"Subject: none\r\n\r\nbody\r\n").is_empty());
    }

    #[test]
    fn the_rate_quota_refills_over_time_and_the_queue_quota_counts_recipients() {
        let t = Tenant::new(TenantConfig {
            messages_per_minute_max: 2,
            queued_rcpts_max: 3,
            ..tenant("acme")
        });
        assert_eq!(t.admit(), Ok(()));
        assert_eq!(t.admit(), Ok(()));
        assert_eq!(t.admit(), Err(QuotaExceeded::Rate));
        // A minute later the bucket is full again.
        t.bucket.lock().unwrap().1 -= std::time::Duration::from_secs(60);
        t.queued(3);
        assert_eq!(t.admit(), Err(QuotaExceeded::Queue));
        t.finished(1);
        assert_eq!(t.admit(), Ok(()));
        t.finished(10);
        assert_eq!(t.queued_rcpts(), 0, "never below zero");
    }

    #[test]
    fn users_and_tokens_find_their_tenant() {
        let tenants = Tenants::new(&[
            TenantConfig {
                users: vec!["alice".into()],
                api_tokens: vec!["acme-token-0123456789".into()],
                ..tenant("acme")
            },
            TenantConfig {
                users: vec!["bob".into()],
                ..tenant("globex")
            },
        ]);
        assert_eq!(tenants.of_user("bob").map(Tenant::name), Some("globex"));
        assert!(tenants.of_user("carol").is_none());
        let t = tenants.of_token("acme-token-0123456789");
        assert_eq!(t.map(Tenant::name), Some("acme"));
        assert!(tenants.of_token("acme-token-012345678").is_none());
        assert_eq!(tenants.named("acme").map(Tenant::name), Some("acme"));
    }

    #[test]
    fn bad_tenants_are_refused_with_the_key_named() {
        let key = |ts: &[TenantConfig]| validate(ts, &["p1"]).map_err(|e| e.0);
        assert_eq!(key(&[tenant("api")]), Err("tenant.name".into()));
        assert_eq!(key(&[tenant("a b")]), Err("tenant.name".into()));
        assert_eq!(key(&[tenant("a"), tenant("a")]), Err("tenant.name".into()));
        let user = |n: &str| TenantConfig {
            users: vec!["u".into()],
            ..tenant(n)
        };
        assert_eq!(key(&[user("a"), user("b")]), Err("tenant.users".into()));
        let short = TenantConfig {
            api_tokens: vec!["short".into()],
            ..tenant("a")
        };
        assert_eq!(key(&[short]), Err("tenant.api_tokens".into()));
        let pool = TenantConfig {
            pool: "p2".into(),
            ..tenant("a")
        };
        assert_eq!(key(&[pool]), Err("tenant.pool".into()));
        let ok = TenantConfig {
            pool: "p1".into(),
            ..tenant("a")
        };
        assert_eq!(key(&[ok]), Ok(()));
    }
}
