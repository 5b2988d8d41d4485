//! The client library of the session manager, for client sessions ([`ClientSession`], for
//! example the scheduler) and server sessions ([`ServerSession`], for example workers).
//!
//! Both keep one stream to the manager and keep it alive: when it breaks they reconnect (with
//! backoff), resume — a client with its session id and restart data, a server with its id — and
//! resend what the manager has not acknowledged. Requests and responses are numbered, and both
//! sides drop numbers they have already seen, so a user sees each response (or request) once. A
//! frame of a term older than one already seen is refused.
//!
//! Its parts: the [`Connector`] (`connector`), the shared Multiplex streams and a session's
//! channel on one (`mux`), finding the primary among the managers (`endpoints`), the client
//! session (`client_session`) and the server session (`server_session`).
//!
//! Sessions are opened through a [`Connector`], a cheap-to-clone handle on the mesh token and the
//! streams by endpoint: the sessions of one connector share one stream per manager; there are no
//! process-wide settings.

mod client_session;
mod connector;
mod endpoints;
mod mux;
mod server_session;
#[cfg(test)]
mod testing;

/// The metadata key of the leader's address in a standby's UNAVAILABLE answers.
pub const LEADER_METADATA: &str = "x-baton-leader";

/// Checks a `--manager` value (one endpoint, or several comma-separated) before anything is
/// started: each an `http://` or `https://` URL with a host, so that a typo is a start-up error
/// rather than a reconnect loop that warns a minute later.
pub fn check_managers(managers: &str) -> Result<(), String> {
    let mut any = false;
    for endpoint in managers.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        any = true;
        let uri: tonic::transport::Uri =
            endpoint.parse().map_err(|e| format!("--manager {endpoint:?} is not a URL: {e}"))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none_or(str::is_empty) {
            return Err(format!("--manager {endpoint:?} is not an http:// or https:// URL with a host"));
        }
    }
    if !any {
        return Err("--manager is empty: name the session manager (http://host:port)".into());
    }
    Ok(())
}

pub use client_session::{Accepted, ClientResponse, ClientSender, ClientSession, Opened};
pub use connector::Connector;
pub use server_session::{ServerEvent, ServerReplier, ServerSession};

#[cfg(test)]
mod tests {
    #[test]
    fn manager_endpoints_are_checked_at_start() {
        assert_eq!(super::check_managers("http://127.0.0.1:7400"), Ok(()));
        assert_eq!(super::check_managers("http://a:1, https://b:2"), Ok(()));
        for bad in ["", " , ", "notaurl", "127.0.0.1:7400", "ftp://x", "http://a:1,notaurl"] {
            assert!(super::check_managers(bad).is_err(), "{bad:?} accepted");
        }
    }
}
