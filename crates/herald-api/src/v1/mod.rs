//! The `/api/v1` routes, one module per resource as in Svix's API reference.

mod application;
mod attempt;
mod endpoint;
mod event_type;
mod message;
mod source;
mod wire;

pub(crate) use source::header_list;

use axum::{
    Router,
    http::StatusCode,
    routing::{get, post},
};

use crate::ApiState;

pub fn router() -> Router<ApiState> {
    Router::new()
        .route("/api/v1/health", get(health))
        .route(
            "/api/v1/app",
            get(application::list).post(application::create),
        )
        .route(
            "/api/v1/app/{app_id}",
            get(application::get)
                .put(application::upsert)
                .patch(application::patch)
                .delete(application::delete),
        )
        .route(
            "/api/v1/app/{app_id}/pusher/secret/rotate",
            post(application::rotate_pusher_secret),
        )
        .route(
            "/api/v1/event-type",
            get(event_type::list).post(event_type::create),
        )
        .route(
            "/api/v1/event-type/{name}",
            get(event_type::get)
                .put(event_type::upsert)
                .patch(event_type::patch)
                .delete(event_type::archive),
        )
        .route(
            "/api/v1/app/{app_id}/endpoint",
            get(endpoint::list).post(endpoint::create),
        )
        .route(
            "/api/v1/app/{app_id}/endpoint/{endpoint_id}",
            get(endpoint::get)
                .put(endpoint::upsert)
                .patch(endpoint::patch)
                .delete(endpoint::delete),
        )
        .route(
            "/api/v1/app/{app_id}/endpoint/{endpoint_id}/secret",
            get(endpoint::get_secret),
        )
        .route(
            "/api/v1/app/{app_id}/endpoint/{endpoint_id}/secret/rotate",
            post(endpoint::rotate_secret),
        )
        .route(
            "/api/v1/app/{app_id}/endpoint/{endpoint_id}/headers",
            get(endpoint::get_headers)
                .put(endpoint::set_headers)
                .patch(endpoint::patch_headers),
        )
        .route(
            "/api/v1/app/{app_id}/endpoint/{endpoint_id}/recover",
            post(endpoint::recover),
        )
        .route(
            "/api/v1/app/{app_id}/endpoint/{endpoint_id}/stats",
            get(endpoint::stats),
        )
        .route(
            "/api/v1/app/{app_id}/msg",
            get(message::list).post(message::create),
        )
        .route(
            "/api/v1/app/{app_id}/endpoint/{endpoint_id}/msg",
            get(attempt::list_attempted_messages),
        )
        .route("/api/v1/app/{app_id}/msg/{msg_id}", get(message::get))
        .route(
            "/api/v1/app/{app_id}/msg/{msg_id}/attempt/{attempt_id}",
            get(attempt::get),
        )
        .route(
            "/api/v1/app/{app_id}/msg/{msg_id}/endpoint",
            get(attempt::list_attempted_destinations),
        )
        .route(
            "/api/v1/app/{app_id}/msg/{msg_id}/endpoint/{endpoint_id}/resend",
            post(attempt::resend),
        )
        .route(
            "/api/v1/app/{app_id}/attempt/endpoint/{endpoint_id}",
            get(attempt::list_by_endpoint),
        )
        .route(
            "/api/v1/app/{app_id}/attempt/msg/{msg_id}",
            get(attempt::list_by_msg),
        )
        .route(
            "/api/v1/app/{app_id}/ingest/source",
            get(source::list).post(source::create),
        )
        .route(
            "/api/v1/app/{app_id}/ingest/source/{source_id}",
            get(source::get).patch(source::patch).delete(source::delete),
        )
        .route(
            "/api/v1/app/{app_id}/ingest/source/{source_id}/event",
            get(source::list_events),
        )
        .route(
            "/api/v1/app/{app_id}/ingest/source/{source_id}/event/{event_id}",
            get(source::get_event),
        )
        .route(
            "/api/v1/app/{app_id}/ingest/source/{source_id}/event/{event_id}/replay",
            post(source::replay),
        )
}

async fn health() -> StatusCode {
    StatusCode::NO_CONTENT
}

/// Serde helper: distinguishes a field set to `null` from one left out (PATCH semantics).
fn double_option<'de, D, T>(de: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    serde::Deserialize::deserialize(de).map(Some)
}
