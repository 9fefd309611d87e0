//! Who is subscribed to what, per app, and fan-out.
//!
//! One [`AppHub`] per app holds its channels behind one lock: broadcasts take it shared,
//! subscribe and unsubscribe take it exclusively. A broadcast hands the same publication (an
//! `Arc`, each protocol's encoding built once on first use) to every subscriber's [`Outbox`]; a
//! full outbox marks that connection as too slow, and the connection closes itself, so one
//! stalled reader never holds up the others. A subscriber joining a history channel has its
//! broadcasts held until [`AppHub::go_live`] merges them behind its replay.
//!
//! Changes of channel state (occupied, vacated, members, client events) are reported to a
//! [`ChannelObserver`] while the channel lock is held, so the observer sees them in the order
//! they happened even when many connections race; presence members are announced to the
//! channel's subscribers (`member_added`, `member_removed`) under the same lock, for the same
//! reason. A hub that shares presence with other nodes ([`Hub::share_presence`]) hands
//! occupancy and membership changes to its [`PresenceSync`] instead, under the same lock and
//! in the same order: the cluster decides what they mean for every node, reports the channel
//! webhooks and announces members; the hub then announces nothing itself.

use herald_core::{AppId, model::App};
use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex, OnceLock, RwLock,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
};

use herald_metrics::{ChannelMetrics, Transport, prometheus_client::metrics::counter::Counter};
use serde::Serialize;
use serde_json::value::RawValue;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{
    Frame,
    presence::{LocalChange, MembersFuture, PresenceSync, RemoteMember},
    publication::{Outgoing, Publication},
    queue,
};

pub use crate::queue::{Frames, TryRecvError};

/// Set once, when the node joins a cluster; shared by the hub and each app's hub.
type SharedSync = Arc<OnceLock<Arc<dyn PresenceSync>>>;

/// Where a connection's frames and publications go. Sending never waits.
#[derive(Clone)]
pub struct Outbox {
    /// Holds no allocation while empty (see [`queue`]): most connections are idle.
    frames: queue::Sender,
    /// Cancelled when a frame did not fit: the connection is too slow and must close. A
    /// WebSocket's is its closing token (see [`Outbox::pusher_closing`]).
    overflowed: CancellationToken,
    /// Counts the overflow once, in the hub's metrics (attached when the outbox subscribes).
    overflows: Arc<OverflowCount>,
    takes: Takes,
    /// The connection's transport, for the subscriptions gauge.
    transport: Transport,
}

/// How an outbox takes publications.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Takes {
    /// Whole (`Outgoing::Publication`): SSE reads each one's position for its event ids.
    Publications,
    /// As their Pusher frames (`Outgoing::Frame`), which a WebSocket writes as they are: its
    /// connection task never touches the publication's own reference count, which every
    /// subscriber's task would otherwise contend on, besides the frame's.
    PusherFrames,
}

/// Shared by an outbox's clones: its overflow is counted once, whichever clone notices it.
#[derive(Default)]
struct OverflowCount {
    counted: AtomicBool,
    counter: OnceLock<Counter>,
}

impl Outbox {
    /// An SSE stream's outbox: takes publications whole (tests use it as the plain kind).
    pub fn new(capacity: usize) -> (Self, Frames, CancellationToken) {
        Self::taking(capacity, Takes::Publications, Transport::Sse)
    }

    /// A Socket.IO connection's outbox: takes publications whole.
    pub fn socketio(capacity: usize) -> (Self, Frames, CancellationToken) {
        Self::taking(capacity, Takes::Publications, Transport::SocketIo)
    }

    /// An outbox that takes publications as their Pusher frames (WebSockets).
    pub fn pusher(capacity: usize) -> (Self, Frames, CancellationToken) {
        Self::taking(capacity, Takes::PusherFrames, Transport::Pusher)
    }

    /// A WebSocket's outbox: takes publications as their Pusher frames, and an overflow
    /// cancels `closing`, the token the connection already watches for every other reason to
    /// close (its termination, its app's deletion), which [`Outbox::has_overflowed`] then tells
    /// apart. One token per connection instead of two: an idle connection holds both.
    pub fn pusher_closing(capacity: usize, closing: CancellationToken) -> (Self, Frames) {
        let (outbox, frames, _) =
            Self::with_token(capacity, Takes::PusherFrames, Transport::Pusher, closing);
        (outbox, frames)
    }

    fn taking(
        capacity: usize,
        takes: Takes,
        transport: Transport,
    ) -> (Self, Frames, CancellationToken) {
        Self::with_token(capacity, takes, transport, CancellationToken::new())
    }

    fn with_token(
        capacity: usize,
        takes: Takes,
        transport: Transport,
        overflowed: CancellationToken,
    ) -> (Self, Frames, CancellationToken) {
        let (frames, receiver) = queue::channel(capacity);
        (
            Self {
                frames,
                overflowed: overflowed.clone(),
                overflows: Arc::default(),
                takes,
                transport,
            },
            receiver,
            overflowed,
        )
    }

    /// A frame did not fit: the connection is too slow.
    pub fn has_overflowed(&self) -> bool {
        self.overflows.counted.load(Ordering::Acquire)
    }

    /// Queues `item` for the connection (see [`Outbox::send_shared`]).
    pub fn send(&self, item: impl Into<Outgoing>) {
        self.send_shared(&item.into());
    }

    /// Queues what this outbox takes of a shared item: a frame-taking outbox gets the
    /// publication's frame without the publication's reference count being touched.
    fn send_shared(&self, item: &Outgoing) {
        // Nothing after an item dropped: the connection closes, and an item sent past the gap
        // would move its client's position (an SSE id, a history offset) beyond what it
        // missed, so its resume would skip it. Room made by the client reading meanwhile
        // does not reopen the outbox.
        if self.has_overflowed() {
            return;
        }
        let item = match (self.takes, item) {
            (Takes::PusherFrames, Outgoing::Publication(p)) => {
                Outgoing::Frame(p.pusher_frame().clone())
            }
            (_, item) => item.clone(),
        };
        if self.frames.try_send(item).is_err() {
            self.overflow();
        }
    }

    /// How many items it holds at most.
    pub fn capacity(&self) -> usize {
        self.frames.max_capacity()
    }

    /// Marks the connection too slow: it closes itself. Only here, off the per-frame path,
    /// is the overflow counted (once per outbox).
    fn overflow(&self) {
        // Marked before the token is cancelled: whoever the cancellation wakes reads the mark.
        let first = !self.overflows.counted.swap(true, Ordering::AcqRel);
        self.overflowed.cancel();
        if first && let Some(counter) = self.overflows.counter.get() {
            counter.inc();
        }
    }

    /// Counts this outbox's overflow in `counter` (the first hub it subscribes in).
    fn count_overflows_in(&self, counter: &Counter) {
        let _ = self.overflows.counter.set(counter.clone());
    }
}

/// A change of channel state, shaped as Pusher's channel webhooks carry it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "name")]
pub enum ChannelEvent {
    /// The channel got its first subscriber.
    #[serde(rename = "channel_occupied")]
    Occupied { channel: String },
    /// The channel's last subscriber left.
    #[serde(rename = "channel_vacated")]
    Vacated { channel: String },
    /// A user's first connection joined a presence channel.
    #[serde(rename = "member_added")]
    MemberAdded { channel: String, user_id: String },
    /// A user's last connection left a presence channel.
    #[serde(rename = "member_removed")]
    MemberRemoved { channel: String, user_id: String },
    /// A `client-` event sent on a private or presence channel.
    #[serde(rename = "client_event")]
    ClientEvent {
        channel: String,
        event: String,
        /// The event's data as JSON text (a string's content when the client sent a string).
        data: String,
        socket_id: String,
        /// Presence channels only.
        #[serde(skip_serializing_if = "Option::is_none")]
        user_id: Option<String>,
    },
}

impl ChannelEvent {
    /// The webhook event name, as serialized.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Occupied { .. } => "channel_occupied",
            Self::Vacated { .. } => "channel_vacated",
            Self::MemberAdded { .. } => "member_added",
            Self::MemberRemoved { .. } => "member_removed",
            Self::ClientEvent { .. } => "client_event",
        }
    }

    pub fn channel(&self) -> &str {
        match self {
            Self::Occupied { channel }
            | Self::Vacated { channel }
            | Self::MemberAdded { channel, .. }
            | Self::MemberRemoved { channel, .. }
            | Self::ClientEvent { channel, .. } => channel,
        }
    }

    /// The member, for presence events.
    pub fn user_id(&self) -> Option<&str> {
        match self {
            Self::MemberAdded { user_id, .. } | Self::MemberRemoved { user_id, .. } => {
                Some(user_id)
            }
            Self::ClientEvent { user_id, .. } => user_id.as_deref(),
            Self::Occupied { .. } | Self::Vacated { .. } => None,
        }
    }
}

/// Told of every [`ChannelEvent`], per app. Called with a channel lock held: it must be quick
/// and must not call back into the hub.
pub trait ChannelObserver: Send + Sync {
    fn observe(&self, app_id: &AppId, event: ChannelEvent);
}

/// The local hub. Its `Default` has no observer and detached metrics (for tests).
#[derive(Default)]
pub struct Hub {
    apps: RwLock<HashMap<AppId, Arc<AppHub>>>,
    observer: Option<Arc<dyn ChannelObserver>>,
    metrics: Arc<ChannelMetrics>,
    sync: SharedSync,
}

impl Hub {
    pub fn new(observer: Arc<dyn ChannelObserver>, metrics: Arc<ChannelMetrics>) -> Self {
        Self {
            apps: RwLock::default(),
            observer: Some(observer),
            metrics,
            sync: SharedSync::default(),
        }
    }

    /// This node's channel metrics, for the faces that count what they hold.
    pub fn metrics(&self) -> &ChannelMetrics {
        &self.metrics
    }

    /// Shares this node's presence and occupancy with a cluster from now on (before the node
    /// serves: changes made earlier were not shared). Returns false if it already shares.
    pub fn share_presence(&self, sync: Arc<dyn PresenceSync>) -> bool {
        self.sync.set(sync).is_ok()
    }

    /// The hub of the app with this id, created on first use.
    pub fn app(&self, app_id: &AppId) -> Arc<AppHub> {
        if let Some(app) = read(&self.apps).get(app_id) {
            return Arc::clone(app);
        }
        Arc::clone(
            write(&self.apps)
                .entry(app_id.to_owned())
                .or_insert_with(|| {
                    let mut app = AppHub::new(
                        app_id.clone(),
                        self.observer.clone(),
                        Arc::clone(&self.metrics),
                    );
                    app.sync = Arc::clone(&self.sync);
                    Arc::new(app)
                }),
        )
    }

    /// Ends every connection and SSE stream of a deleted app: their tokens (see
    /// [`AppHub::connection_token`]) are cancelled and they close with 4001. The app's hub stays,
    /// closed, so a connection or stream that looked the app up just before the deletion and
    /// reaches the hub after it ends too; an empty hub per deleted app is all that remains.
    pub fn remove_app(&self, app_id: &AppId) {
        self.app(app_id).removed.cancel();
    }

    /// The app's hub if it has one on this node (a broker bringing another node's publication
    /// does not create one for an app nobody here is connected to).
    pub fn existing(&self, app_id: &AppId) -> Option<Arc<AppHub>> {
        read(&self.apps).get(app_id).cloned()
    }

    /// Every app with a hub on this node.
    pub fn apps(&self) -> Vec<Arc<AppHub>> {
        read(&self.apps).values().cloned().collect()
    }
}

pub struct AppHub {
    app_id: AppId,
    observer: Option<Arc<dyn ChannelObserver>>,
    /// The hub's: connections, overflowing outboxes.
    metrics: Arc<ChannelMetrics>,
    connections: AtomicU32,
    channels: RwLock<HashMap<String, Channel>>,
    /// Signed-in users' connections, for `terminate_connections`: each connection's token and
    /// when it signed in (a termination this node hears late applies only to connections
    /// signed in before it: [`AppHub::terminate_user_signed_in_before`]).
    users: RwLock<HashMap<String, HashMap<String, SignedIn>>>,
    /// Cancelled when the app is deleted; every connection's token is a child of it.
    removed: CancellationToken,
    /// The cluster's, if this node shares presence (see the module doc).
    sync: SharedSync,
    /// The app's record as its connections last looked it up (see [`AppHub::share_app`]).
    shared_app: Mutex<Option<Arc<App>>>,
    /// How many resyncs of its presence subscribers are under way ([`AppHub::resyncing`]).
    resyncing: AtomicU32,
}

/// A signed-in connection: its token (cancelled to close it) and when it signed in.
type SignedIn = (CancellationToken, Instant);

#[derive(Default)]
struct Channel {
    subscribers: HashMap<String, Subscriber>,
    /// Presence channels: members by user id, with how many of the user's sockets are in.
    members: BTreeMap<String, Member>,
}

struct Subscriber {
    outbox: Outbox,
    user_id: Option<String>,
    /// While a history channel's subscriber is joining: what was broadcast to it meanwhile,
    /// held until [`AppHub::go_live`] merges it behind the replay (boxed: one pointer for
    /// the subscribers that are live).
    joining: Option<Box<Mutex<Vec<Held>>>>,
    /// Presence shared across nodes: the members this subscriber was told of (its snapshot,
    /// then each member notice it was sent). Another node's notice can arrive after a snapshot
    /// that already reflects it; this keeps each subscriber's view free of repeats (a
    /// `member_added` for a member it has, a `member_removed` for one it never had).
    members: Option<Box<Mutex<Told>>>,
    /// History channels: the offset after the newest this subscriber has (from its replay, or
    /// handed to it since); 0 until it goes live. A publication below it is one it has,
    /// arriving late (a broker brings an event to a node some time after its commit, and a
    /// subscriber that joined meanwhile read it from the store), and is not sent again.
    next_offset: AtomicU64,
}

/// What a presence subscriber in a cluster was told of (see `Subscriber::members`).
#[derive(Default)]
struct Told {
    ids: std::collections::HashSet<String>,
    /// A snapshot that lacked the other nodes' members: its repair's ticket (see
    /// [`AppHub::know_members_but_others`]). A new snapshot (the subscriber subscribed again)
    /// replaces this `Told`, and the ticket with it, so one repair at most serves it.
    repair: Option<u64>,
    /// While that repair reads the other nodes' members ([`AppHub::begin_repair`]): the
    /// members a notice was about meanwhile, which the read may predate, so the repair leaves
    /// them as the notices left them. A resync takes it (`None` again): the repair's read may
    /// predate the resync's, and is read again.
    noticed: Option<std::collections::HashSet<String>>,
}

/// Numbers the repairs of snapshots ([`AppHub::know_members_but_others`]).
static REPAIR_TICKETS: AtomicU64 = AtomicU64::new(1);

/// What [`AppHub::begin_repair`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Repair {
    /// The subscriber is marked: read the other nodes' members, then
    /// [`AppHub::finish_repair`].
    Begun,
    /// Not now: the subscriber is joining again, or a resync is under way.
    NotYet,
    /// The subscriber has left the channel, or has a newer snapshot.
    Gone,
}

/// Held while a resync of an app's presence subscribers runs ([`AppHub::resyncing`]).
pub struct ResyncGuard(Arc<AppHub>);

impl Drop for ResyncGuard {
    fn drop(&mut self) {
        self.0.resyncing.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What [`AppHub::finish_repair`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Repaired {
    /// The subscriber was told this many member changes.
    Told(usize),
    /// A resync passed meanwhile (its read may be newer), or the subscriber is joining
    /// again: nothing was applied; read again.
    Superseded,
    /// The subscriber has left the channel, or has a newer snapshot.
    Gone,
}

/// What is held for a joining subscriber.
/// What a joining subscriber gets first: `prefix` (its confirmation), then the replay.
/// Queues `prefix`, then the replay, leaving out what the subscriber itself published (its
/// `except`, which the store keeps with each event).
fn queue_first(
    outbox: &Outbox,
    socket_id: &str,
    prefix: &impl Fn(&Outbox),
    replay: &mut Vec<Arc<Publication>>,
) {
    prefix(outbox);
    for publication in std::mem::take(replay) {
        if publication.except.as_deref() != Some(socket_id) {
            outbox.send(Outgoing::Publication(publication));
        }
    }
}

/// How many times [`AppHub::go_live_in_order`] reads offsets missing between a replay and
/// the publications held, before it goes live without them.
pub const MAX_GAP_READS: usize = 4;

/// What [`AppHub::go_live_unless_gap`] did.
enum GoLive {
    Live,
    Gone,
    /// Nothing: the held publications skip offsets from `newest + 1` to `before - 1`.
    Gap {
        before: u64,
    },
}

/// The first offset held after a gap above `newest`, if the publications held skip one.
fn first_gap(held: &Mutex<Vec<Held>>, newest: u64) -> Option<u64> {
    let held = held.lock().unwrap_or_else(|p| p.into_inner());
    let mut offsets: Vec<u64> = held
        .iter()
        .filter_map(Held::offset)
        .filter(|&offset| offset > newest)
        .collect();
    offsets.sort_unstable();
    offsets.dedup();
    let mut next = newest + 1;
    for offset in offsets {
        if offset > next {
            return Some(offset);
        }
        next = offset + 1;
    }
    None
}

enum Held {
    Item(Outgoing),
    /// A publication at this offset that this subscriber must not get (its own).
    PassedOver(u64),
    /// A member notice from the cluster, filtered against the snapshot when it goes live.
    Member {
        user_id: String,
        added: bool,
        frame: Frame,
    },
}

impl Held {
    /// The channel offset this stands at, if it is a publication of a history channel.
    fn offset(&self) -> Option<u64> {
        match self {
            Held::Item(Outgoing::Publication(p)) => p.offset(),
            Held::PassedOver(offset) => Some(*offset),
            _ => None,
        }
    }
}

/// What was held for a joining subscriber, its publications put in offset order. Over a bus,
/// two nodes' publications of one channel may be heard out of order; sent as heard, the
/// higher offset would move the subscriber's duplicate filter past the lower, which would
/// then be dropped, though it is no gap (see [`first_gap`]). Each publication takes one of
/// the places publications held, so what has no offset (member notices, frames) keeps its
/// place among them.
fn in_offset_order(held: Vec<Held>) -> Vec<Held> {
    let places: Vec<usize> = (0..held.len())
        .filter(|&i| held[i].offset().is_some())
        .collect();
    let mut sorted = places.clone();
    // Stable: a publication and its passed-over twin keep their order.
    sorted.sort_by_key(|&i| held[i].offset());
    if sorted == places {
        return held;
    }
    let mut items: Vec<Option<Held>> = held.into_iter().map(Some).collect();
    let mut publications = sorted.into_iter();
    let mut next_place = places.iter().peekable();
    let mut ordered = Vec::with_capacity(items.len());
    for i in 0..items.len() {
        let from = if next_place.next_if(|&&place| place == i).is_some() {
            publications.next().unwrap_or(i)
        } else {
            i
        };
        ordered.extend(items[from].take());
    }
    ordered
}

impl Subscriber {
    /// A cluster member notice: held while joining; then sent only if it changes what this
    /// subscriber knows (see `members`).
    fn member(&self, user_id: &str, added: bool, frame: &Frame) {
        if let Some(held) = &self.joining {
            let mut held = held.lock().unwrap_or_else(|p| p.into_inner());
            if held.len() >= self.outbox.capacity() {
                self.outbox.overflow();
            } else {
                held.push(Held::Member {
                    user_id: user_id.to_owned(),
                    added,
                    frame: frame.clone(),
                });
            }
            return;
        }
        if let Some(told) = &self.members {
            let mut told = told.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(noticed) = &mut told.noticed {
                noticed.insert(user_id.to_owned());
            }
            let changed = if added {
                told.ids.insert(user_id.to_owned())
            } else {
                told.ids.remove(user_id)
            };
            if !changed {
                return;
            }
        }
        self.outbox.send(frame.clone());
    }

    /// A publication this subscriber must not get (its own): its offset still counts as seen,
    /// so a catch-up from this node's subscribers' offsets ([`AppHub::catch_up_from`]) starts
    /// past it.
    fn pass_over(&self, offset: Option<u64>) {
        let Some(offset) = offset else { return };
        match &self.joining {
            None => {
                self.next_offset.fetch_max(offset + 1, Ordering::Relaxed);
            }
            // Noted among what is held, so that going live counts it as seen, and its offset
            // is no gap to fill from the store.
            Some(held) => {
                let mut held = held.lock().unwrap_or_else(|p| p.into_inner());
                if held.len() >= self.outbox.capacity() {
                    self.outbox.overflow();
                } else {
                    held.push(Held::PassedOver(offset));
                }
            }
        }
    }

    fn send(&self, item: &Outgoing, offset: Option<u64>) {
        let Some(held) = &self.joining else {
            if let Some(offset) = offset
                && self.next_offset.fetch_max(offset + 1, Ordering::Relaxed) > offset
            {
                return;
            }
            self.outbox.send_shared(item);
            return;
        };
        let mut held = held.lock().unwrap_or_else(|p| p.into_inner());
        // As bounded as the outbox it will go to; held whole, so the merge can read offsets.
        if held.len() >= self.outbox.capacity() {
            self.outbox.overflow();
        } else {
            held.push(Held::Item(item.clone()));
        }
    }
}

struct Member {
    info: Option<Box<RawValue>>,
    sockets: u32,
}

/// A presence member joining: its user id and `user_info` as the app server wrote it.
pub struct Joining {
    pub user_id: String,
    pub info: Option<Box<RawValue>>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum SubscribeError {
    PresenceFull(usize),
}

#[derive(Debug, Default)]
pub struct Subscribed {
    /// First subscriber: the channel just became occupied.
    pub occupied: bool,
    /// Presence: the `{"presence": {...}}` snapshot for `subscription_succeeded`.
    pub presence: Option<serde_json::Value>,
    /// Presence: this user was not in the channel before; the hub has announced it
    /// (`member_added` to the other subscribers, under the channel lock). Always false when
    /// the hub shares presence with a cluster, which announces members itself.
    pub member_added: bool,
}

#[derive(Debug, Default)]
pub struct Unsubscribed {
    /// The last subscriber left: the channel is vacated.
    pub vacated: bool,
    /// Presence: the user's last socket left; the hub has announced it (`member_removed` to
    /// the remaining subscribers, under the channel lock). Never set when the hub shares
    /// presence with a cluster, which announces members itself.
    pub member_removed: Option<String>,
}

/// What the HTTP API reports about a channel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChannelInfo {
    pub subscription_count: usize,
    /// Presence channels only.
    pub user_count: Option<usize>,
}

impl AppHub {
    fn new(
        app_id: AppId,
        observer: Option<Arc<dyn ChannelObserver>>,
        metrics: Arc<ChannelMetrics>,
    ) -> Self {
        Self {
            app_id,
            observer,
            metrics,
            connections: AtomicU32::default(),
            channels: RwLock::default(),
            users: RwLock::default(),
            removed: CancellationToken::default(),
            sync: SharedSync::default(),
            shared_app: Mutex::default(),
            resyncing: AtomicU32::new(0),
        }
    }

    /// The app's record for a new connection to keep: the copy this hub's connections already
    /// share when it is the same record, so 10,000 connections hold one app (its credentials,
    /// history rules, metadata: about 600 bytes with its strings) instead of 10,000. A record
    /// that differs (the app was changed since) replaces the shared one for the connections
    /// that come next; older connections keep the one they had, as they did with their own.
    pub fn share_app(&self, app: App) -> Arc<App> {
        let mut shared = self.shared_app.lock().unwrap_or_else(|p| p.into_inner());
        match &*shared {
            Some(current) if **current == app => Arc::clone(current),
            _ => {
                let app = Arc::new(app);
                *shared = Some(Arc::clone(&app));
                app
            }
        }
    }

    /// The members other nodes hold in `channel`, if this node shares presence with a cluster
    /// (`None`: this node's are all there are).
    pub fn members_elsewhere(&self, channel: &str) -> Option<MembersFuture> {
        self.sync
            .get()
            .map(|sync| sync.members_elsewhere(&self.app_id, channel))
    }
    /// Counts a new connection over `transport` unless the app is at `limit`.
    pub fn connect(&self, limit: u32, transport: Transport) -> bool {
        let admitted = self
            .connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .is_ok();
        if admitted {
            self.metrics.connection(transport, true);
        }
        admitted
    }

    /// A connection over `transport` that [`AppHub::connect`] admitted has closed.
    pub fn disconnect(&self, transport: Transport) {
        self.connections.fetch_sub(1, Ordering::AcqRel);
        self.metrics.connection(transport, false);
    }

    pub fn connection_count(&self) -> u32 {
        self.connections.load(Ordering::Acquire)
    }

    /// A new connection's termination token: the connection closes when it is cancelled,
    /// by [`AppHub::terminate_user`] for its user (4009) or by [`Hub::remove_app`] for the
    /// whole app (4001, see [`AppHub::is_removed`]).
    pub fn connection_token(&self) -> CancellationToken {
        self.removed.child_token()
    }

    /// The app was deleted: connections must close with 4001 and new ones are refused.
    pub fn is_removed(&self) -> bool {
        self.removed.is_cancelled()
    }

    /// Resolves when the app is deleted (for streams that hold no connection token).
    pub fn removed(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.removed.cancelled()
    }

    /// Adds a live subscriber: broadcasts reach its outbox from now on.
    pub fn subscribe(
        &self,
        channel: &str,
        socket_id: &str,
        outbox: &Outbox,
        joining: Option<Joining>,
        max_members: usize,
    ) -> Result<Subscribed, SubscribeError> {
        self.add_subscriber(channel, socket_id, outbox, joining, max_members, false)
    }

    /// Adds a subscriber that is still joining a history channel: broadcasts are held for it
    /// until [`AppHub::go_live`], so what it missed can be read from the store meanwhile and
    /// merged by offset (subscribe, hold, read, merge: no lock spans the read).
    pub fn subscribe_joining(
        &self,
        channel: &str,
        socket_id: &str,
        outbox: &Outbox,
        joining: Option<Joining>,
        max_members: usize,
    ) -> Result<Subscribed, SubscribeError> {
        self.add_subscriber(channel, socket_id, outbox, joining, max_members, true)
    }

    /// Ends a joining subscriber's wait: `first` queues what must come first (the
    /// confirmation and the replay up to `newest`, the offset the replay was read up to), then
    /// what was held for it, without publications at or below `newest` (the replay has them,
    /// or the subscriber did not ask for them), and from then on broadcasts reach its outbox.
    /// All under the channel lock, so no broadcast slips between. Returns false (and calls
    /// nothing) if the subscriber is gone.
    pub fn go_live(
        &self,
        channel: &str,
        socket_id: &str,
        newest: u64,
        first: impl FnOnce(&Outbox),
    ) -> bool {
        matches!(
            self.go_live_unless_gap(channel, socket_id, newest, false, first),
            GoLive::Live
        )
    }

    /// [`AppHub::go_live`] for a history channel, where the publications held for the
    /// subscriber must follow `newest` without a gap: publications of one channel committed on
    /// different nodes may come over the bus in either order, and a subscriber still joining
    /// has no offset for [`AppHub::catch_up_from`] to fill from. Then `replay` (read up to
    /// `newest`) is queued after `prefix`, and what was held after it. If the held
    /// publications skip an offset, the offsets missing are read with `read(after, before)`
    /// (both exclusive; committed, since a later one was), added to the replay, and it tries
    /// again. After [`MAX_GAP_READS`] reads that leave a gap (its events trimmed meanwhile),
    /// it goes live anyway, and logs it. Returns false if the subscriber is gone.
    pub async fn go_live_in_order<E, Read>(
        &self,
        channel: &str,
        socket_id: &str,
        mut newest: u64,
        prefix: impl Fn(&Outbox),
        mut replay: Vec<Arc<Publication>>,
        mut read: impl FnMut(u64, u64) -> Read,
    ) -> Result<bool, E>
    where
        Read: std::future::Future<Output = Result<Vec<Arc<Publication>>, E>>,
    {
        for attempt in 0..=MAX_GAP_READS {
            let first = |outbox: &Outbox| queue_first(outbox, socket_id, &prefix, &mut replay);
            let before = match self.go_live_unless_gap(channel, socket_id, newest, true, first) {
                GoLive::Live => return Ok(true),
                GoLive::Gone => return Ok(false),
                GoLive::Gap { before } => before,
            };
            if attempt == MAX_GAP_READS {
                tracing::warn!(
                    channel,
                    after = newest,
                    before,
                    "the publications held for a joining subscriber still skip offsets after {MAX_GAP_READS} reads; it goes live without them"
                );
                let first = |outbox: &Outbox| queue_first(outbox, socket_id, &prefix, &mut replay);
                let live = self.go_live_unless_gap(channel, socket_id, newest, false, first);
                return Ok(matches!(live, GoLive::Live));
            }
            let found = read(newest, before).await?;
            if found.first().and_then(|p| p.offset()) != Some(newest + 1) {
                tracing::warn!(
                    channel,
                    after = newest,
                    before,
                    "offsets a joining subscriber missed are no longer kept; it goes live without them"
                );
            }
            // What was found is kept, in order, whether or not it starts the gap.
            match found.last().and_then(|p| p.offset()) {
                Some(last) => {
                    newest = last;
                    replay.extend(found);
                }
                None => newest = before - 1,
            }
        }
        Ok(false)
    }

    fn go_live_unless_gap(
        &self,
        channel: &str,
        socket_id: &str,
        newest: u64,
        check_gaps: bool,
        first: impl FnOnce(&Outbox),
    ) -> GoLive {
        let mut channels = write(&self.channels);
        let Some(subscriber) = channels
            .get_mut(channel)
            .and_then(|c| c.subscribers.get_mut(socket_id))
        else {
            return GoLive::Gone;
        };
        if check_gaps
            && let Some(held) = &subscriber.joining
            && let Some(before) = first_gap(held, newest)
        {
            return GoLive::Gap { before };
        }
        first(&subscriber.outbox);
        subscriber
            .next_offset
            .fetch_max(newest + 1, Ordering::Relaxed);
        if let Some(held) = subscriber.joining.take() {
            let held = in_offset_order(held.into_inner().unwrap_or_else(|p| p.into_inner()));
            for item in held {
                match item {
                    Held::PassedOver(offset) => subscriber.pass_over(Some(offset)),
                    Held::Item(item) => {
                        let offset = match &item {
                            Outgoing::Publication(p) => p.offset(),
                            Outgoing::Frame(_) => None,
                        };
                        subscriber.send(&item, offset);
                    }
                    Held::Member {
                        user_id,
                        added,
                        frame,
                    } => subscriber.member(&user_id, added, &frame),
                }
            }
        }
        GoLive::Live
    }

    /// A presence subscriber subscribes again (a client that lost track of its subscription):
    /// what is sent to it is held from now on, as for a new join, and the channel's members
    /// here are returned as a fresh snapshot, for the confirmation [`AppHub::go_live`] then
    /// queues ahead of what was held. Membership is unchanged: the member is already counted
    /// and announced. `None` (and nothing held) if `socket_id` is not a member of `channel`.
    pub fn rejoin(&self, channel: &str, socket_id: &str) -> Option<serde_json::Value> {
        let mut channels = write(&self.channels);
        let entry = channels.get_mut(channel)?;
        let subscriber = entry.subscribers.get_mut(socket_id)?;
        subscriber.user_id.as_ref()?;
        if subscriber.joining.is_none() {
            subscriber.joining = Some(Box::default());
        }
        Some(presence_snapshot(&entry.members))
    }

    /// Presence shared across nodes: the members a joining subscriber's snapshot lists (call
    /// it before [`AppHub::go_live`]); member notices are then sent to it only where they
    /// change that list.
    pub fn know_members(&self, channel: &str, socket_id: &str, ids: Vec<String>) {
        self.told(channel, socket_id, ids, None);
    }

    /// [`AppHub::know_members`] for a snapshot that lacks the other nodes' members (reading
    /// them failed): returns the ticket of its repair ([`AppHub::begin_repair`]), `None` if
    /// the subscriber has left.
    pub fn know_members_but_others(
        &self,
        channel: &str,
        socket_id: &str,
        ids: Vec<String>,
    ) -> Option<u64> {
        let ticket = REPAIR_TICKETS.fetch_add(1, Ordering::Relaxed);
        self.told(channel, socket_id, ids, Some(ticket))
            .then_some(ticket)
    }

    fn told(&self, channel: &str, socket_id: &str, ids: Vec<String>, repair: Option<u64>) -> bool {
        let mut channels = write(&self.channels);
        let Some(subscriber) = channels
            .get_mut(channel)
            .and_then(|c| c.subscribers.get_mut(socket_id))
        else {
            return false;
        };
        subscriber.members = Some(Box::new(Mutex::new(Told {
            ids: ids.into_iter().collect(),
            repair,
            noticed: None,
        })));
        true
    }

    /// The repair `ticket` of a subscriber's snapshot (see
    /// [`AppHub::know_members_but_others`]) begins a read of the other nodes' members: from
    /// now on the member notices it is sent are noted, until [`AppHub::finish_repair`] applies
    /// a read made after this call. `Gone` once the subscriber has left or has a newer
    /// snapshot.
    pub fn begin_repair(&self, channel: &str, socket_id: &str, ticket: u64) -> Repair {
        let channels = read(&self.channels);
        let Some(subscriber) = channels
            .get(channel)
            .and_then(|c| c.subscribers.get(socket_id))
        else {
            return Repair::Gone;
        };
        let Some(told) = &subscriber.members else {
            return Repair::Gone;
        };
        let mut told = told.lock().unwrap_or_else(|p| p.into_inner());
        if told.repair != Some(ticket) {
            return Repair::Gone;
        }
        // Still joining (subscribing again), or a resync is bringing it up to date: the
        // read could cross either.
        if subscriber.joining.is_some() || self.resyncing.load(Ordering::Acquire) > 0 {
            return Repair::NotYet;
        }
        told.noticed = Some(Default::default());
        Repair::Begun
    }

    /// Ends a repair [`AppHub::begin_repair`] began: the subscriber is brought to this node's
    /// members and `elsewhere` (the other nodes', read since), as a resync would, except for
    /// the members a notice was about meanwhile, which stay as the notices left them.
    pub fn finish_repair(
        &self,
        channel: &str,
        socket_id: &str,
        ticket: u64,
        elsewhere: &[RemoteMember],
    ) -> Repaired {
        let channels = read(&self.channels);
        let Some(entry) = channels.get(channel) else {
            return Repaired::Gone;
        };
        let Some(told) = entry
            .subscribers
            .get(socket_id)
            .and_then(|s| Some((s, s.members.as_ref()?)))
        else {
            return Repaired::Gone;
        };
        let (subscriber, told) = told;
        let mut told = told.lock().unwrap_or_else(|p| p.into_inner());
        if told.repair != Some(ticket) {
            return Repaired::Gone;
        }
        let noticed = told.noticed.take();
        let Some(noticed) = noticed.filter(|_| {
            subscriber.joining.is_none() && self.resyncing.load(Ordering::Acquire) == 0
        }) else {
            return Repaired::Superseded;
        };
        told.repair = None;
        let now = members_now(entry, elsewhere);
        Repaired::Told(bring_up_to_date(
            &mut told.ids,
            &subscriber.outbox,
            channel,
            &now,
            |id| noticed.contains(id),
        ))
    }

    /// Ends a read of a repair that failed, noting nothing more (begin it again to retry).
    pub fn abandon_repair(&self, channel: &str, socket_id: &str, ticket: u64) {
        let channels = read(&self.channels);
        if let Some(told) = channels
            .get(channel)
            .and_then(|c| c.subscribers.get(socket_id))
            .and_then(|s| s.members.as_ref())
        {
            let mut told = told.lock().unwrap_or_else(|p| p.into_inner());
            if told.repair == Some(ticket) {
                told.noticed = None;
            }
        }
    }

    /// Marks a resync of this app's presence subscribers under way until the guard drops: no
    /// repair of a snapshot begins or is applied meanwhile, since the resync applies reads
    /// made at its start, which a repair's could be newer than.
    pub fn resyncing(self: &Arc<Self>) -> ResyncGuard {
        self.resyncing.fetch_add(1, Ordering::AcqRel);
        ResyncGuard(Arc::clone(self))
    }

    /// A member notice from the cluster (`member_added` / `member_removed`): to every
    /// subscriber of `channel` but `except` whose view it changes (see `know_members`).
    pub fn member_notice(
        &self,
        channel: &str,
        user_id: &str,
        added: bool,
        frame: &Frame,
        except: Option<&str>,
    ) {
        let channels = read(&self.channels);
        if let Some(entry) = channels.get(channel) {
            for (socket_id, subscriber) in &entry.subscribers {
                if Some(socket_id.as_str()) != except {
                    subscriber.member(user_id, added, frame);
                }
            }
        }
    }

    /// The departures half of [`AppHub::resync_members`], which needs no `user_info`: each
    /// live subscriber of `channel` is told `member_removed` for each member it was told of
    /// that neither this node nor `elsewhere` (the other nodes' member ids) holds. A resync
    /// sends these for every channel first, so a resync cut short still removes who left.
    pub fn resync_departures(&self, channel: &str, elsewhere: &[String]) -> usize {
        let channels = read(&self.channels);
        let Some(entry) = channels.get(channel) else {
            return 0;
        };
        let present =
            |id: &str| entry.members.contains_key(id) || elsewhere.iter().any(|e| e == id);
        let mut sent = 0;
        for subscriber in entry.subscribers.values() {
            let (None, Some(known)) = (&subscriber.joining, &subscriber.members) else {
                continue;
            };
            let mut known = known.lock().unwrap_or_else(|p| p.into_inner());
            // A repair's read may predate what this tells: it reads again.
            known.noticed = None;
            sent += tell_departures(&mut known.ids, &subscriber.outbox, channel, present);
        }
        sent
    }

    /// Of `ids` (members other nodes hold in `channel`), those that some live subscriber here
    /// was not told of: what a resync must announce, so only their `user_info` is read.
    pub fn members_untold(&self, channel: &str, ids: &[String]) -> Vec<String> {
        let channels = read(&self.channels);
        let Some(entry) = channels.get(channel) else {
            return Vec::new();
        };
        let told: Vec<_> = entry
            .subscribers
            .values()
            .filter(|s| s.joining.is_none())
            .filter_map(|s| s.members.as_ref())
            .map(|known| known.lock().unwrap_or_else(|p| p.into_inner()))
            .collect();
        ids.iter()
            .filter(|id| told.iter().any(|known| !known.ids.contains(*id)))
            .cloned()
            .collect()
    }

    /// Presence shared across nodes, once member notices may have been missed (this node's
    /// link to the others was lost and is back): brings what each live subscriber of
    /// `channel` here was told to the cluster's members now, this node's own and `elsewhere`
    /// (the other nodes', read after the link came back). A subscriber gets `member_added` for
    /// each member it was not told of and `member_removed` for each it was told of that is
    /// gone; notices heard after that read apply on top as usual. Subscribers still joining are
    /// left alone (their snapshot is being read). Returns how many notices were sent.
    pub fn resync_members(&self, channel: &str, elsewhere: &[RemoteMember]) -> usize {
        let channels = read(&self.channels);
        let Some(entry) = channels.get(channel) else {
            return 0;
        };
        let now = members_now(entry, elsewhere);
        let mut sent = 0;
        for subscriber in entry.subscribers.values() {
            let (None, Some(known)) = (&subscriber.joining, &subscriber.members) else {
                continue;
            };
            let mut known = known.lock().unwrap_or_else(|p| p.into_inner());
            // A repair's read may predate this one: it reads again.
            known.noticed = None;
            sent += bring_up_to_date(&mut known.ids, &subscriber.outbox, channel, &now, |_| false);
        }
        sent
    }

    /// The app's id.
    pub fn app_id(&self) -> &AppId {
        &self.app_id
    }

    /// Where a catch-up of `channel` must start for this node's subscribers to miss nothing:
    /// the oldest newest-offset among those that have one. A new subscriber has none until it
    /// goes live (it reads the store itself); one that subscribes again ([`AppHub::rejoin`])
    /// keeps its own and is counted while its frames are held. `None` if none has an offset.
    pub fn catch_up_from(&self, channel: &str) -> Option<u64> {
        read(&self.channels).get(channel).and_then(|c| {
            c.subscribers
                .values()
                .map(|s| s.next_offset.load(Ordering::Relaxed))
                .filter(|&next| next > 0)
                .min()
                .map(|next| next - 1)
        })
    }

    fn add_subscriber(
        &self,
        channel: &str,
        socket_id: &str,
        outbox: &Outbox,
        joining: Option<Joining>,
        max_members: usize,
        held: bool,
    ) -> Result<Subscribed, SubscribeError> {
        let mut channels = write(&self.channels);
        let entry = channels.entry(channel.to_owned()).or_default();
        let mut outcome = Subscribed {
            occupied: entry.subscribers.is_empty(),
            ..Subscribed::default()
        };
        let user_id = joining.as_ref().map(|j| j.user_id.clone());
        // A new member's info, for the cluster's record or the local announcement.
        let mut added_info = None;
        if let Some(joining) = joining {
            let already = entry.members.contains_key(&joining.user_id);
            if !already && entry.members.len() >= max_members {
                if entry.subscribers.is_empty() {
                    channels.remove(channel);
                }
                return Err(SubscribeError::PresenceFull(max_members));
            }
            if !already {
                added_info = joining.info.as_ref().map(|i| i.get().to_owned());
            }
            let member = entry.members.entry(joining.user_id).or_insert(Member {
                info: joining.info,
                sockets: 0,
            });
            member.sockets += 1;
            outcome.member_added = !already;
            outcome.presence = Some(presence_snapshot(&entry.members));
        }
        if let Some(sync) = self.sync.get() {
            if outcome.occupied {
                sync.changed(
                    &self.app_id,
                    LocalChange::Occupied {
                        channel: channel.to_owned(),
                    },
                );
            }
            if outcome.member_added
                && let Some(user_id) = &user_id
            {
                sync.changed(
                    &self.app_id,
                    LocalChange::Joined {
                        channel: channel.to_owned(),
                        user_id: user_id.clone(),
                        info: added_info.clone(),
                        socket_id: socket_id.to_owned(),
                    },
                );
            }
            outcome.member_added = false;
        } else {
            if outcome.occupied {
                self.report(ChannelEvent::Occupied {
                    channel: channel.to_owned(),
                });
            }
            if outcome.member_added
                && let Some(user_id) = &user_id
            {
                self.report(ChannelEvent::MemberAdded {
                    channel: channel.to_owned(),
                    user_id: user_id.clone(),
                });
                // Announced to the others here, under the channel lock, so that no removal of
                // the same user (its other connection leaving) can be announced after it.
                let frame = crate::protocol::member_added(channel, user_id, added_info.as_deref());
                fan_out(entry, &Outgoing::Frame(frame), Some(socket_id), None);
            }
        }
        outbox.count_overflows_in(&self.metrics.outbox_overflows_total);
        let replaced = entry.subscribers.insert(
            socket_id.to_owned(),
            Subscriber {
                outbox: outbox.clone(),
                user_id,
                joining: held.then(Box::default),
                members: None,
                next_offset: AtomicU64::new(0),
            },
        );
        if replaced.is_none() {
            self.metrics.subscription(outbox.transport, true);
        }
        Ok(outcome)
    }

    pub fn unsubscribe(&self, channel: &str, socket_id: &str) -> Unsubscribed {
        let mut channels = write(&self.channels);
        let Some(entry) = channels.get_mut(channel) else {
            return Unsubscribed::default();
        };
        let Some(subscriber) = entry.subscribers.remove(socket_id) else {
            return Unsubscribed::default();
        };
        self.metrics
            .subscription(subscriber.outbox.transport, false);
        let mut outcome = Unsubscribed::default();
        if let Some(user_id) = subscriber.user_id
            && let Some(member) = entry.members.get_mut(&user_id)
        {
            member.sockets -= 1;
            if member.sockets == 0 {
                entry.members.remove(&user_id);
                if let Some(sync) = self.sync.get() {
                    sync.changed(
                        &self.app_id,
                        LocalChange::Left {
                            channel: channel.to_owned(),
                            user_id,
                        },
                    );
                } else {
                    self.report(ChannelEvent::MemberRemoved {
                        channel: channel.to_owned(),
                        user_id: user_id.clone(),
                    });
                    // Under the channel lock, as the addition is (see `add_subscriber`).
                    let frame = crate::protocol::member_removed(channel, &user_id);
                    fan_out(entry, &Outgoing::Frame(frame), None, None);
                    outcome.member_removed = Some(user_id);
                }
            }
        }
        if entry.subscribers.is_empty() {
            channels.remove(channel);
            match self.sync.get() {
                Some(sync) => sync.changed(
                    &self.app_id,
                    LocalChange::Vacated {
                        channel: channel.to_owned(),
                    },
                ),
                None => self.report(ChannelEvent::Vacated {
                    channel: channel.to_owned(),
                }),
            }
            outcome.vacated = true;
        }
        outcome
    }

    /// Reports a client event for channel webhooks, if the channel has subscribers (the
    /// event is only built then).
    pub fn report_client_event(&self, channel: &str, event: impl FnOnce() -> ChannelEvent) {
        if read(&self.channels).contains_key(channel) {
            self.report(event());
        }
    }

    fn report(&self, event: ChannelEvent) {
        if let Some(observer) = &self.observer {
            observer.observe(&self.app_id, event);
        }
    }

    /// Hands a publication to every subscriber of its channel but its `except`; returns how
    /// many. Only the broker calls this (see `publisher`).
    pub fn broadcast(&self, publication: &Arc<Publication>) -> usize {
        let channels = read(&self.channels);
        channels.get(&publication.channel).map_or(0, |entry| {
            fan_out(
                entry,
                &Outgoing::Publication(Arc::clone(publication)),
                publication.except.as_deref(),
                publication.offset(),
            )
        })
    }

    /// Sends a frame that is not a publication (presence notices) to every subscriber of
    /// `channel` but `except`; returns how many.
    pub fn notify(&self, channel: &str, frame: &Frame, except: Option<&str>) -> usize {
        let channels = read(&self.channels);
        channels.get(channel).map_or(0, |entry| {
            fan_out(entry, &Outgoing::Frame(frame.clone()), except, None)
        })
    }

    pub fn is_subscribed(&self, channel: &str, socket_id: &str) -> bool {
        read(&self.channels)
            .get(channel)
            .is_some_and(|c| c.subscribers.contains_key(socket_id))
    }

    pub fn channel_info(&self, channel: &str) -> Option<ChannelInfo> {
        read(&self.channels).get(channel).map(info)
    }

    /// Occupied channels whose names start with `prefix`.
    pub fn channels(&self, prefix: &str) -> Vec<(String, ChannelInfo)> {
        let mut list: Vec<_> = read(&self.channels)
            .iter()
            .filter(|(name, _)| name.starts_with(prefix))
            .map(|(name, c)| (name.clone(), info(c)))
            .collect();
        list.sort_by(|a, b| a.0.cmp(&b.0));
        list
    }

    /// User ids in a presence channel.
    pub fn users(&self, channel: &str) -> Vec<String> {
        read(&self.channels)
            .get(channel)
            .map(|c| c.members.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// A presence channel's members with their `user_info` as JSON text.
    pub fn members(&self, channel: &str) -> Vec<(String, Option<String>)> {
        read(&self.channels)
            .get(channel)
            .map(|c| {
                c.members
                    .iter()
                    .map(|(id, m)| (id.clone(), m.info.as_ref().map(|i| i.get().to_owned())))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Registers a signed-in connection; `terminate` is cancelled to close it. A connection
    /// that signs in again as the same user keeps its first sign-in time: a termination
    /// between the two still applies to it.
    pub fn sign_in(&self, user_id: &str, socket_id: &str, terminate: CancellationToken) {
        write(&self.users)
            .entry(user_id.to_owned())
            .or_default()
            .entry(socket_id.to_owned())
            .and_modify(|(token, _)| *token = terminate.clone())
            .or_insert_with(|| (terminate, Instant::now()));
    }

    pub fn sign_out(&self, user_id: &str, socket_id: &str) {
        let mut users = write(&self.users);
        if let Some(sockets) = users.get_mut(user_id) {
            sockets.remove(socket_id);
            if sockets.is_empty() {
                users.remove(user_id);
            }
        }
    }

    /// Closes every connection signed in as `user_id`; returns how many.
    pub fn terminate_user(&self, user_id: &str) -> usize {
        self.terminate_user_signed_in_before(user_id, None)
    }

    /// Closes the connections signed in as `user_id` before `before` (all of them with
    /// `None`); returns how many. A termination applied late (a node that did not hear it
    /// when it was sent) leaves the user's newer sign-ins alone.
    pub fn terminate_user_signed_in_before(&self, user_id: &str, before: Option<Instant>) -> usize {
        let users = read(&self.users);
        let Some(sockets) = users.get(user_id) else {
            return 0;
        };
        let mut closed = 0;
        for (token, signed_in) in sockets.values() {
            if before.is_none_or(|before| *signed_in < before) {
                token.cancel();
                closed += 1;
            }
        }
        closed
    }
}

/// Hands `item` to every subscriber but `except`; returns how many got it.
fn fan_out(channel: &Channel, item: &Outgoing, except: Option<&str>, offset: Option<u64>) -> usize {
    let mut sent = 0;
    for (socket_id, subscriber) in &channel.subscribers {
        if Some(socket_id.as_str()) == except {
            subscriber.pass_over(offset);
        } else {
            subscriber.send(item, offset);
            sent += 1;
        }
    }
    sent
}

fn info(channel: &Channel) -> ChannelInfo {
    let presence = !channel.members.is_empty();
    ChannelInfo {
        subscription_count: channel.subscribers.len(),
        user_count: presence.then_some(channel.members.len()),
    }
}

/// Tells a subscriber who knew `known` of `channel`'s members `member_removed` for each that
/// `present` says is gone, and forgets them; how many.
fn tell_departures(
    known: &mut std::collections::HashSet<String>,
    outbox: &Outbox,
    channel: &str,
    present: impl Fn(&str) -> bool,
) -> usize {
    let gone: Vec<String> = known.iter().filter(|id| !present(id)).cloned().collect();
    for id in &gone {
        known.remove(id);
        outbox.send(crate::protocol::member_removed(channel, id));
    }
    gone.len()
}

/// A presence channel's members across the cluster: this node's and `elsewhere` (the other
/// nodes'), each with its `user_info` as JSON text (this node's where both have it).
fn members_now<'a>(
    entry: &'a Channel,
    elsewhere: &'a [RemoteMember],
) -> BTreeMap<&'a str, Option<&'a str>> {
    let mut now: BTreeMap<&str, Option<&str>> = entry
        .members
        .iter()
        .map(|(id, m)| (id.as_str(), m.info.as_deref().map(RawValue::get)))
        .collect();
    for (id, info) in elsewhere {
        now.entry(id.as_str()).or_insert(info.as_deref());
    }
    now
}

/// Tells a subscriber who knew `known` of `channel`'s members what differs from `now`:
/// `member_removed` for each it knew that is gone, `member_added` for each it lacks; members
/// for which `settled` is true are left as they are. Returns how many notices it sent.
fn bring_up_to_date(
    known: &mut std::collections::HashSet<String>,
    outbox: &Outbox,
    channel: &str,
    now: &BTreeMap<&str, Option<&str>>,
    settled: impl Fn(&str) -> bool,
) -> usize {
    let mut sent = tell_departures(known, outbox, channel, |id| {
        now.contains_key(id) || settled(id)
    });
    for (id, info) in now {
        if !settled(id) && known.insert((*id).to_owned()) {
            outbox.send(crate::protocol::member_added(channel, id, *info));
            sent += 1;
        }
    }
    sent
}

fn presence_snapshot(members: &BTreeMap<String, Member>) -> serde_json::Value {
    let ids: Vec<&String> = members.keys().collect();
    let hash: serde_json::Map<String, serde_json::Value> = members
        .iter()
        .map(|(id, m)| {
            let info = m
                .info
                .as_ref()
                .and_then(|raw| serde_json::from_str(raw.get()).ok())
                .unwrap_or(serde_json::Value::Null);
            (id.clone(), info)
        })
        .collect();
    serde_json::json!({"presence": {"ids": ids, "hash": hash, "count": members.len()}})
}

// The hub's locks guard plain maps whose updates cannot panic halfway; recover from poisoning.
fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app_hub() -> AppHub {
        AppHub::new(AppId::parse("app_1").expect("valid"), None, Arc::default())
    }

    fn joining(user: &str) -> Option<Joining> {
        Some(Joining {
            user_id: user.into(),
            info: RawValue::from_string(format!(r#"{{"name":"{user}"}}"#)).ok(),
        })
    }

    #[test]
    fn presence_members_are_counted_per_user() {
        let hub = app_hub();
        let (a, _ra, _) = Outbox::new(8);
        let (b, _rb, _) = Outbox::new(8);
        let first = hub
            .subscribe("presence-room", "1.1", &a, joining("u1"), 10)
            .expect("ok");
        assert!(first.occupied && first.member_added);
        let second = hub
            .subscribe("presence-room", "2.2", &b, joining("u1"), 10)
            .expect("ok");
        assert!(
            !second.occupied && !second.member_added,
            "same user twice is one member"
        );
        assert_eq!(second.presence.expect("snapshot")["presence"]["count"], 1);
        assert_eq!(hub.unsubscribe("presence-room", "1.1").member_removed, None);
        let last = hub.unsubscribe("presence-room", "2.2");
        assert_eq!(last.member_removed.as_deref(), Some("u1"));
        assert!(last.vacated);
        assert_eq!(hub.channel_info("presence-room"), None);
    }

    /// A member subscribing again gets a fresh snapshot, and a notice decided after it was
    /// taken reaches the member after the confirmation, not before it (pusher-js would apply
    /// it, then overwrite it with the snapshot).
    #[test]
    fn a_member_subscribing_again_gets_a_snapshot_ahead_of_later_notices() {
        let hub = app_hub();
        let (a, mut rx, _) = Outbox::new(16);
        let (b, _rb, _) = Outbox::new(16);
        let (public, _rp, _) = Outbox::new(16);
        hub.subscribe("presence-room", "1.1", &a, joining("u1"), 10)
            .expect("ok");
        hub.subscribe("presence-room", "2.2", &b, joining("u2"), 10)
            .expect("ok");
        hub.subscribe("public", "1.1", &public, None, 10)
            .expect("ok");
        let _ = offsets(&mut rx);

        let snapshot = hub.rejoin("presence-room", "1.1").expect("a member");
        assert_eq!(snapshot["presence"]["ids"], serde_json::json!(["u1", "u2"]));
        assert_eq!(
            hub.unsubscribe("presence-room", "2.2")
                .member_removed
                .as_deref(),
            Some("u2")
        );
        assert!(
            offsets(&mut rx).is_empty(),
            "held until the confirmation is queued"
        );
        assert!(hub.go_live("presence-room", "1.1", 0, |o| {
            o.send(Frame::from_static("snapshot"))
        }));
        let frames = offsets(&mut rx);
        assert_eq!(frames.len(), 2, "{frames:?}");
        assert_eq!(frames[0], "snapshot");
        assert!(frames[1].contains("member_removed"), "{frames:?}");
        assert_eq!(
            hub.users("presence-room"),
            ["u1"],
            "membership unchanged by the rejoin"
        );

        assert_eq!(
            hub.rejoin("public", "1.1"),
            None,
            "not a presence subscription"
        );
        assert_eq!(hub.rejoin("presence-room", "9.9"), None, "not subscribed");
    }

    /// A history subscriber that subscribes again still counts for catch-ups while its frames
    /// are held: a catch-up (after a broker message out of order, or a lost link) must not
    /// start past what it has, or a later offset would go out first and the missing one be
    /// dropped as one it had.
    #[test]
    fn a_subscriber_subscribing_again_still_counts_for_catch_ups() {
        let hub = app_hub();
        let (outbox, _rx, _) = Outbox::new(16);
        hub.subscribe_joining("presence-history-c", "1.1", &outbox, joining("u1"), 10)
            .expect("ok");
        assert!(hub.go_live("presence-history-c", "1.1", 5, |_| {}));
        assert!(hub.rejoin("presence-history-c", "1.1").is_some());
        assert_eq!(hub.catch_up_from("presence-history-c"), Some(5));
    }

    #[test]
    fn presence_cap_refuses_new_users_only() {
        let hub = app_hub();
        let (o, _r, _) = Outbox::new(8);
        hub.subscribe("presence-x", "1.1", &o, joining("u1"), 1)
            .expect("first");
        assert_eq!(
            hub.subscribe("presence-x", "2.2", &o, joining("u2"), 1)
                .expect_err("full"),
            SubscribeError::PresenceFull(1)
        );
        hub.subscribe("presence-x", "3.3", &o, joining("u1"), 1)
            .expect("same user fits");
    }

    #[test]
    fn broadcast_skips_the_excluded_socket_and_flags_slow_consumers() {
        let hub = app_hub();
        let (fast, mut fast_rx, fast_over) = Outbox::new(8);
        let (slow, _slow_rx, slow_over) = Outbox::new(1);
        hub.subscribe("c", "1.1", &fast, None, 10).expect("ok");
        hub.subscribe("c", "2.2", &slow, None, 10).expect("ok");
        let frame = Frame::from_static("x");
        assert_eq!(hub.notify("c", &frame, Some("2.2")), 1);
        assert_eq!(hub.notify("c", &frame, None), 2);
        assert_eq!(hub.notify("c", &frame, None), 2);
        assert_eq!(
            fast_rx.try_recv().ok().map(|o| o.pusher_frame().clone()),
            Some(frame)
        );
        assert!(!fast_over.is_cancelled());
        assert!(
            slow_over.is_cancelled(),
            "second frame did not fit in the slow outbox"
        );
    }

    #[derive(Default)]
    struct Recorder(std::sync::Mutex<Vec<(String, ChannelEvent)>>);

    impl ChannelObserver for Recorder {
        fn observe(&self, app_id: &AppId, event: ChannelEvent) {
            self.0
                .lock()
                .expect("lock")
                .push((app_id.to_string(), event));
        }
    }

    #[test]
    fn channel_events_are_reported_in_order_once_per_change() {
        let recorder = Arc::new(Recorder::default());
        let hub = Hub::new(
            Arc::clone(&recorder) as Arc<dyn ChannelObserver>,
            Arc::default(),
        );
        let app = hub.app(&AppId::parse("app_1").expect("valid"));
        let (o, _r, _) = Outbox::new(8);
        app.subscribe("presence-x", "1.1", &o, joining("u1"), 10)
            .expect("ok");
        app.subscribe("presence-x", "2.2", &o, joining("u1"), 10)
            .expect("same user");
        app.report_client_event("presence-x", || ChannelEvent::ClientEvent {
            channel: "presence-x".into(),
            event: "client-a".into(),
            data: "{}".into(),
            socket_id: "1.1".into(),
            user_id: Some("u1".into()),
        });
        app.report_client_event("presence-empty", || unreachable!("nobody listens there"));
        app.unsubscribe("presence-x", "1.1");
        app.unsubscribe("presence-x", "2.2");
        let seen: Vec<&'static str> = recorder
            .0
            .lock()
            .expect("lock")
            .iter()
            .map(|(app_id, e)| {
                assert_eq!(app_id, "app_1");
                assert_eq!(e.channel(), "presence-x");
                e.name()
            })
            .collect();
        assert_eq!(
            seen,
            [
                "channel_occupied",
                "member_added",
                "client_event",
                "member_removed",
                "channel_vacated"
            ]
        );
        let json = serde_json::to_value(ChannelEvent::MemberAdded {
            channel: "presence-x".into(),
            user_id: "u1".into(),
        })
        .expect("serializes");
        assert_eq!(
            json,
            serde_json::json!({"name": "member_added", "channel": "presence-x", "user_id": "u1"})
        );
    }

    #[derive(Default)]
    struct Changes(std::sync::Mutex<Vec<LocalChange>>);

    impl PresenceSync for Changes {
        fn changed(&self, _: &AppId, change: LocalChange) {
            self.0.lock().expect("lock").push(change);
        }
        fn members_elsewhere(&self, _: &AppId, _: &str) -> MembersFuture {
            Box::pin(async { Ok(vec![("u9".to_owned(), None)]) })
        }
    }

    /// Another node's member notice can cross a subscriber's snapshot: one that the snapshot
    /// already reflects is not sent, one that changes the subscriber's view is, and a notice
    /// held while it joined is judged against the snapshot when it goes live.
    #[test]
    fn member_notices_that_a_snapshot_already_reflects_are_not_repeated() {
        let hub = app_hub();
        let (outbox, mut rx, _) = Outbox::new(16);
        hub.subscribe_joining("presence-x", "1.1", &outbox, joining("bob"), 10)
            .expect("subscribed");
        let added = |user: &str| Frame::from(format!("added {user}"));
        let removed = |user: &str| Frame::from(format!("removed {user}"));
        // Held while joining: alice's join (the snapshot lists her), carol's (it does not).
        hub.member_notice("presence-x", "alice", true, &added("alice"), None);
        hub.member_notice("presence-x", "carol", true, &added("carol"), None);
        hub.know_members("presence-x", "1.1", vec!["alice".into(), "bob".into()]);
        assert!(hub.go_live("presence-x", "1.1", 0, |o| {
            o.send(Frame::from_static("snapshot"))
        }));
        hub.member_notice("presence-x", "alice", true, &added("alice"), None);
        hub.member_notice("presence-x", "dave", false, &removed("dave"), None);
        hub.member_notice("presence-x", "alice", false, &removed("alice"), None);
        hub.member_notice("presence-x", "alice", false, &removed("alice"), None);
        hub.member_notice("presence-x", "erin", true, &added("erin"), Some("1.1"));
        assert_eq!(
            offsets(&mut rx),
            ["snapshot", "added carol", "removed alice"],
            "each change of this subscriber's view once"
        );
    }

    /// After a lost link, each live subscriber is brought to the cluster's members: told of
    /// those it missed, told of those gone, and nothing it knows already; a subscriber still
    /// joining is left to its snapshot.
    #[test]
    fn a_resync_tells_each_subscriber_what_it_missed_and_nothing_it_knows() {
        let shared = Hub::new(
            Arc::new(Recorder::default()) as Arc<dyn ChannelObserver>,
            Arc::default(),
        );
        assert!(shared.share_presence(Arc::new(Changes::default()) as _));
        let hub = shared.app(&AppId::parse("app_1").expect("valid"));
        let (outbox, mut rx, _) = Outbox::new(16);
        hub.subscribe_joining("presence-x", "1.1", &outbox, joining("bob"), 10)
            .expect("subscribed");
        hub.know_members("presence-x", "1.1", vec!["alice".into(), "bob".into()]);
        assert!(hub.go_live("presence-x", "1.1", 0, |_| {}));
        let (joining_outbox, mut joining_rx, _) = Outbox::new(16);
        hub.subscribe_joining("presence-x", "2.2", &joining_outbox, joining("zoe"), 10)
            .expect("subscribed");

        // The cluster now: bob and zoe (this node's), carol elsewhere; alice left meanwhile.
        let departed = hub.resync_departures("presence-x", &["carol".to_owned()]);
        assert_eq!(departed, 1, "alice, who needs no user_info read");
        let carol = [("carol".to_owned(), Some(r#"{"n":1}"#.to_owned()))];
        let sent = departed + hub.resync_members("presence-x", &carol);
        let frames: Vec<String> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|item| match item {
                Outgoing::Frame(frame) => String::from_utf8_lossy(frame.as_ref()).into_owned(),
                Outgoing::Publication(_) => panic!("a publication"),
            })
            .collect();
        assert_eq!(frames.len(), 3, "{frames:?}");
        assert!(
            frames[0].contains("member_removed") && frames[0].contains("alice"),
            "{frames:?}"
        );
        assert!(
            frames[1].contains("member_added")
                && frames[1].contains("carol")
                && frames[1].contains(r#"\"n\":1"#),
            "{frames:?}"
        );
        assert!(
            frames[2].contains("member_added") && frames[2].contains("zoe"),
            "this node's own member, whose notice it missed too: {frames:?}"
        );
        assert_eq!(sent, 3, "bob is known to it already: not repeated");
        assert!(
            joining_rx.try_recv().is_err(),
            "the joining subscriber is left alone"
        );
        assert_eq!(
            hub.resync_members("presence-x", &[("carol".into(), None)]),
            0,
            "a second resync finds nothing to tell"
        );
    }

    /// A subscriber whose snapshot lacked the other nodes' members is told what it lacks once
    /// they are read, except about members a notice told it of during the read (the read may
    /// predate the notice); a resync during the read supersedes it, and a new snapshot ends it.
    #[test]
    fn a_repair_tells_what_the_snapshot_lacked_and_keeps_what_notices_said_meanwhile() {
        let hub = Arc::new(app_hub());
        let (outbox, mut rx, _) = Outbox::new(16);
        hub.subscribe_joining("presence-x", "1.1", &outbox, joining("bob"), 10)
            .expect("subscribed");
        let ticket = hub
            .know_members_but_others("presence-x", "1.1", vec!["bob".into(), "erin".into()])
            .expect("a subscriber");
        assert_eq!(
            hub.begin_repair("presence-x", "1.1", ticket),
            Repair::NotYet,
            "still joining"
        );
        assert!(hub.go_live("presence-x", "1.1", 0, |_| {}));
        assert_eq!(hub.begin_repair("presence-x", "1.1", ticket), Repair::Begun);
        // While the other nodes are read: carol leaves (the subscriber never knew her), dave
        // and frank come.
        let added = |user: &str| Frame::from(format!("added {user}"));
        let removed = |user: &str| Frame::from(format!("removed {user}"));
        hub.member_notice("presence-x", "carol", false, &removed("carol"), None);
        hub.member_notice("presence-x", "dave", true, &added("dave"), None);
        hub.member_notice("presence-x", "frank", true, &added("frank"), None);
        // The read, made before carol left and frank came: alice, carol, dave; erin, known,
        // is gone.
        let read = ["alice", "carol", "dave"].map(|id| (id.to_owned(), None));
        assert_eq!(
            hub.finish_repair("presence-x", "1.1", ticket, &read),
            Repaired::Told(2)
        );
        let frames = offsets(&mut rx);
        assert_eq!(frames.len(), 4, "{frames:?}");
        assert_eq!(frames[..2], ["added dave", "added frank"]);
        assert!(
            frames[2].contains("member_removed") && frames[2].contains("erin"),
            "frank, whose coming was told during the read, is not removed: {frames:?}"
        );
        assert!(
            frames[3].contains("member_added") && frames[3].contains("alice"),
            "carol, whose leaving was told during the read, is not added: {frames:?}"
        );
        hub.member_notice("presence-x", "alice", true, &added("alice"), None);
        assert!(rx.try_recv().is_err(), "alice is known now");
        assert_eq!(
            hub.begin_repair("presence-x", "1.1", ticket),
            Repair::Gone,
            "a repair is done once applied"
        );

        // A resync supersedes a read under way, on either of its halves, and holds back
        // repairs while it runs.
        let ticket = hub
            .know_members_but_others("presence-x", "1.1", vec!["bob".into()])
            .expect("a subscriber");
        for half in 0..2 {
            assert_eq!(hub.begin_repair("presence-x", "1.1", ticket), Repair::Begun);
            let resyncing = hub.resyncing();
            match half {
                0 => hub.resync_departures("presence-x", &[]),
                _ => hub.resync_members("presence-x", &[]),
            };
            assert_eq!(
                hub.finish_repair("presence-x", "1.1", ticket, &read),
                Repaired::Superseded,
                "a read that may predate the resync's is not applied"
            );
            assert_eq!(
                hub.begin_repair("presence-x", "1.1", ticket),
                Repair::NotYet
            );
            drop(resyncing);
        }
        assert_eq!(hub.begin_repair("presence-x", "1.1", ticket), Repair::Begun);
        hub.abandon_repair("presence-x", "1.1", ticket);
        // A new snapshot (the client subscribed again) ends the repair of the old one.
        hub.know_members("presence-x", "1.1", vec!["bob".into()]);
        assert_eq!(hub.begin_repair("presence-x", "1.1", ticket), Repair::Gone);
        let ticket = hub
            .know_members_but_others("presence-x", "1.1", vec!["bob".into()])
            .expect("a subscriber");
        hub.unsubscribe("presence-x", "1.1");
        assert_eq!(hub.begin_repair("presence-x", "1.1", ticket), Repair::Gone);
        assert_eq!(
            hub.finish_repair("presence-x", "1.1", ticket, &read),
            Repaired::Gone
        );
    }

    #[tokio::test]
    async fn a_hub_sharing_presence_hands_its_changes_to_the_cluster_and_announces_nothing() {
        let recorder = Arc::new(Recorder::default());
        let hub = Hub::new(
            Arc::clone(&recorder) as Arc<dyn ChannelObserver>,
            Arc::default(),
        );
        let changes = Arc::new(Changes::default());
        assert!(hub.share_presence(Arc::clone(&changes) as _));
        let app = hub.app(&AppId::parse("app_1").expect("valid"));
        let (o, _r, _) = Outbox::new(8);
        let first = app
            .subscribe("presence-x", "1.1", &o, joining("u1"), 10)
            .expect("ok");
        assert!(
            first.occupied && !first.member_added,
            "the cluster announces"
        );
        app.subscribe("presence-x", "2.2", &o, joining("u1"), 10)
            .expect("same user");
        assert_eq!(app.unsubscribe("presence-x", "1.1").member_removed, None);
        assert_eq!(app.unsubscribe("presence-x", "2.2").member_removed, None);
        let elsewhere = app.members_elsewhere("presence-x").expect("shared");
        assert_eq!(elsewhere.await.expect("read"), [("u9".to_owned(), None)]);
        assert!(
            recorder.0.lock().expect("lock").is_empty(),
            "no webhook from the hub"
        );
        assert_eq!(
            *changes.0.lock().expect("lock"),
            [
                LocalChange::Occupied {
                    channel: "presence-x".into()
                },
                LocalChange::Joined {
                    channel: "presence-x".into(),
                    user_id: "u1".into(),
                    info: Some(r#"{"name":"u1"}"#.into()),
                    socket_id: "1.1".into()
                },
                LocalChange::Left {
                    channel: "presence-x".into(),
                    user_id: "u1".into()
                },
                LocalChange::Vacated {
                    channel: "presence-x".into()
                },
            ]
        );
        assert!(app_hub().members_elsewhere("presence-x").is_none());
    }

    /// A termination applied late closes the user's connections that signed in before it,
    /// not those that signed in since.
    #[tokio::test(start_paused = true)]
    async fn a_late_termination_closes_only_the_sign_ins_before_it() {
        let hub = Hub::default();
        let app = hub.app(&AppId::parse("app_1").expect("valid"));
        let (before, since, other_user) = (
            app.connection_token(),
            app.connection_token(),
            app.connection_token(),
        );
        app.sign_in("u1", "1.1", before.clone());
        app.sign_in("u2", "1.3", other_user.clone());
        tokio::time::advance(std::time::Duration::from_secs(1)).await;
        let terminated_at = Instant::now();
        tokio::time::advance(std::time::Duration::from_secs(1)).await;
        app.sign_in("u1", "1.2", since.clone());
        // Signing in again keeps the first time: the termination still applies to it.
        app.sign_in("u1", "1.1", before.clone());
        assert_eq!(
            app.terminate_user_signed_in_before("u1", Some(terminated_at)),
            1
        );
        assert!(before.is_cancelled(), "signed in before the termination");
        assert!(!since.is_cancelled(), "signed in after it");
        assert!(!other_user.is_cancelled(), "another user");
        assert_eq!(app.terminate_user("u1"), 2, "at once: every sign-in");
        assert!(since.is_cancelled());
    }

    #[test]
    fn removing_an_app_ends_its_connections_but_not_others() {
        let hub = Hub::default();
        let app = hub.app(&AppId::parse("app_1").expect("valid"));
        let signed_in = app.connection_token();
        let other = app.connection_token();
        let elsewhere = hub
            .app(&AppId::parse("app_2").expect("valid"))
            .connection_token();
        app.sign_in("u1", "1.1", signed_in.clone());
        assert_eq!(app.terminate_user("u1"), 1);
        assert!(signed_in.is_cancelled() && !other.is_cancelled());
        assert!(!app.is_removed(), "terminating a user leaves the app alone");

        hub.remove_app(&AppId::parse("app_1").expect("valid"));
        assert!(other.is_cancelled() && app.is_removed());
        assert!(
            hub.app(&AppId::parse("app_1").expect("valid"))
                .connection_token()
                .is_cancelled(),
            "a connection arriving after the deletion ends at once"
        );
        assert!(
            !elsewhere.is_cancelled()
                && !hub.app(&AppId::parse("app_2").expect("valid")).is_removed()
        );
    }

    fn published(channel: &str, offset: Option<u64>) -> Arc<Publication> {
        use crate::publication::EventData;
        let position = offset.map(|offset| herald_core::history::Position {
            epoch: "e".into(),
            offset,
        });
        Arc::new(
            Publication::new(
                &AppId::parse("app_1").expect("valid"),
                channel,
                "ev",
                EventData::text("d"),
            )
            .with_position(position),
        )
    }

    fn offsets(rx: &mut Frames) -> Vec<String> {
        let mut seen = Vec::new();
        while let Ok(item) = rx.try_recv() {
            seen.push(match item {
                Outgoing::Publication(p) => p.offset().map_or("live".into(), |o| o.to_string()),
                Outgoing::Frame(f) => f.as_str().to_owned(),
            });
        }
        seen
    }

    /// Another node's 5 came over the bus before this node heard its 4 (and before its 3 and
    /// 4 were in the replay, read up to 2): the join reads 3 and 4 before going live, and the
    /// late 4 is then a duplicate.
    #[tokio::test]
    async fn a_joining_subscriber_whose_held_publications_skip_offsets_reads_them_first() {
        let hub = app_hub();
        let (outbox, mut rx, overflowed) = Outbox::new(16);
        hub.subscribe_joining("history-c", "1.1", &outbox, None, 10)
            .expect("subscribed");
        assert_eq!(hub.broadcast(&published("history-c", Some(5))), 1);
        let mut reads = Vec::new();
        let live = hub
            .go_live_in_order(
                "history-c",
                "1.1",
                2,
                |outbox| outbox.send(Frame::from_static("ok")),
                vec![published("history-c", Some(2))],
                |after, before| {
                    reads.push((after, before));
                    let found = (after + 1..before)
                        .map(|offset| published("history-c", Some(offset)))
                        .collect();
                    std::future::ready(Ok::<_, std::convert::Infallible>(found))
                },
            )
            .await;
        assert_eq!(live, Ok(true));
        assert_eq!(reads, [(2, 5)]);
        // The late 4 reaches the subscriber's filter, which passes over it.
        hub.broadcast(&published("history-c", Some(4)));
        hub.broadcast(&published("history-c", Some(6)));
        assert_eq!(offsets(&mut rx), ["ok", "2", "3", "4", "5", "6"]);
        assert!(!overflowed.is_cancelled());
    }

    /// Over a bus, two nodes' publications may be heard out of order while a subscriber joins:
    /// the lower offset, heard after the higher, is sent before it rather than dropped as a
    /// duplicate; what has no offset keeps its place.
    #[tokio::test]
    async fn a_joining_subscribers_publications_heard_out_of_order_go_out_in_order() {
        let hub = app_hub();
        let (outbox, mut rx, overflowed) = Outbox::new(16);
        hub.subscribe_joining("history-c", "1.1", &outbox, None, 10)
            .expect("subscribed");
        hub.broadcast(&published("history-c", Some(7)));
        hub.broadcast(&published("history-c", None));
        hub.broadcast(&published("history-c", Some(6)));
        let live = hub
            .go_live_in_order(
                "history-c",
                "1.1",
                5,
                |outbox| outbox.send(Frame::from_static("ok")),
                Vec::new(),
                |_, _| -> std::future::Ready<Result<Vec<Arc<Publication>>, ()>> {
                    panic!("no gap to read")
                },
            )
            .await;
        assert_eq!(live, Ok(true));
        assert_eq!(offsets(&mut rx), ["ok", "6", "live", "7"]);
        assert!(!overflowed.is_cancelled());
    }

    /// A publication the joining subscriber must not get (its own) is no gap: nothing is read,
    /// and it is not sent.
    #[tokio::test]
    async fn a_joining_subscribers_own_publication_is_no_gap_to_fill() {
        let hub = app_hub();
        let (outbox, mut rx, _overflowed) = Outbox::new(16);
        hub.subscribe_joining("history-c", "1.1", &outbox, None, 10)
            .expect("subscribed");
        let own = Arc::new(
            Arc::into_inner(published("history-c", Some(3)))
                .expect("one owner")
                .except(Some("1.1".into())),
        );
        hub.broadcast(&own);
        hub.broadcast(&published("history-c", Some(4)));
        let live = hub
            .go_live_in_order(
                "history-c",
                "1.1",
                2,
                |_| {},
                Vec::new(),
                |_, _| -> std::future::Ready<Result<Vec<Arc<Publication>>, ()>> {
                    panic!("no gap to read")
                },
            )
            .await;
        assert_eq!(live, Ok(true));
        assert_eq!(offsets(&mut rx), ["4"]);
    }

    /// The offsets skipped are no longer kept: after a few reads it goes live without them
    /// rather than hold the subscriber for good.
    #[tokio::test]
    async fn a_gap_that_cannot_be_read_does_not_hold_the_subscriber() {
        let hub = app_hub();
        let (outbox, mut rx, _overflowed) = Outbox::new(16);
        hub.subscribe_joining("history-c", "1.1", &outbox, None, 10)
            .expect("subscribed");
        assert_eq!(hub.broadcast(&published("history-c", Some(9))), 1);
        let mut reads = 0;
        let live = hub
            .go_live_in_order(
                "history-c",
                "1.1",
                2,
                |_| {},
                Vec::new(),
                |_, _| {
                    reads += 1;
                    std::future::ready(Ok::<_, std::convert::Infallible>(Vec::new()))
                },
            )
            .await;
        assert_eq!(live, Ok(true));
        assert_eq!(reads, 1);
        assert_eq!(offsets(&mut rx), ["9"]);

        // A store that yields one offset a read: after MAX_GAP_READS reads it goes live with
        // what it found, without the rest.
        hub.subscribe_joining("history-d", "1.1", &outbox, None, 10)
            .expect("subscribed");
        assert_eq!(hub.broadcast(&published("history-d", Some(9))), 1);
        let mut reads = 0;
        let live = hub
            .go_live_in_order(
                "history-d",
                "1.1",
                2,
                |_| {},
                Vec::new(),
                |after, _| {
                    reads += 1;
                    let one = vec![published("history-d", Some(after + 1))];
                    std::future::ready(Ok::<_, std::convert::Infallible>(one))
                },
            )
            .await;
        assert_eq!(live, Ok(true));
        assert_eq!(reads, MAX_GAP_READS);
        assert_eq!(offsets(&mut rx), ["3", "4", "5", "6", "9"]);
        // A subscriber gone meanwhile is not made live.
        let gone = hub
            .go_live_in_order(
                "history-c",
                "9.9",
                0,
                |_| {},
                Vec::new(),
                |_, _| std::future::ready(Ok::<_, std::convert::Infallible>(Vec::new())),
            )
            .await;
        assert_eq!(gone, Ok(false));
    }

    #[test]
    fn a_joining_subscriber_gets_the_replay_then_what_was_held_past_it_without_duplicates() {
        let hub = app_hub();
        let (outbox, mut rx, overflowed) = Outbox::new(16);
        hub.subscribe_joining("history-c", "1.1", &outbox, None, 10)
            .expect("subscribed");
        // While the join reads the store: 3 was committed before the read (the replay has
        // it), 4 and 5 after it.
        for offset in [3, 4, 5] {
            assert_eq!(hub.broadcast(&published("history-c", Some(offset))), 1);
        }
        hub.notify("history-c", &Frame::from_static("member"), None);
        assert!(
            offsets(&mut rx).is_empty(),
            "nothing reaches the outbox while joining"
        );
        assert!(hub.go_live("history-c", "1.1", 3, |outbox| {
            outbox.send(Frame::from_static("confirmed"));
            outbox.send(Outgoing::Publication(published("history-c", Some(2))));
            outbox.send(Outgoing::Publication(published("history-c", Some(3))));
        }));
        hub.broadcast(&published("history-c", Some(6)));
        assert_eq!(
            offsets(&mut rx),
            ["confirmed", "2", "3", "4", "5", "member", "6"],
            "replay, then the held events past it in order, then live"
        );
        assert!(!overflowed.is_cancelled());
        assert!(!hub.go_live("history-c", "9.9", 0, |_| unreachable!(
            "no such subscriber"
        )));
    }

    /// A broker brings a publication to a node some time after its commit: one that a joining
    /// subscriber read from the store arrives after it went live, or one arrives twice (a
    /// catch-up after a lost broker link). Each subscriber gets each offset once.
    #[test]
    fn a_publication_a_subscriber_already_has_is_not_sent_again() {
        let hub = app_hub();
        let (outbox, mut rx, _) = Outbox::new(16);
        hub.subscribe_joining("history-c", "1.1", &outbox, None, 10)
            .expect("subscribed");
        assert_eq!(
            hub.catch_up_from("history-c"),
            None,
            "a joining subscriber reads the store itself"
        );
        assert!(hub.go_live("history-c", "1.1", 5, |_| {}));
        assert_eq!(hub.catch_up_from("history-c"), Some(5));
        for offset in [4, 5, 6, 6, 7, 5] {
            hub.broadcast(&published("history-c", Some(offset)));
        }
        hub.broadcast(&published("history-c", None));
        assert_eq!(
            offsets(&mut rx),
            ["6", "7", "live"],
            "late offsets and repeats dropped; unpositioned publications always pass"
        );
        assert_eq!(hub.catch_up_from("history-c"), Some(7));
        assert_eq!(hub.catch_up_from("other"), None);
    }

    /// A subscriber's own publication (its `except`) is not sent to it but counts as seen: a
    /// catch-up from this node's offsets starts past it and never reads it back for its
    /// sender.
    #[test]
    fn a_publication_passed_over_for_its_sender_counts_as_seen_for_catch_ups() {
        let hub = app_hub();
        let (sender_outbox, mut sender, _) = Outbox::new(16);
        let (other_outbox, mut other, _) = Outbox::new(16);
        for (socket, outbox) in [("1.1", &sender_outbox), ("2.2", &other_outbox)] {
            hub.subscribe_joining("history-c", socket, outbox, None, 10)
                .expect("subscribed");
            assert!(hub.go_live("history-c", socket, 4, |_| {}));
        }
        let own = Arc::new(
            Publication::new(
                &AppId::parse("app_1").expect("valid"),
                "history-c",
                "ev",
                crate::publication::EventData::text("d"),
            )
            .with_position(Some(herald_core::history::Position {
                epoch: "e".into(),
                offset: 5,
            }))
            .except(Some("1.1".into())),
        );
        assert_eq!(hub.broadcast(&own), 1);
        assert_eq!(offsets(&mut other), ["5"]);
        assert!(offsets(&mut sender).is_empty(), "not echoed");
        assert_eq!(
            hub.catch_up_from("history-c"),
            Some(5),
            "nothing before 6 is missing for anyone"
        );
        // The same offset heard again without its `except` is not sent to the sender.
        hub.broadcast(&published("history-c", Some(5)));
        assert!(offsets(&mut sender).is_empty());
    }

    #[test]
    fn a_websocket_outbox_gets_the_frame_and_an_sse_outbox_the_publication() {
        let hub = app_hub();
        let (pusher, mut pusher_rx, _) = Outbox::pusher(4);
        let (whole, mut whole_rx, _) = Outbox::new(4);
        hub.subscribe("c", "1.1", &pusher, None, 10).expect("ok");
        hub.subscribe("c", "2.2", &whole, None, 10).expect("ok");
        let publication = published("c", Some(1));
        assert_eq!(hub.broadcast(&publication), 2);
        match pusher_rx.try_recv() {
            Ok(Outgoing::Frame(frame)) => assert_eq!(frame, *publication.pusher_frame()),
            other => panic!("expected the frame, got {other:?}"),
        }
        match whole_rx.try_recv() {
            Ok(Outgoing::Publication(p)) => assert!(Arc::ptr_eq(&p, &publication)),
            other => panic!("expected the publication, got {other:?}"),
        }
        assert_eq!(
            Arc::strong_count(&publication),
            1,
            "nothing kept a reference but ours once the items were taken"
        );
        // A held subscriber's items are kept whole (for their offsets) and become frames when
        // it goes live.
        let (late, mut late_rx, _) = Outbox::pusher(4);
        hub.subscribe_joining("c", "3.3", &late, None, 10)
            .expect("ok");
        hub.broadcast(&published("c", Some(2)));
        hub.go_live("c", "3.3", 1, |_| {});
        assert!(matches!(late_rx.try_recv(), Ok(Outgoing::Frame(_))));
    }

    #[test]
    fn a_joining_subscriber_that_is_held_more_than_its_outbox_holds_is_too_slow() {
        let hub = app_hub();
        let (outbox, _rx, overflowed) = Outbox::new(2);
        hub.subscribe_joining("history-c", "1.1", &outbox, None, 10)
            .expect("subscribed");
        for offset in 1..=2 {
            hub.broadcast(&published("history-c", Some(offset)));
        }
        assert!(!overflowed.is_cancelled());
        hub.broadcast(&published("history-c", Some(3)));
        assert!(overflowed.is_cancelled(), "the third did not fit");
    }

    #[test]
    fn connection_quota() {
        let hub = app_hub();
        assert!(hub.connect(2, Transport::Pusher) && hub.connect(2, Transport::Sse));
        assert!(!hub.connect(2, Transport::SocketIo));
        hub.disconnect(Transport::Pusher);
        assert!(hub.connect(2, Transport::SocketIo));
        assert_eq!(hub.metrics.connections_over(Transport::Pusher), 0);
        assert_eq!(hub.metrics.connections_over(Transport::Sse), 1);
        assert_eq!(
            hub.metrics.connections_over(Transport::SocketIo),
            1,
            "the refused one is not counted"
        );
        assert_eq!(
            hub.metrics.connections.get(),
            2,
            "the refused one is not counted"
        );
    }

    #[test]
    fn subscriptions_are_counted_by_transport_until_each_ends() {
        let hub = app_hub();
        let (ws, _ws_rx, _) = Outbox::pusher(8);
        let (sse, _sse_rx, _) = Outbox::new(8);
        let (sio, _sio_rx, _) = Outbox::socketio(8);
        hub.subscribe("a", "1.1", &ws, None, 10).expect("ok");
        hub.subscribe("b", "1.1", &ws, None, 10).expect("ok");
        hub.subscribe("a", "2.2", &sse, None, 10).expect("ok");
        hub.subscribe("a", "3.3", &sio, None, 10).expect("ok");
        let over = |t| hub.metrics.subscriptions_over(t);
        assert_eq!(
            (
                over(Transport::Pusher),
                over(Transport::Sse),
                over(Transport::SocketIo)
            ),
            (2, 1, 1)
        );
        hub.unsubscribe("a", "1.1");
        hub.unsubscribe("a", "1.1");
        hub.unsubscribe("a", "9.9");
        assert_eq!(over(Transport::Pusher), 1, "only a real removal counts");
        hub.unsubscribe("b", "1.1");
        hub.unsubscribe("a", "2.2");
        hub.unsubscribe("a", "3.3");
        assert_eq!(
            (
                over(Transport::Pusher),
                over(Transport::Sse),
                over(Transport::SocketIo)
            ),
            (0, 0, 0)
        );
    }

    /// Once an item did not fit, nothing more is queued, though the reader makes room: what
    /// followed the gap would carry a position past it, and the client's resume from there
    /// would never get what was dropped.
    #[test]
    fn an_outbox_queues_nothing_after_an_item_it_dropped() {
        let (outbox, mut frames, overflowed) = Outbox::new(2);
        for n in 1..=3 {
            outbox.send(Frame::from(format!("e{n}")));
        }
        assert!(overflowed.is_cancelled(), "the third did not fit");
        let first = frames.try_recv().expect("the first");
        outbox.send(Frame::from_static("e4"));
        let mut rest = Vec::new();
        while let Ok(item) = frames.try_recv() {
            rest.push(item);
        }
        let texts = |items: &[Outgoing]| -> Vec<String> {
            items
                .iter()
                .map(|item| item.pusher_frame().as_str().to_owned())
                .collect()
        };
        assert_eq!(texts(&[first]), ["e1"]);
        assert_eq!(texts(&rest), ["e2"], "nothing after the gap");
    }

    #[test]
    fn an_overflowing_outbox_is_counted_once() {
        let metrics = Arc::new(ChannelMetrics::default());
        let hub = Hub::new(Arc::new(Recorder::default()), Arc::clone(&metrics));
        let app = hub.app(&AppId::parse("app_1").expect("valid"));
        let (slow, _slow_rx, overflowed) = Outbox::new(1);
        let (fast, _fast_rx, _) = Outbox::new(8);
        app.subscribe("c", "1.1", &slow, None, 10).expect("ok");
        app.subscribe("c", "2.2", &fast, None, 10).expect("ok");
        let frame = Frame::from_static("x");
        app.notify("c", &frame, None);
        assert_eq!(metrics.outbox_overflows_total.get(), 0, "the first fits");
        for _ in 0..3 {
            app.notify("c", &frame, None);
        }
        // The connection's own clone noticing it again counts nothing more.
        slow.send(Frame::from_static("pong"));
        assert!(overflowed.is_cancelled());
        assert_eq!(metrics.outbox_overflows_total.get(), 1);
    }
}
