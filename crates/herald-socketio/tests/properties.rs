//! Property tests (proptest) for what the Socket.IO face reads from clients: event packets
//! with binary attachments, and handshake tokens. Arbitrary input never panics; attachments
//! survive the round trip into stored JSON and back; a token verifies only with its secret.

use std::collections::VecDeque;

use bytes::Bytes;
use herald_socketio::{binary, token};
use proptest::prelude::*;
use serde_json::json;

const NOW: i64 = 1_800_000_000;

proptest! {
    // Failures are kept next to this file (`properties.proptest-regressions`) and replayed first.
    #![proptest_config(ProptestConfig::with_failure_persistence(
        proptest::test_runner::FileFailurePersistence::WithSource("proptest-regressions"),
    ))]

    #[test]
    fn arbitrary_event_payloads_never_panic(
        text in prop_oneof![any::<String>(), "\\[\"[a-z ]{0,10}\"(,.{0,40})?\\]"],
        attachments in prop::option::of(prop::collection::vec(prop::collection::vec(any::<u8>(), 0..16), 0..4)),
    ) {
        let attachments: Option<VecDeque<Bytes>> =
            attachments.map(|a| a.into_iter().map(Bytes::from).collect());
        if let Ok(event) = binary::read_event(&text, attachments.as_ref()) {
            for arg in &event.args {
                let _ = serde_json::to_string(&binary::Outbound::of(arg, true));
            }
        }
    }

    #[test]
    fn attachments_become_base64_and_come_back_as_the_same_bytes(
        blobs in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 1..4),
        name in "[a-z]{1,8}",
    ) {
        let placeholders: Vec<_> = (0..blobs.len())
            .map(|num| json!({"_placeholder": true, "num": num}))
            .collect();
        let text = json!([name, {"files": placeholders}]).to_string();
        let attachments: VecDeque<Bytes> = blobs.iter().cloned().map(Bytes::from).collect();
        let event = binary::read_event(&text, Some(&attachments)).expect("an event");
        prop_assert_eq!(&event.event, &name);
        let stored: serde_json::Value = serde_json::from_str(event.args[0].get()).expect("JSON");
        use base64::Engine;
        for (i, blob) in blobs.iter().enumerate() {
            let encoded = stored["files"][i]["$binary"].as_str().expect("base64");
            let decoded = base64::engine::general_purpose::STANDARD.decode(encoded).expect("decodes");
            prop_assert_eq!(&decoded, blob);
        }
    }

    #[test]
    fn tokens_verify_with_their_secret_only_and_arbitrary_text_is_refused(
        sub in prop::option::of("[a-zA-Z0-9_\\-]{1,20}"),
        rooms in prop::collection::vec("[a-z\\-]{1,20}", 0..4),
        secret in "[a-zA-Z0-9]{8,40}",
        garbage in any::<String>(),
    ) {
        let mut claims = json!({"exp": NOW + 60, "rooms": rooms});
        if let Some(sub) = &sub {
            claims["sub"] = json!(sub);
        }
        let signed = token::sign(&secret, &claims);
        let grant = token::verify(&signed, &secret, NOW).expect("its own secret");
        prop_assert_eq!(grant.user_id, sub);
        prop_assert_eq!(grant.rooms, rooms);
        let other_secret = format!("{secret}x");
        prop_assert!(token::verify(&signed, &other_secret, NOW).is_err());
        prop_assert!(token::verify(&garbage, &secret, NOW).is_err());
    }
}
