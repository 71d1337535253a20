//! Per-(node, model) circuit breaker: consecutive failures open it, a cooldown later one probe
//! is let through (half-open), and its outcome closes or re-opens it.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen,
}

#[derive(Debug, Clone)]
pub struct Breaker {
    state: BreakerState,
    threshold: u32,
    cooldown: Duration,
}

impl Breaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            state: BreakerState::Closed { failures: 0 },
            threshold: threshold.max(1),
            cooldown,
        }
    }

    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// Whether user traffic may go to this node now.
    pub fn admits_traffic(&self) -> bool {
        matches!(self.state, BreakerState::Closed { .. })
    }

    /// Whether a health probe should be sent now; moves Open → HalfOpen once the cooldown ends.
    pub fn probe_due(&mut self, now: Instant) -> bool {
        match self.state {
            BreakerState::Open { until } if now >= until => {
                self.state = BreakerState::HalfOpen;
                true
            }
            BreakerState::Open { .. } => false,
            BreakerState::HalfOpen | BreakerState::Closed { .. } => true,
        }
    }

    pub fn on_success(&mut self) {
        self.state = BreakerState::Closed { failures: 0 };
    }

    pub fn on_failure(&mut self, now: Instant) {
        self.state = match self.state {
            BreakerState::Closed { failures } if failures + 1 < self.threshold => {
                BreakerState::Closed {
                    failures: failures + 1,
                }
            }
            _ => BreakerState::Open {
                until: now + self.cooldown,
            },
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_then_half_opens_after_cooldown() {
        let t0 = Instant::now();
        let mut b = Breaker::new(2, Duration::from_secs(10));
        b.on_failure(t0);
        assert!(b.admits_traffic());
        b.on_failure(t0);
        assert_eq!(
            b.state(),
            BreakerState::Open {
                until: t0 + Duration::from_secs(10)
            }
        );
        assert!(!b.admits_traffic());
        assert!(!b.probe_due(t0 + Duration::from_secs(9)));
        assert!(b.probe_due(t0 + Duration::from_secs(10)));
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(!b.admits_traffic(), "half-open admits only the probe");
        b.on_failure(t0 + Duration::from_secs(10));
        assert_eq!(
            b.state(),
            BreakerState::Open {
                until: t0 + Duration::from_secs(20)
            }
        );
        assert!(b.probe_due(t0 + Duration::from_secs(21)));
        b.on_success();
        assert!(b.admits_traffic());
    }

    #[test]
    fn success_resets_the_failure_count() {
        let t0 = Instant::now();
        let mut b = Breaker::new(3, Duration::from_secs(1));
        b.on_failure(t0);
        b.on_failure(t0);
        b.on_success();
        b.on_failure(t0);
        b.on_failure(t0);
        assert!(b.admits_traffic());
    }
}
