//! The fleet's service-level objective for the coordinator (`slo:` in the fleet file): a hybrid
//! session whose claims on the coordinator breach it (claim p95 above the objective, or too few
//! answered, over a window) moves itself to git, and returns once every health check has
//! answered within the objective for `recover_after`. A session that breaches it again soon
//! after returning (health checks are quicker than claims, so the two can disagree) waits twice
//! as long before the next return, up to 16 times `recover_after`: it does not flap between the
//! stores. Pure: time is an argument.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// What the coordinator is held to.
#[derive(Debug, Clone, PartialEq)]
pub struct Objective {
    /// The claims' 95th percentile latency must stay at or under this.
    pub claim_p95: Option<Duration>,
    /// The share of claims that get an answer (not an error or silence) must stay at or above
    /// this (0–1).
    pub success_rate: Option<f64>,
    /// Over this much recent time.
    pub window: Duration,
    /// Judged only once the window holds this many claims (a few slow claims of an idle session
    /// are not a breach).
    pub min_claims: usize,
    /// Back to the coordinator once its health checks have answered within `claim_p95` (or at
    /// all, without one) for this long.
    pub recover_after: Duration,
}

/// The objective, the claims of its window and whether it is breached.
#[derive(Debug)]
pub struct ObjectiveWatch {
    objective: Objective,
    /// (when, how long, answered) of each claim on the coordinator in the window.
    claims: VecDeque<(Instant, Duration, bool)>,
    /// Since when the objective has been breached (the session is kept on git).
    breached: Option<Instant>,
    /// While breached: since when every health check has been within the objective.
    healthy_since: Option<Instant>,
    /// While breached: the claims' p95 that breached it.
    breached_at_p95: Option<Duration>,
    /// When the session last returned to the coordinator.
    returned_at: Option<Instant>,
    /// How long the health checks must be within the objective for this return.
    hold: Duration,
}

/// The q quantile of `values` (nearest rank).
fn quantile(mut values: Vec<Duration>, q: f64) -> Duration {
    values.sort();
    let rank = ((values.len() as f64) * q).ceil() as usize;
    values
        .get(rank.clamp(1, values.len().max(1)) - 1)
        .copied()
        .unwrap_or_default()
}

fn ms(d: Duration) -> String {
    format!("{:.1}ms", d.as_secs_f64() * 1e3)
}

impl ObjectiveWatch {
    pub fn new(objective: Objective) -> ObjectiveWatch {
        ObjectiveWatch {
            claims: VecDeque::new(),
            breached: None,
            healthy_since: None,
            breached_at_p95: None,
            returned_at: None,
            hold: objective.recover_after,
            objective,
        }
    }

    /// The p95 of the claims in the window as of `now` (`None` without any); while breached, the
    /// p95 that breached it (the window is empty then: no claim goes to the coordinator).
    pub fn claim_p95(&self, now: Instant) -> Option<Duration> {
        if self.breached.is_some() {
            return self.breached_at_p95;
        }
        let recent: Vec<Duration> = self
            .claims
            .iter()
            .filter(|(at, ..)| now.saturating_duration_since(*at) <= self.objective.window)
            .map(|(_, d, _)| *d)
            .collect();
        (!recent.is_empty()).then(|| quantile(recent, 0.95))
    }

    /// What the coordinator is held to.
    pub fn objective(&self) -> &Objective {
        &self.objective
    }

    /// Whether the session is to stay off the coordinator.
    pub fn breached(&self) -> bool {
        self.breached.is_some()
    }

    /// A claim on the coordinator took `took` (`answered`: it got an answer, whatever it was).
    /// Returns why the objective is breached when this claim breaches it.
    pub fn claim(&mut self, now: Instant, took: Duration, answered: bool) -> Option<String> {
        if self.breached.is_some() {
            return None;
        }
        self.claims.push_back((now, took, answered));
        while self
            .claims
            .front()
            .is_some_and(|(at, ..)| now.saturating_duration_since(*at) > self.objective.window)
        {
            self.claims.pop_front();
        }
        if self.claims.len() < self.objective.min_claims.max(1) {
            return None;
        }
        let o = &self.objective;
        let n = self.claims.len();
        let window = format!("{} claims of the last {:?}", n, o.window);
        let p95 = quantile(self.claims.iter().map(|(_, d, _)| *d).collect(), 0.95);
        let answered = self.claims.iter().filter(|(.., ok)| *ok).count() as f64 / n as f64;
        let why = match (o.claim_p95, o.success_rate) {
            (Some(limit), _) if p95 > limit => Some(format!(
                "claim p95 {} over {window} (objective {})",
                ms(p95),
                ms(limit)
            )),
            (_, Some(rate)) if answered < rate => Some(format!(
                "claim success rate {answered:.3} over {window} (objective {rate})"
            )),
            _ => None,
        }?;
        self.breached = Some(now);
        self.healthy_since = None;
        self.breached_at_p95 = Some(p95);
        self.claims.clear();
        let again = self
            .returned_at
            .is_some_and(|at| now.saturating_duration_since(at) < self.objective.window * 2);
        self.hold = match again {
            true => (self.hold * 2).min(self.objective.recover_after * 16),
            false => self.objective.recover_after,
        };
        Some(match again {
            true => format!(
                "{why}; again soon after returning: back after {:?} within it",
                self.hold
            ),
            false => why,
        })
    }

    /// While breached: a health check of the coordinator took `took` (`None`: it did not
    /// answer). Returns true when the coordinator has now been within the objective for
    /// `recover_after`: the breach is over and the session may return.
    pub fn probe(&mut self, now: Instant, took: Option<Duration>) -> bool {
        if self.breached.is_none() {
            return false;
        }
        let within = took.is_some_and(|t| self.objective.claim_p95.is_none_or(|limit| t <= limit));
        if !within {
            self.healthy_since = None;
            return false;
        }
        let since = *self.healthy_since.get_or_insert(now);
        if now.saturating_duration_since(since) < self.hold {
            return false;
        }
        self.breached = None;
        self.healthy_since = None;
        self.returned_at = Some(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn objective() -> Objective {
        Objective {
            claim_p95: Some(Duration::from_millis(10)),
            success_rate: Some(0.9),
            window: Duration::from_secs(10),
            min_claims: 5,
            recover_after: Duration::from_secs(3),
        }
    }

    const FAST: Duration = Duration::from_millis(2);
    const SLOW: Duration = Duration::from_millis(300);

    #[test]
    fn slow_claims_breach_only_once_the_window_holds_enough_of_them() {
        let (mut w, t0) = (ObjectiveWatch::new(objective()), Instant::now());
        for i in 0..4 {
            assert_eq!(w.claim(t0 + Duration::from_millis(i), SLOW, true), None);
        }
        assert_eq!(w.claim_p95(t0), Some(SLOW));
        let why = w.claim(t0 + Duration::from_millis(5), SLOW, true);
        assert!(
            why.as_deref()
                .is_some_and(|w| w.contains("claim p95 300.0ms")),
            "{why:?}"
        );
        assert!(w.breached());
    }

    #[test]
    fn one_slow_claim_among_many_fast_ones_and_old_slow_ones_are_not_a_breach() {
        let (mut w, t0) = (ObjectiveWatch::new(objective()), Instant::now());
        for i in 0..40 {
            assert_eq!(w.claim(t0 + Duration::from_millis(i), FAST, true), None);
        }
        assert_eq!(w.claim(t0 + Duration::from_millis(41), SLOW, true), None);
        // Slow claims older than the window are forgotten.
        let (mut w, t0) = (ObjectiveWatch::new(objective()), Instant::now());
        for _ in 0..4 {
            w.claim(t0, SLOW, true);
        }
        let later = t0 + Duration::from_secs(11);
        for i in 0..5 {
            assert_eq!(w.claim(later + Duration::from_millis(i), FAST, true), None);
        }
        assert!(!w.breached());
    }

    #[test]
    fn errors_breach_the_success_rate() {
        let (mut w, t0) = (ObjectiveWatch::new(objective()), Instant::now());
        for _ in 0..4 {
            assert_eq!(w.claim(t0, FAST, true), None);
        }
        let why = w.claim(t0, FAST, false);
        assert!(
            why.as_deref()
                .is_some_and(|w| w.contains("success rate 0.800")),
            "{why:?}"
        );
    }

    #[test]
    fn the_breach_ends_after_health_checks_within_the_objective_for_recover_after() {
        let (mut w, t0) = (ObjectiveWatch::new(objective()), Instant::now());
        for _ in 0..5 {
            w.claim(t0, SLOW, true);
        }
        assert!(w.breached());
        assert_eq!(w.claim_p95(t0), Some(SLOW), "the figure that breached it");
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert!(!w.probe(at(1), Some(FAST)));
        assert!(
            !w.probe(at(2), Some(SLOW)),
            "a slow check starts the wait again"
        );
        assert!(!w.probe(at(3), Some(FAST)));
        assert!(!w.probe(at(4), None), "so does a silence");
        assert!(!w.probe(at(5), Some(FAST)));
        assert!(!w.probe(at(7), Some(FAST)));
        assert!(w.probe(at(8), Some(FAST)));
        assert!(!w.breached());
        assert_eq!(w.claim_p95(at(8)), None, "a fresh window");
        // The window starts empty: the slow claims before the breach do not count again.
        assert_eq!(w.claim(at(8), FAST, true), None);
    }

    #[test]
    fn a_session_that_breaches_again_soon_after_returning_waits_twice_as_long_each_time() {
        let (mut w, t0) = (ObjectiveWatch::new(objective()), Instant::now());
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let breach = |w: &mut ObjectiveWatch, from: u64| {
            let mut why = None;
            for i in 0..5 {
                why = why.or(w.claim(at(from + i), SLOW, true));
            }
            why.expect("a breach")
        };
        // Back after health checks within it for how long, from `from` on.
        let back_after = |w: &mut ObjectiveWatch, from: u64| {
            let mut t = from;
            while !w.probe(at(t), Some(FAST)) {
                t += 500;
                assert!(t < from + 200_000, "never back");
            }
            t - from
        };
        breach(&mut w, 0);
        assert_eq!(back_after(&mut w, 1_000), 3_000, "recover_after");
        let why = breach(&mut w, 6_000);
        assert!(
            why.contains("again soon after returning: back after 6s"),
            "{why}"
        );
        assert_eq!(back_after(&mut w, 7_000), 6_000, "twice as long");
        breach(&mut w, 15_000);
        assert_eq!(back_after(&mut w, 16_000), 12_000);
        // A breach long after the last return starts from recover_after again.
        let why = breach(&mut w, 100_000);
        assert!(!why.contains("again"), "{why}");
        assert_eq!(back_after(&mut w, 101_000), 3_000);
    }
}
