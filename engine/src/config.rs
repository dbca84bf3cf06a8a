//! Configuration: the TOML file `saida run --config FILE` reads, with embedded defaults.
//!
//! Every key, its default and its bound are listed in docs/configuration.md; this module is the
//! source of truth and [`Config::validate`] enforces the bounds. A bad file is a [`ConfigError`]
//! naming the file, the line and the key; it never panics. Without a file, [`Config::default`]
//! is a working loopback setup: SMTP on 127.0.0.1:2525, spool under `var/spool`, relaying for
//! loopback clients only.
//!
//! Relay policy is deny by default: an empty or missing `relay.networks` means no network may
//! relay without authentication, never "everyone may".

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use crate::cidr::Cidr;

/// A configuration error, formatted as `FILE:LINE: key: problem`.
#[derive(Debug, thiserror::Error)]
#[error("{}:{line}: {key}: {message}", file.display())]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based line of the offending key (0 when unknown).
    pub line: usize,
    pub key: String,
    pub message: String,
}

/// The whole configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: Server,
    #[serde(rename = "listener")]
    pub listeners: Vec<Listener>,
    pub tls: Option<Tls>,
    pub smtp: Smtp,
    pub relay: Relay,
    pub auth: Auth,
    pub spool: Spool,
    pub log: Log,
    pub delivery: crate::delivery::policy::DeliveryConfig,
    #[serde(rename = "route")]
    pub routes: Vec<crate::delivery::policy::Route>,
    pub dns: crate::delivery::policy::DnsConfig,
    pub admin: AdminConfig,
    #[serde(rename = "source")]
    pub sources: Vec<crate::delivery::egress::SourceConfig>,
    #[serde(rename = "pool")]
    pub pools: Vec<crate::delivery::egress::PoolConfig>,
    #[serde(rename = "tenant")]
    pub tenants: Vec<crate::tenant::TenantConfig>,
    /// `[[dkim]]`: signing keys one by one.
    #[serde(rename = "dkim")]
    pub dkim_keys: Vec<DkimKey>,
    pub signing: Signing,
    /// `[[bounce_rule]]`: classification rules before the built-in ones.
    #[serde(rename = "bounce_rule")]
    pub bounce_rules: Vec<crate::delivery::bounce_class::BounceRule>,
    /// `[[provider]]`: mailbox providers and their limits per (source, provider).
    #[serde(rename = "provider")]
    pub providers: Vec<crate::delivery::provider::ProviderConfig>,
    /// `[[backoff_rule]]`: adaptive backoff rules before the shipped ones.
    #[serde(rename = "backoff_rule")]
    pub backoff_rules: Vec<crate::delivery::backoff::BackoffRule>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server: Server::default(),
            listeners: vec![Listener {
                address: SocketAddr::from(([127, 0, 0, 1], 2525)),
                tls: ListenerTls::StartTls,
            }],
            tls: None,
            smtp: Smtp::default(),
            relay: Relay::default(),
            auth: Auth::default(),
            spool: Spool::default(),
            log: Log::default(),
            delivery: Default::default(),
            routes: Vec::new(),
            dns: Default::default(),
            admin: Default::default(),
            sources: Vec::new(),
            pools: Vec::new(),
            tenants: Vec::new(),
            dkim_keys: Vec::new(),
            signing: Signing::default(),
            bounce_rules: Vec::new(),
            providers: Vec::new(),
            backoff_rules: Vec::new(),
        }
    }
}

/// `[[dkim]]`: one signing key.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DkimKey {
    pub domain: String,
    pub selector: String,
    /// PEM file: RSA (PKCS#1 or PKCS#8) or Ed25519 (PKCS#8).
    pub key: PathBuf,
}

/// `[signing]`: how accepted messages are DKIM-signed.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Signing {
    /// Directory of `<domain>.<selector>.pem` keys; empty = none.
    pub dkim_keys_dir: String,
    /// Header fields signed (absent ones too, so they cannot be added later).
    pub dkim_headers: Vec<String>,
    /// `relaxed/relaxed` (default), `relaxed/simple`, `simple/relaxed` or `simple/simple`.
    pub dkim_canonicalization: String,
    /// Signature lifetime (`x=`); 0 = none.
    pub dkim_expire_secs: u64,
    /// How often key files are checked for changes.
    pub dkim_reload_secs: u64,
    /// Domains whose keys sign every message besides the `From:` domain's (an ESP's own).
    pub dkim_also: Vec<String>,
}

impl Default for Signing {
    fn default() -> Self {
        Signing {
            dkim_keys_dir: String::new(),
            dkim_headers: saida_dkim::DEFAULT_HEADERS
                .iter()
                .map(|h| h.to_string())
                .collect(),
            dkim_canonicalization: "relaxed/relaxed".into(),
            dkim_expire_secs: 0,
            dkim_reload_secs: 60,
            dkim_also: Vec::new(),
        }
    }
}

impl Config {
    /// The backoff rules in effect (configured, then shipped); the error names the key.
    pub fn backoff_rules(&self) -> Result<crate::delivery::backoff::Rules, (String, String)> {
        crate::delivery::backoff::Rules::new(
            &self.backoff_rules,
            self.delivery.backoff_builtin_rules,
        )
    }

    /// Where the DKIM keys come from and how they sign; the error names the key.
    pub fn dkim_sources(&self) -> Result<saida_dkim::KeySources, (String, String)> {
        let s = &self.signing;
        let (header_canonicalization, body_canonicalization) =
            saida_dkim::parse_canonicalization(&s.dkim_canonicalization).ok_or((
                "signing.dkim_canonicalization".to_string(),
                "`relaxed/relaxed`, `relaxed/simple`, `simple/relaxed` or `simple/simple`".into(),
            ))?;
        if !s
            .dkim_headers
            .iter()
            .any(|h| h.eq_ignore_ascii_case("from"))
        {
            let why = "must include From (RFC 6376 §5.4)".to_string();
            return Err(("signing.dkim_headers".into(), why));
        }
        let mut entries = Vec::new();
        for k in &self.dkim_keys {
            if !crate::names::is_name(&k.selector) {
                let why = format!("`{}`: letters, digits, `-_.`", k.selector);
                return Err(("dkim.selector".into(), why));
            }
            if !k.domain.contains('.') {
                return Err((
                    "dkim.domain".into(),
                    format!("`{}` is not a domain", k.domain),
                ));
            }
            entries.push(saida_dkim::KeyEntry {
                domain: k.domain.to_ascii_lowercase(),
                selector: k.selector.clone(),
                key: k.key.clone(),
            });
        }
        Ok(saida_dkim::KeySources {
            entries,
            dir: (!s.dkim_keys_dir.is_empty()).then(|| PathBuf::from(&s.dkim_keys_dir)),
            options: saida_dkim::SignOptions {
                headers: s.dkim_headers.clone(),
                header_canonicalization,
                body_canonicalization,
                expire_secs: s.dkim_expire_secs,
            },
        })
    }
}

/// `[server]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Server {
    /// Name in the greeting, EHLO reply and `Received:` headers.
    pub hostname: String,
    /// Shards (pinned threads); 0 = one per available core.
    pub shards: usize,
    pub backend: Backend,
    /// Seconds given to sessions to finish on SIGTERM before they get `421`.
    pub shutdown_grace_secs: u64,
    /// Without `[tls]`, offer STARTTLS with a self-signed certificate for `hostname`, made at
    /// first start in `<spool.dir>/tls/`.
    pub self_signed_tls: bool,
}

impl Default for Server {
    fn default() -> Self {
        Server {
            hostname: default_hostname(),
            shards: 0,
            // Chosen by measurement: on the reference machine epoll accepted 1.4x more
            // messages per second than tokio-uring (docs/benchmarks.md, SMTP injection).
            backend: Backend::Epoll,
            shutdown_grace_secs: 10,
            self_signed_tls: true,
        }
    }
}

/// Socket I/O backend. The default, `epoll`, is the one measured faster on saida's workload
/// (docs/benchmarks.md); `auto` prefers io_uring where the kernel allows it.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// io_uring where the kernel allows it, epoll otherwise (never fails).
    Auto,
    IoUring,
    Epoll,
}

/// `[[listener]]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    pub address: SocketAddr,
    #[serde(default = "ListenerTls::default_mode")]
    pub tls: ListenerTls,
}

/// TLS on a listener.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ListenerTls {
    /// Plain text; STARTTLS offered when `[tls]` is configured.
    StartTls,
    /// TLS from the first byte (RFC 8314 submissions port).
    Implicit,
    /// Plain text only; STARTTLS never offered.
    None,
}

impl ListenerTls {
    fn default_mode() -> Self {
        ListenerTls::StartTls
    }
}

/// `[tls]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// PEM certificate chain.
    pub certificate: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// How often the files are checked for changes and reloaded (seconds).
    #[serde(default = "Tls::default_reload")]
    pub reload_secs: u64,
}

impl Tls {
    fn default_reload() -> u64 {
        60
    }
}

/// What to do with bare CR or LF in message content.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BareLineEnds {
    Reject,
    Normalize,
}

/// `[smtp]`: protocol limits. Each is a bound; see docs/configuration.md.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Smtp {
    pub command_line_bytes_max: usize,
    pub text_line_bytes_max: usize,
    pub message_bytes_max: usize,
    pub rcpt_per_message_max: usize,
    pub commands_per_session_max: u32,
    pub errors_per_session_max: u32,
    pub connections_max: usize,
    pub connections_per_ip_max: usize,
    /// Slots out of `connections_max` kept for relay networks and clients that authenticate.
    pub connections_reserved: usize,
    /// How long a client admitted into the reserve has to authenticate.
    pub reserved_slot_auth_secs: u64,
    /// Message content all sessions together may hold in memory; past it new DATA/BDAT
    /// gets `452 4.3.1`.
    pub inflight_message_bytes_max: usize,
    /// Longest a session may last, whatever it does.
    pub session_lifetime_secs: u64,
    /// Slowest accepted message transfer: DATA/BDAT must arrive within `data_timeout_secs`
    /// plus its size at this rate.
    pub data_rate_min_bytes_per_sec: u64,
    pub command_timeout_secs: u64,
    pub data_timeout_secs: u64,
    pub bare_line_ends: BareLineEnds,
    pub add_message_id: bool,
    /// A message already carrying this many `Received:` fields is refused (`554 5.4.6`): a
    /// mail loop.
    pub received_headers_max: usize,
}

impl Default for Smtp {
    fn default() -> Self {
        Smtp {
            command_line_bytes_max: 512,
            text_line_bytes_max: 1000,
            message_bytes_max: 25 << 20,
            rcpt_per_message_max: 1000,
            commands_per_session_max: 100_000,
            errors_per_session_max: 10,
            connections_max: 10_000,
            connections_per_ip_max: 50,
            connections_reserved: 100,
            reserved_slot_auth_secs: 30,
            inflight_message_bytes_max: 1 << 30,
            session_lifetime_secs: 3600,
            data_rate_min_bytes_per_sec: 1024,
            // RFC 5321 §4.5.3.2.7: at least 5 minutes waiting for the next command.
            command_timeout_secs: 300,
            // RFC 5321 §4.5.3.2.6: 3 minutes per data block.
            data_timeout_secs: 180,
            bare_line_ends: BareLineEnds::Reject,
            add_message_id: true,
            received_headers_max: 50,
        }
    }
}

/// `[relay]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Relay {
    /// Client networks allowed to relay without authentication (CIDR). Empty = none.
    pub networks: Vec<Cidr>,
}

impl Default for Relay {
    fn default() -> Self {
        Relay {
            networks: vec![
                Cidr {
                    addr: IpAddr::from([127, 0, 0, 0]),
                    prefix: 8,
                },
                Cidr {
                    addr: IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
                    prefix: 128,
                },
            ],
        }
    }
}

/// `[auth]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Auth {
    /// `user:argon2-hash` lines, made with `saida passwd`. AUTH is offered only when set.
    pub credentials_file: Option<PathBuf>,
    /// Offer AUTH only after STARTTLS or on an implicit-TLS listener.
    pub require_tls: bool,
    /// Failed attempts per client IP before the connection is closed.
    pub failures_max: u32,
    /// Delay before answering a failed attempt; doubles with each failure from the same IP.
    pub failure_delay_ms: u64,
    /// AUTH exchanges in progress at once per client address (IPv6: per /64).
    pub concurrent_per_ip_max: u32,
    /// User → sender domains it may use in MAIL FROM (and subdomains); a user not listed may
    /// use any.
    pub sender_domains: std::collections::BTreeMap<String, Vec<String>>,
}

impl Default for Auth {
    fn default() -> Self {
        Auth {
            credentials_file: None,
            require_tls: true,
            failures_max: 5,
            failure_delay_ms: 250,
            concurrent_per_ip_max: 2,
            sender_domains: Default::default(),
        }
    }
}

/// `[spool]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Spool {
    /// Root directory; shard `n` uses `<dir>/shard-<n>`.
    pub dir: PathBuf,
    pub segment_bytes: u64,
    /// `every-commit`, `interval-<N>ms`, or `none`.
    pub sync: String,
    /// `pwrite` or `mmap-msync`.
    pub append_method: String,
    pub pending_bytes_max: usize,
    pub compact_age_secs: u64,
    /// How long a delivery outcome may wait to ride on a message's commit (0 ..= 1000 ms).
    pub outcome_commit_delay_ms: u64,
    /// How long a busy spool may gather messages into one commit (0 ..= 10000 µs).
    pub commit_gather_us: u64,
}

impl Default for Spool {
    fn default() -> Self {
        Spool {
            dir: PathBuf::from("var/spool"),
            segment_bytes: spool::log::SEGMENT_BYTES_DEFAULT,
            sync: "every-commit".into(),
            append_method: "pwrite".into(),
            pending_bytes_max: spool::log::PENDING_BYTES_MAX_DEFAULT,
            compact_age_secs: 3600,
            outcome_commit_delay_ms: spool::log::OUTCOME_COMMIT_DELAY_DEFAULT.as_millis() as u64,
            commit_gather_us: spool::log::COMMIT_GATHER_DEFAULT.as_micros() as u64,
        }
    }
}

/// `[log]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    /// `text` or `json` (one object per line).
    pub format: String,
    /// `error`, `warn`, `info`, `debug` or `trace` (or a tracing filter directive).
    pub level: String,
}

impl Default for Log {
    fn default() -> Self {
        Log {
            format: "text".into(),
            level: "info".into(),
        }
    }
}

/// Shortest prefix a relay network may have.
const RELAY_PREFIX_MIN: u8 = 8;

/// Refuses relay networks that would make an open relay: any one shorter than /8, or a union
/// covering half of the IPv4 or IPv6 space or more.
fn relay_networks_bounded(networks: &[Cidr]) -> Result<(), String> {
    if let Some(n) = networks.iter().find(|n| n.prefix < RELAY_PREFIX_MIN) {
        return Err(format!(
            "{}/{} is too broad (shortest allowed: /{RELAY_PREFIX_MIN}); list the client \
             networks",
            n.addr, n.prefix
        ));
    }
    for v6 in [false, true] {
        let bits = if v6 { 128 } else { 32 };
        let mut ranges: Vec<(u128, u128)> = networks
            .iter()
            .filter(|n| n.addr.is_ipv6() == v6)
            .map(|n| {
                let start = match n.addr {
                    IpAddr::V4(a) => u128::from(u32::from(a)),
                    IpAddr::V6(a) => u128::from(a),
                };
                let size_log2 = bits - u32::from(n.prefix);
                let size = if size_log2 >= 128 {
                    u128::MAX
                } else {
                    1u128 << size_log2
                };
                let start = start & !(size - 1);
                (start, start.saturating_add(size - 1))
            })
            .collect();
        ranges.sort_unstable();
        let mut covered: u128 = 0;
        let mut end: Option<u128> = None;
        for (a, b) in ranges {
            match end {
                Some(e) if a <= e => {
                    if b > e {
                        covered += b - e;
                        end = Some(b);
                    }
                }
                _ => {
                    covered += b - a + 1;
                    end = Some(b);
                }
            }
        }
        if covered >= 1u128 << (bits - 1) {
            return Err(format!(
                "the relay networks together cover half of the IPv{} space or more: an \
                 open relay",
                if v6 { 6 } else { 4 }
            ));
        }
    }
    Ok(())
}

fn default_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty() && smtp_proto::command::is_domain_or_literal(h))
        .unwrap_or_else(|| "localhost".into())
}

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            line: 0,
            key: "-".into(),
            message: format!("cannot read: {e}"),
        })?;
        Config::parse(&text, path)
    }

    /// Parses and validates TOML text (`path` is used in errors only).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| {
            let line = e.span().map_or(0, |s| line_of(text, s.start));
            let message = e.message().to_string();
            let key = message
                .split('`')
                .nth(1)
                .map(str::to_string)
                .unwrap_or_else(|| key_at(text, line));
            ConfigError {
                file: path.to_path_buf(),
                line,
                key,
                message,
            }
        })?;
        config.validate().map_err(|(key, message)| ConfigError {
            file: path.to_path_buf(),
            line: find_key_line(text, &key),
            key,
            message,
        })?;
        Ok(config)
    }

    /// Checks every bound. Returns the dotted key and the problem.
    pub fn validate(&self) -> Result<(), (String, String)> {
        fn range<T: PartialOrd + std::fmt::Display>(
            key: &str,
            v: T,
            lo: T,
            hi: T,
        ) -> Result<(), (String, String)> {
            if v < lo || v > hi {
                return Err((key.into(), format!("{v} is outside {lo}..={hi}")));
            }
            Ok(())
        }
        let s = &self.smtp;
        if !smtp_proto::command::is_domain_or_literal(&self.server.hostname) {
            return Err(("server.hostname".into(), "not a valid domain name".into()));
        }
        range("server.shards", self.server.shards, 0, 256)?;
        range(
            "server.shutdown_grace_secs",
            self.server.shutdown_grace_secs,
            0,
            3600,
        )?;
        if self.listeners.is_empty() {
            return Err((
                "listener".into(),
                "at least one [[listener]] is needed".into(),
            ));
        }
        if self.tls.is_none()
            && self
                .listeners
                .iter()
                .any(|l| l.tls == ListenerTls::Implicit)
        {
            return Err((
                "listener.tls".into(),
                "`implicit` needs a [tls] section".into(),
            ));
        }
        if let Some(t) = &self.tls {
            range("tls.reload_secs", t.reload_secs, 1, 86_400)?;
        }
        range(
            "smtp.command_line_bytes_max",
            s.command_line_bytes_max,
            512,
            65_536,
        )?;
        range(
            "smtp.text_line_bytes_max",
            s.text_line_bytes_max,
            1000,
            1 << 20,
        )?;
        let message_max = (self.spool.segment_bytes as usize / 2).max(1 << 20);
        range(
            "smtp.message_bytes_max",
            s.message_bytes_max,
            1 << 10,
            message_max,
        )?;
        range(
            "smtp.rcpt_per_message_max",
            s.rcpt_per_message_max,
            100,
            100_000,
        )?;
        range(
            "smtp.commands_per_session_max",
            s.commands_per_session_max,
            10,
            10_000_000,
        )?;
        range("smtp.received_headers_max", s.received_headers_max, 1, 1000)?;
        range(
            "smtp.errors_per_session_max",
            s.errors_per_session_max,
            1,
            1000,
        )?;
        range("smtp.connections_max", s.connections_max, 1, 1_000_000)?;
        range(
            "smtp.connections_per_ip_max",
            s.connections_per_ip_max,
            1,
            1_000_000,
        )?;
        range(
            "smtp.connections_reserved",
            s.connections_reserved,
            0,
            s.connections_max.saturating_sub(1),
        )?;
        range(
            "smtp.inflight_message_bytes_max",
            s.inflight_message_bytes_max,
            1 << 20,
            1 << 40,
        )?;
        range(
            "smtp.reserved_slot_auth_secs",
            s.reserved_slot_auth_secs,
            1,
            300,
        )?;
        range(
            "smtp.session_lifetime_secs",
            s.session_lifetime_secs,
            1,
            86_400,
        )?;
        range(
            "smtp.data_rate_min_bytes_per_sec",
            s.data_rate_min_bytes_per_sec,
            1,
            1 << 30,
        )?;
        range("smtp.command_timeout_secs", s.command_timeout_secs, 1, 3600)?;
        range("smtp.data_timeout_secs", s.data_timeout_secs, 1, 3600)?;
        crate::delivery::egress::validate(&self.sources, &self.pools)?;
        let named = std::iter::once(("delivery.pool", &self.delivery.pool))
            .chain(self.routes.iter().map(|r| ("route.pool", &r.pool)));
        for (key, pool) in named {
            if let Some(p) = pool
                .as_ref()
                .filter(|p| !self.pools.iter().any(|x| &x.name == *p))
            {
                return Err((key.to_string(), format!("no [[pool]] named `{p}`")));
            }
        }
        self.dkim_sources()?;
        crate::delivery::provider::validate(&self.providers)?;
        crate::delivery::bounce_class::Classifier::new(&self.bounce_rules)
            .map_err(|e| ("bounce_rule".to_string(), e))?;
        self.backoff_rules()?;
        range(
            "signing.dkim_reload_secs",
            self.signing.dkim_reload_secs,
            1,
            86_400,
        )?;
        range(
            "signing.dkim_expire_secs",
            self.signing.dkim_expire_secs,
            0,
            1 << 31,
        )?;
        let pools: Vec<&str> = self.pools.iter().map(|p| p.name.as_str()).collect();
        crate::tenant::validate(&self.tenants, &pools)?;
        relay_networks_bounded(&self.relay.networks)
            .map_err(|m| ("relay.networks".to_string(), m))?;
        range("auth.failures_max", self.auth.failures_max, 1, 100)?;
        range(
            "auth.concurrent_per_ip_max",
            self.auth.concurrent_per_ip_max,
            1,
            100,
        )?;
        range(
            "auth.failure_delay_ms",
            self.auth.failure_delay_ms,
            0,
            10_000,
        )?;
        parse_sync(&self.spool.sync).map_err(|m| ("spool.sync".to_string(), m))?;
        parse_method(&self.spool.append_method)
            .map_err(|m| ("spool.append_method".to_string(), m))?;
        range(
            "spool.compact_age_secs",
            self.spool.compact_age_secs,
            60,
            7 * 86_400,
        )?;
        range(
            "spool.outcome_commit_delay_ms",
            self.spool.outcome_commit_delay_ms,
            0,
            spool::log::OUTCOME_COMMIT_DELAY_MAX.as_millis() as u64,
        )?;
        range(
            "spool.commit_gather_us",
            self.spool.commit_gather_us,
            0,
            spool::log::COMMIT_GATHER_MAX.as_micros() as u64,
        )?;
        self.spool_config(0).map_err(|e| {
            let message = e.to_string();
            let key = ["segment_bytes", "pending_bytes_max", "sync"]
                .into_iter()
                .find(|k| message.contains(k))
                .map_or("spool".to_string(), |k| format!("spool.{k}"));
            (key, message)
        })?;
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return Err(("log.format".into(), "must be `text` or `json`".into()));
        }
        if !self.delivery.helo_name.is_empty()
            && !smtp_proto::command::is_domain_or_literal(&self.delivery.helo_name)
        {
            return Err((
                "delivery.helo_name".into(),
                "not a valid domain name".into(),
            ));
        }
        crate::delivery::policy::validate(&self.delivery, &self.routes, &self.dns)?;
        self.admin.validate()?;
        Ok(())
    }

    /// Number of shards to run.
    pub fn shard_count(&self) -> usize {
        if self.server.shards > 0 {
            self.server.shards
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }

    /// The spool configuration of shard `shard`.
    pub fn spool_config(&self, shard: u16) -> Result<spool::SpoolConfig, spool::SpoolError> {
        let dir = self.spool.dir.join(format!("shard-{shard}"));
        let bad = |m: String| spool::SpoolError::Config(m);
        let log = spool::LogConfig {
            dir: dir.clone(),
            shard,
            segment_bytes: self.spool.segment_bytes,
            sync: parse_sync(&self.spool.sync).map_err(bad)?,
            append_method: parse_method(&self.spool.append_method).map_err(bad)?,
            pending_bytes_max: self.spool.pending_bytes_max,
            outcome_commit_delay: Duration::from_millis(self.spool.outcome_commit_delay_ms),
            commit_gather: Duration::from_micros(self.spool.commit_gather_us),
            disk: spool::disk::real(),
        };
        let config = spool::SpoolConfig {
            log,
            compact_age: Duration::from_secs(self.spool.compact_age_secs),
        };
        config.validate()?;
        Ok(config)
    }

    /// True when `ip` may relay without authentication.
    /// True when authenticated `user` may send as `from`: users listed in
    /// `auth.sender_domains` only from those domains (or their subdomains); others from any.
    /// The null sender is a bounce and never a user's to send.
    pub fn sender_allowed(&self, user: &str, from: &str) -> bool {
        match self.auth.sender_domains.get(user) {
            Some(domains) if domains.is_empty() => false,
            Some(domains) => crate::tenant::domain_allowed(domains, from),
            None => true,
        }
    }

    pub fn may_relay(&self, ip: IpAddr) -> bool {
        self.relay.networks.iter().any(|n| n.contains(ip))
    }
}

fn parse_sync(s: &str) -> Result<spool::SyncPolicy, String> {
    match s {
        "every-commit" => Ok(spool::SyncPolicy::EveryCommit),
        "none" => Ok(spool::SyncPolicy::None),
        other => other
            .strip_prefix("interval-")
            .and_then(|v| v.strip_suffix("ms"))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|ms| spool::SyncPolicy::Interval(Duration::from_millis(ms)))
            .ok_or_else(|| format!("`{other}`: expected every-commit, interval-<N>ms or none")),
    }
}

fn parse_method(s: &str) -> Result<spool::AppendMethod, String> {
    match s {
        "pwrite" => Ok(spool::AppendMethod::Pwrite),
        "mmap-msync" => Ok(spool::AppendMethod::MmapMsync),
        other => Err(format!("`{other}`: expected pwrite or mmap-msync")),
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|&b| b == b'\n')
        .count()
        + 1
}

/// The key name on `line` (for parse errors whose message does not quote it).
fn key_at(text: &str, line: usize) -> String {
    text.lines()
        .nth(line.saturating_sub(1))
        .and_then(|l| l.split('=').next())
        .map(|k| k.trim().to_string())
        .filter(|k| !k.is_empty())
        .unwrap_or_else(|| "-".into())
}

/// Line of the first `key = ...` for the last component of a dotted key (0 if absent: the
/// value came from a default).
fn find_key_line(text: &str, dotted: &str) -> usize {
    let last = dotted.rsplit('.').next().unwrap_or(dotted);
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            l.strip_prefix(last)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
                || l.trim_start_matches('[').starts_with(last)
        })
        .map_or(0, |i| i + 1)
}

/// `[admin]`: the local HTTP endpoint of `saida queue`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Listen address; empty = no endpoint.
    pub address: String,
    /// Bearer token required for every request but `/metrics`, `/healthz` and `/readyz`;
    /// empty = the token in `token_file`, generated at first start.
    pub token: String,
    /// Where the generated token is kept (mode 0600); empty = `<spool.dir>/admin.token`.
    pub token_file: String,
    /// Record metrics (counters, histograms). Off: `/metrics` shows zeros; for measuring the
    /// cost of recording.
    pub metrics: bool,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            address: "127.0.0.1:8025".into(),
            token: String::new(),
            token_file: String::new(),
            metrics: true,
        }
    }
}

/// Shortest configured token accepted.
pub const TOKEN_CHARS_MIN: usize = 16;

impl AdminConfig {
    /// Checks the address, and that a configured token is long enough.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if !self.token.is_empty() && self.token.len() < TOKEN_CHARS_MIN {
            return Err((
                "admin.token".into(),
                format!("a token needs {TOKEN_CHARS_MIN} characters or more"),
            ));
        }
        if self.address.is_empty() {
            return Ok(());
        }
        self.address
            .parse::<std::net::SocketAddr>()
            .map_err(|_| ("admin.address".to_string(), "not ip:port".to_string()))?;
        Ok(())
    }

    /// The file holding the generated token.
    pub fn token_path(&self, spool_dir: &std::path::Path) -> std::path::PathBuf {
        if self.token_file.is_empty() {
            spool_dir.join("admin.token")
        } else {
            self.token_file.clone().into()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("saida.toml"))
    }

    #[test]
    fn defaults_are_valid_and_loopback_only() {
        let c = Config::default();
        c.validate().unwrap();
        assert_eq!(c.listeners[0].address, "127.0.0.1:2525".parse().unwrap());
        assert!(c.may_relay("127.0.0.1".parse().unwrap()));
        assert!(c.may_relay("::1".parse().unwrap()));
        assert!(!c.may_relay("192.0.2.1".parse().unwrap()));
    }

    #[test]
    fn empty_relay_networks_deny_everyone() {
        let c = parse("[relay]\nnetworks = []\n").unwrap();
        assert!(!c.may_relay("127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let e = parse("[smtp]\ncommand_line_bytes_max = 512\nbogus = 1\n").unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (3, "bogus"), "{e}");
        assert!(e.to_string().starts_with("saida.toml:3: bogus:"), "{e}");
    }

    #[test]
    fn out_of_bound_value_names_key_and_line() {
        let e = parse("[server]\nshards = 1\n\n[smtp]\nmessage_bytes_max = 1\n").unwrap_err();
        assert_eq!(
            (e.line, e.key.as_str()),
            (5, "smtp.message_bytes_max"),
            "{e}"
        );
    }

    #[test]
    fn wrong_type_names_the_line() {
        let e = parse("[smtp]\nrcpt_per_message_max = \"many\"\n").unwrap_err();
        assert_eq!(e.line, 2, "{e}");
    }

    #[test]
    fn bad_sync_policy_is_refused() {
        let e = parse("[spool]\nsync = \"sometimes\"\n").unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (2, "spool.sync"), "{e}");
        let c = parse("[spool]\nsync = \"interval-20ms\"\n").unwrap();
        assert_eq!(c.spool.sync, "interval-20ms");
    }

    #[test]
    fn implicit_tls_needs_a_certificate() {
        let e =
            parse("[[listener]]\naddress = \"127.0.0.1:4650\"\ntls = \"implicit\"\n").unwrap_err();
        assert_eq!(e.key, "listener.tls", "{e}");
    }

    #[test]
    fn open_relay_networks_are_refused() {
        let e = parse("[relay]\nnetworks = [\"10.0.0.0/8\", \"0.0.0.0/0\"]\n").unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (2, "relay.networks"), "{e}");
    }

    #[test]
    fn cidr_matching() {
        let net: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(net.contains("10.1.200.3".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.0.9".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
    }

    #[test]
    fn relay_networks_that_make_an_open_relay_are_refused() {
        let nets =
            |list: &[&str]| -> Vec<Cidr> { list.iter().map(|n| n.parse().unwrap()).collect() };
        assert!(relay_networks_bounded(&nets(&["10.0.0.0/8", "127.0.0.0/8", "::1/128"])).is_ok());
        assert!(
            relay_networks_bounded(&nets(&["0.0.0.0/7"])).is_err(),
            "shorter than /8"
        );
        assert!(relay_networks_bounded(&nets(&["::/0"])).is_err());
        let halves: Vec<String> = (0..128).map(|i| format!("{i}.0.0.0/8")).collect();
        let halves: Vec<&str> = halves.iter().map(String::as_str).collect();
        assert!(
            relay_networks_bounded(&nets(&halves)).is_err(),
            "half the space"
        );
        assert!(relay_networks_bounded(&nets(&halves[..127])).is_ok());
        let mut c = Config::default();
        c.relay.networks = nets(&["0.0.0.0/1", "128.0.0.0/1"]);
        assert_eq!(c.validate().unwrap_err().0, "relay.networks");
    }

    #[test]
    fn bound_users_send_only_from_their_domains() {
        let mut c = Config::default();
        c.auth
            .sender_domains
            .insert("alice".into(), vec!["origin.test".into()]);
        assert!(c.sender_allowed("alice", "a@origin.test"));
        assert!(c.sender_allowed("alice", "a@Mail.Origin.Test"));
        assert!(!c.sender_allowed("alice", "a@evilorigin.test"));
        assert!(!c.sender_allowed("alice", ""));
        assert!(
            c.sender_allowed("bob", "anyone@anywhere.test"),
            "unbound user"
        );
    }
}
