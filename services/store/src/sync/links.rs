//! The source side of sync: links (created, read, moved from state to state, their cursor
//! advanced, deleted), their history and dead letters, the leases that share them among sync
//! replicas, and their lag for the gauges.

use std::time::Duration;

use sqlx::Row;
use sqlx::any::AnyRow;

use super::{DeadLetter, Link, LinkState, LinkTransition, NewLink, RejectPolicy, TrimmedPolicy};
use crate::{Error, Missing, Store, new_id};

const LINK_COLUMNS: &str = "id, org_id, target_endpoint, target_api_key, objects, state, verify_threshold, \
     probe_interval_ms, on_reject, cursor_seq, bootstrapped, consecutive_ok, last_cause, created_at_ms, on_trimmed, target_ca_pem";

fn link_from_row(r: &AnyRow) -> Result<Link, Error> {
    let objects: String = r.try_get(4)?;
    Ok(Link {
        id: r.try_get(0)?,
        org_id: r.try_get(1)?,
        target_endpoint: r.try_get(2)?,
        target_api_key: r.try_get(3)?,
        objects: serde_json::from_str(&objects).map_err(|e| Error::Corrupt(format!("link objects: {e}")))?,
        state: LinkState::parse(&r.try_get::<String, _>(5)?)?,
        verify_threshold: r.try_get::<i64, _>(6)? as u32,
        probe_interval: Duration::from_millis(r.try_get::<i64, _>(7)? as u64),
        on_reject: RejectPolicy::parse(&r.try_get::<String, _>(8)?)?,
        cursor_seq: r.try_get(9)?,
        bootstrapped: r.try_get::<i64, _>(10)? != 0,
        consecutive_ok: r.try_get::<i64, _>(11)? as u32,
        last_cause: r.try_get(12)?,
        created_at_ms: r.try_get(13)?,
        on_trimmed: TrimmedPolicy::parse(&r.try_get::<String, _>(14)?)?,
        target_ca_pem: r.try_get(15)?,
    })
}

impl Store {
    /// Creates a link of `org_id`, BOOTSTRAPPING.
    pub async fn create_link(&self, org_id: &str, new: &NewLink) -> Result<Link, Error> {
        let id = new_id("lnk");
        let now = self.now_ms();
        let objects = serde_json::to_string(&new.objects).map_err(|e| Error::Corrupt(e.to_string()))?;
        let mut tx = self.writer.begin().await?;
        sqlx::query(
            "INSERT INTO links (id, org_id, target_endpoint, target_api_key, objects, state, verify_threshold, \
             probe_interval_ms, on_reject, created_at_ms, updated_at_ms, last_cause, on_trimmed, target_ca_pem) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10, 'created', $11, $12)",
        )
        .bind(id.clone())
        .bind(org_id)
        .bind(new.target_endpoint.clone())
        .bind(new.target_api_key.clone())
        .bind(objects)
        .bind(LinkState::Bootstrapping.as_str())
        .bind(i64::from(new.verify_threshold))
        .bind(new.probe_interval.as_millis() as i64)
        .bind(new.on_reject.as_str())
        .bind(now)
        .bind(new.on_trimmed.as_str())
        .bind(new.target_ca_pem.clone())
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO link_history (link_id, at_ms, from_state, to_state, cause) VALUES ($1, $2, '', $3, 'created')",
        )
        .bind(id.clone())
        .bind(now)
        .bind(LinkState::Bootstrapping.as_str())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.link(org_id, &id).await
    }

    /// A link of `org_id`; NOT_FOUND for another org's link.
    pub async fn link(&self, org_id: &str, link_id: &str) -> Result<Link, Error> {
        let row = sqlx::query(&format!("SELECT {LINK_COLUMNS} FROM links WHERE id = $1 AND org_id = $2"))
            .bind(link_id)
            .bind(org_id)
            .fetch_optional(&self.reader)
            .await?;
        match row {
            Some(row) => link_from_row(&row),
            None => Err(Error::not_found(Missing::Link, format!("link {link_id}"))),
        }
    }

    /// A link by id alone, for the runner that owns it.
    pub async fn link_by_id(&self, link_id: &str) -> Result<Option<Link>, Error> {
        let row = sqlx::query(&format!("SELECT {LINK_COLUMNS} FROM links WHERE id = $1"))
            .bind(link_id)
            .fetch_optional(&self.reader)
            .await?;
        row.as_ref().map(link_from_row).transpose()
    }

    /// The links of an org, oldest first.
    pub async fn list_links(&self, org_id: &str) -> Result<Vec<Link>, Error> {
        let rows =
            sqlx::query(&format!("SELECT {LINK_COLUMNS} FROM links WHERE org_id = $1 ORDER BY created_at_ms, id"))
                .bind(org_id)
                .fetch_all(&self.reader)
                .await?;
        rows.iter().map(link_from_row).collect()
    }

    /// Moves a link from one of `from` to `to` with `cause`, recording the transition, setting
    /// `consecutive_ok`, and optionally the cursor and bootstrapped flag. Returns false (and
    /// changes nothing) when the link is not in one of `from` any more.
    #[allow(clippy::too_many_arguments)]
    pub async fn transition_link(
        &self,
        link_id: &str,
        from: &[LinkState],
        to: LinkState,
        cause: &str,
        consecutive_ok: u32,
        cursor: Option<i64>,
        bootstrapped: Option<bool>,
    ) -> Result<bool, Error> {
        let mut tx = self.writer.begin().await?;
        let row = sqlx::query("SELECT state FROM links WHERE id = $1").bind(link_id).fetch_optional(&mut *tx).await?;
        let Some(row) = row else { return Ok(false) };
        let current: String = row.try_get(0)?;
        if !from.iter().any(|s| s.as_str() == current) {
            return Ok(false);
        }
        let now = self.now_ms();
        sqlx::query(
            "UPDATE links SET state = $2, last_cause = $3, consecutive_ok = $4, updated_at_ms = $5, \
             cursor_seq = COALESCE($6, cursor_seq), bootstrapped = COALESCE($7, bootstrapped) WHERE id = $1",
        )
        .bind(link_id)
        .bind(to.as_str())
        .bind(cause)
        .bind(i64::from(consecutive_ok))
        .bind(now)
        .bind(cursor)
        .bind(bootstrapped.map(i64::from))
        .execute(&mut *tx)
        .await?;
        if current != to.as_str() {
            sqlx::query(
                "INSERT INTO link_history (link_id, at_ms, from_state, to_state, cause) VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(link_id)
            .bind(now)
            .bind(current)
            .bind(to.as_str())
            .bind(cause)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Moves a link's cursor forward (never back); answers whether the link is still streaming
    /// (false also when the cursor was already there).
    pub async fn advance_link_cursor(&self, link_id: &str, cursor: i64) -> Result<bool, Error> {
        let row = sqlx::query(
            "UPDATE links SET cursor_seq = $2, updated_at_ms = $3 WHERE id = $1 AND cursor_seq < $2 RETURNING state",
        )
        .bind(link_id)
        .bind(cursor)
        .bind(self.now_ms())
        .fetch_optional(&self.writer)
        .await?;
        match row {
            Some(row) => Ok(row.try_get::<String, _>(0)? == LinkState::Streaming.as_str()),
            None => Ok(false),
        }
    }

    /// Deletes a link of `org_id` with its history and dead letters.
    pub async fn delete_link(&self, org_id: &str, link_id: &str) -> Result<(), Error> {
        let mut tx = self.writer.begin().await?;
        let done = sqlx::query("DELETE FROM links WHERE id = $1 AND org_id = $2")
            .bind(link_id)
            .bind(org_id)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(Error::not_found(Missing::Link, format!("link {link_id}")));
        }
        sqlx::query("DELETE FROM link_history WHERE link_id = $1").bind(link_id).execute(&mut *tx).await?;
        sqlx::query("DELETE FROM dead_letters WHERE link_id = $1").bind(link_id).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(())
    }

    /// A link's transitions after position `after_id`, oldest first, at most `limit` (none: all).
    pub async fn link_history(
        &self,
        link_id: &str,
        after_id: i64,
        limit: Option<u32>,
    ) -> Result<Vec<LinkTransition>, Error> {
        let rows = sqlx::query(
            "SELECT id, from_state, to_state, cause, at_ms FROM link_history WHERE link_id = $1 AND id > $2 \
             ORDER BY id LIMIT $3",
        )
        .bind(link_id)
        .bind(after_id)
        .bind(limit.map_or(i64::MAX, i64::from))
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|r| {
                // the creation has no state before it: stored as ''
                let from: String = r.try_get(1)?;
                Ok(LinkTransition {
                    id: r.try_get(0)?,
                    from: if from.is_empty() { None } else { Some(LinkState::parse(&from)?) },
                    to: LinkState::parse(&r.try_get::<String, _>(2)?)?,
                    cause: r.try_get(3)?,
                    at_ms: r.try_get(4)?,
                })
            })
            .collect()
    }

    /// Records a dead letter.
    pub async fn add_dead_letter(&self, link_id: &str, letter: &DeadLetter) -> Result<(), Error> {
        sqlx::query(
            "INSERT INTO dead_letters (link_id, seq, object, record_id, reason, at_ms) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(link_id)
        .bind(letter.seq)
        .bind(letter.object.clone())
        .bind(letter.record_id.clone())
        .bind(letter.reason.clone())
        .bind(letter.at_ms)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    /// A link's dead letters after the one numbered `after_id` (0: from the first), oldest first, at
    /// most `limit`, each with its number.
    pub async fn dead_letters(
        &self,
        link_id: &str,
        after_id: i64,
        limit: u32,
    ) -> Result<Vec<(i64, DeadLetter)>, Error> {
        let rows = sqlx::query(
            "SELECT seq, object, record_id, reason, at_ms, id FROM dead_letters WHERE link_id = $1 AND id > $2 \
             ORDER BY id LIMIT $3",
        )
        .bind(link_id)
        .bind(after_id)
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|r| {
                let letter = DeadLetter {
                    seq: r.try_get(0)?,
                    object: r.try_get(1)?,
                    record_id: r.try_get(2)?,
                    reason: r.try_get(3)?,
                    at_ms: r.try_get(4)?,
                };
                Ok((r.try_get(5)?, letter))
            })
            .collect()
    }

    /// The number of dead letters of a link.
    pub async fn dead_letter_count(&self, link_id: &str) -> Result<i64, Error> {
        let row = sqlx::query("SELECT COUNT(*) FROM dead_letters WHERE link_id = $1")
            .bind(link_id)
            .fetch_one(&self.reader)
            .await?;
        Ok(row.try_get(0)?)
    }

    /// Claims (or renews) every link whose lease is free, expired or already `owner`'s, until
    /// `lease` from now; returns the ids `owner` holds. Several sync replicas on one database
    /// share the links this way, each link owned by one replica at a time.
    pub async fn claim_links(&self, owner: &str, lease: Duration) -> Result<Vec<String>, Error> {
        let now = self.now_ms();
        let rows = sqlx::query(
            "UPDATE links SET owner = $1, lease_until_ms = $2 WHERE owner = $1 OR owner IS NULL OR lease_until_ms < $3 \
             RETURNING id",
        )
        .bind(owner)
        .bind(now + lease.as_millis() as i64)
        .bind(now)
        .fetch_all(&self.writer)
        .await?;
        rows.iter().map(|r| Ok(r.try_get(0)?)).collect()
    }

    /// Gives up `owner`'s leases (on shutdown), so another replica takes over at once.
    pub async fn release_links(&self, owner: &str) -> Result<(), Error> {
        sqlx::query("UPDATE links SET owner = NULL, lease_until_ms = 0 WHERE owner = $1")
            .bind(owner)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    /// Every link of every org: its id, state, and how many changes its org logged after its
    /// cursor (an upper bound of its lag when it carries only some objects). What the sync
    /// service's gauges show.
    pub async fn link_lags(&self) -> Result<Vec<(String, LinkState, i64)>, Error> {
        sqlx::query(
            "SELECT links.id, links.state, orgs.last_seq - links.cursor_seq FROM links \
             JOIN orgs ON orgs.id = links.org_id",
        )
        .fetch_all(&self.reader)
        .await?
        .iter()
        .map(|row| {
            let state = LinkState::parse(&row.try_get::<String, _>(1)?)?;
            Ok((row.try_get(0)?, state, row.try_get::<i64, _>(2)?.max(0)))
        })
        .collect()
    }
}
