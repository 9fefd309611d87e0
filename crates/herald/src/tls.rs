//! TLS on the main listener: the certificate and key from PEM files (`tls.cert`, `tls.key`),
//! reloaded on SIGHUP and when the files change, and the `--dev-tls` self-signed certificate.
//!
//! - **One resolver, swapped certificates.** The rustls `ServerConfig` is built once; its
//!   [`ResolvesServerCert`] hands each new handshake the `CertifiedKey` that is current at that
//!   moment, held in an `ArcSwap`: a reload stores a new `Arc` and nothing else. A connection
//!   that already finished its handshake keeps the certificate it was given (TLS never looks at
//!   it again), so a reload drops nothing. `ArcSwap` rather than a `RwLock`: every handshake
//!   reads it and a reload, rare, never makes one wait (the crate was already in the build).
//! - **A reload is all or nothing.** Certificate chain and key are read and checked together
//!   (PEM, a usable key, the key belonging to the leaf certificate); anything wrong keeps the
//!   current certificate serving and is logged with the file and the reason. At start the same
//!   check is an error naming the file.
//! - **Watching is polling.** Every `tls.watch_interval_ms` both files are read and compared
//!   with what was last seen (loaded or refused), through the paths as configured, so a
//!   Kubernetes secret update (a symlinked directory swapped) is seen like any rewrite.
//!   Contents, not modification times: `cp -p` keeps the old time, and two writes within one
//!   timestamp tick share one; the files are a few KiB. A certificate renewed before its key is
//!   written fails once as a mismatch (logged) and loads at the next poll; a file left broken
//!   is reported once, not every poll.
//! - **ring**, as everywhere else in Herald; ALPN offers `http/1.1` only (the server speaks
//!   HTTP/1.1, and a client that asks for `h2` alone is refused in the handshake rather than
//!   misunderstood after it).

use std::{
    io,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use arc_swap::ArcSwap;
use chrono::{DateTime, Datelike, Utc};
use rustls::{
    ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use sha2::{Digest, Sha256};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// The certificate chain and private key files the listener serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFiles {
    /// PEM: the leaf certificate first, then any intermediates.
    pub cert: PathBuf,
    /// PEM: one private key (PKCS#8, PKCS#1 RSA or SEC1 EC).
    pub key: PathBuf,
}

/// Why a certificate and key could not be loaded. Each names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the TLS {what} file {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("the TLS {what} file {} is not valid PEM: {reason}", path.display())]
    Pem {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error(
        "the TLS certificate file {} holds no certificate (expected PEM blocks \
         \"-----BEGIN CERTIFICATE-----\", the leaf first)",
        path.display()
    )]
    NoCertificate { path: PathBuf },
    #[error(
        "the TLS key file {} holds no private key (expected a PEM \"PRIVATE KEY\", \
         \"RSA PRIVATE KEY\" or \"EC PRIVATE KEY\" block)",
        path.display()
    )]
    NoKey { path: PathBuf },
    #[error("the TLS key file {} holds a key that cannot be used: {reason}", path.display())]
    UnusableKey { path: PathBuf, reason: String },
    #[error(
        "the TLS certificate file {} cannot be used with the key file {}: {reason}",
        cert.display(),
        key.display()
    )]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error("cannot set up TLS: {0}")]
    Setup(String),
}

/// The raw bytes of both files, as last seen by a load.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Contents {
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl CertificateFiles {
    fn read(&self) -> Result<Contents, TlsError> {
        let read = |what, path: &Path| {
            std::fs::read(path).map_err(|source| TlsError::Read {
                what,
                path: path.to_owned(),
                source,
            })
        };
        Ok(Contents {
            cert: read("certificate", &self.cert)?,
            key: read("key", &self.key)?,
        })
    }

    /// Parses and checks both files' contents: a chain, a usable key, and the key belonging
    /// to the chain's first certificate.
    fn parse(
        &self,
        contents: &Contents,
        provider: &CryptoProvider,
    ) -> Result<CertifiedKey, TlsError> {
        let chain = CertificateDer::pem_slice_iter(&contents.cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Pem {
                what: "certificate",
                path: self.cert.clone(),
                reason: pem_reason(&e),
            })?;
        if chain.is_empty() {
            return Err(TlsError::NoCertificate {
                path: self.cert.clone(),
            });
        }
        let key = PrivateKeyDer::from_pem_slice(&contents.key).map_err(|e| match e {
            rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey {
                path: self.key.clone(),
            },
            other => TlsError::Pem {
                what: "key",
                path: self.key.clone(),
                reason: pem_reason(&other),
            },
        })?;
        let signing_key =
            provider
                .key_provider
                .load_private_key(key)
                .map_err(|e| TlsError::UnusableKey {
                    path: self.key.clone(),
                    reason: e.to_string(),
                })?;
        let certified = CertifiedKey::new(chain, signing_key);
        match certified.keys_match() {
            // `Unknown`: the key cannot tell its public half, so there is nothing to compare
            // (rustls's own `from_der` accepts it too); ring's keys always can.
            Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
                Ok(certified)
            }
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
                Err(TlsError::Mismatch {
                    cert: self.cert.clone(),
                    key: self.key.clone(),
                    reason: "the private key does not belong to the first (leaf) certificate"
                        .into(),
                })
            }
            // Most often the leaf's DER does not parse as a certificate.
            Err(e) => Err(TlsError::Mismatch {
                cert: self.cert.clone(),
                key: self.key.clone(),
                reason: e.to_string(),
            }),
        }
    }

    /// Reads and checks both files, as a load does; the leaf's SHA-256 fingerprint, and its
    /// dates at `now` when they can be read.
    pub fn inspect(
        &self,
        now: DateTime<Utc>,
    ) -> Result<(String, Option<CertificateDates>), TlsError> {
        let provider = provider();
        let certified = self.parse(&self.read()?, &provider)?;
        let dates = certified
            .cert
            .first()
            .and_then(|leaf| CertificateDates::of(leaf, now));
        Ok((leaf_fingerprint(&certified), dates))
    }
}

/// How long before its end a certificate's coming expiry is logged as a warning.
pub const EXPIRY_WARNING: chrono::Duration = chrono::Duration::days(14);

/// What a served certificate's validity dates say at a moment: clients refuse a certificate
/// outside them, so Herald says so when it loads one (it serves it all the same: a
/// certificate renewed late must still load without a restart) and `herald doctor` checks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertificateDates {
    /// Valid, for longer than [`EXPIRY_WARNING`].
    Valid {
        not_after: DateTime<Utc>,
    },
    /// Valid, but ending within [`EXPIRY_WARNING`].
    EndingSoon {
        not_after: DateTime<Utc>,
    },
    Expired {
        not_after: DateTime<Utc>,
    },
    NotYetValid {
        not_before: DateTime<Utc>,
    },
}

impl CertificateDates {
    /// The leaf certificate's dates at `now`; `None` if its DER does not parse as X.509 (rustls
    /// loads it all the same).
    pub fn of(leaf: &CertificateDer<'_>, now: DateTime<Utc>) -> Option<Self> {
        use x509_cert::der::Decode;
        let certificate = x509_cert::Certificate::from_der(leaf.as_ref()).ok()?;
        let validity = &certificate.tbs_certificate.validity;
        let at = |time: x509_cert::time::Time| {
            DateTime::from_timestamp(i64::try_from(time.to_unix_duration().as_secs()).ok()?, 0)
        };
        let (not_before, not_after) = (at(validity.not_before)?, at(validity.not_after)?);
        Some(if now < not_before {
            Self::NotYetValid { not_before }
        } else if now > not_after {
            Self::Expired { not_after }
        } else if not_after - now < EXPIRY_WARNING {
            Self::EndingSoon { not_after }
        } else {
            Self::Valid { not_after }
        })
    }

    /// What is wrong, in words; `None` while it is valid for longer than [`EXPIRY_WARNING`].
    pub fn problem(&self) -> Option<String> {
        let day = |at: &DateTime<Utc>| at.format("%Y-%m-%d %H:%M UTC").to_string();
        match self {
            Self::Valid { .. } => None,
            Self::EndingSoon { not_after } => Some(format!(
                "the certificate expires on {}: renew it before clients refuse it",
                day(not_after)
            )),
            Self::Expired { not_after } => Some(format!(
                "the certificate expired on {}: clients refuse it",
                day(not_after)
            )),
            Self::NotYetValid { not_before } => Some(format!(
                "the certificate is not valid until {}: clients refuse it until then",
                day(not_before)
            )),
        }
    }

    /// Whether clients refuse the certificate now.
    pub fn refused(&self) -> bool {
        matches!(self, Self::Expired { .. } | Self::NotYetValid { .. })
    }
}

/// What to say of a served certificate's dates: its state (for telling a change), and the
/// words and level, when there is something to say.
fn dates_notice(
    certified: &CertifiedKey,
    now: DateTime<Utc>,
) -> (DatesState, Option<(String, bool)>) {
    match certified.cert.first().map(|leaf| CertificateDates::of(leaf, now)) {
        Some(Some(dates)) => (
            DatesState::Read(std::mem::discriminant(&dates)),
            dates.problem().map(|problem| (problem, dates.refused())),
        ),
        _ => (
            DatesState::Unreadable,
            Some((
                "the certificate's validity dates could not be read (not strict DER?): they are not checked".to_owned(),
                false,
            )),
        ),
    }
}

/// A served certificate's dates as last judged: a notice is logged when this changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DatesState {
    Read(std::mem::Discriminant<CertificateDates>),
    Unreadable,
}

/// A PEM error in words: pki-types prints the markers it wanted as byte arrays.
fn pem_reason(error: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error;
    match error {
        Error::MissingSectionEnd { end_marker } => format!(
            "a section has no end line (\"-----END {}-----\")",
            String::from_utf8_lossy(end_marker)
        ),
        Error::IllegalSectionStart { line } => format!(
            "a malformed begin line: {:?}",
            String::from_utf8_lossy(line)
        ),
        other => other.to_string(),
    }
}

fn provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// SHA-256 of DER bytes, as `AB:CD:...` (the form `openssl x509 -fingerprint -sha256` and
/// browsers show).
pub fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn leaf_fingerprint(certified: &CertifiedKey) -> String {
    certified
        .cert
        .first()
        .map_or_else(String::new, |leaf| fingerprint(leaf))
}

/// The certificate new handshakes get: whatever was stored last.
#[derive(Debug)]
struct Resolver {
    current: ArcSwap<CertifiedKey>,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// What a reload did.
#[derive(Debug)]
pub enum Reload {
    /// The files hold what was last seen: nothing to do.
    Unchanged,
    /// New handshakes get the new certificate (its leaf's SHA-256 fingerprint).
    Reloaded { fingerprint: String },
    /// The files could not be used; the previous certificate still serves.
    Refused(TlsError),
}

/// The listener's TLS: the acceptor every connection's handshake uses, and the certificate
/// behind it, reloadable.
pub struct ListenerTls {
    files: CertificateFiles,
    provider: Arc<CryptoProvider>,
    resolver: Arc<Resolver>,
    acceptor: TlsAcceptor,
    /// What the last look at the files found: polling acts only on a change.
    seen: Mutex<Seen>,
    /// The served certificate's dates as last judged ([`ListenerTls::judge_dates`]), with
    /// its fingerprint: one notice per state, not one per look.
    dates: Mutex<Option<(String, DatesState)>>,
}

/// The files as last seen.
#[derive(Debug)]
struct Seen {
    /// The contents last read, loaded or refused.
    contents: Contents,
    /// Why they could not be read at the last look, if they could not: a file that stays
    /// missing is reported once.
    unreadable: Option<String>,
}

impl std::fmt::Debug for ListenerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerTls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl ListenerTls {
    /// Loads the certificate and key, or says which file is wrong and why.
    pub fn load(files: CertificateFiles) -> Result<Arc<Self>, TlsError> {
        let provider = Arc::new(provider());
        let contents = files.read()?;
        let certified = files.parse(&contents, &provider)?;
        tracing::info!(
            cert = %files.cert.display(),
            fingerprint = %leaf_fingerprint(&certified),
            "TLS on: serving this certificate"
        );
        let resolver = Arc::new(Resolver {
            current: ArcSwap::from_pointee(certified),
        });
        let mut config = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Setup(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(&resolver) as _);
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(Self {
            files,
            provider,
            resolver,
            acceptor: TlsAcceptor::from(Arc::new(config)),
            seen: Mutex::new(Seen {
                contents,
                unreadable: None,
            }),
            dates: Mutex::new(None),
        }))
        .inspect(|tls| {
            tls.judge_dates(Utc::now());
        })
    }

    /// Logs what is wrong with the served certificate's dates at `now` (expired, not yet
    /// valid, ending within [`EXPIRY_WARNING`], unreadable), once per certificate and state:
    /// at load, at each reload, and at each look of the watcher, so a certificate that runs
    /// out while Herald serves it is reported as it does. Returns what it logged.
    pub fn judge_dates(&self, now: DateTime<Utc>) -> Option<String> {
        let certified = self.resolver.current.load();
        let fingerprint = leaf_fingerprint(&certified);
        let (state, notice) = dates_notice(&certified, now);
        let mut last = self.dates.lock().unwrap_or_else(|p| p.into_inner());
        if last.as_ref() == Some(&(fingerprint.clone(), state)) {
            return None;
        }
        *last = Some((fingerprint, state));
        let (problem, refused) = notice?;
        if refused {
            tracing::error!(cert = %self.files.cert.display(), "{problem}");
        } else {
            tracing::warn!(cert = %self.files.cert.display(), "{problem}");
        }
        Some(problem)
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        self.acceptor.clone()
    }

    /// The SHA-256 fingerprint of the leaf certificate new handshakes get.
    pub fn current_fingerprint(&self) -> String {
        leaf_fingerprint(&self.resolver.current.load())
    }

    /// Reads the files and, if they hold something new (or always, when `force`), loads them.
    /// Blocking file reads: call it off the async threads ([`watch`] does).
    pub fn reload(&self, force: bool) -> Reload {
        let read = self.files.read();
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let contents = match read {
            Ok(contents) => contents,
            Err(e) => {
                let why = e.to_string();
                if !force && seen.unreadable.as_ref() == Some(&why) {
                    return Reload::Unchanged;
                }
                seen.unreadable = Some(why);
                return Reload::Refused(e);
            }
        };
        seen.unreadable = None;
        if !force && seen.contents == contents {
            return Reload::Unchanged;
        }
        let parsed = self.files.parse(&contents, &self.provider);
        seen.contents = contents;
        match parsed {
            Ok(certified) => {
                let fingerprint = leaf_fingerprint(&certified);
                self.resolver.current.store(Arc::new(certified));
                Reload::Reloaded { fingerprint }
            }
            Err(e) => Reload::Refused(e),
        }
    }

    /// [`reload`](Self::reload) on a blocking thread, with the outcome logged.
    async fn reload_logged(self: &Arc<Self>, force: bool, trigger: &'static str) {
        let this = Arc::clone(self);
        let outcome = match tokio::task::spawn_blocking(move || this.reload(force)).await {
            Ok(outcome) => outcome,
            Err(e) => {
                tracing::error!(error = %e, trigger, "the TLS certificate reload task failed");
                return;
            }
        };
        match outcome {
            Reload::Unchanged => {}
            Reload::Reloaded { fingerprint } => tracing::info!(
                trigger,
                cert = %self.files.cert.display(),
                %fingerprint,
                "TLS certificate reloaded: new connections get it, open ones keep theirs"
            ),
            Reload::Refused(error) => tracing::error!(
                trigger,
                %error,
                fingerprint = %self.current_fingerprint(),
                "TLS certificate reload failed: still serving the previous certificate"
            ),
        }
    }
}

/// Reloads `tls` on SIGHUP (always) and when its files change (polled every `interval`; zero:
/// never), and looks at the served certificate's dates after each and at least hourly
/// ([`ListenerTls::judge_dates`]), until `stop`.
pub async fn watch(tls: Arc<ListenerTls>, interval: Duration, stop: CancellationToken) {
    #[cfg(unix)]
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGHUP: the certificate reloads only when its files change");
            None
        }
    };
    let mut dates = tokio::time::interval(DATES_LOOK_EVERY);
    dates.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks = (!interval.is_zero()).then(|| {
        let mut ticks = tokio::time::interval(interval);
        // A slow disk must not make polls pile up.
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks
    });
    loop {
        #[cfg(unix)]
        let hangup_received = async {
            match hangup.as_mut() {
                Some(signal) => signal.recv().await,
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let hangup_received = std::future::pending::<Option<()>>();
        let tick = async {
            match ticks.as_mut() {
                Some(ticks) => ticks.tick().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = stop.cancelled() => return,
            Some(()) = hangup_received => tls.reload_logged(true, "SIGHUP").await,
            _ = tick => tls.reload_logged(false, "file change").await,
            _ = dates.tick() => {}
        }
        // Whatever woke it: a certificate loaded, or one served for a while, may have
        // crossed into another state of its dates.
        tls.judge_dates(Utc::now());
    }
}

/// How often the watcher looks at the served certificate's dates, files changed or not.
const DATES_LOOK_EVERY: Duration = Duration::from_secs(3600);

/// The certificate `--dev-tls` made (or found) in the data directory.
#[derive(Debug, Clone)]
pub struct DevCertificate {
    pub files: CertificateFiles,
    /// SHA-256 of the certificate, `AB:CD:...`.
    pub fingerprint: String,
    /// Made by this start (rather than found from an earlier one).
    pub created: bool,
}

/// The names `--dev-tls` writes in the data directory.
pub const DEV_CERT_FILE: &str = "dev-tls-cert.pem";
pub const DEV_KEY_FILE: &str = "dev-tls-key.pem";

/// A dev certificate is made again when this old: it is valid 397 days, and a browser refuses
/// an expired one with no way around it.
const DEV_CERT_RENEW_AFTER: Duration = Duration::from_secs(365 * 24 * 3600);

/// `--dev-tls`: a self-signed certificate for `localhost`, `127.0.0.1` and `::1` in `data_dir`,
/// made on first use and reused on later starts (so a browser's or a client's trust in it
/// lasts), unless it no longer loads or is close to expiring.
pub fn dev_certificate(data_dir: &Path) -> anyhow::Result<DevCertificate> {
    use anyhow::Context;

    let files = CertificateFiles {
        cert: data_dir.join(DEV_CERT_FILE),
        key: data_dir.join(DEV_KEY_FILE),
    };
    let fresh_enough = std::fs::metadata(&files.cert)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|modified| modified.elapsed().ok())
        .is_some_and(|age| age < DEV_CERT_RENEW_AFTER);
    // Reused while it loads and stays valid for a while yet (its dates, where they can be read).
    let reusable = files
        .inspect(Utc::now())
        .ok()
        .and_then(|(fingerprint, dates)| match dates {
            Some(CertificateDates::Valid { .. }) | None => Some(fingerprint),
            Some(_) => None,
        });
    if fresh_enough && let Some(fingerprint) = reusable {
        return Ok(DevCertificate {
            files,
            fingerprint,
            created: false,
        });
    }
    // Owner-only, as the store creates it (this may run first, before the store opens).
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder
        .create(data_dir)
        .with_context(|| format!("creating the data directory {}", data_dir.display()))?;
    let key = rcgen::KeyPair::generate().context("generating the dev TLS key")?;
    let mut params = rcgen::CertificateParams::new(vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ])
    .context("the dev TLS certificate's names")?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        "Herald --dev-tls (self-signed, localhost)",
    );
    // From yesterday (clocks differ a little), for 397 days: the longest validity browsers
    // accept for a server certificate.
    let from = chrono::Utc::now().date_naive() - chrono::Days::new(1);
    let until = from + chrono::Days::new(397);
    // chrono's dates are valid calendar dates, which is all `date_time_ymd` asks.
    params.not_before = rcgen::date_time_ymd(from.year(), month(from), day(from));
    params.not_after = rcgen::date_time_ymd(until.year(), month(until), day(until));
    params
        .extended_key_usages
        .push(rcgen::ExtendedKeyUsagePurpose::ServerAuth);
    let cert = params
        .self_signed(&key)
        .context("signing the dev TLS certificate")?;
    write_private(&files.key, key.serialize_pem().as_bytes())?;
    std::fs::write(&files.cert, cert.pem())
        .with_context(|| format!("writing {}", files.cert.display()))?;
    Ok(DevCertificate {
        fingerprint: fingerprint(cert.der()),
        files,
        created: true,
    })
}

/// Calendar months and days fit a `u8`.
fn month(date: chrono::NaiveDate) -> u8 {
    u8::try_from(date.month()).unwrap_or(1)
}

fn day(date: chrono::NaiveDate) -> u8 {
    u8::try_from(date.day()).unwrap_or(1)
}

/// Writes a private key readable by its owner alone.
fn write_private(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::io::Write;

    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate and its key, as PEM.
    fn pair(name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("certificate");
        (cert.pem(), key.serialize_pem())
    }

    fn write(files: &CertificateFiles, (cert, key): &(String, String)) {
        std::fs::write(&files.key, key).expect("key");
        std::fs::write(&files.cert, cert).expect("cert");
    }

    /// A self-signed certificate valid from `from` to `until` (whole days), as PEM, and its key.
    fn dated(from: chrono::NaiveDate, until: chrono::NaiveDate) -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params =
            rcgen::CertificateParams::new(vec!["dated.test".to_owned()]).expect("params");
        params.not_before = rcgen::date_time_ymd(from.year(), month(from), day(from));
        params.not_after = rcgen::date_time_ymd(until.year(), month(until), day(until));
        let cert = params.self_signed(&key).expect("certificate");
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn a_certificates_dates_are_read_and_judged() {
        let dir = tempfile::tempdir().expect("dir");
        let files = CertificateFiles {
            cert: dir.path().join("c.pem"),
            key: dir.path().join("k.pem"),
        };
        let today = Utc::now().date_naive();
        let days = |n: i64| {
            if n >= 0 {
                today + chrono::Days::new(n.unsigned_abs())
            } else {
                today - chrono::Days::new(n.unsigned_abs())
            }
        };
        let midnight =
            |date: chrono::NaiveDate| date.and_hms_opt(0, 0, 0).expect("midnight").and_utc();
        for ((from, until), expected) in [
            (
                (-1, 90),
                CertificateDates::Valid {
                    not_after: midnight(days(90)),
                },
            ),
            (
                (-30, 5),
                CertificateDates::EndingSoon {
                    not_after: midnight(days(5)),
                },
            ),
            (
                (-30, -2),
                CertificateDates::Expired {
                    not_after: midnight(days(-2)),
                },
            ),
            (
                (3, 90),
                CertificateDates::NotYetValid {
                    not_before: midnight(days(3)),
                },
            ),
        ] {
            write(&files, &dated(days(from), days(until)));
            let (_, dates) = files.inspect(Utc::now()).expect("loads whatever its dates");
            assert_eq!(dates, Some(expected), "{from}..{until}");
        }
        // In words, with the date that matters; refused when clients refuse it.
        let words = |dates: CertificateDates| (dates.problem(), dates.refused());
        let on = |n: i64| days(n).format("%Y-%m-%d").to_string();
        assert_eq!(
            words(CertificateDates::Valid {
                not_after: midnight(days(90))
            }),
            (None, false)
        );
        for (dates, says, refused) in [
            (
                CertificateDates::EndingSoon {
                    not_after: midnight(days(5)),
                },
                format!("expires on {}", on(5)),
                false,
            ),
            (
                CertificateDates::Expired {
                    not_after: midnight(days(-2)),
                },
                format!("expired on {}", on(-2)),
                true,
            ),
            (
                CertificateDates::NotYetValid {
                    not_before: midnight(days(3)),
                },
                format!("not valid until {}", on(3)),
                true,
            ),
        ] {
            let (problem, is_refused) = words(dates);
            let problem = problem.expect("a problem");
            assert!(problem.contains(&says), "{problem}");
            assert_eq!(is_refused, refused, "{problem}");
        }
        // A load serves a certificate outside its dates all the same (a late renewal must
        // still load without a restart); the log says what is wrong with it.
        write(&files, &dated(days(-30), days(-2)));
        assert!(ListenerTls::load(files.clone()).is_ok());
    }

    #[test]
    fn a_served_certificate_is_judged_again_as_time_passes_once_per_state() {
        let dir = tempfile::tempdir().expect("dir");
        let files = CertificateFiles {
            cert: dir.path().join("c.pem"),
            key: dir.path().join("k.pem"),
        };
        let today = Utc::now().date_naive();
        write(
            &files,
            &dated(today - chrono::Days::new(1), today + chrono::Days::new(60)),
        );
        let tls = ListenerTls::load(files.clone()).expect("loads");
        let now = Utc::now();
        assert_eq!(
            tls.judge_dates(now),
            None,
            "valid for 60 days: nothing to say"
        );
        // Fifty days on, nobody renewed it: a warning, once.
        let later = now + chrono::Duration::days(50);
        let said = tls.judge_dates(later).expect("a warning");
        assert!(said.contains("expires on"), "{said}");
        assert_eq!(
            tls.judge_dates(later + chrono::Duration::hours(1)),
            None,
            "said once"
        );
        // Past its end: said again, as an expiry.
        let said = tls
            .judge_dates(now + chrono::Duration::days(61))
            .expect("an error");
        assert!(said.contains("expired on"), "{said}");
        // A renewal loads, and the new certificate is judged afresh.
        write(&files, &pair("renewed.test"));
        assert!(matches!(tls.reload(false), Reload::Reloaded { .. }));
        assert_eq!(tls.judge_dates(now), None);
    }

    #[test]
    fn a_reload_acts_on_changed_contents_and_reports_a_bad_state_once() {
        let dir = tempfile::tempdir().expect("dir");
        let files = CertificateFiles {
            cert: dir.path().join("c.pem"),
            key: dir.path().join("k.pem"),
        };
        let (first, second) = (pair("first.test"), pair("second.test"));
        write(&files, &first);
        let tls = ListenerTls::load(files.clone()).expect("loads");
        let served = tls.current_fingerprint();
        assert!(matches!(tls.reload(false), Reload::Unchanged));

        // A certificate whose key is still the old one: refused, once.
        std::fs::write(&files.cert, &second.0).expect("cert");
        assert!(matches!(
            tls.reload(false),
            Reload::Refused(TlsError::Mismatch { .. })
        ));
        assert!(matches!(tls.reload(false), Reload::Unchanged));
        assert!(
            matches!(tls.reload(true), Reload::Refused(_)),
            "SIGHUP always tries"
        );
        assert_eq!(tls.current_fingerprint(), served, "the old one serves on");

        // A missing file: refused, once.
        std::fs::remove_file(&files.key).expect("remove");
        assert!(matches!(
            tls.reload(false),
            Reload::Refused(TlsError::Read { what: "key", .. })
        ));
        assert!(matches!(tls.reload(false), Reload::Unchanged));

        // The pair whole again: loaded.
        std::fs::write(&files.key, &second.1).expect("key");
        let Reload::Reloaded { fingerprint } = tls.reload(false) else {
            panic!("the new pair loads");
        };
        assert_ne!(fingerprint, served);
        assert_eq!(tls.current_fingerprint(), fingerprint);
    }

    #[test]
    fn load_errors_name_the_file_and_the_problem() {
        let dir = tempfile::tempdir().expect("dir");
        let files = CertificateFiles {
            cert: dir.path().join("c.pem"),
            key: dir.path().join("k.pem"),
        };
        let (cert, key) = pair("a.test");
        let cases: [(&str, &str, &str); 4] = [
            ("not PEM at all", &key, "holds no certificate"),
            (
                "-----BEGIN CERTIFICATE-----\nAAAA\n",
                &key,
                "no end line (\"-----END CERTIFICATE-----\")",
            ),
            (&cert, "", "holds no private key"),
            (
                "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                &key,
                "cannot be used with the key file",
            ),
        ];
        for (cert_pem, key_pem, expected) in cases {
            std::fs::write(&files.cert, cert_pem).expect("cert");
            std::fs::write(&files.key, key_pem).expect("key");
            let error = ListenerTls::load(files.clone())
                .expect_err("refused")
                .to_string();
            assert!(error.contains(expected), "{error}");
            assert!(
                error.contains(&files.cert.display().to_string())
                    || error.contains(&files.key.display().to_string()),
                "{error}"
            );
        }
    }

    #[test]
    fn fingerprints_read_as_openssl_prints_them() {
        let printed = fingerprint(b"abc");
        assert_eq!(printed.len(), 32 * 3 - 1);
        assert!(printed.starts_with("BA:78:16:BF:"), "{printed}");
    }
}
