//! Batches and their chunks: staging, release by policy, and running a chunk in one transaction.
//!
//! A chunk's outcome is its commit marker: a committed chunk's state is written in the same
//! transaction as its records, and a chunk is only run while its state is not an outcome, under a
//! lock on its row. So a chunk delivered twice (a worker killed, a manager failover) commits once,
//! and the second delivery reads the recorded outcome.
//!
//! This module holds the types, constants and row decoding; the work is in one file a concern:
//! `staging` (a batch uploaded chunk by chunk), `reads` (batches and chunks as clients see them,
//! cancelling), `release` (chunks released to the workers by policy), `run` (a worker's attempt at
//! a chunk), `write` (a chunk's records written inside that attempt's transaction) and `split` (a
//! chunk that met a resource limit, run as parts).

mod reads;
mod release;
mod run;
mod split;
mod staging;
mod write;

use std::time::Duration;

use sqlx::Row;
use sqlx::any::AnyRow;

use crate::Error;
use crate::model::{Fields, ObjectSchema};
use crate::schema::RecordProblem;

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
    /// back with the batch: [`Store::completion`](crate::Store::completion) tells its delivery.
    pub webhook: Option<String>,
}

/// What [`Store::begin_batch`](crate::Store::begin_batch) found.
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

/// What [`Store::split_chunk`](crate::Store::split_chunk) did.
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

/// One attempt at a chunk, or at a part of it: see [`Store::attempt_chunk`](crate::Store::attempt_chunk).
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

/// What [`Store::recover_chunks`](crate::Store::recover_chunks) (or
/// [`Store::recover_parts`](crate::Store::recover_parts)) did for a restarted scheduler.
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

/// A chunk as read for a run: its records, where they start in the batch, and what to do with
/// them.
struct ChunkWork {
    org_id: String,
    schema: ObjectSchema,
    op: BatchOp,
    first: usize,
    records: Vec<Fields>,
}
