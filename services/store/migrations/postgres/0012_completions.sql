-- Completions pushed to where a batch or an export named (issue #26): one row per batch or export
-- submitted with a completion webhook, written in the transaction that creates it. The
-- scheduler's delivery loop turns a WAITING row PENDING once its batch or export is finished
-- (the body, a JSON document, is built then and sent unchanged at every attempt), claims PENDING
-- rows due for an attempt with a lease, POSTs the body, and records the outcome: DELIVERED on a
-- 2xx answer, otherwise the next attempt after a backoff, or FAILED past the give-up deadline.
-- Keep in step with sqlite/0012_completions.sql.
CREATE TABLE completions (
    -- the batch or export id: also the delivery id the receiver deduplicates by
    subject_id      TEXT PRIMARY KEY,
    -- 'batch' or 'export'
    kind            TEXT NOT NULL,
    org_id          TEXT NOT NULL,
    -- the webhook: an http or https URL
    url             TEXT NOT NULL,
    -- WAITING (not finished), PENDING (to deliver), DELIVERED or FAILED
    state           TEXT NOT NULL,
    -- the JSON body, built when the subject finished
    body            TEXT NOT NULL DEFAULT '',
    -- attempts started (counted at the claim), and 2xx answers received: more than one means
    -- the receiver was sent the completion twice (a lease that ran out during an attempt)
    attempts        BIGINT NOT NULL DEFAULT 0,
    acknowledgments BIGINT NOT NULL DEFAULT 0,
    last_error      TEXT NOT NULL DEFAULT '',
    created_at_ms   BIGINT NOT NULL,
    -- when the subject was found finished (the give-up deadline counts from it)
    ready_at_ms     BIGINT NOT NULL DEFAULT 0,
    next_attempt_ms BIGINT NOT NULL DEFAULT 0,
    last_attempt_ms BIGINT NOT NULL DEFAULT 0,
    delivered_at_ms BIGINT NOT NULL DEFAULT 0,
    -- the scheduler attempting it, until lease_until_ms
    claimed_by      TEXT NOT NULL DEFAULT '',
    lease_until_ms  BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX completions_by_state ON completions (state, next_attempt_ms);
