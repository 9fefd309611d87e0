//! [`AttemptStore`] on PostgreSQL: the attempt log, and where each message stands with each
//! endpoint.
//!
//! Tables (migrations/postgres/0001_init.sql):
//! - `attempts`: id TEXT PK, msg_id, endpoint_id, app_id TEXT, url TEXT, status INTEGER,
//!   response_status_code INTEGER, response TEXT, response_duration_ms BIGINT, trigger_type
//!   INTEGER, created_at BIGINT millis. Indexes attempts_endpoint (endpoint_id, id),
//!   attempts_msg (msg_id, id). `rows::attempt` reads them; `record_attempt` (messages.rs)
//!   writes them.
//! - `deliveries`: msg_id, endpoint_id, app_id, status INTEGER, next_attempt_at BIGINT NULL
//!   and the lease columns. A delivery is in flight (reads as `Sending`) if its status is 3 or
//!   it is pending under a live lease (`lease_token IS NOT NULL AND leased_until > now`), as
//!   the SQLite store reads its in-memory leases. Indexes deliveries_endpoint_msg
//!   (endpoint_id, msg_id) and deliveries_endpoint_unsettled (endpoint_id, status, msg_id)
//!   `WHERE status <> 0`.
//! - `messages` (joined for list_endpoint_deliveries) and `endpoints` (joined for
//!   list_message_deliveries).

use herald_core::{
    AppId, EndpointId, MessageId,
    model::{Attempt, DeliveryStatus, Endpoint, Message},
};
use sqlx::{Postgres, QueryBuilder};

use super::{
    PostgresStore, paginate,
    rows::{self, millis},
};
use crate::{
    AttemptQuery, AttemptScope, AttemptStore, DeliveryQuery, DeliveryState, Page, Result, sql,
};

#[async_trait::async_trait]
impl AttemptStore for PostgresStore {
    async fn list_attempts(
        &self,
        app_id: &AppId,
        scope: &AttemptScope,
        query: &AttemptQuery,
        page: &Page,
    ) -> Result<Vec<Attempt>> {
        let mut q = sql::attempts_query!(
            app_id,
            scope,
            query,
            i32,
            super::messages::push_message_filters
        );
        paginate(&mut q, "id", page);
        q.build()
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(rows::attempt)
            .collect()
    }

    async fn list_endpoint_deliveries(
        &self,
        app_id: &AppId,
        endpoint_id: &EndpointId,
        query: &DeliveryQuery,
        page: &Page,
    ) -> Result<Vec<(Message, DeliveryState)>> {
        let now = millis(self.clock.now());
        let mut q = QueryBuilder::new(
            "SELECT m.*, d.status AS d_status, d.next_attempt_at AS d_next_attempt_at, ",
        );
        leased(&mut q, now);
        q.push(
            " AS d_leased
             FROM deliveries d JOIN messages m ON m.id = d.msg_id
             WHERE d.app_id = ",
        );
        q.push_bind(app_id.to_string());
        q.push(" AND d.endpoint_id = ");
        q.push_bind(endpoint_id.to_string());
        // The window bounds the deliveries' column: the planner carries equalities across the
        // join, not ranges, and it is `deliveries_endpoint_msg` the read walks.
        super::messages::push_message_filters(&mut q, "m", "d.msg_id", &query.message);
        if let Some(status) = query.status {
            if status != DeliveryStatus::Success {
                // Written out so the planner may walk deliveries_endpoint_unsettled (endpoint,
                // status, message), which leaves out successes.
                q.push(" AND d.status <> 0");
            }
            match status {
                DeliveryStatus::Pending => {
                    q.push(" AND d.status = 1 AND NOT ");
                    leased(&mut q, now);
                }
                DeliveryStatus::Sending => {
                    q.push(" AND (d.status = 3 OR (d.status = 1 AND ");
                    leased(&mut q, now);
                    q.push("))");
                }
                DeliveryStatus::Success => {
                    q.push(" AND d.status = 0");
                }
                DeliveryStatus::Fail => {
                    q.push(" AND d.status = 2");
                }
            }
        }
        paginate(&mut q, "m.id", page);
        q.build()
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|row| Ok((rows::message(row)?, rows::delivery_state(row)?)))
            .collect()
    }

    async fn list_message_deliveries(
        &self,
        app_id: &AppId,
        msg_id: &MessageId,
        page: &Page,
    ) -> Result<Vec<(Endpoint, DeliveryState)>> {
        let mut q = QueryBuilder::new(
            "SELECT e.*, d.status AS d_status, d.next_attempt_at AS d_next_attempt_at, ",
        );
        leased(&mut q, millis(self.clock.now()));
        q.push(
            " AS d_leased
             FROM deliveries d JOIN endpoints e ON e.id = d.endpoint_id
             WHERE d.app_id = ",
        );
        q.push_bind(app_id.to_string());
        q.push(" AND d.msg_id = ");
        q.push_bind(msg_id.to_string());
        paginate(&mut q, "d.endpoint_id", page);
        q.build()
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|row| {
                Ok((
                    rows::endpoint(row, "", &self.keys)?,
                    rows::delivery_state(row)?,
                ))
            })
            .collect()
    }
}

/// Whether delivery `d` is under a live lease at `now` (millis).
fn leased(q: &mut QueryBuilder<Postgres>, now: i64) {
    q.push("(d.lease_token IS NOT NULL AND d.leased_until > ");
    q.push_bind(now);
    q.push(")");
}
