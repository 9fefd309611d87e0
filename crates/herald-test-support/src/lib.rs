//! What tests across the workspace share; a dev-dependency only, never in the binary.
//!
//! A test that needs a service (PostgreSQL, Redis, NATS) or a pass of the suite it is not in
//! returns early and says so with [`skipped`]. `eprintln!` would not do: the test harness
//! captures it and prints it only for a test that fails, so a run without the services would
//! skip them in silence and count them as passed.

use std::{fmt, io::Write};

/// Set to a file's path, every skip is also appended there as a line, so a runner (`.ci/run`)
/// can count and list the skipped tests.
pub const SKIP_LOG_VAR: &str = "HERALD_TEST_SKIP_LOG";

/// Says that a test was skipped and why (`SKIPPED test: why` on the process's standard error,
/// which the harness does not capture), and notes it in [`SKIP_LOG_VAR`]'s file when set. The
/// test is named by its thread, which the harness names after it (`module` where it does not),
/// so a runner can count tests, not lines: one test may skip several backends.
pub fn skipped(module: &str, why: fmt::Arguments<'_>) {
    let thread = std::thread::current();
    let test = thread
        .name()
        .filter(|name| *name != "main")
        .unwrap_or(module);
    let line = format!("SKIPPED {test}: {why}\n");
    // Written to the handle, not through `eprint!`, which the harness captures.
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
    if let Some(path) = std::env::var_os(SKIP_LOG_VAR) {
        // Appends of one short line each: whole lines even from tests running in parallel.
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut file| file.write_all(line.as_bytes()));
        if let Err(e) = appended {
            let _ = writeln!(
                std::io::stderr().lock(),
                "could not note the skip in {}: {e}",
                std::path::Path::new(&path).display()
            );
        }
    }
}

/// [`skipped`] with the calling module and `format!`'s arguments:
/// `skip!("{test}: {VAR} is unset")`.
#[macro_export]
macro_rules! skip {
    ($($arg:tt)*) => {
        $crate::skipped(::std::module_path!(), ::std::format_args!($($arg)*))
    };
}
