//! Choosing nodes for a request from an immutable snapshot: filter by model and health, score
//! by expected completion time, price and reputation, honour prefix affinity, and fall back to
//! power-of-two-choices when there are many candidates.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::{NodeId, Random};

/// Above this many candidates, sample instead of scoring them all.
pub const P2C_THRESHOLD: usize = 64;
/// Candidates returned for failover.
pub const MAX_CANDIDATES: usize = 3;

/// A node's load, updated in place with atomics (heartbeats, and Nexus's own dispatches) so the
/// next decision sees it without rebuilding the snapshot.
#[derive(Debug, Default)]
pub struct LiveLoad {
    /// Requests Nexus has sent and not yet seen finish.
    pub inflight: AtomicU32,
    /// From the last heartbeat: slots generating and requests waiting.
    pub busy: AtomicU32,
    pub queued: AtomicU32,
}

impl LiveLoad {
    pub fn new(busy: u32, queued: u32) -> Self {
        Self {
            inflight: AtomicU32::new(0),
            busy: AtomicU32::new(busy),
            queued: AtomicU32::new(queued),
        }
    }
}

/// What the router knows about one node.
#[derive(Debug, Clone)]
pub struct NodeView {
    pub id: NodeId,
    /// Models this node is admitted for (passed calibration, circuit not open).
    pub models: Vec<String>,
    pub slots: u32,
    /// EWMA of time to first token, seconds.
    pub ttft_s: f64,
    /// EWMA of decode speed, tokens/s.
    pub decode_tps: f64,
    /// Smallest LAI units per 1M tokens.
    pub price_in: u64,
    pub price_out: u64,
    /// 0 (bad) ..= 1 (good).
    pub reputation: f64,
    /// Reports log probabilities.
    pub logprobs: bool,
    pub live: Arc<LiveLoad>,
}

impl NodeView {
    /// Requests on the node: the larger of its last heartbeat and what Nexus has in flight.
    pub fn in_system(&self) -> u32 {
        let reported = self
            .live
            .busy
            .load(Ordering::Relaxed)
            .saturating_add(self.live.queued.load(Ordering::Relaxed));
        reported.max(self.live.inflight.load(Ordering::Relaxed))
    }

    /// Requests beyond its slots would queue behind others.
    pub fn overloaded(&self) -> bool {
        self.in_system() >= self.slots.max(1)
    }

    fn expected_seconds(&self, req: &RouteRequest<'_>) -> f64 {
        let slots = f64::from(self.slots.max(1));
        let in_system = f64::from(self.in_system());
        let tps = self.decode_tps.max(0.1);
        let service = self.ttft_s.max(0.0) + f64::from(req.max_tokens) / tps;
        // Batched streams share the machine: each gets slower as slots fill; beyond the slots
        // a request waits for a whole service time per full round.
        let sharing = 1.0 + 0.5 * (in_system.min(slots) / slots);
        let waiting = ((in_system + 1.0 - slots).max(0.0) / slots) * service;
        service * sharing + waiting
    }

    fn cost(&self, req: &RouteRequest<'_>) -> f64 {
        let c = u128::from(self.price_in) * u128::from(req.prompt_tokens)
            + u128::from(self.price_out) * u128::from(req.max_tokens);
        c as f64
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preference {
    #[default]
    Latency,
    Cost,
    Quality,
}

impl Preference {
    /// Weights of (time, cost, reputation) in the score.
    fn weights(self) -> (f64, f64, f64) {
        match self {
            Self::Latency => (1.0, 0.1, 0.3),
            Self::Cost => (0.2, 1.0, 0.3),
            Self::Quality => (0.3, 0.1, 2.0),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RouteRequest<'a> {
    pub model: &'a str,
    pub prompt_tokens: u32,
    pub max_tokens: u32,
    pub preference: Preference,
    /// Node that served this conversation's prefix (likely KV-cache hit).
    pub affinity: Option<NodeId>,
    /// Only nodes that report log probabilities will do.
    pub logprobs: bool,
}

/// An immutable view of all routable nodes, indexed by model; rebuilt on change and published
/// behind an atomic pointer so the request path never takes a lock.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    nodes: Vec<NodeView>,
    by_model: HashMap<String, Vec<usize>>,
    by_id: HashMap<NodeId, usize>,
}

impl Snapshot {
    pub fn new(nodes: Vec<NodeView>) -> Self {
        let mut by_model: HashMap<String, Vec<usize>> = HashMap::new();
        let mut by_id = HashMap::with_capacity(nodes.len());
        for (i, n) in nodes.iter().enumerate() {
            for m in &n.models {
                by_model.entry(m.clone()).or_default().push(i);
            }
            by_id.insert(n.id, i);
        }
        Self {
            nodes,
            by_model,
            by_id,
        }
    }

    pub fn nodes(&self) -> &[NodeView] {
        &self.nodes
    }

    /// Models with at least one routable node, and how many nodes serve each.
    pub fn models(&self) -> Vec<(String, usize)> {
        let mut v: Vec<_> = self
            .by_model
            .iter()
            .map(|(m, n)| (m.clone(), n.len()))
            .collect();
        v.sort();
        v
    }

    pub fn serves(&self, model: &str) -> bool {
        self.by_model.get(model).is_some_and(|v| !v.is_empty())
    }

    pub fn get(&self, id: NodeId) -> Option<&NodeView> {
        self.by_id.get(&id).and_then(|&i| self.nodes.get(i))
    }
}

/// Orders up to [`MAX_CANDIDATES`] nodes for `req`, best first (the rest are for failover).
/// Empty when no routable node serves the model.
pub fn route(snap: &Snapshot, req: &RouteRequest<'_>, rng: &mut impl Random) -> Vec<NodeId> {
    let Some(all) = snap.by_model.get(req.model) else {
        return Vec::new();
    };
    let capable: Vec<usize>;
    let idx: &[usize] = if req.logprobs {
        capable = all
            .iter()
            .copied()
            .filter(|&i| snap.nodes.get(i).is_some_and(|n| n.logprobs))
            .collect();
        &capable
    } else {
        all
    };
    let mut picked: Vec<&NodeView> = if idx.len() > P2C_THRESHOLD {
        // The affinity node is always a candidate (when it serves the model): sampling alone
        // would miss it nearly every time among many nodes.
        let affinity = req
            .affinity
            .and_then(|a| snap.by_id.get(&a).copied())
            .filter(|&i| {
                snap.nodes.get(i).is_some_and(|n| {
                    n.models.iter().any(|m| m == req.model) && (n.logprobs || !req.logprobs)
                })
            });
        sample(snap, idx, affinity, rng)
    } else {
        idx.iter().filter_map(|&i| snap.nodes.get(i)).collect()
    };
    let scores = score_all(&picked, req);
    let mut order: Vec<usize> = (0..picked.len()).collect();
    order.sort_by(|&a, &b| {
        scores[a]
            .partial_cmp(&scores[b])
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(picked[a].id.cmp(&picked[b].id))
    });
    let mut out: Vec<NodeId> = order.iter().map(|&i| picked[i].id).collect();
    if let Some(aff) = req.affinity
        && let Some(pos) = out.iter().position(|&id| id == aff)
        && picked.iter().any(|n| n.id == aff && !n.overloaded())
    {
        let id = out.remove(pos);
        out.insert(0, id);
    }
    picked.clear();
    out.truncate(MAX_CANDIDATES);
    out
}

/// Power of two choices plus one extra random pick for failover, and the affinity node.
fn sample<'s>(
    snap: &'s Snapshot,
    idx: &[usize],
    affinity: Option<usize>,
    rng: &mut impl Random,
) -> Vec<&'s NodeView> {
    let mut chosen: Vec<usize> = Vec::with_capacity(MAX_CANDIDATES + 1);
    chosen.extend(affinity);
    let want = MAX_CANDIDATES + chosen.len();
    let mut tries = 0;
    while chosen.len() < want && tries < 4 * MAX_CANDIDATES {
        tries += 1;
        let i = idx.get(rng.below(idx.len())).copied().unwrap_or(0);
        if !chosen.contains(&i) {
            chosen.push(i);
        }
    }
    chosen.iter().filter_map(|&i| snap.nodes.get(i)).collect()
}

fn score_all(nodes: &[&NodeView], req: &RouteRequest<'_>) -> Vec<f64> {
    let times: Vec<f64> = nodes.iter().map(|n| n.expected_seconds(req)).collect();
    let costs: Vec<f64> = nodes.iter().map(|n| n.cost(req)).collect();
    let min_time = times
        .iter()
        .copied()
        .fold(f64::INFINITY, f64::min)
        .max(1e-6);
    let min_cost = costs.iter().copied().fold(f64::INFINITY, f64::min);
    let (wt, wc, wq) = req.preference.weights();
    nodes
        .iter()
        .zip(times.iter().zip(&costs))
        .map(|(n, (t, c))| {
            // Logarithmic: a node 10× pricier is penalised like ~2.3 time units, not 10.
            let rel_cost = if min_cost > 0.0 {
                (c / min_cost).ln()
            } else if *c > 0.0 {
                1.0
            } else {
                0.0
            };
            let distrust = 1.0 - n.reputation.clamp(0.0, 1.0);
            wt * (t / min_time) + wc * rel_cost + wq * 4.0 * distrust
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SplitMix;

    fn node(id: u64, model: &str) -> NodeView {
        NodeView {
            id: NodeId(id),
            models: vec![model.to_owned()],
            slots: 4,
            ttft_s: 0.1,
            decode_tps: 50.0,
            price_in: 100,
            price_out: 200,
            reputation: 0.9,
            logprobs: true,
            live: Arc::default(),
        }
    }

    fn req(model: &str) -> RouteRequest<'_> {
        RouteRequest {
            model,
            prompt_tokens: 100,
            max_tokens: 100,
            preference: Preference::Latency,
            affinity: None,
            logprobs: false,
        }
    }

    #[test]
    fn a_request_for_log_probabilities_goes_only_to_nodes_that_report_them() {
        for n in [3u64, P2C_THRESHOLD as u64 * 4] {
            let nodes: Vec<NodeView> = (0..n)
                .map(|i| NodeView {
                    logprobs: i % 3 == 1,
                    ..node(i, "m")
                })
                .collect();
            let snap = Snapshot::new(nodes);
            let mut rng = SplitMix(9);
            for affinity in [None, Some(NodeId(0)), Some(NodeId(1))] {
                let r = RouteRequest {
                    logprobs: true,
                    affinity,
                    ..req("m")
                };
                let got = route(&snap, &r, &mut rng);
                assert!(!got.is_empty());
                assert!(got.iter().all(|id| id.0 % 3 == 1), "{n} nodes: {got:?}");
                // Without the need, every node may be chosen.
                let r = RouteRequest {
                    logprobs: false,
                    ..r
                };
                assert!(route(&snap, &r, &mut rng).iter().any(|id| id.0 % 3 != 1));
            }
            let none = Snapshot::new(vec![NodeView {
                logprobs: false,
                ..node(1, "m")
            }]);
            let r = RouteRequest {
                logprobs: true,
                ..req("m")
            };
            assert!(route(&none, &r, &mut rng).is_empty());
        }
    }

    #[test]
    fn filters_by_model() {
        let s = Snapshot::new(vec![node(1, "a"), node(2, "b"), node(3, "a")]);
        let got = route(&s, &req("b"), &mut SplitMix(1));
        assert_eq!(got, vec![NodeId(2)]);
        assert!(route(&s, &req("zzz"), &mut SplitMix(1)).is_empty());
        assert_eq!(s.models(), vec![("a".to_owned(), 2), ("b".to_owned(), 1)]);
    }

    #[test]
    fn prefers_faster_and_less_loaded_nodes() {
        let mut slow = node(1, "m");
        slow.decode_tps = 10.0;
        let fast = node(2, "m");
        let s = Snapshot::new(vec![slow, fast.clone()]);
        assert_eq!(route(&s, &req("m"), &mut SplitMix(1))[0], NodeId(2));

        let busy = NodeView {
            live: Arc::new(LiveLoad::new(4, 8)),
            ..fast.clone()
        };
        let idle = NodeView {
            id: NodeId(3),
            ..fast
        };
        let s = Snapshot::new(vec![busy, idle]);
        assert_eq!(
            route(&s, &req("m"), &mut SplitMix(1)),
            vec![NodeId(3), NodeId(2)]
        );
    }

    #[test]
    fn preference_shifts_the_choice() {
        let mut cheap_slow = node(1, "m");
        cheap_slow.price_in = 10;
        cheap_slow.price_out = 10;
        cheap_slow.decode_tps = 30.0;
        let pricey_fast = node(2, "m");
        let mut trusted = node(3, "m");
        trusted.reputation = 1.0;
        trusted.decode_tps = 25.0;
        trusted.price_out = 400;
        let s = Snapshot::new(vec![cheap_slow, pricey_fast, trusted]);
        let pick = |p| {
            route(
                &s,
                &RouteRequest {
                    preference: p,
                    ..req("m")
                },
                &mut SplitMix(1),
            )[0]
        };
        assert_eq!(pick(Preference::Latency), NodeId(2));
        assert_eq!(pick(Preference::Cost), NodeId(1));
        assert_eq!(pick(Preference::Quality), NodeId(3));
    }

    #[test]
    fn affinity_wins_unless_overloaded() {
        let mut a = node(1, "m");
        a.decode_tps = 40.0;
        let b = node(2, "m");
        let s = Snapshot::new(vec![a.clone(), b.clone()]);
        let r = RouteRequest {
            affinity: Some(NodeId(1)),
            ..req("m")
        };
        assert_eq!(route(&s, &r, &mut SplitMix(1)), vec![NodeId(1), NodeId(2)]);
        a.live.busy.store(4, Ordering::Relaxed);
        let s = Snapshot::new(vec![a, b]);
        assert_eq!(route(&s, &r, &mut SplitMix(1))[0], NodeId(2));
    }

    /// Among many nodes (sampled, not all scored) the affinity node is still the first choice
    /// unless it is overloaded; another model's node named as affinity is never picked.
    #[test]
    fn affinity_holds_among_many_nodes_unless_overloaded() {
        let mut nodes: Vec<_> = (0..1000).map(|i| node(i, "m")).collect();
        // Slower than the rest: without affinity it would rarely be first.
        nodes[500].decode_tps = 40.0;
        nodes.push(node(2000, "other"));
        let s = Snapshot::new(nodes);
        let mut rng = SplitMix(3);
        let r = RouteRequest {
            affinity: Some(NodeId(500)),
            ..req("m")
        };
        for _ in 0..200 {
            assert_eq!(route(&s, &r, &mut rng)[0], NodeId(500));
        }
        let elsewhere = RouteRequest {
            affinity: Some(NodeId(2000)),
            ..req("m")
        };
        for _ in 0..200 {
            assert!(!route(&s, &elsewhere, &mut rng).contains(&NodeId(2000)));
        }
        let busy = s.get(NodeId(500)).unwrap_or_else(|| unreachable!());
        busy.live.busy.store(4, Ordering::Relaxed);
        let firsts = (0..200)
            .filter(|_| route(&s, &r, &mut rng)[0] == NodeId(500))
            .count();
        assert_eq!(firsts, 0, "an overloaded affinity node is not preferred");
    }

    #[test]
    fn in_flight_requests_steer_the_next_decision_without_a_new_snapshot() {
        let s = Snapshot::new(vec![node(1, "m"), node(2, "m")]);
        let mut rng = SplitMix(1);
        let mut counts = [0u32; 2];
        for _ in 0..8 {
            let first = route(&s, &req("m"), &mut rng)[0];
            let view = s.get(first).unwrap_or_else(|| unreachable!());
            view.live.inflight.fetch_add(1, Ordering::Relaxed);
            counts[usize::try_from(first.0 - 1).unwrap_or(0)] += 1;
        }
        assert_eq!(counts, [4, 4], "a burst spreads evenly across equal nodes");
    }

    #[test]
    fn ties_break_by_id_deterministically() {
        let s = Snapshot::new(vec![node(7, "m"), node(3, "m"), node(5, "m")]);
        assert_eq!(
            route(&s, &req("m"), &mut SplitMix(9)),
            vec![NodeId(3), NodeId(5), NodeId(7)]
        );
    }

    #[test]
    fn many_nodes_use_power_of_two_choices_and_spread_load() {
        let nodes: Vec<_> = (0..1000).map(|i| node(i, "m")).collect();
        let s = Snapshot::new(nodes);
        let mut rng = SplitMix(42);
        let mut firsts = std::collections::HashSet::new();
        for _ in 0..200 {
            let got = route(&s, &req("m"), &mut rng);
            assert_eq!(got.len(), MAX_CANDIDATES);
            firsts.insert(got[0]);
        }
        assert!(
            firsts.len() > 100,
            "identical nodes must not all get the same pick: {}",
            firsts.len()
        );
    }

    #[test]
    fn p2c_picks_the_better_of_the_sample() {
        // Half the nodes are saturated; P2C must essentially never pick one when it sampled a free one.
        let nodes: Vec<_> = (0..200)
            .map(|i| {
                let n = node(i, "m");
                if i % 2 == 0 {
                    n.live.busy.store(4, Ordering::Relaxed);
                    n.live.queued.store(20, Ordering::Relaxed);
                }
                n
            })
            .collect();
        let s = Snapshot::new(nodes);
        let mut rng = SplitMix(7);
        let saturated = (0..1000)
            .filter(|_| route(&s, &req("m"), &mut rng)[0].0.is_multiple_of(2))
            .count();
        // All three samples saturated happens with probability 1/8.
        assert!(saturated < 200, "{saturated}");
    }
}
