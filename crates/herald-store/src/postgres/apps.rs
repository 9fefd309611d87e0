//! [`AppStore`] on PostgreSQL: apps, read through the node cache (see the module doc of
//! `postgres`); API tokens are in `tokens`.

use herald_core::AppId;
use herald_core::model::{App, PusherCredentials};
use sqlx::QueryBuilder;

use super::{
    PostgresStore, paginate,
    rows::{self, conflict_as, millis, to_json},
};
use crate::{AppStore, Cache, Page, Result, StoreError, sql};

#[async_trait::async_trait]
impl AppStore for PostgresStore {
    async fn create_app(&self, app: &App) -> Result<()> {
        sqlx::query(
            "INSERT INTO apps (id, uid, name, throttle_rate, metadata, created_at, updated_at,
                               pusher_app_id, pusher_key, pusher_secret, pusher_previous_secret,
                               pusher_previous_secret_until, history_rules, socketio,
                               payload_retention_days)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
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
        .bind(sql::seal_app_secret(
            &self.keys,
            &app.id,
            &app.pusher.secret,
        ))
        .bind(sql::seal_app_previous_secret(
            &self.keys,
            &app.id,
            &app.pusher,
        ))
        .bind(app.pusher.previous.as_ref().map(|p| millis(p.until)))
        .bind(rows::history_rules_json(app.history.as_deref()))
        .bind(rows::socketio_json(app.socketio.as_ref()))
        .bind(app.payload_retention_days.map(i64::from))
        .execute(&self.pool)
        .await
        .map_err(conflict_as(
            "an application with this uid (or Pusher app id or key) already exists",
        ))?;
        Ok(())
    }

    async fn get_app(&self, id_or_uid: &str) -> Result<Option<App>> {
        let read = async {
            sqlx::query(sql::GET_APP)
                .bind(id_or_uid)
                .fetch_optional(&self.pool)
                .await?
                .map(|row| rows::app(&row, &self.keys))
                .transpose()
        };
        self.cache
            .read_through(self.cache.app(id_or_uid), read, Cache::put_app)
            .await
    }

    async fn get_app_by_pusher_key(&self, key: &str) -> Result<Option<App>> {
        self.cached_app(&format!("pusher-key:{key}"), sql::APP_BY_PUSHER_KEY, key)
            .await
    }

    fn cached_app_by_pusher_id(&self, app_id: i64) -> Option<App> {
        self.cache.app(&format!("pusher-id:{app_id}"))
    }

    async fn get_app_by_pusher_id(&self, app_id: i64) -> Result<Option<App>> {
        self.cached_app(
            &format!("pusher-id:{app_id}"),
            sql::APP_BY_PUSHER_ID,
            app_id,
        )
        .await
    }

    async fn list_apps(&self, page: &Page) -> Result<Vec<App>> {
        let mut q = QueryBuilder::new(sql::LIST_APPS);
        paginate(&mut q, "id", page);
        q.build()
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|row| rows::app(row, &self.keys))
            .collect()
    }

    async fn socketio_app_keys(&self) -> Result<Vec<String>> {
        let rows: Vec<(String, Option<String>)> = sqlx::query_as(sql::SOCKETIO_APP_KEYS)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .into_iter()
            .flat_map(|(id, uid)| std::iter::once(id).chain(uid))
            .collect())
    }

    async fn update_app(&self, app: &App, read_at: chrono::DateTime<chrono::Utc>) -> Result<()> {
        let done = sql::update_app!(app, read_at)
            .execute(&self.pool)
            .await
            .map_err(conflict_as("an application with this uid already exists"))?;
        self.cache.invalidate();
        if done.rows_affected() == 0 {
            let exists = sqlx::query(sql::APP_EXISTS)
                .bind(app.id.as_str())
                .fetch_optional(&self.pool)
                .await?
                .is_some();
            return Err(if exists {
                StoreError::Conflict(crate::APP_CHANGED.to_owned())
            } else {
                StoreError::NotFound
            });
        }
        Ok(())
    }

    async fn set_pusher_credentials(
        &self,
        app_id: &AppId,
        credentials: &herald_core::model::PusherCredentials,
    ) -> Result<()> {
        let done = sql::set_pusher_credentials!(app_id, credentials, &self.keys, None)
            .execute(&self.pool)
            .await
            .map_err(conflict_as("another application has this Pusher key"))?;
        self.cache.invalidate();
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    async fn rotate_pusher_secret(
        &self,
        app_id: &AppId,
        secret: &str,
        previous_until: Option<chrono::DateTime<chrono::Utc>>,
    ) -> Result<PusherCredentials> {
        sql::rotate_pusher_secret!(self, &self.pool, &self.pool, app_id, secret, previous_until)
    }

    async fn delete_app(&self, id: &AppId) -> Result<bool> {
        let deleted = self.delete_app_data(id).await;
        self.cache.invalidate();
        deleted
    }
}
