//! Client sessions ([`ClientSession`], and [`ClientSender`] to send from another task):
//! numbered requests, kept until the manager has journaled them and resent after a reconnect, and
//! each response handed to the user once and acknowledged, with the next request when one
//! follows soon.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use baton_mesh::proto::v1 as pb;
use tokio::sync::{mpsc, oneshot};
use tonic::{Code, Status};

use super::connector::Connector;
use super::endpoints::{Endpoints, advance_term};
use super::mux::{MuxChannel, client_frame};

/// A response delivered to a client session.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientResponse {
    /// The number of the request it answers.
    pub seq: u64,
    /// The response.
    pub payload: Option<prost_types::Any>,
    /// The term of the primary that sent it (fault tests check terms never go back).
    pub term: u64,
}

enum ClientCommand {
    Send { payload: prost_types::Any, restart_data: Vec<u8>, traceparent: String, accepted: oneshot::Sender<Accepted> },
    Close { drop_queued: bool, done: oneshot::Sender<Result<(), Status>> },
}

/// What the manager answered when the session opened: its id, the client restart data it holds,
/// and the highest request number it has journaled.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Opened {
    /// The session id.
    pub session_id: String,
    /// The client restart data stored for the session (what the last open or request that
    /// carried any sent): a restarted client process finds here what it needs to go on.
    pub restart_data: Vec<u8>,
    /// The highest request number journaled: new requests are numbered after it.
    pub last_request_seq: u64,
}

/// A request the manager journaled: its number, and the term of the primary that acknowledged it
/// (the term stamped on the acknowledging frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    /// The request's number in the session.
    pub seq: u64,
    /// The acknowledging primary's term.
    pub term: u64,
}

/// A client session: sends numbered requests to a pool and receives each response once.
pub struct ClientSession {
    commands: mpsc::Sender<ClientCommand>,
    responses: mpsc::Receiver<ClientResponse>,
    opened: Opened,
}

/// How long acknowledgments wait for a request to go with. A client that answers a response with
/// its next request (the scheduler, a closed loop) so sends one frame, and the manager journals
/// one entry, instead of two; `bench manager` relayed about 14% more (A/B medians). Until it is
/// acknowledged, a response stays queued in the manager, and is delivered again after a
/// reconnect (the library drops it as already seen).
const ACK_DELAY: Duration = Duration::from_millis(2);

/// How long opening (or resuming) a session may take, through takeovers and reconnects, before
/// `open` gives up.
const OPEN_DEADLINE: Duration = Duration::from_secs(60);

/// A request sent but not yet journaled: its payload, restart data, trace context, and who waits
/// for it.
type Unaccepted = (prost_types::Any, Vec<u8>, String, Option<oneshot::Sender<Accepted>>);

struct ClientLoop {
    connector: Connector,
    endpoints: Endpoints,
    pool: String,
    session_id: Option<String>,
    /// Whether the session is named by the client (created on its first open).
    create: bool,
    restart_data: Vec<u8>,
    next_seq: u64,
    seen_term: u64,
    /// Sent but not yet journaled: resent after a reconnect.
    unaccepted: BTreeMap<u64, Unaccepted>,
    /// Response numbers delivered: all up to `delivered_upto`, and those in `delivered_above`.
    delivered_upto: u64,
    delivered_above: BTreeSet<u64>,
    /// Responses handed to the user and not yet acknowledged: they go with the next request if
    /// the user sends one within [`ACK_DELAY`], or alone after it.
    acks: Vec<u64>,
    /// A close asked for and not yet answered: sent again on each new channel.
    closing: Option<(bool, oneshot::Sender<Result<(), Status>>)>,
}

impl ClientLoop {
    fn seen(&self, seq: u64) -> bool {
        seq <= self.delivered_upto || self.delivered_above.contains(&seq)
    }

    fn mark(&mut self, seq: u64) {
        self.delivered_above.insert(seq);
        while self.delivered_above.remove(&(self.delivered_upto + 1)) {
            self.delivered_upto += 1;
        }
    }

    /// One channel, on the shared stream to the next manager: open or resume, resend, then relay
    /// until the channel breaks (its error) or the user has gone (`Ok`).
    async fn connection(
        &mut self,
        commands: &mut mpsc::Receiver<ClientCommand>,
        responses: &mpsc::Sender<ClientResponse>,
        opened: &mut Option<oneshot::Sender<Result<Opened, Status>>>,
    ) -> Result<(), Status> {
        let endpoint = self.endpoints.next(self.seen_term);
        let open = pb::OpenSession {
            pool: self.pool.clone(),
            session_id: self.session_id.clone().unwrap_or_default(),
            restart_data: self.restart_data.clone(),
            seen_term: self.seen_term,
            create: self.create,
        };
        let mut channel =
            MuxChannel::open(&self.connector, &endpoint, client_frame(pb::client_frame::Kind::Open(open))).await?;
        // responses not acknowledged on the last channel come again on this one
        self.acks.clear();
        // nothing is sent before the session is open: resent requests come first, in order
        let first = channel.first(&self.connector, &endpoint).await?;
        if !self.event(first, &channel, responses, opened).await? {
            return Ok(());
        }
        let ack_by = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(ack_by);
        loop {
            tokio::select! {
                event = channel.next() => {
                    let waiting = !self.acks.is_empty();
                    if !self.event(event?, &channel, responses, opened).await? {
                        return Ok(());
                    }
                    if !waiting && !self.acks.is_empty() {
                        ack_by.as_mut().reset(tokio::time::Instant::now() + ACK_DELAY);
                    }
                }
                command = commands.recv(), if self.closing.is_none() => {
                    let Some(command) = command else { return Ok(()) };
                    self.command(command, &channel);
                }
                () = &mut ack_by, if !self.acks.is_empty() => {
                    for seq in std::mem::take(&mut self.acks) {
                        channel.send(client_frame(pb::client_frame::Kind::Ack(pb::AckResponse { seq })));
                    }
                }
            }
        }
    }

    /// Handles the user's command.
    fn command(&mut self, command: ClientCommand, channel: &MuxChannel) {
        match command {
            ClientCommand::Send { payload, restart_data, traceparent, accepted } => {
                self.request(payload, restart_data, traceparent, accepted, channel)
            }
            ClientCommand::Close { drop_queued, done } => {
                self.closing = Some((drop_queued, done));
                self.send_close(channel);
            }
        }
    }

    /// Sends the close asked for, after the acknowledgments waiting (a response handed to the
    /// user is no longer queued).
    fn send_close(&mut self, channel: &MuxChannel) {
        let Some((drop_queued, _)) = &self.closing else { return };
        let drop_queued = *drop_queued;
        for seq in std::mem::take(&mut self.acks) {
            channel.send(client_frame(pb::client_frame::Kind::Ack(pb::AckResponse { seq })));
        }
        channel.send(client_frame(pb::client_frame::Kind::Close(pb::CloseSession { drop_queued })));
    }

    /// Sends a request, with the acknowledgments waiting.
    fn request(
        &mut self,
        payload: prost_types::Any,
        restart_data: Vec<u8>,
        traceparent: String,
        accepted: oneshot::Sender<Accepted>,
        channel: &MuxChannel,
    ) {
        self.next_seq += 1;
        let seq = self.next_seq;
        let acks = std::mem::take(&mut self.acks);
        let request = pb::ClientRequest {
            seq,
            payload: Some(payload.clone()),
            restart_data: restart_data.clone(),
            acks,
            traceparent: traceparent.clone(),
        };
        self.unaccepted.insert(seq, (payload, restart_data, traceparent, Some(accepted)));
        channel.send(client_frame(pb::client_frame::Kind::Request(request)));
    }

    /// Handles an event of the session's channel; `false` when the user has gone.
    async fn event(
        &mut self,
        event: pb::mux_event::Kind,
        channel: &MuxChannel,
        responses: &mpsc::Sender<ClientResponse>,
        opened: &mut Option<oneshot::Sender<Result<Opened, Status>>>,
    ) -> Result<bool, Status> {
        let pb::mux_event::Kind::Client(event) = event else { return Ok(true) };
        advance_term(&mut self.seen_term, event.term)?;
        match event.kind {
            Some(pb::client_event::Kind::Opened(o)) => {
                self.endpoints.connected();
                self.session_id = Some(o.session_id.clone());
                // a resumed session goes on after what the manager journaled (the requests this
                // process sent and the manager has not are numbered above and sent again)
                self.next_seq = self.next_seq.max(o.last_request_seq);
                if let Some(opened) = opened.take() {
                    let _ = opened.send(Ok(Opened {
                        session_id: o.session_id.clone(),
                        restart_data: o.restart_data.clone(),
                        last_request_seq: o.last_request_seq,
                    }));
                }
                // what the manager journaled is accepted; the rest is sent again
                let done: Vec<u64> = self.unaccepted.range(..=o.last_request_seq).map(|(s, _)| *s).collect();
                for seq in done {
                    if let Some((_, _, _, Some(w))) = self.unaccepted.remove(&seq) {
                        let _ = w.send(Accepted { seq, term: self.seen_term });
                    }
                }
                for (seq, (payload, restart, traceparent, _)) in &self.unaccepted {
                    let request = pb::ClientRequest {
                        seq: *seq,
                        payload: Some(payload.clone()),
                        restart_data: restart.clone(),
                        acks: vec![],
                        traceparent: traceparent.clone(),
                    };
                    channel.send(client_frame(pb::client_frame::Kind::Request(request)));
                }
                // a close asked for on a channel that broke is asked again
                self.send_close(channel);
            }
            Some(pb::client_event::Kind::Closed(_)) => {
                if let Some((_, done)) = self.closing.take() {
                    let _ = done.send(Ok(()));
                }
                return Ok(false);
            }
            Some(pb::client_event::Kind::Accepted(a)) => {
                if let Some((_, _, _, Some(w))) = self.unaccepted.remove(&a.seq) {
                    let _ = w.send(Accepted { seq: a.seq, term: self.seen_term });
                }
            }
            Some(pb::client_event::Kind::Response(r)) => {
                if !self.seen(r.seq) {
                    if responses
                        .send(ClientResponse { seq: r.seq, payload: r.payload, term: self.seen_term })
                        .await
                        .is_err()
                    {
                        return Ok(false);
                    }
                    self.mark(r.seq);
                }
                self.acks.push(r.seq);
            }
            None => {}
        }
        Ok(true)
    }
}

impl ClientSession {
    /// Opens a new session on `pool` through the manager at `endpoint` (`http://host:port`, or
    /// several comma-separated: the library finds the primary and follows it on failover).
    pub async fn open(
        connector: &Connector,
        endpoint: &str,
        pool: &str,
        restart_data: Vec<u8>,
    ) -> Result<Self, Status> {
        Self::start(connector, endpoint, pool, None, false, restart_data, 0).await
    }

    /// Opens the session the client names `session_id` on `pool`, creating it if the manager
    /// has none of that name, resuming it otherwise: a client process that names its sessions
    /// (from a stable name of its own) finds them again after a restart, with the responses
    /// queued meanwhile and its restart data ([`ClientSession::opened`]). The id is 1 to 128
    /// printable ASCII characters; two live processes opening the same id take it from each
    /// other.
    pub async fn open_named(
        connector: &Connector,
        endpoint: &str,
        pool: &str,
        session_id: &str,
        restart_data: Vec<u8>,
    ) -> Result<Self, Status> {
        Self::start(connector, endpoint, pool, Some(session_id.to_owned()), true, restart_data, 0).await
    }

    /// Resumes session `session_id` (after a restart of the client process): requests are
    /// numbered after `last_seq`, or after the last the manager journaled if that is higher.
    pub async fn resume(
        connector: &Connector,
        endpoint: &str,
        session_id: &str,
        restart_data: Vec<u8>,
        last_seq: u64,
    ) -> Result<Self, Status> {
        Self::start(connector, endpoint, "", Some(session_id.to_owned()), false, restart_data, last_seq).await
    }

    async fn start(
        connector: &Connector,
        endpoint: &str,
        pool: &str,
        session_id: Option<String>,
        create: bool,
        restart_data: Vec<u8>,
        last_seq: u64,
    ) -> Result<Self, Status> {
        let (commands, mut command_rx) = mpsc::channel(1024);
        let (response_tx, responses) = mpsc::channel(1024);
        let (opened_tx, opened_rx) = oneshot::channel();
        let mut state = ClientLoop {
            connector: connector.clone(),
            endpoints: Endpoints::new(endpoint, connector.primary().clone()),
            pool: pool.to_owned(),
            session_id,
            create,
            restart_data,
            next_seq: last_seq,
            seen_term: 0,
            unaccepted: BTreeMap::new(),
            delivered_upto: 0,
            delivered_above: BTreeSet::new(),
            acks: Vec::new(),
            closing: None,
        };
        tokio::spawn(async move {
            let mut opened = Some(opened_tx);
            loop {
                let Err(status) = state.connection(&mut command_rx, &response_tx, &mut opened).await else { return };
                if matches!(status.code(), Code::NotFound | Code::InvalidArgument) {
                    // a close whose answer was lost with its channel finds the session gone
                    if let Some((_, done)) = state.closing.take() {
                        let closed = status.code() == Code::NotFound;
                        let _ = done.send(if closed { Ok(()) } else { Err(status) });
                        return;
                    }
                    tracing::warn!(error = %status, "client session: giving up");
                    if let Some(opened) = opened.take() {
                        let _ = opened.send(Err(status));
                    }
                    return;
                }
                if status.code() == Code::FailedPrecondition
                    && let Some((_, done)) = state.closing.take()
                {
                    // refused (still queued): the session goes on
                    let _ = done.send(Err(status));
                    continue;
                }
                tracing::debug!(error = %status, "client session: reconnecting");
                state.endpoints.pause(&status, state.seen_term).await;
            }
        });
        let opened = tokio::time::timeout(OPEN_DEADLINE, opened_rx)
            .await
            .map_err(|_| {
                Status::deadline_exceeded(format!("the manager did not open the session within {OPEN_DEADLINE:?}"))
            })?
            .map_err(|_| Status::unavailable("the session task stopped"))??;
        Ok(Self { commands, responses, opened })
    }

    /// The session id (for resuming after a restart).
    pub fn session_id(&self) -> &str {
        &self.opened.session_id
    }

    /// What the manager answered when the session opened (or resumed): its client restart
    /// data, and the last request number it journaled.
    pub fn opened(&self) -> &Opened {
        &self.opened
    }

    /// Closes the session for good once the manager has journaled the requests sent before:
    /// the manager forgets it. With requests unanswered or responses not yet received, it is
    /// refused with FAILED_PRECONDITION (and the session goes on) unless `drop_queued`, which
    /// drops them.
    pub async fn close(&mut self, drop_queued: bool) -> Result<(), Status> {
        let (done, rx) = oneshot::channel();
        self.commands
            .send(ClientCommand::Close { drop_queued, done })
            .await
            .map_err(|_| Status::unavailable("the session task stopped"))?;
        rx.await.map_err(|_| Status::unavailable("the session task stopped"))?
    }

    /// Sends a request; returns its number once the manager has journaled it.
    pub async fn send(&self, payload: prost_types::Any, restart_data: Vec<u8>) -> Result<u64, Status> {
        self.sender().send(payload, restart_data).await
    }

    /// A handle that sends requests on this session, for another task than the one receiving.
    pub fn sender(&self) -> ClientSender {
        ClientSender { commands: self.commands.clone() }
    }

    /// The next response, each exactly once. Responses must be read: when 1,024 are waiting
    /// unread, the session stops taking in more (and so stops sending), as backpressure.
    pub async fn recv(&mut self) -> Option<ClientResponse> {
        self.responses.recv().await
    }
}

/// Sends requests on a [`ClientSession`]; cheap to clone.
#[derive(Clone)]
pub struct ClientSender {
    commands: mpsc::Sender<ClientCommand>,
}

impl ClientSender {
    /// Sends a request; returns its number once the manager has journaled it.
    pub async fn send(&self, payload: prost_types::Any, restart_data: Vec<u8>) -> Result<u64, Status> {
        self.send_stamped(payload, restart_data).await.map(|a| a.seq)
    }

    /// Sends a request; returns its number and the acknowledging primary's term once the manager
    /// has journaled it. The current span's trace context goes with it (see
    /// `ClientRequest.traceparent`).
    pub async fn send_stamped(&self, payload: prost_types::Any, restart_data: Vec<u8>) -> Result<Accepted, Status> {
        let (accepted, rx) = oneshot::channel();
        self.commands
            // the caller's trace (a scheduler's release of a chunk): the manager's relay joins it
            .send(ClientCommand::Send { payload, restart_data, traceparent: baton_mesh::trace::current(), accepted })
            .await
            .map_err(|_| Status::unavailable("the session task stopped"))?;
        rx.await.map_err(|_| Status::unavailable("the session task stopped"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::manager;
    use crate::{ServerEvent, ServerSession};

    #[test]
    fn acknowledgments_empty_the_response_queue_with_the_next_request_or_alone() {
        let dir = tempfile::tempdir().unwrap();
        let endpoint = manager(dir.path());
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let connector = Connector::new(None).unwrap();
        runtime.block_on(async {
            let mut server = ServerSession::register(&connector, &endpoint, "acks", "w1");
            let replier = server.replier();
            tokio::spawn(async move {
                while let Some(event) = server.next().await {
                    if let ServerEvent::Request { session_id, seq, payload, .. } = event {
                        let _ = replier.reply(&session_id, seq, payload.unwrap_or_default(), Vec::new()).await;
                    }
                }
            });
            let mut client = ClientSession::open(&connector, &endpoint, "acks", Vec::new()).await.unwrap();
            for n in 1..=20u8 {
                let sent = client.send(prost_types::Any { type_url: "t".into(), value: vec![n] }, Vec::new()).await;
                assert_eq!(sent.unwrap(), u64::from(n));
                let response = tokio::time::timeout(Duration::from_secs(10), client.recv()).await.unwrap().unwrap();
                assert_eq!((response.seq, response.payload.unwrap().value), (u64::from(n), vec![n]));
            }
            // responses 1-19 were acknowledged with the next request, 20 alone: none stays queued
            let mut manager =
                pb::session_manager_client::SessionManagerClient::connect(endpoint.clone()).await.unwrap();
            let mut queued = None;
            for _ in 0..100 {
                let sessions =
                    manager.list_sessions(pb::ListSessionsRequest::default()).await.unwrap().into_inner().sessions;
                let s = sessions.into_iter().find(|s| s.session_id == client.session_id()).unwrap();
                queued = Some((s.request_queue, s.response_queue));
                if queued == Some((0, 0)) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert_eq!(queued, Some((0, 0)), "request and response queues of the session");
        });
    }
}
