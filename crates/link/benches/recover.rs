//! Signer recovery (Nexus, per receipt batch) and signing (the node, per receipt batch):
//! `lattice_link` (libsecp256k1) against the pure-Rust `k256` it replaced, in the same run.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::hint::black_box;
use std::time::Instant;

use k256::ecdsa::{RecoveryId, Signature, SigningKey, VerifyingKey};
use lattice_link::{NodeKey, UsageReceipt};

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
}
