//! Secrets at rest: endpoint signing secrets, the headers endpoints send (which often carry
//! credentials: `Authorization`, API keys), ingest source secrets and apps' Pusher secrets are
//! stored encrypted under a main key, and decrypted inside the store, so nothing above it ever
//! sees a ciphertext.
//!
//! The cipher is XChaCha20-Poly1305 (RustCrypto's `chacha20poly1305`) with a random 24-byte
//! nonce per value: a nonce that long can be drawn at random for as many values as a store will
//! ever write under one key without a collision to fear, which AES-GCM's 12-byte nonce cannot
//! promise as comfortably, and it needs no hardware support to be fast and constant-time.
//!
//! A stored value is text, so it fits the existing TEXT columns:
//! `hk1.<key id>.<base64url(nonce || ciphertext || tag)>`. `hk1` is the format's version; the
//! key id is the first 4 bytes of SHA-256 of the key, in hex, so a reader knows which of its
//! keys to use and a rotation knows what is left to re-encrypt. The associated data names the
//! field and the row (`herald.secret:endpoint.secret:ep_...`): a ciphertext copied to another
//! column or another row does not decrypt.
//!
//! A value without the `hk1.` prefix is a secret stored in clear by a version before this one:
//! it reads as it is, and [`crate::SecretStore::reencrypt_secrets`] (run by every store at
//! open for such values, and by `herald rotate-main-key`) encrypts it. The prefix cannot be
//! mistaken for such a value: lists and header maps were stored as JSON (`[`..., `{`...),
//! endpoint secrets start with
//! `whsec_`, and generated Pusher secrets are hex; only a Pusher secret an operator chose to
//! begin with `hk1.` would be read as a ciphertext (and refused as malformed).

use std::{collections::BTreeMap, fmt, sync::Arc};

use base64::{
    Engine,
    engine::general_purpose::{STANDARD, URL_SAFE, URL_SAFE_NO_PAD},
};
use chacha20poly1305::{
    KeyInit, XChaCha20Poly1305, XNonce,
    aead::{Aead, Payload},
};
use rand::RngCore;
use sha2::{Digest, Sha256};

/// Bytes in a main key.
pub const KEY_LEN: usize = 32;
/// What every encrypted value starts with: the format's version.
const PREFIX: &str = "hk1.";
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
/// Hex characters of a key id (4 bytes).
const KEY_ID_LEN: usize = 8;

/// The fields that hold secrets, named in each value's associated data.
pub(crate) mod field {
    pub(crate) const APP_PUSHER_SECRET: &str = "app.pusher_secret";
    pub(crate) const APP_PUSHER_PREVIOUS_SECRET: &str = "app.pusher_previous_secret";
    pub(crate) const ENDPOINT_SECRET: &str = "endpoint.secret";
    pub(crate) const ENDPOINT_PREVIOUS_SECRETS: &str = "endpoint.previous_secrets";
    pub(crate) const ENDPOINT_HEADERS: &str = "endpoint.headers";
    pub(crate) const SOURCE_SECRETS: &str = "source.secrets";
}

/// A table whose columns hold secrets: `(column, field)` pairs, each column TEXT (the
/// previous Pusher secret may be NULL), the row named by the `id` column.
pub(crate) struct SecretTable {
    pub(crate) name: &'static str,
    pub(crate) columns: &'static [(&'static str, &'static str)],
}

/// Every column that holds a secret. Lists (`previous_secrets`, `secrets`) are encrypted whole,
/// as their JSON text: that hides how many secrets there are, too.
pub(crate) const SECRET_TABLES: [SecretTable; 3] = [
    SecretTable {
        name: "apps",
        columns: &[
            ("pusher_secret", field::APP_PUSHER_SECRET),
            ("pusher_previous_secret", field::APP_PUSHER_PREVIOUS_SECRET),
        ],
    },
    SecretTable {
        name: "endpoints",
        columns: &[
            ("secret", field::ENDPOINT_SECRET),
            ("previous_secrets", field::ENDPOINT_PREVIOUS_SECRETS),
            ("headers", field::ENDPOINT_HEADERS),
        ],
    },
    SecretTable {
        name: "ingest_sources",
        columns: &[("secrets", field::SOURCE_SECRETS)],
    },
];

impl SecretTable {
    /// A page of rows after `$1` by id, at most `$2`: the id, then each secret column.
    pub(crate) fn select_page(&self) -> String {
        let columns: Vec<&str> = self.columns.iter().map(|(column, _)| *column).collect();
        format!(
            "SELECT id, {} FROM {} WHERE id > $1 ORDER BY id LIMIT $2",
            columns.join(", "),
            self.name
        )
    }

    /// Replaces one column's value, only if it is still the one read (`$3`): a value the API
    /// changed meanwhile is left to its writer, who wrote it under the current key.
    pub(crate) fn update(&self, column: &str) -> String {
        format!(
            "UPDATE {} SET {column} = $1 WHERE id = $2 AND {column} = $3",
            self.name
        )
    }
}

/// A main key: 32 random bytes. Its `Debug` shows only its id.
#[derive(Clone, PartialEq, Eq)]
pub struct MainKey {
    bytes: [u8; KEY_LEN],
}

impl fmt::Debug for MainKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MainKey({}, <redacted>)", self.id())
    }
}

/// Why a configured main key was refused. Never repeats the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error(
        "a main key is 32 random bytes in base64 (e.g. `openssl rand -base64 32`); this one is not base64"
    )]
    NotBase64,
    #[error(
        "a main key is 32 random bytes in base64 (e.g. `openssl rand -base64 32`); this one decodes to {0} bytes"
    )]
    BadLength(usize),
}

impl MainKey {
    /// A new random key.
    pub fn generate() -> Self {
        let mut bytes = [0u8; KEY_LEN];
        rand::rng().fill_bytes(&mut bytes);
        Self { bytes }
    }

    /// A key written in base64, standard or URL-safe, padded or not (surrounding whitespace
    /// ignored).
    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        let text = text.trim();
        let decoded = [STANDARD, URL_SAFE]
            .iter()
            .find_map(|engine| engine.decode(text).ok())
            .or_else(|| {
                let unpadded = text.trim_end_matches('=');
                [
                    base64::engine::general_purpose::STANDARD_NO_PAD,
                    URL_SAFE_NO_PAD,
                ]
                .iter()
                .find_map(|engine| engine.decode(unpadded).ok())
            })
            .ok_or(KeyError::NotBase64)?;
        let bytes: [u8; KEY_LEN] = decoded
            .as_slice()
            .try_into()
            .map_err(|_| KeyError::BadLength(decoded.len()))?;
        Ok(Self { bytes })
    }

    /// The key in standard base64, as `main_key` takes it.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.bytes)
    }

    /// The first 4 bytes of SHA-256 of the key, in hex: names the key in stored values and
    /// messages without revealing it.
    pub fn id(&self) -> String {
        let digest = Sha256::digest(self.bytes);
        let mut id = String::with_capacity(KEY_ID_LEN);
        for byte in &digest[..KEY_ID_LEN / 2] {
            id.push_str(&format!("{byte:02x}"));
        }
        id
    }
}

/// Why a stored secret could not be read. Never shows the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("{field} of {row} is not a value Herald can decrypt: {reason}")]
    Malformed {
        field: &'static str,
        row: String,
        reason: &'static str,
    },
    #[error(
        "{field} of {row} is encrypted under main key {key_id}, which is not configured: set it as main_key (HERALD_MAIN_KEY) or add it to previous_main_keys (HERALD_PREVIOUS_MAIN_KEYS)"
    )]
    UnknownKey {
        field: &'static str,
        row: String,
        key_id: String,
    },
    #[error(
        "{field} of {row} does not decrypt under main key {key_id}: it was altered, or copied from another row or column"
    )]
    Forged {
        field: &'static str,
        row: String,
        key_id: String,
    },
    #[error(
        "the store holds secrets encrypted under main key(s) {key_ids}, which this process does not have: configure the key they were written under as main_key (HERALD_MAIN_KEY) or in previous_main_keys (HERALD_PREVIOUS_MAIN_KEYS)"
    )]
    KeysMissing { key_ids: String },
}

/// What a stored value is, without decrypting it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stored<'a> {
    /// Written in clear by a version before encryption at rest.
    Plain,
    /// Encrypted under the key with this id.
    Sealed { key_id: &'a str },
}

impl<'a> Stored<'a> {
    pub(crate) fn of(value: &'a str) -> Self {
        match value.strip_prefix(PREFIX) {
            None => Self::Plain,
            Some(rest) => Self::Sealed {
                key_id: rest.split('.').next().unwrap_or_default(),
            },
        }
    }
}

/// The keys a store encrypts and decrypts with: the current one, which encrypts everything
/// written, and previous ones that still decrypt (during a rotation). Cheap to clone.
#[derive(Clone)]
pub struct Keyring {
    inner: Arc<[KeyEntry]>,
}

struct KeyEntry {
    id: String,
    cipher: XChaCha20Poly1305,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("current", &self.current_key_id())
            .field("previous", &self.key_ids().skip(1).collect::<Vec<_>>())
            .finish()
    }
}

impl Keyring {
    /// Encrypts under `current`; decrypts under it and each of `previous` (a key given twice
    /// counts once).
    pub fn new(current: &MainKey, previous: &[MainKey]) -> Self {
        let mut keys: Vec<&MainKey> = vec![current];
        for key in previous {
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
        let inner = keys
            .into_iter()
            .map(|key| KeyEntry {
                id: key.id(),
                cipher: XChaCha20Poly1305::new(&key.bytes.into()),
            })
            .collect();
        Self { inner }
    }

    /// The same keys, with `key` added as a previous one (if it is not among them).
    pub fn with_previous(&self, key: &MainKey) -> Self {
        let id = key.id();
        if self.inner.iter().any(|entry| entry.id == id) {
            return self.clone();
        }
        let mut entries: Vec<KeyEntry> = self
            .inner
            .iter()
            .map(|entry| KeyEntry {
                id: entry.id.clone(),
                cipher: entry.cipher.clone(),
            })
            .collect();
        entries.push(KeyEntry {
            id,
            cipher: XChaCha20Poly1305::new(&key.bytes.into()),
        });
        Self {
            inner: entries.into(),
        }
    }

    /// The id of the key everything is encrypted under.
    pub fn current_key_id(&self) -> &str {
        self.inner.first().map_or("", |entry| entry.id.as_str())
    }

    /// Every key's id, the current one first.
    pub fn key_ids(&self) -> impl Iterator<Item = &str> {
        self.inner.iter().map(|entry| entry.id.as_str())
    }

    pub fn knows(&self, key_id: &str) -> bool {
        self.key_ids().any(|id| id == key_id)
    }

    /// `plaintext` encrypted under the current key, for `field` of the row `row`.
    pub(crate) fn seal(&self, field: &'static str, row: &str, plaintext: &str) -> String {
        let Some(current) = self.inner.first() else {
            unreachable!("a keyring always has its current key");
        };
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let aad = associated_data(field, row);
        let sealed = current
            .cipher
            .encrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: plaintext.as_bytes(),
                    aad: aad.as_bytes(),
                },
            )
            // Only a plaintext of about 256 GiB could fail.
            .unwrap_or_else(|_| unreachable!("a secret is far below the cipher's limit"));
        let mut data = Vec::with_capacity(NONCE_LEN + sealed.len());
        data.extend_from_slice(&nonce);
        data.extend_from_slice(&sealed);
        format!("{PREFIX}{}.{}", current.id, URL_SAFE_NO_PAD.encode(data))
    }

    /// The secret `stored` holds for `field` of the row `row`: decrypted, or as it is if it
    /// was stored in clear by an earlier version.
    pub(crate) fn open(
        &self,
        field: &'static str,
        row: &str,
        stored: &str,
    ) -> Result<String, SecretError> {
        let Some(rest) = stored.strip_prefix(PREFIX) else {
            return Ok(stored.to_owned());
        };
        let malformed = |reason| SecretError::Malformed {
            field,
            row: row.to_owned(),
            reason,
        };
        let (key_id, encoded) = rest.split_once('.').ok_or_else(|| malformed("no key id"))?;
        if key_id.len() != KEY_ID_LEN || !key_id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(malformed("the key id is not 8 hex digits"));
        }
        let data = URL_SAFE_NO_PAD
            .decode(encoded)
            .map_err(|_| malformed("not base64url"))?;
        if data.len() < NONCE_LEN + TAG_LEN {
            return Err(malformed("too short (truncated?)"));
        }
        let (nonce, sealed) = data.split_at(NONCE_LEN);
        let nonce = XNonce::try_from(nonce).map_err(|_| malformed("bad nonce"))?;
        let aad = associated_data(field, row);
        let mut candidates = self
            .inner
            .iter()
            .filter(|entry| entry.id == key_id)
            .peekable();
        if candidates.peek().is_none() {
            return Err(SecretError::UnknownKey {
                field,
                row: row.to_owned(),
                key_id: key_id.to_owned(),
            });
        }
        // Ids are 32 bits: two keys may share one, so each key with this id is tried.
        let plaintext = candidates
            .find_map(|entry| {
                entry
                    .cipher
                    .decrypt(
                        &nonce,
                        Payload {
                            msg: sealed,
                            aad: aad.as_bytes(),
                        },
                    )
                    .ok()
            })
            .ok_or_else(|| SecretError::Forged {
                field,
                row: row.to_owned(),
                key_id: key_id.to_owned(),
            })?;
        String::from_utf8(plaintext).map_err(|_| malformed("the plaintext is not UTF-8"))
    }

    /// Whether `stored` must be rewritten to be under the current key: it is in clear, or
    /// (`all`) under another key.
    pub(crate) fn needs_sealing(&self, stored: &str, all: bool) -> bool {
        match Stored::of(stored) {
            Stored::Plain => true,
            Stored::Sealed { key_id } => all && key_id != self.current_key_id(),
        }
    }
}

/// Binds a ciphertext to its field and row.
fn associated_data(field: &str, row: &str) -> String {
    format!("herald.secret:{field}:{row}")
}

/// How a store's secrets are kept, counted by [`crate::SecretStore::secret_census`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SecretCensus {
    /// Values still in clear (written before encryption at rest).
    pub plaintext: u64,
    /// Encrypted values by the id of their key.
    pub by_key: BTreeMap<String, u64>,
}

impl SecretCensus {
    pub(crate) fn count(&mut self, stored: &str) {
        match Stored::of(stored) {
            Stored::Plain => self.plaintext += 1,
            Stored::Sealed { key_id } => *self.by_key.entry(key_id.to_owned()).or_default() += 1,
        }
    }

    /// The key ids in use that `keys` lacks, comma-separated; `None` if it has them all.
    pub fn missing_from(&self, keys: &Keyring) -> Option<String> {
        let missing: Vec<&str> = self
            .by_key
            .keys()
            .map(String::as_str)
            .filter(|id| !keys.knows(id))
            .collect();
        (!missing.is_empty()).then(|| missing.join(", "))
    }
}

/// What one pass of [`crate::SecretStore::reencrypt_secrets`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reencrypted {
    /// Values rewritten under the current key.
    pub rewritten: u64,
    /// Values left because the API changed them meanwhile (already under the current key).
    pub skipped: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROW: &str = "ep_2bAbcdefghijklmnopqrstuvwxy";

    fn keyring() -> (MainKey, Keyring) {
        let key = MainKey::generate();
        let ring = Keyring::new(&key, &[]);
        (key, ring)
    }

    #[test]
    fn a_sealed_secret_opens_to_itself_and_hides_it() {
        let (key, ring) = keyring();
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let sealed = ring.seal(field::ENDPOINT_SECRET, ROW, secret);
        assert!(
            sealed.starts_with(&format!("hk1.{}.", key.id())),
            "{sealed}"
        );
        assert!(!sealed.contains("MfKQ9r8"), "{sealed}");
        assert_eq!(
            ring.open(field::ENDPOINT_SECRET, ROW, &sealed).as_deref(),
            Ok(secret)
        );
        // A random nonce each time: the same secret never reads the same twice.
        assert_ne!(sealed, ring.seal(field::ENDPOINT_SECRET, ROW, secret));
        assert_eq!(
            ring.open(field::ENDPOINT_SECRET, ROW, "").as_deref(),
            Ok("")
        );
        let empty = ring.seal(field::ENDPOINT_SECRET, ROW, "");
        assert_eq!(
            ring.open(field::ENDPOINT_SECRET, ROW, &empty).as_deref(),
            Ok("")
        );
    }

    #[test]
    fn a_value_in_clear_reads_as_it_is() {
        let (_, ring) = keyring();
        assert_eq!(
            ring.open(field::APP_PUSHER_SECRET, "app_x", "0123456789abcdef0123")
                .as_deref(),
            Ok("0123456789abcdef0123")
        );
        assert!(ring.needs_sealing("0123456789abcdef0123", false));
    }

    #[test]
    fn another_key_says_which_key_is_missing() {
        let (key, ring) = keyring();
        let sealed = ring.seal(field::SOURCE_SECRETS, "src_1", "[\"s\"]");
        let (_, other) = keyring();
        let err = other
            .open(field::SOURCE_SECRETS, "src_1", &sealed)
            .expect_err("wrong key");
        assert_eq!(
            err,
            SecretError::UnknownKey {
                field: field::SOURCE_SECRETS,
                row: "src_1".into(),
                key_id: key.id(),
            }
        );
        assert!(err.to_string().contains("previous_main_keys"), "{err}");
        // With the old key as a previous one it reads, and needs re-encrypting.
        let rotating = other.with_previous(&key);
        assert_eq!(
            rotating
                .open(field::SOURCE_SECRETS, "src_1", &sealed)
                .as_deref(),
            Ok("[\"s\"]")
        );
        assert!(rotating.needs_sealing(&sealed, true));
        assert!(!rotating.needs_sealing(&sealed, false));
        assert!(!ring.needs_sealing(&sealed, true));
    }

    #[test]
    fn a_key_with_the_same_id_but_other_bytes_is_refused_as_forged() {
        let (key, ring) = keyring();
        let sealed = ring.seal(field::ENDPOINT_SECRET, ROW, "whsec_x");
        // Forge an id collision: another key's ciphertext relabelled with this key's id.
        let (_, other) = keyring();
        let foreign = other.seal(field::ENDPOINT_SECRET, ROW, "whsec_x");
        let relabelled = format!(
            "hk1.{}.{}",
            key.id(),
            foreign.rsplit('.').next().unwrap_or_default()
        );
        assert!(matches!(
            ring.open(field::ENDPOINT_SECRET, ROW, &relabelled),
            Err(SecretError::Forged { .. })
        ));
        assert!(ring.open(field::ENDPOINT_SECRET, ROW, &sealed).is_ok());
    }

    #[test]
    fn a_ciphertext_moved_to_another_field_or_row_does_not_open() {
        let (_, ring) = keyring();
        let sealed = ring.seal(field::APP_PUSHER_SECRET, "app_1", "secret-one");
        for (field, row) in [
            (field::APP_PUSHER_PREVIOUS_SECRET, "app_1"),
            (field::ENDPOINT_SECRET, "app_1"),
            (field::APP_PUSHER_SECRET, "app_2"),
        ] {
            let err = ring.open(field, row, &sealed).expect_err("moved");
            assert!(matches!(err, SecretError::Forged { .. }), "{err:?}");
            assert!(err.to_string().contains("copied from another"), "{err}");
        }
    }

    #[test]
    fn altered_or_truncated_values_are_clear_errors() {
        let (key, ring) = keyring();
        let sealed = ring.seal(field::ENDPOINT_SECRET, ROW, "whsec_abc");
        let open = |value: &str| ring.open(field::ENDPOINT_SECRET, ROW, value);
        // Every truncation fails, none panics.
        for end in PREFIX.len()..sealed.len() {
            let result = open(&sealed[..end]);
            assert!(result.is_err(), "truncated at {end}: {result:?}");
        }
        // A flipped character anywhere in the data.
        let data_start = PREFIX.len() + KEY_ID_LEN + 1;
        for at in data_start..sealed.len() {
            let mut bytes = sealed.clone().into_bytes();
            bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
            let altered = String::from_utf8(bytes).expect("ascii");
            assert!(open(&altered).is_err(), "altered at {at}");
        }
        let cases = [
            ("hk1.", "no key id"),
            ("hk1.zz.abc", "8 hex digits"),
            (&format!("hk1.{}.!!!", key.id()), "base64url"),
            (&format!("hk1.{}.AAAA", key.id()), "too short"),
        ];
        for (value, expected) in cases {
            let err = open(value).expect_err(value);
            assert!(err.to_string().contains(expected), "{value}: {err}");
        }
    }

    #[test]
    fn main_keys_parse_from_base64_and_never_show_themselves() {
        let key = MainKey::generate();
        let text = key.to_base64();
        assert_eq!(text.len(), 44);
        assert_eq!(MainKey::from_base64(&text), Ok(key.clone()));
        assert_eq!(
            MainKey::from_base64(&format!(" {} \n", text.trim_end_matches('='))),
            Ok(key.clone())
        );
        let url_safe = URL_SAFE_NO_PAD.encode(key.bytes);
        assert_eq!(MainKey::from_base64(&url_safe), Ok(key.clone()));
        assert_eq!(
            MainKey::from_base64("c2hvcnQ="),
            Err(KeyError::BadLength(5))
        );
        assert_eq!(
            MainKey::from_base64("not base64!"),
            Err(KeyError::NotBase64)
        );
        let debug = format!("{key:?} {:?}", Keyring::new(&key, &[]));
        assert!(
            !debug.contains(&text) && !debug.contains(&url_safe),
            "{debug}"
        );
        assert!(debug.contains(&key.id()), "{debug}");
        assert_eq!(key.id().len(), KEY_ID_LEN);
    }

    #[test]
    fn a_census_names_the_keys_a_keyring_lacks() {
        let (a, ring_a) = keyring();
        let (b, ring_b) = keyring();
        let mut census = SecretCensus::default();
        census.count(&ring_a.seal(field::ENDPOINT_SECRET, ROW, "x"));
        census.count(&ring_b.seal(field::ENDPOINT_SECRET, ROW, "y"));
        census.count("in clear");
        assert_eq!(census.plaintext, 1);
        assert_eq!(census.missing_from(&ring_a), Some(b.id()));
        assert_eq!(census.missing_from(&ring_b.with_previous(&a)), None);
    }
}
