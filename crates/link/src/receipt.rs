//! Signed usage receipts: after each request the node signs what it served as EIP-712 typed
//! data, so Nexus (and later a dispute on-chain) can verify who claims which tokens.
//!
//! Domain `EIP712Domain(string name,string version,uint256 chainId)` = ("Lattice", "1", chain);
//! struct `Usage(string requestId,address user,string model,uint64 promptTokens,
//! uint64 completionTokens,uint256 priceIn,uint256 priceOut,uint64 timestamp)`.
//!
//! Paid requests are signed in batches: the leaves are the requests' `Usage` struct hashes, the
//! node signs `UsageBatch(bytes32 root,uint64 count)` over their Merkle root (pairs hashed
//! sorted, an odd node carried up: what OpenZeppelin's `MerkleProof.verify` checks), and one
//! receipt's evidence is its fields, its proof and the batch signature. One signature and one
//! recovery per batch instead of per request.

use serde::{Deserialize, Serialize};

use crate::identity::{IdentityError, NodeKey, keccak, recover_digest};

const DOMAIN_TYPE: &str = "EIP712Domain(string name,string version,uint256 chainId)";
const USAGE_TYPE: &str = "Usage(string requestId,address user,string model,uint64 promptTokens,uint64 completionTokens,uint256 priceIn,uint256 priceOut,uint64 timestamp)";
/// `keccak(USAGE_TYPE)`, hashed once: every receipt's leaf starts with it.
static USAGE_TYPE_HASH: std::sync::LazyLock<[u8; 32]> =
    std::sync::LazyLock::new(|| keccak(USAGE_TYPE.as_bytes()));
const BATCH_TYPE: &str = "UsageBatch(bytes32 root,uint64 count)";

/// Most receipts one batch covers.
pub const MAX_BATCH_RECEIPTS: usize = 256;

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

/// `keccak(model)`. A node serves one or a few models, so each thread keeps the last model's
/// hash: one Keccak permutation (~0.35 µs here) of the six a receipt's leaf costs, on the node
/// and again on Nexus.
fn model_hash(model: &str) -> [u8; 32] {
    thread_local! {
        static LAST: std::cell::RefCell<Option<(Box<str>, [u8; 32])>> =
            const { std::cell::RefCell::new(None) };
    }
    LAST.with_borrow_mut(|last| match last {
        Some((m, h)) if **m == *model => *h,
        _ => {
            let h = keccak(model.as_bytes());
            *last = Some((model.into(), h));
            h
        }
    })
}

fn domain_separator(chain_id: u64) -> [u8; 32] {
    let mut enc = Vec::with_capacity(128);
    enc.extend_from_slice(&keccak(DOMAIN_TYPE.as_bytes()));
    enc.extend_from_slice(&keccak(b"Lattice"));
    enc.extend_from_slice(&keccak(b"1"));
    enc.extend_from_slice(&word_u64(chain_id));
    keccak(&enc)
}

fn typed_digest(chain_id: u64, struct_hash: &[u8; 32]) -> [u8; 32] {
    let mut msg = Vec::with_capacity(66);
    msg.extend_from_slice(b"\x19\x01");
    msg.extend_from_slice(&domain_separator(chain_id));
    msg.extend_from_slice(struct_hash);
    keccak(&msg)
}

impl UsageReceipt {
    /// The EIP-712 digest that is signed when the receipt is signed alone.
    pub fn digest(&self) -> Result<[u8; 32], ReceiptError> {
        Ok(typed_digest(self.chain_id, &self.struct_hash()?))
    }

    /// `hashStruct(Usage)`: the receipt's leaf in a batch.
    pub fn struct_hash(&self) -> Result<[u8; 32], ReceiptError> {
        let mut enc = Vec::with_capacity(9 * 32);
        enc.extend_from_slice(&*USAGE_TYPE_HASH);
        enc.extend_from_slice(&keccak(self.request_id.as_bytes()));
        enc.extend_from_slice(&word_address(&self.user)?);
        enc.extend_from_slice(&model_hash(&self.model));
        enc.extend_from_slice(&word_u64(self.prompt_tokens));
        enc.extend_from_slice(&word_u64(self.completion_tokens));
        enc.extend_from_slice(&word_u64(self.price_in));
        enc.extend_from_slice(&word_u64(self.price_out));
        enc.extend_from_slice(&word_u64(self.timestamp));
        Ok(keccak(&enc))
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

fn hash_pair(a: &[u8; 32], b: &[u8; 32]) -> [u8; 32] {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    let mut buf = [0u8; 64];
    buf[..32].copy_from_slice(lo);
    buf[32..].copy_from_slice(hi);
    keccak(&buf)
}

/// The tree's levels, leaves first: pairs are hashed sorted, an odd node is carried up.
fn levels(leaves: &[[u8; 32]]) -> Vec<Vec<[u8; 32]>> {
    let mut levels = vec![leaves.to_vec()];
    while let Some(level) = levels.last().filter(|l| l.len() > 1) {
        let next = level
            .chunks(2)
            .map(|p| match p {
                [a, b] => hash_pair(a, b),
                [a] => *a,
                _ => [0; 32],
            })
            .collect();
        levels.push(next);
    }
    levels
}

/// The Merkle root of `leaves` (a lone leaf is its own root; none gives zero).
pub fn merkle_root(leaves: &[[u8; 32]]) -> [u8; 32] {
    levels(leaves)
        .last()
        .and_then(|l| l.first().copied())
        .unwrap_or([0; 32])
}

/// Every leaf's proof (the sibling hashes up to the root), from one pass over the tree.
pub fn merkle_proofs(leaves: &[[u8; 32]]) -> Vec<Vec<[u8; 32]>> {
    let levels = levels(leaves);
    let inner = &levels[..levels.len().saturating_sub(1)];
    (0..leaves.len())
        .map(|mut i| {
            let mut proof = Vec::with_capacity(inner.len());
            for level in inner {
                if let Some(s) = level.get(i ^ 1) {
                    proof.push(*s);
                }
                i /= 2;
            }
            proof
        })
        .collect()
}

/// Whether `proof` leads from `leaf` to `root`.
pub fn verify_proof(leaf: &[u8; 32], proof: &[[u8; 32]], root: &[u8; 32]) -> bool {
    proof.iter().fold(*leaf, |acc, p| hash_pair(&acc, p)) == *root
}

/// The EIP-712 digest a node signs for a batch of `count` receipts with Merkle root `root`.
pub(crate) fn batch_digest(chain_id: u64, root: &[u8; 32], count: u64) -> [u8; 32] {
    let mut enc = Vec::with_capacity(96);
    enc.extend_from_slice(&keccak(BATCH_TYPE.as_bytes()));
    enc.extend_from_slice(root);
    enc.extend_from_slice(&word_u64(count));
    typed_digest(chain_id, &keccak(&enc))
}

/// Signs a batch of receipt leaves (in the order the batch frame lists them).
pub fn sign_batch(
    key: &NodeKey,
    chain_id: u64,
    leaves: &[[u8; 32]],
) -> Result<String, ReceiptError> {
    let count = u64::try_from(leaves.len()).unwrap_or(u64::MAX);
    key.sign_digest(&batch_digest(chain_id, &merkle_root(leaves), count))
        .map_err(|e: IdentityError| ReceiptError::BadSignature(e.to_string()))
}

/// Checks that `node` signed this batch of leaves; returns its root.
pub fn verify_batch(
    node: &str,
    chain_id: u64,
    leaves: &[[u8; 32]],
    signature: &str,
) -> Result<[u8; 32], ReceiptError> {
    let root = merkle_root(leaves);
    let count = u64::try_from(leaves.len()).unwrap_or(u64::MAX);
    let signer = recover_digest(&batch_digest(chain_id, &root, count), signature)
        .map_err(|e| ReceiptError::BadSignature(e.to_string()))?;
    if !signer.eq_ignore_ascii_case(node) {
        return Err(ReceiptError::WrongSigner {
            signer,
            node: node.to_owned(),
        });
    }
    Ok(root)
}

/// What is kept with a charge whose receipt was signed in a batch: enough for anyone to check
/// that the node signed exactly this usage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchedReceipt {
    pub receipt: UsageReceipt,
    /// Merkle root, hex.
    pub root: String,
    pub count: u64,
    /// Sibling hashes from the receipt's leaf to the root, hex.
    pub proof: Vec<String>,
    /// The node's signature of `UsageBatch(root, count)`, hex.
    pub signature: String,
}

/// How a charge stores a receipt signed in a batch: the receipt and its place in the batch,
/// which is stored once for all its receipts (root, signature and leaves); together they make
/// the [`BatchedReceipt`] ([`Self::with_batch`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiptInBatch {
    pub receipt: UsageReceipt,
    /// The batch's Merkle root, hex.
    pub root: String,
    /// The receipt's leaf in the batch (the batch frame's order).
    pub leaf: u64,
}

/// The fields of a charge row that a stored receipt shares (and so need not repeat).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChargeColumns<'a> {
    pub request_id: &'a str,
    pub model: &'a str,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// The compact stored form's version tag.
const COMPACT: &str = "b1";

impl ReceiptInBatch {
    /// The stored form next to a charge row with `columns`: `b1:user:price_in:price_out:
    /// timestamp:chain_id:root:leaf` (~145 bytes instead of ~350 as JSON), the rest of the
    /// receipt being the row's own columns. `None` (store the JSON) when the receipt is signed
    /// alone, differs from the columns, or has a field the form cannot hold.
    pub fn compact(&self, columns: ChargeColumns<'_>) -> Option<String> {
        let r = &self.receipt;
        let shared = ChargeColumns {
            request_id: &r.request_id,
            model: &r.model,
            prompt_tokens: r.prompt_tokens,
            completion_tokens: r.completion_tokens,
        };
        let plain = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_alphanumeric());
        (shared == columns && r.signature.is_empty() && plain(&r.user) && plain(&self.root)).then(
            || {
                format!(
                    "{COMPACT}:{}:{}:{}:{}:{}:{}:{}",
                    r.user, r.price_in, r.price_out, r.timestamp, r.chain_id, self.root, self.leaf
                )
            },
        )
    }

    /// Reads [`Self::compact`]'s form back with the charge row's `columns`; `None` when `text`
    /// is not in that form.
    pub fn from_compact(text: &str, columns: ChargeColumns<'_>) -> Option<Self> {
        let mut f = text.split(':');
        if f.next()? != COMPACT {
            return None;
        }
        let user = f.next()?.to_owned();
        let mut num = || f.next()?.parse::<u64>().ok();
        let (price_in, price_out, timestamp, chain_id) = (num()?, num()?, num()?, num()?);
        let root = f.next()?.to_owned();
        let leaf = f.next()?.parse().ok()?;
        if f.next().is_some() {
            return None;
        }
        Some(Self {
            receipt: UsageReceipt {
                request_id: columns.request_id.to_owned(),
                user,
                model: columns.model.to_owned(),
                prompt_tokens: columns.prompt_tokens,
                completion_tokens: columns.completion_tokens,
                price_in,
                price_out,
                timestamp,
                chain_id,
                signature: String::new(),
            },
            root,
            leaf,
        })
    }

    /// The evidence for this receipt from its batch's `leaves` and `signature`; none when the
    /// leaf is outside the batch.
    pub fn with_batch(self, leaves: &[[u8; 32]], signature: &str) -> Option<BatchedReceipt> {
        let leaf = usize::try_from(self.leaf).ok()?;
        let proof = merkle_proofs(leaves).into_iter().nth(leaf)?;
        Some(BatchedReceipt {
            receipt: self.receipt,
            root: self.root,
            count: u64::try_from(leaves.len()).ok()?,
            proof: proof.iter().map(hex::encode).collect(),
            signature: signature.to_owned(),
        })
    }
}

impl BatchedReceipt {
    /// Checks the proof and the batch signature against `node`.
    pub fn verify(&self, node: &str) -> Result<(), ReceiptError> {
        let bad = |what: &str| ReceiptError::BadSignature(format!("malformed {what}"));
        let word = |h: &str| -> Option<[u8; 32]> {
            hex::decode(h.strip_prefix("0x").unwrap_or(h))
                .ok()?
                .try_into()
                .ok()
        };
        let root = word(&self.root).ok_or_else(|| bad("root"))?;
        let proof = self
            .proof
            .iter()
            .map(|p| word(p))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad("proof"))?;
        if !verify_proof(&self.receipt.struct_hash()?, &proof, &root) {
            return Err(ReceiptError::BadSignature(
                "the receipt is not in the signed batch".into(),
            ));
        }
        let digest = batch_digest(self.receipt.chain_id, &root, self.count);
        let signer = recover_digest(&digest, &self.signature)
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

    fn columns(r: &UsageReceipt) -> ChargeColumns<'_> {
        ChargeColumns {
            request_id: &r.request_id,
            model: &r.model,
            prompt_tokens: r.prompt_tokens,
            completion_tokens: r.completion_tokens,
        }
    }

    /// The compact stored form and the row's columns give back the very receipt (so its leaf,
    /// and the batch's proof, still check); a receipt it cannot hold exactly is not compacted.
    #[test]
    fn compact_stored_receipts_read_back_whole() {
        let key = NodeKey::generate().unwrap();
        let mut r = receipt();
        r.price_in = u64::MAX;
        r.timestamp = 0;
        let stored = ReceiptInBatch {
            receipt: r.clone(),
            root: hex::encode([0xab; 32]),
            leaf: 63,
        };
        let text = stored.compact(columns(&r)).unwrap();
        let json = serde_json::to_string(&stored).unwrap();
        assert!(
            text.len() * 2 < json.len(),
            "{} vs {} bytes",
            text.len(),
            json.len()
        );
        let back = ReceiptInBatch::from_compact(&text, columns(&r)).unwrap();
        assert_eq!(back, stored);
        assert_eq!(back.receipt.struct_hash(), r.struct_hash());
        // Columns that differ from the receipt, a signed receipt, odd text: kept as JSON.
        let mut other = r.clone();
        other.completion_tokens += 1;
        assert_eq!(stored.compact(columns(&other)), None);
        other = r.clone();
        other.model = "gemma3-270m".into();
        assert_eq!(stored.compact(columns(&other)), None);
        let signed = ReceiptInBatch {
            receipt: r.clone().sign(&key).unwrap(),
            ..stored.clone()
        };
        assert_eq!(signed.compact(columns(&r)), None);
        let mut odd = stored.clone();
        odd.receipt.user = "0x7e5f:1".into();
        assert_eq!(odd.compact(columns(&r)), None);
        // Other text is not this form.
        for bad in [
            json.as_str(),
            "",
            "b1",
            "b2:0xab:1:2:3:4:ab:5",
            "b1:0xab:1:2:3:4:ab",
            "b1:0xab:1:2:3:4:ab:5:6",
            "b1:0xab:-1:2:3:4:ab:5",
            "b1:0xab:1:2:3:4:ab:x",
        ] {
            assert_eq!(
                ReceiptInBatch::from_compact(bad, columns(&r)),
                None,
                "{bad:?}"
            );
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

    /// The leaf with the model's hash kept between receipts equals the leaf hashed in full,
    /// whichever model came before (a cache keyed wrongly would reuse another model's hash).
    #[test]
    fn kept_model_hashes_give_the_full_leaf() {
        let full = |r: &UsageReceipt| {
            let mut enc = keccak(USAGE_TYPE.as_bytes()).to_vec();
            enc.extend_from_slice(&keccak(r.request_id.as_bytes()));
            enc.extend_from_slice(&word_address(&r.user).unwrap());
            enc.extend_from_slice(&keccak(r.model.as_bytes()));
            for v in [
                r.prompt_tokens,
                r.completion_tokens,
                r.price_in,
                r.price_out,
                r.timestamp,
            ] {
                enc.extend_from_slice(&word_u64(v));
            }
            keccak(&enc)
        };
        let mut seen = std::collections::HashSet::new();
        for model in [
            "a",
            "smollm2-135m",
            "smollm2-135m",
            "a",
            "",
            "smollm2-135",
            "a",
        ] {
            let r = UsageReceipt {
                model: model.into(),
                ..receipt()
            };
            let leaf = r.struct_hash().unwrap();
            assert_eq!(leaf, full(&r), "model {model:?}");
            seen.insert((model, leaf));
        }
        assert_eq!(seen.len(), 4, "each model its own leaf");
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

    #[test]
    fn batches_verify_and_every_receipt_proves_membership() {
        let key = NodeKey::generate().unwrap();
        for n in [1usize, 2, 3, 5, 8, 13] {
            let receipts: Vec<UsageReceipt> = (0..n)
                .map(|i| UsageReceipt {
                    request_id: format!("req-{i}"),
                    ..receipt()
                })
                .collect();
            let leaves: Vec<[u8; 32]> = receipts.iter().map(|r| r.struct_hash().unwrap()).collect();
            let sig = sign_batch(&key, 31337, &leaves).unwrap();
            let root = verify_batch(&key.address(), 31337, &leaves, &sig).unwrap();
            assert_eq!(root, merkle_root(&leaves));
            let proofs = merkle_proofs(&leaves);
            assert_eq!(proofs.len(), n);
            for (i, r) in receipts.iter().enumerate() {
                assert!(verify_proof(&leaves[i], &proofs[i], &root));
                let b = BatchedReceipt {
                    receipt: r.clone(),
                    root: hex::encode(root),
                    count: n as u64,
                    proof: proofs[i].iter().map(hex::encode).collect(),
                    signature: sig.clone(),
                };
                assert_eq!(b.verify(&key.address()), Ok(()), "n={n} i={i}");
                // Stored as its place in the batch, it comes back as the same evidence.
                let stored = ReceiptInBatch {
                    receipt: r.clone(),
                    root: hex::encode(root),
                    leaf: i as u64,
                };
                assert_eq!(stored.clone().with_batch(&leaves, &sig), Some(b.clone()));
                let outside = ReceiptInBatch {
                    leaf: n as u64,
                    ..stored
                };
                assert_eq!(outside.with_batch(&leaves, &sig), None);
                let mut more = b.clone();
                more.receipt.completion_tokens += 1;
                assert!(more.verify(&key.address()).is_err());
                let mut count = b.clone();
                count.count += 1;
                assert!(count.verify(&key.address()).is_err());
            }
            // Another order, another chain, another signer, a leaf left out: refused.
            if n > 1 {
                let mut swapped = leaves.clone();
                swapped.swap(0, n - 1);
                assert!(
                    verify_batch(&key.address(), 31337, &swapped, &sig).is_err()
                        || merkle_root(&swapped) == root
                );
                assert!(verify_batch(&key.address(), 31337, &leaves[1..], &sig).is_err());
            }
            assert!(verify_batch(&key.address(), 1, &leaves, &sig).is_err());
            let other = NodeKey::generate().unwrap();
            assert!(verify_batch(&other.address(), 31337, &leaves, &sig).is_err());
        }
    }
}
