//! `sse-idle`: opens N Server-Sent Events streams (`GET /apps/{app}/sse?channels=...`), waits
//! for each one's `herald:subscription_succeeded`, and reports the server's memory per idle
//! stream (its RSS growth with every stream open and quiet), as `pusher-bench --server-pid`
//! does for WebSockets. The streams are read (and discarded) until the hold ends, so the
//! server's keep-alive comments never back up. A run in which any stream failed to open, or
//! ended while held, exits non-zero: its figure would be divided over the wrong count.
//!
//! Plain HTTP/1.1 over tokio's sockets, no HTTP client: one request per connection, nothing
//! else is needed to hold a stream open.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::Parser;
use herald_bench::{append_json_line, idle_memory, mib, rss_bytes};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
    sync::Semaphore,
    task::JoinSet,
};

/// Longest wait for a stream's first event.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Parser, Debug)]
#[command(about = "Memory per idle SSE stream of a Herald server on this machine")]
struct Args {
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    #[arg(long, default_value_t = 6001)]
    port: u16,
    #[arg(long, default_value = "1")]
    app_id: String,
    /// Streams to open.
    #[arg(long, short = 'n', default_value_t = 1000)]
    connections: usize,
    /// Public channels the streams are spread over (`bench-0`, `bench-1`, ...).
    #[arg(long, short = 'm', default_value_t = 10)]
    channels: usize,
    /// Streams being opened at once.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// Local addresses the connections bind to, in turn (one address has about 28,000
    /// ephemeral ports).
    #[arg(long, value_delimiter = ',')]
    source_addresses: Vec<IpAddr>,
    /// The server's process id on this machine.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Seconds to hold the streams open after measuring.
    #[arg(long, default_value_t = 0)]
    hold: u64,
    /// Append the figures to this file as one JSON line (what `bench/run` reads).
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Arc::new(Args::parse());
    if args.connections == 0 || args.channels == 0 {
        bail!("--connections and --channels must be at least 1");
    }
    let rss_before = args.server_pid.and_then(rss_bytes);
    let opening = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let started = Instant::now();
    let mut opened = JoinSet::new();
    for i in 0..args.connections {
        let (args, opening) = (Arc::clone(&args), Arc::clone(&opening));
        opened.spawn(async move {
            let _permit = opening.acquire_owned().await;
            let source = (!args.source_addresses.is_empty())
                .then(|| args.source_addresses[i % args.source_addresses.len()]);
            let channel = format!("bench-{}", i % args.channels);
            tokio::time::timeout(REPLY_TIMEOUT, open(&args, source, &channel))
                .await
                .context("no first event in time")?
        });
    }
    let mut streams = Vec::with_capacity(args.connections);
    let mut first_error = None;
    while let Some(result) = opened.join_next().await {
        match result.context("a connection task failed")? {
            Ok(stream) => streams.push(stream),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    println!(
        "connect: {} streams open in {:.2} s, {} failed{}",
        streams.len(),
        started.elapsed().as_secs_f64(),
        args.connections - streams.len(),
        first_error
            .map(|e| format!(" (first: {e:#})"))
            .unwrap_or_default()
    );
    if streams.is_empty() {
        bail!("no stream could be opened");
    }
    let open_streams = streams.len();
    // Keep reading (keep-alive comments), so no stream backs up while held.
    let mut readers = JoinSet::new();
    for mut stream in streams {
        readers.spawn(async move {
            let mut buffer = [0u8; 512];
            while matches!(stream.read(&mut buffer).await, Ok(n) if n > 0) {}
        });
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (idle_rss, per_stream_kib) = idle_memory(
        args.server_pid,
        rss_before,
        open_streams as u64,
        "idle SSE stream",
    );
    tokio::time::sleep(Duration::from_secs(args.hold)).await;
    // A reader that returned saw its stream end.
    while readers.try_join_next().is_some() {}
    let still_open = readers.len();
    println!("held: {still_open} of {open_streams} streams still open");
    readers.abort_all();
    let failed = args.connections - open_streams;
    if let Some(path) = &args.json {
        let line = serde_json::json!({
            "connections": args.connections,
            "channels": args.channels,
            "opened": open_streams,
            "failed": failed,
            "still_open": still_open,
            "server_rss_before_mib": rss_before.map(mib),
            "server_rss_idle_mib": idle_rss.map(mib),
            "memory_per_stream_kib": per_stream_kib,
        });
        append_json_line(path, &line).with_context(|| format!("writing {}", path.display()))?;
    }
    // Memory divided over fewer streams than asked, or streams the server ended while they
    // were held, is not the figure asked for: say so in the exit status.
    if failed > 0 || still_open < open_streams {
        bail!(
            "incomplete run: {failed} of {} streams failed to open, {} ended while held",
            args.connections,
            open_streams - still_open
        );
    }
    Ok(())
}

/// Connects (from `source`, if given), asks for `channel`'s stream and reads until its first
/// event, `herald:subscription_succeeded`.
async fn open(args: &Args, source: Option<IpAddr>, channel: &str) -> anyhow::Result<TcpStream> {
    let server = SocketAddr::new(args.host, args.port);
    let socket = if server.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .context("opening a socket")?;
    if let Some(source) = source {
        socket
            .bind(SocketAddr::new(source, 0))
            .with_context(|| format!("binding to {source}"))?;
        // Closed with a reset: a bound port in TIME_WAIT stays taken for a minute (see
        // pusher-bench's `connect_from`).
        socket.set_zero_linger().context("setting SO_LINGER")?;
    }
    let mut stream = socket.connect(server).await.context("connecting")?;
    let request = format!(
        "GET /apps/{}/sse?channels={channel} HTTP/1.1\r\nHost: {server}\r\n\
         Accept: text/event-stream\r\n\r\n",
        args.app_id
    );
    stream
        .write_all(request.as_bytes())
        .await
        .context("sending the request")?;
    let mut received = Vec::new();
    let mut buffer = [0u8; 1024];
    loop {
        let n = stream.read(&mut buffer).await.context("reading")?;
        if n == 0 {
            bail!(
                "the server ended the stream: {}",
                String::from_utf8_lossy(&received)
            );
        }
        received.extend_from_slice(&buffer[..n]);
        let text = String::from_utf8_lossy(&received);
        if !text.starts_with("HTTP/1.1 200") && text.contains("\r\n\r\n") {
            bail!("refused: {}", text.lines().next().unwrap_or_default());
        }
        if text.contains("herald:subscription_succeeded") {
            return Ok(stream);
        }
    }
}
