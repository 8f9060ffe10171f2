//! What stands between a stranger and the server: the client's address
//! (behind trusted proxies), sign-in throttling, and the `Host` check that
//! keeps DNS-rebinding pages away from the web app.

use crate::error::ApiError;
use crate::AppState;
use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Whether `a` and `b` are equal, in time that does not depend on where
/// they differ (secrets: CSRF tokens, the setup token, the metrics token).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The token of an `Authorization: Bearer TOKEN` header (`""` when there
/// is none or it is not of that form).
pub fn bearer(headers: &HeaderMap) -> &str {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or("")
}

/// The client's address: the connection's peer, or — when the peer is a
/// trusted proxy — the nearest address in `X-Forwarded-For` that is not one.
pub struct ClientAddr(pub IpAddr);

impl FromRequestParts<Arc<AppState>> for ClientAddr {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        st: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<PeerAddr>>()
            .map(|c| c.0 .0.ip())
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        Ok(ClientAddr(client_addr(
            peer,
            &parts.headers,
            &st.config.trusted_proxies,
        )))
    }
}

/// `peer`, unless it is a trusted proxy: then the rightmost address of
/// `X-Forwarded-For` that is not a trusted proxy (the ones left of it were
/// written by the client and prove nothing).
pub fn client_addr(peer: IpAddr, headers: &HeaderMap, trusted: &[IpAddr]) -> IpAddr {
    if !trusted.contains(&peer) {
        return peer;
    }
    let hops: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|a| a.trim().parse().ok())
        .collect();
    hops.into_iter()
        .rev()
        .find(|a| !trusted.contains(a))
        .unwrap_or(peer)
}

/// Failed sign-ins are counted per (account name, client address): after
/// [`FREE_FAILURES`] in a row, each further attempt from that address for
/// that name waits twice as long as the last (1 s, 2 s, … at most 15
/// minutes). An attacker elsewhere cannot lock the real user out, and the
/// count is forgotten after a success.
#[derive(Default)]
pub struct Throttle {
    failures: Mutex<HashMap<(String, IpAddr), (u32, Instant)>>,
}

pub const FREE_FAILURES: u32 = 5;
const MAX_WAIT: Duration = Duration::from_secs(15 * 60);
/// Entries idle longer than this are dropped when the table grows.
const FORGET_AFTER: Duration = Duration::from_secs(3600);
const MAX_ENTRIES: usize = 100_000;

impl Throttle {
    fn wait_after(failures: u32) -> Duration {
        if failures < FREE_FAILURES {
            return Duration::ZERO;
        }
        let exp = (failures - FREE_FAILURES).min(20);
        Duration::from_secs(1u64 << exp).min(MAX_WAIT)
    }

    /// How long `name` from `addr` must still wait before trying again.
    pub fn wait(&self, name: &str, addr: IpAddr) -> Option<Duration> {
        let map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let (n, last) = map.get(&(name.to_string(), addr))?;
        let until = *last + Self::wait_after(*n);
        until
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
    }

    pub fn failed(&self, name: &str, addr: IpAddr) {
        let mut map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_ENTRIES {
            let now = Instant::now();
            map.retain(|_, (_, t)| now.duration_since(*t) < FORGET_AFTER);
        }
        let e = map
            .entry((name.to_string(), addr))
            .or_insert((0, Instant::now()));
        e.0 += 1;
        e.1 = Instant::now();
    }

    pub fn succeeded(&self, name: &str, addr: IpAddr) {
        let mut map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        map.remove(&(name.to_string(), addr));
    }
}

/// Requests that carry no credentials, and requests whose credentials are
/// refused (401), spend their client address's allowance: a token bucket
/// of `per_minute` requests, refilled continuously. When it is spent, every
/// request from that address is answered 429 before any work (key lookups
/// included) until it refills. Signed-in users and API keys that work never
/// spend it, nor do channel callbacks (`/wechat/…`, signed by the platform)
/// unless refused (403, 404). `/health` (probes) is not counted.
pub struct AnonLimit {
    per_minute: u32,
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

impl AnonLimit {
    /// `per_minute == 0` turns the limit off.
    pub fn new(per_minute: u32) -> Self {
        Self {
            per_minute,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    fn level(&self, (tokens, at): (f64, Instant), now: Instant) -> f64 {
        let cap = self.per_minute as f64;
        (tokens + now.duration_since(at).as_secs_f64() * cap / 60.0).min(cap)
    }

    /// How long `addr` must wait when its allowance is spent.
    pub fn spent(&self, addr: IpAddr) -> Option<Duration> {
        if self.per_minute == 0 {
            return None;
        }
        let map = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let level = self.level(*map.get(&addr)?, Instant::now());
        (level < 1.0)
            .then(|| Duration::from_secs_f64((1.0 - level) * 60.0 / self.per_minute as f64))
    }

    /// Spend one request of `addr`'s allowance.
    pub fn spend(&self, addr: IpAddr) {
        if self.per_minute == 0 {
            return;
        }
        let now = Instant::now();
        let mut map = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_ENTRIES {
            // Full buckets carry no information.
            let cap = self.per_minute as f64;
            map.retain(|_, b| self.level(*b, now) < cap);
        }
        let b = map
            .get(&addr)
            .copied()
            .unwrap_or((self.per_minute as f64, now));
        map.insert(addr, ((self.level(b, now) - 1.0).max(0.0), now));
    }
}

/// Middleware on every route: see [`AnonLimit`].
pub async fn limit_anonymous(
    State(st): State<Arc<AppState>>,
    ClientAddr(addr): ClientAddr,
    req: Request,
    next: Next,
) -> Response {
    if req.uri().path() == "/health" {
        return next.run(req).await;
    }
    if let Some(wait) = st.anon.spent(addr) {
        let secs = wait.as_secs().max(1);
        return ApiError::rate_limited(
            format!("Too many requests without valid credentials from this address; try again in {secs} s."),
            "unauthenticated_rate_limit",
            wait,
        )
        .into_response();
    }
    let credentials = !bearer(req.headers()).is_empty()
        || axum_extra::extract::cookie::CookieJar::from_headers(req.headers())
            .get(crate::web::COOKIE)
            .is_some();
    // A channel's callbacks are signed by the platform (which sends many
    // from few addresses): only a refused one counts.
    let signed = req.uri().path().starts_with("/wechat/");
    if !credentials && !signed {
        st.anon.spend(addr);
    }
    let r = next.run(req).await;
    let refused = (credentials && r.status() == axum::http::StatusCode::UNAUTHORIZED)
        || (signed
            && !credentials
            && matches!(
                r.status(),
                axum::http::StatusCode::FORBIDDEN | axum::http::StatusCode::NOT_FOUND
            ));
    if refused {
        st.anon.spend(addr);
    }
    r
}

/// The host name of a `Host` header value (without the port; IPv6
/// literals keep their brackets).
fn host_name(host: &str) -> &str {
    if host.starts_with('[') {
        return host
            .split_once(']')
            .map_or(host, |(h, _)| &host[..h.len() + 1]);
    }
    host.rsplit_once(':')
        .filter(|(_, p)| p.chars().all(|c| c.is_ascii_digit()))
        .map_or(host, |(h, _)| h)
}

/// Whether the web app may answer a request for `host`: IP literals (no
/// DNS name can be rebound to them), `localhost`, and the names an admin
/// allowed (`--allowed-hosts`).
pub fn host_allowed(host: &str, allowed: &[String]) -> bool {
    let name = host_name(host.trim());
    let bare = name.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<IpAddr>().is_ok()
        || bare.eq_ignore_ascii_case("localhost")
        || allowed
            .iter()
            .any(|a| a == "*" || a.eq_ignore_ascii_case(bare))
}

/// Middleware on the web app's routes: a page served from a DNS name that
/// was rebound to this server (to reach a server on loopback from a web
/// page elsewhere) is refused.
pub async fn check_host(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !host_allowed(host, &st.config.allowed_hosts) {
        return ApiError::forbidden(format!(
            "This server does not answer for the host name {:?}; an admin can allow it with --allowed-hosts.",
            host_name(host)
        ))
        .code("host_not_allowed")
        .into_response();
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        let allowed = vec!["chat.example.com".to_string()];
        for ok in [
            "127.0.0.1:8080",
            "localhost:8080",
            "LOCALHOST",
            "[::1]:8080",
            "192.168.1.20",
            "chat.example.com",
            "Chat.Example.com:443",
        ] {
            assert!(host_allowed(ok, &allowed), "{ok}");
        }
        for bad in [
            "attacker.test:8080",
            "localhost.attacker.test",
            "",
            "chat.example.com.evil",
        ] {
            assert!(!host_allowed(bad, &allowed), "{bad}");
        }
    }

    #[test]
    fn forwarded_addresses_only_from_trusted_proxies() {
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "6.6.6.6, 203.0.113.9".parse().unwrap());
        // Not from the proxy: the header is the client's own claim.
        let peer: IpAddr = "198.51.100.7".parse().unwrap();
        assert_eq!(client_addr(peer, &h, &[proxy]), peer);
        // From the proxy: the address it saw (the rightmost), not the spoofed one.
        assert_eq!(
            client_addr(proxy, &h, &[proxy]),
            "203.0.113.9".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn throttle_backs_off_per_name_and_address() {
        let t = Throttle::default();
        let (a, b): (IpAddr, IpAddr) = ("1.2.3.4".parse().unwrap(), "5.6.7.8".parse().unwrap());
        for _ in 0..FREE_FAILURES {
            assert!(t.wait("root", a).is_none());
            t.failed("root", a);
        }
        assert!(t.wait("root", a).is_some());
        // Another address, or another name, is not held back.
        assert!(t.wait("root", b).is_none());
        assert!(t.wait("alice", a).is_none());
        t.succeeded("root", a);
        assert!(t.wait("root", a).is_none());
        assert_eq!(Throttle::wait_after(FREE_FAILURES + 40), MAX_WAIT);
    }

    #[test]
    fn anonymous_allowance_is_per_address_and_refills() {
        let l = AnonLimit::new(3);
        let (a, b): (IpAddr, IpAddr) = ("1.2.3.4".parse().unwrap(), "5.6.7.8".parse().unwrap());
        for _ in 0..3 {
            assert!(l.spent(a).is_none());
            l.spend(a);
        }
        let wait = l.spent(a).expect("spent after three");
        assert!(wait <= Duration::from_secs(20), "{wait:?}");
        assert!(l.spent(b).is_none());
        // Refilled at 3 a minute: one back after 20 s.
        let mut map = l.buckets.lock().unwrap();
        let e = map.get_mut(&a).unwrap();
        e.1 -= Duration::from_secs(21);
        drop(map);
        assert!(l.spent(a).is_none());
        assert!(AnonLimit::new(0).spent(a).is_none());
    }
}

/// Limits on connections, enforced where they are accepted.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Open connections in all.
    pub max: usize,
    /// Open connections from one client address.
    pub per_addr: usize,
    /// A connection that neither sends nor is sent anything for this long
    /// while the server waits on it is closed (a client that opens
    /// connections and sends nothing cannot hold them for ever). Not while
    /// one of its requests is being answered ([`hold_busy`]): a
    /// non-streamed answer (an agent loop of several model steps) may take
    /// longer, and nobody writes meanwhile. A request body that stalls is
    /// the body timeout's business.
    pub idle: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        Self {
            max: 1024,
            per_addr: 64,
            idle: Duration::from_secs(300),
        }
    }
}

/// A TCP listener that holds a connection slot (overall and per address)
/// for each connection it hands out, and closes idle ones.
pub struct CappedListener {
    inner: tokio::net::TcpListener,
    limits: ConnLimits,
    slots: Arc<tokio::sync::Semaphore>,
    per_addr: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl CappedListener {
    pub fn new(inner: tokio::net::TcpListener, limits: ConnLimits) -> Self {
        Self {
            inner,
            slots: Arc::new(tokio::sync::Semaphore::new(limits.max.max(1))),
            per_addr: Arc::default(),
            limits,
        }
    }
}

/// One accepted connection: its slots are given back when it closes.
pub struct Conn {
    io: tokio::net::TcpStream,
    _slot: tokio::sync::OwnedSemaphorePermit,
    addr: IpAddr,
    per_addr: Arc<Mutex<HashMap<IpAddr, usize>>>,
    idle: Duration,
    /// Requests on this connection being answered now.
    busy: Busy,
    /// The last read or write. The timer is not moved on every byte (that
    /// costs a trip to the timer wheel per streamed token): when it fires,
    /// it is re-armed from here if the connection was used meanwhile.
    last: std::time::Instant,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        let mut m = self.per_addr.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.addr) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.addr);
            }
        }
    }
}

impl Conn {
    fn touch(&mut self) {
        self.last = std::time::Instant::now();
    }

    /// Whether the connection has been idle too long (polled while the
    /// server waits on it).
    fn expired(&mut self, cx: &mut std::task::Context<'_>) -> bool {
        loop {
            if std::future::Future::poll(self.deadline.as_mut(), cx).is_pending() {
                return false;
            }
            if self.busy.0.load(std::sync::atomic::Ordering::Relaxed) > 0 {
                self.touch();
            }
            let due = self.last + self.idle;
            if due <= std::time::Instant::now() {
                return true;
            }
            // Used since the timer was set: wait out the rest from then.
            self.deadline
                .as_mut()
                .reset(tokio::time::Instant::from_std(due));
        }
    }
}

fn idle_error() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, "idle connection closed")
}

impl tokio::io::AsyncRead for Conn {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let before = buf.filled().len();
        match std::pin::Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    self.touch();
                }
                Poll::Ready(r)
            }
            Poll::Pending if self.expired(cx) => Poll::Ready(Err(idle_error())),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl tokio::io::AsyncWrite for Conn {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        use std::task::Poll;
        match std::pin::Pin::new(&mut self.io).poll_write(cx, buf) {
            Poll::Ready(r) => {
                self.touch();
                Poll::Ready(r)
            }
            Poll::Pending if self.expired(cx) => Poll::Ready(Err(idle_error())),
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl axum::serve::Listener for CappedListener {
    type Io = Conn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            // Wait for a free slot before accepting: beyond the cap, new
            // connections queue in the kernel's backlog.
            let Ok(slot) = self.slots.clone().acquire_owned().await else {
                continue;
            };
            let (io, addr) = match self.inner.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            {
                let mut m = self.per_addr.lock().unwrap_or_else(|e| e.into_inner());
                let n = m.entry(addr.ip()).or_insert(0);
                if *n >= self.limits.per_addr {
                    tracing::warn!(client = %addr.ip(), "too many connections from one address");
                    continue; // dropping `io` closes it
                }
                *n += 1;
            }
            let _ = io.set_nodelay(true);
            let idle = self.limits.idle;
            let conn = Conn {
                io,
                _slot: slot,
                addr: addr.ip(),
                per_addr: self.per_addr.clone(),
                idle,
                busy: Busy::default(),
                last: std::time::Instant::now(),
                deadline: Box::pin(tokio::time::sleep(idle)),
            };
            return (conn, addr);
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// How many requests of one connection are being answered.
#[derive(Debug, Clone, Default)]
pub struct Busy(Arc<std::sync::atomic::AtomicUsize>);

/// The connection's peer, as axum's `ConnectInfo` (from either listener),
/// and its [`Busy`] count (a [`CappedListener`]'s connections only).
#[derive(Debug, Clone)]
pub struct PeerAddr(pub SocketAddr, pub Option<Busy>);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, CappedListener>>
    for PeerAddr
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, CappedListener>) -> Self {
        PeerAddr(*stream.remote_addr(), Some(stream.io().busy.clone()))
    }
}

/// A request body that notes when it has been read to its end.
struct NoteEnd {
    inner: axum::body::Body,
    read: Arc<std::sync::atomic::AtomicBool>,
}

impl http_body::Body for NoteEnd {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let p = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(p, std::task::Poll::Ready(None)) || self.inner.is_end_stream() {
            self.read.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        p
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A request answered before its body was read to the end (refused by
/// authentication, a limit, a bad header …) leaves the rest of the body
/// in the connection, which hyper then closes without a word; a client
/// that reuses it for its next request loses that request. Such answers
/// say `Connection: close`, so the client opens a new connection.
pub async fn close_if_body_unread(req: Request, next: Next) -> Response {
    use http_body::Body as _;
    if req.body().is_end_stream() || req.version() >= axum::http::Version::HTTP_2 {
        return next.run(req).await;
    }
    let read = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let req = req.map(|inner| {
        axum::body::Body::new(NoteEnd {
            inner,
            read: read.clone(),
        })
    });
    let mut r = next.run(req).await;
    if !read.load(std::sync::atomic::Ordering::Relaxed) {
        r.headers_mut().insert(
            header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    r
}

/// Counts the request as its connection's work until its handler has
/// answered (or was dropped), so the idle timer leaves the connection be.
pub async fn hold_busy(req: Request, next: Next) -> Response {
    struct Held(Busy);
    impl Drop for Held {
        fn drop(&mut self) {
            self.0 .0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let held = req
        .extensions()
        .get::<ConnectInfo<PeerAddr>>()
        .and_then(|c| c.0 .1.clone())
        .map(|b| {
            b.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Held(b)
        });
    let r = next.run(req).await;
    drop(held);
    r
}

impl
    axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, tokio::net::TcpListener>>
    for PeerAddr
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, tokio::net::TcpListener>) -> Self {
        PeerAddr(*stream.remote_addr(), None)
    }
}
