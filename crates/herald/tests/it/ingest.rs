//! Webhooks in: verified on the raw bytes, deduplicated on the provider's delivery id, kept
//! raw, and re-published as one event to webhook endpoints and WebSocket channels.
//!
//! Requests here are signed with the hmac crate; `.ci/run` signs them with the providers'
//! own libraries as well (`interop/ingest_*`).

use base64::{Engine, engine::general_purpose::STANDARD};
use hmac::{Hmac, Mac};
use reqwest::Method;
use serde_json::{Value, json};
use sha2::Sha256;

use crate::{
    harness::{Receiver, TestServer, eventually},
    pusher::{Client, channel_auth, pusher_app, trigger},
};

fn hmac_bytes(secret: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("key");
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

pub(crate) fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

pub(crate) async fn source(server: &TestServer, app: &str, body: Value) -> Value {
    let (status, source) = server
        .call(
            Method::POST,
            &format!("/api/v1/app/{app}/ingest/source"),
            Some(body),
        )
        .await;
    assert_eq!(status, 201, "{source}");
    source
}

/// Posts to the source's ingest path; returns the status and the JSON answer.
pub(crate) async fn post(
    server: &TestServer,
    source: &Value,
    headers: &[(&str, String)],
    body: &[u8],
) -> (u16, Value) {
    let path = source["ingestPath"].as_str().expect("ingestPath");
    let mut request = crate::harness::http_client()
        .post(format!("{}{path}", server.base))
        .body(body.to_vec());
    if !headers
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("content-type"))
    {
        request = request.header("content-type", "application/json");
    }
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

pub(crate) fn stripe_header(secret: &str, body: &[u8], t: i64) -> (&'static str, String) {
    let signed = [t.to_string().as_bytes(), b".", body].concat();
    let sig = hex::encode(hmac_bytes(secret.as_bytes(), &signed));
    ("stripe-signature", format!("t={t},v1={sig}"))
}

#[tokio::test]
async fn a_stripe_payment_reaches_the_browser_and_the_backend_exactly_once_despite_retries() {
    let server = TestServer::start().await;
    let (app, creds) = pusher_app(&server, "shop").await;
    let mut backend = Receiver::start().await;
    let endpoint = server
        .create_endpoint(
            &app,
            json!({"url": backend.url, "eventTypes": ["payment_intent.succeeded"]}),
        )
        .await;
    let secret = "whsec_stripe_test_secret";
    let stripe = source(
        &server,
        &app,
        json!({
            "kind": "stripe",
            "secrets": [secret],
            "channels": ["private-order-{data.object.metadata.order_id}"],
            "defaultChannel": "payments",
        }),
    )
    .await;
    assert_eq!(stripe["eventType"], json!(["{type}"]), "Stripe's default");

    // The order page is open in a browser.
    let mut page = Client::connect(&server, &creds.key).await;
    let channel = "private-order-42";
    let auth = channel_auth(&creds, &page.socket_id, channel, None);
    let ok = page.subscribe(channel, Some(auth), None).await;
    assert_eq!(ok["event"], "pusher_internal:subscription_succeeded");

    let body = br#"{"id":"evt_3Pay","object":"event","type":"payment_intent.succeeded","data":{"object":{"id":"pi_1","amount":1999,"metadata":{"order_id":"42"}}}}"#;
    let (status, first) = post(
        &server,
        &stripe,
        &[stripe_header(secret, body, now())],
        body,
    )
    .await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["duplicate"], false);
    assert_eq!(first["eventType"], "payment_intent.succeeded");
    assert_eq!(first["channels"], json!([channel]));
    // Stripe retries (a new signature and timestamp, the same event id): acknowledged only.
    for _ in 0..2 {
        let (status, retry) = post(
            &server,
            &stripe,
            &[stripe_header(secret, body, now())],
            body,
        )
        .await;
        assert_eq!(status, 200, "{retry}");
        assert_eq!(retry["duplicate"], true);
        assert_eq!(retry["msgId"], first["msgId"]);
    }

    // The browser gets it once: the next event after it is a marker sent afterwards.
    let paid = page.expect("payment_intent.succeeded").await;
    assert_eq!(paid["channel"], channel);
    let data: Value = serde_json::from_str(paid["data"].as_str().expect("data")).expect("json");
    assert_eq!(data["data"]["object"]["amount"], 1999);
    let (status, _) = trigger(
        &server,
        &creds,
        json!({"name": "marker", "channel": channel, "data": "{}"}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        page.next().await["event"],
        "marker",
        "no second payment event"
    );

    // The backend gets one Standard Webhooks-signed delivery of the exact bytes.
    let delivery = backend.next().await;
    assert_eq!(delivery.body.as_ref(), body.as_slice());
    let ep_secret = server
        .call(
            Method::GET,
            &format!(
                "/api/v1/app/{app}/endpoint/{}/secret",
                endpoint["id"].as_str().expect("id")
            ),
            None,
        )
        .await
        .1["key"]
        .as_str()
        .expect("key")
        .to_owned();
    let key = herald_core::EndpointSecret::parse(&ep_secret).expect("secret");
    let sig = delivery
        .header("webhook-signature")
        .trim_start_matches("v1,");
    let ts: i64 = delivery.header("webhook-timestamp").parse().expect("ts");
    assert!(key.verify(delivery.header("webhook-id"), ts, &delivery.body, sig));
    server
        .settled(&app, endpoint["id"].as_str().expect("id"))
        .await;
    assert!(backend.drain().is_empty(), "delivered once");

    // Three requests were received; one was kept, raw.
    let base = format!(
        "/api/v1/app/{app}/ingest/source/{}",
        stripe["id"].as_str().expect("id")
    );
    let (_, events) = server
        .call(Method::GET, &format!("{base}/event"), None)
        .await;
    let events = events["data"].as_array().expect("events").clone();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["deliveryId"], "evt_3Pay");
    server.stop().await;
}

#[tokio::test]
async fn every_kind_accepts_valid_requests_and_refuses_bad_ones_with_401() {
    let server = TestServer::start().await;
    let (app, _) = pusher_app(&server, "kinds").await;
    let body: &[u8] =
        br#"{"id":"evt_9","type":"thing.happened","event_id":"Ev9","event":{"type":"message"}}"#;
    let t = now();

    type Sign = fn(&str, &[u8], i64) -> Vec<(&'static str, String)>;
    let kinds: Vec<(&str, Value, &str, Sign)> = vec![
        ("stripe", json!({}), "stripe-secret", |s, b, t| {
            vec![stripe_header(s, b, t)]
        }),
        (
            "github",
            json!({"trustUnsignedHeaders": true}),
            "gh-secret",
            |s, b, _| {
                vec![
                    (
                        "x-hub-signature-256",
                        format!("sha256={}", hex::encode(hmac_bytes(s.as_bytes(), b))),
                    ),
                    ("x-github-event", "issues".into()),
                    ("x-github-delivery", "d1b2".into()),
                ]
            },
        ),
        (
            "shopify",
            json!({"trustUnsignedHeaders": true}),
            "shop-secret",
            |s, b, _| {
                vec![
                    (
                        "x-shopify-hmac-sha256",
                        STANDARD.encode(hmac_bytes(s.as_bytes(), b)),
                    ),
                    ("x-shopify-topic", "orders/create".into()),
                    ("x-shopify-webhook-id", "wh-1".into()),
                ]
            },
        ),
        ("slack", json!({}), "slack-secret", |s, b, t| {
            let signed = [format!("v0:{t}:").as_bytes(), b].concat();
            vec![
                ("x-slack-request-timestamp", t.to_string()),
                (
                    "x-slack-signature",
                    format!("v0={}", hex::encode(hmac_bytes(s.as_bytes(), &signed))),
                ),
            ]
        }),
        (
            "standard-webhooks",
            json!({}),
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            |s, b, t| {
                let key = herald_core::EndpointSecret::parse(s).expect("secret");
                vec![
                    ("webhook-id", "msg_in_1".into()),
                    ("webhook-timestamp", t.to_string()),
                    (
                        "webhook-signature",
                        format!("v1,{}", key.sign("msg_in_1", t, b)),
                    ),
                ]
            },
        ),
        (
            "hmac-sha256",
            json!({"hmac": {"header": "X-Sig", "encoding": "base64", "prefix": "sha256="}}),
            "plain-secret",
            |s, b, _| {
                vec![
                    (
                        "x-sig",
                        format!("sha256={}", STANDARD.encode(hmac_bytes(s.as_bytes(), b))),
                    ),
                    ("x-id", "id-7".into()),
                ]
            },
        ),
    ];
    let expected_types = [
        "thing.happened",
        "issues",
        "orders.create",
        "message",
        "thing.happened",
        "thing.happened",
    ];
    let timestamped = ["stripe", "slack", "standard-webhooks"];

    for ((kind, extra, secret, sign), expected_type) in kinds.into_iter().zip(expected_types) {
        let mut spec = json!({"kind": kind, "secrets": [secret]});
        spec.as_object_mut()
            .expect("object")
            .extend(extra.as_object().expect("object").clone());
        let src = source(&server, &app, spec).await;

        let (status, ok) = post(&server, &src, &sign(secret, body, t), body).await;
        assert_eq!(status, 200, "{kind}: {ok}");
        assert_eq!(ok["eventType"], expected_type, "{kind}");
        assert_eq!(ok["duplicate"], false, "{kind}");
        let (status, again) = post(&server, &src, &sign(secret, body, t), body).await;
        assert_eq!(
            (status, &again["duplicate"]),
            (200, &json!(true)),
            "{kind}: duplicate"
        );

        let mut tampered = body.to_vec();
        tampered[8] = b'X';
        let (status, refused) = post(&server, &src, &sign(secret, body, t), &tampered).await;
        assert_eq!(status, 401, "{kind}: tampered");
        assert_eq!(refused["code"], "invalid_signature");
        assert!(
            refused["detail"]
                .as_str()
                .expect("detail")
                .contains("does not match"),
            "{kind}: {refused}"
        );

        let wrong = if kind == "standard-webhooks" {
            "whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
        } else {
            "wrong"
        };
        let (status, _) = post(&server, &src, &sign(wrong, body, t), body).await;
        assert_eq!(status, 401, "{kind}: wrong secret");

        let (status, missing) = post(&server, &src, &[], body).await;
        assert_eq!(status, 401, "{kind}: unsigned");
        assert!(
            missing["detail"]
                .as_str()
                .expect("detail")
                .contains("missing header"),
            "{kind}: {missing}"
        );

        if timestamped.contains(&kind) {
            let (status, stale) = post(&server, &src, &sign(secret, body, t - 301), body).await;
            assert_eq!(status, 401, "{kind}: stale");
            assert!(
                stale["detail"]
                    .as_str()
                    .expect("detail")
                    .contains("at most 300 s"),
                "{kind}: {stale}"
            );
        }

        // Rotation: a new secret added in front, the old one still verifies; then dropped.
        let rotated = if kind == "standard-webhooks" {
            "whsec_BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB"
        } else {
            "rotated-secret"
        };
        let path = format!(
            "/api/v1/app/{app}/ingest/source/{}",
            src["id"].as_str().expect("id")
        );
        let (status, patched) = server
            .call(
                Method::PATCH,
                &path,
                Some(json!({"secrets": [rotated, secret]})),
            )
            .await;
        assert_eq!(
            (status, &patched["secretCount"]),
            (200, &json!(2)),
            "{kind}: {patched}"
        );
        let other: Vec<u8> = [body, b" "].concat();
        let (status, _) = post(&server, &src, &sign(rotated, &other, t), &other).await;
        assert_eq!(status, 200, "{kind}: new secret");
        server
            .call(Method::PATCH, &path, Some(json!({"secrets": [rotated]})))
            .await;
        let third: Vec<u8> = [body, b"  "].concat();
        let (status, _) = post(&server, &src, &sign(secret, &third, t), &third).await;
        assert_eq!(status, 401, "{kind}: the retired secret no longer verifies");
    }
    server.stop().await;
}

#[tokio::test]
async fn raw_requests_are_kept_and_can_be_replayed() {
    let server = TestServer::start().await;
    let (app, _) = pusher_app(&server, "replay").await;
    let mut backend = Receiver::start().await;
    let endpoint = server
        .create_endpoint(&app, json!({"url": backend.url}))
        .await;
    let src = source(
        &server,
        &app,
        json!({"kind": "github", "secrets": ["s3cret"], "defaultChannel": "repo-activity", "trustUnsignedHeaders": true}),
    )
    .await;
    let body = br#"{"action":"opened","issue":{"number":7}}"#;
    let sig = format!("sha256={}", hex::encode(hmac_bytes(b"s3cret", body)));
    let headers = [
        ("x-hub-signature-256", sig),
        ("x-github-event", "issues".to_owned()),
        ("x-github-delivery", "72d3162e".to_owned()),
        // A credential a proxy in front adds: received, but its value is not kept.
        ("authorization", "Bearer proxy-credential-9f2".to_owned()),
    ];
    let (status, received) = post(&server, &src, &headers, body).await;
    assert_eq!(status, 200, "{received}");
    assert_eq!(received["eventType"], "issues.opened");
    assert_eq!(
        received["channels"],
        json!(["repo-activity"]),
        "the default channel"
    );
    assert_eq!(backend.next().await.body.as_ref(), body.as_slice());

    let base = format!(
        "/api/v1/app/{app}/ingest/source/{}/event/{}",
        src["id"].as_str().expect("id"),
        received["id"].as_str().expect("id")
    );
    let (status, kept) = server.call(Method::GET, &base, None).await;
    assert_eq!(status, 200, "{kept}");
    assert_eq!(kept["body"], std::str::from_utf8(body).expect("utf8"));
    // GitHub's delivery id is in an unsigned header: the signed body (with the event type, as
    // this source trusts its event header) deduplicates; the header is kept with the others.
    let body_hash = format!(
        "sha256:{}",
        hex::encode(<Sha256 as sha2::Digest>::digest(body))
    );
    assert_eq!(kept["deliveryId"], format!("{body_hash}:issues.opened"));
    let headers = kept["headers"].as_array().expect("headers");
    assert!(
        headers.contains(&json!(["x-github-event", "issues"]))
            && headers.contains(&json!(["x-github-delivery", "72d3162e"])),
        "{kept}"
    );
    assert!(
        headers.contains(&json!(["authorization", "(a credential: not kept)"]))
            && !kept.to_string().contains("proxy-credential-9f2"),
        "{kept}"
    );

    let (status, replayed) = server
        .call(Method::POST, &format!("{base}/replay"), None)
        .await;
    assert_eq!(status, 201, "{replayed}");
    assert_ne!(replayed["msgId"], received["msgId"]);
    let again = backend.next().await;
    assert_eq!(again.body.as_ref(), body.as_slice());
    assert_eq!(
        again.header("webhook-id"),
        replayed["msgId"].as_str().expect("id")
    );
    eventually("both deliveries recorded", || async {
        (server
            .stats(&app, endpoint["id"].as_str().expect("id"))
            .await["success"]
            == 2)
            .then_some(())
    })
    .await;
    server.stop().await;
}

/// GitHub's default content type is a form whose `payload` field holds the JSON: its event
/// type, channel templates and the message read that JSON, as they do a JSON body, and a
/// replay reads it again the same way.
#[tokio::test]
async fn a_github_delivery_sent_as_a_form_is_read_as_its_json_payload() {
    let server = TestServer::start().await;
    let (app, _) = pusher_app(&server, "github-form").await;
    let mut backend = Receiver::start().await;
    server
        .create_endpoint(&app, json!({"url": backend.url}))
        .await;
    let src = source(
        &server,
        &app,
        json!({"kind": "github", "secrets": ["s3cret"], "trustUnsignedHeaders": true,
               "channels": ["repo-{repository.name}"]}),
    )
    .await;
    let json_payload = r#"{"action":"opened","issue":{"number":7},"repository":{"name":"herald"}}"#;
    let body: String = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("payload", json_payload)
        .finish();
    let sig = format!(
        "sha256={}",
        hex::encode(hmac_bytes(b"s3cret", body.as_bytes()))
    );
    let headers = [
        (
            "content-type",
            "application/x-www-form-urlencoded".to_owned(),
        ),
        ("x-hub-signature-256", sig),
        ("x-github-event", "issues".to_owned()),
        ("x-github-delivery", "72d3162f".to_owned()),
    ];
    let (status, received) = post(&server, &src, &headers, body.as_bytes()).await;
    assert_eq!(status, 200, "{received}");
    assert_eq!(received["eventType"], "issues.opened");
    assert_eq!(received["channels"], json!(["repo-herald"]));
    let delivered: Value =
        serde_json::from_slice(&backend.next().await.body).expect("a JSON delivery");
    assert_eq!(
        delivered,
        serde_json::from_str::<Value>(json_payload).expect("json")
    );

    let replay = format!(
        "/api/v1/app/{app}/ingest/source/{}/event/{}/replay",
        src["id"].as_str().expect("id"),
        received["id"].as_str().expect("id")
    );
    let (status, replayed) = server.call(Method::POST, &replay, None).await;
    assert_eq!(status, 201, "{replayed}");
    let again: Value = serde_json::from_slice(&backend.next().await.body).expect("JSON");
    assert_eq!(again, delivered);
    server.stop().await;
}

#[tokio::test]
async fn bad_requests_and_bad_sources_get_clear_errors() {
    let server = TestServer::start_with(|c| c.api.max_body_bytes = 4096).await;
    let (app, _) = pusher_app(&server, "bad-ingest").await;

    let raw = crate::harness::http_client();
    let unknown = raw
        .post(format!(
            "{}/ingest/src_2Z9fZ9fZ9fZ9fZ9fZ9fZ9fZ9fZ9",
            server.base
        ))
        .body("{}")
        .send()
        .await
        .expect("request");
    assert_eq!(unknown.status().as_u16(), 404);

    let src = source(&server, &app, json!({"kind": "github", "secrets": ["s"]})).await;
    let big = vec![b'x'; 5000];
    let (status, too_big) = post(&server, &src, &[], &big).await;
    assert_eq!(status, 413, "{too_big}");
    assert_eq!(too_big["code"], "payload_too_large", "{too_big}");
    // A made-up source is looked up before its body is read: 404, whatever the body, so made-up
    // ids never get a request log (they once filled it and evicted real sources' logs).
    let made_up = raw
        .post(format!(
            "{}/ingest/src_2Z9fZ9fZ9fZ9fZ9fZ9fZ9fZ9fZ8",
            server.base
        ))
        .body(big.clone())
        .send()
        .await
        .expect("request");
    assert_eq!(made_up.status().as_u16(), 404);
    // The real source's log has its own request, refused as too large.
    let (status, log) = server
        .call(
            Method::GET,
            &format!(
                "/api/v1/app/{app}/ingest/source/{}/request",
                src["id"].as_str().expect("id")
            ),
            None,
        )
        .await;
    assert_eq!(status, 200, "{log}");
    assert_eq!(log["data"][0]["status"], 413, "{log}");

    for (bad, loc) in [
        (json!({"kind": "paypal", "secrets": ["s"]}), "kind"),
        (json!({"kind": "github", "secrets": []}), "secrets"),
        (json!({"kind": "hmac-sha256", "secrets": ["s"]}), "hmac"),
        (
            json!({"kind": "standard-webhooks", "secrets": ["not-whsec"]}),
            "secrets",
        ),
        (
            json!({"kind": "github", "secrets": ["s"], "channels": ["order-{id"]}),
            "channels",
        ),
        (
            json!({"kind": "github", "secrets": ["s"], "defaultChannel": "bad channel"}),
            "defaultChannel",
        ),
        // A header placeholder with spaces inside its braces reads a header all the same.
        (
            json!({"kind": "github", "secrets": ["s"], "eventType": ["{ header:x-github-event}"]}),
            "eventType",
        ),
    ] {
        let (status, error) = server
            .call(
                Method::POST,
                &format!("/api/v1/app/{app}/ingest/source"),
                Some(bad),
            )
            .await;
        assert_eq!(status, 422, "{error}");
        assert_eq!(error["detail"][0]["loc"], json!(["body", loc]), "{error}");
        // One error, the one that is there: an unknown kind is not also checked as another.
        assert_eq!(error["detail"].as_array().map(Vec::len), Some(1), "{error}");
    }

    // Secrets are write-only.
    assert!(src.get("secrets").is_none());
    assert_eq!(src["secretCount"], 1);
    server.stop().await;
}

#[tokio::test]
async fn slack_url_verification_is_answered_after_the_signature_check() {
    let server = TestServer::start().await;
    let (app, _) = pusher_app(&server, "slack-hello").await;
    let src = source(&server, &app, json!({"kind": "slack", "secrets": ["sl"]})).await;
    let body = br#"{"token":"x","challenge":"3eZbrw1a","type":"url_verification"}"#;
    let t = now();
    let signed = [format!("v0:{t}:").as_bytes(), body.as_slice()].concat();
    let headers = [
        ("x-slack-request-timestamp", t.to_string()),
        (
            "x-slack-signature",
            format!("v0={}", hex::encode(hmac_bytes(b"sl", &signed))),
        ),
    ];
    let (status, answer) = post(&server, &src, &headers, body).await;
    assert_eq!((status, answer), (200, json!({"challenge": "3eZbrw1a"})));
    let (status, _) = post(&server, &src, &headers[..1], body).await;
    assert_eq!(status, 401, "unsigned handshakes are refused");
    server.stop().await;
}

/// The review's attack: a near-limit body with an 80 KB `webhook-signature` of forged
/// entries cost one HMAC of the whole body per entry (15 s of frozen workers for two
/// requests). Now the header is refused unread, and a genuine large request, verified off the
/// async workers, still goes through.
#[tokio::test]
async fn forged_signature_lists_are_refused_without_hashing_the_body_once_per_entry() {
    let server = TestServer::start().await;
    let (app, _) = pusher_app(&server, "cpu").await;
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let src = source(
        &server,
        &app,
        json!({"kind": "standard-webhooks", "secrets": [secret]}),
    )
    .await;
    let body = format!(r#"{{"type":"big.event","pad":"{}"}}"#, "x".repeat(900_000));
    let t = now();
    let forged = format!("v1,{}", STANDARD.encode([7u8; 32]));
    let headers = |signature: String| {
        vec![
            ("webhook-id", "msg_big".to_owned()),
            ("webhook-timestamp", t.to_string()),
            ("webhook-signature", signature),
        ]
    };

    // 80 KB of entries: the listener refuses the request head before any handler runs.
    let attack = vec![forged.clone(); 1_700].join(" ");
    let (status, _) = post(&server, &src, &headers(attack), body.as_bytes()).await;
    assert_eq!(status, 431);

    // 8 KB of entries: within the listener's limit, over the signature header's.
    let attack = vec![forged.clone(); 170].join(" ");
    let (status, refused) = post(&server, &src, &headers(attack), body.as_bytes()).await;
    assert_eq!(status, 401, "{refused}");
    let detail = refused["detail"].as_str().expect("detail");
    assert!(detail.contains("at most 4096"), "{detail}");

    // Under the header cap but over the entry cap.
    let attack = vec![forged.clone(); 17].join(" ");
    let (status, refused) = post(&server, &src, &headers(attack), body.as_bytes()).await;
    assert_eq!(status, 401, "{refused}");
    let detail = refused["detail"].as_str().expect("detail");
    assert!(detail.contains("at most 16"), "{detail}");

    // A genuine signature after forged entries, on the large body: accepted.
    let key = herald_core::EndpointSecret::parse(secret).expect("secret");
    let genuine = format!("v1,{}", key.sign("msg_big", t, body.as_bytes()));
    let list = [vec![forged; 15], vec![genuine]].concat().join(" ");
    let (status, ok) = post(&server, &src, &headers(list), body.as_bytes()).await;
    assert_eq!(status, 200, "{ok}");
    assert_eq!(ok["eventType"], "big.event");
}

/// The review's finding: GitHub's, Shopify's and generic sources' delivery ids and event types
/// come from headers the signature does not cover, so one captured request could be
/// published again under a new delivery id and another event type. Now such a resend is a
/// duplicate (the signed body is the key), and headers name the event type only where the
/// source opted in.
#[tokio::test]
async fn a_captured_request_resent_with_new_unsigned_headers_is_not_published_again() {
    let server = TestServer::start().await;
    let (app, _) = pusher_app(&server, "replay").await;
    let secret = "gh-secret";
    let src = source(
        &server,
        &app,
        json!({"kind": "github", "secrets": [secret], "trustUnsignedHeaders": true}),
    )
    .await;
    let body: &[u8] = br#"{"action":"opened","issue":{"number":7}}"#;
    let signature = format!(
        "sha256={}",
        hex::encode(hmac_bytes(secret.as_bytes(), body))
    );
    let headers = |event: &str, delivery: &str| {
        vec![
            ("x-hub-signature-256", signature.clone()),
            ("x-github-event", event.to_owned()),
            ("x-github-delivery", delivery.to_owned()),
        ]
    };
    let (status, first) = post(&server, &src, &headers("issues", "d-1"), body).await;
    assert_eq!(
        (status, &first["duplicate"]),
        (200, &json!(false)),
        "{first}"
    );
    assert_eq!(first["eventType"], "issues.opened");

    let (status, resent) = post(&server, &src, &headers("issues", "d-2"), body).await;
    assert_eq!(status, 200, "{resent}");
    assert_eq!(
        resent["duplicate"], true,
        "same signed bytes, new delivery id: {resent}"
    );
    assert_eq!(resent["msgId"], first["msgId"]);
    let (_, messages) = server
        .call(Method::GET, &format!("/api/v1/app/{app}/msg"), None)
        .await;
    assert_eq!(
        messages["data"].as_array().map(Vec::len),
        Some(1),
        "published once: {messages}"
    );
    // The source trusts its event header, so one body under another event is another
    // delivery (Shopify sends one body as orders/create and then orders/updated).
    let (status, other) = post(&server, &src, &headers("issue_comment", "d-3"), body).await;
    assert_eq!(
        (status, &other["duplicate"]),
        (200, &json!(false)),
        "{other}"
    );
    assert_eq!(other["eventType"], "issue_comment.opened");

    // Without the opt-in, headers neither name the event nor may templates read them.
    let plain = source(
        &server,
        &app,
        json!({"kind": "github", "secrets": [secret]}),
    )
    .await;
    assert_eq!(plain["trustUnsignedHeaders"], false);
    let other: &[u8] = br#"{"action":"closed","issue":{"number":7}}"#;
    let signature = format!(
        "sha256={}",
        hex::encode(hmac_bytes(secret.as_bytes(), other))
    );
    let (status, typed) = post(
        &server,
        &plain,
        &[
            ("x-hub-signature-256", signature),
            ("x-github-event", "issues".into()),
        ],
        other,
    )
    .await;
    assert_eq!(status, 200, "{typed}");
    assert_eq!(typed["eventType"], "github");
    let (status, refused) = server
        .call(
            Method::POST,
            &format!("/api/v1/app/{app}/ingest/source"),
            Some(
                json!({"kind": "github", "secrets": [secret], "channels": ["{header:x-channel}"]}),
            ),
        )
        .await;
    assert_eq!(status, 422, "{refused}");
    assert!(
        refused.to_string().contains("trustUnsignedHeaders"),
        "{refused}"
    );
    server.stop().await;
}

/// The review's finding: a captured svix-signed request sent again with a fresh, unsigned
/// `webhook-id` beside its `svix-*` headers was taken as a new delivery. The id deduplicating
/// is now the one the signature covered.
#[tokio::test]
async fn a_svix_signed_request_resent_with_a_fresh_webhook_id_is_a_duplicate() {
    let server = TestServer::start().await;
    let (app, _) = pusher_app(&server, "svix-replay").await;
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let src = source(
        &server,
        &app,
        json!({"kind": "standard-webhooks", "secrets": [secret]}),
    )
    .await;
    let body: &[u8] = br#"{"type":"invoice.paid"}"#;
    let t = now();
    let key = herald_core::EndpointSecret::parse(secret).expect("secret");
    let signed = vec![
        ("svix-id", "msg_svix_1".to_owned()),
        ("svix-timestamp", t.to_string()),
        (
            "svix-signature",
            format!("v1,{}", key.sign("msg_svix_1", t, body)),
        ),
    ];
    let (status, first) = post(&server, &src, &signed, body).await;
    assert_eq!(
        (status, &first["duplicate"]),
        (200, &json!(false)),
        "{first}"
    );
    for fresh in ["fresh-1", "fresh-2"] {
        let mut resent = signed.clone();
        resent.push(("webhook-id", fresh.to_owned()));
        let (status, again) = post(&server, &src, &resent, body).await;
        assert_eq!(
            (status, &again["duplicate"]),
            (200, &json!(true)),
            "{again}"
        );
    }
    server.stop().await;
}

/// Issue 10: an `hmac-sha256` source's `idHeader` was silently ignored (the type read
/// `id_header`). It is accepted and shown as `idHeader`, and, because the header is unsigned,
/// it deduplicates only on a source that trusts unsigned headers: there, two different bodies
/// with one id are one delivery.
#[tokio::test]
async fn an_hmac_sources_id_header_deduplicates_when_the_source_trusts_it() {
    let server = TestServer::start().await;
    let (app, _) = pusher_app(&server, "hmac-id").await;
    let hmac = json!({"header": "X-Sig", "encoding": "hex", "idHeader": "X-Id"});
    let (status, refused) = server
        .call(
            Method::POST,
            &format!("/api/v1/app/{app}/ingest/source"),
            Some(json!({"kind": "hmac-sha256", "secrets": ["s"], "hmac": hmac})),
        )
        .await;
    assert_eq!(status, 422, "{refused}");
    assert!(
        refused.to_string().contains("trustUnsignedHeaders"),
        "{refused}"
    );

    let src = source(
        &server,
        &app,
        json!({"kind": "hmac-sha256", "secrets": ["s"], "hmac": hmac, "trustUnsignedHeaders": true}),
    )
    .await;
    assert_eq!(src["hmac"]["idHeader"], "X-Id", "{src}");
    let signed = |body: &[u8]| {
        vec![
            ("x-sig", hex::encode(hmac_bytes(b"s", body))),
            ("x-id", "delivery-7".to_owned()),
        ]
    };
    let first: &[u8] = br#"{"type":"thing","n":1}"#;
    let second: &[u8] = br#"{"type":"thing","n":2}"#;
    let (status, one) = post(&server, &src, &signed(first), first).await;
    assert_eq!((status, &one["duplicate"]), (200, &json!(false)), "{one}");
    let (status, two) = post(&server, &src, &signed(second), second).await;
    assert_eq!(
        (status, &two["duplicate"]),
        (200, &json!(true)),
        "one id, two bodies: {two}"
    );
    server.stop().await;
}

/// Issue 10, wire formats at the edge: a source, its `hmac` settings and an app's history rules
/// are Herald's own input shapes, so a field they do not know is refused with a 422 that names
/// it (on create and on update), rather than dropped; known fields keep their shapes.
#[tokio::test]
async fn unknown_fields_in_hmac_settings_and_history_rules_are_refused_by_name() {
    let server = TestServer::start().await;
    let (app, _) = pusher_app(&server, "wire-edge").await;
    let refused = |status: u16, body: &Value, field: &str| {
        assert_eq!(status, 422, "{body}");
        assert!(body.to_string().contains(field), "{field} named: {body}");
    };

    let hmac = json!({"header": "X-Sig", "encoding": "hex", "algorithm": "sha1"});
    let (status, body) = server
        .call(
            Method::POST,
            &format!("/api/v1/app/{app}/ingest/source"),
            Some(json!({"kind": "hmac-sha256", "secrets": ["s"], "hmac": hmac})),
        )
        .await;
    refused(status, &body, "algorithm");
    let src = source(
        &server,
        &app,
        json!({"kind": "hmac-sha256", "secrets": ["s"], "hmac": {"header": "X-Sig", "encoding": "base64", "prefix": "sha256="}}),
    )
    .await;
    assert_eq!(
        src["hmac"],
        json!({"header": "X-Sig", "encoding": "base64", "prefix": "sha256="}),
        "{src}"
    );
    let id = src["id"].as_str().expect("id");
    let (status, body) = server
        .call(
            Method::PATCH,
            &format!("/api/v1/app/{app}/ingest/source/{id}"),
            Some(json!({"hmac": {"header": "X-Sig", "encoding": "hex", "idHeadr": "X-Id"}})),
        )
        .await;
    refused(status, &body, "idHeadr");

    // The source's own fields too: a misspelt `secrets` must not leave the old ones verifying.
    let (status, body) = server
        .call(
            Method::PATCH,
            &format!("/api/v1/app/{app}/ingest/source/{id}"),
            Some(json!({"secret": ["rotated"]})),
        )
        .await;
    refused(status, &body, "secret");
    let (status, body) = server
        .call(
            Method::POST,
            &format!("/api/v1/app/{app}/ingest/source"),
            Some(json!({"kind": "stripe", "secrets": ["s"], "toleranceSeconds": 30})),
        )
        .await;
    refused(status, &body, "toleranceSeconds");
    let (status, body) = server
        .call(
            Method::PATCH,
            &format!("/api/v1/app/{app}/ingest/source/{id}"),
            Some(json!({"kind": "github"})),
        )
        .await;
    refused(status, &body, "kind");

    let rule = json!({"pattern": "chat-*", "maxEvents": 10, "maxAgeSecs": 60, "maxBytes": 5});
    let (status, body) = server
        .call(
            Method::POST,
            "/api/v1/app",
            Some(json!({"name": "rules", "history": [rule]})),
        )
        .await;
    refused(status, &body, "maxBytes");
    let (status, body) = server
        .call(
            Method::PATCH,
            &format!("/api/v1/app/{app}"),
            Some(json!({"history": [rule]})),
        )
        .await;
    refused(status, &body, "maxBytes");
    let rules = json!([{"pattern": "chat-*", "maxEvents": 10, "maxAgeSecs": 60}]);
    let (status, body) = server
        .call(
            Method::PATCH,
            &format!("/api/v1/app/{app}"),
            Some(json!({"history": rules})),
        )
        .await;
    assert_eq!((status, &body["history"]), (200, &rules), "{body}");
    server.stop().await;
}

/// Posts to a source with a valid Stripe signature; returns the status, `Retry-After` and body.
async fn post_stripe(
    server: &TestServer,
    source: &Value,
    secret: &str,
    body: &[u8],
) -> (u16, Option<String>, Value) {
    let path = source["ingestPath"].as_str().expect("ingestPath");
    let (name, value) = stripe_header(secret, body, now());
    let response = crate::harness::http_client()
        .post(format!("{}{path}", server.base))
        .header("content-type", "application/json")
        .header(name, value)
        .body(body.to_vec())
        .send()
        .await
        .expect("request");
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().expect("ascii").to_owned());
    let body = response.json().await.unwrap_or(Value::Null);
    (status, retry_after, body)
}

#[tokio::test]
async fn requests_beyond_the_rate_per_address_or_per_source_get_429_with_retry_after() {
    let secret = "whsec_rates";
    let event = |i: usize| format!(r#"{{"id":"evt_{i}","type":"charge.succeeded"}}"#);

    // Per address: a burst of 3, then 429 before the source is even looked up.
    let server = TestServer::start_with(|c| {
        c.ingest.requests_per_second_per_ip = 1;
        c.ingest.request_burst_per_ip = 3;
        c.ingest.requests_per_second_per_source = 0;
    })
    .await;
    let (app, _) = pusher_app(&server, "rates-ip").await;
    let stripe = source(
        &server,
        &app,
        json!({"kind": "stripe", "secrets": [secret]}),
    )
    .await;
    for i in 0..3 {
        let (status, _, body) = post_stripe(&server, &stripe, secret, event(i).as_bytes()).await;
        assert_eq!(status, 200, "{body}");
    }
    let (status, retry_after, body) =
        post_stripe(&server, &stripe, secret, event(3).as_bytes()).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["code"], "rate_limited");
    assert!(
        body["detail"]
            .as_str()
            .is_some_and(|d| d.contains("from this address")),
        "{body}"
    );
    assert_eq!(retry_after.as_deref(), Some("1"));
    // Nothing was stored for the refused request.
    let (_, events) = server
        .call(
            Method::GET,
            &format!(
                "/api/v1/app/{app}/ingest/source/{}/event",
                stripe["id"].as_str().expect("id")
            ),
            None,
        )
        .await;
    assert_eq!(events["data"].as_array().map(Vec::len), Some(3), "{events}");
    server.stop().await;

    // Per source: each source has its own burst of 2, of verified deliveries.
    let server = TestServer::start_with(|c| {
        c.ingest.requests_per_second_per_ip = 0;
        c.ingest.requests_per_second_per_source = 1;
        c.ingest.request_burst_per_source = 2;
    })
    .await;
    let (app, _) = pusher_app(&server, "rates-source").await;
    let busy = source(
        &server,
        &app,
        json!({"kind": "stripe", "secrets": [secret]}),
    )
    .await;
    let quiet = source(
        &server,
        &app,
        json!({"kind": "stripe", "secrets": [secret]}),
    )
    .await;
    // Requests with a wrong signature, however many, spend nothing of the source's budget:
    // they cannot get the provider's own deliveries refused.
    for i in 0..5 {
        let (status, _, body) =
            post_stripe(&server, &busy, "whsec_forged", event(100 + i).as_bytes()).await;
        assert_eq!(status, 401, "{body}");
    }
    for i in 0..2 {
        let (status, _, body) = post_stripe(&server, &busy, secret, event(i).as_bytes()).await;
        assert_eq!(status, 200, "{body}");
    }
    let (status, retry_after, body) =
        post_stripe(&server, &busy, secret, event(2).as_bytes()).await;
    assert_eq!(status, 429, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .is_some_and(|d| d.contains("this source")),
        "{body}"
    );
    assert!(retry_after.is_some());
    let (status, _, body) = post_stripe(&server, &quiet, secret, event(3).as_bytes()).await;
    assert_eq!(status, 200, "another source is not held back: {body}");
    // Retries (or replays) of a delivery recorded lately spend nothing either: the quiet
    // source's one delivery sent many times, and its next new delivery is still taken.
    for _ in 0..5 {
        let (status, _, body) = post_stripe(&server, &quiet, secret, event(3).as_bytes()).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["duplicate"], true, "{body}");
    }
    let (status, _, body) = post_stripe(&server, &quiet, secret, event(4).as_bytes()).await;
    assert_eq!(status, 200, "a new delivery after the replays: {body}");
    assert_eq!(body["duplicate"], false, "{body}");
    server.stop().await;
}
