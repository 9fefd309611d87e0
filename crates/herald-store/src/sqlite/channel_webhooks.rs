//! [`ChannelWebhookStore`] on SQLite: channel webhook messages and the occupancy record,
//! committed together through the group commit.

use herald_core::EndpointId;
use herald_core::model::Message;
use sqlx::Row;

use super::{SqliteStore, batch::WriteOp};
use crate::{ChannelWebhookStore, OccupancyChange, Occupant, Result};

#[async_trait::async_trait]
impl ChannelWebhookStore for SqliteStore {
    async fn record_channel_events(
        &self,
        messages: Vec<(Message, Vec<EndpointId>)>,
        changes: Vec<OccupancyChange>,
    ) -> Result<()> {
        let messages = messages
            .into_iter()
            .map(|(message, targets)| self.new_message(message, targets))
            .collect();
        self.submit(WriteOp::ChannelEvents { messages, changes })
            .await
            .map(drop)
    }

    async fn occupants(&self) -> Result<Vec<Occupant>> {
        sqlx::query("SELECT app_id, channel, user_id FROM channel_occupancy ORDER BY app_id, channel, user_id")
            .fetch_all(&self.reader)
            .await?
            .iter()
            .map(|row| {
                let user_id: String = row.try_get("user_id")?;
                Ok(Occupant {
                    app_id: super::rows::id(row, "app_id")?,
                    channel: row.try_get("channel")?,
                    user_id: (!user_id.is_empty()).then_some(user_id),
                })
            })
            .collect()
    }
}
