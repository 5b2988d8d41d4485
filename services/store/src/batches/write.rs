//! Writing a chunk's records inside its transaction: first as all new on PostgreSQL, else
//! through the [`BatchWriter`] after looking up their versions, with the records that conflict
//! with what is stored (an insert of an existing record, an update of a missing one, a unique
//! value taken) answered instead.

use std::collections::HashMap;

use sqlx::AnyConnection;

use super::{BatchOp, ChunkWork};
use crate::model::{Fields, ObjectSchema};
use crate::schema::{RecordProblem, record_id};
use crate::writer::{BatchWriter, RecordWrite, sets_unique};
use crate::{Backend, Error, Store};

impl Store {
    /// Writes a chunk's records, valid against the schema, inside `conn`'s transaction, which
    /// holds the org's write lock (its last seq is `base`): the org's last seq after it, or the problems (chunk indexes) when a
    /// record conflicts with what is stored (an insert of an existing record, an update of a
    /// missing one, a unique value taken). `ids` and `texts` are the records' ids and JSON
    /// texts (no texts for a delete).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn write_chunk(
        &self,
        conn: &mut AnyConnection,
        org_id: &str,
        base: i64,
        schema: &ObjectSchema,
        op: BatchOp,
        records: Vec<Fields>,
        ids: Vec<String>,
        texts: Vec<String>,
    ) -> Result<Result<i64, Vec<RecordProblem>>, Error> {
        // PostgreSQL, a chunk that upserts or inserts records none of which sets a unique value
        // (the usual batch): first tried as all new
        let all_new_first = self.backend == Backend::Postgres
            && matches!(op, BatchOp::Upsert | BatchOp::Insert)
            && !records.iter().any(|r| sets_unique(schema, r));
        if all_new_first
            && let Some(last) = self.write_fresh_chunk(conn, org_id, base, &schema.name, &ids, &texts).await?
        {
            // freed off the transaction, as a flush frees its writes ([`BatchWriter::flush`])
            tokio::task::spawn_blocking(move || drop((records, ids, texts)));
            return Ok(Ok(last));
        }
        let existing = self.versions_of(conn, org_id, &schema.name, &ids).await?;
        let live = |id: &str| existing.get(id).is_some_and(|(_, deleted)| !deleted);
        let mut problems = self.stored_problems(conn, org_id, schema, op, &records, &ids, &existing).await?;
        if !problems.is_empty() {
            problems.sort_by_key(|p| p.index);
            return Ok(Err(problems));
        }
        let mut writer = BatchWriter::new(self, conn, org_id, schema, &ids, base, self.now_ms()).await?;
        writer.known_absent(ids.iter().filter(|id| !existing.contains_key(*id)).cloned());
        let mut texts = texts.into_iter();
        for (record, id) in records.into_iter().zip(ids) {
            let version = existing.get(&id).map_or(1, |(v, _)| v + 1);
            let text = texts.next();
            let fields = match op {
                BatchOp::Delete if !live(&id) => continue,
                BatchOp::Delete => None,
                _ => Some(record),
            };
            writer.write(conn, RecordWrite { id, fields, version, text }).await?;
        }
        writer.flush(conn).await?;
        if writer.seq != base {
            self.set_last_seq(conn, org_id, writer.seq).await?;
        }
        Ok(Ok(writer.seq))
    }

    /// The problems (chunk indexes) of records that conflict with what is stored: an insert of an
    /// existing record, an update of a missing one, a unique value another record holds.
    /// `existing` holds the stored versions of `ids`.
    #[allow(clippy::too_many_arguments)]
    async fn stored_problems(
        &self,
        conn: &mut AnyConnection,
        org_id: &str,
        schema: &ObjectSchema,
        op: BatchOp,
        records: &[Fields],
        ids: &[String],
        existing: &HashMap<String, (i64, bool)>,
    ) -> Result<Vec<RecordProblem>, Error> {
        let live = |id: &str| existing.get(id).is_some_and(|(_, deleted)| !deleted);
        let mut problems = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            match op {
                BatchOp::Insert if live(id) => problems.push(RecordProblem::new(
                    i,
                    schema.external_id_field.clone(),
                    format!("record {id:?} already exists; an insert creates new records only"),
                )),
                BatchOp::Update if !live(id) => problems.push(RecordProblem::new(
                    i,
                    schema.external_id_field.clone(),
                    format!("record {id:?} does not exist; an update changes existing records only"),
                )),
                _ => {}
            }
        }
        if op != BatchOp::Delete {
            problems.extend(self.unique_conflicts(conn, org_id, schema, records, ids).await?);
        }
        Ok(problems)
    }

    /// [`Store::stored_problems`] of the records at `indexes` of a chunk that is aborted anyway
    /// (some record is invalid), read outside any transaction; chunk indexes.
    pub(super) async fn stored_problems_of(
        &self,
        chunk: &ChunkWork,
        indexes: &[usize],
    ) -> Result<Vec<RecordProblem>, Error> {
        let (mut records, mut ids, mut at) = (Vec::new(), Vec::new(), Vec::new());
        for &i in indexes {
            if let Some(id) = record_id(&chunk.schema, &chunk.records[i]) {
                records.push(chunk.records[i].clone());
                ids.push(id);
                at.push(i);
            }
        }
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.reader.acquire().await?;
        let existing = self.versions_of(&mut conn, &chunk.org_id, &chunk.schema.name, &ids).await?;
        let mut problems =
            self.stored_problems(&mut conn, &chunk.org_id, &chunk.schema, chunk.op, &records, &ids, &existing).await?;
        for p in &mut problems {
            p.index = at[p.index];
        }
        Ok(problems)
    }

    /// A chunk on PostgreSQL ([`Store::write_chunk`] says which) first written as if every record
    /// were new: records and change events by [`Store::insert_fresh`], under a savepoint, without
    /// looking up their versions, which took 18 of a chunk's 110 ms under the org's write lock in
    /// `bench batch`. The org's last seq after it when it was. When some record has a row (even a tombstone), the insert fails on the primary key at that
    /// row; the savepoint undoes the attempt, and false sends the chunk down the general path.
    /// A chunk of existing records fails at its first row, which costs a few ms (the arrays
    /// parsed, two savepoint statements). Validation has already refused an id named twice.
    async fn write_fresh_chunk(
        &self,
        conn: &mut AnyConnection,
        org_id: &str,
        base: i64,
        object: &str,
        ids: &[String],
        texts: &[String],
    ) -> Result<Option<i64>, Error> {
        let rows: Vec<(&str, &str)> = ids.iter().map(String::as_str).zip(texts.iter().map(String::as_str)).collect();
        let now = self.now_ms();
        sqlx::query("SAVEPOINT fresh_chunk").execute(&mut *conn).await?;
        let mut first = base + 1;
        for part in rows.chunks(self.rows_per_flush()) {
            match self.insert_fresh(conn, org_id, object, now, first, part).await {
                Ok(()) => first += part.len() as i64,
                Err(Error::Database(sqlx::Error::Database(db))) if db.code().as_deref() == Some("23505") => {
                    sqlx::query("ROLLBACK TO SAVEPOINT fresh_chunk").execute(&mut *conn).await?;
                    return Ok(None);
                }
                Err(e) => return Err(e),
            }
        }
        if first - 1 != base {
            self.set_last_seq(conn, org_id, first - 1).await?;
        }
        Ok(Some(first - 1))
    }
}
