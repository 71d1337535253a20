//! Validation of OpenAI request fields into engine parameters; every rejection names the field.

use lattice_api::{ApiError, ChatCompletionRequest, CompletionRequest, PromptSpec, SamplingFields};
use lattice_engine::{MAX_TOP_LOGPROBS, OutputFormat, Prompt, SamplingParams, json_schema};

use crate::{Limits, tools};

/// OpenAI's default for `/v1/completions` when `max_tokens` is absent.
const COMPLETIONS_DEFAULT_MAX_TOKENS: u32 = 16;

/// Most entries in `logit_bias` (OpenAI's limit).
const MAX_LOGIT_BIAS: usize = 300;

const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

/// A chat request in engine terms; the flag says the answer is in the tools' JSON shape (see
/// [`tools`]) and is to be read back into tool calls.
pub(crate) fn chat(
    req: &ChatCompletionRequest,
    limits: &Limits,
) -> Result<(Prompt, SamplingParams, bool), ApiError> {
    if req.messages.is_empty() {
        return Err(ApiError::invalid_param(
            "messages",
            "`messages` must not be empty.",
        ));
    }
    let mut texts = Vec::with_capacity(req.messages.len());
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
        texts.push(m.text().map_err(|kind| {
            ApiError::invalid_param(
                &format!("messages[{i}].content"),
                format!("Content parts of type `{kind}` are not supported by this model."),
            )
        })?);
    }
    if req.sampling.best_of.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid_param(
            "best_of",
            "`best_of` is not supported on chat completions (it is a text completions field); ask for several answers with `n`.",
        ));
    }
    let mut messages = tools::conversation(&req.messages, texts)?;
    let mut params = sampling(&req.sampling, req.max_tokens(), None, limits)?;
    params.logprobs = chat_logprobs(&req.sampling)?;
    let tools = tools::parse(&req.sampling, req.parallel_tool_calls, &params.format)?;
    if let Some(t) = &tools {
        if !params.stop.is_empty() {
            return Err(ApiError::invalid_param(
                "stop",
                "`stop` cannot be combined with `tools`: the answer is JSON that a stop sequence would cut short.",
            ));
        }
        if params.logprobs.is_some() {
            return Err(ApiError::invalid_param(
                "logprobs",
                "`logprobs` cannot be combined with `tools` (the tokens would be the tool-call JSON's, not the reply's).",
            ));
        }
        if params.ignore_eos {
            return Err(ApiError::invalid_param(
                "ignore_eos",
                "`ignore_eos` cannot be combined with `tools`: the answer ends where its JSON does.",
            ));
        }
        t.instruct(&mut messages);
        params.format = t.format();
    }
    Ok((Prompt::Chat(messages), params, tools.is_some()))
}

pub(crate) fn completion(
    req: &CompletionRequest,
    limits: &Limits,
) -> Result<(Vec<String>, SamplingParams, u32), ApiError> {
    let prompts = match &req.prompt {
        PromptSpec::One(p) => vec![p.clone()],
        PromptSpec::Many(v) if v.is_empty() => {
            return Err(ApiError::invalid_param(
                "prompt",
                "`prompt` must be a string or a non-empty list of strings.",
            ));
        }
        PromptSpec::Many(v) if v.len() > limits.max_choices => {
            return Err(ApiError::invalid_param(
                "prompt",
                format!(
                    "At most {} prompts per request, got {}.",
                    limits.max_choices,
                    v.len()
                ),
            ));
        }
        PromptSpec::Many(v) => v.clone(),
    };
    let s = &req.sampling;
    for (param, v) in [
        ("tools", &s.tools),
        ("tool_choice", &s.tool_choice),
        ("functions", &s.functions),
    ] {
        let choice = v.as_ref().and_then(|c| c.as_str());
        if !asks_nothing(v.as_ref()) && choice != Some("none") && choice != Some("auto") {
            return Err(ApiError::invalid_param(
                param,
                format!("`{param}` is for chat completions; text completions cannot call tools."),
            ));
        }
    }
    let mut params = sampling(
        &req.sampling,
        req.max_tokens,
        Some(COMPLETIONS_DEFAULT_MAX_TOKENS),
        limits,
    )?;
    params.logprobs = completion_logprobs(&req.sampling)?;
    if req.echo == Some(true) && params.logprobs.is_some() {
        return Err(ApiError::invalid_param(
            "echo",
            "`echo` with `logprobs` is not supported: the prompt's own log probabilities are not computed.",
        ));
    }
    let best_of = req.sampling.best_of.unwrap_or(1);
    let n = req.sampling.n.unwrap_or(1);
    if best_of == 0 || (best_of > 1 && best_of < n) {
        return Err(ApiError::invalid_param(
            "best_of",
            format!("`best_of` must be at least `n` ({n}), got {best_of}."),
        ));
    }
    if best_of > 1 && req.stream {
        return Err(ApiError::invalid_param(
            "best_of",
            "`best_of` cannot be streamed: the best answers are known only when all have ended.",
        ));
    }
    Ok((prompts, params, best_of))
}

/// The answers a request asks for: `n` per prompt (OpenAI's 1…128; here at most
/// [`Limits::max_choices`] in all, counting every prompt of a list).
pub(crate) fn choices(n: Option<u32>, prompts: usize, limits: &Limits) -> Result<u32, ApiError> {
    let n = n.unwrap_or(1);
    let all = usize::try_from(n)
        .unwrap_or(usize::MAX)
        .saturating_mul(prompts);
    if n == 0 || all > limits.max_choices {
        let (param, what) = if prompts > 1 && n != 0 && n as usize <= limits.max_choices {
            ("prompt", format!("{prompts} prompts × n = {n}"))
        } else {
            ("n", format!("n = {n}"))
        };
        return Err(ApiError::invalid_param(
            param,
            format!(
                "A request may ask for 1 to {} answers in all; {what} asks for {all}.",
                limits.max_choices
            ),
        ));
    }
    Ok(n)
}

fn sampling(
    s: &SamplingFields,
    max_tokens: Option<u32>,
    default_max: Option<u32>,
    limits: &Limits,
) -> Result<SamplingParams, ApiError> {
    refuse_unsupported(s)?;
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
    let format = output_format(s.response_format.as_ref())?;
    let ignore_eos = s.ignore_eos.unwrap_or(false);
    if ignore_eos && !format.is_text() {
        return Err(ApiError::invalid_param(
            "ignore_eos",
            "`ignore_eos` cannot be combined with a JSON `response_format`: the answer ends where the JSON does.",
        ));
    }
    Ok(SamplingParams {
        temperature,
        top_p,
        top_k,
        seed: s.seed.map(|v| v.cast_unsigned()),
        stop,
        max_tokens: max_tokens.or(default_max),
        ignore_eos,
        presence_penalty: penalty(s.presence_penalty, "presence_penalty")?,
        frequency_penalty: penalty(s.frequency_penalty, "frequency_penalty")?,
        logit_bias: logit_bias(s.logit_bias.as_ref())?,
        format,
        logprobs: None,
    })
}

/// Chat's `logprobs` (a boolean) and `top_logprobs` (0…20, only with `logprobs: true`).
fn chat_logprobs(s: &SamplingFields) -> Result<Option<u8>, ApiError> {
    use serde_json::Value;
    let top = match &s.top_logprobs {
        None | Some(Value::Null) => 0,
        Some(v) => v
            .as_u64()
            .filter(|&n| n <= u64::from(MAX_TOP_LOGPROBS))
            .and_then(|n| u8::try_from(n).ok())
            .ok_or_else(|| {
                ApiError::invalid_param(
                    "top_logprobs",
                    format!("`top_logprobs` must be an integer from 0 to {MAX_TOP_LOGPROBS}."),
                )
            })?,
    };
    match &s.logprobs {
        Some(Value::Bool(true)) => Ok(Some(top)),
        None | Some(Value::Null | Value::Bool(false)) if top == 0 => Ok(None),
        None | Some(Value::Null | Value::Bool(false)) => Err(ApiError::invalid_param(
            "top_logprobs",
            "`top_logprobs` needs `logprobs: true`.",
        )),
        Some(_) => Err(ApiError::invalid_param(
            "logprobs",
            "`logprobs` must be a boolean (the count of alternatives is `top_logprobs`).",
        )),
    }
}

/// Text completions' `logprobs`: how many alternatives to list per token (0…20).
fn completion_logprobs(s: &SamplingFields) -> Result<Option<u8>, ApiError> {
    use serde_json::Value;
    if !asks_nothing(s.top_logprobs.as_ref()) {
        return Err(ApiError::invalid_param(
            "top_logprobs",
            "Text completions take the count of alternatives in `logprobs`.",
        ));
    }
    match &s.logprobs {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .filter(|&n| n <= u64::from(MAX_TOP_LOGPROBS))
            .and_then(|n| u8::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| {
                ApiError::invalid_param(
                    "logprobs",
                    format!("`logprobs` must be an integer from 0 to {MAX_TOP_LOGPROBS}."),
                )
            }),
    }
}

fn penalty(p: Option<f32>, param: &str) -> Result<f32, ApiError> {
    match p {
        None => Ok(0.0),
        Some(p) if (-2.0..=2.0).contains(&p) => Ok(p),
        Some(p) => Err(ApiError::invalid_param(
            param,
            format!("`{param}` must be between -2 and 2, got {p}."),
        )),
    }
}

/// `{"<token id>": bias, …}` → sorted `(id, bias)` pairs.
fn logit_bias(v: Option<&serde_json::Value>) -> Result<Vec<(u32, f32)>, ApiError> {
    let err = |m: String| Err(ApiError::invalid_param("logit_bias", m));
    let map = match v {
        None | Some(serde_json::Value::Null) => return Ok(Vec::new()),
        Some(serde_json::Value::Object(m)) => m,
        Some(_) => {
            return err("`logit_bias` must be an object mapping token ids to biases.".into());
        }
    };
    if map.len() > MAX_LOGIT_BIAS {
        return err(format!(
            "`logit_bias` may bias at most {MAX_LOGIT_BIAS} tokens, got {}.",
            map.len()
        ));
    }
    let mut out = Vec::with_capacity(map.len());
    for (k, b) in map {
        let Ok(id) = k.parse::<u32>() else {
            return err(format!(
                "`logit_bias` keys are token ids (non-negative integers), got `{k}`."
            ));
        };
        let Some(b) = b.as_f64().filter(|b| (-100.0..=100.0).contains(b)) else {
            return err(format!(
                "`logit_bias[{k}]` must be a number between -100 and 100, got {b}."
            ));
        };
        #[allow(clippy::cast_possible_truncation)] // within ±100
        out.push((id, b as f32));
    }
    out.sort_by_key(|(id, _)| *id);
    out.dedup_by_key(|(id, _)| *id);
    Ok(out)
}

/// OpenAI's `response_format`; a JSON schema is converted once here so that a schema no node
/// can enforce is refused before it is routed.
fn output_format(v: Option<&serde_json::Value>) -> Result<OutputFormat, ApiError> {
    let err = |param: &str, m: String| Err(ApiError::invalid_param(param, m));
    let Some(f) = v.filter(|f| !f.is_null()) else {
        return Ok(OutputFormat::Text);
    };
    match f.get("type").and_then(|t| t.as_str()) {
        Some("text") => Ok(OutputFormat::Text),
        Some("json_object") => Ok(OutputFormat::JsonObject),
        Some("json_schema") => {
            let Some(spec) = f.get("json_schema").filter(|s| s.is_object()) else {
                return err(
                    "response_format.json_schema",
                    "`response_format.json_schema` must be an object with the `schema`.".into(),
                );
            };
            let Some(schema) = spec
                .get("schema")
                .filter(|s| s.is_object() || s.is_boolean())
            else {
                return err(
                    "response_format.json_schema.schema",
                    "`response_format.json_schema.schema` must be a JSON Schema object.".into(),
                );
            };
            let name = match spec.get("name") {
                None | Some(serde_json::Value::Null) => "response".to_owned(),
                Some(serde_json::Value::String(n)) => n.clone(),
                Some(_) => {
                    return err(
                        "response_format.json_schema.name",
                        "`response_format.json_schema.name` must be a string.".into(),
                    );
                }
            };
            let strict = match spec.get("strict") {
                None | Some(serde_json::Value::Null) => None,
                Some(serde_json::Value::Bool(b)) => Some(*b),
                Some(_) => {
                    return err(
                        "response_format.json_schema.strict",
                        "`response_format.json_schema.strict` must be a boolean.".into(),
                    );
                }
            };
            if let Err(e) = json_schema::schema_grammar(schema) {
                return err(
                    "response_format.json_schema.schema",
                    format!("The schema cannot be enforced: {e}."),
                );
            }
            Ok(OutputFormat::JsonSchema {
                name,
                schema: schema.clone(),
                strict,
            })
        }
        _ => err(
            "response_format.type",
            "`response_format.type` must be `text`, `json_object` or `json_schema`.".into(),
        ),
    }
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
    if s.suffix.as_deref().is_some_and(|t| !t.is_empty()) {
        return refuse("suffix", "Suffixes (insertion) are");
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

    fn err_param<T>(r: Result<T, ApiError>) -> Option<String> {
        r.err().and_then(|e| e.body.param)
    }

    /// Fields the API does not implement are refused by name when they ask for something, and
    /// accepted in the forms that ask for nothing (what many clients send by default).
    #[test]
    fn unsupported_fields_are_refused_not_ignored() {
        let l = Limits::default();
        let with = |extra: &str| chat_with(&format!(",{extra}"));
        for (extra, param) in [
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
        // Log probabilities: chat's boolean and count of alternatives, completions' count.
        let chat_lp = |extra: &str| chat(&with(extra), &l).map(|(_, s, _)| s.logprobs);
        for (extra, want) in [
            (r#""logprobs":true"#, Ok(Some(0))),
            (r#""logprobs":true,"top_logprobs":20"#, Ok(Some(20))),
            (r#""logprobs":false,"top_logprobs":0"#, Ok(None)),
            (r#""top_logprobs":3"#, Err("top_logprobs")),
            (r#""logprobs":true,"top_logprobs":21"#, Err("top_logprobs")),
            (r#""logprobs":5"#, Err("logprobs")),
            (
                r#""logprobs":true,"tools":[{"type":"function","function":{"name":"f"}}]"#,
                Err("logprobs"),
            ),
            (
                r#""stop":"}","tools":[{"type":"function","function":{"name":"f"}}]"#,
                Err("stop"),
            ),
            (
                r#""stop":"}","tools":[{"type":"function","function":{"name":"f"}}],"tool_choice":"none""#,
                Ok(None),
            ),
        ] {
            let got = chat_lp(extra).map_err(|e| e.body.param.unwrap_or_default());
            assert_eq!(got, want.map_err(str::to_owned), "{extra}");
        }
        let completion_lp = |extra: &str| {
            let c: CompletionRequest =
                serde_json::from_str(&format!(r#"{{"model":"m","prompt":"x",{extra}}}"#))
                    .unwrap_or_else(|e| unreachable!("{e}"));
            completion(&c, &l)
                .map(|(_, s, _)| s.logprobs)
                .map_err(|e| e.body.param.unwrap_or_default())
        };
        assert_eq!(completion_lp(r#""logprobs":2"#), Ok(Some(2)));
        assert_eq!(completion_lp(r#""logprobs":0"#), Ok(Some(0)));
        assert_eq!(completion_lp(r#""logprobs":null"#), Ok(None));
        assert_eq!(completion_lp(r#""logprobs":true"#), Err("logprobs".into()));
        assert_eq!(completion_lp(r#""logprobs":21"#), Err("logprobs".into()));
        assert_eq!(
            completion_lp(r#""logprobs":1,"top_logprobs":1"#),
            Err("top_logprobs".into())
        );
        // Tools are for chat; a text completion asking for them is refused by name.
        for (extra, param) in [
            (
                r#""tools":[{"type":"function","function":{"name":"f"}}]"#,
                Some("tools"),
            ),
            (r#""tool_choice":"required""#, Some("tool_choice")),
            (r#""tool_choice":"none","tools":[]"#, None),
        ] {
            let c: CompletionRequest =
                serde_json::from_str(&format!(r#"{{"model":"m","prompt":"x",{extra}}}"#))
                    .unwrap_or_else(|e| unreachable!("{e}"));
            assert_eq!(err_param(completion(&c, &l)).as_deref(), param, "{extra}");
        }
    }

    #[test]
    fn defaults_follow_openai() {
        let l = Limits::default();
        let r = chat_req(r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#);
        let (p, s, tools) = chat(&r, &l).unwrap_or_else(|e| unreachable!("{e}"));
        assert!(!tools);
        assert_eq!(
            p,
            Prompt::Chat(vec![lattice_engine::Message {
                role: "user".into(),
                content: "hi".into()
            }])
        );
        assert_eq!((s.temperature, s.top_p, s.max_tokens), (1.0, 1.0, None));
        let c: CompletionRequest = serde_json::from_str(r#"{"model":"m","prompt":["x"]}"#)
            .unwrap_or_else(|e| unreachable!("{e}"));
        let (_, s, _) = completion(&c, &l).unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(s.max_tokens, Some(16));
    }

    /// `n` answers per prompt, every prompt of a completions list: at most `max_choices` in
    /// all, the excess named by the field that makes it.
    #[test]
    fn answers_per_request_are_bounded_and_named() {
        let l = Limits {
            max_choices: 6,
            ..Limits::default()
        };
        assert_eq!(choices(None, 1, &l).ok(), Some(1));
        assert_eq!(choices(Some(6), 1, &l).ok(), Some(6));
        assert_eq!(choices(Some(3), 2, &l).ok(), Some(3));
        assert_eq!(choices(None, 6, &l).ok(), Some(1));
        assert_eq!(err_param(choices(Some(0), 1, &l)).as_deref(), Some("n"));
        assert_eq!(err_param(choices(Some(7), 1, &l)).as_deref(), Some("n"));
        assert_eq!(
            err_param(choices(Some(u32::MAX), 1, &l)).as_deref(),
            Some("n")
        );
        assert_eq!(
            err_param(choices(Some(4), 2, &l)).as_deref(),
            Some("prompt")
        );
        assert_eq!(err_param(choices(None, 7, &l)).as_deref(), Some("prompt"));
        assert_eq!(err_param(choices(Some(7), 2, &l)).as_deref(), Some("n"));
        let completion_with = |extra: &str| -> CompletionRequest {
            serde_json::from_str(&format!(r#"{{"model":"m","prompt":["a","b"]{extra}}}"#))
                .unwrap_or_else(|e| unreachable!("{e}"))
        };
        let (prompts, _, best_of) =
            completion(&completion_with(""), &l).unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(prompts, ["a", "b"]);
        assert_eq!(best_of, 1);
        let best = |extra: &str| completion(&completion_with(extra), &l).map(|(_, _, b)| b);
        assert_eq!(best(r#","best_of":3,"n":2"#).ok(), Some(3));
        assert_eq!(best(r#","best_of":1,"n":2"#).ok(), Some(1));
        for extra in [
            r#","best_of":0"#,
            r#","best_of":2,"n":3"#,
            r#","best_of":2,"stream":true"#,
        ] {
            assert_eq!(
                err_param(best(extra)).as_deref(),
                Some("best_of"),
                "{extra}"
            );
        }
        assert_eq!(
            err_param(chat(&chat_with(r#","best_of":2"#), &l)).as_deref(),
            Some("best_of")
        );
        let empty: CompletionRequest = serde_json::from_str(r#"{"model":"m","prompt":[]}"#)
            .unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(err_param(completion(&empty, &l)).as_deref(), Some("prompt"));
        // Echo gives the prompt back; its log probabilities are not computed, so both together
        // are refused rather than answered without them.
        assert!(completion(&completion_with(r#","echo":true"#), &l).is_ok());
        assert_eq!(
            err_param(completion(
                &completion_with(r#","echo":true,"logprobs":2"#),
                &l
            ))
            .as_deref(),
            Some("echo")
        );
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

    #[test]
    fn penalties_and_logit_bias_are_checked_and_kept() {
        let l = Limits::default();
        let ok = |extra: &str| {
            chat(&chat_with(extra), &l)
                .map(|(_, s, _)| s)
                .unwrap_or_else(|e| unreachable!("{extra}: {e}"))
        };
        let s =
            ok(r#","presence_penalty":0.5,"frequency_penalty":-2,"logit_bias":{"7":5,"3":-100}"#);
        assert_eq!((s.presence_penalty, s.frequency_penalty), (0.5, -2.0));
        assert_eq!(
            s.logit_bias,
            vec![(3, -100.0), (7, 5.0)],
            "sorted by token id"
        );
        let s = ok("");
        assert_eq!((s.presence_penalty, s.frequency_penalty), (0.0, 0.0));
        assert!(s.logit_bias.is_empty() && s.format.is_text());
        for (extra, param) in [
            (r#","presence_penalty":2.5"#, "presence_penalty"),
            (r#","frequency_penalty":-3"#, "frequency_penalty"),
            (r#","logit_bias":{"x":1}"#, "logit_bias"),
            (r#","logit_bias":{"-1":1}"#, "logit_bias"),
            (r#","logit_bias":{"5":101}"#, "logit_bias"),
            (r#","logit_bias":{"5":"1"}"#, "logit_bias"),
            (r#","logit_bias":[1]"#, "logit_bias"),
        ] {
            assert_eq!(
                err_param(chat(&chat_with(extra), &l)).as_deref(),
                Some(param),
                "{extra}"
            );
        }
        let many: Vec<String> = (0..=MAX_LOGIT_BIAS)
            .map(|i| format!(r#""{i}":1"#))
            .collect();
        let extra = format!(r#","logit_bias":{{{}}}"#, many.join(","));
        assert_eq!(
            err_param(chat(&chat_with(&extra), &l)).as_deref(),
            Some("logit_bias")
        );
    }

    #[test]
    fn response_formats_are_parsed_and_unenforceable_schemas_refused() {
        let l = Limits::default();
        let format = |extra: &str| chat(&chat_with(extra), &l).map(|(_, s, _)| s.format);
        assert_eq!(
            format(r#","response_format":{"type":"json_object"}"#).ok(),
            Some(OutputFormat::JsonObject)
        );
        assert_eq!(
            format(r#","response_format":{"type":"json_schema","json_schema":{"name":"p","strict":true,"schema":{"type":"object","properties":{"a":{"type":"integer"}},"required":["a"]}}}"#).ok(),
            Some(OutputFormat::JsonSchema {
                name: "p".into(),
                schema: serde_json::json!({"type":"object","properties":{"a":{"type":"integer"}},"required":["a"]}),
                strict: Some(true),
            })
        );
        for (extra, param, says) in [
            (
                r#","response_format":{"type":"xml"}"#,
                "response_format.type",
                "json_schema",
            ),
            (
                r#","response_format":"json""#,
                "response_format.type",
                "json_object",
            ),
            (
                r#","response_format":{"type":"json_schema"}"#,
                "response_format.json_schema",
                "schema",
            ),
            (
                r#","response_format":{"type":"json_schema","json_schema":{"name":"x"}}"#,
                "response_format.json_schema.schema",
                "JSON Schema",
            ),
            (
                r#","response_format":{"type":"json_schema","json_schema":{"schema":{"type":"string","pattern":"^a"}}}"#,
                "response_format.json_schema.schema",
                "`pattern`",
            ),
            (
                r#","response_format":{"type":"json_object"},"ignore_eos":true"#,
                "ignore_eos",
                "JSON",
            ),
        ] {
            let e = chat(&chat_with(extra), &l).err();
            assert_eq!(
                e.as_ref().and_then(|e| e.body.param.as_deref()),
                Some(param),
                "{extra}"
            );
            assert!(e.is_some_and(|e| e.body.message.contains(says)), "{extra}");
        }
    }
}
