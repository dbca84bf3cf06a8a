//! Thread-per-core runtime: one pinned thread per shard, each with its own single-threaded
//! runtime (io_uring or epoll), its own listening sockets (`SO_REUSEPORT`: the kernel spreads
//! connections), its own spool directory and commit group.
//!
//! Cross-shard traffic goes over bounded `crossbeam` channels built once at start-up
//! ([`Router`]): a shard that accepted a message hands each recipient to the shard owning the
//! recipient's domain ([`route::owner_shard`]). A full channel hands the item back and is
//! counted, never waited on.
//!
//! # Backends
//! `backend = "auto"` tries io_uring (`tokio_uring::Runtime::new`, which reports an error where
//! the kernel or a seccomp filter refuses io_uring) and falls back to epoll; the log says which
//! runs. `"io_uring"` fails instead of falling back; `"epoll"` never tries io_uring.
//!
//! # Shutdown
//! On SIGTERM or SIGINT the shards stop accepting, give sessions `shutdown_grace_secs` to
//! finish, answer `421 4.3.2` to those still waiting for a command, then close their spools
//! (which commits everything pending) and exit.

pub mod route;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use queue_format::{QueueId, Spool};
use tokio::sync::watch;

use crate::auth::Credentials;
use crate::config::{Backend, Config, ListenerTls};
use crate::io::epoll::EpollStream;
use crate::io::tls::{ReloadingTls, TlsStream};
use crate::io::uring::UringStream;
use crate::io::{Conn, Stream};
use crate::smtp::reply::Reply;
use crate::smtp::server::session::{ConnInfo, Session, ShardContext};

/// Capacity of each shard's hand-off inbox.
pub const HANDOFF_QUEUE_LEN_MAX: usize = 65_536;
/// Listen backlog of each socket.
const LISTEN_BACKLOG: i32 = 1024;

/// Recipients of one accepted message that a shard owns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Handoff {
    pub queue_id: QueueId,
    /// The shard whose spool holds the message.
    pub spool_shard: u16,
    /// Indexes of the recipients, in the message's recipient list, that this shard owns.
    pub rcpts: Vec<u32>,
}

/// Counters of cross-shard hand-offs.
#[derive(Default, Debug)]
pub struct RouterStats {
    pub sent: AtomicU64,
    /// Hand-offs refused because the owner's inbox was full. The recipients stay in the spool
    /// and are found again when the owner rescans it.
    pub dropped: AtomicU64,
}

/// Senders to every shard's inbox. Cloned into each shard.
#[derive(Clone)]
pub struct Router {
    senders: Vec<Sender<Handoff>>,
    pub stats: Arc<RouterStats>,
}

impl Router {
    /// A router for `shards` shards and each shard's inbox.
    pub fn new(shards: usize) -> (Router, Vec<Receiver<Handoff>>) {
        let (senders, receivers) = (0..shards.max(1))
            .map(|_| crossbeam_channel::bounded(HANDOFF_QUEUE_LEN_MAX))
            .unzip();
        (
            Router {
                senders,
                stats: Arc::default(),
            },
            receivers,
        )
    }

    /// Hands each recipient of a committed message to the shard owning its domain. Never
    /// blocks: a full inbox is counted in `stats.dropped`.
    pub fn hand_off(&self, spool_shard: u16, queue_id: QueueId, rcpts: &[&str]) {
        let shards = self.senders.len();
        let mut by_owner: Vec<Vec<u32>> = vec![Vec::new(); shards];
        for (i, r) in rcpts.iter().enumerate() {
            by_owner[route::owner_shard(route::domain_of(r), shards)].push(i as u32);
        }
        for (owner, rcpts) in by_owner
            .into_iter()
            .enumerate()
            .filter(|(_, r)| !r.is_empty())
        {
            let h = Handoff {
                queue_id,
                spool_shard,
                rcpts,
            };
            match self.senders[owner].try_send(h) {
                Ok(()) => self.stats.sent.fetch_add(1, Ordering::Relaxed),
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                    self.stats.dropped.fetch_add(1, Ordering::Relaxed)
                }
            };
        }
    }
}

/// Connection limits shared by all shards (touched at connect and disconnect only).
pub struct ConnLimits {
    total: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    total_max: usize,
    per_ip_max: usize,
}

/// Releases a connection slot when dropped.
pub struct ConnGuard {
    limits: Arc<ConnLimits>,
    ip: IpAddr,
}

impl ConnLimits {
    pub fn new(total_max: usize, per_ip_max: usize) -> Arc<ConnLimits> {
        Arc::new(ConnLimits {
            total: AtomicUsize::new(0),
            per_ip: Mutex::default(),
            total_max,
            per_ip_max,
        })
    }

    /// Takes a slot for `ip`, or says which limit is reached.
    pub fn acquire(self: &Arc<Self>, ip: IpAddr) -> Result<ConnGuard, &'static str> {
        let mut map = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if self.total.load(Ordering::Relaxed) >= self.total_max {
            return Err("Too many connections");
        }
        let n = map.entry(ip).or_insert(0);
        if *n >= self.per_ip_max {
            return Err("Too many connections from your address");
        }
        *n += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        Ok(ConnGuard {
            limits: Arc::clone(self),
            ip,
        })
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut map = self.limits.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
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
    config: Arc<Config>,
    credentials: Option<Arc<Credentials>>,
    auth_throttle: Arc<crate::auth::AuthThrottle>,
    router: Router,
    inbox: Receiver<Handoff>,
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
}

impl Server {
    /// Binds every listener on every shard, opens every spool, starts the shards; returns once
    /// all are ready (or the first failure).
    pub fn start(config: Config) -> anyhow::Result<Server> {
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
        let (router, inboxes) = Router::new(shards);
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let auth_throttle = Arc::new(crate::auth::AuthThrottle::new(cpus));
        let limits = ConnLimits::new(
            config.smtp.connections_max,
            config.smtp.connections_per_ip_max,
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
                let l = bind_reuseport(*addr).with_context(|| format!("listening on {addr}"))?;
                *addr = l.local_addr()?;
                listeners.push((l, *tls));
            }
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            readies.push(ready_rx);
            let setup = ShardSetup {
                shard: shard as u16,
                config: Arc::clone(&config),
                credentials: credentials.clone(),
                auth_throttle: Arc::clone(&auth_throttle),
                router: router.clone(),
                inbox,
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
            router_stats: router.stats,
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

fn bind_reuseport(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
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
    type S: Stream + 'static;
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
        config,
        credentials,
        auth_throttle,
        router,
        inbox,
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
    let spool = Rc::new(RefCell::new(spool));
    let ctx = Rc::new(ShardContext {
        config: Arc::clone(&config),
        shard,
        spool: Rc::clone(&spool),
        tls,
        credentials,
        auth_throttle,
        shutdown: shutdown.clone(),
        router,
    });
    let active = Rc::new(Cell::new(0usize));
    for (acceptor, mode) in acceptors {
        let (ctx, limits, active) = (Rc::clone(&ctx), Arc::clone(&limits), Rc::clone(&active));
        tokio::task::spawn_local(accept_loop(acceptor, mode, ctx, limits, active));
    }
    // Maintenance: reclaim spool space and drain the hand-off inbox once a second.
    let maint_spool = Rc::clone(&spool);
    let mut maint_shutdown = shutdown.clone();
    tokio::task::spawn_local(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = maint_shutdown.changed() => {}
            }
            if let Err(e) = maint_spool.borrow_mut().reclaim() {
                tracing::error!(shard, error = %e, "spool reclamation failed");
            }
            // Delivery (issue 4) consumes hand-offs; until then they are counted and dropped.
            let n = inbox.try_iter().take(HANDOFF_QUEUE_LEN_MAX).count();
            if n > 0 {
                tracing::debug!(shard, handoffs = n, "hand-offs received");
            }
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
    while active.get() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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
        let guard = limits.acquire(peer.ip());
        tokio::task::spawn_local(async move {
            let mut stream = stream;
            let _guard = match guard {
                Ok(g) => g,
                Err(why) => {
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
            let info = ConnInfo {
                peer,
                listener_tls: mode,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn router_sends_each_recipient_to_its_domain_owner() {
        let (router, inboxes) = Router::new(3);
        let rcpts = ["a@one.test", "b@two.test", "c@one.test", "d@three.test"];
        router.hand_off(1, QueueId(9), &rcpts);
        let mut seen = Vec::new();
        for (shard, inbox) in inboxes.iter().enumerate() {
            for h in inbox.try_iter() {
                assert_eq!((h.queue_id, h.spool_shard), (QueueId(9), 1));
                for i in h.rcpts {
                    let domain = route::domain_of(rcpts[i as usize]);
                    assert_eq!(route::owner_shard(domain, 3), shard);
                    seen.push(i);
                }
            }
        }
        seen.sort();
        assert_eq!(seen, vec![0, 1, 2, 3]);
    }

    #[test]
    fn full_inbox_is_counted_not_waited_on() {
        let (router, _inboxes) = Router::new(1);
        for i in 0..HANDOFF_QUEUE_LEN_MAX + 5 {
            router.hand_off(0, QueueId(i as u128), &["x@y.test"]);
        }
        assert_eq!(router.stats.dropped.load(Ordering::Relaxed), 5);
    }

    #[test]
    fn connection_limits_per_ip_and_total() {
        let limits = ConnLimits::new(3, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let g1 = limits.acquire(a).unwrap();
        let _g2 = limits.acquire(a).unwrap();
        assert!(limits.acquire(a).is_err());
        let _g3 = limits.acquire(b).unwrap();
        assert!(limits.acquire(b).is_err(), "total limit");
        drop(g1);
        assert!(limits.acquire(a).is_ok());
    }
}
