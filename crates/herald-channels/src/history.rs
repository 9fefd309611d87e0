//! History channels: every event published to one is kept in the store, where it gets the
//! channel's next offset in the commit that keeps it, before any subscriber sees it; a
//! subscriber can resume after the last position it saw.
//!
//! Resuming is a merge, not a lock (centrifuge's model): the subscriber is added to the hub
//! first, with broadcasts held for it ([`crate::hub::AppHub::subscribe_joining`]); then
//! [`History::recover`] reads the channel's position and what was missed from the store; then
//! [`crate::hub::AppHub::go_live`] queues the replay and the held events past it. An event
//! committed before the read is in the replay; one committed after it is broadcast after the
//! subscriber was added, so it was held. Nothing is lost or repeated, whichever node published
//! it, and no lock spans the read.
//!
//! A channel nothing was appended to has no stored position: it is reported at offset 0 with an
//! epoch derived from its name, and a client at offset 0 recovers whatever the epoch
//! (`history::recovery`), so subscribing stores nothing.
//!
//! A resume's replay is priced before it is read: the store sums the bytes of the missed range,
//! and the replay is read only if the client's address can pay for it (see [`ReplayBudget`]).

use herald_core::AppId;
use std::sync::Arc;

use chrono::Utc;
use herald_core::{
    history::{
        self, ChannelPosition, HistoryEntry, HistoryRule, Recovery, Retention, Unrecoverable,
    },
    model::App,
};
use herald_store::{HistoryQuery, Store, StoreError};

use crate::publication::Publication;

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

pub struct History {
    store: Arc<dyn Store>,
    config: HistoryConfig,
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

    /// Whether `bytes` could ever be paid at once (no more than the budget's burst): a replay
    /// that could not is refused for good, not for now.
    fn could_ever_pay(&self, bytes: u64) -> bool;
}

/// The most events [`History::between`] reads at once. A gap is the few publications of other
/// nodes that a bus delivered after a later one; a larger one is read in several turns.
pub const MAX_GAP_READ: u64 = 1000;

/// The kept events of `channel` between `after` and `before` (both exclusive), oldest first,
/// at most `limit`, whatever their age: offsets a node must hand on before a later one.
pub async fn kept_between(
    store: &dyn Store,
    app_id: &AppId,
    channel: &str,
    after: u64,
    before: u64,
    limit: u64,
) -> Result<Vec<Arc<Publication>>, StoreError> {
    let missing = before.saturating_sub(after).saturating_sub(1);
    let entries = store
        .history(
            app_id,
            channel,
            &HistoryQuery {
                after: Some(after),
                before: Some(before),
                limit: u32::try_from(missing.min(limit)).unwrap_or(u32::MAX),
                newest_first: false,
                not_before: chrono::DateTime::<Utc>::MIN_UTC,
            },
        )
        .await?;
    Ok(entries
        .iter()
        .map(|e| Arc::new(Publication::from_history(e)))
        .collect())
}

/// The `reason` of a recovery the replay budget refused.
pub const RATE_LIMITED: &str = "rate_limited";

/// What a joining subscriber learns: where the channel stands and what it missed.
pub struct Joined {
    pub epoch: String,
    /// The newest offset (0 before the first event).
    pub offset: u64,
    /// Present when the subscriber asked to resume (and `None` when the budget refused it).
    pub recovery: Option<Recovery>,
    /// The missed events, oldest first.
    pub replay: Vec<Arc<Publication>>,
    /// The events could be replayed but the replay budget refused them: the status says
    /// `recovered: false` with the reason `rate_limited`.
    pub rate_limited: bool,
    /// How many events were missed when that is `too_many_missed` only for the `max_replay`
    /// the caller passed to [`History::recover_at_most`], within the configured
    /// `history.max_replay`: a caller whose room was taken by other channels' replays may ask
    /// again once they are sent.
    pub missed_beyond_room: Option<u64>,
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

/// The most a page of history holds, in its events' data, names and user ids: a page stops
/// once it reaches this. An event may be as large as an API message (1 MiB by default), so a
/// thousand of them would be a gigabyte read, copied and serialized for one request.
pub const MAX_PAGE_BYTES: usize = 4 * 1024 * 1024;

/// How many events a page reads first, before their sizes are known: at most this many
/// events' worth over [`MAX_PAGE_BYTES`].
const FIRST_PAGE_READ: u32 = 4;

/// How many events a page reads at once at most, whatever the sizes so far: a read of small
/// events may be followed by large ones, so one read holds at most this many of them.
const MAX_PAGE_READ: u32 = 64;

/// What an event weighs in a page.
fn entry_bytes(entry: &HistoryEntry) -> usize {
    entry.data.len() + entry.event.len() + entry.user_id.as_ref().map_or(0, String::len)
}

impl History {
    pub fn new(store: Arc<dyn Store>, config: HistoryConfig) -> Self {
        Self { store, config }
    }

    /// The channel's retention, if it keeps history: the app's rules, else the defaults.
    pub fn retention(&self, app: &App, channel: &str) -> Option<Retention> {
        let rules = app.history.as_deref().unwrap_or(&self.config.default_rules);
        history::retention_for(rules, channel)
    }

    /// The position of a channel the store has none for (nothing was appended to it): offset
    /// 1, with an epoch derived from the channel's name and the app's secret, so every
    /// subscriber on every node of a cluster is told the same one, the first append (on any
    /// node) stores it, and clients cannot guess it. A client that saw nothing of such a
    /// channel has missed nothing, and resumes from offset 0 whatever the epoch it was told
    /// (`history::recovery`), so a secret rotation changing it harms no one.
    fn fresh_position(&self, app: &App, channel: &str) -> ChannelPosition {
        let mac = herald_core::pusher::sign(
            &app.pusher.secret,
            &format!("history-epoch\n{}\n{channel}", app.id),
        );
        ChannelPosition {
            epoch: mac.chars().take(16).collect(),
            next_offset: 1,
        }
    }

    /// The epoch a channel with no stored position is reported under, and starts under at its
    /// first event (see [`NewHistoryEntry::first_epoch`](herald_core::history::NewHistoryEntry)).
    pub fn fresh_epoch(&self, app: &App, channel: &str) -> String {
        self.fresh_position(app, channel).epoch
    }

    /// The channel's position as the store has it, or its fresh one.
    /// How many events a subscriber resuming at `resume` has missed, as the channel stands now
    /// (0 in another epoch, or ahead): the order in which a stream of several channels hands
    /// out its replay room, the largest backlog first.
    pub async fn backlog(
        &self,
        app: &App,
        channel: &str,
        resume: &Resume,
    ) -> Result<u64, StoreError> {
        let position = self.position(app, channel).await?;
        Ok(if position.epoch == resume.epoch {
            position
                .next_offset
                .saturating_sub(1)
                .saturating_sub(resume.offset)
        } else {
            0
        })
    }

    async fn position(&self, app: &App, channel: &str) -> Result<ChannelPosition, StoreError> {
        Ok(match self.store.channel_position(&app.id, channel).await? {
            Some(position) => position,
            None => self.fresh_position(app, channel),
        })
    }

    /// What a subscriber joining a history channel learns: the channel's position and, if it
    /// asked to `resume`, what it missed. Call it after the subscriber was added to the hub
    /// with broadcasts held (see the module's doc), then hand the result to `go_live` with
    /// [`Joined::offset`].
    ///
    /// The replay is priced before it is read: [`PRICING_COST`], then the missed range's bytes
    /// as the store sums them (plus each frame's envelope) are charged to `budget`, and the
    /// events are read only if it pays for all of them; otherwise nothing more is charged or
    /// read, and the status says `rate_limited` (`Joined::rate_limited`). A replay larger than
    /// the budget's burst is never read: the client pages through the history API instead.
    pub async fn recover(
        &self,
        app: &App,
        channel: &str,
        retention: Retention,
        resume: Option<&Resume>,
        budget: &dyn ReplayBudget,
    ) -> Result<Joined, StoreError> {
        self.recover_at_most(
            app,
            channel,
            retention,
            resume,
            budget,
            self.config.max_replay,
        )
        .await
    }

    /// [`History::recover`] replaying at most `max_replay` events (never more than the
    /// configured `max_replay`): more missed is `too_many_missed`. For a subscriber that joins
    /// several channels before anything is written to it, so their replays together fit its
    /// outbox.
    pub async fn recover_at_most(
        &self,
        app: &App,
        channel: &str,
        retention: Retention,
        resume: Option<&Resume>,
        budget: &dyn ReplayBudget,
        max_replay: u64,
    ) -> Result<Joined, StoreError> {
        let position = self.position(app, channel).await?;
        let newest = position.next_offset - 1;
        let mut joined = Joined {
            epoch: position.epoch.clone(),
            offset: newest,
            recovery: None,
            replay: Vec::new(),
            rate_limited: false,
            missed_beyond_room: None,
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
            &position,
            oldest,
            &resume.epoch,
            resume.offset,
            max_replay.min(self.config.max_replay),
        );
        let missed = match recovery {
            Recovery::Complete { missed } if missed > 0 => missed,
            _ => {
                if recovery == Recovery::Impossible(Unrecoverable::TooMany)
                    && let Recovery::Complete { missed } = history::recovery(
                        &position,
                        oldest,
                        &resume.epoch,
                        resume.offset,
                        self.config.max_replay,
                    )
                {
                    joined.missed_beyond_room = Some(missed);
                }
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
        // More than the budget ever holds: asking again would never help (an SSE stream
        // would reconnect for good), so it is `too_many_missed`, as a long replay is.
        if !budget.could_ever_pay(price.saturating_sub(PRICING_COST)) {
            joined.recovery = Some(Recovery::Impossible(Unrecoverable::TooMany));
            return Ok(joined);
        }
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
            joined.replay = entries
                .iter()
                .map(|e| Arc::new(Publication::from_history(e)))
                .collect();
            joined.recovery = Some(recovery);
        } else {
            joined.recovery = Some(Recovery::Impossible(Unrecoverable::OffsetTooOld));
        }
        Ok(joined)
    }

    /// The kept events of `channel` between `after` and `before` (both exclusive), oldest
    /// first, at most [`MAX_GAP_READ`]: what the publications held for a joining subscriber
    /// skipped (see [`AppHub::go_live_in_order`](crate::hub::AppHub::go_live_in_order)).
    pub async fn between(
        &self,
        app_id: &AppId,
        channel: &str,
        after: u64,
        before: u64,
    ) -> Result<Vec<Arc<Publication>>, StoreError> {
        kept_between(
            self.store.as_ref(),
            app_id,
            channel,
            after,
            before,
            MAX_GAP_READ,
        )
        .await
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
        let position = self
            .store
            .reset_history(&app.id, channel, &history::new_epoch())
            .await?;
        Ok(Some(position))
    }

    /// A page of the channel's history, and its position: at most `limit` events, and no
    /// more than [`MAX_PAGE_BYTES`] of them (at least one), read a few dozen at most at a time,
    /// so a page of large events is never read whole; the caller pages on from its last offset.
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
        let mut query = HistoryQuery {
            after: match after {
                Some(after) => Some(after.max(floor)),
                None if floor > 0 => Some(floor),
                None => None,
            },
            // Nothing past the position the page reports: an event committed between the two
            // reads would be in the page and, since the client subscribes from that position,
            // replayed to it a second time.
            before: Some(
                before
                    .unwrap_or(u64::MAX)
                    .min(position.as_ref().map_or(1, |p| p.next_offset)),
            ),
            limit: 0,
            newest_first,
            not_before: not_before(retention),
        };
        // Read a few at first; once their sizes are known, as many as the rest of the budget
        // holds at that size.
        let mut entries: Vec<HistoryEntry> = Vec::new();
        let mut bytes = 0usize;
        let mut read_next = FIRST_PAGE_READ;
        while entries.len() < limit as usize && bytes < MAX_PAGE_BYTES {
            query.limit = read_next.min(limit - entries.len() as u32);
            let read = self.store.history(&app.id, channel, &query).await?;
            let full = read.len() == query.limit as usize;
            for entry in read {
                if bytes >= MAX_PAGE_BYTES {
                    break;
                }
                bytes += entry_bytes(&entry);
                entries.push(entry);
            }
            let Some(last) = entries.last() else { break };
            if !full {
                break;
            }
            // The next read goes on past the last event kept.
            if newest_first {
                query.before = Some(last.offset);
            } else {
                query.after = Some(last.offset);
            }
            // As many as the rest of the budget holds at the size seen so far, but never more
            // than a few dozen at once: small events first say nothing of the next ones.
            let average = (bytes / entries.len()).max(1);
            read_next = u32::try_from(MAX_PAGE_BYTES.saturating_sub(bytes) / average)
                .unwrap_or(u32::MAX)
                .clamp(1, MAX_PAGE_READ);
        }
        Ok(Some(Page { position, entries }))
    }
}

impl History {
    /// Deletes what every history channel keeps beyond its retention, including channels
    /// that went quiet (appends trim only the channel they write to) and channels no rule
    /// matches any more. Returns how many events were deleted. A channel whose trim fails is
    /// logged and passed over, and the first such failure is returned once every channel was
    /// tried: one that keeps failing (a statement timeout on a huge channel) must not leave
    /// every channel after it untrimmed, hour after hour.
    pub async fn purge(&self) -> Result<u64, StoreError> {
        const PAGE: u32 = 500;
        let unused = self.store.forget_unused_channel_positions().await?;
        if unused > 0 {
            tracing::info!(
                unused,
                "forgot positions of history channels nothing was appended to"
            );
        }
        let mut deleted = 0;
        let mut failed = None;
        let mut after: Option<(AppId, String)> = None;
        loop {
            let page = self
                .store
                .history_channels(after.as_ref().map(|(a, c)| (a, c.as_str())), PAGE)
                .await?;
            for (app_id, channel, position) in &page {
                let Some(app) = self.store.get_app(app_id.as_str()).await? else {
                    continue;
                };
                let newest = position.next_offset - 1;
                let (up_to, not_before) = match self.retention(&app, channel) {
                    Some(retention) => (kept_after(newest, retention), not_before(retention)),
                    None => (newest, Utc::now()),
                };
                match self
                    .store
                    .trim_history(app_id, channel, up_to, not_before)
                    .await
                {
                    Ok(trimmed) => deleted += trimmed,
                    Err(e) => {
                        tracing::warn!(error = %e, %app_id, channel, "trimming a history channel failed; the purge goes on");
                        failed.get_or_insert(e);
                    }
                }
            }
            match page.last() {
                Some((app_id, channel, _)) if page.len() == PAGE as usize => {
                    after = Some((app_id.clone(), channel.clone()));
                }
                _ => break,
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(deleted),
        }
    }
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
