//! `herald`: the command line. Process concerns here (flags, logging, signals, exit codes);
//! the commands that talk to a running server, and `doctor`, are in `cli/`.

mod cli;

// mimalloc instead of glibc's allocator: the webhook path allocates and frees across the
// runtime's threads (a request parsed on one, its delivery sent from another), where glibc's
// arenas contend. Measured in PERFORMANCE.md ("The allocator"): 1.10-1.16x webhook messages/s,
// fan-out CPU per delivery a little lower, +0.2 KiB per idle connection. `no_thp` (the
// workspace's feature choice) keeps idle memory under the 30 MB budget: with transparent huge
// pages mimalloc's first arenas made an idle server 38 MB instead of 27.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::{CommandFactory, Parser, Subcommand};
use herald::{
    Config, DEV_API_TOKEN, DEV_APP_UID, DEV_PUSHER_APP_ID, DEV_PUSHER_KEY, DEV_PUSHER_SECRET,
    config::Overrides,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "herald",
    version,
    about = "Self-hosted event hub: webhooks out, WebSockets, webhooks in"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// How log lines are written to standard error: `text`, or `json` (one object per line,
    /// with the request's id in its span) [env: HERALD_LOG_FORMAT]. HERALD_LOG filters them.
    #[arg(long, global = true, value_enum, env = "HERALD_LOG_FORMAT", default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve {
        /// TOML configuration file.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Address to listen on [default: 127.0.0.1:6001].
        #[arg(long, value_name = "ADDR")]
        listen: Option<SocketAddr>,
        /// Data directory of the embedded store [default: ./herald-data]; store.url, when set,
        /// wins.
        #[arg(long = "data", value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// Development mode: allow private webhook targets, create the demo app and token.
        /// Loopback addresses only, unless --dev-allow-remote.
        #[arg(long)]
        dev: bool,
        /// Let --dev listen on a non-loopback address (its credentials are public).
        #[arg(long, requires = "dev")]
        dev_allow_remote: bool,
        /// With --dev: serve https:// and wss:// with a self-signed certificate for localhost,
        /// 127.0.0.1 and ::1, made in the data directory on first use and reused after.
        #[arg(long, requires = "dev")]
        dev_tls: bool,
        /// Delete the API token a --dev run left and give the demo app new Pusher credentials,
        /// so this data directory can serve without --dev (its apps and messages are kept).
        #[arg(long, conflicts_with = "dev")]
        remove_dev_credentials: bool,
    },
    /// Bring the store's schema up to date and exit (`serve` does this at start too). On
    /// PostgreSQL, run it once before starting nodes of a new version.
    Migrate {
        /// TOML configuration file.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Data directory of the embedded store [default: ./herald-data]; store.url, when set,
        /// wins.
        #[arg(long = "data", value_name = "DIR")]
        data_dir: Option<PathBuf>,
    },
    /// Re-encrypt every stored secret under the current main key (main_key /
    /// HERALD_MAIN_KEY), reading the old ones with previous_main_keys, in small transactions
    /// while servers run; then exit. See README, "Secrets at rest", for the procedure.
    RotateMainKey {
        /// TOML configuration file.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Data directory of the embedded store [default: ./herald-data]; store.url, when set,
        /// wins.
        #[arg(long = "data", value_name = "DIR")]
        data_dir: Option<PathBuf>,
    },
    /// Create and list apps, and show their credentials.
    App {
        #[command(subcommand)]
        command: cli::app::AppCommand,
        #[command(flatten)]
        remote: cli::Remote,
    },
    /// Add, list, disable and enable webhook endpoints; rotate their secrets.
    Endpoint {
        #[command(subcommand)]
        command: cli::endpoint::EndpointCommand,
        #[command(flatten)]
        remote: cli::Remote,
    },
    /// Publish an event to an app's endpoints and channels.
    Send(cli::send::SendArgs),
    /// Print an app's events live; with --forward-to, POST each to a local server, signed.
    Listen(cli::listen::ListenArgs),
    /// Resend an endpoint's failed messages since a time.
    Replay(cli::replay::ReplayArgs),
    /// Check the configuration, store, broker, TLS files and clock (and optionally a running
    /// server and a webhook URL), and say what is wrong and how to fix it.
    Doctor(cli::doctor::DoctorArgs),
    /// Print a shell completion script: `herald completions bash > /etc/bash_completion.d/herald`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A filter that does not parse is said, once logging runs, rather than silently
    // replaced by `info`.
    let (filter, unparsed) = match std::env::var("HERALD_LOG") {
        Ok(text) => match tracing_subscriber::EnvFilter::try_new(&text) {
            Ok(filter) => (filter, None),
            Err(e) => (
                tracing_subscriber::EnvFilter::new("info"),
                Some(format!(
                    "HERALD_LOG={text:?} is not a log filter ({e}); logging at info"
                )),
            ),
        },
        Err(_) => (tracing_subscriber::EnvFilter::new("info"), None),
    };
    // Colours only for a person at a terminal: a pipe, a file or a journal gets plain text
    // (and no time spent colouring each request's span). NO_COLOR (no-color.org) turns them
    // off there too.
    let colours = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colours)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        // The current span (the request's, with its id) in each line; not the whole list.
        LogFormat::Json => logs
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
    if let Some(warning) = unparsed {
        tracing::warn!("{warning}");
    }
    let command = match cli.command {
        Command::Completions { shell } => {
            let mut command = Cli::command();
            clap_complete::generate(shell, &mut command, "herald", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        Command::App { .. }
        | Command::Endpoint { .. }
        | Command::Send(_)
        | Command::Listen(_)
        | Command::Replay(_)
        | Command::Doctor(_) => return client(cli.command),
        command => command,
    };
    let cli = Cli {
        command,
        log_format: cli.log_format,
    };
    let dev_tls = matches!(cli.command, Command::Serve { dev_tls: true, .. });
    let rotate = matches!(cli.command, Command::RotateMainKey { .. });
    let (config, overrides, migrate_only) = match cli.command {
        Command::Serve {
            config,
            listen,
            data_dir,
            dev,
            dev_allow_remote,
            remove_dev_credentials,
            ..
        } => (
            config,
            Overrides {
                listen,
                data_dir,
                dev: dev.then_some(true),
                dev_allow_remote: dev_allow_remote.then_some(true),
                remove_dev_credentials: remove_dev_credentials.then_some(true),
            },
            false,
        ),
        Command::Migrate { config, data_dir } | Command::RotateMainKey { config, data_dir } => (
            config,
            Overrides {
                data_dir,
                ..Overrides::default()
            },
            true,
        ),
        _ => unreachable!("the client commands returned above"),
    };
    let config = match Config::load(config.as_deref(), &overrides) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("herald: {e}");
            return ExitCode::from(64); // EX_USAGE
        }
    };
    let (config, dev_certificate) = match with_dev_tls(config, dev_tls) {
        Ok(with) => with,
        Err(DevTlsError::Usage(e)) => {
            eprintln!("herald: {e}");
            return ExitCode::from(64); // EX_USAGE
        }
        Err(DevTlsError::Failed(e)) => {
            eprintln!("herald: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("herald: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let done = if rotate {
        runtime.block_on(rotate_main_key(config))
    } else if migrate_only {
        runtime.block_on(migrate(config))
    } else {
        runtime.block_on(serve(config, dev_certificate))
    };
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("herald: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A command that talks to a running server (or `doctor`): its own small runtime, its error
/// in words on standard error, exit code 1 when it failed.
fn client(command: Command) -> ExitCode {
    // reqwest is built without a bundled crypto provider; ring, as in the server.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("herald: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let done = runtime.block_on(async {
        match command {
            Command::App { command, remote } => cli::app::run(command, &remote).await,
            Command::Endpoint { command, remote } => cli::endpoint::run(command, &remote).await,
            Command::Send(args) => cli::send::run(args).await,
            Command::Listen(args) => cli::listen::run(args).await,
            Command::Replay(args) => cli::replay::run(args).await,
            Command::Doctor(args) => cli::doctor::run(args).await,
            _ => Ok(()),
        }
    });
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("herald: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Re-encrypts every secret under the current main key and says what it did.
async fn rotate_main_key(config: Config) -> anyhow::Result<()> {
    let store_config = config.store_config()?;
    if config.main_key.is_none() {
        tracing::warn!(
            "no main_key configured (HERALD_MAIN_KEY): re-encrypting under the store's generated key"
        );
    }
    let (done, key) = herald::store::rotate_main_key(&store_config, config.main_keys()?).await?;
    println!(
        "herald: re-encrypted {} secret(s) under main key {key} ({} changed meanwhile and were already under it); every secret in {store_config} is under it now, so keys other than main_key can leave previous_main_keys",
        done.rewritten, done.skipped
    );
    if config.main_key.is_some() {
        // The generated key decrypts nothing any more, but still sits beside the data.
        println!(
            "herald: if Herald generated a key before main_key was configured (main.key in the data directory, or the generated_main_key row on PostgreSQL), it decrypts nothing now: delete it"
        );
    }
    Ok(())
}

/// Opens the store (which migrates its schema) and closes it.
async fn migrate(config: Config) -> anyhow::Result<()> {
    let store_config = config.store_config()?;
    let opened = herald::store::open(&store_config, config.main_keys()?).await?;
    opened.store.close().await;
    println!("herald: the store ({store_config}) is up to date");
    Ok(())
}

enum DevTlsError {
    Usage(String),
    Failed(anyhow::Error),
}

/// `--dev-tls`: the data directory's self-signed certificate, made or found, as `tls.cert` and
/// `tls.key`.
fn with_dev_tls(
    mut config: Config,
    dev_tls: bool,
) -> Result<(Config, Option<herald::tls::DevCertificate>), DevTlsError> {
    if !dev_tls {
        return Ok((config, None));
    }
    if config.tls_files().is_some() {
        return Err(DevTlsError::Usage(
            "--dev-tls makes its own certificate, but tls.cert and tls.key are set too: drop one or the other".into(),
        ));
    }
    let dev = herald::tls::dev_certificate(&config.data_dir).map_err(DevTlsError::Failed)?;
    config.tls.cert = Some(dev.files.cert.clone());
    config.tls.key = Some(dev.files.key.clone());
    Ok((config, Some(dev)))
}

async fn serve(
    config: Config,
    dev_certificate: Option<herald::tls::DevCertificate>,
) -> anyhow::Result<()> {
    // One server per SQLite data directory, held until `serve` returns (the store is closed
    // by then): a second would send the same deliveries (`ServingLock`).
    let _serving = match config.store_config()? {
        herald::store::StoreConfig::Sqlite { dir } => {
            Some(herald_store::sqlite::ServingLock::acquire(&dir)?)
        }
        herald::store::StoreConfig::Postgres { .. } => None,
    };
    // A certificate that cannot be served stops the start here, naming the file, before the
    // banner tells anyone a listener is up.
    let tls = config
        .tls_files()
        .map(herald::tls::ListenerTls::load)
        .transpose()?;
    let (http, ws) = match tls {
        Some(_) => ("https", "wss"),
        None => ("http", "ws"),
    };
    #[cfg(unix)]
    raise_open_file_limit(&config);
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
    let addr = listener.local_addr()?;
    // Bound here rather than in `run` so that its address (port 0 too) can be announced.
    let health = match config.tls.health_listen {
        Some(health_addr) => Some(TcpListener::bind(health_addr).await.map_err(|e| {
            anyhow::anyhow!("cannot listen on {health_addr} (tls.health_listen): {e}")
        })?),
        None => None,
    };
    if config.admin_token.is_none() && !config.dev {
        tracing::warn!(
            "no admin token configured (HERALD_ADMIN_TOKEN): only stored API tokens can use the API"
        );
    }
    // Listened for before the banner announces the server: a SIGTERM sent as soon as the
    // banner is read must be a clean shutdown, not the default disposition's kill.
    let term = listen_for_term();
    // With TLS, SIGHUP reloads the certificate; its watcher starts once the store is open,
    // seconds later on a busy PostgreSQL. Registered here, a SIGHUP meanwhile (a renewal hook
    // during a restart) no longer kills the server; the watcher's first poll still loads new
    // files. (tokio's handler, once installed, stays for the process.)
    #[cfg(unix)]
    let _early_hangup = tls
        .is_some()
        .then(|| tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()));
    // Scripts and tests read the first line to learn the bound address. Whoever reads it may
    // close the pipe afterwards (`herald serve | head -1`): the banner is best effort and never
    // stops the server, unlike `println!`, which panics on a closed stdout.
    let mut banner = format!("herald listening on {http}://{addr}\n");
    if let Some(health) = &health {
        banner.push_str(&format!(
            "health checks on http://{}/health/live and /health/ready (plain HTTP)\n",
            health.local_addr()?
        ));
    }
    if let Some(dev) = &dev_certificate {
        banner.push_str(&format!(
            "dev TLS: {} self-signed certificate {}\n\x20 SHA-256 fingerprint {}   (curl --cacert {} https://localhost:{}/health/live)\n",
            if dev.created { "made a" } else { "reusing the" },
            dev.files.cert.display(),
            dev.fingerprint,
            dev.files.cert.display(),
            addr.port(),
        ));
    }
    if config.dev {
        banner.push_str(&format!(
            "dev mode: {}, private webhook targets allowed\n\
             \x20 app uid:   {DEV_APP_UID}\n\
             \x20 API token: {DEV_API_TOKEN}   (curl -H 'Authorization: Bearer {DEV_API_TOKEN}' {http}://{addr}/api/v1/app)\n\
             \x20 Pusher:    app id {DEV_PUSHER_APP_ID}, key {DEV_PUSHER_KEY}, secret {DEV_PUSHER_SECRET}   ({ws}://{addr}/app/{DEV_PUSHER_KEY})\n",
            config
                .store_config()
                .map_or_else(|e| e.to_string(), |s| s.to_string())
        ));
    }
    {
        use std::io::Write;
        let mut stdout = std::io::stdout().lock();
        let _ = stdout
            .write_all(banner.as_bytes())
            .and_then(|()| stdout.flush());
    }
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(
        shutdown.clone(),
        term,
        config.shutdown_deadline(),
    ));
    herald::run_with(
        herald::Listeners {
            main: listener,
            health,
            tls,
        },
        config,
        shutdown,
    )
    .await
}

/// Raises the soft open-file limit to the hard one, as servers with many sockets do (systemd
/// and Docker commonly start a process with a soft limit of 1024 under a far higher hard one,
/// and `listener.max_connections` is 25,000), and warns when what the configuration allows at
/// once still does not fit: beyond the limit, accepts, outbound webhooks and store connections
/// fail with "too many open files".
#[cfg(unix)]
fn raise_open_file_limit(config: &Config) {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let soft = match raised_soft_limit(limit.current, limit.maximum) {
        Some(raised) => {
            let wanted = rustix::process::Rlimit {
                current: Some(raised),
                maximum: limit.maximum,
            };
            match setrlimit(Resource::Nofile, wanted) {
                Ok(()) => {
                    tracing::info!(from = ?limit.current, to = raised, "raised the open-file limit to its hard limit");
                    Some(raised)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not raise the open-file limit");
                    limit.current
                }
            }
        }
        None => limit.current,
    };
    let d = &config.delivery;
    // Connections, outbound webhooks in flight, the store's pool, and some room for the
    // rest (files, the broker, the health listener).
    let wanted = [
        u64::try_from(config.listener.max_connections).unwrap_or(u64::MAX),
        u64::from(d.max_in_flight),
        u64::from(d.max_retries_in_flight),
        u64::from(config.store.max_connections),
        64,
    ]
    .into_iter()
    .fold(0_u64, u64::saturating_add);
    if let Some(soft) = soft
        && soft < wanted
    {
        tracing::warn!(
            open_file_limit = soft,
            wanted,
            "the open-file limit is below what the configuration allows at once (listener.max_connections, delivery.max_in_flight and max_retries_in_flight, store.max_connections): beyond it connections are refused; raise it (LimitNOFILE= in a systemd unit, ulimit -n) or lower those"
        );
    }
}

/// The soft open-file limit to set: the hard one, when the soft one is lower (`None`:
/// unlimited).
fn raised_soft_limit(soft: Option<u64>, hard: Option<u64>) -> Option<u64> {
    match (soft, hard) {
        (Some(soft), Some(hard)) if soft < hard => Some(hard),
        // An unlimited hard limit: as high as the kernel takes for one process.
        (Some(soft), None) => Some(soft.max(1 << 20)).filter(|raised| *raised > soft),
        _ => None,
    }
}

#[cfg(unix)]
type TermSignal = std::io::Result<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type TermSignal = ();

/// Starts listening for SIGTERM (registered by this call, not when first awaited).
fn listen_for_term() -> TermSignal {
    #[cfg(unix)]
    return tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
}

/// Cancels `shutdown` at the first SIGTERM or Ctrl-C, then exits at once at a second one
/// (130), or once the shutdown has run past `deadline` (1).
async fn cancel_on_signal(
    shutdown: CancellationToken,
    term: TermSignal,
    deadline: std::time::Duration,
) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let second_signal = {
        let mut term = match term {
            Ok(term) => term,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                let _ = ctrl_c.await;
                shutdown.cancel();
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
        async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
    };
    #[cfg(not(unix))]
    let second_signal = {
        let () = term;
        let _ = ctrl_c.await;
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    };
    tracing::info!(
        deadline_secs = deadline.as_secs_f64(),
        "shutting down (a second signal exits at once)"
    );
    shutdown.cancel();
    // What the drain had not finished is recovered at the next start either way (leases
    // expire, SQLite re-queues leased deliveries).
    match shutdown_cut_short(second_signal, deadline).await {
        CutShort::SecondSignal => {
            tracing::warn!("a second signal: exiting without finishing the shutdown");
            std::process::exit(130);
        }
        CutShort::Deadline => {
            tracing::error!(
                deadline_secs = deadline.as_secs_f64(),
                "the shutdown did not finish within its deadline (2 x shutdown_grace_secs + 5 s): exiting without finishing it"
            );
            std::process::exit(1);
        }
    }
}

/// Why a shutdown under way is cut short.
#[derive(Debug, PartialEq, Eq)]
enum CutShort {
    SecondSignal,
    Deadline,
}

/// Waits for a second signal or the shutdown's deadline, whichever comes first. (A shutdown
/// that finishes returns from `main` before either.)
async fn shutdown_cut_short(
    second_signal: impl std::future::Future<Output = ()>,
    deadline: std::time::Duration,
) -> CutShort {
    tokio::select! {
        () = second_signal => CutShort::SecondSignal,
        () = tokio::time::sleep(deadline) => CutShort::Deadline,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_soft_open_file_limit_is_raised_to_the_hard_one() {
        assert_eq!(raised_soft_limit(Some(1024), Some(524_288)), Some(524_288));
        assert_eq!(raised_soft_limit(Some(20_000), Some(20_000)), None);
        assert_eq!(raised_soft_limit(None, None), None, "unlimited already");
        assert_eq!(raised_soft_limit(Some(1024), None), Some(1 << 20));
    }

    #[tokio::test(start_paused = true)]
    async fn a_shutdown_is_cut_short_at_its_deadline_or_a_second_signal() {
        let started = tokio::time::Instant::now();
        let cut = shutdown_cut_short(std::future::pending(), Duration::from_secs(25)).await;
        assert_eq!(cut, CutShort::Deadline);
        assert_eq!(started.elapsed(), Duration::from_secs(25));

        let second = tokio::time::sleep(Duration::from_secs(3));
        let started = tokio::time::Instant::now();
        let cut = shutdown_cut_short(second, Duration::from_secs(25)).await;
        assert_eq!(cut, CutShort::SecondSignal);
        assert_eq!(started.elapsed(), Duration::from_secs(3));
    }
}
