//! The group commit: a batch of commands is made durable (journal and in-sync standbys)
//! before anything it produced is sent.

use baton_mesh::proto::internal::v1 as internal;
use baton_mesh::proto::v1 as pb;

use super::{Actor, Effect};
use crate::service::outbox::{Batches, Mux};

impl Actor {
    /// Makes the batch durable, then sends what it produced.
    pub(in crate::service) async fn flush(&mut self) -> Result<(), crate::journal::Error> {
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
}
