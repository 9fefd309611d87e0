//! Request rates on `POST /ingest/{source}`, the one route anyone may call: per client address
//! (checked before anything is looked up) and per source (checked before the signature is
//! hashed). Beyond either, 429 with `Retry-After`, and the provider retries later.
//!
//! Each limit is a keyed GCRA limiter (`governor`); keys idle long enough to be full again are
//! forgotten every few thousand checks, and beyond [`MAX_KEYS`] at once, so the table stays
//! bounded whatever addresses or source ids a sender makes up (source ids are keyed only once
//! the source is known to exist).

use std::{
    hash::Hash,
    net::IpAddr,
    num::NonZeroU32,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter, clock::Clock};

/// Keys one limiter keeps at most before it forgets every key that is full again.
const MAX_KEYS: usize = 100_000;
/// Forget full keys every this many checks.
const SWEEP_EVERY: u32 = 4096;

/// Requests per second and burst for one limit; 0 per second turns it off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_second: u32,
    pub burst: u32,
}

/// The limits on `/ingest`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IngestRates {
    pub per_ip: Rate,
    pub per_source: Rate,
}

impl Default for IngestRates {
    fn default() -> Self {
        Self {
            per_ip: Rate {
                per_second: 100,
                burst: 500,
            },
            per_source: Rate {
                per_second: 200,
                burst: 1000,
            },
        }
    }
}

/// A request over a limit: what it was, and when to come back.
#[derive(Debug)]
pub struct Limited {
    pub message: String,
    pub retry_after: Duration,
}

struct Keyed<K: Hash + Eq + Clone> {
    limiter: DefaultKeyedRateLimiter<K>,
    rate: Rate,
    checks: AtomicU32,
}

impl<K: Hash + Eq + Clone> Keyed<K> {
    fn new(rate: Rate) -> Option<Self> {
        let per_second = NonZeroU32::new(rate.per_second)?;
        let burst = NonZeroU32::new(rate.burst).unwrap_or(per_second);
        Some(Self {
            limiter: RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst)),
            rate,
            checks: AtomicU32::new(0),
        })
    }

    /// `Ok` if `key` may make one more request now; otherwise how long until it may.
    fn check(&self, key: &K) -> Result<(), Duration> {
        if self
            .checks
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(SWEEP_EVERY)
            || self.limiter.len() > MAX_KEYS
        {
            self.limiter.retain_recent();
            self.limiter.shrink_to_fit();
        }
        self.limiter.check_key(key).map_err(|not_until| {
            not_until.wait_time_from(governor::clock::DefaultClock::default().now())
        })
    }
}

/// Both limits of `/ingest`, shared by every request of a node.
pub struct IngestLimiter {
    per_ip: Option<Keyed<IpAddr>>,
    per_source: Option<Keyed<String>>,
}

impl std::fmt::Debug for IngestLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IngestLimiter")
            .field("per_ip", &self.per_ip.as_ref().map(|k| k.rate))
            .field("per_source", &self.per_source.as_ref().map(|k| k.rate))
            .finish()
    }
}

impl Default for IngestLimiter {
    fn default() -> Self {
        Self::new(IngestRates::default())
    }
}

impl IngestLimiter {
    pub fn new(rates: IngestRates) -> Self {
        Self {
            per_ip: Keyed::new(rates.per_ip),
            per_source: Keyed::new(rates.per_source),
        }
    }

    /// One request from `client` (its address as the per-address limits see it; `None`, as
    /// for a test harness without one, is not limited).
    pub fn check_client(&self, client: Option<IpAddr>) -> Result<(), Limited> {
        let (Some(keyed), Some(ip)) = (&self.per_ip, client) else {
            return Ok(());
        };
        keyed.check(&ip).map_err(|retry_after| Limited {
            message: format!(
                "too many requests to /ingest from this address: at most {} per second (bursts of {}); retry later",
                keyed.rate.per_second, keyed.rate.burst
            ),
            retry_after,
        })
    }

    /// One request to the source `source_id` (known to exist).
    pub fn check_source(&self, source_id: &str) -> Result<(), Limited> {
        let Some(keyed) = &self.per_source else {
            return Ok(());
        };
        keyed
            .check(&source_id.to_owned())
            .map_err(|retry_after| Limited {
                message: format!(
                    "too many requests to this source: at most {} per second (bursts of {}); retry later",
                    keyed.rate.per_second, keyed.rate.burst
                ),
                retry_after,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rates(ip: u32, source: u32) -> IngestRates {
        IngestRates {
            per_ip: Rate {
                per_second: ip,
                burst: 2,
            },
            per_source: Rate {
                per_second: source,
                burst: 2,
            },
        }
    }

    #[test]
    fn each_address_and_each_source_has_its_own_burst() {
        let limiter = IngestLimiter::new(rates(1, 1));
        let a = Some(IpAddr::from([10, 0, 0, 1]));
        let b = Some(IpAddr::from([10, 0, 0, 2]));
        assert!(limiter.check_client(a).is_ok());
        assert!(limiter.check_client(a).is_ok());
        let limited = limiter.check_client(a).expect_err("a third at once");
        assert!(
            limited.retry_after > Duration::ZERO && limited.retry_after <= Duration::from_secs(1)
        );
        assert!(
            limited.message.contains("at most 1 per second"),
            "{}",
            limited.message
        );
        assert!(
            limiter.check_client(b).is_ok(),
            "another address has its own"
        );
        assert!(limiter.check_source("src_1").is_ok());
        assert!(limiter.check_source("src_1").is_ok());
        assert!(limiter.check_source("src_1").is_err());
        assert!(limiter.check_source("src_2").is_ok());
    }

    #[test]
    fn zero_per_second_turns_a_limit_off() {
        let limiter = IngestLimiter::new(rates(0, 0));
        for _ in 0..100 {
            assert!(
                limiter
                    .check_client(Some(IpAddr::from([10, 0, 0, 1])))
                    .is_ok()
            );
            assert!(limiter.check_source("src_1").is_ok());
        }
    }
}
