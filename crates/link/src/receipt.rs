//! Signed usage receipts: after each request the node signs what it served as EIP-712 typed
//! data, so Nexus (and later a dispute on-chain) can verify who claims which tokens.
//!
//! Domain `EIP712Domain(string name,string version,uint256 chainId)` = ("Lattice", "1", chain);
//! struct `Usage(string requestId,address user,string model,uint64 promptTokens,
//! uint64 completionTokens,uint256 priceIn,uint256 priceOut,uint64 timestamp)`.

use serde::{Deserialize, Serialize};

use crate::identity::{IdentityError, NodeKey, keccak, recover_digest};

const DOMAIN_TYPE: &str = "EIP712Domain(string name,string version,uint256 chainId)";
const USAGE_TYPE: &str = "Usage(string requestId,address user,string model,uint64 promptTokens,uint64 completionTokens,uint256 priceIn,uint256 priceOut,uint64 timestamp)";

/// The address used when a request has no paying user (Nexus's own health probes).
pub const NO_USER: &str = "0x0000000000000000000000000000000000000000";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageReceipt {
    pub request_id: String,
    /// The paying user's address.
    pub user: String,
    pub model: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Units per 1M tokens the node charged at.
    pub price_in: u64,
    pub price_out: u64,
    /// Unix seconds.
    pub timestamp: u64,
    pub chain_id: u64,
    /// 65-byte signature (r‖s‖v), hex.
    pub signature: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReceiptError {
    #[error("receipt address field {0:?} is not a 20-byte hex address")]
    BadAddress(String),
    #[error("receipt signature is invalid: {0}")]
    BadSignature(String),
    #[error("receipt is signed by {signer}, not by the node {node}")]
    WrongSigner { signer: String, node: String },
}

fn word_u64(v: u64) -> [u8; 32] {
    let mut w = [0u8; 32];
    w[24..].copy_from_slice(&v.to_be_bytes());
    w
}

fn word_address(a: &str) -> Result<[u8; 32], ReceiptError> {
    let hexpart = a
        .strip_prefix("0x")
        .ok_or_else(|| ReceiptError::BadAddress(a.into()))?;
    let bytes = hex::decode(hexpart).map_err(|_| ReceiptError::BadAddress(a.into()))?;
    if bytes.len() != 20 {
        return Err(ReceiptError::BadAddress(a.into()));
    }
    let mut w = [0u8; 32];
    w[12..].copy_from_slice(&bytes);
    Ok(w)
}

fn domain_separator(chain_id: u64) -> [u8; 32] {
    let mut enc = Vec::with_capacity(128);
    enc.extend_from_slice(&keccak(DOMAIN_TYPE.as_bytes()));
    enc.extend_from_slice(&keccak(b"Lattice"));
    enc.extend_from_slice(&keccak(b"1"));
    enc.extend_from_slice(&word_u64(chain_id));
    keccak(&enc)
}

impl UsageReceipt {
    /// The EIP-712 digest that is signed.
    pub fn digest(&self) -> Result<[u8; 32], ReceiptError> {
        let mut enc = Vec::with_capacity(9 * 32);
        enc.extend_from_slice(&keccak(USAGE_TYPE.as_bytes()));
        enc.extend_from_slice(&keccak(self.request_id.as_bytes()));
        enc.extend_from_slice(&word_address(&self.user)?);
        enc.extend_from_slice(&keccak(self.model.as_bytes()));
        enc.extend_from_slice(&word_u64(self.prompt_tokens));
        enc.extend_from_slice(&word_u64(self.completion_tokens));
        enc.extend_from_slice(&word_u64(self.price_in));
        enc.extend_from_slice(&word_u64(self.price_out));
        enc.extend_from_slice(&word_u64(self.timestamp));
        let mut msg = Vec::with_capacity(66);
        msg.extend_from_slice(b"\x19\x01");
        msg.extend_from_slice(&domain_separator(self.chain_id));
        msg.extend_from_slice(&keccak(&enc));
        Ok(keccak(&msg))
    }

    /// Fills in the signature with the node's key.
    pub fn sign(mut self, key: &NodeKey) -> Result<Self, ReceiptError> {
        let d = self.digest()?;
        self.signature = key
            .sign_digest(&d)
            .map_err(|e: IdentityError| ReceiptError::BadSignature(e.to_string()))?;
        Ok(self)
    }

    /// Checks that `node` signed exactly these fields.
    pub fn verify(&self, node: &str) -> Result<(), ReceiptError> {
        let signer = recover_digest(&self.digest()?, &self.signature)
            .map_err(|e| ReceiptError::BadSignature(e.to_string()))?;
        if !signer.eq_ignore_ascii_case(node) {
            return Err(ReceiptError::WrongSigner {
                signer,
                node: node.to_owned(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receipt() -> UsageReceipt {
        UsageReceipt {
            request_id: "req-1".into(),
            user: "0x7e5f4552091a69125d5dfcb7b8c2659029395bdf".into(),
            model: "smollm2-135m".into(),
            prompt_tokens: 12,
            completion_tokens: 34,
            price_in: 1_000,
            price_out: 2_000,
            timestamp: 1_795_000_000,
            chain_id: 31337,
            signature: String::new(),
        }
    }

    #[test]
    fn type_hashes_match_the_solidity_strings() {
        // The well-known type hash of the four-field domain checks our Keccak-256.
        assert_eq!(
            hex::encode(keccak(
                b"EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
            )),
            "8b73c3c69bb8fe3d512ecc4cf759cc79239f7b179b0ffacaa9a75d522b39400f"
        );
        assert_ne!(domain_separator(1), domain_separator(31337));
    }

    #[test]
    fn signed_receipts_verify_and_tampering_is_caught() {
        let key = NodeKey::generate().unwrap();
        let r = receipt().sign(&key).unwrap();
        assert_eq!(r.verify(&key.address()), Ok(()));
        assert_eq!(
            r.verify(&key.address().to_uppercase().replace("0X", "0x")),
            Ok(())
        );
        let mut more = r.clone();
        more.completion_tokens += 1;
        assert!(matches!(
            more.verify(&key.address()),
            Err(ReceiptError::WrongSigner { .. })
        ));
        let mut chain = r.clone();
        chain.chain_id = 1;
        assert!(chain.verify(&key.address()).is_err());
        let other = NodeKey::generate().unwrap();
        assert!(matches!(
            r.verify(&other.address()),
            Err(ReceiptError::WrongSigner { .. })
        ));
        let mut garbage = r.clone();
        garbage.signature = "zz".into();
        assert!(matches!(
            garbage.verify(&key.address()),
            Err(ReceiptError::BadSignature(_))
        ));
        let mut bad_user = receipt();
        bad_user.user = "bob".into();
        assert!(matches!(
            bad_user.sign(&key),
            Err(ReceiptError::BadAddress(_))
        ));
    }
}
