//! The embedded chain's time per block as its state grows with history: grant batches (one
//! block each, one new id kept in `UserRegistry.granted` per batch) on a chain in a directory on
//! disk, timed per 500 blocks, with the size of the state file. Before the journal (commit
//! history), every block rewrote the whole state file, so this grew with the state.
//!
//!   cargo bench -p lattice-chain --bench embedded [-- BLOCKS]   # default 6000
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Instant;

use alloy::primitives::{Address, B256, U256};
use alloy::signers::local::PrivateKeySigner;
use lattice_chain::{Chain, DeployParams, Embedded, GrantEntry, Protocol};

fn main() {
    let blocks: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(6000);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // Beside the build, not in a tmpfs: file syncs count.
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let path = dir.path().join("state.json");
        let chain = Arc::new(Embedded::open(&path, 9).unwrap());
        let p = Protocol::open_or_deploy(
            Chain::Embedded(chain),
            PrivateKeySigner::random(),
            &dir.path().join("deployment.json"),
            &DeployParams::local(Address::repeat_byte(0xee)),
        )
        .await
        .unwrap();
        let user = Address::repeat_byte(1);
        let mut t = Instant::now();
        for i in 1..=blocks {
            let entry = GrantEntry {
                user,
                amount: U256::from(1),
            };
            p.grant_batch(B256::from(U256::from(i)), &[entry])
                .await
                .unwrap();
            if i % 500 == 0 {
                let state = std::fs::metadata(&path).map_or(0, |m| m.len());
                println!(
                    "blocks {:>6}..{i:<6} {:.2} ms per block, state file {state} bytes",
                    i - 499,
                    t.elapsed().as_secs_f64() * 1000.0 / 500.0,
                );
                t = Instant::now();
            }
        }
    });
}
