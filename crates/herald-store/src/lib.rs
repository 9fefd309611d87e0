//! Herald's durable state behind one trait, cut by role.
//!
//! [`Store`] is everything the API and the delivery worker need to remember. It is the sum of
//! sub-traits, one per role: [`AppStore`] (apps and their Pusher credentials), [`TokenStore`],
//! [`EventTypeStore`], [`EndpointStore`], [`MessageStore`] (messages, publications and the
//! delivery queue), [`AttemptStore`] (the attempt log and delivery states), [`HistoryStore`]
//! (channel history and positions), [`IngestStore`] (sources and received requests),
//! [`IdempotencyStore`], [`ChannelWebhookStore`] (channel webhook messages and occupancy) and
//! [`StoreLifecycle`] (`close`). A type that implements them all is a `Store` by a blanket
//! impl; [`prelude`] brings every trait into scope for calls on a concrete store.
//!
//! [`sqlite::SqliteStore`] is the embedded implementation; [`postgres::PostgresStore`], the
//! store several nodes share, sits beside it with its own migrations (issue 11: its sub-traits
//! are being filled in). Both must pass the behaviour checks in `conformance` (compiled for
//! tests and with the `conformance` feature).

use bytes::Bytes;
use chrono::{DateTime, Utc};
use herald_core::history::{ChannelPosition, HistoryEntry, NewHistoryEntry, Position};
use herald_core::id::{AppId, EndpointId, MessageId, SourceId, TokenId};
use herald_core::model::{
    App, Attempt, DeliveryStatus, Endpoint, EndpointStats, EventType, IngestEvent, IngestSource,
    Message, TriggerType,
};

mod cache;
mod clock;
#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
pub mod postgres;
pub mod secrets;
mod sql;
pub mod sqlite;

pub use cache::Cache;
pub use clock::ClusterClock;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A unique key is taken (an app or endpoint `uid`, a message `eventId`, an event type name).
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("not found")]
    NotFound,
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// From the SQLite group commit, which runs its statements through rusqlite
    /// (`sqlite/batch/locked.rs`).
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("the store is shutting down")]
    Closed,
    #[error("batched write failed: {0}")]
    Batch(String),
    #[error("cannot prepare the data directory: {0}")]
    Io(#[from] std::io::Error),
    /// A stored secret could not be decrypted (a key missing from the configuration, an
    /// altered value), or the store holds secrets under keys this process lacks.
    #[error("stored secret: {0}")]
    Secret(#[from] secrets::SecretError),
}

/// What `herald doctor` learns of a store without changing it: whether its schema is
/// Herald's current one, and the database server's clock where there is one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspection {
    /// Migrations applied to the store (0 for a store not created yet).
    pub applied_migrations: usize,
    /// Migrations this build of Herald knows.
    pub known_migrations: usize,
    /// The database server's clock (PostgreSQL); SQLite has none of its own.
    pub server_time: Option<chrono::DateTime<chrono::Utc>>,
}

impl StoreError {
    /// The database cannot be reached (refused or lost connections, a pool that timed out, a
    /// server shutting down or not yet accepting connections), as opposed to a request it
    /// answered: the caller may retry, and nothing was stored.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Closed => true,
            Self::Database(error) => match error {
                sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed => true,
                // SQLSTATE class 08 (connection exception), 57P01-57P03 (admin or crash
                // shutdown, cannot connect now), 53300 (too many connections), 55000 at
                // connect (a database not accepting connections).
                sqlx::Error::Database(db) => db.code().is_some_and(|code| {
                    code.starts_with("08")
                        || matches!(
                            code.as_ref(),
                            "57P01" | "57P02" | "57P03" | "53300" | "55000"
                        )
                }),
                _ => false,
            },
            _ => false,
        }
    }
}

/// `e`, a create's failure under `app_id`, as the caller should see it: `NotFound` when it
/// broke a foreign key because the app was deleted since the caller looked it up (a 404, not
/// a 500 the SDKs retry into one). A foreign key broken otherwise (a message's endpoint
/// deleted meanwhile: sent again, it picks the endpoints there are now) stays the error it
/// was, and so does one whose app a node's cache still holds (its retry is told 404).
pub(crate) async fn unless_app_gone<S: AppStore + ?Sized>(
    store: &S,
    app_id: &AppId,
    e: StoreError,
) -> StoreError {
    if !e.is_foreign_key_violation() {
        return e;
    }
    match store.get_app(app_id.as_str()).await {
        Ok(None) => StoreError::NotFound,
        Ok(Some(_)) | Err(_) => e,
    }
}

/// [`unless_app_gone`] for a request recorded by an ingest source deleted since it was looked
/// up (the public route finds the source, verifies, then writes): `NotFound`, answered 404 as
/// the sender's retry will be, rather than a 500 logged as the server's fault.
pub(crate) async fn unless_source_gone<S: IngestStore + ?Sized>(
    store: &S,
    app_id: &AppId,
    source_id: &SourceId,
    e: StoreError,
) -> StoreError {
    if !e.is_foreign_key_violation() {
        return e;
    }
    match store.get_source(app_id, source_id.as_str()).await {
        Ok(None) => StoreError::NotFound,
        Ok(Some(_)) | Err(_) => e,
    }
}

impl StoreError {
    /// A write that broke a foreign key (sqlx's, or the SQLite group commit's): something it
    /// refers to was deleted since the caller read it, its app or one of its endpoints.
    pub(crate) fn is_foreign_key_violation(&self) -> bool {
        match self {
            Self::Database(sqlx::Error::Database(db)) => db.is_foreign_key_violation(),
            Self::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => {
                e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_FOREIGNKEY
            }
            _ => false,
        }
    }

    /// The database refused what was written (a constraint it breaks, a value it cannot take,
    /// data it reads as corrupt): the same write would be refused again, whenever it is tried.
    /// Timeouts, lost connections, I/O errors and conflicts between transactions are not:
    /// they may pass on the next try.
    pub fn refuses_the_data(&self) -> bool {
        use sqlx::error::ErrorKind;
        match self {
            // Not `Conflict`: some are races between transactions that pass when read again.
            Self::Corrupt(_) => true,
            Self::Database(sqlx::Error::Encode(_)) => true,
            Self::Database(sqlx::Error::Database(db)) => {
                // PostgreSQL's SQLSTATE classes 22 (data exception) and 23 (integrity
                // constraint); SQLite's codes are numbers of another scheme.
                let postgres_refused = db
                    .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                    .is_some_and(|pg| {
                        let code = pg.code();
                        code.starts_with("22") || code.starts_with("23")
                    });
                postgres_refused
                    || matches!(
                        db.kind(),
                        ErrorKind::UniqueViolation
                            | ErrorKind::ForeignKeyViolation
                            | ErrorKind::NotNullViolation
                            | ErrorKind::CheckViolation
                    )
            }
            Self::Sqlite(rusqlite::Error::SqliteFailure(error, _)) => {
                error.code == rusqlite::ErrorCode::ConstraintViolation
            }
            _ => false,
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Which deliveries an endpoint's statistics count: those of the messages created at or after
/// `since` and before `until`; every one when neither is given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatsWindow {
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
}

impl StatsWindow {
    /// The window as a range of message ids, `[from, to)`: an id starts with its time.
    pub(crate) fn message_ids(&self) -> (String, String) {
        use herald_core::id::{MESSAGE, lower_bound};
        let from = self
            .since
            .map(|at| lower_bound(MESSAGE, at))
            .unwrap_or_default();
        // After the prefix, an id holds base-62 digits only, all below `~`.
        let to = self
            .until
            .map_or_else(|| format!("{MESSAGE}~"), |at| lower_bound(MESSAGE, at));
        (from, to)
    }
}

/// What an attempt's logged response reads once expunged, as Svix's server writes it.
pub const EXPUNGED_RESPONSE: &str = "EXPUNGED";

/// How many times [`AppStore::rotate_pusher_secret`] reads the app again when another change
/// of its secret came between its read and its write.
pub const PUSHER_ROTATION_ATTEMPTS: usize = 16;

/// The `Conflict` of an [`AppStore::update_app`] whose copy is out of date.
pub const APP_CHANGED: &str = "the application changed meanwhile; read it again";

/// The `Conflict` of an [`EndpointStore::update_endpoint`] whose copy is out of date.
pub const ENDPOINT_CHANGED: &str = "the endpoint changed meanwhile; read it again";

/// The `Conflict` of an [`IngestStore::update_source`] whose copy is out of date.
pub const SOURCE_CHANGED: &str = "the source changed meanwhile; read it again";

/// A page request in Svix's style: the iterator is the last id of the previous page.
#[derive(Debug, Clone)]
pub struct Page {
    pub limit: u32,
    pub iterator: Option<String>,
    /// Newest first (messages, attempts) instead of oldest first (apps, endpoints).
    pub descending: bool,
    /// Walking back from a `prevIterator`: `descending` is already flipped for the read, and the
    /// API restores the listing's order. The store ignores this flag.
    pub backwards: bool,
}

/// Filters on messages; each one set narrows the list, and an empty query matches every
/// message.
#[derive(Debug, Clone, Default)]
pub struct MessageQuery {
    /// Only messages published to this channel.
    pub channel: Option<String>,
    /// Only messages carrying this tag.
    pub tag: Option<String>,
    /// Only messages of these event types (an empty list matches none).
    pub event_types: Option<Vec<String>>,
    /// Only messages created before this time (strictly).
    pub before: Option<DateTime<Utc>>,
    /// Only messages created after this time (strictly).
    pub after: Option<DateTime<Utc>>,
    /// No messages of this event type (an app portal link does not see the app's channel
    /// webhooks).
    pub except_event_type: Option<String>,
}

impl MessageQuery {
    /// Whether no filter is set.
    pub fn is_empty(&self) -> bool {
        self.channel.is_none()
            && self.tag.is_none()
            && self.event_types.is_none()
            && self.before.is_none()
            && self.after.is_none()
            && self.except_event_type.is_none()
    }
}

#[derive(Debug, Clone)]
pub enum AttemptScope {
    Endpoint(EndpointId),
    Message(MessageId),
}

#[derive(Debug, Clone, Default)]
pub struct AttemptQuery {
    pub status: Option<DeliveryStatus>,
    pub endpoint_id: Option<String>,
    /// Only attempts made before this time (strictly).
    pub before: Option<DateTime<Utc>>,
    /// Only attempts made after this time (strictly).
    pub after: Option<DateTime<Utc>>,
    /// Only attempts whose response status is in this class: 100, 200, 300, 400 or 500 for
    /// that hundred, 0 for attempts that got no response (Svix's `status_code_class`).
    pub status_code_class: Option<u16>,
    /// Only attempts of messages that match this (Svix's `channel`, `tag`, `event_types`).
    pub message: MessageQuery,
}

/// A channel's occupancy as channel webhooks reported it: the channel itself (`user_id` is
/// `None`) or one presence member.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Occupant {
    pub app_id: AppId,
    pub channel: String,
    pub user_id: Option<String>,
}

/// A reported change of occupancy: `channel_occupied` / `member_added` enter,
/// `channel_vacated` / `member_removed` leave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OccupancyChange {
    Entered(Occupant),
    Left(Occupant),
}

/// Which API token was presented: environment-wide, or limited to one app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenScope {
    Environment,
    App(AppId),
    /// An app portal link's token: limited to one app, and within it to what the app's own
    /// customers manage (its endpoints, messages and attempts), not the app's settings,
    /// secrets, sources, channels or live tail.
    Portal(AppId),
}

impl TokenScope {
    /// The one app the token is limited to, if it is.
    pub fn app(&self) -> Option<&AppId> {
        match self {
            Self::Environment => None,
            Self::App(app) | Self::Portal(app) => Some(app),
        }
    }
}

/// An API token as the store keeps it: everything but the secret, which only its creator saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiToken {
    pub id: TokenId,
    /// What the token is for, as its creator wrote it.
    pub name: String,
    pub scope: TokenScope,
    pub created_at: DateTime<Utc>,
    /// After this instant the token opens nothing; `None` never expires.
    pub expires_at: Option<DateTime<Utc>>,
}

impl ApiToken {
    pub fn expired(&self, now: DateTime<Utc>) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }
}

/// Ask for due deliveries, one lane at a time, so first attempts never wait behind retries.
///
/// An endpoint or app already holding its limit gets nothing, and none gets more than its limit
/// minus what it holds: one app's backlog, however large and however early due, fills at most
/// its own part of a claim, and the next claim looks past it to other apps' deliveries.
#[derive(Debug, Clone)]
pub struct ClaimRequest {
    pub now: DateTime<Utc>,
    /// Claimed rows are invisible to other claims until then; a crashed worker's rows come back.
    pub lease_until: DateTime<Utc>,
    pub limit: u32,
    /// `true`: only deliveries whose first attempt is due; `false`: only retries and manual ones.
    pub first_attempts: bool,
    /// Deliveries in flight per endpoint; an endpoint at `per_endpoint_limit` gets no more.
    pub in_flight: std::collections::HashMap<EndpointId, u32>,
    pub per_endpoint_limit: u32,
    /// Deliveries in flight per app (over all its endpoints); an app at `per_app_limit` gets
    /// no more.
    pub app_in_flight: std::collections::HashMap<AppId, u32>,
    pub per_app_limit: u32,
    /// The caller's deliveries whose attempts are over and whose records are still being
    /// saved, per endpoint. They keep their leases until the record commits but no longer
    /// load their endpoint or app: a store that counts live leases leaves these out, from the
    /// endpoint's count and so from its app's (the counts in `in_flight` and `app_in_flight`
    /// never include them).
    pub saving: std::collections::HashMap<EndpointId, u32>,
}

/// A claimed delivery, with everything needed to make the HTTP request.
#[derive(Debug, Clone)]
pub struct DeliveryJob {
    pub msg_id: MessageId,
    pub app_id: AppId,
    pub event_type: String,
    pub payload: Bytes,
    pub endpoint: Endpoint,
    /// Scheduled attempts already made.
    pub attempts: u32,
    pub trigger: TriggerType,
    /// Names this claim; the attempt's record carries it back (see [`AttemptRecord::lease`]).
    pub lease: LeaseToken,
}

/// Where a store hands the first attempts of the deliveries it has just committed, already
/// leased, so the dispatcher runs them without finding them again with a claim (see
/// [`MessageStore::hand_fresh_deliveries_to`]). Every room `reserve` grants is either filled by
/// a job in `hand_over` or returned by `give_back`.
pub trait FreshDeliveries: Send + Sync + 'static {
    /// Room for the first attempt of a new delivery of `app` to `endpoint`, granted within the
    /// same limits a claim keeps; `false` leaves the delivery to claims.
    fn reserve(&self, app: &AppId, endpoint: &EndpointId) -> bool;
    /// Jobs for granted rooms, committed and leased for [`FreshDeliveries::lease`] from no
    /// earlier than `leased_from` (the start of the commit that leased them).
    fn hand_over(&self, jobs: Vec<DeliveryJob>, leased_from: std::time::Instant);
    /// Rooms granted for deliveries that were not committed after all.
    fn give_back(&self, rooms: Vec<(AppId, EndpointId)>);
    /// How long a handed-over job's lease lasts: as long as a claim's.
    fn lease(&self) -> std::time::Duration;
}

/// Names one claim of a delivery. Every claim gets a new token, so once a lease has run out
/// and the delivery was claimed again, the old claim's token no longer matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct LeaseToken(pub u64);

/// An endpoint's next `throttleRate` turn (see [`MessageStore::reserve_turn`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// Reserved: the attempt may start `at` (the store's time), now or later. `due` is the
    /// endpoint's theoretical arrival time after this reservation (GCRA): its next turn is a
    /// burst's tolerance before it, or now if later.
    At {
        at: DateTime<Utc>,
        due: DateTime<Utc>,
    },
    /// The endpoint's next turn comes after the latest start asked for: nothing is reserved.
    /// `due` is the endpoint's theoretical arrival time, if known.
    TooLate { due: Option<DateTime<Utc>> },
    /// This store keeps no turns: it belongs to one node, whose dispatcher paces its own
    /// attempts.
    NotKept,
}

/// What became of an attempt record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Recorded {
    /// The attempt is logged and the delivery (and endpoint) took its next state.
    Applied,
    /// The claim's lease had run out (the delivery may have been claimed again) or a manual
    /// enqueue took the delivery back: the attempt is logged, since it did happen, but the
    /// delivery and its endpoint are left as they are.
    Stale,
}

/// A page of a channel's history: offsets strictly between `after` and `before`.
#[derive(Debug, Clone)]
pub struct HistoryQuery {
    pub after: Option<u64>,
    pub before: Option<u64>,
    pub limit: u32,
    pub newest_first: bool,
    /// Events older than this are past retention and not returned.
    pub not_before: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum IngestRecorded {
    /// First time: the event, its message and its history entries are committed; the
    /// positions the store assigned the entries, in the order given.
    New(Vec<Position>),
    /// The provider sent this delivery before; here is what it became then. Nothing is
    /// committed and no offset is assigned.
    Duplicate(Box<IngestEvent>),
}

/// What [`MessageStore::due_deliveries`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DueDeliveries {
    /// Deliveries due and not finished, those being attempted included.
    pub count: u64,
    /// When the earliest of them fell due; `None` when there are none.
    pub oldest_due_at: Option<DateTime<Utc>>,
}

/// What the worker learned from one attempt, recorded in one transaction.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    pub attempt: Attempt,
    pub next: NextStep,
    pub endpoint_change: EndpointChange,
    /// The claim the attempt was made under ([`DeliveryJob::lease`]): the record changes the
    /// delivery's state only while the delivery is still leased under it.
    pub lease: LeaseToken,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextStep {
    Delivered,
    RetryAt(DateTime<Utc>),
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointChange {
    /// The endpoint's state stays as it is (the common case: a success after successes, or a
    /// failure inside a running streak), so its row is not written at all.
    Unchanged,
    /// A success ends the endpoint's failing streak.
    StreakEnded,
    /// A failure starts a failing streak.
    StreakStarted { at: DateTime<Utc> },
    /// The endpoint is disabled: at once if `streak_since` is `None` (410 Gone), otherwise for
    /// failing since then, as the attempt's copy of the endpoint said, and only if its stored
    /// streak still began by then: a success may have ended it while this attempt was in
    /// flight (an endpoint that came back after days must not be disabled by a failure that
    /// overlapped its first successes). When that check declines, the delivery is not failed
    /// but retried at `retry_at`, its schedule's next attempt (`None`: the schedule is over,
    /// so it fails either way).
    Disable {
        streak_since: Option<DateTime<Utc>>,
        retry_at: Option<DateTime<Utc>>,
    },
}

/// Apps with their Pusher credentials, and the API tokens that open them.
#[async_trait::async_trait]
pub trait AppStore: Send + Sync + 'static {
    async fn create_app(&self, app: &App) -> Result<()>;
    /// The app whose id is `id_or_uid` or, failing that, whose uid is: an exact id always wins
    /// over a uid equal to it.
    async fn get_app(&self, id_or_uid: &str) -> Result<Option<App>>;
    /// The app whose Pusher key is `key` (WebSocket connections name their app this way).
    async fn get_app_by_pusher_key(&self, key: &str) -> Result<Option<App>>;
    /// The app whose numeric Pusher app id is `app_id` (the Pusher HTTP API's `/apps/{id}`).
    async fn get_app_by_pusher_id(&self, app_id: i64) -> Result<Option<App>>;
    /// The same if this node holds it in memory, answered without a round trip; `None` says
    /// nothing of the store (see [`TokenStore::cached_token`]).
    fn cached_app_by_pusher_id(&self, _app_id: i64) -> Option<App> {
        None
    }
    async fn list_apps(&self, page: &Page) -> Result<Vec<App>>;
    /// The ids and uids of every app with Socket.IO settings: the namespaces the Socket.IO
    /// face opens before it listens (read without the apps' secrets).
    async fn socketio_app_keys(&self) -> Result<Vec<String>>;
    /// Writes the app's settings (not its Pusher credentials), compare-and-set: only if its
    /// stored `updated_at` is still `read_at`, the `updated_at` of the copy the caller changed;
    /// otherwise nothing is written and the result is `Conflict` ([`APP_CHANGED`]). So two
    /// patches of different fields, or a patch made on a node whose cached copy is behind,
    /// never put back what another change set.
    async fn update_app(&self, app: &App, read_at: DateTime<Utc>) -> Result<()>;
    /// Replaces an app's Pusher key and secrets, the retired one included (its numeric id
    /// stays).
    async fn set_pusher_credentials(
        &self,
        app_id: &AppId,
        credentials: &herald_core::model::PusherCredentials,
    ) -> Result<()>;
    /// Makes `secret` the app's Pusher secret, the one it replaces verifying until
    /// `previous_until` (dropped at once without it), and returns the credentials as stored.
    /// The secret replaced is the one stored when the change is written (a compare-and-set,
    /// retried), never an older one read earlier: of two rotations close together, the later
    /// keeps the earlier's secret as its previous one. `Conflict` if the secret kept changing
    /// for [`PUSHER_ROTATION_ATTEMPTS`] reads; `NotFound` without the app.
    async fn rotate_pusher_secret(
        &self,
        app_id: &AppId,
        secret: &str,
        previous_until: Option<DateTime<Utc>>,
    ) -> Result<herald_core::model::PusherCredentials>;
    /// Deletes the app and everything it owns: endpoints, messages with their deliveries and
    /// attempts, sources with their received requests, channel history and occupancy, and
    /// the API tokens scoped to it. The large tables are emptied first, [`RETENTION_BATCH`]
    /// rows per transaction, so other writes go on meanwhile.
    async fn delete_app(&self, id: &AppId) -> Result<bool>;
}

/// API tokens, kept as SHA-256 digests of the secret: the store can tell which token a request
/// presented, never what a token is.
#[async_trait::async_trait]
pub trait TokenStore: Send + Sync + 'static {
    /// Stores `token` under `token_hash`. A digest already stored is left as it is, so seeding
    /// the dev token again on every start changes nothing.
    async fn add_token(&self, token: &ApiToken, token_hash: &[u8]) -> Result<()>;
    /// The token whose digest is `token_hash`, expired or not (the caller tells the two apart,
    /// to say which it was).
    async fn find_token(&self, token_hash: &[u8]) -> Result<Option<ApiToken>>;
    /// The token whose digest is `token_hash` if this node holds it in memory, answered
    /// without a round trip; `None` says nothing of the store. The API uses it to tell a
    /// known token from a guess before it pays for a lookup.
    fn cached_token(&self, _token_hash: &[u8]) -> Option<ApiToken> {
        None
    }
    async fn get_token(&self, id: &TokenId) -> Result<Option<ApiToken>>;
    /// Tokens by id (so by creation time), all of them or those scoped to `app`.
    async fn list_tokens(&self, page: &Page, app: Option<&AppId>) -> Result<Vec<ApiToken>>;
    /// Forgets the token with this id; whether it existed. A revoked token opens nothing from
    /// the next request on.
    async fn revoke_token(&self, id: &TokenId) -> Result<bool>;
    /// Forgets the token with this digest; whether it existed.
    async fn remove_token(&self, token_hash: &[u8]) -> Result<bool>;
    /// Deletes the tokens that expired before `before`; how many. Expired tokens are kept for
    /// a while after, so a request presenting one is told it expired rather than that it is
    /// unknown, but not for ever: an app portal link mints one per page view.
    async fn purge_expired_tokens(&self, before: DateTime<Utc>) -> Result<u64>;
}

/// Event types: environment-wide, as in Svix.
#[async_trait::async_trait]
pub trait EventTypeStore: Send + Sync + 'static {
    async fn create_event_type(&self, event_type: &EventType) -> Result<()>;
    async fn get_event_type(&self, name: &str) -> Result<Option<EventType>>;
    async fn list_event_types(&self, page: &Page, include_archived: bool)
    -> Result<Vec<EventType>>;
    async fn update_event_type(&self, event_type: &EventType) -> Result<()>;
}

/// An app's webhook endpoints and their statistics.
#[async_trait::async_trait]
pub trait EndpointStore: Send + Sync + 'static {
    async fn create_endpoint(&self, endpoint: &Endpoint) -> Result<()>;
    async fn get_endpoint(&self, app_id: &AppId, id_or_uid: &str) -> Result<Option<Endpoint>>;
    async fn list_endpoints(&self, app_id: &AppId, page: &Page) -> Result<Vec<Endpoint>>;
    /// Writes the endpoint, compare-and-set: only if its stored `updated_at` is still
    /// `read_at`, the `updated_at` of the copy the caller changed; otherwise nothing is written
    /// and the result is `Conflict` ([`ENDPOINT_CHANGED`]). Every write moves `updated_at` (the
    /// worker's disable included), so an update prepared before the worker disabled the
    /// endpoint cannot re-enable it. The failure streak (`failing_since`) is the worker's: the
    /// stored one is kept, except that re-enabling a disabled endpoint clears it.
    async fn update_endpoint(&self, endpoint: &Endpoint, read_at: DateTime<Utc>) -> Result<()>;
    async fn delete_endpoint(&self, app_id: &AppId, id: &EndpointId) -> Result<bool>;
    /// Every endpoint of the app, for matching a new message against the filters. Called for
    /// every new message, so implementations may serve it from a cache they keep exact.
    async fn app_endpoints(&self, app_id: &AppId) -> Result<std::sync::Arc<Vec<Endpoint>>>;
    /// [`EndpointStore::app_endpoints`] while this node's cache serves (read into it if need
    /// be), else `None`: for a look before each delivery, which must not cost a database read
    /// per delivery while the cache is paused (PostgreSQL without its notifications).
    async fn cached_app_endpoints(
        &self,
        app_id: &AppId,
    ) -> Result<Option<std::sync::Arc<Vec<Endpoint>>>>;
    /// The endpoint's deliveries by status, of the messages created within `window`.
    async fn endpoint_stats(
        &self,
        endpoint_id: &EndpointId,
        window: &StatsWindow,
    ) -> Result<EndpointStats>;
}

/// The commit of a write whose place in the commit order is already fixed
/// ([`MessageStore::queue_publication`]).
pub type QueuedCommit<T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<T>> + Send + 'static>>;

/// Messages, publications (a message with its channel history entries) and the delivery queue:
/// first attempts queued with their message, manual attempts, claims, attempt records and the
/// requeue after a restart.
#[async_trait::async_trait]
pub trait MessageStore: Send + Sync + 'static {
    /// Store a message and queue its first attempt to each endpoint, atomically. Fails with
    /// `Conflict` if the app already has a message with this `event_id`.
    async fn create_message(&self, message: Message, endpoint_ids: Vec<EndpointId>) -> Result<()>;
    /// What one publication stores, in one commit: the message (if it has one) with its first
    /// attempts, and its channel history entries, each trimming its channel to its retention.
    /// The store assigns each entry its channel's epoch and next offset in that commit, so a
    /// channel's offsets are gap-free and in commit order whoever appends; the result is the
    /// position of each entry, in the order given. A message that conflicts (`eventId`)
    /// commits no history either, consumes no offset, and fails with `Conflict`.
    async fn store_publication(
        &self,
        message: Option<(Message, Vec<EndpointId>)>,
        history: Vec<NewHistoryEntry>,
    ) -> Result<Vec<Position>>;
    /// [`MessageStore::store_publication`] in two steps, for a caller that orders one
    /// channel's publications without waiting for each commit: once this returns `Ok`, the
    /// write's place in the commit order is fixed (its history entries' offsets will follow
    /// those of every write queued before it returned, and precede those of every write
    /// queued after), and the returned future resolves when it has committed, with what
    /// `store_publication` returns. A write that then fails consumes no offset, as there.
    ///
    /// The default commits before returning, which keeps the promise trivially (PostgreSQL:
    /// offsets are taken under row locks held to commit, so nothing is fixed before it).
    /// SQLite returns once the write is in the group commit's queue, so several publications
    /// of one channel can share a commit.
    async fn queue_publication(
        &self,
        message: Option<(Message, Vec<EndpointId>)>,
        history: Vec<NewHistoryEntry>,
    ) -> Result<QueuedCommit<Vec<Position>>> {
        let positions = self.store_publication(message, history).await?;
        Ok(Box::pin(std::future::ready(Ok(positions))))
    }
    async fn get_message(&self, app_id: &AppId, id_or_event_id: &str) -> Result<Option<Message>>;
    /// The app's messages with these ids (not event ids), in no order; ids it does not hold
    /// are left out.
    async fn get_messages(&self, app_id: &AppId, ids: &[MessageId]) -> Result<Vec<Message>>;
    async fn list_messages(
        &self,
        app_id: &AppId,
        page: &Page,
        query: &MessageQuery,
    ) -> Result<Vec<Message>>;

    // Delivery queue
    /// Queue an attempt now (resend), whatever the delivery's state: a delivery still on its
    /// retry schedule stays on it, its next attempt due now (or sooner, if it already was);
    /// any other gets one manual attempt.
    ///
    /// Takes the delivery back from any claim that holds it, atomically with the change: the
    /// record of an attempt in flight under that claim is then [`Recorded::Stale`] (logged, but
    /// changing neither the delivery nor the endpoint), so it cannot overwrite the manual
    /// request; the next claim leases the delivery under a new token and its record applies.
    /// A record that committed before the enqueue is overwritten by it.
    ///
    /// Queues nothing and returns `false` when the message is gone, or its payload was
    /// expunged or is past its retention: checked in the same statement (on PostgreSQL under
    /// a share lock of the message's row), so an expunge that commits meanwhile cannot have
    /// its failed delivery queued again to send `{"expired":true}`.
    async fn enqueue_manual(
        &self,
        app_id: &AppId,
        msg_id: &MessageId,
        endpoint_id: &EndpointId,
        now: DateTime<Utc>,
    ) -> Result<bool>;
    /// Queue a manual attempt for every failed delivery to the endpoint in `[since, until)`.
    /// Like [`MessageStore::enqueue_manual`], takes each of them back from any claim holding
    /// it. Returns how many were queued.
    async fn enqueue_failed(
        &self,
        endpoint_id: &EndpointId,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<u64>;
    /// Leases up to `request.limit` due deliveries of the request's lane, earliest due first,
    /// within the request's per-endpoint and per-app limits.
    async fn claim_due(&self, request: &ClaimRequest) -> Result<Vec<DeliveryJob>>;
    /// When the earliest delivery of a lane (first attempts if `first_attempts`, else
    /// retries and manual attempts) that is not in flight falls due.
    async fn next_due_at(&self, first_attempts: bool) -> Result<Option<DateTime<Utc>>>;
    /// The delivery queue as an operator watches it (`/metrics`): how many deliveries are
    /// due at `now` and not finished (those being attempted included), and when the earliest
    /// of them fell due.
    async fn due_deliveries(&self, now: DateTime<Utc>) -> Result<DueDeliveries>;
    /// Logs the attempt and, fenced by `record.lease`, moves the delivery to its next state and
    /// applies the endpoint change: only while the delivery is still leased under that token
    /// (a lease that has run out may count as gone; a manual enqueue ends it). Otherwise the
    /// attempt is logged all the same and [`Recorded::Stale`] returned. Releases the lease (only if it is still this one).
    async fn record_attempt(&self, record: AttemptRecord) -> Result<Recorded>;
    /// Ends the leases of claimed jobs that were never attempted (their node is stopping), so
    /// their deliveries are claimable at once, by any node, rather than when the leases run
    /// out. Each only while its delivery is still leased under the job's token: a later claim
    /// or a resend that took it meanwhile keeps it. The deliveries' state and due times stay
    /// as they were. Returns how many leases ended.
    async fn release_unattempted(&self, jobs: &[DeliveryJob]) -> Result<u64>;
    /// Reserves the next turn of `endpoint`, paced at `rate` attempts a second, for an
    /// attempt that may start until `latest`, at `now` (both the store's time): GCRA, the
    /// generic cell rate algorithm, as the dispatcher's own pacer (`herald_delivery::pace`) —
    /// after a quiet spell a second's worth may go at once, then one every `1 / rate`
    /// seconds; a changed rate applies from this reservation on. A store shared by several
    /// nodes keeps the turns, so an endpoint's rate holds for the whole cluster; a store of
    /// one node answers [`Turn::NotKept`] (the default) and leaves pacing to its dispatcher.
    async fn reserve_turn(
        &self,
        endpoint: &EndpointId,
        rate: u16,
        now: DateTime<Utc>,
        latest: DateTime<Utc>,
    ) -> Result<Turn> {
        let _ = (endpoint, rate, now, latest);
        Ok(Turn::NotKept)
    }
    /// Make every leased delivery due now: after a restart nothing can still be sending.
    /// Only for stores owned by a single node.
    async fn requeue_leased(&self, now: DateTime<Utc>) -> Result<u64>;
    /// From now on, lease the first attempts of new deliveries as they commit, where `to` has
    /// room, and hand them to it, instead of leaving them for claims to find. A store that
    /// cannot lease in the commit ignores this (the default): claims find everything.
    fn hand_fresh_deliveries_to(&self, to: std::sync::Arc<dyn FreshDeliveries>) {
        let _ = to;
    }
}

/// The attempt log, and where each message stands with each endpoint (Svix's attempted
/// messages and attempted destinations).
#[async_trait::async_trait]
pub trait AttemptStore: Send + Sync + 'static {
    async fn list_attempts(
        &self,
        app_id: &AppId,
        scope: &AttemptScope,
        query: &AttemptQuery,
        page: &Page,
    ) -> Result<Vec<Attempt>>;
    /// The endpoint's deliveries with their messages, newest message first (paged by message
    /// id), filtered by the messages' fields and the deliveries' status.
    async fn list_endpoint_deliveries(
        &self,
        app_id: &AppId,
        endpoint_id: &EndpointId,
        query: &DeliveryQuery,
        page: &Page,
    ) -> Result<Vec<(Message, DeliveryState)>>;
    /// The message's deliveries with their endpoints, paged by endpoint id.
    async fn list_message_deliveries(
        &self,
        app_id: &AppId,
        msg_id: &MessageId,
        page: &Page,
    ) -> Result<Vec<(Endpoint, DeliveryState)>>;
}

/// Channel history: each channel's position (epoch and next offset) and its kept events.
#[async_trait::async_trait]
pub trait HistoryStore: Send + Sync + 'static {
    async fn channel_position(
        &self,
        app_id: &AppId,
        channel: &str,
    ) -> Result<Option<ChannelPosition>>;
    /// Forgets the positions of channels nothing was ever appended to (offset 1, no events);
    /// returns how many. Such rows are only left by older versions, which stored a position
    /// at a channel's first subscription.
    async fn forget_unused_channel_positions(&self) -> Result<u64>;
    /// Starts the channel's history afresh under `epoch`: its kept events are dropped and its
    /// epoch set to `epoch`, while its offsets go on counting (the next offset is unchanged;
    /// a channel without a position gets one, at offset 1). Ordered with appends: an append
    /// commits wholly before or wholly after it. Returns the channel's new position.
    async fn reset_history(
        &self,
        app_id: &AppId,
        channel: &str,
        epoch: &str,
    ) -> Result<ChannelPosition>;
    /// Appends one event and trims the channel to the entry's retention, in one commit. The
    /// store assigns the event its channel's epoch and next offset in that commit (a channel
    /// appended to for the first time gets a new epoch, from offset 1) and advances the
    /// position; returns where the event landed.
    async fn append_history(&self, entry: NewHistoryEntry) -> Result<Position>;
    async fn history(
        &self,
        app_id: &AppId,
        channel: &str,
        query: &HistoryQuery,
    ) -> Result<Vec<HistoryEntry>>;
    /// The bytes kept for the events between `after` and `before` (both exclusive) not older
    /// than `not_before`, the range [`HistoryStore::history`] would read: their data, event
    /// names and user ids, summed without reading them out, so a replay can be priced before
    /// it is read.
    async fn history_bytes(
        &self,
        app_id: &AppId,
        channel: &str,
        after: u64,
        before: u64,
        not_before: DateTime<Utc>,
    ) -> Result<u64>;
    /// The oldest offset still kept (not older than `not_before`).
    async fn oldest_history_offset(
        &self,
        app_id: &AppId,
        channel: &str,
        not_before: DateTime<Utc>,
    ) -> Result<Option<u64>>;
    /// History channels in (app id, channel) order, after `after`: `(app_id, channel, position)`.
    async fn history_channels(
        &self,
        after: Option<(&AppId, &str)>,
        limit: u32,
    ) -> Result<Vec<(AppId, String, ChannelPosition)>>;
    /// Deletes a channel's kept events at or below `up_to_offset` or older than `not_before`;
    /// returns how many.
    async fn trim_history(
        &self,
        app_id: &AppId,
        channel: &str,
        up_to_offset: u64,
        not_before: DateTime<Utc>,
    ) -> Result<u64>;
}

/// Webhooks in: ingest sources and the requests they received.
#[async_trait::async_trait]
pub trait IngestStore: Send + Sync + 'static {
    async fn create_source(&self, source: &IngestSource) -> Result<()>;
    async fn get_source(&self, app_id: &AppId, id_or_uid: &str) -> Result<Option<IngestSource>>;
    /// By id alone: the public ingest route names only the source.
    async fn find_source(&self, id: &str) -> Result<Option<IngestSource>>;
    async fn list_sources(&self, app_id: &AppId, page: &Page) -> Result<Vec<IngestSource>>;
    /// Writes `source` only while its stored `updated_at` is still `read_at`, the one of the
    /// copy it was made from; otherwise nothing is written and the result is `Conflict`
    /// ([`SOURCE_CHANGED`]), or `NotFound` if it is gone. So of two changes made from one read
    /// (two PATCHes, one removing a leaked secret) the second cannot put back what the first
    /// changed.
    async fn update_source(&self, source: &IngestSource, read_at: DateTime<Utc>) -> Result<()>;
    async fn delete_source(&self, app_id: &AppId, id: &SourceId) -> Result<bool>;
    /// Records a verified inbound webhook with the message it becomes (with its deliveries)
    /// and that message's channel history entries, in one commit, the store assigning the
    /// entries their offsets in it (as [`MessageStore::store_publication`] does); or, if the
    /// source already received this delivery id, commits none of them, assigns no offset and
    /// returns the earlier record.
    async fn record_ingest(
        &self,
        event: IngestEvent,
        message: Message,
        endpoint_ids: Vec<EndpointId>,
        history: Vec<NewHistoryEntry>,
    ) -> Result<IngestRecorded>;
    async fn list_ingest_events(
        &self,
        source_id: &SourceId,
        page: &Page,
    ) -> Result<Vec<IngestEvent>>;
    async fn get_ingest_event(&self, source_id: &SourceId, id: &str)
    -> Result<Option<IngestEvent>>;
}

/// `Idempotency-Key` replay: the responses already given, per scope and key, and the keys whose
/// first request is still running.
///
/// A key's life: [`claim_idempotency_key`](Self::claim_idempotency_key) marks it in progress
/// until `claim_until`; then either [`save_idempotent_response`](Self::save_idempotent_response)
/// completes the claim with the response, kept and replayed from then on, or
/// [`release_idempotency_key`](Self::release_idempotency_key) forgets the claim (the request
/// ended without a response worth keeping), so the next request with the key runs. A claim
/// is seen by every node sharing the store. A claim whose `claim_until` has passed (its node
/// died mid-request) is taken over by the next claim. Releasing acts on the releaser's own
/// claim only (named by its `claim_until`): a request that outlived its claim, taken over
/// meanwhile, must not free the key under the request that took it over. Saving acts on the
/// key (the first response saved is the one replayed), so a claim should still last longer
/// than the request it covers.
#[async_trait::async_trait]
pub trait IdempotencyStore: Send + Sync + 'static {
    /// The response kept for `key` in `scope`, if one was saved; never a claim in progress.
    async fn idempotent_response(&self, scope: &str, key: &str) -> Result<Option<(u16, Vec<u8>)>>;
    /// Claims `key` in `scope` for a request starting `now`, until `claim_until`, in one atomic
    /// decision: [`IdempotencyClaim::Done`] if a response is kept for it,
    /// [`IdempotencyClaim::InProgress`] if another claim holds it until after `now`, otherwise
    /// [`IdempotencyClaim::Claimed`] (a new claim, or one taking over an expired claim).
    async fn claim_idempotency_key(
        &self,
        scope: &str,
        key: &str,
        now: DateTime<Utc>,
        claim_until: DateTime<Utc>,
    ) -> Result<IdempotencyClaim>;
    /// Forgets the claim on `key` in `scope` made until `claimed_until`, for a request that
    /// ended without a response worth keeping (a server error, one too large to keep, a
    /// dropped request). A kept response stays; releasing a key that is not claimed, or
    /// claimed by another request since (a takeover), does nothing.
    async fn release_idempotency_key(
        &self,
        scope: &str,
        key: &str,
        claimed_until: DateTime<Utc>,
    ) -> Result<()>;
    /// Keeps `status` and `body` for `key` in `scope`, completing its claim if there is one
    /// (a claim is not required). The first response saved stays: saving again changes nothing.
    async fn save_idempotent_response(
        &self,
        scope: &str,
        key: &str,
        status: u16,
        body: &[u8],
        now: DateTime<Utc>,
    ) -> Result<()>;
    /// Forgets responses older than `older_than`, then the oldest beyond `max_rows` rows or
    /// `max_bytes` of bodies. Claims count against neither; one is purged only once its
    /// `claim_until` is before `older_than`.
    async fn purge_idempotency(
        &self,
        older_than: DateTime<Utc>,
        max_rows: u64,
        max_bytes: u64,
    ) -> Result<u64>;
}

/// What [`IdempotencyStore::claim_idempotency_key`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdempotencyClaim {
    /// The key is this caller's until its `claim_until`: run the request, then save or release.
    Claimed,
    /// Another request holds the key and has not finished.
    InProgress,
    /// A response is kept for the key: replay it.
    Done { status: u16, body: Vec<u8> },
}

/// Channel webhooks: the messages they become and the occupancy they report.
#[async_trait::async_trait]
pub trait ChannelWebhookStore: Send + Sync + 'static {
    /// Stores channel webhook messages (each with its target endpoints) together with the
    /// occupancy changes they report, in one commit.
    async fn record_channel_events(
        &self,
        messages: Vec<(Message, Vec<EndpointId>)>,
        changes: Vec<OccupancyChange>,
    ) -> Result<()>;
    /// Every recorded occupant. At start, before any connection, these are what the previous
    /// run left without reporting their leave.
    async fn occupants(&self) -> Result<Vec<Occupant>>;
}

/// What one [`RetentionStore::expire_payloads`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExpiredPayloads {
    /// Payloads expunged.
    pub expunged: u64,
    /// Payloads past their time set aside until the recheck, their deliveries under way.
    pub set_aside: u64,
}

impl ExpiredPayloads {
    /// Whether either statement did a whole batch of `limit`: there may be more of it.
    pub fn full(&self, limit: u32) -> bool {
        self.expunged >= u64::from(limit) || self.set_aside >= u64::from(limit)
    }
}

/// Retention: what the sweeper expunges and deletes, one bounded batch per call, so intake
/// never waits behind a long delete; and the expunge the API asks for. Every call is
/// idempotent and takes only rows no other sweeper holds (PostgreSQL: `SKIP LOCKED`), so
/// several nodes may sweep one store at once.
#[async_trait::async_trait]
pub trait RetentionStore: Send + Sync + 'static {
    /// Expunges (replaces by [`herald_core::model::EXPIRED_PAYLOAD`]) up to `limit` payloads
    /// whose `payload_expires_at` is at or before `now`, of messages with no delivery still
    /// pending or in flight (those keep their payload until their deliveries are done, and
    /// up to `limit` of them are looked at again at `recheck_at`, so a backlog of them does not
    /// sit in every batch's way); returns how many were expunged and set aside.
    async fn expire_payloads(
        &self,
        now: DateTime<Utc>,
        recheck_at: DateTime<Utc>,
        limit: u32,
    ) -> Result<ExpiredPayloads>;
    /// Expunges the payload of the app's message `id_or_event_id` now; the message and its
    /// attempts stay. Its deliveries still to be made fail, taken back from any claim holding
    /// them (an attempt in flight is logged, its record stale): a retry never sends
    /// `{"expired":true}`. Whether the message exists.
    async fn expunge_payload(&self, app_id: &AppId, id_or_event_id: &str) -> Result<bool>;
    /// Replaces the response body logged for the message's attempt `attempt_id` with
    /// [`EXPUNGED_RESPONSE`] (Svix's "expunge attempt content"); the attempt stays. Whether
    /// the app's message has that attempt.
    async fn expunge_attempt_response(
        &self,
        app_id: &AppId,
        msg_id: &MessageId,
        attempt_id: &str,
    ) -> Result<bool>;
    /// Deletes up to `limit` logged attempts made before `before`; returns how many.
    async fn delete_attempts_before(&self, before: DateTime<Utc>, limit: u32) -> Result<u64>;
    /// Deletes up to `limit` messages created before `before` that have no delivery pending
    /// or in flight, with their deliveries; returns how many.
    async fn delete_messages_before(&self, before: DateTime<Utc>, limit: u32) -> Result<u64>;
    /// Deletes up to `limit` received requests (webhooks in) received before `before`, their
    /// delivery ids with them (so a provider's retry after that is new); returns how many.
    async fn delete_ingest_events_before(&self, before: DateTime<Utc>, limit: u32) -> Result<u64>;
}

/// Rows one retention batch deletes at most (one short transaction), and the batch
/// [`AppStore::delete_app`] deletes an app's data in.
pub const RETENTION_BATCH: u32 = 500;

/// Secrets at rest (see [`secrets`]): what they are encrypted under, and their re-encryption
/// under the current main key. Not part of [`Store`]: only start-up and `herald
/// rotate-main-key` use it, on the concrete store.
#[async_trait::async_trait]
pub trait SecretStore: Send + Sync + 'static {
    /// Counts the stored secrets by the key they are encrypted under (and those in clear).
    async fn secret_census(&self) -> Result<secrets::SecretCensus>;
    /// Rewrites under the current main key every secret in clear and, with `all`, every one
    /// under another key, `batch` rows per transaction, so servers keep running meanwhile
    /// (those that have the old key as a previous one read either). A value the API changes
    /// meanwhile is left to that write, which used the current key of its node.
    async fn reencrypt_secrets(&self, all: bool, batch: u32) -> Result<secrets::Reencrypted>;
}

/// The store's own life.
#[async_trait::async_trait]
pub trait StoreLifecycle: Send + Sync + 'static {
    /// Answers if the store can serve requests now (a round trip to the database).
    async fn ping(&self) -> Result<()>;
    /// Finish pending writes and close connections.
    async fn close(&self);
    /// Records each commit of the hot writes (its duration and writes) in `metrics` from now
    /// on; the first call wins.
    fn observe_commits(&self, metrics: std::sync::Arc<herald_metrics::StoreMetrics>);
    /// The time every node sharing this store reads for what they compare with each other
    /// (delivery leases, due times, presence heartbeats): the shared database's clock on
    /// PostgreSQL, this node's own on a store no other node shares (see [`ClusterClock`]).
    fn clock(&self) -> ClusterClock {
        ClusterClock::default()
    }
}

/// Everything Herald remembers: every sub-trait at once. Implement the sub-traits; the blanket
/// impl makes the type a `Store`, and `Arc<dyn Store>` calls every sub-trait's methods.
pub trait Store:
    AppStore
    + TokenStore
    + EventTypeStore
    + EndpointStore
    + MessageStore
    + AttemptStore
    + HistoryStore
    + IngestStore
    + IdempotencyStore
    + ChannelWebhookStore
    + RetentionStore
    + StoreLifecycle
    + Send
    + Sync
    + 'static
{
}

impl<T> Store for T where
    T: AppStore
        + TokenStore
        + EventTypeStore
        + EndpointStore
        + MessageStore
        + AttemptStore
        + HistoryStore
        + IngestStore
        + IdempotencyStore
        + ChannelWebhookStore
        + RetentionStore
        + StoreLifecycle
        + Send
        + Sync
        + 'static
{
}

/// The store traits, for `use herald_store::prelude::*` where a concrete store's methods are
/// called.
pub mod prelude {
    pub use crate::{
        AppStore, AttemptStore, ChannelWebhookStore, EndpointStore, EventTypeStore, HistoryStore,
        IdempotencyStore, IngestStore, MessageStore, RetentionStore, Store, StoreLifecycle,
        TokenStore,
    };
}

/// Where one delivery (a message to one endpoint) stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeliveryState {
    /// `Sending` while an attempt is in flight.
    pub status: DeliveryStatus,
    /// When the next attempt is due, while one is pending.
    pub next_attempt: Option<DateTime<Utc>>,
}

/// Filters on an endpoint's deliveries: the messages', and the delivery's status.
#[derive(Debug, Clone, Default)]
pub struct DeliveryQuery {
    pub message: MessageQuery,
    pub status: Option<DeliveryStatus>,
}
