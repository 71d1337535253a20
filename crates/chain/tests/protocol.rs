//! The protocol driven from Rust, on the embedded chain and on a real anvil (from npm).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use std::sync::Arc;

use alloy::node_bindings::Anvil;
use lattice_chain::{
    Address, B256, Chain, ChainError, DeployParams, Embedded, GrantEntry, NodeOffer,
    PrivateKeySigner, Protocol, Rpc, SettleEntry, Shortfall, U256, WithdrawEntry,
};

fn addr(n: u8) -> Address {
    Address::repeat_byte(n)
}

fn anvil_path() -> std::path::PathBuf {
    std::env::var_os("LATTICE_ANVIL").map_or_else(
        || {
            manifest_dir()
                .join("../../contracts/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil")
        },
        Into::into,
    )
}

/// Grants, settlement (with a shortfall), idempotency by id, access control, node sponsoring,
/// deposits and withdrawal batches — the same script on any chain.
async fn exercise(chain: Chain, operator: PrivateKeySigner) {
    let treasury = addr(0xee);
    let p = Protocol::deploy(
        chain.clone(),
        operator.clone(),
        &DeployParams::local(treasury),
    )
    .await
    .expect("deploy");
    let (alice, bob, node) = (addr(1), addr(2), addr(10));

    let grant = B256::repeat_byte(1);
    let grants = [
        GrantEntry {
            user: alice,
            amount: U256::from(100),
        },
        GrantEntry {
            user: bob,
            amount: U256::from(50),
        },
    ];
    assert!(!p.grant_applied(grant).await.unwrap());
    assert!(
        p.grant_batch(grant, &grants).await.unwrap().applied,
        "first grant applies"
    );
    assert!(
        !p.grant_batch(grant, &grants).await.unwrap().applied,
        "resent grant is a no-op"
    );
    assert!(p.grant_applied(grant).await.unwrap());
    assert_eq!(p.user_balance(alice).await.unwrap(), U256::from(100));
    assert_eq!(p.user_balance(bob).await.unwrap(), U256::from(50));

    let batch = B256::repeat_byte(2);
    let entries = [
        SettleEntry {
            user: alice,
            node,
            amount: U256::from(30),
            tokens: 100,
            requests: 2,
        },
        // Bob owes more than he has: he pays what is left, the batch still applies.
        SettleEntry {
            user: bob,
            node,
            amount: U256::from(60),
            tokens: 40,
            requests: 1,
        },
    ];
    assert!(!p.batch_settled(batch).await.unwrap());
    assert!(
        p.settle_batch(batch, &entries).await.unwrap().applied,
        "first settle applies"
    );
    assert!(
        !p.settle_batch(batch, &entries).await.unwrap().applied,
        "resent batch is a no-op"
    );
    assert!(p.batch_settled(batch).await.unwrap());
    assert_eq!(p.user_balance(alice).await.unwrap(), U256::from(70));
    assert_eq!(p.user_balance(bob).await.unwrap(), U256::ZERO);
    assert_eq!(p.total_settled().await.unwrap(), U256::from(80));
    // 90/5/5 per entry, rounded down for node and pool; nobody stakes, so the pool share goes
    // to the node: alice's 30 → 27 + 1 (treasury 2); bob's 50 → 45 + 2 (treasury 3).
    assert_eq!(p.node_earned(node).await.unwrap(), U256::from(75));
    assert_eq!(p.node_balance(node).await.unwrap(), U256::from(75));
    assert_eq!(p.treasury_balance().await.unwrap(), U256::from(5));

    // Only the settler may settle; the custom error comes back decoded.
    let stranger = Protocol::attach(
        chain.clone(),
        PrivateKeySigner::random(),
        p.deployment().clone(),
    );
    match stranger.settle_batch(B256::repeat_byte(3), &entries).await {
        Err(ChainError::Reverted(reason)) => {
            assert!(
                reason.contains("AccessControlUnauthorizedAccount"),
                "{reason}"
            )
        }
        other => panic!("a stranger settled: {other:?}"),
    }
    assert!(!p.batch_settled(B256::repeat_byte(3)).await.unwrap());

    // The operator sponsors a node's stake.
    let min = p.min_stake().await.unwrap();
    let offer = NodeOffer {
        kind: 0,
        models: vec!["smollm2-135m".into()],
        price_in: 100,
        price_out: 200,
        metadata_uri: String::new(),
    };
    assert!(!p.node_active(node).await.unwrap());
    p.sponsor_node(node, &offer, min).await.expect("sponsor");
    assert!(p.node_active(node).await.unwrap());
    let state = p.node(node).await.unwrap();
    assert_eq!(state.stake, min);
    assert_eq!(state.models, offer.models);

    // A deposit shows up as exactly one deposit event.
    let from_block = p.chain().block_number().await.unwrap() + 1;
    let operator_key = p.operator();
    p.mint(operator_key, U256::from(5)).await.unwrap();
    p.deposit_for(&operator, alice, U256::from(5))
        .await
        .expect("deposit");
    let latest = p.chain().block_number().await.unwrap();
    let deposits = p.deposits(from_block, latest).await.unwrap();
    assert_eq!(deposits.len(), 1, "{deposits:?}");
    assert_eq!(deposits[0].user, alice);
    assert_eq!(deposits[0].from, operator_key);
    assert_eq!(deposits[0].amount, U256::from(5));
    assert_eq!(p.user_balance(alice).await.unwrap(), U256::from(75));

    // A withdrawal batch pays destinations from custody, once per id; bob's custody is empty,
    // so his line is a shortfall and the batch still applies.
    let (dest_a, dest_b) = (addr(20), addr(21));
    let withdrawal = B256::repeat_byte(4);
    let lines = [
        WithdrawEntry {
            user: alice,
            to: dest_a,
            amount: U256::from(25),
        },
        WithdrawEntry {
            user: bob,
            to: dest_b,
            amount: U256::from(5),
        },
    ];
    assert!(!p.withdrawal_applied(withdrawal).await.unwrap());
    let (sent, shortfalls) = p.withdraw_batch(withdrawal, &lines).await.unwrap();
    assert!(sent.applied, "first withdrawal batch applies");
    assert_eq!(
        shortfalls,
        vec![Shortfall {
            user: bob,
            requested: U256::from(5),
            paid: U256::ZERO
        }]
    );
    let (resent, shortfalls) = p.withdraw_batch(withdrawal, &lines).await.unwrap();
    assert!(!resent.applied, "resent withdrawal batch is a no-op");
    assert!(shortfalls.is_empty());
    assert!(p.withdrawal_applied(withdrawal).await.unwrap());
    let head = p.chain().block_number().await.unwrap();
    assert_eq!(
        p.withdrawal_tx(withdrawal, 0, head).await.unwrap(),
        Some(sent.tx_hash),
        "the applying transaction is found by the batch id"
    );
    assert_eq!(
        p.withdrawal_tx(B256::repeat_byte(9), 0, head)
            .await
            .unwrap(),
        None
    );
    assert!(
        !p.grant_applied(withdrawal).await.unwrap(),
        "a withdrawal id is not a grant id"
    );
    assert_eq!(p.user_balance(alice).await.unwrap(), U256::from(50));
    assert_eq!(p.token_balance(dest_a).await.unwrap(), U256::from(25));
    assert_eq!(p.token_balance(dest_b).await.unwrap(), U256::ZERO);
    let latest_after = p.chain().block_number().await.unwrap();
    assert!(
        p.deposits(latest + 1, latest_after)
            .await
            .unwrap()
            .is_empty(),
        "a withdrawal is not a deposit"
    );
    // Only the withdrawer role (the operator) may release custody.
    match stranger.withdraw_batch(B256::repeat_byte(5), &lines).await {
        Err(ChainError::Reverted(reason)) => {
            assert!(
                reason.contains("AccessControlUnauthorizedAccount"),
                "{reason}"
            )
        }
        other => panic!("a stranger withdrew: {other:?}"),
    }
    assert_eq!(p.user_balance(alice).await.unwrap(), U256::from(50));
}

#[tokio::test(flavor = "current_thread")]
async fn embedded_chain_runs_the_protocol() {
    let operator = PrivateKeySigner::random();
    let chain = Chain::Embedded(Arc::new(Embedded::in_memory(31_337)));
    exercise(chain, operator).await;
}

#[tokio::test(flavor = "current_thread")]
async fn anvil_runs_the_protocol() {
    let anvil = Anvil::new()
        .path(anvil_path())
        .try_spawn()
        .expect("start anvil");
    let operator = PrivateKeySigner::from(anvil.keys()[0].clone());
    let chain = Chain::Rpc(Arc::new(
        Rpc::connect(&anvil.endpoint()).await.expect("connect"),
    ));
    exercise(chain, operator).await;
}

#[tokio::test(flavor = "current_thread")]
async fn embedded_state_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("chain.json");
    let deployment_file = dir.path().join("deployment.json");
    let operator = PrivateKeySigner::random();
    let params = DeployParams::local(addr(0xee));
    let grant = B256::repeat_byte(7);
    let (deployment, block) = {
        let chain = Chain::Embedded(Arc::new(Embedded::open(&state, 9).unwrap()));
        let p =
            Protocol::open_or_deploy(chain.clone(), operator.clone(), &deployment_file, &params)
                .await
                .unwrap();
        assert!(
            p.grant_batch(
                grant,
                &[GrantEntry {
                    user: addr(1),
                    amount: U256::from(42)
                }]
            )
            .await
            .unwrap()
            .applied
        );
        (p.deployment().clone(), chain.block_number().await.unwrap())
    };
    let chain = Chain::Embedded(Arc::new(Embedded::open(&state, 9).unwrap()));
    assert_eq!(chain.block_number().await.unwrap(), block);
    assert!(
        Embedded::open(&state, 9).is_err(),
        "a second process must not open a chain that is in use"
    );
    let p = Protocol::open_or_deploy(chain, operator, &deployment_file, &params)
        .await
        .unwrap();
    assert_eq!(
        p.deployment(),
        &deployment,
        "reopening attaches, it does not redeploy"
    );
    assert_eq!(p.user_balance(addr(1)).await.unwrap(), U256::from(42));
    assert!(
        !p.grant_batch(
            grant,
            &[GrantEntry {
                user: addr(1),
                amount: U256::from(42)
            }]
        )
        .await
        .unwrap()
        .applied
    );
    assert_eq!(p.user_balance(addr(1)).await.unwrap(), U256::from(42));

    // A state file of another chain id is refused rather than silently reused.
    drop(p);
    match Embedded::open(&state, 10) {
        Err(ChainError::State { message, .. }) => assert!(message.contains("chain 9"), "{message}"),
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("opened a chain 9 state file as chain 10"),
    }
}

/// The embedded chain appends logs to a file of their own: the state file does not grow with
/// history, bytes a crash left past the committed length are cut off when it opens, and a state
/// file from before (logs inline) is moved over.
#[tokio::test(flavor = "current_thread")]
async fn embedded_logs_live_in_an_append_only_file() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let logs = dir.path().join("state.logs");
    let deployment_file = dir.path().join("deployment.json");
    let operator = PrivateKeySigner::random();
    let params = DeployParams::local(addr(0xee));
    let alice = addr(0xa1);
    let open = || {
        let chain = Chain::Embedded(Arc::new(Embedded::open(&state, 9).unwrap()));
        Protocol::open_or_deploy(chain, operator.clone(), &deployment_file, &params)
    };
    async fn deposit(p: Protocol, from: &PrivateKeySigner, to: Address) -> (Protocol, usize) {
        p.mint(p.operator(), U256::from(5)).await.unwrap();
        p.deposit_for(from, to, U256::from(5)).await.unwrap();
        let head = p.chain().block_number().await.unwrap();
        let n = p.deposits(p.deployment().block, head).await.unwrap().len();
        (p, n)
    }
    let (p, n) = deposit(open().await.unwrap(), &operator, alice).await;
    assert_eq!(n, 1);
    let state_len = std::fs::metadata(&state).unwrap().len();
    let (p, n) = deposit(p, &operator, alice).await;
    assert_eq!(n, 2);
    let top_level_logs = || {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
        v.get("logs").is_some()
    };
    assert!(!top_level_logs(), "logs are not in the state file");
    assert_eq!(
        std::fs::metadata(&state).unwrap().len(),
        state_len,
        "a block does not rewrite the state file (its changes go to the journal)"
    );
    drop(p);

    // A crash after the log append, before the state landed: a whole line and a torn one.
    let committed = std::fs::metadata(&logs).unwrap().len();
    let last_line = std::fs::read_to_string(&logs)
        .unwrap()
        .lines()
        .last()
        .unwrap()
        .to_owned();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&logs)
        .unwrap();
    std::io::Write::write_all(&mut f, format!("{last_line}\n{{\"block\":").as_bytes()).unwrap();
    drop(f);
    let p = open().await.unwrap();
    assert_eq!(std::fs::metadata(&logs).unwrap().len(), committed);
    let (p, n) = deposit(p, &operator, alice).await;
    assert_eq!(n, 3, "the uncommitted line is not a deposit");
    drop(p);

    // A state file of the earlier format: the logs inline, no log file, no journal (opening
    // folds the journal into the state file first).
    drop(open().await.unwrap());
    assert_eq!(
        std::fs::metadata(dir.path().join("state.journal"))
            .unwrap()
            .len(),
        0
    );
    std::fs::remove_file(dir.path().join("state.journal")).unwrap();
    let mut old: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    let inline: Vec<serde_json::Value> = std::fs::read_to_string(&logs)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    old["logs"] = serde_json::Value::Array(inline);
    old.as_object_mut().unwrap().remove("logs_bytes");
    std::fs::write(&state, serde_json::to_vec(&old).unwrap()).unwrap();
    std::fs::remove_file(&logs).unwrap();
    let p = open().await.unwrap();
    assert!(logs.exists());
    assert!(!top_level_logs());
    let (_, n) = deposit(p, &operator, alice).await;
    assert_eq!(n, 4);
}

/// A block executed but not saved leaves memory ahead of the disk: the embedded chain refuses
/// every later call until it is reopened, which resumes from the last saved block.
#[tokio::test(flavor = "current_thread")]
async fn embedded_chain_stops_after_a_block_it_could_not_save() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let deployment_file = dir.path().join("deployment.json");
    let operator = PrivateKeySigner::random();
    let params = DeployParams::local(addr(0xee));
    let chain = Chain::Embedded(Arc::new(Embedded::open(&state, 9).unwrap()));
    let p = Protocol::open_or_deploy(chain.clone(), operator.clone(), &deployment_file, &params)
        .await
        .unwrap();
    let block = chain.block_number().await.unwrap();
    // The journal cannot be written (a directory stands where it was; the committed file is
    // kept aside): the next block is executed, not saved.
    let journal = dir.path().join("state.journal");
    let aside = dir.path().join("journal.aside");
    std::fs::rename(&journal, &aside).unwrap();
    std::fs::create_dir(&journal).unwrap();
    let minted = p.mint(addr(3), U256::from(5)).await;
    assert!(
        matches!(minted, Err(ChainError::State { .. })),
        "{minted:?}"
    );
    match p.user_balance(addr(3)).await {
        Err(ChainError::Evm(m)) => assert!(m.contains("restart"), "{m}"),
        other => panic!("a stopped chain answered {other:?}"),
    }
    drop((p, chain));
    std::fs::remove_dir(&journal).unwrap();
    std::fs::rename(&aside, &journal).unwrap();
    let chain = Chain::Embedded(Arc::new(Embedded::open(&state, 9).unwrap()));
    assert_eq!(chain.block_number().await.unwrap(), block);
    let p = Protocol::open_or_deploy(chain, operator, &deployment_file, &params)
        .await
        .unwrap();
    p.mint(addr(3), U256::from(5)).await.unwrap();
}

/// Nodes sponsored at the same time each get registered: the operator's mint, approve and
/// register sequences do not interleave (an approval sets the allowance, it does not add).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sponsoring_registers_every_node() {
    let chain = Chain::Embedded(Arc::new(Embedded::in_memory(31_337)));
    let p = Protocol::deploy(
        chain,
        PrivateKeySigner::random(),
        &DeployParams::local(addr(0xee)),
    )
    .await
    .unwrap();
    let min = p.min_stake().await.unwrap();
    let offer = NodeOffer {
        kind: 0,
        models: vec!["m".into()],
        price_in: 1,
        price_out: 2,
        metadata_uri: String::new(),
    };
    let nodes: Vec<Address> = (0x40..0x48).map(addr).collect();
    let mut tasks = tokio::task::JoinSet::new();
    for n in nodes.clone() {
        let (p, offer) = (p.clone(), offer.clone());
        tasks.spawn(async move { (n, p.sponsor_node(n, &offer, min).await) });
    }
    while let Some(done) = tasks.join_next().await {
        let (n, r) = done.unwrap();
        r.unwrap_or_else(|e| panic!("sponsoring {n}: {e}"));
    }
    for n in &nodes {
        assert!(p.node_active(*n).await.unwrap(), "{n} is active");
    }
}

/// This package's directory, read when the test runs (cargo and nextest set it): a test binary
/// reused from a build in another checkout must not look in that checkout.
fn manifest_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), Into::into)
}
