-- The W3C trace context (traceparent) of the request that created a batch or an export, so that
-- its chunks and parts, released later by a scheduler and run by workers, continue its trace;
-- empty when traces are not exported. Keep in step with postgres/0014_traceparent.sql.
ALTER TABLE batches ADD COLUMN traceparent TEXT NOT NULL DEFAULT '';
ALTER TABLE exports ADD COLUMN traceparent TEXT NOT NULL DEFAULT '';
