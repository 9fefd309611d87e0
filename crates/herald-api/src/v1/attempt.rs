//! Message attempts: the log of every HTTP request made, and manual resends.

use axum::{
    Json,
    extract::{Path, State},
    http::StatusCode,
};
use chrono::{DateTime, Utc};
use herald_core::model::{Attempt, DeliveryStatus};
use herald_store::{AttemptQuery, AttemptScope};
use serde::Serialize;

use crate::{
    ApiState,
    auth::Caller,
    error::{ApiError, ApiResult},
    extract::QueryParams,
    pagination::{self, ListResponse},
};

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MessageAttemptOut {
    id: String,
    msg_id: String,
    endpoint_id: String,
    url: String,
    response: String,
    response_status_code: i32,
    response_duration_ms: i64,
    status: u8,
    status_text: &'static str,
    trigger_type: u8,
    timestamp: DateTime<Utc>,
}

impl From<Attempt> for MessageAttemptOut {
    fn from(a: Attempt) -> Self {
        Self {
            id: a.id,
            msg_id: a.msg_id,
            endpoint_id: a.endpoint_id,
            url: a.url,
            response: a.response,
            response_status_code: a.response_status_code,
            response_duration_ms: a.response_duration_ms,
            status: a.status as u8,
            status_text: a.status.text(),
            trigger_type: a.trigger_type as u8,
            timestamp: a.created_at,
        }
    }
}

fn attempt_query(query: &QueryParams) -> ApiResult<AttemptQuery> {
    let status = match query.int("status")? {
        None => None,
        Some(code) => Some(DeliveryStatus::from_code(code).ok_or_else(|| {
            ApiError::invalid(&["query", "status"], "status must be 0, 1, 2 or 3")
        })?),
    };
    Ok(AttemptQuery {
        status,
        endpoint_id: query.str("endpoint_id").map(str::to_owned),
    })
}

pub async fn list_by_endpoint(
    State(state): State<ApiState>,
    caller: Caller,
    Path((app_id, endpoint_id)): Path<(String, String)>,
    query: QueryParams,
) -> ApiResult<Json<ListResponse<MessageAttemptOut>>> {
    let app = caller.app(&state, &app_id).await?;
    let endpoint = state
        .store
        .get_endpoint(&app.id, &endpoint_id)
        .await?
        .ok_or_else(|| ApiError::not_found("endpoint"))?;
    let page = pagination::page(&query, true)?;
    let mut filter = attempt_query(&query)?;
    filter.endpoint_id = None;
    let rows = state
        .store
        .list_attempts(
            &app.id,
            &AttemptScope::Endpoint(endpoint.id),
            &filter,
            &page,
        )
        .await?;
    Ok(Json(pagination::list(
        rows,
        &page,
        |a| a.id.clone(),
        MessageAttemptOut::from,
    )))
}

pub async fn list_by_msg(
    State(state): State<ApiState>,
    caller: Caller,
    Path((app_id, msg_id)): Path<(String, String)>,
    query: QueryParams,
) -> ApiResult<Json<ListResponse<MessageAttemptOut>>> {
    let app = caller.app(&state, &app_id).await?;
    let msg = state
        .store
        .get_message(&app.id, &msg_id)
        .await?
        .ok_or_else(|| ApiError::not_found("message"))?;
    let page = pagination::page(&query, true)?;
    let filter = attempt_query(&query)?;
    let rows = state
        .store
        .list_attempts(&app.id, &AttemptScope::Message(msg.id), &filter, &page)
        .await?;
    Ok(Json(pagination::list(
        rows,
        &page,
        |a| a.id.clone(),
        MessageAttemptOut::from,
    )))
}

/// Queue one manual attempt of the message to the endpoint now. Manual attempts are not retried.
pub async fn resend(
    State(state): State<ApiState>,
    caller: Caller,
    Path((app_id, msg_id, endpoint_id)): Path<(String, String, String)>,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    let app = caller.app(&state, &app_id).await?;
    let msg = state
        .store
        .get_message(&app.id, &msg_id)
        .await?
        .ok_or_else(|| ApiError::not_found("message"))?;
    let endpoint = state
        .store
        .get_endpoint(&app.id, &endpoint_id)
        .await?
        .ok_or_else(|| ApiError::not_found("endpoint"))?;
    if endpoint.disabled {
        return Err(ApiError::bad_request(
            "endpoint_disabled",
            "the endpoint is disabled; enable it before resending",
        ));
    }
    state
        .store
        .enqueue_manual(&app.id, &msg.id, &endpoint.id, crate::now())
        .await?;
    state.dispatcher.wake();
    // The SDKs parse an (empty) object from this response.
    Ok((StatusCode::ACCEPTED, Json(serde_json::json!({}))))
}
