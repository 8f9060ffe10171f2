//! The accounts database on SQLite (always) and on PostgreSQL (when
//! `HANLIN_TEST_POSTGRES_URL` names a server; `.ci/run` starts one and sets
//! it, and requires it so that this half is never silently skipped there).

use hanlin_accounts::chats::{
    ConversationPatch, ImportConversation, Message, MessageRole as R, MessageStatus as S,
    PersonaStyle,
};
use hanlin_accounts::web::SignInError;
use hanlin_accounts::{AuthError, Db, NewKey, Role, Usage, UsageRecord, UserStatus, FULL_PRICE};
use serde_json::json;

fn msg(id: &str, parent: Option<&str>, role: R, content: &str) -> Message {
    Message {
        id: id.into(),
        parent_id: parent.map(String::from),
        role,
        content: content.into(),
        status: S::Done,
        model: None,
        created_at: 0,
        sources: None,
        tools: None,
    }
}

/// Browser accounts and conversations, on a database with no admin yet.
async fn exercise_web(db: &Db) {
    // The first admin is made once: a second "first admin" is refused.
    assert!(!db.has_admin().await.expect("db"));
    let li = db
        .register_first_admin("李白", "床前明月光疑是地上霜")
        .await
        .expect("db")
        .expect("registered");
    assert_eq!(li.role, Role::Admin);
    assert!(db.has_admin().await.expect("db"));
    assert_eq!(
        db.register_first_admin("王勃", "落霞与孤鹜齐飞秋水共长天一色")
            .await
            .expect("db")
            .err(),
        Some(SignInError::AdminExists)
    );
    let du = db
        .register(
            "杜甫",
            "国破山河在城春草木深",
            Role::User,
            UserStatus::Active,
        )
        .await
        .expect("db")
        .expect("registered");
    assert_eq!(du.role, Role::User);
    assert_eq!(
        db.register("杜甫", "another password", Role::User, UserStatus::Active)
            .await
            .expect("db")
            .err(),
        Some(SignInError::NameTaken("杜甫".into()))
    );
    assert!(matches!(
        db.register("王维", "short", Role::User, UserStatus::Active)
            .await
            .expect("db"),
        Err(SignInError::Invalid(_))
    ));
    // A pending account has the right password but may not sign in until
    // approved; a disabled one no longer; a deleted one is gone, its name
    // free again.
    db.register(
        "孟浩然",
        "春眠不觉晓处处闻啼鸟",
        Role::User,
        UserStatus::Pending,
    )
    .await
    .expect("db")
    .expect("registered");
    assert_eq!(
        db.check_login("孟浩然", "春眠不觉晓处处闻啼鸟")
            .await
            .expect("db")
            .err(),
        Some(SignInError::Pending)
    );
    db.set_user_status("孟浩然", UserStatus::Active)
        .await
        .expect("approve");
    let meng = db
        .check_login("孟浩然", "春眠不觉晓处处闻啼鸟")
        .await
        .expect("db")
        .expect("approved");
    let (meng_secret, _) = db.create_session(&meng.id).await.expect("session");
    let (_, meng_key) = db
        .create_key(&meng.id, &NewKey::default())
        .await
        .expect("key");
    db.set_user_status("孟浩然", UserStatus::Disabled)
        .await
        .expect("disable");
    assert!(db.session(&meng_secret).await.expect("db").is_none());
    assert_eq!(
        db.authenticate(&meng_key).await.expect("db").err(),
        Some(AuthError::Revoked)
    );
    assert_eq!(
        db.check_login("孟浩然", "春眠不觉晓处处闻啼鸟")
            .await
            .expect("db")
            .err(),
        Some(SignInError::Disabled)
    );
    let gone = db.delete_user("孟浩然").await.expect("delete");
    assert_eq!(gone.status, UserStatus::Deleted);
    assert!(db.user_by_name("孟浩然").await.expect("db").is_none());
    assert!(db
        .users()
        .await
        .expect("db")
        .iter()
        .all(|u| u.id != gone.id));
    assert_eq!(
        db.check_login("李白", "wrong password")
            .await
            .expect("db")
            .err(),
        Some(SignInError::WrongPassword)
    );
    assert_eq!(
        db.check_login("nobody", "whatever!!")
            .await
            .expect("db")
            .err(),
        Some(SignInError::WrongPassword)
    );
    let me = db
        .check_login("李白", "床前明月光疑是地上霜")
        .await
        .expect("db")
        .expect("signed in");
    assert_eq!(me.id, li.id);

    // Sessions: the secret finds the user; expired or ended ones do not.
    let (secret, csrf) = db.create_session(&li.id).await.expect("session");
    let s = db.session(&secret).await.expect("db").expect("live");
    assert_eq!(
        (s.user.id.as_str(), s.csrf.as_str()),
        (li.id.as_str(), csrf.as_str())
    );
    assert!(db.session("not-a-session").await.expect("db").is_none());
    db.expire_sessions_for_tests(&li.id).await.expect("expire");
    assert!(db.session(&secret).await.expect("db").is_none());
    let (secret, _) = db.create_session(&li.id).await.expect("session");
    db.end_session(&secret).await.expect("end");
    assert!(db.session(&secret).await.expect("db").is_none());

    // A conversation tree: two answers to one question (regenerate), two
    // versions of the question (edit).
    let c = db
        .create_conversation(&li.id, "New chat", "", "qwen", &json!({"temperature": 0.2}))
        .await
        .expect("conversation");
    let q1 = db
        .add_message(&li.id, &c.id, None, R::User, "长城有多长？", S::Done, None)
        .await
        .expect("message");
    let a1 = db
        .add_message(
            &li.id,
            &c.id,
            Some(&q1.id),
            R::Assistant,
            "两万多公里。",
            S::Done,
            Some("qwen"),
        )
        .await
        .expect("message");
    let a2 = db
        .add_message(
            &li.id,
            &c.id,
            Some(&q1.id),
            R::Assistant,
            "",
            S::Streaming,
            Some("qwen"),
        )
        .await
        .expect("message");
    db.update_message(&c.id, &a2.id, "约两万一千公里", S::Streaming)
        .await
        .expect("update");
    // An answer from a knowledge base keeps the sources it cites.
    let cited = json!([{"index": 1, "title": "长城", "text": "长城全长约两万一千公里。"}]);
    db.set_message_sources(&c.id, &a2.id, &cited)
        .await
        .expect("sources");
    let q2 = db
        .add_message(&li.id, &c.id, None, R::User, "黄河有多长？", S::Done, None)
        .await
        .expect("message");
    let all = db.messages(&li.id, &c.id).await.expect("db").expect("mine");
    assert_eq!(
        all.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(),
        [&q1.id, &a1.id, &a2.id, &q2.id]
    );
    assert_eq!(all[2].content, "约两万一千公里");
    assert_eq!(all[2].sources.as_ref(), Some(&cited));
    assert_eq!(all[1].sources, None);
    assert_eq!(
        db.conversation(&li.id, &c.id)
            .await
            .expect("db")
            .expect("mine")
            .current_leaf,
        Some(q2.id.clone())
    );
    // A parent from elsewhere, an unknown role, an over-long message: refused.
    assert!(db
        .add_message(&li.id, &c.id, Some("msg-nope"), R::User, "x", S::Done, None)
        .await
        .is_err());
    assert!(serde_json::from_value::<Message>(json!({
        "id": "w", "parent_id": null, "role": "wizard", "content": "x",
        "status": "done", "model": null, "created_at": 0
    }))
    .is_err());
    let huge = "长".repeat(hanlin_accounts::chats::MAX_MESSAGE_CHARS + 1);
    assert!(db
        .add_message(&li.id, &c.id, None, R::User, &huge, S::Done, None)
        .await
        .is_err());
    // A server that died mid-reply: the reply is kept, marked incomplete.
    assert!(db.mark_interrupted_replies().await.expect("db") >= 1);
    let all = db.messages(&li.id, &c.id).await.expect("db").expect("mine");
    assert_eq!(all[2].status, S::Incomplete);
    assert_eq!(all[2].content, "约两万一千公里");

    // Switching branches and renaming.
    let patched = db
        .update_conversation(
            &li.id,
            &c.id,
            &ConversationPatch {
                current_leaf: Some(a1.id.clone()),
                title: Some("长城".into()),
                ..Default::default()
            },
        )
        .await
        .expect("db")
        .expect("mine");
    assert_eq!(
        (patched.current_leaf.as_deref(), patched.title.as_str()),
        (Some(a1.id.as_str()), "长城")
    );

    // Search by a Chinese word (no spaces) and by English, case-insensitive;
    // % and _ are literal.
    let hits = db
        .search_conversations(&li.id, "两万", 10)
        .await
        .expect("search");
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0].conversation_id, c.id);
    assert!(hits[0].snippet.contains("两万"));
    assert_eq!(
        db.search_conversations(&li.id, "长城", 10)
            .await
            .expect("search")
            .len(),
        1
    );
    assert!(db
        .search_conversations(&li.id, "%", 10)
        .await
        .expect("search")
        .is_empty());
    assert!(db
        .search_conversations(&li.id, "泰山", 10)
        .await
        .expect("search")
        .is_empty());

    // Isolation: 杜甫 can neither see nor change 李白's conversation.
    assert!(db.conversation(&du.id, &c.id).await.expect("db").is_none());
    assert!(db.messages(&du.id, &c.id).await.expect("db").is_none());
    assert!(db.conversations(&du.id).await.expect("db").is_empty());
    assert!(db
        .search_conversations(&du.id, "长城", 10)
        .await
        .expect("db")
        .is_empty());
    assert!(db
        .update_conversation(
            &du.id,
            &c.id,
            &ConversationPatch {
                title: Some("mine now".into()),
                ..Default::default()
            }
        )
        .await
        .expect("db")
        .is_none());
    assert!(db
        .add_message(&du.id, &c.id, None, R::User, "hi", S::Done, None)
        .await
        .is_err());
    assert!(!db.delete_conversation(&du.id, &c.id).await.expect("db"));
    assert_eq!(
        db.messages(&li.id, &c.id)
            .await
            .expect("db")
            .expect("mine")
            .len(),
        4
    );

    // Import is all or nothing.
    let good = ImportConversation {
        title: "imported".into(),
        created_at: 1,
        updated_at: 2,
        messages: vec![
            msg("x1", None, R::User, "hi"),
            msg("x2", Some("x1"), R::Assistant, "hello"),
        ],
        current_leaf: Some("x2".into()),
    };
    let bad = ImportConversation {
        title: "bad".into(),
        created_at: 1,
        updated_at: 2,
        messages: vec![msg("y2", Some("y1"), R::Assistant, "orphan")],
        current_leaf: None,
    };
    assert!(db
        .import_conversations(&du.id, "qwen", &[good.clone(), bad])
        .await
        .is_err());
    assert!(
        db.conversations(&du.id).await.expect("db").is_empty(),
        "nothing half-imported"
    );
    assert_eq!(
        db.import_conversations(&du.id, "qwen", &[good])
            .await
            .expect("import"),
        1
    );
    let convs = db.conversations(&du.id).await.expect("db");
    assert_eq!(convs.len(), 1);
    let msgs = db
        .messages(&du.id, &convs[0].id)
        .await
        .expect("db")
        .expect("mine");
    assert_eq!(msgs.len(), 2);
    assert_eq!(msgs[1].parent_id.as_deref(), Some(msgs[0].id.as_str()));
    assert_eq!(convs[0].current_leaf.as_deref(), Some(msgs[1].id.as_str()));

    // Personas: presets on first use, editable, per user.
    let ps = db.personas(&li.id).await.expect("personas");
    assert_eq!(ps.len(), hanlin_accounts::chats::DEFAULT_PERSONAS.len());
    let edited = db
        .put_persona(
            &li.id,
            Some(&ps[0].id),
            "写作",
            "写得好",
            PersonaStyle {
                voice: "shimmer",
                look: "robot",
            },
        )
        .await
        .expect("db")
        .expect("mine");
    assert_eq!(edited.name, "写作");
    assert!(db
        .put_persona(
            &li.id,
            None,
            "x",
            "y",
            PersonaStyle {
                voice: "<script>",
                look: "",
            },
        )
        .await
        .is_err());
    assert!(db
        .put_persona(&du.id, Some(&ps[0].id), "x", "y", PersonaStyle::default())
        .await
        .expect("db")
        .is_none());
    assert!(db.delete_persona(&li.id, &ps[1].id).await.expect("db"));
    let ps = db.personas(&li.id).await.expect("personas");
    assert_eq!(ps.len(), hanlin_accounts::chats::DEFAULT_PERSONAS.len() - 1);
    assert_eq!(ps[0].prompt, "写得好");
    assert_eq!(
        (ps[0].voice.as_str(), ps[0].look.as_str()),
        ("shimmer", "robot")
    );
    // The presets come with a voice and a look.
    assert!(!ps[1].voice.is_empty() && !ps[1].look.is_empty());

    // Deleting takes the messages with it.
    assert!(db.delete_conversation(&li.id, &c.id).await.expect("db"));
    assert!(db.messages(&li.id, &c.id).await.expect("db").is_none());
}

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
        endpoint: "chat".into(),
        ts,
        usage: Usage {
            prompt_tokens: p,
            completion_tokens: c,
            ..Default::default()
        },
        weight_milli: FULL_PRICE,
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
    // A request at half price (a batch line) counts half its tokens
    // against the daily quota; its audio is kept with it.
    let mut half = rec("r4", "m3", 60, 40);
    half.weight_milli = 500;
    half.usage.audio_ms = 1500;
    db.record_usage(&half).await.expect("usage");
    assert_eq!(db.tokens_on(&alice.id, &day).await.expect("sum"), 94);
    let m3 = db.usage(Some("alice"), Some(&day)).await.expect("usage");
    let m3 = m3.iter().find(|r| r.model == "m3").expect("m3 row");
    assert_eq!((m3.prompt_tokens, m3.audio_ms), (60, 1500));
    let rows = db.usage(Some("alice"), Some(&day)).await.expect("usage");
    assert_eq!(rows.len(), 3);
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
    exercise_web(&db).await;
    exercise(&db).await;
    // Reopening keeps everything and does not re-run migrations.
    drop(db);
    let db = Db::connect(&url).await.expect("reconnect");
    assert!(db.user_by_name("alice").await.expect("db").is_some());
}

/// Messages added concurrently to one conversation: on SQLite each was a
/// transaction that read first and wrote later, and one whose read came
/// before another's commit failed ("database is locked").
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_messages_are_all_stored() {
    let dir = tempfile::tempdir().expect("tmp");
    let url = format!("sqlite://{}", dir.path().join("hanlin.db").display());
    let db = Db::connect(&url).await.expect("connect");
    let u = db
        .ensure_user("busy", Role::User, None)
        .await
        .expect("user");
    let c = db
        .create_conversation(&u.id, "t", "", "m", &json!({}))
        .await
        .expect("conversation");
    let mut tasks = Vec::new();
    for i in 0..32 {
        let (db, uid, cid) = (db.clone(), u.id.clone(), c.id.clone());
        tasks.push(tokio::spawn(async move {
            db.add_message(
                &uid,
                &cid,
                None,
                R::User,
                &format!("第{i}条"),
                S::Done,
                None,
            )
            .await
        }));
    }
    for t in tasks {
        t.await.expect("task").expect("every message is stored");
    }
    let msgs = db.messages(&u.id, &c.id).await.expect("db").expect("conv");
    assert_eq!(msgs.len(), 32);
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
    exercise_web(&db).await;
    exercise(&db).await;
}
