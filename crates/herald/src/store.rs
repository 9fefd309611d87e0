//! The store factory: which backend `store.url` names, and opening it.
//!
//! [`run`](crate::run) never names a backend: it asks [`open`] for an `Arc<dyn Store>` and the
//! [`StoreProperties`] that decide what start-up may do with it (only a store owned by this
//! process alone may have its leases taken back at start). Two backends: SQLite (the default,
//! one node) and PostgreSQL (`store.url = "postgres://..."`, shared by several nodes; its pool
//! size is `store.max_connections`). A database URL may hold a password, so no message, log
//! line or `Debug` output here repeats it.

use std::{fmt, path::PathBuf, sync::Arc};

use anyhow::Context;
use herald_store::{
    SecretStore, Store,
    postgres::{PostgresOptions, PostgresStore},
    secrets::{Keyring, Reencrypted},
    sqlite::SqliteStore,
};

/// The backends a `store.url` may name, for error messages.
const BACKENDS: &str = "the backends are sqlite (store.url = \"sqlite://DIR\", or leave store.url unset to use data_dir) and postgres (store.url = \"postgres://USER:PASSWORD@HOST:PORT/DATABASE\")";

/// PostgreSQL connections per node unless `store.max_connections` says otherwise.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 16;

/// A store to open, resolved from the `store` section and `data_dir`.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// The embedded store in this directory.
    Sqlite { dir: PathBuf },
    /// A PostgreSQL database (`postgres://` or `postgresql://`), shared by every node that names
    /// it; `max_connections` is this node's pool size.
    Postgres { url: String, max_connections: u32 },
}

/// Never shows a PostgreSQL URL, which may hold a password.
impl fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sqlite { dir } => f.debug_struct("Sqlite").field("dir", dir).finish(),
            Self::Postgres {
                max_connections, ..
            } => f
                .debug_struct("Postgres")
                .field("url", &"<redacted>")
                .field("max_connections", max_connections)
                .finish(),
        }
    }
}

impl StoreConfig {
    /// `url` unset (or empty): SQLite in `data_dir`. Otherwise `sqlite:DIR` or `sqlite://DIR`
    /// (`sqlite:///abs/dir` for an absolute path), or `postgres://...` / `postgresql://...` (a
    /// libpq-style URL, kept whole; its pool gets [`DEFAULT_MAX_CONNECTIONS`], which
    /// `Config::store_config` replaces with `store.max_connections`). Any other scheme is
    /// refused with a message that names the backends; the URL itself is never repeated, as a
    /// database URL may hold a password.
    pub fn from_url(url: Option<&str>, data_dir: &std::path::Path) -> Result<Self, String> {
        let Some(url) = url.map(str::trim).filter(|u| !u.is_empty()) else {
            return Ok(Self::Sqlite {
                dir: data_dir.to_owned(),
            });
        };
        let scheme_and_rest = url.split_once(':').filter(|(scheme, _)| {
            !scheme.is_empty()
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        });
        let Some((scheme, rest)) = scheme_and_rest else {
            return Err(format!(
                "store.url must start with a backend's scheme; {BACKENDS}"
            ));
        };
        match scheme.to_ascii_lowercase().as_str() {
            "sqlite" => {
                let path = rest.strip_prefix("//").unwrap_or(rest);
                if path.is_empty() {
                    return Err("store.url: sqlite needs a directory (sqlite://DIR)".into());
                }
                if path.contains('?') || path == ":memory:" {
                    return Err(
                        "store.url: the SQLite store is a directory (sqlite://DIR); options and :memory: are not accepted"
                            .into(),
                    );
                }
                Ok(Self::Sqlite {
                    dir: PathBuf::from(path),
                })
            }
            "postgres" | "postgresql" => {
                let host = rest.strip_prefix("//").unwrap_or_default();
                if host.is_empty() {
                    return Err(
                        "store.url: postgres needs a server (postgres://USER:PASSWORD@HOST:PORT/DATABASE)"
                            .into(),
                    );
                }
                Ok(Self::Postgres {
                    url: url.to_owned(),
                    max_connections: DEFAULT_MAX_CONNECTIONS,
                })
            }
            other => Err(format!("store.url: unknown backend {other:?}; {BACKENDS}")),
        }
    }
}

impl fmt::Display for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sqlite { dir } => write!(f, "SQLite in {}", dir.display()),
            Self::Postgres {
                url,
                max_connections,
            } => {
                // Server and database only: never the user or password.
                let server = herald_store::postgres::describe_server(url)
                    .unwrap_or_else(|| "the configured server".into());
                write!(f, "PostgreSQL on {server} (pool of {max_connections})")
            }
        }
    }
}

/// What a backend is, as far as start-up and the rest of the process must know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreProperties {
    /// The backend's name, for logs.
    pub backend: &'static str,
    /// Owned by this process alone: no other node can hold its delivery leases, so any lease
    /// found at start was cut off by the last stop and may be taken back
    /// ([`requeue_leased`](herald_store::MessageStore::requeue_leased)).
    pub single_node: bool,
}

/// An open store and its properties.
pub struct OpenedStore {
    pub store: Arc<dyn Store>,
    pub properties: StoreProperties,
    /// The PostgreSQL store, whose database the nodes of a cluster share: the broker
    /// runs on its pool.
    pub postgres: Option<Arc<PostgresStore>>,
}

/// Open (creating if needed) the store `config` names and bring its schema up to date. Its
/// secrets are encrypted under `keys` (the configured main key and previous ones); `None`:
/// under the key the store generates beside its data (see `herald_store::secrets`).
pub async fn open(config: &StoreConfig, keys: Option<Keyring>) -> anyhow::Result<OpenedStore> {
    match config {
        StoreConfig::Sqlite { dir } => {
            let store = SqliteStore::open_with_keys(dir, keys)
                .await
                .with_context(|| format!("opening the store in {}", dir.display()))?;
            Ok(OpenedStore {
                store: Arc::new(store),
                properties: StoreProperties {
                    backend: "sqlite",
                    single_node: true,
                },
                postgres: None,
            })
        }
        StoreConfig::Postgres {
            url,
            max_connections,
        } => {
            let options = PostgresOptions {
                max_connections: *max_connections,
                ..PostgresOptions::default()
            };
            // The context names the server without the URL; sqlx's errors do not repeat it.
            let store = PostgresStore::open_with_keys(url, options, keys)
                .await
                .with_context(|| format!("opening the store: {config}"))?;
            let store = Arc::new(store);
            Ok(OpenedStore {
                store: Arc::clone(&store) as Arc<dyn Store>,
                properties: StoreProperties {
                    backend: "postgres",
                    // Other nodes may hold leases: they expire instead of being taken back.
                    single_node: false,
                },
                postgres: Some(store),
            })
        }
    }
}

/// Rows of secrets re-encrypted per transaction by [`rotate_main_key`]: small, so a running
/// server's writes wait little for each.
const ROTATION_BATCH: u32 = 100;

/// `herald rotate-main-key`: re-encrypts every secret in the store `config` names under the
/// current main key of `keys` (those under a previous key, and any left in clear), in small
/// transactions while servers run. Opening checks that `keys` has every key in use. Returns
/// what was rewritten and the key everything is now under.
pub async fn rotate_main_key(
    config: &StoreConfig,
    keys: Option<Keyring>,
) -> anyhow::Result<(Reencrypted, String)> {
    let current = keys.as_ref().map(|k| k.current_key_id().to_owned());
    let (done, census) = match config {
        StoreConfig::Sqlite { dir } => {
            let store = SqliteStore::open_with_keys(dir, keys)
                .await
                .with_context(|| format!("opening the store in {}", dir.display()))?;
            let done = store.reencrypt_secrets(true, ROTATION_BATCH).await;
            let census = store.secret_census().await;
            herald_store::StoreLifecycle::close(&store).await;
            (done?, census?)
        }
        StoreConfig::Postgres {
            url,
            max_connections,
        } => {
            let options = PostgresOptions {
                max_connections: *max_connections,
                ..PostgresOptions::default()
            };
            let store = PostgresStore::open_with_keys(url, options, keys)
                .await
                .with_context(|| format!("opening the store: {config}"))?;
            let done = store.reencrypt_secrets(true, ROTATION_BATCH).await;
            let census = store.secret_census().await;
            herald_store::StoreLifecycle::close(&store).await;
            (done?, census?)
        }
    };
    // Without a configured key the store's generated key is the current one.
    let current = current.or_else(|| {
        (census.by_key.len() == 1)
            .then(|| census.by_key.keys().next().cloned())
            .flatten()
    });
    let current = current.unwrap_or_else(|| "the store's generated key".to_owned());
    let others: Vec<&String> = census.by_key.keys().filter(|id| **id != current).collect();
    if census.plaintext > 0 || !others.is_empty() {
        anyhow::bail!(
            "{} secret(s) are still under another key ({}) or in clear after the rotation: a node writing under its own main key meanwhile (every node must have the new key as main_key first); run herald rotate-main-key again once they do",
            census.plaintext
                + others
                    .iter()
                    .filter_map(|id| census.by_key.get(*id))
                    .sum::<u64>(),
            others
                .iter()
                .map(|id| id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok((done, current))
}

/// The Socket.IO face's view of apps: the store's (its cache on SQLite, the database on
/// PostgreSQL), so a change of rules or credentials reaches the next connect on every node.
pub struct StoreApps(pub Arc<dyn Store>);

#[async_trait::async_trait]
impl herald_socketio::Apps for StoreApps {
    async fn find(
        &self,
        uid_or_id: &str,
    ) -> Result<Option<herald_core::model::App>, herald_socketio::Unavailable> {
        self.0.get_app(uid_or_id).await.map_err(|e| {
            tracing::warn!(error = %e, "reading an app for a Socket.IO connection failed");
            herald_socketio::Unavailable
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn sqlite(dir: &str) -> Result<StoreConfig, String> {
        Ok(StoreConfig::Sqlite { dir: dir.into() })
    }

    #[test]
    fn url_forms() {
        let data = Path::new("herald-data");
        let parse = |url| StoreConfig::from_url(url, data);
        assert_eq!(parse(None), sqlite("herald-data"), "unset: data_dir");
        assert_eq!(parse(Some("  ")), sqlite("herald-data"), "empty: data_dir");
        assert_eq!(parse(Some("sqlite://store")), sqlite("store"));
        assert_eq!(parse(Some("sqlite:store")), sqlite("store"));
        assert_eq!(parse(Some("sqlite:///var/lib/h")), sqlite("/var/lib/h"));
        assert_eq!(parse(Some("SQLite:/var/lib/h")), sqlite("/var/lib/h"));
        for bad in [
            "sqlite:",
            "sqlite://",
            "sqlite::memory:",
            "sqlite://x?mode=ro",
        ] {
            let err = parse(Some(bad)).expect_err(bad);
            assert!(err.contains("directory"), "{bad}: {err}");
        }
        for url in [
            "postgres://u:secret@db/herald",
            "postgresql://u:secret@db:5433/herald?sslmode=disable",
            "PostgreSQL://db/herald",
        ] {
            assert_eq!(
                parse(Some(url)),
                Ok(StoreConfig::Postgres {
                    url: url.into(),
                    max_connections: DEFAULT_MAX_CONNECTIONS,
                }),
                "{url}"
            );
        }
        for bad in ["postgres:", "postgres://", "postgresql:db"] {
            let err = parse(Some(bad)).expect_err(bad);
            assert!(err.contains("needs a server"), "{bad}: {err}");
        }
        let err = parse(Some("mysql://u:secret@db")).expect_err("mysql");
        assert!(
            err.contains("\"mysql\"") && err.contains("sqlite") && err.contains("postgres"),
            "{err}"
        );
        assert!(!err.contains("secret"), "the URL is not repeated: {err}");
        let err = parse(Some("/var/lib/herald")).expect_err("no scheme");
        assert!(err.contains("scheme"), "{err}");
    }

    #[test]
    fn describes_itself() {
        let config = StoreConfig::Sqlite {
            dir: "some/dir".into(),
        };
        assert_eq!(config.to_string(), "SQLite in some/dir");
        let config = StoreConfig::Postgres {
            url: "postgres://herald:secret@db.internal:5433/herald".into(),
            max_connections: 4,
        };
        assert_eq!(
            config.to_string(),
            "PostgreSQL on db.internal:5433, database herald (pool of 4)"
        );
        let debug = format!("{config:?}");
        assert!(
            !debug.contains("secret") && debug.contains("redacted"),
            "{debug}"
        );
    }
}
