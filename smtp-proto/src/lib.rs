//! SMTP as pure functions, for both sides of a connection (RFC 5321, 3030, 2920, 6531).
//!
//! What is here: the bounded line receiver (`line`), the command grammar with bounds and
//! enhanced status codes (`command`), the DATA/BDAT content reader that never lets a bare LF or
//! CR end a message (`content`), replies and their encoding (`reply`), the client side's reply
//! parser, EHLO capabilities, transaction builder and dot-stuffing (`client`), and the header
//! helpers (`Received:`, `Message-ID:`, RFC 5322 dates, loop counting: `headers`), and the
//! SASL PLAIN/LOGIN encodings of AUTH (`sasl`).
//!
//! `fuzzing` holds the oracles of the fuzz target in `fuzz/`, run by a property test too.
//!
//! What is not: sockets, TLS, timers, the spool. Every function takes bytes and returns
//! bytes or a decision, so the daemon, the load tools and the fuzz targets share one grammar.

#![forbid(unsafe_code)]

pub mod client;
pub mod command;
pub mod content;
pub mod fuzzing;
pub mod headers;
pub mod line;
pub mod reply;
pub mod sasl;
