//! The one retry rule: every "try again later" (phase 2's COMMIT PREPARED, an abort not
//! acknowledged, a fence that could not reach the last agent) waits by it.

/// Doubling waits between `min_ms` and `max_ms`, each drawn in its upper half by a jitter
/// value the caller supplies (the core draws no random numbers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    next_ms: u64,
    max_ms: u64,
    attempts: u32,
}

impl Backoff {
    /// A rule whose first wait is about `min_ms` (at least 1 ms) and that never waits
    /// more than `max_ms`.
    pub fn new(min_ms: u64, max_ms: u64) -> Backoff {
        let min_ms = min_ms.max(1);
        Backoff {
            next_ms: min_ms,
            max_ms: max_ms.max(min_ms),
            attempts: 0,
        }
    }

    /// The wait before the next attempt: half the current step plus `jitter` (any u64,
    /// reduced into the other half), and the step doubles up to the bound.
    pub fn next_delay_ms(&mut self, jitter: u64) -> u64 {
        let step = self.next_ms;
        self.next_ms = step.saturating_mul(2).min(self.max_ms);
        self.attempts = self.attempts.saturating_add(1);
        let delay = step / 2 + jitter % (step / 2 + 1);
        debug_assert!(delay <= step && delay >= step / 2);
        delay
    }

    /// How many waits were handed out (the attempts that failed).
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Whether a failed attempt is worth a log line: the first and every power of two,
    /// so an outage is reported without flooding the log.
    pub fn worth_reporting(&self) -> bool {
        self.attempts <= 1 || self.attempts.is_power_of_two()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_within_bounds_and_jitters_in_the_upper_half() {
        let mut b = Backoff::new(10, 80);
        for step in [10u64, 20, 40, 80, 80, 80] {
            let d = b.next_delay_ms(u64::MAX);
            assert!(d >= step / 2 && d <= step, "{d} for step {step}");
        }
        let mut b = Backoff::new(10, 80);
        assert_eq!(b.next_delay_ms(0), 5);
        assert_eq!(b.next_delay_ms(0), 10);
        assert_eq!(b.attempts(), 2);
    }

    #[test]
    fn zero_bounds_still_wait() {
        let mut b = Backoff::new(0, 0);
        assert!(b.next_delay_ms(7) <= 1);
        assert!(b.next_delay_ms(7) <= 1);
    }

    #[test]
    fn reports_the_first_and_powers_of_two() {
        let mut b = Backoff::new(1, 1);
        let mut reported = vec![];
        for _ in 1..=9 {
            b.next_delay_ms(0);
            if b.worth_reporting() {
                reported.push(b.attempts());
            }
        }
        assert_eq!(reported, vec![1, 2, 4, 8]);
    }
}
