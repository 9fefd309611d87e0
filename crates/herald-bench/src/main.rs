//! `pusher-bench`: load for any Pusher Channels-compatible server (Herald, Pusher, Soketi...).
//!
//! Opens N WebSocket connections speaking protocol 7, subscribes them round-robin across M
//! public channels, publishes through the signed HTTP API at a set rate, and prints
//! deliveries per second, publish-to-receive latency (p50/p99/max) and, given the server's
//! pid on this machine, its memory per idle connection.
//!
//! `--protocol socketio` measures Herald's Socket.IO face instead: each connection is a
//! Socket.IO v4 client over the WebSocket transport (`/socket.io/?EIO=4&transport=websocket`,
//! no long-polling; see [`socketio`]) that connects to the app's namespace (`--namespace`,
//! `/demo`) and joins the room it would have subscribed to as a Pusher client. Publishing
//! still goes through the Pusher HTTP API to the same channels, so two runs against one
//! server, one per protocol, compare the two faces.
//!
//! Exits non-zero when a connection, a publish or a delivery was lost, so a smoke run in CI
//! proves the client and the server agree.
//!
//! Each event's data is `"<sent µs since the epoch>:<padding>"`, a plain string (not JSON
//! text, so Herald hands it to Socket.IO clients as a string too), so receivers read the
//! timestamp without parsing JSON twice; the server and this client share a clock.

mod socketio;

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use futures_util::{SinkExt, StreamExt};
use herald_bench::{append_json_line, idle_memory, mib, now_us, rss_bytes};
use tokio::{
    net::TcpStream,
    sync::{Semaphore, mpsc},
    task::JoinSet,
};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async, tungstenite::Message};
use tokio_util::sync::CancellationToken;

const EVENT: &str = "bench";
/// Longest wait for a handshake or subscription reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stalled connection may take to read what it was left and end.
const STALLED_READ: Duration = Duration::from_secs(5);
/// How long deliveries may trail the last publish before the run ends anyway.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Parser, Debug, Clone)]
#[command(
    about = "Fan-out benchmark for Pusher Channels-compatible servers, and for Herald's Socket.IO face",
    after_help = "Examples, against `herald serve --dev`, Pusher clients then Socket.IO clients of the app `demo` \
                  (both published to through the Pusher HTTP API):\n  \
                  pusher-bench --connections 2000 --channels 20 --rate 200 --server-pid $(pgrep -f 'herald serve')\n  \
                  pusher-bench --protocol socketio --namespace demo --connections 2000 --channels 20 --rate 200 --server-pid $(pgrep -f 'herald serve')"
)]
struct Args {
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// The port events are published to (the HTTP API).
    #[arg(long, default_value_t = 6001)]
    port: u16,
    /// Ports the WebSocket connections are spread over, in turn (the nodes of a cluster on
    /// `host`); by default `port`'s alone.
    #[arg(long, value_delimiter = ',')]
    subscribe_ports: Vec<u16>,
    #[arg(long, default_value = "1")]
    app_id: String,
    #[arg(long, default_value = "demo-key")]
    key: String,
    #[arg(long, default_value = "demo-secret")]
    secret: String,
    /// What the connections speak: `pusher` (Pusher protocol 7 at `/app/{key}`, subscribing to
    /// their channel) or `socketio` (Socket.IO v4 over WebSocket at `/socket.io/`, connecting to
    /// `--namespace` and joining their channel as a room). Events are published through the
    /// Pusher HTTP API either way.
    #[arg(long, value_enum, default_value_t = Protocol::Pusher)]
    protocol: Protocol,
    /// With `--protocol socketio`: the namespace, i.e. the Herald app (uid or id) whose rooms
    /// are joined: `demo` connects to `/demo`.
    #[arg(long, default_value = "demo")]
    namespace: String,
    /// WebSocket connections to open.
    #[arg(long, short = 'n', default_value_t = 1000)]
    connections: usize,
    /// Channels the connections are spread over (`bench-0`, `bench-1`, ...).
    #[arg(long, short = 'm', default_value_t = 10)]
    channels: usize,
    /// Channel name prefix; `history-bench-` measures Herald's history channels (each event
    /// stored with its offset before it is sent).
    #[arg(long, default_value = "bench-")]
    channel_prefix: String,
    /// Events published per second through the HTTP API.
    #[arg(long, default_value_t = 100)]
    rate: u32,
    /// Seconds of publishing.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Bytes of padding in each event's data.
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Connections being opened at once.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// Publish requests in flight at once.
    #[arg(long, default_value_t = 32)]
    publish_concurrency: usize,
    /// Events per publish request: 1 sends each through `/events`; 2 to 10 (Pusher's limit)
    /// send them together through `/batch_events`, each to the next channel in turn.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=10))]
    batch: u16,
    /// The server's process id on this machine, to report its memory per idle connection and
    /// its peak while publishing.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Extra Pusher connections subscribed to every channel that stop reading once subscribed
    /// (slow consumers): the server should close each (4100) without waiting for it, and the
    /// others' latency should not suffer. Checked after the run, when they read again.
    #[arg(long, default_value_t = 0)]
    stalled: usize,
    /// Local addresses the connections bind to before connecting, in turn (Pusher only). One
    /// source address has about 28,000 ephemeral ports: 50,000 connections need two, e.g.
    /// `127.0.0.2,127.0.0.3` (all of 127.0.0.0/8 is loopback on Linux).
    #[arg(long, value_delimiter = ',')]
    source_addresses: Vec<IpAddr>,
    /// Appends the run's figures as one JSON line to this file (written for incomplete runs
    /// too, with `"complete": false`).
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    /// Pusher Channels protocol 7.
    Pusher,
    /// Socket.IO v4 (Engine.IO 4) over WebSocket.
    #[value(name = "socketio", alias = "socket.io")]
    SocketIo,
}

/// What the connections speak: how they connect and subscribe, and how their frames read.
enum Face {
    Pusher,
    SocketIo(socketio::Namespace),
}

/// A text frame received once subscribed, as the receive loop sees it.
#[derive(Debug, PartialEq, Eq)]
enum Inbound {
    /// A bench event, sent at these microseconds since the epoch.
    Delivery(u64),
    /// A keep-alive to answer with this frame.
    Reply(&'static str),
    /// The server ended the session.
    Closed,
    Other,
}

impl Face {
    fn new(args: &Args) -> Self {
        match args.protocol {
            Protocol::Pusher => Self::Pusher,
            Protocol::SocketIo => Self::SocketIo(socketio::Namespace::new(&args.namespace)),
        }
    }

    fn url(&self, args: &Args, port: u16) -> String {
        match self {
            Self::Pusher => format!(
                "ws://{}:{port}/app/{}?protocol=7&client=herald-bench&version=0.1.0",
                args.host, args.key
            ),
            Self::SocketIo(_) => socketio::url(&args.host, port),
        }
    }

    /// Connects (from `source`, if given) and subscribes to `channel`, returning once the
    /// server confirmed it.
    async fn subscribe(
        &self,
        url: &str,
        channel: &str,
        source: Option<IpAddr>,
    ) -> anyhow::Result<Socket> {
        match self {
            Self::Pusher => subscribe(url, channel, source).await,
            Self::SocketIo(namespace) => namespace.subscribe(url, channel).await,
        }
    }

    fn read(&self, frame: &str) -> Inbound {
        match self {
            Self::Pusher => {
                if let Some(sent_us) = bench_timestamp(frame) {
                    Inbound::Delivery(sent_us)
                } else if frame.contains("\"pusher:ping\"") {
                    Inbound::Reply(r#"{"event":"pusher:pong","data":{}}"#)
                } else {
                    Inbound::Other
                }
            }
            Self::SocketIo(namespace) => namespace.read(frame),
        }
    }
}

#[derive(Default)]
struct Counters {
    received: AtomicU64,
    /// Microseconds since the epoch of the latest delivery.
    last_received_us: AtomicU64,
    disconnected: AtomicU64,
}

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.connections == 0 || args.channels == 0 || args.rate == 0 {
        bail!("--connections, --channels and --rate must be at least 1");
    }
    let face = Arc::new(Face::new(&args));
    println!(
        "pusher-bench: {} connections{} over {} channels; {} events/s for {} s with {}-byte data{}; server {}:{}",
        args.connections,
        match &*face {
            Face::Pusher => String::new(),
            Face::SocketIo(namespace) => format!(" (Socket.IO, namespace {})", namespace.name()),
        },
        args.channels,
        args.rate,
        args.duration,
        args.payload,
        if args.batch > 1 {
            format!(", {} per publish request", args.batch)
        } else {
            String::new()
        },
        args.host,
        args.port
    );
    let rss_before = args.server_pid.and_then(rss_bytes);

    // Connect and subscribe everyone.
    let counters = Arc::new(Counters::default());
    let stop = CancellationToken::new();
    let opening = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let (ready_tx, mut ready_rx) = mpsc::channel(args.connections);
    let mut sockets = JoinSet::new();
    let started = Instant::now();
    let ports = if args.subscribe_ports.is_empty() {
        vec![args.port]
    } else {
        args.subscribe_ports.clone()
    };
    if !args.source_addresses.is_empty() && args.protocol != Protocol::Pusher {
        bail!("--source-addresses applies to --protocol pusher only");
    }
    for i in 0..args.connections {
        let channel = i % args.channels;
        let url = face.url(&args, ports[i % ports.len()]);
        let source = (!args.source_addresses.is_empty())
            .then(|| args.source_addresses[i % args.source_addresses.len()]);
        let channel_name = format!("{}{channel}", args.channel_prefix);
        let (face, opening, ready, counters, stop) = (
            Arc::clone(&face),
            Arc::clone(&opening),
            ready_tx.clone(),
            Arc::clone(&counters),
            stop.clone(),
        );
        sockets.spawn(async move {
            let permit = opening.acquire_owned().await;
            let socket = face.subscribe(&url, &channel_name, source).await;
            drop(permit);
            match socket {
                Ok(socket) => {
                    let _ = ready.send(Ok(channel)).await;
                    receive(socket, &face, &counters, &stop).await
                }
                Err(e) => {
                    let _ = ready.send(Err(e)).await;
                    Vec::new()
                }
            }
        });
    }
    drop(ready_tx);
    let mut subscribers = vec![0u64; args.channels];
    let mut failures = 0usize;
    let mut first_error = None;
    for _ in 0..args.connections {
        match ready_rx.recv().await {
            Some(Ok(channel)) => subscribers[channel] += 1,
            Some(Err(e)) => {
                failures += 1;
                first_error.get_or_insert(e);
            }
            None => break,
        }
    }
    let connected: u64 = subscribers.iter().sum();
    println!(
        "connect: {connected} subscribed in {:.2} s, {failures} failed{}",
        started.elapsed().as_secs_f64(),
        first_error
            .map(|e| format!(" (first: {e:#})"))
            .unwrap_or_default()
    );
    if connected == 0 {
        bail!("no connection could subscribe");
    }

    // Memory per idle connection: the server's growth with every connection open and quiet.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (idle_rss, per_connection_kib) = idle_memory(
        args.server_pid,
        rss_before,
        connected,
        "idle subscribed connection",
    );

    // Slow consumers: subscribed to every channel, then silent until the run is over.
    let mut stalled = JoinSet::new();
    for _ in 0..args.stalled {
        if !matches!(*face, Face::Pusher) {
            bail!("--stalled needs --protocol pusher");
        }
        let channels: Vec<String> = (0..args.channels)
            .map(|c| format!("{}{c}", args.channel_prefix))
            .collect();
        let socket =
            subscribe_all(&args.host, ports[0], &face.url(&args, ports[0]), &channels).await?;
        let stop = stop.clone();
        stalled.spawn(async move {
            stop.cancelled().await;
            stalled_end(socket).await
        });
    }

    // Publish at the set rate, watching the server's memory meanwhile.
    let peak_rss = Arc::new(AtomicU64::new(0));
    let sampler = args.server_pid.map(|pid| {
        let (peak_rss, stop) = (Arc::clone(&peak_rss), stop.clone());
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(100));
            while !stop.is_cancelled() {
                every.tick().await;
                if let Some(rss) = rss_bytes(pid) {
                    peak_rss.fetch_max(rss, Ordering::Relaxed);
                }
            }
        })
    });
    let publisher = Publisher::new(&args)?;
    let publish_started = Instant::now();
    let published = publisher.run(&args, &subscribers).await;
    let publish_secs = publish_started.elapsed().as_secs_f64();
    println!(
        "publish: {} events in {publish_secs:.2} s ({:.1}/s), {} failed{}",
        published.ok,
        published.ok as f64 / publish_secs,
        published.failed,
        published
            .first_error
            .as_ref()
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default()
    );

    // Let the last deliveries land.
    let drain_until = Instant::now() + DRAIN_TIMEOUT;
    while counters.received.load(Ordering::Acquire) < published.expected
        && Instant::now() < drain_until
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let publish_start_us = published.first_publish_us;
    stop.cancel();
    let mut latencies: Vec<u32> = Vec::new();
    while let Some(result) = sockets.join_next().await {
        latencies.extend(result.unwrap_or_default());
    }

    if let Some(sampler) = sampler {
        let _ = sampler.await;
        println!(
            "memory: server RSS peak {:.1} MiB while publishing",
            mib(peak_rss.load(Ordering::Relaxed))
        );
    }
    let mut stalled_open = 0;
    if args.stalled > 0 {
        let (mut with_4100, mut without_frame, mut other) = (0, 0, Vec::new());
        while let Some(end) = stalled.join_next().await {
            match end.unwrap_or(StalledEnd::StillOpen) {
                StalledEnd::Closed(4100) => with_4100 += 1,
                StalledEnd::Closed(code) => other.push(code),
                StalledEnd::Dropped => without_frame += 1,
                StalledEnd::StillOpen => stalled_open += 1,
            }
        }
        println!(
            "stalled: {} connections stopped reading; closed by the server: {with_4100} with 4100, {without_frame} without a close frame (it did not fit in the full socket){}; {stalled_open} still open",
            args.stalled,
            if other.is_empty() {
                String::new()
            } else {
                format!(", with other codes {other:?}")
            }
        );
    }
    let received = counters.received.load(Ordering::Acquire);
    let window_us = counters
        .last_received_us
        .load(Ordering::Acquire)
        .saturating_sub(publish_start_us)
        .max(1);
    println!(
        "deliveries: {received} of {} expected ({:.2}%), {:.0}/s; {} connections closed by the server",
        published.expected,
        100.0 * received as f64 / published.expected.max(1) as f64,
        received as f64 / (window_us as f64 / 1e6),
        counters.disconnected.load(Ordering::Acquire)
    );
    latencies.sort_unstable();
    let at = |p: usize| {
        let last = latencies.len().checked_sub(1)?;
        Some(ms(latencies[(latencies.len() * p / 100).min(last)]))
    };
    let (p50, p99, max) = (at(50), at(99), at(100));
    match (p50, p99, max) {
        (Some(p50), Some(p99), Some(max)) => {
            println!("latency publish->receive: p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms")
        }
        _ => println!("latency: no deliveries"),
    }
    let complete = received >= published.expected && published.failed == 0 && failures == 0;
    if let Some(path) = &args.json {
        let line = serde_json::json!({
            "protocol": match *face { Face::Pusher => "pusher", Face::SocketIo(_) => "socketio" },
            "connections": args.connections,
            "subscribed": connected,
            "connect_failures": failures,
            "channels": args.channels,
            "channel_prefix": args.channel_prefix,
            "rate": args.rate,
            "duration": args.duration,
            "payload": args.payload,
            "batch": args.batch,
            "published": published.ok,
            "publish_failures": published.failed,
            "publish_seconds": publish_secs,
            "published_per_sec": published.ok as f64 / publish_secs,
            "expected": published.expected,
            "received": received,
            "deliveries_per_sec": received as f64 / (window_us as f64 / 1e6),
            "closed_by_server": counters.disconnected.load(Ordering::Acquire),
            "p50_ms": p50,
            "p99_ms": p99,
            "max_ms": max,
            "server_rss_before_mib": rss_before.map(mib),
            "server_rss_idle_mib": idle_rss.map(mib),
            "memory_per_connection_kib": per_connection_kib,
            "server_peak_rss_mib": args.server_pid.map(|_| mib(peak_rss.load(Ordering::Relaxed))),
            "stalled": args.stalled,
            "stalled_never_closed": stalled_open,
            "complete": complete && stalled_open == 0,
        });
        append_json_line(path, &line).with_context(|| format!("writing {}", path.display()))?;
    }
    // A run that lost events or requests is not a measurement: say so in the exit status.
    if !complete {
        bail!(
            "incomplete run: {received} of {} deliveries, {} publishes and {failures} connections failed",
            published.expected,
            published.failed
        );
    }
    if stalled_open > 0 {
        bail!("{stalled_open} stalled connections were never closed by the server");
    }
    Ok(())
}

/// A stalled consumer's receive buffer. Set explicitly, it stays this small (the kernel would
/// otherwise grow it to tens of MB for a reader that never reads, and the server would only
/// notice the stall after that much), as on a client whose application stopped reading.
const STALLED_RECEIVE_BUFFER: u32 = 16 * 1024;

/// Pusher: connects with a small receive buffer and subscribes to every one of `channels`,
/// waiting for each confirmation.
async fn subscribe_all(
    host: &str,
    port: u16,
    url: &str,
    channels: &[String],
) -> anyhow::Result<Socket> {
    let address = tokio::net::lookup_host((host, port))
        .await
        .context("resolving the server")?
        .next()
        .context("the server's name resolves to nothing")?;
    let tcp = if address.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .context("opening a socket")?;
    tcp.set_recv_buffer_size(STALLED_RECEIVE_BUFFER)
        .context("setting the receive buffer")?;
    let stream = tcp.connect(address).await.context("connecting")?;
    let (socket, _) = tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream))
        .await
        .context("the WebSocket handshake")?;
    let (first, rest) = channels.split_first().context("no channels")?;
    let mut socket = subscribe_on(socket, first).await?;
    for channel in rest {
        let subscribe =
            serde_json::json!({"event": "pusher:subscribe", "data": {"channel": channel}});
        socket
            .send(Message::text(subscribe.to_string()))
            .await
            .context("subscribing")?;
        loop {
            let (event, text) = next_event(&mut socket).await?;
            match event.as_str() {
                "pusher_internal:subscription_succeeded" => break,
                "pusher:subscription_error" | "pusher:error" => {
                    bail!("subscription refused: {text}")
                }
                _ => {}
            }
        }
    }
    Ok(socket)
}

/// How a stalled connection ended, as it reads what was left once the run is over.
enum StalledEnd {
    /// The server's close frame, with its code.
    Closed(u16),
    /// The connection ended without a close frame.
    Dropped,
    /// Still delivering events: the server never gave up on it.
    StillOpen,
}

/// Reads what a stalled connection was sent: the buffered events, then how it ended. A
/// connection the server closed ends within moments; one it kept keeps delivering.
async fn stalled_end(mut socket: Socket) -> StalledEnd {
    let read = async {
        loop {
            match socket.next().await {
                Some(Ok(Message::Close(frame))) => {
                    return frame
                        .map_or(StalledEnd::Dropped, |f| StalledEnd::Closed(f.code.into()));
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return StalledEnd::Dropped,
            }
        }
    };
    tokio::time::timeout(STALLED_READ, read)
        .await
        .unwrap_or(StalledEnd::StillOpen)
}

/// Pusher: connects (bound to `source`, if given), waits for the handshake, subscribes and
/// waits for the confirmation.
async fn subscribe(url: &str, channel: &str, source: Option<IpAddr>) -> anyhow::Result<Socket> {
    let socket = match source {
        None => connect_async(url).await.context("connecting")?.0,
        Some(source) => connect_from(url, source).await?,
    };
    subscribe_on(socket, channel).await
}

/// Opens the WebSocket at `url` from the local address `source` (as `connect_async` would,
/// Nagle included, after binding the socket).
async fn connect_from(url: &str, source: IpAddr) -> anyhow::Result<Socket> {
    let parsed = url::Url::parse(url).context("the server's URL")?;
    let host = parsed.host_str().context("the URL names no host")?;
    let port = parsed
        .port_or_known_default()
        .context("the URL names no port")?;
    let server = tokio::net::lookup_host((host, port))
        .await
        .context("resolving the server")?
        .find(|a| a.is_ipv4() == source.is_ipv4())
        .context("the server has no address of the source address's family")?;
    let tcp = if source.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .context("opening a socket")?;
    tcp.bind(SocketAddr::new(source, 0))
        .with_context(|| format!("binding to {source}"))?;
    // Closed with a reset, not a FIN: a port taken by `bind` stays taken while its connection
    // is in TIME_WAIT (a minute), on every address for `connect`'s own choice of port, so
    // tens of thousands of them would leave the next run (ours or another client's) short of
    // ports. The server has been measured by the time this client closes anything.
    tcp.set_zero_linger().context("setting SO_LINGER")?;
    let stream = tcp.connect(server).await.context("connecting")?;
    let (socket, _) = tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream))
        .await
        .context("the WebSocket handshake")?;
    Ok(socket)
}

/// Pusher: on a connected socket, waits for the handshake, subscribes and waits for the
/// confirmation.
async fn subscribe_on(mut socket: Socket, channel: &str) -> anyhow::Result<Socket> {
    let hello = next_event(&mut socket).await?;
    if hello.0 != "pusher:connection_established" {
        bail!("expected pusher:connection_established, got {}", hello.0);
    }
    let subscribe = serde_json::json!({"event": "pusher:subscribe", "data": {"channel": channel}});
    socket
        .send(Message::text(subscribe.to_string()))
        .await
        .context("subscribing")?;
    loop {
        let (event, text) = next_event(&mut socket).await?;
        match event.as_str() {
            "pusher_internal:subscription_succeeded" => return Ok(socket),
            "pusher:subscription_error" | "pusher:error" => bail!("subscription refused: {text}"),
            _ => {}
        }
    }
}

async fn next_event(socket: &mut Socket) -> anyhow::Result<(String, String)> {
    let wait = async {
        loop {
            match socket.next().await {
                Some(Ok(Message::Text(text))) => {
                    let value: serde_json::Value =
                        serde_json::from_str(text.as_str()).context("server sent bad JSON")?;
                    let event = value["event"].as_str().unwrap_or_default().to_owned();
                    return Ok((event, text.as_str().to_owned()));
                }
                Some(Ok(Message::Close(frame))) => bail!("closed by the server: {frame:?}"),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e).context("reading"),
                None => bail!("connection ended"),
            }
        }
    };
    tokio::time::timeout(REPLY_TIMEOUT, wait)
        .await
        .context("no reply in time")?
}

/// Reads until `stop`, answering pings; returns each bench event's latency in microseconds.
async fn receive(
    mut socket: Socket,
    face: &Face,
    counters: &Counters,
    stop: &CancellationToken,
) -> Vec<u32> {
    let mut latencies = Vec::new();
    loop {
        let message = tokio::select! {
            () = stop.cancelled() => break,
            message = socket.next() => message,
        };
        match message {
            Some(Ok(Message::Text(text))) => match face.read(text.as_str()) {
                Inbound::Delivery(sent_us) => {
                    let now = now_us();
                    latencies.push(u32::try_from(now.saturating_sub(sent_us)).unwrap_or(u32::MAX));
                    counters.received.fetch_add(1, Ordering::AcqRel);
                    counters.last_received_us.fetch_max(now, Ordering::AcqRel);
                }
                Inbound::Reply(pong) => {
                    if socket.send(Message::text(pong)).await.is_err() {
                        break;
                    }
                }
                Inbound::Closed => {
                    counters.disconnected.fetch_add(1, Ordering::AcqRel);
                    return latencies;
                }
                Inbound::Other => {}
            },
            Some(Ok(Message::Close(_)) | Err(_)) | None => {
                counters.disconnected.fetch_add(1, Ordering::AcqRel);
                return latencies;
            }
            Some(Ok(_)) => {}
        }
    }
    let _ = socket.close(None).await;
    latencies
}

/// Pusher: the send time of a bench event frame, read without building a JSON tree: the frame is
/// `{"event":"bench","channel":"...","data":"<µs>:<padding>"}` in any key order.
fn bench_timestamp(frame: &str) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Frame<'a> {
        event: &'a str,
        #[serde(default)]
        data: Option<&'a str>,
    }
    let frame: Frame<'_> = serde_json::from_str(frame).ok()?;
    if frame.event != EVENT {
        return None;
    }
    frame.data?.split(':').next()?.parse().ok()
}

struct Publisher {
    http: reqwest::Client,
    url: String,
    path: String,
    /// Through `/batch_events` (`--batch` above 1).
    batched: bool,
}

#[derive(Default)]
struct Published {
    ok: u64,
    failed: u64,
    /// Deliveries the successful publishes should cause.
    expected: u64,
    first_publish_us: u64,
    first_error: Option<String>,
}

impl Publisher {
    fn new(args: &Args) -> anyhow::Result<Self> {
        // reqwest is built with rustls but no bundled crypto provider; plain HTTP needs none,
        // but the client builder insists on one being installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let batched = args.batch > 1;
        let endpoint = if batched { "batch_events" } else { "events" };
        let path = format!("/apps/{}/{endpoint}", args.app_id);
        Ok(Self {
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(args.publish_concurrency)
                .build()
                .context("building the HTTP client")?,
            url: format!("http://{}:{}{path}", args.host, args.port),
            path,
            batched,
        })
    }

    /// Publishes `rate * duration` events, `batch` to a request, paced to `rate` events a
    /// second with at most `publish_concurrency` requests in flight. Event `n` goes to channel
    /// `n % channels`.
    async fn run(self, args: &Args, subscribers: &[u64]) -> Published {
        let this = Arc::new(self);
        let in_flight = Arc::new(Semaphore::new(args.publish_concurrency.max(1)));
        let batch = u64::from(args.batch);
        let mut ticks =
            tokio::time::interval(Duration::from_secs_f64(batch as f64 / f64::from(args.rate)));
        let total = u64::from(args.rate) * args.duration;
        let padding = "x".repeat(args.payload);
        let mut requests = JoinSet::new();
        let mut result = Published {
            first_publish_us: now_us(),
            ..Published::default()
        };
        for first in (0..total).step_by(batch as usize) {
            ticks.tick().await;
            let channels: Vec<usize> = (first..total.min(first + batch))
                .map(|n| (n % subscribers.len() as u64) as usize)
                .collect();
            let Ok(permit) = Arc::clone(&in_flight).acquire_owned().await else {
                break;
            };
            let this = Arc::clone(&this);
            let (padding, secret, key) = (padding.clone(), args.secret.clone(), args.key.clone());
            let prefix = args.channel_prefix.clone();
            requests.spawn(async move {
                let outcome = this
                    .publish(&key, &secret, &prefix, &channels, &padding)
                    .await;
                drop(permit);
                (channels, outcome)
            });
            while let Some(done) = requests.try_join_next() {
                tally(&mut result, subscribers, done);
            }
        }
        while let Some(done) = requests.join_next().await {
            tally(&mut result, subscribers, done);
        }
        result
    }

    /// One request: the event to `channels[0]` through `/events`, or one event to each of
    /// `channels` through `/batch_events`.
    async fn publish(
        &self,
        key: &str,
        secret: &str,
        prefix: &str,
        channels: &[usize],
        padding: &str,
    ) -> Result<(), String> {
        let event = |index: &usize| {
            serde_json::json!({
                "name": EVENT,
                "channel": format!("{prefix}{index}"),
                "data": format!("{}:{padding}", now_us()),
            })
        };
        let body = match channels {
            [only] if !self.batched => event(only),
            _ => serde_json::json!({ "batch": channels.iter().map(event).collect::<Vec<_>>() }),
        }
        .to_string();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or_default();
        let query = herald_core::pusher::sign_request(
            key,
            secret,
            "POST",
            &self.path,
            &[],
            body.as_bytes(),
            now,
        );
        let url = url::Url::parse_with_params(&self.url, &query).map_err(|e| e.to_string())?;
        let response = self
            .http
            .post(url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            let text = response.text().await.unwrap_or_default();
            Err(format!("{status}: {}", text.trim()))
        }
    }
}

/// Counts one request's events as published (and the deliveries they should cause) or failed;
/// a request whose task panicked counts as one failed event.
fn tally(
    result: &mut Published,
    subscribers: &[u64],
    done: Result<(Vec<usize>, Result<(), String>), tokio::task::JoinError>,
) {
    match done {
        Ok((channels, Ok(()))) => {
            result.ok += channels.len() as u64;
            result.expected += channels.iter().map(|&c| subscribers[c]).sum::<u64>();
        }
        Ok((channels, Err(e))) => {
            result.failed += channels.len() as u64;
            result.first_error.get_or_insert(e);
        }
        Err(e) => {
            result.failed += 1;
            result.first_error.get_or_insert(e.to_string());
        }
    }
}

fn ms(us: u32) -> f64 {
    f64::from(us) / 1000.0
}
