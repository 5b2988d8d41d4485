//! Conversions between protobuf messages and store types, at the gRPC edge.

use baton_mesh::proto::v1 as pb;
use baton_store::FieldError;
use baton_store::model::{ChangeEvent, ChangeOp, FieldSpec, FieldType, Fields, ObjectSchema, Record};
use prost_types::value::Kind;
use serde_json::Value;

/// Integers up to 2^53 survive a trip through a protobuf double exactly.
const MAX_SAFE_INTEGER: f64 = 9_007_199_254_740_992.0;

/// A protobuf Value as JSON. Whole numbers within ±2^53 become integers.
fn value_to_json(value: &prost_types::Value, path: &str, errors: &mut Vec<FieldError>) -> Value {
    match &value.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(*b),
        Some(Kind::StringValue(s)) => Value::String(s.clone()),
        Some(Kind::NumberValue(n)) => {
            if n.fract() == 0.0 && n.abs() <= MAX_SAFE_INTEGER {
                Value::from(*n as i64)
            } else if let Some(number) = serde_json::Number::from_f64(*n) {
                Value::Number(number)
            } else {
                errors.push(FieldError::new(path, "not a finite number"));
                Value::Null
            }
        }
        Some(Kind::StructValue(s)) => Value::Object(
            s.fields.iter().map(|(k, v)| (k.clone(), value_to_json(v, &format!("{path}.{k}"), errors))).collect(),
        ),
        Some(Kind::ListValue(l)) => Value::Array(
            l.values.iter().enumerate().map(|(i, v)| value_to_json(v, &format!("{path}[{i}]"), errors)).collect(),
        ),
    }
}

/// A protobuf Struct as JSON, as the edge reads it (whole numbers become integers); a value JSON
/// cannot hold (a non-finite number) becomes null. For display, where nothing is validated.
pub fn struct_to_json(s: &prost_types::Struct) -> serde_json::Value {
    let mut ignored = Vec::new();
    serde_json::Value::Object(s.fields.iter().map(|(k, v)| (k.clone(), value_to_json(v, k, &mut ignored))).collect())
}

/// Request records as store fields; `records[i].field` paths in errors.
pub fn records_from_pb(records: &[prost_types::Struct]) -> Result<Vec<Fields>, Vec<FieldError>> {
    let mut errors = Vec::new();
    let out = records
        .iter()
        .enumerate()
        .map(|(i, r)| {
            r.fields
                .iter()
                .map(|(k, v)| (k.clone(), value_to_json(v, &format!("records[{i}].{k}"), &mut errors)))
                .collect()
        })
        .collect();
    if errors.is_empty() { Ok(out) } else { Err(errors) }
}

fn json_to_value(value: &Value) -> prost_types::Value {
    let kind = match value {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(a) => Kind::ListValue(prost_types::ListValue { values: a.iter().map(json_to_value).collect() }),
        Value::Object(o) => Kind::StructValue(fields_to_pb(o)),
    };
    prost_types::Value { kind: Some(kind) }
}

/// Store fields as a protobuf Struct.
pub fn fields_to_pb(fields: &Fields) -> prost_types::Struct {
    prost_types::Struct { fields: fields.iter().map(|(k, v)| (k.clone(), json_to_value(v))).collect() }
}

/// A stored record as a protobuf Record.
pub fn record_to_pb(record: &Record) -> pb::Record {
    pb::Record {
        id: record.id.clone(),
        fields: Some(fields_to_pb(&record.fields)),
        version: record.version,
        updated_at_ms: record.updated_at_ms,
    }
}

/// A change-log entry as a protobuf Change.
pub fn change_to_pb(event: &ChangeEvent) -> pb::Change {
    pb::Change { fields: event.fields.as_ref().map(fields_to_pb), ..change_without_fields(event) }
}

/// A change event as a protobuf Change with its fields as JSON text (`fields_json`), as a link
/// sends it.
pub fn change_to_pb_json(event: &ChangeEvent) -> pb::Change {
    pb::Change {
        fields_json: event.fields.as_ref().map(fields_json).unwrap_or_default(),
        ..change_without_fields(event)
    }
}

fn change_without_fields(event: &ChangeEvent) -> pb::Change {
    pb::Change {
        seq: event.seq,
        object: event.object.clone(),
        record_id: event.record_id.clone(),
        op: match event.op {
            ChangeOp::Upsert => pb::ChangeOp::Upsert,
            ChangeOp::Delete => pb::ChangeOp::Delete,
        } as i32,
        fields: None,
        version: event.version,
        committed_at_ms: event.committed_at_ms,
        fields_json: String::new(),
    }
}

fn fields_json(fields: &Fields) -> String {
    serde_json::to_string(fields).unwrap_or_else(|_| "{}".to_owned())
}

/// A snapshot row as a protobuf upsert Change (seq 0), its fields as JSON text, as a link sends
/// it.
pub fn snapshot_row_to_pb(object: &str, record: &Record) -> pb::Change {
    pb::Change {
        seq: 0,
        object: object.to_owned(),
        record_id: record.id.clone(),
        op: pb::ChangeOp::Upsert as i32,
        fields: None,
        version: record.version,
        committed_at_ms: record.updated_at_ms,
        fields_json: fields_json(&record.fields),
    }
}

/// Replicated protobuf changes as store changes; `changes[i]` paths in errors.
pub fn changes_from_pb(changes: &[pb::Change]) -> Result<Vec<ChangeEvent>, Vec<FieldError>> {
    let mut errors = Vec::new();
    let mut out = Vec::with_capacity(changes.len());
    for (i, c) in changes.iter().enumerate() {
        let op = match pb::ChangeOp::try_from(c.op) {
            Ok(pb::ChangeOp::Upsert) => ChangeOp::Upsert,
            Ok(pb::ChangeOp::Delete) => ChangeOp::Delete,
            _ => {
                errors.push(FieldError::new(format!("changes[{i}].op"), "set CHANGE_OP_UPSERT or CHANGE_OP_DELETE"));
                continue;
            }
        };
        if c.record_id.is_empty() || c.object.is_empty() {
            errors.push(FieldError::new(format!("changes[{i}]"), "object and record_id are required"));
            continue;
        }
        if c.version < 1 {
            errors.push(FieldError::new(format!("changes[{i}].version"), "a version is at least 1"));
            continue;
        }
        let fields = match (&c.fields, c.fields_json.as_str()) {
            (Some(_), json) if !json.is_empty() => {
                errors.push(FieldError::new(format!("changes[{i}]"), "set fields or fields_json, not both"));
                continue;
            }
            (Some(f), _) => Some(
                f.fields
                    .iter()
                    .map(|(k, v)| (k.clone(), value_to_json(v, &format!("changes[{i}].fields.{k}"), &mut errors)))
                    .collect(),
            ),
            (None, "") => None,
            (None, json) => match serde_json::from_str::<Fields>(json) {
                Ok(fields) => Some(fields),
                Err(e) => {
                    errors
                        .push(FieldError::new(format!("changes[{i}].fields_json"), format!("not a JSON object: {e}")));
                    continue;
                }
            },
        };
        out.push(ChangeEvent {
            seq: c.seq,
            object: c.object.clone(),
            record_id: c.record_id.clone(),
            op,
            fields,
            version: c.version,
            committed_at_ms: c.committed_at_ms,
        });
    }
    if errors.is_empty() { Ok(out) } else { Err(errors) }
}

/// A protobuf schema as a store schema. An unset or unknown type is an error.
pub fn schema_from_pb(schema: &pb::ObjectSchema) -> Result<ObjectSchema, Vec<FieldError>> {
    let mut errors = Vec::new();
    let fields = schema
        .fields
        .iter()
        .enumerate()
        .filter_map(|(i, f)| {
            let field_type = match pb::FieldType::try_from(f.r#type) {
                Ok(pb::FieldType::String) => FieldType::String,
                Ok(pb::FieldType::Integer) => FieldType::Integer,
                Ok(pb::FieldType::Number) => FieldType::Number,
                Ok(pb::FieldType::Boolean) => FieldType::Boolean,
                Ok(pb::FieldType::Unspecified) | Err(_) => {
                    errors.push(FieldError::new(
                        format!("schema.fields[{i}].type"),
                        "set a type: FIELD_TYPE_STRING, FIELD_TYPE_INTEGER, FIELD_TYPE_NUMBER or FIELD_TYPE_BOOLEAN",
                    ));
                    return None;
                }
            };
            Some(FieldSpec { name: f.name.clone(), field_type, required: f.required, unique: f.unique })
        })
        .collect();
    if errors.is_empty() {
        Ok(ObjectSchema { name: schema.name.clone(), external_id_field: schema.external_id_field.clone(), fields })
    } else {
        Err(errors)
    }
}

/// A store schema as a protobuf schema.
pub fn schema_to_pb(schema: &ObjectSchema) -> pb::ObjectSchema {
    pb::ObjectSchema {
        name: schema.name.clone(),
        external_id_field: schema.external_id_field.clone(),
        fields: schema
            .fields
            .iter()
            .map(|f| pb::FieldSpec {
                name: f.name.clone(),
                r#type: match f.field_type {
                    FieldType::String => pb::FieldType::String,
                    FieldType::Integer => pb::FieldType::Integer,
                    FieldType::Number => pb::FieldType::Number,
                    FieldType::Boolean => pb::FieldType::Boolean,
                } as i32,
                required: f.required,
                unique: f.unique,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn num(n: f64) -> prost_types::Value {
        prost_types::Value { kind: Some(Kind::NumberValue(n)) }
    }

    #[test]
    fn whole_numbers_become_integers_and_non_finite_ones_are_errors() {
        let record = prost_types::Struct {
            fields: [("a".to_owned(), num(42.0)), ("b".to_owned(), num(2.5)), ("c".to_owned(), num(f64::NAN))].into(),
        };
        let errors = records_from_pb(std::slice::from_ref(&record)).unwrap_err();
        assert_eq!(errors, vec![FieldError::new("records[0].c", "not a finite number")]);
        let mut record = record;
        record.fields.remove("c");
        let fields = &records_from_pb(&[record]).unwrap()[0];
        assert!(fields["a"].is_i64());
        assert_eq!(fields["b"].as_f64(), Some(2.5));
        let back = fields_to_pb(fields);
        assert_eq!(back.fields["a"], num(42.0));
    }

    #[test]
    fn a_change_carries_its_fields_as_json_text_or_as_a_struct_not_both() {
        let fields: Fields =
            serde_json::from_str(r#"{"code": "a1", "amount": 12345678901234567, "score": 0.1}"#).unwrap();
        let event = ChangeEvent {
            seq: 7,
            object: "account".into(),
            record_id: "a1".into(),
            op: ChangeOp::Upsert,
            fields: Some(fields.clone()),
            version: 3,
            committed_at_ms: 99,
        };
        let json = change_to_pb_json(&event);
        assert!(json.fields.is_none() && !json.fields_json.is_empty());
        // exact through JSON text: a 17-digit integer survives, which a Struct's double would not
        assert_eq!(changes_from_pb(std::slice::from_ref(&json)).unwrap(), vec![event.clone()]);
        assert_eq!(changes_from_pb(&[change_to_pb(&event)]).unwrap()[0].fields.as_ref().unwrap()["code"], "a1");

        let both = pb::Change { fields: change_to_pb(&event).fields, ..json.clone() };
        let bad = pb::Change { fields_json: "[1, 2]".into(), ..json.clone() };
        let errors = changes_from_pb(&[json, both, bad]).unwrap_err();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert_eq!((errors[0].field.as_str(), errors[1].field.as_str()), ("changes[1]", "changes[2].fields_json"));
    }
}
