//! Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`
//! with the status codes the official clients map to their exception types.

use crate::openai::response::{ErrorBody, ErrorDetail};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    pub retry_after: Option<Duration>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
        }
    }
    /// An error with any status, typed as an invalid request.
    pub fn new_status(status: StatusCode, message: impl Into<String>) -> Self {
        Self::new(status, "invalid_request_error", message)
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }
    pub fn param(mut self, p: &str) -> Self {
        self.param = Some(p.to_string());
        self
    }
    pub fn code(mut self, c: &'static str) -> Self {
        self.code = Some(c);
        self
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "invalid_request_error", message)
            .code("invalid_api_key")
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "invalid_request_error", message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "invalid_request_error", message)
    }
    pub fn model_not_found(model: &str) -> Self {
        Self::not_found(format!(
            "The model `{model}` does not exist or you do not have access to it."
        ))
        .param("model")
        .code("model_not_found")
    }
    pub fn too_large_body() -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "The request body is larger than this endpoint accepts.",
        )
        .code("request_too_large")
    }
    pub fn rate_limited(message: impl Into<String>, code: &'static str, retry: Duration) -> Self {
        let kind = if code == "insufficient_quota" {
            "insufficient_quota"
        } else {
            "requests"
        };
        let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, kind, message).code(code);
        e.retry_after = Some(retry);
        e
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
    }
}

impl From<hanlin_accounts::AccountError> for ApiError {
    fn from(e: hanlin_accounts::AccountError) -> Self {
        tracing::error!("accounts: {e}");
        ApiError::unavailable("The accounts database is unavailable; please retry.")
    }
}

/// `message` with absolute filesystem paths replaced by `…`: a server
/// error's body tells the client what failed, not where the server keeps
/// its files (the log has the full message).
pub fn scrub_paths(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(i) = rest.find('/') {
        let before = &rest[..i];
        let starts_path = before.is_empty()
            || before.ends_with(|c: char| c.is_whitespace() || "\"'(`=:".contains(c));
        let end = rest[i..]
            .find(|c: char| c.is_whitespace() || "\"'`),".contains(c))
            .map_or(rest.len(), |e| i + e);
        let token = &rest[i..end];
        out.push_str(before);
        if starts_path && token[1..].contains('/') {
            out.push('…');
        } else {
            out.push_str(token);
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

impl ApiError {
    /// The body a client sees (no filesystem paths in server errors).
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                message: if self.status.is_server_error() {
                    scrub_paths(&self.message)
                } else {
                    self.message.clone()
                },
                kind: self.kind.to_string(),
                param: self.param.clone(),
                code: self.code.map(str::to_string),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(status = %self.status, "{}", self.message);
        }
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(d) = self.retry_after {
            let secs = d.as_secs().max(1).to_string();
            if let Ok(v) = HeaderValue::from_str(&secs) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        r
    }
}

impl From<hanlin_gateway::GatewayError> for ApiError {
    fn from(e: hanlin_gateway::GatewayError) -> Self {
        use hanlin_accounts::limits::LimitError;
        use hanlin_gateway::GatewayError;
        match e {
            GatewayError::Limit(l) => {
                let code = match l {
                    LimitError::TokensPerDay { .. } | LimitError::ImagesPerDay { .. } => {
                        "insufficient_quota"
                    }
                    _ => "rate_limit_exceeded",
                };
                ApiError::rate_limited(l.to_string(), code, l.retry_after())
            }
            GatewayError::Busy => {
                ApiError::rate_limited(e.to_string(), "server_busy", Duration::from_secs(1))
            }
            GatewayError::Unavailable(_) => ApiError::unavailable(e.to_string()),
            GatewayError::Db(d) => d.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn server_errors_do_not_show_paths() {
        assert_eq!(
            super::scrub_paths("loading qwen: No such file (os error 2): /root/.local/share/hanlin/blobs/sha256-1f2e"),
            "loading qwen: No such file (os error 2): …"
        );
        assert_eq!(
            super::scrub_paths("opening '/srv/kb/docs/index' failed; see /v1/kb"),
            "opening '…' failed; see …"
        );
        // Not a path.
        assert_eq!(super::scrub_paths("3/4 done"), "3/4 done");
    }
}
