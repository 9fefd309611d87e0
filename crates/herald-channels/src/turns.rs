//! Each history channel's order on this node, pipelined. The store assigns a channel's offsets
//! in the order writes are queued to it (`MessageStore::queue_publication`), and the broker
//! must get one channel's publications in offset order; the publisher keeps both orders the
//! same without holding the channel across a commit, so several publications of one channel
//! can wait for the same commit.
//!
//! A publication takes a ticket per history channel ([`ChannelTurns::take`]), then two steps,
//! each in ticket order per channel:
//! 1. [`Step::Queue`]: it queues its write once every earlier ticket has queued (or given up)
//!    its own, so ticket order is offset order;
//! 2. [`Step::HandOver`]: it hands its publication to the broker once every earlier ticket has
//!    handed over (or given up) its own, so the broker gets them in offset order.
//!
//! A ticket dropped before a step gives the step up: the next ticket's turn comes now if it was
//! this one's, else as soon as the turn reaches it. Giving up keeps the order only because what
//! gives up consumed no offset: a write that failed (the store then assigns it none), or one
//! never queued. (A write that committed and whose task was then dropped, at shutdown, leaves
//! its offset unsent; subscribers recover it by offset, as after a broker failure.)
//!
//! Several channels: a publication takes all its tickets under one lock, so two publications
//! are in the same order on every channel they share, and each waits only for earlier tickets:
//! the waits cannot form a cycle.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex, MutexGuard},
};

use herald_core::AppId;
use tokio::sync::Notify;

/// A step a publication takes in ticket order on each of its history channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Queue the write that assigns its offsets.
    Queue,
    /// Hand the publication to the broker.
    HandOver,
}

impl Step {
    const ALL: [Step; 2] = [Step::Queue, Step::HandOver];

    fn index(self) -> usize {
        match self {
            Step::Queue => 0,
            Step::HandOver => 1,
        }
    }
}

/// The tickets of every history channel with a publication in flight on this node. A channel's
/// lane lives while a ticket on it does, and is dropped with the last one.
#[derive(Default)]
pub(crate) struct ChannelTurns {
    lanes: Arc<Mutex<Lanes>>,
}

type Lanes = HashMap<(AppId, String), Arc<Mutex<Lane>>>;

/// One channel's tickets.
#[derive(Default)]
struct Lane {
    /// The next ticket to hand out.
    next: u64,
    /// Per step: the ticket whose turn it is.
    turn: [u64; 2],
    /// Per step: tickets after `turn` that gave the step up out of turn, skipped when the turn
    /// reaches them.
    given_up: [BTreeSet<u64>; 2],
    /// The wake-up of each ticket in use, called when its turn comes.
    tickets: HashMap<u64, Arc<Notify>>,
}

impl Lane {
    /// Ends `ticket`'s part in `step`: in turn, the turn moves to the next ticket that has not
    /// given the step up (and wakes it); out of turn, it is skipped when the turn reaches it.
    fn pass(&mut self, step: Step, ticket: u64) {
        let i = step.index();
        if self.turn[i] != ticket {
            self.given_up[i].insert(ticket);
            return;
        }
        let mut turn = ticket + 1;
        while self.given_up[i].remove(&turn) {
            turn += 1;
        }
        self.turn[i] = turn;
        if let Some(next) = self.tickets.get(&turn) {
            // A permit if it is not waiting yet: it checks its turn before waiting anyway.
            next.notify_one();
        }
    }
}

/// A mutex whose data stays consistent even if a holder panicked (every change under these
/// locks is a few assignments that cannot panic halfway).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// One publication's tickets, one per history channel. Dropping them gives up the steps not
/// taken yet.
pub(crate) struct Tickets {
    lanes: Arc<Mutex<Lanes>>,
    app_id: AppId,
    held: Vec<(String, Arc<Mutex<Lane>>, u64)>,
    /// Woken when one of its turns comes (possibly on another channel than the one waited
    /// for: each wait checks its turn again).
    wake: Arc<Notify>,
    passed: [bool; 2],
}

impl ChannelTurns {
    /// Takes a ticket on each of `channels` (names, each once) for one publication, all at
    /// once.
    pub(crate) fn take<C: AsRef<str>, T>(&self, app_id: &AppId, channels: &[(C, T)]) -> Tickets {
        let wake = Arc::new(Notify::new());
        let mut held: Vec<(String, Arc<Mutex<Lane>>, u64)> = Vec::with_capacity(channels.len());
        if !channels.is_empty() {
            let mut lanes = lock(&self.lanes);
            for (channel, _) in channels {
                let channel = channel.as_ref();
                if held.iter().any(|(c, _, _)| c == channel) {
                    // A second ticket on the same lane would wait for the first forever.
                    continue;
                }
                let lane = Arc::clone(
                    lanes
                        .entry((app_id.clone(), channel.to_owned()))
                        .or_default(),
                );
                let ticket = {
                    let mut lane = lock(&lane);
                    let ticket = lane.next;
                    lane.next += 1;
                    lane.tickets.insert(ticket, Arc::clone(&wake));
                    ticket
                };
                held.push((channel.to_owned(), lane, ticket));
            }
        }
        Tickets {
            lanes: Arc::clone(&self.lanes),
            app_id: app_id.clone(),
            held,
            wake,
            passed: [false; 2],
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        lock(&self.lanes).len()
    }
}

impl Tickets {
    /// Waits until it is this publication's turn to take `step` on every one of its channels.
    pub(crate) async fn wait(&self, step: Step) {
        let i = step.index();
        for (_, lane, ticket) in &self.held {
            // Its turn, once come, stays until it passes: one channel at a time is enough.
            while lock(lane).turn[i] < *ticket {
                self.wake.notified().await;
            }
        }
    }

    /// Takes `step` (after [`Tickets::wait`]): the next tickets' turn comes.
    pub(crate) fn pass(&mut self, step: Step) {
        let i = step.index();
        if std::mem::replace(&mut self.passed[i], true) {
            return;
        }
        for (_, lane, ticket) in &self.held {
            lock(lane).pass(step, *ticket);
        }
    }
}

impl Drop for Tickets {
    fn drop(&mut self) {
        if self.held.is_empty() {
            return;
        }
        // The map first, as `take` does: a lane found idle here cannot get a ticket before it
        // is removed.
        let mut lanes = lock(&self.lanes);
        for (channel, lane, ticket) in self.held.drain(..) {
            let idle = {
                let mut lane = lock(&lane);
                for step in Step::ALL {
                    if !self.passed[step.index()] {
                        lane.pass(step, ticket);
                    }
                }
                lane.tickets.remove(&ticket);
                // With no ticket left, every step's turn has reached `next`: a new lane is the
                // same.
                lane.tickets.is_empty()
            };
            if idle {
                let key = (self.app_id.clone(), channel);
                if lanes.get(&key).is_some_and(|l| Arc::ptr_eq(l, &lane)) {
                    lanes.remove(&key);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        future::Future,
        pin::pin,
        task::{Context, Waker},
    };

    use super::*;

    fn app() -> AppId {
        AppId::parse("app_app").expect("valid")
    }

    /// Whether `future` is done after one poll (a wait that is its turn returns at once).
    fn ready<F: Future>(future: F) -> bool {
        let future = pin!(future);
        future
            .poll(&mut Context::from_waker(Waker::noop()))
            .is_ready()
    }

    fn on(channels: &[&'static str]) -> Vec<(&'static str, ())> {
        channels.iter().map(|c| (*c, ())).collect()
    }

    #[test]
    fn each_step_is_taken_in_ticket_order_and_the_steps_overlap() {
        let turns = ChannelTurns::default();
        let mut first = turns.take(&app(), &on(&["c"]));
        let mut second = turns.take(&app(), &on(&["c"]));
        let mut third = turns.take(&app(), &on(&["c"]));
        assert!(ready(first.wait(Step::Queue)));
        assert!(
            !ready(second.wait(Step::Queue)),
            "the second queues after the first"
        );
        first.pass(Step::Queue);
        assert!(ready(second.wait(Step::Queue)));
        second.pass(Step::Queue);
        assert!(
            ready(third.wait(Step::Queue)),
            "queued while the first still waits to hand over"
        );
        third.pass(Step::Queue);
        assert!(
            !ready(second.wait(Step::HandOver)),
            "hands over after the first"
        );
        assert!(ready(first.wait(Step::HandOver)));
        drop(first);
        assert!(ready(second.wait(Step::HandOver)));
        assert!(!ready(third.wait(Step::HandOver)));
        drop(second);
        assert!(ready(third.wait(Step::HandOver)));
        drop(third);
        assert_eq!(turns.len(), 0, "no lane outlives its tickets");
    }

    #[test]
    fn a_ticket_given_up_out_of_turn_is_skipped_when_its_turn_comes() {
        let turns = ChannelTurns::default();
        let mut first = turns.take(&app(), &on(&["c"]));
        let failed = turns.take(&app(), &on(&["c"]));
        let last = turns.take(&app(), &on(&["c"]));
        // A write that failed (or was never queued) gives up both steps before its turn...
        drop(failed);
        // ...and the one after it still waits for the ones before it.
        assert!(!ready(last.wait(Step::Queue)));
        first.pass(Step::Queue);
        assert!(ready(last.wait(Step::Queue)));
        assert!(!ready(last.wait(Step::HandOver)));
        drop(first);
        assert!(ready(last.wait(Step::HandOver)));
        drop(last);
        assert_eq!(turns.len(), 0);
    }

    #[test]
    fn publications_on_several_channels_keep_one_order_on_each() {
        let turns = ChannelTurns::default();
        let ab = turns.take(&app(), &on(&["a", "b"]));
        let b = turns.take(&app(), &on(&["b"]));
        let mut ca = turns.take(&app(), &on(&["c", "a"]));
        let c = turns.take(&app(), &on(&["c"]));
        assert!(!ready(b.wait(Step::Queue)), "behind `ab` on b");
        assert!(
            !ready(ca.wait(Step::Queue)),
            "first on c, but behind `ab` on a"
        );
        assert!(
            !ready(c.wait(Step::Queue)),
            "behind `ca` on c, so behind `ab` too"
        );
        drop(ab);
        assert!(ready(b.wait(Step::Queue)));
        assert!(ready(ca.wait(Step::Queue)));
        assert!(!ready(c.wait(Step::Queue)));
        ca.pass(Step::Queue);
        assert!(ready(c.wait(Step::Queue)));
        assert!(!ready(c.wait(Step::HandOver)), "`ca` has not handed over");
        // Another app's channel of the same name is another lane.
        let other = turns.take(&AppId::parse("app_other").expect("valid"), &on(&["b"]));
        assert!(ready(other.wait(Step::HandOver)));
        drop((b, ca, c, other));
        assert_eq!(turns.len(), 0);
    }

    /// Many publications on one channel, each on a task: they queue and hand over in ticket
    /// order whatever order the tasks run in, and a wait is woken when its turn comes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_tickets_take_each_step_in_order() {
        let turns = Arc::new(ChannelTurns::default());
        let queued = Arc::new(Mutex::new(Vec::new()));
        let handed = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for n in 0..200_u32 {
            let mut tickets = turns.take(&app(), &on(&["c"]));
            let (queued, handed) = (Arc::clone(&queued), Arc::clone(&handed));
            tasks.push(tokio::spawn(async move {
                tickets.wait(Step::Queue).await;
                lock(&queued).push(n);
                tickets.pass(Step::Queue);
                tokio::task::yield_now().await;
                if n % 7 == 3 {
                    // A failed write: gives up its hand-over, out of turn or not.
                    return;
                }
                tickets.wait(Step::HandOver).await;
                lock(&handed).push(n);
            }));
        }
        for task in tasks {
            task.await.expect("task");
        }
        assert_eq!(*lock(&queued), (0..200).collect::<Vec<_>>());
        assert_eq!(
            *lock(&handed),
            (0..200).filter(|n| n % 7 != 3).collect::<Vec<_>>()
        );
        assert_eq!(turns.len(), 0);
    }
}
