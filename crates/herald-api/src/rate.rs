//! Request rates. On `POST /ingest/{source}`, the one route anyone may call: per client
//! address (checked before anything is looked up) and per source (checked before the signature
//! is hashed). On the publishing routes (Svix messages, Pusher triggers): events per app, so
//! one tenant cannot take a node's whole intake. Beyond any, 429 with `Retry-After`, and the
//! sender retries later; nothing was stored.
//!
//! Each limit is a keyed GCRA limiter (`governor`); keys idle long enough to be full again are
//! forgotten every few thousand checks, and beyond [`MAX_KEYS`] at once, so the table stays
//! bounded whatever addresses or source ids a sender makes up (source ids are keyed only once
//! the source is known to exist).

use std::{
    hash::Hash,
    net::IpAddr,
    num::NonZeroU32,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use axum::{
    http::{HeaderValue, StatusCode, header::RETRY_AFTER},
    response::{IntoResponse, Response},
};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter, clock::Clock};

use herald_metrics::{ApiMetrics, Limit};

use crate::ApiError;

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

impl Limited {
    /// `Retry-After` in whole seconds, at least 1.
    pub fn retry_after_secs(&self) -> u64 {
        self.retry_after.as_secs_f64().ceil().max(1.0) as u64
    }
}

/// 429 `rate_limited` in the management API's error shape, with `Retry-After`.
impl IntoResponse for Limited {
    fn into_response(self) -> Response {
        let seconds = self.retry_after_secs();
        let mut response =
            ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", self.message)
                .into_response();
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(seconds));
        response
    }
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
        self.check_n(key, NonZeroU32::MIN)
    }

    /// `Ok` if `key` may spend `n` now; otherwise how long until it may (a second, for more
    /// than a whole burst, which the configuration keeps above any one request's count).
    fn check_n(&self, key: &K, n: NonZeroU32) -> Result<(), Duration> {
        if self
            .checks
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(SWEEP_EVERY)
            || self.limiter.len() > MAX_KEYS
        {
            self.limiter.retain_recent();
            self.limiter.shrink_to_fit();
        }
        match self.limiter.check_key_n(key, n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => {
                Err(not_until.wait_time_from(governor::clock::DefaultClock::default().now()))
            }
            Err(_more_than_a_burst) => Err(Duration::from_secs(1)),
        }
    }
}

/// Both limits of `/ingest`, shared by every request of a node.
pub struct IngestLimiter {
    per_ip: Option<Keyed<IpAddr>>,
    per_source: Option<Keyed<String>>,
    /// Counts each refusal by the limit that made it (`herald_limits_hit_total`).
    hits: Arc<ApiMetrics>,
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
            hits: Arc::default(),
        }
    }

    /// Counts refusals into the node's registered metrics instead of detached ones.
    pub fn counting_into(mut self, hits: Arc<ApiMetrics>) -> Self {
        self.hits = hits;
        self
    }

    /// One request from `client` (its address as the per-address limits see it; `None`, as
    /// for a test harness without one, is not limited).
    pub fn check_client(&self, client: Option<IpAddr>) -> Result<(), Limited> {
        let (Some(keyed), Some(ip)) = (&self.per_ip, client) else {
            return Ok(());
        };
        // Counted by /64 on IPv6, as every per-address limit is: one holder rotates through
        // its /64's addresses at will.
        keyed.check(&herald_channels::limits::address_key(ip)).map_err(|retry_after| {
            self.hits.limit_hit(Limit::IngestPerAddress);
            tracing::info!(%ip, ?retry_after, "refused a request to /ingest over its address's rate");
            Limited {
            message: format!(
                "too many requests to /ingest from this address: at most {} per second (bursts of {}); retry later",
                keyed.rate.per_second, keyed.rate.burst
            ),
            retry_after,
        }})
    }

    /// One request to the source `source_id` (known to exist).
    pub fn check_source(&self, source_id: &str) -> Result<(), Limited> {
        let Some(keyed) = &self.per_source else {
            return Ok(());
        };
        keyed
            .check(&source_id.to_owned())
            .map_err(|retry_after| {
                self.hits.limit_hit(Limit::IngestPerSource);
                tracing::info!(source = source_id, ?retry_after, "refused a request to /ingest over its source's rate");
                Limited {
                message: format!(
                    "too many requests to this source: at most {} per second (bursts of {}); retry later",
                    keyed.rate.per_second, keyed.rate.burst
                ),
                retry_after,
            }})
    }
}

/// The most events one request may publish (a Pusher trigger names at most 100 channels):
/// a publish burst must hold at least this many.
pub const LARGEST_PUBLISH: u32 = 100;

/// Events an app may publish through the API on this node: Svix messages count one each, a
/// Pusher trigger one per channel it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishRates {
    pub per_app: Rate,
}

impl Default for PublishRates {
    fn default() -> Self {
        Self {
            per_app: Rate {
                per_second: 1000,
                burst: 5000,
            },
        }
    }
}

/// The per-app publish limit, shared by every request of a node.
pub struct PublishLimiter {
    per_app: Option<Keyed<String>>,
    /// Counts each refusal (`herald_limits_hit_total{limit="publish_per_app"}`).
    hits: Arc<ApiMetrics>,
}

impl std::fmt::Debug for PublishLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublishLimiter")
            .field("per_app", &self.per_app.as_ref().map(|k| k.rate))
            .finish()
    }
}

impl Default for PublishLimiter {
    fn default() -> Self {
        Self::new(PublishRates::default())
    }
}

impl PublishLimiter {
    pub fn new(rates: PublishRates) -> Self {
        Self {
            per_app: Keyed::new(rates.per_app),
            hits: Arc::default(),
        }
    }

    /// Counts refusals into the node's registered metrics instead of detached ones.
    pub fn counting_into(mut self, hits: Arc<ApiMetrics>) -> Self {
        self.hits = hits;
        self
    }

    /// `events` more publications by the app `app_id` (known to exist).
    pub fn check_app(&self, app_id: &str, events: usize) -> Result<(), Limited> {
        let Some(keyed) = &self.per_app else {
            return Ok(());
        };
        let n =
            NonZeroU32::new(u32::try_from(events).unwrap_or(u32::MAX)).unwrap_or(NonZeroU32::MIN);
        keyed
            .check_n(&app_id.to_owned(), n)
            .map_err(|retry_after| {
                self.hits.limit_hit(Limit::PublishPerApp);
                tracing::info!(app = app_id, events, ?retry_after, "refused a publication over its app's rate");
                Limited {
                message: format!(
                    "too many events published for this app: at most {} per second (bursts of {}); retry later",
                    keyed.rate.per_second, keyed.rate.burst
                ),
                retry_after,
            }})
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

    fn hits(metrics: &ApiMetrics, limit: Limit) -> u64 {
        metrics
            .limits_hit_total
            .get_or_create(&herald_metrics::LimitLabels { limit })
            .get()
    }

    /// IPv6 clients are counted by their /64, as every per-address limit counts them: the
    /// addresses of one /64 share a burst, another /64 has its own.
    #[test]
    fn ipv6_addresses_of_one_64_share_one_burst() {
        let limiter = IngestLimiter::new(rates(1, 1));
        let at = |ip: &str| Some(ip.parse::<IpAddr>().expect("ip"));
        assert!(limiter.check_client(at("2001:db8::1")).is_ok());
        assert!(limiter.check_client(at("2001:db8::2")).is_ok());
        assert!(
            limiter.check_client(at("2001:db8::3:4")).is_err(),
            "a third address of the same /64 is over the burst"
        );
        assert!(limiter.check_client(at("2001:db8:0:1::1")).is_ok());
    }

    #[test]
    fn each_address_and_each_source_has_its_own_burst() {
        let metrics = Arc::new(ApiMetrics::default());
        let limiter = IngestLimiter::new(rates(1, 1)).counting_into(Arc::clone(&metrics));
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
        assert_eq!(
            hits(&metrics, Limit::IngestPerAddress),
            1,
            "each refusal counted"
        );
        assert_eq!(hits(&metrics, Limit::IngestPerSource), 1);
        assert_eq!(hits(&metrics, Limit::PublishPerApp), 0);
    }

    #[test]
    fn each_app_has_its_own_publish_budget_counted_in_events() {
        let metrics = Arc::new(ApiMetrics::default());
        let limiter = PublishLimiter::new(PublishRates {
            per_app: Rate {
                per_second: 1,
                burst: 3,
            },
        })
        .counting_into(Arc::clone(&metrics));
        assert!(limiter.check_app("app_a", 2).is_ok());
        let limited = limiter
            .check_app("app_a", 2)
            .expect_err("2 more of a burst of 3");
        assert!(
            limited.message.contains("at most 1 per second"),
            "{}",
            limited.message
        );
        assert!(limited.retry_after > Duration::ZERO);
        assert!(limiter.check_app("app_a", 1).is_ok(), "one is still left");
        assert_eq!(
            hits(&metrics, Limit::PublishPerApp),
            1,
            "the refusal counted"
        );
        assert!(
            limiter.check_app("app_b", 3).is_ok(),
            "another app has its own"
        );
        assert!(
            limiter.check_app("app_c", 4).is_err(),
            "more than a whole burst at once is refused, not waited for"
        );
        let off = PublishLimiter::new(PublishRates {
            per_app: Rate {
                per_second: 0,
                burst: 0,
            },
        });
        assert!(off.check_app("app_a", 1_000_000).is_ok());
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
