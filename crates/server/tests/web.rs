//! The web app's HTTP side over a real model: embedded assets, cookie
//! sessions and CSRF, a streamed reply stored as it is generated (and kept,
//! incomplete, when the client leaves), regenerate, metering, isolation
//! between users, import/export and bad input. (The page itself is tested
//! in a real browser by e2e/chat.test.mjs.)

use crate::common;

use crate::common::{start, Browser, MODEL};
use futures::StreamExt;
use serde_json::{json, Value};
use std::time::Duration;

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

use reqwest::Method as M;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_app_sessions_conversations_and_streamed_replies() {
    let s = start().await;
    let base = &s.base;

    // The page and its assets are embedded, with a strict CSP.
    let page = reqwest::get(format!("{base}/")).await.expect("page");
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .expect("csp")
        .to_string();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-eval"),
        "{csp}"
    );
    assert!(page.text().await.expect("html").contains("/assets/app.js"));
    let js = reqwest::get(format!("{base}/assets/app.js"))
        .await
        .expect("js");
    assert_eq!(js.status(), 200);
    assert!(js.headers()["content-type"]
        .to_str()
        .expect("ct")
        .contains("javascript"));
    let katex = reqwest::get(format!("{base}/assets/vendor/katex/katex.min.js"))
        .await
        .expect("katex");
    assert_eq!(katex.status(), 200);
    for bad in [
        "/assets/../Cargo.toml",
        "/assets/nope.js",
        "/assets/vendor//x",
    ] {
        let r = reqwest::get(format!("{base}{bad}")).await.expect("asset");
        assert_eq!(r.status(), 404, "{bad}");
    }

    // Registration: a secure, HttpOnly, SameSite=Strict session cookie. The
    // test server already has an admin, so this account is a plain user.
    let (li, resp) = Browser::register(base, "李白", "床前明月光疑是地上霜").await;
    let set = resp.headers()["set-cookie"]
        .to_str()
        .expect("cookie")
        .to_string();
    for attr in ["HttpOnly", "SameSite=Strict", "Secure", "Path=/"] {
        assert!(set.contains(attr), "{attr} missing in {set}");
    }
    let me: Value = resp.json().await.expect("me");
    assert_eq!(me["user"]["role"], "user");

    // Cookie-authenticated writes need the CSRF token.
    let no_csrf = li
        .http
        .post(format!("{base}/api/conversations"))
        .header("cookie", &li.cookie)
        .json(&json!({}))
        .send()
        .await
        .expect("send");
    assert_eq!(no_csrf.status(), 403);
    let (st, conv) = li
        .json(
            M::POST,
            "/api/conversations",
            Some(json!({"params": {"max_tokens": 12, "temperature": 0}})),
        )
        .await;
    assert_eq!(st, 200, "{conv}");
    let cid = conv["id"].as_str().expect("id").to_string();
    assert_eq!(conv["model"], MODEL, "the default model");

    // A streamed reply: user, assistant, deltas, done — and the stored text
    // is what was streamed.
    let events = li
        .send(&cid, json!({"content": "What is the capital of France?"}))
        .await;
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
    assert_eq!(kinds.first(), Some(&"user"));
    assert_eq!(kinds.get(1), Some(&"assistant"));
    assert_eq!(kinds.last(), Some(&"done"));
    assert!(
        kinds.iter().filter(|k| **k == "delta").count() >= 2,
        "{kinds:?}"
    );
    let streamed: String = events
        .iter()
        .filter(|e| e["type"] == "delta")
        .filter_map(|e| e["text"].as_str())
        .collect();
    let user_id = events[0]["message"]["id"]
        .as_str()
        .expect("user id")
        .to_string();
    let reply_id = events[1]["message"]["id"]
        .as_str()
        .expect("reply id")
        .to_string();
    let (_, full) = li
        .json(M::GET, &format!("/api/conversations/{cid}"), None)
        .await;
    let msgs = full["messages"].as_array().expect("messages");
    assert_eq!(msgs.len(), 2);
    assert_eq!(msgs[1]["content"].as_str(), Some(streamed.as_str()));
    assert_eq!(msgs[1]["status"], "done");
    assert_eq!(
        full["conversation"]["title"],
        "What is the capital of France?"
    );
    assert_eq!(full["conversation"]["current_leaf"], reply_id.as_str());

    // Regenerate: a second answer to the same question, a sibling.
    let again = li.send(&cid, json!({"parent_id": user_id})).await;
    assert_eq!(again[0]["message"], Value::Null, "no new user message");
    assert_eq!(again[1]["message"]["parent_id"], user_id.as_str());
    assert_eq!(again.last().expect("event")["type"], "done");
    // Regenerating from an assistant message is refused.
    let (st, e) = li
        .json(
            M::POST,
            &format!("/api/conversations/{cid}/messages"),
            Some(json!({"parent_id": reply_id})),
        )
        .await;
    assert_eq!(st, 400, "{e}");

    // Web usage is metered for the user, like API usage.
    let rows = s.state.db.usage(Some("李白"), None).await.expect("usage");
    assert_eq!(rows.iter().map(|r| r.requests).sum::<i64>(), 2);
    assert!(rows
        .iter()
        .all(|r| r.completion_tokens > 0 && r.prompt_tokens > 0));
    // The regenerated reply's prompt was in the KV cache already.
    assert!(
        rows.iter().map(|r| r.cached_tokens).sum::<i64>() > 0,
        "{rows:?}"
    );
    let (_, usage) = li.json(M::GET, "/api/usage", None).await;
    // Today's tokens are those metered today (a run can cross midnight, so
    // "today" is the server's, and the rows are the same response's).
    let today = usage["today"].as_str().expect("today");
    let metered_today: i64 = usage["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter(|r| r["day"] == today)
        .map(|r| {
            r["prompt_tokens"].as_i64().unwrap_or(0) + r["completion_tokens"].as_i64().unwrap_or(0)
        })
        .sum();
    assert_eq!(
        usage["tokens_today"].as_i64(),
        Some(metered_today),
        "{usage}"
    );
    assert!(
        rows.iter().any(|r| r.day != today) || metered_today > 0,
        "{usage}"
    );

    // A client that leaves mid-reply: the reply keeps what was generated,
    // marked incomplete.
    li.json(
        M::PATCH,
        &format!("/api/conversations/{cid}"),
        Some(json!({"params": {"max_tokens": 2000, "temperature": 0.8}})),
    )
    .await;
    let r = li
        .req(M::POST, &format!("/api/conversations/{cid}/messages"))
        .json(&json!({"content": "Write a very long story about a dragon.", "parent_id": reply_id}))
        .send()
        .await
        .expect("send");
    let mut stream = r.bytes_stream();
    let mut seen = String::new();
    while seen.matches("\"delta\"").count() < 5 {
        let chunk = stream.next().await.expect("more").expect("bytes");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    drop(stream);
    let mut stored = Value::Null;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (_, full) = li
            .json(M::GET, &format!("/api/conversations/{cid}"), None)
            .await;
        stored = full["messages"]
            .as_array()
            .expect("messages")
            .last()
            .cloned()
            .unwrap_or_default();
        if stored["status"] != "streaming" {
            break;
        }
    }
    assert_eq!(stored["status"], "incomplete", "{stored}");
    assert!(!stored["content"].as_str().unwrap_or("").is_empty());

    // Search, export.
    let (_, hits) = li.json(M::GET, "/api/search?q=capital%20of", None).await;
    assert_eq!(hits["data"][0]["conversation_id"], cid.as_str());
    let md = li
        .req(
            M::GET,
            &format!("/api/conversations/{cid}/export?format=markdown"),
        )
        .send()
        .await
        .expect("export");
    assert!(md.headers()["content-disposition"]
        .to_str()
        .expect("cd")
        .contains(".md"));
    let md = md.text().await.expect("md");
    assert!(
        md.contains("## User\n\nWrite a very long story about a dragon."),
        "{md}"
    );
    assert!(md.contains("## Assistant (incomplete)"), "{md}");
    let (st, _) = li
        .json(
            M::GET,
            &format!("/api/conversations/{cid}/export?format=pdf"),
            None,
        )
        .await;
    assert_eq!(st, 400);

    // Bad input: a huge message, malformed JSON, unknown fields, an empty message.
    let huge = "x".repeat(100_001);
    let (st, e) = li
        .json(
            M::POST,
            &format!("/api/conversations/{cid}/messages"),
            Some(json!({"content": huge})),
        )
        .await;
    assert_eq!((st, code(&e)), (400, "string_above_max_length"), "{e}");
    let r = li
        .req(M::POST, "/api/conversations")
        .header("content-type", "application/json")
        .body("{nope")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 400);
    let (st, _) = li
        .json(
            M::POST,
            "/api/conversations",
            Some(json!({"colour": "red"})),
        )
        .await;
    assert_eq!(st, 400);
    let (st, _) = li
        .json(
            M::POST,
            &format!("/api/conversations/{cid}/messages"),
            Some(json!({"content": "  "})),
        )
        .await;
    assert_eq!(st, 400);

    // Another user sees nothing of it and can change nothing.
    let (du, _) = Browser::register(base, "杜甫", "国破山河在城春草木深").await;
    for (m, path, body) in [
        (M::GET, format!("/api/conversations/{cid}"), None),
        (
            M::PATCH,
            format!("/api/conversations/{cid}"),
            Some(json!({"title": "mine"})),
        ),
        (M::DELETE, format!("/api/conversations/{cid}"), None),
        (M::GET, format!("/api/conversations/{cid}/export"), None),
        (
            M::POST,
            format!("/api/conversations/{cid}/messages"),
            Some(json!({"content": "hi"})),
        ),
    ] {
        let (st, e) = du.json(m.clone(), &path, body).await;
        assert_eq!(st, 404, "{m} {path}: {e}");
    }
    let (_, list) = du.json(M::GET, "/api/conversations", None).await;
    assert_eq!(list["data"], json!([]));
    let (_, hits) = du.json(M::GET, "/api/search?q=capital", None).await;
    assert_eq!(hits["data"], json!([]));
    // …nor the admin API.
    let (st, _) = du.json(M::GET, "/v1/admin/users", None).await;
    assert_eq!(st, 403);
    let (_, list) = li.json(M::GET, "/api/conversations", None).await;
    assert_eq!(list["data"][0]["title"], "What is the capital of France?");

    // Import: malformed files are refused whole.
    let (st, e) = du
        .json(M::POST, "/api/import", Some(json!({"not": "a list"})))
        .await;
    assert_eq!((st, code(&e)), (400, "invalid_import"), "{e}");
    let half = json!([
        {"title": "ok", "mapping": {"a": {"message": {"author": {"role": "user"}, "content": {"parts": ["hi"]}}, "parent": null, "children": []}}},
        {"title": "bad", "mapping": {"a": {"message": {"author": {"role": "user"}, "content": {"parts": ["hi"]}}, "parent": null, "children": ["ghost"]}}}
    ]);
    let (st, e) = du.json(M::POST, "/api/import", Some(half)).await;
    assert_eq!(st, 400, "{e}");
    assert!(e["error"]["message"]
        .as_str()
        .unwrap_or("")
        .contains("Nothing was imported"));
    let (_, list) = du.json(M::GET, "/api/conversations", None).await;
    assert_eq!(list["data"], json!([]));
    let export = json!([{
        "title": "从 ChatGPT 来", "create_time": 1_700_000_000.5, "update_time": 1_700_000_100.0,
        "current_node": "a2",
        "mapping": {
            "root": {"message": null, "parent": null, "children": ["s"]},
            "s": {"message": {"author": {"role": "system"}, "content": {"parts": [""]}}, "parent": "root", "children": ["u"]},
            "u": {"message": {"author": {"role": "user"}, "content": {"parts": ["你好"]}}, "parent": "s", "children": ["a1", "a2"]},
            "a1": {"message": {"author": {"role": "assistant"}, "content": {"parts": ["第一版"]}, "metadata": {"model_slug": "gpt-4o"}}, "parent": "u", "children": []},
            "a2": {"message": {"author": {"role": "assistant"}, "content": {"parts": ["第二版"]}}, "parent": "u", "children": []}
        }
    }]);
    let (st, r) = du.json(M::POST, "/api/import", Some(export)).await;
    assert_eq!((st, r["imported"].as_i64()), (200, Some(1)), "{r}");
    let (_, list) = du.json(M::GET, "/api/conversations", None).await;
    let imported = list["data"][0]["id"].as_str().expect("id").to_string();
    let (_, full) = du
        .json(M::GET, &format!("/api/conversations/{imported}"), None)
        .await;
    let msgs = full["messages"].as_array().expect("messages");
    assert_eq!(
        msgs.len(),
        3,
        "root and empty system stubs are dropped: {msgs:?}"
    );
    assert_eq!(msgs[0]["parent_id"], Value::Null);
    assert_eq!(msgs[1]["parent_id"], msgs[0]["id"]);
    assert_eq!(msgs[2]["parent_id"], msgs[0]["id"]);
    let leaf = full["conversation"]["current_leaf"].as_str().expect("leaf");
    assert_eq!(
        msgs.iter().find(|m| m["id"] == leaf).expect("leaf")["content"],
        "第二版"
    );

    // An expired session is a 401 that says so; signing out ends it.
    let user = s
        .state
        .db
        .user_by_name("杜甫")
        .await
        .expect("db")
        .expect("user");
    s.state
        .db
        .expire_sessions_for_tests(&user.id)
        .await
        .expect("expire");
    let (st, e) = du.json(M::GET, "/api/conversations", None).await;
    assert_eq!((st, code(&e)), (401, "session_expired"));
    let (st, _) = li.json(M::POST, "/api/logout", None).await;
    assert_eq!(st, 200);
    let (st, _) = li.json(M::GET, "/api/me", None).await;
    assert_eq!(st, 401);
    // Wrong passwords are refused; the right one opens a new session.
    let r = reqwest::Client::new()
        .post(format!("{base}/api/login"))
        .json(&json!({"name": "李白", "password": "wrong password"}))
        .send()
        .await
        .expect("login");
    assert_eq!(r.status(), 401);
    let r = reqwest::Client::new()
        .post(format!("{base}/api/login"))
        .json(&json!({"name": "李白", "password": "床前明月光疑是地上霜"}))
        .send()
        .await
        .expect("login");
    assert_eq!(r.status(), 200);
}

/// Search mode: an admin creates a knowledge base and uploads a file from
/// the page; a conversation set to search it answers with checked citations
/// and keeps the cited sources with the reply; a question the documents do
/// not cover is declined without the model; users cannot upload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_mode_answers_from_uploaded_files_with_sources() {
    let s = start().await;
    s.state
        .db
        .set_password("root", "correct horse 1")
        .await
        .expect("password");
    let (admin, _) = Browser::sign_in(&s.base, "/api/login", "root", "correct horse 1").await;
    let (reader, _) = Browser::register(&s.base, "reader", "correct horse 2").await;

    let (st, v) = admin.json(M::PUT, "/v1/kb/handbook", None).await;
    assert_eq!(st, 200, "{v}");
    let file = "# 员工手册\n\n年假规定：入职满一年的员工每年享有十五天带薪年假。\n\n报销规定：差旅费用须在出差结束后三十天内提交报销单。\n";
    let upload = |who: &Browser, name: &str, body: &'static [u8]| {
        who.req(M::POST, &format!("/v1/kb/handbook/files?filename={name}"))
            .body(body)
            .send()
    };
    let r = upload(&reader, "x.md", b"text").await.expect("send");
    assert_eq!(r.status(), 403, "users do not write knowledge bases");
    let r = upload(&admin, "no-extension", b"text").await.expect("send");
    assert_eq!(r.status(), 400);
    let r = upload(&admin, "broken.docx", b"not a zip")
        .await
        .expect("send");
    assert_eq!(r.status(), 400);
    let r = admin
        .req(M::POST, "/v1/kb/handbook/files?filename=手册.md")
        .body(file)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["added"], 1, "{v}");
    let r = admin
        .req(M::POST, "/v1/kb/handbook/files?filename=copy.md")
        .body(file)
        .send()
        .await
        .expect("send");
    let v: Value = r.json().await.expect("json");
    assert_eq!((&v["added"], &v["duplicates"]), (&json!(0), &json!(1)));

    // Any signed-in user sees the knowledge bases and can search them.
    let (st, v) = reader.json(M::GET, "/api/kb", None).await;
    assert_eq!(st, 200);
    assert_eq!(v["data"][0]["name"], "handbook");
    assert_eq!(v["data"][0]["documents"], 1);
    let (_, conv) = reader
        .json(
            M::POST,
            "/api/conversations",
            Some(
                json!({"model": common::QWEN, "params": {"temperature": 0.7, "kb": ["handbook"]}}),
            ),
        )
        .await;
    let cid = conv["id"].as_str().expect("id").to_string();
    let events = reader
        .send(&cid, json!({"content": "员工每年有几天带薪年假？"}))
        .await;
    let done = events.last().expect("events");
    assert_eq!(done["type"], "done", "{events:?}");
    let answer = done["content"].as_str().expect("content");
    assert!(
        answer.contains("十五") && answer.contains("[1]"),
        "{answer}"
    );
    let sources = done["sources"].as_array().expect("sources");
    assert_eq!(sources.len(), 1, "{sources:?}");
    assert!(sources[0]["text"].as_str().unwrap_or("").contains("十五天"));
    assert_eq!(sources[0]["title"], "员工手册", "the Markdown heading");
    assert_eq!(sources[0]["source"], "upload:手册.md");
    // Stored with the reply: a reload shows the same answer and sources.
    let (_, full) = reader
        .json(M::GET, &format!("/api/conversations/{cid}"), None)
        .await;
    let reply = full["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .find(|m| m["role"] == "assistant")
        .cloned()
        .expect("reply");
    assert_eq!(reply["content"], json!(answer));
    assert_eq!(reply["sources"], json!(sources));

    // Nothing in the handbook about it: declined, no sources, no model call.
    let events = reader
        .send(
            &cid,
            json!({"content": "埃菲尔铁塔有多高？", "parent_id": reply["id"]}),
        )
        .await;
    let done = events.last().expect("events");
    assert_eq!(done["sources"], json!([]), "{events:?}");
    let text = done["content"].as_str().expect("content");
    assert!(
        text.contains("不知道") || text.contains("没有找到"),
        "{text}"
    );
    assert!(!events.iter().any(|e| e["type"] == "delta"), "{events:?}");

    // A knowledge base that is gone: a clear error, nothing stored.
    let (_, conv) = reader
        .json(
            M::POST,
            "/api/conversations",
            Some(json!({"model": common::QWEN, "params": {"kb": ["ghost"]}})),
        )
        .await;
    let (st, v) = reader
        .json(
            M::POST,
            &format!(
                "/api/conversations/{}/messages",
                conv["id"].as_str().expect("id")
            ),
            Some(json!({"content": "hi"})),
        )
        .await;
    assert_eq!((st, code(&v)), (404, "kb_not_found"), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_with_tools_on_shows_and_keeps_its_steps() {
    let s = start().await;
    let (u, _) = Browser::register(&s.base, "祖冲之", "圆周率三点一四一五九二六").await;
    let (_, tools) = u.json(M::GET, "/api/tools", None).await;
    let names: Vec<&str> = tools["data"]
        .as_array()
        .expect("tools")
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert!(
        names.contains(&"calculator") && names.contains(&"datetime"),
        "{tools}"
    );
    let (st, conv) = u
        .json(
            M::POST,
            "/api/conversations",
            Some(json!({"params": {"max_tokens": 64, "temperature": 0, "tools": ["calculator", "datetime"]}})),
        )
        .await;
    assert_eq!(st, 200, "{conv}");
    let cid = conv["id"].as_str().expect("id").to_string();
    let events = u
        .send(&cid, json!({"content": "123456 乘以 654321 等于多少？"}))
        .await;
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
    // The step is shown as it runs: its call, then its result, then the answer.
    let call = kinds
        .iter()
        .position(|k| *k == "tool_call")
        .expect("a call");
    let result = kinds
        .iter()
        .position(|k| *k == "tool_result")
        .expect("a result");
    assert!(call < result, "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"done"), "{kinds:?}");
    let done = events.last().expect("done");
    let step = &done["tools"][0];
    assert_eq!(step["name"], "calculator");
    assert!(
        step["content"]
            .as_str()
            .unwrap_or("")
            .contains("80779853376"),
        "{done}"
    );
    // Kept with the reply.
    let (_, full) = u
        .json(M::GET, &format!("/api/conversations/{cid}"), None)
        .await;
    let reply = &full["messages"][1];
    assert_eq!(reply["status"], "done");
    assert_eq!(reply["tools"], done["tools"]);
    assert_eq!(reply["content"], done["content"]);
    // A tool the server does not have is refused, and so are bad sampling
    // settings with tools on; nothing is stored.
    for (params, content) in [
        (json!({"tools": ["rm_rf"]}), "hi"),
        (
            json!({"tools": ["calculator"], "temperature": "hot"}),
            "1+1?",
        ),
    ] {
        let (_, _) = u
            .json(
                M::PATCH,
                &format!("/api/conversations/{cid}"),
                Some(json!({ "params": params })),
            )
            .await;
        let r = u
            .req(M::POST, &format!("/api/conversations/{cid}/messages"))
            .json(&json!({ "content": content }))
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 400, "{params}");
        let (_, full) = u
            .json(M::GET, &format!("/api/conversations/{cid}"), None)
            .await;
        assert_eq!(
            full["messages"].as_array().map(Vec::len),
            Some(2),
            "{params}"
        );
    }
}
