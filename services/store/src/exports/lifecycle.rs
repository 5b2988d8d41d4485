//! An export from its start to its end: the first portion and the export record with its
//! token, answered again for a request id used before; reading an export by its token, a page of
//! exports; cancelling, ending and expiring one.

use sha2::{Digest, Sha256};
use sqlx::Row;
use tokio::time::Instant;

use super::{
    ESTIMATE_PROBE, EXPORT_COLUMNS, ExportInfo, ExportReason, ExportRow, ExportSpec, ExportStart, ExportState, PartInfo,
};
use crate::batches::u32_of;
use crate::blobs::Blobs;
use crate::changes::Topic;
use crate::filter::Compiled;
use crate::model::{Cursor, ObjectSchema, Record};
use crate::records::read_condition;
use crate::{Error, Missing, Store, new_id};

impl Store {
    /// Starts an export: reads the first portion (within `deadline`) and, when more records
    /// match, creates the export record (its parts cover the ids after the first portion) and a
    /// token. With a request id already used in the org, the same export is answered again: its
    /// first portion read again (the same id range) and a new token.
    pub async fn start_export(
        &self,
        org_id: &str,
        spec: &ExportSpec,
        deadline: Instant,
        retention: std::time::Duration,
    ) -> Result<ExportStart, Error> {
        let schema = self.object(org_id, &spec.object).await?;
        let compiled = read_condition(&schema, self.backend, &spec.filter, &spec.fields, 6)?;
        if let Some(request_id) = &spec.request_id
            && let Some(existing) = self.export_by_request(org_id, request_id).await?
        {
            return self.answer_again(org_id, &schema, compiled.as_ref(), spec, existing, deadline).await;
        }
        let as_of_seq = self.high_water(org_id).await?;
        let FirstPortion { first, reason, last_id, estimate, exact } =
            match self.first_portion(org_id, spec, compiled.as_ref(), deadline).await? {
                FirstRead::All(records) => return Ok(ExportStart::Complete { records, as_of_seq }),
                FirstRead::Portion(portion) => portion,
            };
        let now = self.now_ms();
        let id = new_id("exp");
        let token = new_token();
        let fields = serde_json::to_string(&spec.fields).map_err(|e| Error::Corrupt(e.to_string()))?;
        let mut tx = self.writer.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO exports (id, org_id, request_id, object, filter, fields, part_rows, state, reason, \
             as_of_seq, first_rows, first_last_id, plan_after, estimated_total, created_at_ms, expires_at_ms, \
             traceparent) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, 'PRODUCING', $8, $9, $10, $11, $11, $12, $13, $14, $15)",
        )
        .bind(id.clone())
        .bind(org_id)
        .bind(spec.request_id.clone())
        .bind(spec.object.clone())
        .bind(spec.filter.clone())
        .bind(fields)
        .bind(i64::from(spec.part_rows))
        .bind(reason.as_str())
        .bind(as_of_seq)
        .bind(first.len() as i64)
        .bind(last_id)
        .bind(estimate)
        .bind(now)
        .bind(now.saturating_add(retention.as_millis() as i64))
        .bind(spec.traceparent.clone())
        .execute(&mut *tx)
        .await;
        match inserted {
            Ok(_) => {}
            // the same request id, started concurrently: answer that one
            Err(sqlx::Error::Database(e)) if spec.request_id.is_some() && e.is_unique_violation() => {
                drop(tx);
                let request_id = spec.request_id.as_deref().unwrap_or_default();
                let existing = self
                    .export_by_request(org_id, request_id)
                    .await?
                    .ok_or_else(|| Error::Corrupt("an export vanished after a conflict".into()))?;
                return self.answer_again(org_id, &schema, compiled.as_ref(), spec, existing, deadline).await;
            }
            Err(e) => return Err(e.into()),
        }
        self.insert_token(&mut tx, org_id, &id, &token).await?;
        if let Some(url) = &spec.webhook {
            crate::completions::insert(&mut tx, crate::completions::Kind::Export, &id, org_id, url, self.now_ms())
                .await?;
        }
        tx.commit().await?;
        let export = self.export_row(&id).await?.info;
        Ok(ExportStart::Started { first, export, token, estimate_exact: exact })
    }

    /// The first portion of an export of `spec` (`spec.sync_rows` records), read within
    /// `deadline`: every matching record when no more match, else the portion with an estimate
    /// of the rows in all, counted up to [`ESTIMATE_PROBE`] past it. Nothing read in time is an
    /// empty portion (the export then goes asynchronous as long running).
    async fn first_portion(
        &self,
        org_id: &str,
        spec: &ExportSpec,
        compiled: Option<&Compiled>,
        deadline: Instant,
    ) -> Result<FirstRead, Error> {
        let sync_rows = i64::from(spec.sync_rows);
        let read = self
            .by_deadline(deadline, async {
                let mut first = self
                    .read_records(org_id, &spec.object, compiled, &spec.fields, "", None, Some(sync_rows + 1))
                    .await?;
                if first.len() as i64 <= sync_rows {
                    return Ok((first, None));
                }
                first.truncate(sync_rows as usize);
                let last_id = first.last().map(|r| r.id.clone()).unwrap_or_default();
                let probe = self.count_range(org_id, &spec.object, compiled, &last_id, ESTIMATE_PROBE + 1).await?;
                Ok((first, Some((last_id, probe))))
            })
            .await;
        let portion = match read {
            Ok((records, None)) => return Ok(FirstRead::All(records)),
            Ok((first, Some((last_id, probe)))) => {
                let estimate = first.len() as i64 + probe.min(ESTIMATE_PROBE);
                let exact = probe <= ESTIMATE_PROBE;
                FirstPortion { first, reason: ExportReason::LargeResults, last_id, estimate, exact }
            }
            Err(Error::DeadlineExceeded { .. }) => FirstPortion {
                first: Vec::new(),
                reason: ExportReason::LongRunning,
                last_id: String::new(),
                estimate: 0,
                exact: false,
            },
            Err(e) => return Err(e),
        };
        Ok(FirstRead::Portion(portion))
    }

    async fn insert_token(
        &self,
        conn: &mut sqlx::AnyConnection,
        org_id: &str,
        export_id: &str,
        token: &str,
    ) -> Result<(), Error> {
        sqlx::query("INSERT INTO export_tokens (token_hash, export_id, org_id) VALUES ($1, $2, $3)")
            .bind(token_hash(token))
            .bind(export_id)
            .bind(org_id)
            .execute(&mut *conn)
            .await?;
        Ok(())
    }

    async fn answer_again(
        &self,
        org_id: &str,
        schema: &ObjectSchema,
        compiled: Option<&Compiled>,
        spec: &ExportSpec,
        existing: ExportRow,
        deadline: Instant,
    ) -> Result<ExportStart, Error> {
        if existing.expired || existing.info.expires_at_ms <= self.now_ms() {
            return Err(Error::Expired(format!("export {}", existing.info.id)));
        }
        let first = if existing.first_last_id.is_empty() {
            Vec::new()
        } else {
            self.by_deadline(
                deadline,
                self.read_records(
                    org_id,
                    &schema.name,
                    compiled,
                    &spec.fields,
                    "",
                    Some(&existing.first_last_id),
                    None,
                ),
            )
            .await?
        };
        let token = new_token();
        let mut conn = self.writer.acquire().await?;
        self.insert_token(&mut conn, org_id, &existing.info.id, &token).await?;
        drop(conn);
        let export = self.export_info(&existing.info.id).await?;
        Ok(ExportStart::Started { estimate_exact: export.total_known, first, export, token })
    }

    async fn export_by_request(&self, org_id: &str, request_id: &str) -> Result<Option<ExportRow>, Error> {
        let row = sqlx::query(&format!("SELECT {EXPORT_COLUMNS} FROM exports WHERE org_id = $1 AND request_id = $2"))
            .bind(org_id)
            .bind(request_id)
            .fetch_optional(&self.writer)
            .await?;
        row.as_ref().map(ExportRow::from_row).transpose()
    }

    pub(super) async fn export_row(&self, export_id: &str) -> Result<ExportRow, Error> {
        let row = sqlx::query(&format!("SELECT {EXPORT_COLUMNS} FROM exports WHERE id = $1"))
            .bind(export_id)
            .fetch_optional(&self.reader)
            .await?;
        match row {
            Some(row) => ExportRow::from_row(&row),
            None => Err(Error::not_found(Missing::Export, format!("export {export_id}"))),
        }
    }

    /// An export's record with its produced parts.
    pub(crate) async fn export_info(&self, export_id: &str) -> Result<ExportInfo, Error> {
        let mut info = self.export_row(export_id).await?.info;
        let rows = sqlx::query(
            "SELECT number, row_count, byte_count FROM export_parts WHERE export_id = $1 AND state = 'READY' \
             ORDER BY number",
        )
        .bind(export_id)
        .fetch_all(&self.reader)
        .await?;
        info.parts = rows
            .iter()
            .map(|r| Ok(PartInfo { number: u32_of(r, 0)?, rows: r.try_get(1)?, bytes: r.try_get(2)? }))
            .collect::<Result<_, Error>>()?;
        Ok(info)
    }

    /// The export a token names, in the org whose key came with it. A token of another org or
    /// no token at all is NOT_FOUND; an export past its retention is [`Error::Expired`].
    pub(super) async fn export_of_token(&self, org_id: &str, token: &str) -> Result<ExportRow, Error> {
        let row = sqlx::query("SELECT export_id FROM export_tokens WHERE token_hash = $1 AND org_id = $2")
            .bind(token_hash(token))
            .bind(org_id)
            .fetch_optional(&self.reader)
            .await?;
        let Some(row) = row else { return Err(Error::not_found(Missing::Export, "export token")) };
        let export = self.export_row(&row.try_get::<String, _>(0)?).await?;
        if export.expired || export.info.expires_at_ms <= self.now_ms() {
            return Err(Error::Expired(format!("export {}", export.info.id)));
        }
        Ok(export)
    }

    /// The export a token names (see [`Store::export_of_token`]), with its produced parts.
    pub async fn export(&self, org_id: &str, token: &str) -> Result<ExportInfo, Error> {
        let export = self.export_of_token(org_id, token).await?;
        self.export_info(&export.info.id).await
    }

    /// A page of the org's exports whose retention is not over, newest first (by creation
    /// time, then id): at most `limit`, those after `after` (the last of the page before). Their
    /// parts are left out (GetExport lists them); tokens are never stored, so none is answered.
    pub async fn list_exports(
        &self,
        org_id: &str,
        after: Option<&Cursor>,
        limit: u32,
    ) -> Result<Vec<ExportInfo>, Error> {
        // `$3` and `$4`, the cursor, are past every export on the first page
        let sql = format!(
            "SELECT {EXPORT_COLUMNS} FROM exports WHERE org_id = $1 AND expired = 0 AND expires_at_ms > $2 \
             AND (created_at_ms < $3 OR (created_at_ms = $3 AND id < $4)) \
             ORDER BY created_at_ms DESC, id DESC LIMIT $5"
        );
        let (before_ms, before_id) = match after {
            Some(c) => (c.created_at_ms, c.id.clone()),
            None => (i64::MAX, String::new()),
        };
        let rows = sqlx::query(&sql)
            .bind(org_id)
            .bind(self.now_ms())
            .bind(before_ms)
            .bind(before_id)
            .bind(i64::from(limit))
            .fetch_all(&self.reader)
            .await?;
        rows.iter().map(|row| Ok(ExportRow::from_row(row)?.info)).collect()
    }

    /// Cancels an export: no part not yet produced will be; parts produced stay readable.
    pub async fn cancel_export(&self, org_id: &str, token: &str) -> Result<ExportInfo, Error> {
        let export = self.export_of_token(org_id, token).await?;
        self.end_export(&export.info.id, ExportState::Cancelled, "").await?;
        self.export_info(&export.info.id).await
    }

    /// Ends a producing export as `state` (cancelled or failed with `error`); its unproduced
    /// parts are cancelled. An export already ended is left as it is.
    pub async fn end_export(&self, export_id: &str, state: ExportState, error: &str) -> Result<(), Error> {
        let mut tx = self.writer.begin().await?;
        let ended = sqlx::query(
            "UPDATE exports SET state = $2, error = $3, finished_at_ms = $4 WHERE id = $1 AND state = 'PRODUCING'",
        )
        .bind(export_id)
        .bind(state.as_str())
        .bind(error)
        .bind(self.now_ms())
        .execute(&mut *tx)
        .await?;
        if ended.rows_affected() == 1 {
            sqlx::query(
                "UPDATE export_parts SET state = 'CANCELLED' WHERE export_id = $1 AND state IN ('PENDING', 'RELEASED')",
            )
            .bind(export_id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        if ended.rows_affected() == 1 {
            self.touched(Topic::Export(export_id));
        }
        Ok(())
    }

    /// Deletes the parts of exports past their retention (at most `limit` exports); their
    /// tokens then answer [`Error::Expired`]. Answers how many exports expired.
    pub async fn expire_exports(&self, blobs: &Blobs, limit: u32) -> Result<u32, Error> {
        let now = self.now_ms();
        let rows = sqlx::query("SELECT id FROM exports WHERE expired = 0 AND expires_at_ms <= $1 LIMIT $2")
            .bind(now)
            .bind(i64::from(limit))
            .fetch_all(&self.reader)
            .await?;
        let mut expired = 0;
        for row in &rows {
            let id: String = row.try_get(0)?;
            // first stop production (a part finishing now is refused), then delete every blob
            self.end_export(&id, ExportState::Cancelled, "expired").await?;
            blobs.delete_prefix(&format!("exports/{id}")).await?;
            let mut tx = self.writer.begin().await?;
            sqlx::query("DELETE FROM export_parts WHERE export_id = $1").bind(id.clone()).execute(&mut *tx).await?;
            sqlx::query("UPDATE exports SET expired = 1 WHERE id = $1").bind(id.clone()).execute(&mut *tx).await?;
            tx.commit().await?;
            self.touched(Topic::Export(&id));
            tracing::info!(export = %id, "export expired: its parts are deleted");
            expired += 1;
        }
        Ok(expired)
    }
}

fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn new_token() -> String {
    format!("xt_{}", hex::encode(rand::random::<[u8; 24]>()))
}

/// What the first read of an export found ([`Store::first_portion`]).
enum FirstRead {
    /// Every matching record: no export is needed.
    All(Vec<Record>),
    /// The first portion; the export produces the rest.
    Portion(FirstPortion),
}

/// An export's first portion, as its record states it.
struct FirstPortion {
    /// Its records.
    first: Vec<Record>,
    /// Why the export goes asynchronous.
    reason: ExportReason,
    /// The id of its last record ('' when none was read).
    last_id: String,
    /// The rows expected in all, first portion included.
    estimate: i64,
    /// Whether `estimate` is exact.
    exact: bool,
}
