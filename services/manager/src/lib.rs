//! The session manager: client sessions (for example the scheduler) and server sessions (for
//! example workers) each hold one bidirectional stream to the manager, which binds each client
//! session to a server session of a pool and relays numbered requests and responses between them.
//! Every state change (sessions, restart data, both queues, bindings) is journaled with group
//! commit before anything is acknowledged ([`journal`], [`state`], [`service`]). [`client`] is the
//! library clients and servers use: it reconnects, resumes with restart data, resends what was not
//! acknowledged, and deduplicates by number.

pub mod client;
pub mod failover;
pub mod journal;
pub mod service;
pub mod state;

pub use service::{ManagerOptions, ManagerService};

/// Errors of the manager.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The journal failed.
    #[error(transparent)]
    Journal(#[from] journal::Error),
}
