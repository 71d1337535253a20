//! The network as an [`Engine`]: route the request, send it over the chosen node's link, and
//! fail over to the next candidate if the node fails before the first token.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::BoxFuture;
use lattice_engine::{
    Engine, EngineError, Event, EventStream, GenerateRequest, Load, ModelCard, Preference, Prompt,
};
use lattice_link::{LinkEvent, NexusFrame};
use lattice_router::{LiveLoad, NodeId, RouteRequest, SplitMix, conversation_keys, route};
use tokio::sync::mpsc;

use crate::billing::{Bill, Billing, Settlement, rate, token_bounds};
use crate::registry::{LinkHandle, Registry, RequestOutcome};

/// Failover bounds.
#[derive(Debug, Clone)]
pub struct Failover {
    /// Nodes tried per request.
    pub max_attempts: usize,
    /// Time allowed from arrival to the first token, across all attempts.
    pub first_token_deadline: Duration,
    /// After the first token: how long a node may send nothing before the request ends with
    /// an error (its work cancelled, nothing charged, a failure on its record). Checked
    /// lazily, so a stall is noticed between one and two of these after the last event.
    pub stall_timeout: Duration,
}

/// How many times the first-token deadline an embeddings request may wait for its first vector.
const EMBEDDINGS_DEADLINE_FACTOR: u32 = 5;

impl Default for Failover {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            first_token_deadline: Duration::from_secs(60),
            stall_timeout: Duration::from_secs(60),
        }
    }
}

pub(crate) struct NetworkEngine {
    registry: Arc<Registry>,
    failover: Failover,
    seed: AtomicU64,
    billing: Option<Arc<Billing>>,
}

impl NetworkEngine {
    pub(crate) fn new(
        registry: Arc<Registry>,
        failover: Failover,
        billing: Option<Arc<Billing>>,
    ) -> Self {
        let mut seed = [0u8; 8];
        let _ = getrandom::getrandom(&mut seed);
        Self {
            registry,
            failover,
            seed: AtomicU64::new(u64::from_le_bytes(seed)),
            billing,
        }
    }

    /// Holds the most `req` can cost on any of the nodes it may be sent to.
    /// The price bound is the highest of every admitted node serving the model, so the hold
    /// can be placed before routing: routing stays one synchronous step with the in-flight
    /// count taken, and concurrent requests still spread.
    async fn open_bill(
        &self,
        req: &GenerateRequest,
        snap: &lattice_router::Snapshot,
    ) -> Result<Option<Bill>, EngineError> {
        let (Some(billing), Some(payer)) = (&self.billing, &req.payer) else {
            return Ok(None);
        };
        let context = self
            .registry
            .cards()
            .iter()
            .find(|c| c.id == req.model)
            .map_or(4096, |c| c.context_length);
        let (p, c) = token_bounds(&req.prompt, req.params.max_tokens, context);
        let mut worst = lattice_ledger::Rate::default();
        for n in snap
            .nodes()
            .iter()
            .filter(|n| n.models.contains(&req.model))
        {
            worst = worst.max(rate(lattice_link::Price {
                input_per_mtok: n.price_in,
                output_per_mtok: n.price_out,
            }));
        }
        let amount = worst.cost(p, c).ok_or_else(|| {
            EngineError::InvalidRequest("the request's cost bound overflows".into())
        })?;
        let history = req
            .conversation
            .as_ref()
            .and_then(|conv| match &req.prompt {
                Prompt::Chat(m) => m.iter().rev().find(|m| m.role == "user").map(|u| {
                    (
                        conv.clone(),
                        vec![("user".to_owned(), u.content.clone())],
                        String::new(),
                    )
                }),
                Prompt::Text(_) | Prompt::Embed(_) => None,
            });
        // The bill exists before the hold is awaited: if this future is dropped mid-await (the
        // client went away) after the writer applied the hold, the bill's drop releases it.
        let mut bill = Bill {
            billing: billing.clone(),
            request: req.request_id.clone(),
            payer: payer.clone(),
            model: req.model.clone(),
            hold: amount,
            node: None,
            book: None,
            receipt: None,
            settled: false,
            history,
            renewed: Instant::now(),
            deltas: 0,
        };
        if let Err(e) = billing.hold(&req.request_id, payer, amount).await {
            // Refused by the ledger: nothing was held, nothing to release.
            bill.settled = matches!(e, EngineError::PaymentRequired(_));
            return Err(e);
        }
        Ok(Some(bill))
    }
}

fn to_router_pref(p: Preference) -> lattice_router::Preference {
    match p {
        Preference::Latency => lattice_router::Preference::Latency,
        Preference::Cost => lattice_router::Preference::Cost,
        Preference::Quality => lattice_router::Preference::Quality,
    }
}

/// Rough token estimate for routing only (the node counts exactly): ~4 bytes per token.
fn estimate_tokens(p: &Prompt) -> u32 {
    let bytes = match p {
        Prompt::Text(t) => t.len(),
        Prompt::Chat(m) => m.iter().map(|m| m.content.len() + 8).sum(),
        Prompt::Embed(texts) => texts.iter().map(String::len).sum(),
    };
    u32::try_from(bytes / 4).unwrap_or(u32::MAX)
}

/// One request sent to one node, from before it is sent until its stream ends. However that
/// ends — answered, failed, or dropped because the client went away while it waited for the
/// first token — the node's in-flight count is given back, a node still working on the request
/// is told to stop (freeing its slot or queue place), and the stream is closed.
pub(crate) struct Dispatch {
    link: Arc<LinkHandle>,
    live: Arc<LiveLoad>,
    /// The stream, once opened.
    stream: Option<u64>,
    /// The request reached the link and the node has not ended its stream.
    working: bool,
}

impl Dispatch {
    pub(crate) fn new(link: Arc<LinkHandle>, live: Arc<LiveLoad>) -> Self {
        live.inflight.fetch_add(1, Ordering::Relaxed);
        Self {
            link,
            live,
            stream: None,
            working: false,
        }
    }

    /// The node ended the stream itself (its last event or an error) or the link is gone:
    /// nothing to cancel.
    pub(crate) fn ended(&mut self) {
        self.working = false;
    }
}

impl Drop for Dispatch {
    fn drop(&mut self) {
        self.live.inflight.fetch_sub(1, Ordering::Relaxed);
        if let Some(stream) = self.stream {
            if self.working {
                let _ = self.link.tx.try_send(NexusFrame::Cancel { stream });
            }
            self.link.close_stream(stream);
        }
    }
}

/// Sends one request to one node and waits for its first event.
pub(crate) enum Attempt {
    Started {
        first: Event,
        rx: mpsc::Receiver<LinkEvent>,
        /// A receipt that arrived before the first engine event (an empty answer).
        receipt: Option<lattice_link::UsageReceipt>,
    },
    /// The node refused or failed; `retry` tells whether another node could do better.
    Failed { error: EngineError, retry: bool },
}

pub(crate) async fn attempt(d: &mut Dispatch, req: &GenerateRequest, deadline: Instant) -> Attempt {
    let Some((stream, mut rx)) = d.link.open_stream() else {
        return Attempt::Failed {
            error: EngineError::Upstream("node went offline".into()),
            retry: true,
        };
    };
    d.stream = Some(stream);
    let frame = NexusFrame::Request {
        stream,
        request: Box::new(req.clone()),
    };
    let remaining = deadline.saturating_duration_since(Instant::now());
    // A send dropped before it completes has queued nothing (tokio's mpsc `send` is
    // cancel-safe), so `working` is set only once it has.
    match tokio::time::timeout(remaining, d.link.tx.send(frame)).await {
        Ok(Ok(())) => d.working = true,
        _ => {
            return Attempt::Failed {
                error: EngineError::Upstream("node link is congested or closed".into()),
                retry: true,
            };
        }
    }
    let mut receipt = None;
    let first = loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, rx.recv()).await {
            Ok(Some(LinkEvent::Receipt(r))) => receipt = Some(r),
            other => break other,
        }
    };
    match first {
        Ok(Some(LinkEvent::Engine(first))) => Attempt::Started { first, rx, receipt },
        Ok(Some(LinkEvent::Receipt(_))) => Attempt::Failed {
            error: EngineError::Upstream("unexpected receipt".into()),
            retry: true,
        },
        Ok(Some(LinkEvent::Error(error))) => {
            d.ended();
            let retry = error.retryable();
            Attempt::Failed { error, retry }
        }
        Ok(None) => {
            d.ended();
            Attempt::Failed {
                error: EngineError::Upstream("node went offline before answering".into()),
                retry: true,
            }
        }
        // Dropping the dispatch cancels the node's work.
        Err(_) => Attempt::Failed {
            error: EngineError::Upstream("node did not answer before the deadline".into()),
            retry: true,
        },
    }
}

/// Keeps a routed request's bookkeeping right however its stream ends (its [`Dispatch`] gives
/// the node's slot back).
struct InFlight {
    dispatch: Dispatch,
    registry: Arc<Registry>,
    node: NodeId,
    model: String,
    first_at: Instant,
    tokens: u32,
    done: bool,
}

impl InFlight {
    fn finish(&mut self, ok: bool) {
        if self.done {
            return;
        }
        self.done = true;
        // Every finish is the node's last event or a lost link: nothing left to cancel.
        self.dispatch.ended();
        let outcome = if ok {
            let secs = self.first_at.elapsed().as_secs_f64();
            let tps = (self.tokens > 1 && secs > 0.0).then(|| f64::from(self.tokens - 1) / secs);
            RequestOutcome::Finished { decode_tps: tps }
        } else {
            RequestOutcome::Failed
        };
        self.registry.record(self.node, &self.model, outcome);
    }
}

impl Engine for NetworkEngine {
    fn models(&self) -> Vec<ModelCard> {
        self.registry.cards().as_ref().clone()
    }

    fn serves(&self, model: &str) -> bool {
        self.registry.snapshot().serves(model)
    }

    fn dimensions(&self, model: &str) -> Option<u32> {
        self.registry.card_dimensions(model)
    }

    fn load(&self) -> Load {
        let snap = self.registry.snapshot();
        let mut load = Load::default();
        for n in snap.nodes() {
            load.slots += usize::try_from(n.slots).unwrap_or(0);
            load.busy_slots += usize::try_from(n.in_system().min(n.slots)).unwrap_or(0);
            load.queued += usize::try_from(n.in_system().saturating_sub(n.slots)).unwrap_or(0);
        }
        load
    }

    fn generate(&self, req: GenerateRequest) -> BoxFuture<'_, Result<EventStream, EngineError>> {
        async move {
            let started = Instant::now();
            // An embeddings request's first vector comes after its texts are encoded (and after
            // any large request ahead of it on the node): there is no short prefill to wait for.
            let wait = if req.prompt.is_embed() {
                self.failover.first_token_deadline * EMBEDDINGS_DEADLINE_FACTOR
            } else {
                self.failover.first_token_deadline
            };
            let deadline = started + wait;
            let (lookup, store) = match &req.prompt {
                Prompt::Chat(m) => {
                    let turns: Vec<(&str, &str)> = m.iter().map(|m| (m.role.as_str(), m.content.as_str())).collect();
                    let (l, s) = conversation_keys(&req.model, &turns);
                    (l, Some(s))
                }
                Prompt::Text(_) | Prompt::Embed(_) => (None, None),
            };
            let snap = self.registry.snapshot();
            let route_req = RouteRequest {
                model: &req.model,
                prompt_tokens: estimate_tokens(&req.prompt),
                max_tokens: req.params.max_tokens.unwrap_or(256),
                preference: to_router_pref(req.preference),
                affinity: lookup.and_then(|k| self.registry.affinity(k)),
                logprobs: req.params.logprobs.is_some(),
            };
            let mut rng = SplitMix(self.seed.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed));
            if !snap.serves(&req.model) {
                return Err(EngineError::Unavailable(format!(
                    "No healthy node is serving `{}` right now; retry shortly.",
                    req.model
                )));
            }
            // Dropped unsettled (every attempt failed), the bill releases its hold.
            let mut bill = self.open_bill(&req, &snap).await?;
            let mut candidates = route(&snap, &route_req, &mut rng);
            if candidates.is_empty() && route_req.logprobs {
                return Err(EngineError::InvalidRequest(format!(
                    "No node serving `{}` reports log probabilities; remove `logprobs`.",
                    req.model
                )));
            }
            if candidates.is_empty() {
                return Err(EngineError::Unavailable(format!(
                    "No healthy node is serving `{}` right now; retry shortly.",
                    req.model
                )));
            }
            candidates.truncate(self.failover.max_attempts.max(1));
            let mut last = None;
            for node in candidates {
                let Some((link, live)) = self.registry.link(node) else { continue };
                // Dropped with this future (the client went away), it cancels the node's work.
                let mut dispatch = Dispatch::new(link, live);
                tracing::debug!(request_id = %req.request_id, %node, model = %req.model, "dispatching");
                match attempt(&mut dispatch, &req, deadline).await {
                    Attempt::Started { first, rx, receipt } => {
                        let ttft = started.elapsed();
                        self.registry.record(node, &req.model, RequestOutcome::FirstToken { ttft });
                        if let Some(key) = store {
                            self.registry.remember_prefix(key, node);
                        }
                        let guard = InFlight {
                            dispatch,
                            registry: self.registry.clone(),
                            node,
                            model: req.model.clone(),
                            first_at: Instant::now(),
                            tokens: 0,
                            done: false,
                        };
                        let answering = self.registry.address_price(node);
                        if let Some((address, _)) = &answering {
                            crate::answered::record(address);
                        }
                        if let Some(b) = &mut bill {
                            b.node = answering;
                            b.book = Some(guard.dispatch.link.book.clone());
                            b.receipt = receipt;
                        }
                        let vectors = match &req.prompt {
                            // The length the client was promised (the network's card), else
                            // the node's own; unknown, the first vector sets it for the rest.
                            Prompt::Embed(texts) => Some(Vectors {
                                expected: texts.len(),
                                dimensions: self
                                    .dimensions(&req.model)
                                    .or_else(|| self.registry.dimensions(node, &req.model)),
                                seen: 0,
                            }),
                            _ => None,
                        };
                        let relay = Relay {
                            first: Some(first),
                            rx,
                            guard,
                            bill,
                            ending: None,
                            ended: false,
                            request_id: req.request_id.clone(),
                            stall: Stall::new(self.failover.stall_timeout),
                            vectors,
                        };
                        return Ok(relay.stream());
                    }
                    Attempt::Failed { error, retry } => {
                        drop(dispatch);
                        if !retry {
                            return Err(error);
                        }
                        tracing::warn!(request_id = %req.request_id, %node, error = %error, "node failed before the first token; trying the next");
                        self.registry.record(node, &req.model, RequestOutcome::Failed);
                        last = Some(error);
                    }
                }
                if Instant::now() >= deadline {
                    break;
                }
            }
            Err(EngineError::Unavailable(format!(
                "Every node tried for `{}` failed{}; retry shortly.",
                req.model,
                last.map(|e| format!(" (last error: {e})")).unwrap_or_default()
            )))
        }
        .boxed()
    }
}

/// A routed request's stream after its first event (see [`Relay::stream`]).
struct Relay {
    first: Option<Event>,
    rx: mpsc::Receiver<LinkEvent>,
    guard: InFlight,
    bill: Option<Bill>,
    /// A paid answer's end, yielded as [`Event::Ending`] and settled on the next poll.
    ending: Option<(lattice_api::FinishReason, lattice_api::Usage)>,
    ended: bool,
    request_id: String,
    stall: Stall,
    /// An embeddings request: what the node's vectors must be before anyone pays for them.
    vectors: Option<Vectors>,
}

/// The vectors an embeddings request is owed: one per text, each of the model's advertised
/// length and finite. A node that sends anything else fails the request (nothing charged).
struct Vectors {
    expected: usize,
    dimensions: Option<u32>,
    seen: usize,
}

impl Vectors {
    fn accept(&mut self, v: &[f32]) -> Result<(), String> {
        self.seen += 1;
        if self.seen > self.expected {
            return Err(format!("more than {} vectors", self.expected));
        }
        let length = u32::try_from(v.len()).unwrap_or(u32::MAX);
        if *self.dimensions.get_or_insert(length) != length || length == 0 {
            return Err(format!("a vector of {} numbers", v.len()));
        }
        if v.iter().any(|x| !x.is_finite()) {
            return Err("a vector that is not finite".into());
        }
        Ok(())
    }

    fn complete(&self, usage: &lattice_api::Usage) -> Result<(), String> {
        if self.seen != self.expected {
            return Err(format!("{} vectors for {} texts", self.seen, self.expected));
        }
        if usage.completion_tokens != 0 {
            return Err("completion tokens for embeddings".into());
        }
        Ok(())
    }
}

/// Watches for a node that stops sending mid-stream, with one timer per answer: the timer is
/// set once (only if the node's events are not already waiting), and when it fires after
/// events came, it is moved on instead of firing; so a stall shows between one and two
/// periods after the last event.
struct Stall {
    period: Duration,
    timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    /// Events since the timer was set or moved.
    events: u64,
}

impl Stall {
    fn new(period: Duration) -> Self {
        Self {
            period,
            timer: None,
            events: 0,
        }
    }
}

/// The node sent nothing for a whole stall period.
struct Stalled;

impl Relay {
    /// Ends an embeddings request whose node sent vectors it is not owed: a failure on the
    /// node's record, and the bill dropped with the stream, unsettled (its hold released).
    fn malformed(&mut self, why: &str) -> Result<Event, EngineError> {
        tracing::warn!(request_id = %self.request_id, node = %self.guard.node, %why, "malformed embeddings; nothing charged");
        // Not `finish`: the node may still be sending, and dropping the dispatch (with this
        // stream) cancels its work.
        self.guard.done = true;
        self.guard
            .registry
            .record(self.guard.node, &self.guard.model, RequestOutcome::Failed);
        Err(EngineError::Upstream(format!(
            "the node serving this request sent malformed embeddings ({why})"
        )))
    }

    /// Pays for a complete answer (a refused receipt charges nothing and counts against the
    /// node).
    async fn settle(&mut self, usage: &lattice_api::Usage) {
        let Some(b) = &mut self.bill else {
            return;
        };
        let guard = &self.guard;
        match b.settle(usage).await {
            Settlement::Charged(cost) => {
                tracing::debug!(request_id = %self.request_id, %cost, "charged");
            }
            Settlement::Parked(cost) => {
                tracing::debug!(request_id = %self.request_id, %cost, "charge waits for the node's batch signature");
            }
            Settlement::Refused(why) => {
                tracing::warn!(request_id = %self.request_id, node = %guard.node, reason = %why, "usage receipt refused; nothing charged");
                guard
                    .registry
                    .record(guard.node, &guard.model, RequestOutcome::Failed);
            }
            Settlement::Deferred(_) => {}
        }
    }

    /// The node's next event; `Ok(None)` when its stream is gone (the link was lost).
    async fn next(&mut self) -> Result<Option<LinkEvent>, Stalled> {
        if let Some(ev) = self.first.take() {
            return Ok(Some(LinkEvent::Engine(ev)));
        }
        match self.rx.try_recv() {
            Ok(ev) => {
                self.stall.events += 1;
                return Ok(Some(ev));
            }
            Err(mpsc::error::TryRecvError::Disconnected) => return Ok(None),
            Err(mpsc::error::TryRecvError::Empty) => {}
        }
        let period = self.stall.period;
        loop {
            let timer = self
                .stall
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(period)));
            tokio::select! {
                biased;
                ev = self.rx.recv() => {
                    self.stall.events += 1;
                    return Ok(ev);
                }
                () = timer.as_mut() => {
                    if self.stall.events == 0 {
                        return Err(Stalled);
                    }
                    self.stall.events = 0;
                    timer.as_mut().reset(tokio::time::Instant::now() + period);
                }
            }
        }
    }

    /// Yields the first event, then the node's events; a link lost mid-stream, or a node that
    /// stalls, ends the stream with an error (tokens already sent cannot be taken back, so no
    /// failover after this point). A paid answer's end is [`Event::Ending`], then (on the next
    /// poll) the bill is settled and the answer's `Done` yielded.
    fn stream(self) -> EventStream {
        Box::pin(futures::stream::unfold(self, |mut r| async move {
            if r.ended {
                return None;
            }
            if let Some((finish_reason, usage)) = r.ending.take() {
                r.settle(&usage).await;
                r.ended = true;
                let done = Event::Done {
                    finish_reason,
                    usage,
                };
                return Some((Ok(done), r));
            }
            let item = loop {
                match r.next().await {
                    Ok(Some(LinkEvent::Engine(Event::Delta(d)))) => {
                        r.guard.tokens += 1;
                        if let Some(b) = &mut r.bill {
                            b.on_delta(&d);
                        }
                        return Some((Ok(Event::Delta(d)), r));
                    }
                    Ok(Some(LinkEvent::Engine(Event::Logprobs(l)))) => {
                        return Some((Ok(Event::Logprobs(l)), r));
                    }
                    Ok(Some(LinkEvent::Engine(Event::Embedding(v)))) => {
                        if let Some(Err(why)) = r.vectors.as_mut().map(|c| c.accept(&v)) {
                            break r.malformed(&why);
                        }
                        if let Some(b) = &mut r.bill {
                            // Renews a long request's hold like an answer's tokens do.
                            b.on_delta("");
                        }
                        return Some((Ok(Event::Embedding(v)), r));
                    }
                    Ok(Some(LinkEvent::Receipt(rc))) => {
                        if let Some(b) = &mut r.bill {
                            b.receipt = Some(rc);
                        }
                    }
                    Ok(Some(LinkEvent::Engine(Event::Done {
                        finish_reason,
                        usage,
                    }))) => {
                        if let Some(Err(why)) = r.vectors.as_ref().map(|c| c.complete(&usage)) {
                            break r.malformed(&why);
                        }
                        r.guard.tokens = usage.completion_tokens;
                        r.guard.finish(true);
                        if r.bill.is_some() {
                            // Paid for on the next poll: a consumer may still drop the answer
                            // now, and then nothing is charged.
                            r.ending = Some((finish_reason, usage));
                            return Some((Ok(Event::Ending), r));
                        }
                        break Ok(Event::Done {
                            finish_reason,
                            usage,
                        });
                    }
                    // Only Nexus says this; from a node it means nothing.
                    Ok(Some(LinkEvent::Engine(Event::Ending))) => {}
                    Ok(Some(LinkEvent::Error(e))) => {
                        r.guard.finish(false);
                        break Err(e);
                    }
                    Ok(None) => {
                        tracing::warn!(request_id = %r.request_id, node = %r.guard.node, "node lost mid-stream");
                        r.guard.finish(false);
                        break Err(EngineError::Upstream(
                            "the node serving this request went offline mid-stream".into(),
                        ));
                    }
                    Err(Stalled) => {
                        let secs = r.stall.period.as_secs_f64();
                        tracing::warn!(request_id = %r.request_id, node = %r.guard.node,
                            "node sent nothing for {secs} s mid-stream; request ended, its work cancelled");
                        // Not `finish`: the node's work is still running, and dropping the
                        // dispatch (with this stream) cancels it.
                        r.guard.done = true;
                        r.guard.registry.record(
                            r.guard.node,
                            &r.guard.model,
                            RequestOutcome::Failed,
                        );
                        break Err(EngineError::Upstream(format!(
                            "the node serving this request stalled (nothing for {secs} s)"
                        )));
                    }
                }
            };
            r.ended = true;
            Some((item, r))
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owed(expected: usize) -> Vectors {
        Vectors {
            expected,
            dimensions: Some(3),
            seen: 0,
        }
    }

    #[test]
    fn an_embeddings_request_is_owed_one_finite_vector_per_text() {
        let usage = lattice_api::Usage::new(7, 0);
        let mut ok = owed(2);
        assert!(ok.accept(&[0.0, 0.6, 0.8]).is_ok());
        assert!(ok.complete(&usage).unwrap_err().contains("1 vectors for 2"));
        assert!(ok.accept(&[1.0, 0.0, 0.0]).is_ok());
        assert_eq!(ok.complete(&usage), Ok(()));
        // One too many, the wrong length, not finite.
        assert!(
            ok.accept(&[1.0, 0.0, 0.0])
                .unwrap_err()
                .contains("more than 2")
        );
        assert!(
            owed(1)
                .accept(&[1.0, 0.0])
                .unwrap_err()
                .contains("2 numbers")
        );
        assert!(owed(1).accept(&[f32::NAN, 0.0, 0.0]).is_err());
        assert!(owed(1).accept(&[f32::INFINITY, 0.0, 0.0]).is_err());
        // A receipt's completion tokens for embeddings are a claim nothing was generated for.
        let mut one = owed(1);
        assert!(one.accept(&[1.0, 0.0, 0.0]).is_ok());
        assert!(one.complete(&lattice_api::Usage::new(7, 3)).is_err());
        // A length not known in advance is set by the first vector, for all the others.
        let mut any = Vectors {
            expected: 3,
            dimensions: None,
            seen: 0,
        };
        assert!(any.accept(&[0.5; 10]).is_ok());
        assert!(any.accept(&[0.5; 10]).is_ok());
        assert!(any.accept(&[0.5; 9]).is_err());
        assert!(owed(1).accept(&[]).is_err());
    }
}
