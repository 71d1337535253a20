//! Active health checks: canary prompts with a known greedy answer per model. A node must pass
//! them for each model it claims before it receives user traffic (proof of capability), and
//! keeps being probed; wrong answers, errors and timeouts drive its circuit breaker.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use lattice_engine::{Event, GenerateRequest, Message, Preference, Prompt, SamplingParams};
use lattice_link::LinkEvent;
use lattice_router::Outcome;

use crate::Nexus;
use crate::network::{Attempt, Dispatch, attempt};

/// Probes sent by this process (each probe's request id is unique).
static PROBES: AtomicU64 = AtomicU64::new(0);

/// A prompt whose greedy answer for a model is known.
#[derive(Debug, Clone)]
pub struct Canary {
    pub prompt: Prompt,
    pub max_tokens: u32,
    /// The answer must contain this text.
    pub expect: String,
}

/// Canaries for the models of our catalog, checked against llama.cpp's greedy output.
pub fn builtin_canary(model: &str) -> Option<Canary> {
    match model {
        "smollm2-135m" => Some(Canary {
            prompt: Prompt::Chat(vec![Message {
                role: "user".into(),
                content: "Which city is the capital of France?".into(),
            }]),
            max_tokens: 16,
            expect: "Paris".into(),
        }),
        "gemma3-270m" => Some(Canary {
            prompt: Prompt::Text("1, 2, 3, 4, 5,".into()),
            max_tokens: 8,
            expect: " 6, 7".into(),
        }),
        _ => None,
    }
}

/// An embedding model's probe: two paraphrases and an unrelated sentence. Every vector must
/// have the model's length and unit length, and the paraphrases must be clearly closer to each
/// other than to the unrelated sentence.
const EMBEDDING_CANARY: [&str; 3] = [
    "The cat sits on the mat.",
    "A cat is sitting on a mat.",
    "Stock markets fell sharply on Monday.",
];

/// How much closer (cosine) the paraphrases must be than the unrelated pair.
const EMBEDDING_MARGIN: f32 = 0.2;

/// Why an embedding probe's answer is wrong, if it is.
pub(crate) fn check_embeddings(vectors: &[Vec<f32>], dimensions: u32) -> Result<(), String> {
    if vectors.len() != EMBEDDING_CANARY.len() {
        return Err(format!(
            "{} vectors for {} texts",
            vectors.len(),
            EMBEDDING_CANARY.len()
        ));
    }
    for v in vectors {
        if v.len() != dimensions as usize {
            return Err(format!("a vector of {} numbers, not {dimensions}", v.len()));
        }
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        if !(norm - 1.0).abs().lt(&1e-3) {
            return Err(format!("a vector of length {norm}, not 1"));
        }
    }
    let cos = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    let (close, far) = (cos(&vectors[0], &vectors[1]), cos(&vectors[0], &vectors[2]));
    if close < far + EMBEDDING_MARGIN {
        return Err(format!(
            "paraphrases at cosine {close:.3}, an unrelated sentence at {far:.3}"
        ));
    }
    Ok(())
}

/// For models without a known answer the probe checks liveness only: some text comes back.
fn liveness_canary() -> Canary {
    Canary {
        prompt: Prompt::Text("Hello".into()),
        max_tokens: 4,
        expect: String::new(),
    }
}

pub(crate) async fn run(nexus: Arc<Nexus>) {
    let mut last_decay = Instant::now();
    loop {
        let now = Instant::now();
        for (node, model) in nexus.registry.probes_due(now, nexus.config.probe_interval) {
            let nexus = nexus.clone();
            tokio::spawn(async move {
                let outcome = probe(&nexus, node, &model).await;
                match outcome {
                    Outcome::ProbePassed => tracing::debug!(%node, %model, "probe passed"),
                    other => tracing::warn!(%node, %model, outcome = ?other, "probe failed"),
                }
                if let Some((address, score)) = nexus.registry.probe_result(node, &model, outcome) {
                    nexus.db.save_reputation(&address, score).await;
                }
            });
        }
        if last_decay.elapsed() >= Duration::from_secs(60) {
            for (address, score) in nexus.registry.decay_reputations(last_decay.elapsed()) {
                nexus.db.save_reputation(&address, score).await;
            }
            last_decay = Instant::now();
        }
        tokio::select! {
            () = tokio::time::sleep(nexus.config.probe_tick) => {}
            () = nexus.health_kick.notified() => {}
        }
    }
}

async fn probe(nexus: &Nexus, node: lattice_router::NodeId, model: &str) -> Outcome {
    let Some((link, live)) = nexus.registry.link(node) else {
        return Outcome::Failure;
    };
    let dimensions = nexus.registry.dimensions(node, model);
    let canary = match dimensions {
        Some(_) => Canary {
            prompt: Prompt::Embed(EMBEDDING_CANARY.map(str::to_owned).to_vec()),
            max_tokens: 0,
            expect: String::new(),
        },
        None => nexus.config.canary(model).unwrap_or_else(liveness_canary),
    };
    let req = GenerateRequest {
        // Unique: several of a node's models may be probed at once.
        request_id: format!("probe-{node}-{}", PROBES.fetch_add(1, Ordering::Relaxed)),
        model: model.to_owned(),
        prompt: canary.prompt.clone(),
        params: SamplingParams {
            temperature: 0.0,
            max_tokens: Some(canary.max_tokens),
            ..SamplingParams::default()
        },
        preference: Preference::default(),
        // A (zero) user makes the node sign a receipt, which the probe checks.
        user: Some(lattice_link::NO_USER.to_owned()),
        payer: None,
        conversation: None,
        whole: true,
    };
    let deadline = Instant::now() + nexus.config.probe_timeout;
    // Counted in flight like a user's request (it takes a slot); dropped unfinished (a probe
    // timing out mid-answer), it cancels the node's work.
    let mut dispatch = Dispatch::new(link, live);
    let (first, mut rx, early) = match attempt(&mut dispatch, &req, deadline).await {
        Attempt::Started { first, rx, receipt } => (first, rx, receipt),
        Attempt::Failed { .. } => return Outcome::Failure,
    };
    let signed_by_node = |r: &lattice_link::UsageReceipt| {
        nexus
            .registry
            .address_price(node)
            .is_some_and(|(address, _)| r.verify(&address).is_ok())
    };
    let mut receipt = early.as_ref().is_some_and(signed_by_node);
    let mut text = String::new();
    let mut vectors = Vec::new();
    let mut ev = Some(LinkEvent::Engine(first));
    let finished = loop {
        match ev {
            Some(LinkEvent::Engine(Event::Delta(d))) => text.push_str(&d),
            Some(LinkEvent::Engine(Event::Logprobs(_) | Event::Ending)) => {}
            Some(LinkEvent::Engine(Event::Embedding(v))) => vectors.push(v),
            // Probes also check that the node signs its receipts with its registered key.
            Some(LinkEvent::Engine(Event::Done { .. })) => {
                dispatch.ended();
                break receipt;
            }
            Some(LinkEvent::Receipt(r)) => {
                receipt = signed_by_node(&r);
                if !receipt {
                    break false;
                }
            }
            Some(LinkEvent::Error(_)) => {
                dispatch.ended();
                break false;
            }
            // The link closed, or the deadline passed (the dispatch cancels the node's work).
            None => break false,
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        ev = tokio::time::timeout(remaining, rx.recv())
            .await
            .ok()
            .flatten();
    };
    drop(dispatch);
    if !finished {
        return Outcome::Failure;
    }
    if let Some(d) = dimensions {
        return match check_embeddings(&vectors, d) {
            Ok(()) => Outcome::ProbePassed,
            Err(why) => {
                tracing::warn!(%node, %model, %why, "wrong embeddings for the canary texts");
                Outcome::ProbeWrong
            }
        };
    }
    if text.contains(&canary.expect) && !text.is_empty() {
        Outcome::ProbePassed
    } else {
        tracing::warn!(%node, %model, answer = %text, expected = %canary.expect, "wrong canary answer");
        Outcome::ProbeWrong
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(v: &[f32]) -> Vec<f32> {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / n).collect()
    }

    #[test]
    fn embedding_probes_check_shape_length_and_meaning() {
        let good = vec![
            unit(&[1.0, 0.0, 0.0, 0.0]),
            unit(&[0.9, 0.4, 0.0, 0.0]),
            unit(&[0.1, 0.0, 1.0, 0.0]),
        ];
        assert_eq!(check_embeddings(&good, 4), Ok(()));
        // Too few vectors, the wrong length, not unit length.
        assert!(check_embeddings(&good[..2], 4).is_err());
        assert!(check_embeddings(&good, 5).is_err());
        let mut long = good.clone();
        long[1] = vec![0.9, 0.4, 0.0, 0.0];
        assert!(check_embeddings(&long, 4).unwrap_err().contains("length"));
        // A model that cannot tell a paraphrase from an unrelated sentence (here: every vector
        // the same, as a constant or broken model gives) is wrong.
        let same = vec![unit(&[1.0, 1.0, 0.0, 0.0]); 3];
        assert!(
            check_embeddings(&same, 4)
                .unwrap_err()
                .contains("paraphrases")
        );
        let swapped = vec![good[0].clone(), good[2].clone(), good[1].clone()];
        assert!(check_embeddings(&swapped, 4).is_err());
    }
}
