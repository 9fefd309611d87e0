//! The operator's commands (`herald app`, `endpoint`, `send`, `listen`, `replay`, `doctor`,
//! `completions`): the real binary against a live server.

use std::{process::Stdio, time::Duration};

use reqwest::Method;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::Command,
};

use crate::{
    delivery::signature_valid,
    harness::{ADMIN_TOKEN, Receiver, Reply, TestServer, eventually},
};

/// The binary, pointed at `server` with the admin token, and nothing from the environment
/// that could point it elsewhere.
fn herald(server: &TestServer) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_herald"));
    command
        .env("HERALD_URL", &server.base)
        .env("HERALD_TOKEN", ADMIN_TOKEN)
        .env("HERALD_CLI_CONFIG", "")
        .env("XDG_CONFIG_HOME", "/nonexistent")
        .env_remove("HERALD_LISTEN_SECRET")
        .kill_on_drop(true);
    command
}

/// Runs a command to its end: its exit status, standard output and standard error.
async fn run(mut command: Command, args: &[&str]) -> (bool, String, String) {
    let output = tokio::time::timeout(Duration::from_secs(60), command.args(args).output())
        .await
        .expect("the command ended within a minute")
        .expect("the command ran");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Runs a command that must succeed and print JSON.
async fn json_of(server: &TestServer, args: &[&str]) -> Value {
    let (ok, out, err) = run(herald(server), args).await;
    assert!(ok, "herald {args:?} failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("herald {args:?} printed {out:?}: {e}"))
}

#[tokio::test]
async fn apps_and_endpoints_are_managed_and_events_sent_from_the_command_line() {
    let server = TestServer::start().await;
    let mut receiver = Receiver::start().await;

    let app = json_of(
        &server,
        &["app", "create", "Shop", "--uid", "shop", "--json"],
    )
    .await;
    let app_id = app["id"].as_str().expect("app id").to_owned();
    assert!(app["pusher"]["secret"].is_string(), "{app}");
    let listed = json_of(&server, &["app", "list", "--json"]).await;
    assert!(
        listed
            .as_array()
            .expect("a list")
            .iter()
            .any(|a| a["id"] == app_id.as_str()),
        "{listed}"
    );
    let credentials = json_of(&server, &["app", "credentials", "shop", "--json"]).await;
    assert_eq!(credentials["pusher"], app["pusher"]);
    // The table names each credential.
    let (ok, table, _) = run(herald(&server), &["app", "credentials", "shop"]).await;
    assert!(ok);
    assert!(
        table.contains("pusher key") && table.contains(&app_id),
        "{table}"
    );

    let endpoint = json_of(
        &server,
        &[
            "endpoint",
            "add",
            "shop",
            &receiver.url,
            "--event-type",
            "order.paid",
            "--json",
        ],
    )
    .await;
    let endpoint_id = endpoint["id"].as_str().expect("endpoint id").to_owned();
    let secret = endpoint["secret"].as_str().expect("secret").to_owned();
    assert_eq!(endpoint["filterTypes"], json!(["order.paid"]));

    let sent = json_of(
        &server,
        &[
            "send",
            "shop",
            "order.paid",
            "--data",
            r#"{"id": 7}"#,
            "--json",
        ],
    )
    .await;
    let delivery = receiver.next().await;
    assert_eq!(
        delivery.header("webhook-id"),
        sent["id"].as_str().expect("id")
    );
    assert!(
        signature_valid(&secret, &delivery),
        "signed with the printed secret"
    );
    assert_eq!(
        serde_json::from_slice::<Value>(&delivery.body).expect("json"),
        json!({"id": 7})
    );

    let listed = json_of(&server, &["endpoint", "list", "shop", "--json"]).await;
    assert_eq!(listed[0]["id"], endpoint_id.as_str());
    let stats = eventually("the delivery counted", || async {
        let listed = json_of(&server, &["endpoint", "list", "shop", "--json"]).await;
        (listed[0]["stats"]["success"] == 1).then_some(listed[0]["stats"].clone())
    })
    .await;
    assert_eq!(stats["fail"], 0);

    let rotated = json_of(
        &server,
        &["endpoint", "rotate-secret", "shop", &endpoint_id, "--json"],
    )
    .await;
    let new_secret = rotated["key"].as_str().expect("new secret").to_owned();
    assert_ne!(new_secret, secret);
    json_of(&server, &["send", "shop", "order.paid", "--json"]).await;
    let delivery = receiver.next().await;
    assert!(
        signature_valid(&new_secret, &delivery),
        "signed with the new secret"
    );

    let disabled = json_of(
        &server,
        &["endpoint", "disable", "shop", &endpoint_id, "--json"],
    )
    .await;
    assert_eq!(disabled["disabled"], true);
    let (ok, table, _) = run(herald(&server), &["endpoint", "list", "shop"]).await;
    assert!(ok && table.contains("disabled"), "{table}");
    json_of(
        &server,
        &["endpoint", "enable", "shop", &endpoint_id, "--json"],
    )
    .await;

    // Bad input is refused with words, before and at the server.
    let (ok, _, err) = run(
        herald(&server),
        &["send", "shop", "order.paid", "--data", "[1]"],
    )
    .await;
    assert!(!ok);
    assert!(err.contains("must be a JSON object"), "{err}");
    let (ok, _, err) = run(herald(&server), &["app", "list", "--token", "wrong"]).await;
    assert!(!ok);
    assert!(
        err.contains("401") && err.contains("--token or HERALD_TOKEN"),
        "{err}"
    );
    let (ok, _, err) = run(herald(&server), &["app", "credentials", "nope"]).await;
    assert!(!ok);
    assert!(err.contains("404"), "{err}");
    let mut without_token = herald(&server);
    without_token.env_remove("HERALD_TOKEN");
    let (ok, _, err) = run(without_token, &["app", "list"]).await;
    assert!(!ok);
    assert!(err.contains("no API token"), "{err}");
    server.stop().await;
}

#[tokio::test]
async fn the_token_and_server_can_come_from_the_cli_configuration_file() {
    let server = TestServer::start().await;
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("cli.toml");
    std::fs::write(
        &file,
        format!("server = \"{}\"\ntoken = \"{ADMIN_TOKEN}\"\n", server.base),
    )
    .expect("write");
    let mut command = Command::new(env!("CARGO_BIN_EXE_herald"));
    command
        .env_remove("HERALD_URL")
        .env_remove("HERALD_TOKEN")
        .env("HERALD_CLI_CONFIG", &file);
    let (ok, out, err) = run(command, &["app", "list", "--json"]).await;
    assert!(ok, "{err}");
    assert!(out.trim_start().starts_with('['), "{out}");

    std::fs::write(&file, "tokn = \"typo\"\n").expect("write");
    let mut command = Command::new(env!("CARGO_BIN_EXE_herald"));
    command
        .env("HERALD_CLI_CONFIG", &file)
        .env_remove("HERALD_TOKEN");
    let (ok, _, err) = run(command, &["app", "list"]).await;
    assert!(!ok);
    assert!(err.contains("tokn"), "an unknown key is named: {err}");
    server.stop().await;
}

#[tokio::test]
async fn listen_prints_the_apps_events_and_forwards_them_signed() {
    let server = TestServer::start().await;
    let mut forwarded = Receiver::start().await;
    let app = server.create_app("listened").await;
    let other = server.create_app("other").await;
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    let mut listen = herald(&server);
    listen
        .args([
            "listen",
            "--app",
            "listened",
            "--event-type",
            "order.paid",
            "--forward-to",
            &forwarded.url,
            "--secret",
            secret,
            "--count",
            "3",
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = listen.spawn().expect("listen runs");
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let said = tokio::time::timeout(Duration::from_secs(30), async {
        let mut said = Vec::new();
        while let Some(line) = stderr.next_line().await.expect("stderr line") {
            said.push(line);
            if said.last().is_some_and(|l| l.starts_with("ready:")) {
                return said;
            }
        }
        panic!("listen ended before it was ready: {said:?}");
    })
    .await
    .expect("ready within 30 s");
    assert!(
        said.last().is_some_and(|ready| ready.contains("listened")),
        "{said:?}"
    );
    assert!(
        !said.iter().any(|line| line.contains(secret)),
        "a secret the user gave is not printed: {said:?}"
    );

    // Another app's event, and another type, are not shown; then two that are.
    server
        .send(
            &other,
            json!({"eventType": "order.paid", "payload": {"n": 0}}),
        )
        .await;
    server
        .send(
            &app,
            json!({"eventType": "user.created", "payload": {"n": 0}}),
        )
        .await;
    let first = server
        .send(
            &app,
            json!({"eventType": "order.paid", "payload": {"n": 1}, "channels": ["orders"]}),
        )
        .await;
    server
        .send(
            &app,
            json!({"eventType": "order.paid", "payload": {"n": 2}}),
        )
        .await;
    // Data over 64 KiB is left out of the tail, its size said; forwarding reads the payload
    // from the message log.
    let large = json!({"n": 3, "padding": "x".repeat(70 * 1024)});
    server
        .send(&app, json!({"eventType": "order.paid", "payload": large}))
        .await;

    let output = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("listen stops after --count events")
        .expect("listen's output");
    assert!(output.status.success());
    let lines: Vec<Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!(lines[0]["messageId"], first["id"]);
    assert_eq!(lines[0]["event"], "order.paid");
    assert_eq!(lines[0]["source"], "api");
    assert_eq!(lines[0]["channels"], json!(["orders"]));
    assert_eq!(lines[0]["data"], json!({"n": 1}));
    assert_eq!(lines[1]["data"], json!({"n": 2}));
    assert!(lines[2].get("data").is_none(), "{}", lines[2]);
    assert_eq!(
        lines[2]["dataOmittedBytes"],
        json!(large.to_string().len()),
        "the left-out data's length"
    );

    for n in 1..=2 {
        let delivery = forwarded.next().await;
        assert!(
            signature_valid(secret, &delivery),
            "forwarded event {n} signed"
        );
        assert_eq!(
            serde_json::from_slice::<Value>(&delivery.body).expect("json"),
            json!({ "n": n })
        );
        assert!(delivery.header("webhook-id").starts_with("msg_"));
    }
    let delivery = forwarded.next().await;
    assert!(signature_valid(secret, &delivery), "the large event signed");
    assert_eq!(
        String::from_utf8_lossy(&delivery.body),
        large.to_string(),
        "forwarded whole and byte for byte, from the message log"
    );
    server.stop().await;
}

/// A POST whose answer is cut off may have been applied: the user is told so, not asked
/// whether the server is running (which invites running `herald send` again: a second
/// message).
#[tokio::test]
async fn a_post_whose_answer_was_cut_off_is_said_to_have_maybe_been_applied() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    // Takes the request whole, then answers a 201 whose body stops short.
    let server = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.expect("accept");
        let mut request = Vec::new();
        let mut buffer = [0_u8; 4096];
        loop {
            let read = socket.read(&mut buffer).await.expect("read");
            request.extend_from_slice(&buffer[..read]);
            let text = String::from_utf8_lossy(&request);
            if let Some(head) = text.find("\r\n\r\n") {
                let length = text[..head]
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().to_owned())
                    })
                    .and_then(|v| v.parse::<usize>().ok())
                    .unwrap_or(0);
                if request.len() >= head + 4 + length || read == 0 {
                    break;
                }
            }
        }
        socket
            .write_all(b"HTTP/1.1 201 Created\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"id\"")
            .await
            .expect("write");
    });
    let mut command = Command::new(env!("CARGO_BIN_EXE_herald"));
    command
        .env("HERALD_URL", &url)
        .env("HERALD_TOKEN", ADMIN_TOKEN)
        .env("HERALD_CLI_CONFIG", "")
        .env("XDG_CONFIG_HOME", "/nonexistent")
        .kill_on_drop(true);
    let (ok, _, err) = run(command, &["send", "shop", "order.paid"]).await;
    server.await.expect("served");
    assert!(!ok);
    assert!(err.contains("may have been applied"), "{err}");
    assert!(!err.contains("is it running"), "{err}");
}

/// `listen` started from `command`, once it said it is ready: the child and the rest of
/// its standard error.
async fn listening(
    mut command: Command,
) -> (
    tokio::process::Child,
    tokio::io::Lines<BufReader<tokio::process::ChildStderr>>,
) {
    command.stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = command.spawn().expect("listen runs");
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr")).lines();
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = stderr.next_line().await.expect("stderr line") {
            if line.starts_with("ready:") {
                return;
            }
        }
        panic!("listen ended before it was ready");
    })
    .await
    .expect("ready within 30 s");
    (child, stderr)
}

/// The last line `listen` says before it ends on its own, within 30 s, with a failure.
async fn last_word_of_failed(
    mut child: tokio::process::Child,
    mut stderr: tokio::io::Lines<BufReader<tokio::process::ChildStderr>>,
) -> String {
    let mut said = Vec::new();
    let status = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = stderr.next_line().await.expect("stderr line") {
            said.push(line);
        }
        child.wait().await.expect("listen's status")
    })
    .await
    .expect("listen stopped within 30 s");
    assert!(!status.success(), "{said:?}");
    said.pop().expect("a last word")
}

/// A stream the server refuses for good (its token revoked, its app deleted) ends `listen`
/// with an error, where it used to ask again every 10 s for ever.
#[tokio::test]
async fn listen_stops_with_an_error_when_its_token_is_refused() {
    let server = TestServer::start().await;
    let app = server.create_app("listen-revoked").await;
    let (status, token) = server
        .call(
            Method::POST,
            "/api/v1/auth/token",
            Some(json!({"name": "listener", "appId": app})),
        )
        .await;
    assert_eq!(status, 201, "{token}");
    let mut listen = herald(&server);
    listen
        .env("HERALD_TOKEN", token["token"].as_str().expect("token"))
        .args(["listen", "--app", &app, "--count", "1"]);
    let (child, stderr) = listening(listen).await;
    let (status, _) = server
        .call(
            Method::DELETE,
            &format!("/api/v1/auth/token/{}", token["id"].as_str().expect("id")),
            None,
        )
        .await;
    assert_eq!(status, 204);
    // The tail ends within its token recheck (5 s); the reconnect is refused with 401.
    let last = last_word_of_failed(child, stderr).await;
    assert!(last.contains("refused") && last.contains("401"), "{last}");

    // With the admin token, which outlives any app: the app's deletion ends the tail (within
    // its recheck), and the reconnect is refused with 404.
    let app = server.create_app("listen-deleted").await;
    let mut listen = herald(&server);
    listen.args(["listen", "--app", &app, "--count", "1"]);
    let (child, stderr) = listening(listen).await;
    let (status, _) = server
        .call(Method::DELETE, &format!("/api/v1/app/{app}"), None)
        .await;
    assert_eq!(status, 204);
    let last = last_word_of_failed(child, stderr).await;
    assert!(last.contains("refused") && last.contains("404"), "{last}");
    server.stop().await;
}

/// Each app listened to takes one of the node's 64 live tails: without --app, more than 16 apps
/// are refused with a word on how to name them, rather than taking the console's tails.
#[tokio::test]
async fn listen_without_apps_named_refuses_a_large_install() {
    let server = TestServer::start().await;
    for n in 0..17 {
        server.create_app(&format!("many-{n}")).await;
    }
    let (ok, _, err) = run(herald(&server), &["listen"]).await;
    assert!(!ok, "refused");
    assert!(err.contains("17 apps") && err.contains("--app"), "{err}");
    server.stop().await;
}

#[tokio::test]
async fn the_tail_is_the_apps_alone() {
    let server = TestServer::start().await;
    let app = server.create_app("tailed").await;
    let other = server.create_app("elsewhere").await;
    let (status, token) = server
        .call(
            Method::POST,
            "/api/v1/auth/token",
            Some(json!({"name": "other's", "appId": other})),
        )
        .await;
    assert_eq!(status, 201, "{token}");
    let token = token["token"].as_str().expect("token").to_owned();
    let refused = crate::harness::http_client()
        .get(format!("{}/api/v1/app/{app}/tail", server.base))
        .bearer_auth(&token)
        .send()
        .await
        .expect("answered");
    assert_eq!(refused.status(), 404, "another app's token finds nothing");
    let refused = crate::harness::http_client()
        .get(format!("{}/api/v1/app/{app}/tail", server.base))
        .send()
        .await
        .expect("answered");
    assert_eq!(refused.status(), 401);
    server.stop().await;
}

/// A tail lives only as long as its token: revoked while the stream is open, the token's
/// stream ends at the next check (every 5 s), rather than showing the app's publications for
/// as long as the connection lasts; even from an address that failed authentication until
/// its checks are refused unread (429), which would otherwise keep the stream.
#[tokio::test]
async fn a_tail_ends_when_its_token_is_revoked() {
    let server = TestServer::start_with(|c| {
        c.api.auth_failures_per_second_per_ip = 1;
        c.api.auth_failure_burst_per_ip = 2;
    })
    .await;
    let app = server.create_app("tail-revoked").await;
    let (status, token) = server
        .call(
            Method::POST,
            "/api/v1/auth/token",
            Some(json!({"name": "watcher", "appId": app})),
        )
        .await;
    assert_eq!(status, 201, "{token}");
    let secret = token["token"].as_str().expect("token").to_owned();
    let mut stream = crate::harness::http_client()
        .get(format!("{}/api/v1/app/{app}/tail", server.base))
        .bearer_auth(&secret)
        .send()
        .await
        .expect("answered");
    assert_eq!(stream.status(), 200);
    assert_eq!(
        stream.headers()["x-accel-buffering"],
        "no",
        "a buffering proxy would hold the keep-alives back"
    );
    // The address keeps failing, so its token checks are refused unread (429) from now on.
    let hammered = format!("{}/api/v1/app/{app}/msg", server.base);
    let hammer = tokio::spawn(async move {
        let client = crate::harness::http_client();
        loop {
            let _ = client
                .get(&hammered)
                .bearer_auth("not-a-token")
                .send()
                .await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let (status, _) = server
        .call(
            Method::DELETE,
            &format!("/api/v1/auth/token/{}", token["id"].as_str().expect("id")),
            None,
        )
        .await;
    assert_eq!(status, 204);
    let revoked = std::time::Instant::now();
    // Read until the server ends the stream (keep-alives and events before that are fine).
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        while let Ok(Some(_)) = stream.chunk().await {}
    })
    .await;
    hammer.abort();
    assert!(ended.is_ok(), "the stream outlived its token by 20 s");
    assert!(
        revoked.elapsed() < Duration::from_secs(15),
        "ended {:?} after the revocation",
        revoked.elapsed()
    );
    server.stop().await;
}

#[tokio::test]
async fn replay_resends_an_endpoints_thousand_failed_messages() {
    const MESSAGES: usize = 1_000;
    let server = TestServer::start_with(|c| {
        // One attempt, then failed: the messages to replay.
        c.delivery.retry_schedule_secs = Vec::new();
        c.api.publish_per_second_per_app = 0;
    })
    .await;
    let mut receiver = Receiver::start().await;
    receiver.fallback(Reply::Status(500));
    let app = server.create_app("replayed").await;
    let endpoint = server
        .create_endpoint(&app, json!({"url": receiver.url}))
        .await;
    let endpoint_id = endpoint["id"].as_str().expect("id").to_owned();
    let since = chrono::Utc::now() - chrono::Duration::seconds(5);

    let http = crate::harness::http_client();
    let url = format!("{}/api/v1/app/{app}/msg", server.base);
    futures_util::future::join_all((0..MESSAGES).collect::<Vec<_>>().chunks(50).map(|chunk| {
        let (http, url) = (http.clone(), url.clone());
        let chunk = chunk.to_vec();
        async move {
            for n in chunk {
                let response = http
                    .post(&url)
                    .bearer_auth(ADMIN_TOKEN)
                    .json(&json!({"eventType": "order.paid", "payload": {"n": n}}))
                    .send()
                    .await
                    .expect("sent");
                assert_eq!(response.status(), 201);
            }
        }
    }))
    .await;
    eventually("every message failed", || async {
        let stats = server.stats(&app, &endpoint_id).await;
        (stats["fail"] == MESSAGES).then_some(())
    })
    .await;
    drop(receiver.drain());
    receiver.fallback(Reply::Status(200));

    let since = since.to_rfc3339();
    let summary = json_of(
        &server,
        &["replay", &app, &endpoint_id, "--since", &since, "--json"],
    )
    .await;
    assert_eq!(summary["found"], MESSAGES, "{summary}");
    assert_eq!(summary["resent"], MESSAGES, "{summary}");
    assert_eq!(summary["refused"], json!([]));
    let stats = eventually("every message delivered", || async {
        let stats = server.stats(&app, &endpoint_id).await;
        (stats["success"] == MESSAGES).then_some(stats)
    })
    .await;
    assert_eq!(stats["fail"], 0, "{stats}");

    // Nothing failed any more: a second replay finds nothing, and says so in words.
    let (ok, out, err) = run(
        herald(&server),
        &["replay", &app, &endpoint_id, "--since", "1h"],
    )
    .await;
    assert!(ok, "{err}");
    assert!(out.contains("resent 0 of 0 failed message(s)"), "{out}");
    server.stop().await;
}

#[tokio::test]
async fn doctor_checks_a_node_and_says_what_is_wrong() {
    let server = TestServer::start().await;
    let dir = tempfile::tempdir().expect("dir");
    // A data directory nothing has used: a warning, not a failure.
    let fresh = dir.path().join("fresh");
    let checks = {
        let (ok, out, err) = run(
            herald(&server),
            &[
                "doctor",
                "--data",
                fresh.to_str().expect("utf-8"),
                "--server",
                &server.base,
                "--json",
            ],
        )
        .await;
        assert!(ok, "{out} {err}");
        serde_json::from_str::<Value>(&out).expect("json")
    };
    let verdict = |checks: &Value, name: &str| {
        checks
            .as_array()
            .expect("checks")
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no {name} check in {checks}"))
            .clone()
    };
    assert_eq!(verdict(&checks, "config")["verdict"], "ok");
    assert_eq!(verdict(&checks, "store")["verdict"], "warn");
    assert_eq!(verdict(&checks, "server")["verdict"], "ok", "{checks}");
    assert_eq!(verdict(&checks, "broker")["verdict"], "skip");

    // A store created by `serve` is up to date.
    let (ok, _, err) = run(
        herald(&server),
        &["migrate", "--data", fresh.to_str().expect("utf-8")],
    )
    .await;
    assert!(ok, "{err}");
    let (ok, out, _) = run(
        herald(&server),
        &["doctor", "--data", fresh.to_str().expect("utf-8")],
    )
    .await;
    assert!(ok, "{out}");
    assert!(
        out.contains("ok    store") && out.contains("migrations"),
        "{out}"
    );

    // A bad setting, a private webhook URL, a URL where nothing listens: each said with a fix.
    let config = dir.path().join("herald.toml");
    std::fs::write(&config, "[delivery]\nretry_jitter = 3\n").expect("write");
    let (ok, out, _) = run(
        herald(&server),
        &["doctor", "--config", config.to_str().expect("utf-8")],
    )
    .await;
    assert!(!ok);
    assert!(
        out.contains("FAIL  config") && out.contains("retry_jitter"),
        "{out}"
    );
    assert!(out.contains("fix:"), "{out}");

    let (ok, out, _) = run(
        herald(&server),
        &[
            "doctor",
            "--data",
            fresh.to_str().expect("utf-8"),
            "--url",
            "http://10.1.2.3/hook",
        ],
    )
    .await;
    assert!(!ok);
    assert!(
        out.contains("FAIL  url") && out.contains("allow_private_targets"),
        "{out}"
    );

    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let nowhere = format!("http://{}/hook", closed.local_addr().expect("addr"));
    drop(closed);
    let (ok, out, _) = run(
        herald(&server),
        &[
            "doctor",
            "--dev",
            "--data",
            fresh.to_str().expect("utf-8"),
            "--url",
            &nowhere,
        ],
    )
    .await;
    assert!(!ok);
    assert!(
        out.contains("FAIL  url") && out.contains("start the receiver"),
        "{out}"
    );

    // A certificate past its end fails the TLS check, naming the date; one ending within two
    // weeks warns.
    let key = rcgen::KeyPair::generate().expect("key");
    std::fs::write(dir.path().join("key.pem"), key.serialize_pem()).expect("write");
    // Midnight UTC `days` from today, as rcgen takes a certificate's dates.
    let time_from = |days: i64| {
        use chrono::Datelike;
        let date = chrono::Utc::now().date_naive() + chrono::Duration::days(days);
        let small = |n: u32| u8::try_from(n).expect("a month or a day");
        rcgen::date_time_ymd(date.year(), small(date.month()), small(date.day()))
    };
    for (days_left, verdict, says) in [(-2_i64, "FAIL", "expired on"), (5, "warn", "expires on")] {
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
        params.not_before = time_from(-30);
        params.not_after = time_from(days_left);
        let cert = params.self_signed(&key).expect("certificate");
        std::fs::write(dir.path().join("cert.pem"), cert.pem()).expect("write");
        std::fs::write(
            &config,
            format!(
                "[tls]\ncert = {:?}\nkey = {:?}\n",
                dir.path().join("cert.pem"),
                dir.path().join("key.pem")
            ),
        )
        .expect("write");
        let (_, out, _) = run(
            herald(&server),
            &[
                "doctor",
                "--config",
                config.to_str().expect("utf-8"),
                "--data",
                fresh.to_str().expect("utf-8"),
            ],
        )
        .await;
        assert!(
            out.contains(&format!("{verdict}  tls")) && out.contains(says),
            "{out}"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn completions_are_generated_for_each_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let (ok, out, err) = run(
            Command::new(env!("CARGO_BIN_EXE_herald")),
            &["completions", shell],
        )
        .await;
        assert!(ok, "{err}");
        for word in ["listen", "replay", "doctor", "forward-to"] {
            assert!(out.contains(word), "{shell} completions lack {word}");
        }
    }
}
