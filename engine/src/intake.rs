//! The one way into the spool: SMTP sessions, HTTP injection and bounces all store a message
//! with [`commit`] (appended, group-committed, the queue id given back to the spool when the
//! commit fails) and then hand its recipients to their domains' owners with [`hand_off`]
//! ([`store`] does both). The `250`, the HTTP answer or the bounce's log line comes only after
//! [`commit`] returned `Ok`: the message is durable by then.
//!
//! [`dkim_sign`] signs a message once, before it is stored: the signatures are part of the
//! stored bytes, so no delivery attempt signs again.
//!
//! Not here: what each path checks and adds before (headers, loop and size limits, the memory
//! budget); that is the session's, the API's and the DSN builder's.

use std::cell::RefCell;
use std::rc::Rc;

use spool::{Location, Message, Spool, SpoolError};

use crate::mesh::{HandoffRcpt, Router};

/// Appends `message` and waits for its group commit; on failure the queue id is abandoned.
/// Once committed, its recipients count in `tenant`'s queue quota.
pub async fn commit(
    spool: &Rc<RefCell<Spool>>,
    message: &Message<'_>,
    tenant: Option<&crate::tenant::Tenant>,
) -> Result<Location, SpoolError> {
    let ticket = spool.borrow_mut().accept(message);
    let committed = match ticket {
        Ok(t) => t.await,
        Err(e) => Err(e),
    };
    match (&committed, tenant) {
        (Err(_), _) => spool.borrow_mut().abandon(message.queue_id),
        (Ok(_), Some(t)) => t.queued(message.recipients.len()),
        (Ok(_), None) => {}
    }
    committed
}

/// Hands every recipient of the committed `message` (at `base`, in `shard`'s spool) to the
/// shard owning its domain, as a first attempt.
pub async fn hand_off(router: &Router, shard: u16, message: &Message<'_>, base: Location) {
    let rcpts: Vec<(&str, HandoffRcpt)> = (0u32..)
        .zip(&message.recipients)
        .map(|(index, r)| {
            let state = HandoffRcpt {
                index,
                attempts: 0,
                next_attempt_micros: 0,
            };
            (r.address, state)
        })
        .collect();
    router
        .hand_off(
            shard,
            message.queue_id,
            base,
            message.received_at_micros,
            &rcpts,
            true,
        )
        .await;
}

/// [`commit`], then [`hand_off`].
pub async fn store(
    spool: &Rc<RefCell<Spool>>,
    router: &Router,
    shard: u16,
    message: &Message<'_>,
    tenant: Option<&crate::tenant::Tenant>,
) -> Result<Location, SpoolError> {
    let base = commit(spool, message, tenant).await?;
    hand_off(router, shard, message, base).await;
    Ok(base)
}

/// Why a message could not be made ready for the spool.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error(transparent)]
    Sign(#[from] saida_dkim::SignError),
}

impl PrepareError {
    /// The reply the client gets (the message is not stored).
    pub fn reply(&self) -> (u16, &'static str, &'static str) {
        (451, "4.3.0", "Message could not be signed; try again later")
    }
}

/// DKIM-signs `body` (the message as it will be stored) once, at intake: with the keys of its
/// first `From:` domain, of `[signing] dkim_also` and of the tenant's `dkim_also`; returns it
/// with the signatures on top (unchanged when no key applies). Timed into `dkim_sign_seconds`.
pub fn dkim_sign(
    keys: &saida_dkim::Keyring,
    also: &[String],
    tenants: &crate::tenant::Tenants,
    tenant: Option<&crate::tenant::Tenant>,
    metrics: &crate::metrics::Metrics,
    shard: u16,
    body: Vec<u8>,
) -> Result<Vec<u8>, PrepareError> {
    let keys = keys.keys();
    if keys.is_empty() {
        return Ok(body);
    }
    let started = std::time::Instant::now();
    let mut from = crate::tenant::from_domains(&body);
    // A domain that is a tenant's sender domain is signed for that tenant's mail only.
    from.retain(|d| {
        tenants
            .owner_of(d)
            .is_none_or(|owner| tenant.is_some_and(|t| t.name() == owner.name()))
    });
    // With several From: fields, which one a reader shows is not known: none is signed.
    if smtp_proto::headers::count_fields(&body, "From") > 1 {
        from.clear();
    }
    let mut extra: Vec<String> = also.to_vec();
    if let Some(t) = tenant {
        extra.extend(t.config.dkim_also.iter().cloned());
    }
    let signatures = keys.sign(&body, from.first().map(String::as_str), &extra)?;
    if signatures.is_empty() {
        return Ok(body);
    }
    let mut signed = Vec::with_capacity(signatures.len() + body.len());
    signed.extend_from_slice(signatures.as_bytes());
    signed.extend_from_slice(&body);
    let micros = started.elapsed().as_micros() as u64;
    metrics.record(shard, crate::metrics::Hist::DkimSign, micros);
    Ok(signed)
}
