//! Limits shared by several replicas on one PostgreSQL database
//! (`HANLIN_TEST_POSTGRES_URL`; `.ci/run` sets it and requires it).

use hanlin_accounts::limits::{LimitError, SharedLimiter, Spend};
use hanlin_accounts::{Db, Plan, Role, Usage, UsageRecord};
use std::sync::Arc;
use std::time::Duration;

async fn fresh_database() -> Option<String> {
    let Ok(url) = std::env::var("HANLIN_TEST_POSTGRES_URL") else {
        assert!(
            std::env::var("HANLIN_REQUIRE_POSTGRES").is_err(),
            "HANLIN_REQUIRE_POSTGRES is set but HANLIN_TEST_POSTGRES_URL is not"
        );
        eprintln!("HANLIN_TEST_POSTGRES_URL is not set: shared limits not tested here");
        return None;
    };
    Some(
        Db::create_test_database(&url)
            .await
            .expect("a test database"),
    )
}

async fn replica(url: &str, id: &str) -> Db {
    let mut db = Db::connect(url).await.expect("connect");
    db.set_replica(id);
    db.register_replica().await.expect("register");
    db
}

fn plan(rpm: i64, tpm: i64, tpd: i64) -> Plan {
    Plan::limited("small", rpm, tpm, tpd)
}

fn usage_row(id: &str, user: &str, tokens: i64) -> UsageRecord {
    UsageRecord {
        request_id: id.into(),
        key_id: "k".into(),
        user_id: user.into(),
        model: "m".into(),
        endpoint: "chat".into(),
        ts: hanlin_accounts::now(),
        usage: Usage {
            prompt_tokens: tokens,
            ..Default::default()
        },
        weight_milli: hanlin_accounts::FULL_PRICE,
    }
}

/// 64 requests at once through two replicas against a quota of 10 requests
/// of 100 tokens: exactly 10 are admitted, whichever replica they reach;
/// tokens used and settled count as usage, a dead replica's holds stop
/// counting once its lease lapses.
#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn two_replicas_admit_exactly_the_quota() {
    let Some(url) = fresh_database().await else {
        return;
    };
    let a = replica(&url, "a").await;
    let b = replica(&url, "b").await;
    let user = a.ensure_user("u", Role::User, None).await.expect("user");
    let lease = Duration::from_millis(1500);
    let limiters = [
        SharedLimiter::new(a.clone(), lease),
        SharedLimiter::new(b.clone(), lease),
    ];
    let p = plan(1000, 1_000_000, 1000);
    let admitted = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..64usize {
        let (l, p, uid, admitted) = (
            limiters[i % 2].clone(),
            p.clone(),
            user.id.clone(),
            admitted.clone(),
        );
        tasks.push(tokio::spawn(async move {
            l.count_request(&uid, &p)
                .await
                .expect("db")
                .expect("rpm is high");
            match l
                .reserve(&format!("r{i}"), &uid, &p, Spend::tokens(100))
                .await
                .expect("db")
            {
                Ok(()) => admitted.lock().expect("lock").push(i),
                Err(LimitError::TokensPerDay { .. }) => {}
                Err(e) => panic!("{e}"),
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let admitted = admitted.lock().expect("lock").clone();
    assert_eq!(admitted.len(), 10, "exactly the quota: {admitted:?}");

    // One admitted request used 40 of its 100: its usage row is final,
    // then its hold is released; 60 tokens come free, for either replica.
    let i0 = admitted[0];
    let (la, lb) = (&limiters[0], &limiters[1]);
    let dbs = [&a, &b];
    dbs[i0 % 2]
        .record_usage(&usage_row(&format!("r{i0}"), &user.id, 40))
        .await
        .expect("usage");
    limiters[i0 % 2]
        .release(&format!("r{i0}"))
        .await
        .expect("release");
    assert!(lb
        .reserve("x1", &user.id, &p, Spend::tokens(60))
        .await
        .expect("db")
        .is_ok());
    assert!(matches!(
        la.reserve("x2", &user.id, &p, Spend::tokens(1))
            .await
            .expect("db"),
        Err(LimitError::TokensPerDay { .. })
    ));

    // Replica b dies. Its requests had checkpointed 10 tokens each (their
    // usage rows); after the lease only those count, not the 100 (and the
    // 60 of x1) it held.
    let mut spent = 40;
    for &i in admitted.iter().filter(|&&i| i != i0) {
        if i % 2 == 1 {
            b.record_usage(&usage_row(&format!("r{i}"), &user.id, 10))
                .await
                .expect("usage");
            spent += 10;
        } else {
            spent += 100;
        }
    }
    let free = p.tokens_per_day - spent;
    assert!(free >= 60, "x1 at least comes free");
    assert!(la
        .reserve("x4", &user.id, &p, Spend::tokens(free))
        .await
        .expect("db")
        .is_err());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        a.heartbeat().await.expect("beat");
        if la
            .reserve("x4", &user.id, &p, Spend::tokens(free))
            .await
            .expect("db")
            .is_ok()
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "b's holds still count long after its lease"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Exactly what was free: not one token more.
    assert!(la
        .reserve("x5", &user.id, &p, Spend::tokens(1))
        .await
        .expect("db")
        .is_err());
    let swept = a
        .sweep_dead_replicas(lease.as_millis() as i64)
        .await
        .expect("sweep");
    assert!(swept.holds >= 1, "{swept:?}");
}

/// Requests per minute across replicas, with the time to wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_per_minute_are_shared() {
    let Some(url) = fresh_database().await else {
        return;
    };
    let a = replica(&url, "a").await;
    let b = replica(&url, "b").await;
    let user = a.ensure_user("v", Role::User, None).await.expect("user");
    let lease = Duration::from_secs(30);
    let (la, lb) = (SharedLimiter::new(a, lease), SharedLimiter::new(b, lease));
    let p = plan(3, 1_000_000, 1_000_000);
    for l in [&la, &lb, &la] {
        l.count_request(&user.id, &p)
            .await
            .expect("db")
            .expect("within");
    }
    match lb.count_request(&user.id, &p).await.expect("db") {
        Err(LimitError::Requests { retry_after, .. }) => {
            assert!(retry_after > Duration::from_secs(50), "{retry_after:?}")
        }
        other => panic!("{other:?}"),
    }
}

/// The daily image quota across replicas: images held by a running request
/// on one replica count on the other; once drawn they count as usage.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn image_quotas_are_shared() {
    let Some(url) = fresh_database().await else {
        return;
    };
    let a = replica(&url, "a").await;
    let b = replica(&url, "b").await;
    let user = a.ensure_user("w", Role::User, None).await.expect("user");
    let lease = Duration::from_secs(30);
    let (la, lb) = (
        SharedLimiter::new(a.clone(), lease),
        SharedLimiter::new(b, lease),
    );
    let mut p = plan(100, 1_000_000, 1_000_000);
    p.images_per_day = 3;
    let images = |n| Spend {
        tokens: 0,
        images: n,
    };
    la.reserve("i1", &user.id, &p, images(2))
        .await
        .expect("db")
        .expect("two of three");
    match lb.reserve("i2", &user.id, &p, images(2)).await.expect("db") {
        Err(LimitError::ImagesPerDay { left: 1, .. }) => {}
        other => panic!("{other:?}"),
    }
    // i1 drew one of its two (the other was cancelled): its usage row,
    // then its hold released.
    let mut row = usage_row("i1", &user.id, 0);
    row.usage.images = 1;
    a.record_usage(&row).await.expect("usage");
    la.release("i1").await.expect("release");
    lb.reserve("i2", &user.id, &p, images(2))
        .await
        .expect("db")
        .expect("two left");
    assert!(la
        .reserve("i3", &user.id, &p, images(1))
        .await
        .expect("db")
        .is_err());
}
