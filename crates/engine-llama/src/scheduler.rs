//! The decode loop. Each step admits waiting requests into free slots, drops slots whose client
//! went away, then feeds one token per generating slot plus prompt chunks to a single decode.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError};

use lattice_engine::{
    EngineError, Event, FinishReason, SamplingParams, StopMatcher, TokenLogprob, Usage, Utf8Decoder,
};
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use tokio::sync::mpsc::UnboundedSender;

use crate::Shared;

pub(crate) struct Config {
    pub(crate) threads: u32,
    pub(crate) threads_batch: u32,
    pub(crate) parallel: u32,
    pub(crate) ctx_per_slot: u32,
    pub(crate) batch_size: u32,
}

/// A tokenized request waiting for a slot. The event channel is bounded by `max_tokens + 1`
/// messages because the decode loop sends at most one delta per generated token.
pub(crate) struct Job {
    pub(crate) request_id: String,
    pub(crate) tokens: Vec<LlamaToken>,
    pub(crate) params: SamplingParams,
    /// Built by the caller from `params` ([`crate::sampler::build`]).
    pub(crate) sampler: crate::sampler::Sampler,
    pub(crate) max_tokens: u32,
    pub(crate) events: UnboundedSender<Result<Event, EngineError>>,
    /// [`WAITING`], [`TAKEN`] or [`ABANDONED`]: a job leaves the `queued` count exactly once,
    /// by whichever side (this thread taking it, or its caller giving up) moves it first.
    pub(crate) state: Arc<AtomicU8>,
}

/// A job waits in the queue.
pub(crate) const WAITING: u8 = 0;
/// The engine thread took it from the queue.
const TAKEN: u8 = 1;
/// Its caller dropped its events while it waited (this thread skips it when it comes to it).
pub(crate) const ABANDONED: u8 = 2;

struct Active {
    job: Job,
    /// Index of the next prompt token to feed.
    prefill_pos: usize,
    /// Sampled but not yet decoded (its KV is not in the cache yet).
    pending: Option<LlamaToken>,
    generated: u32,
    utf8: Utf8Decoder,
    stop: StopMatcher,
    /// Batch index holding this slot's logits after the current decode.
    logits_at: Option<i32>,
    /// Log probabilities of tokens whose text is not sent yet (with `params.logprobs`).
    logprobs: Vec<TokenLogprob>,
}

struct Slot {
    seq: i32,
    /// Tokens whose KV entries are in this sequence's cache, kept after a request ends so the
    /// next request sharing the prefix (a continuing conversation) skips recomputing it.
    cached: Vec<LlamaToken>,
    active: Option<Active>,
}

pub(crate) fn run(
    backend: &LlamaBackend,
    model: &LlamaModel,
    cfg: &Config,
    jobs: &Receiver<Job>,
    shared: &Shared,
    ready: &SyncSender<Result<(), String>>,
) {
    let threads = i32::try_from(cfg.threads).unwrap_or(1);
    let threads_batch = i32::try_from(cfg.threads_batch).unwrap_or(threads);
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(
            cfg.ctx_per_slot.saturating_mul(cfg.parallel),
        ))
        .with_n_batch(cfg.batch_size)
        .with_n_ubatch(cfg.batch_size)
        .with_n_seq_max(cfg.parallel)
        .with_kv_unified(false)
        .with_n_threads(threads)
        .with_n_threads_batch(threads_batch);
    let mut ctx = match model.new_context(backend, params) {
        Ok(c) => c,
        Err(e) => {
            let _ = ready.send(Err(e.to_string()));
            return;
        }
    };
    let batch_cap = usize::try_from(cfg.batch_size).unwrap_or(512);
    let mut batch = LlamaBatch::new(batch_cap, 1);
    let mut slots: Vec<Slot> = (0..cfg.parallel)
        .map(|i| Slot {
            seq: i32::try_from(i).unwrap_or(0),
            cached: Vec::new(),
            active: None,
        })
        .collect();
    let _ = ready.send(Ok(()));

    loop {
        if !admit(&mut ctx, &mut slots, jobs, shared) {
            return;
        }
        drop_cancelled(&mut slots);
        publish_busy(&slots, shared);
        if slots.iter().all(|s| s.active.is_none()) {
            continue;
        }
        fill_batch(&mut batch, &mut slots, batch_cap);
        if batch.n_tokens() == 0 {
            continue;
        }
        if let Err(e) = ctx.decode(&mut batch) {
            tracing::error!(error = %e, "llama_decode failed; failing the requests in this batch");
            fail_batch(&mut ctx, &mut slots, &format!("decode failed: {e}"));
            continue;
        }
        shared.decodes.fetch_add(1, Ordering::Relaxed);
        sample_and_emit(model, &ctx, &mut slots);
        publish_busy(&slots, shared);
    }
}

fn publish_busy(slots: &[Slot], shared: &Shared) {
    shared.busy.store(
        slots.iter().filter(|s| s.active.is_some()).count(),
        Ordering::Release,
    );
}

/// Moves waiting jobs into free slots. Blocks while nothing is running. Returns false when
/// the engine is dropped and all work is done.
fn admit(
    ctx: &mut LlamaContext<'_>,
    slots: &mut [Slot],
    jobs: &Receiver<Job>,
    shared: &Shared,
) -> bool {
    loop {
        let idle = slots.iter().all(|s| s.active.is_none());
        if !slots.iter().any(|s| s.active.is_none()) {
            return true;
        }
        let job = if idle {
            match jobs.recv() {
                Ok(j) => j,
                Err(_) => return false,
            }
        } else {
            match jobs.try_recv() {
                Ok(j) => j,
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => return true,
            }
        };
        if job
            .state
            .compare_exchange(WAITING, TAKEN, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            // Given up while it waited, and uncounted then.
            continue;
        }
        shared.queued.fetch_sub(1, Ordering::AcqRel);
        if job.events.is_closed() {
            continue;
        }
        start(ctx, slots, job);
    }
}

/// Picks the free slot whose cache shares the longest prefix with the prompt and reuses it.
fn start(ctx: &mut LlamaContext<'_>, slots: &mut [Slot], job: Job) {
    let best = slots
        .iter_mut()
        .filter(|s| s.active.is_none())
        .map(|s| {
            let common = s
                .cached
                .iter()
                .zip(&job.tokens)
                .take_while(|(a, b)| a == b)
                .count();
            (common, s)
        })
        .max_by_key(|(common, _)| *common);
    let Some((common, slot)) = best else { return };
    // At least one prompt token must be decoded to get logits for the first sample.
    let mut reuse = common.min(job.tokens.len().saturating_sub(1));
    if reuse < slot.cached.len() {
        let from = u32::try_from(reuse).ok();
        if ctx.kv_cache_seq_rm(slot.seq, from, None).is_err() {
            // Some caches (e.g. sliding-window attention) cannot drop a suffix: start over.
            let _ = ctx.kv_cache_seq_rm(slot.seq, None, None);
            reuse = 0;
        }
        slot.cached.truncate(reuse);
    }
    tracing::debug!(request_id = %job.request_id, seq = slot.seq, reused = reuse,
        prompt = job.tokens.len(), "request admitted");
    let stop = StopMatcher::new(job.params.stop.clone());
    slot.active = Some(Active {
        job,
        prefill_pos: reuse,
        pending: None,
        generated: 0,
        utf8: Utf8Decoder::default(),
        stop,
        logits_at: None,
        logprobs: Vec::new(),
    });
}

fn drop_cancelled(slots: &mut [Slot]) {
    for slot in slots {
        if slot
            .active
            .as_ref()
            .is_some_and(|a| a.job.events.is_closed())
            && let Some(a) = slot.active.take()
        {
            tracing::debug!(request_id = %a.job.request_id, "client went away; slot freed");
        }
    }
}

/// One token per generating slot first (they are latency-critical), then prompt chunks.
fn fill_batch(batch: &mut LlamaBatch<'_>, slots: &mut [Slot], cap: usize) {
    batch.clear();
    for slot in slots.iter_mut() {
        let seq = slot.seq;
        let Some(a) = slot.active.as_mut() else {
            continue;
        };
        a.logits_at = None;
        if let Some(tok) = a.pending.take() {
            let pos = i32::try_from(slot.cached.len()).unwrap_or(i32::MAX);
            let at = batch.n_tokens();
            if batch.add(tok, pos, &[seq], true).is_ok() {
                slot.cached.push(tok);
                a.logits_at = Some(at);
            } else {
                a.pending = Some(tok);
            }
        }
    }
    for slot in slots.iter_mut() {
        let seq = slot.seq;
        let Some(a) = slot.active.as_mut() else {
            continue;
        };
        let prompt_len = a.job.tokens.len();
        while a.prefill_pos < prompt_len && usize::try_from(batch.n_tokens()).unwrap_or(cap) < cap {
            let Some(&tok) = a.job.tokens.get(a.prefill_pos) else {
                break;
            };
            let last = a.prefill_pos + 1 == prompt_len;
            let pos = i32::try_from(a.prefill_pos).unwrap_or(i32::MAX);
            let at = batch.n_tokens();
            if batch.add(tok, pos, &[seq], last).is_err() {
                break;
            }
            slot.cached.push(tok);
            a.prefill_pos += 1;
            if last {
                a.logits_at = Some(at);
            }
        }
    }
}

fn fail_batch(ctx: &mut LlamaContext<'_>, slots: &mut [Slot], msg: &str) {
    for slot in slots {
        if slot
            .active
            .as_ref()
            .is_some_and(|a| a.logits_at.is_some() || a.prefill_pos > 0)
        {
            if let Some(a) = slot.active.take() {
                let _ = a
                    .job
                    .events
                    .send(Err(EngineError::Internal(msg.to_owned())));
            }
            let _ = ctx.kv_cache_seq_rm(slot.seq, None, None);
            slot.cached.clear();
        }
    }
}

fn sample_and_emit(model: &LlamaModel, ctx: &LlamaContext<'_>, slots: &mut [Slot]) {
    let vocab = model.vocab();
    for slot in slots.iter_mut() {
        let Some(a) = slot.active.as_mut() else {
            continue;
        };
        let Some(at) = a.logits_at.take() else {
            continue;
        };
        let tok = a.job.sampler.sample(ctx, at);
        let finish = if let Some(tok) = tok.filter(|&t| !vocab.is_eog(t) || a.job.params.ignore_eos)
        {
            a.generated += 1;
            if let Some(k) = a.job.params.logprobs {
                let logits = ctx.get_logits_ith(at);
                a.logprobs
                    .push(crate::logprobs::token_logprob(&vocab, logits, tok, k));
                // Tokens without text (special ones, with `ignore_eos`) must not pile up into
                // one event: flushed on their own past a bound.
                if a.logprobs.len() >= MAX_PENDING_LOGPROBS {
                    let tokens = std::mem::take(&mut a.logprobs);
                    let _ = a.job.events.send(Ok(Event::Logprobs(tokens)));
                }
            }
            let text = a.utf8.push(&vocab.token_to_piece(tok, false, None));
            let out = a.stop.push(&text);
            if !out.emit.is_empty() {
                send_text(a, out.emit);
            }
            if out.stopped {
                Some((FinishReason::Stop, true))
            } else if a.generated >= a.job.max_tokens {
                Some((FinishReason::Length, false))
            } else {
                a.pending = Some(tok);
                None
            }
        } else {
            Some((FinishReason::Stop, false))
        };
        if let Some((reason, matched_stop)) = finish
            && let Some(a) = slot.active.take()
        {
            finish_request(a, reason, matched_stop);
        }
    }
}

/// Most tokens whose log probabilities wait for text (a stop sequence being matched, a
/// character being completed) before they are sent anyway.
const MAX_PENDING_LOGPROBS: usize = 64;

/// Sends text, after the log probabilities of the tokens it came from when they were asked for
/// (those of tokens held back as a possible stop sequence and then dropped are never sent).
fn send_text(a: &mut Active, text: String) {
    if !a.logprobs.is_empty() {
        let tokens = std::mem::take(&mut a.logprobs);
        let _ = a.job.events.send(Ok(Event::Logprobs(tokens)));
    }
    let _ = a.job.events.send(Ok(Event::Delta(text)));
}

fn finish_request(mut a: Active, reason: FinishReason, matched_stop: bool) {
    if !matched_stop {
        // Held-back text turned out not to start a stop sequence: deliver it.
        let tail = a.utf8.finish();
        let out = a.stop.push(&tail);
        let mut rest = out.emit;
        if !out.stopped {
            rest.push_str(&a.stop.finish());
        }
        if !rest.is_empty() {
            send_text(&mut a, rest);
        } else if !a.logprobs.is_empty() {
            // Tokens without text at the end (special tokens with `ignore_eos`).
            let tokens = std::mem::take(&mut a.logprobs);
            let _ = a.job.events.send(Ok(Event::Logprobs(tokens)));
        }
    }
    let prompt_tokens = u32::try_from(a.job.tokens.len()).unwrap_or(u32::MAX);
    let _ = a.job.events.send(Ok(Event::Done {
        finish_reason: reason,
        usage: Usage::new(prompt_tokens, a.generated),
    }));
}
