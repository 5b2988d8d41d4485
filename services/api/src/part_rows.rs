//! A stored export part's rows straight onto the wire: each line of a part blob
//! (`{"id":…,"version":…,"updated_at_ms":…,"fields":{…}}`) becomes one encoded `baton.v1.Record`
//! in a single pass, typed by the object's current schema exactly as [`convert::record_to_pb`]
//! types it, and ready to send in a `baton.v1.ExportRows` frame's `encoded` bytes.
//!
//! Hand-written, because the general path costs more than producing the part: decoding each
//! line into a JSON map, building a `HashMap` of typed values, then prost measuring and encoding
//! that map took over half of FetchPart's CPU (docs/performance.md, "Export parts onto the wire").
//! Here a line's strings are borrowed from the blob, nothing is built per field, and each
//! length is known before it is written. The tests hold it to `record_to_pb` for every kind of
//! value.
//!
//! [`convert::record_to_pb`]: crate::convert::record_to_pb

use std::borrow::Cow;
use std::fmt;

use baton_store::model::{FieldType, ObjectSchema};
use prost::encoding::{encode_varint, encoded_len_varint};
use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};

/// Appends the part line `line` to `out` as an encoded Record, as field 1 of ExportRows (its
/// tag, its length, its bytes); `fields` is scratch space, cleared here.
pub fn encode_line(
    line: &[u8],
    schema: &ObjectSchema,
    fields: &mut Vec<u8>,
    out: &mut Vec<u8>,
) -> Result<(), serde_json::Error> {
    fields.clear();
    let mut deserializer = serde_json::Deserializer::from_slice(line);
    let head = LineSeed { schema, fields }.deserialize(&mut deserializer)?;
    deserializer.end()?;

    let (seconds, nanos) = (head.updated_at_ms.div_euclid(1000), head.updated_at_ms.rem_euclid(1000) * 1_000_000);
    let time_len = int_len(1, seconds) + int_len(2, nanos);
    let mut len = string_len(1, &head.id) + fields.len() + int_len(3, head.version);
    if head.updated_at_ms != 0 {
        len += 1 + encoded_len_varint(time_len as u64) + time_len;
    }
    out.push(0x0a); // ExportRows.records, length-delimited
    encode_varint(len as u64, out);
    put_string(1, &head.id, out);
    out.extend_from_slice(fields);
    put_int(3, head.version, out);
    if head.updated_at_ms != 0 {
        out.push(0x2a); // Record.update_time, length-delimited
        encode_varint(time_len as u64, out);
        put_int(1, seconds, out);
        put_int(2, nanos, out);
    }
    Ok(())
}

/// A line's record, less its fields (which are encoded as they are read).
struct Head<'de> {
    id: Cow<'de, str>,
    version: i64,
    updated_at_ms: i64,
}

/// Reads a part line, encoding its fields into `fields` as Record map entries.
struct LineSeed<'a> {
    schema: &'a ObjectSchema,
    fields: &'a mut Vec<u8>,
}

impl<'de> DeserializeSeed<'de> for LineSeed<'_> {
    type Value = Head<'de>;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Head<'de>, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for LineSeed<'_> {
    type Value = Head<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a part line")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Head<'de>, A::Error> {
        let mut head = Head { id: Cow::Borrowed(""), version: 0, updated_at_ms: 0 };
        while let Some(Text(key)) = map.next_key()? {
            match &*key {
                "id" => head.id = map.next_value::<Text>()?.0,
                "version" => head.version = map.next_value()?,
                "updated_at_ms" => head.updated_at_ms = map.next_value()?,
                "fields" => map.next_value_seed(FieldsSeed { schema: self.schema, out: &mut *self.fields })?,
                _ => {
                    map.next_value::<de::IgnoredAny>()?;
                }
            }
        }
        Ok(head)
    }
}

/// Reads a line's fields object, appending each non-null field the schema has not dropped as a
/// `map<string, Value>` entry (Record field 2).
struct FieldsSeed<'a> {
    schema: &'a ObjectSchema,
    out: &'a mut Vec<u8>,
}

impl<'de> DeserializeSeed<'de> for FieldsSeed<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for FieldsSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a record's fields")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(Text(name)) = map.next_key()? {
            let value: Scalar = map.next_value()?;
            if self.schema.is_dropped(&name) {
                continue;
            }
            let Some(kind) = kind_of(value, self.schema.field(&name).map(|f| f.field_type)) else {
                continue;
            };
            let value_len = kind.len();
            let entry_len = string_len(1, &name) + 1 + encoded_len_varint(value_len as u64) + value_len;
            self.out.push(0x12); // Record.fields entry, length-delimited
            encode_varint(entry_len as u64, self.out);
            put_string(1, &name, self.out);
            self.out.push(0x12); // the entry's value, length-delimited
            encode_varint(value_len as u64, self.out);
            kind.put(self.out);
        }
        Ok(())
    }
}

/// A JSON string, borrowed from the line unless it holds escapes.
struct Text<'de>(Cow<'de, str>);

impl<'de> de::Deserialize<'de> for Text<'de> {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextVisitor;
        impl<'de> Visitor<'de> for TextVisitor {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(TextVisitor)
    }
}

/// A stored field value as JSON gave it.
enum Scalar<'de> {
    Null,
    Bool(bool),
    Signed(i64),
    Unsigned(u64),
    Float(f64),
    Str(Cow<'de, str>),
    /// An object or array (stored records hold scalars; shown as its JSON text if one appears).
    Other(serde_json::Value),
}

impl<'de> de::Deserialize<'de> for Scalar<'de> {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ScalarVisitor;
        impl<'de> Visitor<'de> for ScalarVisitor {
            type Value = Scalar<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Null)
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Bool(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Signed(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Unsigned(v))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Float(v))
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Str(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Str(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Str(Cow::Owned(v)))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Scalar<'de>, A::Error> {
                let value = de::Deserialize::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(Scalar::Other(value))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Scalar<'de>, A::Error> {
                let value = de::Deserialize::deserialize(de::value::SeqAccessDeserializer::new(seq))?;
                Ok(Scalar::Other(value))
            }
        }
        deserializer.deserialize_any(ScalarVisitor)
    }
}

/// A `baton.v1.Value`'s kind, ready to encode.
enum Kind<'de> {
    String(Cow<'de, str>),
    Integer(i64),
    Number(f64),
    Boolean(bool),
    Decimal(Cow<'de, str>),
}

/// The kind a stored value takes as a field of `field_type`: the rules of
/// [`crate::convert::value_to_pb`], which the tests compare this with. Null is no value.
fn kind_of(value: Scalar<'_>, field_type: Option<FieldType>) -> Option<Kind<'_>> {
    let float_text = |f: f64| serde_json::Number::from_f64(f).map_or_else(|| f.to_string(), |n| n.to_string());
    Some(match (field_type, value) {
        (_, Scalar::Null) => return None,
        (Some(FieldType::Decimal), Scalar::Str(s)) => Kind::Decimal(s),
        (Some(FieldType::Decimal), Scalar::Signed(n)) => Kind::Decimal(n.to_string().into()),
        (Some(FieldType::Decimal), Scalar::Unsigned(n)) => Kind::Decimal(n.to_string().into()),
        (Some(FieldType::Decimal), Scalar::Float(f)) => Kind::Decimal(float_text(f).into()),
        (Some(FieldType::Number), Scalar::Signed(n)) => Kind::Number(n as f64),
        (Some(FieldType::Number), Scalar::Unsigned(n)) => Kind::Number(n as f64),
        (_, Scalar::Signed(n)) => Kind::Integer(n),
        (_, Scalar::Unsigned(n)) => match i64::try_from(n) {
            Ok(n) => Kind::Integer(n),
            Err(_) => Kind::Number(n as f64),
        },
        (_, Scalar::Float(f)) => Kind::Number(f),
        (_, Scalar::Bool(b)) => Kind::Boolean(b),
        (_, Scalar::Str(s)) => Kind::String(s),
        (_, Scalar::Other(v)) => Kind::String(v.to_string().into()),
    })
}

impl Kind<'_> {
    /// The encoded length of the Value message holding this kind (a oneof member is always
    /// written, zero or not).
    fn len(&self) -> usize {
        1 + match self {
            Kind::String(s) | Kind::Decimal(s) => encoded_len_varint(s.len() as u64) + s.len(),
            Kind::Integer(n) => encoded_len_varint(*n as u64),
            Kind::Number(_) => 8,
            Kind::Boolean(_) => 1,
        }
    }

    fn put(&self, out: &mut Vec<u8>) {
        match self {
            Kind::String(s) | Kind::Decimal(s) => {
                out.push(if matches!(self, Kind::String(_)) { 0x12 } else { 0x32 });
                encode_varint(s.len() as u64, out);
                out.extend_from_slice(s.as_bytes());
            }
            Kind::Integer(n) => {
                out.push(0x18);
                encode_varint(*n as u64, out);
            }
            Kind::Number(f) => {
                out.push(0x21);
                out.extend_from_slice(&f.to_le_bytes());
            }
            Kind::Boolean(b) => {
                out.push(0x28);
                out.push(u8::from(*b));
            }
        }
    }
}

/// The encoded length of proto3 string field `tag` (< 16): nothing when empty.
fn string_len(tag: u8, s: &str) -> usize {
    let _ = tag;
    if s.is_empty() { 0 } else { 1 + encoded_len_varint(s.len() as u64) + s.len() }
}

fn put_string(tag: u8, s: &str, out: &mut Vec<u8>) {
    if !s.is_empty() {
        out.push(tag << 3 | 2);
        encode_varint(s.len() as u64, out);
        out.extend_from_slice(s.as_bytes());
    }
}

/// The encoded length of proto3 integer field `tag` (< 16), int32 or int64: nothing when zero.
fn int_len(tag: u8, n: i64) -> usize {
    let _ = tag;
    if n == 0 { 0 } else { 1 + encoded_len_varint(n as u64) }
}

fn put_int(tag: u8, n: i64, out: &mut Vec<u8>) {
    if n != 0 {
        out.push(tag << 3);
        encode_varint(n as u64, out);
    }
}

#[cfg(test)]
mod tests {
    use baton_store::model::Record;
    use prost::Message;

    use baton_mesh::proto::v1 as pb;

    use super::*;
    use crate::convert::record_to_pb;

    /// The conversions' test object, at version 3, with a dropped field `gone`.
    fn schema() -> ObjectSchema {
        ObjectSchema { version: 3, dropped_fields: vec!["gone".into()], ..crate::convert::tests::schema() }
    }

    /// The line's record, as `record_to_pb` answers it.
    fn expected(line: &str, schema: &ObjectSchema) -> pb::Record {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let record = Record {
            id: v["id"].as_str().unwrap().to_owned(),
            fields: v["fields"].as_object().unwrap().clone(),
            version: v["version"].as_i64().unwrap(),
            updated_at_ms: v["updated_at_ms"].as_i64().unwrap(),
        };
        record_to_pb(&record, schema)
    }

    fn encoded(lines: &[&str], schema: &ObjectSchema) -> pb::ExportRows {
        let (mut scratch, mut out) = (Vec::new(), Vec::new());
        for line in lines {
            encode_line(line.as_bytes(), schema, &mut scratch, &mut out).unwrap();
        }
        let frame = pb::ExportRows { encoded: out.into(), schema_version: schema.version, ..Default::default() };
        pb::ExportRows::decode(frame.encode_to_vec().as_slice()).unwrap()
    }

    #[test]
    fn every_kind_of_value_encodes_as_record_to_pb_types_it() {
        let schema = schema();
        let lines = [
            // each typed field, with values at the edges of their types
            r#"{"id":"c1","version":7,"updated_at_ms":1700000000123,"fields":{"code":"c1","n":-9223372036854775808,"x":2.5,"d":"-1234.5","b":true}}"#,
            r#"{"id":"c2","version":1,"updated_at_ms":0,"fields":{"code":"","n":0,"x":0,"d":"0","b":false}}"#,
            r#"{"id":"c3","version":2,"updated_at_ms":-1500,"fields":{"n":9223372036854775807,"x":18446744073709551615,"d":12,"gone":"dropped","extra":18446744073709551615}}"#,
            // fields the schema does not have take the JSON kind; nulls are left out
            r#"{"id":"c4","version":3,"updated_at_ms":5,"fields":{"u":1.25,"v":-3,"w":"text","z":null,"b":false,"d":1.5e300}}"#,
            // escaped strings are unescaped, key order does not matter, a non-scalar is its text
            r#"{"fields":{"code":"a\"b\\c\u00e9","o":{"k":[1,2]},"q":[true]},"updated_at_ms":9,"version":4,"id":"c\n5"}"#,
            // no fields at all
            r#"{"id":"","version":0,"updated_at_ms":0,"fields":{}}"#,
        ];
        let frame = encoded(&lines, &schema);
        assert_eq!(frame.schema_version, 3);
        assert_eq!(frame.records.len(), lines.len());
        for (line, record) in lines.iter().zip(&frame.records) {
            assert_eq!(record, &expected(line, &schema), "line {line}");
        }
    }

    #[test]
    fn records_and_encoded_rows_share_a_frame_in_order() {
        let schema = schema();
        let first = expected(r#"{"id":"a","version":1,"updated_at_ms":1,"fields":{"n":1}}"#, &schema);
        let (mut scratch, mut out) = (Vec::new(), Vec::new());
        encode_line(br#"{"id":"b","version":1,"updated_at_ms":1,"fields":{"n":2}}"#, &schema, &mut scratch, &mut out)
            .unwrap();
        let frame = pb::ExportRows { records: vec![first.clone()], encoded: out.into(), schema_version: 3 };
        assert_eq!(frame.encoded_len(), frame.encode_to_vec().len());
        let decoded = pb::ExportRows::decode(frame.encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded.records.len(), 2);
        assert_eq!(decoded.records[0], first);
        assert_eq!(decoded.records[1].id, "b");
    }

    #[test]
    fn a_corrupt_line_is_an_error_not_a_record() {
        let schema = schema();
        let (mut scratch, mut out) = (Vec::new(), Vec::new());
        for line in [&b"{\"id\":\"a\",\"fields\":{\"n\":1}"[..], b"{\"id\":1}", b"{\"id\":\"a\"} trailing", b"[]"] {
            assert!(encode_line(line, &schema, &mut scratch, &mut out).is_err(), "{}", String::from_utf8_lossy(line));
        }
    }
}
