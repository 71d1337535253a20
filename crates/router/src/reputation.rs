//! Reputation: a bounded score from request outcomes, latency against peers and probe results,
//! decaying toward neutral so old behaviour is forgiven and new nodes start in the middle.

use std::time::Duration;

/// Exponentially weighted moving average.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ewma {
    value: Option<f64>,
    alpha: f64,
}

impl Ewma {
    pub fn new(alpha: f64) -> Self {
        Self {
            value: None,
            alpha: alpha.clamp(0.0, 1.0),
        }
    }

    pub fn observe(&mut self, x: f64) {
        if !x.is_finite() {
            return;
        }
        self.value = Some(match self.value {
            None => x,
            Some(v) => v + self.alpha * (x - v),
        });
    }

    pub fn get(&self) -> Option<f64> {
        self.value
    }

    pub fn get_or(&self, default: f64) -> f64 {
        self.value.unwrap_or(default)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    /// A user request completed; `latency_ratio` is this node's time over the peers' median.
    Success {
        latency_ratio: f64,
    },
    /// A user request failed on this node (error, broken link, timeout).
    Failure,
    ProbePassed,
    /// Wrong canary answer: worse than an error, it suggests a wrong or tampered model.
    ProbeWrong,
    /// Usage receipt or other claim that did not verify.
    Misbehaved,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reputation {
    score: f64,
}

const NEUTRAL: f64 = 0.5;
/// Half-life of the pull toward neutral.
const HALF_LIFE: Duration = Duration::from_secs(3600);

impl Default for Reputation {
    fn default() -> Self {
        Self { score: NEUTRAL }
    }
}

impl Reputation {
    pub fn from_score(score: f64) -> Self {
        Self {
            score: if score.is_finite() {
                score.clamp(0.0, 1.0)
            } else {
                NEUTRAL
            },
        }
    }

    pub fn score(&self) -> f64 {
        self.score
    }

    pub fn record(&mut self, outcome: Outcome) {
        let (target, weight) = match outcome {
            Outcome::Success { latency_ratio } => {
                // 1.0 at or below the peers' median, falling to 0.6 at 3× slower.
                let r = if latency_ratio.is_finite() {
                    latency_ratio
                } else {
                    1.0
                };
                (1.0 - 0.2 * (r - 1.0).clamp(0.0, 2.0), 0.02)
            }
            Outcome::Failure => (0.0, 0.05),
            Outcome::ProbePassed => (1.0, 0.05),
            Outcome::ProbeWrong => (0.0, 0.3),
            Outcome::Misbehaved => (0.0, 0.5),
        };
        self.score = (self.score + weight * (target - self.score)).clamp(0.0, 1.0);
    }

    /// Moves the score toward neutral by the time elapsed since the last decay.
    pub fn decay(&mut self, elapsed: Duration) {
        let halves = elapsed.as_secs_f64() / HALF_LIFE.as_secs_f64();
        let keep = 0.5_f64.powf(halves);
        self.score = NEUTRAL + (self.score - NEUTRAL) * keep;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ewma_starts_at_first_value_and_ignores_nan() {
        let mut e = Ewma::new(0.5);
        assert_eq!(e.get(), None);
        e.observe(10.0);
        e.observe(f64::NAN);
        e.observe(20.0);
        assert_eq!(e.get(), Some(15.0));
    }

    #[test]
    fn good_nodes_rise_bad_nodes_fall_and_stay_bounded() {
        let mut good = Reputation::default();
        let mut bad = Reputation::default();
        for _ in 0..500 {
            good.record(Outcome::Success { latency_ratio: 1.0 });
            bad.record(Outcome::Failure);
        }
        assert!(good.score() > 0.95 && good.score() <= 1.0);
        assert!(bad.score() < 0.05 && bad.score() >= 0.0);
    }

    #[test]
    fn a_wrong_canary_costs_more_than_an_error() {
        let mut a = Reputation::from_score(0.9);
        let mut b = Reputation::from_score(0.9);
        a.record(Outcome::ProbeWrong);
        b.record(Outcome::Failure);
        assert!(a.score() < b.score());
    }

    #[test]
    fn slow_successes_count_less() {
        let mut fast = Reputation::default();
        let mut slow = Reputation::default();
        for _ in 0..200 {
            fast.record(Outcome::Success { latency_ratio: 0.8 });
            slow.record(Outcome::Success { latency_ratio: 3.0 });
        }
        assert!(fast.score() > slow.score() + 0.2);
    }

    #[test]
    fn decay_halves_the_distance_to_neutral_per_half_life() {
        let mut r = Reputation::from_score(0.9);
        r.decay(HALF_LIFE);
        assert!((r.score() - 0.7).abs() < 1e-9);
        let mut r = Reputation::from_score(0.1);
        r.decay(HALF_LIFE * 2);
        assert!((r.score() - 0.4).abs() < 1e-9);
    }
}
