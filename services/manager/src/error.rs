//! The manager's errors, and the one place they become gRPC statuses: every status the manager's
//! service answers with of its own is an [`Error`] turned into a [`Status`] here, with its code
//! (and, for a standby, the leader's address in the [`LEADER_METADATA`] metadata).

use tonic::{Code, Status};

use crate::journal;
use crate::service::LEADER_METADATA;

/// Errors of the manager.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The journal failed (INTERNAL).
    #[error(transparent)]
    Journal(#[from] journal::Error),

    /// This manager is a standby (UNAVAILABLE; the leader goes in the [`LEADER_METADATA`]
    /// metadata when it is a valid metadata value).
    #[error("{}", standby_message(.leader))]
    NotPrimary {
        /// The primary's address (empty: this manager knows none yet).
        leader: String,
    },

    /// The manager's actor has stopped, or is stopping (UNAVAILABLE).
    #[error("the manager is stopping")]
    Stopping,

    /// A client opens a session having seen a newer term than this manager's (FAILED_PRECONDITION).
    #[error("this manager's term {ours} is older than the term {seen} the client has seen")]
    OlderTerm {
        /// This manager's term.
        ours: u64,
        /// The term the client has seen.
        seen: u64,
    },

    /// A client request does not follow the last one journaled (FAILED_PRECONDITION).
    #[error("request {seq} after {last}: requests are numbered without gaps")]
    Gap {
        /// The request's number.
        seq: u64,
        /// The number of the last request journaled.
        last: u64,
    },

    /// A server registers without a pool or a server id, or having seen a newer term than this
    /// manager's (FAILED_PRECONDITION).
    #[error("register needs a pool and a server id, and a term not newer than this manager's")]
    BadRegister,

    /// A standby refuses replicated entries: it is the primary, or their term is older than one
    /// it has seen (FAILED_PRECONDITION).
    #[error("refusing entries of term {term} (seen term {seen}, primary {primary})")]
    RefusedTerm {
        /// The term of the entries.
        term: u64,
        /// The highest term the standby has seen.
        seen: u64,
        /// Whether this manager is the primary.
        primary: bool,
    },

    /// No session has this id (NOT_FOUND).
    #[error("session {0} not found")]
    SessionNotFound(String),

    /// The session was closed (NOT_FOUND), and why.
    #[error("session {id} was closed: {reason}")]
    SessionClosed {
        /// The session.
        id: String,
        /// Why it was closed.
        reason: String,
    },

    /// A close without `drop_queued` of a session with requests or responses still queued
    /// (FAILED_PRECONDITION); the session stays open.
    #[error(
        "session {id} still has {requests} request(s) unanswered and {responses} response(s) unacknowledged: \
         read them, or close with drop_queued to drop them"
    )]
    StillQueued {
        /// The session.
        id: String,
        /// Requests not answered.
        requests: usize,
        /// Responses not acknowledged.
        responses: usize,
    },

    /// A session id a client names is not 1 to 128 printable ASCII characters (INVALID_ARGUMENT).
    #[error("session id {0:?}: a session id a client names is 1 to 128 printable ASCII characters")]
    BadSessionId(String),

    /// A stream's frames are not what the protocol asks for (INVALID_ARGUMENT).
    #[error("{0}")]
    InvalidArgument(&'static str),

    /// The session or server was opened again on another stream, which replaces this one
    /// (ABORTED).
    #[error("{0}")]
    Replaced(&'static str),

    /// Replicated entries cannot be decoded (DATA_LOSS).
    #[error("replicated entries: {0}")]
    Undecodable(String),
}

/// What a standby answers: where the primary is, if it knows.
fn standby_message(leader: &str) -> String {
    if leader.is_empty() {
        "this manager is a standby and knows no primary yet".to_owned()
    } else {
        format!("this manager is a standby; the primary is {leader}")
    }
}

impl Error {
    /// The gRPC code the error is answered with.
    pub fn code(&self) -> Code {
        match self {
            Error::Journal(_) => Code::Internal,
            Error::NotPrimary { .. } | Error::Stopping => Code::Unavailable,
            Error::OlderTerm { .. }
            | Error::Gap { .. }
            | Error::BadRegister
            | Error::RefusedTerm { .. }
            | Error::StillQueued { .. } => Code::FailedPrecondition,
            Error::SessionNotFound(_) | Error::SessionClosed { .. } => Code::NotFound,
            Error::InvalidArgument(_) | Error::BadSessionId(_) => Code::InvalidArgument,
            Error::Replaced(_) => Code::Aborted,
            Error::Undecodable(_) => Code::DataLoss,
        }
    }

    /// The ErrorInfo reason the error is answered with: every NOT_FOUND and FAILED_PRECONDITION
    /// has one.
    pub fn reason(&self) -> Option<&'static str> {
        use baton_mesh::status as s;
        match self {
            Error::OlderTerm { .. } => Some(s::OLDER_TERM),
            Error::Gap { .. } => Some(s::REQUEST_GAP),
            Error::BadRegister => Some(s::BAD_REGISTER),
            Error::RefusedTerm { .. } => Some(s::TERM_REFUSED),
            Error::StillQueued { .. } => Some(s::STILL_QUEUED),
            Error::SessionNotFound(_) => Some(s::SESSION_NOT_FOUND),
            Error::SessionClosed { .. } => Some(s::SESSION_CLOSED),
            Error::Journal(_)
            | Error::NotPrimary { .. }
            | Error::Stopping
            | Error::InvalidArgument(_)
            | Error::BadSessionId(_)
            | Error::Replaced(_)
            | Error::Undecodable(_) => None,
        }
    }
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        let mut status = match error.reason() {
            Some(reason) => baton_mesh::status::with_reason(error.code(), reason, error.to_string()),
            None => Status::new(error.code(), error.to_string()),
        };
        if let Error::NotPrimary { leader } = &error
            && let Ok(value) = leader.parse()
        {
            status.metadata_mut().insert(LEADER_METADATA, value);
        }
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_keep_their_codes_and_messages() {
        let status = Status::from(Error::NotPrimary { leader: "http://10.0.0.1:7000".into() });
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(status.message(), "this manager is a standby; the primary is http://10.0.0.1:7000");
        assert_eq!(status.metadata().get(LEADER_METADATA).unwrap(), "http://10.0.0.1:7000");

        let status = Status::from(Error::NotPrimary { leader: String::new() });
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(status.message(), "this manager is a standby and knows no primary yet");

        let status = Status::from(Error::Gap { seq: 7, last: 5 });
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(status.message(), "request 7 after 5: requests are numbered without gaps");

        let status = Status::from(Error::Stopping);
        assert_eq!((status.code(), status.message()), (Code::Unavailable, "the manager is stopping"));

        // every NOT_FOUND and FAILED_PRECONDITION carries an ErrorInfo reason
        let errors = [
            Error::OlderTerm { ours: 1, seen: 2 },
            Error::Gap { seq: 7, last: 5 },
            Error::BadRegister,
            Error::RefusedTerm { term: 1, seen: 2, primary: false },
            Error::StillQueued { id: "s".into(), requests: 1, responses: 0 },
            Error::SessionNotFound("s".into()),
            Error::SessionClosed { id: "s".into(), reason: "expired".into() },
        ];
        for error in errors {
            let (code, reason) = (error.code(), error.reason());
            let status = Status::from(error);
            assert!(matches!(code, Code::NotFound | Code::FailedPrecondition));
            let info = tonic_types::StatusExt::get_details_error_info(&status).unwrap();
            assert_eq!((Some(info.reason.as_str()), info.domain.as_str()), (reason, "baton.dev"));
        }

        let io = journal::Error::Io { path: "/j/journal".into(), source: std::io::Error::other("disk full") };
        let status = Status::from(Error::from(io));
        assert_eq!((status.code(), status.message()), (Code::Internal, "journal /j/journal: disk full"));
    }
}
