//! A throwaway schema on the server `HERALD_TEST_POSTGRES_URL` names, for this crate's tests.

use herald_store::postgres::{PostgresOptions, PostgresStore};
use sqlx::{Connection, PgConnection, PgPool};

pub(crate) struct Schema {
    url: String,
    name: String,
}

impl Schema {
    /// `None` (and a line saying why) when `HERALD_TEST_POSTGRES_URL` is unset.
    pub(crate) async fn create(test: &str) -> Option<Self> {
        let Ok(url) = std::env::var("HERALD_TEST_POSTGRES_URL") else {
            herald_test_support::skip!("{test}: HERALD_TEST_POSTGRES_URL is unset");
            return None;
        };
        let name = format!("cluster_{}", crate::new_node_id().to_lowercase());
        let mut conn = PgConnection::connect(&url).await.expect("connect");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA \"{name}\"")))
            .execute(&mut conn)
            .await
            .expect("create schema");
        Some(Self { url, name })
    }

    /// A store on this schema (migrated).
    pub(crate) async fn store(&self) -> PostgresStore {
        let options = PostgresOptions {
            schema: Some(self.name.clone()),
            ..PostgresOptions::default()
        };
        PostgresStore::open(&self.url, options).await.expect("open")
    }

    /// A store on this schema whose connections carry `application_name` (so a test can find
    /// them in `pg_stat_activity`).
    pub(crate) async fn store_named(&self, application_name: &str) -> PostgresStore {
        let separator = if self.url.contains('?') { '&' } else { '?' };
        let url = format!("{}{separator}application_name={application_name}", self.url);
        let options = PostgresOptions {
            schema: Some(self.name.clone()),
            ..PostgresOptions::default()
        };
        PostgresStore::open(&url, options).await.expect("open")
    }

    /// The URL of this schema's server reached at `host_port` instead (a proxy in front).
    pub(crate) fn url_via(&self, host_port: &str) -> String {
        let (scheme, rest) = self.url.split_once("://").expect("a URL");
        let (credentials, server) = match rest.split_once('@') {
            Some((credentials, server)) => (format!("{credentials}@"), server),
            None => (String::new(), rest),
        };
        let path = server.split_once('/').map_or("", |(_, path)| path);
        format!("{scheme}://{credentials}{host_port}/{path}")
    }

    /// The server's `host:port`, as the URL names it.
    pub(crate) fn server(&self) -> String {
        let rest = self
            .url
            .split_once("://")
            .map_or(self.url.as_str(), |(_, r)| r);
        let server = rest.rsplit_once('@').map_or(rest, |(_, s)| s);
        let host_port = server.split(['/', '?']).next().unwrap_or(server);
        if host_port.contains(':') {
            host_port.to_owned()
        } else {
            format!("{host_port}:5432")
        }
    }

    pub(crate) async fn pool(&self) -> PgPool {
        self.store().await.pool().clone()
    }

    pub(crate) async fn drop_now(self) {
        let mut conn = PgConnection::connect(&self.url).await.expect("connect");
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA \"{}\" CASCADE",
            self.name
        )))
        .execute(&mut conn)
        .await
        .expect("drop schema");
    }
}
