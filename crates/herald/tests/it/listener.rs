//! The listener's own limits, with raw TCP clients: how long a client may take to send its
//! headers, how large they may be, and how many connections are open at once.

use std::time::{Duration, Instant};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::harness::{PATIENCE, TestServer, eventually};

fn addr(server: &TestServer) -> String {
    server.base.trim_start_matches("http://").to_owned()
}

/// Reads until the server closes the connection; returns what it sent.
async fn read_to_close(stream: &mut TcpStream) -> Vec<u8> {
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
    eprintln!(
        "50 half-sent heads all closed after {:?}",
        started.elapsed()
    );

    let mut idle = TcpStream::connect(addr(&server)).await.expect("connect");
    idle.write_all(b"GET /api/v1/health HTTP/1.1\r\nHost: herald\r\n\r\n")
        .await
        .expect("write");
    let answered = read_to_close(&mut idle).await;
    assert!(
        answered.starts_with(b"HTTP/1.1 204"),
        "{}",
        String::from_utf8_lossy(&answered)
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
