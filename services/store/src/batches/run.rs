//! Running a chunk: a worker takes it (`start_chunk`), attempts it in one transaction that
//! writes its records and its commit marker together (`attempt_chunk`, for the whole chunk or
//! one part of a split chunk), notes a failed attempt or aborts it; and the gauges' count of
//! the work in progress.

use std::collections::HashMap;
use std::time::Duration;

use sqlx::{Any, AnyConnection, Row, Transaction};
use tokio::time::Instant;

use super::{Attempt, BatchOp, ChunkRun, ChunkStart, ChunkState, ChunkWork, PartRange, PartState, RUNNABLE};
use crate::changes::Topic;
use crate::model::{Fields, ObjectSchema};
use crate::schema::{RecordProblem, record_id, record_problems};
use crate::{Backend, Error, Missing, Store};

impl Store {
    /// A worker takes a delivered chunk: RUNNING, one more attempt, unless it has its outcome
    /// (then that is answered) or its batch was cancelled (then it is CANCELLED, never run). A
    /// chunk that was split is in flight with parts committed: it runs on to its outcome even in
    /// a cancelled batch.
    pub async fn start_chunk(&self, batch_id: &str, index: u32, worker: &str) -> Result<ChunkStart, Error> {
        let now = self.now_ms();
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
        .bind(self.now_ms())
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
        let deadline = Instant::now() + attempt.budget;
        // The chunk is read, parsed and checked against the schema before its transaction: on
        // SQLite the transaction's first write takes the database's write lock, and on both
        // backends other chunks of the org queue behind this one's. A chunk's records and batch
        // never change once staged, so reading them first loses nothing.
        let Some(mut chunk) = self.by_deadline(deadline, self.chunk_work(batch_id, index)).await? else {
            return Ok(ChunkRun::Finished(self.chunk_state(batch_id, index).await?));
        };
        if let Some(part) = attempt.part {
            chunk.keep_part(part)?;
        }
        if let Some(problems) = self.invalid_records(&mut chunk, deadline).await? {
            return Ok(invalid(chunk.first, problems));
        }
        let write = ChunkWrite::of(chunk)?;
        // the size budget: what the transaction would write, as text
        let bytes = write.bytes();
        if bytes > attempt.max_bytes {
            return Ok(ChunkRun::OverSize { bytes, limit: attempt.max_bytes });
        }
        let org_id = write.org_id.clone();
        let (tx, run) =
            self.by_deadline(deadline, self.attempt_in_transaction(batch_id, index, attempt, deadline, write)).await?;
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

    /// The problems of a chunk's records (chunk indexes, in order), None when there are none:
    /// each record checked against the schema and the operation (which normalizes the valid
    /// ones), and those the schema accepts also against what is stored.
    async fn invalid_records(
        &self,
        chunk: &mut ChunkWork,
        deadline: Instant,
    ) -> Result<Option<Vec<RecordProblem>>, Error> {
        let problems = match chunk.op {
            BatchOp::Delete => delete_problems(&chunk.schema, &chunk.records),
            _ => record_problems(&chunk.schema, &mut chunk.records),
        };
        if problems.is_empty() {
            return Ok(None);
        }
        // every failing record is listed: those the schema accepts are checked against what
        // is stored too (a unique value taken, an insert of an existing record)
        let valid: Vec<usize> = (0..chunk.records.len()).filter(|i| !problems.iter().any(|p| p.index == *i)).collect();
        let stored = self.by_deadline(deadline, self.stored_problems_of(chunk, &valid)).await?;
        let mut problems = problems;
        problems.extend(stored);
        problems.sort_by_key(|p| p.index);
        Ok(Some(problems))
    }

    /// The transaction of [`Store::attempt_chunk`]: under the chunk's row lock and the org's
    /// write lock, `write`'s records and the commit marker (of the whole chunk, or of
    /// `attempt.part`). Answers the transaction, for the caller to commit or drop, with what the
    /// attempt did and the org's last seq after it (None: the chunk has its outcome).
    async fn attempt_in_transaction(
        &self,
        batch_id: &str,
        index: u32,
        attempt: &Attempt<'_>,
        deadline: Instant,
        write: ChunkWrite,
    ) -> Result<(Transaction<'static, Any>, Option<(ChunkRun, i64)>), Error> {
        let mut tx = self.begin_attempt(deadline).await?;
        match self.lock_chunk(&mut tx, batch_id, index, attempt.part).await? {
            Locked::Runnable => {}
            Locked::Finished => return Ok((tx, None)),
            Locked::Skip(run) => return Ok((tx, Some((run, 0)))),
        }
        // Chunks of one org queue on its write lock (seqs are allocated under it): that wait
        // is the normal order of things, bounded by the budget only. Any other lock wait ends
        // as a busy error after `lock_timeout`.
        let base = self.lock_org(&mut tx, &write.org_id).await?;
        if self.backend == Backend::Postgres {
            sqlx::query(&format!("SET LOCAL lock_timeout = {}", millis(attempt.lock_timeout)))
                .execute(&mut *tx)
                .await?;
        }
        let ChunkWrite { org_id, schema, op, first, records, ids, texts } = write;
        let part_records = records.len() as i64;
        let run = match self.write_chunk(&mut tx, &org_id, base, &schema, op, records, ids, texts).await? {
            Err(problems) => (invalid(first, problems), base),
            Ok(last) => (self.write_marker(&mut tx, batch_id, index, attempt, part_records).await?, last),
        };
        Ok((tx, Some(run)))
    }

    /// An attempt's transaction; on PostgreSQL bounded by what is left until `deadline`.
    async fn begin_attempt(&self, deadline: Instant) -> Result<Transaction<'static, Any>, Error> {
        let mut tx = self.writer.begin().await?;
        if self.backend == Backend::Postgres {
            // the server stops the work too
            let left = deadline.saturating_duration_since(Instant::now());
            sqlx::query(&format!("SET LOCAL statement_timeout = {}", millis(left))).execute(&mut *tx).await?;
            // abandoned at its budget, the transaction is ended by the server a moment later
            // rather than when its connection is next used (see `Store::open`)
            sqlx::query(&format!("SET LOCAL idle_in_transaction_session_timeout = {}", millis(left) + 500))
                .execute(&mut *tx)
                .await?;
        }
        Ok(tx)
    }

    /// Takes the chunk's row lock in `conn`'s transaction, unless the chunk has its outcome, and
    /// says whether `part` (None: the whole chunk) may be written under it.
    async fn lock_chunk(
        &self,
        conn: &mut AnyConnection,
        batch_id: &str,
        index: u32,
        part: Option<PartRange>,
    ) -> Result<Locked, Error> {
        // the chunk's row lock: a second delivery waits here, then finds the outcome
        let claimed = sqlx::query(&format!(
            "UPDATE chunks SET finished_at_ms = 0 WHERE batch_id = $1 AND idx = $2 AND state IN {RUNNABLE}"
        ))
        .bind(batch_id)
        .bind(i64::from(index))
        .execute(&mut *conn)
        .await?;
        if claimed.rows_affected() == 0 {
            return Ok(Locked::Finished);
        }
        // under the row lock: the whole chunk runs only while it has no parts, a part only
        // while it is pending (its marker is written with its records, in this transaction)
        match part {
            None => {
                if self.has_parts(conn, batch_id, index).await? {
                    return Ok(Locked::Skip(ChunkRun::Split));
                }
            }
            Some(p) => {
                if self.part_state(conn, batch_id, index, p).await? != Some(PartState::Pending) {
                    return Ok(Locked::Skip(ChunkRun::PartGone));
                }
            }
        }
        Ok(Locked::Runnable)
    }

    /// The commit marker, written in `conn`'s transaction after the records: for the whole
    /// chunk its outcome (`attempt.outcome`, with `attempt.cause`), for `attempt.part` the part's
    /// COMMITTED state, its `records` counted on the chunk.
    async fn write_marker(
        &self,
        conn: &mut AnyConnection,
        batch_id: &str,
        index: u32,
        attempt: &Attempt<'_>,
        records: i64,
    ) -> Result<ChunkRun, Error> {
        let Some(p) = attempt.part else {
            sqlx::query(
                "UPDATE chunks SET state = $3, finished_at_ms = $4, last_cause = $5 \
                 WHERE batch_id = $1 AND idx = $2",
            )
            .bind(batch_id)
            .bind(i64::from(index))
            .bind(attempt.outcome.as_str())
            .bind(self.now_ms())
            .bind(attempt.cause)
            .execute(&mut *conn)
            .await?;
            return Ok(ChunkRun::Committed(attempt.outcome));
        };
        // the part's commit marker, and its records counted on the chunk
        sqlx::query(
            "UPDATE chunk_parts SET state = 'COMMITTED', finished_at_ms = $4 \
             WHERE batch_id = $1 AND idx = $2 AND part_first = $3 AND state = 'PENDING'",
        )
        .bind(batch_id)
        .bind(i64::from(index))
        .bind(i64::from(p.first))
        .bind(self.now_ms())
        .execute(&mut *conn)
        .await?;
        sqlx::query(
            "UPDATE chunks SET parts_committed = parts_committed + $3, last_cause = $4 \
             WHERE batch_id = $1 AND idx = $2",
        )
        .bind(batch_id)
        .bind(i64::from(index))
        .bind(records)
        .bind(attempt.cause)
        .execute(&mut *conn)
        .await?;
        Ok(ChunkRun::PartCommitted)
    }

    /// Whether the chunk was split into parts, read in `conn`'s transaction.
    pub(super) async fn has_parts(&self, conn: &mut AnyConnection, batch_id: &str, index: u32) -> Result<bool, Error> {
        let part = sqlx::query("SELECT 1 FROM chunk_parts WHERE batch_id = $1 AND idx = $2 LIMIT 1")
            .bind(batch_id)
            .bind(i64::from(index))
            .fetch_optional(&mut *conn)
            .await?;
        Ok(part.is_some())
    }

    /// A part's state, read in `conn`'s transaction (None: no such part).
    pub(super) async fn part_state(
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

/// What the chunk's row lock found for an attempt ([`Store::lock_chunk`]).
enum Locked {
    /// The chunk, or the part, is to be written.
    Runnable,
    /// The chunk has its outcome.
    Finished,
    /// Nothing to write: the whole chunk was asked for but it is split ([`ChunkRun::Split`]), or
    /// the part is no longer pending ([`ChunkRun::PartGone`]).
    Skip(ChunkRun),
}

/// A checked chunk (or part) made ready for its transaction.
struct ChunkWrite {
    org_id: String,
    schema: ObjectSchema,
    op: BatchOp,
    /// The batch index of its first record.
    first: usize,
    records: Vec<Fields>,
    /// Each record's id.
    ids: Vec<String>,
    /// Each record's JSON text (none for a delete).
    texts: Vec<String>,
}

impl ChunkWrite {
    /// `chunk`, its records valid, with their ids and JSON texts.
    fn of(chunk: ChunkWork) -> Result<Self, Error> {
        let ChunkWork { org_id, schema, op, first, records } = chunk;
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
        Ok(Self { org_id, schema, op, first, records, ids, texts })
    }

    /// What its transaction would write, as text: the records' JSON, or the ids of a delete.
    fn bytes(&self) -> u64 {
        match self.op {
            BatchOp::Delete => self.ids.iter().map(|id| id.len() as u64).sum(),
            _ => self.texts.iter().map(|t| t.len() as u64).sum(),
        }
    }
}

impl ChunkWork {
    /// Keeps only `part`'s records of the chunk, `first` moved to the part's first.
    fn keep_part(&mut self, part: PartRange) -> Result<(), Error> {
        let (from, to) = (part.first as usize, part.first as usize + part.records as usize);
        if to > self.records.len() || part.records == 0 {
            return Err(Error::Corrupt(format!("part {from}..{to} of a chunk of {}", self.records.len())));
        }
        self.records.truncate(to);
        self.records.drain(..from);
        self.first += from;
        Ok(())
    }
}

/// [`ChunkRun::Invalid`] of `problems` at chunk indexes, moved to batch indexes (`first` is the
/// batch index of the chunk's, or the part's, first record).
fn invalid(first: usize, mut problems: Vec<RecordProblem>) -> ChunkRun {
    for p in &mut problems {
        p.index += first;
    }
    ChunkRun::Invalid(problems)
}

/// A duration in whole milliseconds for `SET LOCAL`, at least 1 (0 would mean no limit).
fn millis(d: Duration) -> u128 {
    d.as_millis().max(1)
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
