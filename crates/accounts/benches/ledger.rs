//! Ledger throughput: charged requests per second through the real store (hold + charge per
//! request, many in flight so the writer commits them in batches), on SQLite and PostgreSQL, and
//! the pure in-memory rules for comparison.
//!
//! cargo bench --workspace --bench ledger      (PostgreSQL: LATTICE_TEST_POSTGRES_URL;
//! LATTICE_BENCH_ONLY="SQLite exclusive" runs only the stores so named,
//! LATTICE_BENCH_GATHER_MS=N sets the exclusive writer's gather in busy spells)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Instant;

use lattice_accounts::{
    Accounts, AccountsConfig, Db, Identity, LedgerConfig, LedgerMode, PostError, ReceiptBatch,
    UsageRecord,
};
use lattice_ledger::{Ledger, Money, Op, Split};
use lattice_link::{ChargeColumns, ReceiptInBatch, UsageReceipt};

/// The `lattice` binary's allocator, so the figures are the binary's.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

const REQUESTS: usize = 50_000;
const IN_FLIGHT: usize = 512;
/// Charges per batch in batch mode: a node signs its receipts 64 at a time.
const BATCH: usize = 64;
const NODE: &str = "0x00000000000000000000000000000000000000aa";

fn hold(r: &str, user: &str) -> Op {
    Op::Hold {
        request: r.into(),
        user: user.into(),
        key: None,
        amount: Money::from_units(1_000_000),
    }
}

fn charge(r: &str, user: &str) -> Op {
    Op::Charge {
        request: r.into(),
        user: user.into(),
        node: NODE.into(),
        amount: Money::from_units(600_000),
        split: Split::default(),
    }
}

/// A charge's receipt as Nexus stores it: the node's receipt and its leaf in a signed batch (the
/// batch stored once), in the compact form next to the row's columns, so the rows are as wide as
/// in production.
fn stored_receipt(request_id: &str, root: &str, leaf: u64) -> String {
    let stored = ReceiptInBatch {
        receipt: UsageReceipt {
            request_id: request_id.to_owned(),
            user: format!("0x{}", hex::encode([0x11; 20])),
            model: "bench".into(),
            prompt_tokens: 10,
            completion_tokens: 16,
            price_in: 100_000,
            price_out: 200_000,
            timestamp: 1_764_000_000,
            chain_id: 31_337,
            signature: String::new(),
        },
        root: root.to_owned(),
        leaf,
    };
    stored
        .compact(ChargeColumns {
            request_id,
            model: "bench",
            prompt_tokens: 10,
            completion_tokens: 16,
        })
        .unwrap()
}

fn receipt_batch(n: usize) -> Arc<ReceiptBatch> {
    Arc::new(ReceiptBatch {
        root: format!("{n:064x}"),
        node: NODE.into(),
        signature: format!("0x{}", hex::encode([0x5a; 65])),
        leaves: (0..BATCH).map(|i| [i as u8; 32]).collect(),
    })
}

fn pure() {
    let mut l = Ledger::default();
    l.apply(&Op::Faucet {
        op: "f".into(),
        user: "u".into(),
        amount: Money::from_lai(1_000_000).unwrap(),
    })
    .unwrap();
    let t = Instant::now();
    for i in 0..REQUESTS * 10 {
        let r = format!("r{i}");
        l.apply(&hold(&r, "u")).unwrap();
        l.apply(&charge(&r, "u")).unwrap();
    }
    let s = t.elapsed().as_secs_f64();
    println!(
        "pure Ledger (in memory)      {:>9.0} charged requests/s ({} in {s:.2} s)",
        (REQUESTS * 10) as f64 / s,
        REQUESTS * 10
    );
}

async fn store(name: &str, url: &str, users: usize, mode: LedgerMode, batch: usize) {
    // LATTICE_BENCH_ONLY=TEXT runs only the stores whose name contains TEXT (for profiling).
    if std::env::var("LATTICE_BENCH_ONLY").is_ok_and(|only| !name.contains(&only)) {
        return;
    }
    let db = Db::open(url).await.unwrap();
    // LATTICE_BENCH_GATHER_MS=N: the exclusive writer's gather interval in busy spells while
    // nobody waits (the request path's holds and charges; default 40 ms).
    let gather_unawaited = std::env::var("LATTICE_BENCH_GATHER_MS")
        .ok()
        .and_then(|ms| ms.parse().ok())
        .map_or(
            LedgerConfig::default().gather_unawaited,
            std::time::Duration::from_millis,
        );
    let config = AccountsConfig {
        ledger: LedgerConfig {
            mode,
            gather_unawaited,
            ..LedgerConfig::default()
        },
        ..AccountsConfig::default()
    };
    let acc = Arc::new(Accounts::open(db, config).await.unwrap());
    let mut ids = Vec::new();
    for u in 0..users {
        let s = acc
            .sign_in(
                &Identity {
                    kind: "bench".into(),
                    subject: format!("{u}-{}", std::process::id()),
                    detail: None,
                },
                None,
                None,
                "bench",
            )
            .await
            .unwrap();
        acc.ledger()
            .post(Op::Deposit {
                op: format!("dep-{}", s.user.id),
                user: s.user.id.clone(),
                amount: Money::from_lai(1_000).unwrap(),
            })
            .await
            .unwrap();
        ids.push(s.user.id);
    }
    let ids = Arc::new(ids);
    // The batches, made before the clock starts (Nexus gets them from the link).
    let batches: Arc<Vec<Arc<ReceiptBatch>>> =
        Arc::new((0..=REQUESTS / BATCH).map(receipt_batch).collect());
    // `batch` requests per task: each holds on its own (the request path), then they are
    // charged together (as Nexus does when a node's receipt batch signature arrives).
    let sem = Arc::new(tokio::sync::Semaphore::new((IN_FLIGHT / batch).max(1)));
    let t = Instant::now();
    let mut tasks = Vec::with_capacity(REQUESTS / batch + 1);
    for first in (0..REQUESTS).step_by(batch) {
        let permit = sem.clone().acquire_owned().await.unwrap();
        let (acc, ids, batches) = (acc.clone(), ids.clone(), batches.clone());
        tasks.push(tokio::spawn(async move {
            let mut charges = Vec::with_capacity(batch);
            for i in first..(first + batch).min(REQUESTS) {
                let user = &ids[i % ids.len()];
                // Time-ordered, like the ids Nexus gives paid requests.
                let r = uuid::Uuid::now_v7().simple().to_string();
                // Beyond the writer's queue bound new holds are refused: wait for it.
                while let Err(e) = acc.ledger().apply(hold(&r, user)).await {
                    assert!(matches!(e, PostError::Backlog(_)), "{e}");
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
                let batch = &batches[i / BATCH];
                let usage = UsageRecord {
                    request_id: r.clone(),
                    user_id: user.clone(),
                    key_id: None,
                    node: NODE.into(),
                    model: "bench".into(),
                    prompt_tokens: 10,
                    completion_tokens: 16,
                    receipt: stored_receipt(&r, &batch.root, (i % BATCH) as u64),
                    batch: Some(batch.clone()),
                };
                charges.push((charge(&r, user), usage));
            }
            if batch == 1 {
                for (op, usage) in charges {
                    acc.ledger().charge(op, usage).await.unwrap();
                }
            } else {
                for r in acc.ledger().charge_many(charges).await {
                    r.unwrap();
                }
            }
            drop(permit);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let applied = t.elapsed().as_secs_f64();
    // Durable: the exclusive writer's last cut is committed.
    acc.ledger().sync().await.unwrap();
    let s = t.elapsed().as_secs_f64();
    let audit = acc.ledger().audit().await.unwrap();
    assert!(audit.balanced(), "{audit:?}");
    println!(
        "{name:<32} {:>9.0} charged requests/s (hold + charge + usage row; {REQUESTS} requests, {IN_FLIGHT} in flight, {users} users, charges in batches of {batch}, {s:.2} s; all applied after {applied:.2} s)",
        REQUESTS as f64 / s
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    pure();
    let dir = tempfile::tempdir().unwrap();
    let sqlite = format!("sqlite://{}", dir.path().join("bench.db").display());
    use LedgerMode::{Exclusive, Shared};
    for (name, url, mode, batch) in [
        ("SQLite exclusive", sqlite.as_str(), Exclusive, 1),
        (
            "SQLite exclusive, batched",
            sqlite.as_str(),
            Exclusive,
            BATCH,
        ),
        ("SQLite shared", sqlite.as_str(), Shared, 1),
    ] {
        for users in [1, 100] {
            store(&format!("{name}, {users} users"), url, users, mode, batch).await;
        }
    }
    match std::env::var("LATTICE_TEST_POSTGRES_URL") {
        Ok(pg) => {
            for (name, mode, batch) in [
                ("PostgreSQL exclusive", Exclusive, 1),
                ("PostgreSQL exclusive, batched", Exclusive, BATCH),
                ("PostgreSQL shared", Shared, 1),
            ] {
                for users in [1, 100] {
                    store(&format!("{name}, {users} users"), &pg, users, mode, batch).await;
                }
            }
        }
        Err(_) => {
            println!("PostgreSQL: set LATTICE_TEST_POSTGRES_URL (scripts/postgres.sh prints one)")
        }
    }
}
