//! Outbound webhooks: the worker that turns queued deliveries into signed HTTP requests.
//!
//! [`Dispatcher`] claims due deliveries from the store in two lanes (first attempts, and
//! retries plus manual resends), each with its own global and per-endpoint concurrency budget,
//! so a failing or slow endpoint can neither delay first attempts nor stall other endpoints.
//! [`client::WebhookClient`] makes the requests and refuses non-public addresses after DNS
//! resolution. Every attempt's outcome goes back to the store as one record.

pub mod client;
mod worker;

use std::time::Duration;

use herald_core::{AddressPolicy, RetryPolicy};

pub use client::WebhookClient;
pub use worker::{Dispatcher, DispatcherHandle};

#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    pub retry: RetryPolicy,
    pub addresses: AddressPolicy,
    /// Whole-request timeout, connection to last body byte.
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    /// First attempts in flight at once, over all endpoints.
    pub max_in_flight: u32,
    /// Retries and manual attempts in flight at once, over all endpoints.
    pub max_retries_in_flight: u32,
    /// Attempts in flight to one endpoint, per lane.
    pub per_endpoint_in_flight: u32,
    /// Longest response body kept in the attempt log.
    pub max_response_bytes: usize,
    /// How long in-flight attempts may finish after shutdown is requested.
    pub shutdown_grace: Duration,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            retry: RetryPolicy::default(),
            addresses: AddressPolicy::default(),
            request_timeout: Duration::from_secs(15),
            connect_timeout: Duration::from_secs(5),
            max_in_flight: 256,
            max_retries_in_flight: 64,
            per_endpoint_in_flight: 16,
            max_response_bytes: 4096,
            shutdown_grace: Duration::from_secs(10),
        }
    }
}
