//! Validation of object schemas and of records against them. Pure: no I/O.

use std::collections::{HashMap, HashSet};

use serde_json::Value;

use crate::model::{DECIMAL_TAG, FieldSpec, FieldType, Fields, ObjectSchema};

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
        if f.deprecated && f.required {
            errors.push(FieldError::new(
                format!("schema.fields[{i}].deprecated"),
                "a deprecated field cannot be required: relax `required` in the same change",
            ));
        }
        if f.deprecated && f.name == schema.external_id_field {
            errors.push(FieldError::new(
                format!("schema.fields[{i}].deprecated"),
                "the external-id field cannot be deprecated",
            ));
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

/// The schema that `next` makes of `current` as a compatible change: `Ok(None)` when it changes
/// nothing, `Ok(Some(schema))` with the version after `current`'s and the dropped fields updated,
/// or every incompatible change, with the path of each in `next`. `next` must pass
/// [`validate_schema`]; its own `version` and `dropped_fields` are ignored (they are the store's).
///
/// Compatible: a new optional field; `required` relaxed; a field deprecated (or deprecated no
/// longer); a field deprecated in an earlier version left out (dropped). Anything else could make
/// a stored record invalid, or change what a name means, and is refused: a type change, a new
/// required field, an existing field made required, `unique` changed, a field left out that
/// was not deprecated first (a rename is that, plus a new field), a dropped name used again, and
/// another external-id field.
pub fn schema_change(current: &ObjectSchema, next: &ObjectSchema) -> Result<Option<ObjectSchema>, Vec<FieldError>> {
    let mut problems = Vec::new();
    if next.external_id_field != current.external_id_field {
        problems.push(FieldError::new(
            "schema.external_id_field",
            format!(
                "the external-id field cannot change (from {:?} to {:?}): records are identified by it",
                current.external_id_field, next.external_id_field
            ),
        ));
    }
    for (i, new) in next.fields.iter().enumerate() {
        problems.extend(field_change_problems(current, i, new));
    }
    let dropped_fields = dropped_fields(current, next, &mut problems);
    if !problems.is_empty() {
        return Err(problems);
    }
    if next.fields == current.fields {
        return Ok(None);
    }
    Ok(Some(ObjectSchema {
        name: current.name.clone(),
        external_id_field: current.external_id_field.clone(),
        fields: next.fields.clone(),
        dropped_fields,
        version: current.version + 1,
    }))
}

/// The incompatible changes [`schema_change`] finds in field `i` of the next schema, `new`,
/// against `current`: a type change, `required` or `unique` made stricter (or `unique` relaxed)
/// on an existing field; a dropped name used again; a new field that is required.
fn field_change_problems(current: &ObjectSchema, i: usize, new: &FieldSpec) -> Vec<FieldError> {
    let mut problems = Vec::new();
    let at = |what: &str| format!("schema.fields[{i}].{what}");
    let name = &new.name;
    match current.field(name) {
        Some(old) => {
            if old.field_type != new.field_type {
                problems.push(FieldError::new(
                    at("type"),
                    format!(
                        "field {name:?} cannot change type (from {} to {}): stored values are of the old type",
                        old.field_type.name(),
                        new.field_type.name()
                    ),
                ));
            }
            if new.required && !old.required {
                problems.push(FieldError::new(
                    at("required"),
                    format!("field {name:?} cannot become required: stored records may lack it"),
                ));
            }
            if new.unique != old.unique {
                let why = if new.unique {
                    "cannot become unique: stored records may share values"
                } else {
                    "cannot stop being unique: uniqueness is fixed when a field is added"
                };
                problems.push(FieldError::new(at("unique"), format!("field {name:?} {why}")));
            }
        }
        None if current.is_dropped(name) => problems.push(FieldError::new(
            at("name"),
            format!(
                "field {name:?} was dropped by an earlier version; a dropped name is not used again \
                 (records written before the drop still hold its old values)"
            ),
        )),
        None if new.required => problems.push(FieldError::new(
            at("required"),
            format!("new field {name:?} cannot be required: stored records lack it; add it optional"),
        )),
        None => {}
    }
    problems
}

/// The dropped fields after [`schema_change`] to `next`: `current`'s, and the fields of `current`
/// that `next` leaves out when they are deprecated; one left out that is not deprecated is added
/// to `problems`.
fn dropped_fields(current: &ObjectSchema, next: &ObjectSchema, problems: &mut Vec<FieldError>) -> Vec<String> {
    let mut dropped_fields = current.dropped_fields.clone();
    for old in &current.fields {
        if next.field(&old.name).is_some() {
            continue;
        }
        if old.deprecated {
            dropped_fields.push(old.name.clone());
        } else {
            problems.push(FieldError::new(
                "schema.fields",
                format!(
                    "field {:?} is left out but not deprecated: deprecate it in one version, drop it in a later \
                     one (a rename is a new field and a deprecated old one)",
                    old.name
                ),
            ));
        }
    }
    dropped_fields
}

/// The most digits (before and after the point, leading and trailing zeros left out) a decimal may
/// have: what PostgreSQL's `numeric(38, s)`, Java's `BigDecimal` and .NET's `decimal` all hold.
pub const MAX_DECIMAL_DIGITS: usize = 38;

/// The largest magnitude up to which a double holds every integer exactly: 2^53.
const MAX_EXACT_DOUBLE: u64 = 1 << 53;

/// Decimal text in canonical form: an optional `-`, the integer digits without leading zeros (`0`
/// when none), and the fraction digits without trailing zeros after a `.` (none when the fraction
/// is zero); `-0` is `0`. Two decimals are equal exactly when their canonical texts are, which is
/// what unique values and filters compare.
///
/// Hand-written rather than a decimal crate: the store never does arithmetic on decimals, it
/// only checks and canonicalizes their text, which is a dozen lines.
pub fn canonical_decimal(text: &str) -> Result<String, String> {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (int, frac) = match digits.split_once('.') {
        Some((int, frac)) => (int, Some(frac)),
        None => (digits, None),
    };
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(int) || frac.is_some_and(|f| !all_digits(f)) {
        return Err(format!("{text:?} is not decimal text (digits, an optional `-` and `.`, no exponent)"));
    }
    let int = int.trim_start_matches('0');
    let frac = frac.unwrap_or("").trim_end_matches('0');
    if int.len() + frac.len() > MAX_DECIMAL_DIGITS {
        return Err(format!("{text:?} has more than {MAX_DECIMAL_DIGITS} digits"));
    }
    let mut out = String::with_capacity(int.len() + frac.len() + 3);
    if negative && !(int.is_empty() && frac.is_empty()) {
        out.push('-');
    }
    out.push_str(if int.is_empty() { "0" } else { int });
    if !frac.is_empty() {
        out.push('.');
        out.push_str(frac);
    }
    Ok(out)
}

/// The text of a `{"$decimal": text}` value, as a client's `decimal_value` arrives.
fn decimal_tag(value: &Value) -> Option<&str> {
    match value {
        Value::Object(o) if o.len() == 1 => o.get(DECIMAL_TAG)?.as_str(),
        _ => None,
    }
}

/// Turns a value as a client sent it into the stored form of `field_type`, where that is exact:
/// decimal text into an integer, a double or canonical decimal text; a whole double within ±2^53
/// into an integer; an integer into decimal text. A value that would be rounded, or is out of
/// its type's range, is an error. Values of another kind are left for the type check.
fn resolve(value: &mut Value, field_type: FieldType) -> Result<(), String> {
    if let Some(text) = decimal_tag(value) {
        *value = match field_type {
            FieldType::Decimal => Value::String(canonical_decimal(text)?),
            FieldType::Integer => {
                let canonical = canonical_decimal(text)?;
                if canonical.contains('.') {
                    return Err(format!("{text} is not a whole number"));
                }
                let n: i64 =
                    canonical.parse().map_err(|_| format!("{text} is outside the signed 64-bit integer range"))?;
                Value::from(n)
            }
            FieldType::Number => {
                canonical_decimal(text)?;
                // Rust's parse rounds to the nearest double, as a JSON number is read
                let n: f64 = text.parse().map_err(|_| format!("{text:?} is not a number"))?;
                Value::from(serde_json::Number::from_f64(n).ok_or_else(|| format!("{text} is not a finite double"))?)
            }
            other => return Err(format!("expected {}, got decimal", other.name())),
        };
        return Ok(());
    }
    let Value::Number(n) = value else {
        if let (FieldType::Decimal, Value::String(text)) = (field_type, &*value) {
            *value = Value::String(canonical_decimal(text)?);
        }
        return Ok(());
    };
    match field_type {
        FieldType::Integer if !n.is_i64() => {
            if n.is_u64() {
                return Err(format!("{n} is outside the signed 64-bit integer range"));
            }
            match n.as_f64() {
                Some(f) if f.fract() == 0.0 && f.abs() <= MAX_EXACT_DOUBLE as f64 => *value = Value::from(f as i64),
                _ => {}
            }
        }
        FieldType::Number => {
            let beyond = match (n.as_i64(), n.as_u64()) {
                (Some(i), _) => i.unsigned_abs() > MAX_EXACT_DOUBLE,
                (None, Some(u)) => u > MAX_EXACT_DOUBLE,
                _ => false,
            };
            if beyond {
                return Err(format!(
                    "{n} is beyond ±2^53, so a number field (a double) cannot hold it exactly: \
                     use an integer or decimal field"
                ));
            }
        }
        FieldType::Decimal if n.is_i64() || n.is_u64() => *value = Value::String(n.to_string()),
        FieldType::Decimal => {
            return Err(format!(
                "expected decimal, got number {n}: a double cannot carry a decimal exactly; send decimal text"
            ));
        }
        _ => {}
    }
    Ok(())
}

/// Checks one value, as [`resolve`] left it, against a type.
fn type_matches(value: &Value, field_type: FieldType) -> bool {
    match field_type {
        FieldType::String => value.is_string(),
        FieldType::Integer => value.is_i64(),
        FieldType::Number => value.is_number(),
        FieldType::Boolean => value.is_boolean(),
        FieldType::Decimal => value.is_string(),
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
/// record's index in the request. Values are first put in their stored form (see [`resolve`]).
pub fn validate_records(schema: &ObjectSchema, records: &mut [Fields]) -> Vec<FieldError> {
    record_problems(schema, records).iter().map(RecordProblem::to_field_error).collect()
}

/// What [`validate_records`] checks, as problems by record index.
pub fn record_problems(schema: &ObjectSchema, records: &mut [Fields]) -> Vec<RecordProblem> {
    let mut errors = Vec::new();
    let mut ids: HashMap<String, usize> = HashMap::new();
    let mut uniques: HashMap<(&str, String), usize> = HashMap::new();
    for (i, record) in records.iter_mut().enumerate() {
        for name in record.keys() {
            if schema.field(name).is_none() {
                let dropped = if schema.is_dropped(name) { " (dropped by an earlier schema version)" } else { "" };
                errors.push(RecordProblem::new(
                    i,
                    name.clone(),
                    format!("unknown field of object {}{dropped}", schema.name),
                ));
            }
        }
        for spec in &schema.fields {
            match record.get_mut(&spec.name) {
                None | Some(Value::Null) => {
                    if spec.required {
                        errors.push(RecordProblem::new(i, spec.name.clone(), "required field is missing"));
                    }
                }
                Some(value) => {
                    if let Err(reason) = resolve(value, spec.field_type) {
                        errors.push(RecordProblem::new(i, spec.name.clone(), reason));
                    } else if !type_matches(value, spec.field_type) {
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
        Value::Object(_) if decimal_tag(value).is_some() => "decimal",
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
                FieldSpec {
                    name: "code".into(),
                    field_type: FieldType::String,
                    required: true,
                    unique: true,
                    deprecated: false,
                },
                FieldSpec {
                    name: "email".into(),
                    field_type: FieldType::String,
                    required: false,
                    unique: true,
                    deprecated: false,
                },
                FieldSpec {
                    name: "amount".into(),
                    field_type: FieldType::Integer,
                    required: false,
                    unique: false,
                    deprecated: false,
                },
            ],
            dropped_fields: vec![],
            version: 1,
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
            deprecated: false,
        });
        let errors = validate_schema(&bad);
        let paths: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(paths, ["schema.name", "schema.fields[3].name", "schema.external_id_field"]);
    }

    #[test]
    fn records_are_checked_for_type_required_unknown_and_duplicates() {
        let mut records = vec![
            fields(json!({"code": "a", "amount": 1})),
            fields(json!({"code": "b", "amount": "x", "colour": "red"})),
            fields(json!({"amount": 2})),
            fields(json!({"code": "a", "email": "e@x"})),
            fields(json!({"code": "c", "email": "e@x"})),
        ];
        let errors = validate_records(&schema(), &mut records);
        let got: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            got,
            ["records[1].colour", "records[1].amount", "records[2].code", "records[3].code", "records[4].email"]
        );
        assert_eq!(errors[1].description, "expected integer, got string");
    }

    #[test]
    fn decimals_are_checked_and_canonical() {
        assert_eq!(canonical_decimal("0012.3400").unwrap(), "12.34");
        assert_eq!(canonical_decimal("-0.000").unwrap(), "0");
        assert_eq!(canonical_decimal("-0.5").unwrap(), "-0.5");
        assert_eq!(
            canonical_decimal("7.").unwrap_err(),
            "\"7.\" is not decimal text (digits, an optional `-` and `.`, no exponent)"
        );
        for bad in ["", "-", ".5", "1e5", "+1", " 1", "1_000", "0x10", "NaN"] {
            assert!(canonical_decimal(bad).is_err(), "{bad:?} accepted");
        }
        let digits38 = "9".repeat(38);
        assert_eq!(canonical_decimal(&format!("{digits38}.000")).unwrap(), digits38);
        assert!(canonical_decimal(&format!("{digits38}.1")).unwrap_err().contains("more than 38 digits"));
    }

    /// A schema with a field of each numeric type: `n` integer, `x` number, `d` decimal (unique),
    /// identified by the string `code`.
    fn numeric_schema() -> ObjectSchema {
        ObjectSchema {
            name: "t".into(),
            external_id_field: "code".into(),
            fields: vec![
                FieldSpec {
                    name: "code".into(),
                    field_type: FieldType::String,
                    required: true,
                    unique: true,
                    deprecated: false,
                },
                FieldSpec {
                    name: "n".into(),
                    field_type: FieldType::Integer,
                    required: false,
                    unique: false,
                    deprecated: false,
                },
                FieldSpec {
                    name: "x".into(),
                    field_type: FieldType::Number,
                    required: false,
                    unique: false,
                    deprecated: false,
                },
                FieldSpec {
                    name: "d".into(),
                    field_type: FieldType::Decimal,
                    required: false,
                    unique: true,
                    deprecated: false,
                },
            ],
            dropped_fields: vec![],
            version: 1,
        }
    }

    #[test]
    fn values_become_their_field_type_exactly_or_not_at_all() {
        let schema = numeric_schema();
        let tag = |t: &str| json!({ DECIMAL_TAG: t });
        let mut good = vec![
            fields(
                json!({"code": "a", "n": 9_007_199_254_740_993_i64, "x": 9_007_199_254_740_992_i64, "d": tag("012.50")}),
            ),
            fields(json!({"code": "b", "n": tag("-9223372036854775808"), "x": tag("0.1"), "d": 12})),
            fields(json!({"code": "c", "n": 5.0, "d": "-0.00"})),
        ];
        assert_eq!(validate_records(&schema, &mut good), []);
        assert_eq!(good[0]["n"], json!(9_007_199_254_740_993_i64), "an integer past 2^53 is kept exactly");
        assert_eq!(good[0]["d"], json!("12.5"));
        assert_eq!(good[1]["n"], json!(i64::MIN));
        assert_eq!(good[1]["x"], json!(0.1));
        assert_eq!(good[1]["d"], json!("12"));
        assert_eq!(good[2]["n"], json!(5), "a whole double within 2^53 is an integer");
        assert_eq!(good[2]["d"], json!("0"));

        let mut bad = vec![
            fields(json!({"code": "a", "n": 9_300_000_000_000_000_000_u64})),
            fields(json!({"code": "b", "n": tag("9223372036854775808")})),
            fields(json!({"code": "c", "n": tag("1.5"), "x": 9_007_199_254_740_993_i64})),
            fields(json!({"code": "d", "n": 5.5, "d": 1.25})),
            fields(json!({"code": tag("1"), "d": "1e3"})),
            fields(json!({"code": "f", "d": tag("12.50")})),
            fields(json!({"code": "g", "d": "12.5"})),
        ];
        let errors = validate_records(&schema, &mut bad);
        let got: Vec<_> = errors.iter().map(|e| (e.field.as_str(), e.description.as_str())).collect();
        assert_eq!(
            got,
            [
                ("records[0].n", "9300000000000000000 is outside the signed 64-bit integer range"),
                ("records[1].n", "9223372036854775808 is outside the signed 64-bit integer range"),
                ("records[2].n", "1.5 is not a whole number"),
                (
                    "records[2].x",
                    "9007199254740993 is beyond ±2^53, so a number field (a double) cannot hold it exactly: use an \
                     integer or decimal field"
                ),
                ("records[3].n", "expected integer, got number"),
                (
                    "records[3].d",
                    "expected decimal, got number 1.25: a double cannot carry a decimal exactly; send decimal text"
                ),
                ("records[4].code", "expected string, got decimal"),
                ("records[4].d", "\"1e3\" is not decimal text (digits, an optional `-` and `.`, no exponent)"),
                ("records[6].d", "value \"12.5\" is also in records[5]; it must be unique"),
            ]
        );
    }

    #[test]
    fn identifiers_are_strict() {
        assert!(is_identifier("a_1"));
        assert!(!is_identifier("1a"));
        assert!(!is_identifier("a'; drop"));
        assert!(!is_identifier(&"a".repeat(64)));
    }
}
