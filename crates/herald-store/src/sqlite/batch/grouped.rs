//! A batch applied as set operations: one multi-row statement per kind of write instead of a
//! few statements per write. Each statement is a round trip to SQLite's connection thread, and
//! on a busy machine those round trips, not the SQL, are what limit the rate.
//!
//! Unique-key conflicts (a repeated `eventId`, a provider's retry of an inbound webhook) are
//! expected and reported per write through `ON CONFLICT DO NOTHING RETURNING`; any other error
//! aborts the batch and the caller falls back to applying writes one at a time.
//!
//! Channel history entries get their offsets here, after conflicts and duplicates are known
//! (their entries get none): the positions of every channel the batch touches are taken from
//! the group commit's cache (`positions`) or read in one statement, offsets handed out in batch
//! order, and the final positions written back.

use std::collections::{HashMap, HashSet};

use herald_core::{
    history::{NewHistoryEntry, Position, new_epoch},
    model::{IngestEvent, TriggerType},
};
use serde_json::json;
use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection};

use super::{
    Committed, INGEST_DUPLICATE, MESSAGE_CONFLICT, NewMessage, PendingWrite, STALE_LEASE, WriteOp,
    endpoint_change, next_state,
    positions::{ChannelKey, KnownPosition, PositionCache},
};
use crate::{
    AttemptRecord, OccupancyChange, Occupant, Result, StoreError,
    sqlite::{
        leases::DeliveryKey,
        rows::{self, millis, opt_json, to_json},
    },
};

/// Rows per multi-row statement; the widest row has 11 columns, far under SQLite's limit of
/// 32,766 bound variables per statement.
const ROWS_PER_STATEMENT: usize = 256;

/// Applies `batch`; `rowids` gets the rowid of every new delivery that has a job to hand over.
/// With `cached`, channel positions come from the cache where it has them (see `positions`).
pub(super) async fn apply(
    conn: &mut SqliteConnection,
    batch: &[PendingWrite],
    rowids: &mut HashMap<DeliveryKey, i64>,
    cached: Option<&mut BatchPositions<'_>>,
) -> Result<Vec<Result<Committed>>> {
    let mut outcomes: Vec<Result<Committed>> = batch.iter().map(|_| Ok(Vec::new())).collect();
    let mut messages = Vec::new();
    let mut attempts = Vec::new();
    let mut idempotent = Vec::new();
    let mut histories = Vec::new();
    let mut occupancy = Vec::new();
    // Before the rest, so each write's messages and history entries keep their batch order.
    let ingested = insert_ingest_events(conn, batch).await?;
    for (i, write) in batch.iter().enumerate() {
        match &write.op {
            WriteOp::CreateMessage(new) => messages.push((i, new)),
            WriteOp::RecordAttempt { record, leases } => {
                let key = (
                    record.attempt.msg_id.clone(),
                    record.attempt.endpoint_id.clone(),
                );
                // Checked here, in the transaction that commits the record: a claim made after
                // this point reads the delivery before or after the record, never half of it.
                let current = leases.holds(&key, record.lease);
                if !current {
                    outcomes[i] = Err(StoreError::Conflict(STALE_LEASE.to_owned()));
                }
                attempts.push((record, current));
            }
            WriteOp::AppendHistory { entry } => histories.push((i, &**entry)),
            WriteOp::Publication { message, history } => {
                if let Some(new) = message {
                    messages.push((i, new));
                }
                histories.extend(history.iter().map(|entry| (i, entry)));
            }
            WriteOp::RecordIngest {
                event,
                message,
                history,
            } => {
                if ingested.contains(event.id.as_str()) {
                    messages.push((i, message));
                    histories.extend(history.iter().map(|entry| (i, entry)));
                } else {
                    outcomes[i] = Err(StoreError::Conflict(INGEST_DUPLICATE.to_owned()));
                }
            }
            WriteOp::SaveIdempotent {
                scope,
                key,
                status,
                body,
                at,
            } => idempotent.push((scope.as_str(), key.as_str(), *status, body.as_slice(), *at)),
            WriteOp::ChannelEvents {
                messages: m,
                changes,
            } => {
                messages.extend(m.iter().map(|new| (i, new)));
                occupancy.extend(changes);
            }
        }
    }
    if !messages.is_empty() {
        insert_messages(conn, &messages, &mut outcomes, rowids).await?;
        unrecord_refused_ingests(conn, batch, &ingested, &outcomes).await?;
    }
    if !attempts.is_empty() {
        record_attempts(conn, &attempts).await?;
    }
    if !idempotent.is_empty() {
        save_idempotent(conn, &idempotent).await?;
    }
    // History only for writes whose message went in: a conflicting `eventId` publishes
    // nothing, so its entries must not be kept either, nor consume an offset. Filtered before
    // the offsets are assigned, so the offsets the batch hands out are gap-free.
    let histories: Vec<(usize, &NewHistoryEntry)> = histories
        .into_iter()
        .filter(|(i, _)| outcomes[*i].is_ok())
        .collect();
    if !histories.is_empty() {
        let entries: Vec<&NewHistoryEntry> = histories.iter().map(|(_, entry)| *entry).collect();
        let positions = append_histories(conn, &entries, cached).await?;
        // In batch order, so each write's positions come back in the order it gave its entries.
        for ((i, _), position) in histories.iter().zip(positions) {
            if let Ok(committed) = &mut outcomes[*i] {
                committed.push(position);
            }
        }
    }
    if !occupancy.is_empty() {
        apply_occupancy(conn, &occupancy).await?;
    }
    Ok(outcomes)
}

/// Records the batch's verified inbound webhooks; returns the ids of those that went in. A
/// provider's retry of a delivery already recorded (or recorded earlier in this batch: rows go
/// in in batch order) conflicts on `(source_id, delivery_id)` and does not come back.
async fn insert_ingest_events(
    conn: &mut SqliteConnection,
    batch: &[PendingWrite],
) -> Result<HashSet<String>> {
    let events: Vec<&IngestEvent> = batch
        .iter()
        .filter_map(|write| match &write.op {
            WriteOp::RecordIngest { event, .. } => Some(&**event),
            _ => None,
        })
        .collect();
    let mut inserted = HashSet::with_capacity(events.len());
    for chunk in events.chunks(ROWS_PER_STATEMENT) {
        let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
            "INSERT INTO ingest_events (id, source_id, app_id, delivery_id, headers, body,
                                        event_type, channels, msg_id, received_at) ",
        );
        q.push_values(chunk, |mut row, event| {
            row.push_bind(event.id.as_str())
                .push_bind(event.source_id.as_str())
                .push_bind(event.app_id.as_str())
                .push_bind(&event.delivery_id)
                .push_bind(to_json(&event.headers))
                .push_bind(event.body.as_ref())
                .push_bind(&event.event_type)
                .push_bind(to_json(&event.channels))
                .push_bind(event.msg_id.as_str())
                .push_bind(millis(event.received_at));
        });
        q.push(" ON CONFLICT (source_id, delivery_id) DO NOTHING RETURNING id");
        for row in q.build().fetch_all(&mut *conn).await? {
            inserted.insert(row.try_get::<String, _>("id")?);
        }
    }
    Ok(inserted)
}

/// Takes back the records of inbound webhooks whose message did not go in (its eventId was
/// taken): a delivery is recorded with its message or not at all, so the provider's retry
/// must not find it a duplicate. (Rare: the messages of inbound webhooks have no eventId.)
async fn unrecord_refused_ingests(
    conn: &mut SqliteConnection,
    batch: &[PendingWrite],
    ingested: &HashSet<String>,
    outcomes: &[Result<Committed>],
) -> Result<()> {
    let refused: Vec<&str> = batch
        .iter()
        .zip(outcomes)
        .filter_map(|(write, outcome)| match &write.op {
            WriteOp::RecordIngest { event, .. }
                if outcome.is_err() && ingested.contains(event.id.as_str()) =>
            {
                Some(event.id.as_str())
            }
            _ => None,
        })
        .collect();
    for id in refused {
        sqlx::query("DELETE FROM ingest_events WHERE id = $1")
            .bind(id)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// Applies occupancy changes in the order given: only each occupant's last change matters
/// (entered: a row; left: none), so the batch becomes one insert and one delete.
async fn apply_occupancy(conn: &mut SqliteConnection, changes: &[&OccupancyChange]) -> Result<()> {
    let mut last: HashMap<&Occupant, bool> = HashMap::with_capacity(changes.len());
    for change in changes {
        match change {
            OccupancyChange::Entered(who) => last.insert(who, true),
            OccupancyChange::Left(who) => last.insert(who, false),
        };
    }
    let (entered, left): (Vec<_>, Vec<_>) = last.into_iter().partition(|(_, entered)| *entered);
    // Three columns a row: far under SQLite's bound-variable limit per statement.
    for chunk in entered.chunks(ROWS_PER_STATEMENT) {
        let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
            "INSERT OR IGNORE INTO channel_occupancy (app_id, channel, user_id) ",
        );
        q.push_values(chunk, |mut row, (who, _)| {
            row.push_bind(who.app_id.as_str())
                .push_bind(&who.channel)
                .push_bind(who.user_id.as_deref().unwrap_or(""));
        });
        q.build().execute(&mut *conn).await?;
    }
    for chunk in left.chunks(ROWS_PER_STATEMENT) {
        let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
            "DELETE FROM channel_occupancy WHERE (app_id, channel, user_id) IN (VALUES ",
        );
        let mut rows = q.separated(", ");
        for (who, _) in chunk {
            rows.push("(");
            rows.push_bind_unseparated(who.app_id.as_str());
            rows.push_unseparated(", ");
            rows.push_bind_unseparated(&who.channel);
            rows.push_unseparated(", ");
            rows.push_bind_unseparated(who.user_id.as_deref().unwrap_or(""));
            rows.push_unseparated(")");
        }
        q.push(")");
        q.build().execute(&mut *conn).await?;
    }
    Ok(())
}

async fn insert_messages(
    conn: &mut SqliteConnection,
    messages: &[(usize, &NewMessage)],
    outcomes: &mut [Result<Committed>],
    rowids: &mut HashMap<DeliveryKey, i64>,
) -> Result<()> {
    // Whether each message went in (in `messages`' order); only an `eventId` conflict says no.
    let mut went_in = vec![true; messages.len()];
    for (at, chunk) in messages.chunks(ROWS_PER_STATEMENT).enumerate() {
        let went_in = &mut went_in[at * ROWS_PER_STATEMENT..][..chunk.len()];
        let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
            "INSERT INTO messages (id, app_id, event_id, event_type, channels, tags, payload, created_at, \
             payload_expires_at) ",
        );
        q.push_values(chunk, |mut row, (_, new)| {
            let m = &new.message;
            row.push_bind(m.id.as_str())
                .push_bind(m.app_id.as_str())
                .push_bind(&m.event_id)
                .push_bind(&m.event_type)
                .push_bind(opt_json(&m.channels))
                .push_bind(opt_json(&m.tags))
                .push_bind(m.payload.as_ref())
                .push_bind(millis(m.created_at))
                .push_bind(m.payload_expires_at.map(millis));
        });
        q.push(" ON CONFLICT DO NOTHING");
        if chunk.iter().all(|(_, new)| new.message.event_id.is_none()) {
            // Only an `eventId` can conflict (ids are new): every row goes in, and no row
            // need come back over sqlx's channel to say so.
            let done = q.build().execute(&mut *conn).await?;
            if done.rows_affected() != chunk.len() as u64 {
                if let [went_in] = went_in {
                    // Alone (the one-by-one retry): this write is the one that conflicted.
                    *went_in = false;
                    continue;
                }
                // Never expected; the batch is retried one write at a time, which finds it.
                return Err(StoreError::Batch(
                    "a new message's id was already taken".to_owned(),
                ));
            }
            continue;
        }
        q.push(" RETURNING id");
        let mut inserted = HashSet::with_capacity(chunk.len());
        for row in q.build().fetch_all(&mut *conn).await? {
            inserted.insert(row.try_get::<String, _>("id")?);
        }
        for ((_, new), went_in) in chunk.iter().zip(went_in.iter_mut()) {
            *went_in = inserted.contains(new.message.id.as_str());
        }
    }
    let mut deliveries = Vec::new();
    let mut handing_over = false;
    for ((i, new), went_in) in messages.iter().zip(went_in) {
        if went_in {
            deliveries.extend(new.endpoint_ids.iter().map(|ep| (&new.message, ep)));
            handing_over |= !new.fresh.is_empty();
        } else {
            outcomes[*i] = Err(StoreError::Conflict(MESSAGE_CONFLICT.to_owned()));
        }
    }
    for chunk in deliveries.chunks(ROWS_PER_STATEMENT) {
        let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
            "INSERT INTO deliveries (msg_id, endpoint_id, app_id, status, attempts, trigger_type,
                                     next_attempt_at, updated_at) ",
        );
        q.push_values(chunk, |mut row, (m, endpoint_id)| {
            let created = millis(m.created_at);
            row.push_bind(m.id.as_str())
                .push_bind(endpoint_id.as_str())
                .push_bind(m.app_id.as_str())
                .push_bind(herald_core::model::DeliveryStatus::Pending as i64)
                .push_bind(0_i64)
                .push_bind(TriggerType::Scheduled as i64)
                .push_bind(created)
                .push_bind(created);
        });
        if !handing_over {
            q.build().execute(&mut *conn).await?;
            continue;
        }
        // The rowids are what claims leave out while the deliveries are leased.
        q.push(" RETURNING rowid, msg_id, endpoint_id");
        for row in q.build().fetch_all(&mut *conn).await? {
            rowids.insert(
                (rows::id(&row, "msg_id")?, rows::id(&row, "endpoint_id")?),
                row.try_get("rowid")?,
            );
        }
    }
    Ok(())
}

/// Trimming a channel to its retention costs a statement of its own, so it runs on every
/// `TRIM_EVERY`th offset; readers apply the retention themselves meanwhile.
const TRIM_EVERY: i64 = 16;

/// The positions a grouped batch reads from the cache and those it leaves, for the cache to
/// take once the batch has committed. Applying one write at a time does without: each write's
/// savepoint may be rolled back, so it reads every position from the database.
pub(super) struct BatchPositions<'a> {
    pub cache: &'a PositionCache,
    pub written: Vec<(ChannelKey, KnownPosition)>,
}

/// Assigns each entry its channel's epoch and next offset, in the order given, keeps them, moves
/// each channel's position past its last one, and trims the channels whose new offsets include
/// a multiple of [`TRIM_EVERY`]. Returns each entry's position, in the order given.
///
/// Runs inside the batch's transaction on the single writer connection, so the positions it
/// reads are the committed ones plus what this transaction wrote, and nothing else writes them
/// until it commits. With `cached`, the channels the cache knows are not read at all.
async fn append_histories(
    conn: &mut SqliteConnection,
    entries: &[&NewHistoryEntry],
    cached: Option<&mut BatchPositions<'_>>,
) -> Result<Vec<Position>> {
    // Every channel the batch touches, in first-appearance order.
    let mut channels: HashMap<(&str, &str), usize> = HashMap::new();
    let mut order: Vec<(&str, &str)> = Vec::new();
    // The epoch each channel starts under if it has no position yet: its first entry's.
    let mut first_epochs: Vec<Option<&str>> = Vec::new();
    for entry in entries {
        let key = (entry.app_id.as_str(), entry.channel.as_str());
        channels.entry(key).or_insert_with(|| {
            order.push(key);
            first_epochs.push(entry.first_epoch.as_deref());
            order.len() - 1
        });
    }

    let mut known = match &cached {
        Some(batch) => batch.cache.lookup(&order),
        None => vec![None; order.len()],
    };
    // The positions the cache does not have: one statement for the batch (chunked only beyond
    // `ROWS_PER_STATEMENT` channels), and none when it has them all.
    let unknown: Vec<usize> = (0..order.len()).filter(|i| known[*i].is_none()).collect();
    let mut stored: HashMap<ChannelKey, KnownPosition> = HashMap::new();
    for chunk in unknown.chunks(ROWS_PER_STATEMENT) {
        let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
            "SELECT app_id, channel, epoch, next_offset FROM channel_positions
             WHERE (app_id, channel) IN (VALUES ",
        );
        let mut rows = q.separated(", ");
        for index in chunk {
            let (app_id, channel) = order[*index];
            rows.push("(");
            rows.push_bind_unseparated(app_id);
            rows.push_unseparated(", ");
            rows.push_bind_unseparated(channel);
            rows.push_unseparated(")");
        }
        q.push(")");
        for row in q.build().fetch_all(&mut *conn).await? {
            stored.insert(
                (row.try_get("app_id")?, row.try_get("channel")?),
                KnownPosition {
                    epoch: row.try_get("epoch")?,
                    next_offset: row.try_get("next_offset")?,
                },
            );
        }
    }
    for index in unknown {
        let (app_id, channel) = order[index];
        known[index] = stored.remove(&(app_id.to_owned(), channel.to_owned()));
    }
    let mut assigning: Vec<KnownPosition> = known
        .into_iter()
        .zip(&first_epochs)
        .map(|(known, first_epoch)| match known {
            Some(position) if position.next_offset >= 1 => Ok(position),
            Some(_) => Err(StoreError::Corrupt("next_offset".into())),
            // First use: the epoch its subscribers were told, or a new one; offset 1.
            None => Ok(KnownPosition {
                epoch: first_epoch.map_or_else(new_epoch, str::to_owned),
                next_offset: 1,
            }),
        })
        .collect::<Result<_>>()?;

    // Offsets in the order given.
    let mut seqs = Vec::with_capacity(entries.len());
    for entry in entries {
        let index = channels[&(entry.app_id.as_str(), entry.channel.as_str())];
        let channel = &mut assigning[index];
        seqs.push((channel.next_offset, index));
        channel.next_offset += 1;
    }

    let rows: Vec<(&NewHistoryEntry, i64, &str)> = entries
        .iter()
        .zip(&seqs)
        .map(|(entry, (seq, channel))| (*entry, *seq, assigning[*channel].epoch.as_str()))
        .collect();
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
            "INSERT INTO channel_history (app_id, channel, seq, epoch, event, data, created_at,
                                          raw_json, user_id) ",
        );
        q.push_values(chunk, |mut row, (e, seq, epoch)| {
            row.push_bind(e.app_id.as_str())
                .push_bind(&e.channel)
                .push_bind(*seq)
                .push_bind(*epoch)
                .push_bind(&e.event)
                .push_bind(&e.data)
                .push_bind(millis(e.created_at))
                .push_bind(e.raw_json)
                .push_bind(&e.user_id);
        });
        q.build().execute(&mut *conn).await?;
    }

    // Each channel's position once, past its last offset. The epoch is the one read (or, for
    // a new channel, minted) above, which nothing can have changed since in this transaction.
    let positions: Vec<((&str, &str), &KnownPosition)> =
        order.iter().copied().zip(&assigning).collect();
    for chunk in positions.chunks(ROWS_PER_STATEMENT) {
        let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
            "INSERT INTO channel_positions (app_id, channel, epoch, next_offset) ",
        );
        q.push_values(chunk, |mut row, ((app_id, channel), at)| {
            row.push_bind(*app_id)
                .push_bind(*channel)
                .push_bind(at.epoch.as_str())
                .push_bind(at.next_offset);
        });
        q.push(
            " ON CONFLICT (app_id, channel) DO UPDATE SET epoch = excluded.epoch,
                 next_offset = excluded.next_offset",
        );
        q.build().execute(&mut *conn).await?;
    }

    for (entry, seq, _) in &rows {
        if seq % TRIM_EVERY != 0 {
            continue;
        }
        let retention = entry.retention;
        let keep_from = seq
            .saturating_sub(i64::try_from(retention.max_events).unwrap_or(i64::MAX))
            .saturating_add(1);
        let max_age =
            chrono::Duration::from_std(retention.max_age).unwrap_or(chrono::Duration::MAX);
        let expired = entry
            .created_at
            .checked_sub_signed(max_age)
            .map_or(i64::MIN, millis);
        sqlx::query(
            "DELETE FROM channel_history
             WHERE app_id = $1 AND channel = $2 AND (seq < $3 OR created_at < $4)",
        )
        .bind(entry.app_id.as_str())
        .bind(&entry.channel)
        .bind(keep_from)
        .bind(expired)
        .execute(&mut *conn)
        .await?;
    }

    if let Some(batch) = cached {
        batch
            .written
            .extend(order.iter().zip(&assigning).map(|((app_id, channel), at)| {
                (((*app_id).to_owned(), (*channel).to_owned()), at.clone())
            }));
    }

    rows.iter()
        .map(|(_, seq, epoch)| {
            Ok(Position {
                epoch: (*epoch).to_owned(),
                offset: u64::try_from(*seq)
                    .map_err(|_| StoreError::Corrupt("history offset".into()))?,
            })
        })
        .collect()
}

/// Logs every attempt; moves to its next state only the deliveries of records whose lease is
/// `current`, and applies only their endpoint changes.
async fn record_attempts(
    conn: &mut SqliteConnection,
    records: &[(&AttemptRecord, bool)],
) -> Result<()> {
    for chunk in records.chunks(ROWS_PER_STATEMENT) {
        let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
            "INSERT INTO attempts (id, msg_id, endpoint_id, app_id, url, status, response_status_code,
                                   response, response_duration_ms, trigger_type, created_at) ",
        );
        q.push_values(chunk, |mut row, (record, _)| {
            let a = &record.attempt;
            row.push_bind(a.id.as_str())
                .push_bind(a.msg_id.as_str())
                .push_bind(a.endpoint_id.as_str())
                .push_bind(a.app_id.as_str())
                .push_bind(&a.url)
                .push_bind(a.status as i64)
                .push_bind(a.response_status_code)
                .push_bind(&a.response)
                .push_bind(a.response_duration_ms)
                .push_bind(a.trigger_type as i64)
                .push_bind(millis(a.created_at));
        });
        q.build().execute(&mut *conn).await?;
    }

    // Every delivery's new state in one statement, from a JSON table of updates.
    let current: Vec<&AttemptRecord> = records
        .iter()
        .filter(|(_, current)| *current)
        .map(|(record, _)| *record)
        .collect();
    if current.is_empty() {
        return Ok(());
    }
    let updates: Vec<_> = current
        .iter()
        .map(|record| {
            let a = &record.attempt;
            let (status, next_at) = next_state(record.next);
            json!([
                a.msg_id.as_str(),
                a.endpoint_id.as_str(),
                status as i64,
                next_at,
                i64::from(a.trigger_type == TriggerType::Scheduled),
                millis(a.created_at),
            ])
        })
        .collect();
    sqlx::query(
        "UPDATE deliveries
         SET status = u.status, next_attempt_at = u.next_at, attempts = attempts + u.scheduled,
             updated_at = u.at
         FROM (SELECT value ->> 0 AS msg_id, value ->> 1 AS endpoint_id, value ->> 2 AS status,
                      value ->> 3 AS next_at, value ->> 4 AS scheduled, value ->> 5 AS at
               FROM json_each($1)) AS u
         WHERE deliveries.msg_id = u.msg_id AND deliveries.endpoint_id = u.endpoint_id",
    )
    .bind(serde_json::Value::Array(updates).to_string())
    .execute(&mut *conn)
    .await?;

    // Changes to an endpoint's failure streak are rare; write them one by one.
    for record in current {
        endpoint_change(
            conn,
            &record.attempt.endpoint_id,
            record.endpoint_change,
            millis(record.attempt.created_at),
        )
        .await?;
    }
    Ok(())
}

type IdempotentRow<'a> = (&'a str, &'a str, u16, &'a [u8], i64);

async fn save_idempotent(conn: &mut SqliteConnection, rows: &[IdempotentRow<'_>]) -> Result<()> {
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        let mut q: QueryBuilder<Sqlite> =
            QueryBuilder::new("INSERT INTO idempotency (scope, key, status, body, created_at) ");
        q.push_values(chunk, |mut row, (scope, key, status, body, at)| {
            row.push_bind(*scope)
                .push_bind(*key)
                .push_bind(i64::from(*status))
                .push_bind(*body)
                .push_bind(*at);
        });
        q.push(" ON CONFLICT (scope, key) DO NOTHING");
        q.build().execute(&mut *conn).await?;
    }
    Ok(())
}
