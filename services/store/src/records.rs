//! Records and the change log: real-time upsert, delete, get and query, each bounded by a deadline.

use std::collections::HashMap;

use futures::TryStreamExt;
use sqlx::any::AnyRow;
use sqlx::{Any, AnyConnection, Row};
use tokio::time::Instant;

use crate::filter::{self, Compiled, Param};
use crate::model::{ChangeEvent, ChangeOp, DeleteOutcome, Fields, ObjectSchema, Page, Record, UpsertOutcome};
use crate::schema::{FieldError, RecordProblem, record_id, unique_key, validate_records};
use crate::writer::{BatchWriter, RecordWrite};
use crate::{Error, Missing, Store};

/// How long one probe of whether PostgreSQL takes connections answers for every request whose
/// deadline passes (see `Store::by_deadline`).
const PROBE_SHARED_FOR: std::time::Duration = std::time::Duration::from_secs(1);
/// The deadline of that probe: a server that takes no connection within it counts as refusing.
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(500);

pub(crate) type Query<'q> = sqlx::query::Query<'q, Any, sqlx::any::AnyArguments<'q>>;

fn bind_param<'q>(query: Query<'q>, param: &Param) -> Query<'q> {
    match param {
        Param::Text(s) => query.bind(s.clone()),
        Param::Int(n) => query.bind(*n),
        Param::Real(n) => query.bind(*n),
        Param::Bool(b) => query.bind(*b),
    }
}

impl Store {
    /// Runs `work` until `deadline`; past it, the work (and its transaction) is dropped, which
    /// rolls it back, and the answer is [`Error::DeadlineExceeded`] (the real-time limit), unless
    /// the database does not take a connection now: then [`Error::Unavailable`], which tells the
    /// client to retry rather than to resubmit as a batch. (The pool waits out a refused
    /// connection until its acquire timeout, so during an outage the deadline is what fires.)
    pub(crate) async fn by_deadline<T>(
        &self,
        deadline: Instant,
        work: impl std::future::Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        let started = Instant::now();
        match tokio::time::timeout_at(deadline, work).await {
            Ok(result) => result,
            Err(_) => Err(self.unreachable().await.unwrap_or(Error::DeadlineExceeded {
                limit: deadline.saturating_duration_since(started),
                elapsed: started.elapsed(),
            })),
        }
    }

    /// Whether PostgreSQL refuses a connection now: [`Error::Unavailable`] if so. SQLite is a
    /// file: never. One probe at a time, and its finding reused for a second, so that an
    /// overloaded database (every deadline passing) is not also sent a connection per request.
    async fn unreachable(&self) -> Option<Error> {
        if self.backend != crate::Backend::Postgres {
            return None;
        }
        let mut last = self.reachability.lock().await;
        let now = tokio::time::Instant::now();
        let refused = match *last {
            Some((at, refused)) if now - at < PROBE_SHARED_FOR => refused,
            _ => {
                let refused = self.probe().await;
                *last = Some((tokio::time::Instant::now(), refused));
                refused
            }
        };
        refused.then(|| {
            Error::Unavailable(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                "the database does not take connections",
            )))
        })
    }

    /// One connection attempt with the pool's own options, at most 500 ms: whether the database
    /// refused it (or did not answer in time) as unavailable.
    async fn probe(&self) -> bool {
        use sqlx::{ConnectOptions, Connection};
        let options = self.reader.connect_options();
        match tokio::time::timeout(PROBE_TIMEOUT, options.connect()).await {
            Ok(Ok(connection)) => {
                let _ = connection.close().await;
                false
            }
            Ok(Err(e)) => matches!(crate::classify(e), Error::Unavailable(_)),
            Err(_) => true,
        }
    }
}

/// Checks the fields asked for against the schema and compiles the filter with placeholders from
/// `$first`: every problem is listed.
pub(crate) fn read_condition(
    schema: &ObjectSchema,
    backend: crate::Backend,
    filter_text: &str,
    fields: &[String],
    first: usize,
) -> Result<Option<filter::Compiled>, Error> {
    let mut errors = Vec::new();
    for (i, f) in fields.iter().enumerate() {
        if schema.field(f).is_none() {
            errors.push(FieldError::new(
                format!("fields[{i}]"),
                format!("unknown field {f:?} of object {}", schema.name),
            ));
        }
    }
    let compiled = match filter::parse(filter_text) {
        Ok(Some(expr)) => match filter::compile(&expr, schema, backend, first) {
            Ok(c) => Some(c),
            Err(e) => {
                errors.push(e);
                None
            }
        },
        Ok(None) => None,
        Err(e) => {
            errors.push(e);
            None
        }
    };
    if !errors.is_empty() {
        return Err(Error::Invalid(errors));
    }
    Ok(compiled)
}

/// Binds a compiled filter's values.
pub(crate) fn bind_condition<'q>(mut query: Query<'q>, compiled: Option<&filter::Compiled>) -> Query<'q> {
    for p in compiled.iter().flat_map(|c| &c.params) {
        query = bind_param(query, p);
    }
    query
}

pub(crate) fn decode_fields(text: &str) -> Result<Fields, Error> {
    serde_json::from_str(text).map_err(|e| Error::Corrupt(format!("record fields: {e}")))
}

/// A matching record as read: its fields still JSON text.
pub(crate) struct RawRow {
    pub(crate) id: String,
    pub(crate) fields: String,
    pub(crate) version: i64,
    pub(crate) updated_at_ms: i64,
}

impl Store {
    /// The SELECT of the live records of an object in `(after, last]` (no upper bound when `last`
    /// is None) matching `compiled`, in id order, with `tail` appended (LIMIT / OFFSET using $5).
    pub(crate) fn range_sql(&self, what: &str, compiled: Option<&Compiled>, bounded: bool, tail: &str) -> String {
        let condition = compiled.map(|c| format!(" AND {}", c.sql)).unwrap_or_default();
        let upper = if bounded { " AND id <= $4" } else { " AND $4 = ''" };
        format!(
            "SELECT {what} FROM records WHERE org_id = $1 AND object = $2 AND deleted = 0 AND id > $3{upper}\
             {condition} ORDER BY id {tail}"
        )
    }

    /// The matching records in `(after, last]`, at most `limit` (None: all), as stored.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn read_range(
        &self,
        org_id: &str,
        object: &str,
        compiled: Option<&Compiled>,
        after: &str,
        last: Option<&str>,
        limit: Option<i64>,
        mut each: impl FnMut(RawRow) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let what = format!("id, {}, version, updated_at_ms", self.json_column("fields"));
        let sql = self.range_sql(&what, compiled, last.is_some(), "LIMIT $5");
        let query = sqlx::query(&sql)
            .bind(org_id)
            .bind(object)
            .bind(after.to_owned())
            .bind(last.unwrap_or("").to_owned())
            .bind(limit.unwrap_or(i64::MAX));
        let mut rows = bind_condition(query, compiled).fetch(&self.reader);
        while let Some(row) = rows.try_next().await? {
            each(RawRow {
                id: row.try_get(0)?,
                fields: row.try_get(1)?,
                version: row.try_get(2)?,
                updated_at_ms: row.try_get(3)?,
            })?;
        }
        Ok(())
    }

    /// Reads the matching records in `(after, last]` as records, projected on `fields`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn read_records(
        &self,
        org_id: &str,
        object: &str,
        compiled: Option<&Compiled>,
        fields: &[String],
        after: &str,
        last: Option<&str>,
        limit: Option<i64>,
    ) -> Result<Vec<Record>, Error> {
        let mut records = Vec::new();
        self.read_range(org_id, object, compiled, after, last, limit, |raw| {
            let mut parsed = decode_fields(&raw.fields)?;
            if !fields.is_empty() {
                parsed.retain(|k, _| fields.contains(k));
            }
            records.push(Record { id: raw.id, fields: parsed, version: raw.version, updated_at_ms: raw.updated_at_ms });
            Ok(())
        })
        .await?;
        Ok(records)
    }

    pub(crate) fn record_from_row(row: &AnyRow) -> Result<Record, Error> {
        Ok(Record {
            id: row.try_get(0)?,
            fields: decode_fields(&row.try_get::<String, _>(1)?)?,
            version: row.try_get(2)?,
            updated_at_ms: row.try_get(3)?,
        })
    }

    /// Takes the org's write lock inside `conn`'s transaction and returns its last seq.
    pub(crate) async fn lock_org(&self, conn: &mut AnyConnection, org_id: &str) -> Result<i64, Error> {
        let row = sqlx::query("UPDATE orgs SET last_seq = last_seq WHERE id = $1 RETURNING last_seq")
            .bind(org_id)
            .fetch_optional(&mut *conn)
            .await?;
        match row {
            Some(row) => Ok(row.try_get(0)?),
            None => Err(Error::not_found(Missing::Org, format!("org {org_id}"))),
        }
    }

    pub(crate) async fn set_last_seq(&self, conn: &mut AnyConnection, org_id: &str, seq: i64) -> Result<(), Error> {
        sqlx::query("UPDATE orgs SET last_seq = $2 WHERE id = $1").bind(org_id).bind(seq).execute(&mut *conn).await?;
        Ok(())
    }

    /// Creates or replaces records of an object, in one transaction committed only if it finishes
    /// before `deadline`. Invalid records (schema, uniqueness) fail the whole request, listing
    /// every problem; nothing is committed.
    pub async fn upsert(
        &self,
        org_id: &str,
        object: &str,
        mut records: Vec<Fields>,
        deadline: Instant,
    ) -> Result<(Vec<UpsertOutcome>, i64), Error> {
        let (tx, result) = self
            .by_deadline(deadline, async {
                let schema = self.object(org_id, object).await?;
                let errors = validate_records(&schema, &mut records);
                if !errors.is_empty() {
                    return Err(Error::Invalid(errors));
                }
                let mut tx = self.writer.begin().await?;
                let base = self.lock_org(&mut tx, org_id).await?;
                let ids: Vec<String> = records.iter().map(|r| record_id(&schema, r).unwrap_or_default()).collect();
                let existing = self.versions_of(&mut tx, org_id, object, &ids).await?;
                self.check_unique(&mut tx, org_id, &schema, &records, &ids).await?;
                let mut writer = BatchWriter::new(self, &mut tx, org_id, &schema, &ids, base, self.now_ms()).await?;
                writer.known_absent(ids.iter().filter(|id| !existing.contains_key(*id)).cloned());
                let mut outcomes = Vec::with_capacity(records.len());
                for (record, id) in records.into_iter().zip(ids) {
                    let (version, created) = match existing.get(&id) {
                        Some((v, deleted)) => (v + 1, *deleted),
                        None => (1, true),
                    };
                    writer
                        .write(&mut tx, RecordWrite { id: id.clone(), fields: Some(record), version, text: None })
                        .await?;
                    outcomes.push(UpsertOutcome { id, version, created });
                }
                writer.flush(&mut tx).await?;
                let last = writer.seq;
                self.set_last_seq(&mut tx, org_id, last).await?;
                Ok((tx, (outcomes, last)))
            })
            .await?;
        tx.commit().await?;
        self.committed(org_id, result.1);
        Ok(result)
    }

    /// Lists every unique value already held by another live record.
    pub(crate) async fn check_unique(
        &self,
        conn: &mut AnyConnection,
        org_id: &str,
        schema: &ObjectSchema,
        records: &[Fields],
        ids: &[String],
    ) -> Result<(), Error> {
        let problems = self.unique_conflicts(conn, org_id, schema, records, ids).await?;
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::Invalid(problems.iter().map(RecordProblem::to_field_error).collect()))
        }
    }

    /// Every unique value of `records` already held by another live record, by record index.
    pub(crate) async fn unique_conflicts(
        &self,
        conn: &mut AnyConnection,
        org_id: &str,
        schema: &ObjectSchema,
        records: &[Fields],
        ids: &[String],
    ) -> Result<Vec<RecordProblem>, Error> {
        let mut problems = Vec::new();
        for (i, (record, id)) in records.iter().zip(ids).enumerate() {
            for spec in schema.fields.iter().filter(|f| f.unique && f.name != schema.external_id_field) {
                let Some(value) = record.get(&spec.name).filter(|v| !v.is_null()) else { continue };
                let holder = sqlx::query(
                    "SELECT record_id FROM unique_values WHERE org_id = $1 AND object = $2 AND field = $3 AND value = $4",
                )
                .bind(org_id)
                .bind(schema.name.clone())
                .bind(spec.name.clone())
                .bind(unique_key(value))
                .fetch_optional(&mut *conn)
                .await?;
                if let Some(holder) = holder {
                    let holder: String = holder.try_get(0)?;
                    if &holder != id {
                        problems.push(RecordProblem::new(
                            i,
                            spec.name.clone(),
                            format!("value {value} is already used by record {holder:?}; it must be unique"),
                        ));
                    }
                }
            }
        }
        Ok(problems)
    }

    /// Replaces the unique-value index entries of a record (removes them when `record` is None).
    pub(crate) async fn replace_unique_values(
        &self,
        conn: &mut AnyConnection,
        org_id: &str,
        schema: &ObjectSchema,
        id: &str,
        record: Option<&Fields>,
    ) -> Result<(), Error> {
        let unique: Vec<_> = schema.fields.iter().filter(|f| f.unique && f.name != schema.external_id_field).collect();
        if unique.is_empty() {
            return Ok(());
        }
        sqlx::query("DELETE FROM unique_values WHERE org_id = $1 AND object = $2 AND record_id = $3")
            .bind(org_id)
            .bind(schema.name.clone())
            .bind(id.to_owned())
            .execute(&mut *conn)
            .await?;
        let Some(record) = record else { return Ok(()) };
        for spec in unique {
            let Some(value) = record.get(&spec.name).filter(|v| !v.is_null()) else { continue };
            sqlx::query(
                "INSERT INTO unique_values (org_id, object, field, value, record_id) VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(org_id)
            .bind(schema.name.clone())
            .bind(spec.name.clone())
            .bind(unique_key(value))
            .bind(id.to_owned())
            .execute(&mut *conn)
            .await?;
        }
        Ok(())
    }

    /// Deletes records by id in one transaction, committed only if it finishes before `deadline`.
    /// A missing or already deleted record is reported, not an error.
    pub async fn delete(
        &self,
        org_id: &str,
        object: &str,
        ids: Vec<String>,
        deadline: Instant,
    ) -> Result<(Vec<DeleteOutcome>, i64), Error> {
        let (tx, result) = self
            .by_deadline(deadline, async {
                let schema = self.object(org_id, object).await?;
                let mut seen = HashMap::new();
                let mut errors = Vec::new();
                for (i, id) in ids.iter().enumerate() {
                    if id.is_empty() {
                        errors.push(FieldError::new(format!("ids[{i}]"), "an id is not empty"));
                    } else if let Some(first) = seen.insert(id.as_str(), i) {
                        errors.push(FieldError::new(format!("ids[{i}]"), format!("id {id:?} is also ids[{first}]")));
                    }
                }
                if !errors.is_empty() {
                    return Err(Error::Invalid(errors));
                }
                let mut tx = self.writer.begin().await?;
                let base = self.lock_org(&mut tx, org_id).await?;
                let existing = self.versions_of(&mut tx, org_id, object, &ids).await?;
                let mut writer = BatchWriter::new(self, &mut tx, org_id, &schema, &ids, base, self.now_ms()).await?;
                let mut outcomes = Vec::with_capacity(ids.len());
                for id in &ids {
                    match existing.get(id) {
                        Some((version, false)) => {
                            let version = version + 1;
                            writer
                                .write(&mut tx, RecordWrite { id: id.clone(), fields: None, version, text: None })
                                .await?;
                            outcomes.push(DeleteOutcome { id: id.clone(), deleted: true, version });
                        }
                        Some((version, true)) => {
                            outcomes.push(DeleteOutcome { id: id.clone(), deleted: false, version: *version })
                        }
                        None => outcomes.push(DeleteOutcome { id: id.clone(), deleted: false, version: 0 }),
                    }
                }
                writer.flush(&mut tx).await?;
                let seq = writer.seq;
                if seq != base {
                    self.set_last_seq(&mut tx, org_id, seq).await?;
                }
                Ok((tx, (outcomes, if seq == base { 0 } else { seq })))
            })
            .await?;
        tx.commit().await?;
        if result.1 != 0 {
            self.committed(org_id, result.1);
        }
        Ok(result)
    }

    /// One live record; NOT_FOUND if the org has no such object or record.
    pub async fn get(
        &self,
        org_id: &str,
        object: &str,
        id: &str,
        deadline: Instant,
    ) -> Result<(Record, ObjectSchema), Error> {
        self.by_deadline(deadline, async {
            let schema = self.object(org_id, object).await?;
            let sql = format!(
                "SELECT id, {}, version, updated_at_ms FROM records \
                 WHERE org_id = $1 AND object = $2 AND id = $3 AND deleted = 0",
                self.json_column("fields")
            );
            let row = sqlx::query(&sql).bind(org_id).bind(object).bind(id).fetch_optional(&self.reader).await?;
            match row {
                Some(row) => Ok((Self::record_from_row(&row)?, schema)),
                None => Err(Error::not_found(Missing::Record, format!("record {id:?} of object {object:?}"))),
            }
        })
        .await
    }

    /// A page of live records matching `filter` (see [`crate::filter`]), in id order, after the id
    /// `after`, projected on `fields` (all when empty).
    #[allow(clippy::too_many_arguments)]
    pub async fn query(
        &self,
        org_id: &str,
        object: &str,
        filter_text: &str,
        fields: &[String],
        limit: usize,
        after: Option<&str>,
        deadline: Instant,
    ) -> Result<Page, Error> {
        self.by_deadline(deadline, async {
            let schema = self.object(org_id, object).await?;
            let compiled = read_condition(&schema, self.backend, filter_text, fields, 6)?;
            let after = after.unwrap_or("");
            let mut records = self
                .read_records(org_id, object, compiled.as_ref(), fields, after, None, Some(limit as i64 + 1))
                .await?;
            let next_after = if records.len() > limit {
                records.truncate(limit);
                records.last().map(|r| r.id.clone())
            } else {
                None
            };
            Ok(Page { records, next_after, schema })
        })
        .await
    }

    /// The org's last committed change seq (its high-water mark).
    pub async fn high_water(&self, org_id: &str) -> Result<i64, Error> {
        let row =
            sqlx::query("SELECT last_seq FROM orgs WHERE id = $1").bind(org_id).fetch_optional(&self.reader).await?;
        match row {
            Some(row) => Ok(row.try_get(0)?),
            None => Err(Error::not_found(Missing::Org, format!("org {org_id}"))),
        }
    }

    /// Up to `limit` change events of an org with seq > `after_seq`, in seq order.
    pub async fn changes_after(&self, org_id: &str, after_seq: i64, limit: usize) -> Result<Vec<ChangeEvent>, Error> {
        let sql = format!(
            "SELECT seq, object, record_id, op, {}, version, committed_at_ms FROM change_events \
             WHERE org_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
            self.json_column("fields")
        );
        let rows = sqlx::query(&sql).bind(org_id).bind(after_seq).bind(limit as i64).fetch_all(&self.reader).await?;
        rows.iter()
            .map(|r| {
                let op: String = r.try_get(3)?;
                Ok(ChangeEvent {
                    seq: r.try_get(0)?,
                    object: r.try_get(1)?,
                    record_id: r.try_get(2)?,
                    op: ChangeOp::parse(&op).ok_or_else(|| Error::Corrupt(format!("change op {op:?}")))?,
                    fields: r.try_get::<Option<String>, _>(4)?.map(|f| decode_fields(&f)).transpose()?,
                    version: r.try_get(5)?,
                    committed_at_ms: r.try_get(6)?,
                })
            })
            .collect()
    }

    /// Fails with [`Error::Trimmed`] unless the change log still holds every change of the org
    /// after `after_seq`.
    pub async fn ensure_retained(&self, org_id: &str, after_seq: i64) -> Result<(), Error> {
        let trimmed = self.trimmed_seq(org_id).await?;
        if after_seq < trimmed {
            return Err(Error::Trimmed { after_seq, trimmed });
        }
        Ok(())
    }

    /// Up to `limit` change events after `after_seq`, with no gap: seqs are dense, so a first event
    /// other than `after_seq + 1` can only mean trimming, answered [`Error::Trimmed`], never
    /// skipped. This is what Extract and links read the change log through.
    pub async fn changes_since(&self, org_id: &str, after_seq: i64, limit: usize) -> Result<Vec<ChangeEvent>, Error> {
        self.ensure_retained(org_id, after_seq).await?;
        let events = self.changes_after(org_id, after_seq, limit).await?;
        match events.first() {
            Some(first) if first.seq != after_seq + 1 => {
                Err(Error::Trimmed { after_seq, trimmed: self.trimmed_seq(org_id).await?.max(first.seq - 1) })
            }
            _ => Ok(events),
        }
    }

    /// The number of live records of an object (for tests and progress estimates).
    pub async fn count_records(&self, org_id: &str, object: &str) -> Result<i64, Error> {
        let row = sqlx::query("SELECT COUNT(*) FROM records WHERE org_id = $1 AND object = $2 AND deleted = 0")
            .bind(org_id)
            .bind(object)
            .fetch_one(&self.reader)
            .await?;
        Ok(row.try_get(0)?)
    }
}
