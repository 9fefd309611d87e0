//! Credentials on every route: the route table (`herald_api::route_list`, the list the
//! routers are built from) walked route by route, and the tokens API that mints, lists, scopes,
//! expires and revokes bearer tokens.

use reqwest::Method;
use serde_json::{Value, json};

use crate::{
    harness::{ADMIN_TOKEN, TestServer, eventually},
    ingest::{now, source, stripe_header},
    pusher::{Creds, pusher_app},
};
use herald_api::{Access, Route};

/// What a request carries to prove who sent it.
#[derive(Clone, Copy)]
enum Credential<'a> {
    None,
    /// An `Authorization` header that is not `Bearer <token>`.
    Malformed,
    Bearer(&'a str),
}

/// Sends `method path` (a JSON `{}` body on methods that take one) with `credential`; the
/// status and the body as text.
async fn send(
    server: &TestServer,
    method: &Method,
    path: &str,
    credential: Credential<'_>,
) -> (u16, String) {
    let mut request =
        crate::harness::http_client().request(method.clone(), format!("{}{path}", server.base));
    request = match credential {
        Credential::None => request,
        Credential::Malformed => request.header("authorization", format!("Basic {ADMIN_TOKEN}")),
        Credential::Bearer(token) => request.bearer_auth(token),
    };
    if [Method::POST, Method::PUT, Method::PATCH].contains(method) {
        request = request.json(&json!({}));
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    let is_stream = response
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if is_stream {
        // An admitted stream (the live tail) never ends: its status is the answer.
        return (status, String::new());
    }
    (status, response.text().await.expect("body"))
}

/// The route's pattern with its parameters filled in: `app` for `{app_id}` (an app id, or a
/// numeric Pusher app id on the Pusher routes), syntactically valid made-up values elsewhere.
fn fill(route: &Route, app: &str, source: &str) -> String {
    route
        .path
        .split('/')
        .map(|segment| match segment {
            "{app_id}" => app,
            "{source_id}" => source,
            "{endpoint_id}" => "ep_2AbsentEndpoint",
            "{msg_id}" => "msg_2AbsentMessage",
            "{attempt_id}" => "atmpt_2AbsentAttempt",
            "{event_id}" => "inev_2AbsentEvent",
            "{token_id}" => "tok_2AbsentToken",
            "{name}" => "absent.event",
            "{channel}" => "absent-channel",
            "{user_id}" => "absent-user",
            "{*file}" => "style.css",
            other => {
                assert!(
                    !other.starts_with('{'),
                    "{} has a parameter this test cannot fill: add it to `fill`",
                    route.path
                );
                other
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// Creates a token through the API as the admin; its secret and id.
async fn mint(server: &TestServer, body: Value) -> (String, String) {
    let (status, token) = server
        .call(Method::POST, "/api/v1/auth/token", Some(body))
        .await;
    assert_eq!(status, 201, "{token}");
    (
        token["token"].as_str().expect("token").to_owned(),
        token["id"].as_str().expect("id").to_owned(),
    )
}

fn refused_as_unauthenticated(what: &str, (status, body): &(u16, String)) {
    assert_eq!(*status, 401, "{what}: {body}");
}

#[tokio::test]
async fn every_route_in_the_table_refuses_missing_malformed_wrong_revoked_expired_and_other_app_credentials()
 {
    // The walk fails authentication hundreds of times from one address: the limit on that
    // is tested on its own (below).
    let server = TestServer::start_with(|c| c.api.auth_failures_per_second_per_ip = 0).await;
    let (app_a, creds_a) = pusher_app(&server, "auth-walk-a").await;
    let (app_b, creds_b) = pusher_app(&server, "auth-walk-b").await;
    let stripe_secret = "whsec_auth_walk_secret";
    let src = source(
        &server,
        &app_a,
        json!({"kind": "stripe", "secrets": [stripe_secret]}),
    )
    .await;
    let source_id = src["id"].as_str().expect("source id").to_owned();

    let (token_a, _) = mint(&server, json!({"name": "app A", "appId": app_a})).await;
    let (token_b, _) = mint(&server, json!({"name": "app B", "appId": app_b})).await;
    // An app portal link's token for app A: its endpoints and messages, not the app's own.
    let (status, link) = server
        .call(
            Method::POST,
            &format!("/api/v1/auth/app-portal-access/{app_a}"),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, 200, "{link}");
    let portal = link["token"].as_str().expect("token").to_owned();
    let (revoked, revoked_id) = mint(&server, json!({"name": "to revoke"})).await;
    let (status, _) = server
        .call(
            Method::DELETE,
            &format!("/api/v1/auth/token/{revoked_id}"),
            None,
        )
        .await;
    assert_eq!(status, 204);
    let expires_at = chrono::Utc::now() + chrono::Duration::milliseconds(1500);
    let (expired, _) = mint(
        &server,
        json!({"name": "short-lived", "expiresAt": expires_at.to_rfc3339()}),
    )
    .await;
    eventually("the short-lived token expires", || async {
        let (status, body) = send(
            &server,
            &Method::GET,
            "/api/v1/app",
            Credential::Bearer(&expired),
        )
        .await;
        (status == 401 && body.contains("expired")).then_some(())
    })
    .await;

    let routes = herald_api::route_list();
    assert!(
        routes.len() > 50,
        "the whole table: {} routes",
        routes.len()
    );
    let mut walked = 0;
    for route in &routes {
        let what = format!("{} {}", route.method, route.path);
        let method = &route.method;
        match route.access {
            Access::AnyToken
            | Access::AppToken
            | Access::AppAdmin
            | Access::EnvironmentToken
            | Access::AppScopedToken => {
                let path = fill(route, &app_a, &source_id);
                for (credential, expected) in [
                    (Credential::None, "missing Authorization header"),
                    (Credential::Malformed, "must be `Bearer <token>`"),
                    (Credential::Bearer("hrld_wrong"), "invalid API token"),
                    (Credential::Bearer(&revoked), "invalid API token"),
                    (Credential::Bearer(&expired), "expired"),
                ] {
                    let answer = send(&server, method, &path, credential).await;
                    refused_as_unauthenticated(&what, &answer);
                    assert!(answer.1.contains(expected), "{what}: {}", answer.1);
                }
                if route.access == Access::AppScopedToken {
                    // About the token itself (a logout): any app-scoped token passes, and
                    // would end itself, so the walk checks only that the admin's is refused.
                    let (status, body) =
                        send(&server, method, &path, Credential::Bearer(ADMIN_TOKEN)).await;
                    assert_eq!(status, 403, "{what} with the admin token: {body}");
                    walked += 1;
                    continue;
                }
                // Another app's token: the app in the path is not there for it.
                let (status, body) =
                    send(&server, method, &path, Credential::Bearer(&token_b)).await;
                match route.access {
                    Access::AppToken | Access::AppAdmin => assert!(
                        (status == 404 && body.contains("application not found")) || status == 403,
                        "{what} with another app's token: {status} {body}"
                    ),
                    Access::EnvironmentToken => {
                        assert_eq!(status, 403, "{what} with an app's token: {body}");
                    }
                    _ => assert!(
                        status != 401 && status != 403,
                        "{what} is open to any token: {status} {body}"
                    ),
                }
                // The portal link's token: refused on the app's own routes and the
                // environment's, before anything is read or changed.
                if matches!(route.access, Access::AppAdmin | Access::EnvironmentToken) {
                    let (status, body) =
                        send(&server, method, &path, Credential::Bearer(&portal)).await;
                    assert_eq!(status, 403, "{what} with a portal link's token: {body}");
                } else if *method == Method::GET {
                    let (status, body) =
                        send(&server, method, &path, Credential::Bearer(&portal)).await;
                    assert!(
                        status != 401 && status != 403 && !body.contains("application not found"),
                        "{what} with a portal link's token: {status} {body}"
                    );
                }
                // The right credentials pass the door (whatever the made-up ids then find).
                // Reads only, so the walk changes nothing: an app's own token on its reads, the
                // admin token everywhere (on a missing app, where writes change nothing).
                if *method == Method::GET && route.access != Access::EnvironmentToken {
                    let (status, body) =
                        send(&server, method, &path, Credential::Bearer(&token_a)).await;
                    assert!(
                        status != 401 && status != 403 && !body.contains("application not found"),
                        "{what} with its app's token: {status} {body}"
                    );
                }
                let absent = fill(route, "app_2AbsentApplication", &source_id);
                let (status, body) =
                    send(&server, method, &absent, Credential::Bearer(ADMIN_TOKEN)).await;
                assert!(
                    status != 401 && status != 403,
                    "{what} with the admin token: {status} {body}"
                );
            }
            Access::PusherSignature => {
                let path = fill(route, &creds_a.id, &source_id);
                pusher_route_refuses(&server, &what, method, &path, &creds_a, &creds_b).await;
            }
            Access::ProviderSignature => {
                let path = fill(route, &app_a, &source_id);
                let body = br#"{"id":"evt_1","type":"payment_intent.succeeded"}"#;
                let t = now();
                let cases: [(&str, Vec<(&str, String)>); 4] = [
                    ("missing", vec![]),
                    ("malformed", vec![("stripe-signature", "v1".to_owned())]),
                    ("wrong", vec![stripe_header("whsec_wrong", body, t)]),
                    (
                        "a bearer token instead",
                        vec![("authorization", format!("Bearer {ADMIN_TOKEN}"))],
                    ),
                ];
                for (case, headers) in cases {
                    let mut request = crate::harness::http_client()
                        .post(format!("{}{path}", server.base))
                        .header("content-type", "application/json")
                        .body(body.to_vec());
                    for (name, value) in headers {
                        request = request.header(name, value);
                    }
                    let response = request.send().await.expect("request");
                    assert_eq!(response.status().as_u16(), 401, "{what}, {case} signature");
                }
                let response = crate::harness::http_client()
                    .post(format!("{}{path}", server.base))
                    .header("content-type", "application/json")
                    .header(
                        stripe_header(stripe_secret, body, t).0,
                        stripe_header(stripe_secret, body, t).1,
                    )
                    .body(body.to_vec())
                    .send()
                    .await
                    .expect("request");
                assert_eq!(
                    response.status().as_u16(),
                    200,
                    "{what}, signed by its provider"
                );
            }
            Access::ChannelToken => {
                let path = fill(route, &creds_a.id, &source_id);
                channel_route_refuses(&server, &what, &path, &creds_a, &creds_b).await;
            }
            Access::Public => {
                let path = fill(route, &app_a, &source_id);
                let (status, body) = send(&server, method, &path, Credential::None).await;
                assert!(
                    (200..300).contains(&status),
                    "{what} needs no credentials: {status} {body}"
                );
            }
        }
        walked += 1;
    }
    assert_eq!(walked, routes.len());
    server.stop().await;
}

/// An address that keeps failing authentication (unknown tokens, wrong Pusher signatures) is
/// refused with 429 on every credentialed route, its credentials unread, until its next
/// failure is due; the admin token still passes, and so does everyone once the wait is over.
#[tokio::test]
async fn an_address_that_keeps_failing_authentication_is_refused_until_its_next_failure_is_due() {
    let server = TestServer::start_with(|c| {
        c.api.auth_failures_per_second_per_ip = 1;
        c.api.auth_failure_burst_per_ip = 3;
    })
    .await;
    let (app, creds) = pusher_app(&server, "auth-failures").await;
    let (token, _) = mint(&server, json!({"name": "good", "appId": app})).await;
    // Refusals that guess nothing are not counted: requests signed with the secret but stale
    // (a backend with a skewed clock), and a body that is not the one signed (its hash is
    // checked after the signature). More of them than the burst, and a good one still passes.
    // Signed with the secret: `method` of `path` with `body`, `ago` seconds ago.
    let signed = |method: &str, path: &str, body: &str, ago: i64| {
        herald_core::pusher::sign_request(
            &creds.key,
            &creds.secret,
            method,
            path,
            &[],
            body.as_bytes(),
            chrono::Utc::now().timestamp() - ago,
        )
    };
    let channels = format!("/apps/{}/channels", creds.id);
    let stale = signed("GET", &channels, "", 700);
    let events = format!("/apps/{}/events", creds.id);
    let signed_body = json!({"name": "e", "channel": "c", "data": "{}"}).to_string();
    let other_body = json!({"name": "e", "channel": "c", "data": "{\"x\":1}"}).to_string();
    let body_signed = signed("POST", &events, &signed_body, 0);
    for _ in 0..3 {
        let status = send_pusher(&server, &Method::GET, &channels, &stale, "", None).await;
        assert_eq!(status, 401, "stale");
        let status = send_pusher(
            &server,
            &Method::POST,
            &events,
            &body_signed,
            &other_body,
            None,
        )
        .await;
        assert_eq!(status, 401, "another body");
    }
    let fresh = signed("GET", &channels, "", 0);
    assert_eq!(
        send_pusher(&server, &Method::GET, &channels, &fresh, "", None).await,
        200,
        "none of them was counted"
    );
    let bearer = |token: &str| {
        crate::harness::http_client()
            .get(format!("{}/api/v1/app/{app}", server.base))
            .bearer_auth(token)
            .send()
    };
    // The burst of three: each guess is looked up and answered 401 (from the second on, the
    // address is a suspect and pays before its lookup); the fourth finds nothing left to pay
    // with and is refused unread.
    for attempt in 0..3 {
        let response = bearer("hrld_guessed").await.expect("request");
        assert_eq!(response.status().as_u16(), 401, "guess {attempt}");
    }
    let response = bearer("hrld_guessed").await.expect("request");
    assert_eq!(response.status().as_u16(), 429, "the fourth guess");
    let refused = bearer(&token).await.expect("request");
    assert_eq!(
        refused.status().as_u16(),
        429,
        "the address is out of failures: even a good token waits"
    );
    assert_eq!(
        refused.headers().get("retry-after").map(|v| v.as_bytes()),
        Some(&b"1"[..])
    );
    let body: Value = refused.json().await.expect("json");
    assert_eq!(body["code"], "rate_limited", "{body}");
    assert!(
        body["detail"]
            .as_str()
            .is_some_and(|d| d.contains("too many failed authentications from this address")),
        "{body}"
    );
    let signed_path = format!("/apps/{}/channels", creds.id);
    // A GET of the app's channels, signed with `secret`: its status.
    let channels_signed_with = |secret: &str| {
        let params = herald_core::pusher::sign_request(
            &creds.key,
            secret,
            "GET",
            &signed_path,
            &[],
            b"",
            chrono::Utc::now().timestamp(),
        );
        let (server, path) = (&server, &signed_path);
        async move { send_pusher(server, &Method::GET, path, &params, "", None).await }
    };
    let secret = creds.secret.as_str();
    assert_eq!(
        channels_signed_with(secret).await,
        429,
        "Pusher signatures wait too"
    );
    let (status, _) = server.call(Method::GET, "/api/v1/app", None).await;
    assert_eq!(status, 200, "the admin token is compared first and passes");

    eventually("the address may present credentials again", || async {
        let response = bearer(&token).await.expect("request");
        (response.status().as_u16() == 200).then_some(())
    })
    .await;
    // Wrong Pusher signatures count as failures too: more than a burst of them, and the
    // address is refused again.
    for _ in 0..4 {
        let status = channels_signed_with("not-the-secret").await;
        assert!(status == 401 || status == 429, "{status}");
        if status == 429 {
            break;
        }
    }
    assert_eq!(
        channels_signed_with(secret).await,
        429,
        "refused after wrong signatures"
    );
    eventually("the Pusher API opens again", || async {
        (channels_signed_with(secret).await == 200).then_some(())
    })
    .await;

    let metrics = crate::harness::http_client()
        .get(format!("{}/metrics", server.base))
        .bearer_auth(crate::harness::ADMIN_TOKEN)
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("body");
    let refusals: u64 = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("herald_limits_hit_total{limit=\"auth_failures_per_address\"} ")
        })
        .and_then(|v| v.trim().parse().ok())
        .expect("the refusals are counted");
    assert!(refusals >= 2, "{refusals} refusals counted");
    server.stop().await;
}

/// A Pusher HTTP API route: only a request signed with the key and secret of the app in the
/// path gets through.
async fn pusher_route_refuses(
    server: &TestServer,
    what: &str,
    method: &Method,
    path: &str,
    own: &Creds,
    other: &Creds,
) {
    let body = if *method == Method::POST {
        r#"{"name":"e","channel":"c","data":"{}"}"#.to_owned()
    } else {
        String::new()
    };
    let signed = |creds: &Creds, secret: &str| {
        herald_core::pusher::sign_request(
            &creds.key,
            secret,
            method.as_str(),
            path,
            &[],
            body.as_bytes(),
            chrono::Utc::now().timestamp(),
        )
    };
    let mut malformed = signed(own, &own.secret);
    for (name, value) in &mut malformed {
        if name == "auth_timestamp" {
            *value = "yesterday".to_owned();
        }
    }
    let cases = [
        ("missing", Vec::new(), None),
        ("malformed", malformed, None),
        ("wrong", signed(own, "not-the-secret"), None),
        ("another app's", signed(other, &other.secret), None),
        ("a bearer token instead", Vec::new(), Some(ADMIN_TOKEN)),
    ];
    for (case, params, bearer) in cases {
        let status = send_pusher(server, method, path, &params, &body, bearer).await;
        assert_eq!(status, 401, "{what}, {case} signature");
    }
    let status = send_pusher(server, method, path, &signed(own, &own.secret), &body, None).await;
    assert!(
        status != 401 && status != 403,
        "{what}, signed with its app's credentials: {status}"
    );
}

async fn send_pusher(
    server: &TestServer,
    method: &Method,
    path: &str,
    params: &[(String, String)],
    body: &str,
    bearer: Option<&str>,
) -> u16 {
    let mut url = url::Url::parse(&format!("{}{path}", server.base)).expect("url");
    url.query_pairs_mut().extend_pairs(params);
    let mut request = crate::harness::http_client()
        .request(method.clone(), url)
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(token) = bearer {
        request = request.bearer_auth(token);
    }
    request.send().await.expect("request").status().as_u16()
}

/// The SSE route: public channels are open; a private channel needs a token signed with the
/// Pusher secret of the app in the path.
async fn channel_route_refuses(
    server: &TestServer,
    what: &str,
    path: &str,
    own: &Creds,
    other: &Creds,
) {
    let expires = chrono::Utc::now().timestamp() + 60;
    let channel = "private-walk";
    let status = |query: String, bearer: Option<&str>| {
        let mut request =
            crate::harness::http_client().get(format!("{}{path}?{query}", server.base));
        if let Some(token) = bearer {
            request = request.bearer_auth(token);
        }
        async move { request.send().await.expect("request").status().as_u16() }
    };
    let other_token = herald_core::pusher::sse_token(&other.secret, channel, expires);
    let cases = [
        ("missing", format!("channels={channel}"), None),
        (
            "malformed",
            format!("channels={channel}&token=not-a-token"),
            None,
        ),
        (
            "wrong",
            format!(
                "channels={channel}&token={}",
                herald_core::pusher::sse_token("not-the-secret", channel, expires)
            ),
            None,
        ),
        (
            "another app's",
            format!("channels={channel}&token={other_token}"),
            None,
        ),
        (
            "a bearer token instead",
            format!("channels={channel}"),
            Some(ADMIN_TOKEN),
        ),
    ];
    for (case, query, bearer) in cases {
        assert_eq!(status(query, bearer).await, 401, "{what}, {case} token");
    }
    let own_token = herald_core::pusher::sse_token(&own.secret, channel, expires);
    assert_eq!(
        status(format!("channels={channel}&token={own_token}"), None).await,
        200,
        "{what}, with its app's token"
    );
    assert_eq!(
        status("channels=public-walk".to_owned(), None).await,
        200,
        "{what}, a public channel"
    );
}

#[tokio::test]
async fn tokens_are_minted_once_listed_without_their_secret_scoped_and_revoked() {
    let server = TestServer::start().await;
    let app = server.create_app("tokens-a").await;
    let other = server.create_app("tokens-b").await;

    let (status, created) = server
        .call(
            Method::POST,
            "/api/v1/auth/token",
            Some(json!({"name": "billing backend", "appId": "tokens-a"})),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let secret = created["token"].as_str().expect("token").to_owned();
    assert!(secret.starts_with("hrld_"), "{secret}");
    assert_eq!(
        created["appId"],
        app.as_str(),
        "a uid names the app; the id is kept"
    );
    assert_eq!(created["name"], "billing backend");
    assert!(created["expiresAt"].is_null());
    let id = created["id"].as_str().expect("id").to_owned();

    // The scoped token works on its app and nowhere else.
    let (status, listed) = server
        .call_as(Some(&secret), Method::GET, "/api/v1/app", None, None)
        .await;
    assert_eq!(status, 200, "{listed}");
    let ids: Vec<&str> = listed["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|a| a["id"].as_str())
        .collect();
    assert_eq!(ids, [app.as_str()], "an app's token lists only its app");
    let (status, _) = server
        .call_as(
            Some(&secret),
            Method::GET,
            &format!("/api/v1/app/{other}"),
            None,
            None,
        )
        .await;
    assert_eq!(status, 404);
    let (status, refused) = server
        .call_as(
            Some(&secret),
            Method::POST,
            "/api/v1/auth/token",
            Some(json!({"name": "successor"})),
            None,
        )
        .await;
    assert_eq!(status, 403, "an app's token cannot mint tokens: {refused}");

    // Listed (all, or one app's) and read back without the secret.
    let (status, all) = server.call(Method::GET, "/api/v1/auth/token", None).await;
    assert_eq!(status, 200, "{all}");
    let entry = all["data"]
        .as_array()
        .expect("data")
        .iter()
        .find(|t| t["id"] == id.as_str())
        .expect("the new token is listed")
        .clone();
    assert!(
        entry.get("token").is_none(),
        "a listing never shows a secret: {entry}"
    );
    assert!(!all.to_string().contains(&secret));
    let (status, mine) = server
        .call(
            Method::GET,
            &format!("/api/v1/auth/token?appId={other}"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        mine["data"],
        json!([]),
        "no token is scoped to the other app"
    );
    let (status, one) = server
        .call(Method::GET, &format!("/api/v1/auth/token/{id}"), None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(one, entry);

    // Bad input names its field; unknown tokens and apps are 404.
    for (body, field) in [
        (json!({"name": ""}), "name"),
        (
            json!({"name": "x", "expiresAt": "2001-01-01T00:00:00Z"}),
            "expiresAt",
        ),
        (json!({"name": "x", "scope": "all"}), "scope"),
    ] {
        let (status, error) = server
            .call(Method::POST, "/api/v1/auth/token", Some(body.clone()))
            .await;
        assert_eq!(status, 422, "{body}: {error}");
        assert!(error.to_string().contains(field), "{body}: {error}");
    }
    let (status, _) = server
        .call(
            Method::POST,
            "/api/v1/auth/token",
            Some(json!({"name": "x", "appId": "no-such-app"})),
        )
        .await;
    assert_eq!(status, 404);
    for path in [
        "/api/v1/auth/token/tok_2Absent",
        "/api/v1/auth/token/not-an-id",
    ] {
        let (status, _) = server.call(Method::DELETE, path, None).await;
        assert_eq!(status, 404, "{path}");
    }

    // Revoked: refused from the next request on, and gone from the list.
    let (status, _) = server
        .call(Method::DELETE, &format!("/api/v1/auth/token/{id}"), None)
        .await;
    assert_eq!(status, 204);
    let (status, body) = server
        .call_as(Some(&secret), Method::GET, "/api/v1/app", None, None)
        .await;
    assert_eq!(status, 401, "{body}");
    let (_, all) = server.call(Method::GET, "/api/v1/auth/token", None).await;
    assert!(!all.to_string().contains(&id));
    server.stop().await;
}
