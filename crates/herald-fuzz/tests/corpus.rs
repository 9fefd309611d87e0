//! Replays every kept fuzz input through its target in the ordinary test run: the seeds and
//! the minimized corpus under `fuzz/corpus/TARGET/`, and under `fuzz/regressions/TARGET/`
//! every input that once crashed a target (each crash the fuzzer finds is kept there).

use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

/// The files of one folder (none when it does not exist), sorted for a stable order.
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|entry| entry.expect("a readable folder entry").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn every_kept_fuzz_input_passes_its_target() {
    for (name, target) in herald_fuzz::TARGETS {
        let corpus = inputs(&fuzz_dir().join("corpus").join(name));
        assert!(
            !corpus.is_empty(),
            "fuzz/corpus/{name} has no seeds: every target keeps at least one"
        );
        let regressions = inputs(&fuzz_dir().join("regressions").join(name));
        for file in corpus.iter().chain(&regressions) {
            let data = std::fs::read(file).expect("a readable input");
            let outcome = std::panic::catch_unwind(|| target(&data));
            assert!(outcome.is_ok(), "{name} failed on {}", file.display());
        }
        println!(
            "{name}: {} corpus and {} regression inputs pass",
            corpus.len(),
            regressions.len()
        );
    }
}

#[test]
fn every_target_has_a_cargo_fuzz_binary() {
    // The list above and fuzz/Cargo.toml name the same targets, so neither side rots.
    let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).expect("fuzz/Cargo.toml");
    for (name, _) in herald_fuzz::TARGETS {
        assert!(
            manifest.contains(&format!("name = \"{name}\"")),
            "fuzz/Cargo.toml has no [[bin]] {name}"
        );
        let source = fuzz_dir().join("fuzz_targets").join(format!("{name}.rs"));
        let text = std::fs::read_to_string(&source).expect("the target's source");
        assert!(
            text.contains(&format!("herald_fuzz::{name}(")),
            "{} does not run herald_fuzz::{name}",
            source.display()
        );
    }
}
