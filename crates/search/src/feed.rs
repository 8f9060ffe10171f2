//! RSS and Atom feeds polled into a knowledge base.
//!
//! A knowledge base's feeds live in `feeds.json` beside its documents: the
//! URL, how often to poll it, and what the last polls did (time, items
//! added, consecutive failures, the last error, the `ETag` /
//! `Last-Modified` validators). [`poll_due`] fetches every feed that is due,
//! parses it (RSS 0.9–2.0, Atom, JSON Feed — `feed-rs`), and hands the
//! entries to the caller to add; entries already stored are deduplicated by
//! the knowledge base. A feed that is down or returns garbage is retried
//! with exponential back-off ([`retry_delay`]) and its error is kept for
//! `hanlin feed list` and `GET /v1/kb`.

use crate::extract::{html_text, Document};
use crate::index::AddReport;
use crate::SearchError;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Feed bodies larger than this are refused.
pub const MAX_FEED_BYTES: u64 = 16 << 20;
/// The shortest poll interval accepted.
pub const MIN_EVERY_SECS: u64 = 60;
/// Back-off never waits longer than this between tries.
pub const MAX_RETRY_SECS: u64 = 6 * 3600;

#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    #[error("fetching {url}: {reason}")]
    Fetch { url: String, reason: String },
    #[error("{url} is not an RSS, Atom or JSON feed ({reason})")]
    Parse { url: String, reason: String },
    #[error("invalid feed URL {0:?}: use http:// or https://")]
    BadUrl(String),
    #[error("invalid interval {0:?}: use e.g. 30s, 10m, 1h (at least 1s)")]
    BadInterval(String),
}

/// One feed of a knowledge base, with the state of its polling.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Feed {
    pub url: String,
    /// Poll interval, seconds.
    pub every: u64,
    /// When the feed was added (unix seconds).
    pub added: i64,
    /// Last attempt and last success (unix seconds).
    #[serde(default)]
    pub last_attempt: Option<i64>,
    #[serde(default)]
    pub last_ok: Option<i64>,
    /// When the next poll is due.
    #[serde(default)]
    pub next_at: i64,
    /// Consecutive failures (0 when the last poll worked).
    #[serde(default)]
    pub failures: u32,
    #[serde(default)]
    pub last_error: Option<String>,
    /// Documents this feed has added in all.
    #[serde(default)]
    pub items_added: u64,
    #[serde(default)]
    pub etag: Option<String>,
    #[serde(default)]
    pub last_modified: Option<String>,
}

impl Feed {
    pub fn new(url: &str, every: u64, now: i64) -> Result<Self, FeedError> {
        let u = url.trim();
        if !(u.starts_with("http://") || u.starts_with("https://")) || u.len() < 10 {
            return Err(FeedError::BadUrl(url.into()));
        }
        if every < MIN_EVERY_SECS {
            return Err(FeedError::BadInterval(format!("{every}s")));
        }
        Ok(Self {
            url: u.to_string(),
            every,
            added: now,
            last_attempt: None,
            last_ok: None,
            next_at: now,
            failures: 0,
            last_error: None,
            items_added: 0,
            etag: None,
            last_modified: None,
        })
    }
}

/// Parse an interval such as `30s`, `10m`, `1h`, `1d` or `1h30m`.
pub fn parse_every(s: &str) -> Result<u64, FeedError> {
    let d = humantime::parse_duration(s.trim()).map_err(|_| FeedError::BadInterval(s.into()))?;
    let secs = d.as_secs();
    if secs < MIN_EVERY_SECS {
        return Err(FeedError::BadInterval(s.into()));
    }
    Ok(secs)
}

/// How long to wait after the `failures`-th consecutive failure: 30 s (or
/// the poll interval, when that is shorter), doubling with each failure, at
/// most [`MAX_RETRY_SECS`].
pub fn retry_delay(failures: u32, every: u64) -> u64 {
    let exp = failures.saturating_sub(1).min(20);
    (every.clamp(1, 30) << exp).min(MAX_RETRY_SECS)
}

/// The feeds file of the knowledge base in `dir`.
fn feeds_path(dir: &Path) -> PathBuf {
    dir.join("feeds.json")
}

/// The feeds of the knowledge base in `dir` (none when it has no file).
pub fn load(dir: &Path) -> Result<Vec<Feed>, SearchError> {
    match std::fs::read(feeds_path(dir)) {
        Ok(b) => Ok(serde_json::from_slice(&b)?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e.into()),
    }
}

/// Write the feeds file atomically (a temporary file renamed over it), so a
/// crash or a full disk leaves the previous one.
pub fn save(dir: &Path, feeds: &[Feed]) -> Result<(), SearchError> {
    let tmp = dir.join("feeds.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(feeds)?)?;
    std::fs::rename(&tmp, feeds_path(dir))?;
    Ok(())
}

/// Add a feed to the knowledge base in `dir` (an existing URL gets the new
/// interval and is polled at once).
pub fn add(dir: &Path, feed: Feed) -> Result<(), SearchError> {
    if !dir.join("docs.jsonl").exists() {
        return Err(SearchError::NotFound(dir.to_path_buf()));
    }
    let mut feeds = load(dir)?;
    match feeds.iter_mut().find(|f| f.url == feed.url) {
        Some(f) => {
            f.every = feed.every;
            f.next_at = feed.next_at;
        }
        None => feeds.push(feed),
    }
    save(dir, &feeds)
}

/// Remove a feed; false when the knowledge base has no such feed.
pub fn remove(dir: &Path, url: &str) -> Result<bool, SearchError> {
    let mut feeds = load(dir)?;
    let before = feeds.len();
    feeds.retain(|f| f.url != url);
    if feeds.len() == before {
        return Ok(false);
    }
    save(dir, &feeds)?;
    Ok(true)
}

/// What one fetch returned.
pub enum Fetched {
    /// The server says nothing changed since the validators we sent.
    NotModified,
    Body {
        bytes: Vec<u8>,
        etag: Option<String>,
        last_modified: Option<String>,
    },
}

/// Which hosts a feed may be fetched from. Addresses that are not public
/// (loopback, private, link-local — cloud metadata at 169.254.169.254 among
/// them —, carrier-grade NAT, unique-local, multicast, unspecified) are
/// refused unless allow-listed, by host name or by address. The check is
/// made on the addresses the host name resolves to, by the resolver the
/// connection uses, so it holds for every redirect and cannot be dodged by
/// a name that resolves differently the second time.
#[derive(Debug, Clone, Default)]
pub struct FetchPolicy {
    /// Host names or IP addresses allowed even when they are not public.
    pub allow: Vec<String>,
}

impl FetchPolicy {
    pub fn allowing<S: Into<String>>(hosts: impl IntoIterator<Item = S>) -> Self {
        Self {
            allow: hosts.into_iter().map(Into::into).collect(),
        }
    }

    pub fn allows_host(&self, host: &str) -> bool {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        self.allow.iter().any(|a| a.eq_ignore_ascii_case(host))
    }

    pub fn allows_ip(&self, ip: std::net::IpAddr) -> bool {
        is_public(ip)
            || self
                .allow
                .iter()
                .any(|a| a.parse::<std::net::IpAddr>().is_ok_and(|x| x == ip))
    }
}

/// Whether `ip` is an address on the public internet.
pub fn is_public(ip: std::net::IpAddr) -> bool {
    use std::net::IpAddr;
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
                || o[0] >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let seg = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (seg[0] & 0xfe00) == 0xfc00
                || (seg[0] & 0xffc0) == 0xfe80
                // NAT64 and IPv4-compatible forms of private IPv4 addresses.
                || (seg[0] == 0x64 && seg[1] == 0xff9b)
                || seg[..6].iter().all(|&s| s == 0))
        }
    }
}

/// Resolves host names for feed fetches, keeping only the addresses the
/// policy allows.
struct CheckedResolver(FetchPolicy);

impl ureq::Resolver for CheckedResolver {
    fn resolve(&self, netloc: &str) -> std::io::Result<Vec<std::net::SocketAddr>> {
        use std::net::ToSocketAddrs;
        let host = netloc.rsplit_once(':').map_or(netloc, |(h, _)| h);
        let addrs: Vec<_> = netloc.to_socket_addrs()?.collect();
        if self.0.allows_host(host) {
            return Ok(addrs);
        }
        let allowed: Vec<_> = addrs
            .iter()
            .copied()
            .filter(|a| self.0.allows_ip(a.ip()))
            .collect();
        if allowed.is_empty() && !addrs.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "{host} is not a public address (an admin can allow it in the feed allow-list)"
                ),
            ));
        }
        Ok(allowed)
    }
}

/// GET a feed (conditional on the validators from the last poll), with a
/// timeout and a size limit, from hosts `policy` allows.
pub fn fetch(feed: &Feed, timeout: Duration, policy: &FetchPolicy) -> Result<Fetched, FeedError> {
    let err = |reason: String| FeedError::Fetch {
        url: feed.url.clone(),
        reason,
    };
    let agent = ureq::AgentBuilder::new()
        .resolver(CheckedResolver(policy.clone()))
        .redirects(5)
        .timeout(timeout)
        .user_agent(concat!("hanlin/", env!("CARGO_PKG_VERSION")))
        .build();
    let mut req = agent.get(&feed.url);
    if let Some(e) = &feed.etag {
        req = req.set("If-None-Match", e);
    }
    if let Some(m) = &feed.last_modified {
        req = req.set("If-Modified-Since", m);
    }
    let resp = match req.call() {
        Ok(r) => r,
        Err(ureq::Error::Status(code, r)) => {
            return Err(err(format!("HTTP {code} {}", r.status_text())))
        }
        Err(e) => return Err(err(e.to_string())),
    };
    if resp.status() == 304 {
        return Ok(Fetched::NotModified);
    }
    let etag = resp.header("ETag").map(str::to_string);
    let last_modified = resp.header("Last-Modified").map(str::to_string);
    let mut bytes = Vec::new();
    resp.into_reader()
        .take(MAX_FEED_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| err(e.to_string()))?;
    if bytes.len() as u64 > MAX_FEED_BYTES {
        return Err(err(format!("larger than {} MB", MAX_FEED_BYTES >> 20)));
    }
    Ok(Fetched::Body {
        bytes,
        etag,
        last_modified,
    })
}

/// The entries of a feed as documents: title, link, publication (or update)
/// time, and the visible text of the content or summary. Entries with no
/// text at all are left out.
pub fn parse(bytes: &[u8], url: &str) -> Result<Vec<Document>, FeedError> {
    let feed = feed_rs::parser::parse(bytes).map_err(|e| FeedError::Parse {
        url: url.into(),
        reason: e.to_string(),
    })?;
    let mut out = Vec::new();
    for e in feed.entries {
        let title = e.title.map(|t| html_text(&t.content).1).unwrap_or_default();
        let body = e
            .content
            .and_then(|c| c.body)
            .or_else(|| e.summary.map(|s| s.content))
            .map(|h| html_text(&h).1)
            .unwrap_or_default();
        let text = match (title.is_empty(), body.is_empty()) {
            (_, true) => title.clone(),
            (true, false) => body,
            (false, false) => format!("{title}\n{body}"),
        };
        if text.trim().is_empty() {
            continue;
        }
        let source = e
            .links
            .first()
            .map(|l| l.href.clone())
            .unwrap_or_else(|| url.to_string());
        out.push(Document {
            title: if title.is_empty() {
                source.clone()
            } else {
                title
            },
            source,
            text,
            published: e.published.or(e.updated).map(|t| t.timestamp()),
        });
    }
    Ok(out)
}

/// What polling one feed did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PollOutcome {
    pub kb: String,
    pub url: String,
    /// Documents added (0 for an unchanged feed).
    pub added: usize,
    pub error: Option<String>,
}

/// Poll every feed of the knowledge bases under `root` that is due at `now`
/// (all of them when `force`), or only those of `only`. `add` stores a
/// feed's documents in the named knowledge base. Each feed's state is saved
/// after its poll; the feeds file is re-read first, so feeds added or
/// removed meanwhile (by `hanlin feed add` while a server polls) are kept.
pub fn poll_due(
    root: &Path,
    only: Option<&str>,
    now: i64,
    force: bool,
    timeout: Duration,
    policy: &FetchPolicy,
    mut add: impl FnMut(&str, Vec<Document>) -> Result<AddReport, SearchError>,
) -> Vec<PollOutcome> {
    let mut out = Vec::new();
    for kb in crate::list(root) {
        if only.is_some_and(|o| o != kb) {
            continue;
        }
        let dir = root.join(&kb);
        let due: Vec<Feed> = match load(&dir) {
            Ok(f) => f
                .into_iter()
                .filter(|f| force || f.next_at <= now)
                .collect(),
            Err(e) => {
                tracing::warn!("{kb}: feeds.json: {e}");
                continue;
            }
        };
        for feed in due {
            let result = fetch(&feed, timeout, policy).and_then(|f| match f {
                Fetched::NotModified => Ok((0, None)),
                Fetched::Body {
                    bytes,
                    etag,
                    last_modified,
                } => {
                    // Recorded as failed before the untrusted bytes are
                    // parsed: should parsing ever take the process down, the
                    // feed backs off instead of crashing it again at once
                    // after every restart.
                    let crashed = Err(FeedError::Parse {
                        url: feed.url.clone(),
                        reason: "the server stopped while parsing it".into(),
                    });
                    if let Err(e) = record(&dir, &feed.url, now, feed.failures, crashed) {
                        tracing::warn!("{kb}: saving feeds.json: {e}");
                    }
                    let docs = parse(&bytes, &feed.url)?;
                    let r = add(&kb, docs).map_err(|e| FeedError::Fetch {
                        url: feed.url.clone(),
                        reason: format!("storing its entries: {e}"),
                    })?;
                    Ok((r.added, Some((etag, last_modified))))
                }
            });
            let outcome = PollOutcome {
                kb: kb.clone(),
                url: feed.url.clone(),
                added: result.as_ref().map(|r| r.0).unwrap_or(0),
                error: result.as_ref().err().map(|e| e.to_string()),
            };
            match &outcome.error {
                Some(e) => tracing::warn!("feed {e}"),
                None if outcome.added > 0 => {
                    tracing::info!("feed {}: {} new documents in {kb}", feed.url, outcome.added)
                }
                None => {}
            }
            if let Err(e) = record(&dir, &feed.url, now, feed.failures, result) {
                tracing::warn!("{kb}: saving feeds.json: {e}");
            }
            out.push(outcome);
        }
    }
    out
}

type PollResult = Result<(usize, Option<(Option<String>, Option<String>)>), FeedError>;

/// Store the result of polling `url` (which had failed `failures` times in
/// a row before this poll) in the feeds file.
fn record(
    dir: &Path,
    url: &str,
    now: i64,
    failures: u32,
    result: PollResult,
) -> Result<(), SearchError> {
    let mut feeds = load(dir)?;
    let Some(f) = feeds.iter_mut().find(|f| f.url == url) else {
        return Ok(()); // removed while it was being polled
    };
    f.last_attempt = Some(now);
    match result {
        Ok((added, validators)) => {
            f.last_ok = Some(now);
            f.failures = 0;
            f.last_error = None;
            f.items_added += added as u64;
            f.next_at = now + f.every as i64;
            if let Some((etag, modified)) = validators {
                f.etag = etag;
                f.last_modified = modified;
            }
        }
        Err(e) => {
            f.failures = failures + 1;
            f.last_error = Some(e.to_string());
            f.next_at = now + retry_delay(f.failures, f.every) as i64;
        }
    }
    save(dir, &feeds)
}

#[cfg(test)]
mod tests {
    use super::*;

    const RSS: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<rss version="2.0"><channel><title>新闻</title><link>https://example.com/</link>
<item><title>长江大桥今日通车</title><link>https://example.com/a</link>
<description>&lt;p&gt;长江大桥于今日上午&lt;b&gt;正式通车&lt;/b&gt;。&lt;/p&gt;</description>
<pubDate>Tue, 24 Nov 2026 08:00:00 +0800</pubDate></item>
<item><title></title><description></description></item>
</channel></rss>"#;

    const ATOM: &str = r#"<?xml version="1.0" encoding="utf-8"?>
<feed xmlns="http://www.w3.org/2005/Atom"><title>Changelog</title><id>urn:x</id>
<updated>2026-11-20T10:00:00Z</updated>
<entry><title>Release 2.0</title><id>urn:x:2</id><link href="https://example.com/2.0"/>
<updated>2026-11-20T10:00:00Z</updated><summary>Version 2.0 adds streaming.</summary></entry>
</feed>"#;

    #[test]
    fn rss_and_atom_entries_become_documents() {
        let docs = parse(RSS.as_bytes(), "https://example.com/rss").unwrap();
        assert_eq!(docs.len(), 1, "the empty item is left out");
        assert_eq!(docs[0].title, "长江大桥今日通车");
        assert_eq!(docs[0].source, "https://example.com/a");
        assert!(docs[0].text.contains("正式通车"), "{}", docs[0].text);
        assert!(!docs[0].text.contains("<b>"), "markup removed");
        assert_eq!(docs[0].published, Some(1_795_478_400)); // 2026-11-24T00:00Z
        let docs = parse(ATOM.as_bytes(), "https://example.com/atom").unwrap();
        assert_eq!(docs[0].title, "Release 2.0");
        assert!(docs[0].text.contains("adds streaming"));
        assert_eq!(
            docs[0].published,
            crate::extract::parse_date("2026-11-20T10:00:00Z")
        );
    }

    #[test]
    fn garbage_is_a_parse_error() {
        for bad in [
            "",
            "<html><body>not a feed</body></html>",
            "\u{0}\u{1}binary",
        ] {
            let e = parse(bad.as_bytes(), "http://x.test/f").unwrap_err();
            assert!(matches!(e, FeedError::Parse { .. }), "{bad:?}: {e}");
        }
    }

    #[test]
    fn only_public_addresses_are_public() {
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
        ] {
            assert!(!is_public(a.parse().unwrap()), "{a}");
        }
        for a in ["93.184.216.34", "1.1.1.1", "2606:4700::1111"] {
            assert!(is_public(a.parse().unwrap()), "{a}");
        }
        let p = FetchPolicy::allowing(["10.0.0.5", "intranet.test"]);
        assert!(p.allows_ip("10.0.0.5".parse().unwrap()));
        assert!(!p.allows_ip("10.0.0.6".parse().unwrap()));
        assert!(p.allows_host("intranet.test"));
    }

    #[test]
    fn intervals_and_back_off() {
        assert_eq!(parse_every("10m").unwrap(), 600);
        assert_eq!(parse_every("1h30m").unwrap(), 5400);
        assert!(parse_every("0s").is_err());
        assert!(parse_every("soon").is_err());
        assert_eq!(retry_delay(1, 600), 30);
        assert_eq!(retry_delay(2, 600), 60);
        assert_eq!(retry_delay(5, 600), 480);
        assert_eq!(retry_delay(40, 600), MAX_RETRY_SECS);
        assert_eq!(retry_delay(1, 2), 2, "a 2 s feed retries after 2 s");
        assert_eq!(retry_delay(3, 2), 8);
        assert!(Feed::new("ftp://x/y", 60, 0).is_err());
        assert!(Feed::new("https://example.com/rss", 0, 0).is_err());
    }
}
