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
    let norm = log_norm(logits);
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

/// log Σ exp(logits), NaN counted as −∞. Every logit needs an `exp`, ~50k–150k per token: with
/// `f32::exp` this was ~9 % of a logprobs request's decode time on SmolLM2; the polynomial below
/// vectorizes.
fn log_norm(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return max;
    }
    // f32 lanes within a block, blocks summed in f64: error ~1e-6 relative for 150k terms.
    let mut total = 0f64;
    for block in logits.chunks(1024) {
        let mut lanes = [0f32; 8];
        let mut eights = block.chunks_exact(8);
        for c in &mut eights {
            for (lane, &l) in lanes.iter_mut().zip(c) {
                *lane += exp_nonpositive(l - max);
            }
        }
        let rest: f32 = eights
            .remainder()
            .iter()
            .map(|&l| exp_nonpositive(l - max))
            .sum();
        total += f64::from(lanes.iter().sum::<f32>() + rest);
    }
    #[allow(clippy::cast_possible_truncation)] // a log-sum-exp of f32 logits fits f32
    let log = total.ln() as f32;
    max + log
}

/// e^x for x ≤ 0, within ~4e-6 relative (the polynomial is good to ~1e-7; the rest is the f32
/// rounding of x·log2(e) for large |x|), and ~0 below −87, for −∞ and NaN too: 2^t as 2^i
/// times a degree-6 polynomial for 2^f, f ∈ [−½, ½].
#[inline]
fn exp_nonpositive(x: f32) -> f32 {
    const C: [f32; 6] = [
        std::f32::consts::LN_2,
        0.240_226_5,
        0.055_504_11,
        0.009_618_129,
        0.001_333_355_8,
        0.000_154_035_3,
    ];
    let t = x.max(-87.0) * std::f32::consts::LOG2_E;
    let i = t.round();
    let f = t - i;
    let p = 1.0 + f * (C[0] + f * (C[1] + f * (C[2] + f * (C[3] + f * (C[4] + f * C[5])))));
    // i ∈ [−126, 0]: a normal float's exponent.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let scale = f32::from_bits(((i as i32 + 127) as u32) << 23);
    p * scale
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fast_exp_is_close_to_the_real_one() {
        let mut worst = 0f64;
        for k in 0..=870_000 {
            let x = -(k as f32) / 10_000.0;
            let want = f64::from(x).exp();
            let got = f64::from(exp_nonpositive(x));
            worst = worst.max((got - want).abs() / want);
        }
        // Mostly the f32 rounding of x·log2(e) for large |x|, where the terms are tiny.
        assert!(worst < 1e-5, "{worst}");
        assert!(exp_nonpositive(f32::NEG_INFINITY) < 1e-37);
        assert!(exp_nonpositive(f32::NAN) < 1e-37);
    }

    #[test]
    fn the_normalizer_matches_a_careful_one() {
        // Logit-like vectors: a vocabulary's worth, spread as a model's are, and edge cases.
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 40) as f32 / (1u64 << 24) as f32
        };
        for (n, spread) in [(49_152, 8.0), (151_936, 20.0), (10, 0.0), (1, 3.0)] {
            let logits: Vec<f32> = (0..n).map(|_| (next() - 0.5) * 2.0 * spread).collect();
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let careful = f64::from(max)
                + logits
                    .iter()
                    .map(|&l| (f64::from(l) - f64::from(max)).exp())
                    .sum::<f64>()
                    .ln();
            let got = f64::from(log_norm(&logits));
            assert!(
                (got - careful).abs() < 1e-4,
                "{n} {spread}: {got} vs {careful}"
            );
        }
        let with_holes = [1.0, f32::NEG_INFINITY, f32::NAN, 1.0];
        assert!((log_norm(&with_holes) - (1.0 + 2f32.ln())).abs() < 1e-5);
        assert_eq!(log_norm(&[f32::NEG_INFINITY; 3]), f32::NEG_INFINITY);
    }
}
