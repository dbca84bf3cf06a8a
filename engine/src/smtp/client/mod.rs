//! The SMTP client used for delivery: one outbound connection (`session`: banner, EHLO/HELO,
//! STARTTLS by policy, pipelined transactions with connection reuse, BDAT), on the grammar of
//! `smtp_proto::client`.

pub mod session;
