//! The unit of fan-out: one event on one channel, after it was committed.
//!
//! A [`Publication`] is built once per channel by the [`Publisher`](crate::publisher::Publisher)
//! and handed through the [`Broker`](crate::broker::Broker) to every hub, which gives each
//! subscriber a reference to it. Each face asks it for its own encoding (the Pusher frame
//! today; SSE uses that frame as its `data` and reads the position from the struct, so it never
//! parses JSON; Socket.IO packets later), which is built the first time it is asked for and
//! shared from then on: one encoding per node per protocol, however many subscribers.

use herald_core::AppId;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use herald_core::history::{HistoryEntry, Position};
use serde_json::value::RawValue;

use crate::{
    Frame,
    protocol::{self, Data},
};

/// An event's data: a server event's text (payload JSON, or a Pusher API `data` string; sent
/// as a JSON string, Pusher's double encoding), or a client event's JSON as its sender wrote it.
#[derive(Debug, Clone)]
pub enum EventData {
    /// UTF-8 text. Shares the bytes of the message payload it came from.
    Text(Bytes),
    /// Raw JSON, forwarded verbatim.
    Json(Box<RawValue>),
}

impl EventData {
    /// Text data from a string's bytes.
    pub fn text(text: impl Into<String>) -> Self {
        Self::Text(Bytes::from(text.into()))
    }

    /// Text data sharing a payload's bytes; bytes that are not UTF-8 (a payload is JSON, so
    /// never) become `{}`.
    pub fn payload(payload: &Bytes) -> Self {
        if std::str::from_utf8(payload).is_ok() {
            Self::Text(payload.clone())
        } else {
            Self::Text(Bytes::from_static(b"{}"))
        }
    }

    /// The data as it is kept in history: the text, or the JSON (`raw_json`).
    pub fn as_str(&self) -> &str {
        match self {
            Self::Text(bytes) => std::str::from_utf8(bytes).unwrap_or("{}"),
            Self::Json(json) => json.get(),
        }
    }

    pub fn is_json(&self) -> bool {
        matches!(self, Self::Json(_))
    }

    fn frame_data(&self) -> Data<'_> {
        match self {
            Self::Text(_) => Data::Text(self.as_str()),
            Self::Json(json) => Data::Json(json),
        }
    }
}

/// One event on one channel, committed (kept in history if the channel keeps any) and ready
/// to go to its subscribers.
#[derive(Debug)]
pub struct Publication {
    pub app_id: AppId,
    pub channel: String,
    pub event: String,
    pub data: EventData,
    /// The sender's user id, for client events on presence channels.
    pub user_id: Option<String>,
    /// Where the event sits in the channel's history; `None` on channels that keep none.
    pub position: Option<Position>,
    /// A socket that must not receive it: a client event's sender, or a Pusher trigger's
    /// `socket_id`.
    pub except: Option<String>,
    pusher: OnceLock<Frame>,
    json_data: OnceLock<JsonData>,
}

impl Publication {
    pub fn new(
        app_id: &AppId,
        channel: impl Into<String>,
        event: impl Into<String>,
        data: EventData,
    ) -> Self {
        Self {
            app_id: app_id.clone(),
            channel: channel.into(),
            event: event.into(),
            data,
            user_id: None,
            position: None,
            except: None,
            pusher: OnceLock::new(),
            json_data: OnceLock::new(),
        }
    }

    pub fn with_position(mut self, position: Option<Position>) -> Self {
        self.position = position;
        self
    }

    pub fn with_user(mut self, user_id: Option<String>) -> Self {
        self.user_id = user_id;
        self
    }

    pub fn except(mut self, socket_id: Option<String>) -> Self {
        self.except = socket_id;
        self
    }

    /// A kept event, as it is replayed to a resuming subscriber: the same publication it was.
    pub fn from_history(entry: &HistoryEntry) -> Self {
        let json = entry
            .raw_json
            .then(|| RawValue::from_string(entry.data.clone()).ok())
            .flatten();
        let data = match json {
            Some(json) => EventData::Json(json),
            None => EventData::text(entry.data.clone()),
        };
        Self::new(&entry.app_id, &entry.channel, &entry.event, data)
            .with_user(entry.user_id.clone())
            .except(entry.except.clone())
            .with_position(Some(Position {
                epoch: entry.epoch.clone(),
                offset: entry.offset,
            }))
    }

    /// The offset, on a history channel.
    pub fn offset(&self) -> Option<u64> {
        self.position.as_ref().map(|p| p.offset)
    }

    /// The data as one JSON value, built on first use and shared from then on: JSON data as
    /// it is; text that is JSON as that JSON (as pusher-js reads an event's string data);
    /// other text as a JSON string. Faces whose events carry JSON values (Socket.IO) send it.
    pub fn json_data(&self) -> &RawValue {
        &self.json().value
    }

    /// Whether [`Publication::json_data`] names [`BINARY_KEY`], so it may hold binary values;
    /// found once per publication, not once per subscriber.
    pub fn json_data_may_hold_binary(&self) -> bool {
        self.json().may_hold_binary
    }

    fn json(&self) -> &JsonData {
        self.json_data.get_or_init(|| {
            let value = match &self.data {
                EventData::Json(json) => json.clone(),
                EventData::Text(_) => {
                    let text = self.data.as_str();
                    // `from_string` checks that the text is one JSON value and keeps it
                    // verbatim. Serializing a string cannot fail (`null` keeps it total).
                    RawValue::from_string(text.to_owned())
                        .or_else(|_| serde_json::value::to_raw_value(text))
                        .unwrap_or_default()
                }
            };
            let may_hold_binary = value.get().contains(BINARY_KEY);
            JsonData {
                value,
                may_hold_binary,
            }
        })
    }

    /// The Pusher protocol frame, built on first use and shared from then on:
    /// `{"event","channel","data"[,"user_id"][,"epoch","offset"]}`.
    pub fn pusher_frame(&self) -> &Frame {
        self.pusher.get_or_init(|| {
            let data = self.data.frame_data();
            match &self.position {
                Some(p) => protocol::history_event(
                    &self.event,
                    &self.channel,
                    data,
                    self.user_id.as_deref(),
                    &p.epoch,
                    p.offset,
                ),
                None => match data {
                    Data::Text(text) => protocol::event(&self.event, &self.channel, text),
                    Data::Json(json) => protocol::client_event(
                        &self.event,
                        &self.channel,
                        json,
                        self.user_id.as_deref(),
                    ),
                },
            }
        })
    }
}

/// The key of a binary value in an event's data: `{"$binary": "<base64>"}`. Faces that carry
/// binary (Socket.IO attachments) store it this way and turn it back into binary for their
/// clients; the others see the object.
pub const BINARY_KEY: &str = "$binary";

/// [`Publication::json_data`] and what faces ask of it.
#[derive(Debug)]
struct JsonData {
    value: Box<RawValue>,
    may_hold_binary: bool,
}

/// What a subscriber's outbox carries: a publication (shared by every subscriber, each face
/// encoding it its own way, once per node) or a frame for this connection or channel alone
/// (confirmations, errors, pings, presence notices).
#[derive(Debug, Clone)]
pub enum Outgoing {
    Publication(Arc<Publication>),
    Frame(Frame),
}

impl Outgoing {
    /// The Pusher protocol frame.
    pub fn pusher_frame(&self) -> &Frame {
        match self {
            Self::Publication(p) => p.pusher_frame(),
            Self::Frame(f) => f,
        }
    }
}

impl From<Frame> for Outgoing {
    fn from(frame: Frame) -> Self {
        Self::Frame(frame)
    }
}

impl From<Arc<Publication>> for Outgoing {
    fn from(publication: Arc<Publication>) -> Self {
        Self::Publication(publication)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_data_is_built_once_and_reads_text_as_pusher_js_does() {
        let app = AppId::parse("app_1").expect("valid");
        let json_text = Publication::new(&app, "c", "e", EventData::text("{\"a\": 1}"));
        assert_eq!(
            json_text.json_data().get(),
            "{\"a\": 1}",
            "JSON text, verbatim"
        );
        assert!(
            std::ptr::eq(json_text.json_data(), json_text.json_data()),
            "built once"
        );
        let plain = Publication::new(&app, "c", "e", EventData::text("not \"json\""));
        assert_eq!(
            plain.json_data().get(),
            r#""not \"json\"""#,
            "a JSON string"
        );
        let raw = RawValue::from_string("[1, 2]".to_owned()).expect("json");
        let client = Publication::new(&app, "c", "e", EventData::Json(raw));
        assert_eq!(client.json_data().get(), "[1, 2]");
        assert!(!client.json_data_may_hold_binary());
        let raw = RawValue::from_string(r#"{"f":{"$binary":"AA=="}}"#.to_owned()).expect("json");
        let binary = Publication::new(&app, "c", "e", EventData::Json(raw));
        assert!(binary.json_data_may_hold_binary());
    }

    #[test]
    fn a_history_event_is_encoded_once_with_its_position() {
        let p = Publication::new(
            &AppId::parse("app_1").expect("valid"),
            "history-x",
            "order.paid",
            EventData::text("{\"a\":1}"),
        )
        .with_position(Some(Position {
            epoch: "e1".into(),
            offset: 7,
        }));
        let frame = p.pusher_frame();
        assert_eq!(
            frame.as_str(),
            r#"{"event":"order.paid","channel":"history-x","data":"{\"a\":1}","epoch":"e1","offset":7}"#
        );
        assert!(
            std::ptr::eq(frame, p.pusher_frame()),
            "the second ask returns the same frame"
        );
    }

    #[test]
    fn client_event_data_stays_verbatim_and_replays_identically() {
        let json = RawValue::from_string(r#"{ "t" : 1 }"#.into()).expect("raw");
        let live = Publication::new(
            &AppId::parse("app_1").expect("valid"),
            "private-c",
            "client-x",
            EventData::Json(json),
        )
        .with_user(Some("u1".into()));
        assert_eq!(
            live.pusher_frame().as_str(),
            r#"{"event":"client-x","channel":"private-c","data":{ "t" : 1 },"user_id":"u1"}"#
        );
        let entry = HistoryEntry {
            app_id: AppId::parse("app_1").expect("valid"),
            channel: "private-history-c".into(),
            epoch: "e".into(),
            offset: 2,
            event: "client-x".into(),
            data: r#"{ "t" : 1 }"#.into(),
            raw_json: true,
            user_id: Some("u1".into()),
            created_at: chrono::Utc::now(),
            except: Some("1.1".into()),
        };
        let replayed = Publication::from_history(&entry);
        assert_eq!(
            replayed.except.as_deref(),
            Some("1.1"),
            "its sender is left out when it is read back"
        );
        assert_eq!(
            replayed.pusher_frame().as_str(),
            r#"{"event":"client-x","channel":"private-history-c","data":{ "t" : 1 },"user_id":"u1","epoch":"e","offset":2}"#
        );
    }
}
