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
