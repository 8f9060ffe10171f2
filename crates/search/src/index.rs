//! A knowledge base on disk: `docs.jsonl` (every document added, the source
//! of truth) and `index/` (a tantivy index of their passages, derived from
//! it, so it can always be rebuilt). Text is analysed with jieba (Chinese
//! word segmentation, search mode; English words come out whole) and lower-
//! cased; whitespace and punctuation tokens are dropped.

use crate::chunk::chunk;
use crate::extract::Document;
use crate::{Passage, Retriever, SearchError};
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use tantivy::collector::TopDocs;
use tantivy::query::QueryParser;
use tantivy::schema::{
    Field, IndexRecordOption, Schema, TextFieldIndexing, TextOptions, Value, FAST, STORED, STRING,
};
use tantivy::tokenizer::{LowerCaser, TextAnalyzer, Token, TokenFilter, TokenStream, Tokenizer};
use tantivy::{doc, Index, IndexReader, ReloadPolicy, TantivyDocument, Term};

/// Passage length in characters.
pub const PASSAGE_CHARS: usize = 300;
const ANALYZER: &str = "hanlin_zh_en";

/// Drops tokens that are only whitespace or punctuation (jieba emits them).
#[derive(Clone)]
struct WordsOnly;

struct WordsOnlyStream<T>(T);

#[derive(Clone)]
struct WordsOnlyWrapper<T>(T);

impl TokenFilter for WordsOnly {
    type Tokenizer<T: Tokenizer> = WordsOnlyWrapper<T>;
    fn transform<T: Tokenizer>(self, tokenizer: T) -> WordsOnlyWrapper<T> {
        WordsOnlyWrapper(tokenizer)
    }
}

impl<T: Tokenizer> Tokenizer for WordsOnlyWrapper<T> {
    type TokenStream<'a> = WordsOnlyStream<T::TokenStream<'a>>;
    fn token_stream<'a>(&'a mut self, text: &'a str) -> Self::TokenStream<'a> {
        WordsOnlyStream(self.0.token_stream(text))
    }
}

impl<T: TokenStream> TokenStream for WordsOnlyStream<T> {
    fn advance(&mut self) -> bool {
        while self.0.advance() {
            if self.0.token().text.chars().any(char::is_alphanumeric) {
                return true;
            }
        }
        false
    }
    fn token(&self) -> &Token {
        self.0.token()
    }
    fn token_mut(&mut self) -> &mut Token {
        self.0.token_mut()
    }
}

/// The analyzer used for indexing and queries.
pub fn analyzer() -> TextAnalyzer {
    TextAnalyzer::builder(tantivy_jieba::JiebaTokenizer::new())
        .filter(WordsOnly)
        .filter(LowerCaser)
        .build()
}

/// The words of `text` as the index sees them.
pub fn words(text: &str) -> Vec<String> {
    let mut a = analyzer();
    let mut s = a.token_stream(text);
    let mut out = Vec::new();
    while s.advance() {
        out.push(s.token().text.clone());
    }
    out
}

struct Fields {
    doc_id: Field,
    chunk: Field,
    title: Field,
    text: Field,
    source: Field,
    published: Field,
}

fn schema() -> (Schema, Fields) {
    let mut b = Schema::builder();
    let text_opts = TextOptions::default()
        .set_indexing_options(
            TextFieldIndexing::default()
                .set_tokenizer(ANALYZER)
                .set_index_option(IndexRecordOption::WithFreqsAndPositions),
        )
        .set_stored();
    let f = Fields {
        doc_id: b.add_text_field("doc_id", STRING | STORED),
        chunk: b.add_u64_field("chunk", STORED),
        title: b.add_text_field("title", text_opts.clone()),
        text: b.add_text_field("text", text_opts),
        source: b.add_text_field("source", STORED),
        published: b.add_i64_field("published", STORED | FAST),
    };
    (b.build(), f)
}

/// A stored document.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StoredDoc {
    pub id: String,
    pub added: i64,
    #[serde(flatten)]
    pub doc: Document,
}

/// What an `add` did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct AddReport {
    pub added: usize,
    pub duplicates: usize,
    pub passages: usize,
}

pub struct KnowledgeBase {
    dir: PathBuf,
    name: String,
    index: Index,
    reader: IndexReader,
    fields: Fields,
    ids: HashSet<String>,
}

/// A document's identity: the hash of its text without whitespace, so the
/// same text added twice (or from two files, differently wrapped) is stored
/// once.
pub fn doc_id(text: &str) -> String {
    let norm: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    hex::encode(&Sha256::digest(norm.as_bytes())[..12])
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl KnowledgeBase {
    /// Create an empty knowledge base in `dir` (which must not hold one).
    pub fn create(dir: &Path) -> Result<Self, SearchError> {
        if dir.join("docs.jsonl").exists() {
            return Err(SearchError::Exists(dir.to_path_buf()));
        }
        std::fs::create_dir_all(dir.join("index"))?;
        std::fs::File::create(dir.join("docs.jsonl"))?;
        let (schema, _) = schema();
        Index::create_in_dir(dir.join("index"), schema).map_err(|e| corrupt(dir, e))?;
        Self::open(dir)
    }

    /// Open the knowledge base in `dir`.
    pub fn open(dir: &Path) -> Result<Self, SearchError> {
        if !dir.join("docs.jsonl").exists() {
            return Err(SearchError::NotFound(dir.to_path_buf()));
        }
        let index = Index::open_in_dir(dir.join("index")).map_err(|e| corrupt(dir, e))?;
        index.tokenizers().register(ANALYZER, analyzer());
        let reader = index
            .reader_builder()
            .reload_policy(ReloadPolicy::Manual)
            .try_into()
            .map_err(|e| corrupt(dir, e))?;
        let (_, fields) = schema();
        let mut kb = Self {
            dir: dir.to_path_buf(),
            name: dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            index,
            reader,
            fields,
            ids: HashSet::new(),
        };
        // Check that the index is readable now rather than at the first query.
        kb.reader.reload().map_err(|e| corrupt(dir, e))?;
        kb.ids = kb.documents()?.into_iter().map(|d| d.id).collect();
        Ok(kb)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every stored document (unreadable lines — a write cut short — are
    /// skipped with a warning).
    pub fn documents(&self) -> Result<Vec<StoredDoc>, SearchError> {
        let f = std::fs::File::open(self.dir.join("docs.jsonl"))?;
        let mut out = Vec::new();
        for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<StoredDoc>(&line) {
                Ok(d) => out.push(d),
                Err(e) => tracing::warn!("{}: docs.jsonl line {}: {e}", self.name, i + 1),
            }
        }
        Ok(out)
    }

    /// Add documents (duplicates of stored ones are skipped); `progress` is
    /// called after each.
    pub fn add(
        &mut self,
        docs: Vec<Document>,
        mut progress: impl FnMut(usize),
    ) -> Result<AddReport, SearchError> {
        let mut writer: tantivy::IndexWriter = self
            .index
            .writer(50_000_000)
            .map_err(|e| corrupt(&self.dir, e))?;
        let mut log = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.join("docs.jsonl"))?;
        let mut report = AddReport::default();
        for (i, doc) in docs.into_iter().enumerate() {
            let id = doc_id(&doc.text);
            if !self.ids.insert(id.clone()) {
                report.duplicates += 1;
                progress(i + 1);
                continue;
            }
            let stored = StoredDoc {
                id,
                added: now(),
                doc,
            };
            report.passages += self.index_doc(&writer, &stored)?;
            let mut line = serde_json::to_string(&stored)?;
            line.push('\n');
            log.write_all(line.as_bytes())?;
            report.added += 1;
            progress(i + 1);
        }
        log.sync_data()?;
        writer.commit().map_err(|e| corrupt(&self.dir, e))?;
        self.reader.reload().map_err(|e| corrupt(&self.dir, e))?;
        Ok(report)
    }

    fn index_doc(
        &self,
        writer: &tantivy::IndexWriter,
        d: &StoredDoc,
    ) -> Result<usize, SearchError> {
        let f = &self.fields;
        let passages = chunk(&d.doc.text, PASSAGE_CHARS);
        for (i, p) in passages.iter().enumerate() {
            writer
                .add_document(doc!(
                    f.doc_id => d.id.as_str(),
                    f.chunk => i as u64,
                    f.title => d.doc.title.as_str(),
                    f.text => p.as_str(),
                    f.source => d.doc.source.as_str(),
                    f.published => d.doc.published.unwrap_or(0),
                ))
                .map_err(|e| corrupt(&self.dir, e))?;
        }
        Ok(passages.len())
    }

    /// Remove one document (by id).
    pub fn remove(&mut self, id: &str) -> Result<bool, SearchError> {
        if !self.ids.remove(id) {
            return Ok(false);
        }
        let docs: Vec<StoredDoc> = self
            .documents()?
            .into_iter()
            .filter(|d| d.id != id)
            .collect();
        let tmp = self.dir.join("docs.jsonl.tmp");
        {
            let mut f = std::fs::File::create(&tmp)?;
            for d in &docs {
                writeln!(f, "{}", serde_json::to_string(d)?)?;
            }
            f.sync_all()?;
        }
        std::fs::rename(&tmp, self.dir.join("docs.jsonl"))?;
        let mut writer: tantivy::IndexWriter = self
            .index
            .writer(50_000_000)
            .map_err(|e| corrupt(&self.dir, e))?;
        writer.delete_term(Term::from_field_text(self.fields.doc_id, id));
        writer.commit().map_err(|e| corrupt(&self.dir, e))?;
        self.reader.reload().map_err(|e| corrupt(&self.dir, e))?;
        Ok(true)
    }

    /// Throw the index away and index every stored document again (after
    /// the index directory was deleted or damaged).
    pub fn rebuild(
        dir: &Path,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Self, SearchError> {
        if !dir.join("docs.jsonl").exists() {
            return Err(SearchError::NotFound(dir.to_path_buf()));
        }
        let index_dir = dir.join("index");
        if index_dir.exists() {
            std::fs::remove_dir_all(&index_dir)?;
        }
        std::fs::create_dir_all(&index_dir)?;
        let (schema, _) = schema();
        Index::create_in_dir(&index_dir, schema).map_err(|e| corrupt(dir, e))?;
        let kb = Self::open(dir)?;
        let docs = kb.documents()?;
        let mut writer: tantivy::IndexWriter =
            kb.index.writer(50_000_000).map_err(|e| corrupt(dir, e))?;
        let mut seen = HashSet::new();
        for (i, d) in docs.iter().enumerate() {
            if seen.insert(d.id.clone()) {
                kb.index_doc(&writer, d)?;
            }
            progress(i + 1, docs.len());
        }
        writer.commit().map_err(|e| corrupt(dir, e))?;
        kb.reader.reload().map_err(|e| corrupt(dir, e))?;
        Ok(kb)
    }

    /// Number of passages in the index.
    pub fn passages(&self) -> u64 {
        self.reader.searcher().num_docs()
    }
}

impl Retriever for KnowledgeBase {
    fn search(&self, query: &str, k: usize) -> Result<Vec<Passage>, SearchError> {
        let searcher = self.reader.searcher();
        let f = &self.fields;
        let mut qp = QueryParser::for_index(&self.index, vec![f.title, f.text]);
        qp.set_field_boost(f.title, 0.5);
        // The user's words are words: no query syntax.
        let escaped: String = words(query).join(" ");
        if escaped.is_empty() {
            return Ok(Vec::new());
        }
        let (q, _) = qp.parse_query_lenient(&escaped);
        let top = searcher
            .search(&q, &TopDocs::with_limit(k.max(1)).order_by_score())
            .map_err(|e| corrupt(&self.dir, e))?;
        let mut out = Vec::with_capacity(top.len());
        for (score, addr) in top {
            let d: TantivyDocument = searcher.doc(addr).map_err(|e| corrupt(&self.dir, e))?;
            let s = |fl: Field| {
                d.get_first(fl)
                    .and_then(|v| v.as_str())
                    .unwrap_or("")
                    .to_string()
            };
            let published = d
                .get_first(f.published)
                .and_then(|v| v.as_i64())
                .unwrap_or(0);
            out.push(Passage {
                kb: self.name.clone(),
                doc_id: s(f.doc_id),
                chunk: d.get_first(f.chunk).and_then(|v| v.as_u64()).unwrap_or(0),
                title: s(f.title),
                source: s(f.source),
                text: s(f.text),
                published: (published != 0).then_some(published),
                score,
            });
        }
        Ok(out)
    }
}

fn corrupt(dir: &Path, e: impl std::fmt::Display) -> SearchError {
    SearchError::Index {
        dir: dir.to_path_buf(),
        reason: e.to_string(),
    }
}
