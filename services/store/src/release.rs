//! The release protocol, one for batch chunks and export parts: how a scheduler takes rows to
//! send to the workers without two schedulers taking the same row, and how a row released by a
//! scheduler that died before sending it is released again.
//!
//! A release runs in one write transaction that first takes the single `release_lock` row (so
//! releases of every scheduler replica, chunks and parts alike, run one at a time and see each
//! other's claims), then takes back what was released and not sent for
//! [`UNSENT_RELEASE_TIMEOUT_MS`], then claims rows one by one with an update guarded on PENDING
//! (so a row is claimed once even without the lock). After the manager has journaled the request
//! the scheduler marks the row sent; a restarted scheduler settles its unsent releases with
//! [`Store::recover_releases`]. `release_chunks` and `release_parts` differ only in which rows
//! they choose (fair share, caps and rates for chunks; per-export and overall caps for parts).

use std::collections::HashSet;

use sqlx::{Any, Row, Transaction};

use crate::batches::Recovered;
use crate::{Backend, Error, Store};

/// A released chunk (or export part) not yet handed to the manager after this long is released
/// again: its scheduler died between the claim and the send.
pub(crate) const UNSENT_RELEASE_TIMEOUT_MS: i64 = 30_000;

/// What a scheduler releases: chunks, or export parts.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Releasable {
    /// Batch chunks (`chunks`).
    Chunks,
    /// Export parts (`export_parts`).
    Parts,
}

impl Releasable {
    /// The table.
    fn table(self) -> &'static str {
        match self {
            Releasable::Chunks => "chunks",
            Releasable::Parts => "export_parts",
        }
    }

    /// The column naming the row's owner (its batch or export).
    fn owner(self) -> &'static str {
        match self {
            Releasable::Chunks => "batch_id",
            Releasable::Parts => "export_id",
        }
    }

    /// The column numbering the row within its owner.
    fn number(self) -> &'static str {
        match self {
            Releasable::Chunks => "idx",
            Releasable::Parts => "number",
        }
    }

    /// The states of a row in flight (SQL list).
    fn in_flight(self) -> &'static str {
        match self {
            Releasable::Chunks => "('RELEASED', 'RUNNING')",
            Releasable::Parts => "('RELEASED')",
        }
    }
}

/// An open release: its transaction (holding the release lock), and the owners of the rows it
/// took back (released too long ago and never sent).
pub(crate) struct Release<'a> {
    /// The transaction; the release is made by committing it.
    pub tx: Transaction<'a, Any>,
    /// The batch or export ids of the rows taken back to PENDING.
    pub taken_back: HashSet<String>,
}

impl Store {
    /// Opens a release of `what` at `now`: None, without a write, when no row is pending and none
    /// is to be taken back (an idle scheduler writes nothing; a row made pending just after this
    /// read waits for the next round).
    pub(crate) async fn begin_release(&self, what: Releasable, now: i64) -> Result<Option<Release<'_>>, Error> {
        let (table, owner) = (what.table(), what.owner());
        let stale_before = now - UNSENT_RELEASE_TIMEOUT_MS;
        let waits = sqlx::query(&format!(
            "SELECT 1 FROM {table} WHERE state = 'PENDING' \
             OR (state = 'RELEASED' AND sent_at_ms = 0 AND released_at_ms < $1) LIMIT 1"
        ))
        .bind(stale_before)
        .fetch_optional(&self.reader)
        .await?;
        if waits.is_none() {
            return Ok(None);
        }
        let mut tx = self.writer.begin().await?;
        sqlx::query("UPDATE release_lock SET releases = releases + 1 WHERE id = 1").execute(&mut *tx).await?;
        let again = sqlx::query(&format!(
            "UPDATE {table} SET state = 'PENDING', claimed_by = '', released_at_ms = 0 \
             WHERE state = 'RELEASED' AND sent_at_ms = 0 AND released_at_ms < $1 RETURNING {owner}"
        ))
        .bind(stale_before)
        .fetch_all(&mut *tx)
        .await?;
        let taken_back = again.iter().map(|row| row.try_get(0)).collect::<Result<_, _>>()?;
        Ok(Some(Release { tx, taken_back }))
    }

    /// Records that released row (`id`, `n`) of `what` is in the manager's hands (it is no longer
    /// released again after the timeout: the manager delivers it).
    pub(crate) async fn mark_release_sent(&self, what: Releasable, id: &str, n: u32) -> Result<(), Error> {
        let (table, owner, number) = (what.table(), what.owner(), what.number());
        // A worker may already hold the row (its transaction runs the chunk or produces the part):
        // then it has started it and there is nothing to mark; waiting for that transaction would
        // stall the releaser for the whole run (seen in `bench batch` on PostgreSQL).
        let sql = match self.backend {
            Backend::Sqlite => {
                format!("UPDATE {table} SET sent_at_ms = $3 WHERE {owner} = $1 AND {number} = $2 AND sent_at_ms = 0")
            }
            Backend::Postgres => format!(
                "UPDATE {table} SET sent_at_ms = $3 WHERE ({owner}, {number}) IN (SELECT {owner}, {number} FROM {table} \
                 WHERE {owner} = $1 AND {number} = $2 AND sent_at_ms = 0 FOR UPDATE SKIP LOCKED)"
            ),
        };
        sqlx::query(&sql).bind(id).bind(i64::from(n)).bind(self.now_ms()).execute(&self.writer).await?;
        Ok(())
    }

    /// [`Store::recover_chunks`] for chunks or export parts.
    pub(crate) async fn recover_releases(
        &self,
        what: Releasable,
        claimer: &str,
        held: &[(String, u32)],
    ) -> Result<Recovered, Error> {
        let (table, owner, number, in_flight) = (what.table(), what.owner(), what.number(), what.in_flight());
        let now = self.now_ms();
        let mut recovered = Recovered::default();
        let mut tx = self.writer.begin().await?;
        for (id, n) in held {
            // a row a worker has taken is no longer RELEASED: the condition skips it (on
            // PostgreSQL without waiting for the worker's transaction, as in `mark_release_sent`)
            let marked = sqlx::query(&format!(
                "UPDATE {table} SET sent_at_ms = $4 WHERE {owner} = $1 AND {number} = $2 AND claimed_by = $3 \
                 AND state = 'RELEASED' AND sent_at_ms = 0"
            ))
            .bind(id.as_str())
            .bind(i64::from(*n))
            .bind(claimer)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            recovered.marked_sent += marked.rows_affected();
            let flying = sqlx::query(&format!(
                "SELECT 1 FROM {table} WHERE {owner} = $1 AND {number} = $2 AND state IN {in_flight}"
            ))
            .bind(id.as_str())
            .bind(i64::from(*n))
            .fetch_optional(&mut *tx)
            .await?;
            if flying.is_some() {
                recovered.in_flight.push((id.clone(), *n));
            }
        }
        let again = sqlx::query(&format!(
            "UPDATE {table} SET state = 'PENDING', claimed_by = '', released_at_ms = 0 \
             WHERE state = 'RELEASED' AND claimed_by = $1 AND sent_at_ms = 0 RETURNING {owner}"
        ))
        .bind(claimer)
        .fetch_all(&mut *tx)
        .await?;
        recovered.released_again = again.len() as u64;
        tx.commit().await?;
        // a chunk's state is shown to the watchers of its batch; an export shows no part's
        if let Releasable::Chunks = what {
            let batches = again.iter().map(|row| row.try_get(0)).collect::<Result<HashSet<String>, _>>()?;
            self.touched_batches(&batches);
        }
        Ok(recovered)
    }
}

/// Claims row (`id`, `n`) of `what` for scheduler `claimer` in an open release: whether this
/// release moved it out of PENDING (only then is it this scheduler's to send).
pub(crate) async fn claim(
    tx: &mut Transaction<'_, Any>,
    what: Releasable,
    id: &str,
    n: u32,
    claimer: &str,
    now: i64,
) -> Result<bool, Error> {
    let (table, owner, number) = (what.table(), what.owner(), what.number());
    let updated = sqlx::query(&format!(
        "UPDATE {table} SET state = 'RELEASED', claimed_by = $3, released_at_ms = $4, sent_at_ms = 0 \
         WHERE {owner} = $1 AND {number} = $2 AND state = 'PENDING'"
    ))
    .bind(id)
    .bind(i64::from(n))
    .bind(claimer)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(updated.rows_affected() == 1)
}
