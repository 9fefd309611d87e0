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
    let mut numbers: Vec<u32> =
        std::fs::read_dir(root().join("crates/herald-store/migrations/sqlite"))
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
        "migrations run in number order; a gap or repeat is a mistake"
    );
}
