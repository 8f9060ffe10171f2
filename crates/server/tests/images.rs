//! `/v1/images/generations` on the tiny diffusers pipeline the image
//! crate's parity tests use: answers in both forms, seeds that reproduce,
//! owner-only stored images, metering per image, and OpenAI-shaped errors
//! for bad requests.

use crate::common;

use crate::common::{call, start_with};
use base64::Engine;
use reqwest::Method;
use serde_json::{json, Value};

fn tiny() -> String {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../image/tests/data/tiny-sd")
        .canonicalize()
        .expect("the tiny pipeline")
        .display()
        .to_string()
}

/// The tiny pipeline, and Qwen as the chat model that puts Chinese prompts
/// into English for its English-only text encoder.
fn drawing_with_a_chat_model(c: &mut hanlin_server::Config) {
    c.image_model = Some(tiny());
    c.default_model = common::QWEN.into();
}

/// Width and height from a PNG's header.
fn png_size(b: &[u8]) -> (u32, u32) {
    assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n", "a PNG");
    let be = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    (be(16), be(20))
}

async fn images_of(srv: &common::TestServer, user: &str, at_least: i64) -> i64 {
    let mut n = 0;
    for _ in 0..100 {
        let (_, u) = call(
            Method::GET,
            format!("{}/v1/admin/usage?user={user}", srv.base),
            &srv.admin_key,
            None,
        )
        .await;
        n = u["data"]
            .as_array()
            .map(|rows| rows.iter().filter_map(|r| r["images"].as_i64()).sum())
            .unwrap_or(0);
        if n >= at_least {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_are_generated_stored_for_their_owner_and_metered() {
    let srv = start_with(|c| c.image_model = Some(tiny())).await;
    let base = &srv.base;
    let mut studio = hanlin_accounts::Plan::limited("studio", 1000, 1_000_000, 10_000_000);
    studio.max_n = 4;
    srv.plan(studio).await;
    let key = srv.user_key("ada", "studio").await;
    let gen = |body: Value| {
        call(
            Method::POST,
            format!("{base}/v1/images/generations"),
            &key,
            Some(body),
        )
    };

    // b64_json, through an OpenAI model name; the same seed gives the same image.
    let body = json!({"model": "dall-e-2", "prompt": "a red circle on a blue background",
        "size": "32x32", "response_format": "b64_json", "seed": 7, "steps": 3});
    let (s, a) = gen(body.clone()).await;
    assert_eq!(s, 200, "{a}");
    let png = |v: &Value| {
        base64::engine::general_purpose::STANDARD
            .decode(v["data"][0]["b64_json"].as_str().expect("b64_json"))
            .expect("base64")
    };
    let first = png(&a);
    assert_eq!(png_size(&first), (32, 32));
    let (_, b) = gen(body.clone()).await;
    assert_eq!(png(&b), first, "the same seed, the same image");
    let mut other = body.clone();
    other["seed"] = json!(8);
    let (_, c) = gen(other).await;
    assert_ne!(png(&c), first, "another seed, another image");

    // URLs: stored as the caller's files, served to them only.
    let (s, r) =
        gen(json!({"prompt": "画一只在西湖边的猫", "n": 2, "size": "48x32", "steps": 2})).await;
    assert_eq!(s, 200, "{r}");
    let urls: Vec<String> = r["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|d| d["url"].as_str().expect("url").to_string())
        .collect();
    assert_eq!(urls.len(), 2);
    let http = reqwest::Client::new();
    assert!(
        urls.iter()
            .all(|u| u.starts_with(&format!("{base}/v1/files/file-"))),
        "{urls:?}"
    );
    let got = http
        .get(&urls[1])
        .bearer_auth(&key)
        .send()
        .await
        .expect("get");
    assert_eq!(got.status(), 200);
    assert_eq!(got.headers()["content-type"], "image/png");
    assert_eq!(png_size(&got.bytes().await.expect("bytes")), (48, 32));
    let stranger = srv.user_key("eve", "studio").await;
    let got = http
        .get(&urls[0])
        .bearer_auth(&stranger)
        .send()
        .await
        .expect("get");
    assert_eq!(got.status(), 404, "another user's image");

    // Five images so far, each metered once.
    assert_eq!(images_of(&srv, "ada", 5).await, 5);

    // The image models are listed, with OpenAI's names.
    let (_, models) = call(Method::GET, format!("{base}/v1/models"), &key, None).await;
    let ids: Vec<&str> = models["data"]
        .as_array()
        .expect("models")
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert!(
        ids.contains(&"dall-e-3") && ids.contains(&"gpt-image-1"),
        "{ids:?}"
    );
    // A model given by path is known by its directory's name, never by the path.
    assert!(
        ids.contains(&"tiny-sd") && !ids.iter().any(|i| i.contains('/')),
        "{ids:?}"
    );
    let (s, r) = gen(json!({"model": "tiny-sd", "prompt": "a cat", "size": "32x32", "steps": 1, "response_format": "b64_json"})).await;
    assert_eq!(s, 200, "{r}");

    // Bad requests: OpenAI-shaped errors, nothing generated or metered.
    let long = "猫".repeat(10_000);
    for (body, param) in [
        (json!({"prompt": "   "}), "prompt"),
        (json!({"prompt": long}), "prompt"),
        (json!({"prompt": "a cat", "size": "30x30"}), "size"),
        (json!({"prompt": "a cat", "size": "100000x100000"}), "size"),
        (json!({"prompt": "a cat", "size": "big"}), "size"),
        (json!({"prompt": "a cat", "n": 5}), "n"),
        (json!({"prompt": "a cat", "n": 0}), "n"),
        (
            json!({"prompt": "a cat", "response_format": "gif"}),
            "response_format",
        ),
        (json!({"prompt": "a cat", "quality": "ultra"}), "quality"),
        (json!({"prompt": "a cat", "steps": 1000}), "steps"),
        (
            json!({"prompt": "a cat", "guidance_scale": 50}),
            "guidance_scale",
        ),
        (json!({"prompt": "a cat", "sampler": "plms"}), "sampler"),
        (
            json!({"prompt": "a cat", "output_format": "webp"}),
            "output_format",
        ),
        (
            json!({"prompt": "a cat", "model": "no-such-model"}),
            "model",
        ),
        (json!({"prompt": "a cat", "colour": "red"}), "colour"),
    ] {
        let (s, e) = gen(body.clone()).await;
        assert!(s == 400 || s == 404, "{body}: {s} {e}");
        assert_eq!(e["error"]["param"], param, "{body}: {e}");
    }
    assert_eq!(
        images_of(&srv, "ada", 6).await,
        6,
        "bad requests are not metered"
    );

    // The server is still healthy.
    let (s, _) = gen(body).await;
    assert_eq!(s, 200);
}

/// A model that names its own steps and guidance (`hanlin_defaults`, as
/// `hanlin train image` exports) gets them when a request names none, and
/// `quality` scales its steps; the steps are metered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_s_own_steps_are_the_default_and_quality_scales_them() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("own-steps");
    let src = std::path::PathBuf::from(tiny());
    for part in ["text_encoder", "tokenizer", "unet", "vae", "scheduler"] {
        std::fs::create_dir_all(dir.join(part)).expect("mkdir");
        for f in std::fs::read_dir(src.join(part)).expect("read_dir") {
            let f = f.expect("entry").path();
            std::fs::copy(&f, dir.join(part).join(f.file_name().expect("name"))).expect("copy");
        }
    }
    let mut index: Value = serde_json::from_str(
        &std::fs::read_to_string(src.join("model_index.json")).expect("index"),
    )
    .expect("json");
    index["hanlin_defaults"] = json!({"steps": 4, "guidance": 1.0});
    std::fs::write(dir.join("model_index.json"), index.to_string()).expect("write");
    let model = dir.display().to_string();
    let srv = start_with(move |c| c.image_model = Some(model)).await;
    let key = srv.user_key("ada", "free").await;
    let steps_of = |user: &'static str| {
        let (base, admin) = (srv.base.clone(), srv.admin_key.clone());
        async move {
            let (_, u) = call(
                Method::GET,
                format!("{base}/v1/admin/usage?user={user}"),
                &admin,
                None,
            )
            .await;
            u["data"]
                .as_array()
                .map(|rows| {
                    rows.iter()
                        .filter_map(|r| r["image_steps"].as_i64())
                        .sum::<i64>()
                })
                .unwrap_or(0)
        }
    };
    let mut total = 0;
    for (body, steps) in [
        (json!({"prompt": "a cat", "seed": 1}), 4),
        (json!({"prompt": "a cat", "seed": 1, "quality": "low"}), 2),
        (json!({"prompt": "a cat", "seed": 1, "quality": "hd"}), 6),
        (json!({"prompt": "a cat", "seed": 1, "steps": 3}), 3),
    ] {
        let (s, r) = call(
            Method::POST,
            format!("{}/v1/images/generations", srv.base),
            &key,
            Some(body.clone()),
        )
        .await;
        assert_eq!(s, 200, "{body}: {r}");
        total += steps;
        let mut got = 0;
        for _ in 0..100 {
            got = steps_of("ada").await;
            if got >= total {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert_eq!(got, total, "{body}: {steps} steps");
    }
}

/// The events of one image-mode request.
async fn draw_events(b: &common::Browser, conv: &str, body: Value) -> Vec<Value> {
    let r = b
        .req(Method::POST, &format!("/api/conversations/{conv}/images"))
        .json(&body)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    r.text()
        .await
        .expect("body")
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).expect("event json"))
        .collect()
}

/// The first picture link in a message.
fn link_of(content: &str) -> String {
    content
        .split("](")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .unwrap_or_else(|| panic!("an image link in {content}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_app_draws_in_a_conversation_and_forgets_with_it() {
    let srv = start_with(drawing_with_a_chat_model).await;
    let base = &srv.base;
    let (b, _) = common::Browser::register(base, "画家", "correct horse battery").await;
    let (s, conv) = b
        .json(
            Method::POST,
            "/api/conversations",
            Some(json!({"model": common::MODEL})),
        )
        .await;
    assert_eq!(s, 200, "{conv}");
    let conv = conv["id"].as_str().expect("id").to_string();
    let events = draw_events(
        &b,
        &conv,
        json!({"prompt": "画一只在西湖边的猫", "size": "32x32", "steps": 3, "seed": 11}),
    )
    .await;
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
    assert_eq!(
        kinds,
        [
            "user",
            "assistant",
            "progress",
            "progress",
            "progress",
            "done"
        ],
        "{events:?}"
    );
    let preview = events[2]["preview"].as_str().expect("a preview");
    assert!(preview.starts_with("data:image/png;base64,"));
    let content = events[5]["content"].as_str().expect("content");
    assert!(
        content.contains("seed 11") && content.contains("tiny-sd"),
        "{content}"
    );
    assert!(
        !content.contains("/tests/data"),
        "no server path in the message: {content}"
    );
    // The English prompt the chat model wrote is shown, on the line the app
    // offers to edit.
    let used = content
        .lines()
        .find_map(|l| l.strip_prefix("> 🖋 "))
        .unwrap_or_else(|| panic!("the English prompt in {content}"));
    assert!(used.to_lowercase().contains("cat"), "{used}");
    assert!(!hanlin_image::has_chinese(used), "{used}");
    let url = content
        .split("](")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .expect("an image link")
        .to_string();
    assert!(url.starts_with("/v1/files/"), "{url}");
    // The picture is the user's, readable with the session.
    let got = b.req(Method::GET, &url).send().await.expect("get");
    assert_eq!(got.status(), 200);
    assert_eq!(png_size(&got.bytes().await.expect("bytes")), (32, 32));
    // It stays in the conversation…
    let (_, c) = b
        .json(Method::GET, &format!("/api/conversations/{conv}"), None)
        .await;
    let stored: Vec<&str> = c["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .filter_map(|m| m["content"].as_str())
        .collect();
    assert!(stored.contains(&content), "{stored:?}");
    assert_eq!(images_of(&srv, "画家", 1).await, 1);
    // The app's usage view counts it against the plan's daily images.
    let (_, usage) = b.json(Method::GET, "/api/usage", None).await;
    let today = usage["today"].as_str().expect("today");
    let drawn_today: i64 = usage["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter(|r| r["day"] == today)
        .filter_map(|r| r["images"].as_i64())
        .sum();
    // 1, unless the drawing was metered just before midnight.
    assert_eq!(usage["images_today"].as_i64(), Some(drawn_today), "{usage}");
    let drawn_before = usage["data"]
        .as_array()
        .expect("data")
        .iter()
        .any(|r| r["day"] != today && r["images"].as_i64() > Some(0));
    assert!(drawn_today == 1 || drawn_before, "{usage}");
    assert!(
        usage["plan"]["images_per_day"].as_i64() > Some(1),
        "{usage}"
    );
    // Redrawing the picture just drawn, by its URL: the user's message
    // shows it above the prompt, and the reply is a new picture.
    let events = draw_events(
        &b,
        &conv,
        json!({"prompt": "a red cat", "image": url, "strength": 0.6, "steps": 5, "seed": 3}),
    )
    .await;
    let shown = events[0]["message"]["content"]
        .as_str()
        .expect("user message");
    assert_eq!(shown, format!("![picture]({url})\n\na red cat"));
    let done = events.last().expect("events");
    assert_eq!(done["type"], "done", "{events:?}");
    // strength 0.6 of 5 steps: the last 3 run.
    let steps = events.iter().filter(|e| e["type"] == "progress").count();
    assert_eq!(steps, 3, "{events:?}");
    let redrawn = link_of(done["content"].as_str().expect("content"));
    assert_ne!(redrawn, url);
    // A picture sent with the request (a PNG whose clear pixels are
    // painted): kept as the user's, shown in the message, and the rest of
    // it comes back exactly.
    let (png, px) = rgba_png(32, 32, |x, _| x >= 16);
    let data = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(&png)
    );
    let events = draw_events(
        &b,
        &conv,
        json!({"prompt": "a sun", "image": data, "steps": 3}),
    )
    .await;
    let shown = events[0]["message"]["content"]
        .as_str()
        .expect("user message");
    let sent = link_of(shown);
    let got = b.req(Method::GET, &sent).send().await.expect("get");
    assert_eq!(got.bytes().await.expect("bytes").as_ref(), png.as_slice());
    let done = events.last().expect("events");
    assert_eq!(done["type"], "done", "{events:?}");
    let out = b
        .req(
            Method::GET,
            &link_of(done["content"].as_str().expect("content")),
        )
        .send()
        .await
        .expect("get")
        .bytes()
        .await
        .expect("bytes");
    let rgb = png_rgb(&out);
    for y in 0..32usize {
        for x in 0..16usize {
            let (o, i) = ((y * 32 + x) * 3, (y * 32 + x) * 4);
            assert_eq!(rgb[o..o + 3], px[i..i + 3], "kept pixel ({x}, {y})");
        }
    }
    // Bad pictures are refused before anything is stored; another user's
    // picture is nobody's.
    let (b2, _) = common::Browser::register(base, "旁人", "correct horse battery").await;
    let (_, conv3) = b2
        .json(
            Method::POST,
            "/api/conversations",
            Some(json!({"model": common::MODEL})),
        )
        .await;
    let conv3 = conv3["id"].as_str().expect("id").to_string();
    for (image, says) in [
        (json!(url), "No such picture"),
        (json!("data:image/png;base64,@@@"), "base64"),
        (json!("data:image/jpeg;base64,AAAA"), "PNG"),
        (json!("data:image/png;base64,AAAA"), "image"),
        (json!("https://example.com/cat.png"), "data URL"),
    ] {
        let (s, e) = b2
            .json(
                Method::POST,
                &format!("/api/conversations/{conv3}/images"),
                Some(json!({"prompt": "a cat", "image": image})),
            )
            .await;
        assert_eq!(
            (s, e["error"]["param"].as_str()),
            (400, Some("image")),
            "{e}"
        );
        assert!(
            e["error"]["message"].as_str().unwrap_or("").contains(says),
            "{e}"
        );
    }
    let (s, e) = b2
        .json(
            Method::POST,
            &format!("/api/conversations/{conv3}/images"),
            Some(json!({"prompt": "a cat", "image": data, "strength": 1.5})),
        )
        .await;
    assert_eq!(
        (s, e["error"]["param"].as_str()),
        (400, Some("strength")),
        "{e}"
    );
    let (_, c) = b2
        .json(Method::GET, &format!("/api/conversations/{conv3}"), None)
        .await;
    assert_eq!(c["messages"].as_array().map(Vec::len), Some(0), "{c}");
    // …and goes with it, with the pictures sent to it.
    let (s, _) = b
        .json(Method::DELETE, &format!("/api/conversations/{conv}"), None)
        .await;
    assert_eq!(s, 200);
    for gone in [&url, &redrawn, &sent] {
        let got = b.req(Method::GET, gone).send().await.expect("get");
        assert_eq!(got.status(), 404, "{gone}");
    }
    // A bad request is refused before anything is stored.
    let (_, conv2) = b
        .json(
            Method::POST,
            "/api/conversations",
            Some(json!({"model": common::MODEL})),
        )
        .await;
    let conv2 = conv2["id"].as_str().expect("id").to_string();
    let (s, e) = b
        .json(
            Method::POST,
            &format!("/api/conversations/{conv2}/images"),
            Some(json!({"prompt": "a cat", "size": "31x31"})),
        )
        .await;
    assert_eq!(
        (s, e["error"]["param"].as_str()),
        (400, Some("size")),
        "{e}"
    );
    let (_, c) = b
        .json(Method::GET, &format!("/api/conversations/{conv2}"), None)
        .await;
    assert_eq!(c["messages"].as_array().map(Vec::len), Some(0), "{c}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_over_its_request_rate_does_not_make_the_server_load_a_model() {
    // Admission comes before the model loads: a refused request costs no
    // more than a refused chat request.
    let srv = start_with(|c| c.image_model = Some(tiny())).await;
    srv.plan(hanlin_accounts::Plan::limited(
        "none", 0, 1_000_000, 10_000_000,
    ))
    .await;
    let key = srv.user_key("zed", "none").await;
    let (s, e) = call(
        Method::POST,
        format!("{}/v1/images/generations", srv.base),
        &key,
        Some(json!({"prompt": "a cat", "size": "32x32", "steps": 1})),
    )
    .await;
    assert_eq!(s, 429, "{e}");
    assert!(
        !srv.state.images.is_loaded().await,
        "the model was loaded for a refused request"
    );
}

/// The plan's daily images: a request for more than are left is refused
/// whole, before the model loads, with what is left; a request refused for
/// another reason, or cancelled, uses none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_count_against_the_plan_s_daily_quota() {
    let srv = start_with(|c| c.image_model = Some(tiny())).await;
    let mut p = hanlin_accounts::Plan::limited("sketch", 100, 1_000_000, 10_000_000);
    (p.images_per_day, p.max_n) = (3, 4);
    srv.plan(p).await;
    let key = srv.user_key("painter", "sketch").await;
    let draw = |body: Value| {
        let (base, key) = (srv.base.clone(), key.clone());
        async move {
            call(
                Method::POST,
                format!("{base}/v1/images/generations"),
                &key,
                Some(body),
            )
            .await
        }
    };
    let (s, e) = draw(json!({"prompt": "a cat", "n": 4, "size": "32x32", "steps": 1})).await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (429, Some("insufficient_quota")),
        "{e}"
    );
    assert!(
        e["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("3 images")),
        "{e}"
    );
    assert!(
        !srv.state.images.is_loaded().await,
        "loaded for a refused request"
    );
    // A bad size is found after the reservation: it gives it back.
    let (s, e) = draw(json!({"prompt": "a cat", "size": "33x33", "steps": 1})).await;
    assert_eq!(s, 400, "{e}");
    let (s, e) = draw(json!({"prompt": "a cat", "n": 2, "size": "32x32", "steps": 1})).await;
    assert_eq!(s, 200, "{e}");
    let (s, e) = draw(json!({"prompt": "a dog", "n": 2, "size": "32x32", "steps": 1})).await;
    assert_eq!(s, 429, "one left: {e}");
    let (s, e) = draw(json!({"prompt": "a dog", "size": "32x32", "steps": 1})).await;
    assert_eq!(s, 200, "{e}");
    let (s, e) = draw(json!({"prompt": "a bird", "size": "32x32", "steps": 1})).await;
    assert_eq!(s, 429, "{e}");
    assert_eq!(images_of(&srv, "painter", 3).await, 3);
    // Chat is not limited by the image quota.
    let (s, e) = call(
        Method::POST,
        format!("{}/v1/chat/completions", srv.base),
        &key,
        Some(json!({"model": common::MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})),
    )
    .await;
    assert_eq!(s, 200, "{e}");
}

/// A Chinese prompt for an English-only image model goes through the chat
/// model first (metered as the caller's own request); the answer says what
/// the image model was given. `revise_prompt: false` and English prompts
/// skip it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chinese_prompt_is_put_into_english_for_an_english_only_model() {
    let srv = start_with(drawing_with_a_chat_model).await;
    let base = &srv.base;
    srv.plan(hanlin_accounts::Plan::limited(
        "studio", 1000, 1_000_000, 10_000_000,
    ))
    .await;
    let key = srv.user_key("li", "studio").await;
    let gen = |body: Value| {
        call(
            Method::POST,
            format!("{base}/v1/images/generations"),
            &key,
            Some(body),
        )
    };
    let chat_tokens = || async {
        let (_, u) = call(
            Method::GET,
            format!("{base}/v1/admin/usage?user=li"),
            &srv.admin_key,
            None,
        )
        .await;
        u["data"]
            .as_array()
            .map(|rows| {
                rows.iter()
                    .filter(|r| r["model"] == common::QWEN)
                    .filter_map(|r| r["completion_tokens"].as_i64())
                    .sum::<i64>()
            })
            .unwrap_or(0)
    };
    let ask = |prompt: &str, revise: Option<bool>| {
        let mut b = json!({"prompt": prompt, "size": "32x32", "steps": 2, "seed": 3,
            "response_format": "b64_json"});
        if let Some(r) = revise {
            b["revise_prompt"] = json!(r);
        }
        b
    };
    let (s, a) = gen(ask("画一只在西湖边的猫", None)).await;
    assert_eq!(s, 200, "{a}");
    let used = a["data"][0]["revised_prompt"]
        .as_str()
        .expect("revised_prompt");
    assert!(used.to_lowercase().contains("cat"), "{used}");
    assert!(!hanlin_image::has_chinese(used), "{used}");
    let mut spent = 0;
    for _ in 0..50 {
        spent = chat_tokens().await;
        if spent > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(spent > 0, "the rewrite is metered on the caller");

    for (prompt, revise) in [("画一只猫", Some(false)), ("a red circle", None)] {
        let (s, a) = gen(ask(prompt, revise)).await;
        assert_eq!(s, 200, "{a}");
        assert_eq!(a["data"][0]["revised_prompt"], prompt);
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(chat_tokens().await, spent, "no rewrite for those");
    let (s, e) = gen(json!({"prompt": "画猫", "revise_prompt": "yes"})).await;
    assert_eq!(s, 400, "{e}");
}

/// A multipart part: name, file name, bytes.
type Part = (&'static str, Option<&'static str>, Vec<u8>);

/// A `w × h` RGBA PNG: a gradient, fully transparent where `clear` says.
fn rgba_png(w: u32, h: u32, clear: impl Fn(u32, u32) -> bool) -> (Vec<u8>, Vec<u8>) {
    let mut px = Vec::new();
    for y in 0..h {
        for x in 0..w {
            let a = if clear(x, y) { 0 } else { 255 };
            px.extend_from_slice(&[(x * 7) as u8, (y * 7) as u8, 200, a]);
        }
    }
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Rgba);
        enc.set_depth(png::BitDepth::Eight);
        let mut wr = enc.write_header().expect("header");
        wr.write_image_data(&px).expect("pixels");
    }
    (out, px)
}

/// RGB of a PNG.
fn png_rgb(b: &[u8]) -> Vec<u8> {
    let dec = png::Decoder::new(std::io::Cursor::new(b));
    let mut r = dec.read_info().expect("png");
    let mut buf = vec![0; r.output_buffer_size()];
    let info = r.next_frame(&mut buf).expect("frame");
    assert_eq!(info.color_type, png::ColorType::Rgb);
    buf[..info.buffer_size()].to_vec()
}

/// `/v1/images/edits` as OpenAI's clients send it: the key before the
/// upload is read; a picture with transparent pixels is painted there and
/// kept exactly elsewhere; a mask does the same; the whole picture is
/// redrawn without either; edits are metered like generations; bad
/// pictures, masks and fields are refused with OpenAI-shaped errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pictures_are_edited_where_transparent_or_masked() {
    let srv = start_with(|c| c.image_model = Some(tiny())).await;
    let key = srv.user_key("ada", "free").await;
    let edit = |parts: Vec<Part>, key: Option<String>| {
        let base = srv.base.clone();
        async move {
            let refs: Vec<(&str, Option<&str>, &[u8])> =
                parts.iter().map(|(n, f, b)| (*n, *f, &b[..])).collect();
            let (ty, body) = common::multipart(&refs);
            let mut r = reqwest::Client::new()
                .post(format!("{base}/v1/images/edits"))
                .header("content-type", ty)
                .body(body);
            if let Some(k) = key {
                r = r.bearer_auth(k);
            }
            let r = r.send().await.expect("send");
            (
                r.status().as_u16(),
                r.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    let b64 = |v: &Value| {
        base64::engine::general_purpose::STANDARD
            .decode(v["data"][0]["b64_json"].as_str().expect("b64_json"))
            .expect("base64")
    };
    let (picture, px) = rgba_png(32, 32, |x, _| x >= 16);
    let text = |s: &str| s.as_bytes().to_vec();

    let (s, _) = edit(
        vec![
            ("image", Some("a.png"), picture.clone()),
            ("prompt", None, text("a cat")),
        ],
        None,
    )
    .await;
    assert_eq!(s, 401, "no key");

    // Transparent on the right: painted there, the left half kept exactly.
    let (s, r) = edit(
        vec![
            ("image", Some("a.png"), picture.clone()),
            ("prompt", None, text("a red circle")),
            ("response_format", None, text("b64_json")),
            ("steps", None, text("2")),
            ("seed", None, text("3")),
        ],
        Some(key.clone()),
    )
    .await;
    assert_eq!(s, 200, "{r}");
    let out = b64(&r);
    assert_eq!(png_size(&out), (32, 32));
    let rgb = png_rgb(&out);
    let (mut kept, mut changed) = (true, false);
    for (i, (o, p)) in rgb.chunks(3).zip(px.chunks(4)).enumerate() {
        if i % 32 < 16 {
            kept &= o == &p[..3];
        } else {
            changed |= o != &p[..3];
        }
    }
    assert!(kept && changed, "left half kept, right half painted");

    // The same with an opaque picture and a mask (transparent = paint).
    let (opaque, _) = rgba_png(32, 32, |_, _| false);
    let (mask, _) = rgba_png(32, 32, |x, _| x >= 16);
    let (s, r2) = edit(
        vec![
            ("image", Some("a.png"), opaque.clone()),
            ("mask", Some("m.png"), mask.clone()),
            ("prompt", None, text("a red circle")),
            ("response_format", None, text("b64_json")),
            ("steps", None, text("2")),
            ("seed", None, text("3")),
        ],
        Some(key.clone()),
    )
    .await;
    assert_eq!(s, 200, "{r2}");
    assert_eq!(b64(&r2), out, "a mask paints as transparency does");

    // Neither: the whole picture is redrawn, stored as a URL by default.
    let (s, r3) = edit(
        vec![
            ("image", Some("a.png"), opaque.clone()),
            ("prompt", None, text("a red circle")),
            ("strength", None, text("0.5")),
            ("steps", None, text("4")),
        ],
        Some(key.clone()),
    )
    .await;
    assert_eq!(s, 200, "{r3}");
    assert!(r3["data"][0]["url"].as_str().is_some(), "{r3}");
    assert_eq!(r3["usage"]["steps"], 4);
    assert_eq!(images_of(&srv, "ada", 3).await, 3, "three edits metered");

    // Bad requests: nothing drawn or metered, the parameter named.
    let (small_mask, _) = rgba_png(16, 16, |_, _| true);
    let cases: Vec<(Vec<Part>, &str)> = vec![
        (vec![("prompt", None, text("a cat"))], "image"),
        (
            vec![
                ("image", Some("a.gif"), text("GIF89a")),
                ("prompt", None, text("a cat")),
            ],
            "image",
        ),
        (
            vec![
                ("image", Some("a.png"), opaque.clone()),
                ("mask", Some("m.png"), small_mask),
                ("prompt", None, text("a cat")),
            ],
            "mask",
        ),
        (
            vec![
                ("image", Some("a.png"), opaque.clone()),
                ("mask", Some("m.png"), text("not a png")),
                ("prompt", None, text("a cat")),
            ],
            "mask",
        ),
        (
            vec![
                ("image", Some("a.png"), opaque.clone()),
                ("prompt", None, text("a cat")),
                ("strength", None, text("2")),
            ],
            "strength",
        ),
        (
            vec![
                ("image", Some("a.png"), opaque.clone()),
                ("prompt", None, text("a cat")),
                ("n", None, text("many")),
            ],
            "n",
        ),
        (
            vec![
                ("image", Some("a.png"), opaque.clone()),
                ("image", Some("b.png"), opaque.clone()),
                ("prompt", None, text("a cat")),
            ],
            "image",
        ),
        (
            vec![
                ("image", Some("a.png"), opaque.clone()),
                ("prompt", None, text("  ")),
            ],
            "prompt",
        ),
        (
            vec![
                ("image", Some("a.png"), opaque.clone()),
                ("prompt", None, text("a cat")),
                ("colour", None, text("red")),
            ],
            "colour",
        ),
    ];
    for (parts, param) in cases {
        let (s, e) = edit(parts, Some(key.clone())).await;
        assert_eq!(s, 400, "{param}: {e}");
        assert_eq!(e["error"]["param"], param, "{e}");
    }
    assert_eq!(
        images_of(&srv, "ada", 3).await,
        3,
        "bad edits are not metered"
    );
}
