//! Sentence embeddings on the CPU: a BERT-family encoder (e.g. all-MiniLM-L6-v2) run with
//! candle, mean-pooled over the text's tokens and scaled to unit length, as sentence-transformers
//! does for these models. Serves [`Prompt::Embed`] only. Encoder threads (one per core) take
//! batches of texts from every admitted request in turn, each computing its own batch; requests
//! past a bounded queue are refused.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use futures::future::BoxFuture;
use lattice_engine::{
    Engine, EngineError, Event, EventStream, FinishReason, GenerateRequest, Load, ModelCard,
    Prompt, Usage,
};
use tokenizers::Tokenizer;
use tokio::sync::mpsc;

mod bert;
use bert::{Bert, Config};

#[derive(Debug, Clone)]
pub struct EmbedConfig {
    /// The weights (`.safetensors`). The tokenizer and the model's configuration are found next
    /// to it: `<stem>.tokenizer.json` and `<stem>.config.json` (how `lattice model pull` stores
    /// them), else `tokenizer.json` and `config.json` in the same directory (a Hugging Face
    /// checkout). `<stem>.sentence_bert_config.json` or `sentence_bert_config.json`, when
    /// present, gives the longest input (`max_seq_length`).
    pub model_path: PathBuf,
    /// Id clients use in `model`.
    pub model_id: String,
    /// Requests admitted beyond the first (each until its caller drops the stream); beyond
    /// that, `Overloaded`.
    pub queue_capacity: usize,
    /// Texts encoded together (padded to the longest of them), from one request or several.
    pub batch: usize,
    /// Encoder threads, each computing its own batch (default: one per core). candle's own
    /// pool should then have one thread (`CANDLE_NUM_THREADS=1`, which `lattice node` sets),
    /// or it spreads every encoder's elementwise ops over all cores again.
    pub threads: Option<usize>,
}

impl EmbedConfig {
    pub fn new(model_path: impl Into<PathBuf>, model_id: impl Into<String>) -> Self {
        Self {
            model_path: model_path.into(),
            model_id: model_id.into(),
            queue_capacity: 64,
            batch: 16,
            threads: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot find {what} for {model}: looked for {tried}")]
    Missing {
        what: &'static str,
        model: PathBuf,
        tried: String,
    },
    #[error("cannot read {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("cannot load the model {path}: {reason}")]
    Model { path: PathBuf, reason: String },
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// The encoder, its tokenizer and its limits (read-only once loaded).
struct Model {
    bert: Bert,
    tokenizer: Tokenizer,
    /// Longest input in tokens, [CLS] and [SEP] included.
    max_tokens: usize,
    dimensions: usize,
}

pub struct EmbedEngine {
    model: Arc<Model>,
    card: ModelCard,
    /// Tokenized requests, shared by the encoder threads.
    queue: Arc<Queue>,
    /// Requests admitted whose caller still holds the stream.
    admitted: Arc<AtomicUsize>,
    queue_capacity: usize,
}

/// `<stem>.<suffix>` next to the weights, else `<plain>` in their directory.
fn companion(weights: &Path, suffix: &str, plain: &str) -> (Option<PathBuf>, String) {
    let named = weights.with_extension(suffix);
    let dir = weights.parent().unwrap_or(Path::new("."));
    let bare = dir.join(plain);
    let tried = format!("{} or {}", named.display(), bare.display());
    let found = [named, bare].into_iter().find(|p| p.is_file());
    (found, tried)
}

fn read(path: &Path) -> Result<String, LoadError> {
    std::fs::read_to_string(path).map_err(|e| LoadError::Read {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

impl EmbedEngine {
    /// Loads the weights, configuration and tokenizer (blocking: call it off the async threads).
    pub fn load(cfg: EmbedConfig) -> Result<Self, LoadError> {
        if cfg.batch == 0 {
            return Err(LoadError::Config("batch must be at least 1".into()));
        }
        let weights = &cfg.model_path;
        let (config_path, tried) = companion(weights, "config.json", "config.json");
        let config_path = config_path.ok_or_else(|| LoadError::Missing {
            what: "the model's configuration",
            model: weights.clone(),
            tried,
        })?;
        let (tokenizer_path, tried) = companion(weights, "tokenizer.json", "tokenizer.json");
        let tokenizer_path = tokenizer_path.ok_or_else(|| LoadError::Missing {
            what: "the tokenizer",
            model: weights.clone(),
            tried,
        })?;
        let config: Config =
            serde_json::from_str(&read(&config_path)?).map_err(|e| LoadError::Read {
                path: config_path.clone(),
                reason: e.to_string(),
            })?;
        config.check().map_err(LoadError::Config)?;
        let mut max_tokens = config.max_position_embeddings;
        if let (Some(p), _) = companion(
            weights,
            "sentence_bert_config.json",
            "sentence_bert_config.json",
        ) {
            #[derive(serde::Deserialize)]
            struct SentenceBert {
                max_seq_length: usize,
            }
            let sb: SentenceBert =
                serde_json::from_str(&read(&p)?).map_err(|e| LoadError::Read {
                    path: p.clone(),
                    reason: e.to_string(),
                })?;
            max_tokens = max_tokens.min(sb.max_seq_length);
        }
        if max_tokens < 3 {
            return Err(LoadError::Config(format!(
                "the model takes at most {max_tokens} tokens"
            )));
        }
        let mut tokenizer = Tokenizer::from_file(&tokenizer_path).map_err(|e| LoadError::Read {
            path: tokenizer_path.clone(),
            reason: e.to_string(),
        })?;
        // Inputs are checked against the limit (never cut short) and padded per batch here.
        tokenizer
            .with_truncation(None)
            .map_err(|e| LoadError::Config(e.to_string()))?;
        tokenizer.with_padding(None);
        let device = Device::Cpu;
        let model_err = |e: candle_core::Error| LoadError::Model {
            path: weights.clone(),
            reason: e.to_string(),
        };
        let tensors = candle_core::safetensors::load(weights, &device).map_err(model_err)?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &device);
        let bert = Bert::load(vb, &config).map_err(model_err)?;
        let dimensions = config.hidden_size;
        let card = ModelCard {
            id: cfg.model_id.clone(),
            context_length: u32::try_from(max_tokens).unwrap_or(u32::MAX),
            parallel_slots: 1,
            has_chat_template: false,
            nodes: 1,
            quantization: Some("F32".into()),
            logprobs: false,
            dimensions: Some(u32::try_from(dimensions).unwrap_or(u32::MAX)),
        };
        let model = Arc::new(Model {
            bert,
            tokenizer,
            max_tokens,
            dimensions,
        });
        let queue = Arc::new(Queue::default());
        let encoders = cfg
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
            .max(1);
        // Each encoder computes inside a rayon pool of one thread, so candle's matrix products
        // (gemm over rayon) stay on that encoder's thread. All are built before any starts, so
        // a failure leaves no encoder waiting for an engine that never was.
        let pools = (0..encoders)
            .map(|n| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(1)
                    .thread_name(move |_| format!("embed-{n}"))
                    // Encoding runs under `catch_unwind`; a panic anywhere else in an encoder
                    // would leave its texts unanswered, so it ends the process, as rayon's
                    // default does, with a line in the log.
                    .panic_handler(|_| {
                        tracing::error!("an embedding encoder panicked outside an encode");
                        std::process::abort()
                    })
                    .build()
                    .map_err(|e| LoadError::Config(format!("cannot start an encoder thread: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        for pool in pools {
            let (model, queue, batch) = (model.clone(), queue.clone(), cfg.batch);
            // The pool's handle is dropped here; its thread lives on until `work` returns
            // (when the engine is dropped).
            pool.spawn(move || work(&model, &queue, batch));
        }
        tracing::info!(model = %cfg.model_id, dimensions, max_tokens, encoders, "embedding model loaded");
        Ok(Self {
            model,
            card,
            queue,
            admitted: Arc::default(),
            queue_capacity: cfg.queue_capacity,
        })
    }
}

/// Bytes allowed per token of the model's limit in one text. English averages ~4–5 bytes per
/// WordPiece token and CJK 3; only long runs of spaces or words of 100+ characters (one `[UNK]`
/// each) come near this.
const MAX_BYTES_PER_TOKEN: usize = 32;

/// Texts sorted by length together (the rest of a request waits at most this many texts'
/// encoding for its next vector).
const SORT_WINDOW: usize = 256;

fn internal(e: impl std::fmt::Display) -> EngineError {
    EngineError::Internal(format!("embedding failed: {e}"))
}

impl Model {
    /// Longest text in bytes: [`MAX_BYTES_PER_TOKEN`] per token the model takes, checked before
    /// tokenizing (which costs time and memory in proportion to the text, whatever its limit).
    fn max_bytes(&self) -> usize {
        self.max_tokens.saturating_mul(MAX_BYTES_PER_TOKEN)
    }

    /// Token ids of each text, with the model's special tokens; refuses an empty text and one
    /// longer than the model takes, stopping at the first such text.
    fn tokenize(&self, texts: &[String]) -> Result<Vec<Vec<u32>>, EngineError> {
        let mut all = Vec::with_capacity(texts.len());
        for (i, text) in texts.iter().enumerate() {
            if text.is_empty() {
                return Err(EngineError::InvalidRequest(format!(
                    "input {i} is empty; every input must have some text"
                )));
            }
            if text.len() > self.max_bytes() {
                return Err(EngineError::InvalidRequest(format!(
                    "input {i} is {} bytes; this model takes at most {} tokens per input, and \
                     at most {} bytes. Split it into shorter texts.",
                    text.len(),
                    self.max_tokens,
                    self.max_bytes()
                )));
            }
            let enc = self
                .tokenizer
                .encode(text.as_str(), true)
                .map_err(internal)?;
            let ids = enc.get_ids();
            if ids.is_empty() {
                return Err(EngineError::InvalidRequest(format!(
                    "input {i} has no tokens for this model; every input must have some text"
                )));
            }
            if ids.len() > self.max_tokens {
                return Err(EngineError::InvalidRequest(format!(
                    "input {i} has {} tokens; this model takes at most {} per input. \
                     Split it into shorter texts.",
                    ids.len(),
                    self.max_tokens
                )));
            }
            all.push(ids.to_vec());
        }
        Ok(all)
    }

    /// Unit-length mean-pooled embeddings of a batch of tokenized texts.
    fn encode(&self, batch: &[&[u32]]) -> Result<Vec<Vec<f32>>, EngineError> {
        let longest = batch.iter().map(|s| s.len()).max().unwrap_or(0);
        if longest == 0 {
            return Ok(Vec::new());
        }
        let (mut ids, mut mask) = (
            Vec::with_capacity(batch.len() * longest),
            Vec::with_capacity(batch.len() * longest),
        );
        for seq in batch {
            ids.extend_from_slice(seq);
            ids.resize(ids.len() + longest - seq.len(), 0);
            mask.extend(std::iter::repeat_n(1u32, seq.len()));
            mask.resize(mask.len() + longest - seq.len(), 0);
        }
        let device = self.bert.device();
        let shape = (batch.len(), longest);
        let ids = Tensor::from_vec(ids, shape, device).map_err(internal)?;
        let mask = Tensor::from_vec(mask, shape, device).map_err(internal)?;
        let pooled = (|| {
            let hidden = self.bert.forward(&ids, &mask)?;
            // Mean over the text's own tokens (padding masked out), then unit length.
            let m = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
            let summed = hidden.broadcast_mul(&m)?.sum(1)?;
            let counts = m.sum(1)?;
            let mean = summed.broadcast_div(&counts)?;
            let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?;
            mean.broadcast_div(&norm.clamp(1e-12, f64::MAX)?)?
                .to_vec2::<f32>()
        })()
        .map_err(internal)?;
        if pooled.iter().any(|v| v.len() != self.dimensions) {
            return Err(EngineError::Internal(
                "the model returned vectors of another length".into(),
            ));
        }
        if pooled.iter().flatten().any(|x| !x.is_finite()) {
            return Err(EngineError::Internal(
                "the model returned a vector that is not finite".into(),
            ));
        }
        Ok(pooled)
    }
}

impl Drop for EmbedEngine {
    fn drop(&mut self) {
        self.queue.lock().closed = true;
        self.queue.wake.notify_all();
    }
}

/// Gives the admission back when the request ends, however it ends.
struct Admitted(Arc<AtomicUsize>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One request's texts on the worker: encoded in `order` (shortest first within each window),
/// sent in the order given.
struct Job {
    id: u64,
    ids: Vec<Vec<u32>>,
    order: Vec<usize>,
    /// Texts of `order` already put into a batch.
    taken: usize,
    done: Vec<Option<Vec<f32>>>,
    /// Vectors sent so far (texts `0..sent`).
    sent: usize,
    prompt_tokens: u32,
    /// Unbounded: a reader that is slow to take its vectors never stalls the other requests'
    /// batches; what it can hold is bounded by its request's size.
    tx: mpsc::UnboundedSender<Result<Event, EngineError>>,
}

impl Job {
    fn new(
        id: u64,
        ids: Vec<Vec<u32>>,
        tx: mpsc::UnboundedSender<Result<Event, EngineError>>,
    ) -> Self {
        let mut order: Vec<usize> = (0..ids.len()).collect();
        for window in order.chunks_mut(SORT_WINDOW) {
            window.sort_by_key(|&i| ids[i].len());
        }
        let prompt_tokens = ids.iter().map(Vec::len).sum::<usize>();
        Self {
            id,
            done: vec![None; ids.len()],
            order,
            taken: 0,
            sent: 0,
            prompt_tokens: u32::try_from(prompt_tokens).unwrap_or(u32::MAX),
            ids,
            tx,
        }
    }

    /// Sends the vectors that are next in order; false once the reader has gone.
    fn flush(&mut self) -> bool {
        while let Some(v) = self.done.get_mut(self.sent).and_then(Option::take) {
            if self.tx.send(Ok(Event::Embedding(v))).is_err() {
                return false;
            }
            self.sent += 1;
        }
        true
    }
}

/// Up to `batch` texts, taken one at a time from each request in turn, so a request of one
/// text waits about one batch behind a request of thousands, not for all of it. The turn goes
/// on from one batch to the next: the requests served last move to the back, so with more
/// requests waiting than a batch holds, none waits for the others to finish.
fn pick(jobs: &mut [Job], batch: usize) -> Vec<(u64, usize)> {
    let mut picks = Vec::with_capacity(batch);
    // The position after the last request a text was taken from.
    let mut next = 0;
    'rounds: loop {
        let before = picks.len();
        for (k, job) in jobs.iter_mut().enumerate() {
            if picks.len() == batch {
                break 'rounds;
            }
            if let Some(&i) = job.order.get(job.taken) {
                picks.push((job.id, i));
                job.taken += 1;
                next = k + 1;
            }
        }
        if picks.len() == before {
            break;
        }
    }
    if !jobs.is_empty() {
        jobs.rotate_left(next % jobs.len());
    }
    picks
}

/// The requests the encoders share.
#[derive(Default)]
struct Queue {
    state: Mutex<State>,
    /// Signalled when a request arrives, texts remain after a batch was taken, or the engine
    /// is dropped.
    wake: Condvar,
}

#[derive(Default)]
struct State {
    jobs: Vec<Job>,
    next_id: u64,
    closed: bool,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, State> {
        // An encoder panic is caught before it could poison the lock; if one did, the list
        // is still whole (every change is a plain push, field update or retain).
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One encoder thread: takes a batch of the waiting requests' texts, encodes it (alone on its
/// core), hands the vectors out, and takes the next. Several run side by side; on a small
/// model this beats spreading each batch's products over the cores (BENCHMARKS.md).
fn work(model: &Model, queue: &Queue, batch: usize) {
    let mut state = queue.lock();
    loop {
        // A request whose reader left is dropped here, before its texts take a batch.
        state.jobs.retain(|j| !j.tx.is_closed());
        let picks = pick(&mut state.jobs, batch);
        if picks.is_empty() {
            if state.closed {
                return;
            }
            state = queue
                .wake
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
            continue;
        }
        if state.jobs.iter().any(|j| j.taken < j.order.len()) {
            queue.wake.notify_one(); // more texts wait: another encoder can start on them
        }
        // Copied out (a few hundred ids) so the list is free while this batch is encoded.
        let (picks, seqs): (Vec<(u64, usize)>, Vec<Vec<u32>>) = picks
            .into_iter()
            .filter_map(|(id, i)| {
                let job = state.jobs.iter().find(|j| j.id == id)?;
                Some(((id, i), job.ids.get(i)?.clone()))
            })
            .unzip();
        drop(state);
        let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        let encoded =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| model.encode(&refs)))
                .unwrap_or_else(|_| Err(internal("the encoder panicked")));
        state = queue.lock();
        let mut failed = Vec::new();
        let encoded = encoded.and_then(|v| {
            if v.len() == picks.len() {
                Ok(v)
            } else {
                Err(internal(format!(
                    "{} vectors for {} texts",
                    v.len(),
                    picks.len()
                )))
            }
        });
        match encoded {
            Ok(vectors) => {
                for (&(id, i), v) in picks.iter().zip(vectors) {
                    // Gone if its reader left meanwhile.
                    if let Some(job) = state.jobs.iter_mut().find(|j| j.id == id) {
                        job.done[i] = Some(v);
                    }
                }
            }
            Err(e) => failed.extend(picks.iter().map(|&(id, _)| (id, e.clone()))),
        }
        state.jobs.retain_mut(|job| {
            if let Some((_, e)) = failed.iter().find(|(id, _)| *id == job.id) {
                let _ = job.tx.send(Err(e.clone()));
                return false;
            }
            if !job.flush() {
                return false;
            }
            if job.sent < job.ids.len() {
                return true;
            }
            let usage = Usage::new(job.prompt_tokens, 0);
            let _ = job.tx.send(Ok(Event::Done {
                finish_reason: FinishReason::Stop,
                usage,
            }));
            false
        });
    }
}

impl Engine for EmbedEngine {
    fn models(&self) -> Vec<ModelCard> {
        vec![self.card.clone()]
    }

    fn serves(&self, model: &str) -> bool {
        model == self.card.id
    }

    fn dimensions(&self, model: &str) -> Option<u32> {
        self.card.dimensions.filter(|_| model == self.card.id)
    }

    fn load(&self) -> Load {
        // The worker encodes every admitted request's texts together: one slot, busy while
        // any request is admitted.
        let admitted = self.admitted.load(Ordering::Acquire);
        let busy = admitted.min(1);
        Load {
            queued: admitted - busy,
            busy_slots: busy,
            slots: 1,
        }
    }

    fn generate(&self, req: GenerateRequest) -> BoxFuture<'_, Result<EventStream, EngineError>> {
        Box::pin(async move {
            if req.model != self.card.id {
                return Err(EngineError::InvalidRequest(format!(
                    "model '{}' is not served here",
                    req.model
                )));
            }
            let Prompt::Embed(texts) = req.prompt else {
                return Err(EngineError::InvalidRequest(format!(
                    "'{}' is an embedding model: it serves /v1/embeddings only",
                    self.card.id
                )));
            };
            if texts.is_empty() {
                return Err(EngineError::InvalidRequest(
                    "input must not be empty".into(),
                ));
            }
            // Counted before anything waits, so a full queue refuses at once; held until the
            // caller drops the stream.
            let before = self.admitted.fetch_add(1, Ordering::AcqRel);
            let admitted = Admitted(self.admitted.clone());
            if before > self.queue_capacity {
                return Err(EngineError::Overloaded {
                    capacity: self.queue_capacity,
                });
            }
            let model = self.model.clone();
            // The admission goes into the task and comes back with the tokens, so a caller
            // that leaves while it runs does not free its place before the work stops.
            let (ids, admitted) = tokio::task::spawn_blocking(move || {
                let ids = model.tokenize(&texts);
                (ids, admitted)
            })
            .await
            .map_err(internal)?;
            let ids = ids?;
            let (tx, mut rx) = mpsc::unbounded_channel();
            {
                let mut state = self.queue.lock();
                let id = state.next_id;
                state.next_id += 1;
                state.jobs.push(Job::new(id, ids, tx));
            }
            self.queue.wake.notify_one();
            let stream = futures::stream::poll_fn(move |cx| {
                let _held = &admitted;
                rx.poll_recv(cx)
            });
            Ok(Box::pin(stream) as EventStream)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: u64, lengths: &[usize]) -> Job {
        let (tx, _rx) = mpsc::unbounded_channel();
        Job::new(id, lengths.iter().map(|&n| vec![0; n]).collect(), tx)
    }

    #[test]
    fn batches_take_from_every_request_in_turn() {
        let mut jobs = vec![job(7, &[5; 40]), job(8, &[3]), job(9, &[9, 2])];
        let first = pick(&mut jobs, 6);
        // Round robin; within a request shortest first (1 before 0).
        assert_eq!(first, vec![(7, 0), (8, 0), (9, 1), (7, 1), (9, 0), (7, 2)]);
        let second = pick(&mut jobs, 6);
        assert_eq!(second, (3..9).map(|i| (7, i)).collect::<Vec<_>>());
        assert_eq!(pick(&mut jobs, 100).len(), 40 - 9);
        assert!(pick(&mut jobs, 100).is_empty());
    }

    #[test]
    fn the_turn_goes_on_across_batches() {
        // More requests than a batch holds, each with many texts, then one of a single text:
        // it is served within two batches, not after the others are done.
        let mut jobs: Vec<Job> = (0..20).map(|id| job(id, &[4; 100])).collect();
        jobs.push(job(99, &[4]));
        let first = pick(&mut jobs, 16);
        assert_eq!(first, (0..16).map(|id| (id, 0)).collect::<Vec<_>>());
        let second = pick(&mut jobs, 16);
        assert!(second.contains(&(99, 0)), "{second:?}");
        // Then 0.. again, each once before any twice.
        assert_eq!(&second[..5], &[(16, 0), (17, 0), (18, 0), (19, 0), (99, 0)]);
        assert_eq!(second[5], (0, 1));
    }

    #[test]
    fn vectors_go_out_in_the_order_given() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut j = Job::new(0, vec![vec![0; 4], vec![0; 1], vec![0; 2]], tx);
        assert_eq!(j.order, vec![1, 2, 0]);
        j.done[1] = Some(vec![1.0]);
        assert!(j.flush());
        assert!(
            rx.try_recv().is_err(),
            "text 0 is not done: nothing is sent"
        );
        j.done[0] = Some(vec![0.0]);
        assert!(j.flush());
        for want in [0.0, 1.0] {
            match rx.try_recv() {
                Ok(Ok(Event::Embedding(v))) => assert_eq!(v, vec![want]),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(j.sent, 2);
        drop(rx);
        j.done[2] = Some(vec![2.0]);
        assert!(!j.flush(), "the reader is gone");
    }
}
