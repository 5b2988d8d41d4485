//! Generates the gRPC code for `proto/baton/v1/*.proto` and the file descriptor set served by
//! reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos: Vec<PathBuf> =
        std::fs::read_dir(root.join("baton/v1"))?.map(|entry| entry.map(|e| e.path())).collect::<Result<_, _>>()?;
    let mut protos: Vec<PathBuf> = protos.into_iter().filter(|p| p.extension().is_some_and(|e| e == "proto")).collect();
    protos.sort();
    for proto in &protos {
        println!("cargo:rerun-if-changed={}", proto.display());
    }
    println!("cargo:rerun-if-changed={}", root.join("baton/v1").display());
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("baton_descriptor.bin"))
        // journal entries pass from the primary's journal to the standby's without a copy
        .bytes(".baton.v1.ReplicaFrame.records")
        .compile_protos(&protos, &[root])?;
    Ok(())
}
