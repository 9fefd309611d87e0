//! Binary attachments between Socket.IO's form and the one event stream's.
//!
//! Socket.IO sends binary as attachments beside the JSON, which holds a placeholder
//! (`{"_placeholder":true,"num":0}`) where each one goes. A publication's data is JSON (it is
//! stored, replayed, carried between nodes and read by Pusher clients and webhooks), so an
//! attachment becomes `{"$binary": "<base64>"}` in it; a Socket.IO client is sent such an
//! object as binary again. Data without attachments is never re-serialized: its bytes pass
//! through as the client sent them.

use std::collections::VecDeque;

use base64::{Engine, engine::general_purpose::STANDARD};
use bytes::Bytes;
use serde::{Serialize, ser::SerializeMap, ser::SerializeSeq};
use serde_json::{Value, value::RawValue};

pub use herald_channels::publication::BINARY_KEY;

/// An event as a client sent it: its name and arguments (JSON, binary as `$binary`).
#[derive(Debug)]
pub struct Inbound {
    pub event: String,
    pub args: Vec<Box<RawValue>>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InboundError {
    #[error("an event packet must be a JSON array whose first element is the event name")]
    NotAnEvent,
    #[error("binary attachment {0} is missing")]
    MissingAttachment(u64),
    #[error(
        "binary attachment {0} has more than one placeholder; each attachment goes in one place"
    )]
    RepeatedAttachment(u64),
}

/// Reads an event packet's payload (`["name", args...]`) and its attachments.
pub fn read_event(
    text: &str,
    attachments: Option<&VecDeque<Bytes>>,
) -> Result<Inbound, InboundError> {
    match attachments.filter(|a| !a.is_empty()) {
        None => {
            let items: Vec<&RawValue> =
                serde_json::from_str(text).map_err(|_| InboundError::NotAnEvent)?;
            let (name, args) = items.split_first().ok_or(InboundError::NotAnEvent)?;
            let event: String =
                serde_json::from_str(name.get()).map_err(|_| InboundError::NotAnEvent)?;
            Ok(Inbound {
                event,
                args: args.iter().map(|arg| (*arg).to_owned()).collect(),
            })
        }
        Some(attachments) => {
            let Value::Array(items) =
                serde_json::from_str::<Value>(text).map_err(|_| InboundError::NotAnEvent)?
            else {
                return Err(InboundError::NotAnEvent);
            };
            let mut items = items.into_iter();
            let Some(Value::String(event)) = items.next() else {
                return Err(InboundError::NotAnEvent);
            };
            let mut placed = vec![false; attachments.len()];
            let args = items
                .map(|mut arg| {
                    fill_placeholders(&mut arg, attachments, &mut placed)?;
                    // A `Value` always serializes.
                    Ok(serde_json::value::to_raw_value(&arg).unwrap_or_default())
                })
                .collect::<Result<_, InboundError>>()?;
            Ok(Inbound { event, args })
        }
    }
}

/// Replaces each `{"_placeholder": true, "num": n}` with `{"$binary": base64(attachment n)}`.
///
/// Each attachment fills one placeholder at most (`placed` marks those used), as a Socket.IO
/// encoder writes them: a placeholder is a copy of its attachment here, so a packet naming one
/// attachment a thousand times would otherwise grow a thousandfold in memory before any size
/// limit sees it.
fn fill_placeholders(
    value: &mut Value,
    attachments: &VecDeque<Bytes>,
    placed: &mut [bool],
) -> Result<(), InboundError> {
    match value {
        Value::Object(map)
            if map.get("_placeholder") == Some(&Value::Bool(true)) && map.len() == 2 =>
        {
            let num = map.get("num").and_then(Value::as_u64).unwrap_or(u64::MAX);
            let index = usize::try_from(num)
                .ok()
                .filter(|&n| n < attachments.len())
                .ok_or(InboundError::MissingAttachment(num))?;
            if std::mem::replace(&mut placed[index], true) {
                return Err(InboundError::RepeatedAttachment(num));
            }
            *value = serde_json::json!({ BINARY_KEY: STANDARD.encode(&attachments[index]) });
        }
        Value::Object(map) => {
            for item in map.values_mut() {
                fill_placeholders(item, attachments, placed)?;
            }
        }
        Value::Array(items) => {
            for item in items {
                fill_placeholders(item, attachments, placed)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// A publication's data as a Socket.IO client is sent it: as it is, or (when it holds
/// `$binary` values) as a tree whose binary leaves Socket.IO sends as attachments.
pub enum Outbound<'a> {
    Raw(&'a RawValue),
    Shaped(Shaped),
}

impl<'a> Outbound<'a> {
    /// `data` as it is sent; parsed only when it `may_hold_binary` (it names [`BINARY_KEY`]:
    /// `Publication::json_data_may_hold_binary`, found once per publication).
    pub fn of(data: &'a RawValue, may_hold_binary: bool) -> Self {
        if !may_hold_binary {
            return Self::Raw(data);
        }
        match serde_json::from_str::<Value>(data.get()) {
            Ok(value) => Self::Shaped(shape(value)),
            Err(_) => Self::Raw(data),
        }
    }
}

impl Serialize for Outbound<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Raw(raw) => raw.serialize(serializer),
            Self::Shaped(shaped) => shaped.serialize(serializer),
        }
    }
}

/// JSON with binary leaves.
pub enum Shaped {
    Json(Value),
    Binary(Bytes),
    Array(Vec<Shaped>),
    Object(Vec<(String, Shaped)>),
}

fn shape(value: Value) -> Shaped {
    match value {
        Value::Object(map) if map.len() == 1 => {
            if let Some(Value::String(encoded)) = map.get(BINARY_KEY)
                && let Ok(bytes) = STANDARD.decode(encoded)
            {
                return Shaped::Binary(Bytes::from(bytes));
            }
            Shaped::Object(map.into_iter().map(|(k, v)| (k, shape(v))).collect())
        }
        Value::Object(map) => Shaped::Object(map.into_iter().map(|(k, v)| (k, shape(v))).collect()),
        Value::Array(items) => Shaped::Array(items.into_iter().map(shape).collect()),
        other => Shaped::Json(other),
    }
}

impl Serialize for Shaped {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Json(value) => value.serialize(serializer),
            // Socket.IO's serializer turns bytes into a placeholder and an attachment.
            Self::Binary(bytes) => serializer.serialize_bytes(bytes),
            Self::Array(items) => {
                let mut seq = serializer.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
            Self::Object(entries) => {
                let mut map = serializer.serialize_map(Some(entries.len()))?;
                for (key, value) in entries {
                    map.serialize_entry(key, value)?;
                }
                map.end()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_without_attachments_keeps_its_bytes() {
        let inbound = read_event(r#"["chat message", {"b":1,  "a":2}]"#, None).expect("event");
        assert_eq!(inbound.event, "chat message");
        assert_eq!(inbound.args.len(), 1);
        assert_eq!(inbound.args[0].get(), r#"{"b":1,  "a":2}"#);
    }

    #[test]
    fn attachments_become_base64_and_back() {
        let attachments = VecDeque::from([Bytes::from_static(&[0, 1, 2, 255])]);
        let inbound = read_event(
            r#"["file",{"name":"a.bin","body":{"_placeholder":true,"num":0}}]"#,
            Some(&attachments),
        )
        .expect("event");
        assert_eq!(
            inbound.args[0].get(),
            r#"{"body":{"$binary":"AAEC/w=="},"name":"a.bin"}"#
        );
        let Outbound::Shaped(Shaped::Object(entries)) = Outbound::of(&inbound.args[0], true) else {
            panic!("binary data is shaped");
        };
        assert!(
            entries.iter().any(|(k, v)| k == "body"
                && matches!(v, Shaped::Binary(b) if b.as_ref() == [0, 1, 2, 255]))
        );
    }

    #[test]
    fn malformed_events_and_missing_attachments_are_errors() {
        assert_eq!(read_event("{}", None).err(), Some(InboundError::NotAnEvent));
        assert_eq!(
            read_event("[1]", None).err(),
            Some(InboundError::NotAnEvent)
        );
        assert_eq!(read_event("[]", None).err(), Some(InboundError::NotAnEvent));
        let attachments = VecDeque::from([Bytes::from_static(b"x")]);
        assert_eq!(
            read_event(r#"["f",{"_placeholder":true,"num":3}]"#, Some(&attachments)).err(),
            Some(InboundError::MissingAttachment(3))
        );
    }

    #[test]
    fn an_attachment_named_by_more_than_one_placeholder_is_refused() {
        // Each placeholder would be a copy of the attachment: a packet of placeholders all
        // naming one large attachment must not multiply it in memory.
        let attachments = VecDeque::from([Bytes::from(vec![7u8; 1024])]);
        let placeholder = r#"{"_placeholder":true,"num":0}"#;
        let many = format!(r#"["f",[{}]]"#, vec![placeholder; 1000].join(","));
        assert_eq!(
            read_event(&many, Some(&attachments)).err(),
            Some(InboundError::RepeatedAttachment(0))
        );
        let across_arguments = format!(r#"["f",{placeholder},{placeholder}]"#);
        assert_eq!(
            read_event(&across_arguments, Some(&attachments)).err(),
            Some(InboundError::RepeatedAttachment(0))
        );
        // Two attachments, one placeholder each, in any order: accepted.
        let two = VecDeque::from([Bytes::from_static(b"a"), Bytes::from_static(b"b")]);
        let inbound = read_event(
            r#"["f",{"_placeholder":true,"num":1},[{"_placeholder":true,"num":0}]]"#,
            Some(&two),
        )
        .expect("each attachment placed once");
        assert_eq!(inbound.args[0].get(), r#"{"$binary":"Yg=="}"#);
        assert_eq!(inbound.args[1].get(), r#"[{"$binary":"YQ=="}]"#);
    }
}
