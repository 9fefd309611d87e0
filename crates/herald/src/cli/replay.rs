//! `herald replay`: resend an endpoint's failed messages since a time, with a progress bar and
//! a summary. Each resend is the API's manual attempt (`POST .../msg/{msg}/endpoint/{ep}/resend`),
//! logged with the message's other attempts.

use clap::Args;
use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};

use super::{Remote, encode, parse_since, print_json, segment};

#[derive(Debug, Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub remote: Remote,
    /// The app's id or uid.
    pub app: String,
    /// The endpoint's id or uid.
    pub endpoint: String,
    /// Messages created since: RFC 3339, or an age such as 30m, 6h or 2d.
    #[arg(long, value_parser = parse_since)]
    pub since: chrono::DateTime<chrono::Utc>,
    /// Messages created before (RFC 3339 or an age) [default: no end].
    #[arg(long, value_parser = parse_since)]
    pub until: Option<chrono::DateTime<chrono::Utc>>,
    /// Resends in flight at once.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub concurrency: u16,
}

/// Svix's delivery status of a message whose every attempt failed.
const FAILED: u8 = 2;

pub async fn run(args: ReplayArgs) -> anyhow::Result<()> {
    let remote = &args.remote;
    let api = remote.connect()?;
    let app = segment("app", &args.app)?;
    let endpoint = segment("endpoint", &args.endpoint)?;
    let since = args
        .since
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let mut path = format!(
        "/api/v1/app/{app}/endpoint/{endpoint}/msg?status={FAILED}&with_content=false&after={}",
        encode(&since)
    );
    // Always closed at both ends: with `after` alone, Svix's server (and Herald's) pages from
    // that time on with `prevIterator`, older Herald servers from the newest with `iterator`.
    // Closed, every version reads newest first and walks `iterator`; by default a day ahead of
    // now, past any clock difference with the server. Svix's server then drops `after`, so the
    // walk itself stops at the first message from before `--since`. Resent oldest first.
    let until = args
        .until
        .unwrap_or_else(|| chrono::Utc::now() + chrono::Duration::days(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    path.push_str(&format!("&before={}", encode(&until)));
    let created = |message: &Value| {
        message
            .get("timestamp")
            .and_then(Value::as_str)
            .and_then(|at| chrono::DateTime::parse_from_rfc3339(at).ok())
    };
    // Ids order messages by time only to within a few milliseconds (and a cluster's nodes by
    // their clocks), so the walk goes a second past `--since` and the list is then cut exactly.
    let slack = args.since - chrono::Duration::seconds(1);
    let mut listed = api
        .list_while(&path, |message| {
            created(message).is_none_or(|at| at > slack)
        })
        .await?;
    listed.retain(|message| created(message).is_none_or(|at| at > args.since));
    listed.reverse();
    let failed: Vec<String> = listed
        .iter()
        .filter_map(|m| m.get("id").and_then(Value::as_str).map(str::to_owned))
        .collect();

    // Drawn on standard error, and only on a terminal (indicatif hides it otherwise).
    let bar = ProgressBar::new(failed.len() as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} resending [{bar:30}] {pos}/{len} {per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let api = &api;
    let results: Vec<(String, Result<(), String>)> =
        futures_util::stream::iter(failed.iter().cloned())
            .map(|msg| {
                let bar = bar.clone();
                async move {
                    let path = format!("/api/v1/app/{app}/msg/{msg}/endpoint/{endpoint}/resend");
                    let done = api
                        .post(&path, json!({}))
                        .await
                        .map(drop)
                        .map_err(|e| format!("{e:#}"));
                    bar.inc(1);
                    (msg, done)
                }
            })
            .buffer_unordered(usize::from(args.concurrency))
            .collect()
            .await;
    bar.finish_and_clear();

    let refused: Vec<(&String, &String)> = results
        .iter()
        .filter_map(|(msg, done)| done.as_ref().err().map(|e| (msg, e)))
        .collect();
    let resent = results.len() - refused.len();
    if remote.json {
        print_json(&json!({
            "found": failed.len(),
            "resent": resent,
            "refused": refused
                .iter()
                .map(|(msg, error)| json!({"messageId": msg, "error": error}))
                .collect::<Vec<_>>(),
        }));
    } else {
        println!(
            "resent {resent} of {} failed message(s) since {since} to {endpoint}",
            failed.len()
        );
        for (msg, error) in refused.iter().take(20) {
            println!("  {msg}: {error}");
        }
        if refused.len() > 20 {
            println!("  ... and {} more refused", refused.len() - 20);
        }
    }
    if refused.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("{} resend(s) refused", refused.len())
    }
}
