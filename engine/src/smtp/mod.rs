//! SMTP with I/O: the server sessions and the delivery client's connections. The grammar they
//! share (commands, content, replies, dot-stuffing, headers) is the `smtp-proto` crate.

pub mod client;
pub mod server;
