//! The route table: every route this crate serves, each with who may call it.
//!
//! The routers are built from these tables ([`RouteTable::into_router`]), so a route cannot be
//! served without an entry saying how it authenticates, and the authentication test walks the
//! same list ([`crate::route_list`]) rather than one kept by hand beside it.
//!
//! The table's word is enforced, not just recorded: every bearer-token route runs [`guard`]
//! before its handler, which authenticates the token and checks its scope against the route's
//! [`Access`] before any path or body is parsed. A refused caller therefore learns nothing from
//! validation errors. Handlers keep their own scope checks as a second line. The routes signed
//! another way (Pusher, providers, channel tokens) check their signatures in their handlers.

use std::sync::Arc;

use axum::{
    Router,
    extract::{FromRequestParts, RawPathParams, Request, State},
    handler::Handler,
    http::Method,
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{MethodFilter, MethodRouter, on},
};
use herald_store::TokenScope;

use crate::{ApiError, ApiState, auth};

/// Who may call a route, and how they prove it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone: health checks for load balancers, which carry no secrets.
    Public,
    /// A bearer token of either scope; an app-scoped token sees only its own app there.
    AnyToken,
    /// A bearer token for the app the path names (`{app_id}`): environment-wide, or scoped to
    /// that app (an app portal link's token included). Another app's token finds nothing
    /// (404), so ids cannot be probed.
    AppToken,
    /// As [`Access::AppToken`], but not an app portal link's token (403): the app's own
    /// settings and secrets, its ingest sources, channels and live tail, which are its
    /// backend's, not its customers'.
    AppAdmin,
    /// An environment-wide bearer token only; an app-scoped one is refused with 403.
    EnvironmentToken,
    /// An app-scoped bearer token only (an app's, or an app portal link's): what it asks for
    /// is about the token itself (logging it out). An environment-wide one is refused (403).
    AppScopedToken,
    /// The Pusher HTTP API's request signature, made with the key and secret of the app the
    /// path names.
    PusherSignature,
    /// The ingest source's provider signature over the raw body (the route itself is public).
    ProviderSignature,
    /// Public channels are open; private ones need a token signed with the app's Pusher secret.
    ChannelToken,
}

impl Access {
    /// Whether a bearer token is what opens the route.
    pub fn takes_bearer_token(self) -> bool {
        matches!(
            self,
            Self::AnyToken
                | Self::AppToken
                | Self::AppAdmin
                | Self::EnvironmentToken
                | Self::AppScopedToken
        )
    }
}

/// One method on one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub method: Method,
    /// axum's pattern, `{name}` for a path parameter.
    pub path: &'static str,
    pub access: Access,
}

/// Builds a router and its route list together, one method at a time.
pub(crate) struct RouteTable {
    entries: Vec<(Route, MethodRouter<Arc<ApiState>>)>,
}

macro_rules! methods {
    ($($name:ident => $method:ident),* $(,)?) => {
        $(
            pub(crate) fn $name<H, T>(self, path: &'static str, access: Access, handler: H) -> Self
            where
                H: Handler<T, Arc<ApiState>>,
                T: 'static,
            {
                self.add(Method::$method, MethodFilter::$method, path, access, handler)
            }
        )*
    };
}

impl RouteTable {
    pub(crate) fn new() -> Self {
        Self {
            entries: Vec::new(),
        }
    }

    methods!(get => GET, post => POST, put => PUT, patch => PATCH, delete => DELETE);

    fn add<H, T>(
        mut self,
        method: Method,
        filter: MethodFilter,
        path: &'static str,
        access: Access,
        handler: H,
    ) -> Self
    where
        H: Handler<T, Arc<ApiState>>,
        T: 'static,
    {
        let route = Route {
            method,
            path,
            access,
        };
        self.entries.push((route, on(filter, handler)));
        self
    }

    /// The routes, as [`crate::route_list`] reports them.
    pub(crate) fn into_routes(self) -> Vec<Route> {
        self.entries.into_iter().map(|(route, _)| route).collect()
    }

    /// The router: each route behind the guard its access needs.
    pub(crate) fn into_router(self, state: &Arc<ApiState>) -> Router<Arc<ApiState>> {
        self.entries
            .into_iter()
            .fold(Router::new(), |router, (route, handler)| {
                let handler = if route.access.takes_bearer_token() {
                    handler.route_layer(middleware::from_fn_with_state(
                        (state.clone(), route.access),
                        guard,
                    ))
                } else {
                    handler
                };
                // axum merges the methods of routes added on the same path (and panics on the
                // same method twice, so the table cannot hold a duplicate either).
                router.route(route.path, handler)
            })
    }
}

/// Authenticates a bearer-token route's caller and checks the token's scope against `access`:
/// 401 without a valid token, 403 for an app's token on an environment route, 404 for an
/// app's token on another app's path (as if the app were not there, so ids cannot be probed).
/// The scope goes into the request's extensions, where the handler's `Caller` finds it.
async fn guard(
    State((state, access)): State<(Arc<ApiState>, Access)>,
    request: Request,
    next: Next,
) -> Response {
    match check(&state, access, request).await {
        Ok(request) => next.run(request).await,
        Err(refusal) => refusal.into_response(),
    }
}

async fn check(state: &ApiState, access: Access, request: Request) -> Result<Request, ApiError> {
    let (mut parts, body) = request.into_parts();
    let scope = match parts.extensions.get::<TokenScope>() {
        // The idempotency middleware authenticated the request already.
        Some(scope) => scope.clone(),
        None => auth::authenticate(&parts.headers, &parts.extensions, state).await?,
    };
    if let TokenScope::Portal(_) = &scope
        && access == Access::AppAdmin
    {
        return Err(ApiError::forbidden(
            "an app portal link's token manages the app's endpoints and messages only",
        ));
    }
    if access == Access::AppScopedToken && scope.app().is_none() {
        return Err(ApiError::forbidden(
            "only an app-scoped token may do this; an environment token is revoked with DELETE /api/v1/auth/token/{token_id}",
        ));
    }
    if let Some(allowed) = scope.app() {
        match access {
            Access::EnvironmentToken => {
                return Err(ApiError::forbidden(
                    "this token is limited to one application",
                ));
            }
            Access::AppToken | Access::AppAdmin => {
                let params = RawPathParams::from_request_parts(&mut parts, state)
                    .await
                    .map_err(|_| ApiError::not_found("application"))?;
                let named = params
                    .iter()
                    .find_map(|(name, value)| (name == "app_id").then_some(value))
                    .ok_or_else(|| ApiError::not_found("application"))?;
                let app = state.store.get_app(named).await?;
                if app.is_none_or(|app| app.id != *allowed) {
                    return Err(ApiError::not_found("application"));
                }
            }
            _ => {}
        }
    }
    parts.extensions.insert(scope);
    Ok(Request::from_parts(parts, body))
}
