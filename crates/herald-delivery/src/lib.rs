//! Outbound webhooks: the worker that turns queued deliveries into signed HTTP requests.
//!
//! [`Dispatcher`] claims due deliveries from the store in two lanes (first attempts, and
//! retries plus manual resends), each with its own global, per-app and per-endpoint
//! concurrency budget, so a failing or slow endpoint can neither delay first attempts nor stall
//! other endpoints, and an app with slow endpoints cannot take other apps' slots.
//! [`client::WebhookClient`] makes the requests and refuses non-public addresses after DNS
//! resolution. Every attempt's outcome goes back to the store as one record.

pub mod client;
pub mod pace;
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
    /// Attempts in flight for one app, per lane (capped at the lane's budget). `None`: a
    /// quarter of each lane, at least `per_endpoint_in_flight`. A hard cap, not a share that
    /// grows when the lane is idle: attempts cannot be pre-empted, so whatever one app may hold
    /// while alone it keeps, hanging, when another app's work arrives. See
    /// [`DeliveryConfig::per_app_limit`].
    pub per_app_in_flight: Option<u32>,
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
            // Four apps' shares of `per_endpoint_in_flight` each, as in the first-attempt lane.
            max_retries_in_flight: 128,
            // One receiver on this project's 2-core machine takes about 7,000-11,000 deliveries
            // a second at 16 in flight, less than one endpoint's intake can be; at 32 delivery
            // keeps up (PERFORMANCE.md, "The group commit's statements on the writer's own
            // handle"). Still far below what a web server takes at once.
            per_endpoint_in_flight: 32,
            per_app_in_flight: None,
            max_response_bytes: 4096,
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

impl DeliveryConfig {
    /// How many attempts one app may have in flight in a lane of `lane_budget` slots.
    ///
    /// What an app may hold alone is exactly what it can hold when its endpoints hang, so this
    /// one number is both a lone app's concurrency and the reason others still get slots: the
    /// lane stays open to other apps however many of its apps have hanging endpoints, up to
    /// `lane_budget / limit - 1` of them. The default, a quarter of the lane, leaves three
    /// quarters to others and still lets one app run two endpoints at their full
    /// `per_endpoint_in_flight`.
    pub fn per_app_limit(&self, lane_budget: u32) -> u32 {
        self.per_app_in_flight
            .unwrap_or_else(|| (lane_budget / 4).max(self.per_endpoint_in_flight))
            .clamp(1, lane_budget.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_app_gets_a_quarter_of_each_lane_by_default_and_never_more_than_the_lane() {
        let config = DeliveryConfig::default();
        assert_eq!(config.per_app_limit(config.max_in_flight), 64);
        assert_eq!(config.per_app_limit(config.max_retries_in_flight), 32);
        assert_eq!(
            config.per_app_limit(8),
            8,
            "at least per endpoint, within the lane"
        );
        let set = DeliveryConfig {
            per_app_in_flight: Some(100),
            ..DeliveryConfig::default()
        };
        assert_eq!(set.per_app_limit(256), 100);
        assert_eq!(set.per_app_limit(64), 64);
        let zero = DeliveryConfig {
            per_app_in_flight: Some(0),
            ..DeliveryConfig::default()
        };
        assert_eq!(
            zero.per_app_limit(256),
            1,
            "never a lane that starts nothing"
        );
    }
}
