//! Router decision time on synthetic snapshots of 10, 1,000 and 10,000 nodes.
//! Run: `cargo bench -p lattice-router --bench route`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use lattice_router::{
    LiveLoad, NodeId, NodeView, Preference, RouteRequest, Snapshot, SplitMix, route,
};

fn snapshot(n: u64) -> Snapshot {
    let mut rng = SplitMix(1);
    let models = ["llama-3-8b", "qwen-2.5-7b", "gemma-3-4b", "smollm2-135m"];
    let nodes = (0..n)
        .map(|i| {
            let r = |rng: &mut SplitMix, k: usize| {
                u32::try_from(lattice_router::Random::below(rng, k)).unwrap_or(0)
            };
            NodeView {
                id: NodeId(i),
                models: vec![
                    models[usize::try_from(i % 4).unwrap_or(0)].to_owned(),
                    "shared-model".to_owned(),
                ],
                slots: 4,
                ttft_s: 0.05 + f64::from(r(&mut rng, 100)) / 1000.0,
                decode_tps: 20.0 + f64::from(r(&mut rng, 80)),
                price_in: 100 + u64::from(r(&mut rng, 50)),
                price_out: 200 + u64::from(r(&mut rng, 100)),
                reputation: 0.5 + f64::from(r(&mut rng, 50)) / 100.0,
                logprobs: true,
                live: Arc::new(LiveLoad::new(r(&mut rng, 5), r(&mut rng, 3))),
            }
        })
        .collect();
    Snapshot::new(nodes)
}

fn main() {
    println!("| nodes | model's candidates | decision (mean) | snapshot rebuild |");
    println!("|---:|---:|---:|---:|");
    for n in [10u64, 1_000, 10_000] {
        let t = Instant::now();
        let snap = snapshot(n);
        let build = t.elapsed();
        for (model, cands) in [("llama-3-8b", n / 4), ("shared-model", n)] {
            let req = RouteRequest {
                model,
                prompt_tokens: 500,
                max_tokens: 256,
                preference: Preference::Latency,
                affinity: Some(NodeId(3)),
                logprobs: false,
            };
            let mut rng = SplitMix(7);
            let iters = 200_000u32;
            for _ in 0..1000 {
                black_box(route(&snap, &req, &mut rng));
            }
            let t = Instant::now();
            for _ in 0..iters {
                black_box(route(black_box(&snap), black_box(&req), &mut rng));
            }
            let per = t.elapsed().as_secs_f64() / f64::from(iters);
            println!(
                "| {n} | {cands} | {:.2} µs | {:.2} ms |",
                per * 1e6,
                build.as_secs_f64() * 1e3
            );
        }
    }
}
