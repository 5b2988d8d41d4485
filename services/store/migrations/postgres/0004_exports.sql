-- Exports: the first portion answered by the intake, the rest produced by workers as parts.

CREATE TABLE exports (
    id              TEXT PRIMARY KEY,
    org_id          TEXT NOT NULL REFERENCES orgs (id),
    -- the client's id for idempotent retry; NULL when none (NULLs never collide)
    request_id      TEXT,
    object          TEXT NOT NULL,
    filter          TEXT NOT NULL,
    -- the fields to return, a JSON array (empty: all)
    fields          TEXT NOT NULL,
    part_rows       BIGINT NOT NULL,
    -- PRODUCING, COMPLETE, FAILED or CANCELLED
    state           TEXT NOT NULL,
    -- LARGE_RESULTS or LONG_RUNNING
    reason          TEXT NOT NULL,
    as_of_seq       BIGINT NOT NULL,
    first_rows      BIGINT NOT NULL,
    -- the last id of the first portion: the parts cover the ids after it
    first_last_id   TEXT NOT NULL,
    -- planning: parts cover (after, last] id ranges; the next part starts after plan_after
    plan_after      TEXT NOT NULL,
    -- 1 once the last part is planned
    planned         BIGINT NOT NULL DEFAULT 0,
    -- rows in the parts planned so far (as counted when planned)
    planned_rows    BIGINT NOT NULL DEFAULT 0,
    parts_total     BIGINT NOT NULL DEFAULT 0,
    parts_ready     BIGINT NOT NULL DEFAULT 0,
    rows_ready      BIGINT NOT NULL DEFAULT 0,
    -- the estimate answered at creation (a lower bound), until planning is done
    estimated_total BIGINT NOT NULL,
    error           TEXT NOT NULL DEFAULT '',
    created_at_ms   BIGINT NOT NULL,
    expires_at_ms   BIGINT NOT NULL,
    finished_at_ms  BIGINT NOT NULL DEFAULT 0,
    -- 1 once its parts' blobs are deleted (retention)
    expired         BIGINT NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX exports_by_request ON exports (org_id, request_id);
CREATE INDEX exports_by_state ON exports (state, created_at_ms);
CREATE INDEX exports_by_expiry ON exports (expired, expires_at_ms);

-- Tokens: only their SHA-256 is kept. An idempotent retry mints another token to the same export.
CREATE TABLE export_tokens (
    token_hash TEXT PRIMARY KEY,
    export_id  TEXT NOT NULL REFERENCES exports (id) ON DELETE CASCADE,
    org_id     TEXT NOT NULL
);

CREATE TABLE export_parts (
    export_id      TEXT NOT NULL REFERENCES exports (id) ON DELETE CASCADE,
    number         BIGINT NOT NULL,
    org_id         TEXT NOT NULL,
    -- the part's id range: after_id < id <= last_id (no upper bound when last_id is NULL)
    after_id       TEXT NOT NULL,
    last_id        TEXT,
    -- PENDING, RELEASED, READY or CANCELLED
    state          TEXT NOT NULL,
    attempts       BIGINT NOT NULL DEFAULT 0,
    claimed_by     TEXT NOT NULL DEFAULT '',
    released_at_ms BIGINT NOT NULL DEFAULT 0,
    sent_at_ms     BIGINT NOT NULL DEFAULT 0,
    -- set when READY: the blob's key, its rows and compressed size
    blob_key       TEXT NOT NULL DEFAULT '',
    row_count      BIGINT NOT NULL DEFAULT 0,
    byte_count     BIGINT NOT NULL DEFAULT 0,
    worker         TEXT NOT NULL DEFAULT '',
    finished_at_ms BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (export_id, number)
);
CREATE INDEX export_parts_by_state ON export_parts (state, org_id);
