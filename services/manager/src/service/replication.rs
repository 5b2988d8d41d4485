//! Replication: a primary streams every journal batch to its standbys and, in sync mode, waits
//! for the in-sync ones to make it durable before it acknowledges anything; a standby appends the
//! primary's frames to its own journal. These are the actor's methods for both sides.

use std::time::Duration;

use baton_mesh::proto::internal::v1 as internal;
use tokio::sync::{mpsc, oneshot, watch};
use tonic::Status;

use super::actor::{Actor, Effect};
use crate::Error;
use crate::failover::{InSync, PublishError};
use crate::state::State;

/// How close (in journal entries) a catching-up standby must be for the primary to wait briefly
/// for it to join the in-sync set.
const CATCH_UP_WINDOW: u64 = 4096;
/// How long the primary waits for such a standby to acknowledge the batch just sent.
const CATCH_UP_WAIT: Duration = Duration::from_millis(50);
/// The wait before writing the in-sync set again after etcd failed to take it.
const PUBLISH_RETRY: Duration = Duration::from_millis(100);

/// A connected standby: where its frames go, and how far it has made the journal durable.
pub(super) struct ReplicaConn {
    pub(super) tx: mpsc::Sender<Result<internal::ReplicaFrame, Status>>,
    pub(super) acked: watch::Receiver<u64>,
}

impl Actor {
    /// A standby connected: it gets a snapshot of the state, then every batch.
    pub(super) fn replica_connect(
        &mut self,
        node: String,
        journal_id: String,
        tx: mpsc::Sender<Result<internal::ReplicaFrame, Status>>,
        acked: watch::Receiver<u64>,
    ) {
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
        let frame = internal::ReplicaFrame { term: self.term, reset: true, records };
        if tx.try_send(Ok(frame)).is_ok() {
            tracing::info!(%node, index = self.state.index, "standby connected");
            self.replicas.insert(node, ReplicaConn { tx, acked });
        }
    }

    /// A standby applies a frame from the primary and answers with its durable index.
    pub(super) fn replica_apply(&mut self, frame: internal::ReplicaFrame, done: oneshot::Sender<Result<u64, Status>>) {
        if self.primary || frame.term < self.seen_term {
            let refused = Error::RefusedTerm { term: frame.term, seen: self.seen_term, primary: self.primary };
            let _ = done.send(Err(refused.into()));
            return;
        }
        if frame.term > self.seen_term && !self.leader.is_empty() {
            // the first frame of a new term: the processes whose sessions this standby refused
            // learn where the primary is from one notice per stream (with three managers, the
            // primary they wait for may be another manager than the one they hold a stream to)
            for mux in self.muxes.values() {
                self.effects.push(Effect::LeaderNotice(mux.clone(), frame.term, self.leader.clone()));
            }
        }
        self.seen_term = frame.term;
        self.term = self.term.max(frame.term);
        let entries = match crate::journal::decode_records(&frame.records) {
            Ok(entries) => entries,
            Err(e) => {
                let _ = done.send(Err(Error::Undecodable(e).into()));
                return;
            }
        };
        let journal = &mut self.journal;
        if frame.reset {
            let mut state = State::default();
            for e in &entries {
                state.apply(e);
            }
            match tokio::task::block_in_place(|| journal.snapshot(&entries, true)) {
                Ok(()) => {
                    self.state = state;
                    let _ = done.send(Ok(self.state.index));
                }
                Err(e) => self.standby_write_failed(e, done),
            }
            return;
        }
        // the entries as the primary encoded them; acknowledged as soon as they are
        // durable, applied to the state after
        let durable = entries.iter().map(|e| e.index).fold(self.state.index, u64::max);
        match tokio::task::block_in_place(|| journal.append_records(&frame.records, entries.len() as u64)) {
            Ok(()) => {
                let _ = done.send(Ok(durable));
                for e in &entries {
                    self.state.apply(e);
                }
            }
            Err(e) => self.standby_write_failed(e, done),
        }
    }

    /// A standby whose journal cannot be written is of no use to the primary (which leaves it
    /// out of the in-sync set) and would fail every catch-up again: it steps down like a primary
    /// (`Actor::fail`), so that its supervisor restarts it and the liveness probe sees it.
    fn standby_write_failed(&mut self, e: crate::journal::Error, done: oneshot::Sender<Result<u64, Status>>) {
        let why = format!("journal write failed: {e}");
        let _ = done.send(Err(Error::Journal(e).into()));
        self.fail(why);
    }

    /// Sync mode: waits until every in-sync standby has made the journal durable up to here; a
    /// standby that does not within a second leaves the in-sync set, which is published before
    /// anything is acknowledged without it. Standbys that caught up join the set.
    pub(super) async fn sync_standbys(&mut self) {
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
                    matches!(tokio::time::timeout(CATCH_UP_WAIT, acked.wait_for(|i| *i >= last)).await, Ok(Ok(_)))
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
                        tokio::time::sleep(PUBLISH_RETRY).await;
                    }
                }
            }
        }
    }
}
