//! Nexus's decision logic as pure functions over snapshots: which node serves a request, when a
//! node's circuit opens, how reputation moves. Time and randomness are injected by the caller.

mod breaker;
mod prefix;
mod reputation;
mod route;

pub use breaker::{Breaker, BreakerState};
pub use prefix::{PrefixCache, conversation_keys};
pub use reputation::{Ewma, Outcome, Reputation};
pub use route::{
    LiveLoad, MAX_CANDIDATES, NodeView, P2C_THRESHOLD, Preference, RouteRequest, Snapshot, route,
};

/// Nexus-assigned identifier of a connected node (stable for the life of its registration).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub u64);

impl std::fmt::Display for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "n{}", self.0)
    }
}

/// Source of randomness for power-of-two-choices; tests pass a fixed sequence.
pub trait Random {
    /// A uniformly distributed integer in `0..n` (`n > 0`).
    fn below(&mut self, n: usize) -> usize;
}

/// SplitMix64: tiny, fast and good enough for load balancing; seeded by the caller.
#[derive(Debug, Clone)]
pub struct SplitMix(pub u64);

impl Random for SplitMix {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let n64 = u64::try_from(n.max(1)).unwrap_or(u64::MAX);
        usize::try_from(z % n64).unwrap_or(0)
    }
}
