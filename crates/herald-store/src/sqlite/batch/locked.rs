//! The group commit's batch on the writer connection's own SQLite handle, statement after
//! statement on this thread.
//!
//! Through sqlx, every statement is a round trip to the connection's thread: the command goes
//! over a channel, that thread wakes, runs it and wakes this task with the answer. A batch was
//! about eight of them (`BEGIN`, one per kind of write, `COMMIT`), and on two busy cores those
//! hand-offs, not SQLite's work, were most of a batch's time and a good part of its CPU
//! (PERFORMANCE.md, "A group commit's time, phase by phase" and "History channels ... where
//! the time goes"). Here the batch takes the connection's lock once (`lock_handle`: one round
//! trip) and runs every statement itself through rusqlite, then gives the lock back.
//!
//! It stays the one writer connection of the pool, so everything that relies on a single
//! writer (the positions cache, leases checked before a commit) still holds.

use rusqlite::Connection;
use sqlx::sqlite::LockedSqliteHandle;

use crate::Result;

/// Runs `work` on the SQLite connection behind `handle`, through rusqlite, on this thread.
///
/// Every statement `work` prepares borrows the `Connection` given to it, so none outlives this
/// call: they are finalized before sqlx has the handle back (sqlx closes its connections with
/// `sqlite3_close`, which would fail on a statement left open).
#[allow(unsafe_code)]
pub(super) fn on_handle<R>(
    handle: &mut LockedSqliteHandle<'_>,
    work: impl FnOnce(&Connection) -> R,
) -> Result<R> {
    // SAFETY: `handle` holds the lock of the sqlx connection that owns this `sqlite3`, so no
    // other thread uses the handle until it is dropped, and it cannot be dropped (nor the
    // connection closed) while borrowed here. `from_handle` makes a `Connection` that does not
    // own the handle: dropping it finalizes what it prepared and leaves the handle open. It is
    // dropped before this returns (the borrow of `handle` ends here).
    let conn = unsafe { Connection::from_handle(handle.as_raw_handle().as_ptr()) }?;
    let out = work(&conn);
    drop(conn);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use sqlx::{Connection as _, SqliteConnection};

    use super::on_handle;

    /// What the loan leaves behind is what sqlx lent: its writes visible to sqlx, and a
    /// connection that closes (SQLite refuses to close one with a statement left open, and sqlx
    /// treats that as a crash).
    #[tokio::test]
    async fn a_loaned_handle_goes_back_to_sqlx_usable_and_closable() {
        let mut conn = SqliteConnection::connect("sqlite::memory:")
            .await
            .expect("connect");
        let mut handle = conn.lock_handle().await.expect("lock");
        let inserted = on_handle(&mut handle, |c| {
            c.execute_batch("CREATE TABLE t (x INTEGER)")?;
            let mut insert = c.prepare("INSERT INTO t VALUES (?1)")?;
            let mut n = 0;
            for x in 0..3 {
                n += insert.execute([x])?;
            }
            Ok::<_, rusqlite::Error>(n)
        })
        .expect("loan")
        .expect("statements");
        drop(handle);
        assert_eq!(inserted, 3);
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM t")
            .fetch_one(&mut conn)
            .await
            .expect("sqlx reads what the loan wrote");
        assert_eq!(count, 3);
        conn.close()
            .await
            .expect("closes: no statement of the loan is left open");
    }
}
