//! Signer recovery (Nexus, per receipt batch) and signing (the node, per receipt batch):
//! `lattice_link` (libsecp256k1) against the pure-Rust `k256` it replaced, in the same run; then
//! what a paid request's receipt costs in cryptography alone (its leaf hashed on both sides, a
//! full batch's Merkle root and signature shared by its receipts).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::hint::black_box;
use std::time::Instant;

use k256::ecdsa::{RecoveryId, Signature, SigningKey, VerifyingKey};
use lattice_link::{
    MAX_BATCH_RECEIPTS, NodeKey, UsageReceipt, merkle_root, sign_batch, verify_batch,
};

fn main() {
    let secret = [7u8; 32];
    let key = NodeKey::from_secret(&secret).unwrap();
    let theirs = SigningKey::from_slice(&secret).unwrap();
    let receipt = UsageReceipt {
        request_id: "req-bench".into(),
        user: "0x7e5f4552091a69125d5dfcb7b8c2659029395bdf".into(),
        model: "smollm2-135m".into(),
        prompt_tokens: 31,
        completion_tokens: 16,
        price_in: 100_000_000_000_000_000,
        price_out: 200_000_000_000_000_000,
        timestamp: 1_764_000_000,
        chain_id: 31_337,
        signature: String::new(),
    }
    .sign(&key)
    .unwrap();
    let address = key.address();
    let digest = receipt.digest().unwrap();
    let bytes = hex::decode(receipt.signature.trim_start_matches("0x")).unwrap();
    const N: u32 = 5_000;

    let k256 = || {
        let sig = Signature::from_slice(&bytes[..64]).unwrap();
        let rec = RecoveryId::from_byte(bytes[64] - 27).unwrap();
        VerifyingKey::recover_from_prehash(&digest, &sig, rec).unwrap()
    };
    let libsecp = || receipt.verify(&address).unwrap();
    for _ in 0..200 {
        black_box(k256());
        libsecp();
    }
    let t = Instant::now();
    for _ in 0..N {
        black_box(k256());
    }
    let k = t.elapsed() / N;
    let t = Instant::now();
    for _ in 0..N {
        libsecp();
    }
    let l = t.elapsed() / N;
    let t = Instant::now();
    for _ in 0..N {
        black_box(theirs.sign_prehash_recoverable(&digest).unwrap());
    }
    let ks = t.elapsed() / N;
    let t = Instant::now();
    for _ in 0..N {
        black_box(key.sign("bench").unwrap());
    }
    let s = t.elapsed() / N;
    println!("receipt signer recovery, {N} times each, one thread:");
    println!(
        "  k256 (pure Rust, before)           {:>8.1} µs",
        k.as_secs_f64() * 1e6
    );
    println!(
        "  lattice_link::UsageReceipt::verify  {:>8.1} µs  (libsecp256k1, incl. EIP-712 hash)",
        l.as_secs_f64() * 1e6
    );
    println!(
        "  ratio                               {:>8.2}×",
        k.as_secs_f64() / l.as_secs_f64()
    );
    println!("signature, {N} times each, one thread:");
    println!(
        "  k256 (pure Rust, before)           {:>8.1} µs",
        ks.as_secs_f64() * 1e6
    );
    println!(
        "  lattice_link::NodeKey::sign         {:>8.1} µs  (libsecp256k1, incl. EIP-191 hash)",
        s.as_secs_f64() * 1e6
    );
    println!(
        "  ratio                               {:>8.2}×",
        ks.as_secs_f64() / s.as_secs_f64()
    );

    // Per paid request: the node and Nexus each hash its receipt's leaf; each builds a full
    // batch's Merkle root; the node signs the batch and Nexus recovers the signer once per batch.
    let mut unsigned = receipt.clone();
    unsigned.signature.clear();
    let t = Instant::now();
    for i in 0..N {
        unsigned.completion_tokens = u64::from(i);
        black_box(unsigned.struct_hash().unwrap());
    }
    let leaf = t.elapsed() / N;
    let leaves: Vec<[u8; 32]> = (0..MAX_BATCH_RECEIPTS)
        .map(|i| {
            unsigned.completion_tokens = i as u64;
            unsigned.struct_hash().unwrap()
        })
        .collect();
    const B: u32 = 200;
    let t = Instant::now();
    for _ in 0..B {
        black_box(merkle_root(black_box(&leaves)));
    }
    let root = t.elapsed() / B;
    let signature = sign_batch(&key, 31_337, &leaves).unwrap();
    let t = Instant::now();
    for _ in 0..B {
        black_box(sign_batch(&key, 31_337, &leaves).unwrap());
    }
    let signed = t.elapsed() / B;
    let t = Instant::now();
    for _ in 0..B {
        black_box(verify_batch(&address, 31_337, &leaves, &signature).unwrap());
    }
    let verified = t.elapsed() / B;
    let per = |d: std::time::Duration| d.as_secs_f64() * 1e6 / MAX_BATCH_RECEIPTS as f64;
    let floor = 2.0 * leaf.as_secs_f64() * 1e6 + per(signed) + per(verified);
    println!(
        "a paid request's receipt, cryptography only ({MAX_BATCH_RECEIPTS} receipts per batch):"
    );
    println!(
        "  leaf (EIP-712 struct hash), each side   {:>6.2} µs",
        leaf.as_secs_f64() * 1e6
    );
    println!(
        "  Merkle root, per receipt, each side      {:>6.2} µs",
        per(root)
    );
    println!(
        "  batch signed (root + signature) / receipt {:>5.2} µs",
        per(signed)
    );
    println!(
        "  batch verified (root + recovery) / receipt {:>4.2} µs",
        per(verified)
    );
    println!("  total per request, node + Nexus          {floor:>6.2} µs");
}
