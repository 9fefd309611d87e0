//! A connection this process cannot open for want of its own file descriptors is this
//! server's failure, not the endpoint's: `SendError::NotSent`, which the dispatcher does not
//! charge to the endpoint. A test binary of its own, since it uses up the process's file
//! descriptors, which no other test may be sharing meanwhile.
#![cfg(target_os = "linux")]

use bytes::Bytes;
use herald_core::AddressPolicy;
use herald_delivery::{DeliveryConfig, WebhookClient, client::SendError};
use reqwest::header::HeaderMap;

/// EMFILE: the process is at its limit of open files.
const EMFILE: i32 = 24;

/// Beyond this many open files the limit is taken as unbounded, and the test cannot run.
const MOST_FILES: usize = 1 << 21;

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

    let mut held = Vec::new();
    let exhausted = loop {
        match std::fs::File::open("/dev/null") {
            Ok(file) if held.len() < MOST_FILES => held.push(file),
            Ok(_) => break false,
            Err(e) if e.raw_os_error() == Some(EMFILE) => break true,
            Err(e) => panic!("opening /dev/null failed otherwise than on the limit: {e}"),
        }
    };
    if !exhausted {
        drop(held);
        eprintln!("skipped: this process may open more than {MOST_FILES} files");
        return;
    }
    let result = client.post(&url, HeaderMap::new(), Bytes::new()).await;
    drop(held);

    let err = result.expect_err("no descriptor for the connection");
    assert!(matches!(err, SendError::NotSent(_)), "{err:?}");
    assert!(err.to_string().contains("file descriptors"), "{err}");
}
