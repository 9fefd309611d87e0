//! History channels: every event published to one is appended to the store with the next
//! offset before it is broadcast, and a subscriber can resume after the last position it saw.
//!
//! One lock per channel orders everything that touches its position: an append (store, then
//! broadcast) and a join (read what was missed, register the subscriber, queue the replay). So
//! a joining subscriber either finds an event in the store or receives it live, never both and
//! never neither: the seam between replay and live has no gap and no duplicate.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use chrono::Utc;
use herald_core::{
    history::{
        self, ChannelPosition, HistoryEntry, HistoryRule, Recovery, Retention, Unrecoverable,
    },
    model::App,
};
use herald_store::{HistoryQuery, Store, StoreError};

use serde_json::value::RawValue;

use crate::{
    Frame, Hub,
    hub::ChannelEvent,
    protocol::{self, Data},
};

#[derive(Debug, Clone)]
pub struct HistoryConfig {
    /// Rules for apps that set none.
    pub default_rules: Vec<HistoryRule>,
    /// Events one resubscription may replay; beyond, the client is told to page.
    pub max_replay: u64,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        let rule = |pattern: &str| HistoryRule {
            pattern: pattern.to_owned(),
            max_events: 1000,
            max_age_secs: 24 * 3600,
        };
        Self {
            default_rules: vec![
                rule("history-*"),
                rule("private-history-*"),
                rule("private-encrypted-history-*"),
                rule("presence-history-*"),
            ],
            max_replay: 500,
        }
    }
}

type PositionSlot = Arc<tokio::sync::Mutex<Option<ChannelPosition>>>;

pub struct History {
    store: Arc<dyn Store>,
    hub: Arc<Hub>,
    config: HistoryConfig,
    positions: Mutex<HashMap<(String, String), PositionSlot>>,
}

/// Where a resuming client left off.
#[derive(Debug, Clone)]
pub struct Resume {
    pub epoch: String,
    pub offset: u64,
}

/// The bytes of history a subscriber may still be replayed (see `limits::ClientPermit`).
pub trait ReplayBudget: Sync {
    /// Whether anything may be replayed now; when not, missed events are not even read.
    fn available(&self) -> bool;
    /// Counts `bytes` read for a replay; `false` when they are over the budget, and then the
    /// replay is not sent.
    fn charge(&self, bytes: u64) -> bool;
}

/// The `reason` of a recovery the replay budget refused.
pub const RATE_LIMITED: &str = "rate_limited";

/// What a joining subscriber learns, under the channel's lock.
pub struct Joined {
    pub epoch: String,
    /// The newest offset (0 before the first event).
    pub offset: u64,
    /// Present when the subscriber asked to resume (and `None` when the budget refused it).
    pub recovery: Option<Recovery>,
    /// The missed events, oldest first, as frames.
    pub replay: Vec<Frame>,
    /// The events could be replayed but the replay budget refused them: the status says
    /// `recovered: false` with the reason `rate_limited`.
    pub rate_limited: bool,
}

impl Joined {
    /// The `history` member of `subscription_succeeded` (and of SSE's status event).
    pub fn status(&self) -> serde_json::Value {
        let mut status = serde_json::json!({"epoch": self.epoch, "offset": self.offset});
        if self.rate_limited {
            status["recovered"] = false.into();
            status["reason"] = RATE_LIMITED.into();
            return status;
        }
        match &self.recovery {
            Some(Recovery::Complete { missed }) => {
                status["recovered"] = true.into();
                status["missed"] = (*missed).into();
            }
            Some(Recovery::Impossible(reason)) => {
                status["recovered"] = false.into();
                status["reason"] = reason.as_str().into();
            }
            None => {}
        }
        status
    }
}

/// A page of history for the HTTP API.
pub struct Page {
    pub position: Option<ChannelPosition>,
    pub entries: Vec<HistoryEntry>,
}

impl History {
    pub fn new(store: Arc<dyn Store>, hub: Arc<Hub>, config: HistoryConfig) -> Self {
        Self {
            store,
            hub,
            config,
            positions: Mutex::default(),
        }
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// The channel's retention, if it keeps history: the app's rules, else the defaults.
    pub fn retention(&self, app: &App, channel: &str) -> Option<Retention> {
        let rules = app.history.as_deref().unwrap_or(&self.config.default_rules);
        history::retention_for(rules, channel)
    }

    fn slot(&self, app_id: &str, channel: &str) -> PositionSlot {
        let mut positions = self.positions.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(
            positions
                .entry((app_id.to_owned(), channel.to_owned()))
                .or_default(),
        )
    }

    /// Drops cached positions nobody is using; they are read from the store again on next
    /// use. A slot is in use while an append or join holds its `Arc`, and new holders clone
    /// it under the same map lock, so a count of one means free.
    fn forget_idle_positions(&self) {
        let mut positions = self.positions.lock().unwrap_or_else(|p| p.into_inner());
        positions.retain(|_, slot| Arc::strong_count(slot) > 1);
    }

    /// The channel's position, kept in its slot: loaded from the store on first use, or
    /// started with a fresh epoch. A fresh position is stored by the first append, not here:
    /// anyone may subscribe to a public history channel, and a row per name subscribed to
    /// would let them fill the disk.
    async fn position<'s>(
        &self,
        slot: &'s mut Option<ChannelPosition>,
        app_id: &str,
        channel: &str,
    ) -> Result<&'s mut ChannelPosition, StoreError> {
        if slot.is_none() {
            let loaded = match self.store.channel_position(app_id, channel).await? {
                Some(position) => position,
                None => ChannelPosition {
                    epoch: history::new_epoch(),
                    next_offset: 1,
                },
            };
            *slot = Some(loaded);
        }
        let Some(position) = slot.as_mut() else {
            unreachable!("filled above")
        };
        Ok(position)
    }

    /// Sends an event to a channel's subscribers (but `except`); on a history channel it is
    /// first appended with the next offset and carries its position. Returns how many
    /// subscribers it was handed to.
    pub async fn publish(
        &self,
        app: &App,
        channel: &str,
        event: &str,
        data: &str,
        except: Option<&str>,
    ) -> Result<usize, StoreError> {
        let hub = self.hub.app(&app.id);
        let Some(retention) = self.retention(app, channel) else {
            return Ok(hub.broadcast(channel, &protocol::event(event, channel, data), except));
        };
        let sent = self
            .append(
                app,
                channel,
                retention,
                event,
                Data::Text(data),
                None,
                |frame| hub.broadcast(channel, &frame, except),
            )
            .await?;
        Ok(sent)
    }

    /// Keeps a client event on a history channel, then relays it (never to its sender) with
    /// its position; `report` describes it for channel webhooks.
    #[allow(clippy::too_many_arguments)]
    pub async fn publish_client_event(
        &self,
        app: &App,
        channel: &str,
        retention: Retention,
        event: &str,
        data: &RawValue,
        user_id: Option<&str>,
        sender: &str,
        report: impl FnOnce() -> ChannelEvent,
    ) -> Result<usize, StoreError> {
        let hub = self.hub.app(&app.id);
        self.append(
            app,
            channel,
            retention,
            event,
            Data::Json(data),
            user_id,
            |frame| hub.client_event(channel, &frame, sender, report),
        )
        .await
    }

    /// Appends an event with the channel's next offset and hands its frame to `send`, both
    /// under the channel's lock, so subscribers see offsets in order.
    #[allow(clippy::too_many_arguments)]
    async fn append<T>(
        &self,
        app: &App,
        channel: &str,
        retention: Retention,
        event: &str,
        data: Data<'_>,
        user_id: Option<&str>,
        send: impl FnOnce(Frame) -> T,
    ) -> Result<T, StoreError> {
        let slot = self.slot(&app.id, channel);
        let mut slot = slot.lock().await;
        let position = self.position(&mut slot, &app.id, channel).await?;
        let offset = position.next_offset;
        let (text, raw_json) = match data {
            Data::Text(text) => (text.to_owned(), false),
            Data::Json(json) => (json.get().to_owned(), true),
        };
        self.store
            .append_history(
                HistoryEntry {
                    app_id: app.id.clone(),
                    channel: channel.to_owned(),
                    epoch: position.epoch.clone(),
                    offset,
                    event: event.to_owned(),
                    data: text,
                    raw_json,
                    user_id: user_id.map(str::to_owned),
                    created_at: Utc::now(),
                },
                retention,
            )
            .await?;
        position.next_offset = offset + 1;
        let frame = protocol::history_event(event, channel, data, user_id, &position.epoch, offset);
        Ok(send(frame))
    }

    /// Joins a history channel: under the channel's lock, works out what `resume` missed,
    /// then calls `register`, which must add the subscriber to the hub and queue its frames
    /// (the confirmation, then `Joined::replay`) before the lock is released. The replay's
    /// bytes are charged to `budget`; missed events it has no room for are not sent
    /// (`Joined::rate_limited`), and not even read while it is exhausted.
    #[allow(clippy::too_many_arguments)]
    pub async fn join<T>(
        &self,
        app: &App,
        channel: &str,
        retention: Retention,
        resume: Option<&Resume>,
        budget: &dyn ReplayBudget,
        register: impl FnOnce(Joined) -> T,
    ) -> Result<T, StoreError> {
        let slot = self.slot(&app.id, channel);
        let mut slot = slot.lock().await;
        let position = self.position(&mut slot, &app.id, channel).await?;
        let newest = position.next_offset - 1;
        let mut joined = Joined {
            epoch: position.epoch.clone(),
            offset: newest,
            recovery: None,
            replay: Vec::new(),
            rate_limited: false,
        };
        if let Some(resume) = resume {
            let not_before = not_before(retention);
            // Rows past the count are trimmed in batches: count them as gone already.
            let oldest = self
                .store
                .oldest_history_offset(&app.id, channel, not_before)
                .await?
                .map(|o| o.max(kept_after(newest, retention) + 1));
            let recovery = history::recovery(
                position,
                oldest,
                &resume.epoch,
                resume.offset,
                self.config.max_replay,
            );
            if let Recovery::Complete { missed } = recovery
                && missed > 0
                && !budget.available()
            {
                joined.rate_limited = true;
            } else if let Recovery::Complete { missed } = recovery
                && missed > 0
            {
                let entries = self
                    .store
                    .history(
                        &app.id,
                        channel,
                        &HistoryQuery {
                            after: Some(resume.offset),
                            before: Some(position.next_offset),
                            limit: u32::try_from(missed).unwrap_or(u32::MAX),
                            newest_first: false,
                            not_before,
                        },
                    )
                    .await?;
                // Retention may have removed some between the two reads; that is a gap.
                if entries.len() as u64 != missed {
                    joined.recovery = Some(Recovery::Impossible(Unrecoverable::OffsetTooOld));
                } else {
                    let replay: Vec<Frame> =
                        entries.iter().map(|e| replay_frame(e, channel)).collect();
                    let bytes = replay.iter().map(|f| f.as_str().len() as u64).sum();
                    if budget.charge(bytes) {
                        joined.replay = replay;
                        joined.recovery = Some(recovery);
                    } else {
                        joined.rate_limited = true;
                    }
                }
            } else {
                joined.recovery = Some(recovery);
            }
        }
        Ok(register(joined))
    }

    /// Drops the channel's kept events and starts a new epoch (offsets go on counting), so
    /// clients holding the old epoch are told their position is gone. Returns the new
    /// position, or `None` if the channel keeps no history.
    pub async fn reset(
        &self,
        app: &App,
        channel: &str,
    ) -> Result<Option<ChannelPosition>, StoreError> {
        if self.retention(app, channel).is_none() {
            return Ok(None);
        }
        let slot = self.slot(&app.id, channel);
        let mut slot = slot.lock().await;
        let position = self.position(&mut slot, &app.id, channel).await?;
        let fresh = ChannelPosition {
            epoch: history::new_epoch(),
            next_offset: position.next_offset,
        };
        self.store.reset_history(&app.id, channel, &fresh).await?;
        *position = fresh.clone();
        Ok(Some(fresh))
    }

    /// A page of the channel's history, and its position.
    pub async fn page(
        &self,
        app: &App,
        channel: &str,
        after: Option<u64>,
        before: Option<u64>,
        limit: u32,
        newest_first: bool,
    ) -> Result<Option<Page>, StoreError> {
        let Some(retention) = self.retention(app, channel) else {
            return Ok(None);
        };
        let position = self.store.channel_position(&app.id, channel).await?;
        let floor = position
            .as_ref()
            .map_or(0, |p| kept_after(p.next_offset - 1, retention));
        let after = match after {
            Some(after) => Some(after.max(floor)),
            None if floor > 0 => Some(floor),
            None => None,
        };
        let entries = self
            .store
            .history(
                &app.id,
                channel,
                &HistoryQuery {
                    after,
                    before,
                    limit,
                    newest_first,
                    not_before: not_before(retention),
                },
            )
            .await?;
        Ok(Some(Page { position, entries }))
    }
}

impl History {
    /// Deletes what every history channel keeps beyond its retention, including channels
    /// that went quiet (appends trim only the channel they write to) and channels no rule
    /// matches any more. Returns how many events were deleted.
    pub async fn purge(&self) -> Result<u64, StoreError> {
        const PAGE: u32 = 500;
        self.forget_idle_positions();
        let unused = self.store.forget_unused_channel_positions().await?;
        if unused > 0 {
            tracing::info!(
                unused,
                "forgot positions of history channels nothing was appended to"
            );
        }
        let mut deleted = 0;
        let mut after: Option<(String, String)> = None;
        loop {
            let page = self
                .store
                .history_channels(after.as_ref().map(|(a, c)| (a.as_str(), c.as_str())), PAGE)
                .await?;
            for (app_id, channel, position) in &page {
                let Some(app) = self.store.get_app(app_id).await? else {
                    continue;
                };
                let newest = position.next_offset - 1;
                let (up_to, not_before) = match self.retention(&app, channel) {
                    Some(retention) => (kept_after(newest, retention), not_before(retention)),
                    None => (newest, Utc::now()),
                };
                deleted += self
                    .store
                    .trim_history(app_id, channel, up_to, not_before)
                    .await?;
            }
            match page.last() {
                Some((app_id, channel, _)) if page.len() == PAGE as usize => {
                    after = Some((app_id.clone(), channel.clone()));
                }
                _ => return Ok(deleted),
            }
        }
    }
}

/// A kept event as its frame, as it was first sent.
fn replay_frame(entry: &HistoryEntry, channel: &str) -> Frame {
    let json = entry
        .raw_json
        .then(|| serde_json::from_str::<&RawValue>(&entry.data).ok())
        .flatten();
    let data = match json {
        Some(json) => Data::Json(json),
        None => Data::Text(&entry.data),
    };
    protocol::history_event(
        &entry.event,
        channel,
        data,
        entry.user_id.as_deref(),
        &entry.epoch,
        entry.offset,
    )
}

/// Offsets up to this one are past the retention count (`newest` is the newest offset).
fn kept_after(newest: u64, retention: Retention) -> u64 {
    newest.saturating_sub(retention.max_events)
}

fn not_before(retention: Retention) -> chrono::DateTime<Utc> {
    let max_age = chrono::Duration::from_std(retention.max_age).unwrap_or(chrono::Duration::MAX);
    Utc::now()
        .checked_sub_signed(max_age)
        .unwrap_or(chrono::DateTime::<Utc>::MIN_UTC)
}
