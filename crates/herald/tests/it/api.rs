//! The management API: authentication, Svix shapes, validation errors, idempotency, paging.

use reqwest::Method;
use serde_json::json;

use crate::harness::{ADMIN_TOKEN, TestServer};

#[tokio::test]
async fn every_api_route_requires_a_valid_token() {
    let server = TestServer::start().await;
    for (token, detail) in [
        (None, "missing Authorization header"),
        (Some("wrong-token"), "invalid API token"),
    ] {
        let (status, body) = server
            .call_as(token, Method::GET, "/api/v1/app", None, None)
            .await;
        assert_eq!(status, 401);
        assert_eq!(body["code"], "authentication_failed");
        assert!(
            body["detail"].as_str().unwrap_or("").contains(detail),
            "{body}"
        );
    }
    let (status, _) = server
        .call_as(Some(ADMIN_TOKEN), Method::GET, "/api/v1/app", None, None)
        .await;
    assert_eq!(status, 200);
    server.stop().await;
}

#[tokio::test]
async fn dev_mode_creates_demo_app_and_token_once() {
    let dir = tempfile::tempdir().expect("dir");
    for _ in 0..2 {
        let data = dir.path().to_owned();
        let server = TestServer::start_with(move |c| {
            c.dev = true;
            c.admin_token = None;
            c.data_dir = data;
        })
        .await;
        let (status, apps) = server
            .call_as(Some("demo-token"), Method::GET, "/api/v1/app", None, None)
            .await;
        assert_eq!(status, 200, "{apps}");
        let data = apps["data"].as_array().expect("list");
        assert_eq!(data.len(), 1, "demo app created exactly once: {apps}");
        assert_eq!(data[0]["uid"], "demo");
        assert_eq!(
            data[0]["pusher"],
            json!({"appId": "1", "key": "demo-key", "secret": "demo-secret"})
        );
        server.stop().await;
    }
}

#[tokio::test]
async fn bad_input_gets_svix_status_codes_and_a_clear_message() {
    let server = TestServer::start().await;
    let app = server.create_app("shop").await;

    let (status, body) = server
        .raw_post(&format!("/api/v1/app/{app}/msg"), "{\"eventType\": ")
        .await;
    assert_eq!(status, 400);
    assert_eq!(body["code"], "invalid_json");

    let (status, body) = server
        .raw_post(&format!("/api/v1/app/{app}/msg"), r#"{"payload": {}}"#)
        .await;
    assert_eq!(status, 422);
    assert!(
        body["detail"][0]["msg"]
            .as_str()
            .unwrap_or("")
            .contains("eventType"),
        "{body}"
    );

    let (status, body) = server
        .call(
            Method::POST,
            &format!("/api/v1/app/{app}/msg"),
            Some(json!({"eventType": "bad type!", "payload": [1]})),
        )
        .await;
    assert_eq!(status, 422);
    let locs: Vec<String> = body["detail"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| i["loc"][1].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(locs, ["eventType", "payload"], "{body}");

    let (status, body) = server
        .call(
            Method::POST,
            &format!("/api/v1/app/{app}/endpoint"),
            Some(json!({"url": "ftp://example.com", "secret": "nope"})),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["detail"].as_array().map(Vec::len), Some(2), "{body}");

    let (status, body) = server
        .call(Method::GET, "/api/v1/app/missing-app", None)
        .await;
    assert_eq!(status, 404);
    assert_eq!(body["code"], "not_found");

    let (status, body) = server
        .call(
            Method::POST,
            "/api/v1/app",
            Some(json!({"name": "again", "uid": "shop"})),
        )
        .await;
    assert_eq!(status, 409, "{body}");
    server.stop().await;
}

#[tokio::test]
async fn oversized_bodies_are_refused_with_413() {
    let server = TestServer::start_with(|c| c.api.max_body_bytes = 1024).await;
    let app = server.create_app("big").await;
    let (status, body) = server
        .call(
            Method::POST,
            &format!("/api/v1/app/{app}/msg"),
            Some(json!({"eventType": "x", "payload": {"blob": "a".repeat(4096)}})),
        )
        .await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["code"], "payload_too_large");
    server.stop().await;
}

#[tokio::test]
async fn get_or_create_upsert_patch_and_delete_applications() {
    let server = TestServer::start().await;
    let body = json!({"name": "Acme", "uid": "acme"});
    let (s1, a1) = server
        .call(
            Method::POST,
            "/api/v1/app?get_if_exists=true",
            Some(body.clone()),
        )
        .await;
    let (s2, a2) = server
        .call(Method::POST, "/api/v1/app?get_if_exists=true", Some(body))
        .await;
    assert_eq!((s1, s2), (201, 200));
    assert_eq!(a1["id"], a2["id"]);
    let pusher_id = a1["pusher"]["appId"].as_str().expect("pusher app id");
    assert!(
        pusher_id.len() == 7 && pusher_id.parse::<u32>().is_ok(),
        "{pusher_id}"
    );
    assert_eq!(a1["pusher"]["key"].as_str().map(str::len), Some(20));

    let (status, patched) = server
        .call(
            Method::PATCH,
            "/api/v1/app/acme",
            Some(json!({"name": "Acme Inc", "metadata": {"tier": "gold"}})),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(patched["name"], "Acme Inc");
    assert_eq!(patched["metadata"]["tier"], "gold");
    assert_eq!(patched["uid"], "acme");

    let (status, created) = server
        .call(
            Method::PUT,
            "/api/v1/app/new-one",
            Some(json!({"name": "New"})),
        )
        .await;
    assert_eq!(status, 201);
    assert_eq!(created["uid"], "new-one");

    let (status, _) = server.call(Method::DELETE, "/api/v1/app/acme", None).await;
    assert_eq!(status, 204);
    let (status, _) = server.call(Method::GET, "/api/v1/app/acme", None).await;
    assert_eq!(status, 404);
    server.stop().await;
}

#[tokio::test]
async fn lists_page_with_iterator_and_done() {
    let server = TestServer::start().await;
    for i in 0..5 {
        server.create_app(&format!("app-{i}")).await;
    }
    let mut seen = Vec::new();
    let mut iterator: Option<String> = None;
    loop {
        let path = match &iterator {
            Some(it) => format!("/api/v1/app?limit=2&iterator={it}"),
            None => "/api/v1/app?limit=2".to_owned(),
        };
        let (status, page) = server.call(Method::GET, &path, None).await;
        assert_eq!(status, 200);
        for app in page["data"].as_array().expect("data") {
            seen.push((
                app["id"].as_str().expect("id").to_owned(),
                app["uid"].as_str().expect("uid").to_owned(),
            ));
        }
        if page["done"] == true {
            break;
        }
        iterator = page["iterator"].as_str().map(str::to_owned);
    }
    // Ids are time-sortable but apps made within one clock tick may sort either way; what
    // paging promises is every item exactly once, in id order.
    assert!(seen.windows(2).all(|w| w[0].0 < w[1].0), "{seen:?}");

    // prevIterator walks back to the page before, in the listing's usual order.
    let (_, second) = server
        .call(
            Method::GET,
            &format!("/api/v1/app?limit=2&iterator={}", seen[1].0),
            None,
        )
        .await;
    let prev = second["prevIterator"]
        .as_str()
        .expect("prevIterator")
        .to_owned();
    assert_eq!(prev, format!("-{}", seen[2].0));
    let (_, first) = server
        .call(
            Method::GET,
            &format!("/api/v1/app?limit=2&iterator={prev}"),
            None,
        )
        .await;
    let ids: Vec<&str> = first["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|a| a["id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids, [seen[0].0.as_str(), seen[1].0.as_str()]);
    let mut uids: Vec<String> = seen.into_iter().map(|(_, uid)| uid).collect();
    uids.sort();
    assert_eq!(uids, ["app-0", "app-1", "app-2", "app-3", "app-4"]);
    server.stop().await;
}

#[tokio::test]
async fn event_types_crud_and_archive() {
    let server = TestServer::start().await;
    let (status, et) = server
        .call(
            Method::POST,
            "/api/v1/event-type",
            Some(json!({"name": "invoice.paid", "description": "An invoice was paid", "schemas": {"1": {"type": "object"}}})),
        )
        .await;
    assert_eq!(status, 201, "{et}");
    assert_eq!(et["schemas"]["1"]["type"], "object");
    let (status, _) = server
        .call(
            Method::POST,
            "/api/v1/event-type",
            Some(json!({"name": "invoice.paid", "description": "dup"})),
        )
        .await;
    assert_eq!(status, 409);
    let (status, _) = server
        .call(Method::DELETE, "/api/v1/event-type/invoice.paid", None)
        .await;
    assert_eq!(status, 204);
    let (_, list) = server.call(Method::GET, "/api/v1/event-type", None).await;
    assert_eq!(list["data"].as_array().map(Vec::len), Some(0));
    let (_, list) = server
        .call(
            Method::GET,
            "/api/v1/event-type?include_archived=true",
            None,
        )
        .await;
    assert_eq!(list["data"][0]["archived"], true);
    server.stop().await;
}

#[tokio::test]
async fn idempotency_key_replays_and_event_id_conflicts() {
    let server = TestServer::start().await;
    let app = server.create_app("idem").await;
    let path = format!("/api/v1/app/{app}/msg");
    let body = json!({"eventType": "order.created", "payload": {"n": 1}});
    let (s1, m1) = server
        .call_as(
            Some(ADMIN_TOKEN),
            Method::POST,
            &path,
            Some(body.clone()),
            Some("key-1"),
        )
        .await;
    let (s2, m2) = server
        .call_as(
            Some(ADMIN_TOKEN),
            Method::POST,
            &path,
            Some(body),
            Some("key-1"),
        )
        .await;
    assert_eq!((s1, s2), (201, 201));
    assert_eq!(m1, m2, "the same key replays the same response");

    let with_event_id = json!({"eventType": "order.created", "eventId": "evt-42", "payload": {}});
    let (s3, _) = server
        .call(Method::POST, &path, Some(with_event_id.clone()))
        .await;
    let (s4, conflict) = server.call(Method::POST, &path, Some(with_event_id)).await;
    assert_eq!((s3, s4), (201, 409));
    assert_eq!(conflict["code"], "conflict");

    let (_, list) = server.call(Method::GET, &path, None).await;
    assert_eq!(list["data"].as_array().map(Vec::len), Some(2), "{list}");
    let (status, by_event_id) = server
        .call(Method::GET, &format!("{path}/evt-42"), None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(by_event_id["eventId"], "evt-42");
    server.stop().await;
}

#[tokio::test]
async fn endpoint_headers_put_replaces_patch_merges_reserved_refused() {
    let server = TestServer::start().await;
    let app = server.create_app("headers").await;
    let ep = server
        .create_endpoint(
            &app,
            json!({"url": "https://example.com/hook", "headers": {"X-A": "1"}}),
        )
        .await;
    let path = format!(
        "/api/v1/app/{app}/endpoint/{}/headers",
        ep["id"].as_str().expect("id")
    );

    let (status, _) = server
        .call(
            Method::PUT,
            &path,
            Some(json!({"headers": {"X-B": "2", "X-C": "3"}})),
        )
        .await;
    assert_eq!(status, 204);
    let (_, got) = server.call(Method::GET, &path, None).await;
    assert_eq!(got["headers"], json!({"X-B": "2", "X-C": "3"}));

    let (status, _) = server
        .call(
            Method::PATCH,
            &path,
            Some(json!({"headers": {"X-D": "4"}, "deleteHeaders": ["X-B"]})),
        )
        .await;
    assert_eq!(status, 204);
    let (_, got) = server.call(Method::GET, &path, None).await;
    assert_eq!(got["headers"], json!({"X-C": "3", "X-D": "4"}));

    let (status, body) = server
        .call(
            Method::PATCH,
            &path,
            Some(json!({"headers": {"webhook-signature": "forged"}})),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["detail"][0]["msg"]
            .as_str()
            .unwrap_or("")
            .contains("set by Herald")
    );
    server.stop().await;
}

/// The review's attack: 200 anonymous POSTs with 8 KB `Idempotency-Key`s and made-up tokens
/// wrote 160 MB of stored 401s. Now the token is checked first, so nothing is stored for
/// them; keys over 255 bytes are refused; an authenticated caller's answer is still kept.
#[tokio::test]
async fn anonymous_requests_store_no_idempotency_records_and_long_keys_are_refused() {
    let server = TestServer::start().await;
    let app = server.create_app("idem-auth").await;
    let path = format!("/api/v1/app/{app}/msg");
    let body = json!({"eventType": "order.created", "payload": {}});
    let long_key = "k".repeat(8_000);
    for n in 0..200 {
        let key = format!("{n}-{}", &long_key[..200]);
        let (status, refused) = server
            .call_as(
                Some(&format!("made-up-token-{n}")),
                Method::POST,
                &path,
                Some(body.clone()),
                Some(&key),
            )
            .await;
        assert_eq!(status, 401, "{refused}");
    }
    let (status, refused) = server
        .call_as(None, Method::POST, &path, Some(body.clone()), Some("anon"))
        .await;
    assert_eq!(status, 401, "{refused}");
    assert_eq!(
        server
            .store_scalar("SELECT COUNT(*) FROM idempotency")
            .await,
        0,
        "answers to unauthenticated callers are not kept"
    );

    let (status, refused) = server
        .call_as(
            Some(ADMIN_TOKEN),
            Method::POST,
            &path,
            Some(body.clone()),
            Some(&"k".repeat(256)),
        )
        .await;
    assert_eq!(status, 400, "{refused}");
    assert_eq!(refused["code"], "invalid_idempotency_key");
    assert!(
        refused["detail"]
            .as_str()
            .expect("detail")
            .contains("at most 255"),
        "{refused}"
    );

    let key = "k".repeat(255);
    let (s1, first) = server
        .call_as(
            Some(ADMIN_TOKEN),
            Method::POST,
            &path,
            Some(body.clone()),
            Some(&key),
        )
        .await;
    let (s2, replayed) = server
        .call_as(
            Some(ADMIN_TOKEN),
            Method::POST,
            &path,
            Some(body),
            Some(&key),
        )
        .await;
    assert_eq!((s1, s2), (201, 201));
    assert_eq!(first, replayed);
    assert_eq!(
        server
            .store_scalar("SELECT COUNT(*) FROM idempotency")
            .await,
        1
    );
    server.stop().await;
}

/// The review's attack: `PATCH` app A's uid to app B's id, after which the operator's
/// `POST /api/v1/app/{B.id}/msg` was stored in and delivered to A. Uids that look like any
/// Herald id are now refused everywhere one can be chosen, and B's id still names B.
#[tokio::test]
async fn uids_that_look_like_ids_are_refused_so_an_id_always_names_its_own_resource() {
    let server = TestServer::start().await;
    let a = server.create_app("tenant-a").await;
    let b = server.create_app("tenant-b").await;

    let (status, refused) = server
        .call(
            Method::PATCH,
            &format!("/api/v1/app/{a}"),
            Some(json!({"uid": b})),
        )
        .await;
    assert_eq!(status, 422, "{refused}");
    assert!(refused.to_string().contains("id prefix"), "{refused}");
    let (status, _) = server
        .call(
            Method::POST,
            "/api/v1/app",
            Some(json!({"name": "x", "uid": "app_lookalike"})),
        )
        .await;
    assert_eq!(status, 422);
    let (status, _) = server
        .call(
            Method::POST,
            &format!("/api/v1/app/{a}/endpoint"),
            Some(json!({"url": "https://example.com/h", "uid": "ep_lookalike"})),
        )
        .await;
    assert_eq!(status, 422);
    let (status, _) = server
        .call(
            Method::POST,
            &format!("/api/v1/app/{a}/ingest/source"),
            Some(json!({"kind": "github", "secrets": ["s"], "uid": "src_lookalike"})),
        )
        .await;
    assert_eq!(status, 422);
    let (status, _) = server
        .call(
            Method::POST,
            &format!("/api/v1/app/{a}/msg"),
            Some(json!({"eventType": "t", "eventId": "msg_lookalike", "payload": {}})),
        )
        .await;
    assert_eq!(status, 422);

    let sent = server
        .send(&b, json!({"eventType": "t", "payload": {}}))
        .await;
    let (status, found) = server
        .call(
            Method::GET,
            &format!(
                "/api/v1/app/tenant-b/msg/{}",
                sent["id"].as_str().expect("id")
            ),
            None,
        )
        .await;
    assert_eq!(status, 200, "B's message is in B: {found}");
    let (_, in_a) = server
        .call(Method::GET, &format!("/api/v1/app/{a}/msg"), None)
        .await;
    assert_eq!(in_a["data"], json!([]), "nothing reached A");
    server.stop().await;
}

/// The review's finding: answers over 64 KiB were not kept, and a message create echoes its
/// payload, so the Svix SDK's retry of a 100 KB message with the same key created it twice.
#[tokio::test]
async fn an_idempotent_retry_of_a_large_message_replays_instead_of_creating_again() {
    let server = TestServer::start().await;
    let app = server.create_app("idem-large").await;
    let path = format!("/api/v1/app/{app}/msg");
    let body = json!({"eventType": "t", "payload": {"blob": "x".repeat(100_000)}});
    let mut ids = Vec::new();
    for _ in 0..2 {
        let (status, message) = server
            .call_as(
                Some(ADMIN_TOKEN),
                Method::POST,
                &path,
                Some(body.clone()),
                Some("large-key"),
            )
            .await;
        assert_eq!(status, 201);
        ids.push(message["id"].clone());
    }
    assert_eq!(ids[0], ids[1], "the retry replays the first answer");
    let (_, list) = server.call(Method::GET, &path, None).await;
    assert_eq!(
        list["data"].as_array().map(Vec::len),
        Some(1),
        "created once"
    );
    server.stop().await;
}
