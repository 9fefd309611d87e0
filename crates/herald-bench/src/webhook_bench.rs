//! `webhook-bench`: load for Herald's webhook faces, and for any server of the Svix API.
//!
//! `--scenario outbound` creates an app and `--endpoints` endpoints pointing at a receiver of
//! its own, then creates messages through `POST /api/v1/app/{app}/msg` with `--concurrency`
//! requests in flight for `--duration` seconds. Message `n` goes to endpoint `n % endpoints`
//! (endpoint `i` filters on the event type `bench.i`). The receiver checks every delivery's
//! Standard Webhooks signature and counts each message once. Reported: messages accepted and
//! delivered per second, create-to-delivery latency (from the start of the create request to
//! the delivery's arrival), the backlog (accepted, not yet delivered) when sending stops, and
//! how long it took to drain.
//!
//! `--scenario inbound` creates a Stripe ingest source and posts Stripe-signed events (each
//! with its own id) to `/ingest/{source}`: verified requests per second and their latency.
//!
//! Exits non-zero when a request failed, a signature did not verify, or an accepted message
//! was not delivered within `--drain-timeout`, so a smoke run in CI proves the path whole.
//! Herald's limits on publish and ingest rates must be lifted for a run (see the README's
//! "Webhooks" under "Performance").

use std::{
    collections::HashSet,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use axum::{
    Router,
    body::Bytes,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    routing::post,
};
use clap::{Parser, ValueEnum};
use herald_bench::{append_json_line, cpu_seconds, mib, now_us, rss_bytes};
use herald_core::signing::EndpointSecret;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::Sha256;

#[derive(Parser, Debug)]
#[command(
    about = "Webhook benchmark: messages through the Svix API to signed deliveries, or Stripe-signed inbound webhooks",
    after_help = "Against `herald serve --dev` with its publish and ingest limits lifted:\n  \
                  HERALD_API__PUBLISH_PER_SECOND_PER_APP=0 herald serve --dev &\n  \
                  webhook-bench --concurrency 16 --duration 10\n  \
                  webhook-bench --concurrency 64 --endpoints 100\n  \
                  webhook-bench --scenario inbound --concurrency 16"
)]
struct Args {
    /// The server's base URL.
    #[arg(long, default_value = "http://127.0.0.1:6001")]
    url: String,
    /// An environment API token (it creates and deletes an app).
    #[arg(long, env = "HERALD_TOKEN", default_value = "demo-token")]
    token: String,
    #[arg(long, value_enum, default_value_t = Scenario::Outbound)]
    scenario: Scenario,
    /// Endpoints the messages are spread over (outbound).
    #[arg(long, default_value_t = 1)]
    endpoints: usize,
    /// Requests in flight at once.
    #[arg(long, short = 'c', default_value_t = 16)]
    concurrency: usize,
    /// Seconds of sending.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Bytes of padding in each payload.
    #[arg(long, default_value_t = 100)]
    payload: usize,
    /// Address the receiver listens on; the server must be allowed to reach it.
    #[arg(long, default_value = "127.0.0.1:0")]
    receiver: SocketAddr,
    /// Seconds deliveries may trail the last accepted message before the run fails.
    #[arg(long, default_value_t = 30)]
    drain_timeout: u64,
    /// The server's process id on this machine, to report its CPU time and memory.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Appends the run's figures as one JSON line to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// The providers' delivery ids the inbound requests carry (the source de-duplicates on
    /// them).
    #[arg(long, value_enum, default_value_t = DeliveryIds::Ordered)]
    delivery_ids: DeliveryIds,
}

/// How the inbound requests' delivery ids follow one another: in the order they are sent, or
/// in no order at all. Herald keeps a unique index of each source's delivery ids, and a new id
/// lands next to the last one or on a page of its own.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum DeliveryIds {
    /// `evt_bench_N`, growing with each request (within each number of digits), as ids that
    /// start with their time do (the KSUIDs of Svix's and Herald's `webhook-id`).
    Ordered,
    /// Random-looking UUIDs: each request's is unique, and each falls anywhere, as the keys
    /// of GitHub, Shopify and HMAC sources do (the body's SHA-256).
    Uuid,
}

impl DeliveryIds {
    /// The `n`th request's delivery id.
    fn nth(self, n: u64) -> String {
        match self {
            Self::Ordered => format!("evt_bench_{n}"),
            Self::Uuid => {
                // splitmix64's finalizer spreads `n` over the leading groups, which decide
                // where the id sorts; the last group is `n` itself, so no two requests share
                // an id.
                let mut z = n.wrapping_add(0x9e37_79b9_7f4a_7c15);
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                z ^= z >> 31;
                format!(
                    "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
                    z >> 32,
                    (z >> 16) & 0xffff,
                    z & 0xfff,
                    0x8000 | (((z >> 12) & 0xf) << 8) | (z >> 56),
                    n & 0xffff_ffff_ffff
                )
            }
        }
    }
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    /// Messages created through the Svix API, delivered to a local receiver.
    Outbound,
    /// Stripe-signed requests to an ingest source.
    Inbound,
}

/// What the receiver saw.
#[derive(Default)]
struct Received {
    secrets: Vec<EndpointSecret>,
    seen: Mutex<HashSet<u64>>,
    /// Create-to-delivery latency of each first delivery, in microseconds.
    latencies_us: Mutex<Vec<u64>>,
    delivered: AtomicU64,
    duplicates: AtomicU64,
    refused: AtomicU64,
}

#[derive(Deserialize)]
struct BenchPayload {
    n: u64,
    sent: u64,
}

async fn receive(
    State(received): State<Arc<Received>>,
    Path(endpoint): Path<usize>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let arrived = now_us();
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let signed = (|| {
        let secret = received.secrets.get(endpoint)?;
        let id = header("webhook-id")?;
        let timestamp: i64 = header("webhook-timestamp")?.parse().ok()?;
        let signatures = header("webhook-signature")?;
        signatures
            .split(' ')
            .filter_map(|s| s.strip_prefix("v1,"))
            .any(|s| secret.verify(id, timestamp, &body, s))
            .then_some(())
    })();
    let payload = serde_json::from_slice::<BenchPayload>(&body);
    let (Some(()), Ok(payload)) = (signed, payload) else {
        received.refused.fetch_add(1, Ordering::Relaxed);
        // A 4xx would only make the server retry; the run fails on the count instead.
        return StatusCode::NO_CONTENT;
    };
    if received.seen.lock().expect("lock").insert(payload.n) {
        received
            .latencies_us
            .lock()
            .expect("lock")
            .push(arrived.saturating_sub(payload.sent));
        received.delivered.fetch_add(1, Ordering::Relaxed);
    } else {
        received.duplicates.fetch_add(1, Ordering::Relaxed);
    }
    StatusCode::NO_CONTENT
}

/// The Svix API, as far as the benchmark uses it.
struct Api {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Api {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut request = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("{method} {path}"))?;
        let status = response.status();
        let text = response.text().await?;
        if !status.is_success() && status != StatusCode::CONFLICT {
            bail!("{method} {path}: {status} {text}");
        }
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }
}

/// Counts of the senders, shared.
#[derive(Default)]
struct Sent {
    next: AtomicU64,
    accepted: AtomicU64,
    failed: AtomicU64,
    /// Request latency of each accepted request, in microseconds.
    latencies_us: Mutex<Vec<u64>>,
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // reqwest is built with rustls but no bundled provider; an https `--url` uses ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let api = Arc::new(Api {
        http: reqwest::Client::builder()
            .pool_max_idle_per_host(args.concurrency.max(1))
            .build()?,
        base: args.url.trim_end_matches('/').to_owned(),
        token: args.token.clone(),
    });
    let app = api
        .call(
            reqwest::Method::POST,
            "/api/v1/app",
            Some(json!({"name": "webhook-bench"})),
        )
        .await?;
    let app_id = app["id"].as_str().context("the app has no id")?.to_owned();
    let outcome = match args.scenario {
        Scenario::Outbound => outbound(&args, &api, &app_id).await,
        Scenario::Inbound => inbound(&args, &api, &app_id).await,
    };
    // The app and everything it holds go, so runs do not pile up in the store.
    api.call(
        reqwest::Method::DELETE,
        &format!("/api/v1/app/{app_id}"),
        None,
    )
    .await?;
    let report = outcome?;
    println!("{}", report.line);
    if let Some(path) = &args.json {
        append_json_line(path, &report.json)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(failure) = report.failure {
        bail!(failure);
    }
    Ok(())
}

struct Report {
    line: String,
    json: Value,
    failure: Option<String>,
}

async fn outbound(args: &Args, api: &Arc<Api>, app_id: &str) -> anyhow::Result<Report> {
    let endpoints = args.endpoints.max(1);
    let listener = tokio::net::TcpListener::bind(args.receiver).await?;
    let receiver_addr = listener.local_addr()?;
    let mut secrets = Vec::with_capacity(endpoints);
    for i in 0..endpoints {
        let event_type = format!("bench.{i}");
        api.call(
            reqwest::Method::POST,
            "/api/v1/event-type",
            Some(json!({"name": event_type, "description": "webhook-bench"})),
        )
        .await?;
        let endpoint = api
            .call(
                reqwest::Method::POST,
                &format!("/api/v1/app/{app_id}/endpoint"),
                Some(json!({
                    "url": format!("http://{receiver_addr}/ep/{i}"),
                    "filterTypes": [event_type],
                })),
            )
            .await?;
        let endpoint_id = endpoint["id"].as_str().context("the endpoint has no id")?;
        let secret = api
            .call(
                reqwest::Method::GET,
                &format!("/api/v1/app/{app_id}/endpoint/{endpoint_id}/secret"),
                None,
            )
            .await?;
        let key = secret["key"].as_str().context("the secret has no key")?;
        secrets.push(EndpointSecret::parse(key).context("the endpoint secret")?);
    }
    let received = Arc::new(Received {
        secrets,
        ..Received::default()
    });
    let router = Router::new()
        .route("/ep/{endpoint}", post(receive))
        .with_state(Arc::clone(&received));
    let receiver = tokio::spawn(async move { axum::serve(listener, router).await });

    let sent = Arc::new(Sent::default());
    let padding = "x".repeat(args.payload);
    let cpu_before = args.server_pid.and_then(cpu_seconds);
    let start = Instant::now();
    let deadline = start + Duration::from_secs(args.duration);
    let path = format!("{}/api/v1/app/{app_id}/msg", api.base);
    let request = {
        let api = Arc::clone(api);
        move |n: u64| {
            let body = json!({
                "eventType": format!("bench.{}", n % endpoints as u64),
                "payload": {"n": n, "sent": now_us(), "pad": padding},
            });
            api.http
                .post(&path)
                .bearer_auth(&api.token)
                .header("content-type", "application/json")
                .body(body.to_string())
        }
    };
    send_until(deadline, args.concurrency, &sent, request).await;
    let sending = start.elapsed().as_secs_f64();
    let accepted = sent.accepted.load(Ordering::Relaxed);
    let delivered_while_sending = received.delivered.load(Ordering::Relaxed);
    let drain_deadline = Instant::now() + Duration::from_secs(args.drain_timeout);
    while received.delivered.load(Ordering::Relaxed) < accepted && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let drained = start.elapsed().as_secs_f64() - sending;
    let cpu = match (cpu_before, args.server_pid.and_then(cpu_seconds)) {
        (Some(before), Some(after)) => Some((after - before) / (sending + drained)),
        _ => None,
    };
    let rss = args.server_pid.and_then(rss_bytes).map(mib);
    receiver.abort();

    let delivered = received.delivered.load(Ordering::Relaxed);
    let mut create = std::mem::take(&mut *sent.latencies_us.lock().expect("lock"));
    create.sort_unstable();
    let mut delivery = std::mem::take(&mut *received.latencies_us.lock().expect("lock"));
    delivery.sort_unstable();
    let failed = sent.failed.load(Ordering::Relaxed);
    let refused = received.refused.load(Ordering::Relaxed);
    let duplicates = received.duplicates.load(Ordering::Relaxed);
    let backlog = accepted.saturating_sub(delivered_while_sending);
    let json = json!({
        "scenario": "outbound",
        "endpoints": endpoints,
        "concurrency": args.concurrency,
        "seconds": sending,
        "accepted": accepted,
        "accepted_per_sec": accepted as f64 / sending,
        "delivered": delivered,
        "delivered_while_sending_per_sec": delivered_while_sending as f64 / sending,
        "backlog_at_end": backlog,
        "drain_seconds": drained,
        "create_p50_ms": percentile(&create, 0.5),
        "create_p99_ms": percentile(&create, 0.99),
        "delivery_p50_ms": percentile(&delivery, 0.5),
        "delivery_p99_ms": percentile(&delivery, 0.99),
        "delivery_max_ms": delivery.last().map_or(0.0, |&us| us as f64 / 1000.0),
        "failed_requests": failed,
        "bad_signatures": refused,
        "duplicates": duplicates,
        "server_cpu_cores": cpu,
        "server_rss_mib": rss,
    });
    let line = format!(
        "outbound {endpoints} endpoint(s), {} in flight, {sending:.1} s: accepted {:.0}/s, delivered {:.0}/s while sending \
         (backlog {backlog}, drained in {drained:.2} s); create p50 {:.2} ms p99 {:.2} ms; \
         create-to-delivery p50 {:.2} ms p99 {:.2} ms max {:.1} ms; {failed} failed, {refused} bad signatures, \
         {duplicates} duplicates{}",
        args.concurrency,
        json["accepted_per_sec"].as_f64().unwrap_or(0.0),
        json["delivered_while_sending_per_sec"]
            .as_f64()
            .unwrap_or(0.0),
        percentile(&create, 0.5),
        percentile(&create, 0.99),
        percentile(&delivery, 0.5),
        percentile(&delivery, 0.99),
        json["delivery_max_ms"].as_f64().unwrap_or(0.0),
        match (cpu, rss) {
            (Some(cpu), Some(rss)) =>
                format!("; server {:.0}% of a core, {rss:.0} MiB", cpu * 100.0),
            _ => String::new(),
        }
    );
    let failure = if failed > 0 || refused > 0 {
        Some(format!(
            "{failed} requests failed and {refused} deliveries did not verify"
        ))
    } else if delivered < accepted {
        Some(format!(
            "{} accepted messages were not delivered within {} s",
            accepted - delivered,
            args.drain_timeout
        ))
    } else if accepted == 0 {
        Some("no message was accepted".to_owned())
    } else {
        None
    };
    Ok(Report {
        line,
        json,
        failure,
    })
}

/// Sends request `n` (numbered from 0, shared by all senders) with `concurrency` requests in
/// flight until `deadline`, counting the accepted (2xx) and failed ones in `sent`; the first
/// failure is printed.
async fn send_until(
    deadline: Instant,
    concurrency: usize,
    sent: &Arc<Sent>,
    request: impl Fn(u64) -> reqwest::RequestBuilder + Clone + Send + 'static,
) {
    let mut senders = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (sent, request) = (Arc::clone(sent), request.clone());
        senders.spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let n = sent.next.fetch_add(1, Ordering::Relaxed);
                let began = Instant::now();
                let failure = match request(n).send().await {
                    Ok(r) if r.status().is_success() => {
                        let _ = r.bytes().await;
                        latencies.push(began.elapsed().as_micros() as u64);
                        sent.accepted.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    Ok(r) => format!("{} {}", r.status(), r.text().await.unwrap_or_default()),
                    Err(e) => e.to_string(),
                };
                if sent.failed.fetch_add(1, Ordering::Relaxed) == 0 {
                    eprintln!("request {n}: {failure}");
                }
            }
            sent.latencies_us.lock().expect("lock").extend(latencies);
        });
    }
    while senders.join_next().await.is_some() {}
}

/// Stripe's signing secret for the bench source (Stripe HMACs with the whole `whsec_` text).
const STRIPE_SECRET: &str = "whsec_webhookbench0000000000000000";

async fn inbound(args: &Args, api: &Arc<Api>, app_id: &str) -> anyhow::Result<Report> {
    let source = api
        .call(
            reqwest::Method::POST,
            &format!("/api/v1/app/{app_id}/ingest/source"),
            Some(json!({"kind": "stripe", "secrets": [STRIPE_SECRET], "eventType": ["{type}"]})),
        )
        .await?;
    let ingest_path = source["ingestPath"]
        .as_str()
        .context("the source has no ingestPath")?;
    let url = format!("{}{ingest_path}", api.base);
    let sent = Arc::new(Sent::default());
    let padding = "x".repeat(args.payload);
    let cpu_before = args.server_pid.and_then(cpu_seconds);
    let start = Instant::now();
    let deadline = start + Duration::from_secs(args.duration);
    let delivery_ids = args.delivery_ids;
    let request = {
        let api = Arc::clone(api);
        move |n: u64| {
            let body = json!({
                "id": delivery_ids.nth(n),
                "object": "event",
                "type": "bench.inbound",
                "data": {"object": {"n": n, "pad": padding}},
            })
            .to_string();
            let timestamp = now_us() / 1_000_000;
            let mut mac =
                Hmac::<Sha256>::new_from_slice(STRIPE_SECRET.as_bytes()).expect("any key");
            mac.update(format!("{timestamp}.").as_bytes());
            mac.update(body.as_bytes());
            let signature = hex::encode(mac.finalize().into_bytes());
            api.http
                .post(&url)
                .header("content-type", "application/json")
                .header("stripe-signature", format!("t={timestamp},v1={signature}"))
                .body(body)
        }
    };
    send_until(deadline, args.concurrency, &sent, request).await;
    let seconds = start.elapsed().as_secs_f64();
    let cpu = match (cpu_before, args.server_pid.and_then(cpu_seconds)) {
        (Some(before), Some(after)) => Some((after - before) / seconds),
        _ => None,
    };
    let rss = args.server_pid.and_then(rss_bytes).map(mib);
    let accepted = sent.accepted.load(Ordering::Relaxed);
    let failed = sent.failed.load(Ordering::Relaxed);
    let mut latencies = std::mem::take(&mut *sent.latencies_us.lock().expect("lock"));
    latencies.sort_unstable();
    let json = json!({
        "scenario": "inbound",
        "concurrency": args.concurrency,
        "seconds": seconds,
        "verified": accepted,
        "verified_per_sec": accepted as f64 / seconds,
        "p50_ms": percentile(&latencies, 0.5),
        "p99_ms": percentile(&latencies, 0.99),
        "failed_requests": failed,
        "server_cpu_cores": cpu,
        "server_rss_mib": rss,
    });
    let line = format!(
        "inbound (stripe), {} in flight, {seconds:.1} s: {:.0} verified requests/s; p50 {:.2} ms p99 {:.2} ms; {failed} failed{}",
        args.concurrency,
        accepted as f64 / seconds,
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        match (cpu, rss) {
            (Some(cpu), Some(rss)) =>
                format!("; server {:.0}% of a core, {rss:.0} MiB", cpu * 100.0),
            _ => String::new(),
        }
    );
    let failure = if failed > 0 {
        Some(format!("{failed} requests failed"))
    } else if accepted == 0 {
        Some("no request was accepted".to_owned())
    } else {
        None
    };
    Ok(Report {
        line,
        json,
        failure,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_delivery_ids_are_distinct_version_4_uuids_in_no_order() {
        let ids: Vec<String> = (0..100_000).map(|n| DeliveryIds::Uuid.nth(n)).collect();
        assert_eq!(
            ids.iter().collect::<HashSet<_>>().len(),
            ids.len(),
            "distinct"
        );
        for id in &ids {
            let groups: Vec<&str> = id.split('-').collect();
            let lengths: Vec<usize> = groups.iter().map(|g| g.len()).collect();
            assert_eq!(lengths, [8, 4, 4, 4, 12], "{id}");
            assert!(groups[2].starts_with('4'), "version 4: {id}");
            assert!(
                matches!(&groups[3][..1], "8" | "9" | "a" | "b"),
                "variant: {id}"
            );
        }
        let ascending = ids.windows(2).filter(|pair| pair[0] < pair[1]).count();
        assert!(
            (40_000..60_000).contains(&ascending),
            "about half of the neighbours ascend, not all: {ascending}"
        );
    }

    #[test]
    fn ordered_delivery_ids_grow_within_a_number_of_digits() {
        let ids: Vec<String> = (10_000..99_999)
            .map(|n| DeliveryIds::Ordered.nth(n))
            .collect();
        assert!(ids.windows(2).all(|pair| pair[0] < pair[1]));
    }
}
