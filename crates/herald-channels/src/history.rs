//! History channels: every event published to one is appended to the store with the next
//! offset before it is broadcast, and a subscriber can resume after the last position it saw.
//!
//! One lock per channel orders everything that touches its position: an append (store, then
//! broadcast) and a join (read what was missed, register the subscriber, queue the replay). So
//! a joining subscriber either finds an event in the store or receives it live, never both and
//! never neither: the seam between replay and live has no gap and no duplicate.
//!
//! Positions are cached in memory, one slot per channel, only while they are worth keeping: a
//! channel nothing was appended to has no stored position and its slot is dropped after each
//! join (its epoch is derived from its name, so a new slot gives it the same one), and at most
//! [`MAX_CACHED_POSITIONS`] slots are kept, idle ones evicted first. Joining any number of
//! distinct channels costs no memory once the joins are done.
//!
//! A resume's replay is priced before it is read: the store sums the bytes of the missed range,
//! and the replay is read only if the client's address can pay for it (see [`ReplayBudget`]).

use std::{
    collections::HashMap,
    future::Future,
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

/// Position slots kept at most; beyond, idle ones are evicted (they are read from the store
/// again on next use). Slots in use are bounded by the appends and joins running at once.
pub const MAX_CACHED_POSITIONS: usize = 100_000;

/// What a resume pays for being priced (the store's sum over the missed range) even when it is
/// then refused: without it a client could make the store sum ranges it cannot afford at the
/// subscribe rate of all its connections. A replay that is granted pays this as part of its
/// bytes. At the default 2 MiB a second, one address can have at most 2,048 ranges priced a
/// second; a legitimate resume costs no more than it would anyway, a KiB at least.
pub const PRICING_COST: u64 = 1024;

/// What a replayed frame adds to the event's stored bytes: the JSON members' names and quotes
/// (about 60 bytes), the offset (up to 20 digits), plus the channel name and epoch, counted
/// separately. String escaping is not counted: the budget is in bytes as kept, not as sent.
const FRAME_OVERHEAD: u64 = 80;

/// A channel's position as cached, and whether the store has it.
struct Cached {
    position: ChannelPosition,
    /// Loaded from the store, or written by an append or a reset. A slot whose position is
    /// not stored is the channel's [`History::fresh_position`] and may be dropped at any time
    /// it is not in use: a new slot starts the same.
    stored: bool,
}

type PositionSlot = Arc<tokio::sync::Mutex<Option<Cached>>>;

pub struct History {
    store: Arc<dyn Store>,
    hub: Arc<Hub>,
    config: HistoryConfig,
    positions: Mutex<HashMap<(String, String), PositionSlot>>,
    max_cached_positions: usize,
    /// Secret per process: the epoch of a channel with no stored position is derived from it
    /// and the channel's name.
    epoch_seed: String,
}

/// Where a resuming client left off.
#[derive(Debug, Clone)]
pub struct Resume {
    pub epoch: String,
    pub offset: u64,
}

/// The bytes of history a subscriber may still be replayed (see `limits::ClientPermit`).
pub trait ReplayBudget: Sync {
    /// Takes `bytes` if the budget holds them all, and then they may be read and replayed;
    /// otherwise takes nothing (a refusal never puts the budget into debt).
    fn try_charge(&self, bytes: u64) -> bool;
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
            max_cached_positions: MAX_CACHED_POSITIONS,
            epoch_seed: format!("{}{}", history::new_epoch(), history::new_epoch()),
        }
    }

    /// Keeps at most `max` position slots instead of [`MAX_CACHED_POSITIONS`] (for tests).
    #[doc(hidden)]
    pub fn with_max_cached_positions(mut self, max: usize) -> Self {
        self.max_cached_positions = max;
        self
    }

    /// How many channel positions are cached in memory (for tests).
    #[doc(hidden)]
    pub fn cached_positions(&self) -> usize {
        self.lock_positions().len()
    }

    fn lock_positions(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), PositionSlot>> {
        self.positions.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// The channel's retention, if it keeps history: the app's rules, else the defaults.
    pub fn retention(&self, app: &App, channel: &str) -> Option<Retention> {
        let rules = app.history.as_deref().unwrap_or(&self.config.default_rules);
        history::retention_for(rules, channel)
    }

    /// The channel's slot, created if it has none. When the map is full, idle slots are
    /// evicted first (see [`Self::forget_idle_positions`]).
    fn slot(&self, app_id: &str, channel: &str) -> PositionSlot {
        let key = (app_id.to_owned(), channel.to_owned());
        let mut positions = self.lock_positions();
        if positions.len() >= self.max_cached_positions && !positions.contains_key(&key) {
            positions.retain(|_, slot| Arc::strong_count(slot) > 1);
            tracing::debug!(
                in_use = positions.len(),
                "the channel position cache was full; evicted the idle positions"
            );
        }
        Arc::clone(positions.entry(key).or_default())
    }

    /// Drops cached positions nobody is using; they are read from the store again on next
    /// use. A slot is in use while an append or join holds its `Arc`, and new holders clone
    /// it under the same map lock, so a count of one means free.
    fn forget_idle_positions(&self) {
        self.lock_positions()
            .retain(|_, slot| Arc::strong_count(slot) > 1);
    }

    /// Drops `slot`, whose lock the caller holds (`cached` is its content), if its position is
    /// not stored and nobody else holds it: joining a channel nothing was appended to leaves
    /// nothing behind, however many distinct names are joined.
    ///
    /// Why this keeps the seam exact: appends and joins of one channel are ordered by its
    /// slot's lock, so there must never be two slots of one channel in use at once (an append
    /// on a new slot could then run while a join still reads and registers on the old one).
    /// The slot is removed under the map lock, only if the map still holds this very slot and
    /// its only holders are the map and the caller. Everyone who gets a slot clones it under
    /// that same lock, so at that moment no append or join holds or waits for this one, and
    /// from then on nobody can get it; the caller has finished its work under the slot's lock
    /// (the join has registered its subscriber, so an append on a new slot reaches it live).
    /// The new slot starts with the same position (the store's, or the same
    /// [`Self::fresh_position`]), so nothing is lost or renumbered either.
    fn release_if_unstored(
        &self,
        app_id: &str,
        channel: &str,
        slot: &PositionSlot,
        cached: &Option<Cached>,
    ) {
        if cached.as_ref().is_some_and(|c| c.stored) {
            return;
        }
        let mut positions = self.lock_positions();
        let key = (app_id.to_owned(), channel.to_owned());
        if positions
            .get(&key)
            .is_some_and(|held| Arc::ptr_eq(held, slot) && Arc::strong_count(slot) == 2)
        {
            positions.remove(&key);
        }
    }

    /// The position of a channel the store has none for (nothing was appended to it): offset
    /// 1, with an epoch derived from the channel's name and this process's secret. Any slot of
    /// the channel starts the same, so its slot can be dropped between uses without telling
    /// two subscribers different epochs, and the first append stores this epoch. After a
    /// restart the epoch differs, as a random one would; a client that saw nothing of such a
    /// channel has missed nothing (`history::recovery`).
    fn fresh_position(&self, app_id: &str, channel: &str) -> ChannelPosition {
        let mac = herald_core::pusher::sign(&self.epoch_seed, &format!("{app_id}\n{channel}"));
        ChannelPosition {
            epoch: mac.chars().take(16).collect(),
            next_offset: 1,
        }
    }

    /// The channel's position, kept in its slot: loaded from the store on first use, or the
    /// channel's [`Self::fresh_position`]. A fresh position is stored by the first append, not
    /// here: anyone may subscribe to a public history channel, and a row per name subscribed to
    /// would let them fill the disk.
    async fn position<'s>(
        &self,
        slot: &'s mut Option<Cached>,
        app_id: &str,
        channel: &str,
    ) -> Result<&'s mut ChannelPosition, StoreError> {
        if slot.is_none() {
            let cached = match self.store.channel_position(app_id, channel).await? {
                Some(position) => Cached {
                    position,
                    stored: true,
                },
                None => Cached {
                    position: self.fresh_position(app_id, channel),
                    stored: false,
                },
            };
            *slot = Some(cached);
        }
        let Some(cached) = slot.as_mut() else {
            unreachable!("filled above")
        };
        Ok(&mut cached.position)
    }

    /// Publishes one event to one channel, storing nothing but its history entry (if the
    /// channel keeps history): a publication without a webhook message. Returns how many
    /// subscribers it was handed to.
    pub async fn publish(
        &self,
        app: &App,
        channel: &str,
        event: &str,
        data: &str,
        except: Option<&str>,
    ) -> Result<usize, StoreError> {
        let store = Arc::clone(&self.store);
        let channels = [channel.to_owned()];
        let ((), sent) = self
            .publish_with(app, &channels, event, data, except, |history| async move {
                if !history.is_empty() {
                    store.store_publication(None, history).await?;
                }
                Ok(((), true))
            })
            .await?;
        Ok(sent)
    }

    /// Publishes one event to `channels` (but socket `except`): the entries for the channels
    /// that keep history get their next offsets, `commit` stores them together with whatever
    /// else the publication stores (its webhook message), in one commit, and only then does
    /// every channel's frame go out, history channels' frames carrying their positions.
    ///
    /// The history channels' locks are held, taken in name order so two publications never
    /// wait for each other crosswise, from reading the positions to the broadcast: offsets
    /// stay in order and the seam with joins stays exact. `commit` answers whether it stored
    /// the entries (an inbound webhook seen before stores nothing and publishes nothing).
    /// Returns `commit`'s value and how many subscribers the frames were handed to.
    pub async fn publish_with<T, F, Fut>(
        &self,
        app: &App,
        channels: &[String],
        event: &str,
        data: &str,
        except: Option<&str>,
        commit: F,
    ) -> Result<(T, usize), StoreError>
    where
        F: FnOnce(Vec<(HistoryEntry, Retention)>) -> Fut,
        Fut: Future<Output = Result<(T, bool), StoreError>>,
    {
        let mut kept: Vec<(&str, Retention)> = channels
            .iter()
            .filter_map(|c| self.retention(app, c).map(|r| (c.as_str(), r)))
            .collect();
        kept.sort_unstable_by(|a, b| a.0.cmp(b.0));
        kept.dedup_by(|a, b| a.0 == b.0);
        let slots: Vec<PositionSlot> = kept
            .iter()
            .map(|(channel, _)| self.slot(&app.id, channel))
            .collect();
        let mut guards = Vec::with_capacity(slots.len());
        for slot in &slots {
            guards.push(slot.lock().await);
        }
        let now = Utc::now();
        let mut entries = Vec::with_capacity(kept.len());
        for ((channel, retention), cached) in kept.iter().zip(guards.iter_mut()) {
            let position = self.position(cached, &app.id, channel).await?;
            entries.push((
                HistoryEntry {
                    app_id: app.id.clone(),
                    channel: (*channel).to_owned(),
                    epoch: position.epoch.clone(),
                    offset: position.next_offset,
                    event: event.to_owned(),
                    data: data.to_owned(),
                    raw_json: false,
                    user_id: None,
                    created_at: now,
                },
                *retention,
            ));
        }
        let positions: Vec<(String, u64)> = entries
            .iter()
            .map(|(e, _)| (e.epoch.clone(), e.offset))
            .collect();
        let (value, stored) = match commit(entries).await {
            Ok(committed) => committed,
            Err(e) => {
                for ((channel, _), (slot, cached)) in kept.iter().zip(slots.iter().zip(&guards)) {
                    self.release_if_unstored(&app.id, channel, slot, cached);
                }
                return Err(e);
            }
        };
        if !stored {
            return Ok((value, 0));
        }
        for cached in guards.iter_mut().filter_map(|guard| guard.as_mut()) {
            cached.position.next_offset += 1;
            cached.stored = true;
        }
        let hub = self.hub.app(&app.id);
        let mut sent = 0;
        let mut seen: Vec<&str> = Vec::with_capacity(channels.len());
        for channel in channels {
            if seen.contains(&channel.as_str()) {
                continue;
            }
            seen.push(channel);
            let frame = match kept.binary_search_by(|(c, _)| (*c).cmp(channel.as_str())) {
                Ok(at) => {
                    let (epoch, offset) = &positions[at];
                    protocol::history_event(event, channel, Data::Text(data), None, epoch, *offset)
                }
                Err(_) => protocol::event(event, channel, data),
            };
            sent += hub.broadcast(channel, &frame, except);
        }
        drop(guards);
        Ok((value, sent))
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
        let mut cached = slot.lock().await;
        let sent = self
            .append_locked(&mut cached, app, channel, retention, event, data, user_id)
            .await
            .map(send);
        // Only a failed append can leave a position that is not stored.
        self.release_if_unstored(&app.id, channel, &slot, &cached);
        sent
    }

    /// [`Self::append`]'s work under the slot's lock: stores the event, returns its frame.
    #[allow(clippy::too_many_arguments)]
    async fn append_locked(
        &self,
        cached: &mut Option<Cached>,
        app: &App,
        channel: &str,
        retention: Retention,
        event: &str,
        data: Data<'_>,
        user_id: Option<&str>,
    ) -> Result<Frame, StoreError> {
        let position = self.position(cached, &app.id, channel).await?;
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
        if let Some(cached) = cached.as_mut() {
            // The append stored the position.
            cached.stored = true;
        }
        Ok(frame)
    }

    /// Joins a history channel: under the channel's lock, works out what `resume` missed,
    /// then calls `register`, which must add the subscriber to the hub and queue its frames
    /// (the confirmation, then `Joined::replay`) before the lock is released.
    ///
    /// The replay is priced before it is read: [`PRICING_COST`], then the missed range's bytes
    /// as the store sums them (plus each frame's envelope) are charged to `budget`, and the
    /// events are read only if it pays for all of them; otherwise nothing more is charged or
    /// read, and the status says `rate_limited` (`Joined::rate_limited`). A replay larger than
    /// the budget's burst is never read: the client pages through the history API instead.
    ///
    /// A channel nothing was appended to keeps no slot after its join (see
    /// [`Self::release_if_unstored`]).
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
        let mut cached = slot.lock().await;
        let registered = self
            .join_locked(&mut cached, app, channel, retention, resume, budget)
            .await
            .map(register);
        // After the subscriber is registered (or the join failed), still under the lock.
        self.release_if_unstored(&app.id, channel, &slot, &cached);
        registered
    }

    /// [`Self::join`]'s work under the slot's lock, up to registering.
    async fn join_locked(
        &self,
        cached: &mut Option<Cached>,
        app: &App,
        channel: &str,
        retention: Retention,
        resume: Option<&Resume>,
        budget: &dyn ReplayBudget,
    ) -> Result<Joined, StoreError> {
        let position = self.position(cached, &app.id, channel).await?;
        let newest = position.next_offset - 1;
        let mut joined = Joined {
            epoch: position.epoch.clone(),
            offset: newest,
            recovery: None,
            replay: Vec::new(),
            rate_limited: false,
        };
        let Some(resume) = resume else {
            return Ok(joined);
        };
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
        let missed = match recovery {
            Recovery::Complete { missed } if missed > 0 => missed,
            _ => {
                joined.recovery = Some(recovery);
                return Ok(joined);
            }
        };
        if !budget.try_charge(PRICING_COST) {
            joined.rate_limited = true;
            return Ok(joined);
        }
        let kept = self
            .store
            .history_bytes(
                &app.id,
                channel,
                resume.offset,
                position.next_offset,
                not_before,
            )
            .await?;
        let envelope = FRAME_OVERHEAD + channel.len() as u64 + position.epoch.len() as u64;
        let price = kept.saturating_add(missed.saturating_mul(envelope));
        if !budget.try_charge(price.saturating_sub(PRICING_COST)) {
            joined.rate_limited = true;
            return Ok(joined);
        }
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
        // Retention may have removed some between the reads; that is a gap.
        if entries.len() as u64 == missed {
            joined.replay = entries.iter().map(|e| replay_frame(e, channel)).collect();
            joined.recovery = Some(recovery);
        } else {
            joined.recovery = Some(Recovery::Impossible(Unrecoverable::OffsetTooOld));
        }
        Ok(joined)
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
        let mut cached = slot.lock().await;
        let reset = self.reset_locked(&mut cached, app, channel).await;
        self.release_if_unstored(&app.id, channel, &slot, &cached);
        reset.map(Some)
    }

    async fn reset_locked(
        &self,
        cached: &mut Option<Cached>,
        app: &App,
        channel: &str,
    ) -> Result<ChannelPosition, StoreError> {
        let position = self.position(cached, &app.id, channel).await?;
        let fresh = ChannelPosition {
            epoch: history::new_epoch(),
            next_offset: position.next_offset,
        };
        self.store.reset_history(&app.id, channel, &fresh).await?;
        *position = fresh.clone();
        if let Some(cached) = cached.as_mut() {
            cached.stored = true;
        }
        Ok(fresh)
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
