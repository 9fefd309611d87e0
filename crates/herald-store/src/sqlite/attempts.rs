//! [`AttemptStore`] on SQLite: the attempt log and each delivery's state.

use chrono::Utc;
use herald_core::model::{Attempt, DeliveryStatus, Endpoint, Message};
use herald_core::{AppId, EndpointId, MessageId};
use sqlx::{QueryBuilder, Sqlite};

use super::{
    SqliteStore, paginate,
    rows::{self, to_json},
};
use crate::{AttemptQuery, AttemptScope, AttemptStore, Page, Result, sql};
use crate::{DeliveryQuery, DeliveryState};

#[async_trait::async_trait]
impl AttemptStore for SqliteStore {
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
            i64,
            super::messages::push_message_filters
        );
        paginate(&mut q, "id", page);
        q.build()
            .fetch_all(&self.reader)
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
        // In-flight deliveries are pending in the table; their leases live in memory.
        let leased = to_json(&self.leases.held(Utc::now()));
        let mut q = QueryBuilder::new(
            "SELECT m.*, d.status AS d_status, d.next_attempt_at AS d_next_attempt_at,
                    d.rowid IN (SELECT value FROM json_each(",
        );
        q.push_bind(leased.clone());
        q.push(
            ")) AS d_leased
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
            let leased_rows = |q: &mut QueryBuilder<Sqlite>| {
                q.push("d.rowid IN (SELECT value FROM json_each(");
                q.push_bind(leased.clone());
                q.push("))");
            };
            if status != DeliveryStatus::Success {
                // Written out so SQLite may walk deliveries_endpoint_unsettled (endpoint,
                // status, message), which leaves out successes, instead of every delivery
                // the endpoint ever had.
                q.push(" AND d.status <> 0");
            }
            match status {
                DeliveryStatus::Pending => {
                    q.push(" AND d.status = 1 AND NOT ");
                    leased_rows(&mut q);
                }
                DeliveryStatus::Sending => {
                    q.push(" AND (d.status = 3 OR (d.status = 1 AND ");
                    leased_rows(&mut q);
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
        // Ordered by the delivery's column, not the message's equal one: SQLite then walks the
        // endpoint's index in order instead of sorting all its deliveries for every page.
        paginate(&mut q, "d.msg_id", page);
        q.build()
            .fetch_all(&self.reader)
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
            "SELECT e.*, d.status AS d_status, d.next_attempt_at AS d_next_attempt_at,
                    d.rowid IN (SELECT value FROM json_each(",
        );
        q.push_bind(to_json(&self.leases.held(Utc::now())));
        q.push(
            ")) AS d_leased
             FROM deliveries d JOIN endpoints e ON e.id = d.endpoint_id
             WHERE d.app_id = ",
        );
        q.push_bind(app_id.to_string());
        q.push(" AND d.msg_id = ");
        q.push_bind(msg_id.to_string());
        paginate(&mut q, "d.endpoint_id", page);
        q.build()
            .fetch_all(&self.reader)
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
