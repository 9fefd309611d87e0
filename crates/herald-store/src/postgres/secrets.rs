//! Secrets at rest on PostgreSQL (see `crate::secrets`): the main key a cluster generates into
//! the database when none is configured (`generated_main_key`, migration 0007), the keys a
//! node opens with, the census of what the secrets are encrypted under, and their
//! re-encryption in small transactions while other nodes run.

use sqlx::{AssertSqlSafe, PgPool, Row};

use super::rows::millis;
use crate::{
    Result, SecretStore, StoreError,
    secrets::{Keyring, MainKey, Reencrypted, SECRET_TABLES, SecretCensus, SecretError},
};

/// The key the cluster generated, if one did.
async fn generated_key(pool: &PgPool) -> Result<Option<MainKey>> {
    let text: Option<String> = sqlx::query_scalar("SELECT main_key FROM generated_main_key")
        .fetch_optional(pool)
        .await?;
    text.map(|text| {
        MainKey::from_base64(&text).map_err(|e| {
            StoreError::Corrupt(format!("generated_main_key does not hold a main key: {e}"))
        })
    })
    .transpose()
}

/// The keys a node opens with: `configured` when given (the generated key, if any, added as a
/// previous one, so what was written under it reads until `herald rotate-main-key` moved it);
/// otherwise the cluster's generated key, made now by the first node if nothing is encrypted
/// yet (nodes starting together agree: the first insert wins and every node reads it back).
pub(super) async fn resolve_keys(
    pool: &PgPool,
    configured: Option<Keyring>,
    census: &SecretCensus,
) -> Result<Keyring> {
    let generated = generated_key(pool).await?;
    Ok(match (configured, generated) {
        (Some(keys), Some(generated)) => {
            // Still readable by whoever reads the database, which holds their key: say so at
            // every start until the rotation has moved them.
            let under_generated = census.by_key.get(&generated.id()).copied().unwrap_or(0);
            if under_generated > 0 && generated.id() != keys.current_key_id() {
                tracing::warn!(
                    secrets = under_generated,
                    "main key configured, but secrets are still encrypted under the key the cluster generated and keeps in the database (generated_main_key): run herald rotate-main-key, then delete that row"
                );
            }
            keys.with_previous(&generated)
        }
        (Some(keys), None) => keys,
        (None, generated) => {
            let generated = match generated {
                Some(key) => key,
                None => {
                    if !census.by_key.is_empty() {
                        // Encrypted under a configured key this node lacks: a new key would
                        // only hide that.
                        return Err(SecretError::KeysMissing {
                            key_ids: census.by_key.keys().cloned().collect::<Vec<_>>().join(", "),
                        }
                        .into());
                    }
                    sqlx::query(
                        "INSERT INTO generated_main_key (only_row, main_key, created_at)
                         VALUES (TRUE, $1, $2) ON CONFLICT (only_row) DO NOTHING",
                    )
                    .bind(MainKey::generate().to_base64())
                    .bind(millis(chrono::Utc::now()))
                    .execute(pool)
                    .await?;
                    generated_key(pool).await?.ok_or_else(|| {
                        StoreError::Corrupt("generated_main_key is empty after its insert".into())
                    })?
                }
            };
            tracing::warn!(
                "no main key configured (main_key, HERALD_MAIN_KEY): secrets are encrypted under a key the cluster generated and keeps in the database itself, so anyone who can read the database can read them; configure the same main key on every node and run herald rotate-main-key"
            );
            Keyring::new(&generated, &[])
        }
    })
}

crate::sql::secret_rewrites!(PgPool, "BEGIN");

/// Re-encrypts what [`reencrypt_rows`] finds (see there).
pub(super) async fn reencrypt(
    pool: &PgPool,
    keys: &Keyring,
    all: bool,
    batch: u32,
) -> Result<Reencrypted> {
    reencrypt_rows(pool, keys, all, batch).await
}

#[async_trait::async_trait]
impl SecretStore for super::PostgresStore {
    async fn secret_census(&self) -> Result<SecretCensus> {
        census(&self.pool).await
    }

    async fn reencrypt_secrets(&self, all: bool, batch: u32) -> Result<Reencrypted> {
        reencrypt(&self.pool, &self.keys, all, batch).await
    }
}
