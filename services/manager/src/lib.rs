//! The session manager: client sessions (for example the scheduler) and server sessions (for
//! example workers) each hold one bidirectional stream to the manager, which binds each client
//! session to a server session of a pool and relays numbered requests and responses between them.
//! Every state change (sessions, restart data, both queues, bindings) is journaled with group
//! commit before anything is acknowledged ([`journal`], [`state`], [`service`]). The library
//! clients and servers use is the crate `baton-manager-client`: it reconnects, resumes with
//! restart data, resends what was not acknowledged, and deduplicates by number.

mod error;
pub mod failover;
pub mod journal;
pub mod service;
pub mod state;

pub use error::Error;
pub use service::{ManagerOptions, ManagerService};

/// Sets up the failpoints named in the `FAILPOINTS` environment variable (`name=actions;...`, the
/// `fail` crate's syntax: `journal-write=200*off->return`, `journal-fsync=20%sleep(300)`), when
/// built with the `failpoints` feature; otherwise a bad or set `FAILPOINTS` is an error, so a
/// fault test never runs against a binary that ignores its faults.
pub fn setup_failpoints() -> Result<(), String> {
    let Ok(spec) = std::env::var("FAILPOINTS") else { return Ok(()) };
    if !cfg!(feature = "failpoints") {
        return Err("FAILPOINTS is set but this baton was built without the failpoints feature".to_owned());
    }
    for point in spec.split(';').filter(|p| !p.trim().is_empty()) {
        let (name, actions) =
            point.split_once('=').ok_or_else(|| format!("FAILPOINTS: {point:?} is not name=actions"))?;
        fail::cfg(name.trim(), actions.trim()).map_err(|e| format!("FAILPOINTS: {name}: {e}"))?;
    }
    Ok(())
}
