//! Delivery: the per-destination queues of the domains a shard owns and the workers that drain
//! them over reused, pipelined SMTP connections (`engine`, `queue`), and the policies they
//! apply: configuration and routes (`policy`), the retry schedule (`schedule`), message rate
//! limits (`throttle`), bounces (`dsn`), what a failure means (`bounce_class`), egress sources
//! (`egress`), mailbox providers and their shared limits (`provider`), adaptive backoff
//! (`backoff`) and the delivery log (`log`).

pub mod backoff;
pub mod bounce_class;
pub mod dsn;
pub mod egress;
pub mod engine;
pub mod log;
pub mod policy;
pub mod provider;
pub mod queue;
pub mod schedule;
pub mod throttle;
