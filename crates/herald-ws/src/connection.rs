//! One WebSocket connection: the Pusher protocol's state machine.
//!
//! A single task per connection reads client messages, writes queued frames (coalescing
//! whatever is queued into one flush), and keeps time: after `activity_timeout` of silence it
//! pings, and after `pong_timeout` more it closes with 4201. Bad input gets `pusher:error` or
//! `pusher:subscription_error` and the connection stays; only the protocol's close cases close
//! it. Before anything else, the client's address must have room for one more connection
//! (`limits`), or the socket is closed with 4100 (back off, then reconnect).

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
use futures_util::{SinkExt, StreamExt, stream::SplitSink};
use herald_core::{
    model::{App, PusherCredentials},
    pusher::{self, ChannelKind},
};
use herald_store::Store;
use serde_json::{json, value::RawValue};
use tokio::{sync::mpsc, time::Instant};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    Frame, Hub, WsConfig, close,
    history::{History, Joined, Resume},
    hub::{AppHub, ChannelEvent, Joining, Outbox, SubscribeError},
    limits::{ClientPermit, TokenBucket},
    protocol::{self, ChannelData, Incoming, SigninData, SubscribeData, UnsubscribeData},
    transport,
};

/// What the `/app/{key}` route needs.
#[derive(Clone)]
pub struct WsState {
    pub store: Arc<dyn Store>,
    pub hub: Arc<Hub>,
    /// History channels: appends, positions and resumption.
    pub history: Arc<History>,
    pub config: WsConfig,
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
                tasks.track_future(async move {
                    close_now(socket, close::OVER_CAPACITY, &reason).await;
                })
            });
        }
    };
    let app = state.store.get_app_by_pusher_key(&key).await;
    let protocol = params.get("protocol").map(|p| p.parse::<u32>());
    ws.on_upgrade(move |socket| {
        tasks.track_future(async move {
            let refusal = match (&app, &protocol) {
                (Err(e), _) => {
                    tracing::error!(error = %e, "looking up an app key failed");
                    Some((close::RECONNECT, "temporary server error".to_owned()))
                }
                (Ok(None), _) => Some((
                    close::APP_DOES_NOT_EXIST,
                    format!("no app has the key {key}"),
                )),
                (_, Some(Ok(v))) if !(5..=7).contains(v) => Some((
                    close::UNSUPPORTED_PROTOCOL,
                    format!("protocol version {v} is not supported (use 7)"),
                )),
                (_, Some(Err(_))) => Some((
                    close::UNSUPPORTED_PROTOCOL,
                    "protocol must be a number".to_owned(),
                )),
                _ => None,
            };
            match (refusal, app) {
                (None, Ok(Some(app))) => {
                    let hub = state.hub.app(&app.id);
                    if hub.is_removed() {
                        // Deleted after the key was looked up.
                        close_now(socket, close::APP_DOES_NOT_EXIST, APP_DELETED).await;
                    } else if hub.connect(state.config.max_connections_per_app) {
                        serve(socket, app, Arc::clone(&hub), &state, permit).await;
                        hub.disconnect();
                    } else {
                        close_now(
                            socket,
                            close::OVER_CONNECTION_QUOTA,
                            "the app is over its connection quota",
                        )
                        .await;
                    }
                }
                (Some((code, reason)), _) => close_now(socket, code, &reason).await,
                (None, _) => unreachable!("no refusal means the app was found"),
            }
        })
    })
}

async fn close_now(mut socket: WebSocket, code: u16, reason: &str) {
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        })))
        .await;
    // Let the close handshake finish (the client answers our close frame).
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(Ok(_)) = socket.next().await {}
    })
    .await;
}

type Sink = SplitSink<WebSocket, Message>;

const APP_DELETED: &str = "the app was deleted";

async fn serve(
    socket: WebSocket,
    app: App,
    hub: Arc<AppHub>,
    state: &WsState,
    permit: ClientPermit,
) {
    let config = &state.config;
    let (outbox, mut frames, overflowed) = Outbox::new(config.outbox_frames);
    let socket_id = pusher::new_socket_id(&mut rand::rng());
    let (mut sink, mut stream) = socket.split();
    let mut conn = Connection {
        app,
        store: Arc::clone(&state.store),
        history: Arc::clone(&state.history),
        config: config.clone(),
        socket_id,
        outbox,
        channels: HashMap::new(),
        user_id: None,
        terminate: hub.connection_token(),
        hub,
        client_events: TokenBucket::new(
            f64::from(config.client_events_per_second),
            f64::from(config.client_events_per_second),
        ),
        subscribes: TokenBucket::limit(
            config.subscribes_per_second.into(),
            config.subscribe_burst.into(),
        ),
        client: Arc::new(permit),
    };
    conn.outbox.send(protocol::connection_established(
        &conn.socket_id,
        config.activity_timeout.as_secs(),
    ));

    // The futures below live across iterations: re-creating them for every frame would
    // register and cancel a timer and lock three cancellation tokens per delivery.
    let shutdown = state.shutdown.cancelled();
    let overflow = overflowed.cancelled();
    let terminate = conn.terminate.clone();
    let terminated = terminate.cancelled();
    let mut last_heard = Instant::now();
    let mut pinged = false;
    let idle = tokio::time::sleep_until(last_heard + config.activity_timeout);
    tokio::pin!(shutdown, overflow, terminated, idle);
    let close = loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break Some((close::RECONNECT, "server shutting down".to_owned())),
            () = &mut overflow => break Some((
                close::OVER_CAPACITY,
                "too slow: the connection could not keep up with its events".to_owned(),
            )),
            () = &mut terminated => break Some(if conn.hub.is_removed() {
                (close::APP_DOES_NOT_EXIST, APP_DELETED.to_owned())
            } else {
                (close::UNAUTHORIZED, "connection terminated by the server".to_owned())
            }),
            frame = frames.recv() => {
                let Some(frame) = frame else { break None };
                if write_queued(&mut sink, frame, &mut frames).await.is_err() {
                    break None;
                }
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
                        if let Some(close) = conn.handle(text.as_str()).await {
                            break Some(close);
                        }
                    }
                    Message::Binary(_) => conn.outbox.send(protocol::error(
                        "binary frames are not supported; send JSON text",
                        None,
                    )),
                    Message::Close(_) => break None,
                    // Pings are answered by the WebSocket layer; both count as activity.
                    Message::Ping(_) | Message::Pong(_) => {}
                }
            }
            () = &mut idle => {
                let deadline = if pinged {
                    last_heard + config.activity_timeout + config.pong_timeout
                } else {
                    last_heard + config.activity_timeout
                };
                if Instant::now() < deadline {
                    // Heard from the client since the timer was set.
                    idle.as_mut().reset(deadline);
                } else if pinged {
                    break Some((close::PONG_NOT_RECEIVED, "pong reply not received".to_owned()));
                } else {
                    pinged = true;
                    conn.outbox.send(protocol::ping());
                    idle.as_mut().reset(last_heard + config.activity_timeout + config.pong_timeout);
                }
            }
        }
    };
    conn.leave_all();
    if let Some((code, reason)) = close {
        // Flush what is queued first (an error frame explaining the close, for instance).
        while let Ok(frame) = frames.try_recv() {
            if sink.feed(Message::Text(frame)).await.is_err() {
                break;
            }
        }
        let _ = sink
            .send(Message::Close(Some(CloseFrame {
                code,
                reason: reason.into(),
            })))
            .await;
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(Ok(_)) = stream.next().await {}
        })
        .await;
    }
}

/// Writes `first` and everything else already queued, then flushes once.
async fn write_queued(
    sink: &mut Sink,
    first: Frame,
    frames: &mut mpsc::Receiver<Frame>,
) -> Result<(), axum::Error> {
    sink.feed(Message::Text(first)).await?;
    while let Ok(frame) = frames.try_recv() {
        sink.feed(Message::Text(frame)).await?;
    }
    sink.flush().await
}

struct Connection {
    /// The app as it was at the handshake: its id and history rules. Its Pusher credentials
    /// are not used: see [`Connection::credentials`].
    app: App,
    store: Arc<dyn Store>,
    hub: Arc<AppHub>,
    history: Arc<History>,
    config: WsConfig,
    socket_id: String,
    outbox: Outbox,
    /// Subscribed channels, with the presence user id for presence channels.
    channels: HashMap<String, Option<String>>,
    /// Set by `pusher:signin`.
    user_id: Option<String>,
    terminate: CancellationToken,
    /// Client events allowed per second, at most that many at once.
    client_events: TokenBucket,
    /// Subscribes allowed (`None`: no limit).
    subscribes: Option<TokenBucket>,
    /// The connection's place in its address's counts, and that address's replay budget.
    client: Arc<ClientPermit>,
}

type Close = (u16, String);

/// Why a signature could not be checked: the app's credentials could not be read.
struct Unavailable {
    /// `pusher:subscription_error`'s type and status.
    kind: &'static str,
    message: &'static str,
    status: u16,
    /// The code of the `pusher:error` a sign-in gets.
    close: Option<u16>,
}

impl Connection {
    /// Handles one client message; returns a close code if the connection must end.
    /// Messages over `max_message_bytes` never get here: the transport refuses them (1009).
    async fn handle(&mut self, text: &str) -> Option<Close> {
        let message: Incoming = match serde_json::from_str(text) {
            Ok(message) => message,
            Err(e) => {
                self.outbox
                    .send(protocol::error(&format!("invalid JSON: {e}"), None));
                return None;
            }
        };
        match message.event.as_str() {
            "pusher:ping" => self.outbox.send(protocol::pong()),
            "pusher:pong" => {}
            "pusher:subscribe" => self.subscribe(message.data.as_deref()).await,
            "pusher:unsubscribe" => self.unsubscribe(message.data.as_deref()),
            "pusher:signin" => self.sign_in(message.data.as_deref()).await,
            name if name.starts_with("client-") => return self.client_event(&message).await,
            other => self
                .outbox
                .send(protocol::error(&format!("unknown event {other:?}"), None)),
        }
        None
    }

    async fn subscribe(&mut self, data: Option<&RawValue>) {
        let request: SubscribeData = match protocol::parse_data(data) {
            Ok(request) => request,
            Err(e) => {
                self.outbox.send(protocol::error(
                    &format!("invalid pusher:subscribe: {e}"),
                    None,
                ));
                return;
            }
        };
        let channel = request.channel.as_str();
        let refuse = |kind: &str, message: String, status: u16| {
            protocol::subscription_error(channel, kind, &message, status)
        };
        // Every subscribe counts, valid or not: each may read the channel's position.
        if let Some(bucket) = &mut self.subscribes
            && !bucket.try_take(1.0)
        {
            self.outbox.send(refuse(
                "RateLimited",
                format!(
                    "too many subscribes: at most {} per second (bursts of {}); try again later",
                    self.config.subscribes_per_second, self.config.subscribe_burst
                ),
                429,
            ));
            return;
        }
        if let Err(e) = pusher::validate_channel_name(channel) {
            self.outbox.send(refuse("InvalidChannel", e, 400));
            return;
        }
        if self.channels.contains_key(channel) {
            // Already subscribed: confirm again, as a resubscribe after a glitch expects.
            self.outbox.send(protocol::system(
                "pusher_internal:subscription_succeeded",
                Some(channel),
                &json!({}),
            ));
            return;
        }
        if self.channels.len() >= self.config.max_channels_per_connection {
            self.outbox.send(refuse(
                "LimitReached",
                format!(
                    "a connection may subscribe to at most {} channels",
                    self.config.max_channels_per_connection
                ),
                400,
            ));
            return;
        }
        let kind = ChannelKind::of(channel);
        let channel_data = (kind == ChannelKind::Presence)
            .then_some(request.channel_data.as_deref())
            .flatten();
        if kind.needs_auth() {
            let Some(auth) = request.auth.as_deref() else {
                self.outbox.send(refuse(
                    "AuthError",
                    format!("{channel} needs an auth signature"),
                    401,
                ));
                return;
            };
            if kind == ChannelKind::Presence && channel_data.is_none() {
                self.outbox.send(refuse(
                    "AuthError",
                    "presence channels need channel_data".into(),
                    401,
                ));
                return;
            }
            let credentials = match self.credentials().await {
                Ok(credentials) => credentials,
                Err(unavailable) => {
                    self.outbox.send(refuse(
                        unavailable.kind,
                        unavailable.message.into(),
                        unavailable.status,
                    ));
                    return;
                }
            };
            let credentials = &credentials;
            if let Err(e) = pusher::with_any_secret(credentials, chrono::Utc::now(), |secret| {
                pusher::verify_channel_auth(
                    &credentials.key,
                    secret,
                    &self.socket_id,
                    channel,
                    channel_data,
                    auth,
                )
            }) {
                self.outbox
                    .send(refuse("AuthError", format!("auth refused: {e}"), 401));
                return;
            }
        }
        let joining = match channel_data.map(|d| self.presence_member(d)) {
            Some(Ok(member)) => Some(member),
            Some(Err(e)) => {
                self.outbox.send(refuse("InvalidChannelData", e, 400));
                return;
            }
            None => None,
        };
        let member = joining.as_ref().map(|j| {
            (
                j.user_id.clone(),
                j.info.as_ref().map(|i| i.get().to_owned()),
            )
        });
        let Some(retention) = self.history.retention(&self.app, channel) else {
            self.register(channel, joining, member, None);
            return;
        };
        let resume = match (request.epoch, request.offset) {
            (Some(epoch), Some(offset)) => Some(Resume { epoch, offset }),
            _ => None,
        };
        let (history, app) = (Arc::clone(&self.history), self.app.clone());
        let budget = Arc::clone(&self.client);
        let joined = history
            .join(
                &app,
                channel,
                retention,
                resume.as_ref(),
                budget.as_ref(),
                |joined| {
                    self.register(channel, joining, member, Some(joined));
                },
            )
            .await;
        if let Err(e) = joined {
            tracing::error!(error = %e, channel, "reading channel history failed");
            self.outbox.send(protocol::subscription_error(
                channel,
                "HistoryUnavailable",
                "the channel's history could not be read; try again",
                503,
            ));
        }
    }

    /// Adds the subscription to the hub and queues its confirmation (with the history status
    /// and the missed events, on a history channel).
    fn register(
        &mut self,
        channel: &str,
        joining: Option<Joining>,
        member: Option<(String, Option<String>)>,
        joined: Option<Joined>,
    ) {
        let refuse = |kind: &str, message: String, status: u16| {
            protocol::subscription_error(channel, kind, &message, status)
        };
        let subscribed = match self.hub.subscribe(
            channel,
            &self.socket_id,
            &self.outbox,
            joining,
            self.config.max_presence_members,
        ) {
            Ok(subscribed) => subscribed,
            Err(SubscribeError::PresenceFull(max)) => {
                self.outbox.send(refuse(
                    "LimitReached",
                    format!("the presence channel is full ({max} members)"),
                    403,
                ));
                return;
            }
        };
        let mut confirmation = subscribed.presence.unwrap_or_else(|| json!({}));
        if let Some(joined) = &joined {
            confirmation["history"] = joined.status();
        }
        self.outbox.send(protocol::system(
            "pusher_internal:subscription_succeeded",
            Some(channel),
            &confirmation,
        ));
        for frame in joined.into_iter().flat_map(|j| j.replay) {
            self.outbox.send(frame);
        }
        if subscribed.member_added
            && let Some((user_id, info)) = &member
        {
            let info: serde_json::Value = info
                .as_deref()
                .and_then(|i| serde_json::from_str(i).ok())
                .unwrap_or(serde_json::Value::Null);
            let frame = protocol::system(
                "pusher_internal:member_added",
                Some(channel),
                &json!({"user_id": user_id, "user_info": info}),
            );
            self.hub.broadcast(channel, &frame, Some(&self.socket_id));
        }
        self.channels
            .insert(channel.to_owned(), member.map(|(user_id, _)| user_id));
    }

    /// The app's Pusher credentials as they are now, for one signature check. They are read
    /// at every check, never kept from the handshake, so a rotation reaches open sockets at
    /// once: the retired secret stops verifying when its grace ends (at once with a grace of
    /// 0) and the new one verifies from the rotation's commit on. The store's app cache is
    /// exact (the rotation's commit invalidates it), so this is a map lookup, not a query, and
    /// it cannot go back to older credentials. Any future writer of credentials (a key
    /// rotation, another node) is covered the same way, which a copy kept in the hub would
    /// have to be told about.
    async fn credentials(&self) -> Result<PusherCredentials, Unavailable> {
        match self.store.get_app(&self.app.id).await {
            Ok(Some(app)) => Ok(app.pusher),
            // The connection is closing with 4001 (its token was cancelled).
            Ok(None) => Err(Unavailable {
                kind: "AuthError",
                message: APP_DELETED,
                status: 401,
                close: Some(close::APP_DOES_NOT_EXIST),
            }),
            Err(e) => {
                tracing::error!(error = %e, app_id = %self.app.id, "reading the app's credentials failed");
                Err(Unavailable {
                    kind: "ServerError",
                    message: "the app's credentials could not be read; try again",
                    status: 503,
                    close: None,
                })
            }
        }
    }

    fn presence_member(&self, channel_data: &str) -> Result<Joining, String> {
        let data: ChannelData = serde_json::from_str(channel_data)
            .map_err(|e| format!("channel_data is not valid member JSON: {e}"))?;
        let user_id = match data.user_id {
            serde_json::Value::String(s) if !s.is_empty() && s.len() <= 128 => s,
            serde_json::Value::Number(n) => n.to_string(),
            _ => {
                return Err(
                    "channel_data.user_id must be a string of 1 to 128 characters or a number"
                        .into(),
                );
            }
        };
        if let Some(info) = &data.user_info
            && info.get().len() > self.config.max_user_info_bytes
        {
            return Err(format!(
                "channel_data.user_info is larger than {} bytes",
                self.config.max_user_info_bytes
            ));
        }
        Ok(Joining {
            user_id,
            info: data.user_info,
        })
    }

    fn unsubscribe(&mut self, data: Option<&RawValue>) {
        match protocol::parse_data::<UnsubscribeData>(data) {
            Ok(request) => self.leave(&request.channel),
            Err(e) => self.outbox.send(protocol::error(
                &format!("invalid pusher:unsubscribe: {e}"),
                None,
            )),
        }
    }

    fn leave(&mut self, channel: &str) {
        if self.channels.remove(channel).is_none() {
            return;
        }
        let left = self.hub.unsubscribe(channel, &self.socket_id);
        if let Some(user_id) = left.member_removed {
            let frame = protocol::system(
                "pusher_internal:member_removed",
                Some(channel),
                &json!({"user_id": user_id}),
            );
            self.hub.broadcast(channel, &frame, None);
        }
    }

    fn leave_all(&mut self) {
        let channels: Vec<String> = self.channels.keys().cloned().collect();
        for channel in channels {
            self.leave(&channel);
        }
        if let Some(user_id) = self.user_id.take() {
            self.hub.sign_out(&user_id, &self.socket_id);
        }
    }

    async fn sign_in(&mut self, data: Option<&RawValue>) {
        let request: SigninData = match protocol::parse_data(data) {
            Ok(request) => request,
            Err(e) => {
                self.outbox.send(protocol::error(
                    &format!("invalid pusher:signin: {e}"),
                    None,
                ));
                return;
            }
        };
        let credentials = match self.credentials().await {
            Ok(credentials) => credentials,
            Err(unavailable) => {
                self.outbox.send(protocol::error(
                    &format!("sign-in refused: {}", unavailable.message),
                    unavailable.close,
                ));
                return;
            }
        };
        let credentials = &credentials;
        if let Err(e) = pusher::with_any_secret(credentials, chrono::Utc::now(), |secret| {
            pusher::verify_user_auth(
                &credentials.key,
                secret,
                &self.socket_id,
                &request.user_data,
                &request.auth,
            )
        }) {
            self.outbox.send(protocol::error(
                &format!("sign-in refused: {e}"),
                Some(close::UNAUTHORIZED),
            ));
            return;
        }
        let user_id = serde_json::from_str::<serde_json::Value>(&request.user_data)
            .ok()
            .and_then(|v| v.get("id").and_then(|id| id.as_str().map(str::to_owned)))
            .filter(|id| !id.is_empty());
        let Some(user_id) = user_id else {
            self.outbox.send(protocol::error(
                "sign-in refused: user_data must be a JSON object with a string id",
                Some(close::UNAUTHORIZED),
            ));
            return;
        };
        if self
            .user_id
            .as_ref()
            .is_some_and(|current| *current != user_id)
        {
            self.outbox.send(protocol::error(
                "sign-in refused: the connection is signed in as another user",
                Some(close::UNAUTHORIZED),
            ));
            return;
        }
        self.hub
            .sign_in(&user_id, &self.socket_id, self.terminate.clone());
        self.user_id = Some(user_id);
        self.outbox.send(protocol::system(
            "pusher:signin_success",
            None,
            &json!({"user_data": request.user_data}),
        ));
    }

    async fn client_event(&mut self, message: &Incoming) -> Option<Close> {
        if !self.client_events.try_take(1.0) {
            return Some((
                close::CLIENT_EVENT_RATE_LIMIT,
                format!(
                    "client event rate limit of {} per second exceeded",
                    self.config.client_events_per_second
                ),
            ));
        }
        let Some(channel) = message.channel.as_deref() else {
            self.outbox
                .send(protocol::error("client events need a channel", None));
            return None;
        };
        let Some(member) = self.channels.get(channel) else {
            self.outbox.send(protocol::error(
                &format!("client event refused: not subscribed to {channel}"),
                None,
            ));
            return None;
        };
        if !ChannelKind::of(channel).allows_client_events() {
            self.outbox.send(protocol::error(
                &format!("client event refused: {channel} is not a private or presence channel"),
                None,
            ));
            return None;
        }
        let null =
            RawValue::from_string("null".into()).unwrap_or_else(|_| unreachable!("null is JSON"));
        let data = message.data.as_deref().unwrap_or(&null);
        // Reported for `client_event` webhooks: a string's content as is, anything else as
        // its JSON text, as Pusher does.
        let report = || ChannelEvent::ClientEvent {
            channel: channel.to_owned(),
            event: message.event.clone(),
            data: serde_json::from_str::<String>(data.get())
                .unwrap_or_else(|_| data.get().to_owned()),
            socket_id: self.socket_id.clone(),
            user_id: member.clone(),
        };
        // On a history channel the event is kept, with its position, before it is relayed.
        if let Some(retention) = self.history.retention(&self.app, channel) {
            let kept = self
                .history
                .publish_client_event(
                    &self.app,
                    channel,
                    retention,
                    &message.event,
                    data,
                    member.as_deref(),
                    &self.socket_id,
                    report,
                )
                .await;
            match kept {
                Ok(_) => return None,
                Err(e) => {
                    tracing::error!(error = %e, channel, "keeping a client event failed; relayed live only");
                }
            }
        }
        // Never echoed to the sender.
        let frame = protocol::client_event(&message.event, channel, data, member.as_deref());
        self.hub
            .client_event(channel, &frame, &self.socket_id, report);
        None
    }
}
