//! Sync in the store: links and their history and dead letters (source side), version-guarded
//! idempotent apply with a per-link watermark (target side), and change-log trimming.

use std::time::Duration;

use sqlx::Row;
use sqlx::any::AnyRow;
use tokio::time::Instant;

use std::collections::HashMap;

use crate::model::{ChangeEvent, ChangeOp, ObjectSchema, Record};
use crate::records::decode_fields;
use crate::schema::{record_id, validate_records};
use crate::writer::{BatchWriter, RecordWrite};
use crate::{Error, Missing, Store, new_id, now_ms};

/// The state of a link (see the brief, section 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Copying the snapshot.
    Bootstrapping,
    /// Sending changes after the cursor.
    Streaming,
    /// The target is unreachable; probing with backoff.
    Suspended,
    /// The target answers; counting consecutive successful probes.
    Verifying,
    /// Paused by hand.
    Paused,
    /// Stopped by a non-connection error.
    Failed,
}

impl LinkState {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Bootstrapping => "BOOTSTRAPPING",
            LinkState::Streaming => "STREAMING",
            LinkState::Suspended => "SUSPENDED",
            LinkState::Verifying => "VERIFYING",
            LinkState::Paused => "PAUSED",
            LinkState::Failed => "FAILED",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "BOOTSTRAPPING" => LinkState::Bootstrapping,
            "STREAMING" => LinkState::Streaming,
            "SUSPENDED" => LinkState::Suspended,
            "VERIFYING" => LinkState::Verifying,
            "PAUSED" => LinkState::Paused,
            "FAILED" => LinkState::Failed,
            _ => return None,
        })
    }
}

/// What a link does with a change the target rejects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectPolicy {
    /// Dead-letter it and go on.
    DeadLetter,
    /// Dead-letter it and fail the link.
    Stop,
}

impl RejectPolicy {
    fn as_str(self) -> &'static str {
        match self {
            RejectPolicy::DeadLetter => "DEAD_LETTER",
            RejectPolicy::Stop => "STOP",
        }
    }
}

/// What a link does when its cursor falls behind the trimmed change log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrimmedPolicy {
    /// Bootstrap again by itself (a new high-water mark, the snapshot, the changes after it).
    Rebootstrap,
    /// Fail the link: a person resumes it.
    Fail,
}

impl TrimmedPolicy {
    fn as_str(self) -> &'static str {
        match self {
            TrimmedPolicy::Rebootstrap => "REBOOTSTRAP",
            TrimmedPolicy::Fail => "FAIL",
        }
    }
}

/// A link from an org to a target org.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// `lnk_…`
    pub id: String,
    /// The source org.
    pub org_id: String,
    /// The target's gRPC endpoint.
    pub target_endpoint: String,
    /// The target org's API key.
    pub target_api_key: String,
    /// Objects replicated (empty: all).
    pub objects: Vec<String>,
    /// The state.
    pub state: LinkState,
    /// Probes needed to resume.
    pub verify_threshold: u32,
    /// Between probes.
    pub probe_interval: Duration,
    /// Rejected changes.
    pub on_reject: RejectPolicy,
    /// A cursor behind the trimmed change log.
    pub on_trimmed: TrimmedPolicy,
    /// The CA certificates (PEM) trusted for an `https://` target; empty: the server's.
    pub target_ca_pem: String,
    /// The last source seq the target applied.
    pub cursor_seq: i64,
    /// Whether the snapshot was applied.
    pub bootstrapped: bool,
    /// Consecutive successful probes while VERIFYING.
    pub consecutive_ok: u32,
    /// The cause of the last transition.
    pub last_cause: String,
    /// Creation time.
    pub created_at_ms: i64,
}

/// What to create a link with.
#[derive(Debug, Clone)]
pub struct NewLink {
    /// The target's gRPC endpoint.
    pub target_endpoint: String,
    /// The target org's API key.
    pub target_api_key: String,
    /// Objects (empty: all).
    pub objects: Vec<String>,
    /// Probes needed to resume.
    pub verify_threshold: u32,
    /// Between probes.
    pub probe_interval: Duration,
    /// Rejected changes.
    pub on_reject: RejectPolicy,
    /// A cursor behind the trimmed change log.
    pub on_trimmed: TrimmedPolicy,
    /// The CA certificates (PEM) trusted for an `https://` target; empty: the server's.
    pub target_ca_pem: String,
}

/// A state transition of a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkTransition {
    /// Its position in the link's history.
    pub id: i64,
    /// Before (None for the creation).
    pub from: Option<LinkState>,
    /// After.
    pub to: LinkState,
    /// Why.
    pub cause: String,
    /// When.
    pub at_ms: i64,
}

/// A change the target rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The source seq.
    pub seq: i64,
    /// The object.
    pub object: String,
    /// The record id.
    pub record_id: String,
    /// Why.
    pub reason: String,
    /// When.
    pub at_ms: i64,
}

/// What an apply did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ApplyOutcome {
    /// The link's watermark afterwards.
    pub watermark: i64,
    /// Changes written.
    pub applied: u32,
    /// Changes skipped (old seq or not a newer version).
    pub skipped: u32,
    /// Changes rejected: (seq, record id, reason).
    pub rejected: Vec<(i64, String, String)>,
}

/// A row of a link's snapshot: a record, live or deleted.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotRow {
    /// The record (a tombstone's fields are empty).
    pub record: Record,
    /// Whether it is a tombstone.
    pub deleted: bool,
}

/// A page of a link's snapshot of one object.
#[derive(Debug, Clone)]
pub struct SnapshotPage {
    /// The rows, in id order.
    pub rows: Vec<SnapshotRow>,
    /// The id to continue after, when there may be more.
    pub next_after: Option<String>,
    /// The object's schema.
    pub schema: ObjectSchema,
}

const LINK_COLUMNS: &str = "id, org_id, target_endpoint, target_api_key, objects, state, verify_threshold, \
     probe_interval_ms, on_reject, cursor_seq, bootstrapped, consecutive_ok, last_cause, created_at_ms, on_trimmed, target_ca_pem";

fn link_from_row(r: &AnyRow) -> Result<Link, Error> {
    let state: String = r.try_get(5)?;
    let objects: String = r.try_get(4)?;
    Ok(Link {
        id: r.try_get(0)?,
        org_id: r.try_get(1)?,
        target_endpoint: r.try_get(2)?,
        target_api_key: r.try_get(3)?,
        objects: serde_json::from_str(&objects).map_err(|e| Error::Corrupt(format!("link objects: {e}")))?,
        state: LinkState::parse(&state).ok_or_else(|| Error::Corrupt(format!("link state {state:?}")))?,
        verify_threshold: r.try_get::<i64, _>(6)? as u32,
        probe_interval: Duration::from_millis(r.try_get::<i64, _>(7)? as u64),
        on_reject: if r.try_get::<String, _>(8)? == "STOP" { RejectPolicy::Stop } else { RejectPolicy::DeadLetter },
        cursor_seq: r.try_get(9)?,
        bootstrapped: r.try_get::<i64, _>(10)? != 0,
        consecutive_ok: r.try_get::<i64, _>(11)? as u32,
        last_cause: r.try_get(12)?,
        created_at_ms: r.try_get(13)?,
        on_trimmed: if r.try_get::<String, _>(14)? == "FAIL" {
            TrimmedPolicy::Fail
        } else {
            TrimmedPolicy::Rebootstrap
        },
        target_ca_pem: r.try_get(15)?,
    })
}

impl Store {
    /// Creates a link of `org_id`, BOOTSTRAPPING.
    pub async fn create_link(&self, org_id: &str, new: &NewLink) -> Result<Link, Error> {
        let id = new_id("lnk");
        let now = now_ms();
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
        let now = now_ms();
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
        .bind(now_ms())
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
                let to: String = r.try_get(2)?;
                Ok(LinkTransition {
                    id: r.try_get(0)?,
                    from: LinkState::parse(&r.try_get::<String, _>(1)?),
                    to: LinkState::parse(&to).ok_or_else(|| Error::Corrupt(format!("link state {to:?}")))?,
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
        let now = now_ms();
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
        let deadline = Instant::now() + Duration::from_secs(60);
        let (tx, (outcome, moved)) = self
            .by_deadline(deadline, async {
                let mut tx = self.writer.begin().await?;
                let base = self.lock_org(&mut tx, org_id).await?;
                let row = sqlx::query("SELECT seq FROM apply_watermarks WHERE org_id = $1 AND link_id = $2")
                    .bind(org_id)
                    .bind(link_id)
                    .fetch_optional(&mut *tx)
                    .await?;
                let watermark: i64 = match row {
                    Some(row) => row.try_get(0)?,
                    None => 0,
                };
                let mut outcome = ApplyOutcome { watermark, ..ApplyOutcome::default() };
                let fresh = |c: &ChangeEvent| snapshot || c.seq > watermark;
                // the schema and current versions of every object this batch touches
                let mut ids_by_object: HashMap<&str, Vec<String>> = HashMap::new();
                for c in changes.iter().filter(|c| fresh(c)) {
                    ids_by_object.entry(c.object.as_str()).or_default().push(c.record_id.clone());
                }
                let mut schemas: HashMap<&str, ObjectSchema> = HashMap::new();
                let mut current: HashMap<(&str, String), i64> = HashMap::new();
                for (object, ids) in &ids_by_object {
                    match self.object(org_id, object).await {
                        Ok(schema) => {
                            schemas.insert(object, schema);
                        }
                        Err(Error::NotFound(_)) => continue,
                        Err(e) => return Err(e),
                    }
                    for (id, (version, _)) in self.versions_of(&mut tx, org_id, object, ids).await? {
                        current.insert((object, id), version);
                    }
                }
                let now = now_ms();
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
                    let Some(schema) = schemas.get(change.object.as_str()) else {
                        let reason = format!("the target has no object {:?}", change.object);
                        outcome.rejected.push((change.seq, change.record_id.clone(), reason));
                        continue;
                    };
                    let key = (change.object.as_str(), change.record_id.clone());
                    if change.version <= current.get(&key).copied().unwrap_or(0) {
                        outcome.skipped += 1;
                        continue;
                    }
                    if writer.as_ref().is_none_or(|w| w.object() != change.object) {
                        if let Some(mut done) = writer.take() {
                            done.flush(&mut tx).await?;
                            seq = done.seq;
                        }
                        let ids = &ids_by_object[change.object.as_str()];
                        let mut w = BatchWriter::new(self, &mut tx, org_id, schema, ids, seq, now).await?;
                        w.known_absent(
                            ids.iter()
                                .filter(|id| !current.contains_key(&(change.object.as_str(), (*id).clone())))
                                .cloned(),
                        );
                        writer = Some(w);
                    }
                    let Some(w) = writer.as_mut() else { continue };
                    let fields = match (change.op, &change.fields) {
                        (ChangeOp::Upsert, Some(fields)) => {
                            let mut fields = fields.clone();
                            let mut problems = validate_records(schema, std::slice::from_mut(&mut fields));
                            if problems.is_empty()
                                && record_id(schema, &fields).as_deref() != Some(change.record_id.as_str())
                            {
                                problems.push(crate::FieldError::new(
                                    "id",
                                    "the record's external id does not match its id",
                                ));
                            }
                            if problems.is_empty()
                                && w.touches_unique(&change.record_id, Some(&fields))
                                && let Err(Error::Invalid(unique)) = self
                                    .check_unique(
                                        &mut tx,
                                        org_id,
                                        schema,
                                        std::slice::from_ref(&fields),
                                        std::slice::from_ref(&change.record_id),
                                    )
                                    .await
                            {
                                problems = unique;
                            }
                            if !problems.is_empty() {
                                // every problem, each naming its field: a field the source added and
                                // the target's schema lacks reads `nickname: unknown field of object …`
                                let reason = problems
                                    .iter()
                                    .map(|p| {
                                        format!("{}: {}", p.field.trim_start_matches("records[0]."), p.description)
                                    })
                                    .collect::<Vec<_>>()
                                    .join("; ");
                                outcome.rejected.push((change.seq, change.record_id.clone(), reason));
                                continue;
                            }
                            Some(fields)
                        }
                        (ChangeOp::Upsert, None) => {
                            outcome.rejected.push((
                                change.seq,
                                change.record_id.clone(),
                                "an upsert without fields".into(),
                            ));
                            continue;
                        }
                        (ChangeOp::Delete, _) => None,
                    };
                    w.write(
                        &mut tx,
                        RecordWrite { id: change.record_id.clone(), fields, version: change.version, text: None },
                    )
                    .await?;
                    current.insert(key, change.version);
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
                    sqlx::query(
                        "INSERT INTO apply_watermarks (org_id, link_id, seq) VALUES ($1, $2, $3) \
                     ON CONFLICT (org_id, link_id) DO UPDATE SET seq = excluded.seq",
                    )
                    .bind(org_id)
                    .bind(link_id)
                    .bind(last_seen)
                    .execute(&mut *tx)
                    .await?;
                }
                Ok((tx, (outcome, moved)))
            })
            .await?;
        tx.commit().await?;
        if let Some(seq) = moved {
            self.committed(org_id, seq);
        }
        Ok(outcome)
    }
}

impl Store {
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
            let state: String = row.try_get(1)?;
            let state = LinkState::parse(&state).ok_or_else(|| Error::Corrupt(format!("link state {state:?}")))?;
            Ok((row.try_get(0)?, state, row.try_get::<i64, _>(2)?.max(0)))
        })
        .collect()
    }
}
