//! Releasing planned parts to the workers (per-export and overall caps), marking them sent, and
//! settling the unsent releases of a restarted scheduler: [`crate::release`] is the protocol.

use sqlx::Row;

use super::PartRef;
use crate::batches::{Recovered, u32_of};
use crate::release::{self, Releasable, Release};
use crate::{Error, Store};

impl Store {
    /// Releases planned parts to workers: at most `per_export` in flight per export and
    /// `overall` over all, oldest export first. Serialized across scheduler replicas by the
    /// release lock row, like chunk releases.
    pub async fn release_parts(&self, claimer: &str, per_export: u32, overall: u32) -> Result<Vec<PartRef>, Error> {
        let now = self.now_ms();
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

    /// [`Store::recover_chunks`] for export parts: of the parts scheduler `claimer` released and
    /// had not marked sent, those in `held` (export id, part number) are marked sent and the
    /// others go back to PENDING at once.
    pub async fn recover_parts(&self, claimer: &str, held: &[(String, u32)]) -> Result<Recovered, Error> {
        self.recover_releases(Releasable::Parts, claimer, held).await
    }
}
