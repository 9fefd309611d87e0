//! The store factory: which backend `store.url` names, and opening it.
//!
//! [`run`](crate::run) never names a backend: it asks [`open`] for an `Arc<dyn Store>` and the
//! [`StoreProperties`] that decide what start-up may do with it (only a store owned by this
//! process alone may have its leases taken back at start). SQLite is the only backend today;
//! PostgreSQL (issue 11) will be one more arm of [`StoreConfig`], with its pool sizes in the
//! `store` section.

use std::{fmt, path::PathBuf, sync::Arc};

use anyhow::Context;
use herald_store::{Store, sqlite::SqliteStore};

/// The backends a `store.url` may name, for error messages.
const BACKENDS: &str = "the only backend is sqlite (store.url = \"sqlite://DIR\", or leave store.url unset to use data_dir)";

/// A store to open, resolved from the `store` section and `data_dir`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// The embedded store in this directory.
    Sqlite { dir: PathBuf },
}

impl StoreConfig {
    /// `url` unset (or empty): SQLite in `data_dir`. Otherwise `sqlite:DIR` or `sqlite://DIR`
    /// (`sqlite:///abs/dir` for an absolute path). Any other scheme is refused with a message
    /// that names the backends; the URL itself is never repeated, as a database URL may hold a
    /// password.
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
            "postgres" | "postgresql" => Err(format!(
                "store.url: {scheme}:// is not supported yet (issue 11); {BACKENDS}"
            )),
            other => Err(format!("store.url: unknown backend {other:?}; {BACKENDS}")),
        }
    }
}

impl fmt::Display for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sqlite { dir } => write!(f, "SQLite in {}", dir.display()),
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
}

/// Open (creating if needed) the store `config` names and bring its schema up to date.
pub async fn open(config: &StoreConfig) -> anyhow::Result<OpenedStore> {
    match config {
        StoreConfig::Sqlite { dir } => {
            let store = SqliteStore::open(dir)
                .await
                .with_context(|| format!("opening the store in {}", dir.display()))?;
            Ok(OpenedStore {
                store: Arc::new(store),
                properties: StoreProperties {
                    backend: "sqlite",
                    single_node: true,
                },
            })
        }
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
        let err = parse(Some("postgres://u:secret@db/herald")).expect_err("postgres");
        assert!(
            err.contains("postgres:// is not supported yet (issue 11)") && err.contains("sqlite"),
            "{err}"
        );
        assert!(!err.contains("secret"), "the URL is not repeated: {err}");
        let err = parse(Some("mysql://db")).expect_err("mysql");
        assert!(err.contains("\"mysql\"") && err.contains("sqlite"), "{err}");
        let err = parse(Some("/var/lib/herald")).expect_err("no scheme");
        assert!(err.contains("scheme"), "{err}");
    }

    #[test]
    fn describes_itself() {
        let config = StoreConfig::Sqlite {
            dir: "some/dir".into(),
        };
        assert_eq!(config.to_string(), "SQLite in some/dir");
    }
}
