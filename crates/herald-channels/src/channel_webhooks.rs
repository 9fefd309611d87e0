//! Pusher channel webhooks: `channel_occupied`, `channel_vacated`, `member_added`,
//! `member_removed` and `client_event`, as Pusher sends them.
//!
//! The hub reports each change of channel state to [`ChannelWebhooks`] (in the order the
//! changes happened). Vacated and removed are held for a short delay: if the channel is
//! occupied again, or the user rejoins, within it, neither event is sent, so a page reload does
//! not flap. Events are batched per app into Pusher's `{time_ms, events}` body and stored as a
//! message for the app's `pusher`-format endpoints whose filters want them (event types match
//! the event names, channels the event's channel). From there the durable delivery engine
//! takes over: retries, the attempt log, resend; the worker signs with `X-Pusher-Key` and
//! `X-Pusher-Signature`.
//!
//! Who is in which channel is recorded in the same commit as the messages that report it, so a
//! process that stops without reporting its leaves (a crash, a kill) leaves a record behind,
//! and the next start reports them ([`ChannelWebhooks::recover`]). What waits in memory when
//! the process dies is thereby accounted for: leaves are recovered; joins not yet stored were
//! never reported, and the channel is empty after the restart, so the receiver's view stays
//! consistent; client events not yet stored are lost, like the relay of a client event to a
//! socket that closes. Everything waiting counts against `max_pending`, delayed leaves too.

use herald_core::{AppId, EndpointId};
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use crate::{
    hub::{ChannelEvent, ChannelObserver},
    publisher::Publisher,
};
use bytes::Bytes;
use herald_core::model::{EndpointFormat, Message};
use herald_metrics::ChannelMetrics;
use herald_store::{OccupancyChange, Occupant, Store};
use serde::Serialize;
use tokio::{sync::Notify, time::Instant};
use tokio_util::sync::CancellationToken;

/// The event type under which channel webhooks appear in the message log.
pub const EVENT_TYPE: &str = "pusher.channel_webhook";
/// Events in one webhook body at most; a larger batch is split.
const MAX_EVENTS_PER_WEBHOOK: usize = 100;
/// Events happening (or, delayed ones, falling due) within this much of each other go in one
/// batch: a channel's occupancy and its first member, or a user's last leave and the channel's
/// vacancy, are reported a few milliseconds apart when a cluster decides them, and a receiver
/// should get them in one body, in order, as from one node.
const COALESCE: Duration = Duration::from_millis(100);
/// Pause after a store error before trying the batch again.
const ERROR_BACKOFF: Duration = Duration::from_secs(1);
/// How many times in a row the store may refuse one app's data (as such: a constraint, a value
/// it cannot hold) before its waiting events are tried one by one, and those it refuses alone
/// dropped and counted ([`ChannelWebhooks::narrow`]): they would otherwise be retried without
/// end.
const MAX_REFUSALS: u32 = 5;
/// Events tried one by one in one pass of [`ChannelWebhooks::narrow`]: one app's waiting events
/// may be tens of thousands, and the loop stores no other app's meanwhile.
const NARROW_PER_PASS: usize = 100;
/// How many times the events still waiting at shutdown are tried before they are dropped.
const TRIES_WHILE_STOPPING: u32 = 3;

#[derive(Debug, Clone)]
pub struct ChannelWebhookConfig {
    /// How long `channel_vacated` and `member_removed` wait for a rejoin that cancels them.
    pub delay: Duration,
    /// Events waiting to be stored at most; beyond it new events are dropped and counted.
    pub max_pending: usize,
}

/// The most one app's events may take of `max_pending` (see [`Pending::per_app`]).
fn per_app_cap(config: &ChannelWebhookConfig) -> usize {
    (config.max_pending / 2).max(1)
}

impl Default for ChannelWebhookConfig {
    fn default() -> Self {
        Self {
            delay: Duration::from_secs(3),
            max_pending: 100_000,
        }
    }
}

pub struct ChannelWebhooks {
    pending: Mutex<Pending>,
    wake: Notify,
    store: Arc<dyn Store>,
    config: ChannelWebhookConfig,
    /// Counts dropped events as they are dropped (the log reports them per batch).
    metrics: Arc<ChannelMetrics>,
    /// Whether this store's occupancy is reported as left at the next start ([`Self::recover`]
    /// ran: one node on its own store), so a graceful stop may leave its waiting leaves to it.
    next_start_reports_leaves: AtomicBool,
}

#[derive(Default)]
struct Pending {
    /// Events to store, in the order they happened.
    ready: Vec<(AppId, ChannelEvent)>,
    /// Vacated and removed events waiting out the delay, by when they fall due.
    delayed: BTreeMap<(Instant, u64), (AppId, ChannelEvent)>,
    /// Where each delayed event sits in `delayed`, so a rejoin can cancel it.
    delayed_at: HashMap<DelayKey, (Instant, u64)>,
    /// How many of the waiting events (ready and delayed) are each app's: one app may hold
    /// at most half of `max_pending`, so its clients (anyone with its public key can occupy
    /// and vacate channels) cannot crowd every other app's events out.
    per_app: HashMap<AppId, usize>,
    sequence: u64,
    dropped: u64,
    /// Joins (`channel_occupied`, `member_added`) dropped for want of room: their leave is
    /// dropped too, so the receiver never gets a `channel_vacated` or `member_removed` for a
    /// channel or member it was not told of. At most `max_pending` are remembered; only when
    /// `pair_drops`.
    dropped_joins: HashSet<DelayKey>,
    /// One node on its own store ([`ChannelWebhooks::recover`] ran), which observes every
    /// join and leave of its channels. In a cluster a channel's join and its leave may be
    /// observed on two nodes, and a join dropped on one would wrongly drop a later, real
    /// leave on it.
    pair_drops: bool,
    /// Apps whose data the store refused, and how many times in a row
    /// ([`ChannelWebhooks::isolate`]); a stored batch of the app takes it out.
    refusals: HashMap<AppId, u32>,
}

/// A delayed event's identity: the channel, and the user for `member_removed`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct DelayKey {
    app_id: AppId,
    channel: String,
    user_id: Option<String>,
}

impl DelayKey {
    fn new(app_id: &AppId, channel: &str, user_id: Option<&str>) -> Self {
        Self {
            app_id: app_id.to_owned(),
            channel: channel.to_owned(),
            user_id: user_id.map(str::to_owned),
        }
    }
}

/// Events the store did not take, and whether it refused the data itself (a constraint, a
/// value it cannot hold: the same write fails again) rather than failing to answer.
#[derive(Debug)]
struct Refused {
    events: Vec<(AppId, ChannelEvent)>,
    permanent: bool,
}

#[derive(Serialize)]
struct Body<'a> {
    time_ms: i64,
    events: Vec<&'a ChannelEvent>,
}

impl ChannelObserver for ChannelWebhooks {
    fn observe(&self, app_id: &AppId, event: ChannelEvent) {
        let (queued, dropped) = {
            let mut pending = self.lock();
            let before = pending.dropped;
            let queued = pending.accept(app_id, event, &self.config, Instant::now());
            (queued, pending.dropped > before)
        };
        if queued {
            self.wake.notify_one();
        } else if dropped {
            self.metrics.channel_webhook_events_dropped_total.inc();
        }
    }
}

impl Pending {
    /// Takes one reported change: a rejoin cancels the pending leave (and is not reported
    /// either), a leave waits out the delay, anything else is ready; beyond `max_pending`
    /// waiting events (delayed ones too) it is dropped and counted. Returns whether something
    /// was queued, so the runner should look.
    fn accept(
        &mut self,
        app_id: &AppId,
        event: ChannelEvent,
        config: &ChannelWebhookConfig,
        now: Instant,
    ) -> bool {
        let key = || DelayKey::new(app_id, event.channel(), event.user_id());
        let join = matches!(
            event,
            ChannelEvent::Occupied { .. } | ChannelEvent::MemberAdded { .. }
        );
        let leave = matches!(
            event,
            ChannelEvent::Vacated { .. } | ChannelEvent::MemberRemoved { .. }
        );
        if join && self.cancel(&key()) {
            return false;
        }
        if leave && !self.dropped_joins.is_empty() && self.dropped_joins.remove(&key()) {
            self.dropped += 1;
            return false;
        }
        if self.ready.len() + self.delayed.len() >= config.max_pending
            || self.per_app.get(app_id).copied().unwrap_or(0) >= per_app_cap(config)
        {
            self.dropped += 1;
            if join && self.pair_drops && self.dropped_joins.len() < config.max_pending {
                self.dropped_joins.insert(key());
            }
            return false;
        }
        if join && !self.dropped_joins.is_empty() {
            self.dropped_joins.remove(&key());
        }
        self.count_in(app_id);
        if matches!(
            event,
            ChannelEvent::Vacated { .. } | ChannelEvent::MemberRemoved { .. }
        ) && !config.delay.is_zero()
        {
            self.delay(key(), event, now + config.delay);
        } else {
            self.ready.push((app_id.to_owned(), event));
        }
        true
    }

    fn cancel(&mut self, key: &DelayKey) -> bool {
        match self.delayed_at.remove(key) {
            Some(slot) => {
                if self.delayed.remove(&slot).is_some() {
                    self.count_out(&key.app_id);
                }
                true
            }
            None => false,
        }
    }

    fn count_in(&mut self, app_id: &AppId) {
        *self.per_app.entry(app_id.clone()).or_insert(0) += 1;
    }

    /// An event left the queue (stored, cancelled or replaced); the app's entry goes at zero.
    fn count_out(&mut self, app_id: &AppId) {
        if let Some(count) = self.per_app.get_mut(app_id) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.per_app.remove(app_id);
            }
        }
    }

    /// The store took these apps' events: their refusals in a row start again from none.
    fn stored(&mut self, apps: &[AppId]) {
        if !self.refusals.is_empty() {
            for app_id in apps {
                self.refusals.remove(app_id);
            }
        }
    }

    /// Takes the ready events, as no longer waiting.
    fn take_ready(&mut self) -> Vec<(AppId, ChannelEvent)> {
        let ready = std::mem::take(&mut self.ready);
        for (app_id, _) in &ready {
            self.count_out(app_id);
        }
        ready
    }

    /// Puts events that could not be stored back in front of the newer ones, in order.
    fn put_back(&mut self, unsent: Vec<(AppId, ChannelEvent)>) {
        for (app_id, _) in &unsent {
            self.count_in(app_id);
        }
        let newer = std::mem::replace(&mut self.ready, unsent);
        self.ready.extend(newer);
    }

    fn delay(&mut self, key: DelayKey, event: ChannelEvent, due: Instant) {
        self.sequence += 1;
        let slot = (due, self.sequence);
        if let Some(old) = self.delayed_at.insert(key.clone(), slot)
            && self.delayed.remove(&old).is_some()
        {
            self.count_out(&key.app_id);
        }
        self.delayed.insert(slot, (key.app_id, event));
    }

    /// Moves delayed events due by `now` (all of them with `None`) to `ready`.
    fn release_due(&mut self, now: Option<Instant>) {
        while let Some(entry) = self.delayed.first_entry() {
            if now.is_some_and(|now| entry.key().0 > now) {
                break;
            }
            let (app_id, event) = entry.remove();
            self.delayed_at
                .remove(&DelayKey::new(&app_id, event.channel(), event.user_id()));
            self.ready.push((app_id, event));
        }
    }
}

impl ChannelWebhooks {
    pub fn new(
        store: Arc<dyn Store>,
        config: ChannelWebhookConfig,
        metrics: Arc<ChannelMetrics>,
    ) -> Self {
        Self {
            pending: Mutex::default(),
            wake: Notify::new(),
            store,
            config,
            metrics,
            next_start_reports_leaves: AtomicBool::new(false),
        }
    }

    /// Reports the leaves the previous run never sent: every occupant it recorded (a crash,
    /// a kill or a store failure stopped it before their `channel_vacated` or `member_removed`
    /// was stored). Call before connections are accepted. The leaves wait out the usual delay,
    /// so clients that reconnect at once cancel them and nothing flaps.
    pub async fn recover(&self) -> Result<usize, herald_store::StoreError> {
        let occupants = self.store.occupants().await?;
        // The next start will too: a graceful stop may leave its waiting leaves to it.
        self.next_start_reports_leaves
            .store(true, Ordering::Relaxed);
        let due = Instant::now() + self.config.delay;
        let mut pending = self.lock();
        pending.pair_drops = true;
        // Members leave before their channel is vacated, as they would have.
        let (members, channels): (Vec<_>, Vec<_>) =
            occupants.into_iter().partition(|o| o.user_id.is_some());
        // Within the bound on waiting events; the rest stay recorded for the next start.
        let room = self
            .config
            .max_pending
            .saturating_sub(pending.ready.len() + pending.delayed.len());
        let total = members.len() + channels.len();
        if total > room {
            tracing::warn!(
                total,
                reported = room,
                "more channel leaves to report than ws.webhook_max_pending allows; the rest wait for the next start"
            );
        }
        let count = total.min(room);
        for occupant in members.into_iter().chain(channels).take(count) {
            let event = match occupant.user_id.clone() {
                Some(user_id) => ChannelEvent::MemberRemoved {
                    channel: occupant.channel.clone(),
                    user_id,
                },
                None => ChannelEvent::Vacated {
                    channel: occupant.channel.clone(),
                },
            };
            pending.count_in(&occupant.app_id);
            if self.config.delay.is_zero() {
                pending.ready.push((occupant.app_id, event));
            } else {
                let key = DelayKey::new(&occupant.app_id, event.channel(), event.user_id());
                pending.delay(key, event, due);
            }
        }
        self.wake.notify_one();
        Ok(count)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        // Plain collections whose updates cannot panic halfway: recover from poisoning.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores batches as they come, through the publisher, until `stop`; then stores
    /// everything still waiting, delayed events included, and returns.
    pub async fn run(self: Arc<Self>, publisher: Arc<Publisher>, stop: CancellationToken) {
        self.run_with(|batch| self.store_batch(&publisher, batch), stop)
            .await;
    }

    /// [`Self::run`], storing each batch with `store`.
    async fn run_with<F, Fut>(&self, store: F, stop: CancellationToken)
    where
        F: Fn(Vec<(AppId, ChannelEvent)>) -> Fut,
        Fut: std::future::Future<Output = Result<(), Refused>>,
    {
        // Failed tries since the stop: a store that fails just then (a failover, a restart
        // of its own) gets a few more, [`ERROR_BACKOFF`] apart, before what waits is lost.
        let mut failed_while_stopping = 0;
        loop {
            let stopping = stop.is_cancelled();
            let (batch, next_due, dropped, counted) = {
                let mut pending = self.lock();
                // Never before their time: a rejoin until then cancels a leave.
                if !stopping {
                    pending.release_due(Some(Instant::now()));
                } else if self.next_start_reports_leaves.load(Ordering::Relaxed) {
                    // A graceful stop closed the connections just now, and their clients
                    // reconnect to the next start: the leaves still waiting stay recorded as
                    // occupancy, which that start reports after the same delay (`recover`),
                    // so a client back within it cancels them. Sent now, every channel and
                    // member would leave and rejoin at every restart.
                    let kept = pending.delayed.len();
                    pending.delayed.clear();
                    pending.delayed_at.clear();
                    if kept > 0 {
                        tracing::info!(
                            kept,
                            "channel leaves still within their delay are left for the next start to report"
                        );
                    }
                } else {
                    pending.release_due(None);
                }
                let next_due = pending.delayed.first_key_value().map(|(k, _)| k.0);
                let batch = pending.take_ready();
                // Only while some app's refusals are being counted: a success resets them.
                let counted: Option<Vec<AppId>> = (!pending.refusals.is_empty())
                    .then(|| batch.iter().map(|(app, _)| app.clone()).collect());
                (
                    batch,
                    next_due,
                    std::mem::take(&mut pending.dropped),
                    counted,
                )
            };
            if dropped > 0 {
                tracing::warn!(
                    dropped,
                    max_pending = self.config.max_pending,
                    "channel webhook events dropped: too many waiting to be stored"
                );
            }
            if !batch.is_empty() {
                let stored = match store(batch).await {
                    Ok(()) => {
                        if let Some(apps) = counted {
                            self.lock().stored(&apps);
                        }
                        Ok(())
                    }
                    // One app's events the store keeps refusing must not hold up every app's;
                    // a store that does not answer at all is simply tried again.
                    Err(refused) if self.store.ping().await.is_err() => Err(refused.events),
                    Err(refused) => {
                        let unsent = self.isolate(refused, &store).await;
                        if unsent.is_empty() {
                            Ok(())
                        } else {
                            Err(unsent)
                        }
                    }
                };
                if let Err(unsent) = stored {
                    if stopping {
                        failed_while_stopping += 1;
                        if failed_while_stopping >= TRIES_WHILE_STOPPING {
                            // Nothing will store them now: counted as dropped, with how many.
                            // Leaves stay recorded as occupied (the next start reports them);
                            // joins and client events are lost.
                            let lost = unsent.len();
                            self.metrics
                                .channel_webhook_events_dropped_total
                                .inc_by(u64::try_from(lost).unwrap_or(u64::MAX));
                            tracing::error!(
                                lost,
                                tries = TRIES_WHILE_STOPPING,
                                "channel webhook events could not be stored at shutdown; leaves are reported again at the next start"
                            );
                            return;
                        }
                        self.lock().put_back(unsent);
                        tokio::time::sleep(ERROR_BACKOFF).await;
                        continue;
                    }
                    // Put them back in front, keeping their order, and try again shortly.
                    self.lock().put_back(unsent);
                    tokio::select! {
                        () = tokio::time::sleep(ERROR_BACKOFF) => {}
                        () = stop.cancelled() => {}
                    }
                }
                continue;
            }
            if stopping {
                return;
            }
            let sleep = async {
                match next_due {
                    // Leaves falling due within the next 100 ms go with the first (a user's
                    // last leave and the channel's vacancy): late by that at most, never early.
                    Some(due) => tokio::time::sleep_until(due + COALESCE).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = self.wake.notified() => {
                    // Let events that happen together (a channel occupied and its first member,
                    // decided one transaction apart in a cluster) gather into one body.
                    tokio::select! {
                        () = tokio::time::sleep(COALESCE) => {}
                        () = stop.cancelled() => {}
                    }
                }
                () = sleep => {}
                () = stop.cancelled() => {}
            }
        }
    }

    /// After the store refused a batch while it answers (a ping): stores each app's events on
    /// their own (with `store`), and returns those it refused again, in order. An app whose
    /// data it refuses as such ([`Refused::permanent`]: a constraint, a value it cannot hold;
    /// never a timeout or a lost connection, which only wait for the next try) is counted, and
    /// after [`MAX_REFUSALS`] such refusals in a row its events are tried one by one
    /// ([`Self::narrow`]): those the store refuses alone are dropped, counted and logged rather
    /// than retried without end, and the rest are stored.
    async fn isolate<F, Fut>(&self, batch: Refused, store: F) -> Vec<(AppId, ChannelEvent)>
    where
        F: Fn(Vec<(AppId, ChannelEvent)>) -> Fut,
        Fut: std::future::Future<Output = Result<(), Refused>>,
    {
        let mut by_app: Vec<(AppId, Vec<(AppId, ChannelEvent)>)> = Vec::new();
        for (app_id, event) in batch.events {
            match by_app.iter_mut().find(|(app, _)| *app == app_id) {
                Some((_, events)) => events.push((app_id, event)),
                None => by_app.push((app_id.clone(), vec![(app_id, event)])),
            }
        }
        let mut refused = Vec::new();
        let mut stored = Vec::new();
        if by_app.len() == 1 {
            // One app's alone: the refusal just made is its own.
            let (app_id, events) = by_app.remove(0);
            refused.push((
                app_id,
                Refused {
                    events,
                    permanent: batch.permanent,
                },
            ));
        }
        for (app_id, events) in by_app {
            match store(events).await {
                Ok(()) => stored.push(app_id),
                Err(why) => refused.push((app_id, why)),
            }
        }
        let mut kept = Vec::new();
        let mut narrowed = Vec::new();
        {
            let mut pending = self.lock();
            pending.stored(&stored);
            for (app_id, Refused { events, permanent }) in refused {
                if !permanent {
                    kept.extend(events);
                    continue;
                }
                let refusals = pending.refusals.entry(app_id.clone()).or_insert(0);
                *refusals += 1;
                if *refusals < MAX_REFUSALS {
                    kept.extend(events);
                    continue;
                }
                pending.refusals.remove(&app_id);
                narrowed.push((app_id, events));
            }
        }
        for (app_id, events) in narrowed {
            kept.extend(self.narrow(&app_id, events, &store).await);
        }
        kept
    }

    /// Tries an app's events one by one, in order, once the store refused their data
    /// [`MAX_REFUSALS`] times in a row: the one it refuses alone is dropped (counted and
    /// logged), so the app's good events waiting behind it are stored, not dropped with it.
    /// At most [`NARROW_PER_PASS`] of them a pass. Returns the events still to try: those
    /// past that bound, or from where the store stopped answering.
    async fn narrow<F, Fut>(
        &self,
        app_id: &AppId,
        events: Vec<(AppId, ChannelEvent)>,
        store: &F,
    ) -> Vec<(AppId, ChannelEvent)>
    where
        F: Fn(Vec<(AppId, ChannelEvent)>) -> Fut,
        Fut: std::future::Future<Output = Result<(), Refused>>,
    {
        let mut lost = 0_usize;
        let mut events = events.into_iter();
        let mut unsent = Vec::new();
        let mut tried = 0;
        while let Some(event) = events.next() {
            if tried == NARROW_PER_PASS {
                // The rest at the next pass, which the next refusal of them starts.
                unsent.push(event);
                unsent.extend(events.by_ref());
                self.lock()
                    .refusals
                    .insert(app_id.clone(), MAX_REFUSALS - 1);
                break;
            }
            tried += 1;
            match store(vec![event]).await {
                Ok(()) => {}
                Err(Refused {
                    events: mut one,
                    permanent: false,
                }) => {
                    // Not the data: keep it and what follows, in order, for the next try.
                    unsent.append(&mut one);
                    unsent.extend(events.by_ref());
                }
                Err(Refused {
                    events: one,
                    permanent: true,
                }) => {
                    lost += one.len();
                    if let Some((_, event)) = one.first() {
                        tracing::error!(
                            app = %app_id,
                            event = event.name(),
                            channel = event.channel(),
                            "channel webhook event dropped: the store refused its data every time"
                        );
                    }
                }
            }
        }
        self.metrics
            .channel_webhook_events_dropped_total
            .inc_by(u64::try_from(lost).unwrap_or(u64::MAX));
        unsent
    }

    /// Stores the batch's messages (one per app and group of endpoints wanting the same
    /// events) and the occupancy changes it reports, in one commit. On a store error the
    /// whole batch is handed back.
    async fn store_batch(
        &self,
        publisher: &Publisher,
        batch: Vec<(AppId, ChannelEvent)>,
    ) -> Result<(), Refused> {
        match self.messages_and_changes(&batch).await {
            Ok((messages, changes)) if messages.is_empty() && changes.is_empty() => Ok(()),
            Ok((messages, changes)) => {
                match publisher.publish_channel_webhooks(messages, changes).await {
                    Ok(()) => Ok(()),
                    Err(e) => {
                        tracing::error!(error = %e, "storing channel webhooks failed");
                        let permanent =
                            matches!(&e, crate::PublishError::Store(e) if e.refuses_the_data());
                        Err(Refused {
                            events: batch,
                            permanent,
                        })
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "reading endpoints for channel webhooks failed");
                Err(Refused {
                    events: batch,
                    permanent: false,
                })
            }
        }
    }

    /// The messages for the app's `pusher`-format endpoints, and the occupancy changes, of a
    /// batch (in the order the events happened).
    async fn messages_and_changes(
        &self,
        batch: &[(AppId, ChannelEvent)],
    ) -> Result<ChannelWrites, herald_store::StoreError> {
        let mut by_app: Vec<(&AppId, Vec<&ChannelEvent>)> = Vec::new();
        let mut index: HashMap<&AppId, usize> = HashMap::new();
        for (app_id, event) in batch {
            let slot = *index.entry(app_id).or_insert_with(|| {
                by_app.push((app_id, Vec::new()));
                by_app.len() - 1
            });
            by_app[slot].1.push(event);
        }
        let mut messages = Vec::new();
        let mut changes = Vec::new();
        for (app_id, events) in by_app {
            let reported = self.app_messages(app_id, &events, &mut messages).await?;
            // Occupancy is recorded only where channel webhooks go somewhere: anyone with an
            // app's public key can occupy channels, and a row per channel for apps that never
            // hear of it would let them cause writes for nothing. Leaves are always applied,
            // so rows recorded while an endpoint existed do not outlive it.
            changes.extend(
                events
                    .iter()
                    .filter_map(|event| occupancy_change(app_id, event))
                    .filter(|change| reported || matches!(change, OccupancyChange::Left(_))),
            );
        }
        Ok((messages, changes))
    }

    /// Appends one message per group of the app's endpoints wanting the same events; returns
    /// whether the app has any `pusher`-format endpoint (whether channel webhooks are on).
    async fn app_messages(
        &self,
        app_id: &AppId,
        events: &[&ChannelEvent],
        messages: &mut Vec<(Message, Vec<EndpointId>)>,
    ) -> Result<bool, herald_store::StoreError> {
        let endpoints = self.store.app_endpoints(app_id).await?;
        let reported = endpoints
            .iter()
            .any(|endpoint| endpoint.format == EndpointFormat::Pusher);
        // Endpoints that want the same events share one message.
        let mut groups: BTreeMap<Vec<usize>, Vec<EndpointId>> = BTreeMap::new();
        for endpoint in endpoints.iter() {
            let wanted: Vec<usize> = events
                .iter()
                .enumerate()
                .filter(|(_, event)| {
                    let channel = [event.channel().to_owned()];
                    endpoint.wants(EndpointFormat::Pusher, event.name(), Some(&channel))
                })
                .map(|(i, _)| i)
                .collect();
            if !wanted.is_empty() {
                groups.entry(wanted).or_default().push(endpoint.id.clone());
            }
        }
        for (wanted, targets) in groups {
            for chunk in wanted.chunks(MAX_EVENTS_PER_WEBHOOK) {
                let now = crate::now();
                let body = Body {
                    time_ms: now.timestamp_millis(),
                    events: chunk.iter().map(|&i| events[i]).collect(),
                };
                let payload = serde_json::to_vec(&body)
                    .unwrap_or_else(|e| unreachable!("strings and numbers serialize: {e}"));
                let message = Message {
                    id: herald_core::MessageId::new(now),
                    app_id: app_id.to_owned(),
                    event_id: None,
                    event_type: EVENT_TYPE.to_owned(),
                    channels: None,
                    tags: None,
                    payload: Bytes::from(payload),
                    created_at: now,
                    payload_expires_at: None,
                };
                messages.push((message, targets.clone()));
            }
        }
        Ok(reported)
    }
}

type ChannelWrites = (Vec<(Message, Vec<EndpointId>)>, Vec<OccupancyChange>);

/// The occupancy change an event reports, if any (client events report none).
fn occupancy_change(app_id: &AppId, event: &ChannelEvent) -> Option<OccupancyChange> {
    let occupant = |user_id: Option<&str>| Occupant {
        app_id: app_id.to_owned(),
        channel: event.channel().to_owned(),
        user_id: user_id.map(str::to_owned),
    };
    Some(match event {
        ChannelEvent::Occupied { .. } => OccupancyChange::Entered(occupant(None)),
        ChannelEvent::Vacated { .. } => OccupancyChange::Left(occupant(None)),
        ChannelEvent::MemberAdded { user_id, .. } => {
            OccupancyChange::Entered(occupant(Some(user_id)))
        }
        ChannelEvent::MemberRemoved { user_id, .. } => {
            OccupancyChange::Left(occupant(Some(user_id)))
        }
        ChannelEvent::ClientEvent { .. } => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DELAY: Duration = Duration::from_secs(3);

    fn config(max_pending: usize) -> ChannelWebhookConfig {
        ChannelWebhookConfig {
            delay: DELAY,
            max_pending,
        }
    }

    fn occupied(channel: &str) -> ChannelEvent {
        ChannelEvent::Occupied {
            channel: channel.into(),
        }
    }

    fn vacated(channel: &str) -> ChannelEvent {
        ChannelEvent::Vacated {
            channel: channel.into(),
        }
    }

    fn member(added: bool, channel: &str, user: &str) -> ChannelEvent {
        let (channel, user_id) = (channel.into(), user.into());
        if added {
            ChannelEvent::MemberAdded { channel, user_id }
        } else {
            ChannelEvent::MemberRemoved { channel, user_id }
        }
    }

    fn names(events: &[(AppId, ChannelEvent)]) -> Vec<String> {
        events
            .iter()
            .map(|(app, e)| format!("{app}/{}/{}", e.name(), e.channel()))
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_rejoin_within_the_delay_cancels_the_leave_and_is_not_reported() {
        let (mut pending, config) = (Pending::default(), config(100));
        assert!(pending.accept(
            &AppId::parse("app_a").expect("valid"),
            occupied("room"),
            &config,
            Instant::now()
        ));
        assert!(pending.accept(
            &AppId::parse("app_a").expect("valid"),
            vacated("room"),
            &config,
            Instant::now()
        ));
        assert_eq!(names(&pending.ready), ["app_a/channel_occupied/room"]);
        assert_eq!(pending.delayed.len(), 1);

        tokio::time::advance(DELAY - Duration::from_millis(1)).await;
        assert!(!pending.accept(
            &AppId::parse("app_a").expect("valid"),
            occupied("room"),
            &config,
            Instant::now()
        ));
        assert!(pending.delayed.is_empty() && pending.delayed_at.is_empty());
        pending.release_due(Some(Instant::now() + DELAY));
        assert_eq!(
            names(&pending.ready),
            ["app_a/channel_occupied/room"],
            "nothing flapped"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_leave_is_released_once_its_delay_has_passed() {
        let (mut pending, config) = (Pending::default(), config(100));
        pending.accept(
            &AppId::parse("app_a").expect("valid"),
            vacated("one"),
            &config,
            Instant::now(),
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        pending.accept(
            &AppId::parse("app_a").expect("valid"),
            vacated("two"),
            &config,
            Instant::now(),
        );

        pending.release_due(Some(Instant::now() + DELAY - Duration::from_secs(1)));
        assert_eq!(names(&pending.ready), ["app_a/channel_vacated/one"]);
        tokio::time::advance(DELAY).await;
        pending.release_due(Some(Instant::now()));
        assert_eq!(
            names(&pending.ready),
            ["app_a/channel_vacated/one", "app_a/channel_vacated/two"],
            "in the order they fell due"
        );
        // A rejoin after the release is an ordinary join.
        assert!(pending.accept(
            &AppId::parse("app_a").expect("valid"),
            occupied("one"),
            &config,
            Instant::now()
        ));
        assert_eq!(pending.ready.len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn member_leaves_are_cancelled_per_user_and_per_app() {
        let (mut pending, config) = (Pending::default(), config(100));
        let now = Instant::now();
        pending.accept(
            &AppId::parse("app_a").expect("valid"),
            member(false, "presence-x", "alice"),
            &config,
            now,
        );
        pending.accept(
            &AppId::parse("app_a").expect("valid"),
            member(false, "presence-x", "bob"),
            &config,
            now,
        );
        pending.accept(
            &AppId::parse("app_b").expect("valid"),
            member(false, "presence-x", "alice"),
            &config,
            now,
        );
        // Alice rejoins app a: only her leave there is cancelled.
        assert!(!pending.accept(
            &AppId::parse("app_a").expect("valid"),
            member(true, "presence-x", "alice"),
            &config,
            now
        ));
        pending.release_due(None);
        assert_eq!(
            names(&pending.ready),
            [
                "app_a/member_removed/presence-x",
                "app_b/member_removed/presence-x"
            ]
        );
        assert_eq!(pending.ready[0].1.user_id(), Some("bob"));
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_events_delayed_ones_included_are_bounded() {
        let (mut pending, config) = (Pending::default(), config(3));
        // Three apps, each within its share: the bound on all is what holds.
        for n in 0..6 {
            pending.accept(
                &AppId::parse(format!("app_{}", n % 3)).expect("valid"),
                vacated(&format!("room-{n}")),
                &config,
                Instant::now(),
            );
        }
        assert_eq!(pending.delayed.len(), 3);
        assert_eq!(pending.dropped, 3);
        // A repeated leave of a channel already waiting replaces it, so it is still bounded.
        let zero = ChannelWebhookConfig {
            delay: Duration::ZERO,
            max_pending: 3,
        };
        let mut direct = Pending::default();
        for n in 0..4 {
            direct.accept(
                &AppId::parse(format!("app_{n}")).expect("valid"),
                vacated(&format!("room-{n}")),
                &zero,
                Instant::now(),
            );
        }
        assert_eq!(
            (direct.ready.len(), direct.dropped),
            (3, 1),
            "no delay: ready at once"
        );
    }

    /// One app holds at most half of what may wait: its clients (anyone with its public key
    /// can occupy and vacate channels) cannot crowd the other apps' events out. What leaves
    /// the queue (stored, cancelled) gives its app room again.
    #[tokio::test(start_paused = true)]
    async fn one_app_holds_at_most_half_of_what_may_wait() {
        let (mut pending, config) = (Pending::default(), config(8));
        let (noisy, quiet) = (
            AppId::parse("app_noisy").expect("valid"),
            AppId::parse("app_quiet").expect("valid"),
        );
        let now = Instant::now();
        for n in 0..10 {
            pending.accept(&noisy, vacated(&format!("churn-{n}")), &config, now);
        }
        assert_eq!((pending.delayed.len(), pending.dropped), (4, 6));
        for n in 0..4 {
            assert!(
                pending.accept(
                    &quiet,
                    member(true, "presence-x", &format!("u{n}")),
                    &config,
                    now
                ),
                "the other app's events still fit"
            );
        }
        // A rejoin cancels a waiting leave: its app has room for one more.
        assert!(!pending.accept(&noisy, occupied("churn-0"), &config, now));
        assert!(pending.accept(&noisy, vacated("churn-9"), &config, now));
        assert!(!pending.accept(&noisy, vacated("churn-10"), &config, now));
        // Stored events give their app's room back; events put back after a failed store
        // take it again.
        let taken = pending.take_ready();
        assert_eq!(taken.len(), 4, "the quiet app's joins");
        assert_eq!(pending.per_app.get(&quiet), None);
        pending.put_back(taken);
        assert_eq!(pending.per_app.get(&quiet), Some(&4));
    }

    /// A join dropped for want of room takes its leave with it: the receiver is never told a
    /// channel was vacated (or a member removed) that it was not told was occupied (added).
    /// A join that fits again later is reported, and so is its leave.
    #[tokio::test(start_paused = true)]
    async fn a_dropped_join_takes_its_leave_with_it() {
        let (mut pending, config) = (Pending::default(), config(4));
        pending.pair_drops = true;
        let app = AppId::parse("app_full").expect("valid");
        let now = Instant::now();
        for n in 0..2 {
            assert!(pending.accept(&app, occupied(&format!("filler-{n}")), &config, now));
        }
        assert!(
            !pending.accept(&app, occupied("x"), &config, now),
            "at its share"
        );
        assert!(!pending.accept(&app, member(true, "presence-y", "u1"), &config, now));
        assert_eq!(pending.dropped, 2);
        let _stored = pending.take_ready();
        assert!(
            !pending.accept(&app, vacated("x"), &config, now),
            "paired with the drop"
        );
        assert!(!pending.accept(&app, member(false, "presence-y", "u1"), &config, now));
        assert_eq!(pending.dropped, 4);
        assert!(pending.delayed.is_empty() && pending.dropped_joins.is_empty());
        // Occupied again, with room: reported, and its leave is too.
        assert!(pending.accept(&app, occupied("x"), &config, now));
        let _stored = pending.take_ready();
        assert!(pending.accept(&app, vacated("x"), &config, now));
        assert_eq!(pending.delayed.len(), 1);
    }

    /// Channel webhooks waiting on a throwaway SQLite store (kept while the directory is),
    /// with at most `max_pending` events.
    async fn on_a_store(
        max_pending: usize,
    ) -> (
        tempfile::TempDir,
        Arc<dyn Store>,
        Arc<ChannelMetrics>,
        ChannelWebhooks,
    ) {
        let dir = tempfile::tempdir().expect("dir");
        let store: Arc<dyn Store> = Arc::new(
            herald_store::sqlite::SqliteStore::open(dir.path())
                .await
                .expect("store"),
        );
        let metrics = Arc::new(ChannelMetrics::default());
        let webhooks = ChannelWebhooks::new(
            Arc::clone(&store),
            config(max_pending),
            Arc::clone(&metrics),
        );
        (dir, store, metrics, webhooks)
    }

    /// A store that refuses one app's events every time (as data it refuses, or as a
    /// failure that may pass: `permanent`), and takes the others'.
    fn refusing(
        poison: &AppId,
        permanent: bool,
        stored: &Mutex<Vec<String>>,
        batch: Vec<(AppId, ChannelEvent)>,
    ) -> std::future::Ready<Result<(), Refused>> {
        if batch.iter().any(|(app, _)| app == poison) {
            return std::future::ready(Err(Refused {
                events: batch,
                permanent,
            }));
        }
        stored.lock().expect("lock").extend(names(&batch));
        std::future::ready(Ok(()))
    }

    /// A batch as the run loop hands it over after the store refused it whole.
    fn refused(events: Vec<(AppId, ChannelEvent)>, permanent: bool) -> Refused {
        Refused { events, permanent }
    }

    #[tokio::test]
    async fn an_app_whose_events_the_store_keeps_refusing_holds_up_no_other() {
        let (_dir, store, metrics, webhooks) = on_a_store(100).await;
        let poison = AppId::parse("app_poison").expect("valid");
        let good = AppId::parse("app_good").expect("valid");
        let stored = Mutex::new(Vec::new());
        let mut unsent = Vec::new();
        for round in 1..=MAX_REFUSALS {
            let batch: Vec<_> = unsent
                .into_iter()
                .chain([
                    (poison.clone(), occupied(&format!("bad-{round}"))),
                    (good.clone(), occupied(&format!("good-{round}"))),
                ])
                .collect();
            unsent = webhooks
                .isolate(refused(batch, true), |part| {
                    refusing(&poison, true, &stored, part)
                })
                .await;
            if round < MAX_REFUSALS {
                // The good app's event is stored; the poison app's wait, in order.
                let waiting: Vec<String> = (1..=round)
                    .map(|n| format!("app_poison/channel_occupied/bad-{n}"))
                    .collect();
                assert_eq!(names(&unsent), waiting);
                assert_eq!(metrics.channel_webhook_events_dropped_total.get(), 0);
            }
        }
        // Its data refused every time: dropped and counted; the other app's all stored.
        assert!(unsent.is_empty(), "{:?}", names(&unsent));
        assert_eq!(
            metrics.channel_webhook_events_dropped_total.get(),
            u64::from(MAX_REFUSALS)
        );
        assert_eq!(
            stored.lock().expect("lock").len(),
            usize::try_from(MAX_REFUSALS).expect("small")
        );

        // One app alone, its data refused: counted from the refusal of the batch itself (not
        // tried again at once), then its events are tried one by one, each refused alone too.
        let mut waiting = Vec::new();
        let tries = Mutex::new(0_u32);
        for round in 1..=MAX_REFUSALS {
            waiting.push((poison.clone(), occupied(&format!("alone-{round}"))));
            waiting = webhooks
                .isolate(refused(waiting, true), |part| {
                    assert_eq!(part.len(), 1, "tried one by one");
                    *tries.lock().expect("lock") += 1;
                    refusing(&poison, true, &stored, part)
                })
                .await;
        }
        assert!(waiting.is_empty());
        assert_eq!(*tries.lock().expect("lock"), MAX_REFUSALS);
        let dropped = 2 * u64::from(MAX_REFUSALS);
        assert_eq!(metrics.channel_webhook_events_dropped_total.get(), dropped);

        // A failure that may pass (a timeout, say) is never counted, however often.
        let mut waiting = vec![(poison.clone(), occupied("slow"))];
        for _ in 0..MAX_REFUSALS * 2 {
            waiting.push((good.clone(), occupied("good")));
            waiting = webhooks
                .isolate(refused(waiting, false), |part| {
                    refusing(&poison, false, &stored, part)
                })
                .await;
        }
        assert_eq!(names(&waiting), ["app_poison/channel_occupied/slow"]);
        for _ in 0..MAX_REFUSALS * 2 {
            waiting = webhooks
                .isolate(refused(waiting, false), |_| async {
                    unreachable!("one app's batch is not tried again at once")
                })
                .await;
        }
        assert_eq!(waiting.len(), 1);

        // A success starts the count again: refusals must come in a row.
        let round = || {
            vec![
                (poison.clone(), occupied("late")),
                (good.clone(), occupied("g")),
            ]
        };
        for _ in 0..MAX_REFUSALS - 1 {
            let kept = webhooks
                .isolate(refused(round(), true), |part| {
                    refusing(&poison, true, &stored, part)
                })
                .await;
            assert_eq!(kept.len(), 1);
        }
        webhooks.lock().stored(std::slice::from_ref(&poison));
        let kept = webhooks
            .isolate(refused(round(), true), |part| {
                refusing(&poison, true, &stored, part)
            })
            .await;
        assert_eq!(kept.len(), 1, "counted from one again after a success");
        assert_eq!(metrics.channel_webhook_events_dropped_total.get(), dropped);
        store.close().await;
    }

    /// A store that refuses, alone or in any batch, the events on channel `bad` as data it
    /// cannot take and those on `slow` as a failure that may pass, and takes the rest.
    fn refusing_channels(
        stored: &Mutex<Vec<String>>,
        batch: Vec<(AppId, ChannelEvent)>,
    ) -> std::future::Ready<Result<(), Refused>> {
        let has = |channel: &str| batch.iter().any(|(_, event)| event.channel() == channel);
        if has("bad") || has("slow") {
            let permanent = !has("slow");
            return std::future::ready(Err(Refused {
                events: batch,
                permanent,
            }));
        }
        stored.lock().expect("lock").extend(names(&batch));
        std::future::ready(Ok(()))
    }

    #[tokio::test]
    async fn only_the_event_the_store_refuses_alone_is_dropped() {
        let (_dir, store, metrics, webhooks) = on_a_store(100).await;
        let app = AppId::parse("app_mixed").expect("valid");
        let stored = Mutex::new(Vec::new());
        let mut waiting = vec![
            (app.clone(), occupied("good-a")),
            (app.clone(), occupied("bad")),
            (app.clone(), vacated("good-b")),
        ];
        for round in 1..=MAX_REFUSALS {
            waiting = webhooks
                .isolate(refused(waiting, true), |part| {
                    refusing_channels(&stored, part)
                })
                .await;
            if round < MAX_REFUSALS {
                assert_eq!(
                    waiting.len(),
                    3,
                    "all wait, in order, until the last refusal"
                );
                assert!(stored.lock().expect("lock").is_empty());
            }
        }
        // The app's good events, before and behind the bad one, are stored in order.
        assert!(waiting.is_empty(), "{:?}", names(&waiting));
        assert_eq!(
            *stored.lock().expect("lock"),
            [
                "app_mixed/channel_occupied/good-a",
                "app_mixed/channel_vacated/good-b"
            ]
        );
        assert_eq!(metrics.channel_webhook_events_dropped_total.get(), 1);

        // A failure that may pass, met while trying one by one, stops the pass: that event
        // and those behind it wait for the next try, in order; nothing more is dropped.
        stored.lock().expect("lock").clear();
        let mut waiting = vec![
            (app.clone(), occupied("good-c")),
            (app.clone(), occupied("bad")),
            (app.clone(), occupied("slow")),
            (app.clone(), occupied("good-d")),
        ];
        for _ in 1..=MAX_REFUSALS {
            waiting = webhooks
                .isolate(refused(waiting, true), |part| {
                    refusing_channels(&stored, part)
                })
                .await;
        }
        assert_eq!(
            names(&waiting),
            [
                "app_mixed/channel_occupied/slow",
                "app_mixed/channel_occupied/good-d"
            ]
        );
        assert_eq!(
            *stored.lock().expect("lock"),
            ["app_mixed/channel_occupied/good-c"]
        );
        assert_eq!(metrics.channel_webhook_events_dropped_total.get(), 2);

        // Many waiting: a pass tries at most NARROW_PER_PASS one by one, and the next refusal
        // of the rest goes on with them at once.
        stored.lock().expect("lock").clear();
        let mut waiting: Vec<_> = (0..NARROW_PER_PASS + 50)
            .map(|n| {
                let channel = if n == NARROW_PER_PASS + 20 {
                    "bad".to_owned()
                } else {
                    format!("c{n}")
                };
                (app.clone(), occupied(&channel))
            })
            .collect();
        for _ in 1..=MAX_REFUSALS {
            waiting = webhooks
                .isolate(refused(waiting, true), |part| {
                    refusing_channels(&stored, part)
                })
                .await;
        }
        assert_eq!(waiting.len(), 50, "the rest wait for the next pass");
        assert_eq!(stored.lock().expect("lock").len(), NARROW_PER_PASS);
        waiting = webhooks
            .isolate(refused(waiting, true), |part| {
                refusing_channels(&stored, part)
            })
            .await;
        assert!(waiting.is_empty(), "{:?}", names(&waiting));
        assert_eq!(stored.lock().expect("lock").len(), NARROW_PER_PASS + 49);
        assert_eq!(metrics.channel_webhook_events_dropped_total.get(), 3);
        store.close().await;
    }

    /// A store that fails (not for the data) `failures` times, then takes every batch.
    fn failing_then_taking<'a>(
        failures: u32,
        tries: &'a Mutex<u32>,
        stored: &'a Mutex<Vec<String>>,
    ) -> impl Fn(Vec<(AppId, ChannelEvent)>) -> std::future::Ready<Result<(), Refused>> + 'a {
        move |batch| {
            let mut tried = tries.lock().expect("lock");
            *tried += 1;
            if *tried <= failures {
                return std::future::ready(Err(Refused {
                    events: batch,
                    permanent: false,
                }));
            }
            stored.lock().expect("lock").extend(names(&batch));
            std::future::ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn events_waiting_at_shutdown_get_a_few_tries_before_they_are_dropped() {
        let (_dir, store, metrics, webhooks) = on_a_store(100).await;
        // Closed, its ping fails at once (no pool to wait for on the paused clock), so each
        // failed try is put back whole; `store` below stands for it.
        store.close().await;
        tokio::time::pause();
        let app = AppId::parse("app_a").expect("valid");
        let stopped = CancellationToken::new();
        stopped.cancel();

        // The store fails twice just as the node stops, then answers: nothing is lost.
        webhooks.observe(&app, occupied("room"));
        let (tries, stored) = (Mutex::new(0), Mutex::new(Vec::new()));
        webhooks
            .run_with(failing_then_taking(2, &tries, &stored), stopped.clone())
            .await;
        assert_eq!(*tries.lock().expect("lock"), 3);
        assert_eq!(
            *stored.lock().expect("lock"),
            ["app_a/channel_occupied/room"]
        );
        assert_eq!(metrics.channel_webhook_events_dropped_total.get(), 0);

        // A store that never answers: tried a bounded number of times, a backoff apart, then
        // what waits is dropped and counted, and the stop goes on.
        webhooks.observe(&app, occupied("hall"));
        webhooks.observe(&app, occupied("lobby"));
        let (tries, stored) = (Mutex::new(0), Mutex::new(Vec::new()));
        let started = Instant::now();
        webhooks
            .run_with(failing_then_taking(u32::MAX, &tries, &stored), stopped)
            .await;
        assert_eq!(*tries.lock().expect("lock"), TRIES_WHILE_STOPPING);
        let waited = started.elapsed();
        assert!(
            waited >= ERROR_BACKOFF * (TRIES_WHILE_STOPPING - 1)
                && waited < ERROR_BACKOFF * TRIES_WHILE_STOPPING,
            "a backoff between tries: {waited:?}"
        );
        assert!(stored.lock().expect("lock").is_empty());
        assert_eq!(metrics.channel_webhook_events_dropped_total.get(), 2);
        assert!(webhooks.lock().ready.is_empty());
    }

    #[tokio::test]
    async fn dropped_events_are_counted_as_they_are_dropped() {
        let (_dir, store, metrics, webhooks) = on_a_store(2).await;
        for n in 0..5 {
            webhooks.observe(
                &AppId::parse(format!("app_{n}")).expect("valid"),
                occupied(&format!("room-{n}")),
            );
        }
        assert_eq!(metrics.channel_webhook_events_dropped_total.get(), 3);
        assert_eq!(webhooks.lock().ready.len(), 2);
        store.close().await;
    }
}
