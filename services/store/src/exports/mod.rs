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
//!
//! This module holds the types, constants and the export row's decoding; the work is in one file
//! a concern: `lifecycle` (start, read, list, cancel, end, expire), `plan` (cutting the parts),
//! `release` (parts released to the workers) and `produce` (a part's blob written and read).

mod lifecycle;
mod plan;
mod produce;
mod release;

use sqlx::Row;
use sqlx::any::AnyRow;

use crate::Error;
use crate::batches::u32_of;
use crate::model::{ObjectSchema, Record};

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
