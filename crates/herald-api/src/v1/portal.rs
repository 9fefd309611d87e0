//! `POST /api/v1/auth/app-portal-access/{app_id}`: a link an app's own customers open to manage
//! their endpoints in Herald's app portal (`/console/portal`), Svix's shape (`{url, token}`).
//!
//! The link carries a fresh API token scoped to that app and expiring (one hour unless
//! `expiry` says otherwise, at most seven days), in the URL's fragment so it never reaches a
//! server log or a `Referer`. The token is an ordinary app-scoped token: every route already
//! confines it to its app (another app's paths answer 404) and refuses it once expired (401),
//! and it is listed and revocable under `/api/v1/auth/token`.

use std::sync::Arc;

use axum::{
    Json,
    extract::{Path, State},
    http::{HeaderMap, StatusCode, header},
    response::Response,
};
use chrono::Duration;
use herald_core::{TokenId, token};
use herald_store::{ApiToken, TokenScope};
use serde::{Deserialize, Serialize};

use crate::{
    ApiState,
    auth::Caller,
    error::{ApiResult, Validator},
    extract::OptionalSvixJson,
    idempotency::SecretFields,
};

/// How long a link opens the portal when the request does not say.
pub const DEFAULT_EXPIRY_SECS: i64 = 3600;
/// The longest a link may live (Svix's limit too).
pub const MAX_EXPIRY_SECS: i64 = 7 * 24 * 3600;

#[derive(Deserialize, Default, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AppPortalAccessIn {
    /// Seconds the link works for: 1 to 604800 (seven days); 3600 when absent.
    #[serde(default)]
    expiry: Option<i64>,
    /// Named in the token, so the links of one session can be found and revoked together.
    #[serde(default)]
    session_id: Option<String>,
    /// Svix's read-only portal. Herald's portal always lets its visitor manage endpoints, so
    /// only `false` is accepted.
    #[serde(default)]
    read_only: Option<bool>,
    /// Svix's portal features; Herald's portal has none to switch, so only `[]` is accepted.
    #[serde(default)]
    feature_flags: Option<Vec<String>>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct AppPortalAccessOut {
    /// The portal, with the token in the fragment (`#key=`).
    url: String,
    /// The app-scoped token itself, for a portal embedded elsewhere.
    token: String,
}

/// A link to the app portal for one app's customers, with a fresh app-scoped token that
/// expires. The link is built from the request's `Host` (and `X-Forwarded-Proto`).
#[utoipa::path(post, path = "/api/v1/auth/app-portal-access/{app_id}", tag = "Authentication", operation_id = "app_portal_access",
    params(("app_id" = String, Path, description = "The app's id or uid")),
    request_body(content = Option<AppPortalAccessIn>, description = "Optional: the link's expiry and session"),
    responses((status = 200, body = AppPortalAccessOut)))]
pub async fn create(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path(app_id): Path<String>,
    headers: HeaderMap,
    OptionalSvixJson(input): OptionalSvixJson<AppPortalAccessIn>,
) -> ApiResult<Response> {
    caller.require_environment()?;
    let mut v = Validator::default();
    let expiry = input.expiry.unwrap_or(DEFAULT_EXPIRY_SECS);
    v.check(
        &["body", "expiry"],
        if (1..=MAX_EXPIRY_SECS).contains(&expiry) {
            Ok(())
        } else {
            Err(format!(
                "expiry must be 1 to {MAX_EXPIRY_SECS} seconds (7 days), not {expiry}"
            ))
        },
    );
    v.check(
        &["body", "readOnly"],
        if input.read_only == Some(true) {
            Err("read-only portal links are not supported: the portal lets its visitor manage the app's endpoints")
        } else {
            Ok(())
        },
    );
    v.check(
        &["body", "featureFlags"],
        match &input.feature_flags {
            Some(flags) if !flags.is_empty() => Err(format!(
                "Herald's portal has no feature flags to switch ({})",
                flags.join(", ")
            )),
            _ => Ok(()),
        },
    );
    if let Some(session) = &input.session_id {
        v.check(
            &["body", "sessionId"],
            if session.is_empty() || session.chars().count() > 128 {
                Err("sessionId must be 1 to 128 characters")
            } else {
                Ok(())
            },
        );
    }
    let base = base_url(&state, &headers);
    v.check(
        &["header", "host"],
        match &base {
            Some(_) => Ok(()),
            None => Err("the request's Host header must name this server (host or host:port)"),
        },
    );
    v.finish()?;
    let app = caller.app(&state, &app_id).await?;
    let now = crate::now();
    let record = ApiToken {
        id: TokenId::new(now),
        name: match &input.session_id {
            Some(session) => format!("app portal (session {session})"),
            None => "app portal".to_owned(),
        },
        scope: TokenScope::Portal(app.id.clone()),
        created_at: now,
        expires_at: Some(now + Duration::seconds(expiry)),
    };
    let secret = token::generate();
    state
        .store
        .add_token(&record, &token::hash(&secret))
        .await?;
    tracing::info!(app = %app.id, token = %record.id, expiry, "app portal link created");
    let base = base.unwrap_or_default();
    // A live app token, in both fields: the idempotency table keeps neither.
    Ok(SecretFields(&["/url", "/token"]).mark((
        StatusCode::OK,
        Json(AppPortalAccessOut {
            url: format!("{base}/console/portal#key={secret}"),
            token: secret,
        }),
    )))
}

/// Svix's deprecated `authentication.dashboardAccess`, which older SDKs still call: the same
/// link as `app-portal-access` (Svix's takes no body; the same optional one is read here).
#[utoipa::path(post, path = "/api/v1/auth/dashboard-access/{app_id}", tag = "Authentication", operation_id = "dashboard_access",
    params(("app_id" = String, Path, description = "The app's id or uid")),
    request_body(content = Option<AppPortalAccessIn>, description = "Optional: the link's expiry and session"),
    responses((status = 200, body = AppPortalAccessOut)))]
pub async fn dashboard_access(
    state: State<Arc<ApiState>>,
    caller: Caller,
    app_id: Path<String>,
    headers: HeaderMap,
    input: OptionalSvixJson<AppPortalAccessIn>,
) -> ApiResult<Response> {
    create(state, caller, app_id, headers, input).await
}

/// This server as the caller reached it: the Host header, with the scheme a proxy reports
/// (`X-Forwarded-Proto`) or the listener's own. `None` for a missing or odd Host.
fn base_url(state: &ApiState, headers: &HeaderMap) -> Option<String> {
    let host = headers.get(header::HOST)?.to_str().ok()?;
    let plausible = !host.is_empty()
        && host.len() <= 255
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]_".contains(&b));
    if !plausible {
        return None;
    }
    let scheme = match headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
    {
        Some("https") => "https",
        Some("http") => "http",
        _ if state.tls => "https",
        _ => "http",
    };
    Some(format!("{scheme}://{host}"))
}

/// This module's part of `/openapi.json`.
#[derive(utoipa::OpenApi)]
#[openapi(paths(create, dashboard_access))]
pub(crate) struct Docs;
