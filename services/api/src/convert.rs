//! Conversions between protobuf messages and store types, at the gRPC edge.

use baton_mesh::proto::v1 as pb;
use baton_mesh::proto::{timestamp, unix_ms};
use baton_store::FieldError;
use baton_store::model::{ChangeEvent, ChangeOp, DECIMAL_TAG, FieldSpec, FieldType, Fields, ObjectSchema, Record};
use pb::value::Kind;
use serde_json::Value;

/// The fields of a protobuf message, keyed by field name.
pub type PbFields = std::collections::HashMap<String, pb::Value>;

/// A protobuf field value as JSON, in the form the store resolves by the field's type (see
/// `baton_store::schema::record_problems`): decimal text travels as a `{"$decimal": text}` object
/// until the schema says what it is. A non-finite double is an error at `path`.
fn value_to_json(value: &pb::Value, path: &str, errors: &mut Vec<FieldError>) -> Value {
    match &value.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BooleanValue(b)) => Value::Bool(*b),
        Some(Kind::StringValue(s)) => Value::String(s.clone()),
        Some(Kind::IntegerValue(n)) => Value::from(*n),
        Some(Kind::NumberValue(n)) => match serde_json::Number::from_f64(*n) {
            Some(number) => Value::Number(number),
            None => {
                errors.push(FieldError::new(path, "not a finite number"));
                Value::Null
            }
        },
        Some(Kind::DecimalValue(text)) => {
            Value::Object(serde_json::Map::from_iter([(DECIMAL_TAG.to_owned(), Value::String(text.clone()))]))
        }
    }
}

/// Protobuf fields as store fields, with `{path}.{name}` in errors.
fn fields_from_pb(fields: &PbFields, path: &str, errors: &mut Vec<FieldError>) -> Fields {
    fields.iter().map(|(k, v)| (k.clone(), value_to_json(v, &format!("{path}.{k}"), errors))).collect()
}

/// Request records as store fields; `records[i].fields.name` paths in errors.
pub fn records_from_pb(records: &[pb::RecordFields]) -> Result<Vec<Fields>, Vec<FieldError>> {
    let mut errors = Vec::new();
    let out = records
        .iter()
        .enumerate()
        .map(|(i, r)| fields_from_pb(&r.fields, &format!("records[{i}]"), &mut errors))
        .collect();
    if errors.is_empty() { Ok(out) } else { Err(errors) }
}

/// A stored value as the protobuf value of a field of `field_type` (by the JSON kind for a field
/// the schema does not have); null as none. Stored values are already exact in their type (see
/// `baton_store::model::Fields`), so this never rounds.
pub fn value_to_pb(value: &Value, field_type: Option<FieldType>) -> Option<pb::Value> {
    let kind = match (field_type, value) {
        (_, Value::Null) => return None,
        (Some(FieldType::Decimal), Value::String(s)) => Kind::DecimalValue(s.clone()),
        (Some(FieldType::Decimal), Value::Number(n)) => Kind::DecimalValue(n.to_string()),
        (Some(FieldType::Number), Value::Number(n)) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        (_, Value::Number(n)) => match n.as_i64() {
            Some(i) => Kind::IntegerValue(i),
            None => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        },
        (_, Value::Bool(b)) => Kind::BooleanValue(*b),
        (_, Value::String(s)) => Kind::StringValue(s.clone()),
        // stored records hold scalars only; anything else is shown as its JSON text
        (_, other) => Kind::StringValue(other.to_string()),
    };
    Some(pb::Value { kind: Some(kind) })
}

/// Stored fields as protobuf fields, each of its field's type in `schema`; null fields, and
/// fields `schema` has dropped (records written before the drop still hold them), are left out.
pub fn fields_to_pb(fields: &Fields, schema: &ObjectSchema) -> PbFields {
    fields
        .iter()
        .filter(|(k, _)| !schema.is_dropped(k))
        .filter_map(|(k, v)| Some((k.clone(), value_to_pb(v, schema.field(k).map(|f| f.field_type))?)))
        .collect()
}

/// A stored record of an object of `schema` as a protobuf Record.
pub fn record_to_pb(record: &Record, schema: &ObjectSchema) -> pb::Record {
    pb::Record {
        id: record.id.clone(),
        fields: fields_to_pb(&record.fields, schema),
        version: record.version,
        update_time: timestamp(record.updated_at_ms),
    }
}

/// A change-log entry as a protobuf Change; `schema` is the schema of its object.
pub fn change_to_pb(event: &ChangeEvent, schema: &ObjectSchema) -> pb::Change {
    pb::Change {
        seq: event.seq,
        object: event.object.clone(),
        record_id: event.record_id.clone(),
        op: match event.op {
            ChangeOp::Upsert => pb::ChangeOp::Upsert,
            ChangeOp::Delete => pb::ChangeOp::Delete,
        } as i32,
        fields: event.fields.as_ref().map(|f| fields_to_pb(f, schema)).unwrap_or_default(),
        version: event.version,
        commit_time: timestamp(event.committed_at_ms),
        schema_version: schema.version,
    }
}

/// A snapshot row as a protobuf Change (seq 0), as a link sends it: an upsert, or a delete at the
/// tombstone's version when `deleted`.
pub fn snapshot_row_to_pb(record: &Record, deleted: bool, schema: &ObjectSchema) -> pb::Change {
    pb::Change {
        seq: 0,
        object: schema.name.clone(),
        record_id: record.id.clone(),
        op: if deleted { pb::ChangeOp::Delete } else { pb::ChangeOp::Upsert } as i32,
        fields: if deleted { Default::default() } else { fields_to_pb(&record.fields, schema) },
        version: record.version,
        commit_time: timestamp(record.updated_at_ms),
        schema_version: schema.version,
    }
}

/// Protobuf fields as display JSON, for tools: integers as JSON integers (exact: serde_json keeps
/// 64-bit integers), doubles as JSON numbers, decimals as JSON strings of their text, so that no
/// JSON reader rounds them.
pub fn pb_fields_to_json(fields: &PbFields) -> serde_json::Map<String, Value> {
    fields
        .iter()
        .map(|(k, v)| {
            let value = match &v.kind {
                None | Some(Kind::NullValue(_)) => Value::Null,
                Some(Kind::BooleanValue(b)) => Value::Bool(*b),
                Some(Kind::StringValue(s) | Kind::DecimalValue(s)) => Value::String(s.clone()),
                Some(Kind::IntegerValue(n)) => Value::from(*n),
                Some(Kind::NumberValue(n)) => serde_json::Number::from_f64(*n).map_or(Value::Null, Value::Number),
            };
            (k.clone(), value)
        })
        .collect()
}

/// A record given as JSON (by a tool such as the CLI) as protobuf fields, exactly: a JSON integer
/// is an `integer_value` (one beyond the signed 64-bit range travels as `decimal_value` text,
/// which the server refuses for an integer field with a precise reason rather than rounding it),
/// any other number a `number_value`, and a string a `string_value` (which a decimal field also
/// takes). A list or an object is no field value: an error naming the field.
pub fn json_to_pb(fields: &serde_json::Map<String, Value>) -> Result<pb::RecordFields, String> {
    let mut out = PbFields::with_capacity(fields.len());
    for (name, value) in fields {
        let kind = match value {
            Value::Null => Kind::NullValue(0),
            Value::Bool(b) => Kind::BooleanValue(*b),
            Value::String(s) => Kind::StringValue(s.clone()),
            Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
                (Some(i), _, _) => Kind::IntegerValue(i),
                (None, Some(_), _) => Kind::DecimalValue(n.to_string()),
                (_, _, Some(f)) => Kind::NumberValue(f),
                _ => return Err(format!("field {name:?}: {n} is not a number baton can hold")),
            },
            Value::Array(_) | Value::Object(_) => {
                return Err(format!("field {name:?}: a field value is a string, number, boolean or null, not {value}"));
            }
        };
        out.insert(name.clone(), pb::Value { kind: Some(kind) });
    }
    Ok(pb::RecordFields { fields: out })
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
        let fields = match op {
            ChangeOp::Upsert => Some(fields_from_pb(&c.fields, &format!("changes[{i}].fields"), &mut errors)),
            ChangeOp::Delete => None,
        };
        out.push(ChangeEvent {
            seq: c.seq,
            object: c.object.clone(),
            record_id: c.record_id.clone(),
            op,
            fields,
            version: c.version,
            committed_at_ms: unix_ms(c.commit_time.as_ref()),
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
                Ok(pb::FieldType::Decimal) => FieldType::Decimal,
                Ok(pb::FieldType::Unspecified) | Err(_) => {
                    errors.push(FieldError::new(
                        format!("schema.fields[{i}].type"),
                        "set a type: FIELD_TYPE_STRING, FIELD_TYPE_INTEGER, FIELD_TYPE_NUMBER, FIELD_TYPE_BOOLEAN \
                         or FIELD_TYPE_DECIMAL",
                    ));
                    return None;
                }
            };
            Some(FieldSpec {
                name: f.name.clone(),
                field_type,
                required: f.required,
                unique: f.unique,
                deprecated: f.deprecated,
            })
        })
        .collect();
    if errors.is_empty() {
        // `version` and `dropped_fields` are the store's to set: ignored in a request
        Ok(ObjectSchema {
            name: schema.name.clone(),
            external_id_field: schema.external_id_field.clone(),
            fields,
            dropped_fields: vec![],
            version: 0,
        })
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
                    FieldType::Decimal => pb::FieldType::Decimal,
                } as i32,
                required: f.required,
                unique: f.unique,
                deprecated: f.deprecated,
            })
            .collect(),
        version: schema.version,
        dropped_fields: schema.dropped_fields.clone(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn v(kind: Kind) -> pb::Value {
        pb::Value { kind: Some(kind) }
    }

    /// An object `t` with a field of each type: `code` (string, the external id), `n`
    /// (integer), `x` (number), `d` (decimal), `b` (boolean).
    pub(crate) fn schema() -> ObjectSchema {
        let f = |name: &str, field_type| FieldSpec {
            name: name.into(),
            field_type,
            required: false,
            unique: false,
            deprecated: false,
        };
        ObjectSchema {
            name: "t".into(),
            external_id_field: "code".into(),
            fields: vec![
                f("code", FieldType::String),
                f("n", FieldType::Integer),
                f("x", FieldType::Number),
                f("d", FieldType::Decimal),
                f("b", FieldType::Boolean),
            ],
            dropped_fields: vec![],
            version: 1,
        }
    }

    #[test]
    fn values_travel_exactly_and_non_finite_doubles_are_errors() {
        let record = pb::RecordFields {
            fields: [
                ("code".to_owned(), v(Kind::StringValue("a".into()))),
                ("n".to_owned(), v(Kind::IntegerValue(9_007_199_254_740_993))),
                ("x".to_owned(), v(Kind::NumberValue(2.5))),
                ("d".to_owned(), v(Kind::DecimalValue("12.50".into()))),
                ("b".to_owned(), v(Kind::BooleanValue(true))),
                ("gone".to_owned(), v(Kind::NullValue(0))),
                ("bad".to_owned(), v(Kind::NumberValue(f64::NAN))),
            ]
            .into(),
        };
        let errors = records_from_pb(std::slice::from_ref(&record)).unwrap_err();
        assert_eq!(errors, vec![FieldError::new("records[0].bad", "not a finite number")]);
        let mut record = record;
        record.fields.remove("bad");
        let fields = &records_from_pb(&[record]).unwrap()[0];
        assert_eq!(fields["n"], serde_json::json!(9_007_199_254_740_993_i64));
        assert_eq!(fields["d"], serde_json::json!({"$decimal": "12.50"}));
        assert_eq!(fields["gone"], Value::Null);

        // stored (the store canonicalizes the decimal), then answered in each field's type
        let mut stored = fields.clone();
        stored.insert("d".into(), "12.5".into());
        stored.insert("x".into(), serde_json::json!(3));
        let back = fields_to_pb(&stored, &schema());
        assert_eq!(back["n"], v(Kind::IntegerValue(9_007_199_254_740_993)));
        assert_eq!(back["x"], v(Kind::NumberValue(3.0)), "a number field answers a double");
        assert_eq!(back["d"], v(Kind::DecimalValue("12.5".into())));
        assert!(!back.contains_key("gone"), "null fields are left out");
        let json = pb_fields_to_json(&back);
        assert_eq!(
            serde_json::Value::Object(json).to_string(),
            r#"{"b":true,"code":"a","d":"12.5","n":9007199254740993,"x":3.0}"#
        );
    }

    #[test]
    fn a_change_round_trips_exactly() {
        let fields: Fields =
            serde_json::from_str(r#"{"code": "a1", "n": 12345678901234567, "x": 0.1, "d": "-7.25"}"#).unwrap();
        let event = ChangeEvent {
            seq: 7,
            object: "t".into(),
            record_id: "a1".into(),
            op: ChangeOp::Upsert,
            fields: Some(fields),
            version: 3,
            committed_at_ms: 99,
        };
        let pb = change_to_pb(&event, &schema());
        assert_eq!(pb.fields["d"], v(Kind::DecimalValue("-7.25".into())));
        let back = changes_from_pb(std::slice::from_ref(&pb)).unwrap();
        let back = back[0].fields.as_ref().unwrap();
        // a 17-digit integer survives, which a double would not
        assert_eq!(back["n"], serde_json::json!(12_345_678_901_234_567_i64));
        assert_eq!(back["d"], serde_json::json!({"$decimal": "-7.25"}), "resolved by the target's schema");

        let delete = pb::Change { op: pb::ChangeOp::Delete as i32, ..pb.clone() };
        assert_eq!(changes_from_pb(&[delete]).unwrap()[0].fields, None);
        let bad = pb::Change { op: 0, ..pb };
        assert_eq!(changes_from_pb(&[bad]).unwrap_err()[0].field, "changes[0].op");
    }
}
