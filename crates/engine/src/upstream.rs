//! Backend that forwards to any OpenAI-compatible server (llama-server, Ollama, vLLM), so an
//! operator can bring the engine they already run. Always streams from the upstream.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use http::Uri;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use http_body_util::BodyExt;
use hyper_util::client::legacy::connect::HttpConnector;
use serde::Serialize;
use serde_json::Value;

use crate::pool::{Lease, Pool};
use crate::{
    Engine, EngineError, Event, EventStream, FinishReason, GenerateRequest, Load, ModelCard,
    OutputFormat, Prompt, TokenLogprob, TopLogprob, Usage,
};

/// Longest SSE line accepted from the upstream; a bound on memory per request.
const MAX_SSE_LINE: usize = 1 << 20;

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// e.g. `http://127.0.0.1:8080/v1`
    pub base_url: String,
    /// Model name to send upstream.
    pub upstream_model: String,
    /// Model id we advertise.
    pub model_id: String,
    pub api_key: Option<String>,
    pub context_length: u32,
    /// Concurrent requests we let through; more are rejected as overloaded.
    pub max_in_flight: usize,
    pub connect_timeout: Duration,
    /// The upstream reports log probabilities in OpenAI's formats (vLLM, llama.cpp's server,
    /// another lattice node); requests for them are passed on, and an answer that comes
    /// without them fails instead of being returned without.
    pub logprobs: bool,
    /// The upstream model is an embedding model giving vectors of this many numbers:
    /// `Prompt::Embed` goes to its `/embeddings`, and text prompts are refused.
    pub dimensions: Option<u32>,
}

/// Longest part of a failed upstream response's body that is read (the rest is dropped).
const MAX_ERROR_BODY: usize = 64 << 10;
/// Idle time before TCP keepalive probes, and between them.
const TCP_KEEPALIVE: Duration = Duration::from_secs(15);

pub struct UpstreamEngine {
    cfg: UpstreamConfig,
    card: ModelCard,
    /// Connections to the upstream (hyper used directly: reqwest's layers over it — a URL
    /// re-parsed from every response, connector and header-map clones — cost ~7 µs per request,
    /// a fifth of the node's CPU under the router benchmark).
    http: Arc<Pool>,
    /// The endpoints' paths (origin form, as sent on the connection).
    chat_path: Uri,
    completions_path: Uri,
    embeddings_path: Uri,
    /// `Bearer <api key>`, marked sensitive.
    auth: Option<HeaderValue>,
    in_flight: Arc<AtomicUsize>,
}

impl UpstreamEngine {
    pub fn new(cfg: UpstreamConfig) -> Result<Self, EngineError> {
        let mut tcp = HttpConnector::new();
        tcp.set_connect_timeout(Some(cfg.connect_timeout));
        tcp.set_nodelay(true);
        tcp.enforce_http(false);
        // A dead peer or a half-open connection (mid-stream or idle in the pool) is noticed
        // within ~1 min rather than never.
        tcp.set_keepalive(Some(TCP_KEEPALIVE));
        tcp.set_keepalive_interval(Some(TCP_KEEPALIVE));
        tcp.set_keepalive_retries(Some(3));
        let tls = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
            .map_err(|e| EngineError::Internal(format!("TLS setup: {e}")))?
            .https_or_http()
            .enable_http1()
            .wrap_connector(tcp);
        let url = |path: &str| {
            let u = format!("{}/{path}", cfg.base_url.trim_end_matches('/'));
            let bad = |why: &dyn std::fmt::Display| {
                EngineError::Internal(format!("bad upstream URL `{u}`: {why}"))
            };
            let uri: Uri = u.parse().map_err(|e| bad(&e))?;
            match (uri.scheme_str(), uri.authority()) {
                (_, Some(a)) if a.as_str().contains('@') => Err(bad(
                    &"credentials in the URL are not sent; use --upstream-api-key",
                )),
                (Some("http" | "https"), Some(_)) => Ok(uri),
                _ => Err(bad(&"expected http:// or https:// and a host")),
            }
        };
        let (chat_url, completions_url) = (url("chat/completions")?, url("completions")?);
        let embeddings_url = url("embeddings")?;
        let path = |u: &Uri| -> Result<Uri, EngineError> {
            let p = u.path_and_query().map_or("/", |p| p.as_str());
            p.parse()
                .map_err(|e| EngineError::Internal(format!("bad upstream path `{p}`: {e}")))
        };
        let (chat_path, completions_path) = (path(&chat_url)?, path(&completions_url)?);
        let embeddings_path = path(&embeddings_url)?;
        // Both URLs share the base's scheme and authority (checked above).
        let mut origin = http::uri::Parts::default();
        origin.scheme = chat_url.scheme().cloned();
        origin.authority = chat_url.authority().cloned();
        origin.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        let origin = Uri::from_parts(origin)
            .map_err(|e| EngineError::Internal(format!("bad upstream URL: {e}")))?;
        let host = chat_url
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            .ok_or_else(|| EngineError::Internal("the upstream host is no header value".into()))?;
        let http = Pool::new(
            tls,
            origin,
            host,
            cfg.connect_timeout,
            cfg.max_in_flight.max(1),
        );
        let auth = match &cfg.api_key {
            Some(k) => {
                let mut v = HeaderValue::from_str(&format!("Bearer {k}")).map_err(|_| {
                    EngineError::Internal("the upstream API key is not a valid header value".into())
                })?;
                v.set_sensitive(true);
                Some(v)
            }
            None => None,
        };
        let card = ModelCard {
            id: cfg.model_id.clone(),
            context_length: cfg.context_length,
            parallel_slots: u32::try_from(cfg.max_in_flight).unwrap_or(u32::MAX),
            has_chat_template: cfg.dimensions.is_none(),
            nodes: 1,
            quantization: None,
            logprobs: cfg.logprobs && cfg.dimensions.is_none(),
            dimensions: cfg.dimensions,
        };
        Ok(Self {
            cfg,
            card,
            http,
            chat_path,
            completions_path,
            embeddings_path,
            auth,
            in_flight: Arc::new(AtomicUsize::new(0)),
        })
    }

    fn body<'a>(&'a self, req: &'a GenerateRequest) -> (&'a Uri, UpstreamBody<'a>) {
        let p = &req.params;
        let (url, messages, prompt) = match &req.prompt {
            Prompt::Chat(msgs) => (&self.chat_path, Some(msgs.as_slice()), None),
            Prompt::Text(t) => (&self.completions_path, None, Some(t.as_str())),
            // Refused before a body is built (`generate`).
            Prompt::Embed(_) => (&self.completions_path, None, None),
        };
        let body = UpstreamBody {
            model: &self.cfg.upstream_model,
            stream: true,
            stream_options: StreamOptions {
                include_usage: true,
            },
            temperature: p.temperature,
            top_p: p.top_p,
            messages,
            prompt,
            max_tokens: p.max_tokens,
            top_k: (p.top_k > 0).then_some(p.top_k),
            seed: p.seed,
            stop: &p.stop,
            ignore_eos: p.ignore_eos,
            presence_penalty: p.presence_penalty,
            frequency_penalty: p.frequency_penalty,
            logit_bias: (!p.logit_bias.is_empty()).then(|| {
                p.logit_bias
                    .iter()
                    .map(|(t, b)| (t.to_string(), serde_json::Value::from(*b)))
                    .collect()
            }),
            response_format: response_format(&p.format),
            // Chat: `logprobs: true` and `top_logprobs: k`; completions: `logprobs: k`. At
            // least 1: llama.cpp's server reports none for 0 (the answer's alternatives are cut
            // back to k when read).
            logprobs: p.logprobs.map(|k| match messages {
                Some(_) => Value::Bool(true),
                None => Value::from(k.max(1)),
            }),
            top_logprobs: p.logprobs.filter(|_| messages.is_some()).map(|k| k.max(1)),
        };
        (url, body)
    }
}

impl UpstreamEngine {
    /// Sends `body` as JSON to `path`; a response that is not a success becomes the error it
    /// says (its `error.message`, else its text).
    async fn post(
        &self,
        path: &Uri,
        request_id: &str,
        body: &impl Serialize,
    ) -> Result<(http::Response<hyper::body::Incoming>, Lease), EngineError> {
        let body = serde_json::to_vec(body)
            .map_err(|e| EngineError::Internal(format!("encoding the upstream body: {e}")))?;
        let mut rb = http::Request::post(path.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        // An id that is no header value (it came over the link) is left out, not fatal.
        if let Ok(id) = HeaderValue::from_str(request_id) {
            rb = rb.header("x-request-id", id);
        }
        if let Some(auth) = &self.auth {
            rb = rb.header(AUTHORIZATION, auth.clone());
        }
        let request = rb
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .map_err(|e| EngineError::Internal(format!("building the upstream request: {e}")))?;
        let (resp, lease) = self
            .http
            .send(request)
            .await
            .map_err(EngineError::Upstream)?;
        let status = resp.status();
        if status.is_success() {
            return Ok((resp, lease));
        }
        let text = error_body(resp.into_body()).await;
        let msg = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
            .unwrap_or(text);
        Err(match status.as_u16() {
            400 | 404 | 413 | 422 => EngineError::InvalidRequest(msg),
            429 | 503 => EngineError::Overloaded {
                capacity: self.cfg.max_in_flight,
            },
            _ => EngineError::Upstream(format!("HTTP {status}: {msg}")),
        })
    }

    /// `/embeddings` upstream, read whole (bounded by what `texts` vectors of `dims` numbers
    /// can take as JSON), checked (`embedding_answer`), and given out as events.
    async fn embed(
        &self,
        req: &GenerateRequest,
        texts: &[String],
        dims: u32,
    ) -> Result<EventStream, EngineError> {
        let prev = self.in_flight.fetch_add(1, Ordering::AcqRel);
        let _slot = InFlight(self.in_flight.clone());
        if prev >= self.cfg.max_in_flight {
            return Err(EngineError::Overloaded {
                capacity: self.cfg.max_in_flight,
            });
        }
        #[derive(Serialize)]
        struct EmbedBody<'a> {
            model: &'a str,
            input: &'a [String],
            encoding_format: &'static str,
        }
        // Borrowed, not copied into a JSON value first (up to 2,048 texts).
        let body = EmbedBody {
            model: &self.cfg.upstream_model,
            input: texts,
            encoding_format: "float",
        };
        let (resp, lease) = self
            .post(&self.embeddings_path, &req.request_id, &body)
            .await?;
        // 32 bytes per number as JSON (even pretty-printed), 128 per item's own keys, and the
        // envelope.
        let limit = texts
            .len()
            .saturating_mul((dims as usize).saturating_mul(32).saturating_add(128))
            .saturating_add(64 << 10);
        let mut stream = http_body_util::BodyDataStream::new(resp.into_body());
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| EngineError::Upstream(error_chain(&e)))?;
            if bytes.len() + chunk.len() > limit {
                return Err(EngineError::Upstream(format!(
                    "the upstream's embeddings answer is over {limit} bytes"
                )));
            }
            bytes.extend_from_slice(&chunk);
        }
        lease.finish(stream, true);
        let (vectors, prompt_tokens) = embedding_answer(&bytes, texts.len(), dims as usize)?;
        let events = vectors
            .into_iter()
            .map(|v| Ok(Event::Embedding(v)))
            .chain(std::iter::once(Ok(Event::Done {
                finish_reason: FinishReason::Stop,
                usage: Usage::new(prompt_tokens, 0),
            })));
        Ok(Box::pin(futures::stream::iter(events)) as EventStream)
    }
}

/// An upstream's `/embeddings` answer: one finite, unit-length vector of `dims` numbers per
/// text (what the node's endpoint promises and Nexus's probes check), put in the texts' order
/// by `index` (each once), and its usage's prompt tokens (what is billed, so not 0).
fn embedding_answer(
    bytes: &[u8],
    texts: usize,
    dims: usize,
) -> Result<(Vec<Vec<f32>>, u32), EngineError> {
    #[derive(serde::Deserialize)]
    struct Answer {
        data: Vec<Item>,
        usage: Option<AnswerUsage>,
    }
    #[derive(serde::Deserialize)]
    struct Item {
        index: Option<usize>,
        embedding: Vec<f32>,
    }
    #[derive(serde::Deserialize)]
    struct AnswerUsage {
        prompt_tokens: u32,
    }
    let bad = |why: String| EngineError::Upstream(format!("the upstream's embeddings: {why}"));
    let answer: Answer = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
    if answer.data.len() != texts {
        return Err(bad(format!(
            "{} vectors for {texts} texts",
            answer.data.len()
        )));
    }
    let usage = answer
        .usage
        .filter(|u| u.prompt_tokens > 0)
        .ok_or_else(|| bad("no usage (prompt tokens), so nothing to bill".into()))?;
    let mut out: Vec<Option<Vec<f32>>> = vec![None; texts];
    for (pos, item) in answer.data.into_iter().enumerate() {
        let i = item.index.unwrap_or(pos);
        if item.embedding.len() != dims {
            return Err(bad(format!(
                "a vector of {} numbers, not {dims}",
                item.embedding.len()
            )));
        }
        if item.embedding.iter().any(|x| !x.is_finite()) {
            return Err(bad("a vector that is not finite".into()));
        }
        let norm = item.embedding.iter().map(|x| x * x).sum::<f32>().sqrt();
        if (norm - 1.0).abs() > 1e-3 {
            return Err(bad(format!(
                "a vector of length {norm}, not 1: the upstream must return normalized \
                 (unit-length) pooled vectors"
            )));
        }
        match out.get_mut(i) {
            Some(slot @ None) => *slot = Some(item.embedding),
            _ => return Err(bad(format!("index {i} is out of range or repeated"))),
        }
    }
    // `texts` items, each index in range and used once: every slot is filled.
    Ok((out.into_iter().flatten().collect(), usage.prompt_tokens))
}

/// The streamed request sent upstream.
#[derive(Serialize)]
struct UpstreamBody<'a> {
    model: &'a str,
    stream: bool,
    stream_options: StreamOptions,
    temperature: f32,
    top_p: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    messages: Option<&'a [crate::Message]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_k: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<u64>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop: &'a [String],
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    ignore_eos: bool,
    #[serde(skip_serializing_if = "crate::is_zero")]
    presence_penalty: f32,
    #[serde(skip_serializing_if = "crate::is_zero")]
    frequency_penalty: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    logit_bias: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_format: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    logprobs: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_logprobs: Option<u8>,
}

/// OpenAI's `response_format` for a non-text format.
fn response_format(f: &OutputFormat) -> Option<serde_json::Value> {
    match f {
        OutputFormat::Text => None,
        OutputFormat::JsonObject => Some(serde_json::json!({"type": "json_object"})),
        OutputFormat::JsonSchema {
            name,
            schema,
            strict,
        } => {
            let mut spec = serde_json::json!({"name": name, "schema": schema});
            if let Some(strict) = strict {
                spec["strict"] = serde_json::Value::Bool(*strict);
            }
            Some(serde_json::json!({"type": "json_schema", "json_schema": spec}))
        }
    }
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

/// A response being read: its body, the connection it came on, and the request's slot.
struct Reading {
    body: http_body_util::BodyDataStream<hyper::body::Incoming>,
    lease: Lease,
    parser: SseParser,
    tr: Translate,
    /// The body's end has been read.
    body_ended: bool,
    _slot: InFlight,
}

/// Decrements the in-flight count when the response stream is dropped.
struct InFlight(Arc<AtomicUsize>);
impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Engine for UpstreamEngine {
    fn models(&self) -> Vec<ModelCard> {
        vec![self.card.clone()]
    }

    fn serves(&self, model: &str) -> bool {
        self.card.id == model
    }

    fn dimensions(&self, model: &str) -> Option<u32> {
        self.card.dimensions.filter(|_| model == self.card.id)
    }

    fn load(&self) -> Load {
        let busy = self.in_flight.load(Ordering::Acquire);
        Load {
            queued: 0,
            busy_slots: busy,
            slots: self.cfg.max_in_flight,
        }
    }

    fn generate(&self, req: GenerateRequest) -> BoxFuture<'_, Result<EventStream, EngineError>> {
        async move {
            match (&req.prompt, self.cfg.dimensions) {
                (Prompt::Embed(texts), Some(dims)) => return self.embed(&req, texts, dims).await,
                (Prompt::Embed(_), None) => {
                    return Err(EngineError::InvalidRequest(
                        "This node's upstream backend serves text generation only, not embeddings."
                            .into(),
                    ));
                }
                (_, Some(_)) => {
                    return Err(EngineError::InvalidRequest(format!(
                        "'{}' is an embedding model: it serves /v1/embeddings only",
                        self.card.id
                    )));
                }
                (_, None) => {}
            }
            if req.params.logprobs.is_some() && !self.cfg.logprobs {
                return Err(EngineError::InvalidRequest(
                    "Log probabilities are not available from this node's upstream backend.".into(),
                ));
            }
            let prev = self.in_flight.fetch_add(1, Ordering::AcqRel);
            let guard = InFlight(self.in_flight.clone());
            if prev >= self.cfg.max_in_flight {
                return Err(EngineError::Overloaded {
                    capacity: self.cfg.max_in_flight,
                });
            }
            let (url, body) = self.body(&req);
            let (resp, lease) = self.post(url, &req.request_id, &body).await?;
            let reading = Reading {
                body: http_body_util::BodyDataStream::new(resp.into_body()),
                lease,
                parser: SseParser::default(),
                tr: Translate {
                    logprobs: req.params.logprobs,
                    ..Translate::default()
                },
                body_ended: false,
                _slot: guard,
            };
            let stream = futures::stream::unfold(Some(reading), |state| async move {
                let mut st = state?;
                loop {
                    if let Some(item) = st.tr.pop() {
                        return match item {
                            Ok(Event::Done { .. }) => {
                                // The connection is given back for the next request.
                                st.lease.finish(st.body, st.body_ended);
                                Some((item, None))
                            }
                            Err(_) => Some((item, None)),
                            Ok(_) => Some((item, Some(st))),
                        };
                    }
                    match st.body.next().await {
                        Some(Ok(chunk)) => {
                            let Reading { parser, tr, .. } = &mut st;
                            if let Err(e) = parser.push(&chunk, |p| tr.feed(p)) {
                                tr.fail(e);
                            }
                        }
                        Some(Err(e)) => st.tr.fail(EngineError::Upstream(error_chain(&e))),
                        None => {
                            st.body_ended = true;
                            st.tr.end();
                        }
                    }
                }
            });
            Ok(Box::pin(stream) as EventStream)
        }
        .boxed()
    }
}

/// The first [`MAX_ERROR_BODY`] bytes of a failed response's body (what arrived, if it breaks).
async fn error_body(mut body: hyper::body::Incoming) -> String {
    let mut out = Vec::new();
    while out.len() < MAX_ERROR_BODY {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let room = MAX_ERROR_BODY - out.len();
                    out.extend_from_slice(&data[..data.len().min(room)]);
                }
            }
            Some(Err(_)) | None => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// An error and its sources, `: `-joined (hyper's own message is only "client error (Connect)").
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Splits an SSE byte stream into `data:` payloads.
#[derive(Debug, Default)]
pub struct SseParser {
    /// The unfinished last line of earlier pushes.
    buf: Vec<u8>,
}

impl SseParser {
    /// Calls `on_data` with each complete `data:` payload in `bytes` (after what earlier pushes
    /// left unfinished); keeps the unfinished rest, at most [`MAX_SSE_LINE`] bytes of it.
    pub fn push(&mut self, bytes: &[u8], mut on_data: impl FnMut(&str)) -> Result<(), EngineError> {
        let mut rest = bytes;
        if !self.buf.is_empty() {
            // Finish the pending line first; only that line is copied.
            let Some(nl) = memchr::memchr(b'\n', rest) else {
                self.buf.extend_from_slice(rest);
                return self.check_bound();
            };
            self.buf.extend_from_slice(&rest[..=nl]);
            rest = &rest[nl + 1..];
            data_line(&self.buf, &mut on_data);
            self.buf.clear();
        }
        while let Some(nl) = memchr::memchr(b'\n', rest) {
            data_line(&rest[..=nl], &mut on_data);
            rest = &rest[nl + 1..];
        }
        self.buf.extend_from_slice(rest);
        self.check_bound()
    }

    fn check_bound(&self) -> Result<(), EngineError> {
        if self.buf.len() > MAX_SSE_LINE {
            return Err(EngineError::Upstream(format!(
                "upstream sent an SSE line longer than {MAX_SSE_LINE} bytes"
            )));
        }
        Ok(())
    }
}

/// One line (with its `\n`): its payload if it is a `data:` line.
fn data_line(line: &[u8], on_data: &mut impl FnMut(&str)) {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Some(data) = line.strip_prefix(b"data:") else {
        return;
    };
    // `from_utf8` checks ASCII a word at a time; the lossy form only for a line that is not
    // valid UTF-8.
    match std::str::from_utf8(data) {
        Ok(text) => on_data(text.trim_start()),
        Err(_) => on_data(String::from_utf8_lossy(data).trim_start()),
    }
}

/// Maps OpenAI stream chunks to engine events.
#[derive(Debug, Default)]
struct Translate {
    out: std::collections::VecDeque<Result<Event, EngineError>>,
    finish: Option<FinishReason>,
    usage: Option<Usage>,
    ended: bool,
    /// The request asked for log probabilities with this many alternatives per token. Every
    /// chunk is then read whole (the fast scan skips them).
    logprobs: Option<u8>,
    /// Log probabilities have come in this answer.
    seen_logprobs: bool,
}

impl Translate {
    fn pop(&mut self) -> Option<Result<Event, EngineError>> {
        self.out.pop_front()
    }

    fn fail(&mut self, e: EngineError) {
        if !self.ended {
            self.ended = true;
            self.out.push_back(Err(e));
        }
    }

    fn feed(&mut self, payload: &str) {
        if self.ended {
            return;
        }
        if payload == "[DONE]" {
            return self.end();
        }
        if let Some(k) = self.logprobs {
            return self.feed_logprobs(payload, k);
        }
        // The usual chunk, scanned in place; the rest with serde, typed and borrowed, and what
        // that refuses through a `Value` (same rules).
        if let Some(f) = crate::chunk::scan(payload) {
            return self.apply(None, f.text, f.finish, None);
        }
        if let Ok(c) = serde_json::from_str::<crate::chunk::Chunk<'_>>(payload) {
            let f = c.fields();
            let error = c.error.as_ref().and_then(|e| e.message.as_deref());
            return self.apply(error, f.text, f.finish, c.usage);
        }
        let Some(v) = self.value(payload) else { return };
        let choice = v["choices"].get(0);
        self.apply_value(&v, choice_text(choice));
    }

    /// A chunk as a `Value`; a chunk that is no JSON fails the answer.
    fn value(&mut self, payload: &str) -> Option<Value> {
        match serde_json::from_str(payload) {
            Ok(v) => Some(v),
            Err(e) => {
                self.fail(EngineError::Upstream(format!(
                    "bad chunk from upstream: {e}"
                )));
                None
            }
        }
    }

    /// [`Translate::apply`] of a chunk read as a `Value`, with its text.
    fn apply_value(&mut self, v: &Value, text: Option<&str>) {
        let choice = v["choices"].get(0);
        let finish = choice.and_then(|ch| ch["finish_reason"].as_str());
        let usage = serde_json::from_value::<Usage>(v["usage"].clone()).ok();
        self.apply(v["error"]["message"].as_str(), text, finish, usage);
    }

    /// A chunk of an answer that reports log probabilities (`k` alternatives per token): they
    /// become an [`Event::Logprobs`] before the chunk's text, in whichever of OpenAI's shapes
    /// they come (llama.cpp's server uses chat's for completions too). An answer whose text
    /// starts without them fails (the caller asked; an upstream that ignores the field must not
    /// make them silently disappear); later text without them is kept (llama.cpp's server
    /// sends text it held back for a stop sequence that way at the end).
    fn feed_logprobs(&mut self, payload: &str, k: u8) {
        let Some(v) = self.value(payload) else { return };
        let choice = v["choices"].get(0);
        let text = choice_text(choice);
        let mut tokens = choice.map_or_else(Vec::new, |ch| {
            let lp = &ch["logprobs"];
            if lp["content"].is_array() {
                chat_logprobs(lp)
            } else {
                completion_logprobs(lp)
            }
        });
        let text_first = text.is_some_and(|t| !t.is_empty()) && !self.seen_logprobs;
        if tokens.is_empty() && text_first && v["error"].is_null() {
            return self.fail(EngineError::Upstream(
                "the upstream answered without the log probabilities asked for".into(),
            ));
        }
        if !tokens.is_empty() {
            for t in &mut tokens {
                t.top.sort_by(|a, b| b.logprob.total_cmp(&a.logprob));
                t.top.truncate(usize::from(k));
            }
            self.seen_logprobs = true;
            self.out.push_back(Ok(Event::Logprobs(tokens)));
        }
        self.apply_value(&v, text);
    }

    /// One chunk's parts: an error ends the stream; otherwise its text, finish reason and usage.
    fn apply(
        &mut self,
        error: Option<&str>,
        text: Option<&str>,
        finish: Option<&str>,
        usage: Option<Usage>,
    ) {
        if let Some(msg) = error {
            return self.fail(EngineError::Upstream(msg.to_owned()));
        }
        if let Some(t) = text.filter(|t| !t.is_empty()) {
            self.out.push_back(Ok(Event::Delta(t.to_owned())));
        }
        match finish {
            Some("length") => self.finish = Some(FinishReason::Length),
            Some(_) => self.finish = Some(FinishReason::Stop),
            None => {}
        }
        if usage.is_some() {
            self.usage = usage;
        }
    }

    fn end(&mut self) {
        if self.ended {
            return;
        }
        self.ended = true;
        match self.finish {
            Some(finish_reason) => self.out.push_back(Ok(Event::Done {
                finish_reason,
                usage: self.usage.unwrap_or_default(),
            })),
            None => self.out.push_back(Err(EngineError::Upstream(
                "upstream closed the stream before finishing".into(),
            ))),
        }
    }
}

/// A chunk choice's text: chat's `delta.content`, or completions' `text`.
fn choice_text(choice: Option<&Value>) -> Option<&str> {
    choice.and_then(|ch| {
        ch["delta"]["content"]
            .as_str()
            .or_else(|| ch["text"].as_str())
    })
}

/// A log probability as the upstream wrote it (a number; anything else is −9999, as we write a
/// −∞ one).
fn logprob(v: &Value) -> f32 {
    v.as_f64().map_or(-9999.0, |l| l as f32)
}

/// A token's bytes: its `bytes` list when given, else its text's.
fn token_bytes(v: &Value, token: &str) -> Vec<u8> {
    v.as_array()
        .and_then(|b| {
            b.iter()
                .map(|x| x.as_u64().and_then(|x| u8::try_from(x).ok()))
                .collect::<Option<Vec<u8>>>()
        })
        .unwrap_or_else(|| token.as_bytes().to_vec())
}

/// Chat's `logprobs`: `{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob,
/// bytes}]}]}`.
fn chat_logprobs(v: &Value) -> Vec<TokenLogprob> {
    let Some(content) = v["content"].as_array() else {
        return Vec::new();
    };
    content
        .iter()
        .map(|t| {
            let token = t["token"].as_str().unwrap_or_default().to_owned();
            let top = t["top_logprobs"]
                .as_array()
                .map(|alts| {
                    alts.iter()
                        .map(|a| {
                            let token = a["token"].as_str().unwrap_or_default().to_owned();
                            TopLogprob {
                                bytes: token_bytes(&a["bytes"], &token),
                                logprob: logprob(&a["logprob"]),
                                token,
                            }
                        })
                        .collect()
                })
                .unwrap_or_default();
            TokenLogprob {
                bytes: token_bytes(&t["bytes"], &token),
                logprob: logprob(&t["logprob"]),
                token,
                top,
            }
        })
        .collect()
}

/// Completions' `logprobs`: parallel `tokens`, `token_logprobs` and `top_logprobs` (a map of
/// text to log probability per token).
fn completion_logprobs(v: &Value) -> Vec<TokenLogprob> {
    let Some(tokens) = v["tokens"].as_array() else {
        return Vec::new();
    };
    let lps = v["token_logprobs"].as_array();
    let tops = v["top_logprobs"].as_array();
    tokens
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let token = t.as_str().unwrap_or_default().to_owned();
            let top = tops
                .and_then(|all| all.get(i))
                .and_then(Value::as_object)
                .map(|m| {
                    m.iter()
                        .map(|(alt, lp)| TopLogprob {
                            token: alt.clone(),
                            bytes: alt.as_bytes().to_vec(),
                            logprob: logprob(lp),
                        })
                        .collect()
                })
                .unwrap_or_default();
            TokenLogprob {
                bytes: token.as_bytes().to_vec(),
                logprob: lps.and_then(|l| l.get(i)).map_or(-9999.0, logprob),
                token,
                top,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SamplingParams;

    fn payloads(p: &mut SseParser, bytes: &[u8]) -> Result<Vec<String>, EngineError> {
        let mut out = Vec::new();
        p.push(bytes, |d| out.push(d.to_owned()))?;
        Ok(out)
    }

    #[test]
    fn embedding_answers_are_checked_and_put_in_order() {
        let ok = br#"{"object":"list","data":[
            {"object":"embedding","index":1,"embedding":[0.0,1.0]},
            {"object":"embedding","index":0,"embedding":[1.0,0.0]}],
            "model":"m","usage":{"prompt_tokens":7,"total_tokens":7}}"#;
        let (v, tokens) = embedding_answer(ok, 2, 2).unwrap();
        assert_eq!(v, vec![vec![1.0, 0.0], vec![0.0, 1.0]]);
        assert_eq!(tokens, 7);
        // Without indexes, in the order given.
        let plain = br#"{"data":[{"embedding":[0.6,0.8]},{"embedding":[0.8,-0.6]}],
            "usage":{"prompt_tokens":2}}"#;
        assert_eq!(embedding_answer(plain, 2, 2).unwrap().0[1], vec![0.8, -0.6]);
        let refused = |body: &[u8], texts, dims| match embedding_answer(body, texts, dims) {
            Err(EngineError::Upstream(m)) => m,
            other => panic!("{other:?}"),
        };
        assert!(refused(ok, 3, 2).contains("2 vectors for 3 texts"));
        assert!(refused(ok, 2, 3).contains("not 3"));
        let twice = br#"{"data":[{"index":0,"embedding":[1]},{"index":0,"embedding":[-1]}],"usage":{"prompt_tokens":2}}"#;
        assert!(refused(twice, 2, 1).contains("repeated"));
        let beyond = br#"{"data":[{"index":5,"embedding":[1]}],"usage":{"prompt_tokens":2}}"#;
        assert!(refused(beyond, 1, 1).contains("out of range"));
        let unbilled = br#"{"data":[{"index":0,"embedding":[1]}]}"#;
        assert!(refused(unbilled, 1, 1).contains("no usage"));
        let free = br#"{"data":[{"index":0,"embedding":[1]}],"usage":{"prompt_tokens":0}}"#;
        assert!(refused(free, 1, 1).contains("no usage"));
        let raw = br#"{"data":[{"index":0,"embedding":[3,4]}],"usage":{"prompt_tokens":2}}"#;
        assert!(refused(raw, 1, 2).contains("length 5, not 1"));
        let huge = br#"{"data":[{"index":0,"embedding":[1e300]}],"usage":{"prompt_tokens":2}}"#;
        assert!(refused(huge, 1, 1).contains("not finite"));
        assert!(refused(b"<html>", 1, 1).contains("expected value"));
    }

    #[test]
    fn sse_parser_handles_split_lines_and_crlf() {
        let mut p = SseParser::default();
        assert_eq!(payloads(&mut p, b"data: {\"a\"").ok(), Some(vec![]));
        assert_eq!(payloads(&mut p, b":").ok(), Some(vec![]));
        assert_eq!(
            payloads(&mut p, b"1}\r\n\r\n: comment\ndata: [DONE]\ndata:x").ok(),
            Some(vec!["{\"a\":1}".to_owned(), "[DONE]".to_owned()])
        );
        assert_eq!(payloads(&mut p, b"y\n").ok(), Some(vec!["xy".to_owned()]));
    }

    /// A line that is not UTF-8 (a broken upstream) still arrives, with replacement characters.
    #[test]
    fn sse_parser_replaces_invalid_utf8() {
        let mut p = SseParser::default();
        assert_eq!(
            payloads(&mut p, b"data: caf\xc3\xa9\ndata: a\xffb\n").ok(),
            Some(vec!["caf\u{e9}".to_owned(), "a\u{fffd}b".to_owned()])
        );
    }

    #[test]
    fn sse_parser_bounds_line_length() {
        let mut p = SseParser::default();
        assert!(payloads(&mut p, &vec![b'x'; MAX_SSE_LINE + 1]).is_err());
        let mut p = SseParser::default();
        assert!(payloads(&mut p, &vec![b'x'; MAX_SSE_LINE]).is_ok());
        assert!(
            payloads(&mut p, b"x").is_err(),
            "the bound holds across pushes"
        );
    }

    /// Chunks of unusual shape take the `Value` path and follow the same rules.
    #[test]
    fn translate_odd_chunks() {
        let mut t = Translate::default();
        t.feed(r#"{"choices":null}"#);
        t.feed(r#"{"choices":[{"delta":{"content":["no"]},"text":"a"}]}"#);
        t.feed(r#"{"choices":[{"delta":{"content":"b"},"finish_reason":"stop"}],"usage":{"prompt_tokens":2}}"#);
        t.feed(r#"{"error":"a string, not an object","choices":[{"text":"c"}]}"#);
        t.feed("[DONE]");
        let events: Vec<_> = std::iter::from_fn(|| t.pop()).collect();
        assert_eq!(
            events,
            vec![
                Ok(Event::Delta("a".into())),
                Ok(Event::Delta("b".into())),
                Ok(Event::Delta("c".into())),
                Ok(Event::Done {
                    finish_reason: FinishReason::Stop,
                    usage: Usage::default()
                })
            ]
        );
        let mut t = Translate::default();
        t.feed(r#"{"error":{"message":"boom"}}"#);
        t.feed(r#"{"choices":[{"text":"late"}]}"#);
        assert_eq!(t.pop(), Some(Err(EngineError::Upstream("boom".into()))));
        assert_eq!(t.pop(), None);
        let mut t = Translate::default();
        t.feed("not json");
        assert!(matches!(t.pop(), Some(Err(EngineError::Upstream(_)))));
    }

    #[test]
    fn translate_chat_stream() {
        let mut t = Translate::default();
        t.feed(r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#);
        t.feed(r#"{"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}"#);
        t.feed(r#"{"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}"#);
        t.feed(
            r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#,
        );
        t.feed("[DONE]");
        assert_eq!(t.pop(), Some(Ok(Event::Delta("Hi".into()))));
        assert_eq!(
            t.pop(),
            Some(Ok(Event::Done {
                finish_reason: FinishReason::Length,
                usage: Usage::new(3, 1)
            }))
        );
        assert_eq!(t.pop(), None);
    }

    /// Log probabilities in both of OpenAI's formats become an event before their text; a
    /// chunk with text but none fails the answer.
    #[test]
    fn translate_log_probabilities() {
        let mut t = Translate {
            logprobs: Some(2),
            ..Translate::default()
        };
        t.feed(r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}"#);
        t.feed(r#"{"choices":[{"index":0,"delta":{"content":"Hé"},"logprobs":{"content":[{"token":"H","logprob":-0.5,"bytes":[72],"top_logprobs":[{"token":"H","logprob":-0.5,"bytes":[72]},{"token":"W","logprob":-1.25,"bytes":null}]},{"token":"é","logprob":-2,"bytes":[195,169],"top_logprobs":[]}]},"finish_reason":null}]}"#);
        // Text held back for a stop sequence comes at the end without log probabilities.
        t.feed(r#"{"choices":[{"index":0,"delta":{"content":"!"},"finish_reason":null}]}"#);
        t.feed(r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#);
        t.feed("[DONE]");
        let top = |token: &str, logprob: f32, bytes: &[u8]| TopLogprob {
            token: token.into(),
            logprob,
            bytes: bytes.to_vec(),
        };
        assert_eq!(
            t.pop(),
            Some(Ok(Event::Logprobs(vec![
                TokenLogprob {
                    token: "H".into(),
                    bytes: vec![72],
                    logprob: -0.5,
                    top: vec![top("H", -0.5, b"H"), top("W", -1.25, b"W")],
                },
                TokenLogprob {
                    token: "é".into(),
                    bytes: vec![195, 169],
                    logprob: -2.0,
                    top: Vec::new(),
                },
            ])))
        );
        assert_eq!(t.pop(), Some(Ok(Event::Delta("Hé".into()))));
        assert_eq!(t.pop(), Some(Ok(Event::Delta("!".into()))));
        assert!(matches!(t.pop(), Some(Ok(Event::Done { .. }))));

        // llama.cpp's server: completions in chat's shape; alternatives cut back to k.
        let mut t = Translate {
            logprobs: Some(1),
            ..Translate::default()
        };
        t.feed(r#"{"choices":[{"index":0,"text":" 5","logprobs":{"content":[{"id":642,"token":" 5","logprob":-0.1,"bytes":[32,53],"top_logprobs":[{"id":643,"token":" 6","logprob":-3.5,"bytes":[32,54]},{"id":642,"token":" 5","logprob":-0.1,"bytes":[32,53]}]}]},"finish_reason":null}]}"#);
        let Some(Ok(Event::Logprobs(l))) = t.pop() else {
            unreachable!("log probabilities first")
        };
        assert_eq!(l.len(), 1);
        assert_eq!(
            l[0].top
                .iter()
                .map(|a| a.token.as_str())
                .collect::<Vec<_>>(),
            [" 5"],
            "the most likely, cut to k"
        );

        let mut t = Translate {
            logprobs: Some(2),
            ..Translate::default()
        };
        t.feed(r#"{"choices":[{"index":0,"text":" 5,","logprobs":{"tokens":[" 5",","],"token_logprobs":[-0.25,null],"top_logprobs":[{" 6":-3.0," 5":-0.25},null],"text_offset":[0,2]},"finish_reason":null}]}"#);
        let Some(Ok(Event::Logprobs(l))) = t.pop() else {
            unreachable!("log probabilities first")
        };
        let got: Vec<_> = l
            .iter()
            .map(|t| (t.token.as_str(), t.logprob, t.top.len()))
            .collect();
        assert_eq!(got, [(" 5", -0.25, 2), (",", -9999.0, 0)]);
        assert_eq!(
            l[0].top
                .iter()
                .map(|a| a.token.as_str())
                .collect::<Vec<_>>(),
            [" 5", " 6"],
            "most likely first"
        );
        assert_eq!(t.pop(), Some(Ok(Event::Delta(" 5,".into()))));

        // An upstream that ignored the request's `logprobs`.
        let mut t = Translate {
            logprobs: Some(0),
            ..Translate::default()
        };
        t.feed(r#"{"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}"#);
        assert!(
            matches!(t.pop(), Some(Err(EngineError::Upstream(m))) if m.contains("log probabilities"))
        );
        assert_eq!(t.pop(), None);
    }

    /// Log probabilities are asked for in each endpoint's form, with at least one alternative
    /// (llama.cpp's server reports none for 0).
    #[test]
    fn log_probabilities_are_asked_for_upstream() {
        let e = engine("http://127.0.0.1:9/v1".into(), None);
        let with = |prompt: Prompt, k: u8| {
            let mut r = request("r");
            r.prompt = prompt;
            r.params.logprobs = Some(k);
            let (_, body) = e.body(&r);
            serde_json::to_value(&body).unwrap_or_default()
        };
        let chat = Prompt::Chat(vec![crate::Message {
            role: "user".into(),
            content: "hi".into(),
        }]);
        let b = with(chat.clone(), 0);
        assert_eq!(
            (&b["logprobs"], &b["top_logprobs"]),
            (&Value::Bool(true), &Value::from(1))
        );
        let b = with(chat, 5);
        assert_eq!(b["top_logprobs"], 5);
        let b = with(Prompt::Text("1,".into()), 0);
        assert_eq!(
            (&b["logprobs"], &b["top_logprobs"]),
            (&Value::from(1), &Value::Null)
        );
        let b = with(Prompt::Text("1,".into()), 3);
        assert_eq!(b["logprobs"], 3);
        let plain = serde_json::to_value(e.body(&request("r")).1).unwrap_or_default();
        assert!(plain.get("logprobs").is_none() && plain.get("top_logprobs").is_none());
    }

    #[test]
    fn truncated_stream_is_an_error() {
        let mut t = Translate::default();
        t.feed(r#"{"choices":[{"index":0,"text":"a","finish_reason":null}]}"#);
        t.end();
        assert_eq!(t.pop(), Some(Ok(Event::Delta("a".into()))));
        assert!(matches!(t.pop(), Some(Err(EngineError::Upstream(_)))));
    }

    /// Serves `app` on a loopback port; its `/v1` base URL and a count of accepted connections.
    async fn serve_counted(app: axum::Router) -> (String, Arc<AtomicUsize>) {
        use axum::serve::ListenerExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await;
        let Ok(listener) = listener else {
            unreachable!("bind")
        };
        let Ok(addr) = listener.local_addr() else {
            unreachable!("addr")
        };
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let listener = listener.tap_io(move |_| {
            count.fetch_add(1, Ordering::SeqCst);
        });
        tokio::spawn(async move { axum::serve(listener, app).await });
        (format!("http://{addr}/v1"), accepted)
    }

    async fn serve(app: axum::Router) -> String {
        serve_counted(app).await.0
    }

    fn engine(base_url: String, api_key: Option<&str>) -> UpstreamEngine {
        let engine = UpstreamEngine::new(UpstreamConfig {
            base_url,
            upstream_model: "up-model".into(),
            model_id: "mine".into(),
            api_key: api_key.map(str::to_owned),
            context_length: 2048,
            max_in_flight: 2,
            connect_timeout: Duration::from_secs(2),
            logprobs: false,
            dimensions: None,
        });
        let Ok(engine) = engine else {
            unreachable!("client")
        };
        engine
    }

    fn request(id: &str) -> GenerateRequest {
        GenerateRequest {
            request_id: id.into(),
            model: "mine".into(),
            prompt: Prompt::Text("Say".into()),
            params: SamplingParams::default(),
            preference: crate::Preference::default(),
            user: None,
            payer: None,
            conversation: None,
            whole: false,
        }
    }

    /// A real HTTP round trip against a canned OpenAI-compatible upstream on loopback: the body,
    /// the API key and the request id reach it; its SSE answer comes back as events.
    #[tokio::test]
    async fn proxies_a_streamed_completion() {
        use axum::http::HeaderMap;
        use axum::routing::post;
        let app = axum::Router::new().route(
            "/v1/completions",
            post(|headers: HeaderMap, body: axum::Json<Value>| async move {
                assert_eq!(body["prompt"], "Say");
                assert_eq!(body["model"], "up-model");
                assert_eq!(body["stream"], true);
                assert_eq!(headers["authorization"], "Bearer sk-up");
                assert_eq!(headers["x-request-id"], "r1");
                "data: {\"choices\":[{\"index\":0,\"text\":\" hi\",\"finish_reason\":null}]}\n\n\
                 data: {\"choices\":[{\"index\":0,\"text\":\"\",\"finish_reason\":\"stop\"}]}\n\n\
                 data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1,\"total_tokens\":2}}\n\n\
                 data: [DONE]\n\n"
            }),
        );
        let (base, accepted) = serve_counted(app).await;
        let engine = engine(base, Some("sk-up"));
        // Twice: the second request reuses the pooled connection.
        for _ in 0..2 {
            let stream = engine.generate(request("r1")).await;
            let Ok(stream) = stream else {
                unreachable!("generate")
            };
            let events: Vec<_> = stream.collect().await;
            assert_eq!(
                events,
                vec![
                    Ok(Event::Delta(" hi".into())),
                    Ok(Event::Done {
                        finish_reason: FinishReason::Stop,
                        usage: Usage::new(1, 1)
                    })
                ]
            );
            assert_eq!(
                engine.load().busy_slots,
                0,
                "slot released when the stream ends"
            );
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "one pooled connection");
    }

    /// The canned stream of [`proxies_a_streamed_completion`], as an SSE body.
    const CANNED: &str = "data: {\"choices\":[{\"index\":0,\"text\":\" hi\",\"finish_reason\":null}]}\n\n\
         data: {\"choices\":[{\"index\":0,\"text\":\"\",\"finish_reason\":\"stop\"}]}\n\n\
         data: [DONE]\n\n";

    /// A chunked body: `first`, then its end after `delay`.
    fn late_ending(first: &'static str, delay: Duration) -> axum::body::Body {
        let first = futures::stream::once(async move { Ok::<_, std::convert::Infallible>(first) });
        let end = futures::stream::once(async move {
            tokio::time::sleep(delay).await;
            Ok("")
        });
        axum::body::Body::from_stream(first.chain(end))
    }

    async fn answered(e: &UpstreamEngine, id: &str) -> Vec<Result<Event, EngineError>> {
        match e.generate(request(id)).await {
            Ok(stream) => stream.collect().await,
            Err(err) => vec![Err(err)],
        }
    }

    fn hi() -> Vec<Result<Event, EngineError>> {
        vec![
            Ok(Event::Delta(" hi".into())),
            Ok(Event::Done {
                finish_reason: FinishReason::Stop,
                usage: Usage::default(),
            }),
        ]
    }

    /// A server that closes each connection after its response (`Connection: close`): the
    /// closed connection is not handed out again, every request gets a new one and succeeds.
    #[tokio::test]
    async fn connections_the_server_closes_are_not_reused() {
        use axum::routing::post;
        let app = axum::Router::new().route(
            "/v1/completions",
            post(|| async { ([(http::header::CONNECTION, "close")], CANNED) }),
        );
        let (base, accepted) = serve_counted(app).await;
        let e = engine(base, None);
        for i in 0..3 {
            assert_eq!(answered(&e, &format!("c{i}")).await, hi());
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    /// A stream dropped before its end (a client gone) leaves its connection unusable; the next
    /// request must not get it, and a finished stream's connection is kept for reuse.
    #[tokio::test]
    async fn a_stream_dropped_midway_does_not_poison_the_pool() {
        use axum::routing::post;
        let app = axum::Router::new()
            .route(
                "/v1/completions",
                post(|| async { CANNED }),
            )
            .route(
                "/v1/chat/completions",
                post(|| async {
                    // The first chunk, then nothing more for a long while.
                    late_ending(
                        "data: {\"choices\":[{\"index\":0,\"text\":\"a\",\"finish_reason\":null}]}\n\n",
                        Duration::from_secs(3600),
                    )
                }),
            );
        let (base, accepted) = serve_counted(app).await;
        let e = engine(base, None);
        let mut chat = request("midway");
        chat.prompt = Prompt::Chat(Vec::new());
        let Ok(mut stream) = e.generate(chat).await else {
            unreachable!("generate")
        };
        assert_eq!(stream.next().await, Some(Ok(Event::Delta("a".into()))));
        drop(stream);
        assert_eq!(
            e.http.idle_count(),
            0,
            "an unfinished response's connection is not kept"
        );
        for i in 0..2 {
            assert_eq!(answered(&e, &format!("after{i}")).await, hi());
        }
        assert_eq!(
            e.http.idle_count(),
            1,
            "a finished response's connection is kept"
        );
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "the stalled connection, then one reused for both answers"
        );
    }

    /// A body whose end comes a little after `[DONE]`: the answer ends at `[DONE]`, and the
    /// connection is reused once the body's end has been read in the background.
    #[tokio::test]
    async fn a_late_body_end_is_read_before_reuse() {
        use axum::routing::post;
        let app = axum::Router::new().route(
            "/v1/completions",
            post(|| async { late_ending(CANNED, Duration::from_millis(100)) }),
        );
        let (base, accepted) = serve_counted(app).await;
        let e = engine(base, None);
        assert_eq!(answered(&e, "late0").await, hi());
        assert_eq!(e.http.idle_count(), 0, "not before the body has ended");
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(e.http.idle_count(), 1, "after the body has ended");
        assert_eq!(answered(&e, "late1").await, hi());
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    /// An idle connection the server closed meanwhile is dropped, not used.
    #[tokio::test]
    async fn idle_connections_closed_by_the_server_are_dropped() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        // Answers one request per connection (keep-alive offered), then closes it.
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 << 10];
                    let mut got = Vec::new();
                    // Head and the JSON body (it ends with `}`).
                    while !(got.windows(4).any(|w| w == b"\r\n\r\n") && got.ends_with(b"}")) {
                        match sock.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: {}\r\n\r\n",
                        CANNED.len()
                    );
                    let _ = sock.write_all(head.as_bytes()).await;
                    let _ = sock.write_all(CANNED.as_bytes()).await;
                });
            }
        });
        let e = engine(format!("http://{addr}/v1"), None);
        for i in 0..3 {
            assert_eq!(answered(&e, &format!("i{i}")).await, hi());
            // Time for the connection task to see the server's close.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    /// A failed response's message is read up to its bound, not dropped for being long.
    #[tokio::test]
    async fn long_error_bodies_are_cut_not_lost() {
        use axum::http::StatusCode;
        use axum::routing::post;
        let app = axum::Router::new().route(
            "/v1/completions",
            post(|| async { (StatusCode::BAD_REQUEST, "e".repeat(3 * MAX_ERROR_BODY)) }),
        );
        let e = engine(serve(app).await, None);
        match e.generate(request("r5")).await.err() {
            Some(EngineError::InvalidRequest(msg)) => {
                assert_eq!(msg.len(), MAX_ERROR_BODY);
                assert!(msg.bytes().all(|b| b == b'e'));
            }
            other => unreachable!("expected the upstream's 400, got {other:?}"),
        }
        assert_eq!(e.load().busy_slots, 0);
    }

    /// The connect deadline covers the TLS handshake: a server that accepts TCP and then says
    /// nothing fails the request in time.
    #[tokio::test]
    async fn a_stalled_tls_handshake_times_out() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await;
        let Ok(listener) = listener else {
            unreachable!("bind")
        };
        let Ok(addr) = listener.local_addr() else {
            unreachable!("addr")
        };
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((sock, _)) = listener.accept().await {
                held.push(sock);
            }
        });
        let e = UpstreamEngine::new(UpstreamConfig {
            connect_timeout: Duration::from_millis(300),
            ..engine(format!("https://{addr}/v1"), None).cfg
        });
        let Ok(e) = e else { unreachable!("client") };
        let outcome =
            tokio::time::timeout(Duration::from_secs(10), e.generate(request("r6"))).await;
        match outcome {
            Ok(Err(EngineError::Upstream(msg))) => {
                assert!(msg.contains("connecting took longer"), "{msg}");
            }
            Ok(other) => unreachable!("expected a connect timeout, got {:?}", other.err()),
            Err(_) => unreachable!("the handshake was not bounded"),
        }
        assert_eq!(e.load().busy_slots, 0);
    }

    /// Upstream failures map to the engine's errors: its 4xx message, overload, other statuses
    /// and an unreachable server (with the cause, not just "client error").
    #[tokio::test]
    async fn upstream_errors_keep_their_meaning() {
        use axum::http::StatusCode;
        use axum::routing::post;
        let app = axum::Router::new()
            .route(
                "/v1/completions",
                post(|| async {
                    (
                        StatusCode::BAD_REQUEST,
                        r#"{"error":{"message":"prompt too long"}}"#,
                    )
                }),
            )
            .route(
                "/v1/chat/completions",
                post(|| async { (StatusCode::TOO_MANY_REQUESTS, "slow down") }),
            );
        let base = serve(app).await;
        let e = engine(base.clone(), None);
        let err = e.generate(request("r2")).await.err();
        assert_eq!(
            err,
            Some(EngineError::InvalidRequest("prompt too long".into()))
        );
        let mut chat = request("bad\nid");
        chat.prompt = Prompt::Chat(Vec::new());
        let err = e.generate(chat).await.err();
        assert_eq!(err, Some(EngineError::Overloaded { capacity: 2 }));
        assert_eq!(e.load().busy_slots, 0, "failed requests free their slots");

        let missing = engine(base.replace("/v1", "/nothing"), None);
        let err = missing.generate(request("r3")).await.err();
        assert!(
            matches!(&err, Some(EngineError::InvalidRequest(_))),
            "404 is the request's fault: {err:?}"
        );

        // A port bound but not listening refuses connections, and stays ours while the socket
        // lives (a closed one could be taken by another test in between).
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let port = socket.local_addr().unwrap().port();
        let gone = engine(format!("http://127.0.0.1:{port}/v1"), None);
        match gone.generate(request("r4")).await.err() {
            Some(EngineError::Upstream(msg)) => {
                assert!(msg.contains("refused"), "the cause is kept: {msg}");
            }
            other => unreachable!("expected an upstream error, got {other:?}"),
        }
        for bad in ["ftp://127.0.0.1/v1", "http://user:pw@127.0.0.1/v1", "/v1"] {
            assert!(
                UpstreamEngine::new(UpstreamConfig {
                    base_url: bad.into(),
                    ..gone.cfg.clone()
                })
                .is_err(),
                "{bad}"
            );
        }
    }
}
