//! On-disk discipline for model files: `.part` while writing, verify, fsync, rename, `.verified` sidecar.
//! Nothing incomplete or unverified ever appears under a model's final name.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use sha2::{Digest, Sha256};

use crate::error::ModelError;
use crate::progress::Progress;

/// First four bytes of every GGUF file.
pub(crate) const GGUF_MAGIC: &[u8; 4] = b"GGUF";

/// A safetensors file starts with an 8-byte little-endian header length, then that much JSON.
/// Real headers are a few hundred kilobytes at most; anything bigger is not a model we can load.
const MAX_SAFETENSORS_HEADER: u64 = 100 << 20;

/// Model file formats, told apart by file name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// `*.gguf`: llama.cpp models.
    Gguf,
    /// `*.safetensors`: embedding models, with companion files next to them.
    Safetensors,
}

impl Format {
    /// The format a file name promises, ignoring ASCII case; `None` for anything else.
    pub(crate) fn of_name(name: &str) -> Option<Format> {
        let lower = name.to_ascii_lowercase();
        if lower.ends_with(".gguf") {
            Some(Format::Gguf)
        } else if lower.ends_with(".safetensors") {
            Some(Format::Safetensors)
        } else {
            None
        }
    }

    pub(crate) fn of(path: &Path) -> Option<Format> {
        path.file_name()
            .and_then(|n| n.to_str())
            .and_then(Format::of_name)
    }
}

/// Copy buffer size: large enough that hashing, not syscalls, dominates.
pub(crate) const CHUNK: usize = 1 << 20;

/// What a finished file must match; `None` fields are not checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Expect {
    pub(crate) size: Option<u64>,
    pub(crate) sha256: Option<String>,
}

/// Written after a file was hashed, so later runs need not re-read hundreds of megabytes.
///
/// Trusted only while the file's size and mtime are exactly those recorded here.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Sidecar {
    pub(crate) size: u64,
    pub(crate) mtime_secs: u64,
    pub(crate) mtime_nanos: u32,
    pub(crate) sha256: String,
    /// True when the hash matched a known-good value (catalog, `--sha256` or the server's),
    /// false when it was only recorded at download time.
    pub(crate) pinned: bool,
    /// The spec the file was pulled with, so `list` can show it.
    pub(crate) source: String,
}

/// Size and mtime of a file, the part of its identity that is cheap to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp {
    pub(crate) size: u64,
    pub(crate) mtime_secs: u64,
    pub(crate) mtime_nanos: u32,
}

impl Stamp {
    pub(crate) fn of(path: &Path) -> io::Result<Self> {
        let meta = fs::metadata(path)?;
        // A clock before 1970 or a filesystem without mtimes just never matches a sidecar.
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .unwrap_or_default();
        Ok(Stamp {
            size: meta.len(),
            mtime_secs: mtime.as_secs(),
            mtime_nanos: mtime.subsec_nanos(),
        })
    }

    fn matches(&self, s: &Sidecar) -> bool {
        self.size == s.size && self.mtime_secs == s.mtime_secs && self.mtime_nanos == s.mtime_nanos
    }
}

pub(crate) fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

pub(crate) fn part_path(path: &Path) -> PathBuf {
    with_suffix(path, ".part")
}

pub(crate) fn sidecar_path(path: &Path) -> PathBuf {
    with_suffix(path, ".verified")
}

fn lock_path(path: &Path) -> PathBuf {
    with_suffix(path, ".lock")
}

/// A broken or foreign sidecar only costs a re-hash, so read errors are not errors.
pub(crate) fn read_sidecar(model: &Path) -> Option<Sidecar> {
    let bytes = fs::read(sidecar_path(model)).ok()?;
    // Bound what we parse: a real sidecar is a few hundred bytes.
    if bytes.len() > 64 * 1024 {
        return None;
    }
    serde_json::from_slice(&bytes).ok()
}

/// The sidecar of `model`, if it still describes the file on disk.
pub(crate) fn current_sidecar(model: &Path) -> Option<Sidecar> {
    let sidecar = read_sidecar(model)?;
    let stamp = Stamp::of(model).ok()?;
    stamp.matches(&sidecar).then_some(sidecar)
}

pub(crate) fn write_sidecar(
    model: &Path,
    sha256: &str,
    pinned: bool,
    source: &str,
) -> Result<Sidecar, ModelError> {
    let stamp = Stamp::of(model)
        .map_err(|e| ModelError::io(format!("cannot stat {}", model.display()), e))?;
    let sidecar = Sidecar {
        size: stamp.size,
        mtime_secs: stamp.mtime_secs,
        mtime_nanos: stamp.mtime_nanos,
        sha256: sha256.to_owned(),
        pinned,
        source: source.to_owned(),
    };
    let json = serde_json::to_vec_pretty(&sidecar)
        .map_err(|e| ModelError::io("cannot encode the sidecar", io::Error::other(e)))?;
    let path = sidecar_path(model);
    let tmp = with_suffix(&path, ".tmp");
    fs::write(&tmp, json)
        .and_then(|()| fs::rename(&tmp, &path))
        .map_err(|e| ModelError::io(format!("cannot write {}", path.display()), e))?;
    Ok(sidecar)
}

pub(crate) fn remove_if_exists(path: &Path) -> Result<(), ModelError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ModelError::io(
            format!("cannot remove {}", path.display()),
            e,
        )),
    }
}

/// Removes a model file with its sidecar, sidecar first so a crash never leaves it describing a new file.
pub(crate) fn remove_model(path: &Path) -> Result<(), ModelError> {
    remove_if_exists(&sidecar_path(path))?;
    remove_if_exists(path)
}

/// Holds an exclusive lock on `<model>.lock` so two pulls of one model never share a `.part`.
#[derive(Debug)]
pub(crate) struct PullLock {
    _file: File,
}

impl PullLock {
    /// Blocks until the lock is free; call from a blocking thread.
    pub(crate) fn acquire(model: &Path, progress: &dyn Progress) -> Result<Self, ModelError> {
        let path = lock_path(model);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| ModelError::io(format!("cannot open {}", path.display()), e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                progress.notice(&format!(
                    "waiting for another pull of {} to finish",
                    model.display()
                ));
                file.lock()
                    .map_err(|e| ModelError::io(format!("cannot lock {}", path.display()), e))?;
            }
            Err(fs::TryLockError::Error(e)) => {
                return Err(ModelError::io(format!("cannot lock {}", path.display()), e));
            }
        }
        Ok(PullLock { _file: file })
    }
}

/// Deletes a `.part` file when dropped unless the download was committed.
#[derive(Debug)]
pub(crate) struct PartGuard {
    path: Option<PathBuf>,
}

impl PartGuard {
    pub(crate) fn new(path: PathBuf) -> Self {
        PartGuard { path: Some(path) }
    }

    fn disarm(&mut self) {
        self.path = None;
    }
}

impl Drop for PartGuard {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            // Best effort: a leftover .part is harmless, it is truncated by the next pull.
            let _ = fs::remove_file(path);
        }
    }
}

/// Streams bytes into a `.part` file, hashing them and counting against a limit.
pub(crate) struct PartWriter {
    file: io::BufWriter<File>,
    path: PathBuf,
    hasher: Sha256,
    written: u64,
    head: Vec<u8>,
    guard: PartGuard,
}

impl PartWriter {
    /// Creates or truncates `<dest>.part`: a stale one from an interrupted pull is never reused.
    pub(crate) fn create(dest: &Path) -> Result<Self, ModelError> {
        let path = part_path(dest);
        let file = File::create(&path)
            .map_err(|e| ModelError::io(format!("cannot create {}", path.display()), e))?;
        Ok(PartWriter {
            file: io::BufWriter::with_capacity(CHUNK, file),
            guard: PartGuard::new(path.clone()),
            path,
            hasher: Sha256::new(),
            written: 0,
            head: Vec::with_capacity(GGUF_MAGIC.len()),
        })
    }

    pub(crate) fn written(&self) -> u64 {
        self.written
    }

    pub(crate) fn write(&mut self, buf: &[u8]) -> Result<(), ModelError> {
        let want = GGUF_MAGIC.len().saturating_sub(self.head.len());
        self.head.extend(buf.iter().take(want));
        self.hasher.update(buf);
        self.file
            .write_all(buf)
            .map_err(|e| ModelError::io(format!("cannot write {}", self.path.display()), e))?;
        self.written += buf.len() as u64;
        Ok(())
    }

    /// Copies all of `reader` in, advancing `progress`.
    pub(crate) fn copy_from(
        &mut self,
        reader: &mut dyn Read,
        progress: &dyn Progress,
        what: &dyn Fn(io::Error) -> ModelError,
    ) -> Result<(), ModelError> {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(what(e)),
            };
            let chunk = buf.get(..n).unwrap_or_default();
            self.write(chunk)?;
            progress.advance(n as u64);
        }
    }

    /// Checks size, hash and magic, then fsyncs and renames into `dest`; returns the sha256.
    ///
    /// On any mismatch the `.part` is deleted, so a bad download never survives.
    pub(crate) fn commit(
        mut self,
        dest: &Path,
        expect: &Expect,
        require_gguf: bool,
    ) -> Result<String, ModelError> {
        self.file
            .flush()
            .map_err(|e| ModelError::io(format!("cannot write {}", self.path.display()), e))?;
        let actual = hex::encode(self.hasher.finalize_reset());
        if let Some(expected) = expect.size
            && expected != self.written
        {
            return Err(ModelError::SizeMismatch {
                path: dest.to_owned(),
                expected,
                actual: self.written,
            });
        }
        if let Some(expected) = &expect.sha256
            && *expected != actual
        {
            return Err(ModelError::HashMismatch {
                path: dest.to_owned(),
                expected: expected.clone(),
                actual,
            });
        }
        if require_gguf && self.head.as_slice() != GGUF_MAGIC {
            return Err(ModelError::NotGguf {
                path: dest.to_owned(),
            });
        }
        self.file
            .get_ref()
            .sync_all()
            .map_err(|e| ModelError::io(format!("cannot fsync {}", self.path.display()), e))?;
        fs::rename(&self.path, dest).map_err(|e| {
            ModelError::io(
                format!(
                    "cannot rename {} to {}",
                    self.path.display(),
                    dest.display()
                ),
                e,
            )
        })?;
        self.guard.disarm();
        sync_parent(dest)?;
        Ok(actual)
    }
}

/// Makes a rename durable: without it a crash can forget the new directory entry.
pub(crate) fn sync_parent(path: &Path) -> Result<(), ModelError> {
    #[cfg(unix)]
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| ModelError::io(format!("cannot fsync {}", dir.display()), e))?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Hashes a whole file; the slow path when no sidecar vouches for it.
pub(crate) fn hash_file(path: &Path, progress: &dyn Progress) -> Result<(u64, String), ModelError> {
    let mut file = File::open(path)
        .map_err(|e| ModelError::io(format!("cannot open {}", path.display()), e))?;
    let total = file.metadata().map(|m| m.len()).ok();
    progress.start(&format!("verifying {}", display_name(path)), total);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut size = 0u64;
    let result = loop {
        match file.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                hasher.update(buf.get(..n).unwrap_or_default());
                size += n as u64;
                progress.advance(n as u64);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Err(ModelError::io(format!("cannot read {}", path.display()), e)),
        }
    };
    progress.finish();
    result.map(|()| (size, hex::encode(hasher.finalize())))
}

/// Opens `path` as a regular file with its metadata; `not_a_file` is the error for a directory
/// or another non-file.
fn open_file(
    path: &Path,
    not_a_file: impl FnOnce() -> ModelError,
) -> Result<(File, std::fs::Metadata), ModelError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(ModelError::NotFound {
                path: path.to_owned(),
            });
        }
        Err(e) => return Err(ModelError::io(format!("cannot open {}", path.display()), e)),
    };
    let meta = file
        .metadata()
        .map_err(|e| ModelError::io(format!("cannot stat {}", path.display()), e))?;
    if !meta.is_file() {
        return Err(not_a_file());
    }
    Ok((file, meta))
}

/// Fails unless `path` is an existing file starting with the GGUF magic.
pub(crate) fn check_gguf(path: &Path) -> Result<u64, ModelError> {
    let (mut file, meta) = open_file(path, || ModelError::NotGguf {
        path: path.to_owned(),
    })?;
    let mut magic = [0u8; 4];
    match file.read_exact(&mut magic) {
        Ok(()) if &magic == GGUF_MAGIC => Ok(meta.len()),
        Ok(()) => Err(ModelError::NotGguf {
            path: path.to_owned(),
        }),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(ModelError::NotGguf {
            path: path.to_owned(),
        }),
        Err(e) => Err(ModelError::io(format!("cannot read {}", path.display()), e)),
    }
}

/// Fails unless `path` is an existing file that starts like a safetensors file: a header length
/// that fits in the file, then a JSON object. Returns the file size.
pub(crate) fn check_safetensors(path: &Path) -> Result<u64, ModelError> {
    let not = || ModelError::NotSafetensors {
        path: path.to_owned(),
    };
    let (mut file, meta) = open_file(path, not)?;
    let mut head = [0u8; 9];
    match file.read_exact(&mut head) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(not()),
        Err(e) => return Err(ModelError::io(format!("cannot read {}", path.display()), e)),
    }
    let [l0, l1, l2, l3, l4, l5, l6, l7, first] = head;
    let header = u64::from_le_bytes([l0, l1, l2, l3, l4, l5, l6, l7]);
    let fits =
        (2..=MAX_SAFETENSORS_HEADER).contains(&header) && header <= meta.len().saturating_sub(8);
    if fits && first == b'{' {
        Ok(meta.len())
    } else {
        Err(not())
    }
}

/// Checks that `path` is a model file we can hand to an engine: safetensors by name, else GGUF.
pub(crate) fn check_model_file(path: &Path) -> Result<u64, ModelError> {
    match Format::of(path) {
        Some(Format::Safetensors) => check_safetensors(path),
        Some(Format::Gguf) | None => check_gguf(path),
    }
}

/// State of a model file already under its final name.
#[derive(Debug)]
pub(crate) enum Existing {
    Missing,
    /// Verified now or vouched for by a current sidecar.
    Good(Sidecar),
    /// Present but wrong, or impossible to vouch for; the error says which.
    Bad(ModelError),
}

/// Decides whether `path` can be used as is, re-hashing only when no sidecar vouches for it.
pub(crate) fn check_existing(
    path: &Path,
    expect: &Expect,
    source: &str,
    progress: &dyn Progress,
) -> Result<Existing, ModelError> {
    let stamp = match Stamp::of(path) {
        Ok(s) => s,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Existing::Missing),
        Err(e) => return Err(ModelError::io(format!("cannot stat {}", path.display()), e)),
    };
    if let Some(expected) = expect.size
        && stamp.size != expected
    {
        return Ok(Existing::Bad(ModelError::SizeMismatch {
            path: path.to_owned(),
            expected,
            actual: stamp.size,
        }));
    }
    if let Some(sidecar) = read_sidecar(path).filter(|s| stamp.matches(s)) {
        return Ok(match &expect.sha256 {
            Some(expected) if *expected != sidecar.sha256 => {
                Existing::Bad(ModelError::HashMismatch {
                    path: path.to_owned(),
                    expected: expected.clone(),
                    actual: sidecar.sha256,
                })
            }
            Some(_) => Existing::Good(Sidecar {
                pinned: true,
                ..sidecar
            }),
            None => Existing::Good(sidecar),
        });
    }
    let Some(expected) = &expect.sha256 else {
        return Ok(Existing::Bad(ModelError::Unverifiable {
            path: path.to_owned(),
        }));
    };
    let (_, actual) = hash_file(path, progress)?;
    if actual != *expected {
        return Ok(Existing::Bad(ModelError::HashMismatch {
            path: path.to_owned(),
            expected: expected.clone(),
            actual,
        }));
    }
    write_sidecar(path, &actual, true, source).map(Existing::Good)
}

pub(crate) fn display_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}
