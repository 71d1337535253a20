//! The embedding engine against the real all-MiniLM-L6-v2 (pulled on first use into the model
//! cache, sha256-verified). Its vectors are checked against an independent numpy implementation
//! in the end-to-end tests (tests/e2e); here: shape, meaning, batching and admission.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use futures::{FutureExt, StreamExt};
use lattice_engine::{
    Engine, EngineError, Event, EventStream, FinishReason, GenerateRequest, Preference, Prompt,
    SamplingParams, Usage,
};
use lattice_engine_embed::{EmbedConfig, EmbedEngine};
use lattice_models::ModelStore;

const MODEL: &str = "all-minilm-l6-v2";

async fn engine(queue: usize) -> EmbedEngine {
    let store = ModelStore::from_env().expect("model store");
    let path = store.resolve(MODEL, true).await.expect("model").path;
    let mut cfg = EmbedConfig::new(path, MODEL);
    cfg.queue_capacity = queue;
    // As on this project's 2-core machines, whatever the test machine has: with one encoder
    // per core on many cores, a long request's batches would all be taken at once.
    cfg.threads = Some(2);
    tokio::task::spawn_blocking(move || EmbedEngine::load(cfg))
        .await
        .unwrap()
        .expect("engine loads")
}

fn request(prompt: Prompt) -> GenerateRequest {
    GenerateRequest {
        request_id: "t".into(),
        model: MODEL.into(),
        prompt,
        params: SamplingParams {
            max_tokens: Some(0),
            ..SamplingParams::default()
        },
        preference: Preference::default(),
        user: None,
        payer: None,
        conversation: None,
        whole: true,
    }
}

fn texts(t: &[&str]) -> Prompt {
    Prompt::Embed(t.iter().map(|s| (*s).to_owned()).collect())
}

async fn read(mut s: EventStream) -> (Vec<Vec<f32>>, Usage) {
    let mut out = Vec::new();
    while let Some(ev) = s.next().await {
        match ev.expect("no error") {
            Event::Embedding(v) => out.push(v),
            Event::Done {
                finish_reason,
                usage,
            } => {
                assert_eq!(finish_reason, FinishReason::Stop);
                assert!(s.next().await.is_none(), "nothing after Done");
                return (out, usage);
            }
            other => panic!("unexpected event {other:?}"),
        }
    }
    panic!("stream ended without Done");
}

async fn embed(e: &EmbedEngine, t: &[&str]) -> (Vec<Vec<f32>>, Usage) {
    read(e.generate(request(texts(t))).await.expect("admitted")).await
}

fn cos(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vectors_are_unit_length_and_carry_meaning() {
    let e = engine(8).await;
    let card = &e.models()[0];
    assert_eq!(card.dimensions, Some(384));
    assert_eq!(
        card.context_length, 256,
        "sentence-transformers' max_seq_length"
    );
    let (v, usage) = embed(
        &e,
        &[
            "The cat sits on the mat.",
            "A cat is sitting on a mat.",
            "Stock markets fell sharply on Monday.",
        ],
    )
    .await;
    assert_eq!(v.len(), 3);
    for x in &v {
        assert_eq!(x.len(), 384);
        let norm = cos(x, x).sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "norm {norm}");
    }
    let (close, far) = (cos(&v[0], &v[1]), cos(&v[0], &v[2]));
    assert!(
        close > 0.7 && far < 0.3,
        "paraphrases {close}, unrelated {far}"
    );
    // [CLS] the cat sits on the mat . [SEP] = 9; the others 10 and 9 (WordPiece, uncased).
    assert_eq!(usage.completion_tokens, 0);
    assert_eq!(usage.prompt_tokens, 9 + 10 + 9, "{usage:?}");
    assert_eq!(usage.total_tokens, usage.prompt_tokens);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_gets_the_same_vector_alone_or_padded_in_a_batch() {
    let e = engine(8).await;
    let short = "Paris is the capital of France.";
    let long = "The quick brown fox jumps over the lazy dog while the farmer, who had been \
                working in the fields since dawn, watches from the porch of his old house.";
    let (alone, _) = embed(&e, &[short]).await;
    let (batch, _) = embed(&e, &[long, short, long]).await;
    let c = cos(&alone[0], &batch[1]);
    assert!(c > 0.99999, "padding changed the vector: cosine {c}");
    assert!(cos(&batch[0], &batch[2]) > 0.99999);
    // More texts than one batch (16) and than one sorting window (256), of varied lengths
    // (encoded shortest first within a window), come back in the order given.
    let many: Vec<String> = (0..300)
        .map(|i| format!("sentence number {i}{}", " and more words".repeat(i % 7)))
        .collect();
    let refs: Vec<&str> = many.iter().map(String::as_str).collect();
    let (all, _) = embed(&e, &refs).await;
    assert_eq!(all.len(), 300);
    for i in [0, 30, 255, 256, 299] {
        let (one, _) = embed(&e, &[refs[i]]).await;
        assert!(cos(&one[0], &all[i]) > 0.99999, "text {i}");
        if i > 0 {
            assert!(
                cos(&one[0], &all[i - 1]) < 0.9999,
                "text {i} is its neighbour's"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_encoded_together_and_a_short_one_is_not_held_behind_a_long_one() {
    let e = engine(8).await;
    let long: Vec<String> = (0..400)
        .map(|i| {
            format!(
                "document {i} is about {}",
                "several unrelated things ".repeat(i % 5)
            )
        })
        .collect();
    let mut big = e
        .generate(request(Prompt::Embed(long.clone())))
        .await
        .expect("admitted");
    // Its first vector out means the worker is on it.
    let first = match big.next().await {
        Some(Ok(Event::Embedding(v))) => v,
        other => panic!("{other:?}"),
    };
    let short = "Paris is the capital of France.";
    let (during, usage) = embed(&e, &[short]).await;
    assert_eq!(usage.prompt_tokens, 9);
    // The long request is not done: its texts were shared out with the short one's, batch by
    // batch, rather than all encoded first.
    let mut ready = vec![first];
    while let Some(ev) = big.next().now_or_never() {
        match ev {
            Some(Ok(Event::Embedding(v))) => ready.push(v),
            other => panic!("the long request ended first: {other:?}"),
        }
    }
    assert!(ready.len() < long.len(), "all {} were ready", ready.len());
    let (rest, usage) = read(big).await;
    ready.extend(rest);
    assert_eq!(ready.len(), long.len());
    assert!(usage.prompt_tokens > 400 * 5, "{usage:?}");
    // Batched with each other's texts, every vector is still its own text's.
    let (alone, _) = embed(&e, &[short, &long[0], &long[399]]).await;
    assert!(cos(&alone[0], &during[0]) > 0.99999);
    assert!(cos(&alone[1], &ready[0]) > 0.99999);
    assert!(cos(&alone[2], &ready[399]) > 0.99999);
    assert!(cos(&alone[2], &ready[398]) < 0.9999);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_before_any_work() {
    let e = engine(8).await;
    let too_long = "word ".repeat(300);
    let err = |r: Result<EventStream, EngineError>| match r {
        Err(e) => e,
        Ok(_) => panic!("admitted"),
    };
    match err(e
        .generate(request(Prompt::Embed(vec!["ok".into(), too_long])))
        .await)
    {
        EngineError::InvalidRequest(m) => {
            assert!(m.contains("input 1") && m.contains("256"), "{m}");
        }
        other => panic!("{other:?}"),
    }
    // Far past any 256-token text in bytes: refused before it is tokenized.
    let huge = "a".repeat(256 * 32 + 1);
    match err(e
        .generate(request(Prompt::Embed(vec!["ok".into(), huge])))
        .await)
    {
        EngineError::InvalidRequest(m) => {
            assert!(m.contains("input 1") && m.contains("8192 bytes"), "{m}");
        }
        other => panic!("{other:?}"),
    }
    match err(e.generate(request(texts(&["a", ""]))).await) {
        EngineError::InvalidRequest(m) => assert!(m.contains("input 1"), "{m}"),
        other => panic!("{other:?}"),
    }
    match err(e.generate(request(Prompt::Text("hello".into()))).await) {
        EngineError::InvalidRequest(m) => assert!(m.contains("embedding model"), "{m}"),
        other => panic!("{other:?}"),
    }
    let mut other_model = request(texts(&["x"]));
    other_model.model = "nope".into();
    assert!(matches!(
        err(e.generate(other_model).await),
        EngineError::InvalidRequest(_)
    ));
    // Refusals hold nothing.
    assert_eq!(e.load().queued + e.load().busy_slots, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_and_a_dropped_request_frees_its_place() {
    let e = engine(0).await;
    // While its caller holds the stream, it stays admitted (read or not).
    let many: Vec<String> = (0..200).map(|i| format!("text {i}")).collect();
    let first = e
        .generate(request(Prompt::Embed(many)))
        .await
        .expect("admitted");
    match e.generate(request(texts(&["x"]))).await {
        Err(EngineError::Overloaded { capacity: 0 }) => {}
        Err(other) => panic!("{other:?}"),
        Ok(_) => panic!("admitted past the queue"),
    }
    drop(first);
    // Dropping the stream gives its place back at once; the abandoned texts are dropped
    // from the encoders' list before they take another batch.
    let s = e
        .generate(request(texts(&["x"])))
        .await
        .expect("admitted once the first was dropped");
    let (v, _) = read(s).await;
    assert_eq!(v.len(), 1);
}
