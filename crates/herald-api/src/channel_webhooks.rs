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

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use herald_core::{
    id,
    model::{EndpointFormat, Message},
};
use herald_delivery::DispatcherHandle;
use herald_store::Store;
use herald_ws::hub::{ChannelEvent, ChannelObserver};
use serde::Serialize;
use tokio::{sync::Notify, time::Instant};
use tokio_util::sync::CancellationToken;

/// The event type under which channel webhooks appear in the message log.
pub const EVENT_TYPE: &str = "pusher.channel_webhook";
/// Events in one webhook body at most; a larger batch is split.
const MAX_EVENTS_PER_WEBHOOK: usize = 100;
/// Pause after a store error before trying the batch again.
const ERROR_BACKOFF: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct ChannelWebhookConfig {
    /// How long `channel_vacated` and `member_removed` wait for a rejoin that cancels them.
    pub delay: Duration,
    /// Events waiting to be stored at most; beyond it new events are dropped and counted.
    pub max_pending: usize,
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
    dispatcher: DispatcherHandle,
    config: ChannelWebhookConfig,
}

#[derive(Default)]
struct Pending {
    /// Events to store, in the order they happened.
    ready: Vec<(String, ChannelEvent)>,
    /// Vacated and removed events waiting out the delay, by when they fall due.
    delayed: BTreeMap<(Instant, u64), (String, ChannelEvent)>,
    /// Where each delayed event sits in `delayed`, so a rejoin can cancel it.
    delayed_at: HashMap<DelayKey, (Instant, u64)>,
    sequence: u64,
    dropped: u64,
}

/// A delayed event's identity: the channel, and the user for `member_removed`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct DelayKey {
    app_id: String,
    channel: String,
    user_id: Option<String>,
}

impl DelayKey {
    fn new(app_id: &str, channel: &str, user_id: Option<&str>) -> Self {
        Self {
            app_id: app_id.to_owned(),
            channel: channel.to_owned(),
            user_id: user_id.map(str::to_owned),
        }
    }
}

#[derive(Serialize)]
struct Body<'a> {
    time_ms: i64,
    events: Vec<&'a ChannelEvent>,
}

impl ChannelObserver for ChannelWebhooks {
    fn observe(&self, app_id: &str, event: ChannelEvent) {
        let key = || DelayKey::new(app_id, event.channel(), event.user_id());
        let mut pending = self.lock();
        match &event {
            // A rejoin within the delay cancels the pending leave, and is not reported either.
            ChannelEvent::Occupied { .. } | ChannelEvent::MemberAdded { .. }
                if pending.cancel(&key()) =>
            {
                return;
            }
            ChannelEvent::Vacated { .. } | ChannelEvent::MemberRemoved { .. }
                if !self.config.delay.is_zero() =>
            {
                let key = key();
                pending.delay(key, event, Instant::now() + self.config.delay);
                self.wake.notify_one();
                return;
            }
            _ => {}
        }
        if pending.ready.len() + pending.delayed.len() >= self.config.max_pending {
            pending.dropped += 1;
            return;
        }
        pending.ready.push((app_id.to_owned(), event));
        self.wake.notify_one();
    }
}

impl Pending {
    fn cancel(&mut self, key: &DelayKey) -> bool {
        match self.delayed_at.remove(key) {
            Some(slot) => {
                self.delayed.remove(&slot);
                true
            }
            None => false,
        }
    }

    fn delay(&mut self, key: DelayKey, event: ChannelEvent, due: Instant) {
        self.sequence += 1;
        let slot = (due, self.sequence);
        if let Some(old) = self.delayed_at.insert(key.clone(), slot) {
            self.delayed.remove(&old);
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
        dispatcher: DispatcherHandle,
        config: ChannelWebhookConfig,
    ) -> Self {
        Self {
            pending: Mutex::default(),
            wake: Notify::new(),
            store,
            dispatcher,
            config,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        // Plain collections whose updates cannot panic halfway: recover from poisoning.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores batches as they come until `stop`; then stores everything still waiting,
    /// delayed events included, and returns.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        loop {
            let stopping = stop.is_cancelled();
            let (batch, next_due, dropped) = {
                let mut pending = self.lock();
                pending.release_due((!stopping).then(Instant::now));
                let next_due = pending.delayed.first_key_value().map(|(k, _)| k.0);
                (
                    std::mem::take(&mut pending.ready),
                    next_due,
                    std::mem::take(&mut pending.dropped),
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
                if let Err(unsent) = self.store_batch(batch).await {
                    // Put them back in front, keeping their order, and try again shortly.
                    {
                        let mut pending = self.lock();
                        let newer = std::mem::replace(&mut pending.ready, unsent);
                        pending.ready.extend(newer);
                    }
                    if stopping {
                        tracing::error!("channel webhook events could not be stored at shutdown");
                        return;
                    }
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
                    Some(due) => tokio::time::sleep_until(due).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = self.wake.notified() => {}
                () = sleep => {}
                () = stop.cancelled() => {}
            }
        }
    }

    /// Stores one message per app and group of endpoints wanting the same events. On a store
    /// error, returns the events of the apps not yet stored.
    async fn store_batch(
        &self,
        batch: Vec<(String, ChannelEvent)>,
    ) -> Result<(), Vec<(String, ChannelEvent)>> {
        let mut by_app: Vec<(String, Vec<ChannelEvent>)> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        for (app_id, event) in batch {
            let slot = *index.entry(app_id.clone()).or_insert_with(|| {
                by_app.push((app_id, Vec::new()));
                by_app.len() - 1
            });
            by_app[slot].1.push(event);
        }
        let mut stored_any = false;
        let mut apps = by_app.into_iter();
        while let Some((app_id, events)) = apps.next() {
            match self.store_app_events(&app_id, &events).await {
                Ok(stored) => stored_any |= stored,
                Err(e) => {
                    tracing::error!(error = %e, %app_id, "storing channel webhooks failed");
                    let mut unsent: Vec<(String, ChannelEvent)> =
                        events.into_iter().map(|e| (app_id.clone(), e)).collect();
                    for (app_id, events) in apps {
                        unsent.extend(events.into_iter().map(|e| (app_id.clone(), e)));
                    }
                    if stored_any {
                        self.dispatcher.wake();
                    }
                    return Err(unsent);
                }
            }
        }
        if stored_any {
            self.dispatcher.wake();
        }
        Ok(())
    }

    /// Returns whether any message was stored.
    async fn store_app_events(
        &self,
        app_id: &str,
        events: &[ChannelEvent],
    ) -> Result<bool, herald_store::StoreError> {
        let endpoints = self.store.app_endpoints(app_id).await?;
        // Endpoints that want the same events share one message.
        let mut groups: BTreeMap<Vec<usize>, Vec<String>> = BTreeMap::new();
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
        let mut stored = false;
        for (wanted, targets) in groups {
            for chunk in wanted.chunks(MAX_EVENTS_PER_WEBHOOK) {
                let now = crate::now();
                let body = Body {
                    time_ms: now.timestamp_millis(),
                    events: chunk.iter().map(|&i| &events[i]).collect(),
                };
                let payload = serde_json::to_vec(&body)
                    .unwrap_or_else(|e| unreachable!("strings and numbers serialize: {e}"));
                let message = Message {
                    id: id::new_id(id::MESSAGE, now),
                    app_id: app_id.to_owned(),
                    event_id: None,
                    event_type: EVENT_TYPE.to_owned(),
                    channels: None,
                    tags: None,
                    payload: Bytes::from(payload),
                    created_at: now,
                };
                self.store.create_message(message, targets.clone()).await?;
                stored = true;
            }
        }
        Ok(stored)
    }
}
