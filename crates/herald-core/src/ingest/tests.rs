//! Each kind: a valid request (vectors from the providers' docs where they publish one,
//! otherwise computed independently with Python's hmac module), a tampered body, a wrong
//! secret, a stale timestamp where the scheme signs one, and a rotated secret.

use super::*;

const NOW: i64 = 1_700_000_000;
const BODY: &[u8] = br#"{"id":"evt_1","type":"payment_intent.succeeded"}"#;

struct Case {
    kind: SourceKind,
    hmac: Option<HmacScheme>,
    secret: &'static str,
    headers: Vec<(&'static str, String)>,
    body: &'static [u8],
}

impl Case {
    fn check(&self, secrets: &[&str], body: &[u8], now: i64) -> Result<(), VerifyError> {
        let lookup = |name: &str| {
            self.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        };
        let request = Request {
            header: &lookup,
            body,
        };
        let secrets: Vec<String> = secrets.iter().map(|s| s.to_string()).collect();
        verify(
            self.kind,
            self.hmac.as_ref(),
            &secrets,
            &request,
            now,
            DEFAULT_TOLERANCE_SECS,
        )
    }

    fn assert_rules(&self) {
        let kind = self.kind.as_str();
        assert_eq!(
            self.check(&[self.secret], self.body, NOW),
            Ok(()),
            "{kind}: valid"
        );
        let mut tampered = self.body.to_vec();
        tampered[2] ^= 1;
        assert!(
            matches!(
                self.check(&[self.secret], &tampered, NOW),
                Err(VerifyError::NoMatch { .. })
            ),
            "{kind}: tampered body"
        );
        let wrong = wrong_secret(self.secret);
        assert_eq!(
            self.check(&[&wrong], self.body, NOW),
            Err(VerifyError::NoMatch { secrets: 1 }),
            "{kind}: wrong secret"
        );
        assert_eq!(
            self.check(&[&wrong, self.secret], self.body, NOW),
            Ok(()),
            "{kind}: the old secret still verifies during a rotation"
        );
        let later = NOW + DEFAULT_TOLERANCE_SECS + 1;
        if self.kind.signs_timestamp() {
            assert!(
                matches!(
                    self.check(&[self.secret], self.body, later),
                    Err(VerifyError::Stale {
                        age: 301,
                        tolerance: 300
                    })
                ),
                "{kind}: stale"
            );
        } else {
            assert_eq!(
                self.check(&[self.secret], self.body, later),
                Ok(()),
                "{kind}: no timestamp"
            );
        }
        let bare = Case {
            headers: Vec::new(),
            ..self.clone_shape()
        };
        assert!(
            matches!(
                bare.check(&[self.secret], self.body, NOW),
                Err(VerifyError::MissingHeader(_))
            ),
            "{kind}: missing header named"
        );
        // The signature header past its bound, whatever it holds: refused unread.
        let signature_header = match (&self.hmac, self.kind) {
            (Some(scheme), _) => scheme.header.clone(),
            (None, SourceKind::Stripe) => "stripe-signature".into(),
            (None, SourceKind::Github) => "x-hub-signature-256".into(),
            (None, SourceKind::Shopify) => "x-shopify-hmac-sha256".into(),
            (None, SourceKind::Slack) => "x-slack-signature".into(),
            (None, _) => "-signature".into(),
        };
        let oversized = Case {
            headers: self
                .headers
                .iter()
                .map(|(name, value)| match name.to_ascii_lowercase() {
                    lower if lower.ends_with(&signature_header.to_ascii_lowercase()) => {
                        (*name, "A".repeat(MAX_SIGNATURE_HEADER_BYTES + 1))
                    }
                    _ => (*name, value.clone()),
                })
                .collect(),
            ..self.clone_shape()
        };
        assert_ne!(
            oversized.headers, self.headers,
            "{kind}: a signature header"
        );
        assert!(
            matches!(
                oversized.check(&[self.secret], self.body, NOW),
                Err(VerifyError::Malformed { reason, .. }) if reason.contains("at most 4096")
            ),
            "{kind}: an oversized signature header"
        );
        if self.kind == SourceKind::StandardWebhooks {
            // Every header but the signature: the one missing is named, as the standard
            // names it.
            let unsigned = Case {
                headers: self
                    .headers
                    .iter()
                    .filter(|(name, _)| !name.ends_with("-signature"))
                    .cloned()
                    .collect(),
                ..self.clone_shape()
            };
            assert_eq!(
                unsigned
                    .check(&[self.secret], self.body, NOW)
                    .map_err(|e| e.to_string()),
                Err("missing header webhook-signature (or svix-signature)".to_owned()),
                "{kind}: the missing signature named"
            );
        }
    }

    fn clone_shape(&self) -> Case {
        Case {
            kind: self.kind,
            hmac: self.hmac.clone(),
            secret: self.secret,
            headers: self.headers.clone(),
            body: self.body,
        }
    }
}

fn wrong_secret(secret: &str) -> String {
    if secret.starts_with("whsec_") {
        "whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".into()
    } else {
        format!("{secret}-wrong")
    }
}

#[test]
fn stripe() {
    Case {
        kind: SourceKind::Stripe,
        hmac: None,
        secret: "whsec_test_secret",
        headers: vec![(
            "Stripe-Signature",
            format!(
                "t={NOW},v1=22d8dc182f5c588077683bd378368e29765bfe5df2560112b4f28fef120f0e31,v0=00"
            ),
        )],
        body: BODY,
    }
    .assert_rules();
}

#[test]
fn github_documented_vector() {
    // docs.github.com, "Validating webhook deliveries".
    Case {
        kind: SourceKind::Github,
        hmac: None,
        secret: "It's a Secret to Everybody",
        headers: vec![(
            "X-Hub-Signature-256",
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17".into(),
        )],
        body: b"Hello, World!",
    }
    .assert_rules();
}

#[test]
fn shopify() {
    Case {
        kind: SourceKind::Shopify,
        hmac: None,
        secret: "shopify-secret",
        headers: vec![(
            "X-Shopify-Hmac-Sha256",
            "Ed3CFOYmBp0DmSFtLo7oR9WCd70A8L4jheww1GqMbmM=".into(),
        )],
        body: BODY,
    }
    .assert_rules();
}

#[test]
fn slack() {
    Case {
        kind: SourceKind::Slack,
        hmac: None,
        secret: "slack-signing-secret",
        headers: vec![
            ("X-Slack-Request-Timestamp", NOW.to_string()),
            (
                "X-Slack-Signature",
                "v0=d095d738e7e92ae9494a4506298b892c8fe5b46d0d64becb0e62095269501ca2".into(),
            ),
        ],
        body: BODY,
    }
    .assert_rules();
}

#[test]
fn standard_webhooks_documented_vector_under_both_header_names() {
    // The Standard Webhooks specification's example.
    for prefix in ["webhook", "svix"] {
        let name = |suffix: &str| -> &'static str {
            Box::leak(format!("{prefix}-{suffix}").into_boxed_str())
        };
        let case = Case {
            kind: SourceKind::StandardWebhooks,
            hmac: None,
            secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            headers: vec![
                (name("id"), "msg_p5jXN8AQM9LWM0D4loKWxJek".into()),
                (name("timestamp"), "1614265330".into()),
                (
                    name("signature"),
                    "v1a,ignored v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=".into(),
                ),
            ],
            body: br#"{"test": 2432232314}"#,
        };
        assert_eq!(case.check(&[case.secret], case.body, 1614265330), Ok(()));
        let shifted = Case {
            headers: case
                .headers
                .iter()
                .map(|(n, v)| {
                    let v = if n.ends_with("timestamp") {
                        NOW.to_string()
                    } else {
                        v.clone()
                    };
                    (*n, v)
                })
                .collect(),
            ..case.clone_shape()
        };
        // Re-sign at NOW so the shared rules (stale, tampered, rotation) apply.
        let key = EndpointSecret::parse(case.secret).expect("secret");
        let sig = key.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", NOW, case.body);
        let resigned = Case {
            headers: shifted
                .headers
                .iter()
                .map(|(n, v)| {
                    let v = if n.ends_with("signature") {
                        format!("v1,{sig}")
                    } else {
                        v.clone()
                    };
                    (*n, v)
                })
                .collect(),
            ..case.clone_shape()
        };
        resigned.assert_rules();
    }
}

#[test]
fn generic_hmac_with_prefix() {
    let scheme = HmacScheme {
        header: "X-Signature".into(),
        encoding: Encoding::Hex,
        prefix: "sha256=".into(),
        id_header: None,
    };
    let case = Case {
        kind: SourceKind::HmacSha256,
        hmac: Some(scheme.clone()),
        secret: "generic-secret",
        headers: vec![
            (
                "X-Signature",
                "sha256=dd33cd98be63b34f41710e3121eba02c2153f7b1c6a65edd89ff9f21217547f6".into(),
            ),
            ("X-Delivery", "d-1".into()),
        ],
        body: BODY,
    };
    case.assert_rules();
}

#[test]
fn delivery_ids_come_from_signed_content_only() {
    // Every provider's id header is present; only signed ones may deduplicate.
    let headers = |name: &str| match name {
        "x-github-delivery" | "x-shopify-webhook-id" | "x-delivery" => Some("header-id"),
        "webhook-id" => Some("msg_signed"),
        "webhook-signature" => Some("v1,AAAA"),
        _ => None,
    };
    let request = Request {
        header: &headers,
        body: BODY,
    };
    let payload: Value = serde_json::from_slice(BODY).expect("json");
    assert_eq!(
        delivery_id(SourceKind::Stripe, &request, Some(&payload), None),
        "evt_1"
    );
    assert_eq!(
        delivery_id(SourceKind::StandardWebhooks, &request, None, None),
        "msg_signed"
    );
    // Signed under Svix's names, with an unsigned `webhook-id` beside: the signed id counts.
    let svix = |name: &str| match name {
        "svix-signature" => Some("v1,AAAA"),
        "svix-id" => Some("msg_signed_by_svix"),
        "webhook-id" => Some("unsigned"),
        _ => None,
    };
    let svix_request = Request {
        header: &svix,
        body: BODY,
    };
    assert_eq!(
        delivery_id(SourceKind::StandardWebhooks, &svix_request, None, None),
        "msg_signed_by_svix"
    );
    // Ids longer than the key's column are kept by their hash: two long ids, one body, two
    // deliveries.
    let (long_a, long_b) = ("a".repeat(300), "b".repeat(300));
    let long_id = |id: &str| {
        let headers = |name: &str| match name {
            "webhook-id" => Some(id),
            "webhook-signature" => Some("v1,AAAA"),
            _ => None,
        };
        let request = Request {
            header: &headers,
            body: BODY,
        };
        delivery_id(SourceKind::StandardWebhooks, &request, None, None)
    };
    let (first, second) = (long_id(&long_a), long_id(&long_b));
    assert_ne!(first, second, "two long ids are two deliveries");
    assert_eq!(
        first,
        format!(
            "id-sha256:{}",
            hex::encode(Sha256::digest(long_a.as_bytes()))
        )
    );
    // An id holding NUL, which PostgreSQL's text refuses, is kept by its hash too.
    let with_nul: Value = serde_json::from_str(r#"{"id": "evt_\u0000x"}"#).expect("json");
    assert_eq!(
        delivery_id(SourceKind::Stripe, &request, Some(&with_nul), None),
        format!("id-sha256:{}", hex::encode(Sha256::digest(b"evt_\0x")))
    );
    let body_hash = format!("sha256:{}", hex::encode(Sha256::digest(BODY)));
    for kind in [
        SourceKind::Github,
        SourceKind::Shopify,
        SourceKind::HmacSha256,
    ] {
        assert_eq!(
            delivery_id(kind, &request, Some(&payload), None),
            body_hash,
            "{kind:?}: the unsigned header id is not trusted"
        );
    }
    // A source trusting headers: one body under two topics is two deliveries.
    let trusted = |event_type| {
        Some(Trusted {
            event_type,
            id_header: None,
        })
    };
    let created = delivery_id(
        SourceKind::Shopify,
        &request,
        None,
        trusted("orders.create"),
    );
    let updated = delivery_id(
        SourceKind::Shopify,
        &request,
        None,
        trusted("orders.updated"),
    );
    assert_eq!(created, format!("{body_hash}:orders.create"));
    assert_ne!(created, updated);
    // An hmac-sha256 source that trusts its idHeader deduplicates on it.
    let with_id = Some(Trusted {
        event_type: "t",
        id_header: Some("x-delivery"),
    });
    assert_eq!(
        delivery_id(SourceKind::HmacSha256, &request, None, with_id),
        "header-id"
    );
}

#[test]
fn malformed_headers_say_what_is_wrong() {
    let case = Case {
        kind: SourceKind::Stripe,
        hmac: None,
        secret: "s",
        headers: vec![("Stripe-Signature", format!("t={NOW},v1=zz"))],
        body: BODY,
    };
    assert_eq!(
        case.check(&["s"], BODY, NOW),
        Err(VerifyError::Malformed {
            header: "Stripe-Signature".into(),
            reason: "no v1= signature of 64 hex digits (an HMAC-SHA256)".into()
        })
    );
}

/// A garbled `v1` entry beside a good one does not hide it (Stripe's libraries skip what
/// cannot match), and a timestamp that is not plain digits is refused: it is signed as it is
/// formatted again, so `+<t>` or `0<t>` would verify a header the sender never sent.
#[test]
fn stripe_entries_that_cannot_match_are_skipped_and_timestamps_are_digits() {
    const GOOD: &str = "22d8dc182f5c588077683bd378368e29765bfe5df2560112b4f28fef120f0e31";
    let case = |header: String| Case {
        kind: SourceKind::Stripe,
        hmac: None,
        secret: "whsec_test_secret",
        headers: vec![("Stripe-Signature", header)],
        body: BODY,
    };
    let beside = case(format!("t={NOW},v1=zz,v1=00,v1={GOOD}"));
    assert_eq!(beside.check(&[beside.secret], BODY, NOW), Ok(()));
    for t in [
        format!("+{NOW}"),
        format!("0{NOW}"),
        format!(" {NOW}x"),
        String::new(),
    ] {
        let refused = case(format!("t={t},v1={GOOD}"));
        assert_eq!(
            refused.check(&[refused.secret], BODY, NOW),
            Err(VerifyError::Malformed {
                header: "Stripe-Signature".into(),
                reason: "t is not a Unix time (digits, no leading zero)".into()
            }),
            "t={t}"
        );
    }
    // So with a Standard Webhooks timestamp.
    let mut standard = standard_case("v1,AAAA".into());
    standard.headers[1].1 = format!("+{NOW}");
    assert!(matches!(
        standard.check(&[standard.secret], BODY, NOW),
        Err(VerifyError::Malformed { reason, .. }) if reason.contains("no leading zero")
    ));
}

/// A Standard Webhooks request at `NOW` with `entries` as its signature header.
fn standard_case(entries: String) -> Case {
    Case {
        kind: SourceKind::StandardWebhooks,
        hmac: None,
        secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        headers: vec![
            ("webhook-id", "msg_1".into()),
            ("webhook-timestamp", NOW.to_string()),
            ("webhook-signature", entries),
        ],
        body: BODY,
    }
}

#[test]
fn standard_webhooks_refuses_more_signatures_than_the_cap_before_hashing() {
    let forged = format!("v1,{}", STANDARD.encode([7u8; 32]));
    let header = vec![forged; MAX_SIGNATURES + 1].join(" ");
    let case = standard_case(header);
    assert_eq!(
        case.check(&[case.secret], BODY, NOW),
        Err(VerifyError::Malformed {
            header: "webhook-signature".into(),
            reason: format!(
                "more than {MAX_SIGNATURES} signatures; at most {MAX_SIGNATURES} are accepted"
            ),
        })
    );
}

#[test]
fn standard_webhooks_matches_a_valid_signature_among_undecodable_and_wrong_length_entries() {
    let key = EndpointSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("secret");
    let valid = key.sign("msg_1", NOW, BODY);
    let header = [
        "v1,!!!!".to_owned(),
        format!("v1,{}", STANDARD.encode([1u8; 31])),
        format!("v1,{}", STANDARD.encode([1u8; 64])),
        "v1a,anything".to_owned(),
        format!("v1,{valid}"),
    ]
    .join(" ");
    let case = standard_case(header);
    assert_eq!(case.check(&[case.secret], BODY, NOW), Ok(()));
    // None usable: the scheme is wrong, which is said, rather than blamed on the secrets.
    for entries in ["v1,!!!! v1,AAAA", "v1a,anything", "v1=abc", ""] {
        let without_valid = standard_case(entries.into());
        assert!(
            matches!(
                without_valid.check(&[case.secret], BODY, NOW),
                Err(VerifyError::Malformed { reason, .. })
                    if reason.contains("v1a (Ed25519) is not supported")
            ),
            "{entries:?}"
        );
    }
}

#[test]
fn too_many_signatures_are_refused_unread() {
    // An oversized signature header of each kind: `Case::assert_rules`.
    let stripe = Case {
        kind: SourceKind::Stripe,
        hmac: None,
        secret: "s",
        headers: vec![(
            "Stripe-Signature",
            format!("t={NOW},{}", vec!["v1=00"; MAX_SIGNATURES + 1].join(",")),
        )],
        body: BODY,
    };
    assert!(matches!(
        stripe.check(&["s"], BODY, NOW),
        Err(VerifyError::Malformed { reason, .. }) if reason.contains("at most 16")
    ));
}

#[test]
fn attacker_timestamps_at_the_limits_are_stale_not_an_overflow() {
    for timestamp in [i64::MIN, i64::MAX] {
        let case = Case {
            headers: vec![
                ("webhook-id", "msg_1".into()),
                ("webhook-timestamp", timestamp.to_string()),
                // Well formed (base64 of 32 bytes), so the timestamp is what is judged.
                (
                    "webhook-signature",
                    format!("v1,{}", STANDARD.encode([0u8; 32])),
                ),
            ],
            ..standard_case(String::new())
        };
        assert!(
            matches!(
                case.check(&[case.secret], BODY, NOW),
                Err(VerifyError::Stale { .. })
            ),
            "{timestamp}"
        );
    }
}
