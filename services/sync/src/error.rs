//! The sync service's errors and their one mapping to `tonic::Status`.

use baton_mesh::status;
use baton_store::FieldError;
use tonic::{Code, Status};

/// The ErrorInfo reason of a seq older than the change-log retention.
pub const TRIMMED: &str = status::CHANGES_TRIMMED;

/// Errors of the sync service.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store failed or refused.
    #[error(transparent)]
    Store(#[from] baton_store::Error),
    /// The request is invalid.
    #[error("invalid request")]
    Invalid(Vec<FieldError>),
    /// The changes asked for were trimmed, or are not there yet.
    #[error("{0}")]
    OutOfRange(String),
    /// The server is shutting down.
    #[error("shutting down")]
    ShuttingDown,
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        match e {
            Error::Invalid(errors) => baton_api::Error::Invalid(errors).into(),
            Error::OutOfRange(message) => status::with_reason(Code::OutOfRange, TRIMMED, message),
            Error::Store(e @ baton_store::Error::Trimmed { .. }) => {
                status::with_reason(Code::OutOfRange, TRIMMED, format!("{e}: extract a new snapshot"))
            }
            Error::ShuttingDown => Status::unavailable("the server is shutting down; resume with after_seq"),
            // sync's calls are not real-time requests: a deadline is the database being slow
            Error::Store(e @ baton_store::Error::DeadlineExceeded { .. }) => {
                tracing::warn!(error = %e, "store busy");
                status::retry_later(
                    Code::Unavailable,
                    "the database is busy; retry later",
                    std::time::Duration::from_secs(1),
                )
            }
            // every other store error as every service answers it
            Error::Store(e) => baton_api::Error::Store(e).into(),
        }
    }
}
