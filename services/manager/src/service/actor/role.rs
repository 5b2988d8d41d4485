//! The role: becoming the primary of a term, stepping down to a standby, and stopping for good
//! on a fault.

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::{Actor, Effect};
use crate::failover::Publisher;

impl Actor {
    /// Elected for `term`: serves as primary, with `publisher` writing the in-sync set.
    pub(super) fn become_primary(&mut self, term: u64, publisher: Option<Publisher>, done: oneshot::Sender<()>) {
        tracing::info!(term, index = self.state.index, "primary");
        self.epoch += 1;
        self.primary = true;
        self.role.set(true, "");
        self.term = term;
        self.publisher = publisher;
        self.leader.clear();
        self.in_sync = [self.node_id.clone()].into();
        // a standby does not see activity: every session's idle time starts at the takeover
        let now = Instant::now();
        self.activity = self.state.sessions.keys().map(|id| (id.clone(), now)).collect();
        self.journal_ids = [(self.node_id.clone(), self.journal.id().to_owned())].into();
        self.set_changed = false;
        // the processes whose sessions this manager refused as a standby learn of the takeover
        // from one notice per stream
        for mux in self.muxes.values() {
            self.effects.push(Effect::Notice(mux.clone(), term));
        }
        // servers reconnect to the new primary; those that do not lose their sessions
        self.moving.clear();
        self.lost = self.state.sessions.values().filter_map(|s| s.bound.clone()).map(|b| (b, Instant::now())).collect();
        let _ = done.send(());
    }

    /// Steps down to a standby of `leader` (empty when unknown) and closes every stream; with
    /// `epoch`, only if the manager has not been elected since.
    pub(super) fn become_standby(&mut self, leader: String, epoch: Option<u64>) {
        if epoch.is_some_and(|epoch| epoch != self.epoch) {
            return; // elected since: the caller's view of the leader is stale
        }
        self.relaying.clear();
        self.moving.clear();
        let was_primary = self.primary;
        if was_primary {
            tracing::warn!("no longer primary: closing every stream");
        }
        self.primary = false;
        self.role.set(false, &leader);
        self.publisher = None;
        self.leader = leader;
        // a session's own stream ends as its sender is dropped; a channel is closed, and
        // its session told where the primary is
        let status = self.not_primary();
        for (_, (_, tx)) in self.clients.drain() {
            tx.end(&status);
        }
        for (_, c) in self.servers.drain() {
            c.tx.end(&status);
        }
        // and the Multiplex streams end once their channels' events are out. A standby keeps
        // those it holds (it refused their sessions): it forwards the next primary's term on
        // them (`replica_apply`), and a standby elected sends its notice on them. Ending them
        // each time a standby looked the leader up again (every 100 ms while the primary was
        // gone) left no stream for a notice to come on.
        if was_primary {
            self.muxes.clear();
        }
        self.replicas.clear();
        self.effects.clear();
    }

    /// Stops serving for good: nothing more is acknowledged, every stream is closed, and the
    /// manager's `failed` token tells the process to step down (`failover::step_down_on_fault`).
    pub(in crate::service) fn fail(&mut self, why: String) {
        tracing::error!(reason = %why, "the manager stops serving");
        self.become_standby(String::new(), None);
        *self.failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
        self.failed.cancel();
    }
}
