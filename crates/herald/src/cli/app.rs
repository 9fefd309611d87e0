//! `herald app`: create, list, and show an app's credentials.

use clap::Subcommand;
use serde_json::{Value, json};

use super::{Remote, field, print_json, segment, table};

#[derive(Debug, Subcommand)]
pub enum AppCommand {
    /// Create an app (an environment-wide token is needed).
    Create {
        /// Its name, shown in lists and the console.
        name: String,
        /// Your own id for it, usable wherever the app's id is.
        #[arg(long)]
        uid: Option<String>,
    },
    /// List the apps the token can see.
    List,
    /// Show an app's ids and Pusher credentials (app id, key, secret) for client libraries.
    Credentials {
        /// The app's id or uid.
        app: String,
    },
}

pub async fn run(command: AppCommand, remote: &Remote) -> anyhow::Result<()> {
    let api = remote.connect()?;
    match command {
        AppCommand::Create { name, uid } => {
            let mut body = json!({ "name": name });
            if let Some(uid) = uid {
                body["uid"] = Value::String(uid);
            }
            let app = api.post("/api/v1/app", body).await?;
            if remote.json {
                print_json(&app);
            } else {
                println!(
                    "created app {} ({})",
                    field(&app, "id"),
                    field(&app, "name")
                );
                print_credentials(&app);
            }
        }
        AppCommand::List => {
            let apps = api.list_all("/api/v1/app").await?;
            if remote.json {
                print_json(&Value::Array(apps));
            } else {
                let rows = apps
                    .iter()
                    .map(|app| {
                        vec![
                            field(app, "id"),
                            field(app, "uid"),
                            field(app, "name"),
                            app.pointer("/pusher/key")
                                .and_then(Value::as_str)
                                .unwrap_or("")
                                .to_owned(),
                            field(app, "createdAt"),
                        ]
                    })
                    .collect();
                println!(
                    "{}",
                    table(&["id", "uid", "name", "pusher key", "created"], rows)
                );
            }
        }
        AppCommand::Credentials { app } => {
            let app = api
                .get(&format!("/api/v1/app/{}", segment("app", &app)?))
                .await?;
            if remote.json {
                print_json(&json!({
                    "id": app.get("id"),
                    "uid": app.get("uid"),
                    "name": app.get("name"),
                    "pusher": app.get("pusher"),
                    "server": api.base().as_str(),
                }));
            } else {
                print_credentials(&app);
            }
        }
    }
    Ok(())
}

fn print_credentials(app: &Value) {
    let pusher = |name: &str| {
        app.pointer(&format!("/pusher/{name}"))
            .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
            .unwrap_or_default()
    };
    let rows = vec![
        vec!["id".into(), field(app, "id")],
        vec!["uid".into(), field(app, "uid")],
        vec!["name".into(), field(app, "name")],
        vec!["pusher app id".into(), pusher("appId")],
        vec!["pusher key".into(), pusher("key")],
        vec!["pusher secret".into(), pusher("secret")],
    ];
    println!("{}", table(&["credential", "value"], rows));
}
