//! `/api/v1/app/{app}/msg`: events to deliver. Creating one stores it and queues a delivery to
//! every matching endpoint in one commit before answering, so a 201 means it will arrive.

use std::sync::Arc;

use axum::{
    Json,
    extract::{Path, State},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use chrono::{DateTime, Utc};
use herald_channels::Publish;
use herald_core::{
    model::{App, Message},
    validate,
};
use herald_store::MessageQuery;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::{
    application::{ApplicationIn, create_app},
    wire::MAX_RETENTION_DAYS,
};
use crate::{
    ApiState,
    auth::Caller,
    error::{ApiError, ApiResult, Validator},
    extract::{QueryParams, SvixJson},
    pagination::{self, ListResponse},
};

const MAX_CHANNELS: usize = 5;

/// Svix's `MessageIn`; any other field is a 422 naming it.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MessageIn {
    /// Your id for the event (a uid): unique per app, a repeat is a 409.
    #[serde(default)]
    event_id: Option<String>,
    event_type: String,
    /// A JSON object. Kept as the exact bytes received: never parsed into a value and
    /// re-serialized.
    #[schema(value_type = Object)]
    payload: Box<RawValue>,
    /// The channels it is also published to: 1 to 5, or null.
    #[serde(default)]
    channels: Option<Vec<String>>,
    #[serde(default)]
    tags: Option<Vec<String>>,
    /// Svix's "create the application if it does not exist yet".
    #[serde(default)]
    application: Option<ApplicationIn>,
    /// Days this message's payload is kept (Svix's), instead of its app's or the server's
    /// retention; exclusive with `payloadRetentionHours`.
    #[serde(default)]
    payload_retention_period: Option<i64>,
    /// Hours this message's payload is kept (Svix's).
    #[serde(default)]
    payload_retention_hours: Option<i64>,
    // In Svix's schema. Messages are not transformed, but `rawPayload` is the payload as the
    // producer serialized it: the SDKs' raw-payload helpers (and the Java and Kotlin SDKs on
    // every create) send the body there with `payload` empty. `deliverAt` is refused when it
    // is in the future (no scheduling yet): a scheduled message must never go out early.
    /// `rawPayload` (a string): the payload, serialized, used instead of `payload` and kept
    /// byte for byte; it must be a JSON object. Anything else in it is accepted and ignored.
    #[serde(default, rename = "transformationsParams")]
    #[schema(value_type = Option<Object>)]
    transformations_params: Option<serde_json::Map<String, serde_json::Value>>,
    /// Must not be in the future: scheduled delivery is not supported yet.
    #[serde(default, rename = "deliverAt")]
    deliver_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// Svix's `MessageOut`.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MessageOut {
    id: String,
    event_id: Option<String>,
    event_type: String,
    /// The payload as received; `{}` when `with_content=false`, and `{"expired": true}` once
    /// it was expunged or its retention ended.
    #[schema(value_type = Object)]
    payload: Box<RawValue>,
    channels: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tags: Option<Vec<String>>,
    timestamp: DateTime<Utc>,
}

impl MessageOut {
    pub(crate) fn new(msg: Message, with_content: bool) -> Self {
        let payload = if with_content {
            std::str::from_utf8(&msg.payload)
                .ok()
                .and_then(|s| RawValue::from_string(s.to_owned()).ok())
        } else {
            None
        };
        Self {
            id: msg.id.into_string(),
            event_id: msg.event_id,
            event_type: msg.event_type,
            payload: payload.unwrap_or_else(empty_object),
            channels: msg.channels,
            tags: msg.tags,
            timestamp: msg.created_at,
        }
    }
}

fn empty_object() -> Box<RawValue> {
    RawValue::from_string("{}".to_owned()).unwrap_or_else(|_| unreachable!("{{}} is valid JSON"))
}

fn validate_in(input: &MessageIn) -> ApiResult<()> {
    let mut v = Validator::default();
    v.check(
        &["body", "eventType"],
        validate::event_type_name(&input.event_type),
    );
    if let Some(event_id) = &input.event_id {
        v.check(&["body", "eventId"], validate::uid(event_id));
    }
    if let Some(at) = input.deliver_at
        && at > crate::now()
    {
        v.check(
            &["body", "deliverAt"],
            Err("scheduled delivery is not supported yet: omit deliverAt (or give a time not in the future) to deliver at once"),
        );
    }
    v.check(
        &["body", "payload"],
        if input.payload.get().starts_with('{') {
            Ok(())
        } else {
            Err("payload must be a JSON object")
        },
    );
    let period = input.payload_retention_period;
    let hours = input.payload_retention_hours;
    if period.is_some() && hours.is_some() {
        v.check(
            &["body", "payloadRetentionHours"],
            Err(
                "payloadRetentionPeriod and payloadRetentionHours are mutually exclusive: give one",
            ),
        );
    }
    if let Some(days) = period {
        v.check(
            &["body", "payloadRetentionPeriod"],
            if (1..=MAX_RETENTION_DAYS).contains(&days) {
                Ok(())
            } else {
                Err(format!(
                    "payloadRetentionPeriod must be 1 to {MAX_RETENTION_DAYS} days"
                ))
            },
        );
    }
    if let Some(hours) = hours {
        v.check(
            &["body", "payloadRetentionHours"],
            if (1..=MAX_RETENTION_DAYS * 24).contains(&hours) {
                Ok(())
            } else {
                Err(format!(
                    "payloadRetentionHours must be 1 to {} hours",
                    MAX_RETENTION_DAYS * 24
                ))
            },
        );
    }
    if let Some(channels) = &input.channels {
        if channels.is_empty() || channels.len() > MAX_CHANNELS {
            v.check(
                &["body", "channels"],
                Err(format!(
                    "channels must have 1 to {MAX_CHANNELS} items, or be null"
                )),
            );
        }
        for channel in channels {
            v.check(&["body", "channels"], validate::channel(channel));
        }
    }
    v.finish()
}

async fn app_for_create(
    state: &ApiState,
    caller: &Caller,
    app_id: &str,
    application: Option<ApplicationIn>,
) -> ApiResult<App> {
    match caller.app(state, app_id).await {
        Ok(app) => Ok(app),
        Err(ApiError::Standard {
            status: StatusCode::NOT_FOUND,
            ..
        }) if application.is_some() => {
            caller.require_environment()?;
            let Some(input) = application else {
                unreachable!("guarded by is_some")
            };
            // The app is made under the path's name, as Svix checks: one made under another
            // uid would hold a message the path does not name, and every retry would 409.
            if input.uid.as_deref().is_some_and(|uid| uid != app_id) {
                return Err(ApiError::invalid(
                    &["body", "application", "uid"],
                    format!(
                        "application.uid must be the app named in the path ({app_id}), or left out"
                    ),
                ));
            }
            let input = ApplicationIn {
                uid: Some(app_id.to_owned()),
                ..input
            };
            match create_app(state, input).await {
                // Another request made it since the lookup (a burst of first messages to a
                // new app): the message goes to that one, as Svix's SDKs retry no 409.
                Err(
                    conflict @ ApiError::Standard {
                        status: StatusCode::CONFLICT,
                        ..
                    },
                ) => match caller.app(state, app_id).await {
                    Ok(app) => Ok(app),
                    Err(_) => Err(conflict),
                },
                made => made,
            }
        }
        Err(e) => Err(e),
    }
}

/// `transformationsParams.rawPayload`, when given, becomes the payload (as Svix's server reads
/// it): a string holding the payload as serialized, kept byte for byte. Herald delivers JSON,
/// so it must hold a JSON object; `payload` beside it is whatever the SDK put there (`{}` or
/// `""`) and is replaced.
fn take_raw_payload(input: &mut MessageIn) -> ApiResult<()> {
    const LOC: &[&str] = &["body", "transformationsParams", "rawPayload"];
    let Some(raw) = input
        .transformations_params
        .as_mut()
        .and_then(|params| params.remove("rawPayload"))
    else {
        return Ok(());
    };
    let serde_json::Value::String(text) = raw else {
        return Err(ApiError::invalid(
            LOC,
            "rawPayload must be a string: the payload, serialized",
        ));
    };
    input.payload = serde_json::from_str::<Box<RawValue>>(&text).map_err(|e| {
        ApiError::invalid(
            LOC,
            format!("rawPayload must hold JSON (Herald delivers JSON payloads): {e}"),
        )
    })?;
    Ok(())
}

/// Publishes a message: stored and queued to every matching endpoint before the answer, so a
/// 201 means it will be delivered. With `application`, an environment token creates the app
/// first if it does not exist.
#[utoipa::path(post, path = "/api/v1/app/{app_id}/msg", tag = "Message",
    params(("app_id" = String, Path, description = "The app's id or uid"), ("with_content" = Option<bool>, Query, description = "Include the payload in the answer (default true); false shows `{}`")), request_body = MessageIn,
    responses((status = 201, body = MessageOut)))]
pub async fn create(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path(app_id): Path<String>,
    query: QueryParams,
    SvixJson(mut input): SvixJson<MessageIn>,
) -> ApiResult<Response> {
    let with_content = query.bool("with_content", true)?;
    take_raw_payload(&mut input)?;
    validate_in(&input)?;
    // A message's channels go live to the app's channel subscribers, as if the app's backend
    // had published them: not something an app portal link's customer may do.
    if caller.is_portal() && input.channels.as_ref().is_some_and(|c| !c.is_empty()) {
        return Err(crate::error::ApiError::forbidden(
            "an app portal link's token sends messages to endpoints only: `channels` publish to the app's channel subscribers, which is its backend's to do",
        ));
    }
    // The type of the app's channel webhooks, which go to its backend signed with its Pusher
    // secret: a message of it the customer wrote would be one resend away from that.
    if caller.hidden_event_type() == Some(input.event_type.as_str()) {
        return Err(crate::error::ApiError::forbidden(format!(
            "an app portal link's token cannot send {}: that type is the app's channel webhooks, its backend's",
            input.event_type
        )));
    }
    // An eventId is unique in the app: one a portal link's customer could choose would
    // refuse (409) the backend's own message of that id, and its channel publications.
    if caller.is_portal() && input.event_id.is_some() {
        return Err(crate::error::ApiError::forbidden(
            "an app portal link's token cannot give eventId: event ids are unique in the app, and choosing them is its backend's",
        ));
    }
    let app = app_for_create(&state, &caller, &app_id, input.application).await?;
    if let Err(limited) = state.publish_limits.check_app(app.id.as_str(), 1) {
        return Ok(limited.into_response());
    }

    let now = crate::now();
    // The message's own retention, in the API's days (24 hours, shorter only in tests);
    // without one, the publisher stamps the app's or the server's.
    let retention = match (
        input.payload_retention_period,
        input.payload_retention_hours,
    ) {
        (Some(days), _) => Some(state.retention_day.saturating_mul(clamp_u32(days))),
        (None, Some(hours)) => Some((state.retention_day / 24).saturating_mul(clamp_u32(hours))),
        (None, None) => None,
    };
    let payload_expires_at = retention.and_then(|kept| {
        now.checked_add_signed(chrono::Duration::from_std(kept).unwrap_or(chrono::Duration::MAX))
    });
    let message = Message {
        id: herald_core::MessageId::new(now),
        app_id: app.id.clone(),
        event_id: input.event_id,
        event_type: input.event_type,
        channels: input.channels,
        tags: input.tags,
        payload: bytes::Bytes::from(input.payload.get().to_owned()),
        created_at: now,
        payload_expires_at,
    };
    state
        .publisher
        .publish(&app, Publish::message(message.clone()))
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(MessageOut::new(message, with_content)),
    )
        .into_response())
}

/// Validated to 1 up to [`MAX_RETENTION_DAYS`] (times 24): always fits.
fn clamp_u32(value: i64) -> u32 {
    u32::try_from(value.max(0)).unwrap_or(u32::MAX)
}

/// `DELETE /api/v1/app/{app}/msg/{msg}/content` (Svix's "expunge message payload"): the
/// payload is replaced in the store at once, and the message's deliveries still to be made
/// fail (an attempt already claimed sends what it was claimed with; a resend is refused);
/// the message and its attempts stay, and reading it shows `payload: {"expired": true}`, as
/// Svix shows an expunged payload.
#[utoipa::path(delete, path = "/api/v1/app/{app_id}/msg/{msg_id}/content", tag = "Message",
    params(("app_id" = String, Path, description = "The app's id or uid"), ("msg_id" = String, Path, description = "The message's id or eventId")),
    responses((status = 204, description = "The payload was expunged")))]
pub async fn expunge_content(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path((app_id, msg_id)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let app = caller.app(&state, &app_id).await?;
    if state.store.expunge_payload(&app.id, &msg_id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("message"))
    }
}

/// One message.
#[utoipa::path(get, path = "/api/v1/app/{app_id}/msg/{msg_id}", tag = "Message",
    params(("app_id" = String, Path, description = "The app's id or uid"), ("msg_id" = String, Path, description = "The message's id or eventId"), ("with_content" = Option<bool>, Query, description = "Include the payload (default true); false shows `{}`")),
    responses((status = 200, body = MessageOut)))]
pub async fn get(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path((app_id, msg_id)): Path<(String, String)>,
    query: QueryParams,
) -> ApiResult<Json<MessageOut>> {
    let with_content = query.bool("with_content", true)?;
    let app = caller.app(&state, &app_id).await?;
    let msg = caller.message(&state, &app, &msg_id).await?;
    Ok(Json(MessageOut::new(msg, with_content)))
}

/// The app's messages, newest first.
#[utoipa::path(get, path = "/api/v1/app/{app_id}/msg", tag = "Message",
    params(("app_id" = String, Path, description = "The app's id or uid"), crate::pagination::ListParams, ("with_content" = Option<bool>, Query, description = "Include each payload (default true); false shows `{}`"),
        ("channel" = Option<String>, Query, description = "Only messages published to this channel"),
        ("tag" = Option<String>, Query, description = "Only messages with this tag"),
        ("event_types" = Option<Vec<String>>, Query, description = "Only these event types: repeated, or comma-separated"),
        ("before" = Option<DateTime<Utc>>, Query, description = "Only messages created before this time (RFC 3339)"),
        ("after" = Option<DateTime<Utc>>, Query, description = "Only messages created after this time (RFC 3339)")),
    responses((status = 200, body = ListResponse<MessageOut>)))]
pub async fn list(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path(app_id): Path<String>,
    query: QueryParams,
) -> ApiResult<Json<ListResponse<MessageOut>>> {
    let app = caller.app(&state, &app_id).await?;
    let page = pagination::starting_after(pagination::page(&query, true)?, &query);
    let with_content = query.bool("with_content", true)?;
    let filter = message_query(&query, &caller)?;
    let rows = state.store.list_messages(&app.id, &page, &filter).await?;
    Ok(Json(pagination::list(
        rows,
        &page,
        |m| m.id.to_string(),
        |m| MessageOut::new(m, with_content),
    )))
}

/// The message filters Svix's lists take: `channel`, `tag`, `event_types` (repeated or
/// comma-separated), and `before`/`after` (the message's creation). An empty value is no
/// filter: an SDK may send `event_types=` for an empty list. The messages `caller` may not
/// see are left out of every list ([`Caller::hidden_event_type`]).
pub(crate) fn message_query(query: &QueryParams, caller: &Caller) -> ApiResult<MessageQuery> {
    let text = |name| {
        query
            .str(name)
            .filter(|value| !value.is_empty())
            .map(str::to_owned)
    };
    Ok(MessageQuery {
        channel: text("channel"),
        tag: text("tag"),
        event_types: query.list("event_types").filter(|types| !types.is_empty()),
        before: query.time("before")?,
        after: query.time("after")?,
        except_event_type: caller.hidden_event_type().map(str::to_owned),
    })
}

/// This module's part of `/openapi.json`.
#[derive(utoipa::OpenApi)]
#[openapi(paths(list, create, get, expunge_content))]
pub(crate) struct Docs;
