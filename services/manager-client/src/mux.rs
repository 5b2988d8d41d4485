//! The Multiplex streams of a [`Connector`], one per manager, shared by the client and server
//! sessions opened through it, and a session's channel on one ([`MuxChannel`]): a task per
//! stream sends what the sessions queued as one message and hands each event to its channel.

use std::collections::HashMap;
use std::time::Duration;

use baton_mesh::proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};

use super::connector::{Connector, Primary};

/// An event of a channel, as the channel's queue holds it. Boxed, so that the queue's blocks
/// stay small: a tokio queue allocates its slots 32 at a time, one block when it is made, and a
/// slot is the size of the item. Unboxed (the largest event or a Status, 112 bytes), each
/// channel opened allocated a block of 3.6 KB, past the allocator's per-thread cache: with
/// 100,000 sessions reopening at a takeover, `malloc` and `free` (consolidating and unlinking
/// chunks) took about a third of the client process's time (perf, `bench sessions`).
type ChannelEvent = Result<Box<pb::mux_event::Kind>, Box<Status>>;

/// What a session asks of its connector's Multiplex stream to a manager (small, as
/// [`ChannelEvent`], for the same reason: every session's frames go through one queue).
enum MuxCommand {
    /// A new channel, whose events go to `events`.
    Open { channel: u64, events: mpsc::UnboundedSender<ChannelEvent> },
    /// A frame of a channel.
    Frame(Box<pb::MuxFrame>),
    /// Ends the stream, and every channel on it with `status` (tests break a stream with it).
    #[cfg(test)]
    Fail(Box<Status>),
}

/// A connector's Multiplex stream to one manager, shared by the client and server sessions
/// opened through it.
/// With a stream per session, the frames of a journal batch left one message and, mostly, one
/// `writev` each, on both sides: that was most of the system time of `bench manager`. One
/// stream carries a batch of frames (or events) as one message.
#[derive(Clone)]
pub(super) struct Mux {
    commands: mpsc::UnboundedSender<MuxCommand>,
    /// The next channel number on this stream (numbers only tell its channels apart).
    next_channel: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// When the stream last brought a message (ms since the Unix epoch).
    heard: std::sync::Arc<std::sync::atomic::AtomicI64>,
}

impl Mux {
    /// Whether the stream still runs: it stops when it fails, or with the runtime it was started
    /// on (tests run one runtime each).
    fn usable(&self) -> bool {
        !self.commands.is_closed()
    }

    /// Whether the stream brought a message within `within`.
    fn heard_within(&self, within: Duration) -> bool {
        baton_mesh::now_ms() - self.heard.load(std::sync::atomic::Ordering::Relaxed) <= within.as_millis() as i64
    }
}

/// At most this many bytes of frames (or events, on the manager's side) go in one message: far
/// under tonic's 4 MiB limit on a message, with room for one large payload.
const MAX_BATCH_BYTES: usize = 1 << 20;

/// Forgets `mux` as the stream to `endpoint`, so that the next session starts another; the
/// sessions on it stay.
fn forget(connector: &Connector, endpoint: &str, mux: &Mux) {
    let mut muxes = connector.muxes();
    if muxes.get(endpoint).is_some_and(|m| m.commands.same_channel(&mux.commands)) {
        muxes.remove(endpoint);
    }
}

/// How long opening a stream may take before the next manager is tried (a manager that is
/// shutting down may accept a connection and never answer on it).
const OPEN_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a session waits for its open on a stream that keeps bringing other events.
const OPEN_LIMIT: Duration = Duration::from_secs(30);

/// How long connecting to a manager may take before the next one is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// The Multiplex stream of `connector` to `endpoint`, started if there is none that runs. One
/// session at a time starts it; the others wait and take it, or its failure. Each starting its
/// own, a takeover with 100,000 sessions opened up to as many connections and streams to the
/// new primary, to drop all but one.
async fn connect(connector: &Connector, endpoint: &str) -> Result<Mux, Status> {
    if let Some(mux) = connector.muxes().get(endpoint).filter(|m| m.usable()) {
        return Ok(mux.clone());
    }
    let starting = connector.starting(endpoint);
    let asked = tokio::time::Instant::now();
    let mut failed = starting.lock().await;
    if let Some(mux) = connector.muxes().get(endpoint).filter(|m| m.usable()) {
        return Ok(mux.clone());
    }
    // the attempt made while this one waited failed: so does this one
    if let Some((at, status)) = failed.as_ref()
        && *at >= asked
    {
        return Err(status.clone());
    }
    let started = start(connector, endpoint).await;
    *failed = started.as_ref().err().map(|status| (tokio::time::Instant::now(), status.clone()));
    started
}

/// Starts a Multiplex stream to `endpoint` (see [`connect`]).
async fn start(connector: &Connector, endpoint: &str) -> Result<Mux, Status> {
    let channel = connector
        .endpoint(endpoint)?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| Status::unavailable(format!("cannot connect to the manager at {endpoint}: {e}")))?;
    let mut client = pb::session_manager_client::SessionManagerClient::new(channel);
    let (out, out_rx) = mpsc::channel(64);
    let inbound =
        tokio::time::timeout(OPEN_TIMEOUT, client.multiplex(connector.authorized(ReceiverStream::new(out_rx))))
            .await
            .map_err(|_| Status::unavailable(format!("{endpoint} did not open a stream in time")))??
            .into_inner();
    let (commands, command_rx) = mpsc::unbounded_channel();
    let heard = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(baton_mesh::now_ms()));
    tokio::spawn(run_mux(out, inbound, command_rx, connector.primary().clone(), endpoint.to_owned(), heard.clone()));
    let mux = Mux { commands, next_channel: std::sync::Arc::new(std::sync::atomic::AtomicU64::new(1)), heard };
    connector.muxes().insert(endpoint.to_owned(), mux.clone());
    Ok(mux)
}

/// The status a `ChannelClosed` event stands for, with the leader it names as metadata.
fn closed_status(closed: pb::ChannelClosed) -> Status {
    // with the details (the ErrorInfo reason) a stream of the session's own would end with
    let mut status = Status::with_details(Code::from(closed.code), closed.message, closed.details.into());
    // a standby names the leader it knows, or none (empty); other closes name nothing
    if closed.code == Code::Unavailable as i32
        && let Ok(leader) = closed.leader.parse()
    {
        status.metadata_mut().insert(crate::LEADER_METADATA, leader);
    }
    status
}

/// Runs a Multiplex stream: sends what the sessions queued, as one message whenever the stream
/// is ready, and hands each event to its channel; when the stream fails, every channel fails
/// with it.
async fn run_mux(
    out: mpsc::Sender<pb::MuxFrames>,
    mut inbound: tonic::Streaming<pb::MuxEvents>,
    mut commands: mpsc::UnboundedReceiver<MuxCommand>,
    primary: Primary,
    endpoint: String,
    heard: std::sync::Arc<std::sync::atomic::AtomicI64>,
) {
    // the process holds a stream to `endpoint` while this runs
    struct Running(Primary, String);
    impl Drop for Running {
        fn drop(&mut self) {
            self.0.stream(&self.1, false);
        }
    }
    primary.stream(&endpoint, true);
    let _running = Running(primary.clone(), endpoint.clone());
    let mut stream = Channels { channels: HashMap::new(), primary, endpoint };
    let failure = loop {
        tokio::select! {
            command = commands.recv() => {
                let Some(command) = command else { return };
                let frames = match stream.batch(command, &mut commands) {
                    Ok(frames) => frames,
                    Err(status) => break status,
                };
                if !frames.is_empty() && out.send(pb::MuxFrames { frames }).await.is_err() {
                    break Status::unavailable("the stream to the manager closed");
                }
            }
            events = inbound.message() => match events {
                Ok(Some(batch)) => {
                    heard.store(baton_mesh::now_ms(), std::sync::atomic::Ordering::Relaxed);
                    stream.deliver(batch);
                }
                Ok(None) => break Status::unavailable("the manager closed the stream"),
                Err(status) => break status,
            }
        }
    };
    // later sessions see this stream stopped (`usable`) and start another
    commands.close();
    for (_, events) in stream.channels {
        let _ = events.send(Err(Box::new(failure.clone())));
    }
}

/// The channels of a running Multiplex stream ([`run_mux`]), and where what its events say of
/// the primary goes.
struct Channels {
    /// Each open channel's queue of events, by channel number.
    channels: HashMap<u64, mpsc::UnboundedSender<ChannelEvent>>,
    primary: Primary,
    /// The manager at the other end.
    endpoint: String,
}

impl Channels {
    /// Applies `command` and every command queued after it, up to [`MAX_BATCH_BYTES`] of frames:
    /// the frames to send as one message, or (tests) the status the stream fails with.
    fn batch(
        &mut self,
        mut command: MuxCommand,
        commands: &mut mpsc::UnboundedReceiver<MuxCommand>,
    ) -> Result<Vec<pb::MuxFrame>, Status> {
        let mut frames = Vec::new();
        let mut bytes = 0;
        loop {
            match command {
                MuxCommand::Open { channel, events } => {
                    self.channels.insert(channel, events);
                }
                MuxCommand::Frame(frame) => {
                    if matches!(frame.kind, Some(pb::mux_frame::Kind::Close(_))) {
                        self.channels.remove(&frame.channel);
                    }
                    bytes += prost::Message::encoded_len(&*frame);
                    frames.push(*frame);
                }
                #[cfg(test)]
                MuxCommand::Fail(status) => return Err(*status),
            }
            if bytes >= MAX_BATCH_BYTES {
                return Ok(frames);
            }
            match commands.try_recv() {
                Ok(next) => command = next,
                Err(_) => return Ok(frames),
            }
        }
    }

    /// Hands each event of `batch` to its channel, and learns the primary from the notices.
    fn deliver(&mut self, batch: pb::MuxEvents) {
        for event in batch.events {
            match event.kind {
                Some(pb::mux_event::Kind::Closed(closed)) => {
                    if let Some(events) = self.channels.remove(&event.channel) {
                        let _ = events.send(Err(Box::new(closed_status(closed))));
                    }
                }
                Some(pb::mux_event::Kind::Primary(notice)) => self.primary.learn(notice.term, &self.endpoint),
                // a standby forwards the primary it follows, of a newer term
                Some(pb::mux_event::Kind::Leader(notice)) if !notice.leader.is_empty() => {
                    self.primary.learn(notice.term, &notice.leader)
                }
                // A channel whose session went away is forgotten. A channel's buffer has no fixed
                // size: the manager sends a channel only what its session asked for (the
                // responses to its requests, the requests of the sessions bound to a server), so
                // what waits unread is bounded by what the manager itself holds for it. A buffer
                // of 1,024 whose overflow closed the channel made a server with more bound
                // sessions than that livelock: each registration brought a Bound event per
                // session, which overflowed, closed the channel, and registered it again (`bench
                // manager` with 3,000 sessions never finished a round).
                Some(kind) => {
                    if let Some(events) = self.channels.get(&event.channel)
                        && events.send(Ok(Box::new(kind))).is_err()
                    {
                        self.channels.remove(&event.channel);
                    }
                }
                None => {}
            }
        }
    }
}

/// One session's channel on a [`Mux`]; dropping it closes the channel.
pub(super) struct MuxChannel {
    id: u64,
    mux: Mux,
    events: mpsc::UnboundedReceiver<ChannelEvent>,
}

impl MuxChannel {
    /// A new channel on `connector`'s stream to `endpoint`, opened with `first` (the frame that
    /// opens a client session or registers a server).
    pub(super) async fn open(
        connector: &Connector,
        endpoint: &str,
        first: pb::mux_frame::Kind,
    ) -> Result<Self, Status> {
        let mux = connect(connector, endpoint).await?;
        let id = mux.next_channel.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (events_tx, events) = mpsc::unbounded_channel();
        mux.commands
            .send(MuxCommand::Open { channel: id, events: events_tx })
            .map_err(|_| Status::unavailable("the stream to the manager closed"))?;
        let channel = Self { id, mux, events };
        channel.send(first);
        Ok(channel)
    }

    /// Queues a frame (a failure shows in [`MuxChannel::next`]).
    pub(super) fn send(&self, kind: pb::mux_frame::Kind) {
        let frame = Box::new(pb::MuxFrame { channel: self.id, kind: Some(kind) });
        let _ = self.mux.commands.send(MuxCommand::Frame(frame));
    }

    /// The next event; an error when the manager closed the channel or the stream failed.
    pub(super) async fn next(&mut self) -> Result<pb::mux_event::Kind, Status> {
        match self.events.recv().await {
            Some(Ok(kind)) => Ok(*kind),
            Some(Err(status)) => Err(*status),
            None => Err(Status::unavailable("the stream to the manager closed")),
        }
    }

    /// The first event, within [`OPEN_TIMEOUT`] of silence: when a manager sends nothing on the
    /// stream for that long, the stream is forgotten (the next attempt starts another, for a
    /// manager that hangs) and the session goes to the next manager; the other sessions on the
    /// stream stay. A stream that brings other sessions' events is a manager at work, not a
    /// hung one (a new primary resuming 100,000 sessions answers the last after seconds): the
    /// session waits on, at most [`OPEN_LIMIT`].
    pub(super) async fn first(&mut self, connector: &Connector, endpoint: &str) -> Result<pb::mux_event::Kind, Status> {
        let started = tokio::time::Instant::now();
        loop {
            match tokio::time::timeout(OPEN_TIMEOUT, self.next()).await {
                Ok(event) => return event,
                Err(_) if self.mux.heard_within(OPEN_TIMEOUT) && started.elapsed() < OPEN_LIMIT => continue,
                Err(_) => {
                    forget(connector, endpoint, &self.mux);
                    return Err(Status::unavailable(format!("{endpoint} did not open the session in time")));
                }
            }
        }
    }
}

impl Drop for MuxChannel {
    fn drop(&mut self) {
        self.send(pb::mux_frame::Kind::Close(pb::ChannelClosed::default()));
    }
}

/// A client session's frame on its channel.
pub(super) fn client_frame(kind: pb::client_frame::Kind) -> pb::mux_frame::Kind {
    pb::mux_frame::Kind::Client(pb::ClientFrame { kind: Some(kind) })
}

/// A server session's frame on its channel.
pub(super) fn server_frame(kind: pb::server_frame::Kind) -> pb::mux_frame::Kind {
    pb::mux_frame::Kind::Server(pb::ServerFrame { kind: Some(kind) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ClientSession;
    use crate::testing::{manager, manager_until};

    /// A channel's queue and the stream's queue allocate their slots 32 at a time: their items
    /// stay small enough that a block is within the allocator's per-thread cache (1,032 bytes
    /// for glibc), so that opening a channel (100,000 at a takeover) does not take the
    /// allocator's slow path.
    #[test]
    fn queue_items_stay_small() {
        assert!(size_of::<ChannelEvent>() <= 16, "a channel event takes {} bytes", size_of::<ChannelEvent>());
        assert!(size_of::<MuxCommand>() <= 24, "a stream command takes {} bytes", size_of::<MuxCommand>());
    }

    #[test]
    fn a_stopping_manager_ends_its_multiplex_streams_while_their_callers_wait() {
        let dir = tempfile::tempdir().unwrap();
        let shutdown = tokio_util::sync::CancellationToken::new();
        let endpoint = manager_until(dir.path(), shutdown.clone());
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let mut client = pb::session_manager_client::SessionManagerClient::connect(endpoint).await.unwrap();
            let open = pb::OpenSession { pool: "p".into(), ..Default::default() };
            let frame = pb::MuxFrame {
                channel: 7,
                kind: Some(pb::mux_frame::Kind::Client(pb::ClientFrame {
                    kind: Some(pb::client_frame::Kind::Open(open)),
                })),
            };
            // the caller keeps its side open and sends nothing more
            let (frames, frames_rx) = mpsc::channel(1);
            frames.send(pb::MuxFrames { frames: vec![frame] }).await.unwrap();
            let mut events = client.multiplex(ReceiverStream::new(frames_rx)).await.unwrap().into_inner();
            // events come in batches: the notice and the open's answer may share a message (a
            // test that took one event per message hung one run in about forty)
            let mut queue = std::collections::VecDeque::new();
            let mut next = async || loop {
                if let Some(event) = queue.pop_front() {
                    return event;
                }
                let batch = tokio::time::timeout(Duration::from_secs(10), events.message())
                    .await
                    .expect("an event within 10 s")
                    .unwrap()
                    .expect("the stream stays open");
                queue.extend(batch.events);
            };
            // a primary tells each stream first that it is the primary (on channel 0)
            let notice: pb::MuxEvent = next().await;
            assert_eq!(notice.channel, 0);
            assert!(matches!(notice.kind, Some(pb::mux_event::Kind::Primary(pb::PrimaryNotice { term })) if term > 0));
            let opened = next().await;
            assert_eq!(opened.channel, 7);
            assert!(matches!(
                opened.kind,
                Some(pb::mux_event::Kind::Client(pb::ClientEvent {
                    kind: Some(pb::client_event::Kind::Opened(_)),
                    ..
                }))
            ));
            // the manager stops: the stream ends at once (it waited for the caller's next frame)
            shutdown.cancel();
            let end = tokio::time::timeout(Duration::from_secs(5), events.message()).await;
            assert!(matches!(end, Ok(Ok(None)) | Ok(Err(_))), "the stream did not end: {end:?}");
            drop(frames);
        });
    }

    #[test]
    fn the_sessions_of_one_connector_share_one_stream_and_survive_its_failure() {
        let dir = tempfile::tempdir().unwrap();
        let endpoint = manager(dir.path());
        let connector = Connector::new(None).unwrap();
        let first = tokio::runtime::Runtime::new().unwrap();
        let (a, b) = first.block_on(async {
            let a = ClientSession::open(&connector, &endpoint, "p", Vec::new()).await.unwrap();
            let b = ClientSession::open(&connector, &endpoint, "p", Vec::new()).await.unwrap();
            (a, b)
        });
        assert_ne!(a.session_id(), b.session_id());
        let one = first.block_on(connect(&connector, &endpoint)).unwrap();
        assert!(
            one.commands.same_channel(&first.block_on(connect(&connector, &endpoint)).unwrap().commands),
            "one stream"
        );
        let any = || prost_types::Any { type_url: "t".into(), value: vec![1] };
        assert_eq!(first.block_on(a.send(any(), Vec::new())).unwrap(), 1);
        // the stream fails: the next connect starts another, and both sessions go on, on it
        one.commands.send(MuxCommand::Fail(Box::new(Status::unavailable("failed on purpose")))).unwrap();
        for _ in 0..200 {
            if !one.usable() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!one.usable(), "a failed stream is not used again");
        let (sent_a, sent_b) = first.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), async {
                (a.send(any(), Vec::new()).await.unwrap(), b.send(any(), Vec::new()).await.unwrap())
            })
            .await
            .expect("the sessions resume within 10s")
        });
        assert_eq!((sent_a, sent_b), (2, 1));
        let two = first.block_on(connect(&connector, &endpoint)).unwrap();
        assert!(two.usable() && !two.commands.same_channel(&one.commands));
        // the stream's task stops with its runtime: another runtime starts its own
        drop((a, b));
        drop(first);
        assert!(!two.usable());
        let second = tokio::runtime::Runtime::new().unwrap();
        let three = second.block_on(connect(&connector, &endpoint)).unwrap();
        assert!(!three.commands.same_channel(&two.commands));
        let session = second.block_on(ClientSession::open(&connector, &endpoint, "p", Vec::new())).unwrap();
        assert!(session.session_id().starts_with("ses_"));
        // another connector does not share its streams
        let other = Connector::new(None).unwrap();
        let four = second.block_on(connect(&other, &endpoint)).unwrap();
        assert!(!four.commands.same_channel(&three.commands));
        assert!(four.commands.same_channel(&second.block_on(connect(&other, &endpoint)).unwrap().commands));
    }
}
