//! Releasing chunks to the workers by policy (not before their time, within their rate and the
//! caps on chunks in flight, fairly across orgs), marking them sent, and settling the unsent
//! releases of a restarted scheduler: [`crate::release`] is the protocol, this the choice.

use std::collections::{HashMap, HashSet, VecDeque};

use sqlx::{Any, AnyConnection, Row, Transaction};

use super::{ChunkRef, OVERLOAD_PAUSE_MS, Recovered, ReleaseCaps, u32_of};
use crate::changes::Topic;
use crate::release::{self, Releasable, Release};
use crate::{Error, Store};

impl Store {
    /// Releases chunks by policy, at most up to the caps, for `claimer`: not before their batch's
    /// time, within its rate, within the caps on chunks in flight (overall, per org, per batch),
    /// and fairly across orgs (round robin, the org with the fewest in flight first). Releases are
    /// serialized across scheduler replicas (one lock row), so the caps hold exactly.
    ///
    /// Nothing is released for [`OVERLOAD_PAUSE_MS`] after a chunk committed only after meeting a
    /// busy database (COMMITTED_AFTER_RETRY_WORKLOAD): the store, not a worker's answer, says so,
    /// so every scheduler replica defers, and none releases in the moment between the commit and
    /// the answer.
    pub async fn release_chunks(&self, claimer: &str, caps: ReleaseCaps) -> Result<Vec<ChunkRef>, Error> {
        let now = self.now_ms();
        let Some(Release { mut tx, taken_back }) = self.begin_release(Releasable::Chunks, now).await? else {
            return Ok(Vec::new());
        };
        // the batches whose chunks change, to announce after the commit
        let mut touched = taken_back;
        if overloaded(&mut tx, now).await? {
            return self.release_none(tx, &touched).await;
        }
        let mut flight = in_flight(&mut tx).await?;
        if flight.overall >= caps.overall {
            return self.release_none(tx, &touched).await;
        }
        let mut candidates = candidates(&mut tx, caps.overall - flight.overall, now).await?;
        let (released, changed_rates) = fair_share(&mut candidates, &mut flight, caps, now);
        let mut claimed = Vec::with_capacity(released.len());
        for chunk in released {
            // only what this transaction moved out of PENDING is ours to send (the lock row makes
            // this always so; the guard keeps a chunk from being sent twice even without it)
            if release::claim(&mut tx, Releasable::Chunks, &chunk.batch_id, chunk.index, claimer, now).await? {
                touched.insert(chunk.batch_id.clone());
                claimed.push(chunk);
            }
        }
        for batch in changed_rates {
            sqlx::query("UPDATE batches SET next_release_ms = $2 WHERE id = $1")
                .bind(batch.clone())
                .bind(candidates.next_release[&batch])
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        self.touched_batches(&touched);
        Ok(claimed)
    }

    /// Ends a release that releases nothing: the chunks taken back (their batches `touched`)
    /// are committed and announced.
    async fn release_none(&self, tx: Transaction<'_, Any>, touched: &HashSet<String>) -> Result<Vec<ChunkRef>, Error> {
        tx.commit().await?;
        self.touched_batches(touched);
        Ok(Vec::new())
    }

    /// Announces commits that changed the chunks of `batches`.
    pub(crate) fn touched_batches(&self, batches: &HashSet<String>) {
        for batch in batches {
            self.touched(Topic::Batch(batch));
        }
    }

    /// Records that a released chunk is in the manager's hands.
    pub async fn mark_sent(&self, chunk: &ChunkRef) -> Result<(), Error> {
        self.mark_release_sent(Releasable::Chunks, &chunk.batch_id, chunk.index).await
    }

    /// After scheduler `claimer` restarted, before its first release: each chunk it released and
    /// had not marked sent either reached the manager or not. Those in `held` (batch id, chunk
    /// index: what the restart data of its sessions lists as sent) did, and are marked sent, so
    /// they are never sent again; the others did not, and go back to PENDING, to be released at
    /// once rather than after [`release::UNSENT_RELEASE_TIMEOUT_MS`]. Also answers which chunks of `held`
    /// are still in flight (released or running), whose answers are still to come.
    pub async fn recover_chunks(&self, claimer: &str, held: &[(String, u32)]) -> Result<Recovered, Error> {
        self.recover_releases(Releasable::Chunks, claimer, held).await
    }
}

/// Whether a chunk committed only after meeting a busy database within the last
/// [`OVERLOAD_PAUSE_MS`] before `now`, read in `conn`'s transaction.
async fn overloaded(conn: &mut AnyConnection, now: i64) -> Result<bool, Error> {
    let overloaded = sqlx::query(
        "SELECT 1 FROM chunks WHERE state = 'COMMITTED_AFTER_RETRY_WORKLOAD' AND finished_at_ms > $1 LIMIT 1",
    )
    .bind(now - OVERLOAD_PAUSE_MS)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(overloaded.is_some())
}

/// The chunks in flight (released or running), counted overall, per org and per batch.
#[derive(Default)]
struct InFlight {
    overall: u32,
    per_org: HashMap<String, u32>,
    per_batch: HashMap<String, u32>,
}

/// The chunks in flight, read in `conn`'s transaction.
async fn in_flight(conn: &mut AnyConnection) -> Result<InFlight, Error> {
    let mut flight = InFlight::default();
    let rows = sqlx::query(
        "SELECT org_id, batch_id, COUNT(*) FROM chunks WHERE state IN ('RELEASED', 'RUNNING') \
         GROUP BY org_id, batch_id",
    )
    .fetch_all(&mut *conn)
    .await?;
    for row in rows {
        let n = u32_of(&row, 2)?;
        *flight.per_org.entry(row.try_get(0)?).or_default() += n;
        *flight.per_batch.entry(row.try_get(1)?).or_default() += n;
        flight.overall += n;
    }
    Ok(flight)
}

/// A pending chunk that a release may take, with its batch's caps.
struct Candidate {
    chunk: ChunkRef,
    max_parallel: u32,
    rate: u32,
}

/// The chunks a release may take: per org (in the order the orgs' first chunks come), each
/// org's in batch submission and chunk order; and the next release time of each of their
/// batches.
struct Candidates {
    queues: Vec<(String, VecDeque<Candidate>)>,
    next_release: HashMap<String, i64>,
}

/// The pending chunks of queued batches whose time has come, at most `room` of each batch,
/// read in `conn`'s transaction.
async fn candidates(conn: &mut AnyConnection, room: u32, now: i64) -> Result<Candidates, Error> {
    let rows = sqlx::query(
        "SELECT c.batch_id, c.idx, c.org_id, c.record_count, b.max_parallel, b.records_per_second, \
         b.next_release_ms, b.traceparent FROM (SELECT batch_id, idx, org_id, record_count, \
         ROW_NUMBER() OVER (PARTITION BY batch_id ORDER BY idx) AS rn FROM chunks WHERE state = 'PENDING') c \
         JOIN batches b ON b.id = c.batch_id \
         WHERE c.rn <= $1 AND b.state = 'QUEUED' AND b.not_before_ms <= $2 AND b.next_release_ms <= $2 \
         ORDER BY b.created_at_ms, b.id, c.idx",
    )
    .bind(i64::from(room))
    .bind(now)
    .fetch_all(&mut *conn)
    .await?;
    let mut queues: Vec<(String, VecDeque<Candidate>)> = Vec::new();
    let mut next_release: HashMap<String, i64> = HashMap::new();
    for row in &rows {
        let chunk = ChunkRef {
            batch_id: row.try_get(0)?,
            index: u32_of(row, 1)?,
            org_id: row.try_get(2)?,
            records: u32_of(row, 3)?,
            traceparent: row.try_get(7)?,
        };
        next_release.insert(chunk.batch_id.clone(), row.try_get(6)?);
        let candidate = Candidate { max_parallel: u32_of(row, 4)?, rate: u32_of(row, 5)?, chunk };
        match queues.iter_mut().find(|(org, _)| *org == candidate.chunk.org_id) {
            Some((_, queue)) => queue.push_back(candidate),
            None => queues.push((candidate.chunk.org_id.clone(), VecDeque::from([candidate]))),
        }
    }
    Ok(Candidates { queues, next_release })
}

/// The chunks to release of `candidates`, within `caps` with `flight` in flight already (both
/// counted on as chunks are chosen), and the batches whose next release time moved (their rate).
fn fair_share(
    candidates: &mut Candidates,
    flight: &mut InFlight,
    caps: ReleaseCaps,
    now: i64,
) -> (Vec<ChunkRef>, HashSet<String>) {
    let Candidates { queues, next_release } = candidates;
    // fair share: the org with the fewest chunks in flight goes first, then round robin
    queues.sort_by_key(|(org, _)| flight.per_org.get(org).copied().unwrap_or(0));
    let mut released = Vec::new();
    let mut changed_rates: HashSet<String> = HashSet::new();
    while flight.overall < caps.overall && !queues.is_empty() {
        queues.retain_mut(|(org, queue)| {
            if flight.overall >= caps.overall {
                return true;
            }
            let org_count = flight.per_org.entry(org.clone()).or_default();
            while let Some(candidate) = queue.pop_front() {
                if *org_count >= caps.per_org {
                    return false;
                }
                let batch = candidate.chunk.batch_id.clone();
                let cap = if candidate.max_parallel == 0 { caps.per_org } else { candidate.max_parallel };
                let batch_count = flight.per_batch.entry(batch.clone()).or_default();
                let next = next_release.get(&batch).copied().unwrap_or(0);
                if *batch_count >= cap || next > now {
                    continue;
                }
                *batch_count += 1;
                *org_count += 1;
                flight.overall += 1;
                if candidate.rate > 0 {
                    let spacing = i64::from(candidate.chunk.records) * 1000 / i64::from(candidate.rate);
                    next_release.insert(batch.clone(), next.max(now) + spacing);
                    changed_rates.insert(batch);
                }
                released.push(candidate.chunk);
                return true;
            }
            false
        });
    }
    (released, changed_rates)
}

#[cfg(test)]
mod tests {
    //! The choice of a release, on explicit clocks: caps, fairness and rates, without a database.

    use super::*;

    /// Candidates: `(org, batch, chunks, records per chunk, max_parallel, records per second)`,
    /// each batch's next release time 0.
    fn candidates(batches: &[(&str, &str, u32, u32, u32, u32)]) -> Candidates {
        let mut queues: Vec<(String, VecDeque<Candidate>)> = Vec::new();
        let mut next_release = HashMap::new();
        for &(org, batch, chunks, records, max_parallel, rate) in batches {
            next_release.insert(batch.to_owned(), 0);
            let queue = match queues.iter_mut().position(|(o, _)| o == org) {
                Some(at) => &mut queues[at].1,
                None => {
                    queues.push((org.to_owned(), VecDeque::new()));
                    &mut queues.last_mut().unwrap().1
                }
            };
            for index in 0..chunks {
                let chunk =
                    ChunkRef { org_id: org.into(), batch_id: batch.into(), index, records, traceparent: String::new() };
                queue.push_back(Candidate { chunk, max_parallel, rate });
            }
        }
        Candidates { queues, next_release }
    }

    fn flight(in_flight: &[(&str, &str, u32)]) -> InFlight {
        let mut flight = InFlight::default();
        for &(org, batch, n) in in_flight {
            flight.overall += n;
            *flight.per_org.entry(org.into()).or_default() += n;
            *flight.per_batch.entry(batch.into()).or_default() += n;
        }
        flight
    }

    fn names(released: &[ChunkRef]) -> Vec<String> {
        released.iter().map(|c| format!("{}#{}", c.batch_id, c.index)).collect()
    }

    #[test]
    fn the_overall_cap_is_shared_round_robin_starting_with_the_org_with_the_fewest_in_flight() {
        let mut c = candidates(&[("a", "a1", 5, 100, 0, 0), ("b", "b1", 5, 100, 0, 0), ("c", "c1", 5, 100, 0, 0)]);
        // a has 2 in flight, b and c none: b and c go first, then round robin
        let mut f = flight(&[("a", "a0", 2)]);
        let (released, rates) = fair_share(&mut c, &mut f, ReleaseCaps { overall: 6, per_org: 4 }, 1_000);
        assert_eq!(names(&released), ["b1#0", "c1#0", "a1#0", "b1#1"], "6 in flight at most, 2 already");
        assert_eq!(f.overall, 6);
        assert!(rates.is_empty());
    }

    #[test]
    fn an_org_stops_at_its_cap_and_a_batch_at_its_max_parallel() {
        // org a: a1 may run one chunk at a time, a2 as many as the org cap; org a has 3 in flight
        let mut c = candidates(&[("a", "a1", 4, 100, 1, 0), ("a", "a2", 4, 100, 0, 0), ("b", "b1", 4, 100, 0, 0)]);
        let mut f = flight(&[("a", "a2", 2)]);
        let (released, _) = fair_share(&mut c, &mut f, ReleaseCaps { overall: 100, per_org: 4 }, 1_000);
        // a: a1's first (its cap of 1 reached), a2's first (the org's 4th, the cap); b: 4
        let mut got = names(&released);
        got.sort();
        assert_eq!(got, ["a1#0", "a2#0", "b1#0", "b1#1", "b1#2", "b1#3"]);
        assert_eq!((f.per_org["a"], f.per_org["b"], f.per_batch["a1"]), (4, 4, 1));
    }

    #[test]
    fn a_rate_spaces_a_batchs_releases_by_its_chunks_records() {
        // 500-record chunks at 1,000 records/s: one chunk every 500 ms
        let caps = ReleaseCaps { overall: 100, per_org: 100 };
        let mut c = candidates(&[("a", "a1", 3, 500, 0, 1_000)]);
        let (released, rates) = fair_share(&mut c, &mut InFlight::default(), caps, 10_000);
        assert_eq!(names(&released), ["a1#0"], "one at a time");
        assert_eq!((c.next_release["a1"], rates.contains("a1")), (10_500, true));

        // the next call, before its time: nothing; at its time: the next chunk, 500 ms later again
        for (now, expected, next) in [(10_499, vec![], 10_500), (10_500, vec!["a1#1"], 11_000)] {
            let mut c = candidates(&[("a", "a1", 3, 500, 0, 1_000)]);
            c.next_release.insert("a1".into(), 10_500);
            // a1#0 was released: the candidates start at a1#1
            c.queues[0].1.pop_front();
            let (released, _) = fair_share(&mut c, &mut InFlight::default(), caps, now);
            assert_eq!(names(&released), expected, "at {now}");
            assert_eq!(c.next_release["a1"], next, "at {now}");
        }
        // a batch that fell behind (its next release long past) is not owed a burst: spacing
        // counts from now
        let mut c = candidates(&[("a", "a1", 3, 500, 0, 1_000)]);
        c.next_release.insert("a1".into(), 1_000);
        let (released, _) = fair_share(&mut c, &mut InFlight::default(), caps, 50_000);
        assert_eq!((released.len(), c.next_release["a1"]), (1, 50_500));
    }
}
