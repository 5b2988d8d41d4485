//! A worker's server restart data: for each session, the attempt history of the session's chunks
//! that have failed at least once and are not finished ([`RestartData`], JSON). The worker saves
//! it with [`ServerReplier::save_restart`](baton_manager_client::ServerReplier::save_restart)
//! after every failed attempt, before retrying; the session manager journals it and hands it to
//! the worker that takes the session over ([`ServerEvent::Bound`]), which continues the chunk's
//! attempts where they were instead of starting afresh. So a chunk retried for a resource limit
//! still commits as COMMITTED_AFTER_RETRY_RESOURCES (or after a busy database as
//! COMMITTED_AFTER_RETRY_WORKLOAD) across a killed worker, with the larger budget, and
//! `--max-attempts` counts the attempts of every worker.
//!
//! A session carries several chunks at once (the scheduler sends on the least busy of its
//! sessions), and has one restart data, so it holds the histories of all of them.
//!
//! [`ServerEvent::Bound`]: baton_manager_client::ServerEvent::Bound

use std::collections::HashMap;
use std::time::Duration;

use baton_store::batches::{ChunkState, PartRange};

/// What the attempts at one chunk have been so far.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChunkHistory {
    /// The chunk's batch.
    pub batch_id: String,
    /// The chunk's index in its batch.
    pub chunk_index: u32,
    /// Attempts made so far (all failed).
    pub attempts: u32,
    /// Whether an attempt failed on a resource limit.
    pub resources: bool,
    /// Whether an attempt failed on a busy database.
    pub workload: bool,
    /// The time budget of the next attempt, in milliseconds (eight times larger after each
    /// resource failure).
    pub budget_ms: u64,
    /// Why the last attempt failed (recorded with the chunk's outcome).
    pub cause: String,
    /// The part of the chunk the attempts are at, once it was split after a resource limit
    /// (None: the whole chunk). `attempts` and `raises` count that part's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part: Option<PartRange>,
    /// Resource failures of the whole chunk, or of the current part, retried with a larger
    /// budget; past [`RAISES_BEFORE_SPLIT`] the next one splits it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub raises: u32,
}

/// Resource failures (time) retried with a larger budget before the chunk, or a part, is split.
/// A size failure splits at once: a larger time budget cannot help it.
pub const RAISES_BEFORE_SPLIT: u32 = 1;

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl ChunkHistory {
    /// A chunk not attempted yet, whose first attempt has `budget`.
    pub fn new(batch_id: &str, chunk_index: u32, budget: Duration) -> Self {
        Self {
            batch_id: batch_id.to_owned(),
            chunk_index,
            attempts: 0,
            resources: false,
            workload: false,
            budget_ms: u64::try_from(budget.as_millis()).unwrap_or(u64::MAX),
            cause: String::new(),
            part: None,
            raises: 0,
        }
    }

    /// The time budget of the next attempt.
    pub fn budget(&self) -> Duration {
        Duration::from_millis(self.budget_ms.max(1))
    }

    /// The outcome a commit by the next attempt records (when both a resource limit and a busy
    /// database were met, resources wins: it is the rarer and the more telling).
    pub fn outcome(&self) -> ChunkState {
        if self.resources {
            ChunkState::CommittedAfterRetryResources
        } else if self.workload {
            ChunkState::CommittedAfterRetryWorkload
        } else {
            ChunkState::Committed
        }
    }

    fn is(&self, batch_id: &str, chunk_index: u32) -> bool {
        self.batch_id == batch_id && self.chunk_index == chunk_index
    }
}

/// A worker's server restart data for one session, as saved (JSON).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RestartData {
    /// The histories of the session's chunks that have failed and are not finished.
    pub chunks: Vec<ChunkHistory>,
}

impl RestartData {
    /// The stored form.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("restart data is always serializable")
    }

    /// Decodes stored restart data.
    pub fn decode(data: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(data)
    }
}

/// The chunk histories of a worker's sessions, shared by its chunk tasks (behind one lock, which
/// a task holds while it hands the session's new restart data to the replier, so that the manager
/// receives the saves of a session in the order they were made).
#[derive(Debug, Default)]
pub struct Restarts {
    /// What the session's previous server saved, from [`ServerEvent::Bound`]; a history is taken
    /// when its chunk is delivered.
    ///
    /// [`ServerEvent::Bound`]: baton_manager_client::ServerEvent::Bound
    inherited: HashMap<String, Vec<ChunkHistory>>,
    /// The histories of the chunks this worker is running that have failed (here or on the
    /// previous server), by session: the session's restart data. A session is here from its first
    /// history until a reply has cleared its restart data.
    running: HashMap<String, Vec<ChunkHistory>>,
}

impl Restarts {
    /// A session is bound to this worker with `data`, its server restart data. Undecodable data
    /// is logged and ignored.
    pub fn bound(&mut self, session_id: &str, data: &[u8]) {
        self.inherited.remove(session_id);
        if data.is_empty() {
            return;
        }
        match RestartData::decode(data) {
            Ok(restart) if restart.chunks.is_empty() => {}
            Ok(restart) => {
                tracing::debug!(session = %session_id, chunks = restart.chunks.len(), "chunk histories taken over");
                self.inherited.insert(session_id.to_owned(), restart.chunks);
            }
            Err(e) => {
                tracing::warn!(session = %session_id, bytes = data.len(), error = %e, "undecodable server restart data; ignored")
            }
        }
    }

    /// The history to start a delivered chunk from: the one the session's previous server saved
    /// for this chunk, or none (then the chunk starts afresh). Histories of other chunks are
    /// ignored.
    pub fn take(&mut self, session_id: &str, batch_id: &str, chunk_index: u32) -> Option<ChunkHistory> {
        let inherited = self.inherited.get_mut(session_id)?;
        let at = inherited.iter().position(|h| h.is(batch_id, chunk_index))?;
        let history = inherited.swap_remove(at);
        if inherited.is_empty() {
            self.inherited.remove(session_id);
        }
        // it stays in the session's restart data while the chunk runs here
        self.note(session_id, history.clone());
        Some(history)
    }

    /// An attempt at a chunk failed: the session's restart data to save.
    pub fn failed(&mut self, session_id: &str, history: &ChunkHistory) -> Vec<u8> {
        self.note(session_id, history.clone());
        self.encode(session_id)
    }

    /// A chunk is finished: the restart data to send with its reply. Empty (the manager keeps
    /// the stored data) when this worker has no history on the session; else what is left of it,
    /// explicitly, even when nothing is (an empty list clears the stored data).
    pub fn finished(&mut self, session_id: &str, batch_id: &str, chunk_index: u32) -> Vec<u8> {
        let Some(running) = self.running.get_mut(session_id) else { return Vec::new() };
        running.retain(|h| !h.is(batch_id, chunk_index));
        let data = self.encode(session_id);
        if self.running.get(session_id).is_some_and(Vec::is_empty) {
            self.running.remove(session_id);
        }
        data
    }

    fn note(&mut self, session_id: &str, history: ChunkHistory) {
        let running = self.running.entry(session_id.to_owned()).or_default();
        match running.iter_mut().find(|h| h.is(&history.batch_id, history.chunk_index)) {
            Some(h) => *h = history,
            None => running.push(history),
        }
    }

    fn encode(&self, session_id: &str) -> Vec<u8> {
        RestartData { chunks: self.running.get(session_id).cloned().unwrap_or_default() }.encode()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn history(batch: &str, chunk: u32, attempts: u32) -> ChunkHistory {
        ChunkHistory {
            attempts,
            resources: true,
            budget_ms: 8000,
            cause: format!("attempt {attempts}: deadline"),
            ..ChunkHistory::new(batch, chunk, Duration::from_secs(1))
        }
    }

    fn decode(data: &[u8]) -> Vec<ChunkHistory> {
        RestartData::decode(data).unwrap().chunks
    }

    #[test]
    fn a_saved_history_is_taken_over_by_its_chunk_only() {
        let mut first = Restarts::default();
        first.failed("s", &history("b", 1, 1));
        let saved = first.failed("s", &history("b", 2, 2));
        assert_eq!(decode(&saved), vec![history("b", 1, 1), history("b", 2, 2)]);
        // another session's restart data is its own
        assert_eq!(decode(&first.failed("t", &history("c", 0, 1))), vec![history("c", 0, 1)]);

        let mut next = Restarts::default();
        next.bound("s", &saved);
        assert_eq!(next.take("s", "b", 3), None, "another chunk starts afresh");
        assert_eq!(next.take("s", "other", 1), None, "another batch starts afresh");
        assert_eq!(next.take("t", "b", 1), None, "another session starts afresh");
        assert_eq!(next.take("s", "b", 2), Some(history("b", 2, 2)));
        assert_eq!(next.take("s", "b", 2), None, "taken once");
        // the taken history stays in the restart data while the chunk runs: a save for another
        // chunk of the session carries it
        assert_eq!(decode(&next.failed("s", &history("b", 5, 1))), vec![history("b", 2, 2), history("b", 5, 1)]);
        assert_eq!(decode(&next.finished("s", "b", 2)), vec![history("b", 5, 1)]);
        // the last one finished: an explicit empty list clears the stored data
        assert_eq!(decode(&next.finished("s", "b", 5)), vec![]);
        assert!(next.finished("s", "b", 7).is_empty(), "no history here: the stored data is kept");
        // a binding without data forgets what an earlier one brought
        next.bound("s", &saved);
        next.bound("s", b"");
        assert_eq!(next.take("s", "b", 1), None);
    }

    #[test]
    fn the_part_of_a_split_chunk_is_carried_and_older_data_reads_as_the_whole_chunk() {
        let at_part = ChunkHistory { part: Some(PartRange { first: 4, records: 4 }), raises: 1, ..history("b", 3, 2) };
        let json = String::from_utf8(RestartData { chunks: vec![at_part.clone()] }.encode()).unwrap();
        assert!(json.contains(r#""part":{"first":4,"records":4},"raises":1"#), "{json}");
        assert_eq!(decode(json.as_bytes()), vec![at_part]);
        // saved by a worker from before splits: the whole chunk, no raises
        let old = br#"{"chunks":[{"batch_id":"b","chunk_index":3,"attempts":1,"resources":true,"workload":false,"budget_ms":8000,"cause":"c"}]}"#;
        let h = &decode(old)[0];
        assert_eq!((h.part, h.raises, h.attempts), (None, 0, 1));
    }

    #[test]
    fn undecodable_restart_data_is_ignored() {
        let mut restarts = Restarts::default();
        restarts.bound("s", b"{not json");
        restarts.bound("t", br#"{"batch_id":"b"}"#);
        assert_eq!(restarts.take("s", "b", 0), None);
        assert_eq!(restarts.take("t", "b", 0), None);
        assert!(restarts.finished("s", "b", 0).is_empty());
    }

    #[test]
    fn the_next_attempt_follows_the_history() {
        let fresh = ChunkHistory::new("b", 0, Duration::from_millis(1500));
        assert_eq!((fresh.budget(), fresh.outcome()), (Duration::from_millis(1500), ChunkState::Committed));
        let busy = ChunkHistory { workload: true, ..fresh.clone() };
        assert_eq!(busy.outcome(), ChunkState::CommittedAfterRetryWorkload);
        let both = ChunkHistory { resources: true, ..busy };
        assert_eq!(both.outcome(), ChunkState::CommittedAfterRetryResources);
        let json = String::from_utf8(RestartData { chunks: vec![history("b", 3, 1)] }.encode()).unwrap();
        assert_eq!(
            json,
            r#"{"chunks":[{"batch_id":"b","chunk_index":3,"attempts":1,"resources":true,"workload":false,"budget_ms":8000,"cause":"attempt 1: deadline"}]}"#
        );
    }
}
