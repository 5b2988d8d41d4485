//! Sync in the store: links and their history and dead letters (source side), version-guarded
//! idempotent apply with a per-link watermark (target side), and change-log trimming.
//!
//! This module holds the types; `links` the source side (links, history, dead letters, leases),
//! `apply` the target side (apply, snapshot pages) and the trimming of the change log.

mod apply;
mod links;

use std::time::Duration;

use crate::model::{ObjectSchema, Record};

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

stored_names!(LinkState, "link state" {
    Bootstrapping => "BOOTSTRAPPING",
    Streaming => "STREAMING",
    Suspended => "SUSPENDED",
    Verifying => "VERIFYING",
    Paused => "PAUSED",
    Failed => "FAILED",
});

/// What a link does with a change the target rejects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectPolicy {
    /// Dead-letter it and go on.
    DeadLetter,
    /// Dead-letter it and fail the link.
    Stop,
}

stored_names!(RejectPolicy, "reject policy" {
    DeadLetter => "DEAD_LETTER",
    Stop => "STOP",
});

/// What a link does when its cursor falls behind the trimmed change log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrimmedPolicy {
    /// Bootstrap again by itself (a new high-water mark, the snapshot, the changes after it).
    Rebootstrap,
    /// Fail the link: a person resumes it.
    Fail,
}

stored_names!(TrimmedPolicy, "trimmed policy" {
    Rebootstrap => "REBOOTSTRAP",
    Fail => "FAIL",
});

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
