//! The listener's own limits, with raw TCP clients: how long a client may take to send its
//! headers and its body, how large the headers may be, and how many connections are open at
//! once, in all and from one address.

use std::time::{Duration, Instant};

use serde_json::json;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
};

use reqwest::Method;

use crate::{
    harness::{ADMIN_TOKEN, PATIENCE, TestServer, eventually},
    pusher::{Client, pusher_app, trigger},
};

fn addr(server: &TestServer) -> String {
    server.base.trim_start_matches("http://").to_owned()
}

/// A connection to the server from `source` (any 127.0.0.0/8 address is loopback on Linux).
async fn connect_from(source: &str, server: &TestServer) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(format!("{source}:0").parse().expect("source address"))
        .expect("bind the client socket to its source address");
    socket
        .connect(addr(server).parse().expect("server address"))
        .await
        .expect("connect")
}

/// Sends one health check on `stream` (asking the server to close afterwards); returns the
/// answer, empty if the server closed the socket unanswered.
async fn health_check(mut stream: TcpStream) -> Vec<u8> {
    // A refused socket may already be closed: the write can fail, the read tells.
    let _ = stream
        .write_all(b"GET /api/v1/health HTTP/1.1\r\nHost: herald\r\nConnection: close\r\n\r\n")
        .await;
    read_to_close(&mut stream).await
}

/// Reads until the server closes the connection; returns what it sent.
async fn read_to_close(stream: &mut (impl AsyncRead + Unpin)) -> Vec<u8> {
    let mut received = Vec::new();
    tokio::time::timeout(PATIENCE, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("the server should close the connection");
    received
}

/// A client that pipelines requests for large responses and never reads them holds its
/// connection's response half-written (hyper has no write timeout). At shutdown that
/// connection gets `shutdown_grace_secs` to finish, then is dropped: the server stops, where
/// it once waited for the client forever.
#[tokio::test]
async fn a_client_that_stops_reading_does_not_hold_the_shutdown() {
    let server = TestServer::start_with(|c| c.shutdown_grace_secs = 0.5).await;
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .set_recv_buffer_size(4096)
        .expect("a small receive buffer");
    let mut stalled = socket
        .connect(addr(&server).parse().expect("address"))
        .await
        .expect("connect");
    // About 9 MB of responses asked for, more than loopback's socket buffers hold.
    let request = b"GET /console/console.js HTTP/1.1\r\nHost: herald\r\n\r\n";
    for _ in 0..300 {
        stalled.write_all(request).await.expect("write");
    }
    // The first response has begun.
    let mut first = [0u8; 12];
    stalled.read_exact(&mut first).await.expect("read");
    assert_eq!(&first, b"HTTP/1.1 200");
    // Shutdown comes once the server's side is stuck: its unsent bytes no longer grow (the
    // kernel's send buffer is full, and the response being written waits for the client).
    let ports = (
        server_port(&server),
        stalled.local_addr().expect("local address").port(),
    );
    let mut last = 0;
    eventually("the server's writes to block", || {
        let unsent = unsent_bytes(ports.0, ports.1);
        let stuck = unsent > 0 && unsent == last;
        last = unsent;
        async move { stuck.then_some(()) }
    })
    .await;
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), server.stop())
        .await
        .expect("the server stops although a client never reads its responses");
    eprintln!("stopped in {:?}", started.elapsed());
    drop(stalled);
}

/// A client that pipelines requests for large responses and reads none of them is cut off once
/// the server's writes have made no progress for `listener.write_timeout_secs`, well before
/// shutdown: before, it held its connection, its slots and the kernel's buffers until then.
#[tokio::test]
async fn a_client_that_reads_nothing_is_closed_after_the_write_timeout() {
    let server = TestServer::start_with(|c| c.listener.write_timeout_secs = 1.0).await;
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .set_recv_buffer_size(4096)
        .expect("a small receive buffer");
    let mut stalled = socket
        .connect(addr(&server).parse().expect("address"))
        .await
        .expect("connect");
    let request = b"GET /console/console.js HTTP/1.1\r\nHost: herald\r\n\r\n";
    for _ in 0..300 {
        stalled.write_all(request).await.expect("write");
    }
    let ports = (
        server_port(&server),
        stalled.local_addr().expect("local address").port(),
    );
    // The server closes its end without the client reading a byte: its socket leaves
    // ESTABLISHED (or, reset for the requests it never read, the table).
    eventually("the server to close the stalled connection", || {
        let state = tcp_state(ports.0, ports.1);
        async move { (state != Some(ESTABLISHED)).then_some(()) }
    })
    .await;
    let received = read_to_close(&mut stalled).await;
    let answered = received
        .windows(12)
        .filter(|window| *window == b"HTTP/1.1 200")
        .count();
    assert!(
        answered < 300,
        "cut off before every response was written: {answered} began"
    );
    server.stop().await;
}

/// `/proc/net/tcp`'s state of an established connection.
const ESTABLISHED: u8 = 0x01;

/// The TCP state of the server's end of a loopback connection (from `server_port` to
/// `client_port`), from /proc/net/tcp (the test server runs in this process).
fn tcp_state(server_port: u16, client_port: u16) -> Option<u8> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    let local = format!(":{server_port:04X}");
    let remote = format!(":{client_port:04X}");
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (local_address, remote_address, state) =
            (fields.get(1)?, fields.get(2)?, fields.get(3)?);
        (local_address.ends_with(&local) && remote_address.ends_with(&remote))
            .then(|| u8::from_str_radix(state, 16).ok())
            .flatten()
    })
}

fn server_port(server: &TestServer) -> u16 {
    addr(server)
        .rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .expect("the server's port")
}

/// The bytes the server's end of a loopback connection (from `server_port` to `client_port`)
/// holds unsent, from /proc/net/tcp's `tx_queue` (the test server runs in this process).
fn unsent_bytes(server_port: u16, client_port: u16) -> u64 {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    let local = format!(":{server_port:04X}");
    let remote = format!(":{client_port:04X}");
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (local_address, remote_address, queues) =
                (fields.get(1)?, fields.get(2)?, fields.get(4)?);
            (local_address.ends_with(&local) && remote_address.ends_with(&remote))
                .then(|| u64::from_str_radix(queues.split(':').next()?, 16).ok())
                .flatten()
        })
        .next()
        .unwrap_or(0)
}

/// The review's slowloris: 50 sockets that send half a request head stayed open 95 s. Now
/// each is closed once the header read timeout passes, and so is a kept-alive socket that
/// sends nothing after its first response.
#[tokio::test]
async fn half_sent_heads_and_idle_keep_alive_sockets_are_closed_after_the_header_timeout() {
    let server = TestServer::start_with(|c| c.listener.header_read_timeout_secs = 0.5).await;
    let started = Instant::now();
    let mut slow = Vec::new();
    for _ in 0..50 {
        let mut stream = TcpStream::connect(addr(&server)).await.expect("connect");
        stream
            .write_all(b"GET /api/v1/health HTTP/1.1\r\nHost: herald\r\nX-Slow: ")
            .await
            .expect("write");
        slow.push(stream);
    }
    for stream in &mut slow {
        read_to_close(stream).await;
    }
    // Closed by the timeout, not at once (nor by the test's patience, which read_to_close
    // would have failed on).
    let closed_after = started.elapsed();
    assert!(
        closed_after >= Duration::from_millis(500),
        "50 half-sent heads closed after {closed_after:?}, before the header timeout"
    );

    // A kept-alive socket: answered, then closed once it has sent nothing for the timeout.
    let mut idle = TcpStream::connect(addr(&server)).await.expect("connect");
    idle.write_all(b"GET /api/v1/health HTTP/1.1\r\nHost: herald\r\n\r\n")
        .await
        .expect("write");
    let mut head = [0u8; 12];
    idle.read_exact(&mut head).await.expect("an answer");
    assert_eq!(&head, b"HTTP/1.1 204", "{}", String::from_utf8_lossy(&head));
    let answered_at = Instant::now();
    read_to_close(&mut idle).await;
    let idle_for = answered_at.elapsed();
    assert!(
        idle_for >= Duration::from_millis(400),
        "an idle kept-alive socket closed after {idle_for:?}, before the header timeout"
    );
    server.stop().await;
}

#[tokio::test]
async fn request_heads_over_the_limit_get_431() {
    let server = TestServer::start_with(|c| c.listener.max_header_bytes = 8 * 1024).await;
    let mut stream = TcpStream::connect(addr(&server)).await.expect("connect");
    let head = format!(
        "POST /ingest/src_x HTTP/1.1\r\nHost: herald\r\nwebhook-signature: {}\r\n\r\n",
        "v1,AAAA ".repeat(2_000)
    );
    stream.write_all(head.as_bytes()).await.expect("write");
    let answer = read_to_close(&mut stream).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 431"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    server.stop().await;
}

#[tokio::test]
async fn connections_beyond_the_cap_are_closed_and_a_freed_slot_is_reused() {
    let server = TestServer::start_with(|c| {
        c.listener.max_connections = 4;
        c.listener.header_read_timeout_secs = 60.0;
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..4 {
        let stream = TcpStream::connect(addr(&server)).await.expect("connect");
        held.push(stream);
    }
    // The kernel completes the handshake; the server closes the socket unanswered.
    let mut over = TcpStream::connect(addr(&server)).await.expect("connect");
    let _ = over
        .write_all(b"GET /api/v1/health HTTP/1.1\r\nHost: herald\r\n\r\n")
        .await;
    let answer = read_to_close(&mut over).await;
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));

    drop(held.pop());
    let (status, _) = eventually("a freed slot to be usable", || async {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .expect("client");
        let response = client
            .get(format!("{}/api/v1/health", server.base))
            .send()
            .await
            .ok()?;
        Some((response.status().as_u16(), ()))
    })
    .await;
    assert_eq!(status, 204);
    drop(held);
    server.stop().await;
}

/// The review's lock-out: one host held every slot, and every other client was accepted and
/// dropped at once. Now one address holds at most `max_connections_per_ip`: its next socket is
/// closed unanswered while another address is served, and a closed socket frees its place.
#[tokio::test]
async fn one_address_over_its_cap_is_refused_while_another_address_is_served() {
    let server = TestServer::start_with(|c| {
        c.listener.max_connections_per_ip = 3;
        c.listener.header_read_timeout_secs = 60.0;
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(connect_from("127.0.0.1", &server).await);
    }
    // Accepted in order, so the three above hold the address's places.
    let over = health_check(connect_from("127.0.0.1", &server).await).await;
    assert!(over.is_empty(), "{}", String::from_utf8_lossy(&over));

    let other = health_check(connect_from("127.0.0.2", &server).await).await;
    assert!(
        other.starts_with(b"HTTP/1.1 204"),
        "another address is served: {}",
        String::from_utf8_lossy(&other)
    );

    drop(held.pop());
    // The server notices the close when it reads: wait for the place to be given back.
    eventually("the freed place to be usable", || async {
        let answer = health_check(connect_from("127.0.0.1", &server).await).await;
        answer.starts_with(b"HTTP/1.1 204").then_some(())
    })
    .await;
    drop(held);
    server.stop().await;
}

/// A reverse proxy carries many clients on its connections: peers in `ws.trusted_proxies` are
/// not held to the per-address cap.
#[tokio::test]
async fn trusted_proxies_are_not_held_to_the_per_address_cap() {
    let server = TestServer::start_with(|c| {
        c.listener.max_connections_per_ip = 1;
        c.listener.header_read_timeout_secs = 60.0;
        c.ws.trusted_proxies = vec!["127.0.0.0/8".parse().expect("net")];
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(connect_from("127.0.0.1", &server).await);
    }
    let answer = health_check(connect_from("127.0.0.1", &server).await).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 204"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    drop(held);
    server.stop().await;
}

/// The review's slow body: headers sent, then the body trickled (hyper never times a body
/// out), holding the connection for as long as the client likes. Now the body has
/// `body_read_timeout` to arrive: the request is answered 408 and the connection closed, while
/// other clients are served meanwhile, and a WebSocket (which has no body to wait for) outlives
/// the timeout.
#[tokio::test]
async fn a_trickled_body_is_answered_408_and_closed_within_the_body_timeout() {
    let server = TestServer::start_with(|c| c.listener.body_read_timeout_secs = 1.0).await;
    let (_, creds) = pusher_app(&server, "listener-body-timeout").await;
    let mut subscriber = Client::connect(&server, &creds.key).await;
    let ok = subscriber.subscribe("news", None, None).await;
    assert_eq!(
        ok["event"], "pusher_internal:subscription_succeeded",
        "{ok}"
    );

    let started = Instant::now();
    let stream = TcpStream::connect(addr(&server)).await.expect("connect");
    let (mut reader, mut writer) = stream.into_split();
    // A route that must read its body (creating an app), as the admin.
    let head = format!(
        "POST /api/v1/app HTTP/1.1\r\nHost: herald\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    );
    writer.write_all(head.as_bytes()).await.expect("write");
    // One byte every 200 ms: the whole body would take 200 s. Stops when the server closes.
    let trickle = tokio::spawn(async move {
        for _ in 0..1000 {
            if writer.write_all(b" ").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });

    // Meanwhile, another client is served.
    let other = health_check(TcpStream::connect(addr(&server)).await.expect("connect")).await;
    assert!(
        other.starts_with(b"HTTP/1.1 204"),
        "{}",
        String::from_utf8_lossy(&other)
    );

    let answer = read_to_close(&mut reader).await;
    let elapsed = started.elapsed();
    let text = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with(b"HTTP/1.1 408"), "{text}");
    assert!(text.contains("request_timeout"), "{text}");
    assert!(
        text.to_ascii_lowercase().contains("connection: close"),
        "{text}"
    );
    assert!(
        elapsed >= Duration::from_secs(1) && elapsed < Duration::from_secs(10),
        "answered after {elapsed:?}; the timeout is 1 s, the trickle would take 200 s"
    );
    eprintln!("the trickled body was answered 408 after {elapsed:?}");
    trickle.abort();

    // A body sent at once is read as usual, and the WebSocket opened before the trickle, past
    // the body timeout now, still gets the event.
    let (status, body) = trigger(
        &server,
        &creds,
        json!({"name": "after", "channel": "news", "data": "{}"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(subscriber.next().await["event"], "after");
    server.stop().await;
}

/// The head of an admin `POST /api/v1/app` whose body is `length` bytes, closing after it.
fn post(length: usize) -> String {
    format!(
        "POST /api/v1/app HTTP/1.1\r\nHost: herald\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: {length}\r\n\r\n"
    )
}

/// Sends the head and all but the last KiB of a `kib` KiB body creating the app `name`, and
/// holds that KiB back; returns the whole body, for the test to finish sending.
async fn start_slow_app_create(
    writer: &mut (impl AsyncWriteExt + Unpin),
    name: &str,
    kib: usize,
) -> String {
    let mut body = format!(
        "{{\"name\": \"{name}\", \"uid\": \"{name}\"}}{}",
        " ".repeat(kib * 1024)
    );
    body.truncate(kib * 1024);
    writer
        .write_all(post(body.len()).as_bytes())
        .await
        .expect("write");
    writer
        .write_all(&body.as_bytes()[..(kib - 1) * 1024])
        .await
        .expect("write");
    body
}

/// Bodies being read share one budget (`listener.max_body_bytes_reading`): while one client
/// holds most of it with a body it has not finished sending, another's body that does not fit
/// is answered 503 `busy` with `Retry-After` and its connection closed; once the first body
/// is whole, its share is free again.
#[tokio::test]
async fn bodies_beyond_the_reading_budget_are_answered_503_until_it_frees() {
    let server = TestServer::start_with(|c| {
        c.api.max_body_bytes = 64 * 1024;
        c.listener.max_body_bytes_reading = 64 * 1024;
    })
    .await;
    // 60 KiB of a 61 KiB body, and the rest held back.
    let first = TcpStream::connect(addr(&server)).await.expect("connect");
    let (mut first_reader, mut first_writer) = first.into_split();
    let body = start_slow_app_create(&mut first_writer, "budget", 61).await;
    // Another body of 6 KiB does not fit beside it. (Request and body in one read of the
    // server's: nothing is left unread when it closes, which would reset the connection.)
    let refused = eventually("the budget to be taken", || async {
        let second = TcpStream::connect(addr(&server)).await.expect("connect");
        let (mut reader, mut writer) = second.into_split();
        let request = format!("{}{}", post(6 * 1024), " ".repeat(6 * 1024));
        writer.write_all(request.as_bytes()).await.ok()?;
        let answer = read_to_close(&mut reader).await;
        answer.starts_with(b"HTTP/1.1 503").then_some(answer)
    })
    .await;
    let text = String::from_utf8_lossy(&refused).to_ascii_lowercase();
    assert!(text.contains("\"code\":\"busy\""), "{text}");
    assert!(text.contains("retry-after: 1"), "{text}");
    assert!(text.contains("connection: close"), "{text}");
    // The first body, finished, is read and answered.
    first_writer
        .write_all(&body.as_bytes()[60 * 1024..])
        .await
        .expect("write");
    let mut answer = vec![0u8; 12];
    tokio::io::AsyncReadExt::read_exact(&mut first_reader, &mut answer)
        .await
        .expect("an answer");
    assert_eq!(
        &answer,
        b"HTTP/1.1 201",
        "{}",
        String::from_utf8_lossy(&answer)
    );
    // Its share is free again.
    let (status, body) = server
        .call(
            Method::POST,
            "/api/v1/app",
            // 8 KiB: more than was left beside the first body, so only its freed share fits.
            Some(json!({"name": "after", "padding": "x".repeat(8 * 1024)})),
        )
        .await;
    assert_eq!(
        status, 422,
        "read and judged, not refused for want of budget: {body}"
    );
    server.stop().await;
}

/// One client address holds at most its share of the body budget
/// (`listener.max_body_bytes_reading_per_ip`, here 64 KiB, two bodies of the API's 32 KiB
/// limit): while it sends two bodies slowly, its next body that does not fit beside them is
/// answered 429 `rate_limited` with `Retry-After` and its connection closed, while another
/// address's body of the same size is read and answered.
#[tokio::test]
async fn one_address_sending_slow_bodies_cannot_have_everyone_elses_refused() {
    let server = TestServer::start_with(|c| {
        c.api.max_body_bytes = 32 * 1024;
        c.listener.max_body_bytes_reading_per_ip = 64 * 1024;
    })
    .await;
    // From 127.0.0.1: two bodies of 31 KiB, each sent but its last KiB.
    let mut slow = Vec::new();
    for name in ["share-1", "share-2"] {
        let stream = connect_from("127.0.0.1", &server).await;
        let (reader, mut writer) = stream.into_split();
        let body = start_slow_app_create(&mut writer, name, 31).await;
        slow.push((reader, writer, body));
    }
    // The same address's next body of 6 KiB is over its share...
    let request = format!("{}{}", post(6 * 1024), " ".repeat(6 * 1024));
    let refused = eventually("the address's share to be taken", || async {
        let mut second = connect_from("127.0.0.1", &server).await;
        second.write_all(request.as_bytes()).await.ok()?;
        let answer = read_to_close(&mut second).await;
        answer.starts_with(b"HTTP/1.1 429").then_some(answer)
    })
    .await;
    let text = String::from_utf8_lossy(&refused).to_ascii_lowercase();
    assert!(text.contains("\"code\":\"rate_limited\""), "{text}");
    assert!(text.contains("retry-after: 1"), "{text}");
    assert!(text.contains("connection: close"), "{text}");
    // ...while another address's is read and judged (not JSON: 400).
    let mut other = connect_from("127.0.0.2", &server).await;
    other.write_all(request.as_bytes()).await.expect("write");
    let answer = read_to_close(&mut other).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 400"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    // The slow bodies, finished, are read and answered.
    for (mut reader, mut writer, body) in slow {
        writer
            .write_all(&body.as_bytes()[30 * 1024..])
            .await
            .expect("write");
        let answer = read_to_close(&mut reader).await;
        assert!(
            answer.starts_with(b"HTTP/1.1 201"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
    }
    server.stop().await;
}
