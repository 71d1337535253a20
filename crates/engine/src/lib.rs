//! The inference engine contract: a request goes in, a bounded stream of events comes out.
//! Backends (embedded llama.cpp, an OpenAI-compatible upstream) implement [`Engine`].

mod chunk;
mod int_range;
pub mod json_schema;
mod pool;
mod template;
mod text;
pub mod upstream;

use std::pin::Pin;

use futures::Stream;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

pub use lattice_api::{FinishReason, Usage};
pub use template::{ChatTemplate, TemplateError};
pub use text::{StopMatcher, Utf8Decoder};

/// One chat turn after the API layer has flattened content parts to text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prompt {
    /// Rendered with the model's own chat template.
    Chat(Vec<Message>),
    /// Plain text completion, no template.
    Text(String),
    /// Texts to embed (`/v1/embeddings`): one [`Event::Embedding`] per text, in order, then
    /// [`Event::Done`] with the texts' tokens as prompt tokens and no completion. Served only by
    /// models whose card has [`ModelCard::dimensions`]; nothing is generated.
    Embed(Vec<String>),
}

impl Prompt {
    /// Whether this asks for embeddings rather than generated text.
    pub fn is_embed(&self) -> bool {
        matches!(self, Prompt::Embed(_))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 disables top-k.
    pub top_k: u32,
    /// `None` draws a fresh seed per request.
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    /// `None` means "whatever fits in the context window".
    pub max_tokens: Option<u32>,
    pub ignore_eos: bool,
    /// OpenAI's presence penalty, in [-2, 2]: subtracted once from the logit of every token the
    /// answer has already produced.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub presence_penalty: f32,
    /// OpenAI's frequency penalty, in [-2, 2]: subtracted from a token's logit once for every
    /// time the answer has produced it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub frequency_penalty: f32,
    /// Added to the logits of these token ids of the served model's vocabulary (each in
    /// [-100, 100]; −100 all but bans a token). Sorted by token id, ids distinct.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logit_bias: Vec<(u32, f32)>,
    /// What shape the answer must have.
    #[serde(default, skip_serializing_if = "OutputFormat::is_text")]
    pub format: OutputFormat,
    /// Report each answer token's log probability and its `k` most likely alternatives
    /// (`Some(k)`, k ≤ [`MAX_TOP_LOGPROBS`]) in [`Event::Logprobs`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<u8>,
}

/// Most alternatives a token's log probabilities may list (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: u8 = 20;

/// A generated token's log probability under the model's own distribution (its raw logits'
/// softmax: before temperature, penalties, biases or a grammar), with its most likely
/// alternatives at that step, most likely first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    /// The token's text (invalid UTF-8, as in part of a character, is replaced).
    pub token: String,
    /// The token's bytes.
    pub bytes: Vec<u8>,
    pub logprob: f32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top: Vec<TopLogprob>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopLogprob {
    pub token: String,
    pub bytes: Vec<u8>,
    pub logprob: f32,
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's `skip_serializing_if` passes a reference
pub(crate) fn is_zero(v: &f32) -> bool {
    *v == 0.0
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
            stop: Vec::new(),
            max_tokens: None,
            ignore_eos: false,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            format: OutputFormat::Text,
            logprobs: None,
        }
    }
}

/// OpenAI's `response_format`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputFormat {
    /// Free text.
    #[default]
    Text,
    /// Any JSON object ("JSON mode").
    JsonObject,
    /// JSON that is an instance of `schema`, a JSON Schema ("structured outputs").
    JsonSchema {
        name: String,
        schema: serde_json::Value,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        strict: Option<bool>,
    },
}

impl OutputFormat {
    pub fn is_text(&self) -> bool {
        matches!(self, Self::Text)
    }
}

/// What the caller would like the network to optimise for (Nexus routing; ignored by a node).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Preference {
    #[default]
    Latency,
    Cost,
    Quality,
}

impl Preference {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "latency" | "fast" => Some(Self::Latency),
            "cost" | "cheap" => Some(Self::Cost),
            "quality" => Some(Self::Quality),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateRequest {
    /// Propagated to the node and into both sides' logs.
    pub request_id: String,
    pub model: String,
    pub prompt: Prompt,
    pub params: SamplingParams,
    #[serde(default)]
    pub preference: Preference,
    /// The paying user's on-chain address; the node puts it in its signed usage receipt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Who pays (set by Nexus's authentication; never sent to nodes).
    #[serde(skip)]
    pub payer: Option<Payer>,
    /// Conversation to append this exchange to, if the payer keeps chat history (Nexus only).
    #[serde(skip)]
    pub conversation: Option<String>,
    /// The caller reads the answer whole (a non-streaming request), so a node may join text
    /// deltas that are ready together into one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub whole: bool,
}

/// The account a request is billed to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payer {
    pub user_id: String,
    pub address: String,
    /// The API key used, and its spending limit in units, when the caller used a key.
    pub key_id: Option<String>,
    pub key_spend_limit: Option<u128>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// Newly generated text; never splits a UTF-8 character and never contains a stop sequence.
    Delta(String),
    /// With [`SamplingParams::logprobs`]: tokens in the order generated, sent before the
    /// [`Event::Delta`] that carries their text (a token whose text is split by a stop
    /// sequence's holdback is listed with the earlier text; tokens that only made up a matched
    /// stop sequence are left out; tokens without text may come without a delta).
    Logprobs(Vec<TokenLogprob>),
    /// For [`Prompt::Embed`]: the next text's embedding (unit length), in the order given.
    Embedding(Vec<f32>),
    /// Nexus only, before [`Event::Done`] of a paid answer: the answer is complete and the
    /// next poll settles its bill (charges it, or parks the charge until the node's batch
    /// signature covers its receipt), then yields its `Done`. A consumer that drops the stream
    /// now cancels the charge (the node's work is done and nothing is charged); one that polls
    /// on gets the `Done`. Nodes never send it, and consumers other than the admission of several
    /// answers skip it.
    Ending,
    /// Always the last event of a successful stream.
    Done {
        finish_reason: FinishReason,
        usage: Usage,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EngineError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error(
        "prompt of {prompt_tokens} tokens plus {max_tokens} completion tokens exceeds the context of {limit}"
    )]
    ContextOverflow {
        prompt_tokens: u32,
        max_tokens: u32,
        limit: u32,
    },
    #[error("engine queue is full ({capacity} requests waiting)")]
    Overloaded { capacity: usize },
    #[error("upstream engine failed: {0}")]
    Upstream(String),
    /// No healthy node can take the request (Nexus); 503, not worth retrying elsewhere.
    #[error("{0}")]
    Unavailable(String),
    #[error("engine failure: {0}")]
    Internal(String),
    /// The payer's credit (or the key's spending limit) does not cover the request (402).
    #[error("{0}")]
    PaymentRequired(String),
}

pub type EventStream = Pin<Box<dyn Stream<Item = Result<Event, EngineError>> + Send>>;

impl EngineError {
    /// Whether another node could succeed where this one failed (Nexus fails over on these).
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            Self::Overloaded { .. } | Self::Upstream(_) | Self::Internal(_)
        )
    }
}

/// What a backend serves, as advertised to clients and to Nexus.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelCard {
    pub id: String,
    /// Tokens available to one request (prompt + completion).
    pub context_length: u32,
    pub parallel_slots: u32,
    pub has_chat_template: bool,
    /// Nodes serving it (1 on a node; the count across the network on Nexus).
    #[serde(default = "one")]
    pub nodes: u32,
    /// Weight format, e.g. `Q4_K_M`, when known.
    #[serde(default)]
    pub quantization: Option<String>,
    /// The backend reports log probabilities ([`SamplingParams::logprobs`]).
    #[serde(default)]
    pub logprobs: bool,
    /// An embedding model: the length of its vectors. It serves [`Prompt::Embed`] only, and
    /// text models (`None`) never serve it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dimensions: Option<u32>,
}

fn one() -> u32 {
    1
}

/// Instantaneous load, for `/metrics`, `/health` and heartbeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Load {
    pub queued: usize,
    pub busy_slots: usize,
    pub slots: usize,
}

pub trait Engine: Send + Sync + 'static {
    /// Models that can be requested right now.
    fn models(&self) -> Vec<ModelCard>;
    /// Whether `model` can be requested right now; called on every request, so backends
    /// override it to avoid building the whole list.
    fn serves(&self, model: &str) -> bool {
        self.models().iter().any(|m| m.id == model)
    }
    /// The vector length of `model` if it is an embedding model (it serves [`Prompt::Embed`]
    /// only); `None` for a text model or one not served. Called on every request.
    fn dimensions(&self, model: &str) -> Option<u32> {
        self.models()
            .iter()
            .find(|m| m.id == model)
            .and_then(|m| m.dimensions)
    }
    fn load(&self) -> Load;
    /// Admits the request or rejects it before any token is produced. Dropping the returned
    /// stream cancels the work and frees its slot.
    fn generate(&self, req: GenerateRequest) -> BoxFuture<'_, Result<EventStream, EngineError>>;
}
