//! The rows behind the OpenAI Files and Batch APIs: files (their bytes are
//! the server's business, kept under their id), batches and their lines.
//! Every replica reads the same rows; a line's result is written once
//! (`pending` → `ok` | `error`), so a batch resumed after a restart runs
//! only what is still pending.

use crate::{now, AccountError, Db};
use serde::Serialize;
use sqlx::Row;

/// One stored file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileRow {
    pub id: String,
    pub user_id: String,
    pub purpose: String,
    pub filename: String,
    pub bytes: i64,
    pub created_at: i64,
    pub expires_at: Option<i64>,
}

/// Where a batch stands (OpenAI's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchStatus {
    Validating,
    Failed,
    InProgress,
    Finalizing,
    Completed,
    Expired,
    Cancelling,
    Cancelled,
}

impl BatchStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            BatchStatus::Validating => "validating",
            BatchStatus::Failed => "failed",
            BatchStatus::InProgress => "in_progress",
            BatchStatus::Finalizing => "finalizing",
            BatchStatus::Completed => "completed",
            BatchStatus::Expired => "expired",
            BatchStatus::Cancelling => "cancelling",
            BatchStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "validating" => BatchStatus::Validating,
            "failed" => BatchStatus::Failed,
            "in_progress" => BatchStatus::InProgress,
            "finalizing" => BatchStatus::Finalizing,
            "completed" => BatchStatus::Completed,
            "expired" => BatchStatus::Expired,
            "cancelling" => BatchStatus::Cancelling,
            "cancelled" => BatchStatus::Cancelled,
            _ => return None,
        })
    }

    /// The column that records when the batch entered this status.
    fn at_column(self) -> &'static str {
        match self {
            BatchStatus::Validating => "created_at",
            BatchStatus::Failed => "failed_at",
            BatchStatus::InProgress => "in_progress_at",
            BatchStatus::Finalizing => "finalizing_at",
            BatchStatus::Completed => "completed_at",
            BatchStatus::Expired => "expired_at",
            BatchStatus::Cancelling => "cancelling_at",
            BatchStatus::Cancelled => "cancelled_at",
        }
    }

    /// Whether the batch still has work for the runner.
    pub fn active(self) -> bool {
        matches!(
            self,
            BatchStatus::Validating
                | BatchStatus::InProgress
                | BatchStatus::Finalizing
                | BatchStatus::Cancelling
        )
    }
}

/// One batch.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BatchRow {
    pub id: String,
    pub user_id: String,
    pub key_id: String,
    pub endpoint: String,
    pub input_file_id: String,
    pub completion_window: String,
    pub status: BatchStatus,
    /// JSON text.
    pub metadata: Option<String>,
    /// JSON text: OpenAI's `errors` object.
    pub errors: Option<String>,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    pub total: i64,
    pub completed: i64,
    pub failed: i64,
    pub created_at: i64,
    pub in_progress_at: Option<i64>,
    pub expires_at: i64,
    pub finalizing_at: Option<i64>,
    pub completed_at: Option<i64>,
    pub failed_at: Option<i64>,
    pub expired_at: Option<i64>,
    pub cancelling_at: Option<i64>,
    pub cancelled_at: Option<i64>,
}

/// One input line of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineRow {
    pub line_no: i64,
    pub custom_id: String,
    /// The request body, JSON text.
    pub body: String,
}

/// A line's outcome: `ok` lines make the output file, `error` lines the
/// error file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineStatus {
    Ok,
    Error,
}

const BATCH_COLUMNS: &str = "id, user_id, key_id, endpoint, input_file_id, completion_window, status, metadata, errors, output_file_id, error_file_id, total, completed, failed, created_at, in_progress_at, expires_at, finalizing_at, completed_at, failed_at, expired_at, cancelling_at, cancelled_at";

fn batch_of(r: &sqlx::any::AnyRow) -> Result<BatchRow, AccountError> {
    let status: String = r.try_get(6)?;
    Ok(BatchRow {
        id: r.try_get(0)?,
        user_id: r.try_get(1)?,
        key_id: r.try_get(2)?,
        endpoint: r.try_get(3)?,
        input_file_id: r.try_get(4)?,
        completion_window: r.try_get(5)?,
        status: BatchStatus::parse(&status)
            .ok_or_else(|| AccountError::Invalid(format!("batch status {status:?}")))?,
        metadata: r.try_get(7)?,
        errors: r.try_get(8)?,
        output_file_id: r.try_get(9)?,
        error_file_id: r.try_get(10)?,
        total: r.try_get(11)?,
        completed: r.try_get(12)?,
        failed: r.try_get(13)?,
        created_at: r.try_get(14)?,
        in_progress_at: r.try_get(15)?,
        expires_at: r.try_get(16)?,
        finalizing_at: r.try_get(17)?,
        completed_at: r.try_get(18)?,
        failed_at: r.try_get(19)?,
        expired_at: r.try_get(20)?,
        cancelling_at: r.try_get(21)?,
        cancelled_at: r.try_get(22)?,
    })
}

const FILE_COLUMNS: &str = "id, user_id, purpose, filename, bytes, created_at, expires_at";

fn file_of(r: &sqlx::any::AnyRow) -> Result<FileRow, AccountError> {
    Ok(FileRow {
        id: r.try_get(0)?,
        user_id: r.try_get(1)?,
        purpose: r.try_get(2)?,
        filename: r.try_get(3)?,
        bytes: r.try_get(4)?,
        created_at: r.try_get(5)?,
        expires_at: r.try_get(6)?,
    })
}

impl Db {
    pub async fn insert_file(&self, f: &FileRow) -> Result<(), AccountError> {
        insert_file(&self.pool, f).await
    }

    /// Insert `f` if the user's files, with it, stay within `quota` bytes;
    /// false (nothing inserted) if not. One transaction that holds the
    /// user's lock (SQLite: the write lock; PostgreSQL: the user's row), so
    /// two uploads at once cannot both fit in room for one.
    pub async fn insert_file_within(&self, f: &FileRow, quota: i64) -> Result<bool, AccountError> {
        let mut tx = self.begin_write().await?;
        if self.postgres {
            sqlx::query("SELECT id FROM users WHERE id = $1 FOR UPDATE")
                .bind(&f.user_id)
                .fetch_optional(&mut *tx)
                .await?;
        }
        let used = file_bytes_of(&mut *tx, &f.user_id).await?;
        if used.saturating_add(f.bytes) > quota {
            return Ok(false);
        }
        insert_file(&mut *tx, f).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// A file, if it exists, has not expired, and (with `user_id`) is theirs.
    pub async fn file(
        &self,
        id: &str,
        user_id: Option<&str>,
    ) -> Result<Option<FileRow>, AccountError> {
        let r = sqlx::query(&format!(
            "SELECT {FILE_COLUMNS} FROM files WHERE id = $1 AND ($2 = '' OR user_id = $2) AND (expires_at IS NULL OR expires_at > $3)"
        ))
        .bind(id)
        .bind(user_id.unwrap_or(""))
        .bind(now())
        .fetch_optional(&self.pool)
        .await?;
        r.as_ref().map(file_of).transpose()
    }

    /// A user's files, newest first (or oldest with `ascending`), after the
    /// file `after` in that order; optionally of one purpose.
    pub async fn files(
        &self,
        user_id: &str,
        purpose: Option<&str>,
        after: Option<&str>,
        ascending: bool,
        limit: i64,
    ) -> Result<Vec<FileRow>, AccountError> {
        let (cmp, order) = if ascending {
            (">", "ASC")
        } else {
            ("<", "DESC")
        };
        let anchor = match after {
            Some(a) => self
                .file(a, Some(user_id))
                .await?
                .map(|f| (f.created_at, f.id)),
            None => None,
        };
        let rows = sqlx::query(&format!(
            "SELECT {FILE_COLUMNS} FROM files WHERE user_id = $1 AND ($2 = '' OR purpose = $2) AND (expires_at IS NULL OR expires_at > $3) AND ($4 = 0 OR created_at {cmp} $5 OR (created_at = $5 AND id {cmp} $6)) ORDER BY created_at {order}, id {order} LIMIT $7"
        ))
        .bind(user_id)
        .bind(purpose.unwrap_or(""))
        .bind(now())
        .bind(anchor.is_some() as i64)
        .bind(anchor.as_ref().map_or(0, |a| a.0))
        .bind(anchor.as_ref().map_or(String::new(), |a| a.1.clone()))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(file_of).collect()
    }

    /// Bytes of unexpired files a user keeps.
    pub async fn file_bytes_of(&self, user_id: &str) -> Result<i64, AccountError> {
        file_bytes_of(&self.pool, user_id).await
    }

    /// Delete a file's row; whether there was one.
    pub async fn delete_file(&self, id: &str) -> Result<bool, AccountError> {
        let r = sqlx::query("DELETE FROM files WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Ids of files whose time is up (their bytes are then deleted).
    pub async fn expired_files(&self) -> Result<Vec<String>, AccountError> {
        let rows =
            sqlx::query("SELECT id FROM files WHERE expires_at IS NOT NULL AND expires_at <= $1")
                .bind(now())
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|r| Ok(r.try_get::<String, _>(0)?))
            .collect()
    }

    /// Store a new batch and its lines in one transaction.
    pub async fn insert_batch(&self, b: &BatchRow, lines: &[LineRow]) -> Result<(), AccountError> {
        let mut tx = self.begin_write().await?;
        sqlx::query(&format!(
            "INSERT INTO batches ({BATCH_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23)"
        ))
        .bind(&b.id)
        .bind(&b.user_id)
        .bind(&b.key_id)
        .bind(&b.endpoint)
        .bind(&b.input_file_id)
        .bind(&b.completion_window)
        .bind(b.status.as_str())
        .bind(&b.metadata)
        .bind(&b.errors)
        .bind(&b.output_file_id)
        .bind(&b.error_file_id)
        .bind(b.total)
        .bind(b.completed)
        .bind(b.failed)
        .bind(b.created_at)
        .bind(b.in_progress_at)
        .bind(b.expires_at)
        .bind(b.finalizing_at)
        .bind(b.completed_at)
        .bind(b.failed_at)
        .bind(b.expired_at)
        .bind(b.cancelling_at)
        .bind(b.cancelled_at)
        .execute(&mut *tx)
        .await?;
        for l in lines {
            sqlx::query("INSERT INTO batch_lines (batch_id, line_no, custom_id, body, status) VALUES ($1, $2, $3, $4, 'pending')")
                .bind(&b.id)
                .bind(l.line_no)
                .bind(&l.custom_id)
                .bind(&l.body)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn batch(
        &self,
        id: &str,
        user_id: Option<&str>,
    ) -> Result<Option<BatchRow>, AccountError> {
        let r = sqlx::query(&format!(
            "SELECT {BATCH_COLUMNS} FROM batches WHERE id = $1 AND ($2 = '' OR user_id = $2)"
        ))
        .bind(id)
        .bind(user_id.unwrap_or(""))
        .fetch_optional(&self.pool)
        .await?;
        r.as_ref().map(batch_of).transpose()
    }

    /// A user's batches, newest first, after batch `after`.
    pub async fn batches(
        &self,
        user_id: &str,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<BatchRow>, AccountError> {
        let anchor = match after {
            Some(a) => self
                .batch(a, Some(user_id))
                .await?
                .map(|b| (b.created_at, b.id)),
            None => None,
        };
        let rows = sqlx::query(&format!(
            "SELECT {BATCH_COLUMNS} FROM batches WHERE user_id = $1 AND ($2 = 0 OR created_at < $3 OR (created_at = $3 AND id < $4)) ORDER BY created_at DESC, id DESC LIMIT $5"
        ))
        .bind(user_id)
        .bind(anchor.is_some() as i64)
        .bind(anchor.as_ref().map_or(0, |a| a.0))
        .bind(anchor.as_ref().map_or(String::new(), |a| a.1.clone()))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(batch_of).collect()
    }

    /// The oldest batch with work left for the runner.
    pub async fn next_active_batch(&self) -> Result<Option<BatchRow>, AccountError> {
        let r = sqlx::query(&format!(
            "SELECT {BATCH_COLUMNS} FROM batches WHERE status IN ('validating', 'in_progress', 'finalizing', 'cancelling') ORDER BY created_at, id LIMIT 1"
        ))
        .fetch_optional(&self.pool)
        .await?;
        r.as_ref().map(batch_of).transpose()
    }

    /// Move a batch to `to` (stamping when), only from one of `from`;
    /// whether it moved.
    pub async fn set_batch_status(
        &self,
        id: &str,
        from: &[BatchStatus],
        to: BatchStatus,
    ) -> Result<bool, AccountError> {
        let from: Vec<String> = from.iter().map(|s| format!("'{}'", s.as_str())).collect();
        let r = sqlx::query(&format!(
            "UPDATE batches SET status = $1, {} = $2 WHERE id = $3 AND status IN ({})",
            to.at_column(),
            from.join(", ")
        ))
        .bind(to.as_str())
        .bind(now())
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() > 0)
    }

    /// The batch's output and error files, once written.
    pub async fn set_batch_files(
        &self,
        id: &str,
        output: Option<&str>,
        error: Option<&str>,
    ) -> Result<(), AccountError> {
        sqlx::query("UPDATE batches SET output_file_id = $1, error_file_id = $2 WHERE id = $3")
            .bind(output)
            .bind(error)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Up to `limit` pending lines of a batch after line `after`, in order.
    pub async fn pending_lines(
        &self,
        batch_id: &str,
        limit: i64,
        after: i64,
    ) -> Result<Vec<LineRow>, AccountError> {
        let rows = sqlx::query("SELECT line_no, custom_id, body FROM batch_lines WHERE batch_id = $1 AND status = 'pending' AND line_no > $2 ORDER BY line_no LIMIT $3")
            .bind(batch_id)
            .bind(after)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(LineRow {
                    line_no: r.try_get(0)?,
                    custom_id: r.try_get(1)?,
                    body: r.try_get(2)?,
                })
            })
            .collect()
    }

    /// Record a line's result, once: a line already done is left as it is
    /// (returns false), and the batch's counts move with it.
    pub async fn finish_line(
        &self,
        batch_id: &str,
        line_no: i64,
        status: LineStatus,
        result: &str,
    ) -> Result<bool, AccountError> {
        let mut tx = self.begin_write().await?;
        let r = sqlx::query("UPDATE batch_lines SET status = $1, result = $2 WHERE batch_id = $3 AND line_no = $4 AND status = 'pending'")
            .bind(match status {
                LineStatus::Ok => "ok",
                LineStatus::Error => "error",
            })
            .bind(result)
            .bind(batch_id)
            .bind(line_no)
            .execute(&mut *tx)
            .await?;
        let moved = r.rows_affected() > 0;
        if moved {
            let column = match status {
                LineStatus::Ok => "completed",
                LineStatus::Error => "failed",
            };
            sqlx::query(&format!(
                "UPDATE batches SET {column} = {column} + 1 WHERE id = $1"
            ))
            .bind(batch_id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(moved)
    }

    /// The results of a batch's lines of one status, in line order, from
    /// line `after` on, at most `limit`: (line number, result).
    pub async fn line_results(
        &self,
        batch_id: &str,
        status: LineStatus,
        after: i64,
        limit: i64,
    ) -> Result<Vec<(i64, String)>, AccountError> {
        let rows = sqlx::query("SELECT line_no, result FROM batch_lines WHERE batch_id = $1 AND status = $2 AND line_no > $3 ORDER BY line_no LIMIT $4")
            .bind(batch_id)
            .bind(match status {
                LineStatus::Ok => "ok",
                LineStatus::Error => "error",
            })
            .bind(after)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get(0)?,
                    r.try_get::<Option<String>, _>(1)?.unwrap_or_default(),
                ))
            })
            .collect()
    }

    /// Drop a finished batch's line bodies and results (its files hold
    /// them now).
    pub async fn drop_batch_lines(&self, batch_id: &str) -> Result<(), AccountError> {
        sqlx::query("DELETE FROM batch_lines WHERE batch_id = $1")
            .bind(batch_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

/// The one INSERT of a file row, on the pool or in a transaction.
async fn insert_file<'e>(
    on: impl sqlx::Executor<'e, Database = sqlx::Any>,
    f: &FileRow,
) -> Result<(), AccountError> {
    sqlx::query(&format!(
        "INSERT INTO files ({FILE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)"
    ))
    .bind(&f.id)
    .bind(&f.user_id)
    .bind(&f.purpose)
    .bind(&f.filename)
    .bind(f.bytes)
    .bind(f.created_at)
    .bind(f.expires_at)
    .execute(on)
    .await?;
    Ok(())
}

/// Bytes of the user's files that have not expired: what the storage quota
/// counts, before an upload and again as it is kept.
async fn file_bytes_of<'e>(
    on: impl sqlx::Executor<'e, Database = sqlx::Any>,
    user_id: &str,
) -> Result<i64, AccountError> {
    let r = sqlx::query("SELECT CAST(COALESCE(SUM(bytes), 0) AS BIGINT) FROM files WHERE user_id = $1 AND (expires_at IS NULL OR expires_at > $2)")
        .bind(user_id)
        .bind(now())
        .fetch_one(on)
        .await?;
    Ok(r.try_get(0)?)
}
