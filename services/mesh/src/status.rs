//! Building `tonic::Status` values with google.rpc error details, so that every service says what
//! went wrong the same way. Each service maps its own error type onto these.

use std::collections::HashMap;
use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// The `domain` of every baton `ErrorInfo`.
pub const DOMAIN: &str = "baton.dev";

/// The ErrorInfo reason of a real-time write over a limit: send the same records as a batch.
pub const RESUBMIT_AS_BATCH: &str = "RESUBMIT_AS_BATCH";

/// The ErrorInfo reason of a real-time read over a limit: ask for the same records as an export.
pub const RESUBMIT_AS_EXPORT: &str = "RESUBMIT_AS_EXPORT";

/// The ErrorInfo reason of NOT_FOUND for something that existed but is past its retention (an
/// export's token).
pub const EXPIRED: &str = "EXPIRED";

/// A limit a request went over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitExceeded {
    /// The ErrorInfo reason ([`RESUBMIT_AS_BATCH`] or [`RESUBMIT_AS_EXPORT`]).
    pub reason: &'static str,
    /// The limit's name, such as `max_records` or `deadline_ms`.
    pub limit_name: &'static str,
    /// The limit's value.
    pub limit: u64,
    /// What the request had or needed.
    pub observed: u64,
    /// When load (not the request itself) caused the rejection: how long to wait before retrying.
    pub retry_after: Option<Duration>,
}

/// RESOURCE_EXHAUSTED with `ErrorInfo{reason, metadata: limit_name, limit, observed}` and, when
/// load caused it, `RetryInfo`.
pub fn limit_exceeded(limit: &LimitExceeded) -> Status {
    let metadata = HashMap::from([
        ("limit_name".to_owned(), limit.limit_name.to_owned()),
        ("limit".to_owned(), limit.limit.to_string()),
        ("observed".to_owned(), limit.observed.to_string()),
    ]);
    let mut details = ErrorDetails::with_error_info(limit.reason, DOMAIN, metadata);
    if let Some(retry_after) = limit.retry_after {
        details.set_retry_info(Some(retry_after));
    }
    let what = if limit.reason == RESUBMIT_AS_EXPORT { "an export" } else { "a batch" };
    let message = format!(
        "over the real-time limit {} ({} > {}): resubmit as {what}",
        limit.limit_name, limit.observed, limit.limit
    );
    Status::with_error_details(Code::ResourceExhausted, message, details)
}

/// One field of a request that is wrong, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The path of the field, such as `records[3].amount` or `filter`.
    pub field: String,
    /// What is wrong with it.
    pub description: String,
}

impl Violation {
    /// A violation of `field`.
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self { field: field.into(), description: description.into() }
    }
}

/// INVALID_ARGUMENT with a `BadRequest` listing every violation. The message names the first one.
pub fn invalid_argument(violations: &[Violation]) -> Status {
    let mut details = ErrorDetails::new();
    for v in violations {
        details.add_bad_request_violation(v.field.clone(), v.description.clone());
    }
    let message = match violations {
        [] => "invalid request".to_owned(),
        [only] => format!("{}: {}", only.field, only.description),
        [first, rest @ ..] => {
            format!("{}: {} (and {} more)", first.field, first.description, rest.len())
        }
    };
    Status::with_error_details(Code::InvalidArgument, message, details)
}

/// A status with a code and an `ErrorInfo` reason, for errors a client tells apart by reason
/// (for example NOT_FOUND `expired`).
pub fn with_reason(code: Code, reason: &str, message: impl Into<String>) -> Status {
    let details = ErrorDetails::with_error_info(reason, DOMAIN, HashMap::new());
    Status::with_error_details(code, message, details)
}

/// A status with a `RetryInfo`: the same request can succeed after `retry_after`.
pub fn retry_later(code: Code, message: impl Into<String>, retry_after: Duration) -> Status {
    let mut details = ErrorDetails::new();
    details.set_retry_info(Some(retry_after));
    Status::with_error_details(code, message, details)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_exceeded_carries_error_info_and_retry_info() {
        let status = limit_exceeded(&LimitExceeded {
            reason: RESUBMIT_AS_BATCH,
            limit_name: "max_records",
            limit: 200,
            observed: 201,
            retry_after: Some(Duration::from_secs(1)),
        });
        assert_eq!(status.code(), Code::ResourceExhausted);
        let info = status.get_details_error_info().unwrap();
        assert_eq!(info.reason, RESUBMIT_AS_BATCH);
        assert_eq!(info.metadata["limit"], "200");
        assert_eq!(info.metadata["observed"], "201");
        assert_eq!(info.metadata["limit_name"], "max_records");
        assert_eq!(status.get_details_retry_info().unwrap().retry_delay, Some(Duration::from_secs(1)));
    }

    #[test]
    fn invalid_argument_lists_every_violation() {
        let status = invalid_argument(&[
            Violation::new("records[0].amount", "expected an integer"),
            Violation::new("records[2].name", "required"),
        ]);
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "records[0].amount: expected an integer (and 1 more)");
        let bad = status.get_details_bad_request().unwrap();
        assert_eq!(bad.field_violations.len(), 2);
        assert_eq!(bad.field_violations[1].field, "records[2].name");
    }
}
