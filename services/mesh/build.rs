//! Generates the gRPC code for `proto/baton/v1/*.proto` (the public API) and
//! `proto/baton/internal/v1/*.proto` (manager replication, worker work), and the file descriptor set served by
//! reflection, which also holds the vendored `proto/google/rpc` protos (ErrorInfo, BadRequest,
//! RetryInfo, Status) so that reflection clients decode baton's error details.

use std::path::{Path, PathBuf};

/// The `.proto` files directly in `dir`, sorted.
fn protos_in(dir: &Path) -> Result<Vec<PathBuf>, Box<dyn std::error::Error>> {
    let mut protos = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "proto") {
            protos.push(path);
        }
    }
    protos.sort();
    println!("cargo:rerun-if-changed={}", dir.display());
    Ok(protos)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let mut protos = protos_in(&root.join("baton/v1"))?;
    protos.extend(protos_in(&root.join("baton/internal/v1"))?);
    protos.extend(protos_in(&root.join("google/rpc"))?);
    for proto in &protos {
        println!("cargo:rerun-if-changed={}", proto.display());
    }
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("baton_descriptor.bin"))
        // google.rpc is in the descriptor set for reflection only: its Rust types are
        // tonic_types', so none are generated here
        .extern_path(".google.rpc", "::tonic_types::pb")
        // journal entries pass from the primary's journal to the standby's without a copy
        .bytes(".baton.internal.v1.ReplicaFrame.records")
        // a FetchPart frame can carry records encoded once, as they are read from the part
        // (hand-written in `proto.rs`; same wire format)
        .extern_path(".baton.v1.ExportRows", "crate::proto::ExportRows")
        .compile_protos(&protos, &[root])?;
    Ok(())
}
