//! The operator's and developer's commands that talk to a running Herald over its HTTP API
//! (`app`, `endpoint`, `send`, `listen`, `replay`), and `doctor`, which checks a node's
//! configuration and surroundings. The binary's modules, not the server library's: nothing
//! here runs inside the server.
//!
//! Every API command takes the server's address and a token the same way, first found wins:
//! the flag (`--server`, `--token`), the environment (`HERALD_URL`, `HERALD_TOKEN`), the CLI
//! configuration file (`--cli-config`, `HERALD_CLI_CONFIG`, or
//! `$XDG_CONFIG_HOME/herald/cli.toml`, with `server = "..."` and `token = "..."`), and for the
//! server `http://127.0.0.1:6001`. Output is a table by default and JSON with `--json`.

pub mod api;
pub mod app;
pub mod doctor;
pub mod endpoint;
pub mod listen;
pub mod replay;
pub mod send;

use std::path::PathBuf;

use clap::Args;
use serde::Deserialize;

pub use api::Api;

/// Where the server is and how to authenticate: shared by every API command.
#[derive(Debug, Args, Clone)]
pub struct Remote {
    /// Herald's base URL [env: HERALD_URL] [default: http://127.0.0.1:6001].
    #[arg(long, global = true, value_name = "URL")]
    pub server: Option<String>,
    /// API token (an environment token, or one scoped to the app) [env: HERALD_TOKEN].
    #[arg(long, global = true, value_name = "TOKEN")]
    pub token: Option<String>,
    /// The CLI's configuration file (`server`, `token`) [env: HERALD_CLI_CONFIG]
    /// [default: $XDG_CONFIG_HOME/herald/cli.toml].
    #[arg(long, global = true, value_name = "FILE")]
    pub cli_config: Option<PathBuf>,
    /// Print JSON (one document, or one line per event) for scripts instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

/// The CLI's configuration file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CliFile {
    server: Option<String>,
    token: Option<String>,
}

pub const DEFAULT_SERVER: &str = "http://127.0.0.1:6001";

impl Remote {
    /// The API client these settings describe, or what is missing, in words.
    pub fn connect(&self) -> anyhow::Result<Api> {
        let file = self.file()?;
        let server = self
            .server
            .clone()
            .or_else(|| non_empty_env("HERALD_URL"))
            .or(file.server)
            .unwrap_or_else(|| DEFAULT_SERVER.to_owned());
        let token = self
            .token
            .clone()
            .or_else(|| non_empty_env("HERALD_TOKEN"))
            .or(file.token)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "no API token: pass --token, set HERALD_TOKEN, or put token = \"...\" in the CLI configuration file ({})",
                    self.file_path()
                        .map_or_else(|| "$XDG_CONFIG_HOME/herald/cli.toml".into(), |p| p.display().to_string())
                )
            })?;
        Api::new(&server, &token)
    }

    fn file_path(&self) -> Option<PathBuf> {
        if let Some(path) = &self.cli_config {
            return Some(path.clone());
        }
        if let Some(path) = non_empty_env("HERALD_CLI_CONFIG") {
            return Some(path.into());
        }
        let base = non_empty_env("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .or_else(|| non_empty_env("HOME").map(|home| PathBuf::from(home).join(".config")))?;
        Some(base.join("herald").join("cli.toml"))
    }

    fn file(&self) -> anyhow::Result<CliFile> {
        let Some(path) = self.file_path() else {
            return Ok(CliFile::default());
        };
        let explicit = self.cli_config.is_some() || non_empty_env("HERALD_CLI_CONFIG").is_some();
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                return Ok(CliFile::default());
            }
            Err(e) => anyhow::bail!("cannot read the CLI configuration {}: {e}", path.display()),
        };
        figment::Figment::from(
            <figment::providers::Toml as figment::providers::Format>::string(&text),
        )
        .extract()
        .map_err(|e| anyhow::anyhow!("CLI configuration {}: {e}", path.display()))
    }
}

fn non_empty_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// `text` as one path segment: ids and uids are `[A-Za-z0-9._-]`, so anything else is a
/// mistake to say, not a path to build.
pub fn segment<'a>(what: &str, text: &'a str) -> anyhow::Result<&'a str> {
    if !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        Ok(text)
    } else {
        anyhow::bail!("{what} {text:?} is not an id or uid (letters, digits, '.', '_', '-')")
    }
}

/// An error and its causes on one line (reqwest's own message alone says only "error sending
/// request").
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// `text` encoded for a query string.
pub fn encode(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// A table with a header row, printed the same way by every command.
pub fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut table = comfy_table::Table::new();
    table
        .load_style(comfy_table::presets::NOTHING)
        .set_header(header.iter().map(|h| h.to_uppercase()));
    for row in rows {
        table.add_row(row);
    }
    // comfy-table pads every line to the widest cell; trailing blanks help nobody.
    table
        .lines()
        .map(|line| line.trim_end().to_owned())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Prints `value` as pretty JSON.
pub fn print_json(value: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
    );
}

/// A string field of a JSON object, or "" (tables show what the server sent).
pub fn field(value: &serde_json::Value, name: &str) -> String {
    match value.get(name) {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

/// A moment given as RFC 3339 (`2026-12-01T10:00:00Z`) or as an age (`90s`, `15m`, `2h`, `7d`).
pub fn parse_since(text: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    if let Ok(at) = chrono::DateTime::parse_from_rfc3339(text) {
        return Ok(at.with_timezone(&chrono::Utc));
    }
    let unit = text.chars().last().unwrap_or(' ');
    let number = &text[..text.len() - unit.len_utf8().min(text.len())];
    let seconds_per = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3_600,
        'd' => 86_400,
        _ => 0,
    };
    // Checked: an age past what a date can hold is refused, not a panic.
    let at = number
        .parse::<i64>()
        .ok()
        .filter(|n| seconds_per > 0 && *n >= 0)
        .and_then(|n| chrono::Duration::try_seconds(n.checked_mul(seconds_per)?))
        .and_then(|age| chrono::Utc::now().checked_sub_signed(age));
    match at {
        Some(at) => Ok(at),
        None => Err(format!(
            "{text:?} is neither an RFC 3339 time (2026-12-01T10:00:00Z) nor an age such as 90s, 15m, 2h or 7d"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_reads_times_and_ages() {
        let at = parse_since("2026-12-01T10:00:00Z").expect("rfc 3339");
        assert_eq!(at.to_rfc3339(), "2026-12-01T10:00:00+00:00");
        let age = chrono::Utc::now() - parse_since("2h").expect("age");
        assert!((age.num_seconds() - 7_200).abs() <= 5, "{age}");
        for bad in [
            "",
            "h",
            "2w",
            "-3m",
            "yesterday",
            "99999999999999d",
            "200000000d",
            "9223372036854775807s",
        ] {
            assert!(parse_since(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tables_have_a_header_and_no_trailing_blanks() {
        let out = table(
            &["id", "name"],
            vec![
                vec!["app_1".into(), "Shop".into()],
                vec!["app_22".into(), "B".into()],
            ],
        );
        let lines: Vec<&str> = out.lines().collect();
        assert!(
            lines[0].contains("ID") && lines[0].contains("NAME"),
            "{out}"
        );
        assert!(lines.iter().all(|l| !l.ends_with(' ')), "{out:?}");
        assert_eq!(lines.len(), 3, "{out}");
    }
}
