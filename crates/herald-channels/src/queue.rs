//! The queue behind an [`Outbox`](crate::hub::Outbox): bounded, sending never waits, and it
//! holds no allocation while empty.
//!
//! Every open connection and SSE stream has one, and almost all of them are empty almost all
//! the time. tokio's bounded `mpsc` allocated about 1.5 KB per queue up front whatever it held
//! (the channel with its cache-padded halves, and a first block of 32 slots); this one is a
//! `VecDeque` under a mutex that is freed whenever the receiver empties it, so an idle
//! connection pays for the shared header alone. The lock is held for a push or a pop, never
//! across an await or a wake; the hub's broadcasts, the one hot sender, take it once per
//! subscriber as `try_send` took tokio's semaphore.
//!
//! Semantics are those of `tokio::sync::mpsc::channel` as the outbox used it: `try_send`
//! fails when the queue holds `capacity` items or the receiver is gone; `recv` returns `None`
//! once every sender is dropped and the queue is drained; `recv` is cancel-safe.

use std::{
    collections::VecDeque,
    future::poll_fn,
    sync::{Arc, Mutex, MutexGuard},
    task::{Context, Poll, Waker},
};

pub use tokio::sync::mpsc::error::TryRecvError;

use crate::publication::Outgoing;

struct Shared {
    capacity: usize,
    state: Mutex<State>,
}

struct State {
    items: VecDeque<Outgoing>,
    /// Live [`Sender`]s; at 0 the receiver sees the end once it has drained the queue.
    senders: usize,
    receiver_dropped: bool,
    /// The receiver waiting for an item (taken by the send that wakes it).
    waiting: Option<Waker>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding it; a poisoned lock still holds a consistent queue.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A queue holding at most `capacity` items (at least 1).
pub fn channel(capacity: usize) -> (Sender, Frames) {
    let shared = Arc::new(Shared {
        capacity: capacity.max(1),
        state: Mutex::new(State {
            items: VecDeque::new(),
            senders: 1,
            receiver_dropped: false,
            waiting: None,
        }),
    });
    (
        Sender {
            shared: Arc::clone(&shared),
        },
        Frames { shared },
    )
}

/// The sending half; clones share the queue.
pub struct Sender {
    shared: Arc<Shared>,
}

impl Sender {
    /// Queues `item` unless the queue is full or its receiver is gone (then hands it back).
    pub fn try_send(&self, item: Outgoing) -> Result<(), Outgoing> {
        let waiting = {
            let mut state = self.shared.lock();
            if state.receiver_dropped || state.items.len() >= self.shared.capacity {
                return Err(item);
            }
            state.items.push_back(item);
            state.waiting.take()
        };
        // Woken outside the lock: the receiver's task may run at once on another thread.
        if let Some(waker) = waiting {
            waker.wake();
        }
        Ok(())
    }

    /// How many items the queue holds at most.
    pub fn max_capacity(&self) -> usize {
        self.shared.capacity
    }
}

impl Clone for Sender {
    fn clone(&self) -> Self {
        self.shared.lock().senders += 1;
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        let waiting = {
            let mut state = self.shared.lock();
            state.senders -= 1;
            if state.senders > 0 {
                return;
            }
            state.waiting.take()
        };
        // The last sender is gone: a waiting receiver learns the queue has ended.
        if let Some(waker) = waiting {
            waker.wake();
        }
    }
}

/// The receiving half: what a connection's task writes out.
pub struct Frames {
    shared: Arc<Shared>,
}

impl Frames {
    /// The next item, or `None` once every sender is gone and the queue is drained.
    /// Cancel-safe: an item is taken only by the poll that returns it.
    pub async fn recv(&mut self) -> Option<Outgoing> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }

    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Outgoing>> {
        let mut state = self.shared.lock();
        if let Some(item) = pop(&mut state) {
            return Poll::Ready(Some(item));
        }
        if state.senders == 0 {
            return Poll::Ready(None);
        }
        match &mut state.waiting {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            waiting => *waiting = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// The next item if one is queued.
    pub fn try_recv(&mut self) -> Result<Outgoing, TryRecvError> {
        let mut state = self.shared.lock();
        match pop(&mut state) {
            Some(item) => Ok(item),
            None if state.senders == 0 => Err(TryRecvError::Disconnected),
            None => Err(TryRecvError::Empty),
        }
    }
}

/// Takes the oldest item; the one that empties the queue also frees its buffer, so an idle
/// connection holds none (a busy one allocates again on its next item, which costs less than
/// the write it is queued for).
fn pop(state: &mut State) -> Option<Outgoing> {
    let item = state.items.pop_front()?;
    if state.items.is_empty() {
        state.items = VecDeque::new();
    }
    Some(item)
}

impl Drop for Frames {
    fn drop(&mut self) {
        let items = {
            let mut state = self.shared.lock();
            state.receiver_dropped = true;
            state.waiting = None;
            std::mem::take(&mut state.items)
        };
        // Dropped outside the lock: a publication's last reference may free a lot.
        drop(items);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Frame;

    fn frame(text: &str) -> Outgoing {
        Outgoing::Frame(Frame::from(text.to_owned()))
    }

    fn text(item: Outgoing) -> String {
        item.pusher_frame().as_str().to_owned()
    }

    #[test]
    fn an_empty_queue_holds_no_buffer_and_a_drained_one_gives_it_back() {
        let (sender, mut frames) = channel(1024);
        assert_eq!(sender.shared.lock().items.capacity(), 0);
        sender.try_send(frame("a")).expect("room");
        sender.try_send(frame("b")).expect("room");
        assert!(sender.shared.lock().items.capacity() > 0);
        assert_eq!(text(frames.try_recv().expect("queued")), "a");
        assert_eq!(text(frames.try_recv().expect("queued")), "b");
        assert_eq!(sender.shared.lock().items.capacity(), 0);
        assert!(matches!(frames.try_recv(), Err(TryRecvError::Empty)));
    }

    #[test]
    fn a_full_queue_refuses_and_keeps_its_order() {
        let (sender, mut frames) = channel(2);
        sender.try_send(frame("a")).expect("room");
        sender.try_send(frame("b")).expect("room");
        assert!(sender.try_send(frame("c")).is_err());
        assert_eq!(sender.max_capacity(), 2);
        assert_eq!(text(frames.try_recv().expect("queued")), "a");
        sender.try_send(frame("c")).expect("room again");
        assert_eq!(text(frames.try_recv().expect("queued")), "b");
        assert_eq!(text(frames.try_recv().expect("queued")), "c");
    }

    #[test]
    fn sending_to_a_dropped_receiver_fails() {
        let (sender, frames) = channel(4);
        drop(frames);
        assert!(sender.try_send(frame("a")).is_err());
    }

    #[tokio::test]
    async fn recv_waits_for_a_send_and_ends_when_every_sender_is_gone() {
        let (sender, mut frames) = channel(4);
        let second = sender.clone();
        let waiter = tokio::spawn(async move {
            let first = frames.recv().await.map(text);
            let end = frames.recv().await.map(text);
            (first, end)
        });
        tokio::task::yield_now().await;
        second.try_send(frame("a")).expect("room");
        drop(second);
        drop(sender);
        let (first, end) = waiter.await.expect("the receiver's task");
        assert_eq!(first.as_deref(), Some("a"));
        assert_eq!(end, None);
    }
}
