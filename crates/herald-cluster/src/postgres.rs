//! The PostgreSQL broker: publications reach every node's hub through LISTEN/NOTIFY, with
//! PostgreSQL alone.
//!
//! Two kinds of publication travel two ways, one LISTEN session per node hearing both:
//! - **History channels** are announced by the store itself, in the commit that assigns their
//!   offsets ([`HISTORY_CHANNEL`], see `herald_store::postgres` history). PostgreSQL delivers
//!   notifications at commit and in commit order, and one channel's offsets are assigned under
//!   a row lock held to commit, so every node, the publishing one included, hears a channel's
//!   publications in offset order, once each. [`PostgresBroker::publish`] does nothing more
//!   for them. Each subscriber also drops an offset it already has (one it read from the store
//!   while joining), so a client that moves to another node resumes exactly.
//! - **Other channels** keep no history and have no offsets: the publishing node hands them to
//!   its own hub at once and notifies the others ([`PUBLICATIONS_CHANNEL`]), in its publishing
//!   order.
//!
//! A notification carries at most 8,000 bytes: larger publications go by reference (a row in
//! `broker_payloads`, read by each node as the notification arrives and swept after
//! [`PAYLOAD_KEEP`]; large history entries are read from `channel_history`).
//!
//! When the LISTEN session is lost, what was notified meanwhile is not heard. On reconnecting,
//! the node reads what its history channels' subscribers missed from the store, in order
//! ([`PostgresBroker::catch_up`]); publications on channels without history sent during the
//! gap are lost for this node's subscribers (as they are for a client that was offline).
//!
//! The same session hears [`DELIVERIES_CHANNEL`] (another node queued a delivery, so this
//! node's dispatcher wakes and may claim it), [`CONTROL_CHANNEL`] (another node deleted an app:
//! its connections here close too) and presence notices (see `presence`).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use chrono::Utc;
use herald_channels::{
    EventData, Hub, Publication,
    broker::{Broker, BrokerError},
};
use herald_core::{AppId, history::HistoryEntry};
use herald_store::{
    HistoryQuery, Store,
    postgres::{DELIVERIES_CHANNEL, HISTORY_CHANNEL, HistoryNotice},
};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sqlx::{PgPool, postgres::PgListener};
use tokio_util::sync::CancellationToken;

/// The NOTIFY channel of publications on channels that keep no history.
pub const PUBLICATIONS_CHANNEL: &str = "herald_publications";

/// The NOTIFY channel of what one node tells the others to do to their connections.
pub const CONTROL_CHANNEL: &str = "herald_control";

/// What one node tells the others (JSON).
#[derive(Debug, Serialize, Deserialize)]
struct ControlNotice {
    #[serde(rename = "s")]
    node: String,
    /// An app was deleted: end its connections and streams.
    #[serde(
        rename = "removed_app",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    removed_app: Option<String>,
}

/// A notification payload must be shorter than 8,000 bytes.
const MAX_NOTICE_BYTES: usize = 7_900;

/// How long a large publication's row is kept: far longer than a notification takes to
/// arrive at a connected node.
pub const PAYLOAD_KEEP: Duration = Duration::from_secs(600);

/// How often each node deletes rows older than [`PAYLOAD_KEEP`].
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// The most events one channel's catch-up reads after a lost LISTEN session; a subscriber that
/// missed more has a gap, which its client detects by offset and resumes from.
const CATCH_UP_LIMIT: u32 = 1000;

/// Waits between attempts to re-open the LISTEN session: doubling from the first to the last.
const RECONNECT_FIRST: Duration = Duration::from_millis(100);
const RECONNECT_LAST: Duration = Duration::from_secs(5);

/// A publication on a channel without history, as notified (JSON with one-letter keys).
#[derive(Debug, Serialize, Deserialize)]
struct PublicationNotice {
    /// The publishing node: it delivered to its own hub already.
    #[serde(rename = "s")]
    node: String,
    /// The node's count of its notices: NOTIFY folds identical payloads sent in one
    /// transaction into one, and two equal publications must both arrive.
    #[serde(rename = "q")]
    sequence: u64,
    /// The publication, unless it was too large: then its `broker_payloads` row.
    #[serde(rename = "v", default, skip_serializing_if = "Option::is_none")]
    publication: Option<NoticedPublication>,
    #[serde(rename = "r", default, skip_serializing_if = "Option::is_none")]
    reference: Option<i64>,
}

#[derive(Debug, Serialize, Deserialize)]
struct NoticedPublication {
    #[serde(rename = "a")]
    app_id: String,
    #[serde(rename = "c")]
    channel: String,
    #[serde(rename = "n")]
    event: String,
    #[serde(rename = "d")]
    data: String,
    #[serde(rename = "j", default)]
    raw_json: bool,
    #[serde(rename = "u", default, skip_serializing_if = "Option::is_none")]
    user_id: Option<String>,
    #[serde(rename = "x", default, skip_serializing_if = "Option::is_none")]
    except: Option<String>,
}

impl NoticedPublication {
    fn of(publication: &Publication) -> Self {
        Self {
            app_id: publication.app_id.as_str().to_owned(),
            channel: publication.channel.clone(),
            event: publication.event.clone(),
            data: publication.data.as_str().to_owned(),
            raw_json: publication.data.is_json(),
            user_id: publication.user_id.clone(),
            except: publication.except.clone(),
        }
    }

    fn into_publication(self) -> Result<Publication, String> {
        let app_id = AppId::parse(&self.app_id).map_err(|e| format!("app id: {e}"))?;
        let data = if self.raw_json {
            EventData::Json(RawValue::from_string(self.data).map_err(|e| format!("data: {e}"))?)
        } else {
            EventData::text(self.data)
        };
        Ok(Publication::new(&app_id, self.channel, self.event, data)
            .with_user(self.user_id)
            .except(self.except))
    }
}

/// An open LISTEN session, from [`PostgresBroker::listen`] to [`PostgresBroker::run`].
pub struct Session(PgListener);

/// The [`Broker`] of a cluster on PostgreSQL (see the module doc). [`PostgresBroker::run`]
/// holds its LISTEN session; start it once per node.
pub struct PostgresBroker {
    node: String,
    pool: PgPool,
    hub: Arc<Hub>,
    store: Arc<dyn Store>,
    sequence: AtomicU64,
    listening: AtomicBool,
    wake_deliveries: Box<dyn Fn() + Send + Sync>,
}

impl PostgresBroker {
    /// `pool` is the PostgreSQL store's (same database and schema); `wake_deliveries` is
    /// called when another node queued a due delivery, and after every (re)connection.
    pub fn new(
        node: String,
        pool: PgPool,
        hub: Arc<Hub>,
        store: Arc<dyn Store>,
        wake_deliveries: Box<dyn Fn() + Send + Sync>,
    ) -> Arc<Self> {
        Arc::new(Self {
            node,
            pool,
            hub,
            store,
            sequence: AtomicU64::new(0),
            listening: AtomicBool::new(false),
            wake_deliveries,
        })
    }

    /// Whether the LISTEN session is open: while it is not, this node hears no other node.
    pub fn is_listening(&self) -> bool {
        self.listening.load(Ordering::Relaxed)
    }

    /// This node's name in notifications.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Holds the LISTEN session until `shutdown`: hands what it hears to the hub, re-opens a
    /// lost session (with backoff) and then catches up, and sweeps old payload rows.
    /// Opens the first LISTEN session: call it before the node serves, so a client it admits
    /// never misses what another node publishes meanwhile. Hand the session to
    /// [`PostgresBroker::run`].
    pub async fn listen(&self) -> Result<Session, sqlx::Error> {
        let listener = self.try_open().await?;
        self.listening.store(true, Ordering::Relaxed);
        Ok(Session(listener))
    }

    pub async fn run(self: Arc<Self>, first: Session, shutdown: CancellationToken) {
        let mut reconnecting = false;
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut first = Some(first.0);
        loop {
            let opened = match first.take() {
                Some(listener) => Some(listener),
                None => self.open(&shutdown).await,
            };
            let Some(mut listener) = opened else {
                return;
            };
            self.listening.store(true, Ordering::Relaxed);
            if reconnecting {
                tracing::info!(
                    node = self.node,
                    "broker: LISTEN session re-opened; catching up"
                );
                self.catch_up().await;
            }
            (self.wake_deliveries)();
            reconnecting = true;
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    _ = sweep.tick() => self.sweep().await,
                    received = listener.try_recv() => match received {
                        Ok(Some(notification)) => {
                            self.hear(notification.channel(), notification.payload()).await;
                        }
                        // sqlx re-opened the session already (re-listening): catch up.
                        Ok(None) => {
                            tracing::warn!(node = self.node, "broker: LISTEN session lost and re-opened; catching up");
                            self.catch_up().await;
                            (self.wake_deliveries)();
                        }
                        Err(e) => {
                            self.listening.store(false, Ordering::Relaxed);
                            tracing::warn!(node = self.node, error = %e, "broker: LISTEN session lost; re-opening");
                            break;
                        }
                    },
                }
            }
        }
    }

    /// Opens a LISTEN session on every channel the broker hears, retrying with backoff until it
    /// succeeds or `shutdown`.
    async fn open(&self, shutdown: &CancellationToken) -> Option<PgListener> {
        let mut wait = RECONNECT_FIRST;
        loop {
            match self.try_open().await {
                Ok(listener) => return Some(listener),
                Err(e) => {
                    tracing::warn!(node = self.node, error = %e, retry_in = ?wait, "broker: cannot open the LISTEN session");
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return None,
                () = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(RECONNECT_LAST);
        }
    }

    /// One attempt at a LISTEN session on every channel the broker hears.
    async fn try_open(&self) -> Result<PgListener, sqlx::Error> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener
            .listen_all([
                HISTORY_CHANNEL,
                PUBLICATIONS_CHANNEL,
                DELIVERIES_CHANNEL,
                CONTROL_CHANNEL,
                crate::presence::PRESENCE_CHANNEL,
            ])
            .await?;
        Ok(listener)
    }

    async fn hear(&self, channel: &str, payload: &str) {
        let heard = match channel {
            HISTORY_CHANNEL => self.hear_history(payload).await,
            PUBLICATIONS_CHANNEL => self.hear_publication(payload).await,
            CONTROL_CHANNEL => self.hear_control(payload),
            DELIVERIES_CHANNEL => {
                (self.wake_deliveries)();
                Ok(())
            }
            crate::presence::PRESENCE_CHANNEL => {
                crate::presence::hear(&self.hub, &self.pool, &self.node, payload).await
            }
            _ => Ok(()),
        };
        if let Err(e) = heard {
            tracing::warn!(node = self.node, channel, error = %e, "broker: a notification could not be handed on");
        }
    }

    /// A committed history entry: to this node's subscribers of its channel, if any.
    async fn hear_history(&self, payload: &str) -> Result<(), String> {
        let notice: HistoryNotice =
            serde_json::from_str(payload).map_err(|e| format!("history notice: {e}"))?;
        let app_id = AppId::parse(&notice.app_id).map_err(|e| format!("app id: {e}"))?;
        let Some(app) = self.hub.existing(&app_id) else {
            return Ok(());
        };
        if app.channel_info(&notice.channel).is_none() {
            return Ok(());
        }
        let entry = match notice.entry() {
            Some(entry) => entry,
            None => self
                .read_entry(&app_id, &notice.channel, notice.offset)
                .await?
                .ok_or_else(|| {
                    format!(
                        "offset {} of {} is no longer kept (retention ran first)",
                        notice.offset, notice.channel
                    )
                })?,
        };
        let publication = Publication::from_history(&entry).except(notice.except);
        app.broadcast(&Arc::new(publication));
        Ok(())
    }

    /// One kept event, by offset.
    async fn read_entry(
        &self,
        app_id: &AppId,
        channel: &str,
        offset: u64,
    ) -> Result<Option<HistoryEntry>, String> {
        let entries = self
            .store
            .history(
                app_id,
                channel,
                &HistoryQuery {
                    after: Some(offset.saturating_sub(1)),
                    before: Some(offset.saturating_add(1)),
                    limit: 1,
                    newest_first: false,
                    not_before: chrono::DateTime::<Utc>::MIN_UTC,
                },
            )
            .await
            .map_err(|e| e.to_string())?;
        Ok(entries.into_iter().next())
    }

    /// Another node's instruction.
    fn hear_control(&self, payload: &str) -> Result<(), String> {
        let notice: ControlNotice =
            serde_json::from_str(payload).map_err(|e| format!("control notice: {e}"))?;
        if notice.node == self.node {
            return Ok(());
        }
        if let Some(app_id) = notice.removed_app {
            let app_id = AppId::parse(&app_id).map_err(|e| format!("app id: {e}"))?;
            self.hub.remove_app(&app_id);
        }
        Ok(())
    }

    /// Another node's publication on a channel without history.
    async fn hear_publication(&self, payload: &str) -> Result<(), String> {
        let notice: PublicationNotice =
            serde_json::from_str(payload).map_err(|e| format!("publication notice: {e}"))?;
        if notice.node == self.node {
            return Ok(());
        }
        let noticed = match (notice.publication, notice.reference) {
            (Some(publication), _) => publication,
            (None, Some(reference)) => {
                let body: Option<String> =
                    sqlx::query_scalar("SELECT body FROM broker_payloads WHERE id = $1")
                        .bind(reference)
                        .fetch_optional(&self.pool)
                        .await
                        .map_err(|e| e.to_string())?;
                let body = body.ok_or_else(|| format!("payload {reference} is gone"))?;
                serde_json::from_str(&body).map_err(|e| format!("payload {reference}: {e}"))?
            }
            (None, None) => return Err("a notice with neither publication nor reference".into()),
        };
        let app_id = AppId::parse(&noticed.app_id).map_err(|e| format!("app id: {e}"))?;
        if let Some(app) = self.hub.existing(&app_id) {
            app.broadcast(&Arc::new(noticed.into_publication()?));
        }
        Ok(())
    }

    /// After a lost LISTEN session: each history channel with live subscribers here gets, in
    /// order, what was kept after the oldest position among them (each subscriber drops what it
    /// has). Returns how many events were handed on.
    pub async fn catch_up(&self) -> usize {
        let mut handed = 0;
        for app in self.hub.apps() {
            for (channel, _) in app.channels("") {
                let Some(from) = app.catch_up_from(&channel) else {
                    continue;
                };
                let entries = self
                    .store
                    .history(
                        app.app_id(),
                        &channel,
                        &HistoryQuery {
                            after: Some(from),
                            before: None,
                            limit: CATCH_UP_LIMIT,
                            newest_first: false,
                            not_before: chrono::DateTime::<Utc>::MIN_UTC,
                        },
                    )
                    .await;
                match entries {
                    Ok(entries) => {
                        for entry in &entries {
                            app.broadcast(&Arc::new(Publication::from_history(entry)));
                        }
                        handed += entries.len();
                    }
                    Err(e) => {
                        tracing::warn!(node = self.node, channel, error = %e, "broker: catching up a channel failed; its subscribers recover on resubscribing");
                    }
                }
            }
        }
        handed
    }

    /// Deletes large publications' rows older than [`PAYLOAD_KEEP`].
    async fn sweep(&self) {
        let before = Utc::now() - chrono::Duration::from_std(PAYLOAD_KEEP).unwrap_or_default();
        if let Err(e) = sqlx::query("DELETE FROM broker_payloads WHERE created_at < $1")
            .bind(before.timestamp_millis())
            .execute(&self.pool)
            .await
        {
            tracing::warn!(node = self.node, error = %e, "broker: sweeping old payloads failed");
        }
    }

    /// The notification payload for `publication`: whole if it fits, else by reference to a
    /// new `broker_payloads` row.
    async fn notice(&self, publication: &Publication) -> Result<String, BrokerError> {
        let sequence = self.sequence.fetch_add(1, Ordering::Relaxed);
        let noticed = NoticedPublication::of(publication);
        let mut notice = PublicationNotice {
            node: self.node.clone(),
            sequence,
            publication: Some(noticed),
            reference: None,
        };
        let whole = encode(&notice)?;
        if whole.len() <= MAX_NOTICE_BYTES {
            return Ok(whole);
        }
        let body = encode(&notice.publication)?;
        let reference: i64 = sqlx::query_scalar(
            "INSERT INTO broker_payloads (body, created_at) VALUES ($1, $2) RETURNING id",
        )
        .bind(body)
        .bind(Utc::now().timestamp_millis())
        .fetch_one(&self.pool)
        .await
        .map_err(unavailable)?;
        notice.publication = None;
        notice.reference = Some(reference);
        encode(&notice)
    }
}

fn encode<T: Serialize>(value: &T) -> Result<String, BrokerError> {
    serde_json::to_string(value).map_err(|e| BrokerError::Unavailable(format!("encoding: {e}")))
}

fn unavailable(e: sqlx::Error) -> BrokerError {
    BrokerError::Unavailable(format!("PostgreSQL: {e}"))
}

#[async_trait::async_trait]
impl Broker for PostgresBroker {
    async fn remove_app(&self, app_id: &AppId) -> Result<(), BrokerError> {
        self.hub.remove_app(app_id);
        let notice = encode(&ControlNotice {
            node: self.node.clone(),
            removed_app: Some(app_id.as_str().to_owned()),
        })?;
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CONTROL_CHANNEL)
            .bind(notice)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    fn is_ready(&self) -> bool {
        self.is_listening()
    }

    async fn publish(&self, publications: &[Arc<Publication>]) -> Result<usize, BrokerError> {
        // History channels' publications were announced by their commit (see the module doc).
        let others: Vec<&Arc<Publication>> = publications
            .iter()
            .filter(|p| p.position.is_none())
            .collect();
        if others.is_empty() {
            return Ok(0);
        }
        let sent = others
            .iter()
            .map(|p| {
                self.hub
                    .existing(&p.app_id)
                    .map_or(0, |app| app.broadcast(p))
            })
            .sum();
        let mut notices = Vec::with_capacity(others.len());
        for publication in &others {
            notices.push(self.notice(publication).await?);
        }
        // One statement, one transaction: delivered together, in this order.
        sqlx::query(
            "SELECT pg_notify($1, notice)
             FROM unnest($2::text[]) WITH ORDINALITY AS n(notice, ord)
             ORDER BY ord",
        )
        .bind(PUBLICATIONS_CHANNEL)
        .bind(&notices)
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(sent)
    }
}
