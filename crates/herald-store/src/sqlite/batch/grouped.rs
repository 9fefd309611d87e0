//! A batch applied kind by kind: every write of a kind through one prepared statement, on the
//! writer's SQLite handle in this thread (see `locked`). A statement costs SQLite's work and
//! nothing more, so each row is its own execution of the statement, and whether it went in is
//! the count of rows it changed.
//!
//! Unique-key conflicts (a repeated `eventId`, a provider's retry of an inbound webhook) are
//! expected and reported per write through `ON CONFLICT DO NOTHING`; any other error aborts the
//! batch and the caller falls back to applying writes one at a time.
//!
//! Channel history entries get their offsets here, after conflicts and duplicates are known
//! (their entries get none): the positions of every channel the batch touches are taken from
//! the group commit's cache (`positions`) or read, offsets handed out in batch order, and the
//! final positions written back.

use std::collections::{HashMap, HashSet};

use herald_core::{
    history::{NewHistoryEntry, Position, new_epoch},
    model::{DeliveryStatus, IngestEvent, TriggerType},
};
use rusqlite::{Connection, OptionalExtension, params};

use super::{
    Committed, INGEST_DUPLICATE, MESSAGE_CONFLICT, NewMessage, PendingWrite, STALE_LEASE, WriteOp,
    endpoint_change, next_state,
    positions::{ChannelKey, KnownPosition, PositionCache},
};
use crate::{
    AttemptRecord, OccupancyChange, Occupant, Result, StoreError, sql,
    sqlite::{
        leases::DeliveryKey,
        rows::{millis, opt_json, to_json},
    },
};

/// Applies `batch`; `rowids` gets the rowid of every new delivery that has a job to hand over.
/// With `cached`, channel positions come from the cache where it has them (see `positions`).
pub(super) fn apply(
    conn: &Connection,
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
    let ingested = insert_ingest_events(conn, batch)?;
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
        insert_messages(conn, &messages, &mut outcomes, rowids)?;
        unrecord_refused_ingests(conn, batch, &ingested, &outcomes)?;
    }
    if !attempts.is_empty() {
        record_attempts(conn, &attempts)?;
    }
    if !idempotent.is_empty() {
        save_idempotent(conn, &idempotent)?;
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
        let positions = append_histories(conn, &entries, cached)?;
        // In batch order, so each write's positions come back in the order it gave its entries.
        for ((i, _), position) in histories.iter().zip(positions) {
            if let Ok(committed) = &mut outcomes[*i] {
                committed.push(position);
            }
        }
    }
    if !occupancy.is_empty() {
        apply_occupancy(conn, &occupancy)?;
    }
    Ok(outcomes)
}

/// Records the batch's verified inbound webhooks; returns the ids of those that went in. A
/// provider's retry of a delivery already recorded (or recorded earlier in this batch: rows go
/// in in batch order) conflicts on `(source_id, delivery_id)` and changes nothing.
fn insert_ingest_events<'a>(
    conn: &Connection,
    batch: &'a [PendingWrite],
) -> Result<HashSet<&'a str>> {
    let events: Vec<&IngestEvent> = batch
        .iter()
        .filter_map(|write| match &write.op {
            WriteOp::RecordIngest { event, .. } => Some(&**event),
            _ => None,
        })
        .collect();
    let mut inserted = HashSet::with_capacity(events.len());
    if events.is_empty() {
        return Ok(inserted);
    }
    let mut insert = conn.prepare_cached(
        "INSERT INTO ingest_events (id, source_id, app_id, delivery_id, headers, body,
                                    event_type, channels, msg_id, received_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
         ON CONFLICT (source_id, delivery_id) DO NOTHING",
    )?;
    for event in events {
        let changed = insert.execute(params![
            event.id.as_str(),
            event.source_id.as_str(),
            event.app_id.as_str(),
            event.delivery_id,
            to_json(&event.headers),
            event.body.as_ref(),
            event.event_type,
            to_json(&event.channels),
            event.msg_id.as_str(),
            millis(event.received_at),
        ])?;
        if changed == 1 {
            inserted.insert(event.id.as_str());
        }
    }
    Ok(inserted)
}

/// Takes back the records of inbound webhooks whose message did not go in (its eventId was
/// taken): a delivery is recorded with its message or not at all, so the provider's retry
/// must not find it a duplicate. (Rare: the messages of inbound webhooks have no eventId.)
fn unrecord_refused_ingests(
    conn: &Connection,
    batch: &[PendingWrite],
    ingested: &HashSet<&str>,
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
    if refused.is_empty() {
        return Ok(());
    }
    let mut delete = conn.prepare_cached("DELETE FROM ingest_events WHERE id = ?1")?;
    for id in refused {
        delete.execute([id])?;
    }
    Ok(())
}

/// Applies occupancy changes in the order given: only each occupant's last change matters
/// (entered: a row; left: none).
fn apply_occupancy(conn: &Connection, changes: &[&OccupancyChange]) -> Result<()> {
    let mut last: HashMap<&Occupant, bool> = HashMap::with_capacity(changes.len());
    for change in changes {
        match change {
            OccupancyChange::Entered(who) => last.insert(who, true),
            OccupancyChange::Left(who) => last.insert(who, false),
        };
    }
    let mut enter = conn.prepare_cached(
        "INSERT OR IGNORE INTO channel_occupancy (app_id, channel, user_id) VALUES (?1, ?2, ?3)",
    )?;
    let mut leave = conn.prepare_cached(
        "DELETE FROM channel_occupancy WHERE app_id = ?1 AND channel = ?2 AND user_id = ?3",
    )?;
    for (who, entered) in last {
        let row = params![
            who.app_id.as_str(),
            who.channel,
            who.user_id.as_deref().unwrap_or("")
        ];
        if entered {
            enter.execute(row)?;
        } else {
            leave.execute(row)?;
        }
    }
    Ok(())
}

/// Inserts each message and, if it went in, its deliveries. A message only fails to go in on an
/// `eventId` already taken (its id is new), which is that write's conflict.
fn insert_messages(
    conn: &Connection,
    messages: &[(usize, &NewMessage)],
    outcomes: &mut [Result<Committed>],
    rowids: &mut HashMap<DeliveryKey, i64>,
) -> Result<()> {
    let mut insert_message = conn.prepare_cached(
        "INSERT INTO messages (id, app_id, event_id, event_type, channels, tags, payload,
                               created_at, payload_expires_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
         ON CONFLICT DO NOTHING",
    )?;
    let mut insert_delivery = conn.prepare_cached(
        "INSERT INTO deliveries (msg_id, endpoint_id, app_id, status, attempts, trigger_type,
                                 next_attempt_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, 0, ?5, ?6, ?6)",
    )?;
    for (i, new) in messages {
        let m = &new.message;
        let created = millis(m.created_at);
        let went_in = insert_message.execute(params![
            m.id.as_str(),
            m.app_id.as_str(),
            m.event_id,
            m.event_type,
            opt_json(&m.channels),
            opt_json(&m.tags),
            m.payload.as_ref(),
            created,
            m.payload_expires_at.map(millis),
        ])? == 1;
        if !went_in {
            outcomes[*i] = Err(StoreError::Conflict(MESSAGE_CONFLICT.to_owned()));
            continue;
        }
        for endpoint_id in &new.endpoint_ids {
            insert_delivery.execute(params![
                m.id.as_str(),
                endpoint_id.as_str(),
                m.app_id.as_str(),
                DeliveryStatus::Pending as i64,
                TriggerType::Scheduled as i64,
                created,
            ])?;
            if !new.fresh.is_empty() {
                // The rowids are what claims leave out while the deliveries are leased.
                rowids.insert(
                    (m.id.clone(), endpoint_id.clone()),
                    conn.last_insert_rowid(),
                );
            }
        }
    }
    Ok(())
}

/// The positions a grouped batch reads from the cache and those it leaves, for the cache to
/// take once the batch has committed. Applying one write at a time does without: each write's
/// savepoint may be rolled back, so it reads every position from the database.
pub(super) struct BatchPositions<'a> {
    pub cache: &'a PositionCache,
    pub written: Vec<(ChannelKey, KnownPosition)>,
}

/// Assigns each entry its channel's epoch and next offset, in the order given, keeps them, moves
/// each channel's position past its last one, and trims the channels whose new offsets include
/// a multiple of [`sql::TRIM_EVERY`]. Returns each entry's position, in the order given.
///
/// Runs inside the batch's transaction on the single writer connection, so the positions it
/// reads are the committed ones plus what this transaction wrote, and nothing else writes them
/// until it commits. With `cached`, the channels the cache knows are not read at all.
fn append_histories(
    conn: &Connection,
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
    // The positions the cache does not have, read from the table.
    if known.iter().any(Option::is_none) {
        let mut read = conn.prepare_cached(
            "SELECT epoch, next_offset FROM channel_positions WHERE app_id = ?1 AND channel = ?2",
        )?;
        for (position, (app_id, channel)) in known.iter_mut().zip(&order) {
            if position.is_none() {
                *position = read
                    .query_row([app_id, channel], |row| {
                        Ok(KnownPosition {
                            epoch: row.get(0)?,
                            next_offset: row.get(1)?,
                        })
                    })
                    .optional()?;
            }
        }
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
    let mut insert = conn.prepare_cached(
        "INSERT INTO channel_history (app_id, channel, seq, epoch, event, data, created_at,
                                      raw_json, user_id, except_subscriber)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )?;
    for (e, seq, epoch) in &rows {
        insert.execute(params![
            e.app_id.as_str(),
            e.channel,
            seq,
            epoch,
            e.event,
            e.data,
            millis(e.created_at),
            e.raw_json,
            e.user_id,
            e.except,
        ])?;
    }

    // Each channel's position once, past its last offset. The epoch is the one read (or, for
    // a new channel, minted) above, which nothing can have changed since in this transaction.
    let mut write_position = conn.prepare_cached(
        "INSERT INTO channel_positions (app_id, channel, epoch, next_offset)
         VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (app_id, channel) DO UPDATE SET epoch = excluded.epoch,
             next_offset = excluded.next_offset",
    )?;
    for ((app_id, channel), at) in order.iter().zip(&assigning) {
        write_position.execute(params![app_id, channel, at.epoch, at.next_offset])?;
    }

    let mut trims = rows
        .iter()
        .filter(|(_, seq, _)| seq % sql::TRIM_EVERY == 0)
        .peekable();
    if trims.peek().is_some() {
        // Past the count, or before the channel's first entry still young enough. Not
        // `seq < ?3 OR created_at < ?4`: with the OR, SQLite cannot bound `seq` and walks every
        // entry the channel keeps (a thousand by default) at each trim (PERFORMANCE.md,
        // "History trims that walk only what they delete"). Entries come in offset order, so
        // the expired ones are the oldest; an older one behind a younger (a clock stepped
        // back) is left to `History::purge`, whose trim deletes by age exactly, and reads
        // apply the retention meanwhile.
        let mut trim = conn.prepare_cached(
            "DELETE FROM channel_history
             WHERE app_id = ?1 AND channel = ?2
               AND seq < max(?3, coalesce((SELECT seq FROM channel_history
                                           WHERE app_id = ?1 AND channel = ?2
                                             AND created_at >= ?4
                                           ORDER BY seq LIMIT 1), ?3))",
        )?;
        for (entry, seq, _) in trims {
            let (keep_from, expired) = sql::kept_from(entry, *seq);
            trim.execute(params![
                entry.app_id.as_str(),
                entry.channel,
                keep_from,
                expired
            ])?;
        }
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
fn record_attempts(conn: &Connection, records: &[(&AttemptRecord, bool)]) -> Result<()> {
    let mut insert = conn.prepare_cached(
        "INSERT INTO attempts (id, msg_id, endpoint_id, app_id, url, status, response_status_code,
                               response, response_duration_ms, trigger_type, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
    )?;
    for (record, _) in records {
        let a = &record.attempt;
        insert.execute(params![
            a.id.as_str(),
            a.msg_id.as_str(),
            a.endpoint_id.as_str(),
            a.app_id.as_str(),
            a.url,
            a.status as i64,
            a.response_status_code,
            a.response,
            a.response_duration_ms,
            a.trigger_type as i64,
            millis(a.created_at),
        ])?;
    }

    let mut current = records
        .iter()
        .filter(|(_, current)| *current)
        .map(|(record, _)| *record)
        .peekable();
    if current.peek().is_none() {
        return Ok(());
    }
    let mut update = conn.prepare_cached(
        "UPDATE deliveries
         SET status = ?3, next_attempt_at = ?4, attempts = attempts + ?5, updated_at = ?6
         WHERE msg_id = ?1 AND endpoint_id = ?2",
    )?;
    for record in current {
        let a = &record.attempt;
        let (status, next_at) = next_state(record.next);
        update.execute(params![
            a.msg_id.as_str(),
            a.endpoint_id.as_str(),
            status as i64,
            next_at,
            i64::from(a.trigger_type == TriggerType::Scheduled),
            millis(a.created_at),
        ])?;
        // Changes to an endpoint's failure streak are rare (a state change, not an attempt).
        endpoint_change(
            conn,
            &a.msg_id,
            &a.endpoint_id,
            record.endpoint_change,
            millis(a.created_at),
        )?;
    }
    Ok(())
}

type IdempotentRow<'a> = (&'a str, &'a str, u16, &'a [u8], i64);

fn save_idempotent(conn: &Connection, rows: &[IdempotentRow<'_>]) -> Result<()> {
    let mut insert = conn.prepare_cached(
        "INSERT INTO idempotency (scope, key, status, body, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (scope, key) DO NOTHING",
    )?;
    for (scope, key, status, body, at) in rows {
        insert.execute(params![scope, key, status, body, at])?;
    }
    Ok(())
}
