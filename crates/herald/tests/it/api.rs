//! The management API: authentication, Svix shapes, validation errors, idempotency, paging.

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{ADMIN_TOKEN, Receiver, Reply, TestServer, eventually};

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

/// `--dev`'s credentials are public: a page elsewhere must not reach the server by rebinding
/// its name to 127.0.0.1 (its Host) or by a cross-site request (its Origin); loopback pages
/// and clients are served as before.
#[tokio::test]
async fn dev_mode_serves_loopback_hosts_and_origins_only() {
    let server = TestServer::start_with(|c| {
        c.dev = true;
        c.admin_token = None;
    })
    .await;
    let get = |host: Option<&'static str>, origin: Option<&'static str>| {
        let server = &server;
        async move {
            let mut request = crate::harness::http_client()
                .get(format!("{}/api/v1/app", server.base))
                .bearer_auth("demo-token");
            if let Some(host) = host {
                request = request.header("host", host);
            }
            if let Some(origin) = origin {
                request = request.header("origin", origin);
            }
            let response = request.send().await.expect("request");
            let status = response.status().as_u16();
            (status, response.text().await.expect("body"))
        }
    };
    assert_eq!(get(None, None).await.0, 200);
    assert_eq!(
        get(Some("localhost:6001"), Some("http://localhost:5173"))
            .await
            .0,
        200
    );
    let (status, body) = get(Some("rebound.example:6001"), None).await;
    assert_eq!(status, 403, "{body}");
    let body: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(body["code"], "not_loopback");
    assert!(
        body["detail"]
            .as_str()
            .is_some_and(|d| d.contains("Host \"rebound.example:6001\"")),
        "{body}"
    );
    let (status, body) = get(None, Some("https://elsewhere.example")).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("--dev-allow-remote"), "{body}");
    server.stop().await;
}

/// Lists take Svix's `order` where Svix's SDKs send it, and refuse a value that is neither
/// order or a `limit` over 250 with a 422 naming the parameter, as Svix's server does, rather
/// than reading them as the default or cutting them to the cap.
#[tokio::test]
async fn list_order_and_limit_are_read_as_svix_reads_them() {
    let server = TestServer::start().await;
    let mut made = Vec::new();
    for uid in ["order-a", "order-b", "order-c"] {
        made.push(server.create_app(uid).await);
    }
    let ids = |page: &Value| -> Vec<String> {
        page["data"]
            .as_array()
            .expect("data")
            .iter()
            .map(|a| a["id"].as_str().expect("id").to_owned())
            .collect()
    };
    let ascending = ids(&get_ok(&server, "/api/v1/app").await);
    assert_eq!(ascending, made);
    let mut descending = ids(&get_ok(&server, "/api/v1/app?order=descending").await);
    descending.reverse();
    assert_eq!(descending, made, "newest first");
    let app = &made[0];
    // Endpoints, as in Svix's server, list newest first unless asked otherwise, and their
    // iterator walks on in the order asked.
    let mut endpoints = Vec::new();
    for n in 0..3 {
        let made = server
            .create_endpoint(app, json!({"url": format!("https://example.com/{n}")}))
            .await;
        endpoints.push(made["id"].as_str().expect("id").to_owned());
    }
    let listed = format!("/api/v1/app/{app}/endpoint");
    let first = get_ok(&server, &format!("{listed}?limit=2")).await;
    let second = get_ok(
        &server,
        &format!(
            "{listed}?limit=2&iterator={}",
            first["iterator"].as_str().expect("iterator")
        ),
    )
    .await;
    let mut newest_first = ids(&first);
    newest_first.extend(ids(&second));
    assert_eq!(second["done"], true, "{second}");
    newest_first.reverse();
    assert_eq!(newest_first, endpoints, "endpoints newest first by default");
    let oldest_first = ids(&get_ok(&server, &format!("{listed}?order=ascending")).await);
    assert_eq!(oldest_first, endpoints);
    for path in [
        "/api/v1/app?order=desc".to_owned(),
        format!("/api/v1/app/{app}/endpoint?order=newest"),
        "/api/v1/app?limit=251".to_owned(),
        format!("/api/v1/app/{app}/msg?limit=1000"),
    ] {
        let (status, body) = server.call(Method::GET, &path, None).await;
        assert_eq!(status, 422, "{path}: {body}");
        let param = if path.contains("order") {
            "order"
        } else {
            "limit"
        };
        assert_eq!(
            body["detail"][0]["loc"],
            json!(["query", param]),
            "{path}: {body}"
        );
    }
    let (status, body) = server
        .call(Method::GET, "/api/v1/app?limit=250", None)
        .await;
    assert_eq!(status, 200, "{body}");
    server.stop().await;
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

    // Credentials in a URL would be shown back to every reader of the endpoint and logged
    // with its attempts: refused on create and on patch, pointing at `headers`.
    let (status, body) = server
        .call(
            Method::POST,
            &format!("/api/v1/app/{app}/endpoint"),
            Some(json!({"url": "https://user:s3cret@example.com/hook"})),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["detail"][0]["loc"], json!(["body", "url"]), "{body}");
    assert!(
        body["detail"][0]["msg"]
            .as_str()
            .is_some_and(|m| m.contains("headers")),
        "{body}"
    );
    let made = server
        .create_endpoint(&app, json!({"url": "https://example.com/hook"}))
        .await;
    let (status, body) = server
        .call(
            Method::PATCH,
            &format!(
                "/api/v1/app/{app}/endpoint/{}",
                made["id"].as_str().expect("id")
            ),
            Some(json!({"url": "https://token@example.com/hook"})),
        )
        .await;
    assert_eq!(status, 422, "{body}");

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
    // The routes whose body is optional answer in the same shape, not axum's plain text.
    let (status, endpoint) = server
        .call(
            Method::POST,
            &format!("/api/v1/app/{app}/endpoint"),
            Some(json!({"url": "https://example.com/hook"})),
        )
        .await;
    assert_eq!(status, 201, "{endpoint}");
    let endpoint = endpoint["id"].as_str().expect("id");
    let oversized = json!({"gracePeriodSeconds": 0, "padding": "a".repeat(4096)});
    for path in [
        format!("/api/v1/app/{app}/pusher/secret/rotate"),
        format!("/api/v1/app/{app}/endpoint/{endpoint}/secret/rotate"),
        format!("/api/v1/auth/app-portal-access/{app}"),
    ] {
        let (status, body) = server
            .call(Method::POST, &path, Some(oversized.clone()))
            .await;
        assert_eq!(status, 413, "{path}: {body}");
        assert_eq!(body["code"], "payload_too_large", "{path}: {body}");
    }
    server.stop().await;
}

/// A burst of first messages to an app that does not exist yet, each with its `application`:
/// one makes the app, and every message is accepted into it (Svix's SDKs retry no 409).
#[tokio::test]
async fn concurrent_first_messages_to_a_new_app_all_go_to_the_one_app_made() {
    let server = TestServer::start().await;
    let send = |n: u32| {
        server.call(
            Method::POST,
            "/api/v1/app/tenant-x/msg",
            Some(json!({"eventType": "a.b", "payload": {"n": n}, "application": {"name": "T"}})),
        )
    };
    let answers = futures_util::future::join_all((0..5).map(send)).await;
    for (status, body) in &answers {
        assert_eq!(*status, 201, "{body}");
    }
    let (status, apps) = server.call(Method::GET, "/api/v1/app", None).await;
    assert_eq!(status, 200, "{apps}");
    let made: Vec<&Value> = apps["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter(|app| app["uid"] == "tenant-x")
        .collect();
    assert_eq!(made.len(), 1, "{apps}");
    let (status, messages) = server
        .call(Method::GET, "/api/v1/app/tenant-x/msg", None)
        .await;
    assert_eq!(status, 200, "{messages}");
    assert_eq!(
        messages["data"].as_array().map(Vec::len),
        Some(5),
        "{messages}"
    );
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
    // A uid that is not one is refused before the lookup: it would find the app with that id.
    let (status, body) = server
        .call(
            Method::POST,
            "/api/v1/app?get_if_exists=true",
            Some(json!({"name": "B", "uid": a1["id"]})),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["detail"][0]["loc"], json!(["body", "uid"]), "{body}");
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
    let (status, dup) = server
        .call(
            Method::POST,
            "/api/v1/event-type",
            Some(json!({"name": "invoice.paid", "description": "dup"})),
        )
        .await;
    assert_eq!(status, 409);
    assert_eq!(dup["code"], "event_type_exists", "{dup}");
    let (status, refused) = server
        .call(
            Method::DELETE,
            "/api/v1/event-type/invoice.paid?expunge=true",
            None,
        )
        .await;
    assert_eq!(
        status, 422,
        "expunge is refused, not read as archive: {refused}"
    );
    let (status, _) = server
        .call(Method::DELETE, "/api/v1/event-type/invoice.paid", None)
        .await;
    assert_eq!(status, 204);
    let (_, list) = server.call(Method::GET, "/api/v1/event-type", None).await;
    assert_eq!(list["data"].as_array().map(Vec::len), Some(0));
    // The list shows each type's schemas unless `with_content=false` (then null, as Svix's).
    for (query, schemas) in [
        ("include_archived=true", json!({"1": {"type": "object"}})),
        (
            "include_archived=true&with_content=true",
            json!({"1": {"type": "object"}}),
        ),
        ("include_archived=true&with_content=false", Value::Null),
    ] {
        let list = get_ok(&server, &format!("/api/v1/event-type?{query}")).await;
        let item = &list["data"][0];
        assert_eq!(item["name"], "invoice.paid", "{query}: {list}");
        assert_eq!(
            item.get("schemas"),
            Some(&schemas),
            "{query}: shown as asked: {list}"
        );
    }
    let (_, list) = server
        .call(
            Method::GET,
            "/api/v1/event-type?include_archived=true",
            None,
        )
        .await;
    assert_eq!(list["data"][0]["archived"], true);
    // Created again once archived, as Svix's server does: back in the catalogue, new fields.
    let (status, back) = server
        .call(
            Method::POST,
            "/api/v1/event-type",
            Some(json!({"name": "invoice.paid", "description": "paid again"})),
        )
        .await;
    assert_eq!(status, 201, "{back}");
    assert_eq!(back["archived"], false, "{back}");
    assert_eq!(back["description"], "paid again", "{back}");
    assert_eq!(back["createdAt"], et["createdAt"], "the same event type");
    let (_, list) = server.call(Method::GET, "/api/v1/event-type", None).await;
    assert_eq!(list["data"].as_array().map(Vec::len), Some(1), "{list}");
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

/// NUL cannot be stored as text (PostgreSQL refuses it), so it is refused at the edge on both
/// stores: in a URL (`%00`) with 400 before any lookup, in a JSON string (`\u0000`) with 422.
/// Before, each was a 500 on PostgreSQL, and an ingest path with one was logged against a
/// made-up source.
#[tokio::test]
async fn nul_in_a_url_or_a_json_string_is_refused_at_the_edge() {
    let server = TestServer::start().await;
    let app = server.create_app("nul").await;
    for path in [
        "/api/v1/app/%00".to_owned(),
        format!("/api/v1/app/{app}/msg?iterator=%00"),
        format!("/api/v1/app/{app}/msg?event_types=a%00b"),
    ] {
        let (status, body) = server.call(Method::GET, &path, None).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["code"], "invalid_url", "{body}");
    }
    // A path that does not decode to UTF-8 gets the same shape, not axum's plain text.
    for path in ["/api/v1/app/%FF", "/ingest/%C3%28"] {
        let response = crate::harness::http_client()
            .get(format!("{}{path}", server.base))
            .bearer_auth(crate::harness::ADMIN_TOKEN)
            .send()
            .await
            .expect("get");
        assert_eq!(response.status().as_u16(), 400, "{path}");
        let body: Value = response.json().await.expect("a JSON body");
        assert_eq!(body["code"], "invalid_url", "{path}: {body}");
    }
    // A `%` that escapes nothing, and escaped UTF-8, are paths like any other.
    let (status, body) = server
        .call(Method::GET, "/api/v1/app/100%25-%C3%A9", None)
        .await;
    assert_eq!(status, 404, "{body}");
    let ingest = crate::harness::http_client()
        .post(format!(
            "{}/ingest/src_%00aaaaaaaaaaaaaaaaaaaaaaaaaa",
            server.base
        ))
        .body("{}")
        .send()
        .await
        .expect("post");
    assert_eq!(ingest.status().as_u16(), 400);
    for (path, body) in [
        ("/api/v1/app".to_owned(), json!({"name": "a\u{0}b"})),
        (
            format!("/api/v1/app/{app}/msg"),
            json!({"eventType": "a.b", "payload": {}, "tags": ["t\u{0}"]}),
        ),
    ] {
        let (status, answer) = server.call(Method::POST, &path, Some(body)).await;
        assert_eq!(status, 422, "{path}: {answer}");
        assert!(answer.to_string().contains("NUL"), "{answer}");
    }
    server.stop().await;
}

/// Answers that carry a secret (a rotated endpoint secret, an app portal link with its live
/// token) are kept for an `Idempotency-Key` replay without it: the replay, read back from the
/// idempotency table, shows the rest of the answer and no secret.
#[tokio::test]
async fn a_replayed_answer_never_holds_the_secret_it_first_carried() {
    let server = TestServer::start().await;
    let app = server.create_app("idem-secrets").await;
    let endpoint = server
        .create_endpoint(&app, json!({"url": "https://example.com/hook"}))
        .await;
    let endpoint = endpoint["id"].as_str().expect("id");
    let rotate = format!("/api/v1/app/{app}/endpoint/{endpoint}/secret/rotate");
    let call = |path: String, key: &'static str| {
        let server = &server;
        async move {
            server
                .call_as(
                    Some(ADMIN_TOKEN),
                    Method::POST,
                    &path,
                    Some(json!({})),
                    Some(key),
                )
                .await
        }
    };

    let (status, first) = call(rotate.clone(), "rotate-1").await;
    assert_eq!(status, 200, "{first}");
    let secret = first["key"].as_str().expect("the new secret").to_owned();
    assert!(secret.starts_with("whsec_"));
    let (status, replayed) = call(rotate, "rotate-1").await;
    assert_eq!(status, 200, "{replayed}");
    assert_eq!(replayed, json!({}), "the replay leaves the secret out");
    let (_, current) = server
        .call(
            Method::GET,
            &format!("/api/v1/app/{app}/endpoint/{endpoint}/secret"),
            None,
        )
        .await;
    assert_eq!(
        current["key"], secret,
        "the secret is read where the API allows"
    );

    let portal = format!("/api/v1/auth/app-portal-access/{app}");
    let (status, first) = call(portal.clone(), "portal-1").await;
    assert_eq!(status, 200, "{first}");
    assert!(
        first["token"]
            .as_str()
            .is_some_and(|t| t.starts_with("hrld_"))
    );
    assert!(
        first["url"]
            .as_str()
            .is_some_and(|u| u.contains("#key=hrld_"))
    );
    let (status, replayed) = call(portal, "portal-1").await;
    assert_eq!(status, 200, "{replayed}");
    assert_eq!(
        replayed,
        json!({}),
        "neither the token nor the link is kept"
    );
    server.stop().await;
}

/// Headers that carry the receiver's credentials are sent with every delivery but never read
/// back: `GET .../headers` names them in `sensitive`, as Svix does, and leaves their values out.
#[tokio::test]
async fn credential_headers_are_sent_but_read_back_by_name_only() {
    let server = TestServer::start().await;
    let mut receiver = Receiver::start().await;
    let app = server.create_app("sensitive-headers").await;
    let ep = server
        .create_endpoint(
            &app,
            json!({"url": receiver.url, "headers": {
                "Authorization": "Bearer receiver-s3cret",
                "x-auth-token": "t0ken",
                "X-Plain": "1",
            }}),
        )
        .await;
    let path = format!(
        "/api/v1/app/{app}/endpoint/{}/headers",
        ep["id"].as_str().expect("id")
    );
    let (status, got) = server.call(Method::GET, &path, None).await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["headers"], json!({"X-Plain": "1"}));
    assert_eq!(got["sensitive"], json!(["Authorization", "x-auth-token"]));
    assert!(!got.to_string().contains("s3cret"), "{got}");

    server
        .send(
            &app,
            json!({"eventType": "order.paid", "payload": {"id": 1}}),
        )
        .await;
    let delivery = receiver.next().await;
    assert_eq!(delivery.header("authorization"), "Bearer receiver-s3cret");
    assert_eq!(delivery.header("x-auth-token"), "t0ken");
    assert_eq!(delivery.header("x-plain"), "1");

    // Whoever may change the URL may not read the credentials: moved to another path of the
    // same origin they are kept, moved to another origin they are dropped.
    let endpoint = format!(
        "/api/v1/app/{app}/endpoint/{}",
        ep["id"].as_str().expect("id")
    );
    let same_origin = format!("{}/elsewhere", receiver.url.trim_end_matches('/'));
    let (status, body) = server
        .call(Method::PATCH, &endpoint, Some(json!({"url": same_origin})))
        .await;
    assert_eq!(status, 200, "{body}");
    let (_, got) = server.call(Method::GET, &path, None).await;
    assert_eq!(got["sensitive"], json!(["Authorization", "x-auth-token"]));
    let mut elsewhere = Receiver::start().await;
    let (status, body) = server
        .call(
            Method::PATCH,
            &endpoint,
            Some(json!({"url": elsewhere.url})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (_, got) = server.call(Method::GET, &path, None).await;
    assert_eq!(got["headers"], json!({"X-Plain": "1"}));
    assert_eq!(got["sensitive"], json!([]));
    server
        .send(
            &app,
            json!({"eventType": "order.paid", "payload": {"id": 2}}),
        )
        .await;
    let delivery = elsewhere.next().await;
    assert!(
        delivery.headers.get("authorization").is_none(),
        "{:?}",
        delivery.headers
    );
    assert!(delivery.headers.get("x-auth-token").is_none());
    assert_eq!(delivery.header("x-plain"), "1");
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

    // Header names ignore case: a delete or a new value reaches the header however it was
    // spelt, and one request may not name a header twice.
    let (status, _) = server
        .call(
            Method::PATCH,
            &path,
            Some(json!({"headers": {"x-c": "30"}, "deleteHeaders": ["x-d"]})),
        )
        .await;
    assert_eq!(status, 204);
    let (_, got) = server.call(Method::GET, &path, None).await;
    assert_eq!(got["headers"], json!({"x-c": "30"}));
    let (status, body) = server
        .call(
            Method::PUT,
            &path,
            Some(json!({"headers": {"X-E": "1", "x-e": "2"}})),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert!(body.to_string().contains("twice"), "{body}");

    // An existing endpoint's secret changes through a rotation: a PUT naming another secret is
    // refused, one repeating the current secret is accepted.
    let endpoint_path = format!(
        "/api/v1/app/{app}/endpoint/{}",
        ep["id"].as_str().expect("id")
    );
    let (_, current) = server
        .call(Method::GET, &format!("{endpoint_path}/secret"), None)
        .await;
    let other = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let (status, body) = server
        .call(
            Method::PUT,
            &endpoint_path,
            Some(json!({"url": "https://example.com/hook", "secret": other})),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert!(body.to_string().contains("secret/rotate"), "{body}");
    let (status, body) = server
        .call(
            Method::PUT,
            &endpoint_path,
            Some(json!({"url": "https://example.com/hook", "secret": current["key"]})),
        )
        .await;
    assert_eq!(status, 200, "{body}");

    // `throttleRate` is Svix's u16: out of range is refused, in range kept and returned.
    for rate in [-1, 70_000] {
        let (status, body) = server
            .call(
                Method::POST,
                &format!("/api/v1/app/{app}/endpoint"),
                Some(json!({"url": "https://example.com/t", "throttleRate": rate})),
            )
            .await;
        assert_eq!(status, 422, "{rate}: {body}");
        assert!(body.to_string().contains("throttleRate"), "{body}");
    }
    let (status, body) = server
        .call(
            Method::PATCH,
            &endpoint_path,
            Some(json!({"throttleRate": 5})),
        )
        .await;
    assert_eq!((status, &body["throttleRate"]), (200, &json!(5)), "{body}");
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
        // Past the address's burst of failures, refused unread (429) rather than looked up.
        assert!(status == 401 || status == 429, "{status} {refused}");
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
    // A refusal is not kept either: nothing was written, so its retry runs again.
    let (status, refused) = server
        .call_as(
            Some(ADMIN_TOKEN),
            Method::POST,
            &path,
            Some(json!({"eventType": "order.created"})),
            Some("refused-then-fixed"),
        )
        .await;
    assert_eq!(status, 422, "{refused}");
    assert_eq!(
        server
            .store_scalar("SELECT COUNT(*) FROM idempotency")
            .await,
        0,
        "a refusal is not kept"
    );
    let (status, created) = server
        .call_as(
            Some(ADMIN_TOKEN),
            Method::POST,
            &path,
            Some(body.clone()),
            Some("refused-then-fixed"),
        )
        .await;
    assert_eq!(status, 201, "the retry ran: {created}");
    // The admin token's record is scoped by name, not by the token's unsalted digest, which
    // anyone with the database could test guesses of the operator's token against.
    assert_eq!(
        server
            .store_scalar("SELECT COUNT(*) FROM idempotency WHERE scope LIKE 'admin:%'")
            .await,
        1,
        "the admin token's answer is kept under `admin`"
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

    // A key that is there but unusable is refused, not dropped (the request would then run
    // unprotected, and its retry twice).
    for (key, expected) in [
        (&b""[..], "is empty"),
        ("clé-1".as_bytes(), "visible ASCII"),
    ] {
        let response = crate::harness::http_client()
            .post(format!("{}{path}", server.base))
            .bearer_auth(ADMIN_TOKEN)
            .header(
                "idempotency-key",
                reqwest::header::HeaderValue::from_bytes(key).expect("a header value"),
            )
            .json(&body)
            .send()
            .await
            .expect("request");
        assert_eq!(response.status().as_u16(), 400);
        let refused: Value = response.json().await.expect("json");
        assert_eq!(refused["code"], "invalid_idempotency_key", "{refused}");
        assert!(
            refused["detail"]
                .as_str()
                .is_some_and(|d| d.contains(expected)),
            "{refused}"
        );
    }

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
        2,
        "the fixed retry's answer and this one"
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

/// Issue 10: one channel-name rule. A message channel with `:` used to be accepted (201) and
/// never reached a socket, which refuses `:`; now every face answers with the same rule
/// (Pusher's: 1 to 164 of `[A-Za-z0-9_\-=@,.;]`), and the longest valid name goes all the way.
#[tokio::test]
async fn channel_names_follow_one_rule_from_the_api_to_the_sockets() {
    use crate::pusher::{Client, pusher_app, trigger};
    use herald_core::validate::{CHANNEL_RULE, MAX_CHANNEL_NAME};

    let server = TestServer::start().await;
    let (app, creds) = pusher_app(&server, "one-channel-rule").await;
    let too_long = "c".repeat(MAX_CHANNEL_NAME + 1);
    for bad in ["a:b", too_long.as_str()] {
        let (status, refused) = server
            .call(
                Method::POST,
                &format!("/api/v1/app/{app}/msg"),
                Some(json!({"eventType": "t", "channels": [bad], "payload": {}})),
            )
            .await;
        assert_eq!(status, 422, "{bad}: {refused}");
        assert_eq!(
            refused["detail"],
            json!([{"loc": ["body", "channels"], "msg": CHANNEL_RULE, "type": "value_error"}]),
            "{bad}"
        );
        let (status, refused) = server
            .call(
                Method::POST,
                &format!("/api/v1/app/{app}/endpoint"),
                Some(json!({"url": "https://example.com/hook", "channels": [bad]})),
            )
            .await;
        assert_eq!(status, 422, "an endpoint filter on {bad}: {refused}");
        assert_eq!(refused["detail"][0]["loc"], json!(["body", "channels"]));
        let (status, body) = trigger(
            &server,
            &creds,
            json!({"name": "t", "channel": bad, "data": "{}"}),
        )
        .await;
        assert_eq!(status, 400, "the Pusher API agrees on {bad}: {body}");
        assert!(body.contains(CHANNEL_RULE), "{body}");
    }

    // The longest name the rule allows, with every punctuation mark it allows.
    let longest = format!("x_-=@,.;{}", "z".repeat(MAX_CHANNEL_NAME - 8));
    assert_eq!(longest.len(), MAX_CHANNEL_NAME);
    let mut client = Client::connect(&server, &creds.key).await;
    let mut refused = Client::connect(&server, &creds.key).await;
    let answer = refused.subscribe("a:b", None, None).await;
    assert_eq!(answer["event"], "pusher:subscription_error", "{answer}");
    assert_eq!(answer["data"]["error"], CHANNEL_RULE, "{answer}");
    let joined = client.subscribe(&longest, None, None).await;
    assert_eq!(
        joined["event"], "pusher_internal:subscription_succeeded",
        "{joined}"
    );
    server
        .send(
            &app,
            json!({"eventType": "order.paid", "channels": [longest], "payload": {"id": 1}}),
        )
        .await;
    assert_eq!(
        client.next().await,
        json!({"event": "order.paid", "channel": longest, "data": "{\"id\":1}"})
    );
    server.stop().await;
}

/// The `id`s of a list answer's items, in order.
fn ids(list: &Value) -> Vec<&str> {
    list["data"]
        .as_array()
        .expect("a list answer")
        .iter()
        .map(|item| item["id"].as_str().expect("an id"))
        .collect()
}

/// `GET`s the path as the admin, asserting 200.
async fn get_ok(server: &TestServer, path: &str) -> Value {
    let (status, body) = server.call(Method::GET, path, None).await;
    assert_eq!(status, 200, "GET {path}: {body}");
    body
}

/// Event types whose names begin with `-` page forward and back like any other (an iterator
/// is a marked name, never read as a walk back); an unmarked iterator is a 422.
#[tokio::test]
async fn event_types_page_through_names_that_begin_with_a_dash() {
    let server = TestServer::start().await;
    for name in ["-internal", "-other", "invoice.paid"] {
        let (status, body) = server
            .call(
                Method::POST,
                "/api/v1/event-type",
                Some(json!({"name": name, "description": name})),
            )
            .await;
        assert_eq!(status, 201, "{name}: {body}");
    }
    let mut seen = Vec::new();
    let mut iterator: Option<String> = None;
    let mut last = Value::Null;
    for _ in 0..4 {
        let path = match &iterator {
            None => "/api/v1/event-type?limit=1".to_owned(),
            Some(it) => format!("/api/v1/event-type?limit=1&iterator={it}"),
        };
        last = get_ok(&server, &path).await;
        seen.extend(
            last["data"]
                .as_array()
                .expect("data")
                .iter()
                .map(|e| e["name"].as_str().expect("name").to_owned()),
        );
        if last["done"] == true {
            break;
        }
        iterator = last["iterator"].as_str().map(str::to_owned);
    }
    assert_eq!(seen, ["-internal", "-other", "invoice.paid"], "{last}");
    let back = last["prevIterator"].as_str().expect("prevIterator");
    let previous = get_ok(
        &server,
        &format!("/api/v1/event-type?limit=1&iterator={back}"),
    )
    .await;
    assert_eq!(previous["data"][0]["name"], "-other", "{previous}");
    let (status, body) = server
        .call(Method::GET, "/api/v1/event-type?iterator=-internal", None)
        .await;
    assert_eq!(status, 422, "an iterator this list did not give: {body}");

    // `order=descending` walks the names the other way, page by page.
    let first = get_ok(&server, "/api/v1/event-type?order=descending&limit=2").await;
    let names = |page: &Value| -> Vec<String> {
        page["data"]
            .as_array()
            .expect("data")
            .iter()
            .map(|e| e["name"].as_str().expect("name").to_owned())
            .collect()
    };
    assert_eq!(names(&first), ["invoice.paid", "-other"], "{first}");
    let it = first["iterator"].as_str().expect("iterator");
    let rest = get_ok(
        &server,
        &format!("/api/v1/event-type?order=descending&limit=2&iterator={it}"),
    )
    .await;
    assert_eq!(names(&rest), ["-internal"], "{rest}");
    let (status, body) = server
        .call(Method::GET, "/api/v1/event-type?order=sideways", None)
        .await;
    assert_eq!(status, 422, "{body}");
}

/// Every live earlier secret signs every delivery: at most five may, and a sixth rotation
/// with a grace period is refused (`limit_reached`) until one expires; one without is not.
#[tokio::test]
async fn rotations_keep_at_most_five_earlier_secrets_signing() {
    let server = TestServer::start().await;
    let app = server.create_app("rotations").await;
    let endpoint = server
        .create_endpoint(&app, json!({"url": "https://example.com/hook"}))
        .await;
    let rotate = format!(
        "/api/v1/app/{app}/endpoint/{}/secret/rotate",
        endpoint["id"].as_str().expect("id")
    );
    for n in 0..5 {
        let (status, body) = server.call(Method::POST, &rotate, Some(json!({}))).await;
        assert_eq!(status, 200, "rotation {n}: {body}");
    }
    let (status, body) = server.call(Method::POST, &rotate, Some(json!({}))).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["code"], "limit_reached", "{body}");
    let (status, body) = server
        .call(
            Method::POST,
            &rotate,
            Some(json!({"gracePeriodSeconds": 0})),
        )
        .await;
    assert_eq!(
        status, 200,
        "without a grace period nothing is added: {body}"
    );
}

#[tokio::test]
async fn svix_attempt_routes_get_one_attempt_and_list_attempted_messages_and_destinations() {
    // A failed first attempt is retried an hour later: long enough to see it pending.
    let server = TestServer::start_with(|c| c.delivery.retry_schedule_secs = vec![3600.0]).await;
    let ok = Receiver::start().await;
    let failing = Receiver::start().await;
    failing.fallback(Reply::Status(500));
    let app = server.create_app("attempted").await;
    let ep_ok = server
        .create_endpoint(
            &app,
            json!({"url": ok.url, "uid": "ok", "description": "fine"}),
        )
        .await;
    let ep_fail = server
        .create_endpoint(&app, json!({"url": failing.url, "channels": ["shop"]}))
        .await;
    let (ep_ok, ep_fail) = (
        ep_ok["id"].as_str().expect("id"),
        ep_fail["id"].as_str().expect("id"),
    );
    let paid = server
        .send(
            &app,
            json!({"eventType": "order.paid", "eventId": "paid-1", "channels": ["shop"],
                   "tags": ["vip"], "payload": {"order": 1}}),
        )
        .await;
    // No channel: the channel-filtered endpoint does not get it.
    let shipped = server
        .send(
            &app,
            json!({"eventType": "order.shipped", "payload": {"order": 2}}),
        )
        .await;
    let (paid, shipped) = (
        paid["id"].as_str().expect("id"),
        shipped["id"].as_str().expect("id"),
    );
    server.settled(&app, ep_ok).await;
    let failed_path = format!("/api/v1/app/{app}/endpoint/{ep_fail}/msg");
    let failed = eventually(
        "the failed first attempt to leave its delivery pending",
        || async {
            // Pending before the first attempt too, but then due now, not in an hour.
            let list = get_ok(&server, &failed_path).await;
            let retry_later = list["data"][0]["nextAttempt"]
                .as_str()
                .and_then(|t| t.parse::<chrono::DateTime<chrono::Utc>>().ok())
                .is_some_and(|t| t > chrono::Utc::now() + chrono::Duration::minutes(30));
            (list["data"][0]["status"] == 1 && retry_later).then_some(list)
        },
    )
    .await;

    // messageAttempt.get: one attempt, exactly as the attempt lists show it.
    let listed = get_ok(&server, &format!("/api/v1/app/{app}/attempt/msg/{paid}")).await;
    assert_eq!(listed["data"].as_array().map(Vec::len), Some(2), "{listed}");
    for attempt in listed["data"].as_array().expect("attempts") {
        let id = attempt["id"].as_str().expect("id");
        let one = get_ok(
            &server,
            &format!("/api/v1/app/{app}/msg/{paid}/attempt/{id}"),
        )
        .await;
        assert_eq!(&one, attempt);
        // The message may be named by its eventId.
        let by_event_id = get_ok(
            &server,
            &format!("/api/v1/app/{app}/msg/paid-1/attempt/{id}"),
        )
        .await;
        assert_eq!(&by_event_id, attempt);
    }
    // Filtered by endpoint, named by its id or its uid; an unknown endpoint is a 404.
    let by_msg = format!("/api/v1/app/{app}/attempt/msg/{paid}");
    for named in [ep_ok, "ok"] {
        let only = get_ok(&server, &format!("{by_msg}?endpoint_id={named}")).await;
        assert_eq!(only["data"].as_array().map(Vec::len), Some(1), "{only}");
        assert_eq!(only["data"][0]["endpointId"], ep_ok, "{only}");
    }
    let (status, body) = server
        .call(Method::GET, &format!("{by_msg}?endpoint_id=nope"), None)
        .await;
    assert_eq!(status, 404, "{body}");
    // `with_content=false` leaves the response bodies out.
    let bare = get_ok(&server, &format!("{by_msg}?with_content=false")).await;
    assert!(
        bare["data"]
            .as_array()
            .expect("attempts")
            .iter()
            .all(|a| a["response"] == ""),
        "{bare}"
    );
    assert_ne!(
        listed["data"][0]["response"], "",
        "bodies by default: {listed}"
    );
    // Filtered by time and by the response's status class.
    let count = |list: &Value| list["data"].as_array().map_or(0, Vec::len);
    let later = get_ok(&server, &format!("{by_msg}?after=2030-01-01T00:00:00Z")).await;
    assert_eq!(count(&later), 0, "{later}");
    let earlier = get_ok(&server, &format!("{by_msg}?before=2030-01-01T00:00:00Z")).await;
    assert_eq!(count(&earlier), 2, "{earlier}");
    let ok_class = get_ok(&server, &format!("{by_msg}?status_code_class=200")).await;
    assert_eq!(count(&ok_class), 1, "{ok_class}");
    assert_eq!(ok_class["data"][0]["endpointId"], ep_ok, "{ok_class}");
    let server_errors = get_ok(&server, &format!("{by_msg}?status_code_class=500")).await;
    assert_eq!(count(&server_errors), 1, "{server_errors}");
    assert_eq!(server_errors["data"][0]["responseStatusCode"], 500);
    let (status, body) = server
        .call(
            Method::GET,
            &format!("{by_msg}?status_code_class=250"),
            None,
        )
        .await;
    assert_eq!(status, 422, "{body}");
    let no_response = get_ok(&server, &format!("{by_msg}?status_code_class=0")).await;
    assert_eq!(
        count(&no_response),
        0,
        "every attempt got a response: {no_response}"
    );
    // What older SDKs send on every call is no filter: `with_msg=false`, an empty list.
    let as_sent = get_ok(&server, &format!("{by_msg}?with_msg=false&event_types=")).await;
    assert_eq!(count(&as_sent), 2, "{as_sent}");
    // Filters by the message: the channel, a tag, the event types.
    for (filter, expected) in [
        ("channel=shop", 2),
        ("channel=elsewhere", 0),
        ("tag=vip", 2),
        ("tag=other", 0),
        ("event_types=order.paid", 2),
        ("event_types=a&event_types=order.paid", 2),
        ("event_types=a,b", 0),
    ] {
        let list = get_ok(&server, &format!("{by_msg}?{filter}")).await;
        assert_eq!(count(&list), expected, "{filter}: {list}");
    }
    // By default an attempt comes without its message; `with_msg=true` adds it without its
    // payload, as Svix does.
    assert!(listed["data"][0].get("msg").is_none(), "{listed}");
    let with_msg = get_ok(
        &server,
        &format!("{by_msg}?with_msg=true&with_content=false"),
    )
    .await;
    for attempt in with_msg["data"].as_array().expect("attempts") {
        assert_eq!(attempt["msg"]["id"], paid, "{attempt}");
        assert_eq!(attempt["msg"]["eventId"], "paid-1", "{attempt}");
        assert_eq!(attempt["msg"]["eventType"], "order.paid", "{attempt}");
        assert_eq!(attempt["msg"]["tags"], json!(["vip"]), "{attempt}");
        assert_eq!(attempt["msg"]["payload"], json!({}), "{attempt}");
        assert_eq!(attempt["response"], "", "{attempt}");
    }
    // By endpoint, each attempt with its own message, and the message filters narrow them.
    let by_endpoint = format!("/api/v1/app/{app}/attempt/endpoint/{ep_ok}");
    let all = get_ok(&server, &format!("{by_endpoint}?with_msg=true")).await;
    assert_eq!(count(&all), 2, "{all}");
    for attempt in all["data"].as_array().expect("attempts") {
        assert_eq!(attempt["msg"]["id"], attempt["msgId"], "{attempt}");
        let event_type = if attempt["msgId"] == paid {
            "order.paid"
        } else {
            "order.shipped"
        };
        assert_eq!(attempt["msg"]["eventType"], event_type, "{attempt}");
    }
    for (filter, expected) in [
        ("channel=shop", vec![paid]),
        ("tag=vip", vec![paid]),
        ("event_types=order.shipped", vec![shipped]),
        ("event_types=order.shipped&channel=shop", vec![]),
    ] {
        let list = get_ok(&server, &format!("{by_endpoint}?{filter}")).await;
        let msgs: Vec<&str> = list["data"]
            .as_array()
            .expect("attempts")
            .iter()
            .filter_map(|a| a["msgId"].as_str())
            .collect();
        assert_eq!(msgs, expected, "{filter}: {list}");
    }
    // The message list takes the same message filters; an empty value is no filter.
    let messages = format!("/api/v1/app/{app}/msg");
    for (filter, expected) in [
        ("tag=vip", vec![paid]),
        ("tag=other", vec![]),
        ("channel=shop", vec![paid]),
        ("event_types=order.shipped", vec![shipped]),
        ("tag=vip&event_types=order.shipped", vec![]),
    ] {
        let list = get_ok(&server, &format!("{messages}?{filter}")).await;
        assert_eq!(ids(&list), expected, "{filter}: {list}");
    }
    for filter in ["tag=", "channel=", "event_types="] {
        let list = get_ok(&server, &format!("{messages}?{filter}")).await;
        assert_eq!(ids(&list).len(), 2, "{filter}: {list}");
    }
    let other_attempt = get_ok(&server, &format!("/api/v1/app/{app}/attempt/msg/{shipped}")).await;
    let other_attempt = other_attempt["data"][0]["id"].as_str().expect("id");
    for path in [
        format!("/api/v1/app/{app}/msg/{paid}/attempt/{other_attempt}"),
        format!("/api/v1/app/{app}/msg/{paid}/attempt/atmpt_none"),
        format!("/api/v1/app/{app}/msg/msg_none/attempt/{other_attempt}"),
    ] {
        let (status, body) = server.call(Method::GET, &path, None).await;
        assert_eq!(
            status, 404,
            "{path}: another message's attempt is not this one's"
        );
        assert_eq!(body["code"], "not_found");
    }

    // messageAttempt.listAttemptedMessages: the endpoint's messages, newest first, with the
    // delivery's status.
    // Ids made within one clock tick (about 4 ms) may sort either way: newest first is id order.
    let both = if shipped > paid {
        vec![shipped, paid]
    } else {
        vec![paid, shipped]
    };
    let path = format!("/api/v1/app/{app}/endpoint/{ep_ok}/msg");
    let list = get_ok(&server, &path).await;
    assert_eq!(ids(&list), both);
    assert_eq!(list["done"], true);
    let paid_at = both.iter().position(|id| *id == paid).expect("listed");
    let item = &list["data"][paid_at];
    assert_eq!(item["status"], 0, "{item}");
    assert_eq!(item["statusText"], "success");
    assert!(item.get("nextAttempt").is_none(), "{item}");
    assert_eq!(item["eventType"], "order.paid");
    assert_eq!(item["eventId"], "paid-1");
    assert_eq!(item["channels"], json!(["shop"]));
    assert_eq!(item["tags"], json!(["vip"]));
    assert_eq!(item["payload"], json!({"order": 1}));
    assert!(item["timestamp"].is_string(), "{item}");
    let bare = get_ok(&server, &format!("{path}?with_content=false")).await;
    assert_eq!(bare["data"][paid_at]["payload"], json!({}));
    // The endpoint may be named by its uid; filters narrow the list.
    let by_uid = format!("/api/v1/app/{app}/endpoint/ok/msg");
    for (query, expected) in [
        ("status=0", both.clone()),
        ("status=2", vec![]),
        ("tag=vip", vec![paid]),
        ("channel=shop", vec![paid]),
        ("event_types=order.shipped", vec![shipped]),
        ("before=2000-01-01T00:00:00Z", vec![]),
        ("after=2000-01-01T00:00:00Z", both.clone()),
    ] {
        let list = get_ok(&server, &format!("{by_uid}?{query}")).await;
        assert_eq!(ids(&list), expected, "{query}");
    }
    let first = get_ok(&server, &format!("{path}?limit=1")).await;
    assert_eq!(
        (ids(&first), &first["done"]),
        (vec![both[0]], &json!(false))
    );
    let iterator = first["iterator"].as_str().expect("iterator");
    let second = get_ok(&server, &format!("{path}?limit=1&iterator={iterator}")).await;
    assert_eq!(
        (ids(&second), &second["done"]),
        (vec![both[1]], &json!(true))
    );
    // The failing endpoint's delivery waits for its retry.
    assert_eq!(ids(&failed), [paid]);
    let pending = &failed["data"][0];
    assert_eq!(pending["statusText"], "pending", "{pending}");
    let next: chrono::DateTime<chrono::Utc> = pending["nextAttempt"]
        .as_str()
        .expect("a pending delivery has a nextAttempt")
        .parse()
        .expect("an RFC 3339 time");
    assert!(
        next > chrono::Utc::now() + chrono::Duration::minutes(30),
        "{pending}"
    );
    let (status, _) = server
        .call(
            Method::GET,
            &format!("/api/v1/app/{app}/endpoint/ep_none/msg"),
            None,
        )
        .await;
    assert_eq!(status, 404);

    // messageAttempt.listAttemptedDestinations: the message's endpoints by ascending id.
    let list = get_ok(&server, &format!("/api/v1/app/{app}/msg/{paid}/endpoint")).await;
    let mut expected = [ep_ok, ep_fail];
    expected.sort_unstable();
    assert_eq!(ids(&list), expected);
    for item in list["data"].as_array().expect("data") {
        assert!(
            item["url"].is_string() && item["createdAt"].is_string(),
            "{item}"
        );
        assert_eq!(item["version"], 1);
        if item["id"] == ep_ok {
            assert_eq!(
                (
                    &item["status"],
                    &item["statusText"],
                    &item["uid"],
                    &item["description"]
                ),
                (&json!(0), &json!("success"), &json!("ok"), &json!("fine"))
            );
            assert!(item.get("nextAttempt").is_none(), "{item}");
        } else {
            assert_eq!(
                (&item["status"], &item["channels"]),
                (&json!(1), &json!(["shop"]))
            );
            assert_eq!(item["nextAttempt"], pending["nextAttempt"]);
        }
    }
    let one = get_ok(
        &server,
        &format!("/api/v1/app/{app}/msg/{shipped}/endpoint?limit=1"),
    )
    .await;
    assert_eq!((ids(&one), &one["done"]), (vec![ep_ok], &json!(true)));
    let (status, _) = server
        .call(
            Method::GET,
            &format!("/api/v1/app/{app}/msg/msg_none/endpoint"),
            None,
        )
        .await;
    assert_eq!(status, 404);
    server.stop().await;
}

#[tokio::test]
async fn api_paths_with_one_trailing_slash_are_served_as_without_it() {
    let server = TestServer::start().await;
    let (status, app) = server
        .call(
            Method::POST,
            "/api/v1/app/",
            Some(json!({"name": "slash", "uid": "slash"})),
        )
        .await;
    assert_eq!(status, 201, "{app}");
    let app = app["id"].as_str().expect("id");
    let list = get_ok(&server, "/api/v1/app/").await;
    assert_eq!(ids(&list), [app]);
    assert_eq!(
        get_ok(&server, &format!("/api/v1/app/{app}/")).await["uid"],
        "slash"
    );
    // The query survives the rewrite.
    let (status, msg) = server
        .call(
            Method::POST,
            &format!("/api/v1/app/{app}/msg/?with_content=false"),
            Some(json!({"eventType": "x", "payload": {"a": 1}})),
        )
        .await;
    assert_eq!(status, 201, "{msg}");
    assert_eq!(msg["payload"], json!({}));
    let (status, _) = server.call(Method::GET, "/api/v1/health/", None).await;
    assert_eq!(status, 204);
    // Still authenticated like every route.
    let (status, _) = server
        .call_as(None, Method::GET, "/api/v1/app/", None, None)
        .await;
    assert_eq!(status, 401);
    // One slash only.
    let (status, body) = server.call(Method::GET, "/api/v1/app//", None).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["detail"], "no route for GET /api/v1/app//");
    server.stop().await;
}

/// A known path asked with a method it does not take is a 405 in the APIs' error shape, with
/// the methods it takes in `Allow`, on the Svix and the Pusher API alike.
#[tokio::test]
async fn a_method_a_route_does_not_take_is_a_405_that_says_so() {
    let server = TestServer::start().await;
    for (method, path) in [
        (reqwest::Method::DELETE, "/api/v1/app"),
        (reqwest::Method::PATCH, "/apps/1/events"),
    ] {
        let response = crate::harness::http_client()
            .request(method.clone(), format!("{}{path}", server.base))
            .send()
            .await
            .expect("request");
        assert_eq!(response.status().as_u16(), 405, "{method} {path}");
        let allow = response
            .headers()
            .get("allow")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        assert!(allow.contains("POST"), "{method} {path}: Allow: {allow}");
        let body: Value = response.json().await.expect("a JSON body");
        assert_eq!(body["code"], "method_not_allowed", "{body}");
        assert_eq!(
            body["detail"],
            format!("{path} does not take {method}; the Allow header lists the methods it takes")
        );
    }
    server.stop().await;
}

/// Asserts a 422 in Svix's validation shape whose one item names `field` in the body: its loc
/// is the full path (`application.uid` is `["body", "application", "uid"]`), and so is its
/// message.
fn assert_refuses_field(status: u16, body: &Value, field: &str) {
    assert_eq!(status, 422, "{body}");
    let mut loc = vec!["body"];
    loc.extend(field.split('.'));
    assert_eq!(body["detail"][0]["loc"], json!(loc), "{body}");
    assert_eq!(body["detail"][0]["type"], "value_error.extra", "{body}");
    assert!(
        body["detail"][0]["msg"]
            .as_str()
            .unwrap_or("")
            .contains(field),
        "{body}"
    );
}

#[tokio::test]
async fn a_misspelt_field_on_any_svix_input_is_refused_with_a_422_naming_it() {
    let server = TestServer::start().await;
    let app = server.create_app("typos").await;
    let ep = server
        .create_endpoint(&app, json!({"url": "https://example.com/hook"}))
        .await;
    let ep = ep["id"].as_str().expect("id").to_owned();
    let cases: Vec<(Method, String, Value, &str)> = vec![
        (
            Method::POST,
            "/api/v1/app".into(),
            json!({"name": "a", "throtleRate": 5}),
            "throtleRate",
        ),
        (
            Method::PUT,
            format!("/api/v1/app/{app}"),
            json!({"name": "a", "metdata": {}}),
            "metdata",
        ),
        (
            Method::PATCH,
            format!("/api/v1/app/{app}"),
            json!({"nmae": "b"}),
            "nmae",
        ),
        (
            Method::POST,
            format!("/api/v1/app/{app}/endpoint"),
            json!({"url": "https://example.com/a", "evenTypes": ["x"]}),
            "evenTypes",
        ),
        (
            Method::PUT,
            format!("/api/v1/app/{app}/endpoint/{ep}"),
            json!({"url": "https://example.com/a", "disable": true}),
            "disable",
        ),
        (
            Method::PATCH,
            format!("/api/v1/app/{app}/endpoint/{ep}"),
            json!({"chanels": ["a"]}),
            "chanels",
        ),
        (
            Method::POST,
            format!("/api/v1/app/{app}/endpoint/{ep}/secret/rotate"),
            json!({"keyy": null}),
            "keyy",
        ),
        (
            Method::PUT,
            format!("/api/v1/app/{app}/endpoint/{ep}/headers"),
            json!({"headers": {}, "header": {"X-A": "1"}}),
            "header",
        ),
        (
            Method::PATCH,
            format!("/api/v1/app/{app}/endpoint/{ep}/headers"),
            json!({"headers": {}, "deletedHeaders": ["X-A"]}),
            "deletedHeaders",
        ),
        (
            Method::POST,
            format!("/api/v1/app/{app}/endpoint/{ep}/recover"),
            json!({"since": "2024-01-01T00:00:00Z", "untill": null}),
            "untill",
        ),
        (
            Method::POST,
            format!("/api/v1/app/{app}/msg"),
            json!({"eventType": "a.b", "payload": {}, "chanels": ["c"]}),
            "chanels",
        ),
        (
            Method::POST,
            "/api/v1/app/typos-new/msg".into(),
            json!({"eventType": "a.b", "payload": {}, "application": {"name": "n", "uuid": "x"}}),
            "application.uuid",
        ),
        (
            Method::POST,
            "/api/v1/event-type".into(),
            json!({"name": "a.b", "description": "d", "schema": {}}),
            "schema",
        ),
        (
            Method::PUT,
            "/api/v1/event-type/a.b".into(),
            json!({"description": "d", "archive": true}),
            "archive",
        ),
        (
            Method::PATCH,
            "/api/v1/event-type/a.b".into(),
            json!({"groupname": "g"}),
            "groupname",
        ),
    ];
    for (method, path, body, field) in cases {
        let (status, answer) = server.call(method.clone(), &path, Some(body)).await;
        assert!(status == 422, "{method} {path}: {status} {answer}");
        assert_refuses_field(status, &answer, field);
    }
    // Nothing was created by the refused requests.
    let (status, _) = server
        .call(Method::GET, "/api/v1/app/typos-new", None)
        .await;
    assert_eq!(status, 404);
    let (status, _) = server
        .call(Method::GET, "/api/v1/event-type/a.b", None)
        .await;
    assert_eq!(status, 404);
    server.stop().await;
}

#[tokio::test]
async fn an_unknown_field_in_a_nested_object_is_refused_with_its_full_path() {
    let server = TestServer::start().await;
    let app = server.create_app("nested").await;
    // A message's inline application (Svix's "create it if missing").
    let (status, refused) = server
        .call(
            Method::POST,
            "/api/v1/app/nested-new/msg",
            Some(json!({
                "eventType": "a.b", "payload": {"any": {"field": 1}},
                "application": {"name": "n", "foo": 1}
            })),
        )
        .await;
    assert_refuses_field(status, &refused, "application.foo");
    assert_eq!(
        refused["detail"],
        json!([{
            "loc": ["body", "application", "foo"],
            "msg": refused["detail"][0]["msg"],
            "type": "value_error.extra"
        }]),
        "exactly one item: {refused}"
    );
    assert!(
        refused["detail"][0]["msg"]
            .as_str()
            .unwrap_or("")
            .starts_with("extra fields not permitted: unknown field `application.foo`"),
        "{refused}"
    );
    let (status, _) = server
        .call(Method::GET, "/api/v1/app/nested-new", None)
        .await;
    assert_eq!(status, 404, "the refused message created no application");

    // An ingest source's hmac settings, one of Herald's own nested shapes.
    let (status, refused) = server
        .call(
            Method::POST,
            &format!("/api/v1/app/{app}/ingest/source"),
            Some(json!({
                "kind": "hmac-sha256", "secrets": ["s"],
                "hmac": {"header": "X-Signature", "encodingg": "hex"}
            })),
        )
        .await;
    assert_refuses_field(status, &refused, "hmac.encodingg");

    // Top-level fields are named as before.
    let (status, refused) = server
        .call(
            Method::POST,
            &format!("/api/v1/app/{app}/msg"),
            Some(json!({"eventType": "a.b", "payload": {}, "foo": 1})),
        )
        .await;
    assert_refuses_field(status, &refused, "foo");
    server.stop().await;
}

#[tokio::test]
async fn a_wrong_type_in_an_array_or_nested_object_names_its_full_path() {
    let server = TestServer::start().await;
    let app = server.create_app("typed").await;
    let (status, refused) = server
        .call(
            Method::POST,
            &format!("/api/v1/app/{app}/msg"),
            Some(json!({"eventType": "a.b", "payload": {}, "channels": ["a", "b", 5]})),
        )
        .await;
    assert_eq!(status, 422, "{refused}");
    // Svix's loc is all strings: the index is "2".
    assert_eq!(
        refused["detail"][0]["loc"],
        json!(["body", "channels", "2"]),
        "{refused}"
    );
    assert_eq!(refused["detail"][0]["type"], "value_error", "{refused}");
    let msg = refused["detail"][0]["msg"].as_str().unwrap_or("");
    assert!(msg.starts_with("channels[2]: invalid type"), "{refused}");

    // A missing field of a nested object is located at the field, as Svix does.
    let (status, refused) = server
        .call(
            Method::POST,
            &format!("/api/v1/app/{app}/msg"),
            Some(json!({"eventType": "a.b", "payload": {}, "application": {"uid": "x"}})),
        )
        .await;
    assert_eq!(status, 422, "{refused}");
    assert_eq!(
        refused["detail"][0]["loc"],
        json!(["body", "application", "name"]),
        "{refused}"
    );
    assert_eq!(
        refused["detail"][0]["type"], "value_error.missing",
        "{refused}"
    );
    assert_eq!(
        refused["detail"][0]["msg"], "field required: `application.name`",
        "{refused}"
    );

    // A bad value in an ingest source's nested settings.
    let (status, refused) = server
        .call(
            Method::POST,
            &format!("/api/v1/app/{app}/ingest/source"),
            Some(json!({
                "kind": "hmac-sha256", "secrets": ["s"],
                "hmac": {"header": "X-Signature", "encoding": "base32"}
            })),
        )
        .await;
    assert_eq!(status, 422, "{refused}");
    assert_eq!(
        refused["detail"][0]["loc"],
        json!(["body", "hmac", "encoding"]),
        "{refused}"
    );
    let msg = refused["detail"][0]["msg"].as_str().unwrap_or("");
    assert!(
        msg.starts_with("hmac.encoding: unknown variant"),
        "{refused}"
    );
    server.stop().await;
}

#[tokio::test]
async fn rate_limit_is_the_older_svix_name_of_throttle_rate() {
    let server = TestServer::start().await;
    let rates =
        |body: &serde_json::Value| (body["throttleRate"].clone(), body["rateLimit"].clone());
    let (status, app) = server
        .call(
            Method::POST,
            "/api/v1/app",
            Some(json!({"name": "old sdk", "rateLimit": 10})),
        )
        .await;
    assert_eq!(status, 201, "{app}");
    assert_eq!(rates(&app), (json!(10), json!(10)), "{app}");
    let app = app["id"].as_str().expect("id").to_owned();
    for (patch, expected) in [
        (json!({"rateLimit": 3}), json!(3)),
        (json!({"rateLimit": 4, "throttleRate": 6}), json!(6)),
        (json!({"rateLimit": null}), json!(null)),
    ] {
        let (status, body) = server
            .call(
                Method::PATCH,
                &format!("/api/v1/app/{app}"),
                Some(patch.clone()),
            )
            .await;
        assert_eq!(status, 200, "{patch}: {body}");
        assert_eq!(
            rates(&body),
            (expected.clone(), expected),
            "{patch}: {body}"
        );
    }

    let (status, ep) = server
        .call(
            Method::POST,
            &format!("/api/v1/app/{app}/endpoint"),
            Some(json!({"url": "https://example.com/hook", "rateLimit": 5, "version": 1})),
        )
        .await;
    assert_eq!(status, 201, "{ep}");
    assert_eq!(rates(&ep), (json!(5), json!(5)), "{ep}");
    let path = format!(
        "/api/v1/app/{app}/endpoint/{}",
        ep["id"].as_str().expect("id")
    );
    let (status, body) = server
        .call(Method::PATCH, &path, Some(json!({"rateLimit": 7})))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(rates(&body), (json!(7), json!(7)), "{body}");
    let (status, body) = server
        .call(
            Method::PUT,
            &path,
            Some(json!({"url": "https://example.com/hook", "rateLimit": 2, "throttleRate": 9})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        rates(&body),
        (json!(9), json!(9)),
        "throttleRate wins: {body}"
    );
    let (status, body) = server
        .call(Method::PATCH, &path, Some(json!({"rateLimit": null})))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(rates(&body), (json!(null), json!(null)), "{body}");
    let (status, body) = server
        .call(Method::PATCH, &path, Some(json!({"rateLimit": 70000})))
        .await;
    assert_eq!(status, 422, "over a u16, as throttleRate: {body}");
}

#[tokio::test]
async fn fields_svix_defines_are_accepted_even_null_or_ignored_by_herald() {
    let server = TestServer::start().await;
    // Every optional field of Svix's schema, null, as SDKs that send unset fields do.
    let (status, app) = server
        .call(
            Method::POST,
            "/api/v1/app",
            Some(json!({"name": "known", "uid": null, "throttleRate": null, "metadata": null, "rateLimit": null})),
        )
        .await;
    assert_eq!(status, 201, "{app}");
    let app = app["id"].as_str().expect("id").to_owned();
    let (status, body) = server
        .call(
            Method::PUT,
            &format!("/api/v1/app/{app}"),
            Some(json!({"name": "known", "rateLimit": 10})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, ep) = server
        .call(
            Method::POST,
            &format!("/api/v1/app/{app}/endpoint"),
            Some(json!({
                "url": "https://example.com/hook", "description": null, "throttleRate": null,
                "uid": null, "disabled": null, "filterTypes": null, "channels": null,
                "secret": null, "metadata": null, "headers": null, "rateLimit": 5, "version": 1,
                "format": null
            })),
        )
        .await;
    assert_eq!(status, 201, "{ep}");
    let ep = ep["id"].as_str().expect("id").to_owned();
    let (status, body) = server
        .call(
            Method::PATCH,
            &format!("/api/v1/app/{app}/endpoint/{ep}"),
            Some(json!({"description": "d", "throttleRate": null, "uid": null, "eventTypes": null, "channels": null})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = server
        .call(
            Method::POST,
            &format!("/api/v1/app/{app}/endpoint/{ep}/secret/rotate"),
            Some(json!({"key": null, "gracePeriodSeconds": null})),
        )
        .await;
    assert!(status < 300, "{status} {body}");
    let (status, body) = server
        .call(
            Method::POST,
            "/api/v1/event-type",
            Some(json!({"name": "known.event", "description": "d", "archived": null, "deprecated": null,
                        "schemas": null, "groupName": null, "featureFlags": null})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = server
        .call(
            Method::PATCH,
            "/api/v1/event-type/known.event",
            Some(json!({"featureFlag": "beta"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = server
        .call(
            Method::POST,
            &format!("/api/v1/app/{app}/msg"),
            Some(json!({
                "eventType": "known.event", "payload": {"a": 1}, "eventId": null, "channels": null,
                "tags": null, "application": null, "transformationsParams": {"x": 1},
                "deliverAt": "2020-01-01T00:00:00Z", "payloadRetentionPeriod": 30,
                "payloadRetentionHours": null
            })),
        )
        .await;
    assert!(status == 201 || status == 202, "{status} {body}");
    assert_eq!(body["payload"], json!({"a": 1}), "{body}");
    // A future deliverAt would need scheduling, which does not exist yet: refused, never sent
    // early.
    let (status, refused) = server
        .call(
            Method::POST,
            &format!("/api/v1/app/{app}/msg"),
            Some(json!({"eventType": "known.event", "payload": {}, "deliverAt": "2999-01-01T00:00:00Z"})),
        )
        .await;
    assert_eq!(status, 422, "{refused}");
    assert_eq!(
        refused["detail"][0]["loc"],
        json!(["body", "deliverAt"]),
        "{refused}"
    );
    server.stop().await;
}

#[tokio::test]
async fn publishing_beyond_the_apps_rate_gets_429_with_retry_after_and_stores_nothing() {
    use crate::pusher::{pusher_api, pusher_app};
    // A budget of 100 events per app, refilled at one a second: a trigger to 100 channels
    // spends it at once.
    let server = TestServer::start_with(|c| {
        c.api.publish_per_second_per_app = 1;
        c.api.publish_burst_per_app = 100;
    })
    .await;
    let (app, creds) = pusher_app(&server, "rates-publish").await;
    let (other, _) = pusher_app(&server, "rates-publish-other").await;
    let channels: Vec<String> = (0..100).map(|i| format!("room-{i}")).collect();
    let trigger =
        |channels: Vec<String>| json!({"name": "tick", "channels": channels, "data": "{}"});
    let path = format!("/apps/{}/events", creds.id);
    let (status, body) =
        pusher_api(&server, &creds, "POST", &path, &[], Some(trigger(channels))).await;
    assert_eq!(status, 200, "{body}");

    // Svix messages: a refill may let one through, never more than one a second; each
    // refusal is a 429 with Retry-After, and only what was accepted is stored.
    let mut accepted = 0;
    let refusal = loop {
        let response = crate::harness::http_client()
            .post(format!("{}/api/v1/app/{app}/msg", server.base))
            .bearer_auth(ADMIN_TOKEN)
            .json(&json!({"eventType": "tick", "payload": {}}))
            .send()
            .await
            .expect("request");
        match response.status().as_u16() {
            201 => accepted += 1,
            429 => break response,
            other => panic!(
                "unexpected {other}: {}",
                response.text().await.unwrap_or_default()
            ),
        }
        assert!(
            accepted < 5,
            "the app's budget was spent: only refills pass"
        );
    };
    let retry_after = refusal
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .expect("Retry-After in seconds");
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    let refused: Value = refusal.json().await.expect("JSON error");
    assert_eq!(refused["code"], "rate_limited");
    assert!(
        refused["detail"]
            .as_str()
            .is_some_and(|d| d.contains("at most 1 per second")),
        "{refused}"
    );
    let (_, listed) = server
        .call(Method::GET, &format!("/api/v1/app/{app}/msg"), None)
        .await;
    assert_eq!(
        listed["data"].as_array().map(Vec::len),
        Some(accepted),
        "a refused message is not stored"
    );

    // The Pusher HTTP API answers the same way, in its plain-text errors.
    let (status, body) = pusher_api(
        &server,
        &creds,
        "POST",
        &path,
        &[],
        Some(trigger(vec!["room-0".into(); 1])),
    )
    .await;
    assert!(status == 429 || status == 200, "{status} {body}");
    if status == 200 {
        // A refill let that one through; the next at once is refused.
        let (status, body) = pusher_api(
            &server,
            &creds,
            "POST",
            &path,
            &[],
            Some(trigger(vec!["room-0".into()])),
        )
        .await;
        assert_eq!(status, 429, "{body}");
        assert!(body.contains("too many events published"), "{body}");
    } else {
        assert!(body.contains("too many events published"), "{body}");
    }

    // Another app has a budget of its own.
    let (status, body) = server
        .call(
            Method::POST,
            &format!("/api/v1/app/{other}/msg"),
            Some(json!({"eventType": "tick", "payload": {}})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    server.stop().await;
}

#[tokio::test]
async fn idempotent_replays_hold_no_secret_and_a_rate_limit_refusal_is_not_replayed() {
    use crate::pusher::{pusher_api, pusher_app};
    let server = TestServer::start_with(|c| {
        c.api.publish_per_second_per_app = 1;
        c.api.publish_burst_per_app = 100;
    })
    .await;
    let post = |path: &'static str, body: Value, key: &'static str| {
        let server = &server;
        async move {
            server
                .call_as(Some(ADMIN_TOKEN), Method::POST, path, Some(body), Some(key))
                .await
        }
    };

    // A token create replayed: the same token, without its secret.
    let (status, first) = post("/api/v1/auth/token", json!({"name": "ci"}), "token-1").await;
    assert_eq!(status, 201, "{first}");
    assert!(
        first["token"]
            .as_str()
            .is_some_and(|t| t.starts_with("hrld_"))
    );
    let (status, replay) = post("/api/v1/auth/token", json!({"name": "ci"}), "token-1").await;
    assert_eq!(status, 201, "{replay}");
    assert_eq!(replay["id"], first["id"], "a replay, not a second token");
    assert!(replay.get("token").is_none(), "{replay}");

    // An app create and a Pusher secret rotation replayed: without the Pusher secret.
    let (status, app) = post("/api/v1/app", json!({"name": "replays"}), "app-1").await;
    assert_eq!(status, 201, "{app}");
    assert!(app["pusher"]["secret"].is_string());
    let (status, replay) = post("/api/v1/app", json!({"name": "replays"}), "app-1").await;
    assert_eq!(status, 201);
    assert_eq!(replay["id"], app["id"]);
    assert!(replay["pusher"].get("secret").is_none(), "{replay}");
    assert_eq!(replay["pusher"]["key"], app["pusher"]["key"]);
    let app_id = app["id"].as_str().expect("id").to_owned();
    let rotate = format!("/api/v1/app/{app_id}/pusher/secret/rotate");
    for n in 0..2 {
        let (status, rotated) = server
            .call_as(
                Some(ADMIN_TOKEN),
                Method::POST,
                &rotate,
                Some(json!({})),
                Some("rotate-1"),
            )
            .await;
        assert_eq!(status, 200, "{rotated}");
        assert_eq!(rotated.get("secret").is_some(), n == 0, "{rotated}");
    }

    // A 429 is not kept: once the budget refills, the retry under the same key is accepted.
    let (pusher_app_id, creds) = pusher_app(&server, "replays-pusher").await;
    let channels: Vec<String> = (0..100).map(|i| format!("room-{i}")).collect();
    let (status, body) = pusher_api(
        &server,
        &creds,
        "POST",
        &format!("/apps/{}/events", creds.id),
        &[],
        Some(json!({"name": "tick", "channels": channels, "data": "{}"})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let path = format!("/api/v1/app/{pusher_app_id}/msg");
    let message = json!({"eventType": "tick", "payload": {}});
    let (status, refused) = server
        .call_as(
            Some(ADMIN_TOKEN),
            Method::POST,
            &path,
            Some(message.clone()),
            Some("msg-1"),
        )
        .await;
    assert_eq!(status, 429, "{refused}");
    eventually("the retry under the same key is accepted", || async {
        let (status, _) = server
            .call_as(
                Some(ADMIN_TOKEN),
                Method::POST,
                &path,
                Some(message.clone()),
                Some("msg-1"),
            )
            .await;
        (status == 201).then_some(())
    })
    .await;
    server.stop().await;
}

/// An app's `pusher`-format endpoints receive its channel webhooks (every channel's members
/// and client events, signed with its Pusher secret): its backend's. An app portal link's
/// token neither sees them nor their messages, and cannot make one.
#[tokio::test]
async fn an_app_portal_link_neither_sees_nor_makes_pusher_endpoints_or_their_messages() {
    let server = TestServer::start().await;
    let app = server.create_app("portal-pusher").await;
    let backends = server
        .create_endpoint(
            &app,
            json!({"url": "https://backend.example/pusher", "format": "pusher", "uid": "backend"}),
        )
        .await;
    let backends = backends["id"].as_str().expect("id").to_owned();
    let customers = server
        .create_endpoint(&app, json!({"url": "https://customer.example/hook"}))
        .await;
    let customers = customers["id"].as_str().expect("id").to_owned();
    let channel_webhook = server
        .send(
            &app,
            json!({"eventType": "pusher.channel_webhook", "payload": {"events": []}}),
        )
        .await;
    let channel_webhook = channel_webhook["id"].as_str().expect("id").to_owned();
    let order = server
        .send(
            &app,
            json!({"eventType": "order.paid", "payload": {"id": 1}}),
        )
        .await;
    let order = order["id"].as_str().expect("id").to_owned();

    let (status, link) = server
        .call(
            Method::POST,
            &format!("/api/v1/auth/app-portal-access/{app}"),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, 200, "{link}");
    let portal = link["token"].as_str().expect("token").to_owned();
    let as_portal = |method: Method, path: String, body: Option<Value>| {
        let portal = portal.clone();
        let server = &server;
        async move {
            server
                .call_as(Some(&portal), method, &path, body, None)
                .await
        }
    };
    let ids = |list: &Value| -> Vec<String> {
        list["data"]
            .as_array()
            .expect("data")
            .iter()
            .map(|item| item["id"].as_str().expect("id").to_owned())
            .collect()
    };

    // Endpoints: the backend's is not there for the portal.
    let endpoints = format!("/api/v1/app/{app}/endpoint");
    let (status, list) = as_portal(Method::GET, endpoints.clone(), None).await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(ids(&list), [customers.as_str()]);
    let (_, all) = server.call(Method::GET, &endpoints, None).await;
    assert_eq!(ids(&all).len(), 2, "the admin sees both: {all}");
    for (method, path, body) in [
        (Method::GET, format!("{endpoints}/{backends}"), None),
        (Method::GET, format!("{endpoints}/backend/secret"), None),
        (
            Method::PATCH,
            format!("{endpoints}/{backends}"),
            Some(json!({"url": "https://attacker.example/"})),
        ),
        (Method::DELETE, format!("{endpoints}/{backends}"), None),
        (
            Method::GET,
            format!("/api/v1/app/{app}/attempt/endpoint/{backends}"),
            None,
        ),
        // A PUT by its uid neither changes it nor says it exists.
        (
            Method::PUT,
            format!("{endpoints}/backend"),
            Some(json!({"url": "https://attacker.example/"})),
        ),
    ] {
        let what = format!("{method} {path}");
        let (status, body) = as_portal(method, path, body).await;
        assert_eq!(status, 404, "{what}: {body}");
    }
    for (method, path, body) in [
        (
            Method::POST,
            endpoints.clone(),
            json!({"url": "https://attacker.example/", "format": "pusher"}),
        ),
        (
            Method::PATCH,
            format!("{endpoints}/{customers}"),
            json!({"format": "pusher"}),
        ),
    ] {
        let what = format!("{method} {path}");
        let (status, body) = as_portal(method, path, Some(body)).await;
        assert_eq!(status, 403, "{what}: {body}");
        assert!(
            body["detail"]
                .as_str()
                .is_some_and(|d| d.contains("pusher-format")),
            "{what}: {body}"
        );
    }
    let (_, still) = server
        .call(Method::GET, &format!("{endpoints}/{backends}"), None)
        .await;
    assert_eq!(still["url"], "https://backend.example/pusher");

    // Messages: the channel webhooks are not there for the portal either.
    let messages = format!("/api/v1/app/{app}/msg");
    let (status, list) = as_portal(Method::GET, messages.clone(), None).await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(ids(&list), [order.as_str()]);
    let (_, all) = server.call(Method::GET, &messages, None).await;
    assert_eq!(ids(&all), [order.clone(), channel_webhook.clone()]);
    for path in [
        format!("{messages}/{channel_webhook}"),
        format!("/api/v1/app/{app}/attempt/msg/{channel_webhook}"),
    ] {
        let (status, body) = as_portal(Method::GET, path.clone(), None).await;
        assert_eq!(status, 404, "{path}: {body}");
    }
    let (status, body) = as_portal(Method::GET, format!("{messages}/{order}"), None).await;
    assert_eq!(status, 200, "{body}");
    // The customer's endpoint got both (it filters nothing): its list of messages leaves the
    // channel webhook out for the portal, as every list does.
    let delivered = format!("{endpoints}/{customers}/msg");
    let (status, list) = as_portal(Method::GET, delivered.clone(), None).await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(ids(&list), [order.as_str()], "{list}");
    let (_, all) = server.call(Method::GET, &delivered, None).await;
    assert_eq!(ids(&all).len(), 2, "the admin sees both: {all}");
    // Nor can it write one: a resend would sign it with the app's Pusher secret.
    let (status, body) = as_portal(
        Method::POST,
        messages.clone(),
        Some(json!({"eventType": "pusher.channel_webhook", "payload": {"events": []}})),
    )
    .await;
    assert_eq!(status, 403, "{body}");

    // A resend never crosses formats, whoever asks: a pusher endpoint gets only channel
    // webhooks (signed with the Pusher secret), a Standard one never gets them.
    for (msg, endpoint) in [(&order, &backends), (&channel_webhook, &customers)] {
        let (status, body) = server
            .call(
                Method::POST,
                &format!("{messages}/{msg}/endpoint/{endpoint}/resend"),
                None,
            )
            .await;
        assert_eq!(status, 400, "{msg} to {endpoint}: {body}");
        assert_eq!(body["code"], "wrong_format", "{body}");
    }
    let (status, body) = server
        .call(
            Method::POST,
            &format!("{messages}/{channel_webhook}/endpoint/{backends}/resend"),
            None,
        )
        .await;
    assert_eq!(
        status, 202,
        "a channel webhook to a pusher endpoint: {body}"
    );
    server.stop().await;
}

/// Every message writes a delivery per endpoint that wants it: an app's endpoints are
/// bounded (`api.max_endpoints_per_app`), by POST and by a PUT that would create one.
#[tokio::test]
async fn an_app_has_at_most_its_limit_of_endpoints() {
    let server = TestServer::start_with(|c| c.api.max_endpoints_per_app = 2).await;
    let app = server.create_app("endpoint-limit").await;
    let first = server
        .create_endpoint(&app, json!({"url": "https://example.com/1"}))
        .await;
    server
        .create_endpoint(&app, json!({"url": "https://example.com/2"}))
        .await;
    let endpoints = format!("/api/v1/app/{app}/endpoint");
    for (method, path) in [
        (Method::POST, endpoints.clone()),
        (Method::PUT, format!("{endpoints}/third")),
    ] {
        let (status, refused) = server
            .call(
                method.clone(),
                &path,
                Some(json!({"url": "https://example.com/3"})),
            )
            .await;
        assert_eq!(status, 400, "{method} {path}: {refused}");
        assert_eq!(refused["code"], "limit_reached", "{refused}");
        assert!(
            refused["detail"]
                .as_str()
                .is_some_and(|d| d.contains("api.max_endpoints_per_app")),
            "{refused}"
        );
    }
    let (status, _) = server
        .call(
            Method::PUT,
            &format!("{endpoints}/{}", first["id"].as_str().expect("id")),
            Some(json!({"url": "https://example.com/1b"})),
        )
        .await;
    assert_eq!(status, 200, "changing an endpoint is not making one");
    let (status, _) = server
        .call(
            Method::DELETE,
            &format!("{endpoints}/{}", first["id"].as_str().expect("id")),
            None,
        )
        .await;
    assert_eq!(status, 204);
    let (status, body) = server
        .call(
            Method::POST,
            &endpoints,
            Some(json!({"url": "https://example.com/3"})),
        )
        .await;
    assert_eq!(status, 201, "room again: {body}");
    server.stop().await;
}

/// No answer is sniffed as another type than it says (an error's text echoing the caller's
/// input stays text), and no management answer, which may carry a secret, is kept by a cache.
#[tokio::test]
async fn answers_are_never_sniffed_and_management_answers_never_cached() {
    let server = TestServer::start().await;
    let http = reqwest::Client::new();
    let app = server.create_app("headers").await;
    let management = http
        .get(format!("{}/api/v1/app/{app}", server.base))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("answered");
    assert_eq!(management.status(), 200);
    let headers = management.headers();
    assert_eq!(headers["cache-control"], "no-store");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    // A refusal too.
    let refused = http
        .get(format!("{}/api/v1/app/{app}", server.base))
        .send()
        .await
        .expect("answered");
    assert_eq!(refused.status(), 401);
    assert_eq!(refused.headers()["cache-control"], "no-store");
    // The other faces' answers are not sniffed either.
    for path in ["/health/live", "/apps/1/sse?channel=%20", "/no-such-route"] {
        let answer = http
            .get(format!("{}{path}", server.base))
            .send()
            .await
            .expect("answered");
        assert_eq!(
            answer.headers()["x-content-type-options"],
            "nosniff",
            "{path}: {}",
            answer.status()
        );
    }
    server.stop().await;
}

/// The Svix SDKs' raw payloads (`messageInRaw`, and the Java and Kotlin SDKs on every create)
/// send the body as `transformationsParams.rawPayload` with `payload` empty: that string is
/// the payload, delivered byte for byte; one that is not JSON, or not a string, is a 422 that
/// names it.
#[tokio::test]
async fn a_raw_payload_is_the_message_payload_byte_for_byte() {
    let server = TestServer::start().await;
    let mut receiver = Receiver::start().await;
    let app = server.create_app("raw-payload").await;
    server
        .create_endpoint(&app, json!({"url": receiver.url}))
        .await;
    let raw = r#"{"b": 2,   "a": [1, 2.50]}"#;
    let (status, created) = server
        .call(
            Method::POST,
            &format!("/api/v1/app/{app}/msg"),
            Some(json!({
                "eventType": "order.paid",
                "payload": "",
                "transformationsParams": {"rawPayload": raw},
            })),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["payload"], json!({"b": 2, "a": [1, 2.50]}));
    let delivery = receiver.next().await;
    assert_eq!(String::from_utf8_lossy(&delivery.body), raw);

    for (raw, says) in [
        (json!("not json"), "must hold JSON"),
        (json!("[1, 2]"), "payload must be a JSON object"),
        (json!({"a": 1}), "must be a string"),
    ] {
        let (status, refused) = server
            .call(
                Method::POST,
                &format!("/api/v1/app/{app}/msg"),
                Some(json!({
                    "eventType": "order.paid",
                    "payload": {},
                    "transformationsParams": {"rawPayload": raw},
                })),
            )
            .await;
        assert_eq!(status, 422, "{raw}: {refused}");
        assert!(refused.to_string().contains(says), "{raw}: {refused}");
    }
    server.stop().await;
}

/// A message whose `application` creates its app makes it under the path's name (`uid` left
/// out, or the same): one named otherwise is a 422, as Svix checks, not an app the path does
/// not name holding the message.
#[tokio::test]
async fn a_message_creates_its_app_under_the_paths_name_only() {
    let server = TestServer::start().await;
    let (status, refused) = server
        .call(
            Method::POST,
            "/api/v1/app/shop-a/msg",
            Some(json!({"eventType": "a.b", "payload": {}, "application": {"name": "A", "uid": "shop-b"}})),
        )
        .await;
    assert_eq!(status, 422, "{refused}");
    assert_eq!(
        refused["detail"][0]["loc"],
        json!(["body", "application", "uid"]),
        "{refused}"
    );
    for uid in ["shop-a", "shop-b"] {
        let (status, _) = server
            .call(Method::GET, &format!("/api/v1/app/{uid}"), None)
            .await;
        assert_eq!(status, 404, "{uid}: no app was made");
    }
    for application in [json!({"name": "A"}), json!({"name": "A", "uid": "shop-a"})] {
        let (status, created) = server
            .call(
                Method::POST,
                "/api/v1/app/shop-a/msg",
                Some(json!({"eventType": "a.b", "payload": {}, "application": application})),
            )
            .await;
        assert_eq!(status, 201, "{created}");
    }
    let (status, app) = server.call(Method::GET, "/api/v1/app/shop-a", None).await;
    assert_eq!(status, 200, "{app}");
    assert_eq!(app["uid"], "shop-a");
    server.stop().await;
}

/// `after` alone, as Svix reads it: the page is the `limit` rows right after that time (shown
/// newest first), and its `prevIterator` walks on towards the present, on the message list and
/// the attempt lists; rows from before the time are never shown; `before` or an iterator keep
/// the newest-first walk.
#[tokio::test]
async fn after_alone_starts_the_page_right_after_that_time() {
    let server = TestServer::start().await;
    let app = server.create_app("after-window").await;
    let mut receiver = Receiver::start().await;
    let endpoint = server
        .create_endpoint(&app, json!({"url": receiver.url, "uid": "polled"}))
        .await;
    let endpoint = endpoint["id"].as_str().expect("id").to_owned();
    let attempts_made = |count: usize| {
        let (server, app, endpoint) = (&server, &app, &endpoint);
        async move {
            eventually("the attempts logged", || async {
                let (_, list) = server
                    .call(
                        Method::GET,
                        &format!("/api/v1/app/{app}/attempt/endpoint/{endpoint}?limit=250"),
                        None,
                    )
                    .await;
                let data = list["data"].as_array().expect("data").clone();
                (data.len() == count).then_some(data)
            })
            .await
        }
    };
    let mut send = async |n: usize| {
        let sent = server
            .send(
                &app,
                json!({"eventType": "order.paid", "payload": {"n": n}}),
            )
            .await;
        receiver.next().await;
        // Each message in a millisecond (and an id step) of its own.
        let at: chrono::DateTime<chrono::Utc> = sent["timestamp"]
            .as_str()
            .expect("timestamp")
            .parse()
            .expect("time");
        while chrono::Utc::now() <= at + chrono::Duration::milliseconds(5) {
            tokio::task::yield_now().await;
        }
        sent
    };
    // Two before the time (their attempts too), five after.
    let mut since = chrono::DateTime::<chrono::Utc>::MIN_UTC;
    let mut early = Vec::new();
    for n in 0..2 {
        let sent = send(n).await;
        early.push(sent["id"].as_str().expect("id").to_owned());
        since = since.max(
            sent["timestamp"]
                .as_str()
                .expect("timestamp")
                .parse()
                .expect("time"),
        );
    }
    for attempt in attempts_made(2).await {
        since = since.max(
            attempt["timestamp"]
                .as_str()
                .expect("timestamp")
                .parse()
                .expect("time"),
        );
    }
    while chrono::Utc::now() <= since + chrono::Duration::milliseconds(1) {
        tokio::task::yield_now().await;
    }
    let mut ids = Vec::new();
    for n in 2..7 {
        ids.push(send(n).await["id"].as_str().expect("id").to_owned());
    }
    let later_attempts = attempts_made(7).await.len() - 2;
    assert_eq!(later_attempts, 5);
    let after = since.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);

    let field = |page: &Value, name: &str| -> Vec<String> {
        page["data"]
            .as_array()
            .expect("data")
            .iter()
            .map(|row| row[name].as_str().expect(name).to_owned())
            .collect()
    };
    // Walks `path` (with `after` alone) by `prevIterator` to the end: each page's rows.
    let walk = |path: String| {
        let server = &server;
        async move {
            let mut pages = Vec::new();
            let mut next = path.clone();
            loop {
                let (status, page) = server.call(Method::GET, &next, None).await;
                assert_eq!(status, 200, "{page}");
                let done = page["done"] == true;
                let prev = page["prevIterator"].as_str().map(str::to_owned);
                pages.push(page);
                match (done, prev) {
                    (false, Some(prev)) => next = format!("{path}&iterator={}", urlencode(&prev)),
                    _ => return pages,
                }
            }
        }
    };

    let messages = walk(format!(
        "/api/v1/app/{app}/msg?limit=2&after={}",
        urlencode(&after)
    ))
    .await;
    let pages: Vec<Vec<String>> = messages.iter().map(|page| field(page, "id")).collect();
    assert_eq!(
        pages,
        [
            vec![ids[1].clone(), ids[0].clone()],
            vec![ids[3].clone(), ids[2].clone()],
            vec![ids[4].clone()],
        ]
    );
    assert_eq!(messages[0]["done"], false);
    assert_eq!(messages[0]["iterator"], json!(ids[0]), "the page's oldest");

    for list in [
        format!("/api/v1/app/{app}/attempt/endpoint/polled?limit=2"),
        format!("/api/v1/app/{app}/endpoint/polled/msg?limit=2"),
    ] {
        let pages = walk(format!("{list}&after={}", urlencode(&after))).await;
        let key = if list.contains("/attempt/") {
            "msgId"
        } else {
            "id"
        };
        let mut seen: Vec<String> = pages.iter().flat_map(|page| field(page, key)).collect();
        assert_eq!(pages.len(), 3, "{list}: {pages:?}");
        seen.sort();
        let mut later = ids.clone();
        later.sort();
        assert_eq!(seen, later, "{list}: the five after the time, once each");
        // Oldest first from page to page: every row of a page is older than the next page's.
        let times: Vec<Vec<String>> = pages.iter().map(|p| field(p, "timestamp")).collect();
        for pair in times.windows(2) {
            let newest = pair[0].iter().max().expect("rows");
            assert!(pair[1].iter().all(|t| t >= newest), "{list}: {times:?}");
        }
    }

    // `before` close to the rows (the id window's other edge): the four made before the
    // third later one, newest first.
    let (_, third) = server
        .call(
            Method::GET,
            &format!("/api/v1/app/{app}/msg/{}", ids[2]),
            None,
        )
        .await;
    let before = third["timestamp"].as_str().expect("timestamp");
    let (_, older) = server
        .call(
            Method::GET,
            &format!("/api/v1/app/{app}/msg?before={}", urlencode(before)),
            None,
        )
        .await;
    assert_eq!(
        field(&older, "id"),
        [
            ids[1].clone(),
            ids[0].clone(),
            early[1].clone(),
            early[0].clone()
        ]
    );

    // Without `after`, the newest first.
    let (_, newest) = server
        .call(Method::GET, &format!("/api/v1/app/{app}/msg?limit=2"), None)
        .await;
    assert_eq!(field(&newest, "id"), [ids[4].clone(), ids[3].clone()]);
    server.stop().await;
}

fn urlencode(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// Svix's `endpoint.sendExample`: the event type's first schema example (or a ping), sent to
/// that endpoint only and answered without its payload; an event type without an example is
/// 400 `invalid_scheme`, an unknown one 404.
#[tokio::test]
async fn an_example_goes_to_its_endpoint_only() {
    let server = TestServer::start().await;
    let app = server.create_app("example-app").await;
    let mut tested = Receiver::start().await;
    let mut other = Receiver::start().await;
    let endpoint = server
        .create_endpoint(&app, json!({"url": tested.url, "uid": "tested"}))
        .await;
    let other_endpoint = server
        .create_endpoint(&app, json!({"url": other.url}))
        .await;
    let (status, _) = server
        .call(
            Method::POST,
            "/api/v1/event-type",
            Some(json!({
                "name": "order.paid",
                "description": "An order was paid",
                "schemas": {"1": {"type": "object", "examples": [{"order": 7, "paid": true}, {"order": 8}]}},
            })),
        )
        .await;
    assert_eq!(status, 201);
    let (status, _) = server
        .call(
            Method::POST,
            "/api/v1/event-type",
            Some(json!({"name": "order.bare", "description": "No schema"})),
        )
        .await;
    assert_eq!(status, 201);
    let path = format!("/api/v1/app/{app}/endpoint/tested/send-example");

    let (status, sent) = server
        .call(
            Method::POST,
            &path,
            Some(json!({"eventType": "order.paid"})),
        )
        .await;
    assert_eq!(status, 200, "{sent}");
    assert_eq!(sent["eventType"], "order.paid");
    assert_eq!(sent["payload"], json!({}), "{sent}");
    let delivery = tested.next().await;
    let body: Value = serde_json::from_slice(&delivery.body).expect("JSON");
    assert_eq!(body, json!({"order": 7, "paid": true}));
    assert_eq!(
        delivery.header("webhook-id"),
        sent["id"].as_str().expect("id")
    );

    let (status, ping) = server
        .call(Method::POST, &path, Some(json!({"eventType": "svix.ping"})))
        .await;
    assert_eq!(status, 200, "{ping}");
    let delivery = tested.next().await;
    let body: Value = serde_json::from_slice(&delivery.body).expect("JSON");
    assert_eq!(body, json!({"success": true}));

    // Svix's exampleIndex picks another example.
    let (status, second) = server
        .call(
            Method::POST,
            &path,
            Some(json!({"eventType": "order.paid", "exampleIndex": 1})),
        )
        .await;
    assert_eq!(status, 200, "{second}");
    let delivery = tested.next().await;
    let body: Value = serde_json::from_slice(&delivery.body).expect("JSON");
    assert_eq!(body, json!({"order": 8}));

    // Both were stored and attempted to the tested endpoint alone.
    for msg in [&sent, &ping] {
        let msg = msg["id"].as_str().expect("id");
        let (status, destinations) = server
            .call(
                Method::GET,
                &format!("/api/v1/app/{app}/msg/{msg}/endpoint"),
                None,
            )
            .await;
        assert_eq!(status, 200, "{destinations}");
        let ids: Vec<&Value> = destinations["data"]
            .as_array()
            .expect("data")
            .iter()
            .map(|d| &d["id"])
            .collect();
        assert_eq!(ids, [&endpoint["id"]], "{destinations}");
    }
    // An endpoint whose filters do not want the type gets nothing, though the message is kept.
    server
        .create_endpoint(
            &app,
            json!({"url": tested.url, "uid": "elsewhere", "filterTypes": ["order.shipped"]}),
        )
        .await;
    let (status, unwanted) = server
        .call(
            Method::POST,
            &format!("/api/v1/app/{app}/endpoint/elsewhere/send-example"),
            Some(json!({"eventType": "order.paid"})),
        )
        .await;
    assert_eq!(status, 200, "{unwanted}");
    let (_, destinations) = server
        .call(
            Method::GET,
            &format!(
                "/api/v1/app/{app}/msg/{}/endpoint",
                unwanted["id"].as_str().expect("id")
            ),
            None,
        )
        .await;
    assert_eq!(destinations["data"], json!([]), "{destinations}");
    server.settled(&app, "tested").await;
    let quiet = server
        .stats(&app, other_endpoint["id"].as_str().expect("id"))
        .await;
    assert_eq!(
        (&quiet["success"], &quiet["pending"], &quiet["fail"]),
        (&json!(0), &json!(0), &json!(0)),
        "{quiet}"
    );
    assert!(other.drain().is_empty());

    for (body, status, code) in [
        (json!({"eventType": "order.bare"}), 400, "invalid_scheme"),
        (
            json!({"eventType": "order.paid", "exampleIndex": 2}),
            400,
            "invalid_scheme",
        ),
        (json!({"eventType": "order.unknown"}), 404, "not_found"),
        (
            json!({"eventType": "order.paid", "payload": {}}),
            422,
            "validation",
        ),
    ] {
        let (got, error) = server.call(Method::POST, &path, Some(body.clone())).await;
        assert_eq!(got, status, "{body}: {error}");
        if status != 422 {
            assert_eq!(error["code"], code, "{error}");
        }
    }
    server.stop().await;
}

/// The attempt lists Svix deprecated, which older SDKs still call: a message's attempts, all
/// or to one endpoint (named by the path), as `attempt/msg/{msg_id}` lists them.
#[tokio::test]
async fn the_deprecated_attempt_lists_list_a_messages_attempts() {
    let server = TestServer::start().await;
    let app = server.create_app("old-lists").await;
    let mut first = Receiver::start().await;
    let mut second = Receiver::start().await;
    let one = server
        .create_endpoint(&app, json!({"url": first.url, "uid": "one"}))
        .await;
    let two = server
        .create_endpoint(&app, json!({"url": second.url}))
        .await;
    let msg = server
        .send(
            &app,
            json!({"eventType": "order.paid", "payload": {"n": 1}}),
        )
        .await;
    let msg = msg["id"].as_str().expect("id");
    first.next().await;
    second.next().await;
    let endpoints_of = |list: &Value| -> Vec<Value> {
        let mut ids: Vec<Value> = list["data"]
            .as_array()
            .expect("data")
            .iter()
            .map(|a| a["endpointId"].clone())
            .collect();
        ids.sort_by_key(|id| id.to_string());
        ids
    };
    let mut both = vec![one["id"].clone(), two["id"].clone()];
    both.sort_by_key(|id| id.to_string());
    let all = eventually("both attempts logged", || async {
        let (status, list) = server
            .call(
                Method::GET,
                &format!("/api/v1/app/{app}/msg/{msg}/attempt"),
                None,
            )
            .await;
        assert_eq!(status, 200, "{list}");
        (list["data"].as_array().map(Vec::len) == Some(2)).then_some(list)
    })
    .await;
    assert_eq!(endpoints_of(&all), both);
    assert_eq!(all["data"][0]["msgId"], msg);
    let (status, current) = server
        .call(
            Method::GET,
            &format!("/api/v1/app/{app}/attempt/msg/{msg}"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(current["data"], all["data"], "the same list as attempt/msg");
    let (status, to_one) = server
        .call(
            Method::GET,
            &format!("/api/v1/app/{app}/msg/{msg}/endpoint/one/attempt"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{to_one}");
    assert_eq!(endpoints_of(&to_one), [one["id"].clone()]);
    let (status, error) = server
        .call(
            Method::GET,
            &format!("/api/v1/app/{app}/msg/{msg}/endpoint/one/attempt?endpoint_id=one"),
            None,
        )
        .await;
    assert_eq!(status, 422, "{error}");
    let (status, _) = server
        .call(
            Method::GET,
            &format!("/api/v1/app/{app}/msg/{msg}/endpoint/ep_missing/attempt"),
            None,
        )
        .await;
    assert_eq!(status, 404);

    // Svix's attempt content expunge: that attempt's response reads `EXPUNGED`, the other's
    // is kept, and an attempt of another message (or none) is 404.
    let expunged = to_one["data"][0]["id"].as_str().expect("id");
    let content = format!("/api/v1/app/{app}/msg/{msg}/attempt/{expunged}/content");
    let (status, body) = server.call(Method::DELETE, &content, None).await;
    assert_eq!(status, 204, "{body}");
    let (_, after) = server
        .call(
            Method::GET,
            &format!("/api/v1/app/{app}/msg/{msg}/attempt?with_content=true"),
            None,
        )
        .await;
    for attempt in after["data"].as_array().expect("data") {
        let expected = if attempt["id"] == expunged {
            json!("EXPUNGED")
        } else {
            all["data"]
                .as_array()
                .expect("data")
                .iter()
                .find(|a| a["id"] == attempt["id"])
                .expect("listed before")["response"]
                .clone()
        };
        assert_eq!(attempt["response"], expected, "{attempt}");
    }
    let other = server
        .send(
            &app,
            json!({"eventType": "order.paid", "payload": {"n": 2}}),
        )
        .await;
    let other = other["id"].as_str().expect("id");
    for path in [
        format!("/api/v1/app/{app}/msg/{other}/attempt/{expunged}/content"),
        format!("/api/v1/app/{app}/msg/{msg}/attempt/atmpt_missing/content"),
    ] {
        let (status, error) = server.call(Method::DELETE, &path, None).await;
        assert_eq!(status, 404, "{path}: {error}");
    }
    server.stop().await;
}

/// `auth/logout` ends the app-scoped token that signs it (a portal link's, from the deprecated
/// `dashboard-access` here); an environment token cannot log out.
#[tokio::test]
async fn logout_ends_the_app_token_that_signs_it() {
    let server = TestServer::start().await;
    let app = server.create_app("logout-app").await;
    let (status, link) = server
        .call(
            Method::POST,
            &format!("/api/v1/auth/dashboard-access/{app}"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{link}");
    let token = link["token"].as_str().expect("token").to_owned();
    assert!(
        link["url"]
            .as_str()
            .expect("url")
            .ends_with(&format!("/console/portal#key={token}")),
        "{link}"
    );
    let read = format!("/api/v1/app/{app}/endpoint");
    let (status, _) = server
        .call_as(Some(&token), Method::GET, &read, None, None)
        .await;
    assert_eq!(status, 200, "the link's token works");
    let (status, error) = server.call(Method::POST, "/api/v1/auth/logout", None).await;
    assert_eq!(status, 403, "{error}");
    let (status, body) = server
        .call_as(
            Some(&token),
            Method::POST,
            "/api/v1/auth/logout",
            None,
            None,
        )
        .await;
    assert_eq!(status, 204, "{body}");
    let (status, _) = server
        .call_as(Some(&token), Method::GET, &read, None, None)
        .await;
    assert_eq!(status, 401, "a logged-out token opens nothing");
    let (status, _) = server.call(Method::GET, &read, None).await;
    assert_eq!(status, 200, "the admin token still works");
    // An app's own token logs out too.
    let (status, minted) = server
        .call(
            Method::POST,
            "/api/v1/auth/token",
            Some(json!({"name": "backend", "appId": app})),
        )
        .await;
    assert_eq!(status, 201, "{minted}");
    let token = minted["token"].as_str().expect("token");
    let (status, _) = server
        .call_as(Some(token), Method::POST, "/api/v1/auth/logout", None, None)
        .await;
    assert_eq!(status, 204);
    let (status, _) = server
        .call_as(Some(token), Method::GET, &read, None, None)
        .await;
    assert_eq!(status, 401);
    server.stop().await;
}

/// Endpoint stats take Svix's `since` and `until`: the deliveries of the messages created
/// within them; `since` after `until` is 400 `invalid_range`, a bad time a 422.
#[tokio::test]
async fn endpoint_stats_count_the_window_asked_for() {
    let server = TestServer::start().await;
    let app = server.create_app("stats-window").await;
    let mut receiver = Receiver::start().await;
    server
        .create_endpoint(&app, json!({"url": receiver.url, "uid": "counted"}))
        .await;
    let before = chrono::Utc::now() - chrono::Duration::seconds(1);
    let mut sent_at = Vec::new();
    for n in 0..3 {
        let sent = server
            .send(
                &app,
                json!({"eventType": "order.paid", "payload": {"n": n}}),
            )
            .await;
        receiver.next().await;
        let at: chrono::DateTime<chrono::Utc> = sent["timestamp"]
            .as_str()
            .expect("timestamp")
            .parse()
            .expect("time");
        sent_at.push(at);
        // Ids hold time in steps of 4 ms: messages 10 ms apart fall in different steps.
        while chrono::Utc::now() <= at + chrono::Duration::milliseconds(10) {
            tokio::task::yield_now().await;
        }
    }
    server.settled(&app, "counted").await;
    let after = chrono::Utc::now() + chrono::Duration::seconds(1);
    let at = |t: chrono::DateTime<chrono::Utc>| {
        urlencode(&t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
    };
    let second = sent_at[1] - chrono::Duration::milliseconds(1);
    let third = sent_at[2] - chrono::Duration::milliseconds(1);
    let stats = format!("/api/v1/app/{app}/endpoint/counted/stats");
    for (query, success) in [
        (String::new(), 3),
        (format!("?since={}", at(before)), 3),
        (format!("?since={}&until={}", at(before), at(after)), 3),
        (format!("?since={}", at(after)), 0),
        (format!("?until={}", at(before)), 0),
        // Cutting through them: from the second on, and before it.
        (format!("?since={}", at(second)), 2),
        (format!("?until={}", at(second)), 1),
        (format!("?since={}&until={}", at(second), at(third)), 1),
    ] {
        let (status, counted) = server
            .call(Method::GET, &format!("{stats}{query}"), None)
            .await;
        assert_eq!(status, 200, "{query}: {counted}");
        assert_eq!(counted["success"], success, "{query}: {counted}");
    }
    let (status, error) = server
        .call(
            Method::GET,
            &format!("{stats}?since={}&until={}", at(after), at(before)),
            None,
        )
        .await;
    assert_eq!((status, &error["code"]), (400, &json!("invalid_range")));
    let (status, _) = server
        .call(Method::GET, &format!("{stats}?since=yesterday"), None)
        .await;
    assert_eq!(status, 422);
    server.stop().await;
}
