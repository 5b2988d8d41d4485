//! The intake's errors and their one mapping to `tonic::Status`.

use std::time::Duration;

use baton_mesh::status::{self, LimitExceeded, Violation};
use baton_store::{FieldError, Missing};
use tonic::{Code, Status};

/// How long a client rejected because of load should wait before retrying.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Errors of the intake and admin services.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store failed or refused.
    #[error(transparent)]
    Store(#[from] baton_store::Error),
    /// A real-time limit was exceeded.
    #[error("limit {} exceeded", .0.limit_name)]
    Limit(LimitExceeded),
    /// The request is invalid.
    #[error("invalid request")]
    Invalid(Vec<FieldError>),
}

impl Error {
    /// Turns a store deadline overrun into the real-time limit it is, with `reason`.
    pub fn deadline_as(self, reason: &'static str) -> Self {
        match self {
            Error::Store(baton_store::Error::DeadlineExceeded { limit, elapsed }) => Error::Limit(LimitExceeded {
                reason,
                limit_name: "deadline_ms",
                limit: limit.as_millis() as u64,
                observed: elapsed.as_millis() as u64,
                retry_after: Some(RETRY_AFTER),
            }),
            other => other,
        }
    }
}

/// The ErrorInfo reason of NOT_FOUND for a missing kind of thing (`baton_mesh::status::*_NOT_FOUND`).
pub fn not_found_reason(missing: Missing) -> &'static str {
    match missing {
        Missing::Org => status::ORG_NOT_FOUND,
        Missing::ApiKey => status::API_KEY_NOT_FOUND,
        Missing::Object => status::OBJECT_NOT_FOUND,
        Missing::Record => status::RECORD_NOT_FOUND,
        Missing::Batch => status::BATCH_NOT_FOUND,
        Missing::Chunk => status::CHUNK_NOT_FOUND,
        Missing::Export => status::EXPORT_NOT_FOUND,
        Missing::Part => status::PART_NOT_FOUND,
        Missing::Link => status::LINK_NOT_FOUND,
    }
}

fn violations(errors: &[FieldError]) -> Vec<Violation> {
    errors.iter().map(|e| Violation::new(e.field.clone(), e.description.clone())).collect()
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        use baton_store::Error as S;
        match e {
            Error::Limit(limit) => status::limit_exceeded(&limit),
            Error::Invalid(errors) => status::invalid_argument(&violations(&errors)),
            Error::Store(S::Invalid(errors)) => status::invalid_argument(&violations(&errors)),
            Error::Store(S::NotFound(what)) => {
                status::with_reason(Code::NotFound, not_found_reason(what.missing), format!("{what} not found"))
            }
            Error::Store(S::AlreadyExists(what)) => Status::already_exists(format!("{what} already exists")),
            Error::Store(S::Incompatible { object, version, problems }) => {
                status::schema_change_incompatible(&object, version, &violations(&problems))
            }
            Error::Store(S::DeadlineExceeded { limit, elapsed }) => status::limit_exceeded(&LimitExceeded {
                reason: status::RESUBMIT_AS_BATCH,
                limit_name: "deadline_ms",
                limit: limit.as_millis() as u64,
                observed: elapsed.as_millis() as u64,
                retry_after: Some(RETRY_AFTER),
            }),
            Error::Store(S::Busy(e)) => {
                tracing::warn!(error = %e, "database busy");
                status::retry_later(Code::Unavailable, "the database is busy; retry later", RETRY_AFTER)
            }
            Error::Store(S::Resource(e)) => {
                tracing::warn!(error = %e, "database resource limit");
                status::limit_exceeded(&LimitExceeded {
                    reason: status::RESUBMIT_AS_BATCH,
                    limit_name: "database_resources",
                    limit: 0,
                    observed: 0,
                    retry_after: None,
                })
            }
            Error::Store(e @ S::Trimmed { .. }) => {
                status::with_reason(Code::OutOfRange, status::CHANGES_TRIMMED, e.to_string())
            }
            Error::Store(S::Expired(what)) => status::with_reason(
                Code::NotFound,
                status::EXPIRED,
                format!("{what} has expired: its retention is over and its parts are deleted"),
            ),
            Error::Store(e @ S::Blob(_)) => {
                tracing::error!(error = %e, "blob store failure");
                status::retry_later(Code::Unavailable, "the blob store is unavailable; retry later", RETRY_AFTER)
            }
            Error::Store(e @ S::Unavailable(_)) => {
                // nothing committed: the same request can succeed once the database is back
                tracing::warn!(error = %e, "database unavailable");
                status::retry_later(Code::Unavailable, "the database is unavailable; retry later", RETRY_AFTER)
            }
            Error::Store(e @ (S::Database(_) | S::Migrate(_) | S::Url { .. } | S::Corrupt(_))) => {
                tracing::error!(error = %e, "store failure");
                Status::internal("internal store error")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_types::StatusExt;

    /// A database that cannot be reached (a restart, a failover, a refused connection) is
    /// UNAVAILABLE with a RetryInfo, never INTERNAL, which tells a client not to retry.
    #[test]
    fn a_lost_database_is_unavailable_with_retry_info() {
        for e in [
            sqlx::Error::Io(std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused")),
            sqlx::Error::Io(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset")),
            sqlx::Error::PoolClosed,
        ] {
            let status = Status::from(Error::Store(baton_store::Error::from(e)));
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
            assert!(status.get_details_retry_info().is_some(), "{status:?}");
        }
        let other = Status::from(Error::Store(baton_store::Error::from(sqlx::Error::RowNotFound)));
        assert_eq!(other.code(), Code::Internal);
    }
}
