//! Bearer-token authentication. The admin token from the configuration and environment-wide
//! tokens in the store may do anything; an app-scoped token may only touch its app. A token
//! past its expiry, or revoked, opens nothing.

use std::{net::IpAddr, net::SocketAddr, sync::Arc};

use axum::{
    extract::{ConnectInfo, FromRequestParts},
    http::{Extensions, HeaderMap, request::Parts},
};
use herald_core::{
    model::{App, Endpoint, EndpointFormat, Message},
    token,
};
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
        let scope = authenticate(&parts.headers, &parts.extensions, state).await?;
        Ok(Self { scope })
    }
}

/// The address a request came from, as the per-address limits count it: the peer, or the
/// client a trusted proxy names (`ws.trusted_proxies`). `None` for a router called without the
/// listener's connection info (tests), which no per-address limit applies to.
pub(crate) fn client_address(
    state: &ApiState,
    extensions: &Extensions,
    headers: &HeaderMap,
) -> Option<IpAddr> {
    let peer = extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(peer)| *peer);
    state.sse.clients.client_address(peer, headers)
}

/// The client address of a request, for handlers (see [`client_address`]).
pub(crate) struct ClientAddress(pub Option<IpAddr>);

impl FromRequestParts<Arc<ApiState>> for ClientAddress {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<ApiState>,
    ) -> Result<Self, Self::Rejection> {
        Ok(Self(client_address(
            state,
            &parts.extensions,
            &parts.headers,
        )))
    }
}

/// The token an `Authorization` header's value presents (`Bearer <token>`), if any.
pub(crate) fn bearer_token(header: &str) -> Option<&str> {
    header
        .strip_prefix("Bearer ")
        .or_else(|| header.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|token| !token.is_empty())
}

/// The scope of the bearer token in `headers`, or why there is none. A token no cache holds is
/// looked up only if its client address has not failed too often (429 otherwise); every token
/// not found, or expired, counts against its address ([`crate::rate::AuthFailureLimiter`]).
pub(crate) async fn authenticate(
    headers: &HeaderMap,
    extensions: &Extensions,
    state: &ApiState,
) -> ApiResult<TokenScope> {
    let header = headers
        .get(axum::http::header::AUTHORIZATION)
        .ok_or_else(|| {
            ApiError::unauthorized("missing Authorization header (expected `Bearer <token>`)")
        })?;
    let presented =
        header.to_str().ok().and_then(bearer_token).ok_or_else(|| {
            ApiError::unauthorized("Authorization header must be `Bearer <token>`")
        })?;
    let token_hash = token::hash(presented);
    if let Some(admin) = &state.admin_token_hash
        && token::equal(admin, &token_hash)
    {
        return Ok(TokenScope::Environment);
    }
    // A token this node holds in memory costs nothing to check; any other is looked up, which
    // an address that keeps failing pays for first.
    let client = client_address(state, extensions, headers);
    let now = chrono::Utc::now();
    let token = match state.store.cached_token(&token_hash) {
        Some(token) => Some(token),
        None => {
            let attempt = state.auth_failures.begin(client)?;
            let found = state.store.find_token(&token_hash).await?;
            if found.as_ref().is_none_or(|token| token.expired(now)) {
                state.auth_failures.failed(client, attempt);
            }
            found
        }
    };
    let token =
        token.ok_or_else(|| ApiError::unauthorized("invalid API token (unknown or revoked)"))?;
    if token.expired(now) {
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

    /// An app portal link's token: the app's customers, managing their own endpoints.
    pub fn is_portal(&self) -> bool {
        matches!(self.scope, TokenScope::Portal(_))
    }

    /// Whether this caller may see the endpoint. The app's `pusher`-format endpoints receive
    /// its channel webhooks (every channel's occupancy, presence members and client events,
    /// signed with the app's Pusher secret): its backend's, not its customers', so a portal
    /// link neither sees nor changes them.
    pub fn sees_endpoint(&self, endpoint: &Endpoint) -> bool {
        !(self.is_portal() && endpoint.format == EndpointFormat::Pusher)
    }

    /// The event type of the messages this caller may not see: a portal link does not see
    /// the channel webhook messages its hidden endpoints receive.
    pub fn hidden_event_type(&self) -> Option<&'static str> {
        self.is_portal()
            .then_some(herald_channels::channel_webhooks::EVENT_TYPE)
    }

    /// Whether this caller may see the message ([`Self::hidden_event_type`]).
    pub fn sees_message(&self, message: &Message) -> bool {
        self.hidden_event_type() != Some(message.event_type.as_str())
    }

    /// The app's endpoint named by id or uid, if this caller may see it (404 otherwise).
    pub async fn endpoint(
        &self,
        state: &ApiState,
        app: &App,
        id_or_uid: &str,
    ) -> ApiResult<Endpoint> {
        state
            .store
            .get_endpoint(&app.id, id_or_uid)
            .await?
            .filter(|endpoint| self.sees_endpoint(endpoint))
            .ok_or_else(|| ApiError::not_found("endpoint"))
    }

    /// The app's message named by id or event id, if this caller may see it (404 otherwise).
    pub async fn message(&self, state: &ApiState, app: &App, id: &str) -> ApiResult<Message> {
        state
            .store
            .get_message(&app.id, id)
            .await?
            .filter(|message| self.sees_message(message))
            .ok_or_else(|| ApiError::not_found("message"))
    }
}
