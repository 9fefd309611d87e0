//! `ref-broadcast`: the ceiling reference for `pusher-bench`, a minimal broadcast server.
//!
//! It speaks just enough Pusher protocol 7 for the load client: a WebSocket at `/app/{key}`
//! that sends `pusher:connection_established`, subscribes public channels
//! (`pusher_internal:subscription_succeeded`) and answers `pusher:ping`; and
//! `POST /apps/{app_id}/events` and `/batch_events`, whose signatures it does not check. No
//! auth, no presence, no history, no limits: what is left is the cost of a broadcast itself.
//!
//! Each published event is serialized once per channel into a complete WebSocket frame, shared
//! (`Bytes`) by every subscriber. Each connection has a writer task that takes everything queued
//! for it and writes it with one vectored write; its queue is bounded (a subscriber that lets
//! it fill is disconnected) and its read buffer small. WebSocket framing is done here, not by
//! a library, so that a frame is built once rather than once per connection.

use std::{
    collections::{HashMap, VecDeque},
    io::IoSlice,
    net::SocketAddr,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
};

use anyhow::Context;
use axum::{
    Json, Router,
    body::Body,
    extract::{Request, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
    serve::ListenerExt as _,
};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use clap::Parser;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader},
    sync::mpsc,
};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_util::sync::CancellationToken;

/// Frames queued for one connection before it counts as too slow and is dropped.
const QUEUE_FRAMES: usize = 1024;
/// Frames taken into one write at most (well under the kernel's `IOV_MAX`).
const WRITE_BATCH: usize = 256;
/// A connection's read buffer: clients only send small control messages.
const READ_BUFFER: usize = 512;
/// The largest client message accepted.
const MAX_CLIENT_MESSAGE: u64 = 16 * 1024;

#[derive(Parser)]
#[command(
    about = "Minimal Pusher-protocol broadcast server: the ceiling reference for pusher-bench"
)]
struct Args {
    /// Address for both the WebSocket and the HTTP API.
    #[arg(long, default_value = "127.0.0.1:6001")]
    listen: SocketAddr,
}

/// One connection as the channels see it.
#[derive(Clone)]
struct Subscriber {
    queue: mpsc::Sender<Bytes>,
    closed: CancellationToken,
}

#[derive(Default)]
struct Hub {
    /// Channel name to its subscribers by connection id.
    channels: RwLock<HashMap<String, HashMap<u64, Subscriber>>>,
    next_id: AtomicU64,
}

impl Hub {
    fn subscribe(&self, channel: &str, id: u64, subscriber: &Subscriber) {
        let mut channels = self.channels.write().expect("hub lock");
        channels
            .entry(channel.to_owned())
            .or_default()
            .insert(id, subscriber.clone());
    }

    fn unsubscribe(&self, channel: &str, id: u64) {
        let mut channels = self.channels.write().expect("hub lock");
        if let Some(subscribers) = channels.get_mut(channel) {
            subscribers.remove(&id);
            if subscribers.is_empty() {
                channels.remove(channel);
            }
        }
    }

    /// Serializes the event once and queues the same frame for every subscriber.
    fn publish(&self, channel: &str, event: &str, data: &str) {
        let json = json!({"event": event, "channel": channel, "data": data}).to_string();
        let frame = text_frame(json.as_bytes());
        let channels = self.channels.read().expect("hub lock");
        for subscriber in channels.get(channel).into_iter().flat_map(HashMap::values) {
            if subscriber.queue.try_send(frame.clone()).is_err() {
                // Too slow (or gone): the connection ends, and its reader unsubscribes it.
                subscriber.closed.cancel();
            }
        }
    }
}

/// A complete, unmasked server frame (FIN, text).
fn text_frame(payload: &[u8]) -> Bytes {
    frame(0x81, payload)
}

fn frame(first_byte: u8, payload: &[u8]) -> Bytes {
    let mut frame = BytesMut::with_capacity(payload.len() + 10);
    frame.put_u8(first_byte);
    match payload.len() {
        n if n < 126 => frame.put_u8(n as u8),
        n if n <= 0xffff => {
            frame.put_u8(126);
            frame.put_u16(n as u16);
        }
        n => {
            frame.put_u8(127);
            frame.put_u64(n as u64);
        }
    }
    frame.extend_from_slice(payload);
    frame.freeze()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let hub = Arc::new(Hub::default());
    let app = Router::new()
        .route("/app/{key}", get(upgrade))
        .route("/apps/{app_id}/events", post(events))
        .route("/apps/{app_id}/batch_events", post(batch_events))
        .with_state(hub);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    // The same first line as Herald's, so scripts find the port the same way.
    println!(
        "ref-broadcast listening on http://{}",
        listener.local_addr()?
    );
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app).await?;
    Ok(())
}

#[derive(Deserialize)]
struct Event {
    name: String,
    #[serde(default)]
    channel: Option<String>,
    #[serde(default)]
    channels: Vec<String>,
    data: String,
}

impl Event {
    fn publish(&self, hub: &Hub) {
        for channel in self.channel.iter().chain(&self.channels) {
            hub.publish(channel, &self.name, &self.data);
        }
    }
}

async fn events(State(hub): State<Arc<Hub>>, Json(event): Json<Event>) -> Json<Value> {
    event.publish(&hub);
    Json(json!({}))
}

#[derive(Deserialize)]
struct Batch {
    batch: Vec<Event>,
}

async fn batch_events(State(hub): State<Arc<Hub>>, Json(batch): Json<Batch>) -> Json<Value> {
    for event in &batch.batch {
        event.publish(&hub);
    }
    Json(json!({"batch": batch.batch.iter().map(|_| json!({})).collect::<Vec<_>>()}))
}

/// The WebSocket handshake, answered by hand so the connection's bytes are ours afterwards.
async fn upgrade(State(hub): State<Arc<Hub>>, mut request: Request) -> Response {
    let Some(key) = request.headers().get(header::SEC_WEBSOCKET_KEY) else {
        return (StatusCode::BAD_REQUEST, "a WebSocket upgrade is expected").into_response();
    };
    let accept = derive_accept_key(key.as_bytes());
    let upgrading = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        if let Ok(upgraded) = upgrading.await {
            connection(hub, TokioIo::new(upgraded)).await;
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept)
        .body(Body::empty())
        .unwrap_or_default()
}

/// One socket: this task reads the client, a second one writes everything queued for it.
async fn connection(hub: Arc<Hub>, io: impl AsyncRead + AsyncWrite + Send + 'static) {
    let (read, write) = tokio::io::split(io);
    let id = hub.next_id.fetch_add(1, Ordering::Relaxed);
    let (queue, queued) = mpsc::channel(QUEUE_FRAMES);
    let me = Subscriber {
        queue,
        closed: CancellationToken::new(),
    };
    tokio::spawn(writer(write, queued, me.closed.clone()));
    let established = json!({
        "event": "pusher:connection_established",
        "data": json!({"socket_id": format!("{id}.{id}"), "activity_timeout": 120}).to_string(),
    });
    let _ = me
        .queue
        .try_send(text_frame(established.to_string().as_bytes()));
    let mut subscribed = Vec::new();
    let mut read = BufReader::with_capacity(READ_BUFFER, read);
    loop {
        let message = tokio::select! {
            () = me.closed.cancelled() => break,
            message = read_message(&mut read) => message,
        };
        let Ok((opcode, payload)) = message else {
            break;
        };
        let reply = match opcode {
            0x1 => on_text(&hub, id, &me, &mut subscribed, &payload),
            0x8 => {
                let _ = me.queue.try_send(frame(0x88, &payload));
                break;
            }
            0x9 => Some(frame(0x8a, &payload)),
            _ => None,
        };
        if let Some(reply) = reply
            && me.queue.send(reply).await.is_err()
        {
            break;
        }
    }
    for channel in &subscribed {
        hub.unsubscribe(channel, id);
    }
    // The writer sends what is queued (a close frame, maybe) and ends with the last sender.
    drop(me);
}

/// A Pusher client event: subscribe, unsubscribe, ping; anything else is ignored.
fn on_text(
    hub: &Hub,
    id: u64,
    me: &Subscriber,
    subscribed: &mut Vec<String>,
    text: &[u8],
) -> Option<Bytes> {
    let message: Value = serde_json::from_slice(text).ok()?;
    let channel = message["data"]["channel"].as_str().unwrap_or_default();
    let reply = match message["event"].as_str()? {
        "pusher:ping" => json!({"event": "pusher:pong", "data": {}}),
        "pusher:subscribe" if !channel.is_empty() => {
            if !subscribed.iter().any(|c| c == channel) {
                hub.subscribe(channel, id, me);
                subscribed.push(channel.to_owned());
            }
            json!({"event": "pusher_internal:subscription_succeeded", "channel": channel, "data": "{}"})
        }
        "pusher:unsubscribe" => {
            hub.unsubscribe(channel, id);
            subscribed.retain(|c| c != channel);
            return None;
        }
        _ => return None,
    };
    Some(text_frame(reply.to_string().as_bytes()))
}

/// Reads one client frame and unmasks it. Client messages are small and unfragmented; a
/// continuation frame is returned as its own opcode (0) and ignored.
async fn read_message(read: &mut (impl AsyncRead + Unpin)) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 2];
    read.read_exact(&mut head).await?;
    let length = match head[1] & 0x7f {
        126 => u64::from(read.read_u16().await?),
        127 => read.read_u64().await?,
        n => u64::from(n),
    };
    if length > MAX_CLIENT_MESSAGE {
        return Err(std::io::Error::other("client message too large"));
    }
    let mut mask = [0u8; 4];
    if head[1] & 0x80 != 0 {
        read.read_exact(&mut mask).await?;
    }
    let mut payload = vec![0u8; length as usize];
    read.read_exact(&mut payload).await?;
    for (i, byte) in payload.iter_mut().enumerate() {
        *byte ^= mask[i % 4];
    }
    Ok((head[0] & 0x0f, payload))
}

/// Waits for a frame, takes whatever else is queued behind it, and writes them all at once.
async fn writer(
    mut write: impl AsyncWrite + Unpin,
    mut queued: mpsc::Receiver<Bytes>,
    closed: CancellationToken,
) {
    let mut frames = VecDeque::new();
    loop {
        let first = tokio::select! {
            () = closed.cancelled() => break,
            frame = queued.recv() => frame,
        };
        let Some(first) = first else { break };
        frames.push_back(first);
        while frames.len() < WRITE_BATCH {
            match queued.try_recv() {
                Ok(frame) => frames.push_back(frame),
                Err(_) => break,
            }
        }
        if write_all(&mut write, &mut frames).await.is_err() {
            break;
        }
    }
    closed.cancel();
    let _ = write.shutdown().await;
}

/// Writes every frame with as few (vectored) writes as the socket takes.
async fn write_all(
    write: &mut (impl AsyncWrite + Unpin),
    frames: &mut VecDeque<Bytes>,
) -> std::io::Result<()> {
    while !frames.is_empty() {
        let slices: Vec<IoSlice<'_>> = frames.iter().map(|f| IoSlice::new(f)).collect();
        let mut written = write.write_vectored(&slices).await?;
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while let Some(front) = frames.front_mut() {
            if written < front.len() {
                front.advance(written);
                break;
            }
            written -= front.len();
            frames.pop_front();
        }
    }
    Ok(())
}
