//! `GET /metrics`: Prometheus text behind an environment-wide token, whose counters and
//! gauges move as events flow through the webhook, ingest and queue paths.

use reqwest::Method;
use serde_json::json;

use crate::{
    harness::{ADMIN_TOKEN, Receiver, Reply, TestServer, eventually},
    ingest::{now, post, source, stripe_header},
    pusher::{Client, pusher_app},
};

/// The scrape's status, content type and body, with `token` as the bearer (if any).
async fn scrape_as(server: &TestServer, token: Option<&str>) -> (u16, String, String) {
    let mut request = crate::harness::http_client().get(format!("{}/metrics", server.base));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("scrape");
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    (status, content_type, response.text().await.expect("body"))
}

/// The value of the sample named exactly `series` (name and labels) in `text`.
pub(crate) fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse::<f64>().expect("a number"))
        })
        .unwrap_or_else(|| panic!("{series} missing from:\n{text}"))
}

pub(crate) async fn scrape(server: &TestServer) -> String {
    let (status, _, text) = scrape_as(server, Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 200, "{text}");
    text
}

#[tokio::test]
async fn metrics_need_an_environment_token_and_speak_openmetrics() {
    let server = TestServer::start().await;
    let (status, _, body) = scrape_as(&server, None).await;
    assert_eq!(status, 401, "no token: {body}");
    let (status, _, body) = scrape_as(&server, Some("not-a-token")).await;
    assert_eq!(status, 401, "a wrong token: {body}");

    server.create_app("scoped").await;
    let (status, token) = server
        .call(
            Method::POST,
            "/api/v1/auth/token",
            Some(json!({"name": "one app's backend", "appId": "scoped"})),
        )
        .await;
    assert_eq!(status, 201, "{token}");
    let scoped = token["token"].as_str().expect("token");
    let (status, _, body) = scrape_as(&server, Some(scoped)).await;
    assert_eq!(status, 403, "an app-scoped token: {body}");

    let (status, content_type, text) = scrape_as(&server, Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 200, "{text}");
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    assert!(text.trim_end().ends_with("# EOF"), "{text}");
    assert!(
        text.contains("# TYPE herald_delivery_queue_due gauge"),
        "{text}"
    );
    // The cluster's link is counted only where there is one: on PostgreSQL, listening.
    if server.on_postgres() {
        assert_eq!(sample(&text, "herald_cluster_listening"), 1.0, "{text}");
        assert_eq!(
            sample(&text, "herald_cluster_listen_sessions_opened_total"),
            1.0
        );
        assert_eq!(
            sample(&text, "herald_cluster_notices_failed_total{via=\"notify\"}"),
            0.0
        );
    } else {
        assert!(!text.contains("herald_cluster_"), "{text}");
    }
    server.stop().await;
}

#[tokio::test]
async fn counters_and_gauges_move_as_events_flow() {
    let server = TestServer::start().await;
    let before = scrape(&server).await;
    for series in [
        "herald_publications_total{source=\"api\"}",
        "herald_publications_total{source=\"ingest\"}",
        "herald_webhook_attempts_total{status_class=\"2xx\"}",
        "herald_webhook_attempts_total{status_class=\"5xx\"}",
        "herald_ingest_requests_total{outcome=\"accepted\"}",
        "herald_ingest_requests_total{outcome=\"duplicate\"}",
        "herald_ingest_requests_total{outcome=\"invalid_signature\"}",
        "herald_delivery_queue_due",
        "herald_broker_publish_seconds_count",
    ] {
        assert_eq!(sample(&before, series), 0.0, "{series} starts at 0");
    }
    // Creating the app and endpoint below commits too: the histograms' starting counts.
    let commits_before = sample(&before, "herald_store_commit_seconds_count");

    // A message whose first attempt gets a 503 and whose retry a 200.
    let mut receiver = Receiver::start().await;
    receiver.script(&[Reply::Status(503)]);
    let app = server.create_app("metered").await;
    server
        .create_endpoint(&app, json!({"url": receiver.url}))
        .await;
    server
        .send(
            &app,
            json!({"eventType": "order.paid", "payload": {"id": 1}, "channels": ["orders"]}),
        )
        .await;
    receiver.next().await;
    receiver.next().await;
    let text = eventually("both attempts counted", || async {
        let text = scrape(&server).await;
        (sample(&text, "herald_webhook_attempts_total{status_class=\"2xx\"}") == 1.0)
            .then_some(text)
    })
    .await;
    assert_eq!(
        sample(&text, "herald_webhook_attempts_total{status_class=\"5xx\"}"),
        1.0
    );
    assert_eq!(
        sample(&text, "herald_delivery_attempts_total{outcome=\"success\"}"),
        1.0
    );
    assert_eq!(
        sample(&text, "herald_publications_total{source=\"api\"}"),
        1.0,
        "{text}"
    );
    // The histograms moved: the message and both attempt records were committed (on
    // SQLite some may share a commit), and the channel publication was handed to the broker.
    let commits = sample(&text, "herald_store_commit_seconds_count") - commits_before;
    assert!(commits >= 1.0, "{text}");
    assert_eq!(
        sample(&text, "herald_store_commit_writes_count"),
        sample(&text, "herald_store_commit_seconds_count"),
        "one observation of each per commit"
    );
    assert!(
        sample(&text, "herald_store_commit_writes_sum")
            >= sample(&text, "herald_store_commit_writes_count"),
        "every commit carried a write"
    );
    assert!(
        sample(&text, "herald_store_commit_seconds_sum") > 0.0,
        "{text}"
    );
    assert_eq!(sample(&text, "herald_broker_publish_seconds_count"), 1.0);
    assert_eq!(
        sample(&text, "herald_broker_publish_seconds_bucket{le=\"+Inf\"}"),
        1.0
    );

    // Inbound: one verified, the provider's retry of it, one with a wrong signature.
    let secret = "whsec_metrics_secret";
    let stripe = source(
        &server,
        &app,
        json!({"kind": "stripe", "secrets": [secret]}),
    )
    .await;
    let body = br#"{"id":"evt_1","object":"event","type":"charge.succeeded","data":{"object":{}}}"#;
    for _ in 0..2 {
        let (status, answer) = post(
            &server,
            &stripe,
            &[stripe_header(secret, body, now())],
            body,
        )
        .await;
        assert_eq!(status, 200, "{answer}");
    }
    let (status, answer) = post(
        &server,
        &stripe,
        &[stripe_header("whsec_wrong", body, now())],
        body,
    )
    .await;
    assert_eq!(status, 401, "{answer}");
    let text = scrape(&server).await;
    for (series, value) in [
        ("herald_ingest_requests_total{outcome=\"accepted\"}", 1.0),
        ("herald_ingest_requests_total{outcome=\"duplicate\"}", 1.0),
        (
            "herald_ingest_requests_total{outcome=\"invalid_signature\"}",
            1.0,
        ),
        // The provider's retry published nothing.
        ("herald_publications_total{source=\"ingest\"}", 1.0),
    ] {
        assert_eq!(sample(&text, series), value, "{series}");
    }

    // A receiver that never answers keeps a delivery in the queue, growing older.
    let stuck = Receiver::start().await;
    stuck.fallback(Reply::Hang);
    let app = server.create_app("stuck").await;
    server
        .create_endpoint(&app, json!({"url": stuck.url}))
        .await;
    server
        .send(
            &app,
            json!({"eventType": "order.paid", "payload": {"id": 2}}),
        )
        .await;
    eventually("the stuck delivery shows in the queue, aged", || async {
        let text = scrape(&server).await;
        (sample(&text, "herald_delivery_queue_due") == 1.0
            && sample(&text, "herald_delivery_queue_oldest_due_age_seconds") > 0.0)
            .then_some(())
    })
    .await;
    server.stop().await;
}

#[tokio::test]
async fn connections_and_subscriptions_are_counted_by_transport_while_open() {
    let server = TestServer::start().await;
    let (_, creds) = pusher_app(&server, "counted").await;
    let pusher = "herald_transport_connections{transport=\"pusher\"}";
    let sse = "herald_transport_connections{transport=\"sse\"}";
    let before = scrape(&server).await;
    assert_eq!(sample(&before, pusher), 0.0);

    let mut client = Client::connect(&server, &creds.key).await;
    let text = scrape(&server).await;
    assert_eq!(
        sample(&text, pusher),
        1.0,
        "the WebSocket is admitted before it is greeted"
    );
    assert_eq!(sample(&text, sse), 0.0);
    assert_eq!(sample(&text, "herald_connections"), 1.0);

    let subscriptions = "herald_subscriptions{transport=\"pusher\"}";
    assert_eq!(sample(&text, subscriptions), 0.0);
    for channel in ["news", "sport"] {
        let answer = client.subscribe(channel, None, None).await;
        assert_eq!(answer["event"], "pusher_internal:subscription_succeeded");
    }
    let text = scrape(&server).await;
    assert_eq!(sample(&text, subscriptions), 2.0, "{text}");
    assert_eq!(
        sample(&text, "herald_subscriptions{transport=\"sse\"}"),
        0.0
    );

    drop(client);
    eventually("the closed WebSocket leaves the counts", || async {
        let text = scrape(&server).await;
        (sample(&text, pusher) == 0.0
            && sample(&text, "herald_connections") == 0.0
            && sample(&text, subscriptions) == 0.0)
            .then_some(())
    })
    .await;
    server.stop().await;
}

#[tokio::test]
async fn a_request_over_a_rate_limit_is_counted_by_its_limit() {
    let server = TestServer::start_with(|c| {
        c.ingest.requests_per_second_per_source = 1;
        c.ingest.request_burst_per_source = 1;
    })
    .await;
    let app = server.create_app("limited").await;
    let secret = "whsec_limited_secret";
    let stripe = source(
        &server,
        &app,
        json!({"kind": "stripe", "secrets": [secret]}),
    )
    .await;
    let body = br#"{"id":"evt_9","object":"event","type":"charge.succeeded","data":{"object":{}}}"#;
    let (status, answer) = post(
        &server,
        &stripe,
        &[stripe_header(secret, body, now())],
        body,
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    // Another delivery: a retry of the first would be answered as a duplicate, uncharged.
    let body =
        br#"{"id":"evt_10","object":"event","type":"charge.succeeded","data":{"object":{}}}"#;
    let (status, answer) = post(
        &server,
        &stripe,
        &[stripe_header(secret, body, now())],
        body,
    )
    .await;
    assert_eq!(status, 429, "the source's burst of 1 is spent: {answer}");
    let text = scrape(&server).await;
    assert_eq!(
        sample(
            &text,
            "herald_limits_hit_total{limit=\"ingest_per_source\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(
            &text,
            "herald_ingest_requests_total{outcome=\"rate_limited\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(&text, "herald_limits_hit_total{limit=\"publish_per_app\"}"),
        0.0
    );
    server.stop().await;
}

/// Each claim lane asks the store in a loop of its own, woken only for its own work: new
/// messages' first attempts do not send the retry lane to the store (on PostgreSQL a claim is
/// a transaction of several round trips, and the retry lane's empty claim at every turn of a
/// shared loop held up the first attempts). The retry lane still looks once at start and
/// after each idle poll, at most every 5 seconds with nothing due.
#[tokio::test]
async fn new_messages_wake_only_the_first_attempt_lane() {
    let server = TestServer::start().await;
    let mut receiver = Receiver::start().await;
    let app = server.create_app("lanes").await;
    server
        .create_endpoint(&app, json!({"url": receiver.url}))
        .await;
    let started = std::time::Instant::now();
    let before = scrape(&server).await;
    const MESSAGES: usize = 40;
    for n in 0..MESSAGES {
        server
            .send(
                &app,
                json!({"eventType": "order.paid", "payload": {"n": n}}),
            )
            .await;
        receiver.next().await;
    }
    let text = eventually("every attempt counted", || async {
        let text = scrape(&server).await;
        (sample(&text, "herald_delivery_attempts_total{outcome=\"success\"}") == MESSAGES as f64)
            .then_some(text)
    })
    .await;
    let claims = |text: &str, lane: &str| {
        sample(
            text,
            &format!("herald_delivery_claims_total{{lane=\"{lane}\"}}"),
        )
    };
    // The scrape before may have come just before the lane's look at start, and an idle poll
    // is due every 5 seconds.
    let idle_polls = (started.elapsed().as_secs_f64() / 5.0).ceil();
    let retry_claims = claims(&text, "retries") - claims(&before, "retries");
    assert!(
        retry_claims <= 1.0 + idle_polls,
        "{retry_claims} retry-lane claims for {MESSAGES} new messages in {:?}",
        started.elapsed()
    );
    assert!(
        claims(&text, "first_attempts") > claims(&before, "first_attempts"),
        "the first-attempt lane was woken: {text}"
    );
    server.stop().await;
}
