//! The group commit's batches on the writer connection's own SQLite handle, statement after
//! statement on this thread.
//!
//! Through sqlx, every statement is a round trip to the connection's thread: the command goes
//! over a channel, that thread wakes, runs it and wakes this task with the answer. A batch was
//! about eight of them (`BEGIN`, one per kind of write, `COMMIT`), and on two busy cores those
//! hand-offs, not SQLite's work, were most of a batch's time and a good part of its CPU
//! (PERFORMANCE.md, "A group commit's time, phase by phase" and "History channels ... where
//! the time goes"). Here the group commit takes the connection's lock (`lock_handle`: one
//! round trip), runs every statement itself through rusqlite, and keeps the lock, and the
//! statements it prepared, for the batches that come in the next few milliseconds (see
//! `batch::commit_while_busy`), then gives it back.
//!
//! It stays the one writer connection of the pool, so everything that relies on a single
//! writer (the positions cache, leases checked before a commit) still holds.

use rusqlite::Connection;
use sqlx::sqlite::LockedSqliteHandle;

use crate::Result;

/// Prepared statements kept for the loan's later batches: every kind of write the group commit
/// makes, with room to spare (rusqlite's default keeps 16).
const STATEMENTS_KEPT: usize = 32;

/// The writer connection's SQLite handle, lent by sqlx to rusqlite for as long as this lives.
///
/// Statements prepared through [`Loan::conn`] (`prepare_cached` keeps them) are finalized when
/// the loan drops (dropping it is how a loan ends), before sqlx has the handle back: sqlx
/// closes its connections with `sqlite3_close`, which fails on a statement left open.
pub(super) struct Loan<'c> {
    // Declared before `_lock`, so it drops first: its statements are finalized while the
    // lock is still held.
    conn: Connection,
    _lock: LockedSqliteHandle<'c>,
}

impl<'c> Loan<'c> {
    #[allow(unsafe_code)]
    pub(super) fn new(mut handle: LockedSqliteHandle<'c>) -> Result<Self> {
        // SAFETY: `handle` holds the lock of the sqlx connection that owns this `sqlite3`, so
        // no other thread uses the handle while the loan lives, and the connection cannot be
        // closed meanwhile (the lock borrows it). `from_handle` makes a `Connection` that does
        // not own the handle: dropping it finalizes what it prepared and leaves the handle
        // open. The loan owns both and drops the `Connection` first (field order), and hands
        // out only borrows of it, so nothing prepared through it outlives the lock.
        let conn = unsafe { Connection::from_handle(handle.as_raw_handle().as_ptr()) }?;
        conn.set_prepared_statement_cache_capacity(STATEMENTS_KEPT);
        Ok(Self {
            conn,
            _lock: handle,
        })
    }

    /// The connection, for this thread's statements.
    pub(super) fn conn(&self) -> &Connection {
        &self.conn
    }
}

#[cfg(test)]
mod tests {
    use sqlx::{Connection as _, SqliteConnection};

    use super::Loan;

    fn insert_three(loan: &Loan<'_>) -> usize {
        let mut insert = loan
            .conn()
            .prepare_cached("INSERT INTO t VALUES (?1)")
            .expect("prepare");
        (0..3).map(|x| insert.execute([x]).expect("insert")).sum()
    }

    /// What a loan leaves behind is what sqlx lent: its writes visible to sqlx, and a
    /// connection that closes (SQLite refuses to close one with a statement left open, and sqlx
    /// treats that as a crash), with the statements each loan kept for its later batches.
    #[tokio::test]
    async fn a_loaned_handle_goes_back_to_sqlx_usable_and_closable() {
        let mut conn = SqliteConnection::connect("sqlite::memory:")
            .await
            .expect("connect");
        sqlx::query("CREATE TABLE t (x INTEGER)")
            .execute(&mut conn)
            .await
            .expect("create");
        {
            let loan = Loan::new(conn.lock_handle().await.expect("lock")).expect("loan");
            // Two batches on one loan: the second runs the statement the first kept.
            assert_eq!(insert_three(&loan) + insert_three(&loan), 6);
        }
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM t")
            .fetch_one(&mut conn)
            .await
            .expect("sqlx reads what the loan wrote");
        assert_eq!(count, 6);
        let loan = Loan::new(conn.lock_handle().await.expect("lock")).expect("loan");
        assert_eq!(insert_three(&loan), 3);
        drop(loan);
        conn.close()
            .await
            .expect("closes: no statement of the loans is left open");
    }
}
