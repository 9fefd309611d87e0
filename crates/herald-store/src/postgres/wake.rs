//! Waking the other nodes' dispatchers after new deliveries commit, without making every
//! message's commit wait for the others.
//!
//! PostgreSQL serialises the commits of transactions that `NOTIFY`: one that notifies holds a
//! database-wide lock from its pre-commit to its end, its WAL flush included, so notifying
//! transactions commit one after another and never share a flush. Notifying inside every
//! message's transaction therefore capped message creation at one flush per message.
//!
//! So new messages notify after their commit, and coalesced: at most one notification is in
//! flight per node, and a commit made while one is in flight asks for one more after it. Every
//! committed delivery is followed by a notification that starts after its commit, so a node
//! woken by it sees the delivery. The node that inserted wakes its own dispatcher in process
//! (the publisher does). A notification lost to a crash between the commit and the notify
//! costs the other nodes at most their idle poll (the dispatcher's `IDLE_POLL`), never a
//! delivery. Rare writes that make deliveries due (manual enqueues) still notify in their own
//! transaction. These notifications carry the payload that says only first attempts are new
//! (`DueLanes::FirstAttempts`), so they do not send the retry lanes to the store.

use std::sync::{Arc, Mutex};

use sqlx::PgPool;

use super::messages::{DELIVERIES_CHANNEL, FIRST_ATTEMPTS_PAYLOAD};

#[derive(Default)]
struct State {
    /// A notification is being sent.
    in_flight: bool,
    /// A commit happened after the one in flight started: send another when it ends.
    again: bool,
}

/// Sends coalesced notifications on [`DELIVERIES_CHANNEL`].
pub(crate) struct DueNotifier {
    pool: PgPool,
    state: Mutex<State>,
}

impl DueNotifier {
    pub(crate) fn new(pool: PgPool) -> Arc<Self> {
        Arc::new(Self {
            pool,
            state: Mutex::new(State::default()),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Deliveries have just committed: make sure a notification starts after this point.
    pub(crate) fn committed(self: &Arc<Self>) {
        {
            let mut state = self.state();
            if state.in_flight {
                state.again = true;
                return;
            }
            state.in_flight = true;
        }
        let this = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                if let Err(e) = sqlx::query("SELECT pg_notify($1, $2)")
                    .bind(DELIVERIES_CHANNEL)
                    .bind(FIRST_ATTEMPTS_PAYLOAD)
                    .execute(&this.pool)
                    .await
                {
                    // The other nodes find the deliveries at their next idle poll.
                    tracing::warn!(error = %e, "notifying the other nodes of new deliveries failed");
                }
                let mut state = this.state();
                if !std::mem::take(&mut state.again) {
                    state.in_flight = false;
                    return;
                }
            }
        });
    }
}
