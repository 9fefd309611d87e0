//! The one publish path. Every producer of events (the Svix message API, the Pusher HTTP API,
//! webhooks in and their replays, WebSocket client events, channel webhooks) publishes through
//! [`Publisher`], and nowhere else are webhook targets chosen, messages and history stored,
//! delivery woken, or channels fanned out to (`tests/it/tidy.rs` checks that no other module
//! calls the store's publishing writes or the hub's broadcast).
//!
//! One publication, in order:
//! 1. **Targets:** the app's Standard Webhooks endpoints whose filters want the event.
//! 2. **One commit:** the webhook message with its first attempts, the history entries of the
//!    channels that keep history (the store assigns their offsets in that commit), and for
//!    webhooks in the received request. A crash can never leave a message delivered as a
//!    webhook but missing from history, or the reverse.
//! 3. **Wake** delivery, if a webhook was queued.
//! 4. **Fan out:** one [`Publication`] per channel, handed to the [`Broker`]; history channels'
//!    carry their positions.
//!
//! One event stream, both ways:
//! - A webhook message with `channels` also goes to the channels' subscribers (WebSocket and
//!   SSE), as an event named by its `eventType` whose `data` is the payload's JSON text.
//! - An event triggered through the Pusher HTTP API also becomes a webhook message for the
//!   Standard Webhooks endpoints whose filters match: `eventType` = the event name, `payload` =
//!   `data` if it is a JSON object, otherwise `{"data": <data>}`, `channels` = the event's.
//!
//! Order: the store assigns a history channel's offsets in the order writes are queued to it
//! (`MessageStore::queue_publication`), and this node hands one channel's publications to the
//! broker in that order. A publication takes a ticket on each of its history channels, queues
//! its write in ticket order, and hands over in ticket order ([`crate::turns`]); it holds
//! nothing across the commit, so several publications of one channel share a group commit.
//! Tickets only order this node's hand-overs; they play no part in recovery, which merges by
//! offset (see `history`).

use herald_core::{AppId, EndpointId};
use std::sync::Arc;

use bytes::Bytes;
use herald_core::{
    history::{NewHistoryEntry, Retention},
    model::{App, EndpointFormat, IngestEvent, Message},
    pusher, validate,
};
use herald_delivery::DispatcherHandle;
use herald_metrics::PublishMetrics;
use herald_store::{IngestRecorded, OccupancyChange, Store, StoreError};

use crate::{
    broker::Broker,
    history::History,
    publication::{EventData, Publication},
    tail::{Source, Tail, TailData, TailEvent},
    turns::{ChannelTurns, Step},
};

/// What a producer publishes: an event, the channels it goes to, and the webhook message it is
/// (or may become).
#[derive(Debug)]
pub struct Publish {
    pub event: String,
    /// Names that are not subscribable channel names reach no subscriber and keep no history.
    pub channels: Vec<String>,
    pub data: EventData,
    /// The sender's user id (client events on presence channels).
    pub user_id: Option<String>,
    /// A socket that must not receive it.
    pub except: Option<String>,
    pub webhook: Webhook,
}

impl Publish {
    /// A webhook message (the Svix API, a replay): to the endpoints that want it, and as an
    /// event named by its `eventType` to its channels, with the payload's text as data.
    pub fn message(message: Message) -> Self {
        Self {
            event: message.event_type.clone(),
            channels: message.channels.clone().unwrap_or_default(),
            data: EventData::payload(&message.payload),
            user_id: None,
            except: None,
            webhook: Webhook::Message(message),
        }
    }

    /// An example message, sent only to `endpoint` (see [`Webhook::Example`]).
    pub fn example(message: Message, endpoint: EndpointId) -> Self {
        Self::message_as(message, |message| Webhook::Example(message, endpoint))
    }

    /// A verified inbound webhook and the message it becomes.
    pub fn ingest(record: IngestEvent, message: Message) -> Self {
        Self::message_as(message, |message| {
            Webhook::Ingest(Box::new(record), message)
        })
    }

    /// [`Self::message`] with another webhook side, made from the message by `webhook`.
    fn message_as(message: Message, webhook: impl FnOnce(Message) -> Webhook) -> Self {
        let mut publish = Self::message(message);
        if let Webhook::Message(message) = std::mem::replace(&mut publish.webhook, Webhook::None) {
            publish.webhook = webhook(message);
        }
        publish
    }

    /// An event triggered through the Pusher HTTP API (but socket `except`).
    pub fn pusher_event(name: &str, channels: &[String], data: &str, except: Option<&str>) -> Self {
        Self {
            event: name.to_owned(),
            channels: channels.to_vec(),
            data: EventData::text(data),
            user_id: None,
            except: except.map(str::to_owned),
            webhook: Webhook::IfWanted,
        }
    }
}

/// The webhook side of a publication.
#[derive(Debug)]
pub enum Webhook {
    /// None (client events).
    None,
    /// This message, to the Standard Webhooks endpoints whose filters want it.
    Message(Message),
    /// A message built from the event, only if an endpoint wants it (the Pusher HTTP API):
    /// nothing is stored for an event no endpoint wants on channels that keep no history.
    IfWanted,
    /// A verified inbound webhook and the message it becomes, recorded together; a delivery
    /// the provider sent before publishes nothing.
    Ingest(Box<IngestEvent>, Message),
    /// This message, to the one endpoint if its filters want it (Svix's "send example"): a
    /// test of that endpoint, which the app's other endpoints do not receive.
    Example(Message, EndpointId),
}

impl Webhook {
    /// Where a publication with this webhook side came from: each producer makes one kind
    /// (see [`Publish`]'s constructors; client events have none).
    fn source(&self) -> Source {
        match self {
            Self::None => Source::Client,
            Self::Message(_) | Self::Example(..) => Source::Api,
            Self::IfWanted => Source::Pusher,
            Self::Ingest(..) => Source::Ingest,
        }
    }
}

/// What a publication did.
#[derive(Debug)]
pub struct Published {
    /// For webhooks in: new, or the earlier record of a repeated delivery (then nothing was
    /// stored or sent).
    pub ingest: Option<IngestRecorded>,
    /// Subscribers the event was handed to on this node.
    pub sent: usize,
    /// Why the broker could not hand the event on to the cluster's other nodes, when one of
    /// its channels keeps no history: their subscribers did not get it, and nothing will
    /// catch them up (history channels' are caught up by offset).
    pub not_elsewhere: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The runtime shut down while the publication was being committed; it may or may not
    /// have been stored.
    #[error("the publication was interrupted by shutdown")]
    Interrupted,
}

pub struct Publisher {
    shared: Arc<Shared>,
}

/// How long the payloads of the messages a publisher stores are kept: the message's own
/// retention if it has one, else its app's `payload_retention_days`, else `default_days`.
#[derive(Debug, Clone, Copy)]
pub struct PayloadRetention {
    /// How long a day lasts (tests shorten it).
    pub day: std::time::Duration,
    pub default_days: u32,
}

impl Default for PayloadRetention {
    fn default() -> Self {
        Self {
            day: std::time::Duration::from_secs(86_400),
            default_days: 30,
        }
    }
}

impl PayloadRetention {
    /// `message` stamped with when its payload expires, unless it says so already.
    fn stamp(&self, app_days: Option<u32>, message: &mut Message) {
        if message.payload_expires_at.is_some() {
            return;
        }
        let days = app_days.unwrap_or(self.default_days);
        let kept = chrono::Duration::from_std(self.day.saturating_mul(days))
            .unwrap_or(chrono::Duration::MAX);
        message.payload_expires_at = message.created_at.checked_add_signed(kept);
    }
}

/// What a publication's commit and fan-out need; shared with the task that runs them.
struct Shared {
    store: Arc<dyn Store>,
    broker: Arc<dyn Broker>,
    history: Arc<History>,
    dispatcher: DispatcherHandle,
    turns: ChannelTurns,
    metrics: Arc<PublishMetrics>,
    payload_retention: PayloadRetention,
    tail: Tail,
}

/// A publication whose targets are chosen, ready to commit and fan out.
struct Plan {
    app_id: AppId,
    event: String,
    channels: Vec<String>,
    /// The channels that keep history, by name, with their retention and the epoch a channel
    /// without a stored position starts under.
    kept: Vec<(String, (Retention, String))>,
    data: EventData,
    user_id: Option<String>,
    except: Option<String>,
    message: Option<(Message, Vec<EndpointId>)>,
    ingest: Option<Box<IngestEvent>>,
    source: Source,
}

impl Publisher {
    pub fn new(
        store: Arc<dyn Store>,
        broker: Arc<dyn Broker>,
        history: Arc<History>,
        dispatcher: DispatcherHandle,
        metrics: Arc<PublishMetrics>,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                store,
                broker,
                history,
                dispatcher,
                turns: ChannelTurns::default(),
                metrics,
                payload_retention: PayloadRetention::default(),
                tail: Tail::default(),
            }),
        }
    }

    /// Sets how long the payloads of the messages it stores are kept (before it is shared).
    pub fn with_payload_retention(mut self, retention: PayloadRetention) -> Self {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.payload_retention = retention;
        }
        self
    }

    pub fn history(&self) -> &Arc<History> {
        &self.shared.history
    }

    /// The live tail of what this node publishes.
    pub fn tail(&self) -> &Tail {
        &self.shared.tail
    }

    /// Ends a deleted app's connections and streams on every node. Call it after the app is
    /// gone from the store, so a connection that arrives later finds no app (4001).
    pub async fn remove_app(&self, app_id: &AppId) {
        if let Err(e) = self.shared.broker.remove_app(app_id).await {
            // This node's are closed; the others' close when their next lookup finds no app.
            tracing::error!(error = %e, %app_id, "telling the other nodes an app was deleted failed");
        }
    }

    /// Whether publications reach every node now (the broker's link is up).
    pub fn broker_ready(&self) -> bool {
        self.shared.broker.is_ready()
    }

    /// Publishes one event: targets, one commit, wake, fan-out (see the module's doc).
    pub async fn publish(&self, app: &App, publish: Publish) -> Result<Published, PublishError> {
        let published = self.publish_counted(app, publish).await;
        if published.is_err() {
            self.shared.metrics.publish_failures_total.inc();
        }
        published
    }

    /// [`Publisher::publish`], counting what it committed and fanned out (a store failure is
    /// counted by the caller, a broker failure here).
    async fn publish_counted(
        &self,
        app: &App,
        publish: Publish,
    ) -> Result<Published, PublishError> {
        let Publish {
            event,
            channels,
            data,
            user_id,
            except,
            webhook,
        } = publish;
        let source = webhook.source();
        let channels = subscribable(&channels);
        let mut kept: Vec<(String, (Retention, String))> = channels
            .iter()
            .filter_map(|c| {
                let retention = self.shared.history.retention(app, c)?;
                Some((
                    c.clone(),
                    (retention, self.shared.history.fresh_epoch(app, c)),
                ))
            })
            .collect();
        kept.sort_unstable_by(|a, b| a.0.cmp(&b.0));

        // 1. Targets first: a Pusher event's message is built only if an endpoint wants it.
        let (message, ingest) = match webhook {
            Webhook::None => (None, None),
            Webhook::Message(message) => {
                let targets = self
                    .shared
                    .targets(app, &message.event_type, message.channels.as_deref())
                    .await?;
                (Some((message, targets)), None)
            }
            Webhook::Example(message, endpoint) => {
                let mut targets = self
                    .shared
                    .targets(app, &message.event_type, message.channels.as_deref())
                    .await?;
                targets.retain(|id| *id == endpoint);
                (Some((message, targets)), None)
            }
            Webhook::IfWanted => {
                let targets = if validate::event_type_name(&event).is_ok() {
                    let named = (!channels.is_empty()).then_some(channels.as_slice());
                    self.shared.targets(app, &event, named).await?
                } else {
                    tracing::debug!(
                        event,
                        "event name is not a valid event type; not forwarded to webhooks"
                    );
                    Vec::new()
                };
                let message = (!targets.is_empty())
                    .then(|| (event_message(app, &event, &channels, &data), targets));
                (message, None)
            }
            Webhook::Ingest(record, message) => {
                let targets = self
                    .shared
                    .targets(app, &message.event_type, message.channels.as_deref())
                    .await?;
                (Some((message, targets)), Some(record))
            }
        };
        let mut message = message;
        if let Some((message, _)) = &mut message {
            self.shared
                .payload_retention
                .stamp(app.payload_retention_days, message);
        }
        let plan = Plan {
            app_id: app.id.clone(),
            event,
            channels,
            kept,
            data,
            user_id,
            except,
            message,
            ingest,
            source,
        };
        let commits = !plan.kept.is_empty() || plan.message.is_some() || plan.ingest.is_some();
        if plan.channels.is_empty() || !commits {
            // Nothing to fan out: if the caller goes away mid-commit, the message is stored
            // or not, and delivery finds it either way. Nothing to commit: a caller that goes
            // away mid-send was never answered, as if it had not published. Either way no
            // task of its own, which under load would wait a turn of the whole scheduler.
            return self.shared.commit_and_fan_out(plan).await;
        }
        // The commit and the fan-out run on their own task, so a caller that goes away (a
        // client disconnecting mid-request) cannot leave a committed event unsent to the
        // channels' subscribers.
        let shared = Arc::clone(&self.shared);
        match tokio::spawn(async move { shared.commit_and_fan_out(plan).await }).await {
            Ok(published) => published,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Err(PublishError::Interrupted),
        }
    }
}

impl Shared {
    /// Steps 2 to 4 of a publication: one commit, wake, fan-out.
    async fn commit_and_fan_out(&self, plan: Plan) -> Result<Published, PublishError> {
        let Plan {
            app_id,
            event,
            channels,
            kept,
            data,
            user_id,
            except,
            message,
            ingest,
            source,
        } = plan;
        let wake = message.as_ref().is_some_and(|(_, t)| !t.is_empty());
        // Built before the commit takes the message, and only if someone watches.
        let tailed = self.tail.is_watched().then(|| TailEvent {
            app_id: app_id.clone(),
            source,
            event: event.clone(),
            channels: match &message {
                Some((message, _)) => message.channels.clone().unwrap_or_default(),
                None => channels.clone(),
            },
            message_id: message.as_ref().map(|(m, _)| m.id.clone()),
            event_id: message.as_ref().and_then(|(m, _)| m.event_id.clone()),
            data: TailData::bounded(match &message {
                Some((message, _)) => EventData::payload(&message.payload),
                None => data.clone(),
            }),
            json: message.is_some() || data.is_json(),
            at: chrono::Utc::now(),
        });

        // 2. One commit. Tickets on the history channels keep this node's order on each: the
        // write is queued, and the publication handed over, after those of every publication
        // that took its ticket before (dropping them, as every early return does, gives up
        // what is left: a write that failed consumed no offset).
        let mut turns = self.turns.take(&app_id, &kept);
        let now = chrono::Utc::now();
        let entries: Vec<NewHistoryEntry> = kept
            .iter()
            .map(|(channel, (retention, first_epoch))| NewHistoryEntry {
                app_id: app_id.clone(),
                channel: channel.clone(),
                event: event.clone(),
                data: data.as_str().to_owned(),
                raw_json: data.is_json(),
                user_id: user_id.clone(),
                created_at: now,
                retention: *retention,
                first_epoch: Some(first_epoch.clone()),
                except: except.clone(),
            })
            .collect();
        turns.wait(Step::Queue).await;
        let (positions, recorded) = match (ingest, message) {
            (Some(record), Some((message, targets))) => {
                // No two-step write for webhooks in: this one commits before it returns, and
                // the next ticket's write queues after that.
                match self
                    .store
                    .record_ingest(*record, message, targets, entries)
                    .await?
                {
                    IngestRecorded::New(positions) => {
                        let recorded = IngestRecorded::New(positions.clone());
                        (positions, Some(recorded))
                    }
                    duplicate @ IngestRecorded::Duplicate(_) => {
                        return Ok(Published {
                            ingest: Some(duplicate),
                            sent: 0,
                            not_elsewhere: None,
                        });
                    }
                }
            }
            (_, Some((message, targets))) if entries.is_empty() => {
                self.store.create_message(message, targets).await?;
                (Vec::new(), None)
            }
            (_, message) if message.is_some() || !entries.is_empty() => {
                let commit = self.store.queue_publication(message, entries).await?;
                // Its offsets are fixed: the next ticket's write may join the same commit.
                turns.pass(Step::Queue);
                (commit.await?, None)
            }
            _ => (Vec::new(), None),
        };

        // (Taken already by a two-step write.)
        turns.pass(Step::Queue);
        self.metrics.published(source);
        if let Some(event) = tailed {
            self.tail.offer(event);
        }

        // 3. Wake delivery.
        if wake {
            self.dispatcher.wake_first_attempts();
        }

        // 4. Fan out, history channels with their positions.
        let publications: Vec<Arc<Publication>> = channels
            .iter()
            .map(|channel| {
                let position = kept
                    .binary_search_by(|(c, _)| c.as_str().cmp(channel.as_str()))
                    .ok()
                    .and_then(|at| positions.get(at).cloned());
                Arc::new(
                    Publication::new(&app_id, channel, &event, data.clone())
                        .with_user(user_id.clone())
                        .with_position(position)
                        .except(except.clone()),
                )
            })
            .collect();
        turns.wait(Step::HandOver).await;
        let handing = std::time::Instant::now();
        let handed = self.broker.publish(&publications).await;
        self.metrics
            .broker_publish_seconds
            .observe(handing.elapsed().as_secs_f64());
        let (sent, not_elsewhere) = match handed {
            Ok(sent) => (sent, None),
            Err(e) => {
                // Committed: history channels' subscribers recover it by offset; the others'
                // cannot, and the caller is told.
                tracing::error!(error = %e, %app_id, event, "handing a publication to the broker failed");
                self.metrics.publish_failures_total.inc();
                let unrecoverable = publications.iter().any(|p| p.position.is_none());
                (0, unrecoverable.then(|| e.to_string()))
            }
        };
        drop(turns);
        self.metrics
            .fanout_deliveries_total
            .inc_by(u64::try_from(sent).unwrap_or(u64::MAX));
        Ok(Published {
            ingest: recorded,
            sent,
            not_elsewhere,
        })
    }
}

impl Publisher {
    /// Stores channel webhook messages (one per app and group of endpoints wanting the same
    /// events) with the occupancy changes they report, in one commit, and wakes delivery.
    pub async fn publish_channel_webhooks(
        &self,
        messages: Vec<(Message, Vec<EndpointId>)>,
        changes: Vec<OccupancyChange>,
    ) -> Result<(), PublishError> {
        let wake = !messages.is_empty();
        let mut messages = messages;
        for (message, _) in &mut messages {
            // Channel webhooks keep the server's payload retention.
            self.shared.payload_retention.stamp(None, message);
        }
        self.shared
            .store
            .record_channel_events(messages, changes)
            .await?;
        if wake {
            self.shared.dispatcher.wake_first_attempts();
        }
        Ok(())
    }
}

impl Shared {
    /// The app's Standard Webhooks endpoints that want an event of this type and channels.
    async fn targets(
        &self,
        app: &App,
        event_type: &str,
        channels: Option<&[String]>,
    ) -> Result<Vec<EndpointId>, StoreError> {
        let endpoints = self.store.app_endpoints(&app.id).await?;
        Ok(endpoints
            .iter()
            .filter(|ep| ep.wants(EndpointFormat::StandardWebhooks, event_type, channels))
            .map(|ep| ep.id.clone())
            .collect())
    }
}

/// The webhook message a Pusher event becomes.
fn event_message(app: &App, name: &str, channels: &[String], data: &EventData) -> Message {
    let text = data.as_str();
    let is_object = serde_json::from_str::<serde_json::Value>(text).is_ok_and(|v| v.is_object());
    let payload = match data {
        EventData::Text(bytes) if is_object => bytes.clone(),
        _ if is_object => Bytes::from(text.to_owned()),
        _ => Bytes::from(serde_json::json!({ "data": text }).to_string()),
    };
    let now = crate::now();
    Message {
        id: herald_core::MessageId::new(now),
        app_id: app.id.clone(),
        event_id: None,
        event_type: name.to_owned(),
        channels: (!channels.is_empty()).then(|| channels.to_vec()),
        tags: None,
        payload,
        created_at: now,
        payload_expires_at: None,
    }
}

/// The channels a client can subscribe to, each once, in the order named; other names have
/// no subscribers and keep no history.
fn subscribable(channels: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(channels.len());
    for channel in channels {
        if pusher::validate_channel_name(channel).is_ok() && !out.contains(channel) {
            out.push(channel.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscribable_keeps_valid_names_once_in_order() {
        let names: Vec<String> = ["b", "a:x", "a", "b"].map(String::from).to_vec();
        assert_eq!(subscribable(&names), ["b", "a"]);
    }
}
