//! One serving process per data directory.
//!
//! What keeps a delivery from being sent twice at once, an `Idempotency-Key` from running
//! twice, and history offsets from colliding lives in the serving process's memory (the
//! delivery leases, the key claims, the channel-position cache): SQLite's own locking keeps
//! the file consistent, not those. So the process that serves a directory holds an exclusive
//! lock on a file in it for as long as it serves, and a second `herald serve` on the same
//! directory (a mistyped port, a rolling update that starts the new process before the old
//! one has stopped) refuses to start instead of serving beside it. Commands that open the
//! store briefly and send nothing (`migrate`, `rotate-main-key`, `doctor`) do not take it:
//! they are meant to run beside a server.

use std::{
    fs::{File, OpenOptions, TryLockError},
    io::{self, Read, Seek, Write},
    path::{Path, PathBuf},
};

/// The lock file inside the data directory; it holds the serving process's id.
pub const LOCK_FILE: &str = "herald.lock";

/// Why a directory cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum ServingLockError {
    #[error(
        "another Herald process{} is serving the data directory {dir} (it holds {LOCK_FILE}); stop it first, or give this one a data directory of its own (--data)",
        .pid.as_ref().map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    InUse { dir: PathBuf, pid: Option<String> },
    #[error("cannot lock {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// Held while a process serves a data directory; the lock goes with it (or with the process).
#[derive(Debug)]
pub struct ServingLock {
    _file: File,
}

impl ServingLock {
    /// Takes the directory's lock, creating the directory (owner-only, as the store does) and
    /// the lock file if missing; fails at once if another process holds it.
    pub fn acquire(dir: &Path) -> Result<Self, ServingLockError> {
        let path = dir.join(LOCK_FILE);
        let io_error = |source| ServingLockError::Io {
            path: path.clone(),
            source,
        };
        super::permissions::prepare_data_dir(dir).map_err(io_error)?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_error)?;
        super::permissions::secure_file(&path, "serving lock file").map_err(io_error)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let pid = Some(pid.trim().to_owned()).filter(|p| !p.is_empty());
                return Err(ServingLockError::InUse {
                    dir: dir.to_owned(),
                    pid,
                });
            }
            Err(TryLockError::Error(e)) => return Err(io_error(e)),
        }
        // Who holds it, for the message a second process shows.
        let recorded = file
            .set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| write!(file, "{}", std::process::id()));
        if let Err(e) = recorded {
            tracing::debug!(error = %e, "could not record the serving process's id in {LOCK_FILE}");
        }
        Ok(Self { _file: file })
    }
}

/// The file whose lock makes processes migrate one directory's schema one at a time.
const MIGRATION_LOCK_FILE: &str = "herald.migrate.lock";

/// Waits for, then holds, the lock under which one process opens a store and brings its schema
/// up to date.
///
/// sqlx's migrator takes no lock on SQLite: two processes opening a store at once (a server
/// starting and a `herald migrate` or `rotate-main-key` run beside it) each read the applied
/// migrations, then both apply the next one, and the second fails on what the first created
/// ("duplicate column name"); on a new database, the second's first connection fails while the
/// first switches it to WAL. Stores open under this lock instead: the second process waits,
/// then finds nothing to do.
pub(super) async fn lock_for_migration(dir: &Path) -> io::Result<File> {
    let path = dir.join(MIGRATION_LOCK_FILE);
    tokio::task::spawn_blocking(move || {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        super::permissions::secure_file(&path, "migration lock file")?;
        file.lock()?;
        Ok(file)
    })
    .await
    .map_err(io::Error::other)?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_is_served_by_one_holder_at_a_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let first = ServingLock::acquire(&data).expect("the first takes it");
        let Err(ServingLockError::InUse { pid, .. }) = ServingLock::acquire(&data) else {
            panic!("a second holder is refused");
        };
        assert_eq!(
            pid,
            Some(std::process::id().to_string()),
            "and told who holds it"
        );
        let message = ServingLock::acquire(&data)
            .expect_err("refused")
            .to_string();
        assert!(message.contains("another Herald process"), "{message}");
        drop(first);
        let _again = ServingLock::acquire(&data).expect("free once the holder is gone");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&data).expect("dir").permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "created owner-only, as the store creates it");
        }
    }

    /// Two stores opened on one new directory at once, as a server starting and a `herald
    /// migrate` beside it: both open, the schema migrated once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stores_opened_at_once_on_one_directory_migrate_it_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        for _ in 0..5 {
            let data = dir.path().join(format!("data-{}", rand_suffix()));
            let (a, b) = tokio::join!(
                super::super::SqliteStore::open(&data),
                super::super::SqliteStore::open(&data)
            );
            let (a, b) = (a.expect("first open"), b.expect("second open"));
            crate::StoreLifecycle::close(&a).await;
            crate::StoreLifecycle::close(&b).await;
        }
    }

    fn rand_suffix() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        N.fetch_add(1, Ordering::Relaxed)
    }
}
