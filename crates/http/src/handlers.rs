//! HTTP handlers. The request path reads top to bottom: parse → validate → generate → respond.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use lattice_api::{ApiError, ChatCompletionRequest, CompletionRequest, ModelList, ModelObject};
use lattice_engine::{GenerateRequest, ModelCard, Preference, Prompt, SamplingParams};
use serde::de::DeserializeOwned;

use crate::stream::{self, Kind, Meta, Tracker};
use crate::{ApiErrorResponse, AppState, params};

type HandlerResult = Result<Response, ApiErrorResponse>;

/// An OpenAI request body this API serves, validated into engine terms.
trait OpenAiRequest: DeserializeOwned {
    const KIND: Kind;
    fn validate(self, limits: &crate::Limits) -> Result<Validated, ApiError>;
}

impl OpenAiRequest for ChatCompletionRequest {
    const KIND: Kind = Kind::Chat;
    fn validate(self, limits: &crate::Limits) -> Result<Validated, ApiError> {
        let (prompt, params, tools) = params::chat(&self, limits)?;
        let include_usage = self
            .sampling
            .stream_options
            .is_some_and(|o| o.include_usage);
        Ok(Validated {
            model: self.model,
            prompt,
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
        let (prompt, params) = params::completion(&self, limits)?;
        let include_usage = self
            .sampling
            .stream_options
            .is_some_and(|o| o.include_usage);
        Ok(Validated {
            model: self.model,
            prompt,
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
        check_model(&st, &v.model)?;
        Ok(v)
    });
    respond(st, &headers, R::KIND, started, validated, payer).await
}

struct Validated {
    model: String,
    prompt: Prompt,
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
        prompt,
        params,
        streaming,
        include_usage,
        tools,
    } = validated.inspect_err(|e| {
        st.metrics.request(kind.endpoint(), outcome(e.status));
    })?;
    // A paid request's id keys its hold, charge and receipt, so it is always fresh: the
    // caller's `x-request-id` is kept only for unpaid requests (Nexus → node) and logged. It is
    // time-ordered (UUIDv7: 48 bits of milliseconds, 74 random), so the ledger's rows keyed by
    // it are appended at the end of their indexes instead of splitting pages anywhere.
    let request_id = if payer.is_some() {
        let id = uuid::Uuid::now_v7().simple().to_string();
        if let Some(theirs) = headers.get("x-request-id").and_then(|v| v.to_str().ok()) {
            tracing::debug!(request_id = %id, client_request_id = %theirs, "paid request");
        }
        id
    } else {
        request_id(headers)
    };
    let preference = preference(headers).inspect_err(|e| {
        st.metrics.request(kind.endpoint(), outcome(e.status));
    })?;
    let logprobs = params.logprobs.is_some();
    let gen_req = GenerateRequest {
        request_id: request_id.clone(),
        model: model.clone(),
        prompt,
        params,
        preference,
        user: payer.as_ref().map(|p| p.address.clone()),
        conversation: payer.as_ref().and_then(|_| conversation(headers)),
        whole: !streaming,
        payer,
    };
    let events = st.engine.generate(gen_req).await.map_err(|e| {
        let api = stream::engine_error(&e);
        st.metrics.request(kind.endpoint(), outcome(api.status));
        tracing::debug!(request_id = %request_id, error = %e, "request rejected by the engine");
        api
    })?;
    let prefix = match kind {
        Kind::Chat => "chatcmpl",
        Kind::Completion => "cmpl",
    };
    let meta = Meta {
        id: format!("{prefix}-{request_id}"),
        created: unix_now(),
        model,
        kind,
        include_usage,
        tools,
        logprobs,
    };
    let tracker = Tracker::new(st.clone(), kind, request_id.clone(), started);
    let rid = HeaderValue::from_str(&request_id).unwrap_or(HeaderValue::from_static("invalid"));
    if streaming {
        let body = Body::from_stream(stream::sse(meta, events, tracker));
        let mut resp = (StatusCode::OK, body).into_response();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        h.insert("x-request-id", rid);
        return Ok(resp);
    }
    let json = stream::collect(&meta, events, tracker).await?;
    let mut resp = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        json,
    )
        .into_response();
    resp.headers_mut().insert("x-request-id", rid);
    Ok(resp)
}

fn outcome(status: u16) -> &'static str {
    match status {
        429 | 503 => "overloaded",
        400..=499 => "client_error",
        _ => "error",
    }
}

fn parse_body<T: DeserializeOwned>(
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

fn check_model(st: &AppState, model: &str) -> Result<(), ApiError> {
    if st.engine.serves(model) {
        Ok(())
    } else {
        Err(ApiError::model_not_found(model))
    }
}

/// `x-lattice-preference: latency | cost | quality` steers Nexus's routing.
fn preference(headers: &HeaderMap) -> Result<Preference, ApiError> {
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

/// Keeps a caller's request id (Nexus sets one) when it is short and printable.
/// `x-lattice-conversation`: where an opted-in user's exchange is kept (ids like `[A-Za-z0-9_-]{1,64}`).
fn conversation(headers: &HeaderMap) -> Option<String> {
    let v = headers.get("x-lattice-conversation")?.to_str().ok()?;
    (!v.is_empty()
        && v.len() <= 64
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'))
    .then(|| v.to_owned())
}

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
