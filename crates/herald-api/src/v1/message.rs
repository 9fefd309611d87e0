//! `/api/v1/app/{app}/msg`: events to deliver. Creating one stores it and queues a delivery to
//! every matching endpoint in one commit before answering, so a 201 means it will arrive.

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
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MessageIn {
    #[serde(default)]
    event_id: Option<String>,
    event_type: String,
    /// Kept as the exact bytes received: never parsed into a value and re-serialized.
    payload: Box<RawValue>,
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
    // In Svix's schema; accepted and ignored (see the README): messages are not transformed.
    // `deliverAt` is refused when it is in the future (no scheduling yet): a scheduled message
    // must never go out early.
    #[serde(default, rename = "transformationsParams")]
    _transformations_params: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default, rename = "deliverAt")]
    deliver_at: Option<chrono::DateTime<chrono::Utc>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MessageOut {
    id: String,
    event_id: Option<String>,
    event_type: String,
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
            let input = ApplicationIn {
                uid: input.uid.or(Some(app_id.to_owned())),
                ..input
            };
            create_app(state, input).await
        }
        Err(e) => Err(e),
    }
}

pub async fn create(
    State(state): State<ApiState>,
    caller: Caller,
    Path(app_id): Path<String>,
    query: QueryParams,
    SvixJson(input): SvixJson<MessageIn>,
) -> ApiResult<Response> {
    let with_content = query.bool("with_content", true)?;
    validate_in(&input)?;
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
/// payload is replaced in the store at once, deliveries pending or not (a later attempt or
/// resend sends what is left, `{"expired": true}`); the message and its attempts stay, and
/// reading it shows `payload: {"expired": true}`, as Svix shows an expunged payload.
pub async fn expunge_content(
    State(state): State<ApiState>,
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

pub async fn get(
    State(state): State<ApiState>,
    caller: Caller,
    Path((app_id, msg_id)): Path<(String, String)>,
    query: QueryParams,
) -> ApiResult<Json<MessageOut>> {
    let with_content = query.bool("with_content", true)?;
    let app = caller.app(&state, &app_id).await?;
    let msg = state
        .store
        .get_message(&app.id, &msg_id)
        .await?
        .ok_or_else(|| ApiError::not_found("message"))?;
    Ok(Json(MessageOut::new(msg, with_content)))
}

pub async fn list(
    State(state): State<ApiState>,
    caller: Caller,
    Path(app_id): Path<String>,
    query: QueryParams,
) -> ApiResult<Json<ListResponse<MessageOut>>> {
    let app = caller.app(&state, &app_id).await?;
    let page = pagination::page(&query, true)?;
    let with_content = query.bool("with_content", true)?;
    let filter = MessageQuery {
        channel: query.str("channel").map(str::to_owned),
        event_types: query.list("event_types"),
        before: query.time("before")?,
        after: query.time("after")?,
    };
    let rows = state.store.list_messages(&app.id, &page, &filter).await?;
    Ok(Json(pagination::list(
        rows,
        &page,
        |m| m.id.to_string(),
        |m| MessageOut::new(m, with_content),
    )))
}
