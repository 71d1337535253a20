//! A generated token's log probability and its most likely alternatives, from the step's raw
//! logits (the model's own distribution: before temperature, penalties, biases or a grammar, as
//! llama.cpp's server reports them).

use lattice_engine::{TokenLogprob, TopLogprob};
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::vocab::LlamaVocab;

/// Lowest log probability reported (as vLLM does): a token the model rules out entirely
/// (a `-inf` logit) gets this instead of a value JSON cannot carry.
const FLOOR: f32 = -9999.0;

/// `token`'s log probability under `logits` and the `k` most likely tokens, most likely first
/// (ties by lower id). One pass for the normalizer, one for the top `k`; no allocation beyond
/// the `k` alternatives. NaN logits count as ruled out.
pub(crate) fn token_logprob(
    vocab: &LlamaVocab<'_>,
    logits: &[f32],
    token: LlamaToken,
    k: u8,
) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // exp in f32 (the terms are ≤ 1), summed in f64 so ~50k–150k of them lose nothing.
    let sum: f64 = logits
        .iter()
        .filter(|l| !l.is_nan())
        .map(|&l| f64::from((l - max).exp()))
        .sum();
    #[allow(clippy::cast_possible_truncation)] // a log-sum-exp of f32 logits fits f32
    let norm = max + sum.ln() as f32;
    let logprob = |id: usize| {
        logits
            .get(id)
            .map(|l| l - norm)
            .filter(|lp| !lp.is_nan())
            .map_or(FLOOR, |lp| lp.clamp(FLOOR, 0.0))
    };
    let k = usize::from(k);
    // The k largest so far, largest first; a logit enters only if it beats the smallest.
    let mut best: Vec<(f32, usize)> = Vec::with_capacity(k + 1);
    if k > 0 {
        for (id, &l) in logits.iter().enumerate() {
            if l.is_nan() || best.len() == k && best.last().is_some_and(|&(m, _)| l <= m) {
                continue;
            }
            let at = best.partition_point(|&(m, _)| m >= l);
            best.insert(at, (l, id));
            best.truncate(k);
        }
    }
    let text = |id: LlamaToken| {
        let bytes = vocab.token_to_piece(id, false, None);
        (String::from_utf8_lossy(&bytes).into_owned(), bytes)
    };
    let id = usize::try_from(token.0).unwrap_or(usize::MAX);
    let (chosen, bytes) = text(token);
    TokenLogprob {
        token: chosen,
        bytes,
        logprob: logprob(id),
        top: best
            .into_iter()
            .map(|(_, id)| {
                let (token, bytes) = text(LlamaToken(i32::try_from(id).unwrap_or(i32::MAX)));
                TopLogprob {
                    token,
                    bytes,
                    logprob: logprob(id),
                }
            })
            .collect(),
    }
}
