//! Sentence embeddings on the CPU: a BERT-family encoder (e.g. all-MiniLM-L6-v2) run with
//! candle, mean-pooled over the text's tokens and scaled to unit length, as sentence-transformers
//! does for these models. Serves [`Prompt::Embed`] only, one request at a time (candle spreads a
//! batch's matrix products over the CPU's threads); others wait in a bounded queue.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use futures::future::BoxFuture;
use lattice_engine::{
    Engine, EngineError, Event, EventStream, FinishReason, GenerateRequest, Load, ModelCard,
    Prompt, Usage,
};
use tokenizers::Tokenizer;
use tokio::sync::{Semaphore, mpsc};

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
    /// Requests allowed to wait while one is computed; beyond that, `Overloaded`.
    pub queue_capacity: usize,
    /// Texts encoded together (padded to the longest of them).
    pub batch: usize,
}

impl EmbedConfig {
    pub fn new(model_path: impl Into<PathBuf>, model_id: impl Into<String>) -> Self {
        Self {
            model_path: model_path.into(),
            model_id: model_id.into(),
            queue_capacity: 64,
            batch: 16,
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
    bert: BertModel,
    tokenizer: Tokenizer,
    /// Longest input in tokens, [CLS] and [SEP] included.
    max_tokens: usize,
    dimensions: usize,
}

pub struct EmbedEngine {
    model: Arc<Model>,
    card: ModelCard,
    /// One request computes at a time.
    compute: Arc<Semaphore>,
    /// Requests admitted and not finished (the one computing included).
    admitted: Arc<AtomicUsize>,
    queue_capacity: usize,
    batch: usize,
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
        let bert = BertModel::load(vb, &config).map_err(model_err)?;
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
        tracing::info!(model = %cfg.model_id, dimensions, max_tokens, "embedding model loaded");
        Ok(Self {
            model: Arc::new(Model {
                bert,
                tokenizer,
                max_tokens,
                dimensions,
            }),
            card,
            compute: Arc::new(Semaphore::new(1)),
            admitted: Arc::default(),
            queue_capacity: cfg.queue_capacity,
            batch: cfg.batch,
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
        let device = &self.bert.device;
        let shape = (batch.len(), longest);
        let ids = Tensor::from_vec(ids, shape, device).map_err(internal)?;
        let mask = Tensor::from_vec(mask, shape, device).map_err(internal)?;
        let types = ids.zeros_like().map_err(internal)?;
        let pooled = (|| {
            let hidden = self.bert.forward(&ids, &types, Some(&mask))?;
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

/// Gives the admission back when the request ends, however it ends.
struct Admitted(Arc<AtomicUsize>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
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
        let admitted = self.admitted.load(Ordering::Acquire);
        let busy = usize::from(self.compute.available_permits() == 0);
        Load {
            queued: admitted.saturating_sub(busy),
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
            // Counted before anything waits, so a full queue refuses at once.
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
            let (model, ids, admitted) = tokio::task::spawn_blocking(move || {
                let ids = model.tokenize(&texts);
                (model, ids, admitted)
            })
            .await
            .map_err(internal)?;
            let ids = ids?;
            let prompt_tokens = ids.iter().map(Vec::len).sum::<usize>();
            let permit = self
                .compute
                .clone()
                .acquire_owned()
                .await
                .map_err(internal)?;
            let (tx, rx) = mpsc::channel::<Result<Event, EngineError>>(2 * self.batch);
            let batch = self.batch;
            tokio::task::spawn_blocking(move || {
                let _held = (permit, admitted);
                // Encoded shortest first within each window of texts, so a batch's texts are
                // alike in length and little is padding; sent in the order given, each as soon
                // as those before it are done (so the first comes after one window at most).
                let mut order: Vec<usize> = (0..ids.len()).collect();
                for window in order.chunks_mut(SORT_WINDOW) {
                    window.sort_by_key(|&i| ids[i].len());
                }
                let mut done: Vec<Option<Vec<f32>>> = vec![None; ids.len()];
                let mut next = 0;
                for chunk in order.chunks(batch) {
                    if tx.is_closed() {
                        return; // the caller left: stop computing
                    }
                    let seqs: Vec<&[u32]> = chunk.iter().map(|&i| ids[i].as_slice()).collect();
                    match model.encode(&seqs) {
                        Ok(vectors) => {
                            for (&i, v) in chunk.iter().zip(vectors) {
                                done[i] = Some(v);
                            }
                        }
                        Err(e) => {
                            let _ = tx.blocking_send(Err(e));
                            return;
                        }
                    }
                    while let Some(v) = done.get_mut(next).and_then(Option::take) {
                        if tx.blocking_send(Ok(Event::Embedding(v))).is_err() {
                            return;
                        }
                        next += 1;
                    }
                }
                let usage = Usage::new(u32::try_from(prompt_tokens).unwrap_or(u32::MAX), 0);
                let _ = tx.blocking_send(Ok(Event::Done {
                    finish_reason: FinishReason::Stop,
                    usage,
                }));
            });
            Ok(Box::pin(tokio_stream_from(rx)) as EventStream)
        })
    }
}

/// The receiver as a stream.
fn tokio_stream_from(
    mut rx: mpsc::Receiver<Result<Event, EngineError>>,
) -> impl futures::Stream<Item = Result<Event, EngineError>> + Send {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
