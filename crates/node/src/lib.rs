//! The node's side of the link: it dials Nexus (so nodes behind NAT work), proves its key,
//! registers its models, serves multiplexed requests with back-pressure, heartbeats its load,
//! and reconnects with backoff whenever the link drops.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::{FutureExt, SinkExt, StreamExt};
use lattice_engine::{Engine, EngineError, Event};
use lattice_link::{
    LINK_PATH, LinkEvent, MAX_FRAME_BYTES, MAX_FRAME_EVENTS, ModelAd, NO_USER, NexusFrame,
    NodeFrame, NodeKey, NodeKind, PROTOCOL_VERSION, Price, UsageReceipt, challenge_message, decode,
    encode, legacy_rejection, write_frames,
};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Requests one link may carry at once; beyond this the node answers "overloaded".
const MAX_STREAMS: usize = 1024;
/// The stream map is first pruned of finished streams at this size.
const PRUNE_MIN: usize = 64;
/// Frames waiting to be written to Nexus; producers wait when it is full (back-pressure).
const OUT_QUEUE: usize = 1024;
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// Nexus base URL: `http://host:port`, `https://…`, or `ws(s)://…`.
    pub nexus_url: String,
    pub kind: NodeKind,
    pub price: Price,
    pub label: Option<String>,
    /// Pre-registered node token (`lnt_…`) sent when registering, binding the node to its
    /// operator's account.
    pub token: Option<String>,
    /// Measured single-stream decode speed, tokens/s.
    pub decode_tps: f64,
    pub heartbeat: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot connect to Nexus at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("Nexus refused this node: {0}")]
    Rejected(String),
    #[error("link protocol error: {0}")]
    Protocol(String),
    #[error("link closed: {0}")]
    Closed(String),
}

/// The WebSocket URL of Nexus's link endpoint.
pub fn link_url(base: &str) -> String {
    let base = base.trim_end_matches('/');
    let ws = if let Some(rest) = base.strip_prefix("https://") {
        format!("wss://{rest}")
    } else if let Some(rest) = base.strip_prefix("http://") {
        format!("ws://{rest}")
    } else {
        base.to_owned()
    };
    if ws.ends_with(LINK_PATH) {
        ws
    } else {
        format!("{ws}{LINK_PATH}")
    }
}

/// Keeps the node linked to Nexus until `shutdown` resolves, reconnecting with capped
/// exponential backoff (and re-registering, e.g. after a Nexus restart).
pub async fn run(
    engine: Arc<dyn Engine>,
    key: Arc<NodeKey>,
    cfg: LinkConfig,
    shutdown: impl Future<Output = ()> + Send,
) {
    tokio::pin!(shutdown);
    let mut backoff = BACKOFF_MIN;
    loop {
        let mut registered = false;
        let result = tokio::select! {
            r = session(&engine, key.clone(), &cfg, &mut registered) => r,
            () = &mut shutdown => return,
        };
        if registered {
            backoff = BACKOFF_MIN;
        }
        match result {
            Err(LinkError::Rejected(reason)) => tracing::error!(%reason, "Nexus refused this node"),
            Err(e) => tracing::warn!(error = %e, retry_in = ?backoff, "link down"),
            Ok(()) => {}
        }
        // Jitter spreads reconnects of many nodes after a Nexus restart.
        let jitter = Duration::from_millis(
            u64::from(std::process::id() % 97) * backoff.as_millis().min(1000) as u64 / 400,
        );
        tokio::select! {
            () = tokio::time::sleep(backoff + jitter) => {}
            () = &mut shutdown => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn recv(ws: &mut Ws) -> Result<NexusFrame, LinkError> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                return decode(t.as_str()).map_err(|e| match legacy_rejection(t.as_str()) {
                    Some(reason) => LinkError::Rejected(reason),
                    None => LinkError::Protocol(e.to_string()),
                });
            }
            Some(Ok(Message::Close(_))) | None => return Err(LinkError::Closed("by Nexus".into())),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(LinkError::Closed(e.to_string())),
        }
    }
}

async fn send(ws: &mut Ws, frame: &NodeFrame) -> Result<(), LinkError> {
    let text = encode(frame).map_err(|e| LinkError::Protocol(e.to_string()))?;
    ws.send(Message::text(text))
        .await
        .map_err(|e| LinkError::Closed(e.to_string()))
}

async fn session(
    engine: &Arc<dyn Engine>,
    key: Arc<NodeKey>,
    cfg: &LinkConfig,
    registered: &mut bool,
) -> Result<(), LinkError> {
    let url = link_url(&cfg.nexus_url);
    let ws_cfg = WebSocketConfig::default()
        .max_message_size(Some(MAX_FRAME_BYTES))
        .max_frame_size(Some(MAX_FRAME_BYTES))
        .read_buffer_size(lattice_link::READ_BUFFER_BYTES);
    let (mut ws, _) =
        tokio_tungstenite::connect_async_with_config(url.as_str(), Some(ws_cfg), true)
            .await
            .map_err(|e| LinkError::Connect {
                url: url.clone(),
                reason: e.to_string(),
            })?;
    let address = key.address();
    send(
        &mut ws,
        &NodeFrame::Hello {
            version: PROTOCOL_VERSION,
            address: address.clone(),
        },
    )
    .await?;
    let nonce = match recv(&mut ws).await? {
        NexusFrame::Challenge { nonce } => nonce,
        NexusFrame::Rejected { reason } => return Err(LinkError::Rejected(reason)),
        other => {
            return Err(LinkError::Protocol(format!(
                "expected a challenge, got {other:?}"
            )));
        }
    };
    let signature = key
        .sign(&challenge_message(&nonce, &address))
        .map_err(|e| LinkError::Protocol(e.to_string()))?;
    let models: Vec<ModelAd> = engine
        .models()
        .into_iter()
        .map(|m| ModelAd {
            id: m.id,
            context_length: m.context_length,
            quantization: m.quantization,
            logprobs: m.logprobs,
            dimensions: m.dimensions,
        })
        .collect();
    let slots = u32::try_from(engine.load().slots).unwrap_or(u32::MAX);
    send(
        &mut ws,
        &NodeFrame::Register {
            signature,
            kind: cfg.kind,
            models,
            price: cfg.price,
            slots,
            decode_tps: cfg.decode_tps,
            label: cfg.label.clone(),
            token: cfg.token.clone(),
        },
    )
    .await?;
    let (node_id, chain_id) = match recv(&mut ws).await? {
        NexusFrame::Registered { node_id, chain_id } => (node_id, chain_id),
        NexusFrame::Rejected { reason } => return Err(LinkError::Rejected(reason)),
        other => {
            return Err(LinkError::Protocol(format!(
                "expected registration, got {other:?}"
            )));
        }
    };
    *registered = true;
    tracing::info!(node_id, chain_id, %address, nexus = %cfg.nexus_url, "linked to Nexus");
    let signer = Arc::new(Signer {
        key: key.clone(),
        price: cfg.price,
        chain_id,
        pending: std::sync::Mutex::new(Vec::new()),
        waiting: tokio::sync::Notify::new(),
    });

    // Completion tokens of the answers this link finished, for the heartbeat's recent speed.
    let generated = Arc::new(AtomicU64::new(0));
    let (mut sink, mut stream) = ws.split();
    let (out_tx, out_rx) = mpsc::channel::<NodeFrame>(OUT_QUEUE);
    let writer = tokio::spawn(async move {
        write_frames(out_rx, &mut sink, Message::text).await;
    });
    let batches = tokio::spawn(sign_batches(signer.clone(), out_tx.clone()));
    let heartbeat = {
        let out = out_tx.clone();
        let engine = engine.clone();
        let generated = generated.clone();
        let every = cfg.heartbeat;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            let (mut since, mut counted) = (std::time::Instant::now(), 0u64);
            loop {
                tick.tick().await;
                let l = engine.load();
                let total = generated.load(Ordering::Relaxed);
                let secs = since.elapsed().as_secs_f64();
                let tokens = total.saturating_sub(counted);
                (since, counted) = (std::time::Instant::now(), total);
                let frame = NodeFrame::Heartbeat {
                    queued: u32::try_from(l.queued).unwrap_or(u32::MAX),
                    busy: u32::try_from(l.busy_slots).unwrap_or(u32::MAX),
                    slots: u32::try_from(l.slots).unwrap_or(u32::MAX),
                    #[allow(clippy::cast_precision_loss)]
                    tokens_per_s: if secs > 0.0 {
                        tokens as f64 / secs
                    } else {
                        0.0
                    },
                };
                if out.send(frame).await.is_err() {
                    break;
                }
            }
        })
    };
    let mut streams = Streams::new(MAX_STREAMS);
    let result = loop {
        let msg = match stream.next().await {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(_))) | None => break Err(LinkError::Closed("by Nexus".into())),
            Some(Ok(_)) => continue,
            Some(Err(e)) => break Err(LinkError::Closed(e.to_string())),
        };
        match decode::<NexusFrame>(msg.as_str()) {
            Ok(NexusFrame::Request {
                stream: id,
                request,
            }) => {
                if !streams.has_room() {
                    let e = EngineError::Overloaded {
                        capacity: MAX_STREAMS,
                    };
                    let _ = out_tx
                        .send(NodeFrame::Events {
                            stream: id,
                            events: vec![LinkEvent::Error(e)],
                        })
                        .await;
                    continue;
                }
                tracing::debug!(request_id = %request.request_id, stream = id, "request from Nexus");
                let task = tokio::spawn(serve_stream(
                    engine.clone(),
                    signer.clone(),
                    generated.clone(),
                    out_tx.clone(),
                    id,
                    *request,
                ));
                streams.insert(id, task.abort_handle());
            }
            Ok(NexusFrame::Cancel { stream: id }) => {
                // Aborting drops the engine stream, which frees the slot.
                if let Some(h) = streams.map.remove(&id) {
                    h.abort();
                }
            }
            Ok(other) => break Err(LinkError::Protocol(format!("unexpected frame {other:?}"))),
            Err(e) => break Err(LinkError::Protocol(e.to_string())),
        }
    };
    for h in streams.map.values() {
        h.abort();
    }
    heartbeat.abort();
    batches.abort();
    writer.abort();
    result
}

/// The link's running request streams, by Nexus's stream id, at most `limit` of them.
struct Streams {
    map: HashMap<u64, AbortHandle>,
    limit: usize,
    /// Finished streams are pruned when the map reaches this size (twice what was live at the
    /// last prune) or before refusing at the limit: amortized O(1) per request, not O(live).
    prune_at: usize,
}

impl Streams {
    fn new(limit: usize) -> Self {
        Self {
            map: HashMap::new(),
            limit,
            prune_at: PRUNE_MIN,
        }
    }

    /// Whether one more stream may start.
    fn has_room(&mut self) -> bool {
        if self.map.len() >= self.prune_at || self.map.len() >= self.limit {
            self.map.retain(|_, h| !h.is_finished());
            self.prune_at = (self.map.len() * 2).max(PRUNE_MIN);
        }
        self.map.len() < self.limit
    }

    /// Starts tracking stream `id`. Nexus never reuses a live id; if it did, the earlier stream
    /// is aborted rather than left running where no `Cancel` can reach it.
    fn insert(&mut self, id: u64, handle: AbortHandle) {
        if let Some(earlier) = self.map.insert(id, handle) {
            earlier.abort();
        }
    }
}

/// Most receipts waiting for a batch signature before the batch is signed at once: as many as
/// a batch may hold, so under load a signature (and Nexus's recovery of it, ~44 µs) covers
/// every receipt of a window.
const RECEIPT_BATCH: usize = lattice_link::MAX_BATCH_RECEIPTS;
/// A receipt waits at most this long for its batch signature.
const RECEIPT_BATCH_WINDOW: Duration = Duration::from_millis(10);

/// Signs usage receipts for this session (price and chain as registered): probes' alone, paid
/// requests' in batches (one signature per up to [`RECEIPT_BATCH`] requests or per
/// [`RECEIPT_BATCH_WINDOW`]).
struct Signer {
    key: Arc<NodeKey>,
    price: Price,
    chain_id: u64,
    /// Request id and leaf of receipts sent unsigned, in order.
    pending: std::sync::Mutex<Vec<(String, [u8; 32])>>,
    /// Notified when a receipt starts a batch: the window's timer starts then.
    waiting: tokio::sync::Notify,
}

impl Signer {
    fn receipt(
        &self,
        request_id: &str,
        user: &str,
        model: &str,
        usage: &lattice_engine::Usage,
    ) -> UsageReceipt {
        let timestamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        UsageReceipt {
            request_id: request_id.to_owned(),
            user: user.to_owned(),
            model: model.to_owned(),
            prompt_tokens: u64::from(usage.prompt_tokens),
            completion_tokens: u64::from(usage.completion_tokens),
            price_in: self.price.input_per_mtok,
            price_out: self.price.output_per_mtok,
            timestamp,
            chain_id: self.chain_id,
            signature: String::new(),
        }
    }

    /// The usage receipt of a finished request and, for a paid one, its leaf (the receipt goes
    /// out unsigned and a batch signature covers the leaf); a probe's is signed alone.
    fn usage(
        &self,
        request_id: &str,
        user: &str,
        model: &str,
        usage: &lattice_engine::Usage,
        paid: bool,
    ) -> (UsageReceipt, Option<[u8; 32]>) {
        let r = self.receipt(request_id, user, model, usage);
        match (paid, r.struct_hash()) {
            (_, Err(e)) => {
                tracing::warn!(request_id, error = %e, "cannot build the usage receipt");
                (r, None)
            }
            (true, Ok(leaf)) => (r, Some(leaf)),
            (false, Ok(_)) => match r.clone().sign(&self.key) {
                Ok(signed) => (signed, None),
                Err(e) => {
                    tracing::warn!(request_id, error = %e, "cannot sign the receipt");
                    (r, None)
                }
            },
        }
    }

    /// Queues a paid receipt's leaf (after the receipt itself went out); returns the batch frame
    /// when the batch is full (otherwise the batch task signs it when the window ends).
    fn add(&self, request_id: &str, leaf: [u8; 32]) -> Option<NodeFrame> {
        let batch = {
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            p.push((request_id.to_owned(), leaf));
            if p.len() == 1 {
                self.waiting.notify_one();
            }
            if p.len() < RECEIPT_BATCH {
                return None;
            }
            std::mem::take(&mut *p)
        };
        self.sign(batch)
    }

    /// Signs whatever waits (the batch window ran out).
    fn flush(&self) -> Option<NodeFrame> {
        let batch = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        self.sign(batch)
    }

    fn sign(&self, batch: Vec<(String, [u8; 32])>) -> Option<NodeFrame> {
        if batch.is_empty() {
            return None;
        }
        let leaves: Vec<[u8; 32]> = batch.iter().map(|(_, l)| *l).collect();
        match lattice_link::sign_batch(&self.key, self.chain_id, &leaves) {
            Ok(signature) => Some(NodeFrame::Receipts {
                requests: batch.into_iter().map(|(r, _)| r).collect(),
                signature,
            }),
            Err(e) => {
                tracing::warn!(receipts = batch.len(), error = %e, "cannot sign a receipt batch");
                None
            }
        }
    }
}

/// Signs each batch of paid receipts when its window ends (a full batch is signed by
/// [`Signer::add`] at once). Sleeps while no receipt waits, so an idle node does not wake.
async fn sign_batches(signer: Arc<Signer>, out: mpsc::Sender<NodeFrame>) {
    loop {
        signer.waiting.notified().await;
        tokio::time::sleep(RECEIPT_BATCH_WINDOW).await;
        if let Some(b) = signer.flush()
            && out.send(b).await.is_err()
        {
            break;
        }
    }
}

/// Text bytes of deltas past which a frame takes no more events (a frame stays far below
/// [`MAX_FRAME_BYTES`] however large an engine's deltas are).
const FRAME_TEXT_BYTES: usize = 1 << 20;

async fn serve_stream(
    engine: Arc<dyn Engine>,
    signer: Arc<Signer>,
    generated: Arc<AtomicU64>,
    out: mpsc::Sender<NodeFrame>,
    id: u64,
    request: lattice_engine::GenerateRequest,
) {
    let (request_id, user, model, whole) = (
        request.request_id.clone(),
        request.user.clone(),
        request.model.clone(),
        request.whole,
    );
    let mut events = match engine.generate(request).await {
        Ok(s) => s,
        Err(e) => {
            let _ = out
                .send(NodeFrame::Events {
                    stream: id,
                    events: vec![LinkEvent::Error(e)],
                })
                .await;
            return;
        }
    };
    let paid = user.as_deref().is_some_and(|u| u != NO_USER);
    // Each frame carries the events that are ready together (all of a fast upstream's answer,
    // or one token of a model decoding live): one frame, one encode, one wake-up at Nexus.
    while let Some(first) = events.next().await {
        let mut frame = Vec::new();
        let (mut text_bytes, mut last, mut leaf) = (0, false, None);
        let mut next = Some(first);
        while let Some(ev) = next.take() {
            last = matches!(ev, Ok(Event::Done { .. }) | Err(_));
            if let Ok(Event::Done { usage, .. }) = &ev {
                generated.fetch_add(u64::from(usage.completion_tokens), Ordering::Relaxed);
            }
            // Receipts are for paid requests (Nexus sets the payer) and probes (the zero user);
            // unbilled ones skip them. A probe's is signed alone, a paid one's in a batch.
            if let Ok(Event::Done { usage, .. }) = &ev
                && let Some(u) = user.as_deref()
            {
                let (receipt, paid_leaf) = signer.usage(&request_id, u, &model, usage, paid);
                frame.push(LinkEvent::Receipt(receipt));
                leaf = paid_leaf;
            }
            match &ev {
                Ok(Event::Delta(d)) => text_bytes += d.len(),
                // Roughly their JSON: up to ~12 bytes per number.
                Ok(Event::Embedding(v)) => text_bytes += 12 * v.len(),
                // Roughly their JSON: bytes listed as numbers, names, numbers.
                Ok(Event::Logprobs(l)) => {
                    text_bytes += l
                        .iter()
                        .map(|t| {
                            48 + 4 * t.bytes.len()
                                + t.top.iter().map(|a| 48 + 4 * a.bytes.len()).sum::<usize>()
                        })
                        .sum::<usize>();
                }
                _ => {}
            }
            match (ev, frame.last_mut()) {
                // An answer read whole gets its ready text as one delta.
                (Ok(Event::Delta(d)), Some(LinkEvent::Engine(Event::Delta(joined)))) if whole => {
                    joined.push_str(&d);
                }
                (Ok(e), _) => frame.push(LinkEvent::Engine(e)),
                (Err(e), _) => frame.push(LinkEvent::Error(e)),
            }
            // Two slots stay free for a receipt and the final event.
            if !last && frame.len() + 2 <= MAX_FRAME_EVENTS && text_bytes < FRAME_TEXT_BYTES {
                next = events.next().now_or_never().flatten();
            }
        }
        if out
            .send(NodeFrame::Events {
                stream: id,
                events: frame,
            })
            .await
            .is_err()
        {
            return;
        }
        // Queued only once the receipt went out, so its batch signature follows it on the link.
        if let Some(batch) = leaf.and_then(|l| signer.add(&request_id, l))
            && out.send(batch).await.is_err()
        {
            return;
        }
        if last {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::future::BoxFuture;
    use lattice_engine::{FinishReason, GenerateRequest, Load, ModelCard, Prompt, Usage};

    use super::*;

    /// Serves whatever stream the test hands it (a fault-shaping double: real engines are
    /// exercised end to end elsewhere).
    struct Canned(std::sync::Mutex<Option<lattice_engine::EventStream>>);

    impl Engine for Canned {
        fn models(&self) -> Vec<ModelCard> {
            Vec::new()
        }
        fn load(&self) -> Load {
            Load::default()
        }
        fn generate(
            &self,
            _: GenerateRequest,
        ) -> BoxFuture<'_, Result<lattice_engine::EventStream, EngineError>> {
            let s = self.0.lock().unwrap().take();
            Box::pin(async move { s.ok_or_else(|| EngineError::Internal("used up".into())) })
        }
    }

    fn request(user: Option<&str>) -> GenerateRequest {
        GenerateRequest {
            request_id: "r".into(),
            model: "m".into(),
            prompt: Prompt::Text("p".into()),
            params: Default::default(),
            preference: Default::default(),
            user: user.map(str::to_owned),
            payer: None,
            conversation: None,
            whole: false,
        }
    }

    fn signer() -> Arc<Signer> {
        Arc::new(Signer {
            key: Arc::new(NodeKey::generate().unwrap()),
            price: Price {
                input_per_mtok: 1,
                output_per_mtok: 2,
            },
            chain_id: 31337,
            pending: Default::default(),
            waiting: Default::default(),
        })
    }

    fn done(n: u32) -> Result<Event, EngineError> {
        Ok(Event::Done {
            finish_reason: FinishReason::Stop,
            usage: Usage::new(1, n),
        })
    }

    /// The frames `serve_stream` sends for `stream`, as lists of events.
    async fn frames(
        stream: lattice_engine::EventStream,
        user: Option<&str>,
    ) -> Vec<Vec<LinkEvent>> {
        frames_for(stream, request(user)).await
    }

    async fn frames_for(
        stream: lattice_engine::EventStream,
        request: GenerateRequest,
    ) -> Vec<Vec<LinkEvent>> {
        let engine = Arc::new(Canned(std::sync::Mutex::new(Some(stream))));
        let (tx, mut rx) = mpsc::channel(1024);
        serve_stream(engine, signer(), Arc::default(), tx, 7, request).await;
        let mut out = Vec::new();
        while let Ok(f) = rx.try_recv() {
            match f {
                NodeFrame::Events { stream, events } => {
                    assert_eq!(stream, 7);
                    out.push(events);
                }
                other => panic!("unexpected frame {other:?}"),
            }
        }
        out
    }

    /// `n` deltas `t0 `, `t1 `, … and the `Done` that counts them, all ready at once.
    fn ready_answer(n: u32) -> Vec<Result<Event, EngineError>> {
        let mut evs: Vec<Result<Event, EngineError>> =
            (0..n).map(|i| Ok(Event::Delta(format!("t{i} ")))).collect();
        evs.push(done(n));
        evs
    }

    /// Log probabilities travel before their text, and the stream goes on after them (a node
    /// that took them for the last event stopped forwarding and left Nexus waiting).
    #[tokio::test]
    async fn log_probabilities_are_forwarded_with_the_rest() {
        let lp = |t: &str| {
            Ok(Event::Logprobs(vec![lattice_engine::TokenLogprob {
                token: t.into(),
                bytes: t.as_bytes().to_vec(),
                logprob: -0.5,
                top: Vec::new(),
            }]))
        };
        let evs = vec![
            lp("a"),
            Ok(Event::Delta("a".into())),
            lp("b"),
            Ok(Event::Delta("b".into())),
            done(2),
        ];
        let got = frames(futures::stream::iter(evs.clone()).boxed(), None).await;
        let forwarded: Vec<Event> = got
            .into_iter()
            .flatten()
            .filter_map(|e| match e {
                LinkEvent::Engine(e) => Some(e),
                _ => None,
            })
            .collect();
        let sent: Vec<Event> = evs.into_iter().flatten().collect();
        assert_eq!(forwarded, sent);
    }

    /// Events that are ready together share a frame: at most `MAX_FRAME_EVENTS` of them, the
    /// paid receipt right before the final event, every event once and in order.
    #[tokio::test]
    async fn ready_events_share_bounded_frames() {
        let evs = ready_answer(150);
        let got = frames(
            futures::stream::iter(evs).boxed(),
            Some("0x7e5f4552091a69125d5dfcb7b8c2659029395bdf"),
        )
        .await;
        assert!(got.len() >= 3, "{} frames", got.len());
        assert!(
            got.iter()
                .all(|f| !f.is_empty() && f.len() <= MAX_FRAME_EVENTS)
        );
        // Packed: every frame but the last is as full as the two reserved slots allow.
        assert!(
            got[..got.len() - 1]
                .iter()
                .all(|f| f.len() == MAX_FRAME_EVENTS - 1)
        );
        let all: Vec<&LinkEvent> = got.iter().flatten().collect();
        let texts: Vec<String> = all
            .iter()
            .filter_map(|e| match e {
                LinkEvent::Engine(Event::Delta(d)) => Some(d.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(
            texts,
            (0..150).map(|i| format!("t{i} ")).collect::<Vec<_>>()
        );
        let n = all.len();
        assert!(
            matches!(all[n - 2], LinkEvent::Receipt(r) if r.completion_tokens == 150 && r.signature.is_empty())
        );
        assert!(matches!(all[n - 1], LinkEvent::Engine(Event::Done { .. })));
    }

    /// An answer read whole (a non-streaming request) gets the text that is ready together as
    /// one delta; a streaming one keeps its deltas (see `ready_events_share_bounded_frames`).
    #[tokio::test]
    async fn an_answer_read_whole_gets_its_ready_text_joined() {
        let evs = ready_answer(150);
        let user = "0x7e5f4552091a69125d5dfcb7b8c2659029395bdf";
        let whole = GenerateRequest {
            whole: true,
            ..request(Some(user))
        };
        let got = frames_for(futures::stream::iter(evs).boxed(), whole).await;
        assert_eq!(got.len(), 1, "{got:?}");
        let text: String = (0..150).map(|i| format!("t{i} ")).collect();
        assert!(matches!(&got[0][0], LinkEvent::Engine(Event::Delta(d)) if *d == text));
        assert!(matches!(&got[0][1], LinkEvent::Receipt(r) if r.completion_tokens == 150));
        assert!(matches!(&got[0][2], LinkEvent::Engine(Event::Done { .. })));
        assert_eq!(got[0].len(), 3);

        // Joined text still closes a frame at a MiB.
        let big = "x".repeat(300 * 1024);
        let mut evs: Vec<Result<Event, EngineError>> =
            (0..10).map(|_| Ok(Event::Delta(big.clone()))).collect();
        evs.push(done(10));
        let whole = GenerateRequest {
            whole: true,
            ..request(None)
        };
        let got = frames_for(futures::stream::iter(evs).boxed(), whole).await;
        let sizes: Vec<Vec<usize>> = got
            .iter()
            .map(|f| {
                f.iter()
                    .map(|e| match e {
                        LinkEvent::Engine(Event::Delta(d)) => d.len(),
                        _ => 0,
                    })
                    .collect()
            })
            .collect();
        let k = 300 * 1024;
        assert_eq!(sizes, vec![vec![4 * k], vec![4 * k], vec![2 * k, 0]]);
    }

    /// Large deltas close a frame once it holds a MiB of text, far below the frame size bound.
    #[tokio::test]
    async fn large_deltas_close_frames_at_a_mebibyte() {
        let big = "x".repeat(300 * 1024);
        let mut evs: Vec<Result<Event, EngineError>> =
            (0..10).map(|_| Ok(Event::Delta(big.clone()))).collect();
        evs.push(done(10));
        let got = frames(futures::stream::iter(evs).boxed(), None).await;
        let sizes: Vec<usize> = got.iter().map(Vec::len).collect();
        // 4 deltas pass 1 MiB; an unbilled request has no receipt.
        assert_eq!(sizes, vec![4, 4, 3]);
        for f in &got {
            let bytes = lattice_link::encode(&NodeFrame::Events {
                stream: 7,
                events: f.clone(),
            })
            .unwrap();
            assert!(bytes.len() < MAX_FRAME_BYTES);
        }
    }

    /// A live stream's events travel as they come: what is not ready yet waits for the next
    /// frame instead of holding back the ones that are.
    #[tokio::test]
    async fn live_events_are_not_held_back() {
        let (tx, rx) = mpsc::unbounded_channel::<Result<Event, EngineError>>();
        tx.send(Ok(Event::Delta("a".into()))).unwrap();
        tx.send(Ok(Event::Delta("b".into()))).unwrap();
        let stream = tokio_stream_from(rx);
        let feeder = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            tx.send(Ok(Event::Delta("c".into()))).unwrap();
            tx.send(done(3)).unwrap();
        });
        let got = frames(stream, None).await;
        feeder.await.unwrap();
        let sizes: Vec<usize> = got.iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![2, 2]);
    }

    fn tokio_stream_from(
        mut rx: mpsc::UnboundedReceiver<Result<Event, EngineError>>,
    ) -> lattice_engine::EventStream {
        futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed()
    }

    /// The limit counts live streams only: finished ones are pruned before a refusal, and well
    /// before the limit when they pile up.
    #[tokio::test]
    async fn streams_count_live_ones_up_to_the_limit() {
        let mut streams = super::Streams::new(100);
        let pending = || tokio::spawn(futures::future::pending::<()>()).abort_handle();
        let finished = async || {
            let t = tokio::spawn(async {});
            let h = t.abort_handle();
            let _ = t.await;
            h
        };
        let mut id = 0;
        for _ in 0..99 {
            assert!(streams.has_room());
            streams.insert(id, pending());
            id += 1;
        }
        // One slot left; a finished stream takes it, then is pruned when the limit is reached.
        assert!(streams.has_room());
        streams.insert(id, finished().await);
        id += 1;
        assert!(streams.has_room(), "the finished stream does not count");
        streams.insert(id, pending());
        id += 1;
        assert!(!streams.has_room(), "100 live streams: full");
        // Streams that finish make room again; thousands passing through keep the map small.
        for h in streams.map.values() {
            h.abort();
        }
        tokio::task::yield_now().await;
        for _ in 0..5_000 {
            let mut tries = 0;
            while !streams.has_room() {
                tokio::task::yield_now().await;
                tries += 1;
                assert!(tries < 100, "aborted streams never made room");
            }
            streams.insert(id, finished().await);
            id += 1;
            assert!(streams.map.len() <= 100);
        }
        // Under a high limit, finished streams are still dropped once the map doubles.
        let mut streams = super::Streams::new(10_000);
        for id in 0..5_000 {
            assert!(streams.has_room());
            streams.insert(id, finished().await);
            assert!(
                streams.map.len() <= 2 * super::PRUNE_MIN,
                "map of {}",
                streams.map.len()
            );
        }
    }

    /// A batch's window starts with its first receipt: receipts that arrive within it share one
    /// signature, and the task sleeps (sends nothing) while none waits.
    #[tokio::test]
    async fn receipt_batches_start_their_window_at_the_first_receipt() {
        let signer = signer();
        let (tx, mut rx) = mpsc::channel(8);
        let task = tokio::spawn(sign_batches(signer.clone(), tx));
        tokio::time::sleep(RECEIPT_BATCH_WINDOW * 3 / 2).await;
        assert!(rx.try_recv().is_err(), "nothing to sign yet");
        for round in 0..2 {
            let start = std::time::Instant::now();
            assert!(signer.add("r1", [1; 32]).is_none());
            tokio::time::sleep(RECEIPT_BATCH_WINDOW / 5).await;
            assert!(signer.add("r2", [2; 32]).is_none());
            let Some(NodeFrame::Receipts { requests, .. }) = rx.recv().await else {
                panic!("no batch in round {round}");
            };
            assert!(start.elapsed() >= RECEIPT_BATCH_WINDOW);
            assert_eq!(requests, ["r1", "r2"], "round {round}");
        }
        task.abort();
    }

    /// A stream id used again replaces the earlier stream, which is aborted (not orphaned).
    #[tokio::test]
    async fn a_reused_stream_id_aborts_the_earlier_stream() {
        let mut streams = super::Streams::new(8);
        let earlier = tokio::spawn(futures::future::pending::<()>());
        let later = tokio::spawn(futures::future::pending::<()>());
        streams.insert(1, earlier.abort_handle());
        streams.insert(1, later.abort_handle());
        let ended = tokio::time::timeout(Duration::from_secs(5), earlier).await;
        assert!(
            matches!(&ended, Ok(Err(e)) if e.is_cancelled()),
            "the earlier stream still runs: {ended:?}"
        );
        assert!(!later.is_finished());
        assert_eq!(streams.map.len(), 1);
        later.abort();
    }

    #[test]
    fn link_urls() {
        assert_eq!(
            link_url("http://127.0.0.1:8080"),
            "ws://127.0.0.1:8080/lattice/v1/link"
        );
        assert_eq!(
            link_url("https://nexus.example/"),
            "wss://nexus.example/lattice/v1/link"
        );
        assert_eq!(
            link_url("ws://h:1/lattice/v1/link"),
            "ws://h:1/lattice/v1/link"
        );
    }
}
