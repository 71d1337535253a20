//! Pre-registered node tokens over real processes: `lattice nexus --require-node-token` and
//! `lattice node --token` with a real model. A node without a token never registers; with a
//! valid token it registers and is bound to the token's user; the same token from a second node
//! key is refused; a revoked token's node is disconnected and refused when it reconnects.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod common;
use common::*;

/// The node's address, from a key created before the node starts.
fn node_key(dir: &std::path::Path, name: &str) -> (std::path::PathBuf, String) {
    let path = key(dir, name);
    let k = lattice_link::NodeKey::load_or_create(&path).unwrap();
    (path, k.address().to_lowercase())
}

async fn online(nexus: &str) -> Vec<Value> {
    nodes(nexus).await["online"].as_array().cloned().unwrap()
}

async fn my_nodes(nexus: &str) -> Vec<Value> {
    get(&format!("{nexus}/lattice/v1/account/nodes")).await["data"]
        .as_array()
        .cloned()
        .unwrap()
}

/// Waits until the user's node `address` has `status`; returns its row.
async fn wait_status(nexus: &str, address: &str, status: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mine = my_nodes(nexus).await;
        if let Some(n) = mine.iter().find(|n| n["address"] == address)
            && n["status"] == status
        {
            return n.clone();
        }
        assert!(
            Instant::now() < deadline,
            "node {address} never became {status}: {mine:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn create_token(nexus: &str, label: &str) -> (String, String) {
    let (s, t) = post(
        &format!("{nexus}/lattice/v1/account/node-tokens"),
        json!({"label": label}),
    )
    .await;
    assert_eq!(s, 201, "{t}");
    let secret = t["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("lnt_") && secret.len() == 47, "{secret}");
    assert_eq!(t["label"], label);
    assert_eq!(t["node_address"], Value::Null, "not bound before first use");
    (t["id"].as_str().unwrap().to_owned(), secret)
}

async fn tokens(nexus: &str) -> Vec<Value> {
    get(&format!("{nexus}/lattice/v1/account/node-tokens")).await["data"]
        .as_array()
        .cloned()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_node_token_binds_nodes_to_their_operator_and_refuses_the_rest() {
    let dir = tmp();
    let (nexus, nexus_log) = nexus_logged(dir.path(), "127.0.0.1:0", &["--require-node-token"]);
    let url = nexus.url.clone();
    let me = get(&format!("{url}/lattice/v1/account")).await;
    let my_address = me["user"]["address"].as_str().unwrap().to_lowercase();

    // No token: refused at registration, never online, never recorded as a known node.
    let (a_key, a_addr) = node_key(dir.path(), "a");
    let (a, a_log) = spawn_logged(&node_args(&url, CHAT, &a_key, "1"), &[]);
    a_log
        .wait_for("this Nexus requires a node token", Duration::from_secs(60))
        .await;
    nexus_log
        .wait_for(
            &format!("node {a_addr}: this Nexus requires a node token"),
            Duration::from_secs(10),
        )
        .await;
    // It keeps retrying (backoff) and keeps being refused.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = nodes(&url).await;
    assert_eq!(status["online"], json!([]), "{status}");
    assert_eq!(
        status["known"],
        json!([]),
        "a refused node is not recorded: {status}"
    );
    a.kill();

    // A valid token: the node registers, is bound to the token and owned by this user.
    let (token_id, secret) = create_token(&url, "rack 1").await;
    let (b_key, b_addr) = node_key(dir.path(), "b");
    let mut b_args = node_args(&url, CHAT, &b_key, "1");
    b_args.extend(["--label", "tokened"]);
    // Through the environment, as the docs suggest for scripts (`--token` works the same).
    let (b, b_log) = spawn_logged(&b_args, &[("LATTICE_NODE_TOKEN", &secret)]);
    let calibrating_or_healthy = {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mine = my_nodes(&url).await;
            // Bound (and listed, offline) during the handshake, just before it is linked.
            if let Some(n) = mine
                .iter()
                .find(|n| n["address"] == b_addr.as_str() && n["status"] != "offline")
            {
                break n.clone();
            }
            assert!(
                Instant::now() < deadline,
                "node b never appeared online: {mine:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    assert!(
        ["calibrating", "healthy"].contains(&calibrating_or_healthy["status"].as_str().unwrap()),
        "{calibrating_or_healthy}"
    );
    assert_eq!(calibrating_or_healthy["token_live"], true);
    let healthy = wait_status(&url, &b_addr, "healthy").await;
    assert_eq!(healthy["label"], "tokened");
    let on = online(&url).await;
    assert_eq!(on.len(), 1, "{on:?}");
    assert_eq!(on[0]["address"], b_addr.as_str());
    assert_eq!(
        on[0]["owner"],
        my_address.as_str(),
        "the node's owner is shown"
    );
    let known = nodes(&url).await["known"].clone();
    assert_eq!(known[0]["owner"], my_address.as_str(), "{known}");
    let listed = tokens(&url).await;
    let t = listed
        .iter()
        .find(|t| t["id"] == token_id.as_str())
        .unwrap();
    assert_eq!(t["node_address"], b_addr.as_str(), "bound on first use");
    assert_eq!(t["online"], true);
    assert!(t["bound_at"].as_i64().unwrap() > 0);
    assert!(t.get("secret").is_none(), "the secret is shown once: {t}");
    assert!(!t.to_string().contains(&secret));

    // It earns: a paid request shows up in the operator's node list as the ledger's balance.
    let (s, v) = post(
        &format!("{url}/v1/chat/completions"),
        chat("Say hi.", json!({})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let earnings = get(&format!("{url}/lattice/v1/nodes/{b_addr}/earnings")).await;
    let earned: u128 = earnings["earned"].as_str().unwrap().parse().unwrap();
    assert!(earned > 0, "{earnings}");
    let row = wait_status(&url, &b_addr, "healthy").await;
    assert_eq!(row["earned"], earnings["earned"]);
    assert_eq!(row["staking_pool"], earnings["staking_pool"]);
    // The embedded chain's operator sponsored the node's stake when it registered.
    let chain = get(&format!("{url}/lattice/v1/chain/accounts/{b_addr}")).await;
    assert_eq!(row["stake"]["stake"], chain["node"]["stake"], "{row}");
    assert_eq!(row["stake"]["active"], true, "{row}");
    assert_ne!(row["stake"]["stake"], "0");

    // The same token from another node key is refused, with the reason logged on both sides.
    let (c_key, c_addr) = node_key(dir.path(), "c");
    let mut c_args = node_args(&url, CHAT, &c_key, "1");
    c_args.extend(["--token", &secret]);
    let (c, c_log) = spawn_logged(&c_args, &[]);
    c_log
        .wait_for(
            &format!("node token refused: this node token is bound to another node ({b_addr})"),
            Duration::from_secs(60),
        )
        .await;
    nexus_log
        .wait_for(
            &format!("node {c_addr}: node token refused"),
            Duration::from_secs(10),
        )
        .await;
    let on = online(&url).await;
    assert_eq!(on.len(), 1, "only the bound node is online: {on:?}");
    assert_eq!(on[0]["address"], b_addr.as_str());
    c.kill();

    // An unknown token is refused too.
    let (d_key, _) = node_key(dir.path(), "d");
    let bogus = format!("lnt_{}", "A".repeat(43));
    let mut d_args = node_args(&url, CHAT, &d_key, "1");
    d_args.extend(["--token", &bogus]);
    let (d, d_log) = spawn_logged(&d_args, &[]);
    d_log
        .wait_for(
            "node token refused: unknown node token",
            Duration::from_secs(60),
        )
        .await;
    d.kill();

    // Revoked: the node's link is ended at once, and it is refused when it reconnects.
    let r = reqwest::Client::new()
        .delete(format!("{url}/lattice/v1/account/node-tokens/{token_id}"))
        .bearer_auth(key_for(&url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["node_address"], b_addr.as_str());
    assert_eq!(v["disconnected"], true, "{v}");
    b_log
        .wait_for(
            "node token refused: this node token was revoked",
            Duration::from_secs(30),
        )
        .await;
    nexus_log
        .wait_for("its node token was revoked", Duration::from_secs(10))
        .await;
    let row = wait_status(&url, &b_addr, "offline").await;
    assert_eq!(row["token_live"], false);
    assert_eq!(
        row["earned"], earnings["earned"],
        "its earnings stay listed"
    );
    assert_eq!(online(&url).await, Vec::<Value>::new());
    // Revoking twice is a 404; the listing shows when it was revoked.
    let again = reqwest::Client::new()
        .delete(format!("{url}/lattice/v1/account/node-tokens/{token_id}"))
        .bearer_auth(key_for(&url))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 404);
    let t = tokens(&url).await;
    assert!(t[0]["revoked_at"].as_i64().unwrap() > 0, "{t:?}");
    // Still refused after a while (the node keeps retrying).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(online(&url).await, Vec::<Value>::new());
    b.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_require_node_token_tokens_are_optional_but_a_bad_one_is_refused() {
    let dir = tmp();
    let nexus = nexus_at(dir.path(), "127.0.0.1:0");
    let url = nexus.url.clone();
    // A node with a token nobody issued is refused even though tokens are optional…
    let (bad_key, _) = node_key(dir.path(), "bad");
    let bogus = format!("lnt_{}", "B".repeat(43));
    let mut args = node_args(&url, CHAT, &bad_key, "1");
    args.extend(["--token", &bogus]);
    let (bad, bad_log) = spawn_logged(&args, &[]);
    bad_log
        .wait_for(
            "node token refused: unknown node token",
            Duration::from_secs(60),
        )
        .await;
    bad.kill();
    // …and one without a token joins as before, with no owner.
    let (k, addr) = node_key(dir.path(), "plain");
    let _n = node(&url, CHAT, &k, "1");
    wait_for_models(&url, &[(CHAT, 1)]).await;
    let on = online(&url).await;
    assert_eq!(on.len(), 1);
    assert_eq!(on[0]["address"], addr.as_str());
    assert_eq!(on[0]["owner"], Value::Null);
    assert_eq!(
        my_nodes(&url).await,
        Vec::<Value>::new(),
        "not the operator's node"
    );
    // Limits: a label is at most 64 bytes; a malformed body is a 400.
    let (s, v) = post(
        &format!("{url}/lattice/v1/account/node-tokens"),
        json!({"label": "x".repeat(65)}),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    // Signed out: 401.
    let r = reqwest::Client::new()
        .post(format!("{url}/lattice/v1/account/node-tokens"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}
