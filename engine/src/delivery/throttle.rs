//! Per-destination message rate limits: token buckets per second, minute and hour. Pure and
//! cheap (no I/O, no allocation): the delivery queue asks before every message.

use std::time::Duration;

/// One token bucket: `capacity` messages, refilled continuously at `capacity` per `period`.
#[derive(Clone, Debug)]
struct Bucket {
    capacity: f64,
    per_micro: f64,
    tokens: f64,
    last_micros: u64,
}

impl Bucket {
    fn new(capacity: u32, period: Duration, now: u64) -> Bucket {
        let capacity = f64::from(capacity.max(1));
        Bucket {
            capacity,
            per_micro: capacity / period.as_micros() as f64,
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

/// Rate limits of one destination: any combination of per second, minute and hour.
#[derive(Clone, Debug, Default)]
pub struct RateLimit {
    buckets: Vec<Bucket>,
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
        let mut buckets = Vec::new();
        for (limit, period) in [(per_second, 1), (per_minute, 60), (per_hour, 3600)] {
            if let Some(n) = limit {
                buckets.push(Bucket::new(n, Duration::from_secs(period), now_micros));
            }
        }
        RateLimit { buckets }
    }

    /// Takes a token from every bucket if all have one; otherwise takes nothing and returns the
    /// microseconds to wait before asking again.
    pub fn try_take(&mut self, now_micros: u64) -> Result<(), u64> {
        for b in &mut self.buckets {
            b.refill(now_micros);
        }
        let wait = self.buckets.iter().map(Bucket::wait).max().unwrap_or(0);
        if wait > 0 {
            return Err(wait);
        }
        for b in &mut self.buckets {
            b.tokens -= 1.0;
        }
        Ok(())
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
        assert_eq!(r.try_take(51 * S), Ok(()), "refills from the new reference");
    }

    #[test]
    fn unlimited_always_allows() {
        let mut r = RateLimit::new(None, None, None, 0);
        for _ in 0..10_000 {
            assert_eq!(r.try_take(0), Ok(()));
        }
    }

    #[test]
    fn per_second_limit_allows_a_burst_then_paces() {
        let mut r = RateLimit::new(Some(10), None, None, 0);
        for _ in 0..10 {
            assert_eq!(r.try_take(0), Ok(()));
        }
        let wait = r.try_take(0).unwrap_err();
        assert!((99_000..=101_000).contains(&wait), "{wait}");
        assert_eq!(r.try_take(wait), Ok(()));
    }

    #[test]
    fn the_tightest_scale_wins_and_a_refusal_takes_nothing() {
        let mut r = RateLimit::new(Some(100), Some(3), None, 0);
        for _ in 0..3 {
            assert_eq!(r.try_take(0), Ok(()));
        }
        let wait = r.try_take(0).unwrap_err();
        assert!((19 * S..=21 * S).contains(&wait), "{wait}");
        // After 60 s the minute bucket is full again: 3 more.
        for _ in 0..3 {
            assert_eq!(r.try_take(60 * S), Ok(()));
        }
        assert!(r.try_take(60 * S).is_err());
    }
}
