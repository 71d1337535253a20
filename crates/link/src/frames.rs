//! Link frames. The node speaks first (`Hello`), proves its key on Nexus's `Challenge`, then
//! registers; afterwards requests, token events and heartbeats flow, multiplexed by stream id.

use lattice_engine::{EngineError, Event, GenerateRequest};
use serde::{Deserialize, Serialize};

/// 2: paid requests' receipts are signed in batches ([`NodeFrame::Receipts`]).
/// 3: frames are externally tagged (`{"events":{…}}`, not `{"type":"events",…}`), so they decode
/// without buffering, and a stream's events that are ready together travel in one frame.
/// 4: requests may carry penalties, logit biases and a JSON `response_format` (a node of
/// version 3 would silently answer without them).
/// 5: requests may ask for log probabilities, which come back as `logprobs` events (a node of
/// version 4 would silently leave them out).
pub const PROTOCOL_VERSION: u32 = 5;

/// Most events in one [`NodeFrame::Events`].
pub const MAX_FRAME_EVENTS: usize = 64;

/// Largest frame either side accepts: a request carries a whole prompt (bodies are ≤ 4 MiB).
pub const MAX_FRAME_BYTES: usize = 8 << 20;

/// Read buffer of each side's WebSocket. tungstenite allocates it up front for every link and
/// zero-fills its free part before every read; its default of 128 KiB would hold 128 MB for a
/// thousand linked nodes and `memset` 128 KiB per read (1.9 % of Nexus's CPU at 1000 req/s,
/// when a read carries one request's frames). Frames are mostly a few hundred bytes; a large
/// one is read in several pieces.
pub const READ_BUFFER_BYTES: usize = 16 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeKind {
    Llm,
    Knowledge,
    Agent,
}

/// A model a node offers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelAd {
    pub id: String,
    pub context_length: u32,
    /// e.g. `Q4_1`, when known.
    #[serde(default)]
    pub quantization: Option<String>,
    /// The node reports log probabilities for it (an embedded engine does, an upstream
    /// backend does not); Nexus routes requests that ask for them only to such nodes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub logprobs: bool,
    /// An embedding model: the length of its vectors (it serves embeddings only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dimensions: Option<u32>,
}

/// Smallest LAI units per 1M tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Price {
    pub input_per_mtok: u64,
    pub output_per_mtok: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeFrame {
    Hello {
        version: u32,
        address: String,
    },
    Register {
        /// Signature of [`crate::challenge_message`] with the node's key (65 bytes, hex).
        signature: String,
        kind: NodeKind,
        models: Vec<ModelAd>,
        price: Price,
        slots: u32,
        /// Measured single-stream decode speed, tokens/s.
        decode_tps: f64,
        #[serde(default)]
        label: Option<String>,
        /// Pre-registered node token (`lnt_…`) binding this node to its operator's account.
        #[serde(default)]
        token: Option<String>,
    },
    Heartbeat {
        queued: u32,
        busy: u32,
        slots: u32,
        /// Tokens of the answers finished since the previous heartbeat, per second.
        #[serde(default)]
        tokens_per_s: f64,
    },
    /// Events of a request's stream, in order: 1 to [`MAX_FRAME_EVENTS`] of them.
    Events {
        stream: u64,
        events: Vec<LinkEvent>,
    },
    /// The node's signature over the receipts it sent unsigned for these requests, in this
    /// order (at most [`crate::MAX_BATCH_RECEIPTS`]): see [`crate::sign_batch`].
    Receipts {
        requests: Vec<String>,
        signature: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkEvent {
    Engine(Event),
    Error(EngineError),
    /// Sent just before a successful stream's `Done`: the node's usage. Signed alone for
    /// Nexus's probes; for paid requests unsigned, and signed by a later [`NodeFrame::Receipts`].
    Receipt(crate::UsageReceipt),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NexusFrame {
    Challenge {
        nonce: String,
    },
    Registered {
        node_id: u64,
        /// Chain whose id receipts are signed for (EIP-712 domain).
        #[serde(default = "default_chain_id")]
        chain_id: u64,
    },
    Rejected {
        reason: String,
    },
    Request {
        stream: u64,
        request: Box<GenerateRequest>,
    },
    Cancel {
        stream: u64,
    },
}

fn default_chain_id() -> u64 {
    31337
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("malformed frame: {0}")]
    Malformed(String),
}

pub fn encode<T: Serialize>(frame: &T) -> Result<String, FrameError> {
    let s = serde_json::to_string(frame).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if s.len() > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(s.len()));
    }
    Ok(s)
}

pub fn decode<T: for<'de> Deserialize<'de>>(text: &str) -> Result<T, FrameError> {
    if text.len() > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(text.len()));
    }
    serde_json::from_str(text).map_err(|e| FrameError::Malformed(e.to_string()))
}

/// Frames of protocol versions 1 and 2 were internally tagged (`{"type":"hello",…}`). These
/// read the two that matter across versions, so each side can say why it refuses the other.
#[derive(Deserialize)]
struct Legacy {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    version: Option<u32>,
    #[serde(default)]
    reason: Option<String>,
}

fn legacy(text: &str) -> Option<Legacy> {
    if text.len() > MAX_FRAME_BYTES {
        return None;
    }
    serde_json::from_str(text).ok()
}

/// The version of a pre-3 node's `hello`, if `text` is one.
pub fn legacy_hello_version(text: &str) -> Option<u32> {
    legacy(text)
        .filter(|l| l.kind == "hello")
        .and_then(|l| l.version)
}

/// The reason of a pre-3 Nexus's `rejected`, if `text` is one.
pub fn legacy_rejection(text: &str) -> Option<String> {
    legacy(text)
        .filter(|l| l.kind == "rejected")
        .and_then(|l| l.reason)
}

/// A `rejected` frame as a pre-3 node reads it.
pub fn legacy_rejected_frame(reason: &str) -> String {
    serde_json::json!({"type": "rejected", "reason": reason}).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use lattice_engine::{FinishReason, Preference, Prompt, SamplingParams, Usage};

    #[test]
    fn frames_round_trip() {
        let req = NexusFrame::Request {
            stream: 7,
            request: Box::new(GenerateRequest {
                request_id: "r".into(),
                model: "m".into(),
                prompt: Prompt::Text("hi".into()),
                params: SamplingParams::default(),
                preference: Preference::Cost,
                user: None,
                payer: None,
                conversation: None,
                whole: false,
            }),
        };
        let back: NexusFrame =
            decode(&encode(&req).unwrap_or_default()).unwrap_or(NexusFrame::Cancel { stream: 0 });
        assert_eq!(back, req);
        let done = NodeFrame::Events {
            stream: 7,
            events: vec![
                LinkEvent::Engine(Event::Delta("a".into())),
                LinkEvent::Engine(Event::Done {
                    finish_reason: FinishReason::Stop,
                    usage: Usage::new(1, 2),
                }),
            ],
        };
        let text = encode(&done).unwrap_or_default();
        assert!(text.starts_with(r#"{"events":{"stream":7,"#), "{text}");
        let back: NodeFrame = decode(&text).unwrap_or(NodeFrame::Heartbeat {
            queued: 0,
            busy: 0,
            slots: 0,
            tokens_per_s: 0.0,
        });
        assert_eq!(back, done);
    }

    #[test]
    fn older_versions_are_recognised() {
        let old_hello = r#"{"type":"hello","version":2,"address":"0xab"}"#;
        assert!(decode::<NodeFrame>(old_hello).is_err());
        assert_eq!(legacy_hello_version(old_hello), Some(2));
        let hello = encode(&NodeFrame::Hello {
            version: PROTOCOL_VERSION,
            address: "0xab".into(),
        })
        .unwrap_or_default();
        assert_eq!(legacy_hello_version(&hello), None);
        let refusal = legacy_rejected_frame("too old");
        assert_eq!(legacy_rejection(&refusal).as_deref(), Some("too old"));
        assert_eq!(legacy_hello_version(&refusal), None);
        assert_eq!(legacy_rejection(old_hello), None);
    }

    #[test]
    fn malformed_and_oversized_frames_are_errors() {
        assert!(matches!(
            decode::<NodeFrame>("{\"nope\":{}}"),
            Err(FrameError::Malformed(_))
        ));
        assert!(matches!(
            decode::<NodeFrame>("not json"),
            Err(FrameError::Malformed(_))
        ));
        let huge = "x".repeat(MAX_FRAME_BYTES + 1);
        assert!(matches!(
            decode::<NodeFrame>(&huge),
            Err(FrameError::TooLarge(_))
        ));
    }
}
