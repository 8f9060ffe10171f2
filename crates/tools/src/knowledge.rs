//! `search_knowledge`: passages from the caller's knowledge bases, each
//! numbered for citation (`[n]`) across the request's searches, as
//! `hanlin ask` cites them. What is searchable is the caller's business:
//! the server hands the tool a [`Knowledge`] that reads only the bases the
//! caller may read.

use crate::{Context, Spec, Tool, ToolError};
use futures::future::BoxFuture;
use serde::Serialize;
use serde_json::{json, Value};

/// One passage found.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Hit {
    pub title: String,
    pub source: String,
    pub text: String,
    /// Unix time the document was published, when known.
    pub published: Option<i64>,
}

impl Hit {
    pub(crate) fn same(&self, o: &Hit) -> bool {
        self.source == o.source && self.text == o.text
    }
}

/// Searches what one caller may read.
pub trait Knowledge: Send + Sync {
    fn search<'a>(&'a self, query: &'a str, k: usize) -> BoxFuture<'a, Result<Vec<Hit>, String>>;
}

/// Longest query taken, in characters.
pub const MAX_QUERY: usize = 500;
/// Characters of each passage shown to the model.
const PASSAGE_CHARS: usize = 600;

pub struct SearchKnowledge;

/// A source as the model sees it: a web address whole, a file by its
/// name (the server's directories are nobody's business in an answer).
fn shown(source: &str) -> &str {
    if source.contains("://") {
        source
    } else {
        source.rsplit(['/', '\\']).next().unwrap_or(source)
    }
}

impl Tool for SearchKnowledge {
    fn spec(&self) -> Spec {
        Spec {
            name: "search_knowledge".into(),
            description: "Search the user's knowledge bases (documents, notes, news feeds). Returns numbered passages; cite them in the answer as [1], [2].".into(),
            parameters: json!({
                "type": "object",
                "properties": {
                    "query": {"type": "string", "description": "What to look for, in the words the documents would use"},
                    "k": {"type": "integer", "minimum": 1, "maximum": 10, "description": "How many passages (default 4)"}
                },
                "required": ["query"],
                "additionalProperties": false
            }),
        }
    }

    fn call<'a>(
        &'a self,
        args: Value,
        cx: &'a Context,
    ) -> BoxFuture<'a, Result<String, ToolError>> {
        Box::pin(async move {
            let query = args["query"].as_str().unwrap_or_default().trim();
            if query.is_empty() || query.chars().count() > MAX_QUERY {
                return Err(ToolError::Arguments(format!(
                    "the query must be 1 to {MAX_QUERY} characters"
                )));
            }
            let k = args["k"].as_u64().unwrap_or(4) as usize;
            let Some(kb) = &cx.knowledge else {
                return Err(ToolError::Failed(
                    "no knowledge base is available to this user".into(),
                ));
            };
            let hits = kb.search(query, k).await.map_err(ToolError::Failed)?;
            if hits.is_empty() {
                return Ok(format!("No passage matches {query:?}."));
            }
            let mut out = String::new();
            for (n, h) in cx.cite(hits) {
                let text: String = h.text.chars().take(PASSAGE_CHARS).collect();
                out.push_str(&format!(
                    "[{n}] {} ({})\n{}\n\n",
                    h.title,
                    shown(&h.source),
                    text
                ));
            }
            Ok(out.trim_end().to_string())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Limits;
    use std::sync::Arc;

    struct Two;
    impl Knowledge for Two {
        fn search<'a>(&'a self, q: &'a str, _: usize) -> BoxFuture<'a, Result<Vec<Hit>, String>> {
            Box::pin(async move {
                if q == "down" {
                    return Err("the index is being rebuilt".into());
                }
                Ok(vec![Hit {
                    title: "翰林院".into(),
                    source: "/srv/kb/hanlin.md".into(),
                    text: "翰林院始设于唐朝。".into(),
                    published: None,
                }])
            })
        }
    }

    #[tokio::test]
    async fn passages_come_numbered_and_failures_are_errors() {
        let cx = Context::new(chrono_tz::UTC, Limits::default()).with_knowledge(Arc::new(Two));
        let r = SearchKnowledge
            .call(json!({"query": "翰林院"}), &cx)
            .await
            .expect("ok");
        assert_eq!(r, "[1] 翰林院 (hanlin.md)\n翰林院始设于唐朝。");
        let e = SearchKnowledge
            .call(json!({"query": "down"}), &cx)
            .await
            .expect_err("down");
        assert!(e.to_string().contains("rebuilt"));
        let none = Context::new(chrono_tz::UTC, Limits::default());
        assert!(SearchKnowledge
            .call(json!({"query": "x"}), &none)
            .await
            .is_err());
    }
}
