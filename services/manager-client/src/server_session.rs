//! Server sessions ([`ServerSession`], and [`ServerReplier`] to answer from other tasks): the
//! requests of the sessions bound to a server, each handed to the user once, and replies kept
//! until the manager has journaled them, resent after a reconnect or for a redelivered request.

use std::collections::{HashMap, HashSet};

use baton_mesh::proto::v1 as pb;
use tokio::sync::mpsc;
use tonic::Status;

use super::connector::Connector;
use super::endpoints::{Endpoints, advance_term};
use super::mux::{MuxChannel, server_frame};

/// What a server session receives.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerEvent {
    /// A session is bound to this server, with its restart data (after a move, the previous
    /// server's).
    Bound {
        /// The session.
        session_id: String,
        /// The server restart data stored for it.
        server_restart_data: Vec<u8>,
        /// The client restart data stored for it.
        client_restart_data: Vec<u8>,
        /// The term of the primary that bound it.
        term: u64,
    },
    /// A request to answer with [`ServerSession::reply`].
    Request {
        /// The session.
        session_id: String,
        /// The request number.
        seq: u64,
        /// The request.
        payload: Option<prost_types::Any>,
        /// The client restart data sent with it.
        client_restart_data: Vec<u8>,
        /// The term of the primary that delivered it.
        term: u64,
    },
    /// The manager journaled a reply of this server (only for a session registered with
    /// [`ServerSession::register_reporting_acceptances`]). Events come in the order the manager
    /// sent them, so a `Bound` before it was sent before the reply was journaled.
    Accepted {
        /// The session.
        session_id: String,
        /// The request number answered.
        seq: u64,
        /// The term of the primary that journaled the reply.
        term: u64,
    },
}

/// A server session: receives requests of the sessions bound to it and answers them.
pub struct ServerSession {
    events: mpsc::Receiver<ServerEvent>,
    replies: mpsc::Sender<Outgoing>,
}

/// What the user sends through a [`ServerReplier`].
enum Outgoing {
    Reply(pb::ServerReply),
    Restart(pb::ServerRestart),
}

struct ServerLoop {
    connector: Connector,
    endpoints: Endpoints,
    pool: String,
    server_id: String,
    seen_term: u64,
    /// Replies not yet journaled: resent after a reconnect, and for a redelivered request.
    unaccepted: HashMap<(String, u64), pb::ServerReply>,
    /// Restart data not yet journaled, by session: resent after a reconnect (before the
    /// replies, which supersede it).
    unsaved: HashMap<String, pb::ServerRestart>,
    /// Requests handed to the user and not answered yet.
    in_flight: HashSet<(String, u64)>,
    /// Whether the user gets [`ServerEvent::Accepted`].
    report_accepted: bool,
}

impl ServerLoop {
    /// One channel, on the shared stream to the next manager: register, resend, then relay until
    /// the channel breaks (its error) or the user has gone (`Ok`).
    async fn connection(
        &mut self,
        replies: &mut mpsc::Receiver<Outgoing>,
        events: &mpsc::Sender<ServerEvent>,
    ) -> Result<(), Status> {
        let endpoint = self.endpoints.next(self.seen_term);
        let register = pb::RegisterServer {
            pool: self.pool.clone(),
            server_id: self.server_id.clone(),
            seen_term: self.seen_term,
        };
        let mut channel =
            MuxChannel::open(&self.connector, &endpoint, server_frame(pb::server_frame::Kind::Register(register)))
                .await?;
        for restart in self.unsaved.values() {
            channel.send(server_frame(pb::server_frame::Kind::Restart(restart.clone())));
        }
        for reply in self.unaccepted.values() {
            channel.send(server_frame(pb::server_frame::Kind::Reply(reply.clone())));
        }
        let first = channel.first(&self.connector, &endpoint).await?;
        if !self.event(first, &channel, events).await? {
            return Ok(());
        }
        loop {
            tokio::select! {
                event = channel.next() => {
                    if !self.event(event?, &channel, events).await? {
                        return Ok(());
                    }
                }
                outgoing = replies.recv() => match outgoing {
                    None => return Ok(()),
                    Some(Outgoing::Reply(reply)) => {
                        let key = (reply.session_id.clone(), reply.seq);
                        self.in_flight.remove(&key);
                        // the reply's restart data (or the stored one) replaces what was saved
                        self.unsaved.remove(&reply.session_id);
                        self.unaccepted.insert(key, reply.clone());
                        channel.send(server_frame(pb::server_frame::Kind::Reply(reply)));
                    }
                    Some(Outgoing::Restart(restart)) => {
                        self.unsaved.insert(restart.session_id.clone(), restart.clone());
                        channel.send(server_frame(pb::server_frame::Kind::Restart(restart)));
                    }
                },
            }
        }
    }

    /// Handles an event of the server's channel; `false` when the user has gone.
    async fn event(
        &mut self,
        event: pb::mux_event::Kind,
        channel: &MuxChannel,
        events: &mpsc::Sender<ServerEvent>,
    ) -> Result<bool, Status> {
        let pb::mux_event::Kind::Server(event) = event else { return Ok(true) };
        advance_term(&mut self.seen_term, event.term)?;
        match event.kind {
            Some(pb::server_event::Kind::Bound(b)) => {
                let e = ServerEvent::Bound {
                    session_id: b.session_id,
                    server_restart_data: b.server_restart_data,
                    client_restart_data: b.client_restart_data,
                    term: self.seen_term,
                };
                if events.send(e).await.is_err() {
                    return Ok(false);
                }
            }
            Some(pb::server_event::Kind::Request(r)) => {
                let key = (r.session_id.clone(), r.seq);
                if let Some(reply) = self.unaccepted.get(&key) {
                    channel.send(server_frame(pb::server_frame::Kind::Reply(reply.clone())));
                } else if self.in_flight.insert(key) {
                    let e = ServerEvent::Request {
                        session_id: r.session_id,
                        seq: r.seq,
                        payload: r.payload,
                        client_restart_data: r.client_restart_data,
                        term: self.seen_term,
                    };
                    if events.send(e).await.is_err() {
                        return Ok(false);
                    }
                }
            }
            Some(pb::server_event::Kind::Accepted(a)) => {
                self.unaccepted.remove(&(a.session_id.clone(), a.seq));
                if self.report_accepted {
                    let e = ServerEvent::Accepted { session_id: a.session_id, seq: a.seq, term: self.seen_term };
                    if events.send(e).await.is_err() {
                        return Ok(false);
                    }
                }
            }
            Some(pb::server_event::Kind::RestartSaved(saved)) => {
                if saved.dropped {
                    tracing::debug!(session = %saved.session_id, "restart data dropped: the session is no longer bound here");
                }
                self.unsaved.remove(&saved.session_id);
            }
            Some(pb::server_event::Kind::Registered(_)) => self.endpoints.connected(),
            None => {}
        }
        Ok(true)
    }
}

impl ServerSession {
    /// Registers server `server_id` in `pool` with the manager at `endpoint`.
    pub fn register(connector: &Connector, endpoint: &str, pool: &str, server_id: &str) -> Self {
        Self::start(connector, endpoint, pool, server_id, false)
    }

    /// [`ServerSession::register`], and the user also gets [`ServerEvent::Accepted`] for each
    /// reply the manager journaled (fault tests record it).
    pub fn register_reporting_acceptances(connector: &Connector, endpoint: &str, pool: &str, server_id: &str) -> Self {
        Self::start(connector, endpoint, pool, server_id, true)
    }

    fn start(connector: &Connector, endpoint: &str, pool: &str, server_id: &str, report_accepted: bool) -> Self {
        let (event_tx, events) = mpsc::channel(1024);
        let (replies, mut reply_rx) = mpsc::channel(1024);
        let mut state = ServerLoop {
            connector: connector.clone(),
            endpoints: Endpoints::new(endpoint, connector.primary().clone()),
            pool: pool.to_owned(),
            server_id: server_id.to_owned(),
            seen_term: 0,
            unaccepted: HashMap::new(),
            unsaved: HashMap::new(),
            in_flight: HashSet::new(),
            report_accepted,
        };
        tokio::spawn(async move {
            loop {
                let Err(status) = state.connection(&mut reply_rx, &event_tx).await else { return };
                tracing::debug!(error = %status, "server session: reconnecting");
                // requests in flight are delivered again by the manager after a reconnect
                state.in_flight.clear();
                state.endpoints.pause(&status, state.seen_term).await;
            }
        });
        Self { events, replies }
    }

    /// The next event.
    pub async fn next(&mut self) -> Option<ServerEvent> {
        self.events.recv().await
    }

    /// Answers a request, with this server's restart data for the session after it.
    pub async fn reply(
        &self,
        session_id: &str,
        seq: u64,
        payload: prost_types::Any,
        restart_data: Vec<u8>,
    ) -> Result<(), Status> {
        self.replier().reply(session_id, seq, payload, restart_data).await
    }

    /// A handle that answers requests from other tasks than the one receiving them (requests
    /// may be answered in any order).
    pub fn replier(&self) -> ServerReplier {
        ServerReplier { replies: self.replies.clone() }
    }
}

/// Answers requests of a [`ServerSession`]; cheap to clone.
#[derive(Clone)]
pub struct ServerReplier {
    replies: mpsc::Sender<Outgoing>,
}

impl ServerReplier {
    /// Answers a request, with this server's restart data for the session after it.
    pub async fn reply(
        &self,
        session_id: &str,
        seq: u64,
        payload: prost_types::Any,
        restart_data: Vec<u8>,
    ) -> Result<(), Status> {
        let reply = pb::ServerReply { session_id: session_id.to_owned(), seq, payload: Some(payload), restart_data };
        self.outgoing(Outgoing::Reply(reply)).await
    }

    /// Replaces the server restart data of a session bound to this server, without answering:
    /// what a server that takes the session over gets in [`ServerEvent::Bound`] if this one
    /// dies first (for example the attempts made so far at the request in hand). Sent again
    /// after a reconnect until the manager has journaled it; a later reply supersedes it.
    pub async fn save_restart(&self, session_id: &str, restart_data: Vec<u8>) -> Result<(), Status> {
        self.outgoing(Outgoing::Restart(pb::ServerRestart { session_id: session_id.to_owned(), restart_data })).await
    }

    async fn outgoing(&self, outgoing: Outgoing) -> Result<(), Status> {
        self.replies.send(outgoing).await.map_err(|_| Status::unavailable("the server session task stopped"))
    }
}
