//! SMTP: the sans-IO grammar (commands, replies, message content) shared by the server and,
//! later, the delivery client, plus the server session itself.

pub mod client;
pub mod command;
pub mod data;
pub mod reply;
pub mod server;
