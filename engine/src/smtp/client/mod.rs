//! The SMTP client used for delivery (issue 4, in progress): the sans-IO protocol
//! (`protocol`) and one outbound connection (`session`: banner, EHLO/HELO, STARTTLS by policy,
//! pipelined transactions with connection reuse, BDAT). MX resolution, per-destination queues,
//! retries and bounces build on it.

// Delivery queues that call this client are not wired into the daemon yet; until they are, the
// tests below are its only callers.
#![allow(dead_code)]

pub mod protocol;
pub mod session;
