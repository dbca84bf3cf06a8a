//! The SMTP client used for delivery (issue 4, in progress): today the sans-IO protocol
//! (`protocol`); the delivery session, MX resolution and queues build on it.

pub mod protocol;
