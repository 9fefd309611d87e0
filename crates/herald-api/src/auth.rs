//! Bearer-token authentication. The admin token from the configuration and environment-wide
//! tokens in the store may do anything; an app-scoped token may only touch its app. A token
//! past its expiry, or revoked, opens nothing.

use std::sync::Arc;

use axum::{
    extract::FromRequestParts,
    http::{HeaderMap, request::Parts},
};
use herald_core::{model::App, token};
use herald_store::TokenScope;

use crate::{
    ApiState,
    error::{ApiError, ApiResult},
};

pub struct Caller {
    pub scope: TokenScope,
}

impl FromRequestParts<Arc<ApiState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<ApiState>) -> ApiResult<Self> {
        // Middleware that ran before (idempotency) may have authenticated the request already.
        if let Some(scope) = parts.extensions.get::<TokenScope>() {
            return Ok(Self {
                scope: scope.clone(),
            });
        }
        let scope = authenticate(&parts.headers, state).await?;
        Ok(Self { scope })
    }
}

/// The scope of the bearer token in `headers`, or why there is none.
pub(crate) async fn authenticate(headers: &HeaderMap, state: &ApiState) -> ApiResult<TokenScope> {
    let header = headers
        .get(axum::http::header::AUTHORIZATION)
        .ok_or_else(|| {
            ApiError::unauthorized("missing Authorization header (expected `Bearer <token>`)")
        })?;
    let presented = header
        .to_str()
        .ok()
        .and_then(|h| {
            h.strip_prefix("Bearer ")
                .or_else(|| h.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ApiError::unauthorized("Authorization header must be `Bearer <token>`"))?;
    let token_hash = token::hash(presented);
    if let Some(admin) = &state.admin_token_hash
        && token::equal(admin, &token_hash)
    {
        return Ok(TokenScope::Environment);
    }
    let token = state
        .store
        .find_token(&token_hash)
        .await?
        .ok_or_else(|| ApiError::unauthorized("invalid API token (unknown or revoked)"))?;
    if token.expired(chrono::Utc::now()) {
        return Err(ApiError::unauthorized(format!(
            "API token {} expired",
            token.id
        )));
    }
    Ok(token.scope)
}

impl Caller {
    /// Environment-level operations (creating apps, managing event types).
    pub fn require_environment(&self) -> ApiResult<()> {
        match self.scope {
            TokenScope::Environment => Ok(()),
            TokenScope::App(_) | TokenScope::Portal(_) => Err(ApiError::forbidden(
                "this token is limited to one application",
            )),
        }
    }

    /// The app named by id or uid, if this caller may see it. Apps outside the caller's scope
    /// are reported as missing rather than forbidden, so ids cannot be probed.
    pub async fn app(&self, state: &ApiState, id_or_uid: &str) -> ApiResult<App> {
        let app = state
            .store
            .get_app(id_or_uid)
            .await?
            .ok_or_else(|| ApiError::not_found("application"))?;
        match self.scope.app() {
            Some(allowed) if *allowed != app.id => Err(ApiError::not_found("application")),
            _ => Ok(app),
        }
    }
}
