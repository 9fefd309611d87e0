//! `herald endpoint`: add, list, disable and enable an app's webhook endpoints, and rotate
//! their signing secrets.

use clap::Subcommand;
use serde_json::{Value, json};

use super::{Remote, field, print_json, segment, table};

#[derive(Debug, Subcommand)]
pub enum EndpointCommand {
    /// Add an endpoint: Herald signs and POSTs the app's messages to URL.
    Add {
        /// The app's id or uid.
        app: String,
        /// Where to POST (http:// or https://).
        url: String,
        /// Only these event types (repeat the flag); every type when absent.
        #[arg(long = "event-type", value_name = "TYPE")]
        event_types: Vec<String>,
        /// Only messages on these channels (repeat the flag).
        #[arg(long = "channel", value_name = "CHANNEL")]
        channels: Vec<String>,
        #[arg(long)]
        description: Option<String>,
        /// Your own id for it.
        #[arg(long)]
        uid: Option<String>,
    },
    /// List an app's endpoints with their delivery counts.
    List {
        /// The app's id or uid.
        app: String,
    },
    /// Stop delivering to an endpoint (messages for it are not queued while disabled).
    Disable {
        app: String,
        /// The endpoint's id or uid.
        endpoint: String,
    },
    /// Deliver to a disabled endpoint again.
    Enable { app: String, endpoint: String },
    /// Give an endpoint a new signing secret and print it; the old one keeps signing too for
    /// 24 hours, so receivers can switch over.
    RotateSecret { app: String, endpoint: String },
}

pub async fn run(command: EndpointCommand, remote: &Remote) -> anyhow::Result<()> {
    let api = remote.connect()?;
    match command {
        EndpointCommand::Add {
            app,
            url,
            event_types,
            channels,
            description,
            uid,
        } => {
            let mut body = json!({ "url": url });
            if !event_types.is_empty() {
                body["filterTypes"] = json!(event_types);
            }
            if !channels.is_empty() {
                body["channels"] = json!(channels);
            }
            if let Some(description) = description {
                body["description"] = Value::String(description);
            }
            if let Some(uid) = uid {
                body["uid"] = Value::String(uid);
            }
            let app = segment("app", &app)?;
            let endpoint = api
                .post(&format!("/api/v1/app/{app}/endpoint"), body)
                .await?;
            let id = field(&endpoint, "id");
            let secret = api
                .get(&format!("/api/v1/app/{app}/endpoint/{id}/secret"))
                .await?;
            if remote.json {
                let mut out = endpoint;
                out["secret"] = secret.get("key").cloned().unwrap_or(Value::Null);
                print_json(&out);
            } else {
                println!("added endpoint {id} -> {}", field(&endpoint, "url"));
                println!("signing secret: {}", field(&secret, "key"));
            }
        }
        EndpointCommand::List { app } => {
            let app = segment("app", &app)?;
            let endpoints = api.list_all(&format!("/api/v1/app/{app}/endpoint")).await?;
            let mut listed = Vec::with_capacity(endpoints.len());
            for endpoint in endpoints {
                let id = field(&endpoint, "id");
                let stats = api
                    .get(&format!("/api/v1/app/{app}/endpoint/{id}/stats"))
                    .await?;
                listed.push((endpoint, stats));
            }
            if remote.json {
                let out = listed
                    .into_iter()
                    .map(|(mut endpoint, stats)| {
                        endpoint["stats"] = stats;
                        endpoint
                    })
                    .collect();
                print_json(&Value::Array(out));
            } else {
                let rows = listed
                    .iter()
                    .map(|(endpoint, stats)| {
                        vec![
                            field(endpoint, "id"),
                            field(endpoint, "url"),
                            if endpoint.get("disabled") == Some(&Value::Bool(true)) {
                                "disabled".into()
                            } else {
                                "enabled".into()
                            },
                            list(endpoint.get("filterTypes")),
                            list(endpoint.get("channels")),
                            field(stats, "success"),
                            field(stats, "fail"),
                            field(stats, "pending"),
                        ]
                    })
                    .collect();
                println!(
                    "{}",
                    table(
                        &[
                            "id",
                            "url",
                            "state",
                            "event types",
                            "channels",
                            "delivered",
                            "failed",
                            "pending"
                        ],
                        rows
                    )
                );
            }
        }
        EndpointCommand::Disable { app, endpoint } => {
            set_disabled(&api, remote, &app, &endpoint, true).await?;
        }
        EndpointCommand::Enable { app, endpoint } => {
            set_disabled(&api, remote, &app, &endpoint, false).await?;
        }
        EndpointCommand::RotateSecret { app, endpoint } => {
            let app = segment("app", &app)?;
            let endpoint = segment("endpoint", &endpoint)?;
            let secret = api
                .post(
                    &format!("/api/v1/app/{app}/endpoint/{endpoint}/secret/rotate"),
                    json!({}),
                )
                .await?;
            if remote.json {
                print_json(&secret);
            } else {
                println!("new signing secret: {}", field(&secret, "key"));
                println!("(the previous secret also signs for 24 hours, so receivers can switch)");
            }
        }
    }
    Ok(())
}

async fn set_disabled(
    api: &super::Api,
    remote: &Remote,
    app: &str,
    endpoint: &str,
    disabled: bool,
) -> anyhow::Result<()> {
    let app = segment("app", app)?;
    let endpoint = segment("endpoint", endpoint)?;
    let updated = api
        .patch(
            &format!("/api/v1/app/{app}/endpoint/{endpoint}"),
            json!({ "disabled": disabled }),
        )
        .await?;
    if remote.json {
        print_json(&updated);
    } else {
        println!(
            "endpoint {} {}",
            field(&updated, "id"),
            if disabled { "disabled" } else { "enabled" }
        );
    }
    Ok(())
}

fn list(value: Option<&Value>) -> String {
    match value.and_then(Value::as_array) {
        Some(items) => items
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(","),
        None => "*".into(),
    }
}
