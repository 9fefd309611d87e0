//! Outbound webhooks against a real local receiver.

use std::{
    collections::{BTreeSet, HashSet},
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::STANDARD};
use hmac::{Hmac, Mac};
use reqwest::Method;
use serde_json::{Value, json};
use sha2::Sha256;

use crate::harness::{Delivery, Receiver, Reply, TestServer, eventually};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// Standard Webhooks verification written out independently of Herald's signing code.
pub(crate) fn signature_valid(secret: &str, d: &Delivery) -> bool {
    let key = STANDARD
        .decode(secret.trim_start_matches("whsec_"))
        .expect("secret base64");
    let signed = format!(
        "{}.{}.{}",
        d.header("webhook-id"),
        d.header("webhook-timestamp"),
        std::str::from_utf8(&d.body).expect("utf8 body")
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("key");
    mac.update(signed.as_bytes());
    let expected = format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()));
    d.header("webhook-signature")
        .split(' ')
        .any(|s| s == expected)
}

async fn attempts(server: &TestServer, app: &str, endpoint: &str) -> Vec<Value> {
    let (status, list) = server
        .call(
            Method::GET,
            &format!("/api/v1/app/{app}/attempt/endpoint/{endpoint}"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{list}");
    list["data"].as_array().expect("data").clone()
}

/// Waits until the endpoint reports `disabled: true`.
async fn disabled(server: &TestServer, app: &str, ep_id: &str) {
    eventually("the endpoint to be disabled", || async {
        let (_, ep) = server
            .call(
                Method::GET,
                &format!("/api/v1/app/{app}/endpoint/{ep_id}"),
                None,
            )
            .await;
        (ep["disabled"] == true).then_some(())
    })
    .await;
}

#[tokio::test]
async fn delivers_signed_payload_bytes_exactly_as_received() {
    let server = TestServer::start().await;
    let mut receiver = Receiver::start().await;
    let app = server.create_app("signed").await;
    let ep = server
        .create_endpoint(
            &app,
            json!({"url": receiver.url, "secret": SECRET, "headers": {"X-Tenant": "acme"}}),
        )
        .await;

    // Unusual spacing and key order must survive: the payload is never re-serialized.
    let body = r#"{"eventType":"invoice.paid","payload":{ "z" : 1,"a":[true , null] ,"s":"é"}}"#;
    let (status, msg) = server
        .raw_post(&format!("/api/v1/app/{app}/msg"), body)
        .await;
    assert_eq!(status, 201, "{msg}");

    let delivery = receiver.next().await;
    assert_eq!(
        &delivery.body[..],
        r#"{ "z" : 1,"a":[true , null] ,"s":"é"}"#.as_bytes()
    );
    assert_eq!(
        delivery.header("webhook-id"),
        msg["id"].as_str().expect("id")
    );
    assert_eq!(delivery.path, "/hook");
    assert_eq!(delivery.header("content-type"), "application/json");
    assert_eq!(delivery.header("x-tenant"), "acme");
    let ts: i64 = delivery
        .header("webhook-timestamp")
        .parse()
        .expect("timestamp");
    assert!((chrono::Utc::now().timestamp() - ts).abs() < 60);
    assert!(signature_valid(SECRET, &delivery), "signature must verify");

    let (_, secret) = server
        .call(
            Method::GET,
            &format!(
                "/api/v1/app/{app}/endpoint/{}/secret",
                ep["id"].as_str().expect("id")
            ),
            None,
        )
        .await;
    assert_eq!(secret["key"], SECRET);
    server.stop().await;
}

#[tokio::test]
async fn failures_are_retried_on_the_schedule_and_logged() {
    let server = TestServer::start().await;
    let mut receiver = Receiver::start().await;
    receiver.script(&[
        Reply::Status(500),
        Reply::RetryAfter(503, 0),
        Reply::Status(200),
    ]);
    let app = server.create_app("retry").await;
    let ep = server
        .create_endpoint(&app, json!({"url": receiver.url}))
        .await;
    let ep_id = ep["id"].as_str().expect("id");
    let msg = server
        .send(&app, json!({"eventType": "x", "payload": {}}))
        .await;

    let replies: Vec<Reply> = vec![
        receiver.next().await.reply,
        receiver.next().await.reply,
        receiver.next().await.reply,
    ];
    assert!(matches!(replies[2], Reply::Status(200)), "{replies:?}");
    let stats = server.settled(&app, ep_id).await;
    assert_eq!(stats["success"], 1, "{stats}");

    let log = attempts(&server, &app, ep_id).await;
    let codes: Vec<i64> = log
        .iter()
        .rev()
        .map(|a| a["responseStatusCode"].as_i64().expect("code"))
        .collect();
    assert_eq!(codes, [500, 503, 200]);
    let statuses: Vec<i64> = log
        .iter()
        .rev()
        .map(|a| a["status"].as_i64().expect("status"))
        .collect();
    assert_eq!(statuses, [2, 2, 0]);
    assert_eq!(log[0]["response"], "reply 200");
    assert_eq!(log[0]["msgId"], msg["id"]);
    assert_eq!(log[0]["triggerType"], 0);

    let (_, by_msg) = server
        .call(
            Method::GET,
            &format!(
                "/api/v1/app/{app}/attempt/msg/{}",
                msg["id"].as_str().expect("id")
            ),
            None,
        )
        .await;
    assert_eq!(by_msg["data"].as_array().map(Vec::len), Some(3));
    server.stop().await;
}

#[tokio::test]
async fn gives_up_after_the_schedule_then_recover_and_resend_deliver() {
    let server = TestServer::start_with(|c| c.delivery.retry_schedule_secs = vec![0.01]).await;
    let mut receiver = Receiver::start().await;
    receiver.fallback(Reply::Status(500));
    let app = server.create_app("recover").await;
    let ep = server
        .create_endpoint(&app, json!({"url": receiver.url}))
        .await;
    let ep_id = ep["id"].as_str().expect("id");
    let since = chrono::Utc::now() - chrono::Duration::seconds(5);
    let msg = server
        .send(&app, json!({"eventType": "x", "payload": {"k": 1}}))
        .await;
    receiver.next().await;
    receiver.next().await;
    let stats = server.settled(&app, ep_id).await;
    assert_eq!(stats["fail"], 1, "two attempts, then failed: {stats}");

    receiver.fallback(Reply::Status(200));
    let (status, task) = server
        .call(
            Method::POST,
            &format!("/api/v1/app/{app}/endpoint/{ep_id}/recover"),
            Some(json!({"since": since})),
        )
        .await;
    assert_eq!(status, 202, "{task}");
    assert_eq!(task["task"], "endpoint.recover");
    assert!(receiver.next().await.succeeded());
    let stats = server.settled(&app, ep_id).await;
    assert_eq!(stats["success"], 1, "{stats}");

    let msg_id = msg["id"].as_str().expect("id");
    let (status, _) = server
        .call(
            Method::POST,
            &format!("/api/v1/app/{app}/msg/{msg_id}/endpoint/{ep_id}/resend"),
            None,
        )
        .await;
    assert_eq!(status, 202);
    assert!(receiver.next().await.succeeded());
    server.settled(&app, ep_id).await;
    let log = attempts(&server, &app, ep_id).await;
    assert_eq!(log.len(), 4);
    assert_eq!(log[0]["triggerType"], 1, "resend is a manual attempt");
    server.stop().await;
}

/// A receiver's answer is logged as text: bytes that are not UTF-8, and NUL, which
/// PostgreSQL's text refuses, read as U+FFFD. The attempt is recorded once and the delivery
/// counted, rather than its record refused and the message sent again at each lease's end.
#[tokio::test]
async fn a_response_body_with_nul_and_bad_utf8_is_logged_once() {
    let server = TestServer::start().await;
    let mut receiver = Receiver::start().await;
    receiver.fallback(Reply::Body(200, b"ok\0done\xff"));
    let app = server.create_app("nul-reply").await;
    let ep = server
        .create_endpoint(&app, json!({"url": receiver.url}))
        .await;
    let ep_id = ep["id"].as_str().expect("id");
    server
        .send(&app, json!({"eventType": "x", "payload": {}}))
        .await;
    assert!(receiver.next().await.succeeded());
    let stats = server.settled(&app, ep_id).await;
    assert_eq!(stats["success"], 1, "{stats}");
    let log = attempts(&server, &app, ep_id).await;
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(log[0]["response"], "ok\u{FFFD}done\u{FFFD}");
    assert_eq!(log[0]["responseStatusCode"], 200);
    assert!(receiver.drain().is_empty(), "sent once");
    server.stop().await;
}

#[tokio::test]
async fn gone_disables_the_endpoint() {
    let server = TestServer::start().await;
    let mut receiver = Receiver::start().await;
    receiver.fallback(Reply::Status(410));
    let app = server.create_app("gone").await;
    let ep = server
        .create_endpoint(&app, json!({"url": receiver.url}))
        .await;
    let ep_id = ep["id"].as_str().expect("id");
    server
        .send(&app, json!({"eventType": "x", "payload": {}}))
        .await;
    assert!(matches!(receiver.next().await.reply, Reply::Status(410)));
    disabled(&server, &app, ep_id).await;
    let stats = server.settled(&app, ep_id).await;
    assert_eq!(stats["fail"], 1);
    assert_eq!(
        attempts(&server, &app, ep_id).await.len(),
        1,
        "410 is not retried"
    );

    // A disabled endpoint is not a target for new messages.
    server
        .send(&app, json!({"eventType": "x", "payload": {}}))
        .await;
    let stats = server.settled(&app, ep_id).await;
    assert_eq!(stats["fail"], 1);
    assert!(receiver.drain().is_empty());
    // Nor can it recover: what it queued would fail again at once. Said, as a resend is.
    let since = chrono::Utc::now() - chrono::Duration::minutes(1);
    let (status, refused) = server
        .call(
            Method::POST,
            &format!("/api/v1/app/{app}/endpoint/{ep_id}/recover"),
            Some(json!({"since": since})),
        )
        .await;
    assert_eq!(status, 400, "{refused}");
    assert_eq!(refused["code"], "endpoint_disabled", "{refused}");
    server.stop().await;
}

#[tokio::test]
async fn endpoints_disabled_after_failing_too_long() {
    let server = TestServer::start_with(|c| {
        c.delivery.disable_after_secs = 0.001;
        c.delivery.retry_schedule_secs = vec![0.01; 5];
    })
    .await;
    let mut receiver = Receiver::start().await;
    receiver.fallback(Reply::Status(500));
    let app = server.create_app("streak").await;
    let ep = server
        .create_endpoint(&app, json!({"url": receiver.url}))
        .await;
    let ep_id = ep["id"].as_str().expect("id");
    server
        .send(&app, json!({"eventType": "x", "payload": {}}))
        .await;
    receiver.next().await;
    receiver.next().await;
    disabled(&server, &app, ep_id).await;
    server.stop().await;
}

#[tokio::test]
async fn event_type_and_channel_filters_choose_endpoints() {
    let server = TestServer::start().await;
    let mut by_type = Receiver::start().await;
    let mut by_channel = Receiver::start().await;
    let mut everything = Receiver::start().await;
    let app = server.create_app("filters").await;
    let ep_type = server
        .create_endpoint(
            &app,
            json!({"url": by_type.url, "eventTypes": ["invoice.paid"]}),
        )
        .await;
    // `filterTypes` is the older SDKs' name for the same filter.
    let ep_legacy = server
        .create_endpoint(
            &app,
            json!({"url": by_type.url, "filterTypes": ["never.sent"]}),
        )
        .await;
    assert_eq!(ep_legacy["eventTypes"], json!(["never.sent"]));
    let ep_channel = server
        .create_endpoint(
            &app,
            json!({"url": by_channel.url, "channels": ["project_1"]}),
        )
        .await;
    let ep_all = server
        .create_endpoint(&app, json!({"url": everything.url}))
        .await;

    let messages = [
        json!({"eventType": "invoice.paid", "payload": {"n": 1}}),
        json!({"eventType": "invoice.failed", "payload": {"n": 2}, "channels": ["project_1"]}),
        json!({"eventType": "invoice.paid", "payload": {"n": 3}, "channels": ["project_2", "project_1"]}),
        json!({"eventType": "user.created", "payload": {"n": 4}, "channels": ["project_2"]}),
    ];
    for m in &messages {
        server.send(&app, m.clone()).await;
    }
    for (ep, expected) in [
        (&ep_type, 2),
        (&ep_legacy, 0),
        (&ep_channel, 2),
        (&ep_all, 4),
    ] {
        let id = ep["id"].as_str().expect("id");
        let stats = server.settled(&app, id).await;
        assert_eq!(stats["success"], expected, "{id}: {stats}");
    }
    let numbers = |r: &mut Receiver| -> BTreeSet<i64> {
        r.drain()
            .iter()
            .map(|d| {
                serde_json::from_slice::<Value>(&d.body).expect("json")["n"]
                    .as_i64()
                    .expect("n")
            })
            .collect()
    };
    assert_eq!(numbers(&mut by_type), BTreeSet::from([1, 3]));
    assert_eq!(numbers(&mut by_channel), BTreeSet::from([2, 3]));
    assert_eq!(numbers(&mut everything), BTreeSet::from([1, 2, 3, 4]));
    server.stop().await;
}

#[tokio::test]
async fn private_targets_are_refused_unless_allowed() {
    let server = TestServer::start_with(|c| {
        c.delivery.allow_private_targets = false;
        c.delivery.retry_schedule_secs = vec![];
    })
    .await;
    let mut receiver = Receiver::start().await;
    let app = server.create_app("ssrf").await;
    let port = receiver.url.rsplit(':').next().expect("port").to_owned();
    let by_ip = server
        .create_endpoint(&app, json!({"url": receiver.url}))
        .await;
    let by_name = server
        .create_endpoint(&app, json!({"url": format!("http://localhost:{port}")}))
        .await;
    server
        .send(&app, json!({"eventType": "x", "payload": {}}))
        .await;
    for ep in [&by_ip, &by_name] {
        let id = ep["id"].as_str().expect("id");
        let stats = server.settled(&app, id).await;
        assert_eq!(stats["fail"], 1, "{stats}");
        let log = attempts(&server, &app, id).await;
        assert_eq!(log[0]["responseStatusCode"], 0);
        let why = log[0]["response"].as_str().expect("response");
        assert!(why.contains("refused") && why.contains("loopback"), "{why}");
        assert!(!why.contains("127.0.0.1"), "the address is not told: {why}");
    }
    assert!(
        receiver.drain().is_empty(),
        "nothing reached the private address"
    );
    server.stop().await;
}

#[tokio::test]
async fn rotated_secret_keeps_signing_during_the_grace_period() {
    let server = TestServer::start().await;
    let mut receiver = Receiver::start().await;
    let app = server.create_app("rotate").await;
    let ep = server
        .create_endpoint(&app, json!({"url": receiver.url, "secret": SECRET}))
        .await;
    let ep_id = ep["id"].as_str().expect("id");
    let (status, rotated) = server
        .call(
            Method::POST,
            &format!("/api/v1/app/{app}/endpoint/{ep_id}/secret/rotate"),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, 200);
    let (_, new_secret) = server
        .call(
            Method::GET,
            &format!("/api/v1/app/{app}/endpoint/{ep_id}/secret"),
            None,
        )
        .await;
    assert_eq!(
        rotated["key"], new_secret["key"],
        "rotate answers with the new secret"
    );
    let new_secret = new_secret["key"].as_str().expect("key").to_owned();
    assert_ne!(new_secret, SECRET);

    server
        .send(&app, json!({"eventType": "x", "payload": {}}))
        .await;
    let delivery = receiver.next().await;
    assert_eq!(delivery.header("webhook-signature").split(' ').count(), 2);
    assert!(
        signature_valid(&new_secret, &delivery),
        "new secret verifies"
    );
    assert!(
        signature_valid(SECRET, &delivery),
        "old secret still verifies"
    );
    server.stop().await;
}

/// Gives `app` on `node` an endpoint that sends to `receiver`, paced at `rate` a second, and
/// sends it `count` messages at once; returns when the sending began, before the first turn.
pub(crate) async fn send_to_a_paced_endpoint(
    node: &TestServer,
    app: &str,
    receiver: &Receiver,
    rate: u32,
    count: usize,
) -> Instant {
    node.create_endpoint(app, json!({"url": receiver.url, "throttleRate": rate}))
        .await;
    let started = Instant::now();
    for n in 0..count {
        node.send(app, json!({"eventType": "x", "payload": {"n": n}}))
            .await;
    }
    started
}

/// The next `count` deliveries at `receiver`, each of a message not in `seen` (which keeps
/// them): how long after `started` each arrived.
pub(crate) async fn arrivals_once_each(
    receiver: &mut Receiver,
    seen: &mut HashSet<String>,
    count: usize,
    started: Instant,
) -> Vec<Duration> {
    let mut arrivals = Vec::with_capacity(count);
    for _ in 0..count {
        let delivery = receiver.next().await;
        assert!(
            seen.insert(delivery.header("webhook-id").to_owned()),
            "each message once"
        );
        arrivals.push(started.elapsed());
    }
    arrivals
}

/// Asserts that the n-th of `arrivals` (from 0, counted from before the first turn) came no
/// sooner than its turn at `rate` a second: a burst of `rate`, then one every `1 / rate`
/// seconds. Lower bounds only: a busy machine may be later, never earlier.
pub(crate) fn assert_no_sooner_than_their_turns(arrivals: &[Duration], rate: u32) {
    let interval = Duration::from_secs(1) / rate;
    for (n, arrived) in arrivals.iter().enumerate() {
        let after_the_burst = n.saturating_sub(rate.saturating_sub(1) as usize);
        let turn = interval * u32::try_from(after_the_burst).unwrap_or(u32::MAX);
        assert!(
            *arrived + Duration::from_millis(10) >= turn,
            "delivery {n} at {arrived:?}, before its turn at {turn:?}: {arrivals:?}"
        );
    }
}

/// An endpoint's `throttleRate` spaces its deliveries: at 2 a second, six messages sent at once
/// go as a burst of two, then one every half second, each once.
#[tokio::test]
async fn throttle_rate_spaces_an_endpoints_deliveries() {
    let server = TestServer::start().await;
    let mut receiver = Receiver::start().await;
    let app = server.create_app("paced").await;
    let started = send_to_a_paced_endpoint(&server, &app, &receiver, 2, 6).await;
    let arrivals = arrivals_once_each(&mut receiver, &mut HashSet::new(), 6, started).await;
    assert_no_sooner_than_their_turns(&arrivals, 2);
    server.stop().await;
}

/// With leases shorter than a paced endpoint's backlog takes, each delivery still goes once, at
/// its turn. With a 1 s request timeout a lease lasts about 7 s and an attempt may start until
/// about 1.1 s after its claim; at 1 a second the four go at 0, 1, 2 and 3 s. A delivery
/// claimed before its endpoint's pace was known whose turn comes too late for its lease is let
/// go (`herald_delivery_paced_past_lease_total`) and claimed again once its turn is near, and
/// the lanes claim no more of the endpoint until then; whether that happens here depends on how
/// the four are claimed, so the dispatcher's own tests show it for certain
/// (`worker::tests::a_job_with_no_turn_within_its_lease_is_let_go_for_a_later_claim`,
/// `worker::tests::a_delivery_let_go_for_its_lease_is_claimed_again_and_sent_once_at_its_turn`).
/// (When such a delivery was left leased, the last two came after the lease, 7 s in.)
#[tokio::test]
async fn with_short_leases_a_paced_endpoints_deliveries_go_once_each_at_their_turns() {
    let server = TestServer::start_with(|c| {
        c.delivery.request_timeout_secs = 1.0;
        c.shutdown_grace_secs = 0.1;
    })
    .await;
    let mut receiver = Receiver::start().await;
    let app = server.create_app("paced-past-lease").await;
    let started = send_to_a_paced_endpoint(&server, &app, &receiver, 1, 4).await;
    let arrivals = arrivals_once_each(&mut receiver, &mut HashSet::new(), 4, started).await;
    // The last's turn, 3 s in, was past the 1.1 s its first lease let it start by: it came
    // at its turn, well before that lease ran out (7 s in; the bound leaves a busy machine 3 s).
    assert_no_sooner_than_their_turns(&arrivals, 1);
    assert!(arrivals[3] < Duration::from_secs(6), "{arrivals:?}");
    // Settled, each delivery recorded its success and none can be claimed again: one attempt
    // each in the log (a delivery sent twice under two leases would have logged two).
    let (_, endpoints) = server
        .call(Method::GET, &format!("/api/v1/app/{app}/endpoint"), None)
        .await;
    let endpoint = endpoints["data"][0]["id"].as_str().expect("the endpoint");
    server.settled(&app, endpoint).await;
    assert_eq!(attempts(&server, &app, endpoint).await.len(), 4);
    assert!(receiver.drain().is_empty(), "nothing more");
    server.stop().await;
}

/// Deliveries waiting for a paced endpoint's turn hold no slot: with an app share of one
/// attempt at a time, the app's other endpoint is delivered before the paced one's third turn
/// (2 s in), where waiting in the slot kept it behind every turn.
#[tokio::test]
async fn deliveries_waiting_for_their_turn_leave_the_apps_slots_to_its_other_endpoints() {
    let server = TestServer::start_with(|c| c.delivery.per_app_in_flight = Some(1)).await;
    let mut paced = Receiver::start().await;
    let mut free = Receiver::start().await;
    let app = server.create_app("paced-and-free").await;
    server
        .create_endpoint(
            &app,
            json!({"url": paced.url, "throttleRate": 1, "eventTypes": ["slow"]}),
        )
        .await;
    server
        .create_endpoint(&app, json!({"url": free.url, "eventTypes": ["fast"]}))
        .await;
    for n in 0..3 {
        server
            .send(&app, json!({"eventType": "slow", "payload": {"n": n}}))
            .await;
    }
    assert!(paced.next().await.succeeded(), "the first goes at once");
    server
        .send(&app, json!({"eventType": "fast", "payload": {}}))
        .await;
    assert!(free.next().await.succeeded());
    let meanwhile = paced.drain().len();
    assert!(
        meanwhile <= 1,
        "{meanwhile} paced deliveries came before the free endpoint's: it waited for their turns"
    );
    for _ in meanwhile..2 {
        assert!(paced.next().await.succeeded(), "the rest at their turns");
    }
    server.stop().await;
}

#[tokio::test]
async fn first_attempts_are_not_stuck_behind_a_slow_endpoint() {
    let server = TestServer::start_with(|c| {
        c.delivery.per_endpoint_in_flight = 2;
        c.delivery.request_timeout_secs = 30.0;
        c.shutdown_grace_secs = 0.1;
    })
    .await;
    let mut slow = Receiver::start().await;
    slow.fallback(Reply::Hang);
    let mut fast = Receiver::start().await;
    let app_slow = server.create_app("slow").await;
    let app_fast = server.create_app("fast").await;
    server
        .create_endpoint(&app_slow, json!({"url": slow.url}))
        .await;
    for _ in 0..20 {
        server
            .send(&app_slow, json!({"eventType": "x", "payload": {}}))
            .await;
    }
    slow.next().await;
    slow.next().await;
    let fast_ep = server
        .create_endpoint(&app_fast, json!({"url": fast.url}))
        .await;
    for _ in 0..5 {
        server
            .send(&app_fast, json!({"eventType": "x", "payload": {}}))
            .await;
    }
    for _ in 0..5 {
        assert!(fast.next().await.succeeded());
    }
    let stats = server
        .settled(&app_fast, fast_ep["id"].as_str().expect("id"))
        .await;
    assert_eq!(stats["success"], 5);
    assert!(
        slow.drain().is_empty(),
        "the hanging endpoint holds only its 2 slots"
    );
    server.stop().await;
}

#[tokio::test]
async fn first_attempts_are_not_stuck_behind_retries_of_the_same_endpoint() {
    let server = TestServer::start_with(|c| {
        c.delivery.max_retries_in_flight = 1;
        c.delivery.request_timeout_secs = 30.0;
        c.shutdown_grace_secs = 0.1;
    })
    .await;
    let mut receiver = Receiver::start().await;
    // "doomed" messages fail their first attempt, and their retries hang, filling the retry
    // lane; every other message succeeds at once.
    receiver.rule(|body, before| {
        let doomed = std::str::from_utf8(body).unwrap_or("").contains("doomed");
        match (doomed, before) {
            (false, _) => Reply::Status(200),
            (true, 0) => Reply::Status(500),
            (true, _) => Reply::Hang,
        }
    });
    let app = server.create_app("lanes").await;
    let ep = server
        .create_endpoint(&app, json!({"url": receiver.url}))
        .await;
    for _ in 0..3 {
        server
            .send(&app, json!({"eventType": "x", "payload": {"doomed": true}}))
            .await;
    }
    // Wait until a retry is hanging: the retry lane (one slot) is now stuck.
    loop {
        let d = receiver.next().await;
        if matches!(d.reply, Reply::Hang) {
            break;
        }
    }
    for i in 0..5 {
        server
            .send(&app, json!({"eventType": "x", "payload": {"fresh": i}}))
            .await;
    }
    let mut fresh = BTreeSet::new();
    while fresh.len() < 5 {
        let d = receiver.next().await;
        if d.succeeded() {
            let body: Value = serde_json::from_slice(&d.body).expect("json");
            fresh.insert(body["fresh"].as_i64().expect("fresh"));
        }
    }
    assert_eq!(fresh, BTreeSet::from([0, 1, 2, 3, 4]));
    let ep_id = ep["id"].as_str().expect("id");
    eventually("five successes recorded", || async {
        (server.stats(&app, ep_id).await["success"] == 5).then_some(())
    })
    .await;
    server.stop().await;
}

#[tokio::test]
async fn an_app_with_hanging_endpoints_cannot_take_another_apps_first_attempt_slots() {
    // The shipped lane budgets. App A's 20 hanging endpoints could hold 20 x 32 = 640
    // attempts, more than the whole first-attempt lane; its share is a quarter of the lane.
    let defaults = herald::Config::default().delivery;
    let lane = defaults.max_in_flight as usize;
    let per_endpoint = defaults.per_endpoint_in_flight as usize;
    let share = (lane / 4).max(per_endpoint);
    let a_endpoints = 20;
    assert!(
        a_endpoints * per_endpoint > lane,
        "A alone could fill the lane"
    );
    let server = TestServer::start_with(|c| {
        // No attempt of A's ends while the test runs: anything B gets, it gets while every
        // one of A's requests is still hanging.
        c.delivery.request_timeout_secs = 600.0;
        c.shutdown_grace_secs = 0.1;
    })
    .await;
    let mut hanging = Receiver::start().await;
    hanging.fallback(Reply::Hang);
    let mut fast = Receiver::start().await;
    let app_a = server.create_app("noisy").await;
    let app_b = server.create_app("neighbour").await;
    for n in 0..a_endpoints {
        server
            .create_endpoint(&app_a, json!({"url": format!("{}/{n}", hanging.url)}))
            .await;
    }
    let b_ep = server
        .create_endpoint(&app_b, json!({"url": fast.url}))
        .await;
    // More than the lane claims at once (twice its budget): A's backlog alone could fill
    // every claim as well as every slot.
    let a_messages = 2 * lane / a_endpoints + per_endpoint;
    for _ in 0..a_messages {
        server
            .send(&app_a, json!({"eventType": "x", "payload": {}}))
            .await;
    }
    // A has taken every slot it will get before B's message exists.
    for _ in 0..share {
        assert!(matches!(hanging.next().await.reply, Reply::Hang));
    }

    let sent = std::time::Instant::now();
    server
        .send(&app_b, json!({"eventType": "x", "payload": {"b": 1}}))
        .await;
    assert!(fast.next().await.succeeded());
    let latency = sent.elapsed();
    eprintln!("B delivered {latency:?} after its message was accepted");
    server
        .settled(&app_b, b_ep["id"].as_str().expect("id"))
        .await;
    // B's is the only attempt that ended: every one of A's was still hanging.
    assert_eq!(
        server.store_scalar("SELECT COUNT(*) FROM attempts").await,
        1
    );
    assert!(
        hanging.drain().is_empty(),
        "A holds its share of {share} slots, no more"
    );
    server.stop().await;
}
