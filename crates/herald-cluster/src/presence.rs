//! Presence and occupancy across nodes, on PostgreSQL alone: the cluster's
//! [`PresenceSync`] (what each hub hands on) and [`PresenceManager`] (what the Pusher HTTP API
//! reads).
//!
//! **Rows per node.** Each node writes only what it knows: a `cluster_presence_members` row
//! per (channel, user) with at least one of its sockets in, a `cluster_channel_occupancy` row
//! per channel it has subscribers in (with its subscription count), and its `cluster_nodes`
//! row, whose heartbeat it renews every third of `node_ttl`. A member or a channel is in the
//! cluster while any node has a row for it.
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
//! **Dead nodes.** A node whose heartbeat is older than `node_ttl` is deleted by whichever live
//! node looks first; rows whose node has no `cluster_nodes` row are then removed one key at a
//! time under the same locks, `DELETE ... RETURNING` deciding which sweeper reports. So a
//! killed node's members leave once, within `node_ttl` plus a heartbeat period. Decisions count
//! every node's rows, dead or not yet swept: a user still held by an unswept node has not left
//! the cluster, and leaves (once) when the sweep removes its last row.
//!
//! **Staleness.** Membership and occupancy are exact at each transaction's commit (a change
//! reaches the database milliseconds after the hub decided it). Subscription counts are
//! written when a channel becomes occupied on a node and then every [`FLUSH_EVERY`] if they
//! changed: another node's count is at most that old (this node's own is read from its hub).
//!
//! **Bounded, and repaired rather than dropped.** The hub hands changes on without waiting
//! (it holds a channel lock), into a queue of [`QUEUE_CAPACITY`]. A change that finds the queue
//! full, or that the database refuses, is not retried on its own: the node's rows are then
//! *reconciled* with its hub ([`PostgresPresence::reconcile`]): what was queued is discarded,
//! the hub is read, and this node's rows are added or removed until they match it. Every change
//! is idempotent on this node's row (a join whose row exists reports nothing, a leave whose row
//! is gone reports nothing), so a change applied twice, once by the reconcile and once from
//! the queue, is reported once. The same reconcile re-registers a node that was taken for
//! dead.
//!
//! **Known limits.** The channel webhooks' anti-flap delay cancels a leave and rejoin reported
//! by one node; a user who leaves on one node and rejoins on another within the delay gets
//! `member_removed` after `member_added` at the receiver. While a reconcile is pending (the
//! database unreachable), other nodes see this node's members as they were.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use chrono::Utc;
use herald_channels::{
    Hub,
    hub::{ChannelEvent, ChannelInfo, ChannelObserver},
    presence::{
        LocalChange, MembersFuture, PresenceError, PresenceManager, PresenceSync, RemoteMember,
    },
    protocol,
};
use herald_core::AppId;
use serde::{Deserialize, Serialize};
use sqlx::{PgPool, Postgres, Transaction};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The NOTIFY channel of presence notices (members added and removed, users terminated).
pub const PRESENCE_CHANNEL: &str = "herald_presence";

/// How often a node writes its changed subscription counts.
pub const FLUSH_EVERY: Duration = Duration::from_millis(250);

/// A node is dead when its heartbeat is older than this, unless configured otherwise.
pub const DEFAULT_NODE_TTL: Duration = Duration::from_secs(15);

/// A notification payload must be shorter than 8,000 bytes; larger `user_info` is read from
/// the member's row instead.
const MAX_NOTICE_BYTES: usize = 7_900;

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
}

impl From<ClusterPresenceError> for PresenceError {
    fn from(e: ClusterPresenceError) -> Self {
        PresenceError::Unavailable(e.to_string())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum NoticeKind {
    #[serde(rename = "added")]
    Added,
    #[serde(rename = "removed")]
    Removed,
    #[serde(rename = "terminate")]
    Terminate,
}

/// A presence notice, as notified (JSON with one-letter keys).
#[derive(Debug, Serialize, Deserialize)]
struct Notice {
    #[serde(rename = "k")]
    kind: NoticeKind,
    /// The node that decided (or was asked to terminate): it has done its own part already
    /// for `terminate`.
    #[serde(rename = "s")]
    node: String,
    #[serde(rename = "a")]
    app_id: String,
    #[serde(rename = "c", default)]
    channel: String,
    #[serde(rename = "u")]
    user_id: String,
    #[serde(rename = "i", default, skip_serializing_if = "Option::is_none")]
    info: Option<String>,
    /// `user_info` too large for the notice: read it from the member's row.
    #[serde(rename = "r", default, skip_serializing_if = "std::ops::Not::not")]
    info_by_reference: bool,
    /// The joining socket, not told of its own arrival.
    #[serde(rename = "x", default, skip_serializing_if = "Option::is_none")]
    except: Option<String>,
}

impl Notice {
    fn encode(mut self) -> Result<String, ClusterPresenceError> {
        let whole = serde_json::to_string(&self)
            .map_err(|e| ClusterPresenceError::Notice(e.to_string()))?;
        if whole.len() <= MAX_NOTICE_BYTES {
            return Ok(whole);
        }
        self.info = None;
        self.info_by_reference = true;
        serde_json::to_string(&self).map_err(|e| ClusterPresenceError::Notice(e.to_string()))
    }
}

/// Hands on a presence notice heard on [`PRESENCE_CHANNEL`] (called by the broker's LISTEN
/// session): members added or removed go to this node's subscribers of the channel, a
/// terminated user's connections here close.
pub async fn hear(hub: &Hub, pool: &PgPool, node: &str, payload: &str) -> Result<(), String> {
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
                sqlx::query_scalar::<_, Option<String>>(
                    "SELECT user_info FROM cluster_presence_members
                     WHERE app_id = $1 AND channel = $2 AND user_id = $3 LIMIT 1",
                )
                .bind(&notice.app_id)
                .bind(&notice.channel)
                .bind(&notice.user_id)
                .fetch_optional(pool)
                .await
                .map_err(|e| e.to_string())?
                .flatten()
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

/// What a hub hands on: queued for [`PostgresPresence::run`], in order.
struct Queue {
    node: String,
    pool: PgPool,
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
        let (pool, node) = (self.pool.clone(), self.node.clone());
        let (app_id, channel) = (app_id.as_str().to_owned(), channel.to_owned());
        let progress = Arc::clone(&self.progress);
        Box::pin(async move {
            // Polled after the subscriber joined the hub: its own join is queued by now.
            progress.settled().await;
            members_elsewhere(&pool, &node, &app_id, &channel)
                .await
                .map_err(|e| PresenceError::Unavailable(e.to_string()))
        })
    }
}

async fn members_elsewhere(
    pool: &PgPool,
    node: &str,
    app_id: &str,
    channel: &str,
) -> Result<Vec<RemoteMember>, sqlx::Error> {
    sqlx::query_as::<_, (String, Option<String>)>(
        "SELECT DISTINCT ON (user_id) user_id, user_info FROM cluster_presence_members
         WHERE app_id = $1 AND channel = $2 AND node_id <> $3
         ORDER BY user_id, joined_at",
    )
    .bind(app_id)
    .bind(channel)
    .bind(node)
    .fetch_all(pool)
    .await
}

/// The cluster's presence on PostgreSQL (see the module doc). [`PostgresPresence::new`]
/// makes the hub share its changes; [`PostgresPresence::register`] before serving, then
/// [`PostgresPresence::run`] once per node.
pub struct PostgresPresence {
    node: String,
    pool: PgPool,
    hub: Arc<Hub>,
    /// Where this node reports the channel webhooks it decided (the `ChannelWebhooks`).
    webhooks: Arc<dyn ChannelObserver>,
    node_ttl: Duration,
    changes: Mutex<Option<mpsc::Receiver<Change>>>,
    overflowed: Arc<AtomicBool>,
    progress: Arc<Progress>,
}

/// Whether a change is the cluster's: what one transaction found.
enum Decided {
    /// This node's row was written or removed and no other node has one.
    Cluster,
    /// Another node has a row (or this node had none to remove): nothing to report.
    NodeOnly,
}

impl PostgresPresence {
    /// `pool` is the PostgreSQL store's; `webhooks` gets the channel webhooks this node
    /// decides. Makes `hub` hand its presence and occupancy changes here.
    pub fn new(
        node: String,
        pool: PgPool,
        hub: Arc<Hub>,
        webhooks: Arc<dyn ChannelObserver>,
        node_ttl: Duration,
    ) -> Arc<Self> {
        Self::with_capacity(node, pool, hub, webhooks, node_ttl, QUEUE_CAPACITY)
    }

    fn with_capacity(
        node: String,
        pool: PgPool,
        hub: Arc<Hub>,
        webhooks: Arc<dyn ChannelObserver>,
        node_ttl: Duration,
        capacity: usize,
    ) -> Arc<Self> {
        let (sender, receiver) = mpsc::channel(capacity);
        let overflowed = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(Progress::new());
        hub.share_presence(Arc::new(Queue {
            node: node.clone(),
            pool: pool.clone(),
            changes: sender,
            overflowed: Arc::clone(&overflowed),
            progress: Arc::clone(&progress),
        }));
        Arc::new(Self {
            node,
            pool,
            hub,
            webhooks,
            node_ttl,
            changes: Mutex::new(Some(receiver)),
            overflowed,
            progress,
        })
    }

    /// This node's id.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Writes this node's `cluster_nodes` row; its other rows would be swept without it.
    pub async fn register(&self) -> Result<(), ClusterPresenceError> {
        let now = Utc::now().timestamp_millis();
        sqlx::query(
            "INSERT INTO cluster_nodes (node_id, started_at, heartbeat_at) VALUES ($1, $2, $2)
             ON CONFLICT (node_id) DO UPDATE SET heartbeat_at = EXCLUDED.heartbeat_at",
        )
        .bind(&self.node)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Applies this node's changes in order, heartbeats and sweeps dead nodes every third of
    /// `node_ttl`, and flushes subscription counts every [`FLUSH_EVERY`], until `stop` (then
    /// applies what is queued and leaves the cluster: this node's remaining rows are removed
    /// as leaves) or `abandon` (then it stops at once, as a killed node would, and the other
    /// nodes sweep its rows).
    pub async fn run(self: Arc<Self>, stop: CancellationToken, abandon: CancellationToken) {
        let Some(mut changes) = self.changes.lock().ok().and_then(|mut c| c.take()) else {
            tracing::error!(node = self.node, "presence: run was started twice");
            return;
        };
        let mut flushed = Flushed::new();
        // Whether this node's rows may differ from its hub (a change was lost to a full queue
        // or a failed transaction, or the node was taken for dead) until a reconcile succeeds.
        let mut stale = false;
        let mut heartbeat = tokio::time::interval(self.node_ttl / 3);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut flush = tokio::time::interval(FLUSH_EVERY);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut retry = tokio::time::interval(RECONCILE_RETRY);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = abandon.cancelled() => return,
                () = stop.cancelled() => {
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
                        stale = !self.resync(&mut changes, &mut flushed).await;
                    }
                }
                _ = retry.tick(), if stale => {
                    stale = !self.resync(&mut changes, &mut flushed).await;
                }
                _ = heartbeat.tick() => {
                    if !self.heartbeat().await {
                        stale = !self.resync(&mut changes, &mut flushed).await;
                    }
                    if let Err(e) = self.sweep().await {
                        tracing::warn!(node = self.node, error = %e, "presence: sweeping dead nodes failed");
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

    /// Discards what is queued and reconciles this node's rows with its hub; whether that
    /// succeeded (if not, the caller tries again after [`RECONCILE_RETRY`]).
    ///
    /// Order matters: the overflow mark is cleared first, then the queue emptied, then the hub
    /// read. Every discarded change happened before the read, so the read reflects it; a change
    /// lost to a full queue after the mark was cleared marks it again.
    async fn resync(&self, changes: &mut mpsc::Receiver<Change>, flushed: &mut Flushed) -> bool {
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
                true
            }
            Err(e) => {
                tracing::warn!(node = self.node, error = %e, "presence: reconciling this node's rows failed; retrying");
                false
            }
        }
    }

    /// Makes this node's rows match its hub: channels and members the hub has and the rows
    /// lack are added, rows the hub no longer has are removed, each as the change it stands
    /// for (so the cluster reports what it had not seen, once). Returns how many rows changed.
    async fn reconcile(&self, flushed: &mut Flushed) -> Result<usize, ClusterPresenceError> {
        let stored_members: HashSet<(String, String, String)> = sqlx::query_as(
            "SELECT app_id, channel, user_id FROM cluster_presence_members WHERE node_id = $1",
        )
        .bind(&self.node)
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .collect();
        let stored_channels: HashSet<(String, String)> = sqlx::query_as(
            "SELECT app_id, channel FROM cluster_channel_occupancy WHERE node_id = $1",
        )
        .bind(&self.node)
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .collect();

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
        for (app_id, change) in &changes {
            self.apply(app_id, change, flushed).await?;
        }
        Ok(changes.len())
    }

    /// One change of this node, decided for the cluster (see the module doc).
    async fn apply(
        &self,
        app_id: &AppId,
        change: &LocalChange,
        flushed: &mut Flushed,
    ) -> Result<(), ClusterPresenceError> {
        let app = app_id.as_str();
        let (event, decided) = match change {
            LocalChange::Joined {
                channel,
                user_id,
                info,
                socket_id,
            } => {
                let mut tx = self.pool.begin().await?;
                lock(&mut tx, &member_key(app, channel, user_id)).await?;
                let elsewhere =
                    member_elsewhere(&mut tx, app, channel, user_id, &self.node).await?;
                // A row of this node already there (a change applied twice) reports nothing.
                let inserted = sqlx::query(
                    "INSERT INTO cluster_presence_members
                         (app_id, channel, user_id, node_id, user_info, joined_at)
                     VALUES ($1, $2, $3, $4, $5, $6)
                     ON CONFLICT (app_id, channel, user_id, node_id) DO NOTHING",
                )
                .bind(app)
                .bind(channel)
                .bind(user_id)
                .bind(&self.node)
                .bind(info)
                .bind(Utc::now().timestamp_millis())
                .execute(&mut *tx)
                .await?
                .rows_affected()
                    > 0;
                let cluster = inserted && !elsewhere;
                if cluster {
                    let notice = Notice {
                        kind: NoticeKind::Added,
                        node: self.node.clone(),
                        app_id: app.to_owned(),
                        channel: channel.clone(),
                        user_id: user_id.clone(),
                        info: info.clone(),
                        info_by_reference: false,
                        except: (!socket_id.is_empty()).then(|| socket_id.clone()),
                    };
                    notify(&mut tx, notice).await?;
                }
                tx.commit().await?;
                (
                    ChannelEvent::MemberAdded {
                        channel: channel.clone(),
                        user_id: user_id.clone(),
                    },
                    decided(cluster),
                )
            }
            LocalChange::Left { channel, user_id } => {
                let cluster =
                    remove_member(&self.pool, app, channel, user_id, &self.node, &self.node)
                        .await?;
                (
                    ChannelEvent::MemberRemoved {
                        channel: channel.clone(),
                        user_id: user_id.clone(),
                    },
                    cluster,
                )
            }
            LocalChange::Occupied { channel } => {
                let count = self
                    .hub
                    .existing(app_id)
                    .and_then(|a| a.channel_info(channel))
                    .map_or(1, |i| {
                        i64::try_from(i.subscription_count).unwrap_or(i64::MAX)
                    });
                let mut tx = self.pool.begin().await?;
                lock(&mut tx, &occupancy_key(app, channel)).await?;
                let elsewhere: bool = sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM cluster_channel_occupancy
                     WHERE app_id = $1 AND channel = $2 AND node_id <> $3)",
                )
                .bind(app)
                .bind(channel)
                .bind(&self.node)
                .fetch_one(&mut *tx)
                .await?;
                // `xmax = 0` only for a row this statement inserted: one already there (a
                // change applied twice) reports nothing.
                let inserted: bool = sqlx::query_scalar(
                    "INSERT INTO cluster_channel_occupancy (app_id, channel, node_id, subscriptions)
                     VALUES ($1, $2, $3, $4)
                     ON CONFLICT (app_id, channel, node_id)
                     DO UPDATE SET subscriptions = EXCLUDED.subscriptions
                     RETURNING (xmax = 0)",
                )
                .bind(app)
                .bind(channel)
                .bind(&self.node)
                .bind(count)
                .fetch_one(&mut *tx)
                .await?;
                tx.commit().await?;
                flushed.insert((app.to_owned(), channel.clone()), count);
                (
                    ChannelEvent::Occupied {
                        channel: channel.clone(),
                    },
                    decided(inserted && !elsewhere),
                )
            }
            LocalChange::Vacated { channel } => {
                flushed.remove(&(app.to_owned(), channel.clone()));
                let cluster = remove_occupancy(&self.pool, app, channel, &self.node).await?;
                (
                    ChannelEvent::Vacated {
                        channel: channel.clone(),
                    },
                    cluster,
                )
            }
        };
        if matches!(decided, Decided::Cluster) {
            self.webhooks.observe(app_id, event);
        }
        Ok(())
    }

    /// Renews this node's heartbeat; `false` if this node's rows must be reconciled: a node
    /// found missing was taken for dead (it paused longer than `node_ttl`) and its rows were
    /// swept as leaves, so it registers again and the reconcile writes what its hub holds,
    /// announcing it anew.
    async fn heartbeat(&self) -> bool {
        let renewed = sqlx::query("UPDATE cluster_nodes SET heartbeat_at = $2 WHERE node_id = $1")
            .bind(&self.node)
            .bind(Utc::now().timestamp_millis())
            .execute(&self.pool)
            .await;
        match renewed {
            Ok(done) if done.rows_affected() > 0 => true,
            Ok(_) => {
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

    /// Deletes nodes whose heartbeat is older than `node_ttl`, then removes rows whose node is
    /// gone, each as a leave (reported once, by whichever sweeper removes the last row).
    /// Returns how many rows it removed.
    pub async fn sweep(&self) -> Result<usize, ClusterPresenceError> {
        let cutoff = Utc::now().timestamp_millis()
            - i64::try_from(self.node_ttl.as_millis()).unwrap_or(i64::MAX);
        let dead: Vec<String> = sqlx::query_scalar(
            "DELETE FROM cluster_nodes WHERE heartbeat_at < $1 RETURNING node_id",
        )
        .bind(cutoff)
        .fetch_all(&self.pool)
        .await?;
        for node in &dead {
            tracing::warn!(
                node = self.node,
                dead = node,
                "presence: a node stopped heartbeating; removing its members"
            );
        }
        let mut removed = 0;
        let members: Vec<(String, String, String, String)> = sqlx::query_as(
            "SELECT app_id, channel, user_id, node_id FROM cluster_presence_members m
             WHERE NOT EXISTS (SELECT 1 FROM cluster_nodes n WHERE n.node_id = m.node_id)
             LIMIT $1",
        )
        .bind(SWEEP_LIMIT)
        .fetch_all(&self.pool)
        .await?;
        for (app, channel, user_id, node) in members {
            removed += 1;
            if let Decided::Cluster =
                remove_member(&self.pool, &app, &channel, &user_id, &node, &self.node).await?
                && let Ok(app_id) = AppId::parse(&app)
            {
                self.webhooks
                    .observe(&app_id, ChannelEvent::MemberRemoved { channel, user_id });
            }
        }
        let channels: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT app_id, channel, node_id FROM cluster_channel_occupancy o
             WHERE NOT EXISTS (SELECT 1 FROM cluster_nodes n WHERE n.node_id = o.node_id)
             LIMIT $1",
        )
        .bind(SWEEP_LIMIT)
        .fetch_all(&self.pool)
        .await?;
        for (app, channel, node) in channels {
            removed += 1;
            if let Decided::Cluster = remove_occupancy(&self.pool, &app, &channel, &node).await?
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
            sqlx::query("DELETE FROM cluster_nodes WHERE node_id = $1")
                .bind(&self.node)
                .execute(&self.pool)
                .await?;
            self.sweep().await
        };
        if let Err(e) = left.await {
            tracing::warn!(node = self.node, error = %e, "presence: leaving the cluster failed; the other nodes sweep this node's rows");
        }
    }

    /// Writes the subscription counts that changed since the last flush, in one statement.
    async fn flush(&self, flushed: &mut Flushed) -> Result<(), ClusterPresenceError> {
        let (mut apps, mut channels, mut counts) = (Vec::new(), Vec::new(), Vec::new());
        for app in self.hub.apps() {
            for (channel, info) in app.channels("") {
                let key = (app.app_id().as_str().to_owned(), channel);
                let count = i64::try_from(info.subscription_count).unwrap_or(i64::MAX);
                // A channel not in `flushed` has its occupancy still queued: that writes it.
                if let Some(known) = flushed.get_mut(&key)
                    && *known != count
                {
                    *known = count;
                    apps.push(key.0);
                    channels.push(key.1);
                    counts.push(count);
                }
            }
        }
        if apps.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "UPDATE cluster_channel_occupancy o SET subscriptions = u.n
             FROM unnest($1::text[], $2::text[], $3::bigint[]) AS u(a, c, n)
             WHERE o.app_id = u.a AND o.channel = u.c AND o.node_id = $4",
        )
        .bind(&apps)
        .bind(&channels)
        .bind(&counts)
        .bind(&self.node)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Other nodes' subscription counts per channel whose name starts with `prefix`.
    async fn counts_elsewhere(
        &self,
        app_id: &AppId,
        prefix: &str,
    ) -> Result<BTreeMap<String, usize>, ClusterPresenceError> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT channel, SUM(subscriptions)::BIGINT FROM cluster_channel_occupancy
             WHERE app_id = $1 AND node_id <> $2 AND left(channel, length($3)) = $3
             GROUP BY channel",
        )
        .bind(app_id.as_str())
        .bind(&self.node)
        .bind(prefix)
        .fetch_all(&self.pool)
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
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT DISTINCT channel, user_id FROM cluster_presence_members
             WHERE app_id = $1 AND node_id <> $2 AND left(channel, length($3)) = $3",
        )
        .bind(app_id.as_str())
        .bind(&self.node)
        .bind(prefix)
        .fetch_all(&self.pool)
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
        let mut counts = self.counts_elsewhere(app_id, prefix).await?;
        let mut users = self.users_elsewhere(app_id, prefix).await?;
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

fn decided(cluster: bool) -> Decided {
    if cluster {
        Decided::Cluster
    } else {
        Decided::NodeOnly
    }
}

fn member_key(app: &str, channel: &str, user_id: &str) -> String {
    format!("member\u{1f}{app}\u{1f}{channel}\u{1f}{user_id}")
}

fn occupancy_key(app: &str, channel: &str) -> String {
    format!("occupancy\u{1f}{app}\u{1f}{channel}")
}

/// Takes the transaction-scoped lock of `key`: every node's change of one key takes turns.
async fn lock(tx: &mut Transaction<'_, Postgres>, key: &str) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(key)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

async fn notify(
    tx: &mut Transaction<'_, Postgres>,
    notice: Notice,
) -> Result<(), ClusterPresenceError> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(PRESENCE_CHANNEL)
        .bind(notice.encode()?)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

async fn member_elsewhere(
    tx: &mut Transaction<'_, Postgres>,
    app: &str,
    channel: &str,
    user_id: &str,
    node: &str,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM cluster_presence_members
         WHERE app_id = $1 AND channel = $2 AND user_id = $3 AND node_id <> $4)",
    )
    .bind(app)
    .bind(channel)
    .bind(user_id)
    .bind(node)
    .fetch_one(&mut **tx)
    .await
}

/// Removes `node`'s row of a member; if it was the user's last anywhere, notifies
/// `member_removed` (in the same transaction) and returns [`Decided::Cluster`]. `deciding` is
/// the node that reports.
async fn remove_member(
    pool: &PgPool,
    app: &str,
    channel: &str,
    user_id: &str,
    node: &str,
    deciding: &str,
) -> Result<Decided, ClusterPresenceError> {
    let mut tx = pool.begin().await?;
    lock(&mut tx, &member_key(app, channel, user_id)).await?;
    let removed: Option<i32> = sqlx::query_scalar(
        "DELETE FROM cluster_presence_members
         WHERE app_id = $1 AND channel = $2 AND user_id = $3 AND node_id = $4
         RETURNING 1",
    )
    .bind(app)
    .bind(channel)
    .bind(user_id)
    .bind(node)
    .fetch_optional(&mut *tx)
    .await?;
    let last = removed.is_some() && !member_elsewhere(&mut tx, app, channel, user_id, node).await?;
    if last {
        let notice = Notice {
            kind: NoticeKind::Removed,
            node: deciding.to_owned(),
            app_id: app.to_owned(),
            channel: channel.to_owned(),
            user_id: user_id.to_owned(),
            info: None,
            info_by_reference: false,
            except: None,
        };
        notify(&mut tx, notice).await?;
    }
    tx.commit().await?;
    Ok(decided(last))
}

/// Removes `node`'s occupancy row of a channel; [`Decided::Cluster`] if it was the last.
async fn remove_occupancy(
    pool: &PgPool,
    app: &str,
    channel: &str,
    node: &str,
) -> Result<Decided, ClusterPresenceError> {
    let mut tx = pool.begin().await?;
    lock(&mut tx, &occupancy_key(app, channel)).await?;
    let removed: Option<i32> = sqlx::query_scalar(
        "DELETE FROM cluster_channel_occupancy
         WHERE app_id = $1 AND channel = $2 AND node_id = $3 RETURNING 1",
    )
    .bind(app)
    .bind(channel)
    .bind(node)
    .fetch_optional(&mut *tx)
    .await?;
    let elsewhere: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM cluster_channel_occupancy WHERE app_id = $1 AND channel = $2)",
    )
    .bind(app)
    .bind(channel)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(decided(removed.is_some() && !elsewhere))
}

#[async_trait::async_trait]
impl PresenceManager for PostgresPresence {
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
        let mut users: BTreeSet<String> =
            members_elsewhere(&self.pool, &self.node, app_id.as_str(), channel)
                .await
                .map_err(ClusterPresenceError::from)?
                .into_iter()
                .map(|(user_id, _)| user_id)
                .collect();
        if let Some(app) = self.hub.existing(app_id) {
            users.extend(app.users(channel));
        }
        Ok(users.into_iter().collect())
    }

    /// Closes the user's connections here at once and asks every other node to (a notice
    /// each hears); returns how many closed here.
    async fn terminate_user(&self, app_id: &AppId, user_id: &str) -> Result<usize, PresenceError> {
        let closed = self
            .hub
            .existing(app_id)
            .map_or(0, |app| app.terminate_user(user_id));
        let notice = Notice {
            kind: NoticeKind::Terminate,
            node: self.node.clone(),
            app_id: app_id.as_str().to_owned(),
            channel: String::new(),
            user_id: user_id.to_owned(),
            info: None,
            info_by_reference: false,
            except: None,
        };
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(PRESENCE_CHANNEL)
            .bind(notice.encode()?)
            .execute(&self.pool)
            .await
            .map_err(ClusterPresenceError::from)?;
        Ok(closed)
    }
}

#[cfg(test)]
mod tests {
    //! The SQL against a real server: `HERALD_TEST_POSTGRES_URL` names it; each test works in
    //! a throwaway schema of its own.

    use super::*;
    use crate::test_schema::Schema;

    #[derive(Default)]
    struct Reports(Mutex<Vec<String>>);

    impl ChannelObserver for Reports {
        fn observe(&self, _: &AppId, event: ChannelEvent) {
            let name = format!("{} {}", event.name(), event.user_id().unwrap_or("-"));
            self.0.lock().expect("lock").push(name);
        }
    }

    async fn node(pool: &PgPool, name: &str, reports: &Arc<Reports>) -> Arc<PostgresPresence> {
        let presence = PostgresPresence::new(
            name.into(),
            pool.clone(),
            Arc::new(Hub::default()),
            Arc::clone(reports) as _,
            Duration::from_secs(15),
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

    fn taken(reports: &Reports) -> Vec<String> {
        std::mem::take(&mut *reports.0.lock().expect("lock"))
    }

    /// Nodes "a" and "b" on a fresh schema, reporting to one list; `None` when skipped.
    async fn two_nodes(
        test: &str,
    ) -> Option<(
        Schema,
        PgPool,
        Arc<Reports>,
        Arc<PostgresPresence>,
        Arc<PostgresPresence>,
    )> {
        let schema = Schema::create(test).await?;
        let pool = schema.pool().await;
        let reports = Arc::new(Reports::default());
        let a = node(&pool, "a", &reports).await;
        let b = node(&pool, "b", &reports).await;
        Some((schema, pool, reports, a, b))
    }

    #[tokio::test]
    async fn a_user_on_two_nodes_is_added_and_removed_once_and_read_from_both() {
        let Some((schema, pool, reports, a, b)) = two_nodes("presence two nodes").await else {
            return;
        };
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
        let mut others = members_elsewhere(&pool, "b", "app_1", "presence-x")
            .await
            .expect("read");
        others.sort();
        assert_eq!(others, [("u1".into(), Some(r#"{"name":"u1"}"#.into()))]);

        a.apply(&app, &left("u1"), &mut flushed).await.expect("a");
        assert_eq!(taken(&reports), Vec::<String>::new(), "u1 is still on b");
        b.apply(&app, &left("u1"), &mut flushed).await.expect("b");
        assert_eq!(taken(&reports), ["member_removed u1"]);
        schema.drop_now().await;
    }

    #[tokio::test]
    async fn a_dead_nodes_rows_are_swept_once_as_leaves() {
        let Some((schema, pool, reports, a, b)) = two_nodes("presence sweep").await else {
            return;
        };
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
        sqlx::query("UPDATE cluster_nodes SET heartbeat_at = 0 WHERE node_id = 'b'")
            .execute(&pool)
            .await
            .expect("age b");
        // Two sweepers at once: each row is removed, and reported, once.
        let (one, two) = tokio::join!(a.sweep(), a.sweep());
        assert!(one.expect("sweep") + two.expect("sweep") >= 3);
        assert_eq!(
            taken(&reports),
            ["member_removed goes"],
            "a still has stays and the channel"
        );
        assert_eq!(a.sweep().await.expect("sweep"), 0, "nothing left to sweep");
        let reader = node(&pool, "c", &reports).await;
        assert_eq!(
            reader.users(&app, "presence-x").await.expect("read"),
            ["stays"],
            "a's row is left"
        );
        schema.drop_now().await;
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

    /// Node "a" on a fresh schema with a hub of its own and a queue of `capacity`; `None`
    /// when skipped.
    async fn node_with_hub(
        test: &str,
        capacity: usize,
    ) -> Option<(
        Schema,
        PgPool,
        Arc<Reports>,
        Arc<Hub>,
        Arc<PostgresPresence>,
    )> {
        let schema = Schema::create(test).await?;
        let pool = schema.pool().await;
        let reports = Arc::new(Reports::default());
        let hub = Arc::new(Hub::default());
        let a = PostgresPresence::with_capacity(
            "a".into(),
            pool.clone(),
            Arc::clone(&hub),
            Arc::clone(&reports) as _,
            Duration::from_secs(15),
            capacity,
        );
        a.register().await.expect("register");
        Some((schema, pool, reports, hub, a))
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
        let Some((schema, pool, reports, hub, a)) = node_with_hub("presence overflow", 4).await
        else {
            return;
        };
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

        assert!(a.resync(&mut queue, &mut flushed).await, "reconciled");
        assert!(queue.try_recv().is_err(), "what was queued is discarded");
        let mut expected: Vec<String> = (3..10).map(|i| format!("member_added u{i}")).collect();
        expected.extend([
            "channel_occupied -".into(),
            "channel_vacated -".into(),
            "member_removed ghost".into(),
        ]);
        assert_eq!(sorted(taken(&reports)), sorted(expected));
        let reader = node(&pool, "c", &reports).await;
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
        schema.drop_now().await;
    }

    /// A presence subscriber's snapshot is read once its own join is recorded, so its
    /// confirmation follows the record and any node's next snapshot lists it.
    #[tokio::test]
    async fn a_snapshot_is_read_once_the_subscribers_own_join_is_recorded() {
        let Some((schema, pool, reports, hub, a)) =
            node_with_hub("presence settled", QUEUE_CAPACITY).await
        else {
            return;
        };
        let app = AppId::parse("app_1").expect("valid");
        let (stop, abandon) = (CancellationToken::new(), CancellationToken::new());
        let task = tokio::spawn(Arc::clone(&a).run(stop.clone(), abandon));
        let reader = node(&pool, "c", &reports).await;
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
        schema.drop_now().await;
    }

    /// Waits (at most 20 s) until `done` holds.
    async fn until<F: Future<Output = bool>>(what: &str, mut done: impl FnMut() -> F) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !done().await {
            assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A change the database refuses is not dropped: the running node reconciles once the
    /// database answers again, and the cluster hears of the join once.
    #[tokio::test]
    async fn a_change_the_database_refused_is_repaired_when_it_answers_again() {
        let Some((schema, pool, reports, hub, a)) =
            node_with_hub("presence refused", QUEUE_CAPACITY).await
        else {
            return;
        };
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
        // The queued changes go first; a heartbeat after them shows they were tried.
        until("a heartbeat after the failed changes", || async {
            let beat: i64 = sqlx::query_scalar("SELECT heartbeat_at FROM cluster_nodes")
                .fetch_one(&pool)
                .await
                .expect("read");
            beat > 0
        })
        .await;
        assert!(
            !taken(&reports).contains(&"member_added u1".to_owned()),
            "the join could not be written"
        );
        sqlx::query("ALTER TABLE away RENAME TO cluster_presence_members")
            .execute(&pool)
            .await
            .expect("restore");
        let reader = node(&pool, "c", &reports).await;
        until("the join repaired", || async {
            reader.users(&app, "presence-x").await.expect("read") == ["u1"]
        })
        .await;
        assert_eq!(taken(&reports), ["member_added u1"], "once");
        stop.cancel();
        task.await.expect("stopped");
        schema.drop_now().await;
    }
}
