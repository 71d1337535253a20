//! Multi-process tests of a real network on loopback: `lattice nexus` and `lattice node`
//! processes with real models, driven over HTTP. Each test builds its own network.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};

mod common;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_each_model_to_its_node() {
    let dir = tmp();
    let nexus = nexus_at(dir.path(), "127.0.0.1:0");
    let _a = node(&nexus.url, CHAT, &key(dir.path(), "a"), "2");
    let _b = node(&nexus.url, TEXT, &key(dir.path(), "b"), "2");
    wait_for_models(&nexus.url, &[(CHAT, 1), (TEXT, 1)]).await;

    let (s, v) = post(
        &format!("{}/v1/chat/completions", nexus.url),
        chat("Which city is the capital of France?", json!({})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert!(
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .contains("Paris"),
        "{v}"
    );
    let (s, v) = post(
        &format!("{}/v1/completions", nexus.url),
        json!({"model": TEXT, "prompt": "1, 2, 3, 4, 5,", "max_tokens": 6, "temperature": 0}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert!(
        v["choices"][0]["text"]
            .as_str()
            .unwrap()
            .starts_with(" 6, 7"),
        "{v}"
    );
    // The node's own error comes back as is (no failover for the caller's mistakes).
    let (s, v) = post(
        &format!("{}/v1/chat/completions", nexus.url),
        json!({"model": TEXT, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/v1/completions"),
        "{v}"
    );
    let (s, v) = post(
        &format!("{}/v1/chat/completions", nexus.url),
        json!({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (404, Some("model_not_found"))
    );

    let status = nodes(&nexus.url).await;
    let served: Vec<u64> = status["online"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["served"].as_u64().unwrap())
        .collect();
    assert_eq!(served.len(), 2);
    assert!(served.iter().all(|&s| s >= 1), "{status}");
    let mut quantizations: Vec<&str> = status["online"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["models"][0]["quantization"].as_str().unwrap_or("none"))
        .collect();
    quantizations.sort_unstable();
    // From the GGUF files' names (SmolLM2-135M-Instruct.Q4_1.gguf, gemma-3-270m-q4_k_m.gguf).
    assert_eq!(quantizations, ["Q4_1", "Q4_K_M"], "{status}");
    // Heartbeats (every 2 s) report the tokens the nodes just finished.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut recent = 0.0;
    while recent == 0.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        recent = nodes(&nexus.url).await["online"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["recent_tps"].as_f64().unwrap())
            .sum();
    }
    assert!(recent > 0.0, "no heartbeat reported the tokens served");
    let (ok, out) = run(&["status", "--nexus", &nexus.url]);
    assert!(ok, "{out}");
    for want in [CHAT, TEXT, "now t/s", "queue", "2 node(s) in the registry"] {
        assert!(out.contains(want), "`lattice status` lacks {want}:\n{out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_spreads_across_nodes_of_one_model() {
    let dir = tmp();
    let nexus = nexus_at(dir.path(), "127.0.0.1:0");
    let _a = node(&nexus.url, CHAT, &key(dir.path(), "a"), "2");
    let _b = node(&nexus.url, CHAT, &key(dir.path(), "b"), "2");
    wait_for_models(&nexus.url, &[(CHAT, 2)]).await;
    let before: u64 = nodes(&nexus.url).await["online"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["served"].as_u64().unwrap())
        .sum();

    let url = format!("{}/v1/chat/completions", nexus.url);
    let reqs = (0..8).map(|i| {
        post(
            &url,
            chat(
                &format!("Tell me about the number {i}."),
                json!({"max_tokens": 12, "ignore_eos": true}),
            ),
        )
    });
    for (s, v) in futures::future::join_all(reqs).await {
        assert_eq!(s, 200, "{v}");
    }
    let status = nodes(&nexus.url).await;
    let served: Vec<u64> = status["online"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["served"].as_u64().unwrap())
        .collect();
    assert_eq!(served.iter().sum::<u64>() - before, 8);
    assert!(
        served.iter().all(|&s| s >= 3),
        "8 concurrent requests over 2 equal nodes: {served:?}"
    );
}

/// Reads an SSE response to its end; returns (saw [DONE], saw an error event).
async fn read_sse(resp: reqwest::Response) -> (bool, bool) {
    let mut body = resp.bytes_stream();
    let mut text = String::new();
    while let Some(Ok(chunk)) = body.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    (
        text.contains("data: [DONE]"),
        text.contains(r#"data: {"error""#),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_node_mid_load_retries_waiting_requests_and_errors_live_streams() {
    let dir = tmp();
    let nexus = nexus_at(dir.path(), "127.0.0.1:0");
    let a = node(&nexus.url, CHAT, &key(dir.path(), "a"), "1");
    let b = node(&nexus.url, CHAT, &key(dir.path(), "b"), "1");
    let address_of = |name: &str| {
        lattice_link::NodeKey::load_or_create(&key(dir.path(), name))
            .unwrap()
            .address()
            .to_lowercase()
    };
    wait_for_models(&nexus.url, &[(CHAT, 2)]).await;
    let url = format!("{}/v1/chat/completions", nexus.url);
    let client = reqwest::Client::new();

    // Two long streams, both under way. Routing usually spreads them one per node, but not
    // always (both can land on one node, the second queued behind the first), so the node
    // killed is the one serving the first stream, named by `x-lattice-node`.
    let mut streams = Vec::new();
    let mut serving = Vec::new();
    for i in 0..2 {
        let body = chat(
            &format!("Write a long story number {i}."),
            json!({"stream": true, "max_tokens": 300, "ignore_eos": true}),
        );
        let mut r = client
            .post(&url)
            .bearer_auth(key_for(&url))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        serving.push(
            r.headers()
                .get("x-lattice-node")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_lowercase(),
        );
        let first = r.chunk().await.unwrap();
        assert!(first.is_some());
        streams.push(r);
    }
    // Two more that wait behind the streams: no token yet when the node dies.
    let waiting: Vec<_> = (0..2)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move {
                post(
                    &url,
                    chat(&format!("Say hello {i}."), json!({"max_tokens": 8})),
                )
                .await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    if serving[0] == address_of("a") {
        a.kill();
    } else {
        assert_eq!(
            serving[0],
            address_of("b"),
            "the first stream names its node"
        );
        b.kill();
    }

    let outcome = tokio::time::timeout(Duration::from_secs(120), async {
        let mut ended = Vec::new();
        for r in streams {
            ended.push(read_sse(r).await);
        }
        let mut statuses = Vec::new();
        for w in waiting {
            statuses.push(w.await.unwrap().0);
        }
        (ended, statuses)
    })
    .await
    .expect("nothing may hang when a node dies");
    let (ended, statuses) = outcome;
    assert!(
        ended.contains(&(false, true)),
        "the stream on the dead node ends with an error event: {ended:?}"
    );
    assert!(
        ended.contains(&(true, false)),
        "the other stream completes (on the live node, or retried there if it was still queued \
         behind the first): {ended:?}"
    );
    assert_eq!(
        statuses,
        vec![200, 200],
        "requests without a first token are retried on the live node"
    );
    let status = nodes(&nexus.url).await;
    assert_eq!(
        status["online"].as_array().unwrap().len(),
        1,
        "link loss marks the node offline at once"
    );
    // Money: the stream cut off by the dead node was not charged, every hold was released, and
    // the balance is exactly the starting credit minus what the usage records say was charged.
    let usage = get(&format!("{}/lattice/v1/usage?group=model", nexus.url)).await;
    let rows = usage["data"].as_array().unwrap();
    let requests: u64 = rows.iter().map(|r| r["requests"].as_u64().unwrap()).sum();
    assert_eq!(
        requests, 3,
        "one finished stream + two retried requests are charged: {usage}"
    );
    let spent: u128 = rows
        .iter()
        .map(|r| r["cost"].as_str().unwrap().parse::<u128>().unwrap())
        .sum();
    assert!(spent > 0);
    let account = get(&format!("{}/lattice/v1/account", nexus.url)).await;
    assert_eq!(
        account["balance"]["held"], "0",
        "no hold left behind: {account}"
    );
    let available: u128 = account["balance"]["available"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(available, 1_000 * 10u128.pow(18) - spent);
}

/// A fake OpenAI-compatible engine that always answers "London" (fault injection).
async fn lying_upstream(
    hits: Arc<AtomicUsize>,
    seen: Arc<std::sync::Mutex<Vec<String>>>,
) -> String {
    use axum::routing::post;
    let sse = |text: &str| {
        format!(
            "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{text}\"}},\"text\":\"{text}\",\"finish_reason\":null}}]}}\n\n\
             data: {{\"choices\":[{{\"index\":0,\"delta\":{{}},\"text\":\"\",\"finish_reason\":\"stop\"}}]}}\n\n\
             data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":5,\"completion_tokens\":6,\"total_tokens\":11}}}}\n\ndata: [DONE]\n\n"
        )
    };
    let handler = move |body: axum::Json<Value>| {
        let hits = hits.clone();
        let seen = seen.clone();
        async move {
            hits.fetch_add(1, Ordering::SeqCst);
            seen.lock().unwrap().push(body.0.to_string());
            sse("The capital of France is London.")
        }
    };
    let app = axum::Router::new()
        .route("/v1/chat/completions", post(handler.clone()))
        .route("/v1/completions", post(handler));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/v1")
}

/// An upstream that answers at once, except a prompt containing `STALL`: one token, then
/// nothing, the connection held open (`released` counts stalled answers whose connection the
/// node closed); one containing `HUSH`: the same without the token; and one containing `SLOW`:
/// six tokens 250 ms apart, then the end.
async fn stalling_upstream(released: Arc<AtomicUsize>) -> String {
    use axum::routing::post;
    struct Released(Arc<AtomicUsize>);
    impl Drop for Released {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    const HEAD: &str = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"ok\"},\"text\":\"ok\",\"finish_reason\":null}]}\n\n";
    const TAIL: &str = "data: {\"choices\":[{\"index\":0,\"delta\":{},\"text\":\"\",\"finish_reason\":\"stop\"}]}\n\n\
                        data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":1,\"total_tokens\":6}}\n\ndata: [DONE]\n\n";
    let handler = move |body: axum::Json<Value>| {
        let released = released.clone();
        async move {
            let prompt = body.0.to_string();
            if prompt.contains("SLOW") {
                let tokens = futures::stream::unfold(0, |i| async move {
                    if i > 6 {
                        return None;
                    }
                    if i > 0 {
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                    let piece = if i < 6 { HEAD } else { TAIL };
                    Some((Ok::<_, std::io::Error>(piece), i + 1))
                });
                return axum::body::Body::from_stream(tokens);
            }
            if !prompt.contains("STALL") && !prompt.contains("HUSH") {
                return axum::body::Body::from(format!("{HEAD}{TAIL}"));
            }
            let guard = Released(released);
            let first = if prompt.contains("HUSH") { "" } else { HEAD };
            let head = futures::stream::once(async move { Ok::<_, std::io::Error>(first) });
            let never = futures::stream::unfold(guard, |g| async move {
                futures::future::pending::<()>().await;
                Some((Ok(""), g))
            });
            axum::body::Body::from_stream(head.chain(never))
        }
    };
    let app = axum::Router::new()
        .route("/v1/chat/completions", post(handler.clone()))
        .route("/v1/completions", post(handler));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/v1")
}

/// A node that stops sending mid-answer (its link alive) is cut off after `--stall-timeout`:
/// a stream ends with an error event after the tokens it had, a whole answer is a 502, the
/// node's work is cancelled (it closes its upstream request), nothing is charged or held, and
/// the failure is on the node's record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_stalls_mid_answer_is_cut_off_and_nothing_is_charged() {
    let released = Arc::new(AtomicUsize::new(0));
    let upstream = stalling_upstream(released.clone()).await;
    let dir = tmp();
    let nexus = nexus_with(
        dir.path(),
        "127.0.0.1:0",
        &[
            "--stall-timeout",
            "2",
            "--first-token-timeout",
            "3",
            "--faucet-lai",
            "1",
        ],
    );
    let _node = spawn(&[
        "node",
        "--nexus",
        &nexus.url,
        "--upstream",
        &upstream,
        "--model-id",
        "canned",
        "--port",
        "0",
        "--key",
        key(dir.path(), "n").to_str().unwrap(),
    ]);
    wait_for_models(&nexus.url, &[("canned", 1)]).await;
    let base = nexus.url.as_str();
    let (session, _) = siwe_sign_in(base).await;
    let start = balance(base, &session).await.0;
    // Waits until the node has closed this many held upstream requests and the balance is
    // `want`, nothing held.
    let closed_and_unmoved = async |closed_want: usize, want: u128| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (available, held) = balance(base, &session).await;
            let closed = released.load(Ordering::SeqCst);
            if closed == closed_want && held == 0 && available == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "closed {closed} of {closed_want} held upstream requests; available {available} (want {want}), held {held}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let url = format!("{base}/v1/chat/completions");
    let ask = |stream: bool| {
        json!({"model": "canned", "messages": [{"role": "user", "content": "STALL here"}],
               "max_tokens": 16, "stream": stream})
    };
    let resp = reqwest::Client::new()
        .post(&url)
        .bearer_auth(&session)
        .json(&ask(true))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = tokio::time::timeout(Duration::from_secs(30), resp.text())
        .await
        .expect("the stream ends instead of hanging")
        .unwrap();
    assert!(
        body.contains("\"ok\""),
        "the token before the stall: {body}"
    );
    assert!(body.contains("stalled"), "{body}");
    assert!(!body.contains("[DONE]"), "{body}");
    let (s, v) = tokio::time::timeout(
        Duration::from_secs(30),
        call(reqwest::Method::POST, &url, &session, Some(ask(false))),
    )
    .await
    .expect("the whole answer ends instead of hanging");
    assert_eq!(s, 502, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("stalled"),
        "{v}"
    );
    // Both stalled upstream requests are closed by the node, and nothing moved.
    closed_and_unmoved(2, start).await;
    let n = &nodes(base).await["online"][0];
    assert!(n["failed"].as_u64().unwrap() >= 2, "{n}");

    // Slow but steady (a token every 0.25 s, 1.75 s in all, against 2 s) is not a stall.
    let slow = json!({"model": "canned", "messages": [{"role": "user", "content": "SLOW here"}],
                      "max_tokens": 16});
    let (s, v) = call(reqwest::Method::POST, &url, &session, Some(slow)).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], "ok".repeat(6), "{v}");

    // A node that never sends a first token fails the request at `--first-token-timeout` (3 s,
    // against the default 60), with its work cancelled and nothing charged.
    let paid = async || loop {
        let (available, held) = balance(base, &session).await;
        if held == 0 && available < start {
            return available;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let start = tokio::time::timeout(Duration::from_secs(20), paid())
        .await
        .expect("the slow answer is charged");
    let hush = json!({"model": "canned", "messages": [{"role": "user", "content": "HUSH here"}],
                      "max_tokens": 16});
    let (s, v) = tokio::time::timeout(
        Duration::from_secs(30),
        call(reqwest::Method::POST, &url, &session, Some(hush)),
    )
    .await
    .expect("the request fails at the first-token deadline instead of waiting 60 s");
    assert!(s >= 500, "{s}: {v}");
    closed_and_unmoved(3, start).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_answering_the_canary_wrongly_never_gets_traffic() {
    let dir = tmp();
    let hits = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let liar_url = lying_upstream(hits.clone(), seen.clone()).await;
    let nexus = nexus_at(dir.path(), "127.0.0.1:0");
    let liar_key = key(dir.path(), "liar");
    let _liar = spawn(&[
        "node",
        "--nexus",
        &nexus.url,
        "--upstream",
        &liar_url,
        "--model-id",
        CHAT,
        "--port",
        "0",
        "--key",
        liar_key.to_str().unwrap(),
    ]);
    let _honest = node(&nexus.url, CHAT, &key(dir.path(), "honest"), "2");
    wait_for_models(&nexus.url, &[(CHAT, 1)]).await;
    // Give the liar time to be probed (and fail) a few times.
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen
        .lock()
        .unwrap()
        .iter()
        .filter(|b| b.contains("capital of France"))
        .count()
        < 2
    {
        assert!(Instant::now() < deadline, "the liar was never probed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let url = format!("{}/v1/chat/completions", nexus.url);
    for i in 0..6 {
        let (s, v) = post(
            &url,
            chat(
                &format!("User question {i}: say hi."),
                json!({"max_tokens": 6}),
            ),
        )
        .await;
        assert_eq!(s, 200, "{v}");
    }
    let user_hits = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|b| b.contains("User question"))
        .count();
    assert_eq!(
        user_hits, 0,
        "user traffic reached the node that fails its canary"
    );
    let status = nodes(&nexus.url).await;
    let liar = status["online"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["served"] == 0 && n["models"][0]["admitted"] == false);
    assert!(liar.is_some(), "the liar stays unadmitted: {status}");
    let rep = liar.unwrap()["reputation"].as_f64().unwrap();
    assert!(rep < 0.45, "wrong canaries lower reputation: {rep}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nexus_restart_nodes_reconnect_and_state_survives() {
    let dir = tmp();
    let nexus = nexus_at(dir.path(), "127.0.0.1:0");
    let listen = nexus.url.trim_start_matches("http://").to_owned();
    let _n = node(&nexus.url, CHAT, &key(dir.path(), "a"), "2");
    wait_for_models(&nexus.url, &[(CHAT, 1)]).await;
    let (s, _) = post(
        &format!("{}/v1/chat/completions", nexus.url),
        chat("Say hi.", json!({})),
    )
    .await;
    assert_eq!(s, 200);
    // Wait for a probe to persist the node's reputation.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = nodes(&nexus.url).await;
    let address = before["online"][0]["address"].as_str().unwrap().to_owned();
    let stored = before["known"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["address"] == address.as_str())
        .unwrap()["reputation"]
        .as_f64()
        .unwrap();
    assert!(
        stored > 0.5,
        "a good node's stored reputation rose: {stored}"
    );
    nexus.kill();

    let nexus = nexus_at(dir.path(), &listen);
    let known = nodes(&nexus.url).await;
    assert!(
        known["known"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["address"] == address.as_str()),
        "registry survives: {known}"
    );
    wait_for_models(&nexus.url, &[(CHAT, 1)]).await;
    let (s, v) = post(
        &format!("{}/v1/chat/completions", nexus.url),
        chat("Which city is the capital of France?", json!({})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let after = nodes(&nexus.url).await;
    let rep = after["online"][0]["reputation"].as_f64().unwrap();
    assert!(
        rep >= stored - 0.1,
        "reputation restored from the database: {rep} vs stored {stored}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_disconnect_through_nexus_frees_the_nodes_slot() {
    let dir = tmp();
    let nexus = nexus_at(dir.path(), "127.0.0.1:0");
    let n = node(&nexus.url, CHAT, &key(dir.path(), "a"), "1");
    wait_for_models(&nexus.url, &[(CHAT, 1)]).await;
    let body = chat(
        "Write a very long essay.",
        json!({"stream": true, "max_tokens": 900, "ignore_eos": true}),
    );
    let mut r = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", nexus.url))
        .bearer_auth(key_for(&nexus.url))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(r.chunk().await.unwrap().is_some());
    let busy = || async {
        reqwest::get(format!("{}/health", n.url))
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()["busy_slots"]
            .clone()
    };
    assert_eq!(busy().await, 1, "the node is generating");
    drop(r);
    // 900 tokens take many seconds; the slot must be free long before that.
    let deadline = Instant::now() + Duration::from_secs(5);
    while busy().await != 0 {
        assert!(
            Instant::now() < deadline,
            "Nexus did not cancel the node's work"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A client that leaves while its request waits for a node's slot (before any token) cancels
/// it: the node's queue empties while the request ahead of it still runs, and Nexus's count
/// of the node's requests in flight comes back down (it had stayed up for good).
#[tokio::test]
async fn a_client_leaving_before_the_first_token_cancels_its_queued_request() {
    let dir = tmp();
    // No periodic probes after calibration: only this test's requests use the node's one slot.
    let nexus = nexus_with(dir.path(), "127.0.0.1:0", &["--probe-interval", "3600"]);
    let n = node(&nexus.url, CHAT, &key(dir.path(), "a"), "1");
    wait_for_models(&nexus.url, &[(CHAT, 1)]).await;
    let url = format!("{}/v1/chat/completions", nexus.url);
    let body = chat(
        "Write a very long essay.",
        json!({"stream": true, "max_tokens": 900, "ignore_eos": true}),
    );
    let client = reqwest::Client::new();
    let send = || {
        client
            .post(&url)
            .bearer_auth(key_for(&url))
            .json(&body)
            .send()
    };
    let mut ahead = send().await.unwrap();
    assert!(ahead.chunk().await.unwrap().is_some());
    let node_load = || async {
        let v: Value = reqwest::get(format!("{}/health", n.url))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        (v["busy_slots"].as_u64(), v["queued"].as_u64())
    };
    let inflight = || async {
        nodes(&nexus.url).await["online"][0]["inflight"]
            .as_u64()
            .unwrap()
    };
    // Polls `$cond` for up to 5 s.
    macro_rules! until {
        ($what:expr, $cond:expr) => {{
            let deadline = Instant::now() + Duration::from_secs(5);
            while !$cond {
                assert!(Instant::now() < deadline, $what);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }};
    }
    let waiting = tokio::spawn(send());
    until!(
        "the second request never queued on the node",
        node_load().await == (Some(1), Some(1))
    );
    assert_eq!(inflight().await, 2);
    waiting.abort();
    until!(
        "the node still queues the request of a client that left",
        node_load().await == (Some(1), Some(0))
    );
    assert_eq!(
        inflight().await,
        1,
        "the request ahead is the only one in flight"
    );
    drop(ahead);
    until!(
        "Nexus still counts requests in flight on an idle node",
        inflight().await == 0 && node_load().await.0 == Some(0)
    );
}

/// Without a chain a charge is divided by `--fee-split`; with one, by the chain's split (what
/// settlement pays on-chain), whatever the flag says.
#[tokio::test]
async fn charges_are_split_by_the_flag_or_by_the_chain() {
    let cases: [(&[&str], u128, u128); 2] = [
        (
            &["--no-chain", "--fee-split", "8000,1500,500"],
            8_000,
            1_500,
        ),
        (
            &["--fee-split", "8000,1500,500", "--settle-interval", "3600"],
            9_000,
            500,
        ),
    ];
    for (extra, node_bps, pool_bps) in cases {
        let dir = tmp();
        let nexus = nexus_with(dir.path(), "127.0.0.1:0", extra);
        let _n = node(&nexus.url, CHAT, &key(dir.path(), "a"), "1");
        wait_for_models(&nexus.url, &[(CHAT, 1)]).await;
        let (s, v) = post(
            &format!("{}/v1/chat/completions", nexus.url),
            chat("Say hello.", json!({})),
        )
        .await;
        assert_eq!(s, 200, "{v}");
        let tokens = |k: &str| u128::from(v["usage"][k].as_u64().unwrap());
        // The node's default price: 0.1 / 0.2 LAI per 1M tokens.
        let cost = (tokens("prompt_tokens") * 100_000_000_000_000_000
            + tokens("completion_tokens") * 200_000_000_000_000_000)
            / 1_000_000;
        let address = nodes(&nexus.url).await["online"][0]["address"]
            .as_str()
            .unwrap()
            .to_owned();
        let e = get(&format!(
            "{}/lattice/v1/nodes/{address}/earnings",
            nexus.url
        ))
        .await;
        let amount = |k: &str| e[k].as_str().unwrap().parse::<u128>().unwrap();
        assert_eq!(
            (amount("earned"), amount("staking_pool")),
            (cost * node_bps / 10_000, cost * pool_bps / 10_000),
            "{extra:?}: {e}"
        );
    }
    // Refused at the command line (bounded in time and kept off the default database, should
    // it ever start instead).
    let dir = tmp();
    let db = dir.path().join("nexus.db");
    let out = std::process::Command::new("timeout")
        .args(["20", env!("CARGO_BIN_EXE_lattice"), "nexus", "--no-chain"])
        .args(["--fee-split", "9000,500,400", "--listen", "127.0.0.1:0"])
        .arg("--db")
        .arg(&db)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("9900 basis points, not 10000"),
        "{err}"
    );
}

/// A registered node link sending a malformed frame, an oversized one or a binary one is
/// closed with the reason in Nexus's log; Nexus keeps serving and takes the node offline.
#[tokio::test]
async fn malformed_or_oversized_frames_close_a_live_link_with_a_reason() {
    use lattice_link::{ModelAd, NexusFrame, NodeFrame, NodeKey, NodeKind, Price};
    use tokio_tungstenite::tungstenite::Message;

    let dir = tmp();
    let (nexus, log) = nexus_logged(dir.path(), "127.0.0.1:0", &[]);
    let ws_url = format!(
        "{}{}",
        nexus.url.replacen("http://", "ws://", 1),
        lattice_link::LINK_PATH
    );
    // Registers a node by hand (hello, the signed challenge, register) and returns its socket.
    let link = async || {
        let key = NodeKey::generate().unwrap();
        let (mut ws, _) = tokio_tungstenite::connect_async(ws_url.as_str())
            .await
            .unwrap();
        let send = |f: &NodeFrame| Message::text(lattice_link::encode(f).unwrap());
        let hello = NodeFrame::Hello {
            version: lattice_link::PROTOCOL_VERSION,
            address: key.address(),
        };
        ws.send(send(&hello)).await.unwrap();
        let recv = async |ws: &mut tokio_tungstenite::WebSocketStream<_>| loop {
            match ws.next().await.unwrap().unwrap() {
                Message::Text(t) => break lattice_link::decode::<NexusFrame>(t.as_str()).unwrap(),
                _ => continue,
            }
        };
        let NexusFrame::Challenge { nonce } = recv(&mut ws).await else {
            panic!("no challenge")
        };
        let register = NodeFrame::Register {
            signature: key
                .sign(&lattice_link::challenge_message(&nonce, &key.address()))
                .unwrap(),
            kind: NodeKind::Llm,
            models: vec![ModelAd {
                id: "hand-made".into(),
                context_length: 1024,
                quantization: None,
                logprobs: false,
                dimensions: None,
            }],
            price: Price {
                input_per_mtok: 1,
                output_per_mtok: 1,
            },
            slots: 1,
            decode_tps: 10.0,
            label: None,
            token: None,
        };
        ws.send(send(&register)).await.unwrap();
        assert!(matches!(recv(&mut ws).await, NexusFrame::Registered { .. }));
        ws
    };
    // Reads until Nexus closes the link (its close frame, or the connection's end).
    let closed = async |mut ws: tokio_tungstenite::WebSocketStream<_>| {
        let ended = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(Ok(m)) = ws.next().await {
                if m.is_close() {
                    break;
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "Nexus kept the link open");
    };
    let online = async || {
        nodes(&nexus.url).await["online"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["online"] == true)
            .count()
    };

    let mut ws = link().await;
    assert_eq!(online().await, 1);
    ws.send(Message::text("{\"heartbeat\": not json"))
        .await
        .unwrap();
    closed(ws).await;
    log.wait_for("bad frame", Duration::from_secs(5)).await;

    let mut ws = link().await;
    let huge = format!(
        "{{\"heartbeat\":{{\"pad\":\"{}\"}}}}",
        "x".repeat(lattice_link::MAX_FRAME_BYTES)
    );
    // Nexus may close while the frame is still being written: the send's outcome is moot.
    let _ = ws.send(Message::text(huge)).await;
    closed(ws).await;
    log.wait_for("link error", Duration::from_secs(5)).await;

    let mut ws = link().await;
    ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    closed(ws).await;
    log.wait_for(
        "binary frames are not part of the protocol",
        Duration::from_secs(5),
    )
    .await;

    // Nexus is unharmed and shows none of them online.
    let deadline = Instant::now() + Duration::from_secs(5);
    while online().await != 0 {
        assert!(
            Instant::now() < deadline,
            "a closed link still shows online"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = reqwest::get(format!("{}/v1/models", nexus.url))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// Signs a fresh wallet in with a real SIWE signature; returns its session token.
async fn siwe_sign_in(nexus: &str) -> (String, Value) {
    let client = reqwest::Client::new();
    let n: Value = client
        .get(format!("{nexus}/lattice/v1/auth/siwe/nonce"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let wallet = lattice_link::NodeKey::generate().unwrap();
    let message = lattice_accounts::SiweMessage {
        domain: n["domain"].as_str().unwrap().to_owned(),
        address: wallet.address(),
        statement: Some("Sign in to Lattice".into()),
        uri: nexus.to_owned(),
        version: "1".into(),
        chain_id: n["chain_id"].as_u64().unwrap(),
        nonce: n["nonce"].as_str().unwrap().to_owned(),
        issued_at: time::OffsetDateTime::now_utc()
            .replace_nanosecond(0)
            .unwrap(),
        expiration_time: None,
        not_before: None,
    }
    .to_text();
    let signature = wallet.sign(&message).unwrap();
    let r = client
        .post(format!("{nexus}/lattice/v1/auth/siwe"))
        .json(&json!({"message": message, "signature": signature}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .contains("HttpOnly"),
        "session cookie"
    );
    let v: Value = r.json().await.unwrap();
    // Replaying the signed message fails: the nonce is single-use.
    let again = client
        .post(format!("{nexus}/lattice/v1/auth/siwe"))
        .json(&json!({"message": message, "signature": signature}))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 401);
    (v["session"].as_str().unwrap().to_owned(), v)
}

async fn call(
    method: reqwest::Method,
    url: &str,
    token: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut r = reqwest::Client::new()
        .request(method, url)
        .bearer_auth(token);
    if let Some(b) = body {
        r = r.json(&b);
    }
    let r = r.send().await.unwrap();
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_sign_in_get_faucet_credit_pay_per_token_and_keys_are_enforced() {
    let dir = tmp();
    // Both on the single-threaded scheduler (what one CPU gets), the rest of the tests on the
    // multi-threaded one.
    let one = [("LATTICE_RUNTIME_THREADS", "1"), ("LATTICE_LOG", "info")];
    let (nexus, nexus_log) =
        nexus_logged_env(dir.path(), "127.0.0.1:0", &["--faucet-lai", "1"], &one);
    let node_key = key(dir.path(), "a");
    let (_a, node_log) = spawn_logged(&node_args(&nexus.url, CHAT, &node_key, "2"), &one);
    for log in [&nexus_log, &node_log] {
        log.wait_for(
            "async runtime: single-threaded scheduler",
            Duration::from_secs(5),
        )
        .await;
    }
    wait_for_models(&nexus.url, &[(CHAT, 1)]).await;
    let base = &nexus.url;
    let chat_url = format!("{base}/v1/chat/completions");
    let body = chat(
        "Which city is the capital of France?",
        json!({"max_tokens": 8}),
    );

    // No key, a wrong key: 401 in OpenAI's error format.
    let r = reqwest::Client::new()
        .post(&chat_url)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "invalid_api_key", "{v}");
    let (s, v) = call(
        reqwest::Method::POST,
        &chat_url,
        "lk_not-a-real-key",
        Some(body.clone()),
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (401, Some("invalid_api_key"))
    );

    // A new wallet signs in and gets 1 LAI from the faucet.
    let (session, signed) = siwe_sign_in(base).await;
    assert_eq!(signed["faucet"]["status"], "granted", "{signed}");
    let (s, acct) = call(
        reqwest::Method::GET,
        &format!("{base}/lattice/v1/account"),
        &session,
        None,
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(acct["balance"]["available"], "1000000000000000000");

    // It creates a key (shown once) and chats with it.
    let (s, k) = call(
        reqwest::Method::POST,
        &format!("{base}/lattice/v1/keys"),
        &session,
        Some(json!({"name": "test", "rpm_limit": 100})),
    )
    .await;
    assert_eq!(s, 201, "{k}");
    let secret = k["secret"].as_str().unwrap().to_owned();
    let (s, v) = call(
        reqwest::Method::POST,
        &chat_url,
        &secret,
        Some(body.clone()),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let prompt = u128::from(v["usage"]["prompt_tokens"].as_u64().unwrap());
    let completion = u128::from(v["usage"]["completion_tokens"].as_u64().unwrap());
    // Charged exactly the node's price (default 0.1 / 0.2 LAI per 1M tokens) for the usage.
    let cost =
        (prompt * 100_000_000_000_000_000 + completion * 200_000_000_000_000_000) / 1_000_000;
    let (_, acct) = call(
        reqwest::Method::GET,
        &format!("{base}/lattice/v1/account"),
        &session,
        None,
    )
    .await;
    let available: u128 = acct["balance"]["available"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(available, 10u128.pow(18) - cost, "{acct}");
    assert_eq!(acct["balance"]["held"], "0");
    // The usage API and the node's earnings agree (the node gets 90 %).
    let (_, u) = call(
        reqwest::Method::GET,
        &format!("{base}/lattice/v1/usage?group=key"),
        &session,
        None,
    )
    .await;
    assert_eq!(u["data"][0]["group"], k["id"], "{u}");
    assert_eq!(u["data"][0]["requests"], 1);
    assert_eq!(u["data"][0]["cost"], cost.to_string());
    let (s, _) = call(
        reqwest::Method::GET,
        &format!("{base}/lattice/v1/usage?from=2020-01-01&to=2026-01-01"),
        &session,
        None,
    )
    .await;
    assert_eq!(s, 400, "usage ranges are bounded");
    let node_addr = nodes(base).await["online"][0]["address"]
        .as_str()
        .unwrap()
        .to_owned();
    let e = get(&format!("{base}/lattice/v1/nodes/{node_addr}/earnings")).await;
    let earned: u128 = e["earned"].as_str().unwrap().parse().unwrap();
    assert!(earned >= cost * 9 / 10, "{e}");

    let rich =
        json!({"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 900});
    let (s, ..) = call(
        reqwest::Method::POST,
        &chat_url,
        &secret,
        Some(rich.clone()),
    )
    .await;
    assert_eq!(s, 200, "900 tokens at 0.2 LAI/1M fit in the balance");
    // A key with a tiny spending limit gets 402 at once.
    let (_, small) = call(
        reqwest::Method::POST,
        &format!("{base}/lattice/v1/keys"),
        &session,
        Some(json!({"name": "small", "spend_limit": "1000"})),
    )
    .await;
    let (s, v) = call(
        reqwest::Method::POST,
        &chat_url,
        small["secret"].as_str().unwrap(),
        Some(body.clone()),
    )
    .await;
    assert_eq!(s, 402, "{v}");
    assert_eq!(v["error"]["code"], "insufficient_credits");

    // Revoked: 401 from then on.
    let (s, _) = call(
        reqwest::Method::DELETE,
        &format!("{base}/lattice/v1/keys/{}", k["id"].as_str().unwrap()),
        &session,
        None,
    )
    .await;
    assert_eq!(s, 200);
    let (s, _) = call(
        reqwest::Method::POST,
        &chat_url,
        &secret,
        Some(body.clone()),
    )
    .await;
    assert_eq!(s, 401);

    // Chat history: kept only after opting in, and really deleted.
    let with_conv = |c: &str| {
        let c = c.to_owned();
        let (url, session) = (chat_url.clone(), session.clone());
        async move {
            reqwest::Client::new()
                .post(url)
                .bearer_auth(session)
                .header("x-lattice-conversation", c)
                .json(&chat("Hello there", json!({"max_tokens": 4})))
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(with_conv("c1").await, 200);
    let (_, h) = call(
        reqwest::Method::GET,
        &format!("{base}/lattice/v1/history"),
        &session,
        None,
    )
    .await;
    assert_eq!(
        h["data"].as_array().unwrap().len(),
        0,
        "stored without opt-in: {h}"
    );
    let (s, _) = call(
        reqwest::Method::PATCH,
        &format!("{base}/lattice/v1/account"),
        &session,
        Some(json!({"keep_history": true})),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(with_conv("c1").await, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, m) = call(
        reqwest::Method::GET,
        &format!("{base}/lattice/v1/history/c1"),
        &session,
        None,
    )
    .await;
    let msgs = m["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 2, "{m}");
    assert_eq!(msgs[0]["content"], "Hello there");
    let (s, _) = call(
        reqwest::Method::DELETE,
        &format!("{base}/lattice/v1/history/c1"),
        &session,
        None,
    )
    .await;
    assert_eq!(s, 200);
    let (s, _) = call(
        reqwest::Method::GET,
        &format!("{base}/lattice/v1/history/c1"),
        &session,
        None,
    )
    .await;
    assert_eq!(s, 404);

    // A user without credit gets 402 in OpenAI's format.
    let broke = nexus_with(&dir.path().join("b"), "127.0.0.1:0", &["--faucet-lai", "0"]);
    let _n = node(&broke.url, CHAT, &key(dir.path(), "c"), "1");
    wait_for_models(&broke.url, &[(CHAT, 1)]).await;
    let (session, signed) = siwe_sign_in(&broke.url).await;
    assert_ne!(signed["faucet"]["status"], "granted");
    let (s, v) = call(
        reqwest::Method::POST,
        &format!("{}/v1/chat/completions", broke.url),
        &session,
        Some(body),
    )
    .await;
    assert_eq!(s, 402, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Insufficient credits")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passkey_sign_up_and_sign_in_over_http() {
    use webauthn_authenticator_rs::WebauthnAuthenticator as _;
    use webauthn_authenticator_rs::softpasskey::SoftPasskey;
    let dir = tmp();
    let nexus = nexus_at(dir.path(), "127.0.0.1:0");
    let base = &nexus.url;
    // Browsers only allow passkeys on domain names: the page is http://localhost:PORT.
    let port = base.rsplit(':').next().unwrap();
    let origin =
        webauthn_authenticator_rs::prelude::Url::parse(&format!("http://localhost:{port}"))
            .unwrap();
    let mut authenticator = SoftPasskey::new(true);
    let client = reqwest::Client::new();
    let start: Value = client
        .post(format!("{base}/lattice/v1/auth/passkey/register/start"))
        .json(&json!({"name": "alice"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let options = serde_json::from_value(start["options"].clone()).unwrap();
    let credential = authenticator
        .do_registration(origin.clone(), options)
        .unwrap();
    let r = client
        .post(format!("{base}/lattice/v1/auth/passkey/register/finish"))
        .json(&json!({"challenge": start["challenge"], "credential": credential}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["faucet"]["status"], "granted", "{v}");

    let start: Value = client
        .post(format!("{base}/lattice/v1/auth/passkey/login/start"))
        .json(&json!({"name": "alice"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let options = serde_json::from_value(start["options"].clone()).unwrap();
    let assertion = authenticator.do_authentication(origin, options).unwrap();
    let finish = json!({"challenge": start["challenge"], "credential": assertion});
    let (s, v) = call(
        reqwest::Method::POST,
        &format!("{base}/lattice/v1/auth/passkey/login/finish"),
        "",
        Some(finish.clone()),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let session = v["session"].as_str().unwrap();
    let (s, acct) = call(
        reqwest::Method::GET,
        &format!("{base}/lattice/v1/account"),
        session,
        None,
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(acct["identities"][0]["kind"], "passkey");
    // A replayed assertion, a wrong name, a garbage body: clean 4xx errors.
    let (s, v) = call(
        reqwest::Method::POST,
        &format!("{base}/lattice/v1/auth/passkey/login/finish"),
        "",
        Some(finish),
    )
    .await;
    assert_eq!(s, 401, "{v}");
    let (s, _) = call(
        reqwest::Method::POST,
        &format!("{base}/lattice/v1/auth/passkey/login/start"),
        "",
        Some(json!({"name": "nobody"})),
    )
    .await;
    assert_eq!(s, 401);
    let r = client
        .post(format!("{base}/lattice/v1/auth/passkey/login/finish"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = client
        .post(format!("{base}/lattice/v1/auth/passkey/register/start"))
        .header("content-type", "application/json")
        .body(vec![b' '; 100 << 10])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413, "bodies of the accounts API are bounded");
    // Expired or unknown sessions are refused.
    let (s, _) = call(
        reqwest::Method::GET,
        &format!("{base}/lattice/v1/account"),
        "ls_expired",
        None,
    )
    .await;
    assert_eq!(s, 401);
}

/// `lattice up` (the README's main command) starts Nexus and two nodes, and the examples it
/// prints work: the chat and completion requests with the printed key, `lattice status`. Stopped
/// (SIGTERM, as Ctrl-C), it takes its processes down: the endpoint's port is free again.
#[tokio::test]
async fn lattice_up_starts_a_network_that_answers_its_printed_examples() {
    use std::io::BufRead;
    let dir = tmp();
    // Its own state (database, keys) in a fresh directory; the models already pulled.
    let (models, _) = lattice_models::dirs_from_env(|k| std::env::var_os(k)).unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut up = std::process::Command::new(env!("CARGO_BIN_EXE_lattice"))
        .args(["up", "--listen", &format!("127.0.0.1:{port}")])
        .env("LATTICE_CACHE_DIR", dir.path())
        .env("LATTICE_MODELS_DIR", &models)
        .env("LATTICE_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = up.stdout.take().unwrap();
    // Stops it (and so its children) however the test ends.
    struct Stop(u32);
    impl Drop for Stop {
        fn drop(&mut self) {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &self.0.to_string()])
                .status();
        }
    }
    let stop = Stop(up.id());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            eprintln!("up: {line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut printed = String::new();
    let deadline = Instant::now() + Duration::from_secs(240);
    while !printed.contains("/lattice/v1/chain") {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("`lattice up` never finished printing:\n{printed}"));
        printed.push_str(&line);
        printed.push('\n');
    }
    assert!(
        printed.contains(&format!("OpenAI endpoint: {base}/v1")),
        "{printed}"
    );
    let key = printed
        .lines()
        .find_map(|l| l.trim().strip_prefix("export OPENAI_API_KEY="))
        .unwrap_or_else(|| panic!("no key printed:\n{printed}"))
        .to_owned();
    let client = reqwest::Client::new();
    let ask = async |path: &str, body: Value| {
        let r = client
            .post(format!("{base}{path}"))
            .bearer_auth(&key)
            .json(&body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    };
    // The chat example exactly as printed (greedy, so a new user gets a sensible answer).
    let printed_chat: Value = printed
        .lines()
        .filter_map(|l| l.trim().strip_prefix("-d '")?.strip_suffix('\''))
        .find(|body| body.contains("\"messages\""))
        .and_then(|body| serde_json::from_str(body).ok())
        .unwrap_or_else(|| panic!("no chat example printed:\n{printed}"));
    let (s, v) = ask("/v1/chat/completions", printed_chat).await;
    assert_eq!(s, 200, "{v}");
    assert!(
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .contains("Paris"),
        "{v}"
    );
    let (s, v) = ask(
        "/v1/completions",
        json!({"model": TEXT, "prompt": "Once upon a time", "max_tokens": 32}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert!(!v["choices"][0]["text"].as_str().unwrap().is_empty(), "{v}");
    // The embeddings example exactly as printed: two paraphrases, close to each other.
    let printed_embeddings: Value = printed
        .lines()
        .filter_map(|l| l.trim().strip_prefix("-d '")?.strip_suffix('\''))
        .find(|body| body.contains("\"input\""))
        .and_then(|body| serde_json::from_str(body).ok())
        .unwrap_or_else(|| panic!("no embeddings example printed:\n{printed}"));
    let (s, v) = ask("/v1/embeddings", printed_embeddings).await;
    assert_eq!(s, 200, "{v}");
    let vectors: Vec<Vec<f64>> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| serde_json::from_value(d["embedding"].clone()).unwrap())
        .collect();
    assert_eq!(vectors.len(), 2, "{v}");
    assert_eq!(vectors[0].len(), 384);
    let cos: f64 = vectors[0].iter().zip(&vectors[1]).map(|(a, b)| a * b).sum();
    assert!(cos > 0.7, "paraphrases at cosine {cos}");
    let (ok, out) = run(&["status", "--nexus", &base]);
    assert!(
        ok && out.contains("local-1") && out.contains("local-2") && out.contains("local-3"),
        "{out}"
    );

    drop(stop);
    let status = up.wait().unwrap();
    assert!(status.success(), "`lattice up` ended with {status}");
    // Its Nexus is gone with it: the port can be bound again.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "Nexus outlived `lattice up`");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Nexus (faucet 1 LAI) and a real `lattice node` in front of a canned upstream that answers
/// every chat or completion at once with 1,000 prompt + 4,000 completion tokens, at `price`
/// units per 1M tokens in and out.
async fn canned_network(dir: &std::path::Path, price: &str) -> (Proc, Proc) {
    use axum::routing::post;
    let upstream = {
        // Chat and completions (the liveness probe is a completion) in one shape.
        let sse = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"ok\"},\"text\":\"ok\",\"finish_reason\":null}]}\n\n\
                   data: {\"choices\":[{\"index\":0,\"delta\":{},\"text\":\"\",\"finish_reason\":\"stop\"}]}\n\n\
                   data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1000,\"completion_tokens\":4000,\"total_tokens\":5000}}\n\ndata: [DONE]\n\n";
        let app = axum::Router::new()
            .route("/v1/chat/completions", post(move || async move { sse }))
            .route("/v1/completions", post(move || async move { sse }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}/v1")
    };
    let nexus = nexus_with(dir, "127.0.0.1:0", &["--faucet-lai", "1"]);
    let node = spawn(&[
        "node",
        "--nexus",
        &nexus.url,
        "--upstream",
        &upstream,
        "--model-id",
        "canned",
        "--ctx-per-slot",
        "8192",
        "--price-in",
        price,
        "--price-out",
        price,
        "--port",
        "0",
        "--key",
        key(dir, "n").to_str().unwrap(),
    ]);
    wait_for_models(&nexus.url, &[("canned", 1)]).await;
    (nexus, node)
}

/// A paying user's balance as (available, held), read with a session or key.
async fn balance(base: &str, auth: &str) -> (u128, u128) {
    let (_, a) = call(
        reqwest::Method::GET,
        &format!("{base}/lattice/v1/account"),
        auth,
        None,
    )
    .await;
    let units = |k: &str| a["balance"][k].as_str().unwrap().parse::<u128>().unwrap();
    (units("available"), units("held"))
}

/// Several answers (`n`) are held, routed and charged one by one: when the credit covers only
/// some of the holds, the request is a 402, the answers already admitted are cancelled, and
/// nothing is charged or stays held; when it covers them all, each is charged exactly once and
/// `usage` is their sum, whole and streamed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_answers_are_held_together_and_charged_each() {
    let dir = tmp();
    // 18 LAI per 1M tokens: a hold (~1,074 prompt + 7,000 completion tokens at most) is ~0.145
    // LAI, so 1 LAI covers six of them; an answer (5,000 tokens) costs 0.09 LAI.
    let (nexus, _node) = canned_network(dir.path(), "18000000000000000000").await;
    let base = nexus.url.as_str();
    let (session, _) = siwe_sign_in(base).await;
    let start = balance(base, &session).await.0;
    assert_eq!(start, 10u128.pow(18), "the faucet's 1 LAI");
    let url = format!("{base}/v1/chat/completions");
    let ask = |n: u32, stream: bool| {
        json!({
            "model": "canned",
            "messages": [{"role": "user", "content": "x".repeat(990)}],
            "max_tokens": 7000,
            "n": n,
            "stream": stream,
        })
    };
    let settled = async |want: u128| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (available, held) = balance(base, &session).await;
            if held == 0 && available == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "available {available} (want {want}), held {held}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    for stream in [false, true] {
        let (s, v) = call(reqwest::Method::POST, &url, &session, Some(ask(16, stream))).await;
        assert_eq!(s, 402, "sixteen holds of ~0.145 LAI exceed 1 LAI: {v}");
        assert_eq!(v["error"]["code"], "insufficient_credits", "{v}");
        settled(start).await;
    }
    let (s, v) = call(reqwest::Method::POST, &url, &session, Some(ask(2, false))).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["choices"].as_array().map(Vec::len), Some(2), "{v}");
    assert_eq!(v["usage"]["prompt_tokens"], 2000, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 8000, "{v}");
    let cost = 5000 * 18 * 10u128.pow(18) / 1_000_000;
    settled(start - 2 * cost).await;
    // Streamed: both answers finish, one usage chunk sums them, the body ends with `[DONE]`,
    // and each is charged once.
    let mut body = ask(2, true);
    body["stream_options"] = json!({"include_usage": true});
    let sse = reqwest::Client::new()
        .post(&url)
        .bearer_auth(&session)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(sse.status().as_u16(), 200);
    let text = sse.text().await.unwrap();
    let chunks: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let finished: Vec<u64> = chunks
        .iter()
        .filter_map(|c| c["choices"].as_array())
        .flatten()
        .filter(|c| c["finish_reason"].is_string())
        .filter_map(|c| c["index"].as_u64())
        .collect();
    assert_eq!(finished.len(), 2, "{text}");
    assert!(finished.contains(&0) && finished.contains(&1), "{text}");
    let usage = chunks
        .iter()
        .find(|c| c["usage"].is_object())
        .expect("a usage chunk");
    assert_eq!(usage["usage"]["completion_tokens"], 8000, "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    settled(start - 4 * cost).await;
    let (_, u) = call(
        reqwest::Method::GET,
        &format!("{base}/lattice/v1/usage?group=model"),
        &session,
        None,
    )
    .await;
    assert_eq!(u["data"][0]["requests"].as_u64(), Some(4), "{u}");
}

/// 1,000 concurrent paid requests from one user whose credit covers about twenty of them,
/// through Nexus's whole path (key, hold, node, signed receipt, charge): every request gets 200
/// or 402, the 200s are charged exactly (nothing else moves), nothing stays held, and the
/// balance never pays for more than it had. The node is a real `lattice node` in front of a
/// canned upstream answering 1,000 prompt + 4,000 completion tokens at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_requests_never_overspend_and_the_rest_get_402() {
    let dir = tmp();
    // 10 LAI per 1M tokens: an answer (5,000 tokens) costs 0.05 LAI, so 1 LAI pays for 20.
    let (nexus, _node) = canned_network(dir.path(), "10000000000000000000").await;
    let base = nexus.url.as_str();
    let (session, _) = siwe_sign_in(base).await;
    let (s, k) = call(
        reqwest::Method::POST,
        &format!("{base}/lattice/v1/keys"),
        &session,
        Some(json!({"name": "race"})),
    )
    .await;
    assert_eq!(s, 201, "{k}");
    let secret = k["secret"].as_str().unwrap().to_owned();
    let account = async || balance(base, &session).await;
    let start = account().await.0;
    assert_eq!(start, 10u128.pow(18), "the faucet's 1 LAI");
    // ~1,000 prompt bytes and 4,000 completion tokens: each hold is about one answer's cost.
    let body = json!({
        "model": "canned",
        "messages": [{"role": "user", "content": "x".repeat(990)}],
        "max_tokens": 4000,
    });
    let client = reqwest::Client::new();
    let url = format!("{base}/v1/chat/completions");
    let statuses = futures::future::join_all(
        (0..1000).map(|_| client.post(&url).bearer_auth(&secret).json(&body).send()),
    )
    .await;
    let (mut ok, mut refused) = (0u128, 0u128);
    for r in statuses {
        match r.unwrap().status().as_u16() {
            200 => ok += 1,
            402 => refused += 1,
            other => panic!("status {other}"),
        }
    }
    eprintln!("{ok} answered, {refused} refused");
    assert_eq!(ok + refused, 1000);
    assert!(ok >= 1 && refused >= 1, "{ok} answered, {refused} refused");
    let cost = 5000 * 10u128.pow(19) / 1_000_000;
    assert!(
        ok * cost <= start,
        "{ok} answers at {cost} each overspend {start}"
    );
    // Every answer charged exactly once, nothing else moved, nothing left held.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (available, held) = account().await;
        if held == 0 && available == start - ok * cost {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{ok} answers: available {available} (want {}), held {held}",
            start - ok * cost
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, u) = call(
        reqwest::Method::GET,
        &format!("{base}/lattice/v1/usage?group=key"),
        &session,
        None,
    )
    .await;
    assert_eq!(u["data"][0]["requests"].as_u64(), Some(ok as u64), "{u}");
}
