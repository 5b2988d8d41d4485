-- What a link does when its cursor falls behind the trimmed change log: REBOOTSTRAP (bootstrap
-- again by itself) or FAIL (wait for a person). Links made before this migration re-bootstrap.
-- Keep in step with sqlite/0009_link_on_trimmed.sql.
ALTER TABLE links ADD COLUMN on_trimmed TEXT NOT NULL DEFAULT 'REBOOTSTRAP';
