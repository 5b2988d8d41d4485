//! The generated code of `proto/baton/v1/*.proto`. Wire types stay at the edge: services convert
//! them into their domain types at the gRPC boundary.

/// The `baton.v1` package.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("baton.v1");
}

/// The encoded file descriptor set of every baton proto, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("baton_descriptor");
