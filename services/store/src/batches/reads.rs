//! Reading batches and their chunks as clients see them (a batch with its totals, a page of
//! batches, a page of chunks with their parts and errors), and cancelling a batch.

use std::collections::HashMap;

use sqlx::Row;
use sqlx::any::AnyRow;

use super::{
    BATCH_COLUMNS, BatchInfo, BatchState, CHUNK_COUNTS, ChunkInfo, ChunkPart, ChunkState, batch_info, part_of, u32_of,
};
use crate::changes::Topic;
use crate::model::Cursor;
use crate::schema::RecordProblem;
use crate::{Error, Missing, Store};

impl Store {
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
        let now = self.now_ms();
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
}
