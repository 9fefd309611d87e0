//! The SQL the SQLite and PostgreSQL backends share, written once: statement texts, the
//! `.bind(...)` chains that go with them, and the conversions from rows to domain values.
//!
//! Both schemas keep the same tables and columns for these statements, and both drivers take
//! `$1`-style parameters, so the text is the same; only sqlx's types differ per database
//! (`SqliteRow`/`PgRow`, their arguments and executors). The shared pieces are therefore
//! `macro_rules!` macros rather than generic functions: a macro expands to the plain
//! `sqlx::query(TEXT).bind(..)...` chain at the call site, where the executor the backend passes
//! (`&self.writer`, `&self.pool`, a transaction) picks the database by inference, with no
//! `Database`/`Encode`/`Decode`/`ColumnIndex` bounds to spell out for every bound value and
//! column type. The same holds for the `QueryBuilder` macros (history and attempt listings)
//! and for [`row_readers!`], which each backend's `rows` module expands once for its row type:
//! generic readers would need such a bound for every column type they decode. Statements with
//! one or two plain parameters are shared as text constants only.
//!
//! **A bound `LIMIT` is written `LIMIT CAST($n AS BIGINT)`**, here and in the SQLite backend.
//! SQLite (since 3.47) reads a plain `LIMIT $n` as the integer bound at prepare time and marks
//! the statement to be prepared again whenever `$n` is bound, which is every execution: a
//! profile showed a fifth of a server's time re-preparing the delivery claim. A cast is not a
//! bare parameter, so the statement is prepared once and cached. PostgreSQL reads either form
//! the same way.
//!
//! What differs stays in each backend: SQLite's group-commit writes, in-memory leases and
//! caches; PostgreSQL's row locks, advisory locks, notices and JSON casts; flags compared as
//! `0`/`1` on SQLite and as BOOLEAN on PostgreSQL.
//!
//! Macros refer to the JSON and time helpers shared in `sqlite::rows` by full path; the row
//! readers of [`row_readers!`] call `time` and `status` (whose code type differs per backend)
//! and the trait `sqlx::Row` from the module they expand in.

/// How often a statement that PostgreSQL aborted to break a deadlock is run again.
pub(crate) const DEADLOCK_RETRIES: u32 = 5;

/// Runs `statement`, and again when PostgreSQL aborts it to break a deadlock (SQLSTATE
/// `40P01`), at most [`DEADLOCK_RETRIES`] times more. Only for statements that may run again
/// whole in their own transaction: a batch of an app's deletion, whose cascade to its
/// deliveries locks them in another order than a batch of attempt records updating the same
/// rows (seen under load: the deletion failed with 500 "deadlock detected"). SQLite has one
/// writer and never reports one.
pub(crate) async fn retrying_deadlocks<T, F, Fut>(mut statement: F) -> Result<T, sqlx::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
{
    let mut retries = 0;
    loop {
        match statement().await {
            Err(sqlx::Error::Database(e))
                if e.code().as_deref() == Some("40P01") && retries < DEADLOCK_RETRIES =>
            {
                retries += 1;
                tracing::info!(
                    retries,
                    "a statement was a deadlock's victim; running it again"
                );
            }
            done => return done,
        }
    }
}

// ---- event types ----

/// What a resend makes of a delivery (the `SET` of its upsert's `ON CONFLICT`; `$least` is
/// the backend's two-argument minimum, `MIN` or `LEAST`): a delivery still on its retry
/// schedule (pending or in flight, scheduled) stays on it, its next attempt brought forward to
/// now (or kept, if already due: it keeps its place among the due ones), and the schedule
/// carries on after it if that fails; any other becomes manual (one attempt, never retried)
/// due now. Before, a resend while a retry waited gave up the schedule's remaining attempts
/// with the first failure.
macro_rules! resend_set {
    ($least:literal) => {
        concat!(
            "status = excluded.status,
             trigger_type = CASE WHEN deliveries.status IN (1, 3) AND deliveries.trigger_type = 0
                 THEN deliveries.trigger_type ELSE excluded.trigger_type END,
             next_attempt_at = CASE WHEN deliveries.status IN (1, 3) AND deliveries.trigger_type = 0
                 THEN ",
            $least,
            "(COALESCE(deliveries.next_attempt_at, excluded.next_attempt_at),
                          excluded.next_attempt_at)
                 ELSE excluded.next_attempt_at END,
             updated_at = excluded.updated_at"
        )
    };
}
pub(crate) use resend_set;

/// The start of a resend's upsert (`resend_set!` follows): `$1` the message, `$2` the
/// endpoint, `$3` the app, `$4` pending, `$5` manual, `$6` now, `$7` the expired payload.
/// It inserts (or updates) only while the message has a payload to send, read in the same
/// statement, and `$lock` ends that read: PostgreSQL's `FOR SHARE`, empty on SQLite (one
/// writer, no row locks). The `WHERE` also ends the `SELECT` before SQLite parses
/// `ON CONFLICT`, which it would otherwise take for a join's.
macro_rules! resend_insert {
    ($lock:literal) => {
        concat!(
            "INSERT INTO deliveries (msg_id, endpoint_id, app_id, status, attempts, trigger_type,
                                     next_attempt_at, updated_at)
             SELECT m.id, $2, $3, $4, 0, $5, $6, $6 FROM messages m
             WHERE m.id = $1 AND m.app_id = $3 AND m.payload <> $7
               AND (m.payload_expires_at IS NULL OR m.payload_expires_at > $6) ",
            $lock,
            " ON CONFLICT (msg_id, endpoint_id) DO UPDATE SET "
        )
    };
}
pub(crate) use resend_insert;

/// `MessageStore::due_deliveries` on SQLite: through the partial index `deliveries_due`, which
/// holds exactly the unfinished deliveries (PostgreSQL reads its lanes' indexes instead).
/// `$1`: now, in milliseconds.
pub(crate) const DUE_DELIVERIES: &str = "SELECT COUNT(*) AS n, MIN(next_attempt_at) AS oldest
     FROM deliveries WHERE status IN (1, 3) AND next_attempt_at <= $1";

pub(crate) const GET_EVENT_TYPE: &str = "SELECT * FROM event_types WHERE name = $1";
/// The start of an event type listing; the caller adds the archived filter and the page.
pub(crate) const LIST_EVENT_TYPES: &str = "SELECT * FROM event_types WHERE 1 = 1";

pub(crate) const INSERT_EVENT_TYPE: &str =
    "INSERT INTO event_types (name, description, archived, deprecated, schemas, group_name,
                              feature_flags, created_at, updated_at)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)";
pub(crate) const UPDATE_EVENT_TYPE: &str =
    "UPDATE event_types SET description = $2, archived = $3, deprecated = $4, schemas = $5,
                            group_name = $6, feature_flags = $7, updated_at = $8
     WHERE name = $1";

/// Binds `$1`..`$7` of an event type statement, name to feature flags, to `$query`.
macro_rules! event_type_columns {
    ($query:expr, $et:expr) => {{
        let et: &herald_core::model::EventType = $et;
        $query
            .bind(&et.name)
            .bind(&et.description)
            .bind(et.archived)
            .bind(et.deprecated)
            .bind(&et.schemas)
            .bind(&et.group_name)
            .bind($crate::sqlite::rows::opt_json(&et.feature_flags))
    }};
}
pub(crate) use event_type_columns;

/// Inserts the event type `$et` (`&EventType`).
macro_rules! insert_event_type {
    ($et:expr) => {{
        let et: &herald_core::model::EventType = $et;
        $crate::sql::event_type_columns!(::sqlx::query($crate::sql::INSERT_EVENT_TYPE), et)
            .bind($crate::sqlite::rows::millis(et.created_at))
            .bind($crate::sqlite::rows::millis(et.updated_at))
    }};
}
pub(crate) use insert_event_type;

/// Updates the event type `$et` (`&EventType`) by name.
macro_rules! update_event_type {
    ($et:expr) => {{
        let et: &herald_core::model::EventType = $et;
        $crate::sql::event_type_columns!(::sqlx::query($crate::sql::UPDATE_EVENT_TYPE), et)
            .bind($crate::sqlite::rows::millis(et.updated_at))
    }};
}
pub(crate) use update_event_type;

// ---- apps and API tokens ----

/// An app by id or uid; an exact id wins over another app's uid equal to it.
pub(crate) const GET_APP: &str =
    "SELECT * FROM apps WHERE id = $1 OR uid = $1 ORDER BY id = $1 DESC LIMIT 1";
pub(crate) const APP_BY_PUSHER_KEY: &str = "SELECT * FROM apps WHERE pusher_key = $1";
pub(crate) const APP_BY_PUSHER_ID: &str = "SELECT * FROM apps WHERE pusher_app_id = $1";
/// The start of an app listing; the caller adds the page.
pub(crate) const LIST_APPS: &str = "SELECT * FROM apps WHERE 1 = 1";
pub(crate) const DELETE_APP: &str = "DELETE FROM apps WHERE id = $1";
pub(crate) const SOCKETIO_APP_KEYS: &str =
    "SELECT id, uid FROM apps WHERE socketio IS NOT NULL ORDER BY id";

/// Updates the app `$app` (`&App`): uid, name, throttle rate, metadata, history rules and
/// Socket.IO settings.
macro_rules! update_app {
    ($app:expr, $read_at:expr) => {{
        let app: &herald_core::model::App = $app;
        ::sqlx::query(
            "UPDATE apps SET uid = $2, name = $3, throttle_rate = $4, metadata = $5, updated_at = $6,
                    history_rules = $7, socketio = $8, payload_retention_days = $9
             WHERE id = $1 AND updated_at = $10",
        )
        .bind(app.id.as_str())
        .bind(&app.uid)
        .bind(&app.name)
        .bind(app.throttle_rate)
        .bind($crate::sqlite::rows::to_json(&app.metadata))
        .bind($crate::sqlite::rows::millis(app.updated_at))
        .bind($crate::sqlite::rows::history_rules_json(app.history.as_deref()))
        .bind($crate::sqlite::rows::socketio_json(app.socketio.as_ref()))
        .bind(app.payload_retention_days.map(i64::from))
        .bind($crate::sqlite::rows::millis($read_at))
    }};
}
pub(crate) use update_app;

pub(crate) const APP_EXISTS: &str = "SELECT 1 FROM apps WHERE id = $1";

/// Sets the Pusher key and secrets of the app `$app_id` (`&AppId`) to `$credentials`
/// (`&PusherCredentials`), the secrets encrypted under `$keys` (`&Keyring`). Given
/// `$replacing` (`Option<&str>`, the stored, sealed secret that was read), it is a
/// compare-and-set: the row changes only while its secret is still that one, so a rotation
/// never overwrites one it did not see.
macro_rules! set_pusher_credentials {
    ($app_id:expr, $credentials:expr, $keys:expr, $replacing:expr) => {{
        let app_id: &herald_core::AppId = $app_id;
        let credentials: &herald_core::model::PusherCredentials = $credentials;
        let keys: &$crate::secrets::Keyring = $keys;
        let replacing: Option<&str> = $replacing;
        ::sqlx::query(
            "UPDATE apps SET pusher_key = $2, pusher_secret = $3, pusher_previous_secret = $4,
                             pusher_previous_secret_until = $5
             WHERE id = $1 AND ($6 IS NULL OR pusher_secret = $6)",
        )
        .bind(app_id.as_str())
        .bind(&credentials.key)
        .bind($crate::sql::seal_app_secret(
            keys,
            app_id,
            &credentials.secret,
        ))
        .bind($crate::sql::seal_app_previous_secret(
            keys,
            app_id,
            credentials,
        ))
        .bind(
            credentials
                .previous
                .as_ref()
                .map(|p| $crate::sqlite::rows::millis(p.until)),
        )
        .bind(replacing)
    }};
}
pub(crate) use set_pusher_credentials;

/// [`crate::AppStore::rotate_pusher_secret`] on `$store` (a SQL store, with `keys` and
/// `cache`), reading from `$reader` and writing to `$writer` (pools).
macro_rules! rotate_pusher_secret {
    ($store:expr, $reader:expr, $writer:expr, $app_id:expr, $secret:expr, $previous_until:expr) => {{
        let app_id: &herald_core::AppId = $app_id;
        let secret: &str = $secret;
        let previous_until: Option<chrono::DateTime<chrono::Utc>> = $previous_until;
        let mut rotation = Err($crate::StoreError::Conflict(
            "the app's Pusher secret kept changing while this rotation read it; try again".into(),
        ));
        for _ in 0..$crate::PUSHER_ROTATION_ATTEMPTS {
            // Read here, not through the node cache: the compare-and-set below wants the row
            // as it is, and a rotation on another node leaves the cache behind it.
            let row = ::sqlx::query($crate::sql::GET_APP)
                .bind(app_id.as_str())
                .fetch_optional($reader)
                .await?
                .ok_or($crate::StoreError::NotFound)?;
            let sealed: String = ::sqlx::Row::try_get(&row, "pusher_secret")?;
            let rotated = rows::app(&row, &$store.keys)?
                .pusher
                .rotated(secret.to_owned(), previous_until);
            let done =
                $crate::sql::set_pusher_credentials!(app_id, &rotated, &$store.keys, Some(&sealed))
                    .execute($writer)
                    .await?;
            $store.cache.invalidate();
            if done.rows_affected() == 1 {
                rotation = Ok(rotated);
                break;
            }
        }
        rotation
    }};
}
pub(crate) use rotate_pusher_secret;

/// An app's current Pusher secret as stored: encrypted under `keys`.
pub(crate) fn seal_app_secret(
    keys: &crate::secrets::Keyring,
    app_id: &herald_core::AppId,
    secret: &str,
) -> String {
    keys.seal(
        crate::secrets::field::APP_PUSHER_SECRET,
        app_id.as_str(),
        secret,
    )
}

/// An app's retired Pusher secret as stored (NULL without one): encrypted under `keys`.
pub(crate) fn seal_app_previous_secret(
    keys: &crate::secrets::Keyring,
    app_id: &herald_core::AppId,
    credentials: &herald_core::model::PusherCredentials,
) -> Option<String> {
    credentials.previous.as_ref().map(|previous| {
        keys.seal(
            crate::secrets::field::APP_PUSHER_PREVIOUS_SECRET,
            app_id.as_str(),
            &previous.secret,
        )
    })
}

// ---- API tokens ----

pub(crate) const REMOVE_TOKEN: &str = "DELETE FROM api_tokens WHERE token_hash = $1";
/// Up to `$2` tokens that expired before `$1` (milliseconds), through the partial index
/// `api_tokens_expiry`.
pub(crate) const PURGE_EXPIRED_TOKENS: &str = "DELETE FROM api_tokens WHERE id IN \
     (SELECT id FROM api_tokens WHERE expires_at IS NOT NULL AND expires_at < $1 \
     LIMIT CAST($2 AS BIGINT))";
/// Expired tokens deleted per statement: a backlog of portal links' tokens (one per page
/// view) must not hold the writer, which message intake waits for, in one long delete.
pub(crate) const TOKEN_PURGE_BATCH: i64 = 1_000;
pub(crate) const REVOKE_TOKEN: &str = "DELETE FROM api_tokens WHERE id = $1";
pub(crate) const FIND_TOKEN: &str = "SELECT * FROM api_tokens WHERE token_hash = $1";
pub(crate) const GET_TOKEN: &str = "SELECT * FROM api_tokens WHERE id = $1";
/// The start of a token listing; the caller adds the app filter and the page.
pub(crate) const LIST_TOKENS: &str = "SELECT * FROM api_tokens WHERE 1 = 1";

/// Inserts the token `$token` (`&ApiToken`) under the digest `$token_hash`; a digest already
/// stored is kept as it is.
macro_rules! add_token {
    ($token:expr, $token_hash:expr) => {{
        let token: &$crate::ApiToken = $token;
        ::sqlx::query(
            "INSERT INTO api_tokens (id, token_hash, app_id, name, created_at, expires_at, portal)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (token_hash) DO NOTHING",
        )
        .bind(token.id.as_str())
        .bind($token_hash)
        .bind(token.scope.app().map(|app| app.as_str()))
        .bind(&token.name)
        .bind($crate::sqlite::rows::millis(token.created_at))
        .bind(token.expires_at.map($crate::sqlite::rows::millis))
        .bind(matches!(token.scope, $crate::TokenScope::Portal(_)))
    }};
}
pub(crate) use add_token;

/// Implements [`crate::TokenStore`] for `$store`, writing through its pool `$writer` and
/// reading through `$reader` (the same pool on PostgreSQL). Expanded in each backend's
/// `tokens` module, whose `paginate` and `rows` it uses, and whose `token_cache` (the exact
/// cache lookups go through, if the backend has one) and `forget_tokens` (called after every
/// token removal) it calls. Adding a token forgets nothing: only tokens found are cached, so
/// no cached entry can stand for a digest not yet stored, and a node minting portal links
/// for every page view must not empty its cache each time.
macro_rules! token_store {
    ($store:ty, $writer:ident, $reader:ident) => {
        #[async_trait::async_trait]
        impl $crate::TokenStore for $store {
            async fn add_token(
                &self,
                token: &$crate::ApiToken,
                token_hash: &[u8],
            ) -> $crate::Result<()> {
                $crate::sql::add_token!(token, token_hash)
                    .execute(&self.$writer)
                    .await?;
                Ok(())
            }

            async fn purge_expired_tokens(
                &self,
                before: chrono::DateTime<chrono::Utc>,
            ) -> $crate::Result<u64> {
                let mut deleted = 0;
                loop {
                    let done = ::sqlx::query($crate::sql::PURGE_EXPIRED_TOKENS)
                        .bind($crate::sqlite::rows::millis(before))
                        .bind($crate::sql::TOKEN_PURGE_BATCH)
                        .execute(&self.$writer)
                        .await?
                        .rows_affected();
                    deleted += done;
                    if done < $crate::sql::TOKEN_PURGE_BATCH.unsigned_abs() {
                        break;
                    }
                    // Other writes go between two batches.
                    tokio::task::yield_now().await;
                }
                if deleted > 0 {
                    self.forget_tokens();
                }
                Ok(deleted)
            }

            async fn find_token(
                &self,
                token_hash: &[u8],
            ) -> $crate::Result<Option<$crate::ApiToken>> {
                // Every API request presents a token: a cached one costs no round trip.
                let cache = self.token_cache();
                if let Some(token) = cache.and_then(|c| c.token(token_hash)) {
                    return Ok(Some(token));
                }
                let generation = cache.map(|c| c.generation());
                let token = ::sqlx::query($crate::sql::FIND_TOKEN)
                    .bind(token_hash)
                    .fetch_optional(&self.$reader)
                    .await?
                    .as_ref()
                    .map(rows::api_token)
                    .transpose()?;
                if let (Some(cache), Some(generation), Some(token)) = (cache, generation, &token) {
                    cache.put_token(generation, token_hash, token);
                }
                Ok(token)
            }

            fn cached_token(&self, token_hash: &[u8]) -> Option<$crate::ApiToken> {
                self.token_cache().and_then(|c| c.token(token_hash))
            }

            async fn get_token(
                &self,
                id: &herald_core::TokenId,
            ) -> $crate::Result<Option<$crate::ApiToken>> {
                ::sqlx::query($crate::sql::GET_TOKEN)
                    .bind(id.as_str())
                    .fetch_optional(&self.$reader)
                    .await?
                    .as_ref()
                    .map(rows::api_token)
                    .transpose()
            }

            async fn list_tokens(
                &self,
                page: &$crate::Page,
                app: Option<&herald_core::AppId>,
            ) -> $crate::Result<Vec<$crate::ApiToken>> {
                let mut q = ::sqlx::QueryBuilder::new($crate::sql::LIST_TOKENS);
                if let Some(app) = app {
                    q.push(" AND app_id = ").push_bind(app.as_str());
                }
                paginate(&mut q, "id", page);
                q.build()
                    .fetch_all(&self.$reader)
                    .await?
                    .iter()
                    .map(rows::api_token)
                    .collect()
            }

            async fn revoke_token(&self, id: &herald_core::TokenId) -> $crate::Result<bool> {
                let done = ::sqlx::query($crate::sql::REVOKE_TOKEN)
                    .bind(id.as_str())
                    .execute(&self.$writer)
                    .await?;
                self.forget_tokens();
                Ok(done.rows_affected() > 0)
            }

            async fn remove_token(&self, token_hash: &[u8]) -> $crate::Result<bool> {
                let done = ::sqlx::query($crate::sql::REMOVE_TOKEN)
                    .bind(token_hash)
                    .execute(&self.$writer)
                    .await?;
                self.forget_tokens();
                Ok(done.rows_affected() > 0)
            }
        }
    };
}
pub(crate) use token_store;

// ---- endpoints ----

/// An app's endpoint by id or uid; an exact id wins over another endpoint's uid equal to it.
pub(crate) const GET_ENDPOINT: &str = "SELECT * FROM endpoints WHERE app_id = $1 \
     AND (id = $2 OR uid = $2) ORDER BY id = $2 DESC LIMIT 1";
/// The start of an app's endpoint listing; the caller binds the app id and adds the page.
pub(crate) const LIST_ENDPOINTS: &str = "SELECT * FROM endpoints WHERE app_id = ";
pub(crate) const ENDPOINT_EXISTS: &str = "SELECT 1 FROM endpoints WHERE id = $1 AND app_id = $2";
pub(crate) const DELETE_ENDPOINT: &str = "DELETE FROM endpoints WHERE app_id = $1 AND id = $2";

pub(crate) const INSERT_ENDPOINT: &str =
    "INSERT INTO endpoints (id, app_id, uid, url, description, throttle_rate, disabled,
                            event_types, channels, metadata, headers, secret,
                            previous_secrets, failing_since, created_at, updated_at, format)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)";

/// Binds `$1`..`$13` of an endpoint statement, id to previous secrets (encrypted under
/// `$keys`, a `&Keyring`), to `$query`.
macro_rules! endpoint_columns {
    ($query:expr, $ep:expr, $keys:expr) => {{
        let ep: &herald_core::model::Endpoint = $ep;
        let keys: &$crate::secrets::Keyring = $keys;
        $query
            .bind(ep.id.as_str())
            .bind(ep.app_id.as_str())
            .bind(&ep.uid)
            .bind(&ep.url)
            .bind(&ep.description)
            .bind(ep.throttle_rate)
            .bind(ep.disabled)
            .bind($crate::sqlite::rows::opt_json(&ep.event_types))
            .bind($crate::sqlite::rows::opt_json(&ep.channels))
            .bind($crate::sqlite::rows::to_json(&ep.metadata))
            .bind(keys.seal(
                $crate::secrets::field::ENDPOINT_HEADERS,
                ep.id.as_str(),
                &$crate::sqlite::rows::to_json(&ep.headers),
            ))
            .bind(keys.seal(
                $crate::secrets::field::ENDPOINT_SECRET,
                ep.id.as_str(),
                &ep.secret,
            ))
            .bind(keys.seal(
                $crate::secrets::field::ENDPOINT_PREVIOUS_SECRETS,
                ep.id.as_str(),
                &$crate::sqlite::rows::previous_secrets_json(ep),
            ))
    }};
}
pub(crate) use endpoint_columns;

/// Inserts the endpoint `$ep` (`&Endpoint`), its secrets encrypted under `$keys`.
macro_rules! insert_endpoint {
    ($ep:expr, $keys:expr) => {{
        let ep: &herald_core::model::Endpoint = $ep;
        $crate::sql::endpoint_columns!(::sqlx::query($crate::sql::INSERT_ENDPOINT), ep, $keys)
            .bind(ep.failing_since.map($crate::sqlite::rows::millis))
            .bind($crate::sqlite::rows::millis(ep.created_at))
            .bind($crate::sqlite::rows::millis(ep.updated_at))
            .bind(ep.format.as_str())
    }};
}
pub(crate) use insert_endpoint;

/// Binds the endpoint `$ep` (`&Endpoint`) and the `updated_at` it was read with, `$read_at`, to
/// the backend's update statement `$sql` (which differs in how it compares the `disabled`
/// flag): `$1` id, `$2` app id, `$3`..`$15` the columns (`$7` disabled, `$14` updated_at), `$16`
/// the `updated_at` it must still have. The secrets are encrypted under `$keys`.
macro_rules! update_endpoint {
    ($sql:expr, $ep:expr, $read_at:expr, $keys:expr) => {{
        let ep: &herald_core::model::Endpoint = $ep;
        $crate::sql::endpoint_columns!(::sqlx::query($sql), ep, $keys)
            .bind($crate::sqlite::rows::millis(ep.updated_at))
            .bind(ep.format.as_str())
            .bind($crate::sqlite::rows::millis($read_at))
    }};
}
pub(crate) use update_endpoint;

// ---- ingest sources and received requests ----

/// An app's source by id or uid; an exact id wins over another source's uid equal to it.
pub(crate) const GET_SOURCE: &str = "SELECT * FROM ingest_sources WHERE app_id = $1 \
     AND (id = $2 OR uid = $2) ORDER BY id = $2 DESC LIMIT 1";
pub(crate) const FIND_SOURCE: &str = "SELECT * FROM ingest_sources WHERE id = $1";
/// The start of an app's source listing; the caller binds the app id and adds the page.
pub(crate) const LIST_SOURCES: &str = "SELECT * FROM ingest_sources WHERE app_id = ";
pub(crate) const DELETE_SOURCE: &str = "DELETE FROM ingest_sources WHERE app_id = $1 AND id = $2";

/// Binds an inbound webhook's record, `id` to `received_at` (ten columns, in the order of
/// the `ingest_events` inserts), to `$query`.
macro_rules! ingest_event_columns {
    ($query:expr, $event:expr) => {{
        let event: &herald_core::model::IngestEvent = $event;
        $query
            .bind(event.id.as_str())
            .bind(event.source_id.as_str())
            .bind(event.app_id.as_str())
            .bind(&event.delivery_id)
            .bind($crate::sqlite::rows::to_json(&event.headers))
            .bind(event.body.as_ref())
            .bind(&event.event_type)
            .bind($crate::sqlite::rows::to_json(&event.channels))
            .bind(event.msg_id.as_str())
            .bind($crate::sqlite::rows::millis(event.received_at))
    }};
}
pub(crate) use ingest_event_columns;

/// Binds a message, `id` to `payload_expires_at` (nine columns, in the order of the `messages`
/// inserts), to `$query`.
macro_rules! message_columns {
    ($query:expr, $message:expr) => {{
        let m: &herald_core::model::Message = $message;
        $query
            .bind(m.id.as_str())
            .bind(m.app_id.as_str())
            .bind(&m.event_id)
            .bind(&m.event_type)
            .bind($crate::sqlite::rows::opt_json(&m.channels))
            .bind($crate::sqlite::rows::opt_json(&m.tags))
            .bind(m.payload.as_ref())
            .bind($crate::sqlite::rows::millis(m.created_at))
            .bind(m.payload_expires_at.map($crate::sqlite::rows::millis))
    }};
}
pub(crate) use message_columns;

/// The request recorded earlier under a source's delivery id.
pub(crate) const EARLIER_INGEST_EVENT: &str =
    "SELECT * FROM ingest_events WHERE source_id = $1 AND delivery_id = $2";
/// The start of a source's request listing; the caller binds the source id and adds the page.
pub(crate) const LIST_INGEST_EVENTS: &str = "SELECT * FROM ingest_events WHERE source_id = ";
pub(crate) const GET_INGEST_EVENT: &str =
    "SELECT * FROM ingest_events WHERE source_id = $1 AND id = $2";

pub(crate) const INSERT_SOURCE: &str =
    "INSERT INTO ingest_sources (id, app_id, uid, name, kind, secrets, hmac, tolerance_secs,
                                 event_type, channels, default_channel, created_at, updated_at,
                                 trust_unsigned_headers)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)";
pub(crate) const UPDATE_SOURCE: &str =
    "UPDATE ingest_sources SET uid = $3, name = $4, kind = $5, secrets = $6, hmac = $7,
            tolerance_secs = $8, event_type = $9, channels = $10, default_channel = $11,
            updated_at = $12, trust_unsigned_headers = $13
     WHERE id = $1 AND app_id = $2 AND updated_at = $14";
/// Whether the source `$1` of the app `$2` exists (after an update that wrote nothing).
pub(crate) const SOURCE_EXISTS: &str = "SELECT 1 FROM ingest_sources WHERE id = $1 AND app_id = $2";

/// Binds `$1`..`$11` of a source statement, id to default channel, to `$query`; the secrets
/// are encrypted under `$keys` (`&Keyring`).
macro_rules! source_columns {
    ($query:expr, $source:expr, $keys:expr) => {{
        let source: &herald_core::model::IngestSource = $source;
        let keys: &$crate::secrets::Keyring = $keys;
        $query
            .bind(source.id.as_str())
            .bind(source.app_id.as_str())
            .bind(&source.uid)
            .bind(&source.name)
            .bind(source.kind.as_str())
            .bind(keys.seal(
                $crate::secrets::field::SOURCE_SECRETS,
                source.id.as_str(),
                &$crate::sqlite::rows::to_json(&source.secrets),
            ))
            .bind($crate::sqlite::rows::hmac_json(source.hmac.as_ref()))
            .bind(source.tolerance_secs)
            .bind($crate::sqlite::rows::to_json(&source.event_type))
            .bind($crate::sqlite::rows::to_json(&source.channels))
            .bind(&source.default_channel)
    }};
}
pub(crate) use source_columns;

/// Inserts the source `$source` (`&IngestSource`), its secrets encrypted under `$keys`.
macro_rules! insert_source {
    ($source:expr, $keys:expr) => {{
        let source: &herald_core::model::IngestSource = $source;
        $crate::sql::source_columns!(::sqlx::query($crate::sql::INSERT_SOURCE), source, $keys)
            .bind($crate::sqlite::rows::millis(source.created_at))
            .bind($crate::sqlite::rows::millis(source.updated_at))
            .bind(source.trust_unsigned_headers)
    }};
}
pub(crate) use insert_source;

/// Updates the source `$source` (`&IngestSource`) of its app, its secrets encrypted under
/// `$keys`, if it was last written at `$read_at`.
macro_rules! update_source {
    ($source:expr, $keys:expr, $read_at:expr) => {{
        let source: &herald_core::model::IngestSource = $source;
        $crate::sql::source_columns!(::sqlx::query($crate::sql::UPDATE_SOURCE), source, $keys)
            .bind($crate::sqlite::rows::millis(source.updated_at))
            .bind(source.trust_unsigned_headers)
            .bind($crate::sqlite::rows::millis($read_at))
    }};
}
pub(crate) use update_source;

// ---- channel history ----

pub(crate) const CHANNEL_POSITION: &str =
    "SELECT epoch, next_offset FROM channel_positions WHERE app_id = $1 AND channel = $2";
/// Positions of channels that never kept an event and keep none: nothing would be lost.
pub(crate) const FORGET_UNUSED_CHANNEL_POSITIONS: &str =
    "DELETE FROM channel_positions WHERE next_offset <= 1 AND NOT EXISTS (
         SELECT 1 FROM channel_history h
         WHERE h.app_id = channel_positions.app_id AND h.channel = channel_positions.channel)";
pub(crate) const DELETE_CHANNEL_HISTORY: &str =
    "DELETE FROM channel_history WHERE app_id = $1 AND channel = $2";

/// An endpoint's statistics from the rows of its counting statement: its deliveries that have
/// not succeeded, by status (`Some`; a pending one under a live lease given as `Sending`), and
/// all of them (`None`). Successes are the rest: they are not indexed by status (SQLite's
/// migration 0015, PostgreSQL's 0010).
pub(crate) fn endpoint_stats(
    counts: impl IntoIterator<Item = (Option<herald_core::model::DeliveryStatus>, i64)>,
) -> crate::Result<herald_core::model::EndpointStats> {
    use herald_core::model::{DeliveryStatus, EndpointStats};
    let mut stats = EndpointStats::default();
    let (mut total, mut unsettled) = (0, 0);
    for (status, n) in counts {
        let Some(status) = status else {
            total += n;
            continue;
        };
        unsettled += n;
        match status {
            DeliveryStatus::Success => {
                return Err(crate::StoreError::Corrupt(
                    "a success counted among the unsettled deliveries".into(),
                ));
            }
            DeliveryStatus::Pending => stats.pending += n,
            DeliveryStatus::Fail => stats.fail += n,
            DeliveryStatus::Sending => stats.sending += n,
        }
    }
    stats.success = total - unsettled;
    Ok(stats)
}

/// A u64 offset as BIGINT, saturating (offsets never come near `i64::MAX`).
pub(crate) fn bigint(offset: u64) -> i64 {
    i64::try_from(offset).unwrap_or(i64::MAX)
}

/// Sets the epoch of the channel `$channel` (`&str`) of `$app_id` (`&AppId`) to `$epoch`
/// (`&str`), creating its position at offset 1 if it has none; returns `epoch, next_offset`.
macro_rules! reset_channel_position {
    ($app_id:expr, $channel:expr, $epoch:expr) => {
        ::sqlx::query(
            "INSERT INTO channel_positions (app_id, channel, epoch, next_offset)
             VALUES ($1, $2, $3, 1)
             ON CONFLICT (app_id, channel) DO UPDATE SET epoch = excluded.epoch
             RETURNING epoch, next_offset",
        )
        .bind($app_id.as_str())
        .bind($channel)
        .bind($epoch)
    };
}
pub(crate) use reset_channel_position;

/// A `QueryBuilder` reading the kept events of the channel `$channel` (`&str`) of `$app_id`
/// (`&AppId`) that `$query` (`&HistoryQuery`) asks for.
macro_rules! history_query {
    ($app_id:expr, $channel:expr, $query:expr) => {{
        let query: &$crate::HistoryQuery = $query;
        let mut q = ::sqlx::QueryBuilder::new("SELECT * FROM channel_history WHERE app_id = ");
        q.push_bind($app_id.to_string());
        q.push(" AND channel = ").push_bind($channel.to_owned());
        q.push(" AND created_at >= ")
            .push_bind($crate::sqlite::rows::millis(query.not_before));
        if let Some(after) = query.after {
            q.push(" AND seq > ").push_bind($crate::sql::bigint(after));
        }
        if let Some(before) = query.before {
            q.push(" AND seq < ").push_bind($crate::sql::bigint(before));
        }
        q.push(if query.newest_first {
            " ORDER BY seq DESC"
        } else {
            " ORDER BY seq ASC"
        });
        q.push(" LIMIT CAST(")
            .push_bind(i64::from(query.limit))
            .push(" AS BIGINT)");
        q
    }};
}
pub(crate) use history_query;

/// The oldest offset (`Option<i64>`) kept for `$channel` of `$app_id` created at or after
/// `$not_before`.
macro_rules! oldest_history_offset {
    ($app_id:expr, $channel:expr, $not_before:expr) => {
        ::sqlx::query_scalar::<_, Option<i64>>(
            "SELECT MIN(seq) FROM channel_history
             WHERE app_id = $1 AND channel = $2 AND created_at >= $3",
        )
        .bind($app_id.as_str())
        .bind($channel)
        .bind($crate::sqlite::rows::millis($not_before))
    };
}
pub(crate) use oldest_history_offset;

/// Deletes the events of `$channel` of `$app_id` up to `$up_to_offset` (`u64`) and those
/// created before `$not_before`.
macro_rules! trim_history {
    ($app_id:expr, $channel:expr, $up_to_offset:expr, $not_before:expr) => {
        ::sqlx::query(
            "DELETE FROM channel_history
             WHERE app_id = $1 AND channel = $2 AND (seq <= $3 OR created_at < $4)",
        )
        .bind($app_id.as_str())
        .bind($channel)
        .bind($crate::sql::bigint($up_to_offset))
        .bind($crate::sqlite::rows::millis($not_before))
    };
}
pub(crate) use trim_history;

// ---- messages and attempts ----

/// An app's message by id or event id; an exact id wins over another message's event id.
pub(crate) const GET_MESSAGE: &str = "SELECT * FROM messages WHERE app_id = $1 \
     AND (id = $2 OR event_id = $2) ORDER BY id = $2 DESC LIMIT 1";
/// The start of an app's message listing; the caller binds the app id, adds its filters and
/// the page.
pub(crate) const LIST_MESSAGES: &str = "SELECT * FROM messages WHERE app_id = ";

/// Adds to `q` a bound on `column`, an id column with `prefix` whose ids are made at the row's
/// `created_at`, for a time window (`after`, `before`). Ids sort by time, so the bound lets the
/// read start at the window in the id index rather than walk it from one end; the exact
/// `created_at` terms stay beside it. A second of slack on each side keeps the bound loose
/// (ids hold time in steps of 4 ms).
pub(crate) fn push_id_window<DB: ::sqlx::Database>(
    q: &mut ::sqlx::QueryBuilder<DB>,
    column: &str,
    prefix: &str,
    after: Option<chrono::DateTime<chrono::Utc>>,
    before: Option<chrono::DateTime<chrono::Utc>>,
) where
    String: for<'q> ::sqlx::Encode<'q, DB> + ::sqlx::Type<DB>,
{
    let slack = chrono::Duration::seconds(1);
    if let Some(after) = after {
        q.push(format_args!(" AND {column} >= "));
        q.push_bind(herald_core::id::lower_bound(prefix, after - slack));
    }
    if let Some(before) = before {
        q.push(format_args!(" AND {column} < "));
        q.push_bind(herald_core::id::lower_bound(prefix, before + slack));
    }
}

/// A `QueryBuilder` reading the attempts of `$app_id` (`&AppId`) in `$scope`
/// (`&AttemptScope`) that `$query` (`&AttemptQuery`) asks for, before the page; `$code` is the
/// type status codes bind as (`i64` on SQLite, `i32` on PostgreSQL), and `$message_filters` the
/// backend's `push_message_filters(q, table, id_column, &MessageQuery)`.
macro_rules! attempts_query {
    ($app_id:expr, $scope:expr, $query:expr, $code:ty, $message_filters:path) => {{
        let query: &$crate::AttemptQuery = $query;
        let mut q = ::sqlx::QueryBuilder::new("SELECT * FROM attempts WHERE app_id = ");
        q.push_bind($app_id.to_string());
        match $scope {
            $crate::AttemptScope::Endpoint(endpoint) => {
                q.push(" AND endpoint_id = ");
                q.push_bind(endpoint.to_string());
            }
            $crate::AttemptScope::Message(msg) => {
                q.push(" AND msg_id = ");
                q.push_bind(msg.to_string());
            }
        }
        if let Some(endpoint) = &query.endpoint_id {
            q.push(" AND endpoint_id = ");
            q.push_bind(endpoint.clone());
        }
        if let Some(status) = query.status {
            q.push(" AND status = ");
            q.push_bind(status as $code);
        }
        if let Some(before) = query.before {
            q.push(" AND created_at < ")
                .push_bind($crate::sqlite::rows::millis(before));
        }
        if let Some(after) = query.after {
            q.push(" AND created_at > ")
                .push_bind($crate::sqlite::rows::millis(after));
        }
        $crate::sql::push_id_window(
            &mut q,
            "id",
            herald_core::id::ATTEMPT,
            query.after,
            query.before,
        );
        match query.status_code_class {
            None => {}
            Some(0) => {
                q.push(" AND response_status_code = 0");
            }
            Some(class) => {
                q.push(" AND response_status_code >= ")
                    .push_bind(i32::from(class));
                q.push(" AND response_status_code < ")
                    .push_bind(i32::from(class) + 100);
            }
        }
        if !query.message.is_empty() {
            // Correlated, so each attempt the page walks costs one lookup of its message by
            // key, however many messages the app has.
            q.push(" AND EXISTS (SELECT 1 FROM messages m WHERE m.id = attempts.msg_id");
            $message_filters(&mut q, "m", "m.id", &query.message);
            q.push(")");
        }
        q
    }};
}
pub(crate) use attempts_query;

// ---- row readers ----

/// Defines, in the backend's `rows` module, the readers from `$row` (the backend's row type)
/// to domain values: `id`, `app`, `event_type`, `endpoint`, `message`, `attempt`,
/// `ingest_source`, `ingest_event`, `delivery_state`, `offset`, `channel_position`, `history_entry`. `$code` is the type status and trigger
/// codes decode as (`i64` on SQLite, `i32` INTEGER on PostgreSQL). The module must have
/// `time`, `status` and `sqlx::Row` in scope. The readers of rows holding secrets (`app`,
/// `endpoint`, `ingest_source`) decrypt them with the store's keyring.
macro_rules! row_readers {
    ($row:ty, $code:ty) => {
        /// Reads the id column `column` of `row` as a typed id.
        pub(crate) fn id<T: $crate::sqlite::rows::StoredId>(
            row: &$row,
            column: &str,
        ) -> $crate::Result<T> {
            $crate::sqlite::rows::parse_id(column, row.try_get(column)?)
        }

        /// A JSON text column that may not be NULL.
        fn json_column<T: serde::de::DeserializeOwned>(
            row: &$row,
            column: &str,
        ) -> $crate::Result<T> {
            $crate::sqlite::rows::from_json(column, &row.try_get::<String, _>(column)?)
        }

        /// A JSON text column that may be NULL.
        fn opt_json_column<T: serde::de::DeserializeOwned>(
            row: &$row,
            column: &str,
        ) -> $crate::Result<Option<T>> {
            $crate::sqlite::rows::opt_from_json(column, row.try_get(column)?)
        }

        pub(crate) fn api_token(row: &$row) -> $crate::Result<$crate::ApiToken> {
            Ok($crate::ApiToken {
                id: id(row, "id")?,
                name: row.try_get("name")?,
                scope: match row.try_get::<Option<String>, _>("app_id")? {
                    None => $crate::TokenScope::Environment,
                    Some(app) => {
                        let app = $crate::sqlite::rows::parse_id("api_tokens.app_id", app)?;
                        if row.try_get::<bool, _>("portal")? {
                            $crate::TokenScope::Portal(app)
                        } else {
                            $crate::TokenScope::App(app)
                        }
                    }
                },
                created_at: time(row.try_get("created_at")?)?,
                expires_at: row
                    .try_get::<Option<i64>, _>("expires_at")?
                    .map(time)
                    .transpose()?,
            })
        }

        pub(crate) fn app(
            row: &$row,
            keys: &$crate::secrets::Keyring,
        ) -> $crate::Result<herald_core::model::App> {
            use herald_core::model::{PusherCredentials, RetiredSecret};
            use $crate::secrets::field;
            let app_id: herald_core::AppId = id(row, "id")?;
            let open = |field, stored: String| keys.open(field, app_id.as_str(), &stored);
            Ok(herald_core::model::App {
                id: app_id.clone(),
                uid: row.try_get("uid")?,
                name: row.try_get("name")?,
                throttle_rate: row.try_get("throttle_rate")?,
                metadata: json_column(row, "metadata")?,
                pusher: PusherCredentials {
                    app_id: row.try_get("pusher_app_id")?,
                    key: row.try_get("pusher_key")?,
                    secret: open(field::APP_PUSHER_SECRET, row.try_get("pusher_secret")?)?,
                    previous: match (
                        row.try_get::<Option<String>, _>("pusher_previous_secret")?,
                        row.try_get::<Option<i64>, _>("pusher_previous_secret_until")?,
                    ) {
                        (Some(secret), Some(until)) => Some(RetiredSecret {
                            secret: open(field::APP_PUSHER_PREVIOUS_SECRET, secret)?,
                            until: time(until)?,
                        }),
                        _ => None,
                    },
                },
                history: opt_json_column::<Vec<$crate::sqlite::rows::HistoryRuleRow>>(
                    row,
                    "history_rules",
                )?
                .map(|rules| {
                    rules
                        .into_iter()
                        .map(herald_core::history::HistoryRule::from)
                        .collect()
                }),
                socketio: opt_json_column::<$crate::sqlite::rows::SocketIoRow>(row, "socketio")?
                    .map(herald_core::socketio::SocketIoSettings::try_from)
                    .transpose()?,
                payload_retention_days: row
                    .try_get::<Option<i64>, _>("payload_retention_days")?
                    .map(|days| u32::try_from(days).unwrap_or(u32::MAX)),
                created_at: time(row.try_get("created_at")?)?,
                updated_at: time(row.try_get("updated_at")?)?,
            })
        }

        pub(crate) fn event_type(row: &$row) -> $crate::Result<herald_core::model::EventType> {
            Ok(herald_core::model::EventType {
                name: row.try_get("name")?,
                description: row.try_get("description")?,
                archived: row.try_get("archived")?,
                deprecated: row.try_get("deprecated")?,
                schemas: row.try_get("schemas")?,
                group_name: row.try_get("group_name")?,
                feature_flags: opt_json_column(row, "feature_flags")?,
                created_at: time(row.try_get("created_at")?)?,
                updated_at: time(row.try_get("updated_at")?)?,
            })
        }

        /// Reads endpoint columns; `prefix` is how the query aliased them (`""` or `"e_"`).
        pub(crate) fn endpoint(
            row: &$row,
            prefix: &str,
            keys: &$crate::secrets::Keyring,
        ) -> $crate::Result<herald_core::model::Endpoint> {
            use $crate::secrets::field;
            let col = |name: &str| format!("{prefix}{name}");
            let endpoint_id: herald_core::EndpointId = id(row, &col("id"))?;
            let open = |field, column: &str| -> $crate::Result<String> {
                let stored: String = row.try_get(col(column).as_str())?;
                Ok(keys.open(field, endpoint_id.as_str(), &stored)?)
            };
            let previous: Vec<(String, i64)> = $crate::sqlite::rows::from_json(
                &col("previous_secrets"),
                &open(field::ENDPOINT_PREVIOUS_SECRETS, "previous_secrets")?,
            )?;
            Ok(herald_core::model::Endpoint {
                id: endpoint_id.clone(),
                app_id: id(row, &col("app_id"))?,
                uid: row.try_get(col("uid").as_str())?,
                url: row.try_get(col("url").as_str())?,
                description: row.try_get(col("description").as_str())?,
                throttle_rate: row.try_get(col("throttle_rate").as_str())?,
                disabled: row.try_get(col("disabled").as_str())?,
                format: {
                    let text: String = row.try_get(col("format").as_str())?;
                    herald_core::model::EndpointFormat::parse(&text).ok_or_else(|| {
                        $crate::StoreError::Corrupt(format!("unknown endpoint format {text:?}"))
                    })?
                },
                event_types: opt_json_column(row, &col("event_types"))?,
                channels: opt_json_column(row, &col("channels"))?,
                metadata: json_column(row, &col("metadata"))?,
                headers: $crate::sqlite::rows::from_json(
                    &col("headers"),
                    &open(field::ENDPOINT_HEADERS, "headers")?,
                )?,
                secret: open(field::ENDPOINT_SECRET, "secret")?,
                previous_secrets: previous
                    .into_iter()
                    .map(|(secret, expires)| Ok((secret, time(expires)?)))
                    .collect::<$crate::Result<_>>()?,
                failing_since: row
                    .try_get::<Option<i64>, _>(col("failing_since").as_str())?
                    .map(time)
                    .transpose()?,
                created_at: time(row.try_get(col("created_at").as_str())?)?,
                updated_at: time(row.try_get(col("updated_at").as_str())?)?,
            })
        }

        pub(crate) fn message(row: &$row) -> $crate::Result<herald_core::model::Message> {
            let payload: Vec<u8> = row.try_get("payload")?;
            Ok(herald_core::model::Message {
                id: id(row, "id")?,
                app_id: id(row, "app_id")?,
                event_id: row.try_get("event_id")?,
                event_type: row.try_get("event_type")?,
                channels: opt_json_column(row, "channels")?,
                tags: opt_json_column(row, "tags")?,
                payload: payload.into(),
                created_at: time(row.try_get("created_at")?)?,
                payload_expires_at: row
                    .try_get::<Option<i64>, _>("payload_expires_at")?
                    .map(time)
                    .transpose()?,
            })
        }

        pub(crate) fn attempt(row: &$row) -> $crate::Result<herald_core::model::Attempt> {
            Ok(herald_core::model::Attempt {
                id: id(row, "id")?,
                msg_id: id(row, "msg_id")?,
                endpoint_id: id(row, "endpoint_id")?,
                app_id: id(row, "app_id")?,
                url: row.try_get("url")?,
                status: status(row.try_get("status")?)?,
                response_status_code: row.try_get("response_status_code")?,
                response: row.try_get("response")?,
                response_duration_ms: row.try_get("response_duration_ms")?,
                trigger_type: herald_core::model::TriggerType::from_code(i64::from(
                    row.try_get::<$code, _>("trigger_type")?,
                )),
                created_at: time(row.try_get("created_at")?)?,
            })
        }

        pub(crate) fn ingest_source(
            row: &$row,
            keys: &$crate::secrets::Keyring,
        ) -> $crate::Result<herald_core::model::IngestSource> {
            let kind: String = row.try_get("kind")?;
            let source_id: herald_core::SourceId = id(row, "id")?;
            let secrets = keys.open(
                $crate::secrets::field::SOURCE_SECRETS,
                source_id.as_str(),
                &row.try_get::<String, _>("secrets")?,
            )?;
            Ok(herald_core::model::IngestSource {
                id: source_id.clone(),
                app_id: id(row, "app_id")?,
                uid: row.try_get("uid")?,
                name: row.try_get("name")?,
                kind: herald_core::ingest::SourceKind::parse(&kind).ok_or_else(|| {
                    $crate::StoreError::Corrupt(format!("unknown source kind {kind:?}"))
                })?,
                secrets: $crate::sqlite::rows::from_json("secrets", &secrets)?,
                hmac: opt_json_column::<$crate::sqlite::rows::HmacRow>(row, "hmac")?
                    .map(herald_core::ingest::HmacScheme::from),
                tolerance_secs: row.try_get("tolerance_secs")?,
                event_type: json_column(row, "event_type")?,
                channels: json_column(row, "channels")?,
                default_channel: row.try_get("default_channel")?,
                trust_unsigned_headers: row.try_get("trust_unsigned_headers")?,
                created_at: time(row.try_get("created_at")?)?,
                updated_at: time(row.try_get("updated_at")?)?,
            })
        }

        pub(crate) fn ingest_event(row: &$row) -> $crate::Result<herald_core::model::IngestEvent> {
            let body: Vec<u8> = row.try_get("body")?;
            Ok(herald_core::model::IngestEvent {
                id: id(row, "id")?,
                source_id: id(row, "source_id")?,
                app_id: id(row, "app_id")?,
                delivery_id: row.try_get("delivery_id")?,
                headers: json_column(row, "headers")?,
                body: body.into(),
                event_type: row.try_get("event_type")?,
                channels: json_column(row, "channels")?,
                msg_id: id(row, "msg_id")?,
                received_at: time(row.try_get("received_at")?)?,
            })
        }

        /// A delivery's state from the `d_`-aliased columns of the delivery listings
        /// (`d_status`, `d_next_attempt_at`, `d_leased`): a leased pending delivery is being
        /// sent, and only a pending one has a next attempt.
        pub(crate) fn delivery_state(row: &$row) -> $crate::Result<$crate::DeliveryState> {
            use herald_core::model::DeliveryStatus;
            let leased: bool = row.try_get("d_leased")?;
            let status = match status(row.try_get("d_status")?)? {
                DeliveryStatus::Pending if leased => DeliveryStatus::Sending,
                status => status,
            };
            let next_attempt = match status {
                DeliveryStatus::Pending => row
                    .try_get::<Option<i64>, _>("d_next_attempt_at")?
                    .map(time)
                    .transpose()?,
                _ => None,
            };
            Ok($crate::DeliveryState {
                status,
                next_attempt,
            })
        }

        /// An offset column (BIGINT, never negative).
        pub(crate) fn offset(row: &$row, column: &str) -> $crate::Result<u64> {
            u64::try_from(row.try_get::<i64, _>(column)?)
                .map_err(|_| $crate::StoreError::Corrupt(format!("{column}: negative offset")))
        }

        /// Reads an `(epoch, next_offset)` row.
        pub(crate) fn channel_position(
            row: &$row,
        ) -> $crate::Result<herald_core::history::ChannelPosition> {
            Ok(herald_core::history::ChannelPosition {
                epoch: row.try_get("epoch")?,
                next_offset: offset(row, "next_offset")?,
            })
        }

        pub(crate) fn history_entry(
            row: &$row,
        ) -> $crate::Result<herald_core::history::HistoryEntry> {
            Ok(herald_core::history::HistoryEntry {
                app_id: id(row, "app_id")?,
                channel: row.try_get("channel")?,
                epoch: row.try_get("epoch")?,
                offset: offset(row, "seq")?,
                event: row.try_get("event")?,
                data: row.try_get("data")?,
                raw_json: row.try_get("raw_json")?,
                user_id: row.try_get("user_id")?,
                created_at: time(row.try_get("created_at")?)?,
                except: row.try_get("except_subscriber")?,
            })
        }
    };
}
pub(crate) use row_readers;

/// The census of stored secrets (`census`) and their re-encryption (`reencrypt_rows`) for a
/// backend whose pool is `$pool`, each batch in a transaction opened with `$begin`. Expanded
/// in each backend's `secrets` module, whose imports (`Result`, `Row`, `AssertSqlSafe`, the
/// `secrets` types) it uses.
macro_rules! secret_rewrites {
    ($pool:ty, $begin:literal) => {
        /// Counts every stored secret by what it is encrypted under.
        pub(super) async fn census(pool: &$pool) -> Result<SecretCensus> {
            let mut census = SecretCensus::default();
            for table in &SECRET_TABLES {
                let mut after = String::new();
                loop {
                    let rows = sqlx::query(AssertSqlSafe(table.select_page()))
                        .bind(&after)
                        .bind(500_i64)
                        .fetch_all(pool)
                        .await?;
                    let Some(last) = rows.last() else { break };
                    after = last.try_get("id")?;
                    for row in &rows {
                        for (column, _) in table.columns {
                            if let Some(stored) = row.try_get::<Option<String>, _>(*column)? {
                                census.count(&stored);
                            }
                        }
                    }
                }
            }
            Ok(census)
        }

        /// Rewrites under the current key every secret in clear and (`all`) under another key, one
        /// transaction per `batch` rows. Each value is replaced only if it is still the one read, so a
        /// node writing the same row meanwhile (with its own current key) wins.
        async fn reencrypt_rows(
            pool: &$pool,
            keys: &Keyring,
            all: bool,
            batch: u32,
        ) -> Result<Reencrypted> {
            let mut done = Reencrypted::default();
            for table in &SECRET_TABLES {
                let mut after = String::new();
                loop {
                    let mut tx = pool.begin_with($begin).await?;
                    let rows = sqlx::query(AssertSqlSafe(table.select_page()))
                        .bind(&after)
                        .bind(i64::from(batch.max(1)))
                        .fetch_all(&mut *tx)
                        .await?;
                    let Some(last) = rows.last() else { break };
                    after = last.try_get("id")?;
                    for row in &rows {
                        let id: String = row.try_get("id")?;
                        for (column, field) in table.columns {
                            let Some(stored) = row.try_get::<Option<String>, _>(*column)? else {
                                continue;
                            };
                            if !keys.needs_sealing(&stored, all) {
                                continue;
                            }
                            let sealed = keys.seal(field, &id, &keys.open(field, &id, &stored)?);
                            let updated = sqlx::query(AssertSqlSafe(table.update(column)))
                                .bind(&sealed)
                                .bind(&id)
                                .bind(&stored)
                                .execute(&mut *tx)
                                .await?;
                            if updated.rows_affected() > 0 {
                                done.rewritten += 1;
                            } else {
                                done.skipped += 1;
                            }
                        }
                    }
                    tx.commit().await?;
                }
            }
            Ok(done)
        }
    };
}
pub(crate) use secret_rewrites;

// ---- Retention ----

/// `RetentionStore::expunge_payload`'s message: `$1` the expired payload, `$2` the app, `$3`
/// the message's id or `eventId` (the id wins). Returns the message's id.
pub(crate) const EXPUNGE_PAYLOAD: &str =
    "UPDATE messages SET payload = $1, payload_expires_at = NULL
     WHERE id = (SELECT id FROM messages WHERE app_id = $2
                   AND (id = $3 OR event_id = $3) ORDER BY id = $3 DESC LIMIT 1)
     RETURNING id";

/// Implements [`crate::RetentionStore`] for `$store` and adds its `delete_app_data`, writing
/// through `$writer` and reading through `$reader`. Every batch is one statement over at most
/// `limit` rows picked by a subquery on `$key` (SQLite's `rowid`, PostgreSQL's `id`) and
/// ended by `$lock` (PostgreSQL's `FOR UPDATE SKIP LOCKED`, so several sweepers split the
/// work; empty on SQLite, whose single writer needs none). `$scope_has_path` matches the kept
/// `Idempotency-Key` scopes of an app's routes, in the backend's string functions (`$1` is
/// the path); `$between_batches`, if given, runs between the batches of an app's deletion. Ids sort by
/// creation time, so "older than" is a range of the primary key.
macro_rules! retention_store {
    (
        $store:ty, $writer:ident, $reader:ident,
        key: $key:literal, lock: $lock:literal, scope_has_path: $scope_has_path:literal,
        $(between_batches: $between_batches:expr,)?
    ) => {
        #[async_trait::async_trait]
        impl $crate::RetentionStore for $store {
            async fn expire_payloads(
                &self,
                now: ::chrono::DateTime<::chrono::Utc>,
                recheck_at: ::chrono::DateTime<::chrono::Utc>,
                limit: u32,
            ) -> $crate::Result<$crate::ExpiredPayloads> {
                // Deliveries pending (1) or sending (3) still need their message's payload.
                let done = ::sqlx::query(concat!(
                    "UPDATE messages SET payload = $1, payload_expires_at = NULL WHERE ",
                    $key,
                    " IN (SELECT m.",
                    $key,
                    " FROM messages m
                          WHERE m.payload_expires_at <= $2
                            AND NOT EXISTS (SELECT 1 FROM deliveries d
                                            WHERE d.msg_id = m.id AND d.status IN (1, 3))
                          ORDER BY m.payload_expires_at LIMIT CAST($3 AS BIGINT) ",
                    $lock,
                    ")"
                ))
                .bind(herald_core::model::EXPIRED_PAYLOAD.as_bytes())
                .bind($crate::sqlite::rows::millis(now))
                .bind(i64::from(limit))
                .execute(&self.$writer)
                .await?;
                // Payloads past their time whose deliveries are still under way are looked at
                // again later, not at every batch: left at the head of the index, a long
                // backlog of them (an endpoint down for a day) would be walked past by every
                // statement.
                let set_aside = ::sqlx::query(concat!(
                    "UPDATE messages SET payload_expires_at = $1 WHERE ",
                    $key,
                    " IN (SELECT m.",
                    $key,
                    " FROM messages m
                          WHERE m.payload_expires_at <= $2
                            AND EXISTS (SELECT 1 FROM deliveries d
                                        WHERE d.msg_id = m.id AND d.status IN (1, 3))
                          ORDER BY m.payload_expires_at LIMIT CAST($3 AS BIGINT) ",
                    $lock,
                    ")"
                ))
                .bind($crate::sqlite::rows::millis(recheck_at))
                .bind($crate::sqlite::rows::millis(now))
                .bind(i64::from(limit))
                .execute(&self.$writer)
                .await?;
                Ok($crate::ExpiredPayloads {
                    expunged: done.rows_affected(),
                    set_aside: set_aside.rows_affected(),
                })
            }

            async fn expunge_payload(
                &self,
                app_id: &herald_core::AppId,
                id_or_event_id: &str,
            ) -> $crate::Result<bool> {
                // With its deliveries still to be made: the store's own statements.
                self.expunge_payload_and_fail_deliveries(app_id, id_or_event_id)
                    .await
            }

            async fn expunge_attempt_response(
                &self,
                app_id: &herald_core::AppId,
                msg_id: &herald_core::MessageId,
                attempt_id: &str,
            ) -> $crate::Result<bool> {
                let done = ::sqlx::query(
                    "UPDATE attempts SET response = $1
                     WHERE id = $2 AND msg_id = $3 AND app_id = $4",
                )
                .bind($crate::EXPUNGED_RESPONSE)
                .bind(attempt_id)
                .bind(msg_id.as_str())
                .bind(app_id.as_str())
                .execute(&self.$writer)
                .await?;
                Ok(done.rows_affected() > 0)
            }

            async fn delete_attempts_before(
                &self,
                before: ::chrono::DateTime<::chrono::Utc>,
                limit: u32,
            ) -> $crate::Result<u64> {
                let done = ::sqlx::query(concat!(
                    "DELETE FROM attempts WHERE ",
                    $key,
                    " IN (SELECT ",
                    $key,
                    " FROM attempts WHERE id < $1 ORDER BY id LIMIT CAST($2 AS BIGINT) ",
                    $lock,
                    ")"
                ))
                .bind(herald_core::id::lower_bound(
                    herald_core::id::ATTEMPT,
                    before,
                ))
                .bind(i64::from(limit))
                .execute(&self.$writer)
                .await?;
                Ok(done.rows_affected())
            }

            async fn delete_messages_before(
                &self,
                before: ::chrono::DateTime<::chrono::Utc>,
                limit: u32,
            ) -> $crate::Result<u64> {
                let done = ::sqlx::query(concat!(
                    "DELETE FROM messages WHERE ",
                    $key,
                    " IN (SELECT m.",
                    $key,
                    " FROM messages m
                      WHERE m.id < $1
                        AND NOT EXISTS (SELECT 1 FROM deliveries d
                                        WHERE d.msg_id = m.id AND d.status IN (1, 3))
                      ORDER BY m.id LIMIT CAST($2 AS BIGINT) ",
                    $lock,
                    ")"
                ))
                .bind(herald_core::id::lower_bound(
                    herald_core::id::MESSAGE,
                    before,
                ))
                .bind(i64::from(limit))
                .execute(&self.$writer)
                .await?;
                Ok(done.rows_affected())
            }

            async fn delete_ingest_events_before(
                &self,
                before: ::chrono::DateTime<::chrono::Utc>,
                limit: u32,
            ) -> $crate::Result<u64> {
                let done = ::sqlx::query(concat!(
                    "DELETE FROM ingest_events WHERE ",
                    $key,
                    " IN (SELECT ",
                    $key,
                    " FROM ingest_events WHERE id < $1 ORDER BY id LIMIT CAST($2 AS BIGINT) ",
                    $lock,
                    ")"
                ))
                .bind(herald_core::id::lower_bound(
                    herald_core::id::INGEST_EVENT,
                    before,
                ))
                .bind(i64::from(limit))
                .execute(&self.$writer)
                .await?;
                Ok(done.rows_affected())
            }
        }

        impl $store {
            /// Empties the app's large tables a batch at a time, then deletes the app: its
            /// endpoints, sources, channel history and positions and scoped tokens go by
            /// cascade. Tables without a foreign key to the app (attempts, occupancy, kept
            /// idempotent responses) are deleted here by name.
            pub(super) async fn delete_app_data(
                &self,
                app_id: &herald_core::AppId,
            ) -> $crate::Result<bool> {
                use ::sqlx::Row as _;
                let uid: Option<Option<String>> =
                    ::sqlx::query("SELECT uid FROM apps WHERE id = $1")
                        .bind(app_id.as_str())
                        .fetch_optional(&self.$reader)
                        .await?
                        .map(|row| row.try_get("uid"))
                        .transpose()?;
                let Some(uid) = uid else {
                    return Ok(false);
                };
                // Messages take their deliveries with them (cascade).
                for delete in [
                    concat!(
                        "DELETE FROM attempts WHERE ",
                        $key,
                        " IN (SELECT ",
                        $key,
                        " FROM attempts WHERE app_id = $1 LIMIT CAST($2 AS BIGINT) ",
                        $lock,
                        ")"
                    ),
                    concat!(
                        "DELETE FROM ingest_events WHERE ",
                        $key,
                        " IN (SELECT ",
                        $key,
                        " FROM ingest_events WHERE app_id = $1 LIMIT CAST($2 AS BIGINT) ",
                        $lock,
                        ")"
                    ),
                    concat!(
                        "DELETE FROM messages WHERE ",
                        $key,
                        " IN (SELECT ",
                        $key,
                        " FROM messages WHERE app_id = $1 LIMIT CAST($2 AS BIGINT) ",
                        $lock,
                        ")"
                    ),
                ] {
                    loop {
                        let done = $crate::sql::retrying_deadlocks(|| {
                            ::sqlx::query(delete)
                                .bind(app_id.as_str())
                                .bind(i64::from($crate::RETENTION_BATCH))
                                .execute(&self.$writer)
                        })
                        .await?;
                        if done.rows_affected() < u64::from($crate::RETENTION_BATCH) {
                            break;
                        }
                        $($between_batches;)?
                    }
                }
                ::sqlx::query("DELETE FROM channel_occupancy WHERE app_id = $1")
                    .bind(app_id.as_str())
                    .execute(&self.$writer)
                    .await?;
                // Kept `Idempotency-Key` responses of the app's routes (scopes end in the
                // path, and a path names the app by id or uid): they may hold its payloads.
                for name in std::iter::once(app_id.as_str()).chain(uid.as_deref()) {
                    let path = format!(":/api/v1/app/{name}");
                    ::sqlx::query(concat!("DELETE FROM idempotency WHERE ", $scope_has_path))
                        .bind(&path)
                        .execute(&self.$writer)
                        .await?;
                }
                let done = $crate::sql::retrying_deadlocks(|| {
                    ::sqlx::query($crate::sql::DELETE_APP)
                        .bind(app_id.as_str())
                        .execute(&self.$writer)
                })
                .await?;
                // Attempts have no key to the app: one a delivery in flight recorded after
                // the loop above (or a row it skipped while locked) goes now, with the app
                // gone, a handful at most.
                ::sqlx::query("DELETE FROM attempts WHERE app_id = $1")
                    .bind(app_id.as_str())
                    .execute(&self.$writer)
                    .await?;
                Ok(done.rows_affected() > 0)
            }
        }
    };
}
pub(crate) use retention_store;

/// Trimming a channel to its retention costs a statement of its own, so both backends run it on
/// every `TRIM_EVERY`th offset; readers apply the retention themselves meanwhile.
pub(crate) const TRIM_EVERY: i64 = 16;

/// What a channel keeps once `entry` has landed at offset `seq`: the oldest offset, and the
/// oldest creation time (milliseconds) its retention allows.
pub(crate) fn kept_from(entry: &herald_core::history::NewHistoryEntry, seq: i64) -> (i64, i64) {
    let retention = entry.retention;
    let oldest_offset = seq
        .saturating_sub(i64::try_from(retention.max_events).unwrap_or(i64::MAX))
        .saturating_add(1);
    let max_age = chrono::Duration::from_std(retention.max_age).unwrap_or(chrono::Duration::MAX);
    let oldest_time = entry
        .created_at
        .checked_sub_signed(max_age)
        .map_or(i64::MIN, |t| t.timestamp_millis());
    (oldest_offset, oldest_time)
}
