//! Structured output (`response_format` `json_object` / `json_schema`) by
//! constrained decoding with `llguidance`: before each sample, the tokens
//! that cannot continue a document matching the schema are masked out, so
//! the answer is valid by construction.

use crate::error::ApiError;
use hanlin_engine::{LoadedModel, TokenConstraint};
use llguidance::api::TopLevelGrammar;
use llguidance::earley::SlicedBiasComputer;
use llguidance::toktrie::{ApproximateTokEnv, InferenceCapabilities, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// One parser factory per model (building the token trie takes a moment).
#[derive(Default)]
pub struct Grammars {
    factories: Mutex<HashMap<String, Arc<ParserFactory>>>,
}

fn factory_for(m: &LoadedModel) -> Result<ParserFactory, String> {
    let tok = &m.tokenizer;
    let vocab = m.model.cfg.vocab_size;
    let words: Vec<Vec<u8>> = (0..vocab as u32)
        .map(|id| {
            let bytes = tok.token_bytes(id, false);
            if !bytes.is_empty() {
                return bytes.to_vec();
            }
            // Special tokens are marked for the trie so text never matches them.
            match tok.token_str(id) {
                Some(name) if !name.is_empty() => {
                    let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    w.extend_from_slice(name.as_bytes());
                    w
                }
                _ => Vec::new(),
            }
        })
        .collect();
    let eos = tok.eos.unwrap_or(0);
    let trie = TokTrie::from(&TokRxInfo::new(vocab as u32, eos), &words);
    let env: llguidance::toktrie::TokEnv = Arc::new(ApproximateTokEnv::new(trie));
    let mut f = ParserFactory::new(
        &env,
        InferenceCapabilities::default(),
        &SlicedBiasComputer::general_slices(),
    )
    .map_err(|e| e.to_string())?;
    f.quiet();
    Ok(f)
}

impl Grammars {
    fn factory(&self, name: &str, m: &LoadedModel) -> Result<Arc<ParserFactory>, ApiError> {
        let mut map = self.factories.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = map.get(name) {
            return Ok(f.clone());
        }
        let f = Arc::new(factory_for(m).map_err(|e| {
            ApiError::internal(format!("structured output is unavailable for {name}: {e}"))
        })?);
        map.insert(name.to_string(), f.clone());
        Ok(f)
    }

    /// The JSON schema a `response_format` asks for (`None`: plain text).
    pub fn schema_of(response_format: Option<&Value>) -> Result<Option<Value>, ApiError> {
        let Some(rf) = response_format else {
            return Ok(None);
        };
        let bad = |msg: String| ApiError::bad_request(msg).param("response_format");
        match rf.get("type").and_then(Value::as_str) {
            Some("text") => Ok(None),
            Some("json_object") => Ok(Some(serde_json::json!({"type": "object"}))),
            Some("json_schema") => {
                let schema = rf
                    .get("json_schema")
                    .and_then(|j| j.get("schema"))
                    .ok_or_else(|| bad("response_format.json_schema.schema is required.".into()))?;
                if !schema.is_object() {
                    return Err(bad("response_format.json_schema.schema must be an object.".into()));
                }
                Ok(Some(schema.clone()))
            }
            other => Err(bad(format!(
                "Invalid response_format type {other:?}: use 'text', 'json_object' or 'json_schema'."
            ))),
        }
    }

    /// A fresh constraint for one sequence.
    pub fn constraint(
        &self,
        model_name: &str,
        m: &LoadedModel,
        schema: &Value,
    ) -> Result<Box<dyn TokenConstraint>, ApiError> {
        let f = self.factory(model_name, m)?;
        let mut schema = schema.clone();
        if let Some(obj) = schema.as_object_mut() {
            // One-line JSON with fixed separators: free whitespace lets a
            // sampled answer wander into blank lines until max_tokens (the
            // schema may override this with its own "x-guidance").
            obj.entry("x-guidance").or_insert(serde_json::json!({
                "whitespace_flexible": false,
                "item_separator": ", ",
                "key_separator": ": ",
            }));
        }
        let parser = f
            .create_parser(TopLevelGrammar::from_json_schema(schema))
            .map_err(|e| {
                ApiError::bad_request(format!("Invalid JSON schema: {e}"))
                    .param("response_format")
                    .code("invalid_json_schema")
            })?;
        Ok(Box::new(JsonConstraint {
            m: Matcher::new(Ok(parser)),
        }))
    }
}

struct JsonConstraint {
    m: Matcher,
}

impl TokenConstraint for JsonConstraint {
    fn mask(&mut self, logits: &mut [f32]) -> bool {
        let Ok(allowed) = self.m.compute_mask_or_eos() else {
            return false;
        };
        let mut any = false;
        for (i, l) in logits.iter_mut().enumerate() {
            if allowed.is_allowed(i as u32) {
                any |= l.is_finite();
            } else {
                *l = f32::NEG_INFINITY;
            }
        }
        any
    }

    fn accept(&mut self, token: u32) {
        if let Err(e) = self.m.consume_token(token) {
            tracing::warn!("structured output: {e}");
        }
    }
}
