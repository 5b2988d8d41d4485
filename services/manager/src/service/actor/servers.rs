//! The server commands: register, reply, save restart data, and a server's stream gone; and
//! binding a session to a server, which then gets all it holds.

use baton_mesh::proto::v1 as pb;
use tokio::time::Instant;

use super::{Actor, Effect, ServerConn};
use crate::Error;
use crate::journal::{BindOp, Op, ReplyOp};
use crate::service::outbox::ServerTx;

impl Actor {
    /// The ids of the sessions bound to `server`.
    pub(super) fn sessions_bound_to(&self, server: &str) -> Vec<String> {
        self.state.sessions.values().filter(|s| s.bound.as_deref() == Some(server)).map(|s| s.id.clone()).collect()
    }

    /// Binds a session to the connected server of its pool with the fewest sessions, if any.
    pub(super) fn bind(&mut self, session_id: &str) {
        let Some(pool) = self.state.sessions.get(session_id).map(|s| s.pool.clone()) else { return };
        let load = &self.state.load;
        let best = self
            .servers
            .iter()
            .filter(|(_, c)| c.pool == pool)
            .min_by_key(|(id, _)| (load.get(id.as_str()).copied().unwrap_or(0), (*id).clone()))
            .map(|(id, _)| id.clone());
        if let Some(server) = best {
            self.journal(Op::Bind(BindOp { session_id: session_id.to_owned(), server_id: server.clone() }));
            self.deliver_all(session_id, &server);
        }
    }

    /// Tells `server` about the session and sends it every queued request.
    fn deliver_all(&mut self, session_id: &str, server: &str) {
        let Some(s) = self.state.sessions.get(session_id) else { return };
        self.effects.push(Effect::Server(
            server.to_owned(),
            pb::server_event::Kind::Bound(pb::SessionBound {
                session_id: s.id.clone(),
                server_restart_data: s.server_restart.clone(),
                client_restart_data: s.client_restart.clone(),
            }),
        ));
        for (seq, r) in &s.requests {
            self.effects.push(Effect::Server(
                server.to_owned(),
                pb::server_event::Kind::Request(pb::DeliverRequest {
                    session_id: s.id.clone(),
                    seq: *seq,
                    payload: r.payload.clone(),
                    client_restart_data: r.client_restart.clone(),
                }),
            ));
        }
    }

    /// Registers a server on the stream `tx`: it gets its sessions again, and the unbound
    /// sessions of its pool.
    pub(super) fn server_register(&mut self, register: pb::RegisterServer, conn: u64, tx: ServerTx) {
        if register.seen_term > self.term || register.pool.is_empty() || register.server_id.is_empty() {
            self.effects.push(Effect::RefuseServer(tx, Error::BadRegister.into()));
            return;
        }
        let id = register.server_id.clone();
        self.lost.remove(&id);
        self.moving.remove(&id);
        if let Some(old) = self.servers.insert(id.clone(), ServerConn { conn, pool: register.pool.clone(), tx }) {
            old.tx.end(&Error::Replaced("the server registered again on another stream").into());
        }
        self.effects.push(Effect::Server(
            id.clone(),
            pb::server_event::Kind::Registered(pb::ServerRegistered { server_id: id.clone() }),
        ));
        for session in self.sessions_bound_to(&id) {
            self.deliver_all(&session, &id);
        }
        let unbound: Vec<String> = self
            .state
            .sessions
            .values()
            .filter(|s| s.bound.is_none() && s.pool == register.pool)
            .map(|s| s.id.clone())
            .collect();
        for session in unbound {
            self.bind(&session);
        }
    }

    /// Journals a server's reply to a queued request, sends it to the client, and accepts it.
    pub(super) fn server_reply(&mut self, server: String, conn: u64, reply: pb::ServerReply) {
        if self.servers.get(&server).is_none_or(|c| c.conn != conn) {
            return;
        }
        let Some(s) = self.state.sessions.get(&reply.session_id) else { return };
        if s.bound.as_deref() != Some(server.as_str()) {
            return; // the session moved: a stale reply
        }
        let queued = s.requests.contains_key(&reply.seq);
        if queued {
            self.active(&reply.session_id);
            self.journal(Op::Reply(ReplyOp {
                session_id: reply.session_id.clone(),
                seq: reply.seq,
                payload: reply.payload.clone(),
                restart_data: reply.restart_data.clone(),
            }));
            // the request's relay span, if any, ends here (dropped)
            if let Some((at, _span)) = self.relaying.get_mut(&reply.session_id).and_then(|q| q.remove(&reply.seq)) {
                metrics::histogram!("baton_manager_relay_seconds").record(at.elapsed().as_secs_f64());
            }
            if self.clients.contains_key(&reply.session_id) {
                self.effects.push(Effect::Client(
                    reply.session_id.clone(),
                    pb::client_event::Kind::Response(pb::SessionResponse { seq: reply.seq, payload: reply.payload }),
                ));
            }
        }
        self.effects.push(Effect::Server(
            server,
            pb::server_event::Kind::Accepted(pb::ReplyAccepted { session_id: reply.session_id, seq: reply.seq }),
        ));
    }

    /// Journals a bound session's server restart data (a reply without a response, number 0),
    /// and answers once it is durable.
    pub(super) fn server_restart(&mut self, server: String, conn: u64, restart: pb::ServerRestart) {
        if self.servers.get(&server).is_none_or(|c| c.conn != conn) {
            return;
        }
        let bound_here =
            self.state.sessions.get(&restart.session_id).is_some_and(|s| s.bound.as_deref() == Some(&server));
        if !bound_here {
            // the session moved, or is gone: said at once, so that the server stops resending it
            let saved = pb::ServerRestartSaved { session_id: restart.session_id, dropped: true };
            self.effects.push(Effect::Server(server, pb::server_event::Kind::RestartSaved(saved)));
            return;
        }
        self.journal(Op::Reply(ReplyOp {
            session_id: restart.session_id.clone(),
            seq: 0,
            payload: None,
            restart_data: restart.restart_data,
        }));
        self.effects.push(Effect::Server(
            server,
            pb::server_event::Kind::RestartSaved(pb::ServerRestartSaved {
                session_id: restart.session_id,
                dropped: false,
            }),
        ));
    }

    /// The server's stream `conn` has gone: its sessions move once the grace is over.
    pub(super) fn server_gone(&mut self, server: String, conn: u64) {
        if self.servers.get(&server).is_some_and(|c| c.conn == conn) {
            self.servers.remove(&server);
            self.lost.insert(server, Instant::now());
        }
    }
}
