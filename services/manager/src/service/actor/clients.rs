//! The client session commands: open (new or resumed), request, acknowledge, close, and a
//! client's stream gone; and a session's activity, and closing it.

use baton_mesh::proto::v1 as pb;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tonic::Status;

use super::{Actor, Effect};
use crate::Error;
use crate::journal::{AckOp, CloseOp, Op, OpenOp, RequestOp};
use crate::service::outbox::ClientTx;

impl Actor {
    /// Opens a client session (a new one, or one resumed by id) on the stream `tx`, and answers
    /// with its id.
    pub(super) fn client_open(
        &mut self,
        open: pb::OpenSession,
        session_id: String,
        fresh: bool,
        conn: u64,
        tx: ClientTx,
        reply: Option<oneshot::Sender<Result<String, Status>>>,
    ) {
        if open.seen_term > self.term {
            return self.refuse(tx, reply, Error::OlderTerm { ours: self.term, seen: open.seen_term }.into());
        }
        if open.create && !fresh {
            let printable = session_id.bytes().all(|b| b.is_ascii_graphic());
            if session_id.len() > 128 || !printable {
                return self.refuse(tx, reply, Error::BadSessionId(session_id).into());
            }
        }
        // a session a client names is created on its first open
        let fresh = fresh || (open.create && !self.state.sessions.contains_key(&session_id));
        if fresh {
            if open.pool.is_empty() {
                return self.refuse(tx, reply, Error::InvalidArgument("open.pool is required").into());
            }
            self.journal(Op::Open(OpenOp {
                session_id: session_id.clone(),
                pool: open.pool.clone(),
                restart_data: open.restart_data.clone(),
                last_request_seq: 0,
                opened_at_unix_ms: baton_mesh::now_ms(),
            }));
        } else {
            let Some(s) = self.state.sessions.get(&session_id) else {
                let error = match self.state.closed_reason(&session_id) {
                    Some(reason) => Error::SessionClosed { id: session_id, reason: reason.to_owned() },
                    None => Error::SessionNotFound(session_id),
                };
                return self.refuse(tx, reply, error.into());
            };
            let pool = s.pool.clone();
            if !open.restart_data.is_empty() {
                self.journal(Op::Open(OpenOp {
                    session_id: session_id.clone(),
                    pool,
                    restart_data: open.restart_data.clone(),
                    last_request_seq: 0,
                    opened_at_unix_ms: 0,
                }));
            }
        }
        self.active(&session_id);
        if let Some((_, old)) = self.clients.insert(session_id.clone(), (conn, tx)) {
            old.end(&Error::Replaced("the session was opened again on another stream").into());
        }
        let s = &self.state.sessions[&session_id];
        self.effects.push(Effect::Client(
            session_id.clone(),
            pb::client_event::Kind::Opened(pb::SessionOpened {
                session_id: session_id.clone(),
                restart_data: s.client_restart.clone(),
                last_request_seq: s.last_request_seq,
            }),
        ));
        let responses: Vec<_> = s.responses.iter().map(|(seq, p)| (*seq, p.clone())).collect();
        for (seq, payload) in responses {
            self.effects.push(Effect::Client(
                session_id.clone(),
                pb::client_event::Kind::Response(pb::SessionResponse { seq, payload }),
            ));
        }
        let bound = s.bound.clone();
        if bound.is_none() {
            self.bind(&session_id);
        }
        if let Some(reply) = reply {
            let _ = reply.send(Ok(session_id));
        }
    }

    /// Journals a client request (numbered without gaps), accepts it, and delivers it to the
    /// bound server.
    pub(super) fn client_request(&mut self, session: String, conn: u64, request: pb::ClientRequest) {
        if self.clients.get(&session).is_none_or(|(c, _)| *c != conn) {
            return;
        }
        if !self.state.sessions.contains_key(&session) {
            return;
        }
        self.active(&session);
        let s = &self.state.sessions[&session];
        let last = s.last_request_seq;
        let bound = s.bound.clone();
        // responses acknowledged with the request (those still queued)
        let acks: Vec<u64> = request.acks.iter().copied().filter(|seq| s.responses.contains_key(seq)).collect();
        if request.seq <= last {
            // already journaled: acknowledge again
            for seq in acks {
                self.journal(Op::Ack(AckOp { session_id: session.clone(), seq }));
            }
            self.effects.push(Effect::Client(
                session,
                pb::client_event::Kind::Accepted(pb::RequestAccepted { seq: request.seq }),
            ));
            return;
        }
        if request.seq != last + 1 {
            if let Some((_, tx)) = self.clients.remove(&session) {
                self.effects.push(Effect::RefuseClient(tx, Error::Gap { seq: request.seq, last }.into()));
            }
            return;
        }
        self.journal(Op::Request(RequestOp {
            session_id: session.clone(),
            seq: request.seq,
            payload: request.payload.clone(),
            restart_data: request.restart_data.clone(),
            acks,
        }));
        let span = if baton_mesh::trace::enabled() && !request.traceparent.is_empty() {
            let span = tracing::info_span!("relay", otel.name = "manager relay", session = %session, seq = request.seq);
            baton_mesh::trace::continue_from(&span, &request.traceparent);
            span
        } else {
            tracing::Span::none()
        };
        self.relaying.entry(session.clone()).or_default().insert(request.seq, (Instant::now(), span));
        self.effects.push(Effect::Client(
            session.clone(),
            pb::client_event::Kind::Accepted(pb::RequestAccepted { seq: request.seq }),
        ));
        if let Some(server) = bound.filter(|b| self.servers.contains_key(b)) {
            let client_restart = self.state.sessions[&session].client_restart.clone();
            self.effects.push(Effect::Server(
                server,
                pb::server_event::Kind::Request(pb::DeliverRequest {
                    session_id: session,
                    seq: request.seq,
                    payload: request.payload,
                    client_restart_data: if request.restart_data.is_empty() {
                        client_restart
                    } else {
                        request.restart_data
                    },
                }),
            ));
        }
    }

    /// The client has the response `seq`: it leaves the queue.
    pub(super) fn client_ack(&mut self, session: String, seq: u64) {
        if self.state.sessions.get(&session).is_some_and(|s| s.responses.contains_key(&seq)) {
            self.active(&session);
            self.journal(Op::Ack(AckOp { session_id: session, seq }));
        }
    }

    /// The client closes its session: with nothing queued (or `drop_queued`), it is journaled
    /// closed and answered; otherwise the channel ends with what is still queued, and the
    /// session stays.
    pub(super) fn client_close(&mut self, session: String, conn: u64, close: pb::CloseSession) {
        if self.clients.get(&session).is_none_or(|(c, _)| *c != conn) {
            return;
        }
        let Some(s) = self.state.sessions.get(&session) else { return };
        let (requests, responses) = (s.requests.len(), s.responses.len());
        if !close.drop_queued && requests + responses > 0 {
            if let Some((_, tx)) = self.clients.remove(&session) {
                let status = Error::StillQueued { id: session, requests, responses }.into();
                self.effects.push(Effect::RefuseClient(tx, status));
            }
            return;
        }
        self.close(&session, "closed by the client".to_owned());
        self.effects.push(Effect::Client(
            session.clone(),
            pb::client_event::Kind::Closed(pb::SessionClosed { reason: "closed by the client".into() }),
        ));
        self.effects.push(Effect::ClientEnd(session));
    }

    /// Session `id` is active now (no allocation for a session already known: this is on the
    /// path of every request, reply and acknowledgment).
    pub(super) fn active(&mut self, id: &str) {
        let now = Instant::now();
        match self.activity.get_mut(id) {
            Some(at) => *at = now,
            None => {
                self.activity.insert(id.to_owned(), now);
            }
        }
    }

    /// Journals session `id` closed, for `reason`.
    pub(super) fn close(&mut self, id: &str, reason: String) {
        tracing::info!(session = %id, %reason, "session closed");
        self.activity.remove(id);
        self.journal(Op::Close(CloseOp { session_id: id.to_owned(), reason }));
        self.relaying.remove(id);
    }

    /// The client session's stream `conn` has gone.
    pub(super) fn client_gone(&mut self, session: String, conn: u64) {
        if self.clients.get(&session).is_some_and(|(c, _)| *c == conn) {
            self.clients.remove(&session);
        }
    }
}
