//! The one way into the spool: SMTP sessions, HTTP injection and bounces all store a message
//! with [`commit`] (appended, group-committed, the queue id given back to the spool when the
//! commit fails) and then hand its recipients to their domains' owners with [`hand_off`]
//! ([`store`] does both). The `250`, the HTTP answer or the bounce's log line comes only after
//! [`commit`] returned `Ok`: the message is durable by then.
//!
//! Not here: what each path checks and adds before (headers, loop and size limits, the memory
//! budget); that is the session's, the API's and the DSN builder's.

use std::cell::RefCell;
use std::rc::Rc;

use spool::{Location, Message, Spool, SpoolError};

use crate::mesh::{HandoffRcpt, Router};

/// Appends `message` and waits for its group commit; on failure the queue id is abandoned.
pub async fn commit(
    spool: &Rc<RefCell<Spool>>,
    message: &Message<'_>,
) -> Result<Location, SpoolError> {
    let ticket = spool.borrow_mut().accept(message);
    let committed = match ticket {
        Ok(t) => t.await,
        Err(e) => Err(e),
    };
    if committed.is_err() {
        spool.borrow_mut().abandon(message.queue_id);
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
        )
        .await;
}

/// [`commit`], then [`hand_off`].
pub async fn store(
    spool: &Rc<RefCell<Spool>>,
    router: &Router,
    shard: u16,
    message: &Message<'_>,
) -> Result<Location, SpoolError> {
    let base = commit(spool, message).await?;
    hand_off(router, shard, message, base).await;
    Ok(base)
}
