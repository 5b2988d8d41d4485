//! The read-only views of the state: the manager's status, the gauges, and the sessions as
//! ListSessions and GetSession show them.

use baton_mesh::proto::v1 as pb;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tonic::Status;

use super::{Actor, SWEEP_EVERY};
use crate::Error;

impl Actor {
    /// Answers with the manager's status.
    pub(super) fn status(&self, reply: oneshot::Sender<pb::ManagerStatus>) {
        let lag = self.replicas.values().map(|r| self.state.index.saturating_sub(*r.acked.borrow())).max().unwrap_or(0);
        let _ = reply.send(pb::ManagerStatus {
            role: if self.primary { "PRIMARY" } else { "STANDBY" }.into(),
            term: self.term,
            leader: self.leader.clone(),
            journal_index: self.state.index,
            standby_lag: lag,
            in_sync: self.in_sync.iter().cloned().collect(),
            sessions: self.state.sessions.len() as u64,
            servers: self.servers.len() as u64,
        });
    }

    /// Sets the `baton_manager_*` gauges, at most once a second (the queue totals walk every
    /// session).
    pub(super) fn gauges(&mut self) {
        if Instant::now() < self.next_gauges {
            return;
        }
        self.next_gauges = Instant::now() + SWEEP_EVERY;
        let lag = self.replicas.values().map(|r| self.state.index.saturating_sub(*r.acked.borrow())).max().unwrap_or(0);
        let (requests, responses) = self
            .state
            .sessions
            .values()
            .fold((0usize, 0usize), |(q, r), s| (q + s.requests.len(), r + s.responses.len()));
        metrics::gauge!("baton_manager_primary").set(if self.primary { 1.0 } else { 0.0 });
        metrics::gauge!("baton_manager_term").set(self.term as f64);
        metrics::gauge!("baton_manager_journal_index").set(self.state.index as f64);
        metrics::gauge!("baton_manager_standby_lag_entries").set(if self.primary { lag as f64 } else { 0.0 });
        metrics::gauge!("baton_manager_in_sync_members").set(if self.primary {
            self.in_sync.len() as f64
        } else {
            0.0
        });
        metrics::gauge!("baton_manager_sessions").set(self.state.sessions.len() as f64);
        metrics::gauge!("baton_manager_servers").set(self.servers.len() as f64);
        metrics::gauge!("baton_manager_queued_requests").set(requests as f64);
        metrics::gauge!("baton_manager_queued_responses").set(responses as f64);
    }

    /// What ListSessions and GetSession say of session `s`.
    fn info(&self, s: &crate::state::Session) -> pb::SessionInfo {
        let connected = self.clients.contains_key(&s.id);
        pb::SessionInfo {
            session_id: s.id.clone(),
            pool: s.pool.clone(),
            bound_server: s.bound.clone().unwrap_or_default(),
            client_connected: connected,
            request_queue: s.requests.len() as u64,
            response_queue: s.responses.len() as u64,
            last_request_seq: s.last_request_seq,
            client_restart_bytes: s.client_restart.len() as u64,
            server_restart_bytes: s.server_restart.len() as u64,
            state: if connected { "CONNECTED" } else { "DETACHED" }.into(),
            open_time: baton_mesh::proto::timestamp(s.opened_at_unix_ms),
            idle: Some(baton_mesh::proto::duration(
                self.activity.get(&s.id).map_or(0, |at| at.elapsed().as_millis() as u64),
            )),
        }
    }

    /// A page of sessions in the order of their ids, from after `page_token` (a session id).
    pub(super) fn sessions(&self, request: &pb::ListSessionsRequest) -> pb::ListSessionsResponse {
        let size = match request.page_size {
            0 => 1000,
            n => n.min(10_000) as usize,
        };
        let after = request.page_token.as_str();
        let mut ids: Vec<&String> = self.state.sessions.keys().filter(|id| id.as_str() > after).collect();
        // the page's ids only are sorted: selecting them is linear
        let more = ids.len() > size;
        if more {
            ids.select_nth_unstable(size);
            ids.truncate(size);
        }
        ids.sort_unstable();
        let sessions: Vec<_> = ids.iter().map(|id| self.info(&self.state.sessions[*id])).collect();
        let next_page_token =
            if more { sessions.last().map(|s| s.session_id.clone()).unwrap_or_default() } else { String::new() };
        pb::ListSessionsResponse { sessions, next_page_token }
    }

    /// Session `id`, or why there is none.
    pub(super) fn session(&self, id: &str) -> Result<pb::SessionInfo, Status> {
        if let Some(s) = self.state.sessions.get(id) {
            return Ok(self.info(s));
        }
        Err(match self.state.closed_reason(id) {
            Some(reason) => Error::SessionClosed { id: id.to_owned(), reason: reason.to_owned() },
            None => Error::SessionNotFound(id.to_owned()),
        }
        .into())
    }
}
