//! `/console`: the operator's web console and the app portal, as files built into the binary
//! (`crates/herald-api/console/`, embedded with rust-embed; a debug build reads that folder
//! from disk at each request, so the pages can be edited without rebuilding).
//!
//! The files hold no secrets and are public: the pages ask for an API token (the console) or
//! read one from a portal link's fragment (the portal) and call `/api/v1` with it, so what a
//! visitor sees is exactly what the token may see. A strict Content-Security-Policy keeps
//! everything on this origin: no inline script, nothing fetched from elsewhere.

use axum::{
    body::Body,
    extract::Path,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Redirect, Response},
};
use rust_embed::RustEmbed;

use crate::{
    ApiError,
    routes::{Access, RouteTable},
};

#[derive(RustEmbed)]
#[folder = "console/"]
struct Files;

/// Same origin only; WebSockets (the debug view's Pusher connection) to this host.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; connect-src 'self'; \
     img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'; \
     base-uri 'none'; form-action 'self'";

pub(crate) fn routes() -> RouteTable {
    RouteTable::new()
        .get("/console", Access::Public, to_console)
        .get("/console/", Access::Public, console)
        .get("/console/portal", Access::Public, portal)
        .get("/console/{*file}", Access::Public, file)
}

async fn to_console() -> Redirect {
    Redirect::permanent("/console/")
}

async fn console(headers: HeaderMap) -> Response {
    serve("index.html", &headers)
}

async fn portal(headers: HeaderMap) -> Response {
    serve("portal.html", &headers)
}

async fn file(Path(file): Path<String>, headers: HeaderMap) -> Response {
    serve(&file, &headers)
}

/// A console file by name, for pages served elsewhere (`/docs`).
pub(crate) fn page(name: &str, headers: &HeaderMap) -> Response {
    serve(name, headers)
}

/// One file, revalidated on each load (`no-cache` with its digest as the ETag), so a new
/// build's pages are never mixed with an old build's scripts.
fn serve(name: &str, headers: &HeaderMap) -> Response {
    // A debug build reads from disk: never outside the folder, whatever rust-embed checks.
    let Some(file) = Files::get(name).filter(|_| !name.split('/').any(|part| part == "..")) else {
        return ApiError::not_found("console file").into_response();
    };
    let etag = format!("\"{}\"", hex_digest(&file.metadata.sha256_hash()));
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|tag| tag.trim() == etag));
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        let mut response = Body::from(file.data.into_owned()).into_response();
        if let Ok(mime) = HeaderValue::from_str(file.metadata.mimetype()) {
            response.headers_mut().insert(header::CONTENT_TYPE, mime);
        }
        response
    };
    let h = response.headers_mut();
    if let Ok(etag) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, etag);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

fn hex_digest(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pages the routes name are in the build, and every file is served with its type
    /// and the policy that keeps it on this origin.
    #[test]
    fn the_pages_are_built_in_and_served_with_their_type_and_policy() {
        for page in ["index.html", "portal.html"] {
            assert!(Files::get(page).is_some(), "{page} is embedded");
        }
        let response = serve("index.html", &HeaderMap::new());
        assert_eq!(response.status(), StatusCode::OK);
        let h = response.headers();
        assert_eq!(h[header::CONTENT_TYPE], "text/html");
        assert!(
            h[header::CONTENT_SECURITY_POLICY]
                .to_str()
                .is_ok_and(|csp| csp.contains("script-src 'self'"))
        );
        let etag = h[header::ETAG].clone();
        let mut again = HeaderMap::new();
        again.insert(header::IF_NONE_MATCH, etag);
        assert_eq!(
            serve("index.html", &again).status(),
            StatusCode::NOT_MODIFIED
        );
        assert_eq!(
            serve("no-such-file.js", &HeaderMap::new()).status(),
            StatusCode::NOT_FOUND
        );
    }
}
