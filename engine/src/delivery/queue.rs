//! The queues of one destination domain on its owner shard: a ready queue of jobs due now, a
//! retry heap of deferred jobs keyed by their next attempt, and the counts that decide when to
//! open another connection. Pure data; the connection workers (`delivery::engine`) drive it.
//!
//! A [`Job`] is the recipients of one message in one domain: they go in one transaction (split
//! at `rcpts_per_transaction_max`), and their message is read from the spool only when the job
//! is sent, so a queued recipient costs memory for its ids and counters only.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::Arc;

use spool::{Location, QueueId};

use crate::delivery::policy::DomainPolicy;
use crate::delivery::throttle::RateLimit;

/// The name of a queue: `[tenant/]domain[@pool:source]`. A configured tenant's mail has queues
/// of its own, and mail leaving from an egress pool has a queue per (source, domain), so that
/// neither a tenant's backlog nor a source's deferrals hold back another's. The source is empty
/// when every source of the pool was suspended as the job was queued (its connections then
/// pick one of the pool). No domain (nor address literal) holds a `/` or an `@`, and tenant,
/// pool and source names are checked to hold none of `/`, `@`, `:`.
pub fn queue_name(tenant: Option<&str>, domain: &str, egress: Option<(&str, &str)>) -> String {
    let mut name = String::with_capacity(domain.len() + 24);
    if let Some(t) = tenant {
        name.push_str(t);
        name.push('/');
    }
    name.push_str(domain);
    if let Some((pool, source)) = egress {
        name.push('@');
        name.push_str(pool);
        name.push(':');
        name.push_str(source);
    }
    name
}

/// The tenant and destination domain of a queue name ([`queue_name`] backwards).
pub fn split_queue_name(name: &str) -> (Option<&str>, &str) {
    let name = name.split_once('@').map_or(name, |(rest, _)| rest);
    match name.split_once('/') {
        Some((t, d)) => (Some(t), d),
        None => (None, name),
    }
}

/// The egress pool and source of a queue name, if it has them (the source may be empty).
pub fn queue_egress(name: &str) -> Option<(&str, &str)> {
    let (_, egress) = name.split_once('@')?;
    Some(egress.split_once(':').unwrap_or((egress, "")))
}

/// The time a queue's ready jobs should take to drain: beyond it, more connections open.
pub const DRAIN_TARGET_MICROS: u64 = 1_000_000;

/// One recipient of a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JobRcpt {
    pub index: u32,
    /// Attempts made before this one.
    pub attempts: u32,
    /// A DELAY DSN was sent for it (by this process: after a restart one more may go out).
    pub delay_notified: bool,
}

/// Recipients of one message in one domain, delivered together.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    pub queue_id: QueueId,
    pub spool_shard: u16,
    pub base: Location,
    pub received_at_micros: u64,
    pub rcpts: Vec<JobRcpt>,
    /// The job already went back to the queue once after a `421` (failover to another host).
    pub failed_over: bool,
}

/// A deferred job in the retry heap (ordered by due time, then arrival).
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Deferred {
    due_micros: u64,
    seq: u64,
    job: JobBox,
}

/// Jobs compare by nothing (the heap orders by time and sequence only).
#[derive(Debug)]
struct JobBox(Job);

impl PartialEq for JobBox {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for JobBox {}
impl PartialOrd for JobBox {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for JobBox {
    fn cmp(&self, _: &Self) -> std::cmp::Ordering {
        std::cmp::Ordering::Equal
    }
}

/// The state of one destination domain.
pub struct DomainQueue {
    pub policy: Arc<DomainPolicy>,
    ready: VecDeque<Job>,
    deferred: BinaryHeap<Reverse<Deferred>>,
    seq: u64,
    /// Recipients in `ready` and `deferred`.
    rcpts: usize,
    /// Connection workers running for this domain, and how many of them wait for work.
    pub workers: usize,
    pub idle_workers: usize,
    /// Workers holding an established session.
    pub connected: usize,
    /// No new connection before this time (after a failed connection, or while the rate limit
    /// has no token for longer than an idle connection may wait).
    pub backoff_until_micros: u64,
    /// An operator suspended the destination (saved across restarts).
    pub suspended: bool,
    /// An operator suspended the queue's tenant (`Tenant::suspended` is the saved state).
    pub held: bool,
    /// The egress source this queue's mail leaves from (its connections try it first).
    pub source: Option<String>,
    /// The mailbox provider of the destination (`delivery::provider`), once its MX is known.
    pub provider: Option<usize>,
    pub rate: RateLimit,
    /// Moving average of one transaction's time on this queue's connections (µs; 0 = none
    /// measured yet): how many connections the backlog needs to drain in time.
    pub txn_micros: u64,
    /// Wakes idle workers when work arrives.
    pub wake: std::rc::Rc<tokio::sync::Notify>,
}

impl DomainQueue {
    pub fn new(policy: Arc<DomainPolicy>, now_micros: u64) -> DomainQueue {
        let (s, m, h) = policy.rate;
        DomainQueue {
            policy,
            ready: VecDeque::new(),
            deferred: BinaryHeap::new(),
            seq: 0,
            rcpts: 0,
            workers: 0,
            idle_workers: 0,
            connected: 0,
            backoff_until_micros: 0,
            suspended: false,
            held: false,
            source: None,
            provider: None,
            rate: RateLimit::new(s, m, h, now_micros),
            txn_micros: 0,
            wake: Default::default(),
        }
    }

    /// Suspended by an operator, for the destination or for the tenant.
    pub fn paused(&self) -> bool {
        self.suspended || self.held
    }

    /// Queues a job: ready now, or deferred until `due_micros`.
    pub fn push(&mut self, job: Job, due_micros: u64, now_micros: u64) {
        self.rcpts += job.rcpts.len();
        if due_micros <= now_micros {
            self.ready.push_back(job);
        } else {
            self.seq += 1;
            self.deferred.push(Reverse(Deferred {
                due_micros,
                seq: self.seq,
                job: JobBox(job),
            }));
        }
    }

    /// Puts a job back at the head of the ready queue (it was taken but not attempted).
    pub fn push_front(&mut self, job: Job) {
        self.rcpts += job.rcpts.len();
        self.ready.push_front(job);
    }

    /// Takes the next ready job, at most `rcpts_per_transaction_max` recipients of it (the rest
    /// stays at the head).
    pub fn pop(&mut self) -> Option<Job> {
        if self.paused() {
            return None;
        }
        let max = self.policy.rcpts_per_transaction_max.max(1);
        let head = self.ready.front_mut()?;
        let job = if head.rcpts.len() > max {
            let rest = head.rcpts.split_off(max);
            let first = std::mem::replace(&mut head.rcpts, rest);
            Job {
                rcpts: first,
                ..head.clone()
            }
        } else {
            self.ready.pop_front()?
        };
        self.rcpts -= job.rcpts.len();
        Some(job)
    }

    /// Moves deferred jobs that are due to the ready queue; returns how many moved.
    pub fn promote_due(&mut self, now_micros: u64) -> usize {
        let mut n = 0;
        while let Some(Reverse(d)) = self.deferred.peek() {
            if d.due_micros > now_micros {
                break;
            }
            let Some(Reverse(d)) = self.deferred.pop() else {
                break;
            };
            self.ready.push_back(d.job.0);
            n += 1;
        }
        n
    }

    /// Makes every deferred job due now (an operator's flush).
    pub fn flush(&mut self) -> usize {
        self.promote_due(u64::MAX)
    }

    /// Removes every queued job (ready and deferred) that `select` picks.
    pub fn take_where(&mut self, mut select: impl FnMut(&Job) -> bool) -> Vec<Job> {
        let mut out = Vec::new();
        let mut keep = VecDeque::with_capacity(self.ready.len());
        for j in self.ready.drain(..) {
            if select(&j) {
                out.push(j)
            } else {
                keep.push_back(j)
            }
        }
        self.ready = keep;
        let deferred = std::mem::take(&mut self.deferred).into_vec();
        for Reverse(d) in deferred {
            if select(&d.job.0) {
                out.push(d.job.0);
            } else {
                self.deferred.push(Reverse(d));
            }
        }
        self.rcpts -= out.iter().map(|j| j.rcpts.len()).sum::<usize>();
        out
    }

    /// Takes every ready job (to defer or fail them all after the destination failed).
    pub fn take_ready(&mut self) -> Vec<Job> {
        let jobs: Vec<Job> = self.ready.drain(..).collect();
        self.rcpts -= jobs.iter().map(|j| j.rcpts.len()).sum::<usize>();
        jobs
    }

    pub fn ready_jobs(&self) -> usize {
        self.ready.len()
    }

    pub fn deferred_jobs(&self) -> usize {
        self.deferred.len()
    }

    /// Recipients queued (ready and deferred, not those being attempted).
    pub fn queued_rcpts(&self) -> usize {
        self.rcpts
    }

    /// Recipients in the ready queue and in the retry heap.
    pub fn rcpts_by_state(&self) -> (usize, usize) {
        let ready: usize = self.ready.iter().map(|j| j.rcpts.len()).sum();
        (ready, self.rcpts.saturating_sub(ready))
    }

    /// Receipt time of the oldest queued message.
    pub fn oldest_received_micros(&self) -> Option<u64> {
        let r = self.ready.iter().map(|j| j.received_at_micros);
        let d = self
            .deferred
            .iter()
            .map(|Reverse(d)| d.job.0.received_at_micros);
        r.chain(d).min()
    }

    /// Time of the next deferred attempt.
    pub fn next_due_micros(&self) -> Option<u64> {
        self.deferred.peek().map(|Reverse(d)| d.due_micros)
    }

    /// Counts one transaction's time into the moving average (weight 1/8).
    pub fn observe_transaction(&mut self, micros: u64) {
        let micros = micros.max(1);
        self.txn_micros = match self.txn_micros {
            0 => micros,
            avg => (avg * 7 + micros) / 8,
        };
    }

    /// How many more connection workers to start now, when no worker is idle and no backoff
    /// is running: enough to carry the ready queue at `msgs_per_connection_max` each, and
    /// enough to drain it within [`DRAIN_TARGET_MICROS`] at the observed transaction time (a
    /// destination answering in 200 ms gets its 99 messages over ten connections in 2 s, not
    /// over one in 20 s), up to `connections_max`.
    pub fn workers_wanted(&self, now_micros: u64) -> usize {
        if self.paused()
            || self.ready.is_empty()
            || self.idle_workers > 0
            || now_micros < self.backoff_until_micros
        {
            return 0;
        }
        let per_conn = self.policy.msgs_per_connection_max.max(1) as usize;
        let jobs = self.ready.len();
        let by_count = jobs.div_ceil(per_conn);
        let by_time = (jobs as u64)
            .saturating_mul(self.txn_micros)
            .div_ceil(DRAIN_TARGET_MICROS) as usize;
        let want = by_count.max(by_time).min(self.policy.connections_max);
        want.saturating_sub(self.workers)
    }

    pub fn is_empty(&self) -> bool {
        self.ready.is_empty() && self.deferred.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_names_carry_the_tenant_apart_from_the_domain() {
        assert_eq!(
            split_queue_name(&queue_name(None, "d.test", None)),
            (None, "d.test")
        );
        let n = queue_name(Some("acme"), "d.test", None);
        assert_eq!(split_queue_name(&n), (Some("acme"), "d.test"));
        assert_eq!(queue_egress(&n), None);
        let n = queue_name(Some("acme"), "d.test", Some(("bulk", "ip-1")));
        assert_eq!(split_queue_name(&n), (Some("acme"), "d.test"));
        assert_eq!(queue_egress(&n), Some(("bulk", "ip-1")));
        let literal = "[IPv6:::1]";
        assert_eq!(split_queue_name(literal), (None, literal));
        let n = queue_name(None, literal, Some(("bulk", "")));
        assert_eq!(split_queue_name(&n), (None, literal));
        assert_eq!(queue_egress(&n), Some(("bulk", "")));
    }

    use crate::delivery::policy::{DeliveryConfig, DeliveryPolicies};

    fn policy(conns: usize, per_conn: u32, rcpts: usize) -> Arc<DomainPolicy> {
        let mut p = (*DeliveryPolicies::new(&DeliveryConfig::default(), &[])
            .unwrap()
            .for_domain("x.test"))
        .clone();
        p.connections_max = conns;
        p.msgs_per_connection_max = per_conn;
        p.rcpts_per_transaction_max = rcpts;
        Arc::new(p)
    }

    fn job(id: u128, rcpts: u32) -> Job {
        Job {
            queue_id: QueueId(id),
            spool_shard: 0,
            base: Location {
                segment: 1,
                offset: 64,
                len: 100,
            },
            received_at_micros: id as u64,
            rcpts: (0..rcpts)
                .map(|index| JobRcpt {
                    index,
                    attempts: 0,
                    delay_notified: false,
                })
                .collect(),
            failed_over: false,
        }
    }

    #[test]
    fn deferred_jobs_become_ready_in_due_order() {
        let mut q = DomainQueue::new(policy(2, 10, 100), 0);
        q.push(job(1, 1), 300, 100);
        q.push(job(2, 1), 200, 100);
        q.push(job(3, 1), 50, 100);
        assert_eq!(q.ready_jobs(), 1);
        assert_eq!(q.next_due_micros(), Some(200));
        assert_eq!(q.promote_due(250), 1);
        assert_eq!(q.pop().unwrap().queue_id, QueueId(3));
        assert_eq!(q.pop().unwrap().queue_id, QueueId(2));
        assert!(q.pop().is_none());
        assert_eq!(q.flush(), 1);
        assert_eq!(q.pop().unwrap().queue_id, QueueId(1));
        assert!(q.is_empty());
        assert_eq!(q.queued_rcpts(), 0);
    }

    #[test]
    fn large_jobs_are_split_per_transaction() {
        let mut q = DomainQueue::new(policy(1, 10, 3), 0);
        q.push(job(1, 7), 0, 0);
        let sizes: Vec<usize> = std::iter::from_fn(|| q.pop())
            .map(|j| j.rcpts.len())
            .collect();
        assert_eq!(sizes, vec![3, 3, 1]);
        assert_eq!(q.queued_rcpts(), 0);
    }

    #[test]
    fn workers_scale_with_the_backlog_up_to_the_limit() {
        let mut q = DomainQueue::new(policy(3, 10, 100), 0);
        assert_eq!(q.workers_wanted(0), 0);
        for i in 0..15 {
            q.push(job(i, 1), 0, 0);
        }
        assert_eq!(q.workers_wanted(0), 2);
        for i in 0..100 {
            q.push(job(100 + i, 1), 0, 0);
        }
        assert_eq!(q.workers_wanted(0), 3);
        q.workers = 3;
        assert_eq!(q.workers_wanted(0), 0);
        q.workers = 1;
        q.idle_workers = 1;
        assert_eq!(q.workers_wanted(0), 0, "an idle worker is woken instead");
        q.idle_workers = 0;
        q.backoff_until_micros = 100;
        assert_eq!(
            q.workers_wanted(50),
            0,
            "no new connection during a backoff"
        );
        assert_eq!(q.workers_wanted(150), 2);
        q.suspended = true;
        assert_eq!(q.workers_wanted(150), 0);
        assert!(q.pop().is_none(), "a suspended domain hands out nothing");
    }

    #[test]
    fn a_slow_destination_gets_connections_to_drain_its_backlog_in_time() {
        let mut q = DomainQueue::new(policy(10, 100, 100), 0);
        for i in 0..99 {
            q.push(job(i, 1), 0, 0);
        }
        assert_eq!(q.workers_wanted(0), 1, "no transaction time known yet");
        q.observe_transaction(200_000);
        assert_eq!(
            q.workers_wanted(0),
            10,
            "99 x 200 ms in 1 s: 20, capped at 10"
        );
        q.txn_micros = 0;
        for _ in 0..50 {
            q.observe_transaction(2_000);
        }
        assert_eq!(q.txn_micros, 2_000);
        assert_eq!(
            q.workers_wanted(0),
            1,
            "99 x 2 ms drain in 0.2 s on one connection"
        );
        q.observe_transaction(2_000 + 8 * 48_000);
        assert_eq!(q.txn_micros, 50_000, "a moving average");
        assert_eq!(q.workers_wanted(0), 5);
    }

    #[test]
    fn take_where_removes_from_both_queues() {
        let mut q = DomainQueue::new(policy(1, 10, 100), 0);
        q.push(job(1, 2), 0, 0);
        q.push(job(2, 1), 500, 0);
        q.push(job(3, 1), 0, 0);
        let taken = q.take_where(|j| j.queue_id != QueueId(3));
        assert_eq!(taken.len(), 2);
        assert_eq!(q.queued_rcpts(), 1);
        assert_eq!(q.oldest_received_micros(), Some(3));
    }
}
