//! What the load clients share: the clock they stamp events with, what they read of the
//! server's process on this machine (Linux `/proc`), the `memory:` line they print and the
//! `--json` line they write.

use std::{
    io::Write as _,
    path::Path,
    time::{SystemTime, UNIX_EPOCH},
};

/// Microseconds since the epoch: events carry it, receivers subtract it (the server and the
/// client share this machine's clock).
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or_default()
}

/// Resident memory of a process.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// CPU seconds (user and system) a process has used.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // Clock ticks are 1/100 s on Linux.
    Some(ticks / 100.0)
}

pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// The server's memory per idle connection: its growth from `before` to now (`pid`'s RSS),
/// over `count` connections, printed as the `memory:` line with `what` naming them. Returns
/// the RSS now and the KiB per connection: no RSS without a server on this machine, no KiB
/// without one or without connections.
pub fn idle_memory(
    pid: Option<u32>,
    before: Option<u64>,
    count: u64,
    what: &str,
) -> (Option<u64>, Option<f64>) {
    let now = pid.and_then(rss_bytes);
    let per_connection_kib = match (before, now) {
        (Some(_), Some(_)) if count == 0 => {
            println!("memory: not measured (no connection open)");
            None
        }
        (Some(before), Some(after)) => {
            let kib = after.saturating_sub(before) as f64 / 1024.0 / count as f64;
            println!(
                "memory: server RSS {:.1} MiB -> {:.1} MiB, {kib:.1} KiB per {what}",
                mib(before),
                mib(after),
            );
            Some(kib)
        }
        _ => {
            println!("memory: not measured (pass --server-pid of a server on this machine)");
            None
        }
    };
    (now, per_connection_kib)
}

/// Appends `figures` to `path` as one line of JSON: `bench/run` reads the last line back.
pub fn append_json_line(path: &Path, figures: &serde_json::Value) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    writeln!(file, "{figures}")
}
