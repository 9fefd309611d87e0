//! What the embedded store knows about its claimable deliveries, so that claims that cannot
//! find anything cost no query, and those that can look only where the work is.
//!
//! New deliveries go to the dispatcher as they commit (see [`crate::FreshDeliveries`]), so most
//! claims would find nothing: every due delivery is leased already, or belongs to an endpoint
//! or app at its limit. Such a claim still walks every leased and every held-back due row, and
//! an endpoint with a backlog made each claim walk the whole backlog. This store owns its
//! database alone, so it sees every change that makes a delivery claimable and can keep, for
//! each lane, a summary: after a claim that took everything it could, the only claimable
//! deliveries due before `until` are those of the endpoints and apps that were at their limit
//! (the "held back" sets). Every change that may add a claimable delivery widens the summary
//! or drops it. A claim then
//! - is skipped if no held-back endpoint or app has room again;
//! - asks only for the deliveries of the few held-back endpoints that have room (an index on
//!   `(endpoint_id, next_attempt_at)` makes that a seek);
//! - or, without a summary, queries as before and leaves a new summary.
//!
//! A summary lasts at most [`MAX_QUIET`], so a change this file were to miss costs a second's
//! delay, never a lost delivery. Expired leases are covered by `until` (no later than the first
//! lease to run out).

use std::{collections::HashSet, sync::Mutex, time::Duration};

use chrono::{DateTime, Utc};
use herald_core::{AppId, EndpointId};

use crate::ClaimRequest;

/// Longest a summary stands without a full claim.
pub(crate) const MAX_QUIET: Duration = Duration::from_secs(1);
/// Held-back endpoints a claim asks for one by one; beyond that, one query for all.
pub(crate) const MAX_TARGETED: usize = 8;

#[derive(Default)]
pub(crate) struct ClaimGate {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Moves with every change that may add a claimable delivery, so a claim whose query ran
    /// before such a change does not leave a summary that misses it.
    generation: u64,
    /// Per lane: first attempts, then retries and manual attempts.
    lanes: [Option<Summary>; 2],
}

/// Claimable deliveries due before `until` belong to these endpoints or apps only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Summary {
    pub until: DateTime<Utc>,
    pub endpoints: HashSet<EndpointId>,
    pub apps: HashSet<AppId>,
}

/// What a claim should do, given its lane's summary.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Plan {
    /// Nothing claimable has room: no query.
    Nothing,
    /// Only these held-back endpoints' deliveries can be claimed.
    Endpoints(Vec<EndpointId>),
    /// Query the whole queue.
    Everything,
}

fn lane(first_attempts: bool) -> usize {
    usize::from(!first_attempts)
}

impl ClaimGate {
    pub(crate) fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// How a claim of `request` should look, from its lane's summary.
    pub(crate) fn plan(&self, request: &ClaimRequest) -> Plan {
        let state = self.lock();
        let Some(summary) = &state.lanes[lane(request.first_attempts)] else {
            return Plan::Everything;
        };
        if request.now >= summary.until {
            return Plan::Everything;
        }
        let app_has_room = |app: &AppId| {
            request.app_in_flight.get(app).copied().unwrap_or(0) < request.per_app_limit
        };
        if summary.apps.iter().any(app_has_room) {
            // An app's deliveries may be anywhere in the queue.
            return Plan::Everything;
        }
        let with_room: Vec<EndpointId> = summary
            .endpoints
            .iter()
            .filter(|endpoint| {
                request.in_flight.get(*endpoint).copied().unwrap_or(0) < request.per_endpoint_limit
            })
            .cloned()
            .collect();
        match with_room.len() {
            0 => Plan::Nothing,
            n if n <= MAX_TARGETED => Plan::Endpoints(with_room),
            _ => Plan::Everything,
        }
    }

    /// A claim that began at `generation` took everything it could: what it left is
    /// `summary`. Kept only if nothing changed meanwhile.
    pub(crate) fn settle(&self, generation: u64, first_attempts: bool, summary: Summary) {
        let mut state = self.lock();
        if state.generation == generation {
            state.lanes[lane(first_attempts)] = Some(summary);
        }
    }

    /// A targeted claim found no more deliveries of `endpoint` (it got fewer than it had room
    /// for), as of `generation`.
    pub(crate) fn drained(&self, generation: u64, first_attempts: bool, endpoint: &EndpointId) {
        let mut state = self.lock();
        if state.generation != generation {
            return;
        }
        if let Some(summary) = &mut state.lanes[lane(first_attempts)] {
            summary.endpoints.remove(endpoint);
        }
    }

    /// Anything may have become claimable (a retry scheduled, a resend, a lease given up).
    pub(crate) fn stir(&self) {
        let mut state = self.lock();
        state.generation += 1;
        state.lanes = [None, None];
    }

    /// New deliveries, due now, became claimable (committed without being handed over): the
    /// first-attempt lane's summary widens to their endpoints.
    pub(crate) fn add_first_attempts<'a>(
        &self,
        deliveries: impl IntoIterator<Item = (&'a AppId, &'a EndpointId)>,
    ) {
        let mut state = self.lock();
        state.generation += 1;
        let summary = &mut state.lanes[lane(true)];
        let Some(known) = summary else { return };
        for (app, endpoint) in deliveries {
            if !known.apps.contains(app) {
                known.endpoints.insert(endpoint.clone());
            }
        }
        if known.endpoints.len() > MAX_TARGETED * 4 {
            // Too wide to be worth keeping.
            *summary = None;
        }
    }

    /// When the lane's earliest claimable delivery falls due, if the lane has a summary: now
    /// if it holds deliveries back (they start when a slot frees, which wakes the lane
    /// anyway), else its `until`.
    pub(crate) fn next_due(
        &self,
        now: DateTime<Utc>,
        first_attempts: bool,
    ) -> Option<DateTime<Utc>> {
        let state = self.lock();
        let summary = state.lanes[lane(first_attempts)]
            .as_ref()
            .filter(|s| now < s.until)?;
        Some(if summary.endpoints.is_empty() && summary.apps.is_empty() {
            summary.until
        } else {
            now
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every update is a few set operations that cannot panic midway.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn endpoint(id: &str) -> EndpointId {
        EndpointId::parse(id).expect("valid")
    }

    fn app(id: &str) -> AppId {
        AppId::parse(id).expect("valid")
    }

    fn request(now: DateTime<Utc>, held: &[(&str, u32)], apps: &[(&str, u32)]) -> ClaimRequest {
        ClaimRequest {
            now,
            lease_until: now,
            limit: 10,
            first_attempts: true,
            in_flight: held.iter().map(|(e, n)| (endpoint(e), *n)).collect(),
            per_endpoint_limit: 2,
            app_in_flight: apps
                .iter()
                .map(|(a, n)| (app(a), *n))
                .collect::<HashMap<_, _>>(),
            per_app_limit: 4,
            saving: Default::default(),
        }
    }

    fn summary(now: DateTime<Utc>, endpoints: &[&str], apps: &[&str]) -> Summary {
        Summary {
            until: now + chrono::Duration::seconds(1),
            endpoints: endpoints.iter().map(|e| endpoint(e)).collect(),
            apps: apps.iter().map(|a| app(a)).collect(),
        }
    }

    #[test]
    fn without_a_summary_a_claim_queries_everything() {
        let gate = ClaimGate::default();
        assert_eq!(gate.plan(&request(Utc::now(), &[], &[])), Plan::Everything);
    }

    #[test]
    fn a_claim_is_skipped_while_every_held_back_endpoint_is_at_its_limit() {
        let gate = ClaimGate::default();
        let now = Utc::now();
        gate.settle(gate.generation(), true, summary(now, &["ep_a"], &[]));
        assert_eq!(gate.plan(&request(now, &[("ep_a", 2)], &[])), Plan::Nothing);
        assert_eq!(
            gate.plan(&request(now, &[("ep_a", 1)], &[])),
            Plan::Endpoints(vec![endpoint("ep_a")]),
            "a freed slot: ask for that endpoint's deliveries only"
        );
        let mut retries = request(now, &[("ep_a", 2)], &[]);
        retries.first_attempts = false;
        assert_eq!(gate.plan(&retries), Plan::Everything, "lanes are apart");
        assert_eq!(
            gate.plan(&request(
                now + chrono::Duration::seconds(1),
                &[("ep_a", 2)],
                &[]
            )),
            Plan::Everything,
            "a summary runs out"
        );
    }

    #[test]
    fn an_app_with_room_again_needs_the_whole_queue() {
        let gate = ClaimGate::default();
        let now = Utc::now();
        gate.settle(gate.generation(), true, summary(now, &[], &["app_a"]));
        assert_eq!(
            gate.plan(&request(now, &[], &[("app_a", 4)])),
            Plan::Nothing
        );
        assert_eq!(
            gate.plan(&request(now, &[], &[("app_a", 3)])),
            Plan::Everything
        );
    }

    #[test]
    fn a_summary_from_before_a_change_is_not_kept() {
        let gate = ClaimGate::default();
        let now = Utc::now();
        let began = gate.generation();
        gate.add_first_attempts([(&app("app_b"), &endpoint("ep_b"))]);
        gate.settle(began, true, summary(now, &[], &[]));
        assert_eq!(
            gate.plan(&request(now, &[], &[])),
            Plan::Everything,
            "the claim's query may have missed ep_b's new delivery"
        );
    }

    #[test]
    fn new_deliveries_widen_the_summary_and_a_stir_drops_it() {
        let gate = ClaimGate::default();
        let now = Utc::now();
        gate.settle(gate.generation(), true, summary(now, &[], &[]));
        assert_eq!(gate.plan(&request(now, &[], &[])), Plan::Nothing);
        gate.add_first_attempts([(&app("app_b"), &endpoint("ep_b"))]);
        assert_eq!(
            gate.plan(&request(now, &[], &[])),
            Plan::Endpoints(vec![endpoint("ep_b")])
        );
        gate.drained(gate.generation(), true, &endpoint("ep_b"));
        assert_eq!(gate.plan(&request(now, &[], &[])), Plan::Nothing);
        gate.stir();
        assert_eq!(gate.plan(&request(now, &[], &[])), Plan::Everything);
    }

    #[test]
    fn deliveries_of_a_held_back_app_are_covered_by_it() {
        let gate = ClaimGate::default();
        let now = Utc::now();
        gate.settle(gate.generation(), true, summary(now, &[], &["app_a"]));
        gate.add_first_attempts([(&app("app_a"), &endpoint("ep_a"))]);
        assert_eq!(
            gate.plan(&request(now, &[], &[("app_a", 4)])),
            Plan::Nothing
        );
    }
}
