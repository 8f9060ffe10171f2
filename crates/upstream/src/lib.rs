//! Models served by other OpenAI-compatible servers (vLLM, SGLang,
//! llama-server, other Hanlin nodes). The server authenticates, applies
//! plans and meters; this crate only routes and reads:
//!
//! - a [`Pool`] per model: its nodes, each with the requests it has in
//!   flight and a circuit breaker (open after [`FAILURES_TO_OPEN`]
//!   failures in a row, one trial request after the cool-down, closed by a
//!   success or a passing health check);
//! - [`Pool::send`] picks the node with the fewest requests in flight —
//!   or, for a conversation seen before, the node that answered it (its
//!   prefix cache), unless that node is much busier — and tries the next
//!   node when one fails *before anything was passed on*: a connection
//!   refused, a timeout, a 5xx or 429, or a stream that ends or turns to
//!   garbage before its first event. A client error (other 4xx) is the
//!   caller's and is returned as is;
//! - [`Stream`] yields a streamed answer's events with an idle timeout; a
//!   stream cut after its first event is an error the caller reports to
//!   its client (it cannot be retried: text went out).

pub mod sse;

use futures::StreamExt;
use serde::Deserialize;
use serde_json::Value;
use sse::{SseEvent, SseParser};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Failures in a row that open a node's circuit.
pub const FAILURES_TO_OPEN: u32 = 3;
/// The largest JSON body read from an upstream.
pub const MAX_BODY: usize = 16 << 20;
/// Conversations whose node is remembered (prefix affinity).
const AFFINITY_ENTRIES: usize = 16_384;

/// `[models.NAME]` with `upstream = [...]` in the settings file.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Base URLs of the nodes, each ending in `/v1` (or wherever their
    /// `/chat/completions` is).
    pub urls: Vec<String>,
    /// Sent as `Authorization: Bearer KEY` to every node.
    #[serde(default)]
    pub api_key: Option<String>,
    /// The model's name on the nodes (default: the name it is served as here).
    #[serde(default)]
    pub model: Option<String>,
    /// `max_tokens` when a request names none (and the most it may name).
    #[serde(default = "default_max_tokens")]
    pub max_tokens: u32,
    /// Seconds to the response's headers and first event.
    #[serde(default = "default_first_byte")]
    pub first_byte_secs: u64,
    /// Seconds between two events of a stream.
    #[serde(default = "default_idle")]
    pub idle_secs: u64,
    /// Seconds an opened circuit waits before a trial request.
    #[serde(default = "default_cooldown")]
    pub cooldown_secs: u64,
    /// Tokens a chat template may add around the messages' text (role
    /// markers, a default system prompt): part of the most prompt tokens a
    /// node's usage may claim.
    #[serde(default = "default_template_tokens")]
    pub template_tokens: u32,
    /// A model in the local store whose tokenizer counts this model's
    /// tokens when a node reports no usage (the same tokenizer family).
    #[serde(default)]
    pub tokenizer: Option<String>,
}

fn default_max_tokens() -> u32 {
    1024
}
fn default_first_byte() -> u64 {
    60
}
fn default_idle() -> u64 {
    60
}
fn default_cooldown() -> u64 {
    10
}
fn default_template_tokens() -> u32 {
    128
}

impl UpstreamConfig {
    /// Settings with these nodes and the defaults.
    pub fn new(urls: Vec<String>) -> Self {
        Self {
            urls,
            api_key: None,
            model: None,
            max_tokens: default_max_tokens(),
            first_byte_secs: default_first_byte(),
            idle_secs: default_idle(),
            cooldown_secs: default_cooldown(),
            template_tokens: default_template_tokens(),
            tokenizer: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No node could take the request (every one failed or is open).
    #[error("no upstream server of model {model} could answer ({last})")]
    Unavailable { model: String, last: String },
    /// A node refused the request itself (a client error, not retried).
    #[error("the upstream server refused the request ({status}): {message}")]
    Refused {
        status: u16,
        message: String,
        body: Option<Value>,
    },
    /// A stream broke after its first event.
    #[error("the upstream server {node} {what}")]
    Broken { node: String, what: String },
    #[error("settings of upstream model {0}: {1}")]
    Config(String, String),
}

/// One node of a pool.
#[derive(Debug)]
pub struct Node {
    pub url: String,
    outstanding: AtomicUsize,
    /// Attempts that failed here (each was retried on another node, or
    /// the request failed), since start.
    failed_attempts: std::sync::atomic::AtomicU64,
    health: Mutex<Health>,
}

#[derive(Debug, Default)]
struct Health {
    failures: u32,
    open_until: Option<Instant>,
    trial: bool,
}

impl Node {
    /// Requests in flight on this node.
    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::SeqCst)
    }

    /// Attempts that failed on this node since start.
    pub fn failed_attempts(&self) -> u64 {
        self.failed_attempts.load(Ordering::Relaxed)
    }

    /// Whether the circuit is closed (requests go to it freely).
    pub fn healthy(&self) -> bool {
        self.health().open_until.is_none()
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// May take a request now: closed, or open with its cool-down over and
    /// no trial in flight.
    fn usable(&self, now: Instant) -> bool {
        let h = self.health();
        match h.open_until {
            None => true,
            Some(t) => now >= t && !h.trial,
        }
    }

    fn success(&self) {
        let mut h = self.health();
        if h.open_until.is_some() {
            tracing::info!(node = %self.url, "upstream is back");
        }
        *h = Health::default();
    }

    fn failure(&self, cooldown: Duration, why: &str) {
        let mut h = self.health();
        h.failures += 1;
        h.trial = false;
        if h.failures >= FAILURES_TO_OPEN || h.open_until.is_some() {
            if h.open_until.is_none() {
                tracing::warn!(node = %self.url, "upstream taken out after {} failures: {why}", h.failures);
            }
            h.open_until = Some(Instant::now() + cooldown);
        }
    }
}

/// Counts a request in flight on a node until dropped.
#[derive(Debug)]
pub struct InFlight(Arc<Node>);

impl InFlight {
    fn new(node: Arc<Node>) -> Self {
        node.outstanding.fetch_add(1, Ordering::SeqCst);
        Self(node)
    }
    pub fn node(&self) -> &Node {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What a node answered.
pub enum Reply {
    Json { body: Value, node: InFlight },
    Stream(Stream),
}

/// A streamed answer: its events' JSON, in order.
pub struct Stream {
    node: InFlight,
    cooldown: Duration,
    idle: Duration,
    parser: SseParser,
    body: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    first: Option<Value>,
    ended: bool,
}

impl Stream {
    pub fn node(&self) -> &Node {
        self.node.node()
    }

    /// The next event's JSON; `None` after `[DONE]`.
    pub async fn next(&mut self) -> Option<Result<Value, UpstreamError>> {
        if let Some(v) = self.first.take() {
            return Some(Ok(v));
        }
        if self.ended {
            return None;
        }
        match self.read().await {
            Ok(Some(v)) => Some(Ok(v)),
            Ok(None) => {
                self.ended = true;
                self.node.0.success();
                None
            }
            Err(what) => {
                self.ended = true;
                self.node.0.failure(self.cooldown, &what);
                Some(Err(UpstreamError::Broken {
                    node: self.node.0.url.clone(),
                    what,
                }))
            }
        }
    }

    /// The next data event as JSON (`Ok(None)`: `[DONE]`), or why not.
    async fn read(&mut self) -> Result<Option<Value>, String> {
        loop {
            if let Some(ev) = self.parser.next_event() {
                return match ev {
                    SseEvent::Done => Ok(None),
                    SseEvent::Data(d) => serde_json::from_str(&d)
                        .map(Some)
                        .map_err(|_| format!("sent an event that is not JSON: {}", clip(&d))),
                };
            }
            match tokio::time::timeout(self.idle, self.body.next()).await {
                Err(_) => {
                    return Err(format!(
                        "sent nothing for {} s in the middle of an answer",
                        self.idle.as_secs()
                    ))
                }
                Ok(None) => {
                    return match self.parser.finish() {
                        Some(SseEvent::Data(d)) => serde_json::from_str(&d)
                            .map(Some)
                            .map_err(|_| format!("sent an event that is not JSON: {}", clip(&d))),
                        Some(SseEvent::Done) => Ok(None),
                        None => Err("closed the stream before it ended".into()),
                    }
                }
                Ok(Some(Err(e))) => return Err(format!("broke the stream: {e}")),
                Ok(Some(Ok(bytes))) => self.parser.push(&bytes).map_err(|e| e.to_string())?,
            }
        }
    }
}

fn clip(s: &str) -> String {
    let mut end = s.len().min(120);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// The nodes that serve one model.
pub struct Pool {
    /// The model's name here.
    pub model: String,
    pub config: UpstreamConfig,
    nodes: Vec<Arc<Node>>,
    client: reqwest::Client,
    affinity: Mutex<Affinity>,
    turn: AtomicUsize,
}

/// Conversation → the node that last answered it, bounded (oldest out).
#[derive(Default)]
struct Affinity {
    map: HashMap<u64, usize>,
    order: std::collections::VecDeque<u64>,
}

impl Affinity {
    fn remember(&mut self, key: u64, node: usize) {
        if self.map.insert(key, node).is_none() {
            self.order.push_back(key);
            if self.order.len() > AFFINITY_ENTRIES {
                if let Some(old) = self.order.pop_front() {
                    self.map.remove(&old);
                }
            }
        }
    }
}

/// Why one attempt failed, and whether it counts against the node.
struct Failure {
    message: String,
    node_fault: bool,
}

impl Pool {
    pub fn new(model: &str, config: UpstreamConfig) -> Result<Self, UpstreamError> {
        if config.urls.is_empty() {
            return Err(UpstreamError::Config(
                model.into(),
                "`upstream` names no server".into(),
            ));
        }
        let mut nodes = Vec::new();
        for u in &config.urls {
            let url = reqwest::Url::parse(u).map_err(|e| {
                UpstreamError::Config(model.into(), format!("{u:?} is not a URL: {e}"))
            })?;
            if !matches!(url.scheme(), "http" | "https") {
                return Err(UpstreamError::Config(
                    model.into(),
                    format!("{u:?} is not an http(s) URL"),
                ));
            }
            nodes.push(Arc::new(Node {
                url: u.trim_end_matches('/').to_string(),
                outstanding: AtomicUsize::new(0),
                failed_attempts: Default::default(),
                health: Mutex::new(Health::default()),
            }));
        }
        // reqwest is built with rustls and no crypto provider of its own
        // (the server's choice); without one installed, building a client
        // panics.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(config.first_byte_secs.clamp(1, 10)))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| UpstreamError::Config(model.into(), e.to_string()))?;
        Ok(Self {
            model: model.into(),
            config,
            nodes,
            client,
            affinity: Mutex::new(Affinity::default()),
            turn: AtomicUsize::new(0),
        })
    }

    pub fn nodes(&self) -> &[Arc<Node>] {
        &self.nodes
    }

    /// The model's name on the nodes.
    pub fn upstream_model(&self) -> &str {
        self.config.model.as_deref().unwrap_or(&self.model)
    }

    fn cooldown(&self) -> Duration {
        Duration::from_secs(self.config.cooldown_secs)
    }

    /// The node for the next attempt: not tried yet, usable; the
    /// conversation's node if it is not much busier than the least busy,
    /// else the least busy (ties in turn).
    fn pick(&self, key: Option<u64>, tried: &[usize]) -> Option<usize> {
        let now = Instant::now();
        let candidates: Vec<usize> = (0..self.nodes.len())
            .filter(|i| !tried.contains(i) && self.nodes[*i].usable(now))
            .collect();
        let least = candidates
            .iter()
            .map(|&i| self.nodes[i].outstanding())
            .min()?;
        let sticky = key.and_then(|k| {
            let a = self.affinity.lock().unwrap_or_else(|e| e.into_inner());
            a.map.get(&k).copied()
        });
        let chosen = match sticky {
            Some(i) if candidates.contains(&i) && self.nodes[i].outstanding() <= least + 2 => i,
            _ => {
                let start = self.turn.fetch_add(1, Ordering::Relaxed);
                let n = candidates.len();
                (0..n)
                    .map(|k| candidates[(start + k) % n])
                    .find(|&i| self.nodes[i].outstanding() == least)?
            }
        };
        let mut h = self.nodes[chosen].health();
        if h.open_until.is_some() {
            h.trial = true;
        }
        Some(chosen)
    }

    /// POST `body` to `path` (`chat/completions`, `completions`,
    /// `embeddings`) on a node, trying the others when one fails before
    /// anything was passed on. `key` is the conversation's prefix (see
    /// [`affinity_key`]).
    pub async fn send(
        &self,
        path: &str,
        body: &Value,
        stream: bool,
        key: Option<u64>,
    ) -> Result<Reply, UpstreamError> {
        let mut tried = Vec::new();
        let mut last = String::from("every server is taken out after failures");
        while let Some(i) = self.pick(key, &tried) {
            tried.push(i);
            let node = InFlight::new(self.nodes[i].clone());
            match self.attempt(&node, path, body, stream).await {
                Ok(reply) => {
                    if let Some(k) = key {
                        self.affinity
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remember(k, i);
                    }
                    return Ok(match reply {
                        Attempt::Json(body) => {
                            node.0.success();
                            Reply::Json { body, node }
                        }
                        Attempt::Stream(parser, body, first) => Reply::Stream(Stream {
                            node,
                            cooldown: self.cooldown(),
                            idle: Duration::from_secs(self.config.idle_secs),
                            parser,
                            body,
                            first: Some(first),
                            ended: false,
                        }),
                    });
                }
                Err(AttemptError::Refused(e)) => {
                    node.0.success();
                    return Err(e);
                }
                Err(AttemptError::Failed(f)) => {
                    tracing::warn!(node = %node.0.url, model = %self.model, "upstream attempt failed: {}", f.message);
                    node.0.failed_attempts.fetch_add(1, Ordering::Relaxed);
                    if f.node_fault {
                        node.0.failure(self.cooldown(), &f.message);
                    } else {
                        node.0.health().trial = false;
                    }
                    last = format!("{}: {}", node.0.url, f.message);
                }
            }
        }
        Err(UpstreamError::Unavailable {
            model: self.model.clone(),
            last,
        })
    }

    async fn attempt(
        &self,
        node: &InFlight,
        path: &str,
        body: &Value,
        stream: bool,
    ) -> Result<Attempt, AttemptError> {
        let first_byte = Duration::from_secs(self.config.first_byte_secs);
        let fail = |message: String| {
            AttemptError::Failed(Failure {
                message,
                node_fault: true,
            })
        };
        let mut req = self
            .client
            .post(format!("{}/{path}", node.0.url))
            .json(body);
        if let Some(k) = &self.config.api_key {
            req = req.bearer_auth(k);
        }
        let deadline = tokio::time::Instant::now() + first_byte;
        let resp = match tokio::time::timeout_at(deadline, req.send()).await {
            Err(_) => return Err(fail(format!("no answer within {} s", first_byte.as_secs()))),
            Ok(Err(e)) => return Err(fail(format!("cannot connect: {e}"))),
            Ok(Ok(r)) => r,
        };
        let status = resp.status();
        if !status.is_success() {
            let text = tokio::time::timeout_at(deadline, read_limited(resp, 64 << 10))
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
            let json: Option<Value> = serde_json::from_slice(&text).ok();
            let message = json
                .as_ref()
                .and_then(|v| v["error"]["message"].as_str().map(String::from))
                .unwrap_or_else(|| clip(&String::from_utf8_lossy(&text)));
            if status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 408 {
                return Err(AttemptError::Failed(Failure {
                    message: format!("{status}: {message}"),
                    // A busy node is not a broken one.
                    node_fault: status.is_server_error(),
                }));
            }
            return Err(AttemptError::Refused(UpstreamError::Refused {
                status: status.as_u16(),
                message,
                body: json,
            }));
        }
        if !stream {
            let bytes = match tokio::time::timeout_at(deadline, read_limited(resp, MAX_BODY)).await
            {
                Err(_) => return Err(fail(format!("no answer within {} s", first_byte.as_secs()))),
                Ok(Err(e)) => return Err(fail(e)),
                Ok(Ok(b)) => b,
            };
            return match serde_json::from_slice::<Value>(&bytes) {
                Ok(v) if v.is_object() => Ok(Attempt::Json(v)),
                _ => Err(fail(format!(
                    "answered with something that is not JSON: {}",
                    clip(&String::from_utf8_lossy(&bytes))
                ))),
            };
        }
        // A stream is passed on from its first event: until then it can
        // still go to another node.
        let mut parser = SseParser::default();
        let mut body = resp.bytes_stream().boxed();
        loop {
            if let Some(ev) = parser.next_event() {
                return match ev {
                    SseEvent::Data(d) => match serde_json::from_str::<Value>(&d) {
                        Ok(v) => Ok(Attempt::Stream(parser, body, v)),
                        Err(_) => Err(fail(format!(
                            "sent an event that is not JSON: {}",
                            clip(&d)
                        ))),
                    },
                    SseEvent::Done => Err(fail("ended the stream before any event".into())),
                };
            }
            match tokio::time::timeout_at(deadline, body.next()).await {
                Err(_) => {
                    return Err(fail(format!(
                        "sent no event within {} s",
                        first_byte.as_secs()
                    )))
                }
                Ok(None) => return Err(fail("closed the stream before any event".into())),
                Ok(Some(Err(e))) => return Err(fail(format!("broke the stream: {e}"))),
                Ok(Some(Ok(b))) => parser.push(&b).map_err(|e| fail(e.to_string()))?,
            }
        }
    }

    /// Check every node once (`GET /models`): a node that answers is
    /// closed again, one that does not counts a failure.
    pub async fn check_health(&self) {
        for node in &self.nodes {
            let mut req = self
                .client
                .get(format!("{}/models", node.url))
                .timeout(Duration::from_secs(5));
            if let Some(k) = &self.config.api_key {
                req = req.bearer_auth(k);
            }
            match req.send().await {
                Ok(r) if r.status().is_success() => node.success(),
                Ok(r) => node.failure(self.cooldown(), &format!("health check: {}", r.status())),
                Err(e) => node.failure(self.cooldown(), &format!("health check: {e}")),
            }
        }
    }
}

enum Attempt {
    Json(Value),
    Stream(
        SseParser,
        futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
        Value,
    ),
}

enum AttemptError {
    Failed(Failure),
    Refused(UpstreamError),
}

async fn read_limited(resp: reqwest::Response, limit: usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| format!("broke the answer: {e}"))?;
        if out.len() + chunk.len() > limit {
            return Err(format!("answered with more than {limit} bytes"));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// A conversation's key for prefix affinity: its first two messages (the
/// system prompt and the first question), which every later turn repeats.
pub fn affinity_key(messages: &[Value]) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    if messages.is_empty() {
        return None;
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for m in messages.iter().take(2) {
        m["role"].as_str().unwrap_or("").hash(&mut h);
        m["content"].to_string().hash(&mut h);
    }
    Some(h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(n: usize) -> Pool {
        let urls = (0..n)
            .map(|i| format!("http://10.0.0.{i}:8000/v1"))
            .collect();
        Pool::new("m", UpstreamConfig::new(urls)).expect("pool")
    }

    #[test]
    fn the_least_busy_node_is_picked_and_a_conversation_stays_put() {
        let p = pool(3);
        let busy = [
            InFlight::new(p.nodes[0].clone()),
            InFlight::new(p.nodes[0].clone()),
            InFlight::new(p.nodes[1].clone()),
        ];
        assert_eq!(p.pick(None, &[]), Some(2));
        // Not twice to a node already tried.
        assert_eq!(p.pick(None, &[2]), Some(1));
        // A conversation answered by node 1 goes back to it while it is at
        // most two requests busier than the least busy…
        p.affinity.lock().expect("lock").remember(7, 1);
        assert_eq!(p.pick(Some(7), &[]), Some(1));
        // …and elsewhere once it is busier than that.
        let more: Vec<_> = (0..2).map(|_| InFlight::new(p.nodes[1].clone())).collect();
        assert_eq!(p.pick(Some(7), &[]), Some(2));
        drop((busy, more));
        assert!(p.nodes.iter().all(|n| n.outstanding() == 0));
    }

    #[test]
    fn failures_take_a_node_out_until_a_trial_succeeds() {
        let p = pool(2);
        let cool = Duration::from_millis(30);
        for _ in 0..FAILURES_TO_OPEN - 1 {
            p.nodes[0].failure(cool, "refused");
        }
        assert!(p.nodes[0].healthy(), "not yet");
        p.nodes[0].failure(cool, "refused");
        assert!(!p.nodes[0].healthy());
        for _ in 0..4 {
            assert_eq!(p.pick(None, &[]), Some(1), "only node 1 while 0 is out");
        }
        std::thread::sleep(cool * 2);
        // After the cool-down: one trial request, not more.
        let trial = p.pick(None, &[1]);
        assert_eq!(trial, Some(0));
        assert_eq!(p.pick(None, &[1]), None, "one trial at a time");
        p.nodes[0].success();
        assert!(p.nodes[0].healthy());
        assert_eq!(p.pick(None, &[1]), Some(0));
    }

    #[test]
    fn settings_name_real_http_servers() {
        assert!(Pool::new("m", UpstreamConfig::new(vec![])).is_err());
        assert!(Pool::new("m", UpstreamConfig::new(vec!["gpu-1:8000".into()])).is_err());
        assert!(Pool::new("m", UpstreamConfig::new(vec!["file:///etc/passwd".into()])).is_err());
        let c: UpstreamConfig =
            serde_json::from_value(serde_json::json!({"urls": ["http://a/v1"], "max_tokens": 9}))
                .expect("config");
        assert_eq!((c.max_tokens, c.idle_secs), (9, 60));
    }

    #[test]
    fn a_conversation_keeps_its_key_as_it_grows() {
        let first = serde_json::json!([{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]);
        let later = serde_json::json!([{"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"}]);
        let other = serde_json::json!([{"role": "system", "content": "s"}, {"role": "user", "content": "q3"}]);
        let key = |v: &Value| affinity_key(v.as_array().expect("array"));
        assert_eq!(key(&first), key(&later));
        assert_ne!(key(&first), key(&other));
    }
}
