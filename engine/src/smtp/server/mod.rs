//! The SMTP submission server: sessions, the headers they add, and the memory they may hold.

pub mod headers;
pub mod inflight;
pub mod session;
