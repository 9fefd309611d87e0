//! Request rates. On `POST /ingest/{source}`, the one route anyone may call: per client
//! address (checked before anything is looked up) and per source (checked once the signature
//! verified and the delivery is not a recent duplicate, so forged requests cannot spend the
//! provider's budget). On the publishing routes (Svix messages, Pusher triggers): events per app, so
//! one tenant cannot take a node's whole intake. On every route that takes credentials (API
//! tokens, Pusher signatures): failed authentications per client address, since each costs a
//! store lookup that no cache can answer. Beyond any, 429 with `Retry-After`, and the sender
//! retries later; nothing was stored.
//!
//! Each limit is a keyed GCRA limiter (`governor`); keys idle long enough to be full again are
//! forgotten every few thousand checks, and beyond [`MAX_KEYS`] at once, so the table stays
//! bounded whatever addresses or source ids a sender makes up (source ids are keyed only once
//! the source is known to exist).

use std::{
    collections::HashMap,
    hash::Hash,
    net::IpAddr,
    num::NonZeroU32,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use axum::response::{IntoResponse, Response};
use governor::{
    Quota, RateLimiter,
    clock::{Clock, DefaultClock},
    middleware::NoOpMiddleware,
    state::keyed::DefaultKeyedStateStore,
};

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
#[derive(Debug, PartialEq, Eq)]
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
impl From<Limited> for ApiError {
    fn from(limited: Limited) -> Self {
        Self::RateLimited {
            retry_after_secs: limited.retry_after_secs(),
            detail: limited.message,
        }
    }
}

impl IntoResponse for Limited {
    fn into_response(self) -> Response {
        ApiError::from(self).into_response()
    }
}

struct Keyed<K: Hash + Eq + Clone, C: Clock = DefaultClock> {
    limiter: RateLimiter<K, DefaultKeyedStateStore<K>, C, NoOpMiddleware<C::Instant>>,
    rate: Rate,
    checks: AtomicU32,
    /// The check count at the last sweep: a table over [`MAX_KEYS`] is swept again only
    /// [`SWEEP_FULL_EVERY`] checks later, not at every check.
    swept_at: AtomicU32,
    clock: C,
}

/// Checks between two sweeps of a table that stays over [`MAX_KEYS`] (every key recent).
const SWEEP_FULL_EVERY: u32 = 1024;

impl<K: Hash + Eq + Clone> Keyed<K> {
    fn new(rate: Rate) -> Option<Self> {
        Self::with_clock(rate, DefaultClock::default())
    }
}

impl<K: Hash + Eq + Clone, C: Clock + Clone> Keyed<K, C> {
    fn with_clock(rate: Rate, clock: C) -> Option<Self> {
        let per_second = NonZeroU32::new(rate.per_second)?;
        let burst = NonZeroU32::new(rate.burst).unwrap_or(per_second);
        Some(Self {
            limiter: RateLimiter::dashmap_with_clock(
                Quota::per_second(per_second).allow_burst(burst),
                clock.clone(),
            ),
            rate,
            checks: AtomicU32::new(0),
            swept_at: AtomicU32::new(0),
            clock,
        })
    }

    /// `Ok` if `key` may make one more request now; otherwise how long until it may.
    fn check(&self, key: &K) -> Result<(), Duration> {
        self.check_n(key, NonZeroU32::MIN)
    }

    /// `Ok` if `key` may spend `n` now; otherwise how long until it may (a second, for more
    /// than a whole burst, which the configuration keeps above any one request's count).
    fn check_n(&self, key: &K, n: NonZeroU32) -> Result<(), Duration> {
        let checks = self.checks.fetch_add(1, Ordering::Relaxed);
        let full = self.limiter.len() > MAX_KEYS
            && checks.wrapping_sub(self.swept_at.load(Ordering::Relaxed)) >= SWEEP_FULL_EVERY;
        if checks.is_multiple_of(SWEEP_EVERY) || full {
            self.swept_at.store(checks, Ordering::Relaxed);
            self.limiter.retain_recent();
            self.limiter.shrink_to_fit();
        }
        match self.limiter.check_key_n(key, n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(not_until.wait_time_from(self.clock.now())),
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

/// Failed authentications one client address may make (an unknown, revoked or expired API
/// token; an unknown Pusher app; a wrong Pusher signature).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthFailureRates {
    pub per_ip: Rate,
}

impl Default for AuthFailureRates {
    /// Ten a second, fifty at once: far more than a client with a mistyped token makes before
    /// its operator notices, far fewer lookups than a guesser would like.
    fn default() -> Self {
        Self {
            per_ip: Rate {
                per_second: 10,
                burst: 50,
            },
        }
    }
}

/// How long an address stays a suspect after its last failed authentication: meanwhile each
/// of its credentials that no cache answers spends its budget before it is looked up.
pub const SUSPECT_FOR: Duration = Duration::from_secs(60);

/// How often, at most, the table of suspects is swept when full.
const PRUNE_EVERY: Duration = Duration::from_secs(1);

/// Counts failed authentications per client address (IPv6: per /64), so that guessing
/// credentials cannot cost the store a lookup each: an unknown token is in no cache.
///
/// - An address that never failed is never slowed.
/// - One that failed is a *suspect* for [`SUSPECT_FOR`]: each of its lookups that no cache
///   answers spends one of its failures first ([`AuthFailureLimiter::begin`]), so many
///   guesses sent at once cannot all reach the store before the first is counted.
/// - One that has spent its failures is refused with 429 until its next one is due, before
///   anything is looked up.
///
/// A client whose credentials are good and cached pays nothing; it is refused only while it
/// shares an address with a guesser (behind the same NAT, or a reverse proxy not listed in
/// `ws.trusted_proxies`). The operator's admin token is compared before any of this and always
/// passes.
pub struct AuthFailureLimiter<C: Clock = DefaultClock> {
    per_ip: Option<Keyed<IpAddr, C>>,
    /// Suspect addresses. Kept to [`MAX_KEYS`], swept at most every [`PRUNE_EVERY`];
    /// [`Self::suspects_any`] saves every request the lock while there are none.
    suspects: Mutex<Suspects>,
    suspects_any: AtomicUsize,
    /// The table is full of recent suspects: addresses it cannot take pay like suspects.
    saturated: AtomicBool,
    hits: Arc<ApiMetrics>,
}

#[derive(Default)]
struct Suspects {
    by_address: HashMap<IpAddr, Suspect>,
    pruned: Option<Instant>,
}

struct Suspect {
    last_failure: Instant,
    /// Set once its failures are spent: refused until then.
    refused_until: Option<Instant>,
}

/// One authentication under way: whether it has paid for its lookup already
/// ([`AuthFailureLimiter::begin`]), so a failure is not charged twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub struct Attempt {
    paid: bool,
}

impl Attempt {
    /// Nothing paid yet: a failure pays when it is counted.
    pub(crate) const FREE: Self = Self { paid: false };
}

impl<C: Clock> std::fmt::Debug for AuthFailureLimiter<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthFailureLimiter")
            .field("per_ip", &self.per_ip.as_ref().map(|k| k.rate))
            .finish()
    }
}

impl Default for AuthFailureLimiter {
    fn default() -> Self {
        Self::new(AuthFailureRates::default())
    }
}

impl AuthFailureLimiter {
    pub fn new(rates: AuthFailureRates) -> Self {
        Self::with_clock(rates, DefaultClock::default())
    }
}

impl<C: Clock + Clone> AuthFailureLimiter<C> {
    /// Budgets kept in `clock`'s time (tests move it by hand).
    fn with_clock(rates: AuthFailureRates, clock: C) -> Self {
        Self {
            per_ip: Keyed::with_clock(rates.per_ip, clock),
            suspects: Mutex::default(),
            suspects_any: AtomicUsize::new(0),
            saturated: AtomicBool::new(false),
            hits: Arc::default(),
        }
    }

    /// Counts refusals into the node's registered metrics instead of detached ones.
    pub fn counting_into(mut self, hits: Arc<ApiMetrics>) -> Self {
        self.hits = hits;
        self
    }

    /// Before credentials from `client` that no cache answers are looked up: refused if the
    /// address has spent its failures; a suspect pays for the lookup now. `None` (a test
    /// harness without a peer address) always may.
    pub fn begin(&self, client: Option<IpAddr>) -> Result<Attempt, Limited> {
        self.begin_at(client, Instant::now())
    }

    /// Before credentials from `client` that cost no lookup (a cached app's signature) are
    /// checked: refused while the address has spent its failures, and nothing paid.
    pub fn refusing(&self, client: Option<IpAddr>) -> Result<Attempt, Limited> {
        self.refusing_at(client, Instant::now())
    }

    fn refusing_at(&self, client: Option<IpAddr>, now: Instant) -> Result<Attempt, Limited> {
        let (Some(keyed), Some(ip)) = (&self.per_ip, client) else {
            return Ok(Attempt::FREE);
        };
        if self.suspects_any.load(Ordering::Acquire) == 0 {
            return Ok(Attempt::FREE);
        }
        let key = herald_channels::limits::address_key(ip);
        let until = self
            .lock()
            .by_address
            .get(&key)
            .and_then(|s| s.refused_until)
            .filter(|until| *until > now);
        match until {
            Some(until) => Err(self.refusal(keyed, until - now)),
            None => Ok(Attempt::FREE),
        }
    }

    fn begin_at(&self, client: Option<IpAddr>, now: Instant) -> Result<Attempt, Limited> {
        let (Some(keyed), Some(ip)) = (&self.per_ip, client) else {
            return Ok(Attempt::FREE);
        };
        let saturated = self.saturated.load(Ordering::Acquire);
        if self.suspects_any.load(Ordering::Acquire) == 0 && !saturated {
            return Ok(Attempt::FREE);
        }
        let key = herald_channels::limits::address_key(ip);
        {
            let mut suspects = self.lock();
            match suspects.by_address.get_mut(&key) {
                // While the table is full, an address it could not take pays like a suspect
                // (until a sweep finds room: the attack is over).
                None if saturated => {
                    if self.prune(&mut suspects, now) {
                        return Ok(Attempt::FREE);
                    }
                }
                None => return Ok(Attempt::FREE),
                Some(suspect) => {
                    if let Some(until) = suspect.refused_until.filter(|until| *until > now) {
                        drop(suspects);
                        return Err(self.refusal(keyed, until - now));
                    }
                    suspect.refused_until = None;
                    if now.saturating_duration_since(suspect.last_failure) >= SUSPECT_FOR {
                        suspects.by_address.remove(&key);
                        self.suspects_any
                            .store(suspects.by_address.len(), Ordering::Release);
                        return Ok(Attempt::FREE);
                    }
                }
            }
        }
        // Outside the table's lock: a check may sweep the bucket table.
        match keyed.check(&key) {
            Ok(()) => Ok(Attempt { paid: true }),
            Err(wait) => {
                if let Some(suspect) = self.lock().by_address.get_mut(&key) {
                    suspect.refused_until = Some(now + wait);
                }
                Err(self.refusal(keyed, wait))
            }
        }
    }

    fn refusal(&self, keyed: &Keyed<IpAddr, C>, wait: Duration) -> Limited {
        self.hits.limit_hit(Limit::AuthFailuresPerAddress);
        Limited {
            message: format!(
                "too many failed authentications from this address: at most {} per second (bursts of {}); check the credentials and retry later",
                keyed.rate.per_second, keyed.rate.burst
            ),
            retry_after: wait,
        }
    }

    /// The credentials of `attempt` were wrong (unknown, revoked, expired; an unknown Pusher
    /// app, a wrong signature): counted against `client`, which is a suspect from now on.
    pub fn failed(&self, client: Option<IpAddr>, attempt: Attempt) {
        self.failed_at(client, attempt, Instant::now());
    }

    fn failed_at(&self, client: Option<IpAddr>, attempt: Attempt, now: Instant) {
        let (Some(keyed), Some(ip)) = (&self.per_ip, client) else {
            return;
        };
        let key = herald_channels::limits::address_key(ip);
        // Paid for already if it was a suspect's; otherwise it pays now.
        let spent = match attempt.paid {
            true => None,
            false => keyed.check(&key).err(),
        };
        let mut suspects = self.lock();
        // As many addresses failing at once as the table holds: rather than the table growing
        // without bound, every address it cannot take pays before its lookups (see `begin`)
        // until it has room again.
        if !suspects.by_address.contains_key(&key)
            && suspects.by_address.len() >= MAX_KEYS
            && !self.prune(&mut suspects, now)
        {
            return;
        }
        let suspect = suspects.by_address.entry(key).or_insert(Suspect {
            last_failure: now,
            refused_until: None,
        });
        suspect.last_failure = now;
        if let Some(wait) = spent
            && suspect.refused_until.is_none_or(|until| until <= now)
        {
            suspect.refused_until = Some(now + wait);
            tracing::info!(%ip, ?wait, "refusing credentials from an address that failed authentication too often");
        }
        self.suspects_any
            .store(suspects.by_address.len(), Ordering::Release);
    }

    /// Forgets the suspects that are no longer (at most every [`PRUNE_EVERY`]); whether the
    /// table has room now. Marks it saturated or not.
    fn prune(&self, suspects: &mut Suspects, now: Instant) -> bool {
        if suspects
            .pruned
            .is_none_or(|at| now.saturating_duration_since(at) >= PRUNE_EVERY)
        {
            suspects.pruned = Some(now);
            suspects.by_address.retain(|_, s| {
                now.saturating_duration_since(s.last_failure) < SUSPECT_FOR
                    || s.refused_until.is_some_and(|until| until > now)
            });
            self.suspects_any
                .store(suspects.by_address.len(), Ordering::Release);
        }
        let room = suspects.by_address.len() < MAX_KEYS;
        self.saturated.store(!room, Ordering::Release);
        room
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Suspects> {
        // Nothing can panic while the lock is held: a poisoned table is still a valid one.
        self.suspects
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
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

    use governor::clock::FakeRelativeClock;

    /// A limiter whose budgets follow `clock`, which a test moves along with the instants it
    /// passes.
    fn auth_failures(
        per_second: u32,
        burst: u32,
        clock: &FakeRelativeClock,
    ) -> AuthFailureLimiter<FakeRelativeClock> {
        AuthFailureLimiter::with_clock(
            AuthFailureRates {
                per_ip: Rate { per_second, burst },
            },
            clock.clone(),
        )
    }

    const FREE: Attempt = Attempt::FREE;

    #[test]
    fn an_address_out_of_failed_authentications_is_refused_until_its_next_is_due() {
        let metrics = Arc::new(ApiMetrics::default());
        let clock = FakeRelativeClock::default();
        let limiter = auth_failures(1, 2, &clock).counting_into(Arc::clone(&metrics));
        let a = Some(IpAddr::from([10, 0, 0, 1]));
        let b = Some(IpAddr::from([10, 0, 0, 2]));
        let now = Instant::now();
        limiter.failed_at(a, FREE, now);
        limiter.failed_at(a, FREE, now);
        limiter.failed_at(a, FREE, now);
        let refused = limiter
            .begin_at(a, now)
            .expect_err("a third failure at once spends the burst");
        assert!(
            refused.retry_after > Duration::ZERO && refused.retry_after <= Duration::from_secs(1),
            "{:?}",
            refused.retry_after
        );
        assert!(
            refused.message.contains(
                "too many failed authentications from this address: at most 1 per second"
            ),
            "{}",
            refused.message
        );
        assert_eq!(
            limiter.begin_at(b, now),
            Ok(Attempt::FREE),
            "another address is not a suspect"
        );
        assert_eq!(hits(&metrics, Limit::AuthFailuresPerAddress), 1);
        clock.advance(refused.retry_after);
        let due = now + refused.retry_after;
        assert_eq!(
            limiter.begin_at(a, due).map_err(|l| l.message),
            Ok(Attempt { paid: true }),
            "once its next failure is due, the address may try again, paying first"
        );
    }

    /// Many guesses at once from a suspect cannot all reach the store: each pays before its
    /// lookup, and those beyond the burst are refused unread.
    #[test]
    fn a_suspect_pays_for_each_lookup_before_it_is_made() {
        let clock = FakeRelativeClock::default();
        let limiter = auth_failures(1, 3, &clock);
        let a = Some(IpAddr::from([10, 0, 0, 1]));
        let now = Instant::now();
        for _ in 0..100 {
            assert_eq!(
                limiter.begin_at(a, now),
                Ok(Attempt::FREE),
                "not a suspect yet"
            );
        }
        limiter.failed_at(a, FREE, now);
        let paid: Vec<bool> = (0..5).map(|_| limiter.begin_at(a, now).is_ok()).collect();
        assert_eq!(
            paid,
            [true, true, false, false, false],
            "two left of the burst"
        );
        // What it paid for is not charged again when it fails.
        clock.advance(Duration::from_secs(2));
        let later = now + Duration::from_secs(2);
        let attempt = limiter
            .begin_at(a, later)
            .expect("a second's worth came back");
        assert_eq!(attempt, Attempt { paid: true });
        limiter.failed_at(a, attempt, later);
        assert!(limiter.begin_at(a, later).is_ok(), "one more came back");
        // A minute without failures and it is no suspect any more.
        let quiet = later + SUSPECT_FOR;
        assert_eq!(limiter.begin_at(a, quiet), Ok(Attempt::FREE));
        assert_eq!(limiter.suspects_any.load(Ordering::Acquire), 0);
    }

    /// Credentials that cost no lookup are refused while the address is, and pay nothing.
    #[test]
    fn a_check_that_costs_no_lookup_is_refused_while_the_address_is_and_pays_nothing() {
        let clock = FakeRelativeClock::default();
        let limiter = auth_failures(1, 2, &clock);
        let a = Some(IpAddr::from([10, 0, 0, 1]));
        let now = Instant::now();
        limiter.failed_at(a, FREE, now);
        for _ in 0..10 {
            assert_eq!(
                limiter.refusing_at(a, now),
                Ok(Attempt::FREE),
                "a suspect, not refused"
            );
        }
        assert!(
            limiter.begin_at(a, now).is_ok(),
            "the burst's second is still there"
        );
        limiter.failed_at(a, Attempt { paid: true }, now);
        assert!(limiter.begin_at(a, now).is_err(), "now spent");
        assert!(limiter.refusing_at(a, now).is_err(), "and refused");
    }

    /// An address whose refusal ran out while it sent only credentials that cost no lookup
    /// is refused again once it spends its failures again.
    #[test]
    fn a_refusal_that_ran_out_is_renewed_by_the_next_spent_failures() {
        let clock = FakeRelativeClock::default();
        let limiter = auth_failures(1, 1, &clock);
        let a = Some(IpAddr::from([10, 0, 0, 1]));
        let now = Instant::now();
        limiter.failed_at(a, FREE, now);
        limiter.failed_at(a, FREE, now);
        let refused = limiter.refusing_at(a, now).expect_err("refused");
        clock.advance(refused.retry_after);
        let later = now + refused.retry_after;
        assert_eq!(
            limiter.refusing_at(a, later),
            Ok(Attempt::FREE),
            "the refusal ran out"
        );
        limiter.failed_at(a, FREE, later);
        limiter.failed_at(a, FREE, later);
        assert!(
            limiter.refusing_at(a, later).is_err(),
            "refused again, though nothing cleared the old refusal"
        );
    }

    /// A table full of recent suspects takes no more; an address it cannot take pays before
    /// each lookup instead, and is refused once its bucket is empty.
    #[test]
    fn an_address_the_full_table_cannot_take_pays_like_a_suspect() {
        let clock = FakeRelativeClock::default();
        let limiter = auth_failures(1, 2, &clock);
        let now = Instant::now();
        {
            let mut suspects = limiter.lock();
            for n in 0..MAX_KEYS as u32 {
                suspects.by_address.insert(
                    IpAddr::from(n.to_be_bytes()),
                    Suspect {
                        last_failure: now,
                        refused_until: None,
                    },
                );
            }
        }
        let newcomer = Some(IpAddr::from([250, 0, 0, 1]));
        limiter.failed_at(newcomer, FREE, now);
        assert_eq!(limiter.lock().by_address.len(), MAX_KEYS, "not taken");
        assert_eq!(
            limiter.begin_at(newcomer, now),
            Ok(Attempt { paid: true }),
            "pays the burst's second"
        );
        assert!(limiter.begin_at(newcomer, now).is_err(), "then refused");
        let over = now + SUSPECT_FOR;
        assert_eq!(
            limiter.begin_at(Some(IpAddr::from([250, 0, 0, 2])), over),
            Ok(Attempt::FREE),
            "once the suspects are stale, a sweep makes room and nobody else pays"
        );
        assert!(!limiter.saturated.load(Ordering::Acquire));
    }

    #[test]
    fn failed_authentications_are_counted_by_64_on_ipv6_and_off_at_zero() {
        let clock = FakeRelativeClock::default();
        let limiter = auth_failures(1, 1, &clock);
        let at = |ip: &str| Some(ip.parse::<IpAddr>().expect("ip"));
        let now = Instant::now();
        limiter.failed_at(at("2001:db8::1"), FREE, now);
        limiter.failed_at(at("2001:db8::2"), FREE, now);
        assert!(limiter.begin_at(at("2001:db8::3"), now).is_err());
        assert_eq!(
            limiter.begin_at(at("2001:db8:0:1::1"), now),
            Ok(Attempt::FREE)
        );
        assert_eq!(
            limiter.begin_at(None, now),
            Ok(Attempt::FREE),
            "no address, no limit"
        );

        let off = auth_failures(0, 0, &clock);
        for _ in 0..100 {
            off.failed_at(at("2001:db8::1"), FREE, now);
        }
        assert_eq!(off.begin_at(at("2001:db8::1"), now), Ok(Attempt::FREE));
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
