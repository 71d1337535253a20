//! Every connected node with its link, load, speed, health and reputation. Mutations take a
//! short lock and republish an immutable routing snapshot; the request path only reads it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use lattice_engine::ModelCard;
use lattice_link::{LinkEvent, ModelAd, NexusFrame, NodeKind, Price};
use lattice_router::{
    Breaker, Ewma, LiveLoad, NodeId, NodeView, Outcome, PrefixCache, Reputation, Snapshot,
};
use serde::Serialize;
use tokio::sync::mpsc;

/// Why `models` cannot join: one of them is served, admitted, by a linked node other than
/// `address` as another kind (text or embedding, or embeddings of another length). Requests are
/// routed by model id alone, so one id is one kind. Only admitted models count, so a node that
/// never passes calibration cannot block an id.
fn kind_conflict(
    nodes: &HashMap<NodeId, NodeEntry>,
    address: &str,
    models: &[ModelAd],
) -> Option<String> {
    let kind = |d: Option<u32>| {
        d.map_or_else(
            || "a text model".to_owned(),
            |n| format!("an embedding model of {n} dimensions"),
        )
    };
    nodes
        .values()
        .filter(|n| !n.address.eq_ignore_ascii_case(address) && !n.link.is_closed())
        .flat_map(|n| {
            n.models
                .iter()
                .filter(|m| n.health.get(&m.id).is_some_and(|h| h.admitted))
        })
        .find_map(|theirs| {
            let ours = models.iter().find(|m| m.id == theirs.id)?;
            (ours.dimensions != theirs.dimensions).then(|| {
                format!(
                    "model `{}` is served by other nodes as {}; it cannot also be {}",
                    ours.id,
                    kind(theirs.dimensions),
                    kind(ours.dimensions)
                )
            })
        })
}

/// How often the speeds requests record (EWMAs) are published to the routing snapshot.
pub(crate) const REPUBLISH_EVERY: Duration = Duration::from_millis(250);

/// Events buffered per request between the link and its HTTP response.
pub(crate) const STREAM_BUFFER: usize = 1024;

/// Frames waiting to be written to one node; a full queue means the link is congested.
pub(crate) const LINK_QUEUE: usize = 1024;

/// One node's link: outgoing frames plus the open request streams it multiplexes.
pub(crate) struct LinkHandle {
    pub(crate) tx: mpsc::Sender<NexusFrame>,
    /// Unsigned receipts and parked charges waiting for the node's batch signatures.
    pub(crate) book: Arc<crate::receipts::ReceiptBook>,
    streams: Mutex<HashMap<u64, mpsc::Sender<LinkEvent>>>,
    next_stream: AtomicU64,
    closed: AtomicBool,
    /// Set when Nexus ends the link itself (e.g. its node token was revoked).
    kicked: Mutex<Option<String>>,
    kick: tokio::sync::Notify,
}

impl LinkHandle {
    pub(crate) fn new(tx: mpsc::Sender<NexusFrame>) -> Self {
        Self {
            tx,
            book: Arc::default(),
            streams: Mutex::new(HashMap::new()),
            next_stream: AtomicU64::new(1),
            closed: AtomicBool::new(false),
            kicked: Mutex::new(None),
            kick: tokio::sync::Notify::new(),
        }
    }

    /// Asks the link's reader to close it, with `reason` logged.
    pub(crate) fn kick(&self, reason: &str) {
        if let Ok(mut k) = self.kicked.lock() {
            *k = Some(reason.to_owned());
        }
        self.kick.notify_one();
    }

    /// Resolves once [`Self::kick`] was called; the reason it was given.
    pub(crate) async fn kicked(&self) -> String {
        self.kick.notified().await;
        self.kicked
            .lock()
            .ok()
            .and_then(|k| k.clone())
            .unwrap_or_else(|| "closed by Nexus".into())
    }

    /// Opens a stream; its receiver sees the node's events and ends when the link closes.
    pub(crate) fn open_stream(&self) -> Option<(u64, mpsc::Receiver<LinkEvent>)> {
        let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let mut streams = self.streams.lock().ok()?;
        if self.closed.load(Ordering::Acquire) {
            return None;
        }
        streams.insert(id, tx);
        Some((id, rx))
    }

    pub(crate) fn close_stream(&self, id: u64) {
        if let Ok(mut s) = self.streams.lock() {
            s.remove(&id);
        }
    }

    /// Routes a frame's events from the node to their stream, in order; unknown ids (already
    /// cancelled) are dropped.
    pub(crate) fn deliver(&self, id: u64, events: Vec<LinkEvent>) {
        let Ok(mut s) = self.streams.lock() else {
            return;
        };
        let Some(tx) = s.get(&id) else { return };
        let (mut finished, mut overflow) = (false, false);
        for event in events {
            finished = matches!(
                event,
                LinkEvent::Error(_) | LinkEvent::Engine(lattice_engine::Event::Done { .. })
            );
            // Never block the link: a stream whose reader fell STREAM_BUFFER events behind (a
            // stalled client, or a node flooding it) is ended; its reader sees the stream break.
            overflow = tx.try_send(event).is_err();
            if finished || overflow {
                break;
            }
        }
        if finished || overflow {
            s.remove(&id);
        }
        if overflow {
            tracing::warn!(stream = id, "stream buffer full; ending the stream");
            let _ = self.tx.try_send(NexusFrame::Cancel { stream: id });
        }
    }

    /// Ends every open stream: their receivers see the channel close (node lost).
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        if let Ok(mut s) = self.streams.lock() {
            s.clear();
        }
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

/// Health of one model on one node.
pub(crate) struct ModelHealth {
    /// Passed calibration: may receive user traffic (when the breaker is closed too).
    pub(crate) admitted: bool,
    pub(crate) breaker: Breaker,
    pub(crate) last_probe: Option<Instant>,
    pub(crate) probing: bool,
    /// Passed calibration but not admitted: the id is served as another kind by an admitted
    /// node. Probed every probe interval (not every tick) until the id is free.
    pub(crate) held: bool,
}

pub(crate) struct NodeEntry {
    pub(crate) id: NodeId,
    pub(crate) address: String,
    pub(crate) label: Option<String>,
    /// On-chain address of the account the node is bound to by its node token.
    pub(crate) owner: Option<String>,
    pub(crate) kind: NodeKind,
    pub(crate) models: Vec<ModelAd>,
    pub(crate) price: Price,
    pub(crate) slots: u32,
    pub(crate) ttft: Ewma,
    pub(crate) tps: Ewma,
    pub(crate) reputation: Reputation,
    pub(crate) health: HashMap<String, ModelHealth>,
    pub(crate) live: Arc<LiveLoad>,
    pub(crate) link: Arc<LinkHandle>,
    pub(crate) connected_at: Instant,
    pub(crate) served: u64,
    pub(crate) failed: u64,
    /// Tokens per second the node finished in its last heartbeat's interval.
    pub(crate) recent_tps: f64,
}

/// What `lattice status` and `/lattice/v1/nodes` show.
#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    pub id: u64,
    pub address: String,
    pub label: Option<String>,
    /// On-chain address of the account the node is bound to by a node token, if any.
    pub owner: Option<String>,
    pub kind: NodeKind,
    pub online: bool,
    pub models: Vec<ModelStatus>,
    pub slots: u32,
    pub busy: u32,
    pub queued: u32,
    pub inflight: u32,
    pub ttft_ms: Option<f64>,
    pub decode_tps: Option<f64>,
    /// Tokens per second of answers the node finished recently (its last heartbeat).
    pub recent_tps: f64,
    pub reputation: f64,
    pub price: Price,
    pub served: u64,
    pub failed: u64,
    pub uptime_s: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelStatus {
    pub id: String,
    /// Weight format the node registered, e.g. `Q4_K_M`, when known.
    pub quantization: Option<String>,
    pub admitted: bool,
    /// Passed calibration but held back: admitted nodes serve this id as another kind.
    pub held: bool,
    pub circuit: &'static str,
}

/// What the request path needs of a node to send it a request and bill it, published with the
/// snapshot so it is read without a lock.
#[derive(Clone)]
struct Route {
    link: Arc<LinkHandle>,
    live: Arc<LiveLoad>,
    address: String,
    price: Price,
}

pub(crate) struct Registry {
    nodes: Mutex<HashMap<NodeId, NodeEntry>>,
    next_id: AtomicU64,
    snapshot: ArcSwap<Snapshot>,
    /// Every registered node's route (admitted or not: probes use them too).
    routes: ArcSwap<HashMap<NodeId, Route>>,
    cards: ArcSwap<Vec<ModelCard>>,
    prefix: Mutex<PrefixCache>,
    /// Median decode speed per model, for judging a node's latency against its peers.
    medians: ArcSwap<HashMap<String, f64>>,
    /// Statistics changed since the last publish; [`Registry::republish_if_changed`] publishes
    /// them in the background, so no request rebuilds the snapshot.
    changed: AtomicBool,
    breaker_threshold: u32,
    breaker_cooldown: Duration,
}

impl Registry {
    pub(crate) fn new(breaker_threshold: u32, breaker_cooldown: Duration) -> Self {
        Self {
            nodes: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            routes: ArcSwap::from_pointee(HashMap::new()),
            cards: ArcSwap::from_pointee(Vec::new()),
            prefix: Mutex::new(PrefixCache::new(65_536)),
            medians: ArcSwap::from_pointee(HashMap::new()),
            changed: AtomicBool::new(false),
            breaker_threshold,
            breaker_cooldown,
        }
    }

    pub(crate) fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    pub(crate) fn cards(&self) -> Arc<Vec<ModelCard>> {
        self.cards.load_full()
    }

    /// The vector length of `model` if the network serves it as an embedding model (asked on
    /// every request, so it reads the published cards without taking a reference to them).
    pub(crate) fn card_dimensions(&self, model: &str) -> Option<u32> {
        self.cards
            .load()
            .iter()
            .find(|c| c.id == model)
            .and_then(|c| c.dimensions)
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn add(
        &self,
        address: String,
        label: Option<String>,
        owner: Option<String>,
        kind: NodeKind,
        models: Vec<ModelAd>,
        price: Price,
        slots: u32,
        decode_tps: f64,
        reputation: Reputation,
        link: Arc<LinkHandle>,
    ) -> Result<NodeId, String> {
        let id = NodeId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let mut tps = Ewma::new(0.2);
        tps.observe(decode_tps);
        let health = models
            .iter()
            .map(|m| {
                let h = ModelHealth {
                    admitted: false,
                    breaker: Breaker::new(self.breaker_threshold, self.breaker_cooldown),
                    last_probe: None,
                    probing: false,
                    held: false,
                };
                (m.id.clone(), h)
            })
            .collect();
        let entry = NodeEntry {
            id,
            address,
            label,
            owner,
            kind,
            models,
            price,
            slots: slots.max(1),
            ttft: Ewma::new(0.2),
            tps,
            reputation,
            health,
            live: Arc::default(),
            link,
            connected_at: Instant::now(),
            served: 0,
            failed: 0,
            recent_tps: 0.0,
        };
        self.with_nodes(|nodes| {
            // Checked under the lock of the insert: two nodes registering at once cannot both
            // pass with conflicting kinds.
            if let Some(why) = kind_conflict(nodes, &entry.address, &entry.models) {
                return Err(why);
            }
            // A node that reconnects replaces its stale entry (same address).
            let stale: Vec<NodeId> = nodes
                .values()
                .filter(|n| n.address == entry.address)
                .map(|n| n.id)
                .collect();
            for s in stale {
                if let Some(old) = nodes.remove(&s) {
                    old.link.close();
                }
            }
            nodes.insert(id, entry);
            Ok(id)
        })
    }

    /// Link lost: the node is offline at once and its streams end.
    pub(crate) fn remove(&self, id: NodeId) -> Option<(String, f64)> {
        let removed = self.with_nodes(|nodes| nodes.remove(&id));
        if let Ok(mut p) = self.prefix.lock() {
            p.forget_node(id);
        }
        removed.map(|n| {
            n.link.close();
            (n.address, n.reputation.score())
        })
    }

    /// Ends the links of the nodes with `address` (lower-case): they reconnect and register
    /// again, which is where a revoked token is refused. Returns how many links were kicked.
    pub(crate) fn kick_address(&self, address: &str, reason: &str) -> usize {
        let Ok(nodes) = self.nodes.lock() else {
            return 0;
        };
        let mut n = 0;
        for e in nodes.values().filter(|e| e.address == address) {
            e.link.kick(reason);
            n += 1;
        }
        n
    }

    /// Load reports go straight into the node's atomics: no snapshot rebuild, which matters
    /// with thousands of nodes each reporting every two seconds.
    pub(crate) fn heartbeat(&self, id: NodeId, queued: u32, busy: u32, slots: u32, tps: f64) {
        let Ok(mut nodes) = self.nodes.lock() else {
            return;
        };
        if let Some(n) = nodes.get_mut(&id) {
            n.live.queued.store(queued, Ordering::Relaxed);
            n.live.busy.store(busy, Ordering::Relaxed);
            // A node's own figure; shown, never used to route (Nexus measures speed itself).
            n.recent_tps = if tps.is_finite() { tps.max(0.0) } else { 0.0 };
            if n.slots != slots.max(1) {
                drop(nodes);
                self.with_nodes(|nodes| {
                    if let Some(n) = nodes.get_mut(&id) {
                        n.slots = slots.max(1);
                    }
                });
            }
        }
    }

    pub(crate) fn address_price(&self, id: NodeId) -> Option<(String, Price)> {
        self.routes
            .load()
            .get(&id)
            .map(|r| (r.address.clone(), r.price))
    }

    /// The vector length of `model` on node `id`, if the node serves it as an embedding model.
    pub(crate) fn dimensions(&self, id: NodeId, model: &str) -> Option<u32> {
        let nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        nodes
            .get(&id)?
            .models
            .iter()
            .find(|m| m.id == model)?
            .dimensions
    }

    pub(crate) fn link(&self, id: NodeId) -> Option<(Arc<LinkHandle>, Arc<LiveLoad>)> {
        self.routes
            .load()
            .get(&id)
            .map(|r| (r.link.clone(), r.live.clone()))
    }

    /// Publishes the statistics recorded since the last publish (a background task calls this
    /// every [`REPUBLISH_EVERY`]).
    pub(crate) fn republish_if_changed(&self) {
        if self.changed.swap(false, Ordering::AcqRel) {
            let nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
            self.publish(&nodes);
        }
    }

    /// Records a user request's outcome on `id` for `model`. On the request path: O(1) under the
    /// lock; the snapshot is republished at once only when admission changed (else in the
    /// background).
    pub(crate) fn record(&self, id: NodeId, model: &str, result: RequestOutcome) {
        let now = Instant::now();
        let median_tps = self.medians.load().get(model).copied();
        let mut nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(n) = nodes.get_mut(&id) else { return };
        let admitted_before = n
            .health
            .get(model)
            .is_some_and(|h| h.breaker.admits_traffic());
        match result {
            RequestOutcome::FirstToken { ttft } => n.ttft.observe(ttft.as_secs_f64()),
            RequestOutcome::Finished { decode_tps } => {
                n.served += 1;
                if let Some(t) = decode_tps {
                    n.tps.observe(t);
                }
                let ratio = match (median_tps, decode_tps) {
                    (Some(m), Some(t)) if t > 0.0 => m / t,
                    _ => 1.0,
                };
                n.reputation.record(Outcome::Success {
                    latency_ratio: ratio,
                });
                if let Some(h) = n.health.get_mut(model) {
                    h.breaker.on_success();
                }
            }
            RequestOutcome::Failed => {
                n.failed += 1;
                n.reputation.record(Outcome::Failure);
                if let Some(h) = n.health.get_mut(model) {
                    h.breaker.on_failure(now);
                }
            }
        }
        let admitted_after = n
            .health
            .get(model)
            .is_some_and(|h| h.breaker.admits_traffic());
        if admitted_before == admitted_after {
            self.changed.store(true, Ordering::Release);
        } else {
            self.publish(&nodes);
        }
    }

    /// (node, model) pairs that need a probe now: calibration pending, periodic, or half-open.
    pub(crate) fn probes_due(&self, now: Instant, interval: Duration) -> Vec<(NodeId, String)> {
        let mut due = Vec::new();
        self.with_nodes(|nodes| {
            for n in nodes.values_mut() {
                for (model, h) in &mut n.health {
                    if h.probing {
                        continue;
                    }
                    let periodic = h
                        .last_probe
                        .is_none_or(|t| now.duration_since(t) >= interval);
                    let calibrating = !h.admitted && !h.held;
                    if (calibrating || periodic) && h.breaker.probe_due(now) {
                        h.probing = true;
                        due.push((n.id, model.clone()));
                    }
                }
            }
        });
        due
    }

    /// Applies a probe outcome; returns the node's address and new reputation to persist.
    pub(crate) fn probe_result(
        &self,
        id: NodeId,
        model: &str,
        outcome: Outcome,
    ) -> Option<(String, f64)> {
        let now = Instant::now();
        self.with_nodes(|nodes| {
            // Two nodes that registered with conflicting kinds before either was admitted:
            // the first admitted keeps the id; the other waits, unadmitted, until it is free.
            let conflict = match (outcome, nodes.get(&id)) {
                (Outcome::ProbePassed, Some(n))
                    if n.health.get(model).is_some_and(|h| !h.admitted) =>
                {
                    let ad: Vec<ModelAd> =
                        n.models.iter().filter(|m| m.id == model).cloned().collect();
                    kind_conflict(nodes, &n.address, &ad)
                }
                _ => None,
            };
            let n = nodes.get_mut(&id)?;
            // A held node's passes say nothing new about it: its reputation stays.
            if conflict.is_none() {
                n.reputation.record(outcome);
            }
            if let Some(h) = n.health.get_mut(model) {
                h.probing = false;
                h.last_probe = Some(now);
                match outcome {
                    Outcome::ProbePassed => {
                        if let Some(why) = conflict {
                            if !h.held {
                                tracing::warn!(node = %id, %model, %why, "calibration passed; not admitted while the id is served as another kind");
                            }
                            h.held = true;
                        } else {
                            if !h.admitted {
                                tracing::info!(node = %id, %model, "calibration passed; node admitted for traffic");
                            }
                            h.admitted = true;
                            h.held = false;
                        }
                        h.breaker.on_success();
                    }
                    _ => h.breaker.on_failure(now),
                }
            }
            Some((n.address.clone(), n.reputation.score()))
        })
    }

    pub(crate) fn decay_reputations(&self, elapsed: Duration) -> Vec<(String, f64)> {
        let mut out = Vec::new();
        self.with_nodes(|nodes| {
            for n in nodes.values_mut() {
                n.reputation.decay(elapsed);
                out.push((n.address.clone(), n.reputation.score()));
            }
        });
        out
    }

    pub(crate) fn affinity(&self, key: u64) -> Option<NodeId> {
        self.prefix.lock().ok()?.get(key)
    }

    pub(crate) fn remember_prefix(&self, key: u64, id: NodeId) {
        if let Ok(mut p) = self.prefix.lock() {
            p.insert(key, id);
        }
    }

    pub(crate) fn status(&self) -> Vec<NodeStatus> {
        let Ok(nodes) = self.nodes.lock() else {
            return Vec::new();
        };
        let mut v: Vec<NodeStatus> = nodes
            .values()
            .map(|n| NodeStatus {
                id: n.id.0,
                address: n.address.clone(),
                label: n.label.clone(),
                owner: n.owner.clone(),
                kind: n.kind,
                online: !n.link.is_closed(),
                models: n
                    .models
                    .iter()
                    .map(|m| {
                        let h = n.health.get(&m.id);
                        ModelStatus {
                            id: m.id.clone(),
                            quantization: m.quantization.clone(),
                            admitted: h.is_some_and(|h| h.admitted),
                            held: h.is_some_and(|h| h.held && !h.admitted),
                            circuit: match h.map(|h| h.breaker.state()) {
                                Some(lattice_router::BreakerState::Closed { .. }) => "closed",
                                Some(lattice_router::BreakerState::HalfOpen) => "half-open",
                                _ => "open",
                            },
                        }
                    })
                    .collect(),
                slots: n.slots,
                busy: n.live.busy.load(Ordering::Relaxed),
                queued: n.live.queued.load(Ordering::Relaxed),
                inflight: n.live.inflight.load(Ordering::Relaxed),
                ttft_ms: n.ttft.get().map(|s| s * 1000.0),
                decode_tps: n.tps.get(),
                recent_tps: n.recent_tps,
                reputation: n.reputation.score(),
                price: n.price,
                served: n.served,
                failed: n.failed,
                uptime_s: n.connected_at.elapsed().as_secs(),
            })
            .collect();
        v.sort_by_key(|s| s.id);
        v
    }

    /// Runs `f` under the lock, then republishes the snapshot and model list.
    fn with_nodes<R>(&self, f: impl FnOnce(&mut HashMap<NodeId, NodeEntry>) -> R) -> R {
        // A panic while holding the lock poisons it; the map stays consistent because every
        // mutation is a plain field update, so keep serving.
        let mut nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        let r = f(&mut nodes);
        self.publish(&nodes);
        r
    }

    fn publish(&self, nodes: &HashMap<NodeId, NodeEntry>) {
        self.routes.store(Arc::new(
            nodes
                .iter()
                .map(|(id, n)| {
                    let route = Route {
                        link: n.link.clone(),
                        live: n.live.clone(),
                        address: n.address.clone(),
                        price: n.price,
                    };
                    (*id, route)
                })
                .collect(),
        ));
        let mut speeds: HashMap<&str, Vec<f64>> = HashMap::new();
        for n in nodes.values() {
            if let Some(t) = n.tps.get() {
                for m in &n.models {
                    speeds.entry(m.id.as_str()).or_default().push(t);
                }
            }
        }
        let medians = speeds
            .into_iter()
            .map(|(m, mut v)| {
                v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
                (m.to_owned(), v.get(v.len() / 2).copied().unwrap_or(0.0))
            })
            .collect();
        self.medians.store(Arc::new(medians));
        let mut views = Vec::with_capacity(nodes.len());
        let mut cards: HashMap<String, ModelCard> = HashMap::new();
        for n in nodes.values() {
            if n.link.is_closed() {
                continue;
            }
            let models: Vec<String> = n
                .health
                .iter()
                .filter(|(_, h)| h.admitted && h.breaker.admits_traffic())
                .map(|(m, _)| m.clone())
                .collect();
            if models.is_empty() {
                continue;
            }
            for ad in n.models.iter().filter(|m| models.contains(&m.id)) {
                let card = cards.entry(ad.id.clone()).or_insert_with(|| ModelCard {
                    id: ad.id.clone(),
                    context_length: ad.context_length,
                    parallel_slots: 0,
                    has_chat_template: true,
                    nodes: 0,
                    quantization: ad.quantization.clone(),
                    logprobs: false,
                    dimensions: ad.dimensions,
                });
                card.nodes += 1;
                card.logprobs |= ad.logprobs;
                card.parallel_slots += n.slots;
                card.context_length = card.context_length.min(ad.context_length);
            }
            views.push(NodeView {
                id: n.id,
                models,
                slots: n.slots,
                ttft_s: n.ttft.get_or(0.2),
                decode_tps: n.tps.get_or(20.0),
                price_in: n.price.input_per_mtok,
                price_out: n.price.output_per_mtok,
                reputation: n.reputation.score(),
                logprobs: n.models.iter().any(|m| m.logprobs),
                live: n.live.clone(),
            });
        }
        let mut cards: Vec<ModelCard> = cards.into_values().collect();
        cards.sort_by(|a, b| a.id.cmp(&b.id));
        self.snapshot.store(Arc::new(Snapshot::new(views)));
        self.cards.store(Arc::new(cards));
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum RequestOutcome {
    FirstToken { ttft: Duration },
    Finished { decode_tps: Option<f64> },
    Failed,
}

#[cfg(test)]
mod tests {
    use super::*;
    use lattice_engine::Event;

    #[tokio::test]
    async fn a_stream_that_falls_too_far_behind_is_ended_not_buffered() {
        let (tx, mut out) = mpsc::channel(4);
        let link = LinkHandle::new(tx);
        let Some((id, mut rx)) = link.open_stream() else {
            unreachable!("link is open")
        };
        let delta = |t: &str| LinkEvent::Engine(Event::Delta(t.into()));
        // The first frame fits; the second overflows in its middle.
        link.deliver(id, vec![delta("x"); STREAM_BUFFER - 2]);
        link.deliver(id, vec![delta("x"); 3]);
        let mut got = 0;
        while rx.recv().await.is_some() {
            got += 1;
        }
        assert_eq!(
            got, STREAM_BUFFER,
            "buffered events are delivered, then the stream ends"
        );
        assert!(matches!(out.try_recv(), Ok(NexusFrame::Cancel { stream }) if stream == id));
        assert!(out.try_recv().is_err(), "one cancel");
        // Later events for the ended stream are dropped, not buffered.
        link.deliver(id, vec![delta("y")]);
        assert!(link.streams.lock().map(|s| s.is_empty()).unwrap_or(false));
    }

    #[test]
    fn one_model_id_is_one_kind_among_admitted_nodes() {
        let reg = Registry::new(3, Duration::from_secs(15));
        let mut outs = Vec::new();
        let mut add = |address: &str, dimensions: Option<u32>| {
            let (tx, out) = mpsc::channel(4);
            outs.push(out);
            let ad = ModelAd {
                id: "m".into(),
                context_length: 256,
                quantization: None,
                logprobs: false,
                dimensions,
            };
            reg.add(
                address.into(),
                None,
                None,
                NodeKind::Llm,
                vec![ad],
                Price::default(),
                1,
                10.0,
                Reputation::from_score(0.5),
                Arc::new(LinkHandle::new(tx)),
            )
        };
        let a = add("0xa", Some(4)).unwrap();
        // Not admitted yet: a node that never passes calibration blocks nothing.
        let b = add("0xb", None).unwrap();
        reg.probe_result(a, "m", Outcome::ProbePassed);
        // Registered before `a` was admitted, `b` passes its calibration too, but the id is
        // now served as embeddings: `b` is not admitted.
        let score = |id: NodeId| reg.with_nodes(|nodes| nodes[&id].reputation.score());
        let before = score(b);
        let now = Instant::now();
        reg.probe_result(b, "m", Outcome::ProbePassed);
        let admitted = |id: NodeId| {
            reg.with_nodes(|nodes| nodes.get(&id).is_some_and(|n| n.health["m"].admitted))
        };
        assert!(admitted(a) && !admitted(b));
        assert_eq!(
            score(b),
            before,
            "a held node's passes do not raise its reputation"
        );
        // Held, it is probed every interval, not at every tick like a node in calibration.
        let interval = Duration::from_secs(30);
        let due = |at: Instant| reg.probes_due(at, interval).iter().any(|(id, _)| *id == b);
        assert!(!due(now + Duration::from_secs(1)));
        assert!(due(now + interval + Duration::from_secs(1)));
        let why = add("0xc", None).unwrap_err();
        assert!(why.contains("embedding model of 4 dimensions"), "{why}");
        assert!(add("0xd", Some(8)).is_err());
        let e = add("0xe", Some(4)).unwrap();
        // Once the node serving it otherwise is gone, the next pass admits the held one.
        reg.remove(a);
        reg.remove(e);
        reg.probe_result(b, "m", Outcome::ProbePassed);
        assert!(admitted(b));
        // The same node reconnecting is not its own conflict.
        assert!(add("0xb", Some(4)).is_ok());
    }
}
