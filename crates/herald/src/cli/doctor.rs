//! `herald doctor`: checks what a node needs (its configuration, store, broker, TLS files and
//! clock) and, on request, a running server and a webhook URL, and says in words what is wrong
//! and how to fix it. It changes nothing: the store is opened read-only and not migrated.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use clap::Args;
use herald::{Config, config::Overrides, store::StoreConfig};
use serde::Serialize;

use super::{error_chain, print_json};

/// How long one check may wait on the network.
const PATIENCE: Duration = Duration::from_secs(5);
/// Clocks further apart than this get a warning. Nodes compare leases, due times and
/// heartbeats in the database's time (`herald_store::ClusterClock`), whatever their own clocks
/// say; but messages' times and ids read this machine's clock, and deliveries' Standard
/// Webhooks timestamps the database's, which receivers accept within 5 minutes of theirs.
const SKEW_WARNING_SECS: f64 = 2.0;
const SKEW_FAILURE_SECS: f64 = 60.0;

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// TOML configuration file, as `herald serve` takes it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Data directory of the embedded store, as `herald serve --data` takes it.
    #[arg(long = "data", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Check as `herald serve --dev` runs (private webhook targets allowed).
    #[arg(long)]
    pub dev: bool,
    /// Also check a running Herald: it answers, and its clock agrees with this machine's.
    #[arg(long, value_name = "URL")]
    pub server: Option<String>,
    /// Also check a webhook URL: it resolves, Herald's address policy lets deliveries reach
    /// it, and something answers there.
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
    /// Print the checks as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Ok,
    Warn,
    Fail,
    Skip,
}

/// One check's result.
#[derive(Debug, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub verdict: Verdict,
    /// What was found.
    pub detail: String,
    /// What to do about it, when something is wrong.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    fn ok(name: &'static str, detail: impl Into<String>) -> Self {
        Self::new(name, Verdict::Ok, detail, None)
    }

    fn skip(name: &'static str, detail: impl Into<String>) -> Self {
        Self::new(name, Verdict::Skip, detail, None)
    }

    fn warn(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self::new(name, Verdict::Warn, detail, Some(fix.into()))
    }

    fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self::new(name, Verdict::Fail, detail, Some(fix.into()))
    }

    fn new(
        name: &'static str,
        verdict: Verdict,
        detail: impl Into<String>,
        fix: Option<String>,
    ) -> Self {
        Self {
            name,
            verdict,
            detail: detail.into(),
            fix,
        }
    }
}

/// Runs every check and prints them; fails if any failed.
pub async fn run(args: DoctorArgs) -> anyhow::Result<()> {
    let checks = checks(&args).await;
    if args.json {
        print_json(&serde_json::to_value(&checks)?);
    } else {
        for check in &checks {
            let mark = match check.verdict {
                Verdict::Ok => "ok  ",
                Verdict::Warn => "warn",
                Verdict::Fail => "FAIL",
                Verdict::Skip => "skip",
            };
            println!("{mark}  {:<8} {}", check.name, check.detail);
            if let Some(fix) = &check.fix {
                println!("      {:<8} fix: {fix}", "");
            }
        }
    }
    let failed = checks.iter().filter(|c| c.verdict == Verdict::Fail).count();
    if failed > 0 {
        anyhow::bail!("{failed} check(s) failed");
    }
    Ok(())
}

pub async fn checks(args: &DoctorArgs) -> Vec<Check> {
    let mut checks = Vec::new();
    let overrides = Overrides {
        data_dir: args.data_dir.clone(),
        dev: args.dev.then_some(true),
        ..Overrides::default()
    };
    let config = match Config::load(args.config.as_deref(), &overrides) {
        Ok(config) => {
            let source = args.config.as_ref().map_or_else(
                || "defaults and HERALD_* variables".to_owned(),
                |path| format!("{} and HERALD_* variables", path.display()),
            );
            checks.push(Check::ok("config", format!("valid ({source})")));
            Some(config)
        }
        Err(e) => {
            checks.push(Check::fail(
                "config",
                e.to_string(),
                "correct the setting named above in the file or its HERALD_* variable (the README's \"Configuration\" lists them all)",
            ));
            None
        }
    };
    if let Some(config) = &config {
        checks.push(store(config).await);
        checks.push(broker(config).await);
        checks.push(tls(config));
    } else {
        for name in ["store", "broker", "tls"] {
            checks.push(Check::skip(
                name,
                "not checked: the configuration is invalid",
            ));
        }
    }
    if let Some(server) = &args.server {
        checks.push(server_clock(server).await);
    }
    if let Some(url) = &args.url {
        let policy = config
            .as_ref()
            .map(|c| c.delivery_config().addresses)
            .unwrap_or_default();
        checks.push(webhook_url(url, &policy).await);
    }
    checks
}

async fn store(config: &Config) -> Check {
    let store = match config.store_config() {
        Ok(store) => store,
        Err(e) => {
            return Check::fail(
                "store",
                e.to_string(),
                "set store.url to sqlite://DIR or postgres://...",
            );
        }
    };
    match &store {
        StoreConfig::Sqlite { dir } => sqlite(dir).await,
        StoreConfig::Postgres { url, .. } => postgres(url, &store).await,
    }
}

async fn sqlite(dir: &Path) -> Check {
    if !dir.exists() {
        return Check::warn(
            "store",
            format!(
                "SQLite in {}: the directory does not exist yet",
                dir.display()
            ),
            "nothing to do if this is a new node: `herald serve` creates it; otherwise point --data (data_dir) at the existing one",
        );
    }
    let probe = dir.join(".herald-doctor-probe");
    if let Err(e) = std::fs::write(&probe, b"probe").and_then(|()| std::fs::remove_file(&probe)) {
        return Check::fail(
            "store",
            format!("SQLite in {}: cannot write there ({e})", dir.display()),
            "run Herald as the user that owns the data directory, or fix its permissions (chmod u+w)",
        );
    }
    match tokio::time::timeout(PATIENCE, herald_store::sqlite::inspect(dir)).await {
        Ok(Ok(inspection)) => schema("SQLite", &dir.display().to_string(), &inspection, None),
        Ok(Err(e)) => Check::fail(
            "store",
            format!(
                "SQLite in {}: cannot read the database ({e})",
                dir.display()
            ),
            "check that herald.db is a Herald database and not damaged (sqlite3 herald.db 'PRAGMA integrity_check'); restore it from a backup if it is",
        ),
        Err(_) => Check::fail(
            "store",
            format!(
                "SQLite in {}: the database stayed locked for {PATIENCE:?}",
                dir.display()
            ),
            "another process holds a write lock on it: stop it, or wait for it to finish",
        ),
    }
}

async fn postgres(url: &str, store: &StoreConfig) -> Check {
    let described = format!("PostgreSQL ({store})");
    match tokio::time::timeout(PATIENCE, herald_store::postgres::inspect(url)).await {
        Ok(Ok(inspection)) => {
            let skew = inspection
                .server_time
                .map(|t| (chrono::Utc::now() - t).num_milliseconds() as f64 / 1000.0);
            schema("PostgreSQL", &store.to_string(), &inspection, skew)
        }
        Ok(Err(e)) => Check::fail(
            "store",
            format!("{described}: cannot connect ({e})"),
            "check store.url (host, port, database, user and password), that PostgreSQL runs and listens there, and that pg_hba.conf lets this user in",
        ),
        Err(_) => Check::fail(
            "store",
            format!("{described}: no answer within {PATIENCE:?}"),
            "check that the host and port in store.url are right and that no firewall drops the connection",
        ),
    }
}

/// The schema's version (and the database server's clock) in words.
fn schema(
    backend: &str,
    place: &str,
    inspection: &herald_store::Inspection,
    skew_secs: Option<f64>,
) -> Check {
    let applied = inspection.applied_migrations;
    let known = inspection.known_migrations;
    let mut detail = format!("{backend} ({place}): schema {applied} of {known} migrations");
    if let Some(skew) = skew_secs {
        detail.push_str(&format!(
            ", database clock {skew:+.1} s from this machine's"
        ));
        if skew.abs() > SKEW_FAILURE_SECS {
            return Check::fail(
                "store",
                detail,
                "synchronise the clocks of this machine and the database server (chrony or systemd-timesyncd)",
            );
        }
        if skew.abs() > SKEW_WARNING_SECS {
            return Check::warn(
                "store",
                detail,
                "synchronise the clocks (chrony or systemd-timesyncd)",
            );
        }
    }
    if applied > known {
        return Check::fail(
            "store",
            detail,
            "a newer Herald migrated this store: run that version (or newer), not this one",
        );
    }
    if applied < known {
        return Check::warn(
            "store",
            detail,
            "`herald serve` (or `herald migrate`) brings it up to date; on PostgreSQL run `herald migrate` once before starting the new version's nodes",
        );
    }
    Check::ok("store", detail)
}

async fn broker(config: &Config) -> Check {
    let Some(url) = &config.broker.url else {
        return Check::skip(
            "broker",
            "none configured: a single node (broker.url unset)",
        );
    };
    let shown = herald_cluster::bus::redacted(url);
    match tokio::time::timeout(
        PATIENCE,
        herald_cluster::bus::connect(url, &config.broker.topic),
    )
    .await
    {
        Ok(Ok(_bus)) => Check::ok(
            "broker",
            format!("{shown}: connected (topic {})", config.broker.topic),
        ),
        Ok(Err(e)) => Check::fail(
            "broker",
            format!("{shown}: {e}"),
            "check broker.url, and that Redis or NATS runs there and accepts this client",
        ),
        Err(_) => Check::fail(
            "broker",
            format!("{shown}: no answer within {PATIENCE:?}"),
            "check that the host and port in broker.url are right and reachable from this machine",
        ),
    }
}

fn tls(config: &Config) -> Check {
    use herald::tls::CertificateDates;

    let Some(files) = config.tls_files() else {
        return Check::skip(
            "tls",
            "not configured: plain HTTP (put TLS in front, or set tls.cert and tls.key)",
        );
    };
    let shown = format!("{} and {}", files.cert.display(), files.key.display());
    let renew = "put a renewed certificate in tls.cert and its key in tls.key (Herald reloads them without a restart)";
    // One read of the files: the same checks as a load (PEM, a usable key that belongs to
    // the leaf), and the leaf's dates.
    match files.inspect(chrono::Utc::now()) {
        Ok((_, Some(CertificateDates::Valid { not_after }))) => Check::ok(
            "tls",
            format!(
                "{shown}: certificate and key load and match; valid until {}",
                not_after.format("%Y-%m-%d")
            ),
        ),
        Ok((_, Some(dates))) => {
            let found = format!("{shown}: {}", dates.problem().unwrap_or_default());
            if dates.refused() {
                Check::fail("tls", found, renew)
            } else {
                Check::warn("tls", found, renew)
            }
        }
        Ok((_, None)) => Check::warn(
            "tls",
            format!(
                "{shown}: certificate and key load and match, but the certificate's validity dates could not be read"
            ),
            "check the certificate's dates with `openssl x509 -noout -dates -in` the file",
        ),
        Err(e) => Check::fail(
            "tls",
            format!("{shown}: {e}"),
            "point tls.cert at the PEM certificate chain (leaf first) and tls.key at its private key, readable by Herald",
        ),
    }
}

/// A running Herald answers, and its clock (its `Date` header) agrees with this machine's.
async fn server_clock(server: &str) -> Check {
    // Under the server URL's own path, as the API's calls are.
    let url =
        match url::Url::parse(server).and_then(|base| super::api::under(&base, "/health/live")) {
            Ok(url) => url,
            Err(e) => {
                return Check::fail(
                    "server",
                    format!("{server:?} is not a URL ({e})"),
                    "pass --server http://HOST:PORT",
                );
            }
        };
    let client = match reqwest::Client::builder().timeout(PATIENCE).build() {
        Ok(client) => client,
        Err(e) => return Check::fail("server", e.to_string(), "report this as a bug"),
    };
    let before = chrono::Utc::now();
    let response = match client.get(url.clone()).send().await {
        Ok(response) => response,
        Err(e) => {
            return Check::fail(
                "server",
                format!("{url}: no answer ({})", error_chain(&e)),
                "start it (`herald serve`), or check the address and port",
            );
        }
    };
    let after = chrono::Utc::now();
    let date = response
        .headers()
        .get("date")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok())
        .map(chrono::DateTime::<chrono::Utc>::from);
    let status = response.status();
    if !status.is_success() {
        return Check::fail(
            "server",
            format!("{url}: answered {status}"),
            "its log says why it is not live; `herald doctor` with its configuration checks the rest",
        );
    }
    let Some(date) = date else {
        return Check::ok(
            "server",
            format!("{url}: live (no Date header to compare clocks)"),
        );
    };
    // The header has whole seconds: compare with the middle of the request, allowing 1 s.
    let middle = before + (after - before) / 2;
    let skew = (middle - date).num_milliseconds() as f64 / 1000.0;
    let detail = format!("{url}: live, its clock {skew:+.0} s from this machine's");
    if skew.abs() > SKEW_FAILURE_SECS {
        Check::fail(
            "server",
            detail,
            "synchronise the clocks (chrony or systemd-timesyncd): receivers refuse webhook timestamps more than 5 minutes off",
        )
    } else if skew.abs() > SKEW_WARNING_SECS + 1.0 {
        Check::warn(
            "server",
            detail,
            "synchronise the clocks (chrony or systemd-timesyncd)",
        )
    } else {
        Check::ok("server", detail)
    }
}

/// A webhook URL resolves, Herald's address policy lets deliveries reach every address it
/// resolves to, and something answers HTTP there.
async fn webhook_url(text: &str, policy: &herald_core::address_policy::AddressPolicy) -> Check {
    let url = match url::Url::parse(text) {
        Ok(url) if matches!(url.scheme(), "http" | "https") => url,
        Ok(url) => {
            return Check::fail(
                "url",
                format!("{text}: scheme {} is not http or https", url.scheme()),
                "webhook URLs are http:// or https://",
            );
        }
        Err(e) => {
            return Check::fail(
                "url",
                format!("{text:?} is not a URL ({e})"),
                "pass a full URL, such as https://example.com/webhooks",
            );
        }
    };
    let Some(host) = url.host_str() else {
        return Check::fail(
            "url",
            format!("{text}: no host"),
            "pass a full URL, such as https://example.com/webhooks",
        );
    };
    let port = url.port_or_known_default().unwrap_or(80);
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let addresses: Vec<std::net::SocketAddr> = match tokio::time::timeout(
        PATIENCE,
        tokio::net::lookup_host((host.as_str(), port)),
    )
    .await
    {
        Ok(Ok(addresses)) => addresses.collect(),
        Ok(Err(e)) => {
            return Check::fail(
                "url",
                format!("{url}: {host} does not resolve ({e})"),
                "check the host name, and this machine's DNS",
            );
        }
        Err(_) => {
            return Check::fail(
                "url",
                format!("{url}: resolving {host} took over {PATIENCE:?}"),
                "check this machine's DNS",
            );
        }
    };
    for address in &addresses {
        if let Err(blocked) = policy.check(address.ip()) {
            return Check::fail(
                "url",
                format!("{url}: {blocked}"),
                "deliveries to private addresses are refused so a webhook cannot reach your internal network: use a public URL, or allow it with delivery.allow_private_targets = true or delivery.allowed_subnets (--dev allows them)",
            );
        }
    }
    let client = match reqwest::Client::builder()
        .timeout(PATIENCE)
        .redirect(reqwest::redirect::Policy::none())
        .build()
    {
        Ok(client) => client,
        Err(e) => return Check::fail("url", e.to_string(), "report this as a bug"),
    };
    let shown: Vec<String> = addresses.iter().map(ToString::to_string).collect();
    match client.get(url.clone()).send().await {
        // Any answer means a server is there; receivers often refuse a GET.
        Ok(response) => Check::ok(
            "url",
            format!(
                "{url}: resolves to {}, allowed, answers ({} to a GET)",
                shown.join(", "),
                response.status()
            ),
        ),
        Err(e) => Check::fail(
            "url",
            format!(
                "{url}: resolves to {}, allowed, but {}",
                shown.join(", "),
                error_chain(&e)
            ),
            "start the receiver, or check its port and any firewall between Herald and it",
        ),
    }
}
