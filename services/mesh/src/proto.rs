//! The generated code of `proto/baton/v1/*.proto`. Wire types stay at the edge: services convert
//! them into their domain types at the gRPC boundary.

/// The `baton.v1` package: the public API.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("baton.v1");
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
