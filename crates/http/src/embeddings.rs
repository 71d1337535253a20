//! `POST /v1/embeddings`: texts in, one unit-length vector per text out, in OpenAI's shape
//! (`float` lists, or `base64` of little-endian `f32`s, which the official clients ask for).

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, HeaderValue};
use bytes::Bytes;
use futures::StreamExt;
use lattice_api::ApiError;
use lattice_engine::{EngineError, Event, GenerateRequest, Prompt, SamplingParams, Usage};
use serde::Deserialize;
use serde_json::Value;

use crate::handlers::{self, HandlerResult};
use crate::{AppState, stream};

/// Texts one request may embed (OpenAI's own limit).
pub(crate) const MAX_INPUTS: usize = 2048;

const ENDPOINT: &str = "embeddings";

#[derive(Debug, Deserialize)]
pub(crate) struct EmbeddingRequest {
    model: String,
    input: Value,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default)]
    dimensions: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Float,
    Base64,
}

/// The request's texts and how to encode the vectors.
#[derive(Debug)]
struct Validated {
    model: String,
    texts: Vec<String>,
    encoding: Encoding,
    dimensions: Option<u64>,
}

fn validate(req: EmbeddingRequest) -> Result<Validated, ApiError> {
    let token_arrays = || {
        ApiError::invalid_param(
            "input",
            "Token arrays are not supported: send the text itself (a string or a list of strings).",
        )
    };
    let texts = match req.input {
        Value::String(s) => vec![s],
        Value::Array(items) => {
            if items.is_empty() {
                return Err(ApiError::invalid_param(
                    "input",
                    "`input` must not be an empty list.",
                ));
            }
            if items.len() > MAX_INPUTS {
                return Err(ApiError::invalid_param(
                    "input",
                    format!(
                        "`input` lists {} texts; at most {MAX_INPUTS} per request.",
                        items.len()
                    ),
                ));
            }
            let mut texts = Vec::with_capacity(items.len());
            for item in items {
                match item {
                    Value::String(s) => texts.push(s),
                    Value::Number(_) | Value::Array(_) => return Err(token_arrays()),
                    _ => {
                        return Err(ApiError::invalid_param(
                            "input",
                            "`input` must be a string or a list of strings.",
                        ));
                    }
                }
            }
            texts
        }
        _ => {
            return Err(ApiError::invalid_param(
                "input",
                "`input` must be a string or a list of strings.",
            ));
        }
    };
    if let Some(i) = texts.iter().position(String::is_empty) {
        return Err(ApiError::invalid_param(
            "input",
            format!("`input[{i}]` is empty; every text to embed needs some text."),
        ));
    }
    let encoding = match req.encoding_format.as_deref() {
        None | Some("float") => Encoding::Float,
        Some("base64") => Encoding::Base64,
        Some(other) => {
            return Err(ApiError::invalid_param(
                "encoding_format",
                format!("Unknown `encoding_format` `{other}`; use float or base64."),
            ));
        }
    };
    Ok(Validated {
        model: req.model,
        texts,
        encoding,
        dimensions: req.dimensions,
    })
}

/// The model's vector length, or why it cannot embed.
fn dimensions_of(st: &AppState, model: &str) -> Result<u32, ApiError> {
    st.engine.dimensions(model).ok_or_else(|| {
            ApiError::invalid_param(
                "model",
                format!(
                    "`{model}` is a text generation model and gives no embeddings; use an embedding model (see /v1/models)."
                ),
            )
        })
}

pub(crate) async fn embeddings(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> HandlerResult {
    let started = Instant::now();
    let failed = |e: ApiError| {
        st.metrics.request(ENDPOINT, handlers::outcome(e.status));
        e
    };
    let payer = match &st.auth {
        Some(auth) => Some(auth.authenticate(&headers).await.map_err(failed)?),
        None => None,
    };
    let v = handlers::parse_body::<EmbeddingRequest>(body, &st)
        .and_then(validate)
        .and_then(|v| {
            handlers::check_model(&st, &v.model)?;
            let native = dimensions_of(&st, &v.model)?;
            match v.dimensions {
                Some(d) if d != u64::from(native) => Err(ApiError::invalid_param(
                    "dimensions",
                    format!(
                        "`{}` gives vectors of {native} dimensions only; leave out `dimensions` or set it to {native}.",
                        v.model
                    ),
                )),
                _ => Ok(v),
            }
        })
        .map_err(failed)?;
    let request_id = handlers::fresh_request_id(&headers, payer.is_some());
    let preference = handlers::preference(&headers).map_err(failed)?;
    let count = v.texts.len();
    let req = GenerateRequest {
        request_id: request_id.clone(),
        model: v.model.clone(),
        prompt: Prompt::Embed(v.texts),
        params: SamplingParams {
            max_tokens: Some(0),
            ..SamplingParams::default()
        },
        preference,
        user: payer.as_ref().map(|p| p.address.clone()),
        conversation: None,
        whole: true,
        payer,
    };
    let mut events = st.engine.generate(req).await.map_err(|e| {
        tracing::debug!(request_id = %request_id, error = %e, "embeddings refused by the engine");
        failed(refusal(&e))
    })?;
    let mut vectors = Vec::with_capacity(count);
    let usage = loop {
        match events.next().await {
            Some(Ok(Event::Embedding(vec))) => vectors.push(vec),
            Some(Ok(Event::Done { usage, .. })) => break usage,
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(failed(refusal(&e)).into()),
            None => {
                let e = EngineError::Upstream("the embedding stream ended early".into());
                return Err(failed(stream::engine_error(&e)).into());
            }
        }
    };
    if vectors.len() != count {
        let e = EngineError::Upstream(format!(
            "the backend returned {} embeddings for {count} inputs",
            vectors.len()
        ));
        return Err(failed(stream::engine_error(&e)).into());
    }
    st.metrics
        .finished(usage.prompt_tokens, 0, 0.0, started.elapsed().as_secs_f64());
    st.metrics.request(ENDPOINT, "ok");
    tracing::debug!(request_id = %request_id, inputs = count, tokens = usage.prompt_tokens, "embeddings done");
    let json = body_json(&v.model, &vectors, v.encoding, usage);
    let rid = HeaderValue::from_str(&request_id).unwrap_or(HeaderValue::from_static("invalid"));
    Ok(handlers::json_response(json, rid))
}

/// The engine's refusal as an API error; one about a text names `input`, as OpenAI's do.
fn refusal(e: &EngineError) -> ApiError {
    let api = stream::engine_error(e);
    match e {
        EngineError::InvalidRequest(m) if m.starts_with("input ") => api.with_param("input"),
        _ => api,
    }
}

/// OpenAI's response: `{"object":"list","data":[{"object":"embedding","index":i,"embedding":…}],"model":…,"usage":…}`.
fn body_json(model: &str, vectors: &[Vec<f32>], encoding: Encoding, usage: Usage) -> String {
    #[derive(serde::Serialize)]
    #[serde(untagged)]
    enum Vector<'a> {
        /// Written as `f32`s (shortest round-trip form), not widened to `f64`.
        Float(&'a [f32]),
        Base64(String),
    }
    #[derive(serde::Serialize)]
    struct Item<'a> {
        object: &'static str,
        index: usize,
        embedding: Vector<'a>,
    }
    #[derive(serde::Serialize)]
    struct Tokens {
        prompt_tokens: u32,
        total_tokens: u32,
    }
    #[derive(serde::Serialize)]
    struct Body<'a> {
        object: &'static str,
        data: Vec<Item<'a>>,
        model: &'a str,
        usage: Tokens,
    }
    let data = vectors
        .iter()
        .enumerate()
        .map(|(index, v)| Item {
            object: "embedding",
            index,
            embedding: match encoding {
                Encoding::Float => Vector::Float(v),
                Encoding::Base64 => Vector::Base64(base64_f32(v)),
            },
        })
        .collect();
    let body = Body {
        object: "list",
        data,
        model,
        usage: Tokens {
            prompt_tokens: usage.prompt_tokens,
            total_tokens: usage.prompt_tokens,
        },
    };
    // Only strings and finite numbers (the engine refuses others): this cannot fail.
    serde_json::to_string(&body).unwrap_or_default()
}

/// Little-endian `f32`s in standard base64 with padding (what `numpy.frombuffer(…, "float32")`
/// reads back).
fn base64_f32(v: &[f32]) -> String {
    use base64::Engine as _;
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(input: Value) -> EmbeddingRequest {
        EmbeddingRequest {
            model: "m".into(),
            input,
            encoding_format: None,
            dimensions: None,
        }
    }

    #[test]
    fn inputs_are_a_string_or_a_list_of_strings() {
        let one = validate(req(Value::from("hi"))).unwrap();
        assert_eq!(one.texts, ["hi"]);
        let two = validate(req(serde_json::json!(["a", "b"]))).unwrap();
        assert_eq!(two.texts, ["a", "b"]);
        assert_eq!(two.encoding, Encoding::Float);
    }

    #[test]
    fn bad_inputs_are_400s_naming_input() {
        let too_many = Value::from(vec!["x"; MAX_INPUTS + 1]);
        for input in [
            serde_json::json!([]),
            serde_json::json!([1, 2, 3]),
            serde_json::json!([[1, 2]]),
            serde_json::json!(["ok", ""]),
            serde_json::json!(""),
            serde_json::json!({"text": "x"}),
            serde_json::json!(["a", null]),
            Value::Null,
            too_many,
        ] {
            let e = validate(req(input.clone())).unwrap_err();
            assert_eq!(e.status, 400, "{input}");
            assert_eq!(e.body.param.as_deref(), Some("input"), "{input}");
        }
        let e = validate(req(serde_json::json!(["a", ""]))).unwrap_err();
        assert!(e.body.message.contains("input[1]"), "{}", e.body.message);
        let e = validate(req(serde_json::json!([[1]]))).unwrap_err();
        assert!(
            e.body.message.contains("Token arrays"),
            "{}",
            e.body.message
        );
    }

    #[test]
    fn encoding_format_is_float_or_base64() {
        let mut r = req(Value::from("x"));
        r.encoding_format = Some("base64".into());
        assert_eq!(validate(r).unwrap().encoding, Encoding::Base64);
        let mut r = req(Value::from("x"));
        r.encoding_format = Some("int8".into());
        let e = validate(r).unwrap_err();
        assert_eq!(e.body.param.as_deref(), Some("encoding_format"));
    }

    #[test]
    fn base64_is_little_endian_f32_with_padding() {
        // 1.0f32 = 00 00 80 3f; -2.5f32 = 00 00 20 c0
        assert_eq!(base64_f32(&[1.0]), "AACAPw==");
        assert_eq!(base64_f32(&[1.0, -2.5]), "AACAPwAAIMA=");
        assert_eq!(base64_f32(&[]), "");
        // Three floats = 12 bytes: no padding.
        assert_eq!(base64_f32(&[0.0, 0.0, 0.0]), "AAAAAAAAAAAAAAAA");
    }

    #[test]
    fn the_body_is_openais_shape() {
        let usage = Usage::new(7, 0);
        let body: Value = serde_json::from_str(&body_json(
            "emb",
            &[vec![0.5, -0.25], vec![1.0, 0.0]],
            Encoding::Float,
            usage,
        ))
        .unwrap();
        assert_eq!(body["object"], "list");
        assert_eq!(body["model"], "emb");
        assert_eq!(body["data"][1]["index"], 1);
        assert_eq!(body["data"][1]["object"], "embedding");
        assert_eq!(
            body["data"][0]["embedding"],
            serde_json::json!([0.5, -0.25])
        );
        assert_eq!(body["usage"]["prompt_tokens"], 7);
        assert_eq!(body["usage"]["total_tokens"], 7);
    }
}
