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
    /// Checks the schedule: at least one delay, none zero (a zero delay would spin).
    pub fn validate(&self) -> Result<(), String> {
        if self.delays.is_empty() || self.delays.iter().any(Duration::is_zero) {
            return Err("retry delays must be a non-empty list of non-zero durations".into());
        }
        Ok(())
    }

    /// The next step after failed attempt number `attempts` (1-based) at `now_micros`, for a
    /// message received at `received_micros`. Up to 10 % of jitter (from `random`) spreads
    /// retries of everything deferred in the same outage. A retry that would fall after the
    /// expiry is moved to the expiry time itself, so the last attempt happens at the deadline.
    pub fn after_failure(
        &self,
        attempts: u32,
        received_micros: u64,
        now_micros: u64,
        random: u64,
    ) -> Next {
        let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let deadline = received_micros.saturating_add(micros(self.max_age));
        if now_micros >= deadline || self.delays.is_empty() {
            return Next::Expire;
        }
        let i = (attempts.max(1) as usize - 1).min(self.delays.len() - 1);
        let delay = micros(self.delays[i]).max(1);
        let jitter = random % (delay / 10).max(1);
        let at = now_micros.saturating_add(delay).saturating_add(jitter);
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
        assert_eq!(s.after_failure(1, t0, t0, 0), Next::RetryAt(t0 + MIN));
        assert_eq!(s.after_failure(2, t0, t0, 0), Next::RetryAt(t0 + 5 * MIN));
        assert_eq!(s.after_failure(7, t0, t0, 0), Next::RetryAt(t0 + 240 * MIN));
        assert_eq!(
            s.after_failure(50, t0, t0, 0),
            Next::RetryAt(t0 + 240 * MIN)
        );
        // Jitter adds at most a tenth of the delay.
        let Next::RetryAt(at) = s.after_failure(1, t0, t0, u64::MAX) else {
            panic!()
        };
        assert!(at > t0 + MIN && at < t0 + MIN + MIN / 10);
        let zero = RetrySchedule {
            delays: vec![Duration::ZERO],
            ..RetrySchedule::default()
        };
        assert!(zero.validate().is_err());
        let forever = RetrySchedule {
            max_age: Duration::MAX,
            ..RetrySchedule::default()
        };
        assert_eq!(forever.after_failure(1, t0, t0, 0), Next::RetryAt(t0 + MIN));
    }

    #[test]
    fn expires_at_max_age_and_never_schedules_past_it() {
        let s = RetrySchedule::default();
        let t0 = 1_000 * MIN;
        let five_days = 5 * 24 * 60 * MIN;
        assert_eq!(s.after_failure(9, t0, t0 + five_days, 0), Next::Expire);
        // One minute before the deadline, a 4-hour delay is cut to the deadline.
        assert_eq!(
            s.after_failure(9, t0, t0 + five_days - MIN, 0),
            Next::RetryAt(t0 + five_days)
        );
    }
}
