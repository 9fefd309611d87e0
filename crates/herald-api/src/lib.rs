//! Herald's HTTP API.
//!
//! `/api/v1/...` is the webhook management API, shaped after Svix's so its official SDKs work
//! unchanged: applications, event types, endpoints, messages and attempts. `/apps/...` is the
//! Pusher Channels HTTP API (`pusher_api`), so the Pusher server SDKs work unchanged. Handlers translate
//! between the wire format (camelCase JSON defined here) and the domain types of
//! `herald-core`; they read and manage resources through the [`Store`] and publish events only
//! through the channel layer's `Publisher`. They never talk HTTP to the outside world, which
//! is the delivery worker's job.

mod auth;
mod console;
mod error;
mod extract;
mod health;
mod idempotency;
mod ingest;
pub mod ingest_log;
pub mod openapi;
mod pagination;
mod pusher_api;
pub mod rate;
mod request_id;
mod routes;
pub mod sse;
mod v1;

use std::sync::Arc;

use axum::{
    Router,
    extract::DefaultBodyLimit,
    http::{HeaderValue, Method, Uri, header},
    middleware,
};
use herald_channels::{Hub, Publisher, presence::PresenceManager};
use herald_core::token::TokenHash;
use herald_delivery::DispatcherHandle;
use herald_store::Store;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower_http::set_header::SetResponseHeaderLayer;

pub use error::ApiError;
pub use request_id::{REQUEST_ID, with_request_ids};
use routes::RouteTable;
pub use routes::{Access, Route};

#[derive(Clone)]
pub struct ApiState {
    pub store: Arc<dyn Store>,
    pub dispatcher: DispatcherHandle,
    /// This node's subscribers: SSE streams join it, and a deleted app's connections end.
    pub hub: Arc<Hub>,
    /// The one publish path, with channel history (pages for the API, SSE resumption).
    pub publisher: Arc<Publisher>,
    /// Occupancy and presence members, for the Pusher HTTP API.
    pub presence: Arc<dyn PresenceManager>,
    /// Digest of the operator's admin token, if one is configured.
    pub admin_token_hash: Option<TokenHash>,
    /// Large inbound webhooks verified at once on the blocking pool, at most one per core and
    /// half of them for one source, so a flood of them queues (for a while) instead of crowding
    /// out everything else.
    pub large_verifications: Arc<ingest::LargeVerifications>,
    /// Live tails (`GET /api/v1/app/{app_id}/tail`) being served, at most
    /// 64 on the node, 8 of them one app's (`v1/tail.rs`).
    pub tails: Arc<v1::Tails>,
    pub sse: sse::SseConfig,
    /// The last requests each ingest source received, for the console (this node's only).
    pub ingest_log: Arc<ingest_log::IngestLog>,
    /// Whether this node's listener speaks TLS: the scheme of the links it hands out (app
    /// portal links), unless the request came through a proxy that says otherwise.
    pub tls: bool,
    /// Request rates on `/ingest`, per client address and per source.
    pub ingest_limits: Arc<rate::IngestLimiter>,
    /// The deliveries `/ingest` recorded lately: their retries and replays spend no budget.
    pub recent_deliveries: Arc<ingest::RecentDeliveries>,
    /// Events each app may publish through the API (Svix messages, Pusher triggers).
    pub publish_limits: Arc<rate::PublishLimiter>,
    /// Failed authentications each client address may make before its credentials are
    /// refused unread for a moment (API tokens and Pusher signatures).
    pub auth_failures: Arc<rate::AuthFailureLimiter>,
    /// Cancelled at shutdown: long-lived responses (SSE streams) end with it.
    pub shutdown: CancellationToken,
    /// Work a request leaves running after its client went away (an `Idempotency-Key`
    /// request keeping its answer): the shutdown waits for it before closing the store.
    pub detached: TaskTracker,
    /// Every metric this node registered (see `herald-metrics`), which `GET /metrics`
    /// encodes. Empty until `herald::run` puts the node's registry here.
    pub metrics_registry: Arc<herald_metrics::Registry>,
    /// The handles registered there: the API counts its own (ingest outcomes, limits hit)
    /// and sets the queue's gauges when scraped. Detached until `herald::run` sets them.
    pub metrics: herald_metrics::Metrics,
    /// How long a retention day lasts (`payloadRetentionPeriod` counts them): 24 hours,
    /// shorter only in tests (`retention.day_secs`).
    pub retention_day: std::time::Duration,
    /// Endpoints one app may have (`api.max_endpoints_per_app`; 0: no limit). Every message
    /// writes a delivery row per endpoint that wants it, so an app token making endpoints
    /// without bound would make each of its messages as costly as it liked.
    pub max_endpoints_per_app: usize,
    /// Told of each app this node creates, changes or deletes through the API, once the store
    /// has the change: the Socket.IO face opens or closes the app's namespaces.
    pub app_listener: Option<Arc<dyn AppListener>>,
    /// The store's last answer to `/health/ready` (see `health::ready`).
    pub readiness: Arc<health::StoreReadiness>,
}

/// Hears of the apps the API creates, changes and deletes ([`ApiState::app_listener`]).
pub trait AppListener: Send + Sync + 'static {
    fn saved(&self, app: &herald_core::model::App);
    fn deleted(&self, app: &herald_core::model::App);
}

/// The channel layer as the API uses it.
pub struct Channels {
    pub hub: Arc<Hub>,
    pub publisher: Arc<Publisher>,
    pub presence: Arc<dyn PresenceManager>,
}

/// [`ApiState::max_endpoints_per_app`] unless configured.
pub const DEFAULT_MAX_ENDPOINTS_PER_APP: usize = 1_000;

#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 1024 * 1024,
        }
    }
}

impl ApiState {
    pub fn new(
        store: Arc<dyn Store>,
        dispatcher: DispatcherHandle,
        channels: Channels,
        admin_token_hash: Option<TokenHash>,
    ) -> Self {
        let Channels {
            hub,
            publisher,
            presence,
        } = channels;
        Self {
            store,
            dispatcher,
            hub,
            publisher,
            presence,
            admin_token_hash,
            large_verifications: Arc::new(ingest::LargeVerifications::new(
                std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get),
            )),
            tails: Arc::default(),
            sse: sse::SseConfig::default(),
            ingest_log: Arc::default(),
            tls: false,
            ingest_limits: Arc::default(),
            recent_deliveries: Arc::default(),
            publish_limits: Arc::default(),
            auth_failures: Arc::default(),
            shutdown: CancellationToken::new(),
            detached: TaskTracker::new(),
            metrics_registry: Arc::default(),
            metrics: herald_metrics::Metrics::detached(),
            retention_day: std::time::Duration::from_secs(86_400),
            max_endpoints_per_app: DEFAULT_MAX_ENDPOINTS_PER_APP,
            app_listener: None,
            readiness: Arc::default(),
        }
    }
}

pub fn router(state: ApiState, config: &ApiConfig) -> Router {
    let routes = routes(state, config);
    // Svix's docs and older SDKs write `/api/v1/app/`: such a path is routed as it would be
    // without the slash. Routes are matched before a `Router::layer` middleware runs, so the
    // path is rewritten by an outer router whose only route is its fallback, the real one.
    Router::new()
        .fallback_service(routes)
        .layer(middleware::map_request(trim_api_trailing_slash))
        .layer(middleware::from_fn(refuse_nul_in_url))
        // No answer is to be read as another type than it says: an error's text/plain that
        // echoes what the caller sent stays text.
        .layer(SetResponseHeaderLayer::overriding(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
}

/// A URL whose path or query holds a NUL byte (`%00`) is refused with 400 before anything
/// looks at it: no id, name or query value may contain one, and PostgreSQL refuses NUL in
/// text, which would otherwise surface as a 500 (and, under `/ingest`, be logged against a
/// made-up source).
async fn refuse_nul_in_url(
    request: axum::extract::Request,
    next: middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let holds_nul = request
        .uri()
        .path_and_query()
        .is_some_and(|pq| pq.as_str().as_bytes().windows(3).any(|w| w == b"%00"));
    if holds_nul {
        return ApiError::bad_request(
            "invalid_url",
            "the URL holds a NUL byte (%00), which no id, name or query value may contain",
        )
        .into_response();
    }
    // Path parameters are text: a path that does not decode to UTF-8 gets the same shape here,
    // not axum's plain-text rejection from whichever extractor meets it first.
    if !percent_decodes_to_utf8(request.uri().path()) {
        return ApiError::bad_request(
            "invalid_url",
            "the URL's path does not percent-decode to UTF-8 text",
        )
        .into_response();
    }
    next.run(request).await
}

/// Whether `path` percent-decodes to UTF-8 (a `%` not followed by two hex digits stays as it
/// is, as axum leaves it).
fn percent_decodes_to_utf8(path: &str) -> bool {
    if !path.contains('%') {
        return true;
    }
    let bytes = path.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(high), Some(low)) => {
                decoded.push(u8::try_from(high * 16 + low).unwrap_or(0));
                i += 3;
            }
            (byte, _, _) => {
                decoded.push(byte);
                i += 1;
            }
        }
    }
    std::str::from_utf8(&decoded).is_ok()
}

/// `/api/v1/...` with one trailing slash becomes the path without it (query kept); anything
/// else passes unchanged.
async fn trim_api_trailing_slash(mut request: axum::extract::Request) -> axum::extract::Request {
    let uri = request.uri();
    let path = uri.path();
    if !path.starts_with("/api/v1/") || !path.ends_with('/') || path.ends_with("//") {
        return request;
    }
    let trimmed = &path[..path.len() - 1];
    let path_and_query = match uri.query() {
        Some(query) => format!("{trimmed}?{query}"),
        None => trimmed.to_owned(),
    };
    let mut parts = uri.clone().into_parts();
    match path_and_query.parse() {
        Ok(pq) => parts.path_and_query = Some(pq),
        Err(_) => return request,
    }
    if let Ok(uri) = Uri::from_parts(parts) {
        *request.uri_mut() = uri;
    }
    request
}

/// The routes outside the management and Pusher APIs: each face's public door.
fn edge_routes() -> RouteTable {
    RouteTable::new()
        // Authenticated by each provider's signature, not by a token.
        .post(
            "/ingest/{source_id}",
            Access::ProviderSignature,
            ingest::receive,
        )
        // Public channels are public; private ones carry a signed token.
        .get("/apps/{app_id}/sse", Access::ChannelToken, sse::stream)
        // For load balancers: no credentials, no secrets in the answer.
        .get("/health/live", Access::Public, health::live)
        .get("/health/ready", Access::Public, health::ready)
        // Prometheus scrapes with `authorization: Bearer`: counts and queue depths are the
        // operator's, not the world's.
        .get("/metrics", Access::EnvironmentToken, health::metrics)
}

/// Every route [`router`] serves, with who may call it: the list the routers are built from.
pub fn route_list() -> Vec<Route> {
    [
        v1::routes(),
        pusher_api::routes(),
        edge_routes(),
        console::routes(),
        openapi::routes(),
    ]
    .into_iter()
    .flat_map(RouteTable::into_routes)
    .collect()
}

fn routes(state: ApiState, config: &ApiConfig) -> Router {
    // Shared, not copied: axum hands every extractor and middleware its own clone of the
    // state, and a clone of `ApiState` itself is some twenty reference counts and a lock.
    let state = Arc::new(state);
    v1::routes()
        .into_router(&state)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            idempotency::replay,
        ))
        // Management answers carry secrets (an app's Pusher secret, an endpoint's signing
        // secret, a new token) and are the caller's alone: no cache, shared or private, keeps
        // them, whatever client asked.
        .layer(SetResponseHeaderLayer::if_not_present(
            header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        ))
        .merge(pusher_api::routes().into_router(&state))
        .merge(edge_routes().into_router(&state))
        .merge(console::routes().into_router(&state))
        .merge(openapi::routes().into_router(&state))
        .layer(DefaultBodyLimit::max(config.max_body_bytes))
        // After every route is registered: it is set on the routes there are.
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(unknown_route)
        .with_state(state)
}

/// A known path asked with a method it does not take: 405 in the APIs' error shape (axum adds
/// the `Allow` header).
async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!(
            "{} does not take {method}; the Allow header lists the methods it takes",
            uri.path()
        ),
    )
}

async fn unknown_route(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::NOT_FOUND,
        "not_found",
        format!("no route for {method} {}", uri.path()),
    )
}

pub use idempotency::purge_expired as purge_idempotency_keys;

/// The current time at the store's precision (milliseconds), so a resource reads back exactly
/// as it was first returned.
pub(crate) fn now() -> chrono::DateTime<chrono::Utc> {
    use chrono::SubsecRound;
    chrono::Utc::now().trunc_subsecs(3)
}
