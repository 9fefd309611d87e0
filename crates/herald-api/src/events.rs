//! One event stream: the bridge between webhook messages and WebSocket channels.
//!
//! - A webhook message with `channels` also goes to WebSocket subscribers of those channels,
//!   as an event named by its `eventType` whose `data` is the payload's JSON text.
//! - An event triggered through the Pusher HTTP API also becomes a webhook message for the
//!   endpoints whose filters match: `eventType` = the event name, `payload` = `data` if it is
//!   a JSON object, otherwise `{"data": <data>}`, `channels` = the event's channels.
//!
//! Each path does both deliveries itself, so nothing loops.

use bytes::Bytes;
use herald_core::{
    id,
    model::{App, EndpointFormat, Message},
    pusher, validate,
};
use herald_ws::protocol;

use crate::{ApiState, error::ApiResult};

/// Sends an event to the WebSocket subscribers of each channel (but `except`, a socket id),
/// through channel history where the channel keeps it. Channels whose names are not valid
/// Pusher channel names have no subscribers and are skipped. Returns the number of frames
/// handed to connections.
///
/// If the store cannot append to a channel's history, the event still goes out live (without
/// a position) and the failure is logged: store trouble degrades recovery, not delivery.
pub(crate) async fn broadcast(
    state: &ApiState,
    app: &App,
    name: &str,
    channels: &[String],
    data: &str,
    except: Option<&str>,
) -> usize {
    let mut sent = 0;
    for channel in channels {
        if pusher::validate_channel_name(channel).is_err() {
            continue;
        }
        sent += match state
            .history
            .publish(app, channel, name, data, except)
            .await
        {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(error = %e, %channel, "appending to channel history failed; sent live only");
                // Serialized once per channel; every subscriber shares the bytes.
                let frame = protocol::event(name, channel, data);
                state.hub.app(&app.id).broadcast(channel, &frame, except)
            }
        };
    }
    sent
}

/// The app's Standard Webhooks endpoints that want a message of this type and channels.
pub(crate) async fn webhook_targets(
    state: &ApiState,
    app_id: &str,
    event_type: &str,
    channels: Option<&[String]>,
) -> ApiResult<Vec<String>> {
    let endpoints = state.store.app_endpoints(app_id).await?;
    Ok(endpoints
        .iter()
        .filter(|ep| ep.wants(EndpointFormat::StandardWebhooks, event_type, channels))
        .map(|ep| ep.id.clone())
        .collect())
}

/// Stores a Pusher-triggered event as a webhook message if any endpoint wants it. Event names
/// that are not valid event type names are not forwarded to webhooks.
pub(crate) async fn forward_to_webhooks(
    state: &ApiState,
    app: &App,
    name: &str,
    channels: &[String],
    data: &str,
) -> ApiResult<()> {
    if validate::event_type_name(name).is_err() {
        tracing::debug!(
            event = name,
            "event name is not a valid event type; not forwarded to webhooks"
        );
        return Ok(());
    }
    let channels = (!channels.is_empty()).then(|| channels.to_vec());
    let targets = webhook_targets(state, &app.id, name, channels.as_deref()).await?;
    if targets.is_empty() {
        return Ok(());
    }
    let is_object = serde_json::from_str::<serde_json::Value>(data).is_ok_and(|v| v.is_object());
    let payload = if is_object {
        Bytes::from(data.to_owned())
    } else {
        Bytes::from(serde_json::json!({ "data": data }).to_string())
    };
    let now = crate::now();
    let message = Message {
        id: id::new_id(id::MESSAGE, now),
        app_id: app.id.clone(),
        event_id: None,
        event_type: name.to_owned(),
        channels,
        tags: None,
        payload,
        created_at: now,
    };
    state.store.create_message(message, targets).await?;
    state.dispatcher.wake();
    Ok(())
}
