//! The gRPC facade: the SessionManager service's handlers turn each stream's frames into the
//! actor's commands (a Multiplex stream's per channel), and hand back the actor's events.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use baton_mesh::proto::internal::v1 as internal;
use baton_mesh::proto::v1 as pb;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::ManagerService;
use super::actor::{Actor, Command};
use super::outbox::{Mux, Out};
use crate::Error;

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
        pb::client_frame::Kind::Close(close) => Some(Command::ClientClose { session: session.to_owned(), conn, close }),
        pb::client_frame::Kind::Open(_) => None,
    }
}

/// The command a server session's frame after its first gives (None: a frame that gives none).
fn server_command(server: &str, conn: u64, frame: pb::ServerFrame) -> Option<Command> {
    match frame.kind? {
        pb::server_frame::Kind::Reply(reply) => Some(Command::ServerReply { server: server.to_owned(), conn, reply }),
        pb::server_frame::Kind::Restart(restart) => {
            Some(Command::ServerRestart { server: server.to_owned(), conn, restart })
        }
        pb::server_frame::Kind::Register(_) => None,
    }
}

/// The next frame of a stream, or None once it has ended. A stream that breaks (a frame over the
/// message size limit, say) ends its answers with its status, so the caller learns why.
async fn next_frame<T, E>(frames: &mut Streaming<T>, answers: &mpsc::WeakSender<Result<E, Status>>) -> Option<T> {
    match frames.next().await? {
        Ok(frame) => Some(frame),
        Err(status) => {
            if let Some(tx) = answers.upgrade() {
                // never waits: a caller that does not read its answers does not hold this up
                let _ = tx.try_send(Err(status));
            }
            None
        }
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

/// Whether `frame` opens a channel not yet open: a client session's open or a server's
/// registration as its first frame.
fn opens(channels: &HashMap<u64, Channel>, frame: &pb::MuxFrame) -> bool {
    use pb::mux_frame::Kind;
    matches!(
        (channels.get(&frame.channel), &frame.kind),
        (None, Some(Kind::Client(pb::ClientFrame { kind: Some(pb::client_frame::Kind::Open(_)) })))
            | (None, Some(Kind::Server(pb::ServerFrame { kind: Some(pb::server_frame::Kind::Register(_)) })))
    )
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
        let mut channels: HashMap<u64, Channel> = HashMap::new();
        'stream: while let Some(batch) = next_frame(frames, &weak).await {
            let Some(tx) = weak.upgrade() else { break };
            let mux = Mux { id, tx };
            // a standby's refusals of this batch's opens, sent as one message
            let mut refused = Vec::new();
            for frame in batch.frames {
                let Some(command) = self.channel_command(&mut channels, &mux, frame, &mut refused) else { continue };
                if self.command(command).await.is_err() {
                    break 'stream;
                }
            }
            if !refused.is_empty() && mux.tx.send(Ok(pb::MuxEvents { events: refused })).await.is_err() {
                break;
            }
        }
        for (_, open) in channels {
            let _ = self.command(open.gone()).await;
        }
        let _ = self.command(Command::MuxGone { id }).await;
    }

    /// The command a frame of the Multiplex stream `mux` gives, as a stream of the channel's own
    /// would (None: none), opening or closing the channel in `channels`. A standby's refusal of
    /// an open goes to `refused`; a channel that does not start with an open is closed.
    fn channel_command(
        &self,
        channels: &mut HashMap<u64, Channel>,
        mux: &Mux,
        frame: pb::MuxFrame,
        refused: &mut Vec<pb::MuxEvent>,
    ) -> Option<Command> {
        use pb::mux_frame::Kind;
        let channel = frame.channel;
        if opens(channels, &frame)
            && channel != 0
            && let Some(status) = self.role.refusal()
        {
            refused.push(super::outbox::closed_event(channel, &status));
            return None;
        }
        let command = match (channels.get(&channel), frame.kind) {
            (_, Some(Kind::Close(_))) => channels.remove(&channel)?.gone(),
            (None, Some(Kind::Client(pb::ClientFrame { kind: Some(pb::client_frame::Kind::Open(open)) })))
                if channel != 0 =>
            {
                // the session's next frames are routed at once: a refused open closes
                // the channel, and the actor ignores them (their `conn` opened nothing)
                let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
                let fresh = open.session_id.is_empty();
                let session = if fresh { Actor::new_session_id() } else { open.session_id.clone() };
                channels.insert(channel, Channel::Client { session: session.clone(), conn });
                let tx = Out::Channel { mux: mux.clone(), channel };
                Command::ClientOpen { open, session, fresh, conn, tx, reply: None }
            }
            (None, Some(Kind::Server(pb::ServerFrame { kind: Some(pb::server_frame::Kind::Register(register)) })))
                if channel != 0 =>
            {
                let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
                channels.insert(channel, Channel::Server { server: register.server_id.clone(), conn });
                Command::ServerRegister { register, conn, tx: Out::Channel { mux: mux.clone(), channel } }
            }
            (None, _) if channel == 0 => {
                mux.close(
                    channel,
                    &Error::InvalidArgument("channel 0 is the manager's: number channels from 1").into(),
                );
                return None;
            }
            (None, _) => {
                mux.close(
                    channel,
                    &Error::InvalidArgument(
                        "the first frame of a channel must open a client session or register a server",
                    )
                    .into(),
                );
                return None;
            }
            (Some(Channel::Client { session, conn }), Some(Kind::Client(frame))) => {
                client_command(session, *conn, frame)?
            }
            (Some(Channel::Server { server, conn }), Some(Kind::Server(frame))) => {
                server_command(server, *conn, frame)?
            }
            _ => return None,
        };
        Some(command)
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
        let Some(first) = frames.next().await else { return Err(Error::InvalidArgument("no open frame").into()) };
        let Some(pb::client_frame::Kind::Open(open)) = first?.kind else {
            return Err(Error::InvalidArgument("the first frame must be open").into());
        };
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(1024);
        let answers = tx.downgrade();
        let (reply, opened) = oneshot::channel();
        let fresh = open.session_id.is_empty();
        let session = if fresh { Actor::new_session_id() } else { open.session_id.clone() };
        self.command(Command::ClientOpen { open, session, fresh, conn, tx: Out::Stream(tx), reply: Some(reply) })
            .await?;
        let session = opened.await.map_err(|_| Error::Stopping)??;
        let commands = self.commands.clone();
        tokio::spawn(async move {
            while let Some(frame) = next_frame(&mut frames, &answers).await {
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
        let Some(first) = frames.next().await else { return Err(Error::InvalidArgument("no register frame").into()) };
        let Some(pb::server_frame::Kind::Register(register)) = first?.kind else {
            return Err(Error::InvalidArgument("the first frame must be register").into());
        };
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let server = register.server_id.clone();
        let (tx, rx) = mpsc::channel(1024);
        let answers = tx.downgrade();
        self.command(Command::ServerRegister { register, conn, tx: Out::Stream(tx) }).await?;
        let commands = self.commands.clone();
        tokio::spawn(async move {
            while let Some(frame) = next_frame(&mut frames, &answers).await {
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

    async fn status(&self, _request: Request<pb::ManagerStatusRequest>) -> Result<Response<pb::ManagerStatus>, Status> {
        let (reply, rx) = oneshot::channel();
        self.command(Command::Status { reply }).await?;
        Ok(Response::new(rx.await.map_err(|_| Error::Stopping)?))
    }

    async fn list_sessions(
        &self,
        request: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        let (reply, rx) = oneshot::channel();
        self.command(Command::Sessions { request: request.into_inner(), reply }).await?;
        Ok(Response::new(rx.await.map_err(|_| Error::Stopping)?))
    }

    async fn get_session(&self, request: Request<pb::GetSessionRequest>) -> Result<Response<pb::SessionInfo>, Status> {
        let id = request.into_inner().session_id;
        let (reply, rx) = oneshot::channel();
        self.command(Command::Session { id, reply }).await?;
        rx.await.map_err(|_| Error::Stopping)?.map(Response::new)
    }
}

#[tonic::async_trait]
impl internal::replication_server::Replication for ManagerService {
    type ReplicateStream = EventStream<internal::ReplicaFrame>;

    async fn replicate(
        &self,
        request: Request<Streaming<internal::ReplicaAck>>,
    ) -> Result<Response<Self::ReplicateStream>, Status> {
        let mut acks = request.into_inner();
        let Some(first) = acks.next().await else { return Err(Error::InvalidArgument("no first ack").into()) };
        let first = first?;
        if first.node_id.is_empty() {
            return Err(Error::InvalidArgument("the first ack names the standby's node_id").into());
        }
        let (tx, rx) = mpsc::channel(4096);
        let (acked_tx, acked) = tokio::sync::watch::channel(0u64);
        if first.journal_id.is_empty() {
            return Err(Error::InvalidArgument("the first ack names the standby's journal_id").into());
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
}
