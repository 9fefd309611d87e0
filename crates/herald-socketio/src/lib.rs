//! Herald's Socket.IO face: Socket.IO v4 clients (Engine.IO 4, Socket.IO 5) on the same
//! channels and the same event stream as Pusher clients, SSE streams and webhooks.
//!
//! `socketioxide` speaks the protocol (polling, WebSocket and the upgrade between them, pings,
//! acks, binary attachments) and is mounted at `/socket.io/` in front of Herald's router,
//! which gets every other path. Herald uses none of its rooms or adapters: a socket is one more
//! subscriber of the channel layer, like a Pusher WebSocket or an SSE stream, so what reaches
//! it comes through the one publish path and the broker (on every node of a cluster), and a
//! history channel's replay merges exactly as for the other faces.
//!
//! - A namespace is an app (`/{uid or id}`); [`connect`] admits a socket: the app, the
//!   browser origin, the client address's limits, the app's connection quota, and the
//!   optional [`token`] (a JWT signed with the app's Pusher secret) that names the user and the
//!   rooms it may join.
//! - Rooms are channels; [`session`] runs one socket: joins (with history recovery and presence),
//!   the events it emits (relayed, forwarded as webhooks or refused by the app's rules,
//!   `herald_core::socketio`), and what its channels publish, written as Socket.IO events
//!   ([`binary`] turns `$binary` values into attachments and back).
//!
//! The face reaches apps through the [`Apps`] seam and publishes through the
//! [`Publisher`]; it never touches the store or the Pusher face.

pub mod binary;
mod connect;
mod session;
pub mod token;

use std::{
    collections::HashSet,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use herald_channels::{Hub, Publisher, limits::ClientLimiter};
use herald_core::model::App;
use socketioxide::{ParserConfig, SocketIo, TransportType};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// Binary attachments one event may carry.
const MAX_ATTACHMENTS: usize = 16;

/// How long an Engine.IO session may stay without a namespace.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long shutdown waits for Socket.IO transports to close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Where Socket.IO is served.
pub const PATH: &str = "/socket.io";

/// Limits and timings for Socket.IO clients; every one has a safe default.
#[derive(Debug, Clone)]
pub struct SocketIoConfig {
    /// Largest packet (WebSocket message or polling body) a client may send, like Socket.IO's
    /// `maxHttpBufferSize`; beyond, the connection is closed (WebSocket) or the request is
    /// refused with 413 (polling).
    pub max_payload_bytes: u64,
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
    /// Sockets per app (beyond, the CONNECT is refused).
    pub max_connections_per_app: u32,
    /// Rooms one socket may be in, the namespace channel included.
    pub max_rooms_per_socket: usize,
    pub max_presence_members: usize,
    pub max_user_info_bytes: usize,
    /// Largest data one relayed event may carry, as stored (binary as base64); beyond,
    /// `too_large`. Binary grows by a third as base64, so this bound (and not only the
    /// transport's) keeps what is stored, sent between nodes and to every subscriber in check.
    pub max_event_bytes: usize,
    /// Joins and leaves one socket may send per second on average...
    pub joins_per_second: u32,
    /// ...and at once. Beyond: `rate_limited`.
    pub join_burst: u32,
    /// Events one socket may emit per second on average...
    pub events_per_second: u32,
    /// ...and at once. Beyond: `rate_limited`.
    pub event_burst: u32,
    /// Events waiting to be written to one socket before it counts as too slow and is
    /// disconnected.
    pub outbox_frames: usize,
    /// Events a socket has sent that wait for the previous ones to be published; beyond,
    /// `rate_limited`.
    pub inbound_queue: usize,
    /// Connections and replayed history per client address, shared with WebSockets and SSE.
    pub clients: Arc<ClientLimiter>,
}

impl Default for SocketIoConfig {
    fn default() -> Self {
        Self {
            max_payload_bytes: 1_000_000,
            ping_interval: Duration::from_secs(25),
            ping_timeout: Duration::from_secs(20),
            max_connections_per_app: 10_000,
            max_rooms_per_socket: 100,
            max_presence_members: 100,
            max_user_info_bytes: 1024,
            max_event_bytes: 1_000_000,
            joins_per_second: 10,
            join_burst: 100,
            events_per_second: 10,
            event_burst: 20,
            outbox_frames: 1024,
            inbound_queue: 64,
            clients: Arc::default(),
        }
    }
}

/// How the face finds apps (the assembly implements it over the store).
#[async_trait::async_trait]
pub trait Apps: Send + Sync + 'static {
    /// The app whose uid or id is `uid_or_id`; `Err` when it cannot be read now.
    async fn find(&self, uid_or_id: &str) -> Result<Option<App>, Unavailable>;
}

/// The apps could not be read (the store is unreachable).
#[derive(Debug, thiserror::Error)]
#[error("the app could not be read now; try again")]
pub struct Unavailable;

/// What the face stands on.
pub struct Face {
    pub apps: Arc<dyn Apps>,
    pub hub: Arc<Hub>,
    pub publisher: Arc<Publisher>,
    pub config: SocketIoConfig,
    /// Cancelled when the server shuts down: every socket is closed (clients reconnect).
    pub shutdown: CancellationToken,
    /// Each socket's task, so shutdown can wait for them.
    pub tasks: TaskTracker,
    io: OnceLock<SocketIo>,
    /// The namespace paths held open by [`Face::open_keys`] (counted in the channel metrics'
    /// `socketio_namespaces`).
    held: Mutex<HashSet<String>>,
    /// Lookups under way of keys whose CONNECT was refused (`connect::forget_namespace_unless_an_app`).
    forget_lookups: Arc<tokio::sync::Semaphore>,
    forgetting_keys: Mutex<HashSet<String>>,
}

impl Face {
    pub fn new(
        apps: Arc<dyn Apps>,
        hub: Arc<Hub>,
        publisher: Arc<Publisher>,
        config: SocketIoConfig,
        shutdown: CancellationToken,
        tasks: TaskTracker,
    ) -> Arc<Self> {
        Arc::new(Self {
            apps,
            hub,
            publisher,
            config,
            shutdown,
            tasks,
            io: OnceLock::new(),
            held: Mutex::default(),
            forget_lookups: Arc::new(tokio::sync::Semaphore::new(connect::MAX_FORGET_LOOKUPS)),
            forgetting_keys: Mutex::default(),
        })
    }

    /// Marks `key` as being looked up after a refused CONNECT (`start`), or no longer; false
    /// if a lookup of it is under way already.
    pub(crate) fn forgetting(&self, key: &str, start: bool) -> bool {
        let mut keys = self
            .forgetting_keys
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if start {
            keys.insert(key.to_owned())
        } else {
            keys.remove(key)
        }
    }

    /// Opens the namespaces (`/{uid}` and `/{id}`) of an app that has Socket.IO settings
    /// before its clients connect; a key already open is left as it is. Call it whenever this
    /// node's API creates or changes an app, and [`Face::open_keys`] at start-up and when
    /// another node of a cluster may have changed apps.
    ///
    /// Why: an app's namespace could be left for its first CONNECT to create (the dynamic
    /// `/{app}` stays for the apps not opened here), but socketioxide (0.18) checks for an
    /// existing namespace and inserts the new one without a lock between the two. Two first
    /// CONNECTs on two threads each create one, and the second insert replaces the first: the
    /// sockets the first one admitted get answers, but every packet they send is routed to
    /// the namespace that replaced it, which does not know them, and their transport is
    /// closed (Engine.IO CLOSE) at their first `join`. A reconnect herd on a node that just
    /// started hits exactly this (socket.io fixed the same race in its 4.3.2), so the
    /// namespaces of the apps a node knows exist before it listens.
    ///
    /// Only apps with `socketio` settings: an open namespace costs memory whether or not a
    /// socket ever uses it (1.7 KiB per app with a uid, and ~2 µs of start-up, measured over
    /// 5,000 apps), and a browser client needs `allowedOrigins` anyway. Another app's
    /// namespace is created by its first CONNECT, as before; a socket caught by the race there
    /// is closed at its first packet, and socket.io-client reconnects by itself.
    pub fn open_app(self: &Arc<Self>, app: &App) {
        if app.socketio.is_some() {
            self.open_keys(keys(app));
        }
    }

    /// Closes a deleted app's empty namespaces on this node, so they cost nothing more. One
    /// that still has sockets is left: each socket's session tells its client (a namespace
    /// DISCONNECT) as the app's hub closes, which a forced close here could overtake, dropping
    /// the socket untold; the refusal of a later CONNECT to it ("unknown app") removes it.
    pub fn close_app(&self, app: &App) {
        let Some(io) = self.io.get() else {
            return;
        };
        for key in keys(app) {
            self.forget_if_empty(io, &format!("/{key}"));
        }
    }

    /// Removes the namespace at `path` if no socket is in it.
    pub(crate) fn forget_if_empty(&self, io: &SocketIo, path: &str) {
        if path == "/" {
            // The main namespace is socketioxide's own (no app is `/`).
            return;
        }
        self.count_held(|held| {
            let empty = io.of(path).is_some_and(|ns| ns.sockets().is_empty());
            if empty {
                io.delete_ns(path);
            }
            empty && held.remove(path)
        });
    }

    /// Changes the held paths under their lock; `change` says whether it changed them, and
    /// the gauge follows.
    fn count_held(&self, change: impl FnOnce(&mut HashSet<String>) -> bool) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if change(&mut held) {
            self.hub
                .metrics()
                .socketio_namespaces
                .set(i64::try_from(held.len()).unwrap_or(i64::MAX));
        }
    }

    /// Opens the namespaces of these app keys (uids or ids), as [`Face::open_app`] does;
    /// nothing before [`mount`].
    pub fn open_keys<'a>(self: &Arc<Self>, keys: impl IntoIterator<Item = &'a str>) {
        let Some(io) = self.io.get() else {
            return;
        };
        // Under the lock: two callers (this node's API, the cluster's notices) never both
        // find a key missing and both register it, the second replacing the first.
        self.count_held(|held| {
            let before = held.len();
            for key in keys {
                let path = format!("/{key}");
                if io.of(&path).is_none() {
                    connect::register(io, self, Some(path.clone()));
                    held.insert(path);
                }
            }
            held.len() != before
        });
    }
}

/// The keys a client may name an app's namespace by: its uid, if it has one, and its id.
fn keys(app: &App) -> impl Iterator<Item = &str> {
    app.uid.iter().map(String::as_str).chain([app.id.as_str()])
}

/// Mounts Socket.IO at [`PATH`] in front of `router`, which keeps every other path.
pub fn mount(router: axum::Router, face: Arc<Face>) -> axum::Router {
    let config = &face.config;
    let (layer, io) = SocketIo::builder()
        .req_path(PATH)
        .max_payload(config.max_payload_bytes)
        // The same bound on the WebSocket transport: a larger message closes the connection
        // (1009) before it is buffered.
        .ws_max_message_size(usize::try_from(config.max_payload_bytes).unwrap_or(usize::MAX))
        .ws_max_frame_size(usize::try_from(config.max_payload_bytes).unwrap_or(usize::MAX))
        .ping_interval(config.ping_interval)
        .ping_timeout(config.ping_timeout)
        .transports([TransportType::Polling, TransportType::Websocket])
        // Each socket's send buffer holds what its outbox holds: a socket is too slow when
        // either is full.
        .max_buffer_size(config.outbox_frames)
        // Binary attachments count against the same payload bound, in all.
        .with_parser(
            ParserConfig::common()
                .max_incoming_binary_buf_size(
                    usize::try_from(config.max_payload_bytes).unwrap_or(usize::MAX),
                )
                .max_incoming_binaries(MAX_ATTACHMENTS),
        )
        // An Engine.IO session that joins no namespace is closed after this.
        .connect_timeout(CONNECT_TIMEOUT)
        .build_layer();
    connect::register(&io, &face, None);
    let _ = face.io.set(io.clone());
    let shutdown = face.shutdown.clone();
    face.tasks.spawn(async move {
        shutdown.cancelled().await;
        // Closing a WebSocket waits for the client's close frame: a client that never
        // answers must not hold the shutdown.
        if tokio::time::timeout(CLOSE_TIMEOUT, io.close())
            .await
            .is_err()
        {
            tracing::debug!("some Socket.IO transports did not close in time; dropping them");
        }
    });
    router
        .layer(layer)
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&face),
            connect::front,
        ))
}
