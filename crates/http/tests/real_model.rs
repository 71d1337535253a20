//! HTTP integration tests: the node's router over a real llama.cpp engine on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lattice_engine_llama::{LlamaConfig, LlamaEngine};
use lattice_models::ModelStore;
use serde_json::{Value, json};

const MODEL: &str = "smollm2-135m";

struct Node {
    base: String,
    client: reqwest::Client,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

async fn start(parallel: u32, queue: usize, limits: lattice_http::Limits) -> Node {
    let path = ModelStore::from_env()
        .unwrap()
        .resolve(MODEL, true)
        .await
        .unwrap()
        .path;
    let mut cfg = LlamaConfig::new(path, MODEL);
    cfg.parallel = parallel;
    cfg.ctx_per_slot = 512;
    cfg.queue_capacity = queue;
    let engine = tokio::task::spawn_blocking(move || LlamaEngine::load(cfg))
        .await
        .unwrap()
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let app = lattice_http::router(Arc::new(engine), limits, "lattice_node");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(lattice_http::serve(listener, app, async {
        let _ = rx.await;
    }));
    Node {
        base: format!("http://{addr}"),
        client: reqwest::Client::new(),
        _shutdown: tx,
    }
}

async fn default_node() -> Node {
    start(2, 8, lattice_http::Limits::default()).await
}

impl Node {
    async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self
            .client
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn post_raw(&self, path: &str, body: Vec<u8>) -> (u16, Value) {
        let r = self
            .client
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn get_json(&self, path: &str) -> Value {
        self.client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

fn chat_body(content: &str, extra: Value) -> Value {
    let mut b = json!({"model": MODEL, "messages": [{"role": "user", "content": content}],
                       "temperature": 0, "max_tokens": 16});
    if let (Some(o), Some(e)) = (b.as_object_mut(), extra.as_object()) {
        o.extend(e.clone());
    }
    b
}

fn assert_error(status: u16, body: &Value, want_status: u16, want_code: Option<&str>) {
    assert_eq!(status, want_status, "{body}");
    let err = &body["error"];
    assert!(
        err["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(err["type"].is_string(), "{body}");
    if let Some(code) = want_code {
        assert_eq!(err["code"], code, "{body}");
    }
}

/// Parses an SSE body into its `data:` payloads.
fn sse_payloads(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|ev| ev.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completion_non_streaming() {
    let n = default_node().await;
    let (status, body) = n
        .post(
            "/v1/chat/completions",
            &chat_body("Which city is the capital of France?", json!({})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(body["model"], MODEL);
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert!(
        body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .contains("Paris"),
        "{body}"
    );
    let u = &body["usage"];
    assert_eq!(
        u["total_tokens"].as_u64().unwrap(),
        u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()
    );
    assert!(["stop", "length"].contains(&body["choices"][0]["finish_reason"].as_str().unwrap()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_streaming_matches_openai_chunk_format() {
    let n = default_node().await;
    let body = chat_body(
        "Say hello.",
        json!({"stream": true, "stream_options": {"include_usage": true}}),
    );
    let r = n
        .client
        .post(format!("{}/v1/chat/completions", n.base))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    assert!(r.headers().contains_key("x-request-id"));
    let text = r.text().await.unwrap();
    let payloads = sse_payloads(&text);
    assert_eq!(
        payloads.last().map(String::as_str),
        Some("[DONE]"),
        "{text}"
    );
    let chunks: Vec<Value> = payloads[..payloads.len() - 1]
        .iter()
        .map(|p| serde_json::from_str(p).unwrap())
        .collect();
    let id = chunks[0]["id"].clone();
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], id, "one id per stream");
        assert!(
            c.get("usage").is_some(),
            "include_usage puts usage (null) on every chunk: {c}"
        );
    }
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    let usage_chunk = chunks.last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert!(usage_chunk["usage"]["completion_tokens"].as_u64().unwrap() >= 1);
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["delta"], json!({}));
    assert!(finish["choices"][0]["finish_reason"].is_string());
    let content: String = chunks[1..chunks.len() - 2]
        .iter()
        .map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert!(!content.is_empty());

    // Same request, non-streaming and greedy: the same text.
    let (_, full) = n
        .post("/v1/chat/completions", &chat_body("Say hello.", json!({})))
        .await;
    assert_eq!(
        full["choices"][0]["message"]["content"].as_str().unwrap(),
        content
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_without_include_usage_has_no_usage_field() {
    let n = default_node().await;
    let r = n
        .client
        .post(format!("{}/v1/completions", n.base))
        .json(&json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 5, "stream": true, "temperature": 0}))
        .send()
        .await
        .unwrap();
    let text = r.text().await.unwrap();
    let payloads = sse_payloads(&text);
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));
    for p in &payloads[..payloads.len() - 1] {
        let c: Value = serde_json::from_str(p).unwrap();
        assert_eq!(c["object"], "text_completion");
        assert!(c.get("usage").is_none(), "{c}");
        assert!(c["choices"][0]["text"].is_string());
    }
    let last: Value = serde_json::from_str(&payloads[payloads.len() - 2]).unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_completion_and_models() {
    let n = default_node().await;
    let (status, body) = n
        .post(
            "/v1/completions",
            &json!({"model": MODEL, "prompt": "The sky is", "max_tokens": 4, "temperature": 0}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["usage"]["completion_tokens"], 4);
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    let models = n.get_json("/v1/models").await;
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], MODEL);
    assert_eq!(models["data"][0]["object"], "model");
    let health = n.get_json("/health").await;
    assert_eq!(health["status"], "ok");
    assert_eq!(health["slots"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_openai_errors() {
    let limits = lattice_http::Limits {
        max_body_bytes: 64 * 1024,
        ..lattice_http::Limits::default()
    };
    let n = start(1, 4, limits).await;
    let (s, b) = n
        .post_raw("/v1/chat/completions", b"{not json".to_vec())
        .await;
    assert_error(s, &b, 400, None);
    let (s, b) = n
        .post_raw(
            "/v1/chat/completions",
            br#"{"model": "smollm2-135m"}"#.to_vec(),
        )
        .await;
    assert_error(s, &b, 400, None);
    assert!(
        b["error"]["message"].as_str().unwrap().contains("messages"),
        "{b}"
    );
    let (s, b) = n
        .post(
            "/v1/chat/completions",
            &json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_error(s, &b, 404, Some("model_not_found"));
    let (s, b) = n
        .post(
            "/v1/chat/completions",
            &chat_body("hi", json!({"max_tokens": 0})),
        )
        .await;
    assert_error(s, &b, 400, Some("invalid_value"));
    assert_eq!(b["error"]["param"], "max_tokens");
    let (s, b) = n
        .post(
            "/v1/chat/completions",
            &chat_body("hi", json!({"max_tokens": 100000})),
        )
        .await;
    assert_error(s, &b, 400, Some("context_length_exceeded"));
    let (s, b) = n
        .post(
            "/v1/chat/completions",
            &chat_body(&"lorem ipsum ".repeat(400), json!({})),
        )
        .await;
    assert_error(s, &b, 400, Some("context_length_exceeded"));
    let (s, b) = n
        .post(
            "/v1/chat/completions",
            &chat_body("hi", json!({"temperature": 7})),
        )
        .await;
    assert_error(s, &b, 400, Some("invalid_value"));
    let (s, b) = n
        .post_raw("/v1/chat/completions", vec![b'x'; 100 * 1024])
        .await;
    assert_error(s, &b, 413, Some("request_too_large"));
    // A route that exists, with a body that is not a request of it.
    let (s, b) = n.post("/v1/embeddings", &json!({})).await;
    assert_error(s, &b, 400, None);
    let (s, b) = n.post("/v1/rerank", &json!({})).await;
    assert_error(s, &b, 404, None);
    let r = n
        .client
        .get(format!("{}/v1/chat/completions", n.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    // Still healthy and serving after all that.
    let (s, _) = n
        .post(
            "/v1/chat/completions",
            &chat_body("hi", json!({"max_tokens": 2})),
        )
        .await;
    assert_eq!(s, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_rejected_with_503() {
    let n = start(1, 1, lattice_http::Limits::default()).await;
    let long = chat_body(
        "Write a long story.",
        json!({"max_tokens": 300, "ignore_eos": true, "stream": true}),
    );
    // One generating, one queued…
    let r1 = n
        .client
        .post(format!("{}/v1/chat/completions", n.base))
        .json(&long)
        .send()
        .await
        .unwrap();
    let mut s1 = r1.bytes_stream();
    let _ = s1.next().await;
    let _ = s1.next().await;
    let r2 = n
        .client
        .post(format!("{}/v1/chat/completions", n.base))
        .json(&long)
        .send()
        .await
        .unwrap();
    assert_eq!(r2.status(), 200);
    // …and the next one is refused at once, not buffered.
    let (s, b) = n.post("/v1/chat/completions", &long).await;
    assert_error(s, &b, 503, Some("overloaded"));
    let metrics = n
        .client
        .get(format!("{}/metrics", n.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(
            r#"lattice_node_requests_total{endpoint="chat_completions",status="overloaded"} 1"#
        ),
        "{metrics}"
    );
    assert!(metrics.contains("lattice_node_queue_depth 1"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_frees_the_slot() {
    let n = start(1, 4, lattice_http::Limits::default()).await;
    let long = chat_body(
        "Write a long essay.",
        json!({"max_tokens": 450, "ignore_eos": true, "stream": true}),
    );
    let r = n
        .client
        .post(format!("{}/v1/chat/completions", n.base))
        .json(&long)
        .send()
        .await
        .unwrap();
    let mut s = r.bytes_stream();
    // The role chunk comes before the engine admits the request: wait for real tokens.
    let _ = s.next().await;
    let _ = s.next().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while n.get_json("/health").await["busy_slots"] != 1 {
        assert!(
            Instant::now() < deadline,
            "the request never occupied a slot"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(s);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if n.get_json("/health").await["busy_slots"] == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "slot still busy after the client went away"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let metrics = n
        .client
        .get(format!("{}/metrics", n.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains(r#"status="cancelled"} 1"#), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_record_tokens_and_latency() {
    let n = default_node().await;
    let (s, body) = n
        .post(
            "/v1/completions",
            &json!({"model": MODEL, "prompt": "Hello", "max_tokens": 6, "temperature": 0}),
        )
        .await;
    assert_eq!(s, 200);
    let prompt = body["usage"]["prompt_tokens"].as_u64().unwrap();
    let m = n
        .client
        .get(format!("{}/metrics", n.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        m.contains(r#"lattice_node_requests_total{endpoint="completions",status="ok"} 1"#),
        "{m}"
    );
    assert!(m.contains("lattice_node_completion_tokens_total 6"), "{m}");
    assert!(
        m.contains(&format!("lattice_node_prompt_tokens_total {prompt}")),
        "{m}"
    );
    assert!(
        m.contains("lattice_node_time_to_first_token_seconds_count 1"),
        "{m}"
    );
    assert!(
        m.contains("lattice_node_decode_tokens_per_second_count 1"),
        "{m}"
    );
    assert!(m.contains("lattice_node_slots 2"), "{m}");
}
