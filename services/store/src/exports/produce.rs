//! Producing a part (its id range read, its lines written to a blob, the part recorded READY in
//! one guarded update), reading a produced part, and the part lines themselves.

use sqlx::{AnyConnection, Row};

use super::{ExportRow, LINE_BATCH, PartOutcome, PartRead, PartRows};
use crate::blobs::{Blobs, Compressor};
use crate::changes::Topic;
use crate::filter::Compiled;
use crate::model::{Fields, Record};
use crate::records::{RawRow, bind_condition, decode_fields, read_condition};
use crate::{Backend, Error, Missing, Store};

impl Store {
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
        let (blob, rows) = self.part_lines(&export, &after, last.as_deref()).await?;
        let key = format!("exports/{export_id}/{number:06}-{}.ndjson.lz4", hex::encode(rand::random::<[u8; 6]>()));
        let bytes = blobs.put(&key, blob).await?;
        let produced = PartBlob { key, rows, bytes: bytes as i64 };
        let now = self.now_ms();
        let mut tx = self.writer.begin().await?;
        if !record_ready(&mut tx, export_id, number, worker, &produced, now).await? {
            drop(tx);
            return self.part_lost(blobs, export_id, number, &produced.key).await;
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

    /// The lines of `export`'s records in `(after, last]`, compressed, and how many: formatted
    /// by the database when every field is asked for ([`Store::read_lines`]), else by
    /// [`write_line`].
    async fn part_lines(
        &self,
        export: &ExportRow,
        after: &str,
        last: Option<&str>,
    ) -> Result<(Compressor, i64), Error> {
        let info = &export.info;
        let schema = self.object(&info.org_id, &info.object).await?;
        let compiled = read_condition(&schema, self.backend, &export.filter, &export.fields, 6)?;
        let mut blob = Compressor::with_capacity(export.part_rows as usize * 32);
        let mut rows = 0i64;
        let fields = &export.fields;
        if fields.is_empty() {
            rows = self.read_lines(&info.org_id, &info.object, compiled.as_ref(), after, last, &mut blob).await?;
        } else {
            let mut data = Vec::new();
            self.read_range(&info.org_id, &info.object, compiled.as_ref(), after, last, None, |raw| {
                write_line(&mut data, raw, fields)?;
                rows += 1;
                Ok(())
            })
            .await?;
            blob.write(&data)?;
        }
        Ok((blob, rows))
    }

    /// After a part's blob was written but the part not recorded (produced by another run, or
    /// its export ended): the blob deleted, and what the part is now.
    async fn part_lost(&self, blobs: &Blobs, export_id: &str, number: u32, key: &str) -> Result<PartOutcome, Error> {
        blobs.delete(key).await?;
        let part = sqlx::query("SELECT state, row_count FROM export_parts WHERE export_id = $1 AND number = $2")
            .bind(export_id)
            .bind(i64::from(number))
            .fetch_optional(&self.writer)
            .await?;
        match part {
            Some(part) if part.try_get::<String, _>(0)? == "READY" => Ok(PartOutcome::Produced(part.try_get(1)?)),
            _ => Ok(PartOutcome::NotProduced),
        }
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

/// A part's blob, written: its key, rows and compressed size.
struct PartBlob {
    key: String,
    rows: i64,
    bytes: i64,
}

/// Records a part READY with its `blob`, in `conn`'s transaction, unless another run recorded
/// it or its export is no longer producing: whether it was.
async fn record_ready(
    conn: &mut AnyConnection,
    export_id: &str,
    number: u32,
    worker: &str,
    blob: &PartBlob,
    now: i64,
) -> Result<bool, Error> {
    let recorded = sqlx::query(
        "UPDATE export_parts SET state = 'READY', blob_key = $3, row_count = $4, byte_count = $5, worker = $6, \
         finished_at_ms = $7 WHERE export_id = $1 AND number = $2 AND state IN ('PENDING', 'RELEASED') \
         AND (SELECT state FROM exports WHERE id = $1) = 'PRODUCING'",
    )
    .bind(export_id)
    .bind(i64::from(number))
    .bind(blob.key.clone())
    .bind(blob.rows)
    .bind(blob.bytes)
    .bind(worker)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(recorded.rows_affected() > 0)
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

/// One line of a part blob: `{"id":…,"version":…,"updated_at_ms":…,"fields":{…}}`.
#[derive(serde::Deserialize)]
struct PartLine {
    id: String,
    version: i64,
    updated_at_ms: i64,
    fields: Fields,
}
