//! A knowledge base on disk: `docs.jsonl` (every document added, the source
//! of truth) and `index/` (a tantivy index of their passages, derived from
//! it, so it can always be rebuilt). Text is analysed with jieba (Chinese
//! word segmentation, search mode; English words come out whole) and lower-
//! cased; whitespace and punctuation tokens are dropped.
//!
//! A knowledge base may also embed its passages (`config.json` names the
//! embedding model; the vectors are in `dense.bin`, [`crate::dense`]) for
//! dense retrieval beside BM25.

use crate::chunk::chunk;
use crate::dense::{Embedder, Vectors};
use crate::extract::Document;
use crate::{Passage, Retriever, SearchError};
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use tantivy::collector::TopDocs;
use tantivy::query::{QueryParser, TermQuery};
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

/// A knowledge base's settings (`config.json`).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct KbConfig {
    /// The model that embeds passages for dense retrieval (none: BM25 only).
    #[serde(default)]
    pub embedder: Option<String>,
}

pub struct KnowledgeBase {
    dir: PathBuf,
    name: String,
    index: Index,
    reader: IndexReader,
    fields: Fields,
    ids: HashSet<String>,
    config: KbConfig,
    vectors: Option<Vectors>,
}

/// Passages are embedded with their document's title, in batches of this many.
const EMBED_BATCH: usize = 32;

/// What an embedder is given for a passage.
fn embed_text(title: &str, passage: &str) -> String {
    if title.is_empty() {
        passage.to_string()
    } else {
        format!("{title}\n{passage}")
    }
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
    /// Create an empty knowledge base in `dir` (which must not hold one),
    /// BM25 only.
    pub fn create(dir: &Path) -> Result<Self, SearchError> {
        Self::create_with(dir, KbConfig::default())
    }

    /// Create an empty knowledge base with these settings.
    pub fn create_with(dir: &Path, config: KbConfig) -> Result<Self, SearchError> {
        if dir.join("docs.jsonl").exists() {
            return Err(SearchError::Exists(dir.to_path_buf()));
        }
        std::fs::create_dir_all(dir.join("index"))?;
        std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&config)?)?;
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
        let config: KbConfig = match std::fs::read(dir.join("config.json")) {
            Ok(b) => {
                serde_json::from_slice(&b).map_err(|e| corrupt(dir, format!("config.json: {e}")))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => KbConfig::default(),
            Err(e) => return Err(e.into()),
        };
        let vectors = match &config.embedder {
            None => None,
            Some(m) => match Vectors::load(dir)? {
                Some(v) if &v.model != m => {
                    return Err(corrupt(
                        dir,
                        format!("dense.bin holds vectors of {}, not {m}", v.model),
                    ))
                }
                v => v,
            },
        };
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
            config,
            vectors,
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

    pub fn config(&self) -> &KbConfig {
        &self.config
    }

    /// Number of passages with a vector.
    pub fn vectors(&self) -> usize {
        self.vectors.as_ref().map_or(0, Vectors::len)
    }

    /// The embedder to use for this knowledge base: `given` must be its
    /// model (None when it embeds nothing).
    fn check_embedder<'e>(
        &self,
        given: Option<&'e dyn Embedder>,
    ) -> Result<Option<&'e dyn Embedder>, SearchError> {
        match (&self.config.embedder, given) {
            (None, _) => Ok(None),
            (Some(m), Some(e)) if e.name() == m => Ok(Some(e)),
            (Some(m), _) => Err(SearchError::Embedder(format!(
                "knowledge base {} embeds its passages with {m}, which is needed to add documents",
                self.name
            ))),
        }
    }

    /// Embed `passages` (key, title, text) and store their vectors.
    fn embed_passages(
        &mut self,
        embedder: &dyn Embedder,
        passages: Vec<((String, u64), String)>,
    ) -> Result<(), SearchError> {
        let mut entries = Vec::with_capacity(passages.len());
        for batch in passages.chunks(EMBED_BATCH) {
            let texts: Vec<&str> = batch.iter().map(|(_, t)| t.as_str()).collect();
            let vs = embedder
                .embed(&texts, false)
                .map_err(SearchError::Embedder)?;
            if vs.len() != texts.len() {
                return Err(SearchError::Embedder(format!(
                    "{} returned {} vectors for {} texts",
                    embedder.name(),
                    vs.len(),
                    texts.len()
                )));
            }
            entries.extend(batch.iter().map(|(k, _)| k.clone()).zip(vs));
        }
        let Some(first) = entries.first() else {
            return Ok(());
        };
        let dim = first.1.len();
        let v = self
            .vectors
            .get_or_insert_with(|| Vectors::new(embedder.name(), dim));
        v.append(&self.dir, entries)
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
        progress: impl FnMut(usize),
    ) -> Result<AddReport, SearchError> {
        self.add_with(docs, None, progress)
    }

    /// Add documents, embedding their passages with `embedder` when this
    /// knowledge base does dense retrieval (it must then be its model).
    pub fn add_with(
        &mut self,
        docs: Vec<Document>,
        embedder: Option<&dyn Embedder>,
        mut progress: impl FnMut(usize),
    ) -> Result<AddReport, SearchError> {
        let embedder = self.check_embedder(embedder)?;
        let mut to_embed = Vec::new();
        let mut writer: tantivy::IndexWriter = self
            .index
            .writer(50_000_000)
            .map_err(|e| corrupt(&self.dir, e))?;
        let mut log = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.join("docs.jsonl"))?;
        let mut report = AddReport::default();
        // Ids join `self.ids` only once the documents are committed: a
        // failed add (a full disk) must not make a retry skip them as
        // duplicates.
        let mut fresh: HashSet<String> = HashSet::new();
        for (i, doc) in docs.into_iter().enumerate() {
            let id = doc_id(&doc.text);
            if self.ids.contains(&id) || !fresh.insert(id.clone()) {
                report.duplicates += 1;
                progress(i + 1);
                continue;
            }
            let stored = StoredDoc {
                id,
                added: now(),
                doc,
            };
            let passages = self.index_doc(&writer, &stored)?;
            report.passages += passages.len();
            if embedder.is_some() {
                for (i, p) in passages.into_iter().enumerate() {
                    to_embed.push((
                        (stored.id.clone(), i as u64),
                        embed_text(&stored.doc.title, &p),
                    ));
                }
            }
            let mut line = serde_json::to_string(&stored)?;
            line.push('\n');
            log.write_all(line.as_bytes())?;
            report.added += 1;
            progress(i + 1);
        }
        log.sync_data()?;
        writer.commit().map_err(|e| corrupt(&self.dir, e))?;
        self.ids.extend(fresh);
        self.reader.reload().map_err(|e| corrupt(&self.dir, e))?;
        if let Some(e) = embedder {
            self.embed_passages(e, to_embed)?;
        }
        Ok(report)
    }

    fn index_doc(
        &self,
        writer: &tantivy::IndexWriter,
        d: &StoredDoc,
    ) -> Result<Vec<String>, SearchError> {
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
        Ok(passages)
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
        if let Some(v) = self.vectors.as_mut() {
            v.retain(&self.dir, |d| d != id)?;
        }
        Ok(true)
    }

    /// Throw the index away and index every stored document again (after
    /// the index directory was deleted or damaged).
    pub fn rebuild(dir: &Path, progress: impl FnMut(usize, usize)) -> Result<Self, SearchError> {
        Self::rebuild_with(dir, None, progress)
    }

    /// Rebuild the index, and the passage vectors with `embedder` when the
    /// knowledge base does dense retrieval.
    pub fn rebuild_with(
        dir: &Path,
        embedder: Option<&dyn Embedder>,
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
        for f in ["dense.bin", "dense.bin.tmp"] {
            if dir.join(f).exists() {
                std::fs::remove_file(dir.join(f))?;
            }
        }
        let mut kb = Self::open(dir)?;
        let embedder = kb.check_embedder(embedder)?;
        let mut to_embed = Vec::new();
        let docs = kb.documents()?;
        let mut writer: tantivy::IndexWriter =
            kb.index.writer(50_000_000).map_err(|e| corrupt(dir, e))?;
        let mut seen = HashSet::new();
        for (i, d) in docs.iter().enumerate() {
            if seen.insert(d.id.clone()) {
                let passages = kb.index_doc(&writer, d)?;
                if embedder.is_some() {
                    for (j, p) in passages.into_iter().enumerate() {
                        to_embed.push(((d.id.clone(), j as u64), embed_text(&d.doc.title, &p)));
                    }
                }
            }
            progress(i + 1, docs.len());
        }
        writer.commit().map_err(|e| corrupt(dir, e))?;
        kb.reader.reload().map_err(|e| corrupt(dir, e))?;
        if let Some(e) = embedder {
            kb.embed_passages(e, to_embed)?;
        }
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
        top.into_iter()
            .map(|(score, addr)| self.passage(&searcher, addr, score))
            .collect()
    }

    fn embedder(&self) -> Option<&str> {
        self.config.embedder.as_deref()
    }

    fn search_dense(&self, query: &[f32], k: usize) -> Result<Vec<Passage>, SearchError> {
        let Some(v) = &self.vectors else {
            return Ok(Vec::new());
        };
        let mut q = query.to_vec();
        crate::dense::normalize(&mut q);
        let searcher = self.reader.searcher();
        let mut out = Vec::new();
        for ((id, chunk), score) in v.search(&q, k) {
            let term = Term::from_field_text(self.fields.doc_id, &id);
            let hits = searcher
                .search(
                    &TermQuery::new(term, IndexRecordOption::Basic),
                    &TopDocs::with_limit(100_000).order_by_score(),
                )
                .map_err(|e| corrupt(&self.dir, e))?;
            for (_, addr) in hits {
                let p = self.passage(&searcher, addr, score)?;
                if p.chunk == chunk {
                    out.push(p);
                    break;
                }
            }
        }
        Ok(out)
    }
}

impl KnowledgeBase {
    fn passage(
        &self,
        searcher: &tantivy::Searcher,
        addr: tantivy::DocAddress,
        score: f32,
    ) -> Result<Passage, SearchError> {
        let f = &self.fields;
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
        Ok(Passage {
            kb: self.name.clone(),
            doc_id: s(f.doc_id),
            chunk: d.get_first(f.chunk).and_then(|v| v.as_u64()).unwrap_or(0),
            title: s(f.title),
            source: s(f.source),
            text: s(f.text),
            published: (published != 0).then_some(published),
            score,
        })
    }
}

fn corrupt(dir: &Path, e: impl std::fmt::Display) -> SearchError {
    SearchError::Index {
        dir: dir.to_path_buf(),
        reason: e.to_string(),
    }
}
