//! The store's domain types. The gRPC layer converts protobuf messages into these at its edge.

use serde::{Deserialize, Serialize};

/// A JSON object: a record's fields. Stored values are exact: integers as JSON integers, numbers
/// as doubles, decimals as canonical text. Records arriving from a client may also hold a
/// [`DECIMAL_TAG`] object, which [`crate::schema::record_problems`] resolves by the field's type.
pub type Fields = serde_json::Map<String, serde_json::Value>;

/// The key of `{"$decimal": "12.30"}`: decimal text as it arrives from a client, before the
/// schema says what it is (an integer, a number or a decimal). Never stored.
pub const DECIMAL_TAG: &str = "$decimal";

/// An org (tenant).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Org {
    /// `org_…`
    pub id: String,
    /// The name given at creation.
    pub name: String,
    /// Creation time, ms since the epoch.
    pub created_at_ms: i64,
}

/// A newly issued API key. The key text exists only here; the store keeps its hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewApiKey {
    /// `key_…`, used to revoke it.
    pub key_id: String,
    /// The secret, `bk_…`.
    pub api_key: String,
    /// The org it acts for.
    pub org_id: String,
}

/// An API key as listed: never its secret, which only [`NewApiKey`] carries, once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyInfo {
    /// `key_…`
    pub key_id: String,
    /// The org it acts for.
    pub org_id: String,
    /// The label given at creation.
    pub label: String,
    /// Creation time, ms since the epoch.
    pub created_at_ms: i64,
    /// When it was revoked (ms since the epoch); `None` while it is valid.
    pub revoked_at_ms: Option<i64>,
}

/// Where a page of a list ordered by creation time and id ends: the last item's creation time
/// (ms) and id. The next page starts after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    /// The creation time of the last item of the page, ms since the epoch.
    pub created_at_ms: i64,
    /// The id of the last item of the page.
    pub id: String,
}

/// The type of a field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldType {
    /// A string.
    String,
    /// A 64-bit signed integer.
    Integer,
    /// A double.
    Number,
    /// A boolean.
    Boolean,
    /// An exact decimal, stored as its canonical text (see [`crate::schema::canonical_decimal`]).
    Decimal,
}

impl FieldType {
    /// The name used in messages.
    pub fn name(self) -> &'static str {
        match self {
            FieldType::String => "string",
            FieldType::Integer => "integer",
            FieldType::Number => "number",
            FieldType::Boolean => "boolean",
            FieldType::Decimal => "decimal",
        }
    }
}

/// A field of an object schema.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldSpec {
    /// The field name.
    pub name: String,
    /// Its type.
    #[serde(rename = "type")]
    pub field_type: FieldType,
    /// A non-null value is required.
    #[serde(default)]
    pub required: bool,
    /// No two live records share a value.
    #[serde(default)]
    pub unique: bool,
    /// Going away: still stored, answered and accepted in writes, and droppable by a later
    /// version. A deprecated field is never required, nor the external-id field.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deprecated: bool,
}

/// The schema of an object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectSchema {
    /// The object name.
    pub name: String,
    /// The field identifying records for upserts.
    pub external_id_field: String,
    /// The fields.
    pub fields: Vec<FieldSpec>,
    /// The fields dropped by earlier versions, oldest first. Their names are not used again:
    /// records written before the drop still hold their values
    /// (see docs/decisions/0037-dropped-values-kept.md), which answers leave out.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dropped_fields: Vec<String>,
    /// The schema's version: 1 at definition, +1 per compatible change. Stored in the schema's
    /// JSON; a schema stored before versions existed has none, and is version 1.
    #[serde(default = "first_version")]
    pub version: i64,
}

fn first_version() -> i64 {
    1
}

impl ObjectSchema {
    /// The spec of a field, if the schema has it.
    pub fn field(&self, name: &str) -> Option<&FieldSpec> {
        self.fields.iter().find(|f| f.name == name)
    }

    /// Whether `name` is a field dropped by an earlier version, whose stored values answers
    /// leave out.
    pub fn is_dropped(&self, name: &str) -> bool {
        self.dropped_fields.iter().any(|f| f == name)
    }
}

/// A stored record.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// The external id.
    pub id: String,
    /// The fields.
    pub fields: Fields,
    /// 1 at creation, +1 per change.
    pub version: i64,
    /// Last change, ms since the epoch.
    pub updated_at_ms: i64,
}

/// What an upsert did to one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpsertOutcome {
    /// The record id.
    pub id: String,
    /// Its version now.
    pub version: i64,
    /// Created rather than updated.
    pub created: bool,
}

/// What a delete did to one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeleteOutcome {
    /// The record id.
    pub id: String,
    /// A live record was deleted.
    pub deleted: bool,
    /// Its version now (0 if there was none).
    pub version: i64,
}

/// The kind of a change event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeOp {
    /// Created or updated; the event carries the fields.
    Upsert,
    /// Deleted.
    Delete,
}

impl ChangeOp {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ChangeOp::Upsert => "UPSERT",
            ChangeOp::Delete => "DELETE",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        match s {
            "UPSERT" => Some(ChangeOp::Upsert),
            "DELETE" => Some(ChangeOp::Delete),
            _ => None,
        }
    }
}

/// One entry of an org's change log.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeEvent {
    /// The org's dense, commit-ordered sequence number.
    pub seq: i64,
    /// The object.
    pub object: String,
    /// The record id.
    pub record_id: String,
    /// What happened.
    pub op: ChangeOp,
    /// The fields after an upsert.
    pub fields: Option<Fields>,
    /// The record version after the change.
    pub version: i64,
    /// Commit time, ms since the epoch.
    pub committed_at_ms: i64,
}

/// A page of query results.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    /// The records, in id order.
    pub records: Vec<Record>,
    /// The id to continue after, when there may be more.
    pub next_after: Option<String>,
    /// The object's schema, which says each field's type.
    pub schema: ObjectSchema,
}
