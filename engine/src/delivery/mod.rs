//! Delivery (issue 4, in progress): the pure policies the per-destination queues apply. Built so
//! far: the retry schedule (`schedule`), message rate limits (`throttle`), bounces (`dsn`) and
//! the delivery log (`log`).

#![allow(dead_code)] // the queues that use these are not wired into the daemon yet

pub mod dsn;
pub mod log;
pub mod schedule;
pub mod throttle;
