//! Owner-only modes for the data directory and the database files.
//!
//! The database holds everything Herald keeps, its secrets encrypted under a main key that
//! may be the generated one in the same directory (`main.key`, written `0600` here), so the
//! data directory is made `0700` and the database file and its `-wal`, `-shm` and `-journal`
//! files `0600`. The modes are set explicitly, whatever the process umask (which
//! a library must not change): a directory or database file the store creates gets them, and
//! an existing database file, or a directory that already holds one (Herald's own), that
//! others could reach has its group and other bits cleared, logged at info. An existing
//! directory without a database (one the operator named, such as `/srv`) is not changed, as
//! others may use it too; a warning says it is open to other users. The database file is created before SQLite opens it because SQLite gives its side
//! files the database file's mode; they are checked again once the store is open. Unix only;
//! elsewhere the directory is just created.

use std::{io, path::Path};

/// Suffixes SQLite appends to the database file's name for its side files.
const SIDE_FILES: [&str; 3] = ["-wal", "-shm", "-journal"];

/// Before SQLite opens anything: creates `dir` (and its parents) and the empty database file
/// `db_file` in it if missing, and makes both, and any side files already there, owner-only.
pub(super) fn prepare(dir: &Path, db_file: &str) -> io::Result<()> {
    imp::prepare_dir(dir, &dir.join(db_file))?;
    imp::prepare_db_file(&dir.join(db_file))?;
    secure_files(dir, db_file)
}

/// Creates `dir` (and its parents) owner-only if missing, as [`prepare`] does, without the
/// database file (for the serving lock, taken before the store is opened).
pub(super) fn prepare_data_dir(dir: &Path) -> io::Result<()> {
    imp::prepare_dir(dir, &dir.join(super::DB_FILE))
}

/// Makes the database file and whichever of its side files exist owner-only.
pub(super) fn secure_files(dir: &Path, db_file: &str) -> io::Result<()> {
    imp::tighten(&dir.join(db_file), "database file")?;
    for suffix in SIDE_FILES {
        imp::tighten(&dir.join(format!("{db_file}{suffix}")), "database file")?;
    }
    Ok(())
}

/// Writes `contents` to `path` as a new owner-only file (0600), synced to disk; `false` if
/// the file already exists (it is then left as it is, made owner-only).
///
/// The file appears whole or not at all: the contents go to a private temporary file first,
/// which is then hard-linked to `path` (a link never replaces an existing file). A crash or a
/// second process starting at the same moment cannot leave an empty or half-written file.
pub(super) fn write_new_private_file(path: &Path, contents: &[u8]) -> io::Result<bool> {
    use std::io::Write;
    let temporary = path.with_extension(format!(
        "tmp-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    let written = imp::create_new_private(&temporary).and_then(|mut file| {
        file.write_all(contents)?;
        file.sync_all()
    });
    let linked = written.and_then(|()| std::fs::hard_link(&temporary, path));
    let _ = std::fs::remove_file(&temporary);
    match linked {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            imp::tighten(path, "key file")?;
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// Makes an existing file owner-only (nothing if it does not exist).
pub(super) fn secure_file(path: &Path, what: &str) -> io::Result<()> {
    imp::tighten(path, what)
}

#[cfg(unix)]
mod imp {
    use std::{
        fs::{self, DirBuilder, OpenOptions, Permissions},
        io,
        os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
        path::Path,
    };

    pub(super) const DIR_MODE: u32 = 0o700;
    pub(super) const FILE_MODE: u32 = 0o600;
    /// Group and other permission bits: what tightening clears.
    const OTHERS: u32 = 0o077;
    const STICKY: u32 = 0o1000;

    pub(super) fn prepare_dir(dir: &Path, db: &Path) -> io::Result<()> {
        match fs::metadata(dir) {
            Ok(meta) if meta.permissions().mode() & STICKY != 0 => Err(io::Error::other(format!(
                "data directory {} is a shared directory (it has the sticky bit, like /tmp); \
                 give Herald a directory of its own",
                dir.display()
            ))),
            Ok(_) if db.exists() => tighten(dir, "data directory"),
            Ok(meta) => {
                let mode = meta.permissions().mode() & 0o7777;
                if mode & OTHERS != 0 {
                    tracing::warn!(
                        path = %dir.display(),
                        mode = format_args!("{mode:04o}"),
                        "the data directory existed before Herald and other users can reach it; \
                         it is left as it is (the database files are private), but a directory \
                         of Herald's own, mode 0700, is safer"
                    );
                }
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                DirBuilder::new()
                    .recursive(true)
                    .mode(DIR_MODE)
                    .create(dir)?;
                // The umask may have taken bits from the mode asked for: set it outright.
                set_mode(dir, DIR_MODE)
            }
            Err(e) => Err(e),
        }
    }

    pub(super) fn prepare_db_file(path: &Path) -> io::Result<()> {
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .open(path)
        {
            // An empty file is an empty SQLite database.
            Ok(_) => set_mode(path, FILE_MODE),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub(super) fn create_new_private(path: &Path) -> io::Result<fs::File> {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .open(path)?;
        set_mode(path, FILE_MODE)?;
        Ok(file)
    }

    /// Clears the group and other bits of `path` if it exists and has any, saying so.
    pub(super) fn tighten(path: &Path, what: &str) -> io::Result<()> {
        let mode = match fs::metadata(path) {
            Ok(meta) => meta.permissions().mode() & 0o7777,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let tightened = mode & !OTHERS;
        if tightened == mode {
            return Ok(());
        }
        set_mode(path, tightened)?;
        tracing::info!(
            path = %path.display(),
            from = format_args!("{mode:04o}"),
            to = format_args!("{tightened:04o}"),
            "{what} was readable by other users; made it private to its owner"
        );
        Ok(())
    }

    fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
        fs::set_permissions(path, Permissions::from_mode(mode)).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot set mode {mode:04o} on {} ({e}); the store holds secrets, so it \
                     must be private to its owner (0700 for the directory, 0600 for its files)",
                    path.display()
                ),
            )
        })
    }
}

#[cfg(not(unix))]
mod imp {
    use std::{io, path::Path};

    pub(super) fn prepare_dir(dir: &Path, _db: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)
    }

    pub(super) fn prepare_db_file(_path: &Path) -> io::Result<()> {
        Ok(())
    }

    pub(super) fn tighten(_path: &Path, _what: &str) -> io::Result<()> {
        Ok(())
    }

    pub(super) fn create_new_private(path: &Path) -> io::Result<std::fs::File> {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
    }
}

#[cfg(all(test, unix))]
mod tests {
    use std::{
        fs::{self, Permissions},
        os::unix::fs::PermissionsExt,
        path::Path,
    };

    use super::imp::{DIR_MODE, FILE_MODE};
    use crate::{
        StoreLifecycle,
        sqlite::{DB_FILE, SqliteStore},
    };

    fn mode(path: &Path) -> u32 {
        fs::metadata(path)
            .unwrap_or_else(|e| panic!("{} should exist: {e}", path.display()))
            .permissions()
            .mode()
            & 0o7777
    }

    /// Asserts the directory is 0700 and the database and its WAL files are 0600.
    fn assert_private(dir: &Path) {
        assert_eq!(mode(dir), DIR_MODE, "data directory mode");
        for name in [
            DB_FILE.to_owned(),
            format!("{DB_FILE}-wal"),
            format!("{DB_FILE}-shm"),
        ] {
            assert_eq!(mode(&dir.join(&name)), FILE_MODE, "{name} mode");
        }
        if let Ok(meta) = fs::metadata(dir.join(format!("{DB_FILE}-journal"))) {
            assert_eq!(
                meta.permissions().mode() & 0o7777,
                FILE_MODE,
                "journal mode"
            );
        }
    }

    #[tokio::test]
    async fn a_new_store_is_private_to_its_owner() {
        let parent = tempfile::tempdir().expect("temp dir");
        let dir = parent.path().join("data");
        let store = SqliteStore::open(&dir).await.expect("open");
        assert_private(&dir);
        store.close().await;
        assert_private(&dir);
    }

    #[tokio::test]
    async fn an_existing_world_readable_store_is_tightened_on_open() {
        let parent = tempfile::tempdir().expect("temp dir");
        let dir = parent.path().join("data");
        let store = SqliteStore::open(&dir).await.expect("first open");
        store.close().await;
        // A clean close removes the WAL files; leave empty ones as a crash might (an empty WAL
        // is a valid one), then loosen everything.
        let files: Vec<_> = ["", "-wal", "-shm"]
            .iter()
            .map(|suffix| dir.join(format!("{DB_FILE}{suffix}")))
            .collect();
        fs::set_permissions(&dir, Permissions::from_mode(0o755)).expect("chmod dir");
        for file in &files {
            if !file.exists() {
                fs::write(file, b"").expect("create side file");
            }
            fs::set_permissions(file, Permissions::from_mode(0o644)).expect("chmod file");
        }
        assert_eq!(mode(&dir), 0o755);
        assert_eq!(mode(&files[0]), 0o644);

        let store = SqliteStore::open(&dir).await.expect("reopen");
        assert_private(&dir);
        store.close().await;
    }

    #[tokio::test]
    async fn an_existing_directory_without_a_database_is_left_as_it_is() {
        let parent = tempfile::tempdir().expect("temp dir");
        let dir = parent.path().join("shared-with-others");
        fs::create_dir(&dir).expect("mkdir");
        fs::set_permissions(&dir, Permissions::from_mode(0o755)).expect("chmod dir");
        let store = SqliteStore::open(&dir).await.expect("open");
        assert_eq!(mode(&dir), 0o755, "an operator's directory is not changed");
        assert_eq!(
            mode(&dir.join(DB_FILE)),
            0o600,
            "the database file is private"
        );
        store.close().await;
    }

    #[tokio::test]
    async fn an_existing_empty_world_readable_database_file_is_tightened_on_open() {
        let parent = tempfile::tempdir().expect("temp dir");
        let dir = parent.path().join("data");
        fs::create_dir(&dir).expect("mkdir");
        fs::set_permissions(&dir, Permissions::from_mode(0o755)).expect("chmod dir");
        let db = dir.join(DB_FILE);
        fs::write(&db, b"").expect("create db file");
        fs::set_permissions(&db, Permissions::from_mode(0o644)).expect("chmod file");

        let store = SqliteStore::open(&dir).await.expect("open");
        // The side files SQLite creates take the database file's (tightened) mode.
        assert_private(&dir);
        store.close().await;
    }

    #[tokio::test]
    async fn a_shared_sticky_directory_is_refused_not_chmodded() {
        let parent = tempfile::tempdir().expect("temp dir");
        let dir = parent.path().join("shared");
        fs::create_dir(&dir).expect("mkdir");
        fs::set_permissions(&dir, Permissions::from_mode(0o1777)).expect("chmod dir");
        let Err(err) = SqliteStore::open(&dir).await else {
            panic!("a sticky directory should be refused");
        };
        assert!(err.to_string().contains("shared directory"), "{err}");
        assert_eq!(mode(&dir), 0o1777, "left as it was");
    }
}
