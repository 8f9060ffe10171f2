//! The typed boundaries of every route: who is calling, and the body.
//!
//! Who-is-calling extractors run on the request's head, before any body
//! extractor: axum runs `FromRequestParts` extractors first and the one
//! `FromRequest` extractor (the body) last, so a request that fails to
//! authenticate is refused before a byte of its body is read.
//!
//! - [`ApiCaller`]: a bearer API key;
//! - [`KeyOrSession`]: a bearer API key, or a web session acting as the
//!   web app;
//! - [`AdminCaller`]: an admin's key, or an admin's web session (with its
//!   CSRF token for anything but `GET`);
//! - [`WebRead`] / [`WebWrite`]: a web session cookie (writes also carry the
//!   session's CSRF token);
//! - [`Body`] / [`JsonBody`]: the one body reader, with the route's size
//!   limit (`DefaultBodyLimit`) answered by 413.

use crate::error::ApiError;
use crate::AppState;
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode};
use axum_extra::extract::cookie::CookieJar;
use hanlin_accounts::web::Session;
use hanlin_accounts::Caller;
use std::sync::Arc;

/// The caller behind `Authorization: Bearer KEY`.
pub struct ApiCaller(pub Caller);

impl FromRequestParts<Arc<AppState>> for ApiCaller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        st: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        crate::api::auth(st, &parts.headers).await.map(ApiCaller)
    }
}

/// A user by API key, or — with no `Authorization` header — by web
/// session (CSRF-checked unless the method is `GET`), acting as the web
/// app (`Caller::web`): the Files and Batch APIs, which the web app's
/// Batches screen calls too.
pub struct KeyOrSession(pub Caller);

impl FromRequestParts<Arc<AppState>> for KeyOrSession {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        st: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        if parts
            .headers
            .contains_key(axum::http::header::AUTHORIZATION)
        {
            return crate::api::auth(st, &parts.headers).await.map(KeyOrSession);
        }
        let write = parts.method != Method::GET && parts.method != Method::HEAD;
        let s = web_session(parts, st, write).await?;
        crate::web::web_caller(st, &s).await.map(KeyOrSession)
    }
}

/// An admin: by key, or by web session (CSRF-checked unless the method is
/// `GET`).
pub struct AdminCaller(pub hanlin_accounts::User);

impl FromRequestParts<Arc<AppState>> for AdminCaller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        st: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let write = parts.method != Method::GET && parts.method != Method::HEAD;
        crate::admin::admin(st, &parts.headers, write)
            .await
            .map(AdminCaller)
    }
}

async fn web_session(parts: &Parts, st: &AppState, write: bool) -> Result<Session, ApiError> {
    let jar = CookieJar::from_headers(&parts.headers);
    crate::web::session(st, &jar, &parts.headers, write).await
}

/// A signed-in web user (reads).
pub struct WebRead(pub Session);

impl FromRequestParts<Arc<AppState>> for WebRead {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        st: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        web_session(parts, st, false).await.map(WebRead)
    }
}

/// A signed-in web user whose request carries the session's CSRF token.
pub struct WebWrite(pub Session);

impl FromRequestParts<Arc<AppState>> for WebWrite {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        st: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        web_session(parts, st, true).await.map(WebWrite)
    }
}

/// The raw body, within the route's size limit.
pub struct Body(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        Bytes::from_request(req, state)
            .await
            .map(Body)
            .map_err(|e| {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::too_large_body()
                } else {
                    ApiError::bad_request(format!("Could not read the request body: {e}"))
                }
            })
    }
}

/// A JSON body parsed into `T` (unknown fields are refused where `T` says
/// `deny_unknown_fields`).
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let Body(bytes) = Body::from_request(req, state).await?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::bad_request(format!("Invalid request body: {e}")))
    }
}

/// The error for a multipart form that could not be read.
pub fn bad_form(e: axum::extract::multipart::MultipartError) -> ApiError {
    ApiError::bad_request(format!("Could not read the multipart form: {e}"))
}

/// A multipart field's bytes, or `None` as soon as it has more than
/// `limit` of them (the caller says why that is too many).
pub async fn field_bytes(
    field: &mut axum::extract::multipart::Field<'_>,
    limit: usize,
) -> Result<Option<Vec<u8>>, ApiError> {
    let mut bytes = Vec::new();
    while let Some(chunk) = field.chunk().await.map_err(bad_form)? {
        if bytes.len() + chunk.len() > limit {
            return Ok(None);
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(Some(bytes))
}
