//! HTTP handlers. The request path reads top to bottom: parse → validate → generate → respond.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::StreamExt;
use lattice_api::{ApiError, ChatCompletionRequest, CompletionRequest, ModelList, ModelObject};
use lattice_engine::{
    EngineError, Event, EventStream, GenerateRequest, ModelCard, Preference, Prompt, SamplingParams,
};
use serde::de::DeserializeOwned;

use crate::stream::{self, Kind, Meta, Tracker};
use crate::{ApiErrorResponse, AppState, params};

pub(crate) type HandlerResult = Result<Response, ApiErrorResponse>;

/// An OpenAI request body this API serves, validated into engine terms.
trait OpenAiRequest: DeserializeOwned {
    const KIND: Kind;
    fn validate(self, limits: &crate::Limits) -> Result<Validated, ApiError>;
}

impl OpenAiRequest for ChatCompletionRequest {
    const KIND: Kind = Kind::Chat;
    fn validate(self, limits: &crate::Limits) -> Result<Validated, ApiError> {
        let (prompt, params, tools) = params::chat(&self, limits)?;
        let n = params::choices(self.sampling.n, 1, limits)?;
        let include_usage = self
            .sampling
            .stream_options
            .is_some_and(|o| o.include_usage);
        Ok(Validated {
            model: self.model,
            prompts: vec![prompt],
            n,
            best_of: 1,
            echo: false,
            params,
            streaming: self.stream,
            include_usage,
            tools,
        })
    }
}

impl OpenAiRequest for CompletionRequest {
    const KIND: Kind = Kind::Completion;
    fn validate(self, limits: &crate::Limits) -> Result<Validated, ApiError> {
        let (prompts, params, best_of) = params::completion(&self, limits)?;
        let n = params::choices(self.sampling.n, prompts.len(), limits)?;
        if best_of > 1 {
            params::choices(Some(best_of), prompts.len(), limits).map_err(|e| {
                ApiError::invalid_param("best_of", format!("`best_of`: {}", e.body.message))
            })?;
        }
        let include_usage = self
            .sampling
            .stream_options
            .is_some_and(|o| o.include_usage);
        Ok(Validated {
            model: self.model,
            prompts: prompts.into_iter().map(Prompt::Text).collect(),
            n,
            best_of,
            echo: self.echo == Some(true),
            params,
            streaming: self.stream,
            include_usage,
            tools: false,
        })
    }
}

pub(crate) async fn chat_completions(
    st: State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> HandlerResult {
    handle::<ChatCompletionRequest>(st, headers, body).await
}

pub(crate) async fn completions(
    st: State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> HandlerResult {
    handle::<CompletionRequest>(st, headers, body).await
}

async fn handle<R: OpenAiRequest>(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> HandlerResult {
    let started = Instant::now();
    let payer = match &st.auth {
        Some(auth) => Some(auth.authenticate(&headers).await.inspect_err(|e| {
            st.metrics.request(R::KIND.endpoint(), outcome(e.status));
        })?),
        None => None,
    };
    let validated = parse_body::<R>(body, &st).and_then(|req| {
        // Validate the fields before the model so the caller learns about all its mistakes first.
        let v = req.validate(&st.limits)?;
        check_copies(&v, &st.limits)?;
        check_model(&st, &v.model)?;
        check_text_model(&st, &v.model)?;
        Ok(v)
    });
    respond(st, &headers, R::KIND, started, validated, payer).await
}

struct Validated {
    model: String,
    /// One for chat; a completions request may list several.
    prompts: Vec<Prompt>,
    /// Answers per prompt.
    n: u32,
    /// Completions: answers generated per prompt, of which the `n` with the highest mean log
    /// probability per token are returned (1: just `n`).
    best_of: u32,
    /// Completions: each answer starts with its prompt.
    echo: bool,
    params: SamplingParams,
    streaming: bool,
    include_usage: bool,
    /// The answer is in the tools' JSON shape, to be read back into tool calls.
    tools: bool,
}

async fn respond(
    st: Arc<AppState>,
    headers: &HeaderMap,
    kind: Kind,
    started: Instant,
    validated: Result<Validated, ApiError>,
    payer: Option<lattice_engine::Payer>,
) -> HandlerResult {
    let Validated {
        model,
        prompts,
        n,
        best_of,
        echo,
        mut params,
        streaming,
        include_usage,
        tools,
    } = validated.inspect_err(|e| {
        st.metrics.request(kind.endpoint(), outcome(e.status));
    })?;
    let request_id = fresh_request_id(headers, payer.is_some());
    let preference = preference(headers).inspect_err(|e| {
        st.metrics.request(kind.endpoint(), outcome(e.status));
    })?;
    let mut prompts = prompts.into_iter();
    let Some(prompt) = prompts.next() else {
        let e = ApiError::invalid_param("prompt", "The request has no prompt.");
        st.metrics.request(kind.endpoint(), outcome(e.status));
        return Err(e.into());
    };
    let logprobs = params.logprobs.is_some();
    // `best_of` ranks answers by their tokens' log probabilities, so it asks for them (they
    // are shown only if the caller asked too); a model whose backends report none is refused
    // here, naming `best_of` rather than the `logprobs` the caller did not send.
    let generated = if best_of > 1 {
        if !logprobs
            && st
                .engine
                .models()
                .iter()
                .any(|c| c.id == model && !c.logprobs)
        {
            let e = ApiError::invalid_param(
                "best_of",
                format!(
                    "`best_of` ranks answers by their log probabilities, which no backend serving `{model}` reports; remove `best_of`."
                ),
            );
            st.metrics.request(kind.endpoint(), outcome(e.status));
            return Err(e.into());
        }
        params.logprobs.get_or_insert(0);
        best_of
    } else {
        n
    };
    let echo_of = |p: &Prompt| match p {
        Prompt::Text(t) if echo => Some(t.clone()),
        _ => None,
    };
    let prefix = match kind {
        Kind::Chat => "chatcmpl",
        Kind::Completion => "cmpl",
    };
    let meta = Meta {
        id: format!("{prefix}-{request_id}"),
        created: unix_now(),
        model: model.clone(),
        kind,
        include_usage,
        tools,
        logprobs,
        index: 0,
        echo: echo_of(&prompt),
    };
    let gen_req = GenerateRequest {
        request_id: request_id.clone(),
        model,
        prompt,
        params,
        preference,
        user: payer.as_ref().map(|p| p.address.clone()),
        conversation: payer.as_ref().and_then(|_| conversation(headers)),
        whole: !streaming,
        payer,
    };
    let rid = HeaderValue::from_str(&request_id).unwrap_or(HeaderValue::from_static("invalid"));
    let more: Vec<Prompt> = prompts.collect();
    if generated > 1 || !more.is_empty() {
        let answers = fan_out(gen_req, &more, generated as usize)
            .into_iter()
            .zip(0u32..)
            .map(|(g, index)| {
                let echo = match index / generated {
                    0 => meta.echo.clone(),
                    p => more.get(p as usize - 1).and_then(echo_of),
                };
                let meta = Meta {
                    index,
                    echo,
                    ..meta.clone()
                };
                (g, meta)
            })
            .collect();
        let best = (best_of > 1).then_some((generated, n));
        return respond_many(st, kind, started, streaming, meta, answers, best, rid).await;
    }
    let events = st.engine.generate(gen_req).await.map_err(|e| {
        let api = stream::engine_error(&e);
        st.metrics.request(kind.endpoint(), outcome(api.status));
        tracing::debug!(request_id = %request_id, error = %e, "request rejected by the engine");
        api
    })?;
    let tracker = Tracker::new(st.clone(), kind, request_id, started);
    if streaming {
        let body = Body::from_stream(stream::sse(meta, events, tracker));
        return Ok(sse_response(body, rid));
    }
    let json = stream::collect(&meta, events, tracker).await?;
    Ok(json_response(json, rid))
}

/// Each answer carries its own copy of its prompt (on its way to a node, and through Nexus's
/// link), so the copies one request makes are bounded: 4 × the body limit in all.
fn check_copies(v: &Validated, limits: &crate::Limits) -> Result<(), ApiError> {
    let (param, per) = if v.best_of > 1 {
        ("best_of", v.best_of)
    } else {
        ("n", v.n)
    };
    if per <= 1 {
        return Ok(());
    }
    let bytes: usize = v.prompts.iter().map(prompt_bytes).sum();
    let copies = bytes.saturating_mul(per as usize);
    let most = limits.max_body_bytes.saturating_mul(4);
    if copies > most {
        return Err(ApiError::invalid_param(
            param,
            format!(
                "{per} answers of a {bytes}-byte prompt make {copies} bytes of copies; at most {most} are allowed. Ask for fewer answers or send a shorter prompt."
            ),
        ));
    }
    Ok(())
}

fn prompt_bytes(p: &Prompt) -> usize {
    match p {
        Prompt::Text(t) => t.len(),
        Prompt::Chat(m) => m.iter().map(|m| m.content.len() + m.role.len()).sum(),
        Prompt::Embed(texts) => texts.iter().map(String::len).sum(),
    }
}

/// A request's answers as requests of their own: answer `i` of prompt `p` is choice
/// `p * n + i`. The first is `first` (prompt 0); each other one has the id `{id}-{index}`,
/// the seed plus its index when a seed is given (so answers differ and stay reproducible), and
/// keeps no chat history (only the first answer is kept).
fn fan_out(first: GenerateRequest, more: &[Prompt], n: usize) -> Vec<GenerateRequest> {
    let count = n * (1 + more.len());
    let mut all = Vec::with_capacity(count);
    for index in 1..count {
        let prompt = match index / n {
            0 => first.prompt.clone(),
            p => more
                .get(p - 1)
                .cloned()
                .unwrap_or_else(|| first.prompt.clone()),
        };
        let mut params = first.params.clone();
        params.seed = params.seed.map(|s| s.wrapping_add(index as u64));
        all.push(GenerateRequest {
            request_id: format!("{}-{index}", first.request_id),
            model: first.model.clone(),
            prompt,
            params,
            preference: first.preference,
            user: first.user.clone(),
            payer: first.payer.clone(),
            conversation: None,
            whole: first.whole,
        });
    }
    all.insert(0, first);
    all
}

/// Several answers: every one is admitted before the response starts ([`admit_all`]: a
/// refusal while no answer has ended cancels the others and is the response), then they are
/// generated side by side and the response lists each under its index. With `best`
/// (`best_of`, `n`): the `n` best of each prompt's `best_of` answers, whole.
#[allow(clippy::too_many_arguments)]
async fn respond_many(
    st: Arc<AppState>,
    kind: Kind,
    started: Instant,
    streaming: bool,
    meta: Meta,
    answers: Vec<(GenerateRequest, Meta)>,
    best: Option<(u32, u32)>,
    rid: HeaderValue,
) -> HandlerResult {
    let (requests, metas): (Vec<_>, Vec<_>) = answers.into_iter().unzip();
    let ids: Vec<String> = requests.iter().map(|g| g.request_id.clone()).collect();
    let request_id = ids.first().cloned().unwrap_or_default();
    let streams = admit_all(&st.engine, requests).await.map_err(|e| {
        let api = stream::engine_error(&e);
        st.metrics.request(kind.endpoint(), outcome(api.status));
        tracing::debug!(request_id = %request_id, error = %e, "request rejected by the engine");
        api
    })?;
    let tracker = Tracker::new(st.clone(), kind, request_id, started);
    let parts: Vec<_> = metas
        .into_iter()
        .zip(streams)
        .zip(ids)
        .map(|((m, events), id)| {
            (
                m,
                events,
                Tracker::new(st.clone(), kind, id, started).quiet(),
            )
        })
        .collect();
    if streaming {
        let body = Body::from_stream(stream::sse_many(meta, parts, tracker));
        return Ok(sse_response(body, rid));
    }
    let json = stream::collect_many(&meta, parts, best, tracker).await?;
    Ok(json_response(json, rid))
}

/// Admits every answer, each on a task of its own from then on: an answer that has started
/// is read while the others wait for theirs (a node's queue, or Nexus's wait for a first
/// token), its events kept until the response reads them — never more than its own tokens'.
///
/// A refusal is the result while no answer has ended. Every other answer is then asked to
/// stop: one still being admitted or generated is dropped, which cancels it (on Nexus: nothing
/// charged), but one whose end is under way (it said [`Event::Ending`]: Nexus is paying for
/// it) is read to its end, so the refusal waits for that charge. If an answer ended after
/// all, it was paid for, so the request is not refused: as for a refusal that comes after an
/// answer ended, the refused answer fails on its own, and so do the answers stopped for it
/// (each is its error alone, without the text it had). Dropping the response aborts every
/// task, which drops its engine stream.
async fn admit_all(
    engine: &Arc<dyn lattice_engine::Engine>,
    requests: Vec<GenerateRequest>,
) -> Result<Vec<EventStream>, EngineError> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::sync::watch;
    /// Aborts an answer's task when its stream (or the admission) is dropped.
    struct Abort(tokio::task::AbortHandle);
    impl Drop for Abort {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    /// The refusal the answers are asked to stop for, once there is one.
    async fn stop_asked(rx: &mut watch::Receiver<Option<EngineError>>) -> EngineError {
        let asked = rx
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|r| r.clone());
        match asked {
            Some(e) => e,
            // The admission is over: nobody will ask any more.
            None => std::future::pending().await,
        }
    }
    let mut admissions = futures::stream::FuturesUnordered::new();
    let mut answers = Vec::with_capacity(requests.len());
    let mut tasks = Vec::with_capacity(requests.len());
    let ended = Arc::new(AtomicBool::new(false));
    let (stop, stopping) = watch::channel(None);
    for (i, g) in requests.into_iter().enumerate() {
        let (admitted, admission) = tokio::sync::oneshot::channel();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let (engine, ended, mut stopping) = (engine.clone(), ended.clone(), stopping.clone());
        let task = tokio::spawn(async move {
            let mut events = tokio::select! {
                biased;
                r = engine.generate(g) => match r {
                    Err(e) => {
                        let _ = admitted.send(Err(e));
                        return None;
                    }
                    Ok(events) => events,
                },
                e = stop_asked(&mut stopping) => {
                    let _ = admitted.send(Err(e));
                    return None;
                }
            };
            if admitted.send(Ok(())).is_err() {
                return None;
            }
            let mut ending = false;
            // Until the answer's last event (its end or its error); an unbounded send never
            // waits, so yield to the runtime as a channel receive would. Once the answer's end
            // is under way, a stop no longer drops it.
            loop {
                let ev = tokio::select! {
                    biased;
                    ev = events.next() => match ev {
                        Some(ev) => ev,
                        None => return None,
                    },
                    // Its events so far are not shown: the answer is its error alone.
                    e = stop_asked(&mut stopping), if !ending => return Some(e),
                };
                if matches!(ev, Ok(Event::Ending)) {
                    ending = true;
                    continue;
                }
                let done = matches!(ev, Ok(Event::Done { .. }));
                let last = done || ev.is_err();
                if done {
                    ended.store(true, Ordering::Release);
                }
                if tx.send(ev).is_err() || last {
                    return None;
                }
                tokio::task::consume_budget().await;
            }
        });
        admissions.push(async move {
            let r = admission.await.unwrap_or_else(|_| {
                Err(EngineError::Internal(
                    "an answer's task ended before admission".into(),
                ))
            });
            (i, r)
        });
        answers.push((rx, Abort(task.abort_handle())));
        tasks.push(task);
    }
    let mut refused: Vec<Option<EngineError>> = answers.iter().map(|_| None).collect();
    while let Some((i, r)) = admissions.next().await {
        if let Err(e) = r {
            if !ended.load(Ordering::Acquire) {
                stop.send_replace(Some(e.clone()));
                // Each task ends at once, or after its answer's charge if one is under way (a
                // panicked task is as good as stopped).
                let stopped = futures::future::join_all(tasks.drain(..)).await;
                if !ended.load(Ordering::Acquire) {
                    return Err(e);
                }
                for (slot, task) in refused.iter_mut().zip(stopped) {
                    if let Ok(Some(stop)) = task {
                        *slot = Some(stop);
                    }
                }
            }
            if let Some(slot) = refused.get_mut(i) {
                *slot = Some(e);
            }
        }
    }
    Ok(answers
        .into_iter()
        .zip(refused)
        .map(|((rx, abort), refused)| -> EventStream {
            match refused {
                Some(e) => Box::pin(futures::stream::once(async move { Err(e) })),
                None => Box::pin(futures::stream::unfold(
                    (rx, abort),
                    |(mut rx, abort)| async move { rx.recv().await.map(|ev| (ev, (rx, abort))) },
                )),
            }
        })
        .collect())
}

fn sse_response(body: Body, rid: HeaderValue) -> Response {
    let mut resp = (StatusCode::OK, body).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-request-id", rid);
    resp
}

pub(crate) fn json_response(json: String, rid: HeaderValue) -> Response {
    let mut resp = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        json,
    )
        .into_response();
    resp.headers_mut().insert("x-request-id", rid);
    resp
}

pub(crate) fn outcome(status: u16) -> &'static str {
    match status {
        429 | 503 => "overloaded",
        400..=499 => "client_error",
        _ => "error",
    }
}

pub(crate) fn parse_body<T: DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
    st: &AppState,
) -> Result<T, ApiError> {
    let body = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::payload_too_large(st.limits.max_body_bytes)
        } else {
            ApiError::invalid_request(format!("Could not read the request body: {r}"))
        }
    })?;
    serde_json::from_slice(&body).map_err(|e| {
        let msg = if e.is_syntax() || e.is_eof() {
            format!("We could not parse the JSON body of your request: {e}")
        } else {
            format!("Invalid request body: {e}")
        };
        ApiError::invalid_request(msg)
    })
}

pub(crate) fn check_model(st: &AppState, model: &str) -> Result<(), ApiError> {
    if st.engine.serves(model) {
        Ok(())
    } else {
        Err(ApiError::model_not_found(model))
    }
}

/// A text endpoint's model must generate text (an embedding model would refuse it only on the
/// node, after Nexus held credit and routed it).
fn check_text_model(st: &AppState, model: &str) -> Result<(), ApiError> {
    match st.engine.dimensions(model) {
        None => Ok(()),
        Some(_) => Err(ApiError::invalid_param(
            "model",
            format!("`{model}` is an embedding model: use it with /v1/embeddings."),
        )),
    }
}

/// `x-lattice-preference: latency | cost | quality` steers Nexus's routing.
pub(crate) fn preference(headers: &HeaderMap) -> Result<Preference, ApiError> {
    match headers
        .get("x-lattice-preference")
        .map(|v| v.to_str().unwrap_or(""))
    {
        None => Ok(Preference::default()),
        Some(v) => Preference::parse(v.trim()).ok_or_else(|| {
            ApiError::invalid_param(
                "x-lattice-preference",
                format!("Unknown routing preference `{v}`; use latency, cost or quality."),
            )
        }),
    }
}

/// `x-lattice-conversation`: where an opted-in user's exchange is kept (ids like `[A-Za-z0-9_-]{1,64}`).
fn conversation(headers: &HeaderMap) -> Option<String> {
    let v = headers.get("x-lattice-conversation")?.to_str().ok()?;
    (!v.is_empty()
        && v.len() <= 64
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'))
    .then(|| v.to_owned())
}

/// A paid request's id keys its hold, charge and receipt, so it is always fresh: the caller's
/// `x-request-id` is kept only for unpaid requests (Nexus → node) and logged. It is
/// time-ordered (UUIDv7: 48 bits of milliseconds, 74 random), so the ledger's rows keyed by it
/// are appended at the end of their indexes instead of splitting pages anywhere.
pub(crate) fn fresh_request_id(headers: &HeaderMap, paid: bool) -> String {
    if !paid {
        return request_id(headers);
    }
    let id = uuid::Uuid::now_v7().simple().to_string();
    if let Some(theirs) = headers.get("x-request-id").and_then(|v| v.to_str().ok()) {
        tracing::debug!(request_id = %id, client_request_id = %theirs, "paid request");
    }
    id
}

/// Keeps a caller's request id (Nexus sets one) when it is short and printable.
fn request_id(headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|s| {
            !s.is_empty()
                && s.len() <= 128
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
        })
        .map_or_else(|| uuid::Uuid::new_v4().simple().to_string(), str::to_owned)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn model_object(st: &AppState, card: &ModelCard) -> ModelObject {
    ModelObject {
        id: card.id.clone(),
        object: "model".into(),
        created: st
            .started
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        owned_by: "lattice".into(),
        context_length: Some(card.context_length),
        nodes: Some(card.nodes),
        dimensions: card.dimensions,
    }
}

pub(crate) async fn models(State(st): State<Arc<AppState>>) -> Response {
    let data = st
        .engine
        .models()
        .iter()
        .map(|c| model_object(&st, c))
        .collect();
    axum::Json(ModelList {
        object: "list".into(),
        data,
    })
    .into_response()
}

pub(crate) async fn model(
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> HandlerResult {
    let card = st.engine.models().into_iter().find(|m| m.id == id);
    let card = card.ok_or_else(|| ApiError::model_not_found(&id))?;
    Ok(axum::Json(model_object(&st, &card)).into_response())
}

pub(crate) async fn health(State(st): State<Arc<AppState>>) -> Response {
    let load = st.engine.load();
    let models: Vec<String> = st.engine.models().into_iter().map(|m| m.id).collect();
    axum::Json(serde_json::json!({
        "status": "ok",
        "models": models,
        "slots": load.slots,
        "busy_slots": load.busy_slots,
        "queued": load.queued,
    }))
    .into_response()
}

pub(crate) async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    let body = st.metrics.render(st.engine.load());
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::future::BoxFuture;
    use lattice_engine::{Engine, Load};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// An engine with a few slots (one in the admission test): an answer is admitted when it
    /// gets a slot and keeps it until its stream ends or is dropped. Requests whose id ends in
    /// `-refused` are refused. `endless` (or an id ending in `-endless`): after its tokens an
    /// answer waits forever instead of ending. An answer ends as a paid one does on Nexus:
    /// `Ending`, then `Done` once `settle_until_dropped` answers' streams were dropped (the
    /// charge; 0: at once).
    struct Slots {
        slot: Arc<tokio::sync::Semaphore>,
        tokens: usize,
        endless: bool,
        settle_until_dropped: usize,
        /// Answers whose stream was dropped (ended or cancelled).
        dropped: Arc<AtomicUsize>,
        /// Answers admitted so far.
        admitted: Arc<AtomicUsize>,
        /// Answers whose end (after their tokens) has started, and those that have ended.
        settling: Arc<AtomicUsize>,
        settled: Arc<AtomicUsize>,
        /// A refusal waits until this many answers were admitted, this many dropped and this
        /// many started their end.
        refuse_after: (usize, usize, usize),
    }

    impl Slots {
        fn new(
            slots: usize,
            tokens: usize,
            endless: bool,
            refuse_after: (usize, usize, usize),
        ) -> Self {
            Self {
                slot: Arc::new(tokio::sync::Semaphore::new(slots)),
                tokens,
                endless,
                settle_until_dropped: 0,
                dropped: Arc::default(),
                admitted: Arc::default(),
                settling: Arc::default(),
                settled: Arc::default(),
                refuse_after,
            }
        }
    }

    struct Counted(Arc<AtomicUsize>);
    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    impl Engine for Slots {
        fn models(&self) -> Vec<ModelCard> {
            Vec::new()
        }
        fn load(&self) -> Load {
            Load::default()
        }
        fn generate(
            &self,
            req: GenerateRequest,
        ) -> BoxFuture<'_, Result<EventStream, EngineError>> {
            Box::pin(async move {
                if req.request_id.ends_with("-refused") {
                    let (admitted, dropped, settling) = self.refuse_after;
                    while self.admitted.load(Ordering::SeqCst) < admitted
                        || self.dropped.load(Ordering::SeqCst) < dropped
                        || self.settling.load(Ordering::SeqCst) < settling
                    {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    return Err(EngineError::PaymentRequired("no credit".into()));
                }
                let permit = self.slot.clone().acquire_owned().await;
                let permit = permit.map_err(|_| EngineError::Internal("closed".into()))?;
                let events: Vec<Event> =
                    (0..self.tokens).map(|_| Event::Delta("x".into())).collect();
                let endless = self.endless || req.request_id.ends_with("-endless");
                let (settle_until, dropped, settling, settled) = (
                    self.settle_until_dropped,
                    self.dropped.clone(),
                    self.settling.clone(),
                    self.settled.clone(),
                );
                self.admitted.fetch_add(1, Ordering::SeqCst);
                // The last field: 0 while tokens go, 1 once `Ending` went, 2 once `Done` went.
                let held = (
                    permit,
                    Counted(self.dropped.clone()),
                    events.into_iter(),
                    0u8,
                );
                let s: EventStream = Box::pin(futures::stream::unfold(held, move |mut h| {
                    let (dropped, settling, settled) =
                        (dropped.clone(), settling.clone(), settled.clone());
                    async move {
                        match (h.2.next(), h.3) {
                            (Some(ev), _) => Some((Ok(ev), h)),
                            (None, _) if endless => futures::future::pending().await,
                            (None, 0) => {
                                h.3 = 1;
                                Some((Ok(Event::Ending), h))
                            }
                            (None, 1) => {
                                settling.fetch_add(1, Ordering::SeqCst);
                                while dropped.load(Ordering::SeqCst) < settle_until {
                                    tokio::time::sleep(Duration::from_millis(2)).await;
                                }
                                settled.fetch_add(1, Ordering::SeqCst);
                                h.3 = 2;
                                let done = Event::Done {
                                    finish_reason: lattice_api::FinishReason::Length,
                                    usage: lattice_api::Usage::new(1, 1),
                                };
                                Some((Ok(done), h))
                            }
                            (None, _) => None,
                        }
                    }
                }));
                Ok(s)
            })
        }
    }

    fn request(id: &str) -> GenerateRequest {
        GenerateRequest {
            request_id: id.into(),
            model: "m".into(),
            prompt: Prompt::Text("p".into()),
            params: SamplingParams::default(),
            preference: Preference::default(),
            user: None,
            payer: None,
            conversation: None,
            whole: true,
        }
    }

    /// The copies of the prompt that several answers make are bounded by 4 × the body limit,
    /// and the refusal names the field that multiplies them.
    #[test]
    fn prompt_copies_are_bounded() {
        let limits = crate::Limits {
            max_body_bytes: 1000,
            ..crate::Limits::default()
        };
        let v = |bytes: usize, n: u32, best_of: u32| Validated {
            model: "m".into(),
            prompts: vec![Prompt::Text("x".repeat(bytes))],
            n,
            best_of,
            echo: false,
            params: SamplingParams::default(),
            streaming: false,
            include_usage: false,
            tools: false,
        };
        let param = |r: Result<(), ApiError>| r.err().and_then(|e| e.body.param);
        assert_eq!(param(check_copies(&v(250, 16, 1), &limits)), None);
        assert_eq!(
            param(check_copies(&v(251, 16, 1), &limits)).as_deref(),
            Some("n")
        );
        assert_eq!(
            param(check_copies(&v(401, 2, 10), &limits)).as_deref(),
            Some("best_of")
        );
        // One answer per prompt: the body limit alone bounds it.
        assert_eq!(param(check_copies(&v(100_000, 1, 1), &limits)), None);
    }

    /// Answers that have started are read while the others wait to be admitted: with one
    /// slot, the second answer is admitted only once the first has ended, which takes someone
    /// reading the first (thousands of events) before the response starts.
    #[tokio::test]
    async fn started_answers_are_read_while_the_others_wait() {
        let engine: Arc<dyn Engine> = Arc::new(Slots::new(1, 5000, false, (0, 0, 0)));
        let streams = tokio::time::timeout(
            Duration::from_secs(20),
            admit_all(&engine, vec![request("r"), request("r-1"), request("r-2")]),
        )
        .await
        .expect("every answer is admitted in turn")
        .expect("admitted");
        for s in streams {
            let events: Vec<_> = s.collect().await;
            assert_eq!(events.len(), 5001);
            assert!(matches!(events.last(), Some(Ok(Event::Done { .. }))));
        }
    }

    /// One refusal is the result: the answers already admitted are dropped (cancelled), and so
    /// is one still waiting for a slot.
    #[tokio::test]
    async fn a_refused_answer_cancels_the_admitted_ones() {
        let two = Slots::new(2, 3, true, (2, 0, 0));
        let dropped = two.dropped.clone();
        let engine: Arc<dyn Engine> = Arc::new(two);
        let r = tokio::time::timeout(
            Duration::from_secs(20),
            admit_all(
                &engine,
                vec![
                    request("r"),
                    request("r-1"),
                    request("r-2"),
                    request("r-refused"),
                ],
            ),
        )
        .await
        .expect("the refusal is the result, not a wait for a slot");
        assert!(matches!(r, Err(EngineError::PaymentRequired(_))));
        tokio::time::timeout(Duration::from_secs(20), async {
            while dropped.load(Ordering::SeqCst) < 2 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("both admitted answers are dropped");
    }

    /// A refusal that comes after an answer has ended (and been paid for) fails only its own
    /// answer: the others are kept.
    #[tokio::test]
    async fn a_refusal_after_an_answer_ended_fails_only_its_own() {
        let engine: Arc<dyn Engine> = Arc::new(Slots::new(8, 3, false, (2, 1, 0)));
        let streams = tokio::time::timeout(
            Duration::from_secs(20),
            admit_all(
                &engine,
                vec![request("r"), request("r-1"), request("r-refused")],
            ),
        )
        .await
        .expect("admission ends")
        .expect("the answers that ended are kept");
        assert_eq!(
            ends(streams).await,
            [("done", 4), ("done", 4), ("refused", 1)]
        );
    }

    /// The outcome of each answer's stream (its end, the refusal, or anything else), and how
    /// many events it had.
    async fn ends(streams: Vec<EventStream>) -> Vec<(&'static str, usize)> {
        let mut ends = Vec::new();
        for s in streams {
            let events: Vec<_> = s.collect().await;
            let end = match events.last() {
                Some(Ok(Event::Done { .. })) => "done",
                Some(Err(EngineError::PaymentRequired(_))) => "refused",
                _ => "other",
            };
            ends.push((end, events.len()));
        }
        ends
    }

    /// A refusal that lands while another answer's end is under way (on Nexus: its charge)
    /// waits for that end: the answer was paid for, so the request is not refused. The refused
    /// answer fails on its own, and so does one still generating, which is dropped (cancelled).
    #[tokio::test]
    async fn a_refusal_during_an_answers_end_keeps_that_answer() {
        let mut slots = Slots::new(8, 3, false, (2, 0, 1));
        // The charge lasts until the stop has dropped the answer still generating: the refusal
        // lands inside it, however the tasks are scheduled.
        slots.settle_until_dropped = 1;
        let (dropped, settling, settled) = (
            slots.dropped.clone(),
            slots.settling.clone(),
            slots.settled.clone(),
        );
        let engine: Arc<dyn Engine> = Arc::new(slots);
        let streams = tokio::time::timeout(
            Duration::from_secs(20),
            admit_all(
                &engine,
                vec![request("r"), request("r-1-endless"), request("r-refused")],
            ),
        )
        .await
        .expect("admission ends")
        .expect("the answer whose end was under way is kept");
        // The end was resumed, not started again.
        assert_eq!(settling.load(Ordering::SeqCst), 1);
        assert_eq!(settled.load(Ordering::SeqCst), 1);
        let ends = tokio::time::timeout(Duration::from_secs(20), ends(streams)).await;
        // The answer stopped after three tokens is its error alone.
        assert_eq!(
            ends.expect("every answer ends"),
            [("done", 4), ("refused", 1), ("refused", 1)]
        );
        assert_eq!(
            dropped.load(Ordering::SeqCst),
            2,
            "both engine streams are gone"
        );
    }

    fn text(p: &Prompt) -> &str {
        match p {
            Prompt::Text(t) => t,
            Prompt::Chat(_) | Prompt::Embed(_) => "",
        }
    }

    /// Answer `i` of prompt `p` is choice `p * n + i`, a request of its own: a fresh id after
    /// the first, the seed moved by its index, the prompt it answers, no chat history.
    #[test]
    fn answers_fan_out_as_requests_of_their_own() {
        let first = GenerateRequest {
            request_id: "r".into(),
            model: "m".into(),
            prompt: Prompt::Text("a".into()),
            params: SamplingParams {
                seed: Some(u64::MAX - 1),
                ..SamplingParams::default()
            },
            preference: Preference::Cost,
            user: Some("0xabc".into()),
            payer: None,
            conversation: Some("c".into()),
            whole: true,
        };
        let more = [Prompt::Text("b".into()), Prompt::Text("c".into())];
        let all = fan_out(first.clone(), &more, 2);
        let ids: Vec<_> = all.iter().map(|g| g.request_id.as_str()).collect();
        assert_eq!(ids, ["r", "r-1", "r-2", "r-3", "r-4", "r-5"]);
        let prompts: Vec<_> = all.iter().map(|g| text(&g.prompt)).collect();
        assert_eq!(prompts, ["a", "a", "b", "b", "c", "c"]);
        let seeds: Vec<_> = all.iter().map(|g| g.params.seed).collect();
        assert_eq!(
            seeds,
            [u64::MAX - 1, u64::MAX, 0, 1, 2, 3].map(Some).to_vec()
        );
        let kept: Vec<_> = all.iter().map(|g| g.conversation.is_some()).collect();
        assert_eq!(kept, [true, false, false, false, false, false]);
        assert!(all.iter().all(|g| g.model == "m"
            && g.user.as_deref() == Some("0xabc")
            && g.preference == Preference::Cost
            && g.whole));

        // Without a seed every answer samples on its own; one prompt, one answer: unchanged.
        let unseeded = GenerateRequest {
            params: SamplingParams::default(),
            ..first.clone()
        };
        assert!(
            fan_out(unseeded, &[], 3)
                .iter()
                .all(|g| g.params.seed.is_none())
        );
        assert_eq!(fan_out(first.clone(), &[], 1).len(), 1);
    }
}
