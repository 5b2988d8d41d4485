//! The periodic work of a tick: the gauges, closing sessions idle past `--session-expiry`, and
//! moving the sessions of servers lost past their grace.

use tokio::time::Instant;

use super::{Actor, MOVES_PER_TICK, SWEEP_EVERY};
use crate::journal::{BindOp, Op};

impl Actor {
    /// A primary moves the sessions of servers lost past their grace (a standby does nothing).
    pub(super) fn tick(&mut self) {
        self.gauges();
        if !self.primary {
            return;
        }
        self.expire();
        let grace = self.options.server_grace;
        let expired: Vec<String> =
            self.lost.iter().filter(|(_, at)| at.elapsed() >= grace).map(|(id, _)| id.clone()).collect();
        for server in expired {
            self.lost.remove(&server);
            let bound: Vec<String> = self
                .state
                .sessions
                .values()
                .filter(|s| s.bound.as_deref() == Some(server.as_str()))
                .map(|s| s.id.clone())
                .collect();
            tracing::info!(%server, sessions = bound.len(), "server lost past its grace: moving its sessions");
            self.moving.insert(server, bound);
        }
        let mut budget = MOVES_PER_TICK;
        let servers: Vec<String> = self.moving.keys().cloned().collect();
        for server in servers {
            let Some(left) = self.moving.get_mut(&server) else { continue };
            let now = left.split_off(left.len().saturating_sub(budget));
            if left.is_empty() {
                self.moving.remove(&server);
            }
            budget -= now.len();
            for session in now {
                // still bound there (not closed or moved meanwhile)
                if self.state.sessions.get(&session).is_some_and(|s| s.bound.as_deref() == Some(server.as_str())) {
                    tracing::debug!(%session, %server, "moving the session");
                    self.journal(Op::Bind(BindOp { session_id: session.clone(), server_id: String::new() }));
                    self.bind(&session);
                }
            }
            if budget == 0 {
                break;
            }
        }
    }

    /// Closes the detached sessions idle for `--session-expiry` (looked at once a second).
    fn expire(&mut self) {
        let expiry = self.options.session_expiry;
        if expiry.is_zero() || Instant::now() < self.next_expiry {
            return;
        }
        self.next_expiry = Instant::now() + SWEEP_EVERY;
        let expired: Vec<String> = self
            .activity
            .iter()
            .filter(|(id, at)| at.elapsed() >= expiry && !self.clients.contains_key(*id))
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            if self.state.sessions.contains_key(&id) {
                let reason = format!("expired: no client and no activity for {}", humantime::format_duration(expiry));
                self.close(&id, reason);
            } else {
                self.activity.remove(&id);
            }
        }
    }
}

