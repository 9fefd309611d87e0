//! Endpoint pacing: an endpoint's `throttleRate` (messages per second) spaces the attempts sent
//! to it. A store shared by several nodes keeps the turns (`MessageStore::reserve_turn`, the same
//! algorithm in one statement), so the rate holds for the cluster; this pacer then only follows
//! them for the claim caps ([`Pacer::follow`]). On a store of one node it keeps the turns itself.
//!
//! Each attempt reserves its own send time before it goes (GCRA, the generic cell rate
//! algorithm, in its "virtual scheduling" form): a burst of one second's worth may go at once
//! after a quiet spell, then one every `1 / rate` seconds. Reserving ahead is what lets the
//! endpoint's concurrent attempts wait each for its own turn, in order, without polling; a
//! limiter that only answers "may this go now?" (`governor`, used for the API's request rates)
//! would have them all retry together. Times are tokio's, so the tests run on a paused clock.
//!
//! A reservation is refused when its turn is further off than the caller may wait: a claimed
//! delivery is leased for a bounded time, and one sent after its lease ran out could be sent
//! twice (another claim may have taken it); the dispatcher lets such a delivery go for a later
//! claim. Each of the dispatcher's two lanes also holds no more of a paced endpoint's
//! deliveries than its rate sends in [`PACED_AHEAD_PER_LANE`], and none while the endpoint's
//! next turn is further off than its deliveries may wait (see [`Pacer::claim_cap`]), so turns
//! stay a few seconds ahead and a delivery let go is not claimed again before its turn is near.

use std::{
    collections::HashMap,
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use herald_core::EndpointId;
use tokio::time::Instant;

/// How far ahead of its rate each lane holds a paced endpoint's deliveries: at most this many
/// seconds' worth at a time (both lanes together, twice that), so the last of them goes well
/// within its lease.
pub const PACED_AHEAD_PER_LANE: Duration = Duration::from_secs(2);

/// Endpoints whose pace is forgotten once idle this long (their next attempt starts a burst
/// again, as it would anyway): keeps the table to the endpoints paced lately, and lets a
/// deleted endpoint's entry go.
const FORGET_AFTER: Duration = Duration::from_secs(60);

/// One endpoint's schedule.
#[derive(Debug, Clone, Copy)]
struct Pace {
    /// Messages per second.
    rate: u16,
    /// The theoretical arrival time: when the next attempt would go were no burst allowed.
    due: Instant,
}

impl Pace {
    fn interval(rate: u16) -> Duration {
        Duration::from_secs(1) / u32::from(rate.max(1))
    }

    /// How far ahead of `due` an attempt may go: a burst of one second's worth (`rate`
    /// attempts, the first at `due` and `rate - 1` more ahead of their turn).
    fn tolerance(rate: u16) -> Duration {
        Self::interval(rate) * u32::from(rate.max(1) - 1)
    }

    /// No attempt has had a turn for [`FORGET_AFTER`].
    fn idle(&self, now: Instant) -> bool {
        self.due + FORGET_AFTER <= now
    }

    /// What one lane may hold of this endpoint's deliveries (see [`Pacer::claim_cap`]): what
    /// the rate sends in `share`, and nothing while the next turn is further off than `ahead`.
    fn lane_cap(&self, limit: u32, now: Instant, Window { share, ahead }: Window) -> u32 {
        let next_turn = self
            .due
            .checked_sub(Self::tolerance(self.rate))
            .unwrap_or(now);
        if next_turn > now + ahead {
            // Turns were handed out further ahead than both lanes may hold (a first claim
            // that did not know the pace yet): nothing more until they come closer, or every
            // delivery claimed meanwhile would find no turn within its lease.
            return 0;
        }
        cap(self.rate, limit, share)
    }
}

/// How far ahead the lanes hold a paced endpoint's deliveries (see [`Pacer::claim_cap`]).
#[derive(Debug, Clone, Copy)]
struct Window {
    /// Each lane holds what the rate sends in this.
    share: Duration,
    /// The lanes claim nothing while the endpoint's next turn is further off than this.
    ahead: Duration,
}

/// The pace of every endpoint this node has sent paced attempts to lately.
#[derive(Debug)]
pub struct Pacer {
    paces: Mutex<HashMap<EndpointId, Pace>>,
    /// How many endpoints `paces` holds, read without the lock: most deployments pace no
    /// endpoint, and every claim asks for the caps.
    len: AtomicUsize,
    /// How far ahead the lanes hold an endpoint's deliveries (see [`Pacer::claim_cap`]).
    window: Window,
}

impl Default for Pacer {
    /// Holds 2 s of each paced endpoint per lane, while its next turn is within 4 s.
    fn default() -> Self {
        Self::holding_turns_within(Duration::MAX)
    }
}

/// Whether an endpoint is paced: a `throttleRate` of 0 (or none) sets no pace.
pub fn pace_of(throttle_rate: Option<i64>) -> Option<u16> {
    throttle_rate
        .and_then(|rate| u16::try_from(rate).ok())
        .filter(|rate| *rate > 0)
}

/// The time between two turns at `rate` a second.
pub fn interval(rate: u16) -> Duration {
    Pace::interval(rate)
}

/// What `rate` sends in [`PACED_AHEAD_PER_LANE`], within 1 and `limit`.
fn cap(rate: u16, limit: u32, share: Duration) -> u32 {
    let sends = (f64::from(rate) * share.as_secs_f64()).floor();
    // In range: `rate` is at most 65,535 and `share` at most a few seconds.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let sends = sends as u32;
    sends.clamp(1, limit.max(1))
}

impl Pacer {
    /// A pacer whose lanes hold an endpoint's deliveries so that each finds its turn within
    /// `window` of its claim (the latest start its lease allows): each lane what the rate
    /// sends in a quarter of it (at most [`PACED_AHEAD_PER_LANE`]), claimed only while the
    /// next turn is within what is left of it after both lanes' shares (at most
    /// `2 × PACED_AHEAD_PER_LANE`). With a window of 8 s or more, 2 s per lane while the next
    /// turn is within 4 s.
    pub fn holding_turns_within(window: Duration) -> Self {
        let share = (window / 4).min(PACED_AHEAD_PER_LANE);
        Self {
            paces: Mutex::default(),
            len: AtomicUsize::default(),
            window: Window {
                share,
                ahead: window
                    .saturating_sub(share * 2)
                    .min(PACED_AHEAD_PER_LANE * 2),
            },
        }
    }

    fn paces(&self) -> std::sync::MutexGuard<'_, HashMap<EndpointId, Pace>> {
        // Every update is a few arithmetic operations that cannot panic midway.
        self.paces.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// No endpoint was paced lately.
    pub fn is_empty(&self) -> bool {
        self.len.load(Ordering::Relaxed) == 0
    }

    /// Reserves the next turn of `endpoint`, paced at `rate` a second, for an attempt that may
    /// wait until `latest`: when it may go (now or later), or `None` if its turn comes after
    /// `latest` (nothing is reserved then). A changed rate applies from this attempt on.
    pub fn reserve(
        &self,
        endpoint: &EndpointId,
        rate: u16,
        now: Instant,
        latest: Instant,
    ) -> Option<Instant> {
        let mut paces = self.paces();
        let due = paces
            .get(endpoint)
            .filter(|pace| !pace.idle(now))
            .map_or(now, |pace| pace.due.max(now));
        let at = due
            .checked_sub(Pace::tolerance(rate))
            .map_or(now, |earliest| earliest.max(now));
        if at > latest {
            return None;
        }
        paces.insert(
            endpoint.clone(),
            Pace {
                rate,
                due: due + Pace::interval(rate),
            },
        );
        self.len.store(paces.len(), Ordering::Relaxed);
        Some(at)
    }

    /// Notes `endpoint`'s theoretical arrival time `due` as a store shared by several nodes
    /// keeps it (the cluster's pace, see `MessageStore::reserve_turn`), so that this node's
    /// claim caps follow the cluster's turns. The stored `due` never moves back (a reset after
    /// a quiet spell starts from now, later than it), so an older reading, from a reservation
    /// that answered out of order or a refusal's snapshot, does not replace a newer one.
    pub fn follow(&self, endpoint: &EndpointId, rate: u16, due: Instant) {
        let mut paces = self.paces();
        paces
            .entry(endpoint.clone())
            .and_modify(|pace| {
                pace.rate = rate;
                pace.due = pace.due.max(due);
            })
            .or_insert(Pace { rate, due });
        self.len.store(paces.len(), Ordering::Relaxed);
    }

    /// The most deliveries of `endpoint` one lane may hold (`limit`: what it lets any endpoint
    /// hold), if the endpoint was paced lately: what its rate sends in
    /// [`PACED_AHEAD_PER_LANE`], at least one; none while its next turn is further off than
    /// both lanes' share, or than a claimed delivery may wait for it
    /// ([`Pacer::holding_turns_within`]). An endpoint not paced lately gets `limit`: its first
    /// attempts tell its pace, and any that would wait past their lease are let go for a later
    /// claim.
    pub fn claim_cap(&self, endpoint: &EndpointId, limit: u32, now: Instant) -> u32 {
        if self.is_empty() {
            return limit;
        }
        self.paces()
            .get(endpoint)
            .filter(|pace| !pace.idle(now))
            .map_or(limit, |pace| pace.lane_cap(limit, now, self.window))
    }

    /// The endpoints paced lately, with their caps under `limit` (see [`Pacer::claim_cap`]);
    /// forgets those idle for [`FORGET_AFTER`].
    pub fn caps(&self, limit: u32, now: Instant) -> Vec<(EndpointId, u32)> {
        if self.is_empty() {
            return Vec::new();
        }
        let mut paces = self.paces();
        paces.retain(|_, pace| !pace.idle(now));
        self.len.store(paces.len(), Ordering::Relaxed);
        paces
            .iter()
            .map(|(endpoint, pace)| (endpoint.clone(), pace.lane_cap(limit, now, self.window)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(n: u32) -> EndpointId {
        EndpointId::parse(format!("ep_{n}")).expect("an endpoint id")
    }

    #[test]
    fn no_rate_or_zero_sets_no_pace() {
        assert_eq!(pace_of(None), None);
        assert_eq!(pace_of(Some(0)), None);
        assert_eq!(pace_of(Some(5)), Some(5));
        assert_eq!(
            pace_of(Some(70_000)),
            None,
            "outside Svix's range: never stored"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_one_seconds_worth_goes_at_once_then_one_per_interval() {
        let pacer = Pacer::default();
        let ep = endpoint(1);
        let now = Instant::now();
        let far = now + Duration::from_secs(60);
        let turns: Vec<Duration> = (0..7)
            .map(|_| pacer.reserve(&ep, 4, now, far).expect("a turn") - now)
            .collect();
        let ms = Duration::from_millis;
        assert_eq!(
            turns,
            [ms(0), ms(0), ms(0), ms(0), ms(250), ms(500), ms(750)],
            "4 at once, then every 250 ms"
        );
        // After a quiet spell of a second and more, a burst again.
        let later = now + Duration::from_secs(3);
        let turn = pacer.reserve(&ep, 4, later, later + Duration::from_secs(60));
        assert_eq!(turn, Some(later));
        // Another endpoint has its own pace.
        assert_eq!(pacer.reserve(&endpoint(2), 1, now, far), Some(now));
        assert_eq!(
            pacer.reserve(&endpoint(2), 1, now, far),
            Some(now + Duration::from_secs(1))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_turn_past_the_latest_is_refused_and_reserves_nothing() {
        let pacer = Pacer::default();
        let ep = endpoint(1);
        let now = Instant::now();
        let latest = now + Duration::from_millis(1500);
        assert_eq!(pacer.reserve(&ep, 1, now, latest), Some(now));
        assert_eq!(
            pacer.reserve(&ep, 1, now, latest),
            Some(now + Duration::from_secs(1))
        );
        assert_eq!(pacer.reserve(&ep, 1, now, latest), None, "2 s is too late");
        assert_eq!(
            pacer.reserve(&ep, 1, now, latest),
            None,
            "still 2 s: nothing taken"
        );
        let waited = now + Duration::from_secs(1);
        assert_eq!(
            pacer.reserve(&ep, 1, waited, waited + Duration::from_secs(5)),
            Some(now + Duration::from_secs(2))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn claims_hold_a_paced_endpoint_to_what_its_rate_sends_in_a_few_seconds() {
        let pacer = Pacer::default();
        let now = Instant::now();
        let far = now + Duration::from_secs(60);
        assert_eq!(pacer.claim_cap(&endpoint(1), 64, now), 64, "not paced yet");
        pacer.reserve(&endpoint(1), 2, now, far);
        pacer.reserve(&endpoint(2), 100, now, far);
        assert_eq!(
            pacer.claim_cap(&endpoint(1), 64, now),
            4,
            "2 a second for 2 s"
        );
        assert_eq!(
            pacer.claim_cap(&endpoint(2), 64, now),
            64,
            "never above the limit"
        );
        let mut caps = pacer.caps(64, now);
        caps.sort();
        assert_eq!(caps, [(endpoint(1), 4), (endpoint(2), 64)]);

        // Turns handed out 10 s ahead (a first claim of 11 at 1 a second): nothing more is
        // held until the next turn is within 4 s.
        for _ in 0..11 {
            pacer.reserve(&endpoint(3), 1, now, far);
        }
        assert_eq!(pacer.claim_cap(&endpoint(3), 64, now), 0);
        let closer = now + Duration::from_secs(7);
        assert_eq!(pacer.claim_cap(&endpoint(3), 64, closer), 2);
        // A minute after its last turn (a throttleRate removed, a deleted endpoint):
        // forgotten, and held to the usual limit again.
        let later = now + Duration::from_secs(11) + FORGET_AFTER;
        assert_eq!(pacer.claim_cap(&endpoint(1), 64, later), 64);
        assert!(pacer.caps(64, later).is_empty());
        assert_eq!(pacer.len.load(Ordering::Relaxed), 0);
    }

    /// Turns a store keeps for the cluster (reserved on other nodes too) hold this node's
    /// claims as its own turns would: nothing while the cluster's next turn is more than 4 s
    /// off, what the rate sends in 2 s once it is closer.
    #[tokio::test(start_paused = true)]
    async fn claims_follow_the_turns_the_cluster_reserved() {
        let pacer = Pacer::default();
        let now = Instant::now();
        // At 1 a second (no burst), the cluster's next turn 10 s off.
        pacer.follow(&endpoint(1), 1, now + Duration::from_secs(10));
        assert!(!pacer.is_empty());
        assert_eq!(pacer.claim_cap(&endpoint(1), 64, now), 0);
        assert_eq!(
            pacer.claim_cap(&endpoint(1), 64, now + Duration::from_secs(7)),
            2
        );
        // An older reading (a reservation that answered out of order) changes nothing.
        pacer.follow(&endpoint(1), 1, now + Duration::from_secs(1));
        assert_eq!(pacer.claim_cap(&endpoint(1), 64, now), 0);
    }

    /// When a claimed delivery may wait less than the usual 8 s for its turn (short request
    /// timeouts and grace), the lanes hold less and claim only nearer turns, so what they claim
    /// still finds its turn in time rather than being let go and claimed again in a loop. A
    /// window of 1.1 s: each lane holds what the rate sends in 275 ms, claimed while the next
    /// turn is within 550 ms; both lanes' last turn then comes within 1.1 s.
    #[tokio::test(start_paused = true)]
    async fn a_short_lease_window_holds_less_and_nearer_turns() {
        let pacer = Pacer::holding_turns_within(Duration::from_millis(1100));
        let now = Instant::now();
        let far = now + Duration::from_secs(60);
        // At 10 a second: a burst of 10, then one every 100 ms.
        for _ in 0..14 {
            pacer.reserve(&endpoint(1), 10, now, far);
        }
        // The next turn is 500 ms off: within 550 ms.
        assert_eq!(pacer.claim_cap(&endpoint(1), 64, now), 2);
        pacer.reserve(&endpoint(1), 10, now, far);
        assert_eq!(pacer.claim_cap(&endpoint(1), 64, now), 0, "600 ms off");
        assert_eq!(
            pacer.claim_cap(&endpoint(1), 64, now + Duration::from_millis(50)),
            2
        );
        // The defaults (a window of 25 s): as before.
        let usual = Pacer::holding_turns_within(Duration::from_secs(25));
        usual.reserve(&endpoint(1), 10, now, far);
        assert_eq!(usual.claim_cap(&endpoint(1), 64, now), 20);
    }
}
