//! What the web console and the app portal stand on: the pages served from the binary, app
//! portal links (scoped to one app, expiring), live channels and presence members under an
//! app's token, and each ingest source's recent requests. The pages themselves are driven in
//! headless Chromium by `interop/console/console.mjs`.

use reqwest::{Method, StatusCode, redirect::Policy};
use serde_json::{Value, json};

use crate::{
    cluster_presence::join,
    harness::{TestServer, eventually},
    ingest::{now, post, source, stripe_header},
    pusher::{Client, pusher_app},
};

#[tokio::test]
async fn the_console_is_served_from_the_binary_on_this_origin_only() {
    let server = TestServer::start().await;
    let http = reqwest::Client::builder()
        .redirect(Policy::none())
        .build()
        .expect("client");
    let response = http
        .get(format!("{}/console", server.base))
        .send()
        .await
        .expect("get");
    assert_eq!(response.status(), StatusCode::PERMANENT_REDIRECT);
    assert_eq!(response.headers()["location"], "/console/");
    for (path, kind) in [
        ("/console/", "text/html"),
        ("/console/portal", "text/html"),
        ("/console/style.css", "text/css"),
    ] {
        let response = http
            .get(format!("{}{path}", server.base))
            .send()
            .await
            .expect("get");
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        let headers = response.headers();
        assert!(
            headers["content-type"]
                .to_str()
                .is_ok_and(|t| t.starts_with(kind)),
            "{path}: {:?}",
            headers["content-type"]
        );
        let csp = headers["content-security-policy"].to_str().expect("csp");
        assert!(csp.contains("default-src 'self'"), "{csp}");
        assert!(!csp.contains("unsafe-inline"), "{csp}");
    }
    for path in ["/console/absent.js", "/console/../Cargo.toml"] {
        let response = http
            .get(format!("{}{path}", server.base))
            .send()
            .await
            .expect("get");
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
    }
    server.stop().await;
}

/// A portal link opens one app for its holder and nothing else, and stops working when it
/// expires.
#[tokio::test]
async fn an_app_portal_link_reaches_its_app_alone_and_expires() {
    let server = TestServer::start().await;
    let shop = server.create_app("shop").await;
    let other = server.create_app("other").await;
    server
        .create_endpoint(&other, json!({"url": "https://example.com/hook"}))
        .await;
    let (status, link) = server
        .call(
            Method::POST,
            &format!("/api/v1/auth/app-portal-access/{shop}"),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, 200, "{link}");
    let token = link["token"].as_str().expect("token");
    let url = link["url"].as_str().expect("url");
    assert_eq!(
        url,
        format!("{}/console/portal#key={token}", server.base),
        "the link is this server's portal with the token in the fragment"
    );

    let as_portal = |method: Method, path: String, body: Option<Value>| {
        let server = &server;
        async move { server.call_as(Some(token), method, &path, body, None).await }
    };
    let (status, apps) = as_portal(Method::GET, "/api/v1/app".into(), None).await;
    assert_eq!(status, 200, "{apps}");
    let ids: Vec<&str> = apps["data"]
        .as_array()
        .expect("apps")
        .iter()
        .map(|a| a["id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids, [shop.as_str()], "the portal sees its own app only");
    // Not its Pusher secret (with it, a customer could sign channel auths and publish as the
    // app's backend), nor the app's own settings, sources, channels or live tail.
    let pusher = &apps["data"][0]["pusher"];
    assert!(pusher["key"].is_string(), "{pusher}");
    assert!(pusher.get("secret").is_none(), "{pusher}");
    let (status, app) = as_portal(Method::GET, format!("/api/v1/app/{shop}"), None).await;
    assert_eq!(status, 200, "{app}");
    assert!(app["pusher"].get("secret").is_none(), "{app}");
    let (_, app) = server
        .call(Method::GET, &format!("/api/v1/app/{shop}"), None)
        .await;
    assert!(
        app["pusher"]["secret"].is_string(),
        "the backend's token reads it: {app}"
    );
    for (method, path, body) in [
        (
            Method::PATCH,
            format!("/api/v1/app/{shop}"),
            json!({"name": "mine"}),
        ),
        (
            Method::POST,
            format!("/api/v1/app/{shop}/pusher/secret/rotate"),
            json!({"gracePeriodSeconds": 0}),
        ),
        (
            Method::POST,
            format!("/api/v1/app/{shop}/ingest/source"),
            json!({"name": "s", "kind": "github", "secrets": ["x"]}),
        ),
        (
            Method::GET,
            format!("/api/v1/app/{shop}/channel"),
            json!({}),
        ),
        (Method::GET, format!("/api/v1/app/{shop}/tail"), json!({})),
        (
            Method::POST,
            format!("/api/v1/app/{shop}/msg"),
            json!({"eventType": "order.shipped", "payload": {}, "channels": ["private-user-42"]}),
        ),
        // An eventId it chose would refuse (409) the backend's own message of that id.
        (
            Method::POST,
            format!("/api/v1/app/{shop}/msg"),
            json!({"eventType": "order.shipped", "payload": {}, "eventId": "order-1234-paid"}),
        ),
    ] {
        let (status, answer) = as_portal(method, path.clone(), Some(body)).await;
        assert_eq!(status, 403, "{path}: {answer}");
        assert!(
            answer["detail"].as_str().is_some_and(|d| {
                d.contains("endpoints and messages only")
                    || d.contains("endpoints only")
                    || d.contains("cannot give eventId")
            }),
            "{path}: {answer}"
        );
    }
    // A message to its endpoints, as the portal's "send an example" makes, is its to send.
    let (status, sent) = as_portal(
        Method::POST,
        format!("/api/v1/app/{shop}/msg"),
        Some(json!({"eventType": "order.shipped", "payload": {"example": true}})),
    )
    .await;
    assert_eq!(status, 201, "{sent}");
    let (status, _) = as_portal(
        Method::POST,
        format!("/api/v1/app/{shop}/endpoint"),
        Some(json!({"url": "https://example.com/shop"})),
    )
    .await;
    assert_eq!(status, 201, "the portal manages its app's endpoints");
    for path in [
        format!("/api/v1/app/{other}"),
        format!("/api/v1/app/{other}/endpoint"),
        format!("/api/v1/app/{other}/msg"),
    ] {
        let (status, body) = as_portal(Method::GET, path.clone(), None).await;
        assert_eq!(status, 404, "{path} is another app's: {body}");
    }
    for (method, path) in [
        (Method::POST, "/api/v1/app".to_owned()),
        (Method::GET, "/api/v1/auth/token".to_owned()),
        (
            Method::POST,
            format!("/api/v1/auth/app-portal-access/{shop}"),
        ),
    ] {
        let (status, body) = as_portal(method, path.clone(), Some(json!({}))).await;
        assert_eq!(status, 403, "{path} is the environment's: {body}");
    }

    // A link made to last one second stops opening anything.
    let (status, short) = server
        .call(
            Method::POST,
            &format!("/api/v1/auth/app-portal-access/{shop}"),
            Some(json!({"expiry": 1, "sessionId": "checkout-42"})),
        )
        .await;
    assert_eq!(status, 200, "{short}");
    let short = short["token"].as_str().expect("token").to_owned();
    let refused = eventually("the one-second link to expire", || {
        let (server, short) = (&server, &short);
        async move {
            let (status, body) = server
                .call_as(Some(short), Method::GET, "/api/v1/app", None, None)
                .await;
            (status == 401).then_some(body)
        }
    })
    .await;
    assert!(
        refused["detail"]
            .as_str()
            .is_some_and(|d| d.contains("expired")),
        "{refused}"
    );
    let (_, tokens) = server.call(Method::GET, "/api/v1/auth/token", None).await;
    assert!(
        tokens["data"]
            .as_array()
            .expect("tokens")
            .iter()
            .any(|t| t["name"] == "app portal (session checkout-42)"
                && t["appId"] == shop
                && t["portal"] == true),
        "portal tokens are listed (and revocable) with their session, as portal links' tokens: {tokens}"
    );
    server.stop().await;
}

#[tokio::test]
async fn app_portal_requests_are_checked_and_refused_in_words() {
    let server = TestServer::start().await;
    let shop = server.create_app("shop").await;
    let path = format!("/api/v1/auth/app-portal-access/{shop}");
    for (body, field) in [
        (json!({"expiry": 0}), "expiry"),
        (json!({"expiry": 8 * 24 * 3600}), "expiry"),
        (json!({"readOnly": true}), "readOnly"),
        (json!({"featureFlags": ["beta"]}), "featureFlags"),
        (json!({"expiry": 60, "color": "red"}), "color"),
    ] {
        let (status, answer) = server.call(Method::POST, &path, Some(body.clone())).await;
        assert_eq!(status, 422, "{body}: {answer}");
        assert!(answer.to_string().contains(field), "{body}: {answer}");
    }
    let (status, answer) = server
        .call(
            Method::POST,
            "/api/v1/auth/app-portal-access/app_2AbsentApp",
            Some(json!({})),
        )
        .await;
    assert_eq!(status, 404, "{answer}");
    server.stop().await;
}

/// The console's live channel view: occupied channels with their counts and a presence
/// channel's members, read with the app's token.
#[tokio::test]
async fn live_channels_and_presence_members_are_listed_for_the_apps_token() {
    let server = TestServer::start().await;
    let (app, creds) = pusher_app(&server, "live").await;
    let mut alice = Client::connect(&server, &creds.key).await;
    join(&mut alice, &creds, "presence-room", "alice").await;
    let mut bob = Client::connect(&server, &creds.key).await;
    join(&mut bob, &creds, "presence-room", "bob").await;
    bob.send(json!({"event": "pusher:subscribe", "data": {"channel": "news"}}))
        .await;
    bob.expect("pusher_internal:subscription_succeeded").await;

    let (status, channels) = server
        .call(Method::GET, &format!("/api/v1/app/{app}/channel"), None)
        .await;
    assert_eq!(status, 200, "{channels}");
    assert_eq!(
        channels["data"],
        json!([
            {"name": "news", "subscriptionCount": 1},
            {"name": "presence-room", "subscriptionCount": 2, "userCount": 2},
        ])
    );
    let (_, presence) = server
        .call(
            Method::GET,
            &format!("/api/v1/app/{app}/channel?prefix=presence-"),
            None,
        )
        .await;
    assert_eq!(presence["data"].as_array().map(Vec::len), Some(1));
    // Paged as every list is: by name, an iterator forward and a prevIterator back.
    let listed = |query: &'static str| {
        let (server, app) = (&server, &app);
        async move {
            let (status, page) = server
                .call(
                    Method::GET,
                    &format!("/api/v1/app/{app}/channel?{query}"),
                    None,
                )
                .await;
            assert_eq!(status, 200, "{query}: {page}");
            let names: Vec<&str> = page["data"]
                .as_array()
                .expect("data")
                .iter()
                .filter_map(|c| c["name"].as_str())
                .collect();
            (
                names.join(","),
                page["done"].clone(),
                page["iterator"].clone(),
            )
        }
    };
    assert_eq!(
        listed("limit=1").await,
        ("news".into(), json!(false), json!(".news"))
    );
    assert_eq!(
        listed("limit=1&iterator=.news").await,
        ("presence-room".into(), json!(true), json!(".presence-room"))
    );
    assert_eq!(listed("limit=1&iterator=-.presence-room").await.0, "news");
    for query in ["limit=251", "iterator=news"] {
        let (status, refused) = server
            .call(
                Method::GET,
                &format!("/api/v1/app/{app}/channel?{query}"),
                None,
            )
            .await;
        assert_eq!(status, 422, "{query}: {refused}");
    }
    let (status, members) = server
        .call(
            Method::GET,
            &format!("/api/v1/app/{app}/channel/presence-room/member"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{members}");
    assert_eq!(
        members["data"],
        json!([{"id": "alice", "info": null}, {"id": "bob", "info": null}])
    );
    let (_, first) = server
        .call(
            Method::GET,
            &format!("/api/v1/app/{app}/channel/presence-room/member?limit=1"),
            None,
        )
        .await;
    assert_eq!(
        (&first["data"], &first["done"]),
        (&json!([{"id": "alice", "info": null}]), &json!(false))
    );
    let (_, second) = server
        .call(
            Method::GET,
            &format!("/api/v1/app/{app}/channel/presence-room/member?limit=1&iterator=.alice"),
            None,
        )
        .await;
    assert_eq!(
        (&second["data"], &second["done"]),
        (&json!([{"id": "bob", "info": null}]), &json!(true))
    );
    let (status, refused) = server
        .call(
            Method::GET,
            &format!("/api/v1/app/{app}/channel/news/member"),
            None,
        )
        .await;
    assert_eq!(status, 422, "{refused}");
    assert!(refused.to_string().contains("presence"), "{refused}");

    drop(bob);
    eventually("bob's departure to show", || {
        let (server, app) = (&server, &app);
        async move {
            let (_, members) = server
                .call(
                    Method::GET,
                    &format!("/api/v1/app/{app}/channel/presence-room/member"),
                    None,
                )
                .await;
            (members["data"] == json!([{"id": "alice", "info": null}])).then_some(())
        }
    })
    .await;
    server.stop().await;
}

/// Why a provider's deliveries fail is visible without logs: each request to a source, its
/// answer and the reason, newest first; made-up source ids are not kept.
#[tokio::test]
async fn each_ingest_sources_recent_requests_say_what_came_of_them() {
    let server = TestServer::start().await;
    let app = server.create_app("shop").await;
    let secret = "whsec_console_test";
    let stripe = source(
        &server,
        &app,
        json!({"kind": "stripe", "secrets": [secret]}),
    )
    .await;
    let id = stripe["id"].as_str().expect("id");
    let body = br#"{"id":"evt_console","type":"payment_intent.succeeded"}"#;
    let (status, _) = post(
        &server,
        &stripe,
        &[stripe_header("whsec_wrong", body, now())],
        body,
    )
    .await;
    assert_eq!(status, 401);
    let (status, accepted) = post(
        &server,
        &stripe,
        &[stripe_header(secret, body, now())],
        body,
    )
    .await;
    assert_eq!(status, 200, "{accepted}");
    let (status, _) = post(
        &server,
        &stripe,
        &[stripe_header(secret, body, now())],
        body,
    )
    .await;
    assert_eq!(status, 200);
    let path = format!("/api/v1/app/{app}/ingest/source/{id}/request");
    let (status, log) = server.call(Method::GET, &path, None).await;
    assert_eq!(status, 200, "{log}");
    let rows = log["data"].as_array().expect("rows");
    let outcomes: Vec<(&str, u64)> = rows
        .iter()
        .map(|r| {
            (
                r["outcome"].as_str().expect("outcome"),
                r["status"].as_u64().expect("status"),
            )
        })
        .collect();
    assert_eq!(
        outcomes,
        [
            ("duplicate", 200),
            ("accepted", 200),
            ("invalid_signature", 401)
        ]
    );
    let msg = accepted["msgId"].as_str().expect("msgId");
    assert!(
        rows[1]["detail"].as_str().is_some_and(|d| d.contains(msg)),
        "{log}"
    );
    assert!(
        rows[2]["detail"]
            .as_str()
            .is_some_and(|d| d.to_lowercase().contains("signature")),
        "the refusal says why: {log}"
    );
    assert!(rows[0]["receivedAt"].is_string(), "{log}");

    // Another app's token cannot read it.
    let other = server.create_app("other").await;
    let (_, token) = server
        .call(
            Method::POST,
            "/api/v1/auth/token",
            Some(json!({"name": "other", "appId": other})),
        )
        .await;
    let (status, _) = server
        .call_as(token["token"].as_str(), Method::GET, &path, None, None)
        .await;
    assert_eq!(status, 404);
    server.stop().await;
}
