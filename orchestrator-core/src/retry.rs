//! Retry policy: exponential backoff with jitter, shared by the bus, saga steps and commands.
//!
//! ```
//! use std::time::Duration;
//! use orchestrator_core::{RetryPolicy, Jitter};
//!
//! let policy = RetryPolicy::exponential(5, Duration::from_millis(100))
//!     .with_max_delay(Duration::from_secs(2))
//!     .with_jitter(Jitter::None);
//! assert_eq!(policy.delay_after(1), Some(Duration::from_millis(100)));
//! assert_eq!(policy.delay_after(3), Some(Duration::from_millis(400)));
//! assert_eq!(policy.delay_after(5), None); // 5 attempts made: give up
//! ```

use std::time::Duration;

/// How random spread is added to backoff delays, so that many failing consumers do not
/// retry in lock-step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Jitter {
    /// The exact exponential delay.
    None,
    /// A uniformly random delay between zero and the exponential delay.
    Full,
    /// Half the exponential delay plus a random part up to the other half.
    #[default]
    Equal,
}

/// When to retry a failed operation and how long to wait first.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1 = never retry).
    pub max_attempts: u32,
    /// The delay after the first failure.
    pub initial_delay: Duration,
    /// The largest delay.
    pub max_delay: Duration,
    /// Each delay is the previous one times this (at least 1).
    pub multiplier: f64,
    /// Random spread.
    pub jitter: Jitter,
}

impl Default for RetryPolicy {
    /// 5 attempts, 100 ms doubling up to 30 s, equal jitter.
    fn default() -> Self {
        Self::exponential(5, Duration::from_millis(100))
    }
}

impl RetryPolicy {
    /// Exponential backoff: `max_attempts` attempts in all, the first retry after
    /// `initial_delay`, doubling, capped at 30 s, with equal jitter.
    pub fn exponential(max_attempts: u32, initial_delay: Duration) -> Self {
        Self {
            max_attempts: max_attempts.max(1),
            initial_delay,
            max_delay: Duration::from_secs(30),
            multiplier: 2.0,
            jitter: Jitter::Equal,
        }
    }

    /// One attempt, no retry.
    pub fn never() -> Self {
        Self::exponential(1, Duration::ZERO)
    }

    /// Caps the delay.
    pub fn with_max_delay(mut self, max_delay: Duration) -> Self {
        self.max_delay = max_delay;
        self
    }

    /// Sets the growth factor (values below 1 are taken as 1).
    pub fn with_multiplier(mut self, multiplier: f64) -> Self {
        self.multiplier = if multiplier.is_finite() {
            multiplier.max(1.0)
        } else {
            1.0
        };
        self
    }

    /// Sets the jitter.
    pub fn with_jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }

    /// Sets the number of attempts (at least 1).
    pub fn with_max_attempts(mut self, max_attempts: u32) -> Self {
        self.max_attempts = max_attempts.max(1);
        self
    }

    /// The delay before the next attempt after `attempts_made` attempts have failed, or
    /// `None` when the budget is spent. Jitter draws from the thread's random generator.
    pub fn delay_after(&self, attempts_made: u32) -> Option<Duration> {
        self.delay_after_with(attempts_made, fastrand::f64())
    }

    /// Like [`delay_after`](Self::delay_after) with the random draw given (`0.0..1.0`), so
    /// tests are deterministic.
    pub fn delay_after_with(&self, attempts_made: u32, random: f64) -> Option<Duration> {
        if attempts_made >= self.max_attempts {
            return None;
        }
        Some(self.backoff(attempts_made.max(1), random))
    }

    /// Whether to retry after `attempts_made` attempts, given whether the error is
    /// retryable at all.
    pub fn should_retry(&self, attempts_made: u32, retryable: bool) -> bool {
        retryable && attempts_made < self.max_attempts
    }

    fn backoff(&self, failures: u32, random: f64) -> Duration {
        let base = self.initial_delay.as_secs_f64();
        let exp = i32::try_from(failures - 1).unwrap_or(i32::MAX);
        let raw = base * self.multiplier.max(1.0).powi(exp);
        let capped = raw.min(self.max_delay.as_secs_f64());
        let random = random.clamp(0.0, 1.0);
        let secs = match self.jitter {
            Jitter::None => capped,
            Jitter::Full => capped * random,
            Jitter::Equal => capped / 2.0 + capped / 2.0 * random,
        };
        Duration::try_from_secs_f64(secs).unwrap_or(self.max_delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exponential_growth_is_capped() {
        let p = RetryPolicy::exponential(10, Duration::from_millis(100))
            .with_max_delay(Duration::from_millis(500))
            .with_jitter(Jitter::None);
        let delays: Vec<_> = (1..10)
            .map(|a| p.delay_after(a).unwrap().as_millis())
            .collect();
        assert_eq!(delays, [100, 200, 400, 500, 500, 500, 500, 500, 500]);
        assert_eq!(p.delay_after(10), None);
    }

    #[test]
    fn jitter_stays_in_bounds() {
        let p = RetryPolicy::exponential(3, Duration::from_millis(100)).with_jitter(Jitter::Equal);
        assert_eq!(p.delay_after_with(1, 0.0), Some(Duration::from_millis(50)));
        assert_eq!(p.delay_after_with(1, 1.0), Some(Duration::from_millis(100)));
        let full = p.with_jitter(Jitter::Full);
        assert_eq!(full.delay_after_with(2, 0.0), Some(Duration::ZERO));
        for _ in 0..1000 {
            let d = p.delay_after(2).unwrap();
            assert!(d >= Duration::from_millis(100) && d <= Duration::from_millis(200));
        }
    }

    #[test]
    fn permanent_errors_are_not_retried() {
        let p = RetryPolicy::default();
        assert!(p.should_retry(1, true));
        assert!(!p.should_retry(1, false));
        assert!(!p.should_retry(5, true));
        assert_eq!(RetryPolicy::never().delay_after(1), None);
    }
}
