//! Settlement to the chain, end to end: a real Nexus with billing, a real node and model, the
//! embedded chain (or a real anvil), paid requests, batches on-chain, reconciliation by the
//! `lattice chain` command — and the same while Nexus is killed at random points of settlement.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod common;
use common::*;

/// Anvil's first well-known development key (funded on every fresh anvil).
const ANVIL_KEY: &str = "ac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";

/// Whether Nexus answers and lists `model` as served (false while it is down or starting).
async fn serves(nexus: &str, model: &str) -> bool {
    let Ok(r) = reqwest::get(format!("{nexus}/v1/models")).await else {
        return false;
    };
    let Ok(v) = r.json::<Value>().await else {
        return false;
    };
    v["data"]
        .as_array()
        .is_some_and(|d| d.iter().any(|m| m["id"] == model))
}

async fn chain_state(nexus: &str) -> Value {
    get(&format!("{nexus}/lattice/v1/chain")).await
}

/// Requests counted in confirmed settlement batches.
fn settled_requests(chain: &Value) -> u64 {
    chain["batches"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["kind"] == "settle" && b["confirmed"] == true)
        .flat_map(|b| b["entries"].as_array().unwrap().clone())
        .map(|e| e["requests"].as_u64().unwrap())
        .sum()
}

async fn wait_settled(nexus: &str, at_least_requests: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let c = chain_state(nexus).await;
        if c["pending_batches"] == 0 && settled_requests(&c) >= at_least_requests {
            return c;
        }
        assert!(Instant::now() < deadline, "never settled: {c}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn chain_cli(dir: &Path, chain_args: &[&str], command: &[&str]) -> (bool, String) {
    let db = dir.join("nexus.db");
    let mut args = vec!["chain", "--db", db.to_str().unwrap()];
    args.extend_from_slice(chain_args);
    args.extend_from_slice(command);
    run(&args)
}

fn reconcile(dir: &Path, chain_args: &[&str]) -> Value {
    let (ok, out) = chain_cli(dir, chain_args, &["reconcile"]);
    let r: Value = serde_json::from_str(&out).unwrap_or_else(|_| panic!("reconcile said {out}"));
    assert!(ok, "reconciliation found differences: {r}");
    assert_eq!(r["mismatches"], json!([]), "{r}");
    assert_eq!(r["pending_batches"], 0, "{r}");
    assert_eq!(r["settled_expected"], r["settled_on_chain"], "{r}");
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paid_usage_settles_on_chain_and_reconciles() {
    let dir = tmp();
    let n = nexus_with(dir.path(), "127.0.0.1:0", &["--settle-interval", "1"]);
    let _node = node(&n.url, CHAT, &key(dir.path(), "n1"), "2");
    wait_for_models(&n.url, &[(CHAT, 1)]).await;

    // The operator sponsored the node's stake on the embedded chain when it registered.
    let node_address = nodes(&n.url).await["online"][0]["address"]
        .as_str()
        .unwrap()
        .to_owned();

    const REQUESTS: u64 = 6;
    for i in 0..REQUESTS {
        let (s, v) = post(
            &format!("{}/v1/chat/completions", n.url),
            chat(&format!("Count to {i}."), json!({})),
        )
        .await;
        assert_eq!(s, 200, "{v}");
    }
    let c = wait_settled(&n.url, REQUESTS).await;
    let grants: Vec<&Value> = c["batches"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["kind"] == "grant")
        .collect();
    assert!(
        !grants.is_empty(),
        "the operator's starter credit is minted on-chain: {c}"
    );
    let settle = c["batches"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["kind"] == "settle")
        .unwrap();
    assert_eq!(
        settle["entries"][0]["node"]
            .as_str()
            .unwrap()
            .to_lowercase(),
        node_address.to_lowercase()
    );
    assert!(settle["tx_hash"].as_str().unwrap().starts_with("0x"));
    n.kill();

    // With Nexus stopped, the CLI opens the same embedded chain and the same database.
    let r = reconcile(dir.path(), &[]);
    assert!(r["checked"].as_u64().unwrap() >= 1, "{r}");
    assert_ne!(r["settled_on_chain"], "0", "{r}");
    let (ok, out) = chain_cli(dir.path(), &[], &["balance", &node_address]);
    assert!(ok, "{out}");
    assert!(
        out.contains("active"),
        "the node is staked and active: {out}"
    );
    let earnings = out
        .lines()
        .find(|l| l.starts_with("earnings"))
        .unwrap()
        .to_owned();
    assert!(!earnings.contains(" 0 LAI"), "the node was paid: {out}");
}

/// Drives paid load at a Nexus that aborts at random points of settlement, restarting it each
/// time, then lets it finish and checks that ledger and chain agree to the unit.
async fn chaos(dir: &Path, chain_args: &[&str], nexus_args: &[&str]) {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let url = format!("http://{listen}");
    let mut extra = vec!["--settle-interval", "1"];
    extra.extend_from_slice(chain_args);
    extra.extend_from_slice(nexus_args);
    let faults = [("LATTICE_FAULT_SETTLE_ABORT", "0.4")];
    let mut n = nexus_env(dir, &listen, &extra, &faults);
    let _node = node(&url, CHAT, &key(dir, "n1"), "2");

    // Nexus may abort at any moment, even before the node has linked (its first pass mints the
    // operator's starter credit): every step checks whether it is still alive.
    let client = reqwest::Client::new();
    let mut crashes = 0;
    let mut served = 0;
    let deadline = Instant::now() + Duration::from_secs(300);
    const CRASHES: u32 = 3;
    const REQUESTS: u32 = 12;
    while crashes < CRASHES || served < REQUESTS {
        assert!(
            Instant::now() < deadline,
            "only {crashes} crashes after {served} requests"
        );
        if n.child.try_wait().unwrap().is_some() {
            crashes += 1;
            n = nexus_env(dir, &listen, &extra, &faults);
            continue;
        }
        if !serves(&url, CHAT).await {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        let r = client
            .post(format!("{url}/v1/chat/completions"))
            .bearer_auth(key_for(&url))
            .json(&chat("Say hi.", json!({"max_tokens": 4})))
            .timeout(Duration::from_secs(30))
            .send()
            .await;
        if matches!(&r, Ok(r) if r.status() == 200) {
            served += 1;
        }
    }
    n.kill();
    // Without faults, the restarted Nexus finishes every recorded batch.
    let n = nexus_with(dir, &listen, &extra);
    wait_for_models(&url, &[(CHAT, 1)]).await;
    let c = wait_settled(&url, 1).await;
    n.kill();
    let r = reconcile(dir, chain_args);
    assert_ne!(r["settled_on_chain"], "0", "{r} {c}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settlement_survives_nexus_crashes_on_the_embedded_chain() {
    let dir = tmp();
    chaos(dir.path(), &[], &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settlement_survives_nexus_crashes_against_anvil() {
    let dir = tmp();
    let (_anvil, chain) = anvil_chain(dir.path()).await;
    let chain: Vec<&str> = chain.iter().map(String::as_str).collect();
    chaos(dir.path(), &chain, &["--node-stake", "sponsor"]).await;
}

/// A real anvil and the `--chain-rpc … --chain-key-file …` arguments that use it with its first
/// development key (written into `dir`).
async fn anvil_chain(dir: &Path) -> (Reaped, Vec<String>) {
    let (anvil, rpc) = anvil().await;
    let key_file = dir.join("anvil.key");
    std::fs::write(&key_file, ANVIL_KEY).unwrap();
    let key_path = key_file.to_str().unwrap().to_owned();
    let args = vec![
        "--chain-rpc".to_owned(),
        rpc,
        "--chain-key-file".to_owned(),
        key_path,
    ];
    (anvil, args)
}

/// A real anvil on a free loopback port, and its RPC URL.
async fn anvil() -> (Reaped, String) {
    let anvil_bin =
        manifest_dir().join("../../contracts/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil");
    let port = free_port().to_string();
    let anvil = Reaped(
        std::process::Command::new(anvil_bin)
            .args(["--host", "127.0.0.1", "--port", &port])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start anvil"),
    );
    let rpc = format!("http://127.0.0.1:{port}");
    // Anvil answers within a fraction of a second.
    let deadline = Instant::now() + Duration::from_secs(20);
    while reqwest::Client::new()
        .post(&rpc)
        .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []}))
        .send()
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "anvil did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (anvil, rpc)
}

async fn available(nexus: &str) -> u128 {
    units(&get(&format!("{nexus}/lattice/v1/account")).await["balance"]["available"])
}

/// An on-chain deposit into a user's custody becomes off-chain credit exactly once, also across
/// a Nexus restart, and the books still reconcile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deposits_on_chain_are_credited_once() {
    let dir = tmp();
    let (_anvil, chain) = anvil_chain(dir.path()).await;
    let chain: Vec<&str> = chain.iter().map(String::as_str).collect();
    let listen = format!("127.0.0.1:{}", free_port());
    let mut extra = vec!["--settle-interval", "1"];
    extra.extend_from_slice(&chain);
    let n = nexus_with(dir.path(), &listen, &extra);
    let account = get(&format!("{}/lattice/v1/account", n.url)).await;
    let address = account["user"]["address"].as_str().unwrap().to_owned();
    let before = available(&n.url).await;
    // The operator key is Nexus's too: let its first pass (the starter-credit grant) finish so
    // the two senders do not race for a nonce.
    wait_settled(&n.url, 0).await;

    let (ok, out) = chain_cli(dir.path(), &chain, &["faucet", &address, "5"]);
    assert!(ok, "{out}");
    let lai: u128 = 5 * 10u128.pow(18);
    let deadline = Instant::now() + Duration::from_secs(60);
    while available(&n.url).await != before + lai {
        assert!(Instant::now() < deadline, "the deposit was never credited");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    n.kill();

    // A restarted Nexus scans from its cursor: the same deposit is not credited again.
    let n = nexus_with(dir.path(), &listen, &extra);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(available(&n.url).await, before + lai);
    wait_settled(&n.url, 0).await;
    n.kill();
    let r = reconcile(dir.path(), &chain);
    assert!(r["checked"].as_u64().unwrap() >= 1, "{r}");
}

/// Kills its process when dropped, also when the test fails.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Once an epoch ends, Nexus posts every node's uptime and reputation to NetworkStatus; the
/// node keeps its stake and stays active. Against anvil, so the chain can be read while Nexus
/// runs; paid requests keep blocks (and so the chain's clock) moving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_status_is_posted_each_epoch() {
    let dir = tmp();
    let (_anvil, chain) = anvil_chain(dir.path()).await;
    let chain: Vec<&str> = chain.iter().map(String::as_str).collect();
    let mut extra = vec![
        "--settle-interval",
        "1",
        "--epoch-secs",
        "3",
        "--node-stake",
        "sponsor",
    ];
    extra.extend_from_slice(&chain);
    let n = nexus_with(dir.path(), "127.0.0.1:0", &extra);
    let _node = node(&n.url, CHAT, &key(dir.path(), "n1"), "1");
    wait_for_models(&n.url, &[(CHAT, 1)]).await;
    let address = nodes(&n.url).await["online"][0]["address"]
        .as_str()
        .unwrap()
        .to_owned();

    let deadline = Instant::now() + Duration::from_secs(90);
    let out = loop {
        let (s, v) = post(
            &format!("{}/v1/chat/completions", n.url),
            chat("Say hi.", json!({"max_tokens": 4})),
        )
        .await;
        assert_eq!(s, 200, "{v}");
        let (ok, out) = chain_cli(dir.path(), &chain, &["balance", &address]);
        assert!(ok, "{out}");
        let uptime = out
            .lines()
            .find_map(|l| l.strip_prefix("status")?.split("uptime ").nth(1))
            .and_then(|rest| rest.split(' ').next()?.parse::<u16>().ok());
        if uptime.is_some_and(|u| u > 0) {
            break out;
        }
        assert!(
            Instant::now() < deadline,
            "no status with the node's uptime was posted: {out}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(out.contains(", active"), "the node stays active: {out}");
    assert!(out.contains("root 0x"), "{out}");
}

fn units(v: &Value) -> u128 {
    v.as_str()
        .unwrap_or_else(|| panic!("not a decimal string: {v}"))
        .parse()
        .unwrap()
}

/// The chain API: custody next to the off-chain balance, a node's stake, reputation, earnings
/// and pool with the expected APY from its last 7 days of earnings, the wallet calls for
/// staking, bounded input, and 404 `no_chain` without a chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_accounts_show_custody_stake_and_pool_apy() {
    let dir = tmp();
    let listen = format!("127.0.0.1:{}", free_port());
    let n = nexus_with(dir.path(), &listen, &["--settle-interval", "1"]);
    let _node = node(&n.url, CHAT, &key(dir.path(), "n1"), "2");
    wait_for_models(&n.url, &[(CHAT, 1)]).await;
    let node_address = nodes(&n.url).await["online"][0]["address"]
        .as_str()
        .unwrap()
        .to_lowercase();

    // Bounded input: anything but 0x + 40 hex digits is a 400 in OpenAI's envelope.
    for bad in [
        "0x1234",
        "not-an-address",
        "0xzz00000000000000000000000000000000000000",
        &format!("{node_address}00"),
    ] {
        let (s, v) = get_status(&format!("{}/lattice/v1/chain/accounts/{bad}", n.url)).await;
        assert_eq!(s, 400, "{bad}: {v}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        assert_eq!(v["error"]["param"], "address", "{v}");
    }
    let (s, v) = get_status(&format!(
        "{}/lattice/v1/chain/calls/stake?to={node_address}&amount=-1",
        n.url
    ))
    .await;
    assert_eq!(s, 400, "{v}");

    for i in 0..3 {
        let (s, v) = post(
            &format!("{}/v1/chat/completions", n.url),
            chat(&format!("Name {i} colours."), json!({})),
        )
        .await;
        assert_eq!(s, 200, "{v}");
    }
    wait_settled(&n.url, 3).await;

    // The operator account: everything credited off-chain is settled, custody matches it.
    let me = get(&format!("{}/lattice/v1/account/chain", n.url)).await;
    assert_eq!(me["in_sync"], true, "{me}");
    assert_eq!(me["chain"]["kind"], "embedded", "{me}");
    assert_eq!(me["position"]["unsettled"], "0", "{me}");
    assert_eq!(me["position"]["unminted"], "0", "{me}");
    let custody = units(&me["on_chain"]["custody"]);
    assert_eq!(custody, units(&me["expected_custody"]), "{me}");
    assert_eq!(custody, units(&me["off_chain"]["available"]), "{me}");
    assert!(
        units(&me["position"]["settled"]) > 0,
        "the chats were settled: {me}"
    );
    let account = get(&format!("{}/lattice/v1/account", n.url)).await;
    assert_eq!(me["address"], account["user"]["address"]);

    // The node: sponsored stake, active, paid on-chain, an empty pool (no APY).
    let url = format!("{}/lattice/v1/chain/accounts/{node_address}", n.url);
    let a = get(&url).await;
    let info = &a["node"];
    assert_eq!(info["registered"], true, "{a}");
    assert_eq!(info["active"], true, "{a}");
    assert_eq!(info["stake"], a["min_stake"], "{a}");
    assert!(units(&info["stake"]) > 0, "{a}");
    assert!(
        units(&info["earnings"]) > 0,
        "the node was paid on-chain: {a}"
    );
    assert_eq!(info["pool"]["staked"], "0", "{a}");
    assert_eq!(info["pool"]["expected_apy"], Value::Null, "{a}");
    let earnings = get(&format!(
        "{}/lattice/v1/nodes/{node_address}/earnings",
        n.url
    ))
    .await;
    let paid: u128 = earnings["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| units(&r["cost"]))
        .sum();
    assert!(paid > 0, "{earnings}");
    assert_eq!(units(&info["pool"]["charges"]), paid, "{a} {earnings}");
    let pool_bps = u128::from(info["pool"]["pool_bps"].as_u64().unwrap());
    assert_eq!(pool_bps, 500, "the default on-chain split: {a}");
    let income = paid * pool_bps / 10_000;
    assert_eq!(units(&info["pool"]["income"]), income, "{a}");
    let list = get(&format!("{}/lattice/v1/chain/nodes", n.url)).await;
    assert_eq!(list["data"][0]["address"], node_address.as_str(), "{list}");
    assert_eq!(list["data"][0]["active"], true, "{list}");

    // The transactions a wallet would send to stake.
    let calls = get(&format!(
        "{}/lattice/v1/chain/calls/stake?to={node_address}&amount=5000000000000000000",
        n.url
    ))
    .await;
    let txs = calls["transactions"].as_array().unwrap();
    assert_eq!(txs.len(), 2, "{calls}");
    assert_eq!(txs[0]["to"], a["chain"]["token"], "{calls}");
    assert!(
        txs[0]["data"].as_str().unwrap().starts_with("0x095ea7b3"),
        "approve: {calls}"
    );
    assert_eq!(txs[1]["to"], a["chain"]["tokenomics"], "{calls}");
    assert!(
        txs[1]["data"]
            .as_str()
            .unwrap()
            .contains(node_address.trim_start_matches("0x")),
        "stake names the node: {calls}"
    );
    n.kill();

    // Stake 50 LAI into the node's pool (the CLI: the embedded chain is free once Nexus stops),
    // then the pool has stake and an expected APY from the same 7 days of earnings.
    let (ok, out) = chain_cli(dir.path(), &[], &["stake", &node_address, "50"]);
    assert!(ok, "{out}");
    let (ok, status) = chain_cli(dir.path(), &[], &["status"]);
    assert!(ok, "{status}");
    let operator = status
        .lines()
        .find_map(|l| l.strip_prefix("operator"))
        .unwrap()
        .trim()
        .to_lowercase();
    let n = nexus_with(dir.path(), &listen, &["--settle-interval", "1"]);
    let a = get(&format!(
        "{}/lattice/v1/chain/accounts/{node_address}?staker={operator}",
        n.url
    ))
    .await;
    let staked: u128 = 50 * 10u128.pow(18);
    assert_eq!(units(&a["node"]["pool"]["staked"]), staked, "{a}");
    assert_eq!(units(&a["stake"]["amount"]), staked, "{a}");
    let apy = a["node"]["pool"]["expected_apy"].as_f64().unwrap();
    let want = income as f64 * 365.0 / 7.0 / staked as f64;
    assert!(apy > 0.0, "{a}");
    assert!((apy - want).abs() < 2e-6, "APY {apy}, expected {want}: {a}");
    n.kill();

    // Without a chain: 404 no_chain.
    let dir2 = tmp();
    let n = nexus_with(dir2.path(), "127.0.0.1:0", &["--no-chain"]);
    for path in [
        format!("/lattice/v1/chain/accounts/{node_address}"),
        "/lattice/v1/chain/nodes".into(),
        "/lattice/v1/account/chain".into(),
    ] {
        let (s, v) = get_status(&format!("{}{path}", n.url)).await;
        assert_eq!(s, 404, "{path}: {v}");
        assert_eq!(v["error"]["code"], "no_chain", "{path}: {v}");
    }
}

/// Anvil's dev accounts are unlocked: `eth_sendTransaction` from one is what a browser wallet
/// does. Returns the transaction hash after checking the receipt succeeded.
async fn send_tx(rpc: &str, from: &str, to: &str, data: &str) -> String {
    let c = reqwest::Client::new();
    let r: Value = c
        .post(rpc)
        .json(
            &json!({"jsonrpc": "2.0", "id": 1, "method": "eth_sendTransaction",
            "params": [{"from": from, "to": to, "data": data}]}),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let hash = r["result"]
        .as_str()
        .unwrap_or_else(|| panic!("eth_sendTransaction: {r}"))
        .to_owned();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let receipt: Value = c
            .post(rpc)
            .json(
                &json!({"jsonrpc": "2.0", "id": 1, "method": "eth_getTransactionReceipt",
                "params": [hash]}),
            )
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if !receipt["result"].is_null() {
            assert_eq!(receipt["result"]["status"], "0x1", "{receipt}");
            return hash;
        }
        assert!(Instant::now() < deadline, "{hash} was never mined");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A wallet stakes with exactly the two transactions `/lattice/v1/chain/calls/stake` builds, on
/// a real anvil, and the pool and the staker's position show it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wallet_stakes_with_the_calls_nexus_builds() {
    const OPERATOR: &str = "0xf39fd6e51aad88f6f4ce6ab8827279cfffb92266"; // anvil #0 (ANVIL_KEY)
    const WALLET: &str = "0x70997970c51812dc3a010c7d01b50e0d17dc79c8"; // anvil #1
    const NODE: &str = "0x00000000000000000000000000000000000000a1";
    let dir = tmp();
    let (_anvil, rpc) = anvil().await;
    let key_file = dir.path().join("anvil.key");
    std::fs::write(&key_file, ANVIL_KEY).unwrap();
    let key_path = key_file.to_str().unwrap().to_owned();
    let n = nexus_with(
        dir.path(),
        "127.0.0.1:0",
        &[
            "--settle-interval",
            "1",
            "--chain-rpc",
            &rpc,
            "--chain-key-file",
            &key_path,
        ],
    );
    // Nexus's first pass (the starter-credit grant) sends from the operator key: let it finish.
    wait_settled(&n.url, 0).await;
    let before = get(&format!("{}/lattice/v1/chain/accounts/{NODE}", n.url)).await;
    assert_eq!(before["chain"]["kind"], "rpc", "{before}");
    assert_eq!(
        before["node"],
        Value::Null,
        "neither registered nor staked: {before}"
    );

    // The wallet gets 10 LAI: the operator mints it (mint(address,uint256) = 0x40c10f19).
    let amount: u128 = 10 * 10u128.pow(18);
    let token = before["chain"]["token"].as_str().unwrap().to_owned();
    let mint = format!(
        "0x40c10f19{:0>64}{amount:064x}",
        WALLET.trim_start_matches("0x")
    );
    send_tx(&rpc, OPERATOR, &token, &mint).await;
    let w = get(&format!("{}/lattice/v1/chain/accounts/{WALLET}", n.url)).await;
    assert_eq!(units(&w["wallet"]), amount, "{w}");

    let calls = get(&format!(
        "{}/lattice/v1/chain/calls/stake?to={NODE}&amount={amount}",
        n.url
    ))
    .await;
    assert_eq!(calls["kind"], "rpc");
    for t in calls["transactions"].as_array().unwrap() {
        send_tx(
            &rpc,
            WALLET,
            t["to"].as_str().unwrap(),
            t["data"].as_str().unwrap(),
        )
        .await;
    }
    let a = get(&format!(
        "{}/lattice/v1/chain/accounts/{NODE}?staker={WALLET}",
        n.url
    ))
    .await;
    assert_eq!(units(&a["stake"]["amount"]), amount, "{a}");
    assert_eq!(a["stake"]["pending_reward"], "0", "{a}");
    assert_eq!(a["node"]["registered"], false, "{a}");
    assert_eq!(units(&a["node"]["pool"]["staked"]), amount, "{a}");
    assert_eq!(
        a["node"]["pool"]["expected_apy"].as_f64(),
        Some(0.0),
        "staked, but the address earned nothing in 7 days: {a}"
    );
    let w = get(&format!("{}/lattice/v1/chain/accounts/{WALLET}", n.url)).await;
    assert_eq!(w["wallet"], "0", "the wallet's LAI is in the pool now: {w}");
}

const LAI: u128 = 1_000_000_000_000_000_000;

/// The starter-credit grant batch is confirmed and nothing else is pending.
async fn wait_granted(nexus: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let c = chain_state(nexus).await;
        let granted = c["batches"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["kind"] == "grant" && b["confirmed"] == true);
        if granted && c["pending_batches"] == 0 {
            return c;
        }
        assert!(Instant::now() < deadline, "the grant never settled: {c}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn my_withdrawals(nexus: &str) -> Vec<Value> {
    get(&format!("{nexus}/lattice/v1/account/withdrawals")).await["data"]
        .as_array()
        .unwrap()
        .clone()
}

/// Waits until withdrawal `id` is confirmed on-chain; returns it.
async fn wait_confirmed(nexus: &str, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let list = my_withdrawals(nexus).await;
        let w = list.iter().find(|w| w["id"] == id).cloned();
        if let Some(w) = &w
            && w["status"] == "confirmed"
        {
            return w.clone();
        }
        assert!(
            Instant::now() < deadline,
            "withdrawal {id} never confirmed: {list:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wallet_of(nexus: &str, address: &str) -> (u128, u128) {
    let a = get(&format!("{nexus}/lattice/v1/chain/accounts/{address}")).await;
    (units(&a["wallet"]), units(&a["custody"]))
}

/// POSTs a withdrawal without panicking when the connection drops (a Nexus that aborts).
async fn try_withdraw(nexus: &str, body: Value) -> Option<(u16, Value)> {
    let url = format!("{nexus}/lattice/v1/account/withdrawals");
    let r = reqwest::Client::new()
        .post(&url)
        .bearer_auth(key_for(&url))
        .json(&body)
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .ok()?;
    let s = r.status().as_u16();
    Some((s, r.json().await.unwrap_or(Value::Null)))
}

/// Waits until a Nexus started with a fault injected has aborted.
fn wait_aborted(n: &mut Proc) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while n.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "Nexus did not abort");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Withdrawals end to end on the embedded chain: the off-chain balance drops at once, the
/// settler releases the LAI from custody to the destination wallet, reconciliation finds no
/// difference; a withdrawal beyond the credit is a 402 that changes nothing; bad input is a 400;
/// and a withdrawal survives Nexus dying between its debit and its batch being sent, and
/// between its row being recorded and its debit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn withdrawals_reach_the_wallet_and_survive_restarts() {
    let dir = tmp();
    let listen = format!("127.0.0.1:{}", free_port());
    let extra = ["--settle-interval", "1"];
    let n = nexus_with(dir.path(), &listen, &extra);
    let url = n.url.clone();
    let withdrawals = format!("{url}/lattice/v1/account/withdrawals");
    // The operator's 1,000 LAI of starter credit (a faucet op) is minted into custody first.
    wait_granted(&url).await;
    let me = get(&format!("{url}/lattice/v1/account")).await["user"]["address"]
        .as_str()
        .unwrap()
        .to_lowercase();
    let before = available(&url).await;
    assert_eq!(my_withdrawals(&url).await, Vec::<Value>::new());

    // Bad input: 400s in OpenAI's envelope naming the parameter, and nothing is debited.
    let chain = chain_state(&url).await;
    let users_contract = chain["deployment"]["users"].as_str().unwrap().to_owned();
    for (body, param) in [
        (json!({"amount": 5}), "amount"),
        (json!({"amount": "0"}), "amount"),
        (json!({"amount": "-1"}), "amount"),
        (json!({"amount": "1.5"}), "amount"),
        (json!({"amount": "1000"}), "amount"), // below the 0.01 LAI minimum
        (
            json!({"amount": "1000000000000000000", "to": "0x1234"}),
            "to",
        ),
        (
            json!({"amount": "1000000000000000000", "to": "0x0000000000000000000000000000000000000000"}),
            "to",
        ),
        (
            json!({"amount": "1000000000000000000", "to": users_contract}),
            "to",
        ),
    ] {
        let (s, v) = post(&withdrawals, body.clone()).await;
        assert_eq!(s, 400, "{body}: {v}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        assert_eq!(v["error"]["param"], param, "{body}: {v}");
    }
    assert_eq!(available(&url).await, before);

    // Withdraw 3 LAI to a fresh address: debited at once, then confirmed on-chain.
    let dest = "0x00000000000000000000000000000000000000d1";
    assert_eq!(wallet_of(&url, dest).await, (0, 0));
    let amount = 3 * LAI;
    let (s, v) = post(
        &withdrawals,
        json!({"amount": amount.to_string(), "to": dest}),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["withdrawal"]["status"], "debited", "{v}");
    assert_eq!(v["withdrawal"]["to"], dest, "{v}");
    assert_eq!(units(&v["balance"]["available"]), before - amount, "{v}");
    assert_eq!(available(&url).await, before - amount);
    let id = v["withdrawal"]["id"].as_str().unwrap().to_owned();
    let w = wait_confirmed(&url, &id).await;
    assert!(w["tx_hash"].as_str().unwrap().starts_with("0x"), "{w}");
    assert_eq!(
        wallet_of(&url, dest).await,
        (amount, 0),
        "the LAI is in the wallet"
    );
    let batch = chain_state(&url).await["batches"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["kind"] == "withdraw")
        .cloned()
        .unwrap();
    assert_eq!(batch["entries"][0]["to"], dest, "{batch}");
    assert_eq!(units(&batch["total"]), amount, "{batch}");
    assert_eq!(batch["tx_hash"], w["tx_hash"], "{batch}");
    let mine = get(&format!("{url}/lattice/v1/account/chain")).await;
    assert_eq!(mine["in_sync"], true, "{mine}");
    assert_eq!(units(&mine["position"]["withdrawn"]), amount, "{mine}");
    assert_eq!(mine["position"]["withdrawing"], "0", "{mine}");
    assert_eq!(
        units(&mine["on_chain"]["custody"]),
        units(&mine["off_chain"]["available"]),
        "custody = credit once the withdrawal is on-chain: {mine}"
    );

    // More than the credit: 402, nothing moves, the request is listed as rejected.
    let left = available(&url).await;
    let (s, v) = post(
        &withdrawals,
        json!({"amount": (left + 1).to_string(), "to": dest}),
    )
    .await;
    assert_eq!(s, 402, "{v}");
    assert_eq!(v["error"]["code"], "insufficient_credits", "{v}");
    assert_eq!(v["error"]["type"], "insufficient_quota", "{v}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(available(&url).await, left);
    assert_eq!(wallet_of(&url, dest).await, (amount, 0));
    let list = my_withdrawals(&url).await;
    assert_eq!(list.len(), 2, "{list:?}");
    assert_eq!(list[0]["status"], "rejected", "{list:?}");
    assert_eq!(list[0]["tx_hash"], Value::Null, "{list:?}");
    assert_eq!(chain_state(&url).await["pending_batches"], 0);

    // Without `to`, the account's own address: custody turns into LAI in its own wallet.
    let (_, custody_before) = wallet_of(&url, &me).await;
    let (s, v) = post(&withdrawals, json!({"amount": LAI.to_string()})).await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["withdrawal"]["to"], me.as_str(), "{v}");
    wait_confirmed(&url, v["withdrawal"]["id"].as_str().unwrap()).await;
    assert_eq!(wallet_of(&url, &me).await, (LAI, custody_before - LAI));
    n.kill();

    // Nexus dies right after recording the withdrawal batch (after the debit, before sending).
    let dest2 = "0x00000000000000000000000000000000000000d2";
    let mut n = nexus_env(
        dir.path(),
        &listen,
        &extra,
        &[("LATTICE_FAULT_SETTLE_ABORT", "1")],
    );
    let left = available(&url).await;
    let answer = try_withdraw(&url, json!({"amount": (2 * LAI).to_string(), "to": dest2})).await;
    if let Some((s, v)) = &answer {
        assert_eq!(*s, 201, "{v}");
    }
    wait_aborted(&mut n);
    let n = nexus_with(dir.path(), &listen, &extra);
    assert_eq!(available(&url).await, left - 2 * LAI, "debited once");
    let w = my_withdrawals(&url)
        .await
        .into_iter()
        .find(|w| w["to"] == dest2)
        .unwrap();
    wait_confirmed(&url, w["id"].as_str().unwrap()).await;
    assert_eq!(wallet_of(&url, dest2).await, (2 * LAI, 0));
    assert_eq!(available(&url).await, left - 2 * LAI, "still debited once");
    n.kill();

    // Nexus dies between recording the withdrawal and posting its debit: the row is left
    // `requested`; the restarted settler posts the debit and sends it.
    let dest3 = "0x00000000000000000000000000000000000000d3";
    let mut n = nexus_env(
        dir.path(),
        &listen,
        &extra,
        &[("LATTICE_FAULT_WITHDRAW_ABORT", "1")],
    );
    let left = available(&url).await;
    assert!(
        try_withdraw(&url, json!({"amount": LAI.to_string(), "to": dest3}))
            .await
            .is_none(),
        "Nexus aborted before answering"
    );
    wait_aborted(&mut n);
    let n = nexus_with(dir.path(), &listen, &extra);
    let w = my_withdrawals(&url)
        .await
        .into_iter()
        .find(|w| w["to"] == dest3)
        .unwrap();
    wait_confirmed(&url, w["id"].as_str().unwrap()).await;
    assert_eq!(
        available(&url).await,
        left - LAI,
        "debited once, after the restart"
    );
    assert_eq!(wallet_of(&url, dest3).await, (LAI, 0));
    n.kill();

    // Ledger and chain agree to the unit, withdrawals included.
    let r = reconcile(dir.path(), &[]);
    assert!(r["checked"].as_u64().unwrap() >= 1, "{r}");
}

/// This package's directory, read when the test runs (cargo and nextest set it): a test binary
/// reused from a build in another checkout must not look in that checkout.
fn manifest_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), Into::into)
}
