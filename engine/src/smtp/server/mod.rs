//! The SMTP submission server: sessions and the headers they add.

pub mod headers;
pub mod session;
