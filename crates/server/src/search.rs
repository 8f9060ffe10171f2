//! Knowledge bases over the API: `POST /v1/search` (ranked passages),
//! `POST /v1/ask` (a grounded answer with checked citations), and, for
//! admins, `PUT /v1/kb/{name}` (create) and `POST /v1/kb/{name}/documents`
//! (push documents; searchable as soon as the call returns).
//!
//! `GET /v1/kb` lists the knowledge bases with their feeds' state;
//! `POST /v1/kb/{name}/feeds` (admin) adds an RSS/Atom feed, which
//! [`poll_feeds`] (started by `serve`) polls in the background.
//!
//! Any key may search and ask every knowledge base; writing needs an admin
//! key (or an admin's web session).

use crate::api::blocking;
use crate::error::ApiError;
use crate::extract::{AdminCaller, ApiCaller, Body, JsonBody};
use crate::AppState;
use axum::extract::{Path, State};
use axum::Json;
use hanlin_accounts::kb::Readers;
use hanlin_embed::Embedders;
use hanlin_gateway::Endpoint;
use hanlin_search::answer;
use hanlin_search::index::KbConfig;
use hanlin_search::{extract, feed, kb_dir, KnowledgeBase, Mode, Passage, SearchError};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

type AppResult<T> = Result<T, ApiError>;

/// The knowledge bases under one directory, opened on first use.
pub struct Kbs {
    pub root: PathBuf,
    open: Mutex<HashMap<String, Arc<Mutex<KnowledgeBase>>>>,
    /// On a database replicas share: every change is also appended to its
    /// knowledge-base log, which every replica replays ([`follow_log`]).
    log: Option<hanlin_accounts::Db>,
}

fn search_error(e: SearchError) -> ApiError {
    match e {
        SearchError::NotFound(_) => ApiError::not_found(e.to_string()).code("kb_not_found"),
        SearchError::BadName(_) => ApiError::bad_request(e.to_string()).param("kb"),
        SearchError::Exists(_) => ApiError::bad_request(e.to_string()).code("kb_exists"),
        other => {
            tracing::error!("knowledge base: {other}");
            ApiError::unavailable(other.to_string()).code("kb_unavailable")
        }
    }
}

fn poisoned() -> ApiError {
    ApiError::internal("a knowledge base lock was poisoned by an earlier failure")
}

impl Kbs {
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            open: Mutex::new(HashMap::new()),
            log: None,
        }
    }

    /// Knowledge bases whose changes go to `db`'s log too (PostgreSQL:
    /// replicas share them).
    pub fn replicated(root: PathBuf, db: hanlin_accounts::Db) -> Self {
        Self {
            log: Some(db),
            ..Self::new(root)
        }
    }

    /// Append a change to the log (from a blocking thread). A change this
    /// replica made but could not log is kept here and said in the log.
    fn log(&self, kb: &str, op: &str, body: &impl serde::Serialize) {
        let Some(db) = &self.log else { return };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let body = match serde_json::to_string(body) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!("{kb}: encoding a change for the other replicas: {e}");
                return;
            }
        };
        if let Err(e) = rt.block_on(db.log_kb_change(kb, op, &body)) {
            tracing::error!("{kb}: the other replicas will not see this {op}: {e}");
        }
    }

    fn get(&self, name: &str) -> AppResult<Arc<Mutex<KnowledgeBase>>> {
        let mut open = self.open.lock().map_err(|_| poisoned())?;
        if let Some(kb) = open.get(name) {
            return Ok(kb.clone());
        }
        let dir = kb_dir(&self.root, name).map_err(search_error)?;
        let kb = Arc::new(Mutex::new(KnowledgeBase::open(&dir).map_err(search_error)?));
        open.insert(name.to_string(), kb.clone());
        Ok(kb)
    }

    fn create(&self, name: &str, config: KbConfig) -> AppResult<()> {
        self.create_here(name, config.clone())?;
        self.log(name, "create", &config);
        Ok(())
    }

    fn create_here(&self, name: &str, config: KbConfig) -> AppResult<()> {
        let dir = kb_dir(&self.root, name).map_err(search_error)?;
        let kb = KnowledgeBase::create_with(&dir, config).map_err(search_error)?;
        self.open
            .lock()
            .map_err(|_| poisoned())?
            .insert(name.to_string(), Arc::new(Mutex::new(kb)));
        Ok(())
    }

    /// Add `docs` to knowledge base `name` (searchable when this returns),
    /// embedding their passages when it does dense retrieval.
    fn add(
        &self,
        name: &str,
        docs: Vec<hanlin_search::Document>,
        embedders: &Embedders,
    ) -> AppResult<hanlin_search::index::AddReport> {
        let logged = self.log.is_some().then(|| docs.clone());
        let r = self.add_here(name, docs, embedders)?;
        if let Some(docs) = logged.filter(|_| r.added > 0) {
            self.log(name, "add", &docs);
        }
        Ok(r)
    }

    fn add_here(
        &self,
        name: &str,
        docs: Vec<hanlin_search::Document>,
        embedders: &Embedders,
    ) -> AppResult<hanlin_search::index::AddReport> {
        let kb = self.get(name)?;
        let mut kb = kb.lock().map_err(|_| poisoned())?;
        let embedder = match kb.config().embedder.clone() {
            Some(m) => Some(embedders.get(&m).map_err(|e| {
                ApiError::unavailable(format!("loading the embedding model {m}: {e}"))
                    .code("kb_unavailable")
            })?),
            None => None,
        };
        kb.add_with(docs, embedder.as_deref(), |_| {})
            .map_err(search_error)
    }

    /// The passages for `query` from each of `names`, fused
    /// ([`hanlin_search::search_all`]).
    fn retrieve(
        &self,
        names: &[String],
        query: &str,
        k: usize,
        embedders: &Embedders,
    ) -> AppResult<Vec<Passage>> {
        // Each knowledge base once, locked in name order: a name given
        // twice would lock the same mutex twice, and two requests naming
        // two bases in opposite orders would each hold what the other waits
        // for.
        let mut names: Vec<&String> = names.iter().collect();
        names.sort();
        names.dedup();
        let kbs = names
            .iter()
            .map(|n| self.get(n))
            .collect::<AppResult<Vec<_>>>()?;
        let locked = kbs
            .iter()
            .map(|kb| kb.lock().map_err(|_| poisoned()))
            .collect::<AppResult<Vec<_>>>()?;
        hanlin_search::search_all(
            locked.iter().map(|g| &**g),
            query,
            k,
            hanlin_accounts::now(),
            Mode::Hybrid,
            &mut |model, text| embedders.query(model, text),
        )
        .map_err(search_error)
    }
}

/// One knowledge base name or several.
#[derive(Deserialize)]
#[serde(untagged)]
enum Names {
    One(String),
    Many(Vec<String>),
}

impl Names {
    fn list(self) -> AppResult<Vec<String>> {
        let v = match self {
            Names::One(s) => vec![s],
            Names::Many(v) => v,
        };
        if v.is_empty() || v.len() > 16 {
            return Err(ApiError::bad_request("Name 1 to 16 knowledge bases in 'kb'.").param("kb"));
        }
        Ok(v)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchBody {
    kb: Names,
    query: String,
    k: Option<usize>,
}

fn passage_json(i: usize, p: &Passage) -> Value {
    json!({"index": i, "kb": p.kb, "doc_id": p.doc_id, "title": p.title, "source": p.source, "published": p.published, "text": p.text, "score": p.score})
}

/// The longest query `/v1/search` takes, in characters: every word of a
/// query is a BM25 clause, run while the knowledge base is held.
pub const MAX_QUERY_CHARS: usize = 1000;

pub async fn search(
    State(st): State<Arc<AppState>>,
    ApiCaller(caller): ApiCaller,
    JsonBody(b): JsonBody<SearchBody>,
) -> AppResult<Json<Value>> {
    let k = b.k.unwrap_or(5);
    if !(1..=50).contains(&k) {
        return Err(ApiError::bad_request("'k' is 1 to 50.").param("k"));
    }
    if b.query.chars().count() > MAX_QUERY_CHARS {
        return Err(ApiError::bad_request(format!(
            "The query is longer than {MAX_QUERY_CHARS} characters."
        ))
        .param("query"));
    }
    let names = b.kb.list()?;
    check_readable(&st, &caller.user, &names).await?;
    // Searches count against the plan's requests per minute and are
    // recorded (no tokens) like every other request.
    let mut request = st.gw.admit(&caller, Endpoint::Search, "search").await?;
    request.record(Default::default());
    let st2 = st.clone();
    let hits = blocking(move || st2.kbs.retrieve(&names, &b.query, k, &st2.embedders)).await?;
    request.finish().await;
    let data: Vec<Value> = hits
        .iter()
        .enumerate()
        .map(|(i, p)| passage_json(i, p))
        .collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    /// The embedding model for dense retrieval; `null` for BM25 only.
    #[serde(default = "default_embedder")]
    embedder: Option<String>,
    /// Who may search it (default: everyone).
    readers: Option<ReadersBody>,
}

/// `"everyone"`, `"admins"`, or a list of user names.
#[derive(Deserialize)]
#[serde(untagged)]
pub enum ReadersBody {
    Word(String),
    Names(Vec<String>),
}

impl ReadersBody {
    async fn resolve(&self, st: &AppState) -> AppResult<Readers> {
        match self {
            ReadersBody::Word(w) if w == "everyone" => Ok(Readers::Everyone),
            ReadersBody::Word(w) if w == "admins" => Ok(Readers::Admins),
            ReadersBody::Word(w) => Err(ApiError::bad_request(format!(
                "'readers' is \"everyone\", \"admins\" or a list of user names, not {w:?}."
            ))
            .param("readers")),
            ReadersBody::Names(n) => st
                .db
                .readers_named(n)
                .await
                .map_err(crate::admin::account_error),
        }
    }
}

/// Refuse the knowledge bases `user` may not read, as if they did not
/// exist (404: a name is not confirmed to a stranger).
pub(crate) async fn check_readable(
    st: &AppState,
    user: &hanlin_accounts::User,
    names: &[String],
) -> AppResult<()> {
    for n in names {
        if !st.db.kb_readers(n).await?.allows(user) {
            return Err(
                ApiError::not_found(format!("No knowledge base {n:?}.")).code("kb_not_found")
            );
        }
    }
    Ok(())
}

/// `PUT /v1/kb/{name}/readers` (admin): `{"readers": "everyone" | "admins" | ["alice", …]}`.
pub async fn put_readers(
    State(st): State<Arc<AppState>>,
    Path(name): Path<String>,
    _: AdminCaller,
    JsonBody(b): JsonBody<ReadersPut>,
) -> AppResult<Json<Value>> {
    kb_dir(&st.kbs.root, &name).map_err(search_error)?;
    let readers = b.readers.resolve(&st).await?;
    st.db.set_kb_readers(&name, &readers).await?;
    Ok(Json(json!({"kb": name, "readers": readers})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadersPut {
    readers: ReadersBody,
}

fn default_embedder() -> Option<String> {
    Some(hanlin_store::E5_MODEL.to_string())
}

/// `PUT /v1/kb/{name}` (admin), optionally `{"embedder": MODEL | null}`
/// (default: multilingual-e5-small, hybrid BM25 + dense retrieval).
pub async fn create_kb(
    State(st): State<Arc<AppState>>,
    Path(name): Path<String>,
    _: AdminCaller,
    Body(body): Body,
) -> AppResult<Json<Value>> {
    let b: CreateBody = if body.iter().all(u8::is_ascii_whitespace) {
        CreateBody {
            embedder: default_embedder(),
            readers: None,
        }
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("Invalid request body: {e}")))?
    };
    if let Some(m) = &b.embedder {
        let known = hanlin_store::catalog().iter().any(|e| e.name == m)
            || st.models.available().iter().any(|(n, _)| n == m);
        if !known {
            return Err(ApiError::bad_request(format!(
                "Unknown embedding model {m:?} (e.g. {}).",
                hanlin_store::E5_MODEL
            ))
            .param("embedder"));
        }
    }
    let readers = match &b.readers {
        Some(r) => r.resolve(&st).await?,
        None => Readers::Everyone,
    };
    let st2 = st.clone();
    let n = name.clone();
    let config = KbConfig {
        embedder: b.embedder.clone(),
    };
    blocking(move || st2.kbs.create(&n, config)).await?;
    st.db.set_kb_readers(&name, &readers).await?;
    Ok(Json(
        json!({"created": name, "embedder": b.embedder, "readers": readers}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DocumentsBody {
    documents: Vec<Value>,
}

pub async fn add_documents(
    State(st): State<Arc<AppState>>,
    Path(name): Path<String>,
    _: AdminCaller,
    JsonBody(b): JsonBody<DocumentsBody>,
) -> AppResult<Json<Value>> {
    let docs = b
        .documents
        .iter()
        .enumerate()
        .map(|(i, v)| {
            extract::json_doc(v, "api", &format!("document {i}")).map_err(|e| {
                ApiError::bad_request(format!("documents[{i}]: {e}")).param("documents")
            })
        })
        .collect::<AppResult<Vec<_>>>()?;
    let st2 = st.clone();
    let r = blocking(move || st2.kbs.add(&name, docs, &st2.embedders)).await?;
    Ok(Json(
        json!({"added": r.added, "duplicates": r.duplicates, "passages": r.passages}),
    ))
}

/// The knowledge bases a web conversation searches (`params.kb`; none:
/// an ordinary chat).
pub(crate) fn conversation_kbs(params: &Value) -> AppResult<Vec<String>> {
    match params.get("kb") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) if a.is_empty() => Ok(Vec::new()),
        Some(v) => serde_json::from_value::<Names>(v.clone())
            .map_err(|_| {
                ApiError::bad_request("'kb' is a list of knowledge base names.").param("kb")
            })?
            .list(),
    }
}

/// The passages for `query` from knowledge bases `names`, fused.
pub(crate) async fn retrieve(
    st: &Arc<AppState>,
    names: Vec<String>,
    query: String,
    k: usize,
) -> AppResult<Vec<Passage>> {
    let st2 = st.clone();
    blocking(move || st2.kbs.retrieve(&names, &query, k, &st2.embedders)).await
}

/// The passages a checked answer cites, numbered as cited.
pub(crate) fn cited_sources(g: &answer::Grounded) -> Vec<Value> {
    g.checked
        .cited()
        .iter()
        .filter_map(|n| g.sources.get(n - 1).map(|p| passage_json(*n, p)))
        .collect()
}

/// Files uploaded in one request are at most this large.
pub const MAX_UPLOAD_BYTES: usize = 32 << 20;

#[derive(Deserialize)]
pub struct FileQuery {
    filename: String,
}

/// `POST /v1/kb/{name}/files?filename=report.pdf` (admin; the body is the
/// file): extracted like `hanlin kb add` (txt, md, html, pdf, docx, json,
/// jsonl) and indexed; a file that cannot be read is refused with the reason.
pub async fn upload_file(
    State(st): State<Arc<AppState>>,
    Path(name): Path<String>,
    axum::extract::Query(q): axum::extract::Query<FileQuery>,
    _: AdminCaller,
    Body(bytes): Body,
) -> AppResult<Json<Value>> {
    // Only the file name's extension matters; never a path.
    let ext = std::path::Path::new(&q.filename)
        .extension()
        .map(|e| e.to_string_lossy().to_lowercase())
        .filter(|e| e.len() <= 8 && e.chars().all(|c| c.is_ascii_alphanumeric()))
        .ok_or_else(|| {
            ApiError::bad_request(
                "The file name needs an extension (.txt, .md, .html, .pdf, .docx, .json, .jsonl).",
            )
            .param("filename")
        })?;
    let title = std::path::Path::new(&q.filename)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let st2 = st.clone();
    let r = blocking(move || {
        let mut tmp = tempfile::Builder::new()
            .suffix(&format!(".{ext}"))
            .tempfile()
            .map_err(|e| ApiError::internal(format!("temporary file: {e}")))?;
        std::io::Write::write_all(&mut tmp, &bytes)
            .map_err(|e| ApiError::unavailable(format!("storing the upload: {e}")))?;
        let tmp_path = tmp.path().to_string_lossy().into_owned();
        let tmp_stem = tmp
            .path()
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let docs = hanlin_search::isolate::extract_isolated(tmp.path(), &st2.config.extract)
            .map_err(|e| {
                let reason = e.to_string();
                let reason = reason
                    .split_once(": ")
                    .map(|(_, r)| r.to_string())
                    .unwrap_or(reason);
                ApiError::bad_request(format!("{title}.{ext}: {reason}")).param("file")
            })?
            .into_iter()
            .map(|mut d| {
                // The temporary file's name means nothing to readers.
                if d.source == tmp_path {
                    d.source = format!("upload:{title}.{ext}");
                }
                d.title = d.title.replacen(&tmp_stem, &title, 1);
                d
            })
            .collect();
        st2.kbs.add(&name, docs, &st2.embedders)
    })
    .await?;
    Ok(Json(
        json!({"added": r.added, "duplicates": r.duplicates, "passages": r.passages}),
    ))
}

/// The knowledge bases `user` may read, with who may read each.
pub(crate) async fn readable(
    st: &Arc<AppState>,
    user: &hanlin_accounts::User,
) -> AppResult<Vec<(String, Readers)>> {
    let mut out = Vec::new();
    for name in hanlin_search::list(&st.kbs.root) {
        let readers = st.db.kb_readers(&name).await?;
        if readers.allows(user) {
            out.push((name, readers));
        }
    }
    Ok(out)
}

/// The knowledge bases `user` may read, with their document counts and,
/// for admins, their readers and feeds' state (feed URLs and their errors —
/// "connection refused" on an internal address — are not for every user).
pub(crate) async fn kb_list(
    st: &Arc<AppState>,
    user: &hanlin_accounts::User,
) -> AppResult<Vec<Value>> {
    let admin = user.role == hanlin_accounts::Role::Admin;
    let readable = readable(st, user).await?;
    let st2 = st.clone();
    blocking(move || {
        let root = &st2.kbs.root;
        let mut out = Vec::new();
        for (name, readers) in readable {
            let (documents, embedder, vectors) = match st2.kbs.get(&name) {
                Ok(kb) => {
                    let kb = kb.lock().map_err(|_| poisoned())?;
                    (
                        kb.documents().map(|d| d.len()).ok(),
                        kb.config().embedder.clone(),
                        kb.vectors(),
                    )
                }
                Err(_) => (None, None, 0),
            };
            let mut v = json!({"object": "knowledge_base", "name": name, "documents": documents, "usable": documents.is_some(), "embedder": embedder, "vectors": vectors});
            if admin {
                v["feeds"] = json!(feed::load(&root.join(&name)).unwrap_or_default());
                v["readers"] = json!(readers);
            }
            out.push(v);
        }
        Ok(out)
    })
    .await
}

/// `GET /v1/kb`: every knowledge base with its document count (and, for
/// admins, its feeds).
pub async fn list_kbs(
    State(st): State<Arc<AppState>>,
    ApiCaller(caller): ApiCaller,
) -> AppResult<Json<Value>> {
    Ok(Json(
        json!({"object": "list", "data": kb_list(&st, &caller.user).await?}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedBody {
    url: String,
    every: Option<String>,
}

/// `POST /v1/kb/{name}/feeds` (admin): poll `url` into the knowledge base
/// every `every` (default 10m); the first poll runs within seconds.
pub async fn add_feed(
    State(st): State<Arc<AppState>>,
    Path(name): Path<String>,
    _: AdminCaller,
    JsonBody(b): JsonBody<FeedBody>,
) -> AppResult<Json<Value>> {
    let every = feed::parse_every(b.every.as_deref().unwrap_or("10m"))
        .map_err(|e| ApiError::bad_request(e.to_string()).param("every"))?;
    let f = feed::Feed::new(&b.url, every, hanlin_accounts::now())
        .map_err(|e| ApiError::bad_request(e.to_string()).param("url"))?;
    let dir = kb_dir(&st.kbs.root, &name).map_err(search_error)?;
    let v = json!({"kb": name, "feed": f});
    let st2 = st.clone();
    let kb = name.clone();
    blocking(move || {
        feed::add(&dir, f.clone()).map_err(search_error)?;
        st2.kbs.log(&kb, "feed", &f);
        Ok(())
    })
    .await?;
    Ok(Json(v))
}

/// Replay the knowledge-base log (changes made on any replica) into this
/// replica's knowledge bases, from where it stopped (`.log_cursor` under
/// the root), every `tick`. Replaying a change this replica made is a
/// no-op: documents are stored once by their text's hash.
pub async fn follow_log(st: Arc<AppState>, tick: std::time::Duration) {
    let cursor_file = st.kbs.root.join(".log_cursor");
    let mut cursor: i64 = std::fs::read_to_string(&cursor_file)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    loop {
        tokio::time::sleep(tick).await;
        let changes = match st.db.kb_changes_after(cursor, 200).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("reading the knowledge-base log: {e}");
                continue;
            }
        };
        if changes.is_empty() {
            continue;
        }
        let st2 = st.clone();
        let last = changes.last().map(|c| c.seq).unwrap_or(cursor);
        let applied = tokio::task::spawn_blocking(move || {
            for c in &changes {
                if let Err(e) = apply_change(&st2, c) {
                    tracing::warn!(seq = c.seq, kb = %c.kb, "replaying a knowledge-base {}: {}", c.op, e.message);
                }
            }
        })
        .await;
        if let Err(e) = applied {
            tracing::error!("replaying the knowledge-base log: {e}");
            continue;
        }
        cursor = last;
        if let Err(e) = std::fs::create_dir_all(&st.kbs.root)
            .and_then(|_| std::fs::write(&cursor_file, cursor.to_string()))
        {
            tracing::warn!("saving the knowledge-base log cursor: {e}");
        }
    }
}

fn apply_change(st: &AppState, c: &hanlin_accounts::kb::KbChange) -> AppResult<()> {
    let bad = |e: serde_json::Error| ApiError::internal(format!("a malformed change: {e}"));
    match c.op.as_str() {
        "create" => {
            let config: KbConfig = serde_json::from_str(&c.body).map_err(bad)?;
            match st.kbs.create_here(&c.kb, config) {
                Err(e) if e.code == Some("kb_exists") => Ok(()),
                r => r,
            }
        }
        "add" => {
            let docs: Vec<hanlin_search::Document> = serde_json::from_str(&c.body).map_err(bad)?;
            st.kbs.add_here(&c.kb, docs, &st.embedders).map(|_| ())
        }
        "feed" => {
            let f: feed::Feed = serde_json::from_str(&c.body).map_err(bad)?;
            let dir = kb_dir(&st.kbs.root, &c.kb).map_err(search_error)?;
            if feed::load(&dir)
                .unwrap_or_default()
                .iter()
                .any(|x| x.url == f.url)
            {
                return Ok(());
            }
            feed::add(&dir, f).map_err(search_error)
        }
        other => Err(ApiError::internal(format!("an unknown change {other:?}"))),
    }
}

/// The lease of the replica that polls the feeds.
const FEED_LEASE: &str = "feeds";

/// Poll the feeds of every knowledge base as they fall due, for as long as
/// the server runs (checked every `tick`). With replicas, the one holding
/// the feeds' lease polls; what it adds reaches the others through the
/// knowledge-base log.
pub async fn poll_feeds(st: Arc<AppState>, tick: std::time::Duration) {
    loop {
        if st.kbs.log.is_some() {
            let ttl = st.config.replica_lease.max(tick * 3).as_millis() as i64;
            match st.db.try_lease(FEED_LEASE, ttl).await {
                Ok(true) => {}
                Ok(false) => {
                    tokio::time::sleep(tick).await;
                    continue;
                }
                Err(e) => {
                    tracing::warn!("the feeds' lease: {e}");
                    tokio::time::sleep(tick).await;
                    continue;
                }
            }
        }
        let st2 = st.clone();
        let polled = tokio::task::spawn_blocking(move || {
            feed::poll_due(
                &st2.kbs.root,
                None,
                hanlin_accounts::now(),
                false,
                std::time::Duration::from_secs(30),
                &feed::FetchPolicy::allowing(st2.config.feed_allow.clone()),
                |name, docs| {
                    st2.kbs
                        .add(name, docs, &st2.embedders)
                        .map_err(|e| SearchError::Io(std::io::Error::other(e.message.clone())))
                },
            )
        })
        .await;
        if let Err(e) = polled {
            tracing::error!("feed polling failed: {e}");
        }
        tokio::time::sleep(tick).await;
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AskBody {
    kb: Names,
    question: String,
    model: Option<String>,
}

pub async fn ask(
    State(st): State<Arc<AppState>>,
    ApiCaller(caller): ApiCaller,
    JsonBody(b): JsonBody<AskBody>,
) -> AppResult<Json<Value>> {
    if b.question.trim().is_empty() {
        return Err(ApiError::bad_request("The question is empty.").param("question"));
    }
    if b.question.chars().count() > MAX_QUERY_CHARS {
        return Err(ApiError::bad_request(format!(
            "The question is longer than {MAX_QUERY_CHARS} characters."
        ))
        .param("question"));
    }
    let names = b.kb.list()?;
    check_readable(&st, &caller.user, &names).await?;
    let model = b.model.unwrap_or_else(|| st.config.default_model.clone());
    let request = st.gw.admit(&caller, Endpoint::Ask, &model).await?;
    let passages = retrieve(&st, names, b.question.clone(), 5).await?;
    let grounded = match answer::plan(&b.question, passages, hanlin_accounts::now()) {
        answer::Plan::Decline(g) => g,
        answer::Plan::Generate {
            system,
            user,
            passages,
        } => {
            let text =
                crate::chat_model::complete(&st, request, &model, &system, &user, 300).await?;
            answer::finish(&b.question, &text, passages)
        }
    };
    let sources = cited_sources(&grounded);
    Ok(Json(json!({
        "object": "grounded_answer",
        "model": model,
        "answer": grounded.checked.text,
        "answered": grounded.answered,
        "sources": sources,
        "citations": grounded.checked.citations,
    })))
}
