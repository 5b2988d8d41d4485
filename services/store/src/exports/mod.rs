//! Exports: the first portion read at once, the rest planned as parts (id ranges) and produced by
//! workers as blobs.
//!
//! Exactly once: the first portion covers the ids up to `first_last_id`; the parts cover the ids
//! after it in disjoint, contiguous ranges `(after_id, last_id]` (the last part has no upper
//! bound). Planning cuts a range every `part_rows` matching ids (an `OFFSET` query, which the
//! database answers without shipping the rows). A part is read, written as a blob under a fresh
//! key, and recorded READY in one guarded update: a part produced twice (a worker killed after
//! writing, a redelivery) is recorded once, and the loser's blob is deleted. A record changed
//! during the export stays in its id range, so it appears once, as of when its part was read.

use sha2::{Digest, Sha256};
use sqlx::Row;
use sqlx::any::AnyRow;
use tokio::time::Instant;

use crate::batches::{Recovered, u32_of};
use crate::blobs::{Blobs, Compressor};
use crate::changes::Topic;
use crate::filter::Compiled;
use crate::model::{Cursor, Fields, ObjectSchema, Record};
use crate::records::{RawRow, bind_condition, decode_fields, read_condition};
use crate::release::{self, Releasable, Release};
use crate::{Backend, Error, Missing, Store, new_id, now_ms};

/// Rows answered at once by default.
pub const DEFAULT_SYNC_ROWS: u32 = 1_000;
/// The most rows answered at once.
pub const MAX_SYNC_ROWS: u32 = 10_000;
/// Rows per part by default.
pub const DEFAULT_PART_ROWS: u32 = 50_000;
/// The most rows per part.
pub const MAX_PART_ROWS: u32 = 1_000_000;
/// The estimate answered at once counts at most this many rows past the first portion.
const ESTIMATE_PROBE: i64 = 10_000;

/// Rows to a query when a part's lines are formatted by the database ([`Store::read_lines`](crate::Store::read_lines)).
const LINE_BATCH: i64 = 1_000;

/// Where an export is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportState {
    /// Workers are producing parts.
    Producing,
    /// Every part is produced.
    Complete,
    /// Producing a part failed for good.
    Failed,
    /// Cancelled: no further part is produced.
    Cancelled,
}

stored_names!(ExportState, "export state" {
    Producing => "PRODUCING",
    Complete => "COMPLETE",
    Failed => "FAILED",
    Cancelled => "CANCELLED",
});

impl ExportState {
    /// Whether no further part will be produced.
    pub fn is_final(self) -> bool {
        self != ExportState::Producing
    }
}

/// Why an export went asynchronous.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportReason {
    /// More rows match than the first portion holds.
    LargeResults,
    /// The first portion could not be read within the deadline.
    LongRunning,
}

stored_names!(ExportReason, "export reason" {
    LargeResults => "LARGE_RESULTS",
    LongRunning => "LONG_RUNNING",
});

/// What an export asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSpec {
    /// The object.
    pub object: String,
    /// The filter expression (empty: every record).
    pub filter: String,
    /// The fields to return (empty: all).
    pub fields: Vec<String>,
    /// Rows answered at once.
    pub sync_rows: u32,
    /// Rows per part.
    pub part_rows: u32,
    /// The client's id for idempotent retry.
    pub request_id: Option<String>,
    /// The trace context (W3C `traceparent`) of the request that created it, which its parts
    /// continue; empty when traces are not exported.
    pub traceparent: String,
    /// The webhook the export's completion is pushed to, when it goes asynchronous (see
    /// [`crate::completions`]); an export complete in its first answer has no other completion.
    pub webhook: Option<String>,
}

/// A produced part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartInfo {
    /// From 1, in id order.
    pub number: u32,
    /// Its rows.
    pub rows: i64,
    /// Its compressed size.
    pub bytes: i64,
}

/// An export's record.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportInfo {
    /// `exp_…`
    pub id: String,
    /// The org.
    pub org_id: String,
    /// The object.
    pub object: String,
    /// Where it is.
    pub state: ExportState,
    /// Why it went asynchronous.
    pub reason: ExportReason,
    /// The org's change high-water mark when it began.
    pub as_of_seq: i64,
    /// Rows in the first portion.
    pub first_rows: i64,
    /// Parts planned so far (all of them once `total_known`).
    pub parts_total: u32,
    /// Parts produced.
    pub parts_ready: u32,
    /// Rows in the parts produced.
    pub rows_ready: i64,
    /// Rows expected in all, first portion included.
    pub estimated_total: i64,
    /// Whether every part is planned.
    pub total_known: bool,
    /// Creation time, ms.
    pub created_at_ms: i64,
    /// Expiry time, ms.
    pub expires_at_ms: i64,
    /// When it finished (0 while producing).
    pub finished_at_ms: i64,
    /// Why it failed.
    pub error: String,
    /// The parts produced, by number.
    pub parts: Vec<PartInfo>,
}

/// What starting an export did.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)] // made once per Export request and taken apart at once
pub enum ExportStart {
    /// Every matching record is in the first portion: no export was created.
    Complete {
        /// The matching records.
        records: Vec<Record>,
        /// The org's change high-water mark, read before the records: Extract after it
        /// continues a mirror of them.
        as_of_seq: i64,
    },
    /// The first portion, and the export producing the rest.
    Started {
        /// The first portion.
        first: Vec<Record>,
        /// The export.
        export: ExportInfo,
        /// Its token (only its hash is kept).
        token: String,
        /// Whether `export.estimated_total` is exact.
        estimate_exact: bool,
    },
}

/// A part released to a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartRef {
    /// The org.
    pub org_id: String,
    /// The export.
    pub export_id: String,
    /// The part's number.
    pub number: u32,
    /// The trace context of the request that created its export (empty: none).
    pub traceparent: String,
}

/// What producing a part did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartOutcome {
    /// The part is recorded (by this run or an earlier one) with this many rows.
    Produced(i64),
    /// The export is cancelled, failed or expired: the part will not be produced.
    NotProduced,
}

/// A produced part's rows, decoded as they are read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartRows {
    number: u32,
    /// How many rows it holds.
    pub rows: i64,
    /// The schema of the export's object, which says each field's type.
    pub schema: ObjectSchema,
    /// The blob, decompressed: one JSON line per row.
    data: Vec<u8>,
}

impl PartRows {
    /// The rows in id order, each decoded when reached.
    pub fn records(self) -> impl Iterator<Item = Result<Record, Error>> + Send {
        let number = self.number;
        let mut at = 0;
        std::iter::from_fn(move || {
            let line = next_line(&self.data, &mut at)?;
            Some(
                serde_json::from_slice::<PartLine>(line)
                    .map(|l| Record { id: l.id, fields: l.fields, version: l.version, updated_at_ms: l.updated_at_ms })
                    .map_err(|e| Error::Corrupt(format!("part {number}: {e}"))),
            )
        })
    }

    /// The rows in id order as they are stored, one JSON line each:
    /// `{"id":…,"version":…,"updated_at_ms":…,"fields":{…}}` (the fields as [`Fields`]).
    pub fn lines(&self) -> impl Iterator<Item = &[u8]> + Send {
        let mut at = 0;
        std::iter::from_fn(move || next_line(&self.data, &mut at))
    }

    /// The part's number, counted from 1.
    pub fn number(&self) -> u32 {
        self.number
    }
}

/// The next non-empty line of `data` from `at`, moving `at` past it.
fn next_line<'a>(data: &'a [u8], at: &mut usize) -> Option<&'a [u8]> {
    while *at < data.len() {
        let end = data[*at..].iter().position(|b| *b == b'\n').map_or(data.len(), |i| *at + i);
        let line = &data[*at..end];
        *at = end + 1;
        if !line.is_empty() {
            return Some(line);
        }
    }
    None
}

/// What reading a part found.
#[derive(Debug, Clone, PartialEq)]
pub enum PartRead {
    /// The part's rows.
    Rows(PartRows),
    /// The part is planned (or will be) but not produced yet.
    NotReady,
    /// The export ended (cancelled or failed) without producing it.
    Never(ExportState),
    /// The export has fewer parts.
    OutOfRange(u32),
}

fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn new_token() -> String {
    format!("xt_{}", hex::encode(rand::random::<[u8; 24]>()))
}

/// One line of a part blob: `{"id":…,"version":…,"updated_at_ms":…,"fields":{…}}`.
#[derive(serde::Deserialize)]
struct PartLine {
    id: String,
    version: i64,
    updated_at_ms: i64,
    fields: Fields,
}

const EXPORT_COLUMNS: &str = "id, org_id, object, state, reason, as_of_seq, first_rows, parts_total, parts_ready, \
     rows_ready, estimated_total, planned, planned_rows, created_at_ms, expires_at_ms, finished_at_ms, error, expired, \
     filter, fields, part_rows, first_last_id, plan_after";

/// An export row with what planning and production need besides its public record.
struct ExportRow {
    info: ExportInfo,
    expired: bool,
    filter: String,
    fields: Vec<String>,
    part_rows: u32,
    first_last_id: String,
    plan_after: String,
    planned_rows: i64,
}

impl ExportRow {
    fn from_row(row: &AnyRow) -> Result<Self, Error> {
        let planned: i64 = row.try_get(11)?;
        let planned_rows: i64 = row.try_get(12)?;
        let first_rows: i64 = row.try_get(6)?;
        let estimate: i64 = row.try_get(10)?;
        let rows_ready: i64 = row.try_get(9)?;
        let fields: String = row.try_get(19)?;
        Ok(Self {
            info: ExportInfo {
                id: row.try_get(0)?,
                org_id: row.try_get(1)?,
                object: row.try_get(2)?,
                state: ExportState::parse(&row.try_get::<String, _>(3)?)?,
                reason: ExportReason::parse(&row.try_get::<String, _>(4)?)?,
                as_of_seq: row.try_get(5)?,
                first_rows,
                parts_total: u32_of(row, 7)?,
                parts_ready: u32_of(row, 8)?,
                rows_ready,
                // exact once planned; until then the estimate made at creation, or what is
                // known to match by now when that is more
                estimated_total: if planned == 1 {
                    first_rows + planned_rows
                } else {
                    estimate.max(first_rows + planned_rows.max(rows_ready))
                },
                total_known: planned == 1,
                created_at_ms: row.try_get(13)?,
                expires_at_ms: row.try_get(14)?,
                finished_at_ms: row.try_get(15)?,
                error: row.try_get(16)?,
                parts: Vec::new(),
            },
            expired: row.try_get::<i64, _>(17)? == 1,
            filter: row.try_get(18)?,
            fields: serde_json::from_str(&fields).map_err(|e| Error::Corrupt(format!("export fields: {e}")))?,
            part_rows: u32_of(row, 20)?,
            first_last_id: row.try_get(21)?,
            plan_after: row.try_get(22)?,
            planned_rows,
        })
    }
}

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
        let sync_rows = i64::from(spec.sync_rows);
        let read = self
            .by_deadline(deadline, async {
                let mut first = self
                    .read_records(org_id, &spec.object, compiled.as_ref(), &spec.fields, "", None, Some(sync_rows + 1))
                    .await?;
                if first.len() as i64 <= sync_rows {
                    return Ok((first, None));
                }
                first.truncate(sync_rows as usize);
                let last_id = first.last().map(|r| r.id.clone()).unwrap_or_default();
                let probe =
                    self.count_range(org_id, &spec.object, compiled.as_ref(), &last_id, ESTIMATE_PROBE + 1).await?;
                Ok((first, Some((last_id, probe))))
            })
            .await;
        let (first, reason, last_id, estimate, exact) = match read {
            Ok((records, None)) => return Ok(ExportStart::Complete { records, as_of_seq }),
            Ok((first, Some((last_id, probe)))) => {
                let estimate = first.len() as i64 + probe.min(ESTIMATE_PROBE);
                (first, ExportReason::LargeResults, last_id, estimate, probe <= ESTIMATE_PROBE)
            }
            Err(Error::DeadlineExceeded { .. }) => (Vec::new(), ExportReason::LongRunning, String::new(), 0, false),
            Err(e) => return Err(e),
        };
        let now = now_ms();
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
            crate::completions::insert(&mut tx, crate::completions::Kind::Export, &id, org_id, url).await?;
        }
        tx.commit().await?;
        let export = self.export_row(&id).await?.info;
        Ok(ExportStart::Started { first, export, token, estimate_exact: exact })
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
        if existing.expired || existing.info.expires_at_ms <= now_ms() {
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

    async fn count_range(
        &self,
        org_id: &str,
        object: &str,
        compiled: Option<&Compiled>,
        after: &str,
        limit: i64,
    ) -> Result<i64, Error> {
        let inner = self.range_sql("1", compiled, false, "LIMIT $5");
        let sql = format!("SELECT COUNT(*) FROM ({inner}) AS probe");
        let query = sqlx::query(&sql).bind(org_id).bind(object).bind(after.to_owned()).bind("").bind(limit);
        let row = bind_condition(query, compiled).fetch_one(&self.reader).await?;
        Ok(row.try_get(0)?)
    }

    async fn export_by_request(&self, org_id: &str, request_id: &str) -> Result<Option<ExportRow>, Error> {
        let row = sqlx::query(&format!("SELECT {EXPORT_COLUMNS} FROM exports WHERE org_id = $1 AND request_id = $2"))
            .bind(org_id)
            .bind(request_id)
            .fetch_optional(&self.writer)
            .await?;
        row.as_ref().map(ExportRow::from_row).transpose()
    }

    async fn export_row(&self, export_id: &str) -> Result<ExportRow, Error> {
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
    async fn export_of_token(&self, org_id: &str, token: &str) -> Result<ExportRow, Error> {
        let row = sqlx::query("SELECT export_id FROM export_tokens WHERE token_hash = $1 AND org_id = $2")
            .bind(token_hash(token))
            .bind(org_id)
            .fetch_optional(&self.reader)
            .await?;
        let Some(row) = row else { return Err(Error::not_found(Missing::Export, "export token")) };
        let export = self.export_row(&row.try_get::<String, _>(0)?).await?;
        if export.expired || export.info.expires_at_ms <= now_ms() {
            return Err(Error::Expired(format!("export {}", export.info.id)));
        }
        Ok(export)
    }

    /// The export a token names (see [`Store::export_of_token`](crate::Store::export_of_token)), with its produced parts.
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
            .bind(now_ms())
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
        .bind(now_ms())
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

    /// Plans more parts of producing exports, for about `budget`: each planned part is the next
    /// `part_rows` matching ids. Answers the parts planned.
    pub async fn plan_exports(&self, budget: std::time::Duration) -> Result<u32, Error> {
        let started = std::time::Instant::now();
        let rows = sqlx::query(&format!(
            "SELECT {EXPORT_COLUMNS} FROM exports WHERE state = 'PRODUCING' AND planned = 0 ORDER BY created_at_ms"
        ))
        .fetch_all(&self.reader)
        .await?;
        let mut planned = 0;
        for row in &rows {
            if started.elapsed() >= budget {
                break;
            }
            let mut export = ExportRow::from_row(row)?;
            let schema = self.object(&export.info.org_id, &export.info.object).await?;
            let compiled = match read_condition(&schema, self.backend, &export.filter, &export.fields, 6) {
                Ok(compiled) => compiled,
                Err(e) => {
                    // the schema changed under the export
                    self.end_export(&export.info.id, ExportState::Failed, &format!("cannot plan: {e}")).await?;
                    continue;
                }
            };
            while started.elapsed() < budget && !export.info.total_known {
                self.plan_part(&mut export, compiled.as_ref()).await?;
                planned += 1;
            }
        }
        Ok(planned)
    }

    /// Plans the next part of `export` (or finds the rest fits in one last part).
    async fn plan_part(&self, export: &mut ExportRow, compiled: Option<&Compiled>) -> Result<(), Error> {
        let info = &export.info;
        let sql = self.range_sql("id", compiled, false, "LIMIT 1 OFFSET $5");
        let query = sqlx::query(&sql)
            .bind(info.org_id.clone())
            .bind(info.object.clone())
            .bind(export.plan_after.clone())
            .bind("")
            .bind(i64::from(export.part_rows) - 1);
        let boundary: Option<String> =
            bind_condition(query, compiled).fetch_optional(&self.reader).await?.map(|r| r.try_get(0)).transpose()?;
        let (last, rows) = match boundary {
            Some(last) => (Some(last), i64::from(export.part_rows)),
            None => (None, self.count_range(&info.org_id, &info.object, compiled, &export.plan_after, i64::MAX).await?),
        };
        let number = export.info.parts_total + 1;
        let mut tx = self.writer.begin().await?;
        // the guard keeps two planners (scheduler replicas) from planning the same range twice
        let advanced = sqlx::query(
            "UPDATE exports SET plan_after = $3, planned = $4, planned_rows = planned_rows + $5, \
             parts_total = parts_total + $6 WHERE id = $1 AND plan_after = $2 AND planned = 0 AND state = 'PRODUCING'",
        )
        .bind(info.id.clone())
        .bind(export.plan_after.clone())
        .bind(last.clone().unwrap_or_default())
        .bind(i64::from(last.is_none()))
        .bind(rows)
        .bind(i64::from(rows > 0))
        .execute(&mut *tx)
        .await?;
        if advanced.rows_affected() == 0 {
            // another planner moved it, or it ended: start again from what is stored
            drop(tx);
            *export = self.export_row(&export.info.id).await?;
            if export.info.state.is_final() {
                export.info.total_known = true;
            }
            return Ok(());
        }
        if rows > 0 {
            sqlx::query(
                "INSERT INTO export_parts (export_id, number, org_id, after_id, last_id, state) \
                 VALUES ($1, $2, $3, $4, $5, 'PENDING')",
            )
            .bind(info.id.clone())
            .bind(i64::from(number))
            .bind(info.org_id.clone())
            .bind(export.plan_after.clone())
            .bind(last.clone())
            .execute(&mut *tx)
            .await?;
        }
        if last.is_none() {
            // the last part planned: an export with nothing left is complete now
            sqlx::query(
                "UPDATE exports SET state = 'COMPLETE', finished_at_ms = $2 \
                 WHERE id = $1 AND state = 'PRODUCING' AND parts_ready = parts_total",
            )
            .bind(info.id.clone())
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        self.touched(Topic::Export(&info.id));
        if rows > 0 {
            export.info.parts_total = number;
        }
        export.planned_rows += rows;
        export.plan_after = last.clone().unwrap_or_default();
        export.info.total_known = last.is_none();
        Ok(())
    }

    /// Releases planned parts to workers: at most `per_export` in flight per export and
    /// `overall` over all, oldest export first. Serialized across scheduler replicas by the
    /// release lock row, like chunk releases.
    pub async fn release_parts(&self, claimer: &str, per_export: u32, overall: u32) -> Result<Vec<PartRef>, Error> {
        let now = now_ms();
        // The releaser asks after every answer; most of the time no part waits, and the release
        // then costs one read, not the write transaction (on SQLite the one writer that batch
        // chunks wait for). A part's release is not shown to watchers: nothing to announce.
        let Some(Release { mut tx, .. }) = self.begin_release(Releasable::Parts, now).await? else {
            return Ok(Vec::new());
        };
        let in_flight =
            sqlx::query("SELECT export_id, COUNT(*) FROM export_parts WHERE state = 'RELEASED' GROUP BY export_id")
                .fetch_all(&mut *tx)
                .await?;
        let mut per: std::collections::HashMap<String, u32> = std::collections::HashMap::new();
        let mut total = 0;
        for row in &in_flight {
            let n = u32_of(row, 1)?;
            per.insert(row.try_get(0)?, n);
            total += n;
        }
        let mut released = Vec::new();
        if total < overall {
            let rows = sqlx::query(
                "SELECT p.org_id, p.export_id, p.number, e.traceparent FROM export_parts p \
                 JOIN exports e ON e.id = p.export_id \
                 WHERE p.state = 'PENDING' AND e.state = 'PRODUCING' ORDER BY e.created_at_ms, p.export_id, p.number \
                 LIMIT $1",
            )
            .bind(i64::from(overall - total) * i64::from(per_export.max(1)))
            .fetch_all(&mut *tx)
            .await?;
            for row in &rows {
                let part = PartRef {
                    org_id: row.try_get(0)?,
                    export_id: row.try_get(1)?,
                    number: u32_of(row, 2)?,
                    traceparent: row.try_get(3)?,
                };
                let count = per.entry(part.export_id.clone()).or_default();
                if total >= overall || *count >= per_export {
                    continue;
                }
                if release::claim(&mut tx, Releasable::Parts, &part.export_id, part.number, claimer, now).await? {
                    *count += 1;
                    total += 1;
                    released.push(part);
                }
            }
        }
        tx.commit().await?;
        Ok(released)
    }

    /// Records that a released part is journaled by the manager (it is no longer released again
    /// by timeout: the manager delivers it).
    pub async fn mark_part_sent(&self, part: &PartRef) -> Result<(), Error> {
        self.mark_release_sent(Releasable::Parts, &part.export_id, part.number).await
    }

    /// [`Store::recover_chunks`](crate::Store::recover_chunks) for export parts: of the parts scheduler `claimer` released and
    /// had not marked sent, those in `held` (export id, part number) are marked sent and the
    /// others go back to PENDING at once.
    pub async fn recover_parts(&self, claimer: &str, held: &[(String, u32)]) -> Result<Recovered, Error> {
        self.recover_releases(Releasable::Parts, claimer, held).await
    }

    /// Produces a part: reads its id range, writes it to `blobs` under a fresh key and records it
    /// READY, unless it already is (answered again) or its export ended (nothing recorded, the
    /// blob deleted).
    pub async fn produce_part(
        &self,
        blobs: &Blobs,
        export_id: &str,
        number: u32,
        worker: &str,
    ) -> Result<PartOutcome, Error> {
        let export = self.export_row(export_id).await?;
        let part = sqlx::query(
            "SELECT state, after_id, last_id, row_count FROM export_parts WHERE export_id = $1 AND number = $2",
        )
        .bind(export_id)
        .bind(i64::from(number))
        .fetch_optional(&self.reader)
        .await?
        .ok_or_else(|| Error::not_found(Missing::Part, format!("part {number} of export {export_id}")))?;
        let state: String = part.try_get(0)?;
        if state == "READY" {
            return Ok(PartOutcome::Produced(part.try_get(3)?));
        }
        if state == "CANCELLED" || export.info.state.is_final() || export.expired {
            return Ok(PartOutcome::NotProduced);
        }
        sqlx::query(
            "UPDATE export_parts SET attempts = attempts + 1, worker = $3 WHERE export_id = $1 AND number = $2",
        )
        .bind(export_id)
        .bind(i64::from(number))
        .bind(worker)
        .execute(&self.writer)
        .await?;
        let (after, last): (String, Option<String>) = (part.try_get(1)?, part.try_get(2)?);
        let info = &export.info;
        let schema = self.object(&info.org_id, &info.object).await?;
        let compiled = read_condition(&schema, self.backend, &export.filter, &export.fields, 6)?;
        let mut blob = Compressor::with_capacity(export.part_rows as usize * 32);
        let mut rows = 0i64;
        let fields = &export.fields;
        if fields.is_empty() {
            rows = self
                .read_lines(&info.org_id, &info.object, compiled.as_ref(), &after, last.as_deref(), &mut blob)
                .await?;
        } else {
            let mut data = Vec::new();
            self.read_range(&info.org_id, &info.object, compiled.as_ref(), &after, last.as_deref(), None, |raw| {
                write_line(&mut data, raw, fields)?;
                rows += 1;
                Ok(())
            })
            .await?;
            blob.write(&data)?;
        }
        let key = format!("exports/{export_id}/{number:06}-{}.ndjson.lz4", hex::encode(rand::random::<[u8; 6]>()));
        let bytes = blobs.put(&key, blob).await?;
        let now = now_ms();
        let mut tx = self.writer.begin().await?;
        let recorded = sqlx::query(
            "UPDATE export_parts SET state = 'READY', blob_key = $3, row_count = $4, byte_count = $5, worker = $6, \
             finished_at_ms = $7 WHERE export_id = $1 AND number = $2 AND state IN ('PENDING', 'RELEASED') \
             AND (SELECT state FROM exports WHERE id = $1) = 'PRODUCING'",
        )
        .bind(export_id)
        .bind(i64::from(number))
        .bind(key.clone())
        .bind(rows)
        .bind(bytes as i64)
        .bind(worker)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        if recorded.rows_affected() == 0 {
            drop(tx);
            blobs.delete(&key).await?;
            let part = sqlx::query("SELECT state, row_count FROM export_parts WHERE export_id = $1 AND number = $2")
                .bind(export_id)
                .bind(i64::from(number))
                .fetch_optional(&self.writer)
                .await?;
            return match part {
                Some(part) if part.try_get::<String, _>(0)? == "READY" => Ok(PartOutcome::Produced(part.try_get(1)?)),
                _ => Ok(PartOutcome::NotProduced),
            };
        }
        sqlx::query(
            "UPDATE exports SET parts_ready = parts_ready + 1, rows_ready = rows_ready + $2, \
             state = CASE WHEN planned = 1 AND parts_ready + 1 = parts_total THEN 'COMPLETE' ELSE state END, \
             finished_at_ms = CASE WHEN planned = 1 AND parts_ready + 1 = parts_total THEN $3 ELSE finished_at_ms END \
             WHERE id = $1",
        )
        .bind(export_id)
        .bind(rows)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.touched(Topic::Export(export_id));
        Ok(PartOutcome::Produced(rows))
    }

    /// Reads a produced part's rows.
    pub async fn read_part(&self, blobs: &Blobs, org_id: &str, token: &str, number: u32) -> Result<PartRead, Error> {
        let export = self.export_of_token(org_id, token).await?;
        let part =
            sqlx::query("SELECT state, blob_key, row_count FROM export_parts WHERE export_id = $1 AND number = $2")
                .bind(export.info.id.clone())
                .bind(i64::from(number))
                .fetch_optional(&self.reader)
                .await?;
        let Some(part) = part else {
            if number == 0 || (export.info.total_known && number > export.info.parts_total) {
                return Ok(PartRead::OutOfRange(export.info.parts_total));
            }
            if export.info.state.is_final() {
                return Ok(PartRead::Never(export.info.state));
            }
            return Ok(PartRead::NotReady);
        };
        match part.try_get::<String, _>(0)?.as_str() {
            "READY" => {}
            _ if export.info.state.is_final() => return Ok(PartRead::Never(export.info.state)),
            _ => return Ok(PartRead::NotReady),
        }
        let schema = self.object(org_id, &export.info.object).await?;
        let data = blobs.get_decompressed(&part.try_get::<String, _>(1)?).await?;
        Ok(PartRead::Rows(PartRows { number, rows: part.try_get(2)?, schema, data }))
    }

    /// Deletes the parts of exports past their retention (at most `limit` exports); their
    /// tokens then answer [`Error::Expired`]. Answers how many exports expired.
    pub async fn expire_exports(&self, blobs: &Blobs, limit: u32) -> Result<u32, Error> {
        let now = now_ms();
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

impl Store {
    /// Appends the whole records in `(after, last]` matching `compiled` to `out` as part lines,
    /// formatted by the database, [`LINE_BATCH`] rows to a query; answers how many.
    ///
    /// The line is [`write_line`]'s, built in SQL: fetching a row through the driver costs more
    /// than the database takes to read and format it, so a batch of lines comes back as one text
    /// value (at 10M rows this is what makes a part's production run near the scan rate). A batch
    /// is compressed while the database reads the next.
    async fn read_lines(
        &self,
        org_id: &str,
        object: &str,
        compiled: Option<&Compiled>,
        after: &str,
        last: Option<&str>,
        out: &mut Compressor,
    ) -> Result<i64, Error> {
        // SQLite aggregates the rows in the order its ordered, limited subquery yields them (a
        // co-routine; an ORDER BY inside group_concat would sort them again through a temporary
        // b-tree, a fifth of the work); the store suite checks the order on both backends
        let (quote_id, fields, concat) = match self.backend {
            Backend::Sqlite => ("json_quote(id)", "fields", "group_concat(line, '')"),
            Backend::Postgres => ("to_json(id)::text", "fields::text", "string_agg(line, '' ORDER BY id)"),
        };
        // one format() per row (cheaper than a chain of ||); the literal ends with a newline
        let line = format!(
            "id, format('{{\"id\":%s,\"version\":%s,\"updated_at_ms\":%s,\"fields\":%s}}\n', \
             {quote_id}, version, updated_at_ms, {fields}) AS line"
        );
        let batch = self.range_sql(&line, compiled, last.is_some(), "LIMIT $5");
        let sql = format!("SELECT COUNT(*), MAX(id), {concat} FROM ({batch}) AS batch");
        let mut conn = self.reader.acquire().await?;
        let mut cursor = after.to_owned();
        let mut rows = 0;
        let mut previous: Option<String> = None;
        loop {
            let query = sqlx::query(&sql)
                .bind(org_id)
                .bind(object)
                .bind(cursor.clone())
                .bind(last.unwrap_or("").to_owned())
                .bind(LINE_BATCH);
            // the query is sent first; the previous batch is compressed while it runs
            let (row, written) = tokio::join!(bind_condition(query, compiled).fetch_one(&mut *conn), async {
                previous.take().map_or(Ok(()), |lines| out.write(lines.as_bytes()))
            });
            written?;
            let row = row?;
            let count: i64 = row.try_get(0)?;
            if count > 0 {
                rows += count;
                cursor = row.try_get(1)?;
                previous = Some(row.try_get(2)?);
            }
            if count < LINE_BATCH {
                if let Some(lines) = previous {
                    out.write(lines.as_bytes())?;
                }
                return Ok(rows);
            }
        }
    }
}

/// Appends a record as one line of a part blob; the stored fields JSON is copied as it is when
/// every field is asked for.
fn write_line(out: &mut Vec<u8>, raw: RawRow, fields: &[String]) -> Result<(), Error> {
    use std::io::Write;
    let id = serde_json::to_string(&raw.id).map_err(|e| Error::Corrupt(e.to_string()))?;
    let _ =
        write!(out, "{{\"id\":{id},\"version\":{},\"updated_at_ms\":{},\"fields\":", raw.version, raw.updated_at_ms);
    if fields.is_empty() {
        out.extend_from_slice(raw.fields.as_bytes());
    } else {
        let mut parsed = decode_fields(&raw.fields)?;
        parsed.retain(|k, _| fields.contains(k));
        serde_json::to_writer(&mut *out, &parsed).map_err(|e| Error::Corrupt(e.to_string()))?;
    }
    out.extend_from_slice(b"}\n");
    Ok(())
}
