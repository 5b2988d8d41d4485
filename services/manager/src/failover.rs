//! Failover through etcd. Every manager campaigns on one election key with a lease (TTL 2 s by
//! default) and its address as the value; the leader key's revision is the term. While it is not
//! the leader a manager is a standby: it follows the primary's Replicate stream.
//!
//! The in-sync set (`<election>.in-sync`: term, members, journal index) says who may take over.
//! A manager campaigns only while the set names it and its journal reaches the set's index, and
//! checks that again after winning. A new primary publishes `{itself}` before it acknowledges
//! anything, and every write of the set is a transaction conditioned on the writer's leader key,
//! so a deposed primary can never overwrite a newer set. `docs/failover.md` says why
//! this keeps every acknowledged entry.
//!
//! The primary self-fences — it stops acknowledging and exits, to come back as a standby — when it
//! cannot renew its lease in time, and resigns at once on SIGTERM. A local fault (the journal
//! cannot be written, the actor stops answering) makes any manager step down the same way
//! ([`step_down_on_fault`]).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use baton_mesh::proto::internal::v1 as internal;
use etcd_client::{Client, Compare, CompareOp, ConnectOptions, LeaderKey, ResignOptions, Txn, TxnOp};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use baton_mesh::now_ms;

use crate::service::ManagerService;
use baton_manager_client::Connector;

/// The exit code of a primary that fenced itself (lost its lease) or of a manager that stepped
/// down on a local fault: restart it, and it rejoins as a standby.
pub const EXIT_FENCED: i32 = 75;

/// How long connecting to etcd may take.
const ETCD_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one etcd call (a read, a transaction, a lease grant) may take before it counts as
/// failed: the lease's default TTL, so that a stalled etcd is noticed within a lease.
const ETCD_CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// How long giving something up (resigning, revoking the lease) is waited for: best effort, the
/// lease runs out anyway.
const ETCD_RELEASE_TIMEOUT: Duration = Duration::from_secs(1);
/// How often a standby looks for the leader to follow when there is none (or its stream ended).
const LEADER_POLL: Duration = Duration::from_millis(100);
/// How long connecting to the leader's Replicate stream may take.
const REPLICATE_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// The wait before asking etcd for a lease again after it refused or did not answer.
const LEASE_GRANT_RETRY: Duration = Duration::from_millis(500);
/// The wait before checking again whether this manager may campaign, and before starting over
/// after a failed campaign.
const CAMPAIGN_RETRY: Duration = Duration::from_millis(200);
/// How often the primary's watchdog compares the last renewal with the fence deadline: small
/// against the 60 % of the TTL it allows.
const WATCHDOG_TICK: Duration = Duration::from_millis(20);

/// The etcd key holding the in-sync set: beside the election key, not under it (every key under
/// `election/` is a candidate).
pub fn in_sync_key(election: &str) -> String {
    format!("{election}.in-sync")
}

/// The in-sync set as kept in etcd: the managers that hold everything acknowledged, as written
/// by the primary of `term` when its journal was at `index`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InSync {
    /// The writer's term.
    pub term: u64,
    /// The members (advertised addresses), the writer among them.
    pub members: Vec<String>,
    /// Each member's journal id (see `Journal::identify`): a member restarted on a wiped disk has
    /// another, and is not admitted. Empty in a set written before ids were kept.
    pub journals: BTreeMap<String, String>,
    /// The writer's journal index when it wrote the set: every member holds at least this much,
    /// so a member whose journal is shorter lost its disk and must not take over.
    pub index: u64,
}

impl InSync {
    /// The set as stored (JSON).
    pub fn to_json(&self) -> String {
        serde_json::json!({"term": self.term, "members": self.members, "journals": self.journals, "index": self.index})
            .to_string()
    }

    /// The set stored as `bytes`; `None` when it is not one (a set written before the index was
    /// kept reads with index 0).
    pub fn parse(bytes: &[u8]) -> Option<InSync> {
        let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
        let members = v["members"].as_array()?.iter().map(|m| m.as_str().map(str::to_owned)).collect::<Option<_>>()?;
        let journals = match v.get("journals") {
            None => BTreeMap::new(),
            Some(j) => {
                j.as_object()?.iter().map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned()))).collect::<Option<_>>()?
            }
        };
        Some(InSync { term: v["term"].as_u64()?, members, journals, index: v["index"].as_u64().unwrap_or(0) })
    }

    /// Whether `node`, whose journal (id `journal`) reaches `index`, may take over: the set names
    /// it, with that journal, and its journal is at least as long as the writer's was.
    pub fn admits(&self, node: &str, journal: &str, index: u64) -> bool {
        let same_journal = self.journals.is_empty() || self.journals.get(node).is_some_and(|j| j == journal);
        self.members.iter().any(|m| m == node) && same_journal && index >= self.index
    }
}

/// Why a write of the in-sync set failed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The writer no longer holds its leader key: it is deposed and must not acknowledge again.
    #[error("the leader key is gone: this primary is deposed")]
    Deposed,
    /// etcd did not answer; the write may be tried again.
    #[error("etcd: {0}")]
    Etcd(String),
}

/// Writes the in-sync set for the primary of one term (fenced by its leader key).
pub type Publisher = Arc<dyn Fn(InSync) -> futures::future::BoxFuture<'static, Result<(), PublishError>> + Send + Sync>;

/// Connects to etcd.
pub async fn connect(endpoints: &[String]) -> Result<Client, etcd_client::Error> {
    // No per-request timeout: a campaign waits as long as the election takes (cancelling it would
    // give up the place in line). Other calls are bounded with tokio timeouts where they are made.
    let options = ConnectOptions::new().with_connect_timeout(ETCD_CONNECT_TIMEOUT);
    Client::connect(endpoints, Some(options)).await
}

/// The writer of the in-sync set for the holder of `leader`: each write is a transaction that
/// succeeds only while `leader` still exists with its creation revision, i.e. while the writer is
/// still the leader (etcd elects a newer candidate only once every older key is gone).
pub fn publisher(client: Client, election: &str, leader: LeaderKey) -> Publisher {
    let key = in_sync_key(election);
    Arc::new(move |set: InSync| {
        let mut client = client.clone();
        let txn = Txn::new()
            .when([Compare::create_revision(leader.key(), CompareOp::Equal, leader.rev())])
            .and_then([TxnOp::put(key.clone(), set.to_json(), None)]);
        Box::pin(async move {
            match tokio::time::timeout(ETCD_CALL_TIMEOUT, client.txn(txn)).await {
                Ok(Ok(r)) if r.succeeded() => Ok(()),
                Ok(Ok(_)) => Err(PublishError::Deposed),
                Ok(Err(e)) => Err(PublishError::Etcd(e.to_string())),
                Err(_) => Err(PublishError::Etcd("the transaction timed out".to_owned())),
            }
        })
    })
}

/// Whether this manager may campaign (or serve, after winning): the in-sync set names it and its
/// journal reaches the set's index. No set at all: the cluster's first election.
async fn eligible(client: &mut Client, election: &str, node: &str, service: &ManagerService) -> bool {
    let got = tokio::time::timeout(ETCD_CALL_TIMEOUT, client.get(in_sync_key(election), None)).await;
    let set = match got {
        Ok(Ok(resp)) => match resp.kvs().first() {
            None => return true,
            Some(kv) => InSync::parse(kv.value()),
        },
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot read the in-sync set");
            return false;
        }
        Err(_) => {
            tracing::warn!("cannot read the in-sync set: etcd did not answer");
            return false;
        }
    };
    let Ok(status) = service.current_status().await else { return false };
    match set {
        Some(set) if set.admits(node, service.journal_id(), status.journal_index) => true,
        Some(set) => {
            tracing::debug!(?set, index = status.journal_index, "not eligible to take over");
            false
        }
        None => {
            tracing::warn!("the in-sync set in etcd cannot be read: not campaigning");
            false
        }
    }
}

/// Follows the current primary's Replicate stream until cancelled (the calls carry the mesh
/// token of `connector`).
#[allow(clippy::too_many_arguments)]
async fn follow(
    mut client: Client,
    connector: Connector,
    election: String,
    me: String,
    service: ManagerService,
    epoch: u64,
    cancel: CancellationToken,
) {
    while !cancel.is_cancelled() {
        let leader = match tokio::time::timeout(ETCD_CALL_TIMEOUT, client.leader(election.clone())).await {
            Ok(Ok(resp)) => resp.kv().and_then(|kv| kv.value_str().ok()).map(str::to_owned),
            _ => None,
        };
        let Some(leader) = leader.filter(|l| *l != me) else {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(LEADER_POLL) => continue,
            }
        };
        let _ = service.follow_leader(leader.clone(), epoch).await;
        if let Err(e) = replicate_from(&connector, &leader, &me, &service, &cancel).await {
            tracing::debug!(%leader, error = %e, "replication stream ended");
        }
        if !cancel.is_cancelled() {
            service.primary_lost(true);
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(LEADER_POLL) => {}
        }
    }
}

async fn replicate_from(
    connector: &Connector,
    leader: &str,
    me: &str,
    service: &ManagerService,
    cancel: &CancellationToken,
) -> Result<(), tonic::Status> {
    let channel = connector
        .endpoint(leader)?
        .connect_timeout(REPLICATE_CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut client =
        internal::replication_client::ReplicationClient::new(channel).max_decoding_message_size(256 * 1024 * 1024);
    let (acks, acks_rx) = mpsc::channel(64);
    let status = service.current_status().await?;
    let first = internal::ReplicaAck {
        node_id: me.to_owned(),
        durable_index: status.journal_index,
        journal_id: service.journal_id().to_owned(),
    };
    let _ = acks.send(first).await;
    let mut frames = client.replicate(connector.authorized(ReceiverStream::new(acks_rx))).await?.into_inner();
    loop {
        let frame = tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            f = frames.message() => f?,
        };
        let Some(frame) = frame else { return Ok(()) };
        service.primary_lost(false);
        let durable = service.replica_apply(frame).await?;
        if acks.send(internal::ReplicaAck { durable_index: durable, ..Default::default() }).await.is_err() {
            return Ok(());
        }
    }
}

/// Keeps `lease` alive, renewing it six times per TTL, and stores in `renewed` when it was last
/// renewed: the time the request was *sent* whose answer said the lease lives (the lease runs at
/// least TTL from then). Answers come in the order of the requests, so each is matched to its
/// request. Returns when the lease has expired or the stream broke.
async fn keep_alive(mut client: Client, lease: i64, ttl_ms: i64, renewed: Arc<AtomicI64>) {
    let Ok((mut keeper, mut answers)) = client.lease_keep_alive(lease).await else { return };
    let mut sent = VecDeque::new();
    let every = Duration::from_millis((ttl_ms / 6).max(50) as u64);
    loop {
        sent.push_back(now_ms());
        if keeper.keep_alive().await.is_err() {
            return;
        }
        let next = tokio::time::sleep(every);
        tokio::pin!(next);
        loop {
            tokio::select! {
                () = &mut next => break,
                answer = answers.message() => match answer {
                    Ok(Some(answer)) => {
                        let at = sent.pop_front().unwrap_or(0);
                        if answer.ttl() <= 0 {
                            return; // the lease expired
                        }
                        renewed.fetch_max(at, Ordering::SeqCst);
                    }
                    _ => return,
                },
            }
        }
    }
}

/// [`keep_alive`] on a thread and a runtime of its own, over a connection to etcd (at `etcd`) of
/// its own: the renewals cannot wait behind the manager's work (its actor's batches, thousands of
/// sessions' frames), however much piles up; with 10,000 sessions on the shared runtime a primary
/// once failed to renew its lease and fenced itself. Aborting the returned task ends it.
fn keep_alive_apart(
    etcd: Vec<String>,
    lease: i64,
    ttl_ms: i64,
    renewed: Arc<AtomicI64>,
) -> tokio::task::JoinHandle<()> {
    let stop = CancellationToken::new();
    let (done, ended) = tokio::sync::oneshot::channel::<()>();
    let thread_stop = stop.clone();
    let spawned = std::thread::Builder::new().name("lease-keepalive".into()).spawn(move || {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
        runtime.block_on(async move {
            tokio::select! {
                () = thread_stop.cancelled() => {}
                () = async {
                    match connect(&etcd).await {
                        Ok(client) => keep_alive(client, lease, ttl_ms, renewed).await,
                        Err(e) => tracing::warn!(error = %e, "the lease keepalive cannot reach etcd"),
                    }
                } => {}
            }
        });
        let _ = done.send(());
    });
    tokio::spawn(async move {
        // the thread stops when this task ends, or is aborted
        let _stop = stop.drop_guard();
        if spawned.is_ok() {
            let _ = ended.await;
        }
    })
}

/// Renews `lease` once, now, and waits (at most `within`) for the answer: true if the lease lives,
/// with `renewed` moved to the time of the request. A new primary starts its watchdog from this,
/// not from a renewal made before a stall that its election may have waited out.
async fn renew_now(client: &mut Client, lease: i64, renewed: &AtomicI64, within: Duration) -> bool {
    let at = now_ms();
    let renewal = async {
        let (mut keeper, mut answers) = client.lease_keep_alive(lease).await.ok()?;
        keeper.keep_alive().await.ok()?;
        answers.message().await.ok().flatten()
    };
    match tokio::time::timeout(within, renewal).await {
        Ok(Some(answer)) if answer.ttl() > 0 => {
            renewed.fetch_max(at, Ordering::SeqCst);
            true
        }
        _ => false,
    }
}

/// Runs the election loop for `service` until `shutdown`; as a standby it replicates from the
/// primary with the mesh token of `connector`.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    client: Client,
    etcd: Vec<String>,
    connector: Connector,
    election: String,
    ttl: Duration,
    me: String,
    service: ManagerService,
    health: HealthReporter,
    service_name: &'static str,
    shutdown: CancellationToken,
) {
    let mut candidate = Candidate { client, etcd, connector, election, me, service, health, service_name, shutdown };
    // etcd grants at least its minimum TTL (2 s by default; 1 s with a 10 ms heartbeat and a
    // 100 ms election timeout): the granted TTL is the one the watchdog keeps to
    let ttl_secs = ttl.as_secs().max(1) as i64;
    // held lease, so that a local fault gives it up (see step_down_on_fault)
    let held = candidate.service.lease_slot();
    // A primary never comes back to this loop (it resigns and returns, or fences and exits), so
    // followers always run before this process's only election: epoch 0.
    let elections = 0u64;
    loop {
        if candidate.shutdown.is_cancelled() {
            return;
        }
        let Some((id, ttl_ms)) = candidate.grant(ttl_secs).await else { continue };
        held.store(id, Ordering::SeqCst);
        let mut lease = Lease::keep(&candidate.etcd, id, ttl_ms);
        let following = candidate.shutdown.child_token();
        tokio::spawn(follow(
            candidate.client.clone(),
            candidate.connector.clone(),
            candidate.election.clone(),
            candidate.me.clone(),
            candidate.service.clone(),
            elections,
            following.clone(),
        ));
        let leader_key = match candidate.campaign(&mut lease, &following).await {
            Step::Done(key) => key,
            Step::Again => continue,
            Step::Stop => return,
        };
        following.cancel();
        let term = match candidate.take_office(&lease, &leader_key).await {
            Step::Done(term) => term,
            Step::Again => continue,
            Step::Stop => return,
        };
        return candidate.guard(lease, leader_key, term).await;
    }
}

/// What a manager campaigns with, in [`run`].
struct Candidate {
    client: Client,
    /// The etcd endpoints, for the lease keepalive's connection of its own.
    etcd: Vec<String>,
    connector: Connector,
    election: String,
    /// This manager's advertised address: its value in the election.
    me: String,
    service: ManagerService,
    health: HealthReporter,
    service_name: &'static str,
    shutdown: CancellationToken,
}

/// A lease of this manager's, kept alive on a thread of its own ([`keep_alive_apart`]).
struct Lease {
    id: i64,
    /// The TTL etcd granted, in ms.
    ttl_ms: i64,
    /// When the lease was last renewed (ms since the Unix epoch; see [`keep_alive`]).
    renewed: Arc<AtomicI64>,
    /// Ends when the lease can no longer be kept alive; aborting it stops the keepalive.
    keepalive: tokio::task::JoinHandle<()>,
}

impl Lease {
    /// Starts keeping lease `id` alive, over a connection of its own to `etcd`.
    fn keep(etcd: &[String], id: i64, ttl_ms: i64) -> Self {
        let renewed = Arc::new(AtomicI64::new(now_ms()));
        let keepalive = keep_alive_apart(etcd.to_vec(), id, ttl_ms, renewed.clone());
        Lease { id, ttl_ms, renewed, keepalive }
    }
}

/// How a step of [`run`] ended: with its result, or starting over with a new lease, or stopping.
enum Step<T> {
    Done(T),
    Again,
    Stop,
}

impl Candidate {
    /// A new lease of `ttl_secs` (its id and the granted TTL in ms); None, after a wait, when etcd
    /// refused or did not answer.
    async fn grant(&mut self, ttl_secs: i64) -> Option<(i64, i64)> {
        let granted = tokio::time::timeout(ETCD_CALL_TIMEOUT, self.client.lease_grant(ttl_secs, None)).await;
        match granted {
            Ok(Ok(l)) => return Some((l.id(), l.ttl() * 1000)),
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot grant an etcd lease; retrying"),
            Err(_) => tracing::warn!("cannot grant an etcd lease: etcd did not answer; retrying"),
        }
        tokio::time::sleep(LEASE_GRANT_RETRY).await;
        None
    }

    /// Campaigns with `lease` only while eligible, and checks again after winning: the leader
    /// key once this manager may serve. Starting over cancels `following`.
    async fn campaign(&mut self, lease: &mut Lease, following: &CancellationToken) -> Step<LeaderKey> {
        loop {
            while !eligible(&mut self.client, &self.election, &self.me, &self.service).await {
                tokio::select! {
                    () = self.shutdown.cancelled() => return Step::Stop,
                    () = tokio::time::sleep(CAMPAIGN_RETRY) => {}
                }
            }
            let won = tokio::select! {
                () = self.shutdown.cancelled() => return Step::Stop,
                _ = &mut lease.keepalive => {
                    // the lease can no longer be kept alive: campaign again with a new one
                    tracing::warn!("lease keepalive ended while campaigning; starting over");
                    following.cancel();
                    return Step::Again;
                }
                r = self.client.campaign(self.election.clone(), self.me.clone(), lease.id) => r,
            };
            match won {
                Ok(resp) => {
                    let Some(key) = resp.leader().cloned() else { continue };
                    // the watchdog starts afresh: a campaign that waited out an etcd stall must
                    // not find a renewal from before it
                    let within = Duration::from_millis((lease.ttl_ms / 3) as u64);
                    let fresh = renew_now(&mut self.client, lease.id, &lease.renewed, within).await;
                    if fresh && eligible(&mut self.client, &self.election, &self.me, &self.service).await {
                        return Step::Done(key);
                    }
                    tracing::warn!(fresh, "won the election but cannot serve (lease or in-sync set): resigning");
                    let _ = tokio::time::timeout(
                        ETCD_RELEASE_TIMEOUT,
                        self.client.resign(Some(ResignOptions::new().with_leader(key))),
                    )
                    .await;
                }
                Err(e) => {
                    // the lease may be gone with the connection: start over with a new one
                    tracing::warn!(error = %e, "campaign failed; retrying with a new lease");
                    lease.keepalive.abort();
                    following.cancel();
                    let _ = tokio::time::timeout(ETCD_RELEASE_TIMEOUT, self.client.lease_revoke(lease.id)).await;
                    tokio::time::sleep(CAMPAIGN_RETRY).await;
                    return Step::Again;
                }
            }
        }
    }

    /// Won with `leader_key`: publishes the in-sync set `{itself}`, then serves as the primary of
    /// the key's term, which it returns. A set that cannot be written gives the office up.
    async fn take_office(&mut self, lease: &Lease, leader_key: &LeaderKey) -> Step<u64> {
        let term = leader_key.rev() as u64;
        let publish = publisher(self.client.clone(), &self.election, leader_key.clone());
        // the new set, before the first acknowledgment: from here on only this manager may take
        // over, until a standby catches up and joins it
        let index = match self.service.current_status().await {
            Ok(status) => status.journal_index,
            Err(_) => return Step::Stop,
        };
        let journals = [(self.me.clone(), self.service.journal_id().to_owned())].into();
        if let Err(e) = publish(InSync { term, members: vec![self.me.clone()], journals, index }).await {
            tracing::warn!(term, error = %e, "cannot publish the in-sync set after winning: resigning");
            lease.keepalive.abort();
            let _ = tokio::time::timeout(
                ETCD_RELEASE_TIMEOUT,
                self.client.resign(Some(ResignOptions::new().with_leader(leader_key.clone()))),
            )
            .await;
            let _ = tokio::time::timeout(ETCD_RELEASE_TIMEOUT, self.client.lease_revoke(lease.id)).await;
            return Step::Again;
        }
        if self.service.become_primary(term, Some(publish)).await.is_err() {
            return Step::Stop;
        }
        self.service.took_over();
        self.health.set_service_status(self.service_name, ServingStatus::Serving).await;
        tracing::info!(term, me = %self.me, index, "elected primary");
        Step::Done(term)
    }

    /// The primary's watchdog: fences (steps down and exits with [`EXIT_FENCED`]) before the
    /// lease can run out, or resigns at once on `shutdown`.
    async fn guard(mut self, lease: Lease, leader_key: LeaderKey, term: u64) {
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => {
                    // SIGTERM: hand over at once
                    let _ = self.service.become_standby(String::new()).await;
                    self.health.set_service_status(self.service_name, ServingStatus::NotServing).await;
                    let _ = self.client.resign(Some(ResignOptions::new().with_leader(leader_key))).await;
                    let _ = self.client.lease_revoke(lease.id).await;
                    tracing::info!(term, "resigned");
                    return;
                }
                () = tokio::time::sleep(WATCHDOG_TICK) => {}
            }
            if must_fence(lease.renewed.load(Ordering::SeqCst), now_ms(), lease.ttl_ms) {
                let _ = self.service.become_standby(String::new()).await;
                self.health.set_service_status("", ServingStatus::NotServing).await;
                self.health.set_service_status(self.service_name, ServingStatus::NotServing).await;
                tracing::error!(term, "cannot renew the etcd lease: fenced, exiting to rejoin as a standby");
                lease.keepalive.abort();
                std::process::exit(EXIT_FENCED);
            }
        }
    }
}

/// Whether a primary whose lease (of `ttl_ms`) was last renewed at `renewed_ms` must fence itself
/// at `now_ms` (both ms since the Unix epoch): once more than 60 % of the TTL has gone by since,
/// before the lease can run out.
fn must_fence(renewed_ms: i64, now_ms: i64, ttl_ms: i64) -> bool {
    now_ms - renewed_ms > ttl_ms * 6 / 10
}

/// Waits for a local fault and steps down: the journal could not be written (the actor stopped,
/// so nothing more is acknowledged), a set write found this primary deposed, or the actor did not
/// answer for `stall_after` (a hung disk). Then every health status turns NOT_SERVING (the empty
/// service name too, which the liveness probe asks), the lease this manager holds is revoked (its
/// leader key goes with it, so the in-sync standby takes over at once instead of after the TTL),
/// and the process exits with [`EXIT_FENCED`]. Without etcd (`client` None) there is no lease.
pub async fn step_down_on_fault(
    service: ManagerService,
    client: Option<Client>,
    health: HealthReporter,
    service_name: &'static str,
    stall_after: Duration,
    shutdown: CancellationToken,
) {
    let failed = service.failed();
    let why = loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = failed.cancelled() => break service.failure().unwrap_or_else(|| "the actor stopped".to_owned()),
            () = tokio::time::sleep(stall_after / 4) => {}
        }
        if tokio::time::timeout(stall_after, service.current_status()).await.is_err() && !shutdown.is_cancelled() {
            break format!("the manager made no progress for {stall_after:?}");
        }
    };
    tracing::error!(reason = %why, "local fault: stepping down");
    health.set_service_status("", ServingStatus::NotServing).await;
    health.set_service_status(service_name, ServingStatus::NotServing).await;
    if let Some(mut client) = client {
        let lease = service.lease_slot().load(Ordering::SeqCst);
        if lease != 0 {
            let revoked = tokio::time::timeout(ETCD_RELEASE_TIMEOUT, client.lease_revoke(lease)).await;
            tracing::info!(revoked = matches!(revoked, Ok(Ok(_))), "gave up the lease");
        }
    }
    std::process::exit(EXIT_FENCED);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_set_admits_named_members_whose_journal_reaches_its_index() {
        let set = InSync {
            term: 7,
            members: vec!["http://a".into(), "http://b".into()],
            journals: [("http://a".into(), "j1".into()), ("http://b".into(), "j2".into())].into(),
            index: 120,
        };
        assert_eq!(InSync::parse(set.to_json().as_bytes()), Some(set.clone()));
        assert!(set.admits("http://a", "j1", 120));
        assert!(set.admits("http://b", "j2", 500));
        assert!(!set.admits("http://b", "j2", 119), "a member that lost part of its journal");
        assert!(!set.admits("http://b", "j9", 500), "a member restarted on a wiped disk");
        assert!(!set.admits("http://c", "j3", 500), "a manager the set does not name");
        // a set written before the index and the journal ids were kept
        let old = InSync::parse(br#"{"term":2,"members":["http://a"]}"#).unwrap();
        assert!(old.admits("http://a", "j1", 0));
        assert_eq!(InSync::parse(b"{\"members\": 3}"), None);
    }

    #[test]
    fn the_primary_fences_once_60_percent_of_the_ttl_passed_without_a_renewal() {
        let (ttl, renewed) = (2_000, 10_000);
        assert!(!must_fence(renewed, renewed, ttl));
        assert!(!must_fence(renewed, renewed + 1_200, ttl), "60 % of the TTL: not yet");
        assert!(must_fence(renewed, renewed + 1_201, ttl));
        assert!(!must_fence(renewed + 1_000, renewed + 1_201, ttl), "a renewal moves the deadline");
    }
}
