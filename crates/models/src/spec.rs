//! Parsing what the user typed after `--model` or `lattice model pull`.
//! A spec is a catalog name, `hf:OWNER/REPO[@REVISION]/PATH.gguf`, or a path to a GGUF or
//! safetensors file.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::catalog::{self, CatalogEntry};
use crate::error::ModelError;
use crate::files::Format;

/// Revision used when an `hf:` spec names none.
pub const DEFAULT_REVISION: &str = "main";

// Bounds on spec parts: they become URL and path components, so untrusted input stays small.
const MAX_NAME: usize = 96;
const MAX_REVISION: usize = 128;
const MAX_SEGMENT: usize = 255;
const MAX_PATH: usize = 1024;

/// A model as the user named it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSpec {
    /// A model from the built-in catalog.
    Catalog(&'static CatalogEntry),
    /// One file of a Hugging Face repository.
    HuggingFace(HfFile),
    /// A GGUF file (or a `.safetensors` embedding model) already on disk, used in place.
    Path(PathBuf),
}

impl ModelSpec {
    /// Parses a spec: `hf:` prefix first, then catalog names, then anything path-like.
    ///
    /// A bare word that is neither a catalog name nor path-like (no separator, no `.gguf` or
    /// `.safetensors`)
    /// is refused rather than taken as a relative path, because it is almost always a typo
    /// of a model name; write `./name` to mean a file.
    pub fn parse(spec: &str) -> Result<Self, ModelError> {
        let trimmed = spec.trim();
        if trimmed.is_empty() {
            return Err(invalid(spec, "it is empty"));
        }
        if let Some(rest) = trimmed.strip_prefix("hf:") {
            return HfFile::parse(rest)
                .map(ModelSpec::HuggingFace)
                .map_err(|reason| invalid(spec, &reason));
        }
        if let Some(entry) = catalog::find(trimmed) {
            return Ok(ModelSpec::Catalog(entry));
        }
        let looks_like_path = trimmed.contains(['/', '\\'])
            || Format::of_name(trimmed).is_some()
            || Path::new(trimmed).is_absolute();
        if looks_like_path {
            return Ok(ModelSpec::Path(PathBuf::from(trimmed)));
        }
        Err(ModelError::UnknownModel {
            spec: trimmed.to_owned(),
            known: catalog::known_names(),
        })
    }

    /// Catalog entry behind this spec, if any.
    pub fn catalog_entry(&self) -> Option<&'static CatalogEntry> {
        match self {
            ModelSpec::Catalog(entry) => Some(entry),
            _ => None,
        }
    }
}

impl fmt::Display for ModelSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelSpec::Catalog(entry) => f.write_str(entry.name),
            ModelSpec::HuggingFace(file) => file.fmt(f),
            ModelSpec::Path(path) => path.display().fmt(f),
        }
    }
}

/// One file in a Hugging Face repository, pinned to a revision (branch, tag or commit).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HfFile {
    pub owner: String,
    pub repo: String,
    /// Branch, tag or commit id. Names with `/` (such as `refs/pr/1`) are not accepted:
    /// the `/` would be ambiguous with the file path, so pin the commit id instead.
    pub revision: String,
    /// Path of the file inside the repository, `/`-separated.
    pub path: String,
}

impl HfFile {
    /// Parses `OWNER/REPO[@REVISION]/PATH`, the part after `hf:`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (owner, rest) = s
            .split_once('/')
            .ok_or("expected hf:OWNER/REPO[@REVISION]/PATH/TO/FILE.gguf")?;
        let (repo_rev, path) = rest
            .split_once('/')
            .ok_or("missing the file path after OWNER/REPO")?;
        let (repo, revision) = match repo_rev.split_once('@') {
            Some((repo, rev)) => (repo, rev),
            None => (repo_rev, DEFAULT_REVISION),
        };
        check_name("owner", owner, MAX_NAME, |c| {
            c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
        })?;
        check_name("repository", repo, MAX_NAME, |c| {
            c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
        })?;
        check_name("revision", revision, MAX_REVISION, |c| {
            c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
        })?;
        if path.len() > MAX_PATH {
            return Err(format!("the file path is longer than {MAX_PATH} bytes"));
        }
        for segment in path.split('/') {
            check_name("file path segment", segment, MAX_SEGMENT, |c| {
                !c.is_control() && !matches!(c, '\\' | ':')
            })?;
        }
        if !path.to_ascii_lowercase().ends_with(".gguf") {
            return Err("the file must be a .gguf file".into());
        }
        Ok(HfFile {
            owner: owner.into(),
            repo: repo.into(),
            revision: revision.into(),
            path: path.into(),
        })
    }

    /// Where the file lives under the models directory; every part was checked by `parse`.
    pub fn relative_path(&self) -> PathBuf {
        let mut p = PathBuf::from("hf");
        p.push(&self.owner);
        p.push(&self.repo);
        p.push(&self.revision);
        p.extend(self.path.split('/'));
        p
    }

    /// The file name without its directories.
    pub fn file_name(&self) -> &str {
        self.path.rsplit('/').next().unwrap_or(&self.path)
    }
}

impl fmt::Display for HfFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "hf:{}/{}", self.owner, self.repo)?;
        if self.revision != DEFAULT_REVISION {
            write!(f, "@{}", self.revision)?;
        }
        write!(f, "/{}", self.path)
    }
}

/// Normalises a user-given sha256 to lowercase hex, refusing anything else.
pub fn parse_sha256(value: &str) -> Result<String, ModelError> {
    let v = value.trim().to_ascii_lowercase();
    if v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(v)
    } else {
        Err(ModelError::InvalidSha256 {
            value: value.to_owned(),
        })
    }
}

fn check_name(what: &str, s: &str, max: usize, ok: impl Fn(char) -> bool) -> Result<(), String> {
    if s.is_empty() {
        return Err(format!("the {what} is empty"));
    }
    if s == "." || s == ".." {
        return Err(format!("the {what} may not be `{s}`"));
    }
    if s.len() > max {
        return Err(format!("the {what} is longer than {max} bytes"));
    }
    if let Some(c) = s.chars().find(|&c| !ok(c)) {
        return Err(format!("the {what} `{s}` contains {c:?}"));
    }
    Ok(())
}

fn invalid(spec: &str, reason: &str) -> ModelError {
    ModelError::InvalidSpec {
        spec: spec.to_owned(),
        reason: reason.to_owned(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn catalog_names() {
        let spec = ModelSpec::parse("smollm2-135m").unwrap();
        assert_eq!(spec.catalog_entry().map(|e| e.name), Some("smollm2-135m"));
        assert_eq!(spec.to_string(), "smollm2-135m");
        let spec = ModelSpec::parse(" Gemma3-270M ").unwrap();
        assert_eq!(spec.catalog_entry().map(|e| e.name), Some("gemma3-270m"));
    }

    #[test]
    fn unknown_word_is_refused_with_the_catalog() {
        let err = ModelSpec::parse("smollm3").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("unknown model `smollm3`"), "{msg}");
        assert!(msg.contains("`smollm2-135m`"), "{msg}");
        assert!(matches!(
            ModelSpec::parse("  "),
            Err(ModelError::InvalidSpec { .. })
        ));
    }

    #[test]
    fn paths() {
        for p in [
            "./model.gguf",
            "/abs/x.bin",
            "model.GGUF",
            "all-MiniLM-L6-v2.safetensors",
            "dir/smollm2-135m",
        ] {
            assert_eq!(
                ModelSpec::parse(p).unwrap(),
                ModelSpec::Path(PathBuf::from(p)),
                "{p}"
            );
        }
    }

    #[test]
    fn hf_specs() {
        let spec =
            ModelSpec::parse("hf:bartowski/SmolLM2-135M-Instruct-GGUF/q/SmolLM2.Q4_K_M.gguf")
                .unwrap();
        let ModelSpec::HuggingFace(f) = &spec else {
            panic!("not hf: {spec:?}");
        };
        assert_eq!(f.owner, "bartowski");
        assert_eq!(f.repo, "SmolLM2-135M-Instruct-GGUF");
        assert_eq!(f.revision, "main");
        assert_eq!(f.path, "q/SmolLM2.Q4_K_M.gguf");
        assert_eq!(f.file_name(), "SmolLM2.Q4_K_M.gguf");
        assert_eq!(
            f.relative_path(),
            PathBuf::from("hf/bartowski/SmolLM2-135M-Instruct-GGUF/main/q/SmolLM2.Q4_K_M.gguf")
        );
        assert_eq!(
            spec.to_string(),
            "hf:bartowski/SmolLM2-135M-Instruct-GGUF/q/SmolLM2.Q4_K_M.gguf"
        );

        let f = HfFile::parse("o/r@v1.0/m.gguf").unwrap();
        assert_eq!(f.revision, "v1.0");
        assert_eq!(f.to_string(), "hf:o/r@v1.0/m.gguf");
        assert_eq!(HfFile::parse(&f.to_string()[3..]).unwrap(), f);
    }

    #[test]
    fn bad_hf_specs() {
        for bad in [
            "hf:",
            "hf:owner",
            "hf:owner/repo",
            "hf:owner/repo/",
            "hf:/repo/x.gguf",
            "hf:owner/repo@/x.gguf",
            "hf:owner/../x.gguf",
            "hf:owner/repo/../../etc/x.gguf",
            "hf:owner/repo/a//x.gguf",
            "hf:owner/repo/x.bin",
            "hf:own er/repo/x.gguf",
            "hf:owner/repo/c:\\x.gguf",
            "hf:owner/repo@refs%2Fpr%2F1/x.gguf",
        ] {
            let err = ModelSpec::parse(bad);
            assert!(
                matches!(err, Err(ModelError::InvalidSpec { .. })),
                "{bad}: {err:?}"
            );
        }
        // `@a/b` parses as revision `a` and path `b/x.gguf`: documented, so only check it's sane.
        assert_eq!(HfFile::parse("o/r@a/b/x.gguf").unwrap().path, "b/x.gguf");
    }

    #[test]
    fn sha256_values() {
        let upper = "B179C9523D0E6A0F98A330C7562B682750A6F8C8C15E5BC70EA373728110DB53";
        assert_eq!(parse_sha256(upper).unwrap(), upper.to_ascii_lowercase());
        assert!(parse_sha256("abc").is_err());
        assert!(parse_sha256(&"g".repeat(64)).is_err());
    }
}
