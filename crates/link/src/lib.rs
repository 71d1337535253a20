//! The persistent link a node dials to Nexus (WebSocket, JSON text frames): the frames, their
//! size bound, and the node's secp256k1 identity whose EVM address names it on the network.

mod frames;
mod identity;
mod receipt;
mod writer;

pub use frames::{
    FrameError, LinkEvent, MAX_FRAME_BYTES, MAX_FRAME_EVENTS, ModelAd, NexusFrame, NodeFrame,
    NodeKind, PROTOCOL_VERSION, Price, READ_BUFFER_BYTES, decode, encode, legacy_hello_version,
    legacy_rejected_frame, legacy_rejection,
};
pub use identity::{IdentityError, NodeKey, challenge_message, recover_address, write_private};
pub use receipt::{
    BatchedReceipt, ChargeColumns, MAX_BATCH_RECEIPTS, NO_USER, ReceiptError, ReceiptInBatch,
    UsageReceipt, merkle_proofs, merkle_root, sign_batch, verify_batch, verify_proof,
};

pub use writer::write_frames;

/// Path on Nexus where nodes open their link.
pub const LINK_PATH: &str = "/lattice/v1/link";
