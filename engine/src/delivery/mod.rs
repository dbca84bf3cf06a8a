//! Delivery (issue 4, in progress): the pure policies the per-destination queues apply. Built so
//! far: the retry schedule (`schedule`) and message rate limits (`throttle`).

#![allow(dead_code)] // the queues that use these are not wired into the daemon yet

pub mod schedule;
pub mod throttle;
