//! The `/api/v1` routes, one module per resource as in Svix's API reference.

mod application;
mod attempt;
mod channel;
mod endpoint;
mod event_type;
mod message;
mod portal;
mod source;
mod tail;
mod token;
mod wire;

pub(crate) use source::header_list;
pub use tail::Tails;

use axum::http::StatusCode;

use crate::routes::{Access, RouteTable};

/// The management API's routes. `{app_id}` paths take a token for that app; the catalogue of
/// event types and the tokens themselves are the environment's.
pub(crate) fn routes() -> RouteTable {
    use Access::{AnyToken, AppAdmin, AppScopedToken, AppToken, EnvironmentToken, Public};
    RouteTable::new()
        .get("/api/v1/health", Public, health)
        .get("/api/v1/auth/token", EnvironmentToken, token::list)
        .post("/api/v1/auth/token", EnvironmentToken, token::create)
        .get(
            "/api/v1/auth/token/{token_id}",
            EnvironmentToken,
            token::get,
        )
        .delete(
            "/api/v1/auth/token/{token_id}",
            EnvironmentToken,
            token::revoke,
        )
        .post("/api/v1/auth/logout", AppScopedToken, token::logout)
        .post(
            "/api/v1/auth/app-portal-access/{app_id}",
            EnvironmentToken,
            portal::create,
        )
        .post(
            "/api/v1/auth/dashboard-access/{app_id}",
            EnvironmentToken,
            portal::dashboard_access,
        )
        .get("/api/v1/app", AnyToken, application::list)
        .post("/api/v1/app", EnvironmentToken, application::create)
        .get("/api/v1/app/{app_id}", AppToken, application::get)
        .put("/api/v1/app/{app_id}", AppAdmin, application::upsert)
        .patch("/api/v1/app/{app_id}", AppAdmin, application::patch)
        .delete(
            "/api/v1/app/{app_id}",
            EnvironmentToken,
            application::delete,
        )
        .post(
            "/api/v1/app/{app_id}/pusher/secret/rotate",
            AppAdmin,
            application::rotate_pusher_secret,
        )
        .get("/api/v1/event-type", AnyToken, event_type::list)
        .post("/api/v1/event-type", EnvironmentToken, event_type::create)
        .get("/api/v1/event-type/{name}", AnyToken, event_type::get)
        .put(
            "/api/v1/event-type/{name}",
            EnvironmentToken,
            event_type::upsert,
        )
        .patch(
            "/api/v1/event-type/{name}",
            EnvironmentToken,
            event_type::patch,
        )
        .delete(
            "/api/v1/event-type/{name}",
            EnvironmentToken,
            event_type::archive,
        )
        .get("/api/v1/app/{app_id}/endpoint", AppToken, endpoint::list)
        .post("/api/v1/app/{app_id}/endpoint", AppToken, endpoint::create)
        .get(
            "/api/v1/app/{app_id}/endpoint/{endpoint_id}",
            AppToken,
            endpoint::get,
        )
        .put(
            "/api/v1/app/{app_id}/endpoint/{endpoint_id}",
            AppToken,
            endpoint::upsert,
        )
        .patch(
            "/api/v1/app/{app_id}/endpoint/{endpoint_id}",
            AppToken,
            endpoint::patch,
        )
        .delete(
            "/api/v1/app/{app_id}/endpoint/{endpoint_id}",
            AppToken,
            endpoint::delete,
        )
        .get(
            "/api/v1/app/{app_id}/endpoint/{endpoint_id}/secret",
            AppToken,
            endpoint::get_secret,
        )
        .post(
            "/api/v1/app/{app_id}/endpoint/{endpoint_id}/secret/rotate",
            AppToken,
            endpoint::rotate_secret,
        )
        .get(
            "/api/v1/app/{app_id}/endpoint/{endpoint_id}/headers",
            AppToken,
            endpoint::get_headers,
        )
        .put(
            "/api/v1/app/{app_id}/endpoint/{endpoint_id}/headers",
            AppToken,
            endpoint::set_headers,
        )
        .patch(
            "/api/v1/app/{app_id}/endpoint/{endpoint_id}/headers",
            AppToken,
            endpoint::patch_headers,
        )
        .post(
            "/api/v1/app/{app_id}/endpoint/{endpoint_id}/recover",
            AppToken,
            endpoint::recover,
        )
        .post(
            "/api/v1/app/{app_id}/endpoint/{endpoint_id}/send-example",
            AppToken,
            endpoint::send_example,
        )
        .get(
            "/api/v1/app/{app_id}/endpoint/{endpoint_id}/stats",
            AppToken,
            endpoint::stats,
        )
        .get("/api/v1/app/{app_id}/msg", AppToken, message::list)
        .post("/api/v1/app/{app_id}/msg", AppToken, message::create)
        // What the app publishes, live (Server-Sent Events): `herald listen`, the console.
        .get("/api/v1/app/{app_id}/tail", AppAdmin, tail::stream)
        .get(
            "/api/v1/app/{app_id}/endpoint/{endpoint_id}/msg",
            AppToken,
            attempt::list_attempted_messages,
        )
        .get("/api/v1/app/{app_id}/msg/{msg_id}", AppToken, message::get)
        .delete(
            "/api/v1/app/{app_id}/msg/{msg_id}/content",
            AppAdmin,
            message::expunge_content,
        )
        .get(
            "/api/v1/app/{app_id}/msg/{msg_id}/attempt/{attempt_id}",
            AppToken,
            attempt::get,
        )
        .delete(
            "/api/v1/app/{app_id}/msg/{msg_id}/attempt/{attempt_id}/content",
            AppAdmin,
            attempt::expunge_content,
        )
        .get(
            "/api/v1/app/{app_id}/msg/{msg_id}/endpoint",
            AppToken,
            attempt::list_attempted_destinations,
        )
        .get(
            "/api/v1/app/{app_id}/msg/{msg_id}/attempt",
            AppToken,
            attempt::list_by_msg_deprecated,
        )
        .get(
            "/api/v1/app/{app_id}/msg/{msg_id}/endpoint/{endpoint_id}/attempt",
            AppToken,
            attempt::list_by_msg_and_endpoint,
        )
        .post(
            "/api/v1/app/{app_id}/msg/{msg_id}/endpoint/{endpoint_id}/resend",
            AppToken,
            attempt::resend,
        )
        .get(
            "/api/v1/app/{app_id}/attempt/endpoint/{endpoint_id}",
            AppToken,
            attempt::list_by_endpoint,
        )
        .get(
            "/api/v1/app/{app_id}/attempt/msg/{msg_id}",
            AppToken,
            attempt::list_by_msg,
        )
        .get("/api/v1/app/{app_id}/channel", AppAdmin, channel::list)
        .get(
            "/api/v1/app/{app_id}/channel/{channel}/member",
            AppAdmin,
            channel::members,
        )
        .get("/api/v1/app/{app_id}/ingest/source", AppAdmin, source::list)
        .post(
            "/api/v1/app/{app_id}/ingest/source",
            AppAdmin,
            source::create,
        )
        .get(
            "/api/v1/app/{app_id}/ingest/source/{source_id}",
            AppAdmin,
            source::get,
        )
        .patch(
            "/api/v1/app/{app_id}/ingest/source/{source_id}",
            AppAdmin,
            source::patch,
        )
        .delete(
            "/api/v1/app/{app_id}/ingest/source/{source_id}",
            AppAdmin,
            source::delete,
        )
        .get(
            "/api/v1/app/{app_id}/ingest/source/{source_id}/event",
            AppAdmin,
            source::list_events,
        )
        .get(
            "/api/v1/app/{app_id}/ingest/source/{source_id}/event/{event_id}",
            AppAdmin,
            source::get_event,
        )
        .get(
            "/api/v1/app/{app_id}/ingest/source/{source_id}/request",
            AppAdmin,
            source::requests,
        )
        .post(
            "/api/v1/app/{app_id}/ingest/source/{source_id}/event/{event_id}/replay",
            AppAdmin,
            source::replay,
        )
}

/// This module's part of `/openapi.json`: every resource's `Docs`, merged.
pub(crate) fn docs() -> utoipa::openapi::OpenApi {
    use utoipa::OpenApi;
    let mut doc = Docs::openapi();
    for part in [
        application::Docs::openapi(),
        attempt::Docs::openapi(),
        channel::Docs::openapi(),
        endpoint::Docs::openapi(),
        event_type::Docs::openapi(),
        message::Docs::openapi(),
        portal::Docs::openapi(),
        source::Docs::openapi(),
        tail::Docs::openapi(),
        token::Docs::openapi(),
    ] {
        doc.merge(part);
    }
    doc
}

#[derive(utoipa::OpenApi)]
#[openapi(paths(health))]
struct Docs;

/// Svix's health check: 204 while the server answers.
#[utoipa::path(get, path = "/api/v1/health", tag = "Health", security(()),
    responses((status = 204, description = "Up")))]
async fn health() -> StatusCode {
    StatusCode::NO_CONTENT
}

/// Serde helper: distinguishes a field set to `null` from one left out (PATCH semantics).
/// The `updated_at` a change read at `read_at` writes: now, but always after `read_at`. The
/// store updates an app or endpoint only while its row is still at `read_at` (the
/// compare-and-set that keeps a concurrent change from being overwritten), so a change in the
/// same millisecond as the one it raced, or made on a node whose clock lags, must still move
/// the row past what the other read.
fn next_version(read_at: chrono::DateTime<chrono::Utc>) -> chrono::DateTime<chrono::Utc> {
    crate::now().max(read_at + chrono::Duration::milliseconds(1))
}

fn double_option<'de, D, T>(de: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    serde::Deserialize::deserialize(de).map(Some)
}
