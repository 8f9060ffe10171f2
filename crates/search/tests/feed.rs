//! Feeds polled into a knowledge base from a local HTTP server: new entries
//! become searchable with their dates, an unchanged feed (304) adds
//! nothing, and a feed that is down or returns garbage is reported and
//! retried with back-off while the documents already stored stay.

use hanlin_search::feed::{self, Feed, FetchPolicy};
use hanlin_search::{KnowledgeBase, Retriever};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the test server answers: a status and a body, and whether it
/// honours `If-None-Match` with a 304.
struct Reply {
    status: u16,
    body: String,
    etag: Option<&'static str>,
    /// Sent as `Location` (with a 302 status, a redirect).
    location: Option<String>,
}

/// The test servers are on loopback, which feeds may reach only when
/// allow-listed.
fn loopback() -> FetchPolicy {
    FetchPolicy::allowing(["127.0.0.1"])
}

fn serve(reply: Arc<Mutex<Reply>>) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut if_none_match = None;
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("if-none-match:") {
                    if_none_match = Some(v.trim().to_string());
                }
            }
            let rep = reply.lock().unwrap();
            let etag = rep.etag.map(|e| format!("\"{e}\""));
            let (status, body) = match (&etag, &if_none_match) {
                (Some(e), Some(i)) if e == i && rep.status == 200 => (304, String::new()),
                _ => (rep.status, rep.body.clone()),
            };
            let mut head = format!(
                "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n",
                body.len()
            );
            if let Some(e) = &etag {
                head.push_str(&format!("ETag: {e}\r\n"));
            }
            if let Some(l) = &rep.location {
                head.push_str(&format!("Location: {l}\r\n"));
            }
            let _ = s.write_all(format!("{head}\r\n{body}").as_bytes());
        }
    });
    format!("http://{addr}/feed.xml")
}

fn rss(items: &[(&str, &str, &str)]) -> String {
    let mut s =
        String::from("<?xml version=\"1.0\"?><rss version=\"2.0\"><channel><title>t</title>");
    for (i, (title, body, date)) in items.iter().enumerate() {
        s.push_str(&format!(
            "<item><title>{title}</title><link>https://news.test/{i}</link><description>{body}</description><pubDate>{date}</pubDate></item>"
        ));
    }
    s + "</channel></rss>"
}

#[test]
fn feeds_are_polled_deduplicated_and_retried() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("news");
    KnowledgeBase::create(&dir).unwrap();
    let reply = Arc::new(Mutex::new(Reply {
        status: 200,
        body: rss(&[(
            "港珠澳大桥",
            "港珠澳大桥全长55公里，连接香港、珠海和澳门。",
            "Mon, 23 Nov 2026 09:00:00 +0000",
        )]),
        etag: None,
        location: None,
    }));
    let url = serve(reply.clone());
    feed::add(&dir, Feed::new(&url, 60, 1000).unwrap()).unwrap();
    let kb = Mutex::new(KnowledgeBase::open(&dir).unwrap());
    let poll = |now: i64, force: bool| {
        feed::poll_due(
            root.path(),
            None,
            now,
            force,
            Duration::from_secs(5),
            &loopback(),
            |name, docs| {
                assert_eq!(name, "news");
                kb.lock().unwrap().add(docs, |_| {})
            },
        )
    };

    // First poll: the entry is stored and searchable, with its date.
    let r = poll(1000, false);
    assert_eq!(r.len(), 1);
    assert_eq!((r[0].added, r[0].error.as_deref()), (1, None));
    let hits = kb.lock().unwrap().search("港珠澳大桥多长", 3).unwrap();
    assert!(hits[0].text.contains("55公里"), "{hits:?}");
    assert_eq!(
        hits[0].published,
        hanlin_search::extract::parse_date("2026-11-23T09:00:00Z")
    );
    assert_eq!(hits[0].source, "https://news.test/0");
    let f = &feed::load(&dir).unwrap()[0];
    assert_eq!((f.next_at, f.items_added, f.failures), (1060, 1, 0));

    // Not due yet: nothing is fetched.
    assert!(poll(1030, false).is_empty());

    // The same entry again plus a new one: only the new one is added.
    reply.lock().unwrap().body = rss(&[
        (
            "港珠澳大桥",
            "港珠澳大桥全长55公里，连接香港、珠海和澳门。",
            "Mon, 23 Nov 2026 09:00:00 +0000",
        ),
        (
            "Harbour tunnel",
            "The new harbour tunnel opens on 1 December.",
            "Tue, 24 Nov 2026 09:00:00 +0000",
        ),
    ]);
    reply.lock().unwrap().etag = Some("v2");
    let r = poll(1060, false);
    assert_eq!((r[0].added, r[0].error.as_deref()), (1, None));
    assert_eq!(feed::load(&dir).unwrap()[0].etag.as_deref(), Some("\"v2\""));

    // Unchanged (the server answers 304 to our ETag): nothing added, no error.
    let r = poll(1120, false);
    assert_eq!((r[0].added, r[0].error.as_deref()), (0, None));

    // Garbage: reported, retried after 30 s, then 60 s; documents stay.
    {
        let mut rep = reply.lock().unwrap();
        rep.etag = None;
        rep.body = "<html>maintenance</html>".into();
    }
    let r = poll(1180, false);
    let err = r[0].error.as_deref().unwrap();
    assert!(err.contains("not an RSS, Atom or JSON feed"), "{err}");
    let f = &feed::load(&dir).unwrap()[0];
    assert_eq!((f.failures, f.next_at), (1, 1210));
    assert!(f.last_error.as_deref().unwrap().contains("not an RSS"));

    // Down (HTTP 503): the second failure waits twice as long.
    reply.lock().unwrap().status = 503;
    let r = poll(1210, false);
    assert!(r[0].error.as_deref().unwrap().contains("HTTP 503"), "{r:?}");
    let f = &feed::load(&dir).unwrap()[0];
    assert_eq!((f.failures, f.next_at), (2, 1270));
    assert_eq!(kb.lock().unwrap().documents().unwrap().len(), 2);

    // Back up: the failure count resets and the normal interval resumes.
    {
        let mut rep = reply.lock().unwrap();
        rep.status = 200;
        rep.body = rss(&[(
            "Harbour tunnel",
            "The new harbour tunnel opens on 1 December.",
            "Tue, 24 Nov 2026 09:00:00 +0000",
        )]);
    }
    let r = poll(1270, false);
    assert_eq!(r[0].error, None);
    let f = &feed::load(&dir).unwrap()[0];
    assert_eq!(
        (f.failures, f.next_at, f.last_error.as_deref()),
        (0, 1330, None)
    );

    // Removing the feed stops its polling.
    assert!(feed::remove(&dir, &url).unwrap());
    assert!(poll(5000, true).is_empty());
}

#[test]
fn an_unreachable_feed_is_an_error_not_a_hang() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("kb");
    KnowledgeBase::create(&dir).unwrap();
    // A port nobody listens on.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    feed::add(
        &dir,
        Feed::new(&format!("http://127.0.0.1:{port}/rss"), 600, 0).unwrap(),
    )
    .unwrap();
    let r = feed::poll_due(
        root.path(),
        None,
        0,
        false,
        Duration::from_secs(5),
        &loopback(),
        |_, _| unreachable!("nothing to add"),
    );
    assert!(r[0].error.as_deref().unwrap().contains("fetching"), "{r:?}");
    assert_eq!(feed::load(&dir).unwrap()[0].failures, 1);
}

fn one_item() -> String {
    rss(&[(
        "港珠澳大桥",
        "港珠澳大桥全长55公里，连接香港、珠海和澳门。",
        "Mon, 23 Nov 2026 09:00:00 +0000",
    )])
}

#[test]
fn private_addresses_are_refused_unless_allowed_even_after_a_redirect() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("kb");
    KnowledgeBase::create(&dir).unwrap();
    let target = serve(Arc::new(Mutex::new(Reply {
        status: 200,
        body: one_item(),
        etag: None,
        location: None,
    })));
    feed::add(&dir, Feed::new(&target, 600, 0).unwrap()).unwrap();
    let poll = |now: i64, policy: &FetchPolicy| {
        feed::poll_due(
            root.path(),
            None,
            now,
            true,
            Duration::from_secs(5),
            policy,
            |_, docs| KnowledgeBase::open(&dir)?.add(docs, |_| {}),
        )
    };
    // Loopback is not a public address: refused, and nothing was fetched.
    let r = poll(0, &FetchPolicy::default());
    let e = r[0].error.as_deref().unwrap();
    assert!(e.contains("not a public address"), "{e}");
    // Allow-listed, it is fetched.
    let r = poll(1, &loopback());
    assert_eq!((r[0].added, r[0].error.as_deref()), (1, None), "{r:?}");
    // A feed on an allowed name that redirects to an address that is not
    // allowed: the redirect is checked like the first request.
    assert!(feed::remove(&dir, &target).unwrap());
    let hop = serve(Arc::new(Mutex::new(Reply {
        status: 302,
        body: String::new(),
        etag: None,
        location: Some(target.clone()),
    })));
    let hop = hop.replace("127.0.0.1", "localhost");
    feed::add(&dir, Feed::new(&hop, 600, 0).unwrap()).unwrap();
    let r = poll(2, &FetchPolicy::allowing(["localhost"]));
    let e = r[0].error.as_deref().unwrap_or("");
    assert!(e.contains("not a public address"), "{r:?}");
    // With the target allowed too, the redirect is followed.
    let r = poll(3, &FetchPolicy::allowing(["localhost", "127.0.0.1"]));
    assert_eq!(r[0].error, None, "{r:?}");
}

#[test]
fn a_feed_is_recorded_as_failed_before_its_bytes_are_processed() {
    // Whatever happens while a fetched feed is parsed and stored — here a
    // panic standing in for a crash —, its state on disk already says it
    // failed and when to retry, so a restarted server does not fall into
    // the same input at once.
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("kb");
    KnowledgeBase::create(&dir).unwrap();
    let url = serve(Arc::new(Mutex::new(Reply {
        status: 200,
        body: one_item(),
        etag: None,
        location: None,
    })));
    feed::add(&dir, Feed::new(&url, 600, 0).unwrap()).unwrap();
    let crashed = std::panic::catch_unwind(|| {
        feed::poll_due(
            root.path(),
            None,
            100,
            false,
            Duration::from_secs(5),
            &loopback(),
            |_, _| panic!("the process dies here"),
        )
    });
    assert!(crashed.is_err());
    let f = &feed::load(&dir).unwrap()[0];
    assert_eq!(f.failures, 1);
    assert!(f.next_at > 100, "backs off: {f:?}");
    assert!(f
        .last_error
        .as_deref()
        .unwrap()
        .contains("stopped while parsing"));
    // The next real poll records its own outcome, counting from there.
    let r = feed::poll_due(
        root.path(),
        None,
        f.next_at,
        false,
        Duration::from_secs(5),
        &loopback(),
        |_, docs| KnowledgeBase::open(&dir)?.add(docs, |_| {}),
    );
    assert_eq!(r[0].error, None);
    assert_eq!(feed::load(&dir).unwrap()[0].failures, 0);
}
