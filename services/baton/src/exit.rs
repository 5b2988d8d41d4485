//! The client CLI's exit codes: one table, shown by `baton --help` and kept in the README, and
//! the one mapping from a gRPC status code to an exit code.
//!
//! A command that fails returns an `anyhow::Error`; `main` takes the exit code from the first
//! [`Failed`] (or `tonic::Status`, or transport error) in its chain, and 1 when there is none.

use std::fmt;

use tonic::Code;

/// How a command ended, as its process exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// It did what was asked.
    Success,
    /// Any failure the codes below do not name.
    Failure,
    /// A batch it submitted or followed finished with aborted chunks.
    BatchAborted,
    /// The command line is wrong (sysexits' `EX_USAGE`).
    Usage,
    /// The input is invalid (`EX_DATAERR`).
    InvalidArgument,
    /// What it names does not exist (`EX_NOINPUT`).
    NotFound,
    /// The server cannot be reached or cannot serve now (`EX_UNAVAILABLE`).
    Unavailable,
    /// The credentials are missing, wrong or not enough (`EX_NOPERM`).
    Unauthenticated,
    /// Cancelled (128 + SIGINT, what a shell reports for Ctrl-C).
    Cancelled,
}

/// The message tonic's client gives a call that ran out of its own deadline
/// (`Endpoint::timeout`), with the code CANCELLED.
const CLIENT_TIMEOUT: &str = "Timeout expired";
/// Whether `status` is tonic's account of the connection failing under the call (a reset, an
/// HTTP/2 error, a TLS server refusing a client without a certificate), not an answer of the
/// server: then the command is unavailable (69), whatever the code.
pub(crate) fn transport_failure(status: &tonic::Status) -> bool {
    matches!(status.code(), Code::Cancelled | Code::Unknown | Code::Internal)
        && ["operation was canceled", "transport error", "h2 protocol error"]
            .iter()
            .any(|m| status.message().starts_with(m))
}

impl Exit {
    /// Every exit code, in the order of the table.
    pub const ALL: [Exit; 9] = [
        Exit::Success,
        Exit::Failure,
        Exit::BatchAborted,
        Exit::Usage,
        Exit::InvalidArgument,
        Exit::NotFound,
        Exit::Unavailable,
        Exit::Unauthenticated,
        Exit::Cancelled,
    ];

    /// The process exit code.
    pub fn code(self) -> u8 {
        match self {
            Exit::Success => 0,
            Exit::Failure => 1,
            Exit::BatchAborted => 2,
            Exit::Usage => 64,
            Exit::InvalidArgument => 65,
            Exit::NotFound => 66,
            Exit::Unavailable => 69,
            Exit::Unauthenticated => 77,
            Exit::Cancelled => 130,
        }
    }

    /// What the code means, for the table.
    pub fn meaning(self) -> &'static str {
        match self {
            Exit::Success => "success",
            Exit::Failure => {
                "any other failure (INTERNAL, ALREADY_EXISTS, FAILED_PRECONDITION, RESOURCE_EXHAUSTED, \
                 a file that cannot be written, ...)"
            }
            Exit::BatchAborted => {
                "the batch finished with aborted chunks (`batch submit`, `batch watch`): the others \
                 committed; `baton batch results ID --aborted` says why"
            }
            Exit::Usage => "usage: an unknown flag or command, a missing or malformed argument, bad config",
            Exit::InvalidArgument => {
                "invalid argument: INVALID_ARGUMENT or OUT_OF_RANGE, or an input file that does not parse"
            }
            Exit::NotFound => {
                "not found: NOT_FOUND (an id, token, object or record unknown, expired or of another org), or a missing input file"
            }
            Exit::Unavailable => {
                "unavailable: the server cannot be reached (or the connection failed under the call, as a TLS server refusing a client does), or answered UNAVAILABLE or DEADLINE_EXCEEDED \
                 (its store or manager is down, or the call ran out of time); try again later"
            }
            Exit::Unauthenticated => {
                "unauthenticated: UNAUTHENTICATED or PERMISSION_DENIED (a missing, wrong or revoked key or token)"
            }
            Exit::Cancelled => "cancelled: CANCELLED, a batch or export that ended cancelled, or interrupted (Ctrl-C)",
        }
    }

    /// The exit code of a command that failed with `status`: the one mapping from gRPC codes.
    pub fn of_status(status: &tonic::Status) -> Exit {
        match status.code() {
            Code::Ok => Exit::Success,
            Code::InvalidArgument | Code::OutOfRange => Exit::InvalidArgument,
            Code::NotFound => Exit::NotFound,
            Code::Unauthenticated | Code::PermissionDenied => Exit::Unauthenticated,
            Code::Unavailable | Code::DeadlineExceeded => Exit::Unavailable,
            // the client's own deadline, not a cancellation
            Code::Cancelled if status.message() == CLIENT_TIMEOUT => Exit::Unavailable,
            _ if transport_failure(status) => Exit::Unavailable,
            Code::Cancelled => Exit::Cancelled,
            Code::Unknown
            | Code::AlreadyExists
            | Code::ResourceExhausted
            | Code::FailedPrecondition
            | Code::Aborted
            | Code::Unimplemented
            | Code::Internal
            | Code::DataLoss => Exit::Failure,
        }
    }

    /// The exit code of a command that failed with `error`: that of the first [`Failed`], status
    /// or transport error in its chain, and [`Exit::Failure`] when there is none.
    pub fn of_error(error: &anyhow::Error) -> Exit {
        for cause in error.chain() {
            if let Some(failed) = cause.downcast_ref::<Failed>() {
                return failed.exit;
            }
            if let Some(status) = cause.downcast_ref::<tonic::Status>() {
                return Exit::of_status(status);
            }
            if cause.downcast_ref::<tonic::transport::Error>().is_some() {
                return Exit::Unavailable;
            }
        }
        Exit::Failure
    }
}

/// The table of exit codes, as `baton --help` shows it after the commands.
pub fn table() -> String {
    let mut text = String::from("Exit codes:\n");
    for exit in Exit::ALL {
        text.push_str(&format!("  {:>3}  {}\n", exit.code(), exit.meaning()));
    }
    text
}

/// An error that ends the command with its own exit code; its message is what is printed.
#[derive(Debug)]
pub struct Failed {
    /// The exit code.
    pub exit: Exit,
    /// What went wrong.
    pub message: String,
}

impl fmt::Display for Failed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failed {}

/// An error ending the command with `exit`.
pub fn fail(exit: Exit, message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(Failed { exit, message: message.into() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_code_has_its_exit_code() {
        let cases = [
            (Code::InvalidArgument, 65),
            (Code::OutOfRange, 65),
            (Code::NotFound, 66),
            (Code::Unauthenticated, 77),
            (Code::PermissionDenied, 77),
            (Code::Unavailable, 69),
            (Code::DeadlineExceeded, 69),
            (Code::Cancelled, 130),
            (Code::Internal, 1),
            (Code::ResourceExhausted, 1),
            (Code::AlreadyExists, 1),
        ];
        for (code, exit) in cases {
            assert_eq!(Exit::of_status(&tonic::Status::new(code, "x")).code(), exit, "{code:?}");
        }
        // tonic's client deadline is CANCELLED with its own message: the server did not answer in time
        assert_eq!(Exit::of_status(&tonic::Status::cancelled(CLIENT_TIMEOUT)), Exit::Unavailable);
        assert_eq!(Exit::of_status(&tonic::Status::cancelled("operation was canceled")), Exit::Unavailable);
        assert_eq!(Exit::of_status(&tonic::Status::unknown("transport error")), Exit::Unavailable);
        assert_eq!(Exit::of_status(&tonic::Status::internal("h2 protocol error: http2 error")), Exit::Unavailable);
        assert_eq!(Exit::of_status(&tonic::Status::internal("internal store error")), Exit::Failure);
    }

    #[test]
    fn an_error_takes_the_code_of_its_first_known_cause() {
        use anyhow::Context;
        let wrapped = Err::<(), _>(tonic::Status::not_found("batch")).context("reading the batch").unwrap_err();
        assert_eq!(Exit::of_error(&wrapped), Exit::NotFound);
        let failed = Err::<(), _>(fail(Exit::BatchAborted, "2 aborted")).context("outer").unwrap_err();
        assert_eq!(Exit::of_error(&failed), Exit::BatchAborted);
        assert_eq!(Exit::of_error(&anyhow::anyhow!("disk full")), Exit::Failure);
    }

    /// The README's table is the one `baton --help` prints.
    #[test]
    fn the_readme_shows_the_same_table() {
        let readme = include_str!("../../../README.md");
        for exit in Exit::ALL {
            let row = format!("| {} | {} |", exit.code(), exit.meaning());
            assert!(readme.contains(&row), "README.md lacks the row\n{row}");
        }
    }
}
