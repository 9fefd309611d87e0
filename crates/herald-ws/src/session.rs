//! One connection's Pusher protocol state machine, without the socket.
//!
//! A [`Session`] holds what the protocol remembers about a connection (its subscriptions and
//! presence memberships, its signed-in user, its subscribe and client-event rate limits) and
//! turns each parsed [`ClientMessage`] into frames queued on the connection's [`Outbox`] and
//! changes to the app's [`AppHub`], returning a close code when the protocol says the
//! connection must end. It never touches the socket: `connection.rs` reads and writes it.
//!
//! What is not in memory sits behind [`Backend`]: the app's current credentials (a store
//! read), channel history (its retention rules, what a resuming subscriber missed) and the
//! publisher (client events).
//! [`Live`] is the one the server uses; the tests script one, and with a real hub and outbox
//! they run transcripts (client messages in, server frames out) with no sockets.
//!
//! Bad input gets `pusher:error` or `pusher:subscription_error` and the connection stays (a
//! client-event rate beyond the limit too: `pusher:error` 4301); only the protocol's close
//! cases close it.
//!
//! A subscribe is never refused for a passing reason. pusher-js keeps a channel pending from
//! its subscribe until the confirmation and sends no other subscribe for it meanwhile (a
//! `pusher:subscription_error` from the server does not end the wait), so a refusal the client
//! could have retried would leave the channel dead until the connection drops. A subscribe
//! beyond the subscribe rate waits for its turn, and one the store could not serve (the app's
//! credentials or the channel's history unreadable) is told so and tried again with backoff;
//! both are [`Deferred`], and the connection's loop runs them when due
//! ([`Session::next_deferred`], [`Session::run_deferred`]).

use std::{future::Future, sync::Arc, time::Duration};

use herald_channels::{
    EventData, Publication, Publish, PublishError, Publisher, Webhook, presence::complete_snapshot,
};
use herald_core::{
    history::Retention,
    model::{App, PusherCredentials},
    pusher::{self, ChannelKind},
};
use herald_store::{Store, StoreError};
use serde_json::{json, value::RawValue};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{
    WsConfig, close,
    history::{Joined, Resume},
    hub::{AppHub, ChannelEvent, Joining, Outbox, SubscribeError},
    limits::{ClientPermit, TokenBucket},
    protocol::{
        self,
        client::{self, ClientMessage, Subscribe},
    },
};

/// A close code and its reason.
pub type Close = (u16, String);

/// The reason given when a connection's app was deleted.
pub const APP_DELETED: &str = "the app was deleted";

/// Why a signature could not be checked: the app's credentials could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable {
    /// `pusher:subscription_error`'s type and status.
    pub kind: &'static str,
    pub message: &'static str,
    pub status: u16,
    /// The code of the `pusher:error` a sign-in gets.
    pub close: Option<u16>,
}

impl Unavailable {
    /// Whether it may pass (the store failed), rather than say no (the app is gone).
    fn may_pass(&self) -> bool {
        self.status >= 500
    }
}

/// The first wait before a subscribe the store could not serve is tried again; it doubles
/// with each failure, up to [`RETRY_AT_MOST`].
const RETRY_FIRST: Duration = Duration::from_secs(1);
/// The longest wait between tries of a subscribe the store could not serve.
const RETRY_AT_MOST: Duration = Duration::from_secs(30);

/// How long a request the store could not serve for the `failures`th time waits: doubling
/// from [`RETRY_FIRST`] up to [`RETRY_AT_MOST`], with jitter, so the connections of a node
/// that lost its store do not all come back at once.
fn retry_wait(failures: u32) -> Duration {
    RETRY_FIRST
        .saturating_mul(1 << failures.saturating_sub(1).min(5))
        .min(RETRY_AT_MOST)
        .mul_f64(rand::random_range(0.5..=1.0))
}

/// A subscribe the session answers later.
struct Deferred {
    request: Subscribe,
    /// When it is run: it then takes a subscribe token like any other, or waits for one.
    due: Instant,
    /// How many times the store could not serve it (0: it waits for the subscribe rate).
    failures: u32,
}

/// A sign-in the store could not serve (the app's credentials unreadable), tried again when
/// due: pusher-js sends `pusher:signin` once per connection, so a refusal it could have
/// retried would leave the connection signed out (no `#server-to-user-` channel, nothing sent
/// to the user reaches it) until it drops.
struct DeferredSignIn {
    auth: String,
    user_data: String,
    due: Instant,
    failures: u32,
}

/// A session's side effects beyond the hub: the store and channel history.
pub trait Backend: Send + Sync + 'static {
    /// The app's Pusher credentials as they are now, for one signature check.
    fn credentials(&self) -> impl Future<Output = Result<PusherCredentials, Unavailable>> + Send;

    /// The channel's retention, if it keeps history.
    fn retention(&self, channel: &str) -> Option<Retention>;

    /// Where a history channel stands and what `resume` missed, at most `max_replay` events
    /// (see [`History::recover_at_most`](crate::history::History::recover_at_most)); the
    /// subscriber is already in the hub, its broadcasts held.
    fn recover(
        &self,
        channel: &str,
        retention: Retention,
        resume: Option<&Resume>,
        max_replay: u64,
    ) -> impl Future<Output = Result<Joined, StoreError>> + Send;

    /// The kept events of a history channel between `after` and `before` (both exclusive),
    /// oldest first (see [`History::between`](crate::history::History::between)).
    fn history_between(
        &self,
        channel: &str,
        after: u64,
        before: u64,
    ) -> impl Future<Output = Result<Vec<Arc<Publication>>, StoreError>> + Send;

    /// Publishes a client event through the one publish path: kept first on a history
    /// channel, then relayed to the channel's other subscribers.
    fn publish_client_event(
        &self,
        channel: &str,
        event: &str,
        data: &RawValue,
        user_id: Option<&str>,
        sender: &str,
    ) -> impl Future<Output = Result<(), PublishError>> + Send;
}

/// The server's [`Backend`]: the store and the [`Publisher`] (with its channel history).
pub struct Live {
    /// The app as it was at the handshake: its id, and the history rules its subscribes
    /// follow (a client event reads the app again). Its Pusher credentials are not used: see
    /// [`Live::credentials`](Backend::credentials).
    /// Shared by the app's connections (see [`AppHub::share_app`]).
    pub app: Arc<App>,
    pub store: Arc<dyn Store>,
    pub publisher: Arc<Publisher>,
    /// The connection's place in its address's counts, and that address's replay budget.
    pub client: ClientPermit,
}

impl Backend for Live {
    /// Read at every check, never kept from the handshake, so a rotation reaches open sockets
    /// at once: the retired secret stops verifying when its grace ends (at once with a grace
    /// of 0) and the new one verifies from the rotation's commit on. The store's app cache is
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
                    message: "the app's credentials could not be read",
                    status: 503,
                    close: None,
                })
            }
        }
    }

    fn retention(&self, channel: &str) -> Option<Retention> {
        self.publisher.history().retention(&self.app, channel)
    }

    async fn recover(
        &self,
        channel: &str,
        retention: Retention,
        resume: Option<&Resume>,
        max_replay: u64,
    ) -> Result<Joined, StoreError> {
        // Boxed, here and below: a future is as large as the largest one it awaits inline,
        // and the connection task holds its session's for as long as the connection lives,
        // idle or not. Joins and client events are rare next to that, so they pay for a box.
        Box::pin(self.publisher.history().recover_at_most(
            &self.app,
            channel,
            retention,
            resume,
            &self.client,
            max_replay,
        ))
        .await
    }

    async fn history_between(
        &self,
        channel: &str,
        after: u64,
        before: u64,
    ) -> Result<Vec<Arc<Publication>>, StoreError> {
        Box::pin(
            self.publisher
                .history()
                .between(&self.app.id, channel, after, before),
        )
        .await
    }

    async fn publish_client_event(
        &self,
        channel: &str,
        event: &str,
        data: &RawValue,
        user_id: Option<&str>,
        sender: &str,
    ) -> Result<(), PublishError> {
        let publish = Publish {
            event: event.to_owned(),
            channels: vec![channel.to_owned()],
            data: EventData::Json(data.to_owned()),
            user_id: user_id.map(str::to_owned),
            except: Some(sender.to_owned()),
            webhook: Webhook::None,
        };
        // The app as it is now (a map lookup in the store's cache): its history rules decide
        // whether the event is kept, and a socket may stay open for days across a change of
        // them, which the API's publications of the same channel follow at once.
        let current = match self.store.get_app(&self.app.id).await {
            Ok(Some(app)) => Some(app),
            Ok(None) => None,
            Err(e) => {
                tracing::debug!(error = %e, app_id = %self.app.id, "could not read the app again for a client event; its handshake's copy decides");
                None
            }
        };
        let app = current.as_ref().unwrap_or(&self.app);
        Box::pin(self.publisher.publish(app, publish))
            .await
            .map(drop)
    }
}

/// One connection's protocol state.
pub struct Session<B> {
    backend: Arc<B>,
    hub: Arc<AppHub>,
    config: Arc<WsConfig>,
    socket_id: String,
    outbox: Outbox,
    channels: Subscriptions,
    /// Set by `pusher:signin`.
    user_id: Option<String>,
    /// Cancelled to close the connection; handed to the hub at sign-in.
    terminate: CancellationToken,
    /// Client events allowed per second, at most that many at once.
    client_events: TokenBucket,
    /// Subscribes allowed (`None`: no limit).
    subscribes: Option<TokenBucket>,
    /// Subscribes answered later, in the order they came. With the subscriptions, never more
    /// than `max_channels_per_connection`.
    deferred: Vec<Deferred>,
    /// The sign-in answered later, if any (boxed: rare, and every connection holds the field).
    deferred_sign_in: Option<Box<DeferredSignIn>>,
}

impl<B: Backend> Session<B> {
    /// A new session; queues `pusher:connection_established`, the first frame.
    pub fn new(
        backend: B,
        hub: Arc<AppHub>,
        config: Arc<WsConfig>,
        socket_id: String,
        outbox: Outbox,
        terminate: CancellationToken,
    ) -> Self {
        outbox.send(protocol::connection_established(
            &socket_id,
            config.activity_timeout.as_secs(),
        ));
        Self {
            backend: Arc::new(backend),
            hub,
            socket_id,
            outbox,
            channels: Subscriptions::default(),
            user_id: None,
            terminate,
            client_events: TokenBucket::new(
                f64::from(config.client_events_per_second),
                f64::from(config.client_events_per_second),
            ),
            subscribes: TokenBucket::limit(
                config.subscribes_per_second.into(),
                config.subscribe_burst.into(),
            ),
            deferred: Vec::new(),
            deferred_sign_in: None,
            config,
        }
    }

    /// When the first deferred subscribe is due, if there is one.
    pub fn next_deferred(&self) -> Option<Instant> {
        let sign_in = self.deferred_sign_in.as_ref().map(|s| s.due);
        self.deferred.iter().map(|d| d.due).chain(sign_in).min()
    }

    /// Runs the deferred sign-in and subscribes that are due, the subscribes in the order they
    /// came.
    pub async fn run_deferred(&mut self) {
        let now = Instant::now();
        if let Some(sign_in) = self.deferred_sign_in.take_if(|s| s.due <= now) {
            let DeferredSignIn {
                auth,
                user_data,
                failures,
                ..
            } = *sign_in;
            self.sign_in(&auth, user_data, failures).await;
        }
        let due: Vec<Deferred> = self.deferred.extract_if(.., |d| d.due <= now).collect();
        for deferred in due {
            // A failure taken up again waits for the rate like a new subscribe.
            if let Some(wait) = self.subscribe_wait(false) {
                self.deferred.push(Deferred {
                    due: now + wait,
                    ..deferred
                });
                continue;
            }
            self.subscribe_now(deferred.request, deferred.failures)
                .await;
        }
    }

    /// Takes a subscribe token, unless others wait for one first (`behind_others`), or says
    /// how long until one is there; `None` without a limit.
    fn subscribe_wait(&mut self, behind_others: bool) -> Option<Duration> {
        let bucket = self.subscribes.as_mut()?;
        if !behind_others && bucket.try_take(1.0) {
            return None;
        }
        Some(bucket.time_until(1.0).max(Duration::from_millis(1)))
    }

    /// Whether a subscribe waits for the rate already: a new one then queues behind it
    /// rather than overtake it.
    fn waiting_for_rate(&self) -> bool {
        self.deferred.iter().any(|d| d.failures == 0)
    }

    /// Tells the client the store could not serve the subscribe (as `kind`, `status`), then
    /// defers it: tried again after a wait that doubles with each failure, with jitter, so the
    /// connections of a node that lost its store do not all come back at once.
    fn retry_later(
        &mut self,
        request: Subscribe,
        failures: u32,
        kind: &str,
        message: &str,
        status: u16,
    ) {
        let failures = failures + 1;
        let wait = retry_wait(failures);
        // Told once: pusher-js emits it to the channel's `pusher:subscription_error` handlers
        // and keeps the channel pending until the confirmation comes.
        if failures == 1 {
            self.outbox.send(protocol::subscription_error(
                &request.channel,
                kind,
                &format!("{message}; the subscribe is tried again until it succeeds"),
                status,
            ));
        }
        self.deferred.push(Deferred {
            request,
            due: Instant::now() + wait,
            failures,
        });
    }

    /// Handles one client message; returns a close code if the connection must end.
    /// Messages over `max_message_bytes` never get here: the transport refuses them (1009).
    pub async fn handle(&mut self, message: ClientMessage) -> Option<Close> {
        match message {
            ClientMessage::Ping => self.outbox.send(protocol::pong()),
            ClientMessage::Pong => {}
            ClientMessage::Subscribe(request) => self.subscribe(request).await,
            ClientMessage::Unsubscribe { channel } => self.leave(&channel),
            ClientMessage::Signin { auth, user_data } => {
                // The latest sign-in is the one to answer.
                self.deferred_sign_in = None;
                self.sign_in(&auth, user_data, 0).await;
            }
            ClientMessage::ClientEvent {
                event,
                channel,
                data,
            } => return self.client_event(&event, channel, data.as_deref()).await,
            ClientMessage::Unknown { event } => self
                .outbox
                .send(protocol::error(&format!("unknown event {event:?}"), None)),
            ClientMessage::Malformed { reason } => {
                self.outbox.send(protocol::error(&reason, None));
            }
        }
        None
    }

    async fn subscribe(&mut self, request: Subscribe) {
        // Sent again while it waits: it is answered once, as sent last.
        if let Some(waiting) = self
            .deferred
            .iter_mut()
            .find(|d| d.request.channel == request.channel)
        {
            waiting.request = request;
            return;
        }
        // Every subscribe counts, valid or not: each may read the channel's position. Beyond
        // the rate it waits for its turn, unless the connection already has as many waiting
        // and subscribed as it may have channels (a client subscribing in a loop).
        let behind_others = self.waiting_for_rate();
        if let Some(wait) = self.subscribe_wait(behind_others) {
            if self.channels.len() + self.deferred.len() >= self.config.max_channels_per_connection
            {
                self.outbox.send(protocol::subscription_error(
                    &request.channel,
                    "RateLimited",
                    &format!(
                        "too many subscribes: at most {} per second (bursts of {}); try again later",
                        self.config.subscribes_per_second, self.config.subscribe_burst
                    ),
                    429,
                ));
                return;
            }
            self.deferred.push(Deferred {
                request,
                due: Instant::now() + wait,
                failures: 0,
            });
            return;
        }
        self.subscribe_now(request, 0).await;
    }

    /// Answers a subscribe that took its turn; `failures` is how many times the store could
    /// not serve it before.
    async fn subscribe_now(&mut self, request: Subscribe, failures: u32) {
        let channel = request.channel.as_str();
        let refuse = |kind: &str, message: String, status: u16| {
            protocol::subscription_error(channel, kind, &message, status)
        };
        if let Err(e) = pusher::validate_channel_name(channel) {
            self.outbox.send(refuse("InvalidChannel", e, 400));
            return;
        }
        if self.channels.get(channel).is_some() {
            // Already subscribed: confirm again, as a resubscribe after a glitch expects. A
            // presence channel's confirmation carries its members, as a first one does:
            // pusher-js reads them from it (`{}` throws in its members' update).
            if let Some(snapshot) = self.hub.rejoin(channel, &self.socket_id) {
                self.confirm_members_again(channel, snapshot).await;
                return;
            }
            self.outbox.send(protocol::system(
                "pusher_internal:subscription_succeeded",
                Some(channel),
                &json!({}),
            ));
            return;
        }
        if self.channels.len() + self.deferred.len() >= self.config.max_channels_per_connection {
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
        if kind == ChannelKind::User {
            // The user's own channel needs no signature: `pusher:signin` proved who it is
            // (pusher-js subscribes to it, with an empty auth, right after signing in).
            let own = channel
                .strip_prefix(herald_core::validate::USER_CHANNEL_PREFIX)
                .is_some_and(|user| self.user_id.as_deref() == Some(user));
            if !own {
                self.outbox.send(refuse(
                    "AuthError",
                    format!("{channel} is a user's own channel: sign in as that user (pusher:signin) to subscribe"),
                    403,
                ));
                return;
            }
        } else if kind.needs_auth() {
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
            let credentials = match self.backend.credentials().await {
                Ok(credentials) => credentials,
                Err(unavailable) if unavailable.may_pass() => {
                    self.retry_later(
                        request,
                        failures,
                        unavailable.kind,
                        unavailable.message,
                        unavailable.status,
                    );
                    return;
                }
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
        let joining = match channel_data
            .map(|d| client::presence_member(d, self.config.max_user_info_bytes))
        {
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
        // A retry after the history could not be read looks first, before joining: a join
        // that fails again is undone, and on a presence channel the other members would see
        // this member come and go at every retry (webhooks, cluster rows too).
        let unreadable = if failures > 0
            && let Some(retention) = self.backend.retention(channel)
            && self
                .backend
                .recover(channel, retention, None, 0)
                .await
                .is_err()
        {
            true
        } else {
            !self
                .join(channel, joining, member, request.resume.as_ref())
                .await
        };
        if unreadable {
            self.retry_later(
                request,
                failures,
                "HistoryUnavailable",
                "the channel's history could not be read",
                503,
            );
        }
    }

    /// Confirms a presence subscription again with `snapshot`, this node's members, which
    /// [`AppHub::rejoin`] took as it began holding the subscriber's frames: in a cluster the
    /// other nodes' members are added, and the confirmation is queued under the channel lock
    /// ahead of what was held, as for a new join (see [`Session::join`]).
    async fn confirm_members_again(&mut self, channel: &str, mut snapshot: serde_json::Value) {
        if let Some(elsewhere) = self.hub.members_elsewhere(channel) {
            complete_snapshot(
                &self.hub,
                channel,
                &self.socket_id,
                &mut snapshot,
                elsewhere,
            )
            .await;
        }
        let confirmed = protocol::system(
            "pusher_internal:subscription_succeeded",
            Some(channel),
            &snapshot,
        );
        self.hub
            .go_live(channel, &self.socket_id, 0, |outbox| outbox.send(confirmed));
    }

    /// Adds the subscription to the hub and queues its confirmation; on a history channel,
    /// with the history status and the missed events, merged with what was broadcast while
    /// they were read (see `herald_channels::history`). On a presence channel the subscriber's
    /// frames are held the same way until the confirmation is queued under the channel lock,
    /// so no member notice overtakes the snapshot; in a cluster the snapshot adds the members
    /// other nodes hold, read meanwhile.
    ///
    /// Returns false, subscribed to nothing, if the channel's history could not be read.
    #[must_use]
    async fn join(
        &mut self,
        channel: &str,
        joining: Option<Joining>,
        member: Option<(String, Option<String>)>,
        resume: Option<&Resume>,
    ) -> bool {
        let retention = self.backend.retention(channel);
        let elsewhere = if joining.is_some() {
            self.hub.members_elsewhere(channel)
        } else {
            None
        };
        // A presence join is held like a history join, on one node too: the confirmation (its
        // snapshot) then goes out under the channel lock, before any member notice sent after
        // the snapshot was taken, which pusher-js would otherwise apply and then overwrite
        // with the snapshot (a member shown who left, or not shown who came).
        let presence = joining.is_some();
        let subscribed = if retention.is_some() || presence {
            self.hub.subscribe_joining(
                channel,
                &self.socket_id,
                &self.outbox,
                joining,
                self.config.max_presence_members,
            )
        } else {
            self.hub.subscribe(
                channel,
                &self.socket_id,
                &self.outbox,
                joining,
                self.config.max_presence_members,
            )
        };
        let subscribed = match subscribed {
            Ok(subscribed) => subscribed,
            Err(SubscribeError::PresenceFull(max)) => {
                self.outbox.send(protocol::subscription_error(
                    channel,
                    "LimitReached",
                    &format!("the presence channel is full ({max} members)"),
                    403,
                ));
                return true;
            }
        };
        let mut confirmation = subscribed.presence.unwrap_or_else(|| json!({}));
        if let Some(elsewhere) = elsewhere {
            complete_snapshot(
                &self.hub,
                channel,
                &self.socket_id,
                &mut confirmation,
                elsewhere,
            )
            .await;
        }
        match retention {
            None if presence => {
                let confirmed = protocol::system(
                    "pusher_internal:subscription_succeeded",
                    Some(channel),
                    &confirmation,
                );
                self.hub
                    .go_live(channel, &self.socket_id, 0, |outbox| outbox.send(confirmed));
            }
            None => self.outbox.send(protocol::system(
                "pusher_internal:subscription_succeeded",
                Some(channel),
                &confirmation,
            )),
            // The replay goes into the outbox whole, after the confirmation: no more than
            // fits (more is `too_many_missed`, whatever `history.max_replay` allows).
            Some(retention) => {
                // The replay goes into the outbox whole, after the confirmation: no more than
                // fits (more is `too_many_missed`, whatever `history.max_replay` allows).
                let max_replay = self.outbox.capacity().saturating_sub(1) as u64;
                let joined = self
                    .backend
                    .recover(channel, retention, resume, max_replay)
                    .await;
                let live = match joined {
                    Ok(joined) => {
                        confirmation["history"] = joined.status();
                        let confirmed = protocol::system(
                            "pusher_internal:subscription_succeeded",
                            Some(channel),
                            &confirmation,
                        );
                        let Joined { offset, replay, .. } = joined;
                        let backend = &self.backend;
                        self.hub
                            .go_live_in_order(
                                channel,
                                &self.socket_id,
                                offset,
                                |outbox| outbox.send(confirmed.clone()),
                                replay,
                                |after, before| backend.history_between(channel, after, before),
                            )
                            .await
                    }
                    Err(e) => Err(e),
                };
                if let Err(e) = live {
                    tracing::error!(error = %e, channel, "reading channel history failed");
                    self.channels
                        .insert(channel.to_owned(), member.map(|(user_id, _)| user_id));
                    self.leave(channel);
                    return false;
                }
            }
        }
        // A new member was announced by the hub, under the channel lock.
        self.channels
            .insert(channel.to_owned(), member.map(|(user_id, _)| user_id));
        true
    }

    fn leave(&mut self, channel: &str) {
        // One still waiting is never answered (pusher-js unsubscribes from a pending channel
        // only once it is confirmed, so this comes from other clients).
        self.deferred.retain(|d| d.request.channel != channel);
        if self.channels.remove(channel).is_none() {
            return;
        }
        // A member's last socket leaving is announced by the hub, under the channel lock.
        self.hub.unsubscribe(channel, &self.socket_id);
    }

    /// Leaves every channel and signs out: the connection is over.
    pub fn leave_all(&mut self) {
        self.deferred.clear();
        self.deferred_sign_in = None;
        let channels = self.channels.names();
        for channel in channels {
            self.leave(&channel);
        }
        if let Some(user_id) = self.user_id.take() {
            self.hub.sign_out(&user_id, &self.socket_id);
        }
    }

    /// Signs the connection in; `failures` is how many times the store could not serve this
    /// sign-in before (it is then tried again later, and told once).
    async fn sign_in(&mut self, auth: &str, user_data: String, failures: u32) {
        let credentials = match self.backend.credentials().await {
            Ok(credentials) => credentials,
            Err(unavailable) if unavailable.may_pass() => {
                if failures == 0 {
                    self.outbox.send(protocol::error(
                        &format!(
                            "sign-in delayed: {}; it is tried again until it succeeds",
                            unavailable.message
                        ),
                        unavailable.close,
                    ));
                }
                let failures = failures + 1;
                self.deferred_sign_in = Some(Box::new(DeferredSignIn {
                    auth: auth.to_owned(),
                    user_data,
                    due: Instant::now() + retry_wait(failures),
                    failures,
                }));
                return;
            }
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
            pusher::verify_user_auth(&credentials.key, secret, &self.socket_id, &user_data, auth)
        }) {
            self.outbox.send(protocol::error(
                &format!("sign-in refused: {e}"),
                Some(close::UNAUTHORIZED),
            ));
            return;
        }
        let Some(user_id) = client::signed_in_user(&user_data) else {
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
            &json!({"user_data": user_data}),
        ));
    }

    async fn client_event(
        &mut self,
        event: &str,
        channel: Option<String>,
        data: Option<&RawValue>,
    ) -> Option<Close> {
        let Some(channel) = channel.as_deref() else {
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
        // Charged only for an event that would be relayed: pusher-js sends client events
        // before `subscription_succeeded` (Echo's whisper right after join), and those refused
        // as not subscribed must not spend the allowance of the ones that follow.
        if !self.client_events.try_take(1.0) {
            // Dropped with `pusher:error` 4301, as Pusher-compatible servers answer; the
            // connection stays. A close with 4301 would be final for pusher-js, which treats
            // every close code from 4300 as a refusal and never reconnects.
            self.outbox.send(protocol::error(
                &format!(
                    "client event rejected: more than {} per second",
                    self.config.client_events_per_second
                ),
                Some(close::CLIENT_EVENT_RATE_LIMIT),
            ));
            return None;
        }
        let null =
            RawValue::from_string("null".into()).unwrap_or_else(|_| unreachable!("null is JSON"));
        let data = data.unwrap_or(&null);
        // Reported for `client_event` webhooks.
        let report = || ChannelEvent::ClientEvent {
            channel: channel.to_owned(),
            event: event.to_owned(),
            data: client::event_text(data),
            socket_id: self.socket_id.clone(),
            user_id: member.clone(),
        };
        // Published (kept first on a history channel, never echoed to the sender), then
        // reported for `client_event` webhooks: an event that could not be published is not
        // reported, so the client's retry is reported once.
        match self
            .backend
            .publish_client_event(channel, event, data, member.as_deref(), &self.socket_id)
            .await
        {
            Ok(()) => self.hub.report_client_event(channel, report),
            Err(e) => {
                tracing::error!(error = %e, channel, "publishing a client event failed");
                self.outbox.send(protocol::error(
                    &format!("client event on {channel} could not be published; try again"),
                    None,
                ));
            }
        }
        None
    }
}

/// Subscribed channels, with the presence user id for presence channels. A list, not a map:
/// most connections hold one channel, for which a `HashMap` allocated about 210 bytes and this
/// holds 48, and the list is short (at most `max_channels_per_connection`) to look through.
#[derive(Default)]
struct Subscriptions(Vec<(String, Option<String>)>);

impl Subscriptions {
    fn get(&self, channel: &str) -> Option<&Option<String>> {
        self.0.iter().find(|(c, _)| c == channel).map(|(_, m)| m)
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn insert(&mut self, channel: String, member: Option<String>) {
        if let Some(kept) = self.0.iter_mut().find(|(c, _)| *c == channel) {
            kept.1 = member;
            return;
        }
        // One slot at a time: the usual single subscription holds room for itself alone.
        self.0.reserve_exact(1);
        self.0.push((channel, member));
    }

    fn remove(&mut self, channel: &str) -> Option<Option<String>> {
        let at = self.0.iter().position(|(c, _)| c == channel)?;
        let (_, member) = self.0.swap_remove(at);
        if self.0.is_empty() {
            self.0 = Vec::new();
        }
        Some(member)
    }

    fn names(&self) -> Vec<String> {
        self.0.iter().map(|(c, _)| c.clone()).collect()
    }
}

#[cfg(test)]
mod tests;
