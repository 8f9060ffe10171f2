//! Rate limits and quotas, enforced exactly under concurrency: every check
//! and reservation happens under one lock, and a request reserves its worst
//! case (prompt + max new tokens) before it is admitted, so concurrent
//! requests can never jointly overshoot a limit. When the request ends, the
//! reservation is replaced by what the engine actually counted.

use crate::{day_of, Plan};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MINUTE: Duration = Duration::from_secs(60);

/// Which limit refused a request, and when to try again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("Rate limit reached: {limit} requests per minute. Please try again in {}s.", retry_after.as_secs().max(1))]
    Requests { limit: i64, retry_after: Duration },
    #[error("Rate limit reached: {limit} tokens per minute (this request needs up to {needed}). Please try again in {}s.", retry_after.as_secs().max(1))]
    TokensPerMinute {
        limit: i64,
        needed: i64,
        retry_after: Duration,
    },
    #[error("You exceeded your daily quota of {limit} tokens (this request needs up to {needed}). It resets at 00:00 UTC.")]
    TokensPerDay {
        limit: i64,
        needed: i64,
        retry_after: Duration,
    },
    #[error("You exceeded your daily quota of {limit} images ({left} left today, this request asks for {needed}). It resets at 00:00 UTC.")]
    ImagesPerDay {
        limit: i64,
        left: i64,
        needed: i64,
        retry_after: Duration,
    },
}

/// What a request may use, has used, or a user spent: tokens (weighted by
/// the plan's price) and images.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Spend {
    pub tokens: i64,
    pub images: i64,
}

impl Spend {
    pub fn tokens(tokens: i64) -> Self {
        Self { tokens, images: 0 }
    }

    /// Both sums, saturating.
    pub fn saturating_add(self, o: Self) -> Self {
        Self {
            tokens: self.tokens.saturating_add(o.tokens),
            images: self.images.saturating_add(o.images),
        }
    }
}

impl std::ops::Sub for Spend {
    type Output = Self;
    fn sub(self, o: Self) -> Self {
        Self {
            tokens: self.tokens - o.tokens,
            images: self.images - o.images,
        }
    }
}

impl LimitError {
    pub fn retry_after(&self) -> Duration {
        match self {
            LimitError::Requests { retry_after, .. }
            | LimitError::TokensPerMinute { retry_after, .. }
            | LimitError::TokensPerDay { retry_after, .. }
            | LimitError::ImagesPerDay { retry_after, .. } => *retry_after,
        }
    }
}

#[derive(Default)]
struct Window {
    requests: VecDeque<Instant>,
    /// (when, tokens) counted against the per-minute limit.
    tokens: VecDeque<(Instant, i64)>,
    day: String,
    day_tokens: i64,
    day_images: i64,
}

impl Window {
    fn expire(&mut self, now: Instant) {
        while self
            .requests
            .front()
            .is_some_and(|t| now.duration_since(*t) >= MINUTE)
        {
            self.requests.pop_front();
        }
        while self
            .tokens
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) >= MINUTE)
        {
            self.tokens.pop_front();
        }
    }
    fn minute_tokens(&self) -> i64 {
        self.tokens.iter().map(|(_, n)| n).sum()
    }
}

/// Per-user windows. Cheap to clone (shared).
#[derive(Clone, Default)]
pub struct Limiter {
    users: Arc<Mutex<HashMap<String, Window>>>,
}

/// A request's admitted reservation; settle it with the real counts.
#[derive(Debug)]
pub struct Reservation {
    user_id: String,
    at: Instant,
    day: String,
    reserved: Spend,
}

fn seconds_to_midnight(unix: i64) -> Duration {
    Duration::from_secs((86_400 - unix.rem_euclid(86_400)) as u64)
}

/// The user's window, moved to today (reading the day's spending from
/// `spent_today` on the first request of a day) and expired to `now`.
fn window<'a>(
    users: &'a mut HashMap<String, Window>,
    user_id: &str,
    now: Instant,
    spent_today: impl FnOnce() -> Spend,
) -> (&'a mut Window, String) {
    let today = day_of(crate::now());
    let w = users.entry(user_id.to_string()).or_default();
    if w.day != today {
        w.day = today.clone();
        let spent = spent_today();
        (w.day_tokens, w.day_images) = (spent.tokens, spent.images);
    }
    w.expire(now);
    (w, today)
}

fn check_requests(w: &Window, plan: &Plan, now: Instant) -> Result<(), LimitError> {
    if w.requests.len() as i64 >= plan.requests_per_minute {
        let oldest = w.requests.front().copied().unwrap_or(now);
        return Err(LimitError::Requests {
            limit: plan.requests_per_minute,
            retry_after: MINUTE.saturating_sub(now.duration_since(oldest)),
        });
    }
    Ok(())
}

fn reserve_in(
    user_id: &str,
    w: &mut Window,
    plan: &Plan,
    asked: Spend,
    now: Instant,
    today: String,
) -> Result<Reservation, LimitError> {
    let needed = asked.tokens;
    let minute = w.minute_tokens();
    if minute + needed > plan.tokens_per_minute {
        let retry_after = if needed > plan.tokens_per_minute {
            MINUTE
        } else {
            // Wait until enough of the window has expired.
            let mut freed = 0;
            let mut when = MINUTE;
            for (t, n) in &w.tokens {
                freed += n;
                if minute - freed + needed <= plan.tokens_per_minute {
                    when = MINUTE.saturating_sub(now.duration_since(*t));
                    break;
                }
            }
            when
        };
        return Err(LimitError::TokensPerMinute {
            limit: plan.tokens_per_minute,
            needed,
            retry_after,
        });
    }
    if w.day_tokens + needed > plan.tokens_per_day {
        return Err(LimitError::TokensPerDay {
            limit: plan.tokens_per_day,
            needed,
            retry_after: seconds_to_midnight(crate::now()),
        });
    }
    check_images(plan, w.day_images, asked.images)?;
    w.tokens.push_back((now, needed));
    w.day_tokens += needed;
    w.day_images += asked.images;
    Ok(Reservation {
        user_id: user_id.to_string(),
        at: now,
        day: today,
        reserved: asked,
    })
}

/// Whether `asked` more images fit the plan's daily quota after `spent`.
fn check_images(plan: &Plan, spent: i64, asked: i64) -> Result<(), LimitError> {
    if asked > 0 && spent + asked > plan.images_per_day {
        return Err(LimitError::ImagesPerDay {
            limit: plan.images_per_day,
            left: (plan.images_per_day - spent).max(0),
            needed: asked,
            retry_after: seconds_to_midnight(crate::now()),
        });
    }
    Ok(())
}

impl Limiter {
    /// Whether `user_id`'s spending on `day` is already tracked here (if
    /// not, the caller reads it from the database before [`Limiter::admit`]).
    pub fn knows(&self, user_id: &str, day: &str) -> bool {
        let users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        users.get(user_id).is_some_and(|w| w.day == day)
    }

    /// Count one request against the plan's requests per minute, before
    /// any work is done for it (the cheap check comes first: a refused
    /// request costs no tokenizing).
    pub fn count_request(&self, user_id: &str, plan: &Plan) -> Result<(), LimitError> {
        let now = Instant::now();
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        let w = users.entry(user_id.to_string()).or_default();
        w.expire(now);
        check_requests(w, plan, now)?;
        w.requests.push_back(now);
        Ok(())
    }

    /// Reserve `needed` tokens against the per-minute and per-day limits,
    /// and images against the daily image quota, of a request already
    /// counted by [`Limiter::count_request`].
    pub fn reserve(
        &self,
        user_id: &str,
        plan: &Plan,
        needed: Spend,
        spent_today: impl FnOnce() -> Spend,
    ) -> Result<Reservation, LimitError> {
        let now = Instant::now();
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        let (w, today) = window(&mut users, user_id, now, spent_today);
        reserve_in(user_id, w, plan, needed, now, today)
    }

    /// Replace a reservation by what was actually used.
    pub fn settle(&self, r: Reservation, used: Spend) {
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        let Some(w) = users.get_mut(&r.user_id) else {
            return;
        };
        if w.day == r.day {
            let change = used - r.reserved;
            w.day_tokens += change.tokens;
            w.day_images += change.images;
        }
        if let Some(entry) = w
            .tokens
            .iter_mut()
            .find(|(t, n)| *t == r.at && *n == r.reserved.tokens)
        {
            entry.1 = used.tokens;
        }
    }
}

/// Limits kept in the database (PostgreSQL), exact across every replica on
/// it. Each check takes a per-user transaction lock, so two replicas
/// admitting the same user's requests are serialized as if they were one.
///
/// A running request *holds* its worst case (`limit_holds`, one row per
/// request, with the replica that runs it); what a user spent is the sum of
/// the live holds plus the usage rows of requests that hold nothing (ended
/// ones, and those of dead replicas, whose usage rows were checkpointed
/// while they ran). A hold is released only after the request's final
/// usage row is written, so a request is never counted by neither.
#[derive(Clone)]
pub struct SharedLimiter {
    db: crate::Db,
    lease_ms: i64,
}

/// Per-user lock for the rest of the transaction, then the database's
/// clock in milliseconds, read once the lock is held (one round trip).
const LOCK_USER: &str = "SELECT CAST(FLOOR(EXTRACT(EPOCH FROM clock_timestamp()) * 1000) AS BIGINT) FROM (SELECT pg_advisory_xact_lock(hashtextextended($1, 0))) AS l";

/// Spending of one user on a day and in the last minute, other than the
/// request `$4`'s own: live holds, plus usage rows of requests without one.
const SPENT: &str = "WITH live AS (SELECT h.request_id, h.day, h.at_ms, h.tokens, h.images FROM limit_holds h JOIN replicas r ON r.id = h.replica_id WHERE h.user_id = $1 AND r.heartbeat_ms > $2 AND h.request_id <> $4), \
    settled AS (SELECT u.day, u.ts, (u.prompt_tokens + u.completion_tokens) * u.weight_milli / 1000 AS tokens, u.images FROM usage u WHERE u.user_id = $1 AND (u.day = $3 OR u.ts >= $6) AND u.request_id <> $4 AND u.request_id NOT IN (SELECT request_id FROM live)) \
    SELECT CAST(COALESCE((SELECT SUM(tokens) FROM live WHERE day = $3), 0) + COALESCE((SELECT SUM(tokens) FROM settled WHERE day = $3), 0) AS BIGINT), \
    CAST(COALESCE((SELECT SUM(tokens) FROM live WHERE at_ms > $5), 0) + COALESCE((SELECT SUM(tokens) FROM settled WHERE ts >= $6), 0) AS BIGINT), \
    CAST(COALESCE((SELECT MIN(at_ms) FROM live WHERE at_ms > $5), 0) AS BIGINT), \
    CAST(COALESCE((SELECT SUM(images) FROM live WHERE day = $3), 0) + COALESCE((SELECT SUM(images) FROM settled WHERE day = $3), 0) AS BIGINT)";

impl SharedLimiter {
    /// Limits on `db` (PostgreSQL), whose holds count while their replica's
    /// heartbeat is younger than `lease`.
    pub fn new(db: crate::Db, lease: Duration) -> Self {
        Self {
            db,
            lease_ms: lease.as_millis() as i64,
        }
    }

    async fn locked(
        &self,
        user_id: &str,
    ) -> Result<(sqlx::Transaction<'static, sqlx::Any>, i64), crate::AccountError> {
        use sqlx::Row;
        let mut tx = self.db.pool.begin().await?;
        let now: i64 = sqlx::query(LOCK_USER)
            .bind(format!("limits:{user_id}"))
            .fetch_one(&mut *tx)
            .await?
            .try_get(0)?;
        Ok((tx, now))
    }

    /// [`Limiter::count_request`] across replicas. The outer error is the
    /// database's, the inner the limit's.
    pub async fn count_request(
        &self,
        user_id: &str,
        plan: &Plan,
    ) -> Result<Result<(), LimitError>, crate::AccountError> {
        use sqlx::Row;
        let (mut tx, now) = self.locked(user_id).await?;
        let row = sqlx::query("SELECT CAST(COUNT(*) AS BIGINT), CAST(COALESCE(MIN(at_ms), 0) AS BIGINT) FROM limit_requests WHERE user_id = $1 AND at_ms > $2")
            .bind(user_id)
            .bind(now - 60_000)
            .fetch_one(&mut *tx)
            .await?;
        let (count, oldest): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
        if count >= plan.requests_per_minute {
            return Ok(Err(LimitError::Requests {
                limit: plan.requests_per_minute,
                retry_after: Duration::from_millis((oldest + 60_000 - now).clamp(0, 60_000) as u64),
            }));
        }
        sqlx::query("INSERT INTO limit_requests (user_id, at_ms) VALUES ($1, $2)")
            .bind(user_id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Ok(()))
    }

    /// Hold `asked` for request `request_id` (all it may use in all: what
    /// it already used plus the worst case of the step about to run),
    /// replacing its earlier hold, if the plan's limits allow.
    pub async fn reserve(
        &self,
        request_id: &str,
        user_id: &str,
        plan: &Plan,
        asked: Spend,
    ) -> Result<Result<(), LimitError>, crate::AccountError> {
        let total = asked.tokens;
        use sqlx::Row;
        let (mut tx, now) = self.locked(user_id).await?;
        let day = crate::day_of(now / 1000);
        let row = sqlx::query(SPENT)
            .bind(user_id)
            .bind(now - self.lease_ms)
            .bind(&day)
            .bind(request_id)
            .bind(now - 60_000)
            .bind(now / 1000 - 60)
            .fetch_one(&mut *tx)
            .await?;
        let (day_spent, minute_spent, oldest, day_images): (i64, i64, i64, i64) = (
            row.try_get(0)?,
            row.try_get(1)?,
            row.try_get(2)?,
            row.try_get(3)?,
        );
        if minute_spent + total > plan.tokens_per_minute {
            let retry_after = if total > plan.tokens_per_minute || oldest == 0 {
                MINUTE
            } else {
                Duration::from_millis((oldest + 60_000 - now).clamp(1000, 60_000) as u64)
            };
            return Ok(Err(LimitError::TokensPerMinute {
                limit: plan.tokens_per_minute,
                needed: total,
                retry_after,
            }));
        }
        if day_spent + total > plan.tokens_per_day {
            return Ok(Err(LimitError::TokensPerDay {
                limit: plan.tokens_per_day,
                needed: total,
                retry_after: seconds_to_midnight(now / 1000),
            }));
        }
        if let Err(e) = check_images(plan, day_images, asked.images) {
            return Ok(Err(e));
        }
        sqlx::query("INSERT INTO limit_holds (request_id, user_id, replica_id, day, at_ms, tokens, images) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (request_id) DO UPDATE SET tokens = excluded.tokens, images = excluded.images")
            .bind(request_id)
            .bind(user_id)
            .bind(self.db.replica())
            .bind(&day)
            .bind(now)
            .bind(total)
            .bind(asked.images)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Ok(()))
    }

    /// End request `request_id`'s hold (its usage row, now final, counts
    /// from here on).
    pub async fn release(&self, request_id: &str) -> Result<(), crate::AccountError> {
        sqlx::query("DELETE FROM limit_holds WHERE request_id = $1")
            .bind(request_id)
            .execute(&self.db.pool)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A whole admission: the request counted, then its tokens reserved.
    fn admit(
        l: &Limiter,
        user: &str,
        p: &Plan,
        needed: i64,
        spent: impl FnOnce() -> i64,
    ) -> Result<Reservation, LimitError> {
        l.count_request(user, p)?;
        l.reserve(user, p, Spend::tokens(needed), || Spend::tokens(spent()))
    }

    fn plan(rpm: i64, tpm: i64, tpd: i64) -> Plan {
        Plan {
            name: "t".into(),
            requests_per_minute: rpm,
            tokens_per_minute: tpm,
            tokens_per_day: tpd,
            max_context: 4096,
            models: vec!["*".into()],
            priority: 0,
            max_n: 4,
            price_milli: 1000,
            file_bytes: crate::DEFAULT_FILE_BYTES,
            batch_price_milli: crate::DEFAULT_BATCH_PRICE,
            images_per_day: 3,
        }
    }

    #[test]
    fn requests_per_minute_are_exact_under_concurrency() {
        let l = Limiter::default();
        let p = plan(10, 1_000_000, 1_000_000);
        let admitted = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..64 {
                s.spawn(|| {
                    if admit(&l, "u", &p, 1, || 0).is_ok() {
                        admitted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                });
            }
        });
        assert_eq!(admitted.into_inner(), 10);
        match admit(&l, "u", &p, 1, || 0) {
            Err(LimitError::Requests { retry_after, .. }) => {
                assert!(retry_after <= MINUTE && retry_after > Duration::from_secs(50))
            }
            other => panic!("{other:?}"),
        }
        // Other users are not affected.
        assert!(admit(&l, "v", &p, 1, || 0).is_ok());
    }

    #[test]
    fn token_limits_count_reservations_then_actual_use() {
        let l = Limiter::default();
        let p = plan(100, 1000, 1500);
        let r = admit(&l, "u", &p, 800, || 0).expect("fits");
        assert!(matches!(
            admit(&l, "u", &p, 300, || 0),
            Err(LimitError::TokensPerMinute { .. })
        ));
        // It used only 100 of the 800 it reserved.
        l.settle(r, Spend::tokens(100));
        let r2 = admit(&l, "u", &p, 800, || 0).expect("fits after settling");
        l.settle(r2, Spend::tokens(800));
        // 900 spent today; the daily quota (1500) refuses 700 more, with the
        // time to midnight.
        let l2 = l.clone();
        let mut p2 = p.clone();
        p2.tokens_per_minute = 1_000_000;
        match admit(&l2, "u", &p2, 700, || 0) {
            Err(e @ LimitError::TokensPerDay { .. }) => {
                assert!(e.retry_after() <= Duration::from_secs(86_400))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn requests_are_counted_before_tokens_are_reserved() {
        let l = Limiter::default();
        let p = plan(2, 100, 1000);
        l.count_request("u", &p).expect("first");
        // Refused tokens do not undo the counted request.
        assert!(matches!(
            l.reserve("u", &p, Spend::tokens(500), Spend::default),
            Err(LimitError::TokensPerMinute { .. })
        ));
        let r = l
            .reserve("u", &p, Spend::tokens(50), Spend::default)
            .expect("fits");
        l.settle(r, Spend::tokens(10));
        l.count_request("u", &p).expect("second");
        assert!(matches!(
            l.count_request("u", &p),
            Err(LimitError::Requests { .. })
        ));
        // 10 tokens used: 90 remain this minute.
        assert!(l
            .reserve("u", &p, Spend::tokens(90), Spend::default)
            .is_ok());
        assert!(l
            .reserve("u", &p, Spend::tokens(1), Spend::default)
            .is_err());
    }

    #[test]
    fn daily_quota_starts_from_what_the_database_says() {
        let l = Limiter::default();
        let p = plan(100, 1_000_000, 1000);
        assert!(matches!(
            admit(&l, "u", &p, 10, || 995),
            Err(LimitError::TokensPerDay { .. })
        ));
        assert!(admit(&l, "u", &p, 5, || unreachable!("read once per day")).is_ok());
    }

    #[test]
    fn images_count_against_the_daily_image_quota() {
        let l = Limiter::default();
        let p = plan(100, 1_000_000, 1_000_000);
        let two = Spend {
            tokens: 0,
            images: 2,
        };
        // One image already made today (the database says so).
        l.count_request("u", &p).expect("counted");
        match l.reserve("u", &p, Spend { images: 3, ..two }, || Spend {
            tokens: 0,
            images: 1,
        }) {
            Err(LimitError::ImagesPerDay {
                left: 2, needed: 3, ..
            }) => {}
            other => panic!("{other:?}"),
        }
        let r = l.reserve("u", &p, two, Spend::default).expect("two fit");
        assert!(matches!(
            l.reserve("u", &p, Spend { images: 1, ..two }, Spend::default),
            Err(LimitError::ImagesPerDay { left: 0, .. })
        ));
        // One of the two was cancelled before it was drawn.
        l.settle(
            r,
            Spend {
                tokens: 0,
                images: 1,
            },
        );
        assert!(l
            .reserve("u", &p, Spend { images: 1, ..two }, Spend::default)
            .is_ok());
        // Text requests do not touch the image quota.
        assert!(l
            .reserve("u", &p, Spend::tokens(10), Spend::default)
            .is_ok());
    }
}
