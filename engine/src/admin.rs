//! Operator control of the queues: the requests every shard answers for the domains it owns
//! ([`Request`], sent over the shards' inboxes), and the local HTTP endpoint that `saida queue`
//! talks to (`server`).

use queue_format::QueueId;
use serde::{Deserialize, Serialize};

/// An operator request, broadcast to every shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// Queued recipients per domain.
    Summary,
    /// Stop delivering to a domain (queued mail stays; new mail is queued).
    Suspend(String),
    Resume(String),
    /// Retry deferred recipients now (one domain, or all).
    Flush(Option<String>),
    /// Fail queued recipients with a bounce to the sender.
    Bounce(Selector),
    /// Remove queued recipients without a bounce.
    Delete(Selector),
}

/// What a bounce or delete applies to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selector {
    Message(QueueId),
    Domain(String),
}

/// One domain's queue, as the summary shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainSummary {
    pub domain: String,
    pub shard: u16,
    pub queued_rcpts: usize,
    pub ready_jobs: usize,
    pub deferred_jobs: usize,
    pub oldest_age_secs: Option<u64>,
    pub next_attempt_in_secs: Option<u64>,
    pub suspended: bool,
    pub connections: usize,
}

/// One shard's answer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardReply {
    pub domains: Vec<DomainSummary>,
    /// Recipients (bounce, delete), jobs (flush) or domains (suspend, resume) affected.
    pub affected: usize,
}
