//! Embedded llama.cpp backend: one model, one context, `parallel` slots decoded together in a
//! single batch per step (continuous batching) on a dedicated thread that owns the context.

mod logprobs;
mod sampler;
mod scheduler;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;

use futures::FutureExt;
use futures::future::BoxFuture;
use lattice_engine::{
    ChatTemplate, Engine, EngineError, Event, EventStream, GenerateRequest, Load, ModelCard, Prompt,
};
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::token::LlamaToken;
use tokio_stream::wrappers::UnboundedReceiverStream;

use scheduler::Job;

#[derive(Debug, Clone)]
pub struct LlamaConfig {
    pub model_path: PathBuf,
    /// Id clients use in `model`.
    pub model_id: String,
    /// Threads for decoding (token generation).
    pub threads: u32,
    /// Threads for prompt processing.
    pub threads_batch: u32,
    /// Sequences decoded together.
    pub parallel: u32,
    /// Context window of each slot (prompt + completion).
    pub ctx_per_slot: u32,
    /// Most tokens submitted to one `llama_decode` (bounds prompt chunks).
    pub batch_size: u32,
    /// Requests allowed to wait for a slot; beyond that, `Overloaded`.
    pub queue_capacity: usize,
    /// Jinja source replacing the GGUF's template (or adding one to a base model).
    pub chat_template: Option<String>,
}

impl LlamaConfig {
    pub fn new(model_path: impl Into<PathBuf>, model_id: impl Into<String>) -> Self {
        Self {
            model_path: model_path.into(),
            model_id: model_id.into(),
            threads: 2,
            threads_batch: 2,
            parallel: 4,
            ctx_per_slot: 2048,
            batch_size: 512,
            queue_capacity: 64,
            chat_template: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("llama.cpp backend failed to initialise: {0}")]
    Backend(String),
    #[error("cannot load model {path}: {reason}")]
    Model { path: PathBuf, reason: String },
    #[error("cannot create a context: {0}")]
    Context(String),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Template(#[from] lattice_engine::TemplateError),
}

/// Counters shared between the async front and the engine thread.
#[derive(Debug, Default)]
struct Shared {
    queued: AtomicUsize,
    busy: AtomicUsize,
    /// Successful `llama_decode` calls since load.
    decodes: AtomicU64,
}

/// A job's events. Dropped while the job still waits for a slot, it leaves the queue count at
/// once, so heartbeats and `/health` stop reporting it (the engine thread skips it when it
/// reaches it; until then it still takes a place in the bounded queue).
struct JobEvents {
    rx: UnboundedReceiverStream<Result<Event, EngineError>>,
    state: Arc<AtomicU8>,
    shared: Arc<Shared>,
}

impl futures::Stream for JobEvents {
    type Item = Result<Event, EngineError>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        std::pin::Pin::new(&mut self.rx).poll_next(cx)
    }
}

impl Drop for JobEvents {
    fn drop(&mut self) {
        if self
            .state
            .compare_exchange(
                scheduler::WAITING,
                scheduler::ABANDONED,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
        {
            self.shared.queued.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

pub struct LlamaEngine {
    card: ModelCard,
    model: Arc<LlamaModel>,
    template: Option<Arc<ChatTemplate>>,
    bos_text: String,
    add_bos: bool,
    queue_capacity: usize,
    jobs: Option<SyncSender<Job>>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

fn backend() -> Result<&'static LlamaBackend, LoadError> {
    static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
            LlamaBackend::init().map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| LoadError::Backend(e.clone()))
}

impl LlamaEngine {
    /// Loads the model and starts the decode thread. Blocking: call from a blocking context.
    pub fn load(cfg: LlamaConfig) -> Result<Self, LoadError> {
        if cfg.parallel == 0 || cfg.ctx_per_slot < 16 || cfg.batch_size == 0 || cfg.threads == 0 {
            return Err(LoadError::Config(
                "parallel, threads and batch size must be ≥ 1 and ctx per slot ≥ 16".into(),
            ));
        }
        let backend = backend()?;
        let model =
            LlamaModel::load_from_file(backend, &cfg.model_path, &LlamaModelParams::default())
                .map_err(|e| LoadError::Model {
                    path: cfg.model_path.clone(),
                    reason: e.to_string(),
                })?;
        let model = Arc::new(model);
        let vocab = model.vocab();
        let piece = |t: LlamaToken| {
            String::from_utf8_lossy(&vocab.token_to_piece(t, true, None)).into_owned()
        };
        let bos_text = piece(vocab.bos());
        let eos_text = piece(vocab.eos());
        let add_bos = vocab.should_add_bos();
        let source = match &cfg.chat_template {
            Some(s) => Some(s.clone()),
            None => model
                .chat_template(None)
                .ok()
                .and_then(|t| t.to_string().ok()),
        };
        let template = match source {
            Some(src) => Some(Arc::new(ChatTemplate::new(&src, &bos_text, &eos_text)?)),
            None => None,
        };
        let ctx_per_slot = cfg.ctx_per_slot.min(model.n_ctx_train().max(16));
        let card = ModelCard {
            id: cfg.model_id.clone(),
            context_length: ctx_per_slot,
            parallel_slots: cfg.parallel,
            has_chat_template: template.is_some(),
            nodes: 1,
            quantization: quantization_from_file_name(&cfg.model_path),
            logprobs: true,
            dimensions: None,
        };
        let shared = Arc::new(Shared::default());
        let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(cfg.queue_capacity);
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<Result<(), String>>(1);
        let sched = scheduler::Config {
            threads: cfg.threads,
            threads_batch: cfg.threads_batch,
            parallel: cfg.parallel,
            ctx_per_slot,
            batch_size: cfg.batch_size,
        };
        let thread_model = model.clone();
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("llama-{}", cfg.model_id))
            .spawn(move || {
                scheduler::run(
                    backend,
                    &thread_model,
                    &sched,
                    &rx,
                    &thread_shared,
                    &ready_tx,
                );
            })
            .map_err(|e| LoadError::Context(e.to_string()))?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(LoadError::Context(e)),
            Err(_) => {
                return Err(LoadError::Context(
                    "engine thread exited during start-up".into(),
                ));
            }
        }
        tracing::info!(
            model = %cfg.model_id, path = %cfg.model_path.display(), parallel = cfg.parallel,
            ctx_per_slot, threads = cfg.threads, chat_template = card.has_chat_template,
            "model loaded"
        );
        Ok(Self {
            card,
            model,
            template,
            bos_text,
            add_bos,
            queue_capacity: cfg.queue_capacity,
            jobs: Some(tx),
            shared,
            thread: Some(thread),
        })
    }

    /// The model this engine serves.
    pub fn card(&self) -> &ModelCard {
        &self.card
    }

    /// How many decode steps (`llama_decode` calls) the engine has run since it was loaded.
    /// Concurrent requests share steps, so with batching this grows by about one per token of
    /// the longest active request rather than one per token of every request.
    pub fn decode_steps(&self) -> u64 {
        self.shared.decodes.load(Ordering::Relaxed)
    }

    /// Renders (for chat) and tokenizes a prompt exactly as the engine will see it.
    pub fn tokenize(&self, prompt: &Prompt) -> Result<Vec<LlamaToken>, EngineError> {
        tokenize(
            &self.model,
            self.template.as_deref(),
            &self.bos_text,
            self.add_bos,
            prompt,
        )
    }
}

/// GGUF files name their weight format by convention (`….Q4_1.gguf`, `…-q4_k_m.gguf`).
fn quantization_from_file_name(path: &std::path::Path) -> Option<String> {
    let stem = path.file_stem()?.to_str()?;
    stem.rsplit(['.', '-'])
        .find(|part| {
            let p = part.to_ascii_lowercase();
            let mut c = p.chars();
            (c.next() == Some('q') && c.next().is_some_and(|d| d.is_ascii_digit()))
                || ["f16", "bf16", "f32"].contains(&p.as_str())
        })
        .map(str::to_ascii_uppercase)
}

fn tokenize(
    model: &LlamaModel,
    template: Option<&ChatTemplate>,
    bos_text: &str,
    add_bos: bool,
    prompt: &Prompt,
) -> Result<Vec<LlamaToken>, EngineError> {
    let text = match prompt {
        Prompt::Text(t) => t.clone(),
        Prompt::Chat(messages) => {
            let Some(t) = template else {
                return Err(EngineError::InvalidRequest(
                    "this model has no chat template (it is a base model): use /v1/completions, \
                     or start the node with --chat-template"
                        .into(),
                ));
            };
            t.render(messages)
                .map_err(|e| EngineError::InvalidRequest(e.to_string()))?
        }
        Prompt::Embed(_) => {
            return Err(EngineError::InvalidRequest(
                "this is a text generation model: it gives no embeddings".into(),
            ));
        }
    };
    // Templates usually print the BOS token themselves; never add a second one.
    let add_special = add_bos && (bos_text.is_empty() || !text.starts_with(bos_text));
    let tokens = model.vocab().tokenize(text.as_bytes(), add_special, true);
    if tokens.is_empty() {
        return Err(EngineError::InvalidRequest("the prompt is empty".into()));
    }
    Ok(tokens)
}

impl Engine for LlamaEngine {
    fn models(&self) -> Vec<ModelCard> {
        vec![self.card.clone()]
    }

    fn serves(&self, model: &str) -> bool {
        self.card.id == model
    }

    fn dimensions(&self, _model: &str) -> Option<u32> {
        None
    }

    fn load(&self) -> Load {
        Load {
            queued: self.shared.queued.load(Ordering::Acquire),
            busy_slots: self.shared.busy.load(Ordering::Acquire),
            slots: usize::try_from(self.card.parallel_slots).unwrap_or(usize::MAX),
        }
    }

    fn generate(&self, req: GenerateRequest) -> BoxFuture<'_, Result<EventStream, EngineError>> {
        async move {
            // Tokenizing a long prompt or parsing a grammar takes milliseconds: keep both off the
            // async workers.
            let model = self.model.clone();
            let template = self.template.clone();
            let bos_text = self.bos_text.clone();
            let add_bos = self.add_bos;
            let window = self.card.context_length;
            let GenerateRequest {
                request_id,
                prompt,
                params,
                ..
            } = req;
            let (tokens, sampler, params) = tokio::task::spawn_blocking(move || {
                let tokens = tokenize(&model, template.as_deref(), &bos_text, add_bos, &prompt)?;
                let sampler = sampler::build(&model, &params, window)?;
                Ok::<_, EngineError>((tokens, sampler, params))
            })
            .await
            .map_err(|e| EngineError::Internal(e.to_string()))??;

            let limit = self.card.context_length;
            let prompt_tokens = u32::try_from(tokens.len()).unwrap_or(u32::MAX);
            let room = limit.saturating_sub(prompt_tokens);
            let max_tokens = params.max_tokens.unwrap_or(room);
            if prompt_tokens >= limit || max_tokens > room {
                return Err(EngineError::ContextOverflow {
                    prompt_tokens,
                    max_tokens,
                    limit,
                });
            }
            let (events, rx) = tokio::sync::mpsc::unbounded_channel();
            let state = Arc::new(AtomicU8::new(scheduler::WAITING));
            let job = Job {
                request_id,
                tokens,
                params,
                sampler,
                max_tokens,
                events,
                state: state.clone(),
            };
            let Some(jobs) = &self.jobs else {
                return Err(EngineError::Internal("engine is shutting down".into()));
            };
            self.shared.queued.fetch_add(1, Ordering::AcqRel);
            match jobs.try_send(job) {
                Ok(()) => Ok(Box::pin(JobEvents {
                    rx: UnboundedReceiverStream::new(rx),
                    state,
                    shared: self.shared.clone(),
                }) as EventStream),
                Err(e) => {
                    self.shared.queued.fetch_sub(1, Ordering::AcqRel);
                    Err(match e {
                        TrySendError::Full(_) => EngineError::Overloaded {
                            capacity: self.queue_capacity,
                        },
                        TrySendError::Disconnected(_) => {
                            EngineError::Internal("engine thread stopped".into())
                        }
                    })
                }
            }
        }
        .boxed()
    }
}

impl Drop for LlamaEngine {
    fn drop(&mut self) {
        // Closing the queue ends the decode loop once in-flight work is cancelled or done.
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::quantization_from_file_name as q;
    use std::path::Path;

    #[test]
    fn quantization_names() {
        assert_eq!(
            q(Path::new("/m/SmolLM2-135M-Instruct.Q4_1.gguf")).as_deref(),
            Some("Q4_1")
        );
        assert_eq!(
            q(Path::new("gemma-3-270m-q4_k_m.gguf")).as_deref(),
            Some("Q4_K_M")
        );
        assert_eq!(q(Path::new("model-f16.gguf")).as_deref(), Some("F16"));
        assert_eq!(q(Path::new("model.gguf")), None);
    }
}
