//! The cross-shard mesh: the messages shards send each other ([`ShardMsg`]) and the
//! [`Router`] that carries them over bounded tokio channels built once at start-up. A
//! shard that accepted a message hands each recipient to the shard owning the recipient's
//! domain ([`route::owner_shard`]). A full inbox is back-pressure: the sender waits on the
//! channel (asynchronously, without blocking its shard, woken when there is room: no polling),
//! and the wait is counted; nothing is ever dropped while the receiving shard runs. Replies to
//! the admin endpoint come back on `std` channels, which its blocking threads wait on.
//!
//! Not here: what a shard does with a message (the shard runtime, delivery, admin).

pub mod route;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use spool::{Location, QueueId};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::mpsc::{Receiver, Sender};

/// Capacity of each shard's inbox.
pub const INBOX_LEN_MAX: usize = 65_536;
/// After this long waiting for room in a full inbox, a sender logs a warning (once per item) and
/// goes on waiting.
const INBOX_WAIT_WARN: Duration = Duration::from_secs(30);

/// A recipient handed to its domain's owner, with its delivery state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HandoffRcpt {
    /// Index in the message's recipient list.
    pub index: u32,
    pub attempts: u32,
    /// 0 = now.
    pub next_attempt_micros: u64,
}

/// Recipients of one stored message that a shard owns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Handoff {
    pub queue_id: QueueId,
    /// The shard whose spool holds the message.
    pub spool_shard: u16,
    /// Where its base record is (read through that spool's `SpoolReader`).
    pub base: Location,
    pub received_at_micros: u64,
    pub rcpts: Vec<HandoffRcpt>,
    /// Intake already counted these recipients in their tenant's queue quota (a fresh
    /// message); recovered and re-offered ones are counted when they are queued.
    pub counted: bool,
}

/// One recipient's outcome, owned so that it can cross shards.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub rcpt_index: u32,
    pub state: spool::RcptState,
    pub attempts: u32,
    pub next_attempt_micros: u64,
    pub reply: String,
}

/// What shards send each other.
pub enum ShardMsg {
    /// To a domain's owner: queue these recipients for delivery.
    Deliver(Handoff),
    /// To the spool's shard: journal these outcomes of one message.
    Outcomes {
        /// The spool holding the message (its host may hold several: adopted spools).
        spool: u16,
        queue_id: QueueId,
        at_micros: u64,
        outcomes: Vec<Outcome>,
    },
    /// To the spool's shard: the owner could not read the message at the location it was given
    /// (compaction moved it); hand the owner these recipients again, those still non-terminal.
    Reoffer {
        spool: u16,
        queue_id: QueueId,
        owner: u16,
        rcpts: Vec<u32>,
        /// They are counted in their tenant's queue quota already.
        counted: bool,
    },
    /// HTTP injection: queue these messages in this shard's spool and answer with their queue
    /// ids once committed.
    Inject {
        messages: Vec<crate::api::Prepared>,
        /// The tenant they are queued for (`api` for the admin token).
        tenant: String,
        reply: std::sync::mpsc::SyncSender<Result<Vec<String>, crate::api::InjectFailure>>,
    },
    /// An operator request, answered on `reply`.
    Admin(
        saida_control::Request,
        std::sync::mpsc::SyncSender<saida_control::ShardReply>,
    ),
}

/// Counters of cross-shard traffic.
#[derive(Default, Debug)]
pub struct RouterStats {
    pub sent: AtomicU64,
    /// Items sent to a shard that has stopped (only during shutdown; their recipients stay in
    /// the spool and are queued again at the next start).
    pub dropped: AtomicU64,
    /// Sends that found the inbox full and had to wait for room (back-pressure).
    pub inbox_full_waits: AtomicU64,
    /// Recipients queued in memory on all shards (the admission bound).
    pub queued_rcpts: AtomicUsize,
    /// Delivery connection workers running on all shards (shutdown waits for them, so that
    /// their outcomes reach spools that are still open).
    pub workers: AtomicUsize,
    /// Outcomes journaled (counted when their record is committed).
    pub delivered: AtomicU64,
    pub deferred: AtomicU64,
    pub failed: AtomicU64,
}

/// Every shard's `SpoolReader`, set by each shard once its spool is open.
pub type SpoolReaders = Arc<Vec<std::sync::OnceLock<spool::SpoolReader>>>;

/// Senders to every shard's inbox. Cloned into each shard.
#[derive(Clone)]
pub struct Router {
    senders: Vec<Sender<ShardMsg>>,
    pub stats: Arc<RouterStats>,
    /// Recipients in memory across shards beyond which new mail is refused with 452.
    queued_rcpts_max: usize,
    /// Destinations delivered by the shard that accepted each message (`spread_over_shards`).
    spread: Arc<dyn Fn(&str) -> bool + Send + Sync>,
}

impl Router {
    /// A router for `shards` shards and each shard's inbox.
    pub fn new(shards: usize, queued_rcpts_max: usize) -> (Router, Vec<Receiver<ShardMsg>>) {
        let (senders, receivers) = (0..shards.max(1))
            .map(|_| tokio::sync::mpsc::channel(INBOX_LEN_MAX))
            .unzip();
        (
            Router {
                senders,
                stats: Arc::default(),
                queued_rcpts_max,
                spread: Arc::new(|_| false),
            },
            receivers,
        )
    }

    /// Destinations for which `spread` holds are delivered by the shard hosting the spool that
    /// accepted each message.
    pub fn with_spread(mut self, spread: Arc<dyn Fn(&str) -> bool + Send + Sync>) -> Router {
        self.spread = spread;
        self
    }

    pub fn shards(&self) -> usize {
        self.senders.len()
    }

    /// The shard that delivers to `domain` the recipients of a message in spool `spool`: the
    /// domain's owner, or for a spread destination the spool's host.
    pub fn deliverer_of(&self, domain: &str, spool: u16) -> usize {
        if (self.spread)(domain) {
            self.host_of(spool)
        } else {
            route::owner_shard(domain, self.senders.len())
        }
    }

    /// Whether `domain` is delivered by every shard (its own mail each).
    pub fn is_spread(&self, domain: &str) -> bool {
        (self.spread)(domain)
    }

    /// The shard hosting spool `spool`: its own shard, or the adopter of a spool left by a
    /// larger shard count.
    pub fn host_of(&self, spool: u16) -> usize {
        spool as usize % self.senders.len()
    }

    /// Sends to the shard hosting spool `spool` (see [`Router::send`]).
    pub async fn send_to_spool(&self, spool: u16, msg: ShardMsg) -> Result<(), ShardMsg> {
        self.send(self.host_of(spool), msg).await
    }

    /// True when the delivery queues are full: new mail should wait (`452 4.3.1`).
    pub fn queues_full(&self) -> bool {
        self.stats.queued_rcpts.load(Ordering::Relaxed) >= self.queued_rcpts_max
    }

    /// Sends to `shard`'s inbox, waiting (asynchronously) while it is full, for as long as it
    /// takes: hand-offs and outcomes are never dropped. A shard's inbox is drained by a task that
    /// never waits on another shard, so two shards waiting on each other cannot deadlock. Fails
    /// only when the receiving shard has stopped.
    pub async fn send(&self, shard: usize, msg: ShardMsg) -> Result<(), ShardMsg> {
        let sender = &self.senders[shard];
        let msg = match sender.try_send(msg) {
            Ok(()) => {
                self.stats.sent.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            Err(TrySendError::Closed(m)) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                return Err(m);
            }
            Err(TrySendError::Full(m)) => m,
        };
        self.stats.inbox_full_waits.fetch_add(1, Ordering::Relaxed);
        let permit = match tokio::time::timeout(INBOX_WAIT_WARN, sender.reserve()).await {
            Ok(p) => p,
            Err(_) => {
                tracing::warn!(shard, "shard inbox full for 30 s; still waiting for room");
                sender.reserve().await
            }
        };
        match permit {
            Ok(permit) => {
                permit.send(msg);
                self.stats.sent.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(_) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                Err(msg)
            }
        }
    }

    /// Sends from a thread outside the shards (the admin endpoint's blocking threads, inside
    /// its runtime), waiting while the inbox is full, up to `timeout`; gives the message back
    /// when it could not be sent.
    pub fn send_blocking(
        &self,
        shard: usize,
        msg: ShardMsg,
        timeout: Duration,
    ) -> Result<(), ShardMsg> {
        let sender = &self.senders[shard];
        let msg = match sender.try_send(msg) {
            Ok(()) => return Ok(()),
            Err(TrySendError::Closed(m)) => return Err(m),
            Err(TrySendError::Full(m)) => m,
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return Err(msg);
        };
        match runtime.block_on(tokio::time::timeout(timeout, sender.reserve())) {
            Ok(Ok(permit)) => {
                permit.send(msg);
                Ok(())
            }
            _ => Err(msg),
        }
    }

    /// Hands each recipient of a committed message to the shard owning its domain.
    pub async fn hand_off(
        &self,
        spool_shard: u16,
        queue_id: QueueId,
        base: Location,
        received_at_micros: u64,
        rcpts: &[(&str, HandoffRcpt)],
        counted: bool,
    ) {
        let shards = self.senders.len();
        let mut by_owner: Vec<Vec<HandoffRcpt>> = vec![Vec::new(); shards];
        for (addr, r) in rcpts {
            by_owner[self.deliverer_of(route::domain_of(addr), spool_shard)].push(*r);
        }
        for (owner, rcpts) in by_owner
            .into_iter()
            .enumerate()
            .filter(|(_, r)| !r.is_empty())
        {
            let h = Handoff {
                queue_id,
                spool_shard,
                base,
                received_at_micros,
                rcpts,
                counted,
            };
            if self.send(owner, ShardMsg::Deliver(h)).await.is_err() {
                tracing::warn!(
                    %queue_id,
                    owner,
                    "shard stopped; recipients stay spooled until the next start"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap()
            .block_on(f)
    }

    const BASE: Location = Location {
        segment: 1,
        offset: 64,
        len: 128,
    };

    fn rcpt(index: u32) -> HandoffRcpt {
        HandoffRcpt {
            index,
            attempts: 0,
            next_attempt_micros: 0,
        }
    }

    #[test]
    fn router_sends_each_recipient_to_its_domain_owner() {
        let (router, mut inboxes) = Router::new(3, 1000);
        let rcpts = ["a@one.test", "b@two.test", "c@one.test", "d@three.test"];
        let with_state: Vec<(&str, HandoffRcpt)> =
            (0..4).map(|i| (rcpts[i], rcpt(i as u32))).collect();
        block_on(router.hand_off(1, QueueId(9), BASE, 7, &with_state, false));
        let mut seen = Vec::new();
        for (shard, inbox) in inboxes.iter_mut().enumerate() {
            while let Ok(m) = inbox.try_recv() {
                let ShardMsg::Deliver(h) = m else {
                    panic!("not a hand-off")
                };
                assert_eq!((h.queue_id, h.spool_shard, h.base), (QueueId(9), 1, BASE));
                for r in h.rcpts {
                    let domain = route::domain_of(rcpts[r.index as usize]);
                    assert_eq!(route::owner_shard(domain, 3), shard);
                    seen.push(r.index);
                }
            }
        }
        seen.sort();
        assert_eq!(seen, vec![0, 1, 2, 3]);
    }

    #[test]
    fn a_full_inbox_is_waited_on_for_as_long_as_it_takes_and_nothing_is_dropped() {
        let (router, mut inbox) = Router::new(1, 1000);
        let local = tokio::task::LocalSet::new();
        block_on(local.run_until(async {
            for i in 0..INBOX_LEN_MAX {
                router
                    .hand_off(
                        0,
                        QueueId(i as u128),
                        BASE,
                        0,
                        &[("x@y.test", rcpt(0))],
                        true,
                    )
                    .await;
            }
            // Full: the sender waits, well past the old 30 s give-up (virtual time).
            let r = router.clone();
            let sender = tokio::task::spawn_local(async move {
                r.hand_off(
                    0,
                    QueueId(u128::MAX),
                    BASE,
                    0,
                    &[("x@y.test", rcpt(0))],
                    true,
                )
                .await;
            });
            tokio::time::sleep(INBOX_WAIT_WARN * 4).await;
            assert!(!sender.is_finished(), "the sender gave up");
            assert_eq!(router.stats.inbox_full_waits.load(Ordering::Relaxed), 1);
            // Room again: the waiting item goes through, after every earlier one.
            let _ = inbox[0].try_recv();
            sender.await.unwrap();
            let mut last = None;
            while let Ok(m) = inbox[0].try_recv() {
                last = Some(m);
            }
            let Some(ShardMsg::Deliver(h)) = last else {
                panic!("the waiting hand-off was lost")
            };
            assert_eq!(h.queue_id, QueueId(u128::MAX));
            assert_eq!(router.stats.dropped.load(Ordering::Relaxed), 0);
        }));
    }
}
