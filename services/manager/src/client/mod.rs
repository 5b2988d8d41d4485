//! The client library of the session manager, for client sessions ([`ClientSession`], for
//! example the scheduler) and server sessions ([`ServerSession`], for example workers).
//!
//! Both keep one stream to the manager and keep it alive: when it breaks they reconnect (with
//! backoff), resume — a client with its session id and restart data, a server with its id — and
//! resend what the manager has not acknowledged. Requests and responses are numbered, and both
//! sides drop numbers they have already seen, so a user sees each response (or request) once. A
//! frame of a term older than one already seen is refused.
//!
//! Its parts: the process's shared Multiplex streams and a session's channel on one (`mux`),
//! finding the primary among the managers (`endpoints`), the client session
//! (`client_session`), the server session (`server_session`), and the mesh token (`token`).
//!
//! The two process-wide settings are statics, the mesh token (`token`) and the streams by
//! endpoint (`mux`): a process holds one connection per manager, shared by all of its sessions.

mod client_session;
mod endpoints;
mod mux;
mod server_session;
#[cfg(test)]
mod testing;
mod token;

pub use client_session::{Accepted, ClientResponse, ClientSender, ClientSession};
pub use server_session::{ServerEvent, ServerReplier, ServerSession};
pub use token::{authorized, use_mesh_token};
