//! The live tail: every publication this node commits, offered to whoever watches it
//! (`GET /api/v1/app/{app_id}/tail`, which `herald listen` and the console read).
//!
//! It is a bounded broadcast, not a queue: a watcher that falls behind is told how many events
//! it missed (`Lagged`) instead of slowing publishers down, and with no watcher a publication
//! costs one atomic load here. Watching is for people and tools, not for delivery: webhooks and
//! subscribers never depend on it.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use herald_core::{AppId, MessageId};
use tokio::sync::broadcast;

pub use herald_metrics::Source;

use crate::publication::EventData;

/// One committed publication, as a watcher sees it.
#[derive(Debug)]
pub struct TailEvent {
    pub app_id: AppId,
    pub source: Source,
    /// The event type of a message, or the Pusher event's name.
    pub event: String,
    pub channels: Vec<String>,
    /// The webhook message it became, if any (a Pusher event no endpoint wants has none).
    pub message_id: Option<MessageId>,
    /// The message's `eventId`, when its producer gave one.
    pub event_id: Option<String>,
    /// A message's JSON payload, or the event's data as sent.
    pub data: EventData,
    /// Whether `data` is JSON (a message's payload always is).
    pub json: bool,
    pub at: DateTime<Utc>,
}

/// The node's tail: one bounded broadcast for every app; watchers filter.
#[derive(Debug, Clone)]
pub struct Tail {
    sender: broadcast::Sender<Arc<TailEvent>>,
}

impl Tail {
    /// A tail that keeps up to `capacity` events for its slowest watcher.
    pub fn new(capacity: usize) -> Self {
        let (sender, _) = broadcast::channel(capacity.max(1));
        Self { sender }
    }

    /// Starts watching: events committed from now on.
    pub fn watch(&self) -> broadcast::Receiver<Arc<TailEvent>> {
        self.sender.subscribe()
    }

    /// Whether anyone watches, so a publication builds its event only then.
    pub(crate) fn is_watched(&self) -> bool {
        self.sender.receiver_count() > 0
    }

    pub(crate) fn offer(&self, event: TailEvent) {
        // An error only says that nobody watches any more.
        let _ = self.sender.send(Arc::new(event));
    }
}

impl Default for Tail {
    fn default() -> Self {
        Self::new(1024)
    }
}
