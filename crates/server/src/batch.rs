//! The OpenAI Batch API (`/v1/batches`) and the runner that works batches
//! off in the background.
//!
//! Creating a batch reads its input file (a `batch` file of the caller's)
//! and checks every line — JSON, a unique `custom_id`, `POST` to the
//! batch's endpoint, one model the caller may use — before anything runs:
//! a bad file fails the whole batch with OpenAI's `errors` list (line
//! numbers from 1). The lines are stored with the batch, so deleting the
//! input file later loses nothing.
//!
//! The runner takes the oldest active batch and runs its pending lines,
//! a few at a time, through the same handlers as the API (one generation
//! path: [`crate::api::Via::Batch`]) at the lowest scheduler priority and
//! the plan's batch price, each line under its own request id. A line's
//! result is stored once (`pending` → `ok` | `error`); a server killed
//! mid-batch resumes with the lines still pending. Per-minute limits make
//! a line wait; the daily quota, a revoked key or a bad request make it an
//! error line. When no line is left (or the batch is cancelled or its
//! window ends), the output and error files are written, the batch ends
//! `completed`, `cancelled` or `expired`, and its files are kept for
//! `Config::batch_keep`.

use crate::api::{chat_inner, completion_inner, embeddings_inner, Via};
use crate::error::ApiError;
use crate::extract::{Body, KeyOrSession};
use crate::AppState;
use axum::extract::{Path, Query, State};
use axum::response::IntoResponse;
use axum::Json;
use hanlin_accounts::batches::{BatchRow, BatchStatus, LineRow, LineStatus};
use hanlin_accounts::{now, random_token};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

type AppResult<T> = Result<T, ApiError>;

/// The most lines one batch may hold (OpenAI's limit).
pub const MAX_LINES: usize = 50_000;
/// The endpoints a batch may run.
const ENDPOINTS: &[&str] = &["/v1/chat/completions", "/v1/completions", "/v1/embeddings"];
/// Scheduler priority of batch lines: below every plan's.
pub const BATCH_PRIORITY: i64 = -1_000_000;
/// The most validation errors reported for one file.
const MAX_ERRORS: usize = 100;
/// The largest answer body a line keeps.
const MAX_ANSWER_BYTES: usize = 16 << 20;

/// A batch as the API shows it.
pub(crate) fn batch_json(b: &BatchRow) -> Value {
    let parsed = |s: &Option<String>| {
        s.as_deref()
            .and_then(|t| serde_json::from_str::<Value>(t).ok())
            .unwrap_or(Value::Null)
    };
    json!({
        "id": b.id,
        "object": "batch",
        "endpoint": b.endpoint,
        "errors": parsed(&b.errors),
        "input_file_id": b.input_file_id,
        "completion_window": b.completion_window,
        "status": b.status.as_str(),
        "output_file_id": b.output_file_id,
        "error_file_id": b.error_file_id,
        "created_at": b.created_at,
        "in_progress_at": b.in_progress_at,
        "expires_at": b.expires_at,
        "finalizing_at": b.finalizing_at,
        "completed_at": b.completed_at,
        "failed_at": b.failed_at,
        "expired_at": b.expired_at,
        "cancelling_at": b.cancelling_at,
        "cancelled_at": b.cancelled_at,
        "request_counts": {"total": b.total, "completed": b.completed, "failed": b.failed},
        "metadata": parsed(&b.metadata),
    })
}

/// A completion window: `24h` (OpenAI's only one), or any `N` seconds,
/// minutes or hours (`90s`, `30m`, `48h`) from one second to seven days.
pub fn window_secs(w: &str) -> Option<i64> {
    let (n, unit) = w.split_at(w.len().checked_sub(1)?);
    let n: i64 = n.parse().ok()?;
    let secs = match unit {
        "s" => n,
        "m" => n.checked_mul(60)?,
        "h" => n.checked_mul(3600)?,
        _ => return None,
    };
    (1..=7 * 24 * 3600).contains(&secs).then_some(secs)
}

/// One validation error, OpenAI's shape.
fn line_error(code: &str, message: String, line: Option<usize>, param: Option<&str>) -> Value {
    json!({"code": code, "message": message, "param": param, "line": line})
}

/// Check an input file's lines for a batch on `endpoint` by `caller`:
/// the lines to run, or the errors that fail the batch. Public for the
/// fuzz target (`fuzz/fuzz_targets/batch_jsonl.rs`).
pub fn validate(
    text: &[u8],
    endpoint: &str,
    caller: &hanlin_accounts::Caller,
    max_body: usize,
) -> Result<Vec<LineRow>, Vec<Value>> {
    let mut errors = Vec::new();
    let mut lines = Vec::new();
    let mut ids = HashSet::new();
    let mut model: Option<String> = None;
    let Ok(text) = std::str::from_utf8(text) else {
        return Err(vec![line_error(
            "invalid_file_format",
            "The file is not UTF-8 text.".into(),
            None,
            None,
        )]);
    };
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        if errors.len() >= MAX_ERRORS {
            break;
        }
        if lines.len() >= MAX_LINES {
            errors.push(line_error(
                "too_many_lines",
                format!("A batch holds at most {MAX_LINES} requests."),
                Some(n),
                None,
            ));
            break;
        }
        let v: Value = match serde_json::from_str(raw) {
            Ok(v @ Value::Object(_)) => v,
            _ => {
                errors.push(line_error(
                    "invalid_json_line",
                    "This line is not a JSON object.".into(),
                    Some(n),
                    None,
                ));
                continue;
            }
        };
        let custom_id = match v["custom_id"].as_str() {
            Some(c) if !c.is_empty() && c.len() <= 512 => c.to_string(),
            _ => {
                errors.push(line_error(
                    "missing_required_parameter",
                    "Each line needs a 'custom_id' string (1 to 512 characters).".into(),
                    Some(n),
                    Some("custom_id"),
                ));
                continue;
            }
        };
        if !ids.insert(custom_id.clone()) {
            errors.push(line_error(
                "duplicate_custom_id",
                format!("The custom_id {custom_id:?} is used by an earlier line."),
                Some(n),
                Some("custom_id"),
            ));
            continue;
        }
        if v["method"].as_str() != Some("POST") {
            errors.push(line_error(
                "invalid_method",
                "'method' must be \"POST\".".into(),
                Some(n),
                Some("method"),
            ));
            continue;
        }
        if v["url"].as_str() != Some(endpoint) {
            errors.push(line_error(
                "mismatched_endpoint",
                format!(
                    "The line's url {} is not the batch's endpoint {endpoint}.",
                    v["url"]
                ),
                Some(n),
                Some("url"),
            ));
            continue;
        }
        let body = &v["body"];
        let Some(m) = body.is_object().then(|| body["model"].as_str()).flatten() else {
            errors.push(line_error(
                "invalid_request",
                "'body' must be an object naming a 'model'.".into(),
                Some(n),
                Some("body"),
            ));
            continue;
        };
        match &model {
            Some(first) if first != m => {
                errors.push(line_error(
                    "mismatched_model",
                    format!("Every line of a batch must use the same model ({first}), not {m}."),
                    Some(n),
                    Some("body.model"),
                ));
                continue;
            }
            None => {
                let allowed = caller.plan.allows(m)
                    && caller
                        .key
                        .models
                        .as_ref()
                        .is_none_or(|ms| ms.iter().any(|x| x == m));
                if !allowed {
                    errors.push(line_error(
                        "model_not_found",
                        format!("The model `{m}` does not exist or you do not have access to it."),
                        Some(n),
                        Some("body.model"),
                    ));
                    continue;
                }
                model = Some(m.to_string());
            }
            _ => {}
        }
        if body["stream"] == Value::Bool(true) {
            errors.push(line_error(
                "invalid_request",
                "A batch line cannot stream ('stream': true).".into(),
                Some(n),
                Some("body.stream"),
            ));
            continue;
        }
        // A line's body is a request body: no larger than the API takes.
        let body = body.to_string();
        if body.len() > max_body {
            errors.push(line_error(
                "request_too_large",
                format!(
                    "The line's body is {} bytes; a request body may be at most {max_body}.",
                    body.len()
                ),
                Some(n),
                Some("body"),
            ));
            continue;
        }
        lines.push(LineRow {
            line_no: n as i64,
            custom_id,
            body,
        });
    }
    if errors.is_empty() && lines.is_empty() {
        errors.push(line_error(
            "empty_file",
            "The input file has no requests.".into(),
            None,
            None,
        ));
    }
    if errors.is_empty() {
        Ok(lines)
    } else {
        Err(errors)
    }
}

#[derive(Deserialize)]
struct CreateBody {
    input_file_id: String,
    endpoint: String,
    completion_window: String,
    #[serde(default)]
    metadata: Option<serde_json::Map<String, Value>>,
}

/// `POST /v1/batches`.
pub async fn create(
    State(st): State<Arc<AppState>>,
    KeyOrSession(caller): KeyOrSession,
    Body(b): Body,
) -> AppResult<Json<Value>> {
    let req: CreateBody = crate::openai::parse(
        &b,
        &["input_file_id", "endpoint", "completion_window", "metadata"],
    )?;
    if !ENDPOINTS.contains(&req.endpoint.as_str()) {
        return Err(ApiError::bad_request(format!(
            "'endpoint' must be one of {}.",
            ENDPOINTS.join(", ")
        ))
        .param("endpoint"));
    }
    let window = window_secs(&req.completion_window).ok_or_else(|| {
        ApiError::bad_request(
            "'completion_window' must be '24h' (or N seconds, minutes or hours: '90s', '30m', '48h'; up to 7 days).",
        )
        .param("completion_window")
    })?;
    if let Some(m) = &req.metadata {
        let ok = m.len() <= 16
            && m.iter()
                .all(|(k, v)| k.len() <= 64 && v.as_str().is_some_and(|s| s.len() <= 512));
        if !ok {
            return Err(ApiError::bad_request(
                "'metadata' holds at most 16 string values (keys up to 64 characters, values up to 512).",
            )
            .param("metadata"));
        }
    }
    let file = st
        .db
        .file(&req.input_file_id, Some(&caller.user.id))
        .await?
        .ok_or_else(|| {
            ApiError::not_found(format!("No such File object: {}", req.input_file_id))
                .param("input_file_id")
        })?;
    if file.purpose != "batch" {
        return Err(ApiError::bad_request(format!(
            "The file {} was uploaded for '{}', not 'batch'.",
            file.id, file.purpose
        ))
        .param("input_file_id"));
    }
    let text = tokio::fs::read(crate::files::path_of(&st, &file.id))
        .await
        .map_err(|e| ApiError::unavailable(format!("reading the input file: {e}")))?;
    let created = now();
    let checked = validate(&text, &req.endpoint, &caller, st.config.max_body);
    let (status, lines, errors) = match checked {
        Ok(lines) => (BatchStatus::Validating, lines, None),
        Err(errors) => (
            BatchStatus::Failed,
            Vec::new(),
            Some(json!({"object": "list", "data": errors}).to_string()),
        ),
    };
    let row = BatchRow {
        id: format!("batch_{}", random_token(24)),
        user_id: caller.user.id.clone(),
        key_id: caller.key.id.clone(),
        endpoint: req.endpoint,
        input_file_id: file.id,
        completion_window: req.completion_window,
        status,
        metadata: req.metadata.map(|m| Value::Object(m).to_string()),
        errors,
        output_file_id: None,
        error_file_id: None,
        total: lines.len() as i64,
        completed: 0,
        failed: 0,
        created_at: created,
        in_progress_at: None,
        expires_at: created + window,
        finalizing_at: None,
        completed_at: None,
        failed_at: (status == BatchStatus::Failed).then_some(created),
        expired_at: None,
        cancelling_at: None,
        cancelled_at: None,
    };
    st.db.insert_batch(&row, &lines).await?;
    st.batch_wake.notify_one();
    Ok(Json(batch_json(&row)))
}

fn no_such_batch(id: &str) -> ApiError {
    ApiError::not_found(format!("No batch found with id '{id}'.")).param("batch_id")
}

/// The caller's batch `id` (another user's is as good as none).
async fn own_batch(
    st: &AppState,
    caller: &hanlin_accounts::Caller,
    id: &str,
) -> AppResult<BatchRow> {
    st.db
        .batch(id, Some(&caller.user.id))
        .await?
        .ok_or_else(|| no_such_batch(id))
}

/// `GET /v1/batches/{id}`.
pub async fn get(
    State(st): State<Arc<AppState>>,
    KeyOrSession(caller): KeyOrSession,
    Path(id): Path<String>,
) -> AppResult<Json<Value>> {
    let b = own_batch(&st, &caller, &id).await?;
    Ok(Json(batch_json(&b)))
}

#[derive(Deserialize)]
pub struct ListQuery {
    limit: Option<i64>,
    after: Option<String>,
}

/// `GET /v1/batches`: the caller's batches, newest first.
pub async fn list(
    State(st): State<Arc<AppState>>,
    KeyOrSession(caller): KeyOrSession,
    Query(q): Query<ListQuery>,
) -> AppResult<Json<Value>> {
    let limit = q.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::bad_request("'limit' must be between 1 and 100.").param("limit"));
    }
    let rows = st
        .db
        .batches(&caller.user.id, q.after.as_deref(), limit + 1)
        .await?;
    Ok(Json(crate::files::page(rows, limit, |b| &b.id, batch_json)))
}

/// `POST /v1/batches/{id}/cancel`: lines running finish, the rest do not
/// start; the batch ends `cancelled` with what was done.
pub async fn cancel(
    State(st): State<Arc<AppState>>,
    KeyOrSession(caller): KeyOrSession,
    Path(id): Path<String>,
) -> AppResult<Json<Value>> {
    let b = own_batch(&st, &caller, &id).await?;
    let moved = st
        .db
        .set_batch_status(
            &id,
            &[BatchStatus::Validating, BatchStatus::InProgress],
            BatchStatus::Cancelling,
        )
        .await?;
    if !moved && b.status != BatchStatus::Cancelling {
        return Err(ApiError::new_status(
            axum::http::StatusCode::CONFLICT,
            format!("Cannot cancel a batch with status '{}'.", b.status.as_str()),
        ));
    }
    st.batch_wake.notify_one();
    let b = st
        .db
        .batch(&id, None)
        .await?
        .ok_or_else(|| no_such_batch(&id))?;
    Ok(Json(batch_json(&b)))
}

/// The lease of the one batch runner among the replicas on a database.
const RUNNER_LEASE: &str = "batch-runner";

/// Start the runner. Every replica starts one; the one holding the
/// database lease runs batches (so no line runs on two replicas at once),
/// and another takes over when that replica stops or dies.
pub fn spawn_runner(st: Arc<AppState>) -> tokio::task::JoinHandle<()> {
    let held = Arc::new(std::sync::atomic::AtomicBool::new(false));
    tokio::spawn(async move {
        // The lease is renewed while the runner runs, and no longer.
        let mut lease = tokio::task::JoinSet::new();
        lease.spawn(hold_runner_lease(st.clone(), held.clone()));
        let mut swept = std::time::Instant::now() - Duration::from_secs(3600);
        loop {
            if !held.load(std::sync::atomic::Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            if swept.elapsed() > Duration::from_secs(60) {
                swept = std::time::Instant::now();
                if let Err(e) = crate::files::sweep(&st).await {
                    tracing::warn!("deleting expired files: {}", e.message);
                }
            }
            match st.db.next_active_batch().await {
                Ok(Some(b)) => {
                    let id = b.id.clone();
                    if let Err(e) = run(&st, b, &held).await {
                        tracing::warn!(batch = %id, "batch runner: {}", e.message);
                        tokio::time::sleep(Duration::from_secs(2)).await;
                    }
                }
                Ok(None) => {
                    let _ = tokio::time::timeout(Duration::from_secs(10), st.batch_wake.notified())
                        .await;
                }
                Err(e) => {
                    tracing::warn!("batch runner: {e}");
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            }
        }
    })
}

/// Take and renew the runner's lease a few times per lease period;
/// `held` says whether this replica holds it. A draining replica gives it
/// up.
async fn hold_runner_lease(st: Arc<AppState>, held: Arc<std::sync::atomic::AtomicBool>) {
    use std::sync::atomic::Ordering;
    let lease = st.config.replica_lease;
    let mut tick = tokio::time::interval((lease / 3).max(Duration::from_millis(100)));
    loop {
        tick.tick().await;
        if st.draining.load(Ordering::SeqCst) {
            held.store(false, Ordering::SeqCst);
            let _ = st.db.release_lease(RUNNER_LEASE).await;
            return;
        }
        let now_held = match st
            .db
            .try_lease(RUNNER_LEASE, lease.as_millis() as i64)
            .await
        {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!("renewing the batch runner's lease: {e}");
                false
            }
        };
        if now_held && !held.load(Ordering::SeqCst) {
            tracing::info!("this replica runs the batches");
            st.batch_wake.notify_one();
        }
        held.store(now_held, Ordering::SeqCst);
    }
}

/// Work one batch until it ends (or this replica loses the runner's
/// lease: lines already started finish, nothing new starts).
async fn run(
    st: &Arc<AppState>,
    b: BatchRow,
    held: &std::sync::atomic::AtomicBool,
) -> AppResult<()> {
    if b.status == BatchStatus::Validating {
        st.db
            .set_batch_status(&b.id, &[BatchStatus::Validating], BatchStatus::InProgress)
            .await?;
    }
    let parallel = st.config.batch_parallel.max(1);
    let mut running: tokio::task::JoinSet<(i64, LineStatus, String)> = tokio::task::JoinSet::new();
    let mut after = 0i64;
    let mut stop = b.status == BatchStatus::Finalizing;
    loop {
        // Cancelled or out of time: start nothing more.
        let now_status = st.db.batch(&b.id, None).await?.map(|x| x.status);
        if now_status == Some(BatchStatus::Cancelling) || now() >= b.expires_at {
            stop = true;
        }
        if !held.load(std::sync::atomic::Ordering::SeqCst) && !stop {
            // Another replica takes over from the lines still pending.
            while let Some(done) = running.join_next().await {
                if let Ok((line_no, status, result)) = done {
                    st.db.finish_line(&b.id, line_no, status, &result).await?;
                }
            }
            return Ok(());
        }
        if !stop && running.len() < parallel {
            let want = (parallel - running.len()) as i64;
            let lines = st.db.pending_lines(&b.id, want, after).await?;
            for line in lines {
                after = line.line_no;
                let (st, b) = (st.clone(), b.clone());
                running.spawn(async move {
                    let (status, result) = run_line(&st, &b, &line).await;
                    (line.line_no, status, result)
                });
            }
        }
        let Some(done) = running.join_next().await else {
            break;
        };
        match done {
            Ok((line_no, status, result)) => {
                st.db.finish_line(&b.id, line_no, status, &result).await?;
            }
            Err(e) => tracing::warn!(batch = %b.id, "a batch line's task failed: {e}"),
        }
    }
    finish(st, &b.id).await
}

/// A line's result when the server could not run it (OpenAI's shape for
/// expired and cancelled lines: no response, an error).
fn error_line(custom_id: &str, code: &str, message: &str) -> String {
    json!({
        "id": format!("batch_req_{}", random_token(24)),
        "custom_id": custom_id,
        "response": null,
        "error": {"code": code, "message": message},
    })
    .to_string()
}

/// Run one line through the API's handler; its result line.
async fn run_line(st: &Arc<AppState>, b: &BatchRow, line: &LineRow) -> (LineStatus, String) {
    let request_id = format!(
        "batch_req_{}_{}",
        &b.id["batch_".len().min(b.id.len())..],
        line.line_no
    );
    loop {
        let caller = match st.db.caller_for(&b.key_id, &b.user_id).await {
            Ok(Ok(mut c)) => {
                c.plan.priority = BATCH_PRIORITY;
                c
            }
            Ok(Err(e)) => {
                let body = ApiError::unauthorized(e.to_string()).body();
                return answer_line(&request_id, line, 401, json!(body));
            }
            Err(e) => {
                tracing::warn!("batch line {}: {e}", line.line_no);
                tokio::time::sleep(Duration::from_secs(2)).await;
                continue;
            }
        };
        let body = axum::body::Bytes::from(line.body.clone());
        let via = Via::Batch(request_id.clone());
        let r = match b.endpoint.as_str() {
            "/v1/chat/completions" => chat_inner(st, caller, body, &via).await,
            "/v1/completions" => completion_inner(st, caller, body, &via).await,
            _ => embeddings_inner(st, caller, body, &via).await,
        };
        let resp = r.unwrap_or_else(IntoResponse::into_response);
        let status = resp.status();
        let wait = resp
            .headers()
            .get(axum::http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let bytes = axum::body::to_bytes(resp.into_body(), MAX_ANSWER_BYTES)
            .await
            .unwrap_or_default();
        let answer: Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        let quota = answer["error"]["code"] == "insufficient_quota";
        let retry = (status.as_u16() == 429 && !quota) || status.as_u16() == 503;
        if retry && now() < b.expires_at {
            // A per-minute limit or a full queue: wait, then again.
            tokio::time::sleep(Duration::from_secs(wait.unwrap_or(1).clamp(1, 60))).await;
            continue;
        }
        return answer_line(&request_id, line, status.as_u16(), answer);
    }
}

fn answer_line(request_id: &str, line: &LineRow, status: u16, body: Value) -> (LineStatus, String) {
    let ok = (200..300).contains(&status);
    let text = json!({
        "id": request_id,
        "custom_id": line.custom_id,
        "response": {"status_code": status, "request_id": request_id, "body": body},
        "error": null,
    })
    .to_string();
    (
        if ok {
            LineStatus::Ok
        } else {
            LineStatus::Error
        },
        text,
    )
}

/// End a batch whose lines are done or will not run: the lines left get
/// error results, the output and error files are written, and the batch
/// takes its final status.
async fn finish(st: &Arc<AppState>, id: &str) -> AppResult<()> {
    let Some(b) = st.db.batch(id, None).await? else {
        return Ok(());
    };
    let (code, message, end) = if b.status == BatchStatus::Cancelling {
        (
            "batch_cancelled",
            "The batch was cancelled before this request ran.",
            BatchStatus::Cancelled,
        )
    } else if now() >= b.expires_at {
        (
            "batch_expired",
            "This request could not be executed before the completion window expired.",
            BatchStatus::Expired,
        )
    } else {
        ("", "", BatchStatus::Completed)
    };
    let mut after = 0;
    loop {
        let left = st.db.pending_lines(&b.id, 1000, after).await?;
        if left.is_empty() {
            break;
        }
        if end == BatchStatus::Completed {
            // Pending lines while nothing stops the batch: the runner will
            // come back for them.
            return Ok(());
        }
        for l in &left {
            after = l.line_no;
            st.db
                .finish_line(
                    &b.id,
                    l.line_no,
                    LineStatus::Error,
                    &error_line(&l.custom_id, code, message),
                )
                .await?;
        }
    }
    if end == BatchStatus::Completed {
        st.db
            .set_batch_status(&b.id, &[BatchStatus::InProgress], BatchStatus::Finalizing)
            .await?;
    }
    let keep = now() + st.config.batch_keep.as_secs() as i64;
    let mut files = [None, None];
    for (i, (status, name)) in [(LineStatus::Ok, "output"), (LineStatus::Error, "error")]
        .into_iter()
        .enumerate()
    {
        let mut text = String::new();
        let mut after = 0;
        loop {
            let rows = st.db.line_results(&b.id, status, after, 1000).await?;
            let Some(last) = rows.last() else { break };
            after = last.0;
            for (_, r) in rows {
                text.push_str(&r);
                text.push('\n');
            }
        }
        if !text.is_empty() {
            let f = crate::files::store(
                st,
                &b.user_id,
                "batch_output",
                &format!("{}_{name}.jsonl", b.id),
                text.as_bytes(),
                Some(keep),
            )
            .await?;
            files[i] = Some(f.id);
        }
    }
    st.db
        .set_batch_files(&b.id, files[0].as_deref(), files[1].as_deref())
        .await?;
    st.db
        .set_batch_status(
            &b.id,
            &[
                BatchStatus::InProgress,
                BatchStatus::Finalizing,
                BatchStatus::Cancelling,
            ],
            end,
        )
        .await?;
    st.db.drop_batch_lines(&b.id).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completion_windows() {
        assert_eq!(window_secs("24h"), Some(86_400));
        assert_eq!(window_secs("90s"), Some(90));
        assert_eq!(window_secs("30m"), Some(1800));
        assert_eq!(window_secs("0s"), None);
        assert_eq!(window_secs("8d"), None);
        assert_eq!(window_secs("200h"), None);
        assert_eq!(window_secs("h"), None);
        assert_eq!(window_secs(""), None);
    }
}
