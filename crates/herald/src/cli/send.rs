//! `herald send`: publish one event, to the app's endpoints that want its type and to the
//! channels named, through the same message API producers use.

use std::path::PathBuf;

use clap::Args;
use serde::Serialize;
use serde_json::{Value, value::RawValue};

use super::{Remote, field, print_json, segment};

#[derive(Debug, Args)]
pub struct SendArgs {
    #[command(flatten)]
    pub remote: Remote,
    /// The app's id or uid.
    pub app: String,
    /// The event type (`order.paid`): the endpoints filtering on it receive it; on channels it
    /// is the event's name.
    pub event_type: String,
    /// The payload: a JSON object [default: {}].
    #[arg(long, value_name = "JSON", conflicts_with = "data_file")]
    pub data: Option<String>,
    /// Read the payload from a file (`-` for standard input).
    #[arg(long, value_name = "FILE")]
    pub data_file: Option<PathBuf>,
    /// Also publish it on these channels (repeat the flag).
    #[arg(long = "channel", value_name = "CHANNEL")]
    pub channels: Vec<String>,
    /// Your id for the event: sending the same one again within a day is a no-op (409).
    #[arg(long)]
    pub event_id: Option<String>,
}

pub async fn run(args: SendArgs) -> anyhow::Result<()> {
    let remote = &args.remote;
    let text = match (&args.data, &args.data_file) {
        (Some(data), _) => data.clone(),
        (None, Some(path)) if path.as_os_str() == "-" => std::io::read_to_string(std::io::stdin())
            .map_err(|e| anyhow::anyhow!("cannot read the payload from standard input: {e}"))?,
        (None, Some(path)) => std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read the payload from {}: {e}", path.display()))?,
        (None, None) => "{}".to_owned(),
    };
    let checked: Value = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("the payload is not JSON ({e}): {}", preview(&text)))?;
    if !checked.is_object() {
        anyhow::bail!(
            "the payload must be a JSON object, like {{\"id\": 1}}; got {}",
            preview(&text)
        );
    }
    // Sent as written (key order and spacing kept): receivers get these bytes.
    let payload: &RawValue = serde_json::from_str(text.trim())?;
    let body = MessageIn {
        event_type: &args.event_type,
        payload,
        channels: (!args.channels.is_empty()).then_some(&args.channels),
        event_id: args.event_id.as_deref(),
    };
    let body = serde_json::to_string(&body)?;
    let api = remote.connect()?;
    let app = segment("app", &args.app)?;
    let message = api
        .post_text(&format!("/api/v1/app/{app}/msg"), body)
        .await?;
    if remote.json {
        print_json(&message);
    } else {
        println!(
            "sent {} ({}){}",
            field(&message, "id"),
            field(&message, "eventType"),
            if args.channels.is_empty() {
                String::new()
            } else {
                format!(" on {}", args.channels.join(", "))
            }
        );
    }
    Ok(())
}

/// The message API's body.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct MessageIn<'a> {
    event_type: &'a str,
    payload: &'a RawValue,
    #[serde(skip_serializing_if = "Option::is_none")]
    channels: Option<&'a Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    event_id: Option<&'a str>,
}

fn preview(text: &str) -> String {
    let mut shown: String = text.chars().take(60).collect();
    if shown.len() < text.len() {
        shown.push_str("...");
    }
    format!("{shown:?}")
}
