//! Thread-per-core runtime: one pinned thread per shard, each with its own single-threaded
//! runtime (io_uring or epoll), its own listening sockets (`SO_REUSEPORT`: the kernel spreads
//! connections), its own spool directory and commit group.
//!
//! Cross-shard traffic goes over the mesh (`crate::mesh`): bounded channels built once at
//! start-up, a shard that accepted a message handing each recipient to the shard owning the
//! recipient's domain.
//!
//! # Adopted spools
//! A spool is a directory `shard-N` under `[spool] dir`, and `N` is the spool's id (written
//! into its segment headers and queue ids). When the shard count shrinks (`shards`, or the CPU
//! count under `shards = 0`), spools `shard-N` with `N >= shards` have no shard of their own:
//! at start, shard `N % shards` *adopts* each one. It recovers it, hands its recipients to their
//! domains' owners like its own, journals their outcomes there, and takes no new mail into it;
//! once nothing in it is live it is closed and its directory removed. Messages always stay in
//! the spool that took them: `Router::send_to_spool` finds the shard hosting a spool id.
//!
//! # Backends
//! `backend = "auto"` tries io_uring (`tokio_uring::Runtime::new`, which reports an error where
//! the kernel or a seccomp filter refuses io_uring) and falls back to epoll; the log says which
//! runs. `"io_uring"` fails instead of falling back; `"epoll"` never tries io_uring.
//!
//! # Shutdown
//! On SIGTERM or SIGINT the shards stop accepting and start no new transaction: an SMTP
//! session between transactions is answered `421 4.3.2`, one inside a transaction may finish
//! it (a new `MAIL` then gets `421`), and outbound connections finish the transaction they are
//! in and send no other. All of it within `shutdown_grace_secs`; then the spools are closed
//! (which commits everything pending) and the process exits.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use spool::{Location, QueueId, Spool};
use tokio::sync::mpsc::Receiver;
use tokio::sync::watch;

use crate::auth::{Credentials, client_key};
use crate::config::{Backend, Config, ListenerTls};
use crate::delivery::engine::Deliverer;
use crate::mesh::{
    Handoff, HandoffRcpt, Outcome, Router, RouterStats, ShardMsg, SpoolReaders, route,
};
use crate::smtp::server::session::{ConnInfo, Session, ShardContext};
use saida_net::epoll::EpollStream;
use saida_net::tls::{ReloadingTls, TlsStream};
use saida_net::uring::UringStream;
use saida_net::{Conn, Stream};
use smtp_proto::reply::Reply;

/// Connection limits shared by all shards (touched at connect and disconnect only).
///
/// Clients are counted per address, IPv6 clients per /64 (one host usually holds a whole /64).
/// The last `reserved` slots are kept for relay networks and for clients that authenticate:
/// an anonymous client admitted into them must authenticate quickly or is closed.
pub struct ConnLimits {
    total: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    total_max: usize,
    per_ip_max: usize,
    reserved: usize,
}

/// Releases a connection slot when dropped.
pub struct ConnGuard {
    limits: Arc<ConnLimits>,
    key: Option<IpAddr>,
    /// Admitted into the reserve: the session must authenticate to keep it.
    pub reserved: bool,
}

impl ConnLimits {
    pub fn new(total_max: usize, per_ip_max: usize, reserved: usize) -> Arc<ConnLimits> {
        Arc::new(ConnLimits {
            total: AtomicUsize::new(0),
            per_ip: Mutex::default(),
            total_max,
            per_ip_max,
            reserved: reserved.min(total_max),
        })
    }

    /// Takes a slot for `ip`, or says which limit is reached. A `trusted` client (one of the
    /// relay networks) is not limited per address and may use the reserve.
    pub fn acquire(self: &Arc<Self>, ip: IpAddr, trusted: bool) -> Result<ConnGuard, &'static str> {
        let mut map = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        let total = self.total.load(Ordering::Relaxed);
        if total >= self.total_max {
            return Err("Too many connections");
        }
        let reserved = !trusted && total >= self.total_max - self.reserved;
        let key = if trusted {
            None
        } else {
            let key = client_key(ip);
            let n = map.entry(key).or_insert(0);
            if *n >= self.per_ip_max {
                return Err("Too many connections from your address");
            }
            *n += 1;
            Some(key)
        };
        self.total.fetch_add(1, Ordering::Relaxed);
        Ok(ConnGuard {
            limits: Arc::clone(self),
            key,
            reserved,
        })
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut map = self.limits.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = self.key.and_then(|k| map.get_mut(&k)) {
            *n -= 1;
            if *n == 0 {
                if let Some(k) = self.key {
                    map.remove(&k);
                }
            }
        }
        self.limits.total.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What runs, for the log and `/metrics` later.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunningBackend {
    IoUring,
    Epoll,
}

/// Everything a shard thread needs, moved into it.
struct ShardSetup {
    shard: u16,
    /// Spools of a larger shard count that this shard hosts until they drain.
    adopt: Vec<u16>,
    config: Arc<Config>,
    credentials: Option<Arc<Credentials>>,
    auth_throttle: Arc<crate::auth::AuthThrottle>,
    /// Message bytes all sessions of all shards may hold.
    inflight: Arc<crate::smtp::server::inflight::InflightBudget>,
    router: Router,
    inbox: Receiver<ShardMsg>,
    readers: SpoolReaders,
    metrics: Arc<crate::metrics::Metrics>,
    tenants: Arc<crate::tenant::Tenants>,
    dkim: Arc<saida_dkim::Keyring>,
    suppressions: Arc<crate::suppression::Suppressions>,
    providers: Arc<crate::delivery::provider::Providers>,
    limits: Arc<ConnLimits>,
    shutdown: watch::Receiver<bool>,
    listeners: Vec<(std::net::TcpListener, ListenerTls)>,
    ready: std::sync::mpsc::Sender<Result<RunningBackend, String>>,
}

/// A running server: join it after signalling shutdown.
pub struct Server {
    threads: Vec<std::thread::JoinHandle<()>>,
    shutdown: watch::Sender<bool>,
    pub backends: Vec<RunningBackend>,
    pub local_addrs: Vec<SocketAddr>,
    pub router_stats: Arc<RouterStats>,
    pub router: Router,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub tenants: Arc<crate::tenant::Tenants>,
    pub suppressions: Arc<crate::suppression::Suppressions>,
    /// Mailbox providers and every path's backoff.
    pub providers: Arc<crate::delivery::provider::Providers>,
    /// The spool directory's lock, released when the server is dropped.
    _spool_lock: spool::lock::DirLock,
}

impl Server {
    /// Binds every listener on every shard, opens every spool, starts the shards; returns once
    /// all are ready (or the first failure).
    pub fn start(config: Config) -> anyhow::Result<Server> {
        // One saida per spool: taken before any listener is bound or any spool recovered.
        let spool_lock = spool::lock::DirLock::acquire(&config.spool.dir)?;
        let mut config = config;
        if config.tls.is_none() && config.server.self_signed_tls {
            let dir = config.spool.dir.join("tls");
            let (certificate, key) =
                saida_net::tls::ensure_self_signed(&dir, &config.server.hostname)?;
            let why = "no [tls]: STARTTLS with a self-signed certificate";
            tracing::info!(cert = %certificate.display(), "{why}");
            config.tls = Some(crate::config::Tls {
                certificate,
                key,
                reload_secs: 60,
            });
        }
        let config = Arc::new(config);
        let credentials = match &config.auth.credentials_file {
            Some(p) => {
                let c = Credentials::load(p)?;
                tracing::info!(file = %p.display(), users = c.len(), "credentials loaded");
                Some(Arc::new(c))
            }
            None => None,
        };
        let shards = config.shard_count();
        let queued_max = config.delivery.queued_rcpts_max.saturating_mul(shards);
        let (router, inboxes) = Router::new(shards, queued_max);
        // Routes with `spread_over_shards`: delivered by the accepting shard.
        let policies =
            crate::delivery::policy::DeliveryPolicies::new(&config.delivery, &config.routes)
                .map_err(|(k, m)| anyhow::anyhow!("{k}: {m}"))?;
        let router = router.with_spread(Arc::new(move |domain: &str| {
            policies.for_domain(domain).spread_over_shards
        }));
        let orphans = orphan_spools(&config.spool.dir, shards)?;
        let slots = orphans
            .iter()
            .map(|id| *id as usize + 1)
            .max()
            .unwrap_or(0)
            .max(shards);
        let readers: SpoolReaders = Arc::new((0..slots).map(|_| Default::default()).collect());
        if !orphans.is_empty() {
            tracing::warn!(
                shards,
                spools = ?orphans,
                "spools of a larger shard count found; adopting them until they drain"
            );
        }
        let tenants = crate::tenant::Tenants::new(&config.tenants);
        let tenants = Arc::new(if config.delivery.enabled {
            tenants
        } else {
            tenants.without_queue_counting()
        });
        crate::tenant::restore_suspended(&tenants, &config.spool.dir);
        let sources = config
            .dkim_sources()
            .map_err(|(k, m)| anyhow::anyhow!("{k}: {m}"))?;
        let dkim = Arc::new(saida_dkim::Keyring::load(sources)?);
        let backoff_rules = config
            .backoff_rules()
            .map_err(|(k, m)| anyhow::anyhow!("{k}: {m}"))?;
        let providers = Arc::new(crate::delivery::provider::Providers::with_backoff(
            &config.providers,
            backoff_rules,
            &config.spool.dir,
        ));
        let suppressions = Arc::new(
            crate::suppression::Suppressions::open(&config.spool.dir)
                .context("the suppression list")?,
        );
        if suppressions.len() > 0 {
            tracing::info!(entries = suppressions.len(), "suppression list loaded");
        }
        if !dkim.keys().is_empty() {
            tracing::info!(keys = dkim.keys().len(), "DKIM keys loaded");
        }
        saida_dkim::Keyring::watch(
            &dkim,
            Duration::from_secs(config.signing.dkim_reload_secs),
            |e| tracing::error!(error = %e, "DKIM key not reloaded; the last good one stays"),
        )?;
        let metrics = Arc::new(
            crate::metrics::Metrics::with_recording(shards, config.admin.metrics)
                .with_tenants(Arc::clone(&tenants))
                .with_providers(Arc::clone(&providers)),
        );
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let auth_throttle = Arc::new(crate::auth::AuthThrottle::new(cpus));
        let inflight = crate::smtp::server::inflight::InflightBudget::new(
            config.smtp.inflight_message_bytes_max,
        );
        let limits = ConnLimits::new(
            config.smtp.connections_max,
            config.smtp.connections_per_ip_max,
            config.smtp.connections_reserved,
        );
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let cores = core_affinity::get_core_ids().unwrap_or_default();
        // Resolve port 0 once, so that every shard binds the same port.
        let mut addrs: Vec<(SocketAddr, ListenerTls)> = config
            .listeners
            .iter()
            .map(|l| (l.address, l.tls))
            .collect();
        let mut threads = Vec::new();
        let mut readies = Vec::new();
        for (shard, inbox) in inboxes.into_iter().enumerate() {
            let mut listeners = Vec::new();
            for (addr, tls) in addrs.iter_mut() {
                let l = saida_net::bind_reuseport(*addr)
                    .with_context(|| format!("listening on {addr}"))?;
                *addr = l.local_addr()?;
                listeners.push((l, *tls));
            }
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            readies.push(ready_rx);
            let adopt: Vec<u16> = orphans
                .iter()
                .copied()
                .filter(|id| *id as usize % shards == shard)
                .collect();
            let setup = ShardSetup {
                shard: shard as u16,
                adopt,
                config: Arc::clone(&config),
                credentials: credentials.clone(),
                auth_throttle: Arc::clone(&auth_throttle),
                inflight: Arc::clone(&inflight),
                router: router.clone(),
                inbox,
                readers: Arc::clone(&readers),
                metrics: Arc::clone(&metrics),
                tenants: Arc::clone(&tenants),
                dkim: Arc::clone(&dkim),
                suppressions: Arc::clone(&suppressions),
                providers: Arc::clone(&providers),
                limits: Arc::clone(&limits),
                shutdown: shutdown_rx.clone(),
                listeners,
                ready: ready_tx,
            };
            let core = cores.get(shard % cores.len().max(1)).copied();
            let t = std::thread::Builder::new()
                .name(format!("shard-{shard}"))
                .spawn(move || {
                    if let Some(core) = core {
                        core_affinity::set_for_current(core);
                    }
                    run_shard(setup);
                })
                .context("starting a shard thread")?;
            threads.push(t);
        }
        let mut backends = Vec::new();
        for (i, r) in readies.into_iter().enumerate() {
            match r.recv() {
                Ok(Ok(b)) => backends.push(b),
                Ok(Err(e)) => {
                    let _ = shutdown_tx.send(true);
                    anyhow::bail!("shard {i}: {e}");
                }
                Err(_) => anyhow::bail!("shard {i} exited during start-up"),
            }
        }
        Ok(Server {
            threads,
            shutdown: shutdown_tx,
            backends,
            local_addrs: addrs.into_iter().map(|(a, _)| a).collect(),
            router_stats: Arc::clone(&router.stats),
            router,
            metrics,
            tenants,
            suppressions,
            providers,
            _spool_lock: spool_lock,
        })
    }

    /// Signals shutdown and waits for every shard.
    pub fn stop(self) {
        let _ = self.shutdown.send(true);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

fn run_shard(setup: ShardSetup) {
    let backend = setup.config.server.backend;
    if backend != Backend::Epoll {
        match tokio_uring::Runtime::new(&tokio_uring::builder()) {
            Ok(rt) => {
                tracing::info!(shard = setup.shard, "running on io_uring");
                rt.block_on(shard_main::<UringAcceptor>(setup, RunningBackend::IoUring));
                return;
            }
            Err(e) if backend == Backend::IoUring => {
                let _ = setup.ready.send(Err(format!("io_uring unavailable: {e}")));
                return;
            }
            Err(e) => {
                let why = "io_uring unavailable; falling back to epoll";
                tracing::warn!(shard = setup.shard, error = %e, "{why}")
            }
        }
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = setup
                .ready
                .send(Err(format!("cannot build a runtime: {e}")));
            return;
        }
    };
    tracing::info!(shard = setup.shard, "running on epoll");
    let local = tokio::task::LocalSet::new();
    local.block_on(
        &rt,
        shard_main::<EpollAcceptor>(setup, RunningBackend::Epoll),
    );
}

/// A listening socket on one backend.
trait Acceptor: Sized + 'static {
    type S: Stream + saida_net::Dial + 'static;
    fn from_std(l: std::net::TcpListener) -> std::io::Result<Self>;
    async fn accept(&self) -> std::io::Result<(Self::S, SocketAddr)>;
}

struct EpollAcceptor(tokio::net::TcpListener);

impl Acceptor for EpollAcceptor {
    type S = EpollStream;
    fn from_std(l: std::net::TcpListener) -> std::io::Result<Self> {
        Ok(EpollAcceptor(tokio::net::TcpListener::from_std(l)?))
    }
    async fn accept(&self) -> std::io::Result<(EpollStream, SocketAddr)> {
        let (s, peer) = self.0.accept().await?;
        s.set_nodelay(true)?;
        Ok((EpollStream(s), peer))
    }
}

struct UringAcceptor(tokio_uring::net::TcpListener);

impl Acceptor for UringAcceptor {
    type S = UringStream;
    fn from_std(l: std::net::TcpListener) -> std::io::Result<Self> {
        Ok(UringAcceptor(tokio_uring::net::TcpListener::from_std(l)))
    }
    async fn accept(&self) -> std::io::Result<(UringStream, SocketAddr)> {
        let (s, peer) = self.0.accept().await?;
        s.set_nodelay(true)?;
        Ok((UringStream(s), peer))
    }
}

async fn shard_main<A: Acceptor>(setup: ShardSetup, backend: RunningBackend) {
    let ShardSetup {
        shard,
        adopt,
        config,
        credentials,
        auth_throttle,
        inflight,
        router,
        inbox,
        readers,
        metrics,
        tenants,
        dkim,
        suppressions,
        providers,
        limits,
        shutdown,
        listeners,
        ready,
    } = setup;
    let spool = match config
        .spool_config(shard)
        .map_err(|e| e.to_string())
        .and_then(|c| {
            let (spool, report) = Spool::open(c).map_err(|e| e.to_string())?;
            tracing::info!(
                shard,
                records = report.records,
                live = spool.len(),
                torn_tail = report.torn_tail.is_some(),
                damage = report.damage_count,
                "spool recovered"
            );
            Ok(spool)
        }) {
        Ok(s) => s,
        Err(e) => {
            let _ = ready.send(Err(format!("spool: {e}")));
            return;
        }
    };
    let tls = match &config.tls {
        Some(t) => {
            match ReloadingTls::load(&t.certificate, &t.key, Duration::from_secs(t.reload_secs)) {
                Ok(r) => Some(Rc::new(RefCell::new(r))),
                Err(e) => {
                    let _ = ready.send(Err(format!("tls: {e}")));
                    return;
                }
            }
        }
        None => None,
    };
    let mut acceptors = Vec::new();
    for (l, mode) in listeners {
        match A::from_std(l) {
            Ok(a) => acceptors.push((Rc::new(a), mode)),
            Err(e) => {
                let _ = ready.send(Err(format!("listener: {e}")));
                return;
            }
        }
    }
    if let Some(slot) = readers.get(shard as usize) {
        let _ = slot.set(spool.reader());
    }
    metrics.watch_spool(shard, spool.watch());
    let mut adopted = Vec::new();
    for id in adopt {
        let opened = config
            .spool_config(id)
            .and_then(Spool::open)
            .map_err(|e| e.to_string());
        match opened {
            Ok((s, report)) => {
                tracing::warn!(
                    shard,
                    spool = id,
                    live = s.len(),
                    records = report.records,
                    damage = report.damage_count,
                    "adopted spool recovered; its mail is delivered, then it is removed"
                );
                if let Some(slot) = readers.get(id as usize) {
                    let _ = slot.set(s.reader());
                }
                adopted.push((id, Rc::new(RefCell::new(s))));
            }
            Err(e) => {
                let _ = ready.send(Err(format!("adopted spool shard-{id}: {e}")));
                return;
            }
        }
    }
    let spool = Rc::new(RefCell::new(spool));
    let spools: SpoolSet = Rc::new(RefCell::new(
        std::iter::once((shard, Rc::clone(&spool)))
            .chain(adopted.iter().cloned())
            .collect(),
    ));
    let deliverer = match Deliverer::<A::S>::new(
        shard,
        Arc::clone(&config),
        Arc::clone(&readers),
        router.clone(),
        Rc::clone(&spool),
        shutdown.clone(),
        Arc::clone(&metrics),
        Arc::clone(&tenants),
        Arc::clone(&suppressions),
        providers,
    ) {
        Ok(d) => d,
        Err(e) => {
            let _ = ready.send(Err(format!("delivery: {e}")));
            return;
        }
    };
    let ctx = Rc::new(ShardContext {
        config: Arc::clone(&config),
        shard,
        spool: Rc::clone(&spool),
        tls,
        credentials,
        auth_throttle,
        shutdown: shutdown.clone(),
        router: router.clone(),
        metrics: Arc::clone(&metrics),
        inflight,
        tenants: Arc::clone(&tenants),
        dkim,
        suppressions,
    });
    let active = Rc::new(Cell::new(0usize));
    for (acceptor, mode) in acceptors {
        let (ctx, limits, active) = (Rc::clone(&ctx), Arc::clone(&limits), Rc::clone(&active));
        tokio::task::spawn_local(accept_loop(acceptor, mode, ctx, limits, active));
    }
    let inbox_done = Rc::new(tokio::sync::Notify::new());
    tokio::task::spawn_local(drain_inbox(
        inbox,
        Rc::clone(&ctx),
        Rc::clone(&deliverer),
        Rc::clone(&spools),
        router.clone(),
        shard,
        Rc::clone(&inbox_done),
    ));
    if config.delivery.enabled {
        tokio::task::spawn_local(Rc::clone(&deliverer).run_scheduler());
    }
    tokio::task::spawn_local(requeue_recovered(Rc::clone(&spool), router.clone(), shard));
    for (id, s) in &adopted {
        tokio::task::spawn_local(requeue_recovered(Rc::clone(s), router.clone(), *id));
    }
    drop(adopted);
    // Maintenance: reclaim spool space once a second.
    let maint_spool = Rc::clone(&spool);
    let maint_metrics = Arc::clone(&metrics);
    let maint_deliverer = Rc::clone(&deliverer);
    let maint_spools = Rc::clone(&spools);
    let maint_config = Arc::clone(&config);
    let mut ticks = 0u64;
    let mut maint_shutdown = shutdown.clone();
    tokio::task::spawn_local(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = maint_shutdown.changed() => {}
            }
            match maint_spool.borrow_mut().reclaim() {
                Ok(r) => {
                    maint_metrics.inc(crate::metrics::Counter::MessagesRehomed, r.messages_rehomed)
                }
                Err(e) => tracing::error!(shard, error = %e, "spool reclamation failed"),
            }
            retire_drained(&maint_spools, shard, &maint_config);
            // The oldest live message: a scan of the index, every 10 s (O(live messages)). The
            // other spool figures are read live at each scrape.
            if ticks % 10 == 0 {
                let spool = maint_spool.borrow();
                let live = spool.live().map(|(_, m)| m.received_at_micros);
                maint_metrics.set_oldest(shard, live.min().unwrap_or(0));
            }
            ticks += 1;
            maint_metrics.set_queues(shard, maint_deliverer.queue_snapshot());
            if *maint_shutdown.borrow() {
                return;
            }
        }
    });
    let _ = ready.send(Ok(backend));

    let mut shutdown = shutdown;
    while !*shutdown.borrow_and_update() {
        if shutdown.changed().await.is_err() {
            break;
        }
    }
    let grace = Duration::from_secs(config.server.shutdown_grace_secs);
    let deadline = tokio::time::Instant::now() + grace;
    // Sessions finish, then every shard's delivery workers (their outcomes go to spools that
    // must still be open), then the inbox is drained one last time.
    while (active.get() > 0 || router.stats.workers.load(Ordering::Relaxed) > 0)
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    inbox_done.notify_one();
    for _ in 0..100 {
        if Rc::strong_count(&inbox_done) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    deliverer.close();
    drop(deliverer);
    drop(ctx);
    // Let finished tasks release their handles on the spool.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    if active.get() > 0 {
        tracing::warn!(
            shard,
            sessions = active.get(),
            "sessions did not finish within the grace period; aborting them"
        );
    }
    // Dropping the last handle closes the spool, which commits everything pending; sessions
    // aborted with the runtime release theirs when the thread ends.
    if let Ok(s) = Rc::try_unwrap(spool) {
        s.into_inner().close();
    }
    tracing::info!(shard, "shard stopped");
}

async fn accept_loop<A: Acceptor>(
    acceptor: Rc<A>,
    mode: ListenerTls,
    ctx: Rc<ShardContext>,
    limits: Arc<ConnLimits>,
    active: Rc<Cell<usize>>,
) {
    let mut shutdown = ctx.shutdown.clone();
    loop {
        let accepted = tokio::select! {
            r = acceptor.accept() => r,
            _ = shutdown.changed() => return,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let ctx = Rc::clone(&ctx);
        let active = Rc::clone(&active);
        let guard = limits.acquire(peer.ip(), ctx.config.may_relay(peer.ip()));
        tokio::task::spawn_local(async move {
            let mut stream = stream;
            let guard = match guard {
                Ok(g) => g,
                Err(why) => {
                    ctx.metrics
                        .inc(crate::metrics::Counter::ConnectionsRefused, 1);
                    tracing::warn!(client = %peer.ip(), why, "connection refused");
                    let mut out = Vec::new();
                    Reply::new(421, "4.7.0", why).encode(&mut out);
                    let bye = async {
                        let _ = stream.write_all(out).await;
                        let _ = stream.shutdown().await;
                    };
                    let _ = tokio::time::timeout(Duration::from_secs(5), bye).await;
                    return;
                }
            };
            active.set(active.get() + 1);
            ctx.metrics.inc(crate::metrics::Counter::ConnectionsIn, 1);
            let info = ConnInfo {
                peer,
                listener_tls: mode,
                reserved_slot: guard.reserved,
            };
            let conn = if mode == ListenerTls::Implicit {
                let Some(tls) = ctx.tls.clone() else { return };
                let config = tls.borrow_mut().get();
                let timeout = Duration::from_secs(ctx.config.smtp.command_timeout_secs);
                match tokio::time::timeout(timeout, TlsStream::accept(stream, config)).await {
                    Ok(Ok(t)) => Conn::Tls(Box::new(t)),
                    _ => {
                        active.set(active.get() - 1);
                        return;
                    }
                }
            } else {
                Conn::Plain(stream)
            };
            Session::new(ctx, info, conn).run().await;
            active.set(active.get() - 1);
        });
    }
}

/// Handles what other shards send: hand-offs (queued for delivery), outcomes (journaled in this
/// shard's spool), re-offers and operator requests, in batches of up to 4096, waking when
/// something arrives. Once `done` is notified it drains what is left and stops.
async fn drain_inbox<S: saida_net::Dial + 'static>(
    inbox: Receiver<ShardMsg>,
    ctx: Rc<ShardContext>,
    deliverer: Rc<Deliverer<S>>,
    spools: SpoolSet,
    router: Router,
    shard: u16,
    done: Rc<tokio::sync::Notify>,
) {
    let mut inbox = inbox;
    let spool_of = |id: u16| {
        let found = spools.borrow().get(&id).cloned();
        if found.is_none() {
            tracing::warn!(
                shard,
                spool = id,
                "message for a spool this shard does not host"
            );
        }
        found
    };
    let enabled = deliverer.enabled();
    let mut stopping = false;
    loop {
        let first = if stopping {
            inbox.try_recv().ok()
        } else {
            tokio::select! {
                biased;
                m = inbox.recv() => m,
                () = done.notified() => {
                    stopping = true;
                    inbox.try_recv().ok()
                }
            }
        };
        // Empty after `done`, or every sender gone: nothing more can come.
        let Some(first) = first else { return };
        let mut batch = vec![first];
        while batch.len() < 4096 {
            match inbox.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        for msg in batch {
            match msg {
                ShardMsg::Deliver(h) => {
                    if enabled {
                        deliverer.enqueue(h)
                    }
                }
                ShardMsg::Outcomes {
                    spool: id,
                    queue_id,
                    at_micros,
                    outcomes,
                } => {
                    if let Some(sp) = spool_of(id) {
                        journal_outcomes(&sp, &router, queue_id, at_micros, &outcomes)
                    }
                }
                ShardMsg::Reoffer {
                    spool: id,
                    queue_id,
                    owner,
                    rcpts,
                    counted,
                } => {
                    if let Some(sp) = spool_of(id) {
                        let offer = Reoffered {
                            queue_id,
                            owner,
                            wanted: &rcpts,
                            counted,
                        };
                        reoffer(&sp, &router, &ctx.tenants, id, offer)
                    }
                }
                ShardMsg::Admin(req, reply) => {
                    let _ = reply.send(deliverer.admin(&req));
                }
                ShardMsg::Inject {
                    messages,
                    tenant,
                    reply,
                } => {
                    let ctx = Rc::clone(&ctx);
                    tokio::task::spawn_local(async move {
                        let _ = reply.send(inject(&ctx, messages, &tenant).await);
                    });
                }
            }
        }
        tokio::task::yield_now().await;
    }
}

/// The spools a shard hosts by id: its own and those it adopted.
type SpoolSet = Rc<RefCell<HashMap<u16, Rc<RefCell<Spool>>>>>;

/// Spool directories `shard-N` under `dir` with `N >= shards`: left by a larger shard count.
fn orphan_spools(dir: &std::path::Path, shards: usize) -> anyhow::Result<Vec<u16>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(anyhow::anyhow!(
                "reading the spool directory {}: {e}",
                dir.display()
            ));
        }
    };
    let mut ids = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(n) = name.to_str().and_then(|n| n.strip_prefix("shard-")) else {
            continue;
        };
        if let Ok(id) = n.parse::<u16>() {
            if id as usize >= shards && entry.path().is_dir() {
                ids.push(id);
            }
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

/// Reclaims the adopted spools; closes and removes each that holds nothing live any more.
fn retire_drained(spools: &SpoolSet, shard: u16, config: &Config) {
    let adopted: Vec<(u16, Rc<RefCell<Spool>>)> = spools
        .borrow()
        .iter()
        .filter(|(id, _)| **id != shard)
        .map(|(id, s)| (*id, Rc::clone(s)))
        .collect();
    for (id, s) in adopted {
        let drained = {
            let mut sp = s.borrow_mut();
            if let Err(e) = sp.reclaim() {
                tracing::error!(shard, spool = id, error = %e, "adopted spool reclamation failed");
            }
            sp.is_empty()
        };
        if !drained {
            continue;
        }
        spools.borrow_mut().remove(&id);
        match Rc::try_unwrap(s) {
            Ok(sp) => {
                sp.into_inner().retire();
                let dir = config.spool.dir.join(format!("shard-{id}"));
                match std::fs::remove_dir_all(&dir) {
                    Ok(()) => tracing::warn!(
                        shard,
                        spool = id,
                        dir = %dir.display(),
                        "adopted spool drained and removed"
                    ),
                    Err(e) => tracing::error!(
                        shard,
                        dir = %dir.display(),
                        error = %e,
                        "adopted spool drained but its directory could not be removed"
                    ),
                }
            }
            // Still in use by a task: put back, tried again at the next tick.
            Err(s) => {
                spools.borrow_mut().insert(id, s);
            }
        }
    }
}

/// Queues HTTP-injected messages like SMTP ones: stored, committed, then handed off. Returns
/// the queue ids, or the first failure (messages before it stay queued; their ids are named).
async fn inject(
    ctx: &ShardContext,
    messages: Vec<crate::api::Prepared>,
    tenant: &str,
) -> Result<Vec<String>, crate::api::InjectFailure> {
    use crate::api::InjectFailure;
    use smtp_proto::headers;
    let (spool, router, config, shard) = (&ctx.spool, &ctx.router, &*ctx.config, ctx.shard);
    let account = ctx.tenants.named(tenant);
    let mut ids = Vec::new();
    for mut m in messages {
        // The admin endpoint checked the pool (a tenant's `pools_allowed`) before dispatch.
        let chosen = headers::take_field(&mut m.content, crate::tenant::POOL_HEADER);
        let chosen = chosen.filter(|p| account.is_some_and(|t| t.pool_allowed(p)));
        let tenant_field = match account {
            Some(t) => crate::tenant::record_field(t.name(), chosen.as_deref()),
            None => tenant.to_string(),
        };
        if router.queues_full() {
            return Err(InjectFailure::new("452 4.3.1 delivery queues full", ids));
        }
        if m.content.len() > config.smtp.message_bytes_max {
            return Err(InjectFailure::new("552 5.3.4 message too large", ids));
        }
        let hops = headers::received_count(&m.content);
        if hops >= config.smtp.received_headers_max {
            let why = headers::loop_refusal(hops);
            return Err(InjectFailure::new(&format!("554 5.4.6 {why}"), ids));
        }
        let now = spool::now_micros();
        let queue_id = spool.borrow_mut().next_queue_id(now);
        let qid = queue_id.to_string();
        let host = &config.server.hostname;
        let mut body = format!(
            "Received: from api by {host} with HTTP id {qid};\r\n\t{}\r\n",
            headers::rfc5322_date(now / 1_000_000)
        )
        .into_bytes();
        if !headers::has_message_id(&m.content) {
            body.extend_from_slice(headers::message_id(&qid, host).as_bytes());
        }
        body.extend_from_slice(&m.content);
        let also = &config.signing.dkim_also;
        let tenants = &ctx.tenants;
        let body =
            crate::intake::dkim_sign(&ctx.dkim, also, tenants, account, &ctx.metrics, shard, body)
                .map_err(|e| {
                    let (code, enhanced, text) = e.reply();
                    tracing::error!(error = %e, "injected message not signed");
                    InjectFailure::new(&format!("{code} {enhanced} {text}"), ids.clone())
                })?;
        let utf8 = !m.from.is_ascii() || m.to.iter().any(|a| !a.is_ascii());
        let eight_bit = !body.is_ascii();
        let message = spool::Message {
            queue_id,
            received_at_micros: now,
            flags: if utf8 {
                spool::message_flags::SMTPUTF8
            } else {
                0
            } | if eight_bit {
                spool::message_flags::BODY_8BITMIME
            } else {
                0
            },
            dsn_ret: spool::DsnRet::Unspecified,
            tenant: &tenant_field,
            sender: &m.from,
            envid: "",
            recipients: m.to.iter().map(|a| spool::Recipient::new(a)).collect(),
            body: &body,
        };
        match crate::intake::store(spool, router, shard, &message, account).await {
            Ok(_) => {
                let rcpts = m.to.len();
                tracing::info!(queue_id = %qid, from = %m.from, rcpts, "accepted over HTTP");
                ids.push(qid);
            }
            Err(e) => {
                let (code, enhanced, text) = e.reply();
                return Err(InjectFailure::new(
                    &format!("{code} {enhanced} {text}"),
                    ids,
                ));
            }
        }
    }
    Ok(ids)
}

/// Journals one message's outcomes; they are counted once committed.
fn journal_outcomes(
    spool: &Rc<RefCell<Spool>>,
    router: &Router,
    queue_id: QueueId,
    at_micros: u64,
    outcomes: &[Outcome],
) {
    let entries: Vec<spool::OutcomeEntry<'_>> = outcomes
        .iter()
        .map(|o| spool::OutcomeEntry {
            rcpt_index: o.rcpt_index,
            state: o.state,
            attempts: o.attempts,
            next_attempt_micros: o.next_attempt_micros,
            reply: &o.reply,
        })
        .collect();
    let ticket = spool
        .borrow_mut()
        .record_outcomes(queue_id, at_micros, &entries);
    match ticket {
        Ok(t) => {
            let count =
                |s: spool::RcptState| outcomes.iter().filter(|o| o.state == s).count() as u64;
            let delivered = count(spool::RcptState::Delivered);
            let deferred = count(spool::RcptState::Deferred);
            let failed = count(spool::RcptState::Failed);
            let stats = Arc::clone(&router.stats);
            tokio::task::spawn_local(async move {
                if t.await.is_ok() {
                    stats.delivered.fetch_add(delivered, Ordering::Relaxed);
                    stats.deferred.fetch_add(deferred, Ordering::Relaxed);
                    stats.failed.fetch_add(failed, Ordering::Relaxed);
                }
            });
        }
        // Deleted meanwhile (operator, or an earlier terminal outcome): nothing to record.
        Err(spool::SpoolError::NotFound(_)) => {}
        Err(e) => {
            // The recipients stay live in the spool and are attempted again after a restart (a
            // possible duplicate, never a loss).
            tracing::error!(%queue_id, error = %e, "outcomes could not be journaled");
        }
    }
}

/// Hands `owner` the listed recipients of a message again, at its current location: only those
/// still non-terminal and owned by `owner` (other jobs of the same message send their own).
/// What a `Reoffer` asks for.
struct Reoffered<'a> {
    queue_id: QueueId,
    owner: u16,
    wanted: &'a [u32],
    /// Counted in their tenant's queue quota: those not handed back leave the count here.
    counted: bool,
}

fn reoffer(
    spool: &Rc<RefCell<Spool>>,
    router: &Router,
    tenants: &crate::tenant::Tenants,
    shard: u16,
    offer: Reoffered<'_>,
) {
    let Reoffered {
        queue_id,
        owner,
        wanted,
        counted,
    } = offer;
    let Some(h) = recovered_handoff(&spool.borrow(), shard, queue_id) else {
        // Every recipient is terminal or the message was deleted. Queued jobs re-offer
        // uncounted (`Deliverer::read_job` released them); only a fresh hand-off from intake
        // comes counted, and a message just accepted is neither compacted nor finished before
        // its first delivery, so no count is left behind here in practice.
        return;
    };
    let (queue_id, base, received) = (h.0, h.1, h.2);
    let rcpts: Vec<HandoffRcpt> =
        h.3.into_iter()
            .filter(|(a, r)| {
                wanted.contains(&r.index)
                    && router.deliverer_of(route::domain_of(a), shard) == owner as usize
            })
            .map(|(_, r)| r)
            .collect();
    if counted && rcpts.len() < wanted.len() {
        let spool = spool.borrow();
        let tenant = spool
            .message(queue_id)
            .ok()
            .and_then(|m| tenants.named(crate::tenant::split_record_field(m.tenant).0));
        if let Some(t) = tenant {
            t.finished(wanted.len() - rcpts.len());
        }
    }
    if rcpts.is_empty() {
        return;
    }
    let router = router.clone();
    tokio::task::spawn_local(async move {
        let h = Handoff {
            queue_id,
            spool_shard: shard,
            base,
            received_at_micros: received,
            rcpts,
            counted,
        };
        let _ = router.send(owner as usize, ShardMsg::Deliver(h)).await;
    });
}

/// A live message's non-terminal recipients with their addresses.
type Recovered = (QueueId, Location, u64, Vec<(String, HandoffRcpt)>);

fn recovered_handoff(spool: &Spool, _shard: u16, queue_id: QueueId) -> Option<Recovered> {
    let live = spool.get(queue_id)?;
    let msg = spool.message(queue_id).ok()?;
    let rcpts = live
        .rcpts
        .iter()
        .enumerate()
        .filter(|(_, st)| !st.state.is_terminal())
        .filter_map(|(i, st)| {
            let addr = msg.recipients.get(i)?.address.to_string();
            Some((
                addr,
                HandoffRcpt {
                    index: i as u32,
                    attempts: st.attempts,
                    next_attempt_micros: st.next_attempt_micros,
                },
            ))
        })
        .collect();
    Some((queue_id, live.base, live.received_at_micros, rcpts))
}

/// Hands every recovered live recipient to its owner, with its attempts and retry time.
async fn requeue_recovered(spool: Rc<RefCell<Spool>>, router: Router, shard: u16) {
    let ids: Vec<QueueId> = spool.borrow().live().map(|(id, _)| id).collect();
    let started = std::time::Instant::now();
    let mut rcpts_total = 0usize;
    for chunk in ids.chunks(1024) {
        let batch: Vec<Recovered> = {
            let s = spool.borrow();
            chunk
                .iter()
                .filter_map(|id| recovered_handoff(&s, shard, *id))
                .collect()
        };
        for (queue_id, base, received, rcpts) in batch {
            rcpts_total += rcpts.len();
            let refs: Vec<(&str, HandoffRcpt)> =
                rcpts.iter().map(|(a, r)| (a.as_str(), *r)).collect();
            router
                .hand_off(shard, queue_id, base, received, &refs, false)
                .await;
        }
    }
    if !ids.is_empty() {
        tracing::info!(
            shard,
            messages = ids.len(),
            rcpts = rcpts_total,
            ms = started.elapsed().as_millis() as u64,
            "recovered recipients queued for delivery"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_limits_per_ip_and_total() {
        let limits = ConnLimits::new(3, 2, 0);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let g1 = limits.acquire(a, false).unwrap();
        let _g2 = limits.acquire(a, false).unwrap();
        assert!(limits.acquire(a, false).is_err());
        let _g3 = limits.acquire(b, false).unwrap();
        assert!(limits.acquire(b, false).is_err(), "total limit");
        drop(g1);
        assert!(limits.acquire(a, false).is_ok());
    }

    #[test]
    fn ipv6_clients_are_counted_per_64() {
        let limits = ConnLimits::new(100, 2, 0);
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        let _g1 = limits.acquire(a, false).unwrap();
        let _g2 = limits.acquire(b, false).unwrap();
        assert!(limits.acquire(a, false).is_err(), "same /64");
        assert!(limits.acquire(other, false).is_ok(), "another /64");
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(client_key(mapped), "10.0.0.1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn the_reserve_is_for_trusted_or_authenticating_clients() {
        let limits = ConnLimits::new(4, 10, 2);
        let anon: IpAddr = "192.0.2.1".parse().unwrap();
        let relay: IpAddr = "10.0.0.1".parse().unwrap();
        let g1 = limits.acquire(anon, false).unwrap();
        let g2 = limits.acquire(anon, false).unwrap();
        assert!(!g1.reserved && !g2.reserved);
        let g3 = limits.acquire(anon, false).unwrap();
        assert!(
            g3.reserved,
            "past total - reserved an anonymous client is on probation"
        );
        let g4 = limits.acquire(relay, true).unwrap();
        assert!(!g4.reserved);
        assert!(
            limits.acquire(relay, true).is_err(),
            "the total is a hard bound"
        );
        drop((g1, g2, g3, g4));
    }

    #[test]
    fn trusted_clients_are_not_limited_per_address() {
        let limits = ConnLimits::new(10, 1, 0);
        let relay: IpAddr = "10.0.0.1".parse().unwrap();
        let _g: Vec<_> = (0..5)
            .map(|_| limits.acquire(relay, true).unwrap())
            .collect();
        let _a = limits.acquire(relay, false).unwrap();
        assert!(limits.acquire(relay, false).is_err());
    }
}
