//! Webhook throughput and latency: the real server in-process, a loopback receiver, real HTTP.
//!
//! `cargo bench -p herald --bench webhooks` prints, for a burst of messages sent with bounded
//! concurrency, the accepted messages/s (201s), the delivered messages/s (first send to last
//! delivery), and create-to-first-delivery latency; then the same latency at a paced rate,
//! which is what a lightly loaded server gives. Server, load client and receiver share the
//! machine's cores, so read the figures as ratios between runs, not as absolute capacity.
//!
//! Knobs (environment): BENCH_MESSAGES (20000), BENCH_CONCURRENCY (64), BENCH_PACED (1000),
//! BENCH_PACED_RATE per second (500), BENCH_IDEMPOTENCY_KEYS (1: send one per POST, as the Svix
//! SDKs do), BENCH_ENDPOINTS (1; 0 measures intake alone), BENCH_PER_ENDPOINT (the server's
//! per-endpoint concurrency, default from the configuration), BENCH_STORE_URL (a `postgres://`
//! database to run on instead of SQLite; use an empty one).

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{Router, extract::State, http::HeaderMap, routing::post};
use serde_json::{Value, json};
use tokio::{net::TcpListener, sync::Notify};
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "bench-admin-token-0123456789";

fn knob(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Default)]
struct Arrivals {
    first_seen: Mutex<HashMap<String, Instant>>,
    count: AtomicUsize,
    changed: Notify,
}

async fn receive(State(arrivals): State<Arc<Arrivals>>, headers: HeaderMap) -> &'static str {
    let now = Instant::now();
    if let Some(id) = headers.get("webhook-id").and_then(|v| v.to_str().ok()) {
        let mut seen = arrivals
            .first_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if seen.insert(id.to_owned(), now).is_none() {
            arrivals.count.fetch_add(1, Ordering::Relaxed);
            arrivals.changed.notify_waiters();
        }
    }
    "ok"
}

struct Bench {
    http: reqwest::Client,
    base: String,
    app: String,
    idempotency_keys: bool,
    arrivals: Arc<Arrivals>,
}

impl Bench {
    /// Creates one message; returns its id and when the request started.
    async fn send(&self, n: usize) -> (String, Instant) {
        let started = Instant::now();
        let mut request = self
            .http
            .post(format!("{}/api/v1/app/{}/msg", self.base, self.app))
            .bearer_auth(TOKEN)
            .json(
                &json!({"eventType": "order.created", "payload": {"n": n, "pad": "x".repeat(64)}}),
            );
        if self.idempotency_keys {
            request = request.header("idempotency-key", format!("bench-{n}"));
        }
        let response = request.send().await.expect("create message");
        assert_eq!(response.status(), 201, "create failed");
        let body: Value = response.json().await.expect("json");
        (body["id"].as_str().expect("id").to_owned(), started)
    }

    async fn wait_for(&self, count: usize) {
        loop {
            let notified = self.arrivals.changed.notified();
            if self.arrivals.count.load(Ordering::Relaxed) >= count {
                return;
            }
            if tokio::time::timeout(Duration::from_secs(60), notified)
                .await
                .is_err()
            {
                panic!(
                    "deliveries stalled at {} of {count}",
                    self.arrivals.count.load(Ordering::Relaxed)
                );
            }
        }
    }

    fn latencies(&self, sent: &[(String, Instant)]) -> Vec<Duration> {
        let seen = self
            .arrivals
            .first_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<Duration> = sent
            .iter()
            .map(|(id, start)| seen.get(id).expect("delivered").duration_since(*start))
            .collect();
        out.sort();
        out
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::main]
async fn main() {
    let messages = knob("BENCH_MESSAGES", 20_000);
    let concurrency = knob("BENCH_CONCURRENCY", 64);
    let paced = knob("BENCH_PACED", 1_000);
    let paced_rate = knob("BENCH_PACED_RATE", 500).max(1);
    let idempotency_keys = knob("BENCH_IDEMPOTENCY_KEYS", 1) == 1;
    // 0 measures intake alone (nothing to deliver).
    let endpoints = knob("BENCH_ENDPOINTS", 1);

    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = herald::Config {
        data_dir: dir.path().to_owned(),
        admin_token: Some(TOKEN.into()),
        ..herald::Config::default()
    };
    config.delivery.allow_private_targets = true;
    // The bench measures the path, not the per-app publish limit.
    config.api.publish_per_second_per_app = 0;
    // A PostgreSQL store (`postgres://...`) instead of SQLite in a temporary directory.
    if let Ok(url) = std::env::var("BENCH_STORE_URL") {
        config.store.url = Some(url);
    }
    if let Ok(n) = std::env::var("BENCH_PER_ENDPOINT") {
        config.delivery.per_endpoint_in_flight = n.parse().expect("BENCH_PER_ENDPOINT");
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(herald::run(listener, config, shutdown.clone()));

    let arrivals = Arc::new(Arrivals::default());
    let receiver = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind receiver");
    let receiver_url = format!("http://{}/hook", receiver.local_addr().expect("addr"));
    let sink = Router::new()
        .route("/hook", post(receive))
        .with_state(Arc::clone(&arrivals));
    tokio::spawn(async move { axum::serve(receiver, sink).await });

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()
        .expect("client");
    let app: Value = http
        .post(format!("{base}/api/v1/app"))
        .bearer_auth(TOKEN)
        .json(&json!({"name": "bench"}))
        .send()
        .await
        .expect("create app")
        .json()
        .await
        .expect("json");
    let app = app["id"].as_str().expect("app id").to_owned();
    for _ in 0..endpoints.min(1) {
        http.post(format!("{base}/api/v1/app/{app}/endpoint"))
            .bearer_auth(TOKEN)
            .json(&json!({"url": receiver_url}))
            .send()
            .await
            .expect("create endpoint");
    }
    let bench = Arc::new(Bench {
        http,
        base,
        app,
        idempotency_keys,
        arrivals,
    });

    println!(
        "herald webhooks bench: {messages} messages, concurrency {concurrency}, \
         idempotency keys {idempotency_keys}, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    // Burst: bounded concurrency, as fast as the server accepts.
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let bench = Arc::clone(&bench);
            let next = Arc::clone(&next);
            tokio::spawn(async move {
                let mut sent = Vec::new();
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= messages {
                        return sent;
                    }
                    sent.push(bench.send(n).await);
                }
            })
        })
        .collect();
    let mut sent = Vec::with_capacity(messages);
    for worker in workers {
        sent.extend(worker.await.expect("worker"));
    }
    let accepted_in = started.elapsed();
    if endpoints == 0 {
        println!(
            "intake: accepted {:>8.0} msg/s (no endpoint, nothing delivered)",
            messages as f64 / accepted_in.as_secs_f64()
        );
        shutdown.cancel();
        server.await.expect("server task").expect("server");
        return;
    }
    bench.wait_for(messages).await;
    let delivered_in = started.elapsed();
    let lat = bench.latencies(&sent);
    println!(
        "burst:  accepted {:>8.0} msg/s   delivered {:>8.0} msg/s   create->delivery p50 {}  p99 {}  max {}",
        messages as f64 / accepted_in.as_secs_f64(),
        messages as f64 / delivered_in.as_secs_f64(),
        ms(percentile(&lat, 0.50)),
        ms(percentile(&lat, 0.99)),
        ms(*lat.last().expect("latencies")),
    );

    // Paced: a steady rate well under capacity shows the latency of a lightly loaded server.
    let interval = Duration::from_secs_f64(1.0 / paced_rate as f64);
    let mut ticker = tokio::time::interval(interval);
    let mut paced_sends = Vec::with_capacity(paced);
    for i in 0..paced {
        ticker.tick().await;
        let bench = Arc::clone(&bench);
        paced_sends.push(tokio::spawn(async move { bench.send(messages + i).await }));
    }
    let mut sent = Vec::with_capacity(paced);
    for task in paced_sends {
        sent.push(task.await.expect("send"));
    }
    bench.wait_for(messages + paced).await;
    let lat = bench.latencies(&sent);
    println!(
        "paced:  {paced_rate} msg/s x {paced}          create->delivery p50 {}  p99 {}  max {}",
        ms(percentile(&lat, 0.50)),
        ms(percentile(&lat, 0.99)),
        ms(*lat.last().expect("latencies")),
    );

    shutdown.cancel();
    server.await.expect("server task").expect("server");
}
