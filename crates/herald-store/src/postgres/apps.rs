//! [`AppStore`] on PostgreSQL: apps (read from the database every time, never cached) and API
//! token hashes.

use herald_core::AppId;
use herald_core::model::App;
use sqlx::{QueryBuilder, Row};

use super::{
    PostgresStore, paginate,
    rows::{self, conflict_as, millis, to_json},
};
use crate::{AppStore, Page, Result, StoreError, TokenScope, sql};

#[async_trait::async_trait]
impl AppStore for PostgresStore {
    async fn create_app(&self, app: &App) -> Result<()> {
        sqlx::query(
            "INSERT INTO apps (id, uid, name, throttle_rate, metadata, created_at, updated_at,
                               pusher_app_id, pusher_key, pusher_secret, pusher_previous_secret,
                               pusher_previous_secret_until, history_rules, socketio)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
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
        .bind(rows::socketio_json(app.socketio.as_ref()))
        .execute(&self.pool)
        .await
        .map_err(conflict_as(
            "an application with this uid (or Pusher app id or key) already exists",
        ))?;
        Ok(())
    }

    async fn get_app(&self, id_or_uid: &str) -> Result<Option<App>> {
        sqlx::query(sql::GET_APP)
            .bind(id_or_uid)
            .fetch_optional(&self.pool)
            .await?
            .map(|row| rows::app(&row))
            .transpose()
    }

    async fn get_app_by_pusher_key(&self, key: &str) -> Result<Option<App>> {
        sqlx::query(sql::APP_BY_PUSHER_KEY)
            .bind(key)
            .fetch_optional(&self.pool)
            .await?
            .map(|row| rows::app(&row))
            .transpose()
    }

    async fn get_app_by_pusher_id(&self, app_id: i64) -> Result<Option<App>> {
        sqlx::query(sql::APP_BY_PUSHER_ID)
            .bind(app_id)
            .fetch_optional(&self.pool)
            .await?
            .map(|row| rows::app(&row))
            .transpose()
    }

    async fn list_apps(&self, page: &Page) -> Result<Vec<App>> {
        let mut q = QueryBuilder::new(sql::LIST_APPS);
        paginate(&mut q, "id", page);
        q.build()
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(rows::app)
            .collect()
    }

    async fn update_app(&self, app: &App) -> Result<()> {
        let done = sql::update_app!(app)
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
        let done = sql::set_pusher_credentials!(app_id, credentials)
            .execute(&self.pool)
            .await
            .map_err(conflict_as("another application has this Pusher key"))?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    async fn delete_app(&self, id: &AppId) -> Result<bool> {
        let done = sqlx::query(sql::DELETE_APP)
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
        sql::add_token!(token_hash, app_id, name)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn token_scope(&self, token_hash: &[u8]) -> Result<Option<TokenScope>> {
        let row = sqlx::query(sql::TOKEN_SCOPE)
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
        let done = sqlx::query(sql::REMOVE_TOKEN)
            .bind(token_hash)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }
}
