//! Client frames, parsed: every JSON a client sends is read here and nowhere else.
//!
//! [`parse`] turns one text message into a [`ClientMessage`]; it never fails; a frame it cannot
//! use becomes [`ClientMessage::Malformed`] with the reason the client is told. `data` may arrive
//! as an object or as a JSON string holding one (older clients). A client event's `data` is kept
//! as raw JSON so it is relayed exactly as its sender wrote it. The JSON inside a subscribe
//! (`channel_data`) and a sign-in (`user_data`) is signed as text, so it stays text here until
//! the signature is checked; [`presence_member`] and [`signed_in_user`] read it afterwards.

use herald_core::validate;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::{history::Resume, hub::Joining};

/// One message from a client.
#[derive(Debug)]
pub enum ClientMessage {
    /// `pusher:ping`: answered with `pusher:pong`.
    Ping,
    /// `pusher:pong`: an answer to the server's ping (any message counts as activity).
    Pong,
    Subscribe(Subscribe),
    Unsubscribe {
        channel: String,
    },
    /// `pusher:signin`: `user_data` is the JSON text the app server signed.
    Signin {
        auth: String,
        user_data: String,
    },
    /// A `client-` event. `channel` and `data` are optional on the wire; the session refuses
    /// a missing channel.
    ClientEvent {
        event: String,
        channel: Option<String>,
        data: Option<Box<RawValue>>,
    },
    /// Any other event name.
    Unknown {
        event: String,
    },
    /// Not JSON, or a known event whose data does not fit: the reason, as the client is told.
    Malformed {
        reason: String,
    },
}

/// `pusher:subscribe`.
#[derive(Debug)]
pub struct Subscribe {
    pub channel: String,
    pub auth: Option<String>,
    /// A presence member's JSON text, exactly as the client sent it (it is signed as text).
    pub channel_data: Option<String>,
    /// Herald's extension: resume a history channel after this position (both `epoch` and
    /// `offset` given).
    pub resume: Option<Resume>,
}

/// A message from a client, as it is on the wire.
#[derive(Deserialize)]
struct Incoming {
    event: String,
    #[serde(default)]
    channel: Option<String>,
    #[serde(default)]
    data: Option<Box<RawValue>>,
}

#[derive(Deserialize)]
struct SubscribeData {
    channel: String,
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    channel_data: Option<String>,
    #[serde(default)]
    epoch: Option<String>,
    #[serde(default)]
    offset: Option<u64>,
}

#[derive(Deserialize)]
struct UnsubscribeData {
    channel: String,
}

#[derive(Deserialize)]
struct SigninData {
    auth: String,
    user_data: String,
}

/// A presence member as the app server described it in `channel_data`.
#[derive(Deserialize)]
struct ChannelData {
    user_id: serde_json::Value,
    #[serde(default)]
    user_info: Option<Box<RawValue>>,
}

/// The longest client event name, as for events published through the HTTP API (Pusher's).
pub use herald_core::validate::MAX_CLIENT_EVENT_NAME;

/// Reads one client text message.
pub fn parse(text: &str) -> ClientMessage {
    let message: Incoming = match serde_json::from_str(text) {
        Ok(message) => message,
        Err(e) => {
            return ClientMessage::Malformed {
                reason: format!("invalid JSON: {e}"),
            };
        }
    };
    let data = message.data.as_deref();
    let malformed = |event: &str, e: String| ClientMessage::Malformed {
        reason: format!("invalid {event}: {e}"),
    };
    match message.event.as_str() {
        "pusher:ping" => ClientMessage::Ping,
        "pusher:pong" => ClientMessage::Pong,
        "pusher:subscribe" => match parse_data::<SubscribeData>(data) {
            Ok(d) => {
                let resume = match (d.epoch, d.offset) {
                    (Some(epoch), Some(offset)) => Some(Resume { epoch, offset }),
                    (None, None) => None,
                    // Half a position is no position: answered, not read as a fresh subscribe
                    // that would leave the client believing it resumed.
                    _ => {
                        return malformed(
                            "pusher:subscribe",
                            "epoch and offset resume a history channel together; give both or neither"
                                .into(),
                        );
                    }
                };
                ClientMessage::Subscribe(Subscribe {
                    channel: d.channel,
                    auth: d.auth,
                    channel_data: d.channel_data,
                    resume,
                })
            }
            Err(e) => malformed("pusher:subscribe", e),
        },
        "pusher:unsubscribe" => match parse_data::<UnsubscribeData>(data) {
            Ok(d) => ClientMessage::Unsubscribe { channel: d.channel },
            Err(e) => malformed("pusher:unsubscribe", e),
        },
        "pusher:signin" => match parse_data::<SigninData>(data) {
            Ok(d) => ClientMessage::Signin {
                auth: d.auth,
                user_data: d.user_data,
            },
            Err(e) => malformed("pusher:signin", e),
        },
        name if name.starts_with("client-") && name.len() > MAX_CLIENT_EVENT_NAME => {
            ClientMessage::Malformed {
                reason: format!(
                    "invalid client event: its name is {} bytes; the limit is {MAX_CLIENT_EVENT_NAME}",
                    name.len()
                ),
            }
        }
        // The stores keep text without NUL (PostgreSQL's text and JSONB refuse it): such an
        // event could never be kept on a history channel nor in a `client_event` webhook, so
        // it is refused as what it is.
        name if name.starts_with("client-")
            && (name.contains('\0')
                || data.is_some_and(|d| validate::json_holds_escaped_nul(d.get().as_bytes()))) =>
        {
            ClientMessage::Malformed {
                reason: "invalid client event: its name and data may not contain NUL (\\u0000)"
                    .into(),
            }
        }
        name if name.starts_with("client-") => ClientMessage::ClientEvent {
            event: message.event,
            channel: message.channel,
            data: message.data,
        },
        _ => ClientMessage::Unknown {
            event: message.event,
        },
    }
}

/// `data` may arrive as an object or as a JSON string holding one (older clients).
fn parse_data<T: for<'de> Deserialize<'de>>(data: Option<&RawValue>) -> Result<T, String> {
    let raw = data.ok_or("missing data")?;
    match serde_json::from_str::<T>(raw.get()) {
        Ok(value) => Ok(value),
        Err(first) => match serde_json::from_str::<String>(raw.get()) {
            Ok(inner) => serde_json::from_str(&inner).map_err(|e| e.to_string()),
            Err(_) => Err(first.to_string()),
        },
    }
}

/// The presence member a (verified) `channel_data` describes; the error is the reason the
/// subscription is refused.
pub fn presence_member(channel_data: &str, max_user_info_bytes: usize) -> Result<Joining, String> {
    let data: ChannelData = serde_json::from_str(channel_data)
        .map_err(|e| format!("channel_data is not valid member JSON: {e}"))?;
    let user_id = match data.user_id {
        serde_json::Value::String(s) if herald_core::validate::user_id(&s).is_ok() => s,
        serde_json::Value::Number(n) => n.to_string(),
        _ => {
            return Err(
                "channel_data.user_id must be a string of 1 to 128 characters, none a control character, or a number".into(),
            );
        }
    };
    if let Some(info) = &data.user_info
        && info.get().len() > max_user_info_bytes
    {
        return Err(format!(
            "channel_data.user_info is larger than {max_user_info_bytes} bytes"
        ));
    }
    Ok(Joining {
        user_id,
        info: data.user_info,
    })
}

/// The user a (verified) sign-in's `user_data` names: its non-empty string `id`.
pub fn signed_in_user(user_data: &str) -> Option<String> {
    serde_json::from_str::<serde_json::Value>(user_data)
        .ok()
        .and_then(|v| v.get("id").and_then(|id| id.as_str().map(str::to_owned)))
        .filter(|id| !id.is_empty())
}

/// A client event's data as a `client_event` webhook reports it: a string's content as is,
/// anything else as its JSON text, as Pusher does.
pub fn event_text(data: &RawValue) -> String {
    serde_json::from_str::<String>(data.get()).unwrap_or_else(|_| data.get().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn malformed(text: &str) -> String {
        match parse(text) {
            ClientMessage::Malformed { reason } => reason,
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    #[test]
    fn client_events_with_a_nul_or_an_overlong_name_are_malformed() {
        let nul_name = malformed(r#"{"event":"client-a\u0000","channel":"private-a","data":{}}"#);
        assert!(nul_name.contains("may not contain NUL"), "{nul_name}");
        let nul_data =
            malformed(r#"{"event":"client-a","channel":"private-a","data":{"t":"x\u0000"}}"#);
        assert!(nul_data.contains("may not contain NUL"), "{nul_data}");
        let long = format!(
            r#"{{"event":"client-{}","channel":"private-a","data":{{}}}}"#,
            "a".repeat(MAX_CLIENT_EVENT_NAME)
        );
        assert!(malformed(&long).contains("the limit is 200"));
        // An escaped backslash before `u0000` is no NUL.
        assert!(matches!(
            parse(r#"{"event":"client-a","channel":"private-a","data":{"t":"\\u0000"}}"#),
            ClientMessage::ClientEvent { .. }
        ));
    }

    #[test]
    fn ping_and_pong_parse_whatever_their_data() {
        assert!(matches!(
            parse(r#"{"event":"pusher:ping","data":{}}"#),
            ClientMessage::Ping
        ));
        assert!(matches!(
            parse(r#"{"event":"pusher:ping"}"#),
            ClientMessage::Ping
        ));
        assert!(matches!(
            parse(r#"{"event":"pusher:pong","data":"{}"}"#),
            ClientMessage::Pong
        ));
    }

    #[test]
    fn subscribe_data_may_be_an_object_or_a_string_holding_one() {
        for text in [
            r#"{"event":"pusher:subscribe","data":{"channel":"a","auth":"k:s"}}"#,
            r#"{"event":"pusher:subscribe","data":"{\"channel\":\"a\",\"auth\":\"k:s\"}"}"#,
        ] {
            let ClientMessage::Subscribe(s) = parse(text) else {
                panic!("expected Subscribe from {text}");
            };
            assert_eq!(s.channel, "a");
            assert_eq!(s.auth.as_deref(), Some("k:s"));
            assert!(s.channel_data.is_none() && s.resume.is_none());
        }
    }

    #[test]
    fn subscribe_keeps_channel_data_as_the_text_that_was_signed() {
        let ClientMessage::Subscribe(s) = parse(
            r#"{"event":"pusher:subscribe","data":{"channel":"presence-x","auth":"k:s","channel_data":"{\"user_id\": 7}"}}"#,
        ) else {
            panic!("expected Subscribe");
        };
        assert_eq!(s.channel_data.as_deref(), Some(r#"{"user_id": 7}"#));
    }

    #[test]
    fn subscribe_resumes_with_both_epoch_and_offset_and_half_a_position_is_malformed() {
        let ClientMessage::Subscribe(s) =
            parse(r#"{"event":"pusher:subscribe","data":{"channel":"h","epoch":"e1","offset":4}}"#)
        else {
            panic!("expected Subscribe");
        };
        let resume = s.resume.expect("resume");
        assert_eq!((resume.epoch.as_str(), resume.offset), ("e1", 4));
        for half in [
            r#"{"event":"pusher:subscribe","data":{"channel":"h","offset":4}}"#,
            r#"{"event":"pusher:subscribe","data":{"channel":"h","epoch":"e1"}}"#,
        ] {
            assert!(
                malformed(half).contains("epoch and offset resume a history channel together"),
                "{half}"
            );
        }
    }

    #[test]
    fn unsubscribe_and_signin_parse_their_data() {
        assert!(matches!(
            parse(r#"{"event":"pusher:unsubscribe","data":{"channel":"a"}}"#),
            ClientMessage::Unsubscribe { channel } if channel == "a"
        ));
        assert!(matches!(
            parse(r#"{"event":"pusher:signin","data":{"auth":"k:s","user_data":"{\"id\":\"u\"}"}}"#),
            ClientMessage::Signin { auth, user_data } if auth == "k:s" && user_data == r#"{"id":"u"}"#
        ));
    }

    #[test]
    fn client_events_keep_their_data_verbatim() {
        let ClientMessage::ClientEvent {
            event,
            channel,
            data,
        } = parse(r#"{"event":"client-typing","channel":"private-c","data":{ "a" : 1 }}"#)
        else {
            panic!("expected ClientEvent");
        };
        assert_eq!(event, "client-typing");
        assert_eq!(channel.as_deref(), Some("private-c"));
        assert_eq!(
            data.map(|d| d.get().to_owned()).as_deref(),
            Some(r#"{ "a" : 1 }"#)
        );
    }

    #[test]
    fn unknown_events_are_named() {
        assert!(matches!(
            parse(r#"{"event":"pusher:nope"}"#),
            ClientMessage::Unknown { event } if event == "pusher:nope"
        ));
    }

    #[test]
    fn malformed_frames_say_what_is_wrong() {
        assert!(malformed("not json").starts_with("invalid JSON: "));
        assert!(malformed(r#"{"data":{}}"#).starts_with("invalid JSON: "));
        assert_eq!(
            malformed(r#"{"event":"pusher:subscribe"}"#),
            "invalid pusher:subscribe: missing data"
        );
        assert!(
            malformed(r#"{"event":"pusher:subscribe","data":{"auth":"x"}}"#)
                .starts_with("invalid pusher:subscribe: missing field `channel`")
        );
        assert!(
            malformed(r#"{"event":"pusher:unsubscribe","data":"{}"}"#)
                .starts_with("invalid pusher:unsubscribe: ")
        );
        assert!(
            malformed(r#"{"event":"pusher:signin","data":{"auth":"k:s"}}"#)
                .starts_with("invalid pusher:signin: ")
        );
    }

    #[test]
    fn presence_members_need_a_user_id_and_small_user_info() {
        let member = presence_member(r#"{"user_id":42,"user_info":{"n":"x"}}"#, 100).expect("ok");
        assert_eq!(member.user_id, "42");
        assert_eq!(
            member.info.map(|i| i.get().to_owned()).as_deref(),
            Some(r#"{"n":"x"}"#)
        );
        assert!(presence_member(r#"{"user_id":""}"#, 100).is_err());
        assert!(presence_member(r#"{"user_id":true}"#, 100).is_err());
        // Stored as text, where PostgreSQL refuses NUL.
        let Err(refused) = presence_member(r#"{"user_id":"a\u0000b"}"#, 100) else {
            panic!("a NUL in the user id is refused")
        };
        assert!(refused.contains("control character"), "{refused}");
        assert!(
            presence_member("nope", 100)
                .err()
                .is_some_and(|e| e.starts_with("channel_data is not valid member JSON"))
        );
        assert_eq!(
            presence_member(r#"{"user_id":"u","user_info":"0123456789"}"#, 8).err(),
            Some("channel_data.user_info is larger than 8 bytes".to_owned())
        );
    }

    #[test]
    fn a_signed_in_user_is_user_data_s_non_empty_string_id() {
        assert_eq!(signed_in_user(r#"{"id":"u1"}"#).as_deref(), Some("u1"));
        assert_eq!(signed_in_user(r#"{"id":""}"#), None);
        assert_eq!(signed_in_user(r#"{"id":1}"#), None);
        assert_eq!(signed_in_user("[]"), None);
    }

    #[test]
    fn webhooks_report_a_string_s_content_and_other_json_as_text() {
        let string = RawValue::from_string(r#""hi""#.into()).expect("raw");
        let object = RawValue::from_string(r#"{"a":1}"#.into()).expect("raw");
        assert_eq!(event_text(&string), "hi");
        assert_eq!(event_text(&object), r#"{"a":1}"#);
    }
}
