//! What the scheduler and the workers agree on: the full names (type URLs) of the work messages
//! they exchange through the session manager (`proto/baton/internal/v1/work.proto`), and the
//! manager pool the workers register in.

/// The full name of the chunk work message.
pub const CHUNK_WORK: &str = "baton.internal.v1.ChunkWork";
/// The full name of its answer.
pub const CHUNK_DONE: &str = "baton.internal.v1.ChunkDone";
/// The full name of the export part work message.
pub const EXPORT_PART_WORK: &str = "baton.internal.v1.ExportPartWork";
/// The full name of its answer.
pub const EXPORT_PART_DONE: &str = "baton.internal.v1.ExportPartDone";
/// The manager pool workers register in by default.
pub const DEFAULT_POOL: &str = "workers";
