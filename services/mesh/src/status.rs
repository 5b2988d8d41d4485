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

/// The ErrorInfo reason of RESOURCE_EXHAUSTED for a request message (or one frame of a stream)
/// over the server's message size limit, at any size and on every service; the metadata has
/// `limit` and `observed` in bytes. Sending the same message again cannot succeed: send less
/// per message (smaller requests, more batch frames).
pub const MESSAGE_TOO_LARGE: &str = "MESSAGE_TOO_LARGE";

/// The ErrorInfo reason of OUT_OF_RANGE for a change-log seq older than the retention.
pub const CHANGES_TRIMMED: &str = "CHANGES_TRIMMED";

/// The ErrorInfo reason of FAILED_PRECONDITION for a schema change (UpdateObject) that is not
/// compatible with the object's current version; a PreconditionFailure lists every problem and
/// nothing is changed. The metadata has `object` and `version` (the current one).
pub const SCHEMA_CHANGE_INCOMPATIBLE: &str = "SCHEMA_CHANGE_INCOMPATIBLE";

/// The PreconditionFailure violation type of an incompatible schema change.
pub const SCHEMA_CHANGE: &str = "SCHEMA_CHANGE";

// The ErrorInfo reasons of NOT_FOUND, one per kind of thing. Something of another org is
// answered exactly as if it did not exist.

/// NOT_FOUND: no org has this id.
pub const ORG_NOT_FOUND: &str = "ORG_NOT_FOUND";
/// NOT_FOUND: no API key has this id.
pub const API_KEY_NOT_FOUND: &str = "API_KEY_NOT_FOUND";
/// NOT_FOUND: the org defines no object of this name.
pub const OBJECT_NOT_FOUND: &str = "OBJECT_NOT_FOUND";
/// NOT_FOUND: the object has no record with this id.
pub const RECORD_NOT_FOUND: &str = "RECORD_NOT_FOUND";
/// NOT_FOUND: no batch has this id.
pub const BATCH_NOT_FOUND: &str = "BATCH_NOT_FOUND";
/// NOT_FOUND: the batch has no chunk with this index.
pub const CHUNK_NOT_FOUND: &str = "CHUNK_NOT_FOUND";
/// NOT_FOUND: no export has this token (an expired one is [`EXPIRED`]).
pub const EXPORT_NOT_FOUND: &str = "EXPORT_NOT_FOUND";
/// NOT_FOUND: the export has no part with this number.
pub const PART_NOT_FOUND: &str = "PART_NOT_FOUND";
/// NOT_FOUND: no link has this id.
pub const LINK_NOT_FOUND: &str = "LINK_NOT_FOUND";
/// NOT_FOUND: the session manager has no session with this id.
pub const SESSION_NOT_FOUND: &str = "SESSION_NOT_FOUND";
/// NOT_FOUND: the session was closed; the message says why.
pub const SESSION_CLOSED: &str = "SESSION_CLOSED";

// The ErrorInfo reasons of FAILED_PRECONDITION.

/// FAILED_PRECONDITION: the export part was never produced, because the export was cancelled or
/// failed.
pub const PART_NOT_PRODUCED: &str = "PART_NOT_PRODUCED";
/// FAILED_PRECONDITION: the session manager's term is older than one the caller has seen; try
/// the other manager.
pub const OLDER_TERM: &str = "OLDER_TERM";
/// FAILED_PRECONDITION: a session request does not follow the last one journaled (requests are
/// numbered without gaps).
pub const REQUEST_GAP: &str = "REQUEST_GAP";
/// FAILED_PRECONDITION: a server session registered without a pool or a server id, or having
/// seen a newer term than the manager's.
pub const BAD_REGISTER: &str = "BAD_REGISTER";
/// FAILED_PRECONDITION: a standby refuses replicated entries (manager to manager).
pub const TERM_REFUSED: &str = "TERM_REFUSED";
/// FAILED_PRECONDITION: a session still has requests or responses queued, and the close did not
/// ask to drop them; the session stays open.
pub const STILL_QUEUED: &str = "STILL_QUEUED";

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

/// RESOURCE_EXHAUSTED [`MESSAGE_TOO_LARGE`]: a request message of `observed` bytes over the
/// `limit` (`limit_name` `max_message_bytes`).
pub fn message_too_large(limit: u64, observed: u64) -> Status {
    let metadata = HashMap::from([
        ("limit_name".to_owned(), "max_message_bytes".to_owned()),
        ("limit".to_owned(), limit.to_string()),
        ("observed".to_owned(), observed.to_string()),
    ]);
    let details = ErrorDetails::with_error_info(MESSAGE_TOO_LARGE, DOMAIN, metadata);
    let message = format!("the message is {observed} bytes, over the {limit}-byte limit: send less per message");
    Status::with_error_details(Code::ResourceExhausted, message, details)
}

/// The prefix of the status tonic's decoder answers a message over `max_decoding_message_size`
/// with (OUT_OF_RANGE, `... found N bytes, the limit is: L bytes`).
const TONIC_TOO_LARGE: &str = "Error, decoded message length too large: found ";

/// The [`message_too_large`] answer for the status the transport gives a request message over
/// its decoding limit, or `None` for any other status. The mesh layer rewrites every response
/// through this, so the answer is the same on every service, unary or streaming.
pub fn from_transport(code: Code, message: &str) -> Option<Status> {
    if code != Code::OutOfRange {
        return None;
    }
    let rest = message.strip_prefix(TONIC_TOO_LARGE)?;
    let (observed, rest) = rest.split_once(" bytes, the limit is: ")?;
    let limit = rest.strip_suffix(" bytes")?;
    Some(message_too_large(limit.parse().ok()?, observed.parse().ok()?))
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

/// FAILED_PRECONDITION `SCHEMA_CHANGE_INCOMPATIBLE` for a schema change of `object` (now at
/// `version`) refused for `problems` (field path, description), each a PreconditionFailure
/// violation of type `SCHEMA_CHANGE` whose subject is the path. The message names the first.
pub fn schema_change_incompatible(object: &str, version: i64, problems: &[Violation]) -> Status {
    let metadata =
        HashMap::from([("object".to_owned(), object.to_owned()), ("version".to_owned(), version.to_string())]);
    let mut details = ErrorDetails::with_error_info(SCHEMA_CHANGE_INCOMPATIBLE, DOMAIN, metadata);
    for p in problems {
        details.add_precondition_failure_violation(SCHEMA_CHANGE, p.field.clone(), p.description.clone());
    }
    let message = match problems {
        [] => "incompatible schema change".to_owned(),
        [only] => format!("incompatible schema change: {}: {}", only.field, only.description),
        [first, rest @ ..] => {
            format!("incompatible schema change: {}: {} (and {} more)", first.field, first.description, rest.len())
        }
    };
    Status::with_error_details(Code::FailedPrecondition, message, details)
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
    fn the_transports_size_error_becomes_message_too_large() {
        // the text of tonic's decoder, as tonic 0.14 writes it
        let transport = "Error, decoded message length too large: found 5242880 bytes, the limit is: 4194304 bytes";
        let status = from_transport(Code::OutOfRange, transport).unwrap();
        assert_eq!(status.code(), Code::ResourceExhausted);
        let info = status.get_details_error_info().unwrap();
        assert_eq!((info.reason.as_str(), info.domain.as_str()), (MESSAGE_TOO_LARGE, DOMAIN));
        assert_eq!(info.metadata["limit"], "4194304");
        assert_eq!(info.metadata["observed"], "5242880");
        assert_eq!(info.metadata["limit_name"], "max_message_bytes");
        assert_eq!(status.message(), message_too_large(4194304, 5242880).message());
        assert!(from_transport(Code::OutOfRange, "part 3 does not exist").is_none());
        assert!(from_transport(Code::Internal, transport).is_none());
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
