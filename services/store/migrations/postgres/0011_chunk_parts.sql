-- The parts of a chunk split after a resource limit (issue #26). A chunk that is never split has
-- no rows here and runs whole. Splitting replaces a PENDING part (or, the first time, the whole
-- chunk) by its two halves, under the chunk's row lock; the parts of a chunk always partition its
-- records. A part's COMMITTED state is written in the same transaction as its records: it is the
-- part's commit marker, and a part runs only while PENDING, so it commits at most once.
-- Keep in step with sqlite/0011_chunk_parts.sql.
CREATE TABLE chunk_parts (
    batch_id       TEXT NOT NULL,
    idx            BIGINT NOT NULL,
    -- the part's first record, as an offset in its chunk (from 0), and its records
    part_first     BIGINT NOT NULL,
    record_count   BIGINT NOT NULL,
    -- PENDING, then COMMITTED or ABORTED
    state          TEXT NOT NULL,
    -- why it aborted
    cause          TEXT NOT NULL DEFAULT '',
    -- per-record errors of an aborted part: JSON [{"index", "field", "reason"}], batch indexes
    errors         TEXT NOT NULL DEFAULT '[]',
    finished_at_ms BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (batch_id, idx, part_first),
    FOREIGN KEY (batch_id, idx) REFERENCES chunks (batch_id, idx) ON DELETE CASCADE
);
-- Records of a chunk's committed parts, kept in each part's transaction: a split chunk that
-- aborted still counts what its committed parts wrote.
ALTER TABLE chunks ADD COLUMN parts_committed BIGINT NOT NULL DEFAULT 0;
