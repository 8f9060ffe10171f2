//! The accounts database on SQLite (always) and on PostgreSQL (when
//! `HANLIN_TEST_POSTGRES_URL` names a server; `.ci/run` starts one and sets
//! it, and requires it so that this half is never silently skipped there).

use hanlin_accounts::{AuthError, Db, NewKey, Role, UsageRecord};

async fn exercise(db: &Db) {
    // Default plans ship with the first migration.
    let plans = db.plans().await.expect("plans");
    let names: Vec<_> = plans.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["free", "plus"]);
    assert!(
        db.plan("plus").await.expect("plus").priority
            > db.plan("free").await.expect("free").priority
    );

    let alice = db
        .ensure_user("alice", Role::User, None)
        .await
        .expect("user");
    assert_eq!(alice.plan, "free");
    let again = db
        .ensure_user("alice", Role::User, Some("plus"))
        .await
        .expect("user");
    assert_eq!(
        (again.id.as_str(), again.plan.as_str()),
        (alice.id.as_str(), "plus")
    );
    assert!(db
        .ensure_user("bob", Role::User, Some("gold"))
        .await
        .is_err());

    let (key, secret) = db
        .create_key(
            &alice.id,
            &NewKey {
                name: "laptop".into(),
                ..Default::default()
            },
        )
        .await
        .expect("key");
    assert!(secret.starts_with("sk-hl-") && secret.len() > 40);
    assert!(secret.starts_with(&key.prefix));
    let caller = db.authenticate(&secret).await.expect("db").expect("valid");
    assert_eq!(caller.user.name, "alice");
    assert_eq!(caller.plan.name, "plus");
    assert_eq!(
        db.authenticate("sk-hl-nope").await.expect("db").err(),
        Some(AuthError::Invalid)
    );

    let (scoped, scoped_secret) = db
        .create_key(
            &alice.id,
            &NewKey {
                name: "ci".into(),
                models: Some(vec!["smollm2-135m".into()]),
                expires_at: Some(hanlin_accounts::now() - 1),
            },
        )
        .await
        .expect("key");
    assert!(scoped.allows("smollm2-135m") && !scoped.allows("qwen2.5-coder-0.5b"));
    assert_eq!(
        db.authenticate(&scoped_secret).await.expect("db").err(),
        Some(AuthError::Expired)
    );

    db.revoke_key(&key.id).await.expect("revoke");
    assert_eq!(
        db.authenticate(&secret).await.expect("db").err(),
        Some(AuthError::Revoked)
    );
    assert!(db.revoke_key("key-missing").await.is_err());
    assert_eq!(db.keys(Some(&alice.id)).await.expect("keys").len(), 2);

    // Usage: idempotent per request id, summed by day and model.
    let ts = hanlin_accounts::now();
    let rec = |id: &str, model: &str, p: i64, c: i64| UsageRecord {
        request_id: id.into(),
        key_id: key.id.clone(),
        user_id: alice.id.clone(),
        model: model.into(),
        ts,
        prompt_tokens: p,
        cached_tokens: 0,
        completion_tokens: c,
    };
    db.record_usage(&rec("r1", "m1", 10, 5))
        .await
        .expect("usage");
    db.record_usage(&rec("r1", "m1", 10, 5))
        .await
        .expect("usage twice");
    db.record_usage(&rec("r2", "m1", 20, 7))
        .await
        .expect("usage");
    db.record_usage(&rec("r3", "m2", 1, 1))
        .await
        .expect("usage");
    let day = hanlin_accounts::day_of(ts);
    assert_eq!(db.tokens_on(&alice.id, &day).await.expect("sum"), 44);
    let rows = db.usage(Some("alice"), Some(&day)).await.expect("usage");
    assert_eq!(rows.len(), 2);
    assert_eq!(
        (
            rows[0].model.as_str(),
            rows[0].requests,
            rows[0].prompt_tokens,
            rows[0].completion_tokens
        ),
        ("m1", 2, 30, 12)
    );

    // Plans are editable.
    let mut gold = db.plan("plus").await.expect("plus");
    gold.name = "gold".into();
    gold.priority = 99;
    db.put_plan(&gold).await.expect("put");
    gold.tokens_per_day = 1;
    db.put_plan(&gold).await.expect("update");
    assert_eq!(db.plan("gold").await.expect("gold").tokens_per_day, 1);
    let admin = db
        .ensure_user("root", Role::Admin, Some("gold"))
        .await
        .expect("admin");
    assert_eq!(admin.role, Role::Admin);
}

#[tokio::test]
async fn sqlite_accounts() {
    let dir = tempfile::tempdir().expect("tmp");
    let url = format!("sqlite://{}", dir.path().join("hanlin.db").display());
    let db = Db::connect(&url).await.expect("connect");
    exercise(&db).await;
    // Reopening keeps everything and does not re-run migrations.
    drop(db);
    let db = Db::connect(&url).await.expect("reconnect");
    assert!(db.user_by_name("alice").await.expect("db").is_some());
}

#[tokio::test]
async fn postgres_accounts() {
    let Ok(url) = std::env::var("HANLIN_TEST_POSTGRES_URL") else {
        assert!(
            std::env::var("HANLIN_REQUIRE_POSTGRES").is_err(),
            "HANLIN_REQUIRE_POSTGRES is set but HANLIN_TEST_POSTGRES_URL is not"
        );
        eprintln!("HANLIN_TEST_POSTGRES_URL is not set: PostgreSQL half not run here");
        return;
    };
    // A fresh schema per run.
    let db = Db::connect(&url).await.expect("connect to PostgreSQL");
    db.reset_for_tests().await.expect("reset");
    let db = Db::connect(&url).await.expect("reconnect");
    exercise(&db).await;
}
