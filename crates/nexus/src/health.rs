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
    let canary = nexus.config.canary(model).unwrap_or_else(liveness_canary);
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
    let mut ev = Some(LinkEvent::Engine(first));
    let finished = loop {
        match ev {
            Some(LinkEvent::Engine(Event::Delta(d))) => text.push_str(&d),
            Some(LinkEvent::Engine(Event::Logprobs(_) | Event::Ending)) => {}
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
    if text.contains(&canary.expect) && !text.is_empty() {
        Outcome::ProbePassed
    } else {
        tracing::warn!(%node, %model, answer = %text, expected = %canary.expect, "wrong canary answer");
        Outcome::ProbeWrong
    }
}
