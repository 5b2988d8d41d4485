-- A chunk's records live apart from its state. SQLite rewrites a whole row, its overflow pages
-- included, on every update, and a chunk's state changes about five times on its way (released,
-- sent, running, claimed, finished): with the records in the row, each change copied the
-- chunk's hundreds of kilobytes of JSON again. Keep in step with postgres/0006_chunk_records.sql.
CREATE TABLE chunk_records (
    batch_id TEXT NOT NULL,
    idx      INTEGER NOT NULL,
    -- the chunk's records, a JSON array, as staged
    records  TEXT NOT NULL,
    PRIMARY KEY (batch_id, idx),
    FOREIGN KEY (batch_id, idx) REFERENCES chunks (batch_id, idx) ON DELETE CASCADE
);
INSERT INTO chunk_records (batch_id, idx, records) SELECT batch_id, idx, records FROM chunks;
ALTER TABLE chunks DROP COLUMN records;
