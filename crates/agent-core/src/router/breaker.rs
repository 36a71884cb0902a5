//! The circuit breaker that keeps a hybrid session on git while the coordinator is down: opens
//! after `threshold` consecutive infrastructure failures (at once on a silence: `trip`), then allows one probe at a time after
//! an exponentially growing, jittered delay, and closes on the first probe that succeeds. Pure:
//! time is an argument.

use std::time::Duration;

use tokio::time::Instant;

use crate::retry::Backoff;

/// The breaker's state.
#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    failures: u32,
    /// While open: when the next probe may go.
    next_probe: Option<Instant>,
    backoff: Backoff,
}

/// What a reported result did to the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Nothing changed state.
    None,
    /// It just opened: the coordinator is to be left.
    Opened,
    /// It just closed: the coordinator is back.
    Closed,
}

impl Breaker {
    /// A closed breaker that opens after `threshold` consecutive failures and probes after
    /// `probe_initial`, doubling (±50 % jitter) up to `probe_max`.
    pub fn new(threshold: u32, probe_initial: Duration, probe_max: Duration) -> Breaker {
        Breaker {
            threshold: threshold.max(1),
            failures: 0,
            next_probe: None,
            backoff: Backoff::new(probe_initial, probe_max),
        }
    }

    /// Whether operations stay off the coordinator.
    pub fn is_open(&self) -> bool {
        self.next_probe.is_some()
    }

    /// While open: whether a probe may go now.
    pub fn probe_due(&self, now: Instant) -> bool {
        self.next_probe.is_some_and(|at| now >= at)
    }

    /// While open: when the next probe may go.
    pub fn next_probe(&self) -> Option<Instant> {
        self.next_probe
    }

    /// An operation or probe on the coordinator succeeded.
    pub fn success(&mut self) -> Transition {
        self.failures = 0;
        self.backoff.reset();
        match self.next_probe.take() {
            Some(_) => Transition::Closed,
            None => Transition::None,
        }
    }

    /// The coordinator did not answer within the deadline: a silent store (paused, hung,
    /// black-holed) answers no sooner for being asked again, and each retry would cost another
    /// deadline, so this opens the breaker at once (or pushes the next probe out, if open).
    pub fn trip(&mut self, now: Instant) -> Transition {
        self.failures = self.failures.max(self.threshold - 1);
        self.failure(now)
    }

    /// An operation or probe on the coordinator failed for an infrastructure reason (refused,
    /// unavailable). Normal outcomes (a lost race, not claimable) are not failures.
    pub fn failure(&mut self, now: Instant) -> Transition {
        self.failures = self.failures.saturating_add(1);
        let was_open = self.is_open();
        if was_open || self.failures >= self.threshold {
            self.next_probe = Some(now + self.backoff.next_delay());
        }
        if !was_open && self.is_open() {
            Transition::Opened
        } else {
            Transition::None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_consecutive_failures_only() {
        let now = Instant::now();
        let mut b = Breaker::new(3, Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(b.failure(now), Transition::None);
        assert_eq!(b.failure(now), Transition::None);
        assert_eq!(b.success(), Transition::None, "a success resets the count");
        assert_eq!(b.failure(now), Transition::None);
        assert_eq!(b.failure(now), Transition::None);
        assert!(!b.is_open());
        assert_eq!(b.failure(now), Transition::Opened);
        assert!(b.is_open());
    }

    #[test]
    fn a_silence_opens_at_once() {
        let now = Instant::now();
        let mut b = Breaker::new(3, Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(b.trip(now), Transition::Opened);
        assert!(b.is_open());
        let first = b.next_probe().expect("open");
        assert_eq!(b.trip(now), Transition::None, "already open");
        assert!(b.next_probe().expect("open") >= first - Duration::from_millis(50));
        assert_eq!(b.success(), Transition::Closed);
        assert_eq!(b.failure(now), Transition::None, "the count starts again");
    }

    #[test]
    fn probes_back_off_with_jitter_and_close_on_success() {
        let now = Instant::now();
        let mut b = Breaker::new(1, Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(b.failure(now), Transition::Opened);
        let first = b.next_probe().expect("open") - now;
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(150));
        assert!(!b.probe_due(now));
        assert!(b.probe_due(now + Duration::from_millis(150)));
        // Failed probes push the next one further out, never past the cap (+50 % jitter).
        let mut last = first;
        for _ in 0..10 {
            assert_eq!(b.failure(now), Transition::None, "already open");
            last = b.next_probe().expect("open") - now;
            assert!(last <= Duration::from_millis(1500), "{last:?}");
        }
        assert!(last >= Duration::from_millis(500), "it grew: {last:?}");
        assert_eq!(b.success(), Transition::Closed);
        assert!(!b.is_open());
    }
}
