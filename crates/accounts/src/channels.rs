//! What messaging channels (WeChat) keep: their users, each message once
//! (the platform retries an unanswered callback, possibly at another
//! replica), answers waiting to be delivered, and API access tokens.
//!
//! A message's row moves `running` → `answered` (the reply is ready for a
//! passive answer) | `pushing` (its callbacks ran out: the answer is sent
//! through the API) | `partial` (its callbacks ran out on an account that
//! cannot push: part of the answer went back, the rest waits in the
//! user's `pending` pages) → `done`. Every move is a compare-and-set on the
//! status, so exactly one party — the generation finishing or the last
//! callback giving up — decides how the answer travels.

use crate::{now, random_token, AccountError, Db, Role, User};
use sqlx::Row;

/// A channel's user, with its row in `users`.
#[derive(Debug, Clone)]
pub struct ChannelUser {
    pub account: String,
    pub external_id: String,
    pub user: User,
    /// The conversation new messages go to.
    pub conversation_id: Option<String>,
    pub created_at: i64,
}

/// Where a received message stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsgStatus {
    Running,
    Answered,
    Pushing,
    Partial,
    Done,
}

impl MsgStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            MsgStatus::Running => "running",
            MsgStatus::Answered => "answered",
            MsgStatus::Pushing => "pushing",
            MsgStatus::Partial => "partial",
            MsgStatus::Done => "done",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "running" => MsgStatus::Running,
            "answered" => MsgStatus::Answered,
            "pushing" => MsgStatus::Pushing,
            "partial" => MsgStatus::Partial,
            _ => MsgStatus::Done,
        }
    }
}

/// A received message's row.
#[derive(Debug, Clone)]
pub struct ChannelMessage {
    pub status: MsgStatus,
    /// How many callbacks have carried it (1 for the first).
    pub attempts: i64,
    pub reply: Option<String>,
    pub created_at: i64,
}

const USER_COLS: &str = "c.account, c.external_id, c.conversation_id, c.created_at, u.id, u.name, u.role, u.plan, u.created_at, u.status";

fn channel_user_of(row: &sqlx::any::AnyRow) -> Result<ChannelUser, sqlx::Error> {
    let user = User {
        id: row.try_get(4)?,
        name: row.try_get(5)?,
        role: Role::parse(&row.try_get::<String, _>(6)?),
        plan: row.try_get(7)?,
        created_at: row.try_get(8)?,
        status: crate::status_of(&row.try_get::<String, _>(9)?),
    };
    Ok(ChannelUser {
        account: row.try_get(0)?,
        external_id: row.try_get(1)?,
        conversation_id: row.try_get(2)?,
        created_at: row.try_get(3)?,
        user,
    })
}

impl Db {
    /// The user `external_id` of channel `account`, created (active, on
    /// `plan`) at first contact. Channel users skip the sign-up policy:
    /// they are the account's audience, not web accounts.
    pub async fn channel_user(
        &self,
        account: &str,
        external_id: &str,
        plan: &str,
    ) -> Result<ChannelUser, AccountError> {
        if let Some(u) = self.find_channel_user(account, external_id).await? {
            return Ok(u);
        }
        self.plan(plan).await?;
        let id = format!("user-{}", random_token(16));
        // The name is only a label (channel users are looked up by their
        // platform id), random so that no web user can have taken it.
        sqlx::query("INSERT INTO users (id, name, role, plan, created_at, status) VALUES ($1, $2, $3, $4, $5, 'active')")
            .bind(&id)
            .bind(format!("{}~{}", account.replace('/', "-"), random_token(12)))
            .bind(Role::Channel.as_str())
            .bind(plan)
            .bind(now())
            .execute(&self.pool)
            .await?;
        let inserted = sqlx::query("INSERT INTO channel_users (account, external_id, user_id, conversation_id, pending, created_at) VALUES ($1, $2, $3, NULL, NULL, $4) ON CONFLICT (account, external_id) DO NOTHING")
            .bind(account)
            .bind(external_id)
            .bind(&id)
            .bind(now())
            .execute(&self.pool)
            .await?
            .rows_affected();
        if inserted == 0 {
            // Another replica created them first: drop the spare row.
            let _ = sqlx::query("DELETE FROM users WHERE id = $1")
                .bind(&id)
                .execute(&self.pool)
                .await;
        }
        self.find_channel_user(account, external_id)
            .await?
            .ok_or_else(|| AccountError::UnknownUser(external_id.into()))
    }

    /// The user `external_id` of channel `account`, if they have written.
    pub async fn find_channel_user(
        &self,
        account: &str,
        external_id: &str,
    ) -> Result<Option<ChannelUser>, AccountError> {
        let row = sqlx::query(&format!("SELECT {USER_COLS} FROM channel_users c JOIN users u ON u.id = c.user_id WHERE c.account = $1 AND c.external_id = $2"))
            .bind(account)
            .bind(external_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(channel_user_of).transpose()?)
    }

    /// The users of channel `account`, newest first (the admin path).
    pub async fn channel_users(&self, account: &str) -> Result<Vec<ChannelUser>, AccountError> {
        let rows = sqlx::query(&format!("SELECT {USER_COLS} FROM channel_users c JOIN users u ON u.id = c.user_id WHERE c.account = $1 ORDER BY c.created_at DESC, c.external_id"))
            .bind(account)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(channel_user_of).collect::<Result<_, _>>()?)
    }

    /// Point the user's next messages at `conversation_id` (`None`: a new
    /// topic) and forget undelivered pages.
    pub async fn set_channel_conversation(
        &self,
        account: &str,
        external_id: &str,
        conversation_id: Option<&str>,
    ) -> Result<(), AccountError> {
        sqlx::query("UPDATE channel_users SET conversation_id = $1, pending = NULL WHERE account = $2 AND external_id = $3")
            .bind(conversation_id)
            .bind(account)
            .bind(external_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Add pages to what the user's next messages will deliver.
    pub async fn push_channel_pages(
        &self,
        account: &str,
        external_id: &str,
        pages: &[String],
    ) -> Result<(), AccountError> {
        if pages.is_empty() {
            return Ok(());
        }
        self.edit_pending(account, external_id, |all| {
            all.extend(pages.iter().cloned());
            Some(())
        })
        .await
        .map(|_| ())
    }

    /// Take the first undelivered page, with how many remain after it.
    pub async fn take_channel_page(
        &self,
        account: &str,
        external_id: &str,
    ) -> Result<Option<(String, usize)>, AccountError> {
        self.edit_pending(account, external_id, |all| {
            (!all.is_empty()).then(|| {
                let first = all.remove(0);
                (first, all.len())
            })
        })
        .await
    }

    /// Change the user's pending pages with `edit` (which returns `None`
    /// to leave them as they were), retried until no one else changed them
    /// in between.
    async fn edit_pending<R>(
        &self,
        account: &str,
        external_id: &str,
        edit: impl Fn(&mut Vec<String>) -> Option<R>,
    ) -> Result<Option<R>, AccountError> {
        for _ in 0..16 {
            let old: Option<String> = sqlx::query(
                "SELECT pending FROM channel_users WHERE account = $1 AND external_id = $2",
            )
            .bind(account)
            .bind(external_id)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| r.try_get::<Option<String>, _>(0))
            .transpose()?
            .flatten();
            let mut all: Vec<String> = old
                .as_deref()
                .and_then(|s| serde_json::from_str(s).ok())
                .unwrap_or_default();
            let Some(r) = edit(&mut all) else {
                return Ok(None);
            };
            if self
                .swap_pending(account, external_id, old.as_deref(), &all)
                .await?
            {
                return Ok(Some(r));
            }
        }
        Err(AccountError::Invalid("pending pages kept changing".into()))
    }

    /// Replace `pending` if it still holds `old` (compare-and-set).
    async fn swap_pending(
        &self,
        account: &str,
        external_id: &str,
        old: Option<&str>,
        new: &[String],
    ) -> Result<bool, AccountError> {
        let new = (!new.is_empty()).then(|| serde_json::Value::from(new.to_vec()).to_string());
        let q = match old {
            Some(_) => "UPDATE channel_users SET pending = $1 WHERE account = $2 AND external_id = $3 AND pending = $4",
            None => "UPDATE channel_users SET pending = $1 WHERE account = $2 AND external_id = $3 AND pending IS NULL",
        };
        let mut q = sqlx::query(q).bind(new).bind(account).bind(external_id);
        if let Some(o) = old {
            q = q.bind(o);
        }
        Ok(q.execute(&self.pool).await?.rows_affected() == 1)
    }

    /// Record a callback carrying message `key`: `(true, row)` for the
    /// first delivery, which owns the answer; `(false, row)` for a retry
    /// (its `attempts` already counts this one).
    pub async fn claim_channel_message(
        &self,
        account: &str,
        key: &str,
        external_id: &str,
    ) -> Result<(bool, ChannelMessage), AccountError> {
        let first = sqlx::query("INSERT INTO channel_messages (account, msg_key, external_id, attempts, status, reply, created_at) VALUES ($1, $2, $3, 1, 'running', NULL, $4) ON CONFLICT (account, msg_key) DO NOTHING")
            .bind(account)
            .bind(key)
            .bind(external_id)
            .bind(now())
            .execute(&self.pool)
            .await?
            .rows_affected()
            == 1;
        if !first {
            sqlx::query("UPDATE channel_messages SET attempts = attempts + 1 WHERE account = $1 AND msg_key = $2")
                .bind(account)
                .bind(key)
                .execute(&self.pool)
                .await?;
        }
        let row = self
            .channel_message(account, key)
            .await?
            .ok_or_else(|| AccountError::Invalid("message row vanished".into()))?;
        Ok((first, row))
    }

    pub async fn channel_message(
        &self,
        account: &str,
        key: &str,
    ) -> Result<Option<ChannelMessage>, AccountError> {
        let row = sqlx::query("SELECT status, attempts, reply, created_at FROM channel_messages WHERE account = $1 AND msg_key = $2")
            .bind(account)
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            None => None,
            Some(r) => Some(ChannelMessage {
                status: MsgStatus::parse(&r.try_get::<String, _>(0)?),
                attempts: r.try_get(1)?,
                reply: r.try_get(2)?,
                created_at: r.try_get(3)?,
            }),
        })
    }

    /// Move message `key` from `from` to `to` (setting the reply when
    /// given); `false` when it was no longer `from`.
    pub async fn move_channel_message(
        &self,
        account: &str,
        key: &str,
        from: MsgStatus,
        to: MsgStatus,
        reply: Option<&str>,
    ) -> Result<bool, AccountError> {
        let q = match reply {
            Some(r) => sqlx::query("UPDATE channel_messages SET status = $1, reply = $2 WHERE account = $3 AND msg_key = $4 AND status = $5")
                .bind(to.as_str())
                .bind(r),
            None => sqlx::query("UPDATE channel_messages SET status = $1 WHERE account = $2 AND msg_key = $3 AND status = $4")
                .bind(to.as_str()),
        };
        let n = q
            .bind(account)
            .bind(key)
            .bind(from.as_str())
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(n == 1)
    }

    /// Whether the user has a message other than `key` still being
    /// answered (received after `since`).
    pub async fn channel_user_busy(
        &self,
        account: &str,
        external_id: &str,
        key: &str,
        since: i64,
    ) -> Result<bool, AccountError> {
        let row = sqlx::query("SELECT 1 FROM channel_messages WHERE account = $1 AND external_id = $2 AND msg_key <> $3 AND status = 'running' AND created_at >= $4")
            .bind(account)
            .bind(external_id)
            .bind(key)
            .bind(since)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.is_some())
    }

    /// Forget messages received before `before` (de-duplication only needs
    /// the platform's retry window).
    pub async fn prune_channel_messages(&self, before: i64) -> Result<u64, AccountError> {
        Ok(sqlx::query(
            "DELETE FROM channel_messages WHERE created_at < $1 AND status <> 'running'",
        )
        .bind(before)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    /// The stored access token of `account`, if valid for another minute.
    pub async fn channel_token(&self, account: &str) -> Result<Option<String>, AccountError> {
        let row = sqlx::query("SELECT token FROM channel_tokens WHERE account = $1 AND token IS NOT NULL AND expires_at > $2")
            .bind(account)
            .bind(now() + 60)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get::<String, _>(0)).transpose()?)
    }

    /// Take the lease to fetch `account`'s token for `secs` seconds;
    /// `false` when another process holds it.
    pub async fn lease_channel_token(
        &self,
        account: &str,
        secs: i64,
    ) -> Result<bool, AccountError> {
        let t = now();
        sqlx::query("INSERT INTO channel_tokens (account, token, expires_at, lease_until) VALUES ($1, NULL, 0, 0) ON CONFLICT (account) DO NOTHING")
            .bind(account)
            .execute(&self.pool)
            .await?;
        let n = sqlx::query(
            "UPDATE channel_tokens SET lease_until = $1 WHERE account = $2 AND lease_until <= $3",
        )
        .bind(t + secs)
        .bind(account)
        .bind(t)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    /// Store a fetched token and end the lease.
    pub async fn put_channel_token(
        &self,
        account: &str,
        token: &str,
        expires_at: i64,
    ) -> Result<(), AccountError> {
        sqlx::query("UPDATE channel_tokens SET token = $1, expires_at = $2, lease_until = 0 WHERE account = $3")
            .bind(token)
            .bind(expires_at)
            .bind(account)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Forget `token` unless another has replaced it.
    pub async fn invalidate_channel_token(
        &self,
        account: &str,
        token: &str,
    ) -> Result<(), AccountError> {
        sqlx::query("UPDATE channel_tokens SET token = NULL, expires_at = 0 WHERE account = $1 AND token = $2")
            .bind(account)
            .bind(token)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn db() -> (Db, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::connect(&format!("sqlite://{}", dir.path().join("t.db").display()))
            .await
            .unwrap();
        (db, dir)
    }

    #[tokio::test]
    async fn users_are_created_once_and_hidden_from_the_user_list() {
        let (db, _d) = db().await;
        let a = db.channel_user("wechat/demo", "o-1", "free").await.unwrap();
        let b = db.channel_user("wechat/demo", "o-1", "free").await.unwrap();
        assert_eq!(a.user.id, b.user.id);
        assert_eq!(a.user.role, Role::Channel);
        let c = db
            .channel_user("wechat/other", "o-1", "free")
            .await
            .unwrap();
        assert_ne!(a.user.id, c.user.id);
        assert!(db.users().await.unwrap().is_empty());
        assert_eq!(db.channel_users("wechat/demo").await.unwrap().len(), 1);
        assert!(db.channel_user("wechat/demo", "o-2", "nope").await.is_err());
    }

    #[tokio::test]
    async fn messages_are_claimed_once_and_moved_by_compare_and_set() {
        let (db, _d) = db().await;
        let (first, m) = db.claim_channel_message("a", "msg:1", "u").await.unwrap();
        assert!(first && m.attempts == 1 && m.status == MsgStatus::Running);
        let (first, m) = db.claim_channel_message("a", "msg:1", "u").await.unwrap();
        assert!(!first && m.attempts == 2);
        assert!(db.channel_user_busy("a", "u", "msg:2", 0).await.unwrap());
        assert!(!db.channel_user_busy("a", "u", "msg:1", 0).await.unwrap());
        assert!(db
            .move_channel_message(
                "a",
                "msg:1",
                MsgStatus::Running,
                MsgStatus::Answered,
                Some("hi")
            )
            .await
            .unwrap());
        // The other party loses the race.
        assert!(!db
            .move_channel_message("a", "msg:1", MsgStatus::Running, MsgStatus::Pushing, None)
            .await
            .unwrap());
        let m = db.channel_message("a", "msg:1").await.unwrap().unwrap();
        assert_eq!(
            (m.status, m.reply.as_deref()),
            (MsgStatus::Answered, Some("hi"))
        );
        assert!(!db.channel_user_busy("a", "u", "msg:2", 0).await.unwrap());
    }

    #[tokio::test]
    async fn pages_queue_in_order() {
        let (db, _d) = db().await;
        db.channel_user("a", "u", "free").await.unwrap();
        assert_eq!(db.take_channel_page("a", "u").await.unwrap(), None);
        db.push_channel_pages("a", "u", &["1".into(), "2".into()])
            .await
            .unwrap();
        db.push_channel_pages("a", "u", &["3".into()])
            .await
            .unwrap();
        assert_eq!(
            db.take_channel_page("a", "u").await.unwrap(),
            Some(("1".into(), 2))
        );
        assert_eq!(
            db.take_channel_page("a", "u").await.unwrap(),
            Some(("2".into(), 1))
        );
        db.set_channel_conversation("a", "u", None).await.unwrap();
        assert_eq!(db.take_channel_page("a", "u").await.unwrap(), None);
    }

    #[tokio::test]
    async fn one_token_lease_at_a_time() {
        let (db, _d) = db().await;
        assert_eq!(db.channel_token("a").await.unwrap(), None);
        assert!(db.lease_channel_token("a", 20).await.unwrap());
        assert!(!db.lease_channel_token("a", 20).await.unwrap());
        db.put_channel_token("a", "T1", now() + 7200).await.unwrap();
        assert_eq!(db.channel_token("a").await.unwrap().as_deref(), Some("T1"));
        db.invalidate_channel_token("a", "OLD").await.unwrap();
        assert_eq!(db.channel_token("a").await.unwrap().as_deref(), Some("T1"));
        db.invalidate_channel_token("a", "T1").await.unwrap();
        assert_eq!(db.channel_token("a").await.unwrap(), None);
        assert!(db.lease_channel_token("a", 20).await.unwrap());
    }
}
