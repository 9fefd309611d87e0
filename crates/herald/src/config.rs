//! Configuration: built-in defaults, then a TOML file (`--config`), then `HERALD_*` environment
//! variables, then command-line flags; each later source wins. Nested keys use `__` in
//! environment variables: `HERALD_DELIVERY__REQUEST_TIMEOUT_SECS=30`.
//!
//! An unknown key in the file is an error. The environment is shared with other programs
//! (`HERALD_LOG` is the binary's log filter; a client may read `HERALD_TOKEN` or `HERALD_URL`),
//! so only variables naming a key are read: a top-level key (`HERALD_DATA_DIR`) or anything in a
//! known section (`HERALD_DELIVERY__...`). The others are ignored and listed in the log; a
//! misspelt field of a known section (`HERALD_DELIVERY__REQUST_TIMEOUT_SECS`) is still an error.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

#[cfg(test)]
use std::path::Path;

use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
    value::{Uncased, UncasedStr, Value},
};
use herald_channels::channel_webhooks::ChannelWebhookConfig;
use herald_core::{AddressPolicy, RetryPolicy};
use herald_delivery::DeliveryConfig;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:6001";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address for the HTTP API (and, later, WebSockets).
    pub listen: SocketAddr,
    /// Directory of the embedded store (SQLite), used while `store.url` is unset.
    pub data_dir: PathBuf,
    /// Development mode: private webhook targets allowed, demo app and token created.
    pub dev: bool,
    /// Let `--dev`, whose credentials are public, listen on a non-loopback address.
    pub dev_allow_remote: bool,
    /// At start, delete the token `--dev` created and give its demo app new Pusher
    /// credentials, so the data directory can serve outside `--dev`.
    pub remove_dev_credentials: bool,
    /// Token with full access to the API. Without one (and outside `--dev`) only tokens stored
    /// in the database work, and a fresh install has none.
    pub admin_token: Option<SecretText>,
    /// The main key secrets at rest are encrypted under: 32 random bytes in base64
    /// (`openssl rand -base64 32`). Unset: SQLite generates one into the data directory,
    /// PostgreSQL into the database (both logged as a warning at every start).
    pub main_key: Option<SecretText>,
    /// Earlier main keys, which still decrypt during a rotation (`herald rotate-main-key`):
    /// a list, or comma-separated in `HERALD_PREVIOUS_MAIN_KEYS`.
    pub previous_main_keys: KeyList,
    /// Seconds in-flight requests and attempts get to finish after SIGTERM.
    pub shutdown_grace_secs: f64,
    pub store: StoreSection,
    pub api: ApiSection,
    pub listener: ListenerSection,
    pub delivery: DeliverySection,
    pub ws: WsSection,
    pub socketio: SocketIoSection,
    pub ingest: IngestSection,
    pub history: HistorySection,
    pub retention: RetentionSection,
    pub cluster: ClusterSection,
    pub broker: BrokerSection,
    pub tls: TlsSection,
}

/// TLS on the main listener (see `tls.rs`). With `cert` and `key` set, every face is served
/// over `https://` and `wss://`; unset, plain HTTP.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSection {
    /// PEM file with the certificate chain, the leaf first.
    pub cert: Option<PathBuf>,
    /// PEM file with the certificate's private key.
    pub key: Option<PathBuf>,
    /// How often both files are read to see whether they changed, in milliseconds; a change
    /// reloads the certificate (as SIGHUP does). 0: only SIGHUP reloads.
    pub watch_interval_ms: u64,
    /// An address for a plain-HTTP listener that serves only `/health/live` and
    /// `/health/ready`, for load balancers that probe without TLS. Unset: none.
    pub health_listen: Option<SocketAddr>,
}

impl Default for TlsSection {
    fn default() -> Self {
        Self {
            cert: None,
            key: None,
            watch_interval_ms: 2000,
            health_listen: None,
        }
    }
}

/// Where a cluster's publications travel between nodes (see `herald_cluster::bus`). Unset:
/// PostgreSQL's LISTEN/NOTIFY. Needs the PostgreSQL store, which stays the durable store,
/// delivery queue and presence record.
#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerSection {
    /// `redis://[:PASSWORD@]HOST:PORT[/DB]` or `nats://[USER:PASSWORD@]HOST:PORT` (TLS to the
    /// broker is not set up by Herald: `rediss://` is refused).
    pub url: Option<String>,
    /// The Redis channel or NATS subject every node of this cluster publishes to and hears:
    /// clusters sharing one Redis or NATS name different topics.
    pub topic: String,
}

/// The URL's credentials left out, as in every log line that names it.
impl std::fmt::Debug for BrokerSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerSection")
            .field(
                "url",
                &self.url.as_deref().map(herald_cluster::bus::redacted),
            )
            .field("topic", &self.topic)
            .finish()
    }
}

impl Default for BrokerSection {
    fn default() -> Self {
        Self {
            url: None,
            topic: "herald.publications".to_owned(),
        }
    }
}

/// Several nodes on one PostgreSQL store (ignored on SQLite, which has one node).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterSection {
    /// Seconds without a heartbeat after which a node is dead and its presence members and
    /// occupancy are removed (once each) by the live nodes; each node beats every third of it.
    pub node_ttl_secs: u64,
}

/// Bounds of `cluster.node_ttl_secs`: a heartbeat every third of a second at least, and a dead
/// node's members gone within the hour at most.
const NODE_TTL_SECS: std::ops::RangeInclusive<u64> = 1..=3600;
/// The longest any `[retention]` setting keeps anything: a century, as the API's `payloadDays`.
const MAX_RETENTION_DAYS: u32 = 36_500;

impl Default for ClusterSection {
    fn default() -> Self {
        Self {
            node_ttl_secs: herald_cluster::presence::DEFAULT_NODE_TTL.as_secs(),
        }
    }
}

/// Where Herald keeps its state (see `store.rs`).
#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreSection {
    /// `sqlite://DIR` (or `sqlite:DIR`), or `postgres://USER:PASSWORD@HOST:PORT/DATABASE`.
    /// Unset: SQLite in `data_dir` (`--data`). When set, it wins over `data_dir`.
    pub url: Option<String>,
    /// PostgreSQL: connections this node's pool opens at most (SQLite ignores it).
    pub max_connections: u32,
}

/// The URL's credentials left out, as in every log line that names it.
impl std::fmt::Debug for StoreSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreSection")
            .field(
                "url",
                &self.url.as_deref().map(herald_cluster::bus::redacted),
            )
            .field("max_connections", &self.max_connections)
            .finish()
    }
}

impl Default for StoreSection {
    fn default() -> Self {
        Self {
            url: None,
            max_connections: crate::store::DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// Channel history defaults (apps may set their own rules).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HistorySection {
    /// Which channels keep history, for apps that set no rules; the first match wins.
    pub rules: Vec<HistoryRuleConfig>,
    /// Events one resubscription may replay.
    pub max_replay: u64,
    /// Seconds between SSE keep-alive comments.
    pub sse_keepalive_secs: u64,
}

impl Default for HistorySection {
    fn default() -> Self {
        let d = herald_channels::history::HistoryConfig::default();
        Self {
            rules: d
                .default_rules
                .into_iter()
                .map(HistoryRuleConfig::from)
                .collect(),
            max_replay: d.max_replay,
            sse_keepalive_secs: 15,
        }
    }
}

/// How long what Herald stores is kept (see `retention.rs` and the README's "Retention").
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionSection {
    /// Days a message's payload is kept (an app's `retention.payloadDays` or a message's
    /// `payloadRetentionPeriod`/`payloadRetentionHours` may say otherwise), then expunged.
    pub payload_days: u32,
    /// Days the attempt log is kept; messages older than this with nothing left to deliver
    /// are deleted with their deliveries.
    pub attempt_days: u32,
    /// Days received requests (webhooks in) are kept, with the delivery ids that recognise
    /// a provider's retries: at least 3 (Stripe retries for 3 days).
    pub ingest_days: u32,
    /// Seconds between sweeps.
    pub sweep_interval_secs: f64,
    /// Rows one sweep batch (one transaction) deletes at most.
    pub batch_size: u32,
    /// Milliseconds between two batches of a sweep, so intake gets the database in between.
    pub batch_pause_ms: u64,
    /// The length of a retention "day" in seconds: 86400. Only tests shorten it, to see
    /// days of retention pass in seconds.
    pub day_secs: f64,
}

impl Default for RetentionSection {
    fn default() -> Self {
        Self {
            payload_days: 30,
            attempt_days: 90,
            ingest_days: 30,
            sweep_interval_secs: 60.0,
            batch_size: herald_store::RETENTION_BATCH,
            batch_pause_ms: 10,
            day_secs: 86_400.0,
        }
    }
}

/// One `[[history.rules]]` entry: `pattern`, `maxEvents`, `maxAgeSecs` (the API's names).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HistoryRuleConfig {
    pub pattern: String,
    pub max_events: u32,
    pub max_age_secs: u64,
}

impl From<herald_core::history::HistoryRule> for HistoryRuleConfig {
    fn from(r: herald_core::history::HistoryRule) -> Self {
        Self {
            pattern: r.pattern,
            max_events: r.max_events,
            max_age_secs: r.max_age_secs,
        }
    }
}

impl From<&HistoryRuleConfig> for herald_core::history::HistoryRule {
    fn from(r: &HistoryRuleConfig) -> Self {
        Self {
            pattern: r.pattern.clone(),
            max_events: r.max_events,
            max_age_secs: r.max_age_secs,
        }
    }
}

/// Request rates on `POST /ingest/{source}`, the route anyone may call (0 per second: no
/// limit). Beyond them, 429 with `Retry-After`; providers retry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngestSection {
    /// Requests per second from one client address (IPv6: one /64), and at once.
    pub requests_per_second_per_ip: u32,
    pub request_burst_per_ip: u32,
    /// Requests per second to one source, and at once.
    pub requests_per_second_per_source: u32,
    pub request_burst_per_source: u32,
}

impl Default for IngestSection {
    fn default() -> Self {
        let d = herald_api::rate::IngestRates::default();
        Self {
            requests_per_second_per_ip: d.per_ip.per_second,
            request_burst_per_ip: d.per_ip.burst,
            requests_per_second_per_source: d.per_source.per_second,
            request_burst_per_source: d.per_source.burst,
        }
    }
}

/// Socket.IO limits and timings (the per-address limits are `ws`'s, shared by every face).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SocketIoSection {
    /// Serve Socket.IO at `/socket.io/`.
    pub enabled: bool,
    /// Largest packet a client may send (Socket.IO's `maxHttpBufferSize`).
    pub max_payload_bytes: u64,
    pub ping_interval_ms: u64,
    pub ping_timeout_ms: u64,
    pub max_connections_per_app: u32,
    pub max_rooms_per_socket: usize,
    /// Largest data of one relayed event, as stored (binary as base64).
    pub max_event_bytes: usize,
    pub joins_per_second: u32,
    pub join_burst: u32,
    pub events_per_second: u32,
    pub event_burst: u32,
    pub outbox_frames: usize,
}

impl Default for SocketIoSection {
    fn default() -> Self {
        let d = herald_socketio::SocketIoConfig::default();
        Self {
            enabled: true,
            max_payload_bytes: d.max_payload_bytes,
            ping_interval_ms: duration_ms(d.ping_interval),
            ping_timeout_ms: duration_ms(d.ping_timeout),
            max_connections_per_app: d.max_connections_per_app,
            max_rooms_per_socket: d.max_rooms_per_socket,
            max_event_bytes: d.max_event_bytes,
            joins_per_second: d.joins_per_second,
            join_burst: d.join_burst,
            events_per_second: d.events_per_second,
            event_burst: d.event_burst,
            outbox_frames: d.outbox_frames,
        }
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// WebSocket (Pusher protocol) limits and timings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WsSection {
    pub activity_timeout_secs: u64,
    pub pong_timeout_secs: u64,
    pub max_connections_per_app: u32,
    pub max_channels_per_connection: usize,
    pub max_message_bytes: usize,
    pub max_presence_members: usize,
    pub max_user_info_bytes: usize,
    pub client_events_per_second: u32,
    pub outbox_frames: usize,
    /// How long `channel_vacated` and `member_removed` webhooks wait for a rejoin that
    /// cancels them (Pusher waits up to 3 s). 0 sends them at once.
    pub webhook_delay_ms: u64,
    /// Channel webhook events waiting to be stored at most.
    pub webhook_max_pending: usize,
    /// WebSockets and SSE streams one client address may hold open (0: no limit).
    pub max_connections_per_ip: u32,
    /// New WebSockets and SSE streams one address may open per second on average (0: no
    /// limit), and at once.
    pub connections_per_second_per_ip: u32,
    pub connection_burst_per_ip: u32,
    /// Subscribes one connection may send per second on average (0: no limit), and at once.
    pub subscribes_per_second: u32,
    pub subscribe_burst: u32,
    /// History bytes replayed to one address per second on average (0: no limit), and at once.
    pub replay_bytes_per_second_per_ip: u64,
    pub replay_burst_bytes_per_ip: u64,
    /// Proxies whose `X-Forwarded-For` names the client (e.g. `["10.0.0.0/8"]`); the address
    /// of any other peer is the client's.
    pub trusted_proxies: Vec<IpNet>,
}

impl Default for WsSection {
    fn default() -> Self {
        let d = herald_ws::WsConfig::default();
        let l = herald_channels::limits::ClientLimits::default();
        let hooks = ChannelWebhookConfig::default();
        Self {
            activity_timeout_secs: d.activity_timeout.as_secs(),
            pong_timeout_secs: d.pong_timeout.as_secs(),
            max_connections_per_app: d.max_connections_per_app,
            max_channels_per_connection: d.max_channels_per_connection,
            max_message_bytes: d.max_message_bytes,
            max_presence_members: d.max_presence_members,
            max_user_info_bytes: d.max_user_info_bytes,
            client_events_per_second: d.client_events_per_second,
            outbox_frames: d.outbox_frames,
            webhook_delay_ms: u64::try_from(hooks.delay.as_millis()).unwrap_or(u64::MAX),
            webhook_max_pending: hooks.max_pending,
            max_connections_per_ip: l.max_connections,
            connections_per_second_per_ip: l.connections_per_second,
            connection_burst_per_ip: l.connection_burst,
            subscribes_per_second: d.subscribes_per_second,
            subscribe_burst: d.subscribe_burst,
            replay_bytes_per_second_per_ip: l.replay_bytes_per_second,
            replay_burst_bytes_per_ip: l.replay_burst_bytes,
            trusted_proxies: l.trusted_proxies,
        }
    }
}

/// The HTTP listener's limits (see `listener.rs`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ListenerSection {
    /// Open connections at most, WebSockets included; more are closed at once.
    pub max_connections: usize,
    /// Open connections one client address (IPv6: one /64) may hold, WebSockets included;
    /// more are closed at once (0: no limit). Peers in `ws.trusted_proxies` are not counted.
    /// Keep it above `ws.max_connections_per_ip`.
    pub max_connections_per_ip: usize,
    /// Seconds a client has to send a request's headers (also the keep-alive idle limit).
    pub header_read_timeout_secs: f64,
    /// Seconds a request's whole body has to arrive once the server starts reading it (408
    /// and the connection closed beyond).
    pub body_read_timeout_secs: f64,
    /// Seconds a write to a client may make no progress (it reads nothing) before its
    /// connection is closed.
    pub write_timeout_secs: f64,
    /// The largest request line plus headers, in bytes (431 beyond).
    pub max_header_bytes: usize,
    /// Bytes of request bodies being read at once, over every connection (503 beyond). At
    /// least `api.max_body_bytes`.
    pub max_body_bytes_reading: usize,
    /// The share of that budget one client address (IPv6: one /64) may hold (429 beyond; 0:
    /// no share of its own), raised to twice `api.max_body_bytes` when below. Peers in
    /// `ws.trusted_proxies` are not held to it.
    pub max_body_bytes_reading_per_ip: usize,
}

impl Default for ListenerSection {
    fn default() -> Self {
        let d = crate::listener::ListenerLimits::default();
        Self {
            max_connections: d.max_connections,
            max_connections_per_ip: d.max_connections_per_ip,
            header_read_timeout_secs: d.header_read_timeout.as_secs_f64(),
            body_read_timeout_secs: d.body_read_timeout.as_secs_f64(),
            write_timeout_secs: d.write_timeout.as_secs_f64(),
            max_header_bytes: d.max_header_bytes,
            max_body_bytes_reading: d.max_body_bytes_reading,
            max_body_bytes_reading_per_ip: d.max_body_bytes_reading_per_ip,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiSection {
    pub max_body_bytes: usize,
    /// Events one app may publish through the API per second on this node (Svix messages,
    /// Pusher triggers: one per channel named); 0: no limit.
    pub publish_per_second_per_app: u32,
    pub publish_burst_per_app: u32,
    /// Failed authentications (unknown, revoked or expired API tokens; unknown Pusher apps,
    /// wrong Pusher signatures) one client address may make per second, and at once; beyond,
    /// its credentials are refused with 429 before they are looked up. 0: no limit.
    pub auth_failures_per_second_per_ip: u32,
    pub auth_failure_burst_per_ip: u32,
    /// Endpoints one app may have; 0: no limit.
    pub max_endpoints_per_app: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeliverySection {
    pub request_timeout_secs: f64,
    pub connect_timeout_secs: f64,
    /// Delays before each retry, in seconds (Svix's schedule by default).
    pub retry_schedule_secs: Vec<f64>,
    pub retry_jitter: f64,
    pub overload_penalty_secs: f64,
    pub retry_after_max_secs: f64,
    /// An endpoint failing this long without a success is disabled (default 5 days).
    pub disable_after_secs: f64,
    pub max_in_flight: u32,
    pub max_retries_in_flight: u32,
    pub per_endpoint_in_flight: u32,
    /// Attempts in flight for one app, per lane; unset: a quarter of each lane, at least
    /// `per_endpoint_in_flight`. Keeps an app with slow endpoints from taking other apps' slots.
    pub per_app_in_flight: Option<u32>,
    pub max_response_bytes: usize,
    /// Allow webhook targets on private, loopback and link-local addresses.
    pub allow_private_targets: bool,
    /// Non-public subnets allowed even when private targets are not.
    pub allowed_subnets: Vec<IpNet>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN
                .parse()
                .unwrap_or_else(|_| unreachable!("valid address")),
            data_dir: PathBuf::from("herald-data"),
            dev: false,
            dev_allow_remote: false,
            remove_dev_credentials: false,
            admin_token: None,
            main_key: None,
            previous_main_keys: KeyList::default(),
            shutdown_grace_secs: 10.0,
            store: StoreSection::default(),
            api: ApiSection::default(),
            listener: ListenerSection::default(),
            delivery: DeliverySection::default(),
            ws: WsSection::default(),
            socketio: SocketIoSection::default(),
            ingest: IngestSection::default(),
            history: HistorySection::default(),
            retention: RetentionSection::default(),
            cluster: ClusterSection::default(),
            broker: BrokerSection::default(),
            tls: TlsSection::default(),
        }
    }
}

/// A configured secret (`admin_token`, a main key): read and written as a plain string, shown
/// by `Debug` as `<redacted>`, so logging the configuration never writes it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretText(String);

impl std::fmt::Debug for SecretText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::ops::Deref for SecretText {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl From<&str> for SecretText {
    fn from(text: &str) -> Self {
        Self(text.to_owned())
    }
}

impl From<String> for SecretText {
    fn from(text: String) -> Self {
        Self(text)
    }
}

/// `previous_main_keys`: a TOML list, or one string of comma-separated keys (as an
/// environment variable gives it).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "KeyListForm", into = "Vec<SecretText>")]
pub struct KeyList(pub Vec<SecretText>);

#[derive(Deserialize)]
#[serde(untagged)]
enum KeyListForm {
    Many(Vec<String>),
    One(String),
}

impl From<KeyListForm> for KeyList {
    fn from(form: KeyListForm) -> Self {
        let texts = match form {
            KeyListForm::Many(keys) => keys,
            KeyListForm::One(keys) => keys.split(',').map(str::to_owned).collect(),
        };
        Self(
            texts
                .into_iter()
                .map(|k| k.trim().to_owned())
                .filter(|k| !k.is_empty())
                .map(SecretText)
                .collect(),
        )
    }
}

impl From<KeyList> for Vec<SecretText> {
    fn from(list: KeyList) -> Self {
        list.0
    }
}

impl Default for ApiSection {
    fn default() -> Self {
        let publish = herald_api::rate::PublishRates::default().per_app;
        let auth_failures = herald_api::rate::AuthFailureRates::default().per_ip;
        Self {
            max_body_bytes: herald_api::ApiConfig::default().max_body_bytes,
            publish_per_second_per_app: publish.per_second,
            publish_burst_per_app: publish.burst,
            auth_failures_per_second_per_ip: auth_failures.per_second,
            auth_failure_burst_per_ip: auth_failures.burst,
            max_endpoints_per_app: herald_api::DEFAULT_MAX_ENDPOINTS_PER_APP,
        }
    }
}

impl Default for DeliverySection {
    fn default() -> Self {
        let d = DeliveryConfig::default();
        Self {
            request_timeout_secs: d.request_timeout.as_secs_f64(),
            connect_timeout_secs: d.connect_timeout.as_secs_f64(),
            retry_schedule_secs: d.retry.schedule.iter().map(Duration::as_secs_f64).collect(),
            retry_jitter: d.retry.jitter,
            overload_penalty_secs: d.retry.overload_penalty.as_secs_f64(),
            retry_after_max_secs: d.retry.retry_after_max.as_secs_f64(),
            disable_after_secs: d.retry.disable_after.as_secs_f64(),
            max_in_flight: d.max_in_flight,
            max_retries_in_flight: d.max_retries_in_flight,
            per_endpoint_in_flight: d.per_endpoint_in_flight,
            per_app_in_flight: d.per_app_in_flight,
            max_response_bytes: d.max_response_bytes,
            allow_private_targets: false,
            allowed_subnets: Vec::new(),
        }
    }
}

/// Which `HERALD_*` environment variables are configuration: [`Config`]'s top-level keys, and
/// which of them are sections (tables) whose fields a `SECTION__FIELD` name may set.
#[derive(Debug, Clone)]
struct EnvKeys {
    top_level: Vec<String>,
    sections: Vec<String>,
}

/// Every variable with this prefix is considered; only those naming a key are read.
const ENV_PREFIX: &str = "HERALD_";

/// Variables (without the prefix) whose values are text however they look, with their keys.
const TEXT_VARIABLES: [(&str, &str); 8] = [
    ("ADMIN_TOKEN", "admin_token"),
    ("MAIN_KEY", "main_key"),
    ("DATA_DIR", "data_dir"),
    ("STORE__URL", "store.url"),
    ("BROKER__URL", "broker.url"),
    ("BROKER__TOPIC", "broker.topic"),
    ("TLS__CERT", "tls.cert"),
    ("TLS__KEY", "tls.key"),
];
/// `HERALD_LOG` is the binary's log filter: expected, never configuration, not reported.
const LOG_VARIABLE: &str = "HERALD_LOG";
/// The log format and the variables of the commands that talk to a server (`herald send`,
/// `listen`, ...): not configuration keys, but no mistake either.
const CLI_VARIABLES: [&str; 5] = [
    "HERALD_LOG_FORMAT",
    "HERALD_URL",
    "HERALD_TOKEN",
    "HERALD_CLI_CONFIG",
    "HERALD_LISTEN_SECRET",
];

impl EnvKeys {
    /// The keys of [`Config`] as it serializes (every field is written, `None` too).
    fn of_config() -> Result<Self, ConfigError> {
        let value = Value::serialize(Config::default()).map_err(Box::new)?;
        let dict = value.into_dict().ok_or_else(|| {
            ConfigError::Invalid("the configuration's defaults are not a table".into())
        })?;
        let mut keys = Self {
            top_level: Vec::new(),
            sections: Vec::new(),
        };
        for (key, value) in dict {
            if matches!(value, Value::Dict(..)) {
                keys.sections.push(key.clone());
            }
            keys.top_level.push(key);
        }
        Ok(keys)
    }

    /// The figment key a variable (its name without the prefix) sets, if it names one:
    /// `DATA_DIR` -> `data_dir`, `DELIVERY__REQUEST_TIMEOUT_SECS` ->
    /// `delivery.request_timeout_secs`. Any field of a known section is passed on, so that
    /// `deny_unknown_fields` names a misspelt one.
    fn key(&self, name: &str) -> Option<String> {
        let name = name.trim().to_ascii_lowercase();
        match name.split_once("__") {
            None => self.top_level.contains(&name).then_some(name),
            Some((section, field)) => self
                .sections
                .iter()
                .any(|s| *s == section)
                .then(|| format!("{section}.{}", field.replace("__", "."))),
        }
    }

    /// The environment variables as figment reads them: known keys only.
    fn provider(self) -> Env {
        Env::prefixed(ENV_PREFIX)
            .filter_map(move |name: &UncasedStr| self.key(name.as_str()).map(Uncased::from))
    }

    /// The `HERALD_*` variables set but not read (other than `HERALD_LOG`), sorted.
    fn ignored(&self) -> Vec<String> {
        let mut ignored: Vec<String> = std::env::vars_os()
            .filter_map(|(name, _)| name.into_string().ok())
            .filter(|name| {
                name.to_ascii_uppercase()
                    .strip_prefix(ENV_PREFIX)
                    .is_some_and(|rest| !rest.is_empty() && self.key(rest).is_none())
                    && !name.eq_ignore_ascii_case(LOG_VARIABLE)
                    && !CLI_VARIABLES.iter().any(|v| name.eq_ignore_ascii_case(v))
            })
            .collect();
        ignored.sort();
        ignored
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration: {0}")]
    Invalid(String),
    #[error(transparent)]
    Figment(#[from] Box<figment::Error>),
}

/// Values given on the command line; `None` leaves the lower layers' value.
#[derive(Debug, Default, Serialize)]
pub struct Overrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dev: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dev_allow_remote: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remove_dev_credentials: Option<bool>,
}

impl Config {
    pub fn load(
        file: Option<&std::path::Path>,
        overrides: &Overrides,
    ) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::Invalid(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            figment = figment.merge(Toml::file(path));
        }
        let keys = EnvKeys::of_config()?;
        let ignored = keys.ignored();
        if !ignored.is_empty() {
            // `warn`, not `info`: a misspelt top-level name must show under any filter.
            tracing::warn!(
                variables = %ignored.join(", "),
                "ignoring HERALD_* environment variables that are not configuration keys"
            );
        }
        let mut figment = figment.merge(keys.provider());
        // figment reads an environment value as a number when it looks like one; these keys
        // are text whatever they look like (a token of digits, a directory named 2024), so
        // their variables are taken as written, and a type error can never quote a secret.
        for (variable, key) in TEXT_VARIABLES {
            if let Ok(value) = std::env::var(format!("{ENV_PREFIX}{variable}")) {
                figment = figment.merge(Serialized::default(key, value));
            }
        }
        let mut config: Config = figment
            .merge(Serialized::defaults(overrides))
            .extract()
            .map_err(Box::new)?;
        if config.dev {
            config.delivery.allow_private_targets = true;
        }
        // `HERALD_BROKER__URL=` (set but empty, as compose files leave it) means no bus.
        if config
            .broker
            .url
            .as_deref()
            .is_some_and(|url| url.trim().is_empty())
        {
            config.broker.url = None;
        }
        // `HERALD_MAIN_KEY=` (set but empty) means no main key, as everything that reads it
        // takes it: `rotate-main-key` told apart "none" and "some" by the field alone, and with
        // an empty one advised deleting the generated key that then held every secret.
        if config
            .main_key
            .as_deref()
            .is_some_and(|key| key.trim().is_empty())
        {
            config.main_key = None;
        }
        // `HERALD_TLS__CERT=` (set but empty) means no TLS, as for `broker.url`.
        for path in [&mut config.tls.cert, &mut config.tls.key] {
            if path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                *path = None;
            }
        }
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.dev && !self.dev_allow_remote && !self.listen.ip().is_loopback() {
            return Err(ConfigError::Invalid(format!(
                "--dev creates well-known credentials (API token demo-token, Pusher secret demo-secret), so it only listens on loopback addresses; {} is not one. Listen on 127.0.0.1 (or [::1]), or add --dev-allow-remote if every network that reaches this address is yours",
                self.listen
            )));
        }
        // The burst the limiter uses: the configured one, or the rate when that is 0.
        let publish_burst = match self.api.publish_burst_per_app {
            0 => self.api.publish_per_second_per_app,
            burst => burst,
        };
        if self.api.publish_per_second_per_app > 0
            && publish_burst < herald_api::rate::LARGEST_PUBLISH
        {
            return Err(ConfigError::Invalid(format!(
                "api.publish_burst_per_app ({}) must be at least {}: a Pusher trigger to {} channels spends that much at once and could never be accepted",
                self.api.publish_burst_per_app,
                herald_api::rate::LARGEST_PUBLISH,
                herald_api::rate::LARGEST_PUBLISH
            )));
        }
        if self.dev && self.remove_dev_credentials {
            return Err(ConfigError::Invalid(
                "--remove-dev-credentials removes what --dev creates; use one or the other".into(),
            ));
        }
        self.retention_check()?;
        self.bounds_check()?;
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return Err(ConfigError::Invalid(
                "tls.cert and tls.key go together: set both (PEM files) for TLS, or neither".into(),
            ));
        }
        let store = self.store_config()?;
        if let Some(url) = &self.broker.url {
            if !matches!(store, crate::store::StoreConfig::Postgres { .. }) {
                return Err(ConfigError::Invalid(format!(
                    "broker.url ({}) joins nodes into a cluster, which shares a PostgreSQL store: set store.url to postgres://... as well, or unset broker.url to run one node on SQLite",
                    herald_cluster::bus::redacted(url)
                )));
            }
            if self.broker.topic.is_empty()
                || self
                    .broker
                    .topic
                    .contains(|c: char| c.is_whitespace() || c == '*' || c == '>')
            {
                return Err(ConfigError::Invalid(format!(
                    "broker.topic must be a non-empty name without spaces or wildcards (* >); got {:?}",
                    self.broker.topic
                )));
            }
        }
        if !NODE_TTL_SECS.contains(&self.cluster.node_ttl_secs) {
            return Err(ConfigError::Invalid(format!(
                "cluster.node_ttl_secs must be between {} and {} seconds",
                NODE_TTL_SECS.start(),
                NODE_TTL_SECS.end()
            )));
        }
        let s = &self.socketio;
        let socketio_positive = [
            ("socketio.max_payload_bytes", s.max_payload_bytes),
            ("socketio.ping_interval_ms", s.ping_interval_ms),
            ("socketio.ping_timeout_ms", s.ping_timeout_ms),
            (
                "socketio.max_rooms_per_socket",
                s.max_rooms_per_socket as u64,
            ),
            ("socketio.outbox_frames", s.outbox_frames as u64),
            ("socketio.max_event_bytes", s.max_event_bytes as u64),
        ];
        for (name, value) in socketio_positive {
            if value == 0 {
                return Err(ConfigError::Invalid(format!("{name} must be at least 1")));
            }
        }
        let d = &self.delivery;
        let positive = [
            ("delivery.request_timeout_secs", d.request_timeout_secs),
            ("delivery.connect_timeout_secs", d.connect_timeout_secs),
            ("delivery.disable_after_secs", d.disable_after_secs),
        ];
        for (name, value) in positive {
            if !(value.is_finite() && value > 0.0) {
                return Err(ConfigError::Invalid(format!(
                    "{name} must be a positive number"
                )));
            }
        }
        let l = &self.listener;
        let listener_timeouts = [
            (
                "listener.header_read_timeout_secs",
                l.header_read_timeout_secs,
            ),
            ("listener.body_read_timeout_secs", l.body_read_timeout_secs),
            ("listener.write_timeout_secs", l.write_timeout_secs),
        ];
        for (name, value) in listener_timeouts {
            if !(value.is_finite() && value > 0.0) {
                return Err(ConfigError::Invalid(format!(
                    "{name} must be a positive number of seconds"
                )));
            }
        }
        if self.listener.max_connections == 0 || self.listener.max_header_bytes < 1024 {
            return Err(ConfigError::Invalid(
                "listener.max_connections must be at least 1 and listener.max_header_bytes at least 1024".into(),
            ));
        }
        // A body the API takes must fit in the budget, or it could never be read.
        if self.listener.max_body_bytes_reading < self.api.max_body_bytes {
            return Err(ConfigError::Invalid(format!(
                "listener.max_body_bytes_reading ({}) must be at least api.max_body_bytes ({})",
                self.listener.max_body_bytes_reading, self.api.max_body_bytes
            )));
        }
        let non_negative = [
            ("delivery.overload_penalty_secs", d.overload_penalty_secs),
            ("delivery.retry_after_max_secs", d.retry_after_max_secs),
            ("shutdown_grace_secs", self.shutdown_grace_secs),
        ];
        for (name, value) in non_negative {
            if !(value.is_finite() && value >= 0.0) {
                return Err(ConfigError::Invalid(format!("{name} must not be negative")));
            }
        }
        if d.retry_schedule_secs
            .iter()
            .any(|s| !(s.is_finite() && *s >= 0.0))
        {
            return Err(ConfigError::Invalid(
                "delivery.retry_schedule_secs must hold non-negative numbers".into(),
            ));
        }
        if !(0.0..1.0).contains(&d.retry_jitter) {
            return Err(ConfigError::Invalid(
                "delivery.retry_jitter must be in [0, 1)".into(),
            ));
        }
        if d.max_in_flight == 0 || d.max_retries_in_flight == 0 || d.per_endpoint_in_flight == 0 {
            return Err(ConfigError::Invalid(
                "delivery concurrency limits must be at least 1".into(),
            ));
        }
        let w = &self.ws;
        if w.activity_timeout_secs == 0
            || w.pong_timeout_secs == 0
            || w.max_message_bytes == 0
            || w.outbox_frames == 0
            || w.client_events_per_second == 0
            || w.webhook_max_pending == 0
            || self.history.max_replay == 0
            || self.history.sse_keepalive_secs == 0
        {
            return Err(ConfigError::Invalid(
                "ws timeouts, message size, outbox, client event rate, webhook_max_pending, history.max_replay and history.sse_keepalive_secs must be at least 1".into(),
            ));
        }
        // These have no "no limit" meaning: 0 would refuse every connection, subscription or
        // request body rather than turn the limit off, so it is refused here by name.
        let at_least_one = [
            (
                "ws.max_connections_per_app",
                u64::from(w.max_connections_per_app),
            ),
            (
                "ws.max_channels_per_connection",
                w.max_channels_per_connection as u64,
            ),
            (
                "socketio.max_connections_per_app",
                u64::from(self.socketio.max_connections_per_app),
            ),
            ("api.max_body_bytes", self.api.max_body_bytes as u64),
        ];
        if let Some((name, _)) = at_least_one.iter().find(|(_, value)| *value == 0) {
            return Err(ConfigError::Invalid(format!("{name} must be at least 1")));
        }
        if self.delivery.per_app_in_flight == Some(0) {
            return Err(ConfigError::Invalid(
                "delivery.per_app_in_flight must be at least 1 (leave it unset for the default)"
                    .into(),
            ));
        }
        let bursts = [
            (
                "connection_burst_per_ip",
                w.connections_per_second_per_ip > 0,
                w.connection_burst_per_ip > 0,
            ),
            (
                "subscribe_burst",
                w.subscribes_per_second > 0,
                w.subscribe_burst > 0,
            ),
            (
                "replay_burst_bytes_per_ip",
                w.replay_bytes_per_second_per_ip > 0,
                w.replay_burst_bytes_per_ip > 0,
            ),
        ];
        if let Some((name, _, _)) = bursts
            .iter()
            .find(|(_, limited, burst)| *limited && !*burst)
        {
            return Err(ConfigError::Invalid(format!(
                "ws.{name} must be at least 1 while its rate is limited"
            )));
        }
        for rule in &self.history.rules {
            herald_core::history::validate_rule(&rule.into())
                .map_err(|e| ConfigError::Invalid(format!("history.rules: {e}")))?;
        }
        if self.admin_token.as_deref().is_some_and(|t| t.len() < 16) {
            return Err(ConfigError::Invalid(
                "admin_token must be at least 16 characters".into(),
            ));
        }
        // A token no client can send (a secret file's trailing newline, a space) would start
        // cleanly and then refuse every admin call, counting them against the caller's address.
        if self
            .admin_token
            .as_deref()
            .is_some_and(|t| t.trim() != t || t.chars().any(char::is_control))
        {
            return Err(ConfigError::Invalid(
                "admin_token starts or ends with whitespace, or holds a control character (a trailing newline from a secret file?), which no Authorization header carries".into(),
            ));
        }
        self.main_keys()?;
        Ok(())
    }

    /// The configured main keys (`main_key`, then `previous_main_keys`); `None` when no main
    /// key is configured, for the store's generated one. Errors name the setting, never the
    /// value.
    pub fn main_keys(&self) -> Result<Option<herald_store::secrets::Keyring>, ConfigError> {
        use herald_store::secrets::{Keyring, MainKey};
        let previous = self
            .previous_main_keys
            .0
            .iter()
            .enumerate()
            .map(|(i, text)| {
                MainKey::from_base64(text).map_err(|e| {
                    ConfigError::Invalid(format!("previous_main_keys (key {}): {e}", i + 1))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let Some(main) = self.main_key.as_deref().filter(|k| !k.trim().is_empty()) else {
            if previous.is_empty() {
                return Ok(None);
            }
            return Err(ConfigError::Invalid(
                "previous_main_keys are set without main_key: set the key to encrypt under as main_key (HERALD_MAIN_KEY)".into(),
            ));
        };
        let main = MainKey::from_base64(main)
            .map_err(|e| ConfigError::Invalid(format!("main_key: {e}")))?;
        Ok(Some(Keyring::new(&main, &previous)))
    }

    /// The store to open: `store.url`, or SQLite in `data_dir` while it is unset; a
    /// PostgreSQL pool of `store.max_connections`.
    pub fn store_config(&self) -> Result<crate::store::StoreConfig, ConfigError> {
        if self.store.max_connections == 0 {
            return Err(ConfigError::Invalid(
                "store.max_connections must be at least 1".into(),
            ));
        }
        let mut config =
            crate::store::StoreConfig::from_url(self.store.url.as_deref(), &self.data_dir)
                .map_err(ConfigError::Invalid)?;
        if let crate::store::StoreConfig::Postgres {
            max_connections, ..
        } = &mut config
        {
            // The cluster's LISTEN session holds one of the pool's connections for the
            // node's life: with one, nothing else could ever run.
            if self.store.max_connections < 2 {
                return Err(ConfigError::Invalid(
                    "store.max_connections must be at least 2 with PostgreSQL: the node's LISTEN session holds one connection for good".into(),
                ));
            }
            *max_connections = self.store.max_connections;
        }
        Ok(config)
    }

    /// How long a shutdown may take in all before the process exits without finishing it:
    /// the HTTP drain and the in-flight attempts each get `shutdown_grace_secs`, and 5 s more
    /// cover applying the closed connections' presence changes and closing the store. With the
    /// default grace that is 25 s, inside the 30 s Kubernetes and systemd give before SIGKILL,
    /// so the process says what it left rather than being killed without a word.
    pub fn shutdown_deadline(&self) -> Duration {
        Duration::from_secs_f64(2.0 * self.shutdown_grace_secs + 5.0)
    }

    pub fn listener_limits(&self) -> crate::listener::ListenerLimits {
        let l = &self.listener;
        crate::listener::ListenerLimits {
            max_connections: l.max_connections,
            max_connections_per_ip: l.max_connections_per_ip,
            // The same proxies the WebSocket limiter trusts: each carries many clients.
            trusted_proxies: self.ws.trusted_proxies.clone(),
            header_read_timeout: Duration::from_secs_f64(l.header_read_timeout_secs),
            body_read_timeout: Duration::from_secs_f64(l.body_read_timeout_secs),
            write_timeout: Duration::from_secs_f64(l.write_timeout_secs),
            max_header_bytes: l.max_header_bytes,
            max_body_bytes_reading: l.max_body_bytes_reading,
            // At least two bodies the API takes: one body over `api.max_body_bytes` is told
            // 413 by the API before its address's share runs out, and an upgrade that raised
            // the body limit past the share's default still starts.
            max_body_bytes_reading_per_ip: match l.max_body_bytes_reading_per_ip {
                0 => 0,
                share => share.max(self.api.max_body_bytes.saturating_mul(2)),
            },
            drain_timeout: Duration::from_secs_f64(self.shutdown_grace_secs),
        }
    }

    /// The per-address limits shared by WebSockets and SSE (one limiter serves both).
    pub fn client_limits(&self) -> herald_channels::limits::ClientLimits {
        let w = &self.ws;
        herald_channels::limits::ClientLimits {
            max_connections: w.max_connections_per_ip,
            connections_per_second: w.connections_per_second_per_ip,
            connection_burst: w.connection_burst_per_ip,
            replay_bytes_per_second: w.replay_bytes_per_second_per_ip,
            replay_burst_bytes: w.replay_burst_bytes_per_ip,
            trusted_proxies: w.trusted_proxies.clone(),
            ..herald_channels::limits::ClientLimits::default()
        }
    }

    pub fn ws_config(
        &self,
        clients: &std::sync::Arc<herald_channels::limits::ClientLimiter>,
    ) -> herald_ws::WsConfig {
        let w = &self.ws;
        herald_ws::WsConfig {
            activity_timeout: Duration::from_secs(w.activity_timeout_secs),
            pong_timeout: Duration::from_secs(w.pong_timeout_secs),
            max_connections_per_app: w.max_connections_per_app,
            max_channels_per_connection: w.max_channels_per_connection,
            max_message_bytes: w.max_message_bytes,
            max_presence_members: w.max_presence_members,
            max_user_info_bytes: w.max_user_info_bytes,
            client_events_per_second: w.client_events_per_second,
            outbox_frames: w.outbox_frames,
            subscribes_per_second: w.subscribes_per_second,
            subscribe_burst: w.subscribe_burst,
            clients: std::sync::Arc::clone(clients),
        }
    }

    pub fn publish_rates(&self) -> herald_api::rate::PublishRates {
        herald_api::rate::PublishRates {
            per_app: herald_api::rate::Rate {
                per_second: self.api.publish_per_second_per_app,
                burst: self.api.publish_burst_per_app,
            },
        }
    }

    pub fn auth_failure_rates(&self) -> herald_api::rate::AuthFailureRates {
        herald_api::rate::AuthFailureRates {
            per_ip: herald_api::rate::Rate {
                per_second: self.api.auth_failures_per_second_per_ip,
                burst: self.api.auth_failure_burst_per_ip,
            },
        }
    }

    pub fn ingest_rates(&self) -> herald_api::rate::IngestRates {
        let i = &self.ingest;
        herald_api::rate::IngestRates {
            per_ip: herald_api::rate::Rate {
                per_second: i.requests_per_second_per_ip,
                burst: i.request_burst_per_ip,
            },
            per_source: herald_api::rate::Rate {
                per_second: i.requests_per_second_per_source,
                burst: i.request_burst_per_source,
            },
        }
    }

    pub fn socketio_config(
        &self,
        clients: &std::sync::Arc<herald_channels::limits::ClientLimiter>,
    ) -> herald_socketio::SocketIoConfig {
        let s = &self.socketio;
        herald_socketio::SocketIoConfig {
            max_payload_bytes: s.max_payload_bytes,
            ping_interval: Duration::from_millis(s.ping_interval_ms),
            ping_timeout: Duration::from_millis(s.ping_timeout_ms),
            max_connections_per_app: s.max_connections_per_app,
            max_rooms_per_socket: s.max_rooms_per_socket,
            max_event_bytes: s.max_event_bytes,
            joins_per_second: s.joins_per_second,
            join_burst: s.join_burst,
            max_presence_members: self.ws.max_presence_members,
            max_user_info_bytes: self.ws.max_user_info_bytes,
            events_per_second: s.events_per_second,
            event_burst: s.event_burst,
            outbox_frames: s.outbox_frames,
            clients: std::sync::Arc::clone(clients),
            ..herald_socketio::SocketIoConfig::default()
        }
    }

    pub fn history_config(&self) -> herald_channels::history::HistoryConfig {
        herald_channels::history::HistoryConfig {
            default_rules: self.history.rules.iter().map(Into::into).collect(),
            max_replay: self.history.max_replay,
        }
    }

    pub fn sse_config(
        &self,
        clients: &std::sync::Arc<herald_channels::limits::ClientLimiter>,
    ) -> herald_api::sse::SseConfig {
        herald_api::sse::SseConfig {
            keepalive: Duration::from_secs(self.history.sse_keepalive_secs),
            outbox_frames: self.ws.outbox_frames,
            max_connections_per_app: self.ws.max_connections_per_app,
            clients: std::sync::Arc::clone(clients),
        }
    }

    /// The certificate and key the main listener serves, when TLS is on.
    pub fn tls_files(&self) -> Option<crate::tls::CertificateFiles> {
        match (&self.tls.cert, &self.tls.key) {
            (Some(cert), Some(key)) => Some(crate::tls::CertificateFiles {
                cert: cert.clone(),
                key: key.clone(),
            }),
            _ => None,
        }
    }

    /// Upper bounds on every time and count that becomes a `Duration`, an instant, a date or a
    /// semaphore: past them the arithmetic overflows (a panic after the banner, or in a task
    /// that then stops for good) rather than meaning "forever". A billion seconds is 31 years.
    fn bounds_check(&self) -> Result<(), ConfigError> {
        const MAX_SECS: f64 = 1e9;
        const MAX_MS: f64 = 1e12;
        let d = &self.delivery;
        let r = &self.retention;
        let l = &self.listener;
        let fractional = [
            ("shutdown_grace_secs", self.shutdown_grace_secs),
            ("delivery.request_timeout_secs", d.request_timeout_secs),
            ("delivery.connect_timeout_secs", d.connect_timeout_secs),
            ("delivery.disable_after_secs", d.disable_after_secs),
            ("delivery.overload_penalty_secs", d.overload_penalty_secs),
            ("delivery.retry_after_max_secs", d.retry_after_max_secs),
            ("retention.sweep_interval_secs", r.sweep_interval_secs),
            (
                "listener.header_read_timeout_secs",
                l.header_read_timeout_secs,
            ),
            ("listener.body_read_timeout_secs", l.body_read_timeout_secs),
            ("listener.write_timeout_secs", l.write_timeout_secs),
        ]
        .into_iter()
        .chain(
            d.retry_schedule_secs
                .iter()
                .map(|&s| ("delivery.retry_schedule_secs", s)),
        );
        let whole = [
            ("ws.activity_timeout_secs", self.ws.activity_timeout_secs),
            ("ws.pong_timeout_secs", self.ws.pong_timeout_secs),
            (
                "history.sse_keepalive_secs",
                self.history.sse_keepalive_secs,
            ),
        ];
        let millis = [
            ("tls.watch_interval_ms", self.tls.watch_interval_ms),
            ("retention.batch_pause_ms", r.batch_pause_ms),
            ("socketio.ping_interval_ms", self.socketio.ping_interval_ms),
            ("socketio.ping_timeout_ms", self.socketio.ping_timeout_ms),
            ("ws.webhook_delay_ms", self.ws.webhook_delay_ms),
        ];
        // Every setting with its largest value and unit; whole numbers compared as f64, which
        // holds each bound exactly.
        let bounded = fractional
            .map(|(name, value)| (name, value, MAX_SECS, "seconds"))
            .chain(whole.map(|(name, value)| (name, value as f64, MAX_SECS, "seconds")))
            .chain(millis.map(|(name, value)| (name, value as f64, MAX_MS, "milliseconds")));
        for (name, value, max, unit) in bounded {
            if value > max {
                return Err(ConfigError::Invalid(format!(
                    "{name} ({value}) must be at most {max:e} {unit}"
                )));
            }
        }
        // A retention day is a day or shorter (tests and soaks shorten it), and a century of
        // days is the longest anything is kept, as the API's `payloadDays` allows.
        if r.day_secs > 86_400.0 {
            return Err(ConfigError::Invalid(format!(
                "retention.day_secs ({}) must be at most 86400",
                r.day_secs
            )));
        }
        for (name, days) in [
            ("retention.payload_days", r.payload_days),
            ("retention.attempt_days", r.attempt_days),
            ("retention.ingest_days", r.ingest_days),
        ] {
            if days > MAX_RETENTION_DAYS {
                return Err(ConfigError::Invalid(format!(
                    "{name} ({days}) must be at most {MAX_RETENTION_DAYS} (a century)"
                )));
            }
        }
        // Both become semaphores' permits (Socket.IO's send buffer is a bounded channel), which
        // panic past this at every connection.
        for (name, value) in [
            ("listener.max_connections", l.max_connections),
            ("socketio.outbox_frames", self.socketio.outbox_frames),
        ] {
            if value > tokio::sync::Semaphore::MAX_PERMITS {
                return Err(ConfigError::Invalid(format!(
                    "{name} ({value}) must be at most {}",
                    tokio::sync::Semaphore::MAX_PERMITS
                )));
            }
        }
        // engine.io-client arms one timer of pingInterval + pingTimeout, and browsers and Node
        // fire a timer past 2^31 - 1 ms at once: every client would time out after its
        // handshake and reconnect in a loop.
        const MAX_CLIENT_TIMER_MS: u64 = i32::MAX as u64;
        let socketio = &self.socketio;
        if socketio
            .ping_interval_ms
            .saturating_add(socketio.ping_timeout_ms)
            > MAX_CLIENT_TIMER_MS
        {
            return Err(ConfigError::Invalid(format!(
                "socketio.ping_interval_ms + socketio.ping_timeout_ms ({} + {}) must be at most {MAX_CLIENT_TIMER_MS} (about 24.8 days): Socket.IO clients time out at once past it",
                socketio.ping_interval_ms, socketio.ping_timeout_ms
            )));
        }
        Ok(())
    }

    /// How long a node lives without a heartbeat (see [`ClusterSection`]).
    /// The `[retention]` values that make no sense, named.
    fn retention_check(&self) -> Result<(), ConfigError> {
        let r = &self.retention;
        let invalid = |message: String| Err(ConfigError::Invalid(message));
        if r.payload_days == 0 || r.attempt_days == 0 {
            return invalid(
                "retention.payload_days and retention.attempt_days must be at least 1".into(),
            );
        }
        if r.ingest_days < 3 {
            return invalid(format!(
                "retention.ingest_days ({}) must be at least 3: received requests keep the delivery ids that recognise a provider's retries, and Stripe retries for 3 days",
                r.ingest_days
            ));
        }
        // At least a millisecond: a smaller one is a zero `Duration`, which made every day end
        // at once (everything deleted at each sweep) or the sweeper loop without a pause.
        if !(r.sweep_interval_secs.is_finite() && r.sweep_interval_secs >= 0.001) {
            return invalid(
                "retention.sweep_interval_secs must be a number of seconds, at least 0.001".into(),
            );
        }
        if !(r.day_secs.is_finite() && r.day_secs >= 0.001) {
            return invalid(
                "retention.day_secs must be a number of seconds, at least 0.001 (86400)".into(),
            );
        }
        if r.batch_size == 0 {
            return invalid("retention.batch_size must be at least 1".into());
        }
        Ok(())
    }

    /// The sweeper's settings (`[retention]`).
    pub fn retention(&self) -> crate::retention::Retention {
        let r = &self.retention;
        crate::retention::Retention {
            day: Duration::from_secs_f64(r.day_secs),
            payload_days: r.payload_days,
            attempt_days: r.attempt_days,
            ingest_days: r.ingest_days,
            sweep_every: Duration::from_secs_f64(r.sweep_interval_secs),
            batch: r.batch_size,
            pause: Duration::from_millis(r.batch_pause_ms),
        }
    }

    pub fn node_ttl(&self) -> Duration {
        Duration::from_secs(self.cluster.node_ttl_secs)
    }

    pub fn channel_webhook_config(&self) -> ChannelWebhookConfig {
        ChannelWebhookConfig {
            delay: Duration::from_millis(self.ws.webhook_delay_ms),
            max_pending: self.ws.webhook_max_pending,
        }
    }

    pub fn delivery_config(&self) -> DeliveryConfig {
        let d = &self.delivery;
        let secs = Duration::from_secs_f64;
        DeliveryConfig {
            retry: RetryPolicy {
                schedule: d.retry_schedule_secs.iter().copied().map(secs).collect(),
                jitter: d.retry_jitter,
                overload_penalty: secs(d.overload_penalty_secs),
                retry_after_max: secs(d.retry_after_max_secs),
                disable_after: secs(d.disable_after_secs),
            },
            addresses: AddressPolicy {
                allow_private: d.allow_private_targets,
                allowed_subnets: d.allowed_subnets.clone(),
            },
            request_timeout: secs(d.request_timeout_secs),
            connect_timeout: secs(d.connect_timeout_secs),
            max_in_flight: d.max_in_flight,
            max_retries_in_flight: d.max_retries_in_flight,
            per_endpoint_in_flight: d.per_endpoint_in_flight,
            per_app_in_flight: d.per_app_in_flight,
            max_response_bytes: d.max_response_bytes,
            shutdown_grace: secs(self.shutdown_grace_secs),
        }
    }
}

#[cfg(test)]
// figment::Jail's closures must return figment's (large) error type.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn flags_beat_env_beat_file_beat_defaults() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "herald.toml",
                r#"
                listen = "127.0.0.1:7000"
                data_dir = "from-file"
                admin_token = "file-admin-token-0123"
                [delivery]
                request_timeout_secs = 3
                retry_schedule_secs = [1, 2]
                "#,
            )?;
            jail.set_env("HERALD_DATA_DIR", "from-env");
            jail.set_env("HERALD_DELIVERY__REQUEST_TIMEOUT_SECS", "7");
            jail.set_env("HERALD_LOG", "debug");
            let overrides = Overrides {
                listen: Some("127.0.0.1:7100".parse().expect("addr")),
                ..Overrides::default()
            };
            let config = Config::load(Some(Path::new("herald.toml")), &overrides)
                .map_err(|e| e.to_string())?;
            assert_eq!(config.listen.port(), 7100, "flag wins");
            assert_eq!(config.data_dir, PathBuf::from("from-env"), "env beats file");
            assert_eq!(config.delivery.request_timeout_secs, 7.0);
            assert_eq!(
                config.delivery.retry_schedule_secs,
                [1.0, 2.0],
                "file beats default"
            );
            assert_eq!(config.admin_token.as_deref(), Some("file-admin-token-0123"));
            assert_eq!(config.delivery.max_in_flight, 256, "default");
            assert!(!config.delivery.allow_private_targets);
            Ok(())
        });
    }

    #[test]
    fn retention_is_read_from_env_and_too_short_a_dedup_window_is_refused() {
        figment::Jail::expect_with(|jail| {
            let load = || Config::load(None, &Overrides::default()).map_err(|e| e.to_string());
            let defaults = load()?.retention();
            assert_eq!(defaults.day, Duration::from_secs(86_400));
            assert_eq!(defaults.payload_days, 30);
            assert_eq!(defaults.attempt_days, 90);
            assert_eq!(defaults.ingest_days, 30);
            jail.set_env("HERALD_RETENTION__PAYLOAD_DAYS", "7");
            jail.set_env("HERALD_RETENTION__SWEEP_INTERVAL_SECS", "0.5");
            let retention = load()?.retention();
            assert_eq!(retention.payload_days, 7);
            assert_eq!(retention.sweep_every, Duration::from_millis(500));
            jail.set_env("HERALD_RETENTION__INGEST_DAYS", "2");
            let err = load().expect_err("under Stripe's retry window");
            assert!(err.contains("retention.ingest_days"), "{err}");
            Ok(())
        });
    }

    /// Each of these once passed `validate` and then panicked: at start-up after the banner
    /// (`Duration::from_secs_f64`), in the dispatcher's claim loop or an attempt's retry date
    /// (`now + lease`, `now + delay`), in the retention sweeper (`now - days`), or in tokio's
    /// semaphore. Each is now refused by name, and the largest allowed value still loads.
    #[test]
    fn times_and_counts_past_what_the_arithmetic_holds_are_refused_by_name() {
        figment::Jail::expect_with(|jail| {
            let load = || Config::load(None, &Overrides::default()).map_err(|e| e.to_string());
            let too_large = [
                (
                    "HERALD_SHUTDOWN_GRACE_SECS",
                    "100000000000000000000.0",
                    "shutdown_grace_secs",
                ),
                (
                    "HERALD_DELIVERY__RETRY_AFTER_MAX_SECS",
                    "10000000000000.0",
                    "delivery.retry_after_max_secs",
                ),
                (
                    "HERALD_DELIVERY__REQUEST_TIMEOUT_SECS",
                    "10000000000000.0",
                    "delivery.request_timeout_secs",
                ),
                (
                    "HERALD_DELIVERY__RETRY_SCHEDULE_SECS",
                    "[5, 10000000000000000000.0]",
                    "delivery.retry_schedule_secs",
                ),
                (
                    "HERALD_RETENTION__INGEST_DAYS",
                    "4294967295",
                    "retention.ingest_days",
                ),
                (
                    "HERALD_RETENTION__ATTEMPT_DAYS",
                    "999999999",
                    "retention.attempt_days",
                ),
                (
                    "HERALD_RETENTION__DAY_SECS",
                    "100000.0",
                    "retention.day_secs",
                ),
                (
                    "HERALD_WS__ACTIVITY_TIMEOUT_SECS",
                    "18446744073709551615",
                    "ws.activity_timeout_secs",
                ),
                (
                    "HERALD_LISTENER__MAX_CONNECTIONS",
                    "18446744073709551615",
                    "listener.max_connections",
                ),
                (
                    "HERALD_SOCKETIO__OUTBOX_FRAMES",
                    "18446744073709551615",
                    "socketio.outbox_frames",
                ),
                (
                    "HERALD_SOCKETIO__PING_INTERVAL_MS",
                    "2147480000",
                    "socketio.ping_interval_ms + socketio.ping_timeout_ms",
                ),
                (
                    "HERALD_RETENTION__DAY_SECS",
                    "0.0000000001",
                    "retention.day_secs",
                ),
                (
                    "HERALD_RETENTION__SWEEP_INTERVAL_SECS",
                    "0.0000000001",
                    "retention.sweep_interval_secs",
                ),
            ];
            for (variable, value, named) in too_large {
                jail.set_env(variable, value);
                let err = load().expect_err(variable);
                assert!(err.contains(named), "{variable}={value}: {err}");
                jail.clear_env();
            }
            for variable in [
                "HERALD_WS__MAX_CONNECTIONS_PER_APP",
                "HERALD_WS__MAX_CHANNELS_PER_CONNECTION",
                "HERALD_SOCKETIO__MAX_CONNECTIONS_PER_APP",
                "HERALD_API__MAX_BODY_BYTES",
            ] {
                jail.set_env(variable, "0");
                let err = load().expect_err(variable);
                assert!(err.contains("must be at least 1"), "{variable}: {err}");
                jail.clear_env();
            }
            jail.set_env("HERALD_SHUTDOWN_GRACE_SECS", "1000000000.0");
            jail.set_env("HERALD_RETENTION__INGEST_DAYS", "36500");
            let config = load()?;
            // What panicked before: every duration built, every date computed.
            let delivery = config.delivery_config();
            assert_eq!(delivery.shutdown_grace, Duration::from_secs(1_000_000_000));
            let now = chrono::Utc::now();
            assert!(config.retention().days_before(now, 36_500) < now);
            Ok(())
        });
    }

    /// The store's and the broker's URLs show in the configuration's `Debug` without their
    /// passwords, as in every log line that names them.
    #[test]
    fn the_configurations_debug_leaves_out_url_passwords() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("HERALD_STORE__URL", "postgres://u:store-password@db/herald");
            jail.set_env("HERALD_BROKER__URL", "redis://:broker-password@cache:6379");
            let config = Config::load(None, &Overrides::default()).map_err(|e| e.to_string())?;
            let debug = format!("{config:?}");
            assert!(!debug.contains("store-password"), "{debug}");
            assert!(!debug.contains("broker-password"), "{debug}");
            assert!(
                debug.contains("postgres://db/herald"),
                "the server shows: {debug}"
            );
            assert!(
                debug.contains("redis://cache:6379"),
                "the server shows: {debug}"
            );
            Ok(())
        });
    }

    /// A secret file's trailing newline is refused at start, not found at the first admin call.
    #[test]
    fn an_admin_token_no_header_can_carry_is_refused() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("HERALD_ADMIN_TOKEN", "0123456789abcdef\n");
            let err = Config::load(None, &Overrides::default())
                .map(|_| ())
                .expect_err("a trailing newline");
            assert!(err.to_string().contains("trailing newline"), "{err}");
            Ok(())
        });
    }

    /// A token of digits is a token, not a number figment refuses (and quotes in its error,
    /// printed at start); a directory named like a year is a directory.
    #[test]
    fn text_settings_given_as_digits_stay_text() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("HERALD_ADMIN_TOKEN", "1234567890123456");
            jail.set_env("HERALD_DATA_DIR", "2024");
            jail.set_env("HERALD_BROKER__TOPIC", "1");
            let config = Config::load(None, &Overrides::default()).map_err(|e| e.to_string())?;
            assert_eq!(config.admin_token.as_deref(), Some("1234567890123456"));
            assert_eq!(config.data_dir, PathBuf::from("2024"));
            assert_eq!(config.broker.topic, "1");
            Ok(())
        });
    }

    #[test]
    fn dev_allows_private_targets_and_bad_values_are_refused() {
        figment::Jail::expect_with(|jail| {
            let dev = Overrides {
                dev: Some(true),
                ..Overrides::default()
            };
            let config = Config::load(None, &dev).map_err(|e| e.to_string())?;
            assert!(config.delivery.allow_private_targets);

            jail.set_env("HERALD_DELIVERY__RETRY_JITTER", "1.5");
            let err = Config::load(None, &Overrides::default()).expect_err("jitter out of range");
            assert!(err.to_string().contains("retry_jitter"), "{err}");

            jail.set_env("HERALD_DELIVERY__RETRY_JITTER", "0.2");
            // A body the API takes must fit in the listener's reading budget.
            jail.set_env("HERALD_LISTENER__MAX_BODY_BYTES_READING", "1000");
            let err = Config::load(None, &Overrides::default()).expect_err("budget below a body");
            assert!(
                err.to_string().contains(
                    "listener.max_body_bytes_reading (1000) must be at least api.max_body_bytes"
                ),
                "{err}"
            );
            jail.set_env("HERALD_API__MAX_BODY_BYTES", "1000");
            Config::load(None, &Overrides::default()).map_err(|e| e.to_string())?;
            // One address's share is raised to two bodies the API takes, so that a body
            // over the size limit is told 413, not 429 for the share it would take.
            jail.set_env("HERALD_LISTENER__MAX_BODY_BYTES_READING_PER_IP", "999");
            let config = Config::load(None, &Overrides::default()).map_err(|e| e.to_string())?;
            assert_eq!(config.listener_limits().max_body_bytes_reading_per_ip, 2000);
            jail.set_env("HERALD_LISTENER__MAX_BODY_BYTES_READING_PER_IP", "0");
            let config = Config::load(None, &Overrides::default()).map_err(|e| e.to_string())?;
            assert_eq!(config.listener_limits().max_body_bytes_reading_per_ip, 0);
            jail.create_file("typo.toml", "listn = \"127.0.0.1:7000\"")?;
            let err = Config::load(Some(Path::new("typo.toml")), &Overrides::default())
                .expect_err("unknown key in the file");
            assert!(err.to_string().contains("listn"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn tls_takes_a_cert_and_a_key_together_from_env_or_file() {
        figment::Jail::expect_with(|jail| {
            let load = || Config::load(None, &Overrides::default()).map_err(|e| e.to_string());
            let config = load()?;
            assert_eq!(config.tls_files(), None, "plain HTTP by default");
            assert_eq!(config.tls.watch_interval_ms, 2000);

            jail.set_env("HERALD_TLS__CERT", "/etc/herald/cert.pem");
            let refused = load().expect_err("a cert without its key");
            assert!(refused.contains("tls.key"), "{refused}");
            jail.set_env("HERALD_TLS__KEY", "/etc/herald/key.pem");
            jail.set_env("HERALD_TLS__WATCH_INTERVAL_MS", "500");
            jail.set_env("HERALD_TLS__HEALTH_LISTEN", "127.0.0.1:6002");
            let config = load()?;
            assert_eq!(
                config.tls_files(),
                Some(crate::tls::CertificateFiles {
                    cert: "/etc/herald/cert.pem".into(),
                    key: "/etc/herald/key.pem".into(),
                })
            );
            assert_eq!(config.tls.watch_interval_ms, 500);
            assert_eq!(
                config.tls.health_listen,
                Some("127.0.0.1:6002".parse().expect("addr"))
            );
            jail.set_env("HERALD_TLS__CERT", "");
            jail.set_env("HERALD_TLS__KEY", "");
            assert_eq!(load()?.tls_files(), None, "empty is unset");

            jail.clear_env();
            jail.create_file(
                "herald.toml",
                "[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\nwatch_interval_ms = 0\n",
            )?;
            let config = Config::load(Some(Path::new("herald.toml")), &Overrides::default())
                .map_err(|e| e.to_string())?;
            assert_eq!(
                config.tls_files().map(|f| (f.cert, f.key)),
                Some(("c.pem".into(), "k.pem".into()))
            );
            jail.create_file("typo.toml", "[tls]\ncertificate = \"c.pem\"\n")?;
            let err = Config::load(Some(Path::new("typo.toml")), &Overrides::default())
                .expect_err("an unknown tls key");
            assert!(err.to_string().contains("certificate"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn a_broker_needs_the_postgresql_store_and_a_plain_topic() {
        figment::Jail::expect_with(|jail| {
            let load = || Config::load(None, &Overrides::default()).map_err(|e| e.to_string());
            jail.set_env("HERALD_BROKER__URL", "redis://:hunter2@127.0.0.1:6379");
            let refused = load().expect_err("SQLite has one node");
            assert!(
                refused.contains("set store.url to postgres://"),
                "{refused}"
            );
            assert!(!refused.contains("hunter2"), "{refused}");

            jail.set_env("HERALD_BROKER__URL", "");
            assert_eq!(load()?.broker.url, None, "empty is unset");

            jail.set_env("HERALD_BROKER__URL", "redis://:hunter2@127.0.0.1:6379");
            jail.set_env("HERALD_STORE__URL", "postgres://h:h@127.0.0.1/h");
            let config = load()?;
            assert_eq!(config.broker.topic, "herald.publications");
            jail.set_env("HERALD_BROKER__TOPIC", "herald.>");
            let refused = load().expect_err("a wildcard would hear other clusters");
            assert!(refused.contains("broker.topic"), "{refused}");
            Ok(())
        });
    }

    #[test]
    fn store_url_defaults_to_sqlite_in_data_dir_and_names_postgres() {
        use crate::store::StoreConfig;
        figment::Jail::expect_with(|jail| {
            let load = |overrides: &Overrides| {
                Config::load(None, overrides)
                    .and_then(|c| c.store_config())
                    .map_err(|e| e.to_string())
            };
            let data = Overrides {
                data_dir: Some("from-flag".into()),
                ..Overrides::default()
            };
            assert_eq!(
                load(&Overrides::default())?,
                StoreConfig::Sqlite {
                    dir: "herald-data".into()
                },
                "unset: SQLite in the default data_dir"
            );
            assert_eq!(
                load(&data)?,
                StoreConfig::Sqlite {
                    dir: "from-flag".into()
                },
                "--data still chooses the directory"
            );

            jail.set_env("HERALD_STORE__URL", "sqlite://from-env");
            assert_eq!(
                load(&data)?,
                StoreConfig::Sqlite {
                    dir: "from-env".into()
                },
                "store.url wins over data_dir"
            );
            jail.set_env("HERALD_STORE__URL", "sqlite:/abs/dir");
            assert_eq!(
                load(&Overrides::default())?,
                StoreConfig::Sqlite {
                    dir: "/abs/dir".into()
                }
            );

            jail.set_env("HERALD_STORE__URL", "postgres://herald:pw@db/herald");
            assert_eq!(
                load(&Overrides::default())?,
                StoreConfig::Postgres {
                    url: "postgres://herald:pw@db/herald".into(),
                    max_connections: 16,
                },
                "the default pool"
            );
            jail.set_env("HERALD_STORE__MAX_CONNECTIONS", "4");
            assert_eq!(
                load(&Overrides::default())?,
                StoreConfig::Postgres {
                    url: "postgres://herald:pw@db/herald".into(),
                    max_connections: 4,
                },
                "store.max_connections sizes the pool"
            );
            jail.set_env("HERALD_STORE__MAX_CONNECTIONS", "1");
            let err = load(&Overrides::default()).expect_err("LISTEN would hold the only one");
            assert!(err.contains("at least 2 with PostgreSQL"), "{err}");
            jail.set_env("HERALD_STORE__MAX_CONNECTIONS", "0");
            let err = load(&Overrides::default()).expect_err("an empty pool");
            assert!(
                err.contains("store.max_connections") && !err.contains("pw@"),
                "{err}"
            );
            jail.set_env("HERALD_STORE__URL", "mysql://herald:pw@db/herald");
            jail.set_env("HERALD_STORE__MAX_CONNECTIONS", "4");
            let err = load(&Overrides::default()).expect_err("mysql is refused");
            assert!(
                err.contains("sqlite") && err.contains("postgres") && !err.contains("pw@"),
                "{err}"
            );
            jail.set_env("HERALD_STORE__URL", "sqlite://x");
            jail.set_env("HERALD_STORE__POOL_SIZE", "4");
            let err = load(&Overrides::default()).expect_err("an unknown key");
            assert!(err.contains("pool_size"), "{err}");

            jail.clear_env();
            jail.create_file("herald.toml", "[store]\nurl = \"sqlite:from-file\"\n")?;
            let config = Config::load(Some(Path::new("herald.toml")), &Overrides::default())
                .and_then(|c| c.store_config())
                .map_err(|e| e.to_string())?;
            assert_eq!(
                config,
                StoreConfig::Sqlite {
                    dir: "from-file".into()
                }
            );
            Ok(())
        });
    }

    #[test]
    fn main_keys_come_from_env_or_file_and_are_never_shown() {
        use herald_store::secrets::MainKey;
        let (a, b, c) = (
            MainKey::generate(),
            MainKey::generate(),
            MainKey::generate(),
        );
        figment::Jail::expect_with(|jail| {
            let load = || Config::load(None, &Overrides::default()).map_err(|e| e.to_string());
            assert!(load()?.main_keys().map_err(|e| e.to_string())?.is_none());
            // Set but empty (a compose file's `${MAIN_KEY}` unset) is no key, for every reader.
            jail.set_env("HERALD_MAIN_KEY", " ");
            assert!(load()?.main_key.is_none(), "a blank main_key is none");
            jail.set_env("HERALD_MAIN_KEY", a.to_base64());
            jail.set_env(
                "HERALD_PREVIOUS_MAIN_KEYS",
                format!("{}, {}", b.to_base64(), c.to_base64()),
            );
            jail.set_env("HERALD_ADMIN_TOKEN", "env-admin-token-0123");
            let config = load()?;
            let keys = config
                .main_keys()
                .map_err(|e| e.to_string())?
                .expect("configured");
            assert_eq!(
                keys.key_ids().collect::<Vec<_>>(),
                [a.id(), b.id(), c.id()],
                "main first, then the previous ones in order"
            );
            let debug = format!("{config:?}");
            for secret in [a.to_base64(), b.to_base64(), "env-admin-token-0123".into()] {
                assert!(!debug.contains(&secret), "{debug}");
            }

            jail.set_env("HERALD_MAIN_KEY", "dG9vIHNob3J0");
            let refused = load().expect_err("a short key");
            assert!(
                refused.contains("main_key") && refused.contains("32 random bytes"),
                "{refused}"
            );
            assert!(!refused.contains("dG9vIHNob3J0"), "{refused}");
            jail.set_env("HERALD_MAIN_KEY", "");
            let refused = load().expect_err("previous keys without a main key");
            assert!(refused.contains("without main_key"), "{refused}");

            jail.clear_env();
            jail.create_file(
                "keys.toml",
                &format!(
                    "main_key = \"{}\"\nprevious_main_keys = [\"{}\"]\n",
                    b.to_base64(),
                    a.to_base64()
                ),
            )?;
            let config = Config::load(Some(Path::new("keys.toml")), &Overrides::default())
                .map_err(|e| e.to_string())?;
            let keys = config.main_keys().map_err(|e| e.to_string())?;
            assert_eq!(
                keys.map(|k| k.key_ids().map(str::to_owned).collect::<Vec<_>>()),
                Some(vec![b.id(), a.id()])
            );
            Ok(())
        });
    }

    #[test]
    fn env_variables_are_read_for_known_keys_only() {
        let keys = EnvKeys::of_config().expect("the defaults serialize");
        let key = |name: &str| keys.key(name);
        assert_eq!(key("DATA_DIR").as_deref(), Some("data_dir"));
        assert_eq!(
            key("ADMIN_TOKEN").as_deref(),
            Some("admin_token"),
            "None by default"
        );
        assert_eq!(
            key("DELIVERY__REQUEST_TIMEOUT_SECS").as_deref(),
            Some("delivery.request_timeout_secs")
        );
        assert_eq!(
            key("delivery__requst_timeout_secs").as_deref(),
            Some("delivery.requst_timeout_secs"),
            "any field of a known section goes on, to be refused by name"
        );
        for other in [
            "TOKEN",
            "URL",
            "LOG",
            "LISTN",
            "DELIVRY__REQUEST_TIMEOUT_SECS",
            "DEV__X",
        ] {
            assert_eq!(key(other), None, "{other}");
        }
    }

    #[test]
    fn herald_variables_that_are_not_keys_do_not_stop_the_server() {
        figment::Jail::expect_with(|jail| {
            // A client's variables, the log filter, a misspelt top-level key and an unknown
            // section: none is configuration, none is an error.
            jail.set_env("HERALD_TOKEN", "sk_live_0123456789abcdef");
            jail.set_env("HERALD_URL", "https://herald.example");
            jail.set_env("HERALD_LOG", "debug");
            jail.set_env("HERALD_LISTN", "typo");
            jail.set_env("HERALD_CLIENT__PROFILE", "prod");
            jail.set_env("HERALD_ADMIN_TOKEN", "env-admin-token-0123");
            jail.set_env("HERALD_WS__TRUSTED_PROXIES", "[\"10.0.0.0/8\"]");
            let config = Config::load(None, &Overrides::default()).map_err(|e| e.to_string())?;
            assert_eq!(config.admin_token.as_deref(), Some("env-admin-token-0123"));
            assert_eq!(
                config.ws.trusted_proxies.len(),
                1,
                "known keys are still read"
            );
            assert_eq!(config.listen.to_string(), DEFAULT_LISTEN);

            let ignored = EnvKeys::of_config().map_err(|e| e.to_string())?.ignored();
            for name in ["HERALD_CLIENT__PROFILE", "HERALD_LISTN"] {
                assert!(ignored.iter().any(|i| i == name), "{name} in {ignored:?}");
            }
            // The CLI's own variables are not configuration, and no mistake either.
            for read in [
                "HERALD_TOKEN",
                "HERALD_URL",
                "HERALD_LOG",
                "HERALD_ADMIN_TOKEN",
                "HERALD_WS__TRUSTED_PROXIES",
            ] {
                assert!(!ignored.iter().any(|i| i == read), "{read} in {ignored:?}");
            }
            Ok(())
        });
    }

    #[test]
    fn a_misspelt_field_of_a_known_section_is_refused_by_name() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("herald.toml", "[delivery]\nrequst_timeout_secs = 30\n")?;
            let err = Config::load(Some(Path::new("herald.toml")), &Overrides::default())
                .expect_err("typo in the file");
            assert!(err.to_string().contains("requst_timeout_secs"), "{err}");

            jail.set_env("HERALD_DELIVERY__REQUST_TIMEOUT_SECS", "30");
            let err = Config::load(None, &Overrides::default()).expect_err("typo in a section");
            let err = err.to_string();
            assert!(err.contains("requst_timeout_secs"), "{err}");
            assert!(err.contains("HERALD_"), "says where it came from: {err}");
            Ok(())
        });
    }

    #[test]
    fn dev_refuses_non_loopback_addresses_unless_forced() {
        figment::Jail::expect_with(|_| {
            let exposed = Overrides {
                dev: Some(true),
                listen: Some("0.0.0.0:6001".parse().expect("addr")),
                ..Overrides::default()
            };
            let err = Config::load(None, &exposed).expect_err("dev on 0.0.0.0");
            assert!(err.to_string().contains("--dev-allow-remote"), "{err}");
            let forced = Overrides {
                dev_allow_remote: Some(true),
                ..exposed
            };
            Config::load(None, &forced).map_err(|e| e.to_string())?;
            let loopback_v6 = Overrides {
                dev: Some(true),
                listen: Some("[::1]:6001".parse().expect("addr")),
                ..Overrides::default()
            };
            Config::load(None, &loopback_v6).map_err(|e| e.to_string())?;
            Ok(())
        });
    }

    #[test]
    fn history_rules_are_read_by_their_names_and_unknown_fields_are_refused() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "rules.toml",
                r#"
                [[history.rules]]
                pattern = "chat-*"
                maxEvents = 50
                maxAgeSecs = 600
                "#,
            )?;
            let config = Config::load(Some(Path::new("rules.toml")), &Overrides::default())
                .map_err(|e| e.to_string())?;
            let rules = config.history_config().default_rules;
            assert_eq!(
                rules,
                [herald_core::history::HistoryRule {
                    pattern: "chat-*".into(),
                    max_events: 50,
                    max_age_secs: 600,
                }]
            );
            jail.create_file(
                "typo.toml",
                r#"
                [[history.rules]]
                pattern = "chat-*"
                maxEvents = 50
                maxAgeSecs = 600
                maxBytes = 1
                "#,
            )?;
            let err = Config::load(Some(Path::new("typo.toml")), &Overrides::default())
                .expect_err("unknown field in a history rule");
            assert!(err.to_string().contains("maxBytes"), "{err}");
            Ok(())
        });
    }
}
