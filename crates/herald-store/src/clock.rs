//! The time the nodes sharing a store agree on.
//!
//! Nodes of a cluster compare each other's times: a delivery leased by one node until a given
//! moment may be claimed by another once that moment has passed, and a node whose presence
//! heartbeat is older than `node_ttl` is removed by another node's sweep. Read from each node's
//! own clock, those comparisons fail as soon as two clocks disagree by a lease (45 s) or a TTL:
//! a node running ahead takes deliveries others are still sending (duplicates), and a node
//! running behind looks dead to the others (its members removed while connected).
//!
//! So every such time comes from one reference, the shared database's clock, as seen from this
//! node: [`ClusterClock`] keeps how far the database's clock is ahead of this node's, measured
//! at start and again with every check of the cluster's LISTEN session (every 15 s), and adds
//! it to the local clock. One round trip's uncertainty remains (half of it, at most), far below
//! the margins of leases and TTLs. A single-node store is its own reference: the offset stays 0.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use chrono::{DateTime, TimeDelta, Utc};

/// This node's reading of the cluster's time (see the module doc). Cheap to clone: clones share
/// one offset, so a measurement taken anywhere (the store at start, the broker's session
/// checks) moves every reader.
#[derive(Clone)]
pub struct ClusterClock {
    /// How far the reference clock is ahead of this node's, in microseconds.
    ahead_micros: Arc<AtomicI64>,
    /// This node's clock: `Utc::now`, or a clock set wrong on purpose in the tests.
    local: fn() -> DateTime<Utc>,
}

impl Default for ClusterClock {
    fn default() -> Self {
        Self {
            ahead_micros: Arc::new(AtomicI64::new(0)),
            local: Utc::now,
        }
    }
}

impl std::fmt::Debug for ClusterClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterClock")
            .field("offset", &self.offset())
            .finish_non_exhaustive()
    }
}

impl ClusterClock {
    /// A clock that reads `local` for this node's time: a node whose own clock is wrong, in the
    /// tests of what the offset corrects.
    #[cfg(any(test, feature = "conformance"))]
    pub fn reading(local: fn() -> DateTime<Utc>) -> Self {
        Self {
            local,
            ..Self::default()
        }
    }

    /// The cluster's time now.
    pub fn now(&self) -> DateTime<Utc> {
        (self.local)() + self.offset()
    }

    /// This node's own clock, unadjusted: for measuring against the reference.
    pub fn local_now(&self) -> DateTime<Utc> {
        (self.local)()
    }

    /// How far the reference clock is ahead of this node's (negative: behind).
    pub fn offset(&self) -> TimeDelta {
        TimeDelta::microseconds(self.ahead_micros.load(Ordering::Relaxed))
    }

    /// Takes one measurement: the reference read `reference` at some moment between
    /// `sent` and `received` (this node's [`local_now`](Self::local_now) before and after the
    /// round trip). The reading is taken as made halfway, which is off by at most half the
    /// round trip.
    pub fn observe(&self, sent: DateTime<Utc>, reference: DateTime<Utc>, received: DateTime<Utc>) {
        let halfway = sent + (received - sent) / 2;
        let ahead = (reference - halfway).num_microseconds().unwrap_or(0);
        self.ahead_micros.store(ahead, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(seconds, 0).expect("a valid time")
    }

    #[test]
    fn a_fresh_clock_is_the_local_one() {
        let clock = ClusterClock::default();
        assert_eq!(clock.offset(), TimeDelta::zero());
        let (before, read, after) = (Utc::now(), clock.now(), Utc::now());
        assert!(before <= read && read <= after);
    }

    #[test]
    fn a_measurement_is_taken_as_made_halfway_through_the_round_trip() {
        let clock = ClusterClock::default();
        // Sent at 100, answered at 104: the reference read 160 at about 102.
        clock.observe(at(100), at(160), at(104));
        assert_eq!(clock.offset(), TimeDelta::seconds(58));
        // Behind, the next time: a measurement replaces the last.
        clock.observe(at(100), at(90), at(100));
        assert_eq!(clock.offset(), TimeDelta::seconds(-10));
    }

    #[test]
    fn clones_share_their_measurements_and_a_wrong_local_clock_is_corrected() {
        fn two_minutes_ahead() -> DateTime<Utc> {
            Utc::now() + TimeDelta::minutes(2)
        }
        let clock = ClusterClock::reading(two_minutes_ahead);
        let reader = clock.clone();
        assert!(
            reader.now() - Utc::now() > TimeDelta::seconds(110),
            "not measured yet"
        );
        let sent = clock.local_now();
        let reference = Utc::now();
        clock.observe(sent, reference, clock.local_now());
        let error = (reader.now() - Utc::now()).abs();
        assert!(
            error < TimeDelta::seconds(1),
            "corrected to the reference: {error}"
        );
    }
}
