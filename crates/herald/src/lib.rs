//! The Herald server, assembled: store, delivery worker, HTTP APIs and WebSocket gateway under
//! one shutdown tree.
//!
//! [`run`] is the single entry point, used by `main` and by the integration tests alike, so
//! the tests exercise exactly what ships.

pub mod config;
pub mod listener;
pub mod retention;
pub mod store;
pub mod tls;

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use chrono::Utc;
use herald_api::{ApiConfig, ApiState, Channels};
use herald_channels::{
    Hub, Publisher,
    broker::{Broker, LocalBroker},
    channel_webhooks::ChannelWebhooks,
    history::History,
    presence::{LocalPresence, PresenceManager},
};
use herald_cluster::postgres::PostgresBroker;
use herald_core::{
    TokenId,
    model::{App, PusherCredentials},
    socketio::{EventRule, Relay, SocketIoSettings},
    token,
};
use herald_delivery::{Dispatcher, WebhookClient};
use herald_metrics::{Metrics, Registry};
use herald_store::{ApiToken, Store, StoreError, TokenScope, postgres::DueLanes};
use herald_ws::connection::WsState;
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub use config::Config;

pub const DEV_APP_UID: &str = "demo";
pub const DEV_API_TOKEN: &str = "demo-token";

/// Under `--dev` (on loopback, without `--dev-allow-remote`), a request is served only if its
/// `Host` is a loopback name or address and its `Origin`, if any, is too. The demo token and
/// secret are public, so a web page the developer happens to open elsewhere must not reach
/// the server: by rebinding its own name to 127.0.0.1 (its requests then carry its `Host`), or
/// by a cross-site request (which carries its `Origin`). 403 otherwise, saying why.
async fn dev_loopback_only(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::{http::header, response::IntoResponse};
    let host = request
        .headers()
        .get(header::HOST)
        .map(|v| v.to_str().unwrap_or_default());
    let origin = request
        .headers()
        .get(header::ORIGIN)
        .map(|v| v.to_str().unwrap_or_default());
    let refused = match (host, origin) {
        (Some(host), _) if !is_loopback_authority(host) => Some(format!("Host {host:?}")),
        (_, Some(origin)) if !loopback_origin(origin) => Some(format!("Origin {origin:?}")),
        _ => None,
    };
    match refused {
        None => next.run(request).await,
        Some(what) => (
            axum::http::StatusCode::FORBIDDEN,
            axum::Json(serde_json::json!({
                "code": "not_loopback",
                "detail": format!(
                    "herald serve --dev answers pages and clients on this machine only, and this request's {what} is not a loopback name or address; use localhost or 127.0.0.1, or start with --dev-allow-remote"
                ),
            })),
        )
            .into_response(),
    }
}

/// `localhost`, `*.localhost`, or a loopback address, with or without a port.
fn is_loopback_authority(authority: &str) -> bool {
    let host = match authority.strip_prefix('[') {
        // [::1]:port
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => authority
            .rsplit_once(':')
            .map_or(authority, |(host, port)| {
                if port.chars().all(|c| c.is_ascii_digit()) {
                    host
                } else {
                    authority
                }
            }),
    };
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    host == "localhost"
        || host.ends_with(".localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

/// An `Origin` of a page on this machine: `scheme://` and a loopback authority.
fn loopback_origin(origin: &str) -> bool {
    origin
        .split_once("://")
        .is_some_and(|(_, authority)| is_loopback_authority(authority))
}
pub const DEV_PUSHER_APP_ID: i64 = 1;
pub const DEV_PUSHER_KEY: &str = "demo-key";
pub const DEV_PUSHER_SECRET: &str = "demo-secret";

const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(3600);
/// How long an expired API token is kept (see `housekeeping`).
const EXPIRED_TOKENS_KEPT_DAYS: i64 = 30;

/// Serve until `shutdown` is cancelled, then drain: stop accepting, finish in-flight requests,
/// give in-flight webhook attempts the grace period, flush the store.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    run_with(
        Listeners {
            main: listener,
            health: None,
            tls: None,
        },
        config,
        shutdown,
    )
    .await
}

/// The sockets [`run_with`] serves, and the main one's TLS.
pub struct Listeners {
    /// Every face: the APIs, WebSockets, SSE, Socket.IO, webhooks in (TLS when configured).
    pub main: TcpListener,
    /// The plain-HTTP health listener (`tls.health_listen`), bound by a caller that announces
    /// its address; `None` while it is configured: bound by `run_with`.
    pub health: Option<TcpListener>,
    /// The certificate loaded by a caller that checked it before announcing the listener (so
    /// the files are read once: a change in between is the watcher's); `None` while
    /// `tls.cert` is set: loaded by `run_with`.
    pub tls: Option<Arc<tls::ListenerTls>>,
}

/// [`run`] with the health listener given.
pub async fn run_with(
    listeners: Listeners,
    config: Config,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let Listeners {
        main: listener,
        health: health_listener,
        tls,
    } = listeners;
    // First: a certificate that cannot be served is a startup error naming the file, before
    // anything opens.
    let tls = match tls {
        Some(loaded) => Some(loaded),
        None => config
            .tls_files()
            .map(tls::ListenerTls::load)
            .transpose()
            .context("TLS on the main listener (tls.cert, tls.key)")?,
    };
    let health_listener = match (health_listener, config.tls.health_listen) {
        (Some(bound), _) => Some(bound),
        (None, Some(addr)) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (tls.health_listen)"))?,
        ),
        (None, None) => None,
    };
    let store_config = config.store_config()?;
    let store::OpenedStore {
        store,
        properties,
        postgres,
    } = store::open(&store_config, config.main_keys()?).await?;
    tracing::info!(backend = properties.backend, "store: {store_config}");
    // A store owned by this process alone: anything still leased was cut off by a crash or a
    // hard stop, so deliver it again (at least once). A shared store's leases may belong to
    // live nodes; they expire instead.
    if properties.single_node {
        let requeued = store.requeue_leased(Utc::now()).await?;
        if requeued > 0 {
            tracing::info!(
                requeued,
                "re-queued deliveries interrupted by the last stop"
            );
        }
    }
    if config.dev {
        seed_dev(store.as_ref()).await?;
    } else {
        refuse_dev_credentials(store.as_ref(), config.remove_dev_credentials).await?;
    }

    // One registry, no global recorder: each component gets its group of handles.
    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    store.observe_commits(Arc::clone(&metrics.store));

    let delivery = config.delivery_config();
    let client = WebhookClient::new(&delivery)?;
    let dispatcher = Dispatcher::new(
        Arc::clone(&store),
        client,
        delivery,
        Arc::clone(&metrics.delivery),
    );
    let channel_webhooks = Arc::new(ChannelWebhooks::new(
        Arc::clone(&store),
        config.channel_webhook_config(),
        Arc::clone(&metrics.channels),
    ));
    // On a shared store the cluster's sweep removes what dead nodes left (as leaves, once);
    // reporting every recorded occupant as left would vacate live nodes' channels.
    let recovered = if postgres.is_some() {
        0
    } else {
        channel_webhooks
            .recover()
            .await
            .context("reading channel occupancy left by the last run")?
    };
    if recovered > 0 {
        tracing::info!(
            recovered,
            "reporting channel leaves the last run could not (channel_vacated, member_removed)"
        );
    }
    // The channel layer: this node's hub, reached only through the broker, which only the
    // publisher feeds; history and presence read through their seams.
    let hub = Arc::new(Hub::new(
        Arc::clone(&channel_webhooks) as _,
        Arc::clone(&metrics.channels),
    ));
    let history = Arc::new(History::new(Arc::clone(&store), config.history_config()));
    // One node: the hub is the broker's only destination. On PostgreSQL, every node sharing the
    // database hears every publication through it (LISTEN/NOTIFY); its session runs below.
    // With `broker.url`, publications travel on Redis or NATS instead (subscribed now, before
    // serving); the LISTEN session keeps deliveries, control and presence.
    let bus = match (&config.broker.url, &postgres) {
        (Some(url), Some(_)) => Some(
            herald_cluster::bus::connect(url, &config.broker.topic)
                .await
                .context("connecting to the broker (broker.url)")?,
        ),
        _ => None,
    };
    if let (Some(_), Some(postgres)) = (&bus, &postgres) {
        // Publications travel on the bus: nobody listens for the store's announcements.
        postgres.announce_history(false);
    }
    if postgres.is_some() {
        // Only a node that can be part of a cluster has a link to count.
        metrics.cluster.register(&mut registry);
    }
    let cluster_pool = postgres.as_ref().map(|postgres| postgres.pool().clone());
    let postgres_broker = postgres.map(|postgres| {
        let wake = dispatcher.handle();
        let broker = PostgresBroker::new(
            herald_cluster::new_node_id(),
            postgres.pool().clone(),
            Arc::clone(&hub),
            Arc::clone(&store),
            Box::new(move |lanes| match lanes {
                DueLanes::FirstAttempts => wake.wake_first_attempts(),
                DueLanes::Any => wake.wake(),
            }),
            bus,
            Arc::clone(&metrics.cluster),
        );
        // The store's cache of apps, endpoints, tokens and sources serves while the broker
        // hears the other nodes' changes to them.
        broker.keep_cache(postgres.cache());
        broker
    });
    let broker: Arc<dyn Broker> = match &postgres_broker {
        Some(broker) => {
            match (broker.bus(), &config.broker.url) {
                (Some(bus), Some(url)) => tracing::info!(
                    node = broker.node(),
                    topic = config.broker.topic,
                    "broker: {} at {} (presence there too; store, queue and control on PostgreSQL)",
                    bus.engine(),
                    herald_cluster::bus::redacted(url)
                ),
                _ => tracing::info!(node = broker.node(), "broker: PostgreSQL (LISTEN/NOTIFY)"),
            }
            Arc::clone(broker) as _
        }
        None => Arc::new(LocalBroker::new(Arc::clone(&hub))),
    };
    // One node: presence is the hub's. On PostgreSQL, every node's rows (see
    // `herald_cluster::presence`): the hub hands its changes there, and the cluster decides
    // and announces them once. `abandon` stops it at once if `run` is dropped (aborted), as a
    // kill would; a graceful stop leaves the cluster after the connections have closed.
    let cluster_presence = match (&postgres_broker, cluster_pool) {
        (Some(broker), Some(pool)) => {
            // Presence is recorded where publications travel when that is Redis or NATS (its
            // notices then ride the bus); on NOTIFY, in PostgreSQL.
            let on_bus = match config.broker.url.as_deref() {
                Some(url) => herald_cluster::presence::record_on_bus(url, &config.broker.topic)
                    .await
                    .context("connecting the presence record to the broker (broker.url)")?,
                None => None,
            };
            let record: Arc<dyn herald_cluster::presence::PresenceRecord> = match on_bus {
                Some(record) => {
                    broker.record_presence_in(Arc::clone(&record));
                    record
                }
                None => Arc::new(herald_cluster::presence::postgres::PostgresRecord::new(
                    pool.clone(),
                )),
            };
            let cluster = herald_cluster::presence::ClusterPresence::new(
                broker.node().to_owned(),
                record,
                Arc::clone(&hub),
                Arc::clone(&channel_webhooks) as _,
                config.node_ttl(),
                store.clock(),
            );
            cluster.keep_terminations_in(pool.clone());
            cluster
                .register()
                .await
                .context("registering this node in the cluster")?;
            Some(cluster)
        }
        _ => None,
    };
    let abandon_presence = CancellationToken::new();
    let _abandon_presence_on_drop = abandon_presence.clone().drop_guard();
    let presence: Arc<dyn PresenceManager> = match &cluster_presence {
        Some(cluster) => Arc::clone(cluster) as _,
        None => Arc::new(LocalPresence::new(Arc::clone(&hub))),
    };
    let publisher = Arc::new(
        Publisher::new(
            Arc::clone(&store),
            broker,
            Arc::clone(&history),
            dispatcher.handle(),
            Arc::clone(&metrics.publish),
        )
        .with_payload_retention(config.retention().payload()),
    );
    let mut state = ApiState::new(
        Arc::clone(&store),
        dispatcher.handle(),
        Channels {
            hub: Arc::clone(&hub),
            publisher: Arc::clone(&publisher),
            presence,
        },
        config.admin_token.as_deref().map(token::hash),
    );
    // One per-address limiter for WebSockets and SSE: a client's sockets and streams count
    // together.
    let clients = Arc::new(herald_channels::limits::ClientLimiter::new(
        config.client_limits(),
    ));
    state.sse = config.sse_config(&clients);
    state.ingest_limits = Arc::new(
        herald_api::rate::IngestLimiter::new(config.ingest_rates())
            .counting_into(Arc::clone(&metrics.api)),
    );
    state.publish_limits = Arc::new(
        herald_api::rate::PublishLimiter::new(config.publish_rates())
            .counting_into(Arc::clone(&metrics.api)),
    );
    state.auth_failures = Arc::new(
        herald_api::rate::AuthFailureLimiter::new(config.auth_failure_rates())
            .counting_into(Arc::clone(&metrics.api)),
    );
    state.shutdown = shutdown.clone();
    state.tls = tls.is_some();
    state.retention_day = config.retention().day;
    state.max_endpoints_per_app = config.api.max_endpoints_per_app;
    state.metrics_registry = Arc::new(registry);
    state.metrics = metrics.clone();
    let connections = TaskTracker::new();
    // Waited for with the connections, before the store closes.
    state.detached = connections.clone();
    let socketio = config.socketio.enabled.then(|| {
        herald_socketio::Face::new(
            Arc::new(store::StoreApps(Arc::clone(&store))),
            Arc::clone(&hub),
            Arc::clone(&publisher),
            config.socketio_config(&clients),
            shutdown.clone(),
            connections.clone(),
        )
    });
    if let Some(face) = &socketio {
        state.app_listener = Some(Arc::new(SocketIoApps(Arc::clone(face))));
    }
    let websockets = herald_ws::connection::router(
        WsState {
            store: Arc::clone(&store),
            hub,
            publisher: Arc::clone(&publisher),
            config: Arc::new(config.ws_config(&clients)),
            // WebSocket connections are upgraded out of the HTTP server's reach: they watch the
            // shutdown token themselves and close with 4200 (reconnect) at once.
            shutdown: shutdown.clone(),
            tasks: connections.clone(),
        },
        config.dev,
    );
    let mut router = herald_api::router(
        state,
        &ApiConfig {
            max_body_bytes: config.api.max_body_bytes,
        },
    )
    .merge(websockets);
    let mut held_open = None;
    if let Some(face) = socketio {
        router = herald_socketio::mount(router, Arc::clone(&face));
        // Before serving: the namespaces of the apps this node knows exist before a
        // reconnect herd arrives (`Face::open_app` says why).
        let keys = store
            .socketio_app_keys()
            .await
            .context("reading the apps with Socket.IO settings")?;
        face.open_keys(keys.iter().map(String::as_str));
        held_open = Some(face);
    }
    // `--dev`'s credentials are public: on loopback, only what loopback pages send.
    if config.dev && !config.dev_allow_remote {
        router = router.layer(axum::middleware::from_fn(dev_loopback_only));
    }
    // Outermost: every face's requests get an id and the span their log lines are in.
    let router = herald_api::with_request_ids(router);

    let background = TaskTracker::new();
    let stop_background = CancellationToken::new();
    if let Some(broker) = postgres_broker {
        if let Some(face) = held_open {
            // Apps created or changed on other nodes get their namespaces here too.
            let changed = Arc::new(tokio::sync::Notify::new());
            let notify = Arc::clone(&changed);
            broker.on_config_change(Box::new(move || notify.notify_one()));
            background.spawn(follow_socketio_apps(
                Arc::clone(&store),
                face,
                changed,
                stop_background.clone(),
            ));
        }
        // Before serving: a client this node admits must hear what other nodes publish.
        let session = broker
            .listen()
            .await
            .context("opening the broker's LISTEN session on PostgreSQL")?;
        background.spawn(broker.run(session, stop_background.clone()));
    }
    // After the last step that may fail: a start that fails must not leave attempts running
    // (and leases held) in a process about to exit without its shutdown.
    background.spawn(dispatcher.run(stop_background.clone()));
    let stop_presence = CancellationToken::new();
    let presence_task = cluster_presence
        .map(|cluster| tokio::spawn(cluster.run(stop_presence.clone(), abandon_presence.clone())));
    background.spawn(housekeeping(
        Arc::clone(&store),
        Arc::clone(&history),
        stop_background.clone(),
    ));
    background.spawn(retention::run(
        Arc::clone(&store),
        config.retention(),
        stop_background.clone(),
    ));
    // Stopped after the connections have closed, so it stores their vacated events too.
    background.spawn(channel_webhooks.run(publisher, stop_background.clone()));
    if let Some(tls) = &tls {
        background.spawn(tls::watch(
            Arc::clone(tls),
            Duration::from_millis(config.tls.watch_interval_ms),
            stop_background.clone(),
        ));
    }

    let limits = config.listener_limits();
    let health_router = health_listener
        .is_some()
        .then(|| listener::health_only(router.clone()));
    // The health listener shares the limits and metrics; it never speaks TLS.
    let serve_health = async {
        match (health_listener, health_router) {
            (Some(health), Some(router)) => {
                listener::serve(
                    health,
                    router,
                    &limits,
                    Arc::clone(&metrics.listener),
                    None,
                    shutdown.clone(),
                )
                .await
            }
            _ => Ok(()),
        }
    };
    let serve_main = listener::serve(
        listener,
        router,
        &limits,
        Arc::clone(&metrics.listener),
        tls.as_ref().map(|tls| tls.acceptor()),
        shutdown.clone(),
    );
    let (served, health_served) = tokio::join!(serve_main, serve_health);
    let served = served.and(health_served);
    connections.close();
    connections.wait().await;
    // The connections' leaves are queued: apply them (reporting webhooks while the channel
    // webhooks still run), then leave the cluster.
    stop_presence.cancel();
    if let Some(task) = presence_task
        && let Err(e) = task.await
    {
        tracing::warn!(error = %e, "presence task failed");
    }
    // Requests have drained: nothing can queue new work, so stop the worker (it waits for its
    // in-flight attempts up to the grace period) and then close the store.
    stop_background.cancel();
    background.close();
    background.wait().await;
    store.close().await;
    served.context("HTTP server failed")
}

async fn housekeeping(store: Arc<dyn Store>, history: Arc<History>, stop: CancellationToken) {
    loop {
        herald_api::purge_idempotency_keys(store.as_ref()).await;
        // Kept a month past their end, so a page left open with an expired portal link is
        // told it expired rather than that its token is unknown; then deleted.
        let expired_before = chrono::Utc::now() - chrono::Duration::days(EXPIRED_TOKENS_KEPT_DAYS);
        match store.purge_expired_tokens(expired_before).await {
            Ok(0) => {}
            Ok(deleted) => tracing::info!(deleted, "API tokens expired a month ago deleted"),
            Err(e) => tracing::error!(error = %e, "purging expired API tokens failed"),
        }
        match history.purge().await {
            Ok(0) => {}
            Ok(deleted) => tracing::info!(deleted, "channel history past retention deleted"),
            Err(e) => tracing::error!(error = %e, "purging channel history failed"),
        }
        tokio::select! {
            () = tokio::time::sleep(HOUSEKEEPING_EVERY) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// Outside `--dev`, the credentials a `--dev` run created are public knowledge: refuse to serve
/// while they exist, unless asked to remove them (the token is deleted, the demo app gets new
/// Pusher credentials and keeps its data).
async fn refuse_dev_credentials(store: &dyn Store, remove: bool) -> anyhow::Result<()> {
    let token_hash = token::hash(DEV_API_TOKEN);
    let has_token = store.find_token(&token_hash).await?.is_some();
    let demo_app = store
        .get_app_by_pusher_key(DEV_PUSHER_KEY)
        .await?
        .filter(|app| {
            app.pusher
                .verifying_secrets(Utc::now())
                .any(|secret| secret == DEV_PUSHER_SECRET)
        });
    if !has_token && demo_app.is_none() {
        return Ok(());
    }
    if !remove {
        anyhow::bail!(
            "this data directory holds the credentials a --dev run created ({}), which anyone can look up. \
             Start with --dev to keep using it for development, or once with --remove-dev-credentials \
             to delete the demo API token and give the demo app new Pusher credentials (apps and messages are kept)",
            [
                has_token.then_some("API token demo-token"),
                demo_app
                    .is_some()
                    .then_some("Pusher key demo-key with secret demo-secret"),
            ]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(", ")
        );
    }
    if has_token {
        store.remove_token(&token_hash).await?;
        tracing::warn!("removed the --dev API token demo-token");
    }
    if let Some(app) = demo_app {
        let fresh = PusherCredentials {
            app_id: app.pusher.app_id,
            ..PusherCredentials::generate()
        };
        store.set_pusher_credentials(&app.id, &fresh).await?;
        tracing::warn!(app = %app.id, key = %fresh.key,
            "gave the --dev demo app new Pusher credentials (read them from the app API)");
    }
    Ok(())
}

/// Opens the Socket.IO namespaces of apps created or changed on other nodes of the cluster,
/// each time the broker says the configuration may have changed (`changed` keeps one wake-up
/// while a read runs, so a burst of changes costs a read or two).
async fn follow_socketio_apps(
    store: Arc<dyn Store>,
    face: Arc<herald_socketio::Face>,
    changed: Arc<tokio::sync::Notify>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = changed.notified() => {}
            () = stop.cancelled() => return,
        }
        match store.socketio_app_keys().await {
            Ok(keys) => face.open_keys(keys.iter().map(String::as_str)),
            Err(e) => tracing::warn!(error = %e,
                "reading the apps with Socket.IO settings failed: their namespaces open at their first CONNECT"),
        }
    }
}

/// The Socket.IO face hears of the apps this node's API saves and deletes.
struct SocketIoApps(Arc<herald_socketio::Face>);

impl herald_api::AppListener for SocketIoApps {
    fn saved(&self, app: &App) {
        self.0.open_app(app);
    }

    fn deleted(&self, app: &App) {
        self.0.close_app(app);
    }
}

/// `--dev`: the demo app and an environment-wide token, created once. Nodes of one cluster
/// starting together may both find the app missing: the one whose create meets the other's
/// app (a uid conflict) takes it as seeded.
async fn seed_dev(store: &dyn Store) -> anyhow::Result<()> {
    if store.get_app(DEV_APP_UID).await?.is_none() {
        let now = Utc::now();
        let created = store
            .create_app(&App {
                id: herald_core::AppId::new(now),
                uid: Some(DEV_APP_UID.to_owned()),
                name: "Demo".to_owned(),
                throttle_rate: None,
                metadata: Default::default(),
                pusher: PusherCredentials {
                    app_id: DEV_PUSHER_APP_ID,
                    key: DEV_PUSHER_KEY.to_owned(),
                    secret: DEV_PUSHER_SECRET.to_owned(),
                    previous: None,
                },
                history: None,
                // The chat example works out of the box: any page may connect, and `chat
                // message` goes to everyone in the namespace.
                socketio: Some(SocketIoSettings {
                    allowed_origins: vec!["*".to_owned()],
                    namespace_channel: None,
                    events: vec![EventRule {
                        event: "chat message".to_owned(),
                        relay: Relay::Everyone,
                        webhook: false,
                    }],
                }),
                payload_retention_days: None,
                created_at: now,
                updated_at: now,
            })
            .await;
        match created {
            Err(StoreError::Conflict(_)) if store.get_app(DEV_APP_UID).await?.is_some() => {}
            other => other?,
        }
    }
    let now = Utc::now();
    let dev_token = ApiToken {
        id: TokenId::new(now),
        name: "dev".to_owned(),
        scope: TokenScope::Environment,
        created_at: now,
        expires_at: None,
    };
    store
        .add_token(&dev_token, &token::hash(DEV_API_TOKEN))
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_store::prelude::*;

    #[test]
    fn dev_serves_loopback_hosts_and_origins_only() {
        for host in [
            "localhost",
            "localhost:6001",
            "LOCALHOST.:6001",
            "app.localhost:3000",
            "127.0.0.1:6001",
            "127.8.9.10",
            "[::1]:6001",
            "[::ffff:127.0.0.1]:6001",
        ] {
            assert!(is_loopback_authority(host), "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:6001",
            "localhost.evil.example",
            "10.0.0.1:6001",
            "[2001:db8::1]:6001",
            "",
        ] {
            assert!(!is_loopback_authority(host), "{host}");
        }
        assert!(loopback_origin("http://localhost:5173"));
        assert!(loopback_origin("https://127.0.0.1:8080"));
        assert!(!loopback_origin("https://evil.example"));
        assert!(!loopback_origin("null"), "a file or sandboxed page");
    }

    /// Two nodes starting together with `--dev` on one fresh database both seed: neither
    /// fails, and there is one demo app.
    #[tokio::test]
    async fn dev_seeding_twice_at_once_leaves_one_demo_app() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = herald_store::sqlite::SqliteStore::open(dir.path())
            .await
            .expect("open");
        let (one, two) = tokio::join!(seed_dev(&store), seed_dev(&store));
        one.expect("first seed");
        two.expect("second seed");
        let apps = store
            .list_apps(&herald_store::Page {
                limit: 10,
                iterator: None,
                descending: false,
                backwards: false,
            })
            .await
            .expect("list");
        assert_eq!(apps.len(), 1);
        assert_eq!(apps[0].uid.as_deref(), Some(DEV_APP_UID));
    }
}
