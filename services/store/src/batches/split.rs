//! Splitting a chunk that met a resource limit into parts, each its own transaction: the split
//! itself, the next pending part, aborting a part, and the chunk's outcome once no part is
//! pending.

use sqlx::Row;

use super::{ChunkPart, ChunkState, PartRange, PartState, RUNNABLE, Split, part_of, u32_of};
use crate::changes::Topic;
use crate::schema::RecordProblem;
use crate::{Error, Store};

impl Store {
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
        .bind(self.now_ms())
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
        .bind(self.now_ms())
        .bind(cause)
        .bind(errors)
        .bind(problems.len() as i64)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.touched(Topic::Batch(batch_id));
        Ok(Some(outcome))
    }
}
