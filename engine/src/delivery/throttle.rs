//! Message rate limits (per second, minute and hour), used per destination and per (source,
//! provider) path. Pure and cheap (no I/O, no allocation after creation): the delivery queue
//! asks before every message.
//!
//! Each scale is two checks, both of which must pass:
//! - a **sliding window** of the period in 64 slots, counting the current slot and the 64
//!   before it: never more than the limit in any interval of the period (a window of 65/64 of
//!   the period is checked, so that also holds for intervals that straddle slot edges, and for
//!   a receiver that counts arrivals a few milliseconds later);
//! - a **token bucket** holding an eighth of the limit, refilled at the limit per period: the
//!   messages are spread over the period instead of leaving in one burst at its start.

use std::time::Duration;

/// Slots per window; the window covers `SLOTS + 1` of them.
const SLOTS: u64 = 64;
const RING: usize = SLOTS as usize + 1;

/// One token bucket: `capacity` messages, refilled continuously at `limit` per `period`.
#[derive(Clone, Debug)]
struct Bucket {
    capacity: f64,
    per_micro: f64,
    tokens: f64,
    last_micros: u64,
}

impl Bucket {
    fn new(limit: u32, period: Duration, now: u64) -> Bucket {
        let limit = f64::from(limit.max(1));
        let capacity = (limit / 8.0).ceil();
        Bucket {
            capacity,
            per_micro: limit / period.as_micros() as f64,
            tokens: capacity,
            last_micros: now,
        }
    }

    fn refill(&mut self, now: u64) {
        if now < self.last_micros {
            // The clock went back: restart the reference instead of waiting for it to return.
            self.last_micros = now;
            return;
        }
        let elapsed = (now - self.last_micros) as f64;
        self.tokens = (self.tokens + elapsed * self.per_micro).min(self.capacity);
        self.last_micros = now;
    }

    /// Microseconds until one token is available (0 if one is).
    fn wait(&self) -> u64 {
        if self.tokens >= 1.0 {
            0
        } else {
            ((1.0 - self.tokens) / self.per_micro).ceil() as u64
        }
    }
}

/// Messages sent in the last `SLOTS + 1` slots of a period.
#[derive(Clone, Debug)]
struct Window {
    limit: u32,
    slot_micros: u64,
    counts: [u32; RING],
    /// The newest slot (time / `slot_micros`).
    head: u64,
    total: u32,
}

impl Window {
    fn new(limit: u32, period: Duration, now: u64) -> Window {
        let slot_micros = (period.as_micros() as u64 / SLOTS).max(1);
        Window {
            limit: limit.max(1),
            slot_micros,
            counts: [0; RING],
            head: now / slot_micros,
            total: 0,
        }
    }

    /// Moves the window to `now`, forgetting slots that left it; returns the time the window
    /// now stands at. A time up to a period behind (another shard's clock reading that took
    /// the lock late) counts as the window's present; a clock that stepped further back
    /// counts every send of the window as just made (no excess, and a wait of a period at
    /// most).
    fn advance(&mut self, now: u64) -> u64 {
        let slot = now / self.slot_micros;
        if slot < self.head {
            if self.head - slot <= RING as u64 {
                return now.max(self.head * self.slot_micros);
            }
            let total = self.total;
            self.counts = [0; RING];
            self.counts[(slot % RING as u64) as usize] = total;
            self.head = slot;
            return now;
        }
        if slot == self.head {
            return now;
        }
        let gone = (slot - self.head).min(RING as u64);
        for k in 1..=gone {
            let i = ((self.head + k) % RING as u64) as usize;
            self.total -= self.counts[i];
            self.counts[i] = 0;
        }
        self.head = slot;
        now
    }

    /// Microseconds until one more message fits (0 if it does).
    fn wait(&self, now: u64) -> u64 {
        if self.total < self.limit {
            return 0;
        }
        // The oldest slots leave first: find the one whose leaving makes room.
        let excess = self.total - self.limit + 1;
        let mut leaving = 0;
        for j in 0..RING as u64 {
            // Position of slot `head - SLOTS + j`; it leaves when `head + j + 1` begins.
            leaving += self.counts[((self.head + j + 1) % RING as u64) as usize];
            if leaving >= excess {
                return ((self.head + j + 1) * self.slot_micros)
                    .saturating_sub(now)
                    .max(1);
            }
        }
        self.slot_micros
    }

    fn take(&mut self) {
        self.counts[(self.head % RING as u64) as usize] += 1;
        self.total += 1;
    }
}

/// Rate limits of one destination or path: any combination of per second, minute and hour.
#[derive(Clone, Debug, Default)]
pub struct RateLimit {
    scales: Vec<(Bucket, Window)>,
}

impl RateLimit {
    /// Limits in messages per second, minute and hour (`None` = no limit at that scale; a limit
    /// of 0 is taken as 1: suspending a destination is a separate switch).
    pub fn new(
        per_second: Option<u32>,
        per_minute: Option<u32>,
        per_hour: Option<u32>,
        now_micros: u64,
    ) -> Self {
        let mut scales = Vec::new();
        for (limit, period) in [(per_second, 1), (per_minute, 60), (per_hour, 3600)] {
            if let Some(n) = limit {
                let period = Duration::from_secs(period);
                scales.push((
                    Bucket::new(n, period, now_micros),
                    Window::new(n, period, now_micros),
                ));
            }
        }
        RateLimit { scales }
    }

    /// Microseconds until every scale has room for one more message (0 if they have).
    pub fn wait(&mut self, now_micros: u64) -> u64 {
        let mut wait = 0;
        for (b, w) in &mut self.scales {
            b.refill(now_micros);
            let at = w.advance(now_micros);
            let behind = at - now_micros;
            let window = match w.wait(at) {
                0 => 0,
                x => x + behind,
            };
            wait = wait.max(b.wait()).max(window);
        }
        wait
    }

    /// Counts one message (after [`Self::wait`] said 0).
    pub fn take(&mut self) {
        for (b, w) in &mut self.scales {
            b.tokens -= 1.0;
            w.take();
        }
    }

    /// Takes a message from every scale if all have room; otherwise takes nothing and returns
    /// the microseconds to wait before asking again.
    pub fn try_take(&mut self, now_micros: u64) -> Result<(), u64> {
        match self.wait(now_micros) {
            0 => {
                self.take();
                Ok(())
            }
            wait => Err(wait),
        }
    }
}

/// Messages sent over the last minute, and since when the count runs: what a path sends, for
/// backoff to cut from when it has no configured rate.
#[derive(Clone, Debug)]
pub struct Recent {
    window: Window,
    since_micros: u64,
}

impl Recent {
    pub fn new(now_micros: u64) -> Recent {
        Recent {
            window: Window::new(u32::MAX, Duration::from_secs(60), now_micros),
            since_micros: now_micros,
        }
    }

    pub fn add(&mut self, now_micros: u64) {
        let _ = self.window.advance(now_micros);
        if self.window.total == 0 {
            self.since_micros = now_micros;
        }
        self.window.take();
    }

    /// Messages per minute over the last minute, or over the time since the count began when
    /// that is shorter (at least one second).
    pub fn per_minute(&mut self, now_micros: u64) -> u64 {
        let _ = self.window.advance(now_micros);
        let secs = (now_micros.saturating_sub(self.since_micros) / 1_000_000).clamp(1, 60);
        u64::from(self.window.total) * 60 / secs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000;

    #[test]
    fn a_clock_going_back_does_not_stall() {
        let mut r = RateLimit::new(Some(1), None, None, 100 * S);
        assert_eq!(r.try_take(100 * S), Ok(()));
        assert!(r.try_take(50 * S).is_err());
        assert_eq!(
            r.try_take(52 * S),
            Ok(()),
            "the send before the step back counts for one period from the new reference"
        );
    }

    /// Shards read the clock before taking a shared path's lock: a reading a little behind
    /// must neither forget recent sends nor open the window.
    #[test]
    fn a_reading_slightly_behind_counts_as_the_present() {
        let mut r = RateLimit::new(Some(64), None, None, 0);
        let mut sent = 0;
        // Alternate a time and one 20 ms earlier, across slot edges, for 3 s.
        for k in 0..3000u64 {
            let now = k * 1_000 + if k % 2 == 0 { 0 } else { 20_000 };
            let now = now.saturating_sub(20_000);
            if r.try_take(now).is_ok() {
                sent += 1;
            }
        }
        assert!(sent <= 64 * 3 + 64, "{sent} in about 3 s at 64 a second");
    }

    #[test]
    fn unlimited_always_allows() {
        let mut r = RateLimit::new(None, None, None, 0);
        for _ in 0..10_000 {
            assert_eq!(r.try_take(0), Ok(()));
        }
    }

    #[test]
    fn recent_counts_what_was_sent_per_minute() {
        let mut r = Recent::new(0);
        assert_eq!(r.per_minute(0), 0);
        for i in 0..100 {
            r.add(10 * S + i * 10_000);
        }
        assert_eq!(r.per_minute(11 * S), 6000, "100 in a second");
        assert_eq!(r.per_minute(200 * S), 0, "forgotten after a minute");
    }

    #[test]
    fn a_burst_of_an_eighth_then_paced_at_the_limit() {
        let mut r = RateLimit::new(Some(80), None, None, 0);
        for _ in 0..10 {
            assert_eq!(r.try_take(0), Ok(()));
        }
        let wait = r.try_take(0).unwrap_err();
        assert!((12_000..=13_000).contains(&wait), "1/80 s: {wait}");
        assert_eq!(r.try_take(wait), Ok(()));
    }

    /// Never more than the limit in any interval of the period, whatever the pattern of asks.
    #[test]
    fn no_interval_of_a_period_holds_more_than_the_limit() {
        for (limit, step) in [
            (200u32, 700u64),
            (200, 4_999),
            (10, 1),
            (64, 15_625),
            (1, 3),
        ] {
            let mut r = RateLimit::new(Some(limit), None, None, 0);
            let mut sent = Vec::new();
            let mut now = 0;
            while now < 5 * S {
                if r.try_take(now).is_ok() {
                    sent.push(now);
                }
                now += step;
            }
            for (i, &t) in sent.iter().enumerate() {
                let within = sent[i..].iter().take_while(|&&u| u < t + S).count();
                assert!(within <= limit as usize, "{within} > {limit} (step {step})");
            }
            // And the limit is nearly reached over the run (the window is 65/64 of a second).
            let per_second = sent.len() as f64 / 5.0;
            assert!(
                per_second >= f64::from(limit) * 0.9 - 1.0,
                "{per_second} for {limit}"
            );
        }
    }

    #[test]
    fn the_tightest_scale_wins_and_a_refusal_takes_nothing() {
        let mut r = RateLimit::new(Some(100), Some(3), None, 0);
        assert_eq!(r.try_take(0), Ok(()));
        let wait = r.try_take(0).unwrap_err();
        assert!((19 * S..=21 * S).contains(&wait), "one per 20 s: {wait}");
        assert_eq!(r.try_take(20 * S), Ok(()));
        assert_eq!(r.try_take(40 * S), Ok(()));
        // Three in the minute: the fourth waits until the first leaves the window.
        let wait = r.try_take(60 * S).unwrap_err();
        assert!(wait > 0 && wait <= 2 * S, "{wait}");
        assert!(r.try_take(60 * S + wait).is_ok());
    }
}
