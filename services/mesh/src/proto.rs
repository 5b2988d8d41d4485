//! The generated code of `proto/baton/v1/*.proto`. Wire types stay at the edge: services convert
//! them into their domain types at the gRPC boundary.

/// The `baton.v1` package: the public API.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("baton.v1");
    pub use super::ExportRows;
}

/// `baton.v1.ExportRows`, one frame of a FetchPart stream, written by hand so that a server can
/// send records it has already encoded (`encoded`) without building them as messages first: a
/// part's rows go from the stored part to the wire in one pass (see `baton_api::part_rows`).
/// On the wire it is the generated message's exact format; a decoded frame has every record in
/// `records` and `encoded` empty.
#[derive(Clone, PartialEq, Default, Debug)]
pub struct ExportRows {
    /// The rows (at most 1,000 to a frame).
    pub records: Vec<v1::Record>,
    /// Further rows, sent after `records`: each one `Record` already encoded as field 1 of
    /// ExportRows (its tag, its length, its bytes).
    pub encoded: bytes::Bytes,
    /// The version of the object's schema the rows are typed under.
    pub schema_version: i64,
}

impl prost::Message for ExportRows {
    fn encode_raw(&self, buf: &mut impl bytes::BufMut) {
        use prost::encoding::{int64, message};
        for record in &self.records {
            message::encode(1, record, buf);
        }
        buf.put_slice(&self.encoded);
        if self.schema_version != 0 {
            int64::encode(3, &self.schema_version, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        use prost::encoding::{int64, message, skip_field};
        match tag {
            1 => message::merge_repeated(wire_type, &mut self.records, buf, ctx),
            3 => int64::merge(wire_type, &mut self.schema_version, buf, ctx),
            _ => skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        let version =
            if self.schema_version != 0 { prost::encoding::int64::encoded_len(3, &self.schema_version) } else { 0 };
        prost::encoding::message::encoded_len_repeated(1, &self.records) + self.encoded.len() + version
    }

    fn clear(&mut self) {
        self.records.clear();
        self.encoded = bytes::Bytes::new();
        self.schema_version = 0;
    }
}

/// The `baton.internal.v1` package: what baton's own processes say to each other (manager
/// replication, the scheduler's work for workers). No client of the public API needs it.
pub mod internal {
    /// Version 1.
    #[allow(missing_docs, clippy::all, clippy::pedantic)]
    pub mod v1 {
        tonic::include_proto!("baton.internal.v1");
    }
}

/// The encoded file descriptor set of every baton proto, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("baton_descriptor");

/// The type URL of a baton message in a `google.protobuf.Any`: `type.googleapis.com/` and its
/// full name.
pub fn type_url(full_name: &str) -> String {
    format!("type.googleapis.com/{full_name}")
}

/// Packs `message` into a `google.protobuf.Any` under its full name (`baton.internal.v1.ChunkWork`).
pub fn to_any(full_name: &str, message: &impl prost::Message) -> prost_types::Any {
    prost_types::Any { type_url: type_url(full_name), value: message.encode_to_vec() }
}

/// Unpacks a `google.protobuf.Any` that must hold a `full_name` message.
pub fn from_any<M: prost::Message + Default>(full_name: &str, any: &prost_types::Any) -> Result<M, String> {
    if any.type_url != type_url(full_name) {
        return Err(format!("expected a {full_name}, got {:?}", any.type_url));
    }
    M::decode(any.value.as_slice()).map_err(|e| format!("cannot decode a {full_name}: {e}"))
}

/// A time in milliseconds since the Unix epoch as a `google.protobuf.Timestamp`; 0 (not yet, or
/// never) as none.
pub fn timestamp(unix_ms: i64) -> Option<prost_types::Timestamp> {
    (unix_ms != 0).then(|| prost_types::Timestamp {
        seconds: unix_ms.div_euclid(1000),
        nanos: (unix_ms.rem_euclid(1000) * 1_000_000) as i32,
    })
}

/// A `google.protobuf.Timestamp` in milliseconds since the Unix epoch; none as 0.
pub fn unix_ms(timestamp: Option<&prost_types::Timestamp>) -> i64 {
    timestamp.map_or(0, |t| t.seconds.saturating_mul(1000).saturating_add(i64::from(t.nanos) / 1_000_000))
}

/// A duration in milliseconds as a `google.protobuf.Duration`.
pub fn duration(ms: u64) -> prost_types::Duration {
    prost_types::Duration { seconds: (ms / 1000) as i64, nanos: ((ms % 1000) * 1_000_000) as i32 }
}

/// A `google.protobuf.Duration` in whole milliseconds (none: 0); a negative one is an error.
pub fn duration_ms(duration: Option<&prost_types::Duration>) -> Result<u64, String> {
    let Some(d) = duration else { return Ok(0) };
    if d.seconds < 0 || d.nanos < 0 {
        return Err("cannot be negative".to_owned());
    }
    Ok((d.seconds as u64).saturating_mul(1000).saturating_add(d.nanos as u64 / 1_000_000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_convert_both_ways_and_zero_is_unset() {
        assert_eq!(timestamp(0), None);
        for ms in [1, 999, 1_000, 1_733_572_800_123, -1, -1_001] {
            assert_eq!(unix_ms(timestamp(ms).as_ref()), ms, "{ms}");
        }
        let before_epoch = timestamp(-1).unwrap();
        assert_eq!((before_epoch.seconds, before_epoch.nanos), (-1, 999_000_000), "nanos are never negative");
        assert_eq!(duration_ms(Some(&duration(1_500))), Ok(1_500));
        assert_eq!(duration_ms(None), Ok(0));
        assert!(duration_ms(Some(&prost_types::Duration { seconds: -1, nanos: 0 })).is_err());
    }
}
