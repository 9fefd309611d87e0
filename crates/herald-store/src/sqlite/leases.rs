//! Claims on deliveries, held in memory.
//!
//! The embedded store belongs to one process, so a lease needs no durability: if the process
//! dies, every delivery it held is simply due again at the next start (`requeue_leased` and the
//! rows' unchanged `pending` state see to that). Keeping leases here makes a claim a pure read,
//! which matters because SQLite has a single writer and claims happen every time an attempt
//! finishes. A store shared by several nodes must keep its leases in the database instead.
//!
//! Every claim gets a new [`LeaseToken`]; the group commit asks [`Leases::holds`] whether an
//! attempt record's token is still the delivery's lease before it applies the record's state.
//! A lease that has run out is dropped at the next claim, so its late record is stale.
//!
//! A manual enqueue ends the delivery's lease whatever its token ([`Leases::revoke`]), right
//! after its row change commits and while it still holds the writer connection: a group commit
//! (which runs on that connection) checks the lease either before the enqueue, so the record is
//! applied and then overwritten by the enqueue, or after, so the record is stale.

use herald_core::{EndpointId, MessageId};
use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use chrono::{DateTime, Utc};

use crate::{DeliveryJob, LeaseToken};

/// A delivery's key: (msg_id, endpoint_id).
pub(crate) type DeliveryKey = (MessageId, EndpointId);

/// The delivery's rowid (what claims exclude), when the lease runs out, and its token.
type Lease = (i64, DateTime<Utc>, LeaseToken);

/// Shared (cheap to clone) so the group commit can check a record's lease at commit time.
#[derive(Default, Clone)]
pub(crate) struct Leases {
    held: Arc<Mutex<HashMap<DeliveryKey, Lease>>>,
    last_token: Arc<AtomicU64>,
}

impl Leases {
    /// Rowids of deliveries under an unexpired lease, to exclude from a claim.
    pub(crate) fn held(&self, now: DateTime<Utc>) -> Vec<i64> {
        let mut held = self.lock();
        held.retain(|_, (_, until, _)| *until > now);
        held.values().map(|(rowid, _, _)| *rowid).collect()
    }

    /// A token no claim of this store has had.
    pub(crate) fn new_token(&self) -> LeaseToken {
        LeaseToken(self.last_token.fetch_add(1, Ordering::Relaxed) + 1)
    }

    /// Leases each job's delivery under the job's token until `until`, unless a lease that has
    /// not run out by `now` holds it already, and returns the jobs it leased. A claim whose read
    /// raced with a commit that handed the same new delivery over (leased in that commit) must
    /// not send it a second time.
    pub(crate) fn take(
        &self,
        jobs: Vec<DeliveryJob>,
        rowids: &[i64],
        until: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Vec<DeliveryJob> {
        let mut held = self.lock();
        jobs.into_iter()
            .zip(rowids)
            .filter_map(|(job, rowid)| {
                let key = (job.msg_id.clone(), job.endpoint.id.clone());
                if held
                    .get(&key)
                    .is_some_and(|(_, held_until, _)| *held_until > now)
                {
                    return None;
                }
                held.insert(key, (*rowid, until, job.lease));
                Some(job)
            })
            .collect()
    }

    /// Leases new deliveries in the transaction that commits them, before any claim can see
    /// them.
    pub(crate) fn lease_new(
        &self,
        leases: Vec<(DeliveryKey, i64, LeaseToken)>,
        until: DateTime<Utc>,
    ) {
        let mut held = self.lock();
        for (key, rowid, token) in leases {
            held.insert(key, (rowid, until, token));
        }
    }

    /// When the first lease still held runs out: its delivery is claimable again from then.
    pub(crate) fn first_expiry(&self) -> Option<DateTime<Utc>> {
        self.lock().values().map(|(_, until, _)| *until).min()
    }

    /// Whether the delivery is still leased under `token`.
    pub(crate) fn holds(&self, key: &DeliveryKey, token: LeaseToken) -> bool {
        self.lock()
            .get(key)
            .is_some_and(|(_, _, held)| *held == token)
    }

    /// Ends the lease if it is still the one named by `token` (a later claim's lease stays);
    /// returns whether it did.
    pub(crate) fn release(&self, key: &DeliveryKey, token: LeaseToken) -> bool {
        let mut held = self.lock();
        let holds = held.get(key).is_some_and(|(_, _, held)| *held == token);
        if holds {
            held.remove(key);
        }
        holds
    }

    /// Ends the leases of these deliveries, whichever claims hold them: their in-flight
    /// attempts' records become stale, and the next claim leases them under a new token.
    pub(crate) fn revoke<'a>(&self, keys: impl IntoIterator<Item = &'a DeliveryKey>) {
        let mut held = self.lock();
        for key in keys {
            held.remove(key);
        }
    }

    /// The endpoint's deliveries held, of messages whose ids are in `[from, to)`.
    pub(crate) fn count_for(&self, endpoint_id: &str, from: &str, to: &str) -> i64 {
        self.lock()
            .keys()
            .filter(|(msg, endpoint)| endpoint == endpoint_id && (from..to).contains(&msg.as_str()))
            .count() as i64
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<DeliveryKey, Lease>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }
}
