//! When to try a deferred recipient again, and when to give up: a pure function of the attempt
//! count, the time the message was received and the configured schedule.

use std::time::Duration;

/// Retry schedule of a destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetrySchedule {
    /// Delay after the 1st, 2nd, ... failed attempt; the last one repeats.
    pub delays: Vec<Duration>,
    /// Give up (expire, bounce) once the message is this old.
    pub max_age: Duration,
}

impl Default for RetrySchedule {
    /// 1 m, 5 m, 15 m, 30 m, 1 h, 2 h, then every 4 h, for up to 5 days.
    fn default() -> Self {
        let m = |n: u64| Duration::from_secs(60 * n);
        RetrySchedule {
            delays: vec![m(1), m(5), m(15), m(30), m(60), m(120), m(240)],
            max_age: m(5 * 24 * 60),
        }
    }
}

/// What to do after a temporary failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Try again at this time (µs since the epoch).
    RetryAt(u64),
    /// The message is too old: fail permanently (expired).
    Expire,
}

impl RetrySchedule {
    /// The next step after failed attempt number `attempts` (1-based) at `now_micros`, for a
    /// message received at `received_micros`. A retry that would fall after the expiry is
    /// moved to the expiry time itself, so the last attempt happens at the deadline.
    pub fn after_failure(&self, attempts: u32, received_micros: u64, now_micros: u64) -> Next {
        let deadline = received_micros.saturating_add(self.max_age.as_micros() as u64);
        if now_micros >= deadline || self.delays.is_empty() {
            return Next::Expire;
        }
        let i = (attempts.max(1) as usize - 1).min(self.delays.len() - 1);
        let at = now_micros.saturating_add(self.delays[i].as_micros() as u64);
        Next::RetryAt(at.min(deadline))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: u64 = 60_000_000;

    #[test]
    fn delays_grow_then_repeat_the_last() {
        let s = RetrySchedule::default();
        let t0 = 1_000 * MIN;
        assert_eq!(s.after_failure(1, t0, t0), Next::RetryAt(t0 + MIN));
        assert_eq!(s.after_failure(2, t0, t0), Next::RetryAt(t0 + 5 * MIN));
        assert_eq!(s.after_failure(7, t0, t0), Next::RetryAt(t0 + 240 * MIN));
        assert_eq!(s.after_failure(50, t0, t0), Next::RetryAt(t0 + 240 * MIN));
    }

    #[test]
    fn expires_at_max_age_and_never_schedules_past_it() {
        let s = RetrySchedule::default();
        let t0 = 1_000 * MIN;
        let five_days = 5 * 24 * 60 * MIN;
        assert_eq!(s.after_failure(9, t0, t0 + five_days), Next::Expire);
        // One minute before the deadline, a 4-hour delay is cut to the deadline.
        assert_eq!(
            s.after_failure(9, t0, t0 + five_days - MIN),
            Next::RetryAt(t0 + five_days)
        );
    }
}
