//! Batches and their chunks: staging, release by policy, and running a chunk in one transaction.
//!
//! A chunk's outcome is its commit marker: a committed chunk's state is written in the same
//! transaction as its records, and a chunk is only run while its state is not an outcome, under a
//! lock on its row. So a chunk delivered twice (a worker killed, a manager failover) commits once,
//! and the second delivery reads the recorded outcome.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};
use tokio::time::Instant;

use crate::changes::Topic;
use crate::model::{Cursor, Fields, ObjectSchema};
use crate::release::{self, Releasable, Release};
use crate::schema::{RecordProblem, record_id, record_problems};
use crate::writer::{BatchWriter, RecordWrite, sets_unique};
use crate::{Backend, Error, Missing, Store, completions, new_id, now_ms};

/// The most records a chunk may hold.
pub const MAX_CHUNK_SIZE: u32 = 100_000;

/// How long releases are deferred after a chunk committed only after meeting a busy database.
pub const OVERLOAD_PAUSE_MS: i64 = 1_000;

/// What a batch does to each record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchOp {
    /// Create or replace by external id.
    Upsert,
    /// Create; an existing live record is an error.
    Insert,
    /// Replace; a missing record is an error.
    Update,
    /// Delete by external id; a missing record is not an error.
    Delete,
}

stored_names!(BatchOp, "batch operation" {
    Upsert => "upsert",
    Insert => "insert",
    Update => "update",
    Delete => "delete",
});

/// Where a chunk is: in flight, or its one outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChunkState {
    /// Queued.
    Pending,
    /// Released to the workers.
    Released,
    /// A worker runs it.
    Running,
    /// Committed on the first try.
    Committed,
    /// Committed after a resource-limit retry.
    CommittedAfterRetryResources,
    /// Committed after a busy-database retry.
    CommittedAfterRetryWorkload,
    /// Nothing committed.
    Aborted,
    /// Never run: its batch was cancelled first.
    Cancelled,
}

stored_names!(ChunkState, "chunk state" {
    Pending => "PENDING",
    Released => "RELEASED",
    Running => "RUNNING",
    Committed => "COMMITTED",
    CommittedAfterRetryResources => "COMMITTED_AFTER_RETRY_RESOURCES",
    CommittedAfterRetryWorkload => "COMMITTED_AFTER_RETRY_WORKLOAD",
    Aborted => "ABORTED",
    Cancelled => "CANCELLED",
});

impl ChunkState {
    /// Whether this is an outcome (the chunk is done).
    pub fn is_outcome(self) -> bool {
        !matches!(self, ChunkState::Pending | ChunkState::Released | ChunkState::Running)
    }

    /// Whether the chunk's records are committed.
    pub fn is_committed(self) -> bool {
        matches!(
            self,
            ChunkState::Committed | ChunkState::CommittedAfterRetryResources | ChunkState::CommittedAfterRetryWorkload
        )
    }
}

/// The states a chunk may be run in (SQL list).
const RUNNABLE: &str = "('PENDING', 'RELEASED', 'RUNNING')";

/// A batch to stage.
#[derive(Debug, Clone)]
pub struct NewBatch {
    /// The object.
    pub object: String,
    /// The operation.
    pub operation: BatchOp,
    /// Records per chunk, 1..=[`MAX_CHUNK_SIZE`].
    pub chunk_size: u32,
    /// No release before this time (ms since the epoch).
    pub not_before_ms: i64,
    /// Chunks of the batch in flight at most (0: the scheduler's per-org cap).
    pub max_parallel: u32,
    /// Records released per second at most (0: no limit).
    pub records_per_second: u32,
    /// The client's id for idempotent resubmission.
    pub request_id: Option<String>,
    /// The trace context (W3C `traceparent`) of the request that submitted it, which its chunks
    /// continue; empty when traces are not exported.
    pub traceparent: String,
    /// The webhook the batch's completion is pushed to (see [`crate::completions`]). Not read
    /// back with the batch: [`Store::completion`] tells its delivery.
    pub webhook: Option<String>,
}

/// What [`Store::begin_batch`] found.
#[derive(Debug, Clone)]
pub enum BatchStart {
    /// A new batch to stage records into.
    New(String),
    /// A batch staged earlier with the same request id.
    Existing(Box<BatchInfo>),
}

/// Where a batch is, as seen from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchState {
    /// Records are being uploaded.
    Staging,
    /// Chunks are queued or running.
    Running,
    /// Every chunk has its outcome.
    Done,
    /// Cancelled (chunks may still be in flight: see the totals).
    Cancelled,
}

/// Chunk counts of a batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchTotals {
    /// Chunks in all.
    pub chunks: u32,
    /// Records in all.
    pub records: u64,
    /// Waiting for release.
    pub pending: u32,
    /// Released or running.
    pub in_flight: u32,
    /// Committed on the first try.
    pub committed: u32,
    /// Committed after a resource retry.
    pub committed_after_retry_resources: u32,
    /// Committed after a workload retry.
    pub committed_after_retry_workload: u32,
    /// Aborted.
    pub aborted: u32,
    /// Cancelled.
    pub cancelled: u32,
    /// Records committed: those of committed chunks, and those of the committed parts of chunks
    /// split after a resource limit that are still running or aborted.
    pub records_committed: u64,
}

/// A batch with its totals.
#[derive(Debug, Clone)]
pub struct BatchInfo {
    /// The batch id.
    pub id: String,
    /// The org.
    pub org_id: String,
    /// What was submitted: object, operation, chunk size, release policy, request id.
    pub spec: NewBatch,
    /// Its state.
    pub state: BatchState,
    /// Chunk counts.
    pub totals: BatchTotals,
    /// Submitted at (ms).
    pub created_at_ms: i64,
    /// Done or cancelled at (ms), 0 before.
    pub finished_at_ms: i64,
}

impl BatchInfo {
    /// Whether nothing more will happen to the batch: every chunk has its outcome, or it was
    /// cancelled and nothing is in flight.
    pub fn is_finished(&self) -> bool {
        match self.state {
            BatchState::Done => true,
            BatchState::Cancelled => self.totals.in_flight == 0,
            _ => false,
        }
    }
}

/// One chunk's status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkInfo {
    /// Its number in the batch.
    pub index: u32,
    /// The batch index of its first record.
    pub first_record: u64,
    /// Its records.
    pub records: u32,
    /// Its state.
    pub state: ChunkState,
    /// Attempts made.
    pub attempts: u32,
    /// The last worker.
    pub worker: String,
    /// Why the last attempt failed, or why it aborted.
    pub last_cause: String,
    /// The last attempt's start (ms), 0 before.
    pub started_at_ms: i64,
    /// When it got its outcome (ms), 0 before.
    pub finished_at_ms: i64,
    /// Invalid records.
    pub error_count: u32,
    /// Its records committed: all of them for a committed chunk; for a chunk split after a
    /// resource limit (see [`ChunkPart`]), those of its committed parts, even when it aborted.
    pub records_committed: u32,
    /// Its parts, in record order, when it was split after a resource limit (empty: it runs, or
    /// ran, whole). They partition the chunk's records.
    pub parts: Vec<ChunkPart>,
}

/// Where a part of a split chunk is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartState {
    /// Not run yet (or its attempts go on).
    Pending,
    /// Its records are committed (in the part's own transaction).
    Committed,
    /// Nothing of it is committed (see its cause).
    Aborted,
}

stored_names!(PartState, "chunk part state" {
    Pending => "PENDING",
    Committed => "COMMITTED",
    Aborted => "ABORTED",
});

/// Which records of a chunk a part holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct PartRange {
    /// Its first record, as an offset in the chunk (from 0).
    pub first: u32,
    /// Its records.
    pub records: u32,
}

/// A part of a chunk that was split after a resource limit: its own transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkPart {
    /// Its records.
    pub range: PartRange,
    /// Its state.
    pub state: PartState,
    /// Why it aborted.
    pub cause: String,
    /// When it committed or aborted (ms), 0 before.
    pub finished_at_ms: i64,
}

/// What [`Store::split_chunk`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// The part (or the whole chunk) is replaced by its two halves, PENDING.
    Halves,
    /// The part is at the floor (`floor` records or fewer): not split.
    AtFloor,
    /// Nothing to split: the part is no longer pending (an earlier delivery committed, aborted
    /// or split it), the chunk is split already, or the chunk has its outcome.
    Gone,
}

/// One attempt at a chunk, or at a part of it: see [`Store::attempt_chunk`].
#[derive(Debug, Clone)]
pub struct Attempt<'a> {
    /// The outcome a commit of the whole chunk records.
    pub outcome: ChunkState,
    /// Why earlier attempts failed (recorded with the outcome).
    pub cause: &'a str,
    /// The time budget of the transaction.
    pub budget: Duration,
    /// How long a lock is waited for before the attempt fails as busy.
    pub lock_timeout: Duration,
    /// The size budget: the most bytes of record text (JSON; ids for a delete) one transaction
    /// writes. More is answered [`ChunkRun::OverSize`], before any transaction.
    pub max_bytes: u64,
    /// The part to run, or None: the whole chunk.
    pub part: Option<PartRange>,
}

/// A chunk released to the workers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkRef {
    /// The org.
    pub org_id: String,
    /// The batch.
    pub batch_id: String,
    /// The chunk's number.
    pub index: u32,
    /// Its records.
    pub records: u32,
    /// The trace context of the request that submitted its batch (empty: none).
    pub traceparent: String,
}

/// The parallelism caps of a release.
#[derive(Debug, Clone, Copy)]
pub struct ReleaseCaps {
    /// Chunks in flight overall.
    pub overall: u32,
    /// Chunks in flight per org (and per batch, unless the batch asks for fewer).
    pub per_org: u32,
}

/// What [`Store::recover_chunks`] (or [`Store::recover_parts`]) did for a restarted scheduler.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Released, not marked sent, and held by the manager: now marked sent.
    pub marked_sent: u64,
    /// Released, not marked sent, and not held by the manager: pending again, released at once.
    pub released_again: u64,
    /// Of those said to be held, the ones still in flight (id, number).
    pub in_flight: Vec<(String, u32)>,
}

/// What a worker may do with a chunk delivered to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkStart {
    /// Run it: it is marked RUNNING.
    Run,
    /// It has its outcome already (a redelivery): answer it.
    Finished(ChunkState),
}

/// What one attempt at a chunk did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkRun {
    /// Committed, with this outcome.
    Committed(ChunkState),
    /// Records are invalid (indexes in the batch); nothing was committed.
    Invalid(Vec<RecordProblem>),
    /// The chunk had its outcome already; nothing was done.
    Finished(ChunkState),
    /// The records to write are over the size budget; nothing was done (a resource limit: the
    /// chunk, or the part, is to be split).
    OverSize {
        /// Their size (bytes of JSON text).
        bytes: u64,
        /// The budget.
        limit: u64,
    },
    /// The whole chunk was asked for, but it is split: its parts are to be run; nothing was done.
    Split,
    /// The part committed (its records and its COMMITTED state, in one transaction).
    PartCommitted,
    /// The part is no longer pending (an earlier delivery committed, aborted or split it);
    /// nothing was done.
    PartGone,
}

pub(crate) fn u32_of(row: &AnyRow, i: usize) -> Result<u32, Error> {
    Ok(u32::try_from(row.try_get::<i64, _>(i)?).unwrap_or(u32::MAX))
}

/// A part from its row, from column `at`: part_first, record_count, state, cause, finished_at_ms.
fn part_of(row: &AnyRow, at: usize) -> Result<ChunkPart, Error> {
    Ok(ChunkPart {
        range: PartRange { first: u32_of(row, at)?, records: u32_of(row, at + 1)? },
        state: PartState::parse(&row.try_get::<String, _>(at + 2)?)?,
        cause: row.try_get(at + 3)?,
        finished_at_ms: row.try_get(at + 4)?,
    })
}

/// The columns of a batch row that [`batch_info`] reads, in its order.
const BATCH_COLUMNS: &str = "id, org_id, request_id, object, operation, chunk_size, not_before_ms, max_parallel, \
     records_per_second, state, created_at_ms, finished_at_ms, traceparent";

/// The chunk counts of a batch by state, after its `batch_id`, that [`batch_info`] reads (from
/// `chunks` grouped by batch and state): the state, its chunks, their records, their latest
/// finish, the records their committed parts hold (chunks split after a resource limit).
const CHUNK_COUNTS: &str = "state, COUNT(*), CAST(COALESCE(SUM(record_count), 0) AS BIGINT), \
     COALESCE(MAX(finished_at_ms), 0), CAST(COALESCE(SUM(parts_committed), 0) AS BIGINT)";

/// A batch from its row ([`BATCH_COLUMNS`]) and its chunk counts ([`CHUNK_COUNTS`]).
fn batch_info(row: &AnyRow, counts: &[AnyRow]) -> Result<BatchInfo, Error> {
    let stored: String = row.try_get(9)?;
    let mut totals = BatchTotals::default();
    let mut last_finish = 0i64;
    for c in counts {
        let state = ChunkState::parse(&c.try_get::<String, _>(1)?)?;
        let n = u32_of(c, 2)?;
        let records = c.try_get::<i64, _>(3)? as u64;
        last_finish = last_finish.max(c.try_get(4)?);
        totals.chunks += n;
        totals.records += records;
        match state {
            ChunkState::Pending => totals.pending += n,
            ChunkState::Released | ChunkState::Running => totals.in_flight += n,
            ChunkState::Committed => totals.committed += n,
            ChunkState::CommittedAfterRetryResources => totals.committed_after_retry_resources += n,
            ChunkState::CommittedAfterRetryWorkload => totals.committed_after_retry_workload += n,
            ChunkState::Aborted => totals.aborted += n,
            ChunkState::Cancelled => totals.cancelled += n,
        }
        if state.is_committed() {
            totals.records_committed += records;
        } else {
            // the committed parts of split chunks that are still running or aborted
            totals.records_committed += c.try_get::<i64, _>(5)? as u64;
        }
    }
    let state = match stored.as_str() {
        "STAGING" => BatchState::Staging,
        "CANCELLED" => BatchState::Cancelled,
        _ if totals.pending == 0 && totals.in_flight == 0 => BatchState::Done,
        _ => BatchState::Running,
    };
    let finished_at_ms = match state {
        BatchState::Done => last_finish,
        BatchState::Cancelled if totals.in_flight == 0 => last_finish.max(row.try_get(11)?),
        _ => 0,
    };
    Ok(BatchInfo {
        id: row.try_get(0)?,
        org_id: row.try_get(1)?,
        spec: NewBatch {
            object: row.try_get(3)?,
            operation: BatchOp::parse(&row.try_get::<String, _>(4)?)?,
            chunk_size: u32_of(row, 5)?,
            not_before_ms: row.try_get(6)?,
            max_parallel: u32_of(row, 7)?,
            records_per_second: u32_of(row, 8)?,
            request_id: row.try_get(2)?,
            traceparent: row.try_get(12)?,
            webhook: None,
        },
        state,
        totals,
        created_at_ms: row.try_get(10)?,
        finished_at_ms,
    })
}

impl Store {
    /// Starts staging a batch, or finds the one staged earlier with the same request id. A batch
    /// left half-staged by a broken upload with the same request id is replaced.
    pub async fn begin_batch(&self, org_id: &str, new: &NewBatch) -> Result<BatchStart, Error> {
        self.object(org_id, &new.object).await?;
        if let Some(request_id) = &new.request_id {
            let row = sqlx::query("SELECT id, state FROM batches WHERE org_id = $1 AND request_id = $2")
                .bind(org_id)
                .bind(request_id.clone())
                .fetch_optional(&self.writer)
                .await?;
            if let Some(row) = row {
                let id: String = row.try_get(0)?;
                if row.try_get::<String, _>(1)? != "STAGING" {
                    return Ok(BatchStart::Existing(Box::new(self.batch(org_id, &id).await?)));
                }
                self.abandon_batch(org_id, &id).await?;
            }
        }
        let id = new_id("bat");
        // the batch and where its completion goes, together
        let mut tx = self.writer.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO batches (id, org_id, request_id, object, operation, chunk_size, not_before_ms, \
             max_parallel, records_per_second, state, created_at_ms, traceparent) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'STAGING', $10, $11)",
        )
        .bind(id.clone())
        .bind(org_id)
        .bind(new.request_id.clone())
        .bind(new.object.clone())
        .bind(new.operation.as_str())
        .bind(i64::from(new.chunk_size))
        .bind(new.not_before_ms)
        .bind(i64::from(new.max_parallel))
        .bind(i64::from(new.records_per_second))
        .bind(now_ms())
        .bind(new.traceparent.clone())
        .execute(&mut *tx)
        .await;
        match inserted {
            Ok(_) => {
                if let Some(url) = &new.webhook {
                    completions::insert(&mut tx, completions::Kind::Batch, &id, org_id, url).await?;
                }
                tx.commit().await?;
                Ok(BatchStart::New(id))
            }
            // another upload with the same request id got in first
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(Error::AlreadyExists(format!(
                "a batch with request id {:?} (being uploaded now)",
                new.request_id.clone().unwrap_or_default()
            ))),
            Err(e) => Err(e.into()),
        }
    }

    /// Stages chunk `index` of a staging batch: its records, the first being record
    /// `first_record` of the batch.
    pub async fn stage_chunk(
        &self,
        org_id: &str,
        batch_id: &str,
        index: u32,
        first_record: u64,
        records: &[Fields],
    ) -> Result<(), Error> {
        let json = serde_json::to_string(records).map_err(|e| Error::Corrupt(format!("chunk records: {e}")))?;
        let mut tx = self.writer.begin().await?;
        let staging = sqlx::query("SELECT 1 FROM batches WHERE id = $1 AND org_id = $2 AND state = 'STAGING'")
            .bind(batch_id)
            .bind(org_id)
            .fetch_optional(&mut *tx)
            .await?;
        if staging.is_none() {
            return Err(Error::not_found(Missing::Batch, format!("staging batch {batch_id}")));
        }
        sqlx::query(
            "INSERT INTO chunks (batch_id, idx, org_id, first_record, record_count, state) \
             VALUES ($1, $2, $3, $4, $5, 'PENDING')",
        )
        .bind(batch_id)
        .bind(i64::from(index))
        .bind(org_id)
        .bind(first_record as i64)
        .bind(records.len() as i64)
        .execute(&mut *tx)
        .await?;
        // apart from the chunk's row, whose state changes several times (migration 0006)
        sqlx::query("INSERT INTO chunk_records (batch_id, idx, records) VALUES ($1, $2, $3)")
            .bind(batch_id)
            .bind(i64::from(index))
            .bind(json)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Ends the staging of a batch: its chunks become releasable.
    pub async fn finish_staging(&self, org_id: &str, batch_id: &str, records: u64, chunks: u32) -> Result<(), Error> {
        let done = sqlx::query(
            "UPDATE batches SET state = 'QUEUED', total_records = $3, total_chunks = $4 \
             WHERE id = $1 AND org_id = $2 AND state = 'STAGING'",
        )
        .bind(batch_id)
        .bind(org_id)
        .bind(records as i64)
        .bind(i64::from(chunks))
        .execute(&self.writer)
        .await?;
        if done.rows_affected() == 0 {
            return Err(Error::not_found(Missing::Batch, format!("staging batch {batch_id}")));
        }
        self.touched(Topic::Batch(batch_id));
        Ok(())
    }

    /// Drops a batch that is still staging (its upload broke), with its chunks.
    pub async fn abandon_batch(&self, org_id: &str, batch_id: &str) -> Result<(), Error> {
        let mut tx = self.writer.begin().await?;
        let gone = sqlx::query("DELETE FROM batches WHERE id = $1 AND org_id = $2 AND state = 'STAGING'")
            .bind(batch_id)
            .bind(org_id)
            .execute(&mut *tx)
            .await?;
        if gone.rows_affected() > 0 {
            sqlx::query("DELETE FROM chunk_records WHERE batch_id = $1").bind(batch_id).execute(&mut *tx).await?;
            sqlx::query("DELETE FROM chunks WHERE batch_id = $1").bind(batch_id).execute(&mut *tx).await?;
            sqlx::query("DELETE FROM completions WHERE subject_id = $1").bind(batch_id).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// A batch of the org, with its totals.
    pub async fn batch(&self, org_id: &str, batch_id: &str) -> Result<BatchInfo, Error> {
        let row = sqlx::query(&format!("SELECT {BATCH_COLUMNS} FROM batches WHERE id = $1 AND org_id = $2"))
            .bind(batch_id)
            .bind(org_id)
            .fetch_optional(&self.reader)
            .await?
            .ok_or_else(|| Error::not_found(Missing::Batch, format!("batch {batch_id}")))?;
        let counts = sqlx::query(&format!(
            "SELECT batch_id, {CHUNK_COUNTS} FROM chunks WHERE batch_id = $1 GROUP BY batch_id, state"
        ))
        .bind(batch_id)
        .fetch_all(&self.reader)
        .await?;
        batch_info(&row, &counts)
    }

    /// A page of the org's batches, newest first (by submission time, then id), each with its
    /// totals: at most `limit`, those after `after` (the last of the page before).
    pub async fn list_batches(
        &self,
        org_id: &str,
        after: Option<&Cursor>,
        limit: u32,
    ) -> Result<Vec<BatchInfo>, Error> {
        // `$2` and `$3`, the cursor, are past every batch on the first page
        let sql = format!(
            "SELECT {BATCH_COLUMNS} FROM batches WHERE org_id = $1 \
             AND (created_at_ms < $2 OR (created_at_ms = $2 AND id < $3)) \
             ORDER BY created_at_ms DESC, id DESC LIMIT $4"
        );
        let (before_ms, before_id) = match after {
            Some(c) => (c.created_at_ms, c.id.clone()),
            None => (i64::MAX, String::new()),
        };
        let rows = sqlx::query(&sql)
            .bind(org_id)
            .bind(before_ms)
            .bind(before_id)
            .bind(i64::from(limit))
            .fetch_all(&self.reader)
            .await?;
        let (Some(newest), Some(oldest)) = (rows.first(), rows.last()) else { return Ok(Vec::new()) };
        // the chunk counts of the batches from the page's oldest to its newest: those of the
        // page (and of any batch submitted within that span since, left out below)
        let counts = sqlx::query(&format!(
            "SELECT batch_id, {CHUNK_COUNTS} FROM chunks WHERE batch_id IN (SELECT id FROM batches \
             WHERE org_id = $1 AND (created_at_ms > $2 OR (created_at_ms = $2 AND id >= $3)) \
             AND (created_at_ms < $4 OR (created_at_ms = $4 AND id <= $5))) \
             GROUP BY batch_id, state"
        ))
        .bind(org_id)
        .bind(oldest.try_get::<i64, _>(10)?)
        .bind(oldest.try_get::<String, _>(0)?)
        .bind(newest.try_get::<i64, _>(10)?)
        .bind(newest.try_get::<String, _>(0)?)
        .fetch_all(&self.reader)
        .await?;
        let mut by_batch: HashMap<String, Vec<AnyRow>> = HashMap::new();
        for c in counts {
            by_batch.entry(c.try_get(0)?).or_default().push(c);
        }
        rows.iter()
            .map(|row| {
                let id: String = row.try_get(0)?;
                batch_info(row, by_batch.get(&id).map_or(&[][..], Vec::as_slice))
            })
            .collect()
    }

    /// Chunks of a batch of the org in index order, after `after` (all: None), at most `limit`,
    /// with the record errors of aborted ones when `with_errors`.
    pub async fn chunks(
        &self,
        org_id: &str,
        batch_id: &str,
        after: Option<u32>,
        limit: u32,
        aborted_only: bool,
        with_errors: bool,
    ) -> Result<Vec<(ChunkInfo, Vec<RecordProblem>)>, Error> {
        self.batch_exists(org_id, batch_id).await?;
        let errors = if with_errors { "errors" } else { "'[]'" };
        let sql = format!(
            "SELECT idx, first_record, record_count, state, attempts, worker, last_cause, started_at_ms, \
             finished_at_ms, error_count, {errors}, parts_committed FROM chunks WHERE batch_id = $1 AND idx > $2 {} \
             ORDER BY idx LIMIT $3",
            if aborted_only { "AND state = 'ABORTED'" } else { "" }
        );
        let rows = sqlx::query(&sql)
            .bind(batch_id)
            .bind(after.map_or(-1, i64::from))
            .bind(i64::from(limit))
            .fetch_all(&self.reader)
            .await?;
        // the parts of the page's split chunks, in one statement
        let mut parts: HashMap<u32, Vec<ChunkPart>> = HashMap::new();
        if let (Some(low), Some(high)) = (rows.first(), rows.last()) {
            let part_rows = sqlx::query(
                "SELECT idx, part_first, record_count, state, cause, finished_at_ms FROM chunk_parts \
                 WHERE batch_id = $1 AND idx >= $2 AND idx <= $3 ORDER BY idx, part_first",
            )
            .bind(batch_id)
            .bind(low.try_get::<i64, _>(0)?)
            .bind(high.try_get::<i64, _>(0)?)
            .fetch_all(&self.reader)
            .await?;
            for p in &part_rows {
                parts.entry(u32_of(p, 0)?).or_default().push(part_of(p, 1)?);
            }
        }
        rows.iter()
            .map(|row| {
                let index = u32_of(row, 0)?;
                let (records, state) = (u32_of(row, 2)?, ChunkState::parse(&row.try_get::<String, _>(3)?)?);
                let info = ChunkInfo {
                    index,
                    first_record: row.try_get::<i64, _>(1)? as u64,
                    records,
                    state,
                    attempts: u32_of(row, 4)?,
                    worker: row.try_get(5)?,
                    last_cause: row.try_get(6)?,
                    started_at_ms: row.try_get(7)?,
                    finished_at_ms: row.try_get(8)?,
                    error_count: u32_of(row, 9)?,
                    records_committed: if state.is_committed() { records } else { u32_of(row, 11)? },
                    parts: parts.remove(&index).unwrap_or_default(),
                };
                let errors: Vec<RecordProblem> = serde_json::from_str(&row.try_get::<String, _>(10)?)
                    .map_err(|e| Error::Corrupt(format!("chunk errors: {e}")))?;
                Ok((info, errors))
            })
            .collect()
    }

    async fn batch_exists(&self, org_id: &str, batch_id: &str) -> Result<(), Error> {
        sqlx::query("SELECT 1 FROM batches WHERE id = $1 AND org_id = $2")
            .bind(batch_id)
            .bind(org_id)
            .fetch_optional(&self.reader)
            .await?
            .map(|_| ())
            .ok_or_else(|| Error::not_found(Missing::Batch, format!("batch {batch_id}")))
    }

    /// Cancels a batch of the org: its pending chunks never run. Cancelling twice is harmless; a
    /// finished batch stays as it is.
    pub async fn cancel_batch(&self, org_id: &str, batch_id: &str) -> Result<BatchInfo, Error> {
        let before = self.batch(org_id, batch_id).await?;
        if matches!(before.state, BatchState::Done | BatchState::Cancelled) {
            return Ok(before);
        }
        let now = now_ms();
        let mut tx = self.writer.begin().await?;
        sqlx::query("UPDATE batches SET state = 'CANCELLED', finished_at_ms = $3 WHERE id = $1 AND org_id = $2")
            .bind(batch_id)
            .bind(org_id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "UPDATE chunks SET state = 'CANCELLED', finished_at_ms = $2 WHERE batch_id = $1 AND state = 'PENDING'",
        )
        .bind(batch_id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.touched(Topic::Batch(batch_id));
        self.batch(org_id, batch_id).await
    }

    /// Releases chunks by policy, at most up to the caps, for `claimer`: not before their batch's
    /// time, within its rate, within the caps on chunks in flight (overall, per org, per batch),
    /// and fairly across orgs (round robin, the org with the fewest in flight first). Releases are
    /// serialized across scheduler replicas (one lock row), so the caps hold exactly.
    ///
    /// Nothing is released for [`OVERLOAD_PAUSE_MS`] after a chunk committed only after meeting a
    /// busy database (COMMITTED_AFTER_RETRY_WORKLOAD): the store, not a worker's answer, says so,
    /// so every scheduler replica defers, and none releases in the moment between the commit and
    /// the answer.
    pub async fn release_chunks(&self, claimer: &str, caps: ReleaseCaps) -> Result<Vec<ChunkRef>, Error> {
        let now = now_ms();
        let Some(Release { mut tx, taken_back }) = self.begin_release(Releasable::Chunks, now).await? else {
            return Ok(Vec::new());
        };
        // the batches whose chunks change, to announce after the commit
        let mut touched = taken_back;
        let overloaded = sqlx::query(
            "SELECT 1 FROM chunks WHERE state = 'COMMITTED_AFTER_RETRY_WORKLOAD' AND finished_at_ms > $1 LIMIT 1",
        )
        .bind(now - OVERLOAD_PAUSE_MS)
        .fetch_optional(&mut *tx)
        .await?;
        if overloaded.is_some() {
            tx.commit().await?;
            self.touched_batches(&touched);
            return Ok(Vec::new());
        }
        let mut per_org: HashMap<String, u32> = HashMap::new();
        let mut per_batch: HashMap<String, u32> = HashMap::new();
        let mut overall = 0u32;
        let rows = sqlx::query(
            "SELECT org_id, batch_id, COUNT(*) FROM chunks WHERE state IN ('RELEASED', 'RUNNING') \
             GROUP BY org_id, batch_id",
        )
        .fetch_all(&mut *tx)
        .await?;
        for row in rows {
            let n = u32_of(&row, 2)?;
            *per_org.entry(row.try_get(0)?).or_default() += n;
            *per_batch.entry(row.try_get(1)?).or_default() += n;
            overall += n;
        }
        if overall >= caps.overall {
            tx.commit().await?;
            self.touched_batches(&touched);
            return Ok(Vec::new());
        }
        let room = caps.overall - overall;
        let rows = sqlx::query(
            "SELECT c.batch_id, c.idx, c.org_id, c.record_count, b.max_parallel, b.records_per_second, \
             b.next_release_ms, b.traceparent FROM (SELECT batch_id, idx, org_id, record_count, \
             ROW_NUMBER() OVER (PARTITION BY batch_id ORDER BY idx) AS rn FROM chunks WHERE state = 'PENDING') c \
             JOIN batches b ON b.id = c.batch_id \
             WHERE c.rn <= $1 AND b.state = 'QUEUED' AND b.not_before_ms <= $2 AND b.next_release_ms <= $2 \
             ORDER BY b.created_at_ms, b.id, c.idx",
        )
        .bind(i64::from(room))
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        struct Candidate {
            chunk: ChunkRef,
            max_parallel: u32,
            rate: u32,
        }
        let mut queues: Vec<(String, VecDeque<Candidate>)> = Vec::new();
        let mut next_release: HashMap<String, i64> = HashMap::new();
        for row in &rows {
            let chunk = ChunkRef {
                batch_id: row.try_get(0)?,
                index: u32_of(row, 1)?,
                org_id: row.try_get(2)?,
                records: u32_of(row, 3)?,
                traceparent: row.try_get(7)?,
            };
            next_release.insert(chunk.batch_id.clone(), row.try_get(6)?);
            let candidate = Candidate { max_parallel: u32_of(row, 4)?, rate: u32_of(row, 5)?, chunk };
            match queues.iter_mut().find(|(org, _)| *org == candidate.chunk.org_id) {
                Some((_, queue)) => queue.push_back(candidate),
                None => queues.push((candidate.chunk.org_id.clone(), VecDeque::from([candidate]))),
            }
        }
        // fair share: the org with the fewest chunks in flight goes first, then round robin
        queues.sort_by_key(|(org, _)| per_org.get(org).copied().unwrap_or(0));
        let mut released = Vec::new();
        let mut changed_rates: HashSet<String> = HashSet::new();
        while overall < caps.overall && !queues.is_empty() {
            queues.retain_mut(|(org, queue)| {
                if overall >= caps.overall {
                    return true;
                }
                let org_count = per_org.entry(org.clone()).or_default();
                while let Some(candidate) = queue.pop_front() {
                    if *org_count >= caps.per_org {
                        return false;
                    }
                    let batch = candidate.chunk.batch_id.clone();
                    let cap = if candidate.max_parallel == 0 { caps.per_org } else { candidate.max_parallel };
                    let batch_count = per_batch.entry(batch.clone()).or_default();
                    let next = next_release.get(&batch).copied().unwrap_or(0);
                    if *batch_count >= cap || next > now {
                        continue;
                    }
                    *batch_count += 1;
                    *org_count += 1;
                    overall += 1;
                    if candidate.rate > 0 {
                        let spacing = i64::from(candidate.chunk.records) * 1000 / i64::from(candidate.rate);
                        next_release.insert(batch.clone(), next.max(now) + spacing);
                        changed_rates.insert(batch);
                    }
                    released.push(candidate.chunk);
                    return true;
                }
                false
            });
        }
        let mut claimed = Vec::with_capacity(released.len());
        for chunk in released {
            // only what this transaction moved out of PENDING is ours to send (the lock row makes
            // this always so; the guard keeps a chunk from being sent twice even without it)
            if release::claim(&mut tx, Releasable::Chunks, &chunk.batch_id, chunk.index, claimer, now).await? {
                touched.insert(chunk.batch_id.clone());
                claimed.push(chunk);
            }
        }
        for batch in changed_rates {
            sqlx::query("UPDATE batches SET next_release_ms = $2 WHERE id = $1")
                .bind(batch.clone())
                .bind(next_release[&batch])
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        self.touched_batches(&touched);
        Ok(claimed)
    }

    /// Announces commits that changed the chunks of `batches`.
    pub(crate) fn touched_batches(&self, batches: &HashSet<String>) {
        for batch in batches {
            self.touched(Topic::Batch(batch));
        }
    }

    /// Records that a released chunk is in the manager's hands.
    pub async fn mark_sent(&self, chunk: &ChunkRef) -> Result<(), Error> {
        self.mark_release_sent(Releasable::Chunks, &chunk.batch_id, chunk.index).await
    }

    /// After scheduler `claimer` restarted, before its first release: each chunk it released and
    /// had not marked sent either reached the manager or not. Those in `held` (batch id, chunk
    /// index: what the restart data of its sessions lists as sent) did, and are marked sent, so
    /// they are never sent again; the others did not, and go back to PENDING, to be released at
    /// once rather than after [`release::UNSENT_RELEASE_TIMEOUT_MS`]. Also answers which chunks of `held`
    /// are still in flight (released or running), whose answers are still to come.
    pub async fn recover_chunks(&self, claimer: &str, held: &[(String, u32)]) -> Result<Recovered, Error> {
        self.recover_releases(Releasable::Chunks, claimer, held).await
    }

    /// A worker takes a delivered chunk: RUNNING, one more attempt, unless it has its outcome
    /// (then that is answered) or its batch was cancelled (then it is CANCELLED, never run). A
    /// chunk that was split is in flight with parts committed: it runs on to its outcome even in
    /// a cancelled batch.
    pub async fn start_chunk(&self, batch_id: &str, index: u32, worker: &str) -> Result<ChunkStart, Error> {
        let now = now_ms();
        let started = sqlx::query(&format!(
            "UPDATE chunks SET state = 'RUNNING', attempts = attempts + 1, worker = $3, started_at_ms = $4 \
             WHERE batch_id = $1 AND idx = $2 AND state IN {RUNNABLE} \
             AND ((SELECT state FROM batches WHERE id = $1) <> 'CANCELLED' \
             OR EXISTS (SELECT 1 FROM chunk_parts p WHERE p.batch_id = $1 AND p.idx = $2))"
        ))
        .bind(batch_id)
        .bind(i64::from(index))
        .bind(worker)
        .bind(now)
        .execute(&self.writer)
        .await?;
        if started.rows_affected() == 1 {
            self.touched(Topic::Batch(batch_id));
            return Ok(ChunkStart::Run);
        }
        let cancelled = sqlx::query(&format!(
            "UPDATE chunks SET state = 'CANCELLED', finished_at_ms = $3 WHERE batch_id = $1 AND idx = $2 \
             AND state IN {RUNNABLE}"
        ))
        .bind(batch_id)
        .bind(i64::from(index))
        .bind(now)
        .execute(&self.writer)
        .await?;
        if cancelled.rows_affected() > 0 {
            self.touched(Topic::Batch(batch_id));
        }
        Ok(ChunkStart::Finished(self.chunk_state(batch_id, index).await?))
    }

    /// A chunk's state.
    pub async fn chunk_state(&self, batch_id: &str, index: u32) -> Result<ChunkState, Error> {
        let row = sqlx::query("SELECT state FROM chunks WHERE batch_id = $1 AND idx = $2")
            .bind(batch_id)
            .bind(i64::from(index))
            .fetch_optional(&self.writer)
            .await?
            .ok_or_else(|| Error::not_found(Missing::Chunk, format!("chunk {index} of batch {batch_id}")))?;
        ChunkState::parse(&row.try_get::<String, _>(0)?)
    }

    /// Notes why an attempt at a chunk failed (it will be retried).
    pub async fn note_chunk_retry(&self, batch_id: &str, index: u32, cause: &str) -> Result<(), Error> {
        sqlx::query("UPDATE chunks SET last_cause = $3 WHERE batch_id = $1 AND idx = $2")
            .bind(batch_id)
            .bind(i64::from(index))
            .bind(cause)
            .execute(&self.writer)
            .await?;
        self.touched(Topic::Batch(batch_id));
        Ok(())
    }

    /// Aborts a chunk that has no outcome yet, with its record problems and cause; answers the
    /// chunk's outcome (ABORTED, or the one recorded before).
    pub async fn abort_chunk(
        &self,
        batch_id: &str,
        index: u32,
        problems: &[RecordProblem],
        cause: &str,
    ) -> Result<ChunkState, Error> {
        let errors = serde_json::to_string(problems).map_err(|e| Error::Corrupt(format!("chunk errors: {e}")))?;
        sqlx::query(&format!(
            "UPDATE chunks SET state = 'ABORTED', errors = $3, error_count = $4, last_cause = $5, \
             finished_at_ms = $6 WHERE batch_id = $1 AND idx = $2 AND state IN {RUNNABLE}"
        ))
        .bind(batch_id)
        .bind(i64::from(index))
        .bind(errors)
        .bind(problems.len() as i64)
        .bind(cause)
        .bind(now_ms())
        .execute(&self.writer)
        .await?;
        self.touched(Topic::Batch(batch_id));
        self.chunk_state(batch_id, index).await
    }

    /// What a worker needs to run a chunk that has no outcome yet (None when it has one).
    async fn chunk_work(&self, batch_id: &str, index: u32) -> Result<Option<ChunkWork>, Error> {
        let row = sqlx::query(&format!(
            "SELECT r.records, c.first_record, c.org_id, b.object, b.operation FROM chunks c \
             JOIN batches b ON b.id = c.batch_id JOIN chunk_records r ON r.batch_id = c.batch_id AND r.idx = c.idx \
             WHERE c.batch_id = $1 AND c.idx = $2 AND c.state IN {RUNNABLE}"
        ))
        .bind(batch_id)
        .bind(i64::from(index))
        .fetch_optional(&self.reader)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let org_id: String = row.try_get(2)?;
        let records: Vec<Fields> = serde_json::from_str(&row.try_get::<String, _>(0)?)
            .map_err(|e| Error::Corrupt(format!("chunk records: {e}")))?;
        Ok(Some(ChunkWork {
            first: row.try_get::<i64, _>(1)? as usize,
            schema: self.object(&org_id, &row.try_get::<String, _>(3)?).await?,
            op: BatchOp::parse(&row.try_get::<String, _>(4)?)?,
            org_id,
            records,
        }))
    }

    /// One attempt at a chunk, in one transaction bounded by `budget`: [`Store::attempt_chunk`]
    /// of the whole chunk, without a size budget.
    pub async fn run_chunk(
        &self,
        batch_id: &str,
        index: u32,
        outcome: ChunkState,
        cause: &str,
        budget: Duration,
        lock_timeout: Duration,
    ) -> Result<ChunkRun, Error> {
        let attempt = Attempt { outcome, cause, budget, lock_timeout, max_bytes: u64::MAX, part: None };
        self.attempt_chunk(batch_id, index, &attempt).await
    }

    /// One attempt at a chunk, or at one part of a split chunk, in one transaction bounded by
    /// `attempt.budget`: validates its records against the object schema and the operation,
    /// writes them with their change events, and records its commit marker — for the whole
    /// chunk `attempt.outcome` as the chunk's state (with `attempt.cause`, why earlier attempts
    /// failed), for a part the part's COMMITTED state — all committed together, or nothing.
    ///
    /// A chunk that has its outcome already is not run again, nor a part that is no longer
    /// PENDING ([`ChunkRun::PartGone`]), nor the whole of a chunk that was split
    /// ([`ChunkRun::Split`]): the chunk's row lock, taken first, orders this against every other
    /// delivery and split. Invalid records are answered (with their batch indexes), not
    /// committed. Records over `attempt.max_bytes` are answered [`ChunkRun::OverSize`] before
    /// any transaction. Database failures are errors: [`Error::Busy`] (workload),
    /// [`Error::Resource`] and [`Error::DeadlineExceeded`] (resources) are worth a retry.
    pub async fn attempt_chunk(&self, batch_id: &str, index: u32, attempt: &Attempt<'_>) -> Result<ChunkRun, Error> {
        let Attempt { outcome, cause, budget, lock_timeout, max_bytes, part } = *attempt;
        let deadline = Instant::now() + budget;
        // The chunk is read, parsed and checked against the schema before its transaction: on
        // SQLite the transaction's first write takes the database's write lock, and on both
        // backends other chunks of the org queue behind this one's. A chunk's records and batch
        // never change once staged, so reading them first loses nothing.
        let Some(mut chunk) = self.by_deadline(deadline, self.chunk_work(batch_id, index)).await? else {
            return Ok(ChunkRun::Finished(self.chunk_state(batch_id, index).await?));
        };
        if let Some(p) = part {
            let (from, to) = (p.first as usize, p.first as usize + p.records as usize);
            if to > chunk.records.len() || p.records == 0 {
                return Err(Error::Corrupt(format!("part {from}..{to} of a chunk of {}", chunk.records.len())));
            }
            chunk.records.truncate(to);
            chunk.records.drain(..from);
            chunk.first += from;
        }
        let first = chunk.first;
        let invalid = |mut problems: Vec<RecordProblem>| {
            for p in &mut problems {
                p.index += first;
            }
            ChunkRun::Invalid(problems)
        };
        let problems = match chunk.op {
            BatchOp::Delete => delete_problems(&chunk.schema, &chunk.records),
            _ => record_problems(&chunk.schema, &mut chunk.records),
        };
        if !problems.is_empty() {
            // every failing record is listed: those the schema accepts are checked against what
            // is stored too (a unique value taken, an insert of an existing record)
            let valid: Vec<usize> =
                (0..chunk.records.len()).filter(|i| !problems.iter().any(|p| p.index == *i)).collect();
            let stored = self.by_deadline(deadline, self.stored_problems_of(&chunk, &valid)).await?;
            let mut problems = problems;
            problems.extend(stored);
            problems.sort_by_key(|p| p.index);
            return Ok(invalid(problems));
        }
        let ChunkWork { org_id, schema, op, records, .. } = chunk;
        // Each record's id and JSON text are worked out before the transaction too: inside it
        // they held the org's write lock (on SQLite, the database's), 3.4 ms of a 47 ms chunk.
        let ids: Vec<String> = records.iter().map(|r| record_id(&schema, r).unwrap_or_default()).collect();
        let texts: Vec<String> = match op {
            BatchOp::Delete => Vec::new(),
            _ => records
                .iter()
                .map(serde_json::to_string)
                .collect::<Result<_, _>>()
                .map_err(|e| Error::Corrupt(format!("record fields: {e}")))?,
        };
        // the size budget: what the transaction would write, as text
        let bytes: u64 = match op {
            BatchOp::Delete => ids.iter().map(|id| id.len() as u64).sum(),
            _ => texts.iter().map(|t| t.len() as u64).sum(),
        };
        if bytes > max_bytes {
            return Ok(ChunkRun::OverSize { bytes, limit: max_bytes });
        }
        let part_records = records.len() as i64;
        let (tx, run) = self
            .by_deadline(deadline, async {
                let mut tx = self.writer.begin().await?;
                let ms = |d: Duration| d.as_millis().max(1);
                if self.backend == Backend::Postgres {
                    // the server stops the work too
                    let left = deadline.saturating_duration_since(Instant::now());
                    sqlx::query(&format!("SET LOCAL statement_timeout = {}", ms(left))).execute(&mut *tx).await?;
                    // abandoned at its budget, the transaction is ended by the server a moment later
                    // rather than when its connection is next used (see `Store::open`)
                    sqlx::query(&format!("SET LOCAL idle_in_transaction_session_timeout = {}", ms(left) + 500))
                        .execute(&mut *tx)
                        .await?;
                }
                // the chunk's row lock: a second delivery waits here, then finds the outcome
                let claimed = sqlx::query(&format!(
                    "UPDATE chunks SET finished_at_ms = 0 WHERE batch_id = $1 AND idx = $2 AND state IN {RUNNABLE}"
                ))
                .bind(batch_id)
                .bind(i64::from(index))
                .execute(&mut *tx)
                .await?;
                if claimed.rows_affected() == 0 {
                    return Ok((tx, None));
                }
                // under the row lock: the whole chunk runs only while it has no parts, a part only
                // while it is pending (its marker is written below, in this transaction)
                match part {
                    None => {
                        if self.has_parts(&mut tx, batch_id, index).await? {
                            return Ok((tx, Some((ChunkRun::Split, 0))));
                        }
                    }
                    Some(p) => {
                        if self.part_state(&mut tx, batch_id, index, p).await? != Some(PartState::Pending) {
                            return Ok((tx, Some((ChunkRun::PartGone, 0))));
                        }
                    }
                }
                // Chunks of one org queue on its write lock (seqs are allocated under it): that wait
                // is the normal order of things, bounded by the budget only. Any other lock wait ends
                // as a busy error after `lock_timeout`.
                let base = self.lock_org(&mut tx, &org_id).await?;
                if self.backend == Backend::Postgres {
                    sqlx::query(&format!("SET LOCAL lock_timeout = {}", ms(lock_timeout))).execute(&mut *tx).await?;
                }
                let run = self.write_chunk(&mut tx, &org_id, base, &schema, op, records, ids, texts).await?;
                let run = match (run, part) {
                    (Err(problems), _) => (invalid(problems), base),
                    (Ok(last), None) => {
                        sqlx::query(
                            "UPDATE chunks SET state = $3, finished_at_ms = $4, last_cause = $5 \
                         WHERE batch_id = $1 AND idx = $2",
                        )
                        .bind(batch_id)
                        .bind(i64::from(index))
                        .bind(outcome.as_str())
                        .bind(now_ms())
                        .bind(cause)
                        .execute(&mut *tx)
                        .await?;
                        (ChunkRun::Committed(outcome), last)
                    }
                    (Ok(last), Some(p)) => {
                        // the part's commit marker, and its records counted on the chunk
                        sqlx::query(
                            "UPDATE chunk_parts SET state = 'COMMITTED', finished_at_ms = $4 \
                         WHERE batch_id = $1 AND idx = $2 AND part_first = $3 AND state = 'PENDING'",
                        )
                        .bind(batch_id)
                        .bind(i64::from(index))
                        .bind(i64::from(p.first))
                        .bind(now_ms())
                        .execute(&mut *tx)
                        .await?;
                        sqlx::query(
                            "UPDATE chunks SET parts_committed = parts_committed + $3, last_cause = $4 \
                         WHERE batch_id = $1 AND idx = $2",
                        )
                        .bind(batch_id)
                        .bind(i64::from(index))
                        .bind(part_records)
                        .bind(cause)
                        .execute(&mut *tx)
                        .await?;
                        (ChunkRun::PartCommitted, last)
                    }
                };
                Ok((tx, Some(run)))
            })
            .await?;
        match run {
            None => {
                drop(tx);
                Ok(ChunkRun::Finished(self.chunk_state(batch_id, index).await?))
            }
            Some((run @ (ChunkRun::Committed(_) | ChunkRun::PartCommitted), last)) => {
                tx.commit().await?;
                self.committed(&org_id, last);
                self.touched(Topic::Batch(batch_id));
                Ok(run)
            }
            // dropping the transaction rolls it back
            Some((run, _)) => Ok(run),
        }
    }

    /// Whether the chunk was split into parts, read in `conn`'s transaction.
    async fn has_parts(&self, conn: &mut AnyConnection, batch_id: &str, index: u32) -> Result<bool, Error> {
        let part = sqlx::query("SELECT 1 FROM chunk_parts WHERE batch_id = $1 AND idx = $2 LIMIT 1")
            .bind(batch_id)
            .bind(i64::from(index))
            .fetch_optional(&mut *conn)
            .await?;
        Ok(part.is_some())
    }

    /// A part's state, read in `conn`'s transaction (None: no such part).
    async fn part_state(
        &self,
        conn: &mut AnyConnection,
        batch_id: &str,
        index: u32,
        part: PartRange,
    ) -> Result<Option<PartState>, Error> {
        let row = sqlx::query(
            "SELECT state FROM chunk_parts WHERE batch_id = $1 AND idx = $2 AND part_first = $3 AND record_count = $4",
        )
        .bind(batch_id)
        .bind(i64::from(index))
        .bind(i64::from(part.first))
        .bind(i64::from(part.records))
        .fetch_optional(&mut *conn)
        .await?;
        row.map(|r| PartState::parse(&r.try_get::<String, _>(0)?)).transpose()
    }

    /// Splits a chunk that met a resource limit, or one of its parts, in halves, each to be run
    /// in its own transaction: under the chunk's row lock, `part` (None: the whole chunk, the
    /// first time) is replaced by its two halves, PENDING. A part of `floor` records or fewer
    /// (at least 1) is not split. Committed parts are never touched, so the parts of a chunk
    /// always partition its records and each record is in exactly one part.
    pub async fn split_chunk(
        &self,
        batch_id: &str,
        index: u32,
        part: Option<PartRange>,
        floor: u32,
    ) -> Result<Split, Error> {
        let mut tx = self.writer.begin().await?;
        let row = sqlx::query(&format!(
            "UPDATE chunks SET finished_at_ms = 0 WHERE batch_id = $1 AND idx = $2 AND state IN {RUNNABLE} \
             RETURNING record_count"
        ))
        .bind(batch_id)
        .bind(i64::from(index))
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else { return Ok(Split::Gone) };
        let range = match part {
            Some(p) => {
                if self.part_state(&mut tx, batch_id, index, p).await? != Some(PartState::Pending) {
                    return Ok(Split::Gone);
                }
                p
            }
            None => {
                if self.has_parts(&mut tx, batch_id, index).await? {
                    return Ok(Split::Gone);
                }
                PartRange { first: 0, records: u32_of(&row, 0)? }
            }
        };
        if range.records <= floor.max(1) {
            return Ok(Split::AtFloor);
        }
        if part.is_some() {
            sqlx::query("DELETE FROM chunk_parts WHERE batch_id = $1 AND idx = $2 AND part_first = $3")
                .bind(batch_id)
                .bind(i64::from(index))
                .bind(i64::from(range.first))
                .execute(&mut *tx)
                .await?;
        }
        let half = range.records / 2;
        for (first, records) in [(range.first, half), (range.first + half, range.records - half)] {
            sqlx::query(
                "INSERT INTO chunk_parts (batch_id, idx, part_first, record_count, state) \
                 VALUES ($1, $2, $3, $4, 'PENDING')",
            )
            .bind(batch_id)
            .bind(i64::from(index))
            .bind(i64::from(first))
            .bind(i64::from(records))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        self.touched(Topic::Batch(batch_id));
        Ok(Split::Halves)
    }

    /// The first pending part of a split chunk, in record order (None: none is pending, or the
    /// chunk is not split).
    pub async fn next_part(&self, batch_id: &str, index: u32) -> Result<Option<PartRange>, Error> {
        let row = sqlx::query(
            "SELECT part_first, record_count FROM chunk_parts WHERE batch_id = $1 AND idx = $2 AND state = 'PENDING' \
             ORDER BY part_first LIMIT 1",
        )
        .bind(batch_id)
        .bind(i64::from(index))
        .fetch_optional(&self.writer)
        .await?;
        row.map(|r| Ok(PartRange { first: u32_of(&r, 0)?, records: u32_of(&r, 1)? })).transpose()
    }

    /// Aborts a pending part of a split chunk with its record problems (batch indexes) and
    /// cause: nothing of it is committed. The chunk's other parts go on.
    pub async fn abort_part(
        &self,
        batch_id: &str,
        index: u32,
        part: PartRange,
        problems: &[RecordProblem],
        cause: &str,
    ) -> Result<(), Error> {
        let errors = serde_json::to_string(problems).map_err(|e| Error::Corrupt(format!("part errors: {e}")))?;
        sqlx::query(
            "UPDATE chunk_parts SET state = 'ABORTED', cause = $5, errors = $6, finished_at_ms = $7 \
             WHERE batch_id = $1 AND idx = $2 AND part_first = $3 AND record_count = $4 AND state = 'PENDING'",
        )
        .bind(batch_id)
        .bind(i64::from(index))
        .bind(i64::from(part.first))
        .bind(i64::from(part.records))
        .bind(cause)
        .bind(errors)
        .bind(now_ms())
        .execute(&self.writer)
        .await?;
        self.touched(Topic::Batch(batch_id));
        Ok(())
    }

    /// Records the outcome of a split chunk none of whose parts is pending: COMMITTED_AFTER_RETRY_RESOURCES
    /// when every part committed, else ABORTED with every aborted part's records, cause and
    /// record problems (the committed parts stay committed). The outcome already recorded when
    /// there is one; None while a part is still pending.
    pub async fn finish_split_chunk(&self, batch_id: &str, index: u32) -> Result<Option<ChunkState>, Error> {
        let mut tx = self.writer.begin().await?;
        let row = sqlx::query(&format!(
            "UPDATE chunks SET finished_at_ms = 0 WHERE batch_id = $1 AND idx = $2 AND state IN {RUNNABLE} \
             RETURNING first_record, last_cause"
        ))
        .bind(batch_id)
        .bind(i64::from(index))
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            drop(tx);
            return Ok(Some(self.chunk_state(batch_id, index).await?));
        };
        let (first_record, last_cause) = (row.try_get::<i64, _>(0)? as u64, row.try_get::<String, _>(1)?);
        let rows = sqlx::query(
            "SELECT part_first, record_count, state, cause, finished_at_ms, errors FROM chunk_parts \
             WHERE batch_id = $1 AND idx = $2 ORDER BY part_first",
        )
        .bind(batch_id)
        .bind(i64::from(index))
        .fetch_all(&mut *tx)
        .await?;
        let mut parts = Vec::with_capacity(rows.len());
        let mut problems: Vec<RecordProblem> = Vec::new();
        for r in &rows {
            parts.push(part_of(r, 0)?);
            problems.extend(
                serde_json::from_str::<Vec<RecordProblem>>(&r.try_get::<String, _>(5)?)
                    .map_err(|e| Error::Corrupt(format!("part errors: {e}")))?,
            );
        }
        if parts.is_empty() || parts.iter().any(|p| p.state == PartState::Pending) {
            return Ok(None);
        }
        let range = |p: &ChunkPart| {
            let from = first_record + u64::from(p.range.first);
            format!("records {from}-{}", from + u64::from(p.range.records) - 1)
        };
        let aborted: Vec<&ChunkPart> = parts.iter().filter(|p| p.state == PartState::Aborted).collect();
        let (outcome, cause) = if aborted.is_empty() {
            let cause = format!(
                "split into {} parts after a resource limit, each committed in its own transaction; {last_cause}",
                parts.len()
            );
            (ChunkState::CommittedAfterRetryResources, cause)
        } else {
            let committed = parts.len() - aborted.len();
            let failed: Vec<String> = aborted.iter().map(|p| format!("{}: {}", range(p), p.cause)).collect();
            let cause = format!(
                "split into {} parts after a resource limit: {committed} committed, {} aborted (nothing of \
                 them committed): {}",
                parts.len(),
                aborted.len(),
                failed.join("; ")
            );
            (ChunkState::Aborted, cause)
        };
        problems.sort_by_key(|p| p.index);
        let errors = serde_json::to_string(&problems).map_err(|e| Error::Corrupt(format!("chunk errors: {e}")))?;
        sqlx::query(
            "UPDATE chunks SET state = $3, finished_at_ms = $4, last_cause = $5, errors = $6, error_count = $7 \
             WHERE batch_id = $1 AND idx = $2",
        )
        .bind(batch_id)
        .bind(i64::from(index))
        .bind(outcome.as_str())
        .bind(now_ms())
        .bind(cause)
        .bind(errors)
        .bind(problems.len() as i64)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.touched(Topic::Batch(batch_id));
        Ok(Some(outcome))
    }

    /// Writes a chunk's records, valid against the schema, inside `conn`'s transaction, which
    /// holds the org's write lock (its last seq is `base`): the org's last seq after it, or the problems (chunk indexes) when a
    /// record conflicts with what is stored (an insert of an existing record, an update of a
    /// missing one, a unique value taken). `ids` and `texts` are the records' ids and JSON
    /// texts (no texts for a delete).
    #[allow(clippy::too_many_arguments)]
    async fn write_chunk(
        &self,
        conn: &mut AnyConnection,
        org_id: &str,
        base: i64,
        schema: &ObjectSchema,
        op: BatchOp,
        records: Vec<Fields>,
        ids: Vec<String>,
        texts: Vec<String>,
    ) -> Result<Result<i64, Vec<RecordProblem>>, Error> {
        // PostgreSQL, a chunk that upserts or inserts records none of which sets a unique value
        // (the usual batch): first tried as all new
        let all_new_first = self.backend == Backend::Postgres
            && matches!(op, BatchOp::Upsert | BatchOp::Insert)
            && !records.iter().any(|r| sets_unique(schema, r));
        if all_new_first
            && let Some(last) = self.write_fresh_chunk(conn, org_id, base, &schema.name, &ids, &texts).await?
        {
            // freed off the transaction, as a flush frees its writes ([`BatchWriter::flush`])
            tokio::task::spawn_blocking(move || drop((records, ids, texts)));
            return Ok(Ok(last));
        }
        let existing = self.versions_of(conn, org_id, &schema.name, &ids).await?;
        let live = |id: &str| existing.get(id).is_some_and(|(_, deleted)| !deleted);
        let mut problems = self.stored_problems(conn, org_id, schema, op, &records, &ids, &existing).await?;
        if !problems.is_empty() {
            problems.sort_by_key(|p| p.index);
            return Ok(Err(problems));
        }
        let mut writer = BatchWriter::new(self, conn, org_id, schema, &ids, base, now_ms()).await?;
        writer.known_absent(ids.iter().filter(|id| !existing.contains_key(*id)).cloned());
        let mut texts = texts.into_iter();
        for (record, id) in records.into_iter().zip(ids) {
            let version = existing.get(&id).map_or(1, |(v, _)| v + 1);
            let text = texts.next();
            let fields = match op {
                BatchOp::Delete if !live(&id) => continue,
                BatchOp::Delete => None,
                _ => Some(record),
            };
            writer.write(conn, RecordWrite { id, fields, version, text }).await?;
        }
        writer.flush(conn).await?;
        if writer.seq != base {
            self.set_last_seq(conn, org_id, writer.seq).await?;
        }
        Ok(Ok(writer.seq))
    }

    /// The problems (chunk indexes) of records that conflict with what is stored: an insert of an
    /// existing record, an update of a missing one, a unique value another record holds.
    /// `existing` holds the stored versions of `ids`.
    #[allow(clippy::too_many_arguments)]
    async fn stored_problems(
        &self,
        conn: &mut AnyConnection,
        org_id: &str,
        schema: &ObjectSchema,
        op: BatchOp,
        records: &[Fields],
        ids: &[String],
        existing: &HashMap<String, (i64, bool)>,
    ) -> Result<Vec<RecordProblem>, Error> {
        let live = |id: &str| existing.get(id).is_some_and(|(_, deleted)| !deleted);
        let mut problems = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            match op {
                BatchOp::Insert if live(id) => problems.push(RecordProblem::new(
                    i,
                    schema.external_id_field.clone(),
                    format!("record {id:?} already exists; an insert creates new records only"),
                )),
                BatchOp::Update if !live(id) => problems.push(RecordProblem::new(
                    i,
                    schema.external_id_field.clone(),
                    format!("record {id:?} does not exist; an update changes existing records only"),
                )),
                _ => {}
            }
        }
        if op != BatchOp::Delete {
            problems.extend(self.unique_conflicts(conn, org_id, schema, records, ids).await?);
        }
        Ok(problems)
    }

    /// [`Store::stored_problems`] of the records at `indexes` of a chunk that is aborted anyway
    /// (some record is invalid), read outside any transaction; chunk indexes.
    async fn stored_problems_of(&self, chunk: &ChunkWork, indexes: &[usize]) -> Result<Vec<RecordProblem>, Error> {
        let (mut records, mut ids, mut at) = (Vec::new(), Vec::new(), Vec::new());
        for &i in indexes {
            if let Some(id) = record_id(&chunk.schema, &chunk.records[i]) {
                records.push(chunk.records[i].clone());
                ids.push(id);
                at.push(i);
            }
        }
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.reader.acquire().await?;
        let existing = self.versions_of(&mut conn, &chunk.org_id, &chunk.schema.name, &ids).await?;
        let mut problems =
            self.stored_problems(&mut conn, &chunk.org_id, &chunk.schema, chunk.op, &records, &ids, &existing).await?;
        for p in &mut problems {
            p.index = at[p.index];
        }
        Ok(problems)
    }

    /// A chunk on PostgreSQL ([`Store::write_chunk`] says which) first written as if every record
    /// were new: records and change events by [`Store::insert_fresh`], under a savepoint, without
    /// looking up their versions, which took 18 of a chunk's 110 ms under the org's write lock in
    /// `bench batch`. The org's last seq after it when it was. When some record has a row (even a tombstone), the insert fails on the primary key at that
    /// row; the savepoint undoes the attempt, and false sends the chunk down the general path.
    /// A chunk of existing records fails at its first row, which costs a few ms (the arrays
    /// parsed, two savepoint statements). Validation has already refused an id named twice.
    async fn write_fresh_chunk(
        &self,
        conn: &mut AnyConnection,
        org_id: &str,
        base: i64,
        object: &str,
        ids: &[String],
        texts: &[String],
    ) -> Result<Option<i64>, Error> {
        let rows: Vec<(&str, &str)> = ids.iter().map(String::as_str).zip(texts.iter().map(String::as_str)).collect();
        let now = now_ms();
        sqlx::query("SAVEPOINT fresh_chunk").execute(&mut *conn).await?;
        let mut first = base + 1;
        for part in rows.chunks(self.rows_per_flush()) {
            match self.insert_fresh(conn, org_id, object, now, first, part).await {
                Ok(()) => first += part.len() as i64,
                Err(Error::Database(sqlx::Error::Database(db))) if db.code().as_deref() == Some("23505") => {
                    sqlx::query("ROLLBACK TO SAVEPOINT fresh_chunk").execute(&mut *conn).await?;
                    return Ok(None);
                }
                Err(e) => return Err(e),
            }
        }
        if first - 1 != base {
            self.set_last_seq(conn, org_id, first - 1).await?;
        }
        Ok(Some(first - 1))
    }
}

/// A chunk as read for a run: its records, where they start in the batch, and what to do with
/// them.
struct ChunkWork {
    org_id: String,
    schema: ObjectSchema,
    op: BatchOp,
    first: usize,
    records: Vec<Fields>,
}

/// The records of a delete: each names its record by the external id, once.
fn delete_problems(schema: &ObjectSchema, records: &[Fields]) -> Vec<RecordProblem> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut problems = Vec::new();
    for (i, record) in records.iter().enumerate() {
        match record_id(schema, record) {
            None => problems.push(RecordProblem::new(
                i,
                schema.external_id_field.clone(),
                "the external id is missing or not a string or integer",
            )),
            Some(id) => {
                if let Some(first) = seen.insert(id.clone(), i) {
                    problems.push(RecordProblem::new(
                        i,
                        schema.external_id_field.clone(),
                        format!("id {id:?} is also in records[{first}]; a request may name a record once"),
                    ));
                }
            }
        }
    }
    problems
}

impl Store {
    /// The chunks not yet finished, by state (`PENDING`, `RELEASED`, `RUNNING`), and the exports
    /// still producing: what the scheduler's gauges show. Both read indexes on `state`.
    pub async fn work_in_progress(&self) -> Result<(Vec<(String, i64)>, i64), Error> {
        let chunks =
            sqlx::query(&format!("SELECT state, COUNT(*) FROM chunks WHERE state IN {RUNNABLE} GROUP BY state"))
                .fetch_all(&self.reader)
                .await?
                .iter()
                .map(|row| Ok((row.try_get::<String, _>(0)?, row.try_get::<i64, _>(1)?)))
                .collect::<Result<Vec<_>, Error>>()?;
        let exports: i64 = sqlx::query("SELECT COUNT(*) FROM exports WHERE state = 'PRODUCING'")
            .fetch_one(&self.reader)
            .await?
            .try_get(0)?;
        Ok((chunks, exports))
    }
}
