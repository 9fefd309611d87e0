//! Herald's domain: the vocabulary every other crate speaks.
//!
//! Nothing in this crate performs I/O. Clocks are passed in as values, randomness comes from
//! a caller-supplied or thread-local RNG, and network addresses are judged, never dialled. That
//! keeps every rule here (signatures, retry schedule, filters, address policy) testable as plain
//! functions, and lets the store, the API and the delivery worker share one definition of each.

pub mod address_policy;
pub mod filter;
pub mod history;
pub mod id;
pub mod ingest;
pub mod model;
pub mod pusher;
pub mod retry;
pub mod signing;
pub mod socketio;
pub mod token;
pub mod validate;

pub use address_policy::{AddressPolicy, BlockedAddress};
pub use filter::EndpointFilter;
pub use id::{
    AppId, AttemptId, EndpointId, IdError, IngestEventId, MessageId, SourceId, TaskId, TokenId,
};
pub use retry::{AttemptOutcome, RetryDecision, RetryPolicy};
pub use signing::{EndpointSecret, SecretError};
