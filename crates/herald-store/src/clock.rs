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
//! node: [`ClusterClock`] keeps the reference's reading and the moment of this node's
//! monotonic clock it was taken at, measured at start and again with every check of the
//! cluster's LISTEN session (every 15 s), and counts on from there. A step of this node's
//! wall clock (NTP correcting it) therefore moves nothing. A reading is taken as made halfway
//! through its round trip, so its error is at most half the round trip; one whose round trip
//! took longer than [`SLOW_ROUND_TRIP`] is not kept while a better one is. A single-node store
//! is its own reference: it is never measured and reads this node's clock.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};

/// A measurement whose round trip took longer than this is kept only if there is no other.
pub const SLOW_ROUND_TRIP: Duration = Duration::from_secs(1);

/// This node's reading of the cluster's time (see the module doc). Cheap to clone: clones share
/// one reading, so a measurement taken anywhere (the store at start, the broker's session
/// checks) moves every reader.
#[derive(Clone)]
pub struct ClusterClock {
    reading: Arc<Mutex<Option<Reading>>>,
    /// This node's wall clock, until a reading is taken: `Utc::now`, or a clock set wrong on
    /// purpose in the tests.
    local: fn() -> DateTime<Utc>,
}

/// The reference read `reference` at `at` on this node's monotonic clock.
#[derive(Debug, Clone, Copy)]
struct Reading {
    reference: DateTime<Utc>,
    at: Instant,
    round_trip: Duration,
}

impl Default for ClusterClock {
    fn default() -> Self {
        Self {
            reading: Arc::new(Mutex::new(None)),
            local: Utc::now,
        }
    }
}

impl std::fmt::Debug for ClusterClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterClock")
            .field("ahead_of_this_node", &self.ahead())
            .finish_non_exhaustive()
    }
}

impl ClusterClock {
    /// A clock that reads `local` for this node's wall clock: a node whose own clock is wrong,
    /// in the tests of what a measurement corrects.
    #[cfg(any(test, feature = "conformance"))]
    pub fn reading(local: fn() -> DateTime<Utc>) -> Self {
        Self {
            local,
            ..Self::default()
        }
    }

    fn last(&self) -> Option<Reading> {
        *self.reading.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cluster's time now: the last reading, counted on by this node's monotonic clock;
    /// this node's wall clock before any.
    pub fn now(&self) -> DateTime<Utc> {
        match self.last() {
            Some(reading) => {
                let since = TimeDelta::from_std(reading.at.elapsed()).unwrap_or(TimeDelta::MAX);
                reading.reference + since
            }
            None => self.local_now(),
        }
    }

    /// This node's own wall clock, unadjusted.
    pub fn local_now(&self) -> DateTime<Utc> {
        (self.local)()
    }

    /// How far the cluster's time is ahead of this node's wall clock (negative: behind).
    pub fn ahead(&self) -> TimeDelta {
        self.now() - self.local_now()
    }

    /// Takes one measurement: the reference read `reference` at some moment between `sent`
    /// and `received`, this node's monotonic clock before and after the round trip. It is
    /// taken as made halfway; one slower than [`SLOW_ROUND_TRIP`] replaces only a reading
    /// that was slower still.
    pub fn observe(&self, sent: Instant, reference: DateTime<Utc>, received: Instant) {
        let round_trip = received.saturating_duration_since(sent);
        let mut reading = self.reading.lock().unwrap_or_else(|p| p.into_inner());
        if round_trip > SLOW_ROUND_TRIP && reading.is_some_and(|last| last.round_trip <= round_trip)
        {
            return;
        }
        *reading = Some(Reading {
            reference,
            at: sent + round_trip / 2,
            round_trip,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(seconds, 0).expect("a valid time")
    }

    /// Within `slack` of `expected`.
    fn near(read: DateTime<Utc>, expected: DateTime<Utc>, slack: TimeDelta) -> bool {
        (read - expected).abs() <= slack
    }

    #[test]
    fn an_unmeasured_clock_is_the_local_one() {
        let clock = ClusterClock::default();
        let (before, read, after) = (Utc::now(), clock.now(), Utc::now());
        assert!(before <= read && read <= after);
    }

    #[test]
    fn a_reading_counts_on_from_halfway_through_its_round_trip() {
        let clock = ClusterClock::default();
        let sent = Instant::now() - Duration::from_secs(4);
        // Answered now, 4 s later: the reference read 160 s at about 2 s ago.
        clock.observe(sent, at(160), sent + Duration::from_secs(4));
        assert!(near(clock.now(), at(162), TimeDelta::milliseconds(200)));
        // A quicker round trip replaces it, whatever it says.
        let sent = Instant::now();
        clock.observe(sent, at(90), sent);
        assert!(near(clock.now(), at(90), TimeDelta::milliseconds(200)));
    }

    #[test]
    fn a_slow_round_trip_does_not_replace_a_quick_one() {
        let clock = ClusterClock::default();
        let sent = Instant::now();
        clock.observe(sent, at(1_000), sent + Duration::from_millis(2));
        let slow = Instant::now() - Duration::from_secs(8);
        clock.observe(slow, at(5_000), slow + Duration::from_secs(8));
        assert!(
            near(clock.now(), at(1_000), TimeDelta::milliseconds(200)),
            "kept"
        );
        // With nothing better, a slow one is kept.
        let fresh = ClusterClock::default();
        fresh.observe(slow, at(5_000), slow + Duration::from_secs(8));
        assert!(near(fresh.now(), at(5_004), TimeDelta::milliseconds(200)));
    }

    #[test]
    fn clones_share_their_readings_and_a_wrong_local_clock_is_corrected() {
        fn two_minutes_ahead() -> DateTime<Utc> {
            Utc::now() + TimeDelta::minutes(2)
        }
        let clock = ClusterClock::reading(two_minutes_ahead);
        let reader = clock.clone();
        assert!(
            reader.now() - Utc::now() > TimeDelta::seconds(110),
            "not measured yet"
        );
        let sent = Instant::now();
        clock.observe(sent, Utc::now(), Instant::now());
        assert!(
            near(reader.now(), Utc::now(), TimeDelta::seconds(1)),
            "corrected"
        );
        let ahead = reader.ahead();
        assert!(
            near(at(0) - ahead, at(120), TimeDelta::seconds(1)),
            "{ahead}"
        );
    }
}
