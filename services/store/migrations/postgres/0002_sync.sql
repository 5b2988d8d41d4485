-- Sync: links (source side), apply watermarks (target side), change-log trimming.

ALTER TABLE orgs ADD COLUMN trimmed_seq BIGINT NOT NULL DEFAULT 0;
CREATE INDEX change_events_by_time ON change_events (committed_at_ms);

CREATE TABLE links (
    id                TEXT PRIMARY KEY,
    org_id            TEXT NOT NULL REFERENCES orgs (id),
    target_endpoint   TEXT NOT NULL,
    target_api_key    TEXT NOT NULL,
    objects           TEXT NOT NULL,
    state             TEXT NOT NULL,
    verify_threshold  BIGINT NOT NULL,
    probe_interval_ms BIGINT NOT NULL,
    on_reject         TEXT NOT NULL,
    cursor_seq        BIGINT NOT NULL DEFAULT 0,
    bootstrapped      BIGINT NOT NULL DEFAULT 0,
    consecutive_ok    BIGINT NOT NULL DEFAULT 0,
    last_cause        TEXT NOT NULL DEFAULT '',
    created_at_ms     BIGINT NOT NULL,
    updated_at_ms     BIGINT NOT NULL,
    owner             TEXT,
    lease_until_ms    BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX links_by_org ON links (org_id);

CREATE TABLE link_history (
    id         BIGSERIAL PRIMARY KEY,
    link_id    TEXT NOT NULL,
    at_ms      BIGINT NOT NULL,
    from_state TEXT NOT NULL,
    to_state   TEXT NOT NULL,
    cause      TEXT NOT NULL
);
CREATE INDEX link_history_by_link ON link_history (link_id, id);

CREATE TABLE dead_letters (
    id        BIGSERIAL PRIMARY KEY,
    link_id   TEXT NOT NULL,
    seq       BIGINT NOT NULL,
    object    TEXT NOT NULL,
    record_id TEXT NOT NULL,
    reason    TEXT NOT NULL,
    at_ms     BIGINT NOT NULL
);
CREATE INDEX dead_letters_by_link ON dead_letters (link_id, id);

CREATE TABLE apply_watermarks (
    org_id  TEXT NOT NULL,
    link_id TEXT NOT NULL,
    seq     BIGINT NOT NULL,
    PRIMARY KEY (org_id, link_id)
);
