//! Metrics, declared in one place ([`COUNTERS`], [`HISTOGRAMS`], [`GAUGES`]) and exported in the
//! Prometheus text format on `GET /metrics` of the admin endpoint (via the `prometheus` crate's
//! encoder). docs/metrics.md is generated from the declarations (`saida metrics-doc`); a test
//! fails when it is stale.
//!
//! Counters are process-wide atomics. Latency histograms are recorded per shard in
//! `hdrhistogram` (a mutex each, contended only by a scrape) and merged at scrape time into
//! Prometheus histograms with the explicit buckets of [`LATENCY_BUCKETS`]; `_sum` is the HDR
//! mean times the count (HDR keeps 3 significant digits). Label sets are bounded: `outcome`
//! (3 values), `reason` (a fixed list), `backend` (2 values), and `destination` / `tenant`
//! (the [`TOP_LABELS`] biggest by volume, the rest folded into `other`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use hdrhistogram::Histogram;
use prometheus::proto::{self, MetricFamily, MetricType};

use crate::mesh::RouterStats;

/// Bucket upper bounds, in seconds, of every latency histogram: 0.5 ms to 1 day.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0, 1800.0, 3600.0, 21_600.0, 86_400.0,
];

/// Counters. Each has a name (without `saida_` and `_total`) and help text in [`COUNTERS`].
#[derive(Clone, Copy, Debug)]
pub enum Counter {
    ConnectionsIn,
    ConnectionsRefused,
    MessagesAccepted,
    RecipientsAccepted,
    BytesIn,
    RejectedSpool,
    RejectedQueueFull,
    InflightRefused,
    TenantQuota,
    AuthFailures,
    RelayRefused,
    DeliveryAttempts,
    BytesOut,
    Bounces,
    MessagesRehomed,
}

/// A counter's exposition: (counter, name, label, help).
pub type CounterSpec = (
    Counter,
    &'static str,
    Option<(&'static str, &'static str)>,
    &'static str,
);

/// Every counter, in exposition order.
pub const COUNTERS: &[CounterSpec] = &[
    (
        Counter::ConnectionsIn,
        "smtp_connections",
        None,
        "SMTP connections accepted",
    ),
    (
        Counter::ConnectionsRefused,
        "smtp_connections_refused",
        None,
        "SMTP connections refused by a connection limit (421)",
    ),
    (
        Counter::MessagesAccepted,
        "messages_accepted",
        None,
        "Messages accepted (250 after commit)",
    ),
    (
        Counter::RecipientsAccepted,
        "recipients_accepted",
        None,
        "Recipients of accepted messages",
    ),
    (
        Counter::BytesIn,
        "bytes_in",
        None,
        "Bytes of accepted messages",
    ),
    (
        Counter::RejectedSpool,
        "messages_rejected",
        Some(("reason", "spool")),
        "Messages refused at the end of data, by reason",
    ),
    (
        Counter::RejectedQueueFull,
        "messages_rejected",
        Some(("reason", "queue_full")),
        "Messages refused at the end of data, by reason",
    ),
    (
        Counter::InflightRefused,
        "messages_rejected",
        Some(("reason", "memory")),
        "Messages refused at the end of data, by reason",
    ),
    (
        Counter::TenantQuota,
        "messages_rejected",
        Some(("reason", "tenant_quota")),
        "Messages refused at the end of data, by reason",
    ),
    (
        Counter::AuthFailures,
        "auth_failures",
        None,
        "Failed AUTH attempts",
    ),
    (
        Counter::RelayRefused,
        "relay_refused",
        None,
        "Recipients refused as relay attempts",
    ),
    (
        Counter::DeliveryAttempts,
        "delivery_attempts",
        None,
        "Recipients attempted (one per recipient per attempt)",
    ),
    (
        Counter::BytesOut,
        "bytes_out",
        None,
        "Message bytes delivered (per transaction)",
    ),
    (Counter::Bounces, "bounces", None, "Bounces (DSNs) queued"),
    (
        Counter::MessagesRehomed,
        "spool_messages_rehomed",
        None,
        "Live messages compaction copied out of an old segment so that it could be deleted",
    ),
];

/// Latency histograms, recorded per shard.
#[derive(Clone, Copy, Debug)]
pub enum Hist {
    Ack,
    DnsLookup,
    Connect,
    Transaction,
    QueueWait,
    EndToEnd,
    Banner,
    Ehlo,
    TlsHandshake,
    Mail,
    Rcpt,
    Data,
    EndOfData,
    SpoolCommit,
    DkimSign,
}

/// (histogram, name, help); exported as `saida_<name>_seconds`.
pub const HISTOGRAMS: &[(Hist, &str, &str)] = &[
    (
        Hist::Ack,
        "ack_latency",
        "End of data to the 250 (includes the spool commit)",
    ),
    (
        Hist::DnsLookup,
        "dns_lookup",
        "MX resolution of a destination (cached answers included)",
    ),
    (
        Hist::Connect,
        "connect",
        "Outbound connection set-up: TCP connect, greeting, EHLO and STARTTLS",
    ),
    (
        Hist::Transaction,
        "transaction",
        "One outbound transaction: envelope, content, replies",
    ),
    (
        Hist::QueueWait,
        "queue_wait",
        "Receipt to the first delivery attempt of a recipient",
    ),
    (
        Hist::EndToEnd,
        "end_to_end",
        "Receipt to delivery (2xx) of a recipient",
    ),
    (
        Hist::Banner,
        "smtp_banner",
        "Outbound: TCP connected to the greeting",
    ),
    (
        Hist::Ehlo,
        "smtp_ehlo",
        "Outbound: EHLO (HELO) to its reply",
    ),
    (
        Hist::TlsHandshake,
        "tls_handshake",
        "Outbound: STARTTLS handshake",
    ),
    (
        Hist::Mail,
        "smtp_mail",
        "Outbound: envelope written to the MAIL reply (one-write transactions: the whole write)",
    ),
    (
        Hist::Rcpt,
        "smtp_rcpt",
        "Outbound: envelope written to the last RCPT reply",
    ),
    (
        Hist::Data,
        "smtp_data",
        "Outbound: DATA to its 354 (classic DATA transactions)",
    ),
    (
        Hist::EndOfData,
        "smtp_end_of_data",
        "Outbound: content written to the final reply",
    ),
    (
        Hist::SpoolCommit,
        "spool_commit",
        "A message's append to its commit (group commit wait, write and fdatasync)",
    ),
    (
        Hist::DkimSign,
        "dkim_sign",
        "DKIM signing of one accepted message (every signature it gets)",
    ),
];

/// Gauges computed at scrape time: (name, help).
pub const GAUGES: &[(&str, &str)] = &[
    (
        "queued_recipients",
        "Recipients queued in memory for delivery, all shards",
    ),
    (
        "delivery_connections",
        "Outbound connection workers running, all shards",
    ),
    (
        "spool_bytes",
        "Bytes of spool segment files on disk, all shards",
    ),
    (
        "spool_segments",
        "Spool segment files holding records, all shards",
    ),
    (
        "spool_live_messages",
        "Messages with recipients still to deliver, all shards",
    ),
    (
        "oldest_message_age_seconds",
        "Age of the oldest message with recipients still to deliver",
    ),
    (
        "backend_info",
        "1 for the I/O backend the shards run on (label `backend`)",
    ),
];

/// One shard's delivery queues, for the gauges.
#[derive(Clone, Debug, Default)]
pub struct QueueSnapshot {
    /// Recipients in ready jobs, in deferred jobs, and in suspended domains.
    pub ready_rcpts: u64,
    pub deferred_rcpts: u64,
    pub suspended_rcpts: u64,
    /// Per domain, the biggest [`TOP_LABELS`] by queued recipients: (domain, queued
    /// recipients, open connections); `other_*` sums the rest.
    pub top: Vec<(String, u64, u64)>,
    pub other_rcpts: u64,
    pub other_connections: u64,
}

/// Tenant label values allowed besides `none` and `unlisted`: messages injected over HTTP.
const TENANT_LABELS: &[&str] = &["api"];

const BOUNCE_CLASS_HELP: &str = "Recipients deferred or failed, by what the reply means \
     (bad_mailbox, bad_domain, mailbox_full, policy, content, rate_limited, routing, protocol, \
     other)";
const BACKOFF_MATCH_HELP: &str = "Failure replies that matched an adaptive backoff rule, by rule";
const BACKOFF_PATHS_HELP: &str = "(source, provider) paths in backoff now: suspended, or \
     throttled (limits cut, ramping back)";
const TENANT_QUEUE_HELP: &str =
    "Recipients queued per configured tenant (its queue quota counts these)";
const TENANT_SUSPENDED_HELP: &str = "1 while an operator has suspended the tenant's delivery";

/// Label values exported per destination and per tenant; the rest is summed as `other`.
pub const TOP_LABELS: usize = 20;
/// Keys tracked per table; beyond it the smallest count is folded into `other` to make room.
pub const TRACKED_KEYS_MAX: usize = 10_000;
const DEST_HELP: &str = "Recipient outcomes by destination domain (top 20 by volume, rest `other`)";
const TENANT_HELP: &str = "Recipient outcomes by tenant (top 20 by volume, rest `other`)";
const SOURCE_HELP: &str =
    "Recipient outcomes by egress source (`[[source]]` name; `none` without a pool)";

/// Counts per key with a bound on keys; exports the biggest and folds the rest.
#[derive(Default)]
pub struct TopCounts {
    counts: std::collections::HashMap<String, [u64; 3]>,
    /// Counts of keys evicted to respect the bound, and of keys below the top N.
    other: [u64; 3],
}

impl TopCounts {
    fn add(&mut self, key: &str, c: [u64; 3]) {
        if let Some(v) = self.counts.get_mut(key) {
            for i in 0..3 {
                v[i] += c[i];
            }
            return;
        }
        if self.counts.len() >= TRACKED_KEYS_MAX {
            // Fold the smallest key into `other` (O(n), only when a new key arrives at the bound).
            let smallest = self
                .counts
                .iter()
                .min_by_key(|(_, v)| v.iter().sum::<u64>())
                .map(|(k, _)| k.clone());
            if let Some(k) = smallest.and_then(|k| self.counts.remove_entry(&k)) {
                for i in 0..3 {
                    self.other[i] += k.1[i];
                }
            }
        }
        self.counts.insert(key.to_string(), c);
    }

    /// The `n` biggest keys, then `other` (everything else, evicted keys included). Counters
    /// stay monotonic per label as long as the top set is stable; a key entering or leaving the
    /// top moves its counts between its own label and `other`.
    fn top(&self, n: usize) -> Vec<(String, [u64; 3])> {
        let mut all: Vec<(&String, &[u64; 3])> = self.counts.iter().collect();
        all.sort_by(|a, b| {
            b.1.iter()
                .sum::<u64>()
                .cmp(&a.1.iter().sum::<u64>())
                .then(a.0.cmp(b.0))
        });
        let mut other = self.other;
        let mut out = Vec::new();
        for (i, (k, v)) in all.into_iter().enumerate() {
            if i < n {
                out.push((k.clone(), *v));
            } else {
                for j in 0..3 {
                    other[j] += v[j];
                }
            }
        }
        out.push(("other".to_string(), other));
        out
    }
}

const QUEUE_STATE_HELP: &str =
    "Recipients queued for delivery, by state (ready, deferred, suspended)";
const DEST_QUEUE_HELP: &str =
    "Recipients queued per destination (top 20 by queue size, rest `other`)";
const DEST_CONN_HELP: &str =
    "Open outbound connections per destination (top 20 by queue size, rest `other`)";
/// (index in the per-shard spool figures, name, help).
const SPOOL_COUNTERS: &[(usize, &str, &str)] = &[
    (
        3,
        "spool_commits_total",
        "Group commits (one fdatasync batch each), all shards",
    ),
    (
        4,
        "spool_records_total",
        "Records covered by group commits; batch size = rate of this / rate of commits",
    ),
    (5, "spool_syncs_total", "fdatasync calls, all shards"),
];

/// Outcome counters come from the spool shards' commits (`RouterStats`).
const OUTCOMES_HELP: &str = "Recipient outcomes journaled in the spool, by outcome";
/// Back-pressure between shards (`RouterStats`).
const INBOX_WAITS_HELP: &str =
    "Hand-offs and outcomes that found a shard's inbox full and waited for room (never dropped)";

/// Everything a scrape reads.
pub struct Metrics {
    /// `[admin] metrics = false` turns recording off (the scrape then shows zeros).
    enabled: bool,
    counters: Vec<AtomicU64>,
    /// Outcomes per destination domain and per tenant, exported for the top
    /// [`TOP_LABELS`] by volume, the rest folded into `other`.
    by_destination: Mutex<TopCounts>,
    by_tenant: Mutex<TopCounts>,
    by_source: Mutex<TopCounts>,
    /// Recipient outcomes that were not deliveries, by bounce class: `[class][deferred, failed]`.
    by_class: Vec<[AtomicU64; 2]>,
    /// `[shard][hist]`.
    hists: Vec<Vec<Mutex<Histogram<u64>>>>,
    /// Per shard: its spool's figures and health, read live at every scrape (set once the spool
    /// is open).
    spools: Vec<std::sync::OnceLock<spool::SpoolWatch>>,
    /// Per shard: the receipt time of its oldest live message (a scan, every 10 s).
    oldest: Vec<AtomicU64>,
    /// Per shard: the delivery queues (updated once a second).
    queues: Vec<Mutex<QueueSnapshot>>,
    /// Set once every shard serves; cleared at shutdown (`/readyz`).
    pub ready: AtomicBool,
    /// `io_uring` or `epoll`.
    pub backend: Mutex<String>,
    /// Configured tenants: their names are the only tenant label values besides the fixed
    /// ones, and their queued recipients are gauges.
    tenants: Arc<crate::tenant::Tenants>,
    /// Backoff rule matches by rule name (rules are configured or shipped: bounded).
    by_backoff_rule: Mutex<std::collections::BTreeMap<String, u64>>,
    /// The paths, for the backoff gauges.
    providers: Arc<crate::delivery::provider::Providers>,
}

fn new_hist() -> Histogram<u64> {
    // 1 µs ..= 1 day, 3 significant digits: valid constant bounds.
    Histogram::new_with_bounds(1, 86_400_000_000, 3).unwrap_or_else(|_| Histogram::new(3).unwrap())
}

impl Metrics {
    #[cfg(test)]
    pub fn new(shards: usize) -> Metrics {
        Metrics::with_recording(shards, true)
    }

    /// Metrics that record only when `enabled`.
    pub fn with_recording(shards: usize, enabled: bool) -> Metrics {
        Metrics {
            enabled,
            by_destination: Mutex::default(),
            by_tenant: Mutex::default(),
            by_source: Mutex::default(),
            by_class: crate::delivery::bounce_class::BounceClass::ALL
                .iter()
                .map(|_| [AtomicU64::new(0), AtomicU64::new(0)])
                .collect(),
            counters: COUNTERS.iter().map(|_| AtomicU64::new(0)).collect(),
            hists: (0..shards)
                .map(|_| HISTOGRAMS.iter().map(|_| Mutex::new(new_hist())).collect())
                .collect(),
            spools: (0..shards).map(|_| Default::default()).collect(),
            oldest: (0..shards).map(|_| AtomicU64::new(0)).collect(),
            queues: (0..shards).map(|_| Mutex::default()).collect(),
            ready: AtomicBool::new(false),
            backend: Mutex::new(String::new()),
            tenants: Arc::default(),
            by_backoff_rule: Mutex::default(),
            providers: Arc::default(),
        }
    }

    /// The providers' paths: how many are in backoff becomes a gauge.
    pub fn with_providers(
        mut self,
        providers: Arc<crate::delivery::provider::Providers>,
    ) -> Metrics {
        self.providers = providers;
        self
    }

    /// Counts a reply that matched the backoff rule `rule`.
    pub fn backoff_match(&self, rule: &str) {
        if self.enabled {
            let mut m = self
                .by_backoff_rule
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            match m.get_mut(rule) {
                Some(n) => *n += 1,
                None => {
                    m.insert(rule.to_string(), 1);
                }
            }
        }
    }

    /// The configured tenants' names become label values of the tenant metrics.
    pub fn with_tenants(mut self, tenants: Arc<crate::tenant::Tenants>) -> Metrics {
        self.tenants = tenants;
        self
    }

    pub fn inc(&self, c: Counter, n: u64) {
        if self.enabled {
            self.counters[c as usize].fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Counts recipient outcomes (index 0 delivered, 1 deferred, 2 failed) for a destination
    /// domain, a tenant and the egress source of the attempt.
    pub fn outcomes(&self, domain: &str, tenant: &str, source: Option<&str>, counts: [u64; 3]) {
        if !self.enabled || counts == [0; 3] {
            return;
        }
        // Only configured tenant names become label values: a message's tenant field may hold
        // an AUTH user name, which is neither bounded nor for publishing.
        let tenant = match tenant {
            "" => "none",
            t if TENANT_LABELS.contains(&t) || self.tenants.named(t).is_some() => t,
            _ => "unlisted",
        };
        let source = source.unwrap_or("none");
        for (table, key) in [
            (&self.by_destination, domain),
            (&self.by_tenant, tenant),
            (&self.by_source, source),
        ] {
            let key = if key.is_empty() { "none" } else { key };
            table
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .add(key, counts);
        }
    }

    /// Counts one deferred or failed recipient by what its reply means.
    pub fn bounce_class(&self, class: crate::delivery::bounce_class::BounceClass, failed: bool) {
        if self.enabled {
            self.by_class[class as usize][usize::from(failed)].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records a latency in microseconds on `shard`'s histogram.
    pub fn record(&self, shard: u16, h: Hist, micros: u64) {
        if !self.enabled {
            return;
        }
        if let Some(m) = self
            .hists
            .get(shard as usize)
            .and_then(|s| s.get(h as usize))
        {
            m.lock()
                .unwrap_or_else(|p| p.into_inner())
                .saturating_record(micros.max(1));
        }
    }

    /// Registers a shard's spool, read at every scrape from then on.
    pub fn watch_spool(&self, shard: u16, watch: spool::SpoolWatch) {
        if let Some(slot) = self.spools.get(shard as usize) {
            let _ = slot.set(watch);
        }
    }

    /// Publishes the receipt time of a shard's oldest live message (0: none).
    pub fn set_oldest(&self, shard: u16, received_at_micros: u64) {
        if let Some(slot) = self.oldest.get(shard as usize) {
            slot.store(received_at_micros, Ordering::Relaxed);
        }
    }

    /// Spools that cannot commit now: (shard, why). `/readyz` fails while any is listed.
    pub fn unhealthy_spools(&self) -> Vec<(usize, String)> {
        self.spools
            .iter()
            .enumerate()
            .filter_map(|(i, w)| Some((i, w.get()?.unhealthy()?)))
            .collect()
    }

    /// Per shard: bytes on disk, segments, live messages, commits, records, syncs (live).
    fn spool_figures(&self) -> Vec<[u64; 6]> {
        self.spools
            .iter()
            .filter_map(|w| w.get())
            .map(|w| {
                let (u, l) = (w.usage(), w.log_stats());
                [
                    u.bytes_on_disk,
                    u.segments,
                    u.live_messages,
                    l.commits,
                    l.records,
                    l.syncs,
                ]
            })
            .collect()
    }

    /// Publishes a shard's delivery queues.
    pub fn set_queues(&self, shard: u16, snapshot: QueueSnapshot) {
        if let Some(q) = self.queues.get(shard as usize) {
            *q.lock().unwrap_or_else(|p| p.into_inner()) = snapshot;
        }
    }

    /// The whole exposition, in the Prometheus text format.
    pub fn render(&self, stats: &RouterStats) -> String {
        let mut families: Vec<MetricFamily> = Vec::new();
        for (i, (_, name, label, help)) in COUNTERS.iter().enumerate() {
            let v = self.counters[i].load(Ordering::Relaxed) as f64;
            let full = format!("saida_{name}_total");
            let labels: Vec<(&str, &str)> = label.iter().copied().collect();
            push(
                &mut families,
                &full,
                help,
                MetricType::COUNTER,
                counter(v, &labels),
            );
        }
        for (outcome, v) in [
            ("delivered", &stats.delivered),
            ("deferred", &stats.deferred),
            ("failed", &stats.failed),
        ] {
            let m = counter(v.load(Ordering::Relaxed) as f64, &[("outcome", outcome)]);
            push(
                &mut families,
                "saida_delivery_outcomes_total",
                OUTCOMES_HELP,
                MetricType::COUNTER,
                m,
            );
        }
        let waits = stats.inbox_full_waits.load(Ordering::Relaxed) as f64;
        push(
            &mut families,
            "saida_shard_inbox_full_waits_total",
            INBOX_WAITS_HELP,
            MetricType::COUNTER,
            counter(waits, &[]),
        );
        let figures = self.spool_figures();
        let sum = |k: usize| -> f64 { figures.iter().map(|s| s[k] as f64).sum() };
        let gauges = [
            stats.queued_rcpts.load(Ordering::Relaxed) as f64,
            stats.workers.load(Ordering::Relaxed) as f64,
            sum(0),
            sum(1),
            sum(2),
        ];
        let oldest = self
            .oldest
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .filter(|t| *t > 0)
            .min();
        let now = spool::now_micros();
        let gauges = [
            gauges[0],
            gauges[1],
            gauges[2],
            gauges[3],
            gauges[4],
            oldest.map_or(0.0, |t| now.saturating_sub(t) as f64 / 1e6),
        ];
        for ((name, help), v) in GAUGES.iter().zip(gauges) {
            push(
                &mut families,
                &format!("saida_{name}"),
                help,
                MetricType::GAUGE,
                gauge(v, &[]),
            );
        }
        let backend = self
            .backend
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some((name, help)) = GAUGES.last() {
            push(
                &mut families,
                &format!("saida_{name}"),
                help,
                MetricType::GAUGE,
                gauge(1.0, &[("backend", &backend)]),
            );
        }
        let snaps: Vec<QueueSnapshot> = self
            .queues
            .iter()
            .map(|q| q.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .collect();
        for (state, v) in [
            ("ready", snaps.iter().map(|s| s.ready_rcpts).sum::<u64>()),
            ("deferred", snaps.iter().map(|s| s.deferred_rcpts).sum()),
            ("suspended", snaps.iter().map(|s| s.suspended_rcpts).sum()),
        ] {
            let m = gauge(v as f64, &[("state", state)]);
            let name = "saida_queue_recipients";
            push(&mut families, name, QUEUE_STATE_HELP, MetricType::GAUGE, m);
        }
        let mut per_domain: Vec<(String, u64, u64)> =
            snaps.iter().flat_map(|s| s.top.iter().cloned()).collect();
        per_domain.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let (mut other_q, mut other_c) = (0, 0);
        for s in &snaps {
            other_q += s.other_rcpts;
            other_c += s.other_connections;
        }
        let mut rows = Vec::new();
        for (i, (d, q, c)) in per_domain.into_iter().enumerate() {
            if i < TOP_LABELS {
                rows.push((d, q, c));
            } else {
                other_q += q;
                other_c += c;
            }
        }
        rows.push(("other".into(), other_q, other_c));
        for (d, q, c) in rows {
            let label = [("destination", d.as_str())];
            let (qn, cn) = (
                "saida_destination_queued_recipients",
                "saida_destination_connections",
            );
            let mq = gauge(q as f64, &label);
            push(&mut families, qn, DEST_QUEUE_HELP, MetricType::GAUGE, mq);
            let mc = gauge(c as f64, &label);
            push(&mut families, cn, DEST_CONN_HELP, MetricType::GAUGE, mc);
        }
        for (k, name, help) in SPOOL_COUNTERS {
            let full = format!("saida_{name}");
            push(
                &mut families,
                &full,
                help,
                MetricType::COUNTER,
                counter(sum(*k), &[]),
            );
        }
        for (table, label, name, help) in [
            (
                &self.by_destination,
                "destination",
                "destination_outcomes_total",
                DEST_HELP,
            ),
            (
                &self.by_tenant,
                "tenant",
                "tenant_outcomes_total",
                TENANT_HELP,
            ),
            (
                &self.by_source,
                "source",
                "source_outcomes_total",
                SOURCE_HELP,
            ),
        ] {
            let rows = table
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .top(TOP_LABELS);
            for (key, counts) in rows {
                for (i, outcome) in ["delivered", "deferred", "failed"].iter().enumerate() {
                    let m = counter(counts[i] as f64, &[(label, &key), ("outcome", outcome)]);
                    push(
                        &mut families,
                        &format!("saida_{name}"),
                        help,
                        MetricType::COUNTER,
                        m,
                    );
                }
            }
        }
        for (i, class) in crate::delivery::bounce_class::BounceClass::ALL
            .iter()
            .enumerate()
        {
            for (j, outcome) in ["deferred", "failed"].iter().enumerate() {
                let v = self.by_class[i][j].load(Ordering::Relaxed) as f64;
                let m = counter(v, &[("class", class.as_str()), ("outcome", outcome)]);
                let name = "saida_bounce_class_total";
                push(
                    &mut families,
                    name,
                    BOUNCE_CLASS_HELP,
                    MetricType::COUNTER,
                    m,
                );
            }
        }
        let rules = self
            .by_backoff_rule
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for (rule, n) in rules {
            let m = counter(n as f64, &[("rule", &rule)]);
            let name = "saida_backoff_matches_total";
            push(
                &mut families,
                name,
                BACKOFF_MATCH_HELP,
                MetricType::COUNTER,
                m,
            );
        }
        let now = spool::now_micros();
        let backoffs = self.providers.backoffs();
        let suspended = backoffs.iter().filter(|b| b.backoff.suspended(now)).count();
        for (state, n) in [
            ("suspended", suspended),
            ("throttled", backoffs.len() - suspended),
        ] {
            let m = gauge(n as f64, &[("state", state)]);
            push(
                &mut families,
                "saida_backoff_paths",
                BACKOFF_PATHS_HELP,
                MetricType::GAUGE,
                m,
            );
        }
        for t in self.tenants.all() {
            let label = [("tenant", t.name())];
            let queued = gauge(t.queued_rcpts() as f64, &label);
            let name = "saida_tenant_queued_recipients";
            push(
                &mut families,
                name,
                TENANT_QUEUE_HELP,
                MetricType::GAUGE,
                queued,
            );
            let suspended = gauge(f64::from(u8::from(t.suspended())), &label);
            let name = "saida_tenant_suspended";
            push(
                &mut families,
                name,
                TENANT_SUSPENDED_HELP,
                MetricType::GAUGE,
                suspended,
            );
        }
        for (i, (_, name, help)) in HISTOGRAMS.iter().enumerate() {
            let mut merged = new_hist();
            for shard in &self.hists {
                let h = shard[i].lock().unwrap_or_else(|p| p.into_inner());
                let _ = merged.add(&*h);
            }
            let full = format!("saida_{name}_seconds");
            push(
                &mut families,
                &full,
                help,
                MetricType::HISTOGRAM,
                histogram(&merged),
            );
        }
        let mut out = Vec::new();
        let encoder = prometheus::TextEncoder::new();
        if let Err(e) = prometheus::Encoder::encode(&encoder, &families, &mut out) {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// Adds a metric to its family (created on first use, families keep declaration order).
fn push(families: &mut Vec<MetricFamily>, name: &str, help: &str, t: MetricType, m: proto::Metric) {
    if let Some(f) = families.iter_mut().find(|f| f.name() == name) {
        f.mut_metric().push(m);
        return;
    }
    let mut f = MetricFamily::default();
    f.set_name(name.to_string());
    f.set_help(help.to_string());
    f.set_field_type(t);
    f.mut_metric().push(m);
    families.push(f);
}

fn labels(pairs: &[(&str, &str)]) -> Vec<proto::LabelPair> {
    pairs
        .iter()
        .map(|(k, v)| {
            let mut l = proto::LabelPair::default();
            l.set_name(k.to_string());
            l.set_value(v.to_string());
            l
        })
        .collect()
}

fn counter(v: f64, pairs: &[(&str, &str)]) -> proto::Metric {
    let mut c = proto::Counter::default();
    c.set_value(v);
    let mut m = proto::Metric::default();
    m.set_label(labels(pairs));
    m.set_counter(c);
    m
}

fn gauge(v: f64, pairs: &[(&str, &str)]) -> proto::Metric {
    let mut g = proto::Gauge::default();
    g.set_value(v);
    let mut m = proto::Metric::default();
    m.set_label(labels(pairs));
    m.set_gauge(g);
    m
}

/// A Prometheus histogram (seconds) from an HDR histogram (microseconds).
fn histogram(h: &Histogram<u64>) -> proto::Metric {
    let buckets: Vec<proto::Bucket> = LATENCY_BUCKETS
        .iter()
        .map(|&bound| {
            let mut b = proto::Bucket::default();
            b.set_upper_bound(bound);
            let micros = (bound * 1e6) as u64;
            b.set_cumulative_count(if h.is_empty() {
                0
            } else {
                h.count_between(0, micros)
            });
            b
        })
        .collect();
    let mut p = proto::Histogram::default();
    p.set_sample_count(h.len());
    p.set_sample_sum(if h.is_empty() {
        0.0
    } else {
        h.mean() * h.len() as f64 / 1e6
    });
    p.set_bucket(buckets);
    let mut m = proto::Metric::default();
    m.set_histogram(p);
    m
}

/// docs/metrics.md, generated from the declarations.
pub fn docs_markdown() -> String {
    let mut s = String::from(
        "# Metrics\n\n*Generated by `saida metrics-doc` from `engine/src/metrics.rs`; a test fails \
         when this file is stale.*\n\nServed on `GET /metrics` of the admin endpoint (`[admin] \
         address`, default 127.0.0.1:8025), Prometheus text format. Label sets are bounded: \
         `outcome` (delivered, deferred, failed), `reason` (spool, queue_full), `backend` \
         (io_uring, epoll), `destination` and `tenant` (top 20 plus `other`).\n\n\
         | metric | type | labels | meaning |\n|---|---|---|---|\n",
    );
    let mut seen = Vec::new();
    for (_, name, label, help) in COUNTERS {
        let full = format!("saida_{name}_total");
        if seen.contains(&full) {
            continue;
        }
        seen.push(full.clone());
        let l = label.map_or(String::new(), |(k, _)| format!("`{k}`"));
        s.push_str(&format!("| `{full}` | counter | {l} | {help} |\n"));
    }
    s.push_str(&format!(
        "| `saida_delivery_outcomes_total` | counter | `outcome` | {OUTCOMES_HELP}; counted \
         when the outcome record is committed |\n"
    ));
    s.push_str(&format!(
        "| `saida_destination_outcomes_total` | counter | `destination`, `outcome` | {DEST_HELP}; \
         counted at the attempt |\n| `saida_tenant_outcomes_total` | counter | `tenant`, `outcome` \
         | {TENANT_HELP}; counted at the attempt |\n| `saida_source_outcomes_total` | counter | \
         `source`, `outcome` | {SOURCE_HELP}; counted at the attempt |\n"
    ));
    s.push_str(&format!(
        "| `saida_queue_recipients` | gauge | `state` | {QUEUE_STATE_HELP} |\n\
         | `saida_destination_queued_recipients` | gauge | `destination` | {DEST_QUEUE_HELP} |\n\
         | `saida_destination_connections` | gauge | `destination` | {DEST_CONN_HELP} |\n\
         | `saida_bounce_class_total` | counter | `class`, `outcome` | {BOUNCE_CLASS_HELP} |\n\
         | `saida_tenant_queued_recipients` | gauge | `tenant` | {TENANT_QUEUE_HELP} |\n\
         | `saida_tenant_suspended` | gauge | `tenant` | {TENANT_SUSPENDED_HELP} |\n\
         | `saida_backoff_matches_total` | counter | `rule` | {BACKOFF_MATCH_HELP} |\n\
         | `saida_backoff_paths` | gauge | `state` | {BACKOFF_PATHS_HELP} |\n"
    ));
    s.push_str(&format!(
        "| `saida_shard_inbox_full_waits_total` | counter | | {INBOX_WAITS_HELP} |\n"
    ));
    for (_, name, help) in SPOOL_COUNTERS {
        s.push_str(&format!("| `saida_{name}` | counter | | {help} |\n"));
    }
    for (name, help) in GAUGES {
        let l = if *name == "backend_info" {
            "`backend`"
        } else {
            ""
        };
        s.push_str(&format!("| `saida_{name}` | gauge | {l} | {help} |\n"));
    }
    for (_, name, help) in HISTOGRAMS {
        s.push_str(&format!(
            "| `saida_{name}_seconds` | histogram | | {help} |\n"
        ));
    }
    let bounds: Vec<String> = LATENCY_BUCKETS.iter().map(|b| b.to_string()).collect();
    s.push_str(&format!(
        "\nHistogram buckets (seconds): {}. Latencies are recorded per shard in HDR histograms \
         (1 µs to 1 day, 3 significant digits) and merged at scrape time; `_sum` is the HDR \
         mean times the count. `destination` and `tenant` labels: the {TOP_LABELS} biggest by \
         volume, \
         the rest in `other`; at most {TRACKED_KEYS_MAX} keys are tracked.\n",
        bounds.join(", ")
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `/readyz` reads this: a spool whose commit failed is listed until one succeeds again,
    /// and the scraped commit counter is current without any periodic task.
    #[test]
    fn a_spool_that_cannot_commit_is_reported_and_figures_are_live() {
        use spool::disk::{DiskOp, FaultyDisk};
        let dir = tempfile::tempdir().unwrap();
        let disk = FaultyDisk::new();
        let mut config = spool::SpoolConfig::new(dir.path());
        config.log.segment_bytes = 1 << 20;
        config.log.disk = disk.clone();
        let (mut spool, _) = spool::Spool::open(config).unwrap();
        let metrics = Metrics::new(1);
        metrics.watch_spool(0, spool.watch());
        let stats = RouterStats::default();
        let accept = |spool: &mut spool::Spool| {
            let queue_id = spool.next_queue_id(1);
            let m = spool::Message {
                queue_id,
                received_at_micros: 1,
                flags: 0,
                dsn_ret: spool::DsnRet::Unspecified,
                tenant: "",
                sender: "a@b.test",
                envid: "",
                recipients: vec![spool::Recipient::new("c@d.test")],
                body: b"hello",
            };
            let r = spool.accept(&m).and_then(|t| t.wait());
            if r.is_err() {
                spool.abandon(queue_id);
            }
            r
        };
        accept(&mut spool).unwrap();
        assert!(metrics.unhealthy_spools().is_empty());
        assert!(
            metrics
                .render(&stats)
                .contains("saida_spool_commits_total 1\n")
        );
        disk.fail_next(DiskOp::Sync, 0);
        assert!(accept(&mut spool).is_err());
        let bad = metrics.unhealthy_spools();
        assert_eq!(bad.len(), 1, "{bad:?}");
        assert!(bad[0].1.contains("fdatasync"), "{bad:?}");
        accept(&mut spool).unwrap();
        assert!(metrics.unhealthy_spools().is_empty());
    }

    #[test]
    fn docs_metrics_md_is_generated_from_the_declarations() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/metrics.md");
        let on_disk = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            on_disk == docs_markdown(),
            "docs/metrics.md is stale: run `saida metrics-doc > docs/metrics.md`"
        );
    }

    #[test]
    fn destinations_beyond_the_top_fold_into_other_and_keys_are_bounded() {
        let mut t = TopCounts::default();
        for i in 0..(TRACKED_KEYS_MAX + 5) {
            t.add(&format!("d{i}.test"), [1, 0, 0]);
        }
        t.add("big.test", [100, 5, 1]);
        assert!(t.counts.len() <= TRACKED_KEYS_MAX);
        let top = t.top(3);
        assert_eq!(top.len(), 4);
        assert_eq!(top[0], ("big.test".to_string(), [100, 5, 1]));
        let total: u64 = top.iter().map(|(_, c)| c.iter().sum::<u64>()).sum();
        assert_eq!(
            total,
            (TRACKED_KEYS_MAX + 5) as u64 + 106,
            "nothing is lost by folding"
        );
        assert_eq!(top[3].0, "other");
    }

    #[test]
    fn recording_can_be_switched_off() {
        let m = Metrics::with_recording(1, false);
        m.inc(Counter::MessagesAccepted, 3);
        m.record(0, Hist::Ack, 100);
        m.outcomes("a.test", "", None, [1, 0, 0]);
        let text = m.render(&RouterStats::default());
        assert!(text.contains("saida_messages_accepted_total 0"), "{text}");
        assert!(text.contains("saida_ack_latency_seconds_count 0"), "{text}");
        assert!(!text.contains("a.test"), "{text}");
    }

    #[test]
    fn shard_histograms_merge_into_prometheus_buckets() {
        let m = Metrics::new(2);
        m.record(0, Hist::Ack, 300); // 0.3 ms
        m.record(1, Hist::Ack, 2_000); // 2 ms
        m.record(1, Hist::Ack, 40_000); // 40 ms
        m.inc(Counter::MessagesAccepted, 3);
        let text = m.render(&RouterStats::default());
        assert!(
            text.contains("saida_ack_latency_seconds_bucket{le=\"0.0005\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("saida_ack_latency_seconds_bucket{le=\"0.0025\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("saida_ack_latency_seconds_bucket{le=\"0.05\"} 3"),
            "{text}"
        );
        assert!(text.contains("saida_ack_latency_seconds_count 3"), "{text}");
        assert!(text.contains("saida_messages_accepted_total 3"), "{text}");
        assert!(
            text.contains("saida_messages_rejected_total{reason=\"queue_full\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("saida_delivery_outcomes_total{outcome=\"delivered\"} 0"),
            "{text}"
        );
    }
}
