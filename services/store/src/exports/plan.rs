//! Planning an export's parts: each the next `part_rows` matching ids, cut by an `OFFSET` query
//! the database answers without shipping the rows, until the rest fits in one last part.

use sqlx::Row;

use super::{EXPORT_COLUMNS, ExportRow, ExportState};
use crate::changes::Topic;
use crate::filter::Compiled;
use crate::records::{bind_condition, read_condition};
use crate::{Error, Store};

impl Store {
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
            .bind(self.now_ms())
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

    pub(super) async fn count_range(
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
}
