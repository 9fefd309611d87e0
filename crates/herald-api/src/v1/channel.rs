//! `/api/v1/app/{app_id}/channel`: the app's live channels and presence members, for the
//! console and anyone holding the app's token (the Pusher HTTP API answers the same questions
//! to requests signed with the app's Pusher secret). Counts are the cluster's.

use std::sync::Arc;

use axum::{
    Json,
    extract::{Path, State},
    http::StatusCode,
};
use herald_channels::presence::PresenceError;
use herald_core::pusher::{self, ChannelKind};
use serde::Serialize;
use serde_json::Value;

use crate::{ApiState, auth::Caller, error::ApiError, error::ApiResult, pagination::ListResponse};

/// An occupied channel.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChannelOut {
    name: String,
    /// Connections subscribed, on every node.
    subscription_count: usize,
    /// Presence channels: distinct users.
    #[serde(skip_serializing_if = "Option::is_none")]
    user_count: Option<usize>,
}

/// A presence channel's member.
#[derive(Serialize, utoipa::ToSchema)]
pub struct MemberOut {
    id: String,
    /// The `user_info` the member joined with; not kept cluster-wide, so `null`.
    info: Option<Value>,
}

fn unavailable(e: PresenceError) -> ApiError {
    tracing::error!(error = %e, "reading presence failed");
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "presence_unavailable",
        e.to_string(),
    )
}

fn one_page<T>(data: Vec<T>) -> ListResponse<T> {
    ListResponse {
        data,
        iterator: None,
        prev_iterator: None,
        done: true,
    }
}

/// Occupied channels in name order; `prefix` narrows them (`presence-`).
///
/// One page holds them all (`done` is true, no iterator).
#[utoipa::path(get, path = "/api/v1/app/{app_id}/channel", tag = "Channels",
    params(("app_id" = String, Path, description = "The app's id or uid"),
        ("prefix" = Option<String>, Query, description = "Only channels whose name starts with this")),
    responses((status = 200, body = ListResponse<ChannelOut>)))]
pub async fn list(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path(app_id): Path<String>,
    query: crate::extract::QueryParams,
) -> ApiResult<Json<ListResponse<ChannelOut>>> {
    let app = caller.app(&state, &app_id).await?;
    let prefix = query.str("prefix").unwrap_or("");
    let mut channels: Vec<ChannelOut> = state
        .presence
        .channels(&app.id, prefix)
        .await
        .map_err(unavailable)?
        .into_iter()
        .map(|(name, info)| ChannelOut {
            name,
            subscription_count: info.subscription_count,
            user_count: info.user_count,
        })
        .collect();
    channels.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Json(one_page(channels)))
}

/// A presence channel's members, in id order.
///
/// One page holds them all (`done` is true, no iterator).
#[utoipa::path(get, path = "/api/v1/app/{app_id}/channel/{channel}/member", tag = "Channels",
    params(("app_id" = String, Path, description = "The app's id or uid"),
        ("channel" = String, Path, description = "A presence channel's name (`presence-...`)")),
    responses((status = 200, body = ListResponse<MemberOut>)))]
pub async fn members(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path((app_id, channel)): Path<(String, String)>,
) -> ApiResult<Json<ListResponse<MemberOut>>> {
    let app = caller.app(&state, &app_id).await?;
    pusher::validate_channel_name(&channel)
        .map_err(|e| ApiError::invalid(&["path", "channel"], e.to_string()))?;
    if ChannelKind::of(&channel) != ChannelKind::Presence {
        return Err(ApiError::invalid(
            &["path", "channel"],
            "members are only listed for presence channels (presence-...)",
        ));
    }
    let mut ids = state
        .presence
        .users(&app.id, &channel)
        .await
        .map_err(unavailable)?;
    ids.sort();
    Ok(Json(one_page(
        ids.into_iter()
            .map(|id| MemberOut { id, info: None })
            .collect(),
    )))
}

/// This module's part of `/openapi.json`.
#[derive(utoipa::OpenApi)]
#[openapi(paths(list, members))]
pub(crate) struct Docs;
