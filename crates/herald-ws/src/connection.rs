//! One WebSocket connection: the upgrade and the socket loop.
//!
//! The upgrade admits the client's address (`limits`: room for one more connection, or the
//! socket is closed with 4100, back off and reconnect), looks the app up by key, checks the
//! protocol version and the app's connection quota. Then two tasks serve the connection. The
//! reader reads client messages, parses each ([`protocol::client`]) and hands it to the
//! connection's [`Session`] (the protocol state machine), keeps time (after
//! `activity_timeout` of silence it pings, and after `pong_timeout` more it closes with 4201)
//! and decides the close: the code the session, the transport, the outbox or the hub asks
//! for. The writer writes queued frames, coalescing whatever is queued into one flush, and
//! the close frame the reader hands it.

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    Extension, Router,
    extract::{
        ConnectInfo, Path, Query, State, WebSocketUpgrade,
        ws::{CloseFrame, Message, WebSocket},
    },
    http::HeaderMap,
    response::Response,
    routing::get,
};
use futures_util::{
    SinkExt, StreamExt,
    stream::{SplitSink, SplitStream},
};
use herald_core::{model::App, pusher};
use herald_store::Store;
use tokio::{sync::oneshot, task::JoinHandle, time::Instant};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    Hub, Outgoing, Publisher, WsConfig, close,
    hub::{AppHub, Frames, Outbox},
    limits::ClientPermit,
    protocol,
    session::{APP_DELETED, Live, Session},
    transport,
};

/// What the `/app/{key}` route needs.
#[derive(Clone)]
pub struct WsState {
    pub store: Arc<dyn Store>,
    pub hub: Arc<Hub>,
    /// The one publish path (client events), with channel history (joins and resumption).
    pub publisher: Arc<Publisher>,
    /// Shared by every connection's session (one pointer each, not a copy).
    pub config: Arc<WsConfig>,
    /// Cancelled at shutdown: every connection closes with 4200 (reconnect).
    pub shutdown: CancellationToken,
    /// Connection tasks, so shutdown can wait for them.
    pub tasks: TaskTracker,
}

/// Limit for the development echo route: Autobahn's core cases send up to 64 KiB and more.
const ECHO_MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// `/app/{key}`; with `dev`, also `/_dev/echo`, the echo endpoint for conformance testing.
pub fn router(state: WsState, dev: bool) -> Router {
    let mut router = Router::new().route("/app/{key}", get(upgrade));
    if dev {
        router = router.route(
            "/_dev/echo",
            get(|ws: WebSocketUpgrade| async move {
                transport::configure(ws, ECHO_MAX_MESSAGE_BYTES).on_upgrade(transport::echo)
            }),
        );
    }
    router.with_state(state)
}

async fn upgrade(
    State(state): State<WsState>,
    Path(key): Path<String>,
    Query(params): Query<HashMap<String, String>>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    // The transport enforces the message limit; `serve` answers an oversized message with 1009.
    let ws = transport::configure(ws, state.config.max_message_bytes);
    let tasks = state.tasks.clone();
    // The address's limits come first: a refused client costs no lookup.
    let peer = peer.map(|Extension(ConnectInfo(p))| p);
    let permit = match state
        .config
        .clients
        .admit_request(peer, &headers, "WebSocket")
    {
        Ok(permit) => permit,
        Err(refusal) => {
            let reason = refusal.message();
            return ws.on_upgrade(move |socket| {
                let (sink, stream) = socket.split();
                tasks.track_future(async move {
                    close_now(sink, stream, close::OVER_CAPACITY, &reason).await;
                })
            });
        }
    };
    let app = state.store.get_app_by_pusher_key(&key).await;
    let protocol = params.get("protocol").map(|p| p.parse::<u32>());
    let upgraded = Box::new(Upgraded {
        state,
        app,
        protocol,
        key,
        permit,
    });
    // Split here, in the closure, not in the task's future: an async block keeps what it
    // captured for as long as it lives, and the whole socket would be kept inline (beside the
    // halves that hold it) by every idle connection's task.
    ws.on_upgrade(move |socket| {
        let (sink, stream) = socket.split();
        tasks.track_future(connected(sink, stream, upgraded))
    })
}

/// What an upgraded connection needs from its request, boxed: axum's upgrade task keeps the
/// closure that captured it for the connection's whole life, so inline it would be paid for
/// by every idle connection, once in that closure and once in the connection's own future.
struct Upgraded {
    state: WsState,
    app: Result<Option<App>, herald_store::StoreError>,
    protocol: Option<Result<u32, std::num::ParseIntError>>,
    key: String,
    permit: ClientPermit,
}

/// An upgraded socket: refused with the close code that says why, or served until it ends.
async fn connected(sink: Sink, stream: Stream, upgraded: Box<Upgraded>) {
    // Decided in a plain function, which frees the box and whatever the request left that
    // the connection does not need: an async function keeps its locals (and a box it moved
    // out of) for as long as it lives, that is for the connection's whole life.
    match admit(unbox(upgraded)) {
        Admitted::Refused(code, reason) => close_now(sink, stream, code, &reason).await,
        Admitted::Serve(admitted) => {
            let Serve {
                state,
                app,
                counted,
                permit,
            } = unbox(admitted);
            serve(sink, stream, app, Arc::clone(&counted.0), &state, permit).await;
            drop(counted);
        }
    }
}

/// Moves the value out of its box and frees the box here, not at the end of the async caller.
#[allow(
    clippy::boxed_local,
    reason = "taking the box is the point: it is freed here"
)]
fn unbox<T>(boxed: Box<T>) -> T {
    *boxed
}

enum Admitted {
    Refused(u16, String),
    /// Boxed: the async caller matches on this across the connection's life, so whatever of
    /// the enum it keeps is a pointer (the box itself is freed by [`unbox`]).
    Serve(Box<Serve>),
}

/// What a connection that was let in is served with.
struct Serve {
    state: WsState,
    app: Arc<App>,
    /// The app's hub, which counted the connection ([`AppHub::connect`]).
    counted: CountedConnection,
    permit: ClientPermit,
}

/// A connection counted by its app's hub, given back when dropped: when the connection ends,
/// and also if its task is dropped or unwinds, so the app's quota and the connection gauges
/// never keep a connection that is gone.
struct CountedConnection(Arc<AppHub>);

impl Drop for CountedConnection {
    fn drop(&mut self) {
        self.0.disconnect(herald_channels::Transport::Pusher);
    }
}

fn admit(upgraded: Upgraded) -> Admitted {
    let Upgraded {
        state,
        app,
        protocol,
        key,
        permit,
    } = upgraded;
    let app = match (app, protocol) {
        (Err(e), _) => {
            tracing::error!(error = %e, "looking up an app key failed");
            // 4100, not 4200: pusher-js reconnects at once after a 42xx, and after a 41xx only
            // once it has backed off, which is what a store that cannot answer needs, rather
            // than every client of the app asking again in a tight loop.
            return Admitted::Refused(
                close::OVER_CAPACITY,
                "temporary server error (the store cannot be read); reconnect after a pause"
                    .to_owned(),
            );
        }
        (Ok(None), _) => {
            return Admitted::Refused(
                close::APP_DOES_NOT_EXIST,
                format!("no app has the key {key}"),
            );
        }
        (_, Some(Ok(v))) if !(5..=7).contains(&v) => {
            return Admitted::Refused(
                close::UNSUPPORTED_PROTOCOL,
                format!("protocol version {v} is not supported (use 7)"),
            );
        }
        (_, Some(Err(_))) => {
            return Admitted::Refused(
                close::UNSUPPORTED_PROTOCOL,
                "protocol must be a number".to_owned(),
            );
        }
        (Ok(Some(app)), _) => app,
    };
    let hub = state.hub.app(&app.id);
    if hub.is_removed() {
        // Deleted after the key was looked up.
        return Admitted::Refused(close::APP_DOES_NOT_EXIST, APP_DELETED.to_owned());
    }
    if !hub.connect(
        state.config.max_connections_per_app,
        herald_channels::Transport::Pusher,
    ) {
        return Admitted::Refused(
            close::OVER_CONNECTION_QUOTA,
            "the app is over its connection quota".to_owned(),
        );
    }
    let app = hub.share_app(app);
    Admitted::Serve(Box::new(Serve {
        state,
        app,
        counted: CountedConnection(hub),
        permit,
    }))
}

/// A close frame's reason is at most 123 bytes (RFC 6455, 5.5: a control frame's payload is
/// at most 125, two of them the code). Ours can name what the client sent (an app key from
/// the URL), so they are cut at a character; a longer frame is a protocol error that browsers
/// report as 1006, hiding the code from the client.
const MAX_CLOSE_REASON: usize = 123;

fn close_frame(code: u16, reason: &str) -> Message {
    let mut end = reason.len().min(MAX_CLOSE_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    Message::Close(Some(CloseFrame {
        code,
        reason: reason[..end].into(),
    }))
}

async fn close_now(mut sink: Sink, mut stream: Stream, code: u16, reason: &str) {
    let _ = sink.send(close_frame(code, reason)).await;
    // Let the close handshake finish (the client answers our close frame).
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(Ok(_)) = stream.next().await {}
    })
    .await;
}

type Sink = SplitSink<WebSocket, Message>;
type Stream = SplitStream<WebSocket>;

/// How the reader tells the writer that the connection ends: with this close frame, or
/// (`None`) without one, the client being gone.
type Ending = Option<(u16, String)>;

/// The connection's reader, the task that owns it: client messages, the session, the idle
/// timer, and every reason to close. Frames go out through a writer task of its own
/// ([`write_frames`]), so that a frame written wakes nothing but the writer: one task
/// selecting over both polled the socket's read side and the two cancellation tokens (a mutex
/// each) after every write, about 5% of the server's CPU under fan-out.
///
/// Its future is what an idle connection's task holds, so what only runs now and then (a
/// client message's handling, the close) is boxed when it runs instead of being laid out
/// inline for the connection's whole life.
async fn serve(
    sink: Sink,
    mut stream: Stream,
    app: Arc<App>,
    hub: Arc<AppHub>,
    state: &WsState,
    permit: ClientPermit,
) {
    let config = &state.config;
    // Cancelled by everything that ends the connection but the server's shutdown: its
    // termination (sign-in), its app's deletion (a child of the app's token) and its outbox
    // overflowing. `closed_because` tells them apart.
    let closing = hub.connection_token();
    let (outbox, frames) = Outbox::pusher_closing(config.outbox_frames, closing.clone());
    let socket_id = pusher::new_socket_id(&mut rand::rng());
    let backend = Live {
        app,
        store: Arc::clone(&state.store),
        publisher: Arc::clone(&state.publisher),
        client: permit,
    };
    let mut session = Session::new(
        backend,
        Arc::clone(&hub),
        Arc::clone(config),
        socket_id,
        outbox.clone(),
        closing.clone(),
    );
    let (end_writer, ending) = oneshot::channel();
    // Not tracked: this task awaits it on every way out, and is tracked itself.
    let mut writer = tokio::spawn(write_frames(sink, frames, ending));

    // The futures below live across iterations: re-creating them for every message would
    // register and cancel a timer and lock two cancellation tokens each time.
    let shutdown = state.shutdown.cancelled();
    let closed = closing.cancelled();
    let mut last_heard = Instant::now();
    let mut pinged = false;
    // The client closed: its close frame is answered once the stream is read again.
    let mut client_closed = false;
    let idle = tokio::time::sleep_until(last_heard + config.activity_timeout);
    tokio::pin!(shutdown, closed, idle);
    let close = loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break Some(shutting_down()),
            () = &mut closed => break Some(closed_because(&outbox, &hub)),
            // The writer stops on its own only when the client took no more frames.
            _ = &mut writer => {
                session.leave_all();
                return;
            }
            message = stream.next() => {
                let message = match message {
                    Some(Ok(message)) => message,
                    // Over the size limit, not UTF-8, or not the protocol: the transport refused
                    // the message but the socket can still carry the close frame that says why.
                    Some(Err(e)) => break transport::read_error_close(&e).map(|(code, reason)| {
                        tracing::debug!(error = %e, code, "closing a connection after a bad frame");
                        let reason = if code == close::MESSAGE_TOO_BIG {
                            format!("messages are limited to {} bytes", config.max_message_bytes)
                        } else {
                            reason.to_owned()
                        };
                        (code, reason)
                    }),
                    None => break None,
                };
                // The idle timer is not moved here; when it fires it checks this instead.
                last_heard = Instant::now();
                pinged = false;
                match message {
                    Message::Text(text) => {
                        let message = protocol::client::parse(text.as_str());
                        // Boxed: a message's handling (a subscribe's signature check and
                        // history, a client event's publish) is about 1 KB of future that an
                        // idle connection would otherwise carry (see `serve`).
                        if let Some(close) = Box::pin(session.handle(message)).await {
                            break Some(close);
                        }
                        // A subscribe it deferred wakes the idle timer, which runs it.
                        if let Some(due) = session.next_deferred()
                            && due < idle.deadline()
                        {
                            idle.as_mut().reset(due);
                        }
                    }
                    Message::Binary(_) => outbox.send(protocol::error(
                        "binary frames are not supported; send JSON text",
                        None,
                    )),
                    Message::Close(_) => {
                        client_closed = true;
                        break None;
                    }
                    // Pings are answered by the WebSocket layer; both count as activity.
                    Message::Ping(_) | Message::Pong(_) => {}
                }
            }
            // Also the deferred subscribes' timer: one timer is what an idle connection carries.
            () = &mut idle => {
                if session.next_deferred().is_some_and(|due| due <= Instant::now()) {
                    Box::pin(session.run_deferred()).await;
                }
                let deadline = if pinged {
                    last_heard + config.activity_timeout + config.pong_timeout
                } else {
                    last_heard + config.activity_timeout
                };
                let next = if Instant::now() < deadline {
                    // Heard from the client since the timer was set, or woken for a subscribe.
                    deadline
                } else if pinged {
                    break Some((close::PONG_NOT_RECEIVED, "pong reply not received".to_owned()));
                } else {
                    pinged = true;
                    outbox.send(protocol::ping());
                    last_heard + config.activity_timeout + config.pong_timeout
                };
                idle.as_mut().reset(session.next_deferred().map_or(next, |due| due.min(next)));
            }
        }
    };
    session.leave_all();
    // Boxed, as a message's handling is: only a closing connection needs it.
    Box::pin(end(close, end_writer, writer, stream, client_closed)).await;
}

/// Hands the writer the connection's end and waits for it; once a close frame went out, waits
/// a moment for the client's close. A client that closed first gets its close frame answered:
/// the transport queues the reply and sends it at the next read, so the stream is read until it
/// ends (without that, the client saw the connection drop, 1006, not its own close).
async fn end(
    close: Ending,
    end_writer: oneshot::Sender<Ending>,
    writer: JoinHandle<bool>,
    mut stream: Stream,
    client_closed: bool,
) {
    // The writer may have stopped meanwhile (the client gone); then there is no one to tell.
    let _ = end_writer.send(close);
    if matches!(writer.await, Ok(true)) || client_closed {
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(Ok(_)) = stream.next().await {}
        })
        .await;
    }
}

/// The connection's writer: writes queued frames, coalescing whatever is queued into one
/// flush, until the reader hands it the connection's end; then writes the close frame, if
/// any. Returns whether a close frame went out. Stops on its own when a write fails (the
/// client is gone), which the reader sees.
async fn write_frames(
    mut sink: Sink,
    mut frames: Frames,
    mut ending: oneshot::Receiver<Ending>,
) -> bool {
    let close = loop {
        tokio::select! {
            biased;
            // A reader that ended without a word (it cannot, but a panic would) means no close.
            close = &mut ending => break close.unwrap_or(None),
            frame = frames.recv() => {
                // Every sender gone: the reader has ended.
                let Some(frame) = frame else { return false };
                // A client that stops reading blocks this write once the socket buffers are
                // full. The outbox keeps filling meanwhile, and its overflow (or a shutdown or
                // termination) ends the wait: a stalled client is closed instead of holding
                // its connection, its slot and its outbox forever.
                // Boxed: writing is a moment of a connection's life, and inline its future
                // would be carried by every idle connection.
                let mut write = Box::pin(write_queued(&mut sink, frame, &mut frames));
                tokio::select! {
                    biased;
                    close = &mut ending => {
                        let close = close.unwrap_or(None);
                        match &close {
                            // The client is not taking what is written: the close goes out
                            // without waiting for the write.
                            Some((close::OVER_CAPACITY, _)) => {}
                            // A shutdown or termination lets the write under way finish (in
                            // bounded time): the frames it took from the outbox come before
                            // the close frame, instead of leaving a gap ahead of the ones
                            // flushed with it.
                            Some(_) => {
                                if Box::pin(finish(write)).await.is_err() {
                                    return false;
                                }
                            }
                            None => return false,
                        }
                        break close;
                    }
                    written = &mut write => if written.is_err() {
                        return false;
                    },
                }
            }
        }
    };
    match close {
        // Boxed, as a write is: only a closing connection needs it.
        Some((code, reason)) => Box::pin(send_close(sink, frames, code, reason)).await,
        None => false,
    }
}

/// Sends the close frame `code` (after what is queued, unless the queue is what the client
/// could not keep up with); returns whether it went out.
async fn send_close(mut sink: Sink, mut frames: Frames, code: u16, reason: String) -> bool {
    // The close frame goes out in bounded time or not at all: a client that stopped
    // reading would otherwise hold this task (and its socket) forever.
    // A too-slow client gets longer: it may read again (a tab coming back), and then it
    // should find the 4100 that tells it to back off rather than a reset. Meanwhile it has
    // left every channel, so waiting costs its socket and this task, nothing that grows.
    let patience = if code == close::OVER_CAPACITY {
        SLOW_CLOSE_WRITE_TIMEOUT
    } else {
        CLOSE_WRITE_TIMEOUT
    };
    let sent = tokio::time::timeout(patience, async {
        // Flush what is queued first (an error frame explaining the close, for instance),
        // unless the queue is what the client could not keep up with.
        if code != close::OVER_CAPACITY {
            while let Ok(frame) = frames.try_recv() {
                sink.feed(Message::Text(frame.pusher_frame().clone()))
                    .await?;
            }
        }
        sink.send(close_frame(code, &reason)).await
    })
    .await;
    let sent = matches!(sent, Ok(Ok(())));
    if !sent {
        tracing::debug!(code, "dropping a connection that took no close frame");
    }
    sent
}

/// How long a close frame (and what is queued before it) may take to write.
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the 4100 close frame of a connection that could not keep up may wait for room in
/// its socket.
const SLOW_CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(15);

fn shutting_down() -> (u16, String) {
    (close::RECONNECT, "server shutting down".to_owned())
}

fn too_slow() -> (u16, String) {
    tracing::info!("closing a connection that could not keep up with its events (4100)");
    (
        close::OVER_CAPACITY,
        "too slow: the connection could not keep up with its events".to_owned(),
    )
}

/// Why the connection's closing token was cancelled: its outbox overflowed, or the hub ended it.
fn closed_because(outbox: &Outbox, hub: &AppHub) -> (u16, String) {
    if outbox.has_overflowed() {
        too_slow()
    } else {
        terminated_close(hub)
    }
}

/// The close for a connection the hub ended: its app was deleted, or the server terminated it.
fn terminated_close(hub: &AppHub) -> (u16, String) {
    if hub.is_removed() {
        (close::APP_DOES_NOT_EXIST, APP_DELETED.to_owned())
    } else {
        (
            close::UNAUTHORIZED,
            "connection terminated by the server".to_owned(),
        )
    }
}

/// The end of a write under way when the connection is closing: at most
/// [`CLOSE_WRITE_TIMEOUT`], a client that stopped reading being no reason to hold a shutdown.
/// Boxed where it is awaited, for the reason the write is.
async fn finish(write: impl Future<Output = Result<(), axum::Error>>) -> Result<(), axum::Error> {
    tokio::time::timeout(CLOSE_WRITE_TIMEOUT, write)
        .await
        .unwrap_or_else(|_| Err(axum::Error::new("the client took no frame before closing")))
}

/// Writes `first` and everything else already queued, then flushes once. A publication is
/// written as its Pusher frame, encoded once for every connection that gets it.
async fn write_queued(
    sink: &mut Sink,
    first: Outgoing,
    frames: &mut Frames,
) -> Result<(), axum::Error> {
    sink.feed(Message::Text(first.pusher_frame().clone()))
        .await?;
    while let Ok(frame) = frames.try_recv() {
        sink.feed(Message::Text(frame.pusher_frame().clone()))
            .await?;
    }
    sink.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_reasons_fit_a_control_frame_and_are_cut_at_a_character() {
        for reason in ["short".to_owned(), "é".repeat(100), "k".repeat(200)] {
            let Message::Close(Some(frame)) = close_frame(4001, &reason) else {
                panic!("a close frame");
            };
            assert!(frame.reason.len() <= MAX_CLOSE_REASON);
            assert!(reason.starts_with(frame.reason.as_str()));
            assert_eq!(
                frame.reason.len(),
                reason.len().min(122 + usize::from(reason.is_ascii()))
            );
        }
    }
}
