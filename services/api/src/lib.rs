//! The edge of baton's public API (`proto/baton/v1`), in one place so that no service crate
//! depends on another:
//! - [`convert`]: protobuf messages ↔ store types (records and their typed values, changes,
//!   schemas);
//! - [`batches`]: batches and chunks on the wire;
//! - [`completion`]: where a batch's or export's completion is pushed, and its delivery;
//! - [`exports`]: an export's status on the wire;
//! - [`keys`]: the store as the mesh's API key resolver;
//! - [`part_rows`]: a stored export part's rows encoded straight onto the wire;
//! - [`paging`]: page sizes and page tokens of the lists ordered by creation time;
//! - [`error`]: the services' [`Error`] and its one mapping to `tonic::Status`;
//! - [`work`]: what the scheduler and the workers agree on (the work messages' type URLs, the
//!   worker pool's name).

pub mod batches;
pub mod completion;
pub mod convert;
pub mod error;
pub mod exports;
pub mod keys;
pub mod paging;
pub mod part_rows;
pub mod work;

pub use error::Error;
