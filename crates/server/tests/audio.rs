//! `/v1/audio/transcriptions` and `/v1/audio/translations` on the real
//! Whisper base model: OpenAI's form and response formats, the usage row
//! in audio milliseconds written once per delivered transcript, and clear
//! errors (nothing metered) for bad uploads.

use crate::common;

use crate::common::start;

const JFK: &[u8] = include_bytes!("../../speech/tests/data/jfk.wav");
const JFK_WEBM: &[u8] = include_bytes!("../../speech/tests/data/jfk.webm");

/// Form parts: `(name, filename, bytes)`.
type Parts<'a> = Vec<(&'a str, Option<&'a str>, &'a [u8])>;

async fn post(
    base: &str,
    path: &str,
    key: Option<&str>,
    parts: &[(&str, Option<&str>, &[u8])],
) -> (u16, String) {
    let (ty, body) = common::multipart(parts);
    let mut r = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .header("content-type", ty)
        .body(body);
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    let r = r.send().await.expect("send");
    (r.status().as_u16(), r.text().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speech_is_transcribed_metered_once_and_bad_uploads_are_refused() {
    let srv = start().await;
    let base = &srv.base;
    let key = srv.user_key("ada", "free").await;
    const T: &str = "/v1/audio/transcriptions";

    // No key: refused before the upload is read. (A short file: the
    // server answers without reading the body and closes the connection,
    // so a client still sending a long one may see the reset rather than
    // the answer.)
    let (s, _) = post(
        base,
        T,
        None,
        &[
            ("file", Some("a.wav"), &JFK[..4096]),
            ("model", None, b"whisper-1"),
        ],
    )
    .await;
    assert_eq!(s, 401);

    // verbose_json: language, duration, timed segments, usage in seconds.
    let (s, body) = post(
        base,
        T,
        Some(&key),
        &[
            ("file", Some("jfk.wav"), JFK),
            ("model", None, b"whisper-1"),
            ("response_format", None, b"verbose_json"),
        ],
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    let text = v["text"].as_str().unwrap_or("");
    assert!(
        text.contains("ask not what your country can do for you"),
        "{text}"
    );
    assert_eq!(v["language"], "english");
    assert_eq!(v["duration"], 11.0);
    assert_eq!(v["usage"]["seconds"], 11);
    let segs = v["segments"].as_array().expect("segments");
    assert!(segs.len() >= 2, "{v}");
    assert_eq!(segs[0]["start"], 0.0);
    assert!(segs[1]["end"].as_f64().unwrap_or(0.0) > 10.0, "{v}");

    // What browsers record: WebM with Opus (Chromium's MediaRecorder).
    let (s, body) = post(
        base,
        T,
        Some(&key),
        &[
            ("file", Some("speech.webm"), JFK_WEBM),
            ("model", None, b"whisper-1"),
            ("response_format", None, b"verbose_json"),
        ],
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert!(
        v["text"]
            .as_str()
            .is_some_and(|t| t.contains("ask not what your country can do for you")),
        "{v}"
    );
    let webm_ms = (v["duration"].as_f64().expect("duration") * 1000.0).round() as i64;

    // Subtitles and plain text (the installed model's own name works too).
    let (s, srt) = post(
        base,
        T,
        Some(&key),
        &[
            ("file", Some("jfk.wav"), JFK),
            ("model", None, b"whisper-base"),
            ("response_format", None, b"srt"),
        ],
    )
    .await;
    assert_eq!(s, 200, "{srt}");
    assert!(srt.starts_with("1\n00:00:00,000 --> 00:00:0"), "{srt}");
    let (s, vtt) = post(
        base,
        "/v1/audio/translations",
        Some(&key),
        &[
            ("file", Some("jfk.wav"), JFK),
            ("model", None, b"whisper-1"),
            ("response_format", None, b"vtt"),
        ],
    )
    .await;
    assert_eq!(s, 200, "{vtt}");
    assert!(vtt.starts_with("WEBVTT\n\n00:00:00.000 --> "), "{vtt}");

    // Bad uploads: clear OpenAI-shaped errors.
    let mut truncated = JFK[..44].to_vec();
    truncated.extend_from_slice(&[0u8; 3]);
    let silence = hanlin_speech::audio::wav_bytes(&vec![0.0; 16_000 * 3], 16_000);
    let cases: Vec<(Parts, u16, &str)> = vec![
        (
            vec![("file", Some("a.wav"), b""), ("model", None, b"whisper-1")],
            400,
            "invalid_audio",
        ),
        (
            vec![
                (
                    "file",
                    Some("notes.txt"),
                    b"hello, this is not audio".as_slice(),
                ),
                ("model", None, b"whisper-1"),
            ],
            400,
            "unsupported_format",
        ),
        (
            vec![
                ("file", Some("a.wav"), &truncated),
                ("model", None, b"whisper-1"),
            ],
            400,
            "invalid_audio",
        ),
        (vec![("model", None, b"whisper-1")], 400, "file"),
        (vec![("file", Some("a.wav"), JFK)], 400, "model"),
        (
            vec![
                ("file", Some("a.wav"), JFK),
                ("model", None, b"no-such-model"),
            ],
            404,
            "model_not_found",
        ),
        (
            vec![
                ("file", Some("a.wav"), JFK),
                ("model", None, b"whisper-1"),
                ("response_format", None, b"docx"),
            ],
            400,
            "response_format",
        ),
        (
            vec![
                ("file", Some("a.wav"), JFK),
                ("model", None, b"whisper-1"),
                ("language", None, b"klingon"),
            ],
            400,
            "language",
        ),
    ];
    for (parts, status, what) in &cases {
        let (s, body) = post(base, T, Some(&key), parts).await;
        assert_eq!(s, *status, "{what}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("an OpenAI error body");
        let e = &v["error"];
        assert!(e["code"] == *what || e["param"] == *what, "{what}: {v}");
        assert!(!e["message"].as_str().unwrap_or("").is_empty());
    }
    // Silence is a transcript with no text.
    let (s, body) = post(
        base,
        T,
        Some(&key),
        &[
            ("file", Some("quiet.wav"), &silence),
            ("model", None, b"whisper-1"),
        ],
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["text"], "");
    // An upload over 25 MB is refused.
    let huge = vec![0u8; 26 << 20];
    let (s, body) = post(
        base,
        T,
        Some(&key),
        &[
            ("file", Some("big.wav"), &huge),
            ("model", None, b"whisper-1"),
        ],
    )
    .await;
    assert!(s == 400 || s == 413, "{s}: {body}");

    // Metered once per delivered transcript: three of jfk (11 s each), the
    // WebM one and one of silence (3 s); the refused uploads cost nothing.
    let expected = 3 * 11_000 + 3_000 + webm_ms;
    assert_eq!(audio_ms_of(&srv, "ada", expected).await, expected);
}

async fn speak(base: &str, key: &str, body: serde_json::Value) -> (u16, String, Vec<u8>) {
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/audio/speech"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .expect("send");
    let status = r.status().as_u16();
    let ty = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    (
        status,
        ty,
        r.bytes().await.map(|b| b.to_vec()).unwrap_or_default(),
    )
}

async fn audio_ms_of(srv: &common::TestServer, user: &str, at_least: i64) -> i64 {
    let mut ms = 0;
    for _ in 0..100 {
        let (_, u) = common::call(
            reqwest::Method::GET,
            format!("{}/v1/admin/usage?user={user}", srv.base),
            &srv.admin_key,
            None,
        )
        .await;
        ms = u["data"]
            .as_array()
            .map(|rows| rows.iter().filter_map(|r| r["audio_ms"].as_i64()).sum())
            .unwrap_or(0);
        if ms >= at_least {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    ms
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_is_spoken_streamed_heard_back_and_metered_once() {
    let srv = start().await;
    let base = &srv.base;
    let key = srv.user_key("sam", "free").await;

    // WAV, streamed: a header whose sizes say "unknown", then the samples.
    let sentence = "The meeting starts at nine thirty tomorrow morning.";
    let (s, ty, wav) = speak(
        base,
        &key,
        serde_json::json!({"model": "tts-1", "voice": "alloy", "input": sentence, "response_format": "wav"}),
    )
    .await;
    assert_eq!(
        (s, ty.as_str()),
        (200, "audio/wav"),
        "{}",
        String::from_utf8_lossy(&wav)
    );
    assert_eq!(&wav[..4], b"RIFF");
    let pcm = hanlin_speech::audio::decode(wav.clone(), Some("wav"), 60.0).expect("our own WAV");
    assert_eq!(pcm.rate, 24_000);
    let wav_ms = (wav.len() - 44) as i64 / 48;
    assert!(wav_ms > 1500, "{wav_ms} ms");

    // Heard back by the recogniser (synthesised English: Whisper knows it),
    // by another user, whose transcript is metered apart.
    let listener = srv.user_key("tom", "free").await;
    let (s, body) = post(
        base,
        "/v1/audio/transcriptions",
        Some(&listener),
        &[
            ("file", Some("speech.wav"), &wav),
            ("model", None, b"whisper-1"),
            ("language", None, b"en"),
        ],
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let text = body.to_lowercase();
    assert!(
        text.contains("meeting") && text.contains("tomorrow"),
        "{body}"
    );

    // Mixed Chinese and English as raw PCM, with another voice.
    let (s, ty, pcm) = speak(
        base,
        &key,
        serde_json::json!({"model": "gpt-4o-mini-tts", "voice": "onyx", "input": "今天是2026年11月29日。We meet at 9:30.", "response_format": "pcm", "speed": 1.2}),
    )
    .await;
    assert_eq!((s, ty.as_str()), (200, "audio/pcm"));
    assert!(
        pcm.len() % 2 == 0 && pcm.len() > 48_000 * 2,
        "{} bytes",
        pcm.len()
    );
    let pcm_ms = pcm.len() as i64 / 48;

    // Bad requests: clear errors, nothing spoken, nothing metered.
    let long = "长".repeat(5_000);
    let cases = [
        (
            serde_json::json!({"model": "tts-1", "voice": "nobody", "input": "hi"}),
            400,
            "voice",
        ),
        (
            serde_json::json!({"model": "tts-1", "voice": "alloy", "input": "hi"}),
            400,
            "response_format",
        ),
        (
            serde_json::json!({"model": "tts-1", "voice": "alloy", "input": "hi", "response_format": "flac"}),
            400,
            "response_format",
        ),
        (
            serde_json::json!({"model": "tts-1", "voice": "alloy", "input": long, "response_format": "wav"}),
            400,
            "input",
        ),
        (
            serde_json::json!({"model": "tts-1", "voice": "alloy", "input": "  ", "response_format": "wav"}),
            400,
            "input",
        ),
        (
            serde_json::json!({"model": "tts-1", "voice": "alloy", "input": "hi", "response_format": "wav", "speed": 9}),
            400,
            "speed",
        ),
        (
            serde_json::json!({"model": "no-such-tts", "voice": "alloy", "input": "hi"}),
            404,
            "model",
        ),
    ];
    for (body, status, what) in cases {
        let (s, _, b) = speak(base, &key, body).await;
        assert_eq!(s, status, "{what}: {}", String::from_utf8_lossy(&b));
        let v: serde_json::Value = serde_json::from_slice(&b).expect("an OpenAI error body");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{v}"
        );
    }
    // 100,000 characters: past the server's body limit before any work.
    let huge = "长".repeat(100_000);
    let (s, _, b) = speak(
        base,
        &key,
        serde_json::json!({"model": "tts-1", "voice": "alloy", "input": huge, "response_format": "wav"}),
    )
    .await;
    assert!(s == 413 || s == 400, "{s}: {}", String::from_utf8_lossy(&b));
    // Exactly what was sent is metered, once per request.
    assert_eq!(
        audio_ms_of(&srv, "sam", wav_ms + pcm_ms).await,
        wav_ms + pcm_ms
    );

    // A client that leaves after the first sentence: the rest is not
    // spoken, what was sent is metered, the server keeps answering.
    let many = "This is one sentence of a long text. ".repeat(40);
    let mut r = reqwest::Client::new()
        .post(format!("{base}/v1/audio/speech"))
        .bearer_auth(&key)
        .json(&serde_json::json!({"model": "tts-1", "voice": "nova", "input": many, "response_format": "pcm"}))
        .send()
        .await
        .expect("send");
    let first = r.chunk().await.expect("chunk").expect("a first sentence");
    assert!(!first.is_empty());
    drop(r);
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let after = audio_ms_of(&srv, "sam", wav_ms + pcm_ms + 1).await - wav_ms - pcm_ms;
    assert!(after > 0, "the sent part is metered");
    assert!(after < 40 * 1500, "{after} ms: the rest was not spoken");
    let (s, _, _) = speak(
        base,
        &key,
        serde_json::json!({"model": "tts-1", "voice": "alloy", "input": "Still here.", "response_format": "pcm"}),
    )
    .await;
    assert_eq!(s, 200);
}

/// Kokoro (pulled by the test command) speaks for OpenAI's better speech
/// models and under its own name; Whisper understands its Chinese.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_natural_voice_speaks_for_tts_1_hd() {
    use reqwest::Method as M;
    let srv = start().await;
    let base = &srv.base;
    let key = srv.user_key("kiki", "free").await;
    let models: serde_json::Value = reqwest::Client::new()
        .get(format!("{base}/v1/models"))
        .bearer_auth(&key)
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    let ids: Vec<&str> = models["data"]
        .as_array()
        .expect("models")
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert!(
        ids.contains(&"kokoro-82m") && ids.contains(&"tts-1-hd"),
        "{ids:?}"
    );

    let zh = "今天天气很好，我们去公园散步吧。";
    let mut heard = Vec::new();
    for model in ["tts-1-hd", "kokoro-82m"] {
        let (s, ty, wav) = speak(
            base,
            &key,
            serde_json::json!({"model": model, "voice": "nova", "input": zh, "response_format": "wav"}),
        )
        .await;
        assert_eq!((s, ty.as_str()), (200, "audio/wav"), "{model}");
        let (s, body) = post(
            base,
            "/v1/audio/transcriptions",
            Some(&key),
            &[
                ("file", Some("speech.wav"), &wav),
                ("model", None, b"whisper-1"),
                ("language", None, b"zh"),
                ("prompt", None, "以下是普通话的句子。".as_bytes()),
                ("response_format", None, b"text"),
            ],
        )
        .await;
        assert_eq!(s, 200, "{body}");
        assert!(
            body.contains("天气") && body.contains("公园"),
            "{model}: {body}"
        );
        heard.push(wav);
    }
    // The same synthesiser, voice and text: the same audio.
    assert_eq!(heard[0], heard[1]);

    // The voice mode's natural voice, with mouth shapes from its phonemes.
    let (wang, _) = common::Browser::register(base, "琪琪", "魔女宅急便的黑猫吉吉").await;
    let (_, me) = wang.json(M::GET, "/api/me", None).await;
    assert_eq!(me["natural_voice"], true, "{me}");
    let (s, said) = wang
        .json(
            M::POST,
            "/api/voice/speak",
            Some(serde_json::json!({"text": "妈妈，你好！", "voice": "nova", "model": "tts-1-hd"})),
        )
        .await;
    assert_eq!(s, 200, "{said}");
    let shapes: Vec<&str> = said["visemes"]
        .as_array()
        .expect("visemes")
        .iter()
        .filter_map(|c| c[1].as_str())
        .collect();
    assert!(
        shapes.contains(&"closed") && shapes.contains(&"open") && shapes.last() == Some(&"rest"),
        "{shapes:?}"
    );
    let (s, e) = wang
        .json(
            M::POST,
            "/api/voice/speak",
            Some(serde_json::json!({"text": "hi", "model": "tts-2"})),
        )
        .await;
    assert_eq!(
        (s, e["error"]["param"].as_str()),
        (400, Some("model")),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_voice_mode_hears_speaks_with_mouth_shapes_and_meters_the_user() {
    use base64::Engine as _;
    use reqwest::Method as M;
    let srv = start().await;
    let base = &srv.base;
    let (wang, _) = common::Browser::register(base, "王维", "空山不见人但闻人语响").await;

    // Cookie and CSRF token first, as for every web write.
    let no_csrf = wang
        .http
        .post(format!("{base}/api/voice/transcribe"))
        .header("cookie", &wang.cookie)
        .body(JFK)
        .send()
        .await
        .expect("send");
    assert_eq!(no_csrf.status(), 403);
    let anonymous = reqwest::Client::new()
        .post(format!("{base}/api/voice/speak"))
        .json(&serde_json::json!({"text": "你好"}))
        .send()
        .await
        .expect("send");
    assert_eq!(anonymous.status(), 401);

    // What the page recorded, recognised.
    let r = wang
        .req(M::POST, "/api/voice/transcribe")
        .body(JFK)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let heard: serde_json::Value = r.json().await.expect("json");
    assert!(
        heard["text"]
            .as_str()
            .is_some_and(|t| t.contains("ask not what your country can do for you")),
        "{heard}"
    );
    assert_eq!(heard["language"], "en");
    let r = wang
        .req(M::POST, "/api/voice/transcribe")
        .body(&b"RIFF not really audio"[..])
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 400);

    // A sentence spoken: PCM at 24 kHz, mouth shapes timed within it (妈
    // closes the lips, a opens them), a smile for a greeting.
    let (s, said) = wang
        .json(
            M::POST,
            "/api/voice/speak",
            Some(serde_json::json!({"text": "你好，妈妈！", "voice": "nova"})),
        )
        .await;
    assert_eq!(s, 200, "{said}");
    assert_eq!(said["rate"], 24_000);
    let pcm = base64::engine::general_purpose::STANDARD
        .decode(said["audio"].as_str().expect("audio"))
        .expect("base64");
    let duration_ms = said["duration_ms"].as_u64().expect("duration");
    assert!(duration_ms > 300, "{duration_ms}");
    assert_eq!(pcm.len() as u64 / 48, duration_ms);
    let cues = said["visemes"].as_array().expect("visemes");
    assert_eq!(cues[0][0], 0);
    let shapes: Vec<&str> = cues.iter().filter_map(|c| c[1].as_str()).collect();
    assert!(
        shapes.contains(&"closed") && shapes.contains(&"open"),
        "{shapes:?}"
    );
    assert_eq!(shapes.last(), Some(&"rest"));
    assert!(cues
        .iter()
        .all(|c| c[0].as_u64().is_some_and(|t| t <= duration_ms + 10)));
    assert_eq!(said["expression"], "smiling");
    for (bad, param) in [
        (serde_json::json!({"text": "  "}), "text"),
        (serde_json::json!({"text": "好".repeat(1001)}), "text"),
        (serde_json::json!({"text": "hi", "voice": "darth"}), "voice"),
        (serde_json::json!({"text": "hi", "speed": 9.0}), "speed"),
    ] {
        let (s, e) = wang.json(M::POST, "/api/voice/speak", Some(bad)).await;
        assert_eq!((s, e["error"]["param"].as_str()), (400, Some(param)), "{e}");
    }

    // The page learns the voices and looks it may offer from /api/me.
    let (_, me) = wang.json(M::GET, "/api/me", None).await;
    assert_eq!(me["voices"].as_array().map(Vec::len), Some(11), "{me}");
    assert_eq!(
        me["looks"],
        serde_json::json!(["scholar", "friend", "teacher", "robot"])
    );

    // A persona's voice and look are kept; unknown ones are refused.
    let (s, p) = wang
        .json(
            M::POST,
            "/api/personas",
            Some(serde_json::json!({"name": "老师", "prompt": "你是一位耐心的老师。", "voice": "sage", "look": "teacher"})),
        )
        .await;
    assert_eq!(s, 200, "{p}");
    let (_, all) = wang.json(M::GET, "/api/personas", None).await;
    assert!(all["data"]
        .as_array()
        .expect("personas")
        .iter()
        .any(|x| x["name"] == "老师" && x["voice"] == "sage" && x["look"] == "teacher"));
    for bad in [
        serde_json::json!({"name": "x", "prompt": "", "voice": "darth"}),
        serde_json::json!({"name": "x", "prompt": "", "look": "<svg onload=x>"}),
    ] {
        let (s, _) = wang.json(M::POST, "/api/personas", Some(bad)).await;
        assert_eq!(s, 400);
    }

    // Metered as the web user: 11 s heard, and what was said.
    let expected = 11_000 + duration_ms as i64;
    assert_eq!(audio_ms_of(&srv, "王维", expected).await, expected);
}
