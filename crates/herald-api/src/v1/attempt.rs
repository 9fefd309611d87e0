//! Message attempts: the log of every HTTP request made, where each message stands with each
//! endpoint (Svix's attempted messages and attempted destinations), and manual resends.

use axum::{
    Json,
    extract::{Path, State},
    http::StatusCode,
};
use chrono::{DateTime, Utc};
use herald_core::model::{Attempt, DeliveryStatus};
use herald_store::{AttemptQuery, AttemptScope, DeliveryQuery, DeliveryState, MessageQuery, Page};
use serde::Serialize;

use super::{endpoint::EndpointOut, message::MessageOut};
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
            id: a.id.into_string(),
            msg_id: a.msg_id.into_string(),
            endpoint_id: a.endpoint_id.into_string(),
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

/// Where a delivery stands, as Svix adds it to a message (`EndpointMessageOut`) or to an
/// endpoint (`MessageEndpointOut`).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryStateOut {
    status: u8,
    status_text: &'static str,
    /// When the next attempt is due, while the delivery is pending.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_attempt: Option<DateTime<Utc>>,
}

impl From<DeliveryState> for DeliveryStateOut {
    fn from(state: DeliveryState) -> Self {
        Self {
            status: state.status as u8,
            status_text: state.status.text(),
            next_attempt: state.next_attempt,
        }
    }
}

/// Svix's `EndpointMessageOut`: a message with where it stands with one endpoint.
#[derive(Serialize)]
pub struct EndpointMessageOut {
    #[serde(flatten)]
    message: MessageOut,
    #[serde(flatten)]
    state: DeliveryStateOut,
}

/// Svix's `MessageEndpointOut`: an endpoint with where one message stands with it.
#[derive(Serialize)]
pub struct MessageEndpointOut {
    #[serde(flatten)]
    endpoint: EndpointOut,
    #[serde(flatten)]
    state: DeliveryStateOut,
}

fn status_param(query: &QueryParams) -> ApiResult<Option<DeliveryStatus>> {
    match query.int("status")? {
        None => Ok(None),
        Some(code) => Ok(Some(DeliveryStatus::from_code(code).ok_or_else(|| {
            ApiError::invalid(&["query", "status"], "status must be 0, 1, 2 or 3")
        })?)),
    }
}

fn attempt_query(query: &QueryParams) -> ApiResult<AttemptQuery> {
    Ok(AttemptQuery {
        status: status_param(query)?,
        endpoint_id: query.str("endpoint_id").map(str::to_owned),
    })
}

/// `messageAttempt.get`: one attempt of the message, in the shape of the lists' items.
pub async fn get(
    State(state): State<ApiState>,
    caller: Caller,
    Path((app_id, msg_id, attempt_id)): Path<(String, String, String)>,
) -> ApiResult<Json<MessageAttemptOut>> {
    let app = caller.app(&state, &app_id).await?;
    let msg = state
        .store
        .get_message(&app.id, &msg_id)
        .await?
        .ok_or_else(|| ApiError::not_found("message"))?;
    // The message's attempts newest first, starting just above `attempt_id`: no attempt id
    // extends another (they are all `atmpt_` and a fixed-length KSUID), so the first row is
    // the attempt itself if the message has it.
    let page = Page {
        limit: 1,
        iterator: Some(format!("{attempt_id}~")),
        descending: true,
        backwards: false,
    };
    let rows = state
        .store
        .list_attempts(
            &app.id,
            &AttemptScope::Message(msg.id),
            &AttemptQuery::default(),
            &page,
        )
        .await?;
    rows.into_iter()
        .next()
        .filter(|a| a.id == attempt_id)
        .map(|a| Json(MessageAttemptOut::from(a)))
        .ok_or_else(|| ApiError::not_found("attempt"))
}

/// `messageAttempt.listAttemptedMessages`: the messages sent to the endpoint, newest first,
/// each with where it stands with the endpoint. Filters: `status` (of the delivery), `channel`,
/// `tag`, `event_types`, `before`/`after` (the message's creation), `with_content`. Ignored:
/// `expanded_statuses` (Herald never cancels a delivery, so there is no status 4 to expand).
pub async fn list_attempted_messages(
    State(state): State<ApiState>,
    caller: Caller,
    Path((app_id, endpoint_id)): Path<(String, String)>,
    query: QueryParams,
) -> ApiResult<Json<ListResponse<EndpointMessageOut>>> {
    let app = caller.app(&state, &app_id).await?;
    let endpoint = state
        .store
        .get_endpoint(&app.id, &endpoint_id)
        .await?
        .ok_or_else(|| ApiError::not_found("endpoint"))?;
    let page = pagination::page(&query, true)?;
    let with_content = query.bool("with_content", true)?;
    let filter = DeliveryQuery {
        message: MessageQuery {
            channel: query.str("channel").map(str::to_owned),
            event_types: query.list("event_types"),
            before: query.time("before")?,
            after: query.time("after")?,
        },
        tag: query.str("tag").map(str::to_owned),
        status: status_param(&query)?,
    };
    let rows = state
        .store
        .list_endpoint_deliveries(&app.id, &endpoint.id, &filter, &page)
        .await?;
    Ok(Json(pagination::list(
        rows,
        &page,
        |(m, _)| m.id.to_string(),
        |(m, delivery)| EndpointMessageOut {
            message: MessageOut::new(m, with_content),
            state: delivery.into(),
        },
    )))
}

/// `messageAttempt.listAttemptedDestinations`: the endpoints the message was sent to, by
/// ascending id, each with where the message stands with it.
pub async fn list_attempted_destinations(
    State(state): State<ApiState>,
    caller: Caller,
    Path((app_id, msg_id)): Path<(String, String)>,
    query: QueryParams,
) -> ApiResult<Json<ListResponse<MessageEndpointOut>>> {
    let app = caller.app(&state, &app_id).await?;
    let msg = state
        .store
        .get_message(&app.id, &msg_id)
        .await?
        .ok_or_else(|| ApiError::not_found("message"))?;
    let page = pagination::page(&query, false)?;
    let rows = state
        .store
        .list_message_deliveries(&app.id, &msg.id, &page)
        .await?;
    Ok(Json(pagination::list(
        rows,
        &page,
        |(e, _)| e.id.to_string(),
        |(e, delivery)| MessageEndpointOut {
            endpoint: e.into(),
            state: delivery.into(),
        },
    )))
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
        |a| a.id.to_string(),
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
        |a| a.id.to_string(),
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
