//! Making the group commit's transactions durable off the writer's path.
//!
//! The group commit commits with `synchronous = NORMAL`: SQLite writes the transaction's
//! frames to the WAL file and returns without an fsync. The batch then goes to the syncer
//! ([`super::run_syncer`]), which fsyncs the WAL file and only then answers the batch's
//! callers; meanwhile the writer already executes the next batch. An fsync flushes everything
//! written to the file before it started, so one fsync answers every batch committed before
//! it, and the writer never waits for the disk. Every other write on the writer connection
//! keeps `synchronous = FULL` (the group commit sets it back after each batch), so those are
//! durable at their own commit as before.

use std::{
    fs::File,
    io,
    path::{Path, PathBuf},
    sync::Mutex,
};

/// Makes durable everything the writer connection has committed so far.
pub(crate) trait Durable: Send + Sync + 'static {
    fn sync(&self) -> io::Result<()>;
}

/// The database's WAL file, fsynced through a descriptor of our own. Linux syncs a file's
/// data whichever descriptor asks, so ours covers what SQLite's connection wrote.
pub(crate) struct WalFile {
    path: PathBuf,
    open: Mutex<Option<Opened>>,
}

struct Opened {
    file: File,
    /// Which file the descriptor is: SQLite deletes the WAL file when its last connection
    /// closes and creates a new one with the next, and syncing the deleted one would sync
    /// nothing that matters.
    #[cfg(unix)]
    inode: u64,
}

impl WalFile {
    /// The WAL file of the database at `db` (SQLite names it `<db>-wal`).
    pub(crate) fn of(db: &Path) -> Self {
        let mut path = db.as_os_str().to_owned();
        path.push("-wal");
        Self {
            path: PathBuf::from(path),
            open: Mutex::new(None),
        }
    }

    fn reopen(&self) -> io::Result<Opened> {
        let file = File::open(&self.path)?;
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(&file.metadata()?);
        Ok(Opened {
            file,
            #[cfg(unix)]
            inode,
        })
    }
}

impl Durable for WalFile {
    fn sync(&self) -> io::Result<()> {
        let mut open = self
            .open
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let current = match open.take() {
            #[cfg(unix)]
            Some(opened)
                if std::fs::metadata(&self.path)
                    .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
                    .ok()
                    == Some(opened.inode) =>
            {
                opened
            }
            // Not open yet, or (unix) the WAL file was replaced, or (elsewhere) we cannot tell.
            _ => match self.reopen() {
                Ok(opened) => opened,
                // A commit always leaves a WAL file; SQLite removes it only when the last
                // connection closes, after checkpointing everything in it into the database
                // and syncing that. So what was committed is durable already, and treating
                // this as a failed sync would refuse every write until a restart.
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e),
            },
        };
        let synced = current.file.sync_data();
        *open = Some(current);
        synced
    }
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    fn inode_held(wal: &WalFile) -> u64 {
        wal.open
            .lock()
            .expect("lock")
            .as_ref()
            .map(|opened| opened.inode)
            .expect("open after a sync")
    }

    #[test]
    fn a_replaced_wal_file_is_opened_again() {
        let dir = tempfile::tempdir().expect("dir");
        let wal = WalFile::of(&dir.path().join("x.db"));
        assert_eq!(wal.path, dir.path().join("x.db-wal"));
        // No WAL file: SQLite removed it after checkpointing it into the database (the last
        // connection closed), so what it held is durable; the sync says so.
        wal.sync()
            .expect("a WAL file checkpointed and removed is durable");
        assert!(
            wal.open.lock().expect("lock").is_none(),
            "nothing held open"
        );

        std::fs::write(&wal.path, b"first").expect("write");
        wal.sync().expect("sync");
        let first = inode_held(&wal);
        // What SQLite does when the last connection closes and a new one opens.
        std::fs::remove_file(&wal.path).expect("remove");
        std::fs::write(&wal.path, b"second").expect("write");
        wal.sync().expect("sync");
        let second = inode_held(&wal);
        let on_disk = std::fs::metadata(&wal.path).expect("stat").ino();
        assert_eq!(second, on_disk, "the descriptor follows the new file");
        assert_ne!(
            first, second,
            "the old file was still open, so its inode is not reused"
        );
    }
}
