//! Presence and occupancy across nodes: the cluster's [`PresenceSync`] (what each hub hands
//! on) and [`PresenceManager`] (what the Pusher HTTP API reads), [`ClusterPresence`], over a
//! [`PresenceRecord`]: the engine that records who holds what and decides each change
//! atomically (PostgreSQL: [`postgres::PostgresRecord`]; Redis: [`redis::RedisRecord`], used
//! when the cluster's broker is Redis; NATS: [`nats::NatsRecord`], when it is NATS). What follows is said in the
//! PostgreSQL record's terms; every record keeps the same promises.
//!
//! **Rows per node.** Each node writes only what it knows: a `cluster_presence_members` row
//! per (channel, user) with at least one of its sockets in, a `cluster_channel_occupancy` row
//! per channel it has subscribers in (with its subscription count), and its `cluster_nodes`
//! row, whose heartbeat it renews every third of `node_ttl` on a task of its own, so a node
//! busy with its changes still beats. A member or a channel is in the cluster while any node
//! has a row for it.
//!
//! **Who decides.** The hub decides on this node (a user's first socket in, last out; a
//! channel's first subscriber, last) under its channel lock and queues the change here; one
//! task per node applies the changes in that order. Each is one transaction under an advisory
//! lock on its key ((app, channel, user) for members, (app, channel) for occupancy): write or
//! delete this node's row, and look for other nodes' rows. Only if there are none is it a
//! change of the cluster: then this node alone reports the channel webhook (`member_added`,
//! `member_removed`, `channel_occupied`, `channel_vacated`) and, for members, NOTIFYs
//! [`PRESENCE_CHANNEL`] in the same transaction, so every node (this one too, through the
//! broker's LISTEN session, [`hear`]) sends `pusher_internal:member_added` or `member_removed`
//! to its subscribers of the channel, the joining socket excepted.
//!
//! **Dead nodes.** A node whose heartbeat is older than `node_ttl` in two successive sweeps of a
//! live node (the same heartbeat both times) is deleted by whichever live node sees that
//! first; rows whose node has no `cluster_nodes` row are then removed one key at a time under
//! the same locks, `DELETE ... RETURNING` deciding which sweeper reports. So a killed node's
//! members leave once, within `node_ttl` plus two heartbeat periods. Decisions count
//! every node's rows, dead or not yet swept: a user still held by an unswept node has not left
//! the cluster, and leaves (once) when the sweep removes its last row. A node whose own round
//! comes more than a heartbeat period late skips judging the others once: an overloaded host
//! holds up its nodes together, and the others' overdue beats come first; and a node stale in
//! one sweep gets until the next to beat, so none is taken for dead for a pause it shared with
//! its judge.
//!
//! **Staleness.** Membership and occupancy are exact at each transaction's commit (a change
//! reaches the database milliseconds after the hub decided it). Subscription counts are
//! written when a channel becomes occupied on a node and then every [`FLUSH_EVERY`] if they
//! changed: another node's count is at most that old (this node's own is read from its hub).
//!
//! **Bounded, and repaired rather than dropped.** The hub hands changes on without waiting
//! (it holds a channel lock), into a queue of [`QUEUE_CAPACITY`]. A change that finds the queue
//! full, or that the database refuses, is not retried on its own: the node's rows are then
//! *reconciled* with its hub (`ClusterPresence::reconcile`): what was queued is discarded,
//! the hub is read, and this node's rows are added or removed until they match it. Every change
//! is idempotent on this node's row (a join whose row exists reports nothing, a leave whose row
//! is gone reports nothing), so a change applied twice, once by the reconcile and once from
//! the queue, is reported once. The same reconcile re-registers a node that was taken for
//! dead.
//!
//! **Notices missed.** A node whose link to the others was lost (its LISTEN session, or the
//! bus that carries notices) hears nothing meanwhile. When the link is back, the broker calls
//! [`resync`] on the link's task: each presence channel's members are read and the node's
//! subscribers told what they missed; then the terminations kept meanwhile are applied
//! ([`crate::terminations::replay`]).
//!
//! **Known limits.** The channel webhooks' anti-flap delay cancels a leave and rejoin reported
//! by one node; a user who leaves on one node and rejoins on another within the delay gets
//! `member_removed` after `member_added` at the receiver. While a reconcile is pending (the
//! database unreachable), other nodes see this node's members as they were. A
//! `terminate_connections` notice a node missed is applied when its link is back, from the
//! copy kept in the database ([`crate::terminations`]), if the link was down less than
//! [`crate::terminations::KEPT_FOR`].

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use herald_channels::{
    Hub,
    hub::{ChannelEvent, ChannelInfo, ChannelObserver},
    presence::{
        LocalChange, MembersFuture, PresenceError, PresenceManager, PresenceSync, RemoteMember,
    },
    protocol,
};
use herald_core::AppId;
use herald_store::ClusterClock;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc};
use tokio_util::{sync::CancellationToken, task::AbortOnDropHandle};

/// The NOTIFY channel of presence notices (members added and removed, users terminated).
pub const PRESENCE_CHANNEL: &str = "herald_presence";

/// How often a node writes its changed subscription counts.
pub const FLUSH_EVERY: Duration = Duration::from_millis(250);

/// A node is dead when its heartbeat is older than this, unless configured otherwise.
pub const DEFAULT_NODE_TTL: Duration = Duration::from_secs(15);

pub mod nats;
pub mod postgres;
pub mod redis;

/// Beats after registering again at which a node reconciles once more (see
/// `ClusterPresence::run`): a node_ttl's worth, the beat being a third of it.
const RECHECK_BEATS: u32 = 3;

/// Rows one sweep removes at most (the next heartbeat goes on).
const SWEEP_LIMIT: i64 = 1_000;

/// Changes a node holds before it stops queueing them and reconciles instead: far above what
/// a node decides between two transactions, well below what would hurt its memory.
pub const QUEUE_CAPACITY: usize = 65_536;

/// How long a node whose reconcile failed (the database unreachable) waits to try again.
const RECONCILE_RETRY: Duration = Duration::from_secs(1);

/// How long a presence subscriber's confirmation waits at most for its own join to be
/// recorded (see [`Progress`]); past it (the database slow or away) it is confirmed anyway.
const SETTLE_WAIT: Duration = Duration::from_secs(2);

/// A change as the hub hands it on, numbered by [`Progress`].
type Change = (AppId, LocalChange, u64);

/// How far this node's changes are recorded. Each change is numbered as it is queued; the
/// task marks the numbers it has recorded. A presence subscriber's snapshot is read only once
/// the changes queued before it (its own join among them) are recorded, so its confirmation
/// is sent after its join is in the database, and a member whose subscription succeeded is in
/// every snapshot read after it, on any node (`pusher-js`'s second subscriber sees the first).
struct Progress {
    /// Numbers a change and queues it in one step, so numbers follow queue order.
    queueing: Mutex<u64>,
    recorded: tokio::sync::watch::Sender<u64>,
}

impl Progress {
    fn new() -> Self {
        Self {
            queueing: Mutex::new(0),
            recorded: tokio::sync::watch::Sender::new(0),
        }
    }

    /// The number of the last change queued.
    fn queued(&self) -> u64 {
        *self.queueing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes up to `through` are recorded.
    fn recorded(&self, through: u64) {
        self.recorded.send_if_modified(|recorded| {
            let newer = through > *recorded;
            if newer {
                *recorded = through;
            }
            newer
        });
    }

    /// Waits (at most [`SETTLE_WAIT`]) until the changes queued so far are recorded.
    async fn settled(&self) {
        let target = self.queued();
        let mut recorded = self.recorded.subscribe();
        let _ = tokio::time::timeout(SETTLE_WAIT, recorded.wait_for(|r| *r >= target)).await;
    }
}

/// This node's subscription counts as last written, per (app, channel).
type Flushed = HashMap<(String, String), i64>;

#[derive(Debug, thiserror::Error)]
pub enum ClusterPresenceError {
    #[error("PostgreSQL: {0}")]
    Database(#[from] sqlx::Error),
    #[error("presence notice: {0}")]
    Notice(String),
    #[error("presence record: {0}")]
    Record(String),
}

impl From<ClusterPresenceError> for PresenceError {
    fn from(e: ClusterPresenceError) -> Self {
        PresenceError::Unavailable(e.to_string())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NoticeKind {
    #[serde(rename = "added")]
    Added,
    #[serde(rename = "removed")]
    Removed,
    #[serde(rename = "terminate")]
    Terminate,
}

/// A presence notice, as notified (JSON with one-letter keys).
#[derive(Debug, Serialize, Deserialize)]
pub struct Notice {
    #[serde(rename = "k")]
    pub kind: NoticeKind,
    /// The node that decided (or was asked to terminate): it has done its own part already
    /// for `terminate`.
    #[serde(rename = "s")]
    pub node: String,
    #[serde(rename = "a")]
    pub app_id: String,
    #[serde(rename = "c", default)]
    pub channel: String,
    #[serde(rename = "u")]
    pub user_id: String,
    #[serde(rename = "i", default, skip_serializing_if = "Option::is_none")]
    pub info: Option<String>,
    /// `user_info` too large for the notice: read it from the member's row.
    #[serde(rename = "r", default, skip_serializing_if = "std::ops::Not::not")]
    pub info_by_reference: bool,
    /// The joining socket, not told of its own arrival.
    #[serde(rename = "x", default, skip_serializing_if = "Option::is_none")]
    pub except: Option<String>,
}

impl Notice {
    /// A member added or removed, decided by `node`.
    pub fn member(kind: NoticeKind, node: &str, app: &str, channel: &str, user_id: &str) -> Self {
        Self {
            kind,
            node: node.to_owned(),
            app_id: app.to_owned(),
            channel: channel.to_owned(),
            user_id: user_id.to_owned(),
            info: None,
            info_by_reference: false,
            except: None,
        }
    }

    /// With the member's `user_info` and the joining socket that is not told.
    pub fn with_info(mut self, info: Option<&str>, except: Option<&str>) -> Self {
        self.info = info.map(str::to_owned);
        self.except = except.map(str::to_owned);
        self
    }

    pub fn to_json(&self) -> Result<String, ClusterPresenceError> {
        serde_json::to_string(self).map_err(|e| ClusterPresenceError::Notice(e.to_string()))
    }
}

/// Hands on a presence notice heard on [`PRESENCE_CHANNEL`] (called by the broker's LISTEN
/// session): members added or removed go to this node's subscribers of the channel, a
/// terminated user's connections here close.
pub async fn hear(
    hub: &Hub,
    record: &dyn PresenceRecord,
    node: &str,
    payload: &str,
) -> Result<(), String> {
    let notice: Notice =
        serde_json::from_str(payload).map_err(|e| format!("presence notice: {e}"))?;
    let app_id = AppId::parse(&notice.app_id).map_err(|e| format!("app id: {e}"))?;
    let Some(app) = hub.existing(&app_id) else {
        return Ok(());
    };
    match notice.kind {
        NoticeKind::Terminate => {
            if notice.node != node {
                app.terminate_user(&notice.user_id);
            }
        }
        NoticeKind::Removed => {
            let frame = protocol::member_removed(&notice.channel, &notice.user_id);
            app.member_notice(&notice.channel, &notice.user_id, false, &frame, None);
        }
        NoticeKind::Added => {
            if app.channel_info(&notice.channel).is_none() {
                return Ok(());
            }
            let info = if notice.info_by_reference {
                record
                    .member_info(&notice.app_id, &notice.channel, &notice.user_id)
                    .await
                    .map_err(|e| e.to_string())?
            } else {
                notice.info
            };
            let frame = protocol::member_added(&notice.channel, &notice.user_id, info.as_deref());
            app.member_notice(
                &notice.channel,
                &notice.user_id,
                true,
                &frame,
                notice.except.as_deref(),
            );
        }
    }
    Ok(())
}

/// How long a resync may take in all: it runs on the link's own task, which hears nothing
/// else meanwhile.
const RESYNC_PATIENCE: Duration = Duration::from_secs(5);

/// After this node's link to the others was lost and is back (its LISTEN session re-opened,
/// its bus re-subscribed), member notices sent meanwhile were not heard: every presence
/// channel with subscribers here is compared with `record` (the other nodes' members, one
/// read per app; the `user_info` of those some subscriber lacks) and its subscribers are told
/// what they missed ([`herald_channels::hub::AppHub::resync_members`]). The link's task calls
/// it once the link is back, on that task: notices heard after the read apply on top of it,
/// and those heard before it (NATS hands on what arrives while its subscription is being
/// confirmed) are reflected in it. An app whose members cannot be read is left as it is (logged); the whole resync gives
/// up after [`RESYNC_PATIENCE`]. Returns how many notices were sent.
pub async fn resync(hub: &Hub, record: &dyn PresenceRecord, node: &str) -> usize {
    let sent = std::sync::atomic::AtomicUsize::new(0);
    if tokio::time::timeout(RESYNC_PATIENCE, resync_apps(hub, record, node, &sent))
        .await
        .is_err()
    {
        tracing::warn!(
            node,
            patience = ?RESYNC_PATIENCE,
            "presence: the resync after a lost link did not finish in time; the rest of the channels' subscribers catch up as members change"
        );
    }
    sent.into_inner()
}

async fn resync_apps(
    hub: &Hub,
    record: &dyn PresenceRecord,
    node: &str,
    sent: &std::sync::atomic::AtomicUsize,
) {
    // No repair of a snapshot applies a read of its own while this applies older ones (held
    // until this returns or its patience runs out).
    let apps = hub.apps();
    let _resyncing: Vec<_> = apps.iter().map(|app| app.resyncing()).collect();
    // First who left, everywhere: that needs no more reads, so a resync cut short by its
    // patience still removes members who will never change again.
    let mut read = Vec::new();
    for app in apps {
        let channels = app.channels("presence-");
        if channels.is_empty() {
            continue;
        }
        let app_id = app.app_id().as_str();
        let pairs = match record.users_elsewhere(node, app_id, "presence-").await {
            Ok(pairs) => pairs,
            Err(e) => {
                tracing::warn!(node, app = app_id, error = %e, "presence: reading the members after a lost link failed; the app's subscribers catch up as members change");
                continue;
            }
        };
        let mut by_channel: HashMap<String, Vec<String>> = HashMap::new();
        for (channel, user_id) in pairs {
            by_channel.entry(channel).or_default().push(user_id);
        }
        for (channel, _) in &channels {
            let ids = by_channel.get(channel).map_or(&[][..], Vec::as_slice);
            sent.fetch_add(app.resync_departures(channel, ids), Ordering::Relaxed);
        }
        read.push((app, channels, by_channel));
    }
    // Then who joined, with the user_info of those some subscriber lacks.
    for (app, channels, mut by_channel) in read {
        let app_id = app.app_id().as_str();
        for (channel, _) in channels {
            let ids = by_channel.remove(&channel).unwrap_or_default();
            let untold: HashSet<String> = app.members_untold(&channel, &ids).into_iter().collect();
            let mut elsewhere: Vec<RemoteMember> = Vec::with_capacity(ids.len());
            for user_id in ids {
                let info = match untold.contains(&user_id) {
                    true => record
                        .member_info(app_id, &channel, &user_id)
                        .await
                        .unwrap_or_else(|e| {
                            tracing::warn!(node, channel, error = %e, "presence: a missed member's user_info could not be read; it is announced without");
                            None
                        }),
                    false => None,
                };
                elsewhere.push((user_id, info));
            }
            sent.fetch_add(app.resync_members(&channel, &elsewhere), Ordering::Relaxed);
        }
    }
}

/// What a hub hands on: queued for [`ClusterPresence::run`], in order.
struct Queue {
    node: String,
    record: Arc<dyn PresenceRecord>,
    changes: mpsc::Sender<Change>,
    /// Set when a change found the queue full: the task reconciles instead.
    overflowed: Arc<AtomicBool>,
    progress: Arc<Progress>,
}

impl PresenceSync for Queue {
    fn changed(&self, app_id: &AppId, change: LocalChange) {
        let mut queueing = self
            .progress
            .queueing
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // Numbered even if it finds the queue full: the reconcile that covers it marks it.
        *queueing += 1;
        match self
            .changes
            .try_send((app_id.to_owned(), change, *queueing))
        {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                if !self.overflowed.swap(true, Ordering::AcqRel) {
                    tracing::warn!(
                        node = self.node,
                        capacity = QUEUE_CAPACITY,
                        "presence: the change queue is full; this node's rows will be reconciled with its hub"
                    );
                }
            }
            // The task has stopped (the node is shutting down or was abandoned): its rows are
            // then the sweep's.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    fn members_elsewhere(&self, app_id: &AppId, channel: &str) -> MembersFuture {
        let (record, node) = (Arc::clone(&self.record), self.node.clone());
        let (app_id, channel) = (app_id.as_str().to_owned(), channel.to_owned());
        let progress = Arc::clone(&self.progress);
        Box::pin(async move {
            // Polled after the subscriber joined the hub: its own join is queued by now.
            progress.settled().await;
            read_again_once(|| record.members_elsewhere(&node, &app_id, &channel))
                .await
                .map_err(PresenceError::from)
        })
    }
}

/// What a record says one node holds: (app, channel, user) members and (app, channel)
/// channels.
#[derive(Debug, Default)]
pub struct Held {
    pub members: HashSet<(String, String, String)>,
    pub channels: HashSet<(String, String)>,
}

/// What nodes no longer registered still hold: (node, app, channel, user) members and (node,
/// app, channel) channels.
#[derive(Debug, Default)]
pub struct Orphans {
    pub members: Vec<(String, String, String, String)>,
    pub channels: Vec<(String, String, String)>,
}

/// Where the cluster's presence is recorded (see the module doc): entries per node, each
/// change decided atomically with its key's other nodes' entries, and the notices it causes
/// sent with it, so every node hears each once.
#[async_trait::async_trait]
pub trait PresenceRecord: Send + Sync + 'static {
    /// Records `node` as alive, with heartbeat `beat` (the cluster's time now, in
    /// milliseconds: see [`ClusterPresence`]'s clock).
    async fn register(&self, node: &str, beat: i64) -> Result<(), ClusterPresenceError>;

    /// Renews `node`'s heartbeat to `beat` (as for `register`); `false` if it was not
    /// registered (taken for dead).
    async fn heartbeat(&self, node: &str, beat: i64) -> Result<bool, ClusterPresenceError>;

    /// `node` holds `user_id` in `channel`. `true` if that made the user a member of the
    /// cluster (no node held it, this one included); then `member_added` has been announced,
    /// the socket `except` excepted.
    async fn join(
        &self,
        node: &str,
        app: &str,
        channel: &str,
        user_id: &str,
        info: Option<&str>,
        except: Option<&str>,
    ) -> Result<bool, ClusterPresenceError>;

    /// `node` no longer holds `user_id`. `true` if no node holds it now (it did); then
    /// `member_removed` has been announced in the name of `deciding`.
    async fn leave(
        &self,
        node: &str,
        deciding: &str,
        app: &str,
        channel: &str,
        user_id: &str,
    ) -> Result<bool, ClusterPresenceError>;

    /// `node` has `subscriptions` in `channel`. `true` if that made the channel occupied in
    /// the cluster.
    async fn occupy(
        &self,
        node: &str,
        app: &str,
        channel: &str,
        subscriptions: i64,
    ) -> Result<bool, ClusterPresenceError>;

    /// `node` has no subscriber in `channel` any more. `true` if no node has one now (it did).
    async fn vacate(
        &self,
        node: &str,
        app: &str,
        channel: &str,
    ) -> Result<bool, ClusterPresenceError>;

    /// `node`'s subscription counts, (app, channel, count), for channels it occupies.
    async fn write_counts(
        &self,
        node: &str,
        counts: &[(String, String, i64)],
    ) -> Result<(), ClusterPresenceError>;

    /// What `node` holds.
    async fn held_by(&self, node: &str) -> Result<Held, ClusterPresenceError>;

    /// Registered nodes whose heartbeat is older than `cutoff_millis` (Unix milliseconds),
    /// with that heartbeat. Reads only: a sweep expires a node once two of its rounds saw it
    /// stale with the same heartbeat (see [`ClusterPresence::sweep`]).
    async fn stale_nodes(
        &self,
        cutoff_millis: i64,
    ) -> Result<Vec<(String, i64)>, ClusterPresenceError>;

    /// Unregisters nodes whose heartbeat is older than `cutoff_millis` (Unix milliseconds);
    /// returns them.
    async fn expire_nodes(&self, cutoff_millis: i64) -> Result<Vec<String>, ClusterPresenceError>;

    /// Unregisters `node` (a graceful stop).
    async fn forget_node(&self, node: &str) -> Result<(), ClusterPresenceError>;

    /// At most `limit` members and `limit` channels held by unregistered nodes.
    async fn orphans(&self, limit: i64) -> Result<Orphans, ClusterPresenceError>;

    /// Members of `channel` held by nodes other than `node`, with their `user_info`.
    async fn members_elsewhere(
        &self,
        node: &str,
        app: &str,
        channel: &str,
    ) -> Result<Vec<RemoteMember>, ClusterPresenceError>;

    /// Other nodes' subscription counts per channel starting with `prefix`.
    async fn counts_elsewhere(
        &self,
        node: &str,
        app: &str,
        prefix: &str,
    ) -> Result<Vec<(String, i64)>, ClusterPresenceError>;

    /// Other nodes' (channel, user) members of channels starting with `prefix`.
    async fn users_elsewhere(
        &self,
        node: &str,
        app: &str,
        prefix: &str,
    ) -> Result<Vec<(String, String)>, ClusterPresenceError>;

    /// Other nodes' subscription count (`None`: none there) and presence members of exactly
    /// `channel`. By default from the prefix reads; an engine whose prefix reads scan every
    /// channel of the app (NATS) reads the one channel's record instead.
    async fn channel_elsewhere(
        &self,
        node: &str,
        app: &str,
        channel: &str,
    ) -> Result<(Option<i64>, Vec<String>), ClusterPresenceError> {
        let count = self
            .counts_elsewhere(node, app, channel)
            .await?
            .into_iter()
            .find_map(|(c, n)| (c == channel).then_some(n));
        let users = self
            .users_elsewhere(node, app, channel)
            .await?
            .into_iter()
            .filter_map(|(c, user)| (c == channel).then_some(user))
            .collect();
        Ok((count, users))
    }

    /// A member's `user_info`, for a notice that carried it by reference.
    async fn member_info(
        &self,
        app: &str,
        channel: &str,
        user_id: &str,
    ) -> Result<Option<String>, ClusterPresenceError>;

    /// Sends `notice` to every node.
    async fn announce(&self, notice: Notice) -> Result<(), ClusterPresenceError>;
}

/// The presence record on the engine of `broker_url` when that is Redis or NATS (notices then
/// ride the bus, on `topic`); `None` for any other URL (presence stays in PostgreSQL).
pub async fn record_on_bus(
    broker_url: &str,
    topic: &str,
) -> Result<Option<Arc<dyn PresenceRecord>>, ClusterPresenceError> {
    Ok(if broker_url.starts_with("redis") {
        Some(Arc::new(
            redis::RedisRecord::connect(broker_url, topic).await?,
        ))
    } else if broker_url.starts_with("nats") {
        Some(Arc::new(
            nats::NatsRecord::connect(broker_url, topic).await?,
        ))
    } else {
        None
    })
}

/// The cluster's presence over a [`PresenceRecord`] (see the module doc). [`ClusterPresence::new`]
/// makes the hub share its changes; [`ClusterPresence::register`] before serving, then
/// [`ClusterPresence::run`] once per node.
pub struct ClusterPresence {
    node: String,
    record: Arc<dyn PresenceRecord>,
    hub: Arc<Hub>,
    /// Where this node reports the channel webhooks it decided (the `ChannelWebhooks`).
    webhooks: Arc<dyn ChannelObserver>,
    node_ttl: Duration,
    /// The time heartbeats are written and judged in: the store's clock, which every node
    /// reads alike (see `herald_store::ClusterClock`). A node's own clock running behind the
    /// others' by `node_ttl` made it look dead to them, its members removed while connected.
    clock: ClusterClock,
    changes: Mutex<Option<mpsc::Receiver<Change>>>,
    overflowed: Arc<AtomicBool>,
    progress: Arc<Progress>,
    /// Nodes this node's last sweep found stale, with the heartbeat it read (see `sweep`).
    suspects: Mutex<HashMap<String, i64>>,
    /// Where this node's `terminate_connections` are kept for nodes that miss the notice
    /// ([`crate::terminations`]): the PostgreSQL store's pool.
    terminations: std::sync::OnceLock<sqlx::PgPool>,
}

impl ClusterPresence {
    /// `record` holds the cluster's entries; `webhooks` gets the channel webhooks this node
    /// decides; heartbeats are in `clock`'s time (the store's). Makes `hub` hand its presence
    /// and occupancy changes here.
    pub fn new(
        node: String,
        record: Arc<dyn PresenceRecord>,
        hub: Arc<Hub>,
        webhooks: Arc<dyn ChannelObserver>,
        node_ttl: Duration,
        clock: ClusterClock,
    ) -> Arc<Self> {
        Self::with_capacity(node, record, hub, webhooks, node_ttl, clock, QUEUE_CAPACITY)
    }

    fn with_capacity(
        node: String,
        record: Arc<dyn PresenceRecord>,
        hub: Arc<Hub>,
        webhooks: Arc<dyn ChannelObserver>,
        node_ttl: Duration,
        clock: ClusterClock,
        capacity: usize,
    ) -> Arc<Self> {
        let (sender, receiver) = mpsc::channel(capacity);
        let overflowed = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(Progress::new());
        hub.share_presence(Arc::new(Queue {
            node: node.clone(),
            record: Arc::clone(&record),
            changes: sender,
            overflowed: Arc::clone(&overflowed),
            progress: Arc::clone(&progress),
        }));
        Arc::new(Self {
            node,
            record,
            hub,
            webhooks,
            node_ttl,
            clock,
            changes: Mutex::new(Some(receiver)),
            overflowed,
            progress,
            suspects: Mutex::new(HashMap::new()),
            terminations: std::sync::OnceLock::new(),
        })
    }

    /// Keeps this node's `terminate_connections` in `pool` (the PostgreSQL store's), so a
    /// node that did not hear one applies it once its link is back ([`crate::terminations`]).
    pub fn keep_terminations_in(&self, pool: sqlx::PgPool) {
        let _ = self.terminations.set(pool);
    }

    /// This node's id.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Registers this node; its other entries would be swept without it.
    pub async fn register(&self) -> Result<(), ClusterPresenceError> {
        self.record
            .register(&self.node, self.clock.now().timestamp_millis())
            .await
    }

    /// Applies this node's changes in order, sweeps dead nodes every third of `node_ttl`
    /// (and heartbeats as often, on a task of its own: see [`ClusterPresence::beat`]), and
    /// flushes subscription counts every [`FLUSH_EVERY`], until `stop` (then applies what is
    /// queued and leaves the cluster: this node's remaining rows are removed as leaves) or
    /// `abandon` (then it stops at once, as a killed node would, and the other nodes sweep its
    /// rows).
    pub async fn run(self: Arc<Self>, stop: CancellationToken, abandon: CancellationToken) {
        let Some(mut changes) = self.changes.lock().ok().and_then(|mut c| c.take()) else {
            tracing::error!(node = self.node, "presence: run was started twice");
            return;
        };
        let taken_for_dead = Arc::new(Notify::new());
        // Aborted when this returns (a killed node beats no more).
        let mut beats = AbortOnDropHandle::new(tokio::spawn(
            Arc::clone(&self).beat(Arc::clone(&taken_for_dead)),
        ));
        let mut flushed = Flushed::new();
        // Whether this node's rows may differ from its hub (a change was lost to a full queue
        // or a failed transaction, or the node was taken for dead) until a reconcile succeeds.
        let mut stale = false;
        let mut rounds = tokio::time::interval(self.node_ttl / 3);
        // Whether the last round skipped its sweep (it came late).
        let mut skipped_sweep = false;
        // Rounds at which this node, registered again lately, checks its rows once more.
        let mut recheck = 0_u32;
        rounds.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut flush = tokio::time::interval(FLUSH_EVERY);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut retry = tokio::time::interval(RECONCILE_RETRY);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = abandon.cancelled() => return,
                () = stop.cancelled() => {
                    // No beat after the leave: it would register the node again.
                    beats.abort();
                    let _ = (&mut beats).await;
                    // What is still queued or stale is removed by the leave's sweep: the
                    // connections have closed, so the hub is empty.
                    while !stale && let Ok((app_id, change, number)) = changes.try_recv() {
                        stale = self.apply(&app_id, &change, &mut flushed).await.is_err();
                        if !stale {
                            self.progress.recorded(number);
                        }
                    }
                    self.leave().await;
                    return;
                }
                () = taken_for_dead.notified() => {
                    stale = self.resync(&mut changes, &mut flushed).await.is_none();
                    // A sweep that read this node's rows as a dead node's before it
                    // registered again may still be removing them, after the reconcile
                    // above: reconcile again at the next rounds, until one finds nothing to
                    // repair, for a node_ttl at most (on a busy node the queue's discarded
                    // changes count as repairs too). The first of them a period from now,
                    // not at a round already due: the late sweep is what it looks for.
                    recheck = RECHECK_BEATS;
                    rounds.reset();
                }
                Some((app_id, change, number)) = changes.recv(), if !stale => {
                    stale = self.overflowed.load(Ordering::Acquire)
                        || match self.apply(&app_id, &change, &mut flushed).await {
                            Ok(()) => {
                                self.progress.recorded(number);
                                false
                            }
                            Err(e) => {
                                tracing::warn!(node = self.node, error = %e, ?change, "presence: applying a change failed; this node's rows will be reconciled with its hub");
                                true
                            }
                        };
                    if stale {
                        stale = self.resync(&mut changes, &mut flushed).await.is_none();
                    }
                }
                _ = retry.tick(), if stale => {
                    stale = self.resync(&mut changes, &mut flushed).await.is_none();
                }
                due = rounds.tick() => {
                    let began = tokio::time::Instant::now();
                    if recheck > 0 && !stale {
                        recheck -= 1;
                        match self.resync(&mut changes, &mut flushed).await {
                            Some(0) => recheck = 0,
                            Some(_) => {}
                            None => stale = true,
                        }
                    }
                    // A round that comes more than a period late (this node was held up, or
                    // busy with its changes) skips judging the others once: whatever held this
                    // node up (an overloaded host) may have held them up too, and their beats,
                    // overdue, come within the period. The next round sweeps however late it
                    // is, so dead nodes still go within two periods more.
                    if due.elapsed() > self.node_ttl / 3 && !skipped_sweep {
                        skipped_sweep = true;
                        tracing::info!(node = self.node, late = ?due.elapsed(), "presence: this node's sweep round came late; not sweeping other nodes this round");
                    } else {
                        skipped_sweep = false;
                        if let Err(e) = self.sweep().await {
                            tracing::warn!(node = self.node, error = %e, "presence: sweeping dead nodes failed");
                        }
                    }
                    if began.elapsed() > self.node_ttl / 3 {
                        tracing::warn!(node = self.node, took = ?began.elapsed(), "presence: a sweep round took longer than a heartbeat period");
                    }
                }
                _ = flush.tick() => {
                    if let Err(e) = self.flush(&mut flushed).await {
                        tracing::warn!(node = self.node, error = %e, "presence: writing subscription counts failed");
                    }
                }
            }
        }
    }

    /// Discards what is queued and reconciles this node's rows with its hub; how many rows it
    /// repaired, or `None` if it failed (the caller tries again after [`RECONCILE_RETRY`]).
    ///
    /// Order matters: the overflow mark is cleared first, then the queue emptied, then the hub
    /// read. Every discarded change happened before the read, so the read reflects it; a change
    /// lost to a full queue after the mark was cleared marks it again.
    async fn resync(
        &self,
        changes: &mut mpsc::Receiver<Change>,
        flushed: &mut Flushed,
    ) -> Option<usize> {
        self.overflowed.store(false, Ordering::Release);
        // Every change numbered so far is in the hub as it is read below.
        let through = self.progress.queued();
        let mut discarded = 0_usize;
        while changes.try_recv().is_ok() {
            discarded += 1;
        }
        match self.reconcile(flushed).await {
            Ok(repaired) => {
                self.progress.recorded(through);
                tracing::info!(
                    node = self.node,
                    discarded,
                    repaired,
                    "presence: this node's rows were reconciled with its hub"
                );
                Some(repaired)
            }
            Err(e) => {
                tracing::warn!(node = self.node, error = %e, "presence: reconciling this node's rows failed; retrying");
                None
            }
        }
    }

    /// Makes this node's rows match its hub: channels and members the hub has and the rows
    /// lack are added, rows the hub no longer has are removed, each as the change it stands
    /// for (so the cluster reports what it had not seen, once). Returns how many rows changed.
    async fn reconcile(&self, flushed: &mut Flushed) -> Result<usize, ClusterPresenceError> {
        let Held {
            members: stored_members,
            channels: stored_channels,
        } = self.record.held_by(&self.node).await?;
        let mut changes: Vec<(AppId, LocalChange)> = Vec::new();
        let mut held_members = HashSet::new();
        let mut held_channels = HashSet::new();
        for app in self.hub.apps() {
            let app_id = app.app_id().clone();
            for (channel, _) in app.channels("") {
                let key = (app_id.as_str().to_owned(), channel.clone());
                if stored_channels.contains(&key) {
                    // Its count may have changed while queued changes were discarded.
                    flushed.insert(key.clone(), -1);
                } else {
                    changes.push((
                        app_id.clone(),
                        LocalChange::Occupied {
                            channel: channel.clone(),
                        },
                    ));
                }
                held_channels.insert(key);
                for (user_id, info) in app.members(&channel) {
                    let key = (app_id.as_str().to_owned(), channel.clone(), user_id);
                    if !stored_members.contains(&key) {
                        changes.push((
                            app_id.clone(),
                            LocalChange::Joined {
                                channel: channel.clone(),
                                user_id: key.2.clone(),
                                info,
                                socket_id: String::new(),
                            },
                        ));
                    }
                    held_members.insert(key);
                }
            }
        }
        for (app, channel, user_id) in stored_members.difference(&held_members) {
            if let Ok(app_id) = AppId::parse(app) {
                let (channel, user_id) = (channel.clone(), user_id.clone());
                changes.push((app_id, LocalChange::Left { channel, user_id }));
            }
        }
        for (app, channel) in stored_channels.difference(&held_channels) {
            if let Ok(app_id) = AppId::parse(app) {
                let channel = channel.clone();
                changes.push((app_id, LocalChange::Vacated { channel }));
            }
        }
        // Every change is tried, and the first failure reported after them (the caller tries
        // the reconcile again): one that fails every time (a NATS record past the server's
        // max_payload) must not hold back the joins and leaves behind it, or users who left
        // stay members across the cluster for as long as it fails.
        let mut failed = None;
        for (app_id, change) in &changes {
            if let Err(e) = self.apply(app_id, change, flushed).await {
                tracing::warn!(node = self.node, error = %e, ?change, "presence: a change of the reconcile failed; the others go on");
                failed.get_or_insert(e);
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(changes.len()),
        }
    }

    /// One change of this node, decided for the cluster (see the module doc).
    async fn apply(
        &self,
        app_id: &AppId,
        change: &LocalChange,
        flushed: &mut Flushed,
    ) -> Result<(), ClusterPresenceError> {
        let app = app_id.as_str();
        let (event, cluster) = match change {
            LocalChange::Joined {
                channel,
                user_id,
                info,
                socket_id,
            } => {
                let except = (!socket_id.is_empty()).then_some(socket_id.as_str());
                let cluster = self
                    .record
                    .join(&self.node, app, channel, user_id, info.as_deref(), except)
                    .await?;
                let (channel, user_id) = (channel.clone(), user_id.clone());
                (ChannelEvent::MemberAdded { channel, user_id }, cluster)
            }
            LocalChange::Left { channel, user_id } => {
                let cluster = self
                    .record
                    .leave(&self.node, &self.node, app, channel, user_id)
                    .await?;
                let (channel, user_id) = (channel.clone(), user_id.clone());
                (ChannelEvent::MemberRemoved { channel, user_id }, cluster)
            }
            LocalChange::Occupied { channel } => {
                let count = self
                    .hub
                    .existing(app_id)
                    .and_then(|a| a.channel_info(channel))
                    .map_or(1, |i| {
                        i64::try_from(i.subscription_count).unwrap_or(i64::MAX)
                    });
                let cluster = self.record.occupy(&self.node, app, channel, count).await?;
                flushed.insert((app.to_owned(), channel.clone()), count);
                let channel = channel.clone();
                (ChannelEvent::Occupied { channel }, cluster)
            }
            LocalChange::Vacated { channel } => {
                flushed.remove(&(app.to_owned(), channel.clone()));
                let cluster = self.record.vacate(&self.node, app, channel).await?;
                let channel = channel.clone();
                (ChannelEvent::Vacated { channel }, cluster)
            }
        };
        if cluster {
            self.webhooks.observe(app_id, event);
        }
        Ok(())
    }

    /// Heartbeats every third of `node_ttl` until aborted, on a task of its own, whatever
    /// [`ClusterPresence::run`] is doing: a node applying a long queue of changes (a herd of
    /// clients reconnecting to it) or reconciling thousands of rows is alive, and with its
    /// beat queued behind that work the other nodes took it for dead and swept its members,
    /// announced as leaves, while their clients were still connected. Tells `taken_for_dead`
    /// when a beat found this node gone (it registered again), for `run` to reconcile.
    async fn beat(self: Arc<Self>, taken_for_dead: Arc<Notify>) {
        let period = self.node_ttl / 3;
        let mut every = tokio::time::interval(period);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let began = tokio::time::Instant::now();
            if !self.heartbeat().await {
                taken_for_dead.notify_one();
            }
            // A slow beat delays the next: worth knowing before the other nodes take this one
            // for dead.
            if began.elapsed() > period {
                tracing::warn!(node = self.node, took = ?began.elapsed(), "presence: a heartbeat took longer than a heartbeat period");
            }
        }
    }

    /// Renews this node's heartbeat; `false` if this node's rows must be reconciled: a node
    /// found missing was taken for dead (it paused longer than `node_ttl`) and its rows were
    /// swept as leaves, so it registers again and the reconcile writes what its hub holds,
    /// announcing it anew.
    async fn heartbeat(&self) -> bool {
        match self
            .record
            .heartbeat(&self.node, self.clock.now().timestamp_millis())
            .await
        {
            Ok(true) => {
                tracing::trace!(node = self.node, "presence: heartbeat");
                true
            }
            Ok(false) => {
                tracing::error!(
                    node = self.node,
                    "presence: this node was taken for dead (no heartbeat within node_ttl); registering again"
                );
                if let Err(e) = self.register().await {
                    tracing::warn!(node = self.node, error = %e, "presence: registering again failed");
                }
                false
            }
            Err(e) => {
                tracing::warn!(node = self.node, error = %e, "presence: heartbeat failed");
                true
            }
        }
    }

    /// Deletes nodes whose heartbeat is older than `node_ttl` in this sweep and was so, the
    /// same heartbeat, in this node's sweep before; then removes rows whose node is gone, each
    /// as a leave (reported once, by whichever sweeper removes the last row). Returns how many
    /// rows it removed.
    ///
    /// Why two sweeps: a node found stale may share this host and have been held up with this
    /// node (an overloaded host, a paused VM), its overdue beat on its way. Between two sweeps
    /// this node ran, so a node of its host ran too and beat; one whose beat is still the same
    /// has stopped. That costs a heartbeat period more before a dead node goes.
    pub async fn sweep(&self) -> Result<usize, ClusterPresenceError> {
        let cutoff = self.clock.now().timestamp_millis()
            - i64::try_from(self.node_ttl.as_millis()).unwrap_or(i64::MAX);
        let stale = self.record.stale_nodes(cutoff).await?;
        if !stale.is_empty() {
            tracing::debug!(
                node = self.node,
                cutoff,
                ?stale,
                "presence: nodes whose heartbeat is older than node_ttl"
            );
        }
        // The newest heartbeat among nodes stale in both sweeps. Expiring the nodes whose beat
        // is no newer expires only those: any such node was older than the last sweep's
        // cutoff then too, so it was stale in both (its beat unchanged, or it would be newer).
        let confirmed_through = {
            let mut suspects = self.suspects.lock().unwrap_or_else(|p| p.into_inner());
            let confirmed = stale
                .iter()
                .filter(|(node, beat)| suspects.get(node) == Some(beat))
                .map(|(_, beat)| *beat)
                .max();
            *suspects = stale.into_iter().collect();
            confirmed
        };
        let dead = match confirmed_through {
            Some(beat) => self.record.expire_nodes(beat.saturating_add(1)).await?,
            None => Vec::new(),
        };
        for node in &dead {
            tracing::warn!(
                node = self.node,
                dead = node,
                through = ?confirmed_through,
                "presence: a node stopped heartbeating; removing its members"
            );
        }
        let mut orphans = self.record.orphans(SWEEP_LIMIT).await?;
        // Never this node's own rows: it is alive, and its beat (on a task of its own, which
        // may register it again at this very moment) then reconciles them. Swept here, its
        // members were announced as leaving and then joining again.
        orphans.members.retain(|(node, ..)| *node != self.node);
        orphans.channels.retain(|(node, ..)| *node != self.node);
        let removed = orphans.members.len() + orphans.channels.len();
        for (node, app, channel, user_id) in orphans.members {
            if self
                .record
                .leave(&node, &self.node, &app, &channel, &user_id)
                .await?
                && let Ok(app_id) = AppId::parse(&app)
            {
                self.webhooks
                    .observe(&app_id, ChannelEvent::MemberRemoved { channel, user_id });
            }
        }
        for (node, app, channel) in orphans.channels {
            if self.record.vacate(&node, &app, &channel).await?
                && let Ok(app_id) = AppId::parse(&app)
            {
                self.webhooks
                    .observe(&app_id, ChannelEvent::Vacated { channel });
            }
        }
        Ok(removed)
    }

    /// A graceful stop, after this node's connections closed and their leaves were applied:
    /// deletes the node, and anything it still held leaves as a dead node's would.
    async fn leave(&self) {
        let left = async {
            self.record.forget_node(&self.node).await?;
            self.sweep().await
        };
        if let Err(e) = left.await {
            tracing::warn!(node = self.node, error = %e, "presence: leaving the cluster failed; the other nodes sweep this node's rows");
        }
    }

    /// Writes the subscription counts that changed since the last flush, in one statement.
    async fn flush(&self, flushed: &mut Flushed) -> Result<(), ClusterPresenceError> {
        let mut counts = Vec::new();
        for app in self.hub.apps() {
            for (channel, info) in app.channels("") {
                let key = (app.app_id().as_str().to_owned(), channel);
                let count = i64::try_from(info.subscription_count).unwrap_or(i64::MAX);
                // A channel not in `flushed` has its occupancy still queued: that writes it.
                if let Some(known) = flushed.get_mut(&key)
                    && *known != count
                {
                    *known = count;
                    counts.push((key.0, key.1, count));
                }
            }
        }
        if counts.is_empty() {
            return Ok(());
        }
        self.record.write_counts(&self.node, &counts).await
    }

    /// Other nodes' subscription counts per channel whose name starts with `prefix`.
    async fn counts_elsewhere(
        &self,
        app_id: &AppId,
        prefix: &str,
    ) -> Result<BTreeMap<String, usize>, ClusterPresenceError> {
        let rows = read_again_once(|| {
            self.record
                .counts_elsewhere(&self.node, app_id.as_str(), prefix)
        })
        .await?;
        Ok(rows
            .into_iter()
            .map(|(c, n)| (c, usize::try_from(n).unwrap_or(0)))
            .collect())
    }

    /// Other nodes' presence members per channel whose name starts with `prefix`.
    async fn users_elsewhere(
        &self,
        app_id: &AppId,
        prefix: &str,
    ) -> Result<BTreeMap<String, BTreeSet<String>>, ClusterPresenceError> {
        let rows = read_again_once(|| {
            self.record
                .users_elsewhere(&self.node, app_id.as_str(), prefix)
        })
        .await?;
        let mut users: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (channel, user) in rows {
            users.entry(channel).or_default().insert(user);
        }
        Ok(users)
    }

    /// Every node's channels starting with `prefix` (exactly `prefix` when `exact`).
    async fn merged(
        &self,
        app_id: &AppId,
        prefix: &str,
        exact: bool,
    ) -> Result<Vec<(String, ChannelInfo)>, ClusterPresenceError> {
        let (mut counts, mut users) = if exact {
            let (count, members) = read_again_once(|| {
                self.record
                    .channel_elsewhere(&self.node, app_id.as_str(), prefix)
            })
            .await?;
            let counts: BTreeMap<String, usize> = count
                .map(|n| (prefix.to_owned(), usize::try_from(n).unwrap_or(0)))
                .into_iter()
                .collect();
            let mut users: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            if !members.is_empty() {
                users.insert(prefix.to_owned(), members.into_iter().collect());
            }
            (counts, users)
        } else {
            (
                self.counts_elsewhere(app_id, prefix).await?,
                self.users_elsewhere(app_id, prefix).await?,
            )
        };
        if let Some(app) = self.hub.existing(app_id) {
            for (channel, info) in app.channels(prefix) {
                *counts.entry(channel.clone()).or_default() += info.subscription_count;
                if info.user_count.is_some() {
                    users
                        .entry(channel.clone())
                        .or_default()
                        .extend(app.users(&channel));
                }
            }
        }
        Ok(counts
            .into_iter()
            .filter(|(channel, _)| !exact || channel == prefix)
            .map(|(channel, subscription_count)| {
                let user_count = users.get(&channel).map(BTreeSet::len).filter(|n| *n > 0);
                (
                    channel,
                    ChannelInfo {
                        subscription_count,
                        user_count,
                    },
                )
            })
            .collect())
    }
}

/// Reads from the record, and once more if that failed: an engine's client notices a
/// connection the server dropped (a restarted Redis) by failing one command, then reconnects.
/// (Changes are not retried here: a failed one makes the node reconcile.)
async fn read_again_once<T, F, Fut>(read: F) -> Result<T, ClusterPresenceError>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<T, ClusterPresenceError>>,
{
    match read().await {
        Ok(value) => Ok(value),
        Err(e) => {
            tracing::debug!(error = %e, "presence: reading the record failed; once more");
            read().await
        }
    }
}

#[async_trait::async_trait]
impl PresenceManager for ClusterPresence {
    async fn channel_info(
        &self,
        app_id: &AppId,
        channel: &str,
    ) -> Result<Option<ChannelInfo>, PresenceError> {
        Ok(self
            .merged(app_id, channel, true)
            .await?
            .into_iter()
            .next()
            .map(|(_, info)| info))
    }

    async fn channels(
        &self,
        app_id: &AppId,
        prefix: &str,
    ) -> Result<Vec<(String, ChannelInfo)>, PresenceError> {
        Ok(self.merged(app_id, prefix, false).await?)
    }

    async fn users(&self, app_id: &AppId, channel: &str) -> Result<Vec<String>, PresenceError> {
        let mut users: BTreeSet<String> = read_again_once(|| {
            self.record
                .members_elsewhere(&self.node, app_id.as_str(), channel)
        })
        .await?
        .into_iter()
        .map(|(user_id, _)| user_id)
        .collect();
        if let Some(app) = self.hub.existing(app_id) {
            users.extend(app.users(channel));
        }
        Ok(users.into_iter().collect())
    }

    /// Closes the user's connections here at once and asks every other node to (a notice
    /// each hears); returns how many closed here. The termination is kept for nodes that do
    /// not hear the notice ([`crate::terminations`]): failing to keep it is logged, as the
    /// nodes that hear the notice still apply it.
    async fn terminate_user(&self, app_id: &AppId, user_id: &str) -> Result<usize, PresenceError> {
        let at = self.clock.now().timestamp_millis();
        let closed = self
            .hub
            .existing(app_id)
            .map_or(0, |app| app.terminate_user(user_id));
        if let Some(pool) = self.terminations.get() {
            let kept = tokio::time::timeout(
                crate::terminations::KEEP_PATIENCE,
                crate::terminations::remember(pool, app_id.as_str(), user_id, at),
            )
            .await;
            if !matches!(kept, Ok(Ok(()))) {
                tracing::warn!(node = self.node, outcome = ?kept, "presence: keeping a termination for nodes that miss its notice failed; the nodes that hear the notice still apply it");
            }
        }
        let notice = Notice::member(
            NoticeKind::Terminate,
            &self.node,
            app_id.as_str(),
            "",
            user_id,
        );
        self.record.announce(notice).await?;
        Ok(closed)
    }
}

#[cfg(test)]
mod tests {
    //! Against real servers: `HERALD_TEST_POSTGRES_URL` names the PostgreSQL one (each test
    //! works in a throwaway schema of its own), `HERALD_TEST_REDIS_URL` the Redis one and
    //! `HERALD_TEST_NATS_URL` the NATS one, with JetStream (each test works under a topic, and
    //! on NATS a bucket, of its own). The tests that hold for every record run once per record,
    //! each skipped when its server is not named.

    use chrono::Utc;

    use super::*;
    use crate::test_schema::Schema;
    use sqlx::PgPool;

    /// Where a test's record lives.
    enum Backend {
        Postgres { schema: Schema, pool: PgPool },
        Redis { url: String, topic: String },
        Nats { url: String, topic: String },
    }

    impl Backend {
        /// A fresh schema; `None` (and a line saying why) when skipped.
        async fn postgres(test: &str) -> Option<Self> {
            let schema = Schema::create(test).await?;
            let pool = schema.pool().await;
            Some(Self::Postgres { schema, pool })
        }

        /// A fresh topic; `None` (and a line saying why) when skipped.
        fn redis(test: &str) -> Option<Self> {
            let Ok(url) = std::env::var("HERALD_TEST_REDIS_URL") else {
                herald_test_support::skip!("{test}: HERALD_TEST_REDIS_URL is unset");
                return None;
            };
            let topic = format!("herald.test.{}", crate::new_node_id());
            Some(Self::Redis { url, topic })
        }

        /// A fresh topic (and so a fresh bucket); `None` (and a line saying why) when skipped.
        fn nats(test: &str) -> Option<Self> {
            let url = crate::test_nats_url(test)?;
            let topic = format!("herald.test.{}", crate::new_node_id());
            Some(Self::Nats { url, topic })
        }

        /// The payloads published on the topic, from now on.
        async fn notices(
            &self,
        ) -> std::pin::Pin<Box<dyn futures_util::Stream<Item = Vec<u8>> + Send>> {
            use futures_util::StreamExt;
            match self {
                Self::Redis { url, topic } => {
                    let mut pubsub = ::redis::Client::open(url.as_str())
                        .expect("url")
                        .get_async_pubsub()
                        .await
                        .expect("pubsub");
                    pubsub.subscribe(topic).await.expect("subscribe");
                    Box::pin(
                        pubsub
                            .into_on_message()
                            .map(|m| m.get_payload_bytes().to_vec()),
                    )
                }
                Self::Nats { url, topic } => {
                    let client = async_nats::connect(url.as_str()).await.expect("connect");
                    let subscriber = client.subscribe(topic.clone()).await.expect("subscribe");
                    client.flush().await.expect("flush");
                    Box::pin(subscriber.map(|m| m.payload.to_vec()))
                }
                Self::Postgres { .. } => panic!("a Redis or NATS test"),
            }
        }

        async fn nats_bucket(url: &str, topic: &str) -> async_nats::jetstream::kv::Store {
            let client = async_nats::connect(url).await.expect("connect");
            async_nats::jetstream::new(client)
                .get_key_value(nats::bucket_name(topic))
                .await
                .expect("bucket")
        }

        async fn record(&self) -> Arc<dyn PresenceRecord> {
            match self {
                Self::Postgres { pool, .. } => {
                    Arc::new(postgres::PostgresRecord::new(pool.clone()))
                }
                Self::Redis { url, topic } => Arc::new(
                    redis::RedisRecord::connect(url, topic)
                        .await
                        .expect("connect"),
                ),
                Self::Nats { url, topic } => Arc::new(
                    nats::NatsRecord::connect(url, topic)
                        .await
                        .expect("connect"),
                ),
            }
        }

        fn pool(&self) -> &PgPool {
            match self {
                Self::Postgres { pool, .. } => pool,
                Self::Redis { .. } | Self::Nats { .. } => panic!("a PostgreSQL test"),
            }
        }

        async fn redis_connection(url: &str) -> ::redis::aio::ConnectionManager {
            ::redis::Client::open(url)
                .expect("url")
                .get_connection_manager()
                .await
                .expect("connect")
        }

        /// Makes `node`'s last heartbeat older than any `node_ttl`.
        async fn age(&self, node: &str) {
            match self {
                Self::Postgres { pool, .. } => {
                    sqlx::query("UPDATE cluster_nodes SET heartbeat_at = 0 WHERE node_id = $1")
                        .bind(node)
                        .execute(pool)
                        .await
                        .expect("age");
                }
                Self::Redis { url, topic } => {
                    ::redis::cmd("ZADD")
                        .arg(format!("herald:{{{topic}}}:nodes"))
                        .arg("XX")
                        .arg(0)
                        .arg(node)
                        .query_async::<()>(&mut Self::redis_connection(url).await)
                        .await
                        .expect("age");
                }
                Self::Nats { url, topic } => {
                    let bucket = Self::nats_bucket(url, topic).await;
                    let key = format!(
                        "n.{}",
                        base64::Engine::encode(
                            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                            node
                        )
                    );
                    bucket
                        .put(key, r#"{"beat":0,"dead":false}"#.into())
                        .await
                        .expect("age");
                }
            }
        }

        /// Removes what the test wrote (best effort on Redis).
        async fn drop_now(self) {
            match self {
                Self::Postgres { schema, .. } => schema.drop_now().await,
                Self::Redis { url, topic } => {
                    let mut connection = Self::redis_connection(&url).await;
                    let mut cursor = 0_u64;
                    loop {
                        let Ok((next, keys)) = ::redis::cmd("SCAN")
                            .arg(cursor)
                            .arg("MATCH")
                            .arg(format!("herald:{{{topic}}}:*"))
                            .arg("COUNT")
                            .arg(1000)
                            .query_async::<(u64, Vec<String>)>(&mut connection)
                            .await
                        else {
                            return;
                        };
                        if !keys.is_empty() {
                            let _ = ::redis::cmd("DEL")
                                .arg(keys)
                                .query_async::<()>(&mut connection)
                                .await;
                        }
                        if next == 0 {
                            return;
                        }
                        cursor = next;
                    }
                }
                Self::Nats { url, topic } => {
                    let client = async_nats::connect(url.as_str()).await.expect("connect");
                    let _ = async_nats::jetstream::new(client)
                        .delete_stream(format!("KV_{}", nats::bucket_name(&topic)))
                        .await;
                }
            }
        }
    }

    /// A record that only tells the order of heartbeats, sweeps and occupancy changes, and
    /// holds a change back when told to (a slow database, a node with a long queue).
    struct Rounds {
        events: mpsc::UnboundedSender<&'static str>,
        slow_changes: Mutex<Vec<Duration>>,
        /// What the record says the node holds.
        held: Mutex<Held>,
        /// A user whose join fails every time.
        refused_user: Option<&'static str>,
    }

    #[async_trait::async_trait]
    impl PresenceRecord for Rounds {
        async fn register(&self, _: &str, _: i64) -> Result<(), ClusterPresenceError> {
            Ok(())
        }
        async fn heartbeat(&self, _: &str, _: i64) -> Result<bool, ClusterPresenceError> {
            let _ = self.events.send("beat");
            Ok(true)
        }
        async fn join(
            &self,
            _: &str,
            _: &str,
            _: &str,
            user_id: &str,
            _: Option<&str>,
            _: Option<&str>,
        ) -> Result<bool, ClusterPresenceError> {
            if self.refused_user == Some(user_id) {
                let _ = self.events.send("join refused");
                return Err(ClusterPresenceError::Record(
                    "maximum payload exceeded".into(),
                ));
            }
            let _ = self.events.send("join");
            Ok(true)
        }
        async fn leave(
            &self,
            _: &str,
            _: &str,
            _: &str,
            _: &str,
            _: &str,
        ) -> Result<bool, ClusterPresenceError> {
            let _ = self.events.send("leave");
            Ok(true)
        }
        async fn occupy(
            &self,
            _: &str,
            _: &str,
            _: &str,
            _: i64,
        ) -> Result<bool, ClusterPresenceError> {
            let held = self.slow_changes.lock().expect("lock").pop();
            if let Some(held) = held {
                tokio::time::sleep(held).await;
            }
            let _ = self.events.send("occupy");
            Ok(true)
        }
        async fn vacate(&self, _: &str, _: &str, _: &str) -> Result<bool, ClusterPresenceError> {
            Ok(true)
        }
        async fn write_counts(
            &self,
            _: &str,
            _: &[(String, String, i64)],
        ) -> Result<(), ClusterPresenceError> {
            Ok(())
        }
        async fn held_by(&self, _: &str) -> Result<Held, ClusterPresenceError> {
            let held = self.held.lock().expect("lock");
            Ok(Held {
                members: held.members.clone(),
                channels: held.channels.clone(),
            })
        }
        async fn stale_nodes(&self, _: i64) -> Result<Vec<(String, i64)>, ClusterPresenceError> {
            let _ = self.events.send("sweep");
            Ok(Vec::new())
        }
        async fn expire_nodes(&self, _: i64) -> Result<Vec<String>, ClusterPresenceError> {
            Ok(Vec::new())
        }
        async fn forget_node(&self, _: &str) -> Result<(), ClusterPresenceError> {
            Ok(())
        }
        async fn orphans(&self, _: i64) -> Result<Orphans, ClusterPresenceError> {
            Ok(Orphans::default())
        }
        async fn members_elsewhere(
            &self,
            _: &str,
            _: &str,
            _: &str,
        ) -> Result<Vec<RemoteMember>, ClusterPresenceError> {
            Ok(Vec::new())
        }
        async fn counts_elsewhere(
            &self,
            _: &str,
            _: &str,
            _: &str,
        ) -> Result<Vec<(String, i64)>, ClusterPresenceError> {
            Ok(Vec::new())
        }
        async fn users_elsewhere(
            &self,
            _: &str,
            _: &str,
            _: &str,
        ) -> Result<Vec<(String, String)>, ClusterPresenceError> {
            Ok(Vec::new())
        }
        async fn member_info(
            &self,
            _: &str,
            _: &str,
            _: &str,
        ) -> Result<Option<String>, ClusterPresenceError> {
            Ok(None)
        }
        async fn announce(&self, _: Notice) -> Result<(), ClusterPresenceError> {
            Ok(())
        }
    }

    /// Node "a" over a [`Rounds`] record with a `node_ttl` of 3 s, running; its hub, the
    /// record, the events it tells and the token that stops it.
    fn node_over_rounds() -> (
        Arc<Hub>,
        Arc<Rounds>,
        mpsc::UnboundedReceiver<&'static str>,
        CancellationToken,
        tokio::task::JoinHandle<()>,
    ) {
        node_over(Rounds::new)
    }

    impl Rounds {
        fn new(events: mpsc::UnboundedSender<&'static str>) -> Self {
            Self {
                events,
                slow_changes: Mutex::new(Vec::new()),
                held: Mutex::new(Held::default()),
                refused_user: None,
            }
        }
    }

    /// Node "a" over the record `make` builds, as [`node_over_rounds`].
    fn node_over(
        make: impl FnOnce(mpsc::UnboundedSender<&'static str>) -> Rounds,
    ) -> (
        Arc<Hub>,
        Arc<Rounds>,
        mpsc::UnboundedReceiver<&'static str>,
        CancellationToken,
        tokio::task::JoinHandle<()>,
    ) {
        let (events, seen) = mpsc::unbounded_channel();
        let record = Arc::new(make(events));
        let hub = Arc::new(Hub::default());
        let presence = ClusterPresence::new(
            "a".into(),
            Arc::clone(&record) as _,
            Arc::clone(&hub),
            Arc::new(Reports::default()) as _,
            Duration::from_secs(3),
            ClusterClock::default(),
        );
        let stop = CancellationToken::new();
        let running = tokio::spawn(presence.run(stop.clone(), CancellationToken::new()));
        (hub, record, seen, stop, running)
    }

    /// A node whose round comes more than a heartbeat period late (here: busy with slow
    /// changes) does not judge the others in that round (they may have been held up with it,
    /// their beats overdue), and does in the next however late that one is: a node on an
    /// overloaded host is not taken for dead for a pause its judge shared, and dead nodes are
    /// still swept.
    #[tokio::test(start_paused = true)]
    async fn a_round_that_comes_late_skips_its_sweep_once() {
        let period = Duration::from_secs(1);
        let (hub, record, mut seen, stop, running) = node_over_rounds();
        let app = AppId::parse("app_1").expect("valid");
        // The rounds' events; beats run on a task of their own and are left out here.
        let mut next = async || loop {
            match seen.recv().await.expect("an event") {
                "beat" => continue,
                event => return event,
            }
        };
        // On time: every round sweeps.
        for _ in 0..2 {
            assert_eq!(next().await, "sweep");
        }
        // A change that holds the node up past its next round: that round, late, skips.
        record
            .slow_changes
            .lock()
            .expect("lock")
            .push(period * 2 + period / 2);
        subscribe(&hub, &app, "c1", None, "1.1");
        assert_eq!(next().await, "occupy");
        // Another, after the skipped round: the round after it is late too, and sweeps.
        record
            .slow_changes
            .lock()
            .expect("lock")
            .push(period * 2 + period / 2);
        subscribe(&hub, &app, "c2", None, "1.2");
        assert_eq!(next().await, "occupy", "no sweep in the first late round");
        assert_eq!(next().await, "sweep", "the second late round sweeps");
        assert_eq!(next().await, "sweep", "then on time");
        stop.cancel();
        running.await.expect("run");
    }

    /// A change that fails every time (a NATS record past the server's max_payload) leaves the
    /// node reconciling, and each reconcile still applies the changes behind it: here a member
    /// the record holds but the hub does not leaves, though another's join keeps failing.
    #[tokio::test(start_paused = true)]
    async fn a_change_that_always_fails_holds_back_none_behind_it() {
        let app = AppId::parse("app_1").expect("valid");
        let (hub, _record, mut seen, stop, running) = node_over(|events| {
            let mut held = Held::default();
            held.members.insert((
                app.as_str().to_owned(),
                "presence-x".to_owned(),
                "gone".to_owned(),
            ));
            held.channels
                .insert((app.as_str().to_owned(), "presence-x".to_owned()));
            Rounds {
                held: Mutex::new(held),
                refused_user: Some("u1"),
                ..Rounds::new(events)
            }
        });
        subscribe(&hub, &app, "presence-x", Some("u1"), "1.1");
        // The queued join fails, then the reconcile tries it again and goes on to the leave
        // of the member the hub no longer has.
        let mut events = Vec::new();
        while !events.contains(&"leave") {
            match seen.recv().await.expect("an event") {
                "beat" | "sweep" => {}
                event => events.push(event),
            }
            assert!(events.len() < 20, "no leave: {events:?}");
        }
        assert!(
            events.iter().filter(|e| **e == "join refused").count() >= 2,
            "the reconcile tried the join again: {events:?}"
        );
        stop.cancel();
        running.await.expect("run");
    }

    /// A node busy applying a long queue of changes (a herd of clients reconnecting to it)
    /// still beats every period: with its beat queued behind the changes, the other nodes took
    /// it for dead and swept its members while their clients were still connected.
    #[tokio::test(start_paused = true)]
    async fn a_node_busy_with_its_changes_still_beats() {
        let (hub, record, mut seen, stop, running) = node_over_rounds();
        let app = AppId::parse("app_1").expect("valid");
        record
            .slow_changes
            .lock()
            .expect("lock")
            .extend([Duration::from_secs(1); 10]);
        for n in 0..10 {
            subscribe(&hub, &app, &format!("c{n}"), None, &format!("1.{n}"));
        }
        // From the first change's end to the last's: nine seconds of nothing but changes.
        let mut beats = None;
        let mut occupied = 0;
        while occupied < 10 {
            match seen.recv().await.expect("an event") {
                "occupy" => {
                    occupied += 1;
                    beats.get_or_insert(0);
                }
                "beat" => {
                    if let Some(beats) = beats.as_mut() {
                        *beats += 1;
                    }
                }
                _ => {}
            }
        }
        let beats = beats.expect("changes applied");
        assert!(
            beats >= 8,
            "{beats} beats in the nine seconds the node spent on its changes"
        );
        stop.cancel();
        running.await.expect("run");
    }

    #[derive(Default)]
    struct Reports(Mutex<Vec<String>>);

    impl ChannelObserver for Reports {
        fn observe(&self, _: &AppId, event: ChannelEvent) {
            let name = format!("{} {}", event.name(), event.user_id().unwrap_or("-"));
            self.0.lock().expect("lock").push(name);
        }
    }

    async fn node(backend: &Backend, name: &str, reports: &Arc<Reports>) -> Arc<ClusterPresence> {
        node_reading(backend, name, reports, ClusterClock::default()).await
    }

    /// A node whose heartbeats are in `clock`'s time.
    async fn node_reading(
        backend: &Backend,
        name: &str,
        reports: &Arc<Reports>,
        clock: ClusterClock,
    ) -> Arc<ClusterPresence> {
        let presence = ClusterPresence::new(
            name.into(),
            backend.record().await,
            Arc::new(Hub::default()),
            Arc::clone(reports) as _,
            Duration::from_secs(15),
            clock,
        );
        presence.register().await.expect("register");
        presence
    }

    fn joined(user: &str) -> LocalChange {
        LocalChange::Joined {
            channel: "presence-x".into(),
            user_id: user.into(),
            info: Some(format!(r#"{{"name":"{user}"}}"#)),
            socket_id: "1.1".into(),
        }
    }

    fn left(user: &str) -> LocalChange {
        LocalChange::Left {
            channel: "presence-x".into(),
            user_id: user.into(),
        }
    }

    fn occupied() -> LocalChange {
        LocalChange::Occupied {
            channel: "presence-x".into(),
        }
    }

    fn vacated() -> LocalChange {
        LocalChange::Vacated {
            channel: "presence-x".into(),
        }
    }

    fn taken(reports: &Reports) -> Vec<String> {
        std::mem::take(&mut *reports.0.lock().expect("lock"))
    }

    /// Nodes "a" and "b" on `backend`, reporting to one list.
    async fn two_nodes(
        backend: &Backend,
    ) -> (Arc<Reports>, Arc<ClusterPresence>, Arc<ClusterPresence>) {
        let reports = Arc::new(Reports::default());
        let a = node(backend, "a", &reports).await;
        let b = node(backend, "b", &reports).await;
        (reports, a, b)
    }

    /// `terminate_connections` on a node is kept in the database, for the nodes that miss
    /// its notice (see [`crate::terminations`]).
    #[tokio::test]
    async fn a_termination_is_kept_for_nodes_that_miss_its_notice() {
        let Some(backend) = Backend::postgres("presence termination kept").await else {
            return;
        };
        let reports = Arc::new(Reports::default());
        // This node reads the cluster's time an hour behind its wall clock (a reading that
        // never met the database's is its own clock's: here, one an hour slow).
        let slow = ClusterClock::reading(|| Utc::now() - chrono::TimeDelta::hours(1));
        let a = node_reading(&backend, "a", &reports, slow).await;
        a.keep_terminations_in(backend.pool().clone());
        let app = AppId::parse("app_1").expect("valid");
        let asked = Utc::now() - chrono::TimeDelta::hours(1);
        a.terminate_user(&app, "u1").await.expect("terminate");
        a.terminate_user(&app, "u1").await.expect("terminate again");
        let kept = crate::terminations::kept(
            backend.pool(),
            &["app_1".to_owned()],
            0,
            asked.timestamp_millis(),
        )
        .await
        .expect("read");
        assert_eq!(kept.len(), 1, "one row per user, the latest: {kept:?}");
        assert_eq!(
            (kept[0].app_id.as_str(), kept[0].user_id.as_str()),
            ("app_1", "u1")
        );
        assert!(
            (kept[0].terminated_at - asked.timestamp_millis()).abs() < 5_000,
            "dated in the cluster's time, not the wall clock's: {kept:?}"
        );
        backend.drop_now().await;
    }

    #[tokio::test]
    async fn a_user_on_two_nodes_is_added_and_removed_once_and_read_from_both() {
        if let Some(backend) = Backend::postgres("presence two nodes").await {
            a_user_on_two_nodes(backend).await;
        }
    }

    #[tokio::test]
    async fn a_user_on_two_nodes_is_added_and_removed_once_and_read_from_both_on_redis() {
        if let Some(backend) = Backend::redis("presence two nodes on redis") {
            a_user_on_two_nodes(backend).await;
        }
    }

    #[tokio::test]
    async fn a_user_on_two_nodes_is_added_and_removed_once_and_read_from_both_on_nats() {
        if let Some(backend) = Backend::nats("presence two nodes on nats") {
            a_user_on_two_nodes(backend).await;
        }
    }

    async fn a_user_on_two_nodes(backend: Backend) {
        let (reports, a, b) = two_nodes(&backend).await;
        let app = AppId::parse("app_1").expect("valid");
        let mut flushed = HashMap::new();
        a.apply(&app, &occupied(), &mut flushed).await.expect("a");
        a.apply(&app, &joined("u1"), &mut flushed).await.expect("a");
        b.apply(&app, &occupied(), &mut flushed).await.expect("b");
        b.apply(&app, &joined("u1"), &mut flushed).await.expect("b");
        b.apply(&app, &joined("u2"), &mut flushed).await.expect("b");
        assert_eq!(
            taken(&reports),
            ["channel_occupied -", "member_added u1", "member_added u2"]
        );
        assert_eq!(
            a.users(&app, "presence-x").await.expect("read"),
            ["u1", "u2"],
            "node a reads node b's rows"
        );
        let info = a
            .channel_info(&app, "presence-x")
            .await
            .expect("read")
            .expect("occupied");
        assert_eq!(
            (info.subscription_count, info.user_count),
            (1, Some(2)),
            "b's count (a's own hub is empty)"
        );
        let mut others = backend
            .record()
            .await
            .members_elsewhere("b", "app_1", "presence-x")
            .await
            .expect("read");
        others.sort();
        assert_eq!(others, [("u1".into(), Some(r#"{"name":"u1"}"#.into()))]);

        a.apply(&app, &left("u1"), &mut flushed).await.expect("a");
        assert_eq!(taken(&reports), Vec::<String>::new(), "u1 is still on b");
        b.apply(&app, &left("u1"), &mut flushed).await.expect("b");
        assert_eq!(taken(&reports), ["member_removed u1"]);
        backend.drop_now().await;
    }

    #[tokio::test]
    async fn a_resync_tells_subscribers_the_member_changes_they_missed() {
        if let Some(backend) = Backend::postgres("presence resync").await {
            a_resync_after_missed_notices(backend).await;
        }
    }

    #[tokio::test]
    async fn a_resync_tells_subscribers_the_member_changes_they_missed_on_redis() {
        if let Some(backend) = Backend::redis("presence resync on redis") {
            a_resync_after_missed_notices(backend).await;
        }
    }

    #[tokio::test]
    async fn a_resync_tells_subscribers_the_member_changes_they_missed_on_nats() {
        if let Some(backend) = Backend::nats("presence resync on nats") {
            a_resync_after_missed_notices(backend).await;
        }
    }

    /// Node a hears nothing here (no listener runs): node b's member changes reach a's
    /// subscriber only through the resync a runs once its link is back, once each.
    async fn a_resync_after_missed_notices(backend: Backend) {
        let (_reports, a, b) = two_nodes(&backend).await;
        // Node a records its own changes, as it does in life (a read of the others' members
        // waits for what it queued before).
        let (stop, abandon) = (CancellationToken::new(), CancellationToken::new());
        let running = tokio::spawn(Arc::clone(&a).run(stop.clone(), abandon));
        let app_id = AppId::parse("app_1").expect("valid");
        let app = a.hub.app(&app_id);
        let (outbox, mut frames, _) = herald_channels::hub::Outbox::new(16);
        let joining = herald_channels::hub::Joining {
            user_id: "u1".into(),
            info: serde_json::value::RawValue::from_string(r#"{"name":"u1"}"#.into()).ok(),
        };
        app.subscribe_joining("presence-x", "1.1", &outbox, Some(joining), 10)
            .expect("subscribed");
        app.know_members("presence-x", "1.1", vec!["u1".into()]);
        assert!(app.go_live("presence-x", "1.1", 0, |_| {}));
        let mut told = || -> Vec<String> {
            std::iter::from_fn(|| frames.try_recv().ok())
                .map(|item| match item {
                    herald_channels::Outgoing::Frame(frame) => {
                        String::from_utf8_lossy(frame.as_ref()).into_owned()
                    }
                    herald_channels::Outgoing::Publication(_) => panic!("a publication"),
                })
                .collect()
        };

        let mut flushed = HashMap::new();
        b.apply(&app_id, &occupied(), &mut flushed)
            .await
            .expect("b");
        b.apply(&app_id, &joined("u2"), &mut flushed)
            .await
            .expect("b");
        assert!(told().is_empty(), "the notice was not heard");
        assert_eq!(resync(&a.hub, a.record.as_ref(), &a.node).await, 1);
        let added = told();
        assert_eq!(added.len(), 1, "{added:?}");
        assert!(
            added[0].contains("member_added")
                && added[0].contains("u2")
                && added[0].contains("name"),
            "with its user_info: {added:?}"
        );

        b.apply(&app_id, &left("u2"), &mut flushed)
            .await
            .expect("b");
        assert_eq!(resync(&a.hub, a.record.as_ref(), &a.node).await, 1);
        let removed = told();
        assert!(
            removed.len() == 1
                && removed[0].contains("member_removed")
                && removed[0].contains("u2"),
            "{removed:?}"
        );
        assert_eq!(
            resync(&a.hub, a.record.as_ref(), &a.node).await,
            0,
            "nothing more was missed"
        );
        stop.cancel();
        running.await.expect("stopped");
        backend.drop_now().await;
    }

    #[tokio::test]
    async fn a_dead_nodes_rows_are_swept_once_as_leaves() {
        if let Some(backend) = Backend::postgres("presence sweep").await {
            a_dead_nodes_rows(backend).await;
        }
    }

    #[tokio::test]
    async fn a_dead_nodes_rows_are_swept_once_as_leaves_on_redis() {
        if let Some(backend) = Backend::redis("presence sweep on redis") {
            a_dead_nodes_rows(backend).await;
        }
    }

    #[tokio::test]
    async fn a_dead_nodes_rows_are_swept_once_as_leaves_on_nats() {
        if let Some(backend) = Backend::nats("presence sweep on nats") {
            a_dead_nodes_rows(backend).await;
        }
    }

    async fn a_dead_nodes_rows(backend: Backend) {
        let (reports, a, b) = two_nodes(&backend).await;
        let app = AppId::parse("app_1").expect("valid");
        let mut flushed = HashMap::new();
        a.apply(&app, &occupied(), &mut flushed).await.expect("a");
        a.apply(&app, &joined("stays"), &mut flushed)
            .await
            .expect("a");
        b.apply(&app, &occupied(), &mut flushed).await.expect("b");
        b.apply(&app, &joined("goes"), &mut flushed)
            .await
            .expect("b");
        b.apply(&app, &joined("stays"), &mut flushed)
            .await
            .expect("b");
        taken(&reports);
        let c = node(&backend, "c", &reports).await;
        backend.age("b").await;
        // Stale in one sweep is not dead yet: b's beat may be on its way.
        let (one, two) = tokio::join!(a.sweep(), c.sweep());
        assert_eq!(one.expect("sweep") + two.expect("sweep"), 0);
        assert_eq!(taken(&reports), Vec::<String>::new());
        // Stale in a second sweep, two sweepers at once: each row is removed, and reported, once.
        let (one, two) = tokio::join!(a.sweep(), c.sweep());
        assert!(one.expect("sweep") + two.expect("sweep") >= 3);
        assert_eq!(
            taken(&reports),
            ["member_removed goes"],
            "a still has stays and the channel"
        );
        assert_eq!(a.sweep().await.expect("sweep"), 0, "nothing left to sweep");
        assert_eq!(
            c.users(&app, "presence-x").await.expect("read"),
            ["stays"],
            "a's row is left"
        );
        backend.drop_now().await;
    }

    /// Now, as a heartbeat of a node whose clock is right.
    fn beat_now() -> i64 {
        Utc::now().timestamp_millis()
    }

    #[tokio::test]
    async fn a_node_whose_clock_runs_behind_beats_in_the_clusters_time() {
        if let Some(backend) = Backend::postgres("presence clock behind").await {
            clock_behind(backend).await;
        }
    }

    #[tokio::test]
    async fn a_node_whose_clock_runs_behind_beats_in_the_clusters_time_on_redis() {
        if let Some(backend) = Backend::redis("presence clock behind on redis") {
            clock_behind(backend).await;
        }
    }

    #[tokio::test]
    async fn a_node_whose_clock_runs_behind_beats_in_the_clusters_time_on_nats() {
        if let Some(backend) = Backend::nats("presence clock behind on nats") {
            clock_behind(backend).await;
        }
    }

    /// A node whose own clock runs two minutes behind (far past `node_ttl`, 15 s) beats in the
    /// cluster's time once its clock is measured against the reference: the others' sweeps
    /// keep it and its members. Unmeasured, its beats were two minutes old as written, and two
    /// sweeps removed its members while it was connected.
    async fn clock_behind(backend: Backend) {
        fn two_minutes_behind() -> chrono::DateTime<Utc> {
            Utc::now() - chrono::TimeDelta::minutes(2)
        }
        let app = AppId::parse("app_1").expect("valid");
        let mut flushed = HashMap::new();
        for measured in [true, false] {
            let clock = ClusterClock::reading(two_minutes_behind);
            if measured {
                // The reference (the database, in a deployment) is this machine's clock here.
                let sent = std::time::Instant::now();
                clock.observe(sent, Utc::now(), std::time::Instant::now());
            }
            let reports = Arc::new(Reports::default());
            let a = node(&backend, "a", &reports).await;
            let b = node_reading(&backend, "b", &reports, clock).await;
            a.apply(&app, &occupied(), &mut flushed).await.expect("a");
            b.apply(&app, &joined("u1"), &mut flushed).await.expect("b");
            taken(&reports);
            assert!(b.heartbeat().await, "b beats");
            let swept = a.sweep().await.expect("sweep") + a.sweep().await.expect("sweep");
            if measured {
                assert_eq!(swept, 0, "b's beats are current in the cluster's time");
                assert_eq!(taken(&reports), Vec::<String>::new());
                // Leave nothing for the unmeasured round: b leaves, and a vacates.
                b.apply(&app, &left("u1"), &mut flushed).await.expect("b");
                a.apply(&app, &vacated(), &mut flushed).await.expect("a");
                taken(&reports);
            } else {
                assert_eq!(swept, 1, "b's beats were two minutes old as written");
                assert_eq!(taken(&reports), ["member_removed u1"]);
            }
        }
        backend.drop_now().await;
    }

    #[tokio::test]
    async fn a_node_stale_in_one_sweep_that_beats_before_the_next_stays() {
        if let Some(backend) = Backend::postgres("presence stale once").await {
            stale_once(backend).await;
        }
    }

    #[tokio::test]
    async fn a_node_stale_in_one_sweep_that_beats_before_the_next_stays_on_redis() {
        if let Some(backend) = Backend::redis("presence stale once on redis") {
            stale_once(backend).await;
        }
    }

    #[tokio::test]
    async fn a_node_stale_in_one_sweep_that_beats_before_the_next_stays_on_nats() {
        if let Some(backend) = Backend::nats("presence stale once on nats") {
            stale_once(backend).await;
        }
    }

    /// A node found stale by one sweep (held up, say, with its judge on one overloaded host)
    /// that beats before the judge's next sweep is not taken for dead; one whose heartbeat is
    /// the same stale one in two sweeps is, and its members leave once.
    async fn stale_once(backend: Backend) {
        let (reports, a, b) = two_nodes(&backend).await;
        let app = AppId::parse("app_1").expect("valid");
        let mut flushed = HashMap::new();
        a.apply(&app, &occupied(), &mut flushed).await.expect("a");
        b.apply(&app, &joined("u1"), &mut flushed).await.expect("b");
        taken(&reports);
        backend.age("b").await;
        assert_eq!(a.sweep().await.expect("sweep"), 0, "stale once");
        assert!(b.heartbeat().await, "b beats: it is registered");
        assert_eq!(a.sweep().await.expect("sweep"), 0, "b beat in between");
        assert!(b.heartbeat().await, "b was not taken for dead");
        assert_eq!(taken(&reports), Vec::<String>::new());

        backend.age("b").await;
        assert_eq!(a.sweep().await.expect("sweep"), 0, "stale once, again");
        assert_eq!(a.sweep().await.expect("sweep"), 1, "stale twice: u1's row");
        assert_eq!(taken(&reports), ["member_removed u1"]);
        assert!(
            !b.record.heartbeat("b", beat_now()).await.expect("beat"),
            "b was expired"
        );
        backend.drop_now().await;
    }

    #[tokio::test]
    async fn an_unreachable_redis_record_is_a_clear_error_without_the_password() {
        let Err(e) = redis::RedisRecord::connect("redis://:hunter2@127.0.0.1:1", "t").await else {
            panic!("nothing listens on port 1")
        };
        let message = e.to_string();
        assert!(message.contains("Redis redis://127.0.0.1:1"), "{message}");
        assert!(!message.contains("hunter2"), "{message}");
    }

    /// On Redis and NATS, each member change of the cluster is published once on the topic, as
    /// `P` and the notice's JSON; repeated changes report nothing; counts are written only for
    /// channels still occupied.
    #[tokio::test]
    async fn redis_decisions_are_idempotent_and_published_once_on_the_topic() {
        if let Some(backend) = Backend::redis("redis presence notices") {
            decisions_are_idempotent_and_published_once(backend).await;
        }
    }

    #[tokio::test]
    async fn nats_decisions_are_idempotent_and_published_once_on_the_topic() {
        if let Some(backend) = Backend::nats("nats presence notices") {
            decisions_are_idempotent_and_published_once(backend).await;
        }
    }

    /// On NATS, a key whose record empties is removed outright (no delete marker, so the
    /// bucket does not grow with every channel used); a lost bucket is created again by the
    /// next heartbeat, which then reports the node unregistered so it rebuilds; a stream that
    /// denies deletes is refused with a message saying why.
    #[tokio::test]
    async fn nats_removes_empty_keys_and_recovers_a_lost_bucket() {
        use futures_util::TryStreamExt;

        let Some(backend) = Backend::nats("nats bucket") else {
            return;
        };
        let Backend::Nats { url, topic } = &backend else {
            unreachable!("a NATS backend")
        };
        let record = backend.record().await;
        let (app, channel) = ("app_1", "presence-a.b");
        record.register("a", beat_now()).await.expect("register");
        assert!(record.occupy("a", app, channel, 1).await.expect("occupy"));
        assert!(
            record
                .join("a", app, channel, "u1", None, None)
                .await
                .expect("join")
        );
        assert!(
            record
                .leave("a", "a", app, channel, "u1")
                .await
                .expect("leave")
        );
        assert!(record.vacate("a", app, channel).await.expect("vacate"));
        let mut bucket = Backend::nats_bucket(url, topic).await;
        let keys: Vec<String> = bucket
            .keys()
            .await
            .expect("keys")
            .try_collect()
            .await
            .expect("keys");
        assert_eq!(keys.len(), 1, "only the node's key is left: {keys:?}");
        assert!(keys[0].starts_with("n."));
        let state = bucket.stream.info().await.expect("info").state.clone();
        assert_eq!(state.messages, 1, "no marker is left behind");

        let client = async_nats::connect(url.as_str()).await.expect("connect");
        let jetstream = async_nats::jetstream::new(client);
        jetstream
            .delete_stream(format!("KV_{}", nats::bucket_name(topic)))
            .await
            .expect("lose the bucket");
        assert!(
            !record.heartbeat("a", beat_now()).await.expect("heartbeat"),
            "a lost bucket holds nobody"
        );
        record
            .register("a", beat_now())
            .await
            .expect("register again");
        assert!(record.heartbeat("a", beat_now()).await.expect("heartbeat"));
        assert!(
            record
                .join("a", app, channel, "u1", None, None)
                .await
                .expect("join")
        );
        assert_eq!(
            record.held_by("a").await.expect("held").members.len(),
            1,
            "rebuilt"
        );

        let other = format!("{topic}.made-by-hand");
        // As `nats kv add` makes a bucket's stream: deletes denied.
        let bucket_name = nats::bucket_name(&other);
        jetstream
            .create_stream(async_nats::jetstream::stream::Config {
                name: format!("KV_{bucket_name}"),
                subjects: vec![format!("$KV.{bucket_name}.>")],
                max_messages_per_subject: 1,
                deny_delete: true,
                allow_rollup: true,
                ..Default::default()
            })
            .await
            .expect("a bucket made by hand");
        let refused = nats::NatsRecord::connect(url, &other)
            .await
            .err()
            .expect("refused");
        assert!(refused.to_string().contains("denies deletes"), "{refused}");
        let _ = jetstream
            .delete_stream(format!("KV_{}", nats::bucket_name(&other)))
            .await;
        backend.drop_now().await;
    }

    async fn decisions_are_idempotent_and_published_once(backend: Backend) {
        use futures_util::StreamExt;

        let mut heard = backend.notices().await;
        let (a, b) = (backend.record().await, backend.record().await);
        let (app, channel) = ("app_1", "presence-x");
        let first = r#"{"n":1}"#;
        assert!(
            a.join("a", app, channel, "u1", Some(first), Some("1.1"))
                .await
                .expect("join")
        );
        assert!(
            !a.join("a", app, channel, "u1", Some(first), None)
                .await
                .expect("join")
        );
        assert!(
            !b.join("b", app, channel, "u1", Some(r#"{"n":2}"#), None)
                .await
                .expect("join")
        );
        assert_eq!(
            b.member_info(app, channel, "u1").await.expect("read"),
            Some(first.to_owned())
        );
        assert!(!a.leave("a", "a", app, channel, "u1").await.expect("leave"));
        assert!(!a.leave("a", "a", app, channel, "u1").await.expect("leave"));
        assert!(b.leave("b", "c", app, channel, "u1").await.expect("leave"));
        assert_eq!(a.member_info(app, channel, "u1").await.expect("read"), None);

        let mut notices = Vec::new();
        for _ in 0..2 {
            let payload = tokio::time::timeout(Duration::from_secs(10), heard.next())
                .await
                .expect("heard within 10 s")
                .expect("open");
            assert_eq!(payload.first(), Some(&b'P'));
            let notice: Notice = serde_json::from_slice(&payload[1..]).expect("a notice");
            notices.push(notice);
        }
        assert_eq!(
            (
                notices[0].kind,
                notices[0].node.as_str(),
                notices[0].user_id.as_str()
            ),
            (NoticeKind::Added, "a", "u1")
        );
        assert_eq!(notices[0].info.as_deref(), Some(first));
        assert_eq!(notices[0].except.as_deref(), Some("1.1"));
        assert_eq!(
            (notices[1].kind, notices[1].node.as_str()),
            (NoticeKind::Removed, "c"),
            "in the name of the deciding node"
        );
        assert!(
            tokio::time::timeout(Duration::from_millis(300), heard.next())
                .await
                .is_err(),
            "nothing else"
        );

        assert!(a.occupy("a", app, "ch", 3).await.expect("occupy"));
        assert!(!a.occupy("a", app, "ch", 4).await.expect("occupy"));
        assert!(!b.occupy("b", app, "ch", 2).await.expect("occupy"));
        let counts = [
            (app.to_owned(), "ch".to_owned(), 5),
            (app.to_owned(), "never".to_owned(), 7),
        ];
        a.write_counts("a", &counts).await.expect("write");
        assert_eq!(
            b.counts_elsewhere("b", app, "").await.expect("read"),
            [("ch".to_owned(), 5)]
        );
        assert_eq!(
            b.counts_elsewhere("z", app, "c").await.expect("read"),
            [("ch".to_owned(), 7)]
        );
        // One channel's read agrees with the prefix reads.
        let (count, users) = b.channel_elsewhere("z", app, "ch").await.expect("read");
        assert_eq!(count, Some(7));
        let by_prefix: Vec<String> = b
            .users_elsewhere("z", app, "ch")
            .await
            .expect("read")
            .into_iter()
            .filter_map(|(channel, user)| (channel == "ch").then_some(user))
            .collect();
        assert_eq!(users, by_prefix);
        assert_eq!(
            b.channel_elsewhere("z", app, "never").await.expect("read"),
            (None, Vec::new())
        );
        assert!(!a.vacate("a", app, "ch").await.expect("vacate"));
        assert!(!a.vacate("a", app, "ch").await.expect("vacate"));
        a.write_counts("a", &counts).await.expect("write");
        assert_eq!(
            b.counts_elsewhere("z", app, "").await.expect("read"),
            [("ch".to_owned(), 2)],
            "a vacated channel's count is not written again"
        );
        assert!(b.vacate("b", app, "ch").await.expect("vacate"));
        assert!(
            b.counts_elsewhere("z", app, "")
                .await
                .expect("read")
                .is_empty()
        );
        backend.drop_now().await;
    }

    fn subscribe(hub: &Hub, app_id: &AppId, channel: &str, user: Option<&str>, socket: &str) {
        let (outbox, _frames, _) = herald_channels::hub::Outbox::new(8);
        let joining = user.map(|user| herald_channels::hub::Joining {
            user_id: user.into(),
            info: serde_json::value::RawValue::from_string(format!(r#"{{"name":"{user}"}}"#)).ok(),
        });
        hub.app(app_id)
            .subscribe(channel, socket, &outbox, joining, 100)
            .expect("subscribed");
    }

    /// Node "a" on `backend` with a hub of its own and a queue of `capacity`.
    async fn node_with_hub(
        backend: &Backend,
        capacity: usize,
    ) -> (Arc<Reports>, Arc<Hub>, Arc<ClusterPresence>) {
        let reports = Arc::new(Reports::default());
        let hub = Arc::new(Hub::default());
        let a = ClusterPresence::with_capacity(
            "a".into(),
            backend.record().await,
            Arc::clone(&hub),
            Arc::clone(&reports) as _,
            Duration::from_secs(15),
            ClusterClock::default(),
            capacity,
        );
        a.register().await.expect("register");
        (reports, hub, a)
    }

    fn sorted(mut reports: Vec<String>) -> Vec<String> {
        reports.sort();
        reports
    }

    /// More changes than the queue holds: the node reconciles its rows with its hub, reporting
    /// each change the cluster had not seen once (a lost join, a lost leave, a lost occupied,
    /// a lost vacated), and a change applied again afterwards reports nothing.
    #[tokio::test]
    async fn an_overflowing_queue_is_reconciled_with_the_hub_and_each_change_reported_once() {
        if let Some(backend) = Backend::postgres("presence overflow").await {
            an_overflowing_queue(backend).await;
        }
    }

    #[tokio::test]
    async fn an_overflowing_queue_is_reconciled_with_the_hub_and_each_change_reported_once_on_redis()
     {
        if let Some(backend) = Backend::redis("presence overflow on redis") {
            an_overflowing_queue(backend).await;
        }
    }

    #[tokio::test]
    async fn an_overflowing_queue_is_reconciled_with_the_hub_and_each_change_reported_once_on_nats()
    {
        if let Some(backend) = Backend::nats("presence overflow on nats") {
            an_overflowing_queue(backend).await;
        }
    }

    async fn an_overflowing_queue(backend: Backend) {
        let (reports, hub, a) = node_with_hub(&backend, 4).await;
        let app = AppId::parse("app_1").expect("valid");
        let mut flushed = Flushed::new();
        // Rows from before: the hub has since lost "ghost" and the channel "gone".
        for change in [
            occupied(),
            joined("ghost"),
            LocalChange::Occupied {
                channel: "gone".into(),
            },
        ] {
            a.apply(&app, &change, &mut flushed).await.expect("a");
        }
        taken(&reports);

        for i in 0..10 {
            subscribe(
                &hub,
                &app,
                "presence-x",
                Some(&format!("u{i}")),
                &format!("1.{i}"),
            );
        }
        subscribe(&hub, &app, "private-y", None, "2.1");
        for i in 0..3 {
            hub.app(&app).unsubscribe("presence-x", &format!("1.{i}"));
        }
        let mut queue = a.changes.lock().expect("lock").take().expect("queue");
        assert!(a.overflowed.load(Ordering::Acquire), "4 of 15 changes fit");

        assert!(
            a.resync(&mut queue, &mut flushed).await.is_some(),
            "reconciled"
        );
        assert!(queue.try_recv().is_err(), "what was queued is discarded");
        let mut expected: Vec<String> = (3..10).map(|i| format!("member_added u{i}")).collect();
        expected.extend([
            "channel_occupied -".into(),
            "channel_vacated -".into(),
            "member_removed ghost".into(),
        ]);
        assert_eq!(sorted(taken(&reports)), sorted(expected));
        let reader = node(&backend, "c", &reports).await;
        let users: Vec<String> = (3..10).map(|i| format!("u{i}")).collect();
        assert_eq!(reader.users(&app, "presence-x").await.expect("read"), users);
        let channels: Vec<String> = reader
            .channels(&app, "")
            .await
            .expect("read")
            .into_iter()
            .map(|(channel, _)| channel)
            .collect();
        assert_eq!(channels, ["presence-x", "private-y"]);

        // The same changes again, as a queue would replay them: nothing new to report.
        for change in [joined("u5"), left("ghost"), occupied()] {
            a.apply(&app, &change, &mut flushed).await.expect("a");
        }
        assert_eq!(taken(&reports), Vec::<String>::new());
        assert_eq!(a.reconcile(&mut flushed).await.expect("again"), 0);
        backend.drop_now().await;
    }

    /// A presence subscriber's snapshot is read once its own join is recorded, so its
    /// confirmation follows the record and any node's next snapshot lists it.
    #[tokio::test]
    async fn a_snapshot_is_read_once_the_subscribers_own_join_is_recorded() {
        if let Some(backend) = Backend::postgres("presence settled").await {
            a_snapshot_after_the_join(backend).await;
        }
    }

    #[tokio::test]
    async fn a_snapshot_is_read_once_the_subscribers_own_join_is_recorded_on_redis() {
        if let Some(backend) = Backend::redis("presence settled on redis") {
            a_snapshot_after_the_join(backend).await;
        }
    }

    #[tokio::test]
    async fn a_snapshot_is_read_once_the_subscribers_own_join_is_recorded_on_nats() {
        if let Some(backend) = Backend::nats("presence settled on nats") {
            a_snapshot_after_the_join(backend).await;
        }
    }

    async fn a_snapshot_after_the_join(backend: Backend) {
        let (reports, hub, a) = node_with_hub(&backend, QUEUE_CAPACITY).await;
        let app = AppId::parse("app_1").expect("valid");
        let (stop, abandon) = (CancellationToken::new(), CancellationToken::new());
        let task = tokio::spawn(Arc::clone(&a).run(stop.clone(), abandon));
        let reader = node(&backend, "c", &reports).await;
        for user in ["alice", "bob", "carol"] {
            // As a session does: the snapshot's future is made, the subscriber joins the hub,
            // then the future is awaited (and the confirmation sent).
            let elsewhere = hub
                .app(&app)
                .members_elsewhere("presence-x")
                .expect("shared");
            subscribe(&hub, &app, "presence-x", Some(user), &format!("1.{user}"));
            elsewhere.await.expect("read");
            let listed = reader.users(&app, "presence-x").await.expect("read");
            assert!(
                listed.contains(&user.to_owned()),
                "{user} is recorded before its confirmation: {listed:?}"
            );
        }
        stop.cancel();
        task.await.expect("stopped");
        backend.drop_now().await;
    }

    /// Waits (at most 20 s) until `done` holds.
    async fn until<F: Future<Output = bool>>(what: &str, mut done: impl FnMut() -> F) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !done().await {
            assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A node never sweeps its own rows as orphans, though its node row is gone (it was taken
    /// for dead): it is alive, and its next beat registers it again. Swept, its members were
    /// announced as leaving, then joining again.
    #[tokio::test]
    async fn a_node_taken_for_dead_does_not_sweep_its_own_rows() {
        let Some(backend) = Backend::postgres("presence own rows").await else {
            return;
        };
        let (_reports, hub, a) = node_with_hub(&backend, QUEUE_CAPACITY).await;
        let record = backend.record().await;
        let app = AppId::parse("app_1").expect("valid");
        subscribe(&hub, &app, "presence-x", Some("u1"), "1.1");
        assert!(
            a.resync(&mut mpsc::channel(1).1, &mut Flushed::new())
                .await
                .is_some()
        );
        assert_eq!(record.held_by("a").await.expect("held").members.len(), 1);
        record.forget_node("a").await.expect("forget");
        assert_eq!(a.sweep().await.expect("sweep"), 0, "nothing of its own");
        assert_eq!(record.held_by("a").await.expect("held").members.len(), 1);
        backend.drop_now().await;
    }

    /// A node taken for dead registers again and reconciles; a sweep that read its rows as a
    /// dead node's before that may remove them after the reconcile. The node reconciles again
    /// at its next beats until one repairs nothing, so its members come back.
    #[tokio::test]
    async fn rows_a_late_sweep_removes_after_a_node_registered_again_come_back() {
        let Some(backend) = Backend::postgres("presence late sweep").await else {
            return;
        };
        let (_reports, hub, a) = node_with_hub(&backend, QUEUE_CAPACITY).await;
        let record = backend.record().await;
        let app = AppId::parse("app_1").expect("valid");
        subscribe(&hub, &app, "presence-x", Some("u1"), "1.1");
        let (stop, abandon) = (CancellationToken::new(), CancellationToken::new());
        let task = tokio::spawn(Arc::clone(&a).run(stop.clone(), abandon));
        let held = || async { record.held_by("a").await.expect("held").members.len() };
        until("the member is recorded", || async { held().await == 1 }).await;
        // Taken for dead: its node row is gone, so its next beat registers it again.
        record.forget_node("a").await.expect("forget");
        until("registered again", || async {
            let nodes = record.stale_nodes(i64::MAX).await.expect("nodes");
            nodes.iter().any(|(node, _)| node == "a")
        })
        .await;
        // The sweep that read its rows as orphans before that removes them only now.
        assert!(
            record
                .leave("a", "sweeper", app.as_str(), "presence-x", "u1")
                .await
                .expect("leave")
        );
        assert_eq!(held().await, 0);
        until("the next beat's reconcile restores the member", || async {
            held().await == 1
        })
        .await;
        stop.cancel();
        task.await.expect("stopped");
        backend.drop_now().await;
    }

    /// A change the database refuses is not dropped: the running node reconciles once the
    /// database answers again, and the cluster hears of the join once.
    #[tokio::test]
    async fn a_change_the_database_refused_is_repaired_when_it_answers_again() {
        let Some(backend) = Backend::postgres("presence refused").await else {
            return;
        };
        let pool = backend.pool().clone();
        let (reports, hub, a) = node_with_hub(&backend, QUEUE_CAPACITY).await;
        let app = AppId::parse("app_1").expect("valid");
        // The members' table is away: every presence transaction fails.
        for statement in [
            "ALTER TABLE cluster_presence_members RENAME TO away",
            "UPDATE cluster_nodes SET heartbeat_at = 0",
        ] {
            sqlx::query(statement)
                .execute(&pool)
                .await
                .expect("prepare");
        }
        subscribe(&hub, &app, "presence-x", Some("u1"), "1.1");
        let (stop, abandon) = (CancellationToken::new(), CancellationToken::new());
        let task = tokio::spawn(Arc::clone(&a).run(stop.clone(), abandon));
        // The channel's occupancy is written, then its member's join is tried and fails.
        until("the occupancy written", || async {
            reports
                .0
                .lock()
                .expect("lock")
                .contains(&"channel_occupied -".to_owned())
        })
        .await;
        // Beats run on a task of their own: one that begins after the occupancy was written
        // shows the join, tried at once after it, had its turn.
        sqlx::query("UPDATE cluster_nodes SET heartbeat_at = 0")
            .execute(&pool)
            .await
            .expect("reset the beat");
        until("a heartbeat after the failed join", || async {
            let beat: i64 = sqlx::query_scalar("SELECT heartbeat_at FROM cluster_nodes")
                .fetch_one(&pool)
                .await
                .expect("read");
            beat > 0
        })
        .await;
        assert_eq!(
            taken(&reports),
            ["channel_occupied -"],
            "the join could not be written"
        );
        sqlx::query("ALTER TABLE away RENAME TO cluster_presence_members")
            .execute(&pool)
            .await
            .expect("restore");
        let reader = node(&backend, "c", &reports).await;
        until("the join repaired", || async {
            reader.users(&app, "presence-x").await.expect("read") == ["u1"]
        })
        .await;
        assert_eq!(taken(&reports), ["member_added u1"], "once");
        stop.cancel();
        task.await.expect("stopped");
        backend.drop_now().await;
    }
}
