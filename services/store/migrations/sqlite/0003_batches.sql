-- Batches: staged records divided into chunks, released by the scheduler, run by workers.

CREATE TABLE batches (
    id                 TEXT PRIMARY KEY,
    org_id             TEXT NOT NULL REFERENCES orgs (id),
    -- the client's id for idempotent resubmission; NULL when none (NULLs never collide)
    request_id         TEXT,
    object             TEXT NOT NULL,
    operation          TEXT NOT NULL,
    chunk_size         INTEGER NOT NULL,
    not_before_ms      INTEGER NOT NULL,
    max_parallel       INTEGER NOT NULL,
    records_per_second INTEGER NOT NULL,
    -- the rate limit: no chunk of the batch is released before this time
    next_release_ms    INTEGER NOT NULL DEFAULT 0,
    -- STAGING (upload in progress), QUEUED (chunks released by policy) or CANCELLED
    state              TEXT NOT NULL,
    total_records      INTEGER NOT NULL DEFAULT 0,
    total_chunks       INTEGER NOT NULL DEFAULT 0,
    created_at_ms      INTEGER NOT NULL,
    finished_at_ms     INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX batches_by_request ON batches (org_id, request_id);
CREATE INDEX batches_by_state ON batches (state, created_at_ms);

CREATE TABLE chunks (
    batch_id       TEXT NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
    idx            INTEGER NOT NULL,
    org_id         TEXT NOT NULL,
    first_record   INTEGER NOT NULL,
    record_count   INTEGER NOT NULL,
    -- the chunk's records, a JSON array, as staged
    records        TEXT NOT NULL,
    -- PENDING, RELEASED, RUNNING, then one outcome: COMMITTED, COMMITTED_AFTER_RETRY_RESOURCES,
    -- COMMITTED_AFTER_RETRY_WORKLOAD, ABORTED or CANCELLED. A committed outcome is written in
    -- the same transaction as the chunk's records: it is the chunk's commit marker.
    state          TEXT NOT NULL,
    attempts       INTEGER NOT NULL DEFAULT 0,
    worker         TEXT NOT NULL DEFAULT '',
    claimed_by     TEXT NOT NULL DEFAULT '',
    released_at_ms INTEGER NOT NULL DEFAULT 0,
    sent_at_ms     INTEGER NOT NULL DEFAULT 0,
    started_at_ms  INTEGER NOT NULL DEFAULT 0,
    finished_at_ms INTEGER NOT NULL DEFAULT 0,
    -- per-record errors of an aborted chunk: JSON [{"index", "field", "reason"}]
    errors         TEXT NOT NULL DEFAULT '[]',
    error_count    INTEGER NOT NULL DEFAULT 0,
    last_cause     TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (batch_id, idx)
);
CREATE INDEX chunks_by_state ON chunks (state, org_id);

-- One row whose update serializes chunk releases across scheduler replicas, so that the
-- parallelism caps hold exactly (a row lock on PostgreSQL, the write lock on SQLite).
CREATE TABLE release_lock (
    id       INTEGER PRIMARY KEY,
    releases INTEGER NOT NULL
);
INSERT INTO release_lock (id, releases) VALUES (1, 0);
