//! Turns an engine event stream into OpenAI responses: SSE chunks in OpenAI's exact format or
//! one JSON body, while recording time-to-first-token and decode speed.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use lattice_api::{
    ApiError, AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionChunk, ChunkChoice,
    Completion, CompletionChoice, Delta, FinishReason, FunctionCall, FunctionCallDelta, ToolCall,
    ToolCallDelta, Usage, UsageField,
};
use lattice_engine::{EngineError, Event, EventStream, TokenLogprob, Utf8Decoder};
use serde_json::{Value, json};

use crate::AppState;
use crate::tools::{self, Answer, ReplyStream};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Chat,
    Completion,
}

impl Kind {
    pub(crate) fn endpoint(self) -> &'static str {
        match self {
            Kind::Chat => "chat_completions",
            Kind::Completion => "completions",
        }
    }
}

/// Fields repeated in every chunk of one response's answer.
#[derive(Clone)]
pub(crate) struct Meta {
    pub(crate) id: String,
    pub(crate) created: u64,
    pub(crate) model: String,
    pub(crate) kind: Kind,
    pub(crate) include_usage: bool,
    /// The answer is in the tools' JSON shape ([`tools`]): read back into a reply or calls.
    pub(crate) tools: bool,
    /// The request asked for log probabilities (a whole answer lists them even when empty).
    pub(crate) logprobs: bool,
    /// The answer's place among the response's `choices` (`n`, prompt lists).
    pub(crate) index: u32,
    /// Completions' `echo`: the prompt, given back before the answer.
    pub(crate) echo: Option<String>,
}

pub(crate) fn engine_error(e: &EngineError) -> ApiError {
    match e {
        EngineError::InvalidRequest(m) => ApiError::invalid_request(m.clone()),
        EngineError::ContextOverflow {
            prompt_tokens,
            max_tokens,
            limit,
        } => ApiError::context_length_exceeded(*prompt_tokens, *max_tokens, *limit),
        EngineError::Overloaded { capacity } => ApiError::overloaded(format!(
            "The node is at capacity ({capacity} requests already waiting); retry shortly."
        )),
        EngineError::Upstream(m) => ApiError::upstream(m.clone()),
        EngineError::Unavailable(m) => ApiError::overloaded(m.clone()),
        EngineError::Internal(m) => ApiError::internal(m.clone()),
        EngineError::PaymentRequired(m) => ApiError::payment_required(m.clone()),
    }
}

/// Records one request's outcome exactly once, including when the client goes away.
pub(crate) struct Tracker {
    st: Arc<AppState>,
    kind: Kind,
    request_id: String,
    started: Instant,
    first: Option<Instant>,
    done: bool,
    /// One answer of several: only logged; the request's own tracker records the metrics.
    quiet: bool,
}

impl Tracker {
    pub(crate) fn new(st: Arc<AppState>, kind: Kind, request_id: String, started: Instant) -> Self {
        Self {
            st,
            kind,
            request_id,
            started,
            first: None,
            done: false,
            quiet: false,
        }
    }

    /// The tracker of one answer of several: it records no metrics (the request's tracker
    /// records the request once, with the answers' summed tokens).
    pub(crate) fn quiet(mut self) -> Self {
        self.quiet = true;
        self
    }

    fn on_delta(&mut self) {
        if self.first.is_none() {
            self.on_first(Instant::now());
        }
    }

    /// The first token came at `at` (the earliest of several answers').
    fn on_first(&mut self, at: Instant) {
        self.first = Some(at);
        if !self.quiet {
            self.st
                .metrics
                .first_token(at.saturating_duration_since(self.started).as_secs_f64());
        }
    }

    fn on_done(&mut self, usage: &Usage) {
        self.done = true;
        tracing::debug!(request_id = %self.request_id, prompt = usage.prompt_tokens,
            completion = usage.completion_tokens, "request finished");
        if self.quiet {
            return;
        }
        let now = Instant::now();
        let decode = self
            .first
            .map(|f| now.duration_since(f).as_secs_f64())
            .unwrap_or(0.0);
        self.st.metrics.finished(
            usage.prompt_tokens,
            usage.completion_tokens,
            decode,
            now.duration_since(self.started).as_secs_f64(),
        );
        self.st.metrics.request(self.kind.endpoint(), "ok");
    }

    /// The request failed after answers worth `usage` ended (several answers): their tokens
    /// count, the request is an error.
    fn on_error_after(&mut self, usage: &Usage, e: &EngineError) {
        if !self.quiet && usage.total_tokens > 0 {
            let now = Instant::now();
            let decode = self
                .first
                .map_or(0.0, |f| now.duration_since(f).as_secs_f64());
            let total = now.duration_since(self.started).as_secs_f64();
            let metrics = &self.st.metrics;
            metrics.finished(usage.prompt_tokens, usage.completion_tokens, decode, total);
        }
        self.on_error(e);
    }

    fn on_error(&mut self, e: &EngineError) {
        if !self.quiet {
            self.st.metrics.request(self.kind.endpoint(), "error");
        }
        self.done = true;
        tracing::warn!(request_id = %self.request_id, error = %e, "request failed mid-generation");
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        if !self.done {
            if !self.quiet {
                self.st.metrics.request(self.kind.endpoint(), "cancelled");
            }
            tracing::debug!(request_id = %self.request_id, "client disconnected; generation cancelled");
        }
    }
}

/// One answer read whole.
struct Whole {
    reply: Reply,
    logprobs: Option<Value>,
    usage: Usage,
    /// Mean log probability per token (`best_of`'s ranking); −∞ without tokens.
    score: f64,
    /// When its first token came.
    first: Option<Instant>,
}

/// Collects the whole answer for a non-streaming request.
pub(crate) async fn collect(
    meta: &Meta,
    events: EventStream,
    tracker: Tracker,
) -> Result<String, ApiError> {
    let w = collect_answer(meta, events, tracker).await?;
    Ok(full_body(
        meta,
        vec![(meta.index, w.reply, w.logprobs)],
        w.usage,
    ))
}

/// Reads a request's answers whole, side by side, each to its end: an answer that ends is
/// complete and paid for, so it is returned even if another fails; the request fails only if
/// every answer does (with the first answer's error). Sorted by index.
async fn collect_all(
    parts: Vec<(Meta, EventStream, Tracker)>,
    tracker: &mut Tracker,
) -> Result<Vec<(u32, Whole)>, ApiError> {
    let results = futures::future::join_all(
        parts
            .into_iter()
            .map(|(m, events, t)| async move { (m.index, collect_answer(&m, events, t).await) }),
    )
    .await;
    let mut answers = Vec::with_capacity(results.len());
    let mut failed = None;
    for (index, r) in results {
        match r {
            Ok(w) => answers.push((index, w)),
            Err(e) => {
                failed.get_or_insert(e);
            }
        }
    }
    if answers.is_empty() {
        let e = failed.unwrap_or_else(|| ApiError::internal("a request without answers"));
        tracker.on_error(&EngineError::Upstream(e.body.message.clone()));
        return Err(e);
    }
    if let Some(first) = answers.iter().filter_map(|(_, w)| w.first).min() {
        tracker.on_first(first);
    }
    answers.sort_by_key(|a| a.0);
    Ok(answers)
}

/// Collects a request's answers side by side ([`collect_all`]) and lists them under their
/// indexes. With `best` (`best_of`, `n`): prompt `p`'s answers (indexes `p * best_of …`) that
/// ended are ranked by mean log probability per token, and the `n` best are listed as answers
/// `p * n …`. Usage is the sum of every answer that ended: each was generated, and is paid
/// for, as a request of its own.
pub(crate) async fn collect_many(
    meta: &Meta,
    parts: Vec<(Meta, EventStream, Tracker)>,
    best: Option<(u32, u32)>,
    mut tracker: Tracker,
) -> Result<String, ApiError> {
    // Without `best_of` each answer is a group of one, listed at its own index.
    let (of, keep) = best.unwrap_or((1, 1));
    let answers = collect_all(parts, &mut tracker).await?;
    let mut usage = Usage::new(0, 0);
    let mut groups: std::collections::BTreeMap<u32, Vec<(u32, Whole)>> = Default::default();
    for (index, w) in answers {
        usage = add_usage(usage, w.usage);
        groups
            .entry(index / of.max(1))
            .or_default()
            .push((index, w));
    }
    let mut choices = Vec::new();
    for (prompt, mut group) in groups {
        // Best first; ties keep the generation order.
        group.sort_by(|a, b| b.1.score.total_cmp(&a.1.score).then(a.0.cmp(&b.0)));
        for (i, (_, w)) in (0u32..).zip(group).take(keep as usize) {
            choices.push((prompt * keep + i, w.reply, w.logprobs));
        }
    }
    tracker.on_done(&usage);
    Ok(full_body(meta, choices, usage))
}

fn add_usage(a: Usage, b: Usage) -> Usage {
    Usage::new(
        a.prompt_tokens.saturating_add(b.prompt_tokens),
        a.completion_tokens.saturating_add(b.completion_tokens),
    )
}

async fn collect_answer(
    meta: &Meta,
    mut events: EventStream,
    mut tracker: Tracker,
) -> Result<Whole, ApiError> {
    let mut text = meta.echo.clone().unwrap_or_default();
    let mut logprobs: Vec<TokenLogprob> = Vec::new();
    while let Some(ev) = events.next().await {
        match ev {
            Ok(Event::Delta(d)) => {
                tracker.on_delta();
                text.push_str(&d);
            }
            Ok(Event::Logprobs(l)) => logprobs.extend(l),
            // Embeddings come only for `Prompt::Embed`, never in a text answer.
            Ok(Event::Ending | Event::Embedding(_)) => {}
            Ok(Event::Done {
                finish_reason,
                usage,
            }) => {
                tracker.on_done(&usage);
                let reply = if meta.tools {
                    reply(tools::answer(&text), finish_reason)
                } else {
                    (Some(text), None, finish_reason)
                };
                let score = mean_logprob(&logprobs);
                let logprobs = meta
                    .logprobs
                    .then(|| logprobs_json(meta.kind, &logprobs, &mut Offsets::default()));
                return Ok(Whole {
                    reply,
                    logprobs,
                    usage,
                    score,
                    first: tracker.first,
                });
            }
            Err(e) => {
                tracker.on_error(&e);
                return Err(engine_error(&e));
            }
        }
    }
    let e = EngineError::Internal("the engine ended the stream without finishing".into());
    tracker.on_error(&e);
    Err(engine_error(&e))
}

/// The mean of the tokens' log probabilities; −∞ for none (an empty answer ranks last), and a
/// token whose log probability is not a number counts as −∞.
fn mean_logprob(tokens: &[TokenLogprob]) -> f64 {
    if tokens.is_empty() {
        return f64::NEG_INFINITY;
    }
    let sum: f64 = tokens
        .iter()
        .map(|t| f64::from(t.logprob))
        .map(|l| if l.is_nan() { f64::NEG_INFINITY } else { l })
        .sum();
    sum / tokens.len() as f64
}

/// A chat answer's content, tool calls and finish reason.
type Reply = (Option<String>, Option<Vec<ToolCall>>, FinishReason);

/// An answer in the tools' shape as OpenAI's message: content, or calls with fresh ids.
fn reply(answer: Answer, finish: FinishReason) -> Reply {
    match answer {
        Answer::Content(text) | Answer::Raw(text) => (Some(text), None, finish),
        Answer::Calls { calls, complete } => (
            None,
            Some(
                calls
                    .into_iter()
                    .map(|(name, arguments)| ToolCall {
                        id: call_id(),
                        kind: "function".into(),
                        function: FunctionCall { name, arguments },
                    })
                    .collect(),
            ),
            if complete {
                FinishReason::ToolCalls
            } else {
                finish
            },
        ),
    }
}

/// OpenAI's form: `call_` and 24 characters.
fn call_id() -> String {
    let mut id = uuid::Uuid::new_v4().simple().to_string();
    id.truncate(24);
    format!("call_{id}")
}

fn full_body(meta: &Meta, choices: Vec<(u32, Reply, Option<Value>)>, usage: Usage) -> String {
    let json = match meta.kind {
        Kind::Chat => serde_json::to_string(&ChatCompletion {
            id: meta.id.clone(),
            object: "chat.completion".into(),
            created: meta.created,
            model: meta.model.clone(),
            choices: choices
                .into_iter()
                .map(
                    |(index, (content, tool_calls, finish_reason), logprobs)| ChatChoice {
                        index,
                        message: AssistantMessage {
                            role: "assistant".into(),
                            content,
                            tool_calls,
                        },
                        logprobs,
                        finish_reason: Some(finish_reason),
                    },
                )
                .collect(),
            usage,
            system_fingerprint: None,
        }),
        Kind::Completion => serde_json::to_string(&Completion {
            id: meta.id.clone(),
            object: "text_completion".into(),
            created: meta.created,
            model: meta.model.clone(),
            choices: choices
                .into_iter()
                .map(
                    |(index, (content, _, finish_reason), logprobs)| CompletionChoice {
                        text: content.unwrap_or_default(),
                        index,
                        logprobs,
                        finish_reason: Some(finish_reason),
                    },
                )
                .collect(),
            usage: UsageField::Some(usage),
        }),
    };
    json.unwrap_or_default()
}

enum Phase {
    Start,
    Streaming,
    Finished,
}

struct SseState {
    meta: Meta,
    /// Encodes the content chunks, most of a stream.
    delta: DeltaTemplate,
    events: EventStream,
    tracker: Tracker,
    phase: Phase,
    /// Reads an answer in the tools' shape (`meta.tools`).
    reply: Option<ReplyStream>,
    /// Log probabilities of the tokens of the next delta.
    logprobs: Vec<TokenLogprob>,
    /// Where the next token starts in the text (completions' `text_offset`).
    offset: Offsets,
    /// One answer of several ([`sse_many`]): its end is reported, not written.
    part: bool,
    /// The answer's usage once it is done (`part`).
    usage: Option<Usage>,
    /// The error the answer ended with (its error frame is written, or with `part` left to
    /// [`sse_many`]).
    failed: Option<EngineError>,
}

/// A body frame of one answer.
struct Frame {
    bytes: Bytes,
    /// The answer's usage, with its last frame ([`SseState::part`]).
    done: Option<Usage>,
    /// The answer failed with this error (its event ends the frame, or with
    /// [`SseState::part`] is left to [`sse_many`]); the answer is over.
    failed: Option<EngineError>,
    /// The answer's first token came (at this or an earlier frame).
    first: Option<Instant>,
}

/// The SSE body: `data: {chunk}\n\n` per event, then `data: [DONE]\n\n`.
pub(crate) fn sse(
    meta: Meta,
    events: EventStream,
    tracker: Tracker,
) -> impl futures::Stream<Item = Result<Bytes, Infallible>> + Send {
    frames(meta, events, tracker, false).map(|f| Ok(f.bytes))
}

/// The SSE body of several answers generated side by side: each answer's chunks carry its
/// index and come as they are made; after the last answer's end, the usage chunk (the ended
/// answers' sum) and `data: [DONE]`. An answer that fails stops there, and the others go on to
/// their ends (each is paid for when it ends, so none is cut short); the body then ends with
/// the first failure's error event instead of `[DONE]`.
pub(crate) fn sse_many(
    meta: Meta,
    parts: Vec<(Meta, EventStream, Tracker)>,
    tracker: Tracker,
) -> impl futures::Stream<Item = Result<Bytes, Infallible>> + Send {
    struct Merge {
        meta: Meta,
        all: futures::stream::SelectAll<futures::stream::BoxStream<'static, Frame>>,
        left: usize,
        usage: Usage,
        over: bool,
        tracker: Tracker,
        /// The first answer that failed.
        failed: Option<EngineError>,
    }
    let left = parts.len();
    let all = futures::stream::select_all(
        parts
            .into_iter()
            .map(|(m, events, tracker)| frames(m, events, tracker, true).boxed()),
    );
    let merge = Merge {
        meta,
        all,
        left,
        usage: Usage::new(0, 0),
        over: false,
        tracker,
        failed: None,
    };
    futures::stream::unfold(merge, |mut m| async move {
        if m.over {
            return None;
        }
        let Some(f) = m.all.next().await else {
            // Every answer reports its end or its failure before it stops; this is a bug.
            m.over = true;
            let e = EngineError::Internal("an answer ended without finishing".into());
            m.tracker.on_error(&e);
            return Some((Ok(error_frame(&engine_error(&e))), m));
        };
        if let (None, Some(at)) = (m.tracker.first, f.first) {
            m.tracker.on_first(at);
        }
        match (f.failed, f.done) {
            (Some(e), _) => {
                m.failed.get_or_insert(e);
            }
            (None, Some(usage)) => m.usage = add_usage(m.usage, usage),
            (None, None) => return Some((Ok(f.bytes), m)),
        }
        m.left = m.left.saturating_sub(1);
        if m.left > 0 {
            return Some((Ok(f.bytes), m));
        }
        m.over = true;
        let mut out = Vec::from(f.bytes);
        if m.meta.include_usage {
            out.extend_from_slice(&usage_chunk(&m.meta, m.usage));
        }
        match m.failed.take() {
            Some(e) => {
                m.tracker.on_error_after(&m.usage, &e);
                out.extend_from_slice(&error_frame(&engine_error(&e)));
            }
            None => {
                m.tracker.on_done(&m.usage);
                out.extend_from_slice(b"data: [DONE]\n\n");
            }
        }
        Some((Ok(Bytes::from(out)), m))
    })
}

/// One answer's body frames (`part`: one answer of several, see [`SseState::part`]).
fn frames(
    meta: Meta,
    events: EventStream,
    tracker: Tracker,
    part: bool,
) -> impl futures::Stream<Item = Frame> + Send {
    let state = SseState {
        delta: DeltaTemplate::new(&meta),
        reply: meta.tools.then(ReplyStream::default),
        logprobs: Vec::new(),
        offset: Offsets::default(),
        meta,
        events,
        tracker,
        phase: Phase::Start,
        part,
        usage: None,
        failed: None,
    };
    futures::stream::unfold(state, |mut s| async move {
        let bytes = match s.phase {
            Phase::Finished => return None,
            Phase::Start => {
                s.phase = Phase::Streaming;
                if s.meta.kind == Kind::Chat {
                    role_chunk(&s.meta)
                } else if let Some(echo) = s.meta.echo.take().filter(|e| !e.is_empty()) {
                    let mut out = Vec::new();
                    s.delta.write(&echo, &mut out);
                    Bytes::from(out)
                } else {
                    next_frame(&mut s).await
                }
            }
            Phase::Streaming => next_frame(&mut s).await,
        };
        let frame = Frame {
            bytes,
            done: s.usage.take(),
            failed: s.failed.take(),
            first: s.tracker.first,
        };
        Some((frame, s))
    })
}

/// Most bytes of events that are already here joined into one body frame.
const JOIN_BYTES: usize = 16 << 10;

/// The next body frame: the next event's SSE bytes, and those of the events that are already
/// here after it (a node's frame often carries several). The client reads the same SSE events;
/// the server writes one body chunk for them instead of one each.
async fn next_frame(s: &mut SseState) -> Bytes {
    let mut out = Vec::new();
    let mut ev = s.events.next().await;
    // Nothing to write for it, and its `Done` takes a moment (Nexus pays for the answer).
    while matches!(ev, Some(Ok(Event::Ending))) {
        ev = s.events.next().await;
    }
    push_event(s, ev, &mut out);
    while matches!(s.phase, Phase::Streaming) && out.len() < JOIN_BYTES {
        match s.events.next().now_or_never() {
            Some(ev) => push_event(s, ev, &mut out),
            None => break,
        }
    }
    Bytes::from(out)
}

/// Appends an event's SSE bytes (`None`: the engine's stream ended).
fn push_event(s: &mut SseState, ev: Option<Result<Event, EngineError>>, out: &mut Vec<u8>) {
    match ev {
        Some(Ok(Event::Ending | Event::Embedding(_))) => {}
        Some(Ok(Event::Logprobs(l))) => s.logprobs.extend(l),
        Some(Ok(Event::Delta(text))) => {
            s.tracker.on_delta();
            match &mut s.reply {
                None if !s.logprobs.is_empty() => {
                    let l = logprobs_json(s.meta.kind, &s.logprobs, &mut s.offset);
                    s.logprobs.clear();
                    out.extend_from_slice(&logprobs_chunk(&s.meta, text, l));
                }
                None => s.delta.write(&text, out),
                Some(r) => {
                    let shown = r.push(&text);
                    if !shown.is_empty() {
                        s.delta.write(&shown, out);
                    }
                }
            }
        }
        Some(Ok(Event::Done {
            mut finish_reason,
            usage,
        })) => {
            s.tracker.on_done(&usage);
            s.phase = Phase::Finished;
            if !s.logprobs.is_empty() {
                let l = logprobs_json(s.meta.kind, &s.logprobs, &mut s.offset);
                out.extend_from_slice(&logprobs_chunk(&s.meta, String::new(), l));
            }
            if let Some(r) = s.reply.take() {
                let (content, calls, finish) = reply(r.finish(), finish_reason);
                if let Some(text) = content.filter(|t| !t.is_empty()) {
                    s.delta.write(&text, out);
                }
                if let Some(calls) = calls {
                    out.extend_from_slice(&tool_calls_chunk(&s.meta, calls));
                }
                finish_reason = finish;
            }
            finish_chunk(&s.meta, finish_reason, out);
            if s.part {
                s.usage = Some(usage);
                return;
            }
            if s.meta.include_usage {
                out.extend_from_slice(&usage_chunk(&s.meta, usage));
            }
            out.extend_from_slice(b"data: [DONE]\n\n");
        }
        Some(Err(e)) => {
            s.tracker.on_error(&e);
            s.phase = Phase::Finished;
            if !s.part {
                out.extend_from_slice(&error_frame(&engine_error(&e)));
            }
            s.failed = Some(e);
        }
        None => {
            let e = EngineError::Internal("the engine ended the stream without finishing".into());
            s.tracker.on_error(&e);
            s.phase = Phase::Finished;
            if !s.part {
                out.extend_from_slice(&error_frame(&engine_error(&e)));
            }
            s.failed = Some(e);
        }
    }
}

fn frame(json: String) -> Bytes {
    Bytes::from(format!("data: {json}\n\n"))
}

pub(crate) fn error_frame(e: &ApiError) -> Bytes {
    frame(e.to_json())
}

fn usage_field(meta: &Meta) -> UsageField {
    if meta.include_usage {
        UsageField::Null
    } else {
        UsageField::Absent
    }
}

/// One stream chunk: a choice (delta for chat, text for completions) or, with `choice: None`,
/// the final usage chunk whose `choices` is empty.
fn encode_chunk(
    meta: &Meta,
    choice: Option<(Delta, String, Option<FinishReason>, Option<Value>)>,
    usage: UsageField,
) -> Bytes {
    let json = match meta.kind {
        Kind::Chat => serde_json::to_string(&ChatCompletionChunk {
            id: meta.id.clone(),
            object: "chat.completion.chunk".into(),
            created: meta.created,
            model: meta.model.clone(),
            choices: choice
                .map(|(delta, _, finish_reason, logprobs)| ChunkChoice {
                    index: meta.index,
                    delta,
                    logprobs,
                    finish_reason,
                })
                .into_iter()
                .collect(),
            usage,
        }),
        Kind::Completion => serde_json::to_string(&Completion {
            id: meta.id.clone(),
            object: "text_completion".into(),
            created: meta.created,
            model: meta.model.clone(),
            choices: choice
                .map(|(_, text, finish_reason, logprobs)| CompletionChoice {
                    text,
                    index: meta.index,
                    logprobs,
                    finish_reason,
                })
                .into_iter()
                .collect(),
            usage,
        }),
    };
    frame(json.unwrap_or_default())
}

/// A content chunk's frame around its text, made once per response from [`encode_chunk`]'s
/// own output, so that each content chunk costs one escaped copy of its text instead of a
/// serialization of the whole chunk (11 % of Nexus's CPU in a streaming load before).
struct DeltaTemplate {
    head: Vec<u8>,
    tail: Vec<u8>,
}

impl DeltaTemplate {
    /// Stands in for the text; any string works, since the text is the last string of a
    /// content chunk (after `id` and `model`; what follows is fixed).
    const MARK: &'static str = "\u{1}";

    fn new(meta: &Meta) -> Self {
        let mut frame = Vec::new();
        Form::Content.write(meta, &mut frame);
        let mark = serde_json::to_string(Self::MARK).unwrap_or_default();
        let at = frame
            .windows(mark.len())
            .rposition(|w| w == mark.as_bytes())
            .unwrap_or(frame.len());
        Self {
            head: frame[..at].to_vec(),
            tail: frame.get(at + mark.len()..).unwrap_or_default().to_vec(),
        }
    }

    /// Appends `encode_chunk` of a text-only delta (chat) or choice (completions).
    fn write(&self, text: &str, out: &mut Vec<u8>) {
        out.reserve(self.head.len() + text.len() + 8 + self.tail.len());
        out.extend_from_slice(&self.head);
        // Writing a string into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, text);
        out.extend_from_slice(&self.tail);
    }
}

/// The stream's first chunk (chat): the assistant role with empty content.
fn role_chunk(meta: &Meta) -> Bytes {
    let mut out = Vec::new();
    Form::Role.write(meta, &mut out);
    Bytes::from(out)
}

/// Appends the chunk with the finish reason (an empty delta).
fn finish_chunk(meta: &Meta, finish: FinishReason, out: &mut Vec<u8>) {
    match finish {
        FinishReason::Stop => Form::Stop.write(meta, out),
        FinishReason::Length => Form::Length.write(meta, out),
        FinishReason::ToolCalls => {
            out.extend_from_slice(&chunk(meta, Delta::default(), String::new(), Some(finish)));
        }
    }
}

/// One chunk with every call whole (OpenAI's clients join a call's pieces by `index`; one
/// piece is a valid stream of them).
fn tool_calls_chunk(meta: &Meta, calls: Vec<ToolCall>) -> Bytes {
    let calls = (0u32..)
        .zip(calls)
        .map(|(index, c)| ToolCallDelta {
            index,
            id: Some(c.id),
            kind: Some(c.kind),
            function: Some(FunctionCallDelta {
                name: Some(c.function.name),
                arguments: Some(c.function.arguments),
            }),
        })
        .collect();
    let delta = Delta {
        tool_calls: Some(calls),
        ..Delta::default()
    };
    chunk(meta, delta, String::new(), None)
}

/// The chunks every stream has, besides usage and errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    /// Chat's first chunk: role `assistant`, content `""`.
    Role,
    /// A content chunk whose text is [`DeltaTemplate::MARK`].
    Content,
    Stop,
    Length,
}

impl Form {
    const ALL: [Form; 4] = [Form::Role, Form::Content, Form::Stop, Form::Length];

    /// [`encode_chunk`] of this form for `meta`.
    fn encode(self, meta: &Meta) -> Bytes {
        let (delta, text, finish) = match self {
            Form::Role => (
                Delta {
                    role: Some("assistant".into()),
                    content: Some(String::new()),
                    tool_calls: None,
                },
                String::new(),
                None,
            ),
            Form::Content => (
                Delta {
                    role: None,
                    content: Some(DeltaTemplate::MARK.into()),
                    tool_calls: None,
                },
                DeltaTemplate::MARK.into(),
                None,
            ),
            Form::Stop => (Delta::default(), String::new(), Some(FinishReason::Stop)),
            Form::Length => (Delta::default(), String::new(), Some(FinishReason::Length)),
        };
        chunk(meta, delta, text, finish)
    }

    /// Appends [`Form::encode`]'s bytes, from the form's shape (the response's id, created and
    /// model written into it) instead of serializing the chunk.
    fn write(self, meta: &Meta, out: &mut Vec<u8>) {
        static SHAPES: std::sync::OnceLock<Vec<Option<Shape>>> = std::sync::OnceLock::new();
        let shapes = SHAPES.get_or_init(|| {
            let mut all = Vec::new();
            for kind in [Kind::Chat, Kind::Completion] {
                for include_usage in [false, true] {
                    for form in Form::ALL {
                        all.push(Shape::new(form, kind, include_usage));
                    }
                }
            }
            all
        });
        let kind = usize::from(meta.kind == Kind::Completion);
        let at = (kind * 2 + usize::from(meta.include_usage)) * Form::ALL.len() + self as usize;
        match shapes.get(at) {
            // The shapes are cut for the first answer.
            Some(Some(shape)) if meta.index == 0 => shape.write(meta, out),
            _ => out.extend_from_slice(&self.encode(meta)),
        }
    }
}

/// A chunk's bytes with holes for the fields that change per response (`id`, `created`,
/// `model`; the rest of a form is the same for every response of a kind), cut from
/// [`encode_chunk`]'s own output for marker values once per process. Filling it costs a few
/// copies where serializing the chunk cost a struct built from cloned strings, its
/// serialization and a `format!` (three per streamed response: ~5 % of Nexus's CPU).
#[derive(Debug)]
struct Shape {
    /// Literal bytes, each followed by a hole; then `last`.
    pieces: Vec<(Vec<u8>, Hole)>,
    last: Vec<u8>,
}

#[derive(Debug, Clone, Copy)]
enum Hole {
    Id,
    Created,
    Model,
}

impl Shape {
    const ID: &'static str = "\u{2}";
    const MODEL: &'static str = "\u{3}";
    /// Digits no other part of a form contains.
    const CREATED: u64 = 987_654_321_987_654_321;

    /// None if a marker is not found exactly once (then the form is serialized every time).
    fn new(form: Form, kind: Kind, include_usage: bool) -> Option<Self> {
        let meta = Meta {
            id: Self::ID.into(),
            created: Self::CREATED,
            model: Self::MODEL.into(),
            kind,
            include_usage,
            tools: false,
            logprobs: false,
            index: 0,
            echo: None,
        };
        let bytes = form.encode(&meta);
        let marks = [
            (serde_json::to_string(Self::ID).ok()?, Hole::Id),
            (Self::CREATED.to_string(), Hole::Created),
            (serde_json::to_string(Self::MODEL).ok()?, Hole::Model),
        ];
        let mut found = Vec::new();
        for (mark, hole) in &marks {
            let mut at = bytes
                .windows(mark.len())
                .enumerate()
                .filter(|(_, w)| *w == mark.as_bytes())
                .map(|(i, _)| i);
            let first = at.next()?;
            if at.next().is_some() {
                return None;
            }
            found.push((first, mark.len(), *hole));
        }
        found.sort_by_key(|f| f.0);
        let (mut pieces, mut from) = (Vec::new(), 0);
        for (at, len, hole) in found {
            pieces.push((bytes.get(from..at)?.to_vec(), hole));
            from = at + len;
        }
        Some(Self {
            pieces,
            last: bytes.get(from..)?.to_vec(),
        })
    }

    fn write(&self, meta: &Meta, out: &mut Vec<u8>) {
        out.reserve(self.last.len() + 160 + meta.id.len() + meta.model.len());
        for (lit, hole) in &self.pieces {
            out.extend_from_slice(lit);
            // Writing into a Vec cannot fail.
            let _ = match hole {
                Hole::Id => serde_json::to_writer(&mut *out, &meta.id),
                Hole::Created => serde_json::to_writer(&mut *out, &meta.created),
                Hole::Model => serde_json::to_writer(&mut *out, &meta.model),
            };
        }
        out.extend_from_slice(&self.last);
    }
}

fn chunk(meta: &Meta, delta: Delta, text: String, finish: Option<FinishReason>) -> Bytes {
    encode_chunk(meta, Some((delta, text, finish, None)), usage_field(meta))
}

/// A content chunk that carries its tokens' log probabilities.
fn logprobs_chunk(meta: &Meta, text: String, logprobs: Value) -> Bytes {
    let delta = Delta {
        content: Some(text.clone()),
        ..Delta::default()
    };
    encode_chunk(
        meta,
        Some((delta, text, None, Some(logprobs))),
        usage_field(meta),
    )
}

/// Completions' `text_offset`: characters of the answer before a token, counted over the
/// tokens' bytes (a character split across tokens counts once, where it ends).
#[derive(Default)]
struct Offsets {
    chars: usize,
    utf8: Utf8Decoder,
}

/// A log probability as JSON: its shortest `f32` digits (widened to `f64` it would print
/// noise digits), or `null` if it is not a number.
fn lp_json(lp: f32) -> Value {
    lp.to_string()
        .parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map_or(Value::Null, Value::Number)
}

/// Tokens' log probabilities in OpenAI's form: chat's `{"content": [{token, logprob, bytes,
/// top_logprobs}]}`, or the completions' parallel lists (`top_logprobs` maps texts to log
/// probabilities, the sampled token's always among them; `text_offset` continues from
/// `offset`).
fn logprobs_json(kind: Kind, tokens: &[TokenLogprob], offset: &mut Offsets) -> Value {
    match kind {
        Kind::Chat => {
            let content: Vec<Value> = tokens
                .iter()
                .map(|t| {
                    let top: Vec<Value> = t
                        .top
                        .iter()
                        .map(|a| json!({"token": a.token, "logprob": lp_json(a.logprob), "bytes": a.bytes}))
                        .collect();
                    json!({"token": t.token, "logprob": lp_json(t.logprob), "bytes": t.bytes,
                           "top_logprobs": top})
                })
                .collect();
            json!({"content": content, "refusal": null})
        }
        Kind::Completion => {
            let mut offsets = Vec::with_capacity(tokens.len());
            for t in tokens {
                offsets.push(offset.chars);
                offset.chars += offset.utf8.push(&t.bytes).chars().count();
            }
            // Texts that decode alike (parts of characters) share one key, as in OpenAI's.
            let top: Vec<Value> = tokens
                .iter()
                .map(|t| {
                    let mut m = serde_json::Map::new();
                    m.insert(t.token.clone(), lp_json(t.logprob));
                    for a in &t.top {
                        m.entry(a.token.clone()).or_insert(lp_json(a.logprob));
                    }
                    Value::Object(m)
                })
                .collect();
            json!({
                "tokens": tokens.iter().map(|t| t.token.as_str()).collect::<Vec<_>>(),
                "token_logprobs": tokens.iter().map(|t| lp_json(t.logprob)).collect::<Vec<_>>(),
                "top_logprobs": top,
                "text_offset": offsets,
            })
        }
    }
}

fn usage_chunk(meta: &Meta, usage: Usage) -> Bytes {
    encode_chunk(meta, None, UsageField::Some(usage))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::future::BoxFuture;
    use lattice_engine::{Engine, GenerateRequest, Load, ModelCard};

    /// The state a [`Tracker`] reports to; its engine is never called.
    struct Idle;

    impl Engine for Idle {
        fn models(&self) -> Vec<ModelCard> {
            Vec::new()
        }
        fn load(&self) -> Load {
            Load::default()
        }
        fn generate(&self, _: GenerateRequest) -> BoxFuture<'_, Result<EventStream, EngineError>> {
            Box::pin(async { Err(EngineError::Internal("unused".into())) })
        }
    }

    fn tracker() -> Tracker {
        let st = Arc::new(AppState {
            engine: Arc::new(Idle),
            auth: None,
            limits: crate::Limits::default(),
            metrics: crate::metrics::Metrics::new("test"),
            started: std::time::SystemTime::now(),
        });
        Tracker::new(st, Kind::Chat, "r".into(), Instant::now())
    }

    fn meta() -> Meta {
        Meta {
            id: "chatcmpl-r".into(),
            created: 1,
            model: "m".into(),
            kind: Kind::Chat,
            include_usage: true,
            tools: false,
            logprobs: false,
            index: 0,
            echo: None,
        }
    }

    /// The SSE body of `events` as each event encoded alone would give it.
    fn one_by_one(events: &[Event]) -> Vec<u8> {
        let m = meta();
        let role = Delta {
            role: Some("assistant".into()),
            content: Some(String::new()),
            tool_calls: None,
        };
        let mut out = chunk(&m, role, String::new(), None).to_vec();
        for ev in events {
            match ev {
                Event::Delta(t) => {
                    let d = Delta {
                        role: None,
                        content: Some(t.clone()),
                        tool_calls: None,
                    };
                    out.extend_from_slice(&chunk(&m, d, t.clone(), None));
                }
                Event::Logprobs(_) | Event::Ending | Event::Embedding(_) => {}
                Event::Done {
                    finish_reason,
                    usage,
                } => {
                    out.extend_from_slice(&chunk(
                        &m,
                        Delta::default(),
                        String::new(),
                        Some(*finish_reason),
                    ));
                    out.extend_from_slice(&usage_chunk(&m, *usage));
                    out.extend_from_slice(b"data: [DONE]\n\n");
                }
            }
        }
        out
    }

    #[tokio::test]
    async fn events_already_here_share_a_body_frame_with_the_same_sse_bytes() {
        let events = vec![
            Event::Delta("Hel".into()),
            Event::Delta("lo \"there\"\n".into()),
            Event::Delta("!".into()),
            Event::Done {
                finish_reason: FinishReason::Stop,
                usage: Usage::new(3, 3),
            },
        ];
        // All ready at once: the role chunk, then one frame for the rest.
        let ready: EventStream =
            Box::pin(futures::stream::iter(events.clone().into_iter().map(Ok)));
        let frames: Vec<Bytes> = sse(meta(), ready, tracker())
            .map(|f| f.unwrap_or_default())
            .collect()
            .await;
        assert_eq!(frames.len(), 2, "{frames:?}");
        assert_eq!(frames.concat(), one_by_one(&events));

        // One at a time: a frame each.
        let frames = paced_frames(&events).await;
        assert_eq!(frames.len(), 1 + events.len(), "{frames:?}");
        assert_eq!(frames.concat(), one_by_one(&events));
    }

    /// The body frames of an SSE response whose events arrive one at a time, 5 ms apart.
    async fn paced_frames(events: &[Event]) -> Vec<Bytes> {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let paced: EventStream = Box::pin(tokio_stream_from(rx));
        let body = tokio::spawn(
            sse(meta(), paced, tracker())
                .map(|f| f.unwrap_or_default())
                .collect::<Vec<Bytes>>(),
        );
        for ev in events {
            tx.send(Ok(ev.clone())).await.expect("the body reads on");
            tokio::task::yield_now().await;
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        body.await.expect("the body task ends")
    }

    /// Nexus's `Ending` (a paid answer's charge under way) writes nothing: the SSE bytes and
    /// the whole answer are those of the same events without it, whether it comes with events
    /// already waiting or alone, its `Done` a moment later.
    #[tokio::test]
    async fn a_paid_answers_ending_writes_nothing() {
        let events = vec![
            Event::Delta("Hel".into()),
            Event::Delta("lo".into()),
            Event::Done {
                finish_reason: FinishReason::Stop,
                usage: Usage::new(3, 2),
            },
        ];
        let mut with_ending = events.clone();
        with_ending.insert(2, Event::Ending);
        let ready = |evs: Vec<Event>| -> EventStream {
            Box::pin(futures::stream::iter(evs.into_iter().map(Ok)))
        };
        let frames: Vec<Bytes> = sse(meta(), ready(with_ending.clone()), tracker())
            .map(|f| f.unwrap_or_default())
            .collect()
            .await;
        assert_eq!(frames.concat(), one_by_one(&events));

        let frames = paced_frames(&with_ending).await;
        assert!(frames.iter().all(|f| !f.is_empty()), "{frames:?}");
        assert_eq!(frames.concat(), one_by_one(&events));

        let whole = collect(&meta(), ready(with_ending), tracker()).await;
        let plain = collect(&meta(), ready(events), tracker()).await;
        let parsed = |j: Result<String, ApiError>| -> serde_json::Value {
            let mut v: serde_json::Value =
                serde_json::from_str(&j.expect("an answer")).expect("json");
            v["created"] = serde_json::Value::Null;
            v
        };
        assert_eq!(parsed(whole), parsed(plain));
    }

    fn stream_of(events: Vec<Result<Event, EngineError>>) -> EventStream {
        Box::pin(futures::stream::iter(events))
    }

    fn answer(text: &str, usage: Usage) -> Vec<Result<Event, EngineError>> {
        let mut events: Vec<_> = text
            .split_inclusive(' ')
            .map(|w| Ok(Event::Delta(w.into())))
            .collect();
        events.push(Ok(Event::Done {
            finish_reason: FinishReason::Stop,
            usage,
        }));
        events
    }

    fn parts(answers: Vec<Vec<Result<Event, EngineError>>>) -> Vec<(Meta, EventStream, Tracker)> {
        (0u32..)
            .zip(answers)
            .map(|(index, events)| {
                let m = Meta { index, ..meta() };
                (m, stream_of(events), tracker().quiet())
            })
            .collect()
    }

    /// Several answers stream side by side: each chunk names its answer, each answer has its
    /// role chunk, its text in order and its finish; then one usage chunk with their sum and
    /// one `[DONE]`.
    #[tokio::test]
    async fn several_answers_stream_under_their_indexes_with_one_usage_and_done() {
        let texts = ["one two three", "alpha beta", "x"];
        let answers = (0u32..)
            .zip(texts)
            .map(|(i, t)| answer(t, Usage::new(5, 10 + i)))
            .collect();
        let body: Vec<u8> = sse_many(meta(), parts(answers), tracker())
            .map(|f| f.unwrap_or_default().to_vec())
            .concat()
            .await;
        let text = String::from_utf8_lossy(&body);
        assert_eq!(text.matches("data: [DONE]").count(), 1, "{text}");
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
        let chunks = chunks(&body);
        let (usage, answers): (Vec<_>, Vec<_>) = chunks.iter().partition(|c| c.choices.is_empty());
        assert_eq!(usage.len(), 1, "{text}");
        assert!(chunks.last().is_some_and(|c| c.choices.is_empty()));
        assert_eq!(usage[0].usage, UsageField::Some(Usage::new(15, 33)));
        for (i, want) in (0u32..).zip(texts) {
            let mine: Vec<_> = answers
                .iter()
                .flat_map(|c| &c.choices)
                .filter(|c| c.index == i)
                .collect();
            assert_eq!(
                mine.first().and_then(|c| c.delta.role.as_deref()),
                Some("assistant")
            );
            let got: String = mine
                .iter()
                .filter_map(|c| c.delta.content.as_deref())
                .collect();
            assert_eq!(got, want);
            let finishes: Vec<_> = mine.iter().filter_map(|c| c.finish_reason).collect();
            assert_eq!(finishes, [FinishReason::Stop], "answer {i}");
            assert!(mine.last().is_some_and(|c| c.finish_reason.is_some()));
        }
        assert_eq!(
            answers.iter().map(|c| c.choices.len()).sum::<usize>(),
            chunks.len() - 1
        );
    }

    /// An answer that fails stops there; the others go on to their ends (each paid for when
    /// it ends), and the body ends with the failure's error event, after the usage chunk,
    /// instead of `[DONE]`.
    #[tokio::test]
    async fn a_failing_answer_lets_the_others_end_and_ends_the_stream_with_its_error() {
        let failing = vec![
            Ok(Event::Delta("par".into())),
            Err(EngineError::Upstream("the node went away".into())),
        ];
        // The other answer is still generating when the first fails.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut p = parts(vec![failing]);
        p.push((
            Meta { index: 1, ..meta() },
            Box::pin(tokio_stream_from(rx)),
            tracker().quiet(),
        ));
        let body = tokio::spawn(
            sse_many(meta(), p, tracker())
                .map(|f| f.unwrap_or_default().to_vec())
                .concat(),
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        for ev in answer("whole answer", Usage::new(2, 2)) {
            tx.send(ev).await.expect("the body reads on");
        }
        let body = tokio::time::timeout(std::time::Duration::from_secs(10), body)
            .await
            .expect("the body ends")
            .expect("the body task ends");
        let text = String::from_utf8_lossy(&body);
        assert!(!text.contains("[DONE]"), "{text}");
        assert!(text.trim_end().ends_with('}'), "{text}");
        assert!(text.contains("the node went away"), "{text}");
        let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
        let (last, rest) = events.split_last().expect("events");
        assert!(last.contains("the node went away"), "{last}");
        let answers = chunks_of(rest);
        let second: String = answers
            .iter()
            .flat_map(|c| &c.choices)
            .filter(|c| c.index == 1)
            .filter_map(|c| c.delta.content.clone())
            .collect();
        assert_eq!(second, "whole answer", "{text}");
        assert!(
            answers
                .iter()
                .flat_map(|c| &c.choices)
                .any(|c| c.index == 1 && c.finish_reason == Some(FinishReason::Stop))
        );
        assert_eq!(
            answers.last().map(|c| c.usage),
            Some(UsageField::Some(Usage::new(2, 2))),
            "the usage chunk counts the answer that ended"
        );
    }

    fn chunks_of(events: &[&str]) -> Vec<ChatCompletionChunk> {
        events
            .iter()
            .filter_map(|e| e.strip_prefix("data: "))
            .map(|d| serde_json::from_str(d).unwrap_or_else(|e| unreachable!("{d}: {e}")))
            .collect()
    }

    /// A whole response of several answers lists them by index with their texts (echoed
    /// prompts first) and the sum of their usage. An answer that ended was paid for, so it is
    /// listed even when another fails (which is left out); only if all fail is it an error.
    #[tokio::test]
    async fn several_whole_answers_are_listed_by_index_with_summed_usage() {
        let completion = Meta {
            kind: Kind::Completion,
            id: "cmpl-r".into(),
            ..meta()
        };
        let mut p = parts(vec![
            answer("one two", Usage::new(2, 2)),
            answer("three", Usage::new(2, 1)),
        ]);
        for (m, _, _) in &mut p {
            m.kind = Kind::Completion;
            m.echo = Some(format!("prompt {}: ", m.index));
        }
        let json = collect_many(&completion, p, None, tracker())
            .await
            .expect("both answers end");
        let c: Completion = serde_json::from_str(&json).expect("a completion");
        let got: Vec<_> = c
            .choices
            .iter()
            .map(|c| (c.index, c.text.as_str()))
            .collect();
        assert_eq!(got, [(0, "prompt 0: one two"), (1, "prompt 1: three")]);
        assert_eq!(c.usage, UsageField::Some(Usage::new(4, 3)));

        let failing = || {
            vec![
                Ok(Event::Delta("half".into())),
                Err(EngineError::Internal("boom".into())),
            ]
        };
        let p = parts(vec![failing(), answer("fine", Usage::new(1, 1)), failing()]);
        let json = collect_many(&meta(), p, None, tracker())
            .await
            .expect("one answer ended");
        let c: ChatCompletion = serde_json::from_str(&json).expect("a chat completion");
        let got: Vec<_> = c
            .choices
            .iter()
            .map(|c| (c.index, c.message.content.as_deref()))
            .collect();
        assert_eq!(got, [(1, Some("fine"))]);
        assert_eq!(c.usage, Usage::new(1, 1));
        let p = parts(vec![failing(), failing()]);
        let e = collect_many(&meta(), p, None, tracker()).await.err();
        assert_eq!(e.map(|e| e.status), Some(500));
    }

    /// `best_of`: the answers with the highest mean log probability per token are kept, best
    /// first, numbered per prompt; usage counts them all; log probabilities are shown only if
    /// the caller asked.
    #[tokio::test]
    async fn best_of_keeps_the_likeliest_answers_of_each_prompt() {
        let scored = |text: &str, lps: &[f32]| {
            let tokens = lps
                .iter()
                .map(|&logprob| TokenLogprob {
                    token: "t".into(),
                    bytes: b"t".to_vec(),
                    logprob,
                    top: Vec::new(),
                })
                .collect();
            let mut events = vec![Ok(Event::Logprobs(tokens))];
            events.extend(answer(text, Usage::new(3, 2)));
            events
        };
        let completion = Meta {
            kind: Kind::Completion,
            ..meta()
        };
        let mut p = parts(vec![
            // Prompt 0: means −1.0, −0.25, −0.5.
            scored("a0", &[-1.0, -1.0]),
            scored("a1", &[-0.5, 0.0]),
            scored("a2", &[-0.5]),
            // Prompt 1: an empty answer ranks last; a tie keeps generation order.
            scored("b0", &[]),
            scored("b1", &[-2.0]),
            scored("b2", &[-1.0, -3.0]),
        ]);
        for (m, _, _) in &mut p {
            m.kind = Kind::Completion;
        }
        let json = collect_many(&completion, p, Some((3, 2)), tracker())
            .await
            .expect("all end");
        let c: Completion = serde_json::from_str(&json).expect("a completion");
        let got: Vec<_> = c
            .choices
            .iter()
            .map(|c| (c.index, c.text.as_str()))
            .collect();
        assert_eq!(got, [(0, "a1"), (1, "a2"), (2, "b1"), (3, "b2")]);
        assert!(c.choices.iter().all(|c| c.logprobs.is_none()));
        assert_eq!(c.usage, UsageField::Some(Usage::new(18, 12)));
    }

    /// The chunks of an SSE body (the `[DONE]` line left out).
    fn chunks(body: &[u8]) -> Vec<ChatCompletionChunk> {
        String::from_utf8_lossy(body)
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .filter(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str(d).unwrap_or_else(|e| unreachable!("{d}: {e}")))
            .collect()
    }

    fn answer_events(text: &str, piece: usize) -> Vec<Event> {
        let chars: Vec<char> = text.chars().collect();
        let mut events: Vec<Event> = chars
            .chunks(piece)
            .map(|c| Event::Delta(c.iter().collect()))
            .collect();
        events.push(Event::Done {
            finish_reason: FinishReason::Stop,
            usage: Usage::new(3, 9),
        });
        events
    }

    async fn tool_answer(text: &str, piece: usize, streaming: bool) -> Vec<u8> {
        let m = Meta {
            tools: true,
            ..meta()
        };
        let events: EventStream = Box::pin(futures::stream::iter(
            answer_events(text, piece).into_iter().map(Ok),
        ));
        if streaming {
            let frames: Vec<Bytes> = sse(m, events, tracker())
                .map(|f| f.unwrap_or_default())
                .collect()
                .await;
            frames.concat()
        } else {
            collect(&m, events, tracker())
                .await
                .unwrap_or_else(|e| unreachable!("{e:?}"))
                .into_bytes()
        }
    }

    #[tokio::test]
    async fn an_answer_in_the_tools_shape_becomes_a_reply_or_tool_calls() {
        // A reply is streamed as content as it comes, and is the whole answer's content.
        let reply = r#"{"response": "Hi \"you\"\n"}"#;
        let body = tool_answer(reply, 2, true).await;
        let got = chunks(&body);
        let content: Vec<String> = got
            .iter()
            .filter_map(|c| c.choices.first()?.delta.content.clone())
            .filter(|c| !c.is_empty())
            .collect();
        assert!(content.len() > 1, "{content:?}");
        assert_eq!(content.concat(), "Hi \"you\"\n");
        let finish: Vec<_> = got
            .iter()
            .filter_map(|c| c.choices.first()?.finish_reason)
            .collect();
        assert_eq!(finish, [FinishReason::Stop]);
        let whole: ChatCompletion = serde_json::from_slice(&tool_answer(reply, 2, false).await)
            .unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(
            whole.choices[0].message.content.as_deref(),
            Some("Hi \"you\"\n")
        );
        assert_eq!(whole.choices[0].message.tool_calls, None);

        // Calls: one chunk with every call, then finish `tool_calls`; no content.
        let calls = r#"{"tool_calls": [{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]}"#;
        let got = chunks(&tool_answer(calls, 3, true).await);
        let deltas: Vec<&ToolCallDelta> = got
            .iter()
            .filter_map(|c| c.choices.first()?.delta.tool_calls.as_ref())
            .flatten()
            .collect();
        let named: Vec<_> = deltas
            .iter()
            .map(|d| {
                let f = d.function.clone().unwrap_or_default();
                (
                    d.index,
                    f.name.unwrap_or_default(),
                    f.arguments.unwrap_or_default(),
                )
            })
            .collect();
        assert_eq!(
            named,
            [
                (0, "a".into(), r#"{"x":1}"#.into()),
                (1, "b".into(), "{}".into())
            ]
        );
        assert!(
            deltas
                .iter()
                .all(|d| d.id.as_ref().is_some_and(|i| i.starts_with("call_")))
        );
        assert!(got.iter().all(|c| {
            c.choices
                .first()
                .and_then(|c| c.delta.content.as_deref())
                .is_none_or(str::is_empty)
        }));
        let finish: Vec<_> = got
            .iter()
            .filter_map(|c| c.choices.first()?.finish_reason)
            .collect();
        assert_eq!(finish, [FinishReason::ToolCalls]);
        let whole: ChatCompletion = serde_json::from_slice(&tool_answer(calls, 3, false).await)
            .unwrap_or_else(|e| unreachable!("{e}"));
        let message = &whole.choices[0].message;
        assert_eq!(message.content, None);
        let names: Vec<&str> = message
            .tool_calls
            .iter()
            .flatten()
            .map(|c| c.function.name.as_str())
            .collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(
            whole.choices[0].finish_reason,
            Some(FinishReason::ToolCalls)
        );
    }

    fn tokio_stream_from(
        rx: tokio::sync::mpsc::Receiver<Result<Event, EngineError>>,
    ) -> impl futures::Stream<Item = Result<Event, EngineError>> + Send {
        futures::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|ev| (ev, rx)) },
        )
    }

    #[test]
    fn content_chunks_from_the_template_are_byte_for_byte_the_serialized_ones() {
        let texts = [
            "",
            "Hello",
            " world",
            "quote \" backslash \\ slash /",
            "line\nbreak\ttab\r\u{0}\u{1}\u{1f}",
            "\u{1}",
            "\"\\u0001\"",
            "日本語 🦀 é",
        ];
        let models = ["m", "bench-model", "we\"ird\\ \u{1} model", "\u{1}"];
        let mut checked = 0;
        for kind in [Kind::Chat, Kind::Completion] {
            for include_usage in [false, true] {
                for (model, index) in models.into_iter().zip([0, 3, 0, 15]) {
                    let meta = Meta {
                        id: format!("chatcmpl-{model}"),
                        created: 1_700_000_000,
                        model: model.into(),
                        kind,
                        include_usage,
                        tools: false,
                        logprobs: false,
                        index,
                        echo: None,
                    };
                    let template = DeltaTemplate::new(&meta);
                    for text in texts {
                        let delta = Delta {
                            role: None,
                            content: Some(text.into()),
                            tool_calls: None,
                        };
                        let want = chunk(&meta, delta, text.into(), None);
                        let mut got = b"before".to_vec();
                        template.write(text, &mut got);
                        assert_eq!(
                            got,
                            [b"before", &want[..]].concat(),
                            "{kind:?} usage={include_usage} model={model:?} text={text:?}"
                        );
                        checked += 1;
                    }
                }
            }
        }
        assert_eq!(checked, 2 * 2 * models.len() * texts.len());
    }

    /// Every form's shape exists (else the fast path is never taken) and, filled for a
    /// response, gives the serializer's bytes: ids and models with quotes, escapes, non-ASCII
    /// and the markers themselves, `created` from 0 to the marker value and `u64::MAX`.
    #[test]
    fn shapes_give_the_serialized_chunks() {
        for kind in [Kind::Chat, Kind::Completion] {
            for include_usage in [false, true] {
                for form in Form::ALL {
                    assert!(
                        Shape::new(form, kind, include_usage).is_some(),
                        "{kind:?} {include_usage} {form:?}"
                    );
                }
            }
        }
        let names = [
            "m",
            "chatcmpl-01a24d76",
            "we\"ird\\ \u{1}",
            "\u{2}",
            "\u{3}",
            "日本語 🦀",
            "",
        ];
        let created = [0, 1_700_000_000, Shape::CREATED, u64::MAX];
        let mut checked = 0;
        for kind in [Kind::Chat, Kind::Completion] {
            for include_usage in [false, true] {
                for id in names {
                    for model in names {
                        for created in created {
                            let meta = Meta {
                                id: id.into(),
                                created,
                                model: model.into(),
                                kind,
                                include_usage,
                                tools: false,
                                logprobs: false,
                                index: 0,
                                echo: None,
                            };
                            for form in Form::ALL {
                                let mut got = b"before".to_vec();
                                form.write(&meta, &mut got);
                                assert_eq!(
                                    got,
                                    [b"before", &form.encode(&meta)[..]].concat(),
                                    "{form:?} {kind:?} usage={include_usage} id={id:?} model={model:?} created={created}"
                                );
                                checked += 1;
                            }
                        }
                    }
                }
            }
        }
        assert_eq!(
            checked,
            2 * 2 * names.len() * names.len() * created.len() * 4
        );
    }
}
