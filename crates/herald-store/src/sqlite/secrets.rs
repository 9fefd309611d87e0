//! Secrets at rest on SQLite (see `crate::secrets`): the main key generated into the data
//! directory when none is configured, the keys a store opens with, the census of what its
//! secrets are encrypted under, and their re-encryption in small transactions.

use std::path::Path;

use sqlx::{AssertSqlSafe, Row, SqlitePool};

use super::permissions;
use crate::{
    Result, SecretStore, StoreError,
    secrets::{Keyring, MainKey, Reencrypted, SECRET_TABLES, SecretCensus, SecretError},
};

/// The key generated when none is configured, beside the database.
pub const KEY_FILE: &str = "main.key";

/// The key in `dir`'s key file, if there is one.
pub fn read_key_file(dir: &Path) -> Result<Option<MainKey>> {
    let path = dir.join(KEY_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    permissions::secure_file(&path, "main key file")?;
    MainKey::from_base64(&text).map(Some).map_err(|e| {
        StoreError::Io(std::io::Error::other(format!(
            "{} does not hold a main key: {e}",
            path.display()
        )))
    })
}

/// The keys the store in `dir` opens with. `configured` (the operator's main key and previous
/// ones) when given, with a generated key file's key added as a previous one, so what was
/// written under it still reads until `herald rotate-main-key` has moved it. Without one, the
/// key file's key, generated now (0600) if there is none yet and nothing is encrypted.
pub(super) fn resolve_keys(
    dir: &Path,
    configured: Option<Keyring>,
    census: &SecretCensus,
) -> Result<Keyring> {
    let generated = read_key_file(dir)?;
    let path = dir.join(KEY_FILE);
    let keys = match (configured, generated) {
        (Some(keys), Some(generated)) => {
            if generated.id() != keys.current_key_id() {
                tracing::info!(
                    key = %path.display(),
                    "main key configured; the generated key file still decrypts what was written under it (herald rotate-main-key re-encrypts it, then the file can be deleted)"
                );
            }
            keys.with_previous(&generated)
        }
        (Some(keys), None) => keys,
        (None, Some(generated)) => {
            warn_generated(&path);
            Keyring::new(&generated, &[])
        }
        (None, None) => {
            // Secrets encrypted under a configured key that is now missing: a new key would
            // only hide that.
            if !census.by_key.is_empty() {
                return Err(SecretError::KeysMissing {
                    key_ids: census.by_key.keys().cloned().collect::<Vec<_>>().join(", "),
                }
                .into());
            }
            let key = MainKey::generate();
            let text = format!("{}\n", key.to_base64());
            if !permissions::write_new_private_file(&path, text.as_bytes())? {
                // Another process made it first: use that one.
                return resolve_keys(dir, None, census);
            }
            tracing::info!(key = %path.display(), "generated a main key for secrets at rest");
            warn_generated(&path);
            Keyring::new(&key, &[])
        }
    };
    Ok(keys)
}

fn warn_generated(path: &Path) {
    tracing::warn!(
        key = %path.display(),
        "no main key configured (main_key, HERALD_MAIN_KEY): secrets are encrypted under the key generated in the data directory, beside the database, so a copy of the whole directory can read them; configure a main key kept elsewhere and run herald rotate-main-key"
    );
}

// `BEGIN IMMEDIATE`: each batch reads, then writes; a deferred transaction whose read a
// running server's commit overtook would fail with SQLITE_BUSY_SNAPSHOT, which the busy
// timeout does not retry, and `herald rotate-main-key` would stop halfway.
crate::sql::secret_rewrites!(SqlitePool, "BEGIN IMMEDIATE");

/// Re-encrypts what [`reencrypt_rows`] finds (see there), then empties the WAL of the values
/// it replaced.
pub(super) async fn reencrypt(
    pool: &SqlitePool,
    keys: &Keyring,
    all: bool,
    batch: u32,
) -> Result<Reencrypted> {
    let done = reencrypt_rows(pool, keys, all, batch).await?;
    if done.rewritten > 0 {
        // The replaced values' old pages sit in the WAL until a checkpoint copies the new ones
        // over them and the WAL is emptied. Best effort: readers (another process's) may hold
        // it back, and then the WAL is reused from its start by later writes.
        if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(pool)
            .await
        {
            tracing::debug!(error = %e, "checkpoint after re-encrypting secrets failed");
        }
    }
    Ok(done)
}

#[async_trait::async_trait]
impl SecretStore for super::SqliteStore {
    async fn secret_census(&self) -> Result<SecretCensus> {
        census(&self.reader).await
    }

    async fn reencrypt_secrets(&self, all: bool, batch: u32) -> Result<Reencrypted> {
        // The plaintext is unchanged, so the cache of apps and endpoints stays exact.
        reencrypt(&self.writer, &self.keys, all, batch).await
    }
}
