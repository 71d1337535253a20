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

#[cfg(test)]
mod tests {
    use super::*;

    fn chat_req(json: &str) -> ChatCompletionRequest {
        serde_json::from_str(json).unwrap_or_else(|e| unreachable!("{e}"))
    }

    fn err_param(r: Result<(Prompt, SamplingParams), ApiError>) -> Option<String> {
        r.err().and_then(|e| e.body.param)
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
        let base = |extra: &str| {
            chat_req(&format!(
                r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}}]{extra}}}"#
            ))
        };
        assert_eq!(
            err_param(chat(&base(r#","temperature":2.5"#), &l)).as_deref(),
            Some("temperature")
        );
        assert_eq!(
            err_param(chat(&base(r#","top_p":0"#), &l)).as_deref(),
            Some("top_p")
        );
        assert_eq!(
            err_param(chat(&base(r#","top_k":-1"#), &l)).as_deref(),
            Some("top_k")
        );
        assert_eq!(
            err_param(chat(&base(r#","max_tokens":0"#), &l)).as_deref(),
            Some("max_tokens")
        );
        assert_eq!(
            err_param(chat(&base(r#","n":3"#), &l)).as_deref(),
            Some("n")
        );
        assert_eq!(
            err_param(chat(&base(r#","stop":["a","b","c","d","e"]"#), &l)).as_deref(),
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
