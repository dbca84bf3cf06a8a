//! The delivery client is crate `smtp_client` (one outbound connection on `smtp-proto` and
//! `saida-net`); here are its tests against saida's own server sessions.

#[cfg(test)]
mod session_tests;
