//! Message attempts: the log of every HTTP request made, where each message stands with each
//! endpoint (Svix's attempted messages and attempted destinations), and manual resends.

use std::{collections::HashMap, sync::Arc};

use axum::{
    Json,
    extract::{Path, State},
    http::StatusCode,
};
use chrono::{DateTime, Utc};
use herald_core::model::{Attempt, DeliveryStatus, Message};
use herald_core::{AppId, MessageId};
use herald_store::{AttemptQuery, AttemptScope, DeliveryQuery, DeliveryState, MessageQuery, Page};
use serde::Serialize;

use super::{
    endpoint::EndpointOut,
    message::{MessageOut, message_query},
};
use crate::{
    ApiState,
    auth::Caller,
    error::{ApiError, ApiResult},
    extract::QueryParams,
    pagination::{self, ListResponse},
};

/// Svix's `MessageAttemptOut`: one HTTP request made to an endpoint.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MessageAttemptOut {
    id: String,
    msg_id: String,
    endpoint_id: String,
    url: String,
    /// The response body (or why there was none).
    response: String,
    /// The HTTP status, or 0 when no response came.
    response_status_code: i32,
    response_duration_ms: i64,
    /// 0 success, 1 pending, 2 fail, 3 sending.
    #[schema(maximum = 3)]
    status: u8,
    /// `status` in words: success, pending, fail or sending.
    status_text: &'static str,
    /// 0 scheduled, 1 manual (a resend or recovery of a delivery whose schedule was over; a
    /// resend while it is still on its schedule is that schedule's next attempt).
    #[schema(maximum = 1)]
    trigger_type: u8,
    timestamp: DateTime<Utc>,
    /// The message attempted, without its payload (`{}`), when the list was asked
    /// `with_msg=true` and the message is still kept.
    #[serde(skip_serializing_if = "Option::is_none")]
    msg: Option<MessageOut>,
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
            msg: None,
        }
    }
}

/// Where a delivery stands, as Svix adds it to a message (`EndpointMessageOut`) or to an
/// endpoint (`MessageEndpointOut`).
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryStateOut {
    /// 0 success, 1 pending, 2 fail, 3 sending.
    #[schema(maximum = 3)]
    status: u8,
    /// `status` in words: success, pending, fail or sending.
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
#[derive(Serialize, utoipa::ToSchema)]
pub struct EndpointMessageOut {
    #[serde(flatten)]
    message: MessageOut,
    #[serde(flatten)]
    state: DeliveryStateOut,
}

/// Svix's `MessageEndpointOut`: an endpoint with where one message stands with it.
#[derive(Serialize, utoipa::ToSchema)]
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

/// How an attempt list shows each attempt: with its response body (`with_content`, true
/// unless `false`) and with the message it attempted (`with_msg`, false unless `true`).
#[derive(Clone, Copy)]
struct Shown {
    with_content: bool,
    with_msg: bool,
}

/// The list's filters (`endpoint_id` is read by the list that takes it) and how it shows its
/// attempts.
fn attempt_query(query: &QueryParams, caller: &Caller) -> ApiResult<(AttemptQuery, Shown)> {
    let status_code_class = match query.int("status_code_class")? {
        None => None,
        Some(class @ (0 | 100 | 200 | 300 | 400 | 500)) => u16::try_from(class).ok(),
        Some(_) => {
            return Err(ApiError::invalid(
                &["query", "status_code_class"],
                "status_code_class must be 0 (no response), 100, 200, 300, 400 or 500",
            ));
        }
    };
    // `before` and `after` bound the attempt's time here, not its message's.
    let message = MessageQuery {
        before: None,
        after: None,
        ..message_query(query, caller)?
    };
    Ok((
        AttemptQuery {
            status: status_param(query)?,
            endpoint_id: None,
            before: query.time("before")?,
            after: query.time("after")?,
            status_code_class,
            message,
        },
        Shown {
            with_content: query.bool("with_content", true)?,
            with_msg: query.bool("with_msg", false)?,
        },
    ))
}

/// A page of attempts as the list shows them. With `with_msg`, the messages are read in one
/// query (`known` is one already read) and shown without their payloads, as Svix shows them;
/// an attempt whose message retention has since removed comes without one.
async fn attempts_out(
    state: &ApiState,
    app_id: &AppId,
    rows: Vec<Attempt>,
    page: &Page,
    shown: Shown,
    known: Option<Message>,
) -> ApiResult<ListResponse<MessageAttemptOut>> {
    let mut messages: HashMap<MessageId, Message> = HashMap::new();
    if shown.with_msg {
        if let Some(msg) = known {
            messages.insert(msg.id.clone(), msg);
        }
        let mut wanted: Vec<MessageId> = rows
            .iter()
            .filter(|a| !messages.contains_key(&a.msg_id))
            .map(|a| a.msg_id.clone())
            .collect();
        wanted.sort_unstable();
        wanted.dedup();
        if !wanted.is_empty() {
            for msg in state.store.get_messages(app_id, &wanted).await? {
                messages.insert(msg.id.clone(), msg);
            }
        }
    }
    Ok(pagination::list(
        rows,
        page,
        |a| a.id.to_string(),
        |record| {
            let msg = messages
                .get(&record.msg_id)
                .map(|m| MessageOut::new(m.clone(), false));
            let mut out = MessageAttemptOut::from(record);
            if !shown.with_content {
                out.response = String::new();
            }
            out.msg = msg;
            out
        },
    ))
}

/// `messageAttempt.get`: one attempt of the message, in the shape of the lists' items.
#[utoipa::path(get, path = "/api/v1/app/{app_id}/msg/{msg_id}/attempt/{attempt_id}", tag = "Message Attempt",
    params(("app_id" = String, Path, description = "The app's id or uid"), ("msg_id" = String, Path, description = "The message's id or eventId"), ("attempt_id" = String, Path, description = "The attempt's id")),
    responses((status = 200, body = MessageAttemptOut)))]
pub async fn get(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path((app_id, msg_id, attempt_id)): Path<(String, String, String)>,
) -> ApiResult<Json<MessageAttemptOut>> {
    let app = caller.app(&state, &app_id).await?;
    let msg = caller.message(&state, &app, &msg_id).await?;
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
#[utoipa::path(get, path = "/api/v1/app/{app_id}/endpoint/{endpoint_id}/msg", tag = "Message Attempt",
    params(("app_id" = String, Path, description = "The app's id or uid"), ("endpoint_id" = String, Path, description = "The endpoint's id or uid"), crate::pagination::ListParams,
        ("status" = Option<u8>, Query, description = "Only deliveries with this status: 0 success, 1 pending, 2 fail, 3 sending", maximum = 3),
        ("channel" = Option<String>, Query, description = "Only messages published to this channel"),
        ("tag" = Option<String>, Query, description = "Only messages with this tag"),
        ("event_types" = Option<Vec<String>>, Query, description = "Only these event types: repeated, or comma-separated"),
        ("before" = Option<DateTime<Utc>>, Query, description = "Only messages created before this time (RFC 3339)"),
        ("after" = Option<DateTime<Utc>>, Query, description = "Only messages created after this time (RFC 3339)"),
        ("with_content" = Option<bool>, Query, description = "Include each payload (default true); false shows `{}`")),
    responses((status = 200, body = ListResponse<EndpointMessageOut>)))]
pub async fn list_attempted_messages(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path((app_id, endpoint_id)): Path<(String, String)>,
    query: QueryParams,
) -> ApiResult<Json<ListResponse<EndpointMessageOut>>> {
    let app = caller.app(&state, &app_id).await?;
    let endpoint = caller.endpoint(&state, &app, &endpoint_id).await?;
    let page = pagination::starting_after(pagination::page(&query, true)?, &query);
    let with_content = query.bool("with_content", true)?;
    let filter = DeliveryQuery {
        message: message_query(&query, &caller)?,
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
#[utoipa::path(get, path = "/api/v1/app/{app_id}/msg/{msg_id}/endpoint", tag = "Message Attempt",
    params(("app_id" = String, Path, description = "The app's id or uid"), ("msg_id" = String, Path, description = "The message's id or eventId"), crate::pagination::ListParams),
    responses((status = 200, body = ListResponse<MessageEndpointOut>)))]
pub async fn list_attempted_destinations(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path((app_id, msg_id)): Path<(String, String)>,
    query: QueryParams,
) -> ApiResult<Json<ListResponse<MessageEndpointOut>>> {
    let app = caller.app(&state, &app_id).await?;
    let msg = caller.message(&state, &app, &msg_id).await?;
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

/// `messageAttempt.listByEndpoint`: the attempts made to the endpoint, newest first.
#[utoipa::path(get, path = "/api/v1/app/{app_id}/attempt/endpoint/{endpoint_id}", tag = "Message Attempt",
    params(("app_id" = String, Path, description = "The app's id or uid"), ("endpoint_id" = String, Path, description = "The endpoint's id or uid"), crate::pagination::ListParams, ("status" = Option<u8>, Query, description = "Only this status: 0 success, 1 pending, 2 fail, 3 sending", maximum = 3),
        ("before" = Option<DateTime<Utc>>, Query, description = "Only attempts made before this time (RFC 3339)"),
        ("after" = Option<DateTime<Utc>>, Query, description = "Only attempts made after this time (RFC 3339)"),
        ("status_code_class" = Option<u16>, Query, description = "Only attempts whose response status is in this class: 100, 200, 300, 400, 500, or 0 for no response"),
        ("channel" = Option<String>, Query, description = "Only attempts of messages published to this channel"),
        ("tag" = Option<String>, Query, description = "Only attempts of messages with this tag"),
        ("event_types" = Option<Vec<String>>, Query, description = "Only attempts of messages of these event types: repeated, or comma-separated"),
        ("with_content" = Option<bool>, Query, description = "Whether each attempt carries its response body (true by default)"),
        ("with_msg" = Option<bool>, Query, description = "Whether each attempt carries its message, without the payload (false by default)")),
    responses((status = 200, body = ListResponse<MessageAttemptOut>)))]
pub async fn list_by_endpoint(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path((app_id, endpoint_id)): Path<(String, String)>,
    query: QueryParams,
) -> ApiResult<Json<ListResponse<MessageAttemptOut>>> {
    let app = caller.app(&state, &app_id).await?;
    let endpoint = caller.endpoint(&state, &app, &endpoint_id).await?;
    let page = pagination::starting_after(pagination::page(&query, true)?, &query);
    let (filter, shown) = attempt_query(&query, &caller)?;
    let rows = state
        .store
        .list_attempts(
            &app.id,
            &AttemptScope::Endpoint(endpoint.id),
            &filter,
            &page,
        )
        .await?;
    Ok(Json(
        attempts_out(&state, &app.id, rows, &page, shown, None).await?,
    ))
}

/// `messageAttempt.listByMsg`: the attempts made for the message, newest first.
#[utoipa::path(get, path = "/api/v1/app/{app_id}/attempt/msg/{msg_id}", tag = "Message Attempt",
    params(("app_id" = String, Path, description = "The app's id or uid"), ("msg_id" = String, Path, description = "The message's id or eventId"), crate::pagination::ListParams, ("status" = Option<u8>, Query, description = "Only this status: 0 success, 1 pending, 2 fail, 3 sending", maximum = 3),
        ("endpoint_id" = Option<String>, Query, description = "Only attempts made to this endpoint (its id or uid)"),
        ("before" = Option<DateTime<Utc>>, Query, description = "Only attempts made before this time (RFC 3339)"),
        ("after" = Option<DateTime<Utc>>, Query, description = "Only attempts made after this time (RFC 3339)"),
        ("status_code_class" = Option<u16>, Query, description = "Only attempts whose response status is in this class: 100, 200, 300, 400, 500, or 0 for no response"),
        ("channel" = Option<String>, Query, description = "Only attempts of messages published to this channel"),
        ("tag" = Option<String>, Query, description = "Only attempts of messages with this tag"),
        ("event_types" = Option<Vec<String>>, Query, description = "Only attempts of messages of these event types: repeated, or comma-separated"),
        ("with_content" = Option<bool>, Query, description = "Whether each attempt carries its response body (true by default)"),
        ("with_msg" = Option<bool>, Query, description = "Whether each attempt carries its message, without the payload (false by default)")),
    responses((status = 200, body = ListResponse<MessageAttemptOut>)))]
pub async fn list_by_msg(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path((app_id, msg_id)): Path<(String, String)>,
    query: QueryParams,
) -> ApiResult<Json<ListResponse<MessageAttemptOut>>> {
    let endpoint = query.str("endpoint_id").map(str::to_owned);
    attempts_of_message(
        &state,
        &caller,
        &app_id,
        &msg_id,
        endpoint.as_deref(),
        &query,
    )
    .await
}

/// Svix's deprecated `messageAttempt.list` (the v1 SDKs' `listAttemptsByMsg` before it): the
/// message's attempts, as `attempt/msg/{msg_id}` lists them.
#[utoipa::path(get, path = "/api/v1/app/{app_id}/msg/{msg_id}/attempt", tag = "Message Attempt", operation_id = "list_attempts_of_message_deprecated",
    params(("app_id" = String, Path, description = "The app's id or uid"), ("msg_id" = String, Path, description = "The message's id or eventId"), crate::pagination::ListParams, ("status" = Option<u8>, Query, description = "Only this status: 0 success, 1 pending, 2 fail, 3 sending", maximum = 3),
        ("endpoint_id" = Option<String>, Query, description = "Only attempts made to this endpoint (its id or uid)"),
        ("before" = Option<DateTime<Utc>>, Query, description = "Only attempts made before this time (RFC 3339)"),
        ("after" = Option<DateTime<Utc>>, Query, description = "Only attempts made after this time (RFC 3339)")),
    responses((status = 200, body = ListResponse<MessageAttemptOut>)))]
pub async fn list_by_msg_deprecated(
    state: State<Arc<ApiState>>,
    caller: Caller,
    path: Path<(String, String)>,
    query: QueryParams,
) -> ApiResult<Json<ListResponse<MessageAttemptOut>>> {
    list_by_msg(state, caller, path, query).await
}

/// Svix's deprecated `messageAttempt.listAttemptsForEndpoint`: the message's attempts made
/// to one endpoint, as `attempt/msg/{msg_id}?endpoint_id=` lists them.
#[utoipa::path(get, path = "/api/v1/app/{app_id}/msg/{msg_id}/endpoint/{endpoint_id}/attempt", tag = "Message Attempt", operation_id = "list_attempts_for_endpoint_deprecated",
    params(("app_id" = String, Path, description = "The app's id or uid"), ("msg_id" = String, Path, description = "The message's id or eventId"), ("endpoint_id" = String, Path, description = "The endpoint's id or uid"), crate::pagination::ListParams, ("status" = Option<u8>, Query, description = "Only this status: 0 success, 1 pending, 2 fail, 3 sending", maximum = 3),
        ("before" = Option<DateTime<Utc>>, Query, description = "Only attempts made before this time (RFC 3339)"),
        ("after" = Option<DateTime<Utc>>, Query, description = "Only attempts made after this time (RFC 3339)")),
    responses((status = 200, body = ListResponse<MessageAttemptOut>)))]
pub async fn list_by_msg_and_endpoint(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path((app_id, msg_id, endpoint_id)): Path<(String, String, String)>,
    query: QueryParams,
) -> ApiResult<Json<ListResponse<MessageAttemptOut>>> {
    if query.str("endpoint_id").is_some() {
        return Err(ApiError::invalid(
            &["query", "endpoint_id"],
            "the path names the endpoint; leave endpoint_id out",
        ));
    }
    attempts_of_message(
        &state,
        &caller,
        &app_id,
        &msg_id,
        Some(&endpoint_id),
        &query,
    )
    .await
}

/// The attempts made for a message, to one endpoint (its id or uid) or to all.
async fn attempts_of_message(
    state: &Arc<ApiState>,
    caller: &Caller,
    app_id: &str,
    msg_id: &str,
    endpoint: Option<&str>,
    query: &QueryParams,
) -> ApiResult<Json<ListResponse<MessageAttemptOut>>> {
    let app = caller.app(state, app_id).await?;
    let msg = caller.message(state, &app, msg_id).await?;
    let page = pagination::starting_after(pagination::page(query, true)?, query);
    let (mut filter, shown) = attempt_query(query, caller)?;
    if let Some(endpoint) = endpoint {
        let endpoint = caller.endpoint(state, &app, endpoint).await?;
        filter.endpoint_id = Some(endpoint.id.to_string());
    }
    let rows = state
        .store
        .list_attempts(
            &app.id,
            &AttemptScope::Message(msg.id.clone()),
            &filter,
            &page,
        )
        .await?;
    Ok(Json(
        attempts_out(state, &app.id, rows, &page, shown, Some(msg)).await?,
    ))
}

/// Svix's `messageAttempt.expungeContent`: the attempt's logged response body is replaced by
/// `EXPUNGED` (an endpoint answered with something sensitive); the attempt stays.
#[utoipa::path(delete, path = "/api/v1/app/{app_id}/msg/{msg_id}/attempt/{attempt_id}/content", tag = "Message Attempt",
    params(("app_id" = String, Path, description = "The app's id or uid"), ("msg_id" = String, Path, description = "The message's id or eventId"), ("attempt_id" = String, Path, description = "The attempt's id")),
    responses((status = 204, description = "The response body was expunged")))]
pub async fn expunge_content(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path((app_id, msg_id, attempt_id)): Path<(String, String, String)>,
) -> ApiResult<StatusCode> {
    let app = caller.app(&state, &app_id).await?;
    let msg = caller.message(&state, &app, &msg_id).await?;
    if state
        .store
        .expunge_attempt_response(&app.id, &msg.id, &attempt_id)
        .await?
    {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("attempt"))
    }
}

/// Send the message to the endpoint again now. A delivery still on its retry schedule has its
/// next attempt brought forward, and the schedule carries on after it if it fails; otherwise
/// one manual attempt, not retried.
#[utoipa::path(post, path = "/api/v1/app/{app_id}/msg/{msg_id}/endpoint/{endpoint_id}/resend", tag = "Message Attempt",
    params(("app_id" = String, Path, description = "The app's id or uid"), ("msg_id" = String, Path, description = "The message's id or eventId"), ("endpoint_id" = String, Path, description = "The endpoint's id or uid")),
    responses((status = 202, description = "Queued; the body is an empty object", body = Object)))]
pub async fn resend(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path((app_id, msg_id, endpoint_id)): Path<(String, String, String)>,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    let app = caller.app(&state, &app_id).await?;
    let msg = caller.message(&state, &app, &msg_id).await?;
    let endpoint = caller.endpoint(&state, &app, &endpoint_id).await?;
    if endpoint.disabled {
        return Err(ApiError::bad_request(
            "endpoint_disabled",
            "the endpoint is disabled; enable it before resending",
        ));
    }
    // A `pusher` endpoint gets the app's channel webhooks, signed with its Pusher secret, and
    // nothing else; a Standard Webhooks endpoint never gets them. Resending across would sign
    // any message as a channel webhook (or hand a channel webhook to the wrong receiver).
    let channel_webhook = msg.event_type == herald_channels::channel_webhooks::EVENT_TYPE;
    if channel_webhook != (endpoint.format == herald_core::model::EndpointFormat::Pusher) {
        return Err(ApiError::bad_request(
            "wrong_format",
            if channel_webhook {
                "a channel webhook goes only to the app's pusher-format endpoints"
            } else {
                "a pusher-format endpoint gets only the app's channel webhooks"
            },
        ));
    }
    // As Svix's server: a payload expunged, or past its retention, is not sent again as
    // `{"expired":true}` by hand. The store checks it in the statement that queues the
    // attempt, so an expunge that commits after the message was read above still counts.
    let now = state.store.clock().now();
    if !state
        .store
        .enqueue_manual(&app.id, &msg.id, &endpoint.id, now)
        .await?
    {
        return Err(ApiError::bad_request(
            "missing_payload",
            "the message's payload has expired or was expunged: there is nothing to resend",
        ));
    }
    state.dispatcher.wake();
    // The SDKs parse an (empty) object from this response.
    Ok((StatusCode::ACCEPTED, Json(serde_json::json!({}))))
}

/// This module's part of `/openapi.json`.
#[derive(utoipa::OpenApi)]
#[openapi(paths(
    get,
    list_attempted_messages,
    list_attempted_destinations,
    list_by_endpoint,
    list_by_msg,
    list_by_msg_deprecated,
    list_by_msg_and_endpoint,
    expunge_content,
    resend
))]
pub(crate) struct Docs;
