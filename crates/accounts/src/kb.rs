//! Who may read each knowledge base. Stored in the database, so every
//! replica of the server sees the same answer.

use crate::{AccountError, Db, Role, User};
use serde::Serialize;
use sqlx::Row;

/// The readers of a knowledge base (admins always read).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Readers {
    Everyone,
    Admins,
    /// These users (by id).
    Users(Vec<String>),
}

impl Readers {
    pub fn allows(&self, user: &User) -> bool {
        user.role == Role::Admin
            || match self {
                Readers::Everyone => true,
                Readers::Admins => false,
                Readers::Users(ids) => ids.contains(&user.id),
            }
    }

    fn encode(&self) -> String {
        match self {
            Readers::Everyone => "*".into(),
            Readers::Admins => String::new(),
            Readers::Users(ids) => ids.join(","),
        }
    }

    fn decode(s: &str) -> Self {
        match s {
            "*" => Readers::Everyone,
            "" => Readers::Admins,
            ids => Readers::Users(ids.split(',').map(String::from).collect()),
        }
    }
}

impl Db {
    /// The readers of knowledge base `kb` (everyone, when never set).
    pub async fn kb_readers(&self, kb: &str) -> Result<Readers, AccountError> {
        let row = sqlx::query("SELECT readers FROM kb_readers WHERE kb = $1")
            .bind(kb)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            Some(r) => Readers::decode(&r.try_get::<String, _>(0)?),
            None => Readers::Everyone,
        })
    }

    pub async fn set_kb_readers(&self, kb: &str, readers: &Readers) -> Result<(), AccountError> {
        sqlx::query("INSERT INTO kb_readers (kb, readers) VALUES ($1, $2) ON CONFLICT (kb) DO UPDATE SET readers = excluded.readers")
            .bind(kb)
            .bind(readers.encode())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Readers by user name (`["alice", "bob"]`) as a [`Readers::Users`];
    /// an unknown name is an error.
    pub async fn readers_named(&self, names: &[String]) -> Result<Readers, AccountError> {
        let mut ids = Vec::new();
        for n in names {
            let u = self
                .user_by_name(n)
                .await?
                .ok_or_else(|| AccountError::UnknownUser(n.clone()))?;
            ids.push(u.id);
        }
        Ok(Readers::Users(ids))
    }
}

/// One change to a knowledge base, as replicas replay it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KbChange {
    pub seq: i64,
    pub kb: String,
    pub op: String,
    pub body: String,
}

impl Db {
    /// Append a change to the knowledge-base log (PostgreSQL: replicas
    /// replay it). Rows are numbered under a table lock, so they become
    /// visible in the order of their numbers and a reader never skips one.
    pub async fn log_kb_change(&self, kb: &str, op: &str, body: &str) -> Result<i64, AccountError> {
        let mut tx = self.begin_write().await?;
        if self.postgres {
            sqlx::query("LOCK TABLE kb_log IN EXCLUSIVE MODE")
                .execute(&mut *tx)
                .await?;
        }
        let seq: i64 = sqlx::query("SELECT CAST(COALESCE(MAX(seq), 0) + 1 AS BIGINT) FROM kb_log")
            .fetch_one(&mut *tx)
            .await?
            .try_get(0)?;
        sqlx::query("INSERT INTO kb_log (seq, kb, op, body, replica_id, at_ms) VALUES ($1, $2, $3, $4, $5, $6)")
            .bind(seq)
            .bind(kb)
            .bind(op)
            .bind(body)
            .bind(self.replica())
            .bind(crate::now() * 1000)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(seq)
    }

    /// Changes after `seq`, oldest first, at most `limit`.
    pub async fn kb_changes_after(
        &self,
        seq: i64,
        limit: i64,
    ) -> Result<Vec<KbChange>, AccountError> {
        let rows = sqlx::query(
            "SELECT seq, kb, op, body FROM kb_log WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(seq)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(KbChange {
                    seq: r.try_get(0)?,
                    kb: r.try_get(1)?,
                    op: r.try_get(2)?,
                    body: r.try_get(3)?,
                })
            })
            .collect()
    }
}
