//! `seed-store`: fills a Herald data directory with N published messages, for measuring
//! start-up on a store that is not empty (issue 15: under 100 ms with 1M messages).
//!
//! It writes through the store's own API (`herald_store::SqliteStore`), the way the publish
//! path does: each message with a history entry on one of a few channels, many publications in
//! flight so the group commit batches them. Going through the API rather than SQL keeps the
//! seed true to whatever the schema becomes.

use std::{path::PathBuf, sync::Arc, time::Instant};

use anyhow::Context;
use bytes::Bytes;
use chrono::Utc;
use clap::Parser;
use herald_core::{
    AppId, MessageId,
    history::{NewHistoryEntry, Retention},
    model::{App, Message, Metadata, PusherCredentials},
};
use herald_store::{AppStore, MessageStore, StoreLifecycle, sqlite::SqliteStore};
use tokio::task::JoinSet;

#[derive(Parser, Debug)]
#[command(about = "Fill a Herald data directory with published messages")]
struct Args {
    /// The data directory (`herald serve --data`); created if missing.
    #[arg(long)]
    data: PathBuf,
    /// Messages to publish.
    #[arg(long, default_value_t = 1_000_000)]
    messages: u64,
    /// History channels the messages are spread over.
    #[arg(long, default_value_t = 10)]
    channels: u64,
    /// Publications in flight.
    #[arg(long, default_value_t = 512)]
    in_flight: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let started = Instant::now();
    let store = Arc::new(
        SqliteStore::open(&args.data)
            .await
            .with_context(|| format!("opening the store in {}", args.data.display()))?,
    );
    let now = Utc::now();
    let app = App {
        id: AppId::new(now),
        uid: Some("seeded".into()),
        name: "seeded".into(),
        throttle_rate: None,
        metadata: Metadata::new(),
        pusher: PusherCredentials::generate(),
        history: None,
        socketio: None,
        payload_retention_days: None,
        created_at: now,
        updated_at: now,
    };
    store.create_app(&app).await.context("creating the app")?;

    let mut publishers = JoinSet::new();
    let workers = args.in_flight.max(1);
    for worker in 0..workers {
        let store = Arc::clone(&store);
        let app_id = app.id.clone();
        let (messages, channels) = (args.messages, args.channels.max(1));
        publishers.spawn(async move {
            let mut n = worker;
            while n < messages {
                let now = Utc::now();
                let channel = format!("orders-{}", n % channels);
                let payload = format!(r#"{{"order":{n},"status":"paid"}}"#);
                let message = Message {
                    id: MessageId::new(now),
                    app_id: app_id.clone(),
                    event_id: None,
                    event_type: "order.paid".into(),
                    channels: Some(vec![channel.clone()]),
                    tags: None,
                    payload: Bytes::from(payload.clone()),
                    created_at: now,
                    payload_expires_at: None,
                };
                let entry = NewHistoryEntry {
                    app_id: app_id.clone(),
                    channel,
                    event: "order.paid".into(),
                    data: payload,
                    raw_json: true,
                    user_id: None,
                    created_at: now,
                    retention: Retention {
                        max_events: 100,
                        max_age: std::time::Duration::from_secs(86_400),
                    },
                    first_epoch: None,
                    except: None,
                };
                store
                    .store_publication(Some((message, Vec::new())), vec![entry])
                    .await
                    .with_context(|| format!("publishing message {n}"))?;
                n += workers;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = publishers.join_next().await {
        done.context("a publisher panicked")??;
    }
    store.close().await;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "seeded {} messages over {} channels in {} in {secs:.1} s ({:.0}/s)",
        args.messages,
        args.channels,
        args.data.display(),
        args.messages as f64 / secs
    );
    Ok(())
}
