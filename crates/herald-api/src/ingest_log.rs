//! The last requests each ingest source received and what came of them, so an operator can
//! see why a provider's deliveries are refused (a wrong secret, an expired timestamp) without
//! reading logs: `GET /api/v1/app/{app_id}/ingest/source/{source_id}/request` and the console.
//!
//! Kept in memory on the node that answered, bounded twice: [`PER_SOURCE`] requests per
//! source and [`MAX_SOURCES`] sources. Only requests to a source that exists are kept, so
//! requests to made-up ids cannot fill it. Accepted events are stored durably as well (the
//! source's event list); this log is for looking, not for keeping.

use std::{
    collections::{HashMap, VecDeque},
    sync::Mutex,
};

use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use herald_metrics::IngestOutcome;

/// Requests kept per source, newest first.
pub const PER_SOURCE: usize = 100;
/// Sources with a log; past it the least recently used source's log is dropped.
pub const MAX_SOURCES: usize = 10_000;

/// One request and what came of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestRequest {
    pub received_at: DateTime<Utc>,
    pub outcome: IngestOutcome,
    pub status: StatusCode,
    /// What was wrong, in the words the sender was told; for an accepted event, what it
    /// became.
    pub detail: String,
}

#[derive(Default)]
pub struct IngestLog {
    sources: Mutex<Sources>,
}

#[derive(Default)]
struct Sources {
    logs: HashMap<String, VecDeque<IngestRequest>>,
    /// Bumped on each record; a source's log remembers when it was last written.
    clock: u64,
    written: HashMap<String, u64>,
}

impl IngestLog {
    pub fn record(&self, source_id: &str, request: IngestRequest) {
        let mut sources = self
            .sources
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !sources.logs.contains_key(source_id) && sources.logs.len() >= MAX_SOURCES {
            sources.evict_least_recent();
        }
        sources.clock += 1;
        let now = sources.clock;
        sources.written.insert(source_id.to_owned(), now);
        let log = sources.logs.entry(source_id.to_owned()).or_default();
        if log.len() == PER_SOURCE {
            log.pop_back();
        }
        log.push_front(request);
    }

    /// The source's requests, newest first.
    pub fn recent(&self, source_id: &str) -> Vec<IngestRequest> {
        let sources = self
            .sources
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        sources
            .logs
            .get(source_id)
            .map(|log| log.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Forgets a deleted source's requests.
    pub fn forget(&self, source_id: &str) {
        let mut sources = self
            .sources
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        sources.logs.remove(source_id);
        sources.written.remove(source_id);
    }
}

impl Sources {
    /// A linear scan, run only when [`MAX_SOURCES`] sources have logs: rare, and cheaper than
    /// keeping an ordered index on every record.
    fn evict_least_recent(&mut self) {
        if let Some(oldest) = self
            .written
            .iter()
            .min_by_key(|(_, at)| **at)
            .map(|(id, _)| id.clone())
        {
            self.logs.remove(&oldest);
            self.written.remove(&oldest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(n: u16) -> IngestRequest {
        IngestRequest {
            received_at: Utc::now(),
            outcome: IngestOutcome::InvalidSignature,
            status: StatusCode::UNAUTHORIZED,
            detail: format!("request {n}"),
        }
    }

    #[test]
    fn keeps_the_newest_requests_of_each_source_first_and_bounded() {
        let log = IngestLog::default();
        for n in 0..(PER_SOURCE as u16 + 5) {
            log.record("src_a", request(n));
        }
        log.record("src_b", request(7));
        let a = log.recent("src_a");
        assert_eq!(a.len(), PER_SOURCE);
        assert_eq!(a[0].detail, format!("request {}", PER_SOURCE + 4));
        assert_eq!(a[PER_SOURCE - 1].detail, "request 5");
        assert_eq!(log.recent("src_b").len(), 1);
        log.forget("src_a");
        assert!(log.recent("src_a").is_empty());
    }

    #[test]
    fn past_the_source_limit_the_least_recently_written_log_goes() {
        let log = IngestLog::default();
        for n in 0..MAX_SOURCES {
            log.record(&format!("src_{n}"), request(0));
        }
        // src_0 is written again, so src_1 is now the least recent.
        log.record("src_0", request(1));
        log.record("src_new", request(2));
        assert_eq!(log.recent("src_0").len(), 2);
        assert!(log.recent("src_1").is_empty());
        assert_eq!(log.recent("src_new").len(), 1);
    }
}
