-- The CA certificates (PEM) a link trusts for its https:// target, when not the sync server's
-- --tls-ca; empty for the server's. Keep in step with postgres/0010_link_target_ca.sql.
ALTER TABLE links ADD COLUMN target_ca_pem TEXT NOT NULL DEFAULT '';
