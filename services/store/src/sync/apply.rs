//! The target side of sync: replicated changes applied under a per-link watermark, version
//! guarded and idempotent; the pages of a link's snapshot; and the change log's trimming.

use std::collections::HashMap;
use std::time::Duration;

use sqlx::{Any, AnyConnection, Row, Transaction};
use tokio::time::Instant;

use super::{ApplyOutcome, SnapshotPage, SnapshotRow};
use crate::model::{ChangeEvent, ChangeOp, Fields, ObjectSchema, Record};
use crate::records::decode_fields;
use crate::schema::{record_id, validate_records};
use crate::writer::{BatchWriter, RecordWrite};
use crate::{Error, Missing, Store};

/// The most an ApplyChanges transaction may take: a link's batch is at most `--link-batch`
/// changes, applied in well under a second; past this the database is in trouble and the link
/// suspends and retries.
const APPLY_LIMIT: Duration = Duration::from_secs(60);

impl Store {
    /// A page of a link's snapshot of `object`: its records after id `after` (None: from the
    /// first), tombstones included, in id order, at most `limit`. A link sends the tombstones as
    /// deletes at their version: a record deleted while the link could not follow the change log
    /// (a cursor behind the trimmed log, a link made again to the same target) is then deleted on
    /// the target too, and the version guard makes it harmless anywhere else.
    pub async fn snapshot_page(
        &self,
        org_id: &str,
        object: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<SnapshotPage, Error> {
        let schema = self.object(org_id, object).await?;
        let sql = format!(
            "SELECT id, {}, version, updated_at_ms, deleted FROM records \
             WHERE org_id = $1 AND object = $2 AND id > $3 ORDER BY id LIMIT $4",
            self.json_column("fields")
        );
        let rows = sqlx::query(&sql)
            .bind(org_id)
            .bind(object)
            .bind(after.unwrap_or("").to_owned())
            .bind(limit as i64 + 1)
            .fetch_all(&self.reader)
            .await?;
        let mut rows = rows
            .iter()
            .map(|r| {
                let deleted = r.try_get::<i64, _>(4)? != 0;
                let fields = if deleted { Default::default() } else { decode_fields(&r.try_get::<String, _>(1)?)? };
                Ok(SnapshotRow {
                    record: Record { id: r.try_get(0)?, fields, version: r.try_get(2)?, updated_at_ms: r.try_get(3)? },
                    deleted,
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let next_after = if rows.len() > limit {
            rows.truncate(limit);
            rows.last().map(|r| r.record.id.clone())
        } else {
            None
        };
        Ok(SnapshotPage { rows, next_after, schema })
    }

    /// The seq up to which an org's change log was trimmed (0 if never).
    pub async fn trimmed_seq(&self, org_id: &str) -> Result<i64, Error> {
        let row =
            sqlx::query("SELECT trimmed_seq FROM orgs WHERE id = $1").bind(org_id).fetch_optional(&self.reader).await?;
        match row {
            Some(row) => Ok(row.try_get(0)?),
            None => Err(Error::not_found(Missing::Org, format!("org {org_id}"))),
        }
    }

    /// Deletes change events committed before `cutoff_ms`, org by org, and records how far each
    /// org's log is trimmed. Returns the number of events deleted.
    pub async fn trim_changes(&self, cutoff_ms: i64) -> Result<u64, Error> {
        let rows = sqlx::query("SELECT org_id, MAX(seq) FROM change_events WHERE committed_at_ms < $1 GROUP BY org_id")
            .bind(cutoff_ms)
            .fetch_all(&self.reader)
            .await?;
        let mut deleted = 0;
        for row in rows {
            let org: String = row.try_get(0)?;
            let upto: i64 = row.try_get(1)?;
            let mut tx = self.writer.begin().await?;
            sqlx::query("UPDATE orgs SET trimmed_seq = $2 WHERE id = $1 AND trimmed_seq < $2")
                .bind(org.clone())
                .bind(upto)
                .execute(&mut *tx)
                .await?;
            deleted += sqlx::query("DELETE FROM change_events WHERE org_id = $1 AND seq <= $2")
                .bind(org)
                .bind(upto)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            tx.commit().await?;
        }
        Ok(deleted)
    }

    /// The commit time of the first change of an org after `after_seq`, if there is one.
    pub async fn first_change_time_after(&self, org_id: &str, after_seq: i64) -> Result<Option<i64>, Error> {
        let row = sqlx::query("SELECT MIN(committed_at_ms) FROM change_events WHERE org_id = $1 AND seq = $2")
            .bind(org_id)
            .bind(after_seq + 1)
            .fetch_one(&self.reader)
            .await?;
        Ok(row.try_get::<Option<i64>, _>(0)?)
    }

    /// The watermark of a link on the target side.
    pub async fn apply_watermark(&self, org_id: &str, link_id: &str) -> Result<i64, Error> {
        let row = sqlx::query("SELECT seq FROM apply_watermarks WHERE org_id = $1 AND link_id = $2")
            .bind(org_id)
            .bind(link_id)
            .fetch_optional(&self.reader)
            .await?;
        Ok(match row {
            Some(row) => row.try_get(0)?,
            None => 0,
        })
    }

    /// Applies replicated changes to `org_id` (the target) in one transaction: a change at or below
    /// the link's watermark is skipped (unless `snapshot`), a record is written only when the
    /// change's version is newer than the stored one (a tombstone keeps its version), and the
    /// watermark moves to the last seq in the same transaction. A change the target's schema
    /// rejects is reported and not applied; the others are.
    pub async fn apply_changes(
        &self,
        org_id: &str,
        link_id: &str,
        changes: &[ChangeEvent],
        snapshot: bool,
    ) -> Result<ApplyOutcome, Error> {
        let deadline = Instant::now() + APPLY_LIMIT;
        let (tx, (outcome, moved)) =
            self.by_deadline(deadline, self.apply_in_transaction(org_id, link_id, changes, snapshot)).await?;
        tx.commit().await?;
        if let Some(seq) = moved {
            self.committed(org_id, seq);
        }
        Ok(outcome)
    }

    /// The transaction of [`Store::apply_changes`], under the org's write lock: answers it, for
    /// the caller to commit, with the outcome and the org's last seq when it moved.
    async fn apply_in_transaction(
        &self,
        org_id: &str,
        link_id: &str,
        changes: &[ChangeEvent],
        snapshot: bool,
    ) -> Result<(Transaction<'static, Any>, (ApplyOutcome, Option<i64>)), Error> {
        let mut tx = self.writer.begin().await?;
        let base = self.lock_org(&mut tx, org_id).await?;
        let watermark = watermark_in(&mut tx, org_id, link_id).await?;
        let mut outcome = ApplyOutcome { watermark, ..ApplyOutcome::default() };
        let fresh = |c: &ChangeEvent| snapshot || c.seq > watermark;
        let mut targets = self.apply_targets(&mut tx, org_id, changes.iter().filter(|c| fresh(c))).await?;
        let now = self.now_ms();
        let mut seq = base;
        let mut last_seen = watermark;
        let mut writer: Option<BatchWriter<'_>> = None;
        for change in changes {
            if !fresh(change) {
                outcome.skipped += 1;
                continue;
            }
            if !snapshot {
                last_seen = last_seen.max(change.seq);
            }
            let Some(schema) = targets.schemas.get(change.object.as_str()) else {
                let reason = format!("the target has no object {:?}", change.object);
                outcome.rejected.push((change.seq, change.record_id.clone(), reason));
                continue;
            };
            let key = (change.object.as_str(), change.record_id.clone());
            if change.version <= targets.current.get(&key).copied().unwrap_or(0) {
                outcome.skipped += 1;
                continue;
            }
            if writer.as_ref().is_none_or(|w| w.object() != change.object) {
                if let Some(mut done) = writer.take() {
                    done.flush(&mut tx).await?;
                    seq = done.seq;
                }
                let ids = &targets.ids_by_object[change.object.as_str()];
                let mut w = BatchWriter::new(self, &mut tx, org_id, schema, ids, seq, now).await?;
                let current = &targets.current;
                w.known_absent(
                    ids.iter().filter(|id| !current.contains_key(&(change.object.as_str(), (*id).clone()))).cloned(),
                );
                writer = Some(w);
            }
            let Some(w) = writer.as_mut() else { continue };
            let fields = match self.change_fields(&mut tx, org_id, schema, w, change).await? {
                Ok(fields) => fields,
                Err(reason) => {
                    outcome.rejected.push((change.seq, change.record_id.clone(), reason));
                    continue;
                }
            };
            let write = RecordWrite { id: change.record_id.clone(), fields, version: change.version, text: None };
            w.write(&mut tx, write).await?;
            targets.current.insert(key, change.version);
            outcome.applied += 1;
        }
        if let Some(mut done) = writer.take() {
            done.flush(&mut tx).await?;
            seq = done.seq;
        }
        if seq != base {
            self.set_last_seq(&mut tx, org_id, seq).await?;
        }
        let moved = (seq != base).then_some(seq);
        if last_seen > watermark {
            outcome.watermark = last_seen;
            save_watermark(&mut tx, org_id, link_id, last_seen).await?;
        }
        Ok((tx, (outcome, moved)))
    }

    /// The objects the `fresh` changes touch, read in `conn`'s transaction: their schemas (an
    /// object the target lacks left out) and the stored versions of the records they name.
    async fn apply_targets<'c>(
        &self,
        conn: &mut AnyConnection,
        org_id: &str,
        fresh: impl Iterator<Item = &'c ChangeEvent>,
    ) -> Result<Targets<'c>, Error> {
        // the schema and current versions of every object this batch touches
        let mut targets = Targets { ids_by_object: HashMap::new(), schemas: HashMap::new(), current: HashMap::new() };
        for c in fresh {
            targets.ids_by_object.entry(c.object.as_str()).or_default().push(c.record_id.clone());
        }
        for (&object, ids) in &targets.ids_by_object {
            match self.object(org_id, object).await {
                Ok(schema) => {
                    targets.schemas.insert(object, schema);
                }
                Err(Error::NotFound(_)) => continue,
                Err(e) => return Err(e),
            }
            for (id, (version, _)) in self.versions_of(conn, org_id, object, ids).await? {
                targets.current.insert((object, id), version);
            }
        }
        Ok(targets)
    }

    /// The fields `change` writes (None: a delete), or why the target rejects it: an upsert
    /// without fields, or with fields the target's `schema` refuses, a unique value `writer`
    /// would write included (looked up in `conn`'s transaction).
    async fn change_fields(
        &self,
        conn: &mut AnyConnection,
        org_id: &str,
        schema: &ObjectSchema,
        writer: &BatchWriter<'_>,
        change: &ChangeEvent,
    ) -> Result<Result<Option<Fields>, String>, Error> {
        let fields = match (change.op, &change.fields) {
            (ChangeOp::Upsert, Some(fields)) => fields,
            (ChangeOp::Upsert, None) => return Ok(Err("an upsert without fields".into())),
            (ChangeOp::Delete, _) => return Ok(Ok(None)),
        };
        let mut fields = fields.clone();
        let mut problems = validate_records(schema, std::slice::from_mut(&mut fields));
        if problems.is_empty() && record_id(schema, &fields).as_deref() != Some(change.record_id.as_str()) {
            problems.push(crate::FieldError::new("id", "the record's external id does not match its id"));
        }
        if problems.is_empty()
            && writer.touches_unique(&change.record_id, Some(&fields))
            && let Err(Error::Invalid(unique)) = self
                .check_unique(
                    conn,
                    org_id,
                    schema,
                    std::slice::from_ref(&fields),
                    std::slice::from_ref(&change.record_id),
                )
                .await
        {
            problems = unique;
        }
        if problems.is_empty() {
            return Ok(Ok(Some(fields)));
        }
        // every problem, each naming its field: a field the source added and
        // the target's schema lacks reads `nickname: unknown field of object …`
        let reason = problems
            .iter()
            .map(|p| format!("{}: {}", p.field.trim_start_matches("records[0]."), p.description))
            .collect::<Vec<_>>()
            .join("; ");
        Ok(Err(reason))
    }
}

/// What [`Store::apply_changes`] knows of the objects its changes touch, read under the org's
/// write lock.
struct Targets<'c> {
    /// The ids each object's fresh changes name.
    ids_by_object: HashMap<&'c str, Vec<String>>,
    /// The schema of each of those objects the target has.
    schemas: HashMap<&'c str, ObjectSchema>,
    /// The stored version of each record (object, id) named, kept up to date as changes apply.
    current: HashMap<(&'c str, String), i64>,
}

/// A link's watermark on the target side, read in `conn`'s transaction (0: none yet).
async fn watermark_in(conn: &mut AnyConnection, org_id: &str, link_id: &str) -> Result<i64, Error> {
    let row = sqlx::query("SELECT seq FROM apply_watermarks WHERE org_id = $1 AND link_id = $2")
        .bind(org_id)
        .bind(link_id)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(match row {
        Some(row) => row.try_get(0)?,
        None => 0,
    })
}

/// Moves a link's watermark on the target side to `seq`, in `conn`'s transaction.
async fn save_watermark(conn: &mut AnyConnection, org_id: &str, link_id: &str, seq: i64) -> Result<(), Error> {
    sqlx::query(
        "INSERT INTO apply_watermarks (org_id, link_id, seq) VALUES ($1, $2, $3) \
         ON CONFLICT (org_id, link_id) DO UPDATE SET seq = excluded.seq",
    )
    .bind(org_id)
    .bind(link_id)
    .bind(seq)
    .execute(&mut *conn)
    .await?;
    Ok(())
}
