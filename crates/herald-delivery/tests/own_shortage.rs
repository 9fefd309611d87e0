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

/// The soft limit of open files the test lowers this process to, whatever it was: using up
/// a limit of a million (common in containers) would take long and could reach the system's
/// limit, which other processes share. This binary runs this test alone.
const FEW_FILES: u64 = 1024;

/// Lowers this process's soft limit of open files to [`FEW_FILES`] (a process may always lower
/// it; the hard limit stays).
fn lower_open_files_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let lowered = rustix::process::Rlimit {
        current: Some(limit.current.map_or(FEW_FILES, |soft| soft.min(FEW_FILES))),
        maximum: limit.maximum,
    };
    setrlimit(Resource::Nofile, lowered).expect("a process may lower its own soft limit");
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

    lower_open_files_limit();
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
