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
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip())
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
}
