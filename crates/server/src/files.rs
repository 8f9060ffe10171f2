//! The OpenAI Files API (`/v1/files`): uploads for batches and whatever
//! else a client keeps, and the output and error files batches write.
//! A file's bytes live in `Config::files_dir` under its id; its row (owner,
//! purpose, size, expiry) in the database. Each user sees only their own
//! files, within their plan's `file_bytes`; files past their expiry are
//! gone from listings at once and from disk at the next sweep.

use crate::error::ApiError;
use crate::extract::KeyOrSession;
use crate::AppState;
use axum::extract::{Multipart, Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use hanlin_accounts::batches::FileRow;
use hanlin_accounts::{now, random_token};
use serde::Deserialize;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;

type AppResult<T> = Result<T, ApiError>;

/// The largest upload taken, in bytes (the plan's `file_bytes` may be less).
pub const MAX_FILE_BYTES: usize = 200 << 20;
/// What uploads may be for (`batch_output` is the server's own).
const PURPOSES: &[&str] = &[
    "batch",
    "user_data",
    "assistants",
    "fine-tune",
    "vision",
    "evals",
];
/// How long an uploaded batch file is kept unless `expires_after` says
/// otherwise (OpenAI's default).
const BATCH_FILE_SECS: i64 = 30 * 24 * 3600;

/// A file as the API shows it.
pub(crate) fn file_json(f: &FileRow) -> Value {
    json!({
        "id": f.id,
        "object": "file",
        "bytes": f.bytes,
        "created_at": f.created_at,
        "expires_at": f.expires_at,
        "filename": f.filename,
        "purpose": f.purpose,
        "status": "processed",
        "status_details": null,
    })
}

/// Where a file's bytes are: ids are made here (`file-` and letters and
/// digits), so they never name another path.
pub(crate) fn path_of(st: &AppState, id: &str) -> PathBuf {
    st.config.files_dir.join(id)
}

fn no_such_file(id: &str) -> ApiError {
    ApiError::not_found(format!("No such File object: {id}")).param("id")
}

/// The caller's file `id` (another user's, or an expired one, is as good
/// as none).
async fn own_file(st: &AppState, caller: &hanlin_accounts::Caller, id: &str) -> AppResult<FileRow> {
    st.db
        .file(id, Some(&caller.user.id))
        .await?
        .ok_or_else(|| no_such_file(id))
}

fn store_error(e: std::io::Error) -> ApiError {
    ApiError::unavailable(format!("storing the file: {e}"))
}

/// A file name as given, without any directory, control characters or
/// more than 255 characters.
fn clean_name(name: &str) -> String {
    let base = name.rsplit(['/', '\\']).next().unwrap_or(name);
    let s: String = base.chars().filter(|c| !c.is_control()).take(255).collect();
    if s.trim().is_empty() {
        "upload".into()
    } else {
        s
    }
}

/// A new part file in the files directory (its bytes are written there
/// before they become a file).
async fn part_path(st: &AppState) -> AppResult<PathBuf> {
    tokio::fs::create_dir_all(&st.config.files_dir)
        .await
        .map_err(store_error)?;
    Ok(st
        .config
        .files_dir
        .join(format!(".part-{}", random_token(12))))
}

/// Make the part file at `part` the file `row` describes (a new id is
/// given): its bytes move under the id, then its row is written — within
/// `quota` bytes of the user's files when one is given (an upload; the
/// check before the body was read is repeated atomically here); if the
/// row is not written, the bytes go.
async fn keep(
    st: &AppState,
    part: &std::path::Path,
    mut row: FileRow,
    quota: Option<i64>,
) -> AppResult<FileRow> {
    row.id = format!("file-{}", random_token(24));
    tokio::fs::rename(part, path_of(st, &row.id))
        .await
        .map_err(store_error)?;
    let written = match quota {
        Some(q) => st.db.insert_file_within(&row, q).await,
        None => st.db.insert_file(&row).await.map(|()| true),
    };
    match written {
        Ok(true) => Ok(row),
        Ok(false) => {
            let _ = tokio::fs::remove_file(path_of(st, &row.id)).await;
            Err(ApiError::bad_request(format!(
                "The file does not fit in your plan's file storage ({} bytes).",
                quota.unwrap_or(0)
            ))
            .param("file")
            .code("storage_quota_exceeded"))
        }
        Err(e) => {
            let _ = tokio::fs::remove_file(path_of(st, &row.id)).await;
            Err(e.into())
        }
    }
}

/// Store `bytes` as a new file of `user_id` (the server's own files: batch
/// output and errors).
pub(crate) async fn store(
    st: &AppState,
    user_id: &str,
    purpose: &str,
    filename: &str,
    bytes: &[u8],
    expires_at: Option<i64>,
) -> AppResult<FileRow> {
    let part = part_path(st).await?;
    if let Err(e) = tokio::fs::write(&part, bytes).await {
        let _ = tokio::fs::remove_file(&part).await;
        return Err(store_error(e));
    }
    let row = FileRow {
        id: String::new(),
        user_id: user_id.to_string(),
        purpose: purpose.to_string(),
        filename: filename.to_string(),
        bytes: bytes.len() as i64,
        created_at: now(),
        expires_at,
    };
    keep(st, &part, row, None).await
}

/// One page of a list (OpenAI's shape): `rows` holds up to `limit` + 1,
/// the one past the page saying there are more.
pub(crate) fn page<T>(
    mut rows: Vec<T>,
    limit: i64,
    id: impl Fn(&T) -> &str,
    json: impl Fn(&T) -> Value,
) -> Value {
    let has_more = rows.len() as i64 > limit;
    rows.truncate(limit.max(0) as usize);
    json!({
        "object": "list",
        "data": rows.iter().map(json).collect::<Vec<_>>(),
        "first_id": rows.first().map(&id),
        "last_id": rows.last().map(id),
        "has_more": has_more,
    })
}

/// `POST /v1/files` (multipart: `file`, `purpose`, optional
/// `expires_after[anchor]` = `created_at` and `expires_after[seconds]`).
pub async fn upload(
    State(st): State<Arc<AppState>>,
    KeyOrSession(caller): KeyOrSession,
    mut form: Multipart,
) -> AppResult<Json<Value>> {
    let used = st.db.file_bytes_of(&caller.user.id).await?;
    let room = (caller.plan.file_bytes - used).max(0) as usize;
    let limit = room.min(MAX_FILE_BYTES);
    // The bytes go to a part file first; it is removed unless kept.
    struct Part(Option<PathBuf>);
    impl Drop for Part {
        fn drop(&mut self) {
            if let Some(p) = self.0.take() {
                let _ = std::fs::remove_file(p);
            }
        }
    }
    let mut part = Part(None);
    let mut purpose = None;
    let mut filename = None;
    let mut size = 0usize;
    let mut anchor = None;
    let mut seconds = None;
    use crate::extract::bad_form;
    while let Some(mut field) = form.next_field().await.map_err(bad_form)? {
        let name = field.name().unwrap_or_default().to_string();
        match name.as_str() {
            "file" => {
                if part.0.is_some() {
                    return Err(ApiError::bad_request("Send one 'file' per upload.").param("file"));
                }
                filename = Some(clean_name(field.file_name().unwrap_or("upload")));
                let path = part_path(&st).await?;
                let mut out = tokio::fs::File::create(&path).await.map_err(store_error)?;
                part.0 = Some(path);
                while let Some(chunk) = field.chunk().await.map_err(bad_form)? {
                    size += chunk.len();
                    if size > limit {
                        let (why, code) = if size > MAX_FILE_BYTES {
                            (
                                format!("The file is larger than {} MB.", MAX_FILE_BYTES >> 20),
                                "file_too_large",
                            )
                        } else {
                            (
                                format!(
                                    "The file does not fit in your plan's file storage ({} of {} bytes used).",
                                    used, caller.plan.file_bytes
                                ),
                                "storage_quota_exceeded",
                            )
                        };
                        return Err(ApiError::bad_request(why).param("file").code(code));
                    }
                    out.write_all(&chunk).await.map_err(store_error)?;
                }
                out.flush().await.map_err(store_error)?;
            }
            "purpose" | "expires_after[anchor]" | "expires_after[seconds]" => {
                let v = field.text().await.map_err(bad_form)?;
                if v.len() > 64 {
                    return Err(
                        ApiError::bad_request(format!("'{name}' is too long.")).param(&name)
                    );
                }
                match name.as_str() {
                    "purpose" => purpose = Some(v),
                    "expires_after[anchor]" => anchor = Some(v),
                    _ => seconds = Some(v),
                }
            }
            other => {
                return Err(
                    ApiError::bad_request(format!("Unrecognized form field: '{other}'."))
                        .param(other),
                )
            }
        }
    }
    let Some(purpose) = purpose else {
        return Err(ApiError::bad_request("'purpose' is a required property.").param("purpose"));
    };
    if !PURPOSES.contains(&purpose.as_str()) {
        return Err(ApiError::bad_request(format!(
            "'{purpose}' is not one of {}.",
            PURPOSES.join(", ")
        ))
        .param("purpose"));
    }
    let (Some(path), Some(filename)) = (part.0.clone(), filename) else {
        return Err(ApiError::bad_request("'file' is a required property.").param("file"));
    };
    let created = now();
    let expires_at = match (anchor.as_deref(), seconds.as_deref()) {
        (None, None) if purpose == "batch" => Some(created + BATCH_FILE_SECS),
        (None, None) => None,
        (Some("created_at"), Some(s)) => match s.parse::<i64>() {
            Ok(n) if (3600..=2_592_000).contains(&n) => Some(created + n),
            _ => {
                return Err(ApiError::bad_request(
                    "'expires_after[seconds]' must be between 3600 and 2592000.",
                )
                .param("expires_after[seconds]"))
            }
        },
        _ => {
            return Err(ApiError::bad_request(
                "'expires_after' needs anchor 'created_at' and seconds.",
            )
            .param("expires_after"))
        }
    };
    let row = FileRow {
        id: String::new(),
        user_id: caller.user.id.clone(),
        purpose,
        filename,
        bytes: size as i64,
        created_at: created,
        expires_at,
    };
    let row = keep(&st, &path, row, Some(caller.plan.file_bytes)).await?;
    part.0 = None;
    Ok(Json(file_json(&row)))
}

#[derive(Deserialize)]
pub struct ListQuery {
    purpose: Option<String>,
    limit: Option<i64>,
    after: Option<String>,
    order: Option<String>,
}

/// `GET /v1/files`: the caller's files, newest first (`order=asc`: oldest).
pub async fn list(
    State(st): State<Arc<AppState>>,
    KeyOrSession(caller): KeyOrSession,
    Query(q): Query<ListQuery>,
) -> AppResult<Json<Value>> {
    let limit = q.limit.unwrap_or(10_000);
    if !(1..=10_000).contains(&limit) {
        return Err(ApiError::bad_request("'limit' must be between 1 and 10000.").param("limit"));
    }
    let ascending = match q.order.as_deref() {
        None | Some("desc") => false,
        Some("asc") => true,
        Some(_) => {
            return Err(ApiError::bad_request("'order' must be 'asc' or 'desc'.").param("order"))
        }
    };
    let rows = st
        .db
        .files(
            &caller.user.id,
            q.purpose.as_deref(),
            q.after.as_deref(),
            ascending,
            limit + 1,
        )
        .await?;
    Ok(Json(page(rows, limit, |f| &f.id, file_json)))
}

/// `GET /v1/files/{id}`.
pub async fn get(
    State(st): State<Arc<AppState>>,
    KeyOrSession(caller): KeyOrSession,
    Path(id): Path<String>,
) -> AppResult<Json<Value>> {
    let f = own_file(&st, &caller, &id).await?;
    Ok(Json(file_json(&f)))
}

/// `GET /v1/files/{id}/content`: the bytes, streamed from disk.
pub async fn content(
    State(st): State<Arc<AppState>>,
    KeyOrSession(caller): KeyOrSession,
    Path(id): Path<String>,
) -> AppResult<Response> {
    let f = own_file(&st, &caller, &id).await?;
    let file = tokio::fs::File::open(path_of(&st, &f.id))
        .await
        .map_err(|_| no_such_file(&id))?;
    let chunks = futures::stream::unfold(file, |mut file| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 64 << 10];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(axum::body::Bytes::from(buf)), file))
            }
            Err(e) => Some((Err(e), file)),
        }
    });
    let kind = if f.filename.ends_with(".jsonl") {
        "application/jsonl"
    } else if f.filename.ends_with(".png") {
        "image/png"
    } else {
        "application/octet-stream"
    };
    Ok((
        [
            (header::CONTENT_TYPE, kind.to_string()),
            (header::CONTENT_LENGTH, f.bytes.to_string()),
        ],
        axum::body::Body::from_stream(chunks),
    )
        .into_response())
}

/// `DELETE /v1/files/{id}`.
pub async fn delete(
    State(st): State<Arc<AppState>>,
    KeyOrSession(caller): KeyOrSession,
    Path(id): Path<String>,
) -> AppResult<Json<Value>> {
    let f = own_file(&st, &caller, &id).await?;
    remove(&st, &f.id).await?;
    Ok(Json(json!({"id": f.id, "object": "file", "deleted": true})))
}

/// Remove a file's row, then its bytes.
pub(crate) async fn remove(st: &AppState, id: &str) -> AppResult<()> {
    st.db.delete_file(id).await?;
    match tokio::fs::remove_file(path_of(st, id)).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(store_error(e)),
        _ => Ok(()),
    }
}

/// Delete the files whose time is up; how many.
pub(crate) async fn sweep(st: &AppState) -> AppResult<usize> {
    let ids = st.db.expired_files().await?;
    for id in &ids {
        remove(st, id).await?;
    }
    Ok(ids.len())
}
