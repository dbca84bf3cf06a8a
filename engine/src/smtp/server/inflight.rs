//! The budget for message content held in memory by all sessions of all shards at once.
//!
//! Each session buffers the message it is receiving until the spool has it. Without a global
//! bound, many sessions each sending a message of `message_bytes_max` could exhaust memory. A
//! session charges the capacity of its buffer to the budget as it grows (in steps, so the
//! shared counter is touched rarely); a transfer that would pass `[smtp]
//! inflight_message_bytes_max` is refused with `452 4.3.1` and its buffer freed, and a new
//! DATA or BDAT while the budget is spent gets `452 4.3.1` at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Bytes charged at a time beyond what a buffer needs now.
const CHARGE_STEP: usize = 256 << 10;

/// Message bytes held in memory by every session, against their bound.
#[derive(Debug)]
pub struct InflightBudget {
    used: AtomicUsize,
    max: usize,
}

/// Bytes one transfer holds against the budget; given back when dropped.
#[derive(Debug)]
pub struct Charge {
    budget: Arc<InflightBudget>,
    bytes: usize,
}

impl InflightBudget {
    pub fn new(max: usize) -> Arc<InflightBudget> {
        Arc::new(InflightBudget {
            used: AtomicUsize::new(0),
            max,
        })
    }

    /// True when nothing more can be charged: new transfers are refused.
    pub fn spent(&self) -> bool {
        self.used.load(Ordering::Relaxed) >= self.max
    }

    /// Bytes charged now.
    #[cfg(test)]
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// An empty charge for a new transfer.
    pub fn charge(self: &Arc<Self>) -> Charge {
        Charge {
            budget: Arc::clone(self),
            bytes: 0,
        }
    }
}

impl Charge {
    /// Makes the charge cover `needed` bytes; false when the budget cannot (nothing is
    /// charged then beyond what was before).
    pub fn cover(&mut self, needed: usize) -> bool {
        if needed <= self.bytes {
            return true;
        }
        let more = needed - self.bytes + CHARGE_STEP;
        let b = &self.budget;
        let ok = b
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                (used + more <= b.max).then_some(used + more)
            })
            .is_ok();
        if ok {
            self.bytes += more;
        }
        ok
    }

    /// Gives everything back (the buffer was freed).
    pub fn release(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::Relaxed);
        self.bytes = 0;
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_are_bounded_and_given_back() {
        let budget = InflightBudget::new(1 << 20);
        let mut a = budget.charge();
        assert!(a.cover(600 << 10));
        let mut b = budget.charge();
        assert!(!b.cover(600 << 10), "two would pass the bound");
        assert_eq!(b.bytes, 0);
        assert!(budget.used() <= 1 << 20);
        drop(a);
        assert_eq!(budget.used(), 0);
        assert!(b.cover(600 << 10));
        b.release();
        assert_eq!(budget.used(), 0);
        assert!(!budget.spent());
    }
}
