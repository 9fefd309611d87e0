//! Architecture invariants from ARCHITECTURE.md that a test can check by reading the source,
//! in the manner of rust-analyzer's `tidy`: they fail the build the day someone breaks them.

use std::path::{Path, PathBuf};

/// The workspace root (this crate lives in `crates/herald`).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("the workspace root is two levels up")
        .to_owned()
}

fn rust_files(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read a source directory") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, found);
        } else if path.extension().is_some_and(|e| e == "rs") {
            found.push(path);
        }
    }
}

/// The names in a Cargo manifest's `[dependencies]` table.
fn dependencies(manifest: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(manifest).expect("read the manifest");
    text.lines()
        .skip_while(|line| line.trim() != "[dependencies]")
        .skip(1)
        .take_while(|line| !line.trim_start().starts_with('['))
        .filter_map(|line| {
            let name = line.split(['=', '.']).next()?.trim();
            (!name.is_empty() && !name.starts_with('#')).then(|| name.to_owned())
        })
        .collect()
}

#[test]
fn the_domain_crate_depends_on_no_runtime_database_or_network_crate() {
    const IO: [&str; 10] = [
        "tokio",
        "tokio-util",
        "sqlx",
        "axum",
        "hyper",
        "hyper-util",
        "reqwest",
        "rustls",
        "tungstenite",
        "tracing-subscriber",
    ];
    let deps = dependencies(&root().join("crates/herald-core/Cargo.toml"));
    assert!(!deps.is_empty(), "the manifest was read");
    let io: Vec<&String> = deps.iter().filter(|d| IO.contains(&d.as_str())).collect();
    assert!(
        io.is_empty(),
        "herald-core must do no I/O, but depends on {io:?}"
    );
}

/// The workspace denies `unsafe` code; one function may opt out, the SQLite group commit's loan
/// of the writer's handle to rusqlite (`herald-store/src/sqlite/batch/locked.rs`), whose safety
/// argument lives beside it. Any other opt-out, or a crate that stops using the workspace's
/// lints, is a decision for review, not an accident.
#[test]
fn unsafe_code_is_allowed_in_one_place_only() {
    let mut files = Vec::new();
    rust_files(&root().join("crates"), &mut files);
    let opt_outs: Vec<String> = files
        .iter()
        .filter(|file| {
            let text = std::fs::read_to_string(file).expect("read a source file");
            text.contains(concat!("allow(", "unsafe_code)"))
        })
        .map(|file| {
            file.strip_prefix(root())
                .unwrap_or(file)
                .display()
                .to_string()
        })
        .collect();
    assert_eq!(
        opt_outs,
        ["crates/herald-store/src/sqlite/batch/locked.rs"],
        "files that opt out of the workspace's `unsafe_code = \"deny\"`"
    );
    let workspace = std::fs::read_to_string(root().join("Cargo.toml")).expect("read Cargo.toml");
    assert!(
        workspace.contains("unsafe_code = \"deny\""),
        "the workspace denies unsafe code"
    );
    let mut manifests = Vec::new();
    for entry in std::fs::read_dir(root().join("crates")).expect("read crates/") {
        let manifest = entry.expect("a directory entry").path().join("Cargo.toml");
        if manifest.exists() {
            manifests.push(manifest);
        }
    }
    assert!(
        manifests.len() > 5,
        "the crates were found: {}",
        manifests.len()
    );
    for manifest in manifests {
        let text = std::fs::read_to_string(&manifest).expect("read a manifest");
        assert!(
            text.contains("[lints]\nworkspace = true"),
            "{} does not use the workspace's lints",
            manifest.display()
        );
    }
}

#[test]
fn every_source_file_says_what_it_is_for() {
    let mut files = Vec::new();
    rust_files(&root().join("crates"), &mut files);
    assert!(files.len() > 50, "the sources were found: {}", files.len());
    let undocumented: Vec<String> = files
        .iter()
        .filter(|file| {
            let text = std::fs::read_to_string(file).expect("read a source file");
            !text.trim_start().starts_with("//!")
        })
        .map(|file| file.display().to_string())
        .collect();
    assert!(
        undocumented.is_empty(),
        "files without a `//!` module doc: {undocumented:?}"
    );
}

#[test]
fn migrations_are_numbered_without_gaps_or_repeats() {
    for backend in ["sqlite", "postgres"] {
        let dir = root().join("crates/herald-store/migrations").join(backend);
        let mut numbers: Vec<u32> = std::fs::read_dir(&dir)
            .expect("read the migrations")
            .map(|entry| {
                let name = entry
                    .expect("an entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned();
                name.split('_')
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("migration {name} does not start with its number"))
            })
            .collect();
        numbers.sort_unstable();
        let expected: Vec<u32> = (1..=numbers.len() as u32).collect();
        assert_eq!(
            numbers, expected,
            "{backend} migrations run in number order; a gap or repeat is a mistake"
        );
    }
}

/// "Wire formats live at the edge": herald-core's types carry no serde derives and the crate
/// does not depend on serde (serde_json's `Value` is data it inspects, not a wire type), so a
/// JSON column, an API body and a config file cannot silently share one shape.
#[test]
fn the_domain_crate_derives_no_wire_formats() {
    const WHERE: &str = "wire types belong at the edge: herald-api (src/v1/wire.rs and the \
        resource modules), the store's private row types (herald-store/src/sqlite/rows.rs) or \
        the config (crates/herald/src/config.rs), each converting to and from the domain type";
    let deps = dependencies(&root().join("crates/herald-core/Cargo.toml"));
    assert!(!deps.is_empty(), "the manifest was read");
    assert!(
        !deps.iter().any(|d| d == "serde"),
        "herald-core depends on serde; {WHERE}"
    );
    let mut files = Vec::new();
    rust_files(&root().join("crates/herald-core/src"), &mut files);
    assert!(!files.is_empty(), "herald-core's sources were found");
    let mut offenders = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("read a source file");
        let name = file
            .strip_prefix(root())
            .unwrap_or(file)
            .display()
            .to_string();
        for (n, line) in text.lines().enumerate() {
            if [
                "serde::Serialize",
                "serde::Deserialize",
                "use serde::",
                "#[serde(",
            ]
            .iter()
            .any(|p| line.contains(p))
            {
                offenders.push(format!("{name}:{}: {}", n + 1, line.trim()));
            }
        }
        // Derives, which may span lines: `#[derive(` up to its `)]`.
        let mut rest = text.as_str();
        while let Some(start) = rest.find("#[derive(") {
            let after = &rest[start..];
            let end = after.find(")]").map_or(after.len(), |e| e + 2);
            let derive = &after[..end];
            if derive.contains("Serialize") || derive.contains("Deserialize") {
                let line = text.len() - rest.len() + start;
                let n = text[..line].lines().count() + 1;
                offenders.push(format!("{name}:{n}: {}", derive.replace('\n', " ")));
            }
            rest = &after[end..];
        }
    }
    assert!(
        offenders.is_empty(),
        "herald-core's domain types must not derive or use serde; {WHERE}:\n{}",
        offenders.join("\n")
    );
}

#[test]
fn no_face_depends_on_another_face() {
    // The faces share the channel layer (`herald-channels`), never each other.
    const FACES: [&str; 3] = ["herald-api", "herald-ws", "herald-socketio"];
    for face in FACES {
        let deps = dependencies(&root().join(format!("crates/{face}/Cargo.toml")));
        assert!(!deps.is_empty(), "{face}'s manifest was read");
        assert!(
            deps.iter().any(|d| d == "herald-channels"),
            "{face} stands on the channel layer"
        );
        for other in FACES.iter().filter(|other| **other != face) {
            assert!(
                !deps.iter().any(|d| d == other),
                "{face} must not depend on the face {other}"
            );
        }
    }
    // The newest face reaches apps through its `Apps` seam and publishes through the
    // publisher: it has no store to bypass them with.
    let socketio = dependencies(&root().join("crates/herald-socketio/Cargo.toml"));
    assert!(
        !socketio.iter().any(|d| d == "herald-store"),
        "herald-socketio must not depend on the store"
    );
}

/// One publish path: only the channel layer's publisher calls the store's publishing writes
/// (messages, publications, history appends, inbound webhook records, channel webhook
/// messages), and only the broker hands publications to the hub. A producer that called
/// them itself would skip the one commit, the wake-up or the fan-out, and a cluster's
/// broker would never see its events. Tests (test files, and a file's `#[cfg(test)]` tail)
/// may drive the parts directly.
#[test]
fn no_producer_bypasses_the_publisher() {
    const PUBLISHING_WRITES: [&str; 6] = [
        ".store_publication(",
        ".queue_publication(",
        ".record_ingest(",
        ".create_message(",
        ".append_history(",
        ".record_channel_events(",
    ];
    const HUB_BROADCAST: &str = ".broadcast(";
    let publisher = root().join("crates/herald-channels/src/publisher.rs");
    // Fills a data directory no server runs on (bench/run's start-up scenario): there is no
    // subscriber to fan out to, no broker, no dispatcher to wake.
    let seeder = root().join("crates/herald-bench/src/bin/seed-store.rs");
    // The brokers: the in-process one, and the cluster's.
    let brokers = [
        root().join("crates/herald-channels/src/broker.rs"),
        root().join("crates/herald-cluster/src/postgres.rs"),
    ];
    let mut files = Vec::new();
    for entry in std::fs::read_dir(root().join("crates")).expect("read crates") {
        let krate = entry.expect("a crate").path();
        // The store defines the writes; its own code and conformance suite call them.
        if krate.ends_with("herald-store") {
            continue;
        }
        for dir in ["src", "benches"] {
            if krate.join(dir).is_dir() {
                rust_files(&krate.join(dir), &mut files);
            }
        }
    }
    assert!(files.contains(&publisher), "the publisher was read");
    assert!(
        files.contains(&seeder),
        "the seeder's exemption names a file that exists"
    );
    let mut bypasses = Vec::new();
    for file in &files {
        if file.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        let text = std::fs::read_to_string(file).expect("read a source file");
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        let name = file
            .strip_prefix(root())
            .unwrap_or(file)
            .display()
            .to_string();
        if *file != publisher && *file != seeder {
            for call in PUBLISHING_WRITES {
                if code.contains(call) {
                    bypasses.push(format!("{name} calls {call}..) itself"));
                }
            }
        }
        if !brokers.contains(file) && code.contains(HUB_BROADCAST) {
            bypasses.push(format!("{name} broadcasts to the hub itself"));
        }
    }
    assert!(
        bypasses.is_empty(),
        "producers must publish through herald_channels::Publisher: {bypasses:#?}"
    );
}
