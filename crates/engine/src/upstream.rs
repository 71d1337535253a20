//! Backend that forwards to any OpenAI-compatible server (llama-server, Ollama, vLLM), so an
//! operator can bring the engine they already run. Always streams from the upstream.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use serde_json::{Value, json};

use crate::{
    Engine, EngineError, Event, EventStream, FinishReason, GenerateRequest, Load, ModelCard,
    Prompt, Usage,
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
}

pub struct UpstreamEngine {
    cfg: UpstreamConfig,
    card: ModelCard,
    http: reqwest::Client,
    in_flight: Arc<AtomicUsize>,
}

impl UpstreamEngine {
    pub fn new(cfg: UpstreamConfig) -> Result<Self, EngineError> {
        let http = reqwest::Client::builder()
            .connect_timeout(cfg.connect_timeout)
            .tcp_nodelay(true)
            .build()
            .map_err(|e| EngineError::Internal(e.to_string()))?;
        let card = ModelCard {
            id: cfg.model_id.clone(),
            context_length: cfg.context_length,
            parallel_slots: u32::try_from(cfg.max_in_flight).unwrap_or(u32::MAX),
            has_chat_template: true,
            nodes: 1,
            quantization: None,
        };
        Ok(Self {
            cfg,
            card,
            http,
            in_flight: Arc::new(AtomicUsize::new(0)),
        })
    }

    fn body(&self, req: &GenerateRequest) -> (String, Value) {
        let p = &req.params;
        let mut body = json!({
            "model": self.cfg.upstream_model,
            "stream": true,
            "stream_options": {"include_usage": true},
            "temperature": p.temperature,
            "top_p": p.top_p,
        });
        let (path, key, value) = match &req.prompt {
            Prompt::Chat(msgs) => (
                "chat/completions",
                "messages",
                Value::Array(
                    msgs.iter()
                        .map(|m| json!({"role": m.role, "content": m.content}))
                        .collect(),
                ),
            ),
            Prompt::Text(t) => ("completions", "prompt", Value::String(t.clone())),
        };
        if let Some(obj) = body.as_object_mut() {
            obj.insert(key.into(), value);
            if let Some(m) = p.max_tokens {
                obj.insert("max_tokens".into(), json!(m));
            }
            if p.top_k > 0 {
                obj.insert("top_k".into(), json!(p.top_k));
            }
            if let Some(s) = p.seed {
                obj.insert("seed".into(), json!(s));
            }
            if !p.stop.is_empty() {
                obj.insert("stop".into(), json!(p.stop));
            }
            if p.ignore_eos {
                obj.insert("ignore_eos".into(), json!(true));
            }
        }
        (
            format!("{}/{path}", self.cfg.base_url.trim_end_matches('/')),
            body,
        )
    }
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
            let prev = self.in_flight.fetch_add(1, Ordering::AcqRel);
            let guard = InFlight(self.in_flight.clone());
            if prev >= self.cfg.max_in_flight {
                return Err(EngineError::Overloaded {
                    capacity: self.cfg.max_in_flight,
                });
            }
            let (url, body) = self.body(&req);
            let mut rb = self
                .http
                .post(&url)
                .json(&body)
                .header("x-request-id", &req.request_id);
            if let Some(k) = &self.cfg.api_key {
                rb = rb.bearer_auth(k);
            }
            let resp = rb
                .send()
                .await
                .map_err(|e| EngineError::Upstream(e.to_string()))?;
            let status = resp.status();
            if !status.is_success() {
                let text = resp.text().await.unwrap_or_default();
                let msg = serde_json::from_str::<Value>(&text)
                    .ok()
                    .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
                    .unwrap_or(text);
                return Err(match status.as_u16() {
                    400 | 404 | 413 | 422 => EngineError::InvalidRequest(msg),
                    429 | 503 => EngineError::Overloaded {
                        capacity: self.cfg.max_in_flight,
                    },
                    _ => EngineError::Upstream(format!("HTTP {status}: {msg}")),
                });
            }
            let bytes = resp.bytes_stream();
            let stream = futures::stream::unfold(
                (
                    bytes,
                    SseParser::default(),
                    Translate::default(),
                    guard,
                    false,
                ),
                |(mut bytes, mut parser, mut tr, guard, done)| async move {
                    if done {
                        return None;
                    }
                    loop {
                        if let Some(item) = tr.pop() {
                            let finished = matches!(item, Ok(Event::Done { .. }) | Err(_));
                            return Some((item, (bytes, parser, tr, guard, finished)));
                        }
                        match bytes.next().await {
                            Some(Ok(chunk)) => match parser.push(&chunk) {
                                Ok(payloads) => payloads.iter().for_each(|p| tr.feed(p)),
                                Err(e) => tr.fail(e),
                            },
                            Some(Err(e)) => tr.fail(EngineError::Upstream(e.to_string())),
                            None => tr.end(),
                        }
                    }
                },
            );
            Ok(Box::pin(stream) as EventStream)
        }
        .boxed()
    }
}

/// Splits an SSE byte stream into `data:` payloads.
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
}

impl SseParser {
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<String>, EngineError> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=nl).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\n', '\r']);
            if let Some(data) = line.strip_prefix("data:") {
                out.push(data.trim_start().to_owned());
            }
        }
        if self.buf.len() > MAX_SSE_LINE {
            return Err(EngineError::Upstream(format!(
                "upstream sent an SSE line longer than {MAX_SSE_LINE} bytes"
            )));
        }
        Ok(out)
    }
}

/// Maps OpenAI stream chunks to engine events.
#[derive(Debug, Default)]
struct Translate {
    out: std::collections::VecDeque<Result<Event, EngineError>>,
    finish: Option<FinishReason>,
    usage: Option<Usage>,
    ended: bool,
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
        let v: Value = match serde_json::from_str(payload) {
            Ok(v) => v,
            Err(e) => {
                return self.fail(EngineError::Upstream(format!(
                    "bad chunk from upstream: {e}"
                )));
            }
        };
        if let Some(msg) = v["error"]["message"].as_str() {
            return self.fail(EngineError::Upstream(msg.to_owned()));
        }
        if let Some(choice) = v["choices"].get(0) {
            let text = choice["delta"]["content"]
                .as_str()
                .or_else(|| choice["text"].as_str());
            if let Some(t) = text.filter(|t| !t.is_empty()) {
                self.out.push_back(Ok(Event::Delta(t.to_owned())));
            }
            match choice["finish_reason"].as_str() {
                Some("length") => self.finish = Some(FinishReason::Length),
                Some(_) => self.finish = Some(FinishReason::Stop),
                None => {}
            }
        }
        if let Ok(u) = serde_json::from_value::<Usage>(v["usage"].clone()) {
            self.usage = Some(u);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SamplingParams;

    #[test]
    fn sse_parser_handles_split_lines_and_crlf() {
        let mut p = SseParser::default();
        assert_eq!(
            p.push(b"data: {\"a\"").unwrap_or_default(),
            Vec::<String>::new()
        );
        assert_eq!(
            p.push(b":1}\r\n\r\ndata: [DONE]\n").unwrap_or_default(),
            vec!["{\"a\":1}", "[DONE]"]
        );
    }

    #[test]
    fn sse_parser_bounds_line_length() {
        let mut p = SseParser::default();
        assert!(p.push(&vec![b'x'; MAX_SSE_LINE + 1]).is_err());
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

    #[test]
    fn truncated_stream_is_an_error() {
        let mut t = Translate::default();
        t.feed(r#"{"choices":[{"index":0,"text":"a","finish_reason":null}]}"#);
        t.end();
        assert_eq!(t.pop(), Some(Ok(Event::Delta("a".into()))));
        assert!(matches!(t.pop(), Some(Err(EngineError::Upstream(_)))));
    }

    /// A real HTTP round trip against a canned OpenAI-compatible upstream on loopback.
    #[tokio::test]
    async fn proxies_a_streamed_completion() {
        use axum::routing::post;
        let app = axum::Router::new().route(
            "/v1/completions",
            post(|body: axum::Json<Value>| async move {
                assert_eq!(body["prompt"], "Say");
                assert_eq!(body["model"], "up-model");
                "data: {\"choices\":[{\"index\":0,\"text\":\" hi\",\"finish_reason\":null}]}\n\n\
                 data: {\"choices\":[{\"index\":0,\"text\":\"\",\"finish_reason\":\"stop\"}]}\n\n\
                 data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1,\"total_tokens\":2}}\n\n\
                 data: [DONE]\n\n"
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await;
        let Ok(listener) = listener else {
            unreachable!("bind")
        };
        let addr = listener.local_addr().ok();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let Some(addr) = addr else {
            unreachable!("addr")
        };
        let engine = UpstreamEngine::new(UpstreamConfig {
            base_url: format!("http://{addr}/v1"),
            upstream_model: "up-model".into(),
            model_id: "mine".into(),
            api_key: None,
            context_length: 2048,
            max_in_flight: 2,
            connect_timeout: Duration::from_secs(2),
        });
        let Ok(engine) = engine else {
            unreachable!("client")
        };
        let req = GenerateRequest {
            request_id: "r1".into(),
            model: "mine".into(),
            prompt: Prompt::Text("Say".into()),
            params: SamplingParams::default(),
            preference: crate::Preference::default(),
            user: None,
            payer: None,
            conversation: None,
        };
        let stream = engine.generate(req).await;
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
}
