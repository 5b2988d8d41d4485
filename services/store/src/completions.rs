//! Completions pushed to a webhook: the delivery record of each batch or export submitted with
//! one (table `completions`, migration 0012).
//!
//! A row is written in the transaction that creates its batch ([`Store::begin_batch`]) or export
//! ([`Store::start_export`]), WAITING. The scheduler's delivery loop (`baton_scheduler::completions`)
//! then moves it along, each step one conditional statement, so that several schedulers on one
//! database agree:
//!
//! 1. [`Store::finished_waiting`] finds WAITING rows whose batch or export is finished;
//!    [`Store::ready_completion`] makes each PENDING with its body, built once, so every attempt
//!    sends the same document.
//! 2. [`Store::claim_completions`] claims PENDING rows due for an attempt, with a lease, counting
//!    the attempt; one scheduler wins each row.
//! 3. [`Store::record_delivery`] records the answer: DELIVERED (a 2xx), or the error and the
//!    next attempt's time, or FAILED when the caller gives up.
//!
//! Delivery is at least once: an attempt whose claimer stalls past its lease may be made again by
//! another scheduler. Every 2xx answer is counted (`acknowledgments`), so a completion the
//! receiver was sent twice shows as two.

use std::time::Duration;

use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use crate::batches::u32_of;
use crate::exports::ExportInfo;
use crate::{Error, Missing, Store};

/// What a completion is of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A batch: finished once every chunk has its outcome (or it is cancelled with nothing in
    /// flight).
    Batch,
    /// An export: finished once complete, failed or cancelled.
    Export,
}

stored_names!(Kind, "completion kind" {
    Batch => "batch",
    Export => "export",
});

/// Where a completion's delivery is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryState {
    /// The batch or export is not finished yet.
    Waiting,
    /// Finished; being delivered (attempts go on, with backoff).
    Pending,
    /// The receiver acknowledged it (answered 2xx).
    Delivered,
    /// Given up: no attempt was acknowledged before the give-up deadline.
    Failed,
}

stored_names!(DeliveryState, "completion state" {
    Waiting => "WAITING",
    Pending => "PENDING",
    Delivered => "DELIVERED",
    Failed => "FAILED",
});

/// The delivery of a completion, as GetBatch and GetExport show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The batch or export id, which is also the delivery id.
    pub subject_id: String,
    /// What it is of.
    pub kind: Kind,
    /// The webhook.
    pub url: String,
    /// Where it is.
    pub state: DeliveryState,
    /// Attempts started.
    pub attempts: u32,
    /// 2xx answers received: 1 once delivered, more if the receiver was sent it again.
    pub acknowledgments: u32,
    /// Why the last failed attempt failed ("" if none did).
    pub last_error: String,
    /// When the last attempt started (ms), 0 before.
    pub last_attempt_ms: i64,
    /// When the next attempt is due (ms), while pending.
    pub next_attempt_ms: i64,
    /// When it was first acknowledged (ms), 0 before.
    pub delivered_at_ms: i64,
}

/// A delivery claimed for an attempt by [`Store::claim_completions`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    /// The batch or export id: the delivery id.
    pub subject_id: String,
    /// What it is of.
    pub kind: Kind,
    /// The org.
    pub org_id: String,
    /// The webhook.
    pub url: String,
    /// The JSON body.
    pub body: String,
    /// Attempts started, this one included.
    pub attempts: u32,
    /// When the subject was found finished (ms): the give-up deadline counts from it.
    pub ready_at_ms: i64,
}

/// The answer to an attempt, for [`Store::record_delivery`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempted {
    /// The receiver answered 2xx.
    Acknowledged,
    /// It did not (the error says what happened); the next attempt at `retry_at_ms`, or none:
    /// the delivery FAILED.
    Failed {
        /// What went wrong: a transport error, or the HTTP status and the start of the answer.
        error: String,
        /// When to try again (ms), or None to give up.
        retry_at_ms: Option<i64>,
    },
}

/// The most bytes of an error kept.
const MAX_ERROR: usize = 500;

/// Records that a completion of `kind` `subject_id` of `org_id` goes to `url`, in the
/// transaction that creates the batch or export, at `now`.
pub(crate) async fn insert(
    conn: &mut AnyConnection,
    kind: Kind,
    subject_id: &str,
    org_id: &str,
    url: &str,
    now: i64,
) -> Result<(), Error> {
    sqlx::query(
        "INSERT INTO completions (subject_id, kind, org_id, url, state, created_at_ms) \
         VALUES ($1, $2, $3, $4, 'WAITING', $5)",
    )
    .bind(subject_id)
    .bind(kind.as_str())
    .bind(org_id)
    .bind(url)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

fn delivery_of(row: &AnyRow) -> Result<Delivery, Error> {
    Ok(Delivery {
        subject_id: row.try_get(0)?,
        kind: Kind::parse(&row.try_get::<String, _>(1)?)?,
        url: row.try_get(2)?,
        state: DeliveryState::parse(&row.try_get::<String, _>(3)?)?,
        attempts: u32_of(row, 4)?,
        acknowledgments: u32_of(row, 5)?,
        last_error: row.try_get(6)?,
        last_attempt_ms: row.try_get(7)?,
        next_attempt_ms: row.try_get(8)?,
        delivered_at_ms: row.try_get(9)?,
    })
}

/// A prefix of `s` of at most `max` bytes, on a character boundary.
fn clip(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl Store {
    /// The delivery of the completion of batch or export `subject_id` of the org, if it named a
    /// webhook.
    pub async fn completion(&self, org_id: &str, subject_id: &str) -> Result<Option<Delivery>, Error> {
        let row = sqlx::query(
            "SELECT subject_id, kind, url, state, attempts, acknowledgments, last_error, last_attempt_ms, \
             next_attempt_ms, delivered_at_ms FROM completions WHERE subject_id = $1 AND org_id = $2",
        )
        .bind(subject_id)
        .bind(org_id)
        .fetch_optional(&self.reader)
        .await?;
        row.as_ref().map(delivery_of).transpose()
    }

    /// Export `export_id` of the org, by id (a completion is of an export, not of a token).
    pub async fn export_of_completion(&self, org_id: &str, export_id: &str) -> Result<ExportInfo, Error> {
        match self.export_info(export_id).await {
            Ok(export) if export.org_id == org_id => Ok(export),
            Ok(_) => Err(Error::not_found(Missing::Export, format!("export {export_id}"))),
            Err(e) => Err(e),
        }
    }

    /// Gives up the leases `claimer` holds: a restarted scheduler's attempts of its last run are
    /// over, so what they claimed is due again at once rather than when the leases run out.
    pub async fn release_completion_claims(&self, claimer: &str) -> Result<u64, Error> {
        let done = sqlx::query(
            "UPDATE completions SET claimed_by = '', lease_until_ms = 0 WHERE claimed_by = $1 AND state = 'PENDING'",
        )
        .bind(claimer)
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected())
    }

    /// WAITING completions whose batch or export is finished, at most `limit` of each kind:
    /// (kind, subject id, org).
    pub async fn finished_waiting(&self, limit: u32) -> Result<Vec<(Kind, String, String)>, Error> {
        // a batch is finished when it is no longer staging and none of its chunks is in flight
        // or pending (cancelling makes its pending chunks CANCELLED)
        let batches = sqlx::query(
            "SELECT c.subject_id, c.org_id FROM completions c JOIN batches b ON b.id = c.subject_id \
             WHERE c.state = 'WAITING' AND c.kind = 'batch' AND b.state <> 'STAGING' \
             AND NOT EXISTS (SELECT 1 FROM chunks k WHERE k.batch_id = b.id \
             AND k.state IN ('PENDING', 'RELEASED', 'RUNNING')) LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        let exports = sqlx::query(
            "SELECT c.subject_id, c.org_id FROM completions c JOIN exports e ON e.id = c.subject_id \
             WHERE c.state = 'WAITING' AND c.kind = 'export' AND e.state IN ('COMPLETE', 'FAILED', 'CANCELLED') \
             LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        let of = |kind: Kind, r: &AnyRow| -> Result<(Kind, String, String), Error> {
            Ok((kind, r.try_get(0)?, r.try_get(1)?))
        };
        let batches = batches.iter().map(|r| of(Kind::Batch, r));
        batches.chain(exports.iter().map(|r| of(Kind::Export, r))).collect()
    }

    /// Makes a WAITING completion PENDING, due at once, with the body every attempt sends.
    /// False when it was not WAITING (another scheduler got there first).
    pub async fn ready_completion(&self, subject_id: &str, body: &str) -> Result<bool, Error> {
        let now = self.now_ms();
        let done = sqlx::query(
            "UPDATE completions SET state = 'PENDING', body = $2, ready_at_ms = $3, next_attempt_ms = $3 \
             WHERE subject_id = $1 AND state = 'WAITING'",
        )
        .bind(subject_id)
        .bind(body)
        .bind(now)
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Claims at most `limit` PENDING completions due for an attempt and not leased, for
    /// `claimer`, each for `lease`, counting the attempt. Of several schedulers, one claims each.
    pub async fn claim_completions(&self, claimer: &str, lease: Duration, limit: u32) -> Result<Vec<Claimed>, Error> {
        let now = self.now_ms();
        let due = sqlx::query(
            "SELECT subject_id FROM completions WHERE state = 'PENDING' AND next_attempt_ms <= $1 \
             AND lease_until_ms < $1 ORDER BY next_attempt_ms LIMIT $2",
        )
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        let mut claimed = Vec::with_capacity(due.len());
        for row in due {
            let id: String = row.try_get(0)?;
            // conditional, so one claimer wins (a row lock on PostgreSQL, the write lock on SQLite)
            let row = sqlx::query(
                "UPDATE completions SET claimed_by = $2, lease_until_ms = $3, attempts = attempts + 1, \
                 last_attempt_ms = $4 WHERE subject_id = $1 AND state = 'PENDING' AND next_attempt_ms <= $4 \
                 AND lease_until_ms < $4 RETURNING kind, org_id, url, body, attempts, ready_at_ms",
            )
            .bind(id.clone())
            .bind(claimer)
            .bind(now.saturating_add(lease.as_millis() as i64))
            .bind(now)
            .fetch_optional(&self.writer)
            .await?;
            if let Some(row) = row {
                claimed.push(Claimed {
                    subject_id: id,
                    kind: Kind::parse(&row.try_get::<String, _>(0)?)?,
                    org_id: row.try_get(1)?,
                    url: row.try_get(2)?,
                    body: row.try_get(3)?,
                    attempts: u32_of(&row, 4)?,
                    ready_at_ms: row.try_get(5)?,
                });
            }
        }
        Ok(claimed)
    }

    /// Records the answer to `claimer`'s attempt at delivering `subject_id`, and gives up its
    /// lease. An acknowledgment makes it DELIVERED (counted even when it was already: a second
    /// send); a failure records the error and, while it is PENDING, the next attempt's time or
    /// FAILED.
    pub async fn record_delivery(&self, subject_id: &str, claimer: &str, attempted: &Attempted) -> Result<(), Error> {
        let now = self.now_ms();
        // the lease is given up only by its holder (it may have run out and moved on)
        let release = "claimed_by = CASE WHEN claimed_by = $2 THEN '' ELSE claimed_by END, \
                       lease_until_ms = CASE WHEN claimed_by = $2 THEN 0 ELSE lease_until_ms END";
        match attempted {
            Attempted::Acknowledged => {
                sqlx::query(&format!(
                    "UPDATE completions SET state = 'DELIVERED', acknowledgments = acknowledgments + 1, \
                     delivered_at_ms = CASE WHEN delivered_at_ms = 0 THEN $3 ELSE delivered_at_ms END, \
                     {release} WHERE subject_id = $1"
                ))
                .bind(subject_id)
                .bind(claimer)
                .bind(now)
                .execute(&self.writer)
                .await?;
            }
            Attempted::Failed { error, retry_at_ms } => {
                sqlx::query(&format!(
                    "UPDATE completions SET last_error = $3, \
                     state = CASE WHEN state = 'PENDING' AND $4 = 0 THEN 'FAILED' ELSE state END, \
                     next_attempt_ms = CASE WHEN state = 'PENDING' THEN $4 ELSE next_attempt_ms END, \
                     {release} WHERE subject_id = $1"
                ))
                .bind(subject_id)
                .bind(claimer)
                .bind(clip(error, MAX_ERROR))
                .bind(retry_at_ms.unwrap_or(0))
                .execute(&self.writer)
                .await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_clipped_on_a_character_boundary() {
        assert_eq!(clip("abc", 10), "abc");
        assert_eq!(clip("abcdef", 3), "abc");
        // 'é' is two bytes: a clip inside it keeps the character out
        assert_eq!(clip("aé", 2), "a");
    }
}
