//! Limits per client address, shared by WebSocket connections (`/app/{key}`) and SSE streams
//! (`/apps/{id}/sse`): long-lived connections open at once, new connections per second, and
//! bytes of history replayed per second. Without them one client could take an app's whole
//! connection quota, or turn a few bytes of resubscriptions into megabytes of replay.
//!
//! The client's address is the TCP peer, or, when the peer is a trusted proxy, the right-most
//! `X-Forwarded-For` address that is not itself a trusted proxy. IPv6 clients are counted per
//! /64 (one subscriber line's usual allocation), IPv4 per address.
//!
//! The replay budget belongs to the address, not to each connection: a connection's own budget
//! would come back whole with every reconnect, and an SSE stream is one request.
//!
//! The table of addresses is bounded: an address with no open connection whose buckets are full
//! again knows nothing worth keeping and is removed, and at most `max_tracked_addresses` are
//! kept.

use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use axum::http::HeaderMap;
use ipnet::IpNet;
use tokio::time::Instant;

use crate::history::ReplayBudget;

/// A token bucket refilled continuously: `per_second` tokens a second up to `burst`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    per_second: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// Whether `n` could ever be taken at once: no more than the burst.
    pub fn could_take(&self, n: f64) -> bool {
        n <= self.burst
    }

    /// A full bucket.
    pub fn new(per_second: f64, burst: f64) -> Self {
        Self {
            per_second,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    /// A full bucket, or `None` (no limit) when `per_second` is 0.
    pub fn limit(per_second: u64, burst: u64) -> Option<Self> {
        (per_second > 0).then(|| Self::new(per_second as f64, burst.max(1) as f64))
    }

    fn refill(&mut self) {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.per_second;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.last = now;
    }

    /// Takes `n` tokens if the bucket holds them.
    pub fn try_take(&mut self, n: f64) -> bool {
        self.refill();
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }

    pub fn is_full(&mut self) -> bool {
        self.refill();
        self.tokens >= self.burst
    }

    /// How long until the bucket holds `n` tokens.
    pub fn time_until(&mut self, n: f64) -> Duration {
        self.refill();
        let missing = (n - self.tokens).max(0.0);
        Duration::try_from_secs_f64(missing / self.per_second).unwrap_or(Duration::MAX)
    }
}

/// The per-address limits; 0 turns a limit off.
#[derive(Debug, Clone)]
pub struct ClientLimits {
    /// Long-lived connections (WebSockets and SSE streams together) one address may hold.
    pub max_connections: u32,
    /// New connections one address may open per second, on average...
    pub connections_per_second: u32,
    /// ...and at once.
    pub connection_burst: u32,
    /// History bytes replayed to one address per second, on average...
    pub replay_bytes_per_second: u64,
    /// ...and at once.
    pub replay_burst_bytes: u64,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpNet>,
    /// Addresses tracked at most; beyond, connections from new addresses are refused.
    pub max_tracked_addresses: usize,
}

impl Default for ClientLimits {
    fn default() -> Self {
        Self {
            max_connections: 1000,
            connections_per_second: 20,
            connection_burst: 100,
            // A full replay (`history.max_replay`, 500 events) of events near Pusher's 10 KB
            // message limit is about 5 MB: the burst holds three of them, so a client that
            // reconnects after an outage recovers at once instead of being told to page, and the
            // rate refills one in under three seconds. Resubscribing in a loop still gets at
            // most 2 MiB a second out of an address, where it got 151 MB a second unbounded.
            replay_bytes_per_second: 2 * 1024 * 1024,
            replay_burst_bytes: 16 * 1024 * 1024,
            trusted_proxies: Vec::new(),
            max_tracked_addresses: 100_000,
        }
    }
}

impl ClientLimits {
    /// Whether any limit is on, so addresses must be tracked.
    fn any(&self) -> bool {
        self.max_connections > 0
            || self.connections_per_second > 0
            || self.replay_bytes_per_second > 0
    }
}

/// Why a connection was refused.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// The address holds `max_connections` already.
    TooManyOpen(u32),
    /// The address opens connections faster than allowed; a new one is possible after this.
    TooFast(Duration),
    /// The table of addresses is full of addresses with open connections.
    TooManyClients,
}

impl Refusal {
    /// What to tell the client (short: it goes into a WebSocket close frame).
    pub fn message(&self) -> String {
        match self {
            Self::TooManyOpen(max) => {
                format!("too many connections from your address (at most {max})")
            }
            Self::TooFast(_) => "too many new connections from your address; back off".into(),
            Self::TooManyClients => "the server tracks too many clients; try again later".into(),
        }
    }

    /// When to try again, in whole seconds (at least 1).
    pub fn retry_after_secs(&self) -> u64 {
        match self {
            Self::TooFast(wait) => wait.as_secs_f64().ceil().max(1.0) as u64,
            Self::TooManyOpen(_) | Self::TooManyClients => 5,
        }
    }
}

/// One tracked address.
struct Client {
    open: u32,
    connects: Option<TokenBucket>,
    replay: Option<TokenBucket>,
}

impl Client {
    fn new(limits: &ClientLimits) -> Self {
        Self {
            open: 0,
            connects: TokenBucket::limit(
                limits.connections_per_second.into(),
                limits.connection_burst.into(),
            ),
            replay: TokenBucket::limit(limits.replay_bytes_per_second, limits.replay_burst_bytes),
        }
    }

    /// Knows nothing worth keeping: a fresh entry would behave the same.
    fn idle(&mut self) -> bool {
        self.open == 0
            && self.connects.as_mut().is_none_or(TokenBucket::is_full)
            && self.replay.as_mut().is_none_or(TokenBucket::is_full)
    }
}

/// Admissions between sweeps of idle addresses.
const SWEEP_EVERY: u32 = 1024;

struct Table {
    clients: HashMap<IpAddr, Client>,
    since_sweep: u32,
}

/// Counts connections and replayed bytes per client address.
pub struct ClientLimiter {
    limits: ClientLimits,
    table: Mutex<Table>,
}

impl fmt::Debug for ClientLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientLimiter")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl Default for ClientLimiter {
    fn default() -> Self {
        Self::new(ClientLimits::default())
    }
}

impl ClientLimiter {
    pub fn new(limits: ClientLimits) -> Self {
        Self {
            limits,
            table: Mutex::new(Table {
                clients: HashMap::new(),
                since_sweep: 0,
            }),
        }
    }

    pub fn limits(&self) -> &ClientLimits {
        &self.limits
    }

    /// How many addresses are tracked.
    pub fn tracked(&self) -> usize {
        self.lock().clients.len()
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The address limits apply to: `peer`, or, if `peer` is a trusted proxy, the right-most
    /// `X-Forwarded-For` address that is not one (the left-most if all are). A hop that is not
    /// an address ends the walk at the last trusted one. `None` without a peer (a router
    /// called without the listener's connection info).
    pub fn client_address(&self, peer: Option<SocketAddr>, headers: &HeaderMap) -> Option<IpAddr> {
        let mut client = peer?.ip().to_canonical();
        if !self.trusted(client) {
            return Some(client);
        }
        for value in headers.get_all("x-forwarded-for").iter().rev() {
            let Ok(value) = value.to_str() else {
                return Some(client);
            };
            for hop in value.rsplit(',') {
                let Some(hop) = parse_hop(hop.trim()) else {
                    return Some(client);
                };
                client = hop;
                if !self.trusted(client) {
                    return Some(client);
                }
            }
        }
        Some(client)
    }

    fn trusted(&self, ip: IpAddr) -> bool {
        self.limits
            .trusted_proxies
            .iter()
            .any(|net| net.contains(&ip))
    }

    /// Admits a new connection from `client` (see [`Self::client_address`]), or refuses it.
    /// The permit holds the connection's place until it is dropped. Without an address, or
    /// with every limit off, nothing is counted.
    /// Admits a request's connection (WebSocket or SSE stream, named by `what` in the log):
    /// finds its client address and takes a permit, or says why not.
    pub fn admit_request(
        self: &Arc<Self>,
        peer: Option<SocketAddr>,
        headers: &HeaderMap,
        what: &'static str,
    ) -> Result<ClientPermit, Refusal> {
        self.admit_request_charging(peer, headers, what, true)
    }

    /// [`ClientLimiter::admit_request`], charging the address's connection rate only if
    /// `charge_rate`: a connection whose transport was charged already (Socket.IO's first
    /// namespace of an Engine.IO session) is counted, but a reconnect costs one, not two.
    pub fn admit_request_charging(
        self: &Arc<Self>,
        peer: Option<SocketAddr>,
        headers: &HeaderMap,
        what: &'static str,
        charge_rate: bool,
    ) -> Result<ClientPermit, Refusal> {
        let address = self.client_address(peer, headers);
        self.admit_charging(address, charge_rate)
            .inspect_err(|refusal| {
                tracing::debug!(
                    ?address,
                    ?refusal,
                    "refused a {what} over its address's limits"
                );
            })
    }

    pub fn admit(self: &Arc<Self>, client: Option<IpAddr>) -> Result<ClientPermit, Refusal> {
        self.admit_charging(client, true)
    }

    fn admit_charging(
        self: &Arc<Self>,
        client: Option<IpAddr>,
        charge_rate: bool,
    ) -> Result<ClientPermit, Refusal> {
        let Some(ip) = client.filter(|_| self.limits.any()) else {
            return Ok(ClientPermit::unlimited());
        };
        let key = address_key(ip);
        let mut table = self.lock();
        table.since_sweep += 1;
        if table.since_sweep >= SWEEP_EVERY {
            table.since_sweep = 0;
            table.clients.retain(|_, c| !c.idle());
        }
        if !table.clients.contains_key(&key)
            && table.clients.len() >= self.limits.max_tracked_addresses
        {
            table.clients.retain(|_, c| !c.idle());
            if table.clients.len() >= self.limits.max_tracked_addresses {
                // Their rate history is lost, but addresses with open connections are kept.
                table.clients.retain(|_, c| c.open > 0);
                tracing::warn!(
                    tracked = table.clients.len(),
                    "the per-address limiter is full; forgot addresses without open connections"
                );
            }
            if table.clients.len() >= self.limits.max_tracked_addresses {
                return Err(Refusal::TooManyClients);
            }
        }
        let client = table
            .clients
            .entry(key)
            .or_insert_with(|| Client::new(&self.limits));
        let max = self.limits.max_connections;
        if max > 0 && client.open >= max {
            return Err(Refusal::TooManyOpen(max));
        }
        if charge_rate
            && let Some(bucket) = &mut client.connects
            && !bucket.try_take(1.0)
        {
            return Err(Refusal::TooFast(bucket.time_until(1.0)));
        }
        client.open += 1;
        Ok(ClientPermit {
            held: Some((Arc::clone(self), key)),
        })
    }

    fn with_client<T>(&self, key: IpAddr, f: impl FnOnce(&mut Client) -> T) -> Option<T> {
        self.lock().clients.get_mut(&key).map(f)
    }
}

/// The key every per-address limit counts a client under: IPv4 as is, IPv6 by its /64 (one
/// subscriber line's usual allocation, which its holder can rotate through at will). The
/// listener, the WebSocket and SSE limiter and `/ingest`'s rate all use it.
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & (u128::MAX << 64);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
        v4 => v4,
    }
}

/// One `X-Forwarded-For` hop: an address, with a port or not.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    hop.parse::<IpAddr>()
        .or_else(|_| hop.parse::<SocketAddr>().map(|s| s.ip()))
        .ok()
        .map(|ip| ip.to_canonical())
}

/// One admitted connection's place in its address's counts, released when dropped. It also
/// carries the address's replay budget.
pub struct ClientPermit {
    held: Option<(Arc<ClientLimiter>, IpAddr)>,
}

impl ClientPermit {
    /// A permit that counts nothing and budgets no replay, for connections no limit applies
    /// to.
    pub fn unlimited() -> Self {
        Self { held: None }
    }
}

impl fmt::Debug for ClientPermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientPermit")
            .field("address", &self.held.as_ref().map(|(_, key)| key))
            .finish()
    }
}

impl Drop for ClientPermit {
    fn drop(&mut self) {
        let Some((limiter, key)) = self.held.take() else {
            return;
        };
        let mut table = limiter.lock();
        if let Some(client) = table.clients.get_mut(&key) {
            client.open = client.open.saturating_sub(1);
            if client.idle() {
                table.clients.remove(&key);
            }
        }
    }
}

impl ClientPermit {
    /// `check` on the address's replay bucket; true when replays are not limited.
    fn with_replay_bucket(&self, check: impl FnOnce(&mut TokenBucket) -> bool) -> bool {
        let Some((limiter, key)) = &self.held else {
            return true;
        };
        limiter
            .with_client(*key, |c| c.replay.as_mut().is_none_or(check))
            .unwrap_or(true)
    }
}

impl ReplayBudget for ClientPermit {
    fn try_charge(&self, bytes: u64) -> bool {
        self.with_replay_bucket(|bucket| bucket.try_take(bytes as f64))
    }

    fn could_ever_pay(&self, bytes: u64) -> bool {
        self.with_replay_bucket(|bucket| bucket.could_take(bytes as f64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(limits: ClientLimits) -> Arc<ClientLimiter> {
        Arc::new(ClientLimiter::new(limits))
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().expect("an address"))
    }

    fn headers(forwarded: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in forwarded {
            headers.append("x-forwarded-for", value.parse().expect("header value"));
        }
        headers
    }

    #[tokio::test(start_paused = true)]
    async fn open_connections_are_counted_per_address_and_released_on_drop() {
        let limiter = limiter(ClientLimits {
            max_connections: 2,
            connections_per_second: 0,
            replay_bytes_per_second: 0,
            ..ClientLimits::default()
        });
        let a = limiter.admit(ip("192.0.2.1")).expect("first");
        let _b = limiter.admit(ip("192.0.2.1")).expect("second");
        assert_eq!(
            limiter.admit(ip("192.0.2.1")).expect_err("third"),
            Refusal::TooManyOpen(2)
        );
        let _other = limiter.admit(ip("192.0.2.2")).expect("another address");
        drop(a);
        let _c = limiter.admit(ip("192.0.2.1")).expect("a place was freed");
        // No address, no limit.
        let unlimited: Vec<_> = (0..5)
            .map(|_| limiter.admit(None).expect("no address"))
            .collect();
        assert_eq!(unlimited.len(), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn new_connections_are_rate_limited_with_a_burst() {
        let limiter = limiter(ClientLimits {
            max_connections: 0,
            connections_per_second: 2,
            connection_burst: 3,
            replay_bytes_per_second: 0,
            ..ClientLimits::default()
        });
        for _ in 0..3 {
            drop(limiter.admit(ip("192.0.2.1")).expect("within the burst"));
        }
        let Err(Refusal::TooFast(wait)) = limiter.admit(ip("192.0.2.1")) else {
            panic!("over the burst");
        };
        assert_eq!(wait, Duration::from_millis(500));
        tokio::time::advance(wait).await;
        drop(limiter.admit(ip("192.0.2.1")).expect("refilled"));
        assert!(limiter.admit(ip("192.0.2.1")).is_err());
        // Closed while the bucket was not full: remembered, so closing does not reset it.
        assert_eq!(limiter.tracked(), 1);
        tokio::time::advance(Duration::from_secs(2)).await;
        drop(limiter.admit(ip("192.0.2.1")).expect("full again"));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_addresses_are_forgotten_and_the_table_is_bounded() {
        let limiter = limiter(ClientLimits {
            max_connections: 10,
            connections_per_second: 1,
            connection_burst: 1,
            replay_bytes_per_second: 0,
            max_tracked_addresses: 3,
            ..ClientLimits::default()
        });
        let held: Vec<_> = (1..=3)
            .map(|n| {
                limiter
                    .admit(ip(&format!("192.0.2.{n}")))
                    .expect("room for three")
            })
            .collect();
        assert_eq!(
            limiter.admit(ip("192.0.2.4")).expect_err("full of open"),
            Refusal::TooManyClients
        );
        drop(held);
        // Closed, but their buckets are not full yet: kept until room is needed.
        assert_eq!(limiter.tracked(), 3);
        let fourth = limiter.admit(ip("192.0.2.4")).expect("room made");
        assert_eq!(limiter.tracked(), 1);
        tokio::time::advance(Duration::from_secs(1)).await;
        drop(fourth);
        assert_eq!(limiter.tracked(), 0, "closed with a full bucket: forgotten");
    }

    #[tokio::test(start_paused = true)]
    async fn replay_budget_is_per_address_and_a_refused_charge_takes_nothing() {
        let limiter = limiter(ClientLimits {
            max_connections: 0,
            connections_per_second: 0,
            replay_bytes_per_second: 100,
            replay_burst_bytes: 1000,
            ..ClientLimits::default()
        });
        let one = limiter.admit(ip("192.0.2.1")).expect("admitted");
        let two = limiter.admit(ip("192.0.2.1")).expect("admitted");
        assert!(one.try_charge(600));
        assert!(!two.try_charge(600), "the same address's budget");
        assert!(
            two.try_charge(400),
            "the refused charge took nothing: no debt"
        );
        assert!(!one.try_charge(1), "spent");
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(one.try_charge(300), "refilled at 100 bytes a second");
        assert!(!one.try_charge(1001), "never more than the burst at once");
        let other = limiter.admit(ip("192.0.2.2")).expect("admitted");
        assert!(other.try_charge(1000));
        assert!(ClientPermit::unlimited().try_charge(u64::MAX));
    }

    #[test]
    fn forwarded_addresses_are_believed_only_from_trusted_proxies() {
        let limiter = ClientLimiter::new(ClientLimits {
            trusted_proxies: vec![
                "127.0.0.0/8".parse().expect("net"),
                "10.0.0.0/8".parse().expect("net"),
            ],
            ..ClientLimits::default()
        });
        let peer = |s: &str| Some(SocketAddr::new(s.parse().expect("ip"), 4000));
        let client = |p: &str, h: &[&str]| limiter.client_address(peer(p), &headers(h));
        assert_eq!(client("198.51.100.7", &["203.0.113.1"]), ip("198.51.100.7"));
        assert_eq!(client("127.0.0.1", &[]), ip("127.0.0.1"));
        assert_eq!(client("127.0.0.1", &["203.0.113.1"]), ip("203.0.113.1"));
        // Right-most untrusted: a client cannot choose its address by sending the header.
        assert_eq!(
            client("127.0.0.1", &["6.6.6.6, 203.0.113.1, 10.1.2.3"]),
            ip("203.0.113.1")
        );
        assert_eq!(
            client("127.0.0.1", &["6.6.6.6", "203.0.113.1:5555"]),
            ip("203.0.113.1")
        );
        assert_eq!(
            client("127.0.0.1", &["[2001:db8::1]:443"]),
            ip("2001:db8::1")
        );
        // Garbage stops the walk at the last trusted hop.
        assert_eq!(
            client("127.0.0.1", &["203.0.113.1, nonsense"]),
            ip("127.0.0.1")
        );
        assert_eq!(client("127.0.0.1", &["10.0.0.1, 10.0.0.2"]), ip("10.0.0.1"));
        // IPv4-mapped peers are IPv4; IPv6 counts per /64.
        assert_eq!(client("::ffff:198.51.100.7", &[]), ip("198.51.100.7"));
        assert_eq!(
            address_key("2001:db8:1:2:3:4:5:6".parse().expect("ip")),
            "2001:db8:1:2::".parse::<IpAddr>().expect("ip")
        );
        assert_eq!(limiter.client_address(None, &headers(&[])), None);
    }
}
