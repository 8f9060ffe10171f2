//! Browser accounts: passwords (argon2id, salted, PHC strings) and cookie
//! sessions. A session cookie carries a random secret; only its sha256 is
//! stored, with the session's CSRF token and expiry.

use crate::{hash_key, now, random_token, AccountError, Db, Role, User, UserStatus};
use argon2::password_hash::{rand_core::OsRng, PasswordHash, SaltString};
use argon2::{Argon2, PasswordHasher, PasswordVerifier};
use sqlx::Row;

/// How long a browser session lasts without signing in again.
pub const SESSION_TTL_SECS: i64 = 30 * 24 * 3600;

#[derive(Debug, Clone)]
pub struct Session {
    pub user: User,
    pub csrf: String,
    pub expires_at: i64,
}

/// Why a sign-in or registration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignInError {
    #[error("Wrong user name or password.")]
    WrongPassword,
    #[error("The name {0:?} is taken.")]
    NameTaken(String),
    #[error("{0}")]
    Invalid(String),
    #[error("This account is waiting for an administrator's approval.")]
    Pending,
    #[error("This account is disabled.")]
    Disabled,
    #[error("This server already has an administrator.")]
    AdminExists,
}

/// At most this many argon2 computations run at once, on the blocking
/// pool: a flood of sign-ins queues here instead of stalling the threads
/// that serve every other request.
const ARGON2_AT_ONCE: usize = 2;

fn argon2_permits() -> &'static tokio::sync::Semaphore {
    static P: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
    P.get_or_init(|| tokio::sync::Semaphore::new(ARGON2_AT_ONCE))
}

/// Run argon2 work `f` on the blocking pool, a bounded number at a time.
async fn argon2_job<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, AccountError> {
    let _permit = argon2_permits()
        .acquire()
        .await
        .map_err(|e| AccountError::Invalid(format!("password hashing stopped: {e}")))?;
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AccountError::Invalid(format!("password hashing failed: {e}")))
}

pub fn hash_password(password: &str) -> Result<String, AccountError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| AccountError::Invalid(format!("hashing the password: {e}")))
}

async fn hash_password_async(password: &str) -> Result<String, AccountError> {
    let p = password.to_string();
    argon2_job(move || hash_password(&p)).await?
}

fn verify_password(password: &str, phc: &str) -> bool {
    PasswordHash::new(phc).is_ok_and(|h| {
        Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

/// A hash no password matches, verified against when the name is unknown
/// so that a sign-in takes as long whether or not the account exists.
fn decoy_hash() -> &'static str {
    static H: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    H.get_or_init(|| hash_password(&random_token(32)).unwrap_or_default())
}

/// Characters that change how text is shown without being seen: bidi
/// controls, zero-width characters, invisible fillers and tag characters.
fn invisible(c: char) -> bool {
    matches!(c as u32,
        0x00AD | 0x034F | 0x061C | 0x115F | 0x1160 | 0x17B4 | 0x17B5 | 0x180E
        | 0x200B..=0x200F | 0x202A..=0x202E | 0x2060..=0x206F | 0x3164 | 0xFE00..=0xFE0F
        | 0xFEFF | 0xFFA0 | 0xFFF9..=0xFFFB | 0x1D173..=0x1D17A | 0xE0000..=0xE0FFF)
}

/// A user name in its one stored form: NFKC-normalised (so `ｌｉｂａｉ` and
/// `libai` are one name), 1 to 64 characters, no leading or trailing
/// spaces, no control, bidi or invisible characters.
pub fn normalize_name(name: &str) -> Result<String, SignInError> {
    use unicode_normalization::UnicodeNormalization;
    let n: String = name.nfkc().collect();
    let count = n.chars().count();
    if count == 0
        || count > 64
        || n.trim() != n
        || n.chars().any(|c| c.is_control() || invisible(c))
    {
        return Err(SignInError::Invalid(
            "A user name is 1 to 64 visible characters, without leading or trailing spaces.".into(),
        ));
    }
    Ok(n)
}

/// The most common passwords (NIST SP 800-63B: refuse passwords found in
/// lists of commonly used ones); see `data/common-passwords.LICENSE`.
const COMMON_PASSWORDS: &str = include_str!("../data/common-passwords.txt");

fn check_password(password: &str) -> Result<(), SignInError> {
    let n = password.chars().count();
    if !(8..=256).contains(&n) {
        return Err(SignInError::Invalid(
            "A password is 8 to 256 characters.".into(),
        ));
    }
    let lower = password.to_lowercase();
    if COMMON_PASSWORDS.lines().any(|p| p == lower) {
        return Err(SignInError::Invalid(
            "This password is one of the most common ones; please choose another.".into(),
        ));
    }
    Ok(())
}

impl Db {
    /// Whether an active admin exists.
    pub async fn has_admin(&self) -> Result<bool, AccountError> {
        let n: i64 = sqlx::query(
            "SELECT CAST(COUNT(*) AS BIGINT) FROM users WHERE role = 'admin' AND status = 'active'",
        )
        .fetch_one(&self.pool)
        .await?
        .try_get(0)?;
        Ok(n > 0)
    }

    /// A new account with a password, with `role` and `status` (the server's
    /// sign-up policy decides them).
    pub async fn register(
        &self,
        name: &str,
        password: &str,
        role: Role,
        status: UserStatus,
    ) -> Result<Result<User, SignInError>, AccountError> {
        self.register_inner(name, password, role, status, false)
            .await
    }

    /// The first admin: created only while the server has no admin, in one
    /// statement (two concurrent first sign-ups cannot both become admin).
    pub async fn register_first_admin(
        &self,
        name: &str,
        password: &str,
    ) -> Result<Result<User, SignInError>, AccountError> {
        self.register_inner(name, password, Role::Admin, UserStatus::Active, true)
            .await
    }

    async fn register_inner(
        &self,
        name: &str,
        password: &str,
        role: Role,
        status: UserStatus,
        only_if_no_admin: bool,
    ) -> Result<Result<User, SignInError>, AccountError> {
        let name = match normalize_name(name).and_then(|n| check_password(password).map(|_| n)) {
            Ok(n) => n,
            Err(e) => return Ok(Err(e)),
        };
        if self.user_by_name(&name).await?.is_some() {
            return Ok(Err(SignInError::NameTaken(name)));
        }
        let hash = hash_password_async(password).await?;
        let id = format!("user-{}", random_token(16));
        let sql = if only_if_no_admin {
            "INSERT INTO users (id, name, role, plan, created_at, password_hash, status) SELECT $1, $2, $3, 'free', $4, $5, $6 WHERE NOT EXISTS (SELECT 1 FROM users WHERE role = 'admin' AND status = 'active')"
        } else {
            "INSERT INTO users (id, name, role, plan, created_at, password_hash, status) VALUES ($1, $2, $3, 'free', $4, $5, $6)"
        };
        let res = sqlx::query(sql)
            .bind(&id)
            .bind(&name)
            .bind(role.as_str())
            .bind(now())
            .bind(&hash)
            .bind(status.as_str())
            .execute(&self.pool)
            .await;
        match res {
            Ok(r) if r.rows_affected() == 0 => return Ok(Err(SignInError::AdminExists)),
            Ok(_) => {}
            Err(_) if self.user_by_name(&name).await?.is_some() => {
                return Ok(Err(SignInError::NameTaken(name)))
            }
            Err(e) => return Err(e.into()),
        }
        let user = self
            .user_by_name(&name)
            .await?
            .ok_or_else(|| AccountError::UnknownUser(name.clone()))?;
        Ok(Ok(user))
    }

    /// Set (or replace) a user's password (`hanlin admin user passwd`).
    /// Every session of the user ends: whoever knew the old password is
    /// signed out.
    pub async fn set_password(&self, name: &str, password: &str) -> Result<(), AccountError> {
        check_password(password).map_err(|e| AccountError::Invalid(e.to_string()))?;
        let user = self
            .user_by_name(name)
            .await?
            .filter(|u| u.status != UserStatus::Deleted)
            .ok_or_else(|| AccountError::UnknownUser(name.into()))?;
        let hash = hash_password_async(password).await?;
        sqlx::query("UPDATE users SET password_hash = $1 WHERE id = $2")
            .bind(hash)
            .bind(&user.id)
            .execute(&self.pool)
            .await?;
        self.end_sessions_of(&user.id).await
    }

    /// The user if `password` is theirs and the account may sign in. An
    /// unknown name costs the same argon2 work as a known one.
    pub async fn check_login(
        &self,
        name: &str,
        password: &str,
    ) -> Result<Result<User, SignInError>, AccountError> {
        use unicode_normalization::UnicodeNormalization;
        let name: String = name.nfkc().collect();
        let row =
            sqlx::query("SELECT password_hash FROM users WHERE name = $1 AND status <> 'deleted'")
                .bind(&name)
                .fetch_optional(&self.pool)
                .await?;
        let hash: Option<String> = match row {
            Some(r) => r.try_get(0)?,
            None => None,
        };
        let known = hash.is_some();
        let phc = hash.unwrap_or_else(|| decoy_hash().to_string());
        let p = password.to_string();
        let ok = argon2_job(move || verify_password(&p, &phc)).await? && known;
        if !ok {
            return Ok(Err(SignInError::WrongPassword));
        }
        let Some(user) = self.user_by_name(&name).await? else {
            return Ok(Err(SignInError::WrongPassword));
        };
        Ok(match user.status {
            UserStatus::Active => Ok(user),
            UserStatus::Pending => Err(SignInError::Pending),
            UserStatus::Disabled | UserStatus::Deleted => Err(SignInError::Disabled),
        })
    }

    /// Approve, disable or re-enable an account. Disabling ends its
    /// sessions and revokes its keys.
    pub async fn set_user_status(
        &self,
        name: &str,
        status: UserStatus,
    ) -> Result<User, AccountError> {
        if status == UserStatus::Deleted {
            return self.delete_user(name).await;
        }
        let user = self
            .user_by_name(name)
            .await?
            .filter(|u| u.status != UserStatus::Deleted)
            .ok_or_else(|| AccountError::UnknownUser(name.into()))?;
        sqlx::query("UPDATE users SET status = $1 WHERE id = $2")
            .bind(status.as_str())
            .bind(&user.id)
            .execute(&self.pool)
            .await?;
        if status == UserStatus::Disabled {
            self.end_sessions_of(&user.id).await?;
            self.revoke_keys_of(&user.id).await?;
        }
        self.user_by_name(name)
            .await?
            .ok_or_else(|| AccountError::UnknownUser(name.into()))
    }

    /// Delete an account: its sessions end, its keys are revoked, its
    /// conversations and personas are deleted. The row stays as a
    /// tombstone (renamed, without password) so that its usage rows keep
    /// counting for accounting; the name is free again.
    pub async fn delete_user(&self, name: &str) -> Result<User, AccountError> {
        let user = self
            .user_by_name(name)
            .await?
            .filter(|u| u.status != UserStatus::Deleted)
            .ok_or_else(|| AccountError::UnknownUser(name.into()))?;
        self.end_sessions_of(&user.id).await?;
        self.revoke_keys_of(&user.id).await?;
        let mut tx = self.begin_write().await?;
        sqlx::query("DELETE FROM messages WHERE conversation_id IN (SELECT id FROM conversations WHERE user_id = $1)")
            .bind(&user.id)
            .execute(&mut *tx)
            .await?;
        for sql in [
            "DELETE FROM conversations WHERE user_id = $1",
            "DELETE FROM personas WHERE user_id = $1",
        ] {
            sqlx::query(sql).bind(&user.id).execute(&mut *tx).await?;
        }
        sqlx::query(
            "UPDATE users SET status = 'deleted', name = $1, password_hash = NULL WHERE id = $2",
        )
        .bind(format!("deleted-{}", user.id))
        .bind(&user.id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(User {
            status: UserStatus::Deleted,
            ..user
        })
    }

    async fn revoke_keys_of(&self, user_id: &str) -> Result<(), AccountError> {
        sqlx::query(
            "UPDATE api_keys SET revoked_at = $1 WHERE user_id = $2 AND revoked_at IS NULL",
        )
        .bind(now())
        .bind(user_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn end_sessions_of(&self, user_id: &str) -> Result<(), AccountError> {
        sqlx::query("DELETE FROM sessions WHERE user_id = $1")
            .bind(user_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Delete expired sessions; returns how many.
    pub async fn prune_sessions(&self) -> Result<u64, AccountError> {
        let r = sqlx::query("DELETE FROM sessions WHERE expires_at <= $1")
            .bind(now())
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }

    /// The sign-up policy an admin set (`None`: never set).
    pub async fn signup_policy(&self) -> Result<Option<SignupPolicy>, AccountError> {
        Ok(self
            .setting("signup")
            .await?
            .and_then(|v| SignupPolicy::parse(&v)))
    }

    pub async fn set_signup_policy(&self, p: SignupPolicy) -> Result<(), AccountError> {
        self.set_setting("signup", p.as_str()).await
    }

    /// A server-wide setting an admin stored (`None`: never set).
    pub async fn setting(&self, name: &str) -> Result<Option<String>, AccountError> {
        let row = sqlx::query("SELECT value FROM settings WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            Some(r) => Some(r.try_get::<String, _>(0)?),
            None => None,
        })
    }

    pub async fn set_setting(&self, name: &str, value: &str) -> Result<(), AccountError> {
        sqlx::query("INSERT INTO settings (name, value) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET value = excluded.value")
            .bind(name)
            .bind(value)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Open a session; returns the cookie's secret and the CSRF token.
    pub async fn create_session(&self, user_id: &str) -> Result<(String, String), AccountError> {
        let secret = random_token(43);
        let csrf = random_token(32);
        let t = now();
        sqlx::query("INSERT INTO sessions (id_hash, user_id, csrf, created_at, expires_at) VALUES ($1, $2, $3, $4, $5)")
            .bind(hash_key(&secret))
            .bind(user_id)
            .bind(&csrf)
            .bind(t)
            .bind(t + SESSION_TTL_SECS)
            .execute(&self.pool)
            .await?;
        Ok((secret, csrf))
    }

    /// The live session behind a cookie secret (`None`: unknown or expired).
    pub async fn session(&self, secret: &str) -> Result<Option<Session>, AccountError> {
        let row = sqlx::query("SELECT s.csrf, s.expires_at, u.id, u.name, u.role, u.plan, u.created_at, u.status FROM sessions s JOIN users u ON u.id = s.user_id WHERE s.id_hash = $1")
            .bind(hash_key(secret))
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let expires_at: i64 = row.try_get(1)?;
        let status = crate::status_of(&row.try_get::<String, _>(7)?);
        if expires_at <= now() || status != UserStatus::Active {
            return Ok(None);
        }
        Ok(Some(Session {
            csrf: row.try_get(0)?,
            expires_at,
            user: User {
                id: row.try_get(2)?,
                name: row.try_get(3)?,
                role: Role::parse(&row.try_get::<String, _>(4)?),
                plan: row.try_get(5)?,
                created_at: row.try_get(6)?,
                status: crate::status_of(&row.try_get::<String, _>(7)?),
            },
        }))
    }

    pub async fn end_session(&self, secret: &str) -> Result<(), AccountError> {
        sqlx::query("DELETE FROM sessions WHERE id_hash = $1 OR expires_at <= $2")
            .bind(hash_key(secret))
            .bind(now())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Make every session of `user_id` expired (tests of the expired-session path).
    #[doc(hidden)]
    pub async fn expire_sessions_for_tests(&self, user_id: &str) -> Result<(), AccountError> {
        sqlx::query("UPDATE sessions SET expires_at = 0 WHERE user_id = $1")
            .bind(user_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_verify_only_themselves() {
        let h = hash_password("correct horse").expect("hash");
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("correct horse", &h));
        assert!(!verify_password("correct hors", &h));
        assert!(!verify_password("correct horse", "not a phc string"));
        // Salted: the same password hashes differently each time.
        assert_ne!(h, hash_password("correct horse").expect("hash"));
    }

    #[test]
    fn names_and_passwords_are_checked() {
        assert_eq!(normalize_name("李白").as_deref(), Ok("李白"));
        // Full-width letters are the same name as ASCII ones.
        assert_eq!(normalize_name("ｌｉｂａｉ").as_deref(), Ok("libai"));
        assert!(normalize_name("").is_err());
        assert!(normalize_name(" a").is_err());
        assert!(normalize_name("a\nb").is_err());
        // Bidi overrides and zero-width characters make names that look
        // like others: refused.
        assert!(normalize_name("admin\u{202E}nimda").is_err());
        assert!(normalize_name("ad\u{200B}min").is_err());
        assert!(normalize_name("admin\u{2066}").is_err());
        assert!(check_password("short").is_err());
        assert!(check_password("长长的密码八个字").is_ok());
        // Among the most common passwords, whatever the case.
        assert!(check_password("password1").is_err());
        assert!(check_password("Qwertyuiop").is_err());
        assert!(check_password("correct horse battery").is_ok());
    }
}

/// Who may create an account on the web app once the server has an admin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SignupPolicy {
    /// Anyone; the account is usable at once.
    Open,
    /// Anyone; the account waits for an admin's approval.
    Approval,
    /// Nobody: admins create accounts.
    Closed,
}

impl SignupPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            SignupPolicy::Open => "open",
            SignupPolicy::Approval => "approval",
            SignupPolicy::Closed => "closed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "open" => SignupPolicy::Open,
            "approval" => SignupPolicy::Approval,
            "closed" => SignupPolicy::Closed,
            _ => return None,
        })
    }
}
