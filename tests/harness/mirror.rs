//! A client-side mirror of an object, as a consumer of Export and Extract builds one: every row
//! and change applied with the version guard (only a newer version is written), deletes kept as
//! tombstones so that an older upsert arriving later cannot bring a record back.

use std::collections::BTreeMap;

use baton_mesh::proto::v1 as pb;

use crate::fields_json;

/// Record id → (version, fields; None for a tombstone).
pub type Mirror = BTreeMap<String, (i64, Option<serde_json::Value>)>;

/// Applies a row or change to a mirror, version-guarded: answers whether it was written.
pub fn apply(mirror: &mut Mirror, id: &str, version: i64, fields: Option<serde_json::Value>) -> bool {
    let newer = mirror.get(id).is_none_or(|(v, _)| version > *v);
    if newer {
        mirror.insert(id.to_owned(), (version, fields));
    }
    newer
}

/// Applies a change of the log (an upsert or a delete); answers whether it was written.
pub fn apply_change(mirror: &mut Mirror, change: &pb::Change) -> bool {
    let fields = (change.op == pb::ChangeOp::Upsert as i32).then(|| fields_json(&change.fields));
    apply(mirror, &change.record_id, change.version, fields)
}

/// The live records of a mirror, in the shape of [`crate::Server::records`].
pub fn live(mirror: &Mirror) -> BTreeMap<String, (i64, serde_json::Value)> {
    mirror.iter().filter_map(|(id, (v, f))| f.clone().map(|f| (id.clone(), (*v, f)))).collect()
}
