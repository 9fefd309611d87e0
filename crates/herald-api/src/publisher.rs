//! The one publish path. Every producer of events (the Svix message API, the Pusher HTTP API,
//! webhooks in and their replays) publishes here, and nowhere else are webhook targets chosen,
//! messages and history stored together, delivery woken, or channels fanned out to.
//!
//! One event stream, both ways:
//! - A webhook message with `channels` also goes to the channels' subscribers (WebSocket and
//!   SSE), as an event named by its `eventType` whose `data` is the payload's JSON text.
//! - An event triggered through the Pusher HTTP API also becomes a webhook message for the
//!   Standard Webhooks endpoints whose filters match: `eventType` = the event name, `payload` =
//!   `data` if it is a JSON object, otherwise `{"data": <data>}`, `channels` = the event's.
//!
//! What a publication stores (the message and its first attempts, the history entries of the
//! channels that keep history, and for webhooks in the received request) is one commit:
//! a crash can never leave a message delivered as a webhook but missing from history, or the
//! reverse. Subscribers get the event only after that commit, in offset order per channel.

use bytes::Bytes;
use herald_core::{
    id,
    model::{App, EndpointFormat, IngestEvent, Message},
    pusher, validate,
};
use herald_store::IngestRecorded;

use crate::{ApiState, error::ApiResult};

/// Stores a message with its first attempts to the endpoints whose filters want it and the
/// history entries of its channels, in one commit, then wakes delivery and sends it to the
/// channels' subscribers.
pub(crate) async fn publish_message(
    state: &ApiState,
    app: &App,
    message: Message,
) -> ApiResult<()> {
    let targets =
        webhook_targets(state, app, &message.event_type, message.channels.as_deref()).await?;
    let wake = !targets.is_empty();
    let channels = subscribable(message.channels.as_deref());
    if channels.is_empty() {
        state.store.create_message(message, targets).await?;
    } else {
        let event_type = message.event_type.clone();
        // A reference-counted copy of the bytes, not of the payload.
        let payload = message.payload.clone();
        let data = payload_text(&payload);
        state
            .history
            .publish_with(
                app,
                &channels,
                &event_type,
                data,
                None,
                |history| async move {
                    let stored = Some((message, targets));
                    state.store.store_publication(stored, history).await?;
                    Ok(((), true))
                },
            )
            .await?;
    }
    if wake {
        state.dispatcher.wake();
    }
    Ok(())
}

/// Records a verified inbound webhook with the message it becomes (and that message's history
/// entries) in one commit, then publishes the message, unless the provider sent this delivery
/// before: then nothing is stored or published, and the earlier record is returned.
pub(crate) async fn publish_ingest(
    state: &ApiState,
    app: &App,
    event: IngestEvent,
    message: Message,
) -> ApiResult<IngestRecorded> {
    let targets =
        webhook_targets(state, app, &message.event_type, message.channels.as_deref()).await?;
    let wake = !targets.is_empty();
    let channels = subscribable(message.channels.as_deref());
    let event_type = message.event_type.clone();
    let payload = message.payload.clone();
    let data = payload_text(&payload);
    let (recorded, _) = state
        .history
        .publish_with(
            app,
            &channels,
            &event_type,
            data,
            None,
            |history| async move {
                let recorded = state
                    .store
                    .record_ingest(event, message, targets, history)
                    .await?;
                let new = matches!(recorded, IngestRecorded::New);
                Ok((recorded, new))
            },
        )
        .await?;
    if wake && matches!(recorded, IngestRecorded::New) {
        state.dispatcher.wake();
    }
    Ok(recorded)
}

/// Publishes an event triggered through the Pusher HTTP API to its channels (but socket
/// `except`), and as a webhook message to the Standard Webhooks endpoints that want it. Event
/// names that are not valid event type names are not forwarded to webhooks. Nothing is stored
/// for an event no endpoint wants on channels that keep no history.
pub(crate) async fn publish_pusher_event(
    state: &ApiState,
    app: &App,
    name: &str,
    channels: &[String],
    data: &str,
    except: Option<&str>,
) -> ApiResult<()> {
    // Targets first: the message (its id, its payload) is built only if an endpoint wants it.
    let channel_list = (!channels.is_empty()).then_some(channels);
    let targets = if validate::event_type_name(name).is_ok() {
        webhook_targets(state, app, name, channel_list).await?
    } else {
        tracing::debug!(
            event = name,
            "event name is not a valid event type; not forwarded to webhooks"
        );
        Vec::new()
    };
    let stored =
        (!targets.is_empty()).then(|| (pusher_event_message(app, name, channels, data), targets));
    let wake = stored.is_some();
    let channels = subscribable(Some(channels));
    state
        .history
        .publish_with(app, &channels, name, data, except, |history| async move {
            if stored.is_some() || !history.is_empty() {
                state.store.store_publication(stored, history).await?;
            }
            Ok(((), true))
        })
        .await?;
    if wake {
        state.dispatcher.wake();
    }
    Ok(())
}

/// The webhook message a Pusher event becomes.
fn pusher_event_message(app: &App, name: &str, channels: &[String], data: &str) -> Message {
    let is_object = serde_json::from_str::<serde_json::Value>(data).is_ok_and(|v| v.is_object());
    let payload = if is_object {
        Bytes::from(data.to_owned())
    } else {
        Bytes::from(serde_json::json!({ "data": data }).to_string())
    };
    let now = crate::now();
    Message {
        id: id::new_id(id::MESSAGE, now),
        app_id: app.id.clone(),
        event_id: None,
        event_type: name.to_owned(),
        channels: (!channels.is_empty()).then(|| channels.to_vec()),
        tags: None,
        payload,
        created_at: now,
    }
}

/// The app's Standard Webhooks endpoints that want an event of this type and channels.
async fn webhook_targets(
    state: &ApiState,
    app: &App,
    event_type: &str,
    channels: Option<&[String]>,
) -> ApiResult<Vec<String>> {
    let endpoints = state.store.app_endpoints(&app.id).await?;
    Ok(endpoints
        .iter()
        .filter(|ep| ep.wants(EndpointFormat::StandardWebhooks, event_type, channels))
        .map(|ep| ep.id.clone())
        .collect())
}

/// The channels a client can subscribe to; other names have no subscribers and keep no
/// history.
fn subscribable(channels: Option<&[String]>) -> Vec<String> {
    channels
        .unwrap_or_default()
        .iter()
        .filter(|c| pusher::validate_channel_name(c).is_ok())
        .cloned()
        .collect()
}

/// What subscribers get as `data`: the payload's JSON text (payloads are JSON, so UTF-8).
fn payload_text(payload: &Bytes) -> &str {
    std::str::from_utf8(payload).unwrap_or("{}")
}
