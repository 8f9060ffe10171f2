//! Tools from MCP servers (the Model Context Protocol, through `rmcp`).
//!
//! An admin registers servers by name: a streamable-HTTP `url` (config file
//! or admin screen) or a stdio `command` (config file only, so that a
//! stolen admin session cannot run programs). [`Hub`] keeps one connection
//! per server, opened on first use and opened again after a failure; its
//! tools join the request's tools as `SERVER__TOOL`. A child process starts
//! with a cleared environment (only the config's `env`) and dies with its
//! connection. Each server has its own call timeout and output cap, and an
//! allow-list of the plans and users who may use it. A server that is down
//! or speaks garbage gives a short error, never a failed request.

use crate::{Context, Spec, Tool, ToolError};
use futures::future::BoxFuture;
use rmcp::model::{CallToolRequestParams, ContentBlock};
use rmcp::service::{RoleClient, RunningService, ServiceExt};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// Why an MCP server or its registration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum McpError {
    #[error("{0}")]
    Invalid(String),
    #[error("MCP server {server:?} is unreachable: {reason}")]
    Unreachable { server: String, reason: String },
    #[error("there is no MCP server named {0:?}")]
    Unknown(String),
}

/// Separates a server's name from its tool's in the names the model sees.
pub const SEP: &str = "__";

/// One registered server, as the config file's `[mcp.NAME]` table and the
/// admin API write it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Streamable-HTTP endpoint (`http://…/mcp`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// A stdio server: the program and its arguments (config file only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// The child's whole environment (it inherits nothing).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Sent as `Authorization: Bearer …` to an HTTP server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bearer_token: Option<String>,
    /// Each call's limit, and the connection's.
    #[serde(default = "default_timeout_s")]
    pub timeout_s: u64,
    /// A result longer than this is cut.
    #[serde(default = "default_max_output_kb")]
    pub max_output_kb: usize,
    /// Plans whose users may use the server (none listed: every plan).
    #[serde(default)]
    pub plans: Vec<String>,
    /// Users who may use it whatever their plan.
    #[serde(default)]
    pub users: Vec<String>,
}

fn default_timeout_s() -> u64 {
    20
}

fn default_max_output_kb() -> usize {
    16
}

impl ServerConfig {
    /// An HTTP server with the default limits, open to everyone.
    pub fn http(url: impl Into<String>) -> Self {
        Self {
            url: Some(url.into()),
            command: Vec::new(),
            env: BTreeMap::new(),
            bearer_token: None,
            timeout_s: default_timeout_s(),
            max_output_kb: default_max_output_kb(),
            plans: Vec::new(),
            users: Vec::new(),
        }
    }

    /// A stdio server with the default limits, open to everyone.
    pub fn stdio(command: Vec<String>) -> Self {
        Self {
            url: None,
            command,
            ..Self::http("")
        }
    }

    fn check(&self) -> Result<(), McpError> {
        let bad = |m: &str| Err(McpError::Invalid(m.into()));
        match (&self.url, self.command.is_empty()) {
            (Some(_), false) | (None, true) => {
                return bad("an MCP server has either a 'url' or a 'command'")
            }
            (Some(u), true) => {
                let scheme = u.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
                if !matches!(scheme.as_deref(), Some("http" | "https")) || u.len() > 2048 {
                    return bad("an MCP server's 'url' is an http:// or https:// URL");
                }
                if !self.env.is_empty() {
                    return bad("'env' is for stdio servers ('command')");
                }
            }
            (None, false) => {
                if self.bearer_token.is_some() {
                    return bad("'bearer_token' is for HTTP servers ('url')");
                }
            }
        }
        if !(1..=300).contains(&self.timeout_s) {
            return bad("'timeout_s' is 1 to 300");
        }
        if !(1..=1024).contains(&self.max_output_kb) {
            return bad("'max_output_kb' is 1 to 1024");
        }
        Ok(())
    }

    /// Whether `user` on `plan` may use the server.
    pub fn allows(&self, user: &str, plan: &str) -> bool {
        (self.plans.is_empty() && self.users.is_empty())
            || self.plans.iter().any(|p| p == plan)
            || self.users.iter().any(|u| u == user)
    }
}

/// Where a registration came from: the config file's cannot be changed
/// from the admin screen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    Config,
    Admin,
}

/// Which addresses an HTTP server registered from the admin screen may
/// be reached at (host name or address, resolved address).
pub type AddressCheck = Arc<dyn Fn(&str, IpAddr) -> bool + Send + Sync>;

/// A server name: lowercase letters, digits, `-` and `_` (no `__`), 1–32.
pub fn valid_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && !name.contains(SEP)
        && !name.starts_with('_')
        && !name.ends_with('_')
}

struct Conn {
    client: RunningService<RoleClient, ()>,
    tools: Vec<Spec>,
    remote: Vec<String>,
    listed: Instant,
}

/// One registered server and its connection.
pub struct Server {
    pub name: String,
    pub config: ServerConfig,
    pub origin: Origin,
    check: Option<AddressCheck>,
    conn: tokio::sync::Mutex<Option<Conn>>,
}

/// How long a server's tool list is used before it is asked again.
const RELIST: Duration = Duration::from_secs(300);

impl Server {
    fn unreachable(&self, reason: impl std::fmt::Display) -> McpError {
        McpError::Unreachable {
            server: self.name.clone(),
            reason: crate::cap(reason.to_string(), 300),
        }
    }

    /// `e`'s innermost cause (what went wrong, without the layers of
    /// transport and client around it).
    fn cause(&self, e: &(dyn std::error::Error + 'static)) -> McpError {
        let mut inner = e;
        while let Some(s) = inner.source() {
            inner = s;
        }
        // rmcp's messages name its transport's Rust types; keep the part
        // a person can act on.
        let text = inner.to_string();
        let text = text
            .rsplit_once("] error: ")
            .map_or(text.as_str(), |(_, t)| t);
        let text = text.split(", when send ").next().unwrap_or(text);
        let text = text
            .replace(
                "Client error: error sending request for url",
                "cannot connect to",
            )
            .replace("Unexpected content type", "not an MCP answer: content type");
        self.unreachable(text)
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(self.config.timeout_s)
    }

    async fn connect(&self) -> Result<RunningService<RoleClient, ()>, McpError> {
        if let Some(url) = &self.config.url {
            if let Some(check) = &self.check {
                // Checked here for a clear error, and again by the resolver
                // at connection time (a name may resolve differently then).
                let host = host_of(url).ok_or_else(|| self.unreachable("the URL has no host"))?;
                let bare = host.trim_start_matches('[').trim_end_matches(']');
                let ips: Vec<IpAddr> = match bare.parse() {
                    Ok(ip) => vec![ip],
                    Err(_) => tokio::net::lookup_host((bare, 0))
                        .await
                        .map_err(|e| self.unreachable(format!("{host}: {e}")))?
                        .map(|a| a.ip())
                        .collect(),
                };
                if !ips.iter().any(|ip| check(bare, *ip)) {
                    return Err(self.unreachable(format!(
                        "{host} is not a public address (an admin can allow it with --mcp-allow)"
                    )));
                }
            }
            install_tls();
            let mut b = reqwest::Client::builder()
                .no_proxy()
                .redirect(reqwest::redirect::Policy::none())
                .connect_timeout(self.timeout())
                .user_agent(concat!("hanlin/", env!("CARGO_PKG_VERSION")));
            if let Some(check) = &self.check {
                b = b.dns_resolver(Arc::new(Checked(check.clone())));
            }
            let http = b.build().map_err(|e| self.cause(&e))?;
            let mut config =
                rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig::with_uri(
                    url.as_str(),
                )
                .max_json_response_size(self.config.max_output_kb.max(64) << 11)
                .max_sse_event_size(self.config.max_output_kb.max(64) << 11);
            if let Some(t) = &self.config.bearer_token {
                config = config.auth_header(t.clone());
            }
            let transport =
                rmcp::transport::StreamableHttpClientTransport::with_client(http, config);
            ().serve(transport).await.map_err(|e| self.cause(&e))
        } else {
            let (program, args) = self
                .config
                .command
                .split_first()
                .ok_or_else(|| self.unreachable("no command"))?;
            let mut cmd = tokio::process::Command::new(program);
            cmd.args(args)
                .env_clear()
                .envs(&self.config.env)
                .kill_on_drop(true);
            let (transport, _) = rmcp::transport::TokioChildProcess::builder(cmd)
                .stderr(std::process::Stdio::null())
                .spawn()
                .map_err(|e| self.unreachable(format!("{program}: {e}")))?;
            ().serve(transport).await.map_err(|e| self.cause(&e))
        }
    }

    /// The server's tools, connecting (or listing again) when needed.
    pub async fn tools(&self) -> Result<Vec<Spec>, McpError> {
        let mut conn = self.conn.lock().await;
        if let Some(c) = conn.as_ref() {
            if !c.client.is_closed() && c.listed.elapsed() < RELIST {
                return Ok(c.tools.clone());
            }
        }
        *conn = None;
        let opened = tokio::time::timeout(self.timeout(), async {
            let client = self.connect().await?;
            let listed = client
                .peer()
                .list_all_tools()
                .await
                .map_err(|e| self.cause(&e))?;
            Ok::<_, McpError>((client, listed))
        })
        .await
        .map_err(|_| self.unreachable(format!("no answer within {} s", self.config.timeout_s)))??;
        let (client, listed) = opened;
        let mut tools = Vec::new();
        let mut remote = Vec::new();
        for t in listed.into_iter().take(64) {
            let name = format!("{}{SEP}{}", self.name, tool_name(&t.name));
            if name.len() > 64 || tools.iter().any(|s: &Spec| s.name == name) {
                continue;
            }
            let description: String = t
                .description
                .as_deref()
                .or(t.title.as_deref())
                .unwrap_or("")
                .chars()
                .take(1000)
                .collect();
            // The server's text goes into the chat template as template
            // text, so nothing in it may spell a control token.
            tools.push(Spec {
                name,
                description: defang(&description),
                parameters: defang_json(Value::Object((*t.input_schema).clone())),
            });
            remote.push(t.name.to_string());
        }
        *conn = Some(Conn {
            client,
            tools: tools.clone(),
            remote,
            listed: Instant::now(),
        });
        Ok(tools)
    }

    /// The connection's peer and `tool`'s name on the server, connecting
    /// again when the connection broke.
    async fn peer_for(&self, tool: &str) -> Result<(rmcp::Peer<RoleClient>, String), ToolError> {
        for _ in 0..2 {
            {
                let conn = self.conn.lock().await;
                if let Some(c) = conn.as_ref().filter(|c| !c.client.is_closed()) {
                    let i = c
                        .tools
                        .iter()
                        .position(|s| s.name == tool)
                        .ok_or_else(|| ToolError::Unknown(tool.to_string()))?;
                    return Ok((c.client.peer().clone(), c.remote[i].clone()));
                }
            }
            self.tools()
                .await
                .map_err(|e| ToolError::Failed(e.to_string()))?;
        }
        Err(ToolError::Failed(format!(
            "MCP server {} is not connected",
            self.name
        )))
    }

    async fn call(&self, tool: &str, args: Value) -> Result<String, ToolError> {
        let (peer, remote) = self.peer_for(tool).await?;
        let mut params = CallToolRequestParams::new(remote);
        if let Value::Object(m) = args {
            params = params.with_arguments(m);
        }
        let result = match peer.call_tool(params).await {
            Ok(r) => r,
            Err(e) => {
                // Anything but the server's own error answer: the
                // connection is opened again on next use.
                if !matches!(e, rmcp::ServiceError::McpError(_)) {
                    *self.conn.lock().await = None;
                }
                let why = match self.cause(&e) {
                    McpError::Unreachable { reason, .. } => reason,
                    other => other.to_string(),
                };
                return Err(ToolError::Failed(format!(
                    "MCP server {}: {why}",
                    self.name
                )));
            }
        };
        let mut parts: Vec<String> = result
            .content
            .iter()
            .map(|c| match c {
                ContentBlock::Text(t) => t.text.clone(),
                ContentBlock::Image(i) => {
                    format!("[image {}, {} bytes]", i.mime_type, i.data.len() * 3 / 4)
                }
                ContentBlock::Audio(a) => {
                    format!("[audio {}, {} bytes]", a.mime_type, a.data.len() * 3 / 4)
                }
                ContentBlock::Resource(r) => serde_json::to_string(&r.resource).unwrap_or_default(),
                ContentBlock::ResourceLink(l) => format!("[resource {}]", l.uri),
                _ => "[content this client does not read]".to_string(),
            })
            .collect();
        if parts.is_empty() {
            if let Some(s) = &result.structured_content {
                parts.push(s.to_string());
            }
        }
        let text = parts.join("\n");
        if result.is_error == Some(true) {
            Err(ToolError::Failed(text))
        } else {
            Ok(text)
        }
    }
}

/// Make ring the process's TLS crypto provider (reqwest is built without
/// one, so that the tree has one provider: ring, which `ureq` uses too).
/// Idempotent; a process that makes HTTPS clients calls it first.
pub fn install_tls() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// `s` with `<` and `>` as `‹` and `›`: a chat template may print a tool's
/// description as it is, where `<|im_start|>` would be a control token.
fn defang(s: &str) -> String {
    s.replace('<', "‹").replace('>', "›")
}

/// Every string in `v` (keys too) through [`defang`].
fn defang_json(v: Value) -> Value {
    match v {
        Value::String(s) => Value::String(defang(&s)),
        Value::Array(a) => Value::Array(a.into_iter().map(defang_json).collect()),
        Value::Object(o) => Value::Object(
            o.into_iter()
                .map(|(k, v)| (defang(&k), defang_json(v)))
                .collect(),
        ),
        v => v,
    }
}

/// A remote tool's name as the model sees it (after `SERVER__`).
fn tool_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn host_of(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if authority.starts_with('[') {
        authority.split_once(']').map(|(h, _)| format!("{h}]"))?
    } else {
        authority.split(':').next()?.to_string()
    };
    (!host.is_empty()).then_some(host)
}

/// Resolves host names keeping only the addresses the check allows, so the
/// check holds for whatever a name resolves to at connection time.
struct Checked(AddressCheck);

impl reqwest::dns::Resolve for Checked {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let check = self.0.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs: Vec<_> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| check(&host, a.ip()))
                .collect();
            if addrs.is_empty() {
                return Err(format!(
                    "{host} is not a public address (an admin can allow it with --mcp-allow)"
                )
                .into());
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The registered MCP servers.
#[derive(Default)]
pub struct Hub {
    servers: RwLock<BTreeMap<String, Arc<Server>>>,
    check: Option<AddressCheck>,
}

impl Hub {
    /// `check` bounds where servers registered from the admin screen may
    /// be reached (those from the config file are the operator's choice).
    pub fn new(check: Option<AddressCheck>) -> Self {
        Self {
            servers: RwLock::default(),
            check,
        }
    }

    /// Register (or replace) a server. Replacing closes the old one's
    /// connection (and ends its process).
    pub fn set(&self, name: &str, config: ServerConfig, origin: Origin) -> Result<(), McpError> {
        if !valid_name(name) {
            return Err(McpError::Invalid(format!(
                "{name:?}: an MCP server's name is 1 to 32 lowercase letters, digits, '-' or '_'"
            )));
        }
        config.check()?;
        if origin == Origin::Admin && !config.command.is_empty() {
            return Err(McpError::Invalid(
                "stdio MCP servers ('command') are set in the config file only".into(),
            ));
        }
        let mut servers = self.servers.write().unwrap_or_else(|e| e.into_inner());
        if origin == Origin::Admin
            && servers
                .get(name)
                .is_some_and(|s| s.origin == Origin::Config)
        {
            return Err(McpError::Invalid(format!(
                "MCP server {name:?} is set in the config file"
            )));
        }
        let check = match origin {
            Origin::Admin => self.check.clone(),
            Origin::Config => None,
        };
        servers.insert(
            name.to_string(),
            Arc::new(Server {
                name: name.to_string(),
                config,
                origin,
                check,
                conn: tokio::sync::Mutex::new(None),
            }),
        );
        Ok(())
    }

    /// Forget an admin-registered server.
    pub fn remove(&self, name: &str) -> Result<(), McpError> {
        let mut servers = self.servers.write().unwrap_or_else(|e| e.into_inner());
        match servers.get(name) {
            None => Err(McpError::Unknown(name.into())),
            Some(s) if s.origin == Origin::Config => Err(McpError::Invalid(format!(
                "MCP server {name:?} is set in the config file"
            ))),
            Some(_) => {
                servers.remove(name);
                Ok(())
            }
        }
    }

    /// Every server, by name.
    pub fn list(&self) -> Vec<Arc<Server>> {
        let servers = self.servers.read().unwrap_or_else(|e| e.into_inner());
        servers.values().cloned().collect()
    }

    /// The admin-registered servers' settings (what the database keeps).
    pub fn admin_entries(&self) -> BTreeMap<String, ServerConfig> {
        self.list()
            .into_iter()
            .filter(|s| s.origin == Origin::Admin)
            .map(|s| (s.name.clone(), s.config.clone()))
            .collect()
    }

    pub fn get(&self, name: &str) -> Option<Arc<Server>> {
        let servers = self.servers.read().unwrap_or_else(|e| e.into_inner());
        servers.get(name).cloned()
    }

    /// The server a requested name refers to: `SERVER` (all its tools) or
    /// `SERVER__TOOL` (one); `None` when it names no server.
    pub fn resolve(&self, requested: &str) -> Option<(Arc<Server>, Option<String>)> {
        match requested.split_once(SEP) {
            Some((server, _)) => self.get(server).map(|s| (s, Some(requested.to_string()))),
            None => self.get(requested).map(|s| (s, None)),
        }
    }
}

/// One tool of an MCP server.
pub struct McpTool {
    server: Arc<Server>,
    spec: Spec,
}

impl McpTool {
    /// The tools `wanted` names (all when `None`) of `server`.
    pub async fn of(server: &Arc<Server>, wanted: Option<&str>) -> Result<Vec<Self>, McpError> {
        let specs = server.tools().await?;
        let tools: Vec<Self> = specs
            .into_iter()
            .filter(|s| wanted.is_none_or(|w| w == s.name))
            .map(|spec| Self {
                server: server.clone(),
                spec,
            })
            .collect();
        match wanted {
            Some(w) if tools.is_empty() => Err(McpError::Invalid(format!(
                "MCP server {:?} has no tool {w:?}",
                server.name
            ))),
            _ => Ok(tools),
        }
    }
}

impl Tool for McpTool {
    fn spec(&self) -> Spec {
        self.spec.clone()
    }

    fn timeout(&self) -> Option<Duration> {
        Some(self.server.timeout())
    }

    fn max_output(&self) -> Option<usize> {
        Some(self.server.config.max_output_kb << 10)
    }

    fn call<'a>(&'a self, args: Value, _: &'a Context) -> BoxFuture<'a, Result<String, ToolError>> {
        Box::pin(self.server.call(&self.spec.name, args))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_settings_are_checked() {
        assert!(valid_name("weather"));
        assert!(valid_name("my-files_2"));
        for bad in ["", "Weather", "a__b", "_a", "a_", "天气", &"x".repeat(33)] {
            assert!(!valid_name(bad), "{bad}");
        }
        let hub = Hub::new(None);
        let err = |r: Result<(), McpError>| r.expect_err("refused").to_string();
        assert!(err(hub.set("w", ServerConfig::http("ftp://x"), Origin::Admin)).contains("http"));
        // The admin screen cannot register programs.
        assert!(err(hub.set(
            "w",
            ServerConfig::stdio(vec!["/bin/sh".into()]),
            Origin::Admin
        ))
        .contains("config file"));
        let mut c = ServerConfig::http("http://example.com/mcp");
        c.timeout_s = 0;
        assert!(err(hub.set("w", c, Origin::Admin)).contains("timeout_s"));
        hub.set("w", ServerConfig::stdio(vec!["x".into()]), Origin::Config)
            .expect("config");
        // Nor replace or remove what the config file set.
        assert!(
            err(hub.set("w", ServerConfig::http("http://a/"), Origin::Admin))
                .contains("config file")
        );
        assert!(err(hub.remove("w")).contains("config file"));
        assert_eq!(host_of("http://u:p@[::1]:80/x").as_deref(), Some("[::1]"));
        assert_eq!(
            host_of("https://example.com:8443/mcp").as_deref(),
            Some("example.com")
        );
    }

    #[test]
    fn allow_lists() {
        let mut c = ServerConfig::http("http://x/");
        assert!(c.allows("anyone", "free"));
        c.plans = vec!["pro".into()];
        c.users = vec!["alice".into()];
        assert!(c.allows("bob", "pro"));
        assert!(c.allows("alice", "free"));
        assert!(!c.allows("bob", "free"));
    }
}
