//! Property tests (proptest) for what reads untrusted bytes in the domain: the Pusher
//! signatures (channel auth, HTTP API requests), every inbound webhook signature scheme and
//! its header parsers, and the templates that read event types and channels from payloads.
//!
//! Each property runs on arbitrary input: nothing panics, a correct signature verifies, and a
//! changed one does not. `.ci/run` runs them with proptest's default case count through
//! `cargo test`; `PROPTEST_CASES=...` runs longer (the README's Fuzzing section). Failures
//! proptest finds are kept in `tests/properties.proptest-regressions` and replayed first.

use herald_core::{
    ingest::{self, HmacScheme, Request, SourceKind, template},
    pusher,
    signing::{EndpointSecret, signature_header},
};
use proptest::prelude::*;

const NOW: i64 = 1_800_000_000;

/// Text of any Unicode, biased to the characters the parsers split on.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[a-zA-Z0-9:,=. _\\-{}|/\"]{0,80}",
        "(t=|v1=|v1,|sha256=|v0=)[a-zA-Z0-9+/=,:]{0,120}",
    ]
}

fn kind() -> impl Strategy<Value = SourceKind> {
    prop::sample::select(SourceKind::ALL.to_vec())
}

fn verify(
    kind: SourceKind,
    headers: &[(String, String)],
    body: &[u8],
) -> Result<(), ingest::VerifyError> {
    let lookup = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };
    let scheme = HmacScheme {
        header: "x-signature".into(),
        encoding: ingest::Encoding::Hex,
        prefix: "sha256=".into(),
        id_header: None,
    };
    let hmac = (kind == SourceKind::HmacSha256).then_some(&scheme);
    let request = Request {
        header: &lookup,
        body,
    };
    ingest::verify(
        kind,
        hmac,
        // A Standard Webhooks secret (`whsec_` and base64) is a valid secret for every kind.
        &["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".to_owned()],
        &request,
        NOW,
        300,
    )
}

/// Every header a scheme reads, each given arbitrary text.
fn scheme_headers() -> impl Strategy<Value = Vec<(String, String)>> {
    let names = prop::sample::select(vec![
        "stripe-signature",
        "x-hub-signature-256",
        "x-shopify-hmac-sha256",
        "x-slack-signature",
        "x-slack-request-timestamp",
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
        "svix-id",
        "svix-timestamp",
        "svix-signature",
        "x-signature",
    ]);
    prop::collection::vec((names.prop_map(str::to_owned), text()), 0..8)
}

proptest! {
    // Failures are kept next to this file (`properties.proptest-regressions`) and replayed first.
    #![proptest_config(ProptestConfig::with_failure_persistence(
        proptest::test_runner::FileFailurePersistence::WithSource("proptest-regressions"),
    ))]

    #[test]
    fn inbound_signature_checks_refuse_arbitrary_headers_without_panicking(
        kind in kind(),
        headers in scheme_headers(),
        body in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        // A random header matching an HMAC over the body is a 2^-256 event: any Ok is a bug.
        prop_assert!(verify(kind, &headers, &body).is_err());
    }

    #[test]
    fn a_standard_webhooks_signature_verifies_and_a_changed_body_does_not(
        body in prop::collection::vec(any::<u8>(), 0..512),
        msg_id in "msg_[a-zA-Z0-9]{1,27}",
        flip in any::<prop::sample::Index>(),
    ) {
        // Herald's outbound signer and its inbound verifier agree (both follow the spec; the
        // interop suite checks each against the reference libraries).
        let secret = EndpointSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("secret");
        let header = signature_header([&secret], &msg_id, NOW, &body);
        let headers = vec![
            ("webhook-id".to_owned(), msg_id.clone()),
            ("webhook-timestamp".to_owned(), NOW.to_string()),
            ("webhook-signature".to_owned(), header),
        ];
        prop_assert!(verify(SourceKind::StandardWebhooks, &headers, &body).is_ok());
        let mut changed = body.clone();
        if changed.is_empty() {
            changed.push(0);
        } else {
            let i = flip.index(changed.len());
            changed[i] ^= 0x01;
        }
        prop_assert!(verify(SourceKind::StandardWebhooks, &headers, &changed).is_err());
    }

    #[test]
    fn pusher_channel_auth_verifies_its_own_signature_and_nothing_else(
        socket_id in "[0-9]{1,10}\\.[0-9]{1,10}",
        channel in "(private-|presence-)?[a-zA-Z0-9_\\-=@,.;]{1,40}",
        channel_data in prop::option::of(text()),
        forged in text(),
    ) {
        let signed = match &channel_data {
            Some(data) => format!("{socket_id}:{channel}:{data}"),
            None => format!("{socket_id}:{channel}"),
        };
        let auth = format!("key:{}", pusher::sign("secret", &signed));
        prop_assert!(pusher::verify_channel_auth("key", "secret", &socket_id, &channel, channel_data.as_deref(), &auth).is_ok());
        prop_assert!(pusher::verify_channel_auth("key", "other", &socket_id, &channel, channel_data.as_deref(), &auth).is_err());
        prop_assert!(pusher::verify_channel_auth("key", "secret", &socket_id, &channel, channel_data.as_deref(), &forged).is_err());
    }

    #[test]
    fn pusher_api_requests_verify_when_signed_and_refuse_arbitrary_parameters(
        params in prop::collection::vec(("[a-z_]{1,12}", text()), 0..6),
        body in prop::collection::vec(any::<u8>(), 0..128),
        arbitrary in prop::collection::vec((text(), text()), 0..8),
        skew in -700i64..700,
    ) {
        let signed = pusher::sign_request("key", "secret", "POST", "/apps/1/events", &params, &body, NOW + skew);
        let verdict = pusher::verify_request("key", "secret", "POST", "/apps/1/events", &signed, &body, NOW);
        // Signed params are accepted within the tolerance (600 s), refused beyond it...
        prop_assert_eq!(verdict.is_ok(), skew.abs() <= 600, "{:?}", verdict);
        // ...and arbitrary ones never are.
        prop_assert!(pusher::verify_request("key", "secret", "POST", "/apps/1/events", &arbitrary, &body, NOW).is_err());
    }

    #[test]
    fn templates_never_panic_and_render_what_they_are_given(
        template_text in text(),
        payload in prop::option::of(json()),
        header in text(),
    ) {
        let lookup = |_: &str| Some(header.as_str());
        let _ = template::validate(&template_text);
        let _ = template::render(&template_text, payload.as_ref(), &lookup);
        if let Some(event_type) = template::event_type(&[&template_text], payload.as_ref(), &lookup) {
            prop_assert!(event_type.len() <= 256);
        }
        let channels = template::channels(&[&template_text], Some("fallback"), payload.as_ref(), &lookup);
        prop_assert!(!channels.is_empty() && channels.len() <= template::MAX_CHANNELS);
        // Text without a placeholder renders as itself.
        if !template_text.contains(['{', '}']) && template::validate(&template_text).is_ok() {
            prop_assert_eq!(template::render(&template_text, None, &lookup), Some(template_text.clone()));
        }
    }
}

/// Arbitrary JSON, a few levels deep, with the keys templates name.
fn json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        text().prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("type".to_owned()),
                    Just("data".to_owned()),
                    Just("id".to_owned()),
                    "[a-z]{1,6}"
                ],
                inner,
                0..4
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}
