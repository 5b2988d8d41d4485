-- The releaser defers releases for a moment after a chunk committed only after meeting a busy
-- database (Store::release_chunks); this finds the latest such chunk without a scan.
CREATE INDEX chunks_by_finish ON chunks (state, finished_at_ms);
