//! A connection this process cannot open for want of its own file descriptors is this
//! server's failure, not the endpoint's: `SendError::NotSent`, which the dispatcher does not
//! charge to the endpoint. A test binary of its own, since it uses up the process's file
//! descriptors, which no other test may be sharing meanwhile.
#![cfg(target_os = "linux")]

use bytes::Bytes;
use herald_core::AddressPolicy;
use herald_delivery::{DeliveryConfig, WebhookClient, client::SendError};
use reqwest::header::HeaderMap;

/// EMFILE and ENFILE: the process, or the whole system, is at its limit of open files.
const OUT_OF_FILES: [i32; 2] = [24, 23];

/// Above this soft limit of open files the test does not run: using them all up would take
/// long and could reach the system's limit, which other processes share.
const MOST_FILES: u64 = 100_000;

/// This process's soft limit of open files, from `/proc/self/limits`.
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let figures = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))?;
    figures.split_whitespace().next()?.parse().ok()
}

#[tokio::test]
async fn a_connection_this_process_has_no_descriptor_for_is_not_the_endpoints_failure() {
    // An endpoint that would answer: only this process's limit stands in the way.
    let endpoint = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}/hook", endpoint.local_addr().expect("addr"));
    let config = DeliveryConfig {
        addresses: AddressPolicy {
            allow_private: true,
            ..Default::default()
        },
        ..DeliveryConfig::default()
    };
    let client = WebhookClient::new(&config).expect("client");

    match open_files_limit() {
        Some(limit) if limit <= MOST_FILES => {}
        limit => {
            eprintln!(
                "skipped: this process may open {limit:?} files (unlimited if None), more than {MOST_FILES}"
            );
            return;
        }
    }
    let mut held = Vec::new();
    loop {
        match std::fs::File::open("/dev/null") {
            Ok(file) => held.push(file),
            Err(e)
                if e.raw_os_error()
                    .is_some_and(|code| OUT_OF_FILES.contains(&code)) =>
            {
                break;
            }
            Err(e) => panic!("opening /dev/null failed otherwise than on a limit: {e}"),
        }
    }
    let by_address = client.post(&url, HeaderMap::new(), Bytes::new()).await;
    // A name needs its look-up first, which needs descriptors too.
    let by_name = client
        .post(
            &url.replace("127.0.0.1", "localhost"),
            HeaderMap::new(),
            Bytes::new(),
        )
        .await;
    drop(held);

    for (result, what) in [(by_address, "by address"), (by_name, "by name")] {
        let err = result.expect_err("no descriptor for the connection");
        assert!(matches!(err, SendError::NotSent(_)), "{what}: {err:?}");
        assert!(
            err.to_string().contains("file descriptors"),
            "{what}: {err}"
        );
    }
}
