//! The delivery engine of one shard: the destination domains it owns, their queues
//! (`delivery::queue`), and the connection workers that drain them.
//!
//! Flow: a [`Handoff`] arrives (from the accepting shard, from recovery, or from a bounce) →
//! [`Deliverer::enqueue`] reads the message zero-copy from its spool to learn the recipients'
//! domains and queues one job per domain → [`Deliverer::kick`] starts connection workers up to
//! the domain's `connections_max` → a worker resolves the destination (route or MX), connects
//! (next host on failure, plain text after a failed opportunistic handshake), and sends jobs
//! one after another on the same connection until `msgs_per_connection_max`, then reconnects; an
//! idle connection waits `idle_secs` for more work → each job's replies become outcomes
//! (delivered, deferred by the retry schedule, failed; bounces queued first), written to the
//! delivery log and sent to the spool's shard, which journals them.
//!
//! Everything here runs on the shard's single thread: `RefCell` borrows never cross an await.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::marker::PhantomData;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use spool::{
    DsnRet, Message, MessageRef, QueueId, RcptState, Recipient, Spool, SpoolError, message_flags,
    now_micros,
};
use tokio::sync::watch;

use crate::config::Config;
use crate::delivery::bounce_class::BounceClass;
use crate::delivery::dsn::{FailedRecipient, build_bounce};
use crate::delivery::log::{AttemptOutcome, AttemptRecord, DeliveryLog, LogRotation, rfc3339};
use crate::delivery::policy::{DeliveryPolicies, DomainPolicy, Target};
use crate::delivery::provider::{NoSlot, Path, Slot};
use crate::delivery::queue::{
    DomainQueue, Job, JobRcpt, queue_egress, queue_name, split_queue_name,
};
use crate::delivery::schedule::Next;
use crate::dns::{MxResolver, Resolution};
use crate::mesh::{Handoff, Outcome, Router, ShardMsg, SpoolReaders};
use crate::metrics::{Counter, Hist};
use saida_control::{DomainSummary, Request, Selector, ShardReply};
use saida_net::Dial;
use smtp_client::{ClientError, ClientSession, ClientSetup, TlsPolicy};
use smtp_proto::client::{Envelope, EnvelopeError};
use smtp_proto::headers::find_message_id;

/// Addresses tried per connection attempt (over all MX hosts).
const ADDRESSES_PER_ATTEMPT_MAX: usize = 20;
/// Name of the file, in the shard's spool directory, listing its suspended domains.
const SUSPENDED_FILE: &str = "suspended-domains";
/// When a queued message cannot be read (I/O error), its recipients are tried again after this.
const READ_RETRY: Duration = Duration::from_secs(60);
/// After a failed connection while other connections of the domain still work, no new
/// connection is opened for this long (so a dead host is not hammered).
const CONNECT_BACKOFF: Duration = Duration::from_secs(5);
/// How long a queue waits before asking again for a connection its provider had no room for.
const PROVIDER_BUSY_MICROS: u64 = 250_000;
/// How often a queue whose path is suspended asks again (a cancelled backoff ends this soon).
const SUSPENDED_RECHECK_MICROS: u64 = 1_000_000;
/// How often due retries are promoted and idle domains forgotten.
const SCHEDULER_TICK: Duration = Duration::from_millis(200);

/// A reply, from the destination or made up locally, that decides a recipient's outcome.
#[derive(Clone, Debug)]
pub struct Verdict {
    pub code: u16,
    pub enhanced: Option<String>,
    /// The whole reply on one line (`550 5.1.1 no such user`).
    pub text: String,
}

/// Longest reply text kept for a recipient (journaled in the spool, logged, quoted in bounces).
/// A server may send up to 128 lines of 4 KiB; the journal holds at most 64 KiB per field.
pub const VERDICT_TEXT_BYTES_MAX: usize = 1000;

impl Verdict {
    fn local(code: u16, enhanced: &str, why: impl std::fmt::Display) -> Verdict {
        Verdict {
            code,
            enhanced: Some(enhanced.into()),
            text: bounded_text(format!("{code} {enhanced} {why}")),
        }
    }

    fn from_reply(r: &smtp_proto::client::ServerReply) -> Verdict {
        Verdict {
            code: r.code,
            enhanced: r.enhanced.clone(),
            text: bounded_text(r.summary()),
        }
    }
}

/// Cuts `text` to [`VERDICT_TEXT_BYTES_MAX`] bytes at a character boundary, marking the cut.
fn bounded_text(mut text: String) -> String {
    if text.len() <= VERDICT_TEXT_BYTES_MAX {
        return text;
    }
    let mut cut = VERDICT_TEXT_BYTES_MAX - " [truncated]".len();
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text.truncate(cut);
    text.push_str(" [truncated]");
    text
}

/// Where an attempt went, for the delivery log and bounces.
#[derive(Default)]
struct AttemptInfo {
    host: Option<String>,
    ip: Option<IpAddr>,
    source: Option<String>,
    tls: Option<(String, String)>,
    started: Option<Instant>,
}

/// One address to connect to.
#[derive(Clone, Debug)]
struct Host {
    name: String,
    addr: SocketAddr,
}

/// Why a destination has no host to try.
struct NoHosts {
    permanent: bool,
    verdict: Verdict,
}

/// Why a queued message could not be read.
enum ReadFailure {
    /// Compaction moved it; its recipients are handed over again.
    Moved,
    /// An I/O or integrity error: try again later.
    Unreadable,
}

/// How a connection ended.
enum ConnEnd {
    /// No more work within `idle_secs`, or shutting down.
    Done,
    /// Open a new connection; `next_host` after a 421.
    Reconnect { next_host: bool },
}

/// After one transaction: go on (with the job whose envelope went ahead, if any), or end.
enum Step {
    Next(Option<(Job, MessageRef)>),
    End(ConnEnd),
}

/// What the delivery log says about an attempt on this connection.
fn attempt_info(
    host: &Host,
    source: &Option<String>,
    tls: &Option<(String, String)>,
) -> AttemptInfo {
    AttemptInfo {
        host: Some(host.name.clone()),
        ip: Some(host.addr.ip()),
        source: source.clone(),
        tls: tls.clone(),
        started: Some(Instant::now()),
    }
}

/// The delivery side of one shard.
pub struct Deliverer<S: Dial> {
    shard: u16,
    /// Domains an operator suspended, one per line, so that a restart keeps them suspended.
    suspended_file: std::path::PathBuf,
    config: Arc<Config>,
    policies: DeliveryPolicies,
    helo: String,
    resolver: Option<MxResolver>,
    readers: SpoolReaders,
    router: Router,
    spool: Rc<RefCell<Spool>>,
    domains: RefCell<HashMap<Rc<str>, DomainQueue>>,
    log: RefCell<Option<DeliveryLog>>,
    tls_any: Arc<rustls::ClientConfig>,
    tls_verified: Arc<rustls::ClientConfig>,
    shutdown: watch::Receiver<bool>,
    /// Egress sources and pools, with which sources are suspended.
    egress: crate::delivery::egress::Egress,
    /// Connection workers running (the shard waits for them at shutdown); at most
    /// `delivery.workers_per_shard_max`.
    pub workers: Cell<usize>,
    /// Domains that wanted workers when the shard had none to spare, in order; each once.
    starved: RefCell<Starved>,
    /// Tells idle connections to close: a domain is waiting for a worker slot.
    slot_wanted: tokio::sync::Notify,
    /// MX lookups under way at once, at most `delivery.dns_lookups_per_shard_max`.
    dns_lookups: tokio::sync::Semaphore,
    metrics: Arc<crate::metrics::Metrics>,
    /// Tenants: their queues are apart, their pools and suspension apply, their quotas count.
    tenants: Arc<crate::tenant::Tenants>,
    /// Addresses never to be mailed: checked before each attempt, fed by hard bounces.
    suppressions: Arc<crate::suppression::Suppressions>,
    /// What each failure means.
    classifier: crate::delivery::bounce_class::Classifier,
    /// Mailbox providers and their limits per (source, provider), shared by every shard.
    providers: Arc<crate::delivery::provider::Providers>,
    /// Queues of this shard waiting for a provider path's connection slot, in order (the
    /// path by its address), each once: a connection of that path that ends wakes the first.
    provider_waiting: RefCell<std::collections::VecDeque<(usize, Rc<str>)>>,
    rng: Cell<u64>,
    _stream: PhantomData<S>,
}

/// Domains waiting for a worker slot, in order, and the same set for a membership test.
type Starved = (
    std::collections::VecDeque<Rc<str>>,
    std::collections::HashSet<Rc<str>>,
);

impl<S: Dial + 'static> Deliverer<S> {
    /// Builds the shard's deliverer (inside its runtime: the resolver needs one).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        shard: u16,
        config: Arc<Config>,
        readers: SpoolReaders,
        router: Router,
        spool: Rc<RefCell<Spool>>,
        shutdown: watch::Receiver<bool>,
        metrics: Arc<crate::metrics::Metrics>,
        tenants: Arc<crate::tenant::Tenants>,
        suppressions: Arc<crate::suppression::Suppressions>,
        providers: Arc<crate::delivery::provider::Providers>,
    ) -> Result<Rc<Self>, String> {
        let classifier = crate::delivery::bounce_class::Classifier::new(&config.bounce_rules)
            .map_err(|e| format!("bounce_rule: {e}"))?;
        let policies = DeliveryPolicies::new(&config.delivery, &config.routes)
            .map_err(|(k, m)| format!("{k}: {m}"))?;
        let resolver = match MxResolver::new(&config.dns.settings()) {
            Ok(r) => Some(r),
            Err(e) => {
                // Routes with fixed hosts still work; MX destinations are deferred.
                tracing::error!(shard, error = %e, "no DNS resolver; MX lookups will defer");
                None
            }
        };
        let log = if config.delivery.log_dir.is_empty() || !config.delivery.enabled {
            None
        } else {
            let rotation = LogRotation {
                bytes_max: config.delivery.log_bytes_max,
                age_max: Duration::from_secs(config.delivery.log_age_secs),
                files_max: config.delivery.log_files_max,
            };
            let dir = std::path::Path::new(&config.delivery.log_dir);
            Some(
                DeliveryLog::open(dir, &format!("delivery-{shard}"), rotation)
                    .map_err(|e| format!("delivery log in {}: {e}", dir.display()))?,
            )
        };
        let roots = match saida_net::tls::roots_from_pem_file(&config.delivery.tls_ca_file) {
            Ok((roots, _)) => roots,
            Err(e) => {
                tracing::warn!(error = %e, "no trusted roots: `verified` destinations will fail");
                rustls::RootCertStore::empty()
            }
        };
        let helo = if config.delivery.helo_name.is_empty() {
            config.server.hostname.clone()
        } else {
            config.delivery.helo_name.clone()
        };
        let suspended_file = config
            .spool
            .dir
            .join(format!("shard-{shard}"))
            .join(SUSPENDED_FILE);
        let domains: HashMap<Rc<str>, DomainQueue> = std::fs::read_to_string(&suspended_file)
            .unwrap_or_default()
            .lines()
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .map(|d| {
                let mut q = DomainQueue::new(policies.for_domain(d), now_micros());
                q.suspended = true;
                (Rc::from(d), q)
            })
            .collect();
        if !domains.is_empty() {
            tracing::info!(shard, domains = domains.len(), "suspended domains restored");
        }
        Ok(Rc::new(Deliverer {
            shard,
            suspended_file,
            policies,
            egress: crate::delivery::egress::Egress::new(&config.sources, &config.pools, &helo),
            helo,
            resolver,
            readers,
            router,
            spool,
            domains: RefCell::new(domains),
            log: RefCell::new(log),
            tls_any: saida_net::tls::client_config_unverified(),
            tls_verified: saida_net::tls::client_config_verified(roots),
            shutdown,
            workers: Cell::new(0),
            starved: RefCell::default(),
            slot_wanted: tokio::sync::Notify::new(),
            dns_lookups: tokio::sync::Semaphore::new(config.delivery.dns_lookups_per_shard_max),
            metrics,
            tenants,
            suppressions,
            classifier,
            providers,
            provider_waiting: RefCell::default(),
            rng: Cell::new(now_micros() | 1),
            config,
            _stream: PhantomData,
        }))
    }

    /// Whether this daemon delivers at all (`delivery.enabled`).
    pub fn enabled(&self) -> bool {
        self.config.delivery.enabled
    }

    fn worker_started(&self) {
        self.workers.set(self.workers.get() + 1);
        self.router.stats.workers.fetch_add(1, Ordering::Relaxed);
    }

    fn worker_ended(&self) {
        self.workers.set(self.workers.get() - 1);
        self.router.stats.workers.fetch_sub(1, Ordering::Relaxed);
    }

    fn random(&self) -> u64 {
        let mut x = self.rng.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng.set(x);
        x
    }

    fn stopping(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Queues the recipients of a hand-off, one job per domain, and starts workers.
    pub fn enqueue(self: &Rc<Self>, h: Handoff) {
        let indexes = h.rcpts.iter().map(|r| r.index).collect();
        let mref = match self.read(h.queue_id, h.spool_shard, h.base, indexes, h.counted) {
            Ok(m) => m,
            Err(ReadFailure::Moved) => return,
            Err(ReadFailure::Unreadable) => {
                // Hand it to ourselves again later, so the recipients are not forgotten.
                let (router, shard) = (self.router.clone(), self.shard as usize);
                tokio::task::spawn_local(async move {
                    tokio::time::sleep(READ_RETRY).await;
                    let _ = router.send(shard, ShardMsg::Deliver(h)).await;
                });
                return;
            }
        };
        let Ok(msg) = mref.message() else { return };
        let now = now_micros();
        let (name, chosen) = crate::tenant::split_record_field(msg.tenant);
        let tenant = self.tenants.named(name);
        let chosen = chosen.filter(|p| tenant.is_some_and(|t| t.pool_allowed(p)));
        // (queue, due, recipients): recipients of one domain due at the same time share a job.
        let mut groups: Vec<(String, u64, Vec<JobRcpt>)> = Vec::new();
        for r in &h.rcpts {
            let Some(rcpt) = msg.recipients.get(r.index as usize) else {
                continue;
            };
            let domain = crate::mesh::route::domain_of(rcpt.address)
                .trim_end_matches('.')
                .to_ascii_lowercase();
            let jr = JobRcpt {
                index: r.index,
                attempts: r.attempts,
                delay_notified: false,
            };
            match groups
                .iter_mut()
                .find(|(d, due, _)| *d == domain && *due == r.next_attempt_micros)
            {
                Some(g) => g.2.push(jr),
                None => groups.push((domain, r.next_attempt_micros, vec![jr])),
            }
        }
        if let Some(t) = tenant.filter(|_| !h.counted) {
            t.queued(groups.iter().map(|g| g.2.len()).sum());
        }
        for (domain, due, rcpts) in groups {
            let name = self.queue_for(tenant, chosen, &domain);
            let job = Job {
                queue_id: h.queue_id,
                spool_shard: h.spool_shard,
                base: h.base,
                received_at_micros: h.received_at_micros,
                rcpts,
                failed_over: false,
            };
            let key = self.push_job(&name, job, due, now);
            self.kick(&key);
        }
    }

    /// Reads a message through its spool's reader. A stale location (compaction moved the
    /// message) asks the spool's shard to hand these recipients over again at the new one
    /// (`counted`: they are in their tenant's queue quota already).
    fn read(
        self: &Rc<Self>,
        queue_id: QueueId,
        spool_shard: u16,
        base: spool::Location,
        rcpts: Vec<u32>,
        counted: bool,
    ) -> Result<MessageRef, ReadFailure> {
        let Some(reader) = self.readers.get(spool_shard as usize).and_then(|r| r.get()) else {
            return Err(ReadFailure::Unreadable);
        };
        match reader.read(base) {
            Ok(m) => Ok(m),
            Err(SpoolError::NotFound(_)) => {
                let (router, owner) = (self.router.clone(), self.shard);
                tokio::task::spawn_local(async move {
                    let msg = ShardMsg::Reoffer {
                        spool: spool_shard,
                        queue_id,
                        owner,
                        rcpts,
                        counted,
                    };
                    let _ = router.send_to_spool(spool_shard, msg).await;
                });
                Err(ReadFailure::Moved)
            }
            Err(e) => {
                let why = "cannot read a queued message; retrying later";
                tracing::error!(%queue_id, error = %e, "{why}");
                Err(ReadFailure::Unreadable)
            }
        }
    }

    /// Reads a job's message; when it cannot be read now (not moved), the job goes back to the
    /// retry heap for `READ_RETRY`, attempts unchanged, so it is never silently dropped.
    fn read_job(self: &Rc<Self>, domain: &str, job: &Job) -> Option<MessageRef> {
        let rcpts = job.rcpts.iter().map(|r| r.index).collect();
        match self.read(job.queue_id, job.spool_shard, job.base, rcpts, false) {
            // `read` already decoded and checked the record, so `message()` cannot fail.
            Ok(m) => Some(m),
            Err(ReadFailure::Moved) => {
                // The job leaves the queue and its tenant's count; the spool's shard hands back
                // those of its recipients still live, uncounted, and their new job counts them.
                if let Some(t) = self.tenant_of(domain) {
                    t.finished(job.rcpts.len());
                }
                None
            }
            _ => {
                let now = now_micros();
                self.push_job(
                    domain,
                    job.clone(),
                    now + READ_RETRY.as_micros() as u64,
                    now,
                );
                None
            }
        }
    }

    /// The configured tenant whose mail queue `name` holds.
    fn tenant_of(&self, name: &str) -> Option<&crate::tenant::Tenant> {
        split_queue_name(name).0.and_then(|t| self.tenants.named(t))
    }

    /// The queue a new job for `domain` joins: the tenant's, and the source's that the pool
    /// the message chose (or else the tenant's, or else the destination's) gives this job by
    /// smooth weighted round robin.
    fn queue_for(
        &self,
        tenant: Option<&crate::tenant::Tenant>,
        chosen: Option<&str>,
        domain: &str,
    ) -> String {
        let pool = match (chosen, tenant.filter(|t| !t.config.pool.is_empty())) {
            (Some(p), _) => Some(p.to_string()),
            (None, Some(t)) => Some(t.config.pool.clone()),
            (None, None) => self.policies.for_domain(domain).pool.clone(),
        };
        let Some(pool) = pool else {
            return queue_name(tenant.map(|t| t.name()), domain, None);
        };
        let source = self.egress.pick(&pool).map_or(String::new(), |s| s.name);
        queue_name(tenant.map(|t| t.name()), domain, Some((&pool, &source)))
    }

    /// A new queue: its destination's policy (with the tenant's pool, when it has one), and
    /// suspended when the destination or the tenant is.
    fn new_queue(
        &self,
        domains: &HashMap<Rc<str>, DomainQueue>,
        name: &str,
        now: u64,
    ) -> DomainQueue {
        let (tenant, domain) = split_queue_name(name);
        let mut policy = self.policies.for_domain(domain);
        let tenant = tenant.and_then(|t| self.tenants.named(t));
        // The pool the job was given (the message's choice, the tenant's or the destination's)
        // is the one its connections fall back on.
        let egress = queue_egress(name);
        if let Some((pool, _)) = egress.filter(|(p, _)| policy.pool.as_deref() != Some(*p)) {
            let mut p = (*policy).clone();
            p.pool = Some(pool.to_string());
            policy = Arc::new(p);
        }
        let mut q = DomainQueue::new(policy, now);
        q.suspended = name != domain && domains.get(domain).is_some_and(|d| d.suspended);
        q.held = tenant.is_some_and(|t| t.suspended());
        q.source = egress
            .map(|(_, s)| s)
            .filter(|s| !s.is_empty())
            .map(str::to_string);
        q
    }

    fn push_job(&self, domain: &str, job: Job, due: u64, now: u64) -> Rc<str> {
        let n = job.rcpts.len();
        let mut domains = self.domains.borrow_mut();
        let key: Rc<str> = match domains.get_key_value(domain) {
            Some((k, _)) => Rc::clone(k),
            None => {
                let k: Rc<str> = domain.into();
                let q = self.new_queue(&domains, domain, now);
                domains.insert(Rc::clone(&k), q);
                k
            }
        };
        if let Some(q) = domains.get_mut(&key) {
            q.push(job, due, now);
        }
        self.router
            .stats
            .queued_rcpts
            .fetch_add(n, Ordering::Relaxed);
        key
    }

    fn pop_job(&self, domain: &str) -> Option<Job> {
        let job = self.domains.borrow_mut().get_mut(domain)?.pop()?;
        self.unqueued(job.rcpts.len());
        Some(job)
    }

    fn unqueued(&self, n: usize) {
        self.router
            .stats
            .queued_rcpts
            .fetch_sub(n, Ordering::Relaxed);
    }

    /// Starts workers the domain's backlog calls for, or wakes an idle one.
    pub fn kick(self: &Rc<Self>, domain: &Rc<str>) {
        if self.stopping() {
            return;
        }
        let start = {
            let mut domains = self.domains.borrow_mut();
            let Some(q) = domains.get_mut(domain) else {
                return;
            };
            if q.ready_jobs() > 0 && q.idle_workers > 0 && !q.paused() {
                q.wake.notify_one();
            }
            let wanted = q.workers_wanted(now_micros());
            let free = self
                .config
                .delivery
                .workers_per_shard_max
                .saturating_sub(self.workers.get());
            let n = wanted.min(free);
            if n < wanted {
                // Started when a worker of another domain ends; idle ones end now.
                let mut starved = self.starved.borrow_mut();
                if starved.1.insert(Rc::clone(domain)) {
                    starved.0.push_back(Rc::clone(domain));
                }
                // One idle connection of another domain makes room.
                self.slot_wanted.notify_one();
            }
            q.workers += n;
            n
        };
        for _ in 0..start {
            self.worker_started();
            tokio::task::spawn_local(Rc::clone(self).worker(Rc::clone(domain)));
        }
    }

    /// Promotes due retries and starts workers; forgets empty, idle, unsuspended domains.
    pub async fn run_scheduler(self: Rc<Self>) {
        let mut shutdown = self.shutdown.clone();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(SCHEDULER_TICK) => {}
                _ = shutdown.changed() => return,
            }
            let now = now_micros();
            let due: Vec<Rc<str>> = {
                let mut domains = self.domains.borrow_mut();
                domains.retain(|_, q| !q.is_empty() || q.workers > 0 || q.suspended);
                domains
                    .iter_mut()
                    .filter_map(|(k, q)| {
                        if q.paused() {
                            return None;
                        }
                        q.promote_due(now);
                        (q.ready_jobs() > 0).then(|| Rc::clone(k))
                    })
                    .collect()
            };
            for d in due {
                self.kick(&d);
            }
            if let Some(log) = self.log.borrow_mut().as_mut() {
                let _ = log.flush();
            }
        }
    }

    async fn worker(self: Rc<Self>, domain: Rc<str>) {
        let (policy, source) = match self.domains.borrow().get(&domain) {
            Some(q) => (Arc::clone(&q.policy), q.source.clone()),
            None => {
                self.worker_ended();
                return;
            }
        };
        self.run_worker(&domain, &policy, source.as_deref()).await;
        let again = {
            let mut domains = self.domains.borrow_mut();
            match domains.get_mut(&domain) {
                Some(q) => {
                    q.workers -= 1;
                    q.ready_jobs() > 0
                }
                None => false,
            }
        };
        self.worker_ended();
        if again {
            // Domains already waiting for a slot go first; this one queues behind them.
            let mut starved = self.starved.borrow_mut();
            if starved.0.is_empty() {
                drop(starved);
                self.kick(&domain);
            } else if starved.1.insert(Rc::clone(&domain)) {
                starved.0.push_back(Rc::clone(&domain));
            }
        }
        // A slot is free: the domain that has waited longest for one gets it.
        while self.workers.get() < self.config.delivery.workers_per_shard_max {
            let next = {
                let mut starved = self.starved.borrow_mut();
                let next = starved.0.pop_front();
                if let Some(d) = &next {
                    starved.1.remove(d);
                }
                next
            };
            match next {
                Some(d) => self.kick(&d),
                None => break,
            }
        }
    }

    async fn run_worker(
        self: &Rc<Self>,
        domain: &Rc<str>,
        policy: &Arc<DomainPolicy>,
        source: Option<&str>,
    ) {
        if !self.has_ready(domain) {
            return;
        }
        let hosts = match self.destination_hosts(domain, policy).await {
            Ok(h) => h,
            Err(no) => {
                self.give_up_ready(domain, no.permanent, &no.verdict, AttemptInfo::default())
                    .await;
                return;
            }
        };
        // A provider's limits apply per (source, provider), across its domains and shards; a
        // destination of no provider has a path of its own (for backoff).
        let names: Vec<&str> = hosts.iter().map(|h| h.name.as_str()).collect();
        let (_, dest) = split_queue_name(domain);
        let provider = self.providers.of(dest, &names);
        let policy = &self.provider_policy(domain, policy, provider);
        let path = self.providers.path_of(provider, dest, source.unwrap_or(""));
        let mut start_host = 0;
        loop {
            if self.stopping() || !self.has_ready(domain) {
                return;
            }
            let slot = match path.connect() {
                Ok(slot) => slot,
                Err(NoSlot::Suspended(until)) => {
                    // In backoff: nothing is sent on the path until then; the jobs wait. The
                    // queue asks again within a second, in case an operator cancels it.
                    if let Some(q) = self.domains.borrow_mut().get_mut(&**domain) {
                        q.backoff_until_micros = until.min(now_micros() + SUSPENDED_RECHECK_MICROS);
                    }
                    return;
                }
                Err(NoSlot::Busy) => {
                    // The provider has this source's connections open: no new one now;
                    // the next of the path's connections here to end wakes this queue.
                    if let Some(q) = self.domains.borrow_mut().get_mut(&**domain) {
                        q.backoff_until_micros = now_micros() + PROVIDER_BUSY_MICROS;
                    }
                    let key = (Arc::as_ptr(&path) as usize, Rc::clone(domain));
                    let mut waiting = self.provider_waiting.borrow_mut();
                    if !waiting.contains(&key) {
                        waiting.push_back(key);
                    }
                    return;
                }
            };
            let connected = self
                .connect_any(&hosts, start_host, policy, source, &path)
                .await;
            let (session, host, source) = match connected {
                Ok(x) => x,
                Err(verdict) => {
                    // While another connection of this domain works, its queue keeps moving:
                    // only pause new connections. Otherwise defer everything that is ready.
                    let alone = {
                        let mut domains = self.domains.borrow_mut();
                        match domains.get_mut(&**domain) {
                            Some(q) if q.connected > 0 => {
                                q.backoff_until_micros =
                                    now_micros() + CONNECT_BACKOFF.as_micros() as u64;
                                false
                            }
                            _ => true,
                        }
                    };
                    if alone {
                        self.give_up_ready(domain, false, &verdict, AttemptInfo::default())
                            .await;
                    }
                    return;
                }
            };
            self.count_connected(domain, true);
            let end = self
                .use_connection(domain, policy, session, &hosts[host], source, &slot)
                .await;
            self.count_connected(domain, false);
            drop(slot);
            self.wake_provider_waiter(Arc::as_ptr(&path) as usize);
            match end {
                ConnEnd::Done => return,
                ConnEnd::Reconnect { next_host } => {
                    if next_host {
                        start_host = (host + 1) % hosts.len();
                    }
                }
            }
        }
    }

    /// A failure reply on a path: backoff rules may suspend or cut it.
    fn observe_backoff(&self, path: &Path, r: &smtp_proto::client::ServerReply) {
        if let Some(rule) =
            self.providers
                .observe(path, r.code, r.enhanced.as_deref(), &r.summary())
        {
            self.metrics.backoff_match(&rule);
        }
    }

    /// The destination's policy with its provider's per-connection and per-transaction limits
    /// when they are lower (the queue keeps it, so its jobs are split to match).
    fn provider_policy(
        &self,
        domain: &str,
        policy: &Arc<DomainPolicy>,
        provider: Option<usize>,
    ) -> Arc<DomainPolicy> {
        if let Some(q) = self.domains.borrow_mut().get_mut(domain) {
            q.provider = provider;
        }
        let Some(c) = provider.and_then(|p| self.providers.config(p)) else {
            return Arc::clone(policy);
        };
        let per_conn = c.msgs_per_connection_max.unwrap_or(u32::MAX);
        let rcpts = c.rcpts_per_transaction_max.unwrap_or(usize::MAX);
        if policy.msgs_per_connection_max <= per_conn && policy.rcpts_per_transaction_max <= rcpts {
            return Arc::clone(policy);
        }
        let mut p = (**policy).clone();
        p.msgs_per_connection_max = p.msgs_per_connection_max.min(per_conn);
        p.rcpts_per_transaction_max = p.rcpts_per_transaction_max.min(rcpts);
        let p = Arc::new(p);
        if let Some(q) = self.domains.borrow_mut().get_mut(domain) {
            q.policy = Arc::clone(&p);
        }
        p
    }

    fn record_phases(&self, p: &smtp_client::Phases) {
        for (h, d) in [
            (Hist::Banner, p.banner),
            (Hist::Ehlo, p.ehlo),
            (Hist::TlsHandshake, p.tls_handshake),
            (Hist::Mail, p.mail),
            (Hist::Rcpt, p.rcpt),
            (Hist::Data, p.data),
            (Hist::EndOfData, p.end_of_data),
        ] {
            if let Some(d) = d {
                self.metrics.record(self.shard, h, d.as_micros() as u64);
            }
        }
    }

    fn count_connected(&self, domain: &str, up: bool) {
        if let Some(q) = self.domains.borrow_mut().get_mut(domain) {
            if up {
                q.connected += 1;
            } else {
                q.connected = q.connected.saturating_sub(1);
            }
        }
    }

    fn has_ready(&self, domain: &str) -> bool {
        self.domains
            .borrow()
            .get(domain)
            .is_some_and(|q| q.ready_jobs() > 0 && !q.paused())
    }

    async fn destination_hosts(
        &self,
        queue: &str,
        policy: &DomainPolicy,
    ) -> Result<Vec<Host>, NoHosts> {
        let domain = split_queue_name(queue).1;
        let temp = |why: String| NoHosts {
            permanent: false,
            verdict: Verdict::local(451, "4.4.3", why),
        };
        let mut out = Vec::new();
        match &policy.target {
            Target::Hosts(list) => {
                for (name, port) in list {
                    match name.parse::<IpAddr>() {
                        Ok(ip) => out.push(Host {
                            name: name.clone(),
                            addr: SocketAddr::new(ip, *port),
                        }),
                        Err(_) => {
                            if let Ok(addrs) = tokio::net::lookup_host((name.as_str(), *port)).await
                            {
                                out.extend(addrs.map(|addr| Host {
                                    name: name.clone(),
                                    addr,
                                }));
                            }
                        }
                    }
                }
                if out.is_empty() {
                    return Err(temp(format!(
                        "no address for the route's hosts of {domain}"
                    )));
                }
            }
            Target::Mx => {
                let Some(resolver) = &self.resolver else {
                    return Err(temp("no DNS resolver is available".into()));
                };
                let Ok(_lookup) = self.dns_lookups.acquire().await else {
                    return Err(temp("the shard is stopping".into()));
                };
                let t = Instant::now();
                let answer = resolver.resolve(domain).await;
                self.metrics
                    .record(self.shard, Hist::DnsLookup, t.elapsed().as_micros() as u64);
                match answer {
                    Ok(Resolution::Hosts(hosts)) => {
                        let port = self.config.delivery.mx_port;
                        let mut refused = Vec::new();
                        for h in hosts {
                            for ip in &h.addrs {
                                let addr = SocketAddr::new(*ip, port);
                                if let Some(why) = refused_mx_address(&self.config, addr) {
                                    refused.push(format!("{} ({addr}: {why})", h.name));
                                    continue;
                                }
                                out.push(Host {
                                    name: h.name.clone(),
                                    addr,
                                });
                            }
                        }
                        if out.is_empty() && !refused.is_empty() {
                            tracing::warn!(shard = self.shard, domain, hosts = ?refused,
                                "MX addresses refused");
                            return Err(NoHosts {
                                permanent: false,
                                verdict: Verdict::local(
                                    451,
                                    "4.4.6",
                                    format!(
                                        "MX of {domain} points at {}: refused (mail loop)",
                                        refused.join(", ")
                                    ),
                                ),
                            });
                        }
                    }
                    Ok(Resolution::NullMx) => {
                        return Err(NoHosts {
                            permanent: true,
                            verdict: Verdict::local(
                                556,
                                "5.1.10",
                                format!("{domain} accepts no mail (null MX)"),
                            ),
                        });
                    }
                    Ok(Resolution::NoSuchDomain) => {
                        return Err(NoHosts {
                            permanent: true,
                            verdict: Verdict::local(
                                550,
                                "5.1.2",
                                format!("{domain} does not exist (no MX, A or AAAA)"),
                            ),
                        });
                    }
                    Err(e) => return Err(temp(e.to_string())),
                }
            }
        }
        out.truncate(ADDRESSES_PER_ATTEMPT_MAX);
        if out.is_empty() {
            return Err(temp(format!("no MX address for {domain}")));
        }
        Ok(out)
    }

    /// Connects to the first host that completes the SMTP greeting and the TLS policy,
    /// starting at `start`; a connection failure, a refused session (`421`) or a failed TLS
    /// handshake moves on to the next host. Under `opportunistic`, hosts whose handshake failed
    /// are tried once more in plain text after every host was tried with TLS (RFC 7435:
    /// plain text beats no delivery).
    async fn connect_any(
        &self,
        hosts: &[Host],
        start: usize,
        policy: &DomainPolicy,
        source: Option<&str>,
        path: &Path,
    ) -> Result<(ClientSession<S>, usize, Option<String>), Verdict> {
        let mut last = Verdict::local(451, "4.4.1", "no host to connect to");
        let mut tls_failed = Vec::new();
        let order = (0..hosts.len()).map(|k| ((start + k) % hosts.len(), true));
        let mut attempts: Vec<(usize, bool)> = order.collect();
        let mut next = 0;
        while let Some(&(i, use_starttls)) = attempts.get(next) {
            next += 1;
            let host = &hosts[i];
            let t = Instant::now();
            match self.connect_one(host, policy, use_starttls, source).await {
                Ok((s, source)) => {
                    let micros = t.elapsed().as_micros() as u64;
                    self.metrics.record(self.shard, Hist::Connect, micros);
                    self.record_phases(&s.phases);
                    return Ok((s, i, source));
                }
                Err(e) => {
                    tracing::debug!(host = %host.name, addr = %host.addr, error = %e,
                        "connection attempt failed");
                    if e.is_tls_failure() && use_starttls && policy.tls == TlsPolicy::Opportunistic
                    {
                        tls_failed.push(i);
                    }
                    if let ClientError::Refused(r) = &e {
                        // A banner or EHLO refusal may say "slow down" too.
                        self.observe_backoff(path, r);
                    }
                    let (code, status) = match &e {
                        ClientError::Refused(_) => (451, "4.4.0"),
                        ClientError::Tls(_) => (451, "4.7.5"),
                        _ => (451, "4.4.1"),
                    };
                    last =
                        Verdict::local(code, status, format!("{} ({}): {e}", host.name, host.addr));
                }
            }
            if next == attempts.len() {
                attempts.extend(tls_failed.drain(..).map(|i| (i, false)));
            }
        }
        Err(last)
    }

    async fn connect_one(
        &self,
        host: &Host,
        policy: &DomainPolicy,
        use_starttls: bool,
        fixed: Option<&str>,
    ) -> Result<(ClientSession<S>, Option<String>), ClientError> {
        // The queue's own source first; one whose address cannot be bound is suspended and
        // another of the pool tried.
        let mut tries = 0;
        let mut fixed = fixed;
        let (stream, source) = loop {
            tries += 1;
            let own = fixed.take().and_then(|name| self.egress.usable(name));
            let source = match (own, &policy.pool) {
                (Some(s), _) => Some(s),
                (None, None) => None,
                (None, Some(pool)) => match self.egress.pick(pool) {
                    Some(s) => Some(s),
                    None => {
                        let why = format!("every source of pool `{pool}` is suspended");
                        return Err(ClientError::Io(std::io::Error::other(why)));
                    }
                },
            };
            let connect = async {
                match &source {
                    Some(s) => S::connect_from(s.address, host.addr).await,
                    None => S::connect(host.addr).await,
                }
            };
            match tokio::time::timeout(policy.connect_timeout, connect).await {
                Ok(Ok(stream)) => break (stream, source),
                Ok(Err(e)) => {
                    let Some(s) = source.as_ref().filter(|_| is_bind_failure(&e)) else {
                        return Err(e.into());
                    };
                    self.egress.suspend(&s.name);
                    tracing::error!(shard = self.shard, source = %s.name, address = %s.address,
                        error = %e, "egress source cannot be bound; suspended");
                    if tries >= crate::delivery::egress::BIND_TRIES_MAX {
                        return Err(e.into());
                    }
                }
                Err(_) => return Err(ClientError::Timeout("connect")),
            }
        };
        let setup = ClientSetup {
            helo_name: source
                .as_ref()
                .map_or_else(|| self.helo.clone(), |s| s.ehlo.clone()),
            own_name: self.config.server.hostname.clone(),
            policy: policy.tls,
            tls: if policy.tls == TlsPolicy::Verified {
                Arc::clone(&self.tls_verified)
            } else {
                Arc::clone(&self.tls_any)
            },
            server_name: host.name.clone(),
            timeouts: policy.timeouts,
            use_starttls,
        };
        let session = ClientSession::start(stream, &setup).await?;
        Ok((session, source.map(|s| s.name)))
    }

    /// Sends jobs on one connection until it is used up, idle, broken or shutdown comes.
    async fn use_connection(
        self: &Rc<Self>,
        domain: &Rc<str>,
        policy: &DomainPolicy,
        mut session: ClientSession<S>,
        host: &Host,
        source: Option<String>,
        slot: &Slot,
    ) -> ConnEnd {
        let path = slot.path();
        let tls = session.tls_info();
        let mut sent = 0u32;
        // A job whose envelope was written ahead with the last content (its rate token taken,
        // its recipients checked against the suppression list, its message held): sent next,
        // or put back.
        let mut ahead: Option<(Job, MessageRef)> = None;
        loop {
            let closing = if sent >= policy.msgs_per_connection_max {
                Some(ConnEnd::Reconnect { next_host: false })
            } else if self.stopping() {
                Some(ConnEnd::Done)
            } else if slot.shed() {
                // Backoff cut the path's connections: this one closes.
                Some(ConnEnd::Done)
            } else {
                None
            };
            if let Some(end) = closing {
                if let Some((job, _)) = ahead.take() {
                    self.requeue_front(domain, job);
                }
                session.quit().await;
                return end;
            }
            let room = sent + 1 < policy.msgs_per_connection_max;
            // The job whose envelope went ahead, else the next ready one.
            let (mut job, held) = if let Some((job, mref)) = ahead.take() {
                if path.suspended(now_micros()) {
                    // The last reply suspended the path: the job sent ahead waits with the
                    // rest; the close drops its envelope at the server.
                    drop(mref);
                    self.requeue_front(domain, job);
                    session.quit().await;
                    return ConnEnd::Done;
                }
                (job, Some(mref))
            } else {
                let Some(job) = self.pop_job(domain) else {
                    // Another domain of the provider waits for this source's slots: make room.
                    let contended = path.contended(now_micros());
                    if !contended && self.wait_for_work(domain, policy.idle).await {
                        continue;
                    }
                    session.quit().await;
                    return ConnEnd::Done;
                };
                let wait = self
                    .rate_wait(domain)
                    .or_else(|| path.take(now_micros()).err());
                if let Some(wait) = wait {
                    self.requeue_front(domain, job);
                    if Duration::from_micros(wait) > policy.idle {
                        // Longer than a connection may idle: close it, and open none until
                        // then.
                        if let Some(q) = self.domains.borrow_mut().get_mut(&**domain) {
                            q.backoff_until_micros = now_micros() + wait;
                        }
                        session.quit().await;
                        return ConnEnd::Done;
                    }
                    let mut shutdown = self.shutdown.clone();
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_micros(wait)) => {}
                        _ = shutdown.changed() => {}
                    }
                    continue;
                }
                (job, None)
            };
            let info = attempt_info(host, &source, &tls);
            let went_ahead = held.is_some();
            // A job sent ahead brings the message it was read with (its map stays alive).
            let msg_ref = held.or_else(|| self.read_job(domain, &job));
            let msg = msg_ref.as_ref().and_then(|m| m.message().ok());
            let Some(msg) = msg else {
                if went_ahead {
                    // Its envelope sent ahead cannot be followed: the connection ends (the
                    // server drops that transaction).
                    self.requeue_front(domain, job);
                    session.quit().await;
                    return ConnEnd::Reconnect { next_host: false };
                }
                continue;
            };
            // A job sent ahead had its suppressed recipients cancelled already.
            if !went_ahead && !self.drop_suppressed(&mut job, &msg).await {
                continue;
            }
            let step = self
                .transact(domain, &mut session, path, &mut job, &msg, &info, room)
                .await;
            sent += 1;
            match step {
                Step::Next(next) => ahead = next,
                Step::End(end) => return end,
            }
        }
    }

    /// Sends one job on the session and settles its outcome. Over DATA to a pipelining server,
    /// when the connection has `room` for another transaction, the next ready job (if its rate
    /// allows it now) has its envelope written with this content's end and is returned to be
    /// sent next; on any end of the connection it is put back first.
    #[allow(clippy::too_many_arguments)]
    async fn transact(
        self: &Rc<Self>,
        domain: &Rc<str>,
        session: &mut ClientSession<S>,
        path: &Path,
        job: &mut Job,
        msg: &Message<'_>,
        info: &AttemptInfo,
        room: bool,
    ) -> Step {
        let env = envelope(msg, job);
        let next = if room && session.pipelines_next() && !self.stopping() {
            self.prepare_ahead(domain, path).await
        } else {
            None
        };
        let next_msg = next.as_ref().and_then(|(_, m)| m.message().ok());
        let next_env = next
            .as_ref()
            .zip(next_msg.as_ref())
            .map(|((j, _), m)| envelope(m, j));
        let t = Instant::now();
        let result = session.send_then(&env, msg.body, next_env.as_ref()).await;
        let micros = t.elapsed().as_micros() as u64;
        drop(next_env);
        drop(next_msg);
        self.metrics.record(self.shard, Hist::Transaction, micros);
        if result.is_ok() {
            // Answered transactions only: a timeout says nothing of how fast the peer is.
            if let Some(q) = self.domains.borrow_mut().get_mut(&**domain) {
                q.observe_transaction(micros);
            }
        }
        self.record_phases(&session.phases);
        drop(env);
        let end = self
            .settle_result(domain, session, path, job, msg, info, result)
            .await;
        match end {
            None => Step::Next(next),
            Some(end) => {
                if let Some((j, _)) = next {
                    self.requeue_front(domain, j);
                }
                Step::End(end)
            }
        }
    }

    /// The next ready job, for its envelope to go ahead: only if its rate has a token now;
    /// its message read and its suppressed recipients cancelled.
    async fn prepare_ahead(
        self: &Rc<Self>,
        domain: &Rc<str>,
        path: &Path,
    ) -> Option<(Job, MessageRef)> {
        let mut job = self.pop_job(domain)?;
        if self
            .rate_wait(domain)
            .or_else(|| path.take(now_micros()).err())
            .is_some()
        {
            self.requeue_front(domain, job);
            return None;
        }
        let mref = self.read_job(domain, &job)?;
        let keep = match mref.message() {
            Ok(msg) => self.drop_suppressed(&mut job, &msg).await,
            Err(_) => false,
        };
        keep.then_some((job, mref))
    }

    /// Settles one transaction's result; `Some` when the connection is done with.
    #[allow(clippy::too_many_arguments)]
    async fn settle_result(
        self: &Rc<Self>,
        domain: &Rc<str>,
        session: &ClientSession<S>,
        path: &Path,
        job: &mut Job,
        msg: &Message<'_>,
        info: &AttemptInfo,
        result: Result<smtp_client::Delivery, ClientError>,
    ) -> Option<ConnEnd> {
        let host = info.host.as_deref().unwrap_or("");
        match result {
            Ok(delivery) => {
                if delivery.replies.iter().any(|r| r.is_positive()) {
                    self.metrics.inc(Counter::BytesOut, msg.body.len() as u64);
                }
                // Each distinct failure reply may carry its own "slow down".
                let mut seen: Vec<&smtp_proto::client::ServerReply> = Vec::new();
                for r in delivery.replies.iter().filter(|r| r.code >= 400) {
                    if !seen.contains(&r) {
                        self.observe_backoff(path, r);
                        seen.push(r);
                    }
                }
                let saw_421 = delivery.replies.iter().any(|r| r.code == 421);
                if saw_421 && !job.failed_over {
                    // The host is going away: the recipients it answered 421 go to the next
                    // host first; the others' replies stand (never resend after a 2xx).
                    let (again, settled): (Vec<_>, Vec<_>) = job
                        .rcpts
                        .iter()
                        .zip(&delivery.replies)
                        .partition(|(_, r)| r.code == 421);
                    if !settled.is_empty() {
                        let part = Job {
                            rcpts: settled.iter().map(|(r, _)| **r).collect(),
                            ..job.clone()
                        };
                        let verdicts = settled
                            .iter()
                            .map(|(_, r)| Verdict::from_reply(r))
                            .collect();
                        self.settle(domain, &part, msg, verdicts, info).await;
                    }
                    job.rcpts = again.iter().map(|(r, _)| **r).collect();
                    job.failed_over = true;
                    self.requeue_front(domain, job.clone());
                    return Some(ConnEnd::Reconnect { next_host: true });
                }
                let verdicts = delivery.replies.iter().map(Verdict::from_reply).collect();
                self.settle(domain, job, msg, verdicts, info).await;
                if saw_421 || !session.is_reusable() {
                    return Some(ConnEnd::Reconnect { next_host: saw_421 });
                }
            }
            Err(ClientError::Envelope(e)) => {
                let v = match e {
                    EnvelopeError::TooBig { .. } => Verdict::local(552, "5.3.4", &e),
                    EnvelopeError::NeedsSmtputf8 => Verdict::local(553, "5.6.7", &e),
                    _ => Verdict::local(553, "5.1.3", &e),
                };
                let n = job.rcpts.len();
                self.settle(domain, job, msg, vec![v; n], info).await;
                if !session.is_reusable() {
                    return Some(ConnEnd::Reconnect { next_host: false });
                }
            }
            Err(e) => {
                let v = Verdict::local(451, "4.4.2", format!("{host}: {e}"));
                let n = job.rcpts.len();
                self.settle(domain, job, msg, vec![v; n], info).await;
                return Some(ConnEnd::Reconnect { next_host: false });
            }
        }
        None
    }

    /// Gives a freed connection slot of a provider path to the queue of this shard that has
    /// waited longest for one.
    fn wake_provider_waiter(self: &Rc<Self>, path: usize) {
        let next = {
            let mut waiting = self.provider_waiting.borrow_mut();
            let i = waiting.iter().position(|(p, _)| *p == path);
            i.and_then(|i| waiting.remove(i))
        };
        if let Some((_, domain)) = next {
            if let Some(q) = self.domains.borrow_mut().get_mut(&*domain) {
                q.backoff_until_micros = 0;
            }
            self.kick(&domain);
        }
    }

    /// Takes the recipients now on the suppression list out of `job` (cancelled, journaled,
    /// no bounce); false when none is left.
    async fn drop_suppressed(&self, job: &mut Job, msg: &Message<'_>) -> bool {
        let (name, _) = crate::tenant::split_record_field(msg.tenant);
        let tenant = self.tenants.named(name);
        let scope = tenant.map_or("", |t| t.name());
        let (keep, gone): (Vec<JobRcpt>, Vec<JobRcpt>) = job.rcpts.iter().partition(|r| {
            msg.recipients
                .get(r.index as usize)
                .is_none_or(|x| !self.suppressions.suppressed(scope, x.address))
        });
        if gone.is_empty() {
            return true;
        }
        tracing::info!(queue_id = %job.queue_id, rcpts = gone.len(),
            "suppressed recipients cancelled before delivery");
        if let Some(t) = tenant {
            t.finished(gone.len());
        }
        let why = "550 5.1.1 recipient on the suppression list";
        self.cancel(job, &gone, why).await;
        job.rcpts = keep;
        !job.rcpts.is_empty()
    }

    /// Journals `rcpts` of `job` as cancelled (done, no bounce) with `reply` as the reason.
    async fn cancel(&self, job: &Job, rcpts: &[JobRcpt], reply: &str) {
        let outcomes = rcpts
            .iter()
            .map(|r| Outcome {
                rcpt_index: r.index,
                state: RcptState::Cancelled,
                attempts: r.attempts,
                next_attempt_micros: 0,
                reply: reply.into(),
            })
            .collect();
        let out = ShardMsg::Outcomes {
            spool: job.spool_shard,
            queue_id: job.queue_id,
            at_micros: now_micros(),
            outcomes,
        };
        let _ = self.router.send_to_spool(job.spool_shard, out).await;
    }

    fn requeue_front(&self, domain: &str, job: Job) {
        let n = job.rcpts.len();
        if let Some(q) = self.domains.borrow_mut().get_mut(domain) {
            q.push_front(job);
            self.router
                .stats
                .queued_rcpts
                .fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Microseconds to wait when the domain's rate limit has no token now.
    fn rate_wait(&self, domain: &str) -> Option<u64> {
        let mut domains = self.domains.borrow_mut();
        let q = domains.get_mut(domain)?;
        q.rate.try_take(now_micros()).err()
    }

    /// Waits up to `idle` for ready work; false when none came (or shutdown).
    async fn wait_for_work(&self, domain: &str, idle: Duration) -> bool {
        let wake = {
            let mut domains = self.domains.borrow_mut();
            let Some(q) = domains.get_mut(domain) else {
                return false;
            };
            q.idle_workers += 1;
            Rc::clone(&q.wake)
        };
        let mut shutdown = self.shutdown.clone();
        let deadline = tokio::time::Instant::now() + idle;
        let got = loop {
            if self.has_ready(domain) {
                break true;
            }
            tokio::select! {
                _ = wake.notified() => {}
                _ = self.slot_wanted.notified() => break self.has_ready(domain),
                _ = tokio::time::sleep_until(deadline) => break self.has_ready(domain),
                _ = shutdown.changed() => break false,
            }
        };
        if let Some(q) = self.domains.borrow_mut().get_mut(domain) {
            q.idle_workers -= 1;
        }
        got && !self.stopping()
    }

    /// Defers (or fails, when `permanent`) every ready job of a destination that cannot be
    /// reached.
    async fn give_up_ready(
        self: &Rc<Self>,
        domain: &Rc<str>,
        permanent: bool,
        verdict: &Verdict,
        info: AttemptInfo,
    ) {
        let jobs = match self.domains.borrow_mut().get_mut(domain) {
            Some(q) => q.take_ready(),
            None => Vec::new(),
        };
        self.unqueued(jobs.iter().map(|j| j.rcpts.len()).sum());
        let mut v = verdict.clone();
        if permanent && v.code < 500 {
            v.code = 550;
        }
        tracing::info!(%domain, jobs = jobs.len(), reply = %v.text, "destination unavailable");
        for job in jobs {
            let Some(mref) = self.read_job(domain, &job) else {
                continue;
            };
            let Ok(msg) = mref.message() else { continue };
            let n = job.rcpts.len();
            let info = AttemptInfo {
                started: Some(Instant::now()),
                ..AttemptInfo {
                    host: info.host.clone(),
                    ip: info.ip,
                    source: info.source.clone(),
                    tls: info.tls.clone(),
                    started: None,
                }
            };
            self.settle(domain, &job, &msg, vec![v.clone(); n], &info)
                .await;
        }
    }

    /// Turns one attempt's verdicts into outcomes: logs them, queues bounces for failures
    /// (committed before the failure is journaled), sends the outcomes to the spool's shard and
    /// requeues deferred recipients.
    async fn settle(
        self: &Rc<Self>,
        domain: &Rc<str>,
        job: &Job,
        msg: &Message<'_>,
        verdicts: Vec<Verdict>,
        info: &AttemptInfo,
    ) {
        let now = now_micros();
        let policy = match self.domains.borrow().get(domain) {
            Some(q) => Arc::clone(&q.policy),
            None => self.policies.for_domain(split_queue_name(domain).1),
        };
        let mut outcomes = Vec::with_capacity(job.rcpts.len());
        // (index, status, text, class)
        let mut failed: Vec<(usize, String, String, BounceClass)> = Vec::new();
        let mut delayed: Vec<(usize, String, String, BounceClass)> = Vec::new();
        let mut deferred: Vec<JobRcpt> = Vec::new();
        let attempts_max = job.rcpts.iter().map(|r| r.attempts + 1).max().unwrap_or(1);
        let retry =
            policy
                .schedule
                .after_failure(attempts_max, job.received_at_micros, now, self.random());
        let message_id = find_message_id(msg.body);
        let qid = job.queue_id.to_string();
        let latency_ms = info
            .started
            .map_or(0.0, |s| s.elapsed().as_secs_f64() * 1000.0);
        let waited = now.saturating_sub(job.received_at_micros);
        let (_, destination) = split_queue_name(domain);
        let (tenant, _) = crate::tenant::split_record_field(msg.tenant);
        let m = &self.metrics;
        m.inc(Counter::DeliveryAttempts, job.rcpts.len() as u64);
        for (r, v) in job.rcpts.iter().zip(verdicts.iter()) {
            let attempts = r.attempts + 1;
            if r.attempts == 0 {
                m.record(self.shard, Hist::QueueWait, waited);
            }
            if (200..300).contains(&v.code) {
                m.record(self.shard, Hist::EndToEnd, waited);
            }
            let (state, next, log_outcome, text) = if (200..300).contains(&v.code) {
                (
                    RcptState::Delivered,
                    0,
                    AttemptOutcome::Delivered,
                    v.text.clone(),
                )
            } else if v.code >= 500 {
                (RcptState::Failed, 0, AttemptOutcome::Failed, v.text.clone())
            } else {
                match retry {
                    Next::RetryAt(at) => (
                        RcptState::Deferred,
                        at,
                        AttemptOutcome::Deferred,
                        v.text.clone(),
                    ),
                    Next::Expire => (
                        RcptState::Failed,
                        0,
                        AttemptOutcome::Expired,
                        format!(
                            "message expired after {attempts} attempts; last: {}",
                            v.text
                        ),
                    ),
                }
            };
            let class = (state != RcptState::Delivered).then(|| {
                self.classifier
                    .classify(v.code, v.enhanced.as_deref(), &v.text)
            });
            if let Some(c) = class {
                self.metrics.bounce_class(c, state == RcptState::Failed);
            }
            let address = msg
                .recipients
                .get(r.index as usize)
                .map_or("", |x| x.address);
            if state == RcptState::Failed {
                let status = match (log_outcome, &v.enhanced) {
                    (AttemptOutcome::Expired, _) => "4.4.7".to_string(),
                    (_, Some(e)) => e.clone(),
                    _ => format!("{}.0.0", v.code / 100),
                };
                let c = class.unwrap_or(BounceClass::Other);
                // A hard bounce from the destination (not an expiry, not a local refusal of
                // ours: those have no host) keeps the address from being mailed again.
                if c.is_hard() && v.code >= 500 && info.host.is_some() && !address.is_empty() {
                    let scope = self.tenants.named(tenant).map_or("", |t| t.name());
                    let entry = [address.to_string()];
                    if let Ok(1) = self.suppressions.add(scope, &entry, &v.text, false) {
                        tracing::info!(rcpt = address, scope, "suppressed after a hard bounce");
                    }
                }
                failed.push((r.index as usize, status, text.clone(), c));
            }
            let delay_after = self.config.delivery.delay_dsn_after_secs * 1_000_000;
            let mut delay_notified = r.delay_notified;
            if state == RcptState::Deferred
                && delay_after > 0
                && !r.delay_notified
                && waited >= delay_after
                && msg
                    .recipients
                    .get(r.index as usize)
                    .is_some_and(|x| x.notify & spool::notify::DELAY != 0)
            {
                delay_notified = true;
                let status = v.enhanced.clone().unwrap_or_else(|| "4.0.0".into());
                let c = class.unwrap_or(BounceClass::Other);
                delayed.push((r.index as usize, status, text.clone(), c));
            }
            if state == RcptState::Deferred {
                deferred.push(JobRcpt {
                    index: r.index,
                    attempts,
                    delay_notified,
                });
            }
            if let Some(log) = self.log.borrow_mut().as_mut() {
                let tls = info.tls.as_ref();
                let record = AttemptRecord {
                    time: rfc3339(now),
                    queue_id: &qid,
                    message_id,
                    sender: msg.sender,
                    recipient: address,
                    domain: destination,
                    tenant,
                    mx_host: info.host.as_deref(),
                    mx_ip: info.ip.map(|i| i.to_string()),
                    source: info.source.as_deref(),
                    tls_version: tls.map(|t| t.0.as_str()),
                    tls_cipher: tls.map(|t| t.1.as_str()),
                    outcome: log_outcome,
                    reply: &text,
                    enhanced_code: v.enhanced.as_deref(),
                    bounce_class: class.map(BounceClass::as_str),
                    attempt: attempts,
                    latency_ms,
                };
                if let Err(e) = log.write(&record) {
                    tracing::warn!(error = %e, "delivery log write failed");
                }
            }
            outcomes.push(Outcome {
                rcpt_index: r.index,
                state,
                attempts,
                next_attempt_micros: next,
                reply: text,
            });
        }
        if !delayed.is_empty() {
            // A delay report that cannot be stored now is not retried (it is advice).
            let until = job.received_at_micros / 1_000_000 + policy.schedule.max_age.as_secs();
            let kind = crate::delivery::dsn::Report::Delay {
                retry_until_secs: until,
            };
            if !self.queue_bounce(msg, &delayed, info, kind).await {
                tracing::warn!(queue_id = %job.queue_id, "delay report not queued");
            }
        }
        let kind = crate::delivery::dsn::Report::Failure;
        let bounce_failed =
            !failed.is_empty() && !self.queue_bounce(msg, &failed, info, kind).await;
        if bounce_failed {
            // No bounce could be queued (spool full): the failure is not journaled yet; the
            // recipients wait and fail again later, when their bounce can be stored.
            let later = now + READ_RETRY.as_micros() as u64;
            for o in outcomes.iter_mut().filter(|o| o.state == RcptState::Failed) {
                o.state = RcptState::Deferred;
                o.next_attempt_micros = later;
                deferred.push(JobRcpt {
                    index: o.rcpt_index,
                    attempts: o.attempts,
                    delay_notified: false,
                });
            }
        }
        let mut counts = [0u64; 3];
        for o in &outcomes {
            match o.state {
                RcptState::Delivered => counts[0] += 1,
                RcptState::Deferred => counts[1] += 1,
                _ => counts[2] += 1,
            }
        }
        let source = info.source.as_deref();
        self.metrics.outcomes(destination, tenant, source, counts);
        if let Some(t) = self.tenant_of(domain) {
            t.finished((counts[0] + counts[2]) as usize);
        }
        let out = ShardMsg::Outcomes {
            spool: job.spool_shard,
            queue_id: job.queue_id,
            at_micros: now,
            outcomes,
        };
        if self
            .router
            .send_to_spool(job.spool_shard, out)
            .await
            .is_err()
        {
            tracing::error!(queue_id = %job.queue_id, "outcomes not journaled (inbox full)");
        }
        if !deferred.is_empty() {
            let at = match retry {
                Next::RetryAt(at) => at,
                Next::Expire => now,
            };
            let at = if bounce_failed {
                at.max(now + READ_RETRY.as_micros() as u64)
            } else {
                at
            };
            let again = Job {
                rcpts: deferred,
                failed_over: false,
                ..job.clone()
            };
            self.push_job(domain, again, at, now);
        }
    }

    /// Queues a DSN for `failed` recipients (index, status, diagnostic) of `msg` in this
    /// shard's spool and hands it to its owner; returns once it is committed.
    async fn queue_bounce(
        self: &Rc<Self>,
        msg: &Message<'_>,
        failed: &[(usize, String, String, BounceClass)],
        info: &AttemptInfo,
        kind: crate::delivery::dsn::Report,
    ) -> bool {
        let d = &self.config.delivery;
        let sender_domain = crate::mesh::route::domain_of(msg.sender).to_ascii_lowercase();
        if !d.bounces
            || d.bounce_exempt_sender_domains
                .iter()
                .any(|x| x.eq_ignore_ascii_case(&sender_domain))
        {
            return true;
        }
        let list: Vec<FailedRecipient<'_>> = failed
            .iter()
            .filter_map(|(i, status, text, class)| {
                let r = msg.recipients.get(*i)?;
                Some(FailedRecipient {
                    address: r.address,
                    orcpt: r.orcpt,
                    notify: r.notify,
                    status,
                    diagnostic: text,
                    remote_mta: info.host.as_deref(),
                    class: Some(class.as_str()),
                })
            })
            .collect();
        let now = now_micros();
        let queue_id = self.spool.borrow_mut().next_queue_id(now);
        let Some(bounce) = build_bounce(
            msg,
            &list,
            &self.config.server.hostname,
            &queue_id.to_string(),
            self.random(),
            now / 1_000_000,
            kind,
        ) else {
            return true;
        };
        let mut flags = 0;
        if bounce.eight_bit {
            flags |= message_flags::BODY_8BITMIME;
        }
        if bounce.smtputf8 {
            flags |= message_flags::SMTPUTF8;
        }
        let message = Message {
            queue_id,
            received_at_micros: now,
            flags,
            dsn_ret: DsnRet::Unspecified,
            tenant: "",
            sender: "",
            envid: "",
            recipients: vec![Recipient::new(&bounce.recipient)],
            body: &bounce.body,
        };
        match crate::intake::commit(&self.spool, &message, None).await {
            Ok(base) => {
                self.metrics.inc(Counter::Bounces, 1);
                tracing::info!(%queue_id, original = %msg.queue_id, to = %bounce.recipient,
                    "bounce queued");
                crate::intake::hand_off(&self.router, self.shard, &message, base).await;
                true
            }
            Err(e) => {
                tracing::error!(original = %msg.queue_id, error = %e, "bounce not queued");
                false
            }
        }
    }

    /// Answers an operator request for the domains this shard owns.
    pub fn admin(self: &Rc<Self>, req: &Request) -> ShardReply {
        let now = now_micros();
        let mut reply = ShardReply::default();
        match req {
            Request::Summary | Request::TenantSummary(_) => {
                let domains = self.domains.borrow();
                for (d, q) in domains.iter() {
                    let (tenant, domain) = split_queue_name(d);
                    if let Request::TenantSummary(t) = req {
                        if tenant != Some(t.as_str()) {
                            continue;
                        }
                    }
                    reply.domains.push(DomainSummary {
                        domain: domain.to_string(),
                        tenant: tenant.unwrap_or_default().to_string(),
                        source: queue_egress(d).map_or("", |(_, s)| s).to_string(),
                        provider: q
                            .provider
                            .map_or("", |p| self.providers.name(p))
                            .to_string(),
                        shard: self.shard,
                        queued_rcpts: q.queued_rcpts(),
                        ready_jobs: q.ready_jobs(),
                        deferred_jobs: q.deferred_jobs(),
                        oldest_age_secs: q
                            .oldest_received_micros()
                            .map(|t| now.saturating_sub(t) / 1_000_000),
                        next_attempt_in_secs: q
                            .next_due_micros()
                            .map(|t| t.saturating_sub(now) / 1_000_000),
                        suspended: q.paused(),
                        connections: q.workers,
                    });
                }
            }
            Request::Suspend(d) | Request::Resume(d) => {
                let suspend = matches!(req, Request::Suspend(_));
                let d = d.to_ascii_lowercase();
                let owner = crate::mesh::route::owner_shard(&d, self.router.shards());
                // A spread destination has queues on every shard: each keeps the state.
                if owner == self.shard as usize || self.router.is_spread(&d) {
                    // The destination's own queue keeps the saved state; its tenants' queues
                    // follow it.
                    let key: Rc<str> = d.as_str().into();
                    let mut domains = self.domains.borrow_mut();
                    if !domains.contains_key(&key) {
                        let q = self.new_queue(&domains, &d, now);
                        domains.insert(Rc::clone(&key), q);
                    }
                    let mut keys = Vec::new();
                    for (k, q) in domains.iter_mut() {
                        if split_queue_name(k).1 == d {
                            q.suspended = suspend;
                            q.wake.notify_waiters();
                            keys.push(Rc::clone(k));
                        }
                    }
                    reply.affected = 1;
                    drop(domains);
                    self.save_suspended();
                    for k in keys {
                        self.kick(&k);
                    }
                }
            }
            Request::Status(id) => {
                if let Some(live) = self.spool.borrow().get(*id) {
                    let rcpts: Vec<serde_json::Value> = live
                        .rcpts
                        .iter()
                        .map(|r| {
                            serde_json::json!({
                                "state": format!("{:?}", r.state).to_lowercase(),
                                "attempts": r.attempts,
                                "next_attempt_unix_us": r.next_attempt_micros,
                                "last_reply": r.last_reply.as_deref(),
                            })
                        })
                        .collect();
                    reply.message = Some(serde_json::json!({
                        "queue_id": id.to_string(),
                        "spool_shard": self.shard,
                        "received_unix_us": live.received_at_micros,
                        "recipients": rcpts,
                    }));
                    reply.affected = 1;
                }
            }
            Request::SuspendTenant(name) | Request::ResumeTenant(name) => {
                let hold = matches!(req, Request::SuspendTenant(_));
                let Some(t) = self.tenants.named(name) else {
                    return reply;
                };
                t.set_suspended(hold);
                let keys: Vec<Rc<str>> = {
                    let mut domains = self.domains.borrow_mut();
                    domains
                        .iter_mut()
                        .filter(|(k, _)| split_queue_name(k).0 == Some(name.as_str()))
                        .map(|(k, q)| {
                            q.held = hold;
                            q.wake.notify_waiters();
                            Rc::clone(k)
                        })
                        .collect()
                };
                reply.affected = usize::from(self.shard == 0);
                for k in keys {
                    self.kick(&k);
                }
            }
            Request::Flush(d) => {
                let keys: Vec<Rc<str>> = {
                    let mut domains = self.domains.borrow_mut();
                    domains
                        .iter_mut()
                        .filter(|(k, _)| {
                            let dest = split_queue_name(k).1;
                            d.as_ref().is_none_or(|d| d.eq_ignore_ascii_case(dest))
                        })
                        .map(|(k, q)| {
                            reply.affected += q.flush();
                            Rc::clone(k)
                        })
                        .collect()
                };
                for k in keys {
                    self.kick(&k);
                }
            }
            Request::Bounce(sel) | Request::Delete(sel) => {
                let bounce = matches!(req, Request::Bounce(_));
                let mut taken: Vec<(Rc<str>, Job)> = Vec::new();
                {
                    let mut domains = self.domains.borrow_mut();
                    for (k, q) in domains.iter_mut() {
                        let jobs = match sel {
                            Selector::Domain(d)
                                if d.eq_ignore_ascii_case(split_queue_name(k).1) =>
                            {
                                q.take_where(|_| true)
                            }
                            Selector::Message(id) => q.take_where(|j| j.queue_id == *id),
                            _ => continue,
                        };
                        taken.extend(jobs.into_iter().map(|j| (Rc::clone(k), j)));
                    }
                }
                self.unqueued(taken.iter().map(|(_, j)| j.rcpts.len()).sum());
                reply.affected = taken.iter().map(|(_, j)| j.rcpts.len()).sum();
                let this = Rc::clone(self);
                tokio::task::spawn_local(async move {
                    for (domain, job) in taken {
                        this.remove_job(&domain, job, bounce).await;
                    }
                });
            }
        }
        reply
    }

    /// Writes the suspended domains (durably replaced: `state_file`).
    fn save_suspended(&self) {
        let mut list: Vec<String> = self
            .domains
            .borrow()
            .iter()
            .filter(|(d, q)| q.suspended && split_queue_name(d) == (None, &**d))
            .map(|(d, _)| d.to_string())
            .collect();
        list.sort();
        let text: String = list.iter().map(|d| format!("{d}\n")).collect();
        let saved = crate::state_file::replace(&self.suspended_file, text.as_bytes());
        if let Err(e) = saved {
            let file = self.suspended_file.display().to_string();
            tracing::error!(%file, error = %e, "suspended domains not saved");
        }
    }

    /// Ends a job removed by an operator: failed with a bounce, or cancelled silently.
    async fn remove_job(self: &Rc<Self>, domain: &Rc<str>, job: Job, bounce: bool) {
        if bounce {
            let Some(mref) = self.read_job(domain, &job) else {
                return;
            };
            let Ok(msg) = mref.message() else { return };
            let v = Verdict::local(550, "5.0.0", "removed from the queue by an operator");
            let n = job.rcpts.len();
            self.settle(domain, &job, &msg, vec![v; n], &AttemptInfo::default())
                .await;
        } else {
            if let Some(t) = self.tenant_of(domain) {
                t.finished(job.rcpts.len());
            }
            self.cancel(&job, &job.rcpts, "deleted by an operator")
                .await;
        }
    }

    /// The queues for the gauges: recipients by state, and the biggest domains.
    pub fn queue_snapshot(&self) -> crate::metrics::QueueSnapshot {
        let mut snap = crate::metrics::QueueSnapshot::default();
        // Per destination: the tenants' queues of one domain add up.
        let mut by_domain: HashMap<&str, (u64, u64)> = HashMap::new();
        let domains = self.domains.borrow();
        for (d, q) in domains.iter() {
            let queued = q.queued_rcpts() as u64;
            if q.paused() {
                snap.suspended_rcpts += queued;
            } else {
                let (ready, deferred) = q.rcpts_by_state();
                snap.ready_rcpts += ready as u64;
                snap.deferred_rcpts += deferred as u64;
            }
            let row = by_domain.entry(split_queue_name(d).1).or_default();
            row.0 += queued;
            row.1 += q.workers as u64;
        }
        let mut all: Vec<(String, u64, u64)> = by_domain
            .into_iter()
            .map(|(d, (queued, workers))| (d.to_string(), queued, workers))
            .collect();
        all.sort_by_key(|b| std::cmp::Reverse(b.1));
        for (i, row) in all.into_iter().enumerate() {
            if i < crate::metrics::TOP_LABELS {
                snap.top.push(row);
            } else {
                snap.other_rcpts += row.1;
                snap.other_connections += row.2;
            }
        }
        snap
    }

    /// Flushes the delivery log (at shutdown).
    pub fn close(&self) {
        if let Some(log) = self.log.borrow_mut().as_mut() {
            let _ = log.flush();
        }
    }
}

/// The envelope of one job: the message's sender and parameters, the job's recipients.
fn envelope<'m>(msg: &Message<'m>, job: &Job) -> Envelope<'m> {
    Envelope {
        sender: msg.sender,
        recipients: job
            .rcpts
            .iter()
            .filter_map(|r| msg.recipients.get(r.index as usize))
            .map(|r| (r.address, r.notify, r.orcpt))
            .collect(),
        size: msg.body.len(),
        eight_bit: msg.flags & (message_flags::BODY_8BITMIME | message_flags::BODY_BINARYMIME) != 0,
        smtputf8: msg.flags & message_flags::SMTPUTF8 != 0,
        ret: match msg.dsn_ret {
            DsnRet::Unspecified => None,
            DsnRet::Full => Some("FULL"),
            DsnRet::Headers => Some("HDRS"),
        },
        envid: msg.envid,
    }
}

/// True when connecting failed because the local address could not be bound (not configured
/// on this host, or not allowed).
fn is_bind_failure(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::AddrNotAvailable | std::io::ErrorKind::PermissionDenied
    )
}

/// Why an address from an MX answer must not be connected to, if it must not: loopback,
/// unspecified, link-local, multicast or broadcast (unless `[dns] local_networks_allowed`
/// lists it), or one of this server's own listeners. Explicit routes are not checked.
pub fn refused_mx_address(config: &Config, addr: SocketAddr) -> Option<&'static str> {
    let ip = match addr.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr.ip(), IpAddr::V4),
        v4 => v4,
    };
    let own = config.listeners.iter().any(|l| {
        l.address.port() == addr.port()
            && (l.address.ip() == ip || (l.address.ip().is_unspecified() && ip.is_loopback()))
    });
    if own {
        return Some("this server's own listener");
    }
    let special = match ip {
        IpAddr::V4(v4) => (v4.is_loopback().then_some("loopback"))
            .or_else(|| v4.is_unspecified().then_some("unspecified"))
            .or_else(|| v4.is_link_local().then_some("link-local"))
            .or_else(|| v4.is_multicast().then_some("multicast"))
            .or_else(|| v4.is_broadcast().then_some("broadcast")),
        IpAddr::V6(v6) => (v6.is_loopback().then_some("loopback"))
            .or_else(|| v6.is_unspecified().then_some("unspecified"))
            .or_else(|| v6.is_unicast_link_local().then_some("link-local"))
            .or_else(|| v6.is_multicast().then_some("multicast")),
    };
    let allowed = config
        .dns
        .local_networks_allowed
        .iter()
        .any(|n| n.contains(ip));
    special.filter(|_| !allowed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_and_own_addresses_from_dns_are_refused() {
        let mut c = Config::default();
        c.listeners[0].address = "127.0.0.1:25".parse().unwrap();
        let at = |s: &str| refused_mx_address(&c, s.parse().unwrap());
        assert_eq!(at("127.0.0.1:25"), Some("this server's own listener"));
        assert_eq!(at("127.0.0.9:25"), Some("loopback"));
        assert_eq!(at("[::1]:25"), Some("loopback"));
        assert_eq!(at("[::ffff:127.0.0.1]:2525"), Some("loopback"));
        assert_eq!(at("0.0.0.0:25"), Some("unspecified"));
        assert_eq!(at("169.254.1.1:25"), Some("link-local"));
        assert_eq!(at("[fe80::1]:25"), Some("link-local"));
        assert_eq!(at("224.0.0.1:25"), Some("multicast"));
        assert_eq!(at("192.0.2.1:25"), None);
        c.dns.local_networks_allowed = vec!["127.0.0.0/8".parse().unwrap()];
        let at = |s: &str| refused_mx_address(&c, s.parse().unwrap());
        assert_eq!(at("127.0.0.9:25"), None, "allowed for a test bed");
        assert_eq!(at("127.0.0.1:25"), Some("this server's own listener"));
    }
}
