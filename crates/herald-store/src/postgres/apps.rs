//! [`AppStore`] on PostgreSQL: apps (read from the database every time, never cached) and API
//! token hashes.

use chrono::Utc;
use herald_core::AppId;
use herald_core::model::App;
use sqlx::{QueryBuilder, Row};

use super::{
    PostgresStore, paginate,
    rows::{self, conflict_as, millis, to_json},
};
use crate::{AppStore, Page, Result, StoreError, TokenScope};

#[async_trait::async_trait]
impl AppStore for PostgresStore {
    async fn create_app(&self, app: &App) -> Result<()> {
        sqlx::query(
            "INSERT INTO apps (id, uid, name, throttle_rate, metadata, created_at, updated_at,
                               pusher_app_id, pusher_key, pusher_secret, pusher_previous_secret,
                               pusher_previous_secret_until, history_rules)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
        )
        .bind(app.id.as_str())
        .bind(&app.uid)
        .bind(&app.name)
        .bind(app.throttle_rate)
        .bind(to_json(&app.metadata))
        .bind(millis(app.created_at))
        .bind(millis(app.updated_at))
        .bind(app.pusher.app_id)
        .bind(&app.pusher.key)
        .bind(&app.pusher.secret)
        .bind(app.pusher.previous.as_ref().map(|p| p.secret.as_str()))
        .bind(app.pusher.previous.as_ref().map(|p| millis(p.until)))
        .bind(rows::history_rules_json(app.history.as_deref()))
        .execute(&self.pool)
        .await
        .map_err(conflict_as(
            "an application with this uid (or Pusher app id or key) already exists",
        ))?;
        Ok(())
    }

    async fn get_app(&self, id_or_uid: &str) -> Result<Option<App>> {
        // An exact id wins over another app's uid equal to it.
        sqlx::query("SELECT * FROM apps WHERE id = $1 OR uid = $1 ORDER BY id = $1 DESC LIMIT 1")
            .bind(id_or_uid)
            .fetch_optional(&self.pool)
            .await?
            .map(|row| rows::app(&row))
            .transpose()
    }

    async fn get_app_by_pusher_key(&self, key: &str) -> Result<Option<App>> {
        sqlx::query("SELECT * FROM apps WHERE pusher_key = $1")
            .bind(key)
            .fetch_optional(&self.pool)
            .await?
            .map(|row| rows::app(&row))
            .transpose()
    }

    async fn get_app_by_pusher_id(&self, app_id: i64) -> Result<Option<App>> {
        sqlx::query("SELECT * FROM apps WHERE pusher_app_id = $1")
            .bind(app_id)
            .fetch_optional(&self.pool)
            .await?
            .map(|row| rows::app(&row))
            .transpose()
    }

    async fn list_apps(&self, page: &Page) -> Result<Vec<App>> {
        let mut q = QueryBuilder::new("SELECT * FROM apps WHERE 1 = 1");
        paginate(&mut q, "id", page);
        q.build()
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(rows::app)
            .collect()
    }

    async fn update_app(&self, app: &App) -> Result<()> {
        let done = sqlx::query(
            "UPDATE apps SET uid = $2, name = $3, throttle_rate = $4, metadata = $5, updated_at = $6,
                    history_rules = $7
             WHERE id = $1",
        )
        .bind(app.id.as_str())
        .bind(&app.uid)
        .bind(&app.name)
        .bind(app.throttle_rate)
        .bind(to_json(&app.metadata))
        .bind(millis(app.updated_at))
        .bind(rows::history_rules_json(app.history.as_deref()))
        .execute(&self.pool)
        .await
        .map_err(conflict_as("an application with this uid already exists"))?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    async fn set_pusher_credentials(
        &self,
        app_id: &AppId,
        credentials: &herald_core::model::PusherCredentials,
    ) -> Result<()> {
        let done = sqlx::query(
            "UPDATE apps SET pusher_key = $2, pusher_secret = $3, pusher_previous_secret = $4,
                             pusher_previous_secret_until = $5
             WHERE id = $1",
        )
        .bind(app_id.as_str())
        .bind(&credentials.key)
        .bind(&credentials.secret)
        .bind(credentials.previous.as_ref().map(|p| p.secret.as_str()))
        .bind(credentials.previous.as_ref().map(|p| millis(p.until)))
        .execute(&self.pool)
        .await
        .map_err(conflict_as("another application has this Pusher key"))?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    async fn delete_app(&self, id: &AppId) -> Result<bool> {
        let done = sqlx::query("DELETE FROM apps WHERE id = $1")
            .bind(id.as_str())
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn add_token(&self, token_hash: &[u8], scope: &TokenScope, name: &str) -> Result<()> {
        let app_id = match scope {
            TokenScope::Environment => None,
            TokenScope::App(id) => Some(id.as_str()),
        };
        sqlx::query(
            "INSERT INTO api_tokens (token_hash, app_id, name, created_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (token_hash) DO NOTHING",
        )
        .bind(token_hash)
        .bind(app_id)
        .bind(name)
        .bind(millis(Utc::now()))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn token_scope(&self, token_hash: &[u8]) -> Result<Option<TokenScope>> {
        let row = sqlx::query("SELECT app_id FROM api_tokens WHERE token_hash = $1")
            .bind(token_hash)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            None => None,
            Some(row) => Some(match row.try_get::<Option<String>, _>("app_id")? {
                None => TokenScope::Environment,
                Some(app) => TokenScope::App(rows::parse_id("api_tokens.app_id", app)?),
            }),
        })
    }

    async fn remove_token(&self, token_hash: &[u8]) -> Result<bool> {
        let done = sqlx::query("DELETE FROM api_tokens WHERE token_hash = $1")
            .bind(token_hash)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }
}
