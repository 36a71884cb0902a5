//! Retry policy: exponential backoff with jitter, the one place that knows the `backoff` crate.

use std::time::Duration;

use backoff::backoff::Backoff as _;
use backoff::ExponentialBackoff;

/// Delays between attempts: doubling from `initial` up to `max`, each randomised by ±50 %, forever.
#[derive(Debug)]
pub struct Backoff(ExponentialBackoff);

impl Backoff {
    /// A backoff starting at `initial` and capped at `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff(ExponentialBackoff {
            initial_interval: initial,
            current_interval: initial,
            max_interval: max,
            multiplier: 2.0,
            randomization_factor: 0.5,
            max_elapsed_time: None,
            ..ExponentialBackoff::default()
        })
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        self.0.next_backoff().unwrap_or(self.0.max_interval)
    }

    /// Starts over after a success.
    pub fn reset(&mut self) {
        self.0.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_stays_capped() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let first = b.next_delay();
        assert!(
            first >= Duration::from_millis(50) && first <= Duration::from_millis(150),
            "{first:?}"
        );
        for _ in 0..20 {
            assert!(b.next_delay() <= Duration::from_millis(1500));
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(150));
    }
}
