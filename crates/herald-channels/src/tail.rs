//! The live tail: every publication this node commits, offered to whoever watches it
//! (`GET /api/v1/app/{app_id}/tail`, which `herald listen` and the console read).
//!
//! It is a bounded broadcast, not a queue: a watcher that falls behind is told how many events
//! it missed (`Lagged`) instead of slowing publishers down, and with no watcher a publication
//! costs one atomic load here. Watching is for people and tools, not for delivery: webhooks and
//! subscribers never depend on it.
//!
//! What it holds is bounded in bytes too: an event keeps its data only up to
//! [`MAX_TAIL_DATA_BYTES`] (larger data is left out and its size said), so the events a slow
//! watcher has not read yet hold at most `capacity` times that, whatever the payloads.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use chrono::{DateTime, Utc};
use herald_core::{AppId, MessageId};
use tokio::sync::broadcast;

pub use herald_metrics::Source;

use crate::publication::EventData;

/// Data larger than this is left out of the tail's event ([`TailData::LeftOut`]), its size
/// kept: the ring's 1,024 events then hold 64 MiB of data at most, where payloads of the API's
/// 1 MiB could hold a GiB for a watcher that reads nothing.
pub const MAX_TAIL_DATA_BYTES: usize = 64 * 1024;

/// A tailed event's data, as the tail keeps it.
#[derive(Debug)]
pub enum TailData {
    Kept(EventData),
    /// Larger than [`MAX_TAIL_DATA_BYTES`]: only its length (the message log has a message's
    /// payload).
    LeftOut {
        bytes: usize,
    },
}

impl TailData {
    /// `data` kept, or left out beyond [`MAX_TAIL_DATA_BYTES`].
    pub(crate) fn bounded(data: EventData) -> Self {
        match data.as_str().len() {
            bytes if bytes > MAX_TAIL_DATA_BYTES => Self::LeftOut { bytes },
            _ => Self::Kept(data),
        }
    }
}

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
    /// A message's JSON payload, or the event's data as sent (left out when larger than
    /// [`MAX_TAIL_DATA_BYTES`]).
    pub data: TailData,
    /// Whether `data` is JSON (a message's payload always is).
    pub json: bool,
    pub at: DateTime<Utc>,
}

/// The node's tail: one bounded broadcast for every app; watchers filter.
#[derive(Debug, Clone)]
pub struct Tail {
    sender: broadcast::Sender<Arc<TailEvent>>,
    /// Watchers alive: read by every publication, so an atomic rather than the broadcast's
    /// own count, which is behind its lock.
    watchers: Arc<AtomicUsize>,
}

impl Tail {
    /// A tail that keeps up to `capacity` events for its slowest watcher.
    pub fn new(capacity: usize) -> Self {
        let (sender, _) = broadcast::channel(capacity.max(1));
        Self {
            sender,
            watchers: Arc::default(),
        }
    }

    /// Starts watching: events committed from now on, until the watcher is dropped.
    pub fn watch(&self) -> Watcher {
        self.watchers.fetch_add(1, Ordering::AcqRel);
        Watcher {
            events: self.sender.subscribe(),
            watchers: Arc::clone(&self.watchers),
        }
    }

    /// Whether anyone watches, so a publication builds its event only then.
    pub(crate) fn is_watched(&self) -> bool {
        self.watchers.load(Ordering::Acquire) > 0
    }

    pub(crate) fn offer(&self, event: TailEvent) {
        // An error only says that nobody watches any more.
        let _ = self.sender.send(Arc::new(event));
    }
}

/// One watcher's receiving end; counted while it lives.
#[derive(Debug)]
pub struct Watcher {
    pub events: broadcast::Receiver<Arc<TailEvent>>,
    watchers: Arc<AtomicUsize>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.watchers.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Default for Tail {
    fn default() -> Self {
        Self::new(1024)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> TailEvent {
        TailEvent {
            app_id: AppId::parse("app_1").expect("valid"),
            source: Source::Api,
            event: "order.paid".into(),
            channels: Vec::new(),
            message_id: None,
            event_id: None,
            data: TailData::Kept(EventData::text("{}")),
            json: true,
            at: Utc::now(),
        }
    }

    /// Data up to the bound is kept; larger data is left out, its length kept.
    #[test]
    fn data_over_the_bound_is_left_out_and_its_length_kept() {
        match TailData::bounded(EventData::text("x".repeat(MAX_TAIL_DATA_BYTES))) {
            TailData::Kept(kept) => assert_eq!(kept.as_str().len(), MAX_TAIL_DATA_BYTES),
            left_out => panic!("not kept at the bound: {left_out:?}"),
        }
        match TailData::bounded(EventData::text("x".repeat(MAX_TAIL_DATA_BYTES + 1))) {
            TailData::LeftOut { bytes } => assert_eq!(bytes, MAX_TAIL_DATA_BYTES + 1),
            kept => panic!("kept beyond the bound: {kept:?}"),
        }
    }

    #[test]
    fn it_is_watched_while_a_watcher_lives_and_each_one_hears_the_offers() {
        let tail = Tail::new(4);
        assert!(!tail.is_watched());
        let mut first = tail.watch();
        let second = tail.watch();
        assert!(tail.is_watched());
        tail.offer(event());
        assert_eq!(first.events.try_recv().expect("heard").event, "order.paid");
        drop(second);
        assert!(tail.is_watched(), "one is left");
        drop(first);
        assert!(!tail.is_watched());
    }
}
