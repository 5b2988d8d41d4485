//! Validation of object schemas and of records against them. Pure: no I/O.

use std::collections::{HashMap, HashSet};

use serde_json::Value;

use crate::model::{FieldType, Fields, ObjectSchema};

/// One thing wrong with a request, at a field path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Where: `schema.fields[2].name`, `records[3].amount`, `filter`…
    pub field: String,
    /// What is wrong.
    pub description: String,
}

impl FieldError {
    /// An error at `field`.
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self { field: field.into(), description: description.into() }
    }
}

/// A problem with one record of a list (a request's records, a chunk's): its index in the list,
/// the field at fault (empty: the record as a whole) and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RecordProblem {
    /// The record's index in its list.
    pub index: usize,
    /// The field, or empty.
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

impl RecordProblem {
    /// A problem with field `field` of record `index`.
    pub fn new(index: usize, field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self { index, field: field.into(), reason: reason.into() }
    }

    /// The same problem as a request error at `records[i].field`.
    pub fn to_field_error(&self) -> FieldError {
        let path = if self.field.is_empty() {
            format!("records[{}]", self.index)
        } else {
            format!("records[{}].{}", self.index, self.field)
        };
        FieldError::new(path, self.reason.clone())
    }
}

/// Whether `name` is a valid object or field name: a lowercase letter, then lowercase letters,
/// digits or underscores, at most 63 in all. Filters splice these names into JSON paths, so this
/// rule is what keeps them safe.
pub fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some('a'..='z'))
        && name.len() <= 63
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
}

/// Checks an object schema; every problem is listed.
pub fn validate_schema(schema: &ObjectSchema) -> Vec<FieldError> {
    let mut errors = Vec::new();
    if !is_identifier(&schema.name) {
        errors.push(FieldError::new(
            "schema.name",
            format!("{:?} is not a valid name: use a-z, 0-9 and _, starting with a letter, at most 63", schema.name),
        ));
    }
    if schema.fields.is_empty() {
        errors.push(FieldError::new("schema.fields", "an object needs at least one field"));
    }
    let mut seen = HashSet::new();
    for (i, f) in schema.fields.iter().enumerate() {
        if !is_identifier(&f.name) {
            errors.push(FieldError::new(
                format!("schema.fields[{i}].name"),
                format!("{:?} is not a valid name: use a-z, 0-9 and _, starting with a letter, at most 63", f.name),
            ));
        } else if f.name == "id" {
            errors.push(FieldError::new(format!("schema.fields[{i}].name"), "`id` is reserved for the record id"));
        }
        if !seen.insert(f.name.as_str()) {
            errors.push(FieldError::new(format!("schema.fields[{i}].name"), format!("duplicate field {:?}", f.name)));
        }
    }
    match schema.field(&schema.external_id_field) {
        None => errors.push(FieldError::new(
            "schema.external_id_field",
            format!("{:?} is not one of the fields", schema.external_id_field),
        )),
        Some(f) => {
            if !matches!(f.field_type, FieldType::String | FieldType::Integer) || !f.required || !f.unique {
                errors.push(FieldError::new(
                    "schema.external_id_field",
                    "the external-id field must be a required, unique string or integer field",
                ));
            }
        }
    }
    errors
}

/// Checks one value against a type.
fn type_matches(value: &Value, field_type: FieldType) -> bool {
    match field_type {
        FieldType::String => value.is_string(),
        FieldType::Integer => value.is_i64(),
        FieldType::Number => value.is_number(),
        FieldType::Boolean => value.is_boolean(),
    }
}

/// The record id of a record: its external-id value as a string.
pub fn record_id(schema: &ObjectSchema, fields: &Fields) -> Option<String> {
    match fields.get(&schema.external_id_field)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) if n.is_i64() => Some(n.to_string()),
        _ => None,
    }
}

/// The text under which a unique value is indexed: its canonical JSON.
pub(crate) fn unique_key(value: &Value) -> String {
    value.to_string()
}

/// Validates records for an upsert: types, required fields, unknown fields, the external id, and
/// duplicates inside the request (ids and unique values). Every problem is listed, with the
/// record's index in the request.
pub fn validate_records(schema: &ObjectSchema, records: &[Fields]) -> Vec<FieldError> {
    record_problems(schema, records).iter().map(RecordProblem::to_field_error).collect()
}

/// What [`validate_records`] checks, as problems by record index.
pub fn record_problems(schema: &ObjectSchema, records: &[Fields]) -> Vec<RecordProblem> {
    let mut errors = Vec::new();
    let mut ids: HashMap<String, usize> = HashMap::new();
    let mut uniques: HashMap<(&str, String), usize> = HashMap::new();
    for (i, record) in records.iter().enumerate() {
        for name in record.keys() {
            if schema.field(name).is_none() {
                errors.push(RecordProblem::new(i, name.clone(), format!("unknown field of object {}", schema.name)));
            }
        }
        for spec in &schema.fields {
            match record.get(&spec.name) {
                None | Some(Value::Null) => {
                    if spec.required {
                        errors.push(RecordProblem::new(i, spec.name.clone(), "required field is missing"));
                    }
                }
                Some(value) => {
                    if !type_matches(value, spec.field_type) {
                        errors.push(RecordProblem::new(
                            i,
                            spec.name.clone(),
                            format!("expected {}, got {}", spec.field_type.name(), json_kind(value)),
                        ));
                    } else if spec.unique
                        && spec.name != schema.external_id_field
                        && let Some(first) = uniques.insert((spec.name.as_str(), unique_key(value)), i)
                    {
                        errors.push(RecordProblem::new(
                            i,
                            spec.name.clone(),
                            format!("value {value} is also in records[{first}]; it must be unique"),
                        ));
                    }
                }
            }
        }
        if let Some(id) = record_id(schema, record)
            && let Some(first) = ids.insert(id.clone(), i)
        {
            errors.push(RecordProblem::new(
                i,
                schema.external_id_field.clone(),
                format!("id {id:?} is also in records[{first}]; a request may name a record once"),
            ));
        }
    }
    errors
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "list",
        Value::Object(_) => "object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::FieldSpec;
    use serde_json::json;

    fn schema() -> ObjectSchema {
        ObjectSchema {
            name: "account".into(),
            external_id_field: "code".into(),
            fields: vec![
                FieldSpec { name: "code".into(), field_type: FieldType::String, required: true, unique: true },
                FieldSpec { name: "email".into(), field_type: FieldType::String, required: false, unique: true },
                FieldSpec { name: "amount".into(), field_type: FieldType::Integer, required: false, unique: false },
            ],
        }
    }

    fn fields(v: serde_json::Value) -> Fields {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn a_valid_schema_passes_and_bad_ones_list_every_problem() {
        assert!(validate_schema(&schema()).is_empty());
        let mut bad = schema();
        bad.name = "Account".into();
        bad.external_id_field = "amount".into();
        bad.fields.push(FieldSpec {
            name: "email".into(),
            field_type: FieldType::String,
            required: false,
            unique: false,
        });
        let errors = validate_schema(&bad);
        let paths: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(paths, ["schema.name", "schema.fields[3].name", "schema.external_id_field"]);
    }

    #[test]
    fn records_are_checked_for_type_required_unknown_and_duplicates() {
        let records = vec![
            fields(json!({"code": "a", "amount": 1})),
            fields(json!({"code": "b", "amount": "x", "colour": "red"})),
            fields(json!({"amount": 2})),
            fields(json!({"code": "a", "email": "e@x"})),
            fields(json!({"code": "c", "email": "e@x"})),
        ];
        let errors = validate_records(&schema(), &records);
        let got: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            got,
            ["records[1].colour", "records[1].amount", "records[2].code", "records[3].code", "records[4].email"]
        );
        assert_eq!(errors[1].description, "expected integer, got string");
    }

    #[test]
    fn identifiers_are_strict() {
        assert!(is_identifier("a_1"));
        assert!(!is_identifier("1a"));
        assert!(!is_identifier("a'; drop"));
        assert!(!is_identifier(&"a".repeat(64)));
    }
}
