//! Staging a batch: its record and request id, its chunks as they are uploaded, the end of the
//! upload (its chunks become releasable), or dropping a batch whose upload broke.

use sqlx::Row;

use super::{BatchStart, NewBatch};
use crate::changes::Topic;
use crate::model::Fields;
use crate::{Error, Missing, Store, completions, new_id};

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
        .bind(self.now_ms())
        .bind(new.traceparent.clone())
        .execute(&mut *tx)
        .await;
        match inserted {
            Ok(_) => {
                if let Some(url) = &new.webhook {
                    completions::insert(&mut tx, completions::Kind::Batch, &id, org_id, url, self.now_ms()).await?;
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
}
