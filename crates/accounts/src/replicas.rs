//! Several `hanlin serve` replicas on one database.
//!
//! Each replica has an id (its `Db` handle carries it) and a row in
//! `replicas` whose heartbeat it renews. A replica whose heartbeat is older
//! than the lease is dead: its token holds stop counting (its requests'
//! usage rows, checkpointed while they ran, count instead), its streaming
//! replies are marked incomplete by whichever replica sweeps next, and its
//! leases lapse. Times are milliseconds of the database's clock on
//! PostgreSQL, so a replica whose own clock is off cannot stretch a lease.

use crate::{AccountError, Db};
use sqlx::Row;
use std::sync::Arc;

/// The database's clock, in milliseconds (one statement on PostgreSQL).
pub(crate) const PG_NOW_MS: &str =
    "SELECT CAST(FLOOR(EXTRACT(EPOCH FROM clock_timestamp()) * 1000) AS BIGINT)";

/// The longest a request may hold tokens, even on a live replica.
pub const MAX_HOLD_MS: i64 = 3 * 3600 * 1000;

/// What one sweep for dead replicas released.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    /// Streaming replies of dead replicas, now marked incomplete.
    pub replies: u64,
    /// Token holds of dead replicas, deleted.
    pub holds: u64,
}

/// A replica as listed for operators.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReplicaRow {
    pub id: String,
    pub started_ms: i64,
    pub heartbeat_ms: i64,
    pub draining: bool,
}

impl Db {
    /// This handle's replica id (`local` until [`Db::set_replica`]).
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// Write for replica `id` from now on (every clone made after this).
    pub fn set_replica(&mut self, id: &str) {
        self.replica = Arc::from(id);
    }

    /// Milliseconds since the epoch by the database's clock (PostgreSQL) or
    /// this machine's (SQLite: one machine).
    pub async fn now_ms(&self) -> Result<i64, AccountError> {
        if self.postgres {
            Ok(sqlx::query(PG_NOW_MS)
                .fetch_one(&self.pool)
                .await?
                .try_get(0)?)
        } else {
            Ok(local_ms())
        }
    }

    /// Difference between this machine's clock and the database's, in
    /// milliseconds (positive: this machine is ahead).
    pub async fn clock_skew_ms(&self) -> Result<i64, AccountError> {
        let before = local_ms();
        let db = self.now_ms().await?;
        let after = local_ms();
        Ok((before + after) / 2 - db)
    }

    /// Announce this replica (or take its row back after a restart).
    pub async fn register_replica(&self) -> Result<(), AccountError> {
        let now = self.now_ms().await?;
        sqlx::query("INSERT INTO replicas (id, started_ms, heartbeat_ms, draining) VALUES ($1, $2, $2, 0) ON CONFLICT (id) DO UPDATE SET started_ms = excluded.started_ms, heartbeat_ms = excluded.heartbeat_ms, draining = 0")
            .bind(self.replica())
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Renew this replica's heartbeat (re-creating its row if a sweep took
    /// it while the replica was cut off).
    pub async fn heartbeat(&self) -> Result<(), AccountError> {
        let now = self.now_ms().await?;
        sqlx::query("INSERT INTO replicas (id, started_ms, heartbeat_ms, draining) VALUES ($1, $2, $2, 0) ON CONFLICT (id) DO UPDATE SET heartbeat_ms = excluded.heartbeat_ms")
            .bind(self.replica())
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Mark this replica as draining (it takes no new work).
    pub async fn set_draining(&self) -> Result<(), AccountError> {
        sqlx::query("UPDATE replicas SET draining = 1 WHERE id = $1")
            .bind(self.replica())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// A replica that stops cleanly: its holds, leases and row go at once
    /// instead of after the lease.
    pub async fn retire_replica(&self) -> Result<(), AccountError> {
        let mut tx = self.begin_write().await?;
        for sql in [
            "DELETE FROM limit_holds WHERE replica_id = $1",
            "DELETE FROM leases WHERE holder = $1",
            "UPDATE messages SET status = 'incomplete' WHERE status = 'streaming' AND replica_id = $1",
            "DELETE FROM replicas WHERE id = $1",
        ] {
            sqlx::query(sql)
                .bind(self.replica())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Release what dead replicas held (replicas whose heartbeat is older
    /// than `lease_ms`), and forget counted requests older than the rate
    /// window. Any replica may run it; it is idempotent.
    pub async fn sweep_dead_replicas(&self, lease_ms: i64) -> Result<Swept, AccountError> {
        let now = self.now_ms().await?;
        let cutoff = now - lease_ms;
        let replies = sqlx::query("UPDATE messages SET status = 'incomplete' WHERE status = 'streaming' AND (replica_id IS NULL OR replica_id NOT IN (SELECT id FROM replicas WHERE heartbeat_ms > $1))")
            .bind(cutoff)
            .execute(&self.pool)
            .await?
            .rows_affected();
        // A hold its live replica never released (a request that outlived
        // any answer, a handle dropped outside a runtime) lapses too.
        let holds = sqlx::query("DELETE FROM limit_holds WHERE at_ms < $2 OR replica_id NOT IN (SELECT id FROM replicas WHERE heartbeat_ms > $1)")
            .bind(cutoff)
            .bind(cutoff + lease_ms - MAX_HOLD_MS)
            .execute(&self.pool)
            .await?
            .rows_affected();
        sqlx::query("DELETE FROM limit_requests WHERE at_ms < $1")
            .bind(cutoff.min(now - 120_000))
            .execute(&self.pool)
            .await?;
        // A replica silent for a day is gone for good.
        sqlx::query("DELETE FROM replicas WHERE heartbeat_ms < $1")
            .bind(cutoff - 86_400_000)
            .execute(&self.pool)
            .await?;
        Ok(Swept { replies, holds })
    }

    /// How many token holds `user_id`'s running requests have (any
    /// replica's): none once every request has ended and its usage row
    /// is final.
    pub async fn holds_of(&self, user_id: &str) -> Result<i64, AccountError> {
        use sqlx::Row;
        Ok(
            sqlx::query("SELECT CAST(COUNT(*) AS BIGINT) FROM limit_holds WHERE user_id = $1")
                .bind(user_id)
                .fetch_one(&self.pool)
                .await?
                .try_get(0)?,
        )
    }

    /// Replicas with a heartbeat within `lease_ms`.
    pub async fn live_replicas(&self, lease_ms: i64) -> Result<Vec<ReplicaRow>, AccountError> {
        let cutoff = self.now_ms().await? - lease_ms;
        let rows = sqlx::query("SELECT id, started_ms, heartbeat_ms, draining FROM replicas WHERE heartbeat_ms > $1 ORDER BY id")
            .bind(cutoff)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(ReplicaRow {
                    id: r.try_get(0)?,
                    started_ms: r.try_get(1)?,
                    heartbeat_ms: r.try_get(2)?,
                    draining: r.try_get::<i64, _>(3)? != 0,
                })
            })
            .collect()
    }

    /// Take (or renew) the lease `name` for `ttl_ms`: true when this
    /// replica holds it now. One replica at a time holds a lease; another
    /// takes it only once it has lapsed.
    pub async fn try_lease(&self, name: &str, ttl_ms: i64) -> Result<bool, AccountError> {
        let now = self.now_ms().await?;
        let n = sqlx::query("INSERT INTO leases (name, holder, until_ms) VALUES ($1, $2, $3) ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, until_ms = excluded.until_ms WHERE leases.holder = excluded.holder OR leases.until_ms < $4")
            .bind(name)
            .bind(self.replica())
            .bind(now + ttl_ms)
            .bind(now)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(n == 1)
    }

    /// Give up the lease `name` if this replica holds it.
    pub async fn release_lease(&self, name: &str) -> Result<(), AccountError> {
        sqlx::query("DELETE FROM leases WHERE name = $1 AND holder = $2")
            .bind(name)
            .bind(self.replica())
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

fn local_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn db(replica: &str, path: &std::path::Path) -> Db {
        let mut db = Db::connect(&format!("sqlite://{}", path.display()))
            .await
            .expect("db");
        db.set_replica(replica);
        db.register_replica().await.expect("register");
        db
    }

    #[tokio::test]
    async fn one_holder_per_lease_until_it_lapses() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("l.db");
        let a = db("a", &path).await;
        let b = db("b", &path).await;
        assert!(a.try_lease("batch", 60_000).await.expect("lease"));
        assert!(a.try_lease("batch", 60_000).await.expect("renew"));
        assert!(!b.try_lease("batch", 60_000).await.expect("held by a"));
        a.release_lease("batch").await.expect("release");
        assert!(b.try_lease("batch", 1).await.expect("free"));
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        assert!(a.try_lease("batch", 60_000).await.expect("lapsed"));
    }

    #[tokio::test]
    async fn a_dead_replicas_streaming_replies_are_marked_incomplete() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("r.db");
        let a = db("a", &path).await;
        let b = db("b", &path).await;
        let user = a
            .ensure_user("u", crate::Role::User, None)
            .await
            .expect("user");
        let mut replies = Vec::new();
        for d in [&a, &b] {
            let c = d
                .create_conversation(&user.id, "t", "", "m", &serde_json::json!({}))
                .await
                .expect("conv");
            let m = d
                .add_message(
                    &user.id,
                    &c.id,
                    None,
                    crate::chats::MessageRole::Assistant,
                    "",
                    crate::chats::MessageStatus::Streaming,
                    None,
                )
                .await
                .expect("msg");
            replies.push((c.id, m.id));
        }
        let status = |d: &Db, (c, m): &(String, String)| {
            let (d, c, m, u) = (d.clone(), c.clone(), m.clone(), user.id.clone());
            async move {
                d.messages(&u, &c)
                    .await
                    .expect("messages")
                    .expect("conversation")
                    .into_iter()
                    .find(|x| x.id == m)
                    .expect("reply")
                    .status
            }
        };
        // Both alive: nothing is swept.
        assert_eq!(
            a.sweep_dead_replicas(60_000).await.expect("sweep"),
            Swept::default()
        );
        // b stops beating; a renews its heartbeat and sweeps with a short lease.
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        a.heartbeat().await.expect("beat");
        let swept = a.sweep_dead_replicas(20).await.expect("sweep");
        assert_eq!(swept.replies, 1);
        assert_eq!(
            status(&a, &replies[0]).await,
            crate::chats::MessageStatus::Streaming
        );
        assert_eq!(
            status(&a, &replies[1]).await,
            crate::chats::MessageStatus::Incomplete
        );
        // A clean stop releases at once.
        a.retire_replica().await.expect("retire");
        assert_eq!(
            status(&b, &replies[0]).await,
            crate::chats::MessageStatus::Incomplete
        );
    }
}
