//! When to try a failed delivery again: Svix's schedule, jitter, Retry-After and give-up rules.
//!
//! Attempt 0 is immediate. After failed scheduled attempt `n` (0-based) the next one is due
//! `schedule[n]` later, so the default schedule of seven delays gives eight attempts over about
//! 27.5 hours. Manual attempts (resend, recover) are never retried automatically.

use std::time::Duration;

use rand::Rng;

/// What one HTTP attempt came to, as far as the retry rules care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// Any 2xx.
    Success,
    /// 410 Gone: the receiver asks never to be called again.
    Gone,
    /// Timeouts and 429: the receiver is overloaded; back off at least the overload penalty.
    Overloaded { retry_after: Option<Duration> },
    /// Every other non-2xx status, refused connection, blocked address, TLS error...
    Failed { retry_after: Option<Duration> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryDecision {
    Delivered,
    RetryIn(Duration),
    /// The schedule is exhausted (or the attempt was manual): the delivery has failed.
    GiveUp,
    /// Disable the endpoint and stop (410, or failing without a success for too long).
    DisableEndpoint,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Delay before each retry; its length is the number of retries.
    pub schedule: Vec<Duration>,
    /// Relative jitter applied to scheduled delays (0.2 = ±20 %).
    pub jitter: f64,
    /// Minimum delay after a timeout or 429.
    pub overload_penalty: Duration,
    /// Longest delay a `Retry-After` header can impose.
    pub retry_after_max: Duration,
    /// An endpoint failing for this long without one success is disabled when a message's
    /// last attempt fails (a failure with retries left is retried, as Svix does).
    pub disable_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        let secs = |s| Duration::from_secs(s);
        Self {
            schedule: vec![
                secs(5),
                secs(5 * 60),
                secs(30 * 60),
                secs(2 * 3600),
                secs(5 * 3600),
                secs(10 * 3600),
                secs(10 * 3600),
            ],
            jitter: 0.2,
            overload_penalty: secs(60),
            retry_after_max: secs(3600),
            disable_after: secs(5 * 24 * 3600),
        }
    }
}

impl RetryPolicy {
    /// Decide what follows an attempt.
    ///
    /// `attempt` is the 0-based index of the scheduled attempt just made; `manual` attempts are
    /// never retried; `failing_for` is how long the endpoint has failed without a success,
    /// counting this attempt.
    pub fn decide(
        &self,
        outcome: AttemptOutcome,
        attempt: u32,
        manual: bool,
        failing_for: Duration,
        rng: &mut impl Rng,
    ) -> RetryDecision {
        let retry_after = match outcome {
            AttemptOutcome::Success => return RetryDecision::Delivered,
            AttemptOutcome::Gone => return RetryDecision::DisableEndpoint,
            AttemptOutcome::Overloaded { retry_after } | AttemptOutcome::Failed { retry_after } => {
                retry_after
            }
        };
        // Only a message's last scheduled attempt disables: an endpoint quiet since an old
        // streak, its receiver fixed meanwhile, is not disabled by one failure that its
        // retries would see through. Nor by a manual attempt (a resend, a recovery's), which
        // has no retries: an operator recovering after an outage must not have one blip
        // disable the endpoint and fail everything recovered.
        if manual {
            return RetryDecision::GiveUp;
        }
        let Some(&base) = self.schedule.get(attempt as usize) else {
            if failing_for >= self.disable_after {
                return RetryDecision::DisableEndpoint;
            }
            return RetryDecision::GiveUp;
        };
        let delay = self.jittered(base, rng);
        let mut floor = Duration::ZERO;
        if matches!(outcome, AttemptOutcome::Overloaded { .. }) {
            floor = self.overload_penalty;
        }
        if let Some(requested) = retry_after {
            // Honour the receiver's wish to wait longer, within bounds; never retry sooner
            // than the schedule says.
            floor = floor.max(requested.min(self.retry_after_max.max(base)));
        }
        if floor > delay {
            // Spread above the floor, as the schedule's delays are spread around theirs: a
            // receiver that timed out ten thousand attempts in one second must not get ten
            // thousand retries in one second a minute later, as it recovers.
            return RetryDecision::RetryIn(self.spread_above(floor, rng));
        }
        RetryDecision::RetryIn(delay)
    }

    /// The jitter as a fraction that keeps every factor positive and finite: the
    /// configuration allows `[0, 1)`, and a policy built otherwise (NaN, 1 or more) must not
    /// panic in `Duration::mul_f64` or the range sampling.
    fn jitter(&self) -> Option<f64> {
        (self.jitter > 0.0 && self.jitter.is_finite()).then(|| self.jitter.min(0.99))
    }

    /// `floor`, made longer by up to the jitter's fraction of it.
    fn spread_above(&self, floor: Duration, rng: &mut impl Rng) -> Duration {
        let Some(jitter) = self.jitter() else {
            return floor;
        };
        floor.mul_f64(rng.random_range(1.0..=(1.0 + jitter)))
    }

    fn jittered(&self, base: Duration, rng: &mut impl Rng) -> Duration {
        let Some(jitter) = self.jitter() else {
            return base;
        };
        let factor = rng.random_range((1.0 - jitter)..=(1.0 + jitter));
        base.mul_f64(factor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{SeedableRng, rngs::StdRng};

    fn rng() -> StdRng {
        StdRng::seed_from_u64(7)
    }

    const FAIL: AttemptOutcome = AttemptOutcome::Failed { retry_after: None };
    const NOT_LONG: Duration = Duration::from_secs(1);

    #[test]
    fn follows_svix_schedule_with_jitter_then_gives_up() {
        let policy = RetryPolicy::default();
        let mut rng = rng();
        for (n, base) in policy.schedule.iter().enumerate() {
            match policy.decide(FAIL, n as u32, false, NOT_LONG, &mut rng) {
                RetryDecision::RetryIn(d) => {
                    assert!(
                        d >= base.mul_f64(0.8) && d <= base.mul_f64(1.2),
                        "{n}: {d:?}"
                    );
                }
                other => panic!("attempt {n}: {other:?}"),
            }
        }
        assert_eq!(
            policy.decide(FAIL, 7, false, NOT_LONG, &mut rng),
            RetryDecision::GiveUp
        );
    }

    /// A policy built with a jitter the configuration would refuse (NaN, 1 or more) still
    /// decides, with positive delays, rather than panic.
    #[test]
    fn a_jitter_out_of_range_never_panics() {
        let mut rng = rng();
        for jitter in [f64::NAN, 1.0, 5.0, f64::INFINITY] {
            let policy = RetryPolicy {
                jitter,
                ..RetryPolicy::default()
            };
            for n in 0..3 {
                match policy.decide(FAIL, n, false, NOT_LONG, &mut rng) {
                    RetryDecision::RetryIn(d) => assert!(d > Duration::ZERO, "{jitter}: {d:?}"),
                    other => panic!("{jitter}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn success_gone_and_manual() {
        let policy = RetryPolicy::default();
        let mut rng = rng();
        assert_eq!(
            policy.decide(AttemptOutcome::Success, 0, false, NOT_LONG, &mut rng),
            RetryDecision::Delivered
        );
        assert_eq!(
            policy.decide(AttemptOutcome::Gone, 0, false, NOT_LONG, &mut rng),
            RetryDecision::DisableEndpoint
        );
        assert_eq!(
            policy.decide(FAIL, 0, true, NOT_LONG, &mut rng),
            RetryDecision::GiveUp
        );
    }

    /// A minimum delay (the overload penalty, a `Retry-After`) is spread above itself by the
    /// jitter, so retries of many attempts that failed together do not all fall due together.
    #[test]
    fn delays_held_at_a_floor_are_spread_above_it() {
        let policy = RetryPolicy::default();
        let mut rng = rng();
        for outcome in [
            AttemptOutcome::Overloaded { retry_after: None },
            AttemptOutcome::Failed {
                retry_after: Some(Duration::from_secs(60)),
            },
        ] {
            let delays: Vec<Duration> = (0..50)
                .map(
                    |_| match policy.decide(outcome, 0, false, NOT_LONG, &mut rng) {
                        RetryDecision::RetryIn(d) => d,
                        other => panic!("{other:?}"),
                    },
                )
                .collect();
            let (min, max) = (delays.iter().min(), delays.iter().max());
            assert!(
                min >= Some(&Duration::from_secs(60)),
                "never before the floor: {min:?}"
            );
            assert!(
                max <= Some(&Duration::from_secs(72)),
                "within a fifth: {max:?}"
            );
            assert!(
                max.zip(min)
                    .is_some_and(|(max, min)| *max - *min > Duration::from_secs(5)),
                "spread, not all at one instant: {min:?} to {max:?}"
            );
        }
    }

    #[test]
    fn overload_and_retry_after_stretch_the_delay_within_bounds() {
        let policy = RetryPolicy {
            jitter: 0.0,
            ..RetryPolicy::default()
        };
        let mut rng = rng();
        let overloaded = AttemptOutcome::Overloaded { retry_after: None };
        assert_eq!(
            policy.decide(overloaded, 0, false, NOT_LONG, &mut rng),
            RetryDecision::RetryIn(Duration::from_secs(60))
        );
        let wants_ten_minutes = AttemptOutcome::Failed {
            retry_after: Some(Duration::from_secs(600)),
        };
        assert_eq!(
            policy.decide(wants_ten_minutes, 0, false, NOT_LONG, &mut rng),
            RetryDecision::RetryIn(Duration::from_secs(600))
        );
        let wants_a_week = AttemptOutcome::Failed {
            retry_after: Some(Duration::from_secs(7 * 86400)),
        };
        assert_eq!(
            policy.decide(wants_a_week, 0, false, NOT_LONG, &mut rng),
            RetryDecision::RetryIn(Duration::from_secs(3600))
        );
        let wants_less = AttemptOutcome::Failed {
            retry_after: Some(Duration::from_secs(1)),
        };
        assert_eq!(
            policy.decide(wants_less, 1, false, NOT_LONG, &mut rng),
            RetryDecision::RetryIn(Duration::from_secs(300))
        );
    }

    /// An endpoint failing for 5 days is disabled when a message's last scheduled attempt
    /// fails; a failure with retries left is retried, and a manual one gives up, however
    /// long the streak.
    #[test]
    fn long_failing_endpoint_is_disabled_at_a_messages_last_attempt() {
        let policy = RetryPolicy::default();
        let five_days = Duration::from_secs(5 * 86400);
        let last = u32::try_from(policy.schedule.len()).expect("short");
        assert_eq!(
            policy.decide(FAIL, last, false, five_days, &mut rng()),
            RetryDecision::DisableEndpoint
        );
        assert_eq!(
            policy.decide(FAIL, 0, true, five_days, &mut rng()),
            RetryDecision::GiveUp,
            "a manual attempt (a recovery's) does not disable"
        );
        assert!(matches!(
            policy.decide(FAIL, 0, false, five_days * 2, &mut rng()),
            RetryDecision::RetryIn(_)
        ));
        assert_eq!(
            policy.decide(FAIL, last, false, NOT_LONG, &mut rng()),
            RetryDecision::GiveUp
        );
    }
}
