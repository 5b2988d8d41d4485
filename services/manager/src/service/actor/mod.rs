//! The actor: the one task that owns the state and the journal. It takes commands (from the
//! gRPC handlers, the failover task and its ticker), one method per command; each journals the
//! entries it makes and records what to send ([`Effect`]), and [`Actor::flush`] makes the batch
//! durable (one fsync for every command of the batch) before it sends anything.
//!
//! Here are the commands, the effects, the actor's fields and its dispatch; its methods are
//! grouped by what they serve: client sessions (`clients`), servers (`servers`), the periodic
//! work (`tick`), the role (`role`), the group commit (`commit`) and the read-only views
//! (`views`).

mod clients;
mod commit;
mod role;
mod servers;
mod tick;
mod views;

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
use super::outbox::{ClientTx, Mux, ServerTx};
use super::replication::ReplicaConn;
use crate::Error;
use crate::failover::Publisher;
use crate::journal::{Entry, Journal, Op};
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
    /// The actor of a manager whose journal replayed to `state`: a single manager (`single`) is
    /// the primary of `term`; an elected one starts as a standby named `node_id`, in the
    /// journal's term, until the failover task makes it primary.
    pub(super) fn new(
        options: ManagerOptions,
        node_id: String,
        single: bool,
        journal: Journal,
        state: State,
        term: u64,
    ) -> Self {
        // Servers are not connected after a restart: sessions bound to one that does not come back
        // within the grace move to another.
        let lost: HashMap<String, Instant> =
            state.sessions.values().filter_map(|s| s.bound.clone()).map(|b| (b, Instant::now())).collect();
        // a session's idle time starts when the manager does
        let activity = state.sessions.keys().map(|id| (id.clone(), Instant::now())).collect();
        let (failed, failure) = (CancellationToken::new(), Arc::new(std::sync::Mutex::new(None)));
        let role = Arc::new(super::Role::default());
        role.set(single, "");
        let standby_timeout = super::STANDBY_TIMEOUT.min(options.lease_ttl / 2);
        let mut actor = Actor {
            term,
            state,
            journal,
            options,
            clients: HashMap::new(),
            servers: HashMap::new(),
            muxes: HashMap::new(),
            lost,
            moving: HashMap::new(),
            pending: Vec::new(),
            effects: Vec::new(),
            primary: single,
            leader: String::new(),
            node_id,
            replicas: HashMap::new(),
            in_sync: Default::default(),
            journal_ids: HashMap::new(),
            set_changed: false,
            publisher: None,
            standby_timeout,
            failed,
            failure,
            seen_term: 0,
            activity,
            next_expiry: Instant::now(),
            next_gauges: Instant::now(),
            relaying: HashMap::new(),
            epoch: 0,
            role,
        };
        if !single {
            actor.term = actor.state.term;
        }
        actor
    }

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
}
