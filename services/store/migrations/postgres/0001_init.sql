-- baton's schema on PostgreSQL. Keep in step with migrations/sqlite/0001_init.sql.

CREATE TABLE orgs (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    -- the last change sequence number allocated to the org; bumped under the org's row lock
    last_seq      BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE api_keys (
    id            TEXT PRIMARY KEY,
    org_id        TEXT NOT NULL REFERENCES orgs (id),
    key_hash      TEXT NOT NULL UNIQUE,
    label         TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    revoked_at_ms BIGINT
);

CREATE TABLE objects (
    org_id        TEXT NOT NULL REFERENCES orgs (id),
    name          TEXT NOT NULL,
    schema_json   TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    PRIMARY KEY (org_id, name)
);

CREATE TABLE records (
    org_id        TEXT NOT NULL,
    object        TEXT NOT NULL,
    id            TEXT NOT NULL COLLATE "C",
    fields        JSONB NOT NULL,
    version       BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL,
    deleted       BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (org_id, object, id)
);

CREATE TABLE unique_values (
    org_id    TEXT NOT NULL,
    object    TEXT NOT NULL,
    field     TEXT NOT NULL,
    value     TEXT NOT NULL,
    record_id TEXT NOT NULL,
    PRIMARY KEY (org_id, object, field, value)
);

CREATE TABLE change_events (
    org_id          TEXT NOT NULL,
    seq             BIGINT NOT NULL,
    object          TEXT NOT NULL,
    record_id       TEXT NOT NULL,
    op              TEXT NOT NULL,
    fields          JSONB,
    version         BIGINT NOT NULL,
    committed_at_ms BIGINT NOT NULL,
    PRIMARY KEY (org_id, seq)
);

CREATE INDEX unique_values_by_record ON unique_values (org_id, object, record_id);
CREATE INDEX api_keys_by_org ON api_keys (org_id);
