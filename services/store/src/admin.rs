//! Orgs, API keys and object schemas.

use sha2::{Digest, Sha256};
use sqlx::Row;

use crate::model::{ApiKeyInfo, Cursor, NewApiKey, ObjectSchema, Org};
use crate::schema::{FieldError, schema_change, validate_schema};
use crate::{Backend, Error, Missing, Store, new_id};

/// The SHA-256 of an API key, hex-encoded: all that is stored of a key.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// What an API key resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyLookup {
    /// A live key of this org.
    Org(String),
    /// A key that was revoked.
    Revoked,
    /// No such key.
    Unknown,
}

/// How long an API key lookup may take (see [`Store::lookup_key`]).
const KEY_LOOKUP_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);

impl Store {
    /// Creates an org.
    pub async fn create_org(&self, name: &str) -> Result<Org, Error> {
        let name = name.trim();
        if name.is_empty() || name.chars().count() > 200 {
            return Err(Error::Invalid(vec![FieldError::new("name", "an org name has 1 to 200 characters")]));
        }
        let org = Org { id: new_id("org"), name: name.to_owned(), created_at_ms: self.now_ms() };
        sqlx::query("INSERT INTO orgs (id, name, created_at_ms, last_seq) VALUES ($1, $2, $3, 0)")
            .bind(&org.id)
            .bind(&org.name)
            .bind(org.created_at_ms)
            .execute(&self.writer)
            .await?;
        Ok(org)
    }

    /// Every org, oldest first.
    pub async fn list_orgs(&self) -> Result<Vec<Org>, Error> {
        let rows = sqlx::query("SELECT id, name, created_at_ms FROM orgs ORDER BY created_at_ms, id")
            .fetch_all(&self.reader)
            .await?;
        rows.iter().map(|r| Ok(Org { id: r.try_get(0)?, name: r.try_get(1)?, created_at_ms: r.try_get(2)? })).collect()
    }

    async fn require_org(&self, org_id: &str) -> Result<(), Error> {
        let found = sqlx::query("SELECT 1 FROM orgs WHERE id = $1").bind(org_id).fetch_optional(&self.reader).await?;
        found.map(|_| ()).ok_or_else(|| Error::not_found(Missing::Org, format!("org {org_id}")))
    }

    /// Issues an API key for an org; only its hash is stored.
    pub async fn create_api_key(&self, org_id: &str, label: &str) -> Result<NewApiKey, Error> {
        self.require_org(org_id).await?;
        let key = NewApiKey {
            key_id: new_id("key"),
            api_key: format!("bk_{}", hex::encode(rand::random::<[u8; 24]>())),
            org_id: org_id.to_owned(),
        };
        sqlx::query("INSERT INTO api_keys (id, org_id, key_hash, label, created_at_ms) VALUES ($1, $2, $3, $4, $5)")
            .bind(&key.key_id)
            .bind(org_id)
            .bind(hash_key(&key.api_key))
            .bind(label)
            .bind(self.now_ms())
            .execute(&self.writer)
            .await?;
        Ok(key)
    }

    /// Revokes an API key. Revoking a revoked key is not an error.
    pub async fn revoke_api_key(&self, key_id: &str) -> Result<(), Error> {
        let done = sqlx::query("UPDATE api_keys SET revoked_at_ms = COALESCE(revoked_at_ms, $2) WHERE id = $1")
            .bind(key_id)
            .bind(self.now_ms())
            .execute(&self.writer)
            .await?;
        if done.rows_affected() == 0 {
            return Err(Error::not_found(Missing::ApiKey, format!("api key {key_id}")));
        }
        Ok(())
    }

    /// A page of API keys, oldest first (by creation time, then id): those of `org_id`, or of
    /// every org when it is `None`; at most `limit`, those after `after` (the last of the page
    /// before). Never the keys themselves: only their hashes are stored.
    pub async fn list_api_keys(
        &self,
        org_id: Option<&str>,
        after: Option<&Cursor>,
        limit: u32,
    ) -> Result<Vec<ApiKeyInfo>, Error> {
        if let Some(org_id) = org_id {
            self.require_org(org_id).await?;
        }
        // `$1 = ''` stands for every org; `$2` and `$3`, the cursor, start before everything
        let sql = "SELECT id, org_id, label, created_at_ms, revoked_at_ms FROM api_keys \
                   WHERE ($1 = '' OR org_id = $1) AND (created_at_ms > $2 OR (created_at_ms = $2 AND id > $3)) \
                   ORDER BY created_at_ms, id LIMIT $4";
        let rows = sqlx::query(sql)
            .bind(org_id.unwrap_or_default())
            .bind(after.map_or(i64::MIN, |c| c.created_at_ms))
            .bind(after.map_or(String::new(), |c| c.id.clone()))
            .bind(i64::from(limit))
            .fetch_all(&self.reader)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(ApiKeyInfo {
                    key_id: r.try_get(0)?,
                    org_id: r.try_get(1)?,
                    label: r.try_get(2)?,
                    created_at_ms: r.try_get(3)?,
                    revoked_at_ms: r.try_get(4)?,
                })
            })
            .collect()
    }

    /// Resolves the hash of an API key to its org.
    ///
    /// Every request with an API key waits on this, so it is bounded: past [`KEY_LOOKUP_LIMIT`]
    /// (a database that does not take connections, say) it fails, and the caller is told to
    /// retry, instead of waiting out the pool's acquire timeout.
    pub async fn lookup_key(&self, key_hash: &str) -> Result<KeyLookup, Error> {
        let deadline = tokio::time::Instant::now() + KEY_LOOKUP_LIMIT;
        let row = self
            .by_deadline(deadline, async {
                let query = sqlx::query("SELECT org_id, revoked_at_ms FROM api_keys WHERE key_hash = $1");
                Ok(query.bind(key_hash).fetch_optional(&self.reader).await?)
            })
            .await?;
        Ok(match row {
            None => KeyLookup::Unknown,
            Some(row) => match row.try_get::<Option<i64>, _>(1)? {
                Some(_) => KeyLookup::Revoked,
                None => KeyLookup::Org(row.try_get(0)?),
            },
        })
    }

    /// Defines an object for an org, at version 1. Defining it again with the same fields and
    /// external-id field as its current version answers that version (a retried definition);
    /// anything else answers ALREADY_EXISTS: a schema changes through [`Store::update_object`].
    pub async fn define_object(&self, org_id: &str, schema: &ObjectSchema) -> Result<ObjectSchema, Error> {
        let errors = validate_schema(schema);
        if !errors.is_empty() {
            return Err(Error::Invalid(errors));
        }
        self.require_org(org_id).await?;
        let defined = ObjectSchema { dropped_fields: vec![], version: 1, ..schema.clone() };
        let json = encode_schema(&defined)?;
        let now = self.now_ms();
        let mut tx = self.writer.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO objects (org_id, name, schema_json, created_at_ms) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (org_id, name) DO NOTHING",
        )
        .bind(org_id)
        .bind(&schema.name)
        .bind(&json)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        if inserted.rows_affected() == 0 {
            drop(tx);
            let current = self.object(org_id, &schema.name).await?;
            if current.fields == schema.fields && current.external_id_field == schema.external_id_field {
                return Ok(current);
            }
            return Err(Error::AlreadyExists(format!(
                "object {} (at version {}; change its schema with UpdateObject)",
                schema.name, current.version
            )));
        }
        insert_version(&mut tx, org_id, &defined, &json, now).await?;
        tx.commit().await?;
        Ok(defined)
    }

    /// Changes an object's schema to `schema`, a compatible change of its current version (see
    /// [`schema_change`]), as the next version; a schema equal to the current one answers it
    /// unchanged. An incompatible change is [`Error::Incompatible`] with every problem, and
    /// changes nothing. Dropping a unique field forgets its unique values; the records keep
    /// theirs, which answers leave out.
    pub async fn update_object(&self, org_id: &str, schema: &ObjectSchema) -> Result<ObjectSchema, Error> {
        let errors = validate_schema(schema);
        if !errors.is_empty() {
            return Err(Error::Invalid(errors));
        }
        self.require_org(org_id).await?;
        let mut tx = self.writer.begin().await?;
        // PostgreSQL: the row lock orders concurrent changes; SQLite has one writer anyway
        let lock = if self.backend == Backend::Postgres { " FOR UPDATE" } else { "" };
        let row = sqlx::query(&format!("SELECT schema_json FROM objects WHERE org_id = $1 AND name = $2{lock}"))
            .bind(org_id)
            .bind(&schema.name)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else {
            return Err(Error::not_found(Missing::Object, format!("object {:?}", schema.name)));
        };
        let current = decode_schema(&row.try_get::<String, _>(0)?)?;
        let next = match schema_change(&current, schema) {
            Err(problems) => {
                return Err(Error::Incompatible { object: current.name, version: current.version, problems });
            }
            Ok(None) => return Ok(current),
            Ok(Some(next)) => next,
        };
        let json = encode_schema(&next)?;
        let now = self.now_ms();
        sqlx::query("UPDATE objects SET schema_json = $3 WHERE org_id = $1 AND name = $2")
            .bind(org_id)
            .bind(&schema.name)
            .bind(&json)
            .execute(&mut *tx)
            .await?;
        insert_version(&mut tx, org_id, &next, &json, now).await?;
        for dropped in next.dropped_fields.iter().filter(|f| !current.is_dropped(f)) {
            sqlx::query("DELETE FROM unique_values WHERE org_id = $1 AND object = $2 AND field = $3")
                .bind(org_id)
                .bind(&schema.name)
                .bind(dropped)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(next)
    }

    /// Every version of an object's schema, oldest first, with when each was made (ms).
    pub async fn object_versions(&self, org_id: &str, name: &str) -> Result<Vec<(ObjectSchema, i64)>, Error> {
        let rows = sqlx::query(
            "SELECT schema_json, created_at_ms FROM object_versions \
             WHERE org_id = $1 AND object = $2 ORDER BY version",
        )
        .bind(org_id)
        .bind(name)
        .fetch_all(&self.reader)
        .await?;
        if rows.is_empty() {
            self.require_org(org_id).await?;
            return Err(Error::not_found(Missing::Object, format!("object {name:?}")));
        }
        rows.iter().map(|r| Ok((decode_schema(&r.try_get::<String, _>(0)?)?, r.try_get(1)?))).collect()
    }

    /// The objects of an org, by name, each at its current version.
    pub async fn list_objects(&self, org_id: &str) -> Result<Vec<ObjectSchema>, Error> {
        self.require_org(org_id).await?;
        let rows = sqlx::query("SELECT schema_json FROM objects WHERE org_id = $1 ORDER BY name")
            .bind(org_id)
            .fetch_all(&self.reader)
            .await?;
        rows.iter().map(|r| decode_schema(&r.try_get::<String, _>(0)?)).collect()
    }

    /// The current schema of one object of an org; NOT_FOUND if the org has no such object.
    pub async fn object(&self, org_id: &str, name: &str) -> Result<ObjectSchema, Error> {
        let row = sqlx::query("SELECT schema_json FROM objects WHERE org_id = $1 AND name = $2")
            .bind(org_id)
            .bind(name)
            .fetch_optional(&self.reader)
            .await?;
        match row {
            Some(row) => decode_schema(&row.try_get::<String, _>(0)?),
            None => Err(Error::not_found(Missing::Object, format!("object {name:?}"))),
        }
    }
}

async fn insert_version(
    conn: &mut sqlx::AnyConnection,
    org_id: &str,
    schema: &ObjectSchema,
    json: &str,
    now: i64,
) -> Result<(), Error> {
    sqlx::query(
        "INSERT INTO object_versions (org_id, object, version, schema_json, created_at_ms) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(org_id)
    .bind(&schema.name)
    .bind(schema.version)
    .bind(json)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

fn encode_schema(schema: &ObjectSchema) -> Result<String, Error> {
    serde_json::to_string(schema).map_err(|e| Error::Corrupt(e.to_string()))
}

fn decode_schema(json: &str) -> Result<ObjectSchema, Error> {
    serde_json::from_str(json).map_err(|e| Error::Corrupt(format!("object schema: {e}")))
}
