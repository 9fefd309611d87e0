//! Property tests (proptest) for the Pusher client frame parser, the first code every
//! WebSocket message reaches: arbitrary text, and JSON shaped like each client event with
//! arbitrary members, never panics; a well-formed subscribe reads back what was sent.

use herald_ws::protocol::client::{self, ClientMessage};
use proptest::prelude::*;
use serde_json::{Value, json};

fn member() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        any::<String>().prop_map(Value::from),
        "[a-z:_\\-]{0,20}".prop_map(Value::from),
        Just(json!({})),
        Just(json!([])),
        Just(json!({"channel": "x", "auth": 1})),
    ]
}

fn event() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "pusher:ping",
            "pusher:pong",
            "pusher:subscribe",
            "pusher:unsubscribe",
            "pusher:signin",
            "client-typing",
            "pusher_internal:subscription_succeeded",
        ])
        .prop_map(str::to_owned),
        any::<String>(),
    ]
}

proptest! {
    // Failures are kept next to this file (`properties.proptest-regressions`) and replayed first.
    #![proptest_config(ProptestConfig::with_failure_persistence(
        proptest::test_runner::FileFailurePersistence::WithSource("proptest-regressions"),
    ))]

    #[test]
    fn arbitrary_text_never_panics(text in any::<String>()) {
        let _ = client::parse(&text);
        let _ = client::presence_member(&text, 1024);
        let _ = client::signed_in_user(&text);
    }

    #[test]
    fn frames_of_every_event_with_arbitrary_members_never_panic(
        event in event(),
        data in prop::collection::btree_map(
            prop::sample::select(vec!["channel", "auth", "channel_data", "epoch", "offset", "user_data"]),
            member(),
            0..6,
        ),
        data_as_string in any::<bool>(),
        channel in prop::option::of(member()),
    ) {
        let data = Value::Object(data.into_iter().map(|(k, v)| (k.to_owned(), v)).collect());
        let mut frame = json!({"event": event});
        frame["data"] = if data_as_string { Value::String(data.to_string()) } else { data };
        if let Some(channel) = channel {
            frame["channel"] = channel;
        }
        let _ = client::parse(&frame.to_string());
    }

    #[test]
    fn a_subscribe_reads_back_its_channel_auth_and_position(
        channel in "[a-zA-Z0-9_\\-=@,.;]{1,164}",
        auth in "[a-f0-9:]{0,90}",
        offset in any::<u64>(),
        as_string in any::<bool>(),
    ) {
        let data = json!({"channel": channel, "auth": auth, "epoch": "e1", "offset": offset});
        let data = if as_string { Value::String(data.to_string()) } else { data };
        let parsed = client::parse(&json!({"event": "pusher:subscribe", "data": data}).to_string());
        let ClientMessage::Subscribe(subscribe) = parsed else {
            return Err(TestCaseError::fail(format!("not a subscribe: {parsed:?}")));
        };
        prop_assert_eq!(subscribe.channel, channel);
        prop_assert_eq!(subscribe.auth.as_deref(), Some(auth.as_str()));
        prop_assert_eq!(subscribe.resume.map(|r| r.offset), Some(offset));
    }
}
