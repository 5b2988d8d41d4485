//! The outbox: where a session's events go (its own stream, or a channel of a Multiplex stream),
//! and the per-stream batches the actor sends a Multiplex stream once a journal batch is durable.

use baton_mesh::proto::v1 as pb;
use tokio::sync::mpsc;
use tonic::Status;

use super::LEADER_METADATA;

/// Where a client session's events go.
pub(super) type ClientTx = Out<pb::ClientEvent>;
/// Where a server session's events go.
pub(super) type ServerTx = Out<pb::ServerEvent>;

/// A Multiplex stream's sending side: the actor sends it one batch of events per journal batch.
#[derive(Clone)]
pub(super) struct Mux {
    /// Tells the streams apart when the actor groups a batch's events by stream.
    pub(super) id: u64,
    pub(super) tx: mpsc::Sender<Result<pb::MuxEvents, Status>>,
}

impl Mux {
    /// The event telling the stream's process that this manager is the primary of `term`
    /// (channel 0).
    pub(super) fn primary_notice(term: u64) -> pb::MuxEvent {
        pb::MuxEvent { channel: 0, kind: Some(pb::mux_event::Kind::Primary(pb::PrimaryNotice { term })) }
    }

    /// The event forwarding that the manager at `leader` is the primary of `term` (channel 0,
    /// from a standby).
    pub(super) fn leader_notice(term: u64, leader: String) -> pb::MuxEvent {
        pb::MuxEvent { channel: 0, kind: Some(pb::mux_event::Kind::Leader(pb::LeaderNotice { term, leader })) }
    }

    /// Closes `channel` with `status` at once (not batched).
    pub(super) fn close(&self, channel: u64, status: &Status) {
        let _ = self.tx.try_send(Ok(pb::MuxEvents { events: vec![closed_event(channel, status)] }));
    }
}

/// The event that closes `channel` with `status` (and the leader a standby names).
pub(super) fn closed_event(channel: u64, status: &Status) -> pb::MuxEvent {
    let leader = status.metadata().get(LEADER_METADATA).and_then(|v| v.to_str().ok()).unwrap_or_default();
    pb::MuxEvent {
        channel,
        kind: Some(pb::mux_event::Kind::Closed(pb::ChannelClosed {
            code: status.code() as i32,
            message: status.message().to_owned(),
            leader: leader.to_owned(),
            details: status.details().to_vec(),
        })),
    }
}

/// A client or server session's event as a Multiplex event.
pub(super) trait MuxKind {
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
pub(super) enum Out<E> {
    Stream(mpsc::Sender<Result<E, Status>>),
    Channel { mux: Mux, channel: u64 },
}

impl<E: MuxKind> Out<E> {
    /// Ends the stream or channel with `status` in its turn: after the events before it, in the
    /// batch (a standby refusing 100,000 opens at once sends them as a few messages, where one
    /// message each overflowed the stream and lost refusals).
    pub(super) async fn refuse(self, status: &Status, batches: &mut Batches) {
        match self {
            Out::Stream(tx) => {
                let _ = tx.try_send(Err(status.clone()));
            }
            Out::Channel { mux, channel } => batches.push(&mux, closed_event(channel, status)).await,
        }
    }

    /// Ends the stream (by dropping its sender) or closes the channel with `status`.
    pub(super) fn end(self, status: &Status) {
        if let Out::Channel { mux, channel } = self {
            mux.close(channel, status);
        }
    }

    /// Sends `event` now (a stream), or adds it to its Multiplex stream's batch (sent by
    /// [`Batches::send`]).
    pub(super) async fn send(&self, event: E, batches: &mut Batches) {
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
pub(super) struct Batches(Vec<(Mux, Vec<pb::MuxEvent>, usize)>);

/// At most this many bytes of events go in one Multiplex message (tonic refuses messages over
/// 4 MiB).
const MAX_BATCH_BYTES: usize = 1 << 20;

impl Batches {
    /// Adds `event` to its stream's batch; a batch that would pass [`MAX_BATCH_BYTES`] is sent
    /// first.
    pub(super) async fn push(&mut self, mux: &Mux, event: pb::MuxEvent) {
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
    pub(super) async fn send(self) {
        for (mux, events, _) in self.0 {
            let _ = mux.tx.send(Ok(pb::MuxEvents { events })).await;
        }
    }
}
