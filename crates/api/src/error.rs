//! OpenAI's error envelope `{"error":{"message","type","param","code"}}` with the HTTP status
//! that goes with it; every failure a client can see is one of these.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorEnvelope {
    pub error: ErrorBody,
}

/// An error ready to be sent to a client: status plus envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub body: ErrorBody,
}

impl ApiError {
    pub fn new(status: u16, kind: &str, code: Option<&str>, message: impl Into<String>) -> Self {
        Self {
            status,
            body: ErrorBody {
                message: message.into(),
                kind: kind.to_owned(),
                param: None,
                code: code.map(str::to_owned),
            },
        }
    }

    pub fn with_param(mut self, param: &str) -> Self {
        self.body.param = Some(param.to_owned());
        self
    }

    /// 400: the request is malformed or a field is out of range.
    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(400, "invalid_request_error", None, message)
    }

    pub fn invalid_param(param: &str, message: impl Into<String>) -> Self {
        Self::new(400, "invalid_request_error", Some("invalid_value"), message).with_param(param)
    }

    pub fn model_not_found(model: &str) -> Self {
        Self::new(
            404,
            "invalid_request_error",
            Some("model_not_found"),
            format!("The model `{model}` does not exist or is not served here."),
        )
        .with_param("model")
    }

    pub fn context_length_exceeded(prompt_tokens: u32, max_tokens: u32, limit: u32) -> Self {
        Self::new(
            400,
            "invalid_request_error",
            Some("context_length_exceeded"),
            format!(
                "This model's maximum context length is {limit} tokens. However, you requested \
                 {} tokens ({prompt_tokens} in the prompt, {max_tokens} for the completion). \
                 Please reduce the length of the messages or the completion.",
                u64::from(prompt_tokens) + u64::from(max_tokens)
            ),
        )
        .with_param("messages")
    }

    pub fn payload_too_large(limit_bytes: usize) -> Self {
        Self::new(
            413,
            "invalid_request_error",
            Some("request_too_large"),
            format!("The request body exceeds the limit of {limit_bytes} bytes."),
        )
    }

    pub fn not_found(path: &str) -> Self {
        Self::new(
            404,
            "invalid_request_error",
            Some("not_found"),
            format!("No route for {path}."),
        )
    }

    pub fn method_not_allowed() -> Self {
        Self::new(
            405,
            "invalid_request_error",
            Some("method_not_allowed"),
            "Method not allowed.",
        )
    }

    pub fn overloaded(message: impl Into<String>) -> Self {
        Self::new(503, "server_error", Some("overloaded"), message)
    }

    pub fn rate_limited(message: impl Into<String>) -> Self {
        Self::new(
            429,
            "rate_limit_error",
            Some("rate_limit_exceeded"),
            message,
        )
    }

    /// 402: the account's credit does not cover the request.
    pub fn payment_required(message: impl Into<String>) -> Self {
        Self::new(
            402,
            "insufficient_quota",
            Some("insufficient_credits"),
            message,
        )
    }

    /// 401, in OpenAI's shape.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(
            401,
            "invalid_request_error",
            Some("invalid_api_key"),
            message,
        )
    }

    pub fn upstream(message: impl Into<String>) -> Self {
        Self::new(502, "server_error", Some("upstream_error"), message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "server_error", None, message)
    }

    pub fn envelope(&self) -> ErrorEnvelope {
        ErrorEnvelope {
            error: self.body.clone(),
        }
    }

    pub fn to_json(&self) -> String {
        // Serializing plain strings cannot fail; fall back to a fixed body rather than panic.
        serde_json::to_string(&self.envelope()).unwrap_or_else(|_| {
            r#"{"error":{"message":"internal error","type":"server_error","param":null,"code":null}}"#
                .to_owned()
        })
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status, self.body.kind, self.body.message
        )
    }
}

impl std::error::Error for ApiError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_has_openai_shape() {
        let e = ApiError::model_not_found("gpt-9");
        let v: serde_json::Value = serde_json::from_str(&e.to_json()).unwrap_or_default();
        assert_eq!(e.status, 404);
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], "model_not_found");
        assert_eq!(v["error"]["param"], "model");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap_or("")
                .contains("gpt-9")
        );
    }

    #[test]
    fn null_fields_are_present() {
        let e = ApiError::internal("boom");
        let v: serde_json::Value = serde_json::from_str(&e.to_json()).unwrap_or_default();
        assert!(v["error"].get("param").is_some_and(|p| p.is_null()));
        assert!(v["error"].get("code").is_some_and(|p| p.is_null()));
    }
}
