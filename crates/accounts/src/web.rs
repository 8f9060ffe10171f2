//! Browser accounts: passwords (argon2id, salted, PHC strings) and cookie
//! sessions. A session cookie carries a random secret; only its sha256 is
//! stored, with the session's CSRF token and expiry.

use crate::{hash_key, now, random_token, AccountError, Db, Role, User};
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
}

pub fn hash_password(password: &str) -> Result<String, AccountError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| AccountError::Invalid(format!("hashing the password: {e}")))
}

fn verify_password(password: &str, phc: &str) -> bool {
    PasswordHash::new(phc).is_ok_and(|h| {
        Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

fn check_name(name: &str) -> Result<(), SignInError> {
    let n = name.chars().count();
    if n == 0 || n > 64 || name.trim() != name || name.chars().any(char::is_control) {
        return Err(SignInError::Invalid(
            "A user name is 1 to 64 characters, without leading or trailing spaces.".into(),
        ));
    }
    Ok(())
}

fn check_password(password: &str) -> Result<(), SignInError> {
    let n = password.chars().count();
    if !(8..=256).contains(&n) {
        return Err(SignInError::Invalid(
            "A password is 8 to 256 characters.".into(),
        ));
    }
    Ok(())
}

impl Db {
    /// A new account with a password. The first account on a server with
    /// no admin yet becomes its admin.
    pub async fn register(
        &self,
        name: &str,
        password: &str,
    ) -> Result<Result<User, SignInError>, AccountError> {
        if let Err(e) = check_name(name).and(check_password(password)) {
            return Ok(Err(e));
        }
        if self.user_by_name(name).await?.is_some() {
            return Ok(Err(SignInError::NameTaken(name.into())));
        }
        let admins: i64 =
            sqlx::query("SELECT CAST(COUNT(*) AS BIGINT) FROM users WHERE role = 'admin'")
                .fetch_one(&self.pool)
                .await?
                .try_get(0)?;
        let role = if admins == 0 { Role::Admin } else { Role::User };
        let hash = hash_password(password)?;
        let id = format!("user-{}", random_token(16));
        let res = sqlx::query("INSERT INTO users (id, name, role, plan, created_at, password_hash) VALUES ($1, $2, $3, 'free', $4, $5)")
            .bind(&id)
            .bind(name)
            .bind(role.as_str())
            .bind(now())
            .bind(&hash)
            .execute(&self.pool)
            .await;
        if res.is_err() && self.user_by_name(name).await?.is_some() {
            return Ok(Err(SignInError::NameTaken(name.into())));
        }
        res?;
        let user = self
            .user_by_name(name)
            .await?
            .ok_or_else(|| AccountError::UnknownUser(name.into()))?;
        Ok(Ok(user))
    }

    /// Set (or replace) a user's password (`hanlin admin user passwd`).
    pub async fn set_password(&self, name: &str, password: &str) -> Result<(), AccountError> {
        check_password(password).map_err(|e| AccountError::Invalid(e.to_string()))?;
        let hash = hash_password(password)?;
        let r = sqlx::query("UPDATE users SET password_hash = $1 WHERE name = $2")
            .bind(hash)
            .bind(name)
            .execute(&self.pool)
            .await?;
        if r.rows_affected() == 0 {
            return Err(AccountError::UnknownUser(name.into()));
        }
        Ok(())
    }

    /// The user if `password` is theirs.
    pub async fn check_login(
        &self,
        name: &str,
        password: &str,
    ) -> Result<Result<User, SignInError>, AccountError> {
        let row = sqlx::query("SELECT password_hash FROM users WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        let hash: Option<String> = match row {
            Some(r) => r.try_get(0)?,
            None => None,
        };
        match hash {
            Some(h) if verify_password(password, &h) => Ok(self
                .user_by_name(name)
                .await?
                .ok_or(SignInError::WrongPassword)),
            _ => Ok(Err(SignInError::WrongPassword)),
        }
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
        let row = sqlx::query("SELECT s.csrf, s.expires_at, u.id, u.name, u.role, u.plan, u.created_at FROM sessions s JOIN users u ON u.id = s.user_id WHERE s.id_hash = $1")
            .bind(hash_key(secret))
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let expires_at: i64 = row.try_get(1)?;
        if expires_at <= now() {
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
        assert!(check_name("李白").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name(" a").is_err());
        assert!(check_name("a\nb").is_err());
        assert!(check_password("short").is_err());
        assert!(check_password("长长的密码八个字").is_ok());
    }
}
