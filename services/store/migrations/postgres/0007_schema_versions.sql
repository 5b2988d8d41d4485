-- Schema evolution: every version of an object's schema is kept here (1 at definition, +1 per
-- compatible change); `objects.schema_json` is the current one, its `version` in the JSON (a
-- schema stored before this migration has none: it is version 1). Keep in step with
-- sqlite/0007_schema_versions.sql.
CREATE TABLE object_versions (
    org_id        TEXT NOT NULL,
    object        TEXT NOT NULL,
    version       BIGINT NOT NULL,
    -- the schema as of this version (its dropped_fields included)
    schema_json   TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    PRIMARY KEY (org_id, object, version)
);
INSERT INTO object_versions (org_id, object, version, schema_json, created_at_ms)
    SELECT org_id, name, 1, schema_json, created_at_ms FROM objects;
