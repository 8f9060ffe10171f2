//! The page itself: `web/` embedded in the binary, served with a strict
//! Content-Security-Policy.

use super::*;

#[derive(rust_embed::Embed)]
#[folder = "web/"]
struct Assets;

/// Scripts only from this origin, no inline script, no framing: even text
/// that slipped past the sanitiser could not run.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; font-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'";

fn asset(path: &str) -> Response {
    let Some(file) = Assets::get(path) else {
        return ApiError::not_found(format!("No asset {path:?}.")).into_response();
    };
    let mime = file.metadata.mimetype().to_string();
    let cache = if path == "index.html" {
        "no-cache"
    } else {
        "public, max-age=3600"
    };
    let mut r = Response::new(Body::from(file.data.into_owned()));
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&mime) {
        h.insert(header::CONTENT_TYPE, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    r
}

pub async fn index() -> Response {
    asset("index.html")
}

pub async fn static_file(Path(path): Path<String>) -> Response {
    if path.split('/').any(|s| s == ".." || s.is_empty()) {
        return ApiError::not_found("No such asset.").into_response();
    }
    asset(&path)
}
