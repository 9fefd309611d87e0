//! One socket, from its admission to its disconnection: one task that joins its rooms,
//! handles the events it emits in the order it sent them, and writes what its channels publish.
//!
//! socketioxide runs each event handler on a task of its own, which would let two events of
//! one client be published out of order. So the one handler Herald registers
//! ([`Inbound`], the socket's fallback) does no work: it queues the packet, synchronously, on
//! the connection's read path, and the socket's task takes the queue in order.
//!
//! Server to client, every publication on a room is `emit(event, data, meta)`: `data` is the
//! publication's data as one JSON value (`Publication::json_data`, built once per publication
//! and shared by every socket), with `$binary` values as attachments, and `meta` is
//! `{"channel"[, "epoch", "offset"]}`. Confirmations and presence notices arrive as Pusher
//! frames from the channel layer and are sent as `herald:subscribed`,
//! `herald:member_added` and `herald:member_removed`.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use herald_channels::{
    EventData, Frame, Outgoing, Publish, Webhook,
    history::Resume,
    hub::{AppHub, Frames, Joining, Outbox, SubscribeError},
    limits::TokenBucket,
    presence::complete_snapshot,
    protocol,
};
use herald_core::{
    model::App,
    pusher::{self, ChannelKind},
    socketio::{self, Relay, SocketIoSettings},
    validate,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json, value::RawValue};
use socketioxide::{
    SendError, SocketError,
    adapter::LocalAdapter,
    extract::{AckSender, SocketRef},
    handler::{FromMessageParts, MessageHandler, Value as PacketValue},
    socket::Socket,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    Face,
    binary::{self, Outbound},
    connect::{Admission, Admitted, ConnectionSlot},
    token::Grant,
};

/// Why an event or a join was refused: `{code, message}` in an ack or a `herald:error`.
#[derive(Debug)]
struct Refusal {
    code: &'static str,
    message: String,
}

fn refuse(code: &'static str, message: impl Into<String>) -> Refusal {
    Refusal {
        code,
        message: message.into(),
    }
}

/// A packet the socket sent, waiting its turn.
struct Packet {
    value: PacketValue,
    ack: Option<AckSender>,
    /// Its bytes, counted against the socket's queue until it is handled and dropped.
    _charge: InboundCharge,
}

/// The bytes of the packets a socket has queued and not yet handled. The queue is bounded in
/// packets (`inbound_queue`) and, here, in bytes: otherwise a socket could hold that many
/// packets of the largest size the transport allows while its task waits on the store.
struct InboundBytes {
    queued: AtomicUsize,
    max: usize,
}

impl InboundBytes {
    fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            queued: AtomicUsize::new(0),
            max,
        })
    }

    /// Counts `size` bytes in if they fit under the bound, or if none are counted (a packet
    /// as large as the transport allows always gets in alone).
    fn try_take(self: &Arc<Self>, size: usize) -> Option<InboundCharge> {
        self.queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |queued| {
                (queued == 0 || queued.saturating_add(size) <= self.max)
                    .then(|| queued.saturating_add(size))
            })
            .ok()?;
        Some(InboundCharge {
            bytes: Arc::clone(self),
            size,
        })
    }
}

/// A packet's bytes in [`InboundBytes`], given back when it is dropped.
struct InboundCharge {
    bytes: Arc<InboundBytes>,
    size: usize,
}

impl Drop for InboundCharge {
    fn drop(&mut self) {
        self.bytes.queued.fetch_sub(self.size, Ordering::AcqRel);
    }
}

/// What a packet holds: its text and its binary attachments.
fn packet_bytes(value: &PacketValue) -> usize {
    match value {
        PacketValue::Str(text, attachments) => {
            text.len()
                + attachments
                    .as_ref()
                    .map_or(0, |a| a.iter().map(bytes::Bytes::len).sum())
        }
        PacketValue::Bytes(bytes) => bytes.len(),
    }
}

/// The socket's one message handler: queues, in arrival order (see the module doc).
#[derive(Clone)]
struct Inbound {
    queue: mpsc::Sender<Packet>,
    bytes: Arc<InboundBytes>,
    /// Cancelled when a refusal answered here did not fit the send buffer: the socket's task
    /// then treats the socket as too slow, as for an answer of its own (see [`reply`]).
    answer_lost: CancellationToken,
}

impl MessageHandler<LocalAdapter, ()> for Inbound {
    fn call(&self, s: Arc<Socket<LocalAdapter>>, mut v: PacketValue, ack_id: Option<i64>) {
        let ack = match ack_id {
            Some(_) => AckSender::from_message_parts(&s, &mut v, &ack_id).ok(),
            None => None,
        };
        let too_many = |value: &PacketValue, ack| {
            let refusal = refuse(
                "rate_limited",
                "too many events waiting to be published; slow down",
            );
            let name = event_name(value);
            if reply(&s, ack, shown_name(&name), Err(refusal)) == Written::Full {
                self.answer_lost.cancel();
            }
        };
        let Some(charge) = self.bytes.try_take(packet_bytes(&v)) else {
            too_many(&v, ack);
            return;
        };
        if let Err(mpsc::error::TrySendError::Full(packet)) = self.queue.try_send(Packet {
            value: v,
            ack,
            _charge: charge,
        }) {
            too_many(&packet.value, packet.ack);
        }
        // Closed: the socket is going away, and its events with it.
    }
}

fn attachments(value: &PacketValue) -> Option<&std::collections::VecDeque<bytes::Bytes>> {
    match value {
        PacketValue::Str(_, attachments) => attachments.as_ref(),
        PacketValue::Bytes(_) => None,
    }
}

fn event_name(value: &PacketValue) -> String {
    value
        .as_str()
        .and_then(|text| binary::read_event(text, None).ok())
        .map(|inbound| inbound.event)
        .unwrap_or_default()
}

/// Answers an event: through its ack, else (a refusal) as `herald:error`. `Full` if the
/// answer did not fit the socket's send buffer: the socket session must then treat the socket
/// as too slow, since a client waiting for an ack that never comes may send its event again.
fn reply(
    socket: &Socket<LocalAdapter>,
    ack: Option<AckSender>,
    event: &str,
    outcome: Result<Value, Refusal>,
) -> Written {
    let body = match &outcome {
        Ok(extra) => {
            let mut body = json!({"ok": true});
            if let (Value::Object(body), Value::Object(extra)) = (&mut body, extra) {
                body.extend(extra.clone());
            }
            body
        }
        Err(refusal) => {
            json!({"ok": false, "error": {"code": refusal.code, "message": refusal.message}})
        }
    };
    written(match (ack, outcome) {
        (Some(ack), _) => ack.send(&body),
        (None, Err(refusal)) => socket.emit(
            "herald:error",
            &json!({"event": event, "code": refusal.code, "message": refusal.message}),
        ),
        (None, Ok(_)) => Ok(()),
    })
}

/// What became of a write into a socket's send buffer.
fn written(sent: Result<(), SendError>) -> Written {
    match sent {
        Ok(()) => Written::Yes,
        Err(SendError::Socket(SocketError::InternalChannelFull)) => Written::Full,
        Err(e) => {
            tracing::debug!(error = %e, "a Socket.IO socket could not take a packet");
            Written::Gone
        }
    }
}

/// What a socket sends, from its admission on: its events, queued in order, and a token
/// cancelled when it disconnects. Registered by the connect middleware, before the server's
/// CONNECT answer goes out, so no event a client sends right after it can find no handler
/// (socketioxide runs the connect handler on a task of its own, which may start later).
pub(crate) struct Listening {
    packets: mpsc::Receiver<Packet>,
    closed: CancellationToken,
    answer_lost: CancellationToken,
}

/// Queues what the socket sends for its task: at most `capacity` packets, and at most
/// `max_bytes` of them unless one alone is larger.
pub(crate) fn listen(socket: &SocketRef, capacity: usize, max_bytes: usize) -> Listening {
    let (queue, packets) = mpsc::channel(capacity);
    let answer_lost = CancellationToken::new();
    socket.on_fallback(Inbound {
        queue,
        bytes: InboundBytes::new(max_bytes),
        answer_lost: answer_lost.clone(),
    });
    let closed = CancellationToken::new();
    let on_close = closed.clone();
    socket.on_disconnect(async move || on_close.cancel());
    Listening {
        packets,
        closed,
        answer_lost,
    }
}

/// Starts the socket's task (the namespace's connect handler).
pub(crate) fn start(face: Arc<Face>, socket: SocketRef) {
    let Some(Admitted(admitted)) = socket.extensions.get::<Admitted>() else {
        let _ = socket.disconnect();
        return;
    };
    let Some(admission) = admitted.lock().ok().and_then(|mut a| a.take()) else {
        let _ = socket.disconnect();
        return;
    };
    let (outbox, frames, overflowed) = Outbox::socketio(face.config.outbox_frames);
    let Admission {
        app,
        grant,
        positions,
        permit,
        slot,
        listening:
            Listening {
                packets,
                closed,
                answer_lost,
            },
    } = admission;
    let settings = app.socketio.clone().unwrap_or_default();
    // The Engine.IO session's id, which every namespace socket of the session shares, and the
    // namespace: one session may join an app by its uid and by its id, two sockets of one hub.
    let id = format!("sio.{}{}", socket.id, socket.ns());
    let events = TokenBucket::limit(
        u64::from(face.config.events_per_second),
        u64::from(face.config.event_burst),
    );
    let joins = TokenBucket::limit(
        u64::from(face.config.joins_per_second),
        u64::from(face.config.join_burst),
    );
    let session = Session {
        hub: Arc::clone(&slot.0),
        joins,
        face: Arc::clone(&face),
        app,
        settings,
        grants: grant.into_iter().collect(),
        id,
        outbox,
        rooms: BTreeMap::new(),
        positions,
        events,
        permit,
        signed_in: None,
        terminate: CancellationToken::new(),
        _slot: slot,
    };
    face.tasks
        .spawn(session.run(socket, frames, overflowed, packets, closed, answer_lost));
}

struct Session {
    face: Arc<Face>,
    app: App,
    settings: SocketIoSettings,
    /// The tokens the socket showed (at connect, then with joins), each good for its rooms
    /// until it expires; the first that names a user says who the socket is.
    grants: Vec<Grant>,
    hub: Arc<AppHub>,
    /// The socket's subscriber id in the hub (`except` compares with it).
    id: String,
    outbox: Outbox,
    /// Joined rooms, with the user id on presence rooms.
    rooms: BTreeMap<String, Option<String>>,
    /// The handshake's `auth.positions`: where each history room resumes when it is joined
    /// (at connect, or later by a `join` that names no position of its own).
    positions: std::collections::HashMap<String, Resume>,
    events: Option<TokenBucket>,
    /// Joins and leaves (each may read history and announce a presence member).
    joins: Option<TokenBucket>,
    permit: herald_channels::limits::ClientPermit,
    /// The user the socket is registered as in the hub (its first grant naming one), so the
    /// Pusher HTTP API's `terminate_connections` closes it as it closes a signed-in WebSocket.
    signed_in: Option<String>,
    /// Cancelled by `terminate_connections` for that user.
    terminate: CancellationToken,
    _slot: ConnectionSlot,
}

impl Session {
    async fn run(
        mut self,
        socket: SocketRef,
        mut frames: Frames,
        overflowed: CancellationToken,
        mut packets: mpsc::Receiver<Packet>,
        closed: CancellationToken,
        answer_lost: CancellationToken,
    ) {
        self.sign_in();
        // The namespace channel, then the token's rooms, before any event the socket sent.
        let mut initial = vec![self.settings.namespace_channel().to_owned()];
        for grant in &self.grants {
            initial.extend(grant.rooms.iter().cloned());
        }
        'serve: {
            for room in initial {
                // A socket gone before (or while) its rooms are joined joins no more of them, and
                // leaves those it joined below, as any socket does: a `return` here once left them
                // in the hub for good (a presence member never removed).
                if closed.is_cancelled() {
                    break 'serve;
                }
                let resume = self.positions.remove(&room);
                let mut told = Written::Yes;
                if let Err(refusal) = self.join(&room, resume.as_ref()).await {
                    // Kept for the join that succeeds (after a token, a retry).
                    if let Some(resume) = resume {
                        self.positions.insert(room.clone(), resume);
                    }
                    told = written(socket.emit(
                        "herald:error",
                        &json!({"event": "join", "room": room, "code": refusal.code, "message": refusal.message}),
                    ));
                }
                // Each room's confirmation and replay go out before the next room is joined,
                // so several rooms' replays need not fit the outbox together.
                if overflowed.is_cancelled() || told == Written::Full {
                    self.too_slow(&socket, &closed).await;
                    break 'serve;
                }
                if !self.write_queued(&socket, &mut frames, None, &closed).await {
                    break 'serve;
                }
            }
            let hub = Arc::clone(&self.hub);
            let terminate = self.terminate.clone();
            loop {
                tokio::select! {
                    biased;
                    () = closed.cancelled() => break,
                    // As Pusher's 4009: socket.io-client does not reconnect after a server
                    // disconnect.
                    () = terminate.cancelled() => {
                        let _ = socket.emit(
                            "herald:error",
                            &json!({"code": "terminated", "message": "the app terminated this user's connections"}),
                        );
                        disconnect(&socket, &closed).await;
                        break;
                    }
                    // `mount` closes the transports; the rooms are left here, at once.
                    () = self.face.shutdown.cancelled() => break,
                    () = overflowed.cancelled() => {
                        self.too_slow(&socket, &closed).await;
                        break;
                    }
                    // A refusal the message handler answered did not fit.
                    () = answer_lost.cancelled() => {
                        self.too_slow(&socket, &closed).await;
                        break;
                    }
                    () = hub.removed() => {
                        disconnect(&socket, &closed).await;
                        break;
                    }
                    item = frames.recv() => {
                        let Some(item) = item else { break };
                        if !self.write_queued(&socket, &mut frames, Some(item), &closed).await {
                            break;
                        }
                    }
                    packet = packets.recv() => {
                        let Some(packet) = packet else { break };
                        match self.handle(&socket, packet).await {
                            Written::Yes => {}
                            Written::Gone => break,
                            // An ack lost to a full buffer would leave the client waiting, and
                            // one that retries would publish its event twice: it is told it
                            // was disconnected instead, as for any socket too slow.
                            Written::Full => {
                                self.too_slow(&socket, &closed).await;
                                break;
                            }
                        }
                    }
                }
            }
        }
        // Every way out of the loops above comes here, so every joined room is left.
        let rooms: Vec<String> = self.rooms.keys().cloned().collect();
        for room in rooms {
            self.leave(&room);
        }
        if let Some(user_id) = self.signed_in.take() {
            self.hub.sign_out(&user_id, &self.id);
        }
    }

    /// Registers the socket as its user, once one of its grants names one (at connect, or
    /// with a later join's token).
    fn sign_in(&mut self) {
        if self.signed_in.is_some() {
            return;
        }
        if let Some(user_id) = self.user().and_then(|g| g.user_id.clone()) {
            self.hub.sign_in(&user_id, &self.id, self.terminate.clone());
            self.signed_in = Some(user_id);
        }
    }

    /// A socket that fell `outbox_frames` behind: told why, if it still takes anything, and
    /// disconnected (see [`disconnect`]).
    async fn too_slow(&self, socket: &SocketRef, closed: &CancellationToken) {
        tracing::debug!(socket = %self.id, "a Socket.IO socket fell too far behind; disconnecting it");
        let _ = socket.emit(
            "herald:error",
            &json!({"code": "too_slow", "message": "the socket fell too far behind its events and is disconnected; connect again (socket.connect())"}),
        );
        disconnect(socket, closed).await;
    }

    /// Writes `first`, then whatever else is queued, without waiting for more. False once the
    /// socket is gone, or too slow (then told and disconnected).
    async fn write_queued(
        &self,
        socket: &SocketRef,
        frames: &mut Frames,
        first: Option<Outgoing>,
        closed: &CancellationToken,
    ) -> bool {
        let mut written = first.map_or(Written::Yes, |item| self.write(socket, &item));
        while written == Written::Yes
            && let Ok(item) = frames.try_recv()
        {
            written = self.write(socket, &item);
        }
        match written {
            Written::Yes => true,
            Written::Gone => false,
            Written::Full => {
                self.too_slow(socket, closed).await;
                false
            }
        }
    }

    /// Writes one item into the socket's send buffer.
    fn write(&self, socket: &SocketRef, item: &Outgoing) -> Written {
        let sent = match item {
            // socket.io-client would run its own handlers (or Herald's) for these names.
            Outgoing::Publication(publication)
                if socketio::is_reserved_name(&publication.event) =>
            {
                tracing::debug!(
                    event = %publication.event,
                    channel = %publication.channel,
                    "an event with a name reserved on Socket.IO is not sent to Socket.IO sockets"
                );
                Ok(())
            }
            Outgoing::Publication(publication) => {
                let meta = Meta {
                    channel: &publication.channel,
                    epoch: publication.position.as_ref().map(|p| p.epoch.as_str()),
                    offset: publication.offset(),
                };
                socket.emit(
                    &publication.event,
                    &(
                        Outbound::of(
                            publication.json_data(),
                            publication.json_data_may_hold_binary(),
                        ),
                        meta,
                    ),
                )
            }
            Outgoing::Frame(frame) => match translate(frame) {
                Some((event, body)) => socket.emit(event, &body),
                None => Ok(()),
            },
        };
        written(sent)
    }

    /// Handles one packet the socket sent and answers it (see [`reply`]).
    async fn handle(&mut self, socket: &SocketRef, packet: Packet) -> Written {
        let Packet { value, ack, .. } = packet;
        let inbound = value
            .as_str()
            .ok_or(binary::InboundError::NotAnEvent)
            .and_then(|text| binary::read_event(text, attachments(&value)));
        let inbound = match inbound {
            Ok(inbound) => inbound,
            Err(e) => {
                return reply(socket, ack, "", Err(refuse("invalid_event", e.to_string())));
            }
        };
        // Echoed in a refusal: no longer than any event name that is taken.
        let event = shown_name(&inbound.event).to_owned();
        let outcome = match inbound.event.as_str() {
            "join" => self.join_event(inbound.args).await,
            "leave" => self.leave_event(inbound.args),
            _ => self.relay(inbound.event, inbound.args).await,
        };
        reply(socket, ack, &event, outcome)
    }

    /// `join`: `"room"` or `{room, token}`.
    /// The grant that names the socket's user, if any.
    fn user(&self) -> Option<&Grant> {
        self.grants.iter().find(|g| g.user_id.is_some())
    }

    /// Charges a join or a leave to the socket's budget.
    fn take_join(&mut self) -> Result<(), Refusal> {
        let config = &self.face.config;
        charge(
            &mut self.joins,
            "joins and leaves",
            config.joins_per_second,
            config.join_burst,
        )
    }

    async fn join_event(&mut self, args: Vec<Box<RawValue>>) -> Result<Value, Refusal> {
        self.take_join()?;
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct JoinArgs {
            room: String,
            #[serde(default)]
            token: Option<String>,
            #[serde(default)]
            position: Option<PositionArg>,
        }
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct PositionArg {
            epoch: String,
            offset: u64,
        }
        let usage = || {
            refuse(
                "invalid_room",
                "join takes a room name, or {room, token?, position?}",
            )
        };
        let [arg] = args.as_slice() else {
            return Err(usage());
        };
        let args = match serde_json::from_str::<String>(arg.get()) {
            Ok(room) => JoinArgs {
                room,
                token: None,
                position: None,
            },
            Err(_) => serde_json::from_str::<JoinArgs>(arg.get()).map_err(|e| {
                refuse(
                    "invalid_room",
                    format!("join takes a room name, or {{room, token?, position?}}: {e}"),
                )
            })?,
        };
        if let Some(token) = &args.token {
            let app = match self.face.apps.find(self.app.id.as_str()).await {
                Ok(Some(app)) => app,
                Ok(None) => return Err(refuse("unavailable", "the app was deleted")),
                Err(e) => return Err(refuse("unavailable", e.to_string())),
            };
            let grant = crate::connect::verify_token(&app, token)
                .map_err(|e| refuse("invalid_token", e))?;
            if !grant.rooms.contains(&args.room) {
                return Err(refuse(
                    "forbidden",
                    format!("the token given does not name room {}", args.room),
                ));
            }
            // A socket is one user: a token for another is refused.
            if let (Some(current), Some(given)) = (
                self.user()
                    .map(|g| g.user_id.as_deref().unwrap_or_default()),
                grant.user_id.as_deref(),
            ) && current != given
            {
                return Err(refuse(
                    "forbidden",
                    format!("the socket is user {current}; the token given is for {given}"),
                ));
            }
            keep_grant(
                &mut self.grants,
                grant,
                chrono::Utc::now().timestamp(),
                self.face.config.max_rooms_per_socket,
            );
            self.sign_in();
        }
        let handshake = if args.position.is_none() {
            self.positions.remove(&args.room)
        } else {
            None
        };
        let resume = args
            .position
            .map(|p| Resume {
                epoch: p.epoch,
                offset: p.offset,
            })
            .or_else(|| handshake.clone());
        let joined = self.join(&args.room, resume.as_ref()).await;
        // A refused join (a private room before its token, the history unreadable) does not
        // spend the handshake's position: the join that succeeds still resumes from it.
        if joined.is_err()
            && let Some(handshake) = handshake
        {
            self.positions.insert(args.room, handshake);
        }
        joined
    }

    /// Joins `room` (resuming after `resume` on a history channel); the status is also sent
    /// as `herald:subscribed`.
    async fn join(&mut self, room: &str, resume: Option<&Resume>) -> Result<Value, Refusal> {
        pusher::validate_channel_name(room).map_err(|e| refuse("invalid_room", e))?;
        if self.rooms.contains_key(room) {
            return Ok(json!({"room": room}));
        }
        if self.rooms.len() >= self.face.config.max_rooms_per_socket {
            return Err(refuse(
                "too_many_rooms",
                format!(
                    "a socket may be in at most {} rooms",
                    self.face.config.max_rooms_per_socket
                ),
            ));
        }
        let kind = ChannelKind::of(room);
        // A grant authorizes rooms until its token expires, for later joins too.
        let now = chrono::Utc::now().timestamp();
        let granted = self
            .grants
            .iter()
            .any(|g| g.expires_at > now && g.rooms.iter().any(|r| r == room));
        if kind != ChannelKind::Public && !granted {
            return Err(refuse(
                "forbidden",
                format!("{room} needs a token whose rooms include it"),
            ));
        }
        let joining = if kind == ChannelKind::Presence {
            let grant = self.user();
            let Some(user_id) = grant.and_then(|g| g.user_id.clone()) else {
                return Err(refuse(
                    "forbidden",
                    format!("{room} is a presence room: the token needs `sub`, the user id"),
                ));
            };
            let info = grant.and_then(|g| g.user_info.clone());
            if info
                .as_ref()
                .is_some_and(|i| i.get().len() > self.face.config.max_user_info_bytes)
            {
                return Err(refuse(
                    "forbidden",
                    format!(
                        "the token's info is over {} bytes",
                        self.face.config.max_user_info_bytes
                    ),
                ));
            }
            Some(Joining { user_id, info })
        } else {
            None
        };
        let member = joining.as_ref().map(|j| {
            (
                j.user_id.clone(),
                j.info.as_ref().map(|i| i.get().to_owned()),
            )
        });
        let history = Arc::clone(self.face.publisher.history());
        let retention = history.retention(&self.app, room);
        let elsewhere = joining
            .is_some()
            .then(|| self.hub.members_elsewhere(room))
            .flatten();
        let max_members = self.face.config.max_presence_members;
        // A presence join is held like a history join, on one node too, so its snapshot goes
        // out before any member notice sent after it was taken (see herald-ws's `join`).
        let presence = joining.is_some();
        let subscribed = if retention.is_some() || presence {
            self.hub
                .subscribe_joining(room, &self.id, &self.outbox, joining, max_members)
        } else {
            self.hub
                .subscribe(room, &self.id, &self.outbox, joining, max_members)
        };
        let subscribed = match subscribed {
            Ok(subscribed) => subscribed,
            Err(SubscribeError::PresenceFull(max)) => {
                return Err(refuse(
                    "room_full",
                    format!("the presence room is full ({max} members)"),
                ));
            }
        };
        self.rooms
            .insert(room.to_owned(), member.as_ref().map(|(id, _)| id.clone()));
        let mut confirmation = subscribed.presence.unwrap_or_else(|| json!({}));
        if let Some(elsewhere) = elsewhere {
            complete_snapshot(&self.hub, room, &self.id, &mut confirmation, elsewhere).await;
        }
        match retention {
            None if presence => {
                let confirmed = confirmation_frame(room, &confirmation);
                self.hub
                    .go_live(room, &self.id, 0, |outbox| outbox.send(confirmed));
            }
            None => self.outbox.send(confirmation_frame(room, &confirmation)),
            Some(retention) => {
                // No more than the outbox holds after the confirmation (more is
                // `too_many_missed`, whatever `history.max_replay` allows).
                let max_replay = self.outbox.capacity().saturating_sub(1) as u64;
                let joined = history
                    .recover_at_most(&self.app, room, retention, resume, &self.permit, max_replay)
                    .await;
                let live = match joined {
                    Ok(joined) => {
                        confirmation["history"] = joined.status();
                        let confirmed = confirmation_frame(room, &confirmation);
                        let app_id = &self.app.id;
                        self.hub
                            .go_live_in_order(
                                room,
                                &self.id,
                                joined.offset,
                                |outbox| outbox.send(confirmed.clone()),
                                joined.replay,
                                |after, before| history.between(app_id, room, after, before),
                            )
                            .await
                    }
                    Err(e) => Err(e),
                };
                if let Err(e) = live {
                    tracing::error!(error = %e, room, "reading channel history failed");
                    self.leave(room);
                    return Err(refuse(
                        "unavailable",
                        "the room's history could not be read; try again",
                    ));
                }
            }
        }
        // A new member was announced by the hub, under the channel lock.
        Ok(subscribed_body(room, &confirmation))
    }

    fn leave_event(&mut self, args: Vec<Box<RawValue>>) -> Result<Value, Refusal> {
        self.take_join()?;
        let room = match args.as_slice() {
            [arg] => serde_json::from_str::<String>(arg.get()).ok(),
            _ => None,
        }
        .ok_or_else(|| refuse("invalid_room", "leave takes a room name"))?;
        if room == self.settings.namespace_channel() {
            return Err(refuse(
                "invalid_room",
                "every socket stays in its namespace channel",
            ));
        }
        if !self.rooms.contains_key(&room) {
            return Err(refuse("no_room", format!("the socket is not in {room}")));
        }
        self.leave(&room);
        Ok(json!({"room": room}))
    }

    fn leave(&mut self, room: &str) {
        if self.rooms.remove(room).is_none() {
            return;
        }
        // A member's last socket leaving is announced by the hub, under the channel lock.
        self.hub.unsubscribe(room, &self.id);
    }

    /// Any other event: the app's rules decide.
    async fn relay(
        &mut self,
        event: String,
        mut args: Vec<Box<RawValue>>,
    ) -> Result<Value, Refusal> {
        // Every event costs, refused or not: a refusal is answered too.
        let config = &self.face.config;
        charge(
            &mut self.events,
            "events",
            config.events_per_second,
            config.event_burst,
        )?;
        if event.len() > validate::MAX_CLIENT_EVENT_NAME {
            return Err(refuse(
                "invalid_event",
                format!(
                    "an event's name is at most {} bytes; this one is {}",
                    validate::MAX_CLIENT_EVENT_NAME,
                    event.len()
                ),
            ));
        }
        // The stores keep text without NUL (PostgreSQL's text and JSONB refuse it): such an
        // event could be kept neither in a history room nor in a webhook. (socketioxide closes
        // a session whose event name holds any escape, so the name's check is a backstop.)
        if event.contains('\0')
            || args
                .iter()
                .any(|arg| validate::json_holds_escaped_nul(arg.get().as_bytes()))
        {
            return Err(refuse(
                "invalid_event",
                "an event's name and data may not contain NUL (\\u0000)",
            ));
        }
        let Some(rule) = self.settings.rule_for(&event).cloned() else {
            return Err(refuse(
                "unknown_event",
                format!("no rule in the app's socketio.events takes `{event}`"),
            ));
        };
        if rule.relay == Relay::Refuse {
            return Err(refuse(
                "refused",
                format!("the app's rules refuse `{event}`"),
            ));
        }
        // Even under `*`: other clients must be able to trust these names.
        if socketio::is_reserved_name(&event) {
            return Err(refuse(
                "refused",
                format!(
                    "`{event}` is reserved (Socket.IO's own events and the herald:, pusher: and \
                     pusher_internal: prefixes are never relayed)"
                ),
            ));
        }
        if args.len() > 1 {
            return Err(refuse(
                "too_many_arguments",
                "a relayed event carries one argument (put several in an object or array)",
            ));
        }
        if rule.webhook && validate::event_type_name(&event).is_err() {
            return Err(refuse(
                "invalid_event_type",
                format!(
                    "`{event}` is forwarded to webhooks, and is not a valid event type name \
                     (letters, digits, `-`, `_` and `.`)"
                ),
            ));
        }
        let namespace = self.settings.namespace_channel().to_owned();
        let (channels, except) = match rule.relay {
            Relay::Everyone => (vec![namespace], None),
            Relay::Others => (vec![namespace], Some(self.id.clone())),
            Relay::Rooms => {
                // Not into end-to-end encrypted rooms: their subscribers expect ciphertext;
                // nor into users' channels, whose subscribers take what arrives as the
                // server's (Pusher allows no client events in either).
                let rooms: Vec<String> = self
                    .rooms
                    .keys()
                    .filter(|room| {
                        **room != namespace
                            && !matches!(
                                ChannelKind::of(room),
                                ChannelKind::PrivateEncrypted | ChannelKind::User
                            )
                    })
                    .cloned()
                    .collect();
                if rooms.is_empty() {
                    return Err(refuse(
                        "no_room",
                        format!("`{event}` goes to the sender's rooms, and this socket is in none"),
                    ));
                }
                (rooms, Some(self.id.clone()))
            }
            Relay::None | Relay::Refuse => (Vec::new(), None),
        };
        let data = args
            .pop()
            .unwrap_or_else(|| RawValue::from_string("null".to_owned()).unwrap_or_default());
        if data.get().len() > self.face.config.max_event_bytes {
            return Err(refuse(
                "too_large",
                format!(
                    "a relayed event's data is at most {} bytes as stored (binary counts as \
                     base64); this one is {}",
                    self.face.config.max_event_bytes,
                    data.get().len()
                ),
            ));
        }
        // The sender's user id travels only on presence rooms, as with Pusher client events.
        let user_id = self.user().and_then(|g| g.user_id.clone()).filter(|_| {
            !channels.is_empty()
                && channels
                    .iter()
                    .all(|c| ChannelKind::of(c) == ChannelKind::Presence)
        });
        let publish = Publish {
            event,
            channels,
            data: EventData::Json(data),
            user_id,
            except,
            webhook: if rule.webhook {
                Webhook::IfWanted
            } else {
                Webhook::None
            },
        };
        // The app as it is now (a map lookup in the store's cache): its history rules decide
        // whether the event is kept, and a socket may stay open for days across a change of
        // them, which the API's publications to the same room follow at once. (The relay
        // rules are the handshake's: see the README.)
        let current = match self.face.apps.find(self.app.id.as_str()).await {
            Ok(app) => app,
            Err(e) => {
                tracing::debug!(error = %e, app_id = %self.app.id, "could not read the app again for a relayed event; its handshake's copy decides");
                None
            }
        };
        let app = current.as_ref().unwrap_or(&self.app);
        match self.face.publisher.publish(app, publish).await {
            Ok(_) => Ok(json!({})),
            Err(e) => {
                tracing::warn!(error = %e, app_id = %self.app.id, "publishing a Socket.IO event failed");
                Err(refuse(
                    "unavailable",
                    "the event could not be published now; try again",
                ))
            }
        }
    }
}

/// An event's name as a refusal repeats it: cut to the longest name an event may have.
fn shown_name(name: &str) -> &str {
    let mut end = name.len().min(validate::MAX_CLIENT_EVENT_NAME);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

/// Takes one token from a socket's `bucket` (none: no limit), or refuses with `rate_limited`.
/// Keeps `grant` among a socket's grants, which stay bounded however many joins name a token:
/// expired grants go (all but the first that names a user, which says who the socket is for
/// as long as it lives), a grant that adds nothing to one kept is not kept, and past `cap`
/// the oldest grant but that first one makes room. (Tokens minted per join, each expiring
/// later than the last, are never covered: past the cap, grants naming the user must make
/// room too, or a long-lived socket kept one per join for a day.)
fn keep_grant(grants: &mut Vec<Grant>, grant: Grant, now: i64, cap: usize) {
    let identity = grants.iter().position(|g| g.user_id.is_some());
    let mut index = 0;
    grants.retain(|g| {
        let keep = g.expires_at > now || Some(index) == identity;
        index += 1;
        keep
    });
    let covered = grants.iter().any(|kept| {
        kept.expires_at >= grant.expires_at
            && (grant.user_id.is_none() || kept.user_id == grant.user_id)
            && grant.rooms.iter().all(|room| kept.rooms.contains(room))
    });
    if covered {
        return;
    }
    let identity = grants.iter().position(|g| g.user_id.is_some());
    if grants.len() >= cap.max(1)
        && let Some(oldest) = (0..grants.len()).find(|&at| Some(at) != identity)
    {
        grants.remove(oldest);
    }
    grants.push(grant);
}

fn charge(
    bucket: &mut Option<TokenBucket>,
    what: &str,
    per_second: u32,
    burst: u32,
) -> Result<(), Refusal> {
    if let Some(bucket) = bucket
        && !bucket.try_take(1.0)
    {
        return Err(refuse(
            "rate_limited",
            format!("at most {per_second} {what} per second (bursts of {burst})"),
        ));
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Written {
    Yes,
    /// Its send buffer is full: the client does not read fast enough.
    Full,
    /// Disconnected meanwhile.
    Gone,
}

/// Disconnects a socket from its namespace (`"io server disconnect"` on the client, which
/// then reconnects only when told to). The DISCONNECT packet needs room in the socket's send
/// buffer: while a client that stopped reading holds it full, try again until there is room
/// or the connection ends (Engine.IO's heartbeat ends a client that reads nothing).
async fn disconnect(socket: &SocketRef, closed: &CancellationToken) {
    const RETRY: std::time::Duration = std::time::Duration::from_millis(100);
    while socket.clone().disconnect().is_err() {
        tokio::select! {
            () = closed.cancelled() => return,
            () = tokio::time::sleep(RETRY) => {}
        }
    }
}

/// The last argument of every event: where it comes from.
#[derive(Serialize)]
struct Meta<'a> {
    channel: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    epoch: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<u64>,
}

fn confirmation_frame(room: &str, confirmation: &Value) -> Frame {
    protocol::system(
        "pusher_internal:subscription_succeeded",
        Some(room),
        confirmation,
    )
}

/// `{room[, members][, history]}` from a Pusher confirmation.
fn subscribed_body(room: &str, confirmation: &Value) -> Value {
    let mut body = json!({"room": room});
    if let Some(members) = confirmation.pointer("/presence/hash") {
        body["members"] = members.clone();
    }
    if let Some(history) = confirmation.get("history") {
        body["history"] = history.clone();
    }
    body
}

/// A frame from the channel layer as a Socket.IO event, if it is one a socket gets.
fn translate(frame: &Frame) -> Option<(&'static str, Value)> {
    #[derive(Deserialize)]
    struct Wire {
        event: String,
        #[serde(default)]
        channel: Option<String>,
        #[serde(default)]
        data: Option<String>,
    }
    let wire: Wire = serde_json::from_str(frame.as_str()).ok()?;
    let room = wire.channel.unwrap_or_default();
    let data: Value = wire
        .data
        .as_deref()
        .and_then(|d| serde_json::from_str(d).ok())
        .unwrap_or(Value::Null);
    match wire.event.as_str() {
        "pusher_internal:subscription_succeeded" => {
            Some(("herald:subscribed", subscribed_body(&room, &data)))
        }
        "pusher_internal:member_added" => Some((
            "herald:member_added",
            json!({"room": room, "user_id": data["user_id"], "user_info": data["user_info"]}),
        )),
        "pusher_internal:member_removed" => Some((
            "herald:member_removed",
            json!({"room": room, "user_id": data["user_id"]}),
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queued_packets_are_bounded_in_bytes_but_one_alone_always_fits() {
        let bytes = InboundBytes::new(100);
        let first = bytes.try_take(60).expect("fits");
        let second = bytes.try_take(40).expect("fits exactly");
        assert!(bytes.try_take(1).is_none(), "over the bound");
        drop(first);
        let third = bytes.try_take(60).expect("room again once one is handled");
        drop((second, third));
        assert_eq!(bytes.queued.load(Ordering::Acquire), 0);
        // Larger than the bound, alone: in; then nothing more until it is handled.
        let large = bytes.try_take(250).expect("alone");
        assert!(bytes.try_take(1).is_none());
        drop(large);
        assert!(bytes.try_take(1).is_some());
    }

    fn grant(user: Option<&str>, rooms: &[&str], expires_at: i64) -> Grant {
        Grant {
            user_id: user.map(str::to_owned),
            user_info: None,
            rooms: rooms.iter().map(|r| (*r).to_owned()).collect(),
            expires_at,
        }
    }

    #[test]
    fn a_socket_keeps_a_bounded_set_of_grants_however_often_it_joins() {
        let mut grants = vec![grant(Some("u1"), &["presence-a"], 100)];
        // The same token, a thousand joins: kept once.
        for _ in 0..1000 {
            keep_grant(&mut grants, grant(None, &["private-a"], 200), 50, 10);
        }
        assert_eq!(grants.len(), 2, "one grant per token, not per join");
        // Distinct tokens past the cap: the oldest that names no user makes room.
        for n in 0..20 {
            let room = format!("private-{n}");
            keep_grant(&mut grants, grant(None, &[&room], 200), 50, 10);
        }
        assert_eq!(grants.len(), 10);
        assert_eq!(
            grants[0].user_id.as_deref(),
            Some("u1"),
            "who the socket is stays"
        );
        assert!(grants.iter().any(|g| g.rooms == ["private-19"]));
        // Once expired, grants go, except the one that says who the socket is.
        keep_grant(&mut grants, grant(None, &["private-late"], 900), 300, 10);
        let rooms: Vec<&str> = grants.iter().map(|g| g.rooms[0].as_str()).collect();
        assert_eq!(rooms, ["presence-a", "private-late"]);
        // A fresh token for the user at every join, each expiring a second later than the
        // last: never covered, and still bounded.
        for n in 0..1000 {
            keep_grant(
                &mut grants,
                grant(Some("u1"), &["presence-a", "private-b"], 1000 + n),
                300,
                10,
            );
        }
        assert_eq!(grants.len(), 10);
        assert_eq!(grants[0].rooms, ["presence-a"], "who the socket is stays");
        assert_eq!(grants[9].expires_at, 1999, "the newest is kept");
    }
}
