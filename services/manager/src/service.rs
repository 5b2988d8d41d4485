//! The manager's runtime: one actor task owns the state and the journal. gRPC stream handlers turn
//! frames into commands; the actor applies a batch of commands, journals their entries with one
//! fsync (group commit), and only then sends what they produce (acknowledgments, deliveries,
//! responses). Nothing is acknowledged before it is durable.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use baton_mesh::proto::v1 as pb;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::failover::{InSync, PublishError, Publisher};
use crate::journal::{AckOp, BindOp, Entry, Journal, Op, OpenOp, ReplyOp, RequestOp};
use crate::state::State;

/// The manager's options.
#[derive(clap::Args, Debug, Clone)]
pub struct ManagerOptions {
    /// Where the journal and snapshot are kept.
    #[arg(long, env = "BATON_JOURNAL_DIR", default_value = "./baton-journal")]
    pub journal_dir: PathBuf,

    /// How long a lost server session keeps its sessions before they move to another server.
    #[arg(long, env = "BATON_SERVER_GRACE", default_value = "2s", value_parser = baton_mesh::config::parse_duration)]
    pub server_grace: Duration,

    /// Journal entries between snapshots (which truncate the journal).
    #[arg(long, env = "BATON_SNAPSHOT_EVERY", default_value_t = 100_000,
          value_parser = clap::value_parser!(u64).range(10..))]
    pub snapshot_every: u64,

    /// etcd endpoints (comma-separated). With them the manager runs as primary or standby,
    /// elected through etcd; without them it runs alone.
    #[arg(long = "etcd", env = "BATON_ETCD_ENDPOINTS", value_delimiter = ',')]
    pub etcd: Vec<String>,

    /// The etcd election key every manager of one cluster campaigns on.
    #[arg(long, env = "BATON_ELECTION_KEY", default_value = "/baton/manager")]
    pub election_key: String,

    /// The TTL of the election lease, whole seconds: etcd grants at least its minimum (2s with
    /// its default timings, 1s with `--heartbeat-interval 10 --election-timeout 100`).
    #[arg(long, env = "BATON_LEASE_TTL", default_value = "2s", value_parser = baton_mesh::config::parse_duration)]
    pub lease_ttl: Duration,

    /// The address other managers and clients reach this one at (`http://host:port`); published
    /// as the election value. Defaults to `http://` and the listen address.
    #[arg(long, env = "BATON_ADVERTISE")]
    pub advertise: Option<String>,

    /// The mesh token callers must send (a standby sends it to the primary too).
    #[command(flatten)]
    pub mesh: baton_mesh::config::MeshToken,
}

impl ManagerOptions {
    /// Options for one manager without etcd, journaling in `journal_dir`.
    pub fn single(journal_dir: PathBuf) -> Self {
        Self {
            journal_dir,
            server_grace: Duration::from_secs(2),
            snapshot_every: 100_000,
            etcd: Vec::new(),
            election_key: "/baton/manager".into(),
            lease_ttl: Duration::from_secs(2),
            advertise: None,
            mesh: Default::default(),
        }
    }
}

/// How close (in journal entries) a catching-up standby must be for the primary to wait briefly
/// for it to join the in-sync set.
const CATCH_UP_WINDOW: u64 = 4096;

/// The metadata key of the leader's address in a standby's UNAVAILABLE answers.
pub const LEADER_METADATA: &str = "x-baton-leader";

type ClientTx = Out<pb::ClientEvent>;
type ServerTx = Out<pb::ServerEvent>;

/// A Multiplex stream's sending side: the actor sends it one batch of events per journal batch.
#[derive(Clone)]
struct Mux {
    /// Tells the streams apart when the actor groups a batch's events by stream.
    id: u64,
    tx: mpsc::Sender<Result<pb::MuxEvents, Status>>,
}

impl Mux {
    /// Closes `channel` with `status` at once (not batched).
    fn close(&self, channel: u64, status: &Status) {
        let _ = self.tx.try_send(Ok(pb::MuxEvents { events: vec![closed_event(channel, status)] }));
    }
}

/// The event that closes `channel` with `status` (and the leader a standby names).
fn closed_event(channel: u64, status: &Status) -> pb::MuxEvent {
    let leader = status.metadata().get(LEADER_METADATA).and_then(|v| v.to_str().ok()).unwrap_or_default();
    pb::MuxEvent {
        channel,
        kind: Some(pb::mux_event::Kind::Closed(pb::ChannelClosed {
            code: status.code() as i32,
            message: status.message().to_owned(),
            leader: leader.to_owned(),
        })),
    }
}

/// A client or server session's event as a Multiplex event.
trait MuxKind {
    fn into_mux(self) -> pb::mux_event::Kind;
}

impl MuxKind for pb::ClientEvent {
    fn into_mux(self) -> pb::mux_event::Kind {
        pb::mux_event::Kind::Client(self)
    }
}

impl MuxKind for pb::ServerEvent {
    fn into_mux(self) -> pb::mux_event::Kind {
        pb::mux_event::Kind::Server(self)
    }
}

/// Where a session's events go: its own stream (ClientSession, ServerSession), or a channel of a
/// Multiplex stream.
enum Out<E> {
    Stream(mpsc::Sender<Result<E, Status>>),
    Channel { mux: Mux, channel: u64 },
}

impl<E: MuxKind> Out<E> {
    /// Ends the stream or channel with `status` at once.
    fn close(&self, status: Status) {
        match self {
            Out::Stream(tx) => {
                let _ = tx.try_send(Err(status));
            }
            Out::Channel { mux, channel } => mux.close(*channel, &status),
        }
    }

    /// Ends the stream (by dropping its sender) or closes the channel with `status`.
    fn end(self, status: &Status) {
        if let Out::Channel { mux, channel } = self {
            mux.close(channel, status);
        }
    }

    /// Sends `event` now (a stream), or adds it to its Multiplex stream's batch (sent by
    /// [`Batches::send`]).
    async fn send(&self, event: E, batches: &mut Batches) {
        match self {
            Out::Stream(tx) => {
                let _ = tx.send(Ok(event)).await;
            }
            Out::Channel { mux, channel } => {
                batches.push(mux, pb::MuxEvent { channel: *channel, kind: Some(event.into_mux()) }).await;
            }
        }
    }
}

/// A journal batch's events for Multiplex streams, one message per stream (a process has one
/// stream per manager, so there are few).
#[derive(Default)]
struct Batches(Vec<(Mux, Vec<pb::MuxEvent>, usize)>);

/// At most this many bytes of events go in one Multiplex message (tonic refuses messages over
/// 4 MiB).
const MAX_BATCH_BYTES: usize = 1 << 20;

impl Batches {
    /// Adds `event` to its stream's batch; a batch that would pass [`MAX_BATCH_BYTES`] is sent
    /// first.
    async fn push(&mut self, mux: &Mux, event: pb::MuxEvent) {
        let at = match self.0.iter().position(|(m, _, _)| m.id == mux.id) {
            Some(at) => at,
            None => {
                self.0.push((mux.clone(), Vec::new(), 0));
                self.0.len() - 1
            }
        };
        let (_, events, bytes) = &mut self.0[at];
        let size = prost::Message::encoded_len(&event);
        if *bytes + size > MAX_BATCH_BYTES && !events.is_empty() {
            let _ = mux.tx.send(Ok(pb::MuxEvents { events: std::mem::take(events) })).await;
            *bytes = 0;
        }
        events.push(event);
        *bytes += size;
    }

    /// Sends every stream its batch.
    async fn send(self) {
        for (mux, events, _) in self.0 {
            let _ = mux.tx.send(Ok(pb::MuxEvents { events })).await;
        }
    }
}

enum Command {
    ClientOpen {
        open: pb::OpenSession,
        conn: u64,
        tx: ClientTx,
        reply: oneshot::Sender<Result<String, Status>>,
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
        reply: oneshot::Sender<Vec<pb::SessionInfo>>,
    },
    Tick,
    ReplicaConnect {
        node: String,
        journal_id: String,
        tx: mpsc::Sender<Result<pb::ReplicaFrame, Status>>,
        acked: tokio::sync::watch::Receiver<u64>,
    },
    ReplicaApply {
        frame: pb::ReplicaFrame,
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

struct ReplicaConn {
    tx: mpsc::Sender<Result<pb::ReplicaFrame, Status>>,
    acked: tokio::sync::watch::Receiver<u64>,
}

/// Something to send once the batch that produced it is durable.
enum Effect {
    Client(String, pb::client_event::Kind),
    Server(String, pb::server_event::Kind),
}

struct ServerConn {
    conn: u64,
    pool: String,
    tx: ServerTx,
}

struct Actor {
    term: u64,
    state: State,
    journal: Journal,
    options: ManagerOptions,
    clients: HashMap<String, (u64, ClientTx)>,
    servers: HashMap<String, ServerConn>,
    /// The Multiplex streams, held open while this manager serves them.
    muxes: HashMap<u64, Mux>,
    /// Servers whose stream broke, and when: their sessions move after the grace.
    lost: HashMap<String, Instant>,
    pending: Vec<Entry>,
    effects: Vec<Effect>,
    primary: bool,
    leader: String,
    node_id: String,
    replicas: HashMap<String, ReplicaConn>,
    in_sync: std::collections::BTreeSet<String>,
    /// The journal id of each standby as it connected (and this manager's own): the in-sync set
    /// names members with them.
    journal_ids: HashMap<String, String>,
    /// The in-sync set changed outside `sync_standbys` and must be published before anything
    /// more is acknowledged.
    set_changed: bool,
    /// The writer of the in-sync set for this primary's term (None: a standby, or no etcd).
    publisher: Option<Publisher>,
    /// How long an in-sync standby may take to make a batch durable before it leaves the set.
    standby_timeout: Duration,
    /// Cancelled, with `failure` saying why, when this manager must step down: its journal
    /// cannot be written, or a set write found it deposed.
    failed: CancellationToken,
    failure: Arc<std::sync::Mutex<Option<String>>>,
    /// The highest term seen in replicated frames (a standby refuses older ones).
    seen_term: u64,
    /// How many times this manager was elected primary.
    epoch: u64,
}

impl Actor {
    fn not_primary(&self) -> Status {
        let mut status = Status::unavailable(if self.leader.is_empty() {
            "this manager is a standby and knows no primary yet".to_owned()
        } else {
            format!("this manager is a standby; the primary is {}", self.leader)
        });
        if let Ok(value) = self.leader.parse() {
            status.metadata_mut().insert(LEADER_METADATA, value);
        }
        status
    }

    fn journal(&mut self, op: Op) {
        let entry = Entry { index: self.state.index + 1, term: self.term, op: Some(op) };
        self.state.apply(&entry);
        self.pending.push(entry);
    }

    fn new_session_id() -> String {
        format!("ses_{}", hex::encode(rand::random::<[u8; 8]>()))
    }

    /// Binds a session to the connected server of its pool with the fewest sessions, if any.
    fn bind(&mut self, session_id: &str) {
        let Some(pool) = self.state.sessions.get(session_id).map(|s| s.pool.clone()) else { return };
        let mut load: HashMap<&str, usize> = HashMap::new();
        for s in self.state.sessions.values() {
            if let Some(b) = &s.bound {
                *load.entry(b.as_str()).or_default() += 1;
            }
        }
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

    fn handle(&mut self, command: Command) {
        if !self.primary {
            match command {
                Command::ClientOpen { reply, .. } => {
                    let _ = reply.send(Err(self.not_primary()));
                    return;
                }
                Command::ServerRegister { tx, .. } => {
                    tx.close(self.not_primary());
                    return;
                }
                Command::ReplicaConnect { tx, .. } => {
                    let _ = tx.try_send(Err(self.not_primary()));
                    return;
                }
                Command::ClientRequest { .. } | Command::ClientAck { .. } | Command::ServerReply { .. } => return,
                other => return self.handle_any(other),
            }
        }
        self.handle_any(command)
    }

    fn handle_any(&mut self, command: Command) {
        match command {
            Command::ClientOpen { open, conn, tx, reply } => {
                if open.seen_term > self.term {
                    let _ = reply.send(Err(Status::failed_precondition(format!(
                        "this manager's term {} is older than the term {} the client has seen",
                        self.term, open.seen_term
                    ))));
                    return;
                }
                let session_id = if open.session_id.is_empty() {
                    if open.pool.is_empty() {
                        let _ = reply.send(Err(Status::invalid_argument("open.pool is required")));
                        return;
                    }
                    let id = Self::new_session_id();
                    self.journal(Op::Open(OpenOp {
                        session_id: id.clone(),
                        pool: open.pool.clone(),
                        restart_data: open.restart_data.clone(),
                        last_request_seq: 0,
                    }));
                    id
                } else {
                    let Some(s) = self.state.sessions.get(&open.session_id) else {
                        let _ = reply.send(Err(Status::not_found(format!("session {} not found", open.session_id))));
                        return;
                    };
                    let pool = s.pool.clone();
                    if !open.restart_data.is_empty() {
                        self.journal(Op::Open(OpenOp {
                            session_id: open.session_id.clone(),
                            pool,
                            restart_data: open.restart_data.clone(),
                            last_request_seq: 0,
                        }));
                    }
                    open.session_id.clone()
                };
                if let Some((_, old)) = self.clients.insert(session_id.clone(), (conn, tx)) {
                    old.end(&Status::aborted("the session was opened again on another stream"));
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
                let _ = reply.send(Ok(session_id));
            }
            Command::ClientRequest { session, conn, request } => {
                if self.clients.get(&session).is_none_or(|(c, _)| *c != conn) {
                    return;
                }
                let Some(s) = self.state.sessions.get(&session) else { return };
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
                        tx.close(Status::failed_precondition(format!(
                            "request {} after {last}: requests are numbered without gaps",
                            request.seq
                        )));
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
            Command::ClientAck { session, seq } => {
                if self.state.sessions.get(&session).is_some_and(|s| s.responses.contains_key(&seq)) {
                    self.journal(Op::Ack(AckOp { session_id: session, seq }));
                }
            }
            Command::ClientGone { session, conn } => {
                if self.clients.get(&session).is_some_and(|(c, _)| *c == conn) {
                    self.clients.remove(&session);
                }
            }
            Command::ServerRegister { register, conn, tx } => {
                if register.seen_term > self.term || register.pool.is_empty() || register.server_id.is_empty() {
                    tx.close(Status::failed_precondition(
                        "register needs a pool and a server id, and a term not newer than this manager's",
                    ));
                    return;
                }
                let id = register.server_id.clone();
                self.lost.remove(&id);
                if let Some(old) = self.servers.insert(id.clone(), ServerConn { conn, pool: register.pool.clone(), tx })
                {
                    old.tx.end(&Status::aborted("the server registered again on another stream"));
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
            Command::ServerReply { server, conn, reply } => {
                if self.servers.get(&server).is_none_or(|c| c.conn != conn) {
                    return;
                }
                let Some(s) = self.state.sessions.get(&reply.session_id) else { return };
                if s.bound.as_deref() != Some(server.as_str()) {
                    return; // the session moved: a stale reply
                }
                let queued = s.requests.contains_key(&reply.seq);
                if queued {
                    self.journal(Op::Reply(ReplyOp {
                        session_id: reply.session_id.clone(),
                        seq: reply.seq,
                        payload: reply.payload.clone(),
                        restart_data: reply.restart_data.clone(),
                    }));
                    if self.clients.contains_key(&reply.session_id) {
                        self.effects.push(Effect::Client(
                            reply.session_id.clone(),
                            pb::client_event::Kind::Response(pb::SessionResponse {
                                seq: reply.seq,
                                payload: reply.payload,
                            }),
                        ));
                    }
                }
                self.effects.push(Effect::Server(
                    server,
                    pb::server_event::Kind::Accepted(pb::ReplyAccepted {
                        session_id: reply.session_id,
                        seq: reply.seq,
                    }),
                ));
            }
            Command::MuxOpen { mux } => {
                self.muxes.insert(mux.id, mux);
            }
            Command::MuxGone { id } => {
                self.muxes.remove(&id);
            }
            Command::ServerGone { server, conn } => {
                if self.servers.get(&server).is_some_and(|c| c.conn == conn) {
                    self.servers.remove(&server);
                    self.lost.insert(server, Instant::now());
                }
            }
            Command::Status { reply } => {
                let lag = self
                    .replicas
                    .values()
                    .map(|r| self.state.index.saturating_sub(*r.acked.borrow()))
                    .max()
                    .unwrap_or(0);
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
            Command::Sessions { reply } => {
                let mut list: Vec<_> = self
                    .state
                    .sessions
                    .values()
                    .map(|s| pb::SessionInfo {
                        session_id: s.id.clone(),
                        pool: s.pool.clone(),
                        bound_server: s.bound.clone().unwrap_or_default(),
                        client_connected: self.clients.contains_key(&s.id),
                        request_queue: s.requests.len() as u64,
                        response_queue: s.responses.len() as u64,
                        last_request_seq: s.last_request_seq,
                        client_restart_bytes: s.client_restart.len() as u64,
                        server_restart_bytes: s.server_restart.len() as u64,
                    })
                    .collect();
                list.sort_by(|a, b| a.session_id.cmp(&b.session_id));
                let _ = reply.send(list);
            }
            Command::ReplicaConnect { node, journal_id, tx, acked } => {
                if self.in_sync.contains(&node) && self.journal_ids.get(&node) != Some(&journal_id) {
                    // a member back on another journal (a wiped disk): it leaves the set, which
                    // is published before anything more is acknowledged, and joins again once
                    // it has caught up
                    tracing::warn!(%node, %journal_id, "an in-sync standby is back on another journal");
                    self.in_sync.remove(&node);
                    self.set_changed = true;
                }
                self.journal_ids.insert(node.clone(), journal_id);
                // a snapshot of the state first: the standby drops whatever else it had
                let records = crate::journal::encode_records(&self.state.to_entries()).into();
                let frame = pb::ReplicaFrame { term: self.term, reset: true, records };
                if tx.try_send(Ok(frame)).is_ok() {
                    tracing::info!(%node, index = self.state.index, "standby connected");
                    self.replicas.insert(node, ReplicaConn { tx, acked });
                }
            }
            Command::ReplicaApply { frame, done } => {
                if self.primary || frame.term < self.seen_term {
                    let _ = done.send(Err(Status::failed_precondition(format!(
                        "refusing entries of term {} (seen term {}, primary {})",
                        frame.term, self.seen_term, self.primary
                    ))));
                    return;
                }
                self.seen_term = frame.term;
                self.term = self.term.max(frame.term);
                let entries = match crate::journal::decode_records(&frame.records) {
                    Ok(entries) => entries,
                    Err(e) => {
                        let _ = done.send(Err(Status::data_loss(format!("replicated entries: {e}"))));
                        return;
                    }
                };
                let journal = &mut self.journal;
                if frame.reset {
                    let mut state = State::default();
                    for e in &entries {
                        state.apply(e);
                    }
                    let written = tokio::task::block_in_place(|| journal.snapshot(&entries, true));
                    if written.is_ok() {
                        self.state = state;
                    }
                    let _ = done.send(written.map(|()| self.state.index).map_err(|e| Status::internal(e.to_string())));
                    return;
                }
                // the entries as the primary encoded them; acknowledged as soon as they are
                // durable, applied to the state after
                let durable = entries.iter().map(|e| e.index).fold(self.state.index, u64::max);
                let written =
                    tokio::task::block_in_place(|| journal.append_records(&frame.records, entries.len() as u64));
                let applied = written.is_ok();
                let _ = done.send(written.map(|()| durable).map_err(|e| Status::internal(e.to_string())));
                if applied {
                    for e in &entries {
                        self.state.apply(e);
                    }
                }
            }
            Command::BecomePrimary { term, publisher, done } => {
                tracing::info!(term, index = self.state.index, "primary");
                self.epoch += 1;
                self.primary = true;
                self.term = term;
                self.publisher = publisher;
                self.leader.clear();
                self.in_sync = [self.node_id.clone()].into();
                self.journal_ids = [(self.node_id.clone(), self.journal.id().to_owned())].into();
                self.set_changed = false;
                // servers reconnect to the new primary; those that do not lose their sessions
                self.lost =
                    self.state.sessions.values().filter_map(|s| s.bound.clone()).map(|b| (b, Instant::now())).collect();
                let _ = done.send(());
            }
            Command::BecomeStandby { epoch: Some(epoch), .. } if epoch != self.epoch => {}
            Command::BecomeStandby { leader, .. } => {
                if self.primary {
                    tracing::warn!("no longer primary: closing every stream");
                }
                self.primary = false;
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
                // and the Multiplex streams end once their channels' events are out
                self.muxes.clear();
                self.replicas.clear();
                self.effects.clear();
            }
            Command::Tick if !self.primary => {}
            Command::Tick => {
                let grace = self.options.server_grace;
                let expired: Vec<String> =
                    self.lost.iter().filter(|(_, at)| at.elapsed() >= grace).map(|(id, _)| id.clone()).collect();
                for server in expired {
                    self.lost.remove(&server);
                    let moving: Vec<String> = self
                        .state
                        .sessions
                        .values()
                        .filter(|s| s.bound.as_deref() == Some(server.as_str()))
                        .map(|s| s.id.clone())
                        .collect();
                    for session in moving {
                        tracing::info!(%session, %server, "server lost past its grace: moving the session");
                        self.journal(Op::Bind(BindOp { session_id: session.clone(), server_id: String::new() }));
                        self.bind(&session);
                    }
                }
            }
        }
    }

    /// Makes the batch durable, then sends what it produced.
    async fn flush(&mut self) -> Result<(), crate::journal::Error> {
        let replicated = !self.pending.is_empty();
        if !self.pending.is_empty() {
            let entries = std::mem::take(&mut self.pending);
            // encoded once, for the journal and the standbys
            let records: prost::bytes::Bytes = crate::journal::encode_records(&entries).into();
            let snapshot = (self.journal.since_snapshot + entries.len() as u64 >= self.options.snapshot_every)
                .then(|| self.state.to_entries());
            // The standby gets the batch before the local fsync, so the two fsyncs overlap: nothing
            // is acknowledged until both are durable, and a standby that takes over with entries
            // this manager never made durable holds requests nobody was told were accepted
            // (their senders send them again, and they are acknowledged then).
            if self.primary && !self.replicas.is_empty() {
                let frame = pb::ReplicaFrame { term: self.term, reset: false, records: records.clone() };
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
}

impl Actor {
    /// Sync mode: waits until every in-sync standby has made the journal durable up to here; a
    /// standby that does not within a second leaves the in-sync set, which is published before
    /// anything is acknowledged without it. Standbys that caught up join the set.
    async fn sync_standbys(&mut self) {
        let last = self.state.index;
        let mut changed = std::mem::take(&mut self.set_changed);
        let members: Vec<String> = self.in_sync.iter().filter(|n| **n != self.node_id).cloned().collect();
        for node in members {
            let ok = match self.replicas.get(&node) {
                Some(r) => {
                    let mut acked = r.acked.clone();
                    matches!(
                        tokio::time::timeout(self.standby_timeout, acked.wait_for(|i| *i >= last)).await,
                        Ok(Ok(_))
                    )
                }
                None => false,
            };
            if !ok {
                tracing::warn!(%node, index = last, "standby fell behind: leaving the in-sync set");
                self.in_sync.remove(&node);
                self.replicas.remove(&node);
                changed = true;
            }
        }
        for (node, r) in &self.replicas {
            if self.in_sync.contains(node) {
                continue;
            }
            // Under steady load a catching-up standby is always one batch behind at this moment:
            // when it is close, give it a moment to ack the batch just sent.
            let acked = *r.acked.borrow();
            let caught_up = acked >= last
                || (last - acked <= CATCH_UP_WINDOW && {
                    let mut acked = r.acked.clone();
                    matches!(
                        tokio::time::timeout(Duration::from_millis(50), acked.wait_for(|i| *i >= last)).await,
                        Ok(Ok(_))
                    )
                });
            if caught_up {
                tracing::info!(%node, index = last, "standby caught up: joining the in-sync set");
                self.in_sync.insert(node.clone());
                changed = true;
            }
        }
        if changed && let Some(publish) = self.publisher.clone() {
            let members: Vec<String> = self.in_sync.iter().cloned().collect();
            let journals = members.iter().filter_map(|m| Some((m.clone(), self.journal_ids.get(m)?.clone()))).collect();
            let set = InSync { term: self.term, members, journals, index: last };
            // nothing is acknowledged until the set is published (or the lease watchdog fences,
            // or the actor is found stalled)
            loop {
                match publish(set.clone()).await {
                    Ok(()) => break,
                    Err(PublishError::Deposed) => {
                        self.fail(format!("deposed: the in-sync set write of term {} was refused", self.term));
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot publish the in-sync set; retrying");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
    }

    /// Stops serving for good: nothing more is acknowledged, every stream is closed, and the
    /// manager's `failed` token tells the process to step down (`failover::step_down_on_fault`).
    fn fail(&mut self, why: String) {
        tracing::error!(reason = %why, "the manager stops serving");
        self.handle_any(Command::BecomeStandby { leader: String::new(), epoch: None });
        *self.failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
        self.failed.cancel();
    }
}

/// The SessionManager gRPC service; cheap to clone.
#[derive(Clone)]
pub struct ManagerService {
    commands: mpsc::Sender<Command>,
    next_conn: Arc<AtomicU64>,
    /// Cancelled when the manager must step down (see `Actor::fail`).
    failed: CancellationToken,
    failure: Arc<std::sync::Mutex<Option<String>>>,
    /// The etcd lease the election holds now (0: none), given up on a local fault.
    lease: Arc<AtomicI64>,
    /// The journal directory's id.
    journal_id: Arc<str>,
}

impl ManagerService {
    /// Opens the journal, replays it, and starts the actor (until `shutdown`).
    pub fn start(options: ManagerOptions, shutdown: CancellationToken) -> Result<Self, crate::Error> {
        Self::start_with(options, String::new(), false, shutdown)
    }

    /// Starts a manager; `elected` (etcd mode): it starts as a standby named `node_id`, and the
    /// failover task makes it primary.
    pub fn start_with(
        options: ManagerOptions,
        node_id: String,
        elected: bool,
        shutdown: CancellationToken,
    ) -> Result<Self, crate::Error> {
        let (journal, replay) = Journal::open(&options.journal_dir)?;
        let journal_id: Arc<str> = journal.id().into();
        let single = !elected;
        let term = if single { journal.next_term()? } else { 0 };
        let mut state = State::default();
        for entry in &replay {
            state.apply(entry);
        }
        tracing::info!(term, entries = replay.len(), sessions = state.sessions.len(), "manager journal replayed");
        // Servers are not connected after a restart: sessions bound to one that does not come back
        // within the grace move to another.
        let lost: HashMap<String, Instant> =
            state.sessions.values().filter_map(|s| s.bound.clone()).map(|b| (b, Instant::now())).collect();
        let (tx, mut rx) = mpsc::channel::<Command>(4096);
        let (failed, failure) = (CancellationToken::new(), Arc::new(std::sync::Mutex::new(None)));
        // an in-sync standby gets a second, or half the lease when that is shorter: the primary
        // must be able to shrink the set and go on well before its lease is in doubt
        let options_standby_timeout = Duration::from_secs(1).min(options.lease_ttl / 2);
        let mut actor = Actor {
            term,
            state,
            journal,
            options,
            clients: HashMap::new(),
            servers: HashMap::new(),
            muxes: HashMap::new(),
            lost,
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
            standby_timeout: options_standby_timeout,
            failed: failed.clone(),
            failure: failure.clone(),
            seen_term: 0,
            epoch: 0,
        };
        if !single {
            actor.term = actor.state.term;
        }
        let ticker = tx.clone();
        let tick_shutdown = shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = tick_shutdown.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
                if ticker.send(Command::Tick).await.is_err() {
                    return;
                }
            }
        });
        tokio::spawn(async move {
            loop {
                let command = tokio::select! {
                    () = shutdown.cancelled() => return,
                    c = rx.recv() => match c { Some(c) => c, None => return },
                };
                actor.handle(command);
                // group commit: everything already queued joins this batch
                for _ in 0..1024 {
                    match rx.try_recv() {
                        Ok(c) => actor.handle(c),
                        Err(_) => break,
                    }
                }
                if let Err(e) = actor.flush().await {
                    // A journal that cannot be written must not acknowledge anything more.
                    actor.fail(format!("journal write failed: {e}"));
                    return;
                }
                if actor.failed.is_cancelled() {
                    return;
                }
            }
        });
        Ok(Self {
            commands: tx,
            next_conn: Arc::new(AtomicU64::new(1)),
            failed,
            failure,
            lease: Default::default(),
            journal_id,
        })
    }

    async fn command(&self, command: Command) -> Result<(), Status> {
        self.commands.send(command).await.map_err(|_| Status::unavailable("the manager is stopping"))
    }

    /// Makes this manager the primary of `term`; `publisher` writes the in-sync set for it.
    pub async fn become_primary(&self, term: u64, publisher: Option<Publisher>) -> Result<(), Status> {
        let (done, rx) = oneshot::channel();
        self.command(Command::BecomePrimary { term, publisher, done }).await?;
        rx.await.map_err(|_| Status::unavailable("the manager is stopping"))
    }

    /// Makes this manager a standby of `leader` (empty when unknown): it stops acknowledging and
    /// closes every client, server and standby stream.
    pub async fn become_standby(&self, leader: String) -> Result<(), Status> {
        self.command(Command::BecomeStandby { leader, epoch: None }).await
    }

    /// Follows `leader` as a standby, unless this manager has been elected since `epoch` (the
    /// number of elections it had won when the caller looked the leader up).
    pub async fn follow_leader(&self, leader: String, epoch: u64) -> Result<(), Status> {
        self.command(Command::BecomeStandby { leader, epoch: Some(epoch) }).await
    }

    /// Applies a frame from the primary; returns the durable index.
    pub async fn replica_apply(&self, frame: pb::ReplicaFrame) -> Result<u64, Status> {
        let (done, rx) = oneshot::channel();
        self.command(Command::ReplicaApply { frame, done }).await?;
        rx.await.map_err(|_| Status::unavailable("the manager is stopping"))?
    }

    /// Cancelled when this manager must step down: its journal cannot be written, or it found
    /// itself deposed ([`ManagerService::failure`] says why).
    pub fn failed(&self) -> CancellationToken {
        self.failed.clone()
    }

    /// Why the manager failed, once it has.
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The id of this manager's journal directory (see `Journal::identify`).
    pub fn journal_id(&self) -> &str {
        &self.journal_id
    }

    /// The etcd lease the election holds now (0: none): the failover task keeps it here, so
    /// that a local fault gives it up.
    pub fn lease_slot(&self) -> Arc<AtomicI64> {
        self.lease.clone()
    }

    /// The manager's status.
    pub async fn current_status(&self) -> Result<pb::ManagerStatus, Status> {
        let (reply, rx) = oneshot::channel();
        self.command(Command::Status { reply }).await?;
        rx.await.map_err(|_| Status::unavailable("the manager is stopping"))
    }
}

/// A channel of a Multiplex stream, once opened: the session or server it carries, and its
/// connection number (as a stream of its own would have).
enum Channel {
    Client { session: String, conn: u64 },
    Server { server: String, conn: u64 },
}

/// The command a client session's frame after its first gives (None: a frame that gives none).
fn client_command(session: &str, conn: u64, frame: pb::ClientFrame) -> Option<Command> {
    match frame.kind? {
        pb::client_frame::Kind::Request(request) => {
            Some(Command::ClientRequest { session: session.to_owned(), conn, request })
        }
        pb::client_frame::Kind::Ack(ack) => Some(Command::ClientAck { session: session.to_owned(), seq: ack.seq }),
        pb::client_frame::Kind::Open(_) => None,
    }
}

/// The command a server session's frame after its first gives (None: a frame that gives none).
fn server_command(server: &str, conn: u64, frame: pb::ServerFrame) -> Option<Command> {
    match frame.kind? {
        pb::server_frame::Kind::Reply(reply) => Some(Command::ServerReply { server: server.to_owned(), conn, reply }),
        pb::server_frame::Kind::Register(_) => None,
    }
}

impl Channel {
    /// The command that says the channel's session or server has gone.
    fn gone(self) -> Command {
        match self {
            Channel::Client { session, conn } => Command::ClientGone { session, conn },
            Channel::Server { server, conn } => Command::ServerGone { server, conn },
        }
    }
}

impl ManagerService {
    /// Turns a Multiplex stream's frames into the commands that a ClientSession or ServerSession
    /// stream per channel would give, until the stream ends; then every channel's session or
    /// server is gone.
    ///
    /// It holds the stream's sender weakly: the actor holds it open, so that when the actor stops
    /// (or becomes a standby) the stream ends at once, even while its caller sends nothing.
    async fn demultiplex(
        &self,
        frames: &mut Streaming<pb::MuxFrames>,
        id: u64,
        weak: mpsc::WeakSender<Result<pb::MuxEvents, Status>>,
    ) {
        use pb::mux_frame::Kind;
        let mut channels: HashMap<u64, Channel> = HashMap::new();
        'stream: while let Some(Ok(batch)) = frames.next().await {
            let Some(tx) = weak.upgrade() else { break };
            let mux = Mux { id, tx };
            for frame in batch.frames {
                let channel = frame.channel;
                let command = match (channels.get(&channel), frame.kind) {
                    (_, Some(Kind::Close(_))) => match channels.remove(&channel) {
                        Some(open) => open.gone(),
                        None => continue,
                    },
                    (None, Some(Kind::Client(pb::ClientFrame { kind: Some(pb::client_frame::Kind::Open(open)) }))) => {
                        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
                        let (reply, opened) = oneshot::channel();
                        let tx = Out::Channel { mux: mux.clone(), channel };
                        if self.command(Command::ClientOpen { open, conn, tx, reply }).await.is_err() {
                            break 'stream;
                        }
                        match opened.await {
                            Ok(Ok(session)) => {
                                channels.insert(channel, Channel::Client { session, conn });
                            }
                            Ok(Err(status)) => mux.close(channel, &status),
                            Err(_) => break 'stream,
                        }
                        continue;
                    }
                    (
                        None,
                        Some(Kind::Server(pb::ServerFrame { kind: Some(pb::server_frame::Kind::Register(register)) })),
                    ) => {
                        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
                        channels.insert(channel, Channel::Server { server: register.server_id.clone(), conn });
                        Command::ServerRegister { register, conn, tx: Out::Channel { mux: mux.clone(), channel } }
                    }
                    (None, _) => {
                        mux.close(
                            channel,
                            &Status::invalid_argument(
                                "the first frame of a channel must open a client session or register a server",
                            ),
                        );
                        continue;
                    }
                    (Some(Channel::Client { session, conn }), Some(Kind::Client(frame))) => {
                        let Some(command) = client_command(session, *conn, frame) else { continue };
                        command
                    }
                    (Some(Channel::Server { server, conn }), Some(Kind::Server(frame))) => {
                        let Some(command) = server_command(server, *conn, frame) else { continue };
                        command
                    }
                    _ => continue,
                };
                if self.command(command).await.is_err() {
                    break 'stream;
                }
            }
        }
        for (_, open) in channels {
            let _ = self.command(open.gone()).await;
        }
        let _ = self.command(Command::MuxGone { id }).await;
    }
}

type EventStream<T> = std::pin::Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl pb::session_manager_server::SessionManager for ManagerService {
    type ClientSessionStream = EventStream<pb::ClientEvent>;

    async fn client_session(
        &self,
        request: Request<Streaming<pb::ClientFrame>>,
    ) -> Result<Response<Self::ClientSessionStream>, Status> {
        let mut frames = request.into_inner();
        let Some(first) = frames.next().await else { return Err(Status::invalid_argument("no open frame")) };
        let Some(pb::client_frame::Kind::Open(open)) = first?.kind else {
            return Err(Status::invalid_argument("the first frame must be open"));
        };
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(1024);
        let (reply, opened) = oneshot::channel();
        self.command(Command::ClientOpen { open, conn, tx: Out::Stream(tx), reply }).await?;
        let session = opened.await.map_err(|_| Status::unavailable("the manager is stopping"))??;
        let commands = self.commands.clone();
        tokio::spawn(async move {
            while let Some(Ok(frame)) = frames.next().await {
                if let Some(command) = client_command(&session, conn, frame)
                    && commands.send(command).await.is_err()
                {
                    return;
                }
            }
            let _ = commands.send(Channel::Client { session, conn }.gone()).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type ServerSessionStream = EventStream<pb::ServerEvent>;

    async fn server_session(
        &self,
        request: Request<Streaming<pb::ServerFrame>>,
    ) -> Result<Response<Self::ServerSessionStream>, Status> {
        let mut frames = request.into_inner();
        let Some(first) = frames.next().await else { return Err(Status::invalid_argument("no register frame")) };
        let Some(pb::server_frame::Kind::Register(register)) = first?.kind else {
            return Err(Status::invalid_argument("the first frame must be register"));
        };
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let server = register.server_id.clone();
        let (tx, rx) = mpsc::channel(1024);
        self.command(Command::ServerRegister { register, conn, tx: Out::Stream(tx) }).await?;
        let commands = self.commands.clone();
        tokio::spawn(async move {
            while let Some(Ok(frame)) = frames.next().await {
                if let Some(command) = server_command(&server, conn, frame)
                    && commands.send(command).await.is_err()
                {
                    return;
                }
            }
            let _ = commands.send(Channel::Server { server, conn }.gone()).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type MultiplexStream = EventStream<pb::MuxEvents>;

    async fn multiplex(
        &self,
        request: Request<Streaming<pb::MuxFrames>>,
    ) -> Result<Response<Self::MultiplexStream>, Status> {
        let mut frames = request.into_inner();
        let (tx, rx) = mpsc::channel(1024);
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let weak = tx.downgrade();
        self.command(Command::MuxOpen { mux: Mux { id, tx } }).await?;
        let service = self.clone();
        tokio::spawn(async move { service.demultiplex(&mut frames, id, weak).await });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type ReplicateStream = EventStream<pb::ReplicaFrame>;

    async fn replicate(
        &self,
        request: Request<Streaming<pb::ReplicaAck>>,
    ) -> Result<Response<Self::ReplicateStream>, Status> {
        let mut acks = request.into_inner();
        let Some(first) = acks.next().await else { return Err(Status::invalid_argument("no first ack")) };
        let first = first?;
        if first.node_id.is_empty() {
            return Err(Status::invalid_argument("the first ack names the standby's node_id"));
        }
        let (tx, rx) = mpsc::channel(4096);
        let (acked_tx, acked) = tokio::sync::watch::channel(0u64);
        if first.journal_id.is_empty() {
            return Err(Status::invalid_argument("the first ack names the standby's journal_id"));
        }
        let (node, journal_id) = (first.node_id, first.journal_id);
        self.command(Command::ReplicaConnect { node, journal_id, tx, acked }).await?;
        tokio::spawn(async move {
            while let Some(Ok(ack)) = acks.next().await {
                acked_tx.send_replace(ack.durable_index);
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn status(&self, _request: Request<pb::ManagerStatusRequest>) -> Result<Response<pb::ManagerStatus>, Status> {
        let (reply, rx) = oneshot::channel();
        self.command(Command::Status { reply }).await?;
        Ok(Response::new(rx.await.map_err(|_| Status::unavailable("the manager is stopping"))?))
    }

    async fn list_sessions(
        &self,
        _request: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        let (reply, rx) = oneshot::channel();
        self.command(Command::Sessions { reply }).await?;
        Ok(Response::new(pb::ListSessionsResponse {
            sessions: rx.await.map_err(|_| Status::unavailable("the manager is stopping"))?,
        }))
    }

    async fn get_session(&self, request: Request<pb::GetSessionRequest>) -> Result<Response<pb::SessionInfo>, Status> {
        let id = request.into_inner().session_id;
        let (reply, rx) = oneshot::channel();
        self.command(Command::Sessions { reply }).await?;
        let sessions = rx.await.map_err(|_| Status::unavailable("the manager is stopping"))?;
        sessions
            .into_iter()
            .find(|s| s.session_id == id)
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("session {id} not found")))
    }
}
