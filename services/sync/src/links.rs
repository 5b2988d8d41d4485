//! Link processing: a [`LinkManager`] claims links (a lease per link, so that several sync
//! replicas on one PostgreSQL database never run the same link twice) and runs one task per link.
//!
//! A link's task is a state machine over the stored link:
//! - BOOTSTRAPPING: read the high-water mark, send the snapshot (tombstones as deletes) as
//!   `ApplyChanges{snapshot}` calls, then set the cursor to the mark → STREAMING;
//! - STREAMING: send the changes after the cursor, in order, in batches; the cursor moves after
//!   each acknowledged batch (the target's watermark makes a resend harmless); a cursor behind the
//!   trimmed change log → BOOTSTRAPPING again (or FAILED, as the link's [`TrimmedPolicy`] says);
//! - a connection failure (unavailable, deadline exceeded, refused, transport errors) → SUSPENDED;
//!   any other failure (a rejected key, say) → FAILED;
//! - SUSPENDED: probe with exponential backoff and jitter; the first answer → VERIFYING (probe 1);
//! - VERIFYING: probe every probe interval; at `verify_threshold` consecutive successes → back to
//!   STREAMING (or BOOTSTRAPPING if the snapshot never finished); any connection failure → SUSPENDED.
//!
//! A probe is an empty ApplyChanges: it proves the target is reachable and accepts the key.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use baton_api::convert;
use baton_mesh::proto::v1 as pb;
use baton_mesh::status::MESSAGE_TOO_LARGE;
use baton_store::Store;
use baton_store::sync::{DeadLetter, Link, LinkState, RejectPolicy, TrimmedPolicy};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic_types::StatusExt;
use tracing::Instrument;

use crate::SyncOptions;

mod probing;

use probing::{ProbeStep, Probing};

/// How long a claimed link stays ours without renewal.
const LEASE: Duration = Duration::from_secs(5);
/// How often leases are renewed and new links picked up.
const CLAIM_EVERY: Duration = Duration::from_secs(1);
/// The deadline of a call to the target.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a link streams batch after batch before its runner reads the link again (a pause or
/// a delete takes effect within this).
const STREAM_SPELL: Duration = Duration::from_millis(500);
/// How long a stopping runner is waited for: it finishes its call and gives its lease up.
const RUNNER_STOP: Duration = Duration::from_secs(2);
/// How long a runner waits after a failed step (the store unreachable, say) before its next round.
const STEP_RETRY: Duration = Duration::from_secs(1);
/// How often a PAUSED or FAILED link is read again: a resume takes effect within this.
const IDLE_RECHECK: Duration = Duration::from_millis(200);
/// The connect deadline of a call to the target: an unreachable target suspends the link at once
/// rather than after the call's deadline.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Claims links and runs them.
pub struct LinkManager {
    store: Store,
    owner: String,
    options: SyncOptions,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
}

impl LinkManager {
    /// A manager claiming links as `owner`.
    pub fn new(
        store: Store,
        owner: String,
        options: SyncOptions,
        wake: Arc<Notify>,
        shutdown: CancellationToken,
    ) -> Self {
        Self { store, owner, options, wake, shutdown }
    }

    /// Runs until shutdown, then gives the leases up.
    pub async fn run(self) {
        let mut running: HashMap<String, (JoinHandle<()>, CancellationToken)> = HashMap::new();
        loop {
            match self.store.claim_links(&self.owner, LEASE).await {
                Ok(ids) => {
                    running.retain(|id, (task, cancel)| {
                        let keep = ids.contains(id) && !task.is_finished();
                        if !keep {
                            cancel.cancel();
                        }
                        keep
                    });
                    for id in ids {
                        if running.contains_key(&id) {
                            continue;
                        }
                        let cancel = self.shutdown.child_token();
                        let runner = Runner {
                            store: self.store.clone(),
                            link_id: id.clone(),
                            options: self.options.clone(),
                            cancel: cancel.clone(),
                            client: None,
                            probing: Probing::default(),
                            watch: None,
                        };
                        tracing::info!(link = %id, owner = %self.owner, "running link");
                        running.insert(id, (tokio::spawn(runner.run()), cancel));
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot claim links"),
            }
            tokio::select! {
                () = self.shutdown.cancelled() => break,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(CLAIM_EVERY) => {}
            }
        }
        for (_, (task, cancel)) in running {
            cancel.cancel();
            let _ = tokio::time::timeout(RUNNER_STOP, task).await;
        }
        if let Err(e) = self.store.release_links(&self.owner).await {
            tracing::warn!(error = %e, "cannot release link leases");
        }
    }
}

/// Why a call to the target failed.
#[derive(Debug)]
enum CallError {
    /// Unreachable: suspend and probe.
    Connection(String),
    /// Anything else: fail and wait for a person.
    Fatal(String),
}

fn classify(status: &tonic::Status) -> CallError {
    use tonic::Code;
    let text = format!("{:?}: {}", status.code(), status.message());
    // a batch over the target's message size limit fails the same way again: not a connection
    // problem to wait out
    let too_large = status.get_details_error_info().is_some_and(|i| i.reason == MESSAGE_TOO_LARGE);
    match status.code() {
        Code::ResourceExhausted if too_large => CallError::Fatal(text),
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Cancelled
        | Code::Unknown
        | Code::Aborted
        | Code::ResourceExhausted => CallError::Connection(text),
        _ => CallError::Fatal(text),
    }
}

struct Runner {
    store: Store,
    link_id: String,
    options: SyncOptions,
    cancel: CancellationToken,
    client: Option<(String, pb::intake_client::IntakeClient<Channel>)>,
    /// When the next probe goes out while the link is SUSPENDED or VERIFYING.
    probing: Probing,
    /// The announcements of the source org's commits, which wake a caught-up link.
    watch: Option<baton_store::changes::ChangeWatch>,
}

impl Runner {
    async fn run(mut self) {
        while !self.cancel.is_cancelled() {
            let link = match self.store.link_by_id(&self.link_id).await {
                Ok(Some(link)) => link,
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(link = %self.link_id, error = %e, "cannot read link");
                    self.pause(STEP_RETRY).await;
                    continue;
                }
            };
            if link.state != LinkState::Suspended {
                self.probing.reset();
            }
            let result = match link.state {
                LinkState::Bootstrapping => self.bootstrap(&link).await,
                LinkState::Streaming => self.stream(&link).await,
                LinkState::Suspended | LinkState::Verifying => self.probe_link(&link).await,
                LinkState::Paused | LinkState::Failed => {
                    self.pause(IDLE_RECHECK).await;
                    Ok(())
                }
            };
            if let Err(e) = result {
                tracing::warn!(link = %self.link_id, error = %e, "link step failed");
                self.pause(STEP_RETRY).await;
            }
        }
    }

    async fn pause(&self, d: Duration) {
        tokio::select! {
            () = self.cancel.cancelled() => {}
            () = tokio::time::sleep(d) => {}
        }
    }

    fn client(&mut self, link: &Link) -> Result<pb::intake_client::IntakeClient<Channel>, CallError> {
        if let Some((endpoint, client)) = &self.client
            && endpoint == &link.target_endpoint
        {
            return Ok(client.clone());
        }
        // the link's own CA for its target, or the server's
        let endpoint = (if link.target_ca_pem.is_empty() {
            self.options.tls.endpoint(&link.target_endpoint)
        } else {
            self.options.tls.endpoint_with_ca(&link.target_endpoint, link.target_ca_pem.as_bytes())
        })
        .map_err(|e| CallError::Fatal(format!("target endpoint: {e}")))?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(CALL_TIMEOUT)
        .tcp_nodelay(true);
        let client = pb::intake_client::IntakeClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024);
        self.client = Some((link.target_endpoint.clone(), client.clone()));
        Ok(client)
    }

    async fn apply(
        &mut self,
        link: &Link,
        changes: Vec<pb::Change>,
        snapshot: bool,
    ) -> Result<pb::ApplyChangesResponse, CallError> {
        let mut client = self.client(link)?;
        let mut request = tonic::Request::new(pb::ApplyChangesRequest { link_id: link.id.clone(), changes, snapshot });
        let bearer = format!("Bearer {}", link.target_api_key)
            .parse()
            .map_err(|_| CallError::Fatal("the target api key is not valid header text".into()))?;
        request.metadata_mut().insert("authorization", bearer);
        request.set_timeout(CALL_TIMEOUT);
        // each delivery is a trace of its own, which the target's handling continues
        let span = tracing::info_span!(
            "deliver",
            otel.name = "link delivery",
            otel.kind = "client",
            link = %link.id,
            changes = request.get_ref().changes.len(),
            snapshot
        );
        let call = async {
            baton_mesh::trace::inject(&mut request);
            client.apply_changes(request).await
        };
        call.instrument(span).await.map(tonic::Response::into_inner).map_err(|s| classify(&s))
    }

    /// Moves the link on a failed call: SUSPENDED for connection failures, FAILED otherwise.
    async fn on_call_error(&self, link: &Link, error: CallError) -> Result<(), baton_store::Error> {
        let (to, cause) = match error {
            CallError::Connection(e) => (LinkState::Suspended, format!("connection failure: {e}")),
            CallError::Fatal(e) => (LinkState::Failed, format!("target refused: {e}")),
        };
        tracing::warn!(link = %link.id, from = link.state.as_str(), to = to.as_str(), %cause, "link transition");
        self.store.transition_link(&link.id, &[link.state], to, &cause, 0, None, None).await?;
        Ok(())
    }

    async fn dead_letter(
        &self,
        link: &Link,
        object_of: &HashMap<String, String>,
        rejected: &[pb::RejectedChange],
    ) -> Result<(), baton_store::Error> {
        for r in rejected {
            let letter = DeadLetter {
                seq: r.seq,
                object: object_of.get(&r.record_id).cloned().unwrap_or_default(),
                record_id: r.record_id.clone(),
                reason: r.reason.clone(),
                at_ms: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as i64),
            };
            self.store.add_dead_letter(&link.id, &letter).await?;
        }
        Ok(())
    }

    async fn objects(&self, link: &Link) -> Result<Vec<String>, baton_store::Error> {
        if link.objects.is_empty() {
            Ok(self.store.list_objects(&link.org_id).await?.into_iter().map(|o| o.name).collect())
        } else {
            Ok(link.objects.clone())
        }
    }

    async fn bootstrap(&mut self, link: &Link) -> Result<(), baton_store::Error> {
        let high_water = self.store.high_water(&link.org_id).await?;
        let (mut rows, mut tombstones) = (0usize, 0usize);
        let batch = self.options.link_batch as usize;
        for object in self.objects(link).await? {
            let mut after: Option<String> = None;
            loop {
                if self.cancel.is_cancelled() {
                    return Ok(());
                }
                let page = self.store.snapshot_page(&link.org_id, &object, after.as_deref(), batch).await?;
                if page.rows.is_empty() {
                    break;
                }
                let object_of: HashMap<_, _> =
                    page.rows.iter().map(|r| (r.record.id.clone(), object.clone())).collect();
                let changes =
                    page.rows.iter().map(|r| convert::snapshot_row_to_pb(&r.record, r.deleted, &page.schema)).collect();
                match self.apply(link, changes, true).await {
                    Ok(response) => {
                        self.dead_letter(link, &object_of, &response.rejected).await?;
                        if link.on_reject == RejectPolicy::Stop && !response.rejected.is_empty() {
                            let cause = format!(
                                "the target rejected {} snapshot rows (on_reject = STOP)",
                                response.rejected.len()
                            );
                            self.store
                                .transition_link(&link.id, &[link.state], LinkState::Failed, &cause, 0, None, None)
                                .await?;
                            return Ok(());
                        }
                    }
                    Err(e) => return self.on_call_error(link, e).await,
                }
                let deleted = page.rows.iter().filter(|r| r.deleted).count();
                tombstones += deleted;
                rows += page.rows.len() - deleted;
                match page.next_after {
                    Some(next) => after = Some(next),
                    None => break,
                }
            }
        }
        let cause = format!(
            "snapshot of {} and {} applied; streaming after seq {high_water}",
            plural(rows as u64, "row", "rows"),
            plural(tombstones as u64, "tombstone", "tombstones")
        );
        self.store
            .transition_link(
                &link.id,
                &[LinkState::Bootstrapping],
                LinkState::Streaming,
                &cause,
                0,
                Some(high_water),
                Some(true),
            )
            .await?;
        Ok(())
    }

    /// Sends the changes after the cursor, batch after batch, for up to [`STREAM_SPELL`]; the
    /// next batch is read from the source, and the cursor moved past the last, while the target
    /// applies this one. Returns to the
    /// runner's loop (which reads the link again: paused, deleted) when the spell is over, when
    /// the changes run out, on a call failure, or when the link stops streaming.
    async fn stream(&mut self, link: &Link) -> Result<(), baton_store::Error> {
        let batch = self.options.link_batch as usize;
        let store = self.store.clone();
        let Some(mut events) = self.read_changes(link, link.cursor_seq).await? else { return Ok(()) };
        if events.is_empty() {
            // caught up: the next commit after the cursor (or the fallback) wakes the link, and
            // the runner's next round reads the link and the log again
            let fallback = self.options.change_poll;
            let watch = self.watch.get_or_insert_with(|| store.changes_watch(&link.org_id));
            tokio::select! {
                () = self.cancel.cancelled() => {}
                _ = watch.wait(link.cursor_seq, fallback) => {}
            }
            return Ok(());
        }
        let mut schemas = HashMap::new();
        for object in self.objects(link).await? {
            let schema = self.store.object(&link.org_id, &object).await?;
            schemas.insert(object, schema);
        }
        let spell = Instant::now() + STREAM_SPELL;
        // the last seq of a batch applied whose cursor move is still to be made
        let mut unmoved: Option<i64> = None;
        loop {
            let Some(last) = events.last().map(|e| e.seq) else { return Ok(()) };
            let (changes, object_of) = changes_of(&events, &schemas);
            let apply =
                async { if changes.is_empty() { Ok(None) } else { self.apply(link, changes, false).await.map(Some) } };
            let moved = async {
                match unmoved.take() {
                    Some(seq) => store.advance_link_cursor(&link.id, seq).await,
                    None => Ok(true),
                }
            };
            // the next batch is read, and the cursor moved past the previous one, while this one
            // is applied (a trimmed seq is reported when it is reached)
            crate::count_change_log_read("link");
            let (applied, next, streaming) = tokio::join!(apply, store.changes_since(&link.org_id, last, batch), moved);
            let streaming = streaming?;
            match applied {
                Ok(Some(response)) => {
                    if self.stopped_by_rejections(link, &object_of, &response, last).await? {
                        return Ok(());
                    }
                }
                Ok(None) => {}
                Err(e) => return self.on_call_error(link, e).await,
            }
            match next {
                Ok(more) if streaming && !more.is_empty() && Instant::now() < spell => {
                    events = more;
                    unmoved = Some(last);
                }
                // paused or deleted, the spell over, nothing more, or a trimmed seq: the
                // runner's next round handles it
                _ => {
                    self.store.advance_link_cursor(&link.id, last).await?;
                    return Ok(());
                }
            }
        }
    }

    /// Dead-letters the changes the target rejected; under `on_reject = STOP` with any, moves
    /// the cursor past the batch (whose last seq is `last`) and fails the link, answering true.
    async fn stopped_by_rejections(
        &self,
        link: &Link,
        object_of: &HashMap<String, String>,
        response: &pb::ApplyChangesResponse,
        last: i64,
    ) -> Result<bool, baton_store::Error> {
        self.dead_letter(link, object_of, &response.rejected).await?;
        if link.on_reject != RejectPolicy::Stop || response.rejected.is_empty() {
            return Ok(false);
        }
        self.store.advance_link_cursor(&link.id, last).await?;
        let cause = format!("the target rejected {} changes (on_reject = STOP)", response.rejected.len());
        self.store.transition_link(&link.id, &[LinkState::Streaming], LinkState::Failed, &cause, 0, None, None).await?;
        Ok(true)
    }

    /// The changes after `cursor` (at most a batch); None when they are trimmed, and the link
    /// went back to BOOTSTRAPPING or FAILED as its [`TrimmedPolicy`] says.
    async fn read_changes(
        &self,
        link: &Link,
        cursor: i64,
    ) -> Result<Option<Vec<baton_store::model::ChangeEvent>>, baton_store::Error> {
        crate::count_change_log_read("link");
        match self.store.changes_since(&link.org_id, cursor, self.options.link_batch as usize).await {
            Ok(events) => Ok(Some(events)),
            Err(baton_store::Error::Trimmed { after_seq, trimmed }) => {
                let behind =
                    format!("cursor {after_seq} is behind the trimmed change log (oldest kept seq {})", trimmed + 1);
                // a new snapshot from a new high-water mark, then the changes after it: the
                // target's version guard skips whatever it already holds
                let (to, cause, bootstrapped) = match link.on_trimmed {
                    TrimmedPolicy::Rebootstrap => {
                        (LinkState::Bootstrapping, format!("{behind}: re-bootstrapping"), Some(false))
                    }
                    TrimmedPolicy::Fail => {
                        (LinkState::Failed, format!("{behind}; resume the link to bootstrap again"), None)
                    }
                };
                tracing::warn!(link = %link.id, from = link.state.as_str(), to = to.as_str(), %cause, "link transition");
                self.store
                    .transition_link(&link.id, &[LinkState::Streaming], to, &cause, 0, None, bootstrapped)
                    .await?;
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    async fn probe(&mut self, link: &Link) -> Result<(), CallError> {
        self.apply(link, Vec::new(), false).await.map(|_| ())
    }

    /// Probes a SUSPENDED or VERIFYING link once, after the wait [`Probing`] says, and moves it
    /// as the answer says.
    async fn probe_link(&mut self, link: &Link) -> Result<(), baton_store::Error> {
        self.probing.wait(link.state, link.probe_interval, &self.cancel).await;
        if self.cancel.is_cancelled() {
            return Ok(());
        }
        let answer = match self.probe(link).await {
            Ok(()) => Ok(()),
            Err(CallError::Connection(e)) => Err(e),
            Err(e @ CallError::Fatal(_)) => return self.on_call_error(link, e).await,
        };
        let threshold = link.verify_threshold.max(1);
        let (to, cause, ok) = match self.probing.step(link.state, link.consecutive_ok, threshold, answer.is_ok()) {
            ProbeStep::StaySuspended => return Ok(()),
            ProbeStep::Resume(ok) => return self.resume(link, ok).await,
            ProbeStep::Verifying(ok) => {
                (LinkState::Verifying, format!("the target answered probe {ok}/{threshold}"), ok)
            }
            ProbeStep::Suspend => {
                let e = answer.err().unwrap_or_default();
                (LinkState::Suspended, format!("probe failed after {} successful probes: {e}", link.consecutive_ok), 0)
            }
        };
        self.store.transition_link(&link.id, &[link.state], to, &cause, ok, None, None).await?;
        Ok(())
    }

    /// Back to work after `ok` consecutive successful probes.
    async fn resume(&self, link: &Link, ok: u32) -> Result<(), baton_store::Error> {
        let to = if link.bootstrapped { LinkState::Streaming } else { LinkState::Bootstrapping };
        let cause = format!("{ok} consecutive successful probes (threshold {})", link.verify_threshold.max(1));
        tracing::info!(link = %link.id, to = to.as_str(), %cause, "link resumes");
        self.store.transition_link(&link.id, &[link.state], to, &cause, 0, None, None).await?;
        Ok(())
    }
}

/// The events of the objects the link carries (those in `schemas`) as changes for the target,
/// and each change's object by record id (what a dead letter names).
fn changes_of(
    events: &[baton_store::model::ChangeEvent],
    schemas: &HashMap<String, baton_store::model::ObjectSchema>,
) -> (Vec<pb::Change>, HashMap<String, String>) {
    let mut object_of = HashMap::new();
    let changes = events
        .iter()
        .filter_map(|e| {
            let schema = schemas.get(&e.object)?;
            object_of.insert(e.record_id.clone(), e.object.clone());
            Some(convert::change_to_pb(e, schema))
        })
        .collect();
    (changes, object_of)
}

/// `n` and the noun, singular or plural: `1 row`, `3 rows`.
fn plural(n: u64, singular: &str, plural: &str) -> String {
    format!("{n} {}", if n == 1 { singular } else { plural })
}
