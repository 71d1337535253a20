//! Tool calling ("function calling") for every model, built on structured outputs.
//!
//! A chat request with `tools` is answered in one JSON shape that a grammar enforces:
//! `{"tool_calls": [{"name": …, "arguments": {…}}, …]}` to call tools, or `{"response": …}` to
//! answer the user (`tool_choice: "auto"`, the default); only the first with `"required"` or a
//! named function. A system message describes the tools and the shape to the model, and the
//! conversation's earlier calls and results are written in the same shape (the assistant's call
//! as that JSON, a tool's result as a user message `{"tool_response": …}`), so any chat template
//! renders them — also templates that know no `tool` role. The answer is parsed back into
//! OpenAI's `tool_calls`.
//!
//! Why one generic shape instead of each model family's native tool format (Hermes'
//! `<tool_call>` tags, Llama 3's `<|python_tag|>`, …): it works the same on every model and
//! every node backend (a node proxying an OpenAI-compatible upstream passes a JSON schema on),
//! and the grammar makes every call well formed — a tool's arguments are an instance of its
//! schema, even from a 135M model. llama.cpp's server does the same for models without a
//! native format.
//!
//! Pure: no I/O; the HTTP layer calls it before routing and after the answer.

use lattice_api::{ApiError, ChatMessage, SamplingFields};
use lattice_engine::{Message, OutputFormat, json_schema};
use serde_json::{Map, Value, json};

/// Most tools one request may declare (OpenAI's limit).
pub(crate) const MAX_TOOLS: usize = 128;
/// Longest tool name (OpenAI's rule: `[a-zA-Z0-9_-]{1,64}`).
const MAX_NAME: usize = 64;

/// A request's tools, ready to constrain and parse its answer.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Tools {
    /// The answer's JSON Schema (what the grammar enforces).
    pub(crate) schema: Value,
    /// What the model is told, appended to the system message.
    pub(crate) prompt: String,
}

/// What the model answered, in OpenAI's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Answer {
    /// A reply to the user (the `response` branch; JSON text when a response format asked for
    /// JSON).
    Content(String),
    /// Calls: each tool's name and its arguments as JSON text (OpenAI sends them as a string).
    /// `complete` is false when the answer was cut short (by `max_tokens`): the calls are those
    /// written whole before the cut (a small model may repeat a call until the limit).
    Calls {
        calls: Vec<(String, String)>,
        complete: bool,
    },
    /// Not the shape (cut short before a whole call or inside a JSON-valued reply): the text
    /// as it came.
    Raw(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Choice {
    /// No call: the tools are checked and the answer is free.
    None,
    Auto,
    Required,
    Named(String),
}

/// Reads `tools`, `tool_choice` and `parallel_tool_calls`; `None` when the answer is free
/// (no tools, or `tool_choice: "none"`). `response` is the request's `response_format`, which
/// becomes the `response` branch's schema.
pub(crate) fn parse(
    s: &SamplingFields,
    parallel: Option<bool>,
    response: &OutputFormat,
) -> Result<Option<Tools>, ApiError> {
    let err = |param: &str, m: String| Err(ApiError::invalid_param(param, m));
    if s.functions.as_ref().is_some_and(|f| !f.is_null()) {
        return err(
            "functions",
            "`functions` is OpenAI's deprecated form of tools; send `tools` instead.".into(),
        );
    }
    let choice = match &s.tool_choice {
        None | Some(Value::Null) => Choice::Auto,
        Some(Value::String(c)) if c == "auto" => Choice::Auto,
        Some(Value::String(c)) if c == "none" => Choice::None,
        Some(Value::String(c)) if c == "required" => Choice::Required,
        Some(Value::Object(o)) => {
            match o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
            {
                Some(name) if o.get("type").and_then(Value::as_str) == Some("function") => {
                    Choice::Named(name.to_owned())
                }
                _ => {
                    return err(
                        "tool_choice",
                        "`tool_choice` must be `none`, `auto`, `required` or \
                         {\"type\": \"function\", \"function\": {\"name\": …}}."
                            .into(),
                    );
                }
            }
        }
        Some(_) => {
            return err(
                "tool_choice",
                "`tool_choice` must be `none`, `auto`, `required` or an object naming a function."
                    .into(),
            );
        }
    };
    let list = match &s.tools {
        None | Some(Value::Null) => &Vec::new(),
        Some(Value::Array(list)) => list,
        Some(_) => return err("tools", "`tools` must be an array of tools.".into()),
    };
    if list.is_empty() {
        if matches!(choice, Choice::Auto | Choice::None) {
            return Ok(None);
        }
        return err(
            "tool_choice",
            "`tool_choice` asks for a tool call but the request declares no `tools`.".into(),
        );
    }
    if list.len() > MAX_TOOLS {
        return err(
            "tools",
            format!("At most {MAX_TOOLS} tools are allowed, got {}.", list.len()),
        );
    }
    let mut names: Vec<&str> = Vec::with_capacity(list.len());
    let mut described = Vec::with_capacity(list.len());
    let mut defs = Map::new();
    for (i, tool) in list.iter().enumerate() {
        let at = format!("tools[{i}]");
        if tool.get("type").and_then(Value::as_str) != Some("function") {
            return err(
                &format!("{at}.type"),
                format!("`{at}.type` must be `function`."),
            );
        }
        let Some(f) = tool.get("function").and_then(Value::as_object) else {
            return err(
                &format!("{at}.function"),
                format!("`{at}.function` must be an object with the function's `name`."),
            );
        };
        let name = match f.get("name").and_then(Value::as_str) {
            Some(n)
                if !n.is_empty()
                    && n.len() <= MAX_NAME
                    && n.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') =>
            {
                n
            }
            _ => {
                return err(
                    &format!("{at}.function.name"),
                    format!(
                        "`{at}.function.name` must be 1 to {MAX_NAME} letters, digits, `_` or `-`."
                    ),
                );
            }
        };
        if names.contains(&name) {
            return err(
                &format!("{at}.function.name"),
                format!("Two tools are named `{name}`."),
            );
        }
        let description = match f.get("description") {
            None | Some(Value::Null) => None,
            Some(Value::String(d)) => Some(d.as_str()),
            Some(_) => {
                return err(
                    &format!("{at}.function.description"),
                    format!("`{at}.function.description` must be a string."),
                );
            }
        };
        let parameters = match f.get("parameters") {
            None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
            // Arguments are an object (clients pass them on as keyword arguments).
            Some(Value::Object(p)) => match p.get("type") {
                None => {
                    let mut p = p.clone();
                    p.insert("type".into(), "object".into());
                    Value::Object(p)
                }
                Some(t) if t == "object" => Value::Object(p.clone()),
                Some(_) => {
                    return err(
                        &format!("{at}.function.parameters"),
                        format!(
                            "`{at}.function.parameters` must describe an object (`\"type\": \"object\"`)."
                        ),
                    );
                }
            },
            Some(_) => {
                return err(
                    &format!("{at}.function.parameters"),
                    format!("`{at}.function.parameters` must be a JSON Schema object."),
                );
            }
        };
        if choice == Choice::None {
            // Nothing is enforced: the tool only has to be well formed.
            names.push(name);
            continue;
        }
        if let Err(e) = json_schema::schema_grammar(&parameters) {
            return err(
                &format!("{at}.function.parameters"),
                format!("`{name}`'s parameters cannot be enforced: {e}."),
            );
        }
        let mut entry = Map::new();
        entry.insert("name".into(), name.into());
        if let Some(d) = description {
            entry.insert("description".into(), d.into());
        }
        entry.insert("parameters".into(), parameters.clone());
        described.push(Value::Object(entry));
        defs.insert(format!("tool{i}"), rebase(parameters, &format!("tool{i}")));
        names.push(name);
    }
    if choice == Choice::None {
        return Ok(None);
    }
    let only = match &choice {
        Choice::Named(n) => match names.iter().position(|m| m == n) {
            Some(i) => Some(i),
            None => {
                return err(
                    "tool_choice",
                    format!("`tool_choice` names `{n}`, which is not among the `tools`."),
                );
            }
        },
        _ => None,
    };
    let call = |i: usize, name: &str| {
        json!({
            "type": "object",
            "properties": {
                "name": {"const": name},
                "arguments": {"$ref": format!("#/$defs/tool{i}")},
            },
            "required": ["name", "arguments"],
            "additionalProperties": false,
        })
    };
    let mut items: Vec<Value> = match only {
        Some(i) => vec![call(i, names[i])],
        None => names.iter().enumerate().map(|(i, n)| call(i, n)).collect(),
    };
    let items = if items.len() == 1 {
        items.remove(0)
    } else {
        json!({"anyOf": items})
    };
    let mut calls = json!({"type": "array", "items": items, "minItems": 1});
    if parallel == Some(false) || only.is_some() {
        calls["maxItems"] = json!(1);
    }
    let calls = json!({
        "type": "object",
        "properties": {"tool_calls": calls},
        "required": ["tool_calls"],
        "additionalProperties": false,
    });
    let (reply, reply_shape) = match response {
        OutputFormat::Text => (
            json!({"type": "string"}),
            "your reply to the user, a string",
        ),
        OutputFormat::JsonObject => (json!({"type": "object"}), "your reply, a JSON object"),
        OutputFormat::JsonSchema { schema, .. } => {
            defs.insert("response".into(), rebase(schema.clone(), "response"));
            (
                json!({"$ref": "#/$defs/response"}),
                "your reply, JSON matching the requested response format",
            )
        }
    };
    let tool_list = described
        .iter()
        .map(Value::to_string)
        .collect::<Vec<_>>()
        .join("\n");
    let (root, shape) = match (&choice, only) {
        (Choice::Auto, _) => (
            json!({"anyOf": [calls, {
                "type": "object",
                "properties": {"response": reply},
                "required": ["response"],
                "additionalProperties": false,
            }]}),
            format!(
                "Answer with one JSON object: either {{\"tool_calls\": [{{\"name\": <tool \
                 name>, \"arguments\": <its arguments>}}, …]}} to call tools (their results \
                 will follow), or {{\"response\": <{reply_shape}>}} to reply directly."
            ),
        ),
        (_, Some(i)) => (
            calls,
            format!(
                "Answer with one JSON object calling `{}`: {{\"tool_calls\": [{{\"name\": \
                 \"{}\", \"arguments\": <its arguments>}}]}}.",
                names[i], names[i]
            ),
        ),
        _ => (
            calls,
            "Answer with one JSON object calling one or more tools: {\"tool_calls\": \
             [{\"name\": <tool name>, \"arguments\": <its arguments>}, …]}."
                .to_owned(),
        ),
    };
    let mut schema = root;
    schema["$defs"] = Value::Object(defs);
    let prompt = format!(
        "You can call these tools (their arguments are described by JSON Schema):\n\
         {tool_list}\n\n{shape}"
    );
    // Each part converted on its own above; the whole may still exceed the grammar's bounds.
    if let Err(e) = json_schema::schema_grammar(&schema) {
        return err(
            "tools",
            format!("The tools together cannot be enforced: {e}."),
        );
    }
    Ok(Some(Tools { schema, prompt }))
}

/// Moves a schema under `#/$defs/<at>` of the answer's schema: its own references (`#…`)
/// point into itself there. Walks schema positions only — the subschemas under keywords —
/// so a property that happens to be named `default` or `$ref` is a schema like any other, and
/// literal values (`const`, `enum`, `default`, `examples`, annotations) are kept as they are.
fn rebase(schema: Value, at: &str) -> Value {
    let Value::Object(m) = schema else {
        return schema;
    };
    let each = |v: Value, f: &dyn Fn(Value) -> Value| match v {
        Value::Object(map) => Value::Object(map.into_iter().map(|(k, v)| (k, f(v))).collect()),
        other => other,
    };
    let all = |v: Value| match v {
        Value::Array(a) => Value::Array(a.into_iter().map(|v| rebase(v, at)).collect()),
        other => rebase(other, at),
    };
    Value::Object(
        m.into_iter()
            .map(|(k, v)| {
                let v = match k.as_str() {
                    "$ref" => match v {
                        Value::String(r) => match r.strip_prefix('#') {
                            Some(rest) => Value::String(format!("#/$defs/{at}{rest}")),
                            None => Value::String(r),
                        },
                        other => other,
                    },
                    // Keywords whose value is a map of name → schema.
                    "properties" | "$defs" | "definitions" | "patternProperties"
                    | "dependentSchemas" => each(v, &|s| rebase(s, at)),
                    // Keywords whose value is a schema or a list of schemas.
                    "items"
                    | "additionalProperties"
                    | "anyOf"
                    | "oneOf"
                    | "allOf"
                    | "not"
                    | "if"
                    | "then"
                    | "else"
                    | "prefixItems"
                    | "additionalItems"
                    | "contains"
                    | "propertyNames"
                    | "unevaluatedProperties"
                    | "unevaluatedItems" => all(v),
                    _ => v,
                };
                (k, v)
            })
            .collect(),
    )
}

/// The conversation in the shape the model answers in: an assistant's `tool_calls` become its
/// JSON, and `tool` results (consecutive ones together) a user message of `tool_response`s.
/// `texts` are the messages' texts (checked by the caller). Errors name the field.
pub(crate) fn conversation(
    messages: &[ChatMessage],
    texts: Vec<String>,
) -> Result<Vec<Message>, ApiError> {
    let mut out: Vec<Message> = Vec::with_capacity(messages.len());
    // Call id → tool name, from the assistant messages so far.
    let mut called: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    let mut last_was_tool = false;
    for (i, (m, content)) in messages.iter().zip(texts).enumerate() {
        match (m.role.as_str(), &m.tool_calls) {
            ("assistant", Some(calls)) if !calls.is_empty() => {
                let mut list = Vec::with_capacity(calls.len());
                for (j, c) in calls.iter().enumerate() {
                    if c.function.name.is_empty() {
                        return Err(ApiError::invalid_param(
                            &format!("messages[{i}].tool_calls[{j}].function.name"),
                            "A tool call must name its function.",
                        ));
                    }
                    // OpenAI sends arguments as JSON text; a model may have written invalid JSON.
                    let arguments = serde_json::from_str::<Value>(&c.function.arguments)
                        .unwrap_or_else(|_| Value::String(c.function.arguments.clone()));
                    list.push(json!({"name": c.function.name, "arguments": arguments}));
                    called.insert(c.id.clone(), c.function.name.clone());
                }
                // Text the assistant wrote with its calls (another model's, or an edited
                // history) is kept before them: the grammar keeps this model from imitating it.
                let calls = json!({"tool_calls": list}).to_string();
                let content = if content.trim().is_empty() {
                    calls
                } else {
                    format!("{content}\n{calls}")
                };
                out.push(Message {
                    role: "assistant".into(),
                    content,
                });
                last_was_tool = false;
            }
            ("tool", _) => {
                let name = m
                    .name
                    .clone()
                    .or_else(|| called.get(m.tool_call_id.as_deref()?).cloned());
                let mut response = Map::new();
                if let Some(n) = name {
                    response.insert("name".into(), n.into());
                }
                response.insert("content".into(), content.into());
                let line = json!({"tool_response": response}).to_string();
                match out.last_mut() {
                    Some(prev) if last_was_tool => {
                        prev.content.push('\n');
                        prev.content.push_str(&line);
                    }
                    _ => out.push(Message {
                        role: "user".into(),
                        content: line,
                    }),
                }
                last_was_tool = true;
            }
            (role, _) => {
                out.push(Message {
                    role: role.to_owned(),
                    content,
                });
                last_was_tool = false;
            }
        }
    }
    Ok(out)
}

impl Tools {
    /// Tells the model about the tools: appended to the first system (or developer) message, or
    /// a system message of its own before the conversation.
    pub(crate) fn instruct(&self, messages: &mut Vec<Message>) {
        match messages.first_mut() {
            Some(m) if m.role == "system" || m.role == "developer" => {
                m.content.push_str("\n\n");
                m.content.push_str(&self.prompt);
            }
            _ => messages.insert(
                0,
                Message {
                    role: "system".into(),
                    content: self.prompt.clone(),
                },
            ),
        }
    }

    pub(crate) fn format(&self) -> OutputFormat {
        // Not `strict`: an OpenAI upstream's strict mode refuses a root `anyOf`; the grammar
        // of an embedded node holds the answer to the schema either way.
        OutputFormat::JsonSchema {
            name: "tool_calls".into(),
            schema: self.schema.clone(),
            strict: None,
        }
    }
}

/// A call as the shape writes it: its name and arguments (as JSON text).
fn call(c: &Value) -> Option<(String, String)> {
    let name = c.get("name")?.as_str()?;
    Some((name.to_owned(), c.get("arguments")?.to_string()))
}

/// The whole calls at the start of an answer cut short inside its `tool_calls` list.
fn calls_before_cut(text: &str) -> Option<Vec<(String, String)>> {
    fn open<'a>(rest: &'a str, token: &str) -> Option<&'a str> {
        rest.trim_start().strip_prefix(token)
    }
    let mut rest = open(text, "{")
        .and_then(|r| open(r, "\"tool_calls\""))
        .and_then(|r| open(r, ":"))
        .and_then(|r| open(r, "["))?;
    let mut out = Vec::new();
    loop {
        let mut values = serde_json::Deserializer::from_str(rest).into_iter::<Value>();
        let Some(Ok(v)) = values.next() else { break };
        let used = values.byte_offset();
        out.push(call(&v)?);
        match rest.get(used..)?.trim_start().strip_prefix(',') {
            Some(r) => rest = r,
            None => break,
        }
    }
    (!out.is_empty()).then_some(out)
}

/// Reads the model's answer back.
pub(crate) fn answer(text: &str) -> Answer {
    let Ok(Value::Object(mut m)) = serde_json::from_str::<Value>(text) else {
        if let Some(calls) = calls_before_cut(text) {
            return Answer::Calls {
                calls,
                complete: false,
            };
        }
        // A reply cut short: what a stream of it would have shown.
        let mut r = ReplyStream::default();
        let shown = r.push(text);
        return match r.state {
            Reading::Reply { .. } | Reading::Replied => Answer::Content(shown),
            Reading::Opening | Reading::Whole => Answer::Raw(text.to_owned()),
        };
    };
    if let Some(Value::Array(calls)) = m.remove("tool_calls") {
        return match calls.iter().map(call).collect::<Option<Vec<_>>>() {
            Some(calls) => Answer::Calls {
                calls,
                complete: true,
            },
            None => Answer::Raw(text.to_owned()),
        };
    }
    match m.remove("response") {
        Some(Value::String(s)) => Answer::Content(s),
        Some(v) => Answer::Content(v.to_string()),
        None => Answer::Raw(text.to_owned()),
    }
}

/// The text of a JSON string's body whose escapes are all complete. Lenient where JSON parsers
/// are strict (the grammar allows both): a lone surrogate becomes U+FFFD, so that text decoded
/// piece by piece and text decoded whole are the same.
fn unescape(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    let hex4 = |chars: &mut std::str::Chars<'_>| -> Option<u32> {
        let h: String = chars.by_ref().take(4).collect();
        u32::from_str_radix(&h, 16).ok().filter(|_| h.len() == 4)
    };
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some('b') => out.push('\u{8}'),
            Some('f') => out.push('\u{c}'),
            Some('u') => {
                let Some(unit) = hex4(&mut chars) else {
                    out.push(char::REPLACEMENT_CHARACTER);
                    continue;
                };
                let code = if (0xD800..0xDC00).contains(&unit) {
                    // A low surrogate must follow as `\uXXXX`; otherwise the high one is lone.
                    let mut ahead = chars.clone();
                    match (ahead.next(), ahead.next(), hex4(&mut ahead)) {
                        (Some('\\'), Some('u'), Some(low @ 0xDC00..=0xDFFF)) => {
                            chars = ahead;
                            0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00)
                        }
                        _ => 0xFFFD,
                    }
                } else {
                    unit
                };
                out.push(char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER));
            }
            Some(other) => out.push(other), // `"`, `\`, `/`
            None => {}
        }
    }
    out
}

/// Reads a streamed answer as it comes, so that a reply (the `response` branch, a string) is
/// streamed to the client token by token instead of at the end; calls, and replies that are
/// JSON values, are read whole when the answer ends.
#[derive(Debug, Default)]
pub(crate) struct ReplyStream {
    buf: String,
    state: Reading,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Reading {
    /// Not yet known whether the answer is a reply.
    #[default]
    Opening,
    /// Inside the reply's string: `buf[at..]` is not yet decoded.
    Reply { at: usize },
    /// The reply's string ended; what follows is the object's close.
    Replied,
    /// Calls (or a JSON-valued reply): read when the answer ends.
    Whole,
}

/// Whether `buf` opens with `{"response": "` (JSON whitespace allowed between the tokens).
enum Open {
    Partial,
    /// The reply's first byte.
    At(usize),
    No,
}

fn opening(buf: &str) -> Open {
    let b = buf.as_bytes();
    let mut i = 0;
    for part in [&b"{"[..], b"\"response\"", b":", b"\""] {
        while b
            .get(i)
            .is_some_and(|c| matches!(c, b' ' | b'\n' | b'\t' | b'\r'))
        {
            i += 1;
        }
        for &c in part {
            match b.get(i) {
                None => return Open::Partial,
                Some(&x) if x != c => return Open::No,
                Some(_) => i += 1,
            }
        }
    }
    Open::At(i)
}

impl ReplyStream {
    /// Takes the next piece of the answer; returns reply text that can be shown now.
    pub(crate) fn push(&mut self, piece: &str) -> String {
        self.buf.push_str(piece);
        if self.state == Reading::Opening {
            match opening(&self.buf) {
                Open::Partial => return String::new(),
                Open::No => self.state = Reading::Whole,
                Open::At(at) => self.state = Reading::Reply { at },
            }
        }
        let Reading::Reply { at } = self.state else {
            return String::new();
        };
        // Up to the string's end or an escape not yet complete. `"` and `\` are ASCII, so
        // every stop is a character boundary.
        let b = self.buf.as_bytes();
        let mut j = at;
        let mut closed = false;
        while let Some(&c) = b.get(j) {
            match c {
                b'"' => {
                    closed = true;
                    break;
                }
                b'\\' => {
                    let need = match b.get(j + 1) {
                        Some(b'u') => {
                            let high = b
                                .get(j + 2..j + 6)
                                .and_then(|h| std::str::from_utf8(h).ok())
                                .and_then(|h| u16::from_str_radix(h, 16).ok());
                            match high {
                                None if b.len() < j + 6 => break,
                                // A high surrogate and the `\u` of its low one.
                                Some(0xD800..=0xDBFF) if b.len() < j + 8 => break,
                                Some(0xD800..=0xDBFF) if b.get(j + 6..j + 8) == Some(b"\\u") => 12,
                                _ => 6,
                            }
                        }
                        _ => 2,
                    };
                    if b.len() < j + need {
                        break;
                    }
                    j += need;
                }
                _ => j += 1,
            }
        }
        let text = unescape(&self.buf[at..j]);
        self.state = if closed {
            Reading::Replied
        } else {
            Reading::Reply { at: j }
        };
        text
    }

    /// The answer ended: the calls, or what is left of the reply to show.
    pub(crate) fn finish(self) -> Answer {
        match self.state {
            Reading::Opening | Reading::Whole => answer(&self.buf),
            // Everything decodable was shown; an escape cut off by the length limit is dropped.
            Reading::Reply { .. } | Reading::Replied => Answer::Content(String::new()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(extra: Value) -> SamplingFields {
        serde_json::from_value(extra).unwrap_or_else(|e| unreachable!("{e}"))
    }

    fn weather() -> Value {
        json!({"type": "function", "function": {
            "name": "get_weather", "description": "Weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"]}}})
    }

    fn tools(extra: Value) -> Result<Option<Tools>, ApiError> {
        parse(&fields(extra), None, &OutputFormat::Text)
    }

    fn param(r: Result<Option<Tools>, ApiError>) -> Option<String> {
        r.err().and_then(|e| e.body.param)
    }

    fn ok(extra: Value) -> Tools {
        tools(extra)
            .unwrap_or_else(|e| unreachable!("{e}"))
            .unwrap_or_else(|| unreachable!("no tools"))
    }

    #[test]
    fn auto_allows_calls_or_a_reply_and_required_only_calls() {
        let t = ok(json!({"tools": [weather()]}));
        let branches = t.schema["anyOf"].as_array().cloned().unwrap_or_default();
        assert_eq!(branches.len(), 2);
        assert_eq!(branches[0]["required"], json!(["tool_calls"]));
        assert_eq!(
            branches[1]["properties"]["response"],
            json!({"type": "string"})
        );
        let calls = &branches[0]["properties"]["tool_calls"];
        assert_eq!(calls["minItems"], json!(1));
        assert!(calls.get("maxItems").is_none());
        assert_eq!(
            calls["items"]["properties"]["name"],
            json!({"const": "get_weather"})
        );
        assert!(t.prompt.contains(r#""name":"get_weather""#), "{}", t.prompt);
        assert!(t.prompt.contains("\"response\""));
        assert!(json_schema::schema_grammar(&t.schema).is_ok());

        let t = ok(json!({"tools": [weather()], "tool_choice": "required"}));
        assert_eq!(t.schema["required"], json!(["tool_calls"]));
        assert!(!t.prompt.contains("\"response\""));

        let one = parse(
            &fields(json!({"tools": [weather()]})),
            Some(false),
            &OutputFormat::Text,
        );
        let one = one.ok().flatten().map(|t| t.schema).unwrap_or_default();
        assert_eq!(
            one["anyOf"][0]["properties"]["tool_calls"]["maxItems"],
            json!(1)
        );
    }

    #[test]
    fn a_named_function_is_the_only_call() {
        let time = json!({"type": "function", "function": {"name": "get_time"}});
        let t = ok(json!({"tools": [weather(), time],
                          "tool_choice": {"type": "function", "function": {"name": "get_time"}}}));
        let calls = &t.schema["properties"]["tool_calls"];
        assert_eq!(calls["maxItems"], json!(1));
        assert_eq!(
            calls["items"]["properties"]["name"],
            json!({"const": "get_time"})
        );
        // A function without parameters takes an empty object.
        assert_eq!(t.schema["$defs"]["tool1"]["type"], json!("object"));
        assert!(t.prompt.contains("calling `get_time`"));
    }

    #[test]
    fn none_or_no_tools_leave_the_answer_free() {
        assert_eq!(tools(json!({})), Ok(None));
        assert_eq!(tools(json!({"tools": []})), Ok(None));
        assert_eq!(
            tools(json!({"tools": [weather()], "tool_choice": "none"})),
            Ok(None)
        );
        assert_eq!(tools(json!({"tool_choice": "auto"})), Ok(None));
        assert_eq!(tools(json!({"tool_choice": "none"})), Ok(None));
        // With `none` the tools are still checked, but their parameters need not be
        // enforceable: nothing is enforced.
        let loose = json!({"type": "function", "function": {"name": "a", "parameters":
            {"type": "object", "properties": {"n": {"type": "integer", "multipleOf": 2}}}}});
        assert_eq!(
            tools(json!({"tools": [loose], "tool_choice": "none"})),
            Ok(None)
        );
        for (bad, want) in [
            (json!([{"type": "retrieval"}]), "tools[0].type"),
            (json!({"a": 1}), "tools"),
            (json!([weather(), weather()]), "tools[1].function.name"),
        ] {
            assert_eq!(
                param(tools(json!({"tools": bad, "tool_choice": "none"}))).as_deref(),
                Some(want)
            );
        }
    }

    #[test]
    fn references_inside_a_tool_point_into_it() {
        let tool = json!({"type": "function", "function": {"name": "tree", "parameters": {
            "$defs": {"node": {"type": "object", "properties": {
                "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}},
                "tag": {"const": {"$ref": "#/kept-as-data"}}}}},
            "type": "object", "properties": {"root": {"$ref": "#/$defs/node"}}}}});
        let t = ok(json!({"tools": [weather(), tool]}));
        let node = &t.schema["$defs"]["tool1"]["$defs"]["node"];
        assert_eq!(
            node["properties"]["kids"]["items"]["$ref"],
            json!("#/$defs/tool1/$defs/node")
        );
        assert_eq!(
            node["properties"]["tag"]["const"],
            json!({"$ref": "#/kept-as-data"})
        );
        // The references resolve in the whole schema (a wrong one would be refused).
        assert!(json_schema::schema_grammar(&t.schema).is_ok());
    }

    #[test]
    fn only_schema_positions_are_rebased() {
        // A property named `default` (or `const`) is a schema; its reference is moved too.
        let tool = |parameters: Value| json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": parameters}}]});
        let t = ok(tool(json!({"type": "object", "properties": {
            "default": {"$ref": "#"}, "const": {"$ref": "#/$defs/Mode"}},
            "$defs": {"Mode": {"enum": ["a", "b"]}}})));
        let props = &t.schema["$defs"]["tool0"]["properties"];
        assert_eq!(props["default"]["$ref"], json!("#/$defs/tool0"));
        assert_eq!(props["const"]["$ref"], json!("#/$defs/tool0/$defs/Mode"));
        // Arguments are an object: a schema without a type becomes one, another type is refused.
        let t = ok(tool(json!({"properties": {"q": {"type": "string"}}})));
        assert_eq!(t.schema["$defs"]["tool0"]["type"], json!("object"));
        assert_eq!(
            param(tools(tool(json!({"type": "string"})))).as_deref(),
            Some("tools[0].function.parameters")
        );
    }

    #[test]
    fn a_response_format_shapes_the_reply() {
        let schema = json!({"type": "object", "properties": {"city": {"type": "string"}}});
        let format = OutputFormat::JsonSchema {
            name: "r".into(),
            schema: schema.clone(),
            strict: None,
        };
        let t = parse(&fields(json!({"tools": [weather()]})), None, &format)
            .ok()
            .flatten()
            .unwrap_or_else(|| unreachable!());
        assert_eq!(
            t.schema["anyOf"][1]["properties"]["response"],
            json!({"$ref": "#/$defs/response"})
        );
        assert_eq!(t.schema["$defs"]["response"], schema);
        assert!(json_schema::schema_grammar(&t.schema).is_ok());
    }

    #[test]
    fn mistakes_are_named() {
        let f = |name: &str| json!({"type": "function", "function": {"name": name}});
        let many: Vec<Value> = (0..=MAX_TOOLS).map(|i| f(&format!("f{i}"))).collect();
        for (extra, want) in [
            (json!({"tools": {"a": 1}}), "tools"),
            (json!({"tools": many}), "tools"),
            (json!({"tools": [{"type": "retrieval"}]}), "tools[0].type"),
            (
                json!({"tools": [{"type": "function"}]}),
                "tools[0].function",
            ),
            (json!({"tools": [f("has space")]}), "tools[0].function.name"),
            (
                json!({"tools": [f(&"x".repeat(65))]}),
                "tools[0].function.name",
            ),
            (json!({"tools": [f("a"), f("a")]}), "tools[1].function.name"),
            (
                json!({"tools": [{"type": "function", "function": {"name": "a", "description": 1}}]}),
                "tools[0].function.description",
            ),
            (
                json!({"tools": [{"type": "function", "function": {"name": "a", "parameters":
                    {"type": "object", "properties": {"n": {"type": "integer", "multipleOf": 2}}}}}]}),
                "tools[0].function.parameters",
            ),
            (json!({"tool_choice": "required"}), "tool_choice"),
            (
                json!({"tools": [f("a")], "tool_choice": "sometimes"}),
                "tool_choice",
            ),
            (
                json!({"tools": [f("a")], "tool_choice": {"type": "function", "function": {"name": "b"}}}),
                "tool_choice",
            ),
            (json!({"functions": [{"name": "a"}]}), "functions"),
        ] {
            assert_eq!(
                param(tools(extra.clone())).as_deref(),
                Some(want),
                "{extra}"
            );
        }
    }

    fn msg(v: Value) -> ChatMessage {
        serde_json::from_value(v).unwrap_or_else(|e| unreachable!("{e}"))
    }

    #[test]
    fn calls_and_results_are_written_in_the_answer_shape() {
        let messages = vec![
            msg(json!({"role": "user", "content": "Weather in Paris and Rome?"})),
            msg(json!({"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
                {"id": "call_2", "type": "function",
                 "function": {"name": "get_weather", "arguments": "not json"}}]})),
            msg(json!({"role": "tool", "tool_call_id": "call_1", "content": "sunny"})),
            msg(json!({"role": "tool", "tool_call_id": "call_2", "content": "rain"})),
            msg(json!({"role": "assistant", "content": "Sunny in Paris, rain in Rome."})),
        ];
        let texts = messages
            .iter()
            .map(|m| m.text().unwrap_or_default())
            .collect();
        let out = conversation(&messages, texts).unwrap_or_else(|e| unreachable!("{e}"));
        let roles: Vec<&str> = out.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["user", "assistant", "user", "assistant"]);
        assert_eq!(
            out[1].content,
            r#"{"tool_calls":[{"name":"get_weather","arguments":{"city":"Paris"}},{"name":"get_weather","arguments":"not json"}]}"#
        );
        assert_eq!(
            out[2].content,
            "{\"tool_response\":{\"name\":\"get_weather\",\"content\":\"sunny\"}}\n\
             {\"tool_response\":{\"name\":\"get_weather\",\"content\":\"rain\"}}"
        );
        assert_eq!(out[3].content, "Sunny in Paris, rain in Rome.");

        // Text written with the calls is kept before them.
        let said = vec![msg(json!({"role": "assistant", "content": "Let me look.",
            "tool_calls": [{"id": "call_1", "type": "function",
                            "function": {"name": "get_weather", "arguments": "{}"}}]}))];
        let out = conversation(&said, vec!["Let me look.".into()])
            .unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(
            out[0].content,
            "Let me look.\n{\"tool_calls\":[{\"name\":\"get_weather\",\"arguments\":{}}]}"
        );
    }

    #[test]
    fn the_tools_are_told_in_the_system_message() {
        let t = ok(json!({"tools": [weather()]}));
        let m = |role: &str, content: &str| Message {
            role: role.into(),
            content: content.into(),
        };
        let mut with_system = vec![m("system", "Be brief."), m("user", "hi")];
        t.instruct(&mut with_system);
        assert_eq!(with_system.len(), 2);
        assert_eq!(with_system[0].content, format!("Be brief.\n\n{}", t.prompt));
        let mut without = vec![m("user", "hi")];
        t.instruct(&mut without);
        assert_eq!((without[0].role.as_str(), without.len()), ("system", 2));
    }

    #[test]
    fn answers_are_read_back() {
        let f = |args: &str| ("f".to_owned(), args.to_owned());
        assert_eq!(
            answer(r#"{"tool_calls": [{"name": "f", "arguments": {"b": 1, "a": [true]}}]}"#),
            Answer::Calls {
                calls: vec![f(r#"{"b":1,"a":[true]}"#)],
                complete: true
            }
        );
        // Cut short after two whole calls: those two, marked incomplete.
        assert_eq!(
            answer(
                r#"{"tool_calls": [{"name": "f", "arguments": {"a": 1}} , {"name": "f", "arguments": {}}, {"name": "f", "argu"#
            ),
            Answer::Calls {
                calls: vec![f(r#"{"a":1}"#), f("{}")],
                complete: false
            }
        );
        assert_eq!(
            answer(r#" {"response": "hi \"you\""} "#),
            Answer::Content("hi \"you\"".into())
        );
        assert_eq!(
            answer(r#"{"response": {"city": "Paris"}}"#),
            Answer::Content(r#"{"city":"Paris"}"#.into())
        );
        for cut in [
            r#"{"tool_calls": [{"name": "f", "argu"#,
            "",
            "{}",
            r#"{"tool_calls":[1]}"#,
        ] {
            assert_eq!(answer(cut), Answer::Raw(cut.into()));
        }
    }

    /// Feeds `text` in pieces of `size` bytes (at character boundaries); returns what was shown
    /// along the way and the final reading.
    fn stream(text: &str, size: usize) -> (String, Answer) {
        let mut r = ReplyStream::default();
        let mut shown = String::new();
        let mut piece = String::new();
        for c in text.chars() {
            piece.push(c);
            if piece.len() >= size {
                shown.push_str(&r.push(&piece));
                piece.clear();
            }
        }
        shown.push_str(&r.push(&piece));
        (shown, r.finish())
    }

    #[test]
    fn a_reply_is_shown_as_it_comes_and_equals_the_whole_reading() {
        let reply = "Line one\nsaid \"hi\" \\ caf\u{e9} \u{1F600} tab\there";
        let text = format!(
            "{{ \"response\" :\n {}  }}",
            serde_json::to_string(reply).unwrap_or_default()
        );
        // The same with \u escapes, a surrogate pair among them.
        let escaped = r#"{"response": "caf\u00e9 \ud83d\ude00 \/"}"#;
        for size in [1, 2, 3, 5, 7, 64] {
            let (shown, last) = stream(&text, size);
            assert_eq!(
                (shown.as_str(), &last),
                (reply, &Answer::Content(String::new()))
            );
            let (shown, _) = stream(escaped, size);
            assert_eq!(shown, "caf\u{e9} \u{1F600} /", "size {size}");
        }
        // Nothing is shown before the answer is known to be a reply.
        let mut r = ReplyStream::default();
        assert_eq!(r.push("{\"respo"), "");
        assert_eq!(r.push("nse\": \"ok"), "ok");
    }

    #[test]
    fn calls_and_json_replies_are_read_when_the_answer_ends() {
        let calls = r#"{"tool_calls": [{"name": "f", "arguments": {"q": "\"response\""}}]}"#;
        for size in [1, 4, 100] {
            let (shown, last) = stream(calls, size);
            assert_eq!(shown, "");
            assert_eq!(last, answer(calls));
            let (shown, last) = stream(r#"{"response": {"a": 1}}"#, size);
            assert_eq!(
                (shown.as_str(), last),
                ("", Answer::Content(r#"{"a":1}"#.into()))
            );
        }
        // Read whole, a reply cut short is what its stream showed, not the raw JSON.
        assert_eq!(
            answer(r#"{"response": "The weath"#),
            Answer::Content("The weath".into())
        );
        // A lone surrogate (the grammar allows it; JSON parsers refuse it) neither swallows
        // the closing quote nor makes the two readings differ.
        let lone = r#"{"response": "\ud800abcde\"x\udc00"}"#;
        for size in [1, 3, 100] {
            let (shown, _) = stream(lone, size);
            assert_eq!(shown, "\u{fffd}abcde\"x\u{fffd}", "size {size}");
            assert_eq!(answer(lone), Answer::Content(shown), "size {size}");
        }
        // Cut off inside the reply: what was decodable was shown, the rest is dropped.
        let (shown, last) = stream(r#"{"response": "abc\u00"#, 3);
        assert_eq!(
            (shown.as_str(), last),
            ("abc", Answer::Content(String::new()))
        );
        let (shown, last) = stream(r#"{"tool"#, 3);
        assert_eq!(
            (shown.as_str(), last),
            ("", Answer::Raw(r#"{"tool"#.into()))
        );
    }
}
