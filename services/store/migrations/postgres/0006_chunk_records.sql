-- A chunk's records live apart from its state, as on SQLite, where every update of a chunk's
-- state used to copy its records again (PostgreSQL keeps an unchanged TOASTed value, but the
-- two schemas stay one shape). Keep in step with sqlite/0006_chunk_records.sql.
CREATE TABLE chunk_records (
    batch_id TEXT NOT NULL,
    idx      BIGINT NOT NULL,
    -- the chunk's records, a JSON array, as staged
    records  TEXT NOT NULL,
    PRIMARY KEY (batch_id, idx),
    FOREIGN KEY (batch_id, idx) REFERENCES chunks (batch_id, idx) ON DELETE CASCADE
);
INSERT INTO chunk_records (batch_id, idx, records) SELECT batch_id, idx, records FROM chunks;
ALTER TABLE chunks DROP COLUMN records;
