//! The Pusher protocol's server frames, built once and shared by every subscriber. Client
//! frames are parsed by the WebSocket face (`herald_ws::protocol::client`), with `data` kept
//! as raw JSON so relayed client events are forwarded here unchanged.

use axum::extract::ws::Utf8Bytes;
use serde::Serialize;
use serde_json::value::RawValue;

/// A serialized server-to-client frame. Cloning shares the bytes.
pub type Frame = Utf8Bytes;

#[derive(Serialize)]
struct Outgoing<'a, D: Serialize + ?Sized> {
    event: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    channel: Option<&'a str>,
    data: &'a D,
    #[serde(skip_serializing_if = "Option::is_none")]
    user_id: Option<&'a str>,
}

fn encode<D: Serialize + ?Sized>(
    event: &str,
    channel: Option<&str>,
    data: &D,
    user_id: Option<&str>,
) -> Frame {
    let frame = Outgoing {
        event,
        channel,
        data,
        user_id,
    };
    // Strings, raw JSON and maps of them always serialize.
    serde_json::to_string(&frame)
        .unwrap_or_else(|_| unreachable!("frames serialize"))
        .into()
}

/// A channel event. `data` is sent as a JSON string, as the protocol's "double encoding" asks.
pub fn event(name: &str, channel: &str, data: &str) -> Frame {
    encode(name, Some(channel), data, None)
}

/// An event's data in a frame: a server event's text (sent as a JSON string) or a client
/// event's JSON as its sender wrote it.
#[derive(Serialize, Clone, Copy)]
#[serde(untagged)]
pub enum Data<'a> {
    Text(&'a str),
    Json(&'a RawValue),
}

/// An event on a history channel: Herald adds the event's `epoch` and `offset`, which
/// clients resume from; pusher-js ignores fields it does not know.
pub fn history_event(
    name: &str,
    channel: &str,
    data: Data<'_>,
    user_id: Option<&str>,
    epoch: &str,
    offset: u64,
) -> Frame {
    #[derive(Serialize)]
    struct WithPosition<'a> {
        event: &'a str,
        channel: &'a str,
        data: Data<'a>,
        #[serde(skip_serializing_if = "Option::is_none")]
        user_id: Option<&'a str>,
        epoch: &'a str,
        offset: u64,
    }
    serde_json::to_string(&WithPosition {
        event: name,
        channel,
        data,
        user_id,
        epoch,
        offset,
    })
    .unwrap_or_else(|_| unreachable!("frames serialize"))
    .into()
}

/// A relayed client event: `data` exactly as its sender wrote it, plus the sender's user id
/// on presence channels.
pub fn client_event(name: &str, channel: &str, data: &RawValue, user_id: Option<&str>) -> Frame {
    encode(name, Some(channel), data, user_id)
}

/// A `pusher:` or `pusher_internal:` event whose data is a JSON object, sent double-encoded.
pub fn system(name: &str, channel: Option<&str>, data: &serde_json::Value) -> Frame {
    encode(name, channel, &data.to_string(), None)
}

/// `pusher_internal:member_added`: the user and its `user_info` as the app server wrote it
/// (`null` if none or not JSON).
pub fn member_added(channel: &str, user_id: &str, info: Option<&str>) -> Frame {
    let info: serde_json::Value = info
        .and_then(|i| serde_json::from_str(i).ok())
        .unwrap_or(serde_json::Value::Null);
    system(
        "pusher_internal:member_added",
        Some(channel),
        &serde_json::json!({"user_id": user_id, "user_info": info}),
    )
}

/// `pusher_internal:member_removed`.
pub fn member_removed(channel: &str, user_id: &str) -> Frame {
    system(
        "pusher_internal:member_removed",
        Some(channel),
        &serde_json::json!({"user_id": user_id}),
    )
}

pub fn connection_established(socket_id: &str, activity_timeout_secs: u64) -> Frame {
    system(
        "pusher:connection_established",
        None,
        &serde_json::json!({"socket_id": socket_id, "activity_timeout": activity_timeout_secs}),
    )
}

/// `pusher:error` (data is an object, not double-encoded, as Pusher sends it).
pub fn error(message: &str, code: Option<u16>) -> Frame {
    encode(
        "pusher:error",
        None,
        &serde_json::json!({"message": message, "code": code}),
        None,
    )
}

/// `pusher:subscription_error`, the de-facto form pusher-js users bind to.
pub fn subscription_error(channel: &str, kind: &str, message: &str, status: u16) -> Frame {
    encode(
        "pusher:subscription_error",
        Some(channel),
        &serde_json::json!({"type": kind, "error": message, "status": status}),
        None,
    )
}

pub fn pong() -> Frame {
    Frame::from_static(r#"{"event":"pusher:pong","data":"{}"}"#)
}

pub fn ping() -> Frame {
    Frame::from_static(r#"{"event":"pusher:ping","data":"{}"}"#)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_double_encoded() {
        let frame = event("order.paid", "orders", r#"{"id":1}"#);
        assert_eq!(
            frame.as_str(),
            r#"{"event":"order.paid","channel":"orders","data":"{\"id\":1}"}"#
        );
        let established = connection_established("1.2", 120);
        let v: serde_json::Value = serde_json::from_str(established.as_str()).expect("json");
        let inner: serde_json::Value =
            serde_json::from_str(v["data"].as_str().expect("string")).expect("inner");
        assert_eq!(inner["activity_timeout"], 120);
    }

    #[test]
    fn client_events_keep_their_data_verbatim() {
        let data = RawValue::from_string(r#"{ "text" : "hi" }"#.into()).expect("raw");
        let frame = client_event("client-msg", "private-chat", &data, Some("7"));
        assert_eq!(
            frame.as_str(),
            r#"{"event":"client-msg","channel":"private-chat","data":{ "text" : "hi" },"user_id":"7"}"#
        );
    }
}
