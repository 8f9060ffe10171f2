//! Two `hanlin serve` replicas on one PostgreSQL database
//! (`HANLIN_TEST_POSTGRES_URL`; `.ci/run` starts one and requires it):
//! quotas exact across both, and a replica killed mid-stream leaves the
//! other's streams running and its own token holds released after its
//! lease.

mod common;

use hanlin_accounts::{Db, NewKey, Plan, Role};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MODEL: &str = "smollm2-135m";
const LEASE_SECS: u64 = 6;

struct Replica {
    child: Child,
    addr: String,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(db: &str, id: &str, home: &std::path::Path) -> Replica {
    let mut child = Command::new(env!("CARGO_BIN_EXE_hanlin"))
        .args([
            "serve",
            "--port",
            "0",
            "--model",
            MODEL,
            "--threads",
            "1",
            "--database-url",
            db,
            "--replica-id",
            id,
            "--replica-lease-secs",
            &LEASE_SECS.to_string(),
        ])
        .env("HANLIN_KB_DIR", home.join(format!("kb-{id}")))
        .env("HANLIN_FILES_DIR", home.join("files"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("serve");
    let stdout = child.stdout.take().expect("stdout");
    let addr = common::serving_address(stdout);
    Replica { child, addr }
}

fn post(addr: &str, key: &str, body: &Value) -> (u16, Value) {
    let r = ureq::post(&format!("http://{addr}/v1/completions"))
        .set("Authorization", &format!("Bearer {key}"))
        .set("Content-Type", "application/json")
        .timeout(Duration::from_secs(120))
        .send_string(&body.to_string());
    let json = |r: ureq::Response| serde_json::from_reader(r.into_reader()).unwrap_or(Value::Null);
    match r {
        Ok(r) => (r.status(), json(r)),
        Err(ureq::Error::Status(code, r)) => (code, json(r)),
        Err(e) => panic!("{addr}: {e}"),
    }
}

/// Usage rows of `user`: (requests, prompt + completion tokens).
async fn usage_of(db: &Db, user: &str) -> (i64, i64) {
    let rows = db.usage(Some(user), None).await.expect("usage");
    (
        rows.iter().map(|r| r.requests).sum(),
        rows.iter()
            .map(|r| r.prompt_tokens + r.completion_tokens)
            .sum(),
    )
}

fn plan(name: &str, tokens_per_day: i64) -> Plan {
    Plan::limited(name, 10_000, 10_000_000, tokens_per_day)
}

#[test]
fn two_replicas_share_quotas_and_a_dead_replica_is_released() {
    let Ok(base_url) = std::env::var("HANLIN_TEST_POSTGRES_URL") else {
        assert!(
            std::env::var("HANLIN_REQUIRE_POSTGRES").is_err(),
            "HANLIN_REQUIRE_POSTGRES is set but HANLIN_TEST_POSTGRES_URL is not"
        );
        eprintln!("HANLIN_TEST_POSTGRES_URL is not set: replicas not tested here");
        return;
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let url = rt
        .block_on(Db::create_test_database(&base_url))
        .expect("a test database");
    let db = rt.block_on(Db::connect(&url)).expect("db");
    let tmp = tempfile::tempdir().expect("tmp");
    let a = start(&url, "a", tmp.path());
    let b = start(&url, "b", tmp.path());

    // A prompt of known length: the first answer says how many tokens.
    let key = rt.block_on(async {
        db.put_plan(&plan("small", 1_000_000)).await.expect("plan");
        let u = db
            .ensure_user("many", Role::User, Some("small"))
            .await
            .expect("user");
        db.create_key(&u.id, &NewKey::default())
            .await
            .expect("key")
            .1
    });
    let body = json!({"model": MODEL, "prompt": "Count from 1 to 100: 1, 2, 3,", "max_tokens": 16, "temperature": 0});
    let (st, r) = post(&a.addr, &key, &body);
    assert_eq!(st, 200, "{r}");
    let per_request = r["usage"]["prompt_tokens"].as_i64().expect("usage") + 16;
    std::thread::sleep(Duration::from_millis(500));
    let (_, used0) = rt.block_on(usage_of(&db, "many"));
    assert_eq!(used0, r["usage"]["total_tokens"].as_i64().expect("usage"));
    // Room for 10 more worst cases; two replicas with limits of their own
    // would admit up to twice that.
    let quota = used0 + 10 * per_request;
    rt.block_on(db.put_plan(&plan("small", quota)))
        .expect("plan");

    // 64 clients at once, half on each replica.
    let results: Vec<(u16, Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..64)
            .map(|i| {
                let (addr, key, body) = (if i % 2 == 0 { &a.addr } else { &b.addr }, &key, &body);
                s.spawn(move || post(addr, key, body))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client"))
            .collect()
    });
    let ok: Vec<&Value> = results
        .iter()
        .filter(|(st, _)| *st == 200)
        .map(|(_, v)| v)
        .collect();
    for (st, v) in &results {
        assert!(*st == 200 || *st == 429, "no 5xx, nothing else: {st} {v}");
    }
    assert!(
        ok.len() >= 10,
        "the quota's worth was admitted: {}",
        ok.len()
    );
    let answered: i64 = ok
        .iter()
        .map(|v| v["usage"]["total_tokens"].as_i64().expect("usage"))
        .sum();
    // Usage rows are written when a request ends: give the last ones a moment.
    std::thread::sleep(Duration::from_millis(500));
    let (requests, used) = rt.block_on(usage_of(&db, "many"));
    assert_eq!(requests, 1 + ok.len() as i64, "one usage row per answer");
    assert_eq!(
        used,
        used0 + answered,
        "usage rows are what the engines counted"
    );
    assert!(
        used <= quota,
        "over-admission across replicas: {used} tokens used of a quota of {quota}"
    );

    // A document added on replica a is found by a search on replica b
    // within 5 s (each keeps its own index, caught up from the database).
    let admin = rt.block_on(async {
        let u = db
            .ensure_user("boss", Role::Admin, None)
            .await
            .expect("admin");
        db.create_key(&u.id, &NewKey::default())
            .await
            .expect("key")
            .1
    });
    let send = |method: &str, addr: &str, path: &str, body: &Value| {
        let r = ureq::request(method, &format!("http://{addr}{path}"))
            .set("Authorization", &format!("Bearer {admin}"))
            .set("Content-Type", "application/json")
            .timeout(Duration::from_secs(60))
            .send_string(&body.to_string());
        let json =
            |r: ureq::Response| serde_json::from_reader(r.into_reader()).unwrap_or(Value::Null);
        match r {
            Ok(r) => (r.status(), json(r)),
            Err(ureq::Error::Status(code, r)) => (code, json(r)),
            Err(e) => panic!("{e}"),
        }
    };
    // A search on b finds `needle` within 5 s.
    let found_within_5s = |kb: &str, query: &str, needle: &str| {
        let since = Instant::now();
        loop {
            let (st, r) = send(
                "POST",
                &b.addr,
                "/v1/search",
                &json!({"kb": kb, "query": query}),
            );
            if st == 200 && r["data"].as_array().is_some_and(|d| !d.is_empty()) {
                assert!(
                    r["data"][0]["text"].as_str().unwrap_or("").contains(needle),
                    "{r}"
                );
                return;
            }
            assert!(
                since.elapsed() < Duration::from_secs(5),
                "{kb}: not searchable on b 5 s after it was added: {st} {r}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let (st, r) = send("PUT", &a.addr, "/v1/kb/news", &json!({"embedder": null}));
    assert_eq!(st, 200, "{r}");
    let (st, r) = send(
        "POST",
        &a.addr,
        "/v1/kb/news/documents",
        &json!({"documents": [{"title": "杭州亚运会", "text": "第十九届亚运会于2023年9月23日在杭州开幕，共有45个国家和地区参赛。"}]}),
    );
    assert_eq!((st, &r["added"]), (200, &json!(1)), "{r}");
    found_within_5s("news", "亚运会在哪里开幕", "杭州");

    // `hanlin kb add --database-url` sends its documents to the replicas too.
    let cli_kbs = tmp.path().join("kb-cli");
    let notes = tmp.path().join("notes.md");
    std::fs::write(
        &notes,
        "# 值班表\n\n十二月的数据库值班由王工负责，电话分机 8812。\n",
    )
    .expect("write");
    for args in [
        vec!["kb", "create", "duty", "--no-dense"],
        vec![
            "kb",
            "add",
            "duty",
            notes.to_str().expect("path"),
            "--database-url",
            &url,
        ],
    ] {
        let o = Command::new(env!("CARGO_BIN_EXE_hanlin"))
            .args(&args)
            .env("HANLIN_KB_DIR", &cli_kbs)
            .output()
            .expect("hanlin kb");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    found_within_5s("duty", "数据库值班", "8812");

    // Kill replica b mid-stream; a's stream goes on.
    let skey = rt.block_on(async {
        let u = db
            .ensure_user("streams", Role::User, Some("small"))
            .await
            .expect("user");
        db.create_key(&u.id, &NewKey::default())
            .await
            .expect("key")
            .1
    });
    rt.block_on(db.put_plan(&plan("small", 1_000_000)))
        .expect("plan");
    let long = json!({"model": MODEL, "prompt": "Count from 1 to 1000: 1, 2, 3,", "max_tokens": 48, "temperature": 0, "stream": true});
    let open_stream = |addr: &str| {
        let r = ureq::post(&format!("http://{addr}/v1/completions"))
            .set("Authorization", &format!("Bearer {skey}"))
            .set("Content-Type", "application/json")
            .timeout(Duration::from_secs(120))
            .send_string(&long.to_string())
            .expect("stream");
        let mut reader = BufReader::new(r.into_reader());
        let mut first = String::new();
        // The first data line: the stream is under way.
        while !first.starts_with("data:") {
            first.clear();
            reader.read_line(&mut first).expect("read");
        }
        reader
    };
    let mut on_a = open_stream(&a.addr);
    let on_b = open_stream(&b.addr);
    let mut b = b;
    b.child.kill().expect("kill b");
    let killed_at = Instant::now();
    let _ = b.child.wait();
    drop(on_b);
    let mut rest = String::new();
    on_a.read_to_string(&mut rest)
        .expect("a's stream reads to its end");
    assert!(rest.contains("data: [DONE]"), "a's stream finished: {rest}");
    assert!(
        rest.matches("data: {").count() > 1,
        "a's stream went on after b died: {rest}"
    );

    // b held prompt + 48 tokens; its usage row has what it counted before
    // it died. Ask a for exactly what is left once b's hold is gone: refused
    // while the hold counts (b's last heartbeat was at most a sixth of the
    // lease before it died), admitted after the lease.
    let (st, r) = post(
        &a.addr,
        &skey,
        &json!({"model": MODEL, "prompt": "Say yes.", "max_tokens": 1}),
    );
    assert_eq!(st, 200, "{r}");
    let prompt_tokens = r["usage"]["prompt_tokens"].as_i64().expect("usage");
    std::thread::sleep(Duration::from_millis(300));
    let (_, spent) = rt.block_on(usage_of(&db, "streams"));
    let left = 40;
    rt.block_on(db.put_plan(&plan("small", spent + left)))
        .expect("plan");
    let exact = json!({"model": MODEL, "prompt": "Say yes.", "max_tokens": left - prompt_tokens, "temperature": 0});
    let (st, r) = post(&a.addr, &skey, &exact);
    let window = Duration::from_secs(LEASE_SECS) * 4 / 5;
    assert!(
        killed_at.elapsed() < window,
        "this machine took {:?} to get here; the lease window to observe is {window:?}",
        killed_at.elapsed()
    );
    assert_eq!(st, 429, "b's hold still counts within its lease: {r}");
    let deadline = Instant::now() + Duration::from_secs(LEASE_SECS * 3);
    loop {
        let (st, r) = post(&a.addr, &skey, &exact);
        if st == 200 {
            break;
        }
        assert_eq!(st, 429, "{r}");
        assert!(
            Instant::now() < deadline,
            "b's hold was not released after its lease: {r}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let (st, r) = post(&a.addr, &skey, &exact);
    assert_eq!(st, 429, "and not one token more: {r}");

    // A graceful stop (SIGTERM, as systemd, Docker and Kubernetes send):
    // the stream in progress finishes, the process exits cleanly, and the
    // replica's row goes at once instead of after its lease.
    rt.block_on(db.put_plan(&plan("small", 1_000_000)))
        .expect("plan");
    let mut on_a = open_stream(&a.addr);
    let mut a = a;
    let term = Command::new("kill")
        .args(["-TERM", &a.child.id().to_string()])
        .status()
        .expect("kill -TERM");
    assert!(term.success());
    let mut rest = String::new();
    on_a.read_to_string(&mut rest)
        .expect("the stream reads to its end");
    assert!(rest.contains("data: [DONE]"), "the stream finished: {rest}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = a.child.try_wait().expect("wait") {
            break st;
        }
        assert!(Instant::now() < deadline, "the replica did not stop");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status}");
    let live = rt.block_on(db.live_replicas(60_000)).expect("replicas");
    assert!(live.iter().all(|r| r.id != "a"), "{live:?}");
}
