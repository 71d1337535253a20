//! A request's sampler: logit biases, penalties, then greedy or top-k / top-p / temperature and
//! a seeded draw, constrained by the output grammar if there is one. Built off the decode thread
//! (a grammar takes milliseconds to parse), so a request that cannot be honoured fails before
//! it is queued.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;

use lattice_engine::{EngineError, OutputFormat, SamplingParams, json_schema};
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::token::data::LlamaTokenData;
use llama_cpp_2::token::data_array::LlamaTokenDataArray;
use llama_cpp_2::token::logit_bias::LlamaLogitBias;

/// A request's sampler: the chain, and the output grammar kept beside it.
pub(crate) struct Sampler {
    chain: LlamaSampler,
    grammar: Option<LlamaSampler>,
}

impl Sampler {
    /// Draws the next token from the logits at batch index `at`, and records it. `None` when
    /// the grammar allows no token at all (e.g. it is complete and every end-of-generation
    /// token is masked): the answer ends there, and nothing is fed to the grammar, whose
    /// refusal of a token would throw across the FFI boundary.
    pub(crate) fn sample(&mut self, ctx: &LlamaContext<'_>, at: i32) -> Option<LlamaToken> {
        let Some(grammar) = self.grammar.as_mut() else {
            return Some(self.chain.sample(ctx, at));
        };
        // llama.cpp's own shortcut (`common_sampler_sample`): draw without the grammar and keep
        // the token when the grammar allows it; only otherwise mask the whole vocabulary and
        // draw again. Checking one token instead of ~50k is most of a grammar's cost, and the
        // result is the same: greedy picks the best allowed token either way, and a draw kept
        // when allowed or redrawn from the masked distribution has exactly the masked
        // distribution's probabilities (before top-k / top-p truncation).
        let mut cur = ctx.token_data_array_ith(at);
        cur.apply_sampler(&mut self.chain);
        let first = cur.selected_token().filter(|&t| {
            let mut one = LlamaTokenDataArray::new(vec![LlamaTokenData::new(t, 0.0, 0.0)], false);
            one.apply_sampler(grammar);
            one.data.first().is_some_and(|d| d.logit().is_finite())
        });
        let token = first.or_else(|| {
            let mut cur = ctx.token_data_array_ith(at);
            cur.apply_sampler(grammar);
            cur.apply_sampler(&mut self.chain);
            cur.selected_token().filter(|t| {
                cur.data
                    .iter()
                    .any(|d| d.id() == *t && d.logit().is_finite())
            })
        });
        if let Some(t) = token {
            grammar.accept(t);
            self.chain.accept(t);
        }
        token
    }
}

/// `window`: how many of the latest generated tokens the penalties look at (the context of a
/// slot covers a whole answer).
pub(crate) fn build(
    model: &LlamaModel,
    p: &SamplingParams,
    window: u32,
) -> Result<Sampler, EngineError> {
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
    // A schema whose grammar llama.cpp refuses (e.g. a `$ref` that only refers to itself,
    // which never produces a character) is the request's fault, not the node's.
    let grammar = grammar
        .map(|g| LlamaSampler::grammar(model, &g, "root"))
        .transpose()
        .map_err(|e| {
            EngineError::InvalidRequest(format!(
                "response_format: the schema cannot be turned into a usable grammar ({e})"
            ))
        })?;
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
    Ok(Sampler {
        chain: LlamaSampler::chain_simple(chain),
        grammar,
    })
}
