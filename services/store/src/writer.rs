//! Writing many record changes in one transaction with few statements. A write that touches a
//! unique value (it sets one, or the record holds one now) goes row by row, so that the
//! `unique_values` index is maintained in order; pending writes are flushed before it, so that seqs
//! stay in change order.
//!
//! Each statement of the `Any` driver costs a round trip to the database (a thread hop on
//! SQLite), and each bound parameter costs a conversion on the async side, so a flush is one
//! statement a table whatever its rows, and its rows travel in one or a few parameters:
//! - On SQLite, as one JSON array of row arrays expanded by `json_each` (ids as one JSON array of
//!   strings). Before, rows were multi-row `VALUES` lists of 400 rows, a parameter each value:
//!   the writer thread waited on the async side half of the time (perf, off-CPU), which was
//!   binding, cloning and converting eight parameters a row.
//! - On PostgreSQL, as array literals ([`pg_array`]) expanded by `unnest`; ids are looked up by
//!   joining such an array.
//!
//! Writes that create their records at version 1 ([`fresh`], most of a batch) take shorter
//! statements: on SQLite no `->>` per column (an object of id to fields), on PostgreSQL records
//! and change events in one statement ([`Store::insert_fresh`], which a batch chunk tries first
//! for all its records, skipping the version lookup).
//!
//! The statement texts do not depend on the row count, so each is prepared once.

use std::collections::{HashMap, HashSet};

use sqlx::{AnyConnection, Row};

use crate::model::{ChangeOp, Fields, ObjectSchema};
use crate::{Error, Store};

impl Store {
    /// `ids` (each once) as the one parameter of a lookup statement ([`id_lookup`]): on SQLite a
    /// JSON array expanded by `json_each`, on PostgreSQL an array literal of which each id is
    /// looked up by a `LATERAL` subquery that the planner cannot flatten (`OFFSET 0`, `LIMIT 1`),
    /// so it stays one index probe per id. Not `id = ANY($3)`: once sqlx's prepared statement got
    /// PostgreSQL's generic plan, that became a filter over every record of the object, 0.5 s a
    /// chunk in `bench batch`, and with custom plans it still took `bench batch` on PostgreSQL
    /// from about 90k to 10.8k records/s. Not a plain join either: its nested loop of probes and a
    /// hash join over a scan of the object's records cost within 0.1% of each other at 1,000,000
    /// records, and once the planner took the hash join, each chunk of a batch read every record
    /// again (the lookup grew from 5 to 300 ms over a 1,000,000-record `bench batch`; a probe per
    /// id takes 17-25 ms for 10,000 ids). None when there are no ids.
    fn id_list(&self, ids: &[String]) -> Result<Option<String>, Error> {
        let unique: Vec<&str> = ids.iter().map(String::as_str).collect::<HashSet<_>>().into_iter().collect();
        if unique.is_empty() {
            return Ok(None);
        }
        Ok(Some(match self.backend {
            crate::Backend::Sqlite => json_rows(&unique)?,
            crate::Backend::Postgres => pg_array(unique.into_iter().map(Some)),
        }))
    }
}

/// A lookup of ids: `sql` bound with the org ($1), the object ($2) and the ids ($3, from
/// [`Store::id_list`]).
fn id_lookup<'q>(
    sql: &'q str,
    org_id: &'q str,
    object: &'q str,
    ids: String,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    sqlx::query(sql).bind(org_id).bind(object).bind(ids)
}

/// Whether `fields` set a value of a unique field other than the external id (a value kept in
/// `unique_values`).
pub(crate) fn sets_unique(schema: &ObjectSchema, fields: &Fields) -> bool {
    schema
        .fields
        .iter()
        .any(|s| s.unique && s.name != schema.external_id_field && fields.get(&s.name).is_some_and(|v| !v.is_null()))
}

/// Whether a write creates a record at its first version (the rows of most batches).
fn fresh(write: &RecordWrite) -> bool {
    write.version == 1 && write.fields.is_some()
}

/// Whether `pending` are fresh writes ([`fresh`]) with consecutive seqs: their change events
/// need only each write's id and fields, the seq following from its place.
fn fresh_run(pending: &[(i64, RecordWrite)]) -> bool {
    let first = pending.first().map_or(0, |(seq, _)| *seq);
    pending.iter().enumerate().all(|(k, (seq, w))| *seq == first + k as i64 && fresh(w))
}

/// The first seq of `pending` and each write's id and fields text, for the statements of a
/// [`fresh_run`] (whose writes all have fields).
fn fresh_rows<'p>(pending: &'p [(i64, RecordWrite)], texts: &'p [Option<String>]) -> (i64, Vec<(&'p str, &'p str)>) {
    let first = pending.first().map_or(0, |(seq, _)| *seq);
    let rows = pending.iter().zip(texts).map(|((_, w), t)| (w.id.as_str(), t.as_deref().unwrap_or("{}"))).collect();
    (first, rows)
}

/// Pairs as one JSON object (keys unique), for a `json_each` parameter on SQLite.
fn json_object(pairs: &[(&str, &str)]) -> Result<String, Error> {
    struct Object<'a>(&'a [(&'a str, &'a str)]);
    impl serde::Serialize for Object<'_> {
        fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            serializer.collect_map(self.0.iter().map(|(k, v)| (k, v)))
        }
    }
    serde_json::to_string(&Object(pairs)).map_err(|e| Error::Corrupt(format!("statement rows: {e}")))
}

/// Rows as one JSON array (each row a JSON array, or a string for a list of ids), for a
/// `json_each` parameter on SQLite.
fn json_rows<T: serde::Serialize>(rows: &[T]) -> Result<String, Error> {
    serde_json::to_string(rows).map_err(|e| Error::Corrupt(format!("statement rows: {e}")))
}

/// A PostgreSQL array literal of text values (None: NULL), each quoted, for a `$n::text[]`
/// parameter (and `::bigint[]` for numbers). One parameter instead of one a row: a statement's
/// rows travel in a few array literals, and its text does not depend on the row count, so it is
/// planned once (see the module's notes).
fn pg_array<'v>(values: impl Iterator<Item = Option<&'v str>>) -> String {
    let mut out = String::from("{");
    for (i, value) in values.enumerate() {
        if i > 0 {
            out.push(',');
        }
        match value {
            None => out.push_str("NULL"),
            Some(v) => {
                out.push('"');
                for c in v.chars() {
                    if c == '"' || c == '\\' {
                        out.push('\\');
                    }
                    out.push(c);
                }
                out.push('"');
            }
        }
    }
    out.push('}');
    out
}

/// A PostgreSQL array literal of integers, for a `$n::bigint[]` parameter.
fn pg_numbers(values: impl Iterator<Item = i64>) -> String {
    format!("{{{}}}", values.map(|v| v.to_string()).collect::<Vec<_>>().join(","))
}

impl Store {
    /// Writes a [`BatchWriter`] keeps before it flushes (a flush is one statement a table,
    /// whatever its rows).
    pub(crate) fn rows_per_flush(&self) -> usize {
        5_000
    }

    /// On PostgreSQL, creates records at version 1 from `rows` (id, fields as JSON text; each id
    /// once) and their change events, with seqs from `first` in order, in one statement: the
    /// fields are parsed to `jsonb` once, in a CTE that both inserts read (PostgreSQL materializes
    /// a CTE read twice), and the rows travel in two arrays instead of nine. 5,000 rows in psql:
    /// 30 ms, where the events taking the records' `RETURNING` joined on the id took 34. A unique
    /// violation (an id that has a row, even a tombstone, or one given twice) fails the statement.
    pub(crate) async fn insert_fresh(
        &self,
        conn: &mut AnyConnection,
        org_id: &str,
        object: &str,
        now: i64,
        first: i64,
        rows: &[(&str, &str)],
    ) -> Result<(), Error> {
        sqlx::query(&format!(
            "WITH u AS (SELECT id, fields::jsonb AS fields, n \
             FROM unnest($4::text[], $5::text[]) WITH ORDINALITY AS u(id, fields, n)), \
             r AS (INSERT INTO records (org_id, object, id, fields, version, updated_at_ms, deleted) \
             SELECT $1, $2, u.id, u.fields, 1, $3, 0 FROM u) \
             INSERT INTO change_events (org_id, seq, object, record_id, op, fields, version, committed_at_ms) \
             SELECT $1, $6 + u.n - 1, $2, u.id, '{}', u.fields, 1, $3 FROM u",
            ChangeOp::Upsert.as_str()
        ))
        .bind(org_id)
        .bind(object)
        .bind(now)
        .bind(pg_array(rows.iter().map(|(id, _)| Some(*id))))
        .bind(pg_array(rows.iter().map(|(_, fields)| Some(*fields))))
        .bind(first)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }
}

/// Rows from which a flush frees its writes on a blocking thread ([`BatchWriter::flush`]).
const BACKGROUND_DROP_ROWS: usize = 1_000;

/// One record write: a new state (fields) or a tombstone (None), at a version.
#[derive(Debug, Clone)]
pub(crate) struct RecordWrite {
    pub id: String,
    pub fields: Option<Fields>,
    pub version: i64,
    /// `fields` as JSON text when the caller serialized them already (a batch chunk does, before
    /// its transaction); the flush serializes them otherwise.
    pub text: Option<String>,
}

impl RecordWrite {
    /// The change it logs.
    fn op(&self) -> ChangeOp {
        if self.fields.is_some() { ChangeOp::Upsert } else { ChangeOp::Delete }
    }
}

impl Store {
    /// The current version and deleted flag of each of `ids` that exists, in few statements.
    pub(crate) async fn versions_of(
        &self,
        conn: &mut AnyConnection,
        org_id: &str,
        object: &str,
        ids: &[String],
    ) -> Result<HashMap<String, (i64, bool)>, Error> {
        let mut found = HashMap::new();
        let Some(ids) = self.id_list(ids)? else { return Ok(found) };
        match self.backend {
            // the rows come back as one JSON text: decoding it costs less than a row each
            // through `Any` (bench sync: +8-19%)
            crate::Backend::Sqlite => {
                let sql = "SELECT json_group_array(json_array(r.id, r.version, r.deleted)) \
                           FROM json_each($3) AS j CROSS JOIN records AS r \
                           WHERE r.org_id = $1 AND r.object = $2 AND r.id = j.value";
                let text: String = id_lookup(sql, org_id, object, ids).fetch_one(&mut *conn).await?.try_get(0)?;
                let rows: Vec<(String, i64, i64)> =
                    serde_json::from_str(&text).map_err(|e| Error::Corrupt(format!("record versions: {e}")))?;
                found.extend(rows.into_iter().map(|(id, version, deleted)| (id, (version, deleted != 0))));
            }
            // the same aggregate measured slower in bench batch here: rows
            crate::Backend::Postgres => {
                let sql = "SELECT u.id, r.version, r.deleted FROM unnest($3::text[]) AS u(id) \
                           CROSS JOIN LATERAL (SELECT version, deleted FROM records \
                           WHERE org_id = $1 AND object = $2 AND id = u.id OFFSET 0) AS r";
                for row in id_lookup(sql, org_id, object, ids).fetch_all(&mut *conn).await? {
                    found.insert(
                        row.try_get::<String, _>(0)?,
                        (row.try_get::<i64, _>(1)?, row.try_get::<i64, _>(2)? != 0),
                    );
                }
            }
        }
        Ok(found)
    }

    /// Which of `ids` hold a value in the unique index now.
    async fn unique_holders(
        &self,
        conn: &mut AnyConnection,
        org_id: &str,
        object: &str,
        ids: &[String],
    ) -> Result<HashSet<String>, Error> {
        let mut holders = HashSet::new();
        let Some(ids) = self.id_list(ids)? else { return Ok(holders) };
        let sql = match self.backend {
            crate::Backend::Sqlite => {
                "SELECT DISTINCT u.record_id FROM json_each($3) AS j CROSS JOIN unique_values AS u \
                 WHERE u.org_id = $1 AND u.object = $2 AND u.record_id = j.value"
            }
            crate::Backend::Postgres => {
                "SELECT u.id FROM unnest($3::text[]) AS u(id) \
                 CROSS JOIN LATERAL (SELECT 1 FROM unique_values \
                 WHERE org_id = $1 AND object = $2 AND record_id = u.id LIMIT 1) AS v"
            }
        };
        for row in id_lookup(sql, org_id, object, ids).fetch_all(&mut *conn).await? {
            holders.insert(row.try_get::<String, _>(0)?);
        }
        Ok(holders)
    }
}

/// Writes record changes of one object inside a transaction, allocating seqs in order.
pub(crate) struct BatchWriter<'a> {
    store: &'a Store,
    org_id: &'a str,
    schema: &'a ObjectSchema,
    now: i64,
    /// The last seq allocated.
    pub seq: i64,
    /// Records holding unique values now (maintained as rows are written).
    holders: HashSet<String>,
    has_unique: bool,
    /// Ids known to have no row in `records` (not even a tombstone): written with a plain
    /// `INSERT`, which costs less than an upsert's conflict check (on PostgreSQL 20 against 33 ms
    /// for 5,000 rows). Empty unless the caller says ([`BatchWriter::known_absent`]); an id
    /// leaves the set once written.
    absent: HashSet<String>,
    pending: Vec<(i64, RecordWrite)>,
}

impl<'a> BatchWriter<'a> {
    /// A writer for `ids` (every record this batch may write) after seq `base`.
    pub(crate) async fn new(
        store: &'a Store,
        conn: &mut AnyConnection,
        org_id: &'a str,
        schema: &'a ObjectSchema,
        ids: &[String],
        base: i64,
        now: i64,
    ) -> Result<Self, Error> {
        let has_unique = schema.fields.iter().any(|f| f.unique && f.name != schema.external_id_field);
        let holders =
            if has_unique { store.unique_holders(conn, org_id, &schema.name, ids).await? } else { HashSet::new() };
        Ok(Self {
            store,
            org_id,
            schema,
            now,
            seq: base,
            holders,
            has_unique,
            absent: HashSet::new(),
            pending: Vec::new(),
        })
    }

    /// Tells the writer that `ids` have no row in `records`, as read under the org's write lock
    /// (which every writer of the org's records holds), so it inserts them without an upsert.
    pub(crate) fn known_absent(&mut self, ids: impl IntoIterator<Item = String>) {
        self.absent.extend(ids);
    }

    /// The object this writer writes.
    pub(crate) fn object(&self) -> &str {
        &self.schema.name
    }

    fn sets_unique(&self, fields: Option<&Fields>) -> bool {
        fields.is_some_and(|f| sets_unique(self.schema, f))
    }

    /// Whether writing `fields` to record `id` touches the unique index.
    pub(crate) fn touches_unique(&self, id: &str, fields: Option<&Fields>) -> bool {
        self.has_unique && (self.holders.contains(id) || self.sets_unique(fields))
    }

    /// Writes one record change with the next seq. Unique-touching writes go row by row (the
    /// caller has checked uniqueness); others wait for [`BatchWriter::flush`].
    pub(crate) async fn write(&mut self, conn: &mut AnyConnection, write: RecordWrite) -> Result<i64, Error> {
        self.seq += 1;
        let seq = self.seq;
        if self.touches_unique(&write.id, write.fields.as_ref()) {
            self.flush(conn).await?;
            self.store.replace_unique_values(conn, self.org_id, self.schema, &write.id, write.fields.as_ref()).await?;
            if self.sets_unique(write.fields.as_ref()) {
                self.holders.insert(write.id.clone());
            } else {
                self.holders.remove(&write.id);
            }
            self.pending.push((seq, write));
            self.flush(conn).await?;
        } else {
            self.pending.push((seq, write));
            if self.pending.len() >= self.store.rows_per_flush() {
                self.flush(conn).await?;
            }
        }
        Ok(seq)
    }

    /// Writes the pending records (the last state of each) and their change events.
    pub(crate) async fn flush(&mut self, conn: &mut AnyConnection) -> Result<(), Error> {
        if self.pending.is_empty() {
            return Ok(());
        }
        // The writes' time (records' updated_at, change events' committed_at) is taken as late
        // as the transaction allows, not at its start: a link's lag is measured from it.
        self.now = self.now.max(self.store.now_ms());
        let mut pending = std::mem::take(&mut self.pending);
        // each write's fields as JSON text, once for both statements
        let texts = pending
            .iter_mut()
            .map(|(_, w)| match w.text.take() {
                Some(text) => Ok(Some(text)),
                None => w.fields.as_ref().map(serde_json::to_string).transpose(),
            })
            .collect::<Result<Vec<Option<String>>, _>>()
            .map_err(|e| Error::Corrupt(format!("record fields: {e}")))?;
        // records: the last write of each id (a multi-row upsert may not touch a row twice)
        let mut last: HashMap<&str, usize> = HashMap::new();
        for (i, (_, w)) in pending.iter().enumerate() {
            last.insert(w.id.as_str(), i);
        }
        let mut rows: Vec<usize> = last.into_values().collect();
        rows.sort_unstable();
        // rows known absent are inserted, the others upserted
        let (new, stored): (Vec<usize>, Vec<usize>) =
            rows.into_iter().partition(|&i| self.absent.contains(pending[i].1.id.as_str()));
        let all_new = new.len() == pending.len();
        if all_new && self.store.backend == crate::Backend::Postgres && fresh_run(&pending) {
            // every write creates its record: records and change events in one statement
            self.fresh_arrays(conn, &pending, &texts).await?;
        } else {
            for (rows, upsert) in [(&new, false), (&stored, true)] {
                if rows.is_empty() {
                    continue;
                }
                match self.store.backend {
                    crate::Backend::Sqlite => self.records_json(conn, &pending, &texts, rows, upsert).await?,
                    crate::Backend::Postgres => self.records_arrays(conn, &pending, &texts, rows, upsert).await?,
                }
            }
            match self.store.backend {
                crate::Backend::Sqlite => self.events_json(conn, &pending, &texts).await?,
                crate::Backend::Postgres => self.events_arrays(conn, &pending, &texts).await?,
            }
        }
        for &i in &new {
            self.absent.remove(pending[i].1.id.as_str());
        }
        // Freeing thousands of field maps (a free for every key and value) took milliseconds of
        // a batch chunk's transaction, which holds the org's write lock: a large flush's writes
        // are freed on a blocking thread.
        if pending.len() >= BACKGROUND_DROP_ROWS {
            tokio::task::spawn_blocking(move || drop((pending, texts)));
        }
        Ok(())
    }

    /// `sql` bound with what every write statement starts with: the org ($1), the object ($2)
    /// and the write time ($3).
    fn statement<'q>(&'q self, sql: &'q str) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
        sqlx::query(sql).bind(self.org_id).bind(self.schema.name.as_str()).bind(self.now)
    }

    /// `ON CONFLICT …` that makes the records statements upserts, or nothing for plain inserts.
    fn on_conflict(upsert: bool) -> &'static str {
        if upsert {
            " ON CONFLICT (org_id, object, id) DO UPDATE SET fields = excluded.fields, version = excluded.version, \
             updated_at_ms = excluded.updated_at_ms, deleted = excluded.deleted"
        } else {
            ""
        }
    }

    /// [`BatchWriter::flush`]'s records on SQLite: the `rows` of `pending`, inserted or upserted,
    /// in one statement, as one JSON array expanded by `json_each` (`WHERE true` lets SQLite parse
    /// an upsert after `INSERT … SELECT`).
    async fn records_json(
        &self,
        conn: &mut AnyConnection,
        pending: &[(i64, RecordWrite)],
        texts: &[Option<String>],
        rows: &[usize],
        upsert: bool,
    ) -> Result<(), Error> {
        // New records at version 1 travel as an object {id: fields}: `json_each` hands over each
        // key and string value as they are, where a row array costs a `->>` (a parse of the
        // row's JSON) per column.
        let (fresh, rows): (Vec<usize>, Vec<usize>) = rows.iter().partition(|&&i| !upsert && fresh(&pending[i].1));
        if !fresh.is_empty() {
            let values: Vec<(&str, &str)> =
                fresh.iter().map(|&i| (pending[i].1.id.as_str(), texts[i].as_deref().unwrap_or("{}"))).collect();
            self.statement(
                "INSERT INTO records (org_id, object, id, fields, version, updated_at_ms, deleted) \
                 SELECT $1, $2, j.key, j.value, 1, $3, 0 FROM json_each($4) AS j",
            )
            .bind(json_object(&values)?)
            .execute(&mut *conn)
            .await?;
        }
        if rows.is_empty() {
            return Ok(());
        }
        // id, fields, version, deleted
        let values: Vec<(&str, &str, i64, i64)> = rows
            .iter()
            .map(|&i| {
                let w = &pending[i].1;
                (w.id.as_str(), texts[i].as_deref().unwrap_or("{}"), w.version, i64::from(w.fields.is_none()))
            })
            .collect();
        let sql = format!(
            "INSERT INTO records (org_id, object, id, fields, version, updated_at_ms, deleted) \
             SELECT $1, $2, j.value ->> 0, j.value ->> 1, j.value ->> 2, $3, j.value ->> 3 \
             FROM json_each($4) AS j WHERE true{}",
            Self::on_conflict(upsert)
        );
        self.statement(&sql).bind(json_rows(&values)?).execute(&mut *conn).await?;
        Ok(())
    }

    /// [`BatchWriter::flush`]'s change events on SQLite: every write, in seq order, in one
    /// statement, as one JSON array expanded by `json_each`.
    async fn events_json(
        &self,
        conn: &mut AnyConnection,
        pending: &[(i64, RecordWrite)],
        texts: &[Option<String>],
    ) -> Result<(), Error> {
        // New records at version 1 with consecutive seqs (the usual batch): rows of two columns,
        // the seq worked out from the row's place ([`BatchWriter::records_json`] says why)
        if fresh_run(pending) {
            let (first, values) = fresh_rows(pending, texts);
            self.statement(&format!(
                "INSERT INTO change_events (org_id, seq, object, record_id, op, fields, version, committed_at_ms) \
                 SELECT $1, $4 + j.key, $2, j.value ->> 0, '{}', j.value ->> 1, 1, $3 FROM json_each($5) AS j",
                ChangeOp::Upsert.as_str()
            ))
            .bind(first)
            .bind(json_rows(&values)?)
            .execute(&mut *conn)
            .await?;
            return Ok(());
        }
        // seq, record_id, op, fields, version
        let values: Vec<(i64, &str, &str, Option<&str>, i64)> = pending
            .iter()
            .zip(texts)
            .map(|((seq, w), text)| (*seq, w.id.as_str(), w.op().as_str(), text.as_deref(), w.version))
            .collect();
        self.statement(
            "INSERT INTO change_events (org_id, seq, object, record_id, op, fields, version, committed_at_ms) \
             SELECT $1, j.value ->> 0, $2, j.value ->> 1, j.value ->> 2, j.value ->> 3, j.value ->> 4, $3 \
             FROM json_each($4) AS j",
        )
        .bind(json_rows(&values)?)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    /// [`BatchWriter::flush`]'s records on PostgreSQL: the `rows` of `pending`, inserted or
    /// upserted, in one statement, as array literals expanded by `unnest`.
    async fn records_arrays(
        &self,
        conn: &mut AnyConnection,
        pending: &[(i64, RecordWrite)],
        texts: &[Option<String>],
        rows: &[usize],
        upsert: bool,
    ) -> Result<(), Error> {
        let sql = format!(
            "INSERT INTO records (org_id, object, id, fields, version, updated_at_ms, deleted) \
             SELECT $1, $2, u.id, u.fields::jsonb, u.version, $3, u.deleted \
             FROM unnest($4::text[], $5::text[], $6::bigint[], $7::bigint[]) AS u(id, fields, version, deleted){}",
            Self::on_conflict(upsert)
        );
        self.statement(&sql)
            .bind(pg_array(rows.iter().map(|&i| Some(pending[i].1.id.as_str()))))
            .bind(pg_array(rows.iter().map(|&i| Some(texts[i].as_deref().unwrap_or("{}")))))
            .bind(pg_numbers(rows.iter().map(|&i| pending[i].1.version)))
            .bind(pg_numbers(rows.iter().map(|&i| i64::from(pending[i].1.fields.is_none()))))
            .execute(&mut *conn)
            .await?;
        Ok(())
    }

    /// [`BatchWriter::flush`] on PostgreSQL when every pending write creates its record at
    /// version 1 with consecutive seqs ([`fresh_run`], each id once): [`Store::insert_fresh`].
    async fn fresh_arrays(
        &self,
        conn: &mut AnyConnection,
        pending: &[(i64, RecordWrite)],
        texts: &[Option<String>],
    ) -> Result<(), Error> {
        let (first, rows) = fresh_rows(pending, texts);
        self.store.insert_fresh(conn, self.org_id, &self.schema.name, self.now, first, &rows).await
    }

    /// [`BatchWriter::flush`]'s change events on PostgreSQL: every write, in one statement.
    async fn events_arrays(
        &self,
        conn: &mut AnyConnection,
        pending: &[(i64, RecordWrite)],
        texts: &[Option<String>],
    ) -> Result<(), Error> {
        self.statement(
            "INSERT INTO change_events (org_id, seq, object, record_id, op, fields, version, committed_at_ms) \
             SELECT $1, u.seq, $2, u.record_id, u.op, u.fields::jsonb, u.version, $3 \
             FROM unnest($4::bigint[], $5::text[], $6::text[], $7::text[], $8::bigint[]) \
             AS u(seq, record_id, op, fields, version)",
        )
        .bind(pg_numbers(pending.iter().map(|(seq, _)| *seq)))
        .bind(pg_array(pending.iter().map(|(_, w)| Some(w.id.as_str()))))
        .bind(pg_array(pending.iter().map(|(_, w)| Some(w.op().as_str()))))
        .bind(pg_array(texts.iter().map(|t| t.as_deref())))
        .bind(pg_numbers(pending.iter().map(|(_, w)| w.version)))
        .execute(&mut *conn)
        .await?;
        Ok(())
    }
}
