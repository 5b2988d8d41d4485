-- Listing an org's batches and exports newest first, a page at a time (ListBatches,
-- ListExports): keyset pages over (created_at_ms, id) within the org, without a scan.
CREATE INDEX batches_by_org ON batches (org_id, created_at_ms, id);
CREATE INDEX exports_by_org ON exports (org_id, created_at_ms, id);
