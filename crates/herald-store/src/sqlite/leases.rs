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
//! A claim reads due rows without a lock, so a delivery leased and released while the claim
//! read (handed over by a commit, attempted and recorded) can look due to it and unleased
//! when it takes its jobs: while claims are under way, the leases released meanwhile are
//! remembered, and a claim does not take a delivery released since it began
//! ([`Leases::mark`]).
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
    state: Arc<Mutex<State>>,
    last_token: Arc<AtomicU64>,
}

#[derive(Default)]
struct State {
    held: HashMap<DeliveryKey, Lease>,
    /// Releases so far: a [`ClaimMark`] holds the count when its claim began.
    releases: u64,
    /// The claims under way, by the release count at their start (how many began then).
    claims: std::collections::BTreeMap<u64, usize>,
    /// Deliveries released since the oldest claim under way began, with the count their
    /// release made (nothing is kept while no claim is under way).
    released: HashMap<DeliveryKey, u64>,
}

/// A claim under way, from before it reads to after it takes its jobs (see
/// [`Leases::mark`]); dropping it ends the claim.
pub(crate) struct ClaimMark {
    releases: u64,
    leases: Leases,
}

impl Drop for ClaimMark {
    fn drop(&mut self) {
        let mut state = self.leases.lock();
        if let std::collections::btree_map::Entry::Occupied(mut claims) =
            state.claims.entry(self.releases)
        {
            *claims.get_mut() -= 1;
            if *claims.get() == 0 {
                claims.remove();
            }
        }
        // What no claim under way began before is forgotten.
        match state.claims.keys().next().copied() {
            None => state.released.clear(),
            Some(oldest) => state.released.retain(|_, release| *release > oldest),
        }
    }
}

impl Leases {
    /// Rowids of deliveries under an unexpired lease, to exclude from a claim.
    pub(crate) fn held(&self, now: DateTime<Utc>) -> Vec<i64> {
        let mut state = self.lock();
        state.held.retain(|_, (_, until, _)| *until > now);
        state.held.values().map(|(rowid, _, _)| *rowid).collect()
    }

    /// Marks a claim's start, before it reads: [`Leases::take`] then leaves out what was
    /// released since. Keep it until the claim has taken its jobs.
    pub(crate) fn mark(&self) -> ClaimMark {
        let mut state = self.lock();
        let releases = state.releases;
        *state.claims.entry(releases).or_default() += 1;
        ClaimMark {
            releases,
            leases: self.clone(),
        }
    }

    /// A token no claim of this store has had.
    pub(crate) fn new_token(&self) -> LeaseToken {
        LeaseToken(self.last_token.fetch_add(1, Ordering::Relaxed) + 1)
    }

    /// Leases each job's delivery under the job's token until `until`, unless a lease that has
    /// not run out by `now` holds it already, or one was released since the claim's `mark`,
    /// and returns the jobs it leased. A claim whose read raced with a commit that handed the
    /// same new delivery over (leased in that commit) must not send it a second time, nor
    /// once that attempt is recorded and its lease released (the read may predate the record).
    pub(crate) fn take(
        &self,
        jobs: Vec<DeliveryJob>,
        rowids: &[i64],
        until: DateTime<Utc>,
        now: DateTime<Utc>,
        mark: &ClaimMark,
    ) -> Vec<DeliveryJob> {
        let mut state = self.lock();
        let State { held, released, .. } = &mut *state;
        jobs.into_iter()
            .zip(rowids)
            .filter_map(|(job, rowid)| {
                let key = (job.msg_id.clone(), job.endpoint.id.clone());
                if held
                    .get(&key)
                    .is_some_and(|(_, held_until, _)| *held_until > now)
                    || released
                        .get(&key)
                        .is_some_and(|&release| release > mark.releases)
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
        let mut state = self.lock();
        for (key, rowid, token) in leases {
            state.held.insert(key, (rowid, until, token));
        }
    }

    /// When the first lease still held runs out: its delivery is claimable again from then.
    pub(crate) fn first_expiry(&self) -> Option<DateTime<Utc>> {
        self.lock().held.values().map(|(_, until, _)| *until).min()
    }

    /// Whether the delivery is still leased under `token`.
    pub(crate) fn holds(&self, key: &DeliveryKey, token: LeaseToken) -> bool {
        self.lock()
            .held
            .get(key)
            .is_some_and(|(_, _, held)| *held == token)
    }

    /// Ends the lease if it is still the one named by `token` (a later claim's lease stays);
    /// returns whether it did.
    pub(crate) fn release(&self, key: &DeliveryKey, token: LeaseToken) -> bool {
        let mut state = self.lock();
        let holds = state
            .held
            .get(key)
            .is_some_and(|(_, _, held)| *held == token);
        if holds {
            state.held.remove(key);
            state.releases += 1;
            if !state.claims.is_empty() {
                let release = state.releases;
                state.released.insert(key.clone(), release);
            }
        }
        holds
    }

    /// Ends the leases of these deliveries, whichever claims hold them: their in-flight
    /// attempts' records become stale, and the next claim leases them under a new token.
    ///
    /// A claim under way takes none of them either, leased or not: its read may predate the
    /// change that revoked them (an expunge failed them; a resend is claimed again next).
    pub(crate) fn revoke<'a>(&self, keys: impl IntoIterator<Item = &'a DeliveryKey>) {
        let mut state = self.lock();
        state.releases += 1;
        let (release, remember) = (state.releases, !state.claims.is_empty());
        for key in keys {
            state.held.remove(key);
            if remember {
                state.released.insert(key.clone(), release);
            }
        }
    }

    /// The endpoint's deliveries held, of messages whose ids are in `[from, to)`.
    pub(crate) fn count_for(&self, endpoint_id: &str, from: &str, to: &str) -> i64 {
        self.lock()
            .held
            .keys()
            .filter(|(msg, endpoint)| endpoint == endpoint_id && (from..to).contains(&msg.as_str()))
            .count() as i64
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance;

    fn job(leases: &Leases) -> DeliveryJob {
        let app = conformance::app("A");
        let msg = conformance::message(&app.id, None);
        DeliveryJob {
            msg_id: msg.id,
            app_id: app.id.clone(),
            event_type: msg.event_type,
            payload: msg.payload,
            endpoint: conformance::endpoint(&app.id),
            attempts: 0,
            trigger: herald_core::model::TriggerType::Scheduled,
            lease: leases.new_token(),
        }
    }

    /// A claim that read a new delivery as due while a commit handed it over (leased), and
    /// its attempt was recorded and released, does not take it: it would be sent twice.
    #[test]
    fn a_claim_does_not_take_a_delivery_released_since_it_began() {
        let leases = Leases::default();
        let now = Utc::now();
        let until = now + chrono::Duration::seconds(60);
        let handed = job(&leases);
        let key = (handed.msg_id.clone(), handed.endpoint.id.clone());
        let mark = leases.mark();
        leases.lease_new(vec![(key.clone(), 7, handed.lease)], until);
        assert!(leases.release(&key, handed.lease), "its attempt recorded");
        let claimed = DeliveryJob {
            lease: leases.new_token(),
            ..handed.clone()
        };
        assert!(
            leases
                .take(vec![claimed.clone()], &[7], until, now, &mark)
                .is_empty(),
            "released since the claim began"
        );
        // A claim that began after the release takes it (a retry falling due).
        drop(mark);
        let taken = leases.take(vec![claimed], &[7], until, now, &leases.mark());
        assert_eq!(taken.len(), 1);
    }

    /// A delivery taken back (a resend, an expunge) while a claim is under way is not taken
    /// by that claim, leased before or not: the claim's read may predate the change.
    #[test]
    fn a_claim_does_not_take_a_delivery_taken_back_since_it_began() {
        let leases = Leases::default();
        let now = Utc::now();
        let until = now + chrono::Duration::seconds(60);
        let due = job(&leases);
        let key = (due.msg_id.clone(), due.endpoint.id.clone());
        let mark = leases.mark();
        leases.revoke([&key]);
        assert!(
            leases
                .take(vec![due.clone()], &[7], until, now, &mark)
                .is_empty()
        );
        drop(mark);
        assert_eq!(
            leases
                .take(vec![due], &[7], until, now, &leases.mark())
                .len(),
            1,
            "a claim that began after it takes it"
        );
    }

    /// Releases are remembered only while a claim that began before them is under way.
    #[test]
    fn releases_are_remembered_only_for_the_claims_under_way() {
        let leases = Leases::default();
        let until = Utc::now() + chrono::Duration::seconds(60);
        let jobs: Vec<DeliveryJob> = (0..3).map(|_| job(&leases)).collect();
        let key = |job: &DeliveryJob| (job.msg_id.clone(), job.endpoint.id.clone());
        let leased: Vec<_> = jobs
            .iter()
            .enumerate()
            .map(|(n, job)| (key(job), n as i64, job.lease))
            .collect();
        leases.lease_new(leased, until);
        assert!(leases.release(&key(&jobs[0]), jobs[0].lease));
        assert!(
            leases.lock().released.is_empty(),
            "no claim under way: nothing kept"
        );
        let first = leases.mark();
        assert!(leases.release(&key(&jobs[1]), jobs[1].lease));
        let second = leases.mark();
        assert!(leases.release(&key(&jobs[2]), jobs[2].lease));
        assert_eq!(leases.lock().released.len(), 2);
        drop(first);
        assert_eq!(
            leases.lock().released.len(),
            1,
            "only the release after the second claim began"
        );
        drop(second);
        let state = leases.lock();
        assert!(state.released.is_empty() && state.claims.is_empty());
    }
}
