//! Claims on deliveries, held in memory.
//!
//! The embedded store belongs to one process, so a lease needs no durability: if the process
//! dies, every delivery it held is simply due again at the next start (`requeue_leased` and the
//! rows' unchanged `pending` state see to that). Keeping leases here makes a claim a pure read,
//! which matters because SQLite has a single writer and claims happen every time an attempt
//! finishes. A store shared by several nodes must keep its leases in the database instead.

use std::{collections::HashMap, sync::Mutex};

use chrono::{DateTime, Utc};

use crate::DeliveryJob;

/// A delivery's key: (msg_id, endpoint_id).
pub(crate) type DeliveryKey = (String, String);

/// The delivery's rowid (what claims exclude) and when the lease runs out.
type Lease = (i64, DateTime<Utc>);

#[derive(Default)]
pub(crate) struct Leases {
    held: Mutex<HashMap<DeliveryKey, Lease>>,
}

impl Leases {
    /// Rowids of deliveries under an unexpired lease, to exclude from a claim.
    pub(crate) fn held(&self, now: DateTime<Utc>) -> Vec<i64> {
        let mut held = self.lock();
        held.retain(|_, (_, until)| *until > now);
        held.values().map(|(rowid, _)| *rowid).collect()
    }

    pub(crate) fn take(&self, jobs: &[DeliveryJob], rowids: &[i64], until: DateTime<Utc>) {
        let mut held = self.lock();
        for (job, rowid) in jobs.iter().zip(rowids) {
            held.insert(
                (job.msg_id.clone(), job.endpoint.id.clone()),
                (*rowid, until),
            );
        }
    }

    pub(crate) fn release(&self, key: &DeliveryKey) {
        self.lock().remove(key);
    }

    pub(crate) fn count_for(&self, endpoint_id: &str) -> i64 {
        self.lock()
            .keys()
            .filter(|(_, endpoint)| endpoint == endpoint_id)
            .count() as i64
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<DeliveryKey, Lease>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }
}
