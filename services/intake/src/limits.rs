//! Admission of real-time requests: requests in flight per org and overall. Over either, the
//! request is rejected at once (with RetryInfo: load caused it) rather than queued, so that a
//! client learns immediately to send the work as a batch.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baton_mesh::status::LimitExceeded;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::IntakeOptions;
use baton_api::error::{Error, RETRY_AFTER};

/// The real-time limits and the semaphores enforcing the concurrency ones. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Limits {
    max_records: usize,
    deadline: Duration,
    per_org: usize,
    overall: Arc<Semaphore>,
    overall_max: usize,
    orgs: Arc<Mutex<HashMap<String, Arc<Semaphore>>>>,
}

/// Permission to run one real-time request; released on drop.
#[derive(Debug)]
pub struct Permit {
    _org: OwnedSemaphorePermit,
    _overall: OwnedSemaphorePermit,
}

impl Limits {
    /// Limits from the options.
    pub fn new(options: &IntakeOptions) -> Self {
        Self {
            max_records: options.max_records as usize,
            deadline: options.deadline,
            per_org: options.max_in_flight_per_org as usize,
            overall: Arc::new(Semaphore::new(options.max_in_flight as usize)),
            overall_max: options.max_in_flight as usize,
            orgs: Arc::default(),
        }
    }

    /// The most records per request.
    pub fn max_records(&self) -> usize {
        self.max_records
    }

    /// The deadline of a request.
    pub fn deadline(&self) -> Duration {
        self.deadline
    }

    /// Admits a request of `org`, or rejects it with `reason` when a concurrency limit is reached.
    pub fn admit(&self, org: &str, reason: &'static str) -> Result<Permit, Error> {
        let semaphore = {
            let mut orgs = self.orgs.lock().unwrap_or_else(|e| e.into_inner());
            orgs.entry(org.to_owned()).or_insert_with(|| Arc::new(Semaphore::new(self.per_org))).clone()
        };
        let reject = |limit_name, limit: usize| {
            Error::Limit(LimitExceeded {
                reason,
                limit_name,
                limit: limit as u64,
                observed: limit as u64 + 1,
                retry_after: Some(RETRY_AFTER),
            })
        };
        let org_permit = semaphore.try_acquire_owned().map_err(|_| reject("max_in_flight_per_org", self.per_org))?;
        let overall =
            self.overall.clone().try_acquire_owned().map_err(|_| reject("max_in_flight", self.overall_max))?;
        Ok(Permit { _org: org_permit, _overall: overall })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(per_org: u32, overall: u32) -> Limits {
        Limits::new(&IntakeOptions {
            max_records: 200,
            deadline: Duration::from_secs(2),
            max_in_flight_per_org: per_org,
            max_in_flight: overall,
            export_retention: Duration::from_secs(60),
        })
    }

    #[test]
    fn per_org_and_overall_limits_reject_with_retry_info() {
        let l = limits(2, 3);
        let a1 = l.admit("a", "R").unwrap();
        let _a2 = l.admit("a", "R").unwrap();
        match l.admit("a", "R") {
            Err(Error::Limit(e)) => {
                assert_eq!((e.limit_name, e.limit, e.observed), ("max_in_flight_per_org", 2, 3));
                assert!(e.retry_after.is_some());
            }
            other => panic!("expected a limit, got {other:?}"),
        }
        let _b1 = l.admit("b", "R").unwrap();
        match l.admit("b", "R") {
            Err(Error::Limit(e)) => assert_eq!(e.limit_name, "max_in_flight"),
            other => panic!("expected a limit, got {other:?}"),
        }
        drop(a1);
        assert!(l.admit("b", "R").is_ok());
    }
}
