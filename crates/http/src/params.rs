//! Validation of OpenAI request fields into engine parameters; every rejection names the field.

use lattice_api::{ApiError, ChatCompletionRequest, CompletionRequest, PromptSpec, SamplingFields};
use lattice_engine::{Message, Prompt, SamplingParams};

use crate::Limits;

/// OpenAI's default for `/v1/completions` when `max_tokens` is absent.
const COMPLETIONS_DEFAULT_MAX_TOKENS: u32 = 16;

const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

pub(crate) fn chat(
    req: &ChatCompletionRequest,
    limits: &Limits,
) -> Result<(Prompt, SamplingParams), ApiError> {
    if req.messages.is_empty() {
        return Err(ApiError::invalid_param(
            "messages",
            "`messages` must not be empty.",
        ));
    }
    let mut messages = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.iter().enumerate() {
        if !ROLES.contains(&m.role.as_str()) {
            return Err(ApiError::invalid_param(
                &format!("messages[{i}].role"),
                format!(
                    "Unknown role `{}`; expected one of {}.",
                    m.role,
                    ROLES.join(", ")
                ),
            ));
        }
        let content = m.text().map_err(|kind| {
            ApiError::invalid_param(
                &format!("messages[{i}].content"),
                format!("Content parts of type `{kind}` are not supported by this model."),
            )
        })?;
        messages.push(Message {
            role: m.role.clone(),
            content,
        });
    }
    let params = sampling(&req.sampling, req.max_tokens(), None, limits)?;
    Ok((Prompt::Chat(messages), params))
}

pub(crate) fn completion(
    req: &CompletionRequest,
    limits: &Limits,
) -> Result<(Prompt, SamplingParams), ApiError> {
    let prompt = match &req.prompt {
        PromptSpec::One(p) => p.clone(),
        PromptSpec::Many(v) if v.len() == 1 => v.first().cloned().unwrap_or_default(),
        PromptSpec::Many(_) => {
            return Err(ApiError::invalid_param(
                "prompt",
                "Exactly one prompt per request is supported.",
            ));
        }
    };
    if req.echo == Some(true) {
        return Err(ApiError::invalid_param("echo", "`echo` is not supported."));
    }
    let params = sampling(
        &req.sampling,
        req.max_tokens,
        Some(COMPLETIONS_DEFAULT_MAX_TOKENS),
        limits,
    )?;
    Ok((Prompt::Text(prompt), params))
}

fn sampling(
    s: &SamplingFields,
    max_tokens: Option<u32>,
    default_max: Option<u32>,
    limits: &Limits,
) -> Result<SamplingParams, ApiError> {
    refuse_unsupported(s)?;
    if let Some(n) = s.n.filter(|&n| n != 1) {
        return Err(ApiError::invalid_param(
            "n",
            format!("Only n=1 is supported, got {n}."),
        ));
    }
    let temperature = s.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid_param(
            "temperature",
            format!("`temperature` must be between 0 and 2, got {temperature}."),
        ));
    }
    let top_p = s.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid_param(
            "top_p",
            format!("`top_p` must be in (0, 1], got {top_p}."),
        ));
    }
    let top_k = match s.top_k {
        None => 0,
        Some(k) => u32::try_from(k).map_err(|_| {
            ApiError::invalid_param("top_k", format!("`top_k` must be ≥ 0, got {k}."))
        })?,
    };
    if max_tokens == Some(0) {
        return Err(ApiError::invalid_param(
            "max_tokens",
            "`max_tokens` must be at least 1.",
        ));
    }
    let stop = s
        .stop
        .clone()
        .map(lattice_api::StopSpec::into_vec)
        .unwrap_or_default();
    if stop.len() > limits.max_stop_sequences {
        return Err(ApiError::invalid_param(
            "stop",
            format!(
                "At most {} stop sequences are allowed.",
                limits.max_stop_sequences
            ),
        ));
    }
    if let Some(long) = stop.iter().find(|s| s.len() > limits.max_stop_bytes) {
        return Err(ApiError::invalid_param(
            "stop",
            format!(
                "Stop sequences are limited to {} bytes ({} given).",
                limits.max_stop_bytes,
                long.len()
            ),
        ));
    }
    Ok(SamplingParams {
        temperature,
        top_p,
        top_k,
        seed: s.seed.map(|v| v.cast_unsigned()),
        stop,
        max_tokens: max_tokens.or(default_max),
        ignore_eos: s.ignore_eos.unwrap_or(false),
    })
}

/// Whether a JSON value asks for nothing: absent, null, `false`, 0, `""`, `[]` or `{}`.
fn asks_nothing(v: Option<&serde_json::Value>) -> bool {
    use serde_json::Value;
    match v {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => !b,
        Some(Value::Number(n)) => n.as_f64() == Some(0.0),
        Some(Value::String(t)) => t.is_empty(),
        Some(Value::Array(a)) => a.is_empty(),
        Some(Value::Object(o)) => o.is_empty(),
    }
}

/// Refuses the OpenAI fields this API does not implement when they ask for something, naming
/// the field ([`SamplingFields`]' doc says which values ask for nothing).
fn refuse_unsupported(s: &SamplingFields) -> Result<(), ApiError> {
    let refuse = |param: &str, what: &str| {
        Err(ApiError::invalid_param(
            param,
            format!("{what} not supported by this network yet; remove `{param}` from the request."),
        ))
    };
    if !asks_nothing(s.logprobs.as_ref()) || !asks_nothing(s.top_logprobs.as_ref()) {
        let param = if asks_nothing(s.logprobs.as_ref()) {
            "top_logprobs"
        } else {
            "logprobs"
        };
        return refuse(param, "Log probabilities are");
    }
    let plain_text = match &s.response_format {
        None | Some(serde_json::Value::Null) => true,
        Some(f) => f.get("type").and_then(|t| t.as_str()) == Some("text"),
    };
    if !plain_text {
        return refuse(
            "response_format",
            "JSON mode and structured outputs (a `response_format` other than `{\"type\": \"text\"}`) are",
        );
    }
    let no_tools = s.tool_choice.as_ref().and_then(|c| c.as_str()) == Some("none");
    if !no_tools {
        if !asks_nothing(s.tools.as_ref()) {
            return refuse("tools", "Tool calling is");
        }
        if !asks_nothing(s.functions.as_ref()) {
            return refuse("functions", "Function calling is");
        }
        if s.tool_choice
            .as_ref()
            .is_some_and(|c| !c.is_null() && c.as_str() != Some("auto"))
        {
            return refuse("tool_choice", "Tool calling is");
        }
    }
    if !asks_nothing(s.logit_bias.as_ref()) {
        return refuse("logit_bias", "Logit biases are");
    }
    if s.presence_penalty.is_some_and(|p| p != 0.0) {
        return refuse("presence_penalty", "Presence penalties are");
    }
    if s.frequency_penalty.is_some_and(|p| p != 0.0) {
        return refuse("frequency_penalty", "Frequency penalties are");
    }
    if s.suffix.as_deref().is_some_and(|t| !t.is_empty()) {
        return refuse("suffix", "Suffixes (insertion) are");
    }
    if s.best_of.is_some_and(|n| n != 1) {
        return refuse("best_of", "`best_of` other than 1 is");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat_req(json: &str) -> ChatCompletionRequest {
        serde_json::from_str(json).unwrap_or_else(|e| unreachable!("{e}"))
    }

    /// A one-message chat request with `extra` (`,"field":value…`) appended to its fields.
    fn chat_with(extra: &str) -> ChatCompletionRequest {
        chat_req(&format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}}]{extra}}}"#
        ))
    }

    fn err_param(r: Result<(Prompt, SamplingParams), ApiError>) -> Option<String> {
        r.err().and_then(|e| e.body.param)
    }

    /// Fields the API does not implement are refused by name when they ask for something, and
    /// accepted in the forms that ask for nothing (what many clients send by default).
    #[test]
    fn unsupported_fields_are_refused_not_ignored() {
        let l = Limits::default();
        let with = |extra: &str| chat_with(&format!(",{extra}"));
        for (extra, param) in [
            (r#""logprobs":true"#, "logprobs"),
            (r#""logprobs":true,"top_logprobs":2"#, "logprobs"),
            (r#""top_logprobs":3"#, "top_logprobs"),
            (
                r#""response_format":{"type":"json_object"}"#,
                "response_format",
            ),
            (
                r#""response_format":{"type":"json_schema","json_schema":{"name":"x"}}"#,
                "response_format",
            ),
            (r#""response_format":"json""#, "response_format"),
            (
                r#""tools":[{"type":"function","function":{"name":"f"}}]"#,
                "tools",
            ),
            (
                r#""tools":[{"type":"function","function":{"name":"f"}}],"tool_choice":"auto""#,
                "tools",
            ),
            (r#""functions":[{"name":"f"}]"#, "functions"),
            (r#""tool_choice":"required""#, "tool_choice"),
            (r#""logit_bias":{"50256":-100}"#, "logit_bias"),
            (r#""presence_penalty":0.5"#, "presence_penalty"),
            (r#""frequency_penalty":-1"#, "frequency_penalty"),
            (r#""suffix":"end""#, "suffix"),
            (r#""best_of":2"#, "best_of"),
        ] {
            let e = chat(&with(extra), &l).err();
            assert_eq!(
                e.as_ref().and_then(|e| e.body.param.as_deref()),
                Some(param),
                "{extra}"
            );
            assert_eq!(e.as_ref().map(|e| e.status), Some(400), "{extra}");
            assert!(
                e.is_some_and(|e| e.body.message.contains("not supported")),
                "{extra}"
            );
        }
        for extra in [
            r#""logprobs":false"#,
            r#""logprobs":null,"top_logprobs":0"#,
            r#""response_format":{"type":"text"}"#,
            r#""tools":[]"#,
            r#""tools":[{"type":"function","function":{"name":"f"}}],"tool_choice":"none""#,
            r#""tool_choice":"auto""#,
            r#""tools":null,"tool_choice":null,"response_format":null"#,
            r#""logit_bias":{}"#,
            r#""presence_penalty":0,"frequency_penalty":0.0"#,
            r#""suffix":"","best_of":1"#,
        ] {
            assert!(chat(&with(extra), &l).is_ok(), "{extra}");
        }
        // Text completions share the fields (`logprobs` is a count there).
        let c: CompletionRequest =
            serde_json::from_str(r#"{"model":"m","prompt":"x","logprobs":2}"#)
                .unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(err_param(completion(&c, &l)).as_deref(), Some("logprobs"));
        let c: CompletionRequest =
            serde_json::from_str(r#"{"model":"m","prompt":"x","logprobs":0}"#)
                .unwrap_or_else(|e| unreachable!("{e}"));
        assert!(completion(&c, &l).is_ok());
    }

    #[test]
    fn defaults_follow_openai() {
        let l = Limits::default();
        let r = chat_req(r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#);
        let (p, s) = chat(&r, &l).unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(
            p,
            Prompt::Chat(vec![Message {
                role: "user".into(),
                content: "hi".into()
            }])
        );
        assert_eq!((s.temperature, s.top_p, s.max_tokens), (1.0, 1.0, None));
        let c: CompletionRequest = serde_json::from_str(r#"{"model":"m","prompt":["x"]}"#)
            .unwrap_or_else(|e| unreachable!("{e}"));
        let (_, s) = completion(&c, &l).unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(s.max_tokens, Some(16));
    }

    #[test]
    fn out_of_range_fields_are_named() {
        let l = Limits::default();
        assert_eq!(
            err_param(chat(&chat_with(r#","temperature":2.5"#), &l)).as_deref(),
            Some("temperature")
        );
        assert_eq!(
            err_param(chat(&chat_with(r#","top_p":0"#), &l)).as_deref(),
            Some("top_p")
        );
        assert_eq!(
            err_param(chat(&chat_with(r#","top_k":-1"#), &l)).as_deref(),
            Some("top_k")
        );
        assert_eq!(
            err_param(chat(&chat_with(r#","max_tokens":0"#), &l)).as_deref(),
            Some("max_tokens")
        );
        assert_eq!(
            err_param(chat(&chat_with(r#","n":3"#), &l)).as_deref(),
            Some("n")
        );
        assert_eq!(
            err_param(chat(&chat_with(r#","stop":["a","b","c","d","e"]"#), &l)).as_deref(),
            Some("stop")
        );
        let bad_role = chat_req(r#"{"model":"m","messages":[{"role":"wizard","content":"hi"}]}"#);
        assert_eq!(
            err_param(chat(&bad_role, &l)).as_deref(),
            Some("messages[0].role")
        );
        let empty = chat_req(r#"{"model":"m","messages":[]}"#);
        assert_eq!(err_param(chat(&empty, &l)).as_deref(), Some("messages"));
    }
}
