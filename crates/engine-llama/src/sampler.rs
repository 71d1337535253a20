//! A request's sampler chain: logit biases, penalties, the output grammar, then greedy or
//! top-k / top-p / temperature and a seeded draw. Built off the decode thread (a grammar takes
//! milliseconds to parse), so a request that cannot be honoured fails before it is queued.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;

use lattice_engine::{EngineError, OutputFormat, SamplingParams, json_schema};
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::token::logit_bias::LlamaLogitBias;

/// `window`: how many of the latest generated tokens the penalties look at (the context of a
/// slot covers a whole answer).
pub(crate) fn build(
    model: &LlamaModel,
    p: &SamplingParams,
    window: u32,
) -> Result<LlamaSampler, EngineError> {
    let n_vocab = model.n_vocab();
    let mut biases = Vec::with_capacity(p.logit_bias.len() + 2);
    for &(id, bias) in &p.logit_bias {
        let token = i32::try_from(id)
            .ok()
            .filter(|t| *t < n_vocab)
            .ok_or_else(|| {
                EngineError::InvalidRequest(format!(
                    "logit_bias: token id {id} is not in this model's vocabulary of {n_vocab} tokens"
                ))
            })?;
        biases.push(LlamaLogitBias::new(LlamaToken(token), bias));
    }
    if p.ignore_eos {
        let vocab = model.vocab();
        biases.extend(
            [vocab.eos(), vocab.eot()]
                .into_iter()
                .filter(|t| t.0 >= 0)
                .map(|t| LlamaLogitBias::new(t, f32::NEG_INFINITY)),
        );
    }
    let mut chain = Vec::new();
    if !biases.is_empty() {
        chain.push(LlamaSampler::logit_bias(n_vocab, &biases));
    }
    if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
        chain.push(LlamaSampler::penalties(
            n_vocab,
            i32::try_from(window).unwrap_or(i32::MAX),
            1.0,
            p.frequency_penalty,
            p.presence_penalty,
        ));
    }
    let grammar = match &p.format {
        OutputFormat::Text => None,
        OutputFormat::JsonObject => Some(json_schema::json_object_grammar()),
        OutputFormat::JsonSchema { schema, .. } => Some(
            json_schema::schema_grammar(schema)
                .map_err(|e| EngineError::InvalidRequest(format!("response_format: {e}")))?,
        ),
    };
    if let Some(g) = grammar {
        // A schema whose grammar llama.cpp refuses (e.g. a `$ref` that only refers to itself,
        // which never produces a character) is the request's fault, not the node's.
        let sampler = LlamaSampler::grammar(model, &g, "root").map_err(|e| {
            EngineError::InvalidRequest(format!(
                "response_format: the schema cannot be turned into a usable grammar ({e})"
            ))
        })?;
        chain.push(sampler);
    }
    if p.temperature <= 0.0 {
        chain.push(LlamaSampler::greedy());
    } else {
        if p.top_k > 0 {
            chain.push(LlamaSampler::top_k(
                i32::try_from(p.top_k).unwrap_or(i32::MAX),
            ));
        }
        if p.top_p < 1.0 {
            chain.push(LlamaSampler::top_p(p.top_p, 1));
        }
        chain.push(LlamaSampler::temp(p.temperature));
        let seed = p
            .seed
            .unwrap_or_else(|| RandomState::new().hash_one(std::time::Instant::now()));
        // llama.cpp seeds are 32-bit; fold the high half in so distinct 64-bit seeds differ.
        let seed = u32::try_from((seed ^ (seed >> 32)) & u64::from(u32::MAX)).unwrap_or(0);
        chain.push(LlamaSampler::dist(seed));
    }
    Ok(LlamaSampler::chain_simple(chain))
}
