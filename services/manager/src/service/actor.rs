//! The actor: the one task that owns the state and the journal. It takes commands (from the
//! gRPC handlers, the failover task and its ticker), one method per command; each journals the
//! entries it makes and records what to send ([`Effect`]), and [`Actor::flush`] makes the batch
//! durable (one fsync for every command of the batch) before it sends anything.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use baton_mesh::proto::internal::v1 as internal;
use baton_mesh::proto::v1 as pb;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use super::options::ManagerOptions;
use super::outbox::{Batches, ClientTx, Mux, ServerTx};
use super::replication::ReplicaConn;
use crate::Error;
use crate::failover::Publisher;
use crate::journal::{AckOp, BindOp, CloseOp, Entry, Journal, Op, OpenOp, ReplyOp, RequestOp};
use crate::state::State;

/// What the actor is asked to do.
pub(super) enum Command {
    /// Opens session `session` (`fresh`: a new one, its id drawn by the caller; else one to
    /// resume). Without `reply` a refusal closes `tx`: a Multiplex stream does not wait for each
    /// open to be answered before it reads the next frame.
    ClientOpen {
        open: pb::OpenSession,
        session: String,
        fresh: bool,
        conn: u64,
        tx: ClientTx,
        reply: Option<oneshot::Sender<Result<String, Status>>>,
    },
    ClientRequest {
        session: String,
        conn: u64,
        request: pb::ClientRequest,
    },
    ClientAck {
        session: String,
        seq: u64,
    },
    ClientClose {
        session: String,
        conn: u64,
        close: pb::CloseSession,
    },
    ClientGone {
        session: String,
        conn: u64,
    },
    ServerRegister {
        register: pb::RegisterServer,
        conn: u64,
        tx: ServerTx,
    },
    ServerReply {
        server: String,
        conn: u64,
        reply: pb::ServerReply,
    },
    ServerRestart {
        server: String,
        conn: u64,
        restart: pb::ServerRestart,
    },
    ServerGone {
        server: String,
        conn: u64,
    },
    /// A Multiplex stream started: the actor holds it open (its demultiplexer holds it weakly),
    /// so it ends when the actor stops or lets it go, as a session's own stream does.
    MuxOpen {
        mux: Mux,
    },
    /// A Multiplex stream's caller has gone.
    MuxGone {
        id: u64,
    },
    Status {
        reply: oneshot::Sender<pb::ManagerStatus>,
    },
    Sessions {
        request: pb::ListSessionsRequest,
        reply: oneshot::Sender<pb::ListSessionsResponse>,
    },
    Session {
        id: String,
        reply: oneshot::Sender<Result<pb::SessionInfo, Status>>,
    },
    Tick,
    ReplicaConnect {
        node: String,
        journal_id: String,
        tx: mpsc::Sender<Result<internal::ReplicaFrame, Status>>,
        acked: tokio::sync::watch::Receiver<u64>,
    },
    ReplicaApply {
        frame: internal::ReplicaFrame,
        done: oneshot::Sender<Result<u64, Status>>,
    },
    /// Elected for `term`: `publisher` writes the in-sync set, fenced by this term's leader key
    /// (None: a manager without etcd).
    BecomePrimary {
        term: u64,
        publisher: Option<Publisher>,
        done: oneshot::Sender<()>,
    },
    /// `epoch`: only if the manager has not been elected since (a follower's view may be stale).
    BecomeStandby {
        leader: String,
        epoch: Option<u64>,
    },
}

/// Something to send once the batch that produced it is durable.
pub(super) enum Effect {
    Client(String, pb::client_event::Kind),
    /// The session was closed: its client's stream is let go once the events before are out.
    ClientEnd(String),
    /// A client's open or stream refused, or ended, with this status.
    RefuseClient(ClientTx, Status),
    /// A server's registration refused with this status.
    RefuseServer(ServerTx, Status),
    /// This manager is the primary of the term: told to a Multiplex stream's process.
    Notice(Mux, u64),
    /// A standby forwards that the manager at this address is the primary of the term.
    LeaderNotice(Mux, u64, String),
    Server(String, pb::server_event::Kind),
}

/// How many sessions of lost servers move each tick (10 ticks a second). Moving every session
/// of a lost server in one turn of the actor held it for seconds at 100,000 sessions (a takeover
/// whose echo servers came back after their grace, `bench sessions`): the new primary found
/// itself stalled (no answer to a status request for a lease TTL) and stepped down.
const MOVES_PER_TICK: usize = 2_000;
/// How often idle sessions are looked for, and the gauges sampled (each is a pass over every
/// session).
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// A connected server session.
pub(super) struct ServerConn {
    conn: u64,
    pool: String,
    tx: ServerTx,
}

/// The owner of the state and the journal; see the module doc.
pub(super) struct Actor {
    pub(super) term: u64,
    pub(super) state: State,
    pub(super) journal: Journal,
    pub(super) options: ManagerOptions,
    pub(super) clients: HashMap<String, (u64, ClientTx)>,
    pub(super) servers: HashMap<String, ServerConn>,
    /// The Multiplex streams, held open while this manager serves them.
    pub(super) muxes: HashMap<u64, Mux>,
    /// Servers whose stream broke, and when: their sessions move after the grace.
    pub(super) lost: HashMap<String, Instant>,
    /// The sessions of servers lost past their grace still to move, by server: at most
    /// [`MOVES_PER_TICK`] move each tick, and a server that registers again keeps those left.
    pub(super) moving: HashMap<String, Vec<String>>,
    pub(super) pending: Vec<Entry>,
    pub(super) effects: Vec<Effect>,
    pub(super) primary: bool,
    pub(super) leader: String,
    pub(super) node_id: String,
    pub(super) replicas: HashMap<String, ReplicaConn>,
    pub(super) in_sync: std::collections::BTreeSet<String>,
    /// The journal id of each standby as it connected (and this manager's own): the in-sync set
    /// names members with them.
    pub(super) journal_ids: HashMap<String, String>,
    /// The in-sync set changed outside `sync_standbys` and must be published before anything
    /// more is acknowledged.
    pub(super) set_changed: bool,
    /// The writer of the in-sync set for this primary's term (None: a standby, or no etcd).
    pub(super) publisher: Option<Publisher>,
    /// How long an in-sync standby may take to make a batch durable before it leaves the set.
    pub(super) standby_timeout: Duration,
    /// Cancelled, with `failure` saying why, when this manager must step down: its journal
    /// cannot be written, or a set write found it deposed.
    pub(super) failed: CancellationToken,
    pub(super) failure: Arc<std::sync::Mutex<Option<String>>>,
    /// The highest term seen in replicated frames (a standby refuses older ones).
    pub(super) seen_term: u64,
    /// When each session was last active (opened, a request, a reply, an acknowledgment), as
    /// this manager saw it: a detached session idle past `--session-expiry` is closed.
    pub(super) activity: HashMap<String, Instant>,
    /// When detached sessions are next looked at for expiry.
    pub(super) next_expiry: Instant,
    /// When the gauges (`baton_manager_*`) are next set.
    pub(super) next_gauges: Instant,
    /// On the primary: when each request it journaled, not yet answered, was journaled, by
    /// session (`baton_manager_relay_seconds`), and, when traces are exported and the request
    /// came with a context (`ClientRequest.traceparent`), its relay span, which ends (is dropped)
    /// when the server's reply is journaled; `Span::none()` otherwise.
    pub(super) relaying: HashMap<String, BTreeMap<u64, (Instant, tracing::Span)>>,
    /// How many times this manager was elected primary.
    pub(super) epoch: u64,
    /// The role as the stream handlers see it.
    pub(super) role: Arc<super::Role>,
}

impl Actor {
    /// Refuses an open: answers `reply` if the caller waits for one, else closes the channel.
    fn refuse(&mut self, tx: ClientTx, reply: Option<oneshot::Sender<Result<String, Status>>>, status: Status) {
        match reply {
            Some(reply) => {
                let _ = reply.send(Err(status));
            }
            None => self.effects.push(Effect::RefuseClient(tx, status)),
        }
    }

    fn not_primary(&self) -> Status {
        Error::NotPrimary { leader: self.leader.clone() }.into()
    }

    fn journal(&mut self, op: Op) {
        let entry = Entry { index: self.state.index + 1, term: self.term, op: Some(op) };
        self.state.apply(&entry);
        self.pending.push(entry);
    }

    /// A new session id (drawn by the gRPC handler, so that it can route the session's next
    /// frames without waiting for the open to be applied).
    pub(super) fn new_session_id() -> String {
        format!("ses_{}", hex::encode(rand::random::<[u8; 8]>()))
    }

    /// Binds a session to the connected server of its pool with the fewest sessions, if any.
    fn bind(&mut self, session_id: &str) {
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

    /// Applies one command; a standby refuses what only a primary serves.
    pub(super) fn handle(&mut self, command: Command) {
        if !self.primary {
            match command {
                Command::ClientOpen { reply, tx, .. } => {
                    let status = self.not_primary();
                    return self.refuse(tx, reply, status);
                }
                Command::ServerRegister { tx, .. } => {
                    let status = self.not_primary();
                    self.effects.push(Effect::RefuseServer(tx, status));
                    return;
                }
                Command::ReplicaConnect { tx, .. } => {
                    let _ = tx.try_send(Err(self.not_primary()));
                    return;
                }
                Command::ClientRequest { .. }
                | Command::ClientAck { .. }
                | Command::ClientClose { .. }
                | Command::ServerReply { .. }
                | Command::ServerRestart { .. } => return,
                other => return self.dispatch(other),
            }
        }
        self.dispatch(command)
    }

    /// Hands a command to its method.
    fn dispatch(&mut self, command: Command) {
        match command {
            Command::ClientOpen { open, session, fresh, conn, tx, reply } => {
                self.client_open(open, session, fresh, conn, tx, reply)
            }
            Command::ClientRequest { session, conn, request } => self.client_request(session, conn, request),
            Command::ClientAck { session, seq } => self.client_ack(session, seq),
            Command::ClientClose { session, conn, close } => self.client_close(session, conn, close),
            Command::ServerRestart { server, conn, restart } => self.server_restart(server, conn, restart),
            Command::Session { id, reply } => {
                let _ = reply.send(self.session(&id));
            }
            Command::ClientGone { session, conn } => self.client_gone(session, conn),
            Command::ServerRegister { register, conn, tx } => self.server_register(register, conn, tx),
            Command::ServerReply { server, conn, reply } => self.server_reply(server, conn, reply),
            Command::MuxOpen { mux } => self.mux_open(mux),
            Command::MuxGone { id } => self.mux_gone(id),
            Command::ServerGone { server, conn } => self.server_gone(server, conn),
            Command::Status { reply } => self.status(reply),
            Command::Sessions { request, reply } => {
                let _ = reply.send(self.sessions(&request));
            }
            Command::ReplicaConnect { node, journal_id, tx, acked } => {
                self.replica_connect(node, journal_id, tx, acked)
            }
            Command::ReplicaApply { frame, done } => self.replica_apply(frame, done),
            Command::BecomePrimary { term, publisher, done } => self.become_primary(term, publisher, done),
            Command::BecomeStandby { leader, epoch } => self.become_standby(leader, epoch),
            Command::Tick => self.tick(),
        }
    }

    /// Opens a client session (a new one, or one resumed by id) on the stream `tx`, and answers
    /// with its id.
    fn client_open(
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
    fn client_request(&mut self, session: String, conn: u64, request: pb::ClientRequest) {
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
    fn client_ack(&mut self, session: String, seq: u64) {
        if self.state.sessions.get(&session).is_some_and(|s| s.responses.contains_key(&seq)) {
            self.active(&session);
            self.journal(Op::Ack(AckOp { session_id: session, seq }));
        }
    }

    /// The client closes its session: with nothing queued (or `drop_queued`), it is journaled
    /// closed and answered; otherwise the channel ends with what is still queued, and the
    /// session stays.
    fn client_close(&mut self, session: String, conn: u64, close: pb::CloseSession) {
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
    fn active(&mut self, id: &str) {
        let now = Instant::now();
        match self.activity.get_mut(id) {
            Some(at) => *at = now,
            None => {
                self.activity.insert(id.to_owned(), now);
            }
        }
    }

    /// Journals session `id` closed, for `reason`.
    fn close(&mut self, id: &str, reason: String) {
        tracing::info!(session = %id, %reason, "session closed");
        self.activity.remove(id);
        self.journal(Op::Close(CloseOp { session_id: id.to_owned(), reason }));
        self.relaying.remove(id);
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

    /// The client session's stream `conn` has gone.
    fn client_gone(&mut self, session: String, conn: u64) {
        if self.clients.get(&session).is_some_and(|(c, _)| *c == conn) {
            self.clients.remove(&session);
        }
    }

    /// Registers a server on the stream `tx`: it gets its sessions again, and the unbound
    /// sessions of its pool.
    fn server_register(&mut self, register: pb::RegisterServer, conn: u64, tx: ServerTx) {
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
        let mine: Vec<String> = self
            .state
            .sessions
            .values()
            .filter(|s| s.bound.as_deref() == Some(id.as_str()))
            .map(|s| s.id.clone())
            .collect();
        for session in mine {
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
    fn server_reply(&mut self, server: String, conn: u64, reply: pb::ServerReply) {
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
    fn server_restart(&mut self, server: String, conn: u64, restart: pb::ServerRestart) {
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
    fn server_gone(&mut self, server: String, conn: u64) {
        if self.servers.get(&server).is_some_and(|c| c.conn == conn) {
            self.servers.remove(&server);
            self.lost.insert(server, Instant::now());
        }
    }

    /// Holds a Multiplex stream open; a primary tells it so at once.
    fn mux_open(&mut self, mux: Mux) {
        if self.primary {
            self.effects.push(Effect::Notice(mux.clone(), self.term));
        }
        self.muxes.insert(mux.id, mux);
    }

    /// Lets a Multiplex stream go.
    fn mux_gone(&mut self, id: u64) {
        self.muxes.remove(&id);
    }

    /// Answers with the manager's status.
    fn status(&self, reply: oneshot::Sender<pb::ManagerStatus>) {
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
    fn gauges(&mut self) {
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
    fn sessions(&self, request: &pb::ListSessionsRequest) -> pb::ListSessionsResponse {
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
    fn session(&self, id: &str) -> Result<pb::SessionInfo, Status> {
        if let Some(s) = self.state.sessions.get(id) {
            return Ok(self.info(s));
        }
        Err(match self.state.closed_reason(id) {
            Some(reason) => Error::SessionClosed { id: id.to_owned(), reason: reason.to_owned() },
            None => Error::SessionNotFound(id.to_owned()),
        }
        .into())
    }

    /// A primary moves the sessions of servers lost past their grace (a standby does nothing).
    fn tick(&mut self) {
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

    /// Elected for `term`: serves as primary, with `publisher` writing the in-sync set.
    fn become_primary(&mut self, term: u64, publisher: Option<Publisher>, done: oneshot::Sender<()>) {
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
    fn become_standby(&mut self, leader: String, epoch: Option<u64>) {
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

    /// Makes the batch durable, then sends what it produced.
    pub(super) async fn flush(&mut self) -> Result<(), crate::journal::Error> {
        let replicated = !self.pending.is_empty();
        if !self.pending.is_empty() {
            let entries = std::mem::take(&mut self.pending);
            // encoded once, for the journal and the standbys
            let records: prost::bytes::Bytes = crate::journal::encode_records(&entries).into();
            // a snapshot once the journal is as long as the last one: a takeover with 100,000
            // sessions journals their requests, replies and acknowledgments, and wrote a
            // snapshot of every session (300,000 entries) each 100,000 of them, in the actor
            let due = self.options.snapshot_every.max(self.journal.snapshot_len);
            let snapshot = (self.journal.since_snapshot + entries.len() as u64 >= due).then(|| self.state.to_entries());
            // The standby gets the batch before the local fsync, so the two fsyncs overlap: nothing
            // is acknowledged until both are durable, and a standby that takes over with entries
            // this manager never made durable holds requests nobody was told were accepted
            // (their senders send them again, and they are acknowledged then).
            if self.primary && !self.replicas.is_empty() {
                let frame = internal::ReplicaFrame { term: self.term, reset: false, records: records.clone() };
                // a standby that cannot take more is dropped; it reconnects and gets a snapshot
                self.replicas.retain(|_, r| r.tx.try_send(Ok(frame.clone())).is_ok());
            }
            if self.primary {
                // fault tests: the primary's journal write fails (`N*off->return`: after N good
                // batches as primary), where `journal-write` would fail a standby's as well
                fail::fail_point!("primary-journal-write", |_| Err(crate::journal::Error::Io {
                    path: self.options.journal_dir.join("journal"),
                    source: std::io::Error::other("failpoint primary-journal-write"),
                }));
            }
            let journal = &mut self.journal;
            tokio::task::block_in_place(|| -> Result<(), crate::journal::Error> {
                journal.append_records(&records, entries.len() as u64)?;
                if let Some(state) = snapshot {
                    journal.snapshot(&state, false)?;
                }
                Ok(())
            })?;
        }
        if self.primary && (replicated || self.set_changed || self.replicas.keys().any(|n| !self.in_sync.contains(n))) {
            self.sync_standbys().await;
        }
        let mut batches = Batches::default();
        for effect in std::mem::take(&mut self.effects) {
            match effect {
                Effect::Client(session, kind) => {
                    if let Some((_, tx)) = self.clients.get(&session) {
                        tx.send(pb::ClientEvent { term: self.term, kind: Some(kind) }, &mut batches).await;
                    }
                }
                Effect::RefuseClient(tx, status) => tx.refuse(&status, &mut batches).await,
                Effect::RefuseServer(tx, status) => tx.refuse(&status, &mut batches).await,
                Effect::Notice(mux, term) => batches.push(&mux, Mux::primary_notice(term)).await,
                Effect::LeaderNotice(mux, term, leader) => batches.push(&mux, Mux::leader_notice(term, leader)).await,
                Effect::ClientEnd(session) => {
                    // its Closed event is queued before: the stream ends after it, and a channel
                    // is let go by the client on that event
                    self.clients.remove(&session);
                }
                Effect::Server(server, kind) => {
                    if let Some(c) = self.servers.get(&server) {
                        c.tx.send(pb::ServerEvent { term: self.term, kind: Some(kind) }, &mut batches).await;
                    }
                }
            }
        }
        batches.send().await;
        Ok(())
    }

    /// Stops serving for good: nothing more is acknowledged, every stream is closed, and the
    /// manager's `failed` token tells the process to step down (`failover::step_down_on_fault`).
    pub(super) fn fail(&mut self, why: String) {
        tracing::error!(reason = %why, "the manager stops serving");
        self.become_standby(String::new(), None);
        *self.failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
        self.failed.cancel();
    }
}
