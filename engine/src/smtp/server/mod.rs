//! The SMTP submission server: sessions, and the memory they may hold.

pub mod inflight;
pub mod session;
