//! `/api/v1/auth/token`: API tokens, environment-wide or scoped to one app, with an optional
//! expiry. Herald's own resource (Svix's server mints JWTs from its CLI instead): only an
//! environment token may manage tokens, so an app's token can never mint itself a successor.
//!
//! The secret is shown once, in the answer to the create request (a replay of it under the
//! same Idempotency-Key leaves it out); the store keeps only its SHA-256 digest. Revoking
//! deletes the token: the next request that presents it is refused.

use std::sync::Arc;

use axum::{
    Json,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    response::Response,
};
use chrono::{DateTime, Utc};
use herald_core::{TokenId, token};
use herald_store::{ApiToken, TokenScope};
use serde::{Deserialize, Serialize};

use crate::{
    ApiState,
    auth::Caller,
    error::{ApiError, ApiResult, Validator},
    extract::{QueryParams, SvixJson},
    idempotency::SecretFields,
    pagination::{self, ListResponse},
};

/// Longest token name accepted, in characters.
const MAX_NAME_CHARS: usize = 256;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TokenIn {
    /// What the token is for ("billing backend", "CI").
    name: String,
    /// The app (id or uid) the token is limited to; left out, the token is environment-wide.
    #[serde(default)]
    app_id: Option<String>,
    /// When the token stops opening anything; left out, it never expires.
    #[serde(default)]
    expires_at: Option<DateTime<Utc>>,
}

/// A token's record (never its secret).
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenOut {
    id: String,
    name: String,
    /// `null` for an environment-wide token.
    app_id: Option<String>,
    /// An app portal link's token: its app's endpoints, messages and attempts only.
    portal: bool,
    created_at: DateTime<Utc>,
    /// `null`: it never expires.
    expires_at: Option<DateTime<Utc>>,
}

impl From<ApiToken> for TokenOut {
    fn from(token: ApiToken) -> Self {
        Self {
            id: token.id.into_string(),
            name: token.name,
            portal: matches!(token.scope, TokenScope::Portal(_)),
            app_id: token.scope.app().map(|app| app.to_string()),
            created_at: token.created_at,
            expires_at: token.expires_at,
        }
    }
}

/// The create answer: the token's record and, this once, its secret.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenCreated {
    #[serde(flatten)]
    record: TokenOut,
    /// The bearer token itself. It cannot be read again: a replay of the answer under the same
    /// Idempotency-Key leaves it out.
    #[schema(required = false)]
    token: String,
}

/// Mints a token, environment-wide or limited to one app; its secret is shown this once.
#[utoipa::path(post, path = "/api/v1/auth/token", tag = "Authentication", request_body = TokenIn,
    responses((status = 201, body = TokenCreated)))]
pub async fn create(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    SvixJson(input): SvixJson<TokenIn>,
) -> ApiResult<Response> {
    caller.require_environment()?;
    let now = crate::now();
    let mut v = Validator::default();
    let name = input.name.trim();
    v.check(
        &["body", "name"],
        if name.is_empty() {
            Err("name must not be empty".to_owned())
        } else if name.chars().count() > MAX_NAME_CHARS {
            Err(format!("name must be at most {MAX_NAME_CHARS} characters"))
        } else {
            Ok(())
        },
    );
    if let Some(at) = input.expires_at {
        v.check(
            &["body", "expiresAt"],
            if at <= now {
                Err("expiresAt must be in the future".to_owned())
            } else {
                Ok(())
            },
        );
    }
    v.finish()?;
    let scope = match &input.app_id {
        None => TokenScope::Environment,
        Some(app) => TokenScope::App(caller.app(&state, app).await?.id),
    };
    let record = ApiToken {
        id: TokenId::new(now),
        name: name.to_owned(),
        scope,
        created_at: now,
        expires_at: input.expires_at.map(truncate_to_millis),
    };
    let secret = token::generate();
    state
        .store
        .add_token(&record, &token::hash(&secret))
        .await?;
    tracing::info!(token = %record.id, name = %record.name, "API token created");
    // A replay of this answer (Idempotency-Key) shows the record without the secret.
    Ok(SecretFields(&["/token"]).mark((
        StatusCode::CREATED,
        Json(TokenCreated {
            record: record.into(),
            token: secret,
        }),
    )))
}

/// The tokens, oldest first; `appId` narrows them to one app's.
#[utoipa::path(get, path = "/api/v1/auth/token", tag = "Authentication",
    params(("appId" = Option<String>, Query, description = "Only this app's tokens (its id or uid)"),
        ("app_id" = Option<String>, Query, description = "The same as `appId`, read when `appId` is absent"),
        crate::pagination::ListParams),
    responses((status = 200, body = ListResponse<TokenOut>)))]
pub async fn list(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    query: QueryParams,
) -> ApiResult<Json<ListResponse<TokenOut>>> {
    caller.require_environment()?;
    let page = pagination::page(&query, false)?;
    let app = match query.str("appId").or_else(|| query.str("app_id")) {
        None => None,
        Some(app) => Some(caller.app(&state, app).await?.id),
    };
    let rows = state.store.list_tokens(&page, app.as_ref()).await?;
    Ok(Json(pagination::list(
        rows,
        &page,
        |t| t.id.to_string(),
        TokenOut::from,
    )))
}

/// One token's record.
#[utoipa::path(get, path = "/api/v1/auth/token/{token_id}", tag = "Authentication", params(("token_id" = String, Path, description = "The token's id (`tok_...`)")),
    responses((status = 200, body = TokenOut)))]
pub async fn get(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path(token_id): Path<String>,
) -> ApiResult<Json<TokenOut>> {
    caller.require_environment()?;
    let id = parse_id(token_id)?;
    state
        .store
        .get_token(&id)
        .await?
        .map(|t| Json(t.into()))
        .ok_or_else(|| ApiError::not_found("token"))
}

/// Revokes (deletes) the token: the next request that presents it is refused.
#[utoipa::path(delete, path = "/api/v1/auth/token/{token_id}", tag = "Authentication", params(("token_id" = String, Path, description = "The token's id (`tok_...`)")),
    responses((status = 204, description = "Revoked")))]
pub async fn revoke(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path(token_id): Path<String>,
) -> ApiResult<StatusCode> {
    caller.require_environment()?;
    let id = parse_id(token_id)?;
    if !state.store.revoke_token(&id).await? {
        return Err(ApiError::not_found("token"));
    }
    tracing::info!(token = %id, "API token revoked");
    Ok(StatusCode::NO_CONTENT)
}

/// Svix's `authentication.logout`: the app-scoped token that signs the request (an app
/// portal link's, typically) stops working. An environment token is refused (403): revoking
/// one is `DELETE /api/v1/auth/token/{token_id}`, by a token that stays.
#[utoipa::path(post, path = "/api/v1/auth/logout", tag = "Authentication", operation_id = "logout",
    responses((status = 204, description = "The token is revoked")))]
pub async fn logout(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    headers: HeaderMap,
) -> ApiResult<StatusCode> {
    // The route takes app-scoped tokens only (`Access::AppScopedToken`), and authentication
    // read the same header, so it holds one.
    let presented = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(crate::auth::bearer_token)
        .ok_or_else(|| ApiError::unauthorized("Authorization header must be `Bearer <token>`"))?;
    state.store.remove_token(&token::hash(presented)).await?;
    tracing::info!(app = ?caller.scope.app(), "API token logged out");
    Ok(StatusCode::NO_CONTENT)
}

/// A token id, or 404: an id without the `tok_` prefix names no token.
fn parse_id(id: String) -> ApiResult<TokenId> {
    TokenId::parse(id).map_err(|_| ApiError::not_found("token"))
}

/// Times are kept in milliseconds: the answer shows the expiry as it will read back.
fn truncate_to_millis(at: DateTime<Utc>) -> DateTime<Utc> {
    use chrono::SubsecRound;
    at.trunc_subsecs(3)
}

/// This module's part of `/openapi.json`.
#[derive(utoipa::OpenApi)]
#[openapi(paths(list, create, get, revoke, logout))]
pub(crate) struct Docs;
